"""What is done to a model before it is served: ``prepare`` stores graphs optimised ahead of time (and says,
at load, whether a stored one fits this onnxruntime and CPU); ``oclaw optimize`` writes an INT8 or FP16 version
within a metric budget (``optimizer`` runs it: ``data`` reads calibration and evaluation sets, ``quantize`` calls
onnxruntime's quantization tools, ``evaluate`` measures, ``search`` keeps the most sensitive nodes in fp32,
``versioning`` adds the version atomically, ``report`` and ``progress`` show it); ``oclaw convert`` (``convert``)
writes a scikit-learn or PyTorch model as a version, verified against the framework's own output.

May import the core (``engine.config``, ``engine.session``, ``engine.model``, ...) and ``engine.repository``; the
core imports only ``prepare.prepared_path`` (which graph file a session opens). ``onnx``,
``onnxruntime.quantization``, skl2onnx and torch are imported only inside the functions that use them, matplotlib
only for a report.
"""
