"""A local AWS Lambda Runtime API, and a runner that drives the real ``awslambdaric`` against it.

Used by ``oclaw lambda invoke`` and by the tests: a fresh process runs ``python -m awslambdaric HANDLER``,
INIT happens once, then each event is handed out through ``/invocation/next`` exactly as Lambda does. Standard
library only.
"""

from __future__ import annotations

import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

API = "/2018-06-01/runtime"
REGION = "us-east-1"
ACCOUNT = "123456789012"


class _RuntimeServer(ThreadingHTTPServer):
    """The Runtime API's HTTP server; a function process stopped while it waits for ``/next`` is not an error."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


@dataclass
class Invocation:
    """One event on its way through the runtime."""

    request_id: str
    payload: bytes
    deadline_ms: int
    done: threading.Event = field(default_factory=threading.Event)
    handed_out: float = 0.0
    finished: float = 0.0
    response: bytes | None = None
    error: dict[str, Any] | None = None


@dataclass
class InvokeResult:
    """What one invocation returned, with Lambda's REPORT figures."""

    request_id: str
    payload: bytes | None
    error: dict[str, Any] | None
    duration_ms: float
    init_ms: float | None
    memory_mb: int
    max_memory_mb: int
    timed_out: bool = False

    def json(self) -> Any:
        """The response payload parsed as JSON."""
        return json.loads(self.payload or b"null")

    @property
    def billed_ms(self) -> int:
        """Lambda bills duration rounded up to the millisecond."""
        return math.ceil(self.duration_ms)

    def report_line(self) -> str:
        """The REPORT line Lambda writes after each invocation."""
        line = (
            f"REPORT RequestId: {self.request_id}\tDuration: {self.duration_ms:.2f} ms\t"
            f"Billed Duration: {self.billed_ms} ms\tMemory Size: {self.memory_mb} MB\t"
            f"Max Memory Used: {self.max_memory_mb} MB"
        )
        if self.init_ms is not None:
            line += f"\tInit Duration: {self.init_ms:.2f} ms"
        if self.timed_out:
            line += "\tStatus: timeout"
        return line


class RuntimeAPI:
    """The Runtime API endpoints (invocation, init error, SnapStart restore) on 127.0.0.1."""

    def __init__(
        self, function_arn: str, timeout_s: float, *, hold_restore: bool = False, sampled: bool = False
    ) -> None:
        self.function_arn = function_arn
        #: Whether invocations carry a sampled X-Ray trace header (so a tracer sends its segments).
        self.sampled = sampled
        #: Set to let a SnapStart runtime past /restore/next (tests may change files "inside the snapshot" first).
        self.restore_gate = threading.Event()
        if not hold_restore:
            self.restore_gate.set()
        self.timeout_s = timeout_s
        self.pending: queue.Queue[Invocation] = queue.Queue()
        self.by_id: dict[str, Invocation] = {}
        self.first_poll = threading.Event()
        self.restore_polled = threading.Event()
        self.first_poll_at = 0.0
        self.init_error: dict[str, Any] | None = None
        self.init_error_type: str | None = None
        self.restore_error: dict[str, Any] | None = None
        self.failed = threading.Event()
        self.server = _RuntimeServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        """host:port for AWS_LAMBDA_RUNTIME_API."""
        host, port = self.server.server_address[:2]
        return f"{host!s}:{port}"

    def start(self) -> None:
        """Serve in a background thread."""
        self.thread.start()

    def stop(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()

    def enqueue(self, payload: bytes) -> Invocation:
        """Queue one event for the runtime."""
        inv = Invocation(str(uuid.uuid4()), payload, int((time.time() + self.timeout_s) * 1000))
        self.by_id[inv.request_id] = inv
        self.pending.put(inv)
        return inv

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # without it every invoke waits ~40-90 ms (Nagle + delayed ACK)

            def log_message(self, format: str, *args: Any) -> None:
                return

            def _send(self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None) -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_GET(self) -> None:
                if self.path == f"{API}/invocation/next":
                    api._mark_first_poll()
                    inv = api.pending.get()
                    inv.handed_out = time.perf_counter()
                    self._send(
                        200,
                        inv.payload,
                        {
                            "Content-Type": "application/json",
                            "Lambda-Runtime-Aws-Request-Id": inv.request_id,
                            "Lambda-Runtime-Deadline-Ms": str(inv.deadline_ms),
                            "Lambda-Runtime-Invoked-Function-Arn": api.function_arn,
                            "Lambda-Runtime-Trace-Id": _trace_id(api.sampled),
                        },
                    )
                elif self.path == f"{API}/restore/next":
                    api.restore_polled.set()
                    api.restore_gate.wait()
                    api._mark_first_poll()
                    self._send(200)
                else:
                    self._send(404, b'{"errorMessage": "unknown path"}')

            def do_POST(self) -> None:
                body = self._body()
                parts = self.path.split("/")
                if self.path.startswith(f"{API}/invocation/") and parts[-1] in ("response", "error"):
                    inv = api.by_id.get(parts[-2])
                    if inv is None:
                        self._send(400, b'{"errorMessage": "unknown request id"}')
                        return
                    inv.finished = time.perf_counter()
                    if parts[-1] == "response":
                        inv.response = body
                    else:
                        inv.error = json.loads(body or b"{}")
                    self._send(202, b'{"status": "OK"}')
                    inv.done.set()
                elif self.path == f"{API}/init/error":
                    api.init_error = json.loads(body or b"{}")
                    api.init_error_type = self.headers.get("Lambda-Runtime-Function-Error-Type")
                    self._send(202, b'{"status": "OK"}')
                    api.failed.set()
                elif self.path == f"{API}/restore/error":
                    api.restore_error = json.loads(body or b"{}")
                    self._send(202, b'{"status": "OK"}')
                    api.failed.set()
                else:
                    self._send(404, b'{"errorMessage": "unknown path"}')

        return Handler

    def _mark_first_poll(self) -> None:
        if not self.first_poll.is_set():
            self.first_poll_at = time.perf_counter()
            self.first_poll.set()


def _trace_id(sampled: bool = False) -> str:
    root = f"Root=1-{int(time.time()):08x}-{uuid.uuid4().hex[:24]}"
    return f"{root};Parent={uuid.uuid4().hex[:16]};Sampled=1" if sampled else f"{root};Sampled=0"


def _max_rss_mb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return math.ceil(int(line.split()[1]) / 1024)
    except OSError:
        pass
    return 0


class LocalLambda:
    """One Lambda execution environment: ``python -m awslambdaric HANDLER`` against a RuntimeAPI."""

    def __init__(
        self,
        handler: str = "handler.aws_lambda.lambda_handler",
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        memory_mb: int = 1024,
        timeout_s: float = 30.0,
        function_name: str = "oclaw-local",
        qualifier: str = "$LATEST",
        snap_start: bool = False,
        hold_restore: bool = False,
        trace_sampled: bool = False,
        log: IO[bytes] | str | Path | None = None,
        python: str = sys.executable,
    ) -> None:
        self.handler = handler
        self.memory_mb = memory_mb
        self.timeout_s = timeout_s
        arn = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{function_name}"
        if qualifier != "$LATEST":
            arn += f":{qualifier}"
        self.api = RuntimeAPI(arn, timeout_s, hold_restore=hold_restore, sampled=trace_sampled)
        self.env = {
            **os.environ,
            "AWS_LAMBDA_FUNCTION_NAME": function_name,
            "AWS_LAMBDA_FUNCTION_VERSION": qualifier if qualifier.isdigit() else "$LATEST",
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(memory_mb),
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{function_name}",
            "AWS_LAMBDA_LOG_STREAM_NAME": f"local/{uuid.uuid4().hex}",
            "AWS_REGION": os.environ.get("AWS_REGION", REGION),
            "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", REGION),
            "_HANDLER": handler,
            "AWS_LAMBDA_INITIALIZATION_TYPE": "snap-start" if snap_start else "on-demand",
            # as on python3.12+ runtimes: /next is polled from a thread, so the main thread handles SIGTERM
            "AWS_EXECUTION_ENV": "AWS_Lambda_python3.12",
            **(env or {}),
        }
        self.env.pop("AWS_LAMBDA_MAX_CONCURRENCY", None)  # would switch awslambdaric to multi-concurrency mode
        self.cwd = str(cwd) if cwd else None
        self.log = log
        self._own_log: IO[bytes] | None = None
        self.python = python
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawned_at = 0.0
        self.init_ms: float | None = None
        self._init_reported = False

    def start(self) -> LocalLambda:
        """Start the Runtime API and spawn the runtime process (INIT begins)."""
        self.api.start()
        self.env["AWS_LAMBDA_RUNTIME_API"] = self.api.address
        out: IO[bytes] | int = subprocess.DEVNULL
        if isinstance(self.log, str | Path):
            out = self._own_log = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        elif self.log is not None:
            out = self.log
        self.spawned_at = time.perf_counter()
        self.proc = subprocess.Popen(
            [self.python, "-m", "awslambdaric", self.handler],
            env=self.env,
            cwd=self.cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        return self

    def wait_init(self, timeout_s: float = 60.0) -> float:
        """Wait until INIT is over (first poll of /next or /restore/next); returns INIT ms."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while not self.api.first_poll.wait(0.01):
            if self.api.failed.is_set() or self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"INIT failed: {self.api.init_error or self.api.restore_error or 'no poll'}")
        self.init_ms = (self.api.first_poll_at - self.spawned_at) * 1000
        return self.init_ms

    def invoke(self, event: Any, timeout_s: float | None = None) -> InvokeResult:
        """Send one event and wait for its response or error (the process is killed on timeout)."""
        assert self.proc is not None
        payload = event if isinstance(event, bytes) else json.dumps(event).encode()
        inv = self.api.enqueue(payload)
        limit = timeout_s or self.timeout_s
        timed_out = False
        deadline = time.monotonic() + limit
        while not inv.done.wait(0.005):
            if self.proc.poll() is not None and not inv.done.is_set():
                break
            if time.monotonic() > deadline:
                timed_out = True
                self.proc.kill()
                self.proc.wait()
                break
        end = inv.finished or time.perf_counter()
        start = inv.handed_out or end
        init = None
        if not self._init_reported:
            self._init_reported = True
            init = self.init_ms
        return InvokeResult(
            inv.request_id,
            inv.response,
            inv.error if not timed_out else {"errorType": "Sandbox.Timedout", "errorMessage": "Task timed out"},
            (end - start) * 1000,
            init,
            self.memory_mb,
            _max_rss_mb(self.proc.pid),
            timed_out,
        )

    def stop(self) -> int | None:
        """Stop the runtime process and the Runtime API; returns the process exit code."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()  # Lambda's shutdown: SIGTERM, then SIGKILL
                try:
                    self.proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
            code = self.proc.wait(timeout=10)
        self.api.stop()
        if self._own_log is not None:
            self._own_log.close()
        return code

    def __enter__(self) -> LocalLambda:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
