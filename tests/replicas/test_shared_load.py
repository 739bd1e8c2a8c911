"""Shared load between real replicas: one replica's prefill backlog on a pod steers another replica's
cache_aware away from that pod, with no scrape to tell it (scraping off), only the Redis summaries."""

from __future__ import annotations

import asyncio

import pytest
from helpers import eventually
from redis_support import RedisServer
from serve_support import MODEL, ServeProcess, client, complete, metric, start_all, stop_all, text

from bench.sim.fleet import SimFleet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

# slow prefill: three 4000-token prompts keep one pod busy for seconds
SLOW = {"model": MODEL, "prefill_tps": 2000.0, "itl_ms": 1.0, "itl_ms_per_seq": 0.0}


async def test_another_replicas_backlog_on_a_pod_steers_new_requests_away(redis_server: RedisServer) -> None:
    async with SimFleet(2, **SLOW) as fleet, client() as http:
        busy, idle = fleet.urls
        common = ["--model", MODEL, "--policy", "cache_aware", "--scrape-interval", "0",
                  "--redis-url", redis_server.url]  # fmt: skip
        loaded = ServeProcess([*common, "--backend", busy, "--seed", "1"])  # a replica that only has `busy`
        router = ServeProcess([*common, "--backend", busy, "--backend", idle, "--seed", "2"])
        gateways = await start_all([loaded, router])
        try:
            long = [asyncio.create_task(complete(http, loaded.url, text(50 + i, 4000))) for i in range(3)]

            async def router_sees_the_backlog() -> bool:
                return await metric(http, router.url, "kvgate_replica_sync_peer_in_flight",
                                    model=MODEL, endpoint=busy) == 3

            await eventually(router_sees_the_backlog, within=10.0, interval=0.02,
                             what="the other replica's in-flight summary")
            answers = [await complete(http, router.url, text(100 + i, 20)) for i in range(10)]
            assert [a.status for a in answers] == [200] * 10
            assert [a.endpoint for a in answers] == [idle] * 10  # 1 in 1024 by chance without the summary
            assert all(not t.done() for t in long)  # the backlog was there the whole time
            assert [a.status for a in await asyncio.gather(*long)] == [200] * 3
        finally:
            await stop_all(gateways)
