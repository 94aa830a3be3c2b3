"""Dynamic batching on a real server: concurrent requests stacked into one run, split back, errors kept apart.

Batches are made deterministic without timing: the model's only run thread is held (a job waiting on an Event)
while one request is in flight, so the requests that follow queue; the test waits until the batcher holds them,
then lets go. The ``counter`` model returns its batch size in every row, so a response tells which run served it.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from PIL import Image

from engine.dynbatch import batcher_for
from engine.tensors import decode_response, encode_request
from handler import v2
from tests.batchkit import BATCHING, batcher_of, counter, held, model_of, outputs, post, queue_up, wait_until, x_body
from tests.conftest import ServerThread, start_server
from tests.modelgen import _save, fixed_shape, gather, tiny_classifier

IMAGE_MANIFEST = {
    "preprocess": {"kind": "image", "size": [8, 8], "crop_fraction": 1.0, "mean": [0, 0, 0], "std": [255] * 3},
    "postprocess": {"kind": "classification", "top_k": 3},
    "labels": ["red", "green", "blue"],
    "max_batch_size": 16,
}


@pytest.fixture(scope="module")
def batch_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("batching")
    _save(counter(), repo, "counter", 1, {"max_batch_size": 64, "dynamic_batching": BATCHING})
    _save(counter(), repo, "counter_q1", 1, {"max_batch_size": 64, "dynamic_batching": {"max_queue_size": 1}})
    _save(counter(), repo, "counter_plain", 1, {"max_batch_size": 64})
    _save(gather(), repo, "gather", 1, {"max_batch_size": 64, "dynamic_batching": BATCHING})
    _save(fixed_shape(), repo, "fixed", 1, {"max_batch_size": 2, "dynamic_batching": {}})
    _save(tiny_classifier(), repo, "tiny", 1, {**IMAGE_MANIFEST, "dynamic_batching": BATCHING})
    return repo


@pytest.fixture(scope="module")
def records_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("metering") / "records.jsonl"


@pytest.fixture(scope="module")
def srv(batch_repo: Path, records_path: Path) -> Iterator[ServerThread]:
    # inline_run_us=0: every request runs on the model's thread, which the tests hold to make batches form
    server = start_server(batch_repo, inline_run_us=0, metering_sinks=(f"jsonl:{records_path}",))
    yield server
    server.stop()


@contextlib.contextmanager
def one_in_flight(
    srv: ServerThread, name: str, pool: ThreadPoolExecutor, send: Callable[[], httpx.Response]
) -> Iterator[Future[httpx.Response]]:
    """Hold the model's thread with one request in flight: requests sent inside the block queue for the next run."""
    model, batcher = model_of(srv, name), batcher_of(srv, name)
    with held(model):
        lone = pool.submit(send)
        wait_until(lambda: batcher.busy == 1, "the first request is in flight")
        yield lone
    assert lone.result(timeout=30).status_code == 200


def records(srv: ServerThread, path: Path) -> dict[str, dict[str, Any]]:
    srv.runtime.meter.flush()
    lines = path.read_text().splitlines() if path.exists() else []
    return {r["request_id"]: r for r in map(json.loads, lines)}


# -- behaviour ------------------------------------------------------------------------------------------------------


def test_concurrent_json_and_binary_requests_run_stacked_and_split_back(srv: ServerThread) -> None:
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((rows, 4)).astype(np.float32) for rows in (1, 2, 1, 3, 1, 2)]
    bodies = [x_body(x, binary=i >= 3) for i, x in enumerate(xs)]  # three JSON, three binary: two plans
    model, batcher = model_of(srv, "counter"), batcher_of(srv, "counter")
    runs, before = batcher.runs, model.stats.as_dict("counter", "1")
    with ThreadPoolExecutor(8) as pool:
        lone_body = x_body(np.ones((1, 4), np.float32))
        with one_in_flight(srv, "counter", pool, lambda: post(srv, "counter", *lone_body)) as lone:
            futures = queue_up(srv, "counter", pool, [lambda b=b: post(srv, "counter", *b) for b in bodies])
        results = [outputs(f.result(timeout=30)) for f in futures]
        assert outputs(lone.result())["n"].tolist() == [1]  # ran alone, at once
    for i, (x, out) in enumerate(zip(xs, results, strict=True)):
        np.testing.assert_array_equal(out["y"], 2 * x)
        rows_of_its_run = sum(len(x) for x in (xs[:3] if i < 3 else xs[3:]))
        assert out["n"].tolist() == [rows_of_its_run] * len(x)  # one run per plan, in arrival order
    assert batcher.runs == runs + 2
    after = model.stats.as_dict("counter", "1")  # each request counted, with its rows
    assert after["inference_stats"]["success"]["count"] == before["inference_stats"]["success"]["count"] + 7
    assert after["inference_count"] == before["inference_count"] + 1 + sum(len(x) for x in xs)
    assert after["execution_count"] == before["execution_count"] + 3  # Triton's executions: the lone run and two
    sizes = {b["batch_size"]: b["compute_infer"]["count"] for b in after["batch_stats"]}
    was = {b["batch_size"]: b["compute_infer"]["count"] for b in before["batch_stats"]}
    assert sizes[4] >= was.get(4, 0) + 1 and sizes[6] >= was.get(6, 0) + 1  # runs of 1+2+1 and 3+1+2 rows


def test_many_concurrent_requests_are_answered_correctly(srv: ServerThread) -> None:
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((int(rng.integers(1, 4)), 4)).astype(np.float32) for _ in range(48)]
    model = model_of(srv, "counter")
    served = model.stats.as_dict("counter", "1")["inference_stats"]["success"]["count"]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda x: post(srv, "counter", *x_body(x, binary=True)), xs))
    for x, answer in zip(xs, answers, strict=True):
        out = outputs(answer)
        np.testing.assert_array_equal(out["y"], 2 * x)
        assert len(set(out["n"].tolist())) == 1 and len(x) <= out["n"][0] <= 64  # whatever run served it
    assert model.stats.as_dict("counter", "1")["inference_stats"]["success"]["count"] == served + 48
    assert batcher_of(srv, "counter").waiting == 0


def test_a_bad_neighbour_gets_400_at_once_and_never_joins_the_batch(srv: ServerThread) -> None:
    good = [np.full((1, 4), i, np.float32) for i in range(4)]
    wrong_shape = x_body(np.zeros((1, 3), np.float32))
    bad_data = (b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":["a","b","c","d"]}]}', {})
    with ThreadPoolExecutor(8) as pool:
        lone_body = x_body(np.ones((1, 4), np.float32))
        with one_in_flight(srv, "counter", pool, lambda: post(srv, "counter", *lone_body)):
            futures = queue_up(srv, "counter", pool, [lambda x=x: post(srv, "counter", *x_body(x)) for x in good])
            bad = [post(srv, "counter", *wrong_shape), post(srv, "counter", *bad_data)]  # answered while held
            assert [r.status_code for r in bad] == [400, 400]
            assert "dimension 1 must be 4" in bad[0].json()["error"]
        for x, future in zip(good, futures, strict=True):
            out = outputs(future.result(timeout=30))
            np.testing.assert_array_equal(out["y"], 2 * x)
            assert out["n"].tolist() == [4]


def test_a_request_failing_inside_onnxruntime_fails_alone(srv: ServerThread) -> None:
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    indices = [[1], [99], [2, 3], [0]]
    batcher = batcher_of(srv, "gather")
    with ThreadPoolExecutor(8) as pool:
        lone_body = encode_request({"idx": np.array([5], np.int64)}, binary=False)[0]
        with one_in_flight(srv, "gather", pool, lambda: post(srv, "gather", lone_body, {})):
            sends = [
                lambda i=i: post(srv, "gather", encode_request({"idx": np.array(i, np.int64)}, binary=False)[0], {})
                for i in indices
            ]
            futures = queue_up(srv, "gather", pool, sends)
            assert len(batcher.queue) == 4  # all valid-looking: queued together
        answers = [f.result(timeout=30) for f in futures]
    assert [a.status_code for a in answers] == [200, 400, 200, 200]
    assert "could not run this input" in answers[1].json()["error"]
    for i, answer in zip(indices, answers, strict=True):
        if answer.status_code == 200:
            np.testing.assert_array_equal(outputs(answer)["y"], table[i])


def test_a_full_queue_answers_429_with_retry_after(srv: ServerThread) -> None:
    batcher = batcher_of(srv, "counter_q1")
    body = x_body(np.ones((1, 4), np.float32))
    with ThreadPoolExecutor(4) as pool:
        with one_in_flight(srv, "counter_q1", pool, lambda: post(srv, "counter_q1", *body)):
            (queued,) = queue_up(srv, "counter_q1", pool, [lambda: post(srv, "counter_q1", *body)])
            assert batcher.waiting == 1
            refused = post(srv, "counter_q1", *body)
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "1"
            assert "max_queue_size" in refused.json()["error"]
        assert queued.result(timeout=30).status_code == 200
    assert post(srv, "counter_q1", *body).status_code == 200  # room again


def test_the_full_app_answers_429_with_retry_after_too(batch_repo: Path) -> None:
    server = start_server(batch_repo, fastapi_only=True, inline_run_us=0)
    body = x_body(np.ones((1, 4), np.float32))
    try:
        with ThreadPoolExecutor(4) as pool:
            with one_in_flight(server, "counter_q1", pool, lambda: post(server, "counter_q1", *body)):
                (queued,) = queue_up(server, "counter_q1", pool, [lambda: post(server, "counter_q1", *body)])
                refused = post(server, "counter_q1", *body)
                assert (refused.status_code, refused.headers.get("retry-after")) == (429, "1")
            assert queued.result(timeout=30).status_code == 200
    finally:
        server.stop()


def test_a_disconnected_clients_request_is_never_run_nor_billed(srv: ServerThread, records_path: Path) -> None:
    model, batcher = model_of(srv, "counter"), batcher_of(srv, "counter")
    body, headers = x_body(np.ones((1, 4), np.float32))
    raw = (
        f"POST /v2/models/counter/infer HTTP/1.1\r\nHost: {srv.host}\r\nContent-Type: application/json\r\n"
        f"X-Request-Id: gone-1\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with ThreadPoolExecutor(2) as pool:
        with one_in_flight(srv, "counter", pool, lambda: post(srv, "counter", body, headers)):
            served = model.stats.inference_count
            conn = socket.create_connection(("127.0.0.1", srv.port))
            conn.sendall(raw)
            wait_until(lambda: batcher.waiting == 1, "the request is queued")
            conn.close()
            wait_until(lambda: batcher.waiting == 0, "the request is dropped")
        assert model.stats.inference_count == served + 1  # the request in flight, not the dropped one
    assert "gone-1" not in records(srv, records_path)


def test_a_request_whose_timeout_passed_is_dropped_before_it_runs(srv: ServerThread, records_path: Path) -> None:
    model = model_of(srv, "counter")
    body, headers = x_body(np.ones((1, 4), np.float32), parameters={"timeout": 1000})
    with ThreadPoolExecutor(2) as pool:
        plain = x_body(np.ones((1, 4), np.float32))
        with one_in_flight(srv, "counter", pool, lambda: post(srv, "counter", *plain)):
            served = model.stats.inference_count
            late = post(srv, "counter", body, {**headers, "x-request-id": "late-1"})  # answered while held
            assert late.status_code == 503
            assert "timeout of 1000 µs passed" in late.json()["error"]
            bad = post(srv, "counter", *x_body(np.ones((1, 4), np.float32), parameters={"timeout": "soon"}))
            assert bad.status_code == 400 and "'timeout'" in bad.json()["error"]
        assert model.stats.inference_count == served + 1
    assert "late-1" not in records(srv, records_path)


def test_metering_shares_of_a_batch_add_up_exactly(srv: ServerThread, records_path: Path) -> None:
    rows = [1, 2, 3, 1, 5]
    ids = [f"share-{i}" for i in range(len(rows))]
    with ThreadPoolExecutor(8) as pool:
        lone = x_body(np.ones((1, 4), np.float32))
        with one_in_flight(srv, "counter", pool, lambda: post(srv, "counter", *lone)):
            sends = [
                lambda n=n, rid=rid: post(srv, "counter", x_body(np.ones((n, 4), np.float32))[0], {"x-request-id": rid})
                for n, rid in zip(rows, ids, strict=True)
            ]
            futures = queue_up(srv, "counter", pool, sends)
        assert all(outputs(f.result(timeout=30))["n"].tolist()[0] == sum(rows) for f in futures)
    got = records(srv, records_path)
    parts = [round(got[rid]["compute_ms"] * 1000) for rid in ids]
    assert [got[rid]["items"] for rid in ids] == rows
    # each its rows' share of one batch compute, to the microsecond (the last in the run takes the remainder)
    total = sum(parts)
    floors = [total * r // sum(rows) for r in rows]
    extra = sorted(p - f for p, f in zip(parts, floors, strict=True))
    assert total > 0 and extra[:-1] == [0] * (len(rows) - 1) and extra[-1] == total - sum(floors)


def png(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_raw_image_requests_are_decoded_apart_and_batched(srv: ServerThread) -> None:
    colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (200, 200, 10)]
    image = {"content-type": "image/png"}
    alone = [post(srv, "tiny", png(c), image).json()["outputs"][0]["data"] for c in colours]  # idle: each alone
    batcher = batcher_of(srv, "tiny")
    runs, batched = batcher.runs, batcher.batched
    with ThreadPoolExecutor(8) as pool:
        with one_in_flight(srv, "tiny", pool, lambda: post(srv, "tiny", png((1, 2, 3)), image)):
            futures = queue_up(srv, "tiny", pool, [lambda c=c: post(srv, "tiny", png(c), image) for c in colours])
        together = [f.result(timeout=30).json()["outputs"][0]["data"] for f in futures]
    for one, other in zip(alone, together, strict=True):  # same classes; scores equal up to rounding
        ranked = [entry.split(":", 2) for entry in one]
        assert [e.split(":", 2)[1:] for e in other] == [r[1:] for r in ranked]
        assert [float(e.split(":", 2)[0]) for e in other] == pytest.approx([float(r[0]) for r in ranked], rel=1e-5)
    assert (batcher.runs, batcher.batched) == (runs + 1, batched + 4)


def test_models_without_dynamic_batching_or_a_batch_dimension_have_no_batcher(srv: ServerThread) -> None:
    assert batcher_for(model_of(srv, "counter_plain")) is None
    assert batcher_for(model_of(srv, "fixed")) is None  # declared, but its shape has no batch dimension
    client = httpclient.InferenceServerClient(srv.host)
    config = client.get_model_config("counter")
    assert config["dynamic_batching"] == {
        "max_queue_delay_microseconds": 10_000_000,
        "preferred_batch_size": [],
        "max_queue_size": 64,
    }
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    inp = httpclient.InferInput("x", [2, 4], "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    result = client.infer("counter", [inp], outputs=[httpclient.InferRequestedOutput("y", binary_data=True)])
    np.testing.assert_array_equal(result.as_numpy("y"), 2 * x)


def test_a_model_that_runs_inline_is_never_batched(batch_repo: Path) -> None:
    server = start_server(batch_repo, inline_run_us=10_000_000)  # every model here runs faster: all inline
    try:
        assert model_of(server, "counter").inline
        xs = [np.full((1, 4), i, np.float32) for i in range(32)]
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda x: post(server, "counter", *x_body(x)), xs))
        for x, answer in zip(xs, answers, strict=True):
            out = outputs(answer)
            np.testing.assert_array_equal(out["y"], 2 * x)
            assert out["n"].tolist() == [1]  # each ran alone, on the event loop
        assert batcher_of(server, "counter").runs == 0
    finally:
        server.stop()


def test_the_lambda_path_runs_each_request_alone(srv: ServerThread) -> None:
    batcher = batcher_of(srv, "counter")
    runs = batcher.runs
    body, headers = x_body(np.ones((2, 4), np.float32))
    reply = v2.infer(srv.runtime, "counter", None, body, headers)  # the V2 data plane Lambda answers from an event
    assert reply.status == 200
    assert decode_response(reply.body)["n"].tolist() == [2, 2]
    assert batcher.runs == runs
