"""Cost of metering on the warm path: the same ServerApp request in-process (ASGI, no network), metering on vs off.

``python -m benchmarks.metering_cost [N]``: a tiny model (add_sub FP32 [1,16] x2, V2 JSON) served by the data plane
of ``oclaw serve``; requests alternate between an app with metering + Prometheus on (log sink to /dev/null) and
one with both off, in the same process, and the background flushes are run and timed too. An HTTP request's
difference is lost in the loopback noise (±20 µs), so the in-process difference is set against the HTTP request
of the same model measured in the same run (two `oclaw serve` processes, metering on and off).
"""

from __future__ import annotations

import asyncio
import json
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


def over_http(repo: Path, work: Path, n: int) -> dict[str, float]:
    """p50 µs of the same request over HTTP (oclaw serve, keep-alive socket, c1), metering on and off, interleaved."""
    model_file = repo / "add_sub" / "1" / "model.onnx"
    servers = {}
    try:
        for kind in ("oclaw", "oclaw-nometer"):
            servers[kind] = start_server(kind, repo, model_file, work, "metering")
        requests = {kind: infer_request(port, "add_sub", BODY, None) for kind, (_, port, _) in servers.items()}
        lat: dict[str, list[int]] = {kind: [] for kind in servers}
        for rnd in range(10):
            for kind in rotated(list(servers), rnd):
                got, bad = _sequential(servers[kind][1], requests[kind], n // 10, 60)
                if bad:
                    raise RuntimeError(f"{kind}: non-200 answers {bad}")
                if rnd:  # the first round warms up
                    lat[kind] += got
    finally:
        stop_servers(servers)
    return {kind: statistics.median(values) / 1000 for kind, values in lat.items()}


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        _save(add_sub(16), repo, "add_sub")
        off, on, flush_us = in_process(repo, n)
        http = over_http(repo, Path(tmp), n // 4)
    request = http["oclaw-nometer"]
    added = on - off
    rows = [
        ["HTTP request p50 (oclaw serve, keep-alive, c1), metering + metrics off", f"{request:.1f}", "-"],
        [
            "HTTP request p50, metering + metrics on (context: noisy, ±20 µs)",
            f"{http['oclaw']:.1f}",
            f"{(http['oclaw'] - request) / request * 100:+.1f} %",
        ],
        ["in-process data plane request, metering + metrics off", f"{off:.1f}", "-"],
        ["in-process data plane request, metering + metrics on", f"{on:.1f}", "-"],
        ["added on the request path (on - off)", f"{added:.1f}", f"{added / request * 100:.2f} %"],
        [
            "background flush per request (log line + Prometheus)",
            f"{flush_us:.1f}",
            f"{flush_us / request * 100:.2f} %",
        ],
        ["metering in all, per request", f"{added + flush_us:.1f}", f"{(added + flush_us) / request * 100:.2f} %"],
    ]
    print("\n## Metering cost on the warm path (add_sub FP32 [1,16] x2, V2 JSON; median µs)\n")
    print(table(["what", "µs", "of the HTTP request (off)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
