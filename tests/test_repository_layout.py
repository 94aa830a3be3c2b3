"""Repository mistakes are named, not passed over: a missing repository fails Lambda INIT as it fails the server,
model files outside the Triton layout are warned about with where they belong, and a repository load or unload
request with a body oclaw cannot act on gets a 4xx/501 that says why."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import onnx
import pytest
import tritonclient.http as httpclient
from onnx import TensorProto

from handler.local_lambda import LocalLambda
from tests.conftest import ROOT, ServerThread, start_server
from tests.modelgen import identity
from tests.test_lambda import event

#: Model files the layout does not take, by model: where each is, relative to the repository.
MISPLACED = {
    "flat": "flat/model.onnx",
    "named": "named/v1/model.onnx",
    "zero": "zero/0/model.onnx",
    "<name>": "model.onnx",  # the repository pointed at a model's own folder
}


@pytest.fixture(scope="module")
def layout_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One good model, three whose files are where the layout does not look, and folders that are no mistake."""
    repo = tmp_path_factory.mktemp("layout")
    model = identity(TensorProto.FLOAT)
    model.ir_version = 8
    for rel in ("good/1/model.onnx", *MISPLACED.values()):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(repo / rel))
    (repo / "good" / "assets").mkdir()  # a folder without a model file is not a version anyone meant
    (repo / "good" / "1" / "notes.txt").write_text("not a model")
    return repo


def warnings_in(log: str) -> list[str]:
    """The messages of the WARNING records of a JSON log."""
    docs = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [d["message"] for d in docs if d.get("level") == "WARNING"]


def test_misplaced_model_files_are_warned_about_once_naming_where_they_belong(
    layout_repo: Path, tmp_path: Path
) -> None:
    log = tmp_path / "lambda.log"
    with LocalLambda(env={"OCLAW_MODEL_REPOSITORY": str(layout_repo)}, cwd=ROOT, log=log) as fn:
        fn.wait_init()
        index = event("apigw_v2_infer.json")
        index["rawPath"] = index["requestContext"]["http"]["path"] = "/v2/repository/index"
        index.pop("body")
        rows = json.loads(fn.invoke(index).json()["body"])  # a second scan of the repository
        flat = event("apigw_v2_infer.json")
        flat["rawPath"] = flat["requestContext"]["http"]["path"] = "/v2/models/flat/infer"
        missing = fn.invoke(flat).json()
    assert [r["name"] for r in rows] == ["good"]
    warnings = warnings_in(log.read_text())
    for name, rel in MISPLACED.items():
        (said,) = [w for w in warnings if str(layout_repo / rel) in w]  # once, though scanned twice
        assert f"model {name!r}" in said and "is ignored" in said
        assert f"e.g. {layout_repo / name / '1' / 'model.onnx'}" in said
    assert len(warnings) == len(MISPLACED)  # the assets folder and notes.txt are no mistake
    assert "numbered version folder" in next(w for w in warnings if "flat" in w)
    assert "numbered version folder" in next(w for w in warnings if "<name>" in w)
    assert "positive integers" in next(w for w in warnings if "named" in w)
    assert missing["statusCode"] == 404
    error = json.loads(missing["body"])["error"]
    assert f"expected {layout_repo / 'flat' / '<version>' / 'model.onnx'}" in error


def test_lambda_init_fails_for_a_repository_that_does_not_exist(tmp_path: Path) -> None:
    nowhere = tmp_path / "no-such-repository"
    lam = LocalLambda(env={"OCLAW_MODEL_REPOSITORY": str(nowhere)}, cwd=ROOT, log=tmp_path / "lambda.log").start()
    try:
        with pytest.raises(RuntimeError, match="INIT failed"):
            lam.wait_init(timeout_s=60)
        error = lam.api.init_error
        assert error is not None and error["errorType"] == "RepositoryError"
        assert f"model repository {str(nowhere)!r} does not exist (OCLAW_MODEL_REPOSITORY)" in error["errorMessage"]
        assert lam.proc is not None and lam.proc.wait(timeout=30) != 0
    finally:
        lam.stop()


def test_lambda_init_fails_for_a_repository_that_is_a_file(tmp_path: Path) -> None:
    a_file = tmp_path / "models.zip"
    a_file.write_bytes(b"PK")
    lam = LocalLambda(env={"OCLAW_MODEL_REPOSITORY": str(a_file)}, cwd=ROOT, log=tmp_path / "lambda.log").start()
    try:
        with pytest.raises(RuntimeError, match="INIT failed"):
            lam.wait_init(timeout_s=60)
        assert lam.api.init_error is not None and "is not a directory" in lam.api.init_error["errorMessage"]
    finally:
        lam.stop()


@pytest.fixture(scope="module")
def layout_server(layout_repo: Path) -> Iterator[ServerThread]:
    srv = start_server(layout_repo)
    yield srv
    srv.stop()


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b'{"parameters": ', 400, "the load request body: malformed JSON"),
        (b"[1, 2]", 400, "the load request body must be a JSON object, got list"),
        (b'{"parameter": {}}', 400, "unknown keys ['parameter']"),
        (b'{"parameters": []}', 400, "'parameters' must be an object"),
        (b'{"parameters": {"config": "{}"}}', 501, "parameters ['config'] are not supported"),
    ],
)
def test_repository_load_with_a_body_it_cannot_act_on(
    layout_server: ServerThread, body: bytes, status: int, fragment: str
) -> None:
    resp = httpx.post(f"{layout_server.url}/v2/repository/models/good/load", content=body)
    assert resp.status_code == status and fragment in resp.json()["error"], resp.text
    assert httpx.get(f"{layout_server.url}/v2/models/good/ready").status_code == 200  # still served


def test_repository_unload_refuses_a_malformed_body(layout_server: ServerThread) -> None:
    resp = httpx.post(f"{layout_server.url}/v2/repository/models/good/unload", content=b"{nope")
    assert resp.status_code == 400 and "the unload request body: malformed JSON" in resp.json()["error"]
    odd = httpx.post(f"{layout_server.url}/v2/repository/models/good/unload", json={"parameters": {"x": 1}})
    assert odd.status_code == 501 and "['x']" in odd.json()["error"]
    assert httpx.get(f"{layout_server.url}/v2/models/good/ready").status_code == 200


def test_tritonclient_load_and_unload_still_work(layout_server: ServerThread) -> None:
    client = httpclient.InferenceServerClient(url=layout_server.host)
    try:
        client.unload_model("good")  # sends {"parameters": {"unload_dependents": false}}
        assert not client.is_model_ready("good")
        client.load_model("good")  # sends {}
        assert client.is_model_ready("good")
        with pytest.raises(Exception, match="not supported"):
            client.load_model("good", config='{"max_batch_size": 8}')
    finally:
        client.close()
