"""The app's replica sync (config `replicas:`): the pools' prefix caches and cache_aware ledgers
wired to router/replicas' ReplicaSync, started before serving and closed after."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from gateway.state import STATE
from router.prefix_cache import PrefixCache
from router.replicas import sync as replica_sync
from router.replicas.sync import LoadSource, ReplicaSync

REPLICA_SYNC = web.AppKey("kvgate_replica_sync", ReplicaSync)


def check_replicas() -> None:
    """Before anything starts: the `redis` extra is installed (ModuleNotFoundError otherwise, which
    the CLI turns into its one-line hint)."""
    replica_sync.require_client()


async def replicas_ctx(app: web.Application) -> AsyncIterator[None]:
    """The replica sync over the app's pools (read through the one Pools object: reloads followed)."""
    state = app[STATE]
    assert state.config.replicas is not None
    pools = state.pools

    def caches() -> dict[str, PrefixCache]:
        return {pool.model: pool.prefix_cache for pool in pools if pool.prefix_cache is not None}

    def load_sources() -> dict[str, LoadSource]:
        return {pool.model: pool.policy for pool in pools  # type: ignore[misc]
                if callable(getattr(pool.policy, "load_summary", None))}

    sync = app[REPLICA_SYNC] = ReplicaSync(
        state.config.replicas, caches, load_sources, pools.endpoints, state.metrics.registry
    )
    await sync.start()
    yield
    await sync.close()
