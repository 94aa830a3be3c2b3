"""``python -m benchmarks.run [--quick] [--out DIR] [--only cold,overhead,throughput,lambda]``

Benchmarks of ``oclaw serve``, each beside a baseline measured in the same run (the machine is
shared and noisy, so only same-run ratios mean anything):

1. cold start (spawn -> first successful infer) vs the floor (bare ORT script) and a naive
   FastAPI + onnxruntime server, for EfficientNet-Lite0 and a ResNet-50-shaped model;
2. per-request overhead of the HTTP path over an in-process ``session.run`` (tiny model);
3. throughput and p99 at concurrency 1/8/32 vs the naive app (MLP with V2 JSON, ResNet-50 with
   the binary extension), driven by benchmarks.loadgen in its own process.

Prints markdown tables, writes ``results.json`` and PNG plots into ``--out`` (default bench-results/).
Not a test: nothing is asserted.  Every server binds 127.0.0.1 and every child is killed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common, resnet50
from benchmarks.cold import print_cold, section_cold
from benchmarks.common import ROOT
from benchmarks.harness import link_model, log
from benchmarks.overhead import print_overhead, section_overhead
from benchmarks.plots import plot_all
from benchmarks.throughput import print_throughput, section_throughput

SECTIONS = ("cold", "overhead", "throughput", "lambda")


@dataclass(frozen=True)
class Plan:
    """How much of everything; ``quick`` keeps the whole run near three minutes."""

    quick: bool
    cold_runs: int
    overhead_requests: int
    overhead_rounds: int
    overhead_max_s: float
    mlp_warmup: float
    mlp_duration: float
    resnet_warmup: float
    resnet_duration: float
    concurrencies: tuple[int, ...] = (1, 8, 32)

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(True, 2, 1000, 4, 8.0, 1.0, 3.0, 1.0, 3.0)
        return cls(False, 5, 6000, 6, 30.0, 2.0, 10.0, 2.0, 15.0)


def machine_info() -> dict[str, Any]:
    import onnxruntime as ort

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
    }
    with contextlib.suppress(OSError):
        info["loadavg_start"] = os.getloadavg()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        info["git_dirty"] = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--", "engine", "handler"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout.strip()
        )
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        info["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5, check=False
        ).stdout.strip()
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="small counts and short windows (about 1.5 minutes)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results", help="output directory (bench-results/)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {SECTIONS}")
    plan = Plan.make(args.quick)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "meta": {
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "quick": plan.quick,
            "sections": only,
            "plan": plan.__dict__,
            "machine": machine_info(),
        }
    }
    common.PYCACHE_PREFIX = out / "cache" / "pycache"
    results["meta"]["children_env"] = {
        "PYTHONPYCACHEPREFIX": str(common.PYCACHE_PREFIX),
        "PYTHONDONTWRITEBYTECODE": "unset (was " + repr(os.environ.get("PYTHONDONTWRITEBYTECODE")) + ")",
        "OCLAW_*": "removed",
    }
    work = Path(tempfile.mkdtemp(prefix="work-", dir=out))
    print(
        f"# oclaw benchmarks ({'quick' if plan.quick else 'full'} run, {results['meta']['machine'].get('cpus')} CPUs)"
    )
    try:
        resnet_file = resnet_repo = None
        if "cold" in only or "throughput" in only:
            t = time.perf_counter()
            cached = resnet50.cached_model(out / "cache")
            log(f"ResNet-50 model {cached.name} ready in {time.perf_counter() - t:.1f} s")
            resnet_repo = work / "repo-resnet50"
            resnet_file = link_model(cached, resnet_repo, "resnet50")
            params, buffers = resnet50.parameter_count(resnet_file)
            results["meta"]["resnet50"] = {"version": resnet50.VERSION, "parameters": params, "bn_buffers": buffers}
        for section in SECTIONS:
            if section not in only:
                continue
            t = time.perf_counter()
            log(f"section {section}")
            try:
                if section == "cold":
                    assert resnet_repo is not None and resnet_file is not None
                    results["cold"] = section_cold(plan, resnet_file, work)
                    print_cold(results["cold"])
                elif section == "lambda":
                    from benchmarks import lambda_cold

                    results["lambda"] = lambda_cold.section(plan.quick, out, work)
                elif section == "overhead":
                    results["overhead"] = section_overhead(plan, work)
                    print_overhead(results["overhead"])
                else:
                    assert resnet_repo is not None and resnet_file is not None
                    results["throughput"] = section_throughput(plan, resnet_repo, resnet_file, work)
                    print_throughput(results["throughput"])
            except Exception as exc:  # noqa: BLE001 - a broken section must not lose the others
                results.pop(section, None)
                results["meta"].setdefault("failed_sections", {})[section] = f"{type(exc).__name__}: {exc}"
                print(f"\n## {section}: FAILED\n\n```\n{type(exc).__name__}: {exc}\n```")
                log(f"section {section} failed: {exc}")
            sys.stdout.flush()
            results["meta"].setdefault("section_s", {})[section] = round(time.perf_counter() - t, 1)
            common.write_json(out / "results.json", results)
        results["meta"]["plots"] = plot_all(results, out)
        results["meta"]["elapsed_s"] = round(time.perf_counter() - started, 1)
        common.write_json(out / "results.json", results)
        print(f"\nResults: {out / 'results.json'}; plots: {', '.join(results['meta']['plots'])}; "
              f"{results['meta']['elapsed_s']:.0f} s in all.")  # fmt: skip
    finally:
        common.kill_all()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
