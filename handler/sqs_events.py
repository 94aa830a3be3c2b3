"""SQS batches: each record is an infer request; records are batched through each model together.

Record body: a V2 infer request plus ``"model_name"`` (optional ``"model_version"``, ``"id"``) and an optional
``"reply_to"``: ``s3://bucket/prefix`` (the result is written to ``<prefix>/<message id>.json``, so a redelivery
overwrites it) or an SQS queue URL (the result is sent there, deduplicated on the message id for FIFO queues).
Without ``reply_to``, OCLAW_SQS_RESULT_DESTINATION applies. The reply is
``{"batchItemFailures": [{"itemIdentifier": <message id>}, ...]}`` for exactly the records that failed; on a FIFO
queue every later record of a failed record's message group is reported too, so order is preserved.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from engine import aws as aws_clients
from engine.batching import infer_many
from engine.errors import InvalidInput, OclawError
from engine.runtime import Runtime
from engine.tensors import InferRequest, InferResponse, decode_document, encode_response

if TYPE_CHECKING:  # pragma: no cover
    from engine.audit import Auditor

log = logging.getLogger("oclaw.sqs")

#: Concurrent result deliveries per batch (standard queues; FIFO batches deliver in order).
DELIVERY_THREADS = 16


def is_sqs_event(event: Any) -> bool:
    """A batch from an SQS event source mapping."""
    records = event.get("Records") if isinstance(event, dict) else None
    if not isinstance(records, list) or not records:
        return False
    return all(isinstance(r, dict) and r.get("eventSource") == "aws:sqs" for r in records)


@dataclass
class Item:
    """One record on its way through the batch."""

    message_id: str
    group: str | None
    model: tuple[str, str | None] | None = None
    request: InferRequest | None = None
    destination: str = ""
    tenant: str = "anonymous"
    rows: int = 1
    compute_ns: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    error: str | None = None
    result: dict[str, Any] | None = field(default=None, repr=False)


def _parse(record: dict[str, Any], default_destination: str, max_elements: int) -> Item:
    item = Item(record["messageId"], record.get("attributes", {}).get("MessageGroupId"))
    item.bytes_in = len(record.get("body") or "")
    try:
        body = json.loads(record.get("body") or "")
    except ValueError as exc:
        item.error = f"the message body is not JSON: {exc}"
        return item
    if not isinstance(body, dict) or not isinstance(body.get("model_name"), str):
        item.error = "the message body must be a JSON object with a string 'model_name'"
        return item
    version = body.get("model_version")
    item.tenant = str(body.get("tenant") or "anonymous")
    item.model = (body["model_name"], None if version is None else str(version))
    item.destination = str(body.get("reply_to") or default_destination)
    if not item.destination:
        item.error = "no 'reply_to' in the message and no OCLAW_SQS_RESULT_DESTINATION configured"
        return item
    doc = {k: v for k, v in body.items() if k not in ("model_name", "model_version", "reply_to")}
    doc.setdefault("id", item.message_id)
    try:
        item.request = decode_document(doc, max_elements=max_elements)
    except OclawError as exc:
        item.error = exc.message
    return item


def _infer(runtime: Runtime, items: list[Item]) -> None:
    by_model: dict[tuple[str, str | None], list[Item]] = {}
    for item in items:
        if item.error is None and item.model is not None:
            by_model.setdefault(item.model, []).append(item)
    for (name, version), group in by_model.items():
        try:
            model = runtime.pool.get(name, version)
        except OclawError as exc:
            for item in group:
                item.error = exc.message
            continue
        requests = [i.request for i in group if i.request is not None]
        answers = infer_many(model, requests, max_rows=runtime.settings.batch_max_rows or None)
        for item, answer in zip(group, answers, strict=True):
            if isinstance(answer, OclawError):
                item.error = answer.message
            else:
                item.result = _document(answer)
                item.rows, item.compute_ns = answer.rows, answer.compute_ns


def _document(response: InferResponse) -> dict[str, Any]:
    for out in response.outputs:
        out.binary = False
    body, _ = encode_response(response)
    doc: dict[str, Any] = json.loads(body)
    return doc


def _deliver(item: Item) -> None:
    assert item.result is not None
    payload = json.dumps(item.result).encode()
    target = urlparse(item.destination)
    if target.scheme == "s3":
        prefix = target.path.lstrip("/")
        key = f"{prefix.rstrip('/')}/{item.message_id}.json" if prefix else f"{item.message_id}.json"
        aws_clients.client("s3").put_object(Bucket=target.netloc, Key=key, Body=payload, ContentType="application/json")
    elif target.scheme in ("https", "http") and item.destination.split("?")[0].count("/") >= 4:
        args: dict[str, Any] = {
            "QueueUrl": item.destination,
            "MessageBody": payload.decode(),
            "MessageAttributes": {"request_message_id": {"DataType": "String", "StringValue": item.message_id}},
        }
        if item.destination.endswith(".fifo"):
            args |= {"MessageGroupId": item.group or "oclaw", "MessageDeduplicationId": item.message_id}
        aws_clients.client("sqs").send_message(**args)
    else:
        raise InvalidInput(f"reply_to {item.destination!r} is neither s3://bucket/prefix nor an SQS queue URL")


def _deliver_one(item: Item) -> None:
    try:
        _deliver(item)
    except Exception as exc:  # noqa: BLE001 - a failed delivery fails this record only
        item.error = f"delivery to {item.destination} failed: {type(exc).__name__}: {exc}"


def _deliver_all(items: list[Item]) -> None:
    """Deliver concurrently (each result is one S3 PUT or one SendMessage; boto3 clients are thread-safe)."""
    if len(items) <= 1:
        for item in items:
            _deliver_one(item)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(DELIVERY_THREADS, len(items)), thread_name_prefix="oclaw-sqs") as pool:
        list(pool.map(_deliver_one, items))


def handle(
    event: dict[str, Any], context: Any, runtime: Runtime, *, remaining_ms: Callable[[], float]
) -> dict[str, Any]:
    """Infer every record (batched per model), deliver results, report exactly the failed records."""
    settings = runtime.settings
    started = perf_counter()
    items = [_parse(r, settings.sqs_result_destination, settings.max_tensor_elements) for r in event["Records"]]
    estimate = sum(runtime.pool.get_nowait(*i.model).estimate_ms() for i in items if i.model and _known(runtime, i))
    if remaining_ms() < estimate + settings.lambda_reserve_ms + 100:
        # not enough time: hand every record back untouched (they become visible again), lose none
        return {"batchItemFailures": [{"itemIdentifier": i.message_id} for i in items]}
    _infer(runtime, items)
    fifo = any(item.group is not None for item in items)
    if not fifo:
        _deliver_all([i for i in items if i.error is None])
    failed_groups: set[str] = set()
    failures = []
    for item in items:
        if item.group is not None and item.group in failed_groups:
            failures.append(item.message_id)  # FIFO: nothing after a failure in its group may complete
            continue
        if fifo and item.error is None:
            _deliver_one(item)  # in order, so a failed delivery stops the rest of its group
        if item.error is not None:
            log.warning("SQS message %s failed: %s", item.message_id, item.error)
            failures.append(item.message_id)
            if item.group is not None:
                failed_groups.add(item.group)
    _meter(runtime, items, failures, (perf_counter() - started) * 1000)
    if runtime.audit is not None:
        _audit(runtime.audit, items, set(failures))
    log.info("SQS batch: %d records, %d failed, %.1f ms", len(items), len(failures), (perf_counter() - started) * 1000)
    return {"batchItemFailures": [{"itemIdentifier": m} for m in failures]}


def _meter(runtime: Runtime, items: list[Item], failures: list[str], total_ms: float) -> None:
    """One record per message; the invocation's time is split by rows across models, then within each."""
    meter = runtime.meter
    if not meter.enabled:
        return
    from engine.metering.records import model_label, split_evenly

    groups: dict[tuple[str, str | None], list[Item]] = {}
    for item in items:
        groups.setdefault(item.model or ("", None), []).append(item)
    shares = split_evenly(total_ms, [sum(i.rows for i in g) for g in groups.values()])
    failed = set(failures)
    for ((name, version), group), share in zip(groups.items(), shares, strict=True):
        records = meter.records(
            request_ids=[i.message_id for i in group],
            tenants=[i.tenant for i in group],
            model=model_label(runtime.pool.states(), name),
            version=version or "",
            items=[i.rows for i in group],
            bytes_in=[i.bytes_in for i in group],
            bytes_out=[len(json.dumps(i.result)) if i.result else 0 for i in group],
            statuses=[400 if i.message_id in failed else 200 for i in group],
            queue_ms=[0.0] * len(group),
            compute_ms=sum(i.compute_ns for i in group) / 1e6,
            total_ms=share,
            cold=runtime.cold,
            source="sqs",
        )
        runtime.cold = False
        meter.submit(records)


def _audit(audit: Auditor, items: list[Item], failed: set[str]) -> None:
    """One audit record per message: 200 when it was served and delivered, 400 when it is handed back."""
    for item in items:
        name, version = item.model or ("", None)
        if item.result is not None:
            version = str(item.result.get("model_version") or version or "")
        status = 400 if item.message_id in failed else 200
        audit.record(
            "infer",
            "ok" if status == 200 else "error",
            status,
            model=name,
            version=version or "",
            tenant=item.tenant,
            request_id=item.message_id,
            source="sqs",
        )


def _known(runtime: Runtime, item: Item) -> bool:
    assert item.model is not None
    return runtime.pool.is_ready(*item.model)
