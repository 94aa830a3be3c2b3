"""What a request cost: the metering record, the usage a request captures, the price table, the response
header, and ``Batch`` (one flush's records as the sinks see them).

Lambda bills each invocation's duration rounded up to 1 ms times its memory, plus a per-request charge, and
(since 2025-08-01) its INIT phase too: the request that paid a cold start carries the INIT time. When one
invocation or one run serves many items, compute and billed time are split by rows so the parts add up exactly.
Cloud Run bills vCPU-seconds and GiB-seconds of the instance (request-based: while requests are in flight).
"""

from __future__ import annotations

import re
import time
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, overload

import orjson

if TYPE_CHECKING:  # pragma: no cover
    from engine.metering import Meter


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


class UsageRecorder(Protocol):
    """Captures a request's usage once it is served (``handler.v2.Recorder``)."""

    def __call__(self, model: Any, response: Any, bytes_out: int) -> Usage | None:
        """The request's usage, or None when metering is off."""

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
#: ``oclaw-metering: compute-ms=0.045, billed-ms=1, cold=?0, request-id="i-3f2a-17"``.
METERING_HEADER = b"oclaw-metering"


def _sf_string(text: str) -> str:
    """An RFC 8941 sf-string: printable ASCII, backslash and quote escaped; other characters become '?'."""
    if not (text.isascii() and text.isprintable()):
        text = "".join(c if " " <= c <= "~" else "?" for c in text)
    if "\\" in text or '"' in text:
        text = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def header_value(usage: Usage, billed_ms: int) -> bytes:
    """The ``oclaw-metering`` header value of a request, encoded (ASCII)."""
    rid = usage.request_id
    if not (rid.isascii() and rid.isprintable()) or '"' in rid or "\\" in rid:  # ids we make never are
        rid = _sf_string(rid)[1:-1]
    compute = usage.compute_us
    return b'compute-ms=%d.%03d, billed-ms=%d, cold=?%d, request-id="%b"' % (
        compute // 1000,
        compute % 1000,
        billed_ms,
        usage.cold,
        rid.encode(),
    )


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


def json_lines(records: Sequence[MeteringRecord], event: str | None = None) -> bytes | bytearray:
    """Records as JSON Lines (with an ``event`` field when given); a ``Batch`` writes its own, faster."""
    if isinstance(records, Batch):
        return records.json_lines(event)
    tag = {} if event is None else {"event": event}
    return b"".join(orjson.dumps(r.__dict__ | tag, option=orjson.OPT_APPEND_NEWLINE) for r in records)


class Batch(Sequence[MeteringRecord]):
    """The records of one flush: a ``Sequence[MeteringRecord]`` for any sink, built lazily.

    Requests served alone stay the ``Usage`` tuples the request path captured until a sink asks for record
    objects: the built-in sinks take JSON lines (``json_lines``) or columns (``columns``) straight from them,
    ~1 µs a request instead of ~4 for building each record and serialising it. ``done`` holds records already
    built (batch paths, failures, a spool being re-sent).
    """

    __slots__ = ("_billed", "_bills", "_records", "done", "meter", "usages")

    def __init__(self, meter: Meter, usages: list[Usage], done: list[MeteringRecord]) -> None:
        self.meter = meter
        self.usages = usages
        self.done = done
        self._records: list[MeteringRecord] | None = None
        self._billed: list[int] | None = None
        self._bills: dict[int, tuple[float, float, float, float]] = {}

    def __len__(self) -> int:
        return len(self.usages) + len(self.done)

    @overload
    def __getitem__(self, index: int) -> MeteringRecord: ...

    @overload
    def __getitem__(self, index: slice) -> list[MeteringRecord]: ...

    def __getitem__(self, index: int | slice) -> MeteringRecord | list[MeteringRecord]:
        return self.records()[index]

    def __iter__(self) -> Iterator[MeteringRecord]:
        return iter(self.records())

    def records(self) -> list[MeteringRecord]:
        """Every record as an object (built once)."""
        if self._records is None:
            self._records = [self.meter.complete(u) for u in self.usages] + self.done
        return self._records

    def _bill(self, billed: int) -> tuple[float, float, float, float]:
        """``Meter.bill`` of a request billed ``billed`` ms, computed once per distinct value."""
        bill = self._bills.get(billed)
        if bill is None:
            bill = self._bills[billed] = self.meter.bill(float(billed))
        return bill

    def json_lines(self, event: str | None = None) -> bytearray:
        """One JSON object a line, in ``records()`` order, each with an ``event`` field when given.

        A request's own figures are serialised per line; what it shares with others served in the same second
        (time, tenant, model, cold, bill, status...) once, then appended: lines carry the same fields and values
        as ``MeteringRecord.json``, its own figures first. A small batch (a Lambda invocation's) has little to
        share: each line is one object, in the record's field order.
        """
        dumps, newline = orjson.dumps, orjson.OPT_APPEND_NEWLINE
        tag = {} if event is None else {"event": event}
        if self._records is not None:
            out = bytearray()
            for record in self._records:
                out += dumps(record.__dict__ | tag, option=newline)
            return out
        if len(self.usages) < 16:
            return self._own_lines(tag)
        platform, instance = self.meter.platform, self.meter.instance_id
        shared: dict[tuple[Any, ...], bytes] = {}
        out = bytearray()
        for usage, billed in zip(self.usages, self.billed(), strict=True):
            (
                rid,
                tenant,
                model,
                version,
                items,
                size_in,
                size_out,
                queue,
                compute,
                total,
                _,
                cold,
                source,
                second,
                status,
            ) = usage
            key = (second, tenant, model, version, cold, billed, status, source)
            tail = shared.get(key)
            if tail is None:
                gb_s, vcpu_s, gib_s, cost = self._bill(billed)
                tail = shared[key] = dumps(
                    {
                        "time": _time_of(second),
                        "tenant": tenant,
                        "model": model,
                        "version": version,
                        "platform": platform,
                        "instance_id": instance,
                        "cold": cold,
                        "billed_ms": float(billed),
                        "gb_seconds": gb_s,
                        "vcpu_seconds": vcpu_s,
                        "gib_seconds": gib_s,
                        "cost_usd": cost,
                        "status": status,
                        "source": source,
                        **tag,
                    },
                    option=newline,
                )[1:]
            own = {
                "request_id": rid,
                "items": items,
                "bytes_in": size_in,
                "bytes_out": size_out,
                "queue_ms": queue / 1000,
                "compute_ms": compute / 1000,
                "total_ms": total / 1000,
            }
            out += dumps(own)
            out[-1] = 44  # the closing brace becomes a comma
            out += tail
        for record in self.done:
            out += dumps(record.__dict__ | tag, option=newline)
        return out

    def _own_lines(self, tag: dict[str, str]) -> bytearray:
        """``json_lines`` of a few usages and the done records: one object a line."""
        dumps, newline = orjson.dumps, orjson.OPT_APPEND_NEWLINE
        platform, instance = self.meter.platform, self.meter.instance_id
        out = bytearray()
        for usage, billed in zip(self.usages, self.billed(), strict=True):
            (
                rid,
                tenant,
                model,
                version,
                items,
                size_in,
                size_out,
                queue,
                compute,
                total,
                _,
                cold,
                source,
                second,
                status,
            ) = usage
            gb_s, vcpu_s, gib_s, cost = self._bill(billed)
            line = {
                "request_id": rid,
                "time": _time_of(second),
                "tenant": tenant,
                "model": model,
                "version": version,
                "platform": platform,
                "instance_id": instance,
                "cold": cold,
                "items": items,
                "bytes_in": size_in,
                "bytes_out": size_out,
                "queue_ms": queue / 1000,
                "compute_ms": compute / 1000,
                "total_ms": total / 1000,
                "billed_ms": float(billed),
                "gb_seconds": gb_s,
                "vcpu_seconds": vcpu_s,
                "gib_seconds": gib_s,
                "cost_usd": cost,
                "status": status,
                "source": source,
            }
            out += dumps(line | tag if tag else line, option=newline)
        for record in self.done:
            out += dumps(record.__dict__ | tag, option=newline)
        return out

    def billed(self) -> list[int]:
        """Billed ms of each captured usage (``Meter.billed_ms``), computed once."""
        if self._billed is None:
            self._billed = list(map(self.meter.billed_ms, self.usages))
        return self._billed

    def figures(self) -> list[tuple[str, int, bool, float, float, float, bool, float]]:
        """What metrics are made of, per record in ``records()`` order (see ``figures_of``), without the records."""
        out = []
        for usage, billed in zip(self.usages, self.billed(), strict=True):
            failed = usage[14] >= 400
            out.append(
                (
                    usage[2] or "-",
                    usage[4],
                    failed,
                    usage[8] / 1000,
                    float(billed),
                    self._bill(billed)[3],
                    usage[11],
                    usage[9] / 1000,
                )
            )
        out += map(figures_of, self.done)
        return out

    def columns(self) -> tuple[list[tuple[str, str, int]], Any]:
        """What metrics are made of, in ``records()`` order: (model, version, status) per record, and a float64
        array of (total_ms, queue_ms, compute_ms, items, billed_ms, cost_usd, cold) rows."""
        import numpy as np

        usages, n = self.usages, len(self.usages)
        rows = np.empty((len(self), 7))
        keys = list(map(itemgetter(2, 3, 14), usages))  # model, version, status
        if n:
            for column, field in ((0, 9), (1, 7), (2, 8), (3, 4), (6, 11)):  # total, queue, compute µs; items; cold
                rows[:n, column] = np.fromiter(map(itemgetter(field), usages), np.float64, n)
            rows[:n, :3] /= 1000
            billed, where = np.unique(np.array(self.billed(), dtype=np.int64), return_inverse=True)
            rows[:n, 4] = billed[where]
            rows[:n, 5] = np.array([self._bill(int(b))[3] for b in billed])[where]
        for i, r in enumerate(self.done, len(self.usages)):
            keys.append((r.model, r.version, r.status))
            rows[i] = (r.total_ms, r.queue_ms, r.compute_ms, r.items, r.billed_ms, r.cost_usd, r.cold)
        return keys, rows


def figures_of(r: MeteringRecord) -> tuple[str, int, bool, float, float, float, bool, float]:
    """What the EMF metrics read of a record: (model, items, failed, compute ms, billed ms, cost, cold, total ms)."""
    return (r.model or "-", r.items, r.status >= 400, r.compute_ms, r.billed_ms, r.cost_usd, r.cold, r.total_ms)


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
