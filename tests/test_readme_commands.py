"""README.md's commands work as written from a fresh clone: every command of its code blocks is run here, in order
from the repository root, unless NOT_RUN names it with the reason (a cloud account, the set-up itself, minutes)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port

README = ROOT / "README.md"

#: Commands (by how they start) and Python blocks (by a line of theirs) that this test does not run, and why.
NOT_RUN = {
    "./scripts/demo.sh": "sets up .venv and runs the demo: the set-up itself",
    "./scripts/test.sh": "sets up .venv and runs this suite",
    "pip install": "installs into the current environment",
    "sam ": "needs the SAM CLI, and an AWS account to deploy",
    "python -m layers.build": "downloads wheels for two architectures from PyPI",
    "URL=$(aws ": "needs a deployed stack",
    'curl -s --aws-sigv4 "aws:amz': "calls the deployed function",
    'host = URL.removeprefix("https://")': "calls the deployed function",
    "gcloud ": "needs a Google Cloud project",
    ".venv/bin/python -m benchmarks.run": "measures for minutes",
}
README_PORT = 8000
#: What a command writes outside the repository, or inside it, moved to this test's own directory.
WRITES = ("/tmp/oclaw-service.yaml", "build/layers")


@dataclass(frozen=True)
class Command:
    """One command of a README code block (continuation lines joined), or a whole Python block."""

    text: str
    block: int
    python: bool = False

    @property
    def program(self) -> str:
        """The command without its leading ``NAME=value`` assignments (empty when it only assigns)."""
        if self.python:
            return self.text
        words = shlex.split(self.text, comments=True)
        while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
            words.pop(0)
        return shlex.join(words)

    @property
    def not_run(self) -> str | None:
        """The NOT_RUN entry that names this command, or None when it is run."""
        lines = self.text.splitlines() if self.python else [self.text, self.program]
        return next((start for start in NOT_RUN for line in lines if line.startswith(start)), None)


def readme_commands() -> list[Command]:
    """Every command of README.md's ``sh`` blocks and every ``python`` block, in order."""
    commands = []
    blocks = re.finditer(r"^```(sh|python)\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)
    for i, block in enumerate(blocks):
        if block[1] == "python":
            commands.append(Command(block[2], i, python=True))
            continue
        for line in block[2].replace("\\\n", " ").splitlines():
            if shlex.split(line, comments=True):
                commands.append(Command(line.strip(), i))
    return commands


def localise(text: str, port: int, tmp: Path) -> str:
    """The command with the README's port and the places it writes moved to this test's (the machine is shared)."""
    text = re.sub(rf"(:|--port ){README_PORT}\b", rf"\g<1>{port}", text)
    for path in WRITES:
        text = text.replace(path, str(tmp / Path(path).name))
    return text


def untracked_paths(command: Command) -> list[str]:
    """Files or directories the command names that exist here but that git does not track (a clone lacks them)."""
    found = []
    for word in shlex.split(command.text, comments=True) if not command.python else []:
        path = ROOT / word.removeprefix("@")
        if word.startswith(("-", "/")) or "=" in word or not path.exists() or path.resolve() == ROOT:
            continue
        tracked = subprocess.run(
            ["git", "ls-files", "--", str(path)], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        if not tracked:
            found.append(word)
    return found


@dataclass
class Server:
    """A command that keeps running (``oclaw serve``), stopped with SIGTERM at the end."""

    proc: subprocess.Popen[bytes]
    log: Path
    port: int

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"exited with {self.proc.returncode}:\n{self.log.read_text()}"
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/v2/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"not ready after {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@pytest.fixture()
def shell_env() -> dict[str, str]:
    """This environment without oclaw settings, with the virtual environment's ``oclaw`` and ``python`` first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCLAW_") and k != "PORT"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture()
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


def test_every_command_not_run_is_in_the_readme() -> None:
    matched = {c.not_run for c in readme_commands()}
    assert set(NOT_RUN) <= matched, f"NOT_RUN entries that match no README command: {set(NOT_RUN) - matched}"
    run = [c.program for c in readme_commands() if c.not_run is None]
    assert any(p.startswith("oclaw serve") for p in run) and any(p.startswith("oclaw lambda invoke") for p in run)


@pytest.mark.slow
def test_readme_commands_work_as_written(shell_env: dict[str, str], servers: list[Server], tmp_path: Path) -> None:
    port = free_port()
    assignments: dict[int, list[str]] = {}  # NAME=value lines of each block, for its later commands
    ran = []
    for command in readme_commands():
        if command.not_run is not None:
            continue
        assert not untracked_paths(command), f"{command.text!r} names files a fresh clone does not have"
        text = localise(command.text, port, tmp_path)
        if not command.program:
            assignments.setdefault(command.block, []).append(text)
            continue
        if command.program.startswith("oclaw serve"):
            log = tmp_path / "serve.log"
            with log.open("wb") as fh:
                proc = subprocess.Popen(["bash", "-c", f"exec {text}"], cwd=ROOT, env=shell_env, stdout=fh, stderr=fh)
            servers.append(Server(proc, log, port))
            servers[-1].wait_ready()
            ran.append(command.program)
            continue
        script = "\n".join([*assignments.get(command.block, []), text])
        argv = [sys.executable, "-c", text] if command.python else ["bash", "-c", script]
        out = subprocess.run(argv, check=False, cwd=ROOT, env=shell_env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"{command.text}\n{out.stdout}\n{out.stderr}"
        if command.program.startswith("curl"):  # curl -s exits 0 on an HTTP error: the body tells
            assert "error" not in json.loads(out.stdout), f"{command.text}\n{out.stdout}"
        ran.append(command.program)
    assert [s.stop() for s in servers] == [0] * len(servers)
    assert {"oclaw serve", "curl -s", "import numpy", "oclaw lambda", "python infra/cloudrun/validate.py"} <= {
        " ".join(p.split()[:2]) for p in ran
    }
