"""A small CNN trained on scikit-learn's 8x8 digits with numpy alone (im2col, Adam), written as ONNX.

Layout: conv 3x3 (1 -> C1) + ReLU, conv 3x3 (C1 -> C2) + ReLU, 2x2 max-pool, conv 3x3 (C2 -> C3) + ReLU,
global average pool, dense C3 -> 10. Every conv pads by one, so the maps are 8x8, 8x8, then 4x4. Seeds are
fixed, so the same VERSION always trains the same weights. The data is ``tests.optimodels.digits()``: 1,400
shuffled digits train, the other 397 are held out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from benchmarks.common import save_atomically

if TYPE_CHECKING:  # pragma: no cover
    import onnx

VERSION = "digits-cnn-c96-192-384-adam-e16-seed0-r1"
#: Wide enough that the convolutions, not the per-node overhead, set the batch-1 latency.
CHANNELS = (96, 192, 384)
EPOCHS = 16
BATCH = 64
LEARNING_RATE = 2e-3
SEED = 0
OPSET = 17


@dataclass
class Params:
    """Conv weights [out, in, 3, 3] with their biases, and the dense layer [C3, 10]."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    w3: np.ndarray
    b3: np.ndarray
    wd: np.ndarray
    bd: np.ndarray

    def arrays(self) -> list[np.ndarray]:
        return [self.w1, self.b1, self.w2, self.b2, self.w3, self.b3, self.wd, self.bd]


def init(seed: int = SEED, channels: tuple[int, int, int] = CHANNELS) -> Params:
    """He-normal weights, zero biases."""
    rng = np.random.default_rng(seed)
    c1, c2, c3 = channels

    def he(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return np.asarray(rng.standard_normal(shape) * np.sqrt(2.0 / fan_in), dtype=np.float32)

    return Params(
        he((c1, 1, 3, 3), 9),
        np.zeros(c1, np.float32),
        he((c2, c1, 3, 3), c1 * 9),
        np.zeros(c2, np.float32),
        he((c3, c2, 3, 3), c2 * 9),
        np.zeros(c3, np.float32),
        (rng.standard_normal((c3, 10)) * np.sqrt(1.0 / c3)).astype(np.float32),
        np.zeros(10, np.float32),
    )


def _cols(x: np.ndarray) -> np.ndarray:
    """im2col of a 3x3 convolution padded by one: [N, C, H, W] -> [N*H*W, C*9] (rows ordered n, h, w)."""
    from numpy.lib.stride_tricks import sliding_window_view

    n, c, h, w = x.shape
    win = sliding_window_view(np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))), (3, 3), axis=(2, 3))  # n c h w 3 3
    return np.ascontiguousarray(win.transpose(0, 2, 3, 1, 4, 5)).reshape(n * h * w, c * 9)


def _uncols(d: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The gradient of ``_cols``: [N*H*W, C*9] back onto [N, C, H, W]."""
    n, c, h, w = shape
    d6 = d.reshape(n, h, w, c, 3, 3)
    out = np.zeros((n, c, h + 2, w + 2), np.float32)
    for i in range(3):
        for j in range(3):
            out[:, :, i : i + h, j : j + w] += d6[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return out[:, :, 1:-1, 1:-1]


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 convolution (pad 1) + bias: the output [N, O, H, W] and the im2col matrix (for the backward pass)."""
    n, _, h, wd = x.shape
    cols = _cols(x)
    out = cols @ w.reshape(w.shape[0], -1).T + b
    return np.ascontiguousarray(out.reshape(n, h, wd, -1).transpose(0, 3, 1, 2)), cols


def forward(p: Params, x: np.ndarray) -> np.ndarray:
    """Logits [N, 10] of images [N, 1, 8, 8]."""
    return _forward(p, x)[0]


def _forward(p: Params, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    z1, c1 = _conv(x, p.w1, p.b1)
    a1 = np.maximum(z1, 0)
    z2, c2 = _conv(a1, p.w2, p.b2)
    a2 = np.maximum(z2, 0)
    n, c, h, w = a2.shape
    blocks = a2.reshape(n, c, h // 2, 2, w // 2, 2)
    pooled = blocks.max(axis=(3, 5))
    z3, c3 = _conv(pooled, p.w3, p.b3)
    a3 = np.maximum(z3, 0)
    g = a3.mean(axis=(2, 3))
    logits = g @ p.wd + p.bd
    cache = {"x": x, "c1": c1, "z1": z1, "a1": a1, "c2": c2, "z2": z2, "a2": a2, "pooled": pooled}
    cache.update({"c3": c3, "z3": z3, "g": g})
    return logits, cache


def _grads(p: Params, x: np.ndarray, y: np.ndarray) -> tuple[float, list[np.ndarray]]:
    """Softmax cross-entropy and its gradient for every array of ``p`` (same order as ``Params.arrays``)."""
    logits, k = _forward(p, x)
    n = len(y)
    e = np.exp(logits - logits.max(1, keepdims=True))
    prob = e / e.sum(1, keepdims=True)
    loss = float(-np.mean(np.log(prob[np.arange(n), y] + 1e-12)))
    dz = prob
    dz[np.arange(n), y] -= 1
    dz /= n
    gwd, gbd = k["g"].T @ dz, dz.sum(0)
    dg = dz @ p.wd.T  # n, c3
    h3, w3 = k["z3"].shape[2:]
    da3 = np.broadcast_to(dg[:, :, None, None] / (h3 * w3), k["z3"].shape)
    dz3 = (da3 * (k["z3"] > 0)).transpose(0, 2, 3, 1).reshape(-1, p.w3.shape[0])
    gw3, gb3 = (dz3.T @ k["c3"]).reshape(p.w3.shape), dz3.sum(0)
    dpooled = _uncols(dz3 @ p.w3.reshape(p.w3.shape[0], -1), k["pooled"].shape)
    a2 = k["a2"]
    nn, c, h, w = a2.shape
    blocks = a2.reshape(nn, c, h // 2, 2, w // 2, 2)
    mask = blocks == k["pooled"][:, :, :, None, :, None]
    da2 = (mask * dpooled[:, :, :, None, :, None]).reshape(a2.shape)
    dz2 = (da2 * (k["z2"] > 0)).transpose(0, 2, 3, 1).reshape(-1, p.w2.shape[0])
    gw2, gb2 = (dz2.T @ k["c2"]).reshape(p.w2.shape), dz2.sum(0)
    da1 = _uncols(dz2 @ p.w2.reshape(p.w2.shape[0], -1), k["a1"].shape)
    dz1 = (da1 * (k["z1"] > 0)).transpose(0, 2, 3, 1).reshape(-1, p.w1.shape[0])
    gw1, gb1 = (dz1.T @ k["c1"]).reshape(p.w1.shape), dz1.sum(0)
    return loss, [gw1, gb1, gw2, gb2, gw3, gb3, gwd, gbd]


def images(x: np.ndarray) -> np.ndarray:
    """Flat digits [N, 64] in [0, 1] -> images [N, 1, 8, 8] float32."""
    return np.ascontiguousarray(x.reshape(-1, 1, 8, 8), dtype=np.float32)


def train(
    x: np.ndarray, y: np.ndarray, *, epochs: int = EPOCHS, seed: int = SEED, channels: tuple[int, int, int] = CHANNELS
) -> Params:
    """Adam on minibatches of softmax cross-entropy (a fixed seed shuffles the batches)."""
    p = init(seed, channels)
    params = p.arrays()
    m = [np.zeros_like(a) for a in params]
    v = [np.zeros_like(a) for a in params]
    rng = np.random.default_rng(seed + 1)
    xi = images(x)
    beta1, beta2, step = 0.9, 0.999, 0
    for epoch in range(epochs):
        lr = LEARNING_RATE * (0.5 * (1 + np.cos(np.pi * epoch / epochs)))  # cosine decay
        order = rng.permutation(len(y))
        for start in range(0, len(y), BATCH):
            idx = order[start : start + BATCH]
            _, grads = _grads(p, xi[idx], y[idx])
            step += 1
            for i, g in enumerate(grads):  # in place: ``params`` are the arrays of ``p``
                m[i] *= beta1
                m[i] += (1 - beta1) * g
                v[i] *= beta2
                v[i] += (1 - beta2) * g * g
                mhat = m[i] / (1 - beta1**step)
                vhat = v[i] / (1 - beta2**step)
                params[i] -= (lr * mhat / (np.sqrt(vhat) + 1e-8)).astype(np.float32)
    return p


def to_onnx(p: Params) -> onnx.ModelProto:
    """The ModelProto: input ``x`` [batch, 1, 8, 8] FP32, output ``logits`` [batch, 10]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.ascontiguousarray(a, dtype=np.float32), name)
        for a, name in zip(p.arrays(), ("w1", "b1", "w2", "b2", "w3", "b3", "wd", "bd"), strict=True)
    ]
    k, pads = [3, 3], [1, 1, 1, 1]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["z1"], name="conv1", kernel_shape=k, pads=pads),
        helper.make_node("Relu", ["z1"], ["a1"], name="relu1"),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["z2"], name="conv2", kernel_shape=k, pads=pads),
        helper.make_node("Relu", ["z2"], ["a2"], name="relu2"),
        helper.make_node("MaxPool", ["a2"], ["p2"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p2", "w3", "b3"], ["z3"], name="conv3", kernel_shape=k, pads=pads),
        helper.make_node("Relu", ["z3"], ["a3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["a3"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "wd", "bd"], ["logits"], name="dense"),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="oclaw-benchmarks")
    model.ir_version = 8
    model.doc_string = VERSION
    onnx.checker.check_model(model)
    return model


def cached_model(cache_dir: Path) -> Path:
    """Path of the trained model (``<cache_dir>/<VERSION>.onnx``), training it once per VERSION."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{VERSION}.onnx"
    if path.is_file():
        return path
    from tests.optimodels import digits

    x, y = digits().train
    model = to_onnx(train(x, y))
    save_atomically(model, path)
    return path


if __name__ == "__main__":  # pragma: no cover - manual use
    import sys
    import time

    from tests.optimodels import digits

    t0 = time.perf_counter()
    data = digits()
    params = train(*data.train)
    xt, yt = data.test
    acc = float(np.mean(np.argmax(forward(params, images(xt)), 1) == yt))
    print(f"held-out accuracy {acc:.4f}, trained in {time.perf_counter() - t0:.1f} s")
    if len(sys.argv) > 1:
        print(cached_model(Path(sys.argv[1])))
