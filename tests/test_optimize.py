"""`oclaw optimize`: INT8 (static, dynamic) and FP16 versions within a metric budget, that the server serves."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest

from engine.config import Settings
from engine.optimize import quantize
from engine.optimize.optimizer import OptimizeOptions, optimize_model
from engine.optimize.progress import Progress
from engine.repository.local import sha256_file
from tests import optimizekit, optimodels
from tests.conftest import start_server
from tests.modelgen import tiny_classifier
from tests.optimizekit import _image, optimize, record, snapshot

# the kit's fixtures, by the names the tests ask for (_no_oclaw_env applies to every test here)
_no_oclaw_env = optimizekit._no_oclaw_env
digits = optimizekit.digits
weights = optimizekit.weights
data = optimizekit.data
repo = optimizekit.repo

RECORD_KEYS = {
    "version",
    "source_version",
    "source_sha256",
    "method",
    "precision",
    "requested_precision",
    "settings",
    "nodes_fp32",
    "metric",
    "size_bytes",
    "latency_ms",
    "evaluation",
    "tried",
    "onnxruntime",
    "created",
}


def served_accuracy(repo: Path, model: str, version: int, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of one version as a real server answers, the batch sent in one V2 request."""
    server = start_server(repo)
    try:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.reshape(-1).tolist()}]}
        reply = httpx.post(f"{server.url}/v2/models/{model}/versions/{version}/infer", json=body, timeout=30)
        assert reply.status_code == 200, reply.text
        assert reply.json()["model_version"] == str(version)
        logits = np.asarray(reply.json()["outputs"][0]["data"], dtype=np.float32).reshape(len(x), 10)
        return optimodels.accuracy(logits, y)
    finally:
        server.stop()


# -- writing versions that the server serves ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_int8_writes_the_next_version_with_its_record_and_the_server_serves_it(
    capsys: pytest.CaptureFixture[str], repo: Path, data: dict[str, Path], digits: optimodels.Digits, mode: str
) -> None:
    source = repo / "digits" / "1" / "model.onnx"
    code, out, err = optimize(
        capsys, repo, "digits", "--precision", "int8", "--int8-mode", mode,
        "--calibration", str(data["npy"]), "--evaluation", str(data["npz"]),
    )  # fmt: skip
    assert code == 0, err
    assert "| | source (fp32) |" in out and f"| int8 {mode}" in out and "yes, chosen" in out
    assert f"wrote {repo / 'digits' / '2'}" in out
    assert "Traceback" not in err and "\r" not in err  # no progress lines when stderr is not a terminal
    assert sorted(p.name for p in (repo / "digits").iterdir()) == ["1", "2"]
    written = sorted(p.name for p in (repo / "digits" / "2").iterdir())
    assert written == ["model.onnx", "model.prepared.json", "model.prepared.onnx", "optimization.json"]
    rec = record(repo, "digits", 2)
    assert set(rec) == RECORD_KEYS
    assert rec["version"] == 2 and rec["source_version"] == 1
    assert rec["source_sha256"] == sha256_file(source)
    assert rec["method"] == f"int8-{mode}" and rec["precision"] == "int8" and rec["nodes_fp32"] == []
    assert rec["settings"]["per_channel"] is True
    if mode == "static":
        assert rec["settings"]["quant_format"] == "QDQ" and rec["settings"]["calibration_method"] == "minmax"
        assert rec["settings"]["calibration"]["sha256"] == sha256_file(data["npy"])
        kernels = quantize.int8_kernels()
        assert rec["settings"]["activation_type"] == kernels["activation_type"]
        graph = onnx.load(str(repo / "digits" / "2" / "model.onnx")).graph
        zero_points = [i for i in graph.initializer if i.name.endswith("_zero_point") and i.dims == []]
        activation = onnx.TensorProto.UINT8 if kernels["activation_type"] == "QUInt8" else onnx.TensorProto.INT8
        assert zero_points and all(z.data_type == activation for z in zero_points)  # activations: per tensor
    metric = rec["metric"]
    assert metric["name"] == "accuracy" and metric["max_drop"] == 0.01
    assert metric["source"] - metric["optimized"] <= 0.01 and metric["drop"] <= 0.01
    assert rec["size_bytes"]["source"] == source.stat().st_size
    assert rec["size_bytes"]["optimized"] == (repo / "digits" / "2" / "model.onnx").stat().st_size
    assert rec["size_bytes"]["optimized"] < rec["size_bytes"]["source"]
    assert rec["latency_ms"]["source"] > 0 and rec["latency_ms"]["optimized"] > 0 and rec["latency_ms"]["batch"] == 1
    assert rec["evaluation"] == {
        "path": str(data["npz"]),
        "items": 397,
        "labelled": True,
        "sha256": sha256_file(data["npz"]),
    }
    ops = {n.op_type for n in onnx.load(str(repo / "digits" / "2" / "model.onnx")).graph.node}
    assert ("QuantizeLinear" in ops) if mode == "static" else ("DynamicQuantizeLinear" in ops)
    x, y = digits.test
    # one request of 397 rows (dynamic INT8 scales activations per batch): still within the budget
    assert served_accuracy(repo, "digits", 2, x, y) >= metric["source"] - 0.01


def test_fp16_keeps_fp32_inputs_and_outputs_and_is_served(
    capsys: pytest.CaptureFixture[str], repo: Path, data: dict[str, Path], digits: optimodels.Digits
) -> None:
    code, _, err = optimize(capsys, repo, "digits", "--precision", "fp16", "--evaluation", str(data["jsonl"]))
    assert code == 0, err
    rec = record(repo, "digits", 2)
    assert rec["method"] == "fp16" and rec["settings"]["keep_io_types"] is True
    assert rec["evaluation"]["items"] == 60 and rec["evaluation"]["sha256"] == sha256_file(data["jsonl"])
    model = onnx.load(str(repo / "digits" / "2" / "model.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    assert "is now the one served" in err and '"versions": [1]' in err  # how to roll back
    x, y = digits.test
    assert served_accuracy(repo, "digits", 2, x, y) >= rec["metric"]["source"] - 0.01


def test_a_version_made_by_optimize_is_not_the_default_source(
    capsys: pytest.CaptureFixture[str], repo: Path, data: dict[str, Path]
) -> None:
    assert optimize(capsys, repo, "digits", "--precision", "fp16", "--evaluation", str(data["npz"]))[0] == 0
    assert optimize(capsys, repo, "digits", "--precision", "fp16", "--evaluation", str(data["npz"]))[0] == 0
    assert record(repo, "digits", 3)["source_version"] == 1
    code, _, err = optimize(
        capsys, repo, "digits", "--precision", "fp16", "--evaluation", str(data["npz"]), "--version", "2"
    )
    assert code == 2 and "digits/2 is itself an optimized version (of version 1" in err and "--version 1" in err


# -- the metric budget -----------------------------------------------------------------------------------------


def test_plain_int8_breaks_the_budget_and_the_sensitive_nodes_are_kept_in_fp32(
    capsys: pytest.CaptureFixture[str], repo: Path, data: dict[str, Path], digits: optimodels.Digits
) -> None:
    code, out, err = optimize(
        capsys, repo, "sensitive", "--precision", "int8",
        "--calibration", str(data["npy"]), "--evaluation", str(data["npz"]),
    )  # fmt: skip
    assert code == 0, err
    rec = record(repo, "sensitive", 2)
    plain = [t for t in rec["tried"] if not t["nodes_fp32"]]
    assert {t["method"] for t in plain} >= {"int8 static minmax", "int8 dynamic"}
    assert all(not t["holds"] and t["drop"] > 0.5 for t in plain)  # one int8 scale for the outlier tensor
    # the tensor with the outlier feeds fc2: static QDQ needs it and its producer (scale) in fp32, dynamic only fc2
    assert "fc2" in rec["nodes_fp32"] and set(rec["nodes_fp32"]) <= {"fc2", "scale"}
    assert rec["metric"]["drop"] <= 0.01
    assert any(t["holds"] for t in rec["tried"]) and "yes, chosen" in out
    x, y = digits.test
    assert served_accuracy(repo, "sensitive", 2, x, y) >= rec["metric"]["source"] - 0.01


def test_few_candidates_are_ranked_by_their_error_increase(
    repo: Path, data: dict[str, Path], digits: optimodels.Digits
) -> None:
    """With one group measured per family, the ranking by per-node error increments must pick the right one."""
    settings = Settings.from_env({}, model_repository=str(repo))
    options = OptimizeOptions(
        precision="int8", calibration=data["npy"], evaluation=data["npz"], calibration_method="minmax", max_candidates=1
    )
    outcome = optimize_model(settings, "sensitive", options, Progress(io.StringIO()))
    assert outcome.version == 2 and outcome.chosen is not None
    assert "fc2" in outcome.chosen.excluded
    assert len([t for t in outcome.trials if t.excluded]) == 2  # one search step per family sufficed


def test_when_no_configuration_holds_the_repository_is_unchanged(
    capsys: pytest.CaptureFixture[str], repo: Path, data: dict[str, Path]
) -> None:
    before = snapshot(repo)
    code, out, err = optimize(
        capsys, repo, "digits", "--precision", "int8", "--calibration", str(data["npy"]),
        "--evaluation", str(data["npz"]), "--metric", "max-abs", "--max-drop", "0",
    )  # fmt: skip
    assert code == 1
    assert "oclaw: no configuration holds the budget max-abs drop <= 0" in err
    assert "the repository is unchanged" in err and "Traceback" not in err
    assert "| 1 | int8 static minmax | 0 |" in out and "yes" not in out  # every configuration tried, none holds
    assert snapshot(repo) == before


# -- data -------------------------------------------------------------------------------------------------------


def test_a_folder_of_labelled_images_goes_through_the_models_preprocess(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    labels = ["red", "green", "blue"]
    manifest = {
        "labels": labels,
        "preprocess": {"kind": "image", "size": [8, 8], "crop_fraction": 1.0, "std": [255, 255, 255]},
        "postprocess": {"kind": "classification", "top_k": 2},
    }
    root = tmp_path / "models"
    optimodels.save(tiny_classifier(), root, "colours", manifest=manifest)
    images = tmp_path / "images"
    for i, (label, colour) in enumerate(zip(labels, [(220, 20, 20), (20, 220, 20), (20, 20, 220)], strict=True)):
        (images / label).mkdir(parents=True)
        for j in range(4):
            (images / label / f"{j}.png").write_bytes(_image(colour, 10 * i + j))
    code, _, err = optimize(capsys, root, "colours", "--precision", "int8", "--evaluation", str(images))
    assert code == 0, err
    rec = record(root, "colours", 2)
    assert rec["metric"]["name"] == "accuracy" and rec["evaluation"]["items"] == 12
    assert rec["evaluation"]["labelled"] is True
    assert "static INT8 calibrates on the evaluation data" in err
