"""Property-based fuzzing of the V2 codec and data plane with Hypothesis.

Whatever the body and headers (any bytes; ``Inference-Header-Content-Length`` negative, huge or not a number;
any content type; V2 documents with wrong types, shapes that do not match their data, huge shapes, every datatype,
``binary_data_size`` that disagrees with the binary section, nested garbage), the data plane answers with an
``OclawError`` whose status is below 500, or with a correct answer. Never a 500, never another exception.

In process, ``engine.dataplane.infer_bytes`` runs against ``LoadedModel`` instances of the generated test models;
over HTTP, fewer examples go to a real server. Runs are deterministic (``derandomize=True``, no example database).
The module prints the number of cases each test ran and the statuses they got: 2,900 in process and 400 over
HTTP, ~30 s on 2 cores.
"""

from __future__ import annotations

import gzip
import json
import math
import string
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engine.config import Settings
from engine.dataplane import Encoded, build_request, infer_bytes, parse_header_length
from engine.datatypes import V2_TO_NUMPY
from engine.errors import OclawError
from engine.model import LoadedModel
from engine.repository.local import LocalRepository
from engine.tensors import decode_response
from tests.badinput import MAX_ELEMENTS, error_message, good_add_sub_inputs, tensor, v2
from tests.conftest import ServerThread

DATATYPES = list(V2_TO_NUMPY)
#: The models the documents aim at: one identity model per datatype, two inputs, a fixed shape, an index that can
#: fall out of range inside onnxruntime, and an image model (BYTES images pre-processed into FP32).
MODELS = [f"identity_{d.lower()}" for d in DATATYPES] + ["add_sub", "fixed", "gather", "tiny_classifier"]
CONTENT_TYPES = [
    None,
    "application/json",
    "application/json; charset=utf-8",
    "application/octet-stream",
    "image/png",
    "image/jpeg; q=1",
    "text/plain",
    "",
    "multipart/form-data; boundary=x",
]
INTEGER_RANGES = {d: (int(np.iinfo(t).min), int(np.iinfo(t).max)) for d, t in V2_TO_NUMPY.items() if t.kind in "iu"}
FLOAT_WIDTHS = {"FP16": 16, "FP32": 32, "FP64": 64}
CLASSIFY = {"name": "y", "parameters": {"classification": 1}}

#: Deterministic runs, no example database, no time limit per example.
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: Cases run and statuses seen, per test; printed when the module ends.
COUNTS: dict[str, Counter[str]] = {}


def tally(test: str, outcome: str) -> None:
    COUNTS.setdefault(test, Counter())[outcome] += 1


@pytest.fixture(scope="module", autouse=True)
def report_counts(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print how many cases each test ran, by status, when the module ends (past pytest's output capture)."""
    yield
    lines = [
        f"fuzz {test}: {sum(c.values())} cases (status {', '.join(f'{k}: {v}' for k, v in sorted(c.items()))})"
        for test, c in COUNTS.items()
    ]
    lines.append(f"fuzz total: {sum(sum(c.values()) for c in COUNTS.values())} cases")
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print("\n" + "\n".join(lines))


# -- strategies -------------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=8),
)
#: Nested JSON garbage: lists and objects of anything.
garbage = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
)


def scalars(datatype: str, clean: bool = False) -> st.SearchStrategy[Any]:
    """JSON values for one element of ``datatype`` (unless ``clean``: integers sometimes out of range, NaN)."""
    if datatype == "BOOL":
        return st.booleans()
    if datatype == "BYTES":
        return st.text(max_size=12)
    if datatype in FLOAT_WIDTHS:
        return st.floats(width=FLOAT_WIDTHS[datatype], allow_nan=not clean, allow_infinity=not clean)  # type: ignore[arg-type]
    lo, hi = INTEGER_RANGES[datatype]
    return st.integers(lo, hi) if clean else st.integers(lo, hi) | st.integers(lo - 2**66, hi + 2**66)


def nest(flat: list[Any], shape: tuple[int, ...]) -> Any:
    """``flat`` as nested lists of ``shape`` (what a client with a numpy array sends)."""
    if len(shape) <= 1:
        return flat
    step = len(flat) // shape[0] if shape[0] else 0
    return [nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def blob_of(datatype: str, values: list[Any]) -> bytes:
    """The binary tensor extension's bytes for ``values`` of ``datatype``."""
    if datatype == "BYTES":
        return b"".join(len(b).to_bytes(4, "little") + b for b in (str(v).encode("utf-8") for v in values))
    dtype = V2_TO_NUMPY[datatype]
    if dtype.kind in "iu":
        lo, hi = INTEGER_RANGES[datatype]
        values = [min(max(int(v), lo), hi) for v in values]
    with np.errstate(over="ignore"):
        return np.array(values, dtype=dtype).tobytes()


@dataclass
class Tensor:
    """A generated input entry and its binary section (when sent binary)."""

    entry: Any
    blob: bytes | None = None


@st.composite
def shapes(draw: st.DrawFn, spec: tuple[int, ...] | None) -> Any:
    """Mostly a shape that fits ``spec``; else another rank, huge or negative dimensions, or not a shape."""
    kind = draw(st.sampled_from(["fit", "fit", "fit", "other", "huge", "bad"]))
    if kind == "fit" and spec is not None:
        return [d if d >= 0 else draw(st.integers(0, 3)) for d in spec]
    if kind == "huge":
        dims = draw(st.lists(st.integers(0, 2**64), min_size=1, max_size=4))
        return dims if draw(st.booleans()) else [*dims, 2**40, 2**40]
    if kind == "bad":
        return draw(
            garbage
            | st.lists(st.one_of(st.integers(-3, 3), st.booleans(), st.floats(), st.text(max_size=2)), max_size=4)
            | st.lists(st.just(1), min_size=30, max_size=70)
        )
    return draw(st.lists(st.integers(0, 4), max_size=4))


@st.composite
def tensors(draw: st.DrawFn, name: Any, datatype: str, spec: tuple[int, ...] | None, clean: bool) -> Tensor:
    """One input entry, sent as JSON data or binary: ``clean``, one that fits ``spec``; else consistent or broken
    in one of many ways."""

    def flaw(odds: int) -> bool:
        return not clean and draw(st.integers(1, odds)) == 1

    fit = clean and spec is not None
    shape = [d if d >= 0 else draw(st.integers(0, 3)) for d in spec or ()] if fit else draw(shapes(spec))
    types = st.sampled_from([datatype] * 6 + DATATYPES) | st.sampled_from(["fp32", "STRING", "FP8", "", "BF16"])
    sent_type: Any = datatype if clean else draw(types | garbage)
    count = math.prod(shape) if isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape) else 1
    value_type = sent_type if isinstance(sent_type, str) and sent_type in V2_TO_NUMPY else datatype
    n = count if count <= 64 and not flaw(5) else draw(st.integers(0, 8))
    values = draw(st.lists(scalars(value_type, clean), min_size=n, max_size=n))
    entry: dict[str, Any] = {"name": name, "datatype": sent_type, "shape": shape}
    if flaw(10):
        del entry[draw(st.sampled_from(list(entry)))]
    mode = draw(st.sampled_from(["json", "binary"] + ([] if clean else ["json", "binary", "garbage-data", "no-data"])))
    if mode == "json":
        small = isinstance(shape, list) and all(type(d) is int and 0 <= d <= 64 for d in shape)  # nest() builds it
        nested = small and len(values) == count
        entry["data"] = nest(values, tuple(shape)) if nested and draw(st.booleans()) else values
        if flaw(6):  # an element of the wrong kind somewhere
            entry["data"] = [*values, draw(garbage)]
    elif mode == "garbage-data":
        entry["data"] = draw(garbage)
    blob = None
    if mode == "binary":
        blob = blob_of(value_type, values)
        cut = "keep" if clean else draw(st.sampled_from(["keep"] * 4 + ["truncate", "extend", "random"]))
        if cut == "truncate":
            blob = blob[: draw(st.integers(0, max(0, len(blob) - 1)))]
        elif cut == "extend":
            blob += draw(st.binary(min_size=1, max_size=9))
        elif cut == "random":
            blob = draw(st.binary(max_size=64))
        size: Any = len(blob)
        if flaw(6):
            size = draw(st.integers(-5, 2**64) | garbage)
        entry["parameters"] = {"binary_data_size": size}
    if flaw(8):
        entry["parameters"] = draw(garbage)
    return Tensor(entry, blob)


@dataclass
class Request:
    """A generated infer request: its model, body and headers."""

    model: str
    body: bytes
    header_length: str | None
    content_type: str | None


@st.composite
def header_lengths(draw: st.DrawFn, true_length: int | None) -> str | None:
    """``Inference-Header-Content-Length``: mostly the true one; else off by some, negative, huge or no number."""
    choice = draw(st.integers(0, 9))
    if true_length is not None and choice < 6:
        return str(true_length)
    if choice < 7:
        return None
    if choice < 8:
        return str(draw(st.integers(-(2**70), 2**70)) + (true_length or 0))
    if choice < 9:
        return str((true_length or 0) + draw(st.integers(-3, 3)))
    return draw(st.sampled_from(["", " 12 ", "1e3", "0x10", "-0", "+5", "١٢", "1_0", "9" * 5000, "nan", "12abc"]))


@st.composite
def requests(draw: st.DrawFn, models: dict[str, tuple[list[tuple[str, str, tuple[int, ...]]], list[str]]]) -> Request:
    """A V2 infer request close to the schema for one of ``models`` (inputs as (name, datatype, shape); outputs)."""
    model = draw(st.sampled_from(sorted(models)))
    inputs, outputs = models[model]
    clean = draw(st.integers(0, 2)) == 0  # one in three fits the model: the answer is checked

    def pick(valid: st.SearchStrategy[Any], broken: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return valid if clean else valid | broken

    specs = list(inputs)
    if not clean and draw(st.integers(0, 4)) == 0:  # an input missing, twice, or unknown
        specs = draw(st.lists(st.sampled_from([*inputs, ("nope", "FP32", (-1, 4))]), max_size=3))
    built = []
    for name, datatype, spec in specs:
        sent_name = name if clean or draw(st.integers(0, 9)) else draw(garbage)
        built.append(draw(tensors(sent_name, datatype, spec, clean)))
    doc: dict[str, Any] = {"inputs": [t.entry for t in built]}
    if not clean and draw(st.integers(0, 9)) == 0:
        doc["inputs"] = draw(garbage)
    if draw(st.booleans()):
        doc["id"] = draw(pick(st.text(max_size=10), garbage))
    if draw(st.booleans()):
        doc["parameters"] = draw(
            pick(
                st.fixed_dictionaries({}, optional={"binary_data_output": pick(st.booleans(), garbage), "x": garbage}),
                garbage,
            )
        )
    if draw(st.booleans()):
        k = pick(st.integers(0, 5), st.integers(-2, -1) | garbage)
        flags = st.fixed_dictionaries({}, optional={"binary_data": pick(st.booleans(), garbage), "classification": k})
        named = pick(st.sampled_from(outputs), st.just("nope") | garbage)
        out = st.fixed_dictionaries({"name": named}, optional={"parameters": pick(flags, garbage)})
        doc["outputs"] = draw(pick(st.lists(out, max_size=3), garbage))
    head = json.dumps(doc).encode()
    blobs = [t.blob for t in built if t.blob is not None]
    body = head + b"".join(blobs)
    header_length = (str(len(head)) if blobs else None) if clean else draw(header_lengths(len(head) if blobs else None))
    odd = not clean and draw(st.integers(0, 3)) == 0
    content_type = draw(st.sampled_from(CONTENT_TYPES if odd else CONTENT_TYPES[:3]))
    return Request(model, body, header_length, content_type)


# -- the oracle -----------------------------------------------------------------------------------


def check_answer(model: LoadedModel, req: Request, body: bytes, header_length: int | None) -> None:
    """A 200 is correct: identity models return their input, add_sub its sum and difference, fixed twice x."""
    outputs = decode_response(body, header_length)
    request = build_request(
        req.body, parse_header_length(req.header_length), req.content_type, max_elements=MAX_ELEMENTS
    )
    if request.raw is not None:
        return  # raw bodies: their own tests check the values
    sent = {t.name: t.array for t in request.inputs}
    asked = {o.name for o in request.outputs or model.outputs}  # no list, or an empty one: all of them (Triton)
    assert set(outputs) == asked
    for o in request.outputs or ():
        if o.classification:  # top-k labels: their own tests check them
            outputs.pop(o.name, None)
    name = model.name
    if name.startswith("identity_") and "y" in outputs:
        x = sent["x"]
        y = outputs["y"]
        if x.dtype == object:  # BYTES travel as UTF-8 text in JSON
            x = np.array([str(v.decode("utf-8", "replace")).encode() for v in x.reshape(-1)], dtype=object)
            y = y.reshape(-1)
        np.testing.assert_array_equal(y, x)
    elif name == "add_sub":
        a, b = sent["INPUT0"], sent["INPUT1"]
        with np.errstate(all="ignore"):
            expect = {"OUTPUT0": a + b, "OUTPUT1": a - b}
        for key, got in outputs.items():
            np.testing.assert_allclose(got, expect[key], rtol=1e-6)
    elif name == "fixed" and "y" in outputs:
        with np.errstate(over="ignore"):
            np.testing.assert_array_equal(outputs["y"], sent["x"] * np.float32(2))


# -- in process -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(repo: Path) -> Iterator[dict[str, LoadedModel]]:
    """The generated test models, loaded with the session server's limits."""
    local = LocalRepository(repo)
    config = Settings.from_env({}, max_tensor_elements=MAX_ELEMENTS, intra_op_threads=1)
    models = {name: LoadedModel(local.files(name, 1), local.manifest(name), config) for name in MODELS}
    yield models
    for model in models.values():
        model.close()


SIGNATURES: dict[str, tuple[list[tuple[str, str, tuple[int, ...]]], list[str]]] = {
    **{f"identity_{d.lower()}": ([("x", d, (-1, -1))], ["y"]) for d in DATATYPES},
    "add_sub": ([("INPUT0", "FP32", (-1, 16)), ("INPUT1", "FP32", (-1, 16))], ["OUTPUT0", "OUTPUT1"]),
    "fixed": ([("x", "FP32", (2, 3))], ["y"]),
    "gather": ([("idx", "INT64", (-1,))], ["y"]),
    # the image model's input is FP32 [batch, 3, 8, 8]; clients send it encoded images, BYTES [batch]
    "tiny_classifier": ([("image", "BYTES", (-1,))], ["logits"]),
}


def run_in_process(model: LoadedModel, req: Request, test: str) -> Encoded | None:
    """``infer_bytes`` with the request's headers: an answer, or None after an OclawError below 500."""
    try:
        length = parse_header_length(req.header_length)
        encoded = infer_bytes(model, req.body, length, req.content_type)
    except OclawError as exc:
        assert int(exc.status) < 500, f"{int(exc.status)} {exc.message}"
        assert exc.message.strip()
        tally(test, str(int(exc.status)))
        return None
    tally(test, "200")
    return encoded


def test_signatures_match_the_models(loaded: dict[str, LoadedModel]) -> None:
    """The strategies aim at the models' real inputs (the image model takes BYTES images too)."""
    real = {
        name: ([(s.name, s.datatype, tuple(s.shape)) for s in m.inputs], [s.name for s in m.outputs])
        for name, m in loaded.items()
    }
    real["tiny_classifier"][0][:] = [("image", "BYTES", (-1,))]
    assert real == SIGNATURES


@settings(FUZZ, max_examples=1500)
@given(req=requests(SIGNATURES))
@example(req=Request("add_sub", v2(*good_add_sub_inputs(), outputs=[]), None, "application/json"))
@example(req=Request("identity_bytes", v2(tensor("x", "BYTES", [1, 1], [""]), outputs=[CLASSIFY]), None, None))
@example(req=Request("identity_fp32", v2(tensor("x", "FP32", [2, 0], []), outputs=[CLASSIFY]), None, None))
@example(req=Request("identity_fp64", v2(tensor("x", "FP64", [1, 2], [1e300, 1]), outputs=[CLASSIFY]), None, None))
def test_documents_in_process(loaded: dict[str, LoadedModel], req: Request) -> None:
    """V2 documents close to the schema: a 4xx with a message, or the right answer."""
    model = loaded[req.model]
    encoded = run_in_process(model, req, "documents_in_process")
    if encoded is not None:
        check_answer(model, req, encoded.body, encoded.header_length)


@st.composite
def valid_requests(draw: st.DrawFn) -> tuple[str, np.ndarray, bool, bool]:
    """A well-formed request for an identity model: (datatype, array, binary input, binary output)."""
    datatype = draw(st.sampled_from(DATATYPES))
    rows, cols = draw(st.integers(0, 3)), draw(st.integers(0, 5))
    values = draw(st.lists(scalars(datatype), min_size=rows * cols, max_size=rows * cols))
    if datatype == "BYTES":
        array = np.empty(rows * cols, dtype=object)
        array[:] = [v.encode("utf-8") for v in values]
    elif datatype in INTEGER_RANGES:
        lo, hi = INTEGER_RANGES[datatype]
        array = np.array([min(max(v, lo), hi) for v in values], dtype=V2_TO_NUMPY[datatype])
    else:
        array = np.array(values, dtype=V2_TO_NUMPY[datatype])
    return datatype, array.reshape(rows, cols), draw(st.booleans()), draw(st.booleans())


@settings(FUZZ, max_examples=400)
@given(case=valid_requests())
def test_valid_requests_round_trip(loaded: dict[str, LoadedModel], case: tuple[str, np.ndarray, bool, bool]) -> None:
    """Every datatype, JSON or binary both ways: an identity model returns exactly what was sent."""
    datatype, array, binary_in, binary_out = case
    entry: dict[str, Any] = {"name": "x", "datatype": datatype, "shape": list(array.shape)}
    head_doc: dict[str, Any] = {"inputs": [entry], "parameters": {"binary_data_output": binary_out}}
    blob = b""
    if binary_in:
        blob = blob_of(datatype, [v.decode() if isinstance(v, bytes) else v for v in array.reshape(-1).tolist()])
        entry["parameters"] = {"binary_data_size": len(blob)}
    elif datatype == "BYTES":
        entry["data"] = [v.decode() for v in array.reshape(-1).tolist()]
    else:
        entry["data"] = array.reshape(-1).tolist()
    head = json.dumps(head_doc).encode()
    length = len(head) if binary_in else None
    encoded = infer_bytes(loaded[f"identity_{datatype.lower()}"], head + blob, length, "application/json")
    tally("valid_round_trip", "200")
    assert (encoded.header_length is not None) == binary_out
    y = decode_response(encoded.body, encoded.header_length)["y"]
    assert y.shape == array.shape
    np.testing.assert_array_equal(y, array)


@st.composite
def any_bodies(draw: st.DrawFn) -> Request:
    """Any bytes, or a valid body cut, grown or with bytes flipped; any header length and content type."""
    model = draw(st.sampled_from(["add_sub", "identity_bytes", "identity_fp16", "fixed", "tiny_classifier"]))
    kind = draw(st.sampled_from(["bytes", "mutated", "mutated"]))
    if kind == "bytes":
        body = draw(st.binary(max_size=200))
    else:
        body = draw(requests({model: SIGNATURES[model]})).body
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(body)))
            op = draw(st.sampled_from(["flip", "cut", "insert"]))
            if op == "flip" and at < len(body):
                body = body[:at] + bytes([body[at] ^ draw(st.integers(1, 255))]) + body[at + 1 :]
            elif op == "cut":
                body = body[:at]
            else:
                body = body[:at] + draw(st.binary(min_size=1, max_size=8)) + body[at:]
    length = draw(header_lengths(draw(st.integers(0, len(body))) if draw(st.booleans()) else None))
    return Request(model, body, length, draw(st.sampled_from(CONTENT_TYPES)))


@settings(FUZZ, max_examples=1000)
@given(req=any_bodies())
def test_any_bytes_in_process(loaded: dict[str, LoadedModel], req: Request) -> None:
    """Any body and headers: a 4xx with a message, or the right answer."""
    model = loaded[req.model]
    encoded = run_in_process(model, req, "any_bytes_in_process")
    if encoded is not None:
        check_answer(model, req, encoded.body, encoded.header_length)


# -- over HTTP ------------------------------------------------------------------------------------

header_text = st.text(alphabet=string.ascii_letters + string.digits + string.punctuation + " ", max_size=20).map(
    str.strip
)


@st.composite
def http_requests(draw: st.DrawFn) -> tuple[Request, dict[str, str], str]:
    """A generated request with its HTTP headers (some odd, some gzip) and its path."""
    req = draw(requests(SIGNATURES) | any_bodies())
    sent = {"Content-Type": req.content_type, "Inference-Header-Content-Length": req.header_length}
    headers = {k: v for k, v in sent.items() if v is not None}
    extra = draw(st.sampled_from(["none", "none", "gzip", "gzip-lie", "encoding", "header"]))
    if extra == "gzip":
        req = Request(req.model, gzip.compress(req.body, mtime=0), req.header_length, req.content_type)
        headers["Content-Encoding"] = "gzip"
    elif extra == "gzip-lie":
        headers["Content-Encoding"] = "gzip"
    elif extra == "encoding":
        headers["Content-Encoding"] = draw(header_text)
    elif extra == "header":
        headers[draw(st.sampled_from(["Inference-Header-Content-Length", "Content-Type", "X-Request-Id"]))] = draw(
            header_text
        )
    version = draw(st.sampled_from(["", "", "", "/versions/1", "/versions/2", "/versions/x", "/versions/-1"]))
    model = draw(st.sampled_from([req.model] * 8 + ["nope", "add_sub%00", "..", "a%2Fb"]))
    return req, headers, f"/v2/models/{model}{version}/infer"


@settings(FUZZ, max_examples=400)
@given(case=http_requests())
def test_requests_over_http(server: ServerThread, case: tuple[Request, dict[str, str], str]) -> None:
    """Over a real server: a 4xx with a V2 error body, or the right answer."""
    req, headers, path = case
    with httpx.Client(base_url=server.url, timeout=30) as client:
        wire = {k: v.strip().encode() for k, v in headers.items()}  # as sendable: UTF-8, no outer blanks
        resp = client.post(path, content=req.body, headers=wire)
    tally("requests_over_http", str(resp.status_code))
    assert resp.status_code < 500, f"{resp.status_code} {resp.text[:500]}"
    if resp.status_code != 200:
        error_message(resp.status_code, resp.headers.get("content-type"), resp.content, resp.status_code)
        return
    length = resp.headers.get("inference-header-content-length")
    body = req.body if headers.get("Content-Encoding") != "gzip" else gzip.decompress(req.body)
    sent = Request(req.model, body, headers.get("Inference-Header-Content-Length"), headers.get("Content-Type"))
    model = server.runtime.pool.get_nowait(req.model, None)
    check_answer(model, sent, resp.content, None if length is None else int(length))
