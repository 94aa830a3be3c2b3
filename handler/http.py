"""The V2 / Open Inference Protocol HTTP API (FastAPI); thin: parse, call the engine, encode."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine import __version__
from engine.errors import InvalidInput, OclawError, Unsupported
from engine.model import LoadedModel
from engine.runtime import Runtime
from engine.tensors import loads_json
from handler import openapi, v2
from handler.asgi import (
    KeyCheck,
    audited,
    error_response,
    infer,
    json_response,
    oclaw_error_response,
    read_body,
    reply_response,
)

log = logging.getLogger("oclaw.http")


def create_app(
    runtime: Runtime,
    *,
    preload: bool = True,
    on_ready: Callable[[], None] | None = None,
    checked_before: bool = False,
) -> FastAPI:
    """The FastAPI app serving ``runtime``; with ``preload`` its lifespan waits for the model pool.

    With API keys (OCLAW_API_KEYS) every request is checked on the path this app routes on, unless ``oclaw serve``'s
    front door checked it already; ``checked_before``: requests were counted against their key's rate limit.
    """
    pool = runtime.pool

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if preload:
            await asyncio.to_thread(runtime.wait_preloaded)
        if on_ready is not None:
            on_ready()
        yield

    app = FastAPI(title="oclaw", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.openapi = functools.partial(openapi.document, app)  # type: ignore[method-assign]
    if runtime.keys is not None:
        app.add_middleware(KeyCheck, keys=runtime.keys, charge=not checked_before, runtime=runtime)

    # -- inference (the hot path) ----------------------------------------------------------------------
    # A plain Starlette route, registered before every other route: it is matched first (routes are tried
    # in order) and skips FastAPI's per-request parameter solving; path parameters are read directly.

    async def infer_route(request: Request) -> Response:
        params = request.path_params
        return await infer(runtime, request, params["model_name"], params.get("model_version"))

    app.add_route("/v2/models/{model_name}/infer", infer_route, methods=["POST"], include_in_schema=False)
    app.add_route(
        "/v2/models/{model_name}/versions/{model_version}/infer", infer_route, methods=["POST"], include_in_schema=False
    )

    @app.exception_handler(OclawError)
    async def _oclaw_error(_: Request, exc: OclawError) -> Response:
        return oclaw_error_response(exc)

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

    @app.post("/v2/warm")
    async def warm(request: Request) -> Response:
        """One synthetic inference per loaded model (a scheduled warm ping); 503 while not ready."""
        loop = asyncio.get_running_loop()
        warmed = {}
        with audited(runtime, request, "warm") as details:
            for model in pool.loaded():
                # on the model's own threads, so a ping queues behind real requests (OCLAW_MODEL_CONCURRENCY)
                ms = await loop.run_in_executor(model.executor, model.ping)
                warmed[f"{model.name}/{model.version}"] = round(ms, 3)
            ok = pool.ready()
            details["status"] = 200 if ok else 503
        body: dict[str, object] = {
            "instance_id": runtime.instance_id,
            "cold": runtime.cold,
            "ready": ok,
            "models_warmed": sorted(warmed),
            "warm_ms": warmed,
        }
        if not ok:
            states = pool.states().items()
            waiting = [f"{n}: {s['state']} {s['reason'] or ''}".strip() for n, s in states if s["state"] != "READY"]
            body["error"] = "not ready: " + ("; ".join(waiting) or "no model loaded")
        return json_response(body, 200 if ok else 503)

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
    async def repository_load(model_name: str, request: Request) -> Response:
        with audited(runtime, request, "load", model_name) as details:
            repository_parameters(await read_body(request, 1 << 20), "load", ())
            await asyncio.to_thread(pool.load, model_name)
            details["version"] = ",".join(map(str, pool.versions(model_name)))
        return json_response({})

    @app.post("/v2/repository/models/{model_name}/unload")
    async def repository_unload(model_name: str, request: Request) -> Response:
        with audited(runtime, request, "unload", model_name) as details:
            details["version"] = ",".join(map(str, pool.versions(model_name)))
            # tritonclient always sends unload_dependents; oclaw has no ensembles, so there are none to unload
            repository_parameters(await read_body(request, 1 << 20), "unload", ("unload_dependents",))
            await asyncio.to_thread(pool.unload, model_name)
        return json_response({})

    return app


def repository_parameters(body: bytes, action: str, accepted: tuple[str, ...]) -> dict[str, Any]:
    """The ``parameters`` of a repository load/unload request (an empty body: none); 400 for a body that is not
    a JSON object, 501 for a parameter oclaw does not act on (a config override, model files)."""
    if not body.strip():
        return {}
    try:
        doc = loads_json(body)
    except InvalidInput as exc:
        raise InvalidInput(f"the {action} request body: {exc.message}") from None
    if not isinstance(doc, dict):
        raise InvalidInput(f"the {action} request body must be a JSON object, got {type(doc).__name__}")
    if unknown := sorted(set(doc) - {"parameters"}):
        raise InvalidInput(f"the {action} request has unknown keys {unknown}; only 'parameters' is read")
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidInput(f"the {action} request's 'parameters' must be an object")
    if ignored := sorted(set(params) - set(accepted)):
        raise Unsupported(
            f"the {action} request's parameters {ignored} are not supported: a model loads from its files and "
            "oclaw.json in the repository, as they are"
        )
    if wrong := sorted(k for k, v in params.items() if not isinstance(v, bool)):
        raise InvalidInput(f"the {action} request's parameters {wrong} must be true or false")
    return params
