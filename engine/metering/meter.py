"""Per-request metering: ``Meter`` bills captured usages and sends the records to the sinks, once a second on a
server and before every Lambda invocation returns; what a record is lives in ``engine/metering/records.py``.

A flush has a deadline (on Lambda the invocation's remaining time less a reserve, on a server ``FLUSH_TIMEOUT_S``):
no try starts after it and the queue sinks bound each call by it (``sinks.time_left``); what a sink did not take
by then is spooled (``engine/metering/spool.py``) and re-sent by a later flush.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from engine.config import Settings
from engine.metering import sinks as sink_kinds
from engine.metering.records import PRICES, MeteringRecord, Price, Usage, _now, _time_of, header_value, split_evenly
from engine.metering.spool import Spool

log = logging.getLogger("oclaw.metering")

#: How long a server's flush may take (the flush thread, a /metrics scrape, shutdown); Lambda passes its own.
FLUSH_TIMEOUT_S = 5.0
#: Usages and records queued at most: past it (a sink stuck beyond the flush's bounds), they go to the spools.
MAX_QUEUED = 50_000


def price_overrides(settings: Settings) -> dict[str, float]:
    """The single ``OCLAW_PRICE_*`` values that are set (>= 0), by the price field each replaces."""
    pairs = (
        ("gb_second", settings.price_gb_second),
        ("vcpu_second", settings.price_vcpu_second),
        ("gib_second", settings.price_gib_second),
        ("request", settings.price_request),
    )
    return {k: v for k, v in pairs if v >= 0}


def detect_platform() -> str:
    """lambda, cloudrun or local."""
    if os.environ.get("AWS_LAMBDA_FUNCTION_NAME"):
        return "lambda"
    if os.environ.get("K_SERVICE"):
        return "cloudrun"
    return "local"


class Meter:
    """Builds records (with cost) and sends them to the sinks; failures are retried, then spooled."""

    def __init__(
        self,
        settings: Settings,
        instance_id: str,
        *,
        platform_name: str | None = None,
        sinks: Sequence[Any] | None = None,
        spool: str | None = None,
        record_type: Any = MeteringRecord,
        name: str = "metering",
    ) -> None:
        """``sinks``, ``spool``, ``record_type`` and ``name`` deliver other records (the audit log's) the same way:
        queued, retried, spooled apart."""
        self.settings = settings
        self.instance_id = instance_id
        self.platform = platform_name or detect_platform()
        self.name = name
        self.record_type = record_type
        self.spool_base = settings.metering_spool if spool is None else spool
        if sinks is None:
            sinks = [s for s in (sink_kinds.make_sink(spec) for spec in settings.metering_sinks) if s is not None]
        self.sinks = list(sinks)
        self.price = self._price()
        self.memory_mb = int(os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "0") or 0)
        self.failures = 0
        self.spooled = 0
        #: Usages and records queued at most (``MAX_QUEUED``); past it they are spooled.
        self.max_queued = MAX_QUEUED
        self._pending: deque[MeteringRecord] = deque()  # append and popleft are atomic: no lock per request
        self._usage: deque[Usage] = deque()  # requests served alone, completed into records at flush
        #: Sinks with spool files to re-send (left by an earlier process, or written by this one).
        self._spooled = {i for i in range(len(self.sinks)) if self.spool(i).files()}
        self._stop = threading.Event()
        self._flushing = threading.Lock()
        #: What crossed the queue bound, taken out of the queues and waiting for the spill thread to spool it.
        self._to_spill: list[tuple[list[Usage], list[MeteringRecord]]] = []
        self._spill_lock = threading.Lock()
        self._spiller: threading.Thread | None = None

    @property
    def sinks(self) -> list[Any]:
        """Where records go (set a new list to change them: the ``oclaw-metering`` header follows)."""
        return self._sinks

    @sinks.setter
    def sinks(self, sinks: list[Any]) -> None:
        self._sinks = sinks
        #: False when no sink is configured: usages are not even captured (a plain attribute: read per request).
        self.enabled = bool(sinks)
        #: A sink takes the records themselves, not only metrics from them: responses carry the header.
        self.records_out = any(not getattr(sink, "metrics_only", False) for sink in sinks)
        #: Every sink writes lines to stdout (Lambda's log and emf): a flush of one request takes ``_send_one``.
        self._one = all(isinstance(sink, sink_kinds.LineSink) and sink.stream is None for sink in sinks)

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
        overrides: dict[str, Any] = price_overrides(s)
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

        threading.Thread(target=loop, name=f"oclaw-{self.name}", daemon=True).start()

    def close(self) -> None:
        """Stop the flusher and send what is left (what was spilled included)."""
        self._stop.set()
        self.wait_spilled()
        self.flush()

    def submit(self, records: Iterable[MeteringRecord]) -> None:
        """Queue records for the next flush."""
        self._pending.extend(records)
        if len(self._pending) + len(self._usage) > self.max_queued:
            self._spill()

    def submit_usage(self, usage: Usage) -> bytes | None:
        """Queue one request's usage (one append: the record is built at flush); its ``oclaw-metering`` header
        value, or None when only metrics are kept (metering records off: no header)."""
        self._usage.append(usage)
        if len(self._usage) > self.max_queued:
            self._spill()
        if not self.records_out:
            return None
        return header_value(usage.compute_us, self.billed_ms(usage), usage.cold)

    def spool(self, index: int) -> Spool:
        """The spool of the ``index``-th sink."""
        return Spool(self.spool_base, index, self.record_type)

    def flush(self, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Send queued records (and what a sink refused earlier) to every sink within ``timeout_s``; never raises,
        loses nothing.

        A sink gets three tries while time is left; what it has not taken then is written to its own spool, re-sent
        on a later flush, so a failing sink never makes the healthy ones see a record twice.
        """
        if not (self._usage or self._pending or self._spooled):  # nothing to send (Lambda with metering off)
            return
        # one flush at a time (the timer, a /metrics scrape, shutdown): a later one waits no longer than it may run
        # (a lock taken with a timeout costs ~0.4 µs more: tried without one first)
        lock = self._flushing
        if not (lock.acquire(blocking=False) or lock.acquire(timeout=max(0.0, min(timeout_s, threading.TIMEOUT_MAX)))):
            return
        deadline = time.monotonic() + timeout_s
        try:
            if self._one and len(self._usage) == 1 and not (self._pending or self._spooled):  # a Lambda invocation
                self._send_one(self._usage.popleft(), deadline)
            else:
                self._send(self._take(), deadline)
        finally:
            lock.release()

    def _send_one(self, usage: Usage, deadline: float) -> None:
        """A flush of one request to sinks that all write lines to stdout (a Lambda invocation's): each makes its
        line straight from the usage (``LineSink.one``), written at once. What fails takes ``_send``'s tries."""
        billed = self.billed_ms(usage)
        try:
            lines = b"".join([sink.one(self, usage, billed) for sink in self._sinks])
        except Exception:  # noqa: BLE001 - a sink could not make its line: retried (and spooled) by _send
            self.failures += 1
            self._send([self.complete(usage)], deadline)
            return
        try:
            sink_kinds.write(None, lines)
        except Exception as exc:  # noqa: BLE001 - stdout closed or broken: keep the record
            self.failures += 1
            for index, sink in enumerate(self._sinks):
                self._spool(index, sink, [self.complete(usage)], exc)

    def _take(self) -> list[MeteringRecord]:
        """The records of what is queued now, taken out of the queues (later ones wait for the next flush)."""
        return [*map(self.complete, _drain(self._usage)), *_drain(self._pending)]

    def _send(self, records: list[MeteringRecord], deadline: float) -> None:
        """Give each sink the records before ``deadline`` (``time.monotonic()``); spool what it did not take."""
        token = sink_kinds.FLUSH_DEADLINE.set(deadline)  # what time_left() reads, in the sinks too
        try:
            for index, sink in enumerate(self.sinks):
                if index in self._spooled:  # known without listing files per flush (per Lambda invocation)
                    self._resend(index, sink, records)
                elif records:
                    refused, error = self._emit(sink, records)
                    if refused:
                        self._spool(index, sink, refused, error)
        finally:
            sink_kinds.FLUSH_DEADLINE.reset(token)

    def _resend(self, index: int, sink: Any, records: list[MeteringRecord]) -> None:
        """Give a sink the records with what its spool holds (the files no other process is re-sending); each spool
        file keeps only what the sink refused."""
        claims = list(self.spool(index).claims())
        batch = [record for claim in claims for record in claim.records] + records
        refused, error = self._emit(sink, batch) if batch else ([], None)
        unsent = {id(record) for record in refused}
        for claim in claims:
            claim.settle([record for record in claim.records if id(record) in unsent])
        new = [record for record in records if id(record) in unsent]
        if new:
            self._spool(index, sink, new, error)
        else:
            self._spooled.discard(index)
            if self.spool(index).files():  # held by another process, or spilled meanwhile
                self._spooled.add(index)

    def _emit(self, sink: Any, records: Sequence[MeteringRecord]) -> tuple[Sequence[MeteringRecord], Exception | None]:
        """Give ``records`` to ``sink``: up to three tries while the flush has time; what it refused, and why."""
        error: Exception | None = None
        for _ in range(3):
            if sink_kinds.time_left() <= 0:
                return records, error or TimeoutError("no time left before the flush deadline")
            try:
                sink.emit(records)
                return [], None
            except Exception as exc:  # noqa: BLE001 - a sink must never fail the request
                self.failures += 1
                error = exc
                records = getattr(exc, "failed", None) or records  # retry only what a batch API refused
        return records, error

    def _spool(self, index: int, sink: Any, records: Sequence[MeteringRecord], exc: Exception | None) -> None:
        """Keep what a sink could not take in a spool file of its own, re-sent on a later flush."""
        log.warning("%s sink %s failed (%s); %d records spooled", self.name, type(sink).__name__, exc, len(records))
        self.spool(index).put(records)
        self.spooled += len(records)
        self._spooled.add(index)

    def _spill(self) -> None:
        """Too much is queued (a sink holds the flush beyond its bounds): take it out of the queues here (so they stay
        bounded) and have it spooled for every sink by a thread of its own, so the request that crossed the bound
        does not wait while tens of thousands of records are built and written. A spool file is written whole or
        not at all; ``close`` waits for the spill thread."""
        taken = (_drain(self._usage), _drain(self._pending))
        with self._spill_lock:
            self._to_spill.append(taken)
            if self._spiller is not None:  # running: it takes this too before it stops
                return
            self._spiller = threading.Thread(target=self._spill_all, name=f"oclaw-{self.name}-spill", daemon=True)
            self._spiller.start()

    def _spill_all(self) -> None:
        """Spool what ``_spill`` took until nothing is left."""
        reason = OverflowError(f"more than {self.max_queued} records queued")
        while True:
            with self._spill_lock:
                batches, self._to_spill = self._to_spill, []
                if not batches:
                    self._spiller = None
                    return
            records = [record for usages, pending in batches for record in [*map(self.complete, usages), *pending]]
            for index, sink in enumerate(self.sinks):
                self._spool(index, sink, records, reason)

    def wait_spilled(self) -> None:
        """Wait until the spill thread has spooled everything it took."""
        with self._spill_lock:
            spiller = self._spiller
        if spiller is not None:
            spiller.join()


def _drain(queue: deque[Any]) -> list[Any]:
    """What ``queue`` holds now, taken out (another thread may be taking too: each item goes to one of them)."""
    out = []
    for _ in range(len(queue)):
        try:
            out.append(queue.popleft())
        except IndexError:
            break
    return out
