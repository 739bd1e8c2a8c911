"""Cache-aware routing end to end: the real gateway in front of 4 simulated pods on 127.0.0.1.

Approximate mode: requests sharing a prefix land on the pod that holds it. Precise mode: the index
follows the pods' real KV events, evictions included, checked block for block against each simulated
pod's own cache; a restarted gateway rebuilds that view from the pods' replay sockets alone.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers import eventually, free_port
from prometheus_client import CollectorRegistry

from bench.sim.fleet import SimFleet
from bench.sim.kvcache import external_hash
from gateway.app import build_app
from gateway.config import EndpointSpec, GatewayConfig, Health, PolicySpec, PoolSpec, Scrape
from gateway.state import STATE
from router.endpoint import Endpoint
from router.policy import RouteRequest
from router.prefix_cache import PrefixCache

MODEL = "sim-model"
FAST: dict[str, Any] = {"model": MODEL, "prefill_tps": 1e6, "itl_ms": 1.0, "itl_ms_per_seq": 0.0}
WORDS = [f"w{i}" for i in range(400)]


def text(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def probe(prompt: str) -> RouteRequest:
    return RouteRequest("probe", MODEL, "/v1/completions", {"model": MODEL, "prompt": prompt}, {})


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.registry = CollectorRegistry()
        self.app = build_app(config, registry=self.registry)
        self.runner = web.AppRunner(self.app, handler_cancellation=True, shutdown_timeout=1.0)
        self.url = ""

    async def start(self) -> Gateway:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()

    @property
    def cache(self) -> PrefixCache:
        (pool,) = list(self.app[STATE].pools)
        assert pool.prefix_cache is not None
        return pool.prefix_cache

    def endpoint(self, url: str) -> Endpoint:
        (pool,) = list(self.app[STATE].pools)
        return next(ep for ep in pool.endpoints if ep.url == url)


def config(fleet: SimFleet, params: dict[str, Any], kv: str | None = None) -> GatewayConfig:
    endpoints = [
        EndpointSpec(url=p.url, kv_events=kv, kv_events_replay=p.publisher.replay_endpoint if kv else None)
        for p in fleet.pods
    ]
    pool = PoolSpec(model=MODEL, endpoints=endpoints, policy=PolicySpec("cache_aware", {"seed": 7, **params}))
    return GatewayConfig(pools=[pool], health=Health(interval=5.0), scrape=Scrape(interval=0.1), seed=7)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def complete(http: aiohttp.ClientSession, gw: Gateway, prompt: str) -> tuple[str, int, dict]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0}
    async with http.post(f"{gw.url}/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        data = await resp.json()
        return resp.headers["x-kvgate-endpoint"], int(resp.headers["x-kvgate-cached-tokens"]), data


async def test_approximate_requests_sharing_a_prefix_land_on_its_pod(http) -> None:
    async with SimFleet(4, **FAST) as fleet:
        gw = await Gateway(config(fleet, {"index": "approximate"})).start()
        try:
            homes: dict[int, str] = {}
            for round_ in range(4):
                for group in range(6):
                    prompt = text(group, 160) + " " + text(1000 + round_, 20)
                    url, cached, data = await complete(http, gw, prompt)
                    if round_ == 0:
                        homes[group] = url
                        continue
                    assert url == homes[group]
                    assert cached == 160
                    assert data["usage"]["prompt_tokens_details"]["cached_tokens"] >= 160
            assert len(set(homes.values())) >= 2  # new prefixes are not piled onto one pod
        finally:
            await gw.stop()


def sim_hashes(pod) -> set[int]:
    return {external_hash(h) for h in pod.engine.pool._cached}


def view_matches_sims(gw: Gateway, fleet: SimFleet) -> bool:
    cache = gw.cache
    for pod in fleet.pods:
        ep = gw.endpoint(pod.url)
        tracker = cache.trackers[ep]
        if set(tracker._engine) != sim_hashes(pod):
            return False
        if cache.index.keys_of(ep) != set(tracker.keys()):
            return False
    return True


async def test_precise_index_follows_kv_events_through_eviction_and_gateway_restart(http) -> None:
    port = free_port()
    options = {
        **FAST,
        "num_gpu_blocks": 40,
        "kv_events_endpoint": f"tcp://127.0.0.1:{port}",  # the pods connect; the gateway binds
        "kv_events_replay_endpoint": "tcp://127.0.0.1:*",
    }
    async with SimFleet(4, **options) as fleet:
        cfg = config(fleet, {"index": "precise", "pending_blocks": 0, "resync_interval": 0.3}, kv=f"tcp://*:{port}")
        gw = await Gateway(cfg).start()
        try:
            await complete(http, gw, text(1, 64))  # the pods connect to the gateway's bound port
            # a shared prefix: once its events arrive, the index alone sends followers to its pod
            url, _, _ = await complete(http, gw, text(2, 160))
            keys = gw.cache.keys_for(probe(text(2, 160)))
            await eventually(lambda: gw.cache.match(keys, list(gw.cache.trackers)) != {})
            for i in range(3):
                again, cached, _ = await complete(http, gw, text(2, 160) + f" tail{i}")
                assert again == url and cached == 160
            # many distinct prompts: 40-block caches must evict
            for i in range(24):
                await complete(http, gw, text(100 + i, 200))
            await eventually(lambda: view_matches_sims(gw, fleet))
            removed = sum(
                gw.registry.get_sample_value(
                    "kvgate_kv_events_total", {"model": MODEL, "pod": p.url, "type": "BlockRemoved"}
                ) or 0
                for p in fleet.pods
            )
            assert removed > 0 and sum(p.engine.pool.evictions for p in fleet.pods) > 0
        finally:
            await gw.stop()

        # a new gateway learns the same view from the replay sockets, before any request
        gw2 = await Gateway(cfg).start()
        try:
            await eventually(lambda: view_matches_sims(gw2, fleet) and len(gw2.cache.index) > 0)
            last = text(123, 200)
            keys = gw2.cache.keys_for(probe(last))
            holder = next(p.url for p in fleet.pods if gw2.cache.index.match(keys, [gw2.endpoint(p.url)]))
            url, cached, _ = await complete(http, gw2, last)
            assert url == holder and cached == 192
        finally:
            await gw2.stop()
