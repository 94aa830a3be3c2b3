"""Where metering records go: a small Protocol and the built-in sinks, chosen by OCLAW_METERING_SINKS."""

from __future__ import annotations

import importlib
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import orjson

from engine.records import MeteringRecord, json_lines


class PartialFailure(Exception):
    """A batch API took some records and refused others; only ``failed`` is retried (no duplicates)."""

    def __init__(self, message: str, failed: list[MeteringRecord]) -> None:
        super().__init__(message)
        self.failed = failed


class Sink(Protocol):
    """Where metering records go; ``emit`` may raise, oclaw retries and spools."""

    def emit(self, records: Sequence[MeteringRecord]) -> None:
        """Take a batch of records."""


class LogSink:
    """One JSON line per record on stdout (CloudWatch Logs on Lambda, Cloud Logging on Cloud Run), one write."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream

    def emit(self, records: Sequence[MeteringRecord]) -> None:
        _write(self.stream, json_lines(records, "metering"))


#: Per thread, while a Meter flush runs: what sinks write to stdout, gathered to be written in one call.
_gathering = threading.local()


def gather() -> bytearray:
    """From now on (this thread), ``_write`` to stdout appends to the returned buffer instead of writing."""
    lines = _gathering.lines = bytearray()
    return lines


def release() -> None:
    """Stop gathering (the caller writes what was gathered)."""
    _gathering.lines = None


def _write(stream: Any, lines: bytes | bytearray) -> None:
    """Write JSON lines to a stream (stdout by default) in one call, or add them to what a flush gathers."""
    if stream is None:
        gathered = getattr(_gathering, "lines", None)
        if gathered is not None:
            gathered += lines
            return
    write(stream, lines)


def write(stream: Any, lines: bytes | bytearray) -> None:
    """Write to a stream (stdout by default) at once, binary where it can."""
    out = stream or sys.stdout
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
    "log, emf, jsonl:PATH, sqs:QUEUE_URL, kinesis:STREAM, firehose:STREAM, callback:module:function, "
    "class:module:Class or none"
)


def _class_sink(arg: str) -> Sink:
    module, _, name = arg.partition(":")
    factory: Callable[[], Sink] = getattr(importlib.import_module(module), name)
    return factory()


#: OCLAW_METERING_SINKS entries: ``kind`` or ``kind:argument``.
FACTORIES: dict[str, Callable[[str], Sink | None]] = {
    "log": lambda _: LogSink(),
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
        raise ValueError(
            f"unknown metering sink {spec!r}; expected log, emf, jsonl:PATH, sqs:QUEUE_URL, kinesis:STREAM, "
            "firehose:STREAM, callback:module:function, class:module:Class or none"
        )
    return FACTORIES[kind](arg)


class QueueSink:
    """Batched writes to SQS (10 a call), Kinesis Data Streams or Firehose (500 a call), with boto3."""

    LIMITS: ClassVar[dict[str, int]] = {"sqs": 10, "kinesis": 500, "firehose": 500}

    def __init__(self, service: str, target: str) -> None:
        self.service, self.target = service, target

    def emit(self, records: Sequence[MeteringRecord]) -> None:
        from engine import aws as aws_clients  # boto3 only when this sink is used

        client = aws_clients.client(self.service)
        step = self.LIMITS[self.service]
        failed: list[MeteringRecord] = []
        for start in range(0, len(records), step):
            chunk = list(records[start : start + step])
            failed += [chunk[i] for i in self._send(client, chunk)]
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


class EmfSink:
    """CloudWatch metrics as Embedded Metric Format log lines (no network call), one line per model per flush.

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

    def emit(self, records: Sequence[MeteringRecord]) -> None:
        # per model: requests, items, failures, compute ms, billed ms, cost, cold starts, latencies (in one pass)
        by_model: dict[str, list[Any]] = {}
        for r in records:
            acc = by_model.get(r.model or "-")
            if acc is None:
                acc = by_model[r.model or "-"] = [0, 0, 0, 0, 0, 0, 0, []]
            acc[0] += 1
            acc[1] += r.items
            acc[2] += r.status >= 400
            acc[3] += r.compute_ms
            acc[4] += r.billed_ms
            acc[5] += r.cost_usd
            acc[6] += r.cold
            if len(acc[7]) < 100:  # 100 values per metric per blob at most
                acc[7].append(float(r.total_ms))
        timestamp = int(time.time() * 1000)
        lines = bytearray()
        head = b'{"_aws":{"Timestamp":%d,"CloudWatchMetrics":%b},' % (timestamp, self._directive_json)
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
            lines += head  # the directive serialised once, not per flush
            lines += orjson.dumps(blob, option=orjson.OPT_APPEND_NEWLINE)[1:]
        _write(self.stream, lines)
