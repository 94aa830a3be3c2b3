"""Memory: the platform's limit, the models' budget under it, and what a model holds once loaded (RSS).

The budget is ``OCLAW_MEMORY_BUDGET_MB`` when set (0: none); by default it is the platform's limit less a
headroom for the process itself: Lambda's ``AWS_LAMBDA_FUNCTION_MEMORY_SIZE``, else the cgroup v2
``memory.max``, else the cgroup v1 ``memory.limit_in_bytes``, else no budget. The headroom (``HEADROOM_FRACTION``
of the limit, at least ``HEADROOM_MIN_MB``) holds the interpreter, onnxruntime, the web stack and request buffers
(~56 MiB at rest under ``oclaw serve`` here) and the transient peak of a load (the file read while the session
copies it): ``benchmarks/memory_pool.py`` measured peak RSS 96-135 MiB above the budget with 40 MiB models
reloading under traffic. Where a model is large against the limit, set the budget to leave ~60 MiB plus twice it.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache

from engine.config import Settings

CGROUP_V2 = "/sys/fs/cgroup/memory.max"
CGROUP_V1 = "/sys/fs/cgroup/memory/memory.limit_in_bytes"
MIB = 1 << 20
#: Part of the platform's limit kept for the process itself, and its floor in MiB.
HEADROOM_FRACTION = 0.25
HEADROOM_MIN_MB = 128
#: cgroup v1 says "no limit" with a number near 2**63 (rounded down to a page); anything this large is none.
_NO_LIMIT = 1 << 60
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Budget:
    """The memory models may take, in bytes, where it came from, and the limit it was taken from."""

    bytes: int
    source: str
    limit_bytes: int = 0

    def as_dict(self) -> dict[str, object]:
        """For the pool's states and logs."""
        return {"budget_bytes": self.bytes, "budget_source": self.source, "limit_bytes": self.limit_bytes}


def _cgroup_limit(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read().strip()
    except OSError:
        return None
    if not text.isdigit():  # "max" (cgroup v2: none), or unreadable
        return None
    value = int(text)
    return value if 0 < value < _NO_LIMIT else None


def platform_limit(
    environ: Mapping[str, str] | None = None, *, cgroup_v2: str = CGROUP_V2, cgroup_v1: str = CGROUP_V1
) -> tuple[int, str] | None:
    """The memory this process may use, in bytes, and where that was read; None when nothing limits it."""
    env = os.environ if environ is None else environ
    lambda_mb = env.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "").strip()
    if lambda_mb.isdigit() and int(lambda_mb) > 0:
        return int(lambda_mb) * MIB, "AWS_LAMBDA_FUNCTION_MEMORY_SIZE"
    for path in (cgroup_v2, cgroup_v1):
        limit = _cgroup_limit(path)
        if limit is not None:
            return limit, path
    return None


def headroom(limit_bytes: int) -> int:
    """What the process itself keeps of a platform limit: a quarter of it, at least 128 MiB."""
    return max(int(limit_bytes * HEADROOM_FRACTION), HEADROOM_MIN_MB * MIB)


def model_budget(
    settings: Settings,
    environ: Mapping[str, str] | None = None,
    *,
    cgroup_v2: str = CGROUP_V2,
    cgroup_v1: str = CGROUP_V1,
) -> Budget | None:
    """The models' budget: ``OCLAW_MEMORY_BUDGET_MB``, else the platform's limit less ``headroom``; None for none.

    Below a limit of ~170 MiB the headroom would leave nothing: the budget is then a quarter of the limit.
    """
    if settings.memory_budget_mb == 0:
        return None
    if settings.memory_budget_mb > 0:
        return Budget(settings.memory_budget_mb * MIB, "OCLAW_MEMORY_BUDGET_MB")
    found = platform_limit(environ, cgroup_v2=cgroup_v2, cgroup_v1=cgroup_v1)
    if found is None:
        return None
    limit, source = found
    return Budget(max(limit - headroom(limit), limit // 4), source, limit)


def rss() -> int:
    """This process's resident set size in bytes (``/proc/self/statm``; 0 where there is none)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):  # pragma: no cover - not Linux
        return 0


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (musl, macOS)."""
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # pragma: no cover - not glibc
        return None
    return trim


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system, so RSS shows what is held (glibc keeps freed memory,
    https://man7.org/linux/man-pages/man3/malloc_trim.3.html); a few ms after a large model, less before."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def settled_rss() -> int:
    """RSS once freed memory is handed back: what the process holds, not what it once allocated."""
    release_free_memory()
    return rss()
