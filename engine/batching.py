"""Row batching for event-driven work: many requests through one model in batches of rows, per-item results."""

from __future__ import annotations

from dataclasses import dataclass
from time import perf_counter_ns

import numpy as np

from engine.errors import OclawError
from engine.metering.records import split_int
from engine.model import LoadedModel
from engine.tensors import InferRequest, InferResponse, OutputTensor

#: Rows per run when the manifest sets no max_batch_size.
DEFAULT_MAX_ROWS = 64

Plan = list[tuple[str, bool, int]]
Result = InferResponse | OclawError


@dataclass
class _Item:
    index: int
    request: InferRequest
    feed: dict[str, np.ndarray]
    plan: Plan
    rows: int
    started: int


def _key(item: _Item) -> tuple[object, ...]:
    shapes = tuple((n, a.dtype.str, a.shape[1:]) for n, a in sorted(item.feed.items()))
    return (shapes, tuple(item.plan))


def infer_many(model: LoadedModel, requests: list[InferRequest], *, max_rows: int | None = None) -> list[Result]:
    """Run requests through ``model`` in row batches; one response or one error per request, in order."""
    results: list[Result | None] = [None] * len(requests)
    items: list[_Item] = []
    for i, request in enumerate(requests):
        started = perf_counter_ns()
        try:
            feed, plan = model.prepare(request)
        except OclawError as exc:
            model.stats.failure(perf_counter_ns() - started)
            results[i] = exc
            continue
        first = next(iter(feed.values()))
        items.append(_Item(i, request, feed, plan, int(first.shape[0]) if first.ndim else 1, started))
    limit = max_rows or model.manifest.max_batch_size or DEFAULT_MAX_ROWS
    groups: dict[tuple[object, ...], list[_Item]] = {}
    for item in items:
        groups.setdefault(_key(item) if model.batchable else ("single", item.index), []).append(item)
    for group in groups.values():
        batch: list[_Item] = []
        for item in group:
            if batch and sum(b.rows for b in batch) + item.rows > limit:
                _run_batch(model, batch, results)
                batch = []
            batch.append(item)
        if batch:
            _run_batch(model, batch, results)
    return [r for r in results if r is not None]


def _run_batch(model: LoadedModel, batch: list[_Item], results: list[Result | None]) -> None:
    plan = batch[0].plan
    start = perf_counter_ns()
    try:
        if len(batch) == 1:
            feed = batch[0].feed
        else:
            feed = {name: np.concatenate([b.feed[name] for b in batch]) for name in batch[0].feed}
        outputs = model.run_plan(feed, plan)
    except OclawError as exc:
        if len(batch) == 1:
            model.stats.failure(perf_counter_ns() - batch[0].started)
            results[batch[0].index] = exc
            return
        for item in batch:  # isolate the bad item: run each alone
            _run_batch(model, [item], results)
        return
    computed = perf_counter_ns()
    rows = [b.rows for b in batch]
    infer_parts = split_int(computed - start, rows)
    offsets = np.cumsum([0, *rows])
    for n, item in enumerate(batch):
        sliced = [out[offsets[n] : offsets[n + 1]] for out in outputs]
        tensors: list[OutputTensor] = model.post_process(plan, sliced)
        done = perf_counter_ns()
        compute = (start - item.started if n == 0 else 0) + infer_parts[n] + done - computed
        results[item.index] = InferResponse(
            model.name, str(model.version), tensors, id=item.request.id, rows=item.rows, compute_ns=compute
        )
        model.stats.success(
            rows=item.rows,
            queue=0,
            compute_input=start - item.started if n == 0 else 0,
            compute_infer=infer_parts[n],
            compute_output=done - computed,
            total=done - item.started,
        )
