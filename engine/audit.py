"""The audit log: one record per inference and per model operation (load, unload, warm, publish, optimize), denied
requests included; who (the key's id and name, its tenant: never the key), what, on which model, how it ended.

Records go to the sinks of OCLAW_AUDIT_SINKS through a ``Meter`` of their own: the metering sinks' guarantees
(a bounded flush, three tries, a spool of their own under OCLAW_AUDIT_SPOOL for what a sink refused, re-sent by a
later flush, ``close`` sends what is left). Built by ``Runtime.audit`` only when the audit log is on, so a Lambda
INIT without it imports nothing of this module.
"""

from __future__ import annotations

import getpass
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from engine.config import Settings, invalid
from engine.errors import ConfigError
from engine.metering import sinks as sink_kinds
from engine.metering.batch import json_lines
from engine.metering.meter import FLUSH_TIMEOUT_S, Meter
from engine.metering.records import _now

if TYPE_CHECKING:  # pragma: no cover
    from engine.auth import KeyRing, Principal
    from engine.errors import OclawError

#: What a record's ``outcome`` says: served, failed (its status says why), refused by access control.
OUTCOMES = ("ok", "error", "denied")
#: Actions a record names; ``read`` is a refused request for any other route (metadata, statistics, ...).
ACTIONS = ("infer", "load", "unload", "warm", "publish", "optimize", "read")


_PATHS = (
    ("infer", re.compile(r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")),
    ("load", re.compile(r"/v2/repository/models/(?P<model>[^/]+)/load")),
    ("unload", re.compile(r"/v2/repository/models/(?P<model>[^/]+)/unload")),
    ("warm", re.compile(r"/v2/warm")),
)


def action_of(path: str) -> tuple[str, str, str]:
    """(action, model, version) a request path names: ``read`` for the routes that are no audited action."""
    path = path.rstrip("/") or "/"
    for action, pattern in _PATHS:
        if match := pattern.fullmatch(path):
            found = match.groupdict()
            return action, found.get("model") or "", found.get("version") or ""
    return "read", "", ""


@dataclass
class AuditRecord:
    """Who did what to which model, from where, and how it ended."""

    event: str
    time: str
    instance_id: str
    platform: str
    action: str
    outcome: str
    #: The HTTP status (an event's own for S3 and SQS records); the exit code for ``source: cli``.
    status: int
    model: str
    version: str
    #: The API key's id (the public part of ``oclaw_<id>_...``) and name; empty without a key.
    key_id: str
    key_name: str
    tenant: str
    request_id: str
    #: The front door: ``http``, ``lambda-http``, ``lambda-direct``, ``s3``, ``sqs``, ``warm`` or ``cli``.
    source: str
    #: The client's address as the platform saw it (the TCP peer, an HTTP event's ``sourceIp``); empty if unknown.
    source_ip: str
    #: The OS user of a ``cli`` record; empty elsewhere.
    user: str = ""

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, in field order."""
        return self.__dict__.copy()

    def json(self) -> bytes:
        """One JSON object."""
        return orjson.dumps(self.__dict__)


class AuditLogSink(sink_kinds.LineSink):
    """Audit records as JSON lines on stdout (each carries ``"event": "audit"``), one write a flush."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream

    def lines(self, records: Sequence[Any]) -> bytes | bytearray:
        return json_lines(records)


SINKS = "log, jsonl:PATH, sqs:QUEUE_URL, kinesis:STREAM, firehose:STREAM, callback:module:function, class:module:Class"


def make_sink(spec: str) -> Any:
    """A sink from its OCLAW_AUDIT_SINKS entry: the metering sinks that keep whole records (not ``emf``, which keeps
    metrics only, nor ``log:packed``: an audit record stands alone)."""
    if spec == "log":
        return AuditLogSink()
    kind = spec.partition(":")[0]
    if kind in ("log", "emf", "none", "auto"):
        why = "auto and none stand alone" if kind in ("auto", "none") else f"{spec} is no audit sink"
        raise invalid("OCLAW_AUDIT_SINKS", spec, f"{why}; use {SINKS}")
    try:
        return sink_kinds.make_sink(spec)
    except (ValueError, ImportError, AttributeError) as exc:
        raise invalid("OCLAW_AUDIT_SINKS", spec, f"{exc}") from None


class Auditor:
    """Makes audit records and has them delivered (queued, flushed once a second on a server, before a Lambda
    invocation returns, and at ``close``)."""

    def __init__(self, settings: Settings, instance_id: str, *, platform_name: str | None = None) -> None:
        specs = settings.audit_sink_specs
        if "none" in settings.audit_sinks and len(settings.audit_sinks) > 1:
            raise ConfigError(f"OCLAW_AUDIT_SINKS={','.join(settings.audit_sinks)}: none stands alone")
        self.delivery = Meter(
            settings,
            instance_id,
            platform_name=platform_name,
            sinks=[make_sink(spec) for spec in specs],
            spool=settings.audit_spool,
            record_type=AuditRecord,
            name="audit",
        )

    @property
    def instance_id(self) -> str:
        """The instance id records carry (a SnapStart restore sets a new one)."""
        return self.delivery.instance_id

    @instance_id.setter
    def instance_id(self, value: str) -> None:
        self.delivery.instance_id = value

    def record(
        self,
        action: str,
        outcome: str,
        status: int,
        *,
        model: str = "",
        version: str = "",
        principal: Principal | None = None,
        tenant: str = "",
        request_id: str = "",
        source: str = "",
        source_ip: str = "",
        user: str = "",
    ) -> None:
        """Queue one record; ``principal``: the request's key (its id, name and tenant recorded, never the key)."""
        key_id = key_name = ""
        if principal is not None:
            key_id, key_name, tenant = principal.key_id, principal.name, principal.tenant
        record: Any = AuditRecord(  # delivered as the metering records are (``Meter`` types them so)
            "audit",
            _now(),
            self.delivery.instance_id,
            self.delivery.platform,
            action,
            outcome,
            status,
            model,
            version,
            key_id,
            key_name,
            tenant,
            request_id,
            source,
            source_ip,
            user,
        )
        self.delivery.submit((record,))

    def denied(
        self,
        path: str,
        exc: OclawError,
        keys: KeyRing,
        key: str | None,
        *,
        request_id: str,
        source: str,
        source_ip: str,
    ) -> None:
        """The record of a request access control refused (401, 403, 429): the action its path names, and the key
        it carried when that key is known (a 403 or 429; a 401 names no key, not even the id it claimed)."""
        from engine.auth import Unauthenticated

        action, model, version = action_of(path)
        principal = None if isinstance(exc, Unauthenticated) else keys.identify(key)
        self.record(
            action,
            "denied",
            int(exc.status),
            model=model,
            version=version,
            principal=principal,
            request_id=request_id,
            source=source,
            source_ip=source_ip,
        )

    def command(self, action: str, code: int, *, model: str = "", version: str = "") -> None:
        """The record of a CLI command (``publish``, ``optimize``) that ended with exit code ``code``."""
        self.record(
            action,
            "ok" if code == 0 else "error",
            code,
            model=model,
            version=version,
            request_id=f"{self.delivery.instance_id}-{os.getpid()}",
            source="cli",
            user=_user(),
        )

    def flush(self, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Send what is queued (and what a sink refused before) within ``timeout_s``; never raises."""
        self.delivery.flush(timeout_s)

    def start_flusher(self) -> None:
        """Flush once a second in a background thread (servers)."""
        self.delivery.start_flusher()

    def close(self) -> None:
        """Stop the flusher and send what is left."""
        self.delivery.close()


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name (a container's numeric uid)
        return str(os.getuid())


def for_command(settings: Settings) -> Auditor | None:
    """An Auditor for a CLI command (None when the audit log is off)."""
    return Auditor(settings, os.urandom(8).hex()) if settings.audit_sink_specs else None
