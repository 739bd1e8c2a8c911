"""Metrics math over request results: percentiles, throughput, and one run's summary."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bench.loadgen.client import RequestResult


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's
    default); None for no values."""
    if not 0 <= q <= 100:
        raise ValueError("q must be in [0, 100]")
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass(slots=True, frozen=True)
class Dist:
    """Mean and percentiles of one latency, seconds."""

    n: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Dist:
        return cls(len(values), mean(values), percentile(values, 50), percentile(values, 90),
                   percentile(values, 99), max(values) if values else None)


@dataclass(slots=True, frozen=True)
class RunSummary:
    """Client-side figures of one run (one policy at one load)."""

    requests: int
    ok: int
    errors: int
    duration_s: float
    ttft: Dist
    itl: Dist
    e2e: Dist
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int | None  # sum over responses that reported it
    output_tps: float
    request_rate: float
    by_endpoint: dict[str, int]
    error_samples: list[str]

    @property
    def cached_fraction(self) -> float | None:
        if self.cached_tokens is None or not self.prompt_tokens:
            return None
        return self.cached_tokens / self.prompt_tokens

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "cached_fraction": self.cached_fraction}


def summarize(results: Iterable[RequestResult], duration_s: float) -> RunSummary:
    """Summary of `results` over a run of `duration_s` seconds (first send to last completion).

    Latencies and throughput count successful requests only; errors are counted and sampled.
    """
    results = list(results)
    ok = [r for r in results if r.ok]
    errors = [r for r in results if not r.ok]
    itl = [g for r in ok for g in r.itl]
    reported = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    out_tokens = sum(r.output_tokens for r in ok)
    span = max(duration_s, 1e-9)
    return RunSummary(
        requests=len(results),
        ok=len(ok),
        errors=len(errors),
        duration_s=duration_s,
        ttft=Dist.of([r.ttft for r in ok if r.ttft is not None]),
        itl=Dist.of(itl),
        e2e=Dist.of([r.e2e for r in ok if r.e2e is not None]),
        prompt_tokens=sum(r.prompt_tokens for r in ok),
        output_tokens=out_tokens,
        cached_tokens=sum(reported) if reported else None,
        output_tps=out_tokens / span,
        request_rate=len(ok) / span,
        by_endpoint=dict(Counter(r.endpoint or "?" for r in ok).most_common()),
        error_samples=sorted({r.error or "" for r in errors})[:5],
    )
