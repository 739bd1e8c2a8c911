"""Version-compatible pairing: prefill and decode pods of two versions, and a rolling update under load."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter

import aiohttp
import orjson
from helpers import eventually
from pd_harness import MODEL, PDWorld, PodSpec, long_prompt

from gateway.config import PDSpec
from router.endpoint import Endpoint

PD = PDSpec(threshold_tokens=64, prefill_timeout_s=5.0)


def pairings(world: PDWorld) -> list[tuple[str, str]]:
    """(prefill version, decode version) of every decode step that carried remote-prefill params."""
    pairs = []
    for rec in world.recorders:
        for seen in rec.decodes():
            params = seen.body.get("kv_transfer_params") or {}
            if params.get("do_remote_prefill"):
                pairs.append((world.version_of_engine(params["remote_engine_id"]), rec.version))
    return pairs


def prefill_targets(world: PDWorld) -> dict[str, str]:
    """request id -> version of the prefill pod its prefill step went to."""
    return {s.headers["X-Request-Id"]: rec.version for rec in world.recorders for s in rec.prefills()}


def decode_versions(world: PDWorld) -> dict[str, str]:
    """request id -> version of the decode pod that served it."""
    return {s.headers["X-Request-Id"]: rec.version for rec in world.recorders for s in rec.decodes()}


async def complete(client: aiohttp.ClientSession, world: PDWorld, rid: str, stream: bool = False) -> int:
    """One long-prompt completion; the number of output words the client received."""
    body = {"model": MODEL, "prompt": long_prompt(150, rid), "max_tokens": 3, "stream": stream}
    async with client.post(world.url + "/v1/completions", json=body, headers={"X-Request-Id": rid}) as r:
        assert r.status == 200, await r.text()
        if not stream:
            return len((await r.json())["choices"][0]["text"].split())
        text = await r.text()
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks)
    return len("".join(c["choices"][0]["text"] for c in chunks if c["choices"]).split())


async def test_pods_of_different_versions_are_never_paired(pd_world, client):
    specs = [PodSpec("prefill", v) for v in ("v1", "v2")] + [PodSpec("decode", v) for v in ("v1", "v2")]
    world: PDWorld = await pd_world(specs, pd=PD)
    results = await asyncio.gather(*(complete(client, world, f"r{i}") for i in range(24)))
    assert results == [3] * 24
    pairs = pairings(world)
    assert len(pairs) == 24
    assert all(p == d for p, d in pairs), Counter(pairs)
    assert {d for _, d in pairs} == {"v1", "v2"}  # both decode versions were disaggregated


async def test_a_compatibility_map_pairs_declared_versions_only(pd_world, client):
    specs = [PodSpec("prefill", "v1"), PodSpec("decode", "v2"), PodSpec("decode", "v3")]
    world: PDWorld = await pd_world(specs, pd=PDSpec(threshold_tokens=64, compatibility={"v2": ["v1"]}))
    await asyncio.gather(*(complete(client, world, f"r{i}") for i in range(12)))
    served = Counter(decode_versions(world).values())
    assert served["v2"] > 0 and served["v3"] > 0
    assert Counter(pairings(world)) == Counter({("v1", "v2"): served["v2"]})
    outcomes = world.outcomes()
    assert outcomes["disaggregated"] == served["v2"] and outcomes["local_no_prefill"] == served["v3"]


async def test_no_compatible_prefill_pod_decodes_locally(pd_world, client):
    world: PDWorld = await pd_world([PodSpec("prefill", "v1"), PodSpec("decode", "v2")], pd=PD)
    assert await complete(client, world, "only") == 3
    assert world.recorders[0].generations() == []
    assert world.outcomes()["local_no_prefill"] == 1


class Load:
    """Workers sending long-prompt completions (every third one streamed) until stopped."""

    def __init__(self, client: aiohttp.ClientSession, world: PDWorld, workers: int = 4) -> None:
        self.client = client
        self.world = world
        self.ids = (f"roll-{i}" for i in itertools.count())
        self.done = 0
        self.outputs: list[int] = []
        self.running = True
        self.tasks = [asyncio.create_task(self._worker()) for _ in range(workers)]

    async def _worker(self) -> None:
        while self.running:
            rid = next(self.ids)
            stream = rid.endswith(("0", "3", "6"))
            self.outputs.append(await complete(self.client, self.world, rid, stream=stream))
            self.done += 1

    async def flow(self, n: int) -> None:
        """Let `n` more requests complete (bounded: fails after 20 s)."""
        target = self.done + n
        await eventually(lambda: self.done >= target, what=f"{n} more requests", within=20)

    async def stop(self) -> None:
        self.running = False
        await asyncio.gather(*self.tasks)


async def test_rolling_update_never_pairs_mismatched_versions(pd_world, client):
    # 0,1 prefill v1; 2,3 decode v1; 4,5 prefill v2; 6,7 decode v2. The gateway starts with the v1 pods.
    specs = [PodSpec("prefill", "v1")] * 2 + [PodSpec("decode", "v1")] * 2
    specs += [PodSpec("prefill", "v2")] * 2 + [PodSpec("decode", "v2")] * 2
    world: PDWorld = await pd_world(specs, pd=PD, in_gateway=[0, 1, 2, 3])
    pool = world.pool

    def replace(old: int, fresh: int) -> Endpoint:
        spec = specs[fresh]
        ep = Endpoint(url=world.recorders[fresh].url, model=MODEL, role=spec.role, version=spec.version)  # type: ignore[arg-type]
        gone = world.endpoint(old)
        pool.update_endpoints([ep], [gone])
        return gone

    async def drain_and_stop(gone: Endpoint, i: int) -> None:
        await eventually(lambda: not gone.in_flight, what=f"{gone.url} to drain")
        await world.pod(i).stop()

    load = Load(client, world)
    try:
        await load.flow(10)
        await drain_and_stop(replace(2, 6), 2)  # decode v1 -> v2 first: no v2 prefill pod yet
        await load.flow(16)
        await drain_and_stop(replace(0, 4), 0)  # prefill v1 -> v2
        await load.flow(10)
        await world.pod(1).stop()  # the last v1 prefill pod crashes while still in the pool
        await load.flow(10)
        await drain_and_stop(replace(1, 5), 1)
        await drain_and_stop(replace(3, 7), 3)  # the last v1 decode pod goes
        await load.flow(10)
    finally:
        await load.stop()

    assert load.outputs == [3] * len(load.outputs)  # every client request was answered in full
    pairs = pairings(world)
    assert all(p == d for p, d in pairs), Counter(pairs)
    assert Counter(d for _, d in pairs).keys() == {"v1", "v2"}
    decoded = decode_versions(world)
    for rid, prefill_version in prefill_targets(world).items():  # prefill steps, even those that fell back
        assert decoded[rid] == prefill_version, rid
    outcomes = world.outcomes()
    assert outcomes["local_no_prefill"] > 0  # v2 decode pod while only v1 prefill pods existed
    assert outcomes["disaggregated"] > 0
    assert {ep.url for ep in pool.endpoints} == {r.url for r in world.recorders[4:]}
