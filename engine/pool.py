"""ModelPool: the process-wide set of loaded models, their states and readiness, within a memory budget.

Requests hold their model through a ``Lease``; a model the pool unloads (to make room under the budget, or idle
for ``OCLAW_IDLE_UNLOAD_S``) stops taking new leases at once and is closed when its last lease is released. The
next request for it loads it again. Required models (``OCLAW_REQUIRED_MODELS``, else the preloaded ones) are never
unloaded by the pool.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from time import monotonic, perf_counter_ns
from typing import Any

from engine import memory
from engine.config import Settings
from engine.errors import InvalidInput, ModelLoadError, ModelNotFound, ModelNotReady, OclawError
from engine.model import LoadedModel
from engine.repository.local import LocalRepository, ModelFiles, parse_version, select_versions, validate_name
from engine.repository.manifest import Manifest

log = logging.getLogger("oclaw.pool")

#: Why the pool unloads a model by itself, as its state's reason says.
EVICTION_REASONS = {"memory": "to make room under OCLAW_MEMORY_BUDGET_MB", "idle": "idle for OCLAW_IDLE_UNLOAD_S"}
#: Loads a request may wait through when each one's model is unloaded again before the request takes it.
_LOAD_ATTEMPTS = 8


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


class Lease:
    """A request's hold on one loaded model version; the pool frees a model only once every lease is released."""

    __slots__ = ("_pool", "_resident", "loaded", "model")

    def __init__(self, pool: ModelPool, resident: Resident, model: LoadedModel, loaded: bool) -> None:
        self._pool: ModelPool | None = pool
        self._resident: Resident | None = resident
        self.model = model
        #: The request waited for the model to load (a cold start of the model, which its metering record shows).
        self.loaded = loaded

    def release(self) -> None:
        """Give the model back (again: nothing)."""
        pool, resident = self._pool, self._resident
        if pool is not None and resident is not None:
            self._pool = self._resident = None
            pool._release(resident)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ModelPool:
    """Loads, warms, serves and unloads models within a memory budget; thread-safe."""

    def __init__(self, repository: LocalRepository, settings: Settings) -> None:
        self.repository = repository
        self.settings = settings
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        #: Signalled when a model unloaded while in use is freed, or one in use is released: a load making room
        #: waits for it (``_room_wanted`` loads do now).
        self._freed = threading.Condition(self._lock)
        self._room_wanted = 0
        #: Wakes the idle-unload thread.
        self._idle = threading.Condition(self._lock)
        self._idle_thread: threading.Thread | None = None
        #: When the idle-unload thread wakes next (inf: only when told).
        self._idle_until = math.inf
        self._closed = False
        #: One load at a time, so the RSS a load adds is its own.
        self._load_lock = threading.Lock()
        self._required: set[str] = set(settings.required_models)
        #: Models unloaded while in use: their memory is held until their last lease is released.
        self._draining: list[Resident] = []
        #: Bytes held for loads in progress, by model.
        self._reserved: dict[str, int] = {}
        #: (model, version) -> (file bytes, the memory it held when last loaded).
        self._sizes: dict[tuple[str, int], tuple[int, int]] = {}
        #: The memory models may take (None: no budget); see engine.memory.
        self.budget = memory.model_budget(settings)
        #: Models unloaded by the pool, by reason.
        self.evictions = dict.fromkeys(EVICTION_REASONS, 0)
        #: The most memory the pool has accounted for at once (loaded, in use after unloading, being loaded).
        self.peak_bytes = 0
        #: Models are warmed up as they load (OCLAW_WARMUP; "auto" skips it on an on-demand Lambda instance).
        self.warm_at_load = settings.warms_at_load(os.environ.get("AWS_LAMBDA_INITIALIZATION_TYPE"))

    # -- loading ----------------------------------------------------------------------------------

    def preload(self) -> None:
        """Load every model named by OCLAW_PRELOAD; a failure is recorded, not raised."""
        names = self.repository.models() if self.settings.preload_all else list(self.settings.preload)
        if not self.settings.required_models:
            self._required = set(names)
        for name in names:
            try:
                self.load(name)
            except OclawError as exc:
                log.error("model %s failed to load: %s", name, exc.message)

    def _versions_to_load(self, name: str) -> list[int]:
        return select_versions(name, self.repository.versions(name), self.repository.manifest(name).versions)

    def load(self, name: str) -> Entry:
        """(Re)load a model: every version its policy names, each warmed; raises on failure.

        A load already in progress is joined, not repeated.
        """
        validate_name(name)
        with self._lock:
            entry = self._entries.get(name)
            pending = entry.done if entry is not None and entry.state is State.LOADING else None
            if entry is None:
                entry = self._entries[name] = Entry(name)
            elif pending is None:
                entry.state, entry.reason, entry.evicted, entry.done = State.LOADING, "", "", threading.Event()
                entry.over_budget = False
        if pending is not None:
            pending.wait()
            return self._finished(entry)
        start = perf_counter_ns()
        try:
            fetch_ms = self.repository.fetch(name)  # a remote repository's files come to the local cache first
            manifest = self.repository.manifest(name)
            files = [self.repository.files(name, version) for version in self._versions_to_load(name)]
            resident = self._open(entry, files, manifest, fetch_ms)
        except OclawError as exc:
            self._settle(entry, State.UNAVAILABLE, exc.message, None, start)
            if isinstance(exc, ModelNotFound | InvalidInput | ModelLoadError):
                raise
            raise ModelLoadError(f"model {name!r} failed to load: {exc.message}") from exc
        except Exception as exc:
            self._settle(entry, State.UNAVAILABLE, f"{type(exc).__name__}: {exc}", None, start)
            raise ModelLoadError(f"model {name!r} failed to load: {exc}") from exc
        self._settle(entry, State.READY, "", resident, start)
        log.info(
            "model %s ready: versions %s in %.1f ms, %.1f MiB",
            name,
            sorted(resident.versions),
            entry.load_ms,
            resident.memory_bytes / memory.MIB,
            extra={
                "oclaw": {
                    "event": "model_loaded",
                    "model": name,
                    "versions": sorted(resident.versions),
                    "load_ms": round(entry.load_ms, 1),
                    "memory_bytes": resident.memory_bytes,
                    "loads": entry.loads,
                }
            },
        )
        return entry

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

    def _open(self, entry: Entry, files: list[ModelFiles], manifest: Manifest, fetch_ms: float) -> Resident:
        """Sessions for the versions, each warmed and measured, with room made for them under the budget."""
        versions: dict[int, LoadedModel] = {}
        with self._load_lock:
            try:
                estimate = sum(map(self._estimate, files))
                self._reserve(entry, estimate)
                for version_files in files:
                    before = memory.settled_rss()
                    model = LoadedModel(version_files, manifest, self.settings)
                    versions[version_files.version] = model
                    model.fetch_ms = fetch_ms
                    if self.warm_at_load:
                        model.warm_up()
                    model.memory_bytes = self._measured(version_files, memory.settled_rss() - before)
                measured = sum(m.memory_bytes for m in versions.values())
                if measured > estimate:
                    self._reserve(entry, measured)
            except BaseException:
                with self._lock:
                    self._reserved.pop(entry.name, None)
                    self._freed.notify_all()
                for model in versions.values():
                    model.close()
                raise
        return Resident(entry.name, versions, measured)

    def _settle(self, entry: Entry, state: State, reason: str, resident: Resident | None, start: int) -> None:
        with self._lock:
            self._reserved.pop(entry.name, None)
            old, entry.resident = entry.resident, resident
            entry.state, entry.reason = state, reason
            entry.load_ms = (perf_counter_ns() - start) / 1e6
            entry.last_used = monotonic()
            if resident is not None:
                entry.loads += 1
            self._retire_locked(old)
            self._freed.notify_all()
            self._wake_idle_locked()
        entry.done.set()

    @staticmethod
    def _finished(entry: Entry) -> Entry:
        if entry.state is not State.READY:
            raise ModelLoadError(f"model {entry.name!r} failed to load: {entry.reason}")
        return entry

    def unload(self, name: str) -> None:
        """Mark a model unavailable; in-flight requests finish with the session they hold."""
        validate_name(name)
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise ModelNotFound(f"model {name!r} is not loaded")
            old, entry.resident = entry.resident, None
            entry.state, entry.reason, entry.evicted = State.UNAVAILABLE, "unloaded", ""
            self._retire_locked(old)
            self._freed.notify_all()

    # -- memory -----------------------------------------------------------------------------------

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

    def _release(self, resident: Resident) -> None:
        with self._lock:
            resident.leases -= 1
            entry = self._entries.get(resident.name)
            if entry is not None and entry.resident is resident:
                entry.last_used = monotonic()
                if resident.leases == 0:
                    if self._room_wanted:
                        self._freed.notify_all()  # a load waits for a model to be unused
                    if self._idle_until == math.inf:
                        self._wake_idle_locked()
            elif resident.leases == 0 and resident in self._draining:
                self._draining.remove(resident)
                resident.close()
                self._freed.notify_all()
                fields = {"event": "model_freed", "model": resident.name, "memory_bytes": resident.memory_bytes}
                log.debug("model %s freed", resident.name, extra={"oclaw": fields})

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

    # -- lookup -----------------------------------------------------------------------------------

    def lease(self, name: str, version: str | int | None = None, *, wait: bool = True) -> Lease:
        """Hold a model version for a request (404 unknown, 503 not ready); release it when done.

        ``wait``: wait for a load in progress, and load again a model the pool unloaded (once, however many
        requests ask at the same time); else 503 at once for either.
        """
        entry = self._entries.get(name)
        if entry is None:
            validate_name(name)  # a name in the pool was checked when it came in
        wanted = parse_version(version)
        with self._lock:
            taken = None if entry is None else self._take_locked(entry, wanted, loaded=False)
        if taken is not None:
            return taken
        if entry is not None and wait:
            return self._lease_loaded(entry, wanted)
        raise self._not_ready(name, entry)

    @staticmethod
    def _version_locked(entry: Entry, wanted: int | None) -> LoadedModel | None:
        """The version a request asks for when the model is ready (404 for a version not loaded), else None."""
        versions = entry.versions
        if entry.state is not State.READY or not versions:
            return None
        model = versions[max(versions)] if wanted is None else versions.get(wanted)
        if model is None:
            raise ModelNotFound(f"model {entry.name!r} has no loaded version {wanted}; loaded: {sorted(versions)}")
        return model

    def _take_locked(self, entry: Entry, wanted: int | None, *, loaded: bool) -> Lease | None:
        model = self._version_locked(entry, wanted)
        if model is None or entry.resident is None:
            return None
        entry.resident.leases += 1
        return Lease(self, entry.resident, model, loaded)

    def _not_ready(self, name: str, entry: Entry | None) -> ModelNotReady:
        """Why a model cannot serve now (ModelNotFound raised for one that is not on disk either)."""
        if entry is None:
            self.repository.versions(name)  # 404 when not on disk
            return ModelNotReady(f"model {name!r} is not loaded (load it through /v2/repository/models/{name}/load)")
        if entry.state is State.LOADING:
            return ModelNotReady(f"model {name!r} is loading")
        return ModelNotReady(f"model {name!r} is not ready: {entry.reason or entry.state.value}")

    def _lease_loaded(self, entry: Entry, wanted: int | None) -> Lease:
        """A lease once the model is loaded: waiting for its load, or loading it again after the pool unloaded it."""
        waiting = False
        try:
            for _ in range(_LOAD_ATTEMPTS):
                with self._lock:
                    if waiting:
                        entry.waiting, waiting = entry.waiting - 1, False
                        self._freed.notify_all()
                    taken = self._take_locked(entry, wanted, loaded=True)
                    if taken is not None:
                        return taken
                    if entry.state is not State.LOADING and not entry.evicted:
                        raise ModelNotReady(f"model {entry.name!r} is not ready: {entry.reason or entry.state.value}")
                    pending = entry.done if entry.state is State.LOADING else None
                    entry.waiting, waiting = entry.waiting + 1, True
                if pending is not None:
                    pending.wait(timeout=600)
                    continue
                try:
                    self.load(entry.name)  # joined by the requests that ask meanwhile
                except ModelNotFound:
                    raise
                except OclawError as exc:
                    raise ModelNotReady(f"model {entry.name!r} is not ready: {exc.message}") from exc
        finally:
            if waiting:
                with self._lock:
                    entry.waiting -= 1
                    self._freed.notify_all()
        raise ModelNotReady(
            f"model {entry.name!r} was unloaded again before this request could run on it: the models in use do "
            "not fit OCLAW_MEMORY_BUDGET_MB"
        )

    def get(self, name: str, version: str | int | None = None) -> LoadedModel:
        """The loaded model for a caller that holds no lease (a model the pool unloads may then be closed under it:
        its session stays usable until dropped, but its memory is no longer counted); 404 unknown, 503 not ready."""
        lease = self.lease(name, version)
        lease.release()
        return lease.model

    def versions(self, name: str) -> list[int]:
        """Loaded versions of a model, ascending."""
        entry = self._entries.get(name)
        return sorted(entry.versions) if entry else []

    def is_ready(self, name: str, version: str | int | None = None) -> bool:
        """True when the model (version) can serve."""
        try:
            self.get_nowait(name, version)
        except OclawError:
            return False
        return True

    def get_nowait(self, name: str, version: str | int | None = None) -> LoadedModel:
        """Like get() but never waits for a model that is loading, nor loads one the pool unloaded (and, for
        metadata and readiness, does not count as a use of the model)."""
        entry = self._entries.get(name)
        if entry is None:
            validate_name(name)
        wanted = parse_version(version)
        with self._lock:
            model = None if entry is None else self._version_locked(entry, wanted)
        if model is not None:
            return model
        raise self._not_ready(name, entry)

    def ready(self) -> bool:
        """Server readiness: every required model is READY."""
        return all((e := self._entries.get(n)) is not None and e.state is State.READY for n in self._required)

    def loaded(self) -> list[LoadedModel]:
        """Every loaded model version."""
        return [m for e in list(self._entries.values()) for m in e.versions.values()]

    def index(self) -> list[dict[str, Any]]:
        """Triton repository index: every model on disk or in the pool, with state and reason."""
        rows = []
        names = sorted(set(self.repository.models()) | set(self._entries))
        for name in names:
            entry = self._entries.get(name)
            if entry is None:
                rows.append({"name": name, "state": "", "reason": ""})
            elif entry.versions:
                for v in sorted(entry.versions):
                    rows.append({"name": name, "version": str(v), "state": entry.state.value, "reason": entry.reason})
            else:
                rows.append({"name": name, "state": entry.state.value, "reason": entry.reason})
        return rows

    def states(self) -> dict[str, dict[str, Any]]:
        """Per-model state, reason, load time, memory held, loads and unloads by the pool (for logs and health
        detail); failed warm-ups by version."""
        states: dict[str, dict[str, Any]] = {}
        for n, e in list(self._entries.items()):
            resident = e.resident
            states[n] = {
                "state": e.state.value,
                "reason": e.reason,
                "load_ms": round(e.load_ms, 1),
                "versions": sorted(e.versions),
                "memory_bytes": resident.memory_bytes if resident is not None else 0,
                "in_use": resident.leases if resident is not None else 0,
                "loads": e.loads,
                "evictions": e.evictions,
            }
            if e.evicted:
                states[n]["evicted"] = e.evicted
            if e.over_budget:
                states[n]["over_budget"] = True
            failed = {str(v): m.warmup_error for v, m in sorted(e.versions.items()) if m.warmup_error is not None}
            if failed:
                states[n]["warmup_errors"] = failed
            if e.versions:  # where each version runs, and on how many sessions
                states[n]["devices"] = {str(v): m.device for v, m in sorted(e.versions.items())}
                states[n]["instances"] = {str(v): len(m.sessions) for v, m in sorted(e.versions.items())}
        return states

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

    # -- metrics ----------------------------------------------------------------------------------

    def describe(self) -> list[Any]:
        """Nothing: a Prometheus registry must not collect at registration."""
        return []

    def collect(self) -> Iterator[Any]:
        """The pool's Prometheus metrics (a custom collector: ``registry.register(pool)``)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        figures = self.memory()
        evictions = CounterMetricFamily(
            "oclaw_model_evictions", "Models unloaded by the pool (memory budget, idle)", labels=("reason",)
        )
        for reason, count in figures["evictions"].items():
            evictions.add_metric([reason], count)
        yield evictions
        loads = CounterMetricFamily("oclaw_model_loads", "Model loads (reloads included)", labels=("model",))
        held = GaugeMetricFamily("oclaw_model_memory_bytes", "Memory a loaded model holds", labels=("model",))
        for name, state in self.states().items():
            loads.add_metric([name], state["loads"])
            held.add_metric([name], state["memory_bytes"])
        yield from (loads, held)
        instances = GaugeMetricFamily(
            "oclaw_model_instances", "Sessions of a loaded model version", labels=("model", "version", "device")
        )
        for model in self.loaded():
            instances.add_metric([model.name, str(model.version), model.device], len(model.sessions))
        yield instances
        yield GaugeMetricFamily("oclaw_models_memory_bytes", "Memory the models hold", value=figures["used_bytes"])
        if figures["budget_bytes"] is not None:
            yield GaugeMetricFamily(
                "oclaw_models_memory_budget_bytes", "OCLAW_MEMORY_BUDGET_MB in bytes", value=figures["budget_bytes"]
            )

    def close(self) -> None:
        """Release every model."""
        with self._lock:
            self._closed = True
            residents = [e.resident for e in self._entries.values() if e.resident is not None] + self._draining
            self._idle.notify()
        for resident in residents:
            resident.close()
