"""kvgate_admission_* metrics. Labels: tenants come from the config (unknown ones fold into the
default tenant), priorities from the tenants, models from the pools: cardinality is bounded by config."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)

# (model, tenant, priority, queued requests) per queue, and (model, saturated) per pool, at scrape time
DepthReader = Callable[[], Iterable[tuple[str, str, int, int]]]
SaturationReader = Callable[[], Iterable[tuple[str, bool, int]]]


class _Children:
    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class AdmissionMetrics:
    def __init__(self, registry: CollectorRegistry, depth: DepthReader, saturation: SaturationReader) -> None:
        self.admitted = _Children(Counter(
            "kvgate_admission_admitted",
            "Requests admitted, by tenant and path (direct: capacity was free; queued: after waiting).",
            ["tenant", "path"], registry=registry,
        ))
        self.rejected = _Children(Counter(
            "kvgate_admission_rejected",
            "Requests refused or dropped by admission, by tenant and reason (forbidden, rate_requests, "
            "rate_tokens, queue_full, queue_bytes, queue_timeout, shutting_down, disconnected).",
            ["tenant", "reason"], registry=registry,
        ))
        self.wait = _Children(Histogram(
            "kvgate_admission_queue_wait_seconds",
            "Time admitted requests waited in the admission queue (0 for direct admission).",
            ["tenant", "priority"], buckets=WAIT_BUCKETS, registry=registry,
        ))
        self.dispatched_cost = _Children(Counter(
            "kvgate_admission_dispatched_cost_tokens",
            "Estimated cost (uncached prompt + expected output tokens) dispatched, by tenant: each "
            "tenant's rate over the sum is its dispatch share.",
            ["tenant"], registry=registry,
        ))
        registry.register(_QueueCollector(depth, saturation))


class _QueueCollector(Collector):
    def __init__(self, depth: DepthReader, saturation: SaturationReader) -> None:
        self._depth = depth
        self._saturation = saturation

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "kvgate_admission_queue_depth",
            "Requests waiting in the admission queue (the autoscaling signal).",
            labels=["model", "tenant", "priority"],
        )
        for model, tenant, priority, n in self._depth():
            depth.add_metric([model, tenant, str(priority)], n)
        saturated = GaugeMetricFamily(
            "kvgate_admission_pool_saturated", "1 while the pool has no free request slot.", labels=["model"]
        )
        free = GaugeMetricFamily(
            "kvgate_admission_pool_free_slots", "Requests the pool can take now (admission's view).",
            labels=["model"],
        )
        for model, is_saturated, slots in self._saturation():
            saturated.add_metric([model], 1.0 if is_saturated else 0.0)
            free.add_metric([model], slots)
        yield depth
        yield saturated
        yield free
