"""`oclaw optimize`: INT8 (static, dynamic) and FP16 versions within a metric budget, written atomically."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from PIL import Image

from engine.config import Settings
from engine.optimize import quantize
from engine.optimize.data import Dataset
from engine.optimize.optimizer import OptimizeOptions, optimize_model
from engine.optimize.progress import Progress
from engine.optimize.versioning import STAGING_PREFIX, write_version
from engine.repository.local import LocalRepository, sha256_file
from handler.cli import main
from tests import optimodels
from tests.conftest import ROOT, start_server
from tests.modelgen import tiny_classifier

RECORD_KEYS = {
    "version",
    "source_version",
    "source_sha256",
    "method",
    "precision",
    "requested_precision",
    "settings",
    "nodes_fp32",
    "metric",
    "size_bytes",
    "latency_ms",
    "evaluation",
    "tried",
    "onnxruntime",
    "created",
}


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


def served_accuracy(repo: Path, model: str, version: int, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of one version as a real server answers, the batch sent in one V2 request."""
    server = start_server(repo)
    try:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.reshape(-1).tolist()}]}
        reply = httpx.post(f"{server.url}/v2/models/{model}/versions/{version}/infer", json=body, timeout=30)
        assert reply.status_code == 200, reply.text
        assert reply.json()["model_version"] == str(version)
        logits = np.asarray(reply.json()["outputs"][0]["data"], dtype=np.float32).reshape(len(x), 10)
        return optimodels.accuracy(logits, y)
    finally:
        server.stop()


# -- writing versions that the server serves ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_int8_writes_the_next_version_with_its_record_and_the_server_serves_it(
    capsys: pytest.CaptureFixture[str], repo: Path, data: dict[str, Path], digits: optimodels.Digits, mode: str
) -> None:
    source = repo / "digits" / "1" / "model.onnx"
    code, out, err = optimize(
        capsys, repo, "digits", "--precision", "int8", "--int8-mode", mode,
        "--calibration", str(data["npy"]), "--evaluation", str(data["npz"]),
    )  # fmt: skip
    assert code == 0, err
    assert "| | source (fp32) |" in out and f"| int8 {mode}" in out and "yes, chosen" in out
    assert f"wrote {repo / 'digits' / '2'}" in out
    assert "Traceback" not in err and "\r" not in err  # no progress lines when stderr is not a terminal
    assert sorted(p.name for p in (repo / "digits").iterdir()) == ["1", "2"]
    written = sorted(p.name for p in (repo / "digits" / "2").iterdir())
    assert written == ["model.onnx", "model.prepared.json", "model.prepared.onnx", "optimization.json"]
    rec = record(repo, "digits", 2)
    assert set(rec) == RECORD_KEYS
    assert rec["version"] == 2 and rec["source_version"] == 1
    assert rec["source_sha256"] == sha256_file(source)
    assert rec["method"] == f"int8-{mode}" and rec["precision"] == "int8" and rec["nodes_fp32"] == []
    assert rec["settings"]["per_channel"] is True
    if mode == "static":
        assert rec["settings"]["quant_format"] == "QDQ" and rec["settings"]["calibration_method"] == "minmax"
        assert rec["settings"]["calibration"]["sha256"] == sha256_file(data["npy"])
        kernels = quantize.int8_kernels()
        assert rec["settings"]["activation_type"] == kernels["activation_type"]
        graph = onnx.load(str(repo / "digits" / "2" / "model.onnx")).graph
        zero_points = [i for i in graph.initializer if i.name.endswith("_zero_point") and i.dims == []]
        activation = onnx.TensorProto.UINT8 if kernels["activation_type"] == "QUInt8" else onnx.TensorProto.INT8
        assert zero_points and all(z.data_type == activation for z in zero_points)  # activations: per tensor
    metric = rec["metric"]
    assert metric["name"] == "accuracy" and metric["max_drop"] == 0.01
    assert metric["source"] - metric["optimized"] <= 0.01 and metric["drop"] <= 0.01
    assert rec["size_bytes"]["source"] == source.stat().st_size
    assert rec["size_bytes"]["optimized"] == (repo / "digits" / "2" / "model.onnx").stat().st_size
    assert rec["size_bytes"]["optimized"] < rec["size_bytes"]["source"]
    assert rec["latency_ms"]["source"] > 0 and rec["latency_ms"]["optimized"] > 0 and rec["latency_ms"]["batch"] == 1
    assert rec["evaluation"] == {
        "path": str(data["npz"]),
        "items": 397,
        "labelled": True,
        "sha256": sha256_file(data["npz"]),
    }
    ops = {n.op_type for n in onnx.load(str(repo / "digits" / "2" / "model.onnx")).graph.node}
    assert ("QuantizeLinear" in ops) if mode == "static" else ("DynamicQuantizeLinear" in ops)
    x, y = digits.test
    # one request of 397 rows (dynamic INT8 scales activations per batch): still within the budget
    assert served_accuracy(repo, "digits", 2, x, y) >= metric["source"] - 0.01


def test_fp16_keeps_fp32_inputs_and_outputs_and_is_served(
    capsys: pytest.CaptureFixture[str], repo: Path, data: dict[str, Path], digits: optimodels.Digits
) -> None:
    code, _, err = optimize(capsys, repo, "digits", "--precision", "fp16", "--evaluation", str(data["jsonl"]))
    assert code == 0, err
    rec = record(repo, "digits", 2)
    assert rec["method"] == "fp16" and rec["settings"]["keep_io_types"] is True
    assert rec["evaluation"]["items"] == 60 and rec["evaluation"]["sha256"] == sha256_file(data["jsonl"])
    model = onnx.load(str(repo / "digits" / "2" / "model.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    assert "is now the one served" in err and '"versions": [1]' in err  # how to roll back
    x, y = digits.test
    assert served_accuracy(repo, "digits", 2, x, y) >= rec["metric"]["source"] - 0.01


def test_a_version_made_by_optimize_is_not_the_default_source(
    capsys: pytest.CaptureFixture[str], repo: Path, data: dict[str, Path]
) -> None:
    assert optimize(capsys, repo, "digits", "--precision", "fp16", "--evaluation", str(data["npz"]))[0] == 0
    assert optimize(capsys, repo, "digits", "--precision", "fp16", "--evaluation", str(data["npz"]))[0] == 0
    assert record(repo, "digits", 3)["source_version"] == 1
    code, _, err = optimize(
        capsys, repo, "digits", "--precision", "fp16", "--evaluation", str(data["npz"]), "--version", "2"
    )
    assert code == 2 and "digits/2 is itself an optimized version (of version 1" in err and "--version 1" in err


# -- the metric budget -----------------------------------------------------------------------------------------


def test_plain_int8_breaks_the_budget_and_the_sensitive_nodes_are_kept_in_fp32(
    capsys: pytest.CaptureFixture[str], repo: Path, data: dict[str, Path], digits: optimodels.Digits
) -> None:
    code, out, err = optimize(
        capsys, repo, "sensitive", "--precision", "int8",
        "--calibration", str(data["npy"]), "--evaluation", str(data["npz"]),
    )  # fmt: skip
    assert code == 0, err
    rec = record(repo, "sensitive", 2)
    plain = [t for t in rec["tried"] if not t["nodes_fp32"]]
    assert {t["method"] for t in plain} >= {"int8 static minmax", "int8 dynamic"}
    assert all(not t["holds"] and t["drop"] > 0.5 for t in plain)  # one int8 scale for the outlier tensor
    # the tensor with the outlier feeds fc2: static QDQ needs it and its producer (scale) in fp32, dynamic only fc2
    assert "fc2" in rec["nodes_fp32"] and set(rec["nodes_fp32"]) <= {"fc2", "scale"}
    assert rec["metric"]["drop"] <= 0.01
    assert any(t["holds"] for t in rec["tried"]) and "yes, chosen" in out
    x, y = digits.test
    assert served_accuracy(repo, "sensitive", 2, x, y) >= rec["metric"]["source"] - 0.01


def test_few_candidates_are_ranked_by_their_error_increase(
    repo: Path, data: dict[str, Path], digits: optimodels.Digits
) -> None:
    """With one group measured per family, the ranking by per-node error increments must pick the right one."""
    settings = Settings.from_env({}, model_repository=str(repo))
    options = OptimizeOptions(
        precision="int8", calibration=data["npy"], evaluation=data["npz"], calibration_method="minmax", max_candidates=1
    )
    outcome = optimize_model(settings, "sensitive", options, Progress(io.StringIO()))
    assert outcome.version == 2 and outcome.chosen is not None
    assert "fc2" in outcome.chosen.excluded
    assert len([t for t in outcome.trials if t.excluded]) == 2  # one search step per family sufficed


def test_when_no_configuration_holds_the_repository_is_unchanged(
    capsys: pytest.CaptureFixture[str], repo: Path, data: dict[str, Path]
) -> None:
    before = snapshot(repo)
    code, out, err = optimize(
        capsys, repo, "digits", "--precision", "int8", "--calibration", str(data["npy"]),
        "--evaluation", str(data["npz"]), "--metric", "max-abs", "--max-drop", "0",
    )  # fmt: skip
    assert code == 1
    assert "oclaw: no configuration holds the budget max-abs drop <= 0" in err
    assert "the repository is unchanged" in err and "Traceback" not in err
    assert "| 1 | int8 static minmax | 0 |" in out and "yes" not in out  # every configuration tried, none holds
    assert snapshot(repo) == before


# -- data -------------------------------------------------------------------------------------------------------


def _image(colour: tuple[int, int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.asarray(colour) + rng.integers(-30, 30, (8, 8, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_a_folder_of_labelled_images_goes_through_the_models_preprocess(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    labels = ["red", "green", "blue"]
    manifest = {
        "labels": labels,
        "preprocess": {"kind": "image", "size": [8, 8], "crop_fraction": 1.0, "std": [255, 255, 255]},
        "postprocess": {"kind": "classification", "top_k": 2},
    }
    root = tmp_path / "models"
    optimodels.save(tiny_classifier(), root, "colours", manifest=manifest)
    images = tmp_path / "images"
    for i, (label, colour) in enumerate(zip(labels, [(220, 20, 20), (20, 220, 20), (20, 20, 220)], strict=True)):
        (images / label).mkdir(parents=True)
        for j in range(4):
            (images / label / f"{j}.png").write_bytes(_image(colour, 10 * i + j))
    code, _, err = optimize(capsys, root, "colours", "--precision", "int8", "--evaluation", str(images))
    assert code == 0, err
    rec = record(root, "colours", 2)
    assert rec["metric"]["name"] == "accuracy" and rec["evaluation"]["items"] == 12
    assert rec["evaluation"]["labelled"] is True
    assert "static INT8 calibrates on the evaluation data" in err


# -- bad arguments: one line, exit 2, nothing written ------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        ([], "the following arguments are required: --precision"),
        (["--precision", "int4"], "argument --precision: invalid choice: 'int4'"),
        (["--precision", "int8", "--max-drop", "-1"], "argument --max-drop: expected a number >= 0, got '-1'"),
        (["--precision", "int8", "--version", "0"], "argument --version"),
        (["--precision", "int8"], "--evaluation (or --calibration) data is needed"),
        (["--precision", "int8", "--evaluation", "{missing}"], "--evaluation {missing}: no such file or directory"),
        (["--precision", "int8", "--evaluation", "{npy}", "--metric", "accuracy"], "--metric accuracy needs labelled"),
        (["--precision", "int8", "--evaluation", "{npz}", "--metric", "max-abs"], "--metric max-abs needs --max-drop"),
        (["--precision", "int8", "--evaluation", "{npz}", "--version", "7"], "--version 7: model 'digits' has"),
        (["--precision", "fp16", "--evaluation", "{txt}"], "--evaluation {txt}: expected a folder of images"),
        (["--precision", "fp16", "--evaluation", "{wrong_name}"], "'y' is not an input of model 'digits'"),
        (["--precision", "fp16", "--evaluation", "{labels}"], "2 labels for 397 items"),
        (["--precision", "fp16", "--evaluation", "{float64}"], "expected datatype FP32, got FP64"),
        (["--precision", "fp16", "--evaluation", "{folder}"], "declares none (oclaw.json 'preprocess')"),
        (["--precision", "fp16", "--evaluation", "{bad_json}"], "bad.jsonl:2: not JSON"),
        (["--precision", "fp16", "--evaluation", "{latin1}"], "latin1.jsonl: not UTF-8 text"),
        (["--precision", "fp16", "--evaluation", "{zebra}"], "zebra.jsonl:1: label 'zebra' is neither a class index"),
    ],
)
def test_bad_arguments_are_named_and_exit_2(  # noqa: PLR0917 - fixtures and parameters
    capsys: pytest.CaptureFixture[str],
    repo: Path,
    data: dict[str, Path],
    digits: optimodels.Digits,
    tmp_path: Path,
    args: list[str],
    named: str,
) -> None:
    x, y = digits.test
    files = {"missing": tmp_path / "missing.npz", "npy": data["npy"], "npz": data["npz"], "txt": tmp_path / "e.txt"}
    files["txt"].write_text("1 2 3")
    np.savez(files.setdefault("wrong_name", tmp_path / "wrong.npz"), y=x)
    np.savez(files.setdefault("labels", tmp_path / "labels.npz"), x=x, label=y[:2])
    np.savez(files.setdefault("float64", tmp_path / "f64.npz"), x=x.astype(np.float64))
    files["folder"] = tmp_path / "folder"
    (files["folder"] / "a").mkdir(parents=True)
    (files["folder"] / "a" / "1.png").write_bytes(_image((1, 2, 3), 0))
    files["bad_json"] = tmp_path / "bad.jsonl"
    files["bad_json"].write_text(data["jsonl"].read_text().splitlines()[0] + "\n{oops\n")
    files["latin1"] = tmp_path / "latin1.jsonl"
    files["latin1"].write_bytes('{"inputs": [], "label": "café"}\n'.encode("latin-1"))
    files["zebra"] = tmp_path / "zebra.jsonl"
    first = json.loads(data["jsonl"].read_text().splitlines()[0])
    files["zebra"].write_text(json.dumps({**first, "label": "zebra"}) + "\n")
    before = snapshot(repo)
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    code, out, err = optimize(capsys, repo, "digits", *args)
    assert code == 2
    assert named.format(**{k: str(v) for k, v in files.items()}) in err
    assert "Traceback" not in err and out == ""
    assert snapshot(repo) == before


def test_an_unknown_model_or_repository_is_named(capsys: pytest.CaptureFixture[str], repo: Path) -> None:
    code, _, err = optimize(capsys, repo, "nope", "--precision", "fp16", "--evaluation", "x.npz")
    assert code == 2 and "unknown model 'nope'" in err
    code, _, err = optimize(capsys, repo / "absent", "digits", "--precision", "fp16", "--evaluation", "x.npz")
    assert code == 2 and "is not a directory" in err


def test_report_without_matplotlib_fails_first_and_names_the_extra(repo: Path, data: dict[str, Path]) -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"  # as where the bench extra is not installed
        "from handler.cli import main\n"
        f"sys.exit(main(['optimize', 'digits', '--model-repository', {str(repo)!r}, '--precision', 'fp16', "
        f"'--evaluation', {str(data['npz'])!r}, '--report', {str(repo.parent / 'report')!r}]))\n"
    )
    before = snapshot(repo)
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert out.returncode == 2
    assert out.stderr.strip() == "oclaw: --report draws its plot with matplotlib: pip install 'oclaw[bench]'"
    assert snapshot(repo) == before and not (repo.parent / "report").exists()


def test_report_lists_every_configuration_and_plots_them(
    capsys: pytest.CaptureFixture[str], repo: Path, data: dict[str, Path]
) -> None:
    report = repo.parent / "report"
    code, _, err = optimize(
        capsys, repo, "digits", "--precision", "fp16", "--evaluation", str(data["npz"]), "--report", str(report)
    )
    assert code == 0, err
    listing = json.loads((report / "configurations.json").read_text())
    rec = record(repo, "digits", max(int(p.name) for p in (repo / "digits").iterdir() if p.name.isdigit()))
    assert listing["metric"] == rec["metric"]["name"]
    assert listing["source"]["value"] == pytest.approx(rec["metric"]["source"], abs=1e-6)
    assert [t["method"] for t in listing["tried"]] == ["fp16"] and listing["tried"][0]["holds"] is True
    assert (report / "metric_latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_conversion_the_tools_cannot_make_is_named(tmp_path: Path) -> None:
    """onnxruntime's tools raise many types: each becomes one message naming the configuration."""
    (tmp_path / "pre.onnx").write_bytes(b"not a model")
    items = Dataset(tmp_path, ({"x": np.zeros((1, 64), np.float32)},), None, "0" * 64)
    for family in (quantize.static_family("minmax"), quantize.dynamic_family(), quantize.fp16_family()):
        with pytest.raises(quantize.ConversionFailed, match=rf"^{family.label} failed: \w+"):
            quantize.build(
                family, tmp_path / "pre.onnx", tmp_path / "out.onnx", [], calibration=items, cache=tmp_path / "c"
            )
    with pytest.raises(quantize.ConversionFailed, match=r"^pre-processing failed: "):
        quantize.preprocess(tmp_path / "pre.onnx", tmp_path / "out.onnx")


# -- atomic versions -------------------------------------------------------------------------------------------


def test_a_failed_verification_leaves_no_version_behind(
    capsys: pytest.CaptureFixture[str], repo: Path, data: dict[str, Path]
) -> None:
    """The manifest expects another sha256 for version 2: loading it as the server would fails."""
    (repo / "digits" / "oclaw.json").write_text(json.dumps({"checksums": {"2": "0" * 64}}))
    before = snapshot(repo)
    code, _, err = optimize(capsys, repo, "digits", "--precision", "fp16", "--evaluation", str(data["npz"]))
    assert code == 1
    assert "does not match the manifest's" in err and "the repository is unchanged" in err
    assert snapshot(repo) == before


def test_a_failing_stage_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)

    def stage(folder: Path, version: int) -> None:
        (folder / "model.onnx").write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_version(tmp_path / "m", stage)
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["1"]


KILLED_MID_WRITE = """
import os, signal, sys
from pathlib import Path
from engine.optimize.versioning import write_version

def stage(folder, version):
    (folder / "model.onnx").write_bytes(Path(sys.argv[2]).read_bytes()[:100])  # half a model
    os.kill(os.getpid(), signal.SIGKILL)

write_version(Path(sys.argv[1]), stage)
"""


def test_a_process_killed_mid_write_leaves_no_partial_version(tmp_path: Path, repo: Path) -> None:
    model_dir = repo / "digits"
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_MID_WRITE, str(model_dir), str(model_dir / "1" / "model.onnx")],
        check=False,
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL
    staged = [p for p in model_dir.iterdir() if p.name.startswith(STAGING_PREFIX)]
    assert len(staged) == 1 and (staged[0] / "model.onnx").stat().st_size == 100
    assert LocalRepository(repo).versions("digits") == [1]  # the half-written folder is no version

    def stage(folder: Path, version: int) -> None:
        (folder / "model.onnx").write_bytes((model_dir / "1" / "model.onnx").read_bytes())

    assert write_version(model_dir, stage) == 2  # the next run clears what the dead one left
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2"]
    assert oct((model_dir / "2").stat().st_mode & 0o777) == oct(model_dir.stat().st_mode & 0o777)


def test_the_conversion_tools_are_imported_only_when_optimize_runs() -> None:
    code = (
        "import importlib, json, pkgutil, sys\n"
        "import engine.optimize, handler.cli\n"
        "for info in pkgutil.walk_packages(engine.optimize.__path__, 'engine.optimize.'):\n"
        "    importlib.import_module(info.name)\n"
        "print(json.dumps([m for m in ('onnx', 'onnxruntime.quantization', 'onnxruntime.transformers', 'matplotlib')"
        " if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    assert json.loads(out.stdout) == []


# -- progress ---------------------------------------------------------------------------------------------------


def test_progress_counts_on_a_terminal_and_is_silent_elsewhere() -> None:
    shown = io.StringIO()
    progress = Progress(shown, enabled=True)
    with progress.step("calibration (minmax)", 3) as tick:
        for _ in range(3):
            tick()
    lines = shown.getvalue()
    assert lines.startswith("\rcalibration (minmax)  ") and "calibration (minmax)  3/3  " in lines
    assert lines.endswith(" s\x1b[K\n")  # the step's line redrawn in place, then ended
    piped = io.StringIO()  # not a terminal
    quiet = Progress(piped)
    with quiet.step("evaluation", 2) as tick:
        tick()
        tick()
    quiet.status("oclaw: trying int8")
    assert piped.getvalue() == ""
    quiet.warn("oclaw: a warning is always shown")
    assert piped.getvalue() == "oclaw: a warning is always shown\n"


@pytest.mark.parametrize(
    ("machine", "flags", "activation", "reduce_range"),
    [
        ("x86_64", {"avx512_vnni", "avx512f"}, "QUInt8", False),  # U8S8: onnxruntime's fast x86 kernels
        ("x86_64", {"avx2", "fma"}, "QUInt8", True),  # no VNNI: 7-bit weights keep U8S8 sums from saturating
        ("AMD64", {"avx_vnni"}, "QUInt8", False),
        ("aarch64", set(), "QInt8", False),  # S8S8 on ARM64 (Graviton)
        ("arm64", set(), "QInt8", False),
    ],
)
def test_static_int8_kernels_suit_the_cpu(machine: str, flags: set[str], activation: str, reduce_range: bool) -> None:
    assert quantize.int8_kernels(machine, flags) == {"activation_type": activation, "reduce_range": reduce_range}
