"""Traffic profiles: requests per second in each interval of a period, from a named shape, a CSV file, or the
times of metering records; and the metering records themselves, read as ``oclaw usage`` reads them.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from engine.cost.prices import CostError

MONTH_S = 30 * 86400
MINUTE_S = 60


@dataclass(frozen=True)
class Profile:
    """Requests per second in each interval of ``interval_s`` seconds, from the start of the period."""

    name: str
    rate: np.ndarray
    interval_s: float = MINUTE_S
    description: str = ""

    @property
    def seconds(self) -> float:
        """How long the profile lasts."""
        return float(len(self.rate) * self.interval_s)

    @property
    def requests(self) -> float:
        """Expected requests over the profile."""
        return float(self.rate.sum() * self.interval_s)

    @property
    def month_factor(self) -> float:
        """What scales the profile's figures to a 30-day month."""
        return MONTH_S / self.seconds


#: The named shapes, each over a 30-day month at 1-minute resolution, day 0 a Monday, times in UTC.
SHAPES = {
    "steady": "R req/s every minute of the month",
    "business-hours": "R req/s from 09:00 to 17:00 on weekdays (22 of the 30 days, day 0 a Monday), nothing otherwise",
    "spiky": "0.1 req/s all month, plus a 5-minute burst of R req/s at the start of every third hour "
    "(00:00, 03:00, ...: 240 bursts)",
    "nightly-batch": "R req/s from 02:00 to 03:00 every day, nothing otherwise",
}
#: Each shape's rate R (req/s) when the profile gives none.
DEFAULT_RATE = {"steady": 1.0, "business-hours": 5.0, "spiky": 20.0, "nightly-batch": 50.0}


def shape(spec: str) -> Profile:
    """A named shape (``SHAPES``) with an optional rate, e.g. ``steady:1`` or ``business-hours:5``."""
    name, _, arg = spec.partition(":")
    name = name.replace("_", "-")
    if name not in SHAPES:
        raise CostError(
            f"unknown profile {spec!r}: give a CSV file of timestamp,requests, 'records' (the --records files' own "
            f"traffic) or a shape: {', '.join(SHAPES)} (with ':R' for its rate in req/s)"
        )
    try:
        level = float(arg) if arg else DEFAULT_RATE[name]
    except ValueError:
        level = math.nan
    if not math.isfinite(level) or level <= 0:
        raise CostError(f"profile {spec!r}: the rate after ':' must be a number > 0 (req/s), got {arg!r}")
    minutes = np.arange(MONTH_S // MINUTE_S)
    hour = (minutes // 60) % 24
    day = minutes // 1440
    if name == "steady":
        rate = np.full(len(minutes), level)
    elif name == "business-hours":
        rate = np.where((day % 7 < 5) & (hour >= 9) & (hour < 17), level, 0.0)
    elif name == "spiky":
        rate = np.where((minutes % 180) < 5, level, 0.1)
    else:
        rate = np.where(hour == 2, level, 0.0)
    return Profile(
        f"{name}:{level:g}", rate.astype(float), MINUTE_S, SHAPES[name].replace("R req/s", f"{level:g} req/s")
    )


def _timestamp(text: str) -> float:
    """Unix seconds, or an ISO 8601 time (a time without a zone is UTC)."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def from_csv(path: str) -> Profile:
    """A CSV of ``timestamp,requests`` per interval: timestamps ISO 8601 or Unix seconds, evenly spaced; the
    last row's interval is as long as the others. A header row is allowed."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [(n, row) for n, row in enumerate(csv.reader(fh), 1) if row and "".join(row).strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise CostError(f"{path}: cannot read the profile: {getattr(exc, 'strerror', None) or exc}") from None
    if rows and rows[0][1][0].strip().lower() in ("timestamp", "time"):
        rows = rows[1:]
    times, counts = [], []
    for number, row in rows:
        if len(row) != 2:
            raise CostError(f"{path}:{number}: expected 2 fields, timestamp,requests; got {len(row)}")
        try:
            times.append(_timestamp(row[0]))
        except ValueError:
            raise CostError(f"{path}:{number}: {row[0]!r} is not a timestamp (ISO 8601 or Unix seconds)") from None
        try:
            count = float(row[1])
        except ValueError:
            count = math.nan
        if not math.isfinite(count) or count < 0:
            raise CostError(f"{path}:{number}: requests must be a number >= 0, got {row[1]!r}")
        counts.append(count)
    if len(times) < 2:
        raise CostError(f"{path}: a profile needs at least 2 rows of timestamp,requests, found {len(times)}")
    steps = np.diff(np.array(times))
    if np.any(steps <= 0):
        number = rows[int(np.argmax(steps <= 0)) + 1][0]
        raise CostError(f"{path}:{number}: timestamps must increase")
    interval = float(steps[0])
    if np.any(np.abs(steps - interval) > 1e-6 * interval):
        number = rows[int(np.argmax(np.abs(steps - interval) > 1e-6 * interval)) + 1][0]
        raise CostError(f"{path}:{number}: timestamps must be evenly spaced ({interval:g} s apart, as the first two)")
    return Profile(
        Path(path).name, np.array(counts) / interval, interval, f"{path}: {len(times)} intervals of {interval:g} s"
    )


def from_records(records: Sequence[dict[str, Any]], name: str = "records") -> Profile:
    """Requests per minute of real traffic, from metering records' ``time`` (first to last minute seen)."""
    seconds = []
    for record in records:
        try:
            seconds.append(_timestamp(str(record["time"])))
        except (KeyError, ValueError):
            continue
    if not seconds:
        raise CostError(f"{name}: no metering record with a time to take the profile from")
    first = min(seconds) // MINUTE_S * MINUTE_S
    counts = np.bincount(((np.array(seconds) - first) // MINUTE_S).astype(int)).astype(float)
    return Profile(name, counts / MINUTE_S, MINUTE_S, f"{len(seconds)} metering records over {len(counts)} minute(s)")


def read_records(paths: Iterable[str]) -> list[dict[str, Any]]:
    """Metering records in files, as ``oclaw usage`` reads them (``engine.metering.batch.read_records``)."""
    from engine.metering.batch import read_records as read_file

    out: list[dict[str, Any]] = []
    for path in paths:
        try:
            out += read_file(path)
        except OSError as exc:
            raise CostError(f"{path}: cannot read metering records: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise CostError(str(exc)) from None
    return out
