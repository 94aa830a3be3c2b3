"""``oclaw cost``: every bill formula on hand-computed cases, the simulation against closed forms (Poisson
arrivals; Erlang's loss formula for a kept floor; a lone instance's idle lifetime), clear errors for bad
profiles and records, and the command end to end on real metering records and a real model."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.cost import CostError
from engine.cost.modes import (
    Planner,
    Setup,
    always_on,
    cloudrun_instance,
    cloudrun_request,
    lambda_on_demand,
    lambda_provisioned,
    lambda_snapstart,
    lambda_warmer,
    p99,
    warmer_period,
)
from engine.cost.prices import prices
from engine.cost.profiles import MONTH_S, Profile, from_csv, from_records, shape
from engine.cost.simulation import Simulation, arrivals, erlang_b, simulate
from engine.cost.workload import Workload, workload
from handler.cli import main
from tests.conftest import ROOT
from tests.meterkit import meter, one
from tests.modelgen import _save, add_sub

#: 99 warm requests of 9 ms and one of 30 ms; Lambda bills 10 ms; INIT 500 ms; the cold request's own run 20 ms.
WORK = Workload(
    billed_ms=10, compute_ms=8, latency_ms=(9.0,) * 99 + (30.0,), init_ms=500, cold_ms=20, memory_mb=1024, source=""
)
STEADY = 2_592_000  # 1 req/s for 30 days


def setup(**kw: object) -> Setup:
    return Setup(WORK, prices("x86_64"), **kw)  # type: ignore[arg-type]


# Formulas: a steady 1 req/s month ---------------------------------------------------------------------------------


def test_steady_lambda_on_demand_and_snapstart() -> None:
    sim = Simulation(floor=0, warmer=False, requests=STEADY, cold=0)
    bill = lambda_on_demand(setup(), sim, 1.0)
    # 2,592,000 x 10 ms x 1 GB = 25,920 GB-s at $0.0000166667; 2,592,000 requests at $0.20 a million
    assert bill.items["compute"] == pytest.approx(0.432000864)
    assert bill.items["requests"] == pytest.approx(0.5184)
    assert bill.items["init"] == 0 and bill.total == pytest.approx(0.950400864)
    snap = lambda_snapstart(setup(restore_ms=200), Simulation(0, False, requests=STEADY, cold=10), 1.0)
    # the snapshot cached all month: 2,592,000 GB-s at $0.0000015046; 10 restores of 1 GB at $0.0001397998
    assert snap.items["idle"] == pytest.approx(3.89992, rel=1e-6)
    assert snap.items["init"] == pytest.approx(0.001397998)
    # 10 cold of 2,592,000 move the warm durations' quantile to 0.99 / (1 - 10 / 2,592,000), just past the 99th
    # of the 100: the 30 ms one; the cold starts (restore 200 ms + 9 ms) are too few to reach the 99th percentile
    assert snap.p99_ms == 30.0
    assert lambda_snapstart(setup(restore_ms=200), Simulation(0, False, requests=100, cold=2), 1.0).p99_ms == 209.0


def test_steady_provisioned_warmer_and_always_on() -> None:
    kept = Simulation(floor=1, warmer=False, requests=STEADY, on_floor=STEADY, floor_busy_s=STEADY * 0.009)
    bill = lambda_provisioned(setup(), kept, 1.0)
    assert bill.items["provisioned"] == pytest.approx(2_592_000 * 0.0000041667)  # 1 GB all month
    assert bill.items["compute"] == pytest.approx(25_920 * 0.0000097222)  # its requests at the provisioned rate
    warm = Simulation(floor=1, warmer=True, requests=STEADY, pings=8640)
    pings = lambda_warmer(setup(), warm, 1.0).items["warm_pings"]
    # a ping every 300 s: 8,640 pings of ceil(8 ms) = 8 ms (one instance: no hold) and 8,640 requests
    assert pings == pytest.approx(8640 * 0.008 * 0.0000166667 + 8640 * 0.2e-6)
    fanned = lambda_warmer(setup(), Simulation(floor=3, warmer=True, requests=STEADY, pings=3 * 8640), 1.0)
    assert fanned.items["warm_pings"] == pytest.approx(3 * 8640 * (0.083 * 0.0000166667 + 0.2e-6))  # 8 + 75 ms held
    base = always_on(setup(), kept, 1.0)
    assert base.total == pytest.approx(720 * (0.04048 + 0.004445))  # 1 vCPU + 1 GB, 720 hours
    assert base.cold_share == 0 and base.p99_ms == pytest.approx(9.0)


def test_steady_cloud_run() -> None:
    sim = Simulation(floor=0, warmer=False, requests=STEADY, cold=0, instance_s=MONTH_S)
    bill = cloudrun_request(setup(), sim, 1.0)
    # each 9 ms request billed 100 ms: 259,200 s of 1 vCPU ($0.000024) and 1 GiB ($0.0000025)
    assert bill.items["compute"] == pytest.approx(259_200 * 0.0000265)
    assert bill.items["requests"] == pytest.approx(1.0368)
    kept = Simulation(floor=1, warmer=False, requests=STEADY, on_floor=STEADY, floor_busy_s=STEADY * 0.009)
    # the minimum instance idles for the month less its 23,328 busy seconds, at $0.0000025 + $0.0000025
    assert cloudrun_request(setup(), kept, 1.0).items["idle"] == pytest.approx(2_568_672 * 0.000005)
    inst = cloudrun_instance(setup(), sim, 1.0)
    assert inst.items["compute"] == pytest.approx(23_328 * 0.00002)  # one instance alive all month, $0.00002/s
    assert inst.items["idle"] == pytest.approx((MONTH_S - 23_328) * 0.00002)
    assert inst.items["requests"] == 0


def test_free_tier_is_deducted_only_when_asked() -> None:
    sim = Simulation(floor=0, warmer=False, requests=STEADY, cold=0)
    free = lambda_on_demand(Setup(WORK, prices("x86_64", free_tier=True)), sim, 1.0)
    # 25,920 GB-s are under the 400,000 free; 1,000,000 of the 2,592,000 requests are free
    assert free.items["free_tier"] == pytest.approx(-(0.432000864 + 0.2))
    assert free.total == pytest.approx(0.3184)
    assert lambda_on_demand(setup(), sim, 1.0).items["free_tier"] == 0


# Formulas: a single burst -----------------------------------------------------------------------------------------


def test_a_single_burst_is_all_cold_starts() -> None:
    times = np.zeros(100)  # 100 requests at once, nothing before or after
    sim = simulate(times, service_s=0.009, init_s=0.511, idle_lifetime_s=600, horizon_s=3600)
    assert (sim.cold, sim.peak) == (100, 100)
    # each instance busy 0.52 s (INIT, then the first run) and idle 600 s before it is reclaimed
    assert sim.instance_s == pytest.approx(100 * 600.52)
    bill = lambda_on_demand(setup(), sim, 1.0)
    assert bill.items["init"] == pytest.approx(100 * 0.5 * 0.0000166667)  # INIT billed 100 times
    assert bill.items["compute"] == pytest.approx(100 * 0.020 * 0.0000166667)  # the cold requests' own 20 ms
    assert bill.cold_share == 1.0 and bill.p99_ms == 520.0  # INIT + the first run
    run = cloudrun_request(setup(), sim, 1.0)
    assert run.items["init"] == pytest.approx(100 * 0.5 * 0.0000265)  # start-up billed, 500 ms
    assert run.items["compute"] == pytest.approx(100 * 0.1 * 0.0000265)  # 20 ms rounded up to 100 ms
    lived = cloudrun_instance(setup(), sim, 1.0)
    assert lived.total == pytest.approx(100 * 600.52 * 0.00002)


# Formulas: a nightly batch ----------------------------------------------------------------------------------------


def test_nightly_batch_shape_and_bills() -> None:
    month = shape("nightly-batch")
    assert month.requests == 50 * 3600 * 30  # 02:00-03:00 daily at 50 req/s
    night = Profile("night", month.rate[:1440], 60)  # one day of it, scaled to the month
    assert night.month_factor == 30
    plan = Planner(night, setup())
    cold = plan.sim(0)
    # the night starts cold: requests keep meeting starting instances for about INIT + run, 50 x 0.52 = 26
    assert 10 <= cold.cold <= 45
    bill = lambda_on_demand(setup(), cold, night.month_factor)
    assert bill.items["init"] == pytest.approx(30 * cold.cold * 0.5 * 0.0000166667)
    assert bill.items["requests"] == pytest.approx(30 * cold.requests * 0.2e-6)
    warm = plan.sim(40, warmer=True)  # 40 instances pinged every 300 s are warm when the batch begins
    assert warm.cold <= 2 and warm.ping_inits >= 40


# Simulation against closed forms ----------------------------------------------------------------------------------


def test_arrivals_are_poisson() -> None:
    profile = Profile("two", np.full(2000, 2.0), 60)  # 2 req/s for 2000 minutes
    times = arrivals(profile)
    per_minute = np.bincount((times // 60).astype(int), minlength=2000)
    assert per_minute.mean() == pytest.approx(120, rel=0.01)
    assert per_minute.var() == pytest.approx(120, rel=0.1)  # a Poisson count's variance is its mean
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(0.5, rel=0.01)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.02)  # exponential gaps: coefficient of variation 1


@pytest.mark.parametrize(("floor", "rate", "service_s"), [(1, 2.0, 0.1), (3, 10.0, 0.15), (6, 20.0, 0.2)])
def test_a_kept_floor_turns_away_erlang_b(floor: int, rate: float, service_s: float) -> None:
    """With no reuse outside the floor (idle lifetime 0), cold starts are the M/G/N/N system's lost requests."""
    times = arrivals(Profile("p", np.full(100, rate), 60))
    sim = simulate(times, service_s=service_s, init_s=0.0, idle_lifetime_s=0.0, floor=floor)
    expected = erlang_b(floor, rate * service_s)
    assert sim.cold_share == pytest.approx(expected, abs=0.01 + 0.05 * expected)
    assert sim.on_floor + sim.cold == sim.requests


def test_always_on_is_sized_by_erlang_b() -> None:
    """Always-on instances: the fewest that leave <= 1 % of requests finding all busy; B(5, 1.5) = 1.4 %,
    B(6, 1.5) = 0.35 %: 6. Provisioned concurrency spills to warm on-demand instances: 1 keeps cold starts rare."""
    work = Workload(150.0, 150.0, (150.0,), 0.0, 150.0, 1024, "")
    plan = Planner(Profile("p", np.full(100, 10.0), 60), Setup(work, prices("x86_64")))
    assert erlang_b(5, 1.5) > 0.01 > erlang_b(6, 1.5)
    assert plan.smallest_floor(0.01, overflow=True) == 6
    assert plan.smallest_floor(0.01) == 1
    bill = always_on(plan.setup, plan.sim(6), plan.profile.month_factor)
    assert bill.instances == 6 and "find all 6 busy and queue" in bill.note


def test_erlang_b_formula() -> None:
    assert erlang_b(3, 1.5) == pytest.approx((1.5**3 / 6) / (1 + 1.5 + 1.5**2 / 2 + 1.5**3 / 6))
    assert erlang_b(0, 2.0) == 1.0


def test_a_lone_instance_survives_gaps_shorter_than_its_idle_lifetime() -> None:
    """Rare requests (1 per 100 s) and an idle lifetime of 100 s: cold when the gap exceeds it, e^-1 of them."""
    times = arrivals(Profile("rare", np.full(50_000, 0.01), 60))
    sim = simulate(times, service_s=0.001, init_s=0.0, idle_lifetime_s=100.0)
    assert sim.cold_share == pytest.approx(math.exp(-1.001), abs=0.015)
    assert sim.peak <= 2


def test_instances_serving_several_requests_start_fewer() -> None:
    times = np.arange(0, 60, 0.1)  # a request every 100 ms, each running 350 ms: 3 to 4 in flight
    one_each = simulate(times, service_s=0.35, init_s=0.0, idle_lifetime_s=60)
    shared = simulate(times, service_s=0.35, init_s=0.0, idle_lifetime_s=60, concurrency=4)
    assert (one_each.peak, shared.peak, shared.cold) == (4, 1, 1)
    # a starting instance takes no other request: a burst during INIT starts an instance per request
    burst = simulate(np.zeros(5), service_s=0.01, init_s=1.0, idle_lifetime_s=60, concurrency=4)
    assert burst.cold == 5


def test_warmer_pings_keep_instances_only_within_the_idle_lifetime() -> None:
    none = np.array([])
    kept = simulate(none, service_s=0.01, init_s=0.5, floor=3, warmer=True, period_s=300, horizon_s=2999)
    assert (kept.pings, kept.ping_inits) == (30, 3)  # 10 pings of 3; started once, refreshed before reclaimed
    lapsed = simulate(none, service_s=0.01, init_s=0.5, floor=3, warmer=True, period_s=900, horizon_s=2999)
    assert (lapsed.pings, lapsed.ping_inits) == (12, 12)  # every 900 s: the 600 s idle instances are gone
    busy = simulate(np.arange(0, 3000, 10.0), service_s=0.01, init_s=0.5, floor=3, warmer=True, horizon_s=2999)
    # the first ping, before any request, fans out to 3; then a request within 60 s makes each later ping skip
    # its fan-out (as handler/warmer.py does): 3 + 9
    assert busy.pings == 12


def test_p99_of_warm_and_cold_mixture() -> None:
    assert p99(WORK, 0.0, 520.0) == pytest.approx(9.0)
    assert p99(WORK, 0.02, 520.0) == 520.0  # over 1 % cold: the 99th percentile is a cold start
    assert p99(WORK, 0.02, None) is None


def test_warmer_rate_is_the_longest_below_the_idle_lifetime() -> None:
    assert warmer_period(600) == 300 and warmer_period(900) == 600 and warmer_period(30) == 60


# Profiles, records and prices: clear errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("timestamp,requests\n0,1\n60,abc\n", ":3: requests must be a number >= 0, got 'abc'"),
        ("0,1\n60,2\n30,3\n", ":3: timestamps must increase"),
        ("0,1\n60,2\n180,3\n", ":3: timestamps must be evenly spaced (60 s apart"),
        ("0,1\n", "at least 2 rows"),
        ("0,1,2\n60,1\n", ":1: expected 2 fields, timestamp,requests; got 3"),
        ("yesterday,1\n60,1\n", ":1: 'yesterday' is not a timestamp"),
        ("0,1\n60,-4\n", ":2: requests must be a number >= 0, got '-4'"),
    ],
)
def test_bad_csv_profiles_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "p.csv"
    path.write_text(text)
    with pytest.raises(CostError) as err:
        from_csv(str(path))
    assert message in str(err.value) and str(path) in str(err.value)


def test_csv_and_records_profiles(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("timestamp,requests\n2026-01-05T00:00:00Z,60\n2026-01-05T00:01:00Z,120\n")
    profile = from_csv(str(path))
    assert profile.interval_s == 60 and list(profile.rate) == [1.0, 2.0] and profile.requests == 180
    recs = [{"time": "2026-01-05T00:00:10Z"}, {"time": "2026-01-05T00:00:50Z"}, {"time": "2026-01-05T00:02:00Z"}]
    assert list(from_records(recs).rate * 60) == [2.0, 0.0, 1.0]


@pytest.mark.parametrize(
    ("spec", "message"),
    [("wavy", "unknown profile 'wavy'"), ("steady:-1", "must be a number > 0"), ("spiky:x", "got 'x'")],
)
def test_bad_named_shapes(spec: str, message: str) -> None:
    with pytest.raises(CostError, match=message):
        shape(spec)


def test_named_shapes() -> None:
    assert shape("steady:2").requests == 2 * MONTH_S
    assert shape("business-hours").requests == 5 * 8 * 3600 * 22  # weekdays of 30 days from a Monday
    assert shape("spiky").requests == pytest.approx(0.1 * (MONTH_S - 240 * 300) + 20 * 240 * 300)


def test_price_table_and_overrides() -> None:
    table = {"lambda-x86_64@eu-west-1": {"gb_second": 0.00002}, "modes-x86_64": {"always_on_vcpu_hour": 0.05}}
    p = prices("x86_64", region="eu-west-1", table=table, overrides={"request": 0.0})
    assert (p.gb_second, p.request, p.modes.always_on_vcpu_hour) == (0.00002, 0.0, 0.05)
    assert prices("x86_64", table=table).gb_second == 0.0000166667  # another region: the list price
    assert not any("region" in source for source in p.sources)
    unknown = prices("x86_64", region="mars-1", table=table)  # no entry: the list prices, and the output says so
    assert unknown.gb_second == 0.0000166667
    assert "no price-table entry for region mars-1: the prices above are not that region's" in unknown.sources
    assert not any("region" in source for source in prices("x86_64", region="us-east-1").sources)  # the list's own
    with pytest.raises(CostError, match=r"lambda-x86_64.gb_second must be a number >= 0, got 'cheap'"):
        prices("x86_64", table={"lambda-x86_64": {"gb_second": "cheap"}})


# The command ------------------------------------------------------------------------------------------------------


@pytest.fixture
def records_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Metering records the engine's Meter wrote on Lambda at 1024 MB: one cold start (INIT 400 ms), 20 warm."""
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1024")
    m = meter(tmp_path, "lambda")
    recs = [one(m, total_ms=20.5, compute_ms=18.0, init_ms=400.0, cold=True)]
    recs += [one(m, total_ms=4.2 + i / 100, compute_ms=3.1) for i in range(20)]
    path = tmp_path / "metering.jsonl"
    path.write_text("log line before\n" + "".join(r.json().decode() + "\n" for r in recs))
    return path


@pytest.fixture
def day(tmp_path: Path) -> Path:
    """A day at 1-minute resolution: 0.2 req/s, and 3 req/s from 12:00 to 13:00."""
    path = tmp_path / "day.csv"
    path.write_text("".join(f"{m * 60},{(3 if 720 <= m < 780 else 0.2) * 60:g}\n" for m in range(1440)))
    return path


def _table(text: str) -> dict[str, dict[str, str]]:
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| mode")]
    header = next(line for line in text.splitlines() if line.startswith("| mode"))
    names = [c.strip() for c in header.strip("|").split("|")]
    return {
        r["mode"]: r
        for r in (dict(zip(names, [c.strip() for c in row.strip("|").split("|")], strict=True)) for row in rows)
    }


def test_records_figures_and_price_overrides(
    records_file: Path, day: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["cost", str(day), "--records", str(records_file)]) == 0
    out = capsys.readouterr().out
    assert "21 metering records from" in out and "INIT 400 ms, the median of 1 cold record(s)" in out
    assert "billed 5 ms" in out and "memory 1024 MB from the records' GB-seconds" in out
    rows = _table(out)
    assert len(rows) == 8 and rows["always-on"]["vs_always_on"] == "+0.0%"
    for row in rows.values():
        items = sum(float(row[k]) for k in ("compute", "requests", "init", "warm_pings", "provisioned", "idle"))
        assert float(row["total_usd"]) == pytest.approx(items, abs=0.02)
    assert "warmer: WarmerConcurrency=" in out and "WarmerRate=rate(5 minutes)" in out and "cheapest: " in out
    monkeypatch.setenv("OCLAW_PRICE_GB_SECOND", str(2 * 0.0000166667))
    assert main(["cost", str(day), "--records", str(records_file), "--csv", "-"]) == 0
    doubled = {r["mode"]: r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}  # notes on stderr
    assert float(doubled["lambda-on-demand"]["compute"]) == pytest.approx(
        2 * float(rows["lambda-on-demand"]["compute"]), abs=0.011
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["steady"], "give the per-request figures: --records FILE... (metering records) or --model NAME"),
        (["wavy", "--records", "{records}"], "unknown profile 'wavy'"),
        (["steady", "--records", "/nonexistent/m.jsonl"], "/nonexistent/m.jsonl: cannot read metering records"),
        (["steady", "--records", "{warm_only}"], "no cold Lambda request carrying INIT"),
        (["{bad_csv}", "--records", "{records}"], "bad.csv:2: requests must be a number >= 0"),
        (["wavy", "--model", "mlp", "--model-repository", "/nonexistent"], "unknown profile 'wavy'"),
        (["steady", "--model", "nothere", "--model-repository", "{tmp}"], "--model nothere: "),
        (["steady", "--records", "{records}", "--csv", "/nonexistent/dir/t.csv"], "t.csv: cannot write"),
    ],
)
def test_bad_input_exits_2_with_a_message(
    argv: list[str], message: str, records_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    warm_only = tmp_path / "warm.jsonl"
    warm_only.write_text("".join(line + "\n" for line in records_file.read_text().splitlines()[2:]))
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("0,1\n60,lots\n")
    paths = {"records": str(records_file), "warm_only": str(warm_only), "bad_csv": str(bad_csv), "tmp": str(tmp_path)}
    assert main(["cost", *(a.format(**paths) for a in argv)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_records_profile_price_table_and_region(
    records_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """PROFILE 'records' is the records' own traffic; OCLAW_PRICE_TABLE's region entry applies with --region."""
    table = tmp_path / "prices.json"
    table.write_text(json.dumps({"lambda-x86_64@eu-west-1": {"request": 0.0, "source": "eu list"}}))
    monkeypatch.setenv("OCLAW_PRICE_TABLE", str(table))
    assert main(["cost", "records", "--records", str(records_file), "--region", "eu-west-1"]) == 0
    out = capsys.readouterr().out
    assert "profile: records: 21 metering records over 1 minute(s); 907,200 requests a 30-day month" in out
    assert "prices: eu list;" in out and _table(out)["lambda-on-demand"]["requests"] == "0.00"


def test_cloud_run_instances_serving_several_requests_cost_less() -> None:
    """Overlapping requests (5 req/s of 150 ms) need several instances at concurrency 1, one at 16."""
    work = Workload(150.0, 150.0, (150.0,), 300.0, 150.0, 1024, "")
    one_each, shared = (
        Planner(Profile("p", np.full(60, 5.0), 60), Setup(work, prices("x86_64"), concurrency=c)).bills(1, 1, 1)
        for c in (1, 16)
    )
    by_mode = {b.mode: (a, b) for a, b in zip(one_each, shared, strict=True)}
    alone, together = by_mode["cloudrun-instance"]
    assert together.total < alone.total and together.cold_share < alone.cold_share
    assert by_mode["lambda-on-demand"][0] == by_mode["lambda-on-demand"][1]  # Lambda serves one at a time anyway


def test_bad_csv_through_the_console_exits_2(tmp_path: Path, records_file: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("0,1\n60,2\n30,3\n")
    cmd = [sys.executable, "-m", "handler.cli", "cost", str(bad), "--records", str(records_file)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"oclaw: {bad}:3: timestamps must increase" in done.stderr


def test_model_benchmark_end_to_end(tmp_path: Path, day: Path) -> None:
    """--model runs the model as a Lambda function (awslambdaric, INIT then requests); its records feed --records."""
    repo = tmp_path / "repo"
    _save(add_sub(), repo, "add_sub")
    saved, table, chart = tmp_path / "bench.jsonl", tmp_path / "cost.csv", tmp_path / "cost.png"
    argv = ["--model", "add_sub", "--model-repository", str(repo), "--runs", "5", "--save-records", str(saved)]
    cmd = [sys.executable, "-m", "handler.cli", "cost", str(day), *argv, "--csv", str(table), "--plot", str(chart)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False, timeout=240)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"a benchmark of add_sub ({repo}) as a Lambda function run locally, 5 warm requests" in out
    assert "cold start phases: runtime" in out and "sessions" in out
    recs = [json.loads(line) for line in saved.read_text().splitlines()]
    assert [r["cold"] for r in recs] == [True] + [False] * 5 and {r["model"] for r in recs} == {"add_sub"}
    assert all(r["platform"] == "lambda" and r["status"] == 200 for r in recs)
    with table.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["mode"] for r in rows] == [
        "lambda-on-demand",
        "lambda-snapstart",
        "lambda-provisioned",
        "lambda-warmer",
        "cloudrun-request-min0",
        "cloudrun-request-minN",
        "cloudrun-instance",
        "always-on",
    ]
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figures = next(line for line in out.splitlines() if "warm metering records (medians" in line)
    again = subprocess.run(
        [sys.executable, "-m", "handler.cli", "cost", str(day), "--records", str(saved)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    assert f"figures: 6 metering records from {saved}" in again.stdout
    assert figures.split("; memory")[0] in again.stdout  # the same per-request figures from the saved records


def test_workload_from_records() -> None:
    recs = [
        {
            "cold": True,
            "platform": "lambda",
            "billed_ms": 431.0,
            "total_ms": 30.2,
            "compute_ms": 25.0,
            "gb_seconds": 0.862,
        },
        *(
            {
                "cold": False,
                "platform": "lambda",
                "billed_ms": b,
                "total_ms": b - 0.5,
                "compute_ms": 3.0,
                "gb_seconds": b * 2 / 1000,
            }
            for b in (5.0, 6.0, 7.0)
        ),
        {"cold": False, "platform": "lambda", "billed_ms": 99.0, "total_ms": 98.0, "compute_ms": 9.0, "status": 500},
    ]
    w = workload(recs)
    # INIT: 431 billed less the cold request's ceil(30.2) = 31 ms; memory from GB-seconds: 2048 MB
    assert (w.init_ms, w.cold_ms, w.billed_ms, w.memory_mb) == (400.0, 30.2, 6.0, 2048)
    assert w.latency_ms == (4.5, 5.5, 6.5)  # the failed request left out
    with pytest.raises(CostError, match="billed_ms must be a number >= 0"):
        workload([{"cold": False, "billed_ms": "x", "total_ms": 1, "compute_ms": 1}])
