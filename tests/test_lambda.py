"""The Lambda handler under the genuine awslambdaric, against the local Runtime API emulator."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient

from handler.local_lambda import LocalLambda
from tests.conftest import ROOT

EVENTS = Path(__file__).parent / "events"
EXPECTED_SUM = [float(i + 2) for i in range(16)]
EXPECTED_DIFF = [float(i) for i in range(16)]


def event(name: str) -> dict[str, Any]:
    return dict(json.loads((EVENTS / name).read_text()))


def start(repo: Path, tmp_path: Path, **kwargs: Any) -> LocalLambda:
    env = {"OCLAW_MODEL_REPOSITORY": str(repo), **kwargs.pop("env", {})}
    return LocalLambda(env=env, cwd=ROOT, log=tmp_path / "lambda.log", **kwargs).start()


@pytest.fixture(scope="module")
def fn(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalLambda]:
    lam = start(repo, tmp_path_factory.mktemp("lambda"))
    lam.wait_init()
    yield lam
    lam.stop()


def outputs(body: str) -> dict[str, list[float]]:
    return {o["name"]: o["data"] for o in json.loads(body)["outputs"]}


def test_init_once_then_many_invocations(fn: LocalLambda) -> None:
    pings = [fn.invoke({"oclaw": "warm"}).json() for _ in range(3)]
    ids = {p["instance_id"] for p in pings}
    assert len(ids) == 1  # one process, INIT once
    assert pings[0]["cold"] is True and pings[1]["cold"] is False and pings[2]["cold"] is False
    assert "add_sub/1" in pings[0]["models_warmed"] and "mlp/1" in pings[0]["models_warmed"]
    assert fn.proc is not None and fn.proc.poll() is None


@pytest.mark.parametrize(
    "sample", ["apigw_v1_infer.json", "apigw_v2_infer.json", "function_url_infer.json", "alb_infer.json"]
)
def test_http_events_infer(fn: LocalLambda, sample: str) -> None:
    result = fn.invoke(event(sample))
    assert result.error is None, result.error
    resp = result.json()
    assert resp["statusCode"] == 200 and resp["isBase64Encoded"] is False
    assert outputs(resp["body"]) == {"OUTPUT0": EXPECTED_SUM, "OUTPUT1": EXPECTED_DIFF}
    headers = resp.get("headers") or {k: v[0] for k, v in resp["multiValueHeaders"].items()}
    assert headers["content-type"] == "application/json"
    if sample.startswith("alb"):
        assert resp["statusDescription"] == "200 OK"


def test_alb_multi_value_headers_are_answered_in_kind(fn: LocalLambda) -> None:
    resp = fn.invoke(event("alb_multivalue_ready.json")).json()
    assert resp["statusCode"] == 200 and json.loads(resp["body"]) == {"ready": True}
    assert resp["multiValueHeaders"]["content-type"] == ["application/json"]


def test_tritonclient_binary_request_in_an_api_gateway_v2_event(fn: LocalLambda) -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 16)).astype(np.float32), rng.standard_normal((2, 16)).astype(np.float32)
    inputs = [httpclient.InferInput("INPUT0", [2, 16], "FP32"), httpclient.InferInput("INPUT1", [2, 16], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    body, header_length = httpclient.InferenceServerClient.generate_request_body(inputs)
    ev = event("apigw_v2_infer.json")
    ev["headers"] = {"content-type": "application/octet-stream", "inference-header-content-length": str(header_length)}
    ev["body"] = base64.b64encode(body).decode()
    ev["isBase64Encoded"] = True
    resp = fn.invoke(ev).json()
    assert resp["statusCode"] == 200 and resp["isBase64Encoded"] is True
    raw = base64.b64decode(resp["body"])
    length = int(resp["headers"]["inference-header-content-length"])
    result = httpclient.InferResult.from_response_body(raw, header_length=length)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_bad_input_is_a_4xx_and_the_runtime_keeps_serving(fn: LocalLambda) -> None:
    ev = event("apigw_v2_infer.json")
    ev["body"] = '{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": [1]}]}'
    resp = fn.invoke(ev).json()
    assert resp["statusCode"] == 400 and "needs 16 elements" in json.loads(resp["body"])["error"]
    ev["rawPath"] = "/v2/models/nope/infer"
    assert fn.invoke(ev).json()["statusCode"] == 404
    assert fn.invoke(event("apigw_v2_infer.json")).json()["statusCode"] == 200


def test_body_over_the_lambda_limit_is_413_naming_the_limit(fn: LocalLambda) -> None:
    ev = event("apigw_v2_infer.json")
    ev["body"] = base64.b64encode(b"\0" * (6 * 1024 * 1024 + 1024)).decode()
    ev["isBase64Encoded"] = True
    resp = fn.invoke(ev).json()
    assert resp["statusCode"] == 413
    assert "Lambda limit of 6291456 bytes" in json.loads(resp["body"])["error"]


def test_other_routes_go_through_mangum_and_fastapi(fn: LocalLambda) -> None:
    ev = event("apigw_v2_infer.json")
    ev["rawPath"] = ev["requestContext"]["http"]["path"] = "/v2/models/add_sub/stats"
    ev["requestContext"]["http"]["method"] = "GET"
    ev.pop("body")
    resp = fn.invoke(ev).json()
    assert resp["statusCode"] == 200
    stats = json.loads(resp["body"])["model_stats"][0]
    assert stats["name"] == "add_sub" and stats["inference_count"] >= 1
    ev["rawPath"] = ev["requestContext"]["http"]["path"] = "/v2/repository/index"
    ev["requestContext"]["http"]["method"] = "POST"
    resp = fn.invoke(ev).json()
    assert resp["statusCode"] == 200 and {"name": "mlp", "version": "1", "state": "READY", "reason": ""} in json.loads(
        resp["body"]
    )


def test_direct_invoke(fn: LocalLambda) -> None:
    resp = fn.invoke(event("direct_infer.json")).json()
    assert resp["model_name"] == "add_sub" and resp["id"] == "direct-1"
    assert outputs(json.dumps(resp)) == {"OUTPUT0": EXPECTED_SUM, "OUTPUT1": EXPECTED_DIFF}
    bad = copy.deepcopy(event("direct_infer.json"))
    bad["inputs"][0]["datatype"] = "INT32"
    answer = fn.invoke(bad).json()
    assert answer["status"] == 400 and "expected datatype FP32" in answer["error"]


def test_unsupported_event_is_a_clear_error_and_nothing_crashes(fn: LocalLambda) -> None:
    result = fn.invoke({"Records": [{"eventSource": "aws:kinesis"}]})
    assert result.error is not None and result.error["errorType"] == "UnsupportedEvent"
    assert "API Gateway" in result.error["errorMessage"] and "oclaw" in result.error["errorMessage"]
    assert fn.invoke({"oclaw": "warm"}).error is None


def test_report_line_has_lambda_fields(fn: LocalLambda) -> None:
    result = fn.invoke({"oclaw": "warm"})
    line = result.report_line()
    for field in ("Duration:", "Billed Duration:", "Memory Size: 1024 MB", "Max Memory Used:"):
        assert field in line
    assert result.max_memory_mb > 20 and result.billed_ms >= result.duration_ms


def test_work_that_cannot_finish_before_the_deadline_is_refused(repo: Path, tmp_path: Path) -> None:
    lam = start(repo, tmp_path, env={"OCLAW_LAMBDA_RESERVE_MS": "3600000"})
    try:
        lam.wait_init()
        resp = lam.invoke(event("apigw_v2_infer.json")).json()
        assert resp["statusCode"] == 503 and "Lambda deadline" in json.loads(resp["body"])["error"]
        assert "Lambda deadline" in lam.invoke(event("direct_infer.json")).json()["error"]
    finally:
        lam.stop()


def test_broken_repository_is_reported_to_init_error(tmp_path: Path) -> None:
    bad = tmp_path / "repo" / "broken" / "1" / "model.onnx"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not onnx")
    lam = start(tmp_path / "repo", tmp_path)
    try:
        with pytest.raises(RuntimeError, match="INIT failed"):
            lam.wait_init(timeout_s=60)
        assert lam.api.init_error is not None
        assert "required models failed to load" in lam.api.init_error["errorMessage"]
        assert lam.proc is not None and lam.proc.wait(timeout=30) != 0
    finally:
        lam.stop()


def test_runtime_api_server_is_quiet_about_a_runtime_gone_mid_request(capsys: pytest.CaptureFixture[str]) -> None:
    """A runtime stopped while its /next request is open resets the connection: not an error worth a traceback
    (the demo ended with one); anything else still is."""
    from http.server import BaseHTTPRequestHandler

    from handler.local_lambda import _RuntimeServer

    server = _RuntimeServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    try:
        for exc in (ConnectionResetError(104, "Connection reset by peer"), BrokenPipeError(32, "Broken pipe")):
            try:
                raise exc
            except ConnectionError:
                server.handle_error(None, ("127.0.0.1", 1))
        assert capsys.readouterr().err == ""
        try:
            raise ValueError("a real bug")
        except ValueError:
            server.handle_error(None, ("127.0.0.1", 1))
        assert "ValueError: a real bug" in capsys.readouterr().err
    finally:
        server.server_close()
