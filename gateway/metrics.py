"""The gateway's Prometheus metrics (prefix `kvgate_`), registered in a registry created at startup.

Per-request counters and histograms are updated on the request path through cached label children
(one dict lookup instead of prometheus-client's locked `labels()`); per-endpoint state (in flight,
health, scraped load) is read from the `Endpoint` objects only when /metrics is scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from router.endpoint import Endpoint

# vLLM's TTFT buckets (DESIGN.md), so gateway and pod TTFT histograms line up.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560)


class _Children:
    """label values -> metric child, created on first use."""

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class GatewayMetrics:
    """Every kvgate_ metric. `endpoints` is called at scrape time to list the live Endpoint objects."""

    def __init__(self, registry: CollectorRegistry, endpoints: Callable[[], Iterable[Endpoint]]) -> None:
        self.registry = registry
        self.requests = _Children(
            Counter(
                "kvgate_requests",
                "Client requests answered, by model, serving endpoint ('' if none) and HTTP status.",
                ["model", "endpoint", "status"],
                registry=registry,
            )
        )
        self.ttft = _Children(
            Histogram(
                "kvgate_time_to_first_token_seconds",
                "Gateway TTFT: request arrival to the first byte of the response body sent to the client.",
                ["model"],
                buckets=TTFT_BUCKETS,
                registry=registry,
            )
        )
        self.latency = _Children(
            Histogram(
                "kvgate_request_duration_seconds",
                "End-to-end latency at the gateway: arrival to the last byte sent.",
                ["model"],
                buckets=LATENCY_BUCKETS,
                registry=registry,
            )
        )
        self.retries = _Children(
            Counter("kvgate_retries", "Requests retried on another endpoint.", ["model"], registry=registry)
        )
        self.ejections = _Children(
            Counter(
                "kvgate_ejections",
                "Endpoints taken out of rotation, by cause (active health check or passive failures).",
                ["endpoint", "cause"],
                registry=registry,
            )
        )
        self.panic_routing = _Children(
            Counter(
                "kvgate_panic_routing",
                "Routing decisions made over all of a pool's endpoints, healthy or not, because too few "
                "were healthy (health.panic_threshold).",
                ["model"],
                registry=registry,
            )
        )
        self.upstream_errors = _Children(
            Counter(
                "kvgate_upstream_errors",
                "Failed upstream attempts by kind (connect, reset, timeout, status_5xx, midstream).",
                ["endpoint", "kind"],
                registry=registry,
            )
        )
        self.scrape_errors = _Children(
            Counter(
                "kvgate_scrape_errors",
                "Failed polls of an endpoint's /metrics.",
                ["endpoint"],
                registry=registry,
            )
        )
        self.probes = _Children(
            Counter(
                "kvgate_probes",
                "Requests the gateway itself sent a pod (kind: health, metrics): what watching it costs.",
                ["endpoint", "kind"],
                registry=registry,
            )
        )
        self.decisions = _Children(
            Counter(
                "kvgate_routing_decisions",
                "Routing decisions by policy and the policy's reason label.",
                ["policy", "reason"],
                registry=registry,
            )
        )
        registry.register(EndpointStateCollector(endpoints))


class EndpointStateCollector(Collector):
    """Per-endpoint gauges read from the live Endpoint objects at scrape time."""

    def __init__(self, endpoints: Callable[[], Iterable[Endpoint]]) -> None:
        self._endpoints = endpoints

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["endpoint", "model"]
        gauges = {
            "in_flight": ("kvgate_endpoint_in_flight", "Requests in flight from the gateway to it."),
            "healthy": ("kvgate_endpoint_healthy", "1 when the endpoint is in rotation, 0 when ejected."),
            "waiting": ("kvgate_endpoint_waiting", "Scraped vllm:num_requests_waiting."),
            "running": ("kvgate_endpoint_running", "Scraped vllm:num_requests_running."),
            "kv_usage": ("kvgate_endpoint_kv_cache_usage_ratio", "Scraped vllm:kv_cache_usage_perc (0..1)."),
        }
        families = {k: GaugeMetricFamily(n, h, labels=labels) for k, (n, h) in gauges.items()}
        for ep in self._endpoints():
            values = [ep.url, ep.model]
            families["in_flight"].add_metric(values, ep.in_flight)
            families["healthy"].add_metric(values, 1.0 if ep.healthy else 0.0)
            families["waiting"].add_metric(values, ep.waiting)
            families["running"].add_metric(values, ep.running)
            families["kv_usage"].add_metric(values, ep.kv_usage)
        yield from families.values()
