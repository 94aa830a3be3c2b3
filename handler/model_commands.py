"""The ``oclaw`` subcommands that make, change or ship model versions: prepare, optimize, convert, publish, pack.

Each takes the parsed arguments and returns the exit code (0 done, 1 failed, 2 bad input); the parser is
``handler.cli``. Every engine import is inside the command that needs it, so ``oclaw serve`` loads none of them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from engine.config import Settings


def _local_settings(args: argparse.Namespace) -> Settings | None:
    """Settings with ``--model-repository`` applied; None (after one line on stderr) when it is not a directory."""
    from engine.config import Settings

    overrides = {"model_repository": args.model_repository} if args.model_repository else {}
    settings = Settings.from_env(**overrides)
    if not os.path.isdir(settings.model_repository):
        print(f"oclaw: model repository {settings.model_repository!r} is not a directory", file=sys.stderr)
        return None
    return settings


def prepare_command(args: argparse.Namespace) -> int:
    from engine.errors import OclawError
    from engine.optimize.prepare import prepare_repository

    settings = _local_settings(args)
    if settings is None:
        return 2
    try:
        read_only = _read_only_dirs(settings.model_repository, args.models)
        if read_only:
            print(
                f"oclaw: {read_only[0]} is read-only (e.g. a Lambda layer under /opt): prepared graphs are written "
                "beside model.onnx, so prepare the repository before packaging or publishing it",
                file=sys.stderr,
            )
            return 2
        report = prepare_repository(settings, level=args.level, models=args.models or None)
    except OclawError as exc:
        print(f"oclaw: {exc.message}", file=sys.stderr)
        return 2
    for row in report.done:
        print(json.dumps(row))
    for failure in report.failed:
        print(f"oclaw: not prepared: {failure}", file=sys.stderr)
    if not report.done and not report.failed:
        print(f"oclaw: no models found to prepare in {settings.model_repository!r}", file=sys.stderr)
        return 1
    return 1 if report.failed else 0


def _audit(settings: Settings | None, action: str, code: int, *models: tuple[str, str]) -> int:
    """Record a model command in the audit log (OCLAW_AUDIT_SINKS; nothing when it is off), one record per
    (model, version); returns ``code``."""
    from engine.audit import for_command
    from engine.config import Settings

    auditor = for_command(settings or Settings.from_env())
    if auditor is not None:
        for model, version in models:
            auditor.command(action, code, model=model, version=version)
        auditor.close()
    return code


def optimize_command(args: argparse.Namespace) -> int:
    """``oclaw optimize``, audited."""
    settings = _local_settings(args)
    if settings is None:
        return _audit(None, "optimize", 2, (args.model, args.version or ""))
    version: list[str] = []
    code = _optimize(args, settings, version)
    return _audit(settings, "optimize", code, (args.model, "".join(version) or (args.version or "")))


def _optimize(args: argparse.Namespace, settings: Settings, version: list[str]) -> int:
    """``oclaw optimize``; the version it wrote is appended to ``version``."""
    from pathlib import Path

    from engine.errors import ConfigError, InvalidInput, ModelNotFound, OclawError
    from engine.optimize.optimizer import BudgetNotMet, OptimizeOptions, optimize_model
    from engine.optimize.progress import Progress
    from engine.optimize.report import require_matplotlib, summary, table, write_report

    options = OptimizeOptions(
        precision=args.precision,
        version=args.version,
        calibration=Path(args.calibration) if args.calibration else None,
        evaluation=Path(args.evaluation) if args.evaluation else None,
        metric=args.metric,
        max_drop=args.max_drop,
        calibration_method=args.calibration_method,
        int8_mode=args.int8_mode,
    )
    try:
        if args.report:
            require_matplotlib()  # before the long work, not after it
        outcome = optimize_model(settings, args.model, options, Progress())
    except BudgetNotMet as exc:
        print(table(exc.outcome))
        if args.report:
            write_report(Path(args.report), exc.outcome)
        print(f"oclaw: {exc.message}", file=sys.stderr)
        return 1
    except (ConfigError, InvalidInput, ModelNotFound) as exc:
        print(f"oclaw: {exc.message}", file=sys.stderr)
        return 2
    except OclawError as exc:
        print(f"oclaw: {exc.message}; the repository is unchanged", file=sys.stderr)
        return 1
    version.append(str(outcome.version))
    print(table(outcome))
    if args.report:
        write_report(Path(args.report), outcome)
    print(summary(outcome, Path(settings.model_repository) / args.model / str(outcome.version)))
    for note in outcome.notes:
        print(f"oclaw: {note}", file=sys.stderr)
    return 0


def convert_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from engine.errors import ConfigError, InvalidInput, OclawError
    from engine.optimize.convert import ConvertOptions, convert_model

    settings = _local_settings(args)
    if settings is None:
        return 2
    options = ConvertOptions(
        framework=args.framework,
        source=args.source,
        name=args.name,
        sample=Path(args.sample),
        tolerance=args.tolerance,
        opset=args.opset,
        dynamic_batch=args.dynamic_batch,
    )
    try:
        outcome = convert_model(settings, options)
    except (ConfigError, InvalidInput) as exc:
        print(f"oclaw: {exc.message}", file=sys.stderr)
        return 2
    except OclawError as exc:
        print(f"oclaw: {exc.message}", file=sys.stderr)
        return 1
    shown = {k: outcome.record[k] for k in ("framework", "opset", "max_abs_diff", "tolerance", "outputs")}
    print(json.dumps({"model": outcome.name, "version": outcome.version, "path": str(outcome.path), **shown}))
    return 0


def _read_only_dirs(root: str, models: list[str]) -> list[str]:
    """Version directories of a local repository that this process cannot write to (unknown models skipped)."""
    from engine.errors import OclawError
    from engine.repository.local import LocalRepository

    repo = LocalRepository(root)
    dirs = []
    for name in models or repo.models():
        try:
            dirs += [repo.root / name / str(v) for v in repo.versions(name)]
        except OclawError:
            continue  # reported by prepare, with the other models prepared
    return [str(d) for d in dirs if not os.access(d, os.W_OK)]


def publish_command(args: argparse.Namespace) -> int:
    from engine.config import Settings
    from engine.errors import OclawError
    from engine.pool import ModelPool
    from engine.repository.local import LocalRepository
    from engine.repository.publish import publish

    start = perf_counter_ns()
    settings = Settings.from_env()

    def load(repo: LocalRepository, name: str) -> None:
        """Load the model as the server does (sessions, signature, warm-up), then let it go."""
        pool = ModelPool(repo, settings)
        try:
            pool.load(name)
        finally:
            pool.close()

    try:
        rows = publish(
            args.repository,
            args.destination,
            models=args.model or None,
            concurrency=settings.fetch_concurrency,
            load=load,
            cache=settings.model_cache,
        )
    except OclawError as exc:
        print(f"oclaw: {exc.message}", file=sys.stderr)
        return _audit(settings, "publish", 2, *[(name, "") for name in args.model or [""]])
    names = sorted({row["model"] for row in rows})
    _audit(settings, "publish", 0, *[(name, _published_versions(rows, name)) for name in names])  # before the output
    for row in rows:
        print(json.dumps(row))
    total = sum(row["bytes"] for row in rows)
    models = sorted({row["model"] for row in rows})
    summary = {"published": models, "files": len(rows), "bytes": total, "mb": round(total / 1e6, 2)}
    print(json.dumps({**summary, "ms": round((perf_counter_ns() - start) / 1e6, 1)}))
    return 0


def _published_versions(rows: list[dict[str, Any]], name: str) -> str:
    """The versions of ``name`` among the uploaded files (``.../<name>/<version>/...``), comma-separated."""
    found = set()
    for row in rows:
        if row["model"] == name and f"/{name}/" in row["uri"]:
            segment = row["uri"].rsplit(f"/{name}/", 1)[1].split("/", 1)[0]
            if segment.isdigit():
                found.add(int(segment))
    return ",".join(map(str, sorted(found)))


def pack_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from engine.errors import OclawError
    from engine.repository.local import LocalRepository, select_versions
    from engine.repository.pack import PACK_SUFFIX, write_pack
    from engine.repository.publish import validate_for_publish

    model_dir = Path(args.model).resolve()
    out = Path(args.out or f"{model_dir.name}{PACK_SUFFIX}").resolve()
    if not model_dir.is_dir():
        print(f"oclaw: {args.model!r} is not a model directory (<repository>/<model>)", file=sys.stderr)
        return 2
    try:
        repo = LocalRepository(model_dir.parent)
        validate_for_publish(repo, [model_dir.name])  # layout, manifest, version policy, checksums
        available = repo.versions(model_dir.name)
        policy = repo.manifest(model_dir.name).versions
        versions = args.versions or select_versions(model_dir.name, available, policy)
        if missing := sorted(set(versions) - set(available)):
            print(f"oclaw: --versions: no version {missing[0]} in {model_dir} (it has {available})", file=sys.stderr)
            return 2
        select_versions(model_dir.name, versions, policy)  # the manifest's policy still finds a version to serve
        report = write_pack(model_dir, out, name=model_dir.name, versions=versions)
    except OclawError as exc:
        print(f"oclaw: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"oclaw: --out {str(out)!r}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if out.parent == model_dir.parent:
        print(f"oclaw: {model_dir} and {out} now both define {model_dir.name!r}: remove one", file=sys.stderr)
    print(json.dumps(report))
    return 0
