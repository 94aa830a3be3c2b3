"""Raw images in, top-k labels out: the real EfficientNet-Lite0 example and a tiny generated classifier."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
from PIL import Image
from skimage import data as skdata

from engine.processing import image_to_tensor
from engine.repository.manifest import load_manifest
from tests.conftest import EXAMPLES, ServerThread, start_server

EFFNET = EXAMPLES / "efficientnet_lite0"


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def top(entries: list[str]) -> list[tuple[float, int, str]]:
    """Parse Triton classification strings "value:index:label" (labels may hold ':' or ',')."""
    parsed = []
    for entry in entries:
        value, index, label = entry.split(":", 2)
        parsed.append((float(value), int(index), label))
    return parsed


@pytest.fixture(scope="module")
def effnet() -> Iterator[ServerThread]:
    srv = start_server(EXAMPLES)
    yield srv
    srv.stop()


@pytest.mark.slow
def test_coffee_is_espresso_from_a_raw_png_body(effnet: ServerThread) -> None:
    resp = httpx.post(
        f"{effnet.url}/v2/models/efficientnet_lite0/infer",
        content=png(skdata.coffee()),
        headers={"Content-Type": "image/png"},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    out = resp.json()["outputs"][0]
    assert out["datatype"] == "BYTES" and out["shape"] == [1, 5]
    best = top(out["data"])
    assert best[0][2] == "espresso" and best[0][1] == 967
    assert best[0][0] > 0.9
    assert [p for p, _, _ in best] == sorted((p for p, _, _ in best), reverse=True)


@pytest.mark.slow
def test_images_as_a_bytes_tensor_through_tritonclient(effnet: ServerThread) -> None:
    client = httpclient.InferenceServerClient(url=effnet.host, network_timeout=60)
    blobs = np.array([png(skdata.coffee()), png(skdata.chelsea())], dtype=object)
    inp = httpclient.InferInput("input", [2], "BYTES")
    inp.set_data_from_numpy(blobs)  # binary tensor extension, the client's default
    result = client.infer("efficientnet_lite0", [inp])
    labels = result.as_numpy("logits")
    assert labels.shape == (2, 5)
    coffee = top([e.decode() for e in labels[0]])
    chelsea = top([e.decode() for e in labels[1]])
    assert coffee[0][2] == "espresso" and coffee[0][0] > 0.9
    assert {"tiger cat", "Egyptian cat", "tabby, tabby cat"} & {label for _, _, label in chelsea[:3]}
    client.close()


@pytest.mark.slow
def test_tensor_path_matches_onnxruntime(effnet: ServerThread) -> None:
    spec = load_manifest(EFFNET).preprocess
    assert spec is not None
    x = np.stack([image_to_tensor(Image.fromarray(skdata.rocket()), spec)])
    client = httpclient.InferenceServerClient(url=effnet.host, network_timeout=60)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    got = client.infer("efficientnet_lite0", [inp]).as_numpy("logits")
    sess = ort.InferenceSession(str(EFFNET / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(got, sess.run(None, {"input": x})[0], rtol=1e-4, atol=1e-4)
    client.close()


def test_tiny_classifier_labels_follow_the_image_colour(server: ServerThread, repo: Path) -> None:
    sess = ort.InferenceSession(str(repo / "tiny_classifier" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255)):
        image = np.zeros((10, 14, 3), dtype=np.uint8)
        image[:] = colour
        resp = httpx.post(
            f"{server.url}/v2/models/tiny_classifier/infer", content=png(image), headers={"Content-Type": "image/png"}
        )
        assert resp.status_code == 200, resp.text
        got = top(resp.json()["outputs"][0]["data"])
        x = (np.asarray(Image.fromarray(image).resize((8, 8)), dtype=np.float32) / 255).transpose(2, 0, 1)[None]
        logits = sess.run(None, {"image": x})[0][0]
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert [i for _, i, _ in got] == list(np.argsort(-probs)[:2])
        assert got[0][2] == ["red", "green", "blue"][int(np.argmax(probs))]
        assert got[0][0] == pytest.approx(float(probs.max()), abs=1e-5)


def test_image_batch_larger_than_max_batch_size_is_rejected(server: ServerThread) -> None:
    image = png(np.zeros((8, 8, 3), dtype=np.uint8))
    client = httpclient.InferenceServerClient(url=server.host)
    inp = httpclient.InferInput("image", [5], "BYTES")
    inp.set_data_from_numpy(np.array([image] * 5, dtype=object))
    with pytest.raises(Exception, match="max_batch_size 4"):
        client.infer("tiny_classifier", [inp])
    client.close()
