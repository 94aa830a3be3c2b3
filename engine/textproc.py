"""Text pre-processing (UTF-8 strings -> token tensors) and the embedding post-process (mean pooling)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import InvalidInput, ModelLoadError


def load_tokenizer(path: Path, *, max_length: int) -> Any:
    """Load a ``tokenizers`` file, truncating to ``max_length`` and padding to the longest string of a batch."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ModelLoadError("text models need the tokenizers library: pip install 'oclaw[text]'") from None
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for a bad file
        raise ModelLoadError(f"preprocess.tokenizer {path.name!r} could not be loaded: {exc}") from None
    padding = tokenizer.padding or {}
    pad_id = padding.get("pad_id")
    pad_token = padding.get("pad_token")
    if pad_id is None or pad_token is None:
        pad_token = "[PAD]" if tokenizer.token_to_id("[PAD]") is not None else tokenizer.id_to_token(0) or "[PAD]"
        pad_id = tokenizer.token_to_id(pad_token) or 0
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)
    tokenizer.enable_truncation(max_length)
    return tokenizer


def decode_texts(values: Sequence[Any], *, name: str) -> list[str]:
    """The strings of a BYTES tensor; bytes that are not UTF-8 are refused, naming the input and the item."""
    texts = []
    for i, value in enumerate(values):
        if isinstance(value, str):
            texts.append(value)
            continue
        try:
            texts.append(bytes(value).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InvalidInput(
                f"input {name!r}: item {i} is not valid UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from None
    return texts


def tokenize(tokenizer: Any, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids, attention mask and token type ids, int64 [N, T], padded to the longest string."""
    encodings = tokenizer.encode_batch(list(texts))
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    types = np.array([e.type_ids for e in encodings], dtype=np.int64)
    return ids, mask, types


def mean_pool(tokens: np.ndarray, mask: np.ndarray, *, normalize: bool) -> np.ndarray:
    """Average token embeddings [N, T, D] over the tokens the mask keeps; L2-normalise when asked; FP32 [N, D]."""
    if tokens.ndim != 3 or tokens.shape[:2] != mask.shape:
        raise InvalidInput(
            f"the embedding post-process needs token embeddings [N, T, D] matching the attention mask "
            f"{list(mask.shape)}, the model gave {list(tokens.shape)}"
        )
    weights = mask.astype(np.float32)[:, :, None]
    summed = (tokens.astype(np.float32) * weights).sum(axis=1)
    pooled: np.ndarray = summed / np.maximum(weights.sum(axis=1), 1e-9)
    if normalize:
        pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    return pooled.astype(np.float32)
