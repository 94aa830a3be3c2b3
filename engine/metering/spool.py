"""What a sink could not take, kept on disk until it does: one file per spooled batch, claimed under a lock.

A sink's spool files are ``{base}.{index}.{unique}``, each written whole (a temporary file, then a rename), so a
reader never sees half of one. A flush claims a file by an exclusive ``flock``: a process that dies while it
re-sends releases its claims with its last breath (the kernel does), so the next flush, here or in another
process, takes the files again; a live one's claims are left alone. A file is deleted (or cut down to what the
sink refused) only once the sink has taken its records: a crash loses nothing.
"""

from __future__ import annotations

import fcntl
import glob
import itertools
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import orjson

from engine.metering.batch import json_lines
from engine.metering.records import MeteringRecord

_names = itertools.count()


class Claim:
    """One spool file this process holds (locked) and its records, until ``settle``."""

    def __init__(self, path: Path, handle: IO[bytes], records: list[MeteringRecord]) -> None:
        self.path = path
        self.records = records
        self._handle = handle

    def settle(self, refused: Sequence[MeteringRecord]) -> None:
        """The sink took all but ``refused`` (some of ``records``): delete the file or keep only those; unlock it."""
        try:
            if not refused:
                self.path.unlink(missing_ok=True)
            elif len(refused) < len(self.records):
                _write(self.path, refused)  # replaces the file at once: the taken records are never sent again
        finally:
            self._handle.close()


class Spool:
    """The spool files of one sink; their lines are ``record_type`` records (the audit log's too)."""

    def __init__(self, base: str, index: int, record_type: Any = MeteringRecord) -> None:
        self.prefix = f"{base}.{index}."
        self.record_type = record_type

    def put(self, records: Sequence[MeteringRecord]) -> None:
        """Keep ``records`` in a new spool file."""
        _write(Path(f"{self.prefix}{time.time_ns():020d}-{os.getpid()}-{next(_names)}"), records)

    def files(self) -> list[Path]:
        """The spool files, oldest first (claimed or not). A temporary file whose writer died before renaming it is
        removed: what it held is still in the file it was to replace, or died with that process's queue."""
        found = glob.glob(glob.escape(self.prefix) + "*")
        for name in found:
            if name.endswith(".tmp") and not _writer_alive(name):
                Path(name).unlink(missing_ok=True)
        return [Path(name) for name in sorted(found) if not name.endswith(".tmp")]

    def claims(self) -> Iterator[Claim]:
        """Each spool file no other process holds, locked as it is yielded (the caller settles it)."""
        for path in self.files():
            try:
                handle = path.open("rb")
            except FileNotFoundError:  # settled by another process since it was listed
                continue
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.fstat(handle.fileno()).st_ino != os.stat(path).st_ino:
                    raise FileNotFoundError(path)  # settled (deleted or cut down) between the open and the lock
                lines = handle.read().splitlines()
                records = [self.record_type(**orjson.loads(line)) for line in lines if line.strip()]
            except OSError:  # held by a live process (BlockingIOError), or gone
                handle.close()
                continue
            yield Claim(path, handle, records)


def _write(path: Path, records: Sequence[MeteringRecord]) -> None:
    """Write ``records`` to ``path`` whole: to a temporary file first, renamed over ``path`` once complete."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with temporary.open("wb") as fh:
        fh.write(json_lines(records))
    temporary.replace(path)


def _writer_alive(temporary: str) -> bool:
    """Whether the process that is writing ``temporary`` (``<file>.<pid>.tmp``) still runs."""
    try:
        pid = int(temporary.rsplit(".", 2)[-2])
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (ValueError, IndexError, PermissionError):  # not ours to judge: leave it
        return True
    return True
