"""Kubernetes discovery end to end: the gateway with a `discovery: kubernetes` pool, the real
kubernetes_asyncio client reading a kubeconfig that points at the fake API server
(tests/support/fake_kube_api.py), and simulated vLLM pods (bench/sim) as the pods' containers.

A pod that turns Ready gets traffic; one that turns NotReady, starts terminating or is deleted stops
getting it; a dropped watch and a 410 relist leave the pool (its Endpoint objects and their
prefix-index state) intact, and every request sent meanwhile is answered 200.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web
from fake_kube_api import FakeKubeApi
from helpers import eventually, free_port
from prometheus_client import CollectorRegistry

from bench.sim.fleet import SimFleet
from gateway.app import build_app
from gateway.config import GatewayConfig, Health, PolicySpec, PoolSpec, Scrape
from gateway.state import STATE
from router.discovery.config import KubernetesDiscovery
from router.endpoint import Endpoint
from router.policy import RouteRequest

MODEL = "sim-model"
FAST: dict[str, Any] = {"model": MODEL, "prefill_tps": 1e6, "itl_ms": 1.0, "itl_ms_per_seq": 0.0}
WORDS = [f"w{i}" for i in range(400)]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


def text(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def probe(prompt: str) -> RouteRequest:
    return RouteRequest("probe", MODEL, "/v1/completions", {"model": MODEL, "prompt": prompt}, {})


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


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

    async def stop(self) -> None:
        await self.runner.cleanup()

    @property
    def endpoints(self) -> list[Endpoint]:
        return list(self.app[STATE].pools.by_model[MODEL].endpoints)

    def urls(self) -> set[str]:
        return {ep.url for ep in self.endpoints}

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, {"pool": MODEL, **labels}) or 0.0


@pytest.fixture
async def api() -> AsyncIterator[FakeKubeApi]:
    server = await FakeKubeApi(namespace="llm").start()
    yield server
    await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


def pool_spec(api: FakeKubeApi, tmp_path: Path, policy: PolicySpec) -> PoolSpec:
    kube = KubernetesDiscovery(
        label_selector="app=vllm", port_name="http", kubeconfig=str(api.write_kubeconfig(tmp_path / "kc")),
        backoff_initial_s=0.02, backoff_max_s=0.1,
    )  # fmt: skip
    return PoolSpec(model=MODEL, policy=policy, discovery="kubernetes", kubernetes=kube)


def add_pods(api: FakeKubeApi, fleet: SimFleet, ready: list[bool]) -> None:
    for i, (pod, is_ready) in enumerate(zip(fleet.pods, ready, strict=True)):
        api.add_pod(f"vllm-{i}", labels={"app": "vllm"}, ports={"http": port_of(pod.url)}, ready=is_ready)


async def complete(http: aiohttp.ClientSession, gw: Gateway, prompt: str = "hello") -> tuple[int, str, int]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0}
    async with http.post(f"{gw.url}/v1/completions", json=body) as resp:
        await resp.read()
        return resp.status, resp.headers.get("x-kvgate-endpoint", ""), int(
            resp.headers.get("x-kvgate-cached-tokens", "0")
        )


async def served_by(http: aiohttp.ClientSession, gw: Gateway, n: int) -> set[str]:
    urls = set()
    for _ in range(n):
        status, url, _ = await complete(http, gw)
        assert status == 200
        urls.add(url)
    return urls


async def test_pods_get_traffic_once_ready_and_none_once_not_ready_terminating_or_deleted(
    api: FakeKubeApi, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with SimFleet(3, **FAST) as fleet:
        add_pods(api, fleet, [True, True, False])
        cfg = GatewayConfig(pools=[pool_spec(api, tmp_path, PolicySpec("round_robin"))],
                            health=Health(interval=5.0), scrape=Scrape(interval=0))  # fmt: skip
        gw = await Gateway(cfg).start()
        p0, p1, p2 = fleet.urls
        try:
            assert gw.urls() == {p0, p1}  # the first list is in before the gateway serves
            assert await served_by(http, gw, 6) == {p0, p1}
            assert gw.metric("kvgate_discovery_endpoints") == 2

            api.set_ready("vllm-2", True)
            await eventually(lambda: p2 in gw.urls(), within=5, what="vllm-2 to join")
            assert await served_by(http, gw, 6) == {p0, p1, p2}

            api.set_ready("vllm-0", False)
            await eventually(lambda: p0 not in gw.urls(), within=5, what="vllm-0 to leave")
            assert await served_by(http, gw, 6) == {p1, p2}

            api.terminate("vllm-1")  # Ready still, but terminating: no new requests
            await eventually(lambda: p1 not in gw.urls(), within=5, what="vllm-1 to leave")
            assert await served_by(http, gw, 4) == {p2}

            api.delete_pod("vllm-2")
            await eventually(lambda: not gw.urls(), within=5, what="the pool to empty")
            status, _, _ = await complete(http, gw)
            assert status == 503  # no pod serves the model now: OpenAI-shaped 503, not a hang
            async with http.get(f"{gw.url}/ready") as resp:
                assert resp.status == 503

            api.set_ready("vllm-0", True)
            await eventually(lambda: gw.urls() == {p0}, within=5, what="vllm-0 to come back")
            assert await served_by(http, gw, 2) == {p0}
            async with http.get(f"{gw.url}/metrics") as resp:
                metrics = await resp.text()
            assert f'kvgate_discovery_endpoints{{pool="{MODEL}"}} 1.0' in metrics
            removed = f'kvgate_discovery_endpoint_changes_total{{change="removed",pool="{MODEL}"}} 3.0'
            assert removed in metrics
        finally:
            await gw.stop()


async def test_a_dropped_watch_and_a_410_relist_keep_the_pool_and_its_index_and_every_request_answers(
    api: FakeKubeApi, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with SimFleet(3, **FAST) as fleet:
        add_pods(api, fleet, [True, True, True])
        policy = PolicySpec("cache_aware", {"index": "approximate", "seed": 7})
        cfg = GatewayConfig(pools=[pool_spec(api, tmp_path, policy)], health=Health(interval=5.0),
                            scrape=Scrape(interval=0), seed=7)  # fmt: skip
        gw = await Gateway(cfg).start()
        try:
            await eventually(lambda: api.open_watches == 1, within=5, what="the watch")
            held = gw.endpoints
            homes = {}
            for group in range(6):  # each prefix learned on the pod that prefilled it
                status, url, _ = await complete(http, gw, text(group, 160) + " " + text(100 + group, 10))
                assert status == 200
                homes[group] = url

            statuses: list[int] = []
            stop = asyncio.Event()

            async def load(worker: int) -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    prompt = text(worker % 6, 160) + " " + text(1000 * worker + i, 10)
                    statuses.append((await complete(http, gw, prompt))[0])

            workers = [asyncio.create_task(load(w)) for w in range(4)]
            try:
                # 1. the watch drops, and the API server is unreachable for a while
                api.pause()
                api.drop_watches()
                await eventually(lambda: api.held == 1, within=5, what="the reconnect to wait")
                n = len(statuses)
                await eventually(lambda: len(statuses) >= n + 20, within=10, what="traffic during the outage")
                api.resume()
                await eventually(lambda: api.open_watches == 1, within=5, what="the resumed watch")
                # 2. while disconnected again, history is compacted past the watcher: 410, relist
                api.pause()
                api.drop_watches()
                await eventually(lambda: api.held == 1, within=5, what="the reconnect to wait")
                for i in range(3):
                    api.add_pod(f"redis-{i}", labels={"app": "redis"})  # the cluster moves on
                api.compact()
                api.resume()
                await eventually(lambda: len(api.list_requests()) == 2 and api.open_watches == 1, within=5,
                                 what="the relist and a new watch")  # fmt: skip
                n = len(statuses)
                await eventually(lambda: len(statuses) >= n + 20, within=10, what="traffic after the relist")
            finally:
                stop.set()
                await asyncio.gather(*workers)

            assert len(statuses) >= 40 and set(statuses) == {200}  # every request during the blips
            assert gw.endpoints == held and all(a is b for a, b in zip(gw.endpoints, held, strict=True))
            assert gw.metric("kvgate_discovery_watch_restarts_total", reason="relist") == 1
            assert gw.metric("kvgate_discovery_watch_restarts_total", reason="error") == 2
            assert gw.metric("kvgate_discovery_endpoint_changes_total", change="removed") == 0
            for group, home in homes.items():  # the index still knows where each prefix lives
                status, url, cached = await complete(http, gw, text(group, 160) + " " + text(7, 10))
                assert (status, url) == (200, home) and cached >= 160
        finally:
            await gw.stop()


async def test_precise_index_follows_discovered_pods_kv_events_from_their_annotations(
    api: FakeKubeApi, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    ports = [(free_port(), free_port()) for _ in range(3)]
    per_pod = [{"kv_events_endpoint": f"tcp://*:{pub}", "kv_events_replay_endpoint": f"tcp://*:{replay}"}
               for pub, replay in ports]  # each pod binds its own, as vLLM does  # fmt: skip
    async with SimFleet(3, per_pod=per_pod, **FAST) as fleet:
        for i, (pod, (pub, replay)) in enumerate(zip(fleet.pods, ports, strict=True)):
            api.add_pod(f"vllm-{i}", labels={"app": "vllm"}, ports={"http": port_of(pod.url)}, ready=i < 2,
                        annotations={"kvgate.io/kv-events": f"tcp://*:{pub}",
                                     "kvgate.io/kv-events-replay": f"tcp://*:{replay}"})  # fmt: skip
        policy = PolicySpec("cache_aware", {"index": "precise", "pending_blocks": 0, "seed": 7})
        cfg = GatewayConfig(pools=[pool_spec(api, tmp_path, policy)], health=Health(interval=5.0),
                            scrape=Scrape(interval=0), seed=7)  # fmt: skip
        gw = await Gateway(cfg).start()
        pool = gw.app[STATE].pools.by_model[MODEL]
        cache = pool.prefix_cache
        assert cache is not None
        try:
            p2 = fleet.urls[2]
            assert {ep.kv_events for ep in gw.endpoints} == {f"tcp://127.0.0.1:{ports[i][0]}" for i in (0, 1)}
            prefix = text(3, 160)
            status, home, _ = await complete(http, gw, prefix)
            assert status == 200
            home_ep = next(ep for ep in gw.endpoints if ep.url == home)
            keys = cache.keys_for(probe(prefix))
            await eventually(lambda: cache.match(keys, [home_ep]).get(home_ep, 0) > 0, within=10,
                             what="the home pod's BlockStored events in the index")  # fmt: skip
            for i in range(3):  # the index alone (pending_blocks 0) sends followers to the home pod
                status, url, cached = await complete(http, gw, prefix + f" tail{i}")
                assert (status, url, cached) == (200, home, 160)

            api.set_ready("vllm-2", True)  # a new pod: subscribed once it joins
            await eventually(lambda: p2 in gw.urls() and any(ep.url == p2 for ep in cache.trackers),
                             within=5, what="vllm-2 to join and be followed")  # fmt: skip
            trackers = dict(cache.trackers)
            api.pause()  # a 410 relist: the pods that stay keep their trackers and indexed blocks
            api.drop_watches()
            await eventually(lambda: api.held == 1, within=5, what="the reconnect to wait")
            api.add_pod("redis-0", labels={"app": "redis"})
            api.compact()
            api.resume()
            await eventually(lambda: len(api.list_requests()) == 2 and api.open_watches == 1, within=5,
                             what="the relist")  # fmt: skip
            assert dict(cache.trackers) == trackers
            assert all(cache.trackers[ep] is t for ep, t in trackers.items())
            assert cache.match(keys, [home_ep]).get(home_ep, 0) > 0

            api.delete_pod(f"vllm-{fleet.urls.index(home)}")  # the home goes: its blocks leave the index
            await eventually(lambda: home not in gw.urls(), within=5, what="the home pod to leave")
            assert home_ep not in cache.trackers and not cache.match(keys, [home_ep]).get(home_ep)
            status, url, cached = await complete(http, gw, prefix + " after")
            assert status == 200 and url != home and cached == 0
        finally:
            await gw.stop()


@pytest.mark.timeout(90)
async def test_kvgate_serve_discovers_pods_through_a_kubeconfig(
    api: FakeKubeApi, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with SimFleet(2, **FAST) as fleet:
        add_pods(api, fleet, [True, False])
        config = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "health": {"interval": 5.0},
            "scrape": {"interval": 0},
            "pools": {MODEL: {"policy": {"name": "round_robin"}, "discovery": "kubernetes", "kubernetes": {
                "label_selector": "app=vllm", "port_name": "http", "backoff_initial_s": 0.05,
                "kubeconfig": str(api.write_kubeconfig(tmp_path / "kubeconfig")),
            }}},
        }  # fmt: skip
        (tmp_path / "kvgate.yaml").write_text(yaml.safe_dump(config))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "serve", "--config", str(tmp_path / "kvgate.yaml"),
            "--log-level", "WARNING", stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line.startswith(b"KVGATE_SERVE_READY "), line
            url = orjson.loads(line.split(b" ", 1)[1])["url"]
            body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}

            async def served() -> set[str]:
                urls = set()
                for _ in range(4):
                    async with http.post(f"{url}/v1/completions", json=body) as resp:
                        assert resp.status == 200
                        urls.add(resp.headers["x-kvgate-endpoint"])
                return urls

            assert await served() == {fleet.urls[0]}
            api.set_ready("vllm-1", True)

            async def both() -> bool:
                return await served() == set(fleet.urls)

            await eventually(both, within=10, what="vllm-1 to get traffic")
            async with http.get(f"{url}/metrics") as resp:
                assert f'kvgate_discovery_endpoints{{pool="{MODEL}"}} 2.0' in await resp.text()
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 15) == 0
