"""ReplicaSync against a real redis-server, in one event loop: what one replica's approximate index
learns reaches the others' within milliseconds, load summaries sum into Endpoint.peer_load and
expire, and a Redis that is away or restarts costs dropped messages, never an error or a wait."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from helpers import eventually
from prometheus_client import CollectorRegistry
from redis_support import RedisServer, free_port

from router.endpoint import Endpoint
from router.policy import RouteRequest
from router.prefix_cache import PrefixCache, PrefixCacheConfig
from router.replicas import wire
from router.replicas.config import ReplicasConfig
from router.replicas.sync import ReplicaSync
from router.route_state import RouteState

MODEL = "m"
URLS = ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]


def prompt(seed: int, words: int = 64) -> RouteRequest:
    text = " ".join(f"w{seed}x{i}" for i in range(words))
    return RouteRequest("r", MODEL, "/v1/completions", {"model": MODEL, "prompt": text}, {})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeLoad:
    """A policy's load_summary: fixed per-pod figures."""

    rows: list[tuple[Endpoint, int, int, int]]

    def load_summary(self) -> list[tuple[Endpoint, int, int, int]]:
        return self.rows


@dataclass
class Replica:
    cache: PrefixCache
    endpoints: list[Endpoint]
    sync: ReplicaSync
    registry: CollectorRegistry
    load: FakeLoad

    def record(self, request: RouteRequest, url: str) -> RouteState:
        state = RouteState()
        self.cache.prepare(state, request)
        self.cache.record(state, self.ep(url))
        return state

    def ep(self, url: str) -> Endpoint:
        return next(e for e in self.endpoints if e.url == url)

    def holds(self, request: RouteRequest, url: str) -> int:
        keys = self.cache.keys_for(request)
        return self.cache.match(keys, [self.ep(url)]).get(self.ep(url), 0)

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


def replicas_config(url: str, **overrides: object) -> ReplicasConfig:
    cfg = ReplicasConfig(redis_url=url, channel="test", load_interval_s=0.05, load_ttl_s=1.0,
                         backoff_initial_s=0.02, backoff_max_s=0.2, timeout_s=0.5)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


async def new_replica(url: str, clock: Clock | None = None, **overrides: object) -> Replica:
    endpoints = [Endpoint(url=u, model=MODEL) for u in URLS]
    cache = PrefixCache(MODEL, PrefixCacheConfig(index="approximate", block_size=4))
    await cache.start(endpoints)
    registry = CollectorRegistry()
    load = FakeLoad([])
    sync = ReplicaSync(replicas_config(url, **overrides), lambda: {MODEL: cache}, lambda: {MODEL: load},
                       lambda: endpoints, registry, clock=clock or time.monotonic)
    await sync.start()
    return Replica(cache, endpoints, sync, registry, load)


@pytest.fixture
async def pair(redis_server: RedisServer) -> AsyncIterator[tuple[Replica, Replica]]:
    a = await new_replica(redis_server.url)
    b = await new_replica(redis_server.url)
    await eventually(lambda: a.sync.connected and b.sync.connected, what="both replicas connected")
    yield a, b
    await a.sync.close()
    await b.sync.close()


async def test_a_prefix_routed_by_one_replica_is_found_by_the_other(pair) -> None:
    a, b = pair
    req = prompt(1)
    a.record(req, URLS[1])
    started = time.perf_counter()
    await eventually(lambda: b.holds(req, URLS[1]) == 16, within=2.0, what="B to learn A's routing")
    assert time.perf_counter() - started < 0.5  # milliseconds in practice; bounded for a busy CI
    assert b.holds(req, URLS[0]) == 0
    assert a.holds(req, URLS[1]) == 16  # its own message came back and was skipped, not re-applied
    assert b.metric("kvgate_replica_sync_applied_total", kind="blocks") == 1
    assert a.metric("kvgate_replica_sync_applied_total", kind="blocks") == 0
    # A counts its message once Redis acknowledged it, which may be after B already applied it
    await eventually(lambda: a.metric("kvgate_replica_sync_published_total", kind="blocks") == 1)
    assert b.metric("kvgate_replica_sync_delay_seconds_count") == 1


async def test_records_of_one_tick_go_out_as_one_message(pair) -> None:
    a, b = pair
    for i in range(5):
        a.record(prompt(10 + i), URLS[i % 2])
    await eventually(lambda: all(b.holds(prompt(10 + i), URLS[i % 2]) == 16 for i in range(5)))
    await eventually(lambda: a.metric("kvgate_replica_sync_published_total", kind="blocks") >= 1)
    assert a.metric("kvgate_replica_sync_published_total", kind="blocks") == 1
    assert b.metric("kvgate_replica_sync_applied_total", kind="blocks") == 5


async def test_a_failed_attempt_is_taken_back_on_every_replica(pair) -> None:
    a, b = pair
    req = prompt(2)
    state = a.record(req, URLS[0])
    await eventually(lambda: b.holds(req, URLS[0]) == 16)
    a.cache.forget(state, a.ep(URLS[0]))
    await eventually(lambda: b.holds(req, URLS[0]) == 0, what="B to forget what A took back")
    assert a.holds(req, URLS[0]) == 0


async def test_records_for_unknown_pods_or_another_block_size_are_skipped(pair) -> None:
    a, b = pair
    payload = wire.encode_blocks(a.sync.replica_id, [
        wire.BlockRecord(wire.OP_ROUTED, 4, MODEL, "http://elsewhere:1", [1, 2]),
        wire.BlockRecord(wire.OP_ROUTED, 16, MODEL, URLS[0], [1, 2]),
        wire.BlockRecord(wire.OP_ROUTED, 4, "other-model", URLS[0], [1, 2]),
    ])  # fmt: skip
    a.sync._send("blocks", payload)
    await eventually(lambda: b.metric("kvgate_replica_sync_skipped_total", reason="unknown_pod") == 2)
    assert b.metric("kvgate_replica_sync_skipped_total", reason="block_size") == 1
    assert b.cache.index.held(b.ep(URLS[0])) == 0


async def test_peer_load_sums_the_live_summaries_and_expires(redis_server: RedisServer) -> None:
    clock = Clock()
    a = await new_replica(redis_server.url)
    c = await new_replica(redis_server.url)
    b = await new_replica(redis_server.url, clock=clock)
    try:
        a.load.rows = [(a.ep(URLS[0]), 2, 3, 500)]
        c.load.rows = [(c.ep(URLS[0]), 1, 0, 100), (c.ep(URLS[1]), 0, 4, 0)]
        target = b.ep(URLS[0])
        await eventually(lambda: target.peer_load is not None and target.peer_load.prefilling == 3,
                         what="B to sum A's and C's summaries")
        assert (target.peer_load.decoding, target.peer_load.prefill_tokens) == (3, 600)
        assert b.ep(URLS[1]).peer_load.decoding == 4
        assert b.metric("kvgate_replica_sync_peers") == 2
        # A and C stop publishing (gone); B's clock passes the TTL: their work no longer counts
        await a.sync.close()
        await c.sync.close()
        clock.now += 1.0  # exactly the TTL: still counted
        b.sync.refresh_peer_load()
        assert target.peer_load is not None
        clock.now += 0.01
        b.sync.refresh_peer_load()
        assert target.peer_load is None and b.ep(URLS[1]).peer_load is None
        assert b.metric("kvgate_replica_sync_peers") == 0
    finally:
        for r in (a, b, c):
            await r.sync.close()


async def test_without_redis_routing_never_waits_and_sync_starts_when_redis_comes(tmp_path) -> None:
    server = RedisServer(tmp_path, port=free_port())  # not started yet
    a = await new_replica(server.url, queue=4)
    b = await new_replica(server.url)
    try:
        started = time.perf_counter()
        for i in range(50):  # Redis is not there: each record is queued or dropped, at once
            a.record(prompt(100 + i), URLS[0])
            await asyncio.sleep(0)  # one tick each: one message each
        assert time.perf_counter() - started < 0.5
        assert a.holds(prompt(149), URLS[0]) == 16  # local learning goes on
        await eventually(lambda: a.metric("kvgate_replica_sync_dropped_total", reason="queue_full") > 0)
        assert not a.sync.connected and a.metric("kvgate_replica_sync_connected") == 0
        await server.start()
        await eventually(lambda: a.sync.connected and b.sync.connected, within=5.0, what="reconnection")
        assert a.metric("kvgate_replica_sync_connected") == 1
        a.record(prompt(7), URLS[1])
        await eventually(lambda: b.holds(prompt(7), URLS[1]) == 16, what="sync after Redis came")
    finally:
        await a.sync.close()
        await b.sync.close()
        await server.stop()


async def test_sync_resumes_after_redis_restarts_and_a_joiner_replays_the_history(tmp_path) -> None:
    server = await RedisServer(tmp_path).start()
    a = await new_replica(server.url)
    b = await new_replica(server.url)
    try:
        await eventually(lambda: a.sync.connected and b.sync.connected)
        a.record(prompt(1), URLS[0])
        await eventually(lambda: b.holds(prompt(1), URLS[0]) == 16)
        await server.kill()
        a.record(prompt(2), URLS[0])  # while Redis is gone: local only, never an error
        await eventually(lambda: not a.sync.connected and not b.sync.connected, within=5.0)
        assert a.holds(prompt(2), URLS[0]) == 16
        await server.start()  # back, empty
        await eventually(lambda: a.sync.connected and b.sync.connected, within=5.0, what="reconnection")
        a.record(prompt(3), URLS[1])
        await eventually(lambda: b.holds(prompt(3), URLS[1]) == 16, what="sync to resume")
        # a replica joining now replays what the stream kept, before it routes anything
        joiner = await new_replica(server.url)
        try:
            await eventually(lambda: joiner.holds(prompt(3), URLS[1]) == 16, what="the joiner to replay")
        finally:
            await joiner.sync.close()
    finally:
        await a.sync.close()
        await b.sync.close()
        await server.stop()
