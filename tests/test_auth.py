"""Access control: API keys, roles on every route, model restrictions, the key's tenant metered, rate limits,
secure-by-default start-up and ``oclaw keys create`` (a real server on loopback, and the Lambda handler)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine import auth
from engine.errors import ConfigError
from handler import cli
from handler.local_lambda import LocalLambda
from tests.conftest import ROOT, ServerThread, free_port, spawn_server, start_server

EVENTS = Path(__file__).parent / "events"
INFER_BODY = {
    "inputs": [
        {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": list(range(16))},
        {"name": "INPUT1", "datatype": "FP32", "shape": [1, 16], "data": [1] * 16},
    ]
}
MLP_BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0.0, 1.0, 2.0, 3.0]}]}
#: name -> (role, models, rate, burst) of the keys every test here holds.
KEY_SPECS: dict[str, tuple[str, tuple[str, ...], float, int]] = {
    "reader": ("reader", (), 0.0, 0),
    "invoker": ("invoker", (), 0.0, 0),
    "add_sub_only": ("invoker", ("add_sub",), 0.0, 0),
    "admin": ("admin", (), 0.0, 0),
    "limited": ("reader", (), 0.01, 2),
}


def make_keys(directory: Path) -> tuple[Path, dict[str, str]]:
    """A key file of KEY_SPECS (tenant = the key's name) and the keys themselves."""
    keys, entries = {}, []
    for name, (role, models, rate, burst) in KEY_SPECS.items():
        key, entry = auth.create_key(role, f"tenant-{name}", models=models, name=name, rate=rate, burst=burst)
        keys[name] = key
        entries.append(entry.as_dict())
    path = directory / "keys.json"
    path.write_text(json.dumps(entries))
    return path, keys


def small_repository(repo: Path, target: Path) -> Path:
    """add_sub, mlp and versioned from the generated repository."""
    for name in ("add_sub", "mlp", "versioned"):
        if not (target / name).exists():
            shutil.copytree(repo / name, target / name)
    return target


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def small_repo(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_repository(repo, tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="module")
def metering_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("metering") / "records.jsonl"


@pytest.fixture(scope="module")
def srv(small_repo: Path, keyed: tuple[Path, dict[str, str]], metering_file: Path) -> Iterator[ServerThread]:
    server = start_server(small_repo, api_keys=str(keyed[0]), metering_sinks=(f"jsonl:{metering_file}",))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def keys(keyed: tuple[Path, dict[str, str]]) -> dict[str, str]:
    return keyed[1]


def bearer(key: str | None) -> dict[str, str]:
    return {} if key is None else {"authorization": f"Bearer {key}"}


#: (method, path, JSON body, role needed: None for an open probe); every route of the server.
ROUTES: list[tuple[str, str, Any, str | None]] = [
    ("GET", "/v2/health/live", None, None),
    ("GET", "/v2/health/ready", None, None),
    ("GET", "/v2", None, "reader"),
    ("GET", "/metrics", None, "reader"),
    ("GET", "/v2/models/stats", None, "reader"),
    ("GET", "/v2/models/add_sub", None, "reader"),
    ("GET", "/v2/models/add_sub/ready", None, "reader"),
    ("GET", "/v2/models/add_sub/stats", None, "reader"),
    ("GET", "/v2/models/add_sub/config", None, "reader"),
    ("GET", "/v2/models/versioned/versions/2", None, "reader"),
    ("GET", "/v2/models/versioned/versions/2/ready", None, "reader"),
    ("POST", "/v2/repository/index", {}, "reader"),
    ("POST", "/v2/models/add_sub/infer", INFER_BODY, "invoker"),
    ("POST", "/v2/models/add_sub/versions/1/infer", INFER_BODY, "invoker"),
    ("POST", "/v2/repository/models/mlp/load", {}, "admin"),
    ("POST", "/v2/warm", None, "admin"),
]
RANK = {None: -1, "reader": 0, "invoker": 1, "admin": 2}


@pytest.mark.parametrize("holder", [None, "reader", "invoker", "admin"])
@pytest.mark.parametrize("route", ROUTES, ids=[f"{m} {p}" for m, p, _, _ in ROUTES])
def test_roles_by_route(
    srv: ServerThread, keys: dict[str, str], holder: str | None, route: tuple[str, str, Any, str | None]
) -> None:
    method, path, body, role = route
    response = httpx.request(
        method, srv.url + path, json=body, headers=bearer(keys[holder] if holder else None), timeout=30
    )
    if role is None or (holder is not None and RANK[holder] >= RANK[role]):
        assert response.status_code == 200, response.text
    elif holder is None:
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.json() == {"error": auth.UNAUTHENTICATED}
    else:
        assert response.status_code == 403, response.text
        assert role in response.json()["error"]


def test_x_api_key_header_is_accepted(srv: ServerThread, keys: dict[str, str]) -> None:
    response = httpx.post(f"{srv.url}/v2/models/add_sub/infer", json=INFER_BODY, headers={"x-api-key": keys["invoker"]})
    assert response.status_code == 200


@pytest.mark.parametrize(
    "platform",
    ["Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln", "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261204/us-east-1/lambda"],
    ids=["cloud-run-iam-token", "sigv4"],
)
def test_x_api_key_decides_beside_the_platforms_authorization(
    srv: ServerThread, keys: dict[str, str], platform: str
) -> None:
    """Behind Cloud Run IAM or an IAM Function URL, Authorization holds the platform's credential: X-API-Key is
    the key, and Authorization alone is still no key."""
    url = f"{srv.url}/v2/models/add_sub/infer"
    both = {"authorization": platform, "x-api-key": keys["invoker"]}
    assert httpx.post(url, json=INFER_BODY, headers=both).status_code == 200
    reader = {"authorization": f"Bearer {keys['invoker']}", "x-api-key": keys["reader"]}
    assert httpx.post(url, json=INFER_BODY, headers=reader).status_code == 403
    assert httpx.post(url, json=INFER_BODY, headers={"authorization": platform}).status_code == 401


def test_unknown_malformed_and_wrong_keys_get_the_same_answer(srv: ServerThread, keys: dict[str, str]) -> None:
    admin = keys["admin"]
    wrong_secret = admin[:19] + ("A" if admin[19] != "A" else "B") + admin[20:]
    unknown, _ = auth.create_key("admin", "nobody")
    answers = set()
    for header in ({}, bearer(unknown), bearer(wrong_secret), bearer("not-a-key"), {"authorization": "Basic eDp5"}):
        response = httpx.post(f"{srv.url}/v2/warm", headers=header)
        answers.add((response.status_code, response.content, response.headers["www-authenticate"]))
    assert len(answers) == 1
    assert next(iter(answers))[0] == 401


def test_model_restrictions(srv: ServerThread, keys: dict[str, str]) -> None:
    only = bearer(keys["add_sub_only"])
    assert httpx.post(f"{srv.url}/v2/models/add_sub/infer", json=INFER_BODY, headers=only).status_code == 200
    denied = [
        httpx.post(f"{srv.url}/v2/models/mlp/infer", json=MLP_BODY, headers=only),
        httpx.post(f"{srv.url}/v2/models/mlp/versions/1/infer", json=MLP_BODY, headers=only),
        httpx.post(f"{srv.url}/v2/models/no_such_model/infer", json=MLP_BODY, headers=only),  # not a 404
        httpx.get(f"{srv.url}/v2/models/mlp", headers=only),
    ]
    assert [r.status_code for r in denied] == [403] * 4
    assert len({r.content for r in denied}) == 1  # the same whether the model exists or not
    # a key for every model reaches the model's own errors
    assert (
        httpx.post(
            f"{srv.url}/v2/models/no_such_model/infer", json=MLP_BODY, headers=bearer(keys["invoker"])
        ).status_code
        == 404
    )


def test_the_keys_tenant_is_metered_whatever_the_header_says(
    srv: ServerThread, keys: dict[str, str], metering_file: Path
) -> None:
    headers = {**bearer(keys["add_sub_only"]), "x-tenant-id": "someone-else", "x-request-id": "auth-tenant-1"}
    assert httpx.post(f"{srv.url}/v2/models/add_sub/infer", json=INFER_BODY, headers=headers).status_code == 200
    headers["x-request-id"] = "auth-tenant-2"  # a refused one (another model) is not run, nor metered
    assert httpx.post(f"{srv.url}/v2/models/mlp/infer", json=MLP_BODY, headers=headers).status_code == 403
    srv.runtime.meter.flush()
    records = {r["request_id"]: r for r in map(json.loads, metering_file.read_text().splitlines())}
    assert records["auth-tenant-1"]["tenant"] == "tenant-add_sub_only"
    assert "auth-tenant-2" not in records


def test_rate_limit_per_key(srv: ServerThread, keys: dict[str, str]) -> None:
    statuses = [httpx.get(f"{srv.url}/v2", headers=bearer(keys["limited"])) for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    assert int(statuses[2].headers["retry-after"]) >= 1
    assert "per instance" in statuses[2].json()["error"]
    assert httpx.get(f"{srv.url}/v2", headers=bearer(keys["reader"])).status_code == 200  # other keys unaffected


def test_token_bucket_refills_at_its_rate() -> None:
    key, entry = auth.create_key("reader", "t", rate=2.0, burst=2)
    ring = auth.KeyRing({entry.id: entry})
    need = auth.Need("reader")
    ring.authorize(need, key, now=100.0)
    ring.authorize(need, key, now=100.0)
    with pytest.raises(auth.RateLimited) as exc:
        ring.authorize(need, key, now=100.1)
    assert exc.value.retry_after_s == 1
    ring.authorize(need, key, now=100.6)  # 0.5 s at 2/s: one token back


def test_requirements_table() -> None:
    req = auth.requirement
    assert req("GET", "/v2/health/live") == auth.OPEN
    assert req("HEAD", "/v2/health/ready") == auth.OPEN
    assert req("POST", "/v2/health/live") == auth.UNKNOWN
    assert req("POST", "/v2/models/m/versions/3/infer") == auth.Need("invoker", "m")
    assert req("POST", "/v2/models/m/infer/") == auth.Need("invoker", "m")
    assert req("GET", "/v2/models/stats") == auth.Need("reader")
    assert req("GET", "/v2/models/m/versions/2/config") == auth.Need("reader", "m")
    assert req("POST", "/v2/repository/models/m/unload") == auth.Need("admin", "m")
    for method, path in [("GET", "/V2"), ("POST", "/v2//models/m/infer"), ("GET", "/docs"), ("OPTIONS", "/v2")]:
        assert req(method, path) == auth.UNKNOWN
    assert auth.requirement_of("POST", ["/v2/models/a/infer", "/v2/models/b/infer"]) == auth.UNKNOWN


def test_bad_key_files_are_named() -> None:
    with pytest.raises(ConfigError, match="plain text"):
        auth.parse_entries([{"id": "0" * 12, "sha256": "0" * 64, "role": "admin", "tenant": "t", "key": "x"}], "f")
    with pytest.raises(ConfigError, match="'role'"):
        auth.parse_entries([{"id": "0" * 12, "sha256": "0" * 64, "role": "root", "tenant": "t"}], "f")
    with pytest.raises(ConfigError, match="not JSON"):
        auth.load_keys(str(EVENTS / ".." / "test_auth.py"))
    with pytest.raises(ConfigError, match="OCLAW_AUTH=keys needs OCLAW_API_KEYS"):
        auth.keys_for("", "keys")
    assert auth.keys_for("/no/such/file", "none") is None


def test_keys_create_prints_the_key_once_and_stores_only_its_hash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "keys.json"
    args = ["keys", "create", "--role", "invoker", "--tenant", "acme", "--models", "a,b", "--name", "ci"]
    assert cli.main([*args, "--add", str(store)]) == 0
    out, err = capsys.readouterr()
    key = err.strip().rsplit(" ", 1)[1]
    entry = json.loads(out)
    assert key.startswith("oclaw_") and len(key) == 62
    assert entry == {
        "id": key[6:18],
        "sha256": hashlib.sha256(key.encode()).hexdigest(),
        "role": "invoker",
        "tenant": "acme",
        "models": ["a", "b"],
        "name": "ci",
    }
    stored = store.read_text()
    assert key not in stored and key[19:] not in stored and json.loads(stored) == [entry]
    ring = auth.load_keys(str(store))
    principal = ring.authorize(auth.Need("invoker", "a"), key)
    assert principal is not None and principal.tenant == "acme"
    with pytest.raises(SystemExit):
        cli.main(["keys", "create", "--role", "root", "--tenant", "x"])


def test_serve_off_loopback_without_keys_refuses_to_start(small_repo: Path, tmp_path: Path) -> None:
    port = free_port()
    proc = spawn_server(small_repo, tmp_path, args=["--host", "0.0.0.0", "--port", str(port)], port=port)
    assert proc.proc.wait(timeout=60) == 2
    lines = proc.output().strip().splitlines()
    assert len(lines) == 1 and "refusing to serve on 0.0.0.0 without API keys" in lines[0]
    assert "OCLAW_API_KEYS" in lines[0] and "OCLAW_AUTH=none" in lines[0]


def test_serve_off_loopback_with_a_bad_key_file_refuses_to_start(small_repo: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {"OCLAW_API_KEYS": str(tmp_path / "missing.json")}
    proc = spawn_server(small_repo, tmp_path, args=["--host", "0.0.0.0", "--port", str(port)], env=env, port=port)
    assert proc.proc.wait(timeout=60) == 2
    assert "OCLAW_API_KEYS=" in proc.output() and "missing.json" in proc.output()


def test_serve_off_loopback_with_auth_none_warns(small_repo: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {"OCLAW_AUTH": "none", "OCLAW_LOG_FORMAT": "text"}
    proc = spawn_server(small_repo, tmp_path, args=["--host", "0.0.0.0", "--port", str(port)], env=env, port=port)
    try:
        proc.wait_ready()
        assert httpx.get(f"{proc.url}/v2").status_code == 200  # open, as asked
        assert "WARNING" in proc.output() and "access control is OFF" in proc.output()
    finally:
        assert proc.terminate() == 0


def test_the_fastapi_app_served_alone_checks_keys_too(small_repo: Path, keyed: tuple[Path, dict[str, str]]) -> None:
    server = start_server(small_repo, fastapi_only=True, api_keys=str(keyed[0]))
    keys = keyed[1]
    try:
        assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
        assert httpx.post(f"{server.url}/v2/models/add_sub/infer", json=INFER_BODY).status_code == 401
        assert httpx.post(f"{server.url}/v2/warm", headers=bearer(keys["invoker"])).status_code == 403
        assert httpx.post(f"{server.url}/v2/warm", headers=bearer(keys["admin"])).status_code == 200
        only = bearer(keys["add_sub_only"])
        assert httpx.post(f"{server.url}/v2/models/mlp/infer", json=INFER_BODY, headers=only).status_code == 403
        assert httpx.get(f"{server.url}/openapi.json", headers=bearer(keys["reader"])).status_code == 403
    finally:
        server.stop()


def test_loopback_without_keys_stays_open(small_repo: Path) -> None:
    server = start_server(small_repo)
    try:
        assert httpx.post(f"{server.url}/v2/models/add_sub/infer", json=INFER_BODY).status_code == 200
        assert httpx.post(f"{server.url}/v2/warm").status_code == 200
    finally:
        server.stop()


# -- Lambda -------------------------------------------------------------------------------------------------------


def lambda_event(name: str) -> dict[str, Any]:
    return dict(json.loads((EVENTS / name).read_text()))


@pytest.fixture(scope="module")
def keyed_lambda(
    small_repo: Path, keyed: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalLambda, Path]]:
    where = tmp_path_factory.mktemp("keyed-lambda")
    records = where / "records.jsonl"
    env = {
        "OCLAW_MODEL_REPOSITORY": str(small_repo),
        "OCLAW_API_KEYS": str(keyed[0]),
        "OCLAW_METERING_SINKS": f"jsonl:{records}",
    }
    fn = LocalLambda(env=env, cwd=ROOT, log=where / "lambda.log").start()
    fn.wait_init()
    yield fn, records
    fn.stop()


def with_key(event: dict[str, Any], key: str | None, header: str = "Authorization") -> dict[str, Any]:
    if key is None:
        return event
    value = f"Bearer {key}" if header == "Authorization" else key
    if "multiValueHeaders" in event:
        event["multiValueHeaders"][header] = [value]
    else:
        event.setdefault("headers", {})[header] = value
    return event


@pytest.mark.parametrize(
    "sample", ["apigw_v1_infer.json", "apigw_v2_infer.json", "function_url_infer.json", "alb_infer.json"]
)
def test_lambda_http_events_need_a_key(
    keyed_lambda: tuple[LocalLambda, Path], keys: dict[str, str], sample: str
) -> None:
    fn, _ = keyed_lambda
    results = {
        who: fn.invoke(with_key(lambda_event(sample), keys.get(who) if who else None)).json()
        for who in (None, "reader", "invoker")
    }
    assert results[None]["statusCode"] == 401 and json.loads(results[None]["body"]) == {"error": auth.UNAUTHENTICATED}
    headers = results[None].get("headers") or {k: v[0] for k, v in results[None]["multiValueHeaders"].items()}
    assert headers["www-authenticate"].startswith("Bearer")
    assert results["reader"]["statusCode"] == 403
    assert results["invoker"]["statusCode"] == 200
    via_x_api_key = fn.invoke(with_key(lambda_event(sample), keys["invoker"], "X-API-Key")).json()
    assert via_x_api_key["statusCode"] == 200
    # an IAM Function URL's SigV4 signature in Authorization, the key in X-API-Key (what oclaw_sdk sends)
    signed = with_key(lambda_event(sample), keys["invoker"], "X-API-Key")
    sigv4 = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261204/us-east-1/lambda"
    if "multiValueHeaders" in signed:
        signed["multiValueHeaders"]["Authorization"] = [sigv4]
    else:
        signed["headers"]["Authorization"] = sigv4
    assert fn.invoke(signed).json()["statusCode"] == 200


def test_lambda_health_probe_stays_open(keyed_lambda: tuple[LocalLambda, Path]) -> None:
    fn, _ = keyed_lambda
    assert fn.invoke(lambda_event("alb_multivalue_ready.json")).json()["statusCode"] == 200


def test_lambda_full_app_routes_need_their_role(keyed_lambda: tuple[LocalLambda, Path], keys: dict[str, str]) -> None:
    fn, _ = keyed_lambda

    def load(key: str | None) -> int:
        event = lambda_event("apigw_v2_infer.json")
        event["rawPath"] = event["requestContext"]["http"]["path"] = "/v2/repository/models/mlp/load"
        event["body"] = ""
        return int(fn.invoke(with_key(event, key)).json()["statusCode"])

    def stats(key: str | None) -> int:
        event = lambda_event("apigw_v2_infer.json")
        event["rawPath"] = event["requestContext"]["http"]["path"] = "/v2/models/stats"
        event["requestContext"]["http"]["method"] = "GET"
        event["body"] = None
        return int(fn.invoke(with_key(event, key)).json()["statusCode"])

    assert [load(None), load(keys["invoker"]), load(keys["admin"])] == [401, 403, 200]
    assert [stats(None), stats(keys["reader"])] == [401, 200]


def test_lambda_meters_the_keys_tenant(keyed_lambda: tuple[LocalLambda, Path], keys: dict[str, str]) -> None:
    fn, records = keyed_lambda
    event = with_key(lambda_event("apigw_v2_infer.json"), keys["add_sub_only"])
    event["headers"] |= {"x-tenant-id": "someone-else", "x-request-id": "lambda-auth-tenant"}
    assert fn.invoke(event).json()["statusCode"] == 200
    found = {r["request_id"]: r for r in map(json.loads, records.read_text().splitlines())}
    assert found["lambda-auth-tenant"]["tenant"] == "tenant-add_sub_only"


def test_lambda_non_http_events_are_left_to_iam(keyed_lambda: tuple[LocalLambda, Path]) -> None:
    fn, _ = keyed_lambda
    assert "add_sub/1" in fn.invoke({"oclaw": "warm"}).json()["models_warmed"]


# -- keys in SSM and Secrets Manager (moto's server stands in for AWS) ------------------------------------------------


def entries_json(*entries: auth.KeyEntry) -> str:
    return json.dumps({"keys": [e.as_dict() for e in entries]})


@pytest.mark.parametrize("store", ["ssm", "secretsmanager"])
def test_keys_from_a_parameter_store_are_fetched_again_after_their_ttl(
    moto: str, monkeypatch: pytest.MonkeyPatch, store: str
) -> None:
    from engine import aws
    from tests.conftest import use_moto

    use_moto(moto, monkeypatch)
    first, first_entry = auth.create_key("invoker", "acme")
    second, second_entry = auth.create_key("admin", "acme")
    client = aws.client(store)
    name = f"/oclaw/keys-{first_entry.id}"

    def put(value: str, *, new: bool = False) -> None:
        if store == "ssm":
            client.put_parameter(Name=name, Value=value, Type="SecureString", Overwrite=True)
        elif new:
            client.create_secret(Name=name, SecretString=value)
        else:
            client.put_secret_value(SecretId=name, SecretString=value)

    put(entries_json(first_entry), new=True)
    ring = auth.keys_for(f"{store}:{name}", "auto", ttl_s=60)
    assert ring is not None and ring.authorize(auth.Need("invoker"), first) is not None
    put(entries_json(second_entry))
    ring.refresh(now=time.monotonic() + 30)  # within the TTL: the keys there are
    assert ring.authorize(auth.Need("invoker"), first) is not None
    ring.refresh(now=time.monotonic() + 61)
    assert ring.authorize(auth.Need("admin"), second) is not None
    with pytest.raises(auth.Unauthenticated):
        ring.authorize(auth.Need("invoker"), first)
    # a store that stops answering keeps the last keys
    if store == "ssm":
        client.delete_parameter(Name=name)
    else:
        client.delete_secret(SecretId=name, ForceDeleteWithoutRecovery=True)
    ring.refresh(now=time.monotonic() + 200)
    assert ring.authorize(auth.Need("admin"), second) is not None


def test_a_missing_parameter_is_named_at_start(moto: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import use_moto

    use_moto(moto, monkeypatch)
    with pytest.raises(ConfigError, match="OCLAW_API_KEYS=ssm:/oclaw/none"):
        auth.keys_for("ssm:/oclaw/none", "auto")
