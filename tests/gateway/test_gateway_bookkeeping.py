"""Per-attempt bookkeeping: policy hooks exactly once per attempt, in-flight counts exact on every exit."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence

import aiohttp
from gateway_fakes import pool_config
from helpers import eventually

from gateway.state import STATE
from router.endpoint import Endpoint
from router.policies.round_robin import RoundRobinPolicy
from router.policy import Decision, RouteRequest

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class CountingPolicy(RoundRobinPolicy):
    """round_robin that records every hook call per (request id, endpoint)."""

    def __init__(self) -> None:
        super().__init__(seed=0)
        self.picks: Counter[tuple[str, str]] = Counter()
        self.routed: Counter[tuple[str, str]] = Counter()
        self.finished: list[tuple[str, str, bool]] = []

    def pick(self, request: RouteRequest, candidates: Sequence[Endpoint]) -> Decision:
        d = super().pick(request, candidates)
        self.picks[(request.request_id, d.endpoint.url)] += 1
        return d

    def on_routed(self, request: RouteRequest, decision: Decision) -> None:
        self.routed[(request.request_id, decision.endpoint.url)] += 1

    def on_finished(self, request: RouteRequest, decision: Decision, ok: bool) -> None:
        self.finished.append((request.request_id, decision.endpoint.url, ok))


async def test_hooks_once_per_attempt_and_in_flight_exact(fake_pods, start_gateway, client):
    good, refusing, dying = await fake_pods(3)
    refusing.status = 503
    dying.chunks, dying.die_after_chunks = 4, 1
    policy = CountingPolicy()

    def install(app) -> None:
        app[STATE].pools.get("m").policy = policy

    config = pool_config(
        [good.url, refusing.url, dying.url], retries={"max_retries": 2}, health={"eject_after": 100}
    )
    gw = await start_gateway(config, install)
    for i in range(6):
        async with client.post(
            gw.url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers={"X-Request-Id": f"r{i}"}
        ) as r:
            assert r.status == 200
            await r.read()
    # a client that goes away mid-stream
    good.chunks, good.chunk_delay = 100, 0.05
    session = aiohttp.ClientSession()
    r = await session.post(
        gw.url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers={"X-Request-Id": "gone"}
    )
    await r.content.readline()
    served_by = r.headers["x-kvgate-endpoint"]
    r.close()
    await session.close()
    endpoints = gw.app[STATE].pools.get("m").endpoints
    await eventually(
        lambda: (
            all(ep.in_flight == 0 for ep in endpoints) and len(policy.finished) == sum(policy.routed.values())
        )
    )
    assert policy.routed == policy.picks  # on_routed once per pick
    assert all(n == 1 for n in policy.routed.values())  # never twice for one attempt
    finished = Counter((rid, url) for rid, url, _ in policy.finished)
    assert finished == policy.routed  # on_finished once per attempt
    oks = {(rid, url): ok for rid, url, ok in policy.finished}
    for (rid, url), ok in oks.items():
        expected = url == good.url and rid != "gone"
        assert ok == expected, (rid, url, ok)
    assert served_by in {good.url, dying.url}
    assert all(ep.in_flight == 0 and ep.in_flight_tokens == 0 for ep in endpoints)
    assert good.running == 0


async def test_in_flight_counts_concurrent_requests(fake_pods, start_gateway, client):
    (pod,) = await fake_pods(1)
    pod.first_delay = 0.3
    gw = await start_gateway(pool_config([pod.url]))
    endpoint = gw.app[STATE].pools.get("m").endpoints[0]

    async def one() -> None:
        async with client.post(gw.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200

    tasks = [asyncio.create_task(one()) for _ in range(5)]
    await eventually(lambda: endpoint.in_flight == 5)
    await asyncio.gather(*tasks)
    assert endpoint.in_flight == 0
