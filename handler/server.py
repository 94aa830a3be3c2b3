"""Run the HTTP app under uvicorn: preload overlapping imports, log the cold start, drain on SIGTERM."""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
from time import perf_counter_ns
from typing import Any

from engine.config import Settings
from engine.runtime import Runtime, get_runtime

log = logging.getLogger("oclaw.server")


def _hash_models(runtime: Runtime) -> None:
    for model in runtime.pool.loaded():
        log.info("model %s/%s sha256 %s", model.name, model.version, model.sha256)


def bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound but not listening: a port in use fails here, before any model loads.

    Connections are refused until uvicorn listens on it, after the lifespan has waited for the warm pool, so a TCP
    startup probe still sees the port open only when the models are ready. OSError when the address is taken.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # as uvicorn does: a previous run's connections in TIME_WAIT do not block a restart; a listener still does
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def serve(settings: Settings, *, sock: socket.socket, started_ns: int) -> int:
    """Serve on a socket from ``bind`` until SIGTERM/SIGINT; in-flight requests finish first (OCLAW_DRAIN_TIMEOUT_S)."""
    host, port = sock.getsockname()[:2]
    runtime = get_runtime(settings)
    audit = runtime.audit  # built before any model loads: a bad OCLAW_AUDIT_SINKS stops the start-up here
    runtime.start_preload()  # session creation runs while the web stack imports
    t_imports = perf_counter_ns()
    import uvicorn

    from handler.asgi import ServerApp

    imports_ms = (perf_counter_ns() - t_imports) / 1e6

    def report() -> None:
        """One structured cold-start record, logged once the pool is warm and before the port opens."""
        models = {f"{m.name}/{m.version}": m.load_record() for m in runtime.pool.loaded()}
        record = {
            "event": "cold_start",
            "instance_id": runtime.instance_id,
            "platform": "server",
            "web_imports_ms": round(imports_ms, 1),
            # fetching a remote (s3://) repository into the local cache, part of preload_ms; 0 for a local one
            "fetch_ms": round(runtime.fetch_ms, 1),
            "preload_ms": runtime.preload_ms,
            "models": models,
            "ready": runtime.pool.ready(),
            # the full FastAPI app loads on the first non-data-plane request, never on the cold path
            "fastapi_loaded": "fastapi" in sys.modules,
            "total_ms": round((perf_counter_ns() - started_ns) / 1e6, 1),
        }
        if runtime.repository.remote:
            record["fetch"] = {"source": runtime.repository.source, **runtime.fetch.as_dict()}
        log.info("cold_start", extra={"oclaw": record})
        if not runtime.repository.models():
            log.warning(
                "model repository %s holds no models (expected <model>/<version>/model.onnx): the server is ready "
                "but serves nothing until a model is added and loaded through /v2/repository/models/<name>/load",
                runtime.repository.source,
            )
        log.info("serving on http://%s:%d", f"[{host}]" if ":" in host else host, port)
        runtime.meter.start_flusher()
        if audit is not None:
            audit.start_flusher()
        # record every model file's sha256 off the cold path (the manifest's checksums were verified at load)
        threading.Thread(target=_hash_models, args=(runtime,), name="oclaw-sha256", daemon=True).start()

    def full_app() -> Any:
        from handler.http import create_app

        return create_app(runtime, preload=False)

    app: Any = ServerApp(runtime, full_app, on_ready=report)
    if settings.otel:
        from handler import otel

        app = otel.wrap(app)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=settings.log_level.lower(),
        access_log=False,
        log_config=None,  # its records go through oclaw's handler (engine.logs.configure(root=True))
        timeout_graceful_shutdown=int(settings.drain_timeout_s),
        server_header=False,
    )
    server = uvicorn.Server(config)
    # uvicorn drains, then re-raises the captured SIGTERM/SIGINT; a no-op handler turns that into a clean exit 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    runtime.meter.close()
    if audit is not None:
        audit.close()
    runtime.close()
    return 0 if server.started else 3  # 3: start-up failed (uvicorn's own code), e.g. an unreadable repository
