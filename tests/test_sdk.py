"""The Python SDK (``oclaw_sdk``) against a real oclaw server on loopback."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerThread, start_server
from tests.modelgen import _save, mlp


@pytest.fixture(scope="module")
def versions_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``mlp`` as version 1 (no record: fp32) and the same graph as version 2 recorded as an int8 optimization."""
    repo = tmp_path_factory.mktemp("versions")
    source = _save(mlp(), repo, "mlp", 1, {"versions": "all"})
    (repo / "mlp" / "2").mkdir()
    shutil.copy(source, repo / "mlp" / "2" / "model.onnx")
    record = {"version": 2, "source_version": 1, "method": "int8-static", "precision": "int8"}
    (repo / "mlp" / "2" / "optimization.json").write_text(json.dumps(record))
    return repo


@pytest.fixture(scope="module")
def versions_server(versions_repo: Path) -> Iterator[ServerThread]:
    srv = start_server(versions_repo)
    yield srv
    srv.stop()


def test_config_names_each_versions_precision(versions_server: ServerThread) -> None:
    for version, precision in (("1", "fp32"), ("2", "int8")):
        cfg = httpx.get(f"{versions_server.url}/v2/models/mlp/versions/{version}/config", timeout=30).json()
        assert cfg["parameters"]["precision"] == {"string_value": precision}
