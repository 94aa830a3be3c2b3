"""Cost of metering on the warm path: a tiny model's request with every sink on, metrics only, records only (the
log, no metrics) and nothing.

``python -m benchmarks.metering_cost [N] [PROCESSES] [ROUNDS] [OUT]``: a tiny model (add_sub FP32 [1,16] x2,
V2 JSON), measured four ways:

1. in-process: the request through ``oclaw serve``'s data plane (ASGI, no network), alternating between an app
   with every sink on (log sink to /dev/null) and one with nothing, max(N, 20,000) times each, plus the
   background flush per request: the request path's own cost, in a hot loop;
2. over HTTP: PROCESSES ``oclaw serve`` processes whose sinks are switched between rounds
   (benchmarks.metering_switch), ROUNDS rounds of N/10 requests per state on a keep-alive socket (short rounds:
   the VM's speed drifts less between neighbours): p50 latency, the event-loop thread's CPU time and the whole
   process's (the flusher included) per request;
3. the same server kept busy by benchmarks.loadgen (8 connections, ROUNDS/10 rounds of 2.5 s per state):
   requests per second and CPU per request;
4. on Lambda: the invocation Duration p50 under awslambdaric, one function per process with the template's
   ``log`` sink and the EMF metrics switched, ROUNDS rounds of max(50, 6000/ROUNDS) invokes per state.

Prints the tables and writes OUT/metering_cost.png (default bench-results/).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import infer_request, stop, table, tail
from benchmarks.harness import rotated, start_server
from benchmarks.overhead import _sequential
from engine.config import Settings
from engine.metering.sinks import LogSink
from engine.runtime import Runtime
from handler.asgi import ServerApp
from tests.modelgen import _save, add_sub

#: Every sink on (metering records + metrics), metrics only (no record, no header), records only (no metrics),
#: nothing.
STATES = ["on", "metrics", "records", "off"]
#: (what is compared, state with it, state without it)
COMPARISONS = (
    ("metering (records + header), metrics kept", "on", "metrics"),
    ("metering (records + header) alone, vs nothing", "records", "off"),
    ("metering + metrics, vs neither", "on", "off"),
)
BODY = json.dumps(
    {"inputs": [{"name": n, "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16} for n in ("INPUT0", "INPUT1")]}
).encode()


async def call(app: ServerApp) -> int:
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v2/models/add_sub/infer",
        "raw_path": b"",
        "query_string": b"",
        "headers": [(b"content-length", str(len(BODY)).encode())],
        "http_version": "1.1",
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 1),
        "root_path": "",
    }
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def start(repo: Path, on: bool) -> tuple[ServerApp, asyncio.Task[None]]:
    settings = Settings.from_env(
        {}, model_repository=str(repo), metering_sinks=("log:packed",) if on else ("none",), metrics=on
    )
    runtime = Runtime(settings)
    app = ServerApp(runtime, lambda: None)  # type: ignore[arg-type,return-value]
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    messages.put_nowait({"type": "lifespan.startup"})
    started = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        started.set()

    lifespan = asyncio.get_running_loop().create_task(app({"type": "lifespan"}, messages.get, send))
    await started.wait()
    if on:
        sinks = runtime.meter.sinks
        runtime.meter.sinks = [LogSink(open(os.devnull, "w"), packed=True), *sinks[1:]]  # noqa: SIM115 - process-long
    return app, lifespan


def in_process(repo: Path, n: int) -> tuple[float, float, float]:
    """(request µs with metering off, on, background flush µs per request), medians over ``n`` alternations."""

    async def run() -> tuple[float, float, float]:
        started = {"off": await start(repo, False), "on": await start(repo, True)}
        apps = {key: app for key, (app, _) in started.items()}
        times: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(500):
            for app in apps.values():
                await call(app)
        apps["on"].runtime.meter.flush()
        flush_ns = 0
        for _ in range(n):
            for key, app in apps.items():
                t = time.perf_counter_ns()
                assert await call(app) == 200
                times[key].append((time.perf_counter_ns() - t) / 1000)
            if len(times["on"]) % 1000 == 0:  # the server flushes once a second, i.e. every ~3000 requests at c1
                t = time.perf_counter_ns()
                apps["on"].runtime.meter.flush()
                flush_ns += time.perf_counter_ns() - t
        for _, lifespan in started.values():
            lifespan.cancel()
        return statistics.median(times["off"]), statistics.median(times["on"]), flush_ns / 1000 / n

    return asyncio.run(run())


def cpu_ns(pid: int, thread: int | None = None) -> int:
    """CPU time of one thread, or of every thread, of a process so far, in ns (/proc/PID/task/*/schedstat)."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob(f"{thread or '*'}/schedstat"):
        with contextlib.suppress(OSError):
            total += int(stat.read_text().split()[0])
    return total


class Switched:
    """One ``oclaw serve`` process whose metering is switched by commands (benchmarks.metering_switch)."""

    def __init__(self, repo: Path, work: Path, tag: str) -> None:
        ack_read, ack_write = os.pipe()
        try:
            self.proc, self.port, self.log = start_server(
                "oclaw-switch",
                repo,
                repo / "add_sub" / "1" / "model.onnx",
                work,
                tag,
                stdin=subprocess.PIPE,
                pass_fds=(ack_write,),
                env={"OCLAW_SWITCH_ACK_FD": str(ack_write)},
            )
        except BaseException:
            os.close(ack_read)
            raise
        finally:
            os.close(ack_write)
        self.acks = os.fdopen(ack_read)

    def __call__(self, command: str) -> None:
        """Send ``on``, ``off`` or ``flush`` and wait until it is done."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{command}\n".encode())
        self.proc.stdin.flush()
        if not self.acks.readline().startswith(command):
            raise RuntimeError(f"the server did not acknowledge {command!r}\n{tail(self.log)}")

    def close(self) -> None:
        stop(self.proc)
        self.acks.close()


def over_http(repo: Path, work: Path, n: int, instances: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    """The same request over HTTP (``oclaw serve``, keep-alive socket, c1), metering switched on and off.

    One server process per instance, ``rounds`` pairs of rounds of ``n`` requests, on and off alternating (the
    order rotated): per round, the p50 latency and the CPU time per request of the event loop's thread and of
    the whole process (every thread; a round ends with a flush of what it queued).
    """
    out: dict[str, dict[str, list[float]]] = {
        figure: {state: [] for state in STATES} for figure in ("p50_us", "loop_cpu_us", "cpu_us")
    }
    for instance in range(instances):
        server = Switched(repo, work, f"switch{instance}")
        try:
            pid, request = server.proc.pid, infer_request(server.port, "add_sub", BODY, None)
            for state in STATES:  # warm every way
                server(state)
                _sequential(server.port, request, 2000, 60)
            for rnd in range(rounds):
                for state in rotated(STATES, rnd + instance):
                    server(state)
                    loop, whole = cpu_ns(pid, pid), cpu_ns(pid)
                    got, bad = _sequential(server.port, request, n, 60)
                    server("flush")
                    if bad:
                        raise RuntimeError(f"metering {state}: non-200 answers {bad}")
                    out["p50_us"][state].append(statistics.median(got) / 1000)
                    out["loop_cpu_us"][state].append((cpu_ns(pid, pid) - loop) / 1000 / len(got))
                    out["cpu_us"][state].append((cpu_ns(pid) - whole) / 1000 / len(got))
        finally:
            server.close()
    return out


def saturated(repo: Path, work: Path, instances: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    """The switched server kept busy (benchmarks.loadgen, 8 connections, 2.5 s windows): req/s and CPU per request.

    A c1 client leaves the server idle between requests, so every request starts from cold caches and each µs
    of Python code costs ~3x what it costs in a hot loop; a busy server runs hot. Both regimes are reported.
    """
    from benchmarks.throughput import run_loadgen

    out: dict[str, dict[str, list[float]]] = {figure: {state: [] for state in STATES} for figure in ("rps", "cpu_us")}
    request_file = work / "metering-request.bin"
    for instance in range(instances):
        server = Switched(repo, work, f"busy{instance}")
        try:
            request_file.write_bytes(infer_request(server.port, "add_sub", BODY, None))
            for rnd in range(rounds):
                for state in rotated(STATES, rnd + instance):
                    server(state)
                    whole = cpu_ns(server.proc.pid)
                    got = run_loadgen(server.proc, server.port, request_file, concurrency=8, warmup=0.5, duration=2.5)
                    server("flush")
                    if "error" in got or got.get("non_200"):
                        raise RuntimeError(f"metering {state}: {got}")
                    total = got["requests"] + got["warmup_requests"]
                    out["rps"][state].append(got["rps"])
                    out["cpu_us"][state].append((cpu_ns(server.proc.pid) - whole) / 1000 / total)
        finally:
            server.close()
    return out


def on_lambda(repo: Path, work: Path, invokes: int, instances: int, rounds: int) -> dict[str, list[float]]:
    """Lambda Duration p50 (µs) of a tiny-model HTTP API event under awslambdaric, metering switched on and off.

    One function per instance with the template's sink and metrics (log + EMF; flushed before each invocation returns),
    switched between rounds of ``invokes`` invocations (benchmarks.metering_switch.lambda_handler).
    """
    from handler.local_lambda import LocalLambda
    from tests.conftest import ROOT

    event = json.loads((ROOT / "tests" / "events" / "apigw_v2_infer.json").read_text())
    out: dict[str, list[float]] = {key: [] for state in STATES for key in (state, f"{state}_wall")}
    for instance in range(instances):
        env = {"OCLAW_MODEL_REPOSITORY": str(repo), "OCLAW_METERING_SINKS": "log"}
        with LocalLambda(
            "benchmarks.metering_switch.lambda_handler",
            env=env,
            cwd=ROOT,
            memory_mb=1024,
            log=work / f"lambda-{instance}.log",
        ) as fn:
            fn.wait_init()
            for state in STATES:  # warm every way
                fn.invoke({"oclaw-switch": state})
                for _ in range(100):
                    fn.invoke(event)
            for rnd in range(rounds):
                for state in rotated(STATES, rnd + instance):
                    fn.invoke({"oclaw-switch": state})
                    durations, walls = [], []
                    for _ in range(invokes):
                        started = time.perf_counter_ns()
                        durations.append(fn.invoke(event).duration_ms)
                        walls.append((time.perf_counter_ns() - started) / 1000)
                    out[state].append(statistics.median(durations) * 1000)
                    out[f"{state}_wall"].append(statistics.median(walls))
    return out


def paired(on: list[float], off: list[float]) -> tuple[float, float]:
    """Mean of the paired differences on - off, and its standard error."""
    diffs = [a - b for a, b in zip(on, off, strict=True)]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else math.nan
    return statistics.mean(diffs), se


def plot(http: dict[str, dict[str, list[float]]], request: float, out: Path) -> Path:
    """metering_cost.png: each round's difference in µs (metering vs metrics only; both vs neither), 2 % line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"p50_us": "HTTP p50", "loop_cpu_us": "event-loop CPU", "cpu_us": "process CPU"}
    fig, ax = plt.subplots(figsize=(8, 4))
    for x, key in enumerate(labels):
        for i, (shift, (_, with_, without)) in enumerate(zip((-0.2, 0.0, 0.2), COMPARISONS, strict=True)):
            diffs = [a - b for a, b in zip(http[key][with_], http[key][without], strict=True)]
            ax.scatter([x + shift] * len(diffs), diffs, alpha=0.35, s=12, color=f"C{i}")
            mean, se = paired(http[key][with_], http[key][without])
            ax.errorbar([x + shift], [mean], yerr=[2 * se], fmt="o", color="black", capsize=4)
    for i, (what, _, _) in enumerate(COMPARISONS):
        ax.scatter([], [], color=f"C{i}", label=what)
    ax.axhline(0.02 * request, color="red", linestyle="--", label=f"2 % of the request ({0.02 * request:.1f} µs)")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(labels)), list(labels.values()))
    ax.set_ylabel("on - off, µs per request")
    ax.set_title("Metering cost per round pair (mean ± 2 SE)")
    ax.legend(fontsize=8)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "metering_cost.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _rows(
    figures: dict[str, dict[str, list[float]]], names: dict[str, str], base: float, unit: str = "µs"
) -> list[list[str]]:
    """A table row per figure and comparison: without, with, difference ± SE, relative to ``base``."""
    rows = []
    for key, name in names.items():
        for what, with_, without in COMPARISONS:
            diff, se = paired(figures[key][with_], figures[key][without])
            rows.append(
                [
                    f"{name}: {what}",
                    f"{statistics.mean(figures[key][without]):.1f}",
                    f"{statistics.mean(figures[key][with_]):.1f}",
                    f"{diff:+.1f} ± {se:.1f} {unit}",
                    f"{diff / base * 100:+.2f} % ± {se / base * 100:.2f} %",
                ]
            )
    return rows


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    instances = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    out = Path(sys.argv[4]) if len(sys.argv) > 4 else Path("bench-results")
    per_round = max(100, n // 10)  # short rounds: the VM's speed drifts less between neighbouring rounds
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        _save(add_sub(16), repo, "add_sub")
        off, on, flush_us = in_process(repo, max(n, 20_000))
        http = over_http(repo, Path(tmp), per_round, instances, rounds)
        busy = saturated(repo, Path(tmp), instances, max(2, rounds // 10))
        lam = on_lambda(repo, Path(tmp), max(50, 6000 // rounds), instances, rounds)
    request = statistics.mean(http["p50_us"]["off"])
    pairs = len(http["p50_us"]["on"])
    print(
        f"\n## Metering cost on the warm path (add_sub FP32 [1,16] x2, V2 JSON, c1; {instances} `oclaw serve` "
        f"processes x {rounds} rounds of {per_round} requests in each state: every sink on "
        "(log:packed + Prometheus), metrics only, records only, nothing)\n"
    )
    header = ["what", "without", "with", "difference (± SE)", "of the request p50 (nothing on)"]
    http_names = {"p50_us": "HTTP p50", "loop_cpu_us": "event-loop CPU", "cpu_us": "process CPU (flush included)"}
    in_proc = [
        [
            "in-process request path, all on vs nothing (ASGI, no network, hot loop)",
            f"{off:.1f}",
            f"{on:.1f}",
            f"{on - off:+.1f} µs",
            f"{(on - off) / request * 100:+.2f} %",
        ],
        [
            "in-process background flush (log:packed + Prometheus), per request",
            "-",
            f"{flush_us:.1f}",
            f"{flush_us:+.1f} µs",
            f"{flush_us / request * 100:+.2f} %",
        ],
    ]
    print(table(header, [*_rows(http, http_names, request), *in_proc]))
    print(f"\n({pairs} rounds per state; SE = standard error of the paired difference)")
    rps_off = statistics.mean(busy["rps"]["off"])
    print(f"\n## The same server kept busy (loadgen, 8 connections, {len(busy['rps']['on'])} rounds of 2.5 s)\n")
    print(
        table(
            ["what", "without", "with", "difference (± SE)", "relative"],
            [
                *_rows({"rps": busy["rps"]}, {"rps": "requests per second"}, rps_off, "req/s"),
                *_rows(
                    {"cpu_us": busy["cpu_us"]},
                    {"cpu_us": "process CPU per request"},
                    statistics.mean(busy["cpu_us"]["off"]),
                ),
            ],
        )
    )
    lam_figures = {
        "duration": {state: lam[state] for state in STATES},
        "wall": {state: lam[f"{state}_wall"] for state in STATES},
    }
    print(
        f"\n## On Lambda (awslambdaric + local Runtime API, HTTP API event; {instances} functions x {rounds} rounds "
        "per state: log + EMF / EMF only / log only / none)\n"
    )
    duration = _rows(
        {"duration": lam_figures["duration"]},
        {"duration": "invocation Duration p50 (flushed before it returns)"},
        statistics.mean(lam["off"]),
    )
    wall = _rows(
        {"wall": lam_figures["wall"]},
        {"wall": "invoke round trip p50 (client → Runtime API → function → client)"},
        statistics.mean(lam["off_wall"]),
    )
    print(table(["what", "without", "with", "difference (± SE)", "relative"], [*duration, *wall]))
    try:
        print(f"\nplot: {plot(http, request, out)}")
    except ImportError:
        print("\nno plot: matplotlib is missing (pip install -e '.[bench]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
