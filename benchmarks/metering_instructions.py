"""What metering costs in instructions: deterministic, where timings on a shared VM are noisy.

``python -m benchmarks.metering_instructions [REQUESTS]`` (needs valgrind: ``apt-get install valgrind``):

1. ``oclaw serve`` (``benchmarks.metering_switch``) runs under callgrind, instrumentation switched on after the
   warm-up; REQUESTS (default 300) tiny-model requests (add_sub, V2 JSON, c1) in each state — every sink on
   (``log:packed`` + Prometheus), metrics only, nothing — with the counters zeroed before and dumped after each:
   instructions per request of the event-loop thread, the request path;
2. the flush alone, in-process: 4,000 captured usages (a busy second) flushed to each sink, instructions per
   record (one flush subtracted from three, so imports and first-use costs cancel);
3. a Lambda invocation's flush, in-process: one request's usage queued and flushed to the template's sinks
   (``log`` and ``emf``, on stdout's descriptor), instructions per invocation (1,000 flushes less 3,000, halved).

Under callgrind a request takes ~25x longer, so the server's own once-a-second flush holds few records and its
per-record figure would be inflated: the flush is measured separately (2). Hash randomisation is fixed
(``PYTHONHASHSEED=0``) so repeated runs agree to about 0.1 %.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import harness
from benchmarks.common import PYTHON, ROOT, infer_request, table
from benchmarks.metering_cost import BODY, STATES, Switched
from benchmarks.overhead import _sequential
from tests.modelgen import _save, add_sub

#: The flush benchmark's target (run under callgrind): ``SINKS N FLUSHES``.
FLUSH_SCRIPT = """
import os, sys, time
from engine.config import Settings
from engine.metering.meter import Meter
from engine.metering.records import Usage
sinks, n, flushes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
meter = Meter(Settings.from_env({}, metering_sinks=tuple(s for s in sinks.split(",") if s != "prometheus")
                                or ("none",)), "0f3a9c2e1b7d4a66", platform_name="cloudrun")
for sink in meter.sinks:
    sink.stream = open(os.devnull, "w")
meter.sinks = list(meter.sinks)  # the Meter reads where its sinks write when they are set
if "prometheus" in sinks:
    from engine.metering.metrics import PrometheusSink
    class Pool:
        states = staticmethod(lambda: {})
        loaded = staticmethod(lambda: [])
    class Runtime:
        pool = Pool
    meter.sinks = [*meter.sinks, PrometheusSink(Runtime, lambda: 0)]
second = int(time.time())
usages = [tuple.__new__(Usage, (f"0f3a9c2e1b7d4a66-{i}", "anonymous", "add_sub", "1", 1, 330, 420, i % 5,
          40 + i % 30, 150 + i % 120, 0.0, False, "http", second + i // 3000, 200)) for i in range(n)]
import gc
gc.freeze()  # as both front doors do after start-up
for _ in range(flushes):
    meter._usage.extend(usages)
    meter.flush()
"""

#: A Lambda invocation's flush (run under callgrind): ``FLUSHES``; stdout is /dev/null's descriptor.
LAMBDA_SCRIPT = """
import os, sys, time
from engine.config import Settings
from engine.metering.meter import Meter
from engine.metering.records import Usage
sys.stdout = open(os.devnull, "w")
flushes = int(sys.argv[1])
meter = Meter(Settings.from_env({}, metering_sinks=("log", "emf")), "0f3a9c2e1b7d4a66", platform_name="lambda")
usages = [tuple.__new__(Usage, (f"req-{i:08d}-0000-0000-0000-000000000000", "anonymous", "add_sub", "1", 1, 330,
          420, 0, 40 + i % 30, 550 + i % 120, 0.0, False, "lambda-http", int(time.time()), 200))
          for i in range(flushes)]
import gc
gc.freeze()
for usage in usages:
    meter.submit_usage(usage)
    meter.flush()
"""


def callgrind(*args: str, out: str = "/dev/null", options: tuple[str, ...] = ()) -> list[str]:
    """The command line running ``args`` under callgrind (OpenBLAS threads off: their spin-waits are not work)."""
    env = ["env", "PYTHONHASHSEED=0", "OPENBLAS_NUM_THREADS=1"]
    return [*env, "valgrind", "--tool=callgrind", *options, f"--callgrind-out-file={out}", *args]


def collected(output: str) -> int:
    """Instructions callgrind collected (its summary on stderr)."""
    match = re.search(r"Collected : (\d+)", output)
    if match is None:
        raise RuntimeError(f"no callgrind summary in:\n{output[-2000:]}")
    return int(match.group(1))


def flush_per_record(sinks: str, n: int = 4000) -> float:
    """Instructions per record of flushing ``n`` usages to ``sinks`` (three flushes less one)."""
    runs = []
    for flushes in (1, 3):
        done = subprocess.run(
            callgrind(PYTHON, "-c", FLUSH_SCRIPT, sinks, str(n), str(flushes)),
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        )
        runs.append(collected(done.stderr))
    return (runs[1] - runs[0]) / (2 * n)


def lambda_flush(flushes: int = 1000) -> float:
    """Instructions of a Lambda invocation's flush of one request (``log`` + ``emf``): 3x ``flushes`` less 1x."""
    runs = []
    for count in (flushes, 3 * flushes):
        done = subprocess.run(
            callgrind(PYTHON, "-c", LAMBDA_SCRIPT, str(count)), capture_output=True, text=True, cwd=ROOT, check=True
        )
        runs.append(collected(done.stderr))
    return (runs[1] - runs[0]) / (2 * flushes)


def request_path(repo: Path, work: Path, requests: int) -> dict[str, dict[int, int]]:
    """Per state, instructions per thread (1: the event loop) over ``requests`` requests of a switched server."""
    dumps = work / "callgrind"
    dumps.mkdir()
    command = harness.server_command

    def under_callgrind(kind: str, repo: Path, model: Path, port: int) -> tuple[list[str], dict[str, str] | None]:
        cmd, extra = command(kind, repo, model, port)
        options = ("--instr-atstart=no", "--separate-threads=yes")
        return callgrind(*cmd, out=f"{dumps}/cg.%p", options=options), extra

    harness.server_command = under_callgrind
    try:
        server = Switched(repo, work, "callgrind")
    finally:
        harness.server_command = command
    try:
        pid = str(server.proc.pid)
        request = infer_request(server.port, "add_sub", BODY, None)
        for state in STATES:  # warm up uninstrumented (fast)
            server(state)
            _sequential(server.port, request, 300, 600)
        control = shutil.which("callgrind_control") or "callgrind_control"
        subprocess.run([control, "--instr=on", pid], check=True, capture_output=True, timeout=300)
        for state in STATES:  # warm up instrumented
            server(state)
            _sequential(server.port, request, 30, 600)
        for state in STATES:
            server(state)
            subprocess.run([control, "--zero", pid], check=True, capture_output=True, timeout=300)
            _sequential(server.port, request, requests, 3000)
            server("flush")
            subprocess.run([control, f"--dump={state}", pid], check=True, capture_output=True, timeout=300)
    finally:
        server.close()
    counts: dict[str, dict[int, int]] = {}
    for dump in dumps.glob(f"cg.{pid}.*-*"):
        text = dump.read_text(errors="replace")
        state = re.search(r"desc: Trigger: dump (\S+)", text)
        thread, total = re.search(r"thread: (\d+)", text), re.search(r"(?m)^totals: (\d+)", text)
        if state and thread and total:
            counts.setdefault(state.group(1), {})[int(thread.group(1))] = int(total.group(1))
    return counts


def main() -> int:
    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        _save(add_sub(16), repo, "add_sub")
        counts = request_path(repo, Path(tmp), requests)
    per_request = {state: counts[state].get(1, 0) / requests for state in STATES}
    base = per_request["off"]
    print(f"\n## Instructions per request, event-loop thread (callgrind, {requests} requests per state, c1)\n")
    print(
        table(
            ["state", "instructions / request", "vs nothing", "vs metrics only"],
            [
                [
                    state,
                    f"{per_request[state]:,.0f}",
                    f"{per_request[state] - base:+,.0f} ({(per_request[state] - base) / base * 100:+.2f} %)",
                    f"{per_request[state] - per_request['metrics']:+,.0f} "
                    f"({(per_request[state] - per_request['metrics']) / base * 100:+.2f} %)",
                ]
                for state in STATES
            ],
        )
    )
    print("\n## Flush, in-process: instructions per record (4,000 records a flush)\n")
    rows = []
    for sinks in ("log:packed", "log", "prometheus", "log:packed,prometheus"):
        per_record = flush_per_record(sinks)
        rows.append([sinks, f"{per_record:,.0f}", f"{per_record / base * 100:.2f} %"])
    print(table(["sinks", "instructions / record", "of a request (nothing on)"], rows))
    per_invocation = lambda_flush()
    print("\n## A Lambda invocation's flush, in-process: instructions (log + emf, one request)\n")
    print(table(["sinks", "instructions / invocation"], [["log, emf", f"{per_invocation:,.0f}"]]))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
