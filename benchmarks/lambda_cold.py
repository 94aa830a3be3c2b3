"""Lambda cold start and warm invokes under the genuine awslambdaric + the local Runtime API.

``python -m benchmarks.lambda_cold [--quick] [--out DIR]``: for EfficientNet-Lite0 and a ResNet-50-shaped model,
process start -> first successful HTTP-event response for the floor (bare onnxruntime script), the floor handler
(``floor_lambda.py``, hand-written, prepared graph), oclaw (prepared, not prepared, and an INT8 version made by
``oclaw optimize``, prepared) and a naive FastAPI + Mangum handler, measured in the same run; then warm invoke
latency through awslambdaric for a tiny and the real model beside a bare ``session.run``.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from benchmarks import common
from benchmarks.common import child_env, fmt, fmt_ratio, ratio, table, write_json
from benchmarks.resnet50 import cached_model
from engine.config import Settings
from engine.optimize.optimizer import OptimizeOptions, optimize_model
from engine.optimize.prepare import prepare_repository
from engine.optimize.progress import Progress
from engine.tensors import encode_request
from handler.local_lambda import LocalLambda

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("efficientnet_lite0", "resnet50")


def http_event(name: str, x: np.ndarray) -> dict[str, Any]:
    """An HTTP API (v2) event carrying a V2 binary-extension request, base64-encoded as Lambda delivers it."""
    body, length = encode_request({"input": x})
    path = f"/v2/models/{name}/infer"
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": "",
        "headers": {"content-type": "application/octet-stream", "inference-header-content-length": str(length)},
        "requestContext": {"http": {"method": "POST", "path": path, "sourceIp": "127.0.0.1"}, "requestId": "b"},
        "body": base64.b64encode(body).decode(),
        "isBase64Encoded": True,
    }


def lambda_env(extra: dict[str, str]) -> dict[str, str]:
    """Environment for a LocalLambda child: the same bytecode cache as every other benchmark child."""
    env = dict(extra)
    if common.PYCACHE_PREFIX is not None:
        env.update({"PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": str(common.PYCACHE_PREFIX)})
    return env


def floor_once(model: Path) -> dict[str, float]:
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.floor", str(model)], stdout=subprocess.PIPE, cwd=ROOT, env=child_env()
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    total = (time.perf_counter() - start) * 1000
    proc.wait(timeout=60)
    return {"first_ms": total, **{k: v for k, v in json.loads(line).items() if k.endswith("_ms")}}


def lambda_once(handler: str, env: dict[str, str], event: dict[str, Any], work: Path) -> dict[str, Any]:
    log = work / "lambda.log"
    log.unlink(missing_ok=True)
    with LocalLambda(handler, env=lambda_env(env), cwd=ROOT, log=log, memory_mb=3008) as fn:
        result = fn.invoke(event, timeout_s=120)  # queued before INIT ends: answered by the first /next
        first = (time.perf_counter() - fn.spawned_at) * 1000
        init = (fn.api.first_poll_at - fn.spawned_at) * 1000
    if result.error is not None or json.loads(result.payload or b"{}").get("statusCode") != 200:
        detail = result.error or (result.payload or b"")[:300].decode(errors="replace")
        raise RuntimeError(f"{handler} failed: {detail}")
    row: dict[str, Any] = {"init_ms": init, "first_ms": first}
    for line in log.read_text(errors="replace").splitlines():
        if '"event": "cold_start"' in line:
            row["phases"] = json.loads(line)["phases_ms"]
    return row


def int8_repository(repo: Path, name: str, source: Path, x: np.ndarray) -> None:
    """``oclaw optimize`` an INT8 version of ``source`` into ``repo``, prepared, served as the only version."""
    (repo / name / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy(source, repo / name / "1" / "model.onnx")
    rng = np.random.default_rng(2)
    calibration = repo.parent / f"{name}-calibration.npy"
    np.save(calibration, np.concatenate([x, rng.standard_normal((3, *x.shape[1:])).astype(np.float32)]))
    settings = Settings.from_env({}, model_repository=str(repo))
    # a speed figure: a loose budget so the first INT8 configuration is accepted
    options = OptimizeOptions(precision="int8", calibration=calibration, metric="cosine", max_drop=0.5)
    outcome = optimize_model(settings, name, options, Progress())
    shutil.rmtree(repo / name / "1")
    chosen = outcome.chosen
    label = f"{chosen.family.label}, {chosen.latency_ms:.1f} ms vs {outcome.source_latency_ms:.1f}" if chosen else "-"
    print(f"  {name}: INT8 version {outcome.version} ({label})", file=sys.stderr, flush=True)
    prepare_repository(settings)


def median_phases(runs: list[dict[str, Any]]) -> dict[str, float] | None:
    """Each INIT phase's median over the runs (None where the variant logs no phases)."""
    if "phases" not in runs[0]:
        return None
    keys = [k for k, v in runs[0]["phases"].items() if v is not None]
    return {k: statistics.median(float(r["phases"][k]) for r in runs) for k in keys}


def summary(runs: list[dict[str, Any]], key: str) -> tuple[float, float]:
    values = [r[key] for r in runs]
    return min(values), statistics.median(values)


def model_path(name: str, out: Path) -> Path:
    """The source model of one cold-start model (ResNet-50 built once into the cache)."""
    if name == "resnet50":
        return cached_model(out / "cache")
    return ROOT / "examples" / "models" / "efficientnet_lite0" / "1" / "model.onnx"


def cold_section(n: int, out: Path, work: Path, only: list[str]) -> tuple[list[dict[str, Any]], str]:
    models = {name: model_path(name, out) for name in MODELS if name in only}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    results = []
    rows = []
    for name, source in models.items():
        plain = work / f"{name}-plain"
        prepared = work / f"{name}-prepared"
        for repo in (plain, prepared):
            (repo / name / "1").mkdir(parents=True, exist_ok=True)
            shutil.copy(source, repo / name / "1" / "model.onnx")
        prepare_repository(Settings.from_env({}, model_repository=str(prepared)))
        int8 = work / f"{name}-int8"
        int8_repository(int8, name, source, x)
        event = http_event(name, x)
        graph = str(prepared / name / "1" / "model.prepared.onnx")
        oclaw = "handler.aws_lambda.lambda_handler"
        variants: dict[str, Callable[[], dict[str, Any]]] = {
            "floor": partial(floor_once, source),
            "floor handler": partial(
                lambda_once, "benchmarks.floor_lambda.handler", {"FLOOR_MODEL": graph}, event, work
            ),
            "oclaw, prepared": partial(lambda_once, oclaw, {"OCLAW_MODEL_REPOSITORY": str(prepared)}, event, work),
            "oclaw, not prepared": partial(lambda_once, oclaw, {"OCLAW_MODEL_REPOSITORY": str(plain)}, event, work),
            "oclaw, INT8": partial(lambda_once, oclaw, {"OCLAW_MODEL_REPOSITORY": str(int8)}, event, work),
            "naive FastAPI+Mangum": partial(
                lambda_once, "benchmarks.naive_lambda.handler", {"NAIVE_MODEL": str(source)}, event, work
            ),
        }
        measured: dict[str, list[dict[str, Any]]] = {variant: [] for variant in variants}
        for once in variants.values():
            once()  # page cache warm-up, not counted
        order = list(variants)
        for i in range(n):  # rounds in rotating order: drift on a shared machine spreads over every variant
            for variant in order[i % len(order) :] + order[: i % len(order)]:
                measured[variant].append(variants[variant]())
            print(f"  {name}: round {i + 1}/{n} done", file=sys.stderr, flush=True)
        floor_med = summary(measured["floor"], "first_ms")[1]
        handler_med = summary(measured["floor handler"], "first_ms")[1]
        ours_med = summary(measured["oclaw, prepared"], "first_ms")[1]
        for variant, runs in measured.items():
            fmin, fmed = summary(runs, "first_ms")
            init = summary(runs, "init_ms") if "init_ms" in runs[0] else (None, None)
            phases = median_phases(runs)
            results.append(
                {
                    "model": name,
                    "variant": variant,
                    "first_ms_min": fmin,
                    "first_ms_median": fmed,
                    "init_ms_median": init[1],
                    "phases": phases,
                    "runs": runs,
                }
            )
            rows.append(
                [
                    name,
                    variant,
                    fmt(init[1]),
                    f"{fmt(fmin)} / {fmt(fmed)}",
                    fmt_ratio(ratio(fmed, handler_med)),
                    fmt_ratio(ratio(fmed, floor_med)),
                    fmt_ratio(ratio(fmed, ours_med)),
                    " ".join(f"{k} {v:.0f}" for k, v in (phases or {}).items() if v is not None) or "-",
                ]
            )
    text = table(
        [
            "model",
            "variant",
            "INIT ms (median)",
            "first response ms (min / median)",
            "vs floor handler (median)",
            "vs floor script",
            "vs oclaw prepared",
            "INIT phases ms (medians)",
        ],
        rows,
    )
    return results, text


def warm_section(n: int, work: Path, repo_tiny: Path) -> tuple[list[dict[str, Any]], str]:
    effnet = ROOT / "examples" / "models"
    cases = {
        "tiny (mlp 64-256-10, JSON)": (repo_tiny, "mlp", np.zeros((1, 64), np.float32)),
        "efficientnet_lite0 (binary)": (
            effnet,
            "efficientnet_lite0",
            np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32),
        ),
    }
    rows, results = [], []
    for label, (repo, name, x) in cases.items():
        sess = ort.InferenceSession(str(repo / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x}
        for _ in range(10):
            sess.run(None, feed)
        bare = []
        for _ in range(n):
            t = time.perf_counter_ns()
            sess.run(None, feed)
            bare.append(time.perf_counter_ns() - t)
        if name == "mlp":
            path = "/v2/models/mlp/infer"
            body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]})
            event: dict[str, Any] = {
                "version": "2.0",
                "routeKey": "$default",
                "rawPath": path,
                "rawQueryString": "",
                "headers": {"content-type": "application/json"},
                "requestContext": {"http": {"method": "POST", "path": path, "sourceIp": "127.0.0.1"}},
                "body": body,
                "isBase64Encoded": False,
            }
        else:
            event = http_event(name, x)
        wall, billed = [], []
        env = lambda_env({"OCLAW_MODEL_REPOSITORY": str(repo)})
        with LocalLambda(env=env, cwd=ROOT, log=work / "warm.log") as fn:
            fn.wait_init()
            for _ in range(20):
                fn.invoke(event)
            for _ in range(n):
                t = time.perf_counter_ns()
                r = fn.invoke(event)
                wall.append(time.perf_counter_ns() - t)
                billed.append(r.duration_ms)
        b50, b99 = np.percentile(bare, [50, 99]) / 1e6
        w50, w99 = np.percentile(wall, [50, 99]) / 1e6
        d50 = float(np.percentile(billed, 50))
        results.append(
            {
                "case": label,
                "bare_p50_ms": b50,
                "bare_p99_ms": b99,
                "invoke_p50_ms": w50,
                "invoke_p99_ms": w99,
                "duration_p50_ms": d50,
            }
        )
        rows.append(
            [label, f"{b50:.3f} / {b99:.3f}", f"{w50:.3f} / {w99:.3f}", f"{d50:.3f}", f"{(w50 - b50) * 1000:.0f}"]
        )
    text = table(
        [
            "model",
            "bare session.run p50 / p99 ms",
            "invoke through awslambdaric p50 / p99 ms",
            "Lambda Duration p50 ms",
            "overhead p50 µs",
        ],
        rows,
    )
    return results, text


def section(
    quick: bool, out: Path, work: Path, models: list[str] | None = None, rounds: int | None = None
) -> dict[str, Any]:
    """Both Lambda tables; returns the results and prints the tables."""
    from tests.modelgen import _save, mlp

    n_cold, n_warm = (2, 100) if quick else (5, 300)
    _save(mlp(), work / "tiny", "mlp")
    cold, cold_text = cold_section(rounds or n_cold, out, work, models or list(MODELS))
    print("\n## Lambda cold start: process start -> first HTTP-event response (awslambdaric + local Runtime API)\n")
    print(cold_text)
    warm, warm_text = warm_section(n_warm, work, work / "tiny")
    print("\n## Lambda warm invokes (sequential, through awslambdaric)\n")
    print(warm_text)
    return {"cold": cold, "warm": warm}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--models", default=",".join(MODELS), help=f"cold-start models, comma-separated: {MODELS}")
    parser.add_argument("--rounds", type=int, help="cold-start rounds per variant (default: quick 2, full 5)")
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds: at least 1")
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {MODELS}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common.PYCACHE_PREFIX = out.resolve() / "cache" / "pycache"
    with tempfile.TemporaryDirectory(prefix="oclaw-lambda-bench-") as tmp:
        results = section(args.quick, out, Path(tmp), models, args.rounds)
    write_json(out / "lambda.json", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
