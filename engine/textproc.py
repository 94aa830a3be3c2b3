"""Text pre-processing (UTF-8 strings -> token tensors) and the embedding post-process (mean pooling)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine.datatypes import V2_TO_NUMPY
from engine.errors import InvalidInput, ModelLoadError
from engine.repository.manifest import Embedding, TextPreprocess
from engine.tensors import InferRequest

#: A served tensor's signature: name, V2 datatype, shape (-1 for a variable dimension).
Spec = tuple[str, str, tuple[int, ...]]


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


class TextModel:
    """A text model's ends: a BYTES tensor of strings in (tokenized into the session's token inputs) and, with an
    ``embedding`` post-process, the session's token embeddings pooled into one vector per string."""

    def __init__(
        self,
        model: str,
        pre: TextPreprocess,
        embedding: Embedding | None,
        inputs: Mapping[str, str],
        outputs: Mapping[str, tuple[int, ...]],
    ) -> None:
        """``inputs``: the session's input datatypes by name; ``outputs``: its output shapes by name, in order."""
        self.model, self.pre, self.embedding, self._native = model, pre, embedding, inputs
        fed = [n for n in (pre.input_ids, pre.attention_mask, pre.token_type_ids) if n is not None]
        if pre.input_ids not in inputs:
            raise ModelLoadError(f"preprocess.input_ids must name one of the inputs {list(inputs)}")
        unfed = [n for n in inputs if n not in fed]
        if unfed:
            raise ModelLoadError(
                f"preprocess (text) feeds {[n for n in fed if n in inputs]}; name the model's other "
                f"input(s) {unfed} in preprocess.input_ids, attention_mask or token_type_ids"
            )
        self.tokenizer = load_tokenizer(pre.tokenizer, max_length=pre.max_length)
        #: The served input, and (with an embedding post-process) the served output and the session output it pools.
        self.input: Spec = (pre.input, "BYTES", (-1,))
        self.output: Spec | None = None
        self.token_output: str | None = None
        if embedding is None:
            return
        if pre.attention_mask not in inputs:
            raise ModelLoadError("postprocess (embedding) pools with the attention mask: name it in preprocess")
        token_output = embedding.output or next(iter(outputs))
        if token_output not in outputs:
            raise ModelLoadError(f"postprocess.output must name one of the outputs {list(outputs)}")
        shape = outputs[token_output]
        if len(shape) != 3:
            raise ModelLoadError(
                f"postprocess (embedding) needs token embeddings [N, T, D]; output {token_output!r} has shape "
                f"{list(shape)}"
            )
        self.output = (embedding.name, "FP32", (-1, shape[2]))
        self.token_output = token_output

    def feed(self, texts: list[str]) -> dict[str, np.ndarray]:
        """The session feed of some strings: token ids, attention mask and token types, as the session types them."""
        pre = self.pre
        ids, mask, types = tokenize(self.tokenizer, texts)
        values = ((pre.input_ids, ids), (pre.attention_mask, mask), (pre.token_type_ids, types))
        return {
            name: arr.astype(V2_TO_NUMPY[self._native[name]], copy=False)
            for name, arr in values
            if name is not None and name in self._native
        }

    def request_feed(self, request: InferRequest, max_batch_size: int) -> dict[str, np.ndarray]:
        """The session feed of a V2 request: one BYTES input of N strings, shape [N] or [N, 1]."""
        pre = self.pre
        if request.raw is not None:
            raise InvalidInput(
                f"model {self.model!r} takes text: send a V2 infer request with a BYTES input {pre.input!r}"
            )
        names = [t.name for t in request.inputs]
        if names != [pre.input]:
            raise InvalidInput(f"model {self.model!r} takes one input {pre.input!r} (BYTES strings), got {names}")
        t = request.inputs[0]
        if t.datatype != "BYTES":
            raise InvalidInput(f"input {t.name!r}: expected datatype BYTES (UTF-8 strings), got {t.datatype}")
        if not (len(t.shape) == 1 or (len(t.shape) == 2 and t.shape[1] == 1)):
            raise InvalidInput(f"input {t.name!r}: expected shape [N] or [N, 1] (N strings), got {list(t.shape)}")
        if t.shape[0] == 0:
            raise InvalidInput(f"input {t.name!r}: no text given")
        if max_batch_size > 0 and t.shape[0] > max_batch_size:
            raise InvalidInput(f"input {t.name!r}: {t.shape[0]} strings exceed max_batch_size {max_batch_size}")
        return self.feed(decode_texts(t.array.reshape(-1).tolist(), name=t.name))

    def pool(self, tokens: np.ndarray, feed: Mapping[str, np.ndarray]) -> np.ndarray:
        """The served embedding of the session's token embeddings (the attention mask taken from ``feed``)."""
        assert self.embedding is not None and self.pre.attention_mask is not None
        return mean_pool(tokens, feed[self.pre.attention_mask], normalize=self.embedding.normalize)
