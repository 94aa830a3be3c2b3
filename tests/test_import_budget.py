"""The engine stays free of web and AWS libraries (cold-start budget)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

FORBIDDEN = ("fastapi", "starlette", "mangum", "uvicorn", "boto3", "botocore", "pydantic")
LAMBDA_FORBIDDEN = (*FORBIDDEN, "aws_lambda_powertools", "snapshot_restore_py", "PIL")


def test_import_engine_loads_no_web_or_aws_library() -> None:
    code = (
        "import json, sys\n"
        "import importlib, pkgutil, engine\n"
        "for info in pkgutil.walk_packages(engine.__path__, 'engine.'): importlib.import_module(info.name)\n"
        "assert 'engine.metering.sinks' in sys.modules and 'engine.repository.s3' in sys.modules\n"
        f"print(json.dumps([m for m in {FORBIDDEN!r} if m in sys.modules]))\n"
        "print(json.dumps('PIL' in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    loaded, pil = (json.loads(line) for line in out.splitlines())
    assert loaded == []
    assert pil is False, "Pillow must load only when an image model is used"


def test_lambda_cold_path_imports_only_what_inference_needs(repo: Path) -> None:
    """INIT of the Lambda handler loads no web framework, no AWS SDK, no Pillow for tensor-only models."""
    tensor_only = repo.parent / "tensor-only"
    if not tensor_only.exists():
        shutil.copytree(repo / "mlp", tensor_only / "mlp")
    code = (
        "import json, sys\n"
        "import handler.aws_lambda as h\n"
        "assert h.RUNTIME.pool.ready()\n"
        f"print(json.dumps([m for m in {LAMBDA_FORBIDDEN!r} if m in sys.modules]))\n"
    )
    env = {**os.environ, "OCLAW_MODEL_REPOSITORY": str(tensor_only)}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    assert json.loads(out.stdout.splitlines()[-1]) == []
    record = json.loads(next(line for line in out.stdout.splitlines() if '"cold_start"' in line))
    assert set(record["phases_ms"]) == {"runtime", "imports", "repository", "sessions", "warmup", "preload"}
