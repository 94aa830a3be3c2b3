"""V2 / Open Inference Protocol codec: JSON tensors and the binary tensor extension <-> numpy."""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from engine.datatypes import V2_TO_NUMPY, numpy_dtype, v2_datatype
from engine.errors import InvalidInput, PayloadTooLarge

_LEN = struct.Struct("<I")
_MAX_DIMS = 32  # numpy 1.x's limit (numpy 2 allows 64)
JSONValue = Any


@dataclass(slots=True)
class InputTensor:
    """One decoded request input."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray
    parameters: dict[str, JSONValue] = field(default_factory=dict)


@dataclass(slots=True)
class RequestedOutput:
    """One entry of the request's ``outputs`` list."""

    name: str
    binary: bool | None = None
    classification: int = 0


@dataclass(slots=True)
class InferRequest:
    """A decoded infer request; ``raw`` holds the body of a raw (header-less) request."""

    inputs: list[InputTensor]
    id: str | None = None
    parameters: dict[str, JSONValue] = field(default_factory=dict)
    outputs: list[RequestedOutput] | None = None
    binary_output: bool = False
    raw: bytes | None = None
    raw_kind: str = ""  # "tensor" or "image" when raw is set
    nbytes: int = 0


@dataclass(slots=True)
class OutputTensor:
    """One response output, ready to encode."""

    name: str
    array: np.ndarray
    binary: bool = False


@dataclass(slots=True)
class InferResponse:
    """A model's answer to one request."""

    model_name: str
    model_version: str
    outputs: list[OutputTensor]
    id: str | None = None
    parameters: dict[str, JSONValue] = field(default_factory=dict)
    #: Rows (batch items) served, time queued and time computing (decode + run + post-process), in ns.
    rows: int = 1
    queue_ns: int = 0
    compute_ns: int = 0


def loads_json(data: bytes | memoryview) -> JSONValue:
    """Parse JSON; NaN/Infinity tokens (not strict JSON) are accepted so such inputs pass through."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        try:
            return json.loads(bytes(data))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise InvalidInput(f"malformed JSON: {exc}") from None


def element_count(name: str, shape: Any, limit: int) -> tuple[tuple[int, ...], int]:
    """Validate a declared shape and return it with its element count, before any allocation."""
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidInput(f"input {name!r}: 'shape' must be a list of non-negative integers, got {shape!r}")
    if len(shape) > _MAX_DIMS:
        raise InvalidInput(f"input {name!r}: shape has {len(shape)} dimensions, at most {_MAX_DIMS} are supported")
    count = math.prod(shape)
    if count > limit:
        raise PayloadTooLarge(f"input {name!r}: shape {shape} has {count} elements, more than the limit of {limit}")
    if count == 0 and math.prod(max(d, 1) for d in shape) > limit:
        raise InvalidInput(f"input {name!r}: shape {shape} has a dimension beyond the limit of {limit} elements")
    return tuple(shape), count


def _bytes_from_binary(name: str, buf: memoryview, count: int) -> np.ndarray:
    out = np.empty(count, dtype=object)
    pos, end = 0, len(buf)
    for i in range(count):
        if pos + 4 > end:
            raise InvalidInput(f"input {name!r}: BYTES element {i} is truncated")
        (n,) = _LEN.unpack_from(buf, pos)
        pos += 4
        if pos + n > end:
            raise InvalidInput(f"input {name!r}: BYTES element {i} declares {n} bytes, {end - pos} remain")
        out[i] = bytes(buf[pos : pos + n])
        pos += n
    if pos != end:
        raise InvalidInput(f"input {name!r}: {end - pos} bytes left over after {count} BYTES elements")
    return out


def _flatten_strings(name: str, data: Any, out: list[bytes]) -> None:
    for item in data:
        if isinstance(item, str):
            out.append(item.encode("utf-8"))
        elif isinstance(item, list):
            _flatten_strings(name, item, out)
        else:
            raise InvalidInput(f"input {name!r}: BYTES data must hold strings, got {type(item).__name__}")


def _from_json(name: str, datatype: str, data: Any, shape: tuple[int, ...], count: int) -> np.ndarray:
    if not isinstance(data, list):
        data = [data]
    if datatype == "BYTES":
        flat: list[bytes] = []
        _flatten_strings(name, data, flat)
        arr = np.empty(len(flat), dtype=object)
        arr[:] = flat
    else:
        try:
            if datatype == "BOOL":
                arr = np.array(data)
                if arr.size and arr.dtype != np.bool_:
                    raise InvalidInput(f"input {name!r}: BOOL data must hold true/false values")
                arr = arr.astype(np.bool_, copy=False)
            else:
                with np.errstate(over="ignore"):  # 1e40 as FP32 becomes inf, as a C cast would
                    arr = np.array(data, dtype=V2_TO_NUMPY[datatype])
        except InvalidInput:
            raise
        except (ValueError, TypeError, OverflowError) as exc:
            raise InvalidInput(f"input {name!r}: data does not fit datatype {datatype}: {exc}") from None
    if arr.size != count:
        raise InvalidInput(f"input {name!r}: shape {list(shape)} needs {count} elements, data has {arr.size}")
    return arr.reshape(shape)


def _params(obj: dict[str, Any], where: str) -> dict[str, JSONValue]:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidInput(f"{where}: 'parameters' must be an object")
    return params


def decode_request(body: bytes, header_length: int | None = None, *, max_elements: int = 1 << 26) -> InferRequest:
    """Decode a V2 infer request body (JSON, or JSON + binary tensors when ``header_length`` is set)."""
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise InvalidInput(
                f"Inference-Header-Content-Length {header_length} is outside the body of {len(body)} bytes"
            )
        view = memoryview(body)
        head, binary = view[:header_length], view[header_length:]
    else:
        head, binary = memoryview(body), memoryview(b"")
    request = decode_document(loads_json(head), binary, max_elements=max_elements)
    request.nbytes = len(body)
    return request


def decode_document(doc: Any, binary: memoryview | None = None, *, max_elements: int = 1 << 26) -> InferRequest:
    """Decode an already-parsed V2 request object (plus the binary tensor section, if any)."""
    binary = binary if binary is not None else memoryview(b"")
    if not isinstance(doc, dict):
        raise InvalidInput(f"the request body must be a JSON object, got {type(doc).__name__}")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("the request needs a non-empty 'inputs' list")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    params = _params(doc, "request")
    inputs: list[InputTensor] = []
    offset = 0
    for i, item in enumerate(raw_inputs):
        if not isinstance(item, dict):
            raise InvalidInput(f"inputs[{i}] must be an object")
        name = item.get("name")
        if not isinstance(name, str):
            raise InvalidInput(f"inputs[{i}] needs a string 'name'")
        datatype = item.get("datatype")
        if not isinstance(datatype, str):
            raise InvalidInput(f"input {name!r} needs a string 'datatype'")
        dtype = numpy_dtype(datatype)
        shape, count = element_count(name, item.get("shape"), max_elements)
        tparams = _params(item, f"input {name!r}")
        size = tparams.get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0:
                raise InvalidInput(f"input {name!r}: binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise InvalidInput(
                    f"input {name!r}: binary_data_size {size} but only {len(binary) - offset} bytes of "
                    "binary data remain (truncated body?)"
                )
            chunk = binary[offset : offset + size]
            offset += size
            if datatype == "BYTES":
                arr = _bytes_from_binary(name, chunk, count).reshape(shape)
            else:
                if size != count * dtype.itemsize:
                    raise InvalidInput(
                        f"input {name!r}: shape {list(shape)} of {datatype} needs "
                        f"{count * dtype.itemsize} bytes, binary_data_size is {size}"
                    )
                arr = np.frombuffer(chunk, dtype=dtype, count=count).reshape(shape)
        elif "data" in item:
            arr = _from_json(name, datatype, item["data"], shape, count)
        else:
            raise InvalidInput(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        inputs.append(InputTensor(name, datatype, shape, arr, tparams))
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data follow the inputs unused")
    binary_output = params.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise InvalidInput("parameters.binary_data_output must be true or false")
    outputs: list[RequestedOutput] | None = None
    raw_outputs = doc.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise InvalidInput("'outputs' must be a list")
        outputs = []
        for i, item in enumerate(raw_outputs):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise InvalidInput(f"outputs[{i}] needs a string 'name'")
            oparams = _params(item, f"output {item['name']!r}")
            binary_flag = oparams.get("binary_data")
            if binary_flag is not None and not isinstance(binary_flag, bool):
                raise InvalidInput(f"output {item['name']!r}: binary_data must be true or false")
            k = oparams.get("classification", 0)
            if type(k) is not int or k < 0:
                raise InvalidInput(f"output {item['name']!r}: classification must be a non-negative integer")
            outputs.append(RequestedOutput(item["name"], binary_flag, k))
        outputs = outputs or None  # an empty list names no output: all of them, as when there is no list (Triton)
    return InferRequest(
        inputs=inputs,
        id=request_id,
        parameters=params,
        outputs=outputs,
        binary_output=binary_output,
    )


#: What JSON (RFC 8259) has no number for travels as these strings, which requests accept as well; the binary
#: tensor extension keeps every value exactly.
NON_FINITE_JSON = {"nan": b'"NaN"', "inf": b'"Infinity"', "-inf": b'"-Infinity"'}


def _json_data(array: np.ndarray) -> Any:
    flat = array.reshape(-1)
    if flat.dtype.kind in "OSU":
        return [x.decode("utf-8", errors="replace") if isinstance(x, bytes) else str(x) for x in flat.tolist()]
    flat = np.ascontiguousarray(flat, dtype=flat.dtype.newbyteorder("="))
    if flat.dtype.kind == "f":
        finite = np.isfinite(flat)
        if not finite.all():
            return _with_non_finite_strings(flat, finite)
    return flat


def _with_non_finite_strings(flat: np.ndarray, finite: np.ndarray) -> orjson.Fragment:
    """Float data as JSON, NaN and ±Infinity as the strings of ``NON_FINITE_JSON`` (valid JSON, unlike the tokens)."""
    names = iter([NON_FINITE_JSON[str(x)] for x in flat[~finite].tolist()])
    # orjson writes each NaN and ±Inf of an array as null, and no other value as null: fill them in order
    return orjson.Fragment(
        re.sub(rb"null", lambda _: next(names), orjson.dumps(flat, option=orjson.OPT_SERIALIZE_NUMPY))
    )


def _binary_bytes(array: np.ndarray) -> bytes:
    if array.dtype.kind in "OSU":
        parts = []
        for x in array.reshape(-1).tolist():
            b = x if isinstance(x, bytes) else str(x).encode("utf-8")
            parts.append(_LEN.pack(len(b)))
            parts.append(b)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def encode_response(response: InferResponse) -> tuple[bytes, int | None]:
    """Encode a response; returns the body and the JSON header length when binary outputs follow."""
    outputs = []
    chunks: list[bytes] = []
    for out in response.outputs:
        entry: dict[str, Any] = {
            "name": out.name,
            "datatype": v2_datatype(out.array),
            "shape": list(out.array.shape),
        }
        if out.binary:
            blob = _binary_bytes(out.array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            chunks.append(blob)
        else:
            entry["data"] = _json_data(out.array)
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id is not None:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = response.parameters
    doc["outputs"] = outputs
    head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return head, None
    return head + b"".join(chunks), len(head)


def encode_request(
    inputs: dict[str, np.ndarray], *, binary: bool = True, outputs: list[str] | None = None
) -> tuple[bytes, int | None]:
    """Encode a V2 infer request (used by the demo, the tests and the benchmarks)."""
    entries = []
    chunks = []
    for name, array in inputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": v2_datatype(array), "shape": list(array.shape)}
        if binary:
            blob = _binary_bytes(array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            chunks.append(blob)
        else:
            entry["data"] = _json_data(array)
        entries.append(entry)
    doc: dict[str, Any] = {"inputs": entries}
    if outputs is not None:
        doc["outputs"] = [{"name": n, "parameters": {"binary_data": binary}} for n in outputs]
    elif binary:
        doc["parameters"] = {"binary_data_output": True}
    head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not binary:
        return head, None
    return head + b"".join(chunks), len(head)


def decode_response(body: bytes, header_length: int | None = None) -> dict[str, np.ndarray]:
    """Decode a V2 infer response into numpy arrays by output name."""
    head = body if header_length is None else body[:header_length]
    doc = loads_json(head)
    binary = memoryview(body)[header_length or len(body) :]
    result: dict[str, np.ndarray] = {}
    offset = 0
    for out in doc["outputs"]:
        shape, count = tuple(out["shape"]), math.prod(out["shape"])
        size = out.get("parameters", {}).get("binary_data_size")
        if size is not None:
            chunk = binary[offset : offset + size]
            offset += size
            if out["datatype"] == "BYTES":
                result[out["name"]] = _bytes_from_binary(out["name"], chunk, count).reshape(shape)
            else:
                dt = numpy_dtype(out["datatype"])
                result[out["name"]] = np.frombuffer(chunk, dtype=dt, count=count).reshape(shape)
        else:
            result[out["name"]] = _from_json(out["name"], out["datatype"], out["data"], shape, count)
    return result
