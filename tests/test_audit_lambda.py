"""The audit log of the Lambda handler under awslambdaric: HTTP events (with their source address), a load, a
direct invoke and a warm ping, one record per S3 object and per SQS message."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from handler.local_lambda import LocalLambda
from tests import test_auth
from tests.auditkit import assert_no_secret, key_id, read_records, wait_for
from tests.conftest import AWS_ENV, ROOT, use_moto
from tests.test_auth import lambda_event, with_key
from tests.test_events_s3_sqs import add_sub_line, jsonl, request_body, s3_event, sqs_record

keyed, small_repo = test_auth.keyed, test_auth.small_repo  # test_auth's fixtures: its keys and repository


@pytest.fixture(scope="module")
def keyed_lambda(
    small_repo: Path, keyed: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalLambda, Path]]:
    where = tmp_path_factory.mktemp("lambda")
    audit_file = where / "audit.jsonl"
    env = {
        "OCLAW_MODEL_REPOSITORY": str(small_repo),
        "OCLAW_API_KEYS": str(keyed[0]),
        "OCLAW_AUDIT_SINKS": f"jsonl:{audit_file}",
        "OCLAW_AUDIT_SPOOL": str(where / "audit-spool"),
        "OCLAW_METERING_SPOOL": str(where / "metering-spool"),
    }
    fn = LocalLambda(env=env, cwd=ROOT, log=where / "lambda.log").start()
    fn.wait_init()
    yield fn, audit_file
    fn.stop()


def invoke_http(fn: LocalLambda, sample: str, key: str | None, request_id: str, **changes: Any) -> int:
    event = with_key(lambda_event(sample), key)
    if "multiValueHeaders" in event:
        event["multiValueHeaders"]["x-request-id"] = [request_id]
    event.setdefault("headers", {})["x-request-id"] = request_id
    for name, value in changes.items():
        event[name] = value
    return int(fn.invoke(event).json()["statusCode"])


def test_lambda_http_events_are_recorded_with_their_source_ip(
    keyed_lambda: tuple[LocalLambda, Path], keyed: tuple[Path, dict[str, str]]
) -> None:
    fn, audit_file = keyed_lambda
    keys = keyed[1]
    assert invoke_http(fn, "apigw_v2_infer.json", keys["invoker"], "l-v2") == 200
    assert invoke_http(fn, "apigw_v1_infer.json", keys["add_sub_only"], "l-v1") == 200
    assert invoke_http(fn, "function_url_infer.json", None, "l-401") == 401
    assert invoke_http(fn, "alb_infer.json", keys["reader"], "l-alb-403") == 403
    found = wait_for(audit_file, {"l-v2", "l-v1", "l-401", "l-alb-403"}, timeout_s=1)
    v2 = found["l-v2"]
    assert (v2["action"], v2["outcome"], v2["status"], v2["model"], v2["version"]) == (
        "infer",
        "ok",
        200,
        "add_sub",
        "1",
    )
    assert (v2["key_name"], v2["tenant"], v2["source"], v2["source_ip"]) == (
        "invoker",
        "tenant-invoker",
        "lambda-http",
        "198.51.100.23",
    )
    assert v2["platform"] == "lambda" and v2["key_id"] == key_id(keys["invoker"])
    assert (found["l-v1"]["source_ip"], found["l-v1"]["key_name"]) == ("203.0.113.7", "add_sub_only")
    assert (found["l-401"]["outcome"], found["l-401"]["status"], found["l-401"]["source_ip"]) == (
        "denied",
        401,
        "192.0.2.44",
    )
    # ALB events carry the client only in X-Forwarded-For, which a client can write: no address
    assert (found["l-alb-403"]["status"], found["l-alb-403"]["key_name"], found["l-alb-403"]["source_ip"]) == (
        403,
        "reader",
        "",
    )
    assert_no_secret(audit_file.read_text(), keys)


def test_lambda_load_direct_invoke_and_warm_are_recorded(
    keyed_lambda: tuple[LocalLambda, Path], keyed: tuple[Path, dict[str, str]]
) -> None:
    fn, audit_file = keyed_lambda
    event = with_key(lambda_event("apigw_v2_infer.json"), keyed[1]["admin"])
    event["rawPath"] = event["requestContext"]["http"]["path"] = "/v2/repository/models/mlp/load"
    event["body"] = ""
    event["headers"]["x-request-id"] = "l-load"
    assert fn.invoke(event).json()["statusCode"] == 200
    direct = lambda_event("direct_infer.json")
    assert "outputs" in fn.invoke(direct).json()
    assert "add_sub/1" in fn.invoke({"oclaw": "warm"}).json()["models_warmed"]
    records = read_records(audit_file)
    load = next(r for r in records if r["request_id"] == "l-load")
    assert (load["action"], load["outcome"], load["model"], load["version"], load["key_name"]) == (
        "load",
        "ok",
        "mlp",
        "1",
        "admin",
    )
    assert (load["source"], load["source_ip"]) == ("lambda-http", "198.51.100.23")
    by_source = {r["source"]: r for r in records}
    assert (by_source["lambda-direct"]["action"], by_source["lambda-direct"]["status"]) == ("infer", 200)
    assert by_source["lambda-direct"]["model"] == direct["model_name"]
    assert (by_source["warm"]["action"], by_source["warm"]["outcome"], by_source["warm"]["key_id"]) == (
        "warm",
        "ok",
        "",
    )


def test_lambda_s3_objects_and_sqs_messages_are_recorded(
    moto: str, monkeypatch: pytest.MonkeyPatch, small_repo: Path, tmp_path: Path
) -> None:
    """One record per S3 object (not per JSON line) and one per SQS message, with the event's own status."""
    use_moto(moto, monkeypatch)
    s3 = boto3.client("s3", endpoint_url=moto, region_name="us-east-1")
    bucket = f"audit-events-{os.getpid()}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="input/add_sub/a.jsonl", Body=jsonl([add_sub_line(i) for i in range(3)]))
    s3.put_object(Bucket=bucket, Key="input/add_sub/b.txt", Body=b"not a tensor")
    audit_file = tmp_path / "audit.jsonl"
    env = {
        "OCLAW_MODEL_REPOSITORY": str(small_repo),
        "OCLAW_AUDIT_SINKS": f"jsonl:{audit_file}",
        "OCLAW_AUDIT_SPOOL": str(tmp_path / "spool"),
        "AWS_ENDPOINT_URL": moto,
        **AWS_ENV,
    }
    with LocalLambda(env=env, cwd=ROOT, log=tmp_path / "log") as fn:
        fn.wait_init()
        event = s3_event("input/add_sub/a.jsonl", "input/add_sub/b.txt", bucket=bucket)
        assert len(fn.invoke(event).json()["processed"]) == 2
        good = sqs_record("msg-ok", request_body(1, f"s3://{bucket}/out", tenant="acme"))
        assert fn.invoke({"Records": [good, sqs_record("msg-bad", "nope")]}).json() == {
            "batchItemFailures": [{"itemIdentifier": "msg-bad"}]
        }
    found = {r["request_id"]: r for r in read_records(audit_file)}
    assert len(found) == 4
    jsonl_object = found[f"s3://{bucket}/input/add_sub/a.jsonl"]
    assert (jsonl_object["source"], jsonl_object["status"], jsonl_object["model"], jsonl_object["version"]) == (
        "s3",
        200,
        "add_sub",
        "1",
    )
    bad_object = found[f"s3://{bucket}/input/add_sub/b.txt"]
    assert (bad_object["outcome"], bad_object["status"]) == ("error", 400)
    assert (found["msg-ok"]["source"], found["msg-ok"]["status"], found["msg-ok"]["tenant"]) == ("sqs", 200, "acme")
    assert (found["msg-ok"]["model"], found["msg-ok"]["version"]) == ("add_sub", "1")
    assert (found["msg-bad"]["outcome"], found["msg-bad"]["status"]) == ("error", 400)


# -- the CLI ---------------------------------------------------------------------------------------------------------
