"""HTTP events on Lambda: API Gateway REST (v1), HTTP API (v2), Function URLs (v2 format) and ALB."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from engine.errors import InvalidInput, PayloadTooLarge
from handler.v2 import Reply

_TEXT_TYPES = ("application/json", "text/")


@dataclass(frozen=True, slots=True)
class HttpEvent:
    """The parts of an HTTP event oclaw needs, whatever its source."""

    source: str  # "apigw-v1" | "apigw-v2" | "alb"
    method: str
    path: str
    headers: dict[str, str]
    body: str | None
    base64: bool
    multi_value: bool


def infer(event: Any) -> str | None:
    """The HTTP source of an event, or None when it is not an HTTP event."""
    if not isinstance(event, dict):
        return None
    context = event.get("requestContext")
    if not isinstance(context, dict):
        return None
    if "elb" in context and "httpMethod" in event:
        return "alb"
    if event.get("version") == "2.0" and isinstance(context.get("http"), dict):
        return "apigw-v2"  # HTTP API payload 2.0 and Lambda Function URLs
    if "httpMethod" in event and "path" in event:
        return "apigw-v1"
    return None


def _headers(event: Mapping[str, Any]) -> tuple[dict[str, str], bool]:
    multi = event.get("multiValueHeaders")
    if isinstance(multi, dict) and multi:
        return {str(k).lower(): ",".join(str(x) for x in v) for k, v in multi.items() if v}, True
    single = event.get("headers") or {}
    return {str(k).lower(): str(v) for k, v in single.items()}, False


def parse(event: dict[str, Any], source: str) -> HttpEvent:
    """Normalise an HTTP event."""
    headers, multi = _headers(event)
    if source == "apigw-v2":
        http = event["requestContext"]["http"]
        method, path = http["method"], event.get("rawPath") or http.get("path", "/")
        if cookies := event.get("cookies"):
            headers["cookie"] = "; ".join(cookies)
    else:
        method, path = event["httpMethod"], event["path"]
    return HttpEvent(
        source, str(method).upper(), str(path), headers, event.get("body"), bool(event.get("isBase64Encoded")), multi
    )


def source_ip(event: Mapping[str, Any]) -> str:
    """The client's address as API Gateway or the Function URL saw it (``requestContext``'s ``sourceIp``); empty for
    ALB, whose events carry it only in X-Forwarded-For, a header a client can write."""
    context = event.get("requestContext") or {}
    found = (context.get("http") or {}).get("sourceIp") or (context.get("identity") or {}).get("sourceIp")
    return str(found or "")


def request_id(ev: HttpEvent) -> str | None:
    """The client's ``X-Request-Id``, if it sent one (the first, when a multi-value event carries several)."""
    value = ev.headers.get("x-request-id", "")
    if ev.multi_value:
        value = value.split(",", 1)[0]
    return value.strip() or None


def body_bytes(ev: HttpEvent, limit: int) -> bytes:
    """The request body, refused (413) before any decoding when it is over ``limit`` bytes."""
    if ev.body is None:
        return b""
    size = len(ev.body) * 3 // 4 if ev.base64 else len(ev.body)
    if size > limit:
        raise PayloadTooLarge(
            f"request body of about {size} bytes exceeds the Lambda limit of {limit} bytes "
            "(6 MB synchronous payload); send large tensors through S3"
        )
    if not ev.base64:
        return ev.body.encode("utf-8")
    try:
        return base64.b64decode(ev.body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"the base64 request body does not decode: {exc}") from None


def respond(ev: HttpEvent, reply: Reply, limit: int) -> dict[str, Any]:
    """Encode a Reply as the response this event source expects (binary bodies base64-encoded)."""
    ctype = reply.headers.get("content-type", "")
    text = ctype.startswith(_TEXT_TYPES)
    body = reply.body.decode("utf-8") if text else base64.b64encode(reply.body).decode("ascii")
    if len(body) > limit:
        msg = f'{{"error": "response of {len(body)} bytes exceeds the Lambda limit of {limit} bytes (6 MB)"}}'
        return respond(ev, Reply(413, msg.encode()), limit)
    out: dict[str, Any] = {"statusCode": reply.status, "body": body, "isBase64Encoded": not text}
    if ev.multi_value:
        out["multiValueHeaders"] = {k: [v] for k, v in reply.headers.items()}
    else:
        out["headers"] = dict(reply.headers)
    if ev.source == "alb":
        out["statusDescription"] = f"{reply.status} {HTTPStatus(reply.status).phrase}"
    return out
