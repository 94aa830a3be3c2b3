"""Warm-up feeds: the one a manifest declares, else synthetic inputs tried at a few plausible sizes in turn."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from engine.datatypes import V2_TO_NUMPY
from engine.errors import ModelLoadError
from engine.repository.manifest import Warmup, WarmupInput

Feed = dict[str, np.ndarray]

#: Sizes tried in turn for a variable dimension that is not a batch: 1, then common signal and image sizes.
SIZES = (1, 16, 32, 64, 128, 224, 256, 512)
#: Integer scalar inputs so named get a sample rate (models branch on it, e.g. silero-vad's ``sr``).
RATE_NAMES = frozenset({"sr", "rate", "sample_rate", "sampling_rate", "samplerate"})
SAMPLE_RATE = 16000
#: A synthetic feed with more elements than this (all inputs together) is not tried.
MAX_ELEMENTS = 1 << 22


class Spec(Protocol):
    """What the warm-up needs of an input's signature (engine.signature.TensorSpec)."""

    @property
    def name(self) -> str: ...

    @property
    def datatype(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


def _batch_axis(shape: tuple[int, ...]) -> int | None:
    """The first variable dimension of an input of rank 2 or more, taken as its batch."""
    if len(shape) < 2:
        return None
    return next((i for i, d in enumerate(shape) if d < 0), None)


def _zeros(spec: Spec, shape: tuple[int, ...]) -> np.ndarray:
    if spec.datatype == "BYTES":
        return np.full(shape, "", dtype=object)
    dtype = V2_TO_NUMPY[spec.datatype]
    if dtype.kind in "iu" and dtype.itemsize >= 4 and math.prod(shape) == 1 and spec.name.lower() in RATE_NAMES:
        return np.full(shape, SAMPLE_RATE, dtype)
    return np.zeros(shape, dtype)


def synthetic_feeds(
    specs: Sequence[Spec], dim_names: Mapping[str, Sequence[Any]], fixed: Feed, *, max_elements: int = MAX_ELEMENTS
) -> Iterator[Feed]:
    """Feeds for the inputs not in ``fixed``: batch dimensions 1, the other variable ones at each of SIZES.

    ``dim_names`` holds each input's shape as onnxruntime reports it: dimensions sharing a symbolic name get one
    value, and a name that is a batch anywhere is 1 everywhere. Zeros, except a sample rate for a rate scalar.
    """
    todo = [s for s in specs if s.name not in fixed]
    batch_names = set()
    for s in todo:
        axis, names = _batch_axis(s.shape), dim_names.get(s.name, ())
        if axis is not None and axis < len(names) and isinstance(names[axis], str):
            batch_names.add(names[axis])
    seen: set[tuple[tuple[int, ...], ...]] = set()
    for size in SIZES:
        shapes = []
        for s in todo:
            axis, names = _batch_axis(s.shape), dim_names.get(s.name, ())
            shapes.append(
                tuple(
                    d if d >= 0 else 1 if i == axis or (i < len(names) and names[i] in batch_names) else size
                    for i, d in enumerate(s.shape)
                )
            )
        key = tuple(shapes)
        if key in seen:
            continue
        if sum(math.prod(shape) for shape in shapes) > max_elements:
            return
        seen.add(key)
        yield {**fixed, **{s.name: _zeros(s, shape) for s, shape in zip(todo, shapes, strict=True)}}


def _spec(specs: Sequence[Spec], name: str, where: str, model: str) -> Spec:
    for s in specs:
        if s.name == name:
            return s
    raise ModelLoadError(f"model {model!r}: {where} names no input of the model; inputs: {[s.name for s in specs]}")


def _checked(spec: Spec, arr: np.ndarray, where: str, model: str) -> np.ndarray:
    if spec.datatype == "BYTES":
        if arr.dtype.kind not in "SUO":
            raise ModelLoadError(f"model {model!r}: {where}: input {spec.name!r} takes strings, got {arr.dtype}")
        arr = arr.astype(object)
    elif arr.dtype != V2_TO_NUMPY[spec.datatype]:
        raise ModelLoadError(
            f"model {model!r}: {where}: input {spec.name!r} is {spec.datatype} "
            f"({V2_TO_NUMPY[spec.datatype]}), got {arr.dtype}"
        )
    if len(arr.shape) != len(spec.shape) or any(0 <= w != g for g, w in zip(arr.shape, spec.shape, strict=True)):
        raise ModelLoadError(
            f"model {model!r}: {where}: shape {list(arr.shape)} does not fit input {spec.name!r} {list(spec.shape)}"
        )
    return arr


def _values(item: WarmupInput, spec: Spec, where: str, model: str) -> np.ndarray:
    dtype = V2_TO_NUMPY[spec.datatype]
    if item.data is not None:
        try:
            flat = np.asarray(item.data, dtype=dtype).reshape(-1)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ModelLoadError(f"model {model!r}: {where}.data: {exc}") from None
        if flat.size != math.prod(item.shape):
            raise ModelLoadError(
                f"model {model!r}: {where}.data has {flat.size} values; shape {list(item.shape)} needs "
                f"{math.prod(item.shape)}"
            )
        return flat.reshape(item.shape)
    if item.fill == "zeros" or spec.datatype == "BYTES":
        return np.full(item.shape, "", dtype=object) if spec.datatype == "BYTES" else np.zeros(item.shape, dtype)
    if item.fill == "ones":
        return np.ones(item.shape, dtype)
    rng = np.random.default_rng(0)
    if dtype.kind == "f":
        return rng.random(item.shape).astype(dtype)
    if dtype.kind == "b":
        return rng.random(item.shape) < 0.5
    return rng.integers(0, 10, item.shape).astype(dtype)


def declared_feed(warmup: Warmup, specs: Sequence[Spec], model: str) -> Feed:
    """The inputs a manifest's ``warmup`` declares, checked against the model's signature."""
    feed: Feed = {}
    if warmup.sample is not None:
        where = f"oclaw.json warmup sample {warmup.sample.name!r}"
        try:
            with np.load(warmup.sample, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"model {model!r}: {where}: {exc}") from None
        for name, arr in arrays.items():
            feed[name] = _checked(_spec(specs, name, f"{where} array {name!r}", model), arr, where, model)
    for item in warmup.inputs:
        where = f"oclaw.json warmup.inputs.{item.name}"
        spec = _spec(specs, item.name, where, model)
        if item.datatype is not None and item.datatype != spec.datatype:
            raise ModelLoadError(
                f"model {model!r}: {where}.datatype is {item.datatype!r}; input {spec.name!r} is {spec.datatype}"
            )
        feed[item.name] = _checked(spec, _values(item, spec, where, model), where, model)
    return feed
