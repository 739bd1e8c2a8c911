"""Precise mode against a REAL vLLM (CPU build): the gateway learns the pod's blocks from its KV events
and routes a repeated long prompt there, with the predicted cached prefix in `x-kvgate-cached-tokens`.

Pool: the real pod (KV events + replay) and one simulated pod serving the same model and tokenizer
(no events), behind the real gateway, `cache_aware` with `index: precise`. Prompts are sent to vLLM
directly first, so the only way the gateway can know where they are cached is the pod's KV events.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers import eventually
from prometheus_client import CollectorRegistry

from bench.sim.fleet import SimFleet
from gateway.app import build_app
from gateway.config import EndpointSpec, GatewayConfig, Health, PolicySpec, PoolSpec, Scrape
from gateway.state import STATE
from router.policy import RouteRequest
from router.prefix_cache import PrefixCache

pytestmark = pytest.mark.vllm
WORDS = ["alpha", "beta", "gamma", "delta", "system", "import", "cache", "return", "block", "value"]


def long_text(tag: str, n: int = 120) -> str:
    return tag + " " + " ".join(f"{WORDS[i % len(WORDS)]}{i % 13}" for i in range(n))


class Setup:
    def __init__(self, app: web.Application, url: str, real_url: str) -> None:
        self.app, self.url, self.real_url = app, url, real_url
        (self.pool,) = list(app[STATE].pools)
        assert self.pool.prefix_cache is not None
        self.cache: PrefixCache = self.pool.prefix_cache
        self.real = next(ep for ep in self.pool.endpoints if ep.url == real_url)
        self.sim = next(ep for ep in self.pool.endpoints if ep.url != real_url)

    def matched(self, path: str, body: dict[str, Any]) -> dict:
        probe = RouteRequest("probe", body["model"], path, body, {})
        return self.cache.match(self.cache.keys_for(probe), self.pool.endpoints)


@pytest.fixture
async def setup(real_vllm) -> AsyncIterator[Setup]:
    sim_options = {"prefill_tps": 1e6, "itl_ms": 1.0, "itl_ms_per_seq": 0.0}
    async with SimFleet(
        1, model=real_vllm.model, tokenizer=str(real_vllm.model_dir), block_size=real_vllm.block_size,
        max_model_len=real_vllm.max_model_len, **sim_options,
    ) as fleet:
        pool = PoolSpec(
            model=real_vllm.model,
            tokenizer=str(real_vllm.model_dir),
            block_size=real_vllm.block_size,
            endpoints=[
                EndpointSpec(url=real_vllm.url, kv_events=real_vllm.kv_events,
                             kv_events_replay=real_vllm.kv_events_replay),
                EndpointSpec(url=fleet.urls[0]),
            ],
            policy=PolicySpec("cache_aware", {"index": "precise", "pending_blocks": 0,
                                              "resync_interval": 0.5, "seed": 5}),
        )
        config = GatewayConfig(pools=[pool], health=Health(interval=5.0), scrape=Scrape(interval=0.5))
        app = build_app(config, registry=CollectorRegistry())
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            yield Setup(app, f"http://127.0.0.1:{runner.addresses[0][1]}", real_vllm.url)
        finally:
            await runner.cleanup()


async def post(http: aiohttp.ClientSession, url: str, path: str, body: dict) -> tuple[dict, Any]:
    async with http.post(url + path, json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json(), resp.headers


@pytest.mark.parametrize("kind", ["completion", "chat"])
async def test_precise_mode_routes_a_repeated_prompt_to_the_real_pod_holding_it(setup: Setup, kind) -> None:
    tag = f"kvgate{uuid.uuid4().hex[:8]}"
    if kind == "completion":
        path = "/v1/completions"

        def body(suffix: str) -> dict:
            return {"model": setup.real.model, "prompt": long_text(tag) + suffix, "max_tokens": 1}
    else:
        path = "/v1/chat/completions"

        def body(suffix: str) -> dict:
            messages = [{"role": "system", "content": long_text(tag)}, {"role": "user", "content": suffix}]
            return {"model": setup.real.model, "messages": messages, "max_tokens": 1}

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        first, _ = await post(http, setup.real_url, path, body(" first question"))  # straight to vLLM
        blocks = first["usage"]["prompt_tokens"] // setup.cache.block_size
        assert blocks >= 4
        await eventually(lambda: setup.matched(path, body(" first question")).get(setup.real) == blocks,
                         within=20.0, what="the real pod's blocks in the index")
        assert setup.sim not in setup.matched(path, body(" first question"))
        for i in range(3):
            data, headers = await post(http, setup.url, path, body(f" question number {i}"))
            assert headers["x-kvgate-endpoint"] == setup.real_url
            cached = int(headers["x-kvgate-cached-tokens"])
            assert cached >= (blocks - 1) * setup.cache.block_size
            details = data["usage"].get("prompt_tokens_details") or {}
            if "cached_tokens" in details:  # the engine confirms the prediction
                assert details["cached_tokens"] >= cached
