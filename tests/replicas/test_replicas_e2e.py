"""Three `kvgate serve` replicas behind a round-robin client route like one, on the same simulated fleet.

The pod hit rate is what the simulated pods themselves report (vllm:prefix_cache_hits / queries), for
the same interleaved shared-prefix workload sent to one replica, or to three in turn:
- approximate index: with Redis the three share every routing decision and match one replica (within
  5%); without it each learns alone and the hit rate falls (the control, so the test can fail). The
  client sends the next request once the others applied the last one's record (at most 2 s): what is
  compared is what the replicas share, not how this machine's load delays it (a few ms:
  `python -m bench.replica_sync`), so a busy CI host cannot turn a close race into a miss;
- precise index: every replica subscribes to every pod's KV events (a pod's ZMQ PUB takes many SUBs),
  so they see the same events and route like one without anything shared.
Redis killed mid-run: every request still answers 200 and routing goes on; once it is back, a prefix
routed by one replica is found by the others again.
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers import eventually
from redis_support import RedisServer
from serve_support import (
    MODEL,
    ServeProcess,
    client,
    complete,
    metric,
    metric_samples,
    round_robin,
    shared_prefix_workload,
    start_all,
    stop_all,
    text,
    wait_connected,
)

from bench.loadgen.podmetrics import delta, scrape
from bench.sim.fleet import SimFleet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

FAST: dict[str, Any] = {"model": MODEL, "prefill_tps": 1e6, "itl_ms": 1.0, "itl_ms_per_seq": 0.0}
EVENTS: dict[str, Any] = {"kv_events_endpoint": "tcp://127.0.0.1:*", "kv_events_replay_endpoint": "tcp://127.0.0.1:*"}
PROMPTS = shared_prefix_workload(groups=8, per_group=6, prefix=192, question=16)
PODS = 4


def serve_args(fleet: SimFleet, index: str, redis_url: str | None) -> list[str]:
    args = ["--model", MODEL, "--policy", "cache_aware", "--index", index, "--scrape-interval", "0.5",
            "--health-interval", "1.0"]  # fmt: skip
    for info in fleet.ready_infos():
        args += ["--backend", info["url"]]
        if index == "precise":
            args += ["--kv-events", info["kv_events"], "--kv-events-replay", info["kv_events_replay"]]
    if redis_url:
        args += ["--redis-url", redis_url]
    return args


async def hit_rate(replicas: int, index: str, redis_url: str | None = None) -> float:
    """The pods' prefix hit rate over PROMPTS sent round-robin to `replicas` gateways (a fresh fleet)."""
    options = {**FAST, **(EVENTS if index == "precise" else {})}
    async with SimFleet(PODS, **options) as fleet, client() as http:
        args = serve_args(fleet, index, redis_url)
        gateways = await start_all([ServeProcess([*args, "--seed", str(i + 1)]) for i in range(replicas)])
        urls = [g.url for g in gateways]
        try:
            if redis_url:
                await wait_connected(http, urls)
            if index == "precise":  # each replica's subscriptions are up: a probe's events reach them
                await complete(http, urls[0], text(999, 40))
            before = await scrape(http, fleet.urls)
            answers = await round_robin(http, urls, PROMPTS, settle=synced(http, urls) if redis_url else None)
            after = await scrape(http, fleet.urls)
            if index == "precise":
                await same_events_everywhere(http, urls)
        finally:
            await stop_all(gateways)
    assert [a.status for a in answers] == [200] * len(PROMPTS)
    rate = delta(before, after).hit_rate
    assert rate is not None
    return rate


def synced(http, urls: list[str]):
    """After a request: wait until each replica applied the records the others published so far (one
    per request routed there)."""

    async def settle(sent: list[int]) -> None:
        async def applied() -> bool:
            for i, u in enumerate(urls):
                have = await metric(http, u, "kvgate_replica_sync_applied_total", kind="blocks")
                if have < sum(sent) - sent[i]:
                    return False
            return True

        await eventually(applied, within=2.0, interval=0.01, what="each replica to apply the others' records")

    return settle


async def same_events_everywhere(http, urls: list[str]) -> None:
    """Every replica counted the same KV events from every pod (one view of the caches)."""

    async def agree() -> bool:
        seen = [await metric_samples(http, u, "kvgate_kv_events_total") for u in urls]
        return bool(seen[0]) and all(s == seen[0] for s in seen[1:])

    await eventually(agree, within=10.0, interval=0.1, what="the replicas to count the same KV events")


async def test_approximate_replicas_sharing_through_redis_route_like_one(redis_server: RedisServer) -> None:
    one = await hit_rate(1, "approximate")
    shared = await hit_rate(3, "approximate", redis_server.url)
    alone = await hit_rate(3, "approximate")  # the control: no Redis, each replica learns alone
    print(f"pod hit rate: one replica {one:.3f}, three sharing {shared:.3f}, three alone {alone:.3f}")
    assert one > 0.6
    assert abs(shared - one) <= 0.05 * one
    assert alone < shared - 0.1


async def test_precise_replicas_follow_the_same_kv_events_and_route_like_one() -> None:
    one = await hit_rate(1, "precise")
    three = await hit_rate(3, "precise")
    print(f"pod hit rate: one replica {one:.3f}, three {three:.3f}")
    assert one > 0.6
    assert abs(three - one) <= 0.05 * one


async def test_redis_killed_mid_run_loses_no_request_and_sync_resumes(redis_server: RedisServer) -> None:
    async with SimFleet(PODS, **FAST) as fleet, client() as http:
        args = serve_args(fleet, "approximate", redis_server.url)
        gateways = await start_all([ServeProcess([*args, "--seed", str(i + 1)]) for i in range(3)])
        urls = [g.url for g in gateways]
        try:
            await wait_connected(http, urls)
            third = len(PROMPTS) // 3
            answers = await round_robin(http, urls, PROMPTS[:third])
            await redis_server.kill()
            answers += await round_robin(http, urls, PROMPTS[third : 2 * third], start=third)
            await wait_connected(http, urls, up=False)
            answers += await round_robin(http, urls, PROMPTS[2 * third :], start=2 * third)
            assert [a.status for a in answers] == [200] * len(PROMPTS)
            assert sum(a.cached_tokens > 0 for a in answers[third:]) > third  # still routing by prefix
            await redis_server.start()  # back, empty
            await wait_connected(http, urls)
            # a new prefix routed by replica 0 is found by replicas 1 and 2
            prefix = text(777, 192)
            first = await complete(http, urls[0], prefix + " first")
            assert first.status == 200

            async def followers_hit() -> bool:
                for i, u in enumerate(urls[1:]):
                    a = await complete(http, u, prefix + f" again {i}")
                    if a.endpoint != first.endpoint or a.cached_tokens < 192:
                        return False
                return True

            await eventually(followers_hit, within=5.0, interval=0.05, what="sync to resume after Redis")
        finally:
            codes = await stop_all(gateways)
        assert codes == [0, 0, 0]
