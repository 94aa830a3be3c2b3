"""A flush's records as lines (plain and packed, read back by unpack), on stdout, and through a failing sink."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from engine.config import Settings
from engine.metering import batch as batch_module
from engine.metering.batch import json_lines, packed_lines, unpack
from engine.metering.meter import Meter
from engine.metering.records import MeteringRecord, Usage
from engine.metering.sinks import EmfSink, LineSink, LogSink, make_sink
from tests.meterkit import meter, one

SEEN: list[list[MeteringRecord]] = []
DOWN: list[bool] = [False]


def keeping_sink(records: Sequence[MeteringRecord]) -> None:
    """A callback sink that keeps what it got through the Sequence interface, or fails while DOWN."""
    if DOWN[0]:
        raise ConnectionError("sink down")
    assert len(records) == len(list(records))
    SEEN.append([records[i] for i in range(len(records))])


def usages(n: int, seed: int = 7) -> list[Usage]:
    """Varied usages: two seconds, odd tenants and ids, cold ones with INIT, durations across billing steps."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        cold = rng.random() < 0.1
        out.append(
            Usage(
                rng.choice([f"i-3f2a-{i}", f'say "hi" {i}', f"caf\u00e9-{i}", f"back\\slash-{i}"]),
                rng.choice(["anonymous", "acme", 'we"ird', "t\u00e9nant", "a},{b"]),
                rng.choice(["add_sub", "resnet"]),
                rng.choice(["1", "2"]),
                rng.choice([0, 1, 3, 64]),
                rng.randint(0, 10_000),
                rng.randint(0, 10_000),
                rng.randint(0, 3000),
                rng.randint(0, 5000),
                rng.choice([0, 1, 999, 1000, 1001, rng.randint(0, 20_000)]),
                rng.uniform(50, 900) if cold else 0.0,
                cold,
                rng.choice(["http", "lambda-http"]),
                1_790_000_000 + rng.randint(0, 1),
                rng.choice([200, 200, 200, 400]),
            )
        )
    return out


@pytest.mark.parametrize("platform", ["lambda", "cloudrun", "local"])
def test_json_lines_carry_every_record_field_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, platform: str
) -> None:
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1769")
    m = meter(tmp_path, platform)
    records = [m.complete(u) for u in usages(50)] + [one(m, total_ms=0.4, cold=True, init_ms=300.0)]
    for event in (None, "metering"):
        tag = {} if event is None else {"event": event}
        lines = json_lines(records, event).splitlines()
        assert [list(json.loads(line)) for line in lines] == [[*r.as_dict(), *tag] for r in records]
        assert [json.loads(line) for line in lines] == [r.as_dict() | tag for r in records]
    assert json_lines([]) == packed_lines([]) == b""


def test_captured_usages_survive_a_failing_sink(tmp_path: Path) -> None:
    """Usages queued by requests are spooled as whole records when a sink is down, then re-sent exactly once."""
    out = tmp_path / "records.jsonl"
    settings = Settings.from_env(
        {},
        metering_spool=str(tmp_path / "spool.jsonl"),
        metering_sinks=(f"jsonl:{out}", "callback:tests.test_metering_batch:keeping_sink"),
    )
    m = Meter(settings, "inst", platform_name="cloudrun")
    first, second = usages(30, seed=1), usages(5, seed=2)
    DOWN[0], SEEN[:] = True, []
    for usage in first:
        m.submit_usage(usage)
    m.flush()
    assert m.failures == 3 and m.spooled == 30 and not SEEN
    DOWN[0] = False
    for usage in second:
        m.submit_usage(usage)
    m.flush()
    (got,) = SEEN
    want = [m.complete(u) for u in first + second]
    assert sorted(got, key=repr) == sorted(want, key=repr)
    written = [MeteringRecord(**json.loads(line)) for line in out.read_text().splitlines()]
    assert written == want  # the healthy sink got each once, in order
    assert not list(tmp_path.glob("spool.jsonl*"))


class CountingStdout:
    """A stdout whose binary buffer counts writes, and fails while ``down``."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.down = False
        self.buffer = self

    def write(self, data: bytes | bytearray) -> int:
        if self.down:
            raise BrokenPipeError("stdout closed")
        self.writes.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass


def test_stdout_sinks_keep_records_when_stdout_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = CountingStdout()
    monkeypatch.setattr("sys.stdout", out)
    m = meter(tmp_path, "lambda", metering_sinks=("log", "emf"))
    for usage in usages(3, seed=4):
        m.submit_usage(usage)
    m.flush()
    log_lines, emf_lines = (out.writes[0].splitlines(), out.writes[1].splitlines())  # one write a sink
    assert [json.loads(line)["event"] for line in log_lines] == ["metering"] * 3
    assert all("_aws" in json.loads(line) for line in emf_lines)

    out.down = True  # stdout broken: nothing is lost, each sink's records are spooled
    second = usages(2, seed=5)
    for usage in second:
        m.submit_usage(usage)
    m.flush()
    assert m.failures == 6 and m.spooled == 4 and len(out.writes) == 2  # three tries a sink
    out.down = False
    m.flush()  # re-sent from the spools
    resent = [json.loads(line) for write in out.writes[2:] for line in write.splitlines()]
    assert sorted(line["request_id"] for line in resent if line.get("event") == "metering") == sorted(
        u.request_id for u in second
    )
    assert sum(line["Requests"][0] for line in resent if "_aws" in line) == 2
    assert not list(tmp_path.glob("spool.jsonl*"))


@pytest.mark.parametrize("platform", ["lambda", "cloudrun", "local"])
def test_one_request_lines_equal_those_of_its_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, platform: str
) -> None:
    """A Lambda invocation's flush makes its lines from templates (``sink.one``): the same members and values."""
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1769")
    monkeypatch.setattr("time.time", lambda: 1_790_000_000.25)  # the EMF Timestamp
    m = meter(tmp_path, platform)
    sinks = [LogSink(), LogSink(packed=True), EmfSink("oclaw")]
    odd = [u._replace(model='50%s "off"', tenant="%d\\n") for u in usages(20, seed=13)]  # % and escapes
    for _ in range(2):
        for usage in usages(300, seed=12) + odd:
            billed = m.billed_ms(usage)
            for sink in sinks:
                line = sink.one(m, usage, billed)
                (want,) = sink.lines([m.complete(usage)]).splitlines()
                assert line.endswith(b"\n") and line.count(b"\n") == 1
                assert json.loads(line) == json.loads(want)
        m.instance_id = "restored"  # the lines follow the meter (a SnapStart restore's new identity)
    (record,) = unpack(json.loads(LogSink().one(m, usage, m.billed_ms(usage))))
    assert record == m.complete(usage).as_dict() | {"event": "metering"} and record["instance_id"] == "restored"


def test_a_lambda_flush_of_one_request_writes_once_and_keeps_the_record_when_stdout_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = CountingStdout()
    monkeypatch.setattr("sys.stdout", out)
    m = meter(tmp_path, "lambda", metering_sinks=("log:packed", "emf"))
    first, second = usages(2, seed=14)
    m.submit_usage(first)
    m.flush()
    (written,) = out.writes  # the record line and the EMF line: one write (one syscall a Lambda invocation)
    log_line, emf_line = (json.loads(line) for line in written.splitlines())
    assert log_line == m.complete(first).as_dict() | {"event": "metering"}
    assert emf_line["Requests"] == [1.0] and emf_line["LatencyMs"] == [first.total_us / 1000]

    out.down = True
    m.submit_usage(second)
    m.flush()
    assert m.failures == 1 and m.spooled == 2  # each sink's record spooled
    out.down = False
    m.flush()
    resent = [json.loads(line) for write in out.writes[1:] for line in write.splitlines()]
    assert [line for line in resent if line.get("event") == "metering"] == [
        m.complete(second).as_dict() | {"event": "metering"}
    ]
    assert sum(line.get("Requests", [0])[0] for line in resent) == 1


def test_lines_are_written_after_what_the_stream_holds(tmp_path: Path) -> None:
    from awslambdaric.bootstrap import Unbuffered

    from engine.metering.sinks import write

    path = tmp_path / "out"
    with path.open("w", encoding="utf-8") as text:
        text.write("held in the text buffer\n")  # not flushed yet: written before the lines
        write(text, b"line 1\n")
        wrapped = Unbuffered(text)  # Lambda's stdout: flushes after each write
        wrapped.write("through the wrapper\n")
        write(wrapped, b"line 2\n" * 3)
        assert path.read_text() == "held in the text buffer\nline 1\nthrough the wrapper\n" + "line 2\n" * 3


class FlakyLineSink(LineSink):
    """A stdout line sink that fails the first time, after making its lines."""

    def __init__(self) -> None:
        self.calls = 0

    def lines(self, records: Sequence[MeteringRecord]) -> bytes | bytearray:
        self.calls += 1
        made = json_lines(records)
        if self.calls == 1:
            raise ConnectionError("failed after making its lines")
        return made


def test_a_line_sink_failing_once_writes_nothing_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = CountingStdout()
    monkeypatch.setattr("sys.stdout", out)
    m = meter(tmp_path, "local", metering_sinks=("none",))
    m.sinks = [FlakyLineSink()]
    m.submit_usage(usages(1)[0])
    m.flush()
    (written,) = out.writes
    assert len(written.splitlines()) == 1 and m.failures == 1  # the retry's line only


def _canonical(records: list[dict[str, object]]) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True) for r in records)


@pytest.mark.parametrize("size", [3, 40, 400])  # few share their second, tenant, model, bill...; then many do
@pytest.mark.parametrize("platform", ["cloudrun", "lambda"])
def test_packed_lines_unpack_to_exactly_the_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, platform: str, size: int
) -> None:
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1769")
    m = meter(tmp_path, platform)
    records = [m.complete(u) for u in usages(size, seed=11)] + [one(m, total_ms=2.5)]
    lines = [json.loads(line) for line in packed_lines(records, "metering").splitlines()]
    want = [r.as_dict() | {"event": "metering"} for r in records]
    assert _canonical([r for line in lines for r in unpack(line)]) == _canonical(want)
    packed = [line for line in lines if "requests" in line]
    assert all(line["requests"] == len(line["request_id"]) >= 2 for line in packed)
    if size == 400:
        assert packed and len(lines) < size  # requests sharing second, tenant, model, bill... share a line
    same = [records[0]] + [replace(records[0], request_id=f"again-{i}") for i in range(2)]
    (line,) = packed_lines(same, "metering").splitlines()  # a few that share everything: one line
    assert unpack(json.loads(line)) == [r.as_dict() | {"event": "metering"} for r in same]


def test_packed_lines_hold_at_most_pack_requests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch_module, "PACK", 7)
    m = meter(tmp_path, "cloudrun")
    fixed = {"tenant": "t", "model": "m", "version": "1", "cold": False, "init_ms": 0.0, "status": 200}
    same = [u._replace(**fixed, second=1_790_000_000, total_us=400, source="http") for u in usages(30, seed=5)]
    lines = [json.loads(line) for line in packed_lines([m.complete(u) for u in same], "metering").splitlines()]
    assert [line["requests"] for line in lines] == [7, 7, 7, 7, 2]
    got = [r for line in lines for r in unpack(line)]
    assert [r["request_id"] for r in got] == [u.request_id for u in same]  # one group: served order kept
    assert _canonical(got) == _canonical([m.complete(u).as_dict() | {"event": "metering"} for u in same])


def test_unpack_refuses_a_malformed_packed_line() -> None:
    line = {"requests": 2, "request_id": ["a", "b"], "items": [1], "bytes_in": [1, 1], "bytes_out": [1, 1]}
    with pytest.raises(ValueError, match="2 requests"):
        unpack(line | {"queue_ms": [0.1, 0.1], "compute_ms": [0.1, 0.1], "total_ms": [0.1, 0.1]})
    assert unpack({"request_id": "r", "cost_usd": 0.0}) == [{"request_id": "r", "cost_usd": 0.0}]


def test_log_sink_packed_and_metrics_only_sinks(tmp_path: Path) -> None:
    sink = make_sink("log:packed")
    assert isinstance(sink, LogSink) and sink.packed and not LogSink().packed
    with pytest.raises(ValueError, match="log:packed"):
        make_sink("log:fancy")
    m = meter(tmp_path, "cloudrun")
    records = [m.complete(u) for u in usages(50, seed=2)]
    assert sink.lines(records) == packed_lines(records, "metering")
    assert LogSink().lines(records) == json_lines(records, "metering")

    usage = usages(1)[0]
    emf_only = meter(tmp_path, "lambda", metering_sinks=("emf",))  # metrics only: no records kept, no header
    assert not emf_only.records_out and emf_only.submit_usage(usage) is None
    both = meter(tmp_path, "lambda", metering_sinks=("log", "emf"))
    assert both.records_out and isinstance(both.submit_usage(usage), bytes)
    both.sinks = [s for s in both.sinks if isinstance(s, EmfSink)]  # the header follows the sinks
    assert both.submit_usage(usage) is None


def test_usage_command_reads_packed_lines(tmp_path: Path) -> None:
    import csv
    import io
    import subprocess
    import sys

    from tests.conftest import ROOT

    m = meter(tmp_path, "cloudrun")
    records = [m.complete(u) for u in usages(300, seed=9)]
    log = tmp_path / "server.log"
    log.write_text(
        "INFO started\n" + "".join(f"stdout: {x}\n" for x in packed_lines(records, "metering").decode().splitlines())
    )
    out = subprocess.run(
        [sys.executable, "-m", "handler.cli", "usage", str(log), "--by", "tenant", "--csv"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    rows = {row["tenant"]: int(row["requests"]) for row in csv.DictReader(io.StringIO(out.stdout))}
    want: dict[str, int] = {}
    for record in records:
        want[record.tenant] = want.get(record.tenant, 0) + 1
    assert rows == want and sum(rows.values()) == 300


def test_usage_command_names_a_packed_line_that_does_not_add_up(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    m = meter(tmp_path, "cloudrun")
    lines = [json.loads(x) for x in packed_lines([m.complete(u) for u in usages(300, seed=9)], "metering").splitlines()]
    line = next(x for x in lines if "requests" in x)
    line["requests"] += 1  # the lists hold one request fewer than it says
    log = tmp_path / "bad.log"
    log.write_bytes(b"not json\n\xff\xfe binary noise\n" + json.dumps(line).encode() + b"\n")
    out = subprocess.run(
        [sys.executable, "-m", "handler.cli", "usage", str(log)], check=False, capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{log}: packed metering line: {line['requests']} requests" in out.stderr
