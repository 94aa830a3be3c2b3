"""Attacks on access control: path spellings, methods, forwarded headers, odd or repeated credentials, keys for
another model or role; through the server (raw HTTP/1.1 bytes) and the Lambda HTTP event shapes. None gets in:
each answer is a 401 or a 403 (or the HTTP parser's own 400 for bytes it will not read), and nothing changes."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import socket
from pathlib import Path
from typing import Any

from handler.local_lambda import LocalLambda
from tests.conftest import ServerThread
from tests.test_auth import (  # noqa: F401 - fixtures
    EVENTS,
    INFER_BODY,
    keyed,
    keyed_lambda,
    keys,
    metering_file,
    small_repo,
    srv,
)

DENIED = frozenset({401, 403})

#: Paths that name model ``mlp`` (or no route) to a key allowed only ``add_sub``.
MODEL_ESCAPES = [
    "/v2/models/mlp/infer",
    "//v2/models/mlp/infer",
    "/v2//models/mlp/infer",
    "/v2/models//mlp/infer",
    "/v2/models/mlp//infer",
    "/v2/models/mlp/infer/",
    "/v2/models/mlp/infer//",
    "/V2/models/mlp/infer",
    "/v2/MODELS/mlp/infer",
    "/v2/models/MLP/infer",
    "/v2/models/mlp/versions/1/infer",
    "/v2/models/mlp/versions/1/infer/",
    "/v2/models/mlp/versions//infer",
    "/v2/models/add_sub/../mlp/infer",
    "/v2/models/./mlp/infer",
    "/v2/models/add_sub%2F..%2Fmlp/infer",
    "/v2/models/add_sub%2f..%2fmlp/infer",
    "/v2/models/%6Dlp/infer",
    "/v2/models/mlp%2Finfer",
    "/%76%32/models/mlp/infer",
    "/v2/models/mlp/infer%2F",
    "/v2/models/mlp/infer;add_sub",
    "/v2/models/mlp/infer?model_name=add_sub",
    "/v2/models/add_sub/versions/1%2F..%2F..%2Fmlp/infer",
    "/v2/models/add_sub/versions/..%2F..%2Fmlp/infer",
    "/v2/models/mlp%00/infer",
    "/v2/models/mlp%20/infer",
    "/v2/models/add_sub%00/../mlp/infer",
    "/v2/models/mlp",
    "/v2/models/mlp/config",
    "/v2/models/mlp/versions/1/stats",
]
#: Paths that reach (or may be taken for) an admin route, tried with an invoker's key.
ADMIN_ESCAPES = [
    "/v2/repository/models/mlp/unload",
    "//v2/repository/models/mlp/unload",
    "/v2/repository/models/mlp/unload/",
    "/V2/repository/models/mlp/unload",
    "/v2/repository/models/mlp/UNLOAD",
    "/v2/repository//models/mlp/unload",
    "/v2/repository/models/mlp%2Funload",
    "/v2/models/../repository/models/mlp/unload",
    "/v2/health/live/../../repository/models/mlp/unload",
    "/v2/health/live%2F..%2F..%2Frepository%2Fmodels%2Fmlp%2Funload",
    "/v2/models/mlp/infer/../../../repository/models/mlp/unload",
    "/v2/warm",
    "/v2/warm/",
    "//v2/warm",
    "/v2/warm?oclaw=warm",
    "/v2/%77arm",
]
#: Requests without a key on routes that need one (open routes' neighbours, other methods, framework routes).
NO_KEY_TARGETS = [
    ("GET", "/v2"),
    ("HEAD", "/v2"),
    ("GET", "/v2/"),
    ("GET", "/v2/models/add_sub"),
    ("HEAD", "/v2/models/add_sub"),
    ("GET", "/v2/models/stats"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("OPTIONS", "/v2/models/add_sub/infer"),
    ("OPTIONS", "*"),
    ("TRACE", "/v2"),
    ("GET", "/v2/models/add_sub/infer"),
    ("POST", "/v2/repository/index"),
    ("GET", "/v2/health/live/../../v2/models/add_sub"),
    ("GET", "/v2/health/live%2F..%2F..%2Fv2"),
    ("GET", "/v2/health/ready/..%2F..%2F..%2Fv2/models/add_sub"),
    ("POST", "/v2/health/live"),
    ("POST", "/v2/health/../models/add_sub/infer"),
    ("GET", "/v2/health/live;/v2/models/add_sub"),
    ("GET", "http://127.0.0.1/v2/models/add_sub"),
]
#: Headers a proxy might trust, sent with no key.
FORWARDED = [
    ("X-Forwarded-For", "127.0.0.1"),
    ("X-Real-IP", "127.0.0.1"),
    ("X-Forwarded-Host", "localhost"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Prefix", "/v2/health/live"),
    ("Forwarded", "for=127.0.0.1;host=localhost;proto=https"),
    ("X-Original-URL", "/v2/health/live"),
    ("X-Rewrite-URL", "/v2/health/live"),
    ("X-HTTP-Method-Override", "GET"),
    ("X-Original-Method", "GET"),
    ("X-Tenant-Id", "tenant-admin"),
    ("X-Amz-Tenant-Id", "tenant-admin"),
]


def credential_tricks(held: dict[str, str]) -> list[tuple[str, list[tuple[str, str]]]]:
    """Credentials that are not a valid invoker's key, for an infer request: (label, headers)."""
    inv, reader, admin = held["invoker"], held["reader"], held["admin"]
    digest = hashlib.sha256(inv.encode()).hexdigest()
    return [
        ("bearer-empty", [("Authorization", "Bearer")]),
        ("bearer-spaces", [("Authorization", "Bearer   ")]),
        ("basic", [("Authorization", "Basic " + base64.b64encode(f"{inv}:".encode()).decode())]),
        ("token-scheme", [("Authorization", f"Token {inv}")]),
        ("no-scheme", [("Authorization", inv)]),
        ("suffix", [("Authorization", f"Bearer {inv}x")]),
        ("truncated", [("Authorization", f"Bearer {inv[:-1]}")]),
        ("upper", [("Authorization", f"Bearer {inv.upper()}")]),
        ("stored-hash", [("Authorization", f"Bearer {digest}")]),
        ("stored-hash-x-api-key", [("X-API-Key", digest)]),
        ("id-only", [("Authorization", f"Bearer {inv[:18]}")]),
        ("id-of-admin-secret-of-reader", [("Authorization", f"Bearer {admin[:19]}{reader[19:]}")]),
        ("oversized", [("Authorization", "Bearer " + "a" * 8000)]),
        ("oversized-valid-prefix", [("Authorization", f"Bearer {inv}" + "a" * 8000)]),
        ("two-authorizations", [("Authorization", f"Bearer {reader}"), ("Authorization", f"Bearer {inv}")]),
        # X-API-Key decides (Authorization is the platform's then): an invoker's bearer key does not lift a reader's
        ("x-api-key-decides", [("Authorization", f"Bearer {inv}"), ("X-API-Key", reader)]),
        ("x-api-key-empty-beside-bearer", [("Authorization", f"Bearer {inv}"), ("X-API-Key", "")]),
        ("sigv4-without-key", [("Authorization", "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261204/us-east-1/lambda")]),
        ("comma-joined", [("Authorization", f"Bearer {reader}, Bearer {inv}")]),
        ("two-x-api-keys", [("X-API-Key", reader), ("X-API-Key", inv)]),
        ("reader-key", [("Authorization", f"Bearer {reader}")]),
        ("reader-key-repeated", [("Authorization", f"Bearer {reader}"), ("Authorization", f"Bearer {reader}")]),
        ("reader-key-x-api-key", [("X-API-Key", reader)]),
        ("reader-key-forwarded", [("Authorization", f"Bearer {reader}"), ("X-Forwarded-For", "127.0.0.1")]),
        ("tab-separated", [("Authorization", f"Bearer\t{inv}x")]),
        ("empty-x-api-key", [("X-API-Key", "")]),
    ]


def raw(port: int, method: str, target: str, headers: list[tuple[str, str]], body: bytes = b"") -> int:
    """Send one request as raw HTTP/1.1 bytes (no client normalises its path or headers); its status."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body:
        lines.append("Content-Type: application/json")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def bearer(key: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {key}")]


def server_cases(held: dict[str, str]) -> list[tuple[str, str, str, list[tuple[str, str]]]]:
    """Every attack on the server: (label, method, target, headers)."""
    only, inv, reader = held["add_sub_only"], held["invoker"], held["reader"]
    cases = []
    for path in MODEL_ESCAPES:
        method = "POST" if "infer" in path else "GET"
        cases.append((f"model-escape {method} {path}", method, path, bearer(only)))
    cases.append(("model-escape HEAD /v2/models/mlp", "HEAD", "/v2/models/mlp", bearer(only)))
    cases.append(("model-escape absolute-form", "POST", "http://127.0.0.1/v2/models/mlp/infer", bearer(only)))
    rewrites = [("X-Original-URL", "/v2/models/add_sub/infer"), ("X-Rewrite-URL", "/v2/models/add_sub/infer")]
    cases += [(f"model-escape {h}", "POST", "/v2/models/mlp/infer", [*bearer(only), (h, v)]) for h, v in rewrites]
    for path in ADMIN_ESCAPES:
        cases.append((f"admin-escape POST {path}", "POST", path, bearer(inv)))
    for method in ("PUT", "DELETE", "PATCH", "GET", "CONNECT"):
        cases.append((f"admin-escape {method}", method, "/v2/repository/models/mlp/unload", bearer(inv)))
    for name, value in FORWARDED:
        cases.append(
            (f"admin-escape {name}", "POST", "/v2/repository/models/mlp/unload", [*bearer(inv), (name, value)])
        )
        cases.append((f"no-key {name}", "GET", "/v2/models/add_sub", [(name, value)]))
        cases.append((f"reader-infer {name}", "POST", "/v2/models/add_sub/infer", [*bearer(reader), (name, value)]))
    for method, target in NO_KEY_TARGETS:
        cases.append((f"no-key {method} {target}", method, target, []))
    for label, headers in credential_tricks(held):
        cases.append((f"credential {label}", "POST", "/v2/models/add_sub/infer", headers))
    return cases


def test_no_way_into_the_server(srv: ServerThread, keys: dict[str, str]) -> None:  # noqa: F811
    body = json.dumps(INFER_BODY).encode()
    cases = server_cases(keys)
    let_in = []
    for label, method, target, headers in cases:
        status = raw(srv.port, method, target, headers, body if method.upper() == "POST" else b"")
        if status not in DENIED:
            let_in.append(f"{label}: {status}")
    assert let_in == []
    assert len(cases) >= 120
    states = srv.runtime.pool.states()
    assert states["mlp"]["state"] == "READY" and states["add_sub"]["state"] == "READY"  # nothing unloaded
    # and the keys that are right do get in, through the same raw client
    assert raw(srv.port, "POST", "/v2/models/add_sub/infer", bearer(keys["add_sub_only"]), body) == 200


def test_requests_the_parser_refuses(srv: ServerThread, keys: dict[str, str]) -> None:  # noqa: F811
    """An oversized header and a lower-case method never reach the app: the HTTP parser answers 400 (or 431)."""
    unload = "/v2/repository/models/mlp/unload"
    assert raw(srv.port, "POST", unload, bearer(keys["invoker"] + "a" * 200_000)) in {400, 401, 431}
    assert raw(srv.port, "post", unload, bearer(keys["invoker"])) == 400
    assert srv.runtime.pool.states()["mlp"]["state"] == "READY"


# -- Lambda HTTP events ----------------------------------------------------------------------------------------

SHAPES = ["apigw_v1_infer.json", "apigw_v2_infer.json", "function_url_infer.json", "alb_infer.json", "alb_multi"]


def make_event(shape: str, method: str, path: str, headers: list[tuple[str, str]], http_path: str | None = None) -> Any:
    """An HTTP event of ``shape`` (a recorded sample) for ``method path`` with ``headers`` (repeats kept where the
    shape can carry them: multi-value ALB events; elsewhere joined with a comma, as API Gateway does)."""
    multi = shape == "alb_multi"
    event: dict[str, Any] = json.loads((EVENTS / ("alb_infer.json" if multi else shape)).read_text())
    event = copy.deepcopy(event)
    if shape.startswith(("apigw_v2", "function_url")):
        event["rawPath"] = path
        event["requestContext"]["http"]["path"] = http_path if http_path is not None else path
        event["requestContext"]["http"]["method"] = method
    else:
        event["path"], event["httpMethod"] = path, method
    if multi:
        single = event.pop("headers", {}) or {}
        values: dict[str, list[str]] = {k: [v] for k, v in single.items()}
        for name, value in headers:
            values.setdefault(name, []).append(value)
        event["multiValueHeaders"] = values
    else:
        joined: dict[str, str] = dict(event.get("headers") or {})
        for name, value in headers:
            joined[name] = f"{joined[name]},{value}" if name in joined else value
        event["headers"] = joined
        if "multiValueHeaders" in event:
            event["multiValueHeaders"] = {k: [v] for k, v in joined.items()}
    if method.upper() != "POST":
        event["body"] = None if shape.startswith(("apigw_v2", "function_url")) else ""
    return event


def lambda_cases(held: dict[str, str]) -> list[tuple[str, Any]]:
    """Every attack through Lambda: (label, event)."""
    only, inv, reader = held["add_sub_only"], held["invoker"], held["reader"]
    cases: list[tuple[str, Any]] = []
    for shape in SHAPES:
        for path in MODEL_ESCAPES:
            method = "POST" if "infer" in path else "GET"
            cases.append((f"{shape} model-escape {path}", make_event(shape, method, path, bearer(only))))
        for path in ADMIN_ESCAPES:
            cases.append((f"{shape} admin-escape {path}", make_event(shape, "POST", path, bearer(inv))))
        for method in ("PUT", "GET", "post", "HEAD", "OPTIONS"):
            event = make_event(shape, method, "/v2/repository/models/mlp/unload", bearer(inv))
            cases.append((f"{shape} admin-escape {method}", event))
        for method, target in NO_KEY_TARGETS:
            if target.startswith("/"):
                cases.append((f"{shape} no-key {method} {target}", make_event(shape, method, target, [])))
        for name, value in FORWARDED:
            cases.append((f"{shape} no-key {name}", make_event(shape, "GET", "/v2/models/add_sub", [(name, value)])))
        for label, headers in credential_tricks(held):
            cases.append(
                (f"{shape} credential {label}", make_event(shape, "POST", "/v2/models/add_sub/infer", headers))
            )
        escalate = [("Authorization", f"Bearer {reader}"), ("Authorization", f"Bearer {held['admin']}")]
        cases.append((f"{shape} reader+admin", make_event(shape, "POST", "/v2/warm", escalate)))
    # an HTTP API event whose raw path and decoded path name different routes (Mangum routes on the latter)
    for raw_path, http_path in [
        ("/v2/models/add_sub/infer", "/v2/models/mlp/infer"),
        ("/v2/models/add_sub/infer", "/v2/repository/models/mlp/unload"),
        ("/v2/models/add_sub%2F..%2Fmlp/infer", "/v2/models/add_sub/../mlp/infer"),
        ("/v2/health/live", "/v2/repository/models/mlp/unload"),
    ]:
        event = make_event("apigw_v2_infer.json", "POST", raw_path, bearer(only), http_path=http_path)
        cases.append((f"path-mismatch {raw_path} {http_path}", event))
    # an authorizer's principal in the request context does not stand in for a key
    event = make_event("apigw_v2_infer.json", "POST", "/v2/models/add_sub/infer", [])
    event["requestContext"]["authorizer"] = {"lambda": {"tenant": "acme"}, "principalId": "admin"}
    cases.append(("authorizer-context", event))
    # single-value headers under two spellings of the name: whichever is read, neither is a valid invoker key
    event = make_event("apigw_v1_infer.json", "POST", "/v2/models/add_sub/infer", [])
    event["headers"] |= {"Authorization": f"Bearer {reader}", "authorization": f"Bearer {reader}x"}
    event.pop("multiValueHeaders", None)
    cases.append(("header-name-case", event))
    return cases


def test_no_way_in_through_lambda_http_events(
    keyed_lambda: tuple[LocalLambda, Path],  # noqa: F811
    keys: dict[str, str],  # noqa: F811
) -> None:
    fn, _ = keyed_lambda
    cases = lambda_cases(keys)
    let_in = []
    for label, event in cases:
        result = fn.invoke(event)
        status = result.json().get("statusCode") if result.error is None else result.error.get("errorType")
        if status not in DENIED:
            let_in.append(f"{label}: {status}")
    assert let_in == []
    assert len(cases) >= 400
    warm = fn.invoke({"oclaw": "warm"}).json()
    assert "mlp/1" in warm["models_warmed"]  # nothing unloaded
    ok = make_event("alb_multi", "POST", "/v2/models/add_sub/infer", bearer(keys["add_sub_only"]))
    assert fn.invoke(ok).json()["statusCode"] == 200
