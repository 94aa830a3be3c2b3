"""What the sync and async clients share: requests planned as steps, with no I/O of their own.

A plan is a generator: it yields the calls it needs (several at once run concurrently), receives their replies and
returns its value. ``Client`` drives plans with httpx.Client and threads, ``AsyncClient`` with httpx.AsyncClient.
"""

from __future__ import annotations

import json
import mimetypes
import os
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import numpy as np

from oclaw_sdk import codec
from oclaw_sdk.errors import APIError, ModelNotFound, error_for
from oclaw_sdk.result import Result
from oclaw_sdk.retry import RETRY_STATUSES, RetryPolicy, retry_after

T = TypeVar("T")

#: What ``predict`` accepts: an array or nested list (the model's one input), image bytes or a path to an image
#: file (sent as the raw body, for models with image pre-processing), a list of image bytes or ``Path``s (a BYTES
#: tensor of encoded images, split by ``batch_size`` like any tensor), or input name -> array.
Inputs = np.ndarray | Sequence[Any] | bytes | str | os.PathLike[str] | Mapping[str, Any]

#: Leading bytes of the image formats a server's image pre-processing reads, and their Content-Type.
_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """How to run one predict call."""

    #: Rows per request: a larger input (first dimension) is sent in parts of this size, concurrently.
    batch_size: int | None = None
    #: Serve the newest version whose optimization record has this precision (``fp32``, ``fp16``, ``int8``).
    precision: str | None = None
    #: A model version (default: the newest the server serves); not together with ``precision``.
    version: str | int | None = None
    #: Tensors as binary data (the V2 binary extension); False sends and asks for JSON.
    binary: bool = True
    #: Outputs to return (default: all).
    outputs: Sequence[str] | None = None
    #: Ask the server for its top-k classification strings of each output (V2 classification extension).
    classification: int = 0
    #: Class names by index, for ``Result.topk`` from logits.
    labels: Sequence[str] | None = None
    #: Request ``parameters`` to send (e.g. ``{"metering": True}``).
    parameters: Mapping[str, Any] | None = None
    #: Seconds for each request of this call (default: the client's timeout).
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.precision is not None and self.version is not None:
            raise ValueError("give a version or a precision, not both")


@dataclass(frozen=True, slots=True)
class Call:
    """One HTTP request to make (path relative to the endpoint)."""

    method: str
    path: str
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float | None = None
    #: Error statuses that are answers, not errors (e.g. 503 from the readiness probe): neither raised nor retried.
    accept: frozenset[int] = frozenset()
    #: The V2 request document and the model, for transports that are not HTTP (a direct Lambda invoke).
    model: tuple[str, str | None] | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    """An HTTP answer."""

    status: int
    headers: Mapping[str, str]
    content: bytes

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.content)


Plan = Generator[list[Call], list[Reply], T]


def error_of(reply: Reply) -> APIError:
    """The typed error of an error reply, with the server's message."""
    try:
        doc = reply.json()
        message = str(doc["error"]) if isinstance(doc, dict) and "error" in doc else reply.content.decode()
    except (ValueError, UnicodeDecodeError):
        message = reply.content.decode("utf-8", errors="replace")
    return error_for(
        reply.status, message or f"HTTP {reply.status}", retry_after_s=retry_after(reply.headers.get("retry-after"))
    )


def next_wait(retry: RetryPolicy, attempt: int, error: Exception) -> float | None:
    """Seconds before the next try after ``error`` (a connection error or an error reply), None to give up."""
    if isinstance(error, APIError):
        if error.status not in RETRY_STATUSES:
            return None
        return retry.delay(attempt, error.retry_after_s)
    return retry.delay(attempt)


def image_body(data: bytes, name: str = "") -> tuple[bytes, str] | None:
    """(body, Content-Type) when ``data`` is an image (by its leading bytes, else the file name), else None."""
    for magic, content_type in _IMAGE_MAGIC:
        if data.startswith(magic):
            return data, content_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return data, "image/webp"
    guessed = mimetypes.guess_type(name)[0] if name else None
    return (data, guessed) if guessed and guessed.startswith("image/") else None


def model_path(model: str, version: str | int | None) -> str:
    path = f"/v2/models/{quote(model, safe='')}"
    return path if version is None else f"{path}/versions/{quote(str(version), safe='')}"


def _split(arrays: dict[str, np.ndarray], batch_size: int | None) -> list[dict[str, np.ndarray]]:
    """The inputs in parts of at most ``batch_size`` rows (all inputs share their first dimension)."""
    if batch_size is None or not arrays:
        return [arrays]
    rows = {a.shape[0] if a.ndim else 1 for a in arrays.values()}
    if len(rows) != 1:
        raise ValueError(f"inputs sent in batches need the same first dimension, got {sorted(rows)}")
    (count,) = rows
    if count <= batch_size:
        return [arrays]
    return [{n: a[i : i + batch_size] for n, a in arrays.items()} for i in range(0, count, batch_size)]


def _join(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([p[name] for p in parts], axis=0) for name in parts[0]}


class Core:
    """Plans for every endpoint, and what they cache (model metadata, the version of each precision)."""

    def __init__(
        self, *, api_key: str | None, headers: Mapping[str, str] | None, timeout_s: float, signed: bool = False
    ) -> None:
        self.headers = dict(headers or {})
        if api_key and signed:  # Authorization carries the request's signature (SigV4)
            self.headers["x-api-key"] = api_key
        elif api_key:
            self.headers["authorization"] = f"Bearer {api_key}"
        self.timeout_s = timeout_s
        self._metadata: dict[tuple[str, str | None], dict[str, Any]] = {}
        self._precision: dict[tuple[str, str], str] = {}

    model_path = staticmethod(model_path)

    # -- plans -----------------------------------------------------------------------------------------------

    def get(self, path: str, *, accept: frozenset[int] = frozenset()) -> Plan[Reply]:
        """One GET; its reply."""
        (reply,) = yield [Call("GET", path, headers=self.headers, timeout_s=self.timeout_s, accept=accept)]
        return reply

    def post_json(self, path: str, doc: Any) -> Plan[Reply]:
        """One POST of a JSON document; its reply."""
        headers = {**self.headers, "content-type": "application/json"}
        (reply,) = yield [Call("POST", path, json.dumps(doc).encode(), headers, self.timeout_s)]
        return reply

    def model_metadata(self, model: str, version: str | int | None = None) -> Plan[dict[str, Any]]:
        """A model's V2 metadata (cached: signatures do not change while a version is served)."""
        key = (model, None if version is None else str(version))
        if key not in self._metadata:
            reply = yield from self.get(model_path(model, version))
            self._metadata[key] = reply.json()
        return self._metadata[key]

    def model_config(self, model: str, version: str | int | None = None) -> Plan[dict[str, Any]]:
        """A model version's Triton-style configuration."""
        reply = yield from self.get(model_path(model, version) + "/config")
        config: dict[str, Any] = reply.json()
        return config

    def version_of(self, model: str, precision: str) -> Plan[str]:
        """The newest served version whose precision is ``precision`` (the configs of all are read at once)."""
        key = (model, precision.lower())
        if key in self._precision:
            return self._precision[key]
        meta = yield from self.model_metadata(model)
        versions = sorted(
            (str(v) for v in meta.get("versions", [])), key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0)
        )
        calls = [
            Call("GET", model_path(model, v) + "/config", headers=self.headers, timeout_s=self.timeout_s)
            for v in versions
        ]
        replies = yield calls
        found: dict[str, str] = {}
        for version, reply in zip(versions, replies, strict=True):
            params = reply.json().get("parameters") or {}
            found[version] = str((params.get("precision") or {}).get("string_value", "fp32")).lower()
        matching = [v for v in versions if found[v] == key[1]]
        if not matching:
            have = ", ".join(f"{v} {p}" for v, p in found.items()) or "none"
            raise ModelNotFound(f"model {model!r} has no version of precision {precision!r} (versions: {have})")
        self._precision[key] = matching[-1]
        return matching[-1]

    def predict(self, inputs: Inputs, model: str, config: ModelConfig) -> Plan[Result]:
        """Infer: pick the version, encode (in parts when larger than the batch size), send, decode and join."""
        version = None if config.version is None else str(config.version)
        if config.precision is not None:
            version = yield from self.version_of(model, config.precision)
        path = model_path(model, version) + "/infer"
        timeout = config.timeout_s if config.timeout_s is not None else self.timeout_s
        image = _image_of(inputs)
        if image is not None:
            body, content_type = image
            headers = {**self.headers, "content-type": content_type}
            (reply,) = yield [Call("POST", path, body, headers, timeout)]
            return self._result(model, [reply], config)
        arrays = yield from self._arrays(inputs, model, version)
        outputs = config.outputs
        if outputs is None and config.classification:
            meta = yield from self.model_metadata(model, version)
            outputs = [o["name"] for o in meta.get("outputs", [])]
        calls = []
        for part in _split(arrays, config.batch_size):
            body, length = codec.encode_request(
                part,
                binary=config.binary,
                outputs=outputs,
                classification=config.classification,
                parameters=config.parameters,
            )
            headers = {
                **self.headers,
                "content-type": "application/octet-stream" if length is not None else "application/json",
            }
            if length is not None:
                headers[codec.HEADER_LENGTH] = str(length)
            calls.append(Call("POST", path, body, headers, timeout, model=(model, version)))
        replies = yield calls
        return self._result(model, replies, config)

    # -- helpers ---------------------------------------------------------------------------------------------

    def _arrays(self, inputs: Inputs, model: str, version: str | None) -> Plan[dict[str, np.ndarray]]:
        """Input name -> numpy array; the model's metadata names an unnamed input and gives lists their datatype."""
        named = isinstance(inputs, Mapping)
        given: Mapping[str, Any] = inputs if isinstance(inputs, Mapping) else {"": inputs}
        if named and all(isinstance(v, np.ndarray) for v in given.values()):
            return dict(given)
        meta = yield from self.model_metadata(model, version)
        specs = {s["name"]: s["datatype"] for s in meta.get("inputs", [])}
        if not named:
            if len(specs) != 1:
                raise ValueError(f"model {model!r} has inputs {list(specs)}: pass a dict of input name -> array")
            given = {next(iter(specs)): given[""]}
        arrays = {}
        for name, value in given.items():
            images = _images(value)
            if images is not None:
                arrays[name] = images
            elif isinstance(value, np.ndarray) and named:
                arrays[name] = value
            else:
                arrays[name] = codec.as_array(value, specs.get(name))
        return arrays

    def _result(self, model: str, replies: list[Reply], config: ModelConfig) -> Result:
        parts, first = [], None
        for reply in replies:
            length = reply.headers.get(codec.HEADER_LENGTH)
            doc, arrays = codec.decode_response(reply.content, int(length) if length else None)
            first = first or doc
            parts.append(arrays)
        assert first is not None
        return Result(
            model_name=str(first.get("model_name", model)),
            model_version=str(first.get("model_version", "")),
            outputs=_join(parts),
            labels=config.labels,
            parameters=dict(first.get("parameters") or {}),
        )


def _images(value: Any) -> np.ndarray | None:
    """A list of images (encoded bytes or ``Path``s) as a BYTES tensor of shape [N]; None for anything else."""
    if not isinstance(value, list | tuple) or not value:
        return None
    if not all(isinstance(v, os.PathLike) or (isinstance(v, bytes) and image_body(v)) for v in value):
        return None
    array = np.empty(len(value), dtype=object)
    array[:] = [Path(v).read_bytes() if isinstance(v, os.PathLike) else v for v in value]
    return array


def _image_of(inputs: Inputs) -> tuple[bytes, str] | None:
    """(body, Content-Type) for image bytes or an image file path; None for tensors."""
    if isinstance(inputs, bytes | bytearray | memoryview):
        data = bytes(inputs)
        image = image_body(data)
        if image is None:
            raise ValueError("bytes given as input are not a PNG, JPEG, GIF, BMP or WebP image")
        return image
    if isinstance(inputs, str | os.PathLike):
        path = Path(inputs)
        image = image_body(path.read_bytes(), path.name)
        if image is None:
            raise ValueError(f"{path} is not an image file (PNG, JPEG, GIF, BMP or WebP)")
        return image
    return None
