"""Finishing a JSON Lines object (join the parts, write the result, delete the parts) may end anywhere.

Two tests run the handler under the genuine ``awslambdaric`` (handler/local_lambda.py) against moto's server: one
whose process is SIGKILLed right after S3 answered the result's PUT, one under a 2-second Lambda timeout. The
third runs ``s3_events.handle`` in this process on Lambda time counted in S3 requests, and ends an invocation after
each S3 write in turn. After the redeliveries every line is in the output prefix exactly once and no part is left.

S3 invokes the function asynchronously and Lambda retries such an event twice at most, so a try that made progress
continues the event in a new asynchronous invocation: under ``awslambdaric``, with Lambda's Invoke API served on
127.0.0.1 by this module (it records each request, as Lambda's asynchronous queue takes it), a long object finishes
over many invocations none of which fails; without progress, or when the Invoke API refuses, the invocation fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import boto3
import pytest

from engine import aws as aws_clients
from engine.config import Settings
from engine.errors import InvalidInput
from engine.runtime import Runtime
from handler import s3_events, s3_parts
from handler.local_lambda import ACCOUNT, REGION, LocalLambda
from tests.conftest import AWS_ENV, ROOT, use_moto

BUCKET = "oclaw-resume"
KILL_AFTER_PUT_OF = "TEST_KILL_AFTER_PUT_OF"  # read only by the handlers below, never by oclaw
REQUEST_BUDGET_MS = "TEST_REQUEST_BUDGET_MS"
REQUEST_MS = "TEST_REQUEST_MS"  # Lambda time one S3 request counts for (default 100 ms)


def handler_killed_after_put(event: Any, context: Any) -> Any:
    """oclaw's Lambda handler in a process that SIGKILLs itself once S3 has answered the PUT of one key.

    The kill comes from a botocore ``after-call`` hook on the client oclaw's S3 event path uses: the object is
    stored, and nothing of the handler runs after it (no ``except``, no ``finally``), as when an instance dies.
    """
    from handler import aws_lambda  # its import is INIT: here, in the Lambda process only

    s3 = aws_clients.client("s3")
    if not getattr(s3, "_test_kill_hook", False):
        target = os.environ[KILL_AFTER_PUT_OF]

        def note(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
            context["test_kill"] = params.get("Key") == target

        def kill(context: dict[str, Any], **_: Any) -> None:
            if context.get("test_kill"):
                os.kill(os.getpid(), signal.SIGKILL)

        s3.meta.events.register("before-parameter-build.s3.PutObject", note)
        s3.meta.events.register("after-call.s3.PutObject", kill)
        s3._test_kill_hook = True
    return aws_lambda.lambda_handler(event, context)


@pytest.fixture()
def aws(moto: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    use_moto(moto, monkeypatch)
    s3 = boto3.client("s3", endpoint_url=moto, region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    yield {"s3": s3, "url": moto}
    clear(s3, "")
    s3.close()
    aws_clients.reset()


def clear(s3: Any, prefix: str) -> None:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            s3.delete_object(Bucket=BUCKET, Key=obj["Key"])


def keys(s3: Any, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def put_jsonl(s3: Any, key: str, count: int) -> None:
    lines = [
        {
            "id": f"line-{i}",
            "inputs": [
                {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": [float(i)] * 16},
                {"name": "INPUT1", "datatype": "FP32", "shape": [1, 16], "data": [1.0] * 16},
            ],
        }
        for i in range(count)
    ]
    s3.put_object(Bucket=BUCKET, Key=key, Body="\n".join(map(json.dumps, lines)).encode() + b"\n")


def s3_event(key: str) -> dict[str, Any]:
    record = {"eventSource": "aws:s3", "eventName": "ObjectCreated:Put"}
    return {"Records": [{**record, "s3": {"bucket": {"name": BUCKET}, "object": {"key": key}}}]}


def lines_in_output(s3: Any) -> Counter[str]:
    """How often each line's id appears in any object under the output prefix (what a reader of it would count)."""
    seen: Counter[str] = Counter()
    for key in keys(s3, "output/"):
        for line in s3.get_object(Bucket=BUCKET, Key=key)["Body"].read().splitlines():
            row = json.loads(line)
            assert row["outputs"][0]["data"] == [float(row["id"].split("-")[1]) + 1] * 16
            seen[row["id"]] += 1
    return seen


def once_each(count: int) -> Counter[str]:
    return Counter(f"line-{i}" for i in range(count))


def lambda_env(repo: Path, aws: dict[str, Any], chunk_lines: int, **extra: str) -> dict[str, str]:
    return {
        "OCLAW_MODEL_REPOSITORY": str(repo),
        "OCLAW_PRELOAD": "add_sub",
        "OCLAW_S3_CHUNK_LINES": str(chunk_lines),
        "AWS_ENDPOINT_URL": aws["url"],
        **AWS_ENV,
        **extra,
    }


def test_killed_right_after_the_result_put_the_redelivery_leaves_each_line_once(
    aws: dict[str, Any], repo: Path, tmp_path: Path
) -> None:
    """A real SIGKILL of the awslambdaric process right after the result's PUT, then Lambda's redelivery."""
    s3, out = aws["s3"], "output/add_sub/kill.jsonl.out.jsonl"
    put_jsonl(s3, "input/add_sub/kill.jsonl", 45)
    event = s3_event("input/add_sub/kill.jsonl")
    env = lambda_env(repo, aws, 10, **{KILL_AFTER_PUT_OF: out})
    handler = f"{__name__}.{handler_killed_after_put.__name__}"
    with LocalLambda(handler, env=env, cwd=ROOT, log=tmp_path / "killed.log") as fn:
        fn.wait_init()
        killed = fn.invoke(event)
        assert fn.proc is not None and fn.proc.wait(timeout=30) == -signal.SIGKILL
    assert killed.payload is None and killed.error is None  # the instance died: no answer at all
    assert out in keys(s3, "output/") and len(keys(s3, out + ".parts/")) == 5  # the window the kill left
    with LocalLambda(env=lambda_env(repo, aws, 10), cwd=ROOT, log=tmp_path / "retry.log") as fn:
        fn.wait_init()
        retry = fn.invoke(event)
    assert retry.error is None, retry.error
    assert retry.json()["processed"][0]["skipped"] == "already done for this object version"
    assert lines_in_output(s3) == once_each(45)
    assert keys(s3, "output/") == [out]


def test_2000_lines_under_a_short_timeout_finish_after_retries(aws: dict[str, Any], repo: Path, tmp_path: Path) -> None:
    """2,000 lines, 4 a part (500 parts), under a 2 s Lambda timeout, redelivered until done as Lambda's retries do.

    The function's time is counted in S3 requests (20 ms each, ``handler_on_request_time``), so what each try does
    is the same on a busy machine as on an idle one; the re-invoke is refused, so every try that stops fails for
    Lambda's retry. Each try makes progress: it stops (``Incomplete``) before the deadline with more parts, or fewer
    and longer ones. Joining 500 parts and deleting them one by one in a single try, as before, takes 1,000 S3
    requests (20 s of this clock), so every try of that was killed and the object never finished.
    """
    s3, out = aws["s3"], "output/add_sub/long.jsonl.out.jsonl"
    put_jsonl(s3, "input/add_sub/long.jsonl", 2000)
    event = s3_event("input/add_sub/long.jsonl")
    handler = f"{__name__}.{handler_on_request_time.__name__}"
    state: tuple[list[str], bool] | None = None
    stalled = stops = 0
    with LambdaInvokeAPI(refuse=True) as invokes:
        budget = {REQUEST_BUDGET_MS: "2000", REQUEST_MS: "20"}
        env = lambda_env(repo, aws, 4, AWS_ENDPOINT_URL_LAMBDA=invokes.url, **budget)
        with LocalLambda(handler, env=env, cwd=ROOT, log=tmp_path / "lambda.log") as fn:
            fn.wait_init()
            for _ in range(200):
                result = fn.invoke(event)
                assert not result.timed_out and fn.proc is not None and fn.proc.poll() is None  # stopped itself
                if result.error is None:
                    break
                assert result.error["errorType"] == "Incomplete", result.error
                stops += 1
                now = (keys(s3, out + ".parts/"), out in keys(s3, "output/"))
                stalled = stalled + 1 if now == state else 0
                assert stalled < 3, f"3 tries in a row changed nothing; {now[0][:3]}"
                state = now
            else:
                pytest.fail("not finished after 200 tries")
    # the try that wrote the result may have had no time left to delete the parts: the next one only deletes them
    processed = result.json()["processed"][0]
    assert processed.get("lines") == 2000 or processed.get("skipped") == "already done for this object version"
    assert stops >= 3  # it did need several tries
    assert lines_in_output(s3) == once_each(2000)
    assert keys(s3, "output/") == [out]


class Ended(BaseException):
    """The invocation is over (killed, timed out): nothing of the handler runs after it."""


class LambdaTime:
    """Lambda time counted in S3 requests (100 ms each), with the invocation ended by its timeout or on cue.

    Requests, not the wall clock, decide when time is up, so what each try does is the same on any machine.
    """

    def __init__(self, client: Any) -> None:
        self.elapsed = self.budget = 0.0
        self.timeouts = 0
        self.writes: list[str] = []  # "Operation key" of each S3 write, over all invocations
        self.end_after_write: int | None = None
        client.meta.events.register("before-call.s3", self._request)
        client.meta.events.register("before-parameter-build.s3", self._note)
        client.meta.events.register("after-call.s3", self._answered)

    def invocation(self, budget_ms: float) -> Callable[[], float]:
        """A fresh invocation's clock: what ``context.get_remaining_time_in_millis`` would say."""
        self.elapsed, self.budget = 0.0, budget_ms
        return lambda: self.budget - self.elapsed

    def _request(self, **_: Any) -> None:
        if self.elapsed + 100 > self.budget:
            self.timeouts += 1
            raise Ended("Task timed out")
        self.elapsed += 100

    def _note(self, params: dict[str, Any], model: Any, context: dict[str, Any], **_: Any) -> None:
        if model.name in ("PutObject", "DeleteObject", "DeleteObjects"):
            context["test_write"] = f"{model.name} {params.get('Key', '')}"

    def _answered(self, context: dict[str, Any], **_: Any) -> None:
        if "test_write" in context:
            self.writes.append(context["test_write"])
            if len(self.writes) == self.end_after_write:
                raise Ended(f"ended right after {context['test_write']}")


@pytest.fixture(scope="module")
def runtime(repo: Path) -> Iterator[Runtime]:
    rt = Runtime(Settings.from_env({}, model_repository=str(repo), preload=("add_sub",), s3_chunk_lines=2))
    rt.preload()
    yield rt
    rt.close()


def run_until_done(runtime: Runtime, clock: LambdaTime, event: dict[str, Any]) -> int:
    """Redeliver ``event`` until an invocation succeeds; returns how many it took."""
    for tries in range(1, 30):
        try:
            s3_events.handle(event, None, runtime, remaining_ms=clock.invocation(1500))
            return tries
        except (Ended, s3_events.Incomplete):
            clock.end_after_write = None
    raise AssertionError("not finished after 30 tries")


def test_an_invocation_ended_after_any_s3_write_leaves_each_line_once(aws: dict[str, Any], runtime: Runtime) -> None:
    """24 lines in 12 parts, 15 S3 requests an invocation: inferring takes two tries, joining them a third."""
    s3, out = aws["s3"], "output/add_sub/anywhere.jsonl.out.jsonl"
    put_jsonl(s3, "input/add_sub/anywhere.jsonl", 24)
    event = s3_event("input/add_sub/anywhere.jsonl")
    clock = LambdaTime(aws_clients.client("s3"))
    assert run_until_done(runtime, clock, event) >= 3
    assert clock.timeouts == 0  # every try stopped by itself (Incomplete) before its deadline
    writes = list(clock.writes)
    assert writes[-2] == f"PutObject {out}" and writes[-1].startswith("DeleteObjects")
    spans = [re.search(r"/(\d+)-(\d+)\.part$", w) for w in writes if w.startswith(f"PutObject {out}.parts/")]
    assert any(int(m[2]) - int(m[1]) > 2 for m in spans if m), writes  # longer than a chunk: parts were joined
    assert lines_in_output(s3) == once_each(24) and keys(s3, "output/") == [out]
    for end_after in range(1, len(writes) + 1):
        clear(s3, "output/")
        clock.writes, clock.end_after_write = [], end_after
        run_until_done(runtime, clock, event)
        assert clock.timeouts == 0
        assert lines_in_output(s3) == once_each(24), (end_after, writes[end_after - 1])
        assert keys(s3, "output/") == [out], (end_after, writes[end_after - 1])


class RequestTime:
    """The function's Lambda clock counted in S3 requests (100 ms each), in the function's own process.

    What a try does then depends on requests, not on the machine's speed. A request past the budget SIGKILLs the
    process, as Lambda's timeout ends an instance (the tests below expect none).
    """

    def __init__(self, client: Any, budget_ms: float, request_ms: float = 100.0) -> None:
        self.budget, self.elapsed, self.request_ms = budget_ms, 0.0, request_ms
        client.meta.events.register("before-call.s3", self._request)

    def _request(self, **_: Any) -> None:
        if self.elapsed + self.request_ms > self.budget:
            os.kill(os.getpid(), signal.SIGKILL)
        self.elapsed += self.request_ms


class CountedContext:
    """awslambdaric's context, with the remaining time read from a ``RequestTime``."""

    def __init__(self, context: Any, time: RequestTime) -> None:
        self._context, self._time = context, time

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def get_remaining_time_in_millis(self) -> int:
        return int(self._time.budget - self._time.elapsed)


_request_time: RequestTime | None = None


def handler_on_request_time(event: Any, context: Any) -> Any:
    """oclaw's Lambda handler, each invocation given TEST_REQUEST_BUDGET_MS of Lambda time counted in S3 requests."""
    from handler import aws_lambda  # its import is INIT: here, in the Lambda process only

    global _request_time
    if _request_time is None:
        request_ms = float(os.environ.get(REQUEST_MS, "100"))
        _request_time = RequestTime(aws_clients.client("s3"), float(os.environ[REQUEST_BUDGET_MS]), request_ms)
        # how fast S3 answers (s3_parts.Pace) and how long a chunk took are timed on the same counted clock, so the
        # function's estimates and its deadline agree whatever the machine's speed
        counted = _request_time

        def clock() -> float:
            return counted.elapsed / 1000

        s3_parts.perf_counter = clock  # type: ignore[attr-defined]
        s3_events.perf_counter = clock  # type: ignore[attr-defined]
    _request_time.elapsed = 0.0
    return aws_lambda.lambda_handler(event, CountedContext(context, _request_time))


@dataclass
class AsyncInvoke:
    """One Invoke request as AWS Lambda's API received it."""

    function: str  # the FunctionName of the path: a name or an ARN, with its qualifier
    qualifier: str | None  # the ?Qualifier= parameter
    invocation_type: str | None  # X-Amz-Invocation-Type
    payload: Any


class LambdaInvokeAPI:
    """AWS Lambda's Invoke API on 127.0.0.1 in place of its asynchronous queue: each request is recorded and
    answered 202 (queued), or refused with 403 AccessDeniedException (a role without lambda:InvokeFunction)."""

    def __init__(self, *, refuse: bool = False) -> None:
        self.refuse = refuse
        self.received: list[AsyncInvoke] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                url = urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                match = re.fullmatch(r"/2015-03-31/functions/([^/]+)/invocations", url.path)
                if match is None:
                    self._send(
                        404, {"Type": "User", "Message": f"unknown path {url.path}"}, "ResourceNotFoundException"
                    )
                    return
                qualifier = parse_qs(url.query).get("Qualifier", [None])[0]
                kind = self.headers.get("X-Amz-Invocation-Type")
                api.received.append(AsyncInvoke(unquote(match[1]), qualifier, kind, json.loads(body)))
                if api.refuse:
                    message = "not authorized to perform: lambda:InvokeFunction"
                    self._send(403, {"Type": "User", "Message": message}, "AccessDeniedException")
                else:
                    self._send(202, None)

            def _send(self, status: int, doc: dict[str, str] | None, error: str | None = None) -> None:
                body = b"" if doc is None else json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if error:
                    self.send_header("X-Amzn-ErrorType", error)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def take(self) -> list[AsyncInvoke]:
        """The requests received since the last call."""
        taken, self.received = self.received, []
        return taken

    def __enter__(self) -> LambdaInvokeAPI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def logged(path: Path, event: str) -> list[dict[str, Any]]:
    """The structured log records ``{"event": event, ...}`` the function printed."""
    found = []
    for line in path.read_text(errors="replace").splitlines():
        if f'"{event}"' in line and (start := line.find("{")) >= 0:
            with_fields = json.loads(line[start:])
            if with_fields.get("event") == event:
                found.append(with_fields)
    return found


LIVE = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:oclaw-local:live"


def test_a_long_object_finishes_through_continuations_with_no_invocation_failing(
    aws: dict[str, Any], repo: Path, tmp_path: Path
) -> None:
    """2,000 lines in 200 parts, 30 S3 requests an invocation: each try continues the event in a new invocation.

    Lambda delivers each recorded asynchronous Invoke to the runtime, as its queue does, until none comes. Every
    invocation returns without a function error (Lambda's retries, 2 at most for S3 events, are never needed), and
    each continuation targets the function ARN and alias the runtime was invoked through.
    """
    s3, out = aws["s3"], "output/add_sub/chain.jsonl.out.jsonl"
    put_jsonl(s3, "input/add_sub/chain.jsonl", 2000)
    event = s3_event("input/add_sub/chain.jsonl")
    log = tmp_path / "lambda.log"
    handler = f"{__name__}.{handler_on_request_time.__name__}"
    with LambdaInvokeAPI() as invokes:
        env = lambda_env(repo, aws, 10, AWS_ENDPOINT_URL_LAMBDA=invokes.url, **{REQUEST_BUDGET_MS: "3000"})
        with LocalLambda(handler, env=env, cwd=ROOT, log=log, qualifier="live") as fn:
            fn.wait_init()
            pending: list[dict[str, Any]] = [event]
            results: list[dict[str, Any]] = []
            while pending and len(results) < 100:
                result = fn.invoke(pending.pop())
                assert result.error is None and result.payload is not None, (len(results), result.error)
                results.append(result.json())
                for request in invokes.take():
                    assert request.function == LIVE and request.qualifier is None  # the same function and alias
                    assert request.invocation_type == "Event"  # asynchronous: Lambda queues it
                    assert request.payload == {**event, "oclaw_continuation": len(results)}
                    pending.append(request.payload)
                assert len(pending) <= 1
    assert not pending, "not finished after 100 invocations"
    assert len(results) > 3  # more tries than Lambda gives one asynchronous event
    for number, continued in enumerate(results[:-1], 1):
        assert continued["processed"][0]["oclaw_continuation"] == number
    last = results[-1]["processed"][0]  # the result written, or found by a try after the one that wrote it
    assert last.get("lines") == 2000 or last.get("skipped") == "already done for this object version", last
    assert lines_in_output(s3) == once_each(2000)
    assert keys(s3, "output/") == [out]  # no part left
    lines = logged(log, "s3_continuation")
    assert [line["oclaw_continuation"] for line in lines] == list(range(1, len(results)))
    assert all(line["function"] == LIVE for line in lines)


#: Lambda time an invocation gets, and whether the Invoke API refuses: 400 ms is GetObject, HeadObject and
#: ListObjectsV2, then less than the reserve is left, so no part is saved.
STUCK = {"refused": ("3000", True), "no progress": ("400", False)}


@pytest.mark.parametrize("case", sorted(STUCK))
def test_without_a_continuation_the_invocation_fails_for_lambdas_retry(
    aws: dict[str, Any], repo: Path, tmp_path: Path, case: str
) -> None:
    """No progress made, or the re-invoke refused: ``Incomplete`` fails the invocation, so Lambda retries it."""
    budget_ms, refuse = STUCK[case]
    s3, out = aws["s3"], "output/add_sub/stuck.jsonl.out.jsonl"
    put_jsonl(s3, "input/add_sub/stuck.jsonl", 1000)
    event = s3_event("input/add_sub/stuck.jsonl")
    handler = f"{__name__}.{handler_on_request_time.__name__}"
    with LambdaInvokeAPI(refuse=refuse) as invokes:
        env = lambda_env(repo, aws, 10, AWS_ENDPOINT_URL_LAMBDA=invokes.url, **{REQUEST_BUDGET_MS: budget_ms})
        with LocalLambda(handler, env=env, cwd=ROOT, log=tmp_path / "lambda.log", qualifier="live") as fn:
            fn.wait_init()
            result = fn.invoke(event)
    assert result.error is not None and result.error["errorType"] == "Incomplete", (case, result.error)
    parts = keys(s3, out + ".parts/")
    if refuse:
        assert [r.function for r in invokes.received] == [LIVE]  # it tried, and was refused
        assert parts  # what it saved stays for the retry
    else:
        assert invokes.received == [] and parts == []
    assert out not in keys(s3, "output/")


def test_continuations_are_bounded_and_only_for_s3_notifications(
    aws: dict[str, Any], runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_CONTINUATIONS, or for a batch job (its Step Functions task retries), ``Incomplete`` is raised."""
    s3 = aws["s3"]
    put_jsonl(s3, "input/add_sub/bounded.jsonl", 60)
    event = s3_event("input/add_sub/bounded.jsonl")
    context = SimpleNamespace(invoked_function_arn=LIVE)
    with LambdaInvokeAPI() as invokes:
        monkeypatch.setenv("AWS_ENDPOINT_URL_LAMBDA", invokes.url)
        aws_clients.reset()
        clock = LambdaTime(aws_clients.client("s3"))
        last = {**event, "oclaw_continuation": s3_events.MAX_CONTINUATIONS}
        with pytest.raises(s3_events.Incomplete) as stopped:
            s3_events.handle(last, context, runtime, remaining_ms=clock.invocation(1500))
        assert stopped.value.progress and invokes.take() == []
        batch = {"oclaw": "batch", "bucket": BUCKET, "keys": ["input/add_sub/bounded.jsonl"]}
        with pytest.raises(s3_events.Incomplete) as stopped:
            s3_events.handle(batch, context, runtime, remaining_ms=clock.invocation(1500))
        assert stopped.value.progress and invokes.take() == []
        before_last = {**event, "oclaw_continuation": s3_events.MAX_CONTINUATIONS - 1}
        result = s3_events.handle(before_last, context, runtime, remaining_ms=clock.invocation(1500))
        assert result["processed"][0]["oclaw_continuation"] == s3_events.MAX_CONTINUATIONS
        (request,) = invokes.take()
        assert request.payload == last and request.function == LIVE and request.invocation_type == "Event"
        for bad in ("3", -1, 2.0, True):
            with pytest.raises(InvalidInput, match="oclaw_continuation"):
                s3_events.handle({**event, "oclaw_continuation": bad}, context, runtime, remaining_ms=lambda: 1e9)
