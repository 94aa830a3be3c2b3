"""The Python SDK (``oclaw_sdk``) against a real oclaw server on loopback."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from handler.local_lambda import LocalLambda
from oclaw_sdk import (
    APIError,
    AsyncClient,
    Client,
    ConnectionFailed,
    InvalidInput,
    ModelConfig,
    ModelNotFound,
    RetryPolicy,
    TooManyRequests,
    codec,
)
from oclaw_sdk.aws import SigV4
from oclaw_sdk.retry import retry_after
from tests.conftest import AWS_ENV, EXAMPLES, ROOT, ServerThread, free_port, start_server
from tests.modelgen import _save, mlp


@pytest.fixture(scope="module")
def versions_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``mlp`` as version 1 (no record: fp32) and the same graph as version 2 recorded as an int8 optimization."""
    repo = tmp_path_factory.mktemp("versions")
    source = _save(mlp(), repo, "mlp", 1, {"versions": "all"})
    (repo / "mlp" / "2").mkdir()
    shutil.copy(source, repo / "mlp" / "2" / "model.onnx")
    record = {"version": 2, "source_version": 1, "method": "int8-static", "precision": "int8"}
    (repo / "mlp" / "2" / "optimization.json").write_text(json.dumps(record))
    return repo


@pytest.fixture(scope="module")
def versions_server(versions_repo: Path) -> Iterator[ServerThread]:
    srv = start_server(versions_repo)
    yield srv
    srv.stop()


def test_config_names_each_versions_precision(versions_server: ServerThread) -> None:
    for version, precision in (("1", "fp32"), ("2", "int8")):
        cfg = httpx.get(f"{versions_server.url}/v2/models/mlp/versions/{version}/config", timeout=30).json()
        assert cfg["parameters"]["precision"] == {"string_value": precision}


# -- the SDK ----------------------------------------------------------------------------------------------------

IMAGE = ROOT / "examples" / "images" / "cat.jpg"
FAST = RetryPolicy(max_retries=3, initial_delay_s=0.01, max_delay_s=0.05)


@pytest.fixture()
def sdk(server: ServerThread) -> Iterator[Client]:
    with Client(server.url, timeout_s=30) as c:
        yield c


@pytest.fixture(scope="module")
def image_server() -> Iterator[ServerThread]:
    srv = start_server(EXAMPLES)
    yield srv
    srv.stop()


def mlp_direct(repo: Path, x: np.ndarray, version: int = 1) -> np.ndarray:
    sess = ort.InferenceSession(str(repo / "mlp" / str(version) / "model.onnx"), providers=["CPUExecutionProvider"])
    out: np.ndarray = sess.run(None, {"x": x})[0]
    return out


@pytest.mark.parametrize("binary", [True, False])
def test_predict_numpy_and_lists_binary_and_json(sdk: Client, repo: Path, binary: bool) -> None:
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    expected = mlp_direct(repo, x)
    config = ModelConfig(binary=binary)
    result = sdk.predict(x, "mlp", config)
    assert result.model_name == "mlp" and result.model_version == "1"
    np.testing.assert_allclose(result.as_numpy("y"), expected, rtol=1e-5, atol=1e-6)
    # a nested list of Python floats: cast to the model's FP32 from its metadata
    from_list = sdk.predict(inputs=x.tolist(), model="mlp", config=config)
    np.testing.assert_allclose(from_list.as_numpy(), expected, rtol=1e-5, atol=1e-6)
    named = sdk.predict({"x": x}, "mlp", config)
    np.testing.assert_array_equal(named.as_numpy("y"), result.as_numpy("y"))


def test_several_named_inputs(sdk: Client) -> None:
    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    b = np.ones((2, 16), dtype=np.float32)
    for binary in (True, False):
        result = sdk.predict({"INPUT0": a, "INPUT1": b.tolist()}, "add_sub", ModelConfig(binary=binary))
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    only = sdk.predict({"INPUT0": a, "INPUT1": b}, "add_sub", ModelConfig(outputs=["OUTPUT1"]))
    assert list(only.outputs) == ["OUTPUT1"]


def test_bytes_tensors_and_unnamed_input_of_a_model_with_several(sdk: Client) -> None:
    words = np.array([["héllo", "a"], ["b", ""]], dtype=object)
    for binary in (True, False):
        out = sdk.predict({"x": words}, "identity_bytes", ModelConfig(binary=binary)).as_numpy("y")
        assert out.tolist() == [[b"h\xc3\xa9llo", b"a"], [b"b", b""]]
    with pytest.raises(ValueError, match="INPUT0"):
        sdk.predict(np.zeros((1, 16), np.float32), "add_sub")


def test_image_bytes_and_path_topk(image_server: ServerThread) -> None:
    with Client(image_server.url) as sdk:
        from_path = sdk.predict(IMAGE, "efficientnet_lite0")
        from_bytes = sdk.predict(IMAGE.read_bytes(), "efficientnet_lite0")
        from_str = sdk.predict(str(IMAGE), "efficientnet_lite0")
    top = from_path.topk(5)
    assert len(top) == 5
    assert "cat" in top[0][0]
    assert all(0.0 <= p <= 1.0 for _, p in top) and top == sorted(top, key=lambda c: -c[1])
    assert from_bytes.topk(3) == top[:3] == from_str.topk(3)
    assert from_path.topk(2, row=0) == top[:2]


def test_topk_from_logits_with_labels(sdk: Client) -> None:
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    labels = [f"class{i}" for i in range(10)]
    result = sdk.predict(x, "mlp", ModelConfig(labels=labels))
    logits = result.as_numpy("y").astype(np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    for row in (0, 1):
        best = np.argsort(-probs[row])[:3]
        top = result.topk(3, row=row)
        assert [name for name, _ in top] == [labels[i] for i in best]
        np.testing.assert_allclose([p for _, p in top], probs[row][best], rtol=1e-6)
    assert [r[0] for r in result.topk_rows(1)] == [result.topk(1, row=0)[0], result.topk(1, row=1)[0]]
    unlabelled = sdk.predict(x, "mlp").topk(1)
    assert unlabelled[0][0] == str(int(np.argmax(probs[0])))


def test_server_side_classification(sdk: Client) -> None:
    x = np.random.default_rng(2).standard_normal((1, 64)).astype(np.float32)
    scores = sdk.predict(x, "mlp").as_numpy("y")[0]
    classes = sdk.predict(x, "mlp", ModelConfig(classification=3))
    assert classes.as_numpy("y").dtype == object
    assert [name for name, _ in classes.topk(3)] == [str(i) for i in np.argsort(-scores)[:3]]


def stats_counts(client: Client, model: str) -> tuple[int, int, int]:
    """(successful requests, inferences, executions) of ``model``'s served version."""
    (entry,) = client.model_statistics(model)["model_stats"]
    return entry["inference_stats"]["success"]["count"], entry["inference_count"], entry["execution_count"]


def test_batch_size_splits_into_concurrent_requests_joined_in_order(
    versions_server: ServerThread, versions_repo: Path
) -> None:
    x = np.random.default_rng(3).standard_normal((10, 64)).astype(np.float32)
    with Client(versions_server.url, max_concurrency=4) as sdk:
        whole = sdk.predict(x, "mlp", ModelConfig(version=1)).as_numpy("y")
        before = stats_counts(sdk, "mlp")
        parts = sdk.predict(x, "mlp", ModelConfig(batch_size=3))
        after = stats_counts(sdk, "mlp")
    np.testing.assert_allclose(parts.as_numpy("y"), whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(whole, mlp_direct(versions_repo, x), rtol=1e-5, atol=1e-6)
    # ceil(10 / 3) = 4 requests (and executions), 10 rows inferred
    assert tuple(b - a for a, b in zip(before, after, strict=True)) == (4, 10, 4)


def test_precision_picks_the_version_recorded_with_it(versions_server: ServerThread) -> None:
    with Client(versions_server.url) as sdk:
        x = np.zeros((1, 64), np.float32)
        assert sdk.predict(x, "mlp", ModelConfig(precision="int8")).model_version == "2"
        assert sdk.predict(x, "mlp", ModelConfig(precision="fp32")).model_version == "1"
        assert sdk.predict(x, "mlp").model_version == "2"
        assert sdk.model_config("mlp", 1)["parameters"]["precision"]["string_value"] == "fp32"
        with pytest.raises(ModelNotFound, match="fp16"):
            sdk.predict(x, "mlp", ModelConfig(precision="fp16"))


def test_typed_errors_keep_the_servers_message(sdk: Client) -> None:
    with pytest.raises(ModelNotFound, match="unknown model 'nope'") as not_found:
        sdk.predict(np.zeros((1, 4), np.float32), "nope")
    assert not_found.value.status == 404
    with pytest.raises(InvalidInput) as bad:
        sdk.predict({"x": np.zeros((1, 5), np.float64)}, "mlp")
    assert bad.value.status == 400 and bad.value.message
    with pytest.raises(ModelNotFound):
        sdk.model_metadata("mlp", 9)
    with pytest.raises(ValueError, match="not a PNG"):
        sdk.predict(b"not an image", "mlp")


def test_health_metadata_and_listing(sdk: Client) -> None:
    assert sdk.is_live() and sdk.is_ready() and sdk.is_model_ready("mlp")
    assert not sdk.is_model_ready("mlp", 9)
    assert sdk.server_metadata()["name"] == "oclaw"
    meta = sdk.model_metadata("add_sub")
    assert [i["name"] for i in meta["inputs"]] == ["INPUT0", "INPUT1"]
    names = {m["name"] for m in sdk.list_models()}
    assert {"mlp", "add_sub", "tiny_classifier"} <= names
    assert {m["state"] for m in sdk.list_models(ready=True)} == {"READY"}


class Flaky:
    """A loopback HTTP server that answers the first ``failures`` requests with an error status, then proxies."""

    def __init__(self, upstream: str, failures: list[tuple[int, dict[str, str]]]) -> None:
        self.upstream = upstream
        self.failures = list(failures)
        self.seen: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _serve(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                outer.seen.append(self.path)
                if outer.failures:
                    status, headers = outer.failures.pop(0)
                    payload = json.dumps({"error": f"busy ({status})"}).encode()
                    self.send_response(status)
                    for key, value in {**headers, "content-type": "application/json"}.items():
                        self.send_header(key, value)
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                forward = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                answer = httpx.request(self.command, outer.upstream + self.path, content=body, headers=forward)
                self.send_response(answer.status_code)
                for key in ("content-type", "inference-header-content-length"):
                    if key in answer.headers:
                        self.send_header(key, answer.headers[key])
                self.send_header("content-length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = _serve

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_503_and_429_with_retry_after_are_retried(server: ServerThread) -> None:
    flaky = Flaky(server.url, [(503, {"retry-after": "0"}), (429, {"retry-after": "0"}), (502, {})])
    try:
        with Client(flaky.url, retry=FAST) as sdk:
            out = sdk.predict(np.ones((1, 16), np.float32), "identity_fp32").as_numpy()
        assert out.tolist() == [[1.0] * 16]
        assert flaky.seen == ["/v2/models/identity_fp32"] * 4 + ["/v2/models/identity_fp32/infer"]
    finally:
        flaky.close()


def test_errors_after_the_last_retry_are_raised_with_the_message(server: ServerThread) -> None:
    flaky = Flaky(server.url, [(429, {"retry-after": "0"})] * 3)
    try:
        with Client(flaky.url, retry=RetryPolicy(max_retries=1, initial_delay_s=0.01)) as sdk:
            with pytest.raises(TooManyRequests, match=r"busy \(429\)") as exc:
                sdk.server_metadata()
            assert exc.value.retry_after_s == 0.0
            assert len(flaky.seen) == 2
            assert sdk.server_metadata()["name"] == "oclaw"  # the third 429, retried once
    finally:
        flaky.close()
    flaky = Flaky(server.url, [(400, {})])
    try:
        with Client(flaky.url, retry=FAST) as sdk, pytest.raises(InvalidInput):
            sdk.server_metadata()
        assert len(flaky.seen) == 1  # a client error is not retried
    finally:
        flaky.close()


def test_connection_errors_are_retried_then_raised() -> None:
    with Client(f"127.0.0.1:{free_port()}", retry=FAST, timeout_s=5) as sdk:
        with pytest.raises(ConnectionFailed, match="ConnectError"):
            sdk.server_metadata()
        assert not isinstance(ConnectionFailed("x"), APIError)


def test_retry_policy_and_retry_after() -> None:
    policy = RetryPolicy(max_retries=2, initial_delay_s=1.0, max_delay_s=3.0, jitter=0.5)
    assert policy.delay(0, 2.5) == 2.5
    assert policy.delay(2) is None
    assert 0.5 <= (policy.delay(0) or 0) <= 1.0
    assert 1.0 <= (policy.delay(1) or 0) <= 2.0
    assert policy.delay(1, 3600.0) is not None and (policy.delay(1, 3600.0) or 0) <= 3.0
    assert retry_after("7") == 7.0
    assert retry_after(None) is None and retry_after("soon") is None
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_async_client_parity(server: ServerThread, image_server: ServerThread) -> None:
    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    x = np.random.default_rng(4).standard_normal((7, 64)).astype(np.float32)

    async def main() -> None:
        with Client(server.url) as sync_client:
            expected = sync_client.predict(x, "mlp").as_numpy("y")
        async with AsyncClient(server.url) as client:
            assert await client.is_live() and await client.is_ready()
            assert (await client.server_metadata())["name"] == "oclaw"
            assert (await client.model_metadata("mlp"))["name"] == "mlp"
            assert "mlp" in {m["name"] for m in await client.list_models()}
            both = await client.predict({"INPUT0": a, "INPUT1": a}, "add_sub", ModelConfig(binary=False))
            np.testing.assert_array_equal(both.as_numpy("OUTPUT0"), a + a)
            parts = await client.predict(x, "mlp", ModelConfig(batch_size=2))
            np.testing.assert_allclose(parts.as_numpy("y"), expected, rtol=1e-5, atol=1e-6)
            with pytest.raises(ModelNotFound):
                await client.predict(x, "nope")
        async with AsyncClient(image_server.url) as client:
            assert "cat" in (await client.predict(IMAGE, "efficientnet_lite0")).topk(1)[0][0]

    asyncio.run(main())


def test_non_finite_floats_round_trip_as_json_and_binary(sdk: Client) -> None:
    x = np.array([[np.nan, np.inf, -np.inf, 1.5]], dtype=np.float32)
    for binary in (True, False):
        out = sdk.predict({"x": x}, "identity_fp32", ModelConfig(binary=binary)).as_numpy("y")
        np.testing.assert_array_equal(out, x)


def test_the_sdk_imports_neither_the_engine_nor_onnxruntime() -> None:
    code = "import sys, oclaw_sdk; print(sorted(m for m in ('engine', 'handler', 'onnxruntime') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# -- AWS: lambda.invoke and SigV4 ----------------------------------------------------------------------------------


class LocalLambdaClient:
    """boto3's Lambda client at the AWS boundary: ``invoke`` runs the event in a local Lambda environment (the real
    handler under awslambdaric) and answers as the Invoke API does."""

    def __init__(self, fn: LocalLambda) -> None:
        self.fn = fn
        self.events: list[dict[str, Any]] = []

    def invoke(self, *, FunctionName: str, Payload: bytes, Qualifier: str | None = None) -> dict[str, Any]:
        assert FunctionName == "oclaw-local"
        self.events.append(json.loads(Payload))
        result = self.fn.invoke(json.loads(Payload))
        answer: dict[str, Any] = {"StatusCode": 200, "Payload": io.BytesIO(result.payload or b"")}
        if result.error is not None:
            answer["FunctionError"] = "Unhandled"
            answer["Payload"] = io.BytesIO(json.dumps(result.error).encode())
        return answer


@pytest.fixture(scope="module")
def local_lambda(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalLambda]:
    env = {"OCLAW_MODEL_REPOSITORY": str(repo), "OCLAW_PRELOAD": "mlp,add_sub,identity_bytes"}
    fn = LocalLambda(env=env, cwd=ROOT, log=tmp_path_factory.mktemp("lambda") / "lambda.log").start()
    fn.wait_init()
    yield fn
    fn.stop()


def test_lambda_transport_sends_direct_v2_requests(local_lambda: LocalLambda, repo: Path) -> None:
    boto = LocalLambdaClient(local_lambda)
    x = np.random.default_rng(5).standard_normal((5, 64)).astype(np.float32)
    with Client.for_lambda("oclaw-local", lambda_client=boto) as sdk:
        result = sdk.predict(x, "mlp", ModelConfig(batch_size=2))
        np.testing.assert_allclose(result.as_numpy("y"), mlp_direct(repo, x), rtol=1e-5, atol=1e-6)
        a = np.arange(16, dtype=np.float32).reshape(1, 16)
        both = sdk.predict({"INPUT0": a, "INPUT1": a}, "add_sub", ModelConfig(version=1))
        np.testing.assert_array_equal(both.as_numpy("OUTPUT1"), np.zeros((1, 16), np.float32))
        words = sdk.predict({"x": np.array([["é", "b"]], dtype=object)}, "identity_bytes").as_numpy("y")
        assert words.tolist() == [["é".encode(), b"b"]]
        with pytest.raises(InvalidInput, match="INPUT1"):
            sdk.predict({"INPUT0": a}, "add_sub")
        assert sdk.server_metadata()["name"] == "oclaw"  # not an infer request: sent as a Function URL event
    direct = [e for e in boto.events if "inputs" in e]
    assert direct[0]["model_name"] == "mlp" and direct[0]["inputs"][0]["shape"] == [2, 64]
    assert "data" in direct[0]["inputs"][0] and len(direct) == 3 + 1 + 1 + 1
    assert (direct[3]["model_name"], direct[3]["model_version"]) == ("add_sub", "1")
    assert any(e.get("rawPath") == "/v2/models/mlp" for e in boto.events)  # metadata for the unnamed input

    async def main() -> None:
        async with AsyncClient.for_lambda("oclaw-local", lambda_client=boto) as client:
            out = await client.predict(x, "mlp", ModelConfig(batch_size=3))
            np.testing.assert_allclose(out.as_numpy("y"), mlp_direct(repo, x), rtol=1e-5, atol=1e-6)

    asyncio.run(main())


class Recorder(BaseHTTPRequestHandler):
    """Records each request (method, path, headers, body) and answers the V2 server metadata."""

    seen: ClassVar[list[tuple[str, str, dict[str, str], bytes]]] = []

    def log_message(self, *args: object) -> None:
        pass

    def _serve(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.seen.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        payload = json.dumps({"name": "oclaw", "version": "0", "extensions": []}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _serve


def test_sigv4_signs_what_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest

    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        with Client(url, api_key="k1", auth=SigV4(region="us-east-1")) as sdk:
            sdk.server_metadata()
            body, length = codec.encode_request({"x": np.ones((1, 4), np.float32)})
            sdk.predict({"x": np.ones((1, 4), np.float32)}, "m")
    finally:
        httpd.shutdown()
        httpd.server_close()
    credentials = boto3.Session().get_credentials().get_frozen_credentials()
    for method, path, headers, sent in Recorder.seen:
        auth = headers["authorization"]
        assert auth.startswith("AWS4-HMAC-SHA256 Credential=testing/") and "/us-east-1/lambda/aws4_request" in auth
        assert headers["x-api-key"] == "k1" and headers["x-amz-security-token"] == "testing"
        names = auth.split("SignedHeaders=")[1].split(",")[0].split(";")
        request = AWSRequest(method=method, url=url + path, data=sent, headers={n: headers[n] for n in names})
        request.context["timestamp"] = headers["x-amz-date"]
        signer = SigV4Auth(credentials, "lambda", "us-east-1")
        expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
        assert auth.endswith(f"Signature={expected}")
    assert Recorder.seen[-1][3] == body and Recorder.seen[-1][2][codec.HEADER_LENGTH] == str(length)


def test_a_list_of_images_is_one_bytes_tensor_split_by_batch_size(image_server: ServerThread) -> None:
    photo = IMAGE.read_bytes()
    with Client(image_server.url) as sdk:
        single = sdk.predict(photo, "efficientnet_lite0").topk(5)
        result = sdk.predict([photo, IMAGE, photo], "efficientnet_lite0", ModelConfig(batch_size=2))
        assert result.topk_rows(5) == [single] * 3
        with pytest.raises(ValueError, match="binary tensors"):
            sdk.predict([photo], "efficientnet_lite0", ModelConfig(binary=False))


def test_a_server_that_does_not_answer_times_out() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        with Client(f"127.0.0.1:{port}", timeout_s=0.2, retry=RetryPolicy(max_retries=0)) as sdk:
            with pytest.raises(ConnectionFailed, match="ReadTimeout"):
                sdk.is_live()

            async def main() -> None:
                async with AsyncClient(f"127.0.0.1:{port}", timeout_s=0.2, retry=RetryPolicy(max_retries=0)) as a:
                    with pytest.raises(ConnectionFailed, match="ReadTimeout"):
                        await a.server_metadata()

            asyncio.run(main())
