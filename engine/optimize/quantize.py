"""INT8 (static QDQ, dynamic) and FP16 conversions through onnxruntime's own tools, with nodes kept in fp32.

``onnx`` and ``onnxruntime.quantization`` are imported when a conversion runs, never with the serving path.
"""

from __future__ import annotations

import contextlib
import io
import logging
import platform
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import ConfigError, OclawError
from engine.optimize.data import Dataset, Feed

INSTALL_HINT = "oclaw optimize needs onnx: pip install 'oclaw[optimize]'"
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
#: Ops quantized dynamically: where int8 wins on a CPU (MatMul weights, transformer blocks), not Conv.
DYNAMIC_OPS = ("MatMul", "Gemm", "Attention", "LSTM", "EmbedLayerNormalization", "Gather")
#: Items a calibration pass keeps in memory at once (onnxruntime holds every intermediate tensor of each).
_CALIBRATION_STRIDE = 8


class ConversionFailed(OclawError):
    """onnxruntime's tools could not pre-process or convert the model, or what they made does not run."""


def require_onnx() -> Any:
    """The ``onnx`` module, or a ConfigError naming the extra to install."""
    try:
        import onnx
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return onnx


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep the quantization tools' prints, log lines and warnings out of oclaw's output."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


class CalibrationReader:
    """Feeds calibration items to onnxruntime's calibrators (its ``CalibrationDataReader`` protocol)."""

    def __init__(self, data: Dataset, tick: Callable[[], None] | None = None) -> None:
        self.feeds = data.feeds
        self.tick = tick
        self.start, self.end = 0, len(self.feeds)

    def get_next(self) -> Feed | None:
        """The next item, or None at the end of the range."""
        if self.start >= self.end:
            return None
        self.start += 1
        if self.tick is not None:
            self.tick()
        return self.feeds[self.start - 1]

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Limit the items to ``[start_index, end_index)`` (onnxruntime calibrates a stride at a time)."""
        self.start, self.end = start_index, min(end_index, len(self.feeds))


def _stride(n: int) -> int:
    """The largest divisor of ``n`` up to the stride (onnxruntime requires a stride that divides the count)."""
    return next(s for s in range(min(n, _CALIBRATION_STRIDE), 0, -1) if n % s == 0)


def preprocess(source: Path, out: Path) -> None:
    """onnxruntime's quantization pre-processing (shape inference, basic graph fusion), every node named."""
    onnx = require_onnx()
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, out = source.resolve(), out.resolve()
    # onnxruntime's symbolic shape inference leaves sym_shape_infer_temp.onnx (and its weights, the model's size)
    # in the working directory when it cannot infer every shape: run it in the directory of our own output
    with quiet(), contextlib.chdir(out.parent):
        try:
            quant_pre_process(str(source), str(out))
        except Exception:  # noqa: BLE001 - symbolic shape inference rejects some graphs; plain ONNX inference then
            try:
                quant_pre_process(str(source), str(out), skip_symbolic_shape=True)
            except Exception as exc:
                raise ConversionFailed(f"pre-processing failed: {type(exc).__name__}: {exc}") from exc
    model = onnx.load(str(out))
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    onnx.save(model, str(out))


@dataclass(frozen=True)
class Family:
    """One way to convert the model, e.g. static INT8 QDQ with MinMax calibration."""

    method: str
    precision: str
    settings: dict[str, Any]
    quantizable: Callable[[Any], bool] = field(compare=False, repr=False)

    @property
    def label(self) -> str:
        """A short name for tables: ``int8 static minmax``."""
        words = [self.precision, self.method, self.settings.get("calibration_method", "")]
        return " ".join(dict.fromkeys(w for w in words if w))


def _default_domain(node: Any) -> bool:
    return node.domain in ("", "ai.onnx")


def int8_kernels(machine: str | None = None, flags: set[str] | None = None) -> dict[str, Any]:
    """Activation type and weight range of static INT8 for the CPU the graph is measured (and served) on.

    onnxruntime's x86-64 kernels are fast for unsigned activations and signed weights (U8S8): signed activations
    (S8S8, quantize_static's default) run slower than fp32 there, and unsigned ones also keep a ReLU's output at
    full resolution. Without VNNI, U8S8's 16-bit intermediate sums can saturate, so weights keep 7 bits
    (``reduce_range``), as onnxruntime advises. ARM64 (Graviton) kernels are fastest with S8S8.
    """
    machine = machine or platform.machine()
    if machine.lower() not in ("x86_64", "amd64", "i686", "i386"):
        return {"activation_type": "QInt8", "reduce_range": False}
    if flags is None:
        from engine.optimize.prepare import cpu_fingerprint

        flags = set(cpu_fingerprint().split(":", 1)[1].split("+"))
    return {"activation_type": "QUInt8", "reduce_range": not flags & {"avx512_vnni", "avx_vnni", "amx_tile"}}


def static_family(method: str) -> Family:
    """Static INT8 in QDQ format, weights per channel, activations calibrated with ``method``; activation type and
    weight range for this CPU (``int8_kernels``)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    ops = set(QDQRegistry) | set(QLinearOpsRegistry)
    settings = {
        "quant_format": "QDQ",
        "per_channel": True,
        **int8_kernels(),
        "weight_type": "QInt8",
        "calibration_method": method,
    }
    return Family("static", "int8", settings, lambda node: _default_domain(node) and node.op_type in ops)


def dynamic_family() -> Family:
    """Dynamic INT8 (activations quantized at run time), weights per channel, for MatMul-heavy models."""
    settings = {"per_channel": True, "weight_type": "QInt8", "op_types": list(DYNAMIC_OPS)}
    return Family("dynamic", "int8", settings, lambda node: _default_domain(node) and node.op_type in DYNAMIC_OPS)


def fp16_family() -> Family:
    """FP16 weights and arithmetic with fp32 inputs and outputs (for GPUs)."""
    return Family("fp16", "fp16", {"keep_io_types": True}, lambda node: True)


def build(
    family: Family,
    pre: Path,
    out: Path,
    excluded: Sequence[str],
    *,
    calibration: Dataset | None,
    cache: Path,
    tick: Callable[[], None] | None = None,
) -> None:
    """Convert the pre-processed model ``pre`` into ``out``, the ``excluded`` nodes kept in fp32."""
    try:
        _convert(family, pre, out, excluded, calibration=calibration, cache=cache, tick=tick)
    except (ConfigError, ConversionFailed):
        raise
    except Exception as exc:
        raise ConversionFailed(f"{family.label} failed: {type(exc).__name__}: {exc}") from exc


def _convert(
    family: Family,
    pre: Path,
    out: Path,
    excluded: Sequence[str],
    *,
    calibration: Dataset | None,
    cache: Path,
    tick: Callable[[], None] | None,
) -> None:
    onnx = require_onnx()
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    with quiet():
        if family.method == "static":
            if calibration is None:
                raise ConfigError("static INT8 needs --calibration data")
            methods = {
                "minmax": CalibrationMethod.MinMax,
                "percentile": CalibrationMethod.Percentile,
                "entropy": CalibrationMethod.Entropy,
            }
            quantize_static(
                str(pre),
                str(out),
                CalibrationReader(calibration, tick),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType[family.settings["activation_type"]],
                weight_type=QuantType[family.settings["weight_type"]],
                reduce_range=family.settings["reduce_range"],
                calibrate_method=methods[family.settings["calibration_method"]],
                nodes_to_exclude=list(excluded),
                calibration_cache_path=str(cache),
                extra_options={"CalibStridedMinMax": _stride(len(calibration))},
            )
        elif family.method == "dynamic":
            # dynamic quantization rewrites a Gemm as "<name>_MatMul" + Add first: exclude both names
            names = [*excluded, *(f"{n}_MatMul" for n in excluded)]
            quantize_dynamic(
                str(pre), str(out), per_channel=True, nodes_to_exclude=names, op_types_to_quantize=list(DYNAMIC_OPS)
            )
        else:
            from onnxruntime.transformers.float16 import convert_float_to_float16

            model = convert_float_to_float16(onnx.load(str(pre)), keep_io_types=True, node_block_list=list(excluded))
            onnx.save(model, str(out))


def units(model: Any, quantizable: Callable[[Any], bool]) -> list[tuple[str, ...]]:
    """For each activation tensor, the quantizable nodes that produce or consume it: excluding all of them is
    what keeps that tensor in fp32 (a QDQ pair stays while any neighbour of the tensor is quantized)."""
    graph = model.graph
    constants = {i.name for i in graph.initializer} | {
        out for node in graph.node if node.op_type == "Constant" for out in node.output
    }
    producer: dict[str, Any] = {}
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        for name in node.output:
            producer[name] = node
        for name in node.input:
            if name and name not in constants:
                consumers[name].append(node)
    tensors = [i.name for i in graph.input if i.name not in constants]
    tensors += [out for node in graph.node if node.op_type != "Constant" for out in node.output if out]
    found: list[tuple[str, ...]] = []
    for tensor in tensors:
        nodes = ([producer[tensor]] if tensor in producer else []) + consumers.get(tensor, [])
        unit = tuple(sorted({n.name for n in nodes if quantizable(n)}))
        if unit and unit not in found:
            found.append(unit)
    return found


def quantizable_nodes(model: Any, quantizable: Callable[[Any], bool]) -> set[str]:
    """Names of every node ``quantizable`` takes."""
    return {node.name for node in model.graph.node if quantizable(node)}
