"""Bad requests through the real server, continued: images that do not decode or are too large, and images
sent to models without image pre-processing (an exact 4xx status, a V2 ``{"error": ...}`` body that names the
problem, and a server that still answers afterwards); NaN and Inf, which are not bad input and pass through."""

from __future__ import annotations

import json
import math
import struct

import httpx
import numpy as np
import pytest

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


@pytest.mark.parametrize("bad", IMAGE_CASES)
def test_bad_infer_request(client: httpx.Client, bad: Case) -> None:
    check_bad_infer(client, bad)


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
