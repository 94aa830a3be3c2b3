"""Helpers shared by the sections of benchmarks.run: progress log, model repositories, V2 bodies, servers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from benchmarks import common
from benchmarks.common import PYTHON

T = TypeVar("T")


def log(msg: str) -> None:
    """Progress goes to stderr; stdout holds only the tables."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rotated(items: Sequence[T], i: int) -> list[T]:
    """``items`` starting at position ``i`` (mod len), wrapping around: rounds rotate the order to spread drift."""
    k = i % len(items)
    return [*items[k:], *items[:k]]


# -- repositories and requests -----------------------------------------------------------------------


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst``, else copy it."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def save_model(model: Any, repo: Path, name: str) -> Path:
    """Save an onnx ModelProto as ``repo/name/1/model.onnx`` (the layout of tests.modelgen)."""
    import onnx

    model.opset_import[0].version = 17
    model.ir_version = 8
    path = repo / name / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def link_model(src: Path, repo: Path, name: str) -> Path:
    """Put an existing model file into ``repo/name/1/model.onnx`` (hard link, else copy)."""
    path = repo / name / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    link_or_copy(src, path)
    return path


def v2_body(
    inputs: dict[str, np.ndarray], *, binary: bool, binary_output: bool | None = None
) -> tuple[bytes, int | None]:
    """A V2 infer body; with ``binary`` the inputs use the binary extension (outputs: JSON unless asked)."""
    from engine.tensors import encode_request

    body, length = encode_request(inputs, binary=binary)
    if binary and not binary_output and length is not None:
        head = json.loads(body[:length])
        head.pop("parameters", None)  # encode_request asks for binary outputs; we want JSON outputs
        new_head = json.dumps(head, separators=(",", ":")).encode()
        return new_head + body[length:], len(new_head)
    return body, length


# -- servers -----------------------------------------------------------------------------------------


def server_command(kind: str, repo: Path, model_file: Path, port: int) -> tuple[list[str], dict[str, str] | None]:
    """Arguments and extra environment of a server: ``oclaw``/``oclaw-nometer`` (``oclaw serve``) or ``naive``."""
    if kind == "oclaw-switch":  # metering switched on and off from stdin (benchmarks.metering_switch)
        return [PYTHON, "-m", "benchmarks.metering_switch", "--model-repository", str(repo), "--port", str(port)], None
    if kind.startswith("oclaw"):
        args = [PYTHON, "-m", "handler.cli", "serve", "--model-repository", str(repo), "--port", str(port)]
        env = {"OCLAW_METERING_SINKS": "none", "OCLAW_METRICS": "false"} if kind == "oclaw-nometer" else None
    else:
        args = [PYTHON, "-m", "benchmarks.naive_app", "--port", str(port)]
        env = {"NAIVE_MODEL": str(model_file)}
    return args, env


def start_server(
    kind: str, repo: Path, model_file: Path, work: Path, tag: str, **spawn: Any
) -> tuple[subprocess.Popen[bytes], int, Path]:
    """Start a server (see server_command) and wait until it answers; returns (process, port, log file).

    ``spawn``: more arguments for ``common.spawn`` (``stdin``, ``pass_fds``, ``env`` added to the kind's own).
    """
    port = common.free_port()
    log_path = work / f"{kind}-{tag}-{port}.log"
    args, env = server_command(kind, repo, model_file, port)
    env = {**(env or {}), **spawn.pop("env", {})} or None
    fh = log_path.open("wb")
    try:
        proc = common.spawn(args, stdout=fh, stderr=subprocess.STDOUT, env=env, **spawn)
    finally:
        fh.close()
    try:
        common.wait_port(proc, port, "/v2/health/ready" if kind.startswith("oclaw") else "/docs")
    except RuntimeError as exc:
        common.stop(proc)
        raise RuntimeError(f"{kind} did not start: {exc}\n{common.tail(log_path)}") from None
    return proc, port, log_path


def stop_servers(servers: dict[str, tuple[subprocess.Popen[bytes], int, Path]]) -> None:
    """Stop every server started by start_server."""
    for proc, _, _ in servers.values():
        common.stop(proc)
