"""Metering: exact bills, parts that add up, usage totals, the header and records of every serving path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from engine.metering.records import PRICES, MeteringRecord, Usage, aggregate, parse_header, split_evenly
from handler.local_lambda import LocalLambda
from tests.conftest import ROOT, start_server
from tests.meterkit import meter, one

EVENTS = Path(__file__).parent / "events"


def test_lambda_bill_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "2048")
    m = meter(tmp_path, "lambda")
    price = PRICES["lambda-x86_64"]
    warm = one(m, total_ms=99.2)
    assert warm.billed_ms == 100  # rounded up to the millisecond
    assert warm.gb_seconds == pytest.approx(0.1 * 2)
    assert warm.cost_usd == pytest.approx(0.2 * price.gb_second + price.request, rel=1e-12)
    cold = one(m, total_ms=10.0, init_ms=250.5, cold=True)
    assert cold.billed_ms == 10 + 251 and cold.cold  # INIT is billed and carried by the request that paid it
    overridden = one(meter(tmp_path, "lambda", price_gb_second=1.0, price_request=0.0), total_ms=1000)
    assert overridden.cost_usd == pytest.approx(2.0)


def test_cloud_run_bill_is_exact(tmp_path: Path) -> None:
    m = meter(tmp_path, "cloudrun", cloudrun_vcpu=2.0, cloudrun_memory_gib=4.0)
    record = one(m, total_ms=1499.5)
    price = PRICES["cloudrun-request"]
    assert record.billed_ms == 1500 and record.vcpu_seconds == pytest.approx(3.0)
    assert record.gib_seconds == pytest.approx(6.0) and record.gb_seconds == 0
    assert record.cost_usd == pytest.approx(3 * price.vcpu_second + 6 * price.gib_second + price.request, rel=1e-12)
    assert one(meter(tmp_path, "local"), total_ms=5).cost_usd == 0


@pytest.mark.parametrize(("total", "weights"), [(101.7, [1, 5, 2]), (0.9, [3, 3, 3]), (12345.678, [1] * 7)])
def test_parts_add_up_to_the_whole(tmp_path: Path, total: float, weights: list[int]) -> None:
    assert sum(split_evenly(total, weights)) == pytest.approx(total, abs=1e-9)
    m = meter(tmp_path, "cloudrun")
    n = len(weights)
    records = m.records(
        request_ids=[str(i) for i in range(n)],
        tenants=["t"] * n,
        model="m",
        version="1",
        items=weights,
        bytes_in=[1] * n,
        bytes_out=[1] * n,
        statuses=[200] * n,
        queue_ms=[0.0] * n,
        compute_ms=total / 2,
        total_ms=total,
        source="test",
    )
    assert sum(r.billed_ms for r in records) == pytest.approx(float(-(-total // 1)), abs=1e-9)
    assert sum(r.compute_ms for r in records) == pytest.approx(total / 2, abs=1e-6)
    assert sum(r.total_ms for r in records) == pytest.approx(total, abs=1e-6)
    assert records[0].items == weights[0]


def test_server_requests_carry_their_figures_and_records(repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "server.jsonl"
    srv = start_server(repo, metering_sinks=(f"jsonl:{out}",))
    try:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": [0.0] * 8}]}
        first = httpx.post(
            f"{srv.url}/v2/models/versioned/infer", json=body, headers={"x-tenant-id": "acme", "x-request-id": "acme-1"}
        )
        second = httpx.post(f"{srv.url}/v2/models/versioned/infer", json=body)
        figures, again = (parse_header(r.headers["oclaw-metering"]) for r in (first, second))
        assert figures["cold"] is True and again["cold"] is False
        assert figures["compute_ms"] > 0 and figures["billed_ms"] >= 1
        assert not any(h.startswith("oclaw-") and h != "oclaw-metering" for h in first.headers)  # one header
        srv.runtime.meter.flush()
    finally:
        srv.stop()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["tenant"], r["model"], r["items"], r["status"], r["source"]) for r in records] == [
        ("acme", "versioned", 2, 200, "http"),
        ("anonymous", "versioned", 2, 200, "http"),
    ]
    assert records[0]["request_id"] == "acme-1"  # the client's X-Request-Id ties the response to its record
    assert records[0]["compute_ms"] == figures["compute_ms"] and records[0]["billed_ms"] == figures["billed_ms"]
    assert records[0]["bytes_in"] > 0 and records[0]["bytes_out"] == len(first.content)


def test_lambda_paths_meter_every_request(repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "lambda.jsonl"
    env = {"OCLAW_MODEL_REPOSITORY": str(repo), "OCLAW_METERING_SINKS": f"jsonl:{out}"}
    http = json.loads((EVENTS / "apigw_v2_infer.json").read_text())
    http["requestContext"]["authorizer"] = {"jwt": {"claims": {"sub": "tenant-42"}, "scopes": []}}
    direct = json.loads((EVENTS / "direct_infer.json").read_text())
    sqs = {
        "Records": [
            {
                "messageId": f"m{i}",
                "eventSource": "aws:sqs",
                "attributes": {},
                "body": json.dumps({**direct, "tenant": "batchco", "reply_to": "s3://nowhere/x"}),
            }
            for i in range(3)
        ]
    }
    with LocalLambda(env=env, cwd=ROOT, memory_mb=1024, log=tmp_path / "log") as fn:
        fn.wait_init()
        r1 = fn.invoke(http).json()
        r2 = fn.invoke(direct)
        fn.invoke(sqs)  # delivery fails (no S3 here): every record is metered, with its status
    assert parse_header(r1["headers"]["oclaw-metering"])["cold"] is True
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by_source = {r["source"]: r for r in records}
    assert by_source["lambda-http"]["tenant"] == "tenant-42" and by_source["lambda-http"]["cold"] is True
    assert by_source["lambda-http"]["billed_ms"] > by_source["lambda-direct"]["billed_ms"]  # INIT was billed
    assert by_source["lambda-direct"]["request_id"] == r2.request_id
    assert by_source["lambda-http"]["gb_seconds"] == pytest.approx(by_source["lambda-http"]["billed_ms"] / 1000)
    sqs_records = [r for r in records if r["source"] == "sqs"]
    assert [r["request_id"] for r in sqs_records] == ["m0", "m1", "m2"]
    assert {r["tenant"] for r in sqs_records} == {"batchco"} and {r["status"] for r in sqs_records} == {400}


@pytest.mark.parametrize("metrics", ["true", "false"])
def test_lambda_metrics_are_on_by_oclaw_metrics_not_by_the_metering_sinks(
    repo: Path, tmp_path: Path, metrics: str
) -> None:
    """``OCLAW_METERING_SINKS=none`` turns records and header off; EMF metrics follow ``OCLAW_METRICS``."""
    env = {"OCLAW_MODEL_REPOSITORY": str(repo), "OCLAW_METERING_SINKS": "none", "OCLAW_METRICS": metrics}
    http = json.loads((EVENTS / "apigw_v2_infer.json").read_text())
    with LocalLambda(env=env, cwd=ROOT, memory_mb=1024, log=tmp_path / "log") as fn:
        fn.wait_init()
        answers = [fn.invoke(http).json() for _ in range(2)]
    assert all(a["statusCode"] == 200 and "oclaw-metering" not in a["headers"] for a in answers)
    lines = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines() if line.startswith("{")]
    assert not [line for line in lines if line.get("event") == "metering"]
    emf = [line for line in lines if "_aws" in line and line.get("model") == "add_sub"]
    assert [line["Requests"] for line in emf] == ([[1.0], [1.0]] if metrics == "true" else [])
    if emf:
        assert emf[0]["ColdStarts"] == [1.0] and emf[1]["ColdStarts"] == [0.0]


def test_usage_aggregates_records(tmp_path: Path) -> None:
    m = meter(tmp_path, "local")
    lines = []
    for tenant, model in (("a", "m1"), ("a", "m1"), ("b", "m2")):
        (record,) = m.records(
            request_ids=["r"],
            tenants=[tenant],
            model=model,
            version="1",
            items=[2],
            bytes_in=[1],
            bytes_out=[1],
            statuses=[200],
            queue_ms=[0.0],
            compute_ms=1.5,
            total_ms=3.2,
            source="test",
        )
        lines.append(json.dumps({"event": "metering", **record.as_dict()}))
    (tmp_path / "records.log").write_text("INFO starting\n" + "\n".join(f"INFO {x}" for x in lines) + "\n")
    rows = aggregate([json.loads(x) for x in lines], ["tenant"])
    assert [(r["tenant"], r["requests"], r["items"], r["billed_ms"]) for r in rows] == [
        ("a", 2, 4, 8.0),
        ("b", 1, 2, 4.0),
    ]
    out = subprocess.run(
        [sys.executable, "-m", "handler.cli", "usage", str(tmp_path / "records.log"), "--by", "tenant,model", "--csv"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert out.stdout.splitlines()[0].startswith("tenant,model,requests,items")
    assert out.stdout.splitlines()[1].startswith("a,m1,2,4")


def test_v2_response_parameters_carry_the_record_when_asked(repo: Path, tmp_path: Path) -> None:
    srv = start_server(repo, metering_sinks=(f"jsonl:{tmp_path / 'records.jsonl'}",))
    try:
        body = {
            "parameters": {"metering": True},
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0.0] * 4}],
        }
        resp = httpx.post(f"{srv.url}/v2/models/versioned/infer", json=body, headers={"x-tenant-id": "t9"})
        plain = httpx.post(f"{srv.url}/v2/models/versioned/infer", json={**body, "parameters": {}})
    finally:
        srv.stop()
    record = resp.json()["parameters"]["metering"]
    assert record["tenant"] == "t9" and record["model"] == "versioned" and record["items"] == 1
    figures = parse_header(resp.headers["oclaw-metering"])
    assert record["compute_ms"] == figures["compute_ms"] and record["billed_ms"] == figures["billed_ms"]
    assert "parameters" not in plain.json()


def test_model_labels_are_never_client_chosen() -> None:
    from engine.metering.records import UNKNOWN_MODEL, model_label

    assert model_label({"mlp": {}}, "mlp") == "mlp"
    assert model_label({"mlp": {}}, "x" * 100) == UNKNOWN_MODEL


def test_price_table_per_region(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1024")
    key = meter(tmp_path, "lambda").price_key()  # lambda-x86_64 or lambda-arm64, as this machine is
    table = tmp_path / "prices.json"
    table.write_text(
        json.dumps(
            {
                f"{key}@eu-west-1": {"gb_second": 1.0, "request": 0.0, "source": "eu"},
                key: {"gb_second": 2.0, "request": 0.0},
            }
        )
    )
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    eu = meter(tmp_path, "lambda", price_table=str(table))
    assert eu.price.source == "eu" and one(eu, total_ms=1000).cost_usd == pytest.approx(1.0)
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    assert one(meter(tmp_path, "lambda", price_table=str(table)), total_ms=1000).cost_usd == pytest.approx(2.0)
    overridden = meter(tmp_path, "lambda", price_table=str(table), price_gb_second=3.0)
    assert one(overridden, total_ms=1000).cost_usd == pytest.approx(3.0)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="OCLAW_PRICE_TABLE"):
        meter(tmp_path, "lambda", price_table=str(tmp_path / "bad.json"))


def test_single_request_path_agrees_with_the_batch_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1024")
    m = meter(tmp_path, "lambda")
    usage = Usage("r", "t", "m", "1", 3, 10, 0, 1500, 2345, 3001, 120.2, True, "test", 1_790_000_000)
    fast = m.complete(usage)
    (full,) = m.records(
        request_ids=["r"],
        tenants=["t"],
        model="m",
        version="1",
        items=[3],
        bytes_in=[10],
        bytes_out=[0],
        statuses=[200],
        queue_ms=[1.5],
        compute_ms=2.345,
        total_ms=3.001,
        init_ms=120.2,
        cold=True,
        source="test",
    )
    assert fast.billed_ms == 4 + 121 == m.billed_ms(usage)  # 3.001 ms and INIT's 120.2 ms, each rounded up
    assert parse_header(m.submit_usage(usage).decode())["billed_ms"] == 125  # the header bills INIT too
    assert fast.time == "2026-09-21T14:13:20Z"  # the second the request was served, not the flush's
    assert fast.as_dict() == {**full.as_dict(), "time": fast.time}


def test_record_dict_and_json_carry_every_field_in_order() -> None:
    from dataclasses import fields

    record = MeteringRecord(*(f"v{i}" for i in range(len(fields(MeteringRecord)))))  # type: ignore[arg-type]
    names = [f.name for f in fields(MeteringRecord)]
    assert list(record.as_dict()) == names and list(json.loads(record.json())) == names
    copy = record.as_dict()
    copy["tenant"] = "changed"
    assert record.tenant != "changed"  # a copy, not the record itself


@pytest.mark.parametrize(
    "request_id",
    ["i-3f2a-17", 'say "hi"', "back\\slash", "caf\u00e9\x07", ""],
)
def test_metering_header_is_one_structured_field(tmp_path: Path, request_id: str) -> None:
    m = meter(tmp_path, "local", metering_sinks=("jsonl:" + str(tmp_path / "m.jsonl"),))
    usage = Usage(request_id, "t", "m", "1", 1, 10, 20, 0, 1250, 2500, 0.0, True, "test", 1_790_000_000)

    value = m.submit_usage(usage)  # queued, and the request's header value
    assert value.isascii() and b"\n" not in value
    assert parse_header(value.decode()) == {"compute_ms": 1.25, "billed_ms": 3.0, "cold": True}
    for compute_us, total_us, cold in ((45, 180, False), (0, 1000, False), (1_000_001, 2_500_000, True)):
        again = m.submit_usage(usage._replace(compute_us=compute_us, total_us=total_us, cold=cold))
        assert parse_header(again.decode()) == {
            "compute_ms": compute_us / 1000,
            "billed_ms": float(-(-total_us // 1000)),
            "cold": cold,
        }
        assert again == m.submit_usage(usage._replace(compute_us=compute_us, total_us=total_us, cold=cold))
    m._usage.clear()
    m.submit_usage(usage)
    m.flush()
    (line,) = (tmp_path / "m.jsonl").read_text().splitlines()  # completed at flush
    record = json.loads(line)
    assert record["request_id"] == request_id and record["compute_ms"] == 1.25 and record["billed_ms"] == 3.0
    assert record["bytes_out"] == 20 and record["cold"] is True and len(m._usage) == 0
