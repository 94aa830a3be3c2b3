"""Per-request metering: one record per inference request, a cost model, and sinks behind a small Protocol.

Lambda bills each invocation's duration rounded up to 1 ms times its memory, plus a per-request charge, and
(since 2025-08-01) its INIT phase too: the request that paid a cold start carries the INIT time. When one
invocation or one run serves many items, compute and billed time are split by rows so the parts add up exactly.
Cloud Run bills vCPU-seconds and GiB-seconds of the instance (request-based: while requests are in flight).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from operator import itemgetter
from pathlib import Path
from typing import Any, NamedTuple, Protocol, overload

import orjson

from engine.config import Settings

log = logging.getLogger("oclaw.metering")


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


def detect_platform() -> str:
    """lambda, cloudrun or local."""
    if os.environ.get("AWS_LAMBDA_FUNCTION_NAME"):
        return "lambda"
    if os.environ.get("K_SERVICE"):
        return "cloudrun"
    return "local"


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


class Meter:
    """Builds records (with cost) and sends them to the sinks; failures are retried, then spooled."""

    def __init__(self, settings: Settings, instance_id: str, *, platform_name: str | None = None) -> None:
        self.settings = settings
        self.instance_id = instance_id
        self.platform = platform_name or detect_platform()
        from engine import sinks  # it imports this module

        self._stdout = sinks  # gathers what sinks write to stdout during a flush
        self.sinks = [s for s in (sinks.make_sink(spec) for spec in settings.metering_sinks) if s is not None]
        self.price = self._price()
        self.memory_mb = int(os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "0") or 0)
        self.failures = 0
        self.spooled = 0
        self._pending: deque[MeteringRecord] = deque()  # append and popleft are atomic: no lock per request
        self._usage: deque[Usage] = deque()  # requests served alone, completed into records at flush
        #: Sinks with a spool file to re-send (left by an earlier process, or written by this one).
        self._spooled = {i for i in range(len(self.sinks)) if self.spool(i).is_file()}
        self._stop = threading.Event()
        self._flushing = threading.Lock()

    @property
    def enabled(self) -> bool:
        """False when no sink is configured (records are then not even built)."""
        return bool(self.sinks)

    def price_key(self) -> str:
        """The price-table entry for this platform, architecture and billing mode."""
        if self.platform == "lambda":
            return "lambda-arm64" if os.uname().machine in ("aarch64", "arm64") else "lambda-x86_64"
        if self.platform == "cloudrun":
            return "cloudrun-instance" if self.settings.cloudrun_billing == "instance" else "cloudrun-request"
        return "local"

    def _price(self) -> Price:
        """List price, then OCLAW_PRICE_TABLE (``key@region`` before ``key``), then single OCLAW_PRICE_* values."""
        key = self.price_key()
        base = PRICES[key]
        s = self.settings
        if s.price_table:
            try:
                table = json.loads(Path(s.price_table).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ValueError(f"OCLAW_PRICE_TABLE {s.price_table}: {exc}") from None
            region = os.environ.get("AWS_REGION") or s.region
            entry = table.get(f"{key}@{region}") or table.get(key)
            if isinstance(entry, dict):
                base = replace(
                    base,
                    **{
                        k: entry[k]
                        for k in ("gb_second", "vcpu_second", "gib_second", "request", "source")
                        if k in entry
                    },
                )
        overrides: dict[str, Any] = {
            k: v
            for k, v in (
                ("gb_second", s.price_gb_second),
                ("vcpu_second", s.price_vcpu_second),
                ("gib_second", s.price_gib_second),
                ("request", s.price_request),
            )
            if v >= 0
        }
        return replace(base, **overrides) if overrides else base

    def bill(self, billed_ms: float, requests: float = 1.0) -> tuple[float, float, float, float]:
        """(GB-s, vCPU-s, GiB-s, USD) for a billed duration and a share of requests."""
        seconds = billed_ms / 1000
        if self.platform == "lambda":
            gb_s = seconds * self.memory_mb / 1024
            return gb_s, 0.0, 0.0, gb_s * self.price.gb_second + requests * self.price.request
        vcpu_s = seconds * self.settings.cloudrun_vcpu
        gib_s = seconds * self.settings.cloudrun_memory_gib
        cost = vcpu_s * self.price.vcpu_second + gib_s * self.price.gib_second + requests * self.price.request
        return 0.0, vcpu_s, gib_s, cost

    def billed_ms(self, usage: Usage) -> int:
        """What is billed for a request served alone: its duration rounded up to 1 ms (plus INIT on Lambda)."""
        billed = -(-usage.total_us // 1000)
        if usage.init_ms and self.platform == "lambda":
            billed += math.ceil(usage.init_ms)
        return billed

    def complete(self, usage: Usage) -> MeteringRecord:
        """The metering record of a request served alone, with its bill."""
        billed = float(self.billed_ms(usage))
        gb_s, vcpu_s, gib_s, cost = self.bill(billed)
        return MeteringRecord(
            usage.request_id,
            _time_of(usage.second),
            usage.tenant,
            usage.model,
            usage.version,
            self.platform,
            self.instance_id,
            usage.cold,
            usage.items,
            usage.bytes_in,
            usage.bytes_out,
            usage.queue_us / 1000,
            usage.compute_us / 1000,
            usage.total_us / 1000,
            billed,
            gb_s,
            vcpu_s,
            gib_s,
            cost,
            usage.status,
            usage.source,
        )

    def records(
        self,
        *,
        request_ids: Sequence[str],
        tenants: Sequence[str],
        model: str,
        version: str,
        items: Sequence[int],
        bytes_in: Sequence[int],
        bytes_out: Sequence[int],
        statuses: Sequence[int],
        queue_ms: Sequence[float],
        compute_ms: float,
        total_ms: float,
        init_ms: float = 0.0,
        cold: bool = False,
        source: str,
    ) -> list[MeteringRecord]:
        """Records for requests served together: compute and billed time split by items, adding up exactly.

        ``total_ms`` is the duration billed for all of them (an invocation, or a request on a server);
        ``init_ms`` is a cold start's INIT, billed on Lambda and carried by the first request.
        """
        billed_total = math.ceil(total_ms) + (math.ceil(init_ms) if self.platform == "lambda" else 0)
        if len(request_ids) == 1:  # the common case: nothing to split
            compute, billed, totals = [compute_ms], [float(billed_total)], [total_ms]
        else:
            weights = [max(1, n) for n in items]
            compute = split_evenly(compute_ms, weights)
            billed = split_evenly(float(billed_total), weights)
            totals = split_evenly(total_ms, weights)
        request_share = 1.0 / len(request_ids)
        now = _now()
        out = []
        for i, rid in enumerate(request_ids):
            gb_s, vcpu_s, gib_s, cost = self.bill(billed[i], request_share)
            out.append(
                MeteringRecord(
                    request_id=rid,
                    time=now,
                    tenant=tenants[i],
                    model=model,
                    version=version,
                    platform=self.platform,
                    instance_id=self.instance_id,
                    cold=cold and i == 0,
                    items=items[i],
                    bytes_in=bytes_in[i],
                    bytes_out=bytes_out[i],
                    queue_ms=round(queue_ms[i], 3),
                    compute_ms=round(compute[i], 3),
                    total_ms=round(totals[i], 3),
                    billed_ms=round(billed[i], 3),
                    gb_seconds=gb_s,
                    vcpu_seconds=vcpu_s,
                    gib_seconds=gib_s,
                    cost_usd=cost,
                    status=statuses[i],
                    source=source,
                )
            )
        return out

    def start_flusher(self, interval_s: float = 1.0) -> None:
        """Flush in a background thread (servers; Lambda flushes before each invocation returns)."""

        def loop() -> None:
            while not self._stop.wait(interval_s):
                self.flush()

        threading.Thread(target=loop, name="oclaw-metering", daemon=True).start()

    def close(self) -> None:
        """Stop the flusher and send what is left."""
        self._stop.set()
        self.flush()

    def submit(self, records: Iterable[MeteringRecord]) -> None:
        """Queue records for the next flush."""
        self._pending.extend(records)

    def submit_usage(self, usage: Usage) -> bytes:
        """Queue one request's usage (one append: the record is built at flush); its ``oclaw-metering`` header."""
        self._usage.append(usage)
        return header_value(usage, self.billed_ms(usage))

    def spool(self, index: int) -> Path:
        """The spool file of the ``index``-th sink."""
        return Path(f"{self.settings.metering_spool}.{index}")

    def flush(self) -> None:
        """Send queued records (and what a sink refused earlier) to every sink; never raises, loses nothing.

        A sink that fails three times gets its batch written to its own spool file, re-sent on a later flush,
        so a failing sink never makes the healthy ones see a record twice.
        """
        usage, pending = self._usage, self._pending
        if not (usage or pending or self._spooled):  # nothing to send (a Lambda invocation with metering off)
            return
        with self._flushing:  # one flush at a time (the timer, a /metrics scrape, shutdown): spools stay consistent
            # what was queued so far; later ones wait
            usages = [usage.popleft() for _ in range(len(usage))]
            self._send(Batch(self, usages, [pending.popleft() for _ in range(len(pending))]))

    def _send(self, batch: Batch) -> None:
        stdout = self._stdout
        gathered = stdout.gather()  # what sinks write to stdout, written once below (one write a Lambda invoke)
        on_stdout: dict[int, Sequence[MeteringRecord]] = {}
        try:
            for index, sink in enumerate(self.sinks):
                records: Sequence[MeteringRecord] = batch
                if index in self._spooled:  # known without a stat (or a Path: ~2 µs) per flush (per Lambda invoke)
                    self._spooled.discard(index)
                    if self.spool(index).is_file():
                        records = Batch(self, batch.usages, self._read_spool(self.spool(index)) + batch.done)
                if not records:
                    continue
                for attempt in range(3):
                    before = len(gathered)
                    try:
                        sink.emit(records)
                        if len(gathered) > before:
                            on_stdout[index] = records
                        break
                    except Exception as exc:  # noqa: BLE001 - a sink must never fail the request
                        del gathered[before:]  # a retry writes it again
                        self.failures += 1
                        records = getattr(exc, "failed", None) or records  # retry only what a batch API refused
                        if attempt == 2:
                            self._spool(index, sink, records, exc)
        finally:
            stdout.release()
        if gathered:
            try:
                stdout.write(None, gathered)
            except Exception as exc:  # noqa: BLE001 - stdout closed or broken: keep the records
                self.failures += 1
                for index, records in on_stdout.items():
                    self._spool(index, self.sinks[index], records, exc)

    def _spool(self, index: int, sink: Any, records: Sequence[MeteringRecord], exc: Exception) -> None:
        """Keep what a sink could not take in its spool file, re-sent on a later flush."""
        log.warning("metering sink %s failed (%s); %d records spooled", type(sink).__name__, exc, len(records))
        with self.spool(index).open("ab") as fh:
            fh.write(json_lines(records))
        self.spooled += len(records)
        self._spooled.add(index)

    @staticmethod
    def _read_spool(spool: Path) -> list[MeteringRecord]:
        taken = spool.with_name(spool.name + ".sending")
        spool.replace(taken)
        records = [MeteringRecord(**json.loads(line)) for line in taken.read_text().splitlines() if line.strip()]
        taken.unlink()
        return records


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

    __slots__ = ("_bills", "_records", "done", "meter", "usages")

    def __init__(self, meter: Meter, usages: list[Usage], done: list[MeteringRecord]) -> None:
        self.meter = meter
        self.usages = usages
        self.done = done
        self._records: list[MeteringRecord] | None = None
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
        as ``MeteringRecord.json``, its own figures first. A small batch (a Lambda invocation's) is written from
        its records, built once for every sink.
        """
        dumps, newline = orjson.dumps, orjson.OPT_APPEND_NEWLINE
        tag = {} if event is None else {"event": event}
        if len(self.usages) < 16 or self._records is not None:
            out = bytearray()
            for record in self.records():
                out += dumps(record.__dict__ | tag, option=newline)
            return out
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

    def billed(self) -> list[int]:
        """Billed ms of each captured usage (``Meter.billed_ms``)."""
        if self.meter.platform == "lambda":
            return [self.meter.billed_ms(u) for u in self.usages]
        return [-(-u.total_us // 1000) for u in self.usages]  # no INIT billed off Lambda

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
