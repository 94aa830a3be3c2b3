"""A request's metering record carries the client's ``X-Request-Id`` and its real sizes, failed or served, on the
server and on Lambda; the record a request asks for (``"metering": true``) is the very one that is logged."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import httpx

from handler.local_lambda import LocalLambda
from tests.conftest import ROOT, spawn_server
from tests.test_lambda import event

GOOD = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": [0.5] * 8}]}
BAD = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": [0.5] * 7}]}


def logged_records(text: str) -> dict[str, dict[str, Any]]:
    """The metering records a process logged (``OCLAW_METERING_SINKS=log``), by request id."""
    records = {}
    for line in text.splitlines():
        doc = json.loads(line) if line.startswith("{") else {}
        if doc.get("event") == "metering":
            records[doc["request_id"]] = doc
    return records


def assert_same_record(returned: dict[str, Any], logged: dict[str, Any]) -> None:
    assert {k: v for k, v in logged.items() if k != "event"} == returned


def test_server_records_carry_the_client_id_and_sizes_of_failed_requests(repo: Path, tmp_path: Path) -> None:
    srv = spawn_server(repo, tmp_path, env={"OCLAW_METERING_SINKS": "log"})
    try:
        srv.wait_ready()
        url = f"{srv.url}/v2/models/versioned/infer"
        bad_body = json.dumps(BAD).encode()
        bad = httpx.post(url, content=bad_body, headers={"x-request-id": "bad-1", "content-type": "application/json"})
        missing = httpx.post(f"{srv.url}/v2/models/nope/infer", json=GOOD, headers={"X-Request-Id": "missing-1"})
        asked = httpx.post(url, json={**GOOD, "parameters": {"metering": True}}, headers={"X-Request-Id": "show-1"})
        plain = httpx.post(url, json=GOOD, headers={"X-Request-Id": "plain-1"})
        assert (bad.status_code, missing.status_code, asked.status_code, plain.status_code) == (400, 404, 200, 200)
    finally:
        assert srv.terminate() == 0
    records = logged_records(srv.output())
    assert records["bad-1"]["status"] == 400 and records["bad-1"]["bytes_in"] == len(bad_body)
    assert records["bad-1"]["model"] == "versioned"
    assert records["missing-1"]["status"] == 404 and records["missing-1"]["model"] == "(unknown)"
    assert records["missing-1"]["bytes_in"] == 0  # refused before its body was read
    returned = asked.json()["parameters"]["metering"]
    assert returned["request_id"] == "show-1" and returned["bytes_out"] == len(asked.content)
    assert_same_record(returned, records["show-1"])
    assert records["plain-1"]["bytes_out"] == len(plain.content)


def test_lambda_http_records_carry_the_client_id(repo: Path, tmp_path: Path) -> None:
    env = {"OCLAW_MODEL_REPOSITORY": str(repo), "OCLAW_METERING_SINKS": "log"}
    v2 = event("apigw_v2_infer.json")
    v2["headers"]["X-Request-Id"] = "v2-id-1"  # header names in any case
    v2_bad = copy.deepcopy(v2)
    v2_bad["headers"]["X-Request-Id"] = "v2-bad-1"
    v2_bad["body"] = v2_bad["body"].replace('"shape":[1,16]', '"shape":[1,15]', 1)
    v1 = event("apigw_v1_infer.json")  # REST API: the multi-value headers are read
    v1["multiValueHeaders"]["X-REQUEST-ID"] = ["v1-id-1"]
    v1["headers"]["X-REQUEST-ID"] = "v1-id-1"
    asked = event("apigw_v2_infer.json")
    asked["headers"]["x-request-id"] = "v2-show-1"
    asked["body"] = json.dumps({**json.loads(asked["body"]), "parameters": {"metering": True}})
    direct = event("direct_infer.json") | {"parameters": {"metering": True}}
    with LocalLambda(env=env, cwd=ROOT, log=tmp_path / "log") as fn:
        fn.wait_init()
        answers = [fn.invoke(e).json() for e in (v2, v2_bad, v1, asked)]
        shown = fn.invoke(direct)
        anonymous = fn.invoke(event("alb_infer.json"))
        direct_bad = event("direct_infer.json")
        direct_bad["inputs"][0]["shape"] = [1, 15]
        refused = fn.invoke(direct_bad)
    assert [a["statusCode"] for a in answers] == [200, 400, 200, 200]
    records = logged_records((tmp_path / "log").read_text())
    assert records["v2-id-1"]["source"] == "lambda-http" and records["v2-id-1"]["status"] == 200
    assert records["v2-bad-1"]["status"] == 400 and records["v2-bad-1"]["bytes_in"] == len(v2_bad["body"])
    assert records["v1-id-1"]["status"] == 200
    assert anonymous.request_id in records  # no X-Request-Id: the Lambda request id
    returned = json.loads(answers[3]["body"])["parameters"]["metering"]
    assert returned["bytes_out"] == len(answers[3]["body"])
    assert_same_record(returned, records["v2-show-1"])
    assert refused.json()["status"] == 400
    # a failed direct invoke is metered too, under its Lambda request id
    assert records[refused.request_id]["status"] == 400 and records[refused.request_id]["source"] == "lambda-direct"
    direct_record = shown.json()["parameters"]["metering"]
    assert direct_record["request_id"] == shown.request_id
    assert_same_record(direct_record, records[shown.request_id])
