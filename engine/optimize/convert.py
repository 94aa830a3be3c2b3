"""``oclaw convert``: a scikit-learn or PyTorch model to ONNX as the next version of a repository model, verified
against the framework's own output on a sample before the version appears.

Loading a pickle, a joblib file, a TorchScript or ``.pt2`` archive, or a Python file runs code from it: convert
only files you trust.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import pickle
import shutil
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort

from engine.config import Settings
from engine.errors import ConfigError, ModelLoadError, OclawError
from engine.model import LoadedModel
from engine.optimize.quantize import quiet
from engine.optimize.versioning import write_version
from engine.repository.local import MODEL_FILE, LocalRepository, ModelFiles, sha256_file, validate_name

Framework = Literal["sklearn", "torch"]
RECORD = "conversion.json"
SKLEARN_HINT = "scikit-learn conversion needs skl2onnx: pip install 'oclaw[convert-sklearn]'"
TORCH_HINT = (
    "PyTorch conversion needs torch and onnxscript: pip install 'oclaw[convert-torch]' (on Linux, install a CPU "
    "build of torch first: pip install torch --index-url https://download.pytorch.org/whl/cpu)"
)
DEFAULT_OPSET = 18
PICKLE_SUFFIXES = (".pkl", ".pickle")
TORCH_FILES = (".pt2", ".pt", ".ts")


class Mismatch(OclawError):
    """The converted model's outputs differ from the framework's by more than the tolerance."""


class ConversionFailed(OclawError):
    """The framework's converter could not convert the model."""


@dataclass(frozen=True, kw_only=True)
class ConvertOptions:
    """What to convert, where to, and how closely the result must agree with the framework."""

    framework: Framework
    source: str
    name: str
    sample: Path
    tolerance: float = 1e-5
    opset: int = DEFAULT_OPSET
    dynamic_batch: bool = False


@dataclass
class Converted:
    """An ONNX model, the sample feed and the framework's outputs for it."""

    model: bytes
    feed: dict[str, np.ndarray]
    expected: list[np.ndarray]
    framework: str
    framework_version: str
    converter: dict[str, str]
    source: Path

    @property
    def opset(self) -> int:
        """The default domain's opset the model declares (a converter may raise the one asked for)."""
        import onnx

        proto = onnx.load_model_from_string(self.model)
        return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


@dataclass
class Outcome:
    """The version written and what verifying it measured."""

    name: str
    version: int = 0
    path: Path = field(default_factory=Path)
    record: dict[str, Any] = field(default_factory=dict)


def load_sample(path: Path) -> dict[str, np.ndarray]:
    """The sample's arrays by name: a ``.npy`` file is one array, a ``.npz`` file one per input, in order."""
    if not path.is_file():
        raise ConfigError(f"--sample {path}: no such file")
    if path.suffix not in (".npy", ".npz"):
        raise ConfigError(f"--sample {path}: expected a .npy file (one input) or a .npz file (one array per input)")
    try:
        loaded = np.load(path, allow_pickle=False)
        arrays = {"input": loaded} if isinstance(loaded, np.ndarray) else {k: loaded[k] for k in loaded.files}
    except (OSError, ValueError, EOFError) as exc:
        raise ConfigError(f"--sample {path}: not a readable numpy file ({exc})") from None
    if not arrays:
        raise ConfigError(f"--sample {path}: no arrays")
    for key, array in arrays.items():
        if array.dtype.kind not in "biuf" or array.ndim == 0 or array.shape[0] == 0:
            raise ConfigError(
                f"--sample {path}: array {key!r} ({array.dtype}, shape {list(array.shape)}) must be numeric with "
                "a batch dimension of at least one item"
            )
    return arrays


def _sha256_bytes(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key, array in arrays.items():
        digest.update(f"{key}:{array.dtype.str}:{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _source_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise ConfigError(f"source {text}: no such file")
    return path


def _sklearn(options: ConvertOptions, sample: dict[str, np.ndarray]) -> Converted:
    try:
        import skl2onnx
        import sklearn
        import sklearn.base
    except ImportError:
        raise ConfigError(SKLEARN_HINT) from None
    path = _source_file(options.source)
    estimator = _unpickle(path)
    if not hasattr(estimator, "predict") and not hasattr(estimator, "transform"):
        raise ConfigError(f"source {path}: holds a {type(estimator).__name__}, not a scikit-learn estimator")
    if len(sample) != 1:
        raise ConfigError(
            f"--sample {options.sample}: a scikit-learn model takes one array; this file has {len(sample)}"
        )
    x = next(iter(sample.values())).astype(np.float32)
    if x.ndim != 2:
        raise ConfigError(f"--sample {options.sample}: expected a 2-D array (items x features), got shape {x.shape}")
    try:
        if hasattr(estimator, "predict_proba"):
            expected = [np.asarray(estimator.predict(x)), np.asarray(estimator.predict_proba(x))]
        elif hasattr(estimator, "predict"):
            expected = [np.asarray(estimator.predict(x))]
        else:
            expected = [np.asarray(estimator.transform(x))]
    except Exception as exc:  # noqa: BLE001 - the user's estimator may raise anything on the sample
        raise ConfigError(f"--sample {options.sample}: the estimator cannot run it: {exc}") from None
    try:
        zipmap = {"zipmap": False} if sklearn.base.is_classifier(estimator) else None  # tensors, not a map
        proto = skl2onnx.to_onnx(estimator, x[:1], target_opset=options.opset, options=zipmap)
    except Exception as exc:  # noqa: BLE001 - the converters raise many kinds; each is a failed conversion
        raise ConversionFailed(f"skl2onnx cannot convert {type(estimator).__name__}: {exc}") from None
    name = proto.graph.input[0].name
    return Converted(
        model=proto.SerializeToString(),
        feed={name: x},
        expected=expected,
        framework="scikit-learn",
        framework_version=sklearn.__version__,
        converter={"skl2onnx": skl2onnx.__version__},
        source=path,
    )


def _unpickle(path: Path) -> Any:
    try:
        if path.suffix == ".joblib":
            import joblib

            return joblib.load(path)
        if path.suffix not in PICKLE_SUFFIXES:
            raise ConfigError(f"source {path}: expected a pickle ({', '.join(PICKLE_SUFFIXES)}) or a .joblib file")
        with path.open("rb") as fh:
            return pickle.load(fh)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - unpickling raises whatever the pickled classes raise
        raise ConfigError(f"source {path}: cannot be loaded ({type(exc).__name__}: {exc})") from None


def _require_torch() -> tuple[Any, Any]:
    try:
        import onnxscript
        import torch
    except ImportError:
        raise ConfigError(TORCH_HINT) from None
    return torch, onnxscript


def _torch_module(torch: Any, source: str) -> tuple[Any, Path]:
    """The model a source names: ``file.py:factory`` (called with no arguments), a ``.pt2`` or a TorchScript file."""
    file, sep, factory = source.rpartition(":")
    if sep and file.endswith(".py"):
        path = _source_file(file)
        spec = importlib.util.spec_from_file_location(f"oclaw_convert_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"source {file}: cannot be imported")
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.parent.resolve()))  # the file's own imports of its neighbours
        try:
            spec.loader.exec_module(module)
            if not callable(getattr(module, factory, None)):
                raise ConfigError(f"source {source}: {path.name} defines no function {factory!r}")
            model = getattr(module, factory)()
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's code may raise anything
            raise ConfigError(f"source {source}: {type(exc).__name__}: {exc}") from None
        finally:
            sys.path.remove(str(path.parent.resolve()))
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"source {source}: {factory}() returned a {type(model).__name__}, not a torch.nn.Module")
        return model.eval(), path
    path = _source_file(source)
    if path.suffix not in TORCH_FILES:
        raise ConfigError(
            f"source {source}: expected file.py:factory, a torch.export .pt2 file or a TorchScript .pt/.ts file"
        )
    try:
        if path.suffix == ".pt2":
            return torch.export.load(str(path)), path
        return torch.jit.load(str(path), map_location="cpu").eval(), path
    except Exception as exc:  # noqa: BLE001 - the archive readers raise many kinds
        raise ConfigError(f"source {source}: cannot be loaded ({type(exc).__name__}: {exc})") from None


def _flat(torch: Any, value: Any) -> list[np.ndarray]:
    if isinstance(value, torch.Tensor):
        return [value.detach().cpu().numpy()]
    if isinstance(value, (list, tuple)):
        return [a for v in value for a in _flat(torch, v)]
    if isinstance(value, dict):
        return [a for v in value.values() for a in _flat(torch, v)]
    raise ConfigError(f"the model returned a {type(value).__name__}; expected tensors (in a tuple, list or dict)")


def _export(torch: Any, model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], *, dynamic_batch: bool) -> bytes:
    """The ONNX model ``torch.onnx.export`` makes: TorchScript by the TorchScript-based exporter, else by dynamo."""
    if isinstance(model, torch.jit.ScriptModule):
        if dynamic_batch:
            kwargs["dynamic_axes"] = {n: {0: "batch"} for n in kwargs["input_names"] + kwargs["output_names"]}
        buffer = io.BytesIO()
        torch.onnx.export(model, args, buffer, dynamo=False, **kwargs)
        return buffer.getvalue()
    if dynamic_batch and not isinstance(model, torch.export.ExportedProgram):
        kwargs["dynamic_shapes"] = tuple({0: torch.export.Dim.DYNAMIC} for _ in args)
    program = torch.onnx.export(model, args, dynamo=True, verbose=False, **kwargs)
    return bytes(program.model_proto.SerializeToString())


def _torch(options: ConvertOptions, sample: dict[str, np.ndarray]) -> Converted:
    torch, onnxscript = _require_torch()
    model, path = _torch_module(torch, options.source)
    exported = isinstance(model, torch.export.ExportedProgram)
    runnable = model.module() if exported else model
    args = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in sample.values())
    try:
        with torch.no_grad():
            expected = _flat(torch, runnable(*args))
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's model may raise anything on the sample
        raise ConfigError(f"--sample {options.sample}: the model cannot run it: {type(exc).__name__}: {exc}") from None
    names = list(sample)
    outputs = ["output"] if len(expected) == 1 else [f"output_{i}" for i in range(len(expected))]
    kwargs: dict[str, Any] = {"input_names": names, "output_names": outputs, "opset_version": options.opset}
    try:
        with quiet():
            proto = _export(torch, model, args, kwargs, dynamic_batch=options.dynamic_batch)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds
        raise ConversionFailed(f"torch.onnx.export cannot export {path.name}: {type(exc).__name__}: {exc}") from None
    return Converted(
        model=proto,
        feed={n: np.ascontiguousarray(a) for n, a in sample.items()},
        expected=expected,
        framework="torch",
        framework_version=torch.__version__,
        converter={"onnxscript": onnxscript.__version__},
        source=path,
    )


def compare(outputs: list[np.ndarray], expected: list[np.ndarray], names: list[str]) -> list[dict[str, Any]]:
    """Per output: the max abs difference (floats) or the count of differing values (labels, integers)."""
    rows: list[dict[str, Any]] = []
    for name, got, want in zip(names, outputs, expected, strict=False):
        if got.size != want.size:
            rows.append({"name": name, "error": f"shape {list(got.shape)}, expected {list(want.shape)}"})
            continue
        same = want.reshape(got.shape)
        if same.dtype.kind == "f" or got.dtype.kind == "f":
            diff = np.abs(got.astype(np.float64) - same.astype(np.float64))
            finite = np.isfinite(got) == np.isfinite(same)
            worst = float(diff[np.isfinite(diff)].max(initial=0.0)) if finite.all() else float("inf")
            rows.append({"name": name, "max_abs_diff": worst})
        else:
            rows.append({"name": name, "mismatches": int(np.count_nonzero(got != same)), "items": int(got.size)})
    return rows


def _failed(rows: list[dict[str, Any]], tolerance: float) -> list[str]:
    bad = []
    for row in rows:
        if "error" in row:
            bad.append(f"{row['name']}: {row['error']}")
        elif row.get("mismatches"):
            bad.append(f"{row['name']}: {row['mismatches']} of {row['items']} values differ")
        elif row.get("max_abs_diff", 0.0) > tolerance:
            bad.append(f"{row['name']}: max abs difference {row['max_abs_diff']:.3g} > tolerance {tolerance:g}")
    return bad


def convert_model(settings: Settings, options: ConvertOptions) -> Outcome:
    """Convert, then write and verify ``<name>/<N+1>``; Mismatch (and no new version) when outputs differ."""
    validate_name(options.name)
    sample = load_sample(options.sample)
    converted = _sklearn(options, sample) if options.framework == "sklearn" else _torch(options, sample)
    repo = LocalRepository(settings.model_repository)
    model_dir = repo.root / options.name
    created = not model_dir.exists()
    outcome = Outcome(options.name)

    def stage(folder: Path, version: int) -> None:
        path = folder / MODEL_FILE
        path.write_bytes(converted.model)
        rows = _verify(ModelFiles(options.name, version, path), repo, converted, settings)
        failed = _failed(rows, options.tolerance)
        if failed:
            raise Mismatch(
                f"the ONNX model's outputs differ from {converted.framework}'s on the sample: {'; '.join(failed)}; "
                "the repository is unchanged"
            )
        outcome.record = _record(options, converted, sample, rows, path)
        (folder / RECORD).write_text(json.dumps(outcome.record, indent=1) + "\n", encoding="utf-8")

    model_dir.mkdir(exist_ok=True)
    try:
        outcome.version = write_version(model_dir, stage)
    except BaseException:
        if created:
            shutil.rmtree(model_dir, ignore_errors=True)
        raise
    outcome.path = model_dir / str(outcome.version)
    return outcome


def _verify(files: ModelFiles, repo: LocalRepository, converted: Converted, settings: Settings) -> list[dict[str, Any]]:
    """Load the version as the server would and compare its outputs on the sample with the framework's."""
    try:
        model = LoadedModel(files, repo.manifest(files.name), settings)
    except Exception as exc:  # noqa: BLE001 - onnxruntime refuses a graph with many kinds of error
        raise ConversionFailed(f"the converted model does not load: {exc}") from None
    try:
        names = [o.name for o in model.session.get_outputs()]
        outputs = [np.asarray(o) for o in model.session.run(names, converted.feed)]
    except Exception as exc:  # noqa: BLE001 - as above, for running it
        raise ConversionFailed(f"the converted model does not run on the sample: {exc}") from None
    finally:
        model.close()
    if len(outputs) < len(converted.expected):
        raise ModelLoadError(f"the converted model has {len(outputs)} outputs, {converted.framework} gave more")
    return compare(outputs, converted.expected, names)


def _record(
    options: ConvertOptions,
    converted: Converted,
    sample: dict[str, np.ndarray],
    rows: list[dict[str, Any]],
    path: Path,
) -> dict[str, Any]:
    worst = max((r.get("max_abs_diff", 0.0) for r in rows), default=0.0)
    return {
        "framework": converted.framework,
        "framework_version": converted.framework_version,
        "converter": converted.converter,
        "source": str(converted.source.resolve()),
        "source_sha256": sha256_file(converted.source),
        "opset": converted.opset,
        "dynamic_batch": options.dynamic_batch or options.framework == "sklearn",
        "inputs": {n: {"datatype": str(a.dtype), "shape": list(a.shape)} for n, a in converted.feed.items()},
        "sample": {
            "path": str(options.sample),
            "sha256": sha256_file(options.sample),
            "data_sha256": _sha256_bytes(sample),
        },
        "outputs": rows,
        "max_abs_diff": worst,
        "tolerance": options.tolerance,
        "model_sha256": sha256_file(path),
        "onnxruntime": ort.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
