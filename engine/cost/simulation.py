"""Poisson arrivals played against a pool of instances that are reclaimed after an idle lifetime; a floor of
instances kept (provisioned concurrency, minimum instances) or pinged (the warmer).

Model: an arrival takes a free kept instance, else one with a free slot (Cloud Run serves up to ``concurrency``
requests an instance; Lambda one), else the idle instance used last, else starts a new one (a cold start: busy
for INIT plus the request). An idle instance is reclaimed ``idle_lifetime_s`` after its last request. Closed
forms the tests hold it to: with N kept instances and no reuse (idle lifetime 0) the share of cold starts is
Erlang's loss formula B(N, λ·s) (an M/G/N/N system: the requests the kept floor cannot take are its lost ones),
whatever the service time's distribution (``erlang_b``); a lone instance with rare requests is cold when a gap
exceeds its idle lifetime, e^(-λ·L) of them.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from engine.cost import IDLE_LIFETIME_S
from engine.cost.profiles import Profile

#: The warmer's default schedule (template.yaml ``WarmerRate``, rate(5 minutes)).
WARMER_PERIOD_S = 300.0
#: The warmer skips its fan-out when the instance it lands on served traffic this recently
#: (``OCLAW_WARMER_TRAFFIC_WINDOW_S``).
WARMER_TRAFFIC_WINDOW_S = 60.0
SEED = 20250801


@dataclass
class Simulation:
    """Counts from one run of arrivals against a pool with a floor of ``floor`` instances."""

    floor: int
    warmer: bool
    requests: int = 0
    cold: int = 0
    #: Requests served by one of the kept floor's instances (provisioned concurrency, minimum instances).
    on_floor: int = 0
    #: Warm pings sent, and instances they had to start (each paid an INIT).
    pings: int = 0
    ping_inits: int = 0
    #: Seconds the instances outside the kept floor lived, from start until reclaimed (or the end).
    instance_s: float = 0.0
    #: Seconds the kept floor's instances spent serving requests.
    floor_busy_s: float = 0.0
    #: Most instances alive at once.
    peak: int = 0

    @property
    def cold_share(self) -> float:
        """The share of requests that met a cold start."""
        return self.cold / self.requests if self.requests else 0.0

    @property
    def overflow_share(self) -> float:
        """The share of requests that found every kept instance busy (all of them without a kept floor)."""
        return 1 - self.on_floor / self.requests if self.requests else 0.0


def arrivals(profile: Profile, seed: int = SEED) -> np.ndarray:
    """Poisson arrivals: in each interval a count drawn from its mean, at uniform times; sorted seconds."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(profile.rate * profile.interval_s)
    starts = np.repeat(np.arange(len(counts)) * profile.interval_s, counts)
    times = starts + rng.random(len(starts)) * profile.interval_s
    times.sort()
    return np.asarray(times)


def simulate(
    times: np.ndarray,
    *,
    service_s: float,
    init_s: float,
    idle_lifetime_s: float = IDLE_LIFETIME_S,
    floor: int = 0,
    warmer: bool = False,
    concurrency: int = 1,
    period_s: float = WARMER_PERIOD_S,
    traffic_window_s: float = WARMER_TRAFFIC_WINDOW_S,
    horizon_s: float | None = None,
) -> Simulation:
    """Serve each arrival (see the module's model); returns the counts.

    An instance serves up to ``concurrency`` requests at once (Lambda: 1; Cloud Run: containerConcurrency), each
    for ``service_s`` (no slowdown from sharing is modelled); a starting instance takes no other request before
    its INIT ends. ``floor`` instances are kept (never reclaimed, used first), or with ``warmer`` pinged every
    ``period_s`` from time 0: a ping lands on the idle instance used last (or starts one); unless a request came
    within ``traffic_window_s`` it fans out to ``floor`` instances in all, refreshing idle ones and starting
    those missing. A ping's own hold of its instance (``OCLAW_WARMER_HOLD_MS``) is not modelled.
    """
    horizon = float(horizon_s if horizon_s is not None else (times[-1] if len(times) else 0.0))
    sim = Simulation(floor=floor, warmer=warmer, requests=len(times))
    c = concurrency
    kept_slots = 0 if warmer else floor * c  # free request slots on the kept instances (alike: a count is enough)
    load: dict[int, int] = {}  # requests in flight (or slots blocked by a start) on each other instance
    born: dict[int, float] = {}
    idle_since: dict[int, float] = {}  # idle instances: since when (entries of ``idle`` not matching are stale)
    idle: deque[tuple[float, int]] = deque()  # (idle since, instance), oldest first
    partial: list[int] = []  # instances with a request in flight and a free slot (stale entries skipped)
    events: list[tuple[float, int, int]] = []  # (at, kind, instance): kind 0 a request ends, 1 a start ends
    ids = itertools.count()
    sim.peak = floor if not warmer else 0
    next_ping = 0.0 if warmer else math.inf
    last_arrival = -math.inf

    def reclaim(now: float) -> None:
        while idle and idle[0][0] + idle_lifetime_s <= now:
            since, i = idle.popleft()
            if idle_since.get(i) == since:
                del idle_since[i], load[i]
                sim.instance_s += since + idle_lifetime_s - born.pop(i)

    def release(now: float) -> None:
        nonlocal kept_slots
        while events and events[0][0] <= now:
            at, kind, i = heapq.heappop(events)
            reclaim(at)
            if i < 0:
                kept_slots += 1
                continue
            left = load[i] = load[i] - (c - 1 if kind else 1)
            if left == 0:
                idle_since[i] = at
                idle.append((at, i))
            elif left == c - 1 or kind:
                partial.append(i)
        reclaim(now)

    def take_idle() -> int | None:
        while idle:
            since, i = idle.pop()
            if idle_since.get(i) == since:
                del idle_since[i]
                return i
        return None

    def start(now: float) -> int:
        i = next(ids)
        born[i], load[i] = now, 0
        sim.peak = max(sim.peak, len(load) + (0 if warmer else floor))
        return i

    def ping_until(limit: float) -> None:
        nonlocal next_ping
        while next_ping <= limit:
            release(next_ping)
            fan = 1 if next_ping - last_arrival < traffic_window_s else max(1, floor)
            refreshed = [i for i in (take_idle() for _ in range(fan)) if i is not None]
            started = [start(next_ping) for _ in range(fan - len(refreshed))]
            for i in [*reversed(refreshed), *started]:
                idle_since[i] = next_ping
                idle.append((next_ping, i))
            sim.pings += fan
            sim.ping_inits += len(started)
            next_ping += period_s

    cold = on_floor = 0
    push = heapq.heappush
    for t in times.tolist():
        if next_ping <= t:
            ping_until(t)
        if (events and events[0][0] <= t) or (idle and idle[0][0] + idle_lifetime_s <= t):
            release(t)
        last_arrival = t
        if kept_slots:
            kept_slots -= 1
            on_floor += 1
            push(events, (t + service_s, 0, -1))
            continue
        if c > 1:
            while partial and not 0 < load.get(partial[-1], 0) < c:
                partial.pop()
        i = partial[-1] if partial else take_idle()
        if i is not None:
            load[i] += 1
            if c > 1:
                if load[i] == c and partial and partial[-1] == i:
                    partial.pop()
                elif load[i] < c and (not partial or partial[-1] != i):
                    partial.append(i)
            push(events, (t + service_s, 0, i))
            continue
        cold += 1
        i = start(t)
        load[i] = c  # its other slots open when INIT ends
        if c > 1:
            heapq.heappush(events, (t + init_s, 1, i))
        heapq.heappush(events, (t + init_s + service_s, 0, i))
    ping_until(horizon)
    end = max(horizon, max((at for at, _, _ in events), default=0.0))
    last_end: dict[int, float] = {}
    for at, _, i in events:
        if i >= 0:
            last_end[i] = max(last_end.get(i, at), at)
    for i, b in born.items():
        since = idle_since.get(i, last_end.get(i, end))
        sim.instance_s += min(since + idle_lifetime_s, max(end, since)) - b
    sim.cold, sim.on_floor, sim.floor_busy_s = cold, on_floor, on_floor * service_s
    return sim


def erlang_b(servers: int, load: float) -> float:
    """Erlang's loss formula B(N, A): the share of arrivals an M/G/N/N system turns away at offered load A."""
    b = 1.0
    for n in range(1, servers + 1):
        b = load * b / (n + load * b)
    return b
