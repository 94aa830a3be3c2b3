"""Model instances: ``instance_count`` sessions of one version, each with its share of the cores, runs spread over
the free ones; reported in the model's configuration and its load record."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from engine.config import Settings
from engine.errors import ConfigError
from engine.model import LoadedModel
from engine.repository.local import LocalRepository
from engine.repository.manifest import load_manifest
from tests.conftest import start_server
from tests.modelgen import _save, mlp


@pytest.fixture(scope="module")
def mlp_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("instances")
    _save(mlp(), repo, "three", 1, {"instance_count": 3})
    _save(mlp(), repo, "batched", 1, {"instance_count": 2, "max_batch_size": 8, "dynamic_batching": {}})
    _save(mlp(), repo, "one", 1)
    return repo


def load(repo: Path, name: str, **overrides: object) -> LoadedModel:
    local = LocalRepository(repo)
    return LoadedModel(local.files(name, 1), local.manifest(name), Settings.from_env({}, **overrides))


def test_each_instance_is_a_session_with_its_share_of_the_cores(mlp_repo: Path) -> None:
    model = load(mlp_repo, "three", intra_op_threads=6)
    try:
        assert len(model.sessions) == 3 and len({id(s) for s in model.sessions}) == 3
        assert model.concurrency == 3 and model.executor._max_workers == 3
        assert model.load_record()["instances"] == 3 and model.load_record()["device"] == "cpu"
        assert model.instance_group() == {"count": 3, "kind": "KIND_CPU"}
        assert [s.get_session_options().intra_op_num_threads for s in model.sessions] == [2, 2, 2]
        spinning = [
            s.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") for s in model.sessions
        ]
        assert spinning == ["0", "0", "0"]  # an idle instance's spinning threads would take a running one's cores
        single = load(mlp_repo, "one", intra_op_threads=6)
        assert len(single.sessions) == 1 and single.sessions[0].get_session_options().intra_op_num_threads == 6
        single.close()
    finally:
        model.close()


def test_a_run_takes_a_free_instance(mlp_repo: Path) -> None:
    model = load(mlp_repo, "three")
    try:
        x = {"x": np.ones((1, 64), np.float32)}
        want = model.sessions[0].run(None, x)[0]
        assert model._free is not None
        busy = [model._free.get(), model._free.get()]  # two instances are running someone else's request
        (free,) = [s for s in model.sessions if all(s is not b for b in busy)]
        np.testing.assert_array_equal(model.run(["y"], x)[0], want)
        assert model._free.get_nowait() is free  # the run used, and gave back, the one free instance
        for session in [free, *busy]:
            model._free.put(session)
        with ThreadPoolExecutor(6) as pool:  # many at once: each waits for a free instance, none is lost
            results = list(pool.map(lambda _: model.run(["y"], x)[0], range(60)))
        assert all(np.array_equal(r, want) for r in results)
        assert sorted(id(model._free.get_nowait()) for _ in range(3)) == sorted(id(s) for s in model.sessions)
    finally:
        model.close()


def test_concurrent_requests_over_http_are_answered_by_every_model(mlp_repo: Path) -> None:
    srv = start_server(mlp_repo)
    try:
        rng = np.random.default_rng(0)
        xs = [rng.standard_normal((1, 64)).astype(np.float32) for _ in range(48)]
        want = load(mlp_repo, "one").sessions[0]

        def ask(i: int) -> tuple[int, list[float]]:
            name = ("three", "batched", "one")[i % 3]
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64], "data": xs[i].ravel().tolist()}]}
            r = httpx.post(f"{srv.url}/v2/models/{name}/infer", json=body, timeout=60)
            assert r.status_code == 200, r.text
            return i, r.json()["outputs"][0]["data"]

        with ThreadPoolExecutor(16) as pool:
            for i, got in pool.map(ask, range(len(xs))):
                np.testing.assert_allclose(got, want.run(None, {"x": xs[i]})[0].ravel(), rtol=1e-5, atol=1e-6)
        config = httpx.get(f"{srv.url}/v2/models/three/config", timeout=30).json()
        assert config["instance_group"] == [{"count": 3, "kind": "KIND_CPU"}]
        assert httpx.get(f"{srv.url}/v2/models/one/config", timeout=30).json()["instance_group"][0]["count"] == 1
    finally:
        srv.stop()


@pytest.mark.parametrize("value", [0, 65, "2", True, 1.5])
def test_a_bad_instance_count_is_named(tmp_path: Path, value: object) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "oclaw.json").write_text(json.dumps({"instance_count": value}))
    with pytest.raises(ConfigError) as exc:
        load_manifest(tmp_path / "m")
    assert "instance_count must be an integer from 1 to 64" in exc.value.message
