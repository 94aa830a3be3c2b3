"""AWS: a transport that invokes the function with ``lambda.invoke`` (boto3), and SigV4 signing for Function URLs
whose auth type is AWS_IAM (botocore). boto3 and botocore come with ``pip install 'oclaw[lambda]'``."""

from __future__ import annotations

import base64
import json
from collections.abc import Generator
from typing import Any

import httpx

from oclaw_sdk import codec
from oclaw_sdk._core import Call, Reply
from oclaw_sdk.errors import ConnectionFailed, OclawError

_JSON = {"content-type": "application/json"}


def _boto3() -> Any:
    try:
        import boto3
    except ImportError:
        raise ImportError("the Lambda transport and SigV4 signing need boto3: pip install 'oclaw[lambda]'") from None
    return boto3


def _http_event(call: Call) -> dict[str, Any]:
    """A Function URL event (payload format 2.0) for a call that is not an infer request."""
    path, _, query = call.path.partition("?")
    http = {
        "method": call.method,
        "path": path,
        "protocol": "HTTP/1.1",
        "sourceIp": "127.0.0.1",
        "userAgent": "oclaw-sdk",
    }
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": query,
        "headers": {k.lower(): v for k, v in call.headers.items()},
        "requestContext": {"http": http, "routeKey": "$default", "stage": "$default"},
        "body": base64.b64encode(call.body or b"").decode(),
        "isBase64Encoded": True,
    }


class LambdaTransport:
    """Sends each call as one ``lambda.invoke``: infer requests as direct V2 requests (``{"model_name", "inputs"}``,
    JSON tensors), the other endpoints as Function URL events. Pass it as ``Client(..., transport=...)``."""

    def __init__(self, function_name: str, *, qualifier: str | None = None, client: Any = None) -> None:
        self.function_name = function_name
        self.qualifier = qualifier
        self.client = client if client is not None else _boto3().client("lambda")

    def __call__(self, call: Call) -> Reply | OclawError:
        """Invoke the function with the call; its answer as an HTTP reply."""
        direct = call.model is not None and call.method == "POST" and call.body is not None
        if direct:
            assert call.model is not None and call.body is not None
            length = call.headers.get(codec.HEADER_LENGTH)
            event = codec.json_document(call.body, int(length) if length else None)
            name, version = call.model
            event = {"model_name": name, **({"model_version": version} if version else {}), **event}
        else:
            event = _http_event(call)
        args: dict[str, Any] = {"FunctionName": self.function_name, "Payload": json.dumps(event).encode()}
        if self.qualifier:
            args["Qualifier"] = self.qualifier
        try:
            answer = self.client.invoke(**args)
        except Exception as exc:  # noqa: BLE001 - botocore's connection and client errors share no useful root
            return ConnectionFailed(f"lambda.invoke {self.function_name}: {type(exc).__name__}: {exc}")
        payload = answer["Payload"].read()
        if answer.get("FunctionError"):
            message = json.loads(payload or b"{}").get("errorMessage", "the function failed")
            return Reply(502, _JSON, json.dumps({"error": message}).encode())
        doc = json.loads(payload)
        if direct:
            status = int(doc.get("status", 400)) if isinstance(doc, dict) and "error" in doc else 200
            return Reply(status, _JSON, json.dumps({"error": doc["error"]}).encode() if status != 200 else payload)
        body = doc.get("body") or ""
        content = base64.b64decode(body) if doc.get("isBase64Encoded") else body.encode()
        headers = httpx.Headers({str(k): str(v) for k, v in (doc.get("headers") or {}).items()})
        return Reply(int(doc.get("statusCode", 200)), headers, content)


class SigV4(httpx.Auth):
    """Signs each request with AWS Signature Version 4 (botocore's SigV4Auth), as an AWS_IAM Function URL needs.

    Credentials and region come from boto3's default chain unless a ``session`` (boto3.Session) is given. The API
    key then travels as ``X-API-Key`` (``Authorization`` carries the signature).
    """

    requires_request_body = True

    def __init__(self, *, region: str | None = None, service: str = "lambda", session: Any = None) -> None:
        session = session if session is not None else _boto3().Session()
        self.credentials = session.get_credentials()
        self.region = region or session.region_name
        if self.credentials is None or not self.region:
            raise ValueError("SigV4 signing needs AWS credentials and a region (boto3's default chain found none)")
        self.service = service

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Add ``Authorization``, ``X-Amz-Date`` (and ``X-Amz-Security-Token``) signing method, URL, body and the
        content headers."""
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        signed = {k: v for k, v in request.headers.items() if k in ("content-type", codec.HEADER_LENGTH, "x-api-key")}
        aws = AWSRequest(method=request.method, url=str(request.url), data=request.content, headers=signed)
        SigV4Auth(self.credentials.get_frozen_credentials(), self.service, self.region).add_auth(aws)
        for key, value in aws.headers.items():
            request.headers[key] = value
        yield request
