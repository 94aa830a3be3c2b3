"""``.oclaw`` packs: written by ``oclaw pack``, served like a directory (local, read-only, S3, Lambda), verified."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import stat
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import numpy as np
import pytest
from PIL import Image

from engine import aws as aws_clients
from engine.config import Settings
from engine.errors import ModelLoadError
from engine.repository.pack import PACK_INDEX, PACKS_DIR, member_problem, unpack
from engine.repository.publish import publish
from engine.runtime import Runtime
from handler.cli import main
from handler.local_lambda import LocalLambda
from tests.conftest import ROOT, start_server, use_moto
from tests.modelgen import _save, add_constant, add_sub, tiny_classifier

DIRECT_INFER = json.loads((Path(__file__).parent / "events" / "direct_infer.json").read_text())
ADD_SUB = {
    "inputs": [
        {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": list(range(16))},
        {"name": "INPUT1", "datatype": "FP32", "shape": [1, 16], "data": [1] * 16},
    ]
}
ADD_CONSTANT = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0.5, 1, 2, 3]}]}


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Models in directory form: a classifier with a labels file, two versions of one model, add_sub."""
    root = tmp_path_factory.mktemp("src")
    manifest = {
        "labels": "labels.txt",
        "preprocess": {"kind": "image", "size": [8, 8], "crop_fraction": 1.0, "std": [255, 255, 255]},
        "postprocess": {"kind": "classification", "top_k": 2},
    }
    _save(tiny_classifier(), root, "tiny_classifier", 1, manifest)
    (root / "tiny_classifier" / "labels.txt").write_text("red\ngreen\nblue\n")
    _save(add_constant(1.0), root, "versioned", 1, {"versions": "all"})
    _save(add_constant(2.0), root, "versioned", 2)
    (root / "versioned" / "2" / "optimization.json").write_text('{"precision": "fp32"}')
    _save(add_sub(), root, "add_sub")
    return root


def pack(model_dir: Path, out: Path, capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    """``oclaw pack`` (the console script's entry point); its report line."""
    out.parent.mkdir(parents=True, exist_ok=True)
    code = main(["pack", str(model_dir), "--out", str(out), *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return dict(json.loads(captured.out))


def pack_repo(src: Path, dest: Path, capsys: pytest.CaptureFixture[str], *names: str) -> Path:
    for name in names:
        pack(src / name, dest / f"{name}.oclaw", capsys)
    return dest


def png(rgb: tuple[int, int, int]) -> bytes:
    image = np.zeros((10, 14, 3), dtype=np.uint8)
    image[:] = rgb
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def answers(url: str) -> dict[str, Any]:
    """What a server says about the test models: index, metadata and inference results."""
    got: dict[str, Any] = {"index": httpx.post(f"{url}/v2/repository/index", json={}).json()}
    for name, version, body in (("add_sub", "", ADD_SUB), ("versioned", "1", ADD_CONSTANT), ("versioned", "2", None)):
        path = f"{url}/v2/models/{name}" + (f"/versions/{version}" if version else "")
        got[f"{name}/{version} metadata"] = httpx.get(path).json()
        resp = httpx.post(f"{path}/infer", json=body or ADD_CONSTANT)
        assert resp.status_code == 200, resp.text
        got[f"{name}/{version} infer"] = resp.json()
    for rgb in ((255, 0, 0), (0, 0, 255)):
        resp = httpx.post(
            f"{url}/v2/models/tiny_classifier/infer", content=png(rgb), headers={"Content-Type": "image/png"}
        )
        assert resp.status_code == 200, resp.text
        got[f"tiny_classifier {rgb}"] = resp.json()
    return got


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    return {
        p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino)
        for p in sorted(root.rglob("*"))
    }


def test_a_repository_of_packs_answers_as_its_directories_do(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = pack(src / "versioned", tmp_path / "packs" / "versioned.oclaw", capsys)
    assert report["versions"] == [1, 2] and report["members"] == 4  # oclaw.json, 2 models, optimization.json
    with zipfile.ZipFile(tmp_path / "packs" / "versioned.oclaw") as zf:
        assert sorted(zf.namelist()) == [
            "1/model.onnx",
            "2/model.onnx",
            "2/optimization.json",
            PACK_INDEX,
            "oclaw.json",
        ]
        assert zf.getinfo("1/model.onnx").compress_type == zipfile.ZIP_STORED
        assert (
            json.loads(zf.read(PACK_INDEX))["files"]["2/model.onnx"]
            == hashlib.sha256((src / "versioned" / "2" / "model.onnx").read_bytes()).hexdigest()
        )
    packs = pack_repo(src, tmp_path / "packs", capsys, "tiny_classifier", "add_sub")
    assert sorted(p.name for p in packs.iterdir()) == ["add_sub.oclaw", "tiny_classifier.oclaw", "versioned.oclaw"]

    cache = tmp_path / "cache"
    servers = [start_server(src), start_server(packs, model_cache=str(cache))]
    try:
        from_dirs, from_packs = (answers(s.url) for s in servers)
    finally:
        for s in servers:
            s.stop()
    assert from_packs == from_dirs
    assert all(row["state"] == "READY" for row in from_packs["index"]) and len(from_packs["index"]) == 4
    labels = from_packs["tiny_classifier (255, 0, 0)"]["outputs"][0]["data"]
    assert {entry.rsplit(":", 1)[1] for entry in labels} <= {"red", "green", "blue"}  # read from the packed file
    unpacked = sorted(p.name.rsplit("-", 1)[0] for p in (cache / PACKS_DIR).iterdir())
    assert unpacked == ["add_sub", "tiny_classifier", "versioned"]


def _rezip(archive: Path, replace: dict[str, bytes]) -> None:
    """Rewrite members of a pack (valid zip, CRCs right) while keeping its index: a checksum-only mismatch."""
    with zipfile.ZipFile(archive) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in {**members, **replace}.items():
            zf.writestr(name, data)


def _evil_pack(path: Path, member: str) -> None:
    """A pack whose index is right for every member, one of which is named ``member``."""
    files = {"1/model.onnx": add_sub().SerializeToString(), member: b"x"}
    index = {"format": 1, "files": {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}}
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(PACK_INDEX, json.dumps(index))


def test_a_damaged_or_hostile_pack_is_unavailable_with_its_reason_and_the_others_serve(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    packs = pack_repo(src, tmp_path / "packs", capsys, "add_sub", "versioned")
    # a byte flipped inside the zip's model member (the zip's own CRC no longer matches either)
    data = bytearray((packs / "add_sub.oclaw").read_bytes())
    model = (src / "add_sub" / "1" / "model.onnx").read_bytes()
    at = bytes(data).index(model) + len(model) // 2
    data[at] ^= 0xFF
    (packs / "flipped.oclaw").write_bytes(bytes(data))
    # a member replaced in a well-formed zip: only the pack's sha256 catches it
    shutil.copy(packs / "add_sub.oclaw", packs / "replaced.oclaw")
    _rezip(packs / "replaced.oclaw", {"1/model.onnx": add_constant(9.0).SerializeToString()})
    _evil_pack(packs / "zipslip.oclaw", "../../escaped.txt")

    srv = start_server(packs, model_cache=str(tmp_path / "cache"))
    try:
        index = {row["name"]: row for row in httpx.post(f"{srv.url}/v2/repository/index", json={}).json()}
        resp = httpx.post(f"{srv.url}/v2/models/flipped/infer", json=ADD_SUB)
        ok = httpx.post(f"{srv.url}/v2/models/add_sub/infer", json=ADD_SUB)
    finally:
        srv.stop()
    assert {name: row["state"] for name, row in index.items()} == {
        "add_sub": "READY",
        "versioned": "READY",
        "flipped": "UNAVAILABLE",
        "replaced": "UNAVAILABLE",
        "zipslip": "UNAVAILABLE",
    }
    assert "member '1/model.onnx' fails its checksum" in index["flipped"]["reason"]
    assert "flipped.oclaw" in index["flipped"]["reason"]
    assert "member '1/model.onnx' fails its checksum: sha256" in index["replaced"]["reason"]
    assert "member '../../escaped.txt' is not a relative path inside the model directory" in index["zipslip"]["reason"]
    assert resp.status_code == 503 and "checksum" in resp.json()["error"]
    assert ok.status_code == 200 and ok.json()["outputs"][0]["data"][:2] == [1.0, 2.0]
    assert not list(tmp_path.rglob("escaped.txt"))
    assert sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "cache" / PACKS_DIR).iterdir()) == [
        "add_sub",
        "versioned",
    ]  # nothing half-unpacked is left


@pytest.mark.parametrize(
    "member",
    ["../x.onnx", "/etc/x", "1/../../x", "1/sub/model.onnx", "..\\x", "C:/x", ".hidden", "v1/model.onnx", "0/m"],
)
def test_member_names_outside_the_layout_are_refused(member: str, tmp_path: Path) -> None:
    assert member_problem(member) is not None
    _evil_pack(tmp_path / "evil.oclaw", member)
    with pytest.raises(ModelLoadError, match="the pack was refused"):
        unpack(tmp_path / "evil.oclaw", tmp_path / "cache", "evil")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "evil.oclaw"]
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_a_decompression_bomb_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """A member that inflates far past the archive (50 MB of zeros in ~50 kB) is refused from the sizes it declares."""
    bomb = tmp_path / "bomb.oclaw"
    zeros = bytes(50 << 20)
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("labels.txt", zeros)
        index = {"format": 1, "files": {"labels.txt": hashlib.sha256(zeros).hexdigest()}}
        zf.writestr(PACK_INDEX, json.dumps(index))
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(ModelLoadError, match=r"unpack to 52428\d+ bytes, over 100x the archive.*the pack was refused"):
        unpack(bomb, tmp_path / "cache", "bomb")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_layout_names_are_accepted() -> None:
    assert [member_problem(m) for m in ("oclaw.json", "labels.txt", "1/model.onnx", "12/optimization.json")] == [
        None
    ] * 4


def test_a_model_both_a_directory_and_a_pack_is_refused_naming_both(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = pack_repo(src, tmp_path / "models", capsys, "add_sub")
    shutil.copytree(src / "add_sub", root / "add_sub")
    shutil.copytree(src / "versioned", root / "versioned")
    runtime = Runtime(Settings.from_env({}, model_repository=str(root), model_cache=str(tmp_path / "cache")))
    try:
        runtime.preload()
        states = runtime.pool.states()
    finally:
        runtime.close()
    assert states["versioned"]["state"] == "READY" and states["add_sub"]["state"] == "UNAVAILABLE"
    assert f"is both {root / 'add_sub'} and {root / 'add_sub.oclaw'}" in states["add_sub"]["reason"]


def test_a_read_only_repository_of_packs_is_unpacked_into_the_cache_once(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = pack_repo(src, tmp_path / "opt" / "models", capsys, "add_sub", "versioned")
    paths = [root, *root.iterdir()]
    for p in paths:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = tree(root)
    cache = tmp_path / "tmp"
    try:
        inodes = []
        for _ in range(2):  # a second start reuses the verified copy
            srv = start_server(root, model_cache=str(cache))
            try:
                assert httpx.get(f"{srv.url}/v2/health/ready").status_code == 200
                resp = httpx.post(f"{srv.url}/v2/models/versioned/versions/2/infer", json=ADD_CONSTANT)
                assert resp.json()["outputs"][0]["data"] == [2.5, 3.0, 4.0, 5.0]
            finally:
                srv.stop()
            inodes.append({p.relative_to(cache): p.stat().st_ino for p in (cache / PACKS_DIR).glob("*/*/model.onnx")})
    finally:
        for p in paths:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    assert tree(root) == before
    assert sorted(p.name for p in root.parent.iterdir()) == ["models"]
    assert inodes[0] == inodes[1] and len(inodes[0]) == 3  # add_sub/1, versioned/1 and /2: the same files


def test_a_replaced_pack_is_unpacked_again_at_its_next_load_and_the_old_copy_removed(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "models"
    pack(src / "versioned", root / "versioned.oclaw", capsys, "--versions", "1")
    cache = tmp_path / "cache"
    runtime = Runtime(Settings.from_env({}, model_repository=str(root), model_cache=str(cache)))
    try:
        runtime.preload()
        assert runtime.pool.versions("versioned") == [1]
        first = sorted((cache / PACKS_DIR).iterdir())
        pack(src / "versioned", root / "versioned.oclaw", capsys)  # now versions 1 and 2
        runtime.pool.load("versioned")  # what POST /v2/repository/models/versioned/load does
        assert runtime.pool.versions("versioned") == [1, 2]
        assert runtime.pool.get("versioned", 2).path.parent.parent not in first
    finally:
        runtime.close()
    assert len(first) == 1 and not first[0].exists()
    assert len(list((cache / PACKS_DIR).iterdir())) == 1


def test_pack_command_errors_name_the_flag_or_path(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pack", str(tmp_path / "nope")]) == 2
    assert "is not a model directory" in capsys.readouterr().err
    assert main(["pack", str(src / "versioned"), "--out", str(tmp_path / "v.oclaw"), "--versions", "7"]) == 2
    assert "--versions: no version 7" in capsys.readouterr().err
    assert not (tmp_path / "v.oclaw").exists()
    report = pack(src / "versioned", tmp_path / "v.oclaw", capsys, "--versions", "2")
    with zipfile.ZipFile(tmp_path / "v.oclaw") as zf:
        assert "1/model.onnx" not in zf.namelist() and report["versions"] == [2]


# -- S3 and Lambda ------------------------------------------------------------------------------------


@pytest.fixture()
def bucket(moto: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    use_moto(moto, monkeypatch)
    s3 = boto3.client("s3", endpoint_url=moto, region_name="us-east-1")
    name = f"packs-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    yield name
    s3.close()
    aws_clients.reset()


def test_an_s3_repository_serves_a_published_pack(
    bucket: str, src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OCLAW_MODEL_CACHE", str(tmp_path / "check"))  # where `oclaw publish` unpacks to check
    local = pack_repo(src, tmp_path / "local", capsys, "add_sub")
    shutil.copytree(src / "versioned", local / "versioned")
    uri = f"s3://{bucket}/prod"
    assert main(["publish", str(local), uri]) == 0  # each model loaded as the server does, then uploaded
    assert list((tmp_path / "check" / PACKS_DIR).iterdir())
    *rows, summary = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert summary["published"] == ["add_sub", "versioned"] and summary["files"] == 5
    assert {r["uri"] for r in rows} == {
        f"{uri}/add_sub.oclaw",
        f"{uri}/versioned/1/model.onnx",
        f"{uri}/versioned/2/model.onnx",
        f"{uri}/versioned/2/optimization.json",
        f"{uri}/versioned/oclaw.json",
    }
    cache = tmp_path / "cache"
    fetched = []
    for _ in range(2):
        srv = start_server(uri, model_cache=str(cache))  # type: ignore[arg-type]
        try:
            resp = httpx.post(f"{srv.url}/v2/models/add_sub/infer", json=ADD_SUB)
            assert resp.status_code == 200, resp.text
            assert resp.json()["outputs"][0]["data"][:3] == [1.0, 2.0, 3.0]
            assert srv.runtime.pool.versions("versioned") == [1, 2]
            fetched.append(srv.runtime.fetch)
        finally:
            srv.stop()
    assert fetched[0].files == 5 and fetched[0].cached == 0
    assert fetched[1].files == 0 and fetched[1].cached == 5  # the pack too: same ETag, not downloaded again
    assert (cache / bucket / "prod" / "add_sub.oclaw").read_bytes() == (local / "add_sub.oclaw").read_bytes()


def test_an_s3_model_both_a_pack_and_a_directory_is_refused(
    bucket: str, src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    publish(pack_repo(src, tmp_path / "a", capsys, "add_sub"), f"s3://{bucket}", cache=tmp_path / "check")
    publish(src, f"s3://{bucket}", models=["add_sub", "versioned"])
    runtime = Runtime(Settings.from_env({}, model_repository=f"s3://{bucket}", model_cache=str(tmp_path / "c")))
    try:
        runtime.preload()
        states = runtime.pool.states()
    finally:
        runtime.close()
    assert states["versioned"]["state"] == "READY" and states["add_sub"]["state"] == "UNAVAILABLE"
    assert f"is both s3://{bucket}/add_sub/ and s3://{bucket}/add_sub.oclaw" in states["add_sub"]["reason"]


def test_lambda_init_serves_a_pack_from_a_layer(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layer = pack_repo(src, tmp_path / "opt" / "models", capsys, "add_sub")
    env = {"OCLAW_MODEL_REPOSITORY": str(layer), "OCLAW_MODEL_CACHE": str(tmp_path / "tmp")}
    with LocalLambda(env=env, cwd=ROOT, log=tmp_path / "lambda.log") as fn:
        fn.wait_init()
        result = fn.invoke(DIRECT_INFER)
    assert result.error is None, result.error
    assert result.json()["outputs"][0]["data"][:3] == [2.0, 3.0, 4.0]
    assert [p.name.rsplit("-", 1)[0] for p in (tmp_path / "tmp" / PACKS_DIR).iterdir()] == ["add_sub"]
    assert sorted(p.name for p in layer.iterdir()) == ["add_sub.oclaw"]


def test_lambda_init_opens_the_prepared_graph_a_pack_carries(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """prepare -> pack -> a layer: INIT opens the prepared graph with optimisations off, as from a directory."""
    repo = tmp_path / "repo"
    shutil.copytree(src / "add_sub", repo / "add_sub")
    assert main(["prepare", "--model-repository", str(repo), "--level", "extended"]) == 0
    assert "add_sub" in capsys.readouterr().out
    layer = tmp_path / "opt" / "models"
    pack(repo / "add_sub", layer / "add_sub.oclaw", capsys)
    with zipfile.ZipFile(layer / "add_sub.oclaw") as zf:
        assert {"1/model.onnx", "1/model.prepared.onnx", "1/model.prepared.json"} <= set(zf.namelist())
    env = {"OCLAW_MODEL_REPOSITORY": str(layer), "OCLAW_MODEL_CACHE": str(tmp_path / "tmp")}
    with LocalLambda(env=env, cwd=ROOT, log=tmp_path / "lambda.log") as fn:
        fn.wait_init()
        result = fn.invoke(DIRECT_INFER)
    assert result.error is None, result.error
    assert result.json()["outputs"][0]["data"][:3] == [2.0, 3.0, 4.0]
    lines = (tmp_path / "lambda.log").read_text().splitlines()
    record = json.loads(next(line for line in lines if line.startswith('{"event": "cold_start"')))
    assert record["models"]["add_sub/1"]["prepared"] is True
