"""S3 and SQS events against moto's server over real HTTP (boto3), faults injected at the boto3 boundary."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import boto3
import numpy as np
import onnxruntime as ort
import pytest
from botocore.exceptions import ClientError
from PIL import Image

from engine import aws as aws_clients
from engine.config import Settings
from engine.runtime import Runtime
from handler import s3_events, sqs_events
from handler.local_lambda import LocalLambda
from tests.conftest import AWS_ENV, ROOT, use_moto

BUCKET = "oclaw-data"


def forever() -> float:
    return 900_000.0


@pytest.fixture()
def aws(moto: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    use_moto(moto, monkeypatch)
    s3 = boto3.client("s3", endpoint_url=moto, region_name="us-east-1")
    sqs = boto3.client("sqs", endpoint_url=moto, region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    yield {"s3": s3, "sqs": sqs, "url": moto}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for obj in page.get("Contents", []):
            s3.delete_object(Bucket=BUCKET, Key=obj["Key"])
    s3.close()
    sqs.close()
    aws_clients.reset()


@pytest.fixture(scope="module")
def runtime(repo: Path) -> Iterator[Runtime]:
    settings = Settings.from_env(
        {}, model_repository=str(repo), preload=("add_sub", "mlp", "tiny_classifier", "fixed"), s3_chunk_lines=10
    )
    rt = Runtime(settings)
    rt.preload()
    yield rt
    rt.close()


def s3_event(*keys: str, bucket: str = BUCKET) -> dict[str, Any]:
    return {
        "Records": [
            {
                "eventVersion": "2.1",
                "eventSource": "aws:s3",
                "awsRegion": "us-east-1",
                "eventTime": "2026-11-27T06:30:00.000Z",
                "eventName": "ObjectCreated:Put",
                "s3": {
                    "s3SchemaVersion": "1.0",
                    "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
                    "object": {"key": quote_plus(key), "size": 1, "sequencer": "0055AED6DCD90281E5"},
                },
            }
            for key in keys
        ]
    }


def add_sub_line(i: int) -> dict[str, Any]:
    return {
        "id": f"line-{i}",
        "inputs": [
            {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": [float(i)] * 16},
            {"name": "INPUT1", "datatype": "FP32", "shape": [1, 16], "data": [1.0] * 16},
        ],
    }


def put(aws: dict[str, Any], key: str, body: bytes) -> None:
    aws["s3"].put_object(Bucket=BUCKET, Key=key, Body=body)


def get(aws: dict[str, Any], key: str) -> bytes:
    return bytes(aws["s3"].get_object(Bucket=BUCKET, Key=key)["Body"].read())


def keys(aws: dict[str, Any], prefix: str = "") -> list[str]:
    pages = aws["s3"].get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def jsonl(lines: list[dict[str, Any] | str]) -> bytes:
    return "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines).encode() + b"\n"


def check_jsonl_output(body: bytes, expected_ids: list[int]) -> None:
    rows = [json.loads(line) for line in body.splitlines()]
    assert [r["id"] for r in rows] == [f"line-{i}" for i in expected_ids]  # each line once, in order
    for i, row in zip(expected_ids, rows, strict=True):
        assert row["outputs"][0]["data"] == [float(i) + 1] * 16


def test_jsonl_object_is_batched_and_bad_lines_are_reported(aws: dict[str, Any], runtime: Runtime) -> None:
    lines: list[dict[str, Any] | str] = [add_sub_line(i) for i in range(25)]
    lines.insert(7, "{not json")
    lines.insert(12, {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]})
    put(aws, "input/add_sub/day 1/batch.jsonl", jsonl(lines))
    result = s3_events.handle(s3_event("input/add_sub/day 1/batch.jsonl"), None, runtime, remaining_ms=forever)
    assert result["processed"][0]["lines"] == 27
    rows = [json.loads(line) for line in get(aws, "output/add_sub/day 1/batch.jsonl.out.jsonl").splitlines()]
    assert len(rows) == 27
    assert rows[7]["line"] == 8 and "malformed JSON" in rows[7]["error"]
    assert rows[12]["line"] == 13 and "dimension 1 must be 16" in rows[12]["error"]
    good = [r for r in rows if "error" not in r]
    check_jsonl_output(b"\n".join(json.dumps(r).encode() for r in good), list(range(25)))
    assert keys(aws, "output/add_sub/day 1/batch.jsonl.out.jsonl.parts/") == []  # parts cleaned up
    stats = runtime.pool.get("add_sub").stats.as_dict("add_sub", "1")
    assert stats["execution_count"] >= 3  # 25 good lines in chunks of 10 lines, several rows per run


def test_tensor_objects_npy_and_npz(aws: dict[str, Any], runtime: Runtime, repo: Path) -> None:
    x = np.random.default_rng(0).standard_normal((37, 64)).astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, x)
    put(aws, "input/mlp/x.npy", buf.getvalue())
    a, b = np.ones((5, 16), np.float32), np.full((5, 16), 2.0, np.float32)
    buf = io.BytesIO()
    np.savez(buf, INPUT0=a, INPUT1=b)
    put(aws, "input/add_sub/ab.npz", buf.getvalue())
    s3_events.handle(s3_event("input/mlp/x.npy", "input/add_sub/ab.npz"), None, runtime, remaining_ms=forever)
    got = np.load(io.BytesIO(get(aws, "output/mlp/x.npy.out.npy")))
    sess = ort.InferenceSession(str(repo / "mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(got, sess.run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)
    both = np.load(io.BytesIO(get(aws, "output/add_sub/ab.npz.out.npz")))
    np.testing.assert_array_equal(both["OUTPUT0"], a + b)
    np.testing.assert_array_equal(both["OUTPUT1"], a - b)


def test_image_object_and_bad_objects_do_not_fail_the_others(aws: dict[str, Any], runtime: Runtime) -> None:
    img = io.BytesIO()
    Image.new("RGB", (9, 9), (0, 0, 255)).save(img, format="PNG")
    put(aws, "input/tiny_classifier/blue.png", img.getvalue())
    put(aws, "input/mlp/garbage.npy", b"definitely not numpy")
    put(aws, "input/nope/x.jsonl", jsonl([add_sub_line(1)]))
    put(aws, "input/mlp/notes.txt", b"hello")
    event = s3_event(
        "input/mlp/garbage.npy",
        "input/tiny_classifier/blue.png",
        "input/nope/x.jsonl",
        "input/mlp/notes.txt",
        "elsewhere/x.jsonl",
    )
    result = s3_events.handle(event, None, runtime, remaining_ms=forever)
    labels = json.loads(get(aws, "output/tiny_classifier/blue.png.out.json"))["outputs"][0]["data"]
    assert len(labels) == 2 and {x.split(":")[2] for x in labels} <= {"red", "green", "blue"}
    assert "not a readable .npy" in json.loads(get(aws, "output/mlp/garbage.npy.out.npy.error.json"))["error"]
    assert "unknown model 'nope'" in json.loads(get(aws, "output/nope/x.jsonl.out.jsonl.error.json"))["error"]
    assert "unsupported object type .txt" in json.loads(get(aws, "output/mlp/notes.txt.out.error.json"))["error"]
    assert result["processed"][-1]["skipped"] == "not under the input prefix"


def test_test_event_is_ignored_and_a_retry_of_the_same_version_is_skipped(
    aws: dict[str, Any], runtime: Runtime
) -> None:
    assert s3_events.handle({"Event": "s3:TestEvent", "Bucket": BUCKET}, None, runtime, remaining_ms=forever) == {
        "ignored": "s3:TestEvent"
    }
    put(aws, "input/add_sub/once.jsonl", jsonl([add_sub_line(3)]))
    s3_events.handle(s3_event("input/add_sub/once.jsonl"), None, runtime, remaining_ms=forever)
    first = get(aws, "output/add_sub/once.jsonl.out.jsonl")
    again = s3_events.handle(s3_event("input/add_sub/once.jsonl"), None, runtime, remaining_ms=forever)
    assert again["processed"][0]["skipped"] == "already done for this object version"
    assert get(aws, "output/add_sub/once.jsonl.out.jsonl") == first


def countdown(checks: int) -> Callable[[], float]:
    """A Lambda clock with plenty of time for ``checks`` readings, then none."""
    state = {"n": 0}

    def remaining() -> float:
        state["n"] += 1
        return 900_000.0 if state["n"] <= checks else 0.0

    return remaining


def test_deadline_mid_object_resumes_with_nothing_lost_or_doubled(aws: dict[str, Any], runtime: Runtime) -> None:
    put(aws, "input/add_sub/long.jsonl", jsonl([add_sub_line(i) for i in range(95)]))
    event = s3_event("input/add_sub/long.jsonl")
    with pytest.raises(s3_events.Incomplete, match="stopped at line 30 of 95"):
        s3_events.handle(event, None, runtime, remaining_ms=countdown(3))
    assert len(keys(aws, "output/add_sub/long.jsonl.out.jsonl.parts/")) == 3
    assert "output/add_sub/long.jsonl.out.jsonl" not in keys(aws, "output/")  # no partial result visible
    with pytest.raises(s3_events.Incomplete, match="stopped at line 60 of 95"):
        s3_events.handle(event, None, runtime, remaining_ms=countdown(3))
    s3_events.handle(event, None, runtime, remaining_ms=forever)
    check_jsonl_output(get(aws, "output/add_sub/long.jsonl.out.jsonl"), list(range(95)))
    assert keys(aws, "output/add_sub/long.jsonl.out.jsonl.parts/") == []


def inject(service: str, operation: str, failures: list[str]) -> None:
    """Make the next calls of ``operation`` fail with these error codes (at the boto3 boundary)."""

    def hook(**_: Any) -> None:
        if failures:
            code = failures.pop(0)
            raise ClientError({"Error": {"Code": code, "Message": f"injected {code}"}}, operation)

    aws_clients.client(service).meta.events.register(f"before-call.{service}.{operation}", hook)


@pytest.mark.parametrize(
    ("operation", "codes"),
    [
        ("GetObject", ["InternalError"]),
        ("PutObject", ["SlowDown"]),
        ("PutObject", ["ServiceUnavailable"] * 2),
        ("ListObjectsV2", ["RequestTimeout"]),
    ],
)
def test_s3_faults_then_retries_lose_and_double_nothing(
    aws: dict[str, Any], runtime: Runtime, operation: str, codes: list[str]
) -> None:
    put(aws, "input/add_sub/faulty.jsonl", jsonl([add_sub_line(i) for i in range(42)]))
    event = s3_event("input/add_sub/faulty.jsonl")
    failures = list(codes)
    inject("s3", operation, failures)
    tries = 0
    while True:  # what Lambda's async retries do: run the same event again
        tries += 1
        try:
            s3_events.handle(event, None, runtime, remaining_ms=forever)
            break
        except ClientError as exc:
            assert exc.response["Error"]["Code"] in codes
        assert tries < 5
    assert tries == len(codes) + 1 and failures == []
    check_jsonl_output(get(aws, "output/add_sub/faulty.jsonl.out.jsonl"), list(range(42)))
    assert keys(aws, "output/add_sub/faulty.jsonl.out.jsonl.parts/") == []


# -- SQS ----------------------------------------------------------------------------------------------------------


def sqs_record(message_id: str, body: Any, group: str | None = None) -> dict[str, Any]:
    attributes = {"ApproximateReceiveCount": "1", "SentTimestamp": "1795761000000"}
    if group is not None:
        attributes |= {"MessageGroupId": group, "SequenceNumber": "1"}
    return {
        "messageId": message_id,
        "receiptHandle": f"rh-{message_id}",
        "body": body if isinstance(body, str) else json.dumps(body),
        "attributes": attributes,
        "messageAttributes": {},
        "md5OfBody": "x",
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:oclaw-in",
        "awsRegion": "us-east-1",
    }


def request_body(i: int, reply_to: str | None = None, **extra: Any) -> dict[str, Any]:
    body = {"model_name": "add_sub", **add_sub_line(i), **extra}
    if reply_to is not None:
        body["reply_to"] = reply_to
    return body


def test_sqs_batch_reports_exactly_the_failed_records(aws: dict[str, Any], runtime: Runtime) -> None:
    dest = f"s3://{BUCKET}/results"
    records = [sqs_record(f"m{i}", request_body(i, dest)) for i in range(10)]
    records.insert(3, sqs_record("poison", "{{{ not json"))
    records.insert(6, sqs_record("badshape", {**request_body(0, dest), "inputs": [{"name": "INPUT0"}]}))
    records.append(sqs_record("nomodel", {**request_body(0, dest), "model_name": "nope"}))
    result = sqs_events.handle({"Records": records}, None, runtime, remaining_ms=forever)
    assert result == {"batchItemFailures": [{"itemIdentifier": m} for m in ("poison", "badshape", "nomodel")]}
    assert keys(aws, "results/") == sorted(f"results/m{i}.json" for i in range(10))
    for i in range(10):
        assert json.loads(get(aws, f"results/m{i}.json"))["outputs"][0]["data"] == [float(i) + 1] * 16
    # a redelivery of the same messages overwrites the same keys with the same results
    before = {k: get(aws, k) for k in keys(aws, "results/")}
    sqs_events.handle({"Records": records}, None, runtime, remaining_ms=forever)
    assert {k: get(aws, k) for k in keys(aws, "results/")} == before


def test_sqs_fifo_fails_the_rest_of_a_failed_group(aws: dict[str, Any], runtime: Runtime) -> None:
    dest = f"s3://{BUCKET}/fifo"
    records = [
        sqs_record("a1", request_body(1, dest), "A"),
        sqs_record("b1", request_body(2, dest), "B"),
        sqs_record("a2", {**request_body(3, dest), "model_name": "nope"}, "A"),
        sqs_record("a3", request_body(4, dest), "A"),
        sqs_record("b2", request_body(5, dest), "B"),
    ]
    result = sqs_events.handle({"Records": records}, None, runtime, remaining_ms=forever)
    assert result == {"batchItemFailures": [{"itemIdentifier": "a2"}, {"itemIdentifier": "a3"}]}
    assert keys(aws, "fifo/") == ["fifo/a1.json", "fifo/b1.json", "fifo/b2.json"]


def test_sqs_reply_queue_default_destination_and_delivery_failure(
    aws: dict[str, Any], runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    reply = aws["sqs"].create_queue(QueueName="oclaw-replies")["QueueUrl"]
    records = [sqs_record("r1", request_body(7, reply)), sqs_record("r2", request_body(8))]
    result = sqs_events.handle({"Records": records}, None, runtime, remaining_ms=forever)
    assert result == {"batchItemFailures": [{"itemIdentifier": "r2"}]}  # no reply_to, no default: kept, not lost
    got = aws["sqs"].receive_message(QueueUrl=reply, MessageAttributeNames=["All"], WaitTimeSeconds=1)["Messages"]
    assert json.loads(got[0]["Body"])["outputs"][0]["data"] == [8.0] * 16
    assert got[0]["MessageAttributes"]["request_message_id"]["StringValue"] == "r1"
    inject("s3", "PutObject", ["SlowDown"])
    records = [
        sqs_record("d1", request_body(1, f"s3://{BUCKET}/d")),
        sqs_record("d2", request_body(2, f"s3://{BUCKET}/d")),
    ]
    result = sqs_events.handle({"Records": records}, None, runtime, remaining_ms=forever)
    # deliveries run concurrently: whichever PUT met the injected failure is the one reported, the other is written
    (failed,) = [f["itemIdentifier"] for f in result["batchItemFailures"]]
    delivered = ({"d1", "d2"} - {failed}).pop()
    assert keys(aws, "d/") == [f"d/{delivered}.json"]


def test_sqs_hands_everything_back_when_the_deadline_is_too_close(aws: dict[str, Any], runtime: Runtime) -> None:
    records = [sqs_record(f"t{i}", request_body(i, f"s3://{BUCKET}/t")) for i in range(3)]
    result = sqs_events.handle({"Records": records}, None, runtime, remaining_ms=lambda: 10.0)
    assert result == {"batchItemFailures": [{"itemIdentifier": f"t{i}"} for i in range(3)]}
    assert keys(aws, "t/") == []


def test_poison_message_reaches_the_dlq_after_max_receive_count(aws: dict[str, Any], runtime: Runtime) -> None:
    sqs = aws["sqs"]
    dlq = sqs.create_queue(QueueName="oclaw-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    source = sqs.create_queue(
        QueueName="oclaw-in",
        Attributes={
            "VisibilityTimeout": "0",
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "2"}),
        },
    )["QueueUrl"]
    sqs.send_message(QueueUrl=source, MessageBody=json.dumps(request_body(1, f"s3://{BUCKET}/q")))
    sqs.send_message(QueueUrl=source, MessageBody="poison: not json")
    for _ in range(4):  # what the event source mapping does: receive, invoke, delete the successes
        got = sqs.receive_message(QueueUrl=source, MaxNumberOfMessages=10).get("Messages", [])
        if not got:
            continue
        event = {"Records": [sqs_record(m["MessageId"], m["Body"]) for m in got]}
        failed = {
            f["itemIdentifier"]
            for f in sqs_events.handle(event, None, runtime, remaining_ms=forever)["batchItemFailures"]
        }
        for m in got:
            if m["MessageId"] not in failed:
                sqs.delete_message(QueueUrl=source, ReceiptHandle=m["ReceiptHandle"])
    dead = sqs.receive_message(QueueUrl=dlq, MaxNumberOfMessages=10).get("Messages", [])
    assert [m["Body"] for m in dead] == ["poison: not json"]
    assert sqs.receive_message(QueueUrl=source).get("Messages", []) == []
    assert len(keys(aws, "q/")) == 1


def test_s3_and_sqs_events_through_awslambdaric(aws: dict[str, Any], repo: Path, tmp_path: Path) -> None:
    put(aws, "input/add_sub/ric.jsonl", jsonl([add_sub_line(i) for i in range(12)]))
    buf = io.BytesIO()
    np.save(buf, np.zeros((3, 64), np.float32))
    put(aws, "input/mlp/ric.npy", buf.getvalue())
    buf = io.BytesIO()
    np.savez(buf, INPUT0=np.ones((2, 16), np.float32), INPUT1=np.ones((2, 16), np.float32))
    put(aws, "input/add_sub/ric.npz", buf.getvalue())
    img = io.BytesIO()
    Image.new("RGB", (12, 8), (200, 10, 10)).save(img, format="PNG")
    put(aws, "input/tiny_classifier/ric.png", img.getvalue())
    env = {"OCLAW_MODEL_REPOSITORY": str(repo), "AWS_ENDPOINT_URL": aws["url"], **AWS_ENV}
    with LocalLambda(env=env, cwd=ROOT, log=tmp_path / "log") as fn:
        fn.wait_init()
        event = s3_event(
            "input/add_sub/ric.jsonl", "input/mlp/ric.npy", "input/add_sub/ric.npz", "input/tiny_classifier/ric.png"
        )
        s3_result = fn.invoke(event)
        assert s3_result.error is None, s3_result.error
        assert len(s3_result.json()["processed"]) == 4
        records = [sqs_record("x1", request_body(1, f"s3://{BUCKET}/ric")), sqs_record("x2", "nope")]
        sqs_result = fn.invoke({"Records": records})
        assert sqs_result.json() == {"batchItemFailures": [{"itemIdentifier": "x2"}]}
    check_jsonl_output(get(aws, "output/add_sub/ric.jsonl.out.jsonl"), list(range(12)))
    assert np.load(io.BytesIO(get(aws, "output/mlp/ric.npy.out.npy"))).shape == (3, 10)
    np.testing.assert_array_equal(np.load(io.BytesIO(get(aws, "output/add_sub/ric.npz.out.npz")))["OUTPUT0"], 2.0)
    assert json.loads(get(aws, "output/tiny_classifier/ric.png.out.json"))["outputs"][0]["shape"] == [1, 2]
    assert keys(aws, "ric/") == ["ric/x1.json"]


def test_distributed_map_batch_job_event_uses_raw_keys(aws: dict[str, Any], runtime: Runtime) -> None:
    """The template's Distributed Map sends ListObjectsV2 keys as they are (not URL-encoded)."""
    put(aws, "input/add_sub/a+b c.jsonl", jsonl([add_sub_line(5)]))
    put(aws, "input/add_sub/plain.jsonl", jsonl([add_sub_line(6)]))
    event = {"oclaw": "batch", "bucket": BUCKET, "keys": ["input/add_sub/a+b c.jsonl", "input/add_sub/plain.jsonl"]}
    result = s3_events.handle(event, None, runtime, remaining_ms=forever)
    assert [p["lines"] for p in result["processed"]] == [1, 1]
    check_jsonl_output(get(aws, "output/add_sub/a+b c.jsonl.out.jsonl"), [5])
    with pytest.raises(s3_events.InvalidInput, match="batch-job event"):
        s3_events.handle({"oclaw": "batch", "bucket": BUCKET, "keys": "x"}, None, runtime, remaining_ms=forever)
