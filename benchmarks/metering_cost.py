"""Cost of metering on the warm path: the same ServerApp request in-process (ASGI, no network), metering on vs off.

``python -m benchmarks.metering_cost [N] [PROCESSES]``: a tiny model (add_sub FP32 [1,16] x2, V2 JSON) served
by the data plane of ``oclaw serve``; requests alternate between an app with metering + Prometheus on (log sink
to /dev/null) and one with both off, in the same process, and the background flushes are run and timed too.
Over HTTP the difference is within the loopback noise of one process (±15 µs), so it is also measured over
PROCESSES pairs of fresh `oclaw serve` processes (metering on and off), and the in-process difference is set
against that HTTP request time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import infer_request, table
from benchmarks.harness import rotated, start_server, stop_servers
from benchmarks.overhead import _sequential
from engine.config import Settings
from engine.runtime import Runtime
from engine.sinks import LogSink
from handler.asgi import ServerApp
from tests.modelgen import _save, add_sub

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
        {}, model_repository=str(repo), metering_sinks=("log",) if on else ("none",), metrics=on
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
        runtime.meter.sinks[0] = LogSink(open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the process
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


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of a process so far, in ns (/proc/PID/task/*/schedstat, Linux)."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        with contextlib.suppress(OSError):
            total += int(stat.read_text().split()[0])
    return total


def over_http(repo: Path, work: Path, n: int, instances: int) -> dict[str, dict[str, list[float]]]:
    """The same request over HTTP (oclaw serve, keep-alive socket, c1), metering on and off.

    Per process: the p50 latency, and the server's CPU time per request (all its threads: the flusher too).
    Each server process carries its own latency bias of ±10 µs (memory layout, core placement), so
    ``instances`` fresh pairs are started and measured in interleaved rounds; figures are per process.
    """
    model_file = repo / "add_sub" / "1" / "model.onnx"
    kinds = ("oclaw", "oclaw-nometer")
    out: dict[str, dict[str, list[float]]] = {"p50_us": {k: [] for k in kinds}, "cpu_us": {k: [] for k in kinds}}
    for instance in range(instances):
        servers = {}
        try:
            for kind in rotated(list(kinds), instance):
                servers[kind] = start_server(kind, repo, model_file, work, f"metering{instance}")
            requests = {kind: infer_request(port, "add_sub", BODY, None) for kind, (_, port, _) in servers.items()}
            lat: dict[str, list[int]] = {kind: [] for kind in servers}
            start: dict[str, int] = {}
            for rnd in range(6):
                if rnd == 1:  # the first round warms up
                    start = {kind: cpu_ns(proc.pid) for kind, (proc, _, _) in servers.items()}
                for kind in rotated(list(servers), rnd):
                    got, bad = _sequential(servers[kind][1], requests[kind], n // 5, 60)
                    if bad:
                        raise RuntimeError(f"{kind}: non-200 answers {bad}")
                    if rnd:
                        lat[kind] += got
            time.sleep(1.5)  # the once-a-second flush of the last records is part of the work
            cpu = {kind: cpu_ns(proc.pid) - start[kind] for kind, (proc, _, _) in servers.items()}
        finally:
            stop_servers(servers)
        for kind in kinds:
            out["p50_us"][kind].append(statistics.median(lat[kind]) / 1000)
            out["cpu_us"][kind].append(cpu[kind] / 1000 / len(lat[kind]))
    return out


def on_lambda(repo: Path, work: Path, invokes: int, rounds: int) -> dict[str, list[float]]:
    """Lambda Duration p50 (µs) of a tiny-model HTTP event under awslambdaric, sinks off vs the template's log,emf.

    Each round starts a fresh function per configuration (a process bias again), 100 warm-up invokes first.
    """
    from handler.local_lambda import LocalLambda
    from tests.conftest import ROOT

    event = json.loads((ROOT / "tests" / "events" / "apigw_v2_infer.json").read_text())
    out: dict[str, list[float]] = {"none": [], "log,emf": []}
    for rnd in range(rounds):
        for sinks in rotated(list(out), rnd):
            env = {"OCLAW_MODEL_REPOSITORY": str(repo), "OCLAW_METERING_SINKS": sinks}
            with LocalLambda(env=env, cwd=ROOT, memory_mb=1024, log=work / f"lambda-{rnd}.log") as fn:
                fn.wait_init()
                for _ in range(100):
                    fn.invoke(event)
                durations = [fn.invoke(event).duration_ms for _ in range(invokes)]
            out[sinks].append(statistics.median(durations) * 1000)
    return out


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    instances = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        _save(add_sub(16), repo, "add_sub")
        off, on, flush_us = in_process(repo, n)
        http = over_http(repo, Path(tmp), max(1000, n // 5), instances)
        lam = on_lambda(repo, Path(tmp), 400, instances)
    p50, cpu = http["p50_us"], http["cpu_us"]
    request = statistics.mean(p50["oclaw-nometer"])

    def paired(figures: dict[str, list[float]]) -> tuple[float, float]:
        diffs = [a - b for a, b in zip(figures["oclaw"], figures["oclaw-nometer"], strict=True)]
        return statistics.mean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else math.nan

    p50_diff, p50_se = paired(p50)
    cpu_diff, cpu_se = paired(cpu)
    added = on - off
    rows = [
        ["HTTP request p50, metering + metrics off (oclaw serve, keep-alive, c1)", f"{request:.1f}", "-"],
        [
            "HTTP request p50, metering + metrics on (± standard error of the paired difference)",
            f"{statistics.mean(p50['oclaw']):.1f}",
            f"{p50_diff / request * 100:+.2f} % (± {p50_se / request * 100:.2f} %)",
        ],
        [
            "server CPU per request, metering + metrics off (all threads)",
            f"{statistics.mean(cpu['oclaw-nometer']):.1f}",
            "-",
        ],
        [
            "server CPU per request, metering + metrics on (flusher included)",
            f"{statistics.mean(cpu['oclaw']):.1f}",
            f"{cpu_diff / request * 100:+.2f} % (± {cpu_se / request * 100:.2f} %)",
        ],
        ["in-process data plane request, metering + metrics off", f"{off:.1f}", "-"],
        ["in-process data plane request, metering + metrics on", f"{on:.1f}", "-"],
        ["added on the request path (on - off, in-process)", f"{added:.1f}", f"{added / request * 100:.2f} %"],
        ["background flush per request (log + Prometheus)", f"{flush_us:.1f}", f"{flush_us / request * 100:.2f} %"],
        [
            "metering in all, per request (in-process)",
            f"{added + flush_us:.1f}",
            f"{(added + flush_us) / request * 100:.2f} %",
        ],
    ]
    print(f"\n## Metering cost on the warm path (add_sub FP32 [1,16] x2, V2 JSON; µs; {instances} server pairs)\n")
    print(table(["what", "µs", "of the HTTP request p50 (off)"], rows))
    lam_off, lam_on = statistics.mean(lam["none"]), statistics.mean(lam["log,emf"])
    lam_diffs = [a - b for a, b in zip(lam["log,emf"], lam["none"], strict=True)]
    lam_se = statistics.stdev(lam_diffs) / len(lam_diffs) ** 0.5 if len(lam_diffs) > 1 else math.nan
    print(f"\n## On Lambda (awslambdaric + local Runtime API, HTTP API event, {instances} function pairs)\n")
    print(
        table(
            ["what", "µs", "vs sinks off"],
            [
                ["invocation Duration p50, metering off (OCLAW_METERING_SINKS=none)", f"{lam_off:.0f}", "-"],
                [
                    "invocation Duration p50, metering log,emf (template.yaml's setting; flushed before return)",
                    f"{lam_on:.0f}",
                    f"{(lam_on - lam_off) / lam_off * 100:+.1f} % (± {lam_se / lam_off * 100:.1f} %)",
                ],
            ],
        )
    )
    for name, figures in (("HTTP p50", p50), ("server CPU per request", cpu)):
        pairs = [f"{a:.0f}/{b:.0f}" for a, b in zip(figures["oclaw"], figures["oclaw-nometer"], strict=True)]
        print(f"\nper process pair, {name} µs, on/off: {' '.join(pairs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
