"""Finishing a JSON Lines object (join the parts, write the result, delete the parts) may end anywhere.

Two tests run the handler under the genuine ``awslambdaric`` (handler/local_lambda.py) against moto's server: one
whose process is SIGKILLed right after S3 answered the result's PUT, one under a 2-second Lambda timeout. The
third runs ``s3_events.handle`` in this process on Lambda time counted in S3 requests, and ends an invocation after
each S3 write in turn. After the redeliveries every line is in the output prefix exactly once and no part is left.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest

from engine import aws as aws_clients
from engine.runtime import Runtime
from handler import s3_events
from handler.local_lambda import LocalLambda
from tests import s3resumekit
from tests.conftest import ROOT
from tests.s3resumekit import (
    REQUEST_BUDGET_MS,
    REQUEST_MS,
    Ended,
    LambdaInvokeAPI,
    LambdaTime,
    clear,
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

KILL_AFTER_PUT_OF = "TEST_KILL_AFTER_PUT_OF"  # read only by the handler below, never by oclaw


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
