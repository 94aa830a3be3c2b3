"""layers/: the runtime layer built offline serves Lambda invocations alone; the models layer round-trips."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.config import Settings
from engine.repository.local import LocalRepository
from engine.runtime import Runtime
from handler.local_lambda import LocalLambda
from layers import build, models
from tests.lambda_env import HOST_ARCH, OTHER_ARCH, PIP_ENV, mapped_files, python312, start_lambda
from tests.test_lambda import EXPECTED_DIFF, EXPECTED_SUM, event, outputs

pytestmark = pytest.mark.slow
FUNCTION = Path(build.ROOT, "function")


@pytest.fixture(scope="module", autouse=True)
def pip_cache() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in PIP_ENV.items():
            mp.setenv(key, value)
        yield


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> build.Layer:
    """The host architecture's python3.12 runtime layer, zipped."""
    python312()  # fail early with a hint when the target interpreter is missing
    out = tmp_path_factory.mktemp("layers")
    name = build.layer_name("3.12", HOST_ARCH)
    return build.build("3.12", HOST_ARCH, out / name, zip_path=out / f"{name}.zip")


@pytest.fixture(scope="module")
def opt(layer: build.Layer, repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """/opt as Lambda extracts it: the runtime layer's zip and a models layer's zip."""
    opt = tmp_path_factory.mktemp("opt")
    models_zip = models.pack(repo, tmp_path_factory.mktemp("models") / "models.zip").zip_path
    for zip_path in (layer.zip_path, models_zip):
        assert zip_path is not None
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(opt)
    for so in (opt / "python").rglob("*.so*"):  # ZipFile.extractall drops permissions; the unzip Lambda runs keeps them
        so.chmod(0o755)
    return opt


@pytest.fixture(scope="module")
def fn(opt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalLambda]:
    log = tmp_path_factory.mktemp("lambda") / "lambda.log"
    env = {"OCLAW_MODEL_REPOSITORY": str(opt / "models"), "OCLAW_PRELOAD": "*"}
    lam = start_lambda(FUNCTION, [opt], env, log)
    yield lam
    lam.stop()


def test_layer_is_within_lambda_limits_and_holds_no_runtime_provided_packages(layer: build.Layer) -> None:
    assert layer.zip_path is not None and layer.zip_bytes is not None
    assert layer.unzipped_bytes < build.UNZIPPED_LIMIT
    assert layer.compiled and layer.verified
    top = {p.name for p in layer.tree.iterdir()}
    assert {"onnxruntime", "numpy", "orjson", "PIL", "fastapi", "mangum", "pydantic_core"} <= top
    assert not top & {"boto3", "botocore", "awslambdaric", "bin", "uvicorn"}
    with zipfile.ZipFile(layer.zip_path) as zf:
        names = zf.namelist()
    assert all(n.startswith("python/") for n in names)
    assert not [n for n in names if "/tests/" in n or n.endswith(".pyi")]
    assert any(n.endswith(".cpython-312.pyc") for n in names)
    assert set(build.native_machines(layer.tree)) == {build.MACHINES[HOST_ARCH]}
    pins = layer.zip_path.with_suffix(".txt").read_text().split()
    assert any(p.startswith("onnxruntime==") for p in pins) and not any(p.startswith("botocore==") for p in pins)


def test_function_with_the_layers_serves_under_awslambdaric(fn: LocalLambda, opt: Path) -> None:
    first = fn.invoke(event("apigw_v2_infer.json"))
    assert first.error is None, first.error
    resp = first.json()
    assert resp["statusCode"] == 200, resp
    assert outputs(resp["body"]) == {"OUTPUT0": EXPECTED_SUM, "OUTPUT1": EXPECTED_DIFF}
    warm = fn.invoke(event("apigw_v2_infer.json"))
    assert warm.error is None and warm.init_ms is None
    ping = fn.invoke({"oclaw": "warm"}).json()
    assert "add_sub/1" in ping["models_warmed"]
    assert fn.proc is not None
    native = {f for f in mapped_files(fn.proc.pid) if ".so" in f and ("onnxruntime" in f or "_multiarray" in f)}
    assert native and all(f.startswith(str(opt / "python")) for f in native), native
    print(f"\nlayer INIT {fn.init_ms:.0f} ms, first invoke {first.duration_ms:.1f} ms, warm {warm.duration_ms:.1f} ms")


def test_other_architecture_layer_holds_its_own_native_code(tmp_path: Path) -> None:
    layer = build.build("3.12", OTHER_ARCH, tmp_path / "layer", compile_=False)
    machines = build.native_machines(layer.tree)
    assert set(machines) == {build.MACHINES[OTHER_ARCH]} and machines[build.MACHINES[OTHER_ARCH]] > 10
    libs = list((layer.tree / "onnxruntime" / "capi").glob("libonnxruntime.so*"))
    assert libs and build.elf_machine(libs[0]) == build.MACHINES[OTHER_ARCH]
    assert layer.unzipped_bytes < build.UNZIPPED_LIMIT and not layer.verified


def test_models_layer_round_trip(repo: Path, tmp_path: Path) -> None:
    packed = models.pack(repo, tmp_path / "models.zip")
    assert packed.zip_path is not None
    with zipfile.ZipFile(packed.zip_path) as zf:
        names = zf.namelist()
        zf.extractall(tmp_path / "opt")
    assert all(n.startswith("models/") for n in names)
    assert "models/add_sub/1/model.onnx" in names and "models/tiny_classifier/oclaw.json" in names
    unpacked = LocalRepository(tmp_path / "opt" / "models")
    original = LocalRepository(repo)
    assert unpacked.models() == original.models()
    assert all(unpacked.versions(m) == original.versions(m) for m in original.models())
    runtime = Runtime(Settings.from_env({}, model_repository=str(tmp_path / "opt" / "models")))
    try:
        runtime.preload()
        assert runtime.pool.ready()
        assert {f"{m.name}/{m.version}" for m in runtime.pool.loaded()} >= {"add_sub/1", "mlp/1"}
    finally:
        runtime.close()


def test_models_cli_rejects_a_directory_without_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty" / "m" / "1").mkdir(parents=True)
    with pytest.raises(SystemExit) as exc:
        models.main([str(tmp_path / "empty"), "--out", str(tmp_path)])
    assert exc.value.code == 2 and "no models in" in capsys.readouterr().err


def test_requirements_come_from_pyproject_without_what_lambda_provides() -> None:
    reqs = [build.normalize(r.split(">")[0].split("=")[0].split("[")[0]) for r in build.requirements()]
    assert {"onnxruntime", "numpy", "orjson", "pillow", "mangum", "snapshot-restore-py"} <= set(reqs)
    assert not set(reqs) & (build.PROVIDED | build.SERVER_ONLY)
    assert os.environ["PIP_CACHE_DIR"].endswith(".cache/pip")
