"""Shared helpers of the S3 JSON Lines tests: a bucket on moto, Lambda time counted in S3 requests, its Invoke API."""

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
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import boto3
import pytest

from engine import aws as aws_clients
from engine.config import Settings
from engine.runtime import Runtime
from handler import s3_events, s3_parts
from tests.conftest import AWS_ENV, use_moto

BUCKET = "oclaw-resume"
REQUEST_BUDGET_MS = "TEST_REQUEST_BUDGET_MS"
REQUEST_MS = "TEST_REQUEST_MS"  # Lambda time one S3 request counts for (default 100 ms)


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


class RequestTime:
    """The function's Lambda clock counted in S3 requests (100 ms each), in the function's own process.

    What a try does then depends on requests, not on the machine's speed. A request past the budget SIGKILLs the
    process, as Lambda's timeout ends an instance (the tests expect none).
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
