"""``python -m benchmarks.run [--quick] [--out DIR] [--only cold,overhead,throughput,lambda]``

Benchmarks of ``oclaw serve``, each beside a baseline measured in the same run (the machine is
shared and noisy, so only same-run ratios mean anything):

1. cold start (spawn -> first successful infer) vs the floor (bare ORT script) and a naive
   FastAPI + onnxruntime server, for EfficientNet-Lite0 and a ResNet-50-shaped model;
2. per-request overhead of the HTTP path over an in-process ``session.run`` (tiny model);
3. throughput and p99 at concurrency 1/8/32 vs the naive app (MLP with V2 JSON, ResNet-50 with
   the binary extension), driven by benchmarks.loadgen in its own process.

Prints markdown tables, writes ``results.json`` and PNG plots into ``--out`` (default bench-results/).
Not a test: nothing is asserted.  Every server binds 127.0.0.1 and every child is killed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common, resnet50
from benchmarks.common import PYTHON, ROOT, fmt, fmt_ratio, ratio, table

SECTIONS = ("cold", "overhead", "throughput", "lambda")
EFFNET_REPO = ROOT / "examples" / "models"
EFFNET_FILE = EFFNET_REPO / "efficientnet_lite0" / "1" / "model.onnx"


@dataclass(frozen=True)
class Plan:
    """How much of everything; ``quick`` keeps the whole run near three minutes."""

    quick: bool
    cold_runs: int
    overhead_requests: int
    overhead_rounds: int
    overhead_max_s: float
    mlp_warmup: float
    mlp_duration: float
    resnet_warmup: float
    resnet_duration: float
    concurrencies: tuple[int, ...] = (1, 8, 32)

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(True, 2, 1000, 4, 8.0, 1.0, 3.0, 1.0, 3.0)
        return cls(False, 5, 6000, 6, 30.0, 2.0, 10.0, 2.0, 15.0)


def log(msg: str) -> None:
    """Progress goes to stderr; stdout holds only the tables."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- repositories and requests -----------------------------------------------------------------------


def save_model(model: Any, repo: Path, name: str) -> Path:
    """Save an onnx ModelProto as ``repo/name/1/model.onnx`` (the layout of tests.modelgen)."""
    import onnx

    model.opset_import[0].version = 17
    model.ir_version = 8
    path = repo / name / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def link_model(src: Path, repo: Path, name: str) -> Path:
    """Put an existing model file into ``repo/name/1/model.onnx`` (hard link, else copy)."""
    path = repo / name / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, path)
    except OSError:
        shutil.copyfile(src, path)
    return path


def v2_body(
    inputs: dict[str, np.ndarray], *, binary: bool, binary_output: bool | None = None
) -> tuple[bytes, int | None]:
    """A V2 infer body; with ``binary`` the inputs use the binary extension (outputs: JSON unless asked)."""
    from engine.tensors import encode_request

    body, length = encode_request(inputs, binary=binary)
    if binary and not binary_output and length is not None:
        head = json.loads(body[:length])
        head.pop("parameters", None)  # encode_request asks for binary outputs; we want JSON outputs
        new_head = json.dumps(head, separators=(",", ":")).encode()
        return new_head + body[length:], len(new_head)
    return body, length


# -- section 1: cold start ------------------------------------------------------------------------------


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
    for line in log_path.read_text(errors="replace").splitlines():
        if '"event": "cold_start"' in line and "{" in line:
            with contextlib.suppress(ValueError):
                return dict(json.loads(line[line.index("{") :]))
    return None


def cold_server(
    kind: str, *, repo: Path, model_file: Path, model: str, body: tuple[bytes, int | None], work: Path
) -> dict[str, Any]:
    port = common.free_port()
    request = common.infer_request(port, model, *body)
    log_path = work / f"{kind}-{model}-{port}.log"
    if kind.startswith("oclaw"):
        args = [PYTHON, "-m", "handler.cli", "serve", "--model-repository", str(repo), "--port", str(port)]
        env = {"OCLAW_METERING_SINKS": "none", "OCLAW_METRICS": "false"} if kind == "oclaw-nometer" else None
    else:
        args = [PYTHON, "-m", "benchmarks.naive_app", "--port", str(port)]
        env = {"NAIVE_MODEL": str(model_file)}
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
        try:
            os.link(path, target)
        except OSError:
            shutil.copyfile(path, target)
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
        runners: dict[str, Callable[[], dict[str, Any]]] = {
            "floor": lambda path=path: cold_floor(path, work),
            "oclaw": lambda r=repo, p=path, n=name, b=body: cold_server(
                "oclaw", repo=r, model_file=p, model=n, body=b, work=work
            ),
            "naive": lambda r=repo, p=path, n=name, b=body: cold_server(
                "naive", repo=r, model_file=p, model=n, body=b, work=work
            ),
        }
        notes: list[str] = []
        if prepare:
            prepared_repo = work / f"{repo.name}-prepared"
            copy_repo(repo / name, prepared_repo)
            t = time.perf_counter()
            why = prepare_repo(prepared_repo, work)
            if why is None:
                notes.append(f"oclaw_prepared: `oclaw prepare` took {time.perf_counter() - t:.1f} s (not counted)")
                runners["oclaw_prepared"] = lambda r=prepared_repo, p=path, n=name, b=body: cold_server(
                    "oclaw", repo=r, model_file=p, model=n, body=b, work=work
                )
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
            k = i % len(order)
            for variant in order[k:] + order[:k]:  # rotate the order to spread drift
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


def _oclaw_phases(o: dict[str, Any]) -> str:
    cs = o["cold_start"]
    extra = {
        k: v
        for k, v in cs.items()
        if k not in ("event", "instance_id", "platform", "web_imports_ms", "preload_ms", "models", "ready", "total_ms")
    }
    text = (
        f"total_ms {cs['total_ms']:.0f} (web_imports {cs['web_imports_ms']:.0f} ∥ preload "
        f"{cs['preload_ms']:.0f} ⊇ session {o['session_ms']:.0f} + warm-up {o['warmup_ms']:.0f}) · "
        f"outside total_ms (interpreter start, bind, 1st request) {o['outside_total_ms']:.0f}"
    )
    model_extra = {
        k: v for m in (cs.get("models") or {}).values() for k, v in m.items() if k not in ("session_ms", "warmup_ms")
    }
    if extra or model_extra:
        text += " · " + json.dumps({**extra, **model_extra}, separators=(",", ":"))
    return text


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
    print("\n**Phases of the median run** (floor: its own timers; oclaw: its `cold_start` log line)\n")
    rows = []
    for model, r in res.items():
        for variant, s in r["variants"].items():
            run = s["median_run"]
            if not run:
                continue
            if variant == "floor":
                f = run["phases"]
                text = (
                    f"interpreter start {run['interpreter_ms']:.0f} · import ort+numpy {f['import_ms']:.0f} · "
                    f"session {f['session_ms']:.0f} · run {f['run_ms']:.0f}"
                )
            elif run.get("cold_start"):
                text = _oclaw_phases(run)
            elif variant.startswith("oclaw"):
                text = "no cold_start log line found"
            else:
                text = "(not instrumented)"
            rows.append([model, variant, fmt(run["e2e_ms"], 0), text])
    print(table(["model", "variant", "e2e", "phases (ms)"], rows))
    for model, r in res.items():
        for note in r.get("notes", []):
            print(f"\n{model}: {note}")


# -- section 2: per-request overhead ---------------------------------------------------------------------


def oclaw_like_session(model_file: Path, repo: Path) -> tuple[Any, str]:
    """An in-process session with oclaw's own SessionOptions (so (a) differs from (b)/(c) only by HTTP)."""
    import onnxruntime as ort

    try:
        from engine.config import Settings
        from engine.session import session_options

        opts = session_options(Settings.from_env({}, model_repository=str(repo)))
        label = "oclaw's engine.session.session_options()"
    except Exception as exc:  # noqa: BLE001 - the engine API may move; fall back to defaults
        opts = ort.SessionOptions()
        label = f"onnxruntime defaults (engine.session.session_options unavailable: {exc})"
    return ort.InferenceSession(str(model_file), sess_options=opts, providers=["CPUExecutionProvider"]), label


def start_server(
    kind: str, repo: Path, model_file: Path, work: Path, tag: str
) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = common.free_port()
    log_path = work / f"{kind}-{tag}-{port}.log"
    if kind.startswith("oclaw"):
        args = [PYTHON, "-m", "handler.cli", "serve", "--model-repository", str(repo), "--port", str(port)]
        env = {"OCLAW_METERING_SINKS": "none", "OCLAW_METRICS": "false"} if kind == "oclaw-nometer" else None
    else:
        args = [PYTHON, "-m", "benchmarks.naive_app", "--port", str(port)]
        env = {"NAIVE_MODEL": str(model_file)}
    fh = log_path.open("wb")
    try:
        proc = common.spawn(args, stdout=fh, stderr=subprocess.STDOUT, env=env)
    finally:
        fh.close()
    try:
        common.wait_port(proc, port, "/v2/health/ready" if kind.startswith("oclaw") else "/docs")
    except RuntimeError as exc:
        common.stop(proc)
        raise RuntimeError(f"{kind} did not start: {exc}\n{common.tail(log_path)}") from None
    return proc, port, log_path


def _sequential(port: int, request: bytes, n: int, max_s: float) -> tuple[list[int], dict[int, int]]:
    lat: list[int] = []
    bad: dict[int, int] = {}
    deadline = time.perf_counter() + max_s
    with common.Connection(port) as conn:
        for _ in range(n):
            t0 = time.perf_counter_ns()
            status, _, _ = conn.roundtrip(request)
            lat.append(time.perf_counter_ns() - t0)
            if status != 200:
                bad[status] = bad.get(status, 0) + 1
            if time.perf_counter() > deadline:
                break
    return lat, bad


def section_overhead(plan: Plan, work: Path) -> dict[str, Any]:
    from tests.modelgen import add_sub

    repo = work / "repo-overhead"
    model_file = save_model(add_sub(16), repo, "add_sub")
    rng = np.random.default_rng(3)
    inputs = {
        "INPUT0": rng.standard_normal((1, 16)).astype(np.float32),
        "INPUT1": rng.standard_normal((1, 16)).astype(np.float32),
    }
    session, session_label = oclaw_like_session(model_file, repo)
    names = ["OUTPUT0", "OUTPUT1"]
    json_body = v2_body(inputs, binary=False)
    bin_body = v2_body(inputs, binary=True, binary_output=True)
    servers: dict[str, tuple[subprocess.Popen[bytes], int, Path]] = {}
    series: dict[str, list[int]] = {}
    non200: dict[str, dict[int, int]] = {}
    try:
        for kind in ("oclaw", "naive", "oclaw-nometer"):
            servers[kind] = start_server(kind, repo, model_file, work, "add_sub")
        requests = {
            "b_oclaw_json": (servers["oclaw"][1], common.infer_request(servers["oclaw"][1], "add_sub", *json_body)),
            "c_oclaw_binary": (servers["oclaw"][1], common.infer_request(servers["oclaw"][1], "add_sub", *bin_body)),
            "d_naive_json": (servers["naive"][1], common.infer_request(servers["naive"][1], "add_sub", *json_body)),
            "e_naive_binary": (servers["naive"][1], common.infer_request(servers["naive"][1], "add_sub", *bin_body)),
            "f_oclaw_json_nometer": (
                servers["oclaw-nometer"][1],
                common.infer_request(servers["oclaw-nometer"][1], "add_sub", *json_body),
            ),
        }
        keys = ["a_session_run", *requests]
        series = {k: [] for k in keys}
        non200 = {k: {} for k in keys}
        per_round = max(1, plan.overhead_requests // plan.overhead_rounds)
        max_s = plan.overhead_max_s / plan.overhead_rounds
        log(f"overhead: {len(keys)} paths x {plan.overhead_rounds} rounds x {per_round} sequential requests")
        # warm-up: every path a few hundred times
        for _ in range(300):
            session.run(names, inputs)
        for port, req in requests.values():
            _sequential(port, req, 300, 5)
        for rnd in range(plan.overhead_rounds):
            order = keys[rnd % len(keys) :] + keys[: rnd % len(keys)]
            for key in order:
                if key == "a_session_run":
                    deadline = time.perf_counter() + max_s
                    for _ in range(per_round):
                        t0 = time.perf_counter_ns()
                        session.run(names, inputs)
                        series[key].append(time.perf_counter_ns() - t0)
                        if time.perf_counter() > deadline:
                            break
                else:
                    port, req = requests[key]
                    lat, bad = _sequential(port, req, per_round, max_s)
                    series[key] += lat
                    for s, c in bad.items():
                        non200[key][s] = non200[key].get(s, 0) + c
    finally:
        for proc, _, _ in servers.values():
            common.stop(proc)
    out: dict[str, Any] = {"model": "add_sub FP32 [1,16] x2 inputs", "session_options": session_label, "paths": {}}
    base = common.percentiles(series["a_session_run"])
    for key, lat in series.items():
        p = common.percentiles(lat)
        out["paths"][key] = {
            "n": len(lat),
            **p,
            "overhead_p50_us": p["p50_us"] - base["p50_us"],
            "overhead_p99_us": p["p99_us"] - base["p99_us"],
            "non_200": {str(k): v for k, v in non200[key].items()},
        }
    return out


OVERHEAD_LABELS = {
    "a_session_run": "(a) in-process session.run",
    "b_oclaw_json": "(b) oclaw, V2 JSON",
    "c_oclaw_binary": "(c) oclaw, V2 binary",
    "d_naive_json": "(d) naive app, V2 JSON (context)",
    "e_naive_binary": "(e) naive app, binary in / JSON out (context)",
    "f_oclaw_json_nometer": "(f) oclaw, V2 JSON, metering and metrics off",
}


def print_overhead(res: dict[str, Any]) -> None:
    print(f"\n## 2. Per-request overhead over session.run — {res['model']}, c=1, keep-alive raw socket (µs)\n")
    base = res["paths"]["a_session_run"]
    rows = []
    for key, p in res["paths"].items():
        rows.append(
            [
                OVERHEAD_LABELS[key],
                p["n"],
                fmt(p["p50_us"]),
                fmt(p["p99_us"]),
                "-" if key.startswith("a_") else fmt(p["overhead_p50_us"]),
                "-" if key.startswith("a_") else fmt(p["overhead_p99_us"]),
                fmt_ratio(ratio(p["p50_us"], base["p50_us"])),
                sum(p["non_200"].values()),
            ]
        )
    print(table(["path", "n", "p50", "p99", "overhead p50 (-a)", "overhead p99 (-a)", "p50 / a", "non-200"], rows))
    o = res["paths"]
    print(
        f"\nnaive/oclaw p50, JSON: {fmt_ratio(ratio(o['d_naive_json']['p50_us'], o['b_oclaw_json']['p50_us']))}; "
        f"binary: {fmt_ratio(ratio(o['e_naive_binary']['p50_us'], o['c_oclaw_binary']['p50_us']))}"
    )
    if "f_oclaw_json_nometer" in o:
        cost = o["b_oclaw_json"]["p50_us"] - o["f_oclaw_json_nometer"]["p50_us"]
        share = cost / o["f_oclaw_json_nometer"]["p50_us"] * 100
        print(f"metering (log sink) + Prometheus on vs off, p50: {cost:+.1f} µs a request ({share:+.1f} %)")


# -- section 3: throughput ------------------------------------------------------------------------------------


def _cpu_s(pid: int) -> float:
    """utime + stime of a process (all threads), in seconds (Linux /proc); NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def run_loadgen(
    proc: subprocess.Popen[bytes], port: int, request_file: Path, *, concurrency: int, warmup: float, duration: float
) -> dict[str, Any]:
    cpu0 = _cpu_s(proc.pid)
    args = [
        PYTHON, "-m", "benchmarks.loadgen", "--port", str(port), "--request", str(request_file),
        "--concurrency", str(concurrency), "--warmup", str(warmup), "--duration", str(duration),
    ]  # fmt: skip
    client = common.spawn(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = client.communicate(timeout=warmup + duration + 150)
    except subprocess.TimeoutExpired:
        common.stop(client)
        return {"error": "loadgen timed out", "concurrency": concurrency}
    finally:
        common.stop(client)
    cpu1 = _cpu_s(proc.pid)
    if client.returncode != 0 or not out.strip():
        return {
            "error": f"loadgen exited {client.returncode}: {err.decode(errors='replace')[-2000:]}",
            "concurrency": concurrency,
        }
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    total = result["requests"] + result["warmup_requests"]
    result["server_cpu_ms_per_req"] = (cpu1 - cpu0) * 1e3 / total if total else None
    result["server_alive"] = proc.poll() is None
    return result


def check_outputs(port: int, model: str, body: tuple[bytes, int | None], expected: dict[str, np.ndarray]) -> str:
    """Compare one response against the in-process reference (informational, not an assertion)."""
    from engine.tensors import decode_response

    with common.Connection(port) as conn:
        status, headers, data = conn.roundtrip(common.infer_request(port, model, *body))
    if status != 200:
        return f"HTTP {status}: {data[:200]!r}"
    hl = headers.get("inference-header-content-length")
    got = decode_response(data, int(hl) if hl else None)
    worst = 0.0
    for name, ref in expected.items():
        if name not in got or got[name].shape != ref.shape:
            return f"output {name!r} missing or misshapen"
        worst = max(worst, float(np.max(np.abs(got[name].astype(np.float64) - ref))))
    return f"ok (max |Δ| {worst:.1e})" if worst < 1e-3 else f"MISMATCH (max |Δ| {worst:.1e})"


def section_throughput(plan: Plan, resnet_repo: Path, resnet_file: Path, work: Path) -> dict[str, Any]:
    import onnxruntime as ort

    from tests.modelgen import mlp

    mlp_repo = work / "repo-mlp"
    mlp_file = save_model(mlp((64, 256, 10)), mlp_repo, "mlp")
    rng = np.random.default_rng(4)
    cases = [
        {
            "model": "mlp",
            "label": "MLP 64→256→10, V2 JSON, batch 1",
            "repo": mlp_repo,
            "file": mlp_file,
            "inputs": {"x": rng.standard_normal((1, 64)).astype(np.float32)},
            "binary": False,
            "warmup": plan.mlp_warmup,
            "duration": plan.mlp_duration,
        },
        {
            "model": "resnet50",
            "label": "ResNet-50, V2 binary in / JSON out, batch 1",
            "repo": resnet_repo,
            "file": resnet_file,
            "inputs": {"input": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)},
            "binary": True,
            "warmup": plan.resnet_warmup,
            "duration": plan.resnet_duration,
        },
    ]
    results: dict[str, Any] = {}
    for case in cases:
        model = case["model"]
        body = v2_body(case["inputs"], binary=case["binary"])
        ref_sess = ort.InferenceSession(str(case["file"]), providers=["CPUExecutionProvider"])
        ref_names = [o.name for o in ref_sess.get_outputs()]
        expected = dict(zip(ref_names, ref_sess.run(ref_names, case["inputs"]), strict=True))
        del ref_sess
        servers: dict[str, tuple[subprocess.Popen[bytes], int, Path]] = {}
        points: dict[str, list[dict[str, Any]]] = {"oclaw": [], "naive": []}
        checks: dict[str, str] = {}
        try:
            for kind in ("oclaw", "naive"):
                servers[kind] = start_server(kind, case["repo"], case["file"], work, model)
                checks[kind] = check_outputs(servers[kind][1], model, body, expected)
                log(f"throughput {model}: {kind} up on port {servers[kind][1]}, output check {checks[kind]}")
            files = {}
            for kind, (_, port, _) in servers.items():
                files[kind] = work / f"request-{model}-{kind}.http"
                files[kind].write_bytes(common.infer_request(port, model, *body))
            for i, c in enumerate(plan.concurrencies):
                for kind in ("oclaw", "naive") if i % 2 == 0 else ("naive", "oclaw"):
                    proc, port, _ = servers[kind]
                    r = run_loadgen(
                        proc, port, files[kind], concurrency=c, warmup=case["warmup"], duration=case["duration"]
                    )
                    points[kind].append(r)
                    if "error" in r or r.get("p50_us") is None:
                        log(f"  {model} {kind} c={c}: ERROR {r.get('error') or r.get('protocol_errors')}")
                    else:
                        log(
                            f"  {model} {kind} c={c}: {r['rps']:.1f} req/s p50 {r['p50_us'] / 1e3:.2f} ms "
                            f"p99 {r['p99_us'] / 1e3:.2f} ms non-200 {r['non_200'] or 0}"
                        )
        finally:
            for proc, _, _ in servers.values():
                common.stop(proc)
        results[model] = {
            "label": case["label"],
            "request_bytes": len(body[0]),
            "output_check": checks,
            "points": points,
        }
    return results


def print_throughput(res: dict[str, Any]) -> None:
    print("\n## 3. Throughput and latency vs concurrency (closed loop, separate client process)\n")
    rows = []
    failures = []
    for model, r in res.items():
        for o, n in zip(r["points"]["oclaw"], r["points"]["naive"], strict=True):
            c = o.get("concurrency")
            for kind, p in (("oclaw", o), ("naive", n)):
                if "error" in p:
                    failures.append(f"{model} {kind} c={c}: {p['error']}")
                elif p["non_200"] or p["protocol_errors"]:
                    failures.append(
                        f"{model} {kind} c={c}: non-200 {p['non_200']} {p['non_200_samples']} {p['protocol_errors']}"
                    )

            def g(p: dict[str, Any], k: str, scale: float = 1.0) -> float | None:
                v = p.get(k)
                return None if v is None else v / scale

            rows.append(
                [
                    model,
                    c,
                    fmt(g(o, "rps")),
                    fmt(g(n, "rps")),
                    fmt_ratio(ratio(g(o, "rps"), g(n, "rps"))),
                    fmt(g(o, "p50_us", 1e3), 2),
                    fmt(g(n, "p50_us", 1e3), 2),
                    fmt(g(o, "p99_us", 1e3), 2),
                    fmt(g(n, "p99_us", 1e3), 2),
                    fmt_ratio(ratio(g(o, "p99_us"), g(n, "p99_us"))),
                    f"{sum(o.get('non_200', {}).values())} / {sum(n.get('non_200', {}).values())}",
                    f"{fmt(g(o, 'server_cpu_ms_per_req'), 2)} / {fmt(g(n, 'server_cpu_ms_per_req'), 2)}",
                ]
            )
    print(
        table(
            [
                "model", "C", "oclaw req/s", "naive req/s", "req/s oclaw/naive", "oclaw p50 ms", "naive p50 ms",
                "oclaw p99 ms", "naive p99 ms", "p99 oclaw/naive", "non-200 (o/n)", "server CPU ms/req (o/n)",
            ],
            rows,
        )
    )  # fmt: skip
    for model, r in res.items():
        print(f"\n{model}: {r['label']}; request {r['request_bytes']:,} bytes; output check {r['output_check']}")
    if failures:
        print("\n**Non-200 responses / errors:**\n")
        for f in failures:
            print(f"- {f}")
    else:
        print("\nNon-200 responses: 0 at every point.")


# -- plots ----------------------------------------------------------------------------------------------------


def plot_all(results: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if "cold" in results:
        res = results["cold"]
        fig, axes = plt.subplots(1, len(res), figsize=(6 * len(res), 4.8), squeeze=False)
        for ax, (model, r) in zip(axes[0], res.items(), strict=True):
            v = r["variants"]
            labels = list(v)
            for x, variant in enumerate(labels):
                run = v[variant]["median_run"]
                if not run:
                    continue
                if variant == "floor":
                    parts = [
                        ("interpreter start (+ pipe)", run["interpreter_ms"], "#bbbbbb"),
                        ("import ort+numpy", run["phases"]["import_ms"], "#8da0cb"),
                        ("session", run["phases"]["session_ms"], "#fc8d62"),
                        ("inference / warm-up", run["phases"]["run_ms"], "#66c2a5"),
                    ]
                elif run.get("cold_start"):
                    total = run["cold_start"]["total_ms"]
                    parts = [
                        ("outside total_ms (interp., bind, 1st req.)", run["outside_total_ms"], "#dddddd"),
                        ("session", run["session_ms"], "#fc8d62"),
                        ("inference / warm-up", run["warmup_ms"], "#66c2a5"),
                        (
                            "rest of total_ms (imports, setup)",
                            max(0.0, total - run["session_ms"] - run["warmup_ms"]),
                            "#e78ac3",
                        ),
                    ]
                else:
                    parts = [("not instrumented (total)", run["e2e_ms"], "#a6d854")]
                bottom = 0.0
                for lab, val, colour in parts:
                    ax.bar(x, val, bottom=bottom, color=colour, label=lab, edgecolor="white", linewidth=0.5)
                    bottom += val
                med = v[variant]["median_ms"]
                ax.text(x, run["e2e_ms"] * 1.01, f"median {med:.0f} ms", ha="center", va="bottom", fontsize=8)
            ax.set_xticks(range(len(labels)), labels, fontsize=8)
            ax.set_ylabel("spawn → first infer (ms, median run)")
            ax.set_title(f"Cold start: {model}")
            ax.set_ylim(0, ax.get_ylim()[1] * 1.08)
            handles, labs = ax.get_legend_handles_labels()
            uniq = dict(zip(labs, handles, strict=True))
            ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)
        fig.tight_layout()
        p = out / "cold_start.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p.name)
    if "overhead" in results:
        paths = results["overhead"]["paths"]
        keys = list(paths)
        fig, ax = plt.subplots(figsize=(9, 4.5))
        x = np.arange(len(keys))
        ax.bar(x - 0.2, [paths[k]["p50_us"] for k in keys], 0.4, label="p50")
        ax.bar(x + 0.2, [paths[k]["p99_us"] for k in keys], 0.4, label="p99")
        ax.set_xticks(x, [OVERHEAD_LABELS[k].replace(", ", "\n").replace(" (", "\n(") for k in keys], fontsize=7)
        ax.set_ylabel("latency (µs)")
        ax.set_title(f"Per-request latency, c=1: {results['overhead']['model']}")
        ax.legend()
        fig.tight_layout()
        p = out / "overhead.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p.name)
    if "throughput" in results:
        res = results["throughput"]
        fig, axes = plt.subplots(2, len(res), figsize=(6 * len(res), 8), squeeze=False)
        for col, r in enumerate(res.values()):
            for kind, marker, colour in (("oclaw", "o", "tab:blue"), ("naive", "s", "tab:orange")):
                pts = [p for p in r["points"][kind] if "error" not in p and p.get("p50_us") is not None]
                cs = [p["concurrency"] for p in pts]
                axes[0][col].plot(cs, [p["rps"] for p in pts], marker=marker, color=colour, label=kind)
                axes[1][col].plot(
                    cs, [p["p99_us"] / 1e3 for p in pts], marker=marker, color=colour, label=f"{kind} p99"
                )
                axes[1][col].plot(
                    cs,
                    [p["p50_us"] / 1e3 for p in pts],
                    marker=marker,
                    color=colour,
                    linestyle="--",
                    alpha=0.5,
                    label=f"{kind} p50",
                )
            axes[0][col].set_title(r["label"], fontsize=10)
            axes[0][col].set_ylabel("req/s")
            axes[0][col].set_ylim(bottom=0)
            axes[1][col].set_ylabel("latency (ms, log)")
            axes[1][col].set_yscale("log")
            for ax in (axes[0][col], axes[1][col]):
                ax.set_xscale("log", base=2)
                ax.set_xticks([1, 8, 32], ["1", "8", "32"])
                ax.set_xlabel("concurrency")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / "throughput.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p.name)
    return written


# -- main -------------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import onnxruntime as ort

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
    }
    with contextlib.suppress(OSError):
        info["loadavg_start"] = os.getloadavg()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        info["git_dirty"] = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--", "engine", "handler"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout.strip()
        )
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        info["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5, check=False
        ).stdout.strip()
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="small counts and short windows (about 1.5 minutes)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results", help="output directory (bench-results/)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {SECTIONS}")
    plan = Plan.make(args.quick)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "meta": {
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "quick": plan.quick,
            "sections": only,
            "plan": plan.__dict__,
            "machine": machine_info(),
        }
    }
    common.PYCACHE_PREFIX = out / "cache" / "pycache"
    results["meta"]["children_env"] = {
        "PYTHONPYCACHEPREFIX": str(common.PYCACHE_PREFIX),
        "PYTHONDONTWRITEBYTECODE": "unset (was " + repr(os.environ.get("PYTHONDONTWRITEBYTECODE")) + ")",
        "OCLAW_*": "removed",
    }
    work = Path(tempfile.mkdtemp(prefix="work-", dir=out))
    print(
        f"# oclaw benchmarks ({'quick' if plan.quick else 'full'} run, {results['meta']['machine'].get('cpus')} CPUs)"
    )
    try:
        resnet_file = resnet_repo = None
        if "cold" in only or "throughput" in only:
            t = time.perf_counter()
            cached = resnet50.cached_model(out / "cache")
            log(f"ResNet-50 model {cached.name} ready in {time.perf_counter() - t:.1f} s")
            resnet_repo = work / "repo-resnet50"
            resnet_file = link_model(cached, resnet_repo, "resnet50")
            params, buffers = resnet50.parameter_count(resnet_file)
            results["meta"]["resnet50"] = {"version": resnet50.VERSION, "parameters": params, "bn_buffers": buffers}
        for section in SECTIONS:
            if section not in only:
                continue
            t = time.perf_counter()
            log(f"section {section}")
            try:
                if section == "cold":
                    assert resnet_repo is not None and resnet_file is not None
                    results["cold"] = section_cold(plan, resnet_file, work)
                    print_cold(results["cold"])
                elif section == "lambda":
                    from benchmarks import lambda_cold

                    results["lambda"] = lambda_cold.section(plan.quick, out, work)
                elif section == "overhead":
                    results["overhead"] = section_overhead(plan, work)
                    print_overhead(results["overhead"])
                else:
                    assert resnet_repo is not None and resnet_file is not None
                    results["throughput"] = section_throughput(plan, resnet_repo, resnet_file, work)
                    print_throughput(results["throughput"])
            except Exception as exc:  # noqa: BLE001 - a broken section must not lose the others
                results.pop(section, None)
                results["meta"].setdefault("failed_sections", {})[section] = f"{type(exc).__name__}: {exc}"
                print(f"\n## {section}: FAILED\n\n```\n{type(exc).__name__}: {exc}\n```")
                log(f"section {section} failed: {exc}")
            sys.stdout.flush()
            results["meta"].setdefault("section_s", {})[section] = round(time.perf_counter() - t, 1)
            common.write_json(out / "results.json", results)
        results["meta"]["plots"] = plot_all(results, out)
        results["meta"]["elapsed_s"] = round(time.perf_counter() - started, 1)
        common.write_json(out / "results.json", results)
        print(f"\nResults: {out / 'results.json'}; plots: {', '.join(results['meta']['plots'])}; "
              f"{results['meta']['elapsed_s']:.0f} s in all.")  # fmt: skip
    finally:
        common.kill_all()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
