"""The audit log: a record per inference and model operation (denied requests too) with the key's id, name and
tenant but never the key, through `oclaw serve` and the CLI; a sink that fails spools and delivers later (the
Lambda handler's records: test_audit_lambda.py)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import numpy as np
import pytest

from engine.audit import Auditor, action_of
from engine.config import Settings
from engine.errors import ConfigError
from handler.cli import main
from tests import optimodels, test_auth
from tests.auditkit import FIELDS, assert_no_secret, key_id, read_records, wait_for
from tests.conftest import AWS_ENV, ServerProcess, spawn_server, use_moto
from tests.test_auth import INFER_BODY, MLP_BODY

keyed, small_repo = test_auth.keyed, test_auth.small_repo  # test_auth's fixtures: its keys and repository


# -- oclaw serve -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(
    small_repo: Path, keyed: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, Path]]:
    where = tmp_path_factory.mktemp("served")
    audit_file = where / "audit.jsonl"
    env = {
        "OCLAW_API_KEYS": str(keyed[0]),
        "OCLAW_AUDIT_SINKS": f"log,jsonl:{audit_file}",
        "OCLAW_AUDIT_SPOOL": str(where / "audit-spool"),
        "OCLAW_METERING_SPOOL": str(where / "metering-spool"),
        "OCLAW_LOG_LEVEL": "WARNING",
    }
    server = spawn_server(small_repo, where, env=env)
    server.wait_ready()
    yield server, audit_file
    server.terminate()


def post(server: ServerProcess, path: str, key: str | None, request_id: str, body: Any = None) -> httpx.Response:
    headers = {"x-request-id": request_id} | ({"authorization": f"Bearer {key}"} if key else {})
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=30)


def test_server_records_inferences_with_the_keys_name_and_tenant(
    served: tuple[ServerProcess, Path], keyed: tuple[Path, dict[str, str]]
) -> None:
    server, audit_file = served
    keys = keyed[1]
    assert post(server, "/v2/models/add_sub/infer", keys["invoker"], "aud-ok", INFER_BODY).status_code == 200
    assert post(server, "/v2/models/versioned/versions/1/infer", keys["admin"], "aud-v1", MLP_BODY).status_code == 200
    assert post(server, "/v2/models/nope/infer", keys["invoker"], "aud-404", INFER_BODY).status_code == 404
    found = wait_for(audit_file, {"aud-ok", "aud-v1", "aud-404"})
    ok = found["aud-ok"]
    assert set(ok) == FIELDS
    assert ok["event"] == "audit" and ok["action"] == "infer" and ok["outcome"] == "ok" and ok["status"] == 200
    assert (ok["model"], ok["version"]) == ("add_sub", "1")
    assert (ok["key_id"], ok["key_name"], ok["tenant"]) == (key_id(keys["invoker"]), "invoker", "tenant-invoker")
    assert ok["source"] == "http" and ok["source_ip"] == "127.0.0.1" and len(ok["instance_id"]) == 16
    assert (found["aud-v1"]["model"], found["aud-v1"]["version"], found["aud-v1"]["key_name"]) == (
        "versioned",
        "1",
        "admin",
    )
    missing = found["aud-404"]
    assert (missing["outcome"], missing["status"], missing["model"]) == ("error", 404, "nope")


def test_server_records_denied_requests(served: tuple[ServerProcess, Path], keyed: tuple[Path, dict[str, str]]) -> None:
    server, audit_file = served
    keys = keyed[1]
    assert post(server, "/v2/models/add_sub/infer", None, "aud-401", INFER_BODY).status_code == 401
    bad = "oclaw_" + key_id(keys["invoker"]) + "_" + "A" * 43  # a known id with the wrong secret
    assert post(server, "/v2/models/add_sub/infer", bad, "aud-401-wrong", INFER_BODY).status_code == 401
    assert post(server, "/v2/models/add_sub/infer", keys["reader"], "aud-403", INFER_BODY).status_code == 403
    assert post(server, "/v2/models/mlp/infer", keys["add_sub_only"], "aud-403-model", MLP_BODY).status_code == 403
    statuses = [
        httpx.get(f"{server.url}/v2", headers={"x-request-id": f"aud-limited-{i}", "x-api-key": keys["limited"]})
        for i in range(3)
    ]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    found = wait_for(audit_file, {"aud-401", "aud-401-wrong", "aud-403", "aud-403-model", "aud-limited-2"})
    assert (found["aud-401"]["outcome"], found["aud-401"]["status"], found["aud-401"]["action"]) == (
        "denied",
        401,
        "infer",
    )
    # an unauthenticated request names no key, not even the id it claimed
    assert found["aud-401"]["key_id"] == found["aud-401-wrong"]["key_id"] == "" == found["aud-401"]["tenant"]
    assert (found["aud-403"]["status"], found["aud-403"]["key_name"], found["aud-403"]["tenant"]) == (
        403,
        "reader",
        "tenant-reader",
    )
    assert (found["aud-403-model"]["model"], found["aud-403-model"]["key_name"]) == ("mlp", "add_sub_only")
    limited = found["aud-limited-2"]
    assert (limited["action"], limited["outcome"], limited["status"], limited["key_name"]) == (
        "read",
        "denied",
        429,
        "limited",
    )
    # the requests that went through to a route that is no audited action left no record
    assert not {r["request_id"] for r in read_records(audit_file)} & {"aud-limited-0", "aud-limited-1"}


def test_server_records_load_unload_and_warm(
    served: tuple[ServerProcess, Path], keyed: tuple[Path, dict[str, str]]
) -> None:
    server, audit_file = served
    keys = keyed[1]
    assert post(server, "/v2/repository/models/mlp/load", keys["invoker"], "aud-load-403").status_code == 403
    assert post(server, "/v2/repository/models/mlp/unload", keys["admin"], "aud-unload").status_code == 200
    assert post(server, "/v2/repository/models/mlp/load", keys["admin"], "aud-load").status_code == 200
    assert post(server, "/v2/repository/models/nope/load", keys["admin"], "aud-load-404").status_code == 404
    assert post(server, "/v2/warm", keys["admin"], "aud-warm").status_code == 200
    found = wait_for(audit_file, {"aud-load-403", "aud-unload", "aud-load", "aud-load-404", "aud-warm"})
    expected = {
        "aud-load-403": ("load", "denied", 403, "mlp", "invoker"),
        "aud-unload": ("unload", "ok", 200, "mlp", "admin"),
        "aud-load": ("load", "ok", 200, "mlp", "admin"),
        "aud-load-404": ("load", "error", 404, "nope", "admin"),
        "aud-warm": ("warm", "ok", 200, "", "admin"),
    }
    for request_id, (action, outcome, status, model, name) in expected.items():
        record = found[request_id]
        assert (record["action"], record["outcome"], record["status"], record["model"], record["key_name"]) == (
            action,
            outcome,
            status,
            model,
            name,
        ), record
        assert record["source_ip"] == "127.0.0.1" and record["tenant"] == f"tenant-{name}"
    assert found["aud-unload"]["version"] == found["aud-load"]["version"] == "1"


def test_server_log_sink_and_no_secret_anywhere(
    served: tuple[ServerProcess, Path], keyed: tuple[Path, dict[str, str]]
) -> None:
    server, audit_file = served
    assert post(server, "/v2/models/add_sub/infer", keyed[1]["invoker"], "aud-stdout", INFER_BODY).status_code == 200
    wait_for(audit_file, {"aud-stdout"})
    deadline = time.monotonic() + 10
    while '"aud-stdout"' not in server.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [json.loads(line) for line in server.output().splitlines() if line.startswith('{"event":"audit"')]
    assert "aud-stdout" in {r["request_id"] for r in lines}
    assert_no_secret(audit_file.read_text() + server.output(), keyed[1])


def test_server_shutdown_sends_what_is_queued(
    small_repo: Path, keyed: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """Records queued when SIGTERM comes reach the sink (the flusher may not have run yet)."""
    audit_file = tmp_path / "audit.jsonl"
    env = {
        "OCLAW_API_KEYS": str(keyed[0]),
        "OCLAW_AUDIT_SINKS": f"jsonl:{audit_file}",
        "OCLAW_AUDIT_SPOOL": str(tmp_path / "spool"),
        "OCLAW_METERING_SPOOL": str(tmp_path / "metering-spool"),
    }
    server = spawn_server(small_repo, tmp_path, env=env)
    server.wait_ready()
    assert post(server, "/v2/models/add_sub/infer", keyed[1]["invoker"], "aud-last", INFER_BODY).status_code == 200
    assert server.terminate() == 0
    assert [r["request_id"] for r in read_records(audit_file)] == ["aud-last"]


# -- delivery: a failing sink spools, a later flush delivers -------------------------------------------------------


def test_a_failing_sink_spools_and_a_later_flush_delivers(tmp_path: Path) -> None:
    target = tmp_path / "not-yet" / "audit.jsonl"  # its folder does not exist: every write fails
    spool = tmp_path / "spool" / "audit"
    spool.parent.mkdir()
    settings = Settings.from_env({}, audit_sinks=(f"jsonl:{target}",), audit_spool=str(spool))
    auditor = Auditor(settings, "a" * 16)
    for n in range(3):
        auditor.record("infer", "ok", 200, model="mlp", version="1", request_id=f"r{n}", source="http")
    auditor.flush()
    assert not target.exists()
    spooled = [json.loads(line) for f in spool.parent.iterdir() for line in f.read_text().splitlines()]
    assert [r["request_id"] for r in spooled] == ["r0", "r1", "r2"] and spooled[0]["event"] == "audit"
    auditor.close()  # still failing: kept, nothing lost
    # the sink comes back; another process (a new Auditor) sends the spool first, then its own record
    target.parent.mkdir()
    later = Auditor(settings, "b" * 16)
    later.record("load", "ok", 200, model="mlp", request_id="r3", source="http")
    later.close()
    delivered = read_records(target)
    assert [r["request_id"] for r in delivered] == ["r0", "r1", "r2", "r3"]
    assert [r["instance_id"][0] for r in delivered] == ["a", "a", "a", "b"]
    assert list(spool.parent.iterdir()) == []


def test_a_failing_queue_sink_spools_then_delivers(moto: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An SQS queue that does not exist yet (moto's server): records spool, then reach the queue once it does."""
    use_moto(moto, monkeypatch)
    sqs = boto3.client("sqs", endpoint_url=moto, region_name="us-east-1")
    url = f"{moto}/123456789012/audit-{os.getpid()}"
    settings = Settings.from_env({}, audit_sinks=(f"sqs:{url}",), audit_spool=str(tmp_path / "spool"))
    auditor = Auditor(settings, "c" * 16)
    auditor.record("unload", "ok", 200, model="mlp", request_id="q1", source="http")
    auditor.flush()
    assert len(list(tmp_path.glob("spool*"))) == 1
    created = sqs.create_queue(QueueName=f"audit-{os.getpid()}")["QueueUrl"]
    assert created.rsplit("/", 1)[1] == url.rsplit("/", 1)[1]
    auditor.close()
    messages = sqs.receive_message(QueueUrl=created, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])
    assert [json.loads(m["Body"])["request_id"] for m in messages] == ["q1"]
    assert list(tmp_path.glob("spool*")) == []


def test_settings_default_and_bad_sinks(tmp_path: Path) -> None:
    assert Settings.from_env({}).audit_sink_specs == ()
    assert Settings.from_env({"OCLAW_API_KEYS": "keys.json"}).audit_sink_specs == ("log",)
    assert Settings.from_env({"OCLAW_AUTH": "none", "OCLAW_API_KEYS": "k.json"}).audit_sink_specs == ()
    assert Settings.from_env({"OCLAW_API_KEYS": "k.json", "OCLAW_AUDIT_SINKS": "none"}).audit_sink_specs == ()
    for bad in ("emf", "log:packed", "nope:x", "auto,log"):
        settings = Settings.from_env({"OCLAW_AUDIT_SINKS": bad, "OCLAW_AUDIT_SPOOL": str(tmp_path / "s")})
        with pytest.raises(ConfigError, match="OCLAW_AUDIT_SINKS"):
            Auditor(settings, "d" * 16)
    assert action_of("/v2/models/m/versions/3/infer") == ("infer", "m", "3")
    assert action_of("/v2/repository/models/m/unload/") == ("unload", "m", "")
    assert action_of("/v2/models/m/config") == ("read", "", "")


@pytest.fixture()
def cli_audit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in list(os.environ):
        if key.startswith("OCLAW_"):
            monkeypatch.delenv(key)
    audit_file = tmp_path / "cli-audit.jsonl"
    monkeypatch.setenv("OCLAW_AUDIT_SINKS", f"jsonl:{audit_file}")
    monkeypatch.setenv("OCLAW_AUDIT_SPOOL", str(tmp_path / "cli-spool"))
    return audit_file


def run_cli(*args: str) -> int:
    try:
        return main(list(args))
    except SystemExit as exc:  # argparse
        return int(exc.code or 0)


def test_publish_is_recorded(
    cli_audit: Path, moto: str, monkeypatch: pytest.MonkeyPatch, small_repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    use_moto(moto, monkeypatch)
    s3 = boto3.client("s3", endpoint_url=moto, region_name="us-east-1")
    s3.create_bucket(Bucket="audit-publish")
    assert run_cli("publish", str(small_repo), "s3://audit-publish/m", "--model", "versioned") == 0
    assert run_cli("publish", str(small_repo), "s3://no-such-bucket-audit/m", "--model", "mlp") == 2
    capsys.readouterr()
    ok, failed = read_records(cli_audit)
    assert (ok["action"], ok["outcome"], ok["status"], ok["model"], ok["version"]) == (
        "publish",
        "ok",
        0,
        "versioned",
        "1,2",
    )
    assert (failed["outcome"], failed["status"], failed["model"]) == ("error", 2, "mlp")
    assert ok["source"] == "cli" and ok["user"] and ok["key_id"] == "" and set(ok) == FIELDS
    assert AWS_ENV["AWS_SECRET_ACCESS_KEY"] not in cli_audit.read_text()


def test_optimize_is_recorded(cli_audit: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    digits = optimodels.digits()
    root = tmp_path / "models"
    optimodels.save(optimodels.mlp(optimodels.train(digits), digits), root, "digits")
    x, y = digits.test
    np.savez(tmp_path / "eval.npz", x=x, label=y)
    args: Callable[[str], list[str]] = lambda model: [  # noqa: E731
        "optimize",
        model,
        "--model-repository",
        str(root),
        "--precision",
        "fp16",
        "--evaluation",
        str(tmp_path / "eval.npz"),
    ]
    assert run_cli(*args("digits")) == 0
    assert run_cli(*args("nope")) == 2
    capsys.readouterr()
    ok, failed = read_records(cli_audit)
    assert (ok["action"], ok["outcome"], ok["status"], ok["model"], ok["version"]) == (
        "optimize",
        "ok",
        0,
        "digits",
        "2",
    )
    assert (failed["action"], failed["outcome"], failed["status"], failed["model"]) == ("optimize", "error", 2, "nope")
