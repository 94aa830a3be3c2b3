"""Calibration and evaluation data: image folders, ``.npy``/``.npz`` tensors or JSON Lines of V2 requests.

Every item goes through the source model's own request path (``LoadedModel.prepare``): names, datatypes and
shapes are checked as a request's would be, and images are pre-processed as the manifest says.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.datatypes import v2_datatype
from engine.errors import ConfigError, OclawError
from engine.model import LoadedModel
from engine.tensors import InferRequest, InputTensor, decode_document

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
LABEL_KEY = "label"

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class Dataset:
    """Model feeds (one item each, batch 1), their labels when every item has one, and the data's sha256."""

    path: Path
    feeds: tuple[Feed, ...]
    labels: tuple[int, ...] | None
    sha256: str

    def __len__(self) -> int:
        return len(self.feeds)

    def head(self, n: int) -> Dataset:
        """The first ``n`` items."""
        labels = None if self.labels is None else self.labels[:n]
        return Dataset(self.path, self.feeds[:n], labels, self.sha256)

    def summary(self) -> dict[str, Any]:
        """What optimization.json records about this data."""
        return {"path": str(self.path), "items": len(self), "labelled": self.labels is not None, "sha256": self.sha256}


def load_dataset(path: Path, model: LoadedModel, *, flag: str) -> Dataset:
    """Read the data at ``path`` (named by ``flag`` in errors) into feeds for ``model``."""
    if not path.exists():
        raise ConfigError(f"{flag} {path}: no such file or directory")
    try:
        return _load(path, model, flag)
    except OSError as exc:
        raise ConfigError(f"{flag} {exc.filename or path}: {exc.strerror or exc}") from None


def _load(path: Path, model: LoadedModel, flag: str) -> Dataset:
    if path.is_dir():
        feeds, labels, digest = _image_folder(path, model, flag)
    elif path.suffix == ".npz":
        feeds, labels = _npz(path, model, flag)
        digest = _sha256(path)
    elif path.suffix == ".npy":
        feeds, labels = _npy(path, model, flag)
        digest = _sha256(path)
    elif path.suffix in JSONL_SUFFIXES:
        feeds, labels = _jsonl(path, model, flag)
        digest = _sha256(path)
    else:
        raise ConfigError(
            f"{flag} {path}: expected a folder of images, a .npy or .npz file, or JSON Lines of V2 requests "
            f"({', '.join(JSONL_SUFFIXES)})"
        )
    if not feeds:
        raise ConfigError(f"{flag} {path}: no items")
    return Dataset(path, tuple(feeds), _all_or_none(labels, path, flag), digest)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _all_or_none(labels: Sequence[int | None], path: Path, flag: str) -> tuple[int, ...] | None:
    missing = sum(label is None for label in labels)
    if missing == len(labels):
        return None
    if missing:
        raise ConfigError(f"{flag} {path}: {missing} of {len(labels)} items have no label (label all or none)")
    return tuple(int(label) for label in labels if label is not None)


def _label(raw: Any, model: LoadedModel, where: str) -> int | None:
    """A class index from an integer, a digit string or one of the manifest's labels."""
    if raw is None:
        return None
    if isinstance(raw, bool):
        raise ConfigError(f"{where}: label must be a class index or a class name, got {raw!r}")
    if isinstance(raw, int | np.integer):
        return int(raw)
    if isinstance(raw, str):
        if raw.isdigit():
            return int(raw)
        labels = model.manifest.labels
        if raw in labels:
            return labels.index(raw)
        known = f"one of the manifest's labels ({', '.join(labels[:10])}{', ...' if len(labels) > 10 else ''})"
        raise ConfigError(f"{where}: label {raw!r} is neither a class index nor {known if labels else 'a label'}")
    raise ConfigError(f"{where}: label must be a class index or a class name, got {raw!r}")


def _prepared(model: LoadedModel, request: InferRequest, where: str) -> Feed:
    try:
        feed, _ = model.prepare(request)
    except OclawError as exc:
        raise ConfigError(f"{where}: {exc.message}") from None
    return feed


# -- tensors --------------------------------------------------------------------------------------------


def _items(name: str, arr: np.ndarray, model: LoadedModel, where: str) -> list[np.ndarray]:
    """Split one array into batch-1 items: along its batch axis, or along an extra leading item axis."""
    spec = next((s for s in model.inputs if s.name == name), None)
    if spec is None:
        names = [s.name for s in model.inputs]
        raise ConfigError(f"{where}: {name!r} is not an input of model {model.name!r}; inputs: {names}")
    if arr.ndim == len(spec.shape) + 1:
        return [arr[i] for i in range(arr.shape[0])]
    if arr.ndim == len(spec.shape) and arr.ndim > 0:
        return [arr[i : i + 1] for i in range(arr.shape[0])]
    raise ConfigError(
        f"{where}: array {name!r} of shape {list(arr.shape)} does not fit input shape {list(spec.shape)} "
        "(items along the batch axis, or along an extra leading axis)"
    )


def _tensor_feeds(arrays: dict[str, np.ndarray], model: LoadedModel, where: str) -> list[Feed]:
    split = {name: _items(name, arr, model, where) for name, arr in arrays.items()}
    counts = {name: len(items) for name, items in split.items()}
    if len(set(counts.values())) > 1:
        raise ConfigError(f"{where}: arrays hold different numbers of items: {counts}")
    feeds = []
    for i in range(next(iter(counts.values()), 0)):
        inputs = [InputTensor(n, v2_datatype(items[i]), tuple(items[i].shape), items[i]) for n, items in split.items()]
        feeds.append(_prepared(model, InferRequest(inputs=inputs), f"{where}, item {i}"))
    return feeds


def _npz(path: Path, model: LoadedModel, flag: str) -> tuple[list[Feed], list[int | None]]:
    where = f"{flag} {path}"
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: not a readable .npz file: {exc}") from None
    raw_labels = arrays.pop(LABEL_KEY, None)
    if not arrays:
        raise ConfigError(f"{where}: no arrays besides {LABEL_KEY!r}; name one per input: {_input_names(model)}")
    feeds = _tensor_feeds(arrays, model, where)
    if raw_labels is None:
        return feeds, [None] * len(feeds)
    flat = raw_labels.reshape(-1).tolist()
    if len(flat) != len(feeds):
        raise ConfigError(f"{where}: {len(flat)} labels for {len(feeds)} items")
    return feeds, [_label(v, model, f"{where}, item {i}") for i, v in enumerate(flat)]


def _npy(path: Path, model: LoadedModel, flag: str) -> tuple[list[Feed], list[int | None]]:
    where = f"{flag} {path}"
    if len(model.inputs) != 1:
        raise ConfigError(
            f"{where}: a .npy file feeds a model with one input; {model.name!r} has {_input_names(model)} "
            "(use a .npz file with one array per input)"
        )
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: not a readable .npy file: {exc}") from None
    feeds = _tensor_feeds({model.inputs[0].name: arr}, model, where)
    return feeds, [None] * len(feeds)


def _input_names(model: LoadedModel) -> list[str]:
    return [s.name for s in model.inputs]


# -- V2 requests ----------------------------------------------------------------------------------------


def _jsonl(path: Path, model: LoadedModel, flag: str) -> tuple[list[Feed], list[int | None]]:
    feeds: list[Feed] = []
    labels: list[int | None] = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{flag} {path}: not UTF-8 text (byte {exc.start})") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{flag} {path}:{number}"
        try:
            doc = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{where}: not JSON: {exc}") from None
        try:
            request = decode_document(doc, max_elements=model.settings.max_tensor_elements)
        except OclawError as exc:
            raise ConfigError(f"{where}: {exc.message}") from None
        feeds.append(_prepared(model, request, where))
        labels.append(_label(doc.get(LABEL_KEY), model, where))
    return feeds, labels


# -- images ---------------------------------------------------------------------------------------------


def _images_in(folder: Path) -> Iterator[tuple[Path, str | None]]:
    """Image files directly in ``folder`` (no label) and in its subfolders (labelled by the subfolder's name)."""
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_file() and child.suffix.lower() in IMAGE_SUFFIXES:
            yield child, None
        elif child.is_dir():
            for file in sorted(child.iterdir()):
                if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES and not file.name.startswith("."):
                    yield file, child.name


def _image_folder(folder: Path, model: LoadedModel, flag: str) -> tuple[list[Feed], list[int | None], str]:
    if model.image_input is None:
        raise ConfigError(
            f"{flag} {folder}: a folder of images needs the model's image pre-processing, and model "
            f"{model.name!r} declares none (oclaw.json 'preprocess'); give .npz tensors instead"
        )
    feeds: list[Feed] = []
    labels: list[int | None] = []
    digest = hashlib.sha256()
    for file, label in _images_in(folder):
        data = file.read_bytes()
        relative = file.relative_to(folder).as_posix()
        digest.update(relative.encode() + b"\0" + hashlib.sha256(data).digest())
        request = InferRequest(inputs=[], raw=data, raw_kind="image")
        feeds.append(_prepared(model, request, f"{flag} {file}"))
        labels.append(_label(label, model, f"{flag} {file.parent}"))
    if not feeds:
        raise ConfigError(f"{flag} {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in it or its subfolders")
    return feeds, labels, digest.hexdigest()
