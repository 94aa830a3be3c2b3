"""The cold-start floor: import onnxruntime + numpy, create a default session, run once, print.

Run as ``python -m benchmarks.floor MODEL.onnx``; prints one JSON line with its own phase timings.
Nothing else is imported, so spawn -> this line is the least any Python server could take.
"""

import time

_T0 = time.perf_counter()

import json  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

_T1 = time.perf_counter()
session = ort.InferenceSession(sys.argv[1])
_T2 = time.perf_counter()
inp = session.get_inputs()[0]
shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
out = session.run(None, {inp.name: np.zeros(shape, dtype=np.float32)})
_T3 = time.perf_counter()
print(
    json.dumps(
        {
            "import_ms": (_T1 - _T0) * 1e3,
            "session_ms": (_T2 - _T1) * 1e3,
            "run_ms": (_T3 - _T2) * 1e3,
            "script_ms": (_T3 - _T0) * 1e3,
            "output_shape": list(out[0].shape),
        }
    ),
    flush=True,
)
