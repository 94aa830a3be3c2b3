"""The optional per-model manifest ``<repository>/<model>/oclaw.json``."""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Collection
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from engine.errors import ConfigError

log = logging.getLogger("oclaw.manifest")

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
class TextPreprocess:
    """Tokenize a BYTES tensor of UTF-8 strings into the model's token inputs."""

    #: Name of the BYTES input the served model exposes.
    input: str = "text"
    input_ids: str = "input_ids"
    attention_mask: str | None = "attention_mask"
    token_type_ids: str | None = "token_type_ids"
    #: The ``tokenizers`` file, relative to the model directory.
    tokenizer: Path = Path("tokenizer.json")
    max_length: int = 256


@dataclass(frozen=True, kw_only=True)
class Embedding:
    """Pool token embeddings into one vector per string."""

    #: The model output holding the token embeddings [N, T, D] (default: the first output).
    output: str | None = None
    #: Name of the served output.
    name: str = "embedding"
    pooling: Literal["mean"] = "mean"
    normalize: bool = True


@dataclass(frozen=True, kw_only=True)
class Classification:
    """Turn an output of scores into top-k labels."""

    output: str | None = None
    softmax: bool = True
    top_k: int = 5


Fill = Literal["zeros", "ones", "random"]


@dataclass(frozen=True, kw_only=True)
class WarmupInput:
    """One declared warm-up input: its shape and its values (``data``) or how to fill it."""

    name: str
    shape: tuple[int, ...]
    datatype: str | None = None
    data: tuple[Any, ...] | None = None
    fill: Fill = "zeros"


@dataclass(frozen=True, kw_only=True)
class Warmup:
    """The warm-up a manifest declares: inputs given in ``oclaw.json`` or a ``.npz`` sample in the model directory."""

    inputs: tuple[WarmupInput, ...] = ()
    sample: Path | None = None


@dataclass(frozen=True, kw_only=True)
class DynamicBatching:
    """Concurrent requests stacked into one run on a server (Triton's ``dynamic_batching``, see engine.dynbatch)."""

    #: How long queued requests wait for company while a runner is free and others are in flight.
    max_queue_delay_microseconds: int = 0
    #: Batch sizes (rows) to dispatch as soon as the queue holds one; each at most max_batch_size.
    preferred_batch_size: tuple[int, ...] = ()
    #: Requests that may wait; one more gets 429 with Retry-After (the queue is always bounded).
    max_queue_size: int = 1024


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """Everything ``oclaw.json`` may declare; every field is optional."""

    inputs: tuple[TensorOverride, ...] = ()
    outputs: tuple[TensorOverride, ...] = ()
    max_batch_size: int = 0
    versions: VersionPolicy = "latest"
    labels: tuple[str, ...] = ()
    preprocess: ImagePreprocess | TextPreprocess | None = None
    classification: Classification | None = None
    embedding: Embedding | None = None
    #: Expected sha256 per version ("1": "ab12…"); a mismatch fails the load.
    checksums: dict[str, str] = field(default_factory=dict)
    platform: str = "onnxruntime_onnx"
    #: Declared warm-up inputs (None: synthetic ones, see engine.warmup).
    warmup: Warmup | None = None
    #: Dynamic batching on `oclaw serve` (None: each request runs alone).
    dynamic_batching: DynamicBatching | None = None
    #: Sessions (Triton's model instances) of each version, each with its share of the CPU cores (None: one on a
    #: CPU, two on a CUDA device: engine.session.default_instance_count).
    instance_count: int | None = None


_TOP_KEYS = (*(f.name for f in fields(Manifest) if f.name not in ("classification", "embedding")), "postprocess")
_TENSOR_KEYS = ("name", "datatype", "shape")
_PREPROCESS_KEYS = ("kind", *(f.name for f in fields(ImagePreprocess)))
_POSTPROCESS_KEYS = ("kind", *(f.name for f in fields(Classification)))
_TEXT_KEYS = ("kind", *(f.name for f in fields(TextPreprocess)))
_EMBEDDING_KEYS = ("kind", *(f.name for f in fields(Embedding)))
_DYNAMIC_BATCHING_KEYS = tuple(f.name for f in fields(DynamicBatching))
_WARMUP_INPUT_KEYS = ("datatype", "shape", "data", "fill")
_FILLS = ("zeros", "ones", "random")
_warned: set[tuple[Path, str]] = set()


def check_keys(raw: dict[str, Any], known: Collection[str], where: str, path: Path) -> None:
    """Reject a key that looks like a misspelt known one; warn (once) about any other unknown key."""
    lowered = {k.lower(): k for k in known}
    for key in raw:
        if key in known:
            continue
        full = f"{where}.{key}" if where else key
        close = difflib.get_close_matches(key.lower(), list(lowered), n=1, cutoff=0.75)
        if close:
            suggestion = f"{where}.{lowered[close[0]]}" if where else lowered[close[0]]
            raise ConfigError(f"unknown key {full!r}; did you mean {suggestion!r}?")
        if (path, full) not in _warned:
            _warned.add((path, full))
            log.warning("%s: unknown key %r ignored (known: %s)", path, full, ", ".join(known))


def _inside(model_dir: Path, name: str, what: str) -> Path:
    path = (model_dir / name).resolve()
    if model_dir.resolve() not in path.parents:
        raise ConfigError(f"{what} {name!r} must lie inside the model directory")
    return path


def _shape(raw: Any, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw):
        raise ConfigError(f"{where}.shape must be a list of non-negative integers ([] for a scalar)")
    return tuple(raw)


def _overrides(raw: Any, where: str, path: Path) -> tuple[TensorOverride, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"{where} must be a list")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ConfigError(f"{where}: each entry needs a string 'name'")
        check_keys(item, _TENSOR_KEYS, f"{where}[{i}]", path)
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
        path = _inside(model_dir, raw, "labels file")
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


def _warmup_input(name: str, raw: Any, path: Path) -> WarmupInput:
    where = f"warmup.inputs.{name}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be an object with 'shape' and 'data' or 'fill'")
    check_keys(raw, _WARMUP_INPUT_KEYS, where, path)
    if "shape" not in raw:
        raise ConfigError(f"{where} needs a 'shape' ([] for a scalar)")
    datatype = raw.get("datatype")
    if datatype is not None and not isinstance(datatype, str):
        raise ConfigError(f'{where}.datatype must be a V2 datatype name such as "INT64"')
    data = raw.get("data")
    fill = raw.get("fill", "zeros")
    if data is not None and "fill" in raw:
        raise ConfigError(f"{where}: give 'data' or 'fill', not both")
    if data is not None and not isinstance(data, list):
        raise ConfigError(f"{where}.data must be a list of values")
    if fill not in _FILLS:
        raise ConfigError(f"{where}.fill must be one of {_FILLS}, got {fill!r}")
    return WarmupInput(
        name=name,
        shape=_shape(raw["shape"], where),
        datatype=datatype,
        data=None if data is None else tuple(data),
        fill=fill,
    )


def _warmup(raw: Any, model_dir: Path, path: Path) -> Warmup:
    if isinstance(raw, str):
        sample = _inside(model_dir, raw, "warmup sample")
        if sample.suffix != ".npz" or not sample.is_file():
            raise ConfigError(f"warmup sample {raw!r} must be a .npz file in {model_dir}")
        return Warmup(sample=sample)
    if not isinstance(raw, dict) or not isinstance(raw.get("inputs"), dict) or not raw["inputs"]:
        raise ConfigError('warmup must be a .npz file name or {"inputs": {"<input name>": {"shape": [...], ...}}}')
    check_keys(raw, ("inputs",), "warmup", path)
    return Warmup(inputs=tuple(_warmup_input(str(k), v, path) for k, v in raw["inputs"].items()))


def _object(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be an object")
    return raw


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


def _text_preprocess(raw: dict[str, Any], model_dir: Path) -> TextPreprocess:
    for key in ("input", "input_ids"):
        if key in raw and not (isinstance(raw[key], str) and raw[key]):
            raise ConfigError(f"preprocess.{key} must be an input name")
    for key in ("attention_mask", "token_type_ids"):
        if key in raw and raw[key] is not None and not (isinstance(raw[key], str) and raw[key]):
            raise ConfigError(f"preprocess.{key} must be an input name or null (the model takes no such input)")
    length = raw.get("max_length", 256)
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ConfigError(f"preprocess.max_length must be a positive integer, got {length!r}")
    name = raw.get("tokenizer", "tokenizer.json")
    if not isinstance(name, str):
        raise ConfigError("preprocess.tokenizer must be a file name in the model directory")
    tokenizer = _inside(model_dir, name, "preprocess.tokenizer")
    if not tokenizer.is_file():
        raise ConfigError(f"preprocess.tokenizer {name!r}: no such file in {model_dir}")
    values = {k: v for k, v in raw.items() if k not in ("kind", "tokenizer", "max_length")}
    return TextPreprocess(**values, tokenizer=tokenizer, max_length=length)


def _embedding(raw: dict[str, Any]) -> Embedding:
    if raw.get("pooling", "mean") != "mean":
        raise ConfigError(f"postprocess.pooling must be 'mean', got {raw['pooling']!r}")
    if not isinstance(raw.get("normalize", True), bool):
        raise ConfigError("postprocess.normalize must be true or false")
    for key in ("output", "name"):
        if key in raw and not (isinstance(raw[key], str) and raw[key]):
            raise ConfigError(f"postprocess.{key} must be an output name")
    return Embedding(**{k: v for k, v in raw.items() if k != "kind"})


def _preprocess(raw: Any, model_dir: Path, path: Path) -> ImagePreprocess | TextPreprocess:
    pre = _object(raw, "preprocess")
    kind = pre.get("kind", "image")
    if kind == "text":
        check_keys(pre, _TEXT_KEYS, "preprocess", path)
        return _text_preprocess(pre, model_dir)
    if kind != "image":
        raise ConfigError(f"preprocess.kind {kind!r} is not supported (only 'image' or 'text')")
    check_keys(pre, _PREPROCESS_KEYS, "preprocess", path)
    return _image_preprocess(pre)


def _postprocess(raw: Any, path: Path) -> Classification | Embedding:
    post = _object(raw, "postprocess")
    kind = post.get("kind", "classification")
    if kind == "embedding":
        check_keys(post, _EMBEDDING_KEYS, "postprocess", path)
        return _embedding(post)
    if kind != "classification":
        raise ConfigError(f"postprocess.kind {kind!r} is not supported (only 'classification' or 'embedding')")
    check_keys(post, _POSTPROCESS_KEYS, "postprocess", path)
    return Classification(**{k: v for k, v in post.items() if k != "kind"})


def _count(raw: Any, where: str, *, minimum: int) -> int:
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < minimum:
        kind = "a positive" if minimum > 0 else "a non-negative"
        raise ConfigError(f"{where} must be {kind} integer, got {raw!r}")
    return raw


def _dynamic_batching(raw: Any, max_batch_size: int, path: Path) -> DynamicBatching:
    where = "dynamic_batching"
    spec = _object(raw, where)
    check_keys(spec, _DYNAMIC_BATCHING_KEYS, where, path)
    unknown = [k for k in spec if k not in _DYNAMIC_BATCHING_KEYS]
    if unknown:  # a queue policy oclaw does not apply must not pass silently
        raise ConfigError(f"unknown key '{where}.{unknown[0]}' (known: {', '.join(_DYNAMIC_BATCHING_KEYS)})")
    if max_batch_size < 1:
        raise ConfigError(f"{where} needs max_batch_size >= 1 (the most rows one run takes), got {max_batch_size}")
    delay = _count(spec.get("max_queue_delay_microseconds", 0), f"{where}.max_queue_delay_microseconds", minimum=0)
    preferred = spec.get("preferred_batch_size", [])
    if not isinstance(preferred, list):
        raise ConfigError(f"{where}.preferred_batch_size must be a list of positive integers, got {preferred!r}")
    sizes = tuple(sorted({_count(n, f"{where}.preferred_batch_size", minimum=1) for n in preferred}))
    if sizes and sizes[-1] > max_batch_size:
        raise ConfigError(
            f"{where}.preferred_batch_size {sizes[-1]} exceeds max_batch_size {max_batch_size} (a run's most rows)"
        )
    size = _count(spec.get("max_queue_size", 1024), f"{where}.max_queue_size", minimum=1)
    return DynamicBatching(max_queue_delay_microseconds=delay, preferred_batch_size=sizes, max_queue_size=size)


#: Most sessions one model version may hold (each holds the weights once more).
MAX_INSTANCES = 64


def _instance_count(raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= MAX_INSTANCES:
        raise ConfigError(f"instance_count must be an integer from 1 to {MAX_INSTANCES}, got {raw!r}")
    return raw


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
        check_keys(raw, _TOP_KEYS, "", path)
        pre = _preprocess(raw["preprocess"], model_dir, path) if raw.get("preprocess") is not None else None
        post = _postprocess(raw["postprocess"], path) if raw.get("postprocess") is not None else None
        if isinstance(post, Embedding) and not isinstance(pre, TextPreprocess):
            raise ConfigError('postprocess.kind "embedding" needs preprocess.kind "text"')
        max_batch_size = int(raw.get("max_batch_size", 0))
        batching = raw.get("dynamic_batching")
        return Manifest(
            inputs=_overrides(raw.get("inputs", []), "inputs", path),
            outputs=_overrides(raw.get("outputs", []), "outputs", path),
            max_batch_size=max_batch_size,
            versions=_versions(raw.get("versions", "latest")),
            labels=_labels(raw["labels"], model_dir) if "labels" in raw else (),
            preprocess=pre,
            classification=post if isinstance(post, Classification) else None,
            embedding=post if isinstance(post, Embedding) else None,
            checksums={str(k): str(v).lower() for k, v in raw.get("checksums", {}).items()},
            platform=str(raw.get("platform", "onnxruntime_onnx")),
            warmup=_warmup(raw["warmup"], model_dir, path) if "warmup" in raw else None,
            dynamic_batching=None if batching is None else _dynamic_batching(batching, max_batch_size, path),
            instance_count=_instance_count(raw["instance_count"]) if "instance_count" in raw else None,
        )
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}") from None
    except (TypeError, ValueError, OSError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
