"""LoRA end to end: the real gateway (`cache_aware`) in front of 3 simulated pods serving adapter `a1`.

Requests naming the adapter route to the pool and keep to the pod holding their prefix; the same
prompt for the base model shares no keys with them. Approximate mode takes the adapter from the
config; precise mode learns it from the pods' /v1/models and the adapter's blocks from KV events
carrying `lora_name`.
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
from gateway.pools import Pool
from gateway.state import STATE
from router.policy import RouteRequest
from router.prefix_cache import PrefixCache

MODEL = "sim-model"
ADAPTER = "a1"
FAST: dict[str, Any] = {
    "model": MODEL, "prefill_tps": 1e6, "itl_ms": 1.0, "itl_ms_per_seq": 0.0, "lora_modules": [ADAPTER],
}
WORDS = [f"w{i}" for i in range(400)]
PREFIX_WORDS = 160  # 10 blocks of 16 (the sim's WordTokenizer: one token per word)


def text(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.registry = CollectorRegistry()
        self.app = build_app(config, registry=self.registry)
        self.runner = web.AppRunner(self.app, handler_cancellation=True, shutdown_timeout=1.0)
        self.url = ""

    async def start(self) -> Gateway:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    @property
    def pool(self) -> Pool:
        (pool,) = list(self.app[STATE].pools)
        return pool

    @property
    def cache(self) -> PrefixCache:
        assert self.pool.prefix_cache is not None
        return self.pool.prefix_cache

    def keys(self, model: str, prompt: str) -> list[int]:
        body = {"model": model, "prompt": prompt}
        return self.cache.keys_for(RouteRequest("probe", MODEL, "/v1/completions", body, {}))


def config(
    fleet: SimFleet, params: dict[str, Any], *, adapters: list[str], kv: str | None = None
) -> GatewayConfig:
    endpoints = [
        EndpointSpec(url=p.url, kv_events=kv, kv_events_replay=p.publisher.replay_endpoint if kv else None)
        for p in fleet.pods
    ]
    pool = PoolSpec(
        model=MODEL, endpoints=endpoints, adapters=adapters,
        policy=PolicySpec("cache_aware", {"seed": 7, **params}),
    )
    return GatewayConfig(pools=[pool], health=Health(interval=5.0), scrape=Scrape(interval=0.1), seed=7)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def complete(
    http: aiohttp.ClientSession, gw: Gateway, model: str, prompt: str
) -> tuple[str, int, dict]:
    body = {"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0}
    async with http.post(f"{gw.url}/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        data = await resp.json()
        return resp.headers["x-kvgate-endpoint"], int(resp.headers["x-kvgate-cached-tokens"]), data


def pod_cached(data: dict) -> int:
    return data["usage"]["prompt_tokens_details"]["cached_tokens"]


async def test_approximate_adapter_from_config_routes_by_its_own_prefix(http) -> None:
    async with SimFleet(3, **FAST) as fleet:
        gw = await Gateway(config(fleet, {"index": "approximate"}, adapters=[ADAPTER])).start()
        try:
            prefix = text(1, PREFIX_WORDS)
            home, cached, data = await complete(http, gw, ADAPTER, prefix + " " + text(50, 20))
            assert cached == 0 and data["model"] == ADAPTER
            for i in range(3):  # prefix affinity, and the pod really holds the adapter's blocks
                url, cached, data = await complete(http, gw, ADAPTER, prefix + " " + text(60 + i, 20))
                assert url == home and cached == PREFIX_WORDS and pod_cached(data) >= PREFIX_WORDS
            # the base model's keys for the same prompt are its own: nothing of the adapter's matches
            assert not set(gw.keys(MODEL, prefix)) & set(gw.keys(ADAPTER, prefix))
            _, cached, data = await complete(http, gw, MODEL, prefix + " " + text(70, 20))
            assert cached == 0 and pod_cached(data) == 0 and data["model"] == MODEL
            async with http.post(f"{gw.url}/v1/completions", json={"model": "a2", "prompt": "x"}) as r:
                assert r.status == 404  # an adapter no pool serves
            async with http.get(f"{gw.url}/v1/models") as r:
                listed = [(m["id"], m.get("parent")) for m in (await r.json())["data"]]
            assert listed == [(MODEL, None), (ADAPTER, MODEL)]
        finally:
            await gw.runner.cleanup()


async def test_precise_learns_the_adapter_and_its_blocks_from_lora_events(http) -> None:
    port = free_port()
    options = {
        **FAST,
        "kv_events_endpoint": f"tcp://127.0.0.1:{port}",  # the pods connect; the gateway binds
        "kv_events_replay_endpoint": "tcp://127.0.0.1:*",
    }
    async with SimFleet(3, **options) as fleet:
        params = {"index": "precise", "pending_blocks": 0}  # only events tell the index anything
        gw = await Gateway(config(fleet, params, adapters=[], kv=f"tcp://*:{port}")).start()
        try:
            assert gw.pool.learned_adapters == {ADAPTER}  # from the pods' /v1/models, before serving
            await complete(http, gw, MODEL, text(2, 64))  # the pods connect to the gateway's bound port
            prefix = text(3, PREFIX_WORDS)
            home, _, _ = await complete(http, gw, ADAPTER, prefix + " " + text(80, 20))
            keys = gw.keys(ADAPTER, prefix)
            endpoints = list(gw.cache.trackers)
            await eventually(lambda: gw.cache.match(keys, endpoints) != {}, what="the adapter's events")
            (holder,) = gw.cache.match(keys, endpoints)
            assert holder.url == home
            # the tracker's view of the pod is exactly the pod's cache, adapter blocks included
            pod = next(p for p in fleet.pods if p.url == home)
            tracker = gw.cache.trackers[holder]
            await eventually(
                lambda: set(tracker._engine) == {external_hash(h) for h in pod.engine.pool._cached},
                what="the tracker to follow the pod",
            )
            assert tracker.counts["skipped_lora_unnamed"] == 0
            for i in range(3):
                url, cached, data = await complete(http, gw, ADAPTER, prefix + " " + text(90 + i, 20))
                assert url == home and cached == PREFIX_WORDS and pod_cached(data) >= PREFIX_WORDS
            # the same prompt for the base model: the adapter's blocks are no match for it
            assert gw.cache.match(gw.keys(MODEL, prefix), endpoints) == {}
            _, cached, data = await complete(http, gw, MODEL, prefix + " " + text(99, 20))
            assert cached == 0 and pod_cached(data) == 0
        finally:
            await gw.runner.cleanup()
