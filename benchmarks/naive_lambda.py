"""The naive Lambda baseline: FastAPI + Mangum imported at module level, the model loaded with default
onnxruntime options on the first request, answered through Mangum. Model path from ``NAIVE_MODEL``."""

import json
import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request
from mangum import Mangum

app = FastAPI()
_session: ort.InferenceSession | None = None


def session() -> ort.InferenceSession:
    global _session
    if _session is None:
        _session = ort.InferenceSession(os.environ["NAIVE_MODEL"])
    return _session


@app.post("/v2/models/{name}/infer")
async def infer(name: str, request: Request) -> dict[str, object]:
    body = await request.body()
    sess = session()
    length = request.headers.get("inference-header-content-length")
    if length is not None:
        head = json.loads(body[: int(length)])
        spec = head["inputs"][0]
        x = np.frombuffer(body[int(length) :], dtype=np.float32).reshape(spec["shape"])
    else:
        spec = json.loads(body)["inputs"][0]
        x = np.array(spec["data"], dtype=np.float32).reshape(spec["shape"])
    out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return {
        "model_name": name,
        "outputs": [{"name": "y", "datatype": "FP32", "shape": list(out.shape), "data": out.ravel().tolist()}],
    }


handler = Mangum(app, lifespan="off")
