"""Endpoint health: passive ejection from failed proxy attempts, active /health checks, re-admission.

Rules:
- passive: `eject_after` consecutive failed attempts (connect refused, reset, 502/503, timeout) eject a
  pod at once;
- active, definite failure: a check refused, reset or answered with a non-2xx ejects the pod at that
  check, so a dead pod stops receiving new requests within one check interval plus its timeout;
- active, timeout: weaker evidence (a pod starved of CPU answers slowly but still serves), so only
  `eject_after_timeouts` consecutive timed-out checks eject it (with the default 2, a hung pod is out
  within two intervals plus the timeout);
- one successful active check re-admits an ejected pod and clears its failure counts;
- a healthy pod that answered a proxied request within the last interval is not probed: its traffic is
  the check (a probe costs the pod's API server CPU time it would spend on requests).
Ejecting every pod of a pool does not stop it serving: Pool.candidates then routes over all of them
(panic mode).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from enum import Enum

import aiohttp

from gateway.metrics import GatewayMetrics
from router.endpoint import Endpoint

log = logging.getLogger("kvgate.health")


class CheckResult(Enum):
    """The outcome of one active check."""

    OK = "ok"
    FAILED = "failed"  # refused, reset, non-2xx: the pod is down or says it is
    TIMEOUT = "timeout"  # no answer within the check timeout: down, hung, or only busy


class HealthTracker:
    """The one place that changes `Endpoint.healthy` and `consecutive_failures`, and that counts failed
    upstream attempts (kvgate_upstream_errors)."""

    def __init__(
        self,
        metrics: GatewayMetrics,
        eject_after: int,
        *,
        eject_after_timeouts: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = metrics
        self.clock = clock
        self.eject_after = eject_after
        self.eject_after_timeouts = eject_after_timeouts
        self._check_timeouts: dict[Endpoint, int] = {}  # consecutive timed-out checks of healthy pods
        self.last_success: dict[Endpoint, float] = {}  # monotonic time of the last answered attempt

    def attempt_failed(self, ep: Endpoint, kind: str) -> None:
        """A proxy attempt on `ep` failed; `kind` labels kvgate_upstream_errors (connect, reset, timeout,
        status_5xx, midstream)."""
        self.metrics.upstream_errors(ep.url, kind).inc()
        ep.consecutive_failures += 1
        if ep.healthy and ep.consecutive_failures >= self.eject_after:
            self._eject(ep, "passive")

    def attempt_succeeded(self, ep: Endpoint) -> None:
        ep.consecutive_failures = 0
        self.last_success[ep] = self.clock()

    def recently_answered(self, ep: Endpoint, within: float) -> bool:
        """Whether a proxied request to `ep` got an answer in the last `within` seconds."""
        last = self.last_success.get(ep)
        return last is not None and self.clock() - last < within

    def check_result(self, ep: Endpoint, result: CheckResult) -> None:
        """Apply one active check's outcome (see the module docstring for the rules)."""
        if result is CheckResult.OK:
            ep.consecutive_failures = 0
            self._check_timeouts.pop(ep, None)
            if not ep.healthy:
                ep.healthy = True
                log.warning("endpoint %s re-admitted", ep.url)
            return
        if not ep.healthy:
            return
        if result is CheckResult.TIMEOUT:
            timeouts = self._check_timeouts.get(ep, 0) + 1
            if timeouts < self.eject_after_timeouts:
                self._check_timeouts[ep] = timeouts
                log.info("endpoint %s: health check timed out (%d in a row)", ep.url, timeouts)
                return
        self._eject(ep, "active")

    def forget(self, keep: Iterable[Endpoint]) -> None:
        """Drop the timeout counts of endpoints no longer in any pool."""
        live = set(keep)
        for ep in [ep for ep in self._check_timeouts if ep not in live]:
            del self._check_timeouts[ep]
        for ep in [ep for ep in self.last_success if ep not in live]:
            del self.last_success[ep]

    def _eject(self, ep: Endpoint, cause: str) -> None:
        ep.healthy = False
        self._check_timeouts.pop(ep, None)
        self.metrics.ejections(ep.url, cause).inc()
        log.warning("endpoint %s ejected (%s, %d failures)", ep.url, cause, ep.consecutive_failures)


class HealthChecker:
    """One round (`check_all`) polls every endpoint's health path concurrently; app.health_ctx runs a
    round every health.interval seconds."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        endpoints: Callable[[], Iterable[Endpoint]],
        tracker: HealthTracker,
        *,
        timeout: float,
        path: str = "/health",
        interval: float = 0.0,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.session = session
        self.endpoints = endpoints
        self.tracker = tracker
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.path = path
        self.interval = interval  # > 0: skip healthy pods that answered traffic within it
        self.metrics = metrics

    async def check(self, ep: Endpoint) -> CheckResult:
        """GET the health path once. A connect timeout counts as TIMEOUT too: a pod whose accept queue
        is full under load looks the same as a slow answer."""
        if self.metrics is not None:
            self.metrics.probes(ep.url, "health").inc()
        try:
            async with self.session.get(ep.url + self.path, timeout=self.timeout) as resp:
                await resp.read()
                return CheckResult.OK if 200 <= resp.status < 300 else CheckResult.FAILED
        except TimeoutError:  # aiohttp's ServerTimeoutError and ConnectionTimeoutError included
            return CheckResult.TIMEOUT
        except (aiohttp.ClientError, OSError):
            return CheckResult.FAILED

    async def check_all(self) -> None:
        live = list(self.endpoints())
        recent = self.tracker.recently_answered
        eps = [ep for ep in live if not (self.interval and ep.healthy and recent(ep, self.interval))]
        results = await asyncio.gather(*(self.check(ep) for ep in eps))
        for ep, result in zip(eps, results, strict=True):
            self.tracker.check_result(ep, result)
        self.tracker.forget(live)
