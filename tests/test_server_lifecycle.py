"""`oclaw serve` as a process: PORT, the port bound first, the cold-start record, readiness, SIGTERM draining."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn

from engine.config import Settings
from engine.logs import find_event
from engine.runtime import Runtime
from engine.tensors import decode_response, encode_request
from handler.asgi import ServerApp
from handler.server import bind
from tests.conftest import free_port, spawn_server
from tests.modelgen import _save, add_constant, slow


@pytest.fixture(scope="module")
def slow_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("slow-repo")
    _save(slow(), repo, "slow")
    _save(add_constant(1.0), repo, "plus_one")
    return repo


def cold_start_record(output: str) -> dict[str, object]:
    record = find_event(output, "cold_start")
    assert record is not None, f"no cold_start record in:\n{output}"
    return record


@pytest.mark.slow
def test_port_env_is_honoured_and_cold_start_is_reported(slow_repo: Path, tmp_path: Path) -> None:
    port = free_port()
    srv = spawn_server(slow_repo, tmp_path, args=[], env={"PORT": str(port)}, port=port)
    try:
        srv.wait_ready()
        assert httpx.get(f"{srv.url}/v2/health/ready").status_code == 200
        body, length = encode_request({"x": np.ones((2, 4), dtype=np.float32)})
        resp = httpx.post(
            f"{srv.url}/v2/models/plus_one/infer",
            content=body,
            headers={"Inference-Header-Content-Length": str(length)},
        )
        assert resp.status_code == 200, resp.text
        header = resp.headers.get("inference-header-content-length")
        out = decode_response(resp.content, int(header) if header else None)
        np.testing.assert_array_equal(out["y"], np.full((2, 4), 2.0, dtype=np.float32))
        stats = httpx.get(f"{srv.url}/v2/models/plus_one/stats")  # imports FastAPI on first use
        assert stats.status_code == 200 and stats.json()["model_stats"][0]["inference_count"] == 2
    finally:
        assert srv.terminate() == 0
    assert "model slow/1 sha256 " in srv.output()  # recorded in the background after ready
    record = cold_start_record(srv.output())
    assert record["ready"] is True
    assert record["fastapi_loaded"] is False
    models = record["models"]
    assert isinstance(models, dict) and set(models) == {"slow/1", "plus_one/1"}
    assert all(m["session_ms"] > 0 and m["warmup_ms"] > 0 for m in models.values())
    assert isinstance(record["total_ms"], float) and record["total_ms"] > 0
    assert isinstance(record["instance_id"], str) and len(record["instance_id"]) == 16
    # OCLAW_LOG_FORMAT=json (the default): every line the process wrote is one JSON object, uvicorn's own included
    docs = [json.loads(line) for line in srv.output().splitlines() if line.strip()]
    assert all(isinstance(doc, dict) for doc in docs)
    assert any(doc.get("logger", "").startswith("uvicorn") and "server process" in doc["message"] for doc in docs)


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests(slow_repo: Path, tmp_path: Path) -> None:
    srv = spawn_server(slow_repo, tmp_path)
    srv.wait_ready()
    x = np.random.default_rng(0).standard_normal((768, 768)).astype(np.float32)
    body, length = encode_request({"x": x})
    results: list[httpx.Response] = []

    def call() -> None:
        with httpx.Client(timeout=60) as c:
            results.append(
                c.post(
                    f"{srv.url}/v2/models/slow/infer",
                    content=body,
                    headers={"Inference-Header-Content-Length": str(length)},
                )
            )

    callers = [threading.Thread(target=call) for _ in range(3)]
    for t in callers:
        t.start()
    # wait until the server is running the first request, then ask it to stop
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = httpx.get(f"{srv.url}/v2/models/slow/stats").json()["model_stats"][0]
        if stats["inference_stats"]["success"]["count"] >= 1 or len(results) > 0:
            break
        time.sleep(0.01)
    started = time.monotonic()
    rc = srv.terminate()
    for t in callers:
        t.join(timeout=60)
    assert rc == 0
    assert len(results) == 3
    assert [r.status_code for r in results] == [200, 200, 200]
    assert time.monotonic() - started < 30
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{srv.url}/v2/health/live", timeout=2)


def test_missing_repository_is_a_clear_error(tmp_path: Path) -> None:
    srv = spawn_server(tmp_path / "nowhere", tmp_path)
    assert srv.proc.wait(timeout=30) == 2
    assert "is not a directory" in srv.output()


def test_bad_setting_is_a_clear_error(slow_repo: Path, tmp_path: Path) -> None:
    srv = spawn_server(slow_repo, tmp_path, env={"OCLAW_PROVIDERS": "warp-drive"})
    assert srv.proc.wait(timeout=30) == 2
    assert "OCLAW_PROVIDERS" in srv.output()


def test_a_port_in_use_fails_at_once_before_any_model_loads(slow_repo: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = spawn_server(slow_repo, tmp_path, port=port)
        assert srv.proc.wait(timeout=60) == 3
    output = srv.output()
    assert f"oclaw: cannot listen on 127.0.0.1:{port}: Address already in use" in output
    assert find_event(output, "cold_start") is None and "ready: versions" not in output  # no model was loaded


def test_the_bound_port_refuses_connections_until_the_models_are_warm(slow_repo: Path) -> None:
    runtime = Runtime(Settings.from_env({}, model_repository=str(slow_repo)))
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(ServerApp(runtime, lambda: None), log_level="warning"))
    with runtime._preload_lock:  # the preload cannot finish while this is held: the server is still starting
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while runtime._preload_thread is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the lifespan has started the preload and waits for it
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        assert not server.started
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        runtime.close()


def test_serving_an_empty_repository_warns_with_its_path(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    srv = spawn_server(empty, tmp_path)
    try:
        srv.wait_ready()
    finally:
        assert srv.terminate() == 0
    assert f"model repository {empty} holds no models" in srv.output()
