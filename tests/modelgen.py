"""Tiny real ONNX models built with onnx.helper, and repositories made of them."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17

#: V2 datatype -> ONNX element type, for every V2 datatype.
V2_TO_ONNX = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def _save(
    model: onnx.ModelProto, repo: Path, name: str, version: int = 1, manifest: dict[str, Any] | None = None
) -> Path:
    model.opset_import[0].version = OPSET
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = repo / name / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    if manifest is not None:
        (repo / name / "oclaw.json").write_text(json.dumps(manifest))
    return path


def identity(elem: int, shape: list[Any] | None = None) -> onnx.ModelProto:
    """y = x for one element type, shape [batch, n] by default."""
    shape = shape or ["batch", "n"]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", elem, shape)],
        [helper.make_tensor_value_info("y", elem, shape)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def add_sub(width: int = 16) -> onnx.ModelProto:
    """Triton's add_sub: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1 (FP32 [batch, width])."""
    shape: list[Any] = ["batch", width]
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        "add_sub",
        [
            helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, shape),
            helper.make_tensor_value_info("INPUT1", TensorProto.FLOAT, shape),
        ],
        [
            helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, shape),
            helper.make_tensor_value_info("OUTPUT1", TensorProto.FLOAT, shape),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def mlp(sizes: tuple[int, ...] = (64, 256, 10), seed: int = 0) -> onnx.ModelProto:
    """A dense ReLU network [batch, sizes[0]] -> [batch, sizes[-1]] with random weights."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "x"
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        bias = (rng.standard_normal(b) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        out = "y" if i == len(sizes) - 2 else f"h{i}"
        gemm_out = out if out == "y" else f"g{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [gemm_out]))
        if out != "y":
            nodes.append(helper.make_node("Relu", [gemm_out], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", sizes[-1]])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def fixed_shape() -> onnx.ModelProto:
    """y = x * 2 with a fully fixed shape [2, 3] (FP32)."""
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [two],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def slow(n: int = 768, repeats: int = 24) -> onnx.ModelProto:
    """A chain of [n,n] MatMuls (x @ w)^k, slow enough (~0.3 s) to test draining in-flight requests."""
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array((rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32), "w")
    nodes, prev = [], "x"
    for i in range(repeats):
        out = "y" if i == repeats - 1 else f"m{i}"
        nodes.append(helper.make_node("MatMul", [prev, "w"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def tiny_classifier(classes: int = 3, seed: int = 2) -> onnx.ModelProto:
    """An image model [batch,3,8,8] -> logits [batch,classes]: global average pool then Gemm."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((3, classes)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(classes, dtype=np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["image"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Gemm", ["f", "w", "b"], ["logits"]),
        ],
        "tiny_classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        [w, b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def add_constant(value: float) -> onnx.ModelProto:
    """y = x + value (FP32 [batch, 4]); versions of one model differ by ``value``."""
    c = numpy_helper.from_array(np.array(value, dtype=np.float32), "c")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        "add_constant",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [c],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def build_repository(repo: Path) -> Path:
    """The standard test repository: every datatype, several inputs/outputs, versions, images."""
    repo.mkdir(parents=True, exist_ok=True)
    for datatype, elem in V2_TO_ONNX.items():
        _save(identity(elem), repo, f"identity_{datatype.lower()}")
    _save(add_sub(), repo, "add_sub")
    _save(mlp(), repo, "mlp")
    _save(fixed_shape(), repo, "fixed")
    _save(gather(), repo, "gather")
    _save(add_constant(1.0), repo, "versioned", 1, {"versions": "all"})
    _save(add_constant(2.0), repo, "versioned", 2)
    _save(
        tiny_classifier(),
        repo,
        "tiny_classifier",
        1,
        {
            "labels": ["red", "green", "blue"],
            "preprocess": {
                "kind": "image",
                "size": [8, 8],
                "crop_fraction": 1.0,
                "mean": [0, 0, 0],
                "std": [255, 255, 255],
            },
            "postprocess": {"kind": "classification", "top_k": 2},
            "max_batch_size": 4,
        },
    )
    return repo


def gather(rows: int = 10, width: int = 4) -> onnx.ModelProto:
    """y = table[idx]: a valid-looking index out of range fails inside onnxruntime (per-item isolation tests)."""
    table = numpy_helper.from_array(np.arange(rows * width, dtype=np.float32).reshape(rows, width), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["y"], axis=0)],
        "gather",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        [table],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
