"""The pod watchers of `discovery: kubernetes` pools, started and stopped one pool at a time.

At startup (app.discovery_ctx) a watcher starts for each such pool; a config reload (gateway.reload)
calls `sync` with the new pool specs: a pool whose `discovery`/`kubernetes` settings are unchanged
keeps its watcher and every endpoint it found, one whose settings changed gets a new watcher (the old
one's endpoints leave the pool), a pool no longer discovered loses its watcher and those endpoints.
A watcher hands changes to whichever Pool serves its model at that moment (`Pools.by_model`), so a
pool rebuilt by a reload (a new policy) goes on receiving them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from gateway.config import PoolSpec
from gateway.pools import Pools
from router.discovery import kubernetes as kube_discovery
from router.discovery.config import KubernetesDiscovery
from router.discovery.metrics import DiscoveryMetrics
from router.endpoint import Endpoint

log = logging.getLogger("kvgate.discovery")


@dataclass(slots=True)
class _Running:
    settings: KubernetesDiscovery
    stack: contextlib.AsyncExitStack
    watcher: kube_discovery.PodWatcher


def discovered(specs: Sequence[PoolSpec]) -> dict[str, KubernetesDiscovery]:
    """model -> discovery settings of the pools that watch the API server."""
    return {s.model: s.kubernetes for s in specs if s.discovery == "kubernetes" and s.kubernetes is not None}


class PoolWatchers:
    """model -> its running PodWatcher. `source` builds the API client (tests may pass a fake)."""

    def __init__(
        self,
        pools: Pools,
        registry: CollectorRegistry,
        *,
        source: Callable[[KubernetesDiscovery], kube_discovery.PodSource] | None = None,
    ) -> None:
        self.pools = pools
        self.registry = registry
        self.source = source
        self._metrics: DiscoveryMetrics | None = None  # registered with the first watcher
        self._running: dict[str, _Running] = {}

    def settings(self, model: str) -> KubernetesDiscovery | None:
        running = self._running.get(model)
        return running.settings if running is not None else None

    async def sync(self, specs: Sequence[PoolSpec]) -> None:
        """Watchers for exactly the discovered pools of `specs`; new ones wait for their first pod
        list (up to each pool's initial_sync_timeout_s), concurrently."""
        wanted = discovered(specs)
        for model in [m for m, r in self._running.items() if wanted.get(m) != r.settings]:
            await self.stop(model)
        await asyncio.gather(*(self._start(m, k) for m, k in wanted.items() if m not in self._running))

    async def stop(self, model: str) -> None:
        """Stop `model`'s watcher; the endpoints it found leave the pool (when the pool still exists)."""
        running = self._running.pop(model, None)
        if running is None:
            return
        found = running.watcher.endpoints
        await running.stack.aclose()
        pool = self.pools.by_model.get(model)
        if pool is not None:
            held = set(pool.endpoints)
            gone = [ep for ep in found if ep in held]
            if gone:
                pool.update_endpoints([], gone)
        log.info("pool %s: pod watch stopped (%d discovered endpoints left the pool)", model, len(found))

    async def close(self) -> None:
        for running in list(self._running.values()):
            await running.stack.aclose()
        self._running.clear()

    async def _start(self, model: str, settings: KubernetesDiscovery) -> None:
        if self._metrics is None:
            self._metrics = DiscoveryMetrics(self.registry)
        stack = contextlib.AsyncExitStack()
        watched = kube_discovery.WatchedPool(model, settings, lambda a, r: self._update(model, a, r))
        kwargs = {} if self.source is None else {"source": self.source}
        (watcher,) = await stack.enter_async_context(
            kube_discovery.watch_pools([watched], self._metrics, **kwargs)
        )
        self._running[model] = _Running(settings, stack, watcher)

    def _update(self, model: str, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        pool = self.pools.by_model.get(model)
        if pool is not None:
            pool.update_endpoints(added, removed)
