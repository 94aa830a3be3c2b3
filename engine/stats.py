"""Per-model inference statistics in the shape of Triton's statistics extension."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

_PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


@dataclass
class ModelStats:
    """Counters for one model version; updated under a lock, read as a Triton-style dict."""

    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_PHASES, 0))
    ns: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_PHASES, 0))
    #: Per batch size (rows in one run): [runs, compute_input ns, compute_infer ns, compute_output ns].
    batches: dict[int, list[int]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def success(
        self, *, rows: int, queue: int, compute_input: int, compute_infer: int, compute_output: int, total: int
    ) -> None:
        """Record one successful request of ``rows`` items (durations in ns); its run is recorded by ``run``."""
        with self._lock:
            self.inference_count += rows
            self.last_inference_ms = time.time_ns() // 1_000_000
            for phase, value in (
                ("success", total),
                ("queue", queue),
                ("compute_input", compute_input),
                ("compute_infer", compute_infer),
                ("compute_output", compute_output),
            ):
                self.counts[phase] += 1
                self.ns[phase] += value

    def run(self, *, rows: int, compute_input: int, compute_infer: int, compute_output: int) -> None:
        """Record one execution of the model, of ``rows`` rows (one request's, or a batch of several requests')."""
        with self._lock:
            self.execution_count += 1
            entry = self.batches.get(rows)
            if entry is None:
                entry = self.batches[rows] = [0, 0, 0, 0]
            entry[0] += 1
            entry[1] += compute_input
            entry[2] += compute_infer
            entry[3] += compute_output

    def failure(self, total: int) -> None:
        """Record one failed request."""
        with self._lock:
            self.counts["fail"] += 1
            self.ns["fail"] += total

    def as_dict(self, name: str, version: str) -> dict[str, Any]:
        """Triton ``model_stats`` entry."""
        with self._lock:
            return {
                "name": name,
                "version": version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {p: {"count": self.counts[p], "ns": self.ns[p]} for p in _PHASES},
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": {"count": runs, "ns": compute_input},
                        "compute_infer": {"count": runs, "ns": compute_infer},
                        "compute_output": {"count": runs, "ns": compute_output},
                    }
                    for size, (runs, compute_input, compute_infer, compute_output) in sorted(self.batches.items())
                ],
            }
