"""Where metering records go: a small Protocol and the built-in sinks, chosen by OCLAW_METERING_SINKS."""

from __future__ import annotations

import importlib
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar, Protocol

import orjson

from engine.metering.batch import _OWN_LINE, Batch, figures_of, json_lines, ms_json, shared_members
from engine.metering.records import Biller, MeteringRecord, Usage, _time_of

#: When the flush in progress must be over (``time.monotonic()``), set by ``Meter.flush``.
FLUSH_DEADLINE: ContextVar[float] = ContextVar("oclaw_flush_deadline", default=math.inf)


def time_left() -> float:
    """Seconds before the deadline of the flush in progress (inf outside one): what a sink's I/O may take."""
    return FLUSH_DEADLINE.get() - time.monotonic()


class PartialFailure(Exception):
    """A batch API took some records and refused others; only ``failed`` is retried (no duplicates)."""

    def __init__(self, message: str, failed: list[MeteringRecord]) -> None:
        super().__init__(message)
        self.failed = failed


class Sink(Protocol):
    """Where metering records go; ``emit`` may raise, oclaw retries and spools. A sink that does network I/O
    bounds it by ``time_left()`` (an invocation must not time out on a sink that does not answer)."""

    def emit(self, records: Sequence[MeteringRecord]) -> None:
        """Take a batch of records."""


class LineSink:
    """A sink that writes JSON lines to a stream. On stdout (``stream`` None, the default) a Meter flush writes
    every such sink's lines at once: one write per flush, one per Lambda invocation. ``stream`` is read when the
    sink is given to a Meter (``Meter.sinks``)."""

    stream: Any = None

    def lines(self, records: Sequence[MeteringRecord]) -> bytes | bytearray:
        """What this sink writes for a batch of records."""
        raise NotImplementedError

    def one(self, meter: Biller, usage: Usage, billed: int) -> bytes | bytearray:
        """``lines`` of a flush of one request (a Lambda invocation's), ``billed`` ms: the built-in sinks make them
        straight from the usage, from fragments they keep (``Meter._send_one``)."""
        return self.lines(Batch(meter, [usage], []))

    def emit(self, records: Sequence[MeteringRecord]) -> None:
        write(self.stream, self.lines(records))


#: One request's record line (``LogSink.one``): its own figures first (as ``Batch.json_lines`` writes them), then
#: what it shares with the requests of its tenant, model and bill (kept), then its time.
_ONE_LINE = _OWN_LINE + b'%b"time":"%b"}\n'


class LogSink(LineSink):
    """JSON lines on stdout (CloudWatch Logs on Lambda, Cloud Logging on Cloud Run), one write a flush.

    One line per record; ``packed``: the requests of a flush that share their second, tenant, model, bill and
    status in one line, their own figures as lists (``Batch.packed_lines``; ``engine.metering.batch.unpack``).
    """

    def __init__(self, stream: Any = None, *, packed: bool = False) -> None:
        self.stream = stream
        self.packed = packed
        #: What record lines share, by what decides it (``_shared``; bounded), and the time of the last one
        self._parts: dict[tuple[Any, ...], bytes] = {}
        self._second, self._time = -1, b""

    def lines(self, records: Sequence[MeteringRecord]) -> bytes | bytearray:
        if self.packed and isinstance(records, Batch):
            return records.packed_lines("metering")
        return json_lines(records, "metering")

    def one(self, meter: Biller, usage: Usage, billed: int) -> bytes:
        """The record line of one request: what ``lines`` writes for it (the same fields and values)."""
        (rid, tenant, model, version, items, size_in, size_out, queue, compute, total, _, cold, source, second,
         status) = usage  # fmt: skip
        key = (tenant, model, version, cold, billed, status, source, meter, meter.instance_id)
        shared = self._parts.get(key) or self._shared(key)
        if second != self._second:
            self._second, self._time = second, _time_of(second).encode()
        return _ONE_LINE % (
            orjson.dumps(rid),
            items,
            size_in,
            size_out,
            ms_json(queue),
            ms_json(compute),
            ms_json(total),
            shared,
            self._time,
        )

    def _shared(self, key: tuple[Any, ...]) -> bytes:
        """The members of a record line that its tenant, model, bill, status and source decide, kept."""
        *decided, meter, _ = key  # the instance id is in the key: a restored instance makes new fragments
        members = shared_members(meter, decided, meter.bill(float(decided[4]))) | {"event": "metering"}
        if len(self._parts) >= 4096:
            self._parts.clear()
        shared = self._parts[key] = orjson.dumps(members)[1:-1] + b","
        return shared


def _log_sink(arg: str) -> LogSink:
    if arg not in ("", "packed"):
        raise ValueError(f"unknown log sink option {arg!r}; use log or log:packed")
    return LogSink(packed=arg == "packed")


#: Streams written to -> (the stream, its ``flush`` or None, its file descriptor or -1), found once. On Lambda,
#: stdout is awslambdaric's ``Unbuffered`` wrapper: it resolves every attribute in Python and flushes after each
#: write, so its buffers are always empty and its descriptor is written straight (~5 µs less an invocation).
_RAW: dict[int, tuple[Any, Callable[[], Any] | None, int]] = {}


def _raw(out: Any) -> tuple[Any, Callable[[], Any] | None, int]:
    if len(_RAW) > 16:
        _RAW.clear()
    try:
        fd = int(out.fileno())
    except (AttributeError, OSError, ValueError):  # a stream in memory (captured output)
        fd = -1
    unbuffered = type(out).__name__ == "Unbuffered" and type(out).__module__ == "awslambdaric.bootstrap"
    raw = _RAW[id(out)] = (out, None if unbuffered else out.flush, fd)
    return raw


def write(stream: Any, lines: bytes | bytearray) -> None:
    """Write to a stream (stdout by default) at once: straight to its file descriptor when it has one (after
    flushing what was written through the stream, to keep the order), else through its binary buffer."""
    out = stream or sys.stdout
    raw = _RAW.get(id(out))
    if raw is None or raw[0] is not out:
        raw = _raw(out)
    _, flush, fd = raw
    if fd >= 0:
        if flush is not None:
            flush()
        done = os.write(fd, lines)
        while done < len(lines):  # a signal interrupted a large write
            done += os.write(fd, memoryview(lines)[done:])
        return
    binary = getattr(out, "buffer", None)
    if binary is not None:
        out.flush()  # keep order with text already written
        binary.write(lines)
        binary.flush()
    else:
        out.write(bytes(lines).decode())
        out.flush()


class JsonlSink:
    """Appends records to a JSON Lines file (local use; `oclaw usage FILE` reads it)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def emit(self, records: Sequence[MeteringRecord]) -> None:
        with self.path.open("ab") as fh:
            fh.write(json_lines(records))


class CallbackSink:
    """Calls ``module:function(records)``."""

    def __init__(self, target: str) -> None:
        module, _, name = target.partition(":")
        self.fn: Callable[[Sequence[MeteringRecord]], None] = getattr(importlib.import_module(module), name)

    def emit(self, records: Sequence[MeteringRecord]) -> None:
        self.fn(records)


SINKS = (
    "log, log:packed, emf, jsonl:PATH, sqs:QUEUE_URL, kinesis:STREAM, firehose:STREAM, callback:module:function, "
    "class:module:Class or none"
)


def _class_sink(arg: str) -> Sink:
    module, _, name = arg.partition(":")
    factory: Callable[[], Sink] = getattr(importlib.import_module(module), name)
    return factory()


#: OCLAW_METERING_SINKS entries: ``kind`` or ``kind:argument``.
FACTORIES: dict[str, Callable[[str], Sink | None]] = {
    "log": _log_sink,
    "emf": lambda arg: EmfSink(arg or "oclaw"),
    "jsonl": JsonlSink,
    "sqs": lambda arg: QueueSink("sqs", arg),
    "kinesis": lambda arg: QueueSink("kinesis", arg),
    "firehose": lambda arg: QueueSink("firehose", arg),
    "callback": CallbackSink,
    "class": _class_sink,
    "none": lambda _: None,
}
NEEDS_ARGUMENT = frozenset({"jsonl", "sqs", "kinesis", "firehose", "callback", "class"})


def make_sink(spec: str) -> Sink | None:
    """A sink from its OCLAW_METERING_SINKS entry."""
    kind, _, arg = spec.partition(":")
    if kind not in FACTORIES or (kind in NEEDS_ARGUMENT and not arg):
        raise ValueError(f"unknown metering sink {spec!r}; expected {SINKS}")
    return FACTORIES[kind](arg)


class QueueSink:
    """Batched writes to SQS (10 a call), Kinesis Data Streams or Firehose (500 a call), with boto3.

    Each call is bounded by the flush's time left (``engine.aws.QUICK``: no retry inside a call, a short connect,
    a read no longer than what is left); a call that cannot start or fails ends the batch: it and the rest are
    refused (``PartialFailure``), the calls before it taken (never sent twice).
    """

    LIMITS: ClassVar[dict[str, int]] = {"sqs": 10, "kinesis": 500, "firehose": 500}

    def __init__(self, service: str, target: str) -> None:
        self.service, self.target = service, target

    def emit(self, records: Sequence[MeteringRecord]) -> None:
        from engine import aws  # boto3 only when this sink is used

        client = aws.client(self.service, quick=True)
        client.meta.events.register("before-call", _bounded_read, unique_id="oclaw-flush-deadline")
        step = self.LIMITS[self.service]
        failed: list[MeteringRecord] = []
        for start in range(0, len(records), step):
            chunk = list(records[start : start + step])
            try:
                if time_left() < aws.QUICK_CONNECT_S + MIN_READ_S:
                    raise TimeoutError(f"{time_left():.3f} s left before the flush deadline")
                refused = self._send(client, chunk)
            except Exception as exc:
                unsent = failed + list(records[start:])
                raise PartialFailure(f"{self.service}: {exc}", unsent) from exc
            failed += [chunk[i] for i in refused]
        if failed:
            raise PartialFailure(f"{self.service} refused {len(failed)} of {len(records)} records", failed)

    def _send(self, client: Any, chunk: list[MeteringRecord]) -> list[int]:
        """Send one batch; return the indexes the service refused."""
        if self.service == "sqs":
            entries: list[dict[str, Any]] = [
                {"Id": str(i), "MessageBody": r.json().decode()} for i, r in enumerate(chunk)
            ]
            resp = client.send_message_batch(QueueUrl=self.target, Entries=entries)
            return [int(f["Id"]) for f in resp.get("Failed", [])]
        if self.service == "kinesis":
            entries = [{"Data": r.json(), "PartitionKey": r.tenant or "anonymous"} for r in chunk]
            resp = client.put_records(StreamName=self.target, Records=entries)
            return [i for i, e in enumerate(resp["Records"]) if e.get("ErrorCode")]
        resp = client.put_record_batch(
            DeliveryStreamName=self.target, Records=[{"Data": r.json() + b"\n"} for r in chunk]
        )
        return [i for i, e in enumerate(resp["RequestResponses"]) if e.get("ErrorCode")]


#: A queue sink's call starts only with this long to read its answer, after the connect's bound.
MIN_READ_S = 0.05


def _bounded_read(context: dict[str, Any], **_: Any) -> None:
    """botocore's ``before-call``: the call reads for no longer than the flush has left (botocore takes a call's
    ``read_timeout`` from its request context; where it does not, the client's short one bounds it)."""
    from engine import aws

    context["read_timeout"] = max(MIN_READ_S, min(aws.QUICK_READ_S, time_left() - aws.QUICK_CONNECT_S))


class EmfSink(LineSink):
    """CloudWatch metrics as Embedded Metric Format log lines (no network call), one line per model per flush.

    Metrics only: with no other sink, records are not kept and responses carry no ``oclaw-metering`` header.

    Per model: request, item, failure and cold-start counts, the sums of compute ms, billed ms and cost, and each
    request's latency (up to 100 values, so CloudWatch can give percentiles). Tenants are not dimensions (their
    cardinality would multiply the metric cost). The lines are the ones Powertools Metrics writes for the same
    figures (a test compares them), serialised directly: Powertools' per-metric validation cost ~200 µs a Lambda
    invocation, a third of a tiny model's request.
    """

    UNITS = (
        ("Requests", "Count"),
        ("Items", "Count"),
        ("Failures", "Count"),
        ("ComputeMs", "Milliseconds"),
        ("BilledMs", "Milliseconds"),
        ("CostUSD", "None"),
        ("ColdStarts", "Count"),
        ("LatencyMs", "Milliseconds"),
    )

    metrics_only = True

    def __init__(self, namespace: str = "oclaw", stream: Any = None) -> None:
        self.namespace = namespace
        self.stream = stream
        directive = [
            {
                "Namespace": namespace,
                "Dimensions": [["model", "service"]],
                "Metrics": [{"Name": name, "Unit": unit} for name, unit in self.UNITS],
            }
        ]
        self._directive_json = orjson.dumps(directive)
        #: ``"BilledMs":[..],"CostUSD":[..],`` by (meter, billed ms), for ``one`` (bounded)
        self._costs: dict[tuple[Any, int], bytes] = {}

    def one(self, meter: Biller, usage: Usage, billed: int) -> bytes:
        """The EMF line of one request: what ``lines`` writes for it (same members and values)."""
        bill = (meter, billed)
        try:
            cost = self._costs[bill]
        except KeyError:
            if len(self._costs) > 4096:
                self._costs.clear()
            figures = {"BilledMs": [float(billed)], "CostUSD": [meter.bill(float(billed))[3]]}
            cost = self._costs[bill] = orjson.dumps(figures)[1:-1] + b","
        return _EMF_ONE % (
            int(time.time() * 1000),
            self._directive_json,
            orjson.dumps(usage[2] or "-"),
            usage[4],
            b"1.0" if usage[14] >= 400 else b"0.0",
            ms_json(usage[8]),
            cost,
            b"1.0" if usage[11] else b"0.0",
            ms_json(usage[9]),
        )

    def lines(self, records: Sequence[MeteringRecord]) -> bytes | bytearray:
        figures = records.figures() if isinstance(records, Batch) else list(map(figures_of, records))
        head = b'{"_aws":{"Timestamp":%d,"CloudWatchMetrics":%b},' % (int(time.time() * 1000), self._directive_json)
        # per model: requests, items, failures, compute ms, billed ms, cost, cold starts, latencies (in one pass)
        by_model: dict[str, list[Any]] = {}
        for model, items, failed, compute, billed, cost, cold, total in figures:
            acc = by_model.get(model)
            if acc is None:
                acc = by_model[model] = [0, 0, 0, 0, 0, 0, 0, []]
            acc[0] += 1
            acc[1] += items
            acc[2] += failed
            acc[3] += compute
            acc[4] += billed
            acc[5] += cost
            acc[6] += cold
            if len(acc[7]) < 100:  # 100 values per metric per blob at most
                acc[7].append(float(total))
        lines = bytearray()
        for model, acc in by_model.items():
            lines += head  # the directive serialised once, not per flush
            lines += _emf_blob(model, acc)
        return lines


#: One request's EMF line (``EmfSink.one``): directive and model, then its own figures.
_EMF_ONE = (
    b'{"_aws":{"Timestamp":%d,"CloudWatchMetrics":%b},"model":%b,"service":"oclaw","Requests":[1.0],"Items":[%d.0],'
    b'"Failures":[%b],"ComputeMs":[%b],%b"ColdStarts":[%b],"LatencyMs":[%b]}\n'
)


def _emf_blob(model: str, sums: Sequence[Any]) -> bytes:
    """The members of one model's EMF line after its ``_aws`` directive (from its comma to the newline), from
    its sums: requests, items, failures, compute ms, billed ms, cost, cold starts, latencies."""
    requests, items, failures, compute, billed, cost, cold, latency = sums
    blob = {
        "model": model,
        "service": "oclaw",
        "Requests": [float(requests)],
        "Items": [float(items)],
        "Failures": [float(failures)],
        "ComputeMs": [float(compute)],
        "BilledMs": [float(billed)],
        "CostUSD": [float(cost)],
        "ColdStarts": [float(cold)],
        "LatencyMs": latency,
    }
    return orjson.dumps(blob, option=orjson.OPT_APPEND_NEWLINE)[1:]
