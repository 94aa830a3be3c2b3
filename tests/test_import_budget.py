"""The engine stays free of web and AWS libraries (cold-start budget)."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("fastapi", "starlette", "mangum", "uvicorn", "boto3", "botocore", "pydantic")


def test_import_engine_loads_no_web_or_aws_library() -> None:
    code = (
        "import json, sys\n"
        "import engine, engine.runtime, engine.pool, engine.dataplane, engine.tensors, engine.processing\n"
        f"print(json.dumps([m for m in {FORBIDDEN!r} if m in sys.modules]))\n"
        "print(json.dumps('PIL' in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    loaded, pil = (json.loads(line) for line in out.splitlines())
    assert loaded == []
    assert pil is False, "Pillow must load only when an image model is used"
