"""A Lambda python3.12 execution environment on this machine, for built packages and layers.

As on Lambda: CPython 3.12 without site-packages (``-S``), ``sys.path`` = task root, then each layer's ``python/``,
then the runtime's own packages (awslambdaric, boto3: Lambda's ``/var/runtime``, here installed from the Lambda
platform's wheels into ``.cache``). Installs are cached in ``.cache`` (gitignored) so reruns are fast.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from handler.local_lambda import LocalLambda
from layers.build import find_python, pip_platform_args
from tests.conftest import ROOT

CACHE = ROOT / ".cache"
PIP_ENV = {"PIP_CACHE_DIR": str(CACHE / "pip")}
#: This machine's architecture, as Lambda names it.
HOST_ARCH = {"x86_64": "x86_64", "aarch64": "arm64"}[platform.machine()]
OTHER_ARCH = "arm64" if HOST_ARCH == "x86_64" else "x86_64"
RUNTIME_PACKAGES = ("awslambdaric>=3", "boto3")
SAM_CLI = "aws-sam-cli>=1.100"


def python312() -> str:
    """A CPython 3.12 interpreter (Lambda's python3.12); fails the test with a hint when there is none."""
    found = find_python("3.12")
    if found is None:
        pytest.fail("these tests need CPython 3.12 on PATH or under pyenv (e.g. `pyenv install 3.12`)")
    return found


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--quiet", *args]
    subprocess.run(cmd, check=True, env={**os.environ, **PIP_ENV})


def lambda_runtime(arch: str = HOST_ARCH) -> Path:
    """What Lambda's python3.12 runtime provides (/var/runtime): awslambdaric and boto3, Lambda's wheels."""
    target = CACHE / f"lambda-runtime-py312-{arch}"
    stamp = target / ".installed"
    if not stamp.is_file() or stamp.read_text() != repr(RUNTIME_PACKAGES):
        _pip("--no-compile", "--upgrade", "--target", str(target), *pip_platform_args("3.12", arch), *RUNTIME_PACKAGES)
        stamp.write_text(repr(RUNTIME_PACKAGES))
    return target


def sam_cli() -> Path:
    """The ``sam`` command, in its own virtual environment (it pins boto3 and cfn-lint)."""
    venv = CACHE / "venv-sam"
    sam = venv / "bin" / "sam"
    probe = subprocess.run([str(sam), "--version"], capture_output=True, check=False) if sam.exists() else None
    if probe is None or probe.returncode != 0:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", SAM_CLI],
            check=True,
            env={**os.environ, **PIP_ENV},
        )
    return sam


def start_lambda(
    task_root: Path, layers: list[Path], env: dict[str, str], log: Path, *, arch: str = HOST_ARCH
) -> LocalLambda:
    """Run the oclaw handler under awslambdaric with only ``task_root`` and ``layers`` importable; INIT done."""
    wrapper = log.with_name("python3.12-S")
    wrapper.write_text(f'#!/bin/sh\nexec "{python312()}" -S "$@"\n')
    wrapper.chmod(0o755)
    path = [task_root, *(layer / "python" for layer in layers), lambda_runtime(arch)]
    full_env = {
        "PYTHONPATH": os.pathsep.join(map(str, path)),
        "LAMBDA_TASK_ROOT": str(task_root),
        "PYTHONNOUSERSITE": "1",
        **env,
    }
    lam = LocalLambda(env=full_env, cwd=task_root, log=log, python=str(wrapper)).start()
    try:
        lam.wait_init(timeout_s=120)
    except RuntimeError:
        lam.stop()
        raise AssertionError(log.read_text()) from None
    return lam


def mapped_files(pid: int) -> set[str]:
    """The files a process has mapped (its loaded shared objects)."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {line.split(maxsplit=5)[5] for line in lines if len(line.split(maxsplit=5)) == 6}
