"""Bad requests through the real server, continued: images that do not decode or are too large, and images
sent to models without image pre-processing (an exact 4xx status, a V2 ``{"error": ...}`` body that names the
problem, and a server that still answers afterwards); NaN and Inf, which are not bad input and pass through."""

from __future__ import annotations

import io
import json
import math
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from engine.tensors import decode_response
from tests.badinput import (
    ADD_SUB,
    WIDTH,
    Case,
    assert_still_serves,
    bcase,
    binary_request,
    case,
    check_bad_infer,
    jpeg,
    png,
    post,
    row,
    tensor,
    v2,
)

NOT_AN_IMAGE = b"\xff\xd8\xff\xe0 this is not a JPEG, only its first bytes look like one" * 4


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` RGB pixels and whose data is nearly nothing."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b""))
        + png_chunk(b"IEND", b"")
    )


def real_png(width: int, height: int) -> bytes:
    """A real, decodable PNG of one colour (1 bit a pixel: small to make, ~20 KB for 12000x12000)."""
    buf = io.BytesIO()
    Image.new("1", (width, height), 1).save(buf, format="PNG")
    return buf.getvalue()


REAL_PNG_12000 = real_png(12000, 12000)

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
        "png-header-of-60000x60000",
        png_header(60000, 60000),
        413,
        "input 'image'",
        "60000x60000 pixels exceeds the limit of 1000000 pixels (OCLAW_MAX_TENSOR_ELEMENTS)",
        model="tiny_classifier",
        headers={"Content-Type": "image/png"},
    ),
    case(
        "real-png-of-12000x12000",
        REAL_PNG_12000,
        413,
        "input 'image'",
        "12000x12000 pixels exceeds the limit of 1000000 pixels (OCLAW_MAX_TENSOR_ELEMENTS)",
        model="tiny_classifier",
        headers={"Content-Type": "image/png"},
    ),
    bcase(
        "binary-bytes-tensor-png-header-of-60000x60000",
        413,
        ("input 'image'", "60000x60000 pixels exceeds the limit of 1000000 pixels (OCLAW_MAX_TENSOR_ELEMENTS)"),
        "tiny_classifier",
        {"inputs": [tensor("image", "BYTES", [1], binary_data_size=4 + len(png_header(60000, 60000)))]},
        struct.pack("<I", len(png_header(60000, 60000))) + png_header(60000, 60000),
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


@pytest.mark.parametrize("bad", IMAGE_CASES)
def test_bad_infer_request(client: httpx.Client, bad: Case) -> None:
    check_bad_infer(client, bad)


def test_the_large_png_is_a_real_image() -> None:
    """The 12000x12000 case is a whole PNG Pillow decodes, not only a header."""
    with Image.open(io.BytesIO(REAL_PNG_12000)) as img:
        img.load()
        assert img.size == (12000, 12000) and img.getextrema() == (255, 255)


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
    """Python's json writes NaN / Infinity / -Infinity tokens; the server accepts them and answers valid JSON, the
    values as the strings "NaN", "Infinity", "-Infinity" (tests/test_non_finite.py has models that make them)."""
    body = v2(tensor("x", datatype, [1, 6], NON_FINITE))
    assert b"NaN" in body
    assert b"-Infinity" in body
    resp = post(client, f"/v2/models/{model}/infer", body)
    assert resp.status_code == 200, resp.text
    (out,) = json.loads(resp.content, parse_constant=refuse_constant)["outputs"]
    assert out["datatype"] == datatype
    assert out["shape"] == [1, 6]
    assert out["data"][:3] == ["NaN", "Infinity", "-Infinity"]
    assert_non_finite_equal(np.array(out["data"], dtype=dtype), dtype)
    assert_non_finite_equal(decode_response(resp.content)["y"], dtype)


def refuse_constant(token: str) -> None:
    raise AssertionError(f"{token} is not JSON")


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
