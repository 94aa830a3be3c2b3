"""ModelPool: the process-wide set of loaded models, their states and readiness."""

from __future__ import annotations

import enum
import logging
import os
import threading
from dataclasses import dataclass, field
from time import perf_counter_ns
from typing import Any

from engine.config import Settings
from engine.errors import InvalidInput, ModelLoadError, ModelNotFound, ModelNotReady, OclawError
from engine.model import LoadedModel
from engine.repository.local import LocalRepository, parse_version, select_versions, validate_name

log = logging.getLogger("oclaw.pool")


class State(enum.StrEnum):
    """Lifecycle of a model in the pool (Triton's repository-index states)."""

    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass
class Entry:
    """One model name in the pool: its state and its loaded versions."""

    name: str
    state: State = State.LOADING
    reason: str = ""
    versions: dict[int, LoadedModel] = field(default_factory=dict)
    load_ms: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)


class ModelPool:
    """Loads, warms, serves and unloads models; thread-safe."""

    def __init__(self, repository: LocalRepository, settings: Settings) -> None:
        self.repository = repository
        self.settings = settings
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        self._required: set[str] = set(settings.required_models)
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
        """(Re)load a model: every version its policy names, each warmed; raises on failure."""
        validate_name(name)
        entry = Entry(name)
        with self._lock:
            old = self._entries.get(name)
            if old is not None and old.state is State.LOADING:
                pending = old
            else:
                pending = None
                self._entries[name] = entry if old is None else Entry(name, versions=old.versions)
                entry = self._entries[name]
        if pending is not None:
            pending.done.wait()
            return self._finished(pending)
        start = perf_counter_ns()
        try:
            fetch_ms = self.repository.fetch(name)  # a remote repository's files come to the local cache first
            manifest = self.repository.manifest(name)
            loaded: dict[int, LoadedModel] = {}
            for version in self._versions_to_load(name):
                model = LoadedModel(self.repository.files(name, version), manifest, self.settings)
                model.fetch_ms = fetch_ms
                if self.warm_at_load:
                    model.warm_up()
                loaded[version] = model
        except OclawError as exc:
            self._settle(entry, State.UNAVAILABLE, exc.message, {}, start)
            if isinstance(exc, ModelNotFound | InvalidInput | ModelLoadError):
                raise
            raise ModelLoadError(f"model {name!r} failed to load: {exc.message}") from exc
        except Exception as exc:
            self._settle(entry, State.UNAVAILABLE, f"{type(exc).__name__}: {exc}", {}, start)
            raise ModelLoadError(f"model {name!r} failed to load: {exc}") from exc
        old_versions = entry.versions
        self._settle(entry, State.READY, "", loaded, start)
        for model in old_versions.values():
            model.close()
        log.info("model %s ready: versions %s in %.1f ms", name, sorted(loaded), entry.load_ms)
        return entry

    def _settle(self, entry: Entry, state: State, reason: str, versions: dict[int, LoadedModel], start: int) -> None:
        with self._lock:
            entry.state, entry.reason, entry.versions = state, reason, versions
            entry.load_ms = (perf_counter_ns() - start) / 1e6
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
            versions, entry.versions = entry.versions, {}
            entry.state, entry.reason = State.UNAVAILABLE, "unloaded"
        for model in versions.values():
            model.close()

    # -- lookup -----------------------------------------------------------------------------------

    def get(self, name: str, version: str | int | None = None) -> LoadedModel:
        """The loaded model for a request; 404 if unknown, 503 if not ready."""
        validate_name(name)
        wanted = parse_version(version)
        entry = self._entries.get(name)
        if entry is None:
            self.repository.versions(name)  # 404 when not on disk
            raise ModelNotReady(f"model {name!r} is not loaded (load it through /v2/repository/models/{name}/load)")
        if entry.state is State.LOADING:
            entry.done.wait(timeout=600)
        if entry.state is not State.READY:
            raise ModelNotReady(f"model {name!r} is not ready: {entry.reason or entry.state.value}")
        versions = entry.versions
        if wanted is None:
            return versions[max(versions)]
        model = versions.get(wanted)
        if model is None:
            raise ModelNotFound(f"model {name!r} has no loaded version {wanted}; loaded: {sorted(versions)}")
        return model

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
        """Like get() but never waits for a model that is still loading."""
        entry = self._entries.get(validate_name(name))
        if entry is not None and entry.state is State.LOADING:
            raise ModelNotReady(f"model {name!r} is loading")
        return self.get(name, version)

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
        """Per-model state, reason and load time (for logs and health detail); failed warm-ups by version."""
        states: dict[str, dict[str, Any]] = {}
        for n, e in list(self._entries.items()):
            states[n] = {
                "state": e.state.value,
                "reason": e.reason,
                "load_ms": round(e.load_ms, 1),
                "versions": sorted(e.versions),
            }
            failed = {str(v): m.warmup_error for v, m in sorted(e.versions.items()) if m.warmup_error is not None}
            if failed:
                states[n]["warmup_errors"] = failed
        return states

    def close(self) -> None:
        """Release every model."""
        for model in self.loaded():
            model.close()
