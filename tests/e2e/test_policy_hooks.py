"""The proxy's per-attempt timing hooks: `on_first_byte` once per attempt whose 2xx answer started, with
the time since that attempt was sent (`Decision.sent_at`), never for failed or non-2xx attempts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from bench.sim.fleet import SimFleet
from gateway.app import build_app
from gateway.config import EndpointSpec, GatewayConfig, Health, PolicySpec, PoolSpec, Scrape
from gateway.state import STATE
from router.endpoint import Endpoint
from router.policies.round_robin import RoundRobinPolicy
from router.policy import Decision, RouteRequest

MODEL = "sim-model"


class TimingPolicy(RoundRobinPolicy):
    """round_robin that records the timing hooks."""

    def __init__(self) -> None:
        super().__init__(seed=3)
        self.sent: list[tuple[str, str, float, float]] = []  # request id, pod, sent_at, dispatched_at
        self.first_bytes: list[tuple[str, str, float, float]] = []  # request id, pod, sent_at, elapsed
        self.finished: list[tuple[str, str]] = []
        self.idle = asyncio.Event()  # set while every attempt routed has finished

    def pick(self, request: RouteRequest, candidates: Sequence[Endpoint]) -> Decision:
        return super().pick(request, sorted(candidates, key=lambda ep: ep.url))

    def on_routed(self, request: RouteRequest, decision: Decision) -> None:
        self.idle.clear()
        self.sent.append(
            (request.request_id, decision.endpoint.url, decision.sent_at, request.state.dispatched_at)
        )

    def on_first_byte(self, request: RouteRequest, decision: Decision, elapsed_s: float) -> None:
        self.first_bytes.append((request.request_id, decision.endpoint.url, decision.sent_at, elapsed_s))

    def on_finished(self, request: RouteRequest, decision: Decision, ok: bool) -> None:
        self.finished.append((request.request_id, decision.endpoint.url))
        if len(self.finished) == len(self.sent):
            self.idle.set()


async def refusing_pod() -> web.AppRunner:
    """A pod that passes health checks and answers every completion 503 (retryable)."""

    async def health(_: web.Request) -> web.Response:
        return web.Response()

    async def refuse(_: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "busy"}}, status=503)

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/completions", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


async def test_first_byte_hook_times_each_answered_attempt_from_its_send() -> None:
    async with SimFleet(1, model=MODEL, prefill_tps=1e6, itl_ms=1.0, itl_ms_per_seq=0.0) as fleet:
        refusing = await refusing_pod()
        refused, live = f"http://127.0.0.1:{refusing.addresses[0][1]}", fleet.pods[0].url
        pool = PoolSpec(
            model=MODEL,
            endpoints=[EndpointSpec(url=refused), EndpointSpec(url=live)],
            policy=PolicySpec("round_robin"),
        )
        config = GatewayConfig(
            pools=[pool], health=Health(interval=60.0, eject_after=100), scrape=Scrape(interval=0)
        )
        app = build_app(config, registry=CollectorRegistry())
        policy = TimingPolicy()
        app[STATE].pools.get(MODEL).policy = policy
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/completions"
        try:
            async with aiohttp.ClientSession() as http:
                for i in range(4):
                    body = {"model": MODEL, "prompt": f"hello {i}", "max_tokens": 3, "stream": True}
                    before = time.perf_counter()
                    async with http.post(url, json=body, headers={"X-Request-Id": f"r{i}"}) as r:
                        assert r.status == 200
                        await r.read()
                    took = time.perf_counter() - before
                    rid, pod, sent_at, elapsed = policy.first_bytes[-1]
                    assert (rid, pod) == (f"r{i}", live)
                    assert before < sent_at and 0 < elapsed < took
                bad = {"model": MODEL, "prompt": [10**9], "max_tokens": 3}  # out of vocabulary: a 400
                async with http.post(url, json=bad, headers={"X-Request-Id": "bad"}) as r:
                    assert r.status == 400
            await asyncio.wait_for(policy.idle.wait(), 5.0)  # every attempt ended
        finally:
            await runner.cleanup()
            await refusing.cleanup()
    assert [(rid, pod) for rid, pod, _, _ in policy.first_bytes] == [(f"r{i}", live) for i in range(4)]
    assert any(pod == refused for _, pod, _, _ in policy.sent), (
        "no attempt hit the refusing pod: proves nothing"
    )
    assert any(rid == "bad" and pod == live for rid, pod, _, _ in policy.sent)
    first_sent: dict[str, float] = {}
    for rid, _, sent_at, dispatched_at in policy.sent:  # dispatched_at: the request's first attempt
        first_sent.setdefault(rid, sent_at)
        assert dispatched_at == first_sent[rid] <= sent_at
