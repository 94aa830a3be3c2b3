"""What the audit tests share: the fields of a record, reading records back, and no key in what is written."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

FIELDS = {
    "event",
    "time",
    "instance_id",
    "platform",
    "action",
    "outcome",
    "status",
    "model",
    "version",
    "key_id",
    "key_name",
    "tenant",
    "request_id",
    "source",
    "source_ip",
    "user",
}


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(path: Path, request_ids: set[str], timeout_s: float = 15.0) -> dict[str, dict[str, Any]]:
    """The records of ``request_ids`` once all are in ``path`` (a server flushes once a second)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = {r["request_id"]: r for r in read_records(path) if r["request_id"] in request_ids}
        if set(found) == request_ids or time.monotonic() > deadline:
            assert set(found) == request_ids, f"missing {request_ids - set(found)}"
            return found
        time.sleep(0.05)


def key_id(key: str) -> str:
    return key.split("_")[1]


def assert_no_secret(text: str, keys: dict[str, str]) -> None:
    for key in keys.values():
        secret = key.split("_", 2)[2]
        assert key not in text and secret not in text
