"""Row batching: requests stacked along the batch dimension, run once and split back, one result per request.

``infer_many`` serves event-driven work (S3 files, SQS messages); ``engine.dynbatch`` stacks concurrent requests on
a server with the same pieces: ``Rows`` (a validated request), ``batch_key`` (which rows may share a run) and
``run_rows`` (one run, or each item alone when that run fails).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from time import perf_counter_ns
from typing import TypeVar

import numpy as np

from engine.errors import OclawError
from engine.metering.records import split_int
from engine.model import LoadedModel
from engine.tensors import InferRequest, InferResponse, OutputTensor

#: Rows per run when the manifest sets no max_batch_size.
DEFAULT_MAX_ROWS = 64

Plan = list[tuple[str, bool, int]]
Result = InferResponse | OclawError


@dataclass(eq=False, slots=True)
class Rows:
    """A validated request ready to share a run: its session feed, output plan and rows."""

    request: InferRequest
    feed: dict[str, np.ndarray]
    plan: Plan
    #: When its decoding began (``perf_counter_ns``).
    started: int
    rows: int = field(init=False)

    def __post_init__(self) -> None:
        first = next(iter(self.feed.values()))
        self.rows = int(first.shape[0]) if first.ndim else 1


R = TypeVar("R", bound=Rows)


def batch_key(item: Rows) -> tuple[object, ...]:
    """Rows with equal keys may be stacked: same inputs, dtypes and non-batch dimensions, same output plan."""
    shapes = tuple((n, a.dtype.str, a.shape[1:]) for n, a in sorted(item.feed.items()))
    return (shapes, tuple(item.plan))


@dataclass(slots=True)
class Run:
    """One session run over ``items``: each item's outputs, or the error that failed it (then ``items`` is one)."""

    items: Sequence[Rows]
    outputs: list[list[np.ndarray]] | OclawError
    #: When the stacking began and the run ended (``perf_counter_ns``).
    start: int
    end: int


def run_rows(model: LoadedModel, items: Sequence[R]) -> Iterator[Run]:
    """Run ``items`` stacked along the batch dimension, split back; when that run fails, each item alone, so one bad
    item never fails the others. Yields the runs made (one, or one per item)."""
    start = perf_counter_ns()
    plan = items[0].plan
    try:
        if len(items) == 1:
            feed = items[0].feed
        else:
            feed = {name: np.concatenate([item.feed[name] for item in items]) for name in items[0].feed}
        outputs = model.run_plan(feed, plan)
    except OclawError as exc:
        if len(items) == 1:
            yield Run(items, exc, start, perf_counter_ns())
            return
        for item in items:  # isolate the bad item: run each alone
            yield from run_rows(model, [item])
        return
    end = perf_counter_ns()
    if len(items) == 1:
        yield Run(items, [outputs], start, end)
        return
    offsets = np.cumsum([0, *(item.rows for item in items)]).tolist()
    parts = [[out[offsets[n] : offsets[n + 1]] for out in outputs] for n in range(len(items))]
    yield Run(items, parts, start, end)


def infer_many(model: LoadedModel, requests: list[InferRequest], *, max_rows: int | None = None) -> list[Result]:
    """Run requests through ``model`` in row batches; one response or one error per request, in order."""
    results: list[Result | None] = [None] * len(requests)
    index: dict[int, int] = {}
    items: list[Rows] = []
    for i, request in enumerate(requests):
        started = perf_counter_ns()
        try:
            feed, plan = model.prepare(request)
        except OclawError as exc:
            model.stats.failure(perf_counter_ns() - started)
            results[i] = exc
            continue
        item = Rows(request, feed, plan, started)
        index[id(item)] = i
        items.append(item)
    limit = max_rows or model.manifest.max_batch_size or DEFAULT_MAX_ROWS
    groups: dict[tuple[object, ...], list[Rows]] = {}
    for n, item in enumerate(items):
        groups.setdefault(batch_key(item) if model.batchable else ("single", n), []).append(item)
    for group in groups.values():
        batch: list[Rows] = []
        for item in group:
            if batch and sum(b.rows for b in batch) + item.rows > limit:
                _run_batch(model, batch, results, index)
                batch = []
            batch.append(item)
        if batch:
            _run_batch(model, batch, results, index)
    return [r for r in results if r is not None]


def _run_batch(model: LoadedModel, batch: list[Rows], results: list[Result | None], index: dict[int, int]) -> None:
    for run in run_rows(model, batch):
        if isinstance(run.outputs, OclawError):
            item = run.items[0]
            model.stats.failure(perf_counter_ns() - item.started)
            results[index[id(item)]] = run.outputs
            continue
        rows = [item.rows for item in run.items]
        infer_parts = split_int(run.end - run.start, rows)
        for n, (item, sliced) in enumerate(zip(run.items, run.outputs, strict=True)):
            tensors: list[OutputTensor] = model.post_process(item.plan, sliced)
            done = perf_counter_ns()
            compute_input = run.start - item.started if n == 0 else 0
            compute = compute_input + infer_parts[n] + done - run.end
            results[index[id(item)]] = InferResponse(
                model.name, str(model.version), tensors, id=item.request.id, rows=item.rows, compute_ns=compute
            )
            model.stats.success(
                rows=item.rows,
                queue=0,
                compute_input=compute_input,
                compute_infer=infer_parts[n],
                compute_output=done - run.end,
                total=done - item.started,
            )
        model.stats.run(
            rows=sum(rows),
            compute_input=run.start - run.items[0].started,
            compute_infer=run.end - run.start,
            compute_output=perf_counter_ns() - run.end,
        )
