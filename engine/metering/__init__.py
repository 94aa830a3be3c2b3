"""Per-request metering: what a request cost (``records``), a flush's records as JSON lines (``batch``), where
they go (``sinks``), what a sink has not taken yet (``spool``), the ``Meter`` that bills and flushes (``meter``)
and Prometheus metrics (``metrics``).

Imports run one way: ``records`` ← ``batch`` ← ``sinks``, ``spool`` ← ``meter``; ``metrics`` reads ``records``.
May import from the core: ``engine.config``, ``engine.errors``, ``engine.aws`` (boto3 on first use, for the queue
sinks); ``metrics`` reads the runtime's pool for its gauges. The core imports only ``records`` (the usage a request
captures); ``engine.runtime`` builds the ``Meter`` on first use.
"""
