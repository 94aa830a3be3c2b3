"""Structured JSON logs with request and correlation ids, set per request through context variables.

The keys follow Powertools Logger's (``level``, ``location``, ``message``, ``timestamp``, ``service``,
``function_request_id``, ``correlation_id``, ``xray_trace_id``, ``cold_start``) so existing CloudWatch Logs
Insights queries work; the formatter is a few lines of stdlib instead of Powertools' ~50 ms import on INIT.
"""

from __future__ import annotations

import contextvars
import logging
import os
import time
from typing import Any

import orjson

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("oclaw_request_id", default=None)
correlation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("oclaw_correlation_id", default=None)
cold_start: contextvars.ContextVar[bool | None] = contextvars.ContextVar("oclaw_cold_start", default=None)


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def __init__(self, service: str = "oclaw") -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "level": record.levelname,
            "location": f"{record.funcName}:{record.lineno}",
            "message": record.getMessage(),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "service": self.service,
            "logger": record.name,
        }
        for key, var in (
            ("function_request_id", request_id),
            ("correlation_id", correlation_id),
            ("cold_start", cold_start),
        ):
            value = var.get()
            if value is not None:
                doc[key] = value
        trace = os.environ.get("_X_AMZN_TRACE_ID")
        if trace:
            doc["xray_trace_id"] = trace.split(";", 1)[0].removeprefix("Root=")
        fields = getattr(record, "oclaw", None)
        if isinstance(fields, dict):
            doc.update(fields)  # structured fields passed as extra={"oclaw": {...}}
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class TextFormatter(logging.Formatter):
    """``time level logger message`` plus the structured fields as JSON."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "oclaw", None)
        return f"{text} {orjson.dumps(fields, default=str).decode()}" if isinstance(fields, dict) else text


#: Loggers of the web stack ``oclaw serve`` runs: routed through oclaw's handler (``configure(root=True)``).
SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


def configure(level: str = "INFO", fmt: str = "json", *, root: bool = False) -> None:
    """Route the ``oclaw`` loggers to stderr (text) or stdout (JSON, for log collectors); idempotent.

    ``root``: the process is oclaw's own (``oclaw serve``), so every library's records (uvicorn's start-up and
    error lines, warnings of other libraries) take the same handler — one JSON object per line on stdout. On Lambda
    the runtime owns the root logger, so only ``oclaw`` is routed.
    """
    import sys

    handler = logging.StreamHandler(sys.stdout if fmt == "json" else sys.stderr)
    handler._oclaw = True  # type: ignore[attr-defined]
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    targets = [logging.getLogger("oclaw")]
    if root:
        targets.append(logging.getLogger())
        for name in SERVER_LOGGERS:  # uvicorn gets no handlers of its own (log_config=None): records propagate
            library = logging.getLogger(name)
            library.handlers.clear()
            library.propagate = True
    for logger in targets:
        for old in list(logger.handlers):
            if getattr(old, "_oclaw", False):
                logger.removeHandler(old)
        logger.addHandler(handler)
    logging.getLogger("oclaw").setLevel(level.upper())
    logging.getLogger("oclaw").propagate = False
    if root:
        logging.getLogger().setLevel(max(logging.getLevelName(level.upper()), logging.WARNING))
        for name in SERVER_LOGGERS[:2]:
            logging.getLogger(name).setLevel(level.upper())


def find_event(text: str, event: str) -> dict[str, Any] | None:
    """The first structured record ``{"event": event, ...}`` in log text (JSON or text format lines)."""
    for line in text.splitlines():
        start = line.find("{")
        if start < 0 or event not in line:
            continue
        try:
            doc = orjson.loads(line[start:])
        except orjson.JSONDecodeError:
            continue
        if isinstance(doc, dict) and doc.get("event") == event:
            return dict(doc)
    return None
