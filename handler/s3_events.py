"""S3 object-created events: read an object, infer it in row batches, write the result whole.

Key layout: ``<input prefix><model>/<path>`` → ``<output prefix><model>/<path><suffix>``. Inputs: ``.jsonl``
(one V2 infer request per line → one V2 response per line), ``.npy``/``.npz`` tensors (→ ``.npy``/``.npz``),
images for models with image pre-processing (→ a V2 response as ``.json``). A bad object gets
``<output key>.error.json`` and never fails the others; a transient AWS error fails the invocation so Lambda
retries it, and a retry overwrites the same keys. Long JSON Lines objects are saved in parts
(``<output key>.parts/<source digest>/<first>-<end>.part``): when the Lambda deadline comes close the work stops,
the parts stay, and the retry resumes after the last saved line. Finishing joins the parts into the result (or,
short of time, joins the first ones into one bigger part), then deletes them; every step is one S3 request whose
effect the next try recognises, so an invocation may end between any two of them and nothing is lost or doubled.
An S3 notification is invoked asynchronously, and Lambda retries such an event twice at most: a try that stopped
after making progress therefore re-invokes the function itself with the same event (a continuation, with a fresh
retry budget) and returns; a try without progress, or whose re-invoke failed, fails for Lambda's retries.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
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

log = logging.getLogger("oclaw.s3")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
SOURCE_META = "oclaw-source"
#: Time kept besides OCLAW_LAMBDA_RESERVE_MS when deciding whether one more step fits before the deadline.
SLACK_MS = 200
#: Most keys one DeleteObjects request takes.
DELETE_BATCH = 1000
#: The event key counting the continuations of an S3 notification, and the most one notification may chain.
CONTINUATION = "oclaw_continuation"
MAX_CONTINUATIONS = 1000
_PART_NAME = re.compile(r"(\d{10})-(\d{10})\.part")


class BadObject(Exception):
    """The object cannot be inferred (format, shape, model); reported beside it, never retried."""


class Incomplete(Exception):
    """Stopped before finishing (deadline close, parts not deleted); what is saved stays and the retry resumes."""

    def __init__(self, message: str, *, progress: bool = False) -> None:
        super().__init__(message)
        #: Whether this try saved, joined or deleted anything (set by ``handle``).
        self.progress = progress


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


@dataclass(frozen=True)
class Job:
    """One object to infer."""

    bucket: str
    key: str
    version: str | None
    model_name: str
    out_key: str
    source: str = ""  # identity of the input (etag + version), recorded on every output


@dataclass
class Pace:
    """How fast S3 answers this invocation: its quickest request and an upper bound of milliseconds per byte."""

    call_ms: float = 0.0
    moved_ms: float = 0.0
    moved_bytes: int = 0
    calls: int = 0

    def add(self, began: float, moved: int = 0) -> None:
        """Count one request that began at ``began`` (``perf_counter``) and moved ``moved`` body bytes."""
        ms = (perf_counter() - began) * 1000
        self.call_ms = ms if not self.calls else min(self.call_ms, ms)
        self.calls += 1
        if moved:
            self.moved_ms += ms
            self.moved_bytes += moved

    def ms(self, nbytes: int) -> float:
        """Expected milliseconds of one request moving ``nbytes``."""
        return self.call_ms + nbytes * self.moved_ms / max(self.moved_bytes, 1)


@dataclass
class Progress:
    """The S3 writes this invocation made: parts saved (or joined), results written, deletions."""

    writes: int = 0


@dataclass(frozen=True)
class Env:
    """What every step needs: the S3 client, the runtime, the Lambda clock and how fast S3 answers."""

    s3: Any
    runtime: Runtime
    remaining_ms: Callable[[], float]
    pace: Pace = field(default_factory=Pace)
    progress: Progress = field(default_factory=Progress)

    def has(self, ms: float) -> bool:
        """Whether ``ms`` more of work ends before the Lambda deadline, with the reserve and some slack kept."""
        return self.remaining_ms() >= ms + self.runtime.settings.lambda_reserve_ms + SLACK_MS


@dataclass
class Part:
    """Saved result lines ``[start, end)`` of a JSON Lines object (blank lines not counted)."""

    start: int
    end: int
    key: str
    size: int
    body: bytes | None = field(default=None, repr=False)  # kept when this invocation wrote it


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
        try:
            done.append(_process(env, job))
        except BadObject as exc:
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
            done.append({"key": key, "incomplete": str(exc), CONTINUATION: continuation + 1})
            break  # this object and the event's next ones are the continuation's
    return {"processed": done}


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
                _delete(env, job, [key for key, _ in _listed(env, job, _parts_root(job))])
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
        _put(s3, job, job.out_key, payload, "application/octet-stream")
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
        _put(s3, job, job.out_key, encoded.body, "application/json")
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


def _put(s3: Any, job: Job, key: str, body: bytes, content_type: str) -> None:
    """One PUT: S3 shows an object whole or not at all."""
    s3.put_object(Bucket=job.bucket, Key=key, Body=body, ContentType=content_type, Metadata={SOURCE_META: job.source})


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
    parts = _saved_parts(env, job)
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
        parts.append(_save_part(env, job, start, start + len(window), part))
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
    _finish(env, job, parts, len(lines))
    return len(lines)


def _parts_root(job: Job) -> str:
    """Where every version's parts of this object are saved."""
    return job.out_key + ".parts/"


def _parts_dir(job: Job) -> str:
    """Where this object version's parts are saved: named by its source identity, so a listing tells it."""
    return f"{_parts_root(job)}{hashlib.sha256(job.source.encode()).hexdigest()[:16]}/"


def _part_key(job: Job, start: int, end: int) -> str:
    return f"{_parts_dir(job)}{start:010d}-{end:010d}.part"


def _save_part(env: Env, job: Job, start: int, end: int, body: bytes) -> Part:
    key = _part_key(job, start, end)
    began = perf_counter()
    _put(env.s3, job, key, body, "application/x-ndjson")
    env.pace.add(began, len(body))
    env.progress.writes += 1
    return Part(start, end, key, len(body), body)


def _saved_parts(env: Env, job: Job) -> list[Part]:
    """The parts earlier tries saved for this object version, end to end from line 0; any other part is deleted."""
    mine = _parts_dir(job)
    found, stale = [], []
    for key, size in _listed(env, job, _parts_root(job)):
        name = _PART_NAME.fullmatch(key[len(mine) :]) if key.startswith(mine) else None
        if name is not None and int(name[1]) < int(name[2]):
            found.append(Part(int(name[1]), int(name[2]), key, size))
        else:
            stale.append(key)  # another version's, or not a part
    chain: list[Part] = []
    for part in sorted(found, key=lambda p: (p.start, -p.end)):
        if part.start == (chain[-1].end if chain else 0):
            chain.append(part)
        else:
            stale.append(part.key)  # inside a joined part whose sources a try had no time to delete, or past a gap
    _delete(env, job, stale)
    return chain


def _finish(env: Env, job: Job, parts: list[Part], total: int) -> None:
    """Join the parts into the result, then delete them; short of time, join the first ones into one part instead.

    Each try thus ends with fewer, longer parts (or the result), however many parts there were.
    """
    bodies: list[bytes] = []
    joined = 0
    for part in parts:
        read_ms = 0.0 if part.body is not None else env.pace.ms(part.size)
        if not env.has(read_ms + 1.5 * (env.pace.ms(joined + part.size) + env.pace.call_ms)):  # + write, delete
            break
        if part.body is None:
            began = perf_counter()
            part.body = env.s3.get_object(Bucket=job.bucket, Key=part.key)["Body"].read()
            env.pace.add(began, len(part.body))
        bodies.append(part.body)
        joined += len(part.body)
    if len(bodies) == len(parts):
        began = perf_counter()
        _put(env.s3, job, job.out_key, b"".join(bodies), "application/x-ndjson")
        env.pace.add(began, joined)
        env.progress.writes += 1
        _delete(env, job, [p.key for p in parts])  # a try ending before this is done: the retry deletes them
        return
    where = f"s3://{job.bucket}/{job.key}: all {total} lines inferred, {len(parts)} parts"
    if len(bodies) < 2:
        raise Incomplete(f"{where} to join and no time to join two before the Lambda deadline; the retry joins them")
    first = parts[: len(bodies)]
    _save_part(env, job, first[0].start, first[-1].end, b"".join(bodies))
    _delete(env, job, [p.key for p in first])  # a try ending before this is done: the retry deletes them
    raise Incomplete(
        f"{where} joined into {len(parts) - len(first) + 1} before the Lambda deadline; the retry goes on joining"
    )


def _listed(env: Env, job: Job, prefix: str) -> list[tuple[str, int]]:
    """(key, size) of every object under ``prefix``; stops (Incomplete) when the deadline comes close."""
    found: list[tuple[str, int]] = []
    token: dict[str, str] = {}
    while True:
        if token and not env.has(1.5 * env.pace.call_ms):  # the first page always fits in the reserve
            raise Incomplete(f"s3://{job.bucket}/{job.key}: stopped listing {prefix} before the Lambda deadline")
        began = perf_counter()
        page = env.s3.list_objects_v2(Bucket=job.bucket, Prefix=prefix, **token)
        env.pace.add(began)
        found += [(o["Key"], int(o.get("Size", 0))) for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return found
        token = {"ContinuationToken": page["NextContinuationToken"]}


def _delete(env: Env, job: Job, keys: list[str]) -> None:
    """Delete ``keys``, DELETE_BATCH a request; stops (Incomplete) when the deadline comes close or a key stays."""
    batch_ms = env.pace.call_ms
    for at in range(0, len(keys), DELETE_BATCH):
        if not env.has(1.5 * batch_ms):
            raise Incomplete(
                f"s3://{job.bucket}/{job.key}: {len(keys) - at} parts left to delete before the Lambda deadline; "
                "the retry deletes them"
            )
        began = perf_counter()
        batch = [{"Key": key} for key in keys[at : at + DELETE_BATCH]]
        reply = env.s3.delete_objects(Bucket=job.bucket, Delete={"Objects": batch, "Quiet": True})
        batch_ms = (perf_counter() - began) * 1000
        env.pace.add(began)
        errors = reply.get("Errors") or []
        env.progress.writes += len(batch) > len(errors)
        if errors:
            error = errors[0]
            raise Incomplete(
                f"s3://{job.bucket}/{job.key}: {len(errors)} parts not deleted ({error.get('Code')}: "
                f"{error.get('Message')}, {error.get('Key')}); the retry deletes them"
            )
