"""Dynamic batching on a server: concurrent requests to one model stacked into one run (Triton's dynamic batcher).

A lone request runs at once, on the same path as without batching (the caller holds ``Batcher.hold``). While a run
is in flight, arriving requests are decoded (on worker threads, in parallel: image decoding included), validated,
and queue; a request that fails validation answers at once and never joins a batch. The queue becomes the next run
when a runner frees (``LoadedModel.concurrency`` runs at a time: one per instance, or more), or, while a runner is
free and others are in flight, when the queue holds a preferred batch size or its oldest request has waited
``max_queue_delay_microseconds``. A run takes requests of one ``batch_key`` (same inputs, dtypes, non-batch
dimensions and output plan) up to ``max_batch_size`` rows, in arrival order; the others stay queued. When a stacked
run fails, each of its requests runs alone.

Everything here runs on the event loop except the run itself (the model's executor) and decoding (the loop's
default executor); timers are ``loop.call_later`` handles, results futures: nothing polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

from engine.batching import Rows, Run, batch_key, run_rows
from engine.dataplane import INLINE_BODY_BYTES, Encoded, decode, encode_served
from engine.errors import InvalidInput, ModelNotReady, NotEnoughTime, OclawError, QueueFull
from engine.metering.records import split_int
from engine.model import LoadedModel
from engine.tensors import InferResponse

if TYPE_CHECKING:  # pragma: no cover
    from engine.metering.records import UsageRecorder
    from engine.repository.manifest import DynamicBatching

log = logging.getLogger("oclaw.batching")

#: What a waiting request's client going away looks like: an awaitable that completes when it has gone.
Gone = Callable[[], Awaitable[Any]]


#: Each model's batcher, made on its first request (None: the model declares dynamic_batching but cannot batch).
_batchers: weakref.WeakKeyDictionary[LoadedModel, Batcher | None] = weakref.WeakKeyDictionary()


def batcher_for(model: LoadedModel) -> Batcher | None:
    """The model's dynamic batcher; None for a model without ``dynamic_batching`` (its requests each run alone) or
    one that has no batch dimension (``LoadedModel.batchable``)."""
    spec = model.manifest.dynamic_batching
    if spec is None:
        return None
    try:
        return _batchers[model]
    except KeyError:
        pass
    batcher = Batcher(model, spec) if model.batchable else None
    if batcher is None:
        log.warning(
            "model %s/%s declares dynamic_batching but not every input and output has a variable first (batch) "
            "dimension: each request runs alone",
            model.name,
            model.version,
        )
    _batchers[model] = batcher
    return batcher


class Dropped(NotEnoughTime):
    """A queued request dropped before it ran: its client went away or its ``timeout`` passed. Never run, never
    billed."""


@dataclass(eq=False, slots=True)
class _Entry(Rows):
    """A queued request: its rows and what answering it needs."""

    key: tuple[object, ...] = ()
    enqueue_ns: int = 0
    #: Its ``timeout`` parameter in nanoseconds, and when it passes (``perf_counter_ns``); None without one.
    timeout_ns: int | None = None
    deadline_ns: int | None = None
    decode_ns: int = 0
    recorder: UsageRecorder | None = None
    show_record: bool = False
    future: asyncio.Future[Encoded] | None = None
    queued: bool = True
    expiry: asyncio.TimerHandle | None = None
    watch: asyncio.Task[None] | None = None


def _prepare(model: LoadedModel, body: bytes, header_length: int | None, content_type: str | None) -> _Entry:
    """Decode and validate one request into its session feed (thread-safe); a failure counts in the statistics."""
    started = perf_counter_ns()
    try:
        request = decode(model, body, header_length, content_type)
        feed, plan = model.prepare(request)
        timeout = timeout_ns(request.parameters)
    except OclawError:
        model.stats.failure(perf_counter_ns() - started)
        raise
    entry = _Entry(request, feed, plan, started)
    entry.timeout_ns = timeout
    entry.decode_ns = perf_counter_ns() - started
    return entry


def timeout_ns(parameters: dict[str, Any]) -> int | None:
    """The request's ``timeout`` parameter (microseconds, as Triton takes it) in nanoseconds; None when not given."""
    value = parameters.get("timeout")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidInput(f"parameter 'timeout' must be a non-negative integer of microseconds, got {value!r}")
    return value * 1000


class Batcher:
    """One model's dynamic batcher; lives on the server's event loop (every method but ``_run`` runs there)."""

    def __init__(self, model: LoadedModel, spec: DynamicBatching) -> None:
        # weakly: the batcher is the value of its model's key in the (weak-keyed) _batchers, so a strong reference
        # would keep every model that ever had a batcher alive after the pool unloads it
        self._model = weakref.ref(model)
        self.max_rows = model.manifest.max_batch_size
        self.preferred = spec.preferred_batch_size
        self.delay_ns = spec.max_queue_delay_microseconds * 1000
        self.max_queue_size = spec.max_queue_size
        self.slots = model.concurrency
        #: Runs in flight (a lone request's included).
        self.busy = 0
        #: Requests admitted and not yet run or answered (being decoded, or queued).
        self.waiting = 0
        self.queue: deque[_Entry] = deque()
        self._rows_by_key: dict[tuple[object, ...], int] = {}
        self._timer: asyncio.TimerHandle | None = None
        #: Runs made by the batcher, and the requests they served (a lone request's run is not counted here).
        self.runs = 0
        self.batched = 0

    @property
    def model(self) -> LoadedModel:
        """The model (alive while a request holds it, which is whenever the batcher is used)."""
        model = self._model()
        if model is None:  # pragma: no cover - a request holds its model through its lease
            raise ModelNotReady("the model was unloaded")
        return model

    @property
    def idle(self) -> bool:
        """Nothing in flight and nothing queued: a request now runs alone, at once."""
        return self.busy == 0 and not self.queue

    def hold(self) -> Batcher:
        """``with batcher.hold():`` marks a lone request's run in flight, so requests arriving meanwhile queue for
        the next run (a plain context manager: a generator-based one costs ~1 µs a request more)."""
        return self

    def __enter__(self) -> None:
        self.busy += 1

    def __exit__(self, *exc: object) -> None:
        self.busy -= 1
        if self.queue:
            self._pump()

    async def infer(
        self,
        body: bytes,
        header_length: int | None,
        content_type: str | None,
        enqueue_ns: int,
        *,
        recorder: UsageRecorder | None = None,
        gone: Gone | None = None,
    ) -> Encoded:
        """Decode, queue and serve one request in the next run; ``gone`` completes if its client goes away."""
        if self.waiting >= self.max_queue_size:
            raise QueueFull(
                f"model {self.model.name!r} has {self.waiting} requests waiting to run, its "
                f"dynamic_batching.max_queue_size; retry later"
            )
        self.waiting += 1
        try:
            entry = await self._decode(body, header_length, content_type)
        except BaseException:
            self.waiting -= 1
            raise
        loop = asyncio.get_running_loop()
        entry.key = batch_key(entry)
        entry.enqueue_ns = enqueue_ns
        entry.recorder = recorder
        entry.show_record = recorder is not None and entry.request.parameters.get("metering") is True
        future = entry.future = loop.create_future()
        if (timeout := entry.timeout_ns) is not None:
            left = enqueue_ns + timeout - perf_counter_ns()
            if left <= 0:
                self.waiting -= 1
                self.model.stats.failure(perf_counter_ns() - enqueue_ns)
                raise Dropped(f"the request's timeout of {timeout // 1000} µs passed before it could run")
            entry.deadline_ns = enqueue_ns + timeout
            entry.expiry = loop.call_later(left / 1e9, self._expire, entry, timeout)
        if gone is not None:
            entry.watch = loop.create_task(self._watch(entry, gone))
        self.queue.append(entry)
        self._rows_by_key[entry.key] = self._rows_by_key.get(entry.key, 0) + entry.rows
        self._pump()
        try:
            encoded: Encoded = await future
            return encoded
        finally:
            if entry.queued:  # the caller was cancelled: leave the queue
                self._leave(entry)

    async def _decode(self, body: bytes, header_length: int | None, content_type: str | None) -> _Entry:
        model = self.model
        if len(body) <= INLINE_BODY_BYTES and model.image_input is None and model.text is None:
            return _prepare(model, body, header_length, content_type)  # a small tensor: cheaper than a thread hop
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, _prepare, model, body, header_length, content_type)

    # -- the queue --------------------------------------------------------------------------------

    def _leave(self, entry: _Entry) -> None:
        """Take a request out of the queue (run, dropped or abandoned); stop its timer and watcher."""
        entry.queued = False
        self.queue.remove(entry)
        left = self._rows_by_key[entry.key] - entry.rows
        if left:
            self._rows_by_key[entry.key] = left
        else:
            del self._rows_by_key[entry.key]
        self.waiting -= 1
        if entry.expiry is not None:
            entry.expiry.cancel()
        if entry.watch is not None:
            entry.watch.cancel()

    def _drop(self, entry: _Entry, why: str) -> None:
        if not entry.queued:
            return
        self._leave(entry)
        self.model.stats.failure(perf_counter_ns() - entry.enqueue_ns)
        assert entry.future is not None
        if not entry.future.done():
            entry.future.set_exception(Dropped(why))

    def _expire(self, entry: _Entry, timeout: int) -> None:
        self._drop(entry, f"the request's timeout of {timeout // 1000} µs passed before it could run")

    async def _watch(self, entry: _Entry, gone: Gone) -> None:
        with contextlib.suppress(Exception):  # a transport that fails has lost its client all the same
            await gone()
        self._drop(entry, "the client went away before the request ran")

    def _pump(self) -> None:
        """Start runs while a runner is free and the queue holds a batch that should not wait."""
        while self.queue and self.busy < self.slots:
            head = self.queue[0]
            rows = self._rows_by_key[head.key]
            waited = perf_counter_ns() - head.enqueue_ns
            if self.busy == 0 or waited >= self.delay_ns or rows >= self.max_rows:
                self._dispatch(self.max_rows)
            elif self.preferred and rows >= self.preferred[0]:  # the largest preferred size the queue fills
                self._dispatch(max(n for n in self.preferred if n <= rows))
            else:  # others are in flight: wait a little for company (the oldest request's delay, at most)
                if self._timer is None:
                    loop = asyncio.get_running_loop()
                    self._timer = loop.call_later((self.delay_ns - waited) / 1e9, self._delay_over)
                return

    def _delay_over(self) -> None:
        self._timer = None
        if self.queue and self.busy < self.slots:
            self._dispatch(self.max_rows)
            self._pump()

    def _dispatch(self, limit: int) -> None:
        """Run the oldest request with the queued requests of its key, in arrival order, up to ``limit`` rows."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = perf_counter_ns()
        for entry in [e for e in self.queue if e.deadline_ns is not None and e.deadline_ns <= now]:
            self._expire(entry, (entry.deadline_ns or now) - entry.enqueue_ns)  # due, its timer not yet fired
        if not self.queue:
            return
        head = self.queue[0]
        batch: list[_Entry] = []
        rows = 0
        for entry in list(self.queue):
            if entry.key == head.key and (not batch or rows + entry.rows <= limit):
                batch.append(entry)
                rows += entry.rows
                if rows >= limit:
                    break
        for entry in batch:
            self._leave(entry)
        self.busy += 1
        self.runs += 1
        self.batched += len(batch)
        loop = asyncio.get_running_loop()
        try:
            done = loop.run_in_executor(self.model.executor, self._run, batch)
        except RuntimeError:  # the model was unloaded: its executor takes no more work
            self._finished(batch, None)
            return
        done.add_done_callback(lambda f: self._finished(batch, f))

    def _finished(
        self, batch: list[_Entry], done: asyncio.Future[tuple[list[Encoded | OclawError], int]] | None
    ) -> None:
        self.busy -= 1
        results: list[Encoded | OclawError] | BaseException
        if done is None or done.cancelled():
            results = ModelNotReady(f"model {self.model.name!r} was unloaded")
        elif (error := done.exception()) is not None:
            results = error
        else:
            results, elapsed = done.result()
            # a model whose whole batches run steadily faster than a thread hop costs runs inline from then on
            self.model.note_offloaded(elapsed)
        for n, entry in enumerate(batch):
            future = entry.future
            assert future is not None
            if future.done():
                continue
            result = results if isinstance(results, BaseException) else results[n]
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        if self.queue:
            self._pump()

    # -- the run (on the model's executor) --------------------------------------------------------

    def _run(self, batch: list[_Entry]) -> tuple[list[Encoded | OclawError], int]:
        """Run a batch: one encoded response or one error per request, in order, and the nanoseconds its longest
        session run took."""
        longest = 0
        results: dict[int, Encoded | OclawError] = {}
        for run in run_rows(self.model, batch):
            longest = max(longest, run.end - run.start)
            if isinstance(run.outputs, OclawError):
                entry = run.items[0]
                assert isinstance(entry, _Entry)
                self.model.stats.failure(run.end - entry.enqueue_ns)
                results[id(entry)] = run.outputs
            else:
                results.update(self._answer(run))
        return [results[id(entry)] for entry in batch], longest

    def _answer(self, run: Run) -> Iterator[tuple[int, Encoded]]:
        """Post-process and encode each request of a run; the run's compute shared by rows.

        The batch's compute (each request's decoding, the stacked run, the post-processing) is split in whole
        microseconds, so the requests' metering records add up exactly to it.
        """
        model = self.model
        entries = [e for e in run.items if isinstance(e, _Entry)]
        outputs = run.outputs
        assert not isinstance(outputs, OclawError) and len(entries) == len(outputs)
        responses = [
            InferResponse(
                model.name,
                str(model.version),
                model.post_process(entry.plan, out),
                id=entry.request.id,
                rows=entry.rows,
            )
            for entry, out in zip(entries, outputs, strict=True)
        ]
        done = perf_counter_ns()
        rows = [e.rows for e in entries]
        compute_us = split_int((sum(e.decode_ns for e in entries) + done - run.start) // 1000, rows)
        infer_ns = split_int(run.end - run.start, rows)
        output_ns = split_int(done - run.end, rows)
        for n, (entry, response) in enumerate(zip(entries, responses, strict=True)):
            queue = max(0, run.start - entry.enqueue_ns - entry.decode_ns)
            response.queue_ns, response.compute_ns = queue, compute_us[n] * 1000
            model.stats.success(
                rows=entry.rows,
                queue=queue,
                compute_input=entry.decode_ns,
                compute_infer=infer_ns[n],
                compute_output=output_ns[n],
                total=done - entry.enqueue_ns,
            )
            body, length, header = encode_served(model, response, entry.recorder, show_record=entry.show_record)
            yield id(entry), Encoded(body, length, entry.rows, queue, response.compute_ns, header)
        model.stats.run(
            rows=sum(rows),
            compute_input=sum(e.decode_ns for e in entries),
            compute_infer=run.end - run.start,
            compute_output=done - run.end,
        )
