"""Framework-free V2 endpoints shared by the FastAPI app and the Lambda fast path.

Each function takes already-parsed pieces of a request and returns a ``Reply``; errors are raised as
``OclawError`` and turned into ``{"error": ...}`` by ``error_reply``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from time import perf_counter_ns, time
from typing import TYPE_CHECKING

import orjson

from engine import __version__
from engine.dataplane import infer_bytes, parse_header_length
from engine.errors import OclawError
from engine.metering.records import METERING_HEADER, Usage, model_label
from engine.model import LoadedModel
from engine.runtime import Runtime
from engine.tensors import InferResponse

if TYPE_CHECKING:  # pragma: no cover
    from engine.metering.records import MeteringRecord
    from engine.pool import Lease

EXTENSIONS = ["binary_tensor_data", "classification", "model_repository", "statistics", "model_configuration"]
HEADER_LENGTH = "inference-header-content-length"
_METERING_HEADER = METERING_HEADER.decode()
#: ``tuple.__new__(Usage, values)``: a Usage without its Python-level ``__new__`` (~0.15 µs less a request).
_usage = tuple.__new__


@dataclass(frozen=True, slots=True)
class Reply:
    """An HTTP answer: status, body bytes and headers."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})


def json_reply(content: object, status: int = 200) -> Reply:
    """A JSON reply encoded with orjson."""
    return Reply(status, orjson.dumps(content))


def error_reply(exc: OclawError) -> Reply:
    """The V2 error shape for an OclawError (``Retry-After`` when the client should come back, a 401's
    ``WWW-Authenticate``)."""
    reply = json_reply({"error": exc.message}, int(exc.status))
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        reply.headers["retry-after"] = str(retry_after)
    if exc.status == 401:
        reply.headers["www-authenticate"] = 'Bearer realm="oclaw"'
    return reply


def server_metadata() -> Reply:
    """``GET /v2``."""
    return json_reply({"name": "oclaw", "version": __version__, "extensions": EXTENSIONS})


def live() -> Reply:
    """``GET /v2/health/live``."""
    return json_reply({"live": True})


def ready(runtime: Runtime) -> Reply:
    """``GET /v2/health/ready``: 200 when every required model is READY, else 503."""
    ok = runtime.pool.ready()
    return json_reply({"ready": ok}, 200 if ok else 503)


def model_ready(runtime: Runtime, name: str, version: str | None) -> Reply:
    """``GET /v2/models/{m}[/versions/{v}]/ready``."""
    runtime.pool.get_nowait(name, version)
    return json_reply({"name": name, "ready": True})


def model_metadata(runtime: Runtime, name: str, version: str | None) -> Reply:
    """``GET /v2/models/{m}[/versions/{v}]``."""
    model = runtime.pool.get_nowait(name, version)
    return json_reply(model.metadata(runtime.pool.versions(name)))


class Recorder:
    """Captures one request's usage for metering: a tuple queued on the request path, the record built at flush.

    It also keeps the request's ``lease`` on its model (``release()`` gives it back): a request that waited for its
    model to load (the pool had unloaded it) is a cold one, ``cold`` in its record, like the process's first.
    """

    __slots__ = ("bytes_in", "enqueue_ns", "init_ms", "lease", "request_id", "runtime", "source", "tenant")

    def __init__(
        self,
        runtime: Runtime,
        *,
        request_id: str,
        tenant: str,
        bytes_in: int,
        source: str,
        enqueue_ns: int,
        init_ms: float = 0.0,
    ) -> None:
        self.runtime = runtime
        self.request_id = request_id
        self.tenant = tenant
        self.bytes_in = bytes_in
        self.source = source
        self.enqueue_ns = enqueue_ns
        self.init_ms = init_ms
        self.lease: Lease | None = None

    def release(self) -> None:
        """Give the request's model back to the pool (none held: nothing)."""
        if self.lease is not None:
            self.lease.release()

    @property
    def model_loaded(self) -> bool:
        """The request waited for its model to load."""
        return self.lease is not None and self.lease.loaded

    def __call__(
        self, model: LoadedModel, response: InferResponse, bytes_out: int, preview: Usage | None = None
    ) -> bytes | None:
        """Queue the served request's usage (``preview``'s, when the request was shown it); its header value (None
        when metering is off, or only metrics are kept)."""
        runtime = self.runtime
        cold, runtime.cold = runtime.cold, False
        meter = runtime.meter
        if not meter.enabled:
            return None
        if preview is not None:
            return meter.submit_usage(preview._replace(bytes_out=bytes_out))
        return meter.submit_usage(self._capture(model, response, bytes_out, cold))

    def preview(self, model: LoadedModel, response: InferResponse) -> Usage | None:
        """The usage so far, not queued (for a request that asks for its whole record); None when metering is off."""
        return self._capture(model, response, 0, self.runtime.cold) if self.runtime.meter.enabled else None

    def _capture(self, model: LoadedModel, response: InferResponse, bytes_out: int, process_cold: bool) -> Usage:
        """The usage tuple; ``process_cold``: the process's first request, which carries INIT."""
        return _usage(
            Usage,
            (
                self.request_id,
                self.tenant,
                model.name,
                response.model_version,
                response.rows,
                self.bytes_in,
                bytes_out,
                response.queue_ns // 1000,
                response.compute_ns // 1000,
                (perf_counter_ns() - self.enqueue_ns) // 1000,
                self.init_ms if process_cold else 0.0,
                process_cold or self.model_loaded,
                self.source,
                int(time()),
                200,
            ),
        )

    def record(self, usage: Usage) -> MeteringRecord:
        """The whole record (with its bill) of a captured usage."""
        return self.runtime.meter.complete(usage)

    def failed(self, name: str, version: str | None, status: int) -> None:
        """Queue the usage of this request, failed with ``status`` (it is billed too) under its own id and size."""
        runtime = self.runtime
        cold, runtime.cold = runtime.cold, False
        if not runtime.meter.enabled:
            return
        label = model_label(runtime.pool.states(), name)  # never a client-chosen label (metric cardinality)
        runtime.meter.submit_usage(
            Usage(
                self.request_id,
                self.tenant,
                label,
                version if label == name and version and version.isdigit() else "",
                0,
                self.bytes_in,
                0,
                0,
                0,
                (perf_counter_ns() - self.enqueue_ns) // 1000,
                self.init_ms if cold else 0.0,
                cold or self.model_loaded,
                self.source,
                int(time()),
                status,
            )
        )


def infer(
    runtime: Runtime,
    name: str,
    version: str | None,
    body: bytes,
    headers: Mapping[str, str],
    *,
    enqueue_ns: int | None = None,
    record: Recorder | None = None,
) -> Reply:
    """``POST /v2/models/{m}[/versions/{v}]/infer`` on the caller's thread (headers lower-cased).

    ``record`` (a ``Recorder``) meters the request; its figures come back as a header.
    """
    with runtime.pool.lease(name, version) as lease:
        if record is not None:
            record.lease = lease
        encoded = infer_bytes(
            lease.model,
            body,
            parse_header_length(headers.get(HEADER_LENGTH)),
            headers.get("content-type"),
            enqueue_ns,
            recorder=record,
        )
    out = {"content-type": encoded.content_type}
    if encoded.metering is not None:
        out[_METERING_HEADER] = encoded.metering.decode()
    if encoded.header_length is not None:
        out["inference-header-content-length"] = str(encoded.header_length)
    return Reply(200, encoded.body, out)


_M = r"(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"
Handler = Callable[[Runtime, re.Match[str], bytes, Mapping[str, str]], Reply]

#: (method, path pattern, handler) for the routes the Lambda fast path serves without FastAPI.
ROUTES: list[tuple[str, re.Pattern[str], Handler]] = [
    ("POST", re.compile(rf"/v2/models/{_M}/infer"), lambda rt, m, body, h: infer(rt, m["name"], m["version"], body, h)),
    ("GET", re.compile(r"/v2/health/live"), lambda rt, m, body, h: live()),
    ("GET", re.compile(r"/v2/health/ready"), lambda rt, m, body, h: ready(rt)),
    ("GET", re.compile(r"/v2"), lambda rt, m, body, h: server_metadata()),
    ("GET", re.compile(rf"/v2/models/{_M}/ready"), lambda rt, m, body, h: model_ready(rt, m["name"], m["version"])),
    (
        "GET",
        re.compile(rf"/v2/models/(?!stats$){_M}"),
        lambda rt, m, body, h: model_metadata(rt, m["name"], m["version"]),
    ),
]


def route(runtime: Runtime, method: str, path: str, body: bytes, headers: Mapping[str, str]) -> Reply | None:
    """Serve a fast-path route, or return None when the path needs the full app."""
    path = path.rstrip("/") or "/"
    for verb, pattern, handler in ROUTES:
        if verb == method and (match := pattern.fullmatch(path)):
            try:
                return handler(runtime, match, body, headers)
            except OclawError as exc:
                return error_reply(exc)
    return None
