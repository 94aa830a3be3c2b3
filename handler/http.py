"""The V2 / Open Inference Protocol HTTP API (FastAPI); thin: parse, call the engine, encode."""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from time import perf_counter_ns
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine import __version__
from engine.dataplane import infer_bytes, parse_header_length, runs_inline
from engine.errors import InvalidInput, ModelNotFound, OclawError, PayloadTooLarge
from engine.model import LoadedModel
from engine.runtime import Runtime
from engine.tensors import loads_json
from handler import v2

log = logging.getLogger("oclaw.http")


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response encoded with orjson."""
    return Response(orjson.dumps(content), status_code=status, media_type="application/json", headers=headers)


def reply_response(reply: v2.Reply) -> Response:
    """A Starlette response for a framework-free Reply."""
    return Response(reply.body, status_code=reply.status, headers=reply.headers)


def error_response(status: int, message: str) -> Response:
    """The V2 error shape: non-2xx and ``{"error": message}``."""
    return json_response({"error": message}, status)


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


def create_app(runtime: Runtime, *, preload: bool = True, on_ready: Callable[[], None] | None = None) -> FastAPI:
    """The FastAPI app serving ``runtime``; with ``preload`` its lifespan waits for the model pool."""
    pool = runtime.pool
    settings = runtime.settings

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if preload:
            await asyncio.to_thread(runtime.wait_preloaded)
        if on_ready is not None:
            on_ready()
        yield

    app = FastAPI(title="oclaw", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)

    # -- inference (the hot path) ----------------------------------------------------------------------
    # A plain Starlette route, registered before every other route: it is matched first (routes are tried
    # in order) and skips FastAPI's per-request parameter solving; path parameters are read directly.

    async def infer(request: Request) -> Response:
        enqueue = perf_counter_ns()
        model_name = request.path_params["model_name"]
        model_version = request.path_params.get("model_version")
        try:
            model = pool.get_nowait(model_name, model_version)
        except ModelNotFound:
            raise
        except OclawError:
            # still loading: wait for it off the event loop (requests never race a cold start to a 503)
            model = await asyncio.to_thread(pool.get, model_name, model_version)
        body = await read_body(request, settings.max_body_bytes)
        header_length = parse_header_length(request.headers.get(v2.HEADER_LENGTH))
        ctype = request.headers.get("content-type")
        if runs_inline(model, len(body)):
            encoded = infer_bytes(model, body, header_length, ctype, enqueue)
        else:
            loop = asyncio.get_running_loop()
            encoded = await loop.run_in_executor(
                model.executor, infer_bytes, model, body, header_length, ctype, enqueue
            )
        headers = None
        if encoded.header_length is not None:
            headers = {"Inference-Header-Content-Length": str(encoded.header_length)}
        return Response(encoded.body, media_type=encoded.content_type, headers=headers)

    app.add_route("/v2/models/{model_name}/infer", infer, methods=["POST"], include_in_schema=False)
    app.add_route(
        "/v2/models/{model_name}/versions/{model_version}/infer", infer, methods=["POST"], include_in_schema=False
    )

    @app.exception_handler(OclawError)
    async def _oclaw_error(_: Request, exc: OclawError) -> Response:
        return error_response(int(exc.status), exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return json_response({"error": str(exc.detail)}, exc.status_code, headers=dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        return error_response(400, f"invalid request: {exc.errors()}")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unexpected error")
        return error_response(500, f"internal error: {type(exc).__name__}")

    # -- server ---------------------------------------------------------------------------------

    @app.get("/v2")
    async def server_metadata() -> Response:
        return reply_response(v2.server_metadata())

    @app.get("/v2/health/live")
    async def live() -> Response:
        return reply_response(v2.live())

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return reply_response(v2.ready(runtime))

    # -- models -----------------------------------------------------------------------------------

    def model_for(name: str, version: str | None) -> LoadedModel:
        return pool.get_nowait(name, version)

    # before /v2/models/{model_name}, which would otherwise match "stats"
    @app.get("/v2/models/stats")
    @app.get("/v2/models/{model_name}/stats")
    @app.get("/v2/models/{model_name}/versions/{model_version}/stats")
    async def model_stats(model_name: str | None = None, model_version: str | None = None) -> Response:
        models = pool.loaded() if model_name is None else [model_for(model_name, model_version)]
        return json_response({"model_stats": [m.stats.as_dict(m.name, str(m.version)) for m in models]})

    @app.get("/v2/models/{model_name}/ready")
    @app.get("/v2/models/{model_name}/versions/{model_version}/ready")
    async def model_ready(model_name: str, model_version: str | None = None) -> Response:
        return reply_response(v2.model_ready(runtime, model_name, model_version))

    @app.get("/v2/models/{model_name}")
    @app.get("/v2/models/{model_name}/versions/{model_version}")
    async def model_metadata(model_name: str, model_version: str | None = None) -> Response:
        return reply_response(v2.model_metadata(runtime, model_name, model_version))

    @app.get("/v2/models/{model_name}/config")
    @app.get("/v2/models/{model_name}/versions/{model_version}/config")
    async def model_config(model_name: str, model_version: str | None = None) -> Response:
        model = model_for(model_name, model_version)
        return json_response(await asyncio.to_thread(model.config))

    # -- repository extension ------------------------------------------------------------------------

    @app.post("/v2/repository/index")
    async def repository_index(request: Request) -> Response:
        body = await read_body(request, 1 << 20)
        only_ready = False
        if body.strip():
            doc = loads_json(body)
            if not isinstance(doc, dict):
                raise InvalidInput("the index request body must be a JSON object")
            only_ready = bool(doc.get("ready", False))
        rows = await asyncio.to_thread(pool.index)
        if only_ready:
            rows = [r for r in rows if r["state"] == "READY"]
        return json_response(rows)

    @app.post("/v2/repository/models/{model_name}/load")
    async def repository_load(model_name: str) -> Response:
        await asyncio.to_thread(pool.load, model_name)
        return json_response({})

    @app.post("/v2/repository/models/{model_name}/unload")
    async def repository_unload(model_name: str) -> Response:
        await asyncio.to_thread(pool.unload, model_name)
        return json_response({})

    return app
