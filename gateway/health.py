"""Endpoint health: passive ejection from failed proxy attempts, active /health checks, re-admission.

Rules: `eject_after` consecutive failed attempts (connect refused, reset, 502/503, timeout) eject a pod
at once (passive); a failed active check (non-2xx, error or timeout) ejects it at the next check
(active), so a dead pod stops receiving new requests within one check interval plus its timeout; one
successful active check re-admits an ejected pod and clears its failure count.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

import aiohttp

from gateway.metrics import GatewayMetrics
from router.endpoint import Endpoint

log = logging.getLogger("kvgate.health")


class HealthTracker:
    """The one place that changes `Endpoint.healthy` and `consecutive_failures`."""

    def __init__(self, metrics: GatewayMetrics, eject_after: int) -> None:
        self.metrics = metrics
        self.eject_after = eject_after

    def attempt_failed(self, ep: Endpoint) -> None:
        ep.consecutive_failures += 1
        if ep.healthy and ep.consecutive_failures >= self.eject_after:
            self._eject(ep, "passive")

    def attempt_succeeded(self, ep: Endpoint) -> None:
        ep.consecutive_failures = 0

    def check_result(self, ep: Endpoint, ok: bool) -> None:
        if ok:
            ep.consecutive_failures = 0
            if not ep.healthy:
                ep.healthy = True
                log.warning("endpoint %s re-admitted", ep.url)
        elif ep.healthy:
            self._eject(ep, "active")

    def _eject(self, ep: Endpoint, cause: str) -> None:
        ep.healthy = False
        self.metrics.ejections(ep.url, cause).inc()
        log.warning("endpoint %s ejected (%s, %d failures)", ep.url, cause, ep.consecutive_failures)


class HealthChecker:
    """Polls every endpoint's health path each `interval` seconds, concurrently."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        endpoints: Callable[[], Iterable[Endpoint]],
        tracker: HealthTracker,
        *,
        interval: float,
        timeout: float,
        path: str = "/health",
    ) -> None:
        self.session = session
        self.endpoints = endpoints
        self.tracker = tracker
        self.interval = interval
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.path = path

    async def check(self, ep: Endpoint) -> bool:
        try:
            async with self.session.get(ep.url + self.path, timeout=self.timeout) as resp:
                await resp.read()
                return 200 <= resp.status < 300
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def check_all(self) -> None:
        eps = list(self.endpoints())
        results = await asyncio.gather(*(self.check(ep) for ep in eps))
        for ep, ok in zip(eps, results, strict=True):
            self.tracker.check_result(ep, ok)

    async def run(self) -> None:
        """A round every `interval` seconds, the first one `interval` from now (startup ran one)."""
        loop = asyncio.get_running_loop()
        next_round = loop.time() + self.interval
        while True:
            await asyncio.sleep(max(0.0, next_round - loop.time()))
            next_round = loop.time() + self.interval
            await self.check_all()
