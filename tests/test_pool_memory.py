"""The memory-budgeted pool: budgets from the platform, LRU unloads under mixed traffic, leases that keep a model
in use alive, idle unloads, reloads that load once and show as cold in the metering record."""

from __future__ import annotations

import functools
import json
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from time import perf_counter_ns
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from prometheus_client import CollectorRegistry, generate_latest

from engine import memory
from engine.config import Settings
from engine.errors import ConfigError
from engine.logs import find_event
from engine.metering.metrics import PoolCollector
from engine.pool import ModelPool, State
from engine.repository.local import LocalRepository
from engine.runtime import Runtime
from handler import v2
from tests.conftest import ServerThread, spawn_server, start_server
from tests.modelgen import _save, add_constant

MIB = 1 << 20
#: Each big model holds a 20 MiB initializer: large enough for a budget to mean something, quick to load.
BIG_MIB = 20
COLUMNS = 16
BIG = [f"big{i}" for i in range(5)]


def weights_model(value: float, mib: int = BIG_MIB) -> onnx.ModelProto:
    """y = W[i] for a [rows, 16] FP32 table W filled with ``value`` (``mib`` MiB): tiny requests, a large model."""
    rows = mib * MIB // (4 * COLUMNS)
    table = numpy_helper.from_array(np.full((rows, COLUMNS), value, dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["W", "i"], ["y"])],
        "weights",
        [helper.make_tensor_value_info("i", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", COLUMNS])],
        [table],
    )
    return helper.make_model(graph)


def value_of(name: str) -> float:
    """What every output of a big model is: big0 -> 1.0, big1 -> 2.0, ..."""
    return float(BIG.index(name) + 1)


@pytest.fixture(scope="module")
def big_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five 20 MiB models and ``keep``, a tiny one (the required model, never unloaded)."""
    repo = tmp_path_factory.mktemp("big")
    for name in BIG:
        _save(weights_model(value_of(name)), repo, name)
    _save(add_constant(1.0), repo, "keep")
    return repo


@pytest.fixture(scope="module")
def sizes(big_repo: Path) -> dict[str, int]:
    """The memory ``keep`` and a big model hold, as this process measures them (after a first load, which also
    starts onnxruntime's own parts)."""
    settings = Settings.from_env({}, memory_budget_mb=0)
    first = ModelPool(LocalRepository(big_repo), settings)
    first.load("keep")
    first.close()
    pool = ModelPool(LocalRepository(big_repo), settings)
    try:
        return {name: pool.load(name).versions[1].memory_bytes for name in ("keep", "big0")}
    finally:
        pool.close()


def budget_mb(sizes: dict[str, int], big_models: float) -> int:
    """A budget holding ``keep`` and ``big_models`` big models."""
    return int((sizes["keep"] + big_models * sizes["big0"]) // MIB) + 1


def infer_body(rows: int = 2) -> dict[str, Any]:
    return {"inputs": [{"name": "i", "datatype": "INT64", "shape": [rows], "data": list(range(rows))}]}


def check_output(response: httpx.Response, name: str) -> None:
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][0]
    assert out["shape"] == [2, COLUMNS] and set(out["data"]) == {value_of(name)}


def wait_for(what: Callable[[], bool], timeout: float = 60.0) -> None:
    """Wait until ``what()`` holds (a state of the pool, not a duration)."""
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def in_background(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``call`` in a thread; its result (or exception) lands in the list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(call())
        except Exception as exc:  # noqa: BLE001 - handed to the test
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


@pytest.fixture()
def served(big_repo: Path, sizes: dict[str, int], request: pytest.FixtureRequest) -> Iterator[ServerThread]:
    """A server over the big repository; ``keep`` required; the budget and settings from the test's marker."""
    overrides: dict[str, Any] = {"required_models": ("keep",), **request.param}
    overrides["memory_budget_mb"] = budget_mb(sizes, overrides.pop("big_models"))
    srv = start_server(big_repo, **overrides)
    try:
        srv.runtime.wait_preloaded()
        yield srv
    finally:
        srv.stop()


# -- budgets -----------------------------------------------------------------------------------------


def test_the_budget_comes_from_the_setting_lambda_or_the_cgroup(tmp_path: Path) -> None:
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    paths = {"cgroup_v2": str(v2), "cgroup_v1": str(v1)}
    default = Settings.from_env({})
    assert memory.model_budget(default, {}, **paths) is None  # no file, no Lambda: no budget

    v1.write_text("9223372036854771712\n")  # cgroup v1 without a limit
    assert memory.model_budget(default, {}, **paths) is None
    v2.write_text("max\n")
    assert memory.model_budget(default, {}, **paths) is None
    v2.write_text(f"{2048 * MIB}\n")
    budget = memory.model_budget(default, {}, **paths)
    assert budget is not None and budget.source == str(v2) and budget.limit_bytes == 2048 * MIB
    assert budget.bytes == 2048 * MIB - memory.headroom(2048 * MIB) == 1536 * MIB
    v2.write_text("max\n")
    v1.write_text(f"{512 * MIB}\n")
    budget = memory.model_budget(default, {}, **paths)
    assert budget is not None and budget.source == str(v1) and budget.bytes == 384 * MIB  # 128 MiB headroom

    lambda_env = {"AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "1024"}
    budget = memory.model_budget(default, lambda_env, **paths)  # Lambda's setting before the cgroup's
    assert budget is not None and budget.source == "AWS_LAMBDA_FUNCTION_MEMORY_SIZE" and budget.bytes == 768 * MIB
    small = memory.model_budget(default, {"AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "128"}, **paths)
    assert small is not None and small.bytes == 32 * MIB  # below the headroom's floor: a quarter of the limit

    explicit = memory.model_budget(Settings.from_env({"OCLAW_MEMORY_BUDGET_MB": "300"}), lambda_env, **paths)
    assert explicit is not None and explicit.bytes == 300 * MIB and explicit.source == "OCLAW_MEMORY_BUDGET_MB"
    assert memory.model_budget(Settings.from_env({"OCLAW_MEMORY_BUDGET_MB": "0"}), lambda_env, **paths) is None
    with pytest.raises(ConfigError, match="OCLAW_MEMORY_BUDGET_MB=-5"):
        Settings.from_env({"OCLAW_MEMORY_BUDGET_MB": "-5"})
    with pytest.raises(ConfigError, match="OCLAW_IDLE_UNLOAD_S=-1"):
        Settings.from_env({"OCLAW_IDLE_UNLOAD_S": "-1"})


def test_a_pool_on_lambda_takes_its_budget_from_the_function_memory(
    big_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "2048")
    pool = ModelPool(LocalRepository(big_repo), Settings.from_env({}))
    figures = pool.memory()
    assert figures["budget_bytes"] == 1536 * MIB and figures["budget_source"] == "AWS_LAMBDA_FUNCTION_MEMORY_SIZE"
    assert figures["used_bytes"] == 0 and figures["rss_bytes"] > 0


# -- the pool in process -----------------------------------------------------------------------------


def test_loads_measure_memory_and_unload_the_least_recently_used(big_repo: Path, sizes: dict[str, int]) -> None:
    settings = Settings.from_env({}, memory_budget_mb=budget_mb(sizes, 2.5), required_models=("keep",))
    pool = ModelPool(LocalRepository(big_repo), settings)
    try:
        for name in ("keep", "big0", "big1"):
            pool.load(name)
        states = pool.states()
        assert all(states[n]["memory_bytes"] >= (BIG_MIB * MIB if n != "keep" else 1) for n in states)
        assert pool.loaded()[1].load_record()["memory_bytes"] == states["big0"]["memory_bytes"]
        with pool.lease("big0") as lease:  # big0 used after big1: big1 is now the least recently used
            assert not lease.loaded
        pool.load("big2")
        states = pool.states()
        assert states["big1"]["state"] == State.UNAVAILABLE and states["big1"]["evicted"] == "memory"
        assert "OCLAW_MEMORY_BUDGET_MB" in states["big1"]["reason"] and states["big1"]["evictions"] == 1
        assert states["big0"]["state"] == states["big2"]["state"] == states["keep"]["state"] == State.READY
        figures = pool.memory()
        assert figures["evictions"] == {"memory": 1, "idle": 0} and figures["peak_bytes"] <= figures["budget_bytes"]

        registry = CollectorRegistry()  # the pool's collector, as /metrics registers it
        registry.register(PoolCollector(pool))
        text = generate_latest(registry).decode()
        assert 'oclaw_model_evictions_total{reason="memory"} 1.0' in text
        assert 'oclaw_model_loads_total{model="big2"} 1.0' in text
        values = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
        assert float(values["oclaw_models_memory_budget_bytes"]) == figures["budget_bytes"]

        with pool.lease("big1") as lease:  # an unloaded model is loaded again for the next request
            assert lease.loaded and lease.model.name == "big1"
        assert pool.states()["big1"]["loads"] == 2 and pool.states()["big0"]["evicted"] == "memory"
    finally:
        pool.close()


def test_the_idle_timer_spares_a_model_in_use_and_the_required_ones(tmp_path: Path) -> None:
    for name, value in (("keep", 1.0), ("held", 2.0), ("free", 3.0)):
        _save(add_constant(value), tmp_path, name)
    settings = Settings.from_env({}, idle_unload_s=0.05, required_models=("keep",), memory_budget_mb=0)
    pool = ModelPool(LocalRepository(tmp_path), settings)
    try:
        for name in ("keep", "held", "free"):
            pool.load(name)
        with pool.lease("held"):
            # "held" was due first (loaded before "free"), but it is in use
            wait_for(lambda: pool.states()["free"]["state"] == State.UNAVAILABLE)
            assert pool.states()["held"]["state"] == State.READY
        wait_for(lambda: pool.states()["held"].get("evicted") == "idle")  # once released
        assert pool.states()["keep"]["state"] == State.READY and pool.memory()["evictions"]["idle"] == 2
        with pool.lease("free") as lease:
            assert lease.loaded and lease.model.name == "free"
    finally:
        pool.close()


def test_a_model_alone_over_the_budget_loads_with_a_warning(big_repo: Path) -> None:
    pool = ModelPool(LocalRepository(big_repo), Settings.from_env({}, memory_budget_mb=BIG_MIB // 2))
    try:
        pool.load("big3")
        state = pool.states()["big3"]
        assert state["state"] == State.READY and state["over_budget"] is True
        assert pool.memory()["used_bytes"] > pool.memory()["budget_bytes"]
        with pool.lease("big3") as lease:
            assert lease.model.name == "big3"
    finally:
        pool.close()


def test_the_lambda_path_holds_its_model_and_meters_a_reload_as_cold(big_repo: Path, sizes: dict[str, int]) -> None:
    settings = Settings.from_env(
        {},
        model_repository=str(big_repo),
        preload=("keep", "big0", "big1"),
        required_models=("keep",),
        memory_budget_mb=budget_mb(sizes, 1.5),
    )
    runtime = Runtime(settings)
    body = json.dumps({**infer_body(), "parameters": {"metering": True}}).encode()

    def call(name: str) -> tuple[v2.Recorder, dict[str, Any]]:
        record = v2.Recorder(
            runtime, request_id=name, tenant="t", bytes_in=len(body), source="lambda-http", enqueue_ns=perf_counter_ns()
        )
        reply = v2.infer(runtime, name, None, body, {"content-type": "application/json"}, record=record)
        assert reply.status == 200
        return record, json.loads(reply.body)

    try:
        runtime.preload()
        assert runtime.pool.states()["big0"]["evicted"] == "memory"  # big1 took its room
        runtime.cold = False  # past the process's first request, which is cold anyway
        record, out = call("big0")
        assert record.lease is not None and record.lease.loaded and out["parameters"]["metering"]["cold"] is True
        assert out["outputs"][0]["data"][0] == value_of("big0")
        assert runtime.pool.states()["big0"]["in_use"] == 0  # released when the call returned
        assert runtime.pool.states()["big1"]["evicted"] == "memory"
        _, again = call("big0")
        assert again["parameters"]["metering"]["cold"] is False
    finally:
        runtime.close()


# -- servers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("served", [{"big_models": 2.5}], indirect=True)
def test_five_models_in_a_budget_for_two_serve_mixed_concurrent_traffic(served: ServerThread) -> None:
    pool = served.runtime.pool
    budget = pool.memory()["budget_bytes"]
    loaded_sizes: list[int] = []
    accounted: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            states = pool.states().values()
            loaded_sizes.append(sum(s["memory_bytes"] for s in states if s["state"] == State.READY))
            accounted.append(pool.memory()["used_bytes"])
            stop.wait(0.005)

    def traffic(seed: int) -> list[tuple[str, httpx.Response]]:
        rng = random.Random(seed)
        with httpx.Client(base_url=served.url, timeout=60) as c:
            names = [rng.choice(BIG) for _ in range(30)]
            return [(name, c.post(f"/v2/models/{name}/infer", json=infer_body())) for name in names]

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    clients = [in_background(functools.partial(traffic, seed)) for seed in range(4)]
    for thread, _ in clients:
        thread.join(timeout=300)
    stop.set()
    watcher.join()
    results = [pair for _, out in clients for pair in out[0]]
    assert len(results) == 120
    for name, response in results:
        check_output(response, name)
    figures = pool.memory()
    assert figures["evictions"]["memory"] > 0 and figures["draining"] == []
    assert figures["peak_bytes"] <= budget and max(accounted) <= budget and max(loaded_sizes) <= budget
    states = pool.states()
    assert states["keep"]["state"] == State.READY and states["keep"]["evictions"] == 0
    assert sum(states[n]["evictions"] for n in BIG) == figures["evictions"]["memory"]
    assert not any(s.get("over_budget") for s in states.values())


@pytest.mark.parametrize("served", [{"big_models": 1.5, "inline_run_us": 0, "drain_timeout_s": 120.0}], indirect=True)
def test_a_model_unloaded_while_in_use_finishes_its_request_and_is_freed_after(served: ServerThread) -> None:
    pool, url = served.runtime.pool, served.url
    check_output(httpx.post(f"{url}/v2/models/big0/infer", json=infer_body(), timeout=60), "big0")
    held = weakref.ref(pool.get_nowait("big0"))
    gate, busy = threading.Event(), threading.Event()
    # big0's one worker thread (OCLAW_MODEL_CONCURRENCY=1) waits for the gate: a request for it stays in flight

    def hold() -> None:
        busy.set()
        gate.wait(120)

    pool.get_nowait("big0").executor.submit(hold)
    busy.wait(60)
    first, first_out = in_background(lambda: httpx.post(f"{url}/v2/models/big0/infer", json=infer_body(), timeout=120))
    wait_for(lambda: pool.states()["big0"]["in_use"] == 1)

    # big1 needs big0's room: big0 is unloaded at once (no new request gets it) but freed only when it is released
    second, second_out = in_background(
        lambda: httpx.post(f"{url}/v2/models/big1/infer", json=infer_body(), timeout=120)
    )
    wait_for(lambda: pool.memory()["draining"] == ["big0"])
    assert pool.states()["big0"]["evicted"] == "memory" and held() is not None
    assert first.is_alive() and second.is_alive()  # big1 waits for big0's memory

    gate.set()
    first.join(60)
    second.join(60)
    check_output(first_out[0], "big0")
    check_output(second_out[0], "big1")
    assert pool.memory()["draining"] == [] and pool.memory()["peak_bytes"] <= pool.memory()["budget_bytes"]
    wait_for(lambda: held() is None)  # the session went with the last reference


@pytest.mark.parametrize("served", [{"big_models": 1.5}], indirect=True)
def test_concurrent_requests_for_an_unloaded_model_load_it_once(served: ServerThread) -> None:
    pool = served.runtime.pool
    evicted = [n for n, s in pool.states().items() if s.get("evicted")]
    name = evicted[0]  # preloading five big models in a budget for one unloaded four of them
    loads = pool.states()[name]["loads"]
    barrier = threading.Barrier(8)

    def ask() -> httpx.Response:
        barrier.wait(60)
        return httpx.post(
            f"{served.url}/v2/models/{name}/infer", json={**infer_body(), "parameters": {"metering": True}}, timeout=60
        )

    requests = [in_background(ask) for _ in range(8)]
    for thread, _ in requests:
        thread.join(120)
    responses = [out[0] for _, out in requests]
    for response in responses:
        check_output(response, name)
    assert pool.states()[name]["loads"] == loads + 1
    colds = [r.json()["parameters"]["metering"]["cold"] for r in responses]
    assert any(colds)  # at least the request that loaded it; each one that waited for the load is cold too


def test_an_idle_model_is_unloaded_then_loaded_again_by_a_cold_request(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _save(add_constant(1.0), repo, "keep")
    _save(add_constant(2.0), repo, "idle")
    env = {"OCLAW_IDLE_UNLOAD_S": "0.3", "OCLAW_REQUIRED_MODELS": "keep", "OCLAW_MEMORY_BUDGET_MB": "512"}
    server = spawn_server(repo, tmp_path, env=env)
    body = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}],
        "parameters": {"metering": True},
    }
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=60) as c:

            def cold(name: str) -> bool:
                response = c.post(f"/v2/models/{name}/infer", json=body)
                assert response.status_code == 200, response.text
                return bool(response.json()["parameters"]["metering"]["cold"])

            def state(name: str) -> dict[str, Any]:
                return next(row for row in c.post("/v2/repository/index").json() if row["name"] == name)

            assert cold("keep")  # the process's first request
            wait_for(lambda: "OCLAW_IDLE_UNLOAD_S" in state("idle")["reason"])
            assert state("idle")["state"] == "UNAVAILABLE" and state("keep")["state"] == "READY"
            assert cold("idle")  # loaded again for this request, which paid for it
            assert not cold("keep")  # a required model is never unloaded
    finally:
        server.terminate()
    preloaded = find_event(server.output(), "preload_done")
    assert preloaded is not None and preloaded["memory"]["budget_bytes"] == 512 * MIB
    assert preloaded["memory"]["budget_source"] == "OCLAW_MEMORY_BUDGET_MB" and preloaded["memory"]["used_bytes"] > 0
    evicted = find_event(server.output(), "model_evicted")
    assert evicted is not None and evicted["model"] == "idle" and evicted["reason"] == "idle"
    assert evicted["memory_bytes"] > 0 and evicted["idle_s"] >= 0.3
    reloads = [line for line in server.output().splitlines() if '"model_loaded"' in line and '"idle"' in line]
    assert len(reloads) == 2  # preloaded, then loaded again by the request
