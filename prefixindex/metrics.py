"""Prometheus metrics of the prefix index and KV-event stream (kvgate_ prefix, labels model and pod).

The hit ratio is a PromQL division:
    sum(rate(kvgate_prefix_cached_tokens_total[5m])) / sum(rate(kvgate_prefix_prompt_tokens_total[5m]))
Metrics are created once per registry and shared by every pool registered on it.
"""

from __future__ import annotations

import weakref

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class IndexMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.prompt_tokens = Counter(
            "kvgate_prefix_prompt_tokens", "Prompt tokens routed by the cache-aware policy",
            ["model", "pod"], registry=r,
        )
        self.cached_tokens = Counter(
            "kvgate_prefix_cached_tokens",
            "Prompt tokens predicted cached on the chosen pod at routing time", ["model", "pod"], registry=r,
        )
        self.decisions = Counter(
            "kvgate_cache_aware_decisions", "Cache-aware routing decisions by reason",
            ["model", "reason"], registry=r,
        )
        self.unkeyed = Counter(
            "kvgate_prefix_unkeyed_requests",
            "Requests routed without prefix keys, by reason: prompt (none usable) or chat_template "
            "(a chat the gateway cannot render as the pod would)", ["model", "reason"], registry=r,
        )
        self.index_blocks = Gauge(
            "kvgate_prefix_index_blocks", "Distinct blocks in the prefix index", ["model"], registry=r
        )
        self.index_entries = Gauge(
            "kvgate_prefix_index_entries", "(block, pod) pairs in the prefix index", ["model"], registry=r
        )
        self.index_bytes = Gauge(
            "kvgate_prefix_index_bytes", "Estimated memory of the prefix index", ["model"], registry=r
        )
        self.kv_events = Counter(
            "kvgate_kv_events", "KV-cache events received, by type", ["model", "pod", "type"], registry=r
        )
        self.seq_gaps = Counter(
            "kvgate_kv_event_gaps", "Sequence gaps detected in a pod's KV-event stream",
            ["model", "pod"], registry=r,
        )
        self.replays = Counter(
            "kvgate_kv_event_replays", "Replays requested from a pod's replay socket, by outcome",
            ["model", "pod", "outcome"], registry=r,
        )
        self.resets = Counter(
            "kvgate_kv_event_resets",
            "Times a pod's index entries were dropped (lost events, restart, clear)",
            ["model", "pod", "cause"], registry=r,
        )

        self.tokenizer_batch = Histogram(
            "kvgate_tokenizer_batch_texts",
            "Prompts encoded together in one batch by the tokenizer worker", ["model"],
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.token_reuse = Counter(
            "kvgate_tokenizer_reuse",
            "Chat prompts looked up in the token reuse cache, by outcome: hit (an earlier turn's tokens "
            "reused) or miss", ["model", "outcome"], registry=r,
        )
        self.reused_tokens = Counter(
            "kvgate_tokenizer_reused_tokens", "Prompt tokens taken from the reuse cache, not re-encoded",
            ["model"], registry=r,
        )
        self.token_reuse_bytes = Gauge(
            "kvgate_tokenizer_reuse_bytes", "Memory held by the token reuse cache", ["model"], registry=r
        )


class TokenizerObserver:
    """Counts one pool's tokenizer batches and reuse in its metrics (label children bound once; safe
    to call from the worker thread)."""

    def __init__(self, metrics: IndexMetrics, model: str) -> None:
        self._batch = metrics.tokenizer_batch.labels(model)
        self._hit = metrics.token_reuse.labels(model, "hit")
        self._miss = metrics.token_reuse.labels(model, "miss")
        self._tokens = metrics.reused_tokens.labels(model)
        self._bytes = metrics.token_reuse_bytes.labels(model)

    def batch(self, texts: int) -> None:
        self._batch.observe(texts)

    def reused(self, hit: bool, tokens: int, cache_bytes: int) -> None:
        (self._hit if hit else self._miss).inc()
        if tokens:
            self._tokens.inc(tokens)
        self._bytes.set(cache_bytes)


_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, IndexMetrics] = weakref.WeakKeyDictionary()


def index_metrics(registry: CollectorRegistry) -> IndexMetrics:
    """The metrics registered on `registry`, created on first use."""
    got = _BY_REGISTRY.get(registry)
    if got is None:
        got = _BY_REGISTRY[registry] = IndexMetrics(registry)
    return got
