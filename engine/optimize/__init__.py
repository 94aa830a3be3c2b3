"""What is done to a model before it is served: ``prepare`` stores graphs optimised ahead of time (and says,
at load, whether a stored one fits this onnxruntime and CPU).

May import the core (``engine.config``, ``engine.session``, ...) and ``engine.repository``; the core imports only
``prepare.prepared_path`` (which graph file a session opens).
"""
