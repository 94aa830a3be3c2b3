"""`sam build` of template.yaml (no Docker): a lean function, a layer per architecture, and it serves."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from samtranslator.yaml_helper import yaml_parse

from handler.local_lambda import LocalLambda
from layers import build
from tests.conftest import ROOT
from tests.lambda_env import HOST_ARCH, PIP_ENV, python312, sam_cli, start_lambda
from tests.test_lambda import EXPECTED_SUM, event, outputs

pytestmark = pytest.mark.slow
LAYERS = {"x86_64": "RuntimeLayerX8664", "arm64": "RuntimeLayerArm64"}


@pytest.fixture(scope="module")
def built(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``sam build`` into a temporary build directory, the test repository as the models layer."""
    out = tmp_path_factory.mktemp("sam") / "build"
    interpreter = Path(python312())
    env = {
        **os.environ,
        **PIP_ENV,
        # sam validates a python3.12 for the function; the layers' make targets run the same interpreter
        "PATH": f"{interpreter.parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": str(interpreter),
        "MODELS": str(repo),
        "SAM_CLI_TELEMETRY": "0",
    }
    start = time.perf_counter()
    cmd = [str(sam_cli()), "build", "--template", str(ROOT / "template.yaml"), "--build-dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(f"\nsam build: {time.perf_counter() - start:.1f} s")
    return out


@pytest.fixture(scope="module")
def fn(built: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalLambda]:
    log = tmp_path_factory.mktemp("lambda") / "lambda.log"
    layers = [built / LAYERS[HOST_ARCH], built / "ModelsLayer"]
    lam = start_lambda(built / "InferenceFunction", layers, {"OCLAW_MODEL_REPOSITORY": str(layers[1] / "models")}, log)
    yield lam
    lam.stop()


def test_function_package_holds_engine_and_handler_only(built: Path) -> None:
    package = built / "InferenceFunction"
    assert {p.name for p in package.iterdir()} == {"engine", "handler"}
    assert (package / "handler" / "aws_lambda.py").is_file() and not (package / "engine").is_symlink()
    assert build.tree_bytes(package) < 2 * build.MIB


def test_each_architecture_gets_its_own_layer(built: Path) -> None:
    for arch, name in LAYERS.items():
        site = built / name / "python"
        assert set(build.native_machines(site)) == {build.MACHINES[arch]}, name
        assert build.tree_bytes(site) + build.tree_bytes(built / "ModelsLayer") < build.UNZIPPED_LIMIT
    template = yaml_parse((built / "template.yaml").read_text())
    resources = template["Resources"]
    assert resources["InferenceFunction"]["Properties"]["CodeUri"] == "InferenceFunction"
    assert {resources[name]["Properties"]["CompatibleArchitectures"][0] for name in LAYERS.values()} == set(LAYERS)


def test_built_function_serves_under_awslambdaric(fn: LocalLambda) -> None:
    result = fn.invoke(event("apigw_v2_infer.json"))
    assert result.error is None, result.error
    resp = result.json()
    assert resp["statusCode"] == 200 and outputs(resp["body"])["OUTPUT0"] == EXPECTED_SUM
    warm = fn.invoke(event("function_url_infer.json"))
    assert warm.json()["statusCode"] == 200
    print(f"\nsam-built INIT {fn.init_ms:.0f} ms, warm invoke {warm.duration_ms:.1f} ms")


def test_sam_validate_lint_is_clean() -> None:
    """SAM CLI's own validation (the transform plus cfn-lint as SAM ships it), offline with a region set."""
    env = {**os.environ, "SAM_CLI_TELEMETRY": "0", "AWS_DEFAULT_REGION": "us-east-1"}
    cmd = [str(sam_cli()), "validate", "--lint", "--template", str(ROOT / "template.yaml")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "is a valid SAM Template" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
