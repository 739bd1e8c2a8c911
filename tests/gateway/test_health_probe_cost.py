"""Active health checks skip pods whose traffic already proves them alive; probes are counted."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.health import HealthChecker, HealthTracker
from gateway.metrics import GatewayMetrics
from router.endpoint import Endpoint

INTERVAL = 1.0


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def pod() -> AsyncIterator[tuple[str, list[str]]]:
    hits: list[str] = []

    async def health(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response()

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", hits
    await runner.cleanup()


def probes(registry: CollectorRegistry, url: str) -> float:
    return registry.get_sample_value("kvgate_probes_total", {"endpoint": url, "kind": "health"}) or 0.0


async def test_recent_traffic_replaces_the_probe(pod: tuple[str, list[str]]) -> None:
    url, hits = pod
    ep = Endpoint(url, "m")
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry, lambda: [ep])
    clock = Clock()
    tracker = HealthTracker(metrics, 3, clock=clock)
    async with aiohttp.ClientSession() as session:
        checker = HealthChecker(
            session, lambda: [ep], tracker, timeout=0.5, interval=INTERVAL, metrics=metrics
        )
        await checker.check_all()
        assert len(hits) == 1 and probes(registry, url) == 1

        tracker.attempt_succeeded(ep)  # a proxied request was answered just now
        clock.now += INTERVAL - 0.01
        await checker.check_all()
        assert len(hits) == 1  # within the interval: no probe

        clock.now += 0.01  # exactly one interval since the answer: probed again (boundary)
        await checker.check_all()
        assert len(hits) == 2 and probes(registry, url) == 2


async def test_an_ejected_pod_is_probed_despite_recent_traffic(pod: tuple[str, list[str]]) -> None:
    url, hits = pod
    ep = Endpoint(url, "m")
    metrics = GatewayMetrics(CollectorRegistry(), lambda: [ep])
    tracker = HealthTracker(metrics, 1, clock=Clock())
    async with aiohttp.ClientSession() as session:
        checker = HealthChecker(session, lambda: [ep], tracker, timeout=0.5, interval=INTERVAL)
        tracker.attempt_succeeded(ep)
        tracker.attempt_failed(ep, "reset")
        assert not ep.healthy
        await checker.check_all()
        assert hits == ["/health"] and ep.healthy  # re-admitted by the probe
