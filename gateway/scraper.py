"""Load signals: poll each pod's /metrics and write the parsed values into its Endpoint."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

import aiohttp

from gateway.metrics import GatewayMetrics
from gateway.vllm_metrics import parse_pod_load
from router.endpoint import Endpoint

log = logging.getLogger("kvgate.scraper")


class MetricsScraper:
    """One round (`scrape_all`) GETs /metrics of every endpoint concurrently (app.scraper_ctx runs a
    round every scrape.interval seconds); failures count in kvgate_scrape_errors and leave the
    endpoint's last values in place (health is the checker's job)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        endpoints: Callable[[], Iterable[Endpoint]],
        metrics: GatewayMetrics,
        *,
        timeout: float,
        path: str = "/metrics",
    ) -> None:
        self.session = session
        self.endpoints = endpoints
        self.metrics = metrics
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.path = path

    async def scrape(self, ep: Endpoint) -> bool:
        """Poll one endpoint; True when its fields were updated."""
        self.metrics.probes(ep.url, "metrics").inc()
        try:
            async with self.session.get(ep.url + self.path, timeout=self.timeout) as resp:
                if resp.status != 200:
                    raise aiohttp.ClientResponseError(
                        resp.request_info, resp.history, status=resp.status, message="bad status"
                    )
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError, OSError, UnicodeDecodeError) as exc:
            self.metrics.scrape_errors(ep.url).inc()
            log.debug("scrape of %s failed: %r", ep.url, exc)
            return False
        load = parse_pod_load(text)
        ep.in_flight_at_scrape = ep.in_flight
        ep.waiting = load.waiting
        ep.running = load.running
        ep.kv_usage = load.kv_usage
        if load.block_size is not None:
            ep.block_size = load.block_size
        if load.num_gpu_blocks is not None:
            ep.num_gpu_blocks = load.num_gpu_blocks
        ep.mark_scraped()
        return True

    async def scrape_all(self) -> None:
        await asyncio.gather(*(self.scrape(ep) for ep in self.endpoints()))
