"""The V2 / Open Inference Protocol wire format, self-contained: numpy arrays <-> JSON and binary tensors."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np

#: V2 datatype -> little-endian numpy dtype (BYTES is an object array of ``bytes``).
V2_TO_NUMPY: Final[dict[str, np.dtype[Any]]] = {
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
#: (numpy kind, item size) -> V2 datatype, derived from the table above.
_NUMPY_TO_V2: Final[dict[tuple[str, int], str]] = {
    (dt.kind, dt.itemsize): name for name, dt in V2_TO_NUMPY.items() if name != "BYTES"
}
#: The header that says where the JSON part of a binary body ends.
HEADER_LENGTH: Final = "inference-header-content-length"
_LEN = struct.Struct("<I")
#: How JSON (which has no NaN or infinity) carries non-finite floats, both ways.
_NON_FINITE: Final = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def datatype_of(array: np.ndarray) -> str:
    """The V2 datatype of a numpy array (strings and bytes are BYTES)."""
    if array.dtype.kind in "OSU":
        return "BYTES"
    try:
        return _NUMPY_TO_V2[(array.dtype.kind, array.dtype.itemsize)]
    except KeyError:
        raise TypeError(f"numpy dtype {array.dtype} has no V2 datatype") from None


def as_array(value: Any, datatype: str | None = None) -> np.ndarray:
    """A numpy array of ``value`` (an array, a nested list), cast to ``datatype`` when given."""
    if datatype == "BYTES":
        array = np.asarray(value, dtype=object)
    elif datatype is not None:
        array = np.asarray(value, dtype=V2_TO_NUMPY[datatype])
    else:
        array = np.asarray(value)
    if array.dtype.kind in "SU":
        array = array.astype(object)
    return array


def _bytes_elements(array: np.ndarray) -> list[bytes]:
    return [x if isinstance(x, bytes) else str(x).encode("utf-8") for x in array.reshape(-1).tolist()]


def tensor_bytes(array: np.ndarray) -> bytes:
    """A tensor's binary form: raw little-endian data, or length-prefixed elements for BYTES."""
    if array.dtype.kind in "OSU":
        return b"".join(_LEN.pack(len(b)) + b for b in _bytes_elements(array))
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _json_data(array: np.ndarray) -> list[Any]:
    if array.dtype.kind in "OSU":
        try:
            return [b.decode("utf-8") for b in _bytes_elements(array)]
        except UnicodeDecodeError:
            raise ValueError("BYTES elements that are not UTF-8 text (e.g. images) need binary tensors") from None
    flat = array.reshape(-1).tolist()
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        return [
            x if math.isfinite(x) else ("NaN" if math.isnan(x) else "Infinity" if x > 0 else "-Infinity") for x in flat
        ]
    return list(flat)


def encode_request(
    inputs: Mapping[str, np.ndarray],
    *,
    binary: bool = True,
    outputs: Sequence[str] | None = None,
    classification: int = 0,
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """A V2 infer request body and, when tensors travel as binary data, the length of its JSON header."""
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, array in inputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if binary:
            blob = tensor_bytes(array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            chunks.append(blob)
        else:
            entry["data"] = _json_data(array)
        entries.append(entry)
    doc: dict[str, Any] = {"inputs": entries}
    params = dict(parameters or {})
    if outputs is not None:
        wanted: list[dict[str, Any]] = []
        for name in outputs:
            oparams: dict[str, Any] = {"binary_data": binary and not classification}
            if classification:
                oparams["classification"] = classification
            wanted.append({"name": name, "parameters": oparams})
        doc["outputs"] = wanted
    elif binary:
        params["binary_data_output"] = True
    if params:
        doc["parameters"] = params
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not binary:
        return head, None
    return head + b"".join(chunks), len(head)


def _from_binary(datatype: str, chunk: memoryview, count: int) -> np.ndarray:
    if datatype != "BYTES":
        return np.frombuffer(chunk, dtype=V2_TO_NUMPY[datatype], count=count)
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        (n,) = _LEN.unpack_from(chunk, pos)
        out[i] = bytes(chunk[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


def _from_json(datatype: str, data: Any) -> np.ndarray:
    if datatype == "BYTES":
        flat = np.asarray(data, dtype=object).reshape(-1)
        return np.array([x.encode("utf-8") if isinstance(x, str) else x for x in flat.tolist()] or [], dtype=object)
    if datatype in ("FP16", "FP32", "FP64"):
        data = [_NON_FINITE.get(x, x) if isinstance(x, str) else x for x in np.asarray(data, dtype=object).ravel()]
    return np.asarray(data, dtype=V2_TO_NUMPY[datatype]).reshape(-1)


def decode_response(body: bytes, header_length: int | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A V2 infer response: its JSON document and its outputs as numpy arrays, by name, in order."""
    head = body if header_length is None else body[:header_length]
    doc: dict[str, Any] = json.loads(head)
    binary = memoryview(body)[len(head) :]
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for out in doc.get("outputs", []):
        shape = tuple(out["shape"])
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            flat = _from_binary(out["datatype"], binary[offset : offset + size], math.prod(shape))
            offset += size
        else:
            flat = _from_json(out["datatype"], out.get("data", []))
        arrays[out["name"]] = flat.reshape(shape)
    return doc, arrays


def json_document(body: bytes, header_length: int | None = None) -> dict[str, Any]:
    """An encoded infer request as one JSON document: binary inputs inlined as ``data``, JSON outputs asked for."""
    head = body if header_length is None else body[:header_length]
    doc: dict[str, Any] = json.loads(head)
    binary = memoryview(body)[len(head) :]
    offset = 0
    for entry in doc.get("inputs", []):
        params = entry.get("parameters") or {}
        size = params.pop("binary_data_size", None)
        if size is not None:
            flat = _from_binary(entry["datatype"], binary[offset : offset + size], math.prod(entry["shape"]))
            entry["data"] = _json_data(flat)
            offset += size
        if not params:
            entry.pop("parameters", None)
    (doc.get("parameters") or {}).pop("binary_data_output", None)
    if doc.get("parameters") == {}:
        del doc["parameters"]
    for out in doc.get("outputs") or []:
        (out.get("parameters") or {}).pop("binary_data", None)
    return doc
