"""Bad requests through the real server, continued: the binary tensor extension, raw tensor bodies, size and
element limits, and Content-Encoding. Each gets an exact 4xx status and a V2 ``{"error": ...}`` body that names
the problem, and the server still answers a good request afterwards."""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.badinput import (
    ADD_SUB,
    GOOD_BINARY_HEAD,
    MAX_BODY,
    MAX_ELEMENTS,
    WIDTH,
    Case,
    F32x4,
    assert_error,
    assert_raw_error,
    assert_still_serves,
    bcase,
    binary_request,
    case,
    check_bad_infer,
    good_add_sub_inputs,
    post,
    raw_http,
    raw_post_head,
    tensor,
    v2,
)
from tests.conftest import ServerThread

_GOOD_BINARY_LEN = len(json.dumps(GOOD_BINARY_HEAD).encode())


def header_length_case(id: str, header_length: int | str, *fragments: str) -> Any:
    """A 400 ``case``: the good identity_fp32 binary request, sent with a wrong Inference-Header-Content-Length."""
    return bcase(id, 400, fragments, "identity_fp32", GOOD_BINARY_HEAD, F32x4, header_length=header_length)


BINARY_CASES = [
    header_length_case(
        "header-length-larger-than-body",
        _GOOD_BINARY_LEN + 16 + 1,
        "Inference-Header-Content-Length",
        "outside the body",
    ),
    header_length_case(
        "header-length-not-an-integer", "abc", "Inference-Header-Content-Length must be an integer", "'abc'"
    ),
    header_length_case("header-length-float", "12.5", "Inference-Header-Content-Length must be an integer", "'12.5'"),
    header_length_case("header-length-negative", -5, "Inference-Header-Content-Length must not be negative"),
    header_length_case("header-length-cuts-the-json", _GOOD_BINARY_LEN - 3, "malformed JSON"),
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


@pytest.mark.parametrize("bad", BINARY_CASES)
def test_bad_infer_request(client: httpx.Client, bad: Case) -> None:
    check_bad_infer(client, bad)


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
    resp = post(client, f"/v2/models/{model}/infer", body, headers)
    # 413 (not the 400 a data/shape mismatch gets once decoding starts): the shape was checked first
    assert_error(resp, 413, "input 'x'", "10000000000 elements", f"limit of {MAX_ELEMENTS}")
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
    resp = raw_http(server, raw_post_head(server, ADD_SUB, MAX_BODY + 1), b'{"inputs": [')
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
