"""An inference result: outputs as numpy arrays, and top-k classes from classification strings or logits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def _parse_class(entry: Any) -> tuple[str, float]:
    """One Triton classification string ``"prob:index[:label]"`` as (label, prob); the index when no label."""
    text = entry.decode("utf-8", errors="replace") if isinstance(entry, bytes) else str(entry)
    prob, index, *label = text.split(":", 2)
    return (label[0] if label else index), float(prob)


def _probabilities(row: np.ndarray) -> np.ndarray:
    """A row of scores as probabilities: kept when it already is a distribution, else softmax."""
    row = row.astype(np.float64, copy=False)
    if row.size and row.min() >= 0.0 and abs(float(row.sum()) - 1.0) < 1e-3:
        return row
    shifted: np.ndarray = np.exp(row - row.max())
    probs: np.ndarray = shifted / shifted.sum()
    return probs


@dataclass(frozen=True)
class Result:
    """The outputs of one predict call, in the model's order; batches sent in parts are joined back in order."""

    model_name: str
    model_version: str
    outputs: dict[str, np.ndarray]
    #: Class names by index, for top-k from logits (the server's classification strings carry their own).
    labels: Sequence[str] | None = None
    #: The response's ``parameters`` (of its first part, when sent in parts).
    parameters: dict[str, Any] = field(default_factory=dict)

    def as_numpy(self, name: str | None = None) -> np.ndarray:
        """The output named ``name`` (the first output by default)."""
        if name is None:
            return next(iter(self.outputs.values()))
        try:
            return self.outputs[name]
        except KeyError:
            raise KeyError(f"no output {name!r}; the outputs are {list(self.outputs)}") from None

    def topk(self, k: int = 5, *, output: str | None = None, row: int = 0) -> list[tuple[str, float]]:
        """The ``k`` most likely classes of one row (batch item), as (label, probability), best first.

        From classification strings (``"prob:index:label"``, what a model with classification post-processing
        answers) when the output holds them, else from scores: softmax (unless they already sum to one), labelled
        by ``labels`` or by class index.
        """
        array = self.as_numpy(output) if output is not None else self._class_output()
        if array.ndim == 0:
            array = array.reshape(1, 1)
        rows = array.reshape(1, -1) if array.ndim == 1 else array.reshape(array.shape[0], -1)
        values = rows[row]
        if values.dtype == object:
            return sorted((_parse_class(v) for v in values), key=lambda c: -c[1])[:k]
        probs = _probabilities(values)
        best = np.argsort(-probs, kind="stable")[:k]
        names = self.labels
        return [(names[i] if names is not None and i < len(names) else str(i), float(probs[i])) for i in best.tolist()]

    def topk_rows(self, k: int = 5, *, output: str | None = None) -> list[list[tuple[str, float]]]:
        """``topk`` of every row (batch item)."""
        array = self.as_numpy(output) if output is not None else self._class_output()
        count = 1 if array.ndim <= 1 else array.shape[0]
        return [self.topk(k, output=output, row=i) for i in range(count)]

    def _class_output(self) -> np.ndarray:
        """The output to rank: the first holding classification strings, else the first numeric one."""
        for array in self.outputs.values():
            if array.dtype == object:
                return array
        for array in self.outputs.values():
            if array.dtype.kind in "fiu":
                return array
        return self.as_numpy()
