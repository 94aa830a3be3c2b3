"""Dynamic batching on vs off: one `oclaw serve` with each model twice, with and without ``dynamic_batching``.

    .venv/bin/python -m benchmarks.batching [--quick] [--out DIR]

Cases: a dense ~42M-parameter network (1024→4096→4096→4096→1000 FP32, random weights) over V2 binary (binary in and
out) at 32 concurrent clients, and the MLP 64→256→10 (V2 JSON) at 1 client; also each at the other concurrency, and
the MLP at 32 clients on a server that runs every request on the model's thread (``OCLAW_INLINE_RUN_US=0``: a model
that runs inline is never batched). Both variants are models of the same server (the same file, hard-linked), so
they share the process, its threads and the machine's noise; each point is the median of several short rounds, the
order of the variants alternating round by round. Closed loop (``benchmarks.loadgen``, its own process).
Measurements, not tests: nothing is asserted; the table gives ratios against the batching-off variant measured in
the same run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.common import fmt, fmt_ratio, ratio, table
from benchmarks.harness import link_model, log, save_model, start_server, stop_servers, v2_body
from benchmarks.throughput import check_outputs, run_loadgen

DENSE = (1024, 4096, 4096, 4096, 1000)
SMALL = (64, 256, 10)
LABELS = {
    "dense": "dense 42M, V2 binary",
    "mlp": "MLP 64→256→10, V2 JSON",
    "mlp-offloaded": "MLP 64→256→10, V2 JSON, OCLAW_INLINE_RUN_US=0",
}
BATCHING = {"max_queue_delay_microseconds": 2000, "max_queue_size": 1024}


def _repository(work: Path) -> tuple[Path, dict[str, Path]]:
    """Each model as ``<name>`` (batching off) and ``<name>_batched`` (on), max_batch_size 64 for both."""
    from tests.modelgen import mlp

    repo = work / "repo"
    files: dict[str, Path] = {}
    for name, sizes in (("dense", DENSE), ("mlp", SMALL)):
        files[name] = save_model(mlp(sizes), repo, name)
        link_model(files[name], repo, f"{name}_batched")
        (repo / name / "oclaw.json").write_text(json.dumps({"max_batch_size": 64}))
        manifest = {"max_batch_size": 64, "dynamic_batching": BATCHING}
        (repo / f"{name}_batched" / "oclaw.json").write_text(json.dumps(manifest))
    return repo, files


def measure(quick: bool, work: Path) -> dict[str, Any]:
    import onnxruntime as ort

    repo, files = _repository(work)
    rng = np.random.default_rng(7)
    warmup, duration, rounds = (1.0, 3.0, 1) if quick else (2.0, 5.0, 4)
    dense_x = {"x": rng.standard_normal((1, DENSE[0])).astype(np.float32)}
    small_x = {"x": rng.standard_normal((1, SMALL[0])).astype(np.float32)}
    # (case, model, inputs, binary, concurrencies, server)
    cases = [
        ("dense", "dense", dense_x, True, (32, 1), "oclaw"),
        ("mlp", "mlp", small_x, False, (1, 32), "oclaw"),
        ("mlp-offloaded", "mlp", small_x, False, (32,), "offloaded"),
    ]
    servers: dict[str, Any] = {}
    results: dict[str, Any] = {"rounds": rounds, "warmup_s": warmup, "duration_s": duration, "points": []}
    try:
        servers["oclaw"] = start_server("oclaw", repo, files["dense"], work, "batching")
        # every request on the model's thread (never inline): what batching does for a small model served so
        offloaded = {"OCLAW_INLINE_RUN_US": "0", "OCLAW_PRELOAD": "mlp,mlp_batched"}
        servers["offloaded"] = start_server("oclaw", repo, files["mlp"], work, "offloaded", env=offloaded)
        for case, model, inputs, binary, concurrencies, server in cases:
            proc, port, _ = servers[server]
            body = v2_body(inputs, binary=binary, binary_output=binary)
            sess = ort.InferenceSession(str(files[model]), providers=["CPUExecutionProvider"])
            expected = {"y": sess.run(["y"], inputs)[0]}
            del sess
            request_files = {}
            for variant in (model, f"{model}_batched"):
                log(f"batching {variant}: output check {check_outputs(port, variant, body, expected)}")
                request_files[variant] = work / f"request-{variant}.http"
                request_files[variant].write_bytes(common.infer_request(port, variant, *body))
            for c in concurrencies:
                for r in range(rounds):
                    order = (model, f"{model}_batched") if r % 2 == 0 else (f"{model}_batched", model)
                    for variant in order:
                        point = run_loadgen(
                            proc, port, request_files[variant], concurrency=c, warmup=warmup, duration=duration
                        )
                        point.update(case=case, batched=variant.endswith("_batched"), round=r)
                        results["points"].append(point)
                        p50, p99 = ((point.get(k) or 0) / 1e3 for k in ("p50_us", "p99_us"))
                        log(
                            f"  {case} {variant} c={c} round {r}: {point.get('rps', 0):.1f} req/s p50 {p50:.2f} ms "
                            f"p99 {p99:.2f} ms non-200 {point.get('non_200') or 0} {point.get('error', '')}"
                        )
    finally:
        stop_servers(servers)
    return results


def _median(points: list[dict[str, Any]], key: str) -> float | None:
    values = [p[key] for p in points if p.get(key) is not None]
    return float(np.median(values)) if values else None


def print_table(res: dict[str, Any]) -> None:
    groups: dict[tuple[str, int], dict[bool, list[dict[str, Any]]]] = {}
    for p in res["points"]:
        groups.setdefault((p["case"], p["concurrency"]), {True: [], False: []})[p["batched"]].append(p)
    rows = []
    for (case, c), by in groups.items():
        on, off = by[True], by[False]
        rps_on, rps_off = _median(on, "rps"), _median(off, "rps")
        p50_on, p50_off = _median(on, "p50_us"), _median(off, "p50_us")
        p99_on, p99_off = _median(on, "p99_us"), _median(off, "p99_us")
        errors = sum(sum(p.get("non_200", {}).values()) + len(p.get("protocol_errors", [])) for p in on + off)
        rows.append(
            [
                LABELS[case],
                c,
                fmt(rps_off),
                fmt(rps_on),
                fmt_ratio(ratio(rps_on, rps_off)),
                fmt(None if p50_off is None else p50_off / 1e3, 2),
                fmt(None if p50_on is None else p50_on / 1e3, 2),
                fmt_ratio(ratio(p50_on, p50_off)),
                fmt(None if p99_off is None else p99_off / 1e3, 2),
                fmt(None if p99_on is None else p99_on / 1e3, 2),
                errors,
            ]
        )
    print(
        f"\n## Dynamic batching on vs off (median of {res['rounds']} round(s) of {res['duration_s']:.0f} s per point, "
        "the variants' order alternating)\n"
    )
    print(
        table(
            [
                "model", "C", "off req/s", "on req/s", "req/s on/off", "off p50 ms", "on p50 ms", "p50 on/off",
                "off p99 ms", "on p99 ms", "errors",
            ],
            rows,
        )
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one short round per point")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="oclaw-batching-") as tmp:
        res = measure(args.quick, Path(tmp))
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_json(args.out / "batching.json", res)
    print_table(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
