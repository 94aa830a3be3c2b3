"""Event-driven batch inference figures: SQS batches (batched vs one at a time) and a 10k-line S3 JSONL object.

``python -m benchmarks.events [--quick]``: SQS events of 10, 100 and 1000 small records (MLP 64→256→10 and
add_sub) through ``handler.sqs_events.handle``, rows batched per model vs one request per run; measured for the
inference stage alone (results to an in-memory list) and end to end with every result written to moto's S3 over
HTTP. Then one JSON Lines object of 10,000 requests through ``handler.s3_events.handle`` (read from moto, chunked,
parts, final object). Same machine, same run: compare the ratios.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import boto3
import numpy as np
from moto.server import ThreadedMotoServer

from benchmarks.common import table
from engine import aws as aws_clients
from engine.config import Settings
from engine.runtime import Runtime
from handler import s3_events, sqs_events
from tests.modelgen import _save, add_sub, mlp

BUCKET = "bench"
ROOT = Path(__file__).resolve().parent.parent


def record(i: int, model: str, dest: str) -> dict[str, Any]:
    rng = np.random.default_rng(i)
    if model == "mlp":
        inputs = [
            {"name": "x", "datatype": "FP32", "shape": [1, 64], "data": rng.standard_normal(64).round(4).tolist()}
        ]
    else:
        inputs = [
            {"name": n, "datatype": "FP32", "shape": [1, 16], "data": rng.standard_normal(16).round(4).tolist()}
            for n in ("INPUT0", "INPUT1")
        ]
    body = {"model_name": model, "inputs": inputs, "reply_to": dest}
    return {
        "messageId": f"m{i}",
        "receiptHandle": "x",
        "body": json.dumps(body),
        "attributes": {},
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:in",
    }


def forever() -> float:
    return 900_000.0


def runtime_for(repo: Path, rows: int, chunk: int = 1000) -> Runtime:
    rt = Runtime(Settings.from_env({}, model_repository=str(repo), batch_max_rows=rows, s3_chunk_lines=chunk))
    rt.preload()
    return rt


def sqs_section(repo: Path, quick: bool) -> str:
    rows = []
    sizes = (10, 100, 1000)
    for model in ("mlp", "add_sub"):
        for n in sizes:
            cells: dict[str, float] = {}
            for mode, max_rows in (("batched", 0), ("one at a time", 1)):
                rt = runtime_for(repo, max_rows)
                for stage, dest in (("inference", "s3://" + BUCKET + "/r"), ("end to end", "s3://" + BUCKET + "/r")):
                    event = {"Records": [record(i, model, dest) for i in range(n)]}
                    if stage == "inference":
                        delivered: list[str] = []
                        original = sqs_events._deliver_all
                        sqs_events._deliver_all = lambda items, d=delivered: d.extend(i.message_id for i in items)  # type: ignore[assignment]
                        try:
                            reps = 3 if n < 1000 or not quick else 1
                            best = min(
                                _timed(lambda e=event, r=rt: sqs_events.handle(e, None, r, remaining_ms=forever))
                                for _ in range(reps)
                            )
                        finally:
                            sqs_events._deliver_all = original  # type: ignore[assignment]
                        assert len(delivered) % n == 0
                    else:
                        if quick and n == 1000:
                            continue
                        best = _timed(lambda e=event, r=rt: sqs_events.handle(e, None, r, remaining_ms=forever))
                    cells[f"{mode} {stage}"] = n / best
                rt.close()
            rows.append(
                [
                    model,
                    n,
                    f"{cells['batched inference']:,.0f}",
                    f"{cells['one at a time inference']:,.0f}",
                    f"{cells['batched inference'] / cells['one at a time inference']:.2f}x",
                    f"{cells.get('batched end to end', float('nan')):,.0f}",
                    f"{cells.get('one at a time end to end', float('nan')):,.0f}",
                ]
            )
    return table(
        [
            "model",
            "records",
            "batched rec/s (inference)",
            "one-at-a-time rec/s (inference)",
            "batched / one",
            "batched rec/s (end to end, S3 writes)",
            "one-at-a-time rec/s (end to end)",
        ],
        rows,
    )


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    result = fn()
    assert result["batchItemFailures"] == [], result
    return time.perf_counter() - start


def s3_section(repo: Path, s3: Any, lines: int) -> str:
    body = "\n".join(
        json.dumps({"id": f"l{i}", "inputs": json.loads(record(i, "mlp", "")["body"])["inputs"]}) for i in range(lines)
    ).encode()
    rows = []
    for mode, max_rows in (("batched (64 rows per run)", 0), ("one at a time", 1)):
        rt = runtime_for(repo, max_rows)
        key = f"input/mlp/{max_rows}-{lines}.jsonl"
        s3.put_object(Bucket=BUCKET, Key=key, Body=body)
        event = {"Records": [{"eventSource": "aws:s3", "s3": {"bucket": {"name": BUCKET}, "object": {"key": key}}}]}
        start = time.perf_counter()
        result = s3_events.handle(event, None, rt, remaining_ms=forever)
        elapsed = time.perf_counter() - start
        out = s3.get_object(Bucket=BUCKET, Key=result["processed"][0]["output"])["Body"].read()
        assert out.count(b"\n") == lines
        rows.append([mode, f"{lines:,}", f"{len(body) / 1e6:.1f} MB", f"{elapsed:.2f} s", f"{lines / elapsed:,.0f}"])
        rt.close()
    return table(["mode", "lines", "object", "end to end (read, infer, parts, final object)", "lines/s"], rows)


def real_model_section(s3: Any, n: int) -> str:
    """EfficientNet-Lite0 rows through S3 (.npz): its 602 KB input cannot travel in a 256 KB SQS message."""
    import shutil

    rows = []
    x = np.random.default_rng(0).standard_normal((n, 3, 224, 224)).astype(np.float32)
    buf = io.BytesIO()
    np.savez(buf, input=x)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        shutil.copytree(ROOT / "examples" / "models" / "efficientnet_lite0", repo / "efficientnet_lite0")
        for mode, max_rows in (("batched (16 rows per run)", 16), ("one at a time", 1)):
            rt = runtime_for(repo, max_rows)
            key = f"input/efficientnet_lite0/{max_rows}.npz"
            s3.put_object(Bucket=BUCKET, Key=key, Body=buf.getvalue())
            event = {"Records": [{"eventSource": "aws:s3", "s3": {"bucket": {"name": BUCKET}, "object": {"key": key}}}]}
            start = time.perf_counter()
            result = s3_events.handle(event, None, rt, remaining_ms=forever)
            elapsed = time.perf_counter() - start
            assert result["processed"][0]["rows"] == n, result
            rows.append([mode, n, f"{elapsed:.2f} s", f"{n / elapsed:.1f}"])
            rt.close()
    return table(["EfficientNet-Lite0 .npz object", "images", "end to end", "images/s"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    import os

    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": url,
        }
    )
    aws_clients.reset()
    try:
        s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        with tempfile.TemporaryDirectory() as tmp:
            repo = Path(tmp)
            _save(mlp(), repo, "mlp")
            _save(add_sub(), repo, "add_sub")
            print("\n## SQS batches: records/s\n")
            print(sqs_section(repo, args.quick))
            print("\n## S3 JSON Lines object, end to end (moto S3 over HTTP)\n")
            print(s3_section(repo, s3, 2000 if args.quick else 10_000))
        print("\n## Real model rows through S3 (.npz), batched vs one at a time\n")
        print(real_model_section(s3, 32 if args.quick else 96))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
