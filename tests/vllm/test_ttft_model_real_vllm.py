"""The TTFT model of `cache_aware` against a REAL vLLM (CPU build): it learns the pod's prefill rate
from streamed first bytes, and predicts the TTFT of the requests that follow within the issue's 25%.

The test first measures the pod itself (straight to vLLM, bypassing the gateway): the median TTFT of
cold short and cold long prompts, whose difference per token is the pod's cold prefill cost. The
gateway's prior is then set PRIOR_FACTOR times too fast for that pod, so only learning brings the rate
into range. A known mix of streamed completions (unique prompts of four lengths; prompts sharing one
of four prefixes, with suffixes of three lengths) goes through an in-process gateway, one at a time,
and the gateway's /metrics must show: one model sample per request, a learned rate within a factor of
RATE_FACTOR of the measured one, and |predicted - observed| / observed <= 0.25 for at least half of
the second half's requests (the histogram has a bucket bound at 0.25, so this reads the median's
bound exactly). The tiny model's TTFTs are tens of milliseconds, so a CPU shared with other work
makes them erratic; a failure says how well a line fitted in hindsight would have done.
"""

from __future__ import annotations

import math
import random
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from bench.loadgen.client import RequestResult, send
from bench.loadgen.harness import reset_prefix_caches
from bench.workloads.base import BenchRequest
from bench.workloads.words import text
from gateway.app import build_app
from gateway.config import EndpointSpec, GatewayConfig, Health, PolicySpec, PoolSpec, Scrape
from prefixindex.tokenizer import HFTokenizer

pytestmark = pytest.mark.vllm

MAX_TOKENS = 4
CALIBRATION_TOKENS = (32, 1536)  # cold short / cold long prompt, straight to the pod
CALIBRATION_ROUNDS = 3
UNIQUE_TOKENS = (256, 768, 1280, 1792)  # UNIQUE_EACH cold prompts of each
UNIQUE_EACH = 8
PREFIXES, PREFIX_USES = 4, 8
PREFIX_TOKENS = 1024  # PREFIXES shared prefixes, PREFIX_USES prompts each ...
SUFFIX_TOKENS = (64, 192, 320)  # ... with these unique tails
PRIOR_FACTOR = 5.0  # the gateway's prior: this many times the measured rate (> RATE_FACTOR: it fails)
RATE_FACTOR = 3.0  # the learned rate must be within this factor of the measured one
ERROR_TARGET = 0.25


def token_ids(tok: HFTokenizer, key: object, n: int) -> tuple[int, ...]:
    """Exactly `n` token ids of filler text unique to `key` (the words make ~3 tokens each)."""
    ids = tok.encode(text(0, key, n), add_special_tokens=False)
    assert len(ids) >= n
    return tuple(ids[:n])


@dataclass(frozen=True, slots=True)
class Request:
    prompt: tuple[int, ...]
    uncached: int  # prompt tokens the pod must prefill (a shared prefix is cached after its first use)


def known_mix(tok: HFTokenizer, tag: str) -> list[Request]:
    """The mix in a fixed shuffled order: unique prompts, and prompts sharing one of the prefixes."""
    unique = [token_ids(tok, (tag, "unique", n, i), n) for n in UNIQUE_TOKENS for i in range(UNIQUE_EACH)]
    shared = []
    for p in range(PREFIXES):
        prefix = token_ids(tok, (tag, "prefix", p), PREFIX_TOKENS)
        for i in range(PREFIX_USES):
            shared.append((prefix, token_ids(tok, (tag, "suffix", p, i), SUFFIX_TOKENS[(p + i) % 3])))
    order: list[tuple[tuple[int, ...], tuple[int, ...]]] = [((), u) for u in unique] + shared
    random.Random(7).shuffle(order)
    seen: set[tuple[int, ...]] = set()
    mix = []
    for prefix, rest in order:
        mix.append(Request(prefix + rest, len(rest) if prefix in seen else len(prefix) + len(rest)))
        seen.add(prefix)
    return mix


def hindsight_share(mix: list[Request], ttfts: list[float], half: int) -> float:
    """The share of the second half within ERROR_TARGET of the least-squares line through all the
    (uncached tokens, client TTFT) samples: what the best fit in hindsight achieves on this noise."""
    fit = statistics.linear_regression([r.uncached for r in mix], ttfts)
    errors = [abs(fit.intercept + fit.slope * r.uncached - t) / t for r, t in zip(mix, ttfts, strict=True)]
    return sum(e <= ERROR_TARGET for e in errors[half:]) / (len(mix) - half)


async def ttft(http: aiohttp.ClientSession, url: str, model: str, prompt: tuple[int, ...]) -> float:
    """Client-side TTFT of one streamed completion (asserts it succeeded)."""
    req = BenchRequest("ttft-model", "completions", MAX_TOKENS, prompt=prompt)
    result = await send(http, url, model, req, RequestResult(req.tag, 0.0), time.perf_counter(), 60.0)
    assert result.ok and result.ttft is not None, result.error
    return result.ttft


@dataclass(slots=True)
class Model:
    """What the gateway's /metrics say about the pod's TTFT model."""

    rate: float
    samples: float
    errors_at_most: dict[float, float]  # cumulative prediction-error buckets, le -> count
    errors: float


async def read_model(http: aiohttp.ClientSession, gateway: str, pod: str) -> Model:
    async with http.get(gateway + "/metrics") as resp:
        assert resp.status == 200
        exposition = await resp.text()
    model = Model(math.nan, 0.0, {}, 0.0)
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            if s.name == "kvgate_ttft_model_prefill_tokens_per_second" and s.labels["endpoint"] == pod:
                model.rate = s.value
            elif s.name == "kvgate_ttft_model_samples_total" and s.labels["endpoint"] == pod:
                model.samples = s.value
            elif s.name == "kvgate_ttft_prediction_error_ratio_bucket":
                model.errors_at_most[float(s.labels["le"])] = s.value
            elif s.name == "kvgate_ttft_prediction_error_ratio_count":
                model.errors = s.value
    return model


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


async def measured_rate(http: aiohttp.ClientSession, real_vllm, tok: HFTokenizer, tag: str) -> float:
    """The pod's cold prefill rate (tokens/s): median TTFT difference of cold long vs short prompts."""
    short, long = CALIBRATION_TOKENS
    seen: dict[int, list[float]] = {short: [], long: []}
    for r in range(CALIBRATION_ROUNDS):
        for n in (short, long):
            prompt = token_ids(tok, (tag, "cal", n, r), n)
            seen[n].append(await ttft(http, real_vllm.url, real_vllm.model, prompt))
    slope = (statistics.median(seen[long]) - statistics.median(seen[short])) / (long - short)
    assert slope > 0, f"a cold {long}-token prefill was not slower than a {short}-token one: {seen}"
    return 1.0 / slope


@pytest.fixture
async def gateway_for(real_vllm) -> AsyncIterator:
    """A factory: an in-process gateway in front of the pod, `cache_aware` with the given prior rate."""
    runners: list[web.AppRunner] = []

    async def start(prior_rate: float) -> str:
        pool = PoolSpec(
            model=real_vllm.model, tokenizer=str(real_vllm.model_dir), block_size=real_vllm.block_size,
            endpoints=[EndpointSpec(url=real_vllm.url)],
            policy=PolicySpec("cache_aware", {"prior": {"prefill_tokens_per_s": prior_rate}, "seed": 3}),
        )  # fmt: skip
        config = GatewayConfig(pools=[pool], health=Health(interval=5.0), scrape=Scrape(interval=1.0))
        runner = web.AppRunner(build_app(config, registry=CollectorRegistry()), shutdown_timeout=1.0)
        runners.append(runner)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    try:
        yield start
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_ttft_model_learns_the_real_pods_rate_and_predicts_within_a_quarter(
    real_vllm, http: aiohttp.ClientSession, gateway_for
) -> None:
    tok = HFTokenizer(str(real_vllm.model_dir))
    tag = f"ttft{uuid.uuid4().hex[:8]}"
    rate = await measured_rate(http, real_vllm, tok, tag)
    await reset_prefix_caches(http, [real_vllm.url])  # every prompt of the mix starts cold
    gateway = await gateway_for(PRIOR_FACTOR * rate)

    mix = known_mix(tok, tag)
    half = len(mix) // 2
    seen = [await ttft(http, gateway, real_vllm.model, r.prompt) for r in mix[:half]]
    middle = await read_model(http, gateway, real_vllm.url)
    seen += [await ttft(http, gateway, real_vllm.model, r.prompt) for r in mix[half:]]
    end = await read_model(http, gateway, real_vllm.url)

    assert end.samples == len(mix)  # every streamed first byte taught the model
    assert end.errors - middle.errors == len(mix) - half
    low, high = rate / RATE_FACTOR, rate * RATE_FACTOR
    assert math.isfinite(end.rate) and low <= end.rate <= high, (
        f"learned {end.rate:.0f} tokens/s; the pod measured {rate:.0f} (prior {PRIOR_FACTOR * rate:.0f})"
    )
    within = end.errors_at_most[ERROR_TARGET] - middle.errors_at_most[ERROR_TARGET]
    share = within / (end.errors - middle.errors)
    assert share >= 0.5, (
        f"only {share:.0%} of the second half's predictions within {ERROR_TARGET:.0%} of the TTFT seen "
        f"(buckets: {end.errors_at_most}, at the middle: {middle.errors_at_most}); a line fitted in "
        f"hindsight through the client-side TTFTs gets {hindsight_share(mix, seen, half):.0%}: when that "
        "is low too, the pod's TTFT itself was erratic (a busy CPU?)"
    )
