"""Prometheus metrics of endpoint discovery (prefix `kvgate_discovery_`), in the gateway's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

# Why a pod watch was started again (kvgate_discovery_watch_restarts_total{reason}):
#   resume  the watch ended (its server-side timeout, or the API server closed it): watched again from
#           the last resourceVersion seen, bookmarks included, with nothing listed again
#   relist  410 Gone: that resourceVersion left the API server's history; listed again and diffed
#           against the pool (pods present before and after keep their endpoint and index state)
#   error   a list or watch request failed (refused, HTTP error, broken stream): retried after a backoff
RESTART_REASONS = ("resume", "relist", "error")


class DiscoveryMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.endpoints = Gauge(
            "kvgate_discovery_endpoints",
            "Endpoints the pool's discovery currently provides (serving pods).",
            ["pool"],
            registry=registry,
        )
        self.restarts = Counter(
            "kvgate_discovery_watch_restarts",
            "Pod watches started again, by reason: resume (ended, resumed from the last resourceVersion), "
            "relist (410 Gone: listed again and diffed), error (a failed request, after a backoff).",
            ["pool", "reason"],
            registry=registry,
        )
        self.events = Counter(
            "kvgate_discovery_watch_events",
            "Watch events received, by type (ADDED, MODIFIED, DELETED, BOOKMARK, ERROR).",
            ["pool", "type"],
            registry=registry,
        )
        self.changes = Counter(
            "kvgate_discovery_endpoint_changes",
            "Endpoints added to or removed from the pool by discovery.",
            ["pool", "change"],
            registry=registry,
        )
        self.connected = Gauge(
            "kvgate_discovery_watch_connected",
            "1 while the pool's pod watch is open, 0 while it is being re-established.",
            ["pool"],
            registry=registry,
        )

    def init_pool(self, pool: str) -> None:
        """Export every series of `pool` from the start (at 0), so rates and alerts see them."""
        self.endpoints.labels(pool).set(0)
        self.connected.labels(pool).set(0)
        for reason in RESTART_REASONS:
            self.restarts.labels(pool, reason)
        for change in ("added", "removed"):
            self.changes.labels(pool, change)
