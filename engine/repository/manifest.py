"""The optional per-model manifest ``<repository>/<model>/oclaw.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from engine.errors import ConfigError

VersionPolicy = Literal["latest", "all"] | tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class TensorOverride:
    """A signature entry that replaces what the ONNX graph declares."""

    name: str
    datatype: str | None = None
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class ImagePreprocess:
    """Decode JPEG/PNG bytes into the model's image tensor."""

    input: str | None = None
    size: tuple[int, int] = (224, 224)
    #: Fraction of the short side kept by the centre crop before resizing (1.0 = no crop).
    crop_fraction: float = 0.875
    resample: Literal["nearest", "bilinear", "bicubic", "lanczos"] = "bicubic"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    color: Literal["RGB", "BGR"] = "RGB"


@dataclass(frozen=True, kw_only=True)
class Classification:
    """Turn an output of scores into top-k labels."""

    output: str | None = None
    softmax: bool = True
    top_k: int = 5


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """Everything ``oclaw.json`` may declare; every field is optional."""

    inputs: tuple[TensorOverride, ...] = ()
    outputs: tuple[TensorOverride, ...] = ()
    max_batch_size: int = 0
    versions: VersionPolicy = "latest"
    labels: tuple[str, ...] = ()
    preprocess: ImagePreprocess | None = None
    classification: Classification | None = None
    #: Expected sha256 per version ("1": "ab12…"); a mismatch fails the load.
    checksums: dict[str, str] = field(default_factory=dict)
    platform: str = "onnxruntime_onnx"


def _overrides(raw: Any, where: str) -> tuple[TensorOverride, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"{where} must be a list")
    out = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ConfigError(f"{where}: each entry needs a string 'name'")
        shape = item.get("shape")
        out.append(
            TensorOverride(
                name=item["name"],
                datatype=item.get("datatype"),
                shape=tuple(int(d) for d in shape) if shape is not None else None,
            )
        )
    return tuple(out)


def _labels(raw: Any, model_dir: Path) -> tuple[str, ...]:
    if isinstance(raw, list):
        return tuple(str(x) for x in raw)
    if isinstance(raw, str):
        path = (model_dir / raw).resolve()
        if model_dir.resolve() not in path.parents:
            raise ConfigError(f"labels file {raw!r} must lie inside the model directory")
        return tuple(line.rstrip("\r\n") for line in path.read_text(encoding="utf-8").splitlines())
    raise ConfigError("labels must be a list of strings or a file name")


def _versions(raw: Any) -> VersionPolicy:
    if raw in ("latest", "all"):
        return raw  # type: ignore[no-any-return]
    if isinstance(raw, list) and raw and all(isinstance(v, int) and v > 0 for v in raw):
        return tuple(raw)
    raise ConfigError('versions must be "latest", "all" or a list of positive integers')


_CHOICES = {
    "resample": ("nearest", "bilinear", "bicubic", "lanczos"),
    "layout": ("NCHW", "NHWC"),
    "color": ("RGB", "BGR"),
}


def _image_preprocess(raw: dict[str, Any]) -> ImagePreprocess:
    values: dict[str, Any] = {k: v for k, v in raw.items() if k != "kind"}
    for key, allowed in _CHOICES.items():
        if key in values and values[key] not in allowed:
            raise ConfigError(f"preprocess.{key} must be one of {allowed}, got {values[key]!r}")
    for key in ("size", "mean", "std"):
        if key in values:
            values[key] = tuple(int(x) if key == "size" else float(x) for x in values[key])
    spec = ImagePreprocess(**values)
    if len(spec.size) != 2 or len(spec.mean) != 3 or len(spec.std) != 3 or not 0 < spec.crop_fraction <= 1:
        raise ConfigError("preprocess needs size [h, w], 3 mean and 3 std values, 0 < crop_fraction <= 1")
    return spec


def load_manifest(model_dir: Path) -> Manifest:
    """Read ``oclaw.json`` from a model directory; a missing file gives the defaults."""
    path = model_dir / "oclaw.json"
    if not path.is_file():
        return Manifest()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the manifest must be a JSON object")
    try:
        pre = raw.get("preprocess")
        if pre is not None:
            if pre.get("kind", "image") != "image":
                raise ConfigError(f"preprocess.kind {pre.get('kind')!r} is not supported (only 'image')")
            pre = _image_preprocess(pre)
        post = raw.get("postprocess")
        cls = None
        if post is not None:
            if post.get("kind", "classification") != "classification":
                raise ConfigError(f"postprocess.kind {post.get('kind')!r} is not supported")
            cls = Classification(**{k: v for k, v in post.items() if k != "kind"})
        return Manifest(
            inputs=_overrides(raw.get("inputs", []), "inputs"),
            outputs=_overrides(raw.get("outputs", []), "outputs"),
            max_batch_size=int(raw.get("max_batch_size", 0)),
            versions=_versions(raw.get("versions", "latest")),
            labels=_labels(raw["labels"], model_dir) if "labels" in raw else (),
            preprocess=pre,
            classification=cls,
            checksums={str(k): str(v).lower() for k, v in raw.get("checksums", {}).items()},
            platform=str(raw.get("platform", "onnxruntime_onnx")),
        )
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}") from None
    except (TypeError, ValueError, OSError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
