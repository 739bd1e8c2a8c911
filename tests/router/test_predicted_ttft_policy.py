"""cache_aware ranks pods by predicted time to first token: prefix affinity while it pays, spreading
when a holder's queue makes it slower, per-pod learned rates, near-ties by work then load."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from prometheus_client import CollectorRegistry

from prefixindex.tokenizer import WordTokenizer
from router.endpoint import Endpoint, PeerLoad
from router.policies.predicted_ttft import PredictedTTFTPolicy
from router.policy import Decision, PolicyContext, RouteRequest
from router.prefix_cache import PrefixCache, PrefixCacheConfig
from router.registry import build_policy, build_prefix_cache
from router.ttft.estimator import RatePrior

WORDS = [f"w{i}" for i in range(500)]
PRIOR = RatePrior(prefill_tokens_per_s=1_000, overhead_s=0.0, interference_s=0.0)


class Clock:
    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


def text(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def pods(n: int) -> list[Endpoint]:
    return [Endpoint(f"http://127.0.0.1:{8100 + i}", "m") for i in range(n)]


def req(prompt: str, *, stream: bool = True, max_tokens: int = 10) -> RouteRequest:
    body = {"model": "m", "prompt": prompt, "stream": stream, "max_tokens": max_tokens}
    return RouteRequest("r", "m", "/v1/completions", body, {})


def make(clock: Clock, *, prior: RatePrior = PRIOR, registry=None, **params) -> PredictedTTFTPolicy:
    config = PrefixCacheConfig(capacity=100_000)
    cache = PrefixCache("m", config, tokenizer=WordTokenizer(), registry=registry)
    return PredictedTTFTPolicy(
        cache, model="m", prior=prior, clock=clock, registry=registry, seed=1, **params
    )


def send(policy: PredictedTTFTPolicy, r: RouteRequest, eps: list[Endpoint]) -> Decision:
    d = policy.pick(r, eps)
    d.sent_at = policy.clock()
    policy.on_routed(r, d)
    return d


def answer(policy: PredictedTTFTPolicy, r: RouteRequest, d: Decision, clock: Clock, ttft: float) -> None:
    clock.now += ttft
    policy.on_first_byte(r, d, ttft)
    policy.on_finished(r, d, True)


def test_a_prefix_follows_its_holder_while_the_holder_is_fastest() -> None:
    clock = Clock()
    policy, eps = make(clock), pods(4)
    system = text(1, 800)
    first = req(system + " " + text(100, 20))
    d0 = send(policy, first, eps)
    answer(policy, first, d0, clock, 0.8)
    for i in range(10):
        r = req(system + " " + text(200 + i, 20))
        d = send(policy, r, eps)
        assert d.endpoint is d0.endpoint and d.reason == "prefix_hit"
        answer(policy, r, d, clock, 0.02)


def test_a_hot_prefix_spreads_once_its_holder_is_slower_than_a_cold_prefill() -> None:
    clock = Clock()
    policy, eps = make(clock), pods(2)
    system = text(2, 400)  # a cold prefill elsewhere: ~0.42 s at 1000 tokens/s
    first = req(system + " q")
    d0 = send(policy, first, eps)
    answer(policy, first, d0, clock, 0.4)
    holder, other = d0.endpoint, next(e for e in eps if e is not d0.endpoint)
    chosen = []
    for i in range(12):  # a burst: nothing answers, the holder's backlog grows by each question
        d = send(policy, req(system + " " + text(300 + i, 60)), eps)
        chosen.append(d.endpoint)
    assert chosen[0] is holder
    assert other in chosen  # the holder's queue made it slower than a cold prefill: spread
    spread = chosen.index(other)
    assert spread >= 3  # ... but not before the queue cost more than the prefix saves
    assert policy.ledger(other).prefill_tokens > 0


def test_near_ties_go_to_the_pod_adding_the_least_work() -> None:
    clock = Clock()
    policy, eps = make(clock, tie_fraction=0.5), pods(2)
    system = text(3, 400)
    first = req(system)
    d0 = send(policy, first, eps)  # still prefilling: the holder's prediction is ~ a cold prefill's
    second = send(policy, req(system + " " + text(4, 10)), eps)
    assert second.endpoint is d0.endpoint  # within the tie fraction: less work for the fleet wins


def test_cold_prompts_on_idle_pods_are_spread_at_random_not_by_list_order() -> None:
    clock = Clock()
    policy, eps = make(clock), pods(4)
    counts = Counter()
    for i in range(200):
        r = req(text(1000 + i, 50))
        d = policy.pick(r, eps)
        counts[d.endpoint.url] += 1
        assert d.reason == "tie"
    assert len(counts) == 4 and min(counts.values()) > 25


def test_each_pod_learns_its_own_rate_and_the_slow_one_gets_less() -> None:
    clock = Clock()
    registry = CollectorRegistry()
    policy = make(clock, prior=RatePrior(prefill_tokens_per_s=5_000), registry=registry)
    eps = pods(2)
    fast, slow = eps
    rates = {fast: 4_000.0, slow: 1_000.0}
    for i in range(400):  # unique prompts, one at a time, each pod in turn: only the rates differ
        r = req(text(5000 + i, 200 + (i % 5) * 100))
        d = send(policy, r, [eps[i % 2]])
        answer(policy, r, d, clock, d.prompt_tokens / rates[d.endpoint] + 0.005)
    assert policy.ledger(fast).estimator.prefill_tokens_per_s == pytest.approx(4_000, rel=0.2)
    assert policy.ledger(slow).estimator.prefill_tokens_per_s == pytest.approx(1_000, rel=0.2)
    got = registry.get_sample_value(
        "kvgate_ttft_model_prefill_tokens_per_second", {"model": "m", "endpoint": slow.url}
    )
    assert got == pytest.approx(1_000, rel=0.2)
    assert registry.get_sample_value("kvgate_ttft_prediction_error_ratio_count", {"model": "m"}) > 300
    # with both idle, the same cold prompt now goes to the fast pod
    assert policy.pick(req(text(9, 400)), eps).endpoint is fast


def test_non_streamed_answers_do_not_teach_ttft() -> None:
    clock = Clock()
    policy, eps = make(clock), pods(1)
    r = req(text(6, 300), stream=False)
    d = send(policy, r, eps)
    answer(policy, r, d, clock, 5.0)  # first byte of a non-streamed answer: after the whole decode
    assert policy.ledger(eps[0]).estimator.samples == 0


def test_a_failed_attempt_releases_its_backlog_and_forgets_its_blocks() -> None:
    clock = Clock()
    policy, eps = make(clock), pods(2)
    r = req(text(7, 300))
    d = send(policy, r, eps)
    assert policy.ledger(d.endpoint).prefill_tokens == d.prompt_tokens
    policy.on_finished(r, d, False)
    assert policy.ledger(d.endpoint).prefill_tokens == 0
    assert policy.cache.match(r.state.keys, eps) == {}


def test_an_attempt_that_fails_after_its_first_byte_keeps_its_blocks() -> None:
    """The client left mid-stream (the attempt ends not ok): the pod prefilled the prompt all the same."""
    clock = Clock()
    policy, eps = make(clock), pods(2)
    r = req(text(8, 300))
    d = send(policy, r, eps)
    clock.now += 0.05
    d.first_byte_at = clock.now
    policy.on_first_byte(r, d, 0.05)
    policy.on_finished(r, d, False)
    assert policy.ledger(d.endpoint).prefill_tokens == 0
    assert policy.cache.match(r.state.keys, eps) == {d.endpoint: len(r.state.keys)}


def test_built_from_config_with_prior_and_cache_params() -> None:
    registry = CollectorRegistry()
    params = {"index": "approximate", "capacity": 1000, "tie_fraction": 0.1,
              "prior": {"prefill_tokens_per_s": 8000, "overhead_s": 0.02}}
    cache, rest = build_prefix_cache("cache_aware", params, model="m", registry=registry)
    policy = build_policy("cache_aware", rest, PolicyContext("m", registry, prefix_cache=cache))
    assert isinstance(policy, PredictedTTFTPolicy)
    assert policy.prior.prefill_tokens_per_s == 8000 and policy.tie_fraction == 0.1
    ctx = PolicyContext("m", registry, prefix_cache=cache)
    with pytest.raises(ValueError):
        build_policy("cache_aware", {"weights": {"prefix": 1}}, ctx)


def test_other_replicas_work_on_a_pod_steers_new_prefixes_away_and_is_summarised_for_them() -> None:
    clock = Clock()
    policy = make(clock)
    eps = pods(2)
    eps[0].peer_load = PeerLoad(prefilling=2, decoding=0, prefill_tokens=5_000)  # 5 s of others' prefill
    for i in range(4):
        assert send(policy, req(text(100 + i, 300)), eps).endpoint is eps[1]
    eps[0].peer_load = None  # the summaries expired: only this replica's own work counts again
    assert send(policy, req(text(200, 300)), eps).endpoint is eps[0]
    summary = {ep: rest for ep, *rest in policy.load_summary()}
    assert summary[eps[1]] == [4, 0, 1_200] and summary[eps[0]] == [1, 0, 300]
