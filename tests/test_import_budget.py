"""The engine stays free of web and AWS libraries (cold-start budget)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def _lambda_init(repo: Path, init_type: str, **env: str) -> tuple[list[str], dict[str, Any]]:
    """Import the Lambda handler as INIT does: the lazily loaded modules that did load, and the cold-start record."""
    code = (
        "import json, sys\n"
        "import handler.aws_lambda as h\n"
        "assert h.RUNTIME.pool.ready()\n"
        f"print(json.dumps([m for m in {LAZY_ON_HTTP!r} if m in sys.modules]))\n"
    )
    environ = {
        **os.environ,
        "OCLAW_MODEL_REPOSITORY": str(repo),
        "AWS_LAMBDA_INITIALIZATION_TYPE": init_type,
        **env,
    }
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=environ)
    record = json.loads(next(line for line in out.stdout.splitlines() if '"cold_start"' in line))
    return json.loads(out.stdout.splitlines()[-1]), record


#: Modules an on-demand INIT of an HTTP function does not load: the S3, SQS and warm-ping handlers load on the
#: first such event, Pillow on the first image (the warm-up, which would decode one, is skipped there).
LAZY_ON_HTTP = ("handler.s3_events", "handler.s3_parts", "handler.sqs_events", "handler.warmer", "PIL")


def test_an_on_demand_init_skips_the_warm_up_and_the_modules_no_http_request_needs(repo: Path) -> None:
    image_only = repo.parent / "image-only"
    if not image_only.exists():
        shutil.copytree(repo / "tiny_classifier", image_only / "tiny_classifier")
    loaded, record = _lambda_init(image_only, "on-demand")
    assert loaded == []
    assert record["models"]["tiny_classifier/1"]["warmed_up"] is False
    assert record["phases_ms"]["warmup"] == 0
    # provisioned concurrency (and SnapStart) INIT is off the request path: the model is warmed there, image included
    loaded, record = _lambda_init(image_only, "provisioned-concurrency")
    assert loaded == ["PIL"]
    assert record["models"]["tiny_classifier/1"]["warmed_up"] is True
    # OCLAW_WARMUP decides over the init type
    _, record = _lambda_init(image_only, "on-demand", OCLAW_WARMUP="true")
    assert record["models"]["tiny_classifier/1"]["warmed_up"] is True
    _, record = _lambda_init(image_only, "provisioned-concurrency", OCLAW_WARMUP="off")
    assert record["models"]["tiny_classifier/1"]["warmed_up"] is False


def test_the_audit_log_loads_at_init_only_when_it_is_on(repo: Path) -> None:
    """Off (no keys, no OCLAW_AUDIT_SINKS), INIT imports nothing of it; on, INIT makes its sinks and still loads no
    web framework or AWS SDK."""
    tensor_only = repo.parent / "tensor-only"
    if not tensor_only.exists():
        shutil.copytree(repo / "mlp", tensor_only / "mlp")
    code = (
        "import json, sys\n"
        "import handler.aws_lambda as h\n"
        f"print(json.dumps([m for m in {(*LAMBDA_FORBIDDEN, 'engine.audit')!r} if m in sys.modules]))\n"
        "print(json.dumps(h.AUDIT is None))\n"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("OCLAW_")}
    base["OCLAW_MODEL_REPOSITORY"] = str(tensor_only)
    for env, loaded, off in (({}, [], True), ({"OCLAW_AUDIT_SINKS": "log"}, ["engine.audit"], False)):
        run = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=base | env)
        lines = run.stdout.splitlines()
        assert (json.loads(lines[-2]), json.loads(lines[-1])) == (loaded, off)
