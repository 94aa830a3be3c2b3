"""Section 2 of benchmarks.run: per-request overhead of the HTTP path over an in-process ``session.run``.

Triton's ``add_sub`` ([1,16] FP32 x2), c=1, one keep-alive raw socket per path, paths interleaved in rounds.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks import common
from benchmarks.common import fmt, fmt_ratio, ratio, table
from benchmarks.harness import log, rotated, save_model, start_server, stop_servers, v2_body

if TYPE_CHECKING:
    from benchmarks.run import Plan


def oclaw_like_session(model_file: Path, repo: Path) -> tuple[Any, str]:
    """An in-process session with oclaw's own SessionOptions (so (a) differs from (b)/(c) only by HTTP)."""
    import onnxruntime as ort

    try:
        from engine.config import Settings
        from engine.session import session_options

        opts = session_options(Settings.from_env({}, model_repository=str(repo)))
        label = "oclaw's engine.session.session_options()"
    except Exception as exc:  # noqa: BLE001 - the engine API may move; fall back to defaults
        opts = ort.SessionOptions()
        label = f"onnxruntime defaults (engine.session.session_options unavailable: {exc})"
    return ort.InferenceSession(str(model_file), sess_options=opts, providers=["CPUExecutionProvider"]), label


def _sequential(port: int, request: bytes, n: int, max_s: float) -> tuple[list[int], dict[int, int]]:
    lat: list[int] = []
    bad: dict[int, int] = {}
    deadline = time.perf_counter() + max_s
    with common.Connection(port) as conn:
        for _ in range(n):
            t0 = time.perf_counter_ns()
            status, _, _ = conn.roundtrip(request)
            lat.append(time.perf_counter_ns() - t0)
            if status != 200:
                bad[status] = bad.get(status, 0) + 1
            if time.perf_counter() > deadline:
                break
    return lat, bad


def section_overhead(plan: Plan, work: Path) -> dict[str, Any]:
    from tests.modelgen import add_sub

    repo = work / "repo-overhead"
    model_file = save_model(add_sub(16), repo, "add_sub")
    rng = np.random.default_rng(3)
    inputs = {
        "INPUT0": rng.standard_normal((1, 16)).astype(np.float32),
        "INPUT1": rng.standard_normal((1, 16)).astype(np.float32),
    }
    session, session_label = oclaw_like_session(model_file, repo)
    names = ["OUTPUT0", "OUTPUT1"]
    json_body = v2_body(inputs, binary=False)
    bin_body = v2_body(inputs, binary=True, binary_output=True)
    servers: dict[str, tuple[subprocess.Popen[bytes], int, Path]] = {}
    series: dict[str, list[int]] = {}
    non200: dict[str, dict[int, int]] = {}
    try:
        for kind in ("oclaw", "naive", "oclaw-nometer"):
            servers[kind] = start_server(kind, repo, model_file, work, "add_sub")

        def request(kind: str, body: tuple[bytes, int | None]) -> tuple[int, bytes]:
            port = servers[kind][1]
            return port, common.infer_request(port, "add_sub", *body)

        requests = {
            "b_oclaw_json": request("oclaw", json_body),
            "c_oclaw_binary": request("oclaw", bin_body),
            "d_naive_json": request("naive", json_body),
            "e_naive_binary": request("naive", bin_body),
            "f_oclaw_json_nometer": request("oclaw-nometer", json_body),
        }
        keys = ["a_session_run", *requests]
        series = {k: [] for k in keys}
        non200 = {k: {} for k in keys}
        per_round = max(1, plan.overhead_requests // plan.overhead_rounds)
        max_s = plan.overhead_max_s / plan.overhead_rounds
        log(f"overhead: {len(keys)} paths x {plan.overhead_rounds} rounds x {per_round} sequential requests")
        # warm-up: every path a few hundred times
        for _ in range(300):
            session.run(names, inputs)
        for port, req in requests.values():
            _sequential(port, req, 300, 5)
        for rnd in range(plan.overhead_rounds):
            for key in rotated(keys, rnd):
                if key == "a_session_run":
                    deadline = time.perf_counter() + max_s
                    for _ in range(per_round):
                        t0 = time.perf_counter_ns()
                        session.run(names, inputs)
                        series[key].append(time.perf_counter_ns() - t0)
                        if time.perf_counter() > deadline:
                            break
                else:
                    port, req = requests[key]
                    lat, bad = _sequential(port, req, per_round, max_s)
                    series[key] += lat
                    for s, c in bad.items():
                        non200[key][s] = non200[key].get(s, 0) + c
    finally:
        stop_servers(servers)
    out: dict[str, Any] = {"model": "add_sub FP32 [1,16] x2 inputs", "session_options": session_label, "paths": {}}
    base = common.percentiles(series["a_session_run"])
    for key, lat in series.items():
        p = common.percentiles(lat)
        out["paths"][key] = {
            "n": len(lat),
            **p,
            "overhead_p50_us": p["p50_us"] - base["p50_us"],
            "overhead_p99_us": p["p99_us"] - base["p99_us"],
            "non_200": {str(k): v for k, v in non200[key].items()},
        }
    return out


OVERHEAD_LABELS = {
    "a_session_run": "(a) in-process session.run",
    "b_oclaw_json": "(b) oclaw, V2 JSON",
    "c_oclaw_binary": "(c) oclaw, V2 binary",
    "d_naive_json": "(d) naive app, V2 JSON (context)",
    "e_naive_binary": "(e) naive app, binary in / JSON out (context)",
    "f_oclaw_json_nometer": "(f) oclaw, V2 JSON, metering and metrics off",
}


def print_overhead(res: dict[str, Any]) -> None:
    print(f"\n## 2. Per-request overhead over session.run — {res['model']}, c=1, keep-alive raw socket (µs)\n")
    base = res["paths"]["a_session_run"]
    rows = []
    for key, p in res["paths"].items():
        rows.append(
            [
                OVERHEAD_LABELS[key],
                p["n"],
                fmt(p["p50_us"]),
                fmt(p["p99_us"]),
                "-" if key.startswith("a_") else fmt(p["overhead_p50_us"]),
                "-" if key.startswith("a_") else fmt(p["overhead_p99_us"]),
                fmt_ratio(ratio(p["p50_us"], base["p50_us"])),
                sum(p["non_200"].values()),
            ]
        )
    print(table(["path", "n", "p50", "p99", "overhead p50 (-a)", "overhead p99 (-a)", "p50 / a", "non-200"], rows))
    o = res["paths"]
    print(
        f"\nnaive/oclaw p50, JSON: {fmt_ratio(ratio(o['d_naive_json']['p50_us'], o['b_oclaw_json']['p50_us']))}; "
        f"binary: {fmt_ratio(ratio(o['e_naive_binary']['p50_us'], o['c_oclaw_binary']['p50_us']))}"
    )
    if "f_oclaw_json_nometer" in o:
        cost = o["b_oclaw_json"]["p50_us"] - o["f_oclaw_json_nometer"]["p50_us"]
        share = cost / o["f_oclaw_json_nometer"]["p50_us"] * 100
        print(f"metering (log sink) + Prometheus on vs off, p50: {cost:+.1f} µs a request ({share:+.1f} %)")
