"""The metering spool's files on disk: what a dead writer left behind is cleaned, a live writer's is not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from engine.metering.records import MeteringRecord
from engine.metering.spool import Spool
from tests.meterkit import meter


def _record(tmp_path: Path, request_id: str) -> MeteringRecord:
    (record,) = meter(tmp_path, "local").records(
        request_ids=[request_id], tenants=["t"], model="m", version="1", items=[1], bytes_in=[1], bytes_out=[1],
        statuses=[200], queue_ms=[0.0], compute_ms=1, total_ms=1, source="test",
    )  # fmt: skip
    return record


def test_a_temporary_file_of_a_dead_writer_is_removed_and_a_live_one_kept(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool.jsonl"), 0)
    spool.put([_record(tmp_path, "kept")])
    (kept,) = spool.files()
    code = "import os; print(os.getpid())"
    dead = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    orphan = kept.with_name(f"{kept.name}x.{int(dead.stdout)}.tmp")  # its writer was killed before the rename
    orphan.write_bytes(b'{"request_id": "half')
    writing = kept.with_name(f"{kept.name}y.{os.getpid()}.tmp")  # this process is writing it now
    writing.write_bytes(b"")
    assert spool.files() == [kept]
    assert not orphan.exists() and writing.exists()
    [claim] = list(spool.claims())
    assert [r.request_id for r in claim.records] == ["kept"]
    claim.settle([])
