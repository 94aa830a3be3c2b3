"""Ahead-of-time graph optimisation ("prepared" artifacts) so cold starts skip it.

``oclaw prepare`` writes ``model.prepared.onnx`` (+ ``model.prepared.json``) beside each ``model.onnx``. At
load, a prepared graph is used with optimisations off when it was made by the same onnxruntime version for the
same source file on a compatible CPU; otherwise the source model is loaded normally, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter_ns
from typing import Any

import onnxruntime as ort

from engine.config import Settings
from engine.errors import OclawError
from engine.repository.local import LocalRepository

log = logging.getLogger("oclaw.prepare")

PREPARED = "model.prepared.onnx"
PREPARED_META = "model.prepared.json"
_ISA_FLAGS = ("avx512_vnni", "avx512bw", "avx512f", "avx2", "fma", "avx_vnni", "amx_tile", "asimd", "sve", "i8mm")


def cpu_fingerprint() -> str:
    """Architecture plus the SIMD features that change onnxruntime's optimised layouts (e.g. NCHWc blocks)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return f"{os.uname().machine}:" + "+".join(f for f in _ISA_FLAGS if f in flags)


def source_fingerprint(path: Path, edge: int = 1 << 16) -> str:
    """Cheap identity of a model file: size plus sha256 of its first and last 64 KiB (no full read)."""
    import hashlib

    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as fh:
        digest.update(fh.read(edge))
        if size > edge:
            fh.seek(max(edge, size - edge))
            digest.update(fh.read(edge))
    return digest.hexdigest()


@dataclass(frozen=True)
class PreparedInfo:
    """What a prepared artifact was made from and for."""

    ort_version: str
    level: str
    cpu: str
    source: str

    def compatible(self, source: Path) -> str | None:
        """None when usable for ``source`` here, else the reason it is not."""
        if self.ort_version != ort.__version__:
            return f"made by onnxruntime {self.ort_version}, running {ort.__version__}"
        if self.level == "all" and self.cpu != cpu_fingerprint():
            return f"made for CPU {self.cpu!r}, running on {cpu_fingerprint()!r}"
        if self.source != source_fingerprint(source):
            return "the source model.onnx changed since it was prepared"
        return None


def prepared_path(source: Path) -> tuple[Path, str | None]:
    """The prepared artifact for ``source`` and None, or the source itself and why it is not used."""
    candidate, meta = source.with_name(PREPARED), source.with_name(PREPARED_META)
    if not candidate.is_file() or not meta.is_file():
        return source, "not prepared"
    try:
        info = PreparedInfo(**json.loads(meta.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:
        return source, f"unreadable {PREPARED_META}: {exc}"
    reason = info.compatible(source)
    return (source, reason) if reason else (candidate, None)


def prepare_file(source: Path, *, level: str = "all") -> dict[str, Any]:
    """Optimise one model file ahead of time; returns what was written."""
    if level not in ("all", "extended"):
        raise ValueError("level must be 'all' (fastest, CPU-specific) or 'extended' (portable)")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if level == "all" else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    )
    out = source.with_name(PREPARED)
    tmp = out.with_suffix(".tmp")
    opts.optimized_model_filepath = str(tmp)
    opts.log_severity_level = 4  # fatal only: a failure raises and `oclaw prepare` reports it by model
    start = perf_counter_ns()
    try:
        ort.InferenceSession(str(source), sess_options=opts, providers=["CPUExecutionProvider"])
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    info = PreparedInfo(ort.__version__, level, cpu_fingerprint(), source_fingerprint(source))
    source.with_name(PREPARED_META).write_text(json.dumps(info.__dict__, indent=1), encoding="utf-8")
    return {
        "source": str(source),
        "prepared": str(out),
        "level": level,
        "cpu": info.cpu,
        "bytes": out.stat().st_size,
        "ms": round((perf_counter_ns() - start) / 1e6, 1),
    }


@dataclass(frozen=True)
class Failure:
    """A model (or one of its versions) that could not be prepared, and why."""

    model: str
    version: int | None
    reason: str

    def __str__(self) -> str:
        where = self.model if self.version is None else f"{self.model}/{self.version}"
        return f"{where}: {self.reason}"


@dataclass(frozen=True)
class PrepareReport:
    """What ``prepare_repository`` wrote (one row per file) and what it could not prepare."""

    done: list[dict[str, Any]]
    failed: list[Failure]


def prepare_repository(settings: Settings, *, level: str = "all", models: list[str] | None = None) -> PrepareReport:
    """Prepare every version of every (or the named) model of a repository; a failure does not stop the others."""
    repo = LocalRepository(settings.model_repository)
    done: list[dict[str, Any]] = []
    failed: list[Failure] = []
    for name in models or repo.models():
        try:
            versions = repo.versions(name)
        except OclawError as exc:
            failed.append(Failure(name, None, exc.message))
            continue
        for version in versions:
            try:
                done.append(prepare_file(repo.files(name, version).path, level=level))
            except OclawError as exc:
                failed.append(Failure(name, version, exc.message))
            except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base class but Exception
                failed.append(Failure(name, version, f"{type(exc).__name__}: {exc}"))
    return PrepareReport(done, failed)
