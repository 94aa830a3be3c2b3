"""The deployment modes' monthly bills, itemised, with the share of requests that meet a cold start and the p99
latency that follows; and the sizing of the floor (provisioned concurrency, minimum instances, the warmer's
``WarmerConcurrency``) that keeps cold starts under a target share.

Every bill is a closed formula over a simulation's counts (``engine.cost.simulation``), scaled to a 30-day month.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from engine.cost import IDLE_LIFETIME_S
from engine.cost.prices import Prices
from engine.cost.profiles import MONTH_S, Profile
from engine.cost.simulation import WARMER_PERIOD_S, WARMER_TRAFFIC_WINDOW_S, Simulation, arrivals, simulate
from engine.cost.workload import Workload

#: The items of a bill, in the order they are shown.
ITEMS = ("compute", "requests", "init", "warm_pings", "provisioned", "idle", "free_tier")
#: Cloud Run bills an instance's active time rounded up to 100 ms.
CLOUDRUN_ROUND_MS = 100
#: EventBridge rates the warmer may run at (seconds); the longest below the idle lifetime is recommended.
WARMER_RATES = (60, 120, 300, 600, 900, 1800, 3600)


@dataclass(frozen=True)
class Setup:
    """What the bills depend on besides the traffic: figures, prices, the instance's shape, the warmer."""

    workload: Workload
    prices: Prices
    #: vCPUs of a Cloud Run or always-on instance (Lambda's follow its memory size).
    vcpu: float = 1.0
    idle_lifetime_s: float = IDLE_LIFETIME_S
    warmer_period_s: float = WARMER_PERIOD_S
    #: How long a fanned-out warm ping holds its instance (``OCLAW_WARMER_HOLD_MS``).
    warmer_hold_ms: float = 75.0
    #: The warmer skips its fan-out after traffic this recent (``OCLAW_WARMER_TRAFFIC_WINDOW_S``).
    warmer_window_s: float = WARMER_TRAFFIC_WINDOW_S
    #: Requests a Cloud Run instance serves at once (containerConcurrency); Lambda's serve one.
    concurrency: int = 16
    #: A SnapStart restore's duration, read from a Lambda REPORT line (``Restore Duration``); None: unknown.
    restore_ms: float | None = None

    @property
    def gb(self) -> float:
        """The memory size in GB (GiB for Cloud Run: both are 1024 MB here, as the platforms bill them)."""
        return self.workload.memory_mb / 1024


@dataclass(frozen=True)
class Bill:
    """One mode's monthly cost (USD) by item, its cold-start share and p99 latency (ms; None: unknown)."""

    mode: str
    instances: int
    items: dict[str, float]
    cold_share: float
    p99_ms: float | None
    note: str = ""

    @property
    def total(self) -> float:
        """The month's cost."""
        return sum(self.items.values())


def _items(**values: float) -> dict[str, float]:
    return {name: values.get(name, 0.0) for name in ITEMS}


def p99(workload: Workload, cold_share: float, cold_latency_ms: float | None) -> float | None:
    """The 99th percentile of a mixture: warm durations, and a ``cold_share`` of requests at the cold latency."""
    if cold_share > 0.01:
        return cold_latency_ms
    q = min(1.0, 0.99 / (1.0 - cold_share)) if cold_share < 1 else 1.0
    return float(np.quantile(np.array(workload.latency_ms), q, method="inverted_cdf"))


def _ceil_to(ms: float, step: float) -> float:
    return math.ceil(ms / step - 1e-9) * step


def _lambda_free(s: Setup, gb_seconds: float, requests: float) -> float:
    free = s.prices.free
    if free is None:
        return 0.0
    return -(
        min(gb_seconds, free.lambda_gb_seconds) * s.prices.gb_second
        + min(requests, free.lambda_requests) * s.prices.request
    )


def lambda_on_demand(s: Setup, sim: Simulation, factor: float) -> Bill:
    """Lambda on demand: duration and requests, INIT billed with the request that paid a cold start."""
    w, p = s.workload, s.prices
    warm, cold = (sim.requests - sim.cold) * factor, sim.cold * factor
    compute_gbs = (warm * w.billed_ms + cold * math.ceil(w.cold_ms)) / 1000 * s.gb
    init_gbs = cold * w.init_ms / 1000 * s.gb
    items = _items(
        compute=compute_gbs * p.gb_second,
        requests=(warm + cold) * p.request,
        init=init_gbs * p.gb_second,
        free_tier=_lambda_free(s, compute_gbs + init_gbs, warm + cold),
    )
    return Bill("lambda-on-demand", 0, items, sim.cold_share, p99(w, sim.cold_share, w.cold_latency_ms))


def lambda_snapstart(s: Setup, sim: Simulation, factor: float) -> Bill:
    """Lambda SnapStart (Python): a restore per GB instead of INIT, the snapshot cached all month (as idle)."""
    w, p = s.workload, s.prices
    warm, cold = (sim.requests - sim.cold) * factor, sim.cold * factor
    compute_gbs = (warm + cold) * w.billed_ms / 1000 * s.gb  # the model was warmed before the snapshot
    items = _items(
        compute=compute_gbs * p.gb_second,
        requests=(warm + cold) * p.request,
        init=cold * s.gb * p.modes.snapstart_restore_gb,
        idle=MONTH_S * s.gb * p.modes.snapstart_cache_gb_second,
        free_tier=_lambda_free(s, compute_gbs, warm + cold),
    )
    latency = None if s.restore_ms is None else s.restore_ms + w.warm_ms
    tail = p99(w, sim.cold_share, latency)
    note = "" if tail is not None else "p99 needs --restore-ms (a REPORT line's Restore Duration on Lambda)"
    return Bill("lambda-snapstart", 0, items, sim.cold_share, tail, note)


def lambda_provisioned(s: Setup, sim: Simulation, factor: float) -> Bill:
    """Lambda with provisioned concurrency N: N instances billed all month, their requests at the lower rate."""
    w, p = s.workload, s.prices
    floor, cold = sim.on_floor * factor, sim.cold * factor
    spill = sim.requests * factor - floor - cold
    spill_gbs = (spill * w.billed_ms + cold * math.ceil(w.cold_ms)) / 1000 * s.gb
    init_gbs = cold * w.init_ms / 1000 * s.gb
    items = _items(
        compute=floor * w.billed_ms / 1000 * s.gb * p.modes.provisioned_duration_gb_second + spill_gbs * p.gb_second,
        requests=sim.requests * factor * p.request,
        init=init_gbs * p.gb_second,
        provisioned=sim.floor * s.gb * MONTH_S * p.modes.provisioned_gb_second,
        free_tier=_lambda_free(s, spill_gbs + init_gbs, sim.requests * factor),
    )
    return Bill("lambda-provisioned", sim.floor, items, sim.cold_share, p99(w, sim.cold_share, w.cold_latency_ms))


def lambda_warmer(s: Setup, sim: Simulation, factor: float) -> Bill:
    """Lambda on demand with the warmer pinging N instances every period: pings billed, their INITs too."""
    w, p = s.workload, s.prices
    warm, cold = (sim.requests - sim.cold) * factor, sim.cold * factor
    pings, ping_inits = sim.pings * factor, sim.ping_inits * factor
    ping_ms = math.ceil(w.compute_ms + (s.warmer_hold_ms if sim.floor > 1 else 0.0))
    compute_gbs = (warm * w.billed_ms + cold * math.ceil(w.cold_ms)) / 1000 * s.gb
    init_gbs = (cold + ping_inits) * w.init_ms / 1000 * s.gb
    ping_gbs = pings * ping_ms / 1000 * s.gb
    items = _items(
        compute=compute_gbs * p.gb_second,
        requests=(warm + cold) * p.request,
        init=init_gbs * p.gb_second,
        warm_pings=ping_gbs * p.gb_second + pings * p.request,
        free_tier=_lambda_free(s, compute_gbs + init_gbs + ping_gbs, warm + cold + pings),
    )
    note = f"pings every {s.warmer_period_s:g} s"
    return Bill("lambda-warmer", sim.floor, items, sim.cold_share, p99(w, sim.cold_share, w.cold_latency_ms), note)


def _cloudrun_rate(s: Setup, vcpu_price: float, gib_price: float) -> float:
    return s.vcpu * vcpu_price + s.gb * gib_price


def cloudrun_request(s: Setup, sim: Simulation, factor: float) -> Bill:
    """Cloud Run, request-based billing, minimum instances N (the simulation's floor): each request's time rounded
    up to 100 ms (requests that overlap on an instance are billed once there: an upper bound then), start-up
    billed, idle minimum instances at the idle rate."""
    w, p = s.workload, s.prices
    warm, cold = (sim.requests - sim.cold) * factor, sim.cold * factor
    active_s = (warm * _ceil_to(w.warm_ms, CLOUDRUN_ROUND_MS) + cold * _ceil_to(w.cold_ms, CLOUDRUN_ROUND_MS)) / 1000
    init_s = cold * _ceil_to(w.init_ms, CLOUDRUN_ROUND_MS) / 1000
    rate = _cloudrun_rate(s, p.cloudrun_vcpu_second, p.cloudrun_gib_second)
    idle_s = max(0.0, sim.floor * MONTH_S - sim.floor_busy_s * factor)
    free = 0.0
    if p.free is not None:
        busy = active_s + init_s
        free = -(
            min(busy * s.vcpu, p.free.cloudrun_vcpu_seconds) * p.cloudrun_vcpu_second
            + min(busy * s.gb, p.free.cloudrun_gib_seconds) * p.cloudrun_gib_second
            + min(warm + cold, p.free.cloudrun_requests) * p.cloudrun_request
        )
    items = _items(
        compute=active_s * rate,
        requests=(warm + cold) * p.cloudrun_request,
        init=init_s * rate,
        idle=idle_s * _cloudrun_rate(s, p.modes.cloudrun_idle_vcpu_second, p.modes.cloudrun_idle_gib_second),
        free_tier=free,
    )
    mode = "cloudrun-request-min0" if sim.floor == 0 else "cloudrun-request-minN"
    return Bill(mode, sim.floor, items, sim.cold_share, p99(w, sim.cold_share, w.cold_latency_ms))


def cloudrun_instance(s: Setup, sim: Simulation, factor: float) -> Bill:
    """Cloud Run, instance-based billing: every instance billed from start until reclaimed, no request fee."""
    w, p = s.workload, s.prices
    warm, cold = (sim.requests - sim.cold) * factor, sim.cold * factor
    rate = _cloudrun_rate(s, p.cloudrun_instance_vcpu_second, p.cloudrun_instance_gib_second)
    busy_s = (warm * w.warm_ms + cold * w.cold_ms) / 1000
    init_s = cold * w.init_ms / 1000
    lived_s = max(sim.instance_s * factor, busy_s + init_s)
    free = 0.0
    if p.free is not None:
        free = -(
            min(lived_s * s.vcpu, p.free.cloudrun_instance_vcpu_seconds) * p.cloudrun_instance_vcpu_second
            + min(lived_s * s.gb, p.free.cloudrun_instance_gib_seconds) * p.cloudrun_instance_gib_second
        )
    items = _items(compute=busy_s * rate, init=init_s * rate, idle=(lived_s - busy_s - init_s) * rate, free_tier=free)
    return Bill("cloudrun-instance", 0, items, sim.cold_share, p99(w, sim.cold_share, w.cold_latency_ms))


def always_on(s: Setup, sim: Simulation, factor: float) -> Bill:
    """N always-on instances (Fargate): billed every hour; no cold start. The simulation's requests that found
    the kept floor's N instances busy would queue here: its overflow share says how many."""
    w, p = s.workload, s.prices
    n = max(1, sim.floor)
    rate_s = (s.vcpu * p.modes.always_on_vcpu_hour + s.gb * p.modes.always_on_gb_hour) / 3600
    busy_s = sim.requests * factor * w.warm_ms / 1000
    items = _items(compute=busy_s * rate_s, idle=(n * MONTH_S - busy_s) * rate_s)
    share = sim.overflow_share
    note = f"{share:.2%} of requests find all {n} busy and queue (p99 leaves their wait out)" if share else ""
    return Bill("always-on", n, items, 0.0, p99(w, 0.0, None), note)


@dataclass
class Planner:
    """Simulations of one profile's arrivals, cached by (floor, warmer)."""

    profile: Profile
    setup: Setup
    times: np.ndarray = field(init=False)
    runs: dict[tuple[int, bool, float, int], Simulation] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.times = arrivals(self.profile)

    def sim(
        self, floor: int = 0, *, warmer: bool = False, init_ms: float | None = None, concurrency: int = 1
    ) -> Simulation:
        """The simulation with this floor (kept, or pinged by the warmer)."""
        w = self.setup.workload
        init = w.init_ms if init_ms is None else init_ms
        key = (floor, warmer, init, concurrency)
        if key not in self.runs:
            self.runs[key] = simulate(
                self.times,
                service_s=w.warm_ms / 1000,
                init_s=(init + w.cold_ms - w.warm_ms) / 1000,
                idle_lifetime_s=self.setup.idle_lifetime_s,
                floor=floor,
                warmer=warmer,
                concurrency=concurrency,
                period_s=self.setup.warmer_period_s,
                traffic_window_s=self.setup.warmer_window_s,
                horizon_s=self.profile.seconds,
            )
        return self.runs[key]

    def smallest_floor(
        self, max_share: float, *, warmer: bool = False, overflow: bool = False, limit: int = 1024
    ) -> int | None:
        """The fewest instances (>= 1) whose simulation keeps the cold share (or with ``overflow``, the share of
        requests finding every kept instance busy) at or under ``max_share``."""

        def over(n: int) -> bool:
            sim = self.sim(n, warmer=warmer)
            return (sim.overflow_share if overflow else sim.cold_share) > max_share

        high = 1
        while over(high):
            if high >= limit:
                return None
            high = min(limit, high * 2)
        low = high // 2 + 1 if high > 1 else 1
        while low < high:
            mid = (low + high) // 2
            if over(mid):
                low = mid + 1
            else:
                high = mid
        return high

    def bills(self, n: int, warmer_n: int, always_n: int) -> list[Bill]:
        """Every mode: those with a floor kept at ``n`` instances, the warmer pinging ``warmer_n``, ``always_n``
        always-on instances."""
        f, s = self.profile.month_factor, self.setup
        base = self.sim(0)
        kept = self.sim(n)
        snap = self.sim(0, init_ms=s.restore_ms) if s.restore_ms is not None else base
        c = s.concurrency
        return [
            lambda_on_demand(s, base, f),
            lambda_snapstart(s, snap, f),
            lambda_provisioned(s, kept, f),
            lambda_warmer(s, self.sim(warmer_n, warmer=True), f),
            cloudrun_request(s, self.sim(0, concurrency=c), f),
            cloudrun_request(s, self.sim(n, concurrency=c), f),
            cloudrun_instance(s, self.sim(0, concurrency=c), f),
            always_on(s, self.sim(always_n), f),
        ]

    def curve(self, points: list[int]) -> list[Bill]:
        """The modes with a floor at each of ``points`` instances (for the chart)."""
        f, s = self.profile.month_factor, self.setup
        out: list[Bill] = []
        for n in points:
            kept = self.sim(n)
            out += [lambda_provisioned(s, kept, f), lambda_warmer(s, self.sim(n, warmer=True), f)]
            out += [cloudrun_request(s, self.sim(n, concurrency=s.concurrency), f)]
        return out


def warmer_period(idle_lifetime_s: float) -> float:
    """The longest warmer rate under the idle lifetime: pings that come before an idle instance is reclaimed."""
    below = [r for r in WARMER_RATES if r < idle_lifetime_s]
    return float(below[-1] if below else WARMER_RATES[0])
