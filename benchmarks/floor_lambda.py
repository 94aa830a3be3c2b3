"""The Lambda cold-start floor: a hand-written handler with no framework.

At import it opens the pre-optimized graph (``model.prepared.onnx``, made by ``oclaw prepare``; path from
``FLOOR_MODEL``) with graph optimisations off and oclaw's thread settings; the handler decodes an HTTP API v2
event's base64 body (a V2 binary request: JSON header of ``Inference-Header-Content-Length`` bytes, then the raw
tensor), runs once and answers JSON. Prints a ``cold_start`` line with its own import and session times.
"""

import os
import time

_T0 = time.perf_counter()


def _process_age_ms() -> float:
    """Milliseconds between this process's start and now (Linux; 10 ms resolution), as oclaw's ``runtime`` phase."""
    with open("/proc/self/stat", encoding="ascii") as fh:
        start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
    return (time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")) * 1000


_RUNTIME_MS = _process_age_ms()

import base64  # noqa: E402
import json  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

_T1 = time.perf_counter()
_opts = ort.SessionOptions()
_opts.intra_op_num_threads = len(os.sched_getaffinity(0))
_opts.inter_op_num_threads = 1
_opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
_opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
_opts.log_severity_level = 4
_opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
SESSION = ort.InferenceSession(os.environ["FLOOR_MODEL"], sess_options=_opts, providers=["CPUExecutionProvider"])
INPUT = SESSION.get_inputs()[0].name
_T2 = time.perf_counter()
print(
    json.dumps(
        {
            "event": "cold_start",
            "phases_ms": {"runtime": _RUNTIME_MS, "imports": (_T1 - _T0) * 1e3, "sessions": (_T2 - _T1) * 1e3},
        }
    ),
    flush=True,
)


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Decode the V2 binary request, run once, answer the outputs as V2 JSON."""
    body = base64.b64decode(event["body"]) if event.get("isBase64Encoded") else event["body"].encode()
    length = int(event["headers"]["inference-header-content-length"])
    spec = json.loads(body[:length])["inputs"][0]
    x = np.frombuffer(body, dtype=np.float32, offset=length).reshape(spec["shape"])
    outputs = SESSION.run(None, {INPUT: x})
    answer = {
        "model_name": event["rawPath"].split("/")[3],
        "outputs": [
            {"name": meta.name, "datatype": "FP32", "shape": list(out.shape), "data": out.ravel().tolist()}
            for meta, out in zip(SESSION.get_outputs(), outputs, strict=True)
        ],
    }
    return {"statusCode": 200, "headers": {"content-type": "application/json"}, "body": json.dumps(answer)}
