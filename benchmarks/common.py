"""Shared helpers: child processes (always reaped), a blocking raw-socket HTTP/1.1 client, statistics."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PYTHON = sys.executable

_children: list[subprocess.Popen[bytes]] = []
#: Where children keep their bytecode (set by the runner): every variant then starts with compiled .pyc
#: files, as a deployed install would, even where PYTHONDONTWRITEBYTECODE is set; the tree stays untouched.
PYCACHE_PREFIX: Path | None = None


# -- processes ------------------------------------------------------------------------------------


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGKILL this child if the benchmark process dies without cleaning up."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every child: ours without OCLAW_* / PORT, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCLAW_") and k != "PORT"}
    env["PYTHONUNBUFFERED"] = "1"
    if PYCACHE_PREFIX is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(PYCACHE_PREFIX)
    env.update(extra or {})
    return env


def spawn(
    args: Sequence[str],
    *,
    stdout: int | BinaryIO | None = None,
    stderr: int | BinaryIO | None = None,
    env: dict[str, str] | None = None,
    stdin: int = subprocess.DEVNULL,
    pass_fds: Sequence[int] = (),
) -> subprocess.Popen[bytes]:
    """Start a child process from the repository root; it is registered for kill_all()."""
    proc = subprocess.Popen(
        list(args),
        stdout=stdout,
        stderr=stderr,
        stdin=stdin,
        pass_fds=pass_fds,
        cwd=ROOT,
        env=child_env(env),
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
    )
    _children.append(proc)
    return proc


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """SIGTERM, wait up to ``timeout`` s, then SIGKILL; returns the exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
    _close_streams(proc)
    if proc in _children:
        _children.remove(proc)
    return proc.returncode


def kill_all() -> None:
    """Kill every child still alive (the runner's finally)."""
    for proc in list(_children):
        _kill(proc)
        _close_streams(proc)
    _children.clear()


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL (if still alive) and reap."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _close_streams(proc: subprocess.Popen[bytes]) -> None:
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# -- HTTP ------------------------------------------------------------------------------------------


def http_request(method: str, path: str, port: int, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    """Raw HTTP/1.1 request bytes (keep-alive), built once and reused."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def infer_request(port: int, model: str, body: bytes, header_length: int | None) -> bytes:
    """A V2 infer request: JSON, or the binary tensor extension when ``header_length`` is set."""
    if header_length is None:
        headers = {"Content-Type": "application/json"}
    else:
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(header_length)}
    return http_request("POST", f"/v2/models/{model}/infer", port, body, headers)


class ResponseError(Exception):
    """The peer closed or sent something that is not an HTTP/1.1 response with Content-Length."""


class Connection:
    """A blocking keep-alive HTTP/1.1 client over a raw socket (TCP_NODELAY)."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ResponseError("connection closed by the server")
        self.buf += chunk

    def roundtrip(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send one request, read one response: (status, lower-cased headers, body)."""
        self.sock.sendall(request)
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._fill()
        head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        try:
            status = int(head[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            raise ResponseError(f"bad status line {head[0]!r}") from None
        headers = {}
        for line in head[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        if "content-length" not in headers:
            raise ResponseError("response without Content-Length")
        total = end + 4 + int(headers["content-length"])
        while len(self.buf) < total:
            self._fill()
        body = bytes(self.buf[end + 4 : total])
        del self.buf[:total]
        return status, headers, body


def wait_first_infer(
    proc: subprocess.Popen[bytes], port: int, request: bytes, *, interval: float = 0.02, timeout: float = 120.0
) -> tuple[float, int]:
    """Poll with a fresh connection every ``interval`` s until an infer answers 200.

    Returns (perf_counter when the 200 response was read, attempts); raises RuntimeError when the
    process exits or ``timeout`` passes.
    """
    deadline = time.perf_counter() + timeout
    attempts = 0
    while True:
        attempts += 1
        began = time.perf_counter()
        try:
            with Connection(port, timeout=max(1.0, deadline - began)) as conn:
                status, _, _ = conn.roundtrip(request)
            if status == 200:
                return time.perf_counter(), attempts
        except (OSError, ResponseError):
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with status {proc.returncode} before answering")
        now = time.perf_counter()
        if now > deadline:
            raise RuntimeError(f"no successful infer after {timeout:.0f} s ({attempts} attempts)")
        time.sleep(max(0.0, interval - (now - began)))


def wait_port(proc: subprocess.Popen[bytes], port: int, path: str, timeout: float = 120.0) -> None:
    """Wait until GET ``path`` answers (any status) or fail when the process exits."""
    deadline = time.perf_counter() + timeout
    request = http_request("GET", path, port)
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}")
        try:
            with Connection(port, timeout=5) as conn:
                conn.roundtrip(request)
            return
        except (OSError, ResponseError):
            time.sleep(0.05)
    raise RuntimeError(f"server on port {port} not up after {timeout:.0f} s")


# -- statistics ------------------------------------------------------------------------------------


def save_atomically(model: Any, path: Path) -> None:
    """Save an onnx ModelProto to ``path`` through a temporary file beside it, so a cache never holds half a model."""
    import onnx

    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def percentiles(values_ns: Sequence[int] | np.ndarray, qs: Sequence[float] = (50, 99)) -> dict[str, float]:
    """Percentiles in microseconds, keyed ``p50_us`` etc.; NaN when empty."""
    arr = np.asarray(values_ns, dtype=np.float64)
    if arr.size == 0:
        return {f"p{q:g}_us": float("nan") for q in qs}
    return {f"p{q:g}_us": float(np.percentile(arr, q) / 1e3) for q in qs}


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either side is missing or b is zero."""
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def fmt(value: Any, digits: int = 1) -> str:
    """A table cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (NaN becomes null)."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(clean(data), indent=2))
    tmp.replace(path)


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
