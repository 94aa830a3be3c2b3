"""Memory-budgeted pool under mixed traffic: five large models, a budget that holds two.

```
.venv/bin/python -m benchmarks.memory_pool [--seconds 20] [--model-mib 40] [--clients 4] [--out DIR]
```

Each variant is a fresh ``oclaw serve`` over the same repository (five models of ``--model-mib`` MiB each and a
tiny required one), driven by ``--clients`` closed-loop clients for ``--seconds``:

- ``unbounded`` (the baseline): no budget (``OCLAW_MEMORY_BUDGET_MB=0``), every model stays loaded;
- ``budget, uniform``: a budget of 2.5 models (the size each model measured in the baseline's ``model_loaded``
  records), each request for one of the five at random;
- ``budget, skewed``: the same budget, 80 % of the requests for two of the models.

Per variant: requests, failures (non-200), throughput, p50/p99 latency, model loads and unloads (the server's
``model_loaded`` / ``model_evicted`` log records), the most memory the pool accounted for (from those records), and
the server's peak RSS (``VmHWM``) against the budget. Ratios are against the baseline of the same run. Nothing is
asserted: these are measurements.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    Connection,
    fmt,
    fmt_ratio,
    free_port,
    infer_request,
    kill_all,
    percentiles,
    ratio,
    spawn,
    stop,
    table,
    wait_port,
    write_json,
)
from benchmarks.harness import log, save_model
from engine import memory

MIB = 1 << 20
MODELS = [f"m{i}" for i in range(5)]


def weights_model(value: float, mib: int) -> Any:
    """y = W[i] for a [rows, 16] FP32 table of ``mib`` MiB: tiny requests, a large model."""
    from onnx import TensorProto, helper, numpy_helper

    rows = mib * MIB // 64
    table_ = numpy_helper.from_array(np.full((rows, 16), value, dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["W", "i"], ["y"])],
        "weights",
        [helper.make_tensor_value_info("i", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        [table_],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def build_repository(repo: Path, mib: int) -> None:
    """Five ``mib`` MiB models and ``keep`` (tiny, required)."""
    from onnx import TensorProto, helper

    for i, name in enumerate(MODELS):
        save_model(weights_model(float(i + 1), mib), repo, name)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "keep",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), repo, "keep")


def peak_rss(pid: int) -> tuple[int, int]:
    """(VmHWM, VmRSS) of a process, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmHWM"], fields["VmRSS"]


def events(log_path: Path) -> list[dict[str, Any]]:
    """The server's structured log records."""
    out = []
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def accounted_peak(records: list[dict[str, Any]]) -> int:
    """The most memory the loaded models held at once, replayed from the load and unload records."""
    held: dict[str, int] = {}
    peak = 0
    for r in records:
        if r.get("event") == "model_loaded":
            held[r["model"]] = r["memory_bytes"]
        elif r.get("event") == "model_evicted":
            held.pop(r["model"], None)
        peak = max(peak, sum(held.values()))
    return peak


def drive(port: int, seconds: float, clients: int, weights: list[float], seed: int) -> dict[str, Any]:
    """Closed-loop clients for ``seconds``: latencies of the 200s, count of the others."""
    body = json.dumps({"inputs": [{"name": "i", "datatype": "INT64", "shape": [1], "data": [0]}]}).encode()
    requests = {name: infer_request(port, name, body, None) for name in MODELS}
    latencies: list[int] = []
    failures: list[int] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(number: int) -> None:
        rng = random.Random(seed * 100 + number)
        mine, bad = [], 0
        with Connection(port, timeout=120) as conn:
            while time.perf_counter() < deadline:
                name = rng.choices(MODELS, weights)[0]
                start = time.perf_counter_ns()
                status, _, _ = conn.roundtrip(requests[name])
                if status == 200:
                    mine.append(time.perf_counter_ns() - start)
                else:
                    bad += 1
        with lock:
            latencies.extend(mine)
            failures.append(bad)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    return {"ok": len(latencies), "failed": sum(failures), "seconds": elapsed, **percentiles(latencies)}


def run_variant(
    repo: Path, label: str, env: dict[str, str], weights: list[float], *, args: argparse.Namespace
) -> dict[str, Any]:
    port = free_port()
    log_path = args.out / f"server-{label.replace(' ', '').replace(',', '-')}.log"
    with log_path.open("wb") as fh:
        proc = spawn(
            [sys.executable, "-m", "handler.cli", "serve", "--model-repository", str(repo), "--port", str(port)],
            stdout=fh,
            stderr=fh,
            env={"OCLAW_REQUIRED_MODELS": "keep", "OCLAW_METERING_SINKS": "none", **env},
        )
    try:
        wait_port(proc, port, "/v2/health/ready")
        rss_start = peak_rss(proc.pid)[1]
        result = drive(port, args.seconds, args.clients, weights, seed=1)
        hwm, rss_end = peak_rss(proc.pid)
    finally:
        stop(proc)
    records = events(log_path)
    loaded = [r for r in records if r.get("event") == "model_loaded"]
    return {
        "variant": label,
        **result,
        "loads": len(loaded),
        "evictions": sum(1 for r in records if r.get("event") == "model_evicted"),
        "over_budget": sum(1 for r in records if r.get("event") == "model_over_budget"),
        "model_bytes": {r["model"]: r["memory_bytes"] for r in loaded},
        "accounted_peak_bytes": accounted_peak(records),
        "peak_rss_bytes": hwm,
        "rss_start_bytes": rss_start,
        "rss_end_bytes": rss_end,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--model-mib", type=int, default=40)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            repo = Path(tmp) / "models"
            build_repository(repo, args.model_mib)
            log(f"unbounded: {len(MODELS)} models of {args.model_mib} MiB, no budget")
            base = run_variant(repo, "unbounded", {"OCLAW_MEMORY_BUDGET_MB": "0"}, [1.0] * 5, args=args)
            size = max(base["model_bytes"][m] for m in MODELS)
            budget_mb = int((2.5 * size + base["model_bytes"].get("keep", 0)) // MIB) + 1
            budget = {"OCLAW_MEMORY_BUDGET_MB": str(budget_mb)}
            log(f"budget {budget_mb} MiB (2.5 models of {size / MIB:.1f} MiB)")
            uniform = run_variant(repo, "budget, uniform", budget, [1.0] * 5, args=args)
            skewed = run_variant(repo, "budget, skewed", budget, [40.0, 40.0, 20 / 3, 20 / 3, 20 / 3], args=args)
            # the budget oclaw derives from a platform limit (Lambda's memory size, else the cgroup's): the limit
            # less its headroom (max(a quarter, 128 MiB)) is the same 2.5 models, so RSS can be read against it
            limit_mb = budget_mb + memory.HEADROOM_MIN_MB
            limit = {"AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(limit_mb)}
            log(f"platform limit {limit_mb} MiB (OCLAW_MEMORY_BUDGET_MB unset: the budget comes from it)")
            derived = run_variant(repo, f"limit {limit_mb} MiB, uniform", limit, [1.0] * 5, args=args)
    finally:
        kill_all()
    results = [base, uniform, skewed, derived]
    rows = []
    for r in results:
        rps = r["ok"] / r["seconds"]
        rows.append(
            [
                r["variant"],
                fmt(r["ok"] + r["failed"]),
                fmt(r["failed"]),
                fmt(rps),
                fmt_ratio(ratio(rps, base["ok"] / base["seconds"])),
                fmt(r["p50_us"] / 1e3, 2),
                fmt(r["p99_us"] / 1e3, 1),
                fmt(r["loads"]),
                fmt(r["evictions"]),
                fmt(r["accounted_peak_bytes"] / MIB),
                fmt(r["peak_rss_bytes"] / MIB),
                fmt_ratio(ratio(r["peak_rss_bytes"], base["peak_rss_bytes"])),
            ]
        )
    print(
        f"\n### Memory-budgeted pool: {len(MODELS)} models of {args.model_mib} MiB, budget {budget_mb} MiB "
        f"(2.5 models), {args.clients} clients, {args.seconds:.0f} s per variant\n"
    )
    headers = ["variant", "requests", "failed", "req/s", "vs unbounded", "p50 ms", "p99 ms", "loads", "unloads",
               "models' peak MiB", "peak RSS MiB", "RSS vs unbounded"]  # fmt: skip
    print(table(headers, rows))
    print(
        f"\nBudget {budget_mb} MiB; the process itself (interpreter, onnxruntime, web stack, request buffers) takes "
        f"the rest: peak RSS - budget = {(uniform['peak_rss_bytes'] - budget_mb * MIB) / MIB:.0f} MiB (uniform), "
        f"{(skewed['peak_rss_bytes'] - budget_mb * MIB) / MIB:.0f} MiB (skewed); unbounded RSS at start "
        f"{base['rss_start_bytes'] / MIB:.0f} MiB with every model loaded."
    )
    print(
        f"With a platform limit of {limit_mb} MiB and no OCLAW_MEMORY_BUDGET_MB, oclaw's own budget is the same "
        f"{budget_mb} MiB; peak RSS {derived['peak_rss_bytes'] / MIB:.0f} MiB = "
        f"{derived['peak_rss_bytes'] / (limit_mb * MIB):.2f}x the limit."
    )
    write_json(args.out / "memory_pool.json", {"budget_mb": budget_mb, "limit_mb": limit_mb, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
