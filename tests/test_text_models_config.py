"""Text model configuration: manifest errors name the key; an unfit tokenizer or preprocess fails the load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import onnx
import pytest

from engine.config import Settings
from engine.errors import ConfigError, ModelLoadError, OclawError
from engine.model import LoadedModel
from engine.repository.local import LocalRepository
from engine.repository.manifest import load_manifest
from tests.conftest import start_server
from tests.test_text_models import MANIFEST, tiny_bert, tokenizer_json


def test_a_text_preprocess_that_leaves_an_input_unfed_fails_the_load(tmp_path: Path) -> None:
    (tmp_path / "t" / "1").mkdir(parents=True)
    onnx.save(tiny_bert(), str(tmp_path / "t" / "1" / "model.onnx"))
    tokenizer_json(tmp_path / "t" / "tokenizer.json")
    manifest = {**MANIFEST, "preprocess": {**MANIFEST["preprocess"], "token_type_ids": None}}
    (tmp_path / "t" / "oclaw.json").write_text(json.dumps(manifest))
    srv = start_server(tmp_path)
    try:
        r = httpx.get(f"{srv.url}/v2/models/t/ready", timeout=30)
        assert r.status_code != 200
        with pytest.raises(OclawError, match=r"input\(s\) \['token_type_ids'\]"):
            srv.runtime.pool.get("t")
    finally:
        srv.stop()


def test_manifest_errors_name_the_key(tmp_path: Path) -> None:
    (tmp_path / "oclaw.json").write_text(json.dumps(MANIFEST))
    with pytest.raises(ConfigError, match=r"preprocess\.tokenizer 'tokenizer\.json': no such file"):
        load_manifest(tmp_path)
    tokenizer_json(tmp_path / "tokenizer.json")
    assert load_manifest(tmp_path).embedding is not None
    (tmp_path / "oclaw.json").write_text(json.dumps({"postprocess": MANIFEST["postprocess"]}))
    with pytest.raises(ConfigError, match=r'needs preprocess\.kind "text"'):
        load_manifest(tmp_path)
    (tmp_path / "oclaw.json").write_text(json.dumps({"preprocess": {**MANIFEST["preprocess"], "max_length": 0}}))
    with pytest.raises(ConfigError, match=r"preprocess\.max_length must be a positive integer"):
        load_manifest(tmp_path)


PRE, POST = MANIFEST["preprocess"], MANIFEST["postprocess"]


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ({"preprocess": {**PRE, "input_ids": 3}}, "preprocess.input_ids must be an input name"),
        ({"preprocess": {**PRE, "attention_mask": ""}}, "preprocess.attention_mask must be an input name or null"),
        ({"preprocess": {**PRE, "tokenizer": "../tokenizer.json"}}, "must lie inside the model directory"),
        ({"preprocess": {**PRE, "tokenizer": 1}}, "preprocess.tokenizer must be a file name"),
        ({"preprocess": {**PRE, "kind": "audio"}}, "preprocess.kind 'audio' is not supported (only 'image' or 'text')"),
        ({"preprocess": PRE, "postprocess": {**POST, "pooling": "max"}}, "postprocess.pooling must be 'mean'"),
        (
            {"preprocess": PRE, "postprocess": {**POST, "normalize": "yes"}},
            "postprocess.normalize must be true or false",
        ),
        ({"preprocess": PRE, "postprocess": {**POST, "name": ""}}, "postprocess.name must be an output name"),
        ({"preprocess": PRE, "postprocess": {**POST, "kind": "boxes"}}, "postprocess.kind 'boxes' is not supported"),
        ({"preprocess": {**PRE, "max_lenght": 8}}, "did you mean 'preprocess.max_length'?"),
    ],
)
def test_bad_text_manifests_name_the_key(tmp_path: Path, manifest: dict[str, Any], message: str) -> None:
    tokenizer_json(tmp_path / "tokenizer.json")
    (tmp_path / "oclaw.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError) as info:
        load_manifest(tmp_path)
    assert message in info.value.message


def test_a_tokenizer_file_that_is_not_one_fails_the_load_naming_it(tmp_path: Path) -> None:
    (tmp_path / "t" / "1").mkdir(parents=True)
    onnx.save(tiny_bert(), str(tmp_path / "t" / "1" / "model.onnx"))
    (tmp_path / "t" / "tokenizer.json").write_text("{}")
    (tmp_path / "t" / "oclaw.json").write_text(json.dumps(MANIFEST))
    settings = Settings.from_env({}, model_repository=str(tmp_path))
    repo = LocalRepository(tmp_path)
    with pytest.raises(ModelLoadError, match=r"preprocess\.tokenizer 'tokenizer\.json' could not be loaded"):
        LoadedModel(repo.files("t", 1), repo.manifest("t"), settings)
