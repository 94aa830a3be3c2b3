"""Small models with real weights for ``oclaw optimize``: an MLP trained on scikit-learn's digits with numpy."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
HIDDEN = 32
#: The factor one hidden unit is scaled by (and its outgoing weights divided by) in the sensitive variant: the
#: same function in fp32, but that tensor's range is 10,000 times its other units', so one int8 scale for the
#: whole tensor rounds every other unit to zero.
OUTLIER = 1e4


@dataclass(frozen=True)
class Digits:
    """The 8x8 digits as float32 in [0, 1], shuffled once; the first 1,400 train, the rest evaluate."""

    x: np.ndarray
    y: np.ndarray

    @property
    def train(self) -> tuple[np.ndarray, np.ndarray]:
        return self.x[:1400], self.y[:1400]

    @property
    def test(self) -> tuple[np.ndarray, np.ndarray]:
        return self.x[1400:], self.y[1400:]


def digits() -> Digits:
    """scikit-learn's digits (shipped in its wheel), shuffled with a fixed seed."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    return Digits((x[order] / 16).astype(np.float32), y[order].astype(np.int64))


@dataclass(frozen=True)
class Weights:
    """A 64 -> HIDDEN -> 10 ReLU network."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray


def train(data: Digits, epochs: int = 300, lr: float = 1.0) -> Weights:
    """Full-batch gradient descent on softmax cross-entropy (deterministic: fixed seed, no shuffling)."""
    x, y = data.train
    rng = np.random.default_rng(1)
    w1 = (rng.standard_normal((64, HIDDEN)) / 8).astype(np.float32)
    b1 = np.zeros(HIDDEN, np.float32)
    w2 = (rng.standard_normal((HIDDEN, 10)) / np.sqrt(HIDDEN)).astype(np.float32)
    b2 = np.zeros(10, np.float32)
    for _ in range(epochs):
        h = np.maximum(x @ w1 + b1, 0)
        z = h @ w2 + b2
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(y)), y] -= 1
        g = p / len(y)
        gh = (g @ w2.T) * (h > 0)
        w2 -= lr * (h.T @ g)
        b2 -= lr * g.sum(0)
        w1 -= lr * (x.T @ gh)
        b1 -= lr * gh.sum(0)
    return Weights(w1, b1, w2, b2)


def mlp(weights: Weights, data: Digits, *, sensitive: bool = False) -> onnx.ModelProto:
    """x [batch, 64] -> logits [batch, 10]: Gemm ``fc1``, Relu, (Mul ``scale``), Gemm ``fc2``.

    ``sensitive`` scales the most active hidden unit by OUTLIER before ``fc2`` (whose weights for it are divided
    by as much): the fp32 function is unchanged, but INT8 of that tensor destroys the other units.
    """
    w2 = weights.w2
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["a1"], name="fc1"),
        helper.make_node("Relu", ["a1"], ["h"], name="relu"),
    ]
    inits = [numpy_helper.from_array(weights.w1, "w1"), numpy_helper.from_array(weights.b1, "b1")]
    hidden = "h"
    if sensitive:
        x, _ = data.train
        active = int(np.argmax(np.maximum(x @ weights.w1 + weights.b1, 0).mean(0)))
        scale = np.ones(HIDDEN, np.float32)
        scale[active] = OUTLIER
        w2 = (w2 / scale[:, None]).astype(np.float32)
        nodes.append(helper.make_node("Mul", ["h", "s"], ["hs"], name="scale"))
        inits.append(numpy_helper.from_array(scale, "s"))
        hidden = "hs"
    nodes.append(helper.make_node("Gemm", [hidden, "w2", "b2"], ["logits"], name="fc2"))
    inits += [numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(weights.b2, "b2")]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def save(
    model: onnx.ModelProto, repo: Path, name: str, version: int = 1, manifest: dict[str, Any] | None = None
) -> Path:
    """Write ``repo/name/version/model.onnx`` (and the manifest)."""
    path = repo / name / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    if manifest is not None:
        (repo / name / "oclaw.json").write_text(json.dumps(manifest))
    return path


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose largest logit is the label."""
    return float(np.mean(np.argmax(logits, axis=1) == labels))
