"""Section 1 of benchmarks.run: cold start (spawn -> first successful infer) and its tables.

Variants: ``floor`` (bare onnxruntime script), ``oclaw`` (``oclaw serve``), ``naive`` (benchmarks.naive_app)
and, when the CLI has it, ``oclaw_prepared`` (after ``oclaw prepare``), for EfficientNet-Lite0 and the
ResNet-50-shaped model, each served from a private repository.
"""

from __future__ import annotations

import functools
import json
import os
import select
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks import common
from benchmarks.common import PYTHON, ROOT, fmt, fmt_ratio, ratio, table
from benchmarks.harness import link_model, link_or_copy, log, rotated, server_command, v2_body
from engine.logs import find_event

if TYPE_CHECKING:
    from benchmarks.run import Plan

EFFNET_REPO = ROOT / "examples" / "models"


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    """First line of the child's stdout, waiting at most ``timeout`` s."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.perf_counter() + timeout
    while b"\n" not in buf:
        left = deadline - time.perf_counter()
        if left <= 0:
            raise RuntimeError(f"no output after {timeout:.0f} s")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"exited with {proc.wait()} without output")
            buf += chunk
    return buf.split(b"\n", 1)[0]


def cold_floor(model: Path, work: Path) -> dict[str, Any]:
    err = work / "floor.err"
    with err.open("wb") as fh:
        t0 = time.perf_counter()
        proc = common.spawn([PYTHON, "-m", "benchmarks.floor", str(model)], stdout=subprocess.PIPE, stderr=fh)
        try:
            line = _read_line(proc, 120)
            t1 = time.perf_counter()
        finally:
            common.stop(proc)
    info = json.loads(line)
    e2e = (t1 - t0) * 1e3
    return {"e2e_ms": e2e, "phases": info, "interpreter_ms": e2e - info["script_ms"]}


def parse_cold_start(log_path: Path) -> dict[str, Any] | None:
    return find_event(log_path.read_text(errors="replace"), "cold_start")


def cold_server(
    kind: str, *, repo: Path, model_file: Path, model: str, body: tuple[bytes, int | None], work: Path
) -> dict[str, Any]:
    port = common.free_port()
    request = common.infer_request(port, model, *body)
    log_path = work / f"{kind}-{model}-{port}.log"
    args, env = server_command(kind, repo, model_file, port)
    with log_path.open("wb") as fh:
        t0 = time.perf_counter()
        proc = common.spawn(args, stdout=fh, stderr=subprocess.STDOUT, env=env)
        try:
            t1, attempts = common.wait_first_infer(proc, port, request)
        except RuntimeError as exc:
            raise RuntimeError(f"{kind} {model}: {exc}\n{common.tail(log_path)}") from None
        finally:
            common.stop(proc)
    out: dict[str, Any] = {"e2e_ms": (t1 - t0) * 1e3, "attempts": attempts}
    if kind == "oclaw":
        record = parse_cold_start(log_path)
        out["cold_start"] = record
        if record is not None:
            models = record.get("models") or {}
            out["session_ms"] = sum(m["session_ms"] for m in models.values())
            out["warmup_ms"] = sum(m["warmup_ms"] for m in models.values())
            out["outside_total_ms"] = out["e2e_ms"] - record["total_ms"]
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    values = [r["e2e_ms"] for r in runs]
    if not values:
        return {"n": 0, "min_ms": None, "median_ms": None, "max_ms": None, "median_run": None}
    median = statistics.median(values)
    median_run = min(runs, key=lambda r: abs(r["e2e_ms"] - median))
    return {
        "n": len(values),
        "min_ms": min(values),
        "median_ms": median,
        "max_ms": max(values),
        "median_run": median_run,
    }


def copy_repo(src_model_dir: Path, repo: Path) -> Path:
    """A private copy of one model directory (model files hard-linked): no stray prepared artifacts."""
    dst = repo / src_model_dir.name
    for path in sorted(src_model_dir.rglob("*")):
        if path.is_dir() or "prepared" in path.name:
            continue
        target = dst / path.relative_to(src_model_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(path, target)
    return dst


def prepare_repo(repo: Path, work: Path) -> str | None:
    """Run ``oclaw prepare`` on ``repo`` when this oclaw has it; returns why not, or None on success."""
    log_path = work / f"prepare-{repo.name}.log"
    with log_path.open("wb") as fh:
        proc = common.spawn(
            [PYTHON, "-m", "handler.cli", "prepare", "--model-repository", str(repo)],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
        try:
            rc = proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            common.stop(proc)
    if rc != 0:
        return f"oclaw prepare exited {rc}: {common.tail(log_path, 5)}"
    if not any(repo.rglob("model.prepared.onnx")):
        return "oclaw prepare wrote no model.prepared.onnx"
    return None


def has_prepare() -> bool:
    """True when this oclaw's CLI has the ``prepare`` command."""
    try:
        return (
            subprocess.run(
                [PYTHON, "-m", "handler.cli", "prepare", "--help"],
                cwd=ROOT,
                env=common.child_env(),
                capture_output=True,
                timeout=60,
                check=False,
            ).returncode
            == 0
        )
    except (OSError, subprocess.SubprocessError):
        return False


def section_cold(plan: Plan, resnet_file: Path, work: Path) -> dict[str, Any]:
    effnet_repo = work / "repo-cold-efficientnet"
    effnet_file = copy_repo(EFFNET_REPO / "efficientnet_lite0", effnet_repo) / "1" / "model.onnx"
    resnet_repo = work / "repo-cold-resnet50"
    link_model(resnet_file, resnet_repo, "resnet50")
    models = [("efficientnet_lite0", effnet_repo, effnet_file), ("resnet50", resnet_repo, resnet_file)]
    prepare = has_prepare()
    results: dict[str, Any] = {}
    for name, repo, path in models:
        body = v2_body({"input": np.zeros((1, 3, 224, 224), np.float32)}, binary=True)
        server = functools.partial(cold_server, model_file=path, model=name, body=body, work=work)
        runners: dict[str, Callable[[], dict[str, Any]]] = {
            "floor": functools.partial(cold_floor, path, work),
            "oclaw": functools.partial(server, "oclaw", repo=repo),
            "naive": functools.partial(server, "naive", repo=repo),
        }
        notes: list[str] = []
        if prepare:
            prepared_repo = work / f"{repo.name}-prepared"
            copy_repo(repo / name, prepared_repo)
            t = time.perf_counter()
            why = prepare_repo(prepared_repo, work)
            if why is None:
                notes.append(f"oclaw_prepared: `oclaw prepare` took {time.perf_counter() - t:.1f} s (not counted)")
                runners["oclaw_prepared"] = functools.partial(server, "oclaw", repo=prepared_repo)
            else:
                notes.append(f"oclaw_prepared skipped: {why}")
        log(f"cold start {name}: page-cache warm-up spawns ({', '.join(runners)})")
        for variant, fn in runners.items():
            try:
                fn()
            except (RuntimeError, ValueError) as exc:
                log(f"  warm-up {variant} failed: {exc}")
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in runners}
        errors: dict[str, list[str]] = {k: [] for k in runners}
        order = list(runners)
        for i in range(plan.cold_runs):
            for variant in rotated(order, i):
                try:
                    r = runners[variant]()
                    runs[variant].append(r)
                    log(f"  {name} {variant} #{i + 1}: {r['e2e_ms']:.0f} ms")
                except (RuntimeError, ValueError) as exc:
                    errors[variant].append(str(exc))
                    log(f"  {name} {variant} #{i + 1} FAILED: {exc}")
        results[name] = {
            "model_file": str(path),
            "model_bytes": path.stat().st_size,
            "notes": notes,
            "variants": {k: {**summarize(v), "runs": v, "errors": errors[k]} for k, v in runs.items()},
        }
    return results


#: Columns of the phases table: every variant's median run split into the same four named parts (ms).
PHASE_COLUMNS = (
    "outside the process's timers (interpreter start; oclaw: + port bind, 1st request)",
    "imports + setup",
    "session creation",
    "first run (floor) / warm-up (oclaw)",
)


def phase_parts(variant: str, run: dict[str, Any]) -> tuple[list[float | None], str]:
    """The median run of a variant as ``PHASE_COLUMNS`` (None where not measured) and a note in words."""
    if variant == "floor":
        f = run["phases"]
        timed = [f["import_ms"], f["session_ms"], f["run_ms"]]
        return [run["e2e_ms"] - sum(timed), *timed], "its own timers (import, session, run)"
    if run.get("cold_start"):
        cs = run["cold_start"]
        setup = max(0.0, cs["total_ms"] - run["session_ms"] - run["warmup_ms"])
        models = (cs.get("models") or {}).values()
        prepared = sorted({"prepared graph" if m.get("prepared") else "graph optimised at load" for m in models})
        note = [
            f"from its cold_start record: web imports {cs['web_imports_ms']:.0f} ms in parallel with preload "
            f"{cs['preload_ms']:.0f} ms",
            *prepared,
        ]
        if cs.get("fetch_ms"):
            note.append(f"repository fetch {cs['fetch_ms']:.0f} ms")
        if cs.get("fastapi_loaded"):
            note.append("FastAPI loaded on the cold path")
        if cs.get("ready") is False:
            note.append("NOT READY")
        return [run["outside_total_ms"], setup, run["session_ms"], run["warmup_ms"]], "; ".join(note)
    if variant.startswith("oclaw"):
        return [None] * 4, "no cold_start log line found"
    return [None] * 4, "not instrumented: spawn → first infer only"


def print_cold(res: dict[str, Any]) -> None:
    print("\n## 1. Cold start: spawn → first successful infer (ms)\n")
    rows = []
    for model, r in res.items():
        v = r["variants"]
        floor_med = v["floor"]["median_ms"]
        for variant, s in v.items():
            rows.append(
                [
                    model,
                    variant,
                    s["n"],
                    fmt(s["min_ms"], 0),
                    fmt(s["median_ms"], 0),
                    fmt(s["max_ms"], 0),
                    fmt_ratio(ratio(s["median_ms"], floor_med)),
                    len(s["errors"]),
                ]
            )
    print(table(["model", "variant", "n", "min", "median", "max", "median / floor", "failed"], rows))
    print("\n**Ratios (same run)**\n")
    rows = []
    for model, r in res.items():
        v = r["variants"]
        o, f, n = v["oclaw"], v["floor"], v["naive"]
        p = v.get("oclaw_prepared")
        rows.append(
            [
                model,
                fmt_ratio(ratio(o["median_ms"], f["median_ms"])),
                fmt_ratio(ratio(o["min_ms"], f["min_ms"])),
                fmt_ratio(ratio(n["median_ms"], o["median_ms"])),
                fmt_ratio(ratio(n["min_ms"], o["min_ms"])),
                fmt(None if o["median_ms"] is None or f["median_ms"] is None else o["median_ms"] - f["median_ms"], 0),
                fmt_ratio(ratio(p["median_ms"], f["median_ms"])) if p else "-",
                fmt_ratio(ratio(n["median_ms"], p["median_ms"])) if p else "-",
            ]
        )
    print(
        table(
            [
                "model", "oclaw/floor (median)", "oclaw/floor (min)", "naive/oclaw (median)", "naive/oclaw (min)",
                "oclaw - floor (median, ms)", "oclaw_prepared/floor (median)", "naive/oclaw_prepared (median)",
            ],
            rows,
        )
    )  # fmt: skip
    print("\n**Phases of the median run** (ms; the four parts add up to spawn → first infer)\n")
    rows = []
    for model, r in res.items():
        for variant, s in r["variants"].items():
            run = s["median_run"]
            if not run:
                continue
            parts, note = phase_parts(variant, run)
            rows.append([model, variant, fmt(run["e2e_ms"], 0), *(fmt(p, 0) for p in parts), note])
    print(table(["model", "variant", "spawn → first infer", *PHASE_COLUMNS, "how measured"], rows))
    for model, r in res.items():
        for note in r.get("notes", []):
            print(f"\n{model}: {note}")
