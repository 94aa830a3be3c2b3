"""S3 object-created events: read an object, infer it in row batches, write the result whole.

Key layout: ``<input prefix><model>/<path>`` → ``<output prefix><model>/<path><suffix>``. Inputs: ``.jsonl``
(one V2 infer request per line → one V2 response per line), ``.npy``/``.npz`` tensors (→ ``.npy``/``.npz``),
images for models with image pre-processing (→ a V2 response as ``.json``). A bad object gets
``<output key>.error.json`` and never fails the others; a transient AWS error fails the invocation so Lambda
retries it, and a retry overwrites the same keys. Long JSON Lines objects are saved in parts and finished by
``handler/s3_parts.py``, safe to interrupt between any two S3 requests. An S3 notification is invoked
asynchronously, and Lambda retries such an event twice at most: a try that stopped after making progress therefore
re-invokes the function itself with the same event (a continuation, with a fresh retry budget) and returns; a try
without progress, or whose re-invoke failed, fails for Lambda's retries.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from time import perf_counter
from typing import Any
from urllib.parse import unquote_plus

import numpy as np

from engine import aws as aws_clients
from engine.batching import infer_many
from engine.datatypes import v2_datatype
from engine.errors import InvalidInput, OclawError
from engine.metering.records import model_label
from engine.model import LoadedModel
from engine.runtime import Runtime
from engine.tensors import InferRequest, InferResponse, InputTensor, decode_request, encode_response
from handler.s3_parts import (
    SOURCE_META,
    Env,
    Incomplete,
    Job,
    delete,
    finish,
    listed,
    parts_root,
    put,
    save_part,
    saved_parts,
)

log = logging.getLogger("oclaw.s3")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
#: The event key counting the continuations of an S3 notification, and the most one notification may chain.
CONTINUATION = "oclaw_continuation"
MAX_CONTINUATIONS = 1000


class BadObject(Exception):
    """The object cannot be inferred (format, shape, model); reported beside it, never retried."""


def is_s3_event(event: Any) -> bool:
    """An S3 notification (or its ``s3:TestEvent``)."""
    if not isinstance(event, dict):
        return False
    if event.get("Event") == "s3:TestEvent":
        return True
    records = event.get("Records")
    if not isinstance(records, list) or not records:
        return False
    return all(isinstance(r, dict) and r.get("eventSource") == "aws:s3" for r in records)


def output_key(runtime: Runtime, rel: str) -> str:
    """The result key for an input key relative to the input prefix."""
    base = runtime.settings.s3_output_prefix + rel
    suffix = os.path.splitext(rel)[1].lower()
    if suffix == ".jsonl":
        return base + ".out.jsonl"
    if suffix in (".npy", ".npz"):
        return base + ".out" + suffix
    if suffix in IMAGE_SUFFIXES:
        return base + ".out.json"
    return base + ".out"


def is_batch_job(event: Any) -> bool:
    """``{"oclaw": "batch", "bucket": ..., "keys": [...]}``: the template's Distributed Map over an S3 prefix."""
    return isinstance(event, dict) and event.get("oclaw") == "batch"


def objects(event: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """(bucket, key, version) of every object an S3 notification or a batch-job event names."""
    if is_batch_job(event):
        bucket, keys = event.get("bucket"), event.get("keys")
        if not isinstance(bucket, str) or not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise InvalidInput('a batch-job event needs "bucket" (a string) and "keys" (a list of strings)')
        return [(bucket, key, None) for key in keys]  # keys from ListObjectsV2 are not URL-encoded
    return [
        (r["s3"]["bucket"]["name"], unquote_plus(r["s3"]["object"]["key"]), r["s3"]["object"].get("versionId"))
        for r in event["Records"]  # notification keys arrive URL-encoded
    ]


def handle(
    event: dict[str, Any], context: Any, runtime: Runtime, *, remaining_ms: Callable[[], float]
) -> dict[str, Any]:
    """Process every object of an S3 event (or batch-job event); returns what was written."""
    if event.get("Event") == "s3:TestEvent":
        return {"ignored": "s3:TestEvent"}
    continuation = event.get(CONTINUATION, 0)
    if type(continuation) is not int or continuation < 0:
        raise InvalidInput(f'"{CONTINUATION}" must be a non-negative integer (how often this S3 event was continued)')
    env = Env(aws_clients.client("s3"), runtime, remaining_ms)
    settings = runtime.settings
    done: list[dict[str, Any]] = []
    for bucket, key, version in objects(event):
        if not key.startswith(settings.s3_input_prefix) or key.endswith("/"):
            done.append({"key": key, "skipped": "not under the input prefix"})
            continue
        rel = key[len(settings.s3_input_prefix) :]
        model_name = settings.s3_model or rel.split("/", 1)[0]
        job = Job(bucket, key, version, model_name, output_key(runtime, rel))
        status = 500
        try:
            done.append(_process(env, job))
            status = 200
        except BadObject as exc:
            status = 400
            error_key = job.out_key + ".error.json"
            body = {"error": str(exc), "bucket": bucket, "key": key, "version": job.version, "model": job.model_name}
            env.s3.put_object(
                Bucket=bucket, Key=error_key, Body=json.dumps(body).encode(), ContentType="application/json"
            )
            log.warning("s3://%s/%s: %s", bucket, key, exc)
            done.append({"key": key, "error": str(exc), "error_key": error_key})
        except Incomplete as exc:
            exc.progress = env.progress.writes > 0
            if not is_s3_event(event):
                raise  # a batch job: its Step Functions task retries Incomplete
            _continue(event, context, continuation, exc)
            status = 0  # recorded by the invocation that finishes it
            done.append({"key": key, "incomplete": str(exc), CONTINUATION: continuation + 1})
            break  # this object and the event's next ones are the continuation's
        finally:
            if status and runtime.audit is not None:
                _audit(runtime, job, status)
    return {"processed": done}


def _audit(runtime: Runtime, job: Job, status: int) -> None:
    """One audit record per object (not per JSON line): 200 served, 400 reported beside it, 500 left to a retry."""
    assert runtime.audit is not None
    version = ""
    if status == 200:
        with contextlib.suppress(OclawError):
            version = str(runtime.pool.get_nowait(job.model_name).version)
    runtime.audit.record(
        "infer",
        "ok" if status == 200 else "error",
        status,
        model=job.model_name,
        version=version,
        tenant="anonymous",
        request_id=f"s3://{job.bucket}/{job.key}",
        source="s3",
    )


def _continue(event: dict[str, Any], context: Any, number: int, stop: Incomplete) -> None:
    """Invoke this function (same alias or version) asynchronously with the same event, or raise ``stop``.

    Lambda retries an asynchronous event twice at most; a fresh invocation gets its retries anew, so an object that
    needs many tries, each making progress, still finishes. Without progress, Lambda's retries apply.
    """
    function = getattr(context, "invoked_function_arn", None)
    if not stop.progress or not isinstance(function, str):
        raise stop
    fields = {"event": "s3_continuation", CONTINUATION: number + 1, "function": function, "reason": str(stop)}
    if number >= MAX_CONTINUATIONS:
        log.error(
            "S3 event not continued: %d continuations, the most; Lambda's retries take over",
            number,
            extra={"oclaw": {**fields, "event": "s3_continuation_limit"}},
        )
        raise stop
    from botocore.exceptions import BotoCoreError, ClientError

    payload = json.dumps({**event, CONTINUATION: number + 1}).encode()
    try:  # one quick attempt: it runs in the time kept before the deadline
        aws_clients.client("lambda", quick=True).invoke(FunctionName=function, InvocationType="Event", Payload=payload)
    except (BotoCoreError, ClientError) as exc:
        log.warning(
            "S3 event not continued (%s); Lambda's retries take over",
            exc,
            extra={"oclaw": {**fields, "event": "s3_continuation_failed"}},
        )
        raise stop from exc
    log.info("S3 event continued in a new invocation", extra={"oclaw": fields})


def _process(env: Env, job: Job) -> dict[str, Any]:
    s3 = env.s3
    args = {"Bucket": job.bucket, "Key": job.key, **({"VersionId": job.version} if job.version else {})}
    try:
        obj = s3.get_object(**args)
    except s3.exceptions.NoSuchKey:
        raise BadObject("the object no longer exists") from None
    job = replace(job, source=f"{obj.get('ETag', '').strip(chr(34))}:{obj.get('VersionId') or job.version or ''}")
    suffix = os.path.splitext(job.key)[1].lower()
    try:
        began = perf_counter()
        head = s3.head_object(Bucket=job.bucket, Key=job.out_key)
        env.pace.add(began)
        if head.get("Metadata", {}).get(SOURCE_META) == job.source:
            if suffix == ".jsonl":  # a try that ended after writing the result left its parts
                delete(env, job, [key for key, _ in listed(env, job, parts_root(job))])
            return {"key": job.key, "output": job.out_key, "skipped": "already done for this object version"}
    except s3.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
            raise
    body = obj["Body"].read()
    try:
        model = env.runtime.pool.get(job.model_name)
    except OclawError as exc:
        raise BadObject(exc.message) from None
    if suffix == ".jsonl":
        return {"key": job.key, "output": job.out_key, "lines": _jsonl(env, model, job, body)}
    if suffix in (".npy", ".npz"):
        began = perf_counter()
        payload, rows = _tensors(model, body, suffix, env.runtime.settings.batch_max_rows)
        put(s3, job, job.out_key, payload, "application/octet-stream")
        total = (perf_counter() - began) * 1000
        _meter_object(env.runtime, job, rows=rows, bytes_in=len(body), bytes_out=len(payload), total_ms=total)
        return {"key": job.key, "output": job.out_key, "rows": rows}
    if suffix in IMAGE_SUFFIXES:
        if model.image_input is None:
            raise BadObject(f"model {model.name!r} declares no image pre-processing")
        from engine.dataplane import infer_bytes

        try:
            encoded = infer_bytes(model, body, None, "image/" + suffix[1:])
        except OclawError as exc:
            raise BadObject(exc.message) from None
        put(s3, job, job.out_key, encoded.body, "application/json")
        _meter_object(
            env.runtime, job, rows=1, bytes_in=len(body), bytes_out=len(encoded.body), total_ms=encoded.compute_ns / 1e6
        )
        return {"key": job.key, "output": job.out_key, "rows": 1}
    raise BadObject(f"unsupported object type {suffix or '(none)'}; expected .jsonl, .npy, .npz or an image")


def _meter(
    runtime: Runtime,
    job: Job,
    *,
    ids: list[str],
    results: Sequence[InferResponse | OclawError],
    bytes_in: list[int],
    bytes_out: list[int],
    total_ms: float,
    source: str,
) -> None:
    """One record per served item (a JSONL line, or a whole tensor/image object)."""
    meter = runtime.meter
    if not meter.enabled or not ids:
        return
    ok = [r for r in results if isinstance(r, InferResponse)]
    version = ok[0].model_version if ok else ""
    meter.submit(
        meter.records(
            request_ids=ids,
            tenants=["anonymous"] * len(ids),
            model=model_label(runtime.pool.states(), job.model_name),
            version=version,
            items=[r.rows if isinstance(r, InferResponse) else 1 for r in results],
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            statuses=[200 if isinstance(r, InferResponse) else 400 for r in results],
            queue_ms=[0.0] * len(ids),
            compute_ms=sum(r.compute_ns for r in ok) / 1e6,
            total_ms=total_ms,
            cold=runtime.cold,
            source=source,
        )
    )
    runtime.cold = False


def _meter_object(runtime: Runtime, job: Job, *, rows: int, bytes_in: int, bytes_out: int, total_ms: float) -> None:
    model = runtime.pool.get_nowait(job.model_name)
    response = InferResponse(model.name, str(model.version), [], rows=rows, compute_ns=int(total_ms * 1e6))
    _meter(
        runtime,
        job,
        ids=[job.key],
        results=[response],
        bytes_in=[bytes_in],
        bytes_out=[bytes_out],
        total_ms=total_ms,
        source="s3",
    )


def _tensors(model: LoadedModel, body: bytes, suffix: str, max_rows: int) -> tuple[bytes, int]:
    try:
        loaded: Any = np.load(io.BytesIO(body), allow_pickle=False)
        arrays = {model.inputs[0].name: loaded} if suffix == ".npy" else {k: loaded[k] for k in loaded.files}
    except (ValueError, OSError, EOFError, KeyError) as exc:
        raise BadObject(f"not a readable {suffix} file: {exc}") from None
    if suffix == ".npy" and len(model.inputs) != 1:
        raise BadObject(f"a .npy object needs a single-input model; use .npz named {[s.name for s in model.inputs]}")
    try:
        rows = {int(a.shape[0]) for a in arrays.values() if a.ndim}
        if len(rows) != 1:
            raise BadObject(f"every array needs the same first (row) dimension, got {sorted(rows)}")
        total = rows.pop()
        step = max_rows or model.manifest.max_batch_size or total or 1
        requests = [
            InferRequest(
                inputs=[
                    InputTensor(n, v2_datatype(a), a[s : s + step].shape, a[s : s + step]) for n, a in arrays.items()
                ]
            )
            for s in range(0, total, step)
        ]
        responses = infer_many(model, requests, max_rows=max_rows or None)
    except OclawError as exc:
        raise BadObject(exc.message) from None
    outputs: dict[str, list[np.ndarray]] = {}
    for resp in responses:
        if isinstance(resp, OclawError):
            raise BadObject(resp.message)
        for out in resp.outputs:
            outputs.setdefault(out.name, []).append(out.array)
    merged = {name: np.concatenate(parts) for name, parts in outputs.items()}
    buf = io.BytesIO()
    if suffix == ".npy" and len(merged) == 1:
        np.save(buf, next(iter(merged.values())), allow_pickle=False)
    else:
        np.savez(buf, **merged)  # type: ignore[arg-type]
    return buf.getvalue(), total


def _line_result(lineno: int, result: InferResponse | OclawError) -> bytes:
    if isinstance(result, OclawError):
        return json.dumps({"line": lineno, "error": result.message}).encode()
    for out in result.outputs:
        out.binary = False
    body, _ = encode_response(result)
    return body


def _jsonl(env: Env, model: LoadedModel, job: Job, body: bytes) -> int:
    settings = env.runtime.settings
    chunk = settings.s3_chunk_lines
    lines = [(n + 1, line) for n, line in enumerate(body.split(b"\n")) if line.strip()]
    parts = saved_parts(env, job)
    done = parts[-1].end if parts else 0
    last_chunk_ms = model.estimate_ms() * chunk
    for start in range(done, len(lines), chunk):
        if not env.has(1.5 * last_chunk_ms):
            raise Incomplete(
                f"s3://{job.bucket}/{job.key}: stopped at line {start} of {len(lines)} before the "
                "Lambda deadline; saved parts stay and the retry resumes there"
            )
        began = perf_counter()
        window = lines[start : start + chunk]
        requests: list[InferRequest | OclawError] = []
        for _, text in window:
            try:
                requests.append(decode_request(text, max_elements=settings.max_tensor_elements))
            except OclawError as exc:
                requests.append(exc)
        valid = [r for r in requests if isinstance(r, InferRequest)]
        answers = iter(infer_many(model, valid, max_rows=settings.batch_max_rows or None))
        results = [next(answers) if isinstance(r, InferRequest) else r for r in requests]
        lines_out = [_line_result(n, res) for (n, _), res in zip(window, results, strict=True)]
        part = b"".join(line + b"\n" for line in lines_out)
        parts.append(save_part(env, job, start, start + len(window), part))
        last_chunk_ms = (perf_counter() - began) * 1000
        _meter(
            env.runtime,
            job,
            ids=[f"{job.key}#{n}" for n, _ in window],
            results=results,
            bytes_in=[len(t) for _, t in window],
            bytes_out=[len(x) for x in lines_out],
            total_ms=last_chunk_ms,
            source="s3-line",
        )
    finish(env, job, parts, len(lines))
    return len(lines)
