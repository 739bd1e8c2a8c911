"""KV events over real ZMQ sockets: vLLM's frames and batches, eviction, replay, reset, fleet topics."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import aiohttp
import msgpack
import zmq
import zmq.asyncio
from helpers import eventually
from sim_helpers import FAST, Subscriber, post

from bench.sim.fleet import SimFleet

BS = 16
STORED_KEYS = ["type", "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
               "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind"]


def words(n: int, tag: str) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def events_of(batches: list[tuple[bytes, int, list[Any]]]) -> list[dict[str, Any]]:
    return [e for _, _, (_, events, _) in batches for e in events]


async def settle(sub: Subscriber) -> None:
    await sub.drain(0.2)  # let the pods' PUB sockets finish connecting


async def test_prompt_blocks_in_one_stored_event(http: aiohttp.ClientSession, subscriber: Subscriber) -> None:
    async with SimFleet(1, **FAST, kv_events_endpoint=subscriber.endpoint, kv_events_topic="kv") as fleet:
        url = fleet.urls[0]
        await settle(subscriber)
        prompt = words(70, "a")  # 4 full blocks + 6 tokens
        await post(http, url + "/v1/completions", {"prompt": prompt, "max_tokens": 1})
        topic, seq, payload = await subscriber.recv()
        assert topic == b"kv" and seq == 0
        ts, events, dp_rank = payload
        assert isinstance(ts, float) and dp_rank == 0
        (stored,) = events
        assert list(stored) == STORED_KEYS
        assert stored["type"] == "BlockStored" and stored["parent_block_hash"] is None
        assert len(stored["block_hashes"]) == 4 and stored["block_size"] == BS
        assert all(isinstance(h, int) and 0 <= h < 2**64 for h in stored["block_hashes"])
        _, tok = await post(http, url + "/tokenize", {"prompt": prompt})
        assert stored["token_ids"] == tok["tokens"][: 4 * BS]
        assert stored["medium"] == "GPU" and stored["group_idx"] == 0
        assert stored["kv_cache_spec_kind"] == "full_attention" and stored["extra_keys"] == [None] * 4
        # the same prompt again is a cache hit: nothing is published
        await post(http, url + "/v1/completions", {"prompt": prompt, "max_tokens": 1})
        assert await subscriber.drain(0.2) == []
        # an extension stores only its new blocks, chained to the last cached one
        await post(http, url + "/v1/completions", {"prompt": prompt + " " + words(30, "b"), "max_tokens": 1})
        (_, seq2, (_, (ext,), _)), = await subscriber.drain(0.2)
        assert seq2 == 1
        assert ext["parent_block_hash"] == stored["block_hashes"][-1]
        assert len(ext["block_hashes"]) == 2  # tokens 64..95 of 100


async def test_decode_fills_blocks_one_at_a_time(http: aiohttp.ClientSession, subscriber: Subscriber) -> None:
    async with SimFleet(1, **FAST, kv_events_endpoint=subscriber.endpoint) as fleet:
        await settle(subscriber)
        await post(http, fleet.urls[0] + "/v1/completions", {"prompt": words(40, "d"), "max_tokens": 60})
        batches = await subscriber.drain(0.3)
    stored = events_of(batches)
    assert [len(e["block_hashes"]) for e in stored] == [2, 1, 1, 1, 1]  # 100 tokens: 6 full blocks
    assert [seq for _, seq, _ in batches] == list(range(len(batches)))
    for prev, nxt in itertools.pairwise(stored):
        assert nxt["parent_block_hash"] == prev["block_hashes"][-1]


async def test_cache_salt_changes_every_hash(http: aiohttp.ClientSession, subscriber: Subscriber) -> None:
    async with SimFleet(1, **FAST, kv_events_endpoint=subscriber.endpoint) as fleet:
        await settle(subscriber)
        body = {"prompt": words(40, "s"), "max_tokens": 1}
        await post(http, fleet.urls[0] + "/v1/completions", body)
        await post(http, fleet.urls[0] + "/v1/completions", {**body, "cache_salt": "tenant-a"})
        plain, salted = events_of(await subscriber.drain(0.3))
    assert salted["token_ids"] == plain["token_ids"]
    assert not set(salted["block_hashes"]) & set(plain["block_hashes"])
    assert salted["extra_keys"] == [["tenant-a"], None]


async def test_eviction_publishes_removals_with_the_store(
    http: aiohttp.ClientSession, subscriber: Subscriber
) -> None:
    # 9 blocks (8 usable) of 16 tokens: a 4-block prompt, then two more push it out.
    async with SimFleet(1, **FAST, num_gpu_blocks=9, kv_events_endpoint=subscriber.endpoint) as fleet:
        url = fleet.urls[0] + "/v1/completions"
        await settle(subscriber)
        await post(http, url, {"prompt": words(65, "x"), "max_tokens": 1})  # 4 full + 1 partial block
        await post(http, url, {"prompt": words(48, "y"), "max_tokens": 1})  # 3 full + 1 (null-hash) block
        await post(http, url, {"prompt": words(48, "z"), "max_tokens": 1})
        batches = await subscriber.drain(0.3)
    first, second, third = (events for _, _, (_, events, _) in batches)
    assert [e["type"] for e in first] == ["BlockStored"] and [e["type"] for e in second] == ["BlockStored"]
    *removed, stored = third
    assert stored["type"] == "BlockStored" and len(stored["block_hashes"]) == 3
    assert removed and all(e["type"] == "BlockRemoved" and list(e) == ["type", "block_hashes", "medium",
                                                                        "group_idx"] for e in removed)
    gone = [e["block_hashes"][0] for e in removed]
    # least recently freed first, a request's tail block before its head
    assert gone == list(reversed(first[0]["block_hashes"]))[: len(gone)]


async def test_reset_prefix_cache(http: aiohttp.ClientSession, subscriber: Subscriber) -> None:
    async with SimFleet(1, **FAST, kv_events_endpoint=subscriber.endpoint) as fleet:
        url = fleet.urls[0]
        await settle(subscriber)
        body = {"prompt": words(40, "r"), "max_tokens": 1}
        await post(http, url + "/v1/completions", body)
        stored = events_of(await subscriber.drain(0.2))
        status, reply = await post(http, url + "/reset_prefix_cache", {})
        assert status == 200 and reply == {"success": True}
        assert await subscriber.drain(0.2) == []  # published with the next step, as vLLM does
        _, again = await post(http, url + "/v1/completions", body)
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        cleared, restored = events_of(await subscriber.drain(0.2))
        assert cleared == {"type": "AllBlocksCleared"}
        assert restored["block_hashes"] == stored[0]["block_hashes"]  # same seed, same hashes
        # while a request holds blocks, the reset fails
        engine = fleet.pods[0].engine
        assert engine is not None
        task = asyncio.create_task(post(http, url + "/v1/completions", {"prompt": "long", "max_tokens": 300}))
        await eventually(lambda: bool(engine.running), what="the request to hold blocks")
        assert (await post(http, url + "/reset_prefix_cache", {}))[1] == {"success": False}
        await task


async def test_replay_from_a_sequence_number(http: aiohttp.ClientSession, subscriber: Subscriber) -> None:
    ctx = zmq.asyncio.Context.instance()
    async with SimFleet(1, **FAST, kv_events_endpoint=subscriber.endpoint, kv_events_topic="t",
                        kv_events_replay_endpoint="tcp://127.0.0.1:*") as fleet:
        pod = fleet.pods[0]
        replay = pod.ready_info()["kv_events_replay"]
        assert replay and replay.startswith("tcp://127.0.0.1:")
        await settle(subscriber)
        for i in range(4):
            await post(http, pod.url + "/v1/completions", {"prompt": words(20, f"q{i}"), "max_tokens": 1})
        live = await subscriber.drain(0.2)
        assert [seq for _, seq, _ in live] == [0, 1, 2, 3]
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(replay)
        try:
            await dealer.send_multipart([b"", (2).to_bytes(8, "big")])
            got = []
            while True:
                assert await dealer.poll(3000)
                frames = await dealer.recv_multipart()
                assert len(frames) == 4 and frames[0] == b""
                if frames[2] == (-1).to_bytes(8, "big", signed=True):
                    assert frames[1] == b"" and frames[3] == b""
                    break
                assert frames[1] == b"t"
                got.append((int.from_bytes(frames[2], "big"), msgpack.unpackb(frames[3])))
            assert [seq for seq, _ in got] == [2, 3]
            assert [p for _, p in got] == [p for _, seq, p in live if seq >= 2]
            await dealer.send_multipart([b"", (99).to_bytes(8, "big")])  # past the end: only the marker
            frames = await dealer.recv_multipart()
            assert frames[2] == (-1).to_bytes(8, "big", signed=True)
        finally:
            dealer.close(linger=0)


async def test_bind_mode_and_fleet_topics(http: aiohttp.ClientSession, subscriber: Subscriber) -> None:
    # Two pods connect to one subscriber and are told apart by topic.
    async with SimFleet(2, **FAST, kv_events_endpoint=subscriber.endpoint) as fleet:
        await settle(subscriber)
        for url in fleet.urls:
            await post(http, url + "/v1/completions", {"prompt": words(20, "f"), "max_tokens": 1})
        topics = {t for t, _, _ in await subscriber.drain(0.3)}
        assert topics == {f"kv@{u.removeprefix('http://')}@sim-model".encode() for u in fleet.urls}
    # A pod binding its own port ('*' in the endpoint) reports where it listens.
    async with SimFleet(1, **FAST, kv_events_endpoint="tcp://127.0.0.1:*") as fleet:
        endpoint = fleet.pods[0].ready_info()["kv_events"]
        assert endpoint.startswith("tcp://127.0.0.1:") and not endpoint.endswith("*")
        sub = zmq.asyncio.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(endpoint)
        try:
            await asyncio.sleep(0.2)
            await post(http, fleet.urls[0] + "/v1/completions", {"prompt": words(20, "g"), "max_tokens": 1})
            assert await sub.poll(3000)
            topic, seq, _ = await sub.recv_multipart()
            assert topic.startswith(b"kv@127.0.0.1:") and int.from_bytes(seq, "big") == 0
        finally:
            sub.close(linger=0)


async def test_without_prefix_caching(http: aiohttp.ClientSession, subscriber: Subscriber) -> None:
    async with SimFleet(1, **FAST, enable_prefix_caching=False,
                        kv_events_endpoint=subscriber.endpoint) as fleet:
        await settle(subscriber)
        body = {"prompt": words(40, "n"), "max_tokens": 1}
        for _ in range(2):
            _, out = await post(http, fleet.urls[0] + "/v1/completions", body)
            assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert await subscriber.drain(0.2) == []
