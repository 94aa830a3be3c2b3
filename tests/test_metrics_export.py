"""Metrics derived from metering records: Prometheus on the server, CloudWatch EMF on Lambda."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from engine.config import Settings
from engine.metering.records import MeteringRecord, Usage
from tests.conftest import start_server
from tests.meterkit import meter


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
            answer = httpx.post(f"{srv.url}/v2/models/versioned/infer", json=body)
            assert answer.status_code == 200 and "oclaw-metering" not in answer.headers  # metrics only: no header
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
    # the pool's own metrics: loads, memory held, and where each loaded version runs
    assert samples[("oclaw_model_loads_total", (("model", "versioned"),))] >= 1
    assert samples[("oclaw_model_memory_bytes", (("model", "versioned"),))] > 0
    assert samples[("oclaw_model_instances", (("device", "cpu"), ("model", "versioned"), ("version", "2")))] == 1


def test_prometheus_batch_updates_equal_prometheus_client_per_record(repo: Path) -> None:
    """The per-flush numpy aggregation gives exactly what prometheus-client's own metrics give record by record."""
    import random

    from prometheus_client import CollectorRegistry, Counter, Histogram, Summary, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from engine.metering.metrics import BATCH_BUCKETS, BUCKETS, PrometheusSink
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

    from engine.metering.sinks import EmfSink

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
