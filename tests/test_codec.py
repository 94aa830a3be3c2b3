"""Unit tests of the V2 codec (engine.tensors) without a server: requests, responses, limits."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import orjson
import pytest

from engine.datatypes import V2_TO_NUMPY, v2_datatype
from engine.errors import InvalidInput, PayloadTooLarge
from engine.tensors import (
    InferResponse,
    OutputTensor,
    RequestedOutput,
    decode_request,
    decode_response,
    element_count,
    encode_request,
    encode_response,
)

ALL_DATATYPES = list(V2_TO_NUMPY)
SHAPES: list[tuple[int, ...]] = [(6,), (2, 3), (1, 2, 3), (2, 1, 3, 1), (0, 3), (3, 0, 2), ()]


def bytes_array(values: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
    """An object array of ``bytes`` (the in-memory form of BYTES)."""
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr.reshape(shape)


def sample(datatype: str, shape: tuple[int, ...], *, json_safe: bool = True) -> np.ndarray:
    """Deterministic values of ``datatype`` that exercise its range (extremes, fractions, unicode)."""
    count = math.prod(shape)
    if datatype == "BYTES":
        pool = ["", "héllo wörld", "日本語テキスト", "plain", "emoji 🚀", "tab\tand\nnewline", '"quoted"\\']
        raw = [s.encode("utf-8") for s in pool]
        if not json_safe:
            raw += [b"\xff\xfe\x00 not utf-8", b"\x00"]
        return bytes_array([raw[i % len(raw)] for i in range(count)], shape)
    dtype = V2_TO_NUMPY[datatype]
    if datatype == "BOOL":
        return (np.arange(count) % 3 == 0).reshape(shape)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        pool_i = [info.min, info.max, 0, 1, info.max // 3, info.min // 7 if info.min else 42]
        return np.array([pool_i[i % len(pool_i)] for i in range(count)], dtype=dtype).reshape(shape)
    finfo = np.finfo(dtype)
    pool_f = [0.0, -0.5, 0.1, 1 / 3, float(finfo.max), float(finfo.tiny), -float(finfo.max), 1e-3]
    return np.array([pool_f[i % len(pool_f)] for i in range(count)], dtype=dtype).reshape(shape)


def assert_same(got: np.ndarray, want: np.ndarray, datatype: str) -> None:
    assert got.dtype == V2_TO_NUMPY[datatype], (got.dtype, datatype)
    assert got.shape == want.shape
    if datatype == "BYTES":
        assert [type(x) for x in got.reshape(-1).tolist()] == [bytes] * want.size
        assert got.reshape(-1).tolist() == want.reshape(-1).tolist()
    else:
        np.testing.assert_array_equal(got, want, strict=True)


# -- encode_request -> decode_request ------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_request_round_trip(datatype: str, binary: bool, shape: tuple[int, ...]) -> None:
    array = sample(datatype, shape, json_safe=not binary)
    body, header_length = encode_request({"t": array}, binary=binary)
    assert (header_length is not None) is binary
    request = decode_request(body, header_length)
    assert len(request.inputs) == 1
    tensor = request.inputs[0]
    assert tensor.name == "t"
    assert tensor.datatype == datatype
    assert tensor.shape == shape
    assert_same(tensor.array, array, datatype)
    assert request.binary_output is binary
    assert request.nbytes == len(body)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_request_round_trip_all_datatypes_in_one_request(binary: bool) -> None:
    arrays = {f"in_{dt.lower()}": sample(dt, (2, 3), json_safe=not binary) for dt in ALL_DATATYPES}
    body, header_length = encode_request(arrays, binary=binary)
    request = decode_request(body, header_length)
    assert [t.name for t in request.inputs] == list(arrays)
    for tensor, (dt, want) in zip(request.inputs, zip(ALL_DATATYPES, arrays.values(), strict=True), strict=True):
        assert tensor.datatype == dt
        assert_same(tensor.array, want, dt)


def test_binary_request_layout_is_json_then_tensors_in_order() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = bytes_array([b"", "é".encode(), b"xyz"], (3,))
    body, header_length = encode_request({"a": a, "b": b}, binary=True)
    assert header_length is not None
    head = orjson.loads(body[:header_length])
    sizes = [e["parameters"]["binary_data_size"] for e in head["inputs"]]
    assert sizes == [24, 4 + 0 + 4 + 2 + 4 + 3]
    assert body[header_length : header_length + 24] == a.astype("<f4").tobytes()
    assert body[header_length + 24 :] == b"\x00\x00\x00\x00\x02\x00\x00\x00\xc3\xa9\x03\x00\x00\x00xyz"
    assert head["parameters"] == {"binary_data_output": True}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_encode_request_named_outputs(binary: bool) -> None:
    body, header_length = encode_request({"x": np.ones((1, 2), np.float32)}, binary=binary, outputs=["y", "z"])
    request = decode_request(body, header_length)
    assert request.outputs == [RequestedOutput("y", binary, 0), RequestedOutput("z", binary, 0)]
    assert request.binary_output is False


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize(
    ("array", "datatype"),
    [
        (np.array([[1.5, -2.0, 3.25]], dtype=">f4"), "FP32"),
        (np.array([[1, -2, 70000]], dtype=">i4"), "INT32"),
        (np.array([[1.5, 0.1]], dtype=">f8"), "FP64"),
    ],
    ids=["big-endian-fp32", "big-endian-int32", "big-endian-fp64"],
)
def test_request_round_trip_non_native_byte_order(array: np.ndarray, datatype: str, binary: bool) -> None:
    body, header_length = encode_request({"x": array}, binary=binary)
    tensor = decode_request(body, header_length).inputs[0]
    assert tensor.datatype == datatype
    assert_same(tensor.array, array.astype(V2_TO_NUMPY[datatype]), datatype)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize(
    "array",
    [np.array([[b"ab", b""], [b"c", b"def"]]), np.array([["ab", "é"], ["", "日本"]])],
    ids=["numpy-bytes-S", "numpy-str-U"],
)
def test_request_round_trip_numpy_string_dtypes(array: np.ndarray, binary: bool) -> None:
    """engine.datatypes.v2_datatype maps numpy S/U arrays to BYTES, so the codec must encode them as BYTES."""
    want = bytes_array([x if isinstance(x, bytes) else x.encode() for x in array.reshape(-1).tolist()], array.shape)
    body, header_length = encode_request({"s": array}, binary=binary)
    tensor = decode_request(body, header_length).inputs[0]
    assert tensor.datatype == "BYTES"
    assert_same(tensor.array, want, "BYTES")


# -- JSON data layout -----------------------------------------------------------------------------


def json_request(name: str, datatype: str, shape: list[int], data: Any, **extra: Any) -> bytes:
    return json.dumps(
        {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}], **extra}
    ).encode()


@pytest.mark.parametrize(
    ("datatype", "nested", "flat"),
    [
        ("FP32", [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
        ("INT64", [[1, 2, 3], [4, 5, 6]], [1, 2, 3, 4, 5, 6]),
        ("BOOL", [[True, False, True], [False, True, True]], [True, False, True, False, True, True]),
        ("BYTES", [["a", "b", "c"], ["d", "é", ""]], ["a", "b", "c", "d", "é", ""]),
    ],
)
def test_flat_and_nested_json_data_are_the_same_row_major_array(datatype: str, nested: Any, flat: Any) -> None:
    a = decode_request(json_request("x", datatype, [2, 3], nested)).inputs[0].array
    b = decode_request(json_request("x", datatype, [2, 3], flat)).inputs[0].array
    assert a.shape == b.shape == (2, 3)
    assert a.dtype == b.dtype == V2_TO_NUMPY[datatype]
    np.testing.assert_array_equal(a, b)
    assert a[1, 0] == b[1, 0]
    assert a.reshape(-1).tolist() == b.reshape(-1).tolist()


def test_three_dimensional_nested_data_is_row_major() -> None:
    nested = [[[0, 1], [2, 3], [4, 5]], [[6, 7], [8, 9], [10, 11]]]
    arr = decode_request(json_request("x", "INT32", [2, 3, 2], nested)).inputs[0].array
    np.testing.assert_array_equal(arr, np.arange(12, dtype=np.int32).reshape(2, 3, 2), strict=True)


def test_scalar_json_data_is_accepted_for_one_element() -> None:
    arr = decode_request(json_request("x", "FP64", [1], 2.5)).inputs[0].array
    np.testing.assert_array_equal(arr, np.array([2.5]), strict=True)


def test_json_non_finite_tokens_and_strings_decode_to_nan_and_inf() -> None:
    body = json_request("x", "FP32", [6], [math.nan, math.inf, -math.inf, "NaN", "Infinity", "-Infinity"])
    assert b"NaN" in body
    assert b"Infinity" in body
    arr = decode_request(body).inputs[0].array
    assert arr.dtype == np.float32
    assert np.isnan(arr[[0, 3]]).all()
    assert arr[1] == arr[4] == np.inf
    assert arr[2] == arr[5] == -np.inf


# -- request fields --------------------------------------------------------------------------------


def test_id_and_parameters_are_kept() -> None:
    params = {"priority": 3, "tag": "é", "nested": {"a": [1, 2]}, "flag": False}
    body = json.dumps(
        {
            "id": "req-42",
            "parameters": params,
            "inputs": [{"name": "x", "datatype": "INT8", "shape": [2], "data": [1, 2], "parameters": {"note": "hi"}}],
        }
    ).encode()
    request = decode_request(body)
    assert request.id == "req-42"
    assert request.parameters == params
    assert request.binary_output is False
    assert request.outputs is None
    assert request.raw is None
    assert request.inputs[0].parameters == {"note": "hi"}


def test_binary_input_parameters_are_kept() -> None:
    body, header_length = encode_request({"x": np.zeros((2, 2), np.uint16)})
    tensor = decode_request(body, header_length).inputs[0]
    assert tensor.parameters == {"binary_data_size": 8}


def test_missing_id_is_none() -> None:
    assert decode_request(json_request("x", "INT8", [1], [1])).id is None


@pytest.mark.parametrize(("value", "expected"), [(True, True), (False, False), (None, False)])
def test_binary_data_output_parameter(value: bool | None, expected: bool) -> None:
    extra: dict[str, Any] = {} if value is None else {"parameters": {"binary_data_output": value}}
    request = decode_request(json_request("x", "FP32", [1], [1.0], **extra))
    assert request.binary_output is expected


def test_per_output_binary_data_and_classification_are_parsed() -> None:
    outputs = [
        {"name": "a"},
        {"name": "b", "parameters": {"binary_data": True}},
        {"name": "c", "parameters": {"binary_data": False}},
        {"name": "d", "parameters": {"classification": 3}},
        {"name": "e", "parameters": {"binary_data": True, "classification": 1}},
    ]
    request = decode_request(
        json_request("x", "FP32", [1], [1.0], outputs=outputs, parameters={"binary_data_output": True})
    )
    assert request.binary_output is True
    assert request.outputs == [
        RequestedOutput("a", None, 0),
        RequestedOutput("b", True, 0),
        RequestedOutput("c", False, 0),
        RequestedOutput("d", None, 3),
        RequestedOutput("e", True, 1),
    ]


def test_empty_outputs_list_asks_for_every_output() -> None:
    """As in Triton: no output named, all of them, as when there is no list."""
    request = decode_request(json_request("x", "FP32", [1], [1.0], outputs=[]))
    assert request.outputs is None


@pytest.mark.parametrize("k", [-1, 1.5, True, "2", None])
def test_bad_classification_is_rejected(k: Any) -> None:
    body = json_request("x", "FP32", [1], [1.0], outputs=[{"name": "y", "parameters": {"classification": k}}])
    with pytest.raises(InvalidInput, match="classification must be a non-negative integer"):
        decode_request(body)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"outputs": {"name": "y"}}, "'outputs' must be a list"),
        ({"outputs": [{"nom": "y"}]}, r"outputs\[0\] needs a string 'name'"),
        ({"outputs": ["y"]}, r"outputs\[0\] needs a string 'name'"),
        ({"outputs": [{"name": "y", "parameters": []}]}, "output 'y': 'parameters' must be an object"),
        ({"id": 7}, "'id' must be a string"),
        ({"parameters": [1]}, "request: 'parameters' must be an object"),
    ],
)
def test_bad_request_fields_are_rejected(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode_request(json_request("x", "FP32", [1], [1.0], **extra))


# -- element_count --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "expected"),
    [([], ((), 1)), ([3], ((3,), 3)), ([2, 0, 5], ((2, 0, 5), 0)), ([4, 25], ((4, 25), 100)), ([100], ((100,), 100))],
)
def test_element_count_valid(shape: list[int], expected: tuple[tuple[int, ...], int]) -> None:
    assert element_count("x", shape, 100) == expected


@pytest.mark.parametrize(
    "shape",
    [
        [-1],
        [2, -3],
        [True],
        [2, False],
        [2.0],
        ["2"],
        [None],
        [[2]],
        (2, 3),
        "23",
        None,
        3,
        {"0": 2},
    ],
    ids=repr,
)
def test_element_count_rejects_bad_shapes(shape: Any) -> None:
    with pytest.raises(InvalidInput, match=r"input 'x': 'shape' must be a list of non-negative integers"):
        element_count("x", shape, 1000)


def test_element_count_over_limit_is_payload_too_large() -> None:
    with pytest.raises(PayloadTooLarge, match=r"input 'x': shape \[101\] has 101 elements, more than the limit of 100"):
        element_count("x", [101], 100)
    with pytest.raises(PayloadTooLarge, match="10000000000 elements"):
        element_count("x", [100_000, 100_000], 1_000_000)


def test_decode_request_checks_the_element_limit_before_reading_data() -> None:
    body = json_request("x", "FP32", [100_000, 100_000], [1.0])
    with pytest.raises(PayloadTooLarge, match="more than the limit of 1000000"):
        decode_request(body, max_elements=1_000_000)


# -- encode_response -> decode_response -------------------------------------------------------------


def response_of(outputs: list[OutputTensor], **kw: Any) -> InferResponse:
    return InferResponse("model_x", "3", outputs, **kw)


@pytest.mark.parametrize("shape", [(2, 3), (0, 3), (4,), (1, 2, 2)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_response_round_trip(datatype: str, binary: bool, shape: tuple[int, ...]) -> None:
    array = sample(datatype, shape, json_safe=not binary)
    body, header_length = encode_response(response_of([OutputTensor("y", array, binary)]))
    assert (header_length is not None) is binary
    decoded = decode_response(body, header_length)
    assert list(decoded) == ["y"]
    assert_same(decoded["y"], array, datatype)


def test_response_round_trip_mixed_binary_and_json_outputs() -> None:
    outs = [
        OutputTensor("f32_bin", sample("FP32", (2, 3)), True),
        OutputTensor("bytes_json", sample("BYTES", (3,)), False),
        OutputTensor("bytes_bin", sample("BYTES", (2, 2), json_safe=False), True),
        OutputTensor("i64_json", sample("INT64", (2, 2)), False),
        OutputTensor("u8_bin", sample("UINT8", (5,)), True),
        OutputTensor("bool_json", sample("BOOL", (1, 4)), False),
        OutputTensor("f16_bin", sample("FP16", (3,)), True),
    ]
    body, header_length = encode_response(response_of(outs, id="abc", parameters={"p": 1}))
    assert header_length is not None
    head = orjson.loads(body[:header_length])
    assert head["model_name"] == "model_x"
    assert head["model_version"] == "3"
    assert head["id"] == "abc"
    assert head["parameters"] == {"p": 1}
    assert [o["name"] for o in head["outputs"]] == [o.name for o in outs]
    for entry, out in zip(head["outputs"], outs, strict=True):
        assert ("data" in entry) is not out.binary
        assert ("parameters" in entry) is out.binary
    decoded = decode_response(body, header_length)
    assert list(decoded) == [o.name for o in outs]
    for out in outs:
        assert_same(decoded[out.name], out.array, v2_datatype(out.array))


def test_response_header_length_points_exactly_at_the_end_of_the_json() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = bytes_array([b"xy", b""], (2,))
    c = np.array([7], dtype=np.int16)
    body, header_length = encode_response(
        response_of([OutputTensor("a", a, True), OutputTensor("c", c, False), OutputTensor("b", b, True)])
    )
    assert header_length is not None
    head_bytes = body[:header_length]
    assert head_bytes.endswith(b"}")
    head = json.loads(head_bytes)  # strict stdlib parse: exactly one JSON document, nothing trailing
    sizes = [o["parameters"]["binary_data_size"] for o in head["outputs"] if "parameters" in o]
    assert sizes == [24, 4 + 2 + 4]
    assert len(body) - header_length == sum(sizes)
    assert body[header_length:] == a.tobytes() + b"\x02\x00\x00\x00xy\x00\x00\x00\x00"
    with pytest.raises(json.JSONDecodeError):
        json.loads(body[: header_length + 1])
    with pytest.raises(json.JSONDecodeError):
        json.loads(body[: header_length - 1])


def test_response_without_binary_outputs_is_plain_json() -> None:
    body, header_length = encode_response(response_of([OutputTensor("y", np.array([1, 2], np.int32))]))
    assert header_length is None
    assert orjson.loads(body) == {
        "model_name": "model_x",
        "model_version": "3",
        "outputs": [{"name": "y", "datatype": "INT32", "shape": [2], "data": [1, 2]}],
    }


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
def test_non_finite_json_outputs_survive_decode_response(datatype: str) -> None:
    values = np.array([[np.nan, np.inf], [-np.inf, 1.5]], dtype=V2_TO_NUMPY[datatype])
    other = np.array([1, 2, 3], dtype=np.uint64)
    text = bytes_array(["é".encode()], (1,))
    body, header_length = encode_response(
        response_of(
            [OutputTensor("y", values, False), OutputTensor("u", other, False), OutputTensor("s", text, False)],
            id="nf",
        )
    )
    assert header_length is None
    doc = json.loads(body, parse_constant=refuse_constant)  # RFC 8259 JSON: no NaN/Infinity tokens
    assert orjson.loads(body) == doc
    assert doc["outputs"][0]["data"] == ["NaN", "Infinity", "-Infinity", 1.5]
    decoded = decode_response(body, header_length)
    assert_same(decoded["y"], values, datatype)
    assert_same(decoded["u"], other, "UINT64")
    assert_same(decoded["s"], text, "BYTES")


def refuse_constant(token: str) -> None:
    raise AssertionError(f"{token} is not JSON")


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
def test_non_finite_json_requests_keep_their_values(datatype: str) -> None:
    values = np.array([[np.nan, 0.1], [-np.inf, np.inf]], dtype=V2_TO_NUMPY[datatype])
    body, header_length = encode_request({"x": values}, binary=False)
    doc = json.loads(body, parse_constant=refuse_constant)
    data = doc["inputs"][0]["data"]
    assert data[0] == "NaN" and data[2:] == ["-Infinity", "Infinity"]
    assert np.array(data[1], dtype=values.dtype) == values[0, 1]  # the shortest text of its own type
    assert_same(decode_request(body, header_length).inputs[0].array, values, datatype)


def test_non_finite_binary_outputs_survive_decode_response() -> None:
    values = np.array([np.nan, np.inf, -np.inf, -0.0], dtype=np.float32)
    body, header_length = encode_response(response_of([OutputTensor("y", values, True)]))
    assert header_length is not None
    decoded = decode_response(body, header_length)["y"]
    assert_same(decoded, values, "FP32")
    assert np.signbit(decoded[3])
