"""Load tests as users run them: Locust, headless, against a local ``oclaw serve``, dynamic batching on and off.

    .venv/bin/python -m benchmarks.locust_run [--quick] [--out DIR] [--cases dense,mlp_json,mlp_binary,image]

Per case, one ``oclaw serve`` with the model's ``dynamic_batching`` declared and one without (the same files,
hard-linked), plus the naive FastAPI + onnxruntime app where it speaks the transport; for each concurrency a fresh
headless Locust run (``benchmarks/locustfile.py``, FastHttpUser, closed loop, every user spawned at once), whose
CSV statistics give requests/s, p50 and p99 and failures. Prints one table (ratios: batching on / off, measured in
the same run) and writes ``locust.json`` and ``locust.png`` (throughput and p99 against concurrency) to ``--out``.
Locust itself runs on the same machine: on 2 cores it takes a share of the CPU the server would otherwise have,
as it would for a user load-testing on one box; compare ratios, not absolute numbers. Locust reports percentiles
rounded to whole milliseconds: for sub-millisecond models read the mean (``benchmarks.loadgen`` has µs resolution).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.common import PYTHON, fmt, fmt_ratio, ratio, table
from benchmarks.harness import link_model, log, save_model, start_server, stop_servers, v2_body

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
#: Declared for the "on" servers (Triton's names); max_batch_size comes with it.
DYNAMIC_BATCHING = {"max_queue_delay_microseconds": 2000, "max_queue_size": 256}
MAX_BATCH = 32
#: The dense model of the issue's figures: 1024 -> 4096 -> 4096 -> 4096 -> 1000, ~42M fp32 parameters.
DENSE = (1024, 4096, 4096, 4096, 1000)


@dataclass
class Case:
    """One model and transport, load-tested at several concurrencies."""

    name: str
    user: str
    model: str
    concurrency: tuple[int, ...]
    env: dict[str, str] = field(default_factory=dict)
    naive: bool = True


def dense_model(dims: tuple[int, ...] = DENSE, seed: int = 0) -> Any:
    """An MLP of Gemm + Relu layers with random weights (weight-bound: batching pays on a CPU)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    layers = list(itertools.pairwise(dims))
    for i, (a, b) in enumerate(layers):
        w = (rng.standard_normal((a, b), dtype=np.float32) / np.sqrt(a)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}")]
        last = i == len(layers) - 1
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], ["y" if last else f"g{i}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"g{i}"], [f"h{i}"]))
        prev = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dims[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dims[-1]])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def mlp_model() -> Any:
    """MLP 64 -> 256 -> 10 (tiny: bound by per-request HTTP work)."""
    return dense_model((64, 256, 10), seed=1)


def build_repos(out: Path, cases: list[Case]) -> dict[str, tuple[Path, Path, Path]]:
    """Per model: (repository without batching, repository with it, the model file)."""
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for case in cases:
        if case.model in files:
            continue
        if case.model == "efficientnet_lite0":
            files[case.model] = ROOT / "examples" / "models" / "efficientnet_lite0" / "1" / "model.onnx"
            continue
        path = cache / f"{case.model}-v1.onnx"
        if not path.exists():
            log(f"building {case.model}")
            tmp = cache / "build"
            saved = save_model(dense_model() if case.model == "dense" else mlp_model(), tmp, case.model)
            saved.replace(path)
        files[case.model] = path
    repos = {}
    for model, path in files.items():
        pair = []
        for batching in (False, True):
            repo = out / "repos" / f"{model}-{'on' if batching else 'off'}"
            if not (repo / model / "1" / "model.onnx").exists():
                link_model(path, repo, model)
            manifest: dict[str, Any] = {}
            if model == "efficientnet_lite0":
                source = path.parent.parent
                manifest = json.loads((source / "oclaw.json").read_text())
                labels = source / "labels.txt"
                if labels.exists() and not (repo / model / "labels.txt").exists():
                    (repo / model / "labels.txt").write_bytes(labels.read_bytes())
            if batching:
                manifest |= {"max_batch_size": MAX_BATCH, "dynamic_batching": DYNAMIC_BATCHING}
            (repo / model / "oclaw.json").write_text(json.dumps(manifest))
            pair.append(repo)
        repos[model] = (pair[0], pair[1], path)
    return repos


def request_files(out: Path) -> dict[str, str]:
    """Bodies the binary and JSON users send, and the environment naming them."""
    rng = np.random.default_rng(2)
    dense_body, dense_len = v2_body({"x": rng.standard_normal((1, DENSE[0]), dtype=np.float32)}, binary=True)
    mlp_json, _ = v2_body({"x": rng.standard_normal((1, 64), dtype=np.float32)}, binary=False)
    mlp_bin, mlp_len = v2_body({"x": rng.standard_normal((1, 64), dtype=np.float32)}, binary=True)
    bodies = out / "bodies"
    bodies.mkdir(parents=True, exist_ok=True)
    (bodies / "dense.bin").write_bytes(dense_body)
    (bodies / "mlp.json").write_bytes(mlp_json)
    (bodies / "mlp.bin").write_bytes(mlp_bin)
    return {
        "dense": str(dense_len),
        "mlp": str(mlp_len),
        "dense_body": str(bodies / "dense.bin"),
        "mlp_json": str(bodies / "mlp.json"),
        "mlp_bin": str(bodies / "mlp.bin"),
    }


def cases_for(quick: bool, bodies: dict[str, str]) -> list[Case]:
    """The issue's figures: dense at c32, MLP JSON at c1, MLP binary at c32, EfficientNet PNG at c16."""
    many = (1, 8, 32) if not quick else (1, 32)
    return [
        Case(
            "dense ~42M params, V2 binary",
            "V2BinaryUser",
            "dense",
            many,
            {
                "LOCUST_BINARY_MODEL": "dense",
                "LOCUST_BINARY_BODY": bodies["dense_body"],
                "LOCUST_BINARY_HEADER_LENGTH": bodies["dense"],
            },
        ),
        Case(
            "MLP 64-256-10, V2 JSON",
            "V2JsonUser",
            "mlp",
            (1,),
            {"LOCUST_JSON_MODEL": "mlp", "LOCUST_JSON_BODY": bodies["mlp_json"]},
        ),
        Case(
            "MLP 64-256-10, V2 binary",
            "V2BinaryUser",
            "mlp",
            (1, 32) if quick else (1, 8, 32),
            {
                "LOCUST_BINARY_MODEL": "mlp",
                "LOCUST_BINARY_BODY": bodies["mlp_bin"],
                "LOCUST_BINARY_HEADER_LENGTH": bodies["mlp"],
            },
        ),
        Case(
            "EfficientNet-Lite0, raw PNG",
            "ImageUser",
            "efficientnet_lite0",
            (1, 16),
            {"LOCUST_IMAGE_MODEL": "efficientnet_lite0", "LOCUST_IMAGE": bodies.get("png", "")},
            naive=False,
        ),
    ]


def png_photo(out: Path) -> str:
    """A real photo (scikit-image's coffee) as PNG: decoding it is part of each request's work."""
    from io import BytesIO

    from PIL import Image
    from skimage import data

    path = out / "bodies" / "coffee.png"
    if not path.exists():
        buf = BytesIO()
        Image.fromarray(data.coffee()).save(buf, format="PNG")
        path.write_bytes(buf.getvalue())
    return str(path)


def run_locust(port: int, case: Case, users: int, seconds: float, prefix: Path) -> dict[str, Any]:
    """One headless Locust run; its aggregated statistics."""
    args = [
        PYTHON, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", f"http://127.0.0.1:{port}",
        "-u", str(users), "-r", str(users), "-t", f"{seconds:g}s", "--csv", str(prefix), "--only-summary",
        "--loglevel", "WARNING", "--stop-timeout", "5", case.user,
    ]  # fmt: skip
    proc = common.spawn(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=case.env)
    try:
        _, err = proc.communicate(timeout=seconds + 120)
    finally:
        common.stop(proc)
    stats = Path(f"{prefix}_stats.csv")
    if not stats.exists():
        return {"error": f"locust exited {proc.returncode}: {err.decode(errors='replace')[-1500:]}"}
    with stats.open() as fh:
        row = next(r for r in csv.DictReader(fh) if r["Name"] == "Aggregated")
    count, failures = int(row["Request Count"]), int(row["Failure Count"])
    return {
        "requests": count,
        "failures": failures,
        "rps": float(row["Requests/s"]),
        "p50_ms": float(row["50%"]),
        "p99_ms": float(row["99%"]),
        "mean_ms": float(row["Average Response Time"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.locust_run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer concurrencies, shorter runs")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--cases", default="dense,mlp_json,mlp_binary,image")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per point (full 20, quick 8)")
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    work = out / "locust"
    work.mkdir(parents=True, exist_ok=True)
    seconds = args.seconds or (8.0 if args.quick else 20.0)
    bodies = request_files(work)
    bodies["png"] = png_photo(work)
    keys = dict(zip(("dense", "mlp_json", "mlp_binary", "image"), cases_for(args.quick, bodies), strict=True))
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in keys]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; use {list(keys)}")
    cases = [keys[c] for c in wanted]
    repos = build_repos(work, cases)
    results: list[dict[str, Any]] = []
    for case in cases:
        off_repo, on_repo, model_file = repos[case.model]
        variants = [("oclaw, batching off", "oclaw", off_repo), ("oclaw, batching on", "oclaw", on_repo)]
        if case.naive:
            variants.append(("naive FastAPI", "naive", off_repo))
        for label, kind, repo in variants:
            servers = {}
            try:
                servers[label] = start_server(kind, repo, model_file, work, case.model)
                _, port, _ = servers[label]
                for users in case.concurrency:
                    log(f"{case.name}: {label}, {users} users, {seconds:g} s")
                    prefix = work / f"{case.model}-{kind}-{repo.name}-c{users}"
                    got = run_locust(port, case, users, seconds, prefix)
                    results.append({"case": case.name, "variant": label, "users": users, **got})
            finally:
                stop_servers(servers)
    print_table(results)
    (out / "locust.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "locust.png")
    return 0


def print_table(results: list[dict[str, Any]]) -> None:
    """One row per case and concurrency: batching off / on / naive side by side, ratios on / off."""
    by = {(r["case"], r["variant"], r["users"]): r for r in results}
    rows = []
    for case, users in dict.fromkeys((r["case"], r["users"]) for r in results):
        off, on = by.get((case, "oclaw, batching off", users), {}), by.get((case, "oclaw, batching on", users), {})
        naive = by.get((case, "naive FastAPI", users), {})

        def cell(r: dict[str, Any]) -> str:
            if not r:
                return "-"
            if "error" in r:
                return "error"
            failed = f", {r['failures']} failed" if r["failures"] else ""
            ms = f"mean {fmt(r['mean_ms'], 2)}, p50 {fmt(r['p50_ms'])} / p99 {fmt(r['p99_ms'])} ms"
            return f"{fmt(r['rps'])} req/s, {ms}{failed}"

        rows.append(
            [
                case,
                users,
                cell(off),
                cell(on),
                fmt_ratio(ratio(on.get("rps"), off.get("rps"))),
                fmt_ratio(ratio(on.get("p99_ms"), off.get("p99_ms"))),
                cell(naive),
            ]
        )
    print("\n## Locust, headless (closed loop, FastHttpUser)\n")
    headers = ["case", "users", "batching off", "batching on", "on/off req/s", "on/off p99", "naive FastAPI"]
    print(table(headers, rows))
    errors = [r for r in results if "error" in r]
    for r in errors:
        print(f"\n{r['case']} / {r['variant']} / {r['users']} users: {r['error']}", file=sys.stderr)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Throughput and p99 against users, per case, batching on and off (and naive)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no plot (pip install '.[bench]')")
        return
    cases = list(dict.fromkeys(r["case"] for r in results))
    fig, axes = plt.subplots(2, len(cases), figsize=(4.5 * len(cases), 7), squeeze=False)
    for col, case in enumerate(cases):
        for variant in dict.fromkeys(r["variant"] for r in results if r["case"] == case):
            points = sorted((r["users"], r) for r in results if r["case"] == case and r["variant"] == variant)
            points = [(u, r) for u, r in points if "error" not in r]
            if not points:
                continue
            users = [u for u, _ in points]
            axes[0][col].plot(users, [r["rps"] for _, r in points], marker="o", label=variant)
            axes[1][col].plot(users, [r["p99_ms"] for _, r in points], marker="o", label=variant)
        axes[0][col].set_title(case, fontsize=9)
        axes[0][col].set_ylabel("requests/s")
        axes[1][col].set_ylabel("p99 ms")
        axes[1][col].set_xlabel("concurrent users")
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
