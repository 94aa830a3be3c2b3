"""Bad requests through the real server: exact 4xx status, a V2 ``{"error": ...}`` body that names the
problem, and a server that still answers a good request afterwards.

This file: JSON bodies, model signatures, tensor data, model names and versions, routes and methods, and failure
statistics. ``test_bad_input_binary.py`` covers the binary tensor extension, raw tensors, size limits and
Content-Encoding; ``test_bad_input_images.py`` covers images and NaN/Inf pass-through."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest

from tests.badinput import (
    ADD_SUB,
    GOOD_BINARY_HEAD,
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
    png,
    post,
    raw_http,
    raw_post_head,
    row,
    tensor,
    v2,
)
from tests.conftest import ServerThread


def x_case(id: str, datatype: str, shape: list[Any], data: Any, *fragments: str, model: str | None = None) -> Any:
    """A 400 ``case`` for a one-input model whose input is ``x``: ``identity_<datatype>`` unless ``model`` is given."""
    return case(
        id, v2(tensor("x", datatype, shape, data)), 400, *fragments, model=model or f"identity_{datatype.lower()}"
    )


def bad_input0(datatype: str, shape: list[Any], data: Any = None) -> bytes:
    """An add_sub body whose INPUT0 is built from the arguments and whose INPUT1 is good."""
    return v2(tensor("INPUT0", datatype, shape, data), tensor("INPUT1", "FP32", [1, WIDTH], row()))


def add_sub_stats(client: httpx.Client) -> dict[str, Any]:
    resp = client.get("/v2/models/add_sub/stats")
    assert resp.status_code == 200, resp.text
    (entry,) = resp.json()["model_stats"]
    assert entry["name"] == "add_sub"
    stats: dict[str, Any] = entry["inference_stats"]
    return stats


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
        bad_input0("FP32", [1, WIDTH]),
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
        bad_input0("INT32", [1, WIDTH], [1] * WIDTH),
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
        bad_input0("FLOAT32", [1, WIDTH], row()),
        400,
        "unsupported datatype 'FLOAT32'",
        "FP32",
    ),
    case(
        "lowercase-datatype",
        bad_input0("fp32", [1, WIDTH], row()),
        400,
        "unsupported datatype 'fp32'",
    ),
    case(
        "datatype-not-a-string",
        bad_input0(32, [1, WIDTH], row()),
        400,
        "input 'INPUT0' needs a string 'datatype'",
    ),
    case(
        "wrong-rank-1d",
        bad_input0("FP32", [WIDTH], row()),
        400,
        "input 'INPUT0'",
        "expected rank 2",
        "got shape [16]",
    ),
    case(
        "wrong-rank-3d",
        bad_input0("FP32", [1, 1, WIDTH], row()),
        400,
        "input 'INPUT0'",
        "expected rank 2",
    ),
    case(
        "wrong-dimension-add-sub",
        bad_input0("FP32", [1, 8], [1.0] * 8),
        400,
        "input 'INPUT0'",
        "dimension 1 must be 16",
    ),
    # the model "fixed" takes x: FP32 [2, 3], no variable dimensions
    x_case(
        "fixed-wrong-dim0", "FP32", [3, 3], [1.0] * 9, "input 'x'", "dimension 0 must be 2", "[2, 3]", model="fixed"
    ),
    x_case("fixed-wrong-dim1", "FP32", [2, 4], [1.0] * 8, "input 'x'", "dimension 1 must be 3", model="fixed"),
    x_case("fixed-transposed", "FP32", [3, 2], [1.0] * 6, "input 'x'", "dimension 0 must be 2", model="fixed"),
    x_case("fixed-wrong-rank", "FP32", [6], [1.0] * 6, "input 'x'", "expected rank 2", model="fixed"),
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
        bad_input0("FP32", [1, WIDTH], [1.0] * 15),
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
    x_case("ragged-nested-bytes", "BYTES", [2, 2], [["a", "b"], ["c"]], "input 'x'", "needs 4 elements, data has 3"),
    case(
        "string-in-fp32-data",
        bad_input0("FP32", [1, WIDTH], ["one", *row()[1:]]),
        400,
        "input 'INPUT0'",
        "does not fit datatype FP32",
        "one",
    ),
    case(
        "object-in-fp32-data",
        bad_input0("FP32", [1, WIDTH], [{"v": 1}, *row()[1:]]),
        400,
        "input 'INPUT0'",
        "does not fit datatype FP32",
    ),
    x_case("uint8-300", "UINT8", [1, 3], [1, 300, 2], "input 'x'", "does not fit datatype UINT8", "300"),
    x_case("uint8-negative", "UINT8", [1, 2], [-1, 2], "input 'x'", "does not fit datatype UINT8"),
    x_case("int8-128", "INT8", [1, 2], [127, 128], "input 'x'", "does not fit datatype INT8"),
    x_case("int16-overflow", "INT16", [1, 1], [40000], "does not fit datatype INT16"),
    x_case("int64-2-pow-63", "INT64", [1, 1], [2**63], "does not fit datatype INT64"),
    x_case("uint64-2-pow-64", "UINT64", [1, 1], [2**64], "does not fit datatype UINT64"),
    x_case("bool-ints", "BOOL", [1, 2], [1, 0], "input 'x'", "BOOL data must hold true/false values"),
    x_case("bool-strings", "BOOL", [1, 2], ["true", "false"], "input 'x'", "BOOL data must hold true/false values"),
    x_case("bool-mixed-with-int", "BOOL", [1, 2], [True, 1], "BOOL data must hold true/false values"),
    x_case("bool-null", "BOOL", [1, 2], [True, None], "BOOL data must hold true/false values"),
    x_case("bytes-with-numbers", "BYTES", [1, 2], ["a", 2], "input 'x'", "BYTES data must hold strings, got int"),
    case(
        "negative-dimension",
        bad_input0("FP32", [-1, WIDTH], row()),
        400,
        "input 'INPUT0'",
        "'shape' must be a list of non-negative integers",
    ),
    case(
        "float-dimension",
        bad_input0("FP32", [1.0, WIDTH], row()),
        400,
        "'shape' must be a list of non-negative integers",
    ),
    x_case("zero-elements-huge-dimensions", "FP32", [0, 2**40, 2**40], [], "input 'x'"),
    x_case("more-than-64-dimensions", "FP32", [1] * 65, [1.0], "input 'x'"),
    bcase(
        "binary-more-than-64-dimensions",
        400,
        ("input 'x'",),
        "identity_fp32",
        {"inputs": [tensor("x", "FP32", [1] * 65, binary_data_size=4)]},
        b"\x00" * 4,
    ),
]


@pytest.mark.parametrize("bad", JSON_SHAPE_CASES + SIGNATURE_CASES + DATA_CASES)
def test_bad_infer_request(client: httpx.Client, bad: Case) -> None:
    check_bad_infer(client, bad)


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
    head = raw_post_head(server, "/v2/models/../infer", len(body))
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
