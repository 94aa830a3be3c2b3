"""Stock tritonclient.http against a real oclaw server: results equal a direct onnxruntime run."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from engine.datatypes import V2_TO_NUMPY
from tests.conftest import ServerThread, start_server


@pytest.fixture()
def triton(server: ServerThread) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(url=server.host, network_timeout=30)
    yield client
    client.close()


def direct(repo: Path, name: str, feed: dict[str, np.ndarray], version: int = 1) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(repo / name / str(version) / "model.onnx"), providers=["CPUExecutionProvider"])
    return list(sess.run(None, feed))


def sample(datatype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if datatype == "BYTES":
        words = np.array([f"w{i}-é".encode() for i in range(int(np.prod(shape)))], dtype=object)
        return words.reshape(shape)
    dt = V2_TO_NUMPY[datatype]
    if dt.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if dt.kind == "f":
        return rng.standard_normal(shape).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(max(info.min, -1000), min(info.max, 1000), shape, endpoint=True).astype(dt)


def test_health_and_server_metadata(triton: httpclient.InferenceServerClient) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert meta["name"] == "oclaw"
    assert "binary_tensor_data" in meta["extensions"]


def test_model_metadata_and_config(triton: httpclient.InferenceServerClient) -> None:
    assert triton.is_model_ready("add_sub")
    meta = triton.get_model_metadata("add_sub")
    assert meta["name"] == "add_sub"
    assert meta["versions"] == ["1"]
    assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == {
        "INPUT0": ("FP32", [-1, 16]),
        "INPUT1": ("FP32", [-1, 16]),
    }
    assert [o["name"] for o in meta["outputs"]] == ["OUTPUT0", "OUTPUT1"]
    config = triton.get_model_config("add_sub")
    assert config["platform"] == "onnxruntime_onnx"
    assert len(config["parameters"]["sha256"]["string_value"]) == 64


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", list(V2_TO_NUMPY))
def test_every_datatype_round_trips(
    triton: httpclient.InferenceServerClient, repo: Path, datatype: str, binary: bool
) -> None:
    rng = np.random.default_rng(7)
    x = sample(datatype, (3, 5), rng)
    inp = httpclient.InferInput("x", list(x.shape), datatype)
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("y", binary_data=binary)
    result = triton.infer(f"identity_{datatype.lower()}", [inp], outputs=[out])
    got = result.as_numpy("y")
    feed = x if datatype != "BYTES" else np.vectorize(bytes.decode, otypes=[object])(x)
    expected = direct(repo, f"identity_{datatype.lower()}", {"x": feed})[0]
    assert got.shape == x.shape
    if datatype == "BYTES":
        assert [v.decode() if isinstance(v, bytes) else v for v in got.ravel()] == list(expected.ravel())
    else:
        assert got.dtype == x.dtype
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_two_inputs_two_outputs_default_outputs(
    triton: httpclient.InferenceServerClient, repo: Path, binary: bool
) -> None:
    rng = np.random.default_rng(3)
    a, b = (rng.standard_normal((4, 16)).astype(np.float32) for _ in range(2))
    inputs = [httpclient.InferInput("INPUT0", [4, 16], "FP32"), httpclient.InferInput("INPUT1", [4, 16], "FP32")]
    inputs[0].set_data_from_numpy(a, binary_data=binary)
    inputs[1].set_data_from_numpy(b, binary_data=binary)
    result = triton.infer("add_sub", inputs, request_id="req-42")  # no outputs: client asks for binary
    ref = direct(repo, "add_sub", {"INPUT0": a, "INPUT1": b})
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), ref[0])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), ref[1])
    assert result.get_response()["id"] == "req-42"


def test_dynamic_batch_sizes_and_mlp(triton: httpclient.InferenceServerClient, repo: Path) -> None:
    rng = np.random.default_rng(5)
    for batch in (1, 7, 64):
        x = rng.standard_normal((batch, 64)).astype(np.float32)
        inp = httpclient.InferInput("x", [batch, 64], "FP32")
        inp.set_data_from_numpy(x)
        got = triton.infer("mlp", [inp]).as_numpy("y")
        np.testing.assert_allclose(got, direct(repo, "mlp", {"x": x})[0], rtol=1e-6, atol=1e-6)


def test_versions_are_addressable(triton: httpclient.InferenceServerClient) -> None:
    x = np.zeros((1, 4), dtype=np.float32)
    inp = httpclient.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(x)
    assert triton.get_model_metadata("versioned")["versions"] == ["1", "2"]
    assert triton.infer("versioned", [inp]).as_numpy("y")[0, 0] == 2.0  # highest version by default
    assert triton.infer("versioned", [inp], model_version="1").as_numpy("y")[0, 0] == 1.0
    assert triton.is_model_ready("versioned", "1")
    with pytest.raises(InferenceServerException, match="no loaded version 9"):
        triton.infer("versioned", [inp], model_version="9")


def test_classification_extension(triton: httpclient.InferenceServerClient, repo: Path) -> None:
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    inp = httpclient.InferInput("x", [2, 64], "FP32")
    inp.set_data_from_numpy(x)
    out = httpclient.InferRequestedOutput("y", class_count=3)
    got = triton.infer("mlp", [inp], outputs=[out]).as_numpy("y")
    ref = direct(repo, "mlp", {"x": x})[0]
    assert got.shape == (2, 3)
    for row, scores in zip(got, ref, strict=True):
        indices = [int(entry.decode().split(":")[1]) for entry in row]
        assert indices == list(np.argsort(-scores)[:3])
        assert float(row[0].decode().split(":")[0]) == pytest.approx(scores.max(), rel=1e-5)


def test_statistics_count_inferences(triton: httpclient.InferenceServerClient) -> None:
    before = triton.get_inference_statistics("identity_int64")["model_stats"][0]
    x = np.arange(6, dtype=np.int64).reshape(2, 3)
    inp = httpclient.InferInput("x", [2, 3], "INT64")
    inp.set_data_from_numpy(x)
    triton.infer("identity_int64", [inp])
    after = triton.get_inference_statistics("identity_int64")["model_stats"][0]
    assert after["inference_count"] == before["inference_count"] + 2
    assert after["execution_count"] == before["execution_count"] + 1
    stats = after["inference_stats"]
    assert stats["success"]["count"] == before["inference_stats"]["success"]["count"] + 1
    assert stats["compute_infer"]["ns"] > before["inference_stats"]["compute_infer"]["ns"]
    everything = triton.get_inference_statistics()["model_stats"]
    assert {"add_sub", "mlp", "identity_int64"} <= {m["name"] for m in everything}


def test_unknown_model_error_reaches_the_client(triton: httpclient.InferenceServerClient) -> None:
    inp = httpclient.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        triton.infer("nope", [inp])
    assert not triton.is_model_ready("nope")


def test_curl_with_a_json_body(server: ServerThread) -> None:
    """curl -d sends application/x-www-form-urlencoded; the V2 JSON body must still be understood."""
    curl = shutil.which("curl")
    assert curl is not None, "curl is part of the test environment"
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})
    out = subprocess.run(
        [curl, "-sS", f"{server.url}/v2/models/versioned/versions/1/infer", "-d", body],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert json.loads(out.stdout)["outputs"][0]["data"] == [2.0, 3.0, 4.0, 5.0]


def test_the_fastapi_app_alone_serves_the_same_api(repo: Path) -> None:
    """The FastAPI app (what Mangum runs, and what `oclaw serve` delegates to) answers infer identically."""
    srv = start_server(repo, fastapi_only=True)
    try:
        client = httpclient.InferenceServerClient(url=srv.host)
        assert client.is_server_ready() and client.get_model_metadata("add_sub")["name"] == "add_sub"
        a = np.ones((2, 16), dtype=np.float32)
        inputs = [httpclient.InferInput("INPUT0", [2, 16], "FP32"), httpclient.InferInput("INPUT1", [2, 16], "FP32")]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(a * 3)
        np.testing.assert_array_equal(client.infer("add_sub", inputs).as_numpy("OUTPUT0"), a * 4)
        with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
            client.infer("nope", inputs)
        client.close()
    finally:
        srv.stop()
