"""Prefill/decode disaggregation with NixlConnector-shaped kv_transfer_params."""

from __future__ import annotations

import time

import aiohttp
from helpers import eventually
from sim_helpers import FAST, metric, post, scrape

from bench.sim.fleet import SimFleet

PROMPT = " ".join(f"pd{i}" for i in range(1000))  # 1000 tokens
PREFILL_REQUEST = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                   "remote_block_ids": None, "remote_host": None, "remote_port": None}


async def test_prefill_then_decode(http: aiohttp.ClientSession) -> None:
    # Prefill at 5k tokens/s: 200 ms for this prompt, which the decode pod must not pay again.
    cfg = {**FAST, "prefill_tps": 5000.0, "itl_ms": 2.0, "kv_transfer_tps": 1e6}
    async with SimFleet(2, **cfg, per_pod=[{"role": "prefill"}, {"role": "decode"}]) as fleet:
        prefill, decode = fleet.pods
        status, body = await post(
            http, prefill.url + "/v1/completions",
            {"prompt": PROMPT, "max_tokens": 1, "stream": False, "kv_transfer_params": PREFILL_REQUEST},
            **{"X-Request-Id": "pd-1"},
        )
        assert status == 200 and body["usage"]["completion_tokens"] == 1
        params = body["kv_transfer_params"]
        assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
        assert params["remote_engine_id"] == prefill.engine_id
        assert params["remote_host"] == "127.0.0.1" and params["remote_port"] == prefill.port
        (block_ids,) = params["remote_block_ids"]
        assert len(block_ids) == -(-1001 // 16)  # the prompt and the sampled token
        assert params["tp_size"] == 1 and params["remote_request_id"]
        # the prefill pod holds the blocks for the decode pod
        assert metric(await scrape(http, prefill.url), "vllm:kv_cache_usage_perc") > 0

        start = time.perf_counter()
        status, out = await post(http, decode.url + "/v1/completions",
                                 {"prompt": PROMPT, "max_tokens": 5, "kv_transfer_params": params},
                                 **{"X-Request-Id": "pd-1"})
        elapsed = time.perf_counter() - start
        assert status == 200 and out["usage"]["completion_tokens"] == 5
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 999  # all but the last token
        assert out["kv_transfer_params"] is None
        assert elapsed < 0.5 * (1000 / 5000)  # no local prefill of the transferred tokens
        samples = await scrape(http, decode.url)
        assert metric(samples, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer") == 999
        assert metric(samples, "vllm:prompt_tokens_by_source_total", source="local_compute") == 1

        async def released() -> bool:
            return metric(await scrape(http, prefill.url), "vllm:kv_cache_usage_perc") == 0.0

        # the decode pod told the prefill pod it read the blocks
        await eventually(released, within=3.0, what="the prefill pod to release the blocks")


async def test_held_blocks_expire_without_a_decode(http: aiohttp.ClientSession) -> None:
    async with SimFleet(1, **FAST, role="prefill", kv_hold_s=0.2) as fleet:
        url = fleet.urls[0]
        _, body = await post(http, url + "/v1/completions",
                             {"prompt": "a b c", "max_tokens": 1, "kv_transfer_params": PREFILL_REQUEST})
        assert body["kv_transfer_params"]["remote_block_ids"] == [[1]]
        assert metric(await scrape(http, url), "vllm:kv_cache_usage_perc") > 0

        async def expired() -> bool:
            return metric(await scrape(http, url), "vllm:kv_cache_usage_perc") == 0.0

        await eventually(expired, within=3.0, what="the held blocks to expire")


async def test_plain_pod_ignores_transfer_params(http: aiohttp.ClientSession) -> None:
    async with SimFleet(1, **FAST) as fleet:
        _, body = await post(http, fleet.urls[0] + "/v1/completions",
                             {"prompt": "a b c", "max_tokens": 1, "kv_transfer_params": PREFILL_REQUEST})
        assert body["kv_transfer_params"] is None
        assert metric(await scrape(http, fleet.urls[0]), "vllm:kv_cache_usage_perc") == 0.0


async def test_decode_params_are_validated(http: aiohttp.ClientSession) -> None:
    async with SimFleet(1, **FAST, role="decode") as fleet:
        status, body = await post(http, fleet.urls[0] + "/v1/completions", {
            "prompt": "a b", "max_tokens": 1, "kv_transfer_params": {"do_remote_prefill": True}})
        assert status == 400 and body["error"]["param"] == "kv_transfer_params"
