"""Shared fixtures: generated model repositories and real uvicorn servers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from engine.config import Settings
from engine.runtime import Runtime
from handler.asgi import ServerApp
from handler.http import create_app
from tests.modelgen import build_repository

pytest.register_assert_rewrite("tests.badinput")  # its shared asserts keep pytest's detailed failure output

ROOT = Path(__file__).resolve().parent.parent
#: Fake credentials and region for boto3 against moto's server (no AWS account is ever used).
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}
EXAMPLES = ROOT / "examples" / "models"


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto's server on 127.0.0.1 (real HTTP for boto3); yields its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    """One moto server per test module."""
    with moto_server() as url:
        yield url


def use_moto(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials and every boto3 client of this process pointed at moto (the cached ones dropped)."""
    from engine import aws

    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    aws.reset()


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerThread:
    """A real uvicorn server running the oclaw app in a thread of this process."""

    runtime: Runtime
    server: uvicorn.Server
    thread: threading.Thread
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.runtime.close()


def start_server(repo: Path, *, fastapi_only: bool = False, **overrides: Any) -> ServerThread:
    """Start uvicorn on a free loopback port with a fresh Runtime; returns once it accepts requests.

    The app is what `oclaw serve` runs (data plane + FastAPI on first use), or the FastAPI app alone.
    """
    settings = Settings.from_env({}, model_repository=str(repo), **overrides)
    runtime = Runtime(settings)
    runtime.start_preload()
    port = free_port()
    app: Any = create_app(runtime) if fastapi_only else ServerApp(runtime, lambda: create_app(runtime, preload=False))
    if settings.otel:
        from handler import otel

        app = otel.wrap(app)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.01)
    return ServerThread(runtime, server, thread, port)


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated test repository (see tests/modelgen.py)."""
    return build_repository(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="session")
def server(repo: Path) -> Iterator[ServerThread]:
    """One server over the generated repository, shared by the session."""
    srv = start_server(repo, max_body_bytes=8 * 1024 * 1024, max_tensor_elements=1_000_000)
    yield srv
    srv.stop()


@pytest.fixture()
def client(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@dataclass
class ServerProcess:
    """``oclaw serve`` in a child process."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/v2/health/live", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server not up after {timeout} s:\n{self.output()}")

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


def spawn_server(
    repo: Path | None,
    tmp_path: Path,
    *,
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
    port: int | None = None,
) -> ServerProcess:
    """Start ``oclaw serve`` (the console script's module) as a child process."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "handler.cli", "serve"]
    if repo is not None:
        cmd += ["--model-repository", str(repo)]
    cmd += args if args is not None else ["--port", str(port)]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("OCLAW_") and k != "PORT"}
    full_env.update(env or {})
    log = tmp_path / f"server-{port}.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
    return ServerProcess(proc, port, log)
