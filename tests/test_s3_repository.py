"""Model repositories in S3 (moto's server over real HTTP with boto3), the local cache, and read-only repositories."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import numpy as np
import pytest
from botocore.exceptions import ClientError

from engine import aws as aws_clients
from engine.config import Settings
from engine.errors import ModelLoadError
from engine.logs import find_event
from engine.repository.local import RepositoryError
from engine.repository.publish import publish
from engine.repository.s3 import INDEX, S3Repository, parse_s3_uri, s3_error
from engine.runtime import Runtime
from engine.tensors import decode_response, encode_request
from handler.local_lambda import LocalLambda
from tests.conftest import AWS_ENV, ROOT, spawn_server, start_server, use_moto

DIRECT_INFER = json.loads((Path(__file__).parent / "events" / "direct_infer.json").read_text())


@pytest.fixture()
def aws(moto: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Fake credentials, boto3 pointed at moto, and a fresh bucket for this test."""
    use_moto(moto, monkeypatch)
    s3 = boto3.client("s3", endpoint_url=moto, region_name="us-east-1")
    bucket = f"models-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    yield {"s3": s3, "bucket": bucket, "url": moto, "env": {**AWS_ENV, "AWS_ENDPOINT_URL": moto}}
    s3.close()
    aws_clients.reset()


def small_repo(repo: Path, dest: Path, *names: str) -> Path:
    """A copy of some models of the generated repository."""
    for name in names:
        shutil.copytree(repo / name, dest / name)
    return dest


def count_calls(operation: str) -> list[str]:
    """Every call of ``operation`` the process-wide S3 client makes from now on (a boto3 event hook)."""
    calls: list[str] = []
    aws_clients.client("s3").meta.events.register(
        f"before-call.s3.{operation}", lambda params, **_: calls.append(params.get("url_path", ""))
    )
    return calls


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under root with its size, mtime and inode."""
    return {
        p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def oclaw(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("OCLAW_")}
    return subprocess.run(
        [sys.executable, "-m", "handler.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**full_env, **env},
    )


def infer_add_sub(url: str) -> None:
    body, length = encode_request({"INPUT0": np.ones((1, 16), np.float32), "INPUT1": np.ones((1, 16), np.float32)})
    resp = httpx.post(
        f"{url}/v2/models/add_sub/infer", content=body, headers={"Inference-Header-Content-Length": str(length)}
    )
    assert resp.status_code == 200, resp.text
    header = resp.headers.get("inference-header-content-length")
    out = decode_response(resp.content, int(header) if header else None)
    np.testing.assert_array_equal(out["OUTPUT0"], np.full((1, 16), 2.0, np.float32))


# -- URIs and errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "bucket", "prefix"),
    [("s3://models", "models", ""), ("s3://models/", "models", ""), ("s3://m.x-1/a/b/", "m.x-1", "a/b/")],
)
def test_s3_uris_parse(uri: str, bucket: str, prefix: str) -> None:
    loc = parse_s3_uri(uri)
    assert (loc.bucket, loc.prefix) == (bucket, prefix)
    assert loc.uri("m", "1") == f"s3://{bucket}/{prefix}m/1"


@pytest.mark.parametrize("uri", ["s3://", "s3:/models/x", "s3://Models_X/p", "s3://ab/p", "s3://models/a/../b"])
def test_bad_uris_are_a_clear_error_before_any_request(uri: str, tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="invalid S3 URI"):
        Runtime(Settings.from_env({}, model_repository=uri, model_cache=str(tmp_path)))


def test_bad_uri_on_the_command_line_exits_2_with_the_reason(tmp_path: Path) -> None:
    out = oclaw("serve", "--model-repository", "s3://Bad_Bucket/models", env={})
    assert out.returncode == 2 and "invalid S3 URI 's3://Bad_Bucket/models'" in out.stderr
    out = oclaw("publish", str(tmp_path), "s3:/nope", env={})
    assert out.returncode == 2 and "invalid S3 URI" in out.stderr


def test_access_denied_and_other_client_errors_are_named() -> None:
    def client_error(code: str, status: int) -> ClientError:
        return ClientError(
            {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "op"
        )

    denied = s3_error(client_error("AccessDenied", 403), "listing s3://b/p/")
    assert isinstance(denied, RepositoryError) and "access denied" in denied.message
    assert "s3:ListBucket" in denied.message and "s3:GetObject" in denied.message
    assert isinstance(s3_error(client_error("PreconditionFailed", 412), "fetching x"), ModelLoadError)
    assert "SlowDown" in s3_error(client_error("SlowDown", 503), "fetching x").message


def test_missing_bucket_is_a_repository_error(aws: dict[str, Any], repo: Path, tmp_path: Path) -> None:
    runtime = Runtime(Settings.from_env({}, model_repository="s3://no-such-bucket-oclaw/m", model_cache=str(tmp_path)))
    with pytest.raises(RepositoryError, match=r"listing s3://no-such-bucket-oclaw/m/: the bucket does not exist"):
        runtime.preload()
    runtime.start_preload()
    with pytest.raises(RepositoryError, match="does not exist"):
        runtime.wait_preloaded()  # the server's lifespan: start-up fails with the reason
    out = oclaw("publish", str(tmp_path), "s3://no-such-bucket-oclaw/m", env=aws["env"])
    assert out.returncode == 2 and "no models in" in out.stderr  # validated before any request
    with pytest.raises(RepositoryError, match=r"checking bucket s3://no-such-bucket-oclaw: the bucket does not exist"):
        publish(small_repo(repo, tmp_path / "src", "mlp"), "s3://no-such-bucket-oclaw/m")


def test_missing_bucket_fails_lambda_init_and_server_start(aws: dict[str, Any], tmp_path: Path) -> None:
    env = {**aws["env"], "OCLAW_MODEL_REPOSITORY": "s3://no-such-bucket-oclaw/m", "OCLAW_MODEL_CACHE": str(tmp_path)}
    fn = LocalLambda(env=env, cwd=ROOT, log=tmp_path / "lambda.log").start()
    try:
        with pytest.raises(RuntimeError, match="RepositoryError") as failed:
            fn.wait_init()
        assert "the bucket does not exist" in str(failed.value)
    finally:
        fn.stop()
    srv = spawn_server(None, tmp_path, env=env)
    assert srv.proc.wait(timeout=60) == 3
    assert "the bucket does not exist" in srv.output()


# -- publish, fetch, serve --------------------------------------------------------------------------


def test_publish_then_serve_from_s3(aws: dict[str, Any], repo: Path, tmp_path: Path) -> None:
    uri = f"s3://{aws['bucket']}/prod/models"
    out = oclaw("publish", str(repo), uri, "--model", "add_sub", "--model", "versioned", env=aws["env"])
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    files, summary = rows[:-1], rows[-1]
    assert {r["uri"] for r in files} == {
        f"{uri}/add_sub/1/model.onnx",
        f"{uri}/versioned/1/model.onnx",
        f"{uri}/versioned/2/model.onnx",
        f"{uri}/versioned/oclaw.json",
    }
    assert files[-1]["uri"].endswith("oclaw.json")  # manifests after the files they describe
    assert all(r["bytes"] == (repo / r["uri"][len(uri) + 1 :]).stat().st_size for r in files)
    assert summary["published"] == ["add_sub", "versioned"] and summary["files"] == 4
    assert summary["bytes"] == sum(r["bytes"] for r in files)

    cache = tmp_path / "cache"
    srv = start_server(uri, model_cache=str(cache))  # type: ignore[arg-type]
    try:
        assert httpx.get(f"{srv.url}/v2/health/ready").status_code == 200
        infer_add_sub(srv.url)
        assert srv.runtime.pool.versions("versioned") == [1, 2]  # its manifest says "all"
        fetch = srv.runtime.fetch
        assert fetch.files == 4 and fetch.cached == 0 and fetch.ms > 0
        assert fetch.bytes == summary["bytes"]
        assert all(m.fetch_ms > 0 for m in srv.runtime.pool.loaded())
    finally:
        srv.stop()
    local = cache / aws["bucket"] / "prod" / "models"
    assert not list(local.rglob("*.part"))

    # `oclaw serve` reports the fetch in its cold_start record (here from the cache: nothing downloaded)
    env = {**aws["env"], "OCLAW_MODEL_REPOSITORY": uri, "OCLAW_MODEL_CACHE": str(cache)}
    proc = spawn_server(None, tmp_path, env=env)
    try:
        proc.wait_ready()
        infer_add_sub(proc.url)
    finally:
        assert proc.terminate() == 0
    record = find_event(proc.output(), "cold_start")
    assert record is not None and record["ready"] is True
    assert 0 < record["fetch_ms"] <= record["preload_ms"]
    assert record["fetch"] == {"source": uri, "ms": record["fetch_ms"], "files": 0, "cached": 4, "bytes": 0}
    assert (local / "add_sub" / "1" / "model.onnx").read_bytes() == (repo / "add_sub" / "1" / "model.onnx").read_bytes()


def test_only_the_versions_the_manifest_asks_for_are_fetched(aws: dict[str, Any], repo: Path, tmp_path: Path) -> None:
    src = small_repo(repo, tmp_path / "src", "versioned")
    (src / "versioned" / "oclaw.json").write_text('{"versions": "latest"}')
    publish(src, f"s3://{aws['bucket']}")
    runtime = Runtime(Settings.from_env({}, model_repository=f"s3://{aws['bucket']}", model_cache=str(tmp_path / "c")))
    runtime.preload()
    assert runtime.fetch.files == 2  # oclaw.json and 2/model.onnx, not version 1
    assert runtime.pool.versions("versioned") == [2]
    assert not (tmp_path / "c" / aws["bucket"] / "versioned" / "1").exists()
    runtime.close()


def test_second_start_uses_the_cache(aws: dict[str, Any], repo: Path, tmp_path: Path) -> None:
    uri = f"s3://{aws['bucket']}/m"
    publish(small_repo(repo, tmp_path / "src", "add_sub", "mlp", "versioned", "tiny_classifier"), uri)
    settings = Settings.from_env({}, model_repository=uri, model_cache=str(tmp_path / "cache"))
    first = Runtime(settings)
    gets = count_calls("GetObject")
    first.preload()
    assert len(gets) == 7 and first.fetch.files == 7 and first.fetch.cached == 0  # 5 model files, 2 manifests
    local = tmp_path / "cache" / aws["bucket"] / "m"
    before = tree(local)
    first.close()

    gets.clear()
    second = Runtime(settings)
    second.preload()
    assert gets == []  # same ETags and sizes: nothing downloaded
    assert second.fetch.files == 0 and second.fetch.cached == 7
    assert tree(local) == before  # not even rewritten
    assert second.pool.ready() and set(second.pool.states()) == {"add_sub", "mlp", "versioned", "tiny_classifier"}
    second.close()

    # a new or changed object is fetched, alone; a version deleted from the bucket leaves the cache
    manifest = b'{"versions": "all", "max_batch_size": 8}'
    aws["s3"].put_object(Bucket=aws["bucket"], Key="m/versioned/oclaw.json", Body=manifest)
    aws["s3"].delete_object(Bucket=aws["bucket"], Key="m/versioned/2/model.onnx")
    third = Runtime(settings)
    third.preload()
    assert [g.rsplit("/", 2)[-2:] for g in gets] == [["versioned", "oclaw.json"]]
    assert third.fetch.files == 1 and third.fetch.cached == 5
    assert third.pool.get("versioned").manifest.max_batch_size == 8
    assert third.pool.versions("versioned") == [1] and not (local / "versioned" / "2").exists()
    etag = aws["s3"].head_object(Bucket=aws["bucket"], Key="m/versioned/oclaw.json")["ETag"]
    assert json.loads((local / "versioned" / INDEX).read_text())["oclaw.json"] == etag
    third.close()


def test_an_interrupted_download_never_leaves_a_file_that_loads(
    aws: dict[str, Any], repo: Path, tmp_path: Path
) -> None:
    uri = f"s3://{aws['bucket']}"
    publish(small_repo(repo, tmp_path / "src", "mlp"), uri)
    cache = tmp_path / "cache"
    model_dir = cache / aws["bucket"] / "mlp" / "1"
    model_dir.mkdir(parents=True)
    # what a crash mid-download leaves: a partial temporary file, and a truncated file without an index entry
    (model_dir / ".model.onnx.dead.part").write_bytes(b"partial")
    os.utime(model_dir / ".model.onnx.dead.part", (0, 0))
    (model_dir / "model.onnx").write_bytes((repo / "mlp" / "1" / "model.onnx").read_bytes()[:100])
    runtime = Runtime(Settings.from_env({}, model_repository=uri, model_cache=str(cache)))
    runtime.preload()
    assert runtime.fetch.files == 1 and runtime.pool.ready()
    assert sorted(p.name for p in model_dir.iterdir()) == ["model.onnx"]
    runtime.close()


def test_corrupted_download_is_rejected_by_the_manifest_checksum(
    aws: dict[str, Any], repo: Path, tmp_path: Path
) -> None:
    src = small_repo(repo, tmp_path / "src", "mlp", "add_sub")
    digest = hashlib.sha256((src / "mlp" / "1" / "model.onnx").read_bytes()).hexdigest()
    (src / "mlp" / "oclaw.json").write_text(json.dumps({"checksums": {"1": digest}}))
    uri = f"s3://{aws['bucket']}/m"
    publish(src, uri)
    # the object in the bucket gets corrupted (same size, one byte flipped)
    data = bytearray((src / "mlp" / "1" / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    aws["s3"].put_object(Bucket=aws["bucket"], Key="m/mlp/1/model.onnx", Body=bytes(data))

    cache = tmp_path / "cache"
    runtime = Runtime(Settings.from_env({}, model_repository=uri, model_cache=str(cache)))
    runtime.preload()
    states = runtime.pool.states()
    assert states["add_sub"]["state"] == "READY"  # one bad model does not fail the others
    assert states["mlp"]["state"] == "UNAVAILABLE"
    assert f"does not match the manifest's {digest}" in states["mlp"]["reason"]
    assert "discarded" in states["mlp"]["reason"]
    assert not runtime.pool.ready()
    assert not (cache / aws["bucket"] / "m" / "mlp" / "1" / "model.onnx").exists()
    assert not list(cache.rglob("*.part"))
    runtime.close()

    # publishing refuses a repository whose files do not match their manifest
    (src / "mlp" / "1" / "model.onnx").write_bytes(bytes(data))
    out = oclaw("publish", str(src), uri, env=aws["env"])
    assert out.returncode == 2 and "does not match the manifest's" in out.stderr


def test_a_model_missing_from_the_bucket_is_not_ready_with_its_reason(
    aws: dict[str, Any], repo: Path, tmp_path: Path
) -> None:
    uri = f"s3://{aws['bucket']}/m"
    publish(small_repo(repo, tmp_path / "src", "add_sub"), uri)
    settings = Settings.from_env({}, model_repository=uri, model_cache=str(tmp_path), preload=("add_sub", "ghost"))
    runtime = Runtime(settings)
    runtime.preload()
    states = runtime.pool.states()
    assert states["add_sub"]["state"] == "READY" and states["ghost"]["state"] == "UNAVAILABLE"
    assert f"no <version>/model.onnx under {uri}/ghost/" in states["ghost"]["reason"]
    assert not runtime.pool.ready()
    # a model published later loads through the repository API (fetched on demand)
    publish(small_repo(repo, tmp_path / "later", "mlp"), uri)
    assert runtime.pool.load("mlp").state.value == "READY"
    runtime.close()


# -- Lambda ------------------------------------------------------------------------------------------


def test_lambda_init_fetches_from_s3_then_a_second_instance_uses_the_cache(
    aws: dict[str, Any], repo: Path, tmp_path: Path
) -> None:
    uri = f"s3://{aws['bucket']}/lambda"
    publish(small_repo(repo, tmp_path / "src", "add_sub", "mlp"), uri)
    env = {**aws["env"], "OCLAW_MODEL_REPOSITORY": uri, "OCLAW_MODEL_CACHE": str(tmp_path / "tmp")}
    records = []
    for run in range(2):
        log = tmp_path / f"lambda-{run}.log"
        with LocalLambda(env=env, cwd=ROOT, log=log) as fn:
            fn.wait_init()
            result = fn.invoke(DIRECT_INFER)
            assert result.error is None, result.error
            assert result.json()["outputs"][0]["data"][:3] == [2.0, 3.0, 4.0]
        record = find_event(log.read_text(), "cold_start")
        assert record is not None, log.read_text()
        records.append(record)
    cold, cached = records
    assert cold["fetch_ms"] > 0 and cold["phases_ms"]["repository"] == cold["fetch_ms"]
    assert cold["fetch"]["source"] == uri and cold["fetch"]["files"] == 2 and cold["fetch"]["cached"] == 0
    assert cached["fetch"]["files"] == 0 and cached["fetch"]["cached"] == 2


def test_engine_s3_module_imports_no_aws_sdk() -> None:
    code = "import sys, engine.repository.s3, engine.runtime; "
    code += "print([m for m in ('boto3', 'botocore') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# -- read-only repositories (a models layer under /opt) ----------------------------------------------


@pytest.fixture()
def read_only_repo(repo: Path, tmp_path: Path) -> Iterator[Path]:
    root = small_repo(repo, tmp_path / "opt" / "models", "add_sub", "mlp", "tiny_classifier")
    paths = [root, *root.rglob("*")]
    for p in paths:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    yield root
    for p in paths:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_a_read_only_repository_serves_and_nothing_is_written_next_to_the_models(
    read_only_repo: Path, tmp_path: Path
) -> None:
    before = tree(read_only_repo)
    srv = spawn_server(read_only_repo, tmp_path, env={"OCLAW_METERING_SPOOL": str(tmp_path / "spool.jsonl")})
    try:
        srv.wait_ready()
        assert httpx.get(f"{srv.url}/v2/health/ready").status_code == 200
        infer_add_sub(srv.url)
    finally:
        assert srv.terminate() == 0
    assert "model add_sub/1 sha256 " in srv.output()  # every file hashed after start-up: read only
    record = find_event(srv.output(), "cold_start")
    assert record is not None and record["fetch_ms"] == 0.0 and "fetch" not in record
    assert tree(read_only_repo) == before
    assert sorted(p.name for p in read_only_repo.parent.iterdir()) == ["models"]


def test_prepare_refuses_a_read_only_repository(read_only_repo: Path) -> None:
    before = tree(read_only_repo)
    args = ("prepare", "--model-repository", str(read_only_repo))
    if os.geteuid() == 0:  # root writes through file modes: make it a read-only mount, as /opt is on Lambda
        target = shlex.quote(str(read_only_repo))
        command = shlex.join([sys.executable, "-m", "handler.cli", *args])
        script = f"mount --bind {target} {target} && mount -o remount,bind,ro {target} && exec {command}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("OCLAW_")}
        out = subprocess.run(
            ["unshare", "-m", "sh", "-c", script],
            check=False,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=120,
        )
    else:
        out = oclaw(*args, env={})
    assert out.returncode == 2 and "is read-only" in out.stderr, out.stderr
    assert tree(read_only_repo) == before


def test_s3_repository_lists_cached_models_before_any_fetch(tmp_path: Path) -> None:
    repo = S3Repository("s3://models/p", cache=tmp_path)
    assert repo.root == tmp_path / "models" / "p" and repo.models() == [] and repo.remote
    assert "s3://models/p" in repr(repo)
