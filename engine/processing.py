"""Pre-processing (JPEG/PNG -> image tensor) and post-processing (softmax, top-k labels)."""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.errors import InvalidInput, PayloadTooLarge
from engine.repository.manifest import ImagePreprocess

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as PILImage


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow is a core dependency
        raise InvalidInput("image inputs need Pillow: pip install pillow") from exc
    # one pixel limit, ours (OCLAW_MAX_TENSOR_ELEMENTS), checked in decode_image before any decoding: Pillow's own
    # (a warning, then an error at twice its MAX_IMAGE_PIXELS) would refuse in other words, at another size
    Image.MAX_IMAGE_PIXELS = None
    return Image


#: ``<_io.BytesIO object at 0x7f...>`` and the like, which Pillow puts in some messages.
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def decode_image(data: bytes, *, name: str, max_pixels: int) -> PILImage.Image:
    """Decode JPEG/PNG/... bytes into an RGB image, refusing decompression bombs before decoding."""
    image_mod = _pil()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's warnings about odd files are not the client's answer
            img = image_mod.open(io.BytesIO(data))  # lazy: reads the header only
            width, height = img.size
            if width * height > max_pixels:
                raise PayloadTooLarge(
                    f"input {name!r}: image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels "
                    "(OCLAW_MAX_TENSOR_ELEMENTS)"
                )
            img.load()
        rgb: PILImage.Image = img.convert("RGB")
        return rgb
    except (PayloadTooLarge, InvalidInput):
        raise
    except image_mod.UnidentifiedImageError:
        raise InvalidInput(f"input {name!r}: could not decode image: not an image format Pillow reads") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad data
        reason = _OBJECT_REPR.sub("the image", str(exc)) or type(exc).__name__
        raise InvalidInput(f"input {name!r}: could not decode image: {reason}") from None


def image_to_tensor(img: PILImage.Image, spec: ImagePreprocess) -> np.ndarray:
    """Centre-crop, resize and normalise one RGB image into a CHW/HWC float32 array."""
    image_mod = _pil()
    width, height = img.size
    side = min(width, height)
    crop = max(1, round(spec.crop_fraction * side))
    left, top = (width - crop) // 2, (height - crop) // 2
    img = img.crop((left, top, left + crop, top + crop))
    resample = getattr(image_mod.Resampling, spec.resample.upper())
    img = img.resize((spec.size[1], spec.size[0]), resample=resample)
    arr: np.ndarray = np.asarray(img, dtype=np.float32)
    if spec.color == "BGR":
        arr = arr[..., ::-1]
    arr = (arr - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    if spec.layout == "NCHW":
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


def images_to_batch(blobs: Sequence[bytes], spec: ImagePreprocess, *, name: str, max_pixels: int) -> np.ndarray:
    """Decode and pre-process a batch of encoded images into one float32 tensor."""
    if not blobs:
        raise InvalidInput(f"input {name!r}: no image given")
    return np.stack([image_to_tensor(decode_image(b, name=name, max_pixels=max_pixels), spec) for b in blobs])


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax."""
    shifted = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(shifted)
    out: np.ndarray = e / np.sum(e, axis=axis, keepdims=True)
    return out


def classify(scores: np.ndarray, k: int, labels: Sequence[str], *, apply_softmax: bool) -> np.ndarray:
    """Top-k as Triton's classification extension: BYTES ``"value:index[:label]"``, one row per item."""
    if scores.dtype.kind not in "biuf":
        raise InvalidInput("classification needs a numeric output, not BYTES")
    with np.errstate(over="ignore"):  # scores past float32's range rank as infinity
        arr = np.asarray(scores, dtype=np.float32)
    rows = arr.reshape(1, -1) if arr.ndim <= 1 else arr.reshape(arr.shape[0], math.prod(arr.shape[1:]))
    if apply_softmax and rows.shape[1]:  # an empty output has no scores to normalise
        rows = softmax(rows)
    k = min(k, rows.shape[1])
    top = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    out = np.empty((rows.shape[0], k), dtype=object)
    for r in range(rows.shape[0]):
        for j, idx in enumerate(top[r]):
            label = f":{labels[idx]}" if idx < len(labels) else ""
            out[r, j] = f"{rows[r, idx]:f}:{idx}{label}".encode()
    return out if arr.ndim > 1 else out[0]
