"""Metering sinks: records a failing, refusing or hung sink holds are spooled, sent once and never lost."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit

import pytest

from engine.metering.records import MeteringRecord, Usage
from engine.metering.sinks import PartialFailure
from handler.local_lambda import LocalLambda
from tests.conftest import AWS_ENV, ROOT, use_moto
from tests.meterkit import Gate, meter, one

EVENTS = Path(__file__).parent / "events"
CALLS: list[int] = []


def flaky_sink(records: Sequence[MeteringRecord]) -> None:
    """A callback sink that is down while CALLS holds a negative number."""
    if CALLS and CALLS[-1] < 0:
        CALLS.append(-1)
        raise ConnectionError("sink down")
    CALLS.append(len(records))


def test_a_failing_sink_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    out = tmp_path / "records.jsonl"
    m = meter(tmp_path, "local", metering_sinks=(f"jsonl:{out}", "callback:tests.test_metering:flaky_sink"))
    CALLS[:] = [-1]  # the callback sink is down
    m.submit([one(m, total_ms=1) for _ in range(3)])
    m.flush()
    assert m.failures == 3 and m.spooled == 3
    assert len(out.read_text().splitlines()) == 3  # the healthy sink got them once
    CALLS[:] = []  # back up
    m.submit([one(m, total_ms=1)])
    m.flush()
    assert CALLS == [4]  # the 3 spooled + the new one
    assert len(out.read_text().splitlines()) == 4  # not 7: the healthy sink never sees a record twice
    assert not list(tmp_path.glob("spool.jsonl*"))
    with pytest.raises(ValueError, match="unknown metering sink"):
        meter(tmp_path, "local", metering_sinks=("carrier-pigeon",))


class RefusesOnce:
    """A sink whose batch API refuses the even-numbered records once (what SQS/Kinesis batch calls can do)."""

    seen: ClassVar[list[str]] = []
    refused: ClassVar[set[str]] = set()

    def emit(self, records: Sequence[MeteringRecord]) -> None:
        failed = [r for r in records if int(r.request_id) % 2 == 0 and r.request_id not in self.refused]
        self.refused.update(r.request_id for r in failed)
        self.seen.extend(r.request_id for r in records if r not in failed)
        if failed:
            raise PartialFailure(f"refused {len(failed)}", failed)


def test_only_refused_records_are_retried(tmp_path: Path) -> None:
    m = meter(tmp_path, "local", metering_sinks=("class:tests.test_metering:RefusesOnce",))
    records = m.records(
        request_ids=[str(i) for i in range(6)],
        tenants=["t"] * 6,
        model="m",
        version="1",
        items=[1] * 6,
        bytes_in=[1] * 6,
        bytes_out=[1] * 6,
        statuses=[200] * 6,
        queue_ms=[0.0] * 6,
        compute_ms=6,
        total_ms=6,
        source="test",
    )
    m.submit(records)
    m.flush()
    assert sorted(RefusesOnce.seen, key=int) == [str(i) for i in range(6)]  # each exactly once
    assert m.failures == 1 and m.spooled == 0


def test_queue_sinks_deliver_batches_over_real_http(tmp_path: Path, moto: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    from engine import aws

    use_moto(moto, monkeypatch)
    sqs = boto3.client("sqs")
    queue = sqs.create_queue(QueueName="metering")["QueueUrl"]
    kinesis = boto3.client("kinesis")
    kinesis.create_stream(StreamName="metering", ShardCount=1)
    m = meter(tmp_path, "local", metering_sinks=(f"sqs:{queue}", "kinesis:metering"))
    n = 23  # three SQS batches (10 a call)
    m.submit(
        m.records(
            request_ids=[f"r{i}" for i in range(n)],
            tenants=["t"] * n,
            model="m",
            version="1",
            items=[1] * n,
            bytes_in=[1] * n,
            bytes_out=[1] * n,
            statuses=[200] * n,
            queue_ms=[0.0] * n,
            compute_ms=1,
            total_ms=n,
            source="test",
        )
    )
    m.flush()
    assert m.failures == 0
    got: list[str] = []
    while batch := sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10).get("Messages", []):
        got += [json.loads(msg["Body"])["request_id"] for msg in batch]
        for msg in batch:
            sqs.delete_message(QueueUrl=queue, ReceiptHandle=msg["ReceiptHandle"])
    assert sorted(got) == sorted(f"r{i}" for i in range(n))
    shard = kinesis.describe_stream(StreamName="metering")["StreamDescription"]["Shards"][0]["ShardId"]
    iterator = kinesis.get_shard_iterator(StreamName="metering", ShardId=shard, ShardIteratorType="TRIM_HORIZON")[
        "ShardIterator"
    ]
    data = kinesis.get_records(ShardIterator=iterator)["Records"]
    assert sorted(json.loads(r["Data"])["request_id"] for r in data) == sorted(f"r{i}" for i in range(n))
    sqs.close()
    kinesis.close()
    aws.reset()


def _spooled(spool: Path) -> list[dict[str, object]]:
    """The records in a sink's spool files (``spool`` is OCLAW_METERING_SPOOL; sink 0)."""
    files = sorted(spool.parent.glob(f"{spool.name}.0.*"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


def _drain(sqs: object, queue: str) -> list[dict[str, object]]:
    """Every message body on ``queue``, deleted once read."""
    got = []
    while batch := sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10).get("Messages", []):  # type: ignore[attr-defined]
        got += [json.loads(msg["Body"]) for msg in batch]
        for msg in batch:
            sqs.delete_message(QueueUrl=queue, ReceiptHandle=msg["ReceiptHandle"])  # type: ignore[attr-defined]
    return got


def test_a_hung_queue_sink_does_not_fail_the_lambda_invocation(repo: Path, tmp_path: Path, moto: str) -> None:
    """An SQS endpoint that accepts and never answers: the invocation returns its response before its deadline,
    the record is spooled, and once SQS answers again a later invocation's flush sends it, exactly once."""
    import boto3

    sqs = boto3.client("sqs", endpoint_url=moto, region_name="us-east-1", **_credentials())
    queue = sqs.create_queue(QueueName="hung-metering")["QueueUrl"]
    spool = tmp_path / "spool.jsonl"
    http = json.loads((EVENTS / "apigw_v2_infer.json").read_text())
    moto_address = urlsplit(moto)
    with Gate((moto_address.hostname or "", moto_address.port or 0)) as gate:
        env = {
            **AWS_ENV,
            "AWS_ENDPOINT_URL_SQS": gate.url,
            "OCLAW_MODEL_REPOSITORY": str(repo),
            "OCLAW_METERING_SINKS": f"sqs:{queue}",
            "OCLAW_METERING_SPOOL": str(spool),
            "OCLAW_METRICS": "false",
            "OCLAW_LAMBDA_RESERVE_MS": "1000",
        }
        with LocalLambda(env=env, cwd=ROOT, timeout_s=6, log=tmp_path / "log") as fn:
            fn.wait_init()
            hung = fn.invoke(http)
            assert not hung.timed_out and hung.error is None, (tmp_path / "log").read_text()[-3000:]
            answer = hung.json()
            assert answer["statusCode"] == 200 and len(json.loads(answer["body"])["outputs"]) == 2
            assert gate.held  # the sink did reach the endpoint, which never answered
            (spooled,) = _spooled(spool)
            assert spooled["source"] == "lambda-http" and not _drain(sqs, queue)
            gate.open()  # SQS answers again
            healthy = fn.invoke(http)
            assert healthy.error is None and healthy.json()["statusCode"] == 200
        got = _drain(sqs, queue)
    assert len(got) == 2 and spooled in got  # the spooled record, once and as it was, and the new one
    assert len({r["request_id"] for r in got}) == 2
    assert not _spooled(spool)
    sqs.close()


def _credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": AWS_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS_ENV["AWS_SECRET_ACCESS_KEY"],
    }


class Hangs:
    """A sink that hangs on its first batch until RELEASE is set (a sink with no timeout of its own)."""

    got: ClassVar[list[str]] = []
    hanging = threading.Event()
    release = threading.Event()

    def emit(self, records: Sequence[MeteringRecord]) -> None:
        if not self.release.is_set():
            self.hanging.set()
            self.release.wait()
        self.got.extend(r.request_id for r in records)


def test_a_hung_sink_keeps_the_server_queue_bounded_and_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "records.jsonl"
    m = meter(tmp_path, "cloudrun", metering_sinks=("class:tests.test_metering:Hangs", f"jsonl:{out}"))
    m.max_queued = 100
    Hangs.got.clear()
    m.start_flusher(interval_s=0.01)
    try:
        m.submit_usage(Usage("r0", "t", "m", "1", 1, 10, 20, 0, 50, 150, 0.0, False, "http", 1_790_000_000))
        assert Hangs.hanging.wait(60)  # the flush thread is stuck in the sink
        longest = 0
        for i in range(1, 1001):
            m.submit_usage(Usage(f"r{i}", "t", "m", "1", 1, 10, 20, 0, 50, 150, 0.0, False, "http", 1_790_000_000))
            longest = max(longest, len(m._usage))
        assert longest <= 100  # not 1,000 usages held in memory behind the stuck flush
        m.wait_spilled()  # spooled by a thread of its own, not by the request that crossed the bound
        assert len(_spooled(tmp_path / "spool.jsonl")) >= 900  # they wait on disk instead
    finally:
        Hangs.release.set()
        m.close()
    m.flush()
    want = [f"r{i}" for i in range(1001)]
    assert sorted(Hangs.got) == sorted(want)  # each exactly once
    assert sorted(json.loads(line)["request_id"] for line in out.read_text().splitlines()) == sorted(want)
    assert not list(tmp_path.glob("spool.jsonl*"))


#: Run in a child process: a Meter whose sink takes the spooled records, tells the test so, then stalls.
RESEND_AND_STALL = """
import sys, time
from pathlib import Path
from engine.config import Settings
from engine.metering.meter import Meter
spool, marker = sys.argv[1], Path(sys.argv[2])
def stall(records):
    marker.write_text(str(len(records)))
    time.sleep(600)
import __main__
__main__.stall = stall
meter = Meter(Settings.from_env({}, metering_spool=spool, metering_sinks=("callback:__main__:stall",)), "child")
meter.flush()
"""


def test_a_crash_during_a_resend_loses_nothing(tmp_path: Path) -> None:
    """A process killed (SIGKILL) while its sink holds the spooled records: none is lost, none sent twice."""
    spool = tmp_path / "spool.jsonl"
    m = meter(tmp_path, "local", metering_sinks=("callback:tests.test_metering:flaky_sink",))
    CALLS[:] = [-1]  # the sink is down: the records are spooled
    m.submit([one(m, total_ms=1) for _ in range(3)])
    m.flush()
    assert m.spooled == 3
    marker = tmp_path / "resending"
    child = subprocess.Popen([sys.executable, "-c", RESEND_AND_STALL, str(spool), str(marker)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None and time.monotonic() < deadline, "the child never re-sent the spool"
            time.sleep(0.05)
        assert marker.read_text() == "3"
        CALLS[:] = []  # the sink is up again
        again = meter(tmp_path, "local", metering_sinks=("callback:tests.test_metering:flaky_sink",))
        again.flush()
        assert CALLS == []  # the live child holds them: not sent twice
    finally:
        child.kill()  # SIGKILL mid-re-send: no cleanup runs
        child.wait()
    again.flush()
    assert CALLS == [3]  # what the dead child held, sent once
    assert not list(tmp_path.glob("spool.jsonl*"))


class RefusesOdd:
    """A batch API that takes even request ids and refuses odd ones while ``picky`` (and everything while ``down``)."""

    taken: ClassVar[list[str]] = []
    state: ClassVar[dict[str, bool]] = {"down": True, "picky": True}

    def emit(self, records: Sequence[MeteringRecord]) -> None:
        if self.state["down"]:
            raise ConnectionError("down")
        refused = [r for r in records if self.state["picky"] and int(r.request_id) % 2]
        self.taken.extend(r.request_id for r in records if r not in refused)
        if refused:
            raise PartialFailure(f"refused {len(refused)}", refused)


def test_a_spool_file_keeps_only_what_its_sink_refused(tmp_path: Path) -> None:
    m = meter(tmp_path, "local", metering_sinks=("class:tests.test_metering:RefusesOdd",))
    RefusesOdd.taken.clear()
    RefusesOdd.state.update(down=True, picky=True)
    n = 6
    m.submit(
        m.records(
            request_ids=[str(i) for i in range(n)], tenants=["t"] * n, model="m", version="1", items=[1] * n,
            bytes_in=[1] * n, bytes_out=[1] * n, statuses=[200] * n, queue_ms=[0.0] * n, compute_ms=1, total_ms=n,
            source="test",
        )
    )  # fmt: skip
    m.flush()
    assert len(_spooled(tmp_path / "spool.jsonl")) == n and not RefusesOdd.taken
    RefusesOdd.state["down"] = False
    m.flush()
    assert sorted(RefusesOdd.taken) == ["0", "2", "4"]
    assert sorted(r["request_id"] for r in _spooled(tmp_path / "spool.jsonl")) == ["1", "3", "5"]  # only those
    RefusesOdd.state["picky"] = False
    m.flush()
    assert sorted(RefusesOdd.taken) == [str(i) for i in range(n)]  # each once
    assert not list(tmp_path.glob("spool.jsonl*"))
