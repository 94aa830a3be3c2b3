"""Resumable JSON Lines output on S3: a long object's results saved in parts, joined into the result, deleted.

Parts are ``<output key>.parts/<source digest>/<first>-<end>.part``: one listing tells a retry what is saved.
Finishing joins the parts into the result (or, short of time, joins the first ones into one longer part), then
deletes them; every step is one S3 request whose effect the next try recognises, so an invocation may end between
any two of them and no line is lost or doubled. Every step checks the Lambda clock first (``Env.has``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

from engine.runtime import Runtime

#: Metadata on every output naming the input it came from (etag + version): a retry recognises its own result.
SOURCE_META = "oclaw-source"
#: Time kept besides OCLAW_LAMBDA_RESERVE_MS when deciding whether one more step fits before the deadline.
SLACK_MS = 200
#: Most keys one DeleteObjects request takes.
DELETE_BATCH = 1000
_PART_NAME = re.compile(r"(\d{10})-(\d{10})\.part")


class Incomplete(Exception):
    """Stopped before finishing (deadline close, parts not deleted); what is saved stays and the retry resumes."""

    def __init__(self, message: str, *, progress: bool = False) -> None:
        super().__init__(message)
        #: Whether this try saved, joined or deleted anything (set by ``handle``).
        self.progress = progress


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


def put(s3: Any, job: Job, key: str, body: bytes, content_type: str) -> None:
    """One PUT: S3 shows an object whole or not at all."""
    s3.put_object(Bucket=job.bucket, Key=key, Body=body, ContentType=content_type, Metadata={SOURCE_META: job.source})


def parts_root(job: Job) -> str:
    """Where every version's parts of this object are saved."""
    return job.out_key + ".parts/"


def parts_dir(job: Job) -> str:
    """Where this object version's parts are saved: named by its source identity, so a listing tells it."""
    return f"{parts_root(job)}{hashlib.sha256(job.source.encode()).hexdigest()[:16]}/"


def part_key(job: Job, start: int, end: int) -> str:
    return f"{parts_dir(job)}{start:010d}-{end:010d}.part"


def save_part(env: Env, job: Job, start: int, end: int, body: bytes) -> Part:
    key = part_key(job, start, end)
    began = perf_counter()
    put(env.s3, job, key, body, "application/x-ndjson")
    env.pace.add(began, len(body))
    env.progress.writes += 1
    return Part(start, end, key, len(body), body)


def saved_parts(env: Env, job: Job) -> list[Part]:
    """The parts earlier tries saved for this object version, end to end from line 0; any other part is deleted."""
    mine = parts_dir(job)
    found, stale = [], []
    for key, size in listed(env, job, parts_root(job)):
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
    delete(env, job, stale)
    return chain


def finish(env: Env, job: Job, parts: list[Part], total: int) -> None:
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
        put(env.s3, job, job.out_key, b"".join(bodies), "application/x-ndjson")
        env.pace.add(began, joined)
        env.progress.writes += 1
        delete(env, job, [p.key for p in parts])  # a try ending before this is done: the retry deletes them
        return
    where = f"s3://{job.bucket}/{job.key}: all {total} lines inferred, {len(parts)} parts"
    if len(bodies) < 2:
        raise Incomplete(f"{where} to join and no time to join two before the Lambda deadline; the retry joins them")
    first = parts[: len(bodies)]
    save_part(env, job, first[0].start, first[-1].end, b"".join(bodies))
    delete(env, job, [p.key for p in first])  # a try ending before this is done: the retry deletes them
    raise Incomplete(
        f"{where} joined into {len(parts) - len(first) + 1} before the Lambda deadline; the retry goes on joining"
    )


def listed(env: Env, job: Job, prefix: str) -> list[tuple[str, int]]:
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


def delete(env: Env, job: Job, keys: list[str]) -> None:
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
