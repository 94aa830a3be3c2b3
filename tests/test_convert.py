"""`oclaw convert`: scikit-learn models to ONNX versions, checked against the framework and served by a real server."""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import httpx
import joblib
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from handler.cli import main
from tests.conftest import ROOT, start_server

RECORD_KEYS = {
    "framework",
    "framework_version",
    "converter",
    "source",
    "source_sha256",
    "opset",
    "dynamic_batch",
    "inputs",
    "sample",
    "outputs",
    "max_abs_diff",
    "tolerance",
    "model_sha256",
    "onnxruntime",
    "created",
}


def snapshot(root: Path) -> dict[str, int | None]:
    """Every path under ``root`` and a file's size."""
    return {str(p.relative_to(root)): p.stat().st_size if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, digits: tuple[np.ndarray, np.ndarray]) -> dict[str, Path]:
    """A pickled LogisticRegression and pipeline, a joblib RandomForest and a sample of held-out digits."""
    x, y = digits
    folder = tmp_path_factory.mktemp("sources")
    with (folder / "lr.pkl").open("wb") as fh:
        pickle.dump(LogisticRegression(max_iter=300).fit(x[:600], y[:600]), fh)
    forest = RandomForestClassifier(n_estimators=8, max_depth=8, random_state=0).fit(x[:600], y[:600])
    joblib.dump(forest, folder / "rf.joblib")
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300)).fit(x[:600], y[:600])
    with (folder / "pipe.pkl").open("wb") as fh:
        pickle.dump(pipeline, fh)
    np.save(folder / "sample.npy", x[600:664])
    with (folder / "not-a-model.pkl").open("wb") as fh:
        pickle.dump({"weights": [1, 2]}, fh)
    np.save(folder / "narrow.npy", x[600:610, :10])
    return {p.stem: p for p in folder.iterdir()}


def convert(repo: Path, *args: str) -> int:
    return main(["convert", *args, "--model-repository", str(repo)])


def served(repo: Path, name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """The outputs a real server gives for ``x`` in one V2 request."""
    server = start_server(repo)
    try:
        body = {"inputs": [{"name": "X", "datatype": "FP32", "shape": list(x.shape), "data": x.reshape(-1).tolist()}]}
        reply = httpx.post(f"{server.url}/v2/models/{name}/infer", json=body, timeout=30)
        assert reply.status_code == 200, reply.text
        return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in reply.json()["outputs"]}
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("source", "estimator"), [("lr", LogisticRegression), ("rf", RandomForestClassifier), ("pipe", Pipeline)]
)
def test_a_classifier_becomes_a_version_the_server_answers_as_sklearn_does(
    tmp_path: Path,
    *,
    models: dict[str, Path],
    digits: tuple[np.ndarray, np.ndarray],
    capsys: pytest.CaptureFixture[str],
    source: str,
    estimator: type,
) -> None:
    x, _ = digits
    path = models[source]
    args = ("sklearn", str(path), "--name", "digits", "--sample", str(models["sample"]))
    assert convert(tmp_path, *args) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["version"] == 1 and line["max_abs_diff"] <= 1e-5
    assert convert(tmp_path, *args) == 0  # the next one beside it
    assert json.loads(capsys.readouterr().out)["version"] == 2
    assert sorted(p.name for p in (tmp_path / "digits").iterdir()) == ["1", "2"]
    assert sorted(p.name for p in (tmp_path / "digits" / "2").iterdir()) == ["conversion.json", "model.onnx"]
    record = json.loads((tmp_path / "digits" / "2" / "conversion.json").read_text())
    assert set(record) == RECORD_KEYS
    assert record["framework"] == "scikit-learn" and record["opset"] == 18 and record["tolerance"] == 1e-5
    assert record["inputs"] == {"X": {"datatype": "float32", "shape": [64, 64]}}
    assert [o["name"] for o in record["outputs"]] == ["label", "probabilities"]
    assert record["max_abs_diff"] == line["max_abs_diff"]
    assert record["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()

    clf = joblib.load(path) if path.suffix == ".joblib" else pickle.loads(path.read_bytes())
    assert isinstance(clf, estimator)
    unseen = x[1700:1750]  # not the sample: any batch size, any digits
    outputs = served(tmp_path, "digits", unseen)
    assert set(outputs) == {"label", "probabilities"}
    np.testing.assert_array_equal(outputs["label"], clf.predict(unseen))
    np.testing.assert_allclose(outputs["probabilities"], clf.predict_proba(unseen), atol=1e-5, rtol=0)


def test_outputs_beyond_the_tolerance_exit_1_and_leave_the_repository_unchanged(
    tmp_path: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("sklearn", str(models["lr"]), "--name", "digits", "--sample", str(models["sample"]))
    assert convert(tmp_path, *args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["max_abs_diff"] > 0  # float32 ONNX against float64 scikit-learn
    before = snapshot(tmp_path)
    assert convert(tmp_path, *args, "--tolerance", f"{first['max_abs_diff'] / 2:g}") == 1
    err = capsys.readouterr().err
    assert "probabilities: max abs difference" in err and "the repository is unchanged" in err
    assert snapshot(tmp_path) == before
    # a new model's folder does not appear either
    assert (
        convert(
            tmp_path,
            "sklearn",
            str(models["lr"]),
            "--name",
            "new",
            "--sample",
            str(models["sample"]),
            "--tolerance",
            "0",
        )
        == 1
    )
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("source", "extra", "message"),
    [
        ("missing.pkl", ["--sample", "sample"], "missing.pkl: no such file"),
        ("lr", ["--sample", "missing.npy"], "--sample missing.npy: no such file"),
        ("lr", ["--sample", "lr"], "--sample"),
        ("not-a-model", ["--sample", "sample"], "not a scikit-learn estimator"),
        ("lr", ["--sample", "narrow"], "--sample"),
        ("sample", ["--sample", "sample"], "expected a pickle"),
        ("lr", ["--sample", "sample", "--name", "../up"], "invalid model name '../up'"),
    ],
)
def test_bad_arguments_exit_2_with_one_clear_line(
    tmp_path: Path,
    *,
    models: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    source: str,
    extra: list[str],
    message: str,
) -> None:
    def resolve(value: str) -> str:
        return str(models.get(value, value))

    repo = tmp_path / "repo"
    repo.mkdir()
    extra = [resolve(e) if i and extra[i - 1] == "--sample" else e for i, e in enumerate(extra)]
    name = [] if "--name" in extra else ["--name", "m"]
    assert convert(repo, "sklearn", resolve(source), *name, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("oclaw: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err
    assert snapshot(repo) == {}


def test_flags_out_of_range_are_refused_by_the_parser(
    tmp_path: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["convert", "sklearn", str(models["lr"]), "--name", "m", "--sample", str(models["sample"])]
    for extra, flag in ((["--tolerance", "-1"], "--tolerance"), (["--opset", "3"], "--opset")):
        with pytest.raises(SystemExit) as exc:
            main([*base, "--model-repository", str(tmp_path), *extra])
        assert exc.value.code == 2 and flag in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["convert", "tensorflow", "m", "--name", "m", "--sample", "s.npy"])
    assert exc.value.code == 2 and "invalid choice: 'tensorflow'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("framework", "module", "source", "extra"),
    [
        ("torch", "torch", "net.py:make", "oclaw[convert-torch]"),
        ("sklearn", "skl2onnx", "lr", "oclaw[convert-sklearn]"),
    ],
)
def test_a_missing_extra_is_named(
    tmp_path: Path,
    *,
    models: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    framework: str,
    module: str,
    source: str,
    extra: str,
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it raises ImportError
    net = tmp_path / "net.py"
    net.write_text("def make():\n    raise AssertionError('never run without the extra')\n")
    src = str(models.get(source, tmp_path / source))
    repo = tmp_path / "repo"
    repo.mkdir()
    assert convert(repo, framework, src, "--name", "m", "--sample", str(models["sample"])) == 2
    err = capsys.readouterr().err
    assert extra in err and err.count("\n") == 1
    assert snapshot(repo) == {}


def test_the_help_says_loading_a_model_runs_its_code(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert "runs code from it" in " ".join(capsys.readouterr().out.split())


def test_a_regressor_from_an_npz_sample_keeps_its_one_output(
    tmp_path: Path, digits: tuple[np.ndarray, np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    x, y = digits
    ridge = Ridge().fit(x[:600], y[:600].astype(np.float64))
    joblib.dump(ridge, tmp_path / "ridge.joblib")
    np.savez(tmp_path / "sample.npz", features=x[600:632])
    repo = tmp_path / "repo"
    repo.mkdir()
    args = ("sklearn", str(tmp_path / "ridge.joblib"), "--name", "ridge", "--sample", str(tmp_path / "sample.npz"))
    assert convert(repo, *args, "--tolerance", "1e-4") == 0
    line = json.loads(capsys.readouterr().out)
    assert [o["name"] for o in line["outputs"]] == ["variable"] and 0 < line["max_abs_diff"] <= 1e-4
    record = json.loads((repo / "ridge" / "1" / "conversion.json").read_text())
    assert record["sample"]["sha256"] == hashlib.sha256((tmp_path / "sample.npz").read_bytes()).hexdigest()


def test_importing_convert_imports_no_framework() -> None:
    code = (
        "import sys, engine.optimize.convert, handler.cli; "
        "print(sorted(m for m in ('sklearn', 'skl2onnx', 'torch', 'onnxscript', 'joblib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"
