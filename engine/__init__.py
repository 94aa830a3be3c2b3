"""oclaw's inference core: settings, errors, the V2 codec, sessions, the model pool and one request's path.

Flat modules here are the core (``config``, ``errors``, ``datatypes``, ``tensors``, ``processing``, ``session``,
``warmup``, ``model``, ``pool``, ``dataplane``, ``batching``, ``runtime``, ``logs``, ``stats``, ``aws``); three
packages hold the subsystems around it:

- ``engine.repository``: where models come from (local directory, ``s3://``, manifest, publish);
- ``engine.metering``: what each request cost and where the records go (records, batches, sinks, meter, metrics);
- ``engine.optimize``: what is done to a model before it is served (``prepare`` now).

Nothing under ``engine`` imports a web framework, Mangum, pydantic or Lambda types, nor boto3 at module level
(``engine.aws`` imports it on first use); ``tests/test_layout.py`` checks the import graph has no cycle.
"""

__version__ = "0.1.0"
