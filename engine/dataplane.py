"""Protocol-agnostic data plane: body bytes in, body bytes out; shared by every entry point."""

from __future__ import annotations

from dataclasses import dataclass
from time import perf_counter_ns
from typing import TYPE_CHECKING

from engine.errors import InvalidInput, OclawError
from engine.model import LoadedModel
from engine.tensors import InferRequest, InferResponse, decode_request, encode_response

if TYPE_CHECKING:  # pragma: no cover
    from engine.metering.records import UsageRecorder

#: Requests whose body is at most this many bytes may run on the caller's thread for cheap models.
INLINE_BODY_BYTES = 64 * 1024

IMAGE_TYPES = ("image/",)


@dataclass(frozen=True, slots=True)
class Encoded:
    """An encoded infer response."""

    body: bytes
    header_length: int | None
    rows: int
    queue_ns: int = 0
    compute_ns: int = 0
    #: The request's ``oclaw-metering`` header value, when a recorder queued its usage.
    metering: bytes | None = None

    @property
    def content_type(self) -> str:
        """The MIME type of the body."""
        return "application/json" if self.header_length is None else "application/octet-stream"


def parse_header_length(value: str | None) -> int | None:
    """Parse ``Inference-Header-Content-Length``."""
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise InvalidInput(f"Inference-Header-Content-Length must be an integer, got {value!r}") from None
    if length < 0:
        raise InvalidInput("Inference-Header-Content-Length must not be negative")
    return length


def build_request(
    body: bytes, header_length: int | None, content_type: str | None, *, max_elements: int
) -> InferRequest:
    """Turn a body and its headers into an InferRequest (V2 JSON, binary, raw tensor or raw image)."""
    ctype = (content_type or "").split(";", 1)[0].strip().lower()
    if header_length == 0:
        return InferRequest(inputs=[], raw=body, raw_kind="tensor", nbytes=len(body))
    if header_length is None and (ctype.startswith(IMAGE_TYPES) or ctype == "application/octet-stream"):
        return InferRequest(inputs=[], raw=body, raw_kind="image", nbytes=len(body))
    if not body:
        raise InvalidInput("empty request body")
    return decode_request(body, header_length, max_elements=max_elements)


def decode(model: LoadedModel, body: bytes, header_length: int | None, content_type: str | None) -> InferRequest:
    """The request a body carries for ``model`` (a raw image only for a model that pre-processes images)."""
    request = build_request(body, header_length, content_type, max_elements=model.settings.max_tensor_elements)
    if request.raw_kind == "image" and model.image_input is None:
        raise InvalidInput(
            f"model {model.name!r} declares no image pre-processing; send a V2 infer request "
            "(or a raw tensor with Inference-Header-Content-Length: 0)"
        )
    return request


def infer_bytes(
    model: LoadedModel,
    body: bytes,
    header_length: int | None,
    content_type: str | None,
    enqueue_ns: int | None = None,
    *,
    recorder: UsageRecorder | None = None,
) -> Encoded:
    """Decode, infer and encode one request against one model; thread-safe.

    ``recorder`` captures the request's usage for metering; a request whose ``parameters`` ask for
    ``"metering": true`` gets its whole record in the response ``parameters`` too.
    """
    started = perf_counter_ns()
    try:
        request = decode(model, body, header_length, content_type)
    except OclawError:
        model.stats.failure(perf_counter_ns() - started)
        raise
    response = model.infer(request, enqueue_ns or started, started)
    show = recorder is not None and request.parameters.get("metering") is True
    body, length, header = encode_served(model, response, recorder, show_record=show)
    return Encoded(body, length, response.rows, response.queue_ns, perf_counter_ns() - started, header)


def encode_served(
    model: LoadedModel, response: InferResponse, recorder: UsageRecorder | None, *, show_record: bool = False
) -> tuple[bytes, int | None, bytes | None]:
    """Encode a served response and queue its usage: (body, JSON header length, ``oclaw-metering`` value).

    ``show_record``: the response ``parameters`` carry the request's whole record, the very one the sinks get;
    its ``bytes_out`` is the size of the body that carries it (its own digits included).
    """
    preview = recorder.preview(model, response) if recorder is not None and show_record else None
    if recorder is None or preview is None:
        body, length = encode_response(response)
        return body, length, None if recorder is None else recorder(model, response, len(body))
    record = recorder.record(preview).as_dict()
    response.parameters["metering"] = record
    body, length = encode_response(response)  # with "bytes_out":0, one digit
    size = len(body)
    while (grown := len(body) - 1 + len(str(size))) != size:
        size = grown
    record["bytes_out"] = size
    body, length = encode_response(response)
    return body, length, recorder(model, response, len(body), preview)


def runs_inline(model: LoadedModel, body_size: int) -> bool:
    """True when a request is cheap enough to run on the event loop instead of a worker thread."""
    return model.inline and body_size <= INLINE_BODY_BYTES
