"""``oclaw cost``: what a traffic profile costs a month in each deployment mode, from measured figures (metering
records, or a benchmark of the model run as a Lambda function locally), and the warmer's sizing."""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from engine.cost import IDLE_LIFETIME_S, CostError

if TYPE_CHECKING:  # numpy and the simulation load when the command runs, not with the CLI
    from engine.cost.modes import Bill
    from engine.cost.profiles import Profile

PLOT_HINT = "--plot draws its chart with matplotlib: pip install 'oclaw[bench]'"
#: The table's columns: the bill's items (``engine.cost.modes.ITEMS``) between the mode and the totals.
HEADERS = (
    "mode",
    "N",
    "compute",
    "requests",
    "init",
    "warm_pings",
    "provisioned",
    "idle",
    "free_tier",
    "total_usd",
    "vs_always_on",
    "cold_share",
    "p99_ms",
)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``oclaw cost``."""
    from handler.cli import _ranged

    cost = sub.add_parser(
        "cost",
        help="monthly cost of a traffic profile in each deployment mode, from measured figures; warmer sizing",
    )
    cost.add_argument(
        "profile",
        help="a shape (steady, business-hours, spiky, nightly-batch; ':R' sets its rate in req/s), a CSV file of "
        "timestamp,requests, or 'records' (the traffic of the --records files)",
    )
    cost.add_argument(
        "--records", nargs="+", default=[], metavar="FILE", help="metering records (as oclaw usage reads)"
    )
    cost.add_argument("--model", metavar="NAME", help="benchmark this model as a Lambda function, locally")
    cost.add_argument("--model-repository", help="repository of --model (default: $OCLAW_MODEL_REPOSITORY or ./models)")
    cost.add_argument(
        "--runs", metavar="N", type=_ranged(int, 2, 10000), default=50, help="warm requests of the benchmark (50)"
    )
    cost.add_argument("--save-records", metavar="FILE", help="keep the benchmark's metering records (for --records)")
    cost.add_argument(
        "--memory",
        type=_ranged(int, 128, 10240),
        metavar="MB",
        help="memory size (default: the records'; 1024 for --model)",
    )
    cost.add_argument(
        "--vcpu", type=_ranged(float, 0.08, 8), default=1.0, help="vCPUs of a Cloud Run or always-on instance (1)"
    )
    cost.add_argument(
        "--concurrency",
        type=_ranged(int, 1, 1000),
        default=16,
        help="requests a Cloud Run instance serves at once (16, as infra/cloudrun/service.yaml)",
    )
    cost.add_argument(
        "--arch", choices=("x86_64", "arm64"), default="x86_64", help="Lambda architecture priced (x86_64)"
    )
    cost.add_argument("--region", help="price table entries for this region (default: $OCLAW_REGION)")
    cost.add_argument(
        "--init-ms", metavar="MS", type=_ranged(float, 0), help="a measured INIT, when the records carry none"
    )
    cost.add_argument(
        "--restore-ms", metavar="MS", type=_ranged(float, 0), help="a measured SnapStart restore (REPORT line)"
    )
    cost.add_argument("--max-cold", type=_ranged(float, 0, 1), default=0.01, help="target cold-start share (0.01)")
    cost.add_argument(
        "--instances", metavar="N", type=_ranged(int, 1, 1024), help="N for provisioned/min instances (default: sized)"
    )
    cost.add_argument(
        "--idle-lifetime",
        type=_ranged(float, 0),
        default=IDLE_LIFETIME_S,
        metavar="S",
        help=f"seconds an idle instance lives before it is reclaimed ({IDLE_LIFETIME_S:g})",
    )
    cost.add_argument("--free-tier", action="store_true", help="deduct the monthly free tiers (ignored by default)")
    cost.add_argument("--csv", metavar="FILE", help="also write the table as CSV ('-': stdout instead of the table)")
    cost.add_argument("--plot", metavar="FILE", help="chart of cost against cold-start share (needs matplotlib)")
    cost.set_defaults(func=cost_command)


def cost_command(args: argparse.Namespace) -> int:
    """Run ``oclaw cost``; exit 2 with a message on bad input."""
    try:
        return _run(args)
    except CostError as exc:
        print(f"oclaw: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from engine.config import Settings
    from engine.cost.modes import Planner, Setup, warmer_period
    from engine.cost.prices import prices
    from engine.cost.profiles import read_records
    from engine.cost.workload import workload
    from engine.metering.meter import price_overrides

    settings = Settings.from_env()
    if bool(args.records) == bool(args.model):
        raise CostError("give the per-request figures: --records FILE... (metering records) or --model NAME")
    profile = None if args.profile == "records" else _profile(args.profile, [])  # named before any benchmark
    notes: list[str] = []
    if args.model:
        repository = args.model_repository or settings.model_repository
        records, breakdown = benchmark(args.model, repository, runs=args.runs, memory_mb=args.memory or 1024)
        if args.save_records:
            _write(args.save_records, "".join(json.dumps(r) + "\n" for r in records))
        notes.append(
            f"figures: a benchmark of {args.model} ({repository}) as a Lambda function run locally, "
            f"{args.runs} warm requests of its warm-up input, timed on this machine's CPUs (Lambda gives a function "
            f"a share of a vCPU in proportion to its memory, 1 vCPU at 1769 MB); cold start {breakdown}"
        )
    else:
        records = read_records(args.records)
        notes.append(f"figures: {len(records)} metering records from {', '.join(args.records)}")
    work = workload(records, init_ms=args.init_ms, memory_mb=None if args.model else args.memory)
    notes.append(work.source)
    profile = profile or _profile(args.profile, records)
    price = prices(
        args.arch,
        region=args.region or settings.region,
        table=_table(settings.price_table),
        overrides=price_overrides(settings),
        free_tier=args.free_tier,
    )
    period = warmer_period(args.idle_lifetime)
    setup = Setup(
        work,
        price,
        vcpu=args.vcpu,
        idle_lifetime_s=args.idle_lifetime,
        warmer_period_s=period,
        warmer_hold_ms=settings.warmer_hold_ms,
        warmer_window_s=settings.warmer_traffic_window_s,
        restore_ms=args.restore_ms,
        concurrency=args.concurrency,
    )
    planner = Planner(profile, setup)
    n = args.instances or planner.smallest_floor(args.max_cold) or 1024
    warmer_n = planner.smallest_floor(args.max_cold, warmer=True)
    always_n = planner.smallest_floor(args.max_cold, overflow=True) or 1024
    bills = planner.bills(n, warmer_n or n, always_n)
    out = sys.stderr if args.csv == "-" else sys.stdout  # the notes; stdout holds only the CSV then
    print(
        f"profile: {profile.name}: {profile.description}; {profile.requests * profile.month_factor:,.0f} "
        f"requests a 30-day month",
        file=out,
    )
    for line in [
        *notes,
        f"prices: {'; '.join(price.sources)}"
        + ("; free tiers deducted" if args.free_tier else "; free tiers ignored (--free-tier)"),
    ]:
        print(line, file=out)
    print(
        f"simulation: Poisson arrivals, one request per Lambda instance, up to {args.concurrency} per Cloud Run "
        f"instance, idle lifetime {args.idle_lifetime:g} s, "
        f"N = {n} ({'given' if args.instances else f'fewest keeping cold starts <= {args.max_cold:g}'}); "
        f"always-on N = {always_n} (fewest leaving <= {args.max_cold:g} of requests to find all busy)",
        file=out,
    )
    rows = _rows(bills)
    if args.csv == "-":
        _write_csv(rows, sys.stdout)
    else:
        _table_out(rows, out)
        if args.csv:
            table = io.StringIO()
            _write_csv(rows, table)
            _write(args.csv, table.getvalue())
    warm_bill = next(b for b in bills if b.mode == "lambda-warmer")
    if warmer_n is None:
        print(
            f"warmer: no WarmerConcurrency up to 1024 keeps cold starts <= {args.max_cold:g} at "
            f"WarmerRate rate({period / 60:g} minutes)",
            file=out,
        )
    else:
        pinged = planner.sim(warmer_n, warmer=True)
        f = profile.month_factor
        print(
            f"warmer: WarmerConcurrency={warmer_n} WarmerRate=rate({period / 60:g} minutes) keeps cold starts at "
            f"{warm_bill.cold_share:.3%} (target <= {args.max_cold:.2%}): ${warm_bill.total:,.2f} a month, of which "
            f"${warm_bill.items['warm_pings']:,.2f} for {pinged.pings * f:,.0f} pings "
            f"({pinged.ping_inits * f:,.0f} of them starting an instance, their INIT in init)",
            file=out,
        )
    base = next(b for b in bills if b.mode == "always-on")
    within = [b for b in bills if b.cold_share <= args.max_cold]
    for label, pool in (("cheapest", bills), (f"cheapest with cold starts <= {args.max_cold:.2%}", within)):
        if pool:
            best = min(pool, key=lambda b: b.total)
            print(
                f"{label}: {best.mode}{f' N={best.instances}' if best.instances else ''} ${best.total:,.2f} a month, "
                f"{_versus(best, base)} against always-on N={base.instances} (${base.total:,.2f})",
                file=out,
            )
    for b in bills:
        if b.note:
            print(f"note: {b.mode}: {b.note}", file=out)
    if args.plot:
        points = sorted({1, 2, 4, 8, 16, 32, n, warmer_n or n} & set(range(1, 2 * max(n, warmer_n or n) + 1)))
        _plot(args.plot, [*bills, *planner.curve(points)], profile)
    return 0


def _write(path: str, text: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8", newline="")
    except OSError as exc:
        raise CostError(f"{path}: cannot write: {exc.strerror or exc}") from None


def _versus(bill: Bill, base: Bill) -> str:
    if base.total <= 0:
        return "-"
    return f"{(bill.total - base.total) / base.total:+.1%}"


def _rows(bills: list[Bill]) -> list[dict[str, Any]]:
    base = next(b for b in bills if b.mode == "always-on")
    return [
        {
            "mode": b.mode,
            "N": b.instances,
            **{k: round(v, 2) for k, v in b.items.items()},
            "total_usd": round(b.total, 2),
            "vs_always_on": _versus(b, base),
            "cold_share": f"{b.cold_share:.4%}",
            "p99_ms": "-" if b.p99_ms is None else round(b.p99_ms, 1),
        }
        for b in bills
    ]


def _table_out(rows: list[dict[str, Any]], out: IO[str]) -> None:
    print("| " + " | ".join(HEADERS) + " |", file=out)
    print("|" + "---|" * len(HEADERS), file=out)
    for row in rows:
        cells = [f"{row[h]:.2f}" if isinstance(row[h], float) and h != "p99_ms" else str(row[h]) for h in HEADERS]
        print("| " + " | ".join(cells) + " |", file=out)


def _write_csv(rows: list[dict[str, Any]], out: IO[str]) -> None:
    writer = csv.DictWriter(out, fieldnames=HEADERS)
    writer.writeheader()
    writer.writerows(rows)


def _profile(spec: str, records: list[dict[str, Any]]) -> Profile:
    from engine.cost.profiles import from_csv, from_records, shape

    if spec == "records":
        return from_records(records)
    if os.path.exists(spec) or spec.lower().endswith(".csv"):
        return from_csv(spec)
    return shape(spec)


def _table(path: str) -> dict[str, Any]:
    if not path:
        return {}
    try:
        table = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CostError(f"OCLAW_PRICE_TABLE {path}: {exc}") from None
    if not isinstance(table, dict):
        raise CostError(f"OCLAW_PRICE_TABLE {path}: expected a JSON object of price entries")
    return table


def benchmark(model: str, repository: str, *, runs: int, memory_mb: int) -> tuple[list[dict[str, Any]], str]:
    """Metering records of ``runs`` + 1 requests of the model's warm-up input (the first cold) to a Lambda function
    run locally under awslambdaric, and its cold start's phases as its ``cold_start`` record gives them."""
    from engine.cost.profiles import read_records
    from engine.logs import find_event
    from handler.local_lambda import LocalLambda

    event = _warmup_event(model, repository)
    with tempfile.TemporaryDirectory(prefix="oclaw-cost-") as tmp:
        sink, log = Path(tmp, "metering.jsonl"), Path(tmp, "function.log")
        env = {
            "OCLAW_MODEL_REPOSITORY": repository,
            "OCLAW_PRELOAD": model,
            "OCLAW_METERING_SINKS": f"jsonl:{sink}",
            "OCLAW_METRICS": "false",
            "OCLAW_LOG_FORMAT": "json",
            "OCLAW_AUTH": "none",  # a function of this machine, invoked by this command alone
        }
        with LocalLambda(env=env, memory_mb=memory_mb, log=log) as fn:
            try:
                fn.wait_init(timeout_s=300)
            except RuntimeError as exc:
                raise CostError(f"--model {model}: the function's {exc}; its log: {log.read_text()[-2000:]}") from None
            for _ in range(runs + 1):
                result = fn.invoke(event)
                status = result.json().get("statusCode", 200) if result.error is None else 500
                if result.error is not None or status >= 400:
                    raise CostError(f"--model {model}: its warm-up input failed: {result.error or result.json()}")
        records = read_records([str(sink)])
        cold = find_event(log.read_text(encoding="utf-8", errors="replace"), "cold_start")
        phases: dict[str, Any] = {} if cold is None else cold["phases_ms"]
    breakdown = ", ".join(f"{k} {v} ms" for k, v in phases.items() if v is not None)
    return records, f"phases: {breakdown or 'not recorded'}"


def _warmup_event(model: str, repository: str) -> dict[str, Any]:
    """A Function URL event carrying the model's warm-up input as V2 binary tensors (what tritonclient sends)."""
    from engine.config import Settings
    from engine.datatypes import v2_datatype
    from engine.errors import OclawError
    from engine.runtime import Runtime

    runtime = Runtime(Settings.from_env(model_repository=repository, preload=(model,), metering_sinks=("none",)))
    try:
        entry = runtime.pool.load(model)
        versions = entry.versions
        if not versions:
            raise CostError(f"--model {model}: not loaded from {repository}: {runtime.pool.states().get(model)}")
        loaded = versions[max(versions)]
        loaded.warm_up()
        feed = loaded.warm_feed
        if feed is None:
            raise CostError(f"--model {model}: no warm-up input runs on it ({loaded.warmup_error})")
    except OclawError as exc:
        raise CostError(f"--model {model}: {exc.message}") from None
    finally:
        runtime.close()
    inputs, body = [], b""
    for name, array in feed.items():
        data = array.tobytes()
        inputs.append(
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": v2_datatype(array),
                "parameters": {"binary_data_size": len(data)},
            }
        )
        body += data
    header = json.dumps({"inputs": inputs}).encode()
    path = f"/v2/models/{model}/infer"
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": "",
        "headers": {"content-type": "application/octet-stream", "inference-header-content-length": str(len(header))},
        "requestContext": {
            "http": {"method": "POST", "path": path, "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1"},
            "requestId": "oclaw-cost",
            "routeKey": "$default",
            "stage": "$default",
        },
        "body": base64.b64encode(header + body).decode(),
        "isBase64Encoded": True,
    }


def _plot(path: str, bills: list[Bill], profile: Profile) -> None:
    """Cost against cold-start share, a point per mode and N."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CostError(PLOT_HINT) from None
    fig, ax = plt.subplots(figsize=(8, 5))
    for mode in dict.fromkeys(b.mode for b in bills):
        points = sorted({(b.cold_share, b.total, b.instances) for b in bills if b.mode == mode})
        ax.plot([p[0] * 100 for p in points], [p[1] for p in points], "o-" if len(points) > 1 else "o", label=mode)
        for share, total, n in points:
            if n:
                ax.annotate(str(n), (share * 100, total), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("requests meeting a cold start (%)")
    ax.set_ylabel("USD a 30-day month")
    ax.set_yscale("log")
    ax.set_title(f"oclaw cost: {profile.name} (N beside the points)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path)
    except (OSError, ValueError) as exc:  # ValueError: a file suffix matplotlib has no format for
        raise CostError(f"--plot {path}: {exc}") from None
    finally:
        plt.close(fig)
