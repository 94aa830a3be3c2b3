"""Helpers shared by the ``tests/test_bad_input*.py`` files: V2 request builders, the V2 error-body check,
a raw-socket HTTP client, and the table-driven ``Case`` of one bad infer request.

The test files call ``pytest.register_assert_rewrite("tests.badinput")`` before importing this module, so
its assertions report like those written in a test file."""

from __future__ import annotations

import io
import json
import re
import socket
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import ServerThread

MAX_BODY = 8 * 1024 * 1024  # the session server's max_body_bytes
MAX_ELEMENTS = 1_000_000  # the session server's max_tensor_elements
WIDTH = 16  # add_sub inputs are FP32 [batch, 16]
ADD_SUB = "/v2/models/add_sub/infer"
#: ``<_io.BytesIO object at 0x7f...>``: what no error message may show.
OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")

# -- request bodies -------------------------------------------------------------------------------


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


F32x4 = np.arange(4, dtype="<f4").tobytes()  # 16 bytes, shape [1, 4]
GOOD_BINARY_HEAD = {"inputs": [tensor("x", "FP32", [1, 4], binary_data_size=16)]}


def _image(fmt: str, width: int, height: int, color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format=fmt)
    return buf.getvalue()


def png(width: int, height: int) -> bytes:
    return _image("PNG", width, height, (10, 200, 30))


def jpeg(width: int, height: int) -> bytes:
    return _image("JPEG", width, height, (200, 10, 30))


# -- sending and checking -------------------------------------------------------------------------


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
    assert not OBJECT_REPR.search(message), f"an object repr leaks into {message!r}"
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


def post(client: httpx.Client, path: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return client.post(path, content=body, headers={"Content-Type": "application/json", **(headers or {})})


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


def raw_post_head(server: ServerThread, path: str, content_length: int) -> bytes:
    """The head of a JSON POST that httpx would not send as given (a literal path, a false Content-Length)."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: {server.host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {content_length}\r\nConnection: close\r\n\r\n"
    ).encode()


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


# -- table-driven infer cases ---------------------------------------------------------------------


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


def bcase(
    id: str,
    status: int,
    fragments: tuple[str, ...],
    model: str,
    head: dict[str, Any],
    *blobs: bytes,
    header_length: int | str | None = None,
) -> Any:
    """A ``case`` whose body uses the binary tensor extension (``header_length`` overrides the true JSON length)."""
    body, headers = binary_request(head, *blobs)
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)
    return case(id, body, status, *fragments, model=model, headers=headers)


def check_bad_infer(client: httpx.Client, bad: Case) -> None:
    """``bad`` gets its status and error message, and the server still answers a good request afterwards."""
    headers = {"Content-Type": "application/json", **bad.headers}
    resp = client.post(bad.path, content=bad.body, headers=headers)
    assert_error(resp, bad.status, *bad.fragments)
    assert_still_serves(client)
