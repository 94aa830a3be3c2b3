"""A model's signature: its inputs and outputs as the session and the manifest declare them, and a request's
tensors checked against it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.datatypes import V2_TO_NUMPY, ort_datatype
from engine.errors import InvalidInput, ModelLoadError, OclawError

if TYPE_CHECKING:  # pragma: no cover
    from engine.repository.manifest import TensorOverride
    from engine.tensors import InputTensor


@dataclass(frozen=True)
class TensorSpec:
    """Name, V2 datatype and shape (``-1`` for a variable dimension) of a model input or output."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        """V2 metadata entry."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def _dims(shape: Any) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (shape or ()))


def signature(nodes: Any, overrides: tuple[TensorOverride, ...], what: str) -> tuple[TensorSpec, ...]:
    """The specs of a session's input or output ``nodes`` (``what``), with the manifest's overrides applied."""
    by_name = {o.name: o for o in overrides}
    specs = []
    for node in nodes:
        try:
            datatype = ort_datatype(node.type)
        except OclawError as exc:
            raise ModelLoadError(f"{what} {node.name!r}: {exc.message}") from None
        spec = TensorSpec(node.name, datatype, _dims(node.shape))
        if (o := by_name.pop(node.name, None)) is not None:
            spec = TensorSpec(spec.name, o.datatype or spec.datatype, o.shape if o.shape is not None else spec.shape)
        specs.append(spec)
    if by_name:
        raise ModelLoadError(f"manifest names {what}s the model does not have: {sorted(by_name)}")
    return tuple(specs)


def check_input(t: InputTensor, inputs: dict[str, TensorSpec], model: str, max_batch_size: int) -> np.ndarray:
    """The session array of request tensor ``t`` once its name, datatype and shape match ``model``'s inputs."""
    spec = inputs.get(t.name)
    if spec is None:
        raise InvalidInput(f"model {model!r} has no input {t.name!r}; expected inputs: {list(inputs)}")
    if t.datatype != spec.datatype:
        raise InvalidInput(f"input {t.name!r}: expected datatype {spec.datatype}, got {t.datatype}")
    if len(t.shape) != len(spec.shape):
        raise InvalidInput(
            f"input {t.name!r}: expected rank {len(spec.shape)} (shape {list(spec.shape)}), got shape {list(t.shape)}"
        )
    for i, (got, want) in enumerate(zip(t.shape, spec.shape, strict=True)):
        if want >= 0 and got != want:
            raise InvalidInput(
                f"input {t.name!r}: dimension {i} must be {want} (shape {list(spec.shape)}), got shape {list(t.shape)}"
            )
    if max_batch_size > 0 and t.shape and t.shape[0] > max_batch_size:
        raise InvalidInput(f"input {t.name!r}: batch of {t.shape[0]} exceeds max_batch_size {max_batch_size}")
    if t.datatype == "BYTES":
        flat = [x.decode("utf-8", errors="replace") for x in t.array.reshape(-1).tolist()]
        arr = np.empty(len(flat), dtype=object)
        arr[:] = flat
        return arr.reshape(t.shape)
    return t.array


def raw_tensor(raw: bytes, inputs: tuple[TensorSpec, ...], model: str) -> np.ndarray:
    """A raw request body as the one input of ``model`` (one row when its first dimension is variable)."""
    if len(inputs) != 1:
        raise InvalidInput(f"a raw body needs a model with exactly one input; {model!r} has {len(inputs)}")
    spec = inputs[0]
    if spec.datatype == "BYTES":
        arr = np.empty(1, dtype=object)
        arr[0] = raw.decode("utf-8", errors="replace")
        return arr.reshape((1,) * max(1, len(spec.shape)))
    dims = spec.shape[1:] if spec.shape and spec.shape[0] < 0 else spec.shape
    if any(d < 0 for d in dims):
        raise InvalidInput(f"a raw body needs fixed dimensions; input {spec.name!r} has shape {list(spec.shape)}")
    dtype = V2_TO_NUMPY[spec.datatype]
    need = math.prod(dims) * dtype.itemsize
    if len(raw) != need:
        raise InvalidInput(f"raw body of {len(raw)} bytes; input {spec.name!r} {list(spec.shape)} needs {need}")
    shape = (1, *dims) if len(dims) < len(spec.shape) else dims
    return np.frombuffer(raw, dtype=dtype).reshape(shape)
