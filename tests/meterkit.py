"""Shared helpers of the metering tests: a Meter on a given platform, one record served alone, a hung endpoint."""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path
from typing import Any

from engine.config import Settings
from engine.metering.meter import Meter
from engine.metering.records import MeteringRecord


def meter(tmp_path: Path, platform: str, **overrides: Any) -> Meter:
    settings = Settings.from_env({}, metering_spool=str(tmp_path / "spool.jsonl"), **overrides)
    return Meter(settings, "inst", platform_name=platform)


def one(
    m: Meter, *, total_ms: float, compute_ms: float = 1.0, init_ms: float = 0.0, cold: bool = False
) -> MeteringRecord:
    (record,) = m.records(
        request_ids=["r"],
        tenants=["t"],
        model="m",
        version="1",
        items=[1],
        bytes_in=[10],
        bytes_out=[20],
        statuses=[200],
        queue_ms=[0.0],
        compute_ms=compute_ms,
        total_ms=total_ms,
        init_ms=init_ms,
        cold=cold,
        source="test",
    )
    return record


class Gate:
    """A TCP endpoint on 127.0.0.1 that accepts connections and never answers (a hung service) until ``open()``;
    from then on it relays each new connection to ``target`` (host, port)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.held: list[socket.socket] = []  # connections accepted while closed, never answered
        self._open = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def open(self) -> None:
        """Relay new connections to the target from now on."""
        self._open.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for conn in self.held:
            conn.close()
        self._listener.close()

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            if not self._open.is_set():
                self.held.append(conn)
                continue
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn: socket.socket) -> None:
        with conn, socket.create_connection(self.target) as upstream:
            back = threading.Thread(target=_pump, args=(upstream, conn), daemon=True)
            back.start()
            _pump(conn, upstream)
            back.join()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy bytes from ``source`` to ``sink`` until ``source`` ends, then end ``sink``'s side."""
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)
