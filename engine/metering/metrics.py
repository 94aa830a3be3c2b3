"""Core server metrics in Prometheus form, fed by the metering records (no extra work per request)."""

from __future__ import annotations

import operator
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from engine.metering.records import MeteringRecord

if TYPE_CHECKING:  # pragma: no cover
    from engine.runtime import Runtime

#: Latency buckets in seconds, from sub-millisecond tiny models to multi-second batches.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Rows per request.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LABELS = ("model", "version")
_BOUNDS = np.array(BUCKETS)
_BATCH_BOUNDS = np.array(BATCH_BUCKETS, dtype=np.float64)


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


class _Pool(Protocol):
    """What the pool's collector reads of ``engine.pool.ModelPool`` (metering does not import the pool)."""

    def memory(self) -> dict[str, Any]: ...
    def states(self) -> dict[str, dict[str, Any]]: ...
    def loaded(self) -> list[Any]: ...  # LoadedModel: its name, version, device and sessions


class PoolCollector:
    """The model pool's Prometheus metrics, read at each scrape: loads, unloads by reason, memory held and the
    budget, sessions per loaded version and device."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool

    def describe(self) -> list[Metric]:
        """Nothing: a registry must not collect at registration."""
        return []

    def collect(self) -> Iterator[Metric]:
        figures = self.pool.memory()
        evictions = CounterMetricFamily(
            "oclaw_model_evictions", "Models unloaded by the pool (memory budget, idle)", labels=("reason",)
        )
        for reason, count in figures["evictions"].items():
            evictions.add_metric([reason], count)
        yield evictions
        loads = CounterMetricFamily("oclaw_model_loads", "Model loads (reloads included)", labels=("model",))
        held = GaugeMetricFamily("oclaw_model_memory_bytes", "Memory a loaded model holds", labels=("model",))
        for name, state in self.pool.states().items():
            loads.add_metric([name], state["loads"])
            held.add_metric([name], state["memory_bytes"])
        yield from (loads, held)
        instances = GaugeMetricFamily(
            "oclaw_model_instances", "Sessions of a loaded model version", labels=("model", "version", "device")
        )
        for model in self.pool.loaded():
            instances.add_metric([model.name, str(model.version), model.device], len(model.sessions))
        yield instances
        yield GaugeMetricFamily("oclaw_models_memory_bytes", "Memory the models hold", value=figures["used_bytes"])
        if figures["budget_bytes"] is not None:
            yield GaugeMetricFamily(
                "oclaw_models_memory_budget_bytes", "OCLAW_MEMORY_BUDGET_MB in bytes", value=figures["budget_bytes"]
            )


class _Series:
    """Request metrics of one (model, version), updated once per flush with numpy."""

    __slots__ = ("batch", "compute", "items", "latency", "queue", "requests")

    def __init__(self) -> None:
        self.requests: dict[str, float] = {}  # by status
        self.items = 0.0
        self.latency = np.zeros(len(BUCKETS) + 2)  # bucket counts (last: +Inf), then the sum
        self.batch = np.zeros(len(BATCH_BUCKETS) + 2)
        self.queue = np.zeros(2)  # sum, count
        self.compute = np.zeros(2)


def _observe(into: np.ndarray, bounds: np.ndarray, values: np.ndarray) -> None:
    """Add ``values`` to a histogram: counts per bucket (``le``: v <= bound) and the sum."""
    into[:-1] += np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds) + 1)
    into[-1] += values.sum()


_KEY = operator.attrgetter("model", "version", "status")
_FIELD_NAMES = ("total_ms", "queue_ms", "compute_ms", "items", "billed_ms", "cost_usd", "cold")
_FIELDS = operator.attrgetter(*_FIELD_NAMES)


class PrometheusSink:
    """A metering sink that keeps Prometheus metrics; ``exposition()`` renders them.

    The request metrics are a custom collector updated once per flush for a whole batch of records (numpy
    bucket counts), not once per record: prometheus-client's per-observation locking cost ~5 µs a request.
    """

    #: Metrics only: with no other sink, responses carry no ``oclaw-metering`` header.
    metrics_only = True

    def __init__(self, runtime: Runtime, in_flight: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self._series: dict[tuple[str, str], _Series] = {}
        self._billed: dict[str, list[float]] = {}  # model -> [seconds, usd]
        self._cold = 0
        self._lock = threading.Lock()
        ProcessCollector(registry=self.registry)  # RSS, CPU seconds, open fds
        self.registry.register(PoolCollector(runtime.pool))
        PlatformCollector(registry=self.registry)
        self.registry.register(self)
        r = self.registry
        Gauge("oclaw_in_flight_requests", "Requests being served now", registry=r).set_function(
            lambda: float(in_flight())
        )
        load = Gauge("oclaw_model_load_seconds", "Load + warm-up time per model", ("model",), registry=r)
        size = Gauge("oclaw_model_file_bytes", "Model file size (weights held in memory)", LABELS, registry=r)
        ready = Gauge("oclaw_model_ready", "1 when the model can serve", ("model",), registry=r)
        Gauge("oclaw_memory_limit_bytes", "Memory this process may use (cgroup limit)", registry=r).set(memory_limit())
        for name, state in runtime.pool.states().items():
            load.labels(name).set(state["load_ms"] / 1000)
            ready.labels(name).set(1.0 if state["state"] == "READY" else 0.0)
        for model in runtime.pool.loaded():
            size.labels(model.name, str(model.version)).set(model.path.stat().st_size)

    def emit(self, records: Sequence[MeteringRecord]) -> None:
        if not records:
            return
        triples = list(map(_KEY, records))
        keys = list(dict.fromkeys(triples))
        codes = np.fromiter(map({key: i for i, key in enumerate(keys)}.__getitem__, triples), np.intp, len(triples))
        rows = np.array(list(map(_FIELDS, records)), dtype=np.float64).reshape(-1, len(_FIELD_NAMES))
        with self._lock:
            for number, (model, version, status) in enumerate(keys):
                part = rows if len(keys) == 1 else rows[codes == number]
                series = self._series.get((model, version))
                if series is None:
                    series = self._series[(model, version)] = _Series()
                code = str(status)
                series.requests[code] = series.requests.get(code, 0.0) + len(part)
                total, queue, compute, items, billed, cost, cold = part.T
                money = self._billed.setdefault(model, [0.0, 0.0])
                money[0] += float(billed.sum()) / 1000
                money[1] += float(cost.sum())
                self._cold += int(cold.sum())
                if status < 400:  # failures count as requests (and cost), not in the latency or batch figures
                    _observe(series.latency, _BOUNDS, total / 1000)
                    _observe(series.batch, _BATCH_BOUNDS, items)
                    series.queue += (queue.sum() / 1000, len(part))
                    series.compute += (compute.sum() / 1000, len(part))
                    series.items += float(items.sum())

    def describe(self) -> list[Metric]:
        """Nothing: the registry must not collect at registration time."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The request metrics, rendered at scrape time."""
        with self._lock:
            series = {
                key: (dict(s.requests), s.items, s.latency.copy(), s.batch.copy(), s.queue.copy(), s.compute.copy())
                for key, s in self._series.items()
            }
            billed = {model: tuple(v) for model, v in self._billed.items()}
            cold = self._cold
        requests = CounterMetricFamily("oclaw_requests", "Inference requests served", labels=(*LABELS, "status"))
        items = CounterMetricFamily("oclaw_inference_items", "Rows (batch items) inferred", labels=LABELS)
        latency = HistogramMetricFamily(
            "oclaw_request_duration_seconds", "Request time inside the server", labels=LABELS
        )
        queue = SummaryMetricFamily("oclaw_queue_duration_seconds", "Time queued before compute", labels=LABELS)
        compute = SummaryMetricFamily("oclaw_compute_duration_seconds", "Decode + run + post-process", labels=LABELS)
        batch = HistogramMetricFamily("oclaw_batch_size", "Rows per request", labels=LABELS)
        for (model, version), (by_status, n_items, lat, bat, que, com) in series.items():
            labels = [model, version]
            for status, count in by_status.items():
                requests.add_metric([*labels, status], count)
            items.add_metric(labels, n_items)
            latency.add_metric(labels, _buckets(BUCKETS, lat), lat[-1])
            batch.add_metric(labels, _buckets(BATCH_BUCKETS, bat), bat[-1])
            queue.add_metric(labels, que[1], que[0])
            compute.add_metric(labels, com[1], com[0])
        cost = CounterMetricFamily("oclaw_billed_cost_usd", "Estimated cost of the requests served", labels=("model",))
        seconds = CounterMetricFamily("oclaw_billed_seconds", "Billed time of the requests served", labels=("model",))
        for model, (billed_s, usd) in billed.items():
            seconds.add_metric([model], billed_s)
            cost.add_metric([model], usd)
        yield from (requests, items, latency, queue, compute, batch, cost, seconds)
        yield CounterMetricFamily("oclaw_cold_starts", "Requests that paid a cold start", value=cold)

    def exposition(self) -> bytes:
        """The text exposition format."""
        return bytes(generate_latest(self.registry))


def _buckets(bounds: Sequence[float], counts: np.ndarray) -> list[tuple[str, float]]:
    """Cumulative (le, count) pairs for a HistogramMetricFamily, +Inf last."""
    cumulative = np.cumsum(counts[:-1])
    les = [repr(float(b)) for b in bounds] + ["+Inf"]  # as prometheus-client writes them: 1.0, 0.005, +Inf
    return [(le, float(c)) for le, c in zip(les, cumulative, strict=True)]
