"""Structured logs: one JSON object per line with the request, correlation and trace ids."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from engine import logs
from handler.local_lambda import LocalLambda
from tests.conftest import ROOT
from tests.modelgen import _save
from tests.realmodels import unwarmable


def test_json_lines_carry_the_request_context(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("oclaw.test-logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    monkeypatch.setenv("_X_AMZN_TRACE_ID", "Root=1-65f0c0de-0b1c2d3e4f5a6b7c8d9e0f1a;Parent=abc;Sampled=1")
    tokens = (logs.request_id.set("req-1"), logs.correlation_id.set("corr-9"), logs.cold_start.set(True))
    try:
        logger.warning("model %s slow", "mlp", extra={"oclaw": {"elapsed_ms": 12.5}})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        for var, token in zip((logs.request_id, logs.correlation_id, logs.cold_start), tokens, strict=True):
            var.reset(token)
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["level"] == "WARNING" and first["message"] == "model mlp slow" and first["elapsed_ms"] == 12.5
    assert first["function_request_id"] == "req-1" and first["correlation_id"] == "corr-9"
    assert first["cold_start"] is True and first["xray_trace_id"] == "1-65f0c0de-0b1c2d3e4f5a6b7c8d9e0f1a"
    assert first["timestamp"].endswith("Z") and first["service"] == "oclaw"
    assert "ValueError: boom" in second["exception"]
    assert logs.find_event('noise\nINFO x {"event": "cold_start", "a": 1}\n', "cold_start") == {
        "event": "cold_start",
        "a": 1,
    }


def test_lambda_logs_are_json_with_the_invocation_ids(repo: Path, tmp_path: Path) -> None:
    log = tmp_path / "log"
    records = [
        {
            "messageId": "msg-77",
            "eventSource": "aws:sqs",
            "attributes": {},
            "body": json.dumps({"model_name": "nope", "inputs": []}),
        }
    ]
    with LocalLambda(env={"OCLAW_MODEL_REPOSITORY": str(repo)}, cwd=ROOT, log=log) as fn:
        fn.wait_init()
        result = fn.invoke({"Records": records})  # the record fails: oclaw.sqs logs a warning
    assert result.json() == {"batchItemFailures": [{"itemIdentifier": "msg-77"}]}
    warnings = [
        json.loads(line)
        for line in log.read_text().splitlines()
        if line.startswith("{") and '"level":"WARNING"' in line
    ]
    assert warnings, log.read_text()
    line = warnings[0]
    assert line["logger"] == "oclaw.sqs" and "msg-77" in line["message"]
    assert line["function_request_id"] == result.request_id and line["correlation_id"] == "msg-77"
    assert line["cold_start"] is True


def test_text_format_appends_the_fields() -> None:
    record = logging.LogRecord("oclaw.x", logging.INFO, __file__, 1, "cold_start", None, None)
    record.oclaw = {"event": "cold_start", "ready": True}
    assert logs.TextFormatter().format(record).endswith('cold_start {"event":"cold_start","ready":true}')


def test_tracing_sends_xray_subsegments_to_the_daemon(repo: Path, tmp_path: Path) -> None:
    """OCLAW_TRACING: Powertools Tracer's segments reach a UDP X-Ray daemon listening on loopback."""
    import socket

    daemon = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    daemon.bind(("127.0.0.1", 0))
    daemon.settimeout(10)
    port = daemon.getsockname()[1]
    env = {
        "OCLAW_MODEL_REPOSITORY": str(repo),
        "OCLAW_TRACING": "true",
        "LAMBDA_TASK_ROOT": str(ROOT),
        "AWS_XRAY_DAEMON_ADDRESS": f"127.0.0.1:{port}",
        "AWS_XRAY_CONTEXT_MISSING": "LOG_ERROR",
    }
    event = json.loads((Path(__file__).parent / "events" / "direct_infer.json").read_text())
    try:
        with LocalLambda(env=env, cwd=ROOT, trace_sampled=True, log=tmp_path / "log") as fn:
            fn.wait_init()
            assert fn.invoke(event).json()["model_name"] == "add_sub"
            documents: list[dict[str, object]] = []
            while not any(d.get("annotations") for d in documents) and len(documents) < 10:
                header, _, body = daemon.recv(65536).decode().partition("\n")
                assert json.loads(header) == {"format": "json", "version": 1}
                documents.append(json.loads(body))
    finally:
        daemon.close()
    by_name = {str(d["name"]): d for d in documents}
    handler = next(d for d in documents if d.get("annotations"))
    assert handler["annotations"] == {"ColdStart": True, "Service": "oclaw", "source": "direct"}
    dispatch = by_name["## oclaw dispatch"]
    assert dispatch["parent_id"] == handler["id"] and dispatch["trace_id"] == handler["trace_id"]
    assert str(handler["trace_id"]).startswith("1-")


def test_opentelemetry_spans_for_server_requests(repo: Path) -> None:
    """OCLAW_OTEL: one server span per request, infer attributes on it, in the process's tracer provider."""
    import httpx
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from tests.conftest import start_server

    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):  # the first test to need one sets it (it can be set once)
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    srv = start_server(repo, otel=True)
    try:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": [0.0] * 8}]}
        resp = httpx.post(f"{srv.url}/v2/models/versioned/infer", json=body, headers={"x-request-id": "otel-1"})
        assert resp.status_code == 200
        assert httpx.get(f"{srv.url}/v2/health/ready").status_code == 200
    finally:
        srv.stop()
    spans = [s for s in exporter.get_finished_spans() if s.kind == trace.SpanKind.SERVER]
    infer = next(s for s in spans if s.attributes and s.attributes.get("oclaw.request_id") == "otel-1")
    assert infer.attributes is not None
    assert infer.attributes["oclaw.model"] == "versioned" and infer.attributes["oclaw.rows"] == 2
    assert (
        infer.attributes[
            "http.response.status_code" if "http.response.status_code" in infer.attributes else "http.status_code"
        ]
        == 200
    )
    assert len(spans) >= 2


def test_onnxruntime_errors_leave_the_json_log_stream_whole(tmp_path: Path) -> None:
    """A warm-up and a request that onnxruntime rejects: every line the function writes is still one JSON object."""
    repo = tmp_path / "repo"
    _save(unwarmable(), repo, "m")
    log = tmp_path / "log"
    # provisioned concurrency: INIT warms the model up (an on-demand INIT leaves that to the first request)
    env = {
        "OCLAW_MODEL_REPOSITORY": str(repo),
        "OCLAW_LOG_FORMAT": "json",
        "AWS_LAMBDA_INITIALIZATION_TYPE": "provisioned-concurrency",
    }
    with LocalLambda(env=env, cwd=ROOT, log=log) as fn:
        fn.wait_init()
        bad = {"model_name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [5], "data": [0.0] * 5}]}
        answer = fn.invoke(bad).json()  # Reshape of 5 elements to [7, 11] fails in onnxruntime
        good = {"model_name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [77], "data": [1.0] * 77}]}
        assert fn.invoke(good).json()["outputs"][0]["shape"] == [7, 11]
    assert "could not run this input" in json.dumps(answer)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert all(line.startswith("{") and isinstance(json.loads(line), dict) for line in lines), log.read_text()
    warning = logs.find_event(log.read_text(), "warmup_failed")
    assert warning is not None and warning["level"] == "WARNING" and warning["model"] == "m"
    assert "Reshape" in warning["message"]
    cold = logs.find_event(log.read_text(), "cold_start")  # the cold-start record carries the warning too
    assert cold is not None and "Reshape" in cold["models"]["m/1"]["warmup_error"]
