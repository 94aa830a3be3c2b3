"""The `oclaw` console script: prepare, lambda invoke, version."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from engine.config import Settings
from engine.optimize.prepare import PREPARED, PREPARED_META, cpu_fingerprint, prepared_path
from engine.pool import ModelPool
from engine.repository.local import LocalRepository
from tests.conftest import ROOT

EVENTS = Path(__file__).parent / "events"


def oclaw(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "handler.cli", *args], check=False, capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_version() -> None:
    out = oclaw("version")
    assert out.returncode == 0 and json.loads(out.stdout)["oclaw"]


def test_lambda_invoke_prints_responses_and_report_lines(repo: Path) -> None:
    out = oclaw(
        "lambda",
        "invoke",
        str(EVENTS / "warm.json"),
        str(EVENTS / "direct_infer.json"),
        "--model-repository",
        str(repo),
        "--memory",
        "512",
    )
    assert out.returncode == 0, out.stderr
    responses = [json.loads(line) for line in out.stdout.splitlines()]
    assert responses[0]["cold"] is True and "add_sub/1" in responses[0]["models_warmed"]
    assert responses[1]["outputs"][0]["data"][:3] == [2.0, 3.0, 4.0]
    reports = [line for line in out.stderr.splitlines() if line.startswith("REPORT")]
    assert len(reports) == 2
    assert "Init Duration" in reports[0] and "Init Duration" not in reports[1]
    assert all("Memory Size: 512 MB" in r and "Billed Duration" in r for r in reports)


def test_lambda_invoke_reports_a_bad_event_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    out = oclaw("lambda", "invoke", str(bad))
    assert out.returncode == 2 and "bad.json" in out.stderr


@pytest.fixture()
def prepared_repo(repo: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "repo"
    for name in ("mlp", "tiny_classifier"):
        shutil.copytree(repo / name, copy / name)
    out = oclaw("prepare", "--model-repository", str(copy))
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert {Path(r["source"]).parent.parent.name for r in rows} == {"mlp", "tiny_classifier"}
    assert all(r["cpu"] == cpu_fingerprint() for r in rows)
    return copy


def test_prepared_graphs_load_without_optimisation_and_give_the_same_results(prepared_repo: Path) -> None:
    source = prepared_repo / "mlp" / "1" / "model.onnx"
    assert (source.parent / PREPARED).is_file() and (source.parent / PREPARED_META).is_file()
    assert prepared_path(source) == (source.parent / PREPARED, None)
    pool = ModelPool(LocalRepository(prepared_repo), Settings.from_env({}))
    pool.preload()
    model = pool.get("mlp")
    assert model.prepared
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    reference = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(model.session.run(None, {"x": x})[0], reference, rtol=1e-5, atol=1e-5)
    off = ModelPool(LocalRepository(prepared_repo), Settings.from_env({"OCLAW_USE_PREPARED": "false"}))
    assert not off.load("mlp").versions[1].prepared


def test_a_mismatched_or_broken_prepared_graph_falls_back(
    prepared_repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    version_dir = prepared_repo / "mlp" / "1"
    meta = json.loads((version_dir / PREPARED_META).read_text())
    (version_dir / PREPARED_META).write_text(json.dumps({**meta, "cpu": "riscv64:"}))
    path, reason = prepared_path(version_dir / "model.onnx")
    assert path.name == "model.onnx" and reason is not None and "made for CPU" in reason
    (version_dir / PREPARED_META).write_text(json.dumps({**meta, "ort_version": "0.0.1"}))
    assert "onnxruntime 0.0.1" in str(prepared_path(version_dir / "model.onnx")[1])
    (version_dir / PREPARED_META).write_text(json.dumps(meta))
    (version_dir / PREPARED).write_bytes(b"garbage")
    pool = ModelPool(LocalRepository(prepared_repo), Settings.from_env({}))
    model = pool.load("mlp").versions[1]
    assert not model.prepared
    assert "prepared graph failed to load" in caplog.text


def test_prepare_with_no_models_fails(tmp_path: Path) -> None:
    out = oclaw("prepare", "--model-repository", str(tmp_path))
    assert out.returncode == 1 and "no models" in out.stderr
