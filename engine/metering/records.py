"""What a request cost: the metering record, the usage a request captures, the price table, the response
header; ``engine/metering/batch.py`` writes a flush's records as JSON lines.

Lambda bills each invocation's duration rounded up to 1 ms times its memory, plus a per-request charge, and
(since 2025-08-01) its INIT phase too: the request that paid a cold start carries the INIT time. When one
invocation or one run serves many items, compute and billed time are split by rows so the parts add up exactly.
Cloud Run bills vCPU-seconds and GiB-seconds of the instance (request-based: while requests are in flight).
"""

from __future__ import annotations

import re
import time
from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import orjson


@dataclass(frozen=True)
class Price:
    """List prices in USD."""

    gb_second: float = 0.0
    vcpu_second: float = 0.0
    gib_second: float = 0.0
    request: float = 0.0
    source: str = ""


#: Public list prices (USD), as published by AWS and Google in 2025; override with OCLAW_PRICE_*.
PRICES: dict[str, Price] = {
    "lambda-x86_64": Price(gb_second=0.0000166667, request=0.20 / 1e6, source="AWS Lambda, us-east-1, x86_64, 2025"),
    "lambda-arm64": Price(gb_second=0.0000133334, request=0.20 / 1e6, source="AWS Lambda, us-east-1, arm64, 2025"),
    "cloudrun-request": Price(
        vcpu_second=0.000024,
        gib_second=0.0000025,
        request=0.40 / 1e6,
        source="Cloud Run, tier 1, request-based billing, 2025",
    ),
    "cloudrun-instance": Price(
        vcpu_second=0.000018, gib_second=0.000002, source="Cloud Run, tier 1, instance-based billing, 2025"
    ),
    "local": Price(source="local: no charge"),
}


@dataclass
class MeteringRecord:
    """What one inference request cost, and whom to bill."""

    request_id: str
    time: str
    tenant: str
    model: str
    version: str
    platform: str
    instance_id: str
    cold: bool
    items: int
    bytes_in: int
    bytes_out: int
    queue_ms: float
    compute_ms: float
    total_ms: float
    billed_ms: float
    gb_seconds: float
    vcpu_seconds: float
    gib_seconds: float
    cost_usd: float
    status: int
    source: str

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, in field order (a copy of the instance dict: the fastest way, and why no slots)."""
        return self.__dict__.copy()

    def json(self) -> bytes:
        """One JSON object."""
        return orjson.dumps(self.as_dict())


class Usage(NamedTuple):
    """What the request path captures: a tuple of values at hand, nothing computed or formatted.

    The flush (off the request path) turns it into a ``MeteringRecord`` with ``Meter.complete``: building the
    whole record per request cost several µs in a busy server, more than the 2 % a tiny model's request allows.
    """

    request_id: str
    tenant: str
    model: str
    version: str
    items: int
    bytes_in: int
    bytes_out: int
    queue_us: int
    compute_us: int
    total_us: int
    #: INIT to bill with this request (Lambda, the request that paid the cold start), else 0.
    init_ms: float
    cold: bool
    source: str
    #: Unix time, whole seconds.
    second: int
    status: int = 200


class Biller(Protocol):
    """What bills a usage (``engine.metering.meter.Meter``), as the sinks' one-request lines ask it."""

    platform: str
    instance_id: str

    def bill(self, billed_ms: float, requests: float = 1.0) -> tuple[float, float, float, float]:
        """(GB-s, vCPU-s, GiB-s, USD) for a billed duration and a share of requests."""

    def complete(self, usage: Usage) -> MeteringRecord:
        """The metering record of a request served alone, with its bill."""


class UsageRecorder(Protocol):
    """Captures a request's usage once it is served (``handler.v2.Recorder``)."""

    def __call__(self, model: Any, response: Any, bytes_out: int, preview: Usage | None = None) -> bytes | None:
        """Queue the request's usage for metering; its ``oclaw-metering`` header value, None when metering is off."""

    def preview(self, model: Any, response: Any) -> Usage | None:
        """The usage so far, not queued (for a request that asks for its whole record)."""

    def record(self, usage: Usage) -> MeteringRecord:
        """The whole record of a captured usage (for a request that asks for it)."""


_clock: list[Any] = [0, ""]


def _time_of(second: int) -> str:
    """UTC time to the second, formatted once per second."""
    if _clock[0] != second:
        _clock[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))]
    return str(_clock[1])


def _now() -> str:
    """The current UTC time to the second."""
    return _time_of(int(time.time()))


UNKNOWN_MODEL = "(unknown)"


def model_label(known: Container[str], name: str) -> str:
    """A model name fit for records and metric dimensions: never an arbitrary client-chosen string."""
    return name if name in known else UNKNOWN_MODEL


def split_int(total: int, weights: Sequence[int]) -> list[int]:
    """Split an integer ``total`` in proportion to ``weights``; the parts add up exactly to ``total``."""
    whole = sum(weights) or 1
    parts = [total * w // whole for w in weights]
    parts[-1] += total - sum(parts)
    return parts


def split_evenly(total: float, weights: Sequence[int], unit: float = 1e-3) -> list[float]:
    """Split ``total`` by ``weights`` in steps of ``unit`` so the parts add up exactly to ``total``."""
    return [p * unit for p in split_int(round(total / unit), weights)]


#: The response header that carries a request's own figures, an RFC 8941 dictionary:
#: ``oclaw-metering: compute-ms=0.045, billed-ms=1, cold=?0``. Its record's ``request_id`` is the request's
#: ``X-Request-Id`` when the client sent one (or ask for the whole record: ``"parameters": {"metering": true}``).
METERING_HEADER = b"oclaw-metering"

#: Header values by (compute µs, billed ms, cold): a model's requests repeat few of them, and formatting one
#: costs more than looking it up (uvicorn also scans every header byte: the value is kept short). Bounded.
HEADER_VALUES: dict[tuple[int, int, bool], bytes] = {}


def header_value(compute_us: int, billed_ms: int, cold: bool) -> bytes:
    """The ``oclaw-metering`` header value of a request, encoded (ASCII); ``HEADER_VALUES`` keeps it."""
    key = (compute_us, billed_ms, cold)
    value = HEADER_VALUES.get(key)
    if value is None:
        if len(HEADER_VALUES) >= 4096:
            HEADER_VALUES.clear()
        value = b"compute-ms=%d.%03d, billed-ms=%d, cold=?%d" % (
            compute_us // 1000,
            compute_us % 1000,
            billed_ms,
            cold,
        )
        HEADER_VALUES[key] = value
    return value


def parse_header(value: str) -> dict[str, Any]:
    """The ``oclaw-metering`` header as a dict (compute_ms, billed_ms: float; cold: bool; request_id: str)."""
    out: dict[str, Any] = {}
    for item in re.findall(r'([a-z-]+)=("(?:[^"\\]|\\.)*"|\?[01]|[0-9.]+)', value):
        key, raw = item[0].replace("-", "_"), item[1]
        if raw.startswith('"'):
            out[key] = re.sub(r"\\(.)", r"\1", raw[1:-1])
        elif raw.startswith("?"):
            out[key] = raw == "?1"
        else:
            out[key] = float(raw)
    return out


USAGE_FIELDS = ("requests", "items", "compute_ms", "billed_ms", "gb_seconds", "vcpu_seconds", "gib_seconds", "cost_usd")


def aggregate(records: Sequence[dict[str, Any]], by: Sequence[str]) -> list[dict[str, Any]]:
    """Sum metering records by some of tenant / model / day / platform / status."""
    totals: dict[tuple[str, ...], dict[str, Any]] = {}
    for record in records:
        key = tuple(str(record["time"][:10] if field == "day" else record.get(field, "")) for field in by)
        row = totals.setdefault(key, {**dict(zip(by, key, strict=True)), **dict.fromkeys(USAGE_FIELDS, 0)})
        row["requests"] += 1
        for name in USAGE_FIELDS[1:]:
            row[name] += record.get(name, 0)
    return [totals[k] for k in sorted(totals)]
