"""The process-wide Runtime: settings, repository and pool, built once."""

from __future__ import annotations

import itertools
import logging
import os
import threading
from functools import cached_property
from time import perf_counter_ns
from typing import TYPE_CHECKING

from engine.config import Settings, get_settings
from engine.errors import OclawError
from engine.pool import ModelPool
from engine.repository import open_repository
from engine.repository.local import FetchReport

if TYPE_CHECKING:  # pragma: no cover
    from engine.audit import Auditor
    from engine.auth import KeyRing
    from engine.metering.meter import Meter

log = logging.getLogger("oclaw.runtime")


class Runtime:
    """Everything a process serves with; one per process (see get_runtime)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.instance_id = os.urandom(8).hex()
        self.repository = open_repository(
            settings.model_repository, cache=settings.model_cache, concurrency=settings.fetch_concurrency
        )
        self.pool = ModelPool(self.repository, settings)
        self.preload_ms: float | None = None
        #: What fetching a remote repository into the local cache cost at start-up (zeros for a local one).
        self.fetch = FetchReport()
        self._preload_error: OclawError | None = None
        self._preload_thread: threading.Thread | None = None
        self._preload_lock = threading.Lock()
        #: The first request this process serves paid its cold start.
        self.cold = True
        self._request_numbers = itertools.count(1)

    def next_request_id(self) -> str:
        """A request id unique across instances: this instance's id and a counter."""
        return f"{self.instance_id}-{next(self._request_numbers)}"

    @cached_property
    def meter(self) -> Meter:
        """Per-request metering for this process (sinks from OCLAW_METERING_SINKS)."""
        from engine.metering.meter import Meter

        return Meter(self.settings, self.instance_id)

    @cached_property
    def audit(self) -> Auditor | None:
        """The audit log of this process (sinks from OCLAW_AUDIT_SINKS); None when it is off (nothing imported)."""
        if not self.settings.audit_sink_specs:
            return None
        from engine.audit import Auditor

        return Auditor(self.settings, self.instance_id)

    @cached_property
    def keys(self) -> KeyRing | None:
        """The API keys every front door checks requests against, one KeyRing (its rate limits, one fetch); None:
        no access control (OCLAW_AUTH=none, or OCLAW_API_KEYS unset), and engine.auth not even imported."""
        settings = self.settings
        if settings.auth == "none" or (settings.auth == "auto" and not settings.api_keys):
            return None
        from engine.auth import keys_for

        return keys_for(settings.api_keys, settings.auth, settings.api_keys_ttl_s)

    @property
    def fetch_ms(self) -> float:
        """Milliseconds the start-up fetch of a remote repository took (0 for a local repository)."""
        return self.fetch.ms

    def preload(self) -> None:
        """Fetch (remote repositories) then load and warm the preloaded models in this thread (idempotent).

        Raises RepositoryError when a remote repository cannot be read at all; a model that fails to fetch or
        load is only recorded (not ready, with its reason).
        """
        with self._preload_lock:
            if self.preload_ms is not None:
                return
            start = perf_counter_ns()
            try:
                self.fetch = self.repository.prefetch(None if self.settings.preload_all else self.settings.preload)
            except OclawError as exc:
                log.error("model repository %s cannot be read: %s", self.repository.source, exc.message)
                raise
            self.pool.preload()
            self.preload_ms = (perf_counter_ns() - start) / 1e6
        log.info(
            "preload done in %.1f ms: %s",
            self.preload_ms,
            self.pool.states(),
            extra={"oclaw": {"event": "preload_done", "memory": self.pool.memory()}},
        )

    def _preload_in_background(self) -> None:
        try:
            self.preload()
        except OclawError as exc:
            self._preload_error = exc  # raised again by wait_preloaded, in the caller's thread

    def start_preload(self) -> None:
        """Start preloading in a background thread, so imports of the web stack overlap it."""
        if self._preload_thread is None:
            self._preload_thread = threading.Thread(
                target=self._preload_in_background, name="oclaw-preload", daemon=True
            )
            self._preload_thread.start()

    def wait_preloaded(self) -> None:
        """Block until preloading is finished (starting it if needed); raises what made it fail."""
        self.start_preload()
        assert self._preload_thread is not None
        self._preload_thread.join()
        if self._preload_error is not None:
            raise self._preload_error

    def close(self) -> None:
        """Release the models."""
        self.pool.close()


_runtime: Runtime | None = None
_lock = threading.Lock()


def get_runtime(settings: Settings | None = None) -> Runtime:
    """The process-wide Runtime, created on first call (settings apply only then)."""
    global _runtime
    if _runtime is None:
        with _lock:
            if _runtime is None:
                _runtime = Runtime(settings or get_settings())
    return _runtime


def reset_runtime() -> None:
    """Drop the process-wide Runtime (tests and reloads)."""
    global _runtime
    with _lock:
        if _runtime is not None:
            _runtime.close()
        _runtime = None
