"""The baseline: the FastAPI + onnxruntime app most people would write first.

One global session created at import with default options, one route, an ``async def`` handler that
parses the body (``await request.json()`` or the binary extension), runs ``session.run`` inline on
the event loop and returns a V2 JSON response (a dict, serialised by FastAPI).

Run: ``NAIVE_MODEL=path/to/model.onnx python -m benchmarks.naive_app --port P``
(uvicorn with the same loop / HTTP settings as ``oclaw serve``: auto -> uvloop + httptools).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request

DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}
V2_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}

session = ort.InferenceSession(os.environ["NAIVE_MODEL"])
output_names = [o.name for o in session.get_outputs()]

app = FastAPI()


@app.post("/v2/models/{name}/infer")
async def infer(name: str, request: Request) -> dict[str, Any]:
    header_length = request.headers.get("inference-header-content-length")
    feed = {}
    if header_length is None:
        doc = await request.json()
        for item in doc["inputs"]:
            feed[item["name"]] = np.array(item["data"], dtype=DTYPES[item["datatype"]]).reshape(item["shape"])
    else:
        body = await request.body()
        split = int(header_length)
        doc = json.loads(body[:split])
        offset = split
        for item in doc["inputs"]:
            size = item["parameters"]["binary_data_size"]
            dtype = np.dtype(DTYPES[item["datatype"]])
            array = np.frombuffer(body, dtype=dtype, count=size // dtype.itemsize, offset=offset)
            feed[item["name"]] = array.reshape(item["shape"])
            offset += size
    results = session.run(output_names, feed)
    return {
        "model_name": name,
        "model_version": "1",
        "outputs": [
            {"name": n, "datatype": V2_NAMES[r.dtype], "shape": list(r.shape), "data": r.ravel().tolist()}
            for n, r in zip(output_names, results, strict=True)
        ],
    }


if __name__ == "__main__":
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        loop="auto",
        http="auto",
        log_level="warning",
        access_log=False,
        server_header=False,
    )
