"""Run the HTTP app under uvicorn: preload overlapping imports, log the cold start, drain on SIGTERM."""

from __future__ import annotations

import logging
import signal
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


def serve(settings: Settings, *, host: str, port: int, started_ns: int) -> int:
    """Serve until SIGTERM/SIGINT; in-flight requests finish (up to OCLAW_DRAIN_TIMEOUT_S) before exit."""
    runtime = get_runtime(settings)
    runtime.start_preload()  # session creation runs while the web stack imports
    t_imports = perf_counter_ns()
    import uvicorn

    from handler.asgi import ServerApp

    imports_ms = (perf_counter_ns() - t_imports) / 1e6

    def report() -> None:
        """One structured cold-start record, logged once the pool is warm and before the port opens."""
        models = {
            f"{m.name}/{m.version}": {
                "session_ms": round(m.session_ms, 1),
                "warmup_ms": round(m.warmup_ms, 1),
                "prepared": m.prepared,
            }
            for m in runtime.pool.loaded()
        }
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
        runtime.meter.start_flusher()
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
        timeout_graceful_shutdown=int(settings.drain_timeout_s),
        server_header=False,
    )
    server = uvicorn.Server(config)
    # uvicorn drains, then re-raises the captured SIGTERM/SIGINT; a no-op handler turns that into a clean exit 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    runtime.meter.close()
    runtime.close()
    return 0 if server.started else 3  # 3: start-up failed (uvicorn's own code), e.g. an unreadable repository
