"""When sessions start: open loop (Poisson at a rate, or a trace's own timestamps) or closed loop.

Open loop sends on schedule whatever the server does (what exposes queueing); closed loop keeps N
users each running one session after another (what measures capacity at a fixed concurrency).
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.workloads.base import Workload
from bench.workloads.words import rng_for


@dataclass(slots=True, frozen=True)
class OpenLoop:
    """Sessions start at Poisson times at `rate` per second, or at their own `Session.at` / `speed`
    when `rate` is None (trace replay; speed 2 replays twice as fast)."""

    rate: float | None = None
    speed: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be > 0")
        if self.speed <= 0:
            raise ValueError("speed must be > 0")

    def label(self) -> str:
        return f"{self.rate:g}/s" if self.rate is not None else f"trace x{self.speed:g}"


@dataclass(slots=True, frozen=True)
class ClosedLoop:
    """`users` concurrent users, each starting its next session when the previous one ended."""

    users: int

    def __post_init__(self) -> None:
        if self.users <= 0:
            raise ValueError("users must be > 0")

    def label(self) -> str:
        return f"{self.users} users"


Arrival = OpenLoop | ClosedLoop


def start_times(workload: Workload, arrival: OpenLoop) -> list[float]:
    """Start offset (seconds from the run's start) of each session, non-decreasing, first at 0."""
    n = len(workload.sessions)
    if n == 0:
        return []
    if arrival.rate is None:
        if any(s.at is None for s in workload.sessions):
            raise ValueError(f"workload {workload.name!r} has no timestamps: give an arrival rate")
        times = [float(s.at) / arrival.speed for s in workload.sessions]  # type: ignore[arg-type]
        return [max(0.0, t - times[0]) for t in times]
    gaps = rng_for(arrival.seed, "poisson", arrival.rate).exponential(1.0 / arrival.rate, n)
    gaps[0] = 0.0
    return gaps.cumsum().tolist()
