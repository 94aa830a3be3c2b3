"""Metering: exact bills, parts that add up, sinks that fail without losing records, every serving path."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from engine.config import Settings
from engine.metering import PRICES, Meter, MeteringRecord, Usage, aggregate, parse_header, split_evenly
from engine.sinks import PartialFailure
from handler.local_lambda import LocalLambda
from tests.conftest import ROOT, start_server

EVENTS = Path(__file__).parent / "events"
CALLS: list[int] = []


def flaky_sink(records: Sequence[MeteringRecord]) -> None:
    """A callback sink that is down while CALLS holds a negative number."""
    if CALLS and CALLS[-1] < 0:
        CALLS.append(-1)
        raise ConnectionError("sink down")
    CALLS.append(len(records))


def meter(tmp_path: Path, platform: str, **overrides: Any) -> Meter:
    settings = Settings.from_env({}, metering_spool=str(tmp_path / "spool.jsonl"), **overrides)
    return Meter(settings, "inst", platform_name=platform)


def one(
    m: Meter, *, total_ms: float, compute_ms: float = 1.0, init_ms: float = 0.0, cold: bool = False
) -> MeteringRecord:
    (record,) = m.records(
        request_ids=["r"],
        tenants=["t"],
        model="m",
        version="1",
        items=[1],
        bytes_in=[10],
        bytes_out=[20],
        statuses=[200],
        queue_ms=[0.0],
        compute_ms=compute_ms,
        total_ms=total_ms,
        init_ms=init_ms,
        cold=cold,
        source="test",
    )
    return record


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


def test_a_failing_sink_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    out = tmp_path / "records.jsonl"
    m = meter(tmp_path, "local", metering_sinks=(f"jsonl:{out}", "callback:tests.test_metering:flaky_sink"))
    CALLS[:] = [-1]  # the callback sink is down
    m.submit([one(m, total_ms=1) for _ in range(3)])
    m.flush()
    assert m.failures == 3 and m.spooled == 3
    assert len(out.read_text().splitlines()) == 3  # the healthy sink got them once
    CALLS[:] = []  # back up
    m.submit([one(m, total_ms=1)])
    m.flush()
    assert CALLS == [4]  # the 3 spooled + the new one
    assert len(out.read_text().splitlines()) == 4  # not 7: the healthy sink never sees a record twice
    assert not list(tmp_path.glob("spool.jsonl*"))
    with pytest.raises(ValueError, match="unknown metering sink"):
        meter(tmp_path, "local", metering_sinks=("carrier-pigeon",))


def test_server_requests_carry_their_figures_and_records(repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "server.jsonl"
    srv = start_server(repo, metering_sinks=(f"jsonl:{out}",))
    try:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": [0.0] * 8}]}
        first = httpx.post(f"{srv.url}/v2/models/versioned/infer", json=body, headers={"x-tenant-id": "acme"})
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
    assert records[0]["request_id"] == figures["request_id"]
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


class RefusesOnce:
    """A sink whose batch API refuses the even-numbered records once (what SQS/Kinesis batch calls can do)."""

    seen: ClassVar[list[str]] = []
    refused: ClassVar[set[str]] = set()

    def emit(self, records: Sequence[MeteringRecord]) -> None:
        failed = [r for r in records if int(r.request_id) % 2 == 0 and r.request_id not in self.refused]
        self.refused.update(r.request_id for r in failed)
        self.seen.extend(r.request_id for r in records if r not in failed)
        if failed:
            raise PartialFailure(f"refused {len(failed)}", failed)


def test_only_refused_records_are_retried(tmp_path: Path) -> None:
    m = meter(tmp_path, "local", metering_sinks=("class:tests.test_metering:RefusesOnce",))
    records = m.records(
        request_ids=[str(i) for i in range(6)],
        tenants=["t"] * 6,
        model="m",
        version="1",
        items=[1] * 6,
        bytes_in=[1] * 6,
        bytes_out=[1] * 6,
        statuses=[200] * 6,
        queue_ms=[0.0] * 6,
        compute_ms=6,
        total_ms=6,
        source="test",
    )
    m.submit(records)
    m.flush()
    assert sorted(RefusesOnce.seen, key=int) == [str(i) for i in range(6)]  # each exactly once
    assert m.failures == 1 and m.spooled == 0


def test_queue_sinks_deliver_batches_over_real_http(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3
    from moto.server import ThreadedMotoServer

    from engine import aws

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        for key, value in {
            "AWS_ACCESS_KEY_ID": "x",
            "AWS_SECRET_ACCESS_KEY": "x",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": url,
        }.items():
            monkeypatch.setenv(key, value)
        aws.reset()
        sqs = boto3.client("sqs")
        queue = sqs.create_queue(QueueName="metering")["QueueUrl"]
        kinesis = boto3.client("kinesis")
        kinesis.create_stream(StreamName="metering", ShardCount=1)
        m = meter(tmp_path, "local", metering_sinks=(f"sqs:{queue}", "kinesis:metering"))
        n = 23  # three SQS batches (10 a call)
        m.submit(
            m.records(
                request_ids=[f"r{i}" for i in range(n)],
                tenants=["t"] * n,
                model="m",
                version="1",
                items=[1] * n,
                bytes_in=[1] * n,
                bytes_out=[1] * n,
                statuses=[200] * n,
                queue_ms=[0.0] * n,
                compute_ms=1,
                total_ms=n,
                source="test",
            )
        )
        m.flush()
        assert m.failures == 0
        got: list[str] = []
        while batch := sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10).get("Messages", []):
            got += [json.loads(msg["Body"])["request_id"] for msg in batch]
            for msg in batch:
                sqs.delete_message(QueueUrl=queue, ReceiptHandle=msg["ReceiptHandle"])
        assert sorted(got) == sorted(f"r{i}" for i in range(n))
        shard = kinesis.describe_stream(StreamName="metering")["StreamDescription"]["Shards"][0]["ShardId"]
        iterator = kinesis.get_shard_iterator(StreamName="metering", ShardId=shard, ShardIteratorType="TRIM_HORIZON")[
            "ShardIterator"
        ]
        data = kinesis.get_records(ShardIterator=iterator)["Records"]
        assert sorted(json.loads(r["Data"])["request_id"] for r in data) == sorted(f"r{i}" for i in range(n))
        sqs.close()
        kinesis.close()
    finally:
        aws.reset()
        server.stop()


def test_emf_lines_follow_the_embedded_metric_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = meter(tmp_path, "local", metering_sinks=("emf",))
    for model, status in (("m1", 200), ("m1", 400), ("m2", 200)):
        (record,) = m.records(
            request_ids=["r"],
            tenants=["t"],
            model=model,
            version="1",
            items=[3],
            bytes_in=[1],
            bytes_out=[1],
            statuses=[status],
            queue_ms=[0.0],
            compute_ms=2.0,
            total_ms=4.0,
            source="test",
        )
        m.submit([record])
    m.flush()
    blobs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(blobs) == 2
    for blob in blobs:  # https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/CloudWatch_Embedded_Metric_Format_Specification.html
        meta = blob["_aws"]
        assert isinstance(meta["Timestamp"], int)
        (directive,) = meta["CloudWatchMetrics"]
        assert directive["Namespace"] == "oclaw"
        assert all(all(isinstance(blob[d], str) for d in dims) for dims in directive["Dimensions"])
        assert len(directive["Metrics"]) <= 100 and all(len(d) <= 30 for d in directive["Dimensions"])
        for metric in directive["Metrics"]:
            value = blob[metric["Name"]]
            assert all(isinstance(v, int | float) for v in (value if isinstance(value, list) else [value]))
    m1 = next(b for b in blobs if b["model"] == "m1")
    assert m1["Requests"] == [2.0] and m1["Failures"] == [1.0] and m1["Items"] == [6.0] and m1["ComputeMs"] == [4.0]
    assert m1["LatencyMs"] == [4.0, 4.0]


def test_prometheus_metrics_parse_and_count(repo: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    srv = start_server(repo, metering_sinks=("none",))
    try:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 4], "data": [0.0] * 12}]}
        for _ in range(4):
            assert httpx.post(f"{srv.url}/v2/models/versioned/infer", json=body).status_code == 200
        bad = httpx.post(f"{srv.url}/v2/models/versioned/infer", json={"inputs": []})
        assert bad.status_code == 400
        for name in ("nope-1", "nope-2"):  # unknown names must not become label values
            assert httpx.post(f"{srv.url}/v2/models/{name}/infer", json=body).status_code == 404
        text = httpx.get(f"{srv.url}/metrics").text
    finally:
        srv.stop()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    ok = (("model", "versioned"), ("status", "200"), ("version", "2"))
    assert samples[("oclaw_requests_total", ok)] == 4
    assert samples[("oclaw_requests_total", (("model", "versioned"), ("status", "400"), ("version", "")))] == 1
    assert samples[("oclaw_inference_items_total", (("model", "versioned"), ("version", "2")))] == 12
    hist = (("model", "versioned"), ("version", "2"))
    assert samples[("oclaw_request_duration_seconds_count", hist)] == 4
    assert samples[("oclaw_batch_size_bucket", (("le", "4.0"), *hist))] == 4  # three rows each
    assert samples[("oclaw_cold_starts_total", ())] == 1
    assert samples[("oclaw_model_ready", (("model", "versioned"),))] == 1
    assert samples[("process_resident_memory_bytes", ())] > 10e6
    assert ("oclaw_in_flight_requests", ()) in samples
    assert samples[("oclaw_requests_total", (("model", "(unknown)"), ("status", "404"), ("version", "")))] == 2
    assert not any(dict(labels).get("model", "").startswith("nope") for _, labels in samples)


def test_v2_response_parameters_carry_the_record_when_asked(repo: Path) -> None:
    srv = start_server(repo, metering_sinks=("none",))
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
    assert record["request_id"] == figures["request_id"] and record["compute_ms"] == figures["compute_ms"]
    assert "parameters" not in plain.json()


def test_model_labels_are_never_client_chosen() -> None:
    from engine.metering import UNKNOWN_MODEL, model_label

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
    from handler.v2 import finish, metering_headers

    m = meter(tmp_path, "local", metering_sinks=("jsonl:" + str(tmp_path / "m.jsonl"),))
    usage = Usage(request_id, "t", "m", "1", 1, 10, 20, 0, 1250, 2500, 0.0, True, "test", 1_790_000_000)

    class Runtime:
        meter = m

    ((name, value),) = metering_headers(Runtime, usage)  # type: ignore[arg-type]
    assert name == b"oclaw-metering" and value.isascii() and b"\n" not in value
    parsed = parse_header(value.decode())
    expected = "".join(c if " " <= c <= "~" else "?" for c in request_id)
    assert parsed == {"compute_ms": 1.25, "billed_ms": 3.0, "cold": True, "request_id": expected}

    assert finish(Runtime, usage) == {"oclaw-metering": value.decode()}  # type: ignore[arg-type]
    m.flush()
    (line,) = (tmp_path / "m.jsonl").read_text().splitlines()  # queued by finish, completed at flush
    record = json.loads(line)
    assert record["request_id"] == request_id and record["compute_ms"] == 1.25 and record["billed_ms"] == 3.0
    assert record["bytes_out"] == 20 and record["cold"] is True and len(m._usage) == 0


def test_prometheus_batch_updates_equal_prometheus_client_per_record(repo: Path) -> None:
    """The per-flush numpy aggregation gives exactly what prometheus-client's own metrics give record by record."""
    import random

    from prometheus_client import CollectorRegistry, Counter, Histogram, Summary, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from engine.metrics import BATCH_BUCKETS, BUCKETS, PrometheusSink
    from engine.runtime import Runtime

    runtime = Runtime(Settings.from_env({}, model_repository=str(repo), preload=()))
    sink = PrometheusSink(runtime, lambda: 0)
    rng = random.Random(5)
    edges = [b * 1000 for b in BUCKETS]  # values exactly on a bucket bound belong to that bucket (le)
    records = []
    for i in range(700):
        status = rng.choice([200, 200, 200, 400, 404, 503])
        total = rng.choice([*edges, rng.uniform(0, 12_000), 0.0])
        records.append(
            MeteringRecord(
                f"r{i}",
                "t",
                "t",
                rng.choice(["a", "b"]),
                rng.choice(["1", "2"]),
                "local",
                "i",
                rng.random() < 0.1,
                rng.choice([0, 1, 2, 3, 4, 5, 64, 65, 300]),
                1,
                1,
                rng.uniform(0, 5),
                rng.uniform(0, 50),
                total,
                float(rng.randint(0, 13_000)),
                0.0,
                0.0,
                0.0,
                rng.uniform(0, 1e-4),
                status,
                "http",
            )
        )
    for start in (0, 1, 350, 351, 700):  # several flushes of uneven sizes, an empty one among them
        sink.emit(records[start : start + 349] if start < 700 else [])

    ref = CollectorRegistry()
    labels = ("model", "version")
    requests = Counter("oclaw_requests", "", (*labels, "status"), registry=ref)
    items = Counter("oclaw_inference_items", "", labels, registry=ref)
    latency = Histogram("oclaw_request_duration_seconds", "", labels, buckets=BUCKETS, registry=ref)
    queue = Summary("oclaw_queue_duration_seconds", "", labels, registry=ref)
    compute = Summary("oclaw_compute_duration_seconds", "", labels, registry=ref)
    batch = Histogram("oclaw_batch_size", "", labels, buckets=BATCH_BUCKETS, registry=ref)
    cost = Counter("oclaw_billed_cost_usd", "", ("model",), registry=ref)
    billed = Counter("oclaw_billed_seconds", "", ("model",), registry=ref)
    cold = Counter("oclaw_cold_starts", "", registry=ref)
    emitted = records[0:349] + records[1:350] + records[350:699] + records[351:700]
    for r in emitted:
        requests.labels(r.model, r.version, str(r.status)).inc()
        if r.status < 400:
            items.labels(r.model, r.version).inc(r.items)
            latency.labels(r.model, r.version).observe(r.total_ms / 1000)
            queue.labels(r.model, r.version).observe(r.queue_ms / 1000)
            compute.labels(r.model, r.version).observe(r.compute_ms / 1000)
            batch.labels(r.model, r.version).observe(r.items)
        cost.labels(r.model).inc(r.cost_usd)
        billed.labels(r.model).inc(r.billed_ms / 1000)
        cold.inc(r.cold)

    def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name.startswith("oclaw_") and not s.name.endswith("_created")
        }

    want = samples(generate_latest(ref).decode())
    got = {
        k: v
        for k, v in samples(sink.exposition().decode()).items()
        if k[0].split("_")[1] in {"requests", "inference", "request", "queue", "compute", "batch", "billed", "cold"}
    }
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    runtime.close()


def test_emf_lines_equal_what_powertools_metrics_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The EMF sink serialises directly; Powertools Metrics is the reference for the same figures."""
    from aws_lambda_powertools.metrics import Metrics, MetricUnit

    from engine.sinks import EmfSink

    m = meter(tmp_path, "lambda", metering_sinks=("none",))
    usages = [
        Usage(
            f"r{i}",
            "t",
            "m1" if i % 3 else "m2",
            "1",
            i % 4,
            10,
            20,
            5,
            30 + i,
            400 + 7 * i,
            0.0,
            i == 0,
            "test",
            1_790_000_000,
            200 if i % 5 else 503,
        )
        for i in range(130)  # m1 gets more than 100 latency values: the blob keeps 100
    ]
    records = [m.complete(u) for u in usages]
    EmfSink("oclaw").emit(records)
    ours = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for model in ("m1", "m2"):
        group = [r for r in records if r.model == model]
        metrics = Metrics(namespace="oclaw", service="oclaw")
        metrics.add_dimension(name="model", value=model)
        figures = [
            ("Requests", MetricUnit.Count, len(group)),
            ("Items", MetricUnit.Count, sum(r.items for r in group)),
            ("Failures", MetricUnit.Count, sum(r.status >= 400 for r in group)),
            ("ComputeMs", MetricUnit.Milliseconds, sum(r.compute_ms for r in group)),
            ("BilledMs", MetricUnit.Milliseconds, sum(r.billed_ms for r in group)),
            ("CostUSD", MetricUnit.NoUnit, sum(r.cost_usd for r in group)),
            ("ColdStarts", MetricUnit.Count, sum(r.cold for r in group)),
        ]
        for name, unit, value in figures:
            metrics.add_metric(name=name, unit=unit, value=value)
        for r in group[:100]:
            metrics.add_metric(name="LatencyMs", unit=MetricUnit.Milliseconds, value=r.total_ms)
        metrics.flush_metrics()
        (reference,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        (mine,) = [blob for blob in ours if blob["model"] == model]
        for blob in (reference, mine):
            blob["_aws"]["Timestamp"] = 0
        assert mine == reference
