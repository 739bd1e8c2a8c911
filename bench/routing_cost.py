"""Routing decision cost: tokenize, hash, lookup, score, for long prompts.

    .venv/bin/python -m bench.routing_cost [--pods 16] [--sizes 1024 8192 32768] [--repeat 200] [--json]

An index already holding 100k blocks spread over the pods plus the prompt's leading half on two pods
(so the lookup walks a real match), and prefill work in flight on the pods. Each stage is timed on its
own (median over `--repeat` runs). `decision` is a whole `cache_aware` pick (predicted TTFT) with the
tokens already known (hash + lookup + predict): the figure issue 11's target (p50 < 200 us at 8k tokens
over 16 pods) is about; `weighted` is the weighted-sum rule's pick on the same state, and `ratio`
divides the two, measured in the same run.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable

import orjson
from prometheus_client import CollectorRegistry

from prefixindex.hashing import block_keys
from prefixindex.prompt import extract_prompt
from prefixindex.tokenizer import WordTokenizer
from router.endpoint import Endpoint
from router.policies.predicted_ttft import PredictedTTFTPolicy
from router.policies.weighted import WeightedPolicy
from router.policy import RouteRequest
from router.prefix_cache import PrefixCache, PrefixCacheConfig
from router.route_state import PrefixMatch, RouteState
from router.scorers import combine


def _median_us(fn: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def measure(tokens: int, pods: int, repeat: int, seed: int = 0) -> dict[str, float]:
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(5000)]
    text = " ".join(rng.choice(words) for _ in range(tokens))
    tok = WordTokenizer()
    eps = [Endpoint(f"http://10.0.0.{i}:8000", "m") for i in range(pods)]
    for i, ep in enumerate(eps):
        ep.in_flight, ep.waiting, ep.kv_usage, ep.last_scrape = i % 3, i % 2, 0.1 * i, 1.0
    registry = CollectorRegistry()
    cache = PrefixCache("m", PrefixCacheConfig(capacity=200_000), tokenizer=tok, registry=registry)
    policy = WeightedPolicy(cache, seed=seed)
    ttft_policy = PredictedTTFTPolicy(cache, model="m", registry=registry, seed=seed)
    body = {"model": "m", "prompt": text}
    for ep in eps:  # background: 100k blocks on the pods
        cache.index.add_pod(ep, 200_000)
        cache.index.insert(ep, [rng.getrandbits(60) | 1 for _ in range(100_000 // pods)])
    prompt = extract_prompt(body, "/v1/completions", tok, "m")
    keys = block_keys(prompt.tokens, cache.block_size, prompt.root)
    half = keys[: len(keys) // 2]
    cache.index.insert(eps[0], half)
    cache.index.insert(eps[1], half[: len(half) // 2])

    def decision(ranker: WeightedPolicy | PredictedTTFTPolicy) -> Callable[[], object]:
        def pick() -> object:
            read = RouteState(prompt=prompt, prompt_read=True)  # tokens known: time hash + lookup + rank
            return ranker.pick(RouteRequest("r", "m", "/v1/completions", body, {}, state=read), eps)

        return pick

    for i, ep in enumerate(eps):  # in-flight work on the pods, so the TTFT model has a backlog to price
        led = ttft_policy.ledger(ep)
        led.prefill_tokens, led.prefilling = 1000 * (i % 3), i % 3

    scored = RouteRequest("r", "m", "/v1/completions", body, {})
    scored.state.prefix = PrefixMatch(len(keys), cache.index.match(keys, eps))  # type: ignore[arg-type]
    return {
        "tokens": len(prompt.tokens),
        "blocks": len(keys),
        "tokenize_us": _median_us(lambda: extract_prompt(body, "/v1/completions", tok, "m"), repeat),
        "hash_us": _median_us(lambda: block_keys(prompt.tokens, cache.block_size, prompt.root), repeat),
        "lookup_us": _median_us(lambda: cache.index.match(keys, eps), repeat),
        "score_us": _median_us(lambda: combine(policy.scorers, scored, eps), repeat),
        "weighted_us": _median_us(decision(policy), repeat),
        "decision_us": _median_us(decision(ttft_policy), repeat),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=16)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--json", action="store_true", help="print one JSON object per size")
    args = ap.parse_args(argv)
    rows = [measure(n, args.pods, args.repeat) for n in args.sizes]
    if args.json:
        for row in rows:
            sys.stdout.write(orjson.dumps(row).decode() + "\n")
        return 0
    cols = ["tokens", "blocks", "tokenize_us", "hash_us", "lookup_us", "score_us", "weighted_us",
            "decision_us"]
    print(" ".join(f"{c:>12}" for c in cols), f"{'ratio':>8}")
    for row in rows:
        cells = " ".join(f"{row[c]:>12.0f}" if isinstance(row[c], float) else f"{row[c]:>12}" for c in cols)
        print(cells, f"{row['decision_us'] / row['weighted_us']:>7.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
