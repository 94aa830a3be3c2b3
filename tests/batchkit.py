"""Shared helpers of the dynamic batching tests: the counter model, V2 requests and answers, a model's threads held."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engine.dynbatch import Batcher, batcher_for
from engine.model import LoadedModel
from engine.tensors import decode_response, encode_request
from tests.conftest import ServerThread
from tests.modelgen import OPSET

BATCHING = {"max_queue_delay_microseconds": 10_000_000, "max_queue_size": 64}


def counter() -> onnx.ModelProto:
    """y = 2x (FP32 [batch, 4]) and n = the run's batch size in every row (INT64 [batch])."""
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    start, end = (numpy_helper.from_array(np.array([v], dtype=np.int64), n) for n, v in (("s", 0), ("e", 1)))
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "two"], ["y"]),
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Slice", ["shape", "s", "e"], ["b"]),
            helper.make_node("Expand", ["b", "b"], ["n"]),
        ],
        "counter",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("n", TensorProto.INT64, ["batch"]),
        ],
        [two, start, end],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def model_of(srv: ServerThread, name: str) -> LoadedModel:
    return srv.runtime.pool.get(name)


def batcher_of(srv: ServerThread, name: str) -> Batcher:
    batcher = batcher_for(model_of(srv, name))
    assert batcher is not None
    return batcher


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Wait for a state of the server (generous bound: never a measure of speed)."""
    deadline = time.monotonic() + 30
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.005)


@contextlib.contextmanager
def held(model: LoadedModel, threads: int = 1) -> Iterator[None]:
    """Occupy the model's run threads until the block ends: runs submitted meanwhile wait for them."""
    gate, started = threading.Event(), threading.Semaphore(0)

    def hold() -> None:
        started.release()
        gate.wait(60)

    jobs = [model.executor.submit(hold) for _ in range(threads)]
    for _ in jobs:
        assert started.acquire(timeout=30)
    try:
        yield
    finally:
        gate.set()
        for job in jobs:
            job.result(timeout=30)


def x_body(
    x: np.ndarray, *, binary: bool = False, parameters: dict[str, Any] | None = None
) -> tuple[bytes, dict[str, str]]:
    body, length = encode_request({"x": x}, binary=binary)
    if parameters:
        doc = json.loads(body[:length] if length else body)
        doc["parameters"] = {**doc.get("parameters", {}), **parameters}
        head = json.dumps(doc).encode()
        body = head + (body[length:] if length else b"")
        length = len(head) if length else None
    headers = {"content-type": "application/json"}
    if length is not None:
        headers["inference-header-content-length"] = str(length)
    return body, headers


def post(srv: ServerThread, model: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{srv.url}/v2/models/{model}/infer", content=body, headers=headers, timeout=60)


def outputs(resp: httpx.Response) -> dict[str, np.ndarray]:
    assert resp.status_code == 200, resp.text
    length = resp.headers.get("inference-header-content-length")
    return decode_response(resp.content, int(length) if length else None)


def queue_up(
    srv: ServerThread, name: str, pool: ThreadPoolExecutor, sends: list[Callable[[], httpx.Response]]
) -> list[Future[httpx.Response]]:
    """Send requests concurrently and wait until each is queued (or answered)."""
    batcher = batcher_of(srv, name)
    before = len(batcher.queue)
    futures = [pool.submit(send) for send in sends]
    wait_until(lambda: len(batcher.queue) + sum(f.done() for f in futures) == before + len(sends), "all are queued")
    return futures
