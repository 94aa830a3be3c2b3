"""A long JSON Lines object finishes over continuations: a try that made progress re-invokes the function.

S3 invokes the function asynchronously and Lambda retries such an event twice at most, so a try that made progress
continues the event in a new asynchronous invocation: under ``awslambdaric``, with Lambda's Invoke API served on
127.0.0.1 (tests/s3resumekit.py records each request, as Lambda's asynchronous queue takes it), a long object
finishes over many invocations none of which fails; without progress, or when the Invoke API refuses, it fails.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from engine import aws as aws_clients
from engine.errors import InvalidInput
from engine.runtime import Runtime
from handler import s3_events
from handler.local_lambda import ACCOUNT, REGION, LocalLambda
from tests import s3resumekit
from tests.conftest import ROOT
from tests.s3resumekit import (
    BUCKET,
    REQUEST_BUDGET_MS,
    LambdaInvokeAPI,
    LambdaTime,
    handler_on_request_time,
    keys,
    lambda_env,
    lines_in_output,
    once_each,
    put_jsonl,
    s3_event,
)

aws = s3resumekit.aws  # the kit's fixtures, by the names the tests ask for
runtime = s3resumekit.runtime


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
