"""What access control costs a request: the key check in-process, and c1 latency over HTTP with keys on and off.

    .venv/bin/python -m benchmarks.auth_cost [--quick] [--rounds N]

In-process, each step of the check is timed over many calls: the route table (``auth.requirement``), hash and
constant-time compare, ``KeyRing.authorize`` (with role and model) and the ASGI check with its header scan. Over
HTTP, three ``oclaw serve`` processes (metering off) serve the tiny ``add_sub`` model: one without keys, one with a
key file, one with a key file and the audit log on (``jsonl:/dev/null``); one client thread goes round them round by
round (rotated order, keep-alive connections), V2 JSON requests back to back. Measurements, not tests: the table
gives the costs and the ratios to keys off.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import fmt, fmt_ratio, percentiles, ratio, table
from benchmarks.harness import log, save_model, start_server, stop_servers

PATH = "/v2/models/add_sub/infer"


def in_process(calls: int) -> list[list[str]]:
    """Microseconds per call of each step of the key check."""
    from engine import auth
    from handler import asgi

    key, entry = auth.create_key("invoker", "acme", models=["add_sub"], name="bench")
    ring = auth.parse_entries([entry.as_dict()], "bench")
    header = f"Bearer {key}"
    need = auth.requirement("POST", PATH)
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": PATH,
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/json"),
            (b"authorization", header.encode()),
        ],
    }
    steps = {
        "auth.requirement (route table)": lambda: auth.requirement("POST", PATH),
        "hash + constant-time compare": lambda: ring.authenticate(key),
        "KeyRing.authorize (+ role and model)": lambda: ring.authorize(need, key),
        "ASGI check with header scan": lambda: asgi.authorize(ring, dict(scope)),
    }
    rows = []
    for name, step in steps.items():
        best = min(timeit.repeat(step, number=calls, repeat=5)) / calls * 1e6
        rows.append([name, f"{best:.2f} µs", "", ""])
        log(f"{name}: {best:.2f} µs")
    return rows


def over_http(rounds: int, per_round: int) -> list[list[str]]:
    """c1 latency percentiles of V2 JSON requests, keys off and on, servers alternating round by round."""
    import httpx

    from engine import auth
    from tests.modelgen import add_sub

    rows = []
    with tempfile.TemporaryDirectory(prefix="oclaw-auth-bench-") as tmp:
        work = Path(tmp)
        repo = work / "repo"
        model_file = save_model(add_sub(), repo, "add_sub")
        key, entry = auth.create_key("invoker", "acme", name="bench")
        keys_file = work / "keys.json"
        keys_file.write_text(json.dumps([entry.as_dict()]))
        servers = {
            "keys off": start_server("oclaw-nometer", repo, model_file, work, "off"),
            "keys on": start_server(
                "oclaw-nometer", repo, model_file, work, "on", env={"OCLAW_API_KEYS": str(keys_file)}
            ),
            "keys + audit log": start_server(
                "oclaw-nometer",
                repo,
                model_file,
                work,
                "audit",
                env={"OCLAW_API_KEYS": str(keys_file), "OCLAW_AUDIT_SINKS": "jsonl:/dev/null"},
            ),
        }
        x = np.arange(16, dtype=np.float32).reshape(1, 16)
        body = {
            "inputs": [
                {"name": n, "shape": [1, 16], "datatype": "FP32", "data": x.ravel().tolist()}
                for n in ("INPUT0", "INPUT1")
            ]
        }
        auth_header = {"authorization": f"Bearer {key}"}
        clients = {
            name: httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=auth_header if name != "keys off" else None)
            for name, (_, port, _) in servers.items()
        }
        lat: dict[str, list[int]] = {name: [] for name in servers}
        try:
            for client in clients.values():
                for _ in range(20):
                    client.post(PATH, json=body).raise_for_status()
            for r in range(rounds):
                names = list(clients)
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    for _ in range(per_round):
                        began = time.perf_counter_ns()
                        clients[name].post(PATH, json=body).raise_for_status()
                        lat[name].append(time.perf_counter_ns() - began)
        finally:
            for client in clients.values():
                client.close()
            stop_servers(servers)
    base = percentiles(lat["keys off"])
    for name, values in lat.items():
        p = percentiles(values)
        rows.append(
            [
                f"c1 HTTP infer, {name}",
                f"p50 {fmt(p['p50_us'])} µs",
                f"p99 {fmt(p['p99_us'])} µs",
                fmt_ratio(ratio(p["p50_us"], base["p50_us"])),
            ]
        )
        log(f"HTTP {name}: p50 {p['p50_us']:.0f} µs over {len(values)} requests")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and requests (a smoke run)")
    parser.add_argument("--rounds", type=int, default=20, help="HTTP rounds, servers alternating (default 20)")
    args = parser.parse_args(argv)
    rows = in_process(2_000 if args.quick else 20_000)
    rows += over_http(4 if args.quick else args.rounds, 25 if args.quick else 200)
    print(table(["what", "cost", "p99", "p50 vs keys off"], rows))


if __name__ == "__main__":
    main()
