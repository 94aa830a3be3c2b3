"""`oclaw optimize` around the search: bad arguments named (exit 2), the report, conversions that fail, versions
written atomically, the conversion tools imported lazily, progress lines and the CPU's INT8 kernels.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.optimize import quantize
from engine.optimize.data import Dataset
from engine.optimize.progress import Progress
from engine.optimize.versioning import STAGING_PREFIX, write_version
from engine.repository.local import LocalRepository
from tests import optimizekit, optimodels
from tests.conftest import ROOT
from tests.optimizekit import _image, optimize, record, snapshot

# the kit's fixtures, by the names the tests ask for (_no_oclaw_env applies to every test here)
_no_oclaw_env = optimizekit._no_oclaw_env
digits = optimizekit.digits
weights = optimizekit.weights
data = optimizekit.data
repo = optimizekit.repo

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
