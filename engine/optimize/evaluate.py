"""Measuring a model: its outputs on a data set, a metric against the source's, batch-1 latency and size."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter_ns

import numpy as np
import onnxruntime as ort

from engine.config import Settings
from engine.errors import ConfigError
from engine.optimize.data import Dataset, Feed
from engine.session import session_options

Outputs = list[np.ndarray]


@dataclass(frozen=True)
class Metric:
    """How an optimized model's outputs are scored, and which way is better."""

    name: str
    higher_is_better: bool
    #: The budget when --max-drop is not given (None: it must be given).
    default_max_drop: float | None
    needs_labels: bool
    description: str

    def drop(self, source: float, value: float) -> float:
        """How much worse ``value`` is than ``source`` (negative when better)."""
        return source - value if self.higher_is_better else value - source


METRICS = {
    m.name: m
    for m in (
        Metric("accuracy", True, 0.01, True, "share of items whose top class is their label"),
        Metric("top1", True, 0.01, False, "share of items whose top class is the source model's"),
        Metric("cosine", True, 0.001, False, "mean cosine similarity of the outputs to the source's"),
        Metric("max-abs", False, None, False, "largest absolute difference from the source's outputs"),
    )
}


def choose_metric(name: str | None, labelled: bool) -> Metric:
    """The metric asked for, or ``accuracy`` for labelled data and ``top1`` otherwise."""
    metric = METRICS[name or ("accuracy" if labelled else "top1")]
    if metric.needs_labels and not labelled:
        raise ConfigError(
            f"--metric {metric.name} needs labelled evaluation data (a 'label' per item: a .npz 'label' array, "
            "a 'label' key per JSON line, or images in one subfolder per class); use top1, cosine or max-abs"
        )
    return metric


def open_session(path: Path, settings: Settings) -> ort.InferenceSession:
    """A CPU session for measuring, with the options the server uses."""
    return ort.InferenceSession(str(path), sess_options=session_options(settings), providers=["CPUExecutionProvider"])


def run_all(session: ort.InferenceSession, data: Dataset, tick: Callable[[], None] | None = None) -> list[Outputs]:
    """Every output of every item."""
    names = [o.name for o in session.get_outputs()]
    results = []
    for feed in data.feeds:
        results.append(list(session.run(names, feed)))
        if tick is not None:
            tick()
    return results


def _top(arr: np.ndarray) -> int:
    """The predicted class: the value of an integer output (a label), else the index of the largest score."""
    flat = np.asarray(arr).reshape(-1)
    if np.issubdtype(flat.dtype, np.integer):
        return int(flat[0])
    return int(np.argmax(np.nan_to_num(flat.astype(np.float64), nan=-np.inf)))


def _floats(outputs: Outputs) -> np.ndarray:
    parts = [np.asarray(o, dtype=np.float64).reshape(-1) for o in outputs if np.issubdtype(o.dtype, np.floating)]
    return np.concatenate(parts) if parts else np.zeros(0)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return -1.0
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb))


def score(
    metric: Metric,
    outputs: Sequence[Outputs],
    reference: Sequence[Outputs],
    labels: Sequence[int] | None,
    scored: int,
) -> float:
    """The metric of ``outputs`` (output ``scored`` for class metrics) against the source's ``reference``."""
    if metric.name == "accuracy":
        assert labels is not None
        return float(np.mean([_top(out[scored]) == label for out, label in zip(outputs, labels, strict=True)]))
    if metric.name == "top1":
        return float(np.mean([_top(o[scored]) == _top(r[scored]) for o, r in zip(outputs, reference, strict=True)]))
    pairs = [(_floats(o), _floats(r)) for o, r in zip(outputs, reference, strict=True)]
    if metric.name == "cosine":
        return float(np.mean([_cosine(a, b) for a, b in pairs]))
    worst = 0.0
    for a, b in pairs:
        if a.shape != b.shape or not np.all(np.isfinite(a)):
            return math.inf
        if a.size:
            worst = max(worst, float(np.max(np.abs(a - b))))
    return worst


def relative_error(outputs: Sequence[Outputs], reference: Sequence[Outputs]) -> float:
    """Mean relative L2 error of the float outputs (a smooth measure for ranking, not a budget)."""
    errors = []
    for o, r in zip(outputs, reference, strict=True):
        a, b = _floats(o), _floats(r)
        if a.shape != b.shape or not np.all(np.isfinite(a)):
            return math.inf
        errors.append(float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-12)))
    return float(np.mean(errors)) if errors else 0.0


def _with_outputs(path: Path, names: Sequence[str]) -> tuple[ort.InferenceSession, list[str]]:
    """A session of the model at ``path`` that also returns those of ``names`` its graph has."""
    from engine.optimize.quantize import quiet, require_onnx

    onnx = require_onnx()
    model = onnx.load(str(path))
    present = {out for node in model.graph.node for out in node.output}
    outputs = {o.name for o in model.graph.output}
    fetch = [n for n in names if n in present]
    for name in fetch:
        if name not in outputs:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    with quiet():
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session, fetch


def tensor_errors(reference: Path, candidate: Path, names: Sequence[str], data: Dataset) -> dict[str, float]:
    """Mean relative L2 error of each named intermediate tensor of ``candidate`` against the same-named one of
    ``reference``, one item at a time (never every item's tensors in memory at once)."""
    ref_session, ref_names = _with_outputs(reference, names)
    got_session, got_names = _with_outputs(candidate, ref_names)
    sums: dict[str, float] = dict.fromkeys(got_names, 0.0)
    for feed in data.feeds:
        want = dict(zip(ref_names, ref_session.run(ref_names, feed), strict=True))
        for name, value in zip(got_names, got_session.run(got_names, feed), strict=True):
            a, b = np.asarray(value, dtype=np.float64), np.asarray(want[name], dtype=np.float64)
            if name in sums and a.shape == b.shape and np.issubdtype(value.dtype, np.floating):
                sums[name] += float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-12))
            else:
                sums.pop(name, None)
    return {name: total / max(1, len(data)) for name, total in sums.items()}


def latency_ms(session: ort.InferenceSession, feed: Feed, *, budget_s: float = 0.5, max_runs: int = 200) -> float:
    """Median batch-1 run time in milliseconds (after warm-up runs), measured on this CPU."""
    names = [o.name for o in session.get_outputs()]
    for _ in range(3):
        session.run(names, feed)
    times: list[int] = []
    deadline = perf_counter_ns() + int(budget_s * 1e9)
    while len(times) < max_runs and (len(times) < 10 or perf_counter_ns() < deadline):
        start = perf_counter_ns()
        session.run(names, feed)
        times.append(perf_counter_ns() - start)
    return statistics.median(times) / 1e6
