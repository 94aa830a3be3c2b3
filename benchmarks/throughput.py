"""Section 3 of benchmarks.run: throughput and p50/p99 vs concurrency, oclaw vs the naive app.

One benchmarks.loadgen process per point (closed loop); also server CPU per request and non-200 responses.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks import common
from benchmarks.common import PYTHON, fmt, fmt_ratio, ratio, table
from benchmarks.harness import log, save_model, start_server, stop_servers, v2_body

if TYPE_CHECKING:
    from benchmarks.run import Plan


def _cpu_s(pid: int) -> float:
    """utime + stime of a process (all threads), in seconds (Linux /proc); NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def run_loadgen(
    proc: subprocess.Popen[bytes], port: int, request_file: Path, *, concurrency: int, warmup: float, duration: float
) -> dict[str, Any]:
    cpu0 = _cpu_s(proc.pid)
    args = [
        PYTHON, "-m", "benchmarks.loadgen", "--port", str(port), "--request", str(request_file),
        "--concurrency", str(concurrency), "--warmup", str(warmup), "--duration", str(duration),
    ]  # fmt: skip
    client = common.spawn(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = client.communicate(timeout=warmup + duration + 150)
    except subprocess.TimeoutExpired:
        common.stop(client)
        return {"error": "loadgen timed out", "concurrency": concurrency}
    finally:
        common.stop(client)
    cpu1 = _cpu_s(proc.pid)
    if client.returncode != 0 or not out.strip():
        return {
            "error": f"loadgen exited {client.returncode}: {err.decode(errors='replace')[-2000:]}",
            "concurrency": concurrency,
        }
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    total = result["requests"] + result["warmup_requests"]
    result["server_cpu_ms_per_req"] = (cpu1 - cpu0) * 1e3 / total if total else None
    result["server_alive"] = proc.poll() is None
    return result


def check_outputs(port: int, model: str, body: tuple[bytes, int | None], expected: dict[str, np.ndarray]) -> str:
    """Compare one response against the in-process reference (informational, not an assertion)."""
    from engine.tensors import decode_response

    with common.Connection(port) as conn:
        status, headers, data = conn.roundtrip(common.infer_request(port, model, *body))
    if status != 200:
        return f"HTTP {status}: {data[:200]!r}"
    hl = headers.get("inference-header-content-length")
    got = decode_response(data, int(hl) if hl else None)
    worst = 0.0
    for name, ref in expected.items():
        if name not in got or got[name].shape != ref.shape:
            return f"output {name!r} missing or misshapen"
        worst = max(worst, float(np.max(np.abs(got[name].astype(np.float64) - ref))))
    return f"ok (max |Δ| {worst:.1e})" if worst < 1e-3 else f"MISMATCH (max |Δ| {worst:.1e})"


def section_throughput(plan: Plan, resnet_repo: Path, resnet_file: Path, work: Path) -> dict[str, Any]:
    import onnxruntime as ort

    from tests.modelgen import mlp

    mlp_repo = work / "repo-mlp"
    mlp_file = save_model(mlp((64, 256, 10)), mlp_repo, "mlp")
    rng = np.random.default_rng(4)
    cases = [
        {
            "model": "mlp",
            "label": "MLP 64→256→10, V2 JSON, batch 1",
            "repo": mlp_repo,
            "file": mlp_file,
            "inputs": {"x": rng.standard_normal((1, 64)).astype(np.float32)},
            "binary": False,
            "warmup": plan.mlp_warmup,
            "duration": plan.mlp_duration,
        },
        {
            "model": "resnet50",
            "label": "ResNet-50, V2 binary in / JSON out, batch 1",
            "repo": resnet_repo,
            "file": resnet_file,
            "inputs": {"input": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)},
            "binary": True,
            "warmup": plan.resnet_warmup,
            "duration": plan.resnet_duration,
        },
    ]
    results: dict[str, Any] = {}
    for case in cases:
        model = case["model"]
        body = v2_body(case["inputs"], binary=case["binary"])
        ref_sess = ort.InferenceSession(str(case["file"]), providers=["CPUExecutionProvider"])
        ref_names = [o.name for o in ref_sess.get_outputs()]
        expected = dict(zip(ref_names, ref_sess.run(ref_names, case["inputs"]), strict=True))
        del ref_sess
        servers: dict[str, tuple[subprocess.Popen[bytes], int, Path]] = {}
        points: dict[str, list[dict[str, Any]]] = {"oclaw": [], "naive": []}
        checks: dict[str, str] = {}
        try:
            for kind in ("oclaw", "naive"):
                servers[kind] = start_server(kind, case["repo"], case["file"], work, model)
                checks[kind] = check_outputs(servers[kind][1], model, body, expected)
                log(f"throughput {model}: {kind} up on port {servers[kind][1]}, output check {checks[kind]}")
            files = {}
            for kind, (_, port, _) in servers.items():
                files[kind] = work / f"request-{model}-{kind}.http"
                files[kind].write_bytes(common.infer_request(port, model, *body))
            for i, c in enumerate(plan.concurrencies):
                for kind in ("oclaw", "naive") if i % 2 == 0 else ("naive", "oclaw"):
                    proc, port, _ = servers[kind]
                    r = run_loadgen(
                        proc, port, files[kind], concurrency=c, warmup=case["warmup"], duration=case["duration"]
                    )
                    points[kind].append(r)
                    if "error" in r or r.get("p50_us") is None:
                        log(f"  {model} {kind} c={c}: ERROR {r.get('error') or r.get('protocol_errors')}")
                    else:
                        log(
                            f"  {model} {kind} c={c}: {r['rps']:.1f} req/s p50 {r['p50_us'] / 1e3:.2f} ms "
                            f"p99 {r['p99_us'] / 1e3:.2f} ms non-200 {r['non_200'] or 0}"
                        )
        finally:
            stop_servers(servers)
        results[model] = {
            "label": case["label"],
            "request_bytes": len(body[0]),
            "output_check": checks,
            "points": points,
        }
    return results


def print_throughput(res: dict[str, Any]) -> None:
    print("\n## 3. Throughput and latency vs concurrency (closed loop, separate client process)\n")
    rows = []
    failures = []
    for model, r in res.items():
        for o, n in zip(r["points"]["oclaw"], r["points"]["naive"], strict=True):
            c = o.get("concurrency")
            for kind, p in (("oclaw", o), ("naive", n)):
                if "error" in p:
                    failures.append(f"{model} {kind} c={c}: {p['error']}")
                elif p["non_200"] or p["protocol_errors"]:
                    failures.append(
                        f"{model} {kind} c={c}: non-200 {p['non_200']} {p['non_200_samples']} {p['protocol_errors']}"
                    )

            def g(p: dict[str, Any], k: str, scale: float = 1.0) -> float | None:
                v = p.get(k)
                return None if v is None else v / scale

            rows.append(
                [
                    model,
                    c,
                    fmt(g(o, "rps")),
                    fmt(g(n, "rps")),
                    fmt_ratio(ratio(g(o, "rps"), g(n, "rps"))),
                    fmt(g(o, "p50_us", 1e3), 2),
                    fmt(g(n, "p50_us", 1e3), 2),
                    fmt(g(o, "p99_us", 1e3), 2),
                    fmt(g(n, "p99_us", 1e3), 2),
                    fmt_ratio(ratio(g(o, "p99_us"), g(n, "p99_us"))),
                    f"{sum(o.get('non_200', {}).values())} / {sum(n.get('non_200', {}).values())}",
                    f"{fmt(g(o, 'server_cpu_ms_per_req'), 2)} / {fmt(g(n, 'server_cpu_ms_per_req'), 2)}",
                ]
            )
    print(
        table(
            [
                "model", "C", "oclaw req/s", "naive req/s", "req/s oclaw/naive", "oclaw p50 ms", "naive p50 ms",
                "oclaw p99 ms", "naive p99 ms", "p99 oclaw/naive", "non-200 (o/n)", "server CPU ms/req (o/n)",
            ],
            rows,
        )
    )  # fmt: skip
    for model, r in res.items():
        print(f"\n{model}: {r['label']}; request {r['request_bytes']:,} bytes; output check {r['output_check']}")
    if failures:
        print("\n**Non-200 responses / errors:**\n")
        for f in failures:
            print(f"- {f}")
    else:
        print("\nNon-200 responses: 0 at every point.")
