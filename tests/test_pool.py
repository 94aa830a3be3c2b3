"""Repository, manifest and pool behaviour: states, readiness, failures, load/unload over the API."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from engine.config import Settings
from engine.errors import ConfigError, InvalidInput, ModelLoadError, ModelNotFound, ModelNotReady
from engine.pool import ModelPool, State
from engine.repository.local import LocalRepository, parse_version, sha256_file, validate_name
from engine.repository.manifest import load_manifest
from engine.session import resolve_providers
from tests.conftest import ServerThread, start_server
from tests.modelgen import _save, add_constant, mlp
from tests.realmodels import unwarmable


@pytest.fixture()
def mixed_repo(tmp_path: Path) -> Path:
    """Two good models and one whose file is not ONNX."""
    _save(add_constant(1.0), tmp_path, "good")
    _save(mlp(), tmp_path, "mlp")
    broken = tmp_path / "broken" / "1" / "model.onnx"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"this is not an onnx file")
    return tmp_path


@pytest.mark.parametrize("name", ["a", "resnet-50", "m_1.v2", "A" * 128])
def test_valid_model_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "..", "a/../b", "a/b", ".hidden", "-x", "A" * 129, "x y", "é", "a..b"])
def test_invalid_model_names_are_rejected(name: str) -> None:
    with pytest.raises(InvalidInput, match="invalid model name"):
        validate_name(name)


@pytest.mark.parametrize("version", ["²", "\u0661", "9" * 5000, "0", "1.0", "+1"])
def test_invalid_model_versions_are_rejected(version: str) -> None:
    """ASCII digits only, and not thousands of them ("²".isdigit() holds but int() refuses it: a 500 before)."""
    with pytest.raises(InvalidInput, match="invalid model version"):
        parse_version(version)
    assert parse_version("12") == 12


def test_repository_lists_versions_and_hashes(tmp_path: Path) -> None:
    _save(add_constant(1.0), tmp_path, "m", 1)
    _save(add_constant(2.0), tmp_path, "m", 10)
    (tmp_path / "m" / "notaversion").mkdir()
    (tmp_path / "empty").mkdir()
    repo = LocalRepository(tmp_path)
    assert repo.models() == ["m"]
    assert repo.versions("m") == [1, 10]
    with pytest.raises(ModelNotFound):
        repo.versions("empty")
    with pytest.raises(ModelNotFound):
        repo.files("m", 3)
    import hashlib

    path = tmp_path / "m" / "10" / "model.onnx"
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_errors_name_the_file(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "oclaw.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"oclaw\.json"):
        load_manifest(model_dir)
    (model_dir / "oclaw.json").write_text(json.dumps({"preprocess": {"layout": "CHWN"}}))
    with pytest.raises(ConfigError, match="layout"):
        load_manifest(model_dir)
    (model_dir / "oclaw.json").write_text(json.dumps({"labels": "../../etc/passwd"}))
    with pytest.raises(ConfigError, match="inside the model directory"):
        load_manifest(model_dir)


def test_a_failed_model_does_not_stop_the_others(mixed_repo: Path) -> None:
    pool = ModelPool(LocalRepository(mixed_repo), Settings.from_env({}))
    pool.preload()
    states = pool.states()
    assert states["good"]["state"] == "READY" and states["mlp"]["state"] == "READY"
    assert states["broken"]["state"] == "UNAVAILABLE" and states["broken"]["reason"]
    assert not pool.ready()  # every preloaded model is required by default
    with pytest.raises(ModelNotReady, match="broken"):
        pool.get("broken")
    assert pool.get("good").version == 1


def test_required_models_decide_readiness(mixed_repo: Path) -> None:
    pool = ModelPool(LocalRepository(mixed_repo), Settings.from_env({"OCLAW_REQUIRED_MODELS": "good,mlp"}))
    pool.preload()
    assert pool.ready()


def test_checksum_mismatch_fails_the_load(tmp_path: Path) -> None:
    _save(add_constant(1.0), tmp_path, "m", 1, {"checksums": {"1": "0" * 64}})
    pool = ModelPool(LocalRepository(tmp_path), Settings.from_env({}))
    with pytest.raises(ModelLoadError, match="does not match"):
        pool.load("m")
    assert pool.states()["m"]["state"] == State.UNAVAILABLE


def test_warm_up_marks_cheap_models_inline(tmp_path: Path) -> None:
    _save(add_constant(1.0), tmp_path, "m")
    pool = ModelPool(LocalRepository(tmp_path), Settings.from_env({}))
    model = pool.load("m").versions[1]
    assert model.warm_ns is not None and model.inline
    never = ModelPool(LocalRepository(tmp_path), Settings.from_env({"OCLAW_INLINE_RUN_US": "0"}))
    assert not never.load("m").versions[1].inline


def test_unavailable_accelerators_fall_back_to_cpu(caplog: pytest.LogCaptureFixture) -> None:
    chosen = resolve_providers(("cuda", "openvino", "cpu"), available=["CPUExecutionProvider"])
    assert chosen == ["CPUExecutionProvider"]
    assert "cuda" in caplog.text and "falling back to CPU" in caplog.text
    assert resolve_providers(("cuda",), available=["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]


def test_settings_read_the_environment_once() -> None:
    s = Settings.from_env(
        {"OCLAW_PRELOAD": "a, b", "OCLAW_WARMUP": "false", "OCLAW_MAX_BODY_BYTES": "10", "OCLAW_FUTURE": "x"}
    )
    assert s.preload == ("a", "b") and not s.preload_all
    assert s.warmup == "false" and not s.warms_at_load(None) and s.max_body_bytes == 10
    assert s.extra == {"OCLAW_FUTURE": "x"}
    assert s.threads >= 1
    with pytest.raises(ConfigError, match="OCLAW_MAX_BODY_BYTES"):
        Settings.from_env({"OCLAW_MAX_BODY_BYTES": "lots"})
    with pytest.raises(ConfigError, match="OCLAW_GRAPH_OPTIMIZATION"):
        Settings.from_env({"OCLAW_GRAPH_OPTIMIZATION": "max"})


@pytest.fixture()
def partial_server(mixed_repo: Path) -> Iterator[ServerThread]:
    srv = start_server(mixed_repo, preload=("good", "broken"))
    yield srv
    srv.stop()


def test_readiness_index_load_and_unload_over_http(partial_server: ServerThread) -> None:
    with httpx.Client(base_url=partial_server.url) as c:
        assert c.get("/v2/health/live").status_code == 200
        ready = c.get("/v2/health/ready")
        assert ready.status_code == 503 and ready.json() == {"ready": False}
        index = {row["name"]: row for row in c.post("/v2/repository/index").json()}
        assert index["good"]["state"] == "READY" and index["good"]["version"] == "1"
        assert index["broken"]["state"] == "UNAVAILABLE" and index["broken"]["reason"]
        assert index["mlp"]["state"] == ""  # on disk, not preloaded
        assert [r["name"] for r in c.post("/v2/repository/index", json={"ready": True}).json()] == ["good"]

        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]}
        not_loaded = c.post("/v2/models/mlp/infer", json=body)
        assert not_loaded.status_code == 503 and "not loaded" in not_loaded.json()["error"]
        assert c.post("/v2/repository/models/mlp/load").status_code == 200
        assert c.get("/v2/models/mlp/ready").status_code == 200
        assert c.post("/v2/models/mlp/infer", json=body).status_code == 200

        failed = c.post("/v2/repository/models/broken/load")
        assert failed.status_code == 400 and "broken" in failed.json()["error"]
        assert c.post("/v2/repository/models/nope/load").status_code == 404
        assert c.post("/v2/models/nope/infer", json=body).status_code == 404  # the failed load left nothing behind
        assert "nope" not in {r["name"] for r in c.post("/v2/repository/index").json()}

        assert c.post("/v2/repository/models/mlp/unload").status_code == 200
        gone = c.post("/v2/models/mlp/infer", json=body)
        assert gone.status_code == 503 and "unloaded" in gone.json()["error"]
        assert c.get("/v2/models/mlp/ready").status_code == 503
        assert c.post("/v2/repository/models/mlp/load").status_code == 200
        x = np.full((1, 64), 0.5, dtype=np.float32)
        again = c.post("/v2/models/mlp/infer", json=body).json()["outputs"][0]
        assert again["shape"] == [1, 10] and np.isfinite(np.asarray(again["data"])).all() and x.size == 64


@pytest.mark.parametrize(
    ("content", "expected"), [("200000 100000\n", 2.0), ("150000 100000", 1.5), ("max 100000", None), ("garbage", None)]
)
def test_cgroup_cpu_quota_is_read(tmp_path: Path, content: str, expected: float | None) -> None:
    from engine.config import cgroup_cpu_limit

    path = tmp_path / "cpu.max"
    path.write_text(content)
    assert cgroup_cpu_limit(str(path)) == expected
    assert cgroup_cpu_limit(str(tmp_path / "missing")) is None


def test_a_cheap_model_misjudged_at_warm_up_moves_to_the_event_loop(tmp_path: Path) -> None:
    """A warm-up timed on a busy machine must not send every later request through a thread hop.

    The threshold is set far above any run time (an hour), so the 100 offloaded runs count as fast however busy
    the machine is: the test checks the mechanism, not the machine's speed."""
    import threading

    import httpx

    from tests.conftest import start_server

    _save(add_constant(1.0), tmp_path, "m")
    srv = start_server(tmp_path, inline_run_us=3_600_000_000)
    try:
        model = srv.runtime.pool.get("m", None)
        model.inline = False  # as if the warm-up run had been slow
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1.0] * 4}]}
        threads: set[str] = set()
        run = model.run_plan

        def spy(*args: object, **kwargs: object) -> object:
            threads.add(threading.current_thread().name)
            return run(*args, **kwargs)  # type: ignore[arg-type]

        model.run_plan = spy  # type: ignore[method-assign]
        with httpx.Client(base_url=srv.url) as client:
            assert client.post("/v2/models/m/infer", json=body).status_code == 200
            assert srv.thread.name not in threads  # on a worker thread
            for _ in range(model.INLINE_AFTER):
                assert client.post("/v2/models/m/infer", json=body).status_code == 200
        assert model.inline
        threads.clear()
        with httpx.Client(base_url=srv.url) as client:
            assert client.post("/v2/models/m/infer", json=body).status_code == 200
        assert threads == {srv.thread.name}  # the server's event-loop thread, no worker
    finally:
        srv.stop()


def test_a_misspelt_manifest_key_is_an_error_that_names_the_close_match(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    for raw, wrong, meant in [
        ({"max_batch_sise": 8}, "max_batch_sise", "max_batch_size"),
        ({"Labels": ["a"]}, "Labels", "labels"),
        ({"preprocess": {"kind": "image", "sise": [8, 8]}}, "preprocess.sise", "preprocess.size"),
        ({"postprocess": {"top-k": 3}}, "postprocess.top-k", "postprocess.top_k"),
        ({"inputs": [{"name": "x", "shap": [1]}]}, "inputs[0].shap", "inputs[0].shape"),
        ({"warmup": {"inputs": {"x": {"shape": [77], "fil": "ones"}}}}, "warmup.inputs.x.fil", "warmup.inputs.x.fill"),
    ]:
        (model_dir / "oclaw.json").write_text(json.dumps(raw))
        with pytest.raises(ConfigError) as info:
            load_manifest(model_dir)
        assert str(model_dir / "oclaw.json") in info.value.message
        assert f"unknown key {wrong!r}; did you mean {meant!r}?" in info.value.message


def test_an_unknown_manifest_key_is_a_warning_naming_the_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _save(add_constant(1.0), tmp_path, "m", 1, {"description": "adds one", "max_batch_size": 4})
    pool = ModelPool(LocalRepository(tmp_path), Settings.from_env({}))
    assert pool.load("m").versions[1].manifest.max_batch_size == 4
    warnings = [r for r in caplog.records if r.name == "oclaw.manifest"]
    assert len(warnings) == 1  # once, however often the manifest is read
    assert str(tmp_path / "m" / "oclaw.json") in warnings[0].getMessage()
    assert "unknown key 'description' ignored" in warnings[0].getMessage()


def test_a_model_whose_warm_up_fails_serves_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _save(unwarmable(), tmp_path, "m")
    pool = ModelPool(LocalRepository(tmp_path), Settings.from_env({}))
    model = pool.load("m").versions[1]
    assert pool.states()["m"]["state"] == State.READY and pool.ready()
    assert model.warm_feed is None and model.warm_ns is None and not model.inline
    assert model.warmup_error is not None and "Reshape" in model.warmup_error and "oclaw.json" in model.warmup_error
    assert pool.states()["m"]["warmup_errors"] == {"1": model.warmup_error}
    assert model.load_record()["warmup_error"] == model.warmup_error
    warning = next(r for r in caplog.records if getattr(r, "oclaw", {}).get("event") == "warmup_failed")
    assert warning.levelname == "WARNING" and "m/1" in warning.getMessage()
    assert model.ping() == 0.0  # no input to ping with; nothing is run, nothing raised
    srv = start_server(tmp_path)
    try:
        with httpx.Client(base_url=srv.url) as c:
            assert c.get("/v2/health/ready").status_code == 200
            assert c.get("/v2/models/m/ready").status_code == 200
            assert c.post("/v2/repository/index").json() == [
                {"name": "m", "version": "1", "state": "READY", "reason": ""}
            ]
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [77], "data": list(range(77))}]}
            out = c.post("/v2/models/m/infer", json=body)
            assert out.status_code == 200 and out.json()["outputs"][0]["shape"] == [7, 11]
            assert c.post("/v2/warm").json()["warm_ms"] == {"m/1": 0.0}
    finally:
        srv.stop()


def test_declared_warm_up_inputs_warm_the_model(tmp_path: Path) -> None:
    """oclaw.json "warmup": inputs given by shape and values or fill, or a .npz sample beside the model."""
    pool = ModelPool(LocalRepository(tmp_path), Settings.from_env({}))
    _save(unwarmable(), tmp_path, "m", 1, {"warmup": {"inputs": {"x": {"shape": [77], "data": list(range(77))}}}})
    model = pool.load("m").versions[1]
    assert model.warmup_error is None and model.warm_ns is not None and model.warm_feed is not None
    np.testing.assert_array_equal(model.warm_feed["x"], np.arange(77, dtype=np.float32))
    assert model.ping() > 0.0

    _save(unwarmable(), tmp_path, "m", 1, {"warmup": {"inputs": {"x": {"shape": [77], "fill": "random"}}}})
    random = pool.load("m").versions[1].warm_feed
    assert random is not None and random["x"].dtype == np.float32 and len(np.unique(random["x"])) == 77

    sample = np.linspace(-1, 1, 77, dtype=np.float32)
    np.savez(tmp_path / "m" / "sample.npz", x=sample)
    _save(unwarmable(), tmp_path, "m", 1, {"warmup": "sample.npz"})
    from_file = pool.load("m").versions[1].warm_feed
    assert from_file is not None
    np.testing.assert_array_equal(from_file["x"], sample)

    _save(unwarmable(), tmp_path, "m", 1, {"warmup": {"inputs": {"x": {"shape": [76]}}}})
    declared_fails = pool.load("m").versions[1]
    assert pool.states()["m"]["state"] == State.READY
    assert declared_fails.warmup_error is not None and "declares" in declared_fails.warmup_error


@pytest.mark.parametrize(
    ("warmup", "error"),
    [
        ({"inputs": {"nope": {"shape": [77]}}}, "warmup.inputs.nope names no input of the model; inputs: ['x']"),
        (
            {"inputs": {"x": {"shape": [77], "datatype": "INT64"}}},
            "warmup.inputs.x.datatype is 'INT64'; input 'x' is FP32",
        ),
        ({"inputs": {"x": {"shape": [7, 11]}}}, "shape [7, 11] does not fit input 'x' [-1]"),
        ({"inputs": {"x": {"shape": [77], "data": [1, 2]}}}, "warmup.inputs.x.data has 2 values; shape [77] needs 77"),
        ({"inputs": {"x": {"shape": [2], "data": ["a", "b"]}}}, "warmup.inputs.x.data: could not convert"),
        ({"inputs": {"x": {"shape": [77], "fill": "noise"}}}, "warmup.inputs.x.fill must be one of"),
        ({"inputs": {"x": {"data": [1.0]}}}, "warmup.inputs.x needs a 'shape'"),
        ({"inputs": {"x": {"shape": [-1]}}}, "warmup.inputs.x.shape must be a list of non-negative integers"),
        ({"inputs": {"x": {"shape": [1], "data": [1.0], "fill": "ones"}}}, "give 'data' or 'fill', not both"),
        ({"inputs": {}}, "warmup must be a .npz file name or"),
        ("missing.npz", "warmup sample 'missing.npz' must be a .npz file in"),
        ("../../etc/passwd", "must lie inside the model directory"),
        ("sample.npz", "warmup sample 'sample.npz' array 'y' names no input"),
    ],
)
def test_a_wrong_warm_up_declaration_fails_the_load_naming_the_key(tmp_path: Path, warmup: object, error: str) -> None:
    _save(unwarmable(), tmp_path, "m", 1, {"warmup": warmup})
    np.savez(tmp_path / "m" / "sample.npz", y=np.zeros(77, np.float32))
    pool = ModelPool(LocalRepository(tmp_path), Settings.from_env({}))
    with pytest.raises((ConfigError, ModelLoadError)) as info:
        pool.load("m")
    assert error in info.value.message
    assert pool.states()["m"]["state"] == State.UNAVAILABLE
