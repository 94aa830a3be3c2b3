"""Real models from their wheels (silero-vad's If/Pad graph and state, RapidOCR's symbolic dimensions): warmed
without a declaration, served by `oclaw serve`, answering exactly what onnxruntime answers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient

from engine.config import Settings
from engine.logs import find_event
from engine.pool import ModelPool, State
from engine.repository.local import LocalRepository
from tests.conftest import ServerProcess, spawn_server
from tests.realmodels import MODELS, extract

#: silero-vad at 16 kHz: 512 new samples a step, after the 64 last samples of the step before.
CHUNK, CONTEXT = 512, 64


@pytest.fixture(scope="module")
def real_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return extract(tmp_path_factory.mktemp("real-models"))


def audio(seconds: float = 0.2) -> np.ndarray:
    """A voiced-sounding signal at 16 kHz: a 140 Hz tone with harmonics, amplitude-modulated, plus faint noise."""
    t = np.arange(int(16000 * seconds)) / 16000
    tone = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 6))
    noise = np.random.default_rng(3).standard_normal(t.size) * 0.01
    return ((0.4 + 0.3 * np.sin(2 * np.pi * 4 * t)) * tone * 0.3 + noise).astype(np.float32)


def feeds() -> dict[str, list[dict[str, np.ndarray]]]:
    """Inputs per model: two silero-vad steps (the state carried by the test), one image-like tensor per OCR model."""
    rng = np.random.default_rng(11)
    signal = np.concatenate([np.zeros(CONTEXT, np.float32), audio()])
    steps = [signal[i : i + CONTEXT + CHUNK][None, :] for i in (0, CHUNK)]
    return {
        "silero_vad": [{"input": s, "sr": np.array(16000, dtype=np.int64)} for s in steps],
        "ocr_det": [{"x": rng.standard_normal((1, 3, 64, 96)).astype(np.float32)}],
        "ocr_rec": [{"x": rng.standard_normal((1, 3, 48, 160)).astype(np.float32)}],
        "ocr_cls": [{"x": rng.standard_normal((1, 3, 48, 192)).astype(np.float32)}],
    }


def test_real_models_warm_up_without_a_declaration(real_repo: Path) -> None:
    """Synthetic warm-up inputs that run: a batch of 1, other sizes tried in turn, a sample rate for ``sr``."""
    pool = ModelPool(LocalRepository(real_repo), Settings.from_env({}))
    pool.preload()
    assert pool.ready() and {n: s["state"] for n, s in pool.states().items()} == dict.fromkeys(MODELS, "READY")
    for model in pool.loaded():
        assert model.warmup_error is None and model.warm_ns is not None and model.warm_feed is not None, model.name
    silero = pool.get("silero_vad").warm_feed
    assert silero is not None and silero["sr"].shape == () and int(silero["sr"]) == 16000
    assert silero["input"].shape[0] == 1 and silero["state"].shape == (2, 1, 128)


def test_a_declared_warm_up_is_what_runs(real_repo: Path, tmp_path: Path) -> None:
    """silero-vad's own step shape declared in oclaw.json: input [1, 576] of random audio, zero state, sr 16000."""
    model_dir = tmp_path / "silero_vad"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.onnx").write_bytes((real_repo / "silero_vad" / "1" / "model.onnx").read_bytes())
    warmup = {
        "inputs": {
            "sr": {"datatype": "INT64", "shape": [], "data": [16000]},
            "input": {"shape": [1, CHUNK + CONTEXT], "fill": "random"},
            "state": {"shape": [2, 1, 128]},
        }
    }
    (model_dir / "oclaw.json").write_text(json.dumps({"warmup": warmup}))
    model = ModelPool(LocalRepository(tmp_path), Settings.from_env({})).load("silero_vad").versions[1]
    assert model.warmup_error is None and model.warm_feed is not None
    assert model.warm_feed["input"].shape == (1, CHUNK + CONTEXT) and model.warm_feed["input"].std() > 0
    assert not model.warm_feed["state"].any() and model.warm_feed["sr"].tolist() == 16000

    warmup["inputs"]["sr"]["data"] = [12345]  # silero-vad rejects this rate: the model still serves, with a warning
    (model_dir / "oclaw.json").write_text(json.dumps({"warmup": warmup}))
    pool = ModelPool(LocalRepository(tmp_path), Settings.from_env({}))
    rejected = pool.load("silero_vad").versions[1]
    assert pool.states()["silero_vad"]["state"] == State.READY
    assert rejected.warmup_error is not None and "oclaw.json declares" in rejected.warmup_error


@pytest.fixture(scope="module")
def served(real_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = spawn_server(real_repo, tmp_path_factory.mktemp("real-serve"), env={"OCLAW_LOG_FORMAT": "json"})
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.terminate()


def _infer(client: httpclient.InferenceServerClient, model: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    inputs = []
    for name, array in feed.items():
        inp = httpclient.InferInput(name, list(array.shape), "INT64" if array.dtype == np.int64 else "FP32")
        inp.set_data_from_numpy(array, binary_data=True)
        inputs.append(inp)
    meta = client.get_model_metadata(model)
    outputs = [httpclient.InferRequestedOutput(o["name"], binary_data=True) for o in meta["outputs"]]
    result = client.infer(model, inputs, outputs=outputs)
    return {o["name"]: result.as_numpy(o["name"]) for o in meta["outputs"]}


@pytest.mark.slow
def test_served_real_models_answer_exactly_what_onnxruntime_answers(served: ServerProcess, real_repo: Path) -> None:
    assert httpx.get(f"{served.url}/v2/health/ready", timeout=10).status_code == 200
    client = httpclient.InferenceServerClient(served.url.removeprefix("http://"), network_timeout=60)
    try:
        for model, steps in feeds().items():
            assert client.is_model_ready(model)
            session = ort.InferenceSession(
                str(real_repo / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
            )
            names = [o.name for o in session.get_outputs()]
            state = np.zeros((2, 1, 128), np.float32)
            for step in steps:
                feed = {**step, "state": state} if model == "silero_vad" else step
                want = dict(zip(names, session.run(names, feed), strict=True))
                got = _infer(client, model, feed)
                assert set(got) == set(want)
                for name in names:
                    assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
                    np.testing.assert_array_equal(got[name], want[name], err_msg=f"{model} {name}")
                if model == "silero_vad":
                    state = want["stateN"]  # the stream's state carried into the next step
    finally:
        client.close()
    record = find_event(served.output(), "cold_start")
    assert record is not None and record["ready"] is True
    assert find_event(served.output(), "warmup_failed") is None
    assert ":onnxruntime:" not in served.output() and "\x1b[" not in served.output()  # none of its own lines
