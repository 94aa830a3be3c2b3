"""Warmer fan-out against moto's Lambda (real HTTP, boto3) and SnapStart hooks through awslambdaric."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import boto3
import httpx
import pytest

from handler.local_lambda import LocalLambda
from tests.conftest import AWS_ENV, ROOT
from tests.modelgen import _save, add_constant

FUNCTION = "oclaw-warm"


@pytest.fixture(scope="module")
def moto_url(moto: str) -> str:
    """The module's moto server, with a function for the warmer to invoke."""
    url = moto
    httpx.post(f"{url}/moto-api/config", json={"lambda": {"use_docker": False}}).raise_for_status()
    session = boto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
    iam = session.client("iam", endpoint_url=url)
    lam = session.client("lambda", endpoint_url=url)
    role = iam.create_role(RoleName="oclaw", AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17"}))
    code = io.BytesIO()
    with zipfile.ZipFile(code, "w") as zf:
        zf.writestr("app.py", "def handler(event, context):\n    return event\n")
    lam.create_function(
        FunctionName=FUNCTION,
        Runtime="python3.12",
        Role=role["Role"]["Arn"],
        Handler="app.handler",
        Code={"ZipFile": code.getvalue()},
    )
    iam.close()
    lam.close()
    return url


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("warm-repo")
    _save(add_constant(1.0), repo, "plus_one")
    _save(add_constant(2.0), repo, "plus_two")
    return repo


def test_fan_out_reaches_n_minus_one_instances(moto_url: str, small_repo: Path, tmp_path: Path) -> None:
    # moto never runs function code: queue what N-1 distinct warm instances would answer
    answers = [json.dumps({"instance_id": f"instance-{i}", "cold": True}) for i in range(4)]
    httpx.post(
        f"{moto_url}/moto-api/static/lambda-simple/response", json={"results": answers, "region": "us-east-1"}
    ).raise_for_status()
    env = {"OCLAW_MODEL_REPOSITORY": str(small_repo), "AWS_ENDPOINT_URL_LAMBDA": moto_url, **AWS_ENV}
    with LocalLambda(env=env, cwd=ROOT, function_name=FUNCTION, log=tmp_path / "log") as fn:
        fn.wait_init()
        result = fn.invoke({"oclaw": "warm", "concurrency": 5})
        assert result.error is None, result.error
        ping = result.json()
        assert ping["cold"] is True and ping["models_warmed"] == ["plus_one/1", "plus_two/1"]
        fan = ping["fanout"]
        assert fan["requested"] == 4 and fan["answered"] == 4 and fan["errors"] == []
        assert ping["instances"] == 5  # four distinct targets plus this instance
        assert ping["instance_id"] in fan["instance_ids"]

        # a fan-out target holds its instance, then answers who it is
        target = fn.invoke({"oclaw": "warm", "target": True, "hold_ms": 75}).json()
        assert target["instance_id"] == ping["instance_id"] and "fanout" not in target
        assert fn.invoke({"oclaw": "warm", "target": True, "hold_ms": 75}).duration_ms >= 75

        # real traffic on this instance: the next scheduled ping must not collide with it
        fn.invoke(
            {
                "model_name": "plus_one",
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0, 0, 0, 0]}],
            }
        )
        skipped = fn.invoke({"oclaw": "warm", "concurrency": 5}).json()
        assert "real traffic" in skipped["fanout"]["skipped"] and skipped["instances"] == 1

        bad = fn.invoke({"oclaw": "warm", "concurrency": "lots"})
        assert bad.error is not None and "concurrency" in bad.error["errorMessage"]
    log = (tmp_path / "log").read_text()
    assert '"WarmPings"' in log and '"CloudWatchMetrics"' in log  # EMF metric lines


def test_snapstart_hooks_run_and_restore_gets_a_new_identity(small_repo: Path, tmp_path: Path) -> None:
    env = {"OCLAW_MODEL_REPOSITORY": str(small_repo), "OCLAW_AUDIT_SINKS": "log"}
    with LocalLambda(env=env, cwd=ROOT, snap_start=True, log=tmp_path / "log") as fn:
        fn.wait_init()
        assert fn.api.restore_polled.is_set()
        ping = fn.invoke({"oclaw": "warm"}).json()
        assert ping["cold"] is True
        inputs = [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0] * 4}]
        request = {"model_name": "plus_one", "inputs": inputs}
        assert fn.invoke(request).error is None
    log = (tmp_path / "log").read_text()
    records = [json.loads(line) for line in log.splitlines() if line.startswith('{"event"')]
    init = next(r for r in records if r["event"] == "cold_start")
    restore = next(r for r in records if r["event"] == "restore")
    assert init["init_type"] == "snap-start"
    assert restore["instance_id"] == ping["instance_id"] != init["instance_id"]
    (metered,) = [json.loads(line) for line in log.splitlines() if '"event":"metering"' in line]
    assert metered["instance_id"] == restore["instance_id"]  # records name the restored instance, not the snapshot's
    audited = [json.loads(line) for line in log.splitlines() if '"event":"audit"' in line]
    assert {r["action"] for r in audited} == {"warm", "infer"}
    assert {r["instance_id"] for r in audited} == {restore["instance_id"]}  # the audit log's too


def test_failing_after_restore_hook_is_reported(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    model = _save(add_constant(1.0), repo, "plus_one")
    env = {"OCLAW_MODEL_REPOSITORY": str(repo)}
    with LocalLambda(env=env, cwd=ROOT, snap_start=True, hold_restore=True, log=tmp_path / "log") as fn:
        assert fn.api.restore_polled.wait(60)  # before-snapshot hooks done, "snapshot taken"
        model.write_bytes(model.read_bytes() + b"\0")  # the file no longer matches the snapshot's model
        fn.api.restore_gate.set()
        assert fn.proc is not None and fn.proc.wait(timeout=60) == 65
        assert fn.api.restore_error is not None
        assert "changed on disk since the snapshot" in fn.api.restore_error["errorMessage"]
