"""What the pods themselves say: prefix-cache hits and queue time, from each pod's Prometheus /metrics.

A run's figures are the delta between a snapshot before and one after it, summed over the pods, so
they measure the hit rate actually achieved at the engines (not the gateway's prediction).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

COUNTERS = {
    "vllm:prefix_cache_queries": "prefix_queries",
    "vllm:prefix_cache_hits": "prefix_hits",
    "vllm:prompt_tokens": "prompt_tokens",
    "vllm:generation_tokens": "generation_tokens",
    "vllm:num_preemptions": "preemptions",
    "kvgate_sim:kv_cache_evicted_blocks": "evicted_blocks",  # the simulator's own; vLLM has none
}
QUEUE_HISTOGRAM = "vllm:request_queue_time_seconds"


@dataclass(slots=True)
class PodSnapshot:
    """Counter totals and the queue-time histogram (cumulative buckets by upper bound) of one pod."""

    counters: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    queue_buckets: dict[float, float] = field(default_factory=lambda: defaultdict(float))
    queue_sum: float = 0.0
    queue_count: float = 0.0


def parse_metrics(text: str) -> PodSnapshot:
    """Sum the counters and the queue histogram over all label sets in one exposition."""
    snap = PodSnapshot()
    for family in text_string_to_metric_families(text):
        # match on sample names: exposition libraries disagree on whether the family keeps `_total`
        for sample in family.samples:
            name = sample.name
            if name.endswith("_total") and (key := COUNTERS.get(name[:-6])) is not None:
                snap.counters[key] += sample.value
            elif name == QUEUE_HISTOGRAM + "_bucket":
                snap.queue_buckets[float(sample.labels["le"])] += sample.value
            elif name == QUEUE_HISTOGRAM + "_sum":
                snap.queue_sum += sample.value
            elif name == QUEUE_HISTOGRAM + "_count":
                snap.queue_count += sample.value
    return snap


async def scrape(http: aiohttp.ClientSession, urls: Sequence[str]) -> list[PodSnapshot]:
    """One snapshot per pod URL (an unreachable pod gives an empty snapshot)."""

    async def one(url: str) -> PodSnapshot:
        try:
            async with http.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp:
                return parse_metrics(await resp.text()) if resp.status == 200 else PodSnapshot()
        except (TimeoutError, aiohttp.ClientError):
            return PodSnapshot()

    return list(await asyncio.gather(*(one(u) for u in urls)))


@dataclass(slots=True, frozen=True)
class PodFigures:
    """Fleet-wide deltas over a run: prefix hit rate at the engines, queue time, preemptions."""

    prefix_queries: float
    prefix_hits: float
    prompt_tokens: float
    generation_tokens: float
    preemptions: float
    queue_mean_s: float | None
    queue_p90_s: float | None  # upper bound of the bucket holding the 90th percentile
    per_pod_hit_rate: list[float | None]
    evicted_blocks: float | None = None  # cached KV blocks evicted; None when no pod exports the count

    @property
    def hit_rate(self) -> float | None:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else None

    def to_json(self) -> dict[str, Any]:
        return {
            "prefix_queries": self.prefix_queries, "prefix_hits": self.prefix_hits,
            "hit_rate": self.hit_rate, "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens, "preemptions": self.preemptions,
            "queue_mean_s": self.queue_mean_s, "queue_p90_s": self.queue_p90_s,
            "per_pod_hit_rate": self.per_pod_hit_rate, "evicted_blocks": self.evicted_blocks,
        }


def delta(before: Sequence[PodSnapshot], after: Sequence[PodSnapshot]) -> PodFigures:
    """Fleet figures from per-pod snapshots taken before and after a run (same pod order)."""
    totals: dict[str, float] = defaultdict(float)
    buckets: dict[float, float] = defaultdict(float)
    q_sum = q_count = 0.0
    per_pod: list[float | None] = []
    for b, a in zip(before, after, strict=True):
        for key in COUNTERS.values():
            totals[key] += a.counters.get(key, 0.0) - b.counters.get(key, 0.0)
        queries = a.counters.get("prefix_queries", 0.0) - b.counters.get("prefix_queries", 0.0)
        hits = a.counters.get("prefix_hits", 0.0) - b.counters.get("prefix_hits", 0.0)
        per_pod.append(hits / queries if queries else None)
        for le, v in a.queue_buckets.items():
            buckets[le] += v - b.queue_buckets.get(le, 0.0)
        q_sum += a.queue_sum - b.queue_sum
        q_count += a.queue_count - b.queue_count
    return PodFigures(
        prefix_queries=totals["prefix_queries"], prefix_hits=totals["prefix_hits"],
        prompt_tokens=totals["prompt_tokens"], generation_tokens=totals["generation_tokens"],
        preemptions=totals["preemptions"],
        queue_mean_s=q_sum / q_count if q_count else None,
        queue_p90_s=_bucket_quantile(buckets, q_count, 0.9),
        per_pod_hit_rate=per_pod,
        evicted_blocks=totals["evicted_blocks"] if any("evicted_blocks" in a.counters for a in after)
        else None,
    )


def _bucket_quantile(buckets: dict[float, float], count: float, q: float) -> float | None:
    """Upper bound of the first cumulative bucket reaching q*count (as Prometheus buckets allow)."""
    if count <= 0:
        return None
    for le in sorted(buckets):
        if buckets[le] >= q * count:
            return le
    return None
