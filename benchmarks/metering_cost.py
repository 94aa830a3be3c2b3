"""Cost of metering on the warm path: the same ServerApp request in-process (ASGI, no network), metering on vs off.

``python -m benchmarks.metering_cost``: a tiny model (add_sub FP32 [1,16] x2, V2 JSON) served by the data plane
of ``oclaw serve``; requests alternate between an app with metering + Prometheus on (log sink to /dev/null) and
one with both off, in the same process, and the background flushes are run and timed too.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import table
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


async def start(repo: Path, on: bool) -> ServerApp:
    settings = Settings.from_env(
        {}, model_repository=str(repo), metering_sinks=("log",) if on else ("none",), metrics=on
    )
    runtime = Runtime(settings)
    app = ServerApp(runtime, lambda: None)  # type: ignore[arg-type,return-value]
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    started = asyncio.Event()

    async def receive() -> dict[str, Any]:
        return next(messages) if not started.is_set() else await asyncio.Event().wait()  # type: ignore[func-returns-value]

    async def send(message: dict[str, Any]) -> None:
        started.set()

    asyncio.get_running_loop().create_task(
        app(  # lifespan: preload + metrics
            {"type": "lifespan"}, receive, send
        )
    )
    await started.wait()
    if on:
        runtime.meter.sinks[0] = LogSink(open("/dev/null", "w"))  # noqa: SIM115 - lives as long as the process
    return app


async def main_async(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        _save(add_sub(16), repo, "add_sub")
        apps = {"off": await start(repo, False), "on": await start(repo, True)}
        times: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(500):
            for app in apps.values():
                await call(app)
        flush_ns = 0
        for _ in range(n):
            for key, app in apps.items():
                t = time.perf_counter_ns()
                assert await call(app) == 200
                times[key].append((time.perf_counter_ns() - t) / 1000)
            if len(times["on"]) % 1000 == 0:
                t = time.perf_counter_ns()
                apps["on"].runtime.meter.flush()
                flush_ns += time.perf_counter_ns() - t
        flush_us = flush_ns / 1000 / len(times["on"])
        off, on = statistics.median(times["off"]), statistics.median(times["on"])
        rows = [
            ["request through the data plane, metering + metrics off", f"{off:.1f}", "-"],
            ["request through the data plane, metering + metrics on", f"{on:.1f}", f"{(on - off) / off * 100:+.1f} %"],
            [
                "background flush per request (log line + Prometheus)",
                f"{flush_us:.1f}",
                f"{flush_us / off * 100:+.1f} %",
            ],
            ["metering total per request", f"{on - off + flush_us:.1f}", f"{(on - off + flush_us) / off * 100:+.1f} %"],
        ]
        print("\n## Metering cost on the warm path (in-process ASGI, add_sub, V2 JSON, median µs)\n")
        print(table(["what", "µs", "vs request off"], rows))


def main() -> int:
    asyncio.run(main_async(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
