"""Shared fixtures and helpers of the optimize tests: the digits MLP, its data and repository, the CLI in-process."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from handler.cli import main
from tests import optimodels


@pytest.fixture(autouse=True)
def _no_oclaw_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The settings come from the command line, not from this machine's OCLAW_* variables."""
    for key in list(os.environ):
        if key.startswith("OCLAW_"):
            monkeypatch.delenv(key)
    yield


@pytest.fixture(scope="module")
def digits() -> optimodels.Digits:
    return optimodels.digits()


@pytest.fixture(scope="module")
def weights(digits: optimodels.Digits) -> optimodels.Weights:
    return optimodels.train(digits)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, digits: optimodels.Digits) -> dict[str, Path]:
    """Evaluation (.npz with labels, JSON Lines of V2 requests with labels) and calibration (.npy) files."""
    folder = tmp_path_factory.mktemp("data")
    x, y = digits.test
    np.savez(folder / "eval.npz", x=x, label=y)
    np.save(folder / "calib.npy", digits.train[0][:128])
    with (folder / "eval.jsonl").open("w") as fh:
        for row, label in zip(x[:60], y[:60], strict=True):
            request = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64], "data": row.tolist()}]}
            fh.write(json.dumps({**request, "label": int(label)}) + "\n")
    return {"npz": folder / "eval.npz", "npy": folder / "calib.npy", "jsonl": folder / "eval.jsonl"}


@pytest.fixture()
def repo(tmp_path: Path, digits: optimodels.Digits, weights: optimodels.Weights) -> Path:
    root = tmp_path / "models"
    optimodels.save(optimodels.mlp(weights, digits), root, "digits")
    optimodels.save(optimodels.mlp(weights, digits, sensitive=True), root, "sensitive")
    return root


def oclaw(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process; (exit code, stdout, stderr)."""
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def optimize(capsys: pytest.CaptureFixture[str], repo: Path, model: str, *args: str) -> tuple[int, str, str]:
    return oclaw(capsys, "optimize", model, "--model-repository", str(repo), *args)


def snapshot(root: Path) -> dict[str, tuple[int, float] | None]:
    """Every path under ``root``, a file's size and modification time (a folder's changes when one comes and goes)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime) if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def record(repo: Path, model: str, version: int) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((repo / model / str(version) / "optimization.json").read_text())
    return result


def _image(colour: tuple[int, int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.asarray(colour) + rng.integers(-30, 30, (8, 8, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()
