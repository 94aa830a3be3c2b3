"""Accuracy-targeted mixed precision: convert, measure against the source, keep the nodes most responsible for
a drop over budget in fp32, re-measure; the fastest configuration that holds the budget wins."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import Settings
from engine.optimize import quantize
from engine.optimize.data import Dataset
from engine.optimize.evaluate import (
    Metric,
    Outputs,
    latency_ms,
    open_session,
    relative_error,
    run_all,
    score,
    tensor_errors,
)
from engine.optimize.progress import Progress
from engine.optimize.quantize import Family


@dataclass(frozen=True)
class Budget:
    """The metric, its value for the source model and the largest drop allowed."""

    metric: Metric
    source: float
    max_drop: float

    def drop(self, value: float) -> float:
        """How much worse ``value`` is than the source's."""
        return self.metric.drop(self.source, value)

    def holds(self, value: float) -> bool:
        """True when ``value`` is within the budget."""
        return math.isfinite(value) and self.drop(value) <= self.max_drop + 1e-12


@dataclass(frozen=True)
class Trial:
    """One configuration tried, as measured."""

    family: Family
    excluded: tuple[str, ...]
    path: Path
    value: float
    drop: float
    holds: bool
    latency_ms: float
    bytes: int

    def row(self) -> dict[str, Any]:
        """The trial as a JSON-ready record."""
        return {
            "method": self.family.label,
            "nodes_fp32": list(self.excluded),
            "metric": _finite(self.value),
            "drop": _finite(self.drop),
            "holds": self.holds,
            "latency_ms": round(self.latency_ms, 4),
            "bytes": self.bytes,
        }


def _finite(value: float) -> float | str:
    return round(value, 6) if math.isfinite(value) else str(value)


@dataclass(frozen=True, kw_only=True)
class SearchData:
    """What every trial is measured on."""

    evaluation: Dataset
    calibration: Dataset | None
    #: The source model's outputs for each evaluation item.
    reference: list[Outputs]
    #: Index of the output class metrics read.
    scored: int
    budget: Budget


class Search:
    """Tries configurations of each family, searching for nodes to keep in fp32 where the budget breaks."""

    def __init__(
        self,
        pre: Path,
        work: Path,
        data: SearchData,
        settings: Settings,
        progress: Progress,
        *,
        max_candidates: int = 16,
        subset: int = 32,
    ) -> None:
        self.pre, self.work, self.data, self.settings, self.progress = pre, work, data, settings, progress
        self.max_candidates, self.subset = max_candidates, subset
        self.trials: list[Trial] = []
        self._model = quantize.require_onnx().load(str(pre))
        self._count = 0
        #: Why a family (or a calibration method) could not be tried.
        self.failures: list[str] = []

    # -- measuring -------------------------------------------------------------------------------------

    def _build(self, family: Family, excluded: Sequence[str]) -> Path:
        self._count += 1
        out = self.work / f"trial-{self._count}.onnx"
        method = family.settings.get("calibration_method", "")
        cache = self.work / f"calibration-{method}.json"
        calibration = self.data.calibration
        if family.method == "static" and calibration is not None and not cache.exists():
            with self.progress.step(f"calibration ({method})", len(calibration)) as tick:
                quantize.build(family, self.pre, out, excluded, calibration=calibration, cache=cache, tick=tick)
        else:
            quantize.build(family, self.pre, out, excluded, calibration=calibration, cache=cache)
        return out

    def _outputs(self, family: Family, path: Path, data: Dataset, label: str = "") -> tuple[Any, list[Outputs]]:
        """A session of a converted model and its outputs on ``data``."""
        try:
            session = open_session(path, self.settings)
            if not label:
                return session, run_all(session, data)
            with self.progress.step(label, len(data)) as tick:
                return session, run_all(session, data, tick)
        except Exception as exc:
            raise quantize.ConversionFailed(f"{family.label}: the converted model does not run: {exc}") from exc

    def trial(self, family: Family, excluded: Sequence[str] = ()) -> Trial:
        """Convert with ``excluded`` kept in fp32, measure the metric on the evaluation set and the latency."""
        path = self._build(family, excluded)
        data = self.data
        label = f"evaluation ({family.label}, {len(excluded)} fp32)" if excluded else f"evaluation ({family.label})"
        session, outputs = self._outputs(family, path, data.evaluation, label)
        value = score(data.budget.metric, outputs, data.reference, data.evaluation.labels, data.scored)
        trial = Trial(
            family,
            tuple(excluded),
            path,
            value,
            data.budget.drop(value),
            data.budget.holds(value),
            latency_ms(session, data.evaluation.feeds[0]),
            path.stat().st_size,
        )
        self.trials.append(trial)
        return trial

    # -- sensitivity -----------------------------------------------------------------------------------

    def _increments(self, trial: Trial, subset: Dataset) -> dict[str, float]:
        """Per node: how much its outputs' error (vs fp32, same tensor names) exceeds its inputs' error."""
        names = [out for node in self._model.graph.node for out in node.output]
        error = tensor_errors(self.pre, trial.path, names, subset)
        increments = {}
        for node in self._model.graph.node:
            out = max((error.get(o, 0.0) for o in node.output), default=0.0)
            inp = max((error.get(i, 0.0) for i in node.input), default=0.0)
            increments[node.name] = max(0.0, out - inp) if math.isfinite(out) else math.inf
        return increments

    def rank(self, family: Family, base: Trial) -> list[tuple[str, ...]]:
        """Groups of nodes, most responsible for the drop first: measured one group excluded at a time; a group
        whose exclusion does not bring the outputs closer to the source's is left out."""
        everything = quantize.quantizable_nodes(self._model, family.quantizable)
        groups = [u for u in quantize.units(self._model, family.quantizable) if set(u) != everything]
        subset = self.data.evaluation.head(self.subset)
        reference = self.data.reference[: len(subset)]
        if len(groups) > self.max_candidates:
            increments = self._increments(base, subset)
            order = sorted(range(len(groups)), key=lambda i: (-max(increments.get(n, 0.0) for n in groups[i]), i))
            groups = [groups[i] for i in order[: self.max_candidates]]
        base_error = relative_error(self._outputs(family, base.path, subset)[1], reference)
        errors = []
        with self.progress.step(f"sensitivity ({family.label})", len(groups)) as tick:
            for group in groups:
                try:
                    path = self._build(family, group)
                    errors.append(relative_error(self._outputs(family, path, subset)[1], reference))
                    path.unlink()
                except quantize.ConversionFailed:
                    errors.append(math.inf)  # this group cannot be excluded: not a candidate
                tick()
        order = sorted((i for i in range(len(groups)) if errors[i] < base_error), key=lambda i: (errors[i], i))
        return [groups[i] for i in order]

    def search(self, family: Family, base: Trial) -> Trial | None:
        """Exclude the ranked groups one after another, re-measuring, until the budget holds."""
        everything = quantize.quantizable_nodes(self._model, family.quantizable)
        excluded: list[str] = []
        for group in self.rank(family, base):
            added = [n for n in group if n not in excluded]
            if not added:
                continue
            if set(excluded) | set(added) >= everything:
                break  # nothing would be left converted
            excluded += added
            trial = self.trial(family, sorted(excluded))
            if trial.holds:
                return trial
            trial.path.unlink()
        return None

    # -- the whole search --------------------------------------------------------------------------------

    def run(self, families: Sequence[Family], calibration_methods: Sequence[str]) -> Trial | None:
        """Every family's base configuration, a search where it breaks the budget; the fastest that holds."""
        for family in families:
            try:
                if family.method == "static":
                    base = self._static_base(calibration_methods)
                else:
                    self.progress.status(f"oclaw: trying {family.label}")
                    base = self.trial(family)
                if not base.holds:
                    self.progress.status(
                        f"oclaw: {base.family.label} breaks the budget; measuring per-node sensitivity"
                    )
                    self.search(base.family, base)
            except quantize.ConversionFailed as exc:
                self.failures.append(exc.message)
                self.progress.warn(f"oclaw: {exc.message}")
        holding = [t for t in self.trials if t.holds]
        if not holding:
            return None
        return min(holding, key=lambda t: (t.latency_ms, len(t.excluded)))

    def _static_base(self, methods: Sequence[str]) -> Trial:
        """Static INT8 with each calibration method until one holds; the best one measured otherwise."""
        tried: list[Trial] = []
        for method in methods:
            family = quantize.static_family(method)
            self.progress.status(f"oclaw: trying {family.label}")
            try:
                trial = self.trial(family)
            except quantize.ConversionFailed as exc:
                if method == methods[-1] and not tried:
                    raise
                self.failures.append(exc.message)
                self.progress.warn(f"oclaw: {exc.message}")
                continue
            tried.append(trial)
            if trial.holds:
                return trial
        return min(tried, key=lambda t: t.drop)
