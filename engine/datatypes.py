"""V2 datatypes and their numpy / ONNX equivalents, defined once with derived inverses."""

from __future__ import annotations

from typing import Final

import numpy as np

from engine.errors import InvalidInput

#: V2 datatype -> little-endian numpy dtype (BYTES is an object array of ``bytes``).
V2_TO_NUMPY: Final[dict[str, np.dtype[np.generic]]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
}

#: numpy dtype kind+size -> V2 datatype (native byte order), derived from the table above.
_NUMPY_TO_V2: Final[dict[tuple[str, int], str]] = {
    (dt.kind, dt.itemsize): name for name, dt in V2_TO_NUMPY.items() if name != "BYTES"
}

#: ONNX Runtime type strings -> V2 datatype.
ORT_TO_V2: Final[dict[str, str]] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

#: V2 datatype -> Triton model-config type name (for the /config endpoint).
V2_TO_TRITON_CONFIG: Final[dict[str, str]] = {
    name: "TYPE_STRING" if name == "BYTES" else f"TYPE_{name}" for name in V2_TO_NUMPY
}


def numpy_dtype(datatype: str) -> np.dtype[np.generic]:
    """Return the numpy dtype of a V2 datatype, or raise InvalidInput naming the valid ones."""
    try:
        return V2_TO_NUMPY[datatype]
    except (KeyError, TypeError):
        raise InvalidInput(f"unsupported datatype {datatype!r}; expected one of {', '.join(V2_TO_NUMPY)}") from None


def v2_datatype(array: np.ndarray) -> str:
    """Return the V2 datatype of a numpy array."""
    dt = array.dtype
    if dt.kind in ("O", "S", "U"):
        return "BYTES"
    try:
        return _NUMPY_TO_V2[(dt.kind, dt.itemsize)]
    except KeyError:
        raise InvalidInput(f"numpy dtype {dt} has no V2 datatype") from None


def ort_datatype(ort_type: str) -> str:
    """Return the V2 datatype of an ONNX Runtime type string such as ``tensor(float)``."""
    try:
        return ORT_TO_V2[ort_type]
    except KeyError:
        raise InvalidInput(f"ONNX type {ort_type} is not supported by the V2 protocol") from None
