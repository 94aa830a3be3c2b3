"""``oclaw optimize``: the next version of a model in INT8 or FP16, as accurate as the budget asks, or nothing."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import onnxruntime as ort

from engine.config import Settings
from engine.errors import ConfigError, ModelLoadError, OclawError
from engine.model import LoadedModel
from engine.optimize import quantize
from engine.optimize.data import Dataset, load_dataset
from engine.optimize.evaluate import choose_metric, latency_ms, open_session, run_all, score
from engine.optimize.prepare import cpu_fingerprint, prepare_file
from engine.optimize.progress import Progress
from engine.optimize.search import Budget, Search, SearchData, Trial
from engine.optimize.versioning import write_version
from engine.repository.local import LocalRepository, ModelFiles, sha256_file

RECORD = "optimization.json"
Precision = Literal["int8", "fp16", "auto"]


@dataclass(frozen=True, kw_only=True)
class OptimizeOptions:
    """What to make and how good it must stay."""

    precision: Precision
    version: int | None = None
    calibration: Path | None = None
    evaluation: Path | None = None
    metric: str | None = None
    max_drop: float | None = None
    calibration_method: Literal["minmax", "percentile", "entropy", "auto"] = "auto"
    #: Which INT8 conversions to try: static QDQ, dynamic, or both (the faster that holds wins).
    int8_mode: Literal["static", "dynamic", "auto"] = "auto"
    #: Node groups measured one at a time when the budget breaks (the most suspect ones, ranked by their error).
    max_candidates: int = 16
    #: Evaluation items those measurements use.
    sensitivity_items: int = 32


@dataclass
class Outcome:
    """What optimize found (and wrote, when ``version`` is set)."""

    name: str
    budget: Budget
    source_latency_ms: float
    source_bytes: int
    trials: list[Trial]
    chosen: Trial | None
    version: int | None = None
    record: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _optimized_from(repo: LocalRepository, name: str, version: int) -> str | None:
    """The source version an optimized version was made from ("?" when unreadable), None for a source."""
    record = repo.root / name / str(version) / RECORD
    if not record.is_file():
        return None
    try:
        return str(json.loads(record.read_text(encoding="utf-8")).get("source_version", "?"))
    except (OSError, ValueError):
        return "?"


def _source(repo: LocalRepository, name: str, version: int | None) -> ModelFiles:
    """The version to start from: the one asked for, else the highest not made by ``oclaw optimize``."""
    versions = repo.versions(name)
    if version is None:
        sources = [v for v in versions if _optimized_from(repo, name, v) is None]
        if not sources:
            raise ConfigError(f"every version of {name!r} was made by oclaw optimize; name a source with --version")
        version = sources[-1]
    if version not in versions:
        raise ConfigError(f"--version {version}: model {name!r} has versions {versions}")
    origin = _optimized_from(repo, name, version)
    if origin is not None:
        raise ConfigError(
            f"{name}/{version} is itself an optimized version (of version {origin}, see its {RECORD}); "
            f"optimize the source version with --version {origin}"
        )
    return repo.files(name, version)


def _families(options: OptimizeOptions, model: Any, calibration: Dataset | None) -> list[quantize.Family]:
    families = []
    if options.precision in ("int8", "auto"):
        if calibration is not None and options.int8_mode in ("static", "auto"):
            families.append(quantize.static_family("minmax"))
        dynamic = quantize.dynamic_family()
        if options.int8_mode in ("dynamic", "auto"):
            if quantize.quantizable_nodes(model, dynamic.quantizable):
                families.append(dynamic)
            elif options.int8_mode == "dynamic":
                ops = ", ".join(quantize.DYNAMIC_OPS)
                raise ConfigError(f"--int8-mode dynamic: the model has none of the ops it quantizes ({ops})")
    if options.precision in ("fp16", "auto"):
        families.append(quantize.fp16_family())
    return families


def _datasets(options: OptimizeOptions, source: LoadedModel, progress: Progress) -> tuple[Dataset, Dataset | None]:
    if options.evaluation is None and options.calibration is None:
        raise ConfigError("--evaluation (or --calibration) data is needed: the metric is measured on it")
    evaluation = (
        load_dataset(options.evaluation, source, flag="--evaluation") if options.evaluation is not None else None
    )
    calibration = (
        load_dataset(options.calibration, source, flag="--calibration") if options.calibration is not None else None
    )
    if evaluation is None:
        assert calibration is not None
        progress.warn("oclaw: no --evaluation data: the metric is measured on the calibration data (optimistic)")
        return calibration, calibration
    if calibration is None and options.precision != "fp16" and options.int8_mode != "dynamic":
        progress.warn("oclaw: no --calibration data: static INT8 calibrates on the evaluation data (optimistic)")
        calibration = evaluation
    return evaluation, calibration


class BudgetNotMet(OclawError):
    """No configuration tried holds the metric budget; nothing was written."""

    def __init__(self, message: str, outcome: Outcome) -> None:
        super().__init__(message)
        self.outcome = outcome


@dataclass(frozen=True)
class _Job:
    """Everything one run measures against."""

    options: OptimizeOptions
    settings: Settings
    files: ModelFiles
    source: LoadedModel
    data: SearchData


def optimize_model(settings: Settings, name: str, options: OptimizeOptions, progress: Progress) -> Outcome:
    """Convert, measure and search; write the next version when a configuration holds the budget."""
    repo = LocalRepository(settings.model_repository)
    files = _source(repo, name, options.version)
    model_dir = repo.root / name
    if not os.access(model_dir, os.W_OK):
        raise ConfigError(f"{model_dir} is not writable: the new version is written beside the others")
    onnx = quantize.require_onnx()
    manifest = repo.manifest(name)
    source = LoadedModel(files, manifest, settings)
    evaluation, calibration = _datasets(options, source, progress)
    metric = choose_metric(options.metric, evaluation.labels is not None)
    max_drop = options.max_drop if options.max_drop is not None else metric.default_max_drop
    if max_drop is None:
        raise ConfigError(f"--metric {metric.name} needs --max-drop (the largest difference allowed)")
    output_names = [o.name for o in source.session.get_outputs()]
    scored = output_names.index(source.classification_output) if source.classification_output else 0
    with tempfile.TemporaryDirectory(prefix="oclaw-optimize-") as tmp:
        work = Path(tmp)
        session = open_session(files.path, settings)
        with progress.step("evaluation (source)", len(evaluation)) as tick:
            reference = run_all(session, evaluation, tick)
        budget = Budget(metric, score(metric, reference, reference, evaluation.labels, scored), max_drop)
        source_latency = latency_ms(session, evaluation.feeds[0])
        pre = work / "pre.onnx"
        progress.status("oclaw: pre-processing (shape inference, basic graph fusion)")
        quantize.preprocess(files.path, pre)
        data = SearchData(
            evaluation=evaluation, calibration=calibration, reference=reference, scored=scored, budget=budget
        )
        search = Search(
            pre, work, data, settings, progress, max_candidates=options.max_candidates, subset=options.sensitivity_items
        )
        methods = (
            quantize.CALIBRATION_METHODS if options.calibration_method == "auto" else (options.calibration_method,)
        )
        chosen = search.run(_families(options, onnx.load(str(pre)), calibration), methods)
        outcome = Outcome(name, budget, source_latency, files.path.stat().st_size, search.trials, chosen)
        if chosen is None:
            raise BudgetNotMet(_not_met(budget, search.trials, search.failures), outcome)
        job = _Job(options, settings, files, source, data)

        def stage(folder: Path, version: int) -> None:
            outcome.record = _stage(folder, version, job, outcome)

        outcome.version = write_version(model_dir, stage)
    outcome.notes = _serving_notes(manifest.versions, outcome.version, files.version)
    if chosen.latency_ms > source_latency:
        outcome.notes.append(
            f"on this CPU the optimized version is slower at batch 1 than the source ({chosen.latency_ms:.3g} vs "
            f"{source_latency:.3g} ms): it is smaller; measure on the CPU or GPU that will serve it"
        )
    return outcome


def _not_met(budget: Budget, trials: list[Trial], failures: list[str]) -> str:
    best = min(trials, key=lambda t: t.drop, default=None)
    what = f"{budget.metric.name} drop <= {budget.max_drop:g} (source {budget.source:.6g})"
    failed = f" ({'; '.join(failures)})" if failures else ""
    if best is None:
        return f"no configuration could be tried for {what}{failed}; the repository is unchanged"
    return (
        f"no configuration holds the budget {what}: the closest, {best.family.label} with "
        f"{len(best.excluded)} node(s) in fp32, drops {best.drop:.6g}{failed}; the repository is unchanged"
    )


def _stage(folder: Path, version: int, job: _Job, outcome: Outcome) -> dict[str, Any]:
    """Write the chosen model, its prepared graph and its record into ``folder``; load it as the server does."""
    chosen = outcome.chosen
    assert chosen is not None
    path = folder / "model.onnx"
    shutil.copyfile(chosen.path, path)
    prepare_file(path, level="extended")
    value = verify(ModelFiles(job.source.name, version, path), job.source, job.data)
    record = _record(version, job, chosen, value, outcome)
    (folder / RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


def verify(files: ModelFiles, source: LoadedModel, data: SearchData) -> float:
    """Load the new version as the server would (prepared graph, signature, warm-up) and measure it again."""
    model = LoadedModel(files, source.manifest, source.settings)
    try:
        if model.inputs != source.inputs or model.outputs != source.outputs:
            raise ModelLoadError(
                f"the optimized model's signature {[s.as_dict() for s in model.inputs + model.outputs]} differs "
                f"from the source's {[s.as_dict() for s in source.inputs + source.outputs]}"
            )
        if source.settings.warmup != "false" and model.warm_up() is None and source.warm_up() is not None:
            raise ModelLoadError(f"the optimized model does not run its warm-up: {model.warmup_error}")
        names = [o.name for o in model.session.get_outputs()]
        outputs = [list(model.session.run(names, feed)) for feed in data.evaluation.feeds]
        budget = data.budget
        value = score(budget.metric, outputs, data.reference, data.evaluation.labels, data.scored)
        if not budget.holds(value):
            raise ModelLoadError(
                f"loaded as the server loads it, the optimized model measures {budget.metric.name} {value:.6g}, "
                "outside the budget"
            )
        return value
    finally:
        model.close()


def _round(value: float) -> float | str:
    return round(value, 6) if math.isfinite(value) else str(value)


def _record(version: int, job: _Job, chosen: Trial, value: float, outcome: Outcome) -> dict[str, Any]:
    budget = outcome.budget
    settings_used = {**chosen.family.settings, "fusion": "basic (in model.onnx)", "prepared": "extended"}
    if chosen.family.method == "static" and job.data.calibration is not None:
        settings_used["calibration"] = job.data.calibration.summary()
    return {
        "version": version,
        "source_version": job.files.version,
        "source_sha256": sha256_file(job.files.path),
        "method": "-".join(dict.fromkeys((chosen.family.precision, chosen.family.method))),
        "precision": chosen.family.precision,
        "requested_precision": job.options.precision,
        "settings": settings_used,
        "nodes_fp32": list(chosen.excluded),
        "metric": {
            "name": budget.metric.name,
            "source": _round(budget.source),
            "optimized": _round(value),
            "drop": _round(budget.drop(value)),
            "max_drop": budget.max_drop,
        },
        "size_bytes": {"source": outcome.source_bytes, "optimized": chosen.bytes},
        "latency_ms": {
            "source": round(outcome.source_latency_ms, 4),
            "optimized": round(chosen.latency_ms, 4),
            "batch": 1,
            "cpu": cpu_fingerprint(),
            "threads": job.settings.threads,
        },
        "evaluation": job.data.evaluation.summary(),
        "tried": [t.row() for t in outcome.trials],
        "onnxruntime": ort.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _serving_notes(policy: Any, version: int | None, source_version: int) -> list[str]:
    """How the manifest's ``versions`` policy serves the new version, and how to roll back."""
    if policy == "latest":
        return [
            f"version {version} is now the one served; to serve version {source_version} again, set "
            f'"versions": [{source_version}] in oclaw.json'
        ]
    if policy == "all":
        return [f"every version is served; requests without a version get {version}"]
    return [f"oclaw.json pins versions {list(policy)}: add {version} to serve it"]
