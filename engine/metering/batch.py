"""A flush's records as the sinks see them: ``Batch`` (built lazily from the usages requests captured), its JSON
lines (one a record, or packed: the requests sharing a second, tenant, model and bill in one line) and metric
columns; ``unpack`` turns a packed line back into records.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import chain
from operator import itemgetter
from typing import Any, overload

import orjson

from engine.metering.records import Biller, MeteringRecord, Usage, _time_of


def json_lines(records: Sequence[MeteringRecord], event: str | None = None) -> bytes | bytearray:
    """Records as JSON Lines (with an ``event`` field when given); a ``Batch`` writes its own, faster."""
    if isinstance(records, Batch):
        return records.json_lines(event)
    tag = {} if event is None else {"event": event}
    return b"".join(orjson.dumps(r.__dict__ | tag, option=orjson.OPT_APPEND_NEWLINE) for r in records)


#: A line's own figures, before what it shares with the others of its second (the ms are exact: µs / 1000).
_OWN_LINE = b'{"request_id":%b,"items":%d,"bytes_in":%d,"bytes_out":%d,"queue_ms":%b,"compute_ms":%b,"total_ms":%b,'
#: µs -> JSON ms (``b"0.045"``), for the values requests repeat; formatting each costs more than the lookup. Bounded.
_MS: dict[int, bytes] = {}


#: ...then what it shares with them (``_shared_json``): one line.
_LINE = _OWN_LINE + b"%b"
#: A packed line's own figures (``Batch.packed_lines``), lists of its requests', before what they share.
_PACKED = (
    b'{"requests":%d,"request_id":%b,"items":%b,"bytes_in":%b,"bytes_out":%b,"queue_ms":[%b],"compute_ms":[%b],'
    b'"total_ms":[%b],'
)
#: Requests in one packed line at most (``Batch.packed_lines``): ~60 bytes each, far below log entry limits.
PACK = 2000


def _ms_table(values: set[int]) -> dict[int, bytes]:
    """``_MS`` holding every one of ``values``: µs as a JSON number of ms, exactly ``us / 1000`` once parsed."""
    missing = values.difference(_MS)  # looks up each of values (``values - _MS.keys()`` would walk all of _MS)
    if len(_MS) + len(missing) > 65536:
        _MS.clear()
        missing = values
    for us in missing:
        _MS[us] = b"%d.%03d" % divmod(us, 1000) if us >= 0 else orjson.dumps(us / 1000)
    return _MS


def ms_json(us: int) -> bytes:
    """µs as a JSON number of ms (``b"0.045"``: exactly ``us / 1000`` once parsed), kept in ``_MS``."""
    return _MS.get(us) or _ms_table({us})[us]


def shared_members(meter: Biller, key: Sequence[Any], bill: tuple[float, float, float, float]) -> dict[str, Any]:
    """A record's members that ``key`` (tenant, model, version, cold, billed ms, status, source) and its ``bill``
    decide — all but its own figures and time — in record order: what lines share (``Batch``, ``LogSink.one``)."""
    tenant, model, version, cold, billed, status, source = key
    gb_s, vcpu_s, gib_s, cost = bill
    return {
        "tenant": tenant,
        "model": model,
        "version": version,
        "platform": meter.platform,
        "instance_id": meter.instance_id,
        "cold": cold,
        "billed_ms": float(billed),
        "gb_seconds": gb_s,
        "vcpu_seconds": vcpu_s,
        "gib_seconds": gib_s,
        "cost_usd": cost,
        "status": status,
        "source": source,
    }


def factorize(columns: Sequence[Sequence[Any]]) -> tuple[list[tuple[Any, ...]], Any]:
    """The distinct rows of equally long ``columns`` (first seen first) and each row's index into them, a numpy
    array (None when all rows are one: no index needed). A column whose values are all equal (most are: one
    tenant, model, status...) is found so by one C-level ``count`` and left out of the keys hashed per row."""
    import numpy as np

    n = len(columns[0])
    if not n:
        return [], np.zeros(0, dtype=np.intp)
    first = [column[0] for column in columns]
    varying = [i for i, column in enumerate(columns) if column.count(first[i]) != n]
    if not varying:
        return [tuple(first)], None
    rows = columns[varying[0]] if len(varying) == 1 else list(zip(*(columns[i] for i in varying), strict=True))
    distinct = list(dict.fromkeys(rows))
    index = {row: i for i, row in enumerate(distinct)}
    codes = np.fromiter(map(index.__getitem__, rows), np.intp, n)
    keys = []
    for row in distinct:
        key = list(first)
        for i, value in zip(varying, (row,) if len(varying) == 1 else row, strict=True):
            key[i] = value
        keys.append(tuple(key))
    return keys, codes


class Batch(Sequence[MeteringRecord]):
    """The records of one flush: a ``Sequence[MeteringRecord]`` for any sink, built lazily.

    Requests served alone stay the ``Usage`` tuples the request path captured until a sink asks for record
    objects: the built-in sinks take JSON lines (``json_lines``) or columns (``columns``) straight from them,
    ~1 µs a request instead of ~4 for building each record and serialising it. ``done`` holds records already
    built (batch paths, failures, a spool being re-sent).
    """

    __slots__ = ("_billed", "_bills", "_fields", "_records", "done", "meter", "usages")

    def __init__(self, meter: Biller, usages: list[Usage], done: list[MeteringRecord]) -> None:
        self.meter = meter
        self.usages = usages
        self.done = done
        self._records: list[MeteringRecord] | None = None
        self._billed: list[int] | None = None
        self._fields: list[tuple[Any, ...]] | None = None
        self._bills: dict[int, tuple[float, float, float, float]] = {}

    def __len__(self) -> int:
        return len(self.usages) + len(self.done)

    @overload
    def __getitem__(self, index: int) -> MeteringRecord: ...

    @overload
    def __getitem__(self, index: slice) -> list[MeteringRecord]: ...

    def __getitem__(self, index: int | slice) -> MeteringRecord | list[MeteringRecord]:
        return self.records()[index]

    def __iter__(self) -> Iterator[MeteringRecord]:
        return iter(self.records())

    def records(self) -> list[MeteringRecord]:
        """Every record as an object (built once)."""
        if self._records is None:
            self._records = [self.meter.complete(u) for u in self.usages] + self.done
        return self._records

    def _bill(self, billed: int) -> tuple[float, float, float, float]:
        """``Meter.bill`` of a request billed ``billed`` ms, computed once per distinct value."""
        bill = self._bills.get(billed)
        if bill is None:
            bill = self._bills[billed] = self.meter.bill(float(billed))
        return bill

    def json_lines(self, event: str | None = None) -> bytes | bytearray:
        """One JSON object a line, in ``records()`` order, each with an ``event`` field when given.

        A request's own figures are serialised per line; what it shares with others served in the same second
        (time, tenant, model, cold, bill, status...) once, then appended: lines carry the same fields and values
        as ``MeteringRecord.json``, its own figures first. A small batch has little to share: each line's shared
        part is made for it.
        """
        dumps, newline = orjson.dumps, orjson.OPT_APPEND_NEWLINE
        tag = {} if event is None else {"event": event}
        if self._records is not None:
            out = bytearray()
            for record in self._records:
                out += dumps(record.__dict__ | tag, option=newline)
            return out
        if len(self.usages) < 16:
            return self._own_lines(tag)
        (rids, tenants, models, versions, items, sizes_in, sizes_out, queues, computes, totals, _, colds, sources,
         seconds, statuses) = self.fields()  # fmt: skip
        billed = self.billed()
        shared_by = (seconds, tenants, models, versions, colds, billed, statuses, sources)
        shared = {key: self._shared_json(key, tag) for key in set(zip(*shared_by, strict=True))}
        ms = _ms_table({*queues, *computes, *totals}).__getitem__
        tails = map(shared.__getitem__, zip(*shared_by, strict=True))
        lines = zip(
            map(dumps, rids),
            items,
            sizes_in,
            sizes_out,
            map(ms, queues),
            map(ms, computes),
            map(ms, totals),
            tails,
            strict=True,
        )
        # no Python code per line: C loops (map, zip) format them; a Python loop building a dict a line cost ~15 % more
        done = (dumps(record.__dict__ | tag, option=newline) for record in self.done)
        return b"".join(chain(map(_LINE.__mod__, lines), done))

    def packed_lines(self, event: str | None = None) -> bytes | bytearray:
        """Like ``json_lines``, but the requests that share a line's shared fields (second, tenant, model,
        version, cold, billed ms and so bill, status, source) go in one line, their own figures as lists:
        ``{"requests": 3, "request_id": [...], "items": [...], ..., "time": ..., "tenant": ...}``, at most
        ``PACK`` a line. A request alone in its group gets a plain record line. ``unpack`` reads both.

        A busy server's second of requests becomes a few lines: ~8x fewer bytes to ingest (~52 a request instead
        of ~430), for about the CPU of a line per request (~10 % less in a flush).
        """
        import numpy as np

        tag = {} if event is None else {"event": event}
        n = len(self.usages)
        if n < 16 or self._records is not None:
            return self.json_lines(event)
        (rids, tenants, models, versions, items, sizes_in, sizes_out, queues, computes, totals, _, colds, sources,
         seconds, statuses) = self.fields()  # fmt: skip
        billed = self.billed()
        distinct, codes = factorize((seconds, tenants, models, versions, colds, billed, statuses, sources))
        groups: list[tuple[tuple[Any, ...], Sequence[int]]]
        if codes is None:
            groups = [(distinct[0], range(n))]
        else:
            order = np.argsort(codes, kind="stable").tolist()  # each group's requests in the order they were served
            ends = np.cumsum(np.bincount(codes, minlength=len(distinct))).tolist()
            groups = [(key, order[a:b]) for key, a, b in zip(distinct, [0, *ends[:-1]], ends, strict=True)]
        ms = _ms_table({*queues, *computes, *totals}).__getitem__  # JSON ms, exactly µs / 1000 once parsed
        columns = (rids, items, sizes_in, sizes_out, queues, computes, totals)
        out = []
        dumps = orjson.dumps
        for key, members in groups:
            for start in range(0, len(members), PACK):
                part = members[start : start + PACK]
                if len(part) == 1:
                    i = part[0]
                    out.append(self._line(self.usages[i], billed[i], tag))
                    continue
                if len(part) == n:  # every request of the flush: the columns as they are
                    rid, size, size_in, size_out, queue, compute, total = columns
                else:
                    take = itemgetter(*part)
                    rid, size, size_in, size_out, queue, compute, total = (take(column) for column in columns)
                out += (
                    _PACKED
                    % (
                        len(part),
                        dumps(rid),
                        dumps(size),
                        dumps(size_in),
                        dumps(size_out),
                        b",".join(map(ms, queue)),
                        b",".join(map(ms, compute)),
                        b",".join(map(ms, total)),
                    ),
                    self._shared_json(key, tag),
                )
        out += (dumps(record.__dict__ | tag, option=orjson.OPT_APPEND_NEWLINE) for record in self.done)
        return b"".join(out)

    def _shared_json(self, key: tuple[Any, ...], tag: dict[str, str]) -> bytes:
        """What the lines of one (second, tenant, model, version, cold, billed, status, source) share: the end of
        their JSON object, from the comma after their own figures to the newline."""
        second, *rest = key
        shared = {"time": _time_of(second), **shared_members(self.meter, rest, self._bill(rest[4])), **tag}
        return orjson.dumps(shared, option=orjson.OPT_APPEND_NEWLINE)[1:]

    def fields(self) -> list[tuple[Any, ...]]:
        """The captured usages transposed: one tuple per ``Usage`` field, in ``usages`` order (built once)."""
        if self._fields is None:
            self._fields = list(zip(*self.usages, strict=True)) if self.usages else [() for _ in Usage._fields]
        return self._fields

    def _own_lines(self, tag: dict[str, str]) -> bytearray:
        """``json_lines`` of a few usages and the done records: one object a line."""
        out = bytearray()
        for usage, billed in zip(self.usages, self.billed(), strict=True):
            out += self._line(usage, billed, tag)
        for record in self.done:
            out += orjson.dumps(record.__dict__ | tag, option=orjson.OPT_APPEND_NEWLINE)
        return out

    def _line(self, usage: Usage, billed: int, tag: dict[str, str]) -> bytes:
        """One request's record line, straight from its usage (no record object): as ``json_lines`` writes it."""
        (rid, tenant, model, version, items, size_in, size_out, queue, compute, total, _, cold, source, second,
         status) = usage  # fmt: skip
        shared = self._shared_json((second, tenant, model, version, cold, billed, status, source), tag)
        return _LINE % (
            orjson.dumps(rid),
            items,
            size_in,
            size_out,
            ms_json(queue),
            ms_json(compute),
            ms_json(total),
            shared,
        )

    def billed(self) -> list[int]:
        """Billed ms of each captured usage (``Meter.billed_ms``), computed once."""
        if self._billed is None:
            fields = self.fields()
            if self.meter.platform == "lambda" and any(fields[10]):  # INIT billed with the request that paid it
                self._billed = list(map(self.meter.billed_ms, self.usages))
            else:  # Meter.billed_ms without INIT: the duration rounded up to 1 ms
                self._billed = [-(-total // 1000) for total in fields[9]]
        return self._billed

    def figures(self) -> list[tuple[str, int, bool, float, float, float, bool, float]]:
        """What metrics are made of, per record in ``records()`` order (see ``figures_of``), without the records."""
        out = []
        for usage, billed in zip(self.usages, self.billed(), strict=True):
            failed = usage[14] >= 400
            out.append(
                (
                    usage[2] or "-",
                    usage[4],
                    failed,
                    usage[8] / 1000,
                    float(billed),
                    self._bill(billed)[3],
                    usage[11],
                    usage[9] / 1000,
                )
            )
        out += map(figures_of, self.done)
        return out

    def columns(self) -> tuple[list[tuple[str, str, int]], Any, Any]:
        """What metrics are made of, in ``records()`` order: the distinct (model, version, status) keys, each
        record's index into them, and a float64 array of (total_ms, queue_ms, compute_ms, items, billed_ms,
        cost_usd, cold) rows."""
        import numpy as np

        fields, n = self.fields(), len(self.usages)
        rows = np.empty((len(self), 7))
        done = self.done
        keys, codes = factorize(
            (
                fields[2] + tuple(r.model for r in done),
                fields[3] + tuple(r.version for r in done),
                fields[14] + tuple(r.status for r in done),
            )
        )
        if codes is None:
            codes = np.zeros(len(self), dtype=np.intp)
        if n:
            for column, field in ((0, 9), (1, 7), (2, 8), (3, 4), (6, 11)):  # total, queue, compute µs; items; cold
                rows[:n, column] = np.fromiter(fields[field], np.float64, n)  # a tuple's numbers: no type discovery
            rows[:n, :3] /= 1000
            billed, where = np.unique(np.fromiter(self.billed(), np.int64, n), return_inverse=True)
            rows[:n, 4] = billed[where]
            rows[:n, 5] = np.array([self._bill(int(b))[3] for b in billed])[where]
        for i, r in enumerate(self.done, n):
            rows[i] = (r.total_ms, r.queue_ms, r.compute_ms, r.items, r.billed_ms, r.cost_usd, r.cold)
        return keys, codes, rows


#: A packed line's per-request lists, in record field order.
PACKED_FIELDS = ("request_id", "items", "bytes_in", "bytes_out", "queue_ms", "compute_ms", "total_ms")


def unpack(line: dict[str, Any]) -> list[dict[str, Any]]:
    """The records of a metering line: itself, or each request of a packed line (``Batch.packed_lines``)."""
    count = line.get("requests")
    if not isinstance(count, int) or not isinstance(line.get("request_id"), list):
        return [line]
    shared = {k: v for k, v in line.items() if k not in PACKED_FIELDS and k != "requests"}
    columns = [line[name] for name in PACKED_FIELDS]
    if any(len(column) != count for column in columns):
        raise ValueError(f"packed metering line: {count} requests but lists of {[len(c) for c in columns]}")
    return [dict(zip(PACKED_FIELDS, values, strict=True)) | shared for values in zip(*columns, strict=True)]


def figures_of(r: MeteringRecord) -> tuple[str, int, bool, float, float, float, bool, float]:
    """What the EMF metrics read of a record: (model, items, failed, compute ms, billed ms, cost, cold, total ms)."""
    return (r.model or "-", r.items, r.status >= 400, r.compute_ms, r.billed_ms, r.cost_usd, r.cold, r.total_ms)
