"""A ResNet-50 (v1.5) shaped ONNX model built with onnx.helper + numpy, cached on disk.

Layout follows torchvision's resnet50: a 7x7/2 stem, 3x3/2 max-pool, bottleneck stages [3, 4, 6, 3]
(the stride sits on the 3x3 conv: "v1.5"), global average pool, flatten, a 2048 -> 1000 Gemm.
Every Conv has no bias and is followed by a separate BatchNormalization, like an exported model
before any fusion.  Weights are He-normal with a fixed seed; the BatchNormalization running
statistics are calibrated with a numpy forward pass over a small random batch, so every BN output
is ~N(0, 1) per channel and activations stay sane through all 16 residual blocks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.common import save_atomically

VERSION = "resnet50-v1.5-he-bncal-seed0-r1"
SEED = 0
OPSET = 17
BLOCKS = (3, 4, 6, 3)
WIDTHS = (64, 128, 256, 512)
EXPANSION = 4
EPS = 1e-5
#: Images in the calibration batch (per-channel BN statistics are estimated from it).
CALIBRATION_BATCH = 2


def _conv(x: np.ndarray, w: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """NCHW convolution without bias (numpy, for calibration only)."""
    from numpy.lib.stride_tricks import sliding_window_view

    k = w.shape[2]
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    if k == 1:
        cols = x[:, :, ::stride, ::stride]
        out = np.tensordot(w[:, :, 0, 0], cols, axes=([1], [1]))  # o, n, h, w
        return np.ascontiguousarray(out.transpose(1, 0, 2, 3))
    win = sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]  # n, c, oh, ow, k, k
    out = np.tensordot(win, w, axes=([1, 4, 5], [1, 2, 3]))  # n, oh, ow, o
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def _maxpool(x: np.ndarray) -> np.ndarray:
    from numpy.lib.stride_tricks import sliding_window_view

    x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    return np.ascontiguousarray(sliding_window_view(x, (3, 3), axis=(2, 3))[:, :, ::2, ::2].max(axis=(4, 5)))


class _Builder:
    """Accumulates nodes and initializers while running the calibration forward pass."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[object] = []
        self.inits: list[object] = []
        self.params = 0
        self.n = 0

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}_{self.n}"

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        self.params += array.size
        return name

    def conv_bn(
        self, x_name: str, x: np.ndarray, cout: int, k: int, stride: int, *, relu: bool, gamma: float = 1.0
    ) -> tuple[str, np.ndarray]:
        """Conv (He-normal, no bias) + BatchNormalization (calibrated) [+ Relu]."""
        from onnx import helper

        cin = x.shape[1]
        pad = k // 2
        w = (self.rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        y = _conv(x, w, stride, pad)
        mean = y.mean(axis=(0, 2, 3))
        var = y.var(axis=(0, 2, 3)) + 1e-6
        scale = np.full(cout, gamma, dtype=np.float32)
        bias = np.zeros(cout, dtype=np.float32)
        y = (y - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + EPS) * gamma
        base = self.name("conv")
        w_name = self.init(f"{base}.weight", w)
        conv_out = f"{base}.out"
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x_name, w_name],
                [conv_out],
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[pad, pad, pad, pad],
            )
        )
        bn_inputs = [
            conv_out,
            self.init(f"{base}.bn.scale", scale),
            self.init(f"{base}.bn.bias", bias),
            self.init(f"{base}.bn.mean", mean),
            self.init(f"{base}.bn.var", var),
        ]
        bn_out = f"{base}.bn.out"
        self.nodes.append(helper.make_node("BatchNormalization", bn_inputs, [bn_out], epsilon=EPS))
        if not relu:
            return bn_out, y.astype(np.float32)
        out = f"{base}.relu"
        self.nodes.append(helper.make_node("Relu", [bn_out], [out]))
        return out, np.maximum(y, 0).astype(np.float32)

    def bottleneck(self, x_name: str, x: np.ndarray, width: int, stride: int) -> tuple[str, np.ndarray]:
        from onnx import helper

        cout = width * EXPANSION
        h_name, h = self.conv_bn(x_name, x, width, 1, 1, relu=True)
        h_name, h = self.conv_bn(h_name, h, width, 3, stride, relu=True)
        h_name, h = self.conv_bn(h_name, h, cout, 1, 1, relu=False)
        if stride != 1 or x.shape[1] != cout:
            s_name, s = self.conv_bn(x_name, x, cout, 1, stride, relu=False)
        else:
            s_name, s = x_name, x
        add = self.name("add")
        out = f"{add}.relu"
        self.nodes.append(helper.make_node("Add", [h_name, s_name], [add]))
        self.nodes.append(helper.make_node("Relu", [add], [out]))
        return out, np.maximum(h + s, 0).astype(np.float32)


def build(seed: int = SEED) -> object:
    """The ResNet-50 v1.5 ModelProto (input "input" [batch,3,224,224] FP32, output "logits" [batch,1000])."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    b = _Builder(rng)
    x = rng.standard_normal((CALIBRATION_BATCH, 3, 224, 224)).astype(np.float32)
    name, x = b.conv_bn("input", x, 64, 7, 2, relu=True)
    pool = "stem.maxpool"
    b.nodes.append(helper.make_node("MaxPool", [name], [pool], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    name, x = pool, _maxpool(x)
    for stage, (blocks, width) in enumerate(zip(BLOCKS, WIDTHS, strict=True)):
        for i in range(blocks):
            stride = 2 if (i == 0 and stage > 0) else 1
            name, x = b.bottleneck(name, x, width, stride)
    b.nodes.append(helper.make_node("GlobalAveragePool", [name], ["gap"]))
    b.nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], axis=1))
    feat = x.mean(axis=(2, 3))
    fc_w = (rng.standard_normal((1000, 2048)) * np.sqrt(1.0 / 2048)).astype(np.float32)
    logits = feat @ fc_w.T
    fc_b = (-logits.mean(axis=0)).astype(np.float32)  # centre the logits of the calibration batch
    b.nodes.append(
        helper.make_node("Gemm", ["flat", b.init("fc.weight", fc_w), b.init("fc.bias", fc_b)], ["logits"], transB=1)
    )
    graph = helper.make_graph(
        b.nodes,
        "resnet50_v1_5",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="oclaw-benchmarks")
    model.ir_version = 8
    model.doc_string = f"{VERSION}; {b.params} parameters"
    onnx.checker.check_model(model)
    return model


def cached_model(cache_dir: Path) -> Path:
    """Path of the cached model file, building it (once per VERSION) if missing."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{VERSION}.onnx"
    if path.is_file():
        return path
    model = build()
    save_atomically(model, path)
    return path


def parameter_count(path: Path) -> tuple[int, int]:
    """(learnable parameters, BatchNormalization running-statistics buffers) stored in a model file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    learnable = buffers = 0
    for t in model.graph.initializer:
        n = int(np.prod(t.dims))
        if t.name.endswith((".bn.mean", ".bn.var")):
            buffers += n
        else:
            learnable += n
    return learnable, buffers


if __name__ == "__main__":  # pragma: no cover - manual use
    import sys
    import time

    t0 = time.perf_counter()
    p = cached_model(Path(sys.argv[1] if len(sys.argv) > 1 else "bench-results/cache"))
    params, buffers = parameter_count(p)
    print(p, f"{params:,} parameters + {buffers:,} BN buffers", f"{time.perf_counter() - t0:.1f} s")
