"""Bad requests through the real server: exact 4xx status, a V2 ``{"error": ...}`` body that names the
problem, and a server that still answers a good request afterwards."""

from __future__ import annotations

import gzip
import io
import json
import math
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest

from engine.tensors import decode_response
from tests.conftest import ServerThread

MAX_BODY = 8 * 1024 * 1024  # the session server's max_body_bytes
MAX_ELEMENTS = 1_000_000  # the session server's max_tensor_elements
WIDTH = 16  # add_sub inputs are FP32 [batch, 16]
ADD_SUB = "/v2/models/add_sub/infer"

# -- helpers --------------------------------------------------------------------------------------


def tensor(name: str, datatype: str, shape: list[Any], data: Any = None, **parameters: Any) -> dict[str, Any]:
    """One V2 input entry (``data`` omitted when None)."""
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    if data is not None:
        entry["data"] = data
    if parameters:
        entry["parameters"] = parameters
    return entry


def row(value: float = 1.0) -> list[float]:
    return [value] * WIDTH


def v2(*inputs: dict[str, Any], **extra: Any) -> bytes:
    """A JSON V2 infer request body."""
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def good_add_sub_inputs() -> list[dict[str, Any]]:
    return [tensor("INPUT0", "FP32", [1, WIDTH], row(1.0)), tensor("INPUT1", "FP32", [1, WIDTH], row(2.0))]


def binary_request(head: dict[str, Any], *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    """A binary-extension body and the header that gives the JSON length."""
    js = json.dumps(head).encode()
    return js + b"".join(blobs), {"Inference-Header-Content-Length": str(len(js))}


def error_message(status: int, content_type: str | None, body: bytes, expected: int, *fragments: str) -> str:
    assert status == expected, f"expected {expected}, got {status}: {body[:500]!r}"
    assert content_type is not None
    assert content_type.split(";")[0].strip() == "application/json", content_type
    doc = json.loads(body)
    assert isinstance(doc, dict), doc
    assert list(doc) == ["error"], doc
    message = doc["error"]
    assert isinstance(message, str)
    assert message.strip(), "the error message is empty"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def assert_error(resp: httpx.Response, status: int, *fragments: str) -> str:
    """``resp`` is exactly ``status`` with a V2 error body whose message contains every fragment."""
    return error_message(resp.status_code, resp.headers.get("content-type"), resp.content, status, *fragments)


def assert_still_serves(client: httpx.Client) -> None:
    """A good add_sub request still gets 200 and the right sum and difference."""
    rng = np.random.default_rng()
    a = rng.standard_normal((2, WIDTH)).astype(np.float32)
    b = rng.standard_normal((2, WIDTH)).astype(np.float32)
    body = v2(tensor("INPUT0", "FP32", [2, WIDTH], a.tolist()), tensor("INPUT1", "FP32", [2, WIDTH], b.tolist()))
    resp = client.post(ADD_SUB, content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == 200, resp.text
    outputs = {o["name"]: o for o in resp.json()["outputs"]}
    assert outputs["OUTPUT0"]["shape"] == [2, WIDTH]
    np.testing.assert_allclose(np.array(outputs["OUTPUT0"]["data"], np.float32).reshape(2, WIDTH), a + b, rtol=1e-6)
    np.testing.assert_allclose(np.array(outputs["OUTPUT1"]["data"], np.float32).reshape(2, WIDTH), a - b, rtol=1e-6)


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


def raw_http(server: ServerThread, head: bytes, body: bytes = b"", timeout: float = 10) -> RawResponse:
    """Send bytes on a fresh socket and read one HTTP/1.1 response (httpx cannot send these requests)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before the response headers: {data!r}"
            data += chunk
        raw_head, rest = data.split(b"\r\n\r\n", 1)
        lines = raw_head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(headers["content-length"])
        while len(rest) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed in the middle of the response body"
            rest += chunk
    return RawResponse(status, headers, rest[:length])


def assert_raw_error(resp: RawResponse, status: int, *fragments: str) -> str:
    return error_message(resp.status, resp.headers.get("content-type"), resp.body, status, *fragments)


def post(client: httpx.Client, path: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return client.post(path, content=body, headers={"Content-Type": "application/json", **(headers or {})})


def add_sub_stats(client: httpx.Client) -> dict[str, Any]:
    resp = client.get("/v2/models/add_sub/stats")
    assert resp.status_code == 200, resp.text
    (entry,) = resp.json()["model_stats"]
    assert entry["name"] == "add_sub"
    stats: dict[str, Any] = entry["inference_stats"]
    return stats


def png(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 30)).save(buf, format="JPEG")
    return buf.getvalue()


NOT_AN_IMAGE = b"\xff\xd8\xff\xe0 this is not a JPEG, only its first bytes look like one" * 4


# -- table-driven infer cases ------------------------------------------------------------------------


@dataclass
class Case:
    """One bad infer request: where it goes, what it sends and what must come back."""

    id: str
    body: bytes
    status: int
    fragments: tuple[str, ...]
    model: str = "add_sub"
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return f"/v2/models/{self.model}/infer"


def case(
    id: str, body: bytes, status: int, *fragments: str, model: str = "add_sub", headers: dict[str, str] | None = None
) -> Any:
    return pytest.param(Case(id, body, status, fragments, model, headers or {}), id=id)


def _binary(
    model: str, head: dict[str, Any], *blobs: bytes, header_length: int | str | None = None
) -> tuple[bytes, dict[str, str], str]:
    body, headers = binary_request(head, *blobs)
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)
    return body, headers, model


def bcase(
    id: str,
    status: int,
    fragments: tuple[str, ...],
    model: str,
    head: dict[str, Any],
    *blobs: bytes,
    header_length: int | str | None = None,
) -> Any:
    body, headers, model = _binary(model, head, *blobs, header_length=header_length)
    return case(id, body, status, *fragments, model=model, headers=headers)


F32x4 = np.arange(4, dtype="<f4").tobytes()  # 16 bytes, shape [1, 4]
GOOD_BINARY_HEAD = {"inputs": [tensor("x", "FP32", [1, 4], binary_data_size=16)]}
_GOOD_BINARY_LEN = len(json.dumps(GOOD_BINARY_HEAD).encode())

JSON_SHAPE_CASES = [
    # malformed JSON and bodies that are not a JSON object
    case("malformed-json-truncated", b'{"inputs": [', 400, "malformed JSON"),
    case("malformed-json-single-quotes", b"{'inputs': []}", 400, "malformed JSON"),
    case("malformed-json-trailing-garbage", v2(*good_add_sub_inputs()) + b"}", 400, "malformed JSON"),
    case("malformed-json-not-utf8", b'{"inputs": "\xff\xfe"}', 400, "malformed JSON"),
    case("malformed-json-whitespace-only", b"   \n ", 400, "malformed JSON"),
    case("json-list", b"[1, 2, 3]", 400, "must be a JSON object", "got list"),
    case("json-number", b"42", 400, "must be a JSON object", "got int"),
    case("json-string", b'"inputs"', 400, "must be a JSON object", "got str"),
    case("json-null", b"null", 400, "must be a JSON object"),
    case("json-deeply-nested", b"[" * 100_000 + b"]" * 100_000, 400, "JSON"),
    case("empty-body", b"", 400, "empty request body"),
    # request structure
    case("no-inputs-key", b"{}", 400, "non-empty 'inputs' list"),
    case("inputs-empty", b'{"inputs": []}', 400, "non-empty 'inputs' list"),
    case("inputs-not-a-list", b'{"inputs": {"name": "INPUT0"}}', 400, "non-empty 'inputs' list"),
    case("input-not-an-object", b'{"inputs": [1]}', 400, "inputs[0] must be an object"),
    case("input-without-name", v2({"datatype": "FP32", "shape": [1, 16], "data": row()}), 400, "inputs[0]", "'name'"),
    case(
        "input-without-datatype",
        v2({"name": "INPUT0", "shape": [1, 16], "data": row()}),
        400,
        "'INPUT0'",
        "'datatype'",
    ),
    case("input-without-shape", v2({"name": "INPUT0", "datatype": "FP32", "data": row()}), 400, "'INPUT0'", "'shape'"),
    case(
        "input-without-data",
        v2(tensor("INPUT0", "FP32", [1, WIDTH]), tensor("INPUT1", "FP32", [1, WIDTH], row())),
        400,
        "'INPUT0' has neither 'data' nor parameters.binary_data_size",
    ),
    case("id-not-a-string", v2(*good_add_sub_inputs(), id=12), 400, "'id' must be a string"),
    case("parameters-not-an-object", v2(*good_add_sub_inputs(), parameters=[1]), 400, "'parameters' must be an object"),
    case("outputs-not-a-list", v2(*good_add_sub_inputs(), outputs="OUTPUT0"), 400, "'outputs' must be a list"),
]

SIGNATURE_CASES = [
    case(
        "missing-input", v2(tensor("INPUT0", "FP32", [1, WIDTH], row())), 400, "missing input(s) ['INPUT1']", "add_sub"
    ),
    case(
        "extra-unknown-input",
        v2(*good_add_sub_inputs(), tensor("INPUT2", "FP32", [1, WIDTH], row())),
        400,
        "no input 'INPUT2'",
        "expected inputs: ['INPUT0', 'INPUT1']",
    ),
    case(
        "duplicated-input",
        v2(*good_add_sub_inputs(), tensor("INPUT0", "FP32", [1, WIDTH], row(5.0))),
        400,
        "input 'INPUT0' appears twice",
    ),
    case(
        "wrong-datatype-int32-for-fp32",
        v2(tensor("INPUT0", "INT32", [1, WIDTH], [1] * WIDTH), tensor("INPUT1", "FP32", [1, WIDTH], row())),
        400,
        "input 'INPUT0'",
        "expected datatype FP32, got INT32",
    ),
    case(
        "wrong-datatype-fp64-for-fp32",
        v2(tensor("INPUT0", "FP32", [1, WIDTH], row()), tensor("INPUT1", "FP64", [1, WIDTH], row())),
        400,
        "input 'INPUT1'",
        "expected datatype FP32, got FP64",
    ),
    case(
        "unknown-datatype",
        v2(tensor("INPUT0", "FLOAT32", [1, WIDTH], row()), tensor("INPUT1", "FP32", [1, WIDTH], row())),
        400,
        "unsupported datatype 'FLOAT32'",
        "FP32",
    ),
    case(
        "lowercase-datatype",
        v2(tensor("INPUT0", "fp32", [1, WIDTH], row()), tensor("INPUT1", "FP32", [1, WIDTH], row())),
        400,
        "unsupported datatype 'fp32'",
    ),
    case(
        "datatype-not-a-string",
        v2(tensor("INPUT0", 32, [1, WIDTH], row()), tensor("INPUT1", "FP32", [1, WIDTH], row())),
        400,
        "input 'INPUT0' needs a string 'datatype'",
    ),
    case(
        "wrong-rank-1d",
        v2(tensor("INPUT0", "FP32", [WIDTH], row()), tensor("INPUT1", "FP32", [1, WIDTH], row())),
        400,
        "input 'INPUT0'",
        "expected rank 2",
        "got shape [16]",
    ),
    case(
        "wrong-rank-3d",
        v2(tensor("INPUT0", "FP32", [1, 1, WIDTH], row()), tensor("INPUT1", "FP32", [1, WIDTH], row())),
        400,
        "input 'INPUT0'",
        "expected rank 2",
    ),
    case(
        "wrong-dimension-add-sub",
        v2(tensor("INPUT0", "FP32", [1, 8], [1.0] * 8), tensor("INPUT1", "FP32", [1, WIDTH], row())),
        400,
        "input 'INPUT0'",
        "dimension 1 must be 16",
    ),
    case(
        "fixed-wrong-dim0",
        v2(tensor("x", "FP32", [3, 3], [1.0] * 9)),
        400,
        "input 'x'",
        "dimension 0 must be 2",
        "[2, 3]",
        model="fixed",
    ),
    case(
        "fixed-wrong-dim1",
        v2(tensor("x", "FP32", [2, 4], [1.0] * 8)),
        400,
        "input 'x'",
        "dimension 1 must be 3",
        model="fixed",
    ),
    case(
        "fixed-transposed",
        v2(tensor("x", "FP32", [3, 2], [1.0] * 6)),
        400,
        "input 'x'",
        "dimension 0 must be 2",
        model="fixed",
    ),
    case(
        "fixed-wrong-rank",
        v2(tensor("x", "FP32", [6], [1.0] * 6)),
        400,
        "input 'x'",
        "expected rank 2",
        model="fixed",
    ),
    case(
        "unknown-output",
        v2(*good_add_sub_inputs(), outputs=[{"name": "OUTPUT0"}, {"name": "OUTPUT9"}]),
        400,
        "no output 'OUTPUT9'",
        "OUTPUT0",
    ),
    case(
        "bad-classification-parameter",
        v2(*good_add_sub_inputs(), outputs=[{"name": "OUTPUT0", "parameters": {"classification": -2}}]),
        400,
        "'OUTPUT0'",
        "classification",
    ),
]

DATA_CASES = [
    case(
        "too-few-elements",
        v2(tensor("INPUT0", "FP32", [1, WIDTH], [1.0] * 15), tensor("INPUT1", "FP32", [1, WIDTH], row())),
        400,
        "input 'INPUT0'",
        "needs 16 elements, data has 15",
    ),
    case(
        "too-many-elements",
        v2(tensor("INPUT0", "FP32", [1, WIDTH], row()), tensor("INPUT1", "FP32", [1, WIDTH], [1.0] * 17)),
        400,
        "input 'INPUT1'",
        "needs 16 elements, data has 17",
    ),
    case(
        "nested-data-wrong-count",
        v2(tensor("INPUT0", "FP32", [2, WIDTH], [row(), row()]), tensor("INPUT1", "FP32", [2, WIDTH], [row()])),
        400,
        "input 'INPUT1'",
        "needs 32 elements, data has 16",
    ),
    case(
        "ragged-nested-data",
        v2(
            tensor("INPUT0", "FP32", [2, WIDTH], [row(), [1.0] * (WIDTH - 1)]),
            tensor("INPUT1", "FP32", [2, WIDTH], [row(), row()]),
        ),
        400,
        "input 'INPUT0'",
        "does not fit datatype FP32",
    ),
    case(
        "ragged-nested-bytes",
        v2(tensor("x", "BYTES", [2, 2], [["a", "b"], ["c"]])),
        400,
        "input 'x'",
        "needs 4 elements, data has 3",
        model="identity_bytes",
    ),
    case(
        "string-in-fp32-data",
        v2(tensor("INPUT0", "FP32", [1, WIDTH], ["one", *row()[1:]]), tensor("INPUT1", "FP32", [1, WIDTH], row())),
        400,
        "input 'INPUT0'",
        "does not fit datatype FP32",
        "one",
    ),
    case(
        "object-in-fp32-data",
        v2(tensor("INPUT0", "FP32", [1, WIDTH], [{"v": 1}, *row()[1:]]), tensor("INPUT1", "FP32", [1, WIDTH], row())),
        400,
        "input 'INPUT0'",
        "does not fit datatype FP32",
    ),
    case(
        "uint8-300",
        v2(tensor("x", "UINT8", [1, 3], [1, 300, 2])),
        400,
        "input 'x'",
        "does not fit datatype UINT8",
        "300",
        model="identity_uint8",
    ),
    case(
        "uint8-negative",
        v2(tensor("x", "UINT8", [1, 2], [-1, 2])),
        400,
        "input 'x'",
        "does not fit datatype UINT8",
        model="identity_uint8",
    ),
    case(
        "int8-128",
        v2(tensor("x", "INT8", [1, 2], [127, 128])),
        400,
        "input 'x'",
        "does not fit datatype INT8",
        model="identity_int8",
    ),
    case(
        "int16-overflow",
        v2(tensor("x", "INT16", [1, 1], [40000])),
        400,
        "does not fit datatype INT16",
        model="identity_int16",
    ),
    case(
        "int64-2-pow-63",
        v2(tensor("x", "INT64", [1, 1], [2**63])),
        400,
        "does not fit datatype INT64",
        model="identity_int64",
    ),
    case(
        "uint64-2-pow-64",
        v2(tensor("x", "UINT64", [1, 1], [2**64])),
        400,
        "does not fit datatype UINT64",
        model="identity_uint64",
    ),
    case(
        "bool-ints",
        v2(tensor("x", "BOOL", [1, 2], [1, 0])),
        400,
        "input 'x'",
        "BOOL data must hold true/false values",
        model="identity_bool",
    ),
    case(
        "bool-strings",
        v2(tensor("x", "BOOL", [1, 2], ["true", "false"])),
        400,
        "input 'x'",
        "BOOL data must hold true/false values",
        model="identity_bool",
    ),
    case(
        "bool-mixed-with-int",
        v2(tensor("x", "BOOL", [1, 2], [True, 1])),
        400,
        "BOOL data must hold true/false values",
        model="identity_bool",
    ),
    case(
        "bool-null",
        v2(tensor("x", "BOOL", [1, 2], [True, None])),
        400,
        "BOOL data must hold true/false values",
        model="identity_bool",
    ),
    case(
        "bytes-with-numbers",
        v2(tensor("x", "BYTES", [1, 2], ["a", 2])),
        400,
        "input 'x'",
        "BYTES data must hold strings, got int",
        model="identity_bytes",
    ),
    case(
        "negative-dimension",
        v2(tensor("INPUT0", "FP32", [-1, WIDTH], row()), tensor("INPUT1", "FP32", [1, WIDTH], row())),
        400,
        "input 'INPUT0'",
        "'shape' must be a list of non-negative integers",
    ),
    case(
        "float-dimension",
        v2(tensor("INPUT0", "FP32", [1.0, WIDTH], row()), tensor("INPUT1", "FP32", [1, WIDTH], row())),
        400,
        "'shape' must be a list of non-negative integers",
    ),
    case(
        "zero-elements-huge-dimensions",
        v2(tensor("x", "FP32", [0, 2**40, 2**40], [])),
        400,
        "input 'x'",
        model="identity_fp32",
    ),
    case(
        "more-than-64-dimensions",
        v2(tensor("x", "FP32", [1] * 65, [1.0])),
        400,
        "input 'x'",
        model="identity_fp32",
    ),
    bcase(
        "binary-more-than-64-dimensions",
        400,
        ("input 'x'",),
        "identity_fp32",
        {"inputs": [tensor("x", "FP32", [1] * 65, binary_data_size=4)]},
        b"\x00" * 4,
    ),
]

BINARY_CASES = [
    bcase(
        "header-length-larger-than-body",
        400,
        ("Inference-Header-Content-Length", "outside the body"),
        "identity_fp32",
        GOOD_BINARY_HEAD,
        F32x4,
        header_length=_GOOD_BINARY_LEN + 16 + 1,
    ),
    bcase(
        "header-length-not-an-integer",
        400,
        ("Inference-Header-Content-Length must be an integer", "'abc'"),
        "identity_fp32",
        GOOD_BINARY_HEAD,
        F32x4,
        header_length="abc",
    ),
    bcase(
        "header-length-float",
        400,
        ("Inference-Header-Content-Length must be an integer", "'12.5'"),
        "identity_fp32",
        GOOD_BINARY_HEAD,
        F32x4,
        header_length="12.5",
    ),
    bcase(
        "header-length-negative",
        400,
        ("Inference-Header-Content-Length must not be negative",),
        "identity_fp32",
        GOOD_BINARY_HEAD,
        F32x4,
        header_length=-5,
    ),
    bcase(
        "header-length-cuts-the-json",
        400,
        ("malformed JSON",),
        "identity_fp32",
        GOOD_BINARY_HEAD,
        F32x4,
        header_length=_GOOD_BINARY_LEN - 3,
    ),
    bcase(
        "binary-data-truncated",
        400,
        ("input 'x'", "binary_data_size 16 but only 8 bytes"),
        "identity_fp32",
        GOOD_BINARY_HEAD,
        F32x4[:8],
    ),
    bcase(
        "binary-size-not-shape-times-itemsize",
        400,
        ("input 'x'", "needs 16 bytes, binary_data_size is 12"),
        "identity_fp32",
        {"inputs": [tensor("x", "FP32", [1, 4], binary_data_size=12)]},
        F32x4[:12],
    ),
    bcase(
        "binary-size-for-wrong-itemsize",
        400,
        ("input 'x'", "FP64 needs 32 bytes, binary_data_size is 16"),
        "identity_fp64",
        {"inputs": [tensor("x", "FP64", [1, 4], binary_data_size=16)]},
        F32x4,
    ),
    bcase(
        "binary-leftover-bytes",
        400,
        ("4 bytes of binary data follow the inputs unused",),
        "identity_fp32",
        GOOD_BINARY_HEAD,
        F32x4,
        b"\x00" * 4,
    ),
    bcase(
        "binary-size-negative",
        400,
        ("input 'x'", "binary_data_size must be a non-negative integer"),
        "identity_fp32",
        {"inputs": [tensor("x", "FP32", [1, 4], binary_data_size=-16)]},
        F32x4,
    ),
    bcase(
        "binary-size-not-an-integer",
        400,
        ("input 'x'", "binary_data_size must be a non-negative integer"),
        "identity_fp32",
        {"inputs": [tensor("x", "FP32", [1, 4], binary_data_size="16")]},
        F32x4,
    ),
    bcase(
        "bytes-length-prefix-past-end",
        400,
        ("input 'x'", "BYTES element 1 declares 100 bytes, 3 remain"),
        "identity_bytes",
        {"inputs": [tensor("x", "BYTES", [1, 2], binary_data_size=4 + 2 + 4 + 3)]},
        struct.pack("<I", 2) + b"ok" + struct.pack("<I", 100) + b"abc",
    ),
    bcase(
        "bytes-length-prefix-truncated",
        400,
        ("input 'x'", "BYTES element 0 is truncated"),
        "identity_bytes",
        {"inputs": [tensor("x", "BYTES", [1, 1], binary_data_size=2)]},
        b"\x01\x00",
    ),
    bcase(
        "bytes-fewer-elements-than-shape",
        400,
        ("input 'x'", "BYTES element 2 is truncated"),
        "identity_bytes",
        {"inputs": [tensor("x", "BYTES", [1, 3], binary_data_size=10)]},
        struct.pack("<I", 1) + b"a" + struct.pack("<I", 1) + b"b",
    ),
    bcase(
        "bytes-leftover-inside-chunk",
        400,
        ("input 'x'", "2 bytes left over after 1 BYTES elements"),
        "identity_bytes",
        {"inputs": [tensor("x", "BYTES", [1, 1], binary_data_size=7)]},
        struct.pack("<I", 1) + b"a" + b"zz",
    ),
    bcase(
        "raw-tensor-to-two-input-model",
        400,
        ("raw body needs a model with exactly one input", "'add_sub' has 2"),
        "add_sub",
        {},
        header_length=0,
    ),
    case(
        "raw-tensor-wrong-size",
        b"\x00" * 20,
        400,
        "raw body of 20 bytes",
        "input 'x' [2, 3] needs 24",
        model="fixed",
        headers={"Inference-Header-Content-Length": "0", "Content-Type": "application/octet-stream"},
    ),
    case(
        "raw-tensor-variable-dimensions",
        F32x4,
        400,
        "needs fixed dimensions",
        "'x'",
        model="identity_fp32",
        headers={"Inference-Header-Content-Length": "0"},
    ),
]

IMAGE_CASES = [
    case(
        "raw-jpeg-not-an-image",
        NOT_AN_IMAGE,
        400,
        "input 'image'",
        "could not decode image",
        model="tiny_classifier",
        headers={"Content-Type": "image/jpeg"},
    ),
    case(
        "raw-truncated-jpeg",
        jpeg(40, 30)[:300],
        400,
        "input 'image'",
        "could not decode image",
        model="tiny_classifier",
        headers={"Content-Type": "image/jpeg"},
    ),
    case(
        "raw-octet-stream-not-an-image",
        NOT_AN_IMAGE,
        400,
        "could not decode image",
        model="tiny_classifier",
        headers={"Content-Type": "application/octet-stream"},
    ),
    case(
        "bytes-tensor-not-an-image",
        v2(tensor("image", "BYTES", [1], [NOT_AN_IMAGE.decode("latin-1")])),
        400,
        "input 'image'",
        "could not decode image",
        model="tiny_classifier",
    ),
    bcase(
        "binary-bytes-tensor-not-an-image",
        400,
        ("input 'image'", "could not decode image"),
        "tiny_classifier",
        {"inputs": [tensor("image", "BYTES", [1], binary_data_size=4 + len(NOT_AN_IMAGE))]},
        struct.pack("<I", len(NOT_AN_IMAGE)) + NOT_AN_IMAGE,
    ),
    case(
        "image-over-pixel-limit",
        png(2000, 1000),
        413,
        "input 'image'",
        "2000x1000 pixels exceeds the limit of 1000000",
        model="tiny_classifier",
        headers={"Content-Type": "image/png"},
    ),
    case(
        "raw-image-to-model-without-preprocessing",
        jpeg(16, 16),
        400,
        "model 'mlp' declares no image pre-processing",
        model="mlp",
        headers={"Content-Type": "image/jpeg"},
    ),
    case(
        "raw-octet-stream-to-model-without-preprocessing",
        NOT_AN_IMAGE,
        400,
        "model 'mlp' declares no image pre-processing",
        model="mlp",
        headers={"Content-Type": "application/octet-stream"},
    ),
]


@pytest.mark.parametrize("bad", JSON_SHAPE_CASES + SIGNATURE_CASES + DATA_CASES + BINARY_CASES + IMAGE_CASES)
def test_bad_infer_request(client: httpx.Client, bad: Case) -> None:
    headers = {"Content-Type": "application/json", **bad.headers}
    resp = client.post(bad.path, content=bad.body, headers=headers)
    assert_error(resp, bad.status, *bad.fragments)
    assert_still_serves(client)


def test_good_requests_of_the_same_shape_succeed(client: httpx.Client) -> None:
    """Positive controls for the table above: the same models accept well-formed requests."""
    body, headers = binary_request(GOOD_BINARY_HEAD, F32x4)
    resp = client.post("/v2/models/identity_fp32/infer", content=body, headers=headers)
    assert resp.status_code == 200, resp.text
    np.testing.assert_array_equal(resp.json()["outputs"][0]["data"], [0.0, 1.0, 2.0, 3.0])
    resp = post(client, "/v2/models/fixed/infer", v2(tensor("x", "FP32", [2, 3], [1.0] * 6)))
    assert resp.status_code == 200, resp.text
    assert resp.json()["outputs"][0]["data"] == [2.0] * 6
    resp = client.post("/v2/models/tiny_classifier/infer", content=png(16, 16), headers={"Content-Type": "image/png"})
    assert resp.status_code == 200, resp.text
    resp = post(client, "/v2/models/identity_uint8/infer", v2(tensor("x", "UINT8", [1, 3], [0, 255, 7])))
    assert resp.status_code == 200, resp.text
    assert resp.json()["outputs"][0]["data"] == [0, 255, 7]
    resp = post(client, "/v2/models/identity_fp32/infer", v2(tensor("x", "FP32", [0, 3], [])))
    assert resp.status_code == 200, resp.text
    assert resp.json()["outputs"][0]["shape"] == [0, 3]
    assert_still_serves(client)


# -- model names and versions in the URL ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "status", "fragments"),
    [
        ("no_such_model", 404, ("unknown model 'no_such_model'",)),
        ("m" * 128, 404, ("unknown model",)),  # longest legal name: valid, just absent
        ("m" * 129, 400, ("invalid model name",)),
        ("a..b", 400, ("invalid model name 'a..b'", "'..'")),
        ("add_sub..", 400, ("invalid model name",)),
        ("%2E%2E", 400, ("invalid model name '..'",)),
        ("bad$name", 400, ("invalid model name 'bad$name'",)),
        ("bad%20name", 400, ("invalid model name 'bad name'",)),
        ("mod%C3%A8l", 400, ("invalid model name",)),
        ("-leading-dash", 400, ("invalid model name",)),
        ("_leading_underscore", 400, ("invalid model name",)),
        (".hidden", 400, ("invalid model name",)),
        ("semi;colon", 400, ("invalid model name",)),
    ],
)
def test_bad_model_name(client: httpx.Client, name: str, status: int, fragments: tuple[str, ...]) -> None:
    resp = post(client, f"/v2/models/{name}/infer", v2(*good_add_sub_inputs()))
    assert_error(resp, status, *fragments)
    resp = client.get(f"/v2/models/{name}")
    assert_error(resp, status, *fragments)
    assert_still_serves(client)


@pytest.mark.parametrize("name", ["a%2Fb", "add_sub%2F..%2Fmlp", "..%2F..%2Fetc%2Fpasswd", "%2F", "add_sub%2F"])
def test_model_name_with_encoded_slash_is_a_client_error(client: httpx.Client, name: str) -> None:
    resp = post(client, f"/v2/models/{name}/infer", v2(*good_add_sub_inputs()))
    assert 400 <= resp.status_code < 500, resp.text
    assert_error(resp, resp.status_code)
    assert_still_serves(client)


def test_dot_dot_path_segment_sent_verbatim(server: ServerThread, client: httpx.Client) -> None:
    """httpx folds ``/models/../infer`` away, so send the literal path on a socket."""
    body = v2(*good_add_sub_inputs())
    head = (
        f"POST /v2/models/../infer HTTP/1.1\r\nHost: {server.host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    assert_raw_error(raw_http(server, head, body), 400, "invalid model name '..'")
    assert_still_serves(client)


@pytest.mark.parametrize(
    ("model", "version", "status", "fragments"),
    [
        ("versioned", "3", 404, ("model 'versioned' has no loaded version 3", "[1, 2]")),
        ("add_sub", "2", 404, ("model 'add_sub' has no loaded version 2",)),
        ("versioned", "999999999999", 404, ("no loaded version 999999999999",)),
        ("versioned", "0", 400, ("invalid model version '0'",)),
        ("versioned", "abc", 400, ("invalid model version 'abc'",)),
        ("versioned", "-1", 400, ("invalid model version '-1'",)),
        ("versioned", "1.0", 400, ("invalid model version '1.0'",)),
    ],
)
def test_bad_model_version(
    client: httpx.Client, model: str, version: str, status: int, fragments: tuple[str, ...]
) -> None:
    body = v2(tensor("x", "FP32", [1, 4], [1.0] * 4)) if model == "versioned" else v2(*good_add_sub_inputs())
    resp = post(client, f"/v2/models/{model}/versions/{version}/infer", body)
    assert_error(resp, status, *fragments)
    assert_error(client.get(f"/v2/models/{model}/versions/{version}"), status, *fragments)
    assert_still_serves(client)


def test_known_versions_still_answer(client: httpx.Client) -> None:
    body = v2(tensor("x", "FP32", [1, 4], [1.0] * 4))
    for version, added in (("1", 1.0), ("2", 2.0)):
        resp = post(client, f"/v2/models/versioned/versions/{version}/infer", body)
        assert resp.status_code == 200, resp.text
        assert resp.json()["outputs"][0]["data"] == [1.0 + added] * 4


# -- limits ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize(("model", "datatype"), [("identity_fp32", "FP32"), ("identity_bytes", "BYTES")])
def test_declared_shape_over_element_limit_is_rejected_before_allocating(
    client: httpx.Client, model: str, datatype: str, binary: bool
) -> None:
    shape = [100_000, 100_000]  # 1e10 elements: 40 GB of FP32 if anything tried to allocate it
    if binary:
        body, headers = binary_request({"inputs": [tensor("x", datatype, shape, binary_data_size=4)]}, b"\x00" * 4)
    else:
        body, headers = v2(tensor("x", datatype, shape, [1.0] if datatype == "FP32" else ["a"])), {}
    start = time.perf_counter()
    resp = post(client, f"/v2/models/{model}/infer", body, headers)
    elapsed = time.perf_counter() - start
    assert_error(resp, 413, "input 'x'", "10000000000 elements", f"limit of {MAX_ELEMENTS}")
    assert elapsed < 2.0, f"413 took {elapsed:.2f} s: the shape was not checked before allocating"
    assert_still_serves(client)


def test_element_limit_counts_each_input(client: httpx.Client) -> None:
    rows = MAX_ELEMENTS // WIDTH + 1  # one row more than fits
    body, headers = binary_request(
        {"inputs": [tensor("INPUT0", "FP32", [rows, WIDTH], binary_data_size=4), *good_add_sub_inputs()[1:]]},
        b"\x00" * 4,
    )
    assert_error(post(client, ADD_SUB, body, headers), 413, "input 'INPUT0'", f"{rows * WIDTH} elements")
    assert_still_serves(client)


def test_body_over_limit_with_content_length_is_refused_before_reading(
    server: ServerThread, client: httpx.Client
) -> None:
    """A declared Content-Length over the limit is answered 413 without the body being sent."""
    head = (
        f"POST {ADD_SUB} HTTP/1.1\r\nHost: {server.host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {MAX_BODY + 1}\r\nConnection: close\r\n\r\n"
    ).encode()
    resp = raw_http(server, head, b'{"inputs": [')
    assert_raw_error(resp, 413, f"request body of {MAX_BODY + 1} bytes exceeds the limit of {MAX_BODY} bytes")
    assert_still_serves(client)


def test_body_over_limit_with_content_length_sent_in_full(client: httpx.Client) -> None:
    body = b" " * (MAX_BODY + 1)
    resp = post(client, ADD_SUB, body)
    assert resp.request.headers["content-length"] == str(MAX_BODY + 1)
    assert_error(resp, 413, f"exceeds the limit of {MAX_BODY} bytes")
    assert_still_serves(client)


def test_chunked_body_over_limit_without_content_length(client: httpx.Client) -> None:
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        block = b" " * (1024 * 1024)
        for _ in range(MAX_BODY // len(block)):
            sent += len(block)
            yield block
        sent += 1
        yield b" "

    resp = client.post(ADD_SUB, content=chunks(), headers={"Content-Type": "application/json"})
    assert resp.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in resp.request.headers
    assert sent == MAX_BODY + 1
    assert_error(resp, 413, f"request body exceeds the limit of {MAX_BODY} bytes")
    assert_still_serves(client)


def test_chunked_body_under_limit_is_accepted(client: httpx.Client) -> None:
    body = v2(*good_add_sub_inputs())

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 7):
            yield body[i : i + 7]

    resp = client.post(ADD_SUB, content=chunks(), headers={"Content-Type": "application/json"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["outputs"][0]["data"] == [3.0] * WIDTH


# -- content encoding -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "body", "status", "fragments"),
    [
        ("gzip", b"this is not gzip data at all", 400, ("could not inflate the gzip body",)),
        ("gzip", gzip.compress(v2(*good_add_sub_inputs()))[:10] + b"\x00garbage" * 8, 400, ("gzip",)),
        ("gzip", zlib.compress(v2(*good_add_sub_inputs())), 400, ("could not inflate the gzip body",)),
        ("gzip", gzip.compress(v2(*good_add_sub_inputs()))[:-8], 400, ("gzip",)),  # trailer (CRC, size) cut off
        ("deflate", b"\x00\x01\x02 not deflate", 400, ("could not inflate the deflate body",)),
        ("gzip", gzip.compress(b" " * (MAX_BODY + 1)), 413, ("inflated body exceeds the limit",)),
        ("br", b"\x0b\x02\x80hello", 400, ("unsupported Content-Encoding 'br'", "gzip")),
        ("compress", b"x", 400, ("unsupported Content-Encoding 'compress'",)),
        ("gzip, deflate", gzip.compress(b"{}"), 400, ("unsupported Content-Encoding 'gzip, deflate'",)),
    ],
    ids=[
        "gzip-garbage",
        "gzip-corrupt-stream",
        "gzip-header-is-zlib",
        "gzip-truncated-trailer",
        "deflate-garbage",
        "gzip-bomb",
        "br-unsupported",
        "compress-unsupported",
        "stacked-encodings",
    ],
)
def test_bad_content_encoding(
    client: httpx.Client, encoding: str, body: bytes, status: int, fragments: tuple[str, ...]
) -> None:
    resp = post(client, ADD_SUB, body, {"Content-Encoding": encoding})
    assert_error(resp, status, *fragments)
    assert_still_serves(client)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "identity"])
def test_good_content_encoding_is_accepted(client: httpx.Client, encoding: str) -> None:
    body = v2(*good_add_sub_inputs())
    packed = {"gzip": gzip.compress, "deflate": zlib.compress, "identity": bytes}[encoding](body)
    resp = post(client, ADD_SUB, packed, {"Content-Encoding": encoding})
    assert resp.status_code == 200, resp.text
    assert resp.json()["outputs"][0]["data"] == [3.0] * WIDTH


# -- NaN and Inf pass through ---------------------------------------------------------------------------

NON_FINITE = [math.nan, math.inf, -math.inf, 1.5, -0.0, 3.4e38]


def assert_non_finite_equal(got: np.ndarray, dtype: str) -> None:
    want = np.array(NON_FINITE, dtype=dtype)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got.reshape(-1), want)  # NaN positions compare equal
    assert np.signbit(got.reshape(-1)[4])


def test_nan_inf_pass_through_binary(client: httpx.Client) -> None:
    x = np.array([NON_FINITE], dtype="<f4")
    body, headers = binary_request(
        {"inputs": [tensor("x", "FP32", [1, 6], binary_data_size=24)], "parameters": {"binary_data_output": True}},
        x.tobytes(),
    )
    resp = client.post("/v2/models/identity_fp32/infer", content=body, headers=headers)
    assert resp.status_code == 200, resp.text
    length = int(resp.headers["inference-header-content-length"])
    assert resp.headers["content-type"] == "application/octet-stream"
    assert len(resp.content) == length + 24
    assert resp.content[length:] == x.tobytes()
    assert_non_finite_equal(decode_response(resp.content, length)["y"], "<f4")


@pytest.mark.parametrize(
    ("model", "datatype", "dtype"), [("identity_fp32", "FP32", "<f4"), ("identity_fp64", "FP64", "<f8")]
)
def test_nan_inf_pass_through_json_tokens(client: httpx.Client, model: str, datatype: str, dtype: str) -> None:
    """Python's json writes NaN / Infinity / -Infinity tokens; the server accepts them and answers likewise."""
    body = v2(tensor("x", datatype, [1, 6], NON_FINITE))
    assert b"NaN" in body
    assert b"-Infinity" in body
    resp = post(client, f"/v2/models/{model}/infer", body)
    assert resp.status_code == 200, resp.text
    assert b"NaN" in resp.content
    assert b"-Infinity" in resp.content
    (out,) = json.loads(resp.content)["outputs"]
    assert out["datatype"] == datatype
    assert out["shape"] == [1, 6]
    assert_non_finite_equal(np.array(out["data"], dtype=dtype), dtype)
    assert_non_finite_equal(decode_response(resp.content)["y"], dtype)


def test_nan_inf_pass_through_json_strings(client: httpx.Client) -> None:
    data = ["NaN", "Infinity", "-Infinity", 1.5, -0.0, 3.4e38]
    resp = post(client, "/v2/models/identity_fp32/infer", v2(tensor("x", "FP32", [1, 6], data)))
    assert resp.status_code == 200, resp.text
    assert_non_finite_equal(decode_response(resp.content)["y"], "<f4")


def test_nan_inf_pass_through_json_in_binary_out(client: httpx.Client) -> None:
    body = v2(tensor("x", "FP32", [1, 6], NON_FINITE), parameters={"binary_data_output": True})
    resp = post(client, "/v2/models/identity_fp32/infer", body)
    assert resp.status_code == 200, resp.text
    length = int(resp.headers["inference-header-content-length"])
    assert_non_finite_equal(decode_response(resp.content, length)["y"], "<f4")


def test_nan_inf_through_add_sub(client: httpx.Client) -> None:
    a = [math.nan, math.inf, -math.inf, *row()[3:]]
    resp = post(
        client, ADD_SUB, v2(tensor("INPUT0", "FP32", [1, WIDTH], a), tensor("INPUT1", "FP32", [1, WIDTH], row()))
    )
    assert resp.status_code == 200, resp.text
    out = decode_response(resp.content)
    np.testing.assert_array_equal(out["OUTPUT0"][0, :4], np.array([math.nan, math.inf, -math.inf, 2.0], np.float32))
    assert_still_serves(client)


# -- routes and methods ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", "/v2/nope"),
        ("GET", "/v3/models/add_sub"),
        ("POST", "/v2/models/add_sub/infer/extra"),
        ("POST", "/v2/models/add_sub/versions/1/infer/more"),
        ("GET", "/v2/health/unknown"),
        ("POST", "/v2/models/add_sub/predict"),
    ],
)
def test_unknown_route_is_404(client: httpx.Client, method: str, path: str) -> None:
    resp = client.request(method, path, content=v2(*good_add_sub_inputs()) if method == "POST" else None)
    assert_error(resp, 404, "Not Found")
    assert_still_serves(client)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", ADD_SUB),
        ("PUT", ADD_SUB),
        ("DELETE", "/v2/models/add_sub"),
        ("POST", "/v2/health/live"),
        ("POST", "/v2/models/add_sub"),
        ("GET", "/v2/repository/index"),
        ("PATCH", "/v2"),
    ],
)
def test_wrong_method_is_405(client: httpx.Client, method: str, path: str) -> None:
    resp = client.request(method, path)
    assert_error(resp, 405, "Method Not Allowed")
    assert_still_serves(client)


def test_405_names_the_allowed_methods(client: httpx.Client) -> None:
    """RFC 9110 section 15.5.6: a 405 response must carry an Allow header."""
    resp = client.get(ADD_SUB)
    assert_error(resp, 405, "Method Not Allowed")
    assert resp.headers.get("allow") == "POST"


# -- statistics -----------------------------------------------------------------------------------------


def test_failures_are_counted_in_stats(client: httpx.Client) -> None:
    """Bad add_sub requests that reach the model show up in inference_stats.fail (read before, compare after)."""
    before = add_sub_stats(client)
    bad_bodies = [
        b'{"inputs": [',  # malformed JSON
        b"[1, 2]",  # not an object
        v2(tensor("INPUT0", "FP32", [1, WIDTH], row())),  # missing input
        v2(*good_add_sub_inputs(), tensor("INPUT0", "FP32", [1, WIDTH], row())),  # duplicated input
        v2(tensor("INPUT0", "INT32", [1, WIDTH], [1] * WIDTH), good_add_sub_inputs()[1]),  # wrong datatype
        v2(*good_add_sub_inputs(), outputs=[{"name": "NOPE"}]),  # unknown output
    ]
    for body in bad_bodies:
        assert_error(post(client, ADD_SUB, body), 400)
    good = 3
    for _ in range(good):
        assert_still_serves(client)
    after = add_sub_stats(client)
    assert after["fail"]["count"] > 0
    assert after["fail"]["count"] - before["fail"]["count"] >= len(bad_bodies)
    assert after["fail"]["ns"] > before["fail"]["ns"]
    assert after["success"]["count"] - before["success"]["count"] >= good
