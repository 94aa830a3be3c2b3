"""Adding a version to a local repository atomically: staged in a hidden folder beside the versions (which the
repository ignores), renamed to ``<N+1>`` only once it is complete and verified."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from engine.errors import ConfigError, OclawError

STAGING_PREFIX = ".optimize-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(model_dir: Path) -> list[Path]:
    """Remove staging folders whose process is gone (it died before renaming); returns them."""
    removed = []
    for child in model_dir.glob(f"{STAGING_PREFIX}*"):
        pid = child.name[len(STAGING_PREFIX) :].split("-", 1)[0]
        if child.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def next_version(model_dir: Path) -> int:
    """One more than the highest numbered folder (1 for none)."""
    numbers = [int(c.name) for c in model_dir.iterdir() if c.name.isdigit() and c.is_dir()]
    return max(numbers, default=0) + 1


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_version(model_dir: Path, stage: Callable[[Path, int], None]) -> int:
    """Let ``stage`` write and verify version N+1 in a hidden folder, then rename it into place; returns N+1.

    When ``stage`` raises (or the process dies) no version appears: the hidden folder is removed, or, after a
    crash, ignored by the repository and removed by the next call.
    """
    if not os.access(model_dir, os.W_OK):
        raise ConfigError(f"{model_dir} is not writable: the new version is written beside the others")
    clean_stale(model_dir)
    version = next_version(model_dir)
    staged = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=model_dir))
    try:
        os.chmod(staged, model_dir.stat().st_mode & 0o777)  # as the other versions, not mkdtemp's 0700
        stage(staged, version)
        for file in staged.rglob("*"):
            if file.is_file():
                _fsync(file)
        _fsync(staged)
        target = model_dir / str(version)
        try:
            os.rename(staged, target)
        except OSError as exc:
            raise OclawError(f"{target} appeared while this version was made ({exc.strerror}); run again") from None
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    _fsync(model_dir)
    return version
