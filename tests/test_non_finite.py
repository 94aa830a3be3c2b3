"""A model whose outputs hold NaN and ±Infinity: JSON responses stay valid JSON (the values travel as the strings
"NaN", "Infinity", "-Infinity"), the binary tensor extension keeps them bit for bit; server and Lambda alike."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import orjson
import pytest
import tritonclient.http as httpclient
from onnx import TensorProto, helper

from engine.tensors import decode_response
from handler.local_lambda import LocalLambda
from tests.conftest import ROOT, ServerThread, start_server
from tests.test_lambda import event

#: log: [-inf, nan, 0, log 2]; reciprocal: [inf, -1, 1, 0.5]
X = [0.0, -1.0, 1.0, 2.0]
TYPES = {
    "FP16": (TensorProto.FLOAT16, np.float16),
    "FP32": (TensorProto.FLOAT, np.float32),
    "FP64": (TensorProto.DOUBLE, np.float64),
}


def non_finite_model(elem: int) -> onnx.ModelProto:
    """log = Log(x), reciprocal = Reciprocal(x): NaN and ±Infinity from ordinary inputs."""
    shape: list[Any] = ["batch", 4]
    graph = helper.make_graph(
        [helper.make_node("Log", ["x"], ["log"]), helper.make_node("Reciprocal", ["x"], ["reciprocal"])],
        "non_finite",
        [helper.make_tensor_value_info("x", elem, shape)],
        [helper.make_tensor_value_info("log", elem, shape), helper.make_tensor_value_info("reciprocal", elem, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def nf_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("nonfinite")
    for datatype, (elem, _) in TYPES.items():
        path = repo / f"nf_{datatype.lower()}" / "1" / "model.onnx"
        path.parent.mkdir(parents=True)
        onnx.save(non_finite_model(elem), str(path))
    return repo


@pytest.fixture(scope="module")
def nf_server(nf_repo: Path) -> Iterator[ServerThread]:
    srv = start_server(nf_repo)
    yield srv
    srv.stop()


def expected(repo: Path, datatype: str) -> dict[str, np.ndarray]:
    """What onnxruntime itself answers."""
    sess = ort.InferenceSession(
        str(repo / f"nf_{datatype.lower()}" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    x = np.array([X], dtype=TYPES[datatype][1])
    with np.errstate(all="ignore"):
        return dict(zip(["log", "reciprocal"], sess.run(None, {"x": x}), strict=True))


def _no_constant(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def strict_json(body: bytes | str) -> Any:
    """Parse as RFC 8259 JSON: both orjson and the standard library (NaN/Infinity tokens refused) must accept it."""
    orjson.loads(body)
    return json.loads(body, parse_constant=_no_constant)


def request(datatype: str, **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": datatype, "shape": [1, 4], "data": X}], **extra}


@pytest.mark.parametrize("datatype", list(TYPES))
def test_json_response_is_valid_json_with_the_values_as_strings(
    nf_server: ServerThread, nf_repo: Path, datatype: str
) -> None:
    resp = httpx.post(f"{nf_server.url}/v2/models/nf_{datatype.lower()}/infer", json=request(datatype))
    assert resp.status_code == 200, resp.text
    outputs = {o["name"]: o for o in strict_json(resp.content)["outputs"]}
    assert outputs["log"]["datatype"] == datatype and outputs["log"]["shape"] == [1, 4]
    assert outputs["log"]["data"][:2] == ["-Infinity", "NaN"] and outputs["log"]["data"][2] == 0
    assert outputs["reciprocal"]["data"] == ["Infinity", -1, 1, 0.5]
    got = decode_response(resp.content)
    for name, want in expected(nf_repo, datatype).items():
        assert got[name].dtype == want.dtype
        np.testing.assert_array_equal(got[name], want)


def test_tritonclient_reads_the_json_values(nf_server: ServerThread, nf_repo: Path) -> None:
    client = httpclient.InferenceServerClient(url=nf_server.host)
    inp = httpclient.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(np.array([X], dtype=np.float32), binary_data=False)
    outs = [httpclient.InferRequestedOutput(n, binary_data=False) for n in ("log", "reciprocal")]
    result = client.infer("nf_fp32", [inp], outputs=outs)
    client.close()
    for name, want in expected(nf_repo, "FP32").items():
        np.testing.assert_array_equal(result.as_numpy(name), want)


def test_binary_extension_keeps_the_values_exactly(nf_server: ServerThread, nf_repo: Path) -> None:
    body = request("FP64", parameters={"binary_data_output": True})
    resp = httpx.post(f"{nf_server.url}/v2/models/nf_fp64/infer", json=body)
    assert resp.status_code == 200, resp.text
    length = int(resp.headers["inference-header-content-length"])
    strict_json(resp.content[:length])
    want = expected(nf_repo, "FP64")
    assert resp.content[length:] == want["log"].tobytes() + want["reciprocal"].tobytes()  # bit for bit


def test_lambda_answers_valid_json(nf_repo: Path, tmp_path: Path) -> None:
    http = event("apigw_v2_infer.json")
    http["rawPath"] = http["requestContext"]["http"]["path"] = "/v2/models/nf_fp32/infer"
    http["body"] = json.dumps(request("FP32"))
    direct = {"model_name": "nf_fp32", **request("FP32")}
    with LocalLambda(env={"OCLAW_MODEL_REPOSITORY": str(nf_repo)}, cwd=ROOT, log=tmp_path / "log") as fn:
        fn.wait_init()
        answer, shown = fn.invoke(http), fn.invoke(direct)
    assert answer.payload is not None and shown.payload is not None
    reply = strict_json(answer.payload)
    assert reply["statusCode"] == 200
    for doc in (strict_json(reply["body"]), strict_json(shown.payload)):
        outputs = {o["name"]: o["data"] for o in doc["outputs"]}
        assert outputs["log"][:2] == ["-Infinity", "NaN"] and outputs["reciprocal"][0] == "Infinity"
