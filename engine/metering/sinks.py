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

from engine.metering.batch import PACKED_FIELDS, json_lines, packed_lines
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
    """A sink that writes lines to a stream (stdout when ``stream`` is None), all of a batch's in one write."""

    stream: Any = None

    def lines(self, records: Sequence[MeteringRecord]) -> bytes | bytearray:
        """What this sink writes for a batch of records."""
        raise NotImplementedError

    def one(self, meter: Biller, usage: Usage, billed: int) -> bytes | bytearray:
        """``lines`` of one request (a Lambda invocation's flush, ``billed`` ms), made straight from its usage."""
        return self.lines([meter.complete(usage)])

    def emit(self, records: Sequence[MeteringRecord]) -> None:
        write(self.stream, self.lines(records))


#: Streams written to -> (the stream, its ``flush`` or None, its file descriptor or -1), found once. On Lambda,
#: stdout is awslambdaric's ``Unbuffered`` wrapper: it resolves every attribute in Python (~1 µs each) and flushes
#: after each write, so its buffers are always empty and its descriptor is written straight.
_FOUND: dict[int, tuple[Any, Callable[[], Any] | None, int]] = {}


def _find(out: Any) -> tuple[Any, Callable[[], Any] | None, int]:
    if len(_FOUND) > 16:
        _FOUND.clear()
    try:
        fd = int(out.fileno())
    except (AttributeError, OSError, ValueError):  # a stream in memory (captured output)
        fd = -1
    unbuffered = type(out).__name__ == "Unbuffered" and type(out).__module__ == "awslambdaric.bootstrap"
    found = _FOUND[id(out)] = (out, None if unbuffered else out.flush, fd)
    return found


def write(stream: Any, lines: bytes | bytearray) -> None:
    """Write to a stream (stdout by default) at once: straight to its file descriptor when it has one (after
    flushing what was written through the stream, to keep the order), else through its binary buffer."""
    out = stream or sys.stdout
    found = _FOUND.get(id(out))
    if found is None or found[0] is not out:
        found = _find(out)
    _, flush, fd = found
    if fd >= 0:
        if flush is not None:
            flush()
        view = memoryview(lines)
        while view:  # a signal may interrupt a large write
            view = view[os.write(fd, view) :]
        return
    out.flush()
    binary = getattr(out, "buffer", None)
    if binary is None:  # a text stream in memory
        out.write(bytes(lines).decode())
        out.flush()
    else:
        binary.write(lines)
        binary.flush()


#: µs -> JSON ms, for ``_ms`` (bounded): a model's requests repeat few values, and formatting one costs ~3x the lookup.
_MS: dict[int, bytes] = {}


def _ms(us: int) -> bytes:
    """µs as a JSON number of ms: ``b"0.045"``, exactly ``us / 1000`` once parsed."""
    text = _MS.get(us)
    if text is None:
        if len(_MS) >= 65536:
            _MS.clear()
        text = _MS[us] = b"%d.%03d" % divmod(us, 1000)
    return text


class LogSink(LineSink):
    """JSON lines on stdout (CloudWatch Logs on Lambda, Cloud Logging on Cloud Run), one write a flush.

    One line per record; ``packed``: the records of a flush that share their second, tenant, model, bill and
    status in one line, their own figures as lists (``engine.metering.batch.packed_lines`` and ``unpack``).
    """

    def __init__(self, stream: Any = None, *, packed: bool = False) -> None:
        self.stream = stream
        self.packed = packed
        #: What record lines share (all but their own figures and time), by what decides it (``one``; bounded).
        self._shared: dict[tuple[Any, ...], bytes] = {}

    def lines(self, records: Sequence[MeteringRecord]) -> bytes | bytearray:
        return (packed_lines if self.packed else json_lines)(records, "metering")

    def one(self, meter: Biller, usage: Usage, billed: int) -> bytes:
        """The record line of one request: the fields and values ``lines`` writes, its own figures first."""
        # by the meter's instance id too: a SnapStart restore's new one makes new lines
        key = (meter, meter.instance_id, usage.tenant, usage.model, usage.version, usage.cold, billed, usage.status,
               usage.source)  # fmt: skip
        shared = self._shared.get(key) or self._share(meter, usage, key)
        return _LOG_ONE % (
            orjson.dumps(usage.request_id),
            usage.items,
            usage.bytes_in,
            usage.bytes_out,
            _ms(usage.queue_us),
            _ms(usage.compute_us),
            _ms(usage.total_us),
            shared,
            _time_of(usage.second).encode(),
        )

    def _share(self, meter: Biller, usage: Usage, key: tuple[Any, ...]) -> bytes:
        """What the record lines of ``key`` share, taken from a whole record, kept."""
        record = meter.complete(usage).as_dict() | {"event": "metering"}
        for name in (*PACKED_FIELDS, "time"):
            del record[name]
        if len(self._shared) >= 4096:
            self._shared.clear()
        shared = self._shared[key] = orjson.dumps(record)[1:-1] + b","
        return shared


#: One request's record line (``LogSink.one``): its own figures, what it shares with others, then its time.
_LOG_ONE = (
    b'{"request_id":%b,"items":%d,"bytes_in":%d,"bytes_out":%d,"queue_ms":%b,"compute_ms":%b,"total_ms":%b,'
    b'%b"time":"%b"}\n'
)


def _log_sink(arg: str) -> LogSink:
    if arg not in ("", "packed"):
        raise ValueError(f"unknown log sink option {arg!r}; use log or log:packed")
    return LogSink(packed=arg == "packed")


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
        step = self.LIMITS[self.service]
        failed: list[MeteringRecord] = []
        for start in range(0, len(records), step):
            chunk = list(records[start : start + step])
            try:
                # a call starts only when its whole bound (the quick client's connect and read) ends in time
                if time_left() < aws.QUICK_CONNECT_S + aws.QUICK_READ_S:
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
        metrics = [{"Name": name, "Unit": unit} for name, unit in self.UNITS]
        directive = [{"Namespace": namespace, "Dimensions": [["model", "service"]], "Metrics": metrics}]
        self._head = b'{"_aws":{"Timestamp":%d,"CloudWatchMetrics":' + orjson.dumps(directive) + b"},"
        #: ``"BilledMs":[..],"CostUSD":[..],`` by (meter, billed ms), for ``one`` (bounded)
        self._costs: dict[tuple[Any, int], bytes] = {}

    def one(self, meter: Biller, usage: Usage, billed: int) -> bytes:
        """The EMF line of one request: the members and values ``lines`` writes."""
        cost = self._costs.get((meter, billed))
        if cost is None:
            if len(self._costs) >= 4096:
                self._costs.clear()
            figures = {"BilledMs": [float(billed)], "CostUSD": [meter.bill(float(billed))[3]]}
            cost = self._costs[(meter, billed)] = orjson.dumps(figures)[1:-1] + b","
        return self._head % int(time.time() * 1000) + _EMF_ONE % (
            orjson.dumps(usage.model or "-"),
            usage.items,
            b"1.0" if usage.status >= 400 else b"0.0",
            _ms(usage.compute_us),
            cost,
            b"1.0" if usage.cold else b"0.0",
            _ms(usage.total_us),
        )

    def lines(self, records: Sequence[MeteringRecord]) -> bytes | bytearray:
        # per model, in one pass: requests, items, failures, compute ms, billed ms, cost, cold starts, latencies
        by_model: dict[str, list[Any]] = {}
        for r in records:
            sums = by_model.get(r.model or "-")
            if sums is None:
                sums = by_model[r.model or "-"] = [0, 0, 0, 0.0, 0.0, 0.0, 0, []]
            sums[0] += 1
            sums[1] += r.items
            sums[2] += r.status >= 400
            sums[3] += r.compute_ms
            sums[4] += r.billed_ms
            sums[5] += r.cost_usd
            sums[6] += r.cold
            if len(sums[7]) < 100:  # 100 values per metric per blob at most
                sums[7].append(float(r.total_ms))
        head = self._head % int(time.time() * 1000)  # the directive serialised once, not per flush
        lines = bytearray()
        for model, (requests, items, failures, compute, billed, cost, cold, latency) in by_model.items():
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
            lines += head
            lines += orjson.dumps(blob, option=orjson.OPT_APPEND_NEWLINE)[1:]
        return lines


#: One request's EMF line after its directive (``EmfSink.one``).
_EMF_ONE = (
    b'"model":%b,"service":"oclaw","Requests":[1.0],"Items":[%d.0],"Failures":[%b],"ComputeMs":[%b],%b'
    b'"ColdStarts":[%b],"LatencyMs":[%b]}\n'
)
