"""Closed-loop HTTP/1.1 load generator on raw sockets (asyncio protocols, uvloop when installed).

C keep-alive connections (TCP_NODELAY) each keep exactly one request in flight; the request bytes
are built once by the caller and read from a file.  After ``--warmup`` seconds the counters reset
and a ``--duration`` window is measured: requests completed inside the window count towards
req/s and their latencies (send -> last body byte) towards the percentiles.  Non-200 responses are
counted by status (with one sample body each).  Prints one JSON object.

    python -m benchmarks.loadgen --port P --request FILE --concurrency 8 --warmup 2 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
#: Upper bound on requests per run, whatever the duration (every loop is bounded).
MAX_REQUESTS = 5_000_000


class Stats:
    """Shared counters of one run."""

    def __init__(self, warm_end: float, end: float) -> None:
        self.warm_end = warm_end
        self.end = end
        self.latencies: list[int] = []
        self.completed = 0
        self.warmup_completed = 0
        self.errors: dict[int, int] = {}
        self.error_samples: dict[int, str] = {}
        self.protocol_errors: list[str] = []
        self.sent = 0

    def error(self, status: int, body: bytes) -> None:
        self.errors[status] = self.errors.get(status, 0) + 1
        self.error_samples.setdefault(status, body[:300].decode("utf-8", "replace"))


class Client(asyncio.Protocol):
    """One connection: send, wait for the whole response, send again, until the window ends."""

    def __init__(self, request: bytes, stats: Stats, done: asyncio.Future[None]) -> None:
        self.request = request
        self.stats = stats
        self.done = done
        self.buf = bytearray()
        self.need = -1  # total bytes of the response being read, once its head is parsed
        self.status = 0
        self.sent_ns = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport
        try:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._send()
        except Exception as exc:  # noqa: BLE001
            self._finish(f"client error: {exc!r}")

    def _send(self) -> None:
        assert self.transport is not None
        if time.perf_counter() >= self.stats.end or self.stats.sent >= MAX_REQUESTS:
            self._finish()
            return
        self.stats.sent += 1
        self.sent_ns = time.perf_counter_ns()
        self.transport.write(self.request)

    def _finish(self, problem: str | None = None) -> None:
        if problem is not None:
            self.stats.protocol_errors.append(problem)
        if self.transport is not None:
            self.transport.close()
        if not self.done.done():
            self.done.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            self._received(data)
        except Exception as exc:  # noqa: BLE001 - end this connection, report, never hang
            self._finish(f"client error: {exc!r}")

    def _received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.need < 0:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.buf[:end]).lower()
                try:
                    self.status = int(head[9:12])
                    pos = head.index(b"\r\ncontent-length:") + 17
                    stop = head.find(b"\r\n", pos)
                    length = int(head[pos : stop if stop >= 0 else len(head)])
                except ValueError:
                    self._finish(f"unparseable response head: {head[:200]!r}")
                    return
                self.need = end + 4 + length
            if len(self.buf) < self.need:
                return
            now_ns = time.perf_counter_ns()
            now = time.perf_counter()
            body = bytes(self.buf[: self.need]) if self.status != 200 else b""
            del self.buf[: self.need]
            self.need = -1
            st = self.stats
            if self.status != 200:
                st.error(self.status, body[body.find(b"\r\n\r\n") + 4 :])
            if st.warm_end <= now < st.end:
                st.completed += 1
                st.latencies.append(now_ns - self.sent_ns)
            elif now < st.warm_end:
                st.warmup_completed += 1
            self._send()
            return

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if time.perf_counter() < self.stats.end:
                self.stats.protocol_errors.append(f"connection lost early: {exc!r}")
            self.done.set_result(None)


async def run(port: int, request: bytes, concurrency: int, warmup: float, duration: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    stats = Stats(start + warmup, start + warmup + duration)
    futures: list[asyncio.Future[None]] = []
    transports = []
    for _ in range(concurrency):
        fut: asyncio.Future[None] = loop.create_future()
        transport, _ = await loop.create_connection(lambda f=fut: Client(request, stats, f), HOST, port)
        transports.append(transport)
        futures.append(fut)
    try:
        # every connection finishes at the end of the window (or when its in-flight request returns)
        await asyncio.wait_for(asyncio.gather(*futures), timeout=warmup + duration + 60)
    except TimeoutError:
        stats.protocol_errors.append("timed out waiting for the last responses")
    finally:
        for t in transports:
            t.close()
    lat = sorted(stats.latencies)

    def pct(q: float) -> float | None:
        if not lat:
            return None
        return lat[min(len(lat) - 1, round(q / 100 * (len(lat) - 1)))] / 1e3

    return {
        "concurrency": concurrency,
        "warmup_s": warmup,
        "duration_s": duration,
        "requests": stats.completed,
        "warmup_requests": stats.warmup_completed,
        "rps": stats.completed / duration,
        "p50_us": pct(50),
        "p90_us": pct(90),
        "p99_us": pct(99),
        "max_us": lat[-1] / 1e3 if lat else None,
        "mean_us": sum(lat) / len(lat) / 1e3 if lat else None,
        "non_200": {str(k): v for k, v in stats.errors.items()},
        "non_200_samples": {str(k): v for k, v in stats.error_samples.items()},
        "protocol_errors": stats.protocol_errors[:10],
        "request_bytes": len(request),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--request", type=Path, required=True, help="file holding the raw HTTP request bytes")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args(argv)
    request = args.request.read_bytes()
    runner = asyncio.run
    if not args.no_uvloop:
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            pass
    result = runner(run(args.port, request, args.concurrency, args.warmup, args.duration))
    result["loop"] = "uvloop" if runner is not asyncio.run else "asyncio"
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
