"""Shared helpers of the metering tests: a Meter on a given platform, one record served alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.config import Settings
from engine.metering.meter import Meter
from engine.metering.records import MeteringRecord


def meter(tmp_path: Path, platform: str, **overrides: Any) -> Meter:
    settings = Settings.from_env({}, metering_spool=str(tmp_path / "spool.jsonl"), **overrides)
    return Meter(settings, "inst", platform_name=platform)


def one(
    m: Meter, *, total_ms: float, compute_ms: float = 1.0, init_ms: float = 0.0, cold: bool = False
) -> MeteringRecord:
    (record,) = m.records(
        request_ids=["r"],
        tenants=["t"],
        model="m",
        version="1",
        items=[1],
        bytes_in=[10],
        bytes_out=[20],
        statuses=[200],
        queue_ms=[0.0],
        compute_ms=compute_ms,
        total_ms=total_ms,
        init_ms=init_ms,
        cold=cold,
        source="test",
    )
    return record
