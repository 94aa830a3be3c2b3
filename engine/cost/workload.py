"""Per-request figures from metering records: what a warm request takes and is billed, what a cold start adds."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.cost.prices import CostError


@dataclass(frozen=True)
class Workload:
    """Per-request figures, and where they came from (``source``)."""

    #: Lambda's billed duration of a warm request (its duration rounded up to 1 ms), the median.
    billed_ms: float
    #: The model's run (compute) time, the median: what a warm ping costs.
    compute_ms: float
    #: Warm requests' durations at the function (``total_ms``), sorted: the latency distribution.
    latency_ms: tuple[float, ...]
    #: INIT (what Lambda bills for it), the median over cold records.
    init_ms: float
    #: The duration of the request that paid the cold start, INIT apart (its model's first run).
    cold_ms: float
    memory_mb: int
    source: str

    @property
    def warm_ms(self) -> float:
        """The median warm duration."""
        return statistics.median(self.latency_ms)

    @property
    def cold_latency_ms(self) -> float:
        """What a request meeting a cold start waits: INIT, then its own duration."""
        return self.init_ms + self.cold_ms


def _number(record: dict[str, Any], name: str) -> float:
    value = record.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise CostError(f"metering record {record.get('request_id', '?')}: {name} must be a number >= 0, got {value!r}")
    return float(value)


def workload(
    records: Sequence[dict[str, Any]], *, init_ms: float | None = None, memory_mb: int | None = None
) -> Workload:
    """Medians of the warm records' billed, compute and total time; INIT from the cold Lambda records (or the
    figure given, a measured one); the memory size from the records' GB-seconds (or the size given).

    A cold Lambda record's ``billed_ms`` carries INIT (rounded up to 1 ms) on top of its own duration.
    """
    ok = [r for r in records if isinstance(r.get("status", 200), int) and r.get("status", 200) < 400]
    warm = [r for r in ok if not r.get("cold")]
    cold = [r for r in ok if r.get("cold")]
    if not warm:
        raise CostError("the metering records hold no successful warm request (cold=false) to take figures from")
    billed = statistics.median(_number(r, "billed_ms") for r in warm)
    compute = statistics.median(_number(r, "compute_ms") for r in warm)
    latency = tuple(sorted(_number(r, "total_ms") for r in warm))
    source = (
        f"{len(warm)} warm metering records (medians: billed {billed:g} ms, compute {compute:.3f} ms, "
        f"duration {statistics.median(latency):.3f} ms)"
    )
    lambda_cold = [r for r in cold if r.get("platform") == "lambda"]
    cold_ms = statistics.median(_number(r, "total_ms") for r in cold) if cold else statistics.median(latency)
    if init_ms is None:
        inits = [_number(r, "billed_ms") - math.ceil(_number(r, "total_ms")) for r in lambda_cold]
        inits = [i for i in inits if i > 0]
        if not inits:
            raise CostError(
                "the metering records hold no cold Lambda request carrying INIT: add records of a cold start, "
                "benchmark the model (--model), or give a measured INIT with --init-ms"
            )
        init_ms = statistics.median(inits)
        source += f"; INIT {init_ms:g} ms, the median of {len(inits)} cold record(s)"
    else:
        source += f"; INIT {init_ms:g} ms as given (--init-ms)"
    if cold:
        source += f"; the cold request's own duration {cold_ms:.3f} ms"
    if memory_mb is None:
        sizes = [
            round(_number(r, "gb_seconds") * 1024 / (_number(r, "billed_ms") / 1000))
            for r in warm
            if r.get("platform") == "lambda" and r.get("gb_seconds") and r.get("billed_ms")
        ]
        if not sizes:
            raise CostError("the metering records are not Lambda's (no GB-seconds): give the memory size with --memory")
        memory_mb = int(statistics.median(sizes))
        source += f"; memory {memory_mb} MB from the records' GB-seconds"
    else:
        source += f"; memory {memory_mb} MB as given (--memory)"
    return Workload(billed, compute, latency, float(init_ms), cold_ms, memory_mb, source)
