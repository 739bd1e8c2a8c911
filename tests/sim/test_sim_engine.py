"""The engine model over HTTP: prefix reuse changes TTFT per the cost model, queueing, preemption,
chunked prefill, and the KV cache's accounting."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from helpers import eventually
from sim_helpers import FAST, metric, post, scrape

from bench.sim.fleet import SimFleet

PROMPT_4000 = " ".join(f"t{i}" for i in range(4000))


async def ttft(http: aiohttp.ClientSession, url: str, prompt: str) -> float:
    """Seconds from sending a streamed request to its first content chunk."""
    start = time.perf_counter()
    async with http.post(url + "/v1/completions",
                         json={"prompt": prompt, "max_tokens": 2, "stream": True}) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if line.startswith(b"data: {"):
                first = time.perf_counter() - start
                break
        await resp.read()
    return first


async def test_cached_prefix_cuts_ttft_per_cost_model(http: aiohttp.ClientSession) -> None:
    # 4000 tokens at 10k tokens/s: 400 ms of prefill + a 5 ms step; cached, 3984 tokens hit (full
    # blocks of the first 3999) and 16 are computed: 1.6 ms + 5 ms. Model ratio: ~61.
    cfg = {**FAST, "prefill_tps": 10000.0, "itl_ms": 5.0}
    async with SimFleet(1, **cfg) as fleet:
        url = fleet.urls[0]
        cold = await ttft(http, url, PROMPT_4000)
        warm = await ttft(http, url, PROMPT_4000)
    model_cold, model_warm = 4000 / 10000 + 0.005, 16 / 10000 + 0.005
    assert 0.9 * model_cold <= cold <= 2.0 * model_cold
    # HTTP, tokenizing and a shared CPU weigh on the short one: demand a twelfth of the model's ratio.
    assert cold / warm >= (model_cold / model_warm) / 12


async def test_queueing_at_max_num_seqs(http: aiohttp.ClientSession) -> None:
    async with SimFleet(1, **{**FAST, "itl_ms": 5.0}, max_num_seqs=2) as fleet:
        url = fleet.urls[0]
        engine = fleet.pods[0].engine
        assert engine is not None
        tasks = [asyncio.create_task(post(http, url + "/v1/completions",
                                          {"prompt": f"req {i}", "max_tokens": 20})) for i in range(5)]
        await eventually(lambda: len(engine.waiting) == 3, within=1.0, what="3 requests queued")
        samples = await scrape(http, url)
        assert metric(samples, "vllm:num_requests_running") == 2
        assert metric(samples, "vllm:num_requests_waiting") == 3
        assert metric(samples, "vllm:num_requests_waiting_by_reason", reason="capacity") == 3
        results = await asyncio.gather(*tasks)
        assert all(status == 200 and body["usage"]["completion_tokens"] == 20 for status, body in results)
        samples = await scrape(http, url)
        assert metric(samples, "vllm:num_requests_waiting") == 0
        assert metric(samples, "vllm:request_queue_time_seconds_count") == 5


async def test_preemption_when_decode_outgrows_the_cache(http: aiohttp.ClientSession) -> None:
    # 9 blocks of 16 (8 usable): two 40-token prompts growing by 40 tokens each need 10 blocks.
    async with SimFleet(1, **FAST, num_gpu_blocks=9, block_size=16) as fleet:
        url = fleet.urls[0]
        results = await asyncio.gather(*(
            post(http, url + "/v1/completions", {"prompt": " ".join(f"p{i}x{j}" for j in range(40)),
                                                "max_tokens": 40}) for i in range(2)))
        assert all(status == 200 and body["usage"]["completion_tokens"] == 40 for status, body in results)
        samples = await scrape(http, url)
        assert metric(samples, "vllm:num_preemptions_total") >= 1
        assert metric(samples, "vllm:kv_cache_usage_perc") == 0.0
        # the preempted request resumed: its output is the same as if it had run alone
        alone = await post(http, url + "/v1/completions",
                           {"prompt": " ".join(f"p1x{j}" for j in range(40)), "max_tokens": 40})
        assert alone[1]["choices"][0]["text"] == results[1][1]["choices"][0]["text"]


async def test_chunked_prefill_spreads_a_long_prompt_over_steps(http: aiohttp.ClientSession) -> None:
    # 2000 tokens with a 256-token step budget: 8 steps of at least 5 ms before the first token.
    async with SimFleet(1, **{**FAST, "itl_ms": 5.0}, max_num_batched_tokens=256) as fleet:
        first = await ttft(http, fleet.urls[0], " ".join(f"c{i}" for i in range(2000)))
        engine = fleet.pods[0].engine
        assert engine is not None and engine.num_steps >= 8
    assert first >= 8 * 0.005


async def test_prompt_larger_than_cache_is_rejected(http: aiohttp.ClientSession) -> None:
    async with SimFleet(1, **FAST, num_gpu_blocks=5, block_size=16) as fleet:
        status, body = await post(http, fleet.urls[0] + "/v1/completions",
                                  {"prompt": " ".join(["x"] * 100), "max_tokens": 1})
        assert status == 400
        assert body["error"]["type"] == "BadRequestError" and body["error"]["param"] == "input_tokens"
        assert "does not fit the KV cache" in body["error"]["message"]
        status, _ = await post(http, fleet.urls[0] + "/v1/completions", {"prompt": "x y", "max_tokens": 1})
        assert status == 200


async def test_kv_usage_and_prefix_counters(http: aiohttp.ClientSession) -> None:
    async with SimFleet(1, **{**FAST, "itl_ms": 20.0}, num_gpu_blocks=101, block_size=16) as fleet:
        url = fleet.urls[0]
        prompt = " ".join(f"k{i}" for i in range(160))  # 10 blocks
        engine = fleet.pods[0].engine
        assert engine is not None
        task = asyncio.create_task(post(http, url + "/v1/completions", {"prompt": prompt, "max_tokens": 5}))
        await eventually(lambda: bool(engine.running), what="the request to run")
        usage = metric(await scrape(http, url), "vllm:kv_cache_usage_perc")
        assert 0.10 <= round(usage, 9) <= 0.12  # 10 or 11 of 100 usable blocks while it runs
        await task
        await post(http, url + "/v1/completions", {"prompt": prompt, "max_tokens": 1})
        samples = await scrape(http, url)
        assert metric(samples, "vllm:kv_cache_usage_perc") == 0.0
        assert metric(samples, "vllm:prefix_cache_queries_total") == 320
        assert metric(samples, "vllm:prefix_cache_hits_total") == 144  # 9 full blocks of the first 159
        assert metric(samples, "vllm:prompt_tokens_total") == 320
        assert metric(samples, "vllm:prompt_tokens_cached_total") == 144
        assert metric(samples, "vllm:generation_tokens_total") == 6
        assert metric(samples, "vllm:request_success_total", finished_reason="length") == 2


def test_jitter_is_bounded_and_seeded() -> None:
    from bench.sim.config import SimConfig
    from bench.sim.engine import SimEngine
    from bench.sim.metrics import SimMetrics
    from bench.sim.pod import cache_config_info
    from bench.sim.textgen import TextGenerator
    from prefixindex.tokenizer import WordTokenizer

    def engine(**options: object) -> SimEngine:
        cfg = SimConfig(itl_ms=10.0, itl_ms_per_seq=0.0, **options)  # type: ignore[arg-type]
        metrics = SimMetrics("m", max_model_len=cfg.max_model_len, cache_info=cache_config_info(cfg))
        return SimEngine(cfg, TextGenerator(WordTokenizer()), metrics)

    a, b = engine(jitter=0.5, seed=7), engine(jitter=0.5, seed=7)
    steps = [a._step_time(1, 0) for _ in range(50)]
    assert steps == [b._step_time(1, 0) for _ in range(50)]
    assert all(0.005 <= s <= 0.015 for s in steps) and len(set(steps)) > 40
    assert engine()._step_time(3, 16000) == 16000 / 16000 + 0.010


async def test_evicted_blocks_counter_follows_the_pool(http: aiohttp.ClientSession) -> None:
    # 24 blocks of 16 (23 usable): two 160-token prompts (10 or 11 blocks each with their output) fill
    # the cache, so a third distinct prompt can only run by evicting cached blocks of the first two.
    async with SimFleet(1, **FAST, num_gpu_blocks=24, block_size=16) as fleet:
        url, engine = fleet.urls[0], fleet.pods[0].engine
        assert engine is not None
        for i in range(2):
            await post(http, url + "/v1/completions",
                       {"prompt": " ".join(f"e{i}x{j}" for j in range(160)), "max_tokens": 1})
        assert metric(await scrape(http, url), "kvgate_sim:kv_cache_evicted_blocks_total") == 0
        await post(http, url + "/v1/completions",
                   {"prompt": " ".join(f"e2x{j}" for j in range(160)), "max_tokens": 1})
        evicted = metric(await scrape(http, url), "kvgate_sim:kv_cache_evicted_blocks_total")
        assert evicted == engine.pool.evictions > 0
        await post(http, url + "/reset_prefix_cache", {})  # clearing the cache is not eviction
        assert metric(await scrape(http, url), "kvgate_sim:kv_cache_evicted_blocks_total") == evicted
