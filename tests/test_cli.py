"""The `oclaw` console script: prepare, publish, lambda invoke, usage, version; bad settings and flags."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import fields
from pathlib import Path

import boto3
import numpy as np
import onnxruntime as ort
import pytest

import engine
from engine.config import Settings
from engine.errors import ConfigError
from engine.metering.records import MeteringRecord
from engine.optimize.prepare import PREPARED, PREPARED_META, cpu_fingerprint, prepared_path
from engine.pool import ModelPool
from engine.repository.local import LocalRepository
from handler.cli import GROUP_FIELDS
from tests.conftest import AWS_ENV, EXAMPLES, ROOT, use_moto

EVENTS = Path(__file__).parent / "events"


def oclaw(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OCLAW_") and k != "PORT"}
    return subprocess.run(
        [sys.executable, "-m", "handler.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env={**clean, **(env or {})},
    )


def test_version() -> None:
    out = oclaw("version")
    assert out.returncode == 0 and json.loads(out.stdout)["oclaw"] == engine.__version__
    out = oclaw("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"oclaw {engine.__version__}"


# -- bad settings and flags: one line naming the variable or flag, exit 2, never a traceback -------------------


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["serve", "--port", "99999"], {}, "argument --port: expected an integer from 1 to 65535, got '99999'"),
        (["serve", "--port", "http"], {}, "argument --port"),
        (["serve"], {"PORT": "abc"}, "oclaw: PORT=abc: expected a port number"),
        (["serve"], {"PORT": "70000"}, "oclaw: PORT=70000: a port number is 1-65535"),
        (["serve"], {"OCLAW_LOG_LEVEL": "bogus"}, "oclaw: OCLAW_LOG_LEVEL=bogus: not a log level"),
        (["serve"], {"OCLAW_LOG_FORMAT": "xml"}, "oclaw: OCLAW_LOG_FORMAT=xml: must be one of json, text"),
        (["serve"], {"OCLAW_MAX_BODY_BYTES": "lots"}, "oclaw: OCLAW_MAX_BODY_BYTES=lots: expected an integer"),
        (["serve"], {"OCLAW_S3_CHUNK_LINES": "0"}, "oclaw: OCLAW_S3_CHUNK_LINES=0: must be >= 1"),
        (["serve"], {"OCLAW_DRAIN_TIMEOUT_S": "nan"}, "oclaw: OCLAW_DRAIN_TIMEOUT_S=nan: must be a finite number"),
        (["serve"], {"OCLAW_CLOUDRUN_BILLING": "free"}, "oclaw: OCLAW_CLOUDRUN_BILLING=free: must be one of"),
        (["prepare"], {"OCLAW_WARMUP": "maybe"}, "oclaw: OCLAW_WARMUP=maybe: must be one of auto, true, false"),
        (["lambda", "invoke", str(EVENTS / "warm.json"), "--env", "FOO"], {}, "argument --env: expected KEY=VALUE"),
        (["lambda", "invoke", str(EVENTS / "warm.json"), "--memory", "64"], {}, "argument --memory"),
        (["lambda", "invoke", str(EVENTS / "warm.json"), "--repeat", "0"], {}, "argument --repeat"),
        (
            ["lambda", "invoke", str(EVENTS / "warm.json"), "--env", "OCLAW_LOG_LEVEL=loud"],
            {},
            "oclaw: OCLAW_LOG_LEVEL=loud: not a log level",
        ),
        (["usage", "README.md", "--by", "tenant,bogus"], {}, "argument --by: unknown field(s) bogus; group by"),
    ],
)
def test_a_bad_setting_or_flag_is_named_and_exits_2(
    args: list[str], env: dict[str, str], named: str, tmp_path: Path
) -> None:
    if args[0] in ("serve", "prepare"):
        args = [*args, "--model-repository", str(tmp_path)]  # a valid (empty) repository: only the setting is wrong
    out = oclaw(*args, env=env, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert named in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_settings_are_checked_in_range_and_unknown_names_get_a_hint(caplog: pytest.LogCaptureFixture) -> None:
    s = Settings.from_env({"OCLAW_LOG_LEVEL": "debug", "OCLAW_LOG_FORMAT": "TEXT", "OCLAW_GRAPH_OPTIMIZATION": "All"})
    assert (s.log_level, s.log_format, s.graph_optimization) == ("DEBUG", "text", "all")
    with pytest.raises(ConfigError, match=r"^OCLAW_MODEL_CONCURRENCY=0: must be >= 1$"):
        Settings.from_env({}, model_concurrency=0)  # keyword overrides are checked too
    with pytest.raises(ConfigError, match=r"^OCLAW_CLOUDRUN_VCPU=-1.0: must be > 0$"):
        Settings.from_env({"OCLAW_CLOUDRUN_VCPU": "-1"})
    with caplog.at_level(logging.WARNING, logger="oclaw.config"):
        s = Settings.from_env({"OCLAW_LOG_LEVL": "debug", "OCLAW_ZZZ": "1"})
    assert s.extra == {"OCLAW_LOG_LEVL": "debug", "OCLAW_ZZZ": "1"}
    assert "OCLAW_LOG_LEVL is not an oclaw setting and is ignored; did you mean OCLAW_LOG_LEVEL?" in caplog.text
    assert "OCLAW_ZZZ is not an oclaw setting and is ignored" in caplog.text


def test_usage_groups_only_by_fields_a_record_has() -> None:
    assert set(GROUP_FIELDS) - {"day"} <= {f.name for f in fields(MeteringRecord)}


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


def test_lambda_invoke_exits_1_and_names_the_event_when_an_invocation_fails(repo: Path, tmp_path: Path) -> None:
    unknown_model = tmp_path / "unknown_model.json"
    unknown_model.write_text(json.dumps({"model_name": "nope", "inputs": []}))
    http_404 = json.loads((EVENTS / "function_url_infer.json").read_text())
    http_404["rawPath"] = http_404["requestContext"]["http"]["path"] = "/v2/models/nope/infer"
    (tmp_path / "http_404.json").write_text(json.dumps(http_404))
    events = [str(EVENTS / "warm.json"), str(unknown_model), str(tmp_path / "http_404.json")]
    out = oclaw("lambda", "invoke", *events, "--model-repository", str(repo))
    assert out.returncode == 1, out.stderr
    assert len(out.stdout.splitlines()) == 3  # every event is still invoked and its response printed
    failed = [line for line in out.stderr.splitlines() if line.startswith("oclaw: invocation failed:")]
    assert failed == [
        f"oclaw: invocation failed: {unknown_model}: status 404: unknown model 'nope'",
        f'oclaw: invocation failed: {tmp_path / "http_404.json"}: status 404: {{"error":"unknown model \'nope\'"}}',
    ]


def test_lambda_invoke_of_the_bundled_example_succeeds() -> None:
    out = oclaw(
        "lambda",
        "invoke",
        str(EVENTS / "warm.json"),
        str(EVENTS / "function_url_image.json"),
        "--model-repository",
        str(EXAMPLES),
    )
    assert out.returncode == 0, out.stderr
    warm, reply = (json.loads(line) for line in out.stdout.splitlines())
    assert warm["models_warmed"] == ["efficientnet_lite0/1"]
    assert reply["statusCode"] == 200
    top = json.loads(reply["body"])["outputs"][0]["data"][0]
    assert top.endswith("cat"), top  # examples/images/cat.jpg, as the event carries it


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


def test_prepare_reports_each_broken_model_and_prepares_the_others(repo: Path, tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    for name in ("mlp", "tiny_classifier"):
        shutil.copytree(repo / name, copy / name)
    good = (repo / "mlp" / "1" / "model.onnx").read_bytes()
    for broken in ("a_truncated", "z_not_onnx"):
        (copy / broken / "1").mkdir(parents=True)
    (copy / "a_truncated" / "1" / "model.onnx").write_bytes(good[: len(good) // 2])
    (copy / "z_not_onnx" / "1" / "model.onnx").write_text("not a model")
    out = oclaw("prepare", "--model-repository", str(copy))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    failed = [line for line in out.stderr.splitlines() if line.startswith("oclaw: not prepared:")]
    assert [line.split(":")[2].strip() for line in failed] == ["a_truncated/1", "z_not_onnx/1"], out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert {Path(r["source"]).parent.parent.name for r in rows} == {"mlp", "tiny_classifier"}
    assert (copy / "tiny_classifier" / "1" / PREPARED).is_file()
    assert not list(copy.rglob("*.tmp"))  # no half-written prepared graph left behind
    out = oclaw("prepare", "--model-repository", str(copy), "mlp", "nope")
    assert out.returncode == 1 and "oclaw: not prepared: nope: unknown model 'nope'" in out.stderr


def test_publish_loads_every_model_before_uploading_any(
    moto: str, repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    shutil.copytree(repo / "mlp", src / "mlp")
    shutil.copytree(repo / "add_sub", src / "truncated")
    model = src / "truncated" / "1" / "model.onnx"
    model.write_bytes(model.read_bytes()[:-40])
    env = {**AWS_ENV, "AWS_ENDPOINT_URL": moto}
    use_moto(moto, monkeypatch)
    s3 = boto3.client("s3", endpoint_url=moto, region_name="us-east-1")
    bucket = f"models-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    out = oclaw("publish", str(src), f"s3://{bucket}/prod", env=env)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith("oclaw: model 'truncated' failed to load:") and "Traceback" not in out.stderr
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0  # nothing uploaded, the good model neither
    out = oclaw("publish", str(src), f"s3://{bucket}/prod", "--model", "mlp", env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["published"] == ["mlp"]
