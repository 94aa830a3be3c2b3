"""Optional OpenTelemetry tracing for `oclaw serve` (OCLAW_OTEL=true; `pip install 'oclaw[otel]'`).

One server span per HTTP request (OpenTelemetry's ASGI middleware), with the model, version, rows and request id
as attributes on infer requests. Spans go to the tracer provider the process has; when none is set, an OTLP
exporter is configured from the standard OTEL_EXPORTER_OTLP_* variables if its package is installed.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("oclaw.otel")


def wrap(app: Any) -> Any:
    """The app inside OpenTelemetry's ASGI middleware (a tracer provider is set up if none exists)."""
    from opentelemetry import trace
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    if type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider":  # nothing configured yet
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": "oclaw"}))
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        except ImportError:
            log.warning("OCLAW_OTEL: no exporter (pip install opentelemetry-exporter-otlp-proto-http); spans dropped")
        trace.set_tracer_provider(provider)
    return OpenTelemetryMiddleware(app)


def annotate(*, model: str, version: str, rows: int, request_id: str) -> None:
    """Infer attributes on the current request's span."""
    from opentelemetry import trace

    span = trace.get_current_span()
    span.set_attribute("oclaw.model", model)
    span.set_attribute("oclaw.model_version", version)
    span.set_attribute("oclaw.rows", rows)
    span.set_attribute("oclaw.request_id", request_id)
