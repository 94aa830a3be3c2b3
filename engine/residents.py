"""What the model pool holds, and how it keeps that within the memory budget.

Each model name has an ``Entry`` (its ``State`` and reason), and a loaded model is a ``Resident`` (its versions,
the memory they hold, the leases on them). ``MemoryBudget`` is the half of ``ModelPool`` that measures loads,
reserves room for one under ``OCLAW_MEMORY_BUDGET_MB`` by unloading the least recently used others, keeps a
model unloaded while in use until its last lease is released, and unloads models idle for
``OCLAW_IDLE_UNLOAD_S`` (one thread that sleeps until the next is due).
"""

from __future__ import annotations

import enum
import logging
import math
import threading
from dataclasses import dataclass, field
from time import monotonic
from typing import Any

from engine import memory
from engine.config import Settings
from engine.model import LoadedModel
from engine.repository.local import ModelFiles

log = logging.getLogger("oclaw.pool")

#: Why the pool unloads a model by itself, as its state's reason says.
EVICTION_REASONS = {"memory": "to make room under OCLAW_MEMORY_BUDGET_MB", "idle": "idle for OCLAW_IDLE_UNLOAD_S"}


class State(enum.StrEnum):
    """Lifecycle of a model in the pool (Triton's repository-index states)."""

    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(eq=False)
class Resident:
    """One load of a model: its versions, the memory they hold, and the requests holding them now."""

    name: str
    versions: dict[int, LoadedModel]
    memory_bytes: int = 0
    leases: int = 0

    def close(self) -> None:
        """Close every version (their sessions go with the last reference)."""
        for model in self.versions.values():
            model.close()


@dataclass(eq=False)
class Entry:
    """One model name in the pool: its state, its loaded versions and how they are used."""

    name: str
    state: State = State.LOADING
    reason: str = ""
    resident: Resident | None = None
    load_ms: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)
    #: Why the pool unloaded the model by itself (a key of EVICTION_REASONS): the next request loads it again.
    evicted: str = ""
    #: ``monotonic()`` when it was loaded or a lease on it was last released.
    last_used: float = 0.0
    #: Requests waiting for its load: a model just loaded is kept, like one in use, until they hold it.
    waiting: int = 0
    loads: int = 0
    evictions: int = 0
    #: Its last load went past the budget (nothing more could be unloaded to make room).
    over_budget: bool = False

    @property
    def versions(self) -> dict[int, LoadedModel]:
        """The loaded versions (none while unloaded)."""
        return self.resident.versions if self.resident is not None else {}


class MemoryBudget:
    """ModelPool's memory accounting; its attributes are set by ``ModelPool.__init__``, under ``_lock``."""

    settings: Settings
    budget: memory.Budget | None
    evictions: dict[str, int]
    peak_bytes: int
    _entries: dict[str, Entry]
    _lock: threading.Lock
    _freed: threading.Condition
    _room_wanted: int
    _idle: threading.Condition
    _idle_thread: threading.Thread | None
    _idle_until: float
    _closed: bool
    _required: set[str]
    _draining: list[Resident]
    _reserved: dict[str, int]
    _sizes: dict[tuple[str, int], tuple[int, int]]

    def _estimate(self, files: ModelFiles) -> int:
        """What a version will hold: what it held when last loaded, else its file's size (onnxruntime copies the
        weights)."""
        size = files.path.stat().st_size
        known = self._sizes.get((files.name, files.version))
        return known[1] if known is not None and known[0] == size else size

    def _measured(self, files: ModelFiles, rss_delta: int) -> int:
        """A version's memory: the RSS its load added (freed memory handed back before and after, so neither
        garbage nor reused pages skew it), at least its file's size."""
        size = files.path.stat().st_size
        held = max(rss_delta, size)
        self._sizes[(files.name, files.version)] = (size, held)
        return held

    # -- room under the budget -----------------------------------------------------------------------------------

    def _used_locked(self) -> int:
        """Bytes held by loaded models, by models unloaded while in use, and for loads in progress."""
        loaded = sum(e.resident.memory_bytes for e in self._entries.values() if e.resident is not None)
        return loaded + sum(r.memory_bytes for r in self._draining) + sum(self._reserved.values())

    def _evictable_locked(self, exclude: str) -> list[Entry]:
        """Models the pool may unload, least recently used first, those not in use before those in use."""
        found = [
            e
            for e in self._entries.values()
            if e.resident is not None and e.state is State.READY and e.name != exclude and e.name not in self._required
        ]
        return sorted(found, key=lambda e: (e.resident is not None and e.resident.leases + e.waiting > 0, e.last_used))

    def _reserve(self, entry: Entry, size: int) -> None:
        """Hold ``size`` bytes for the model ``entry`` is loading, unloading the least recently used others to make
        room under the budget; one unloaded while in use is waited for (up to OCLAW_DRAIN_TIMEOUT_S).

        When nothing more can be unloaded the model loads anyway, past the budget, with a warning: the budget
        keeps a headroom below the platform's limit, and refusing would leave the model unservable.
        """
        name = entry.name
        budget = self.budget
        deadline = monotonic() + self.settings.drain_timeout_s
        with self._lock:
            self._reserved.pop(name, None)  # replaced: an estimate by the measurement
            while budget is not None:
                used = self._used_locked()
                if used + size <= budget.bytes:
                    break
                candidates = self._evictable_locked(name)
                idle = [e for e in candidates if e.resident is not None and e.resident.leases + e.waiting == 0]
                leased = [e for e in candidates if e.resident is not None and e.resident.leases > 0]
                draining = sum(r.memory_bytes for r in self._draining)
                if idle or (leased and used - draining + size > budget.bytes):
                    self._evict_locked((idle or leased)[0], "memory", for_model=name)
                    continue
                left = deadline - monotonic()
                if (self._draining or candidates) and left > 0:
                    # a model unloaded in use frees its memory at its last release; one just loaded is left to the
                    # requests waiting for it until they hold it (unloading it under them would load it again)
                    self._room_wanted += 1
                    try:
                        self._freed.wait(left)
                    finally:
                        self._room_wanted -= 1
                    continue
                if not entry.over_budget:
                    entry.over_budget = True
                    self._warn_over_budget(name, size, used, budget.bytes, timed_out=bool(self._draining or candidates))
                break
            self._reserved[name] = size
            self.peak_bytes = max(self.peak_bytes, self._used_locked())

    def _warn_over_budget(self, name: str, size: int, used: int, budget: int, *, timed_out: bool) -> None:
        why = (
            f"requests on the other models went on past OCLAW_DRAIN_TIMEOUT_S={self.settings.drain_timeout_s}"
            if timed_out
            else "only required models (OCLAW_REQUIRED_MODELS) are left to unload"
        )
        log.warning(
            "model %s (%.1f MiB) loads past the memory budget (%.1f of %.1f MiB in use): %s",
            name,
            size / memory.MIB,
            used / memory.MIB,
            budget / memory.MIB,
            why,
            extra={
                "oclaw": {
                    "event": "model_over_budget",
                    "model": name,
                    "memory_bytes": size,
                    "used_bytes": used,
                    "budget_bytes": budget,
                }
            },
        )

    def _evict_locked(self, entry: Entry, why: str, *, for_model: str = "") -> None:
        """Unload a model the pool chose: no new leases; closed now, or at its last lease's release."""
        resident = entry.resident
        assert resident is not None
        entry.resident = None
        entry.state, entry.evicted = State.UNAVAILABLE, why
        entry.reason = f"unloaded {EVICTION_REASONS[why]}; the next request loads it again"
        entry.evictions += 1
        self.evictions[why] += 1
        fields: dict[str, Any] = {
            "event": "model_evicted",
            "model": entry.name,
            "reason": why,
            "memory_bytes": resident.memory_bytes,
            "in_use": resident.leases,
            "idle_s": round(monotonic() - entry.last_used, 3),
        }
        if for_model:
            fields["for_model"] = for_model
        if self.budget is not None:
            fields["used_bytes"], fields["budget_bytes"] = self._used_locked(), self.budget.bytes
        log.info("model %s unloaded (%s)", entry.name, EVICTION_REASONS[why], extra={"oclaw": fields})
        self._retire_locked(resident)

    def _retire_locked(self, resident: Resident | None) -> None:
        """A replaced or unloaded load of a model: closed now, or kept until its last lease is released."""
        if resident is None:
            return
        if resident.leases > 0:
            self._draining.append(resident)
        else:
            resident.close()

    # -- idle unload ------------------------------------------------------------------------------

    def _wake_idle_locked(self) -> None:
        """Start the idle-unload thread, or wake it when it waits for nothing (a model became idle)."""
        if self.settings.idle_unload_s <= 0 or self._closed:
            return
        if self._idle_thread is None:
            self._idle_thread = threading.Thread(target=self._unload_idle, name="oclaw-idle-unload", daemon=True)
            self._idle_thread.start()
        elif self._idle_until == math.inf:
            self._idle.notify()

    def _unload_idle(self) -> None:
        """Unload each model (not a required one) idle for OCLAW_IDLE_UNLOAD_S: sleep until the next is due."""
        idle_s = self.settings.idle_unload_s
        while True:
            with self._lock:
                if self._closed:
                    return
                now, due, unloaded = monotonic(), math.inf, False
                for entry in list(self._entries.values()):
                    resident = entry.resident
                    if (
                        resident is None
                        or entry.state is not State.READY
                        or resident.leases + entry.waiting > 0
                        or entry.name in self._required
                    ):
                        continue
                    if now - entry.last_used >= idle_s:
                        self._evict_locked(entry, "idle")
                        unloaded = True
                    else:
                        due = min(due, entry.last_used + idle_s)
                if not unloaded:
                    self._idle_until = due
                    self._idle.wait(None if due == math.inf else due - now)
                    self._idle_until = 0.0
            if unloaded:
                memory.release_free_memory()

    def memory(self) -> dict[str, Any]:
        """The pool's memory: budget, what is held now and at most, unloads by reason, the process's RSS."""
        with self._lock:
            figures: dict[str, Any] = {
                "used_bytes": self._used_locked(),
                "peak_bytes": self.peak_bytes,
                "draining": sorted(r.name for r in self._draining),
                "evictions": dict(self.evictions),
                "loads": sum(e.loads for e in self._entries.values()),
            }
        budget = self.budget.as_dict() if self.budget is not None else {"budget_bytes": None}
        return budget | figures | {"rss_bytes": memory.rss()}
