"""ModelPool: the process-wide set of loaded models, their states and readiness, within a memory budget.

Requests hold their model through a ``Lease``; a model the pool unloads (to make room under the budget, or idle
for ``OCLAW_IDLE_UNLOAD_S``) stops taking new leases at once and is closed when its last lease is released. The
next request for it loads it again. Required models (``OCLAW_REQUIRED_MODELS``, else the preloaded ones) are never
unloaded by the pool.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from time import monotonic, perf_counter_ns
from typing import Any

from engine import memory
from engine.config import Settings
from engine.errors import InvalidInput, ModelLoadError, ModelNotFound, ModelNotReady, OclawError
from engine.model import LoadedModel
from engine.repository.local import LocalRepository, ModelFiles, parse_version, select_versions, validate_name
from engine.repository.manifest import Manifest
from engine.residents import EVICTION_REASONS, Entry, MemoryBudget, Resident, State

__all__ = ["EVICTION_REASONS", "Lease", "ModelPool", "State"]

log = logging.getLogger("oclaw.pool")

#: Loads a request may wait through when each one's model is unloaded again before the request takes it.
_LOAD_ATTEMPTS = 8


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


class ModelPool(MemoryBudget):
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
            if isinstance(exc, ModelNotFound) and name not in self._required:
                # a name the repository lacks leaves no entry (a 404 later, not a 503), unless the settings name it
                # (preloaded, required): its state then says why the server is not ready
                with self._lock:
                    if self._entries.get(name) is entry and entry.state is State.UNAVAILABLE:
                        del self._entries[name]
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

    def close(self) -> None:
        """Release every model."""
        with self._lock:
            self._closed = True
            residents = [e.resident for e in self._entries.values() if e.resident is not None] + self._draining
            self._idle.notify()
        for resident in residents:
            resident.close()
