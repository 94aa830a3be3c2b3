"""The server's ASGI app: the V2 data plane answered directly (Starlette only), the full FastAPI app on first use.

Importing FastAPI (and pydantic) costs ~0.3 s, more than loading most models; `oclaw serve` therefore opens its
port as soon as the models are warm, and the routes beyond the data plane (repository, statistics, config)
import FastAPI when first called. Both paths share the endpoint code below and in ``handler/v2.py``.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import gc
import logging
import re
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from engine import auth, logs
from engine.dataplane import Encoded, infer_bytes, parse_header_length, runs_inline
from engine.dynbatch import Dropped, batcher_for
from engine.errors import InvalidInput, ModelNotFound, OclawError, PayloadTooLarge, QueueFull
from engine.metering.records import METERING_HEADER
from engine.model import LoadedModel
from engine.runtime import Runtime
from handler import lambda_http, v2

if TYPE_CHECKING:  # pragma: no cover
    from engine.audit import Auditor

log = logging.getLogger("oclaw.http")

INFER_PATH = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")
#: The scope key of the request's authenticated ``auth.Principal`` (absent without access control).
PRINCIPAL = "oclaw.principal"


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response encoded with orjson."""
    return Response(orjson.dumps(content), status_code=status, media_type="application/json", headers=headers)


def reply_response(reply: v2.Reply) -> Response:
    """A Starlette response for a framework-free Reply."""
    return Response(reply.body, status_code=reply.status, headers=reply.headers)


def error_response(status: int, message: str) -> Response:
    """The V2 error shape: non-2xx and ``{"error": message}``."""
    return json_response({"error": message}, status)


def oclaw_error_response(exc: OclawError) -> Response:
    """The error response of an OclawError: its status, and ``Retry-After`` when the client should come back."""
    return json_response({"error": exc.message}, int(exc.status), error_headers(exc))


def error_headers(exc: OclawError) -> dict[str, str] | None:
    """The headers an error's response carries: ``Retry-After`` (come back later), ``WWW-Authenticate`` (401)."""
    if isinstance(exc, QueueFull | auth.RateLimited):
        return {"retry-after": str(exc.retry_after_s)}
    if isinstance(exc, auth.Unauthenticated):
        return {"www-authenticate": 'Bearer realm="oclaw"'}
    return None


def authorize(
    keys: auth.KeyRing, scope: Scope, *, charge: bool = True, runtime: Runtime | None = None
) -> Response | None:
    """Check the request's key against the role its route needs (the path as the router sees it): None when it
    may go on (its principal put in the scope), else the 401/403/429 response (audited with ``runtime``'s log)."""
    authorization, api_key = [], []
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization.append(value.decode("latin-1"))
        elif name == b"x-api-key":
            api_key.append(value.decode("latin-1"))
    need = auth.requirement(scope["method"], scope["path"])
    key = auth.credential(authorization, api_key)
    try:
        principal = keys.authorize(need, key, charge=charge)
    except OclawError as exc:
        if runtime is not None and (audit := runtime.audit) is not None:
            audit.denied(
                scope["path"],
                exc,
                keys,
                key,
                request_id=_header(scope, b"x-request-id") or runtime.next_request_id(),
                source=source_of(scope),
                source_ip=source_ip(scope),
            )
        return oclaw_error_response(exc)
    scope[PRINCIPAL] = principal
    return None


def _header(scope: Scope, name: bytes) -> str:
    """The first value of a request header (empty when absent)."""
    return next((value.decode("latin-1") for key, value in scope["headers"] if key == name), "")


def source_of(scope: Scope) -> str:
    """The front door an audit record names: ``lambda-http`` under Mangum, else ``http``."""
    return "lambda-http" if "aws.event" in scope else "http"


def source_ip(scope: Scope) -> str:
    """The client's address: an HTTP event's ``sourceIp`` under Mangum, else the TCP peer; no forwarded header is
    trusted (oclaw has no trusted-proxy setting)."""
    event = scope.get("aws.event")
    if isinstance(event, dict):
        return lambda_http.source_ip(event)
    client = scope.get("client")
    return str(client[0]) if client else ""


@contextmanager
def audited(runtime: Runtime, request: Request, action: str, model: str = "") -> Iterator[dict[str, Any]]:
    """Audit the operation of the ``with`` body: ``ok`` when it ends (with ``["status"]``, 200 unless the body sets
    another), ``error`` with the status of what it raised. The body may set ``["version"]``."""
    audit = runtime.audit
    details: dict[str, Any] = {"version": "", "status": 200}
    if audit is None:
        yield details
        return
    status = 200
    try:
        yield details
        status = int(details["status"])
    except OclawError as exc:
        status = int(exc.status)
        raise
    except Exception:
        status = 500
        raise
    finally:
        scope = request.scope
        audit.record(
            action,
            "ok" if status == 200 else "error",
            status,
            model=model,
            version=details["version"],
            principal=scope.get(PRINCIPAL),
            tenant=request.headers.get(runtime.settings.tenant_header) or "anonymous",
            request_id=request.headers.get("x-request-id") or logs.request_id.get() or runtime.next_request_id(),
            source=source_of(scope),
            source_ip=source_ip(scope),
        )


class KeyCheck:
    """ASGI middleware of the full app: checks a request no front door checked (the app served alone), or checks
    again, without counting it twice against the key's rate limit (``charge=False``), one that Mangum re-parsed."""

    def __init__(
        self, app: ASGIApp, keys: auth.KeyRing, *, charge: bool = True, runtime: Runtime | None = None
    ) -> None:
        self.app, self.keys, self.charge, self.runtime = app, keys, charge, runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            return  # no websocket routes: nothing is served
        denied = None
        if scope["type"] == "http" and PRINCIPAL not in scope:
            denied = authorize(self.keys, scope, charge=self.charge, runtime=self.runtime)
        if denied is not None:
            await denied(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def read_body(request: Request, limit: int) -> bytes:
    """Read the body, refusing more than ``limit`` bytes (413) and inflating gzip/deflate bodies."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidInput(f"invalid Content-Length {declared!r}")
        if int(declared) > limit:
            raise PayloadTooLarge(
                f"request body of {declared} bytes exceeds the limit of {limit} bytes (OCLAW_MAX_BODY_BYTES)"
            )
        body = await request.body()
    else:
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes (OCLAW_MAX_BODY_BYTES)")
            chunks.append(chunk)
        body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise InvalidInput(f"unsupported Content-Encoding {encoding!r}; use gzip or deflate")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"could not inflate the {encoding} body: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(f"inflated body exceeds the limit of {limit} bytes (OCLAW_MAX_BODY_BYTES)")
    if not inflater.eof:
        raise InvalidInput(f"the {encoding} body is truncated")
    return out


async def infer(runtime: Runtime, request: Request, model_name: str, model_version: str | None) -> Response:
    """``POST /v2/models/{m}[/versions/{v}]/infer``: cheap models inline, the rest on the model's threads."""
    enqueue = perf_counter_ns()
    headers = request.headers
    request_id = headers.get("x-request-id") or runtime.next_request_id()
    logs.request_id.set(request_id)
    logs.correlation_id.set(headers.get("x-correlation-id") or request_id)
    principal: auth.Principal | None = request.scope.get(PRINCIPAL)
    record = v2.Recorder(
        runtime,
        request_id=request_id,
        # an authenticated key's tenant is the one metered: no header overrides it
        tenant=principal.tenant
        if principal is not None
        else headers.get(runtime.settings.tenant_header) or "anonymous",
        bytes_in=0,
        source="http",
        enqueue_ns=enqueue,
    )
    status = 0  # stays 0 when cancelled (the client went away): no audit record
    try:
        response = await _infer(runtime, request, model_name, model_version, record)
        status = 200
        return response
    except Dropped:
        status = 499  # never run: never billed, but audited as asked for
        raise
    except OclawError as exc:
        status = int(exc.status)
        record.failed(model_name, model_version, status)
        raise
    except Exception:
        status = 500
        raise
    finally:
        record.release()  # the model's lease: a model the pool unloaded meanwhile is freed at its last release
        if status and runtime.audit is not None:
            _audit_infer(runtime.audit, request, record, status, name=model_name, version=model_version)


def _audit_infer(
    audit: Auditor, request: Request, record: v2.Recorder, status: int, *, name: str, version: str | None
) -> None:
    """The audit record of an inference on the server: the version that served it (else the one asked for)."""
    if record.lease is not None:
        version = str(record.lease.model.version)
    audit.record(
        "infer",
        "ok" if status == 200 else "error",
        status,
        model=name,
        version=version or "",
        principal=request.scope.get(PRINCIPAL),
        tenant=record.tenant,
        request_id=record.request_id,
        source=source_of(request.scope),
        source_ip=source_ip(request.scope),
    )


async def _infer(
    runtime: Runtime, request: Request, model_name: str, model_version: str | None, record: v2.Recorder
) -> Response:
    pool = runtime.pool
    try:
        record.lease = pool.lease(model_name, model_version, wait=False)
    except ModelNotFound:
        raise
    except OclawError:
        # still loading, or unloaded by the pool: wait for its load off the event loop (never a 503 for that)
        record.lease = await asyncio.to_thread(pool.lease, model_name, model_version)
    model = record.lease.model
    body = await read_body(request, runtime.settings.max_body_bytes)
    record.bytes_in = len(body)
    header_length = parse_header_length(request.headers.get(v2.HEADER_LENGTH))
    ctype = request.headers.get("content-type")
    enqueue = record.enqueue_ns
    batcher = batcher_for(model)
    if batcher is None or runs_inline(model, len(body)):  # a cheap model's run costs less than batching it
        encoded = await _run_alone(model, body, header_length, ctype, record)
    elif batcher.idle:  # nothing in flight or queued: the request runs at once; requests arriving meanwhile queue
        with batcher.hold():
            encoded = await _run_alone(model, body, header_length, ctype, record)
    else:
        gone = functools.partial(_disconnected, request.receive)
        encoded = await batcher.infer(body, header_length, ctype, enqueue, recorder=record, gone=gone)
    if runtime.settings.otel:
        from handler import otel

        otel.annotate(model=model.name, version=str(model.version), rows=encoded.rows, request_id=record.request_id)
    response = Response(encoded.body, media_type=encoded.content_type)
    raw = response.raw_headers  # appended already encoded: Starlette's header normalisation costs ~0.2 µs each
    if encoded.header_length is not None:
        raw.append((b"inference-header-content-length", str(encoded.header_length).encode()))
    if encoded.metering is not None:
        raw.append((METERING_HEADER, encoded.metering))
    return response


async def _run_alone(
    model: LoadedModel, body: bytes, header_length: int | None, ctype: str | None, record: v2.Recorder
) -> Encoded:
    """One request run by itself: on the event loop for a cheap model, else on the model's threads."""
    enqueue = record.enqueue_ns
    if runs_inline(model, len(body)):
        return infer_bytes(model, body, header_length, ctype, enqueue, recorder=record)
    loop = asyncio.get_running_loop()
    run = functools.partial(infer_bytes, recorder=record)
    ctx = contextvars.copy_context()  # so logs from the worker thread carry this request's ids
    encoded = await loop.run_in_executor(model.executor, ctx.run, run, model, body, header_length, ctype, enqueue)
    model.note_offloaded(encoded.compute_ns)
    return encoded


async def _disconnected(receive: Receive) -> None:
    """Return once the client has gone (the body is read already: ``receive`` waits for the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class ServerApp:
    """ASGI app for ``oclaw serve``: lifespan waits for the warm pool; data plane here, the rest in FastAPI."""

    def __init__(
        self,
        runtime: Runtime,
        full_app: Callable[[], ASGIApp],
        *,
        preload: bool = True,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.runtime = runtime
        self._make_full_app = full_app
        self._full_app: ASGIApp | None = None
        self._lock = asyncio.Lock()
        self._preload = preload
        self._on_ready = on_ready
        self.in_flight = 0
        self.prometheus: Any = None
        #: The API keys requests are checked against; None: no access control (OCLAW_API_KEYS unset, OCLAW_AUTH).
        self.keys = runtime.keys

    async def full_app(self) -> ASGIApp:
        """The FastAPI app, built (and imported) on first use."""
        async with self._lock:
            if self._full_app is None:
                self._full_app = await asyncio.to_thread(self._make_full_app)
        return self._full_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if self.keys is not None:
            if scope["type"] != "http":  # no websocket routes: nothing else is served
                return
            if (denied := authorize(self.keys, scope, runtime=self.runtime)) is not None:
                await denied(scope, receive, send)
                return
        if scope["type"] == "http":
            self.in_flight += 1
            try:
                response = await self._data_plane(scope, receive)
            finally:
                self.in_flight -= 1
            if response is not None:
                await response(scope, receive, send)
                return
        app = await self.full_app()
        await app(scope, receive, send)

    async def _data_plane(self, scope: Scope, receive: Receive) -> Response | None:
        method, path = scope["method"], scope["path"]
        try:
            if method == "POST" and (match := INFER_PATH.fullmatch(path)):
                return await infer(self.runtime, Request(scope, receive), match["name"], match["version"])
            if method == "GET" and path == "/metrics" and self.prometheus is not None:
                await asyncio.to_thread(self.runtime.meter.flush)
                body = self.prometheus.exposition()
                return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
            if method == "GET":
                reply = v2.route(self.runtime, method, path, b"", {})
                return None if reply is None else reply_response(reply)
        except OclawError as exc:
            return oclaw_error_response(exc)
        except Exception as exc:
            log.exception("unexpected error")
            return error_response(500, f"internal error: {type(exc).__name__}")
        return None

    def _start_metrics(self) -> None:
        """Prometheus metrics at /metrics, fed by the metering records (needs the prometheus-client package)."""
        if not self.runtime.settings.metrics:
            return
        try:
            from engine.metering.metrics import PrometheusSink
        except ImportError:  # pragma: no cover - prometheus-client is a core dependency
            log.warning("prometheus-client is not installed: no /metrics")
            return
        self.prometheus = PrometheusSink(self.runtime, lambda: self.in_flight)
        meter = self.runtime.meter
        meter.sinks = [*meter.sinks, self.prometheus]  # metrics only: no header unless a sink takes records

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    if self._preload:
                        await asyncio.to_thread(self.runtime.wait_preloaded)
                    self._start_metrics()
                    # what start-up built lives on: keep it out of every later collection's walk (no collect()
                    # first: it would cost the cold start ~10 ms for the little start-up garbage it frees)
                    gc.freeze()
                    if self._on_ready is not None:
                        self._on_ready()
                except Exception as exc:  # noqa: BLE001 - reported to the server, which exits
                    await send({"type": "lifespan.startup.failed", "message": f"{type(exc).__name__}: {exc}"})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
