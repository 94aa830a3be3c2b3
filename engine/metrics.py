"""Core server metrics in Prometheus form, fed by the metering records (no extra work per request)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, generate_latest
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from engine.metering import MeteringRecord

if TYPE_CHECKING:  # pragma: no cover
    from engine.runtime import Runtime

#: Latency buckets in seconds, from sub-millisecond tiny models to multi-second batches.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def memory_limit(path: str = "/sys/fs/cgroup/memory.max") -> float:
    """The cgroup v2 memory limit in bytes, else the machine's memory."""
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read().strip()
        if text != "max":
            return float(text)
    except (OSError, ValueError):
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


class PrometheusSink:
    """A metering sink that keeps Prometheus counters and histograms; ``exposition()`` renders them."""

    def __init__(self, runtime: Runtime, in_flight: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self._cache: dict[tuple[str, str, int], tuple[Any, ...]] = {}
        ProcessCollector(registry=self.registry)  # RSS, CPU seconds, open fds
        PlatformCollector(registry=self.registry)
        labels = ("model", "version")
        r = self.registry
        self.requests = Counter("oclaw_requests", "Inference requests served", (*labels, "status"), registry=r)
        self.items = Counter("oclaw_inference_items", "Rows (batch items) inferred", labels, registry=r)
        self.latency = Histogram(
            "oclaw_request_duration_seconds", "Request time inside the server", labels, buckets=BUCKETS, registry=r
        )
        # queue and compute as summaries (sum and count, i.e. averages): the distribution is on the latency
        self.queue = Summary("oclaw_queue_duration_seconds", "Time queued before compute", labels, registry=r)
        self.compute = Summary("oclaw_compute_duration_seconds", "Decode + run + post-process", labels, registry=r)
        self.batch = Histogram(
            "oclaw_batch_size", "Rows per request", labels, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.cost = Counter("oclaw_billed_cost_usd", "Estimated cost of the requests served", ("model",), registry=r)
        self.billed = Counter("oclaw_billed_seconds", "Billed time of the requests served", ("model",), registry=r)
        self.cold_starts = Counter("oclaw_cold_starts", "Requests that paid a cold start", registry=r)
        Gauge("oclaw_in_flight_requests", "Requests being served now", registry=r).set_function(
            lambda: float(in_flight())
        )
        load = Gauge("oclaw_model_load_seconds", "Load + warm-up time per model", ("model",), registry=r)
        size = Gauge("oclaw_model_file_bytes", "Model file size (weights held in memory)", labels, registry=r)
        ready = Gauge("oclaw_model_ready", "1 when the model can serve", ("model",), registry=r)
        Gauge("oclaw_memory_limit_bytes", "Memory this process may use (cgroup limit)", registry=r).set(memory_limit())
        for name, state in runtime.pool.states().items():
            load.labels(name).set(state["load_ms"] / 1000)
            ready.labels(name).set(1.0 if state["state"] == "READY" else 0.0)
        for model in runtime.pool.loaded():
            size.labels(model.name, str(model.version)).set(model.path.stat().st_size)

    def _children(self, model: str, version: str, status: int) -> tuple[Any, ...]:
        key = (model, version, status)
        children = self._cache.get(key)
        if children is None:  # labels() lookups cost more than the updates: resolve them once per series
            m = (model, version)
            children = self._cache[key] = (
                self.requests.labels(*m, str(status)),
                self.items.labels(*m),
                self.latency.labels(*m),
                self.queue.labels(*m),
                self.compute.labels(*m),
                self.batch.labels(*m),
                self.cost.labels(model),
                self.billed.labels(model),
            )
        return children

    def emit(self, records: Sequence[MeteringRecord]) -> None:
        for rec in records:
            requests, items, latency, queue, compute, batch, cost, billed = self._children(
                rec.model, rec.version, rec.status
            )
            requests.inc()
            if rec.status < 400:
                items.inc(rec.items)
                latency.observe(rec.total_ms / 1000)
                queue.observe(rec.queue_ms / 1000)
                compute.observe(rec.compute_ms / 1000)
                batch.observe(rec.items)
            cost.inc(rec.cost_usd)
            billed.inc(rec.billed_ms / 1000)
            if rec.cold:
                self.cold_starts.inc()

    def exposition(self) -> bytes:
        """The text exposition format."""
        return bytes(generate_latest(self.registry))
