"""WeightedPolicy over a PrefixCache: prefix affinity, no hot-spotting, balance, spreading, modes, metrics."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from prometheus_client import CollectorRegistry

from prefixindex.events import BlockStored, EventBatch
from prefixindex.hashing import block_keys, root_key
from prefixindex.tokenizer import WordTokenizer
from router.endpoint import Endpoint
from router.policies.weighted import WeightedPolicy
from router.policy import PolicyContext, RouteRequest
from router.prefix_cache import PREFIX_CACHE_PARAMS, PrefixCache, PrefixCacheConfig
from router.registry import PolicyError, build_policy, build_prefix_cache

WORDS = [f"w{i}" for i in range(500)]


def text(seed: int, n: int = 96) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def pods(n: int = 4) -> list[Endpoint]:
    return [Endpoint(f"http://127.0.0.1:{8100 + i}", "m") for i in range(n)]


def req(prompt: str, **extra) -> RouteRequest:
    return RouteRequest("r", "m", "/v1/completions", {"model": "m", "prompt": prompt, **extra}, {})


def make(seed: int, *, tokenizer=None, registry=None, **params) -> WeightedPolicy:
    """A WeightedPolicy over its own PrefixCache; the PrefixCacheConfig fields of `params` go to the cache."""
    cache = {k: params.pop(k) for k in list(params) if k in PREFIX_CACHE_PARAMS}
    prefix_cache = PrefixCache("m", PrefixCacheConfig(**cache), tokenizer=tokenizer, registry=registry)
    return WeightedPolicy(prefix_cache, seed=seed, **params)


def from_config(name: str, params: dict, registry: CollectorRegistry, model: str = "m", seed=None):
    """As the gateway builds it: the cache from its share of `params`, the policy from the rest."""
    cache, rest = build_prefix_cache(name, params, model=model, registry=registry)
    ctx = PolicyContext(model=model, registry=registry, seed=seed, prefix_cache=cache)
    policy = build_policy(name, rest, ctx)
    assert isinstance(policy, WeightedPolicy)
    return policy


def route(policy: WeightedPolicy, eps: list[Endpoint], r: RouteRequest, *, hold: bool = False):
    d = policy.pick(r, eps)
    policy.on_routed(r, d)
    if hold:
        d.endpoint.in_flight += 1
    return d


def test_requests_sharing_a_prefix_follow_the_pod_that_holds_it() -> None:
    policy = make(1)
    eps = pods()
    system = text(0, 64)
    first = route(policy, eps, req(system + " " + text(1, 20)))
    assert first.reason in ("tie", "load") and first.cached_tokens == 0
    for i in range(2, 12):
        d = route(policy, eps, req(system + " " + text(i, 20)))
        assert d.endpoint is first.endpoint and d.reason == "prefix_hit"
        assert d.cached_tokens == 64 and d.prompt_tokens == 84


def test_quiet_fleet_is_not_hot_spotted() -> None:
    policy = make(2)
    eps = pods()
    counts = Counter(route(policy, eps, req(text(100 + i))).endpoint.url for i in range(200))
    assert len(counts) == 4 and max(counts.values()) < 90  # ~50 each; list order would give 200 to one


def test_ties_go_to_the_least_loaded_then_at_random() -> None:
    policy = make(weights={"prefix": 3}, seed=3)
    eps = pods(3)
    eps[0].in_flight = 2
    picked = Counter(policy.pick(req(text(i)), eps).endpoint.url for i in range(60))
    assert eps[0].url not in picked and len(picked) == 2
    assert all(d.reason == "tie" for d in [policy.pick(req(text(1)), eps)])


def test_a_hot_prefix_spreads_to_a_second_pod_and_no_further() -> None:
    policy = make(4, balance_abs=8, balance_rel=1.5)
    eps = pods()
    system = text(7, 64)
    decisions = [route(policy, eps, req(system + f" q{i}"), hold=True) for i in range(16)]
    per_pod = Counter(d.endpoint.url for d in decisions)
    assert sorted(per_pod.values()) == [7, 9]
    reasons = Counter(d.reason for d in decisions)
    assert reasons["balance"] == 1 and reasons["prefix_hit"] == 14


def test_an_overloaded_holder_stops_attracting_its_prefix() -> None:
    policy = make(5)
    eps = pods(2)
    system = text(9, 64)
    holder = route(policy, eps, req(system)).endpoint
    other = eps[1] if holder is eps[0] else eps[0]
    holder.waiting, holder.running = 20, 8
    d = policy.pick(req(system + " more words"), eps)
    assert d.endpoint is other and d.reason == "balance" and d.cached_tokens == 0


def test_cache_salt_and_lora_isolate_prefixes() -> None:
    policy = make(6)
    eps = pods()
    system = text(11, 64)
    route(policy, eps, req(system, cache_salt="tenant-a"))
    assert policy.pick(req(system + " x", cache_salt="tenant-a"), eps).cached_tokens == 64
    assert policy.pick(req(system, cache_salt="tenant-b"), eps).cached_tokens == 0
    assert policy.pick(req(system), eps).cached_tokens == 0
    lora = RouteRequest("r", "adapter", "/v1/completions", {"model": "adapter", "prompt": system}, {})
    assert policy.pick(lora, eps).cached_tokens == 0


def test_chat_and_token_prompts_are_keyed_like_the_engine_sees_them() -> None:
    policy = make(7)
    eps = pods()
    tok = WordTokenizer()
    messages = [{"role": "system", "content": text(12, 64)}, {"role": "user", "content": "hi"}]
    chat = RouteRequest("r", "m", "/v1/chat/completions", {"model": "m", "messages": messages}, {})
    d = route(policy, eps, chat)
    ids = tok.encode_chat(messages)
    assert policy.pick(req(ids), eps).endpoint is d.endpoint
    assert policy.pick(req(ids), eps).cached_tokens == (len(ids) - 1) // 16 * 16  # last token recomputed
    assert policy.pick(req(ids[:64]), eps).cached_tokens == 48


def test_prompt_is_tokenized_once_per_request() -> None:
    calls = []

    class Counting(WordTokenizer):
        def encode(self, text, add_special_tokens=True):
            calls.append(1)
            return super().encode(text, add_special_tokens)

    policy = make(tokenizer=Counting(), seed=8)
    r = req(text(13))
    eps = pods()
    d = policy.pick(r, eps)
    policy.pick(r, [e for e in eps if e is not d.endpoint])  # a retry on the remaining pods
    policy.on_routed(r, d)
    assert len(calls) == 1


def test_bad_prompts_route_by_load() -> None:
    policy = make(9)
    eps = pods(2)
    eps[0].in_flight = 3
    for body in (
        {"model": "m"},
        {"model": "m", "prompt": 5},
        {"model": "m", "prompt": [-1, 2]},
        {"model": "m", "prompt": "x", "cache_salt": ""},
    ):
        d = policy.pick(RouteRequest("r", "m", "/v1/completions", body, {}), eps)
        assert d.endpoint is eps[1] and d.reason == "load" and d.prompt_tokens == 0


def test_approximate_capacity_follows_the_pods_num_gpu_blocks() -> None:
    policy = make(10)
    (ep,) = pods(1)
    ep.num_gpu_blocks = 10
    for i in range(5):
        route(policy, [ep], req(text(200 + i, 64)))  # 4 blocks each
    assert policy.cache.index.held(ep) == 10
    assert policy.pick(req(text(204, 64) + " x"), [ep]).cached_tokens == 64
    assert policy.pick(req(text(200, 64)), [ep]).cached_tokens == 0


def test_block_size_is_learned_from_the_pods_unless_configured() -> None:
    policy = make(11)
    eps = pods(2)
    for e in eps:
        e.block_size = 32
    d = route(policy, eps, req(text(14, 100)))
    assert policy.cache.block_size == 32 and policy.pick(req(text(14, 100)), eps).cached_tokens == 96
    fixed = make(block_size=16, seed=11)
    route(fixed, eps, req(text(14, 100)))
    assert fixed.cache.block_size == 16 and fixed.pick(req(text(14, 100)), eps).cached_tokens == 96
    assert d.prompt_tokens == 100
    eps[1].block_size = 64  # a pod of another size later: learned once, kept
    policy.pick(req(text(15, 100)), eps[::-1])
    assert policy.cache.block_size == 32


def test_precise_mode_learns_from_events_and_pending_routes() -> None:
    policy = make(index="precise", pending_blocks=8, seed=12)
    eps = pods(2)
    tokens = WordTokenizer().encode(text(15, 64))
    cache = policy.cache
    cache.track(eps[1])
    cache.apply(eps[1], EventBatch(0.0, [BlockStored([1, 2, 3, 4], None, tokens, 16)]))
    d = policy.pick(req(text(15, 64) + " x"), eps)
    assert d.endpoint is eps[1] and d.cached_tokens == 64 and d.reason == "prefix_hit"
    # routed but not yet confirmed by an event: the pending LRU keeps the burst together
    r = req(text(16, 64))
    first = policy.pick(r, eps)
    policy.on_routed(r, first)
    assert policy.pick(req(text(16, 64)), eps).endpoint is first.endpoint
    assert len(cache.index) == 4  # pending entries never enter the event-fed index
    keys = block_keys(tokens, 16, root_key("m"))
    cache.endpoints_changed([], [eps[1]])
    assert cache.index.match(keys) == {}


def test_metrics_count_tokens_decisions_and_index_size() -> None:
    registry = CollectorRegistry()
    policy = from_config("weighted", {"weights": {"prefix": 3, "queue": 2}}, registry, seed=13)
    again = from_config("weighted", {}, registry, model="m2")  # same registry
    eps = pods(2)
    route(policy, eps, req(text(17, 64)))
    d = route(policy, eps, req(text(17, 64) + " x"))
    url = d.endpoint.url
    v = registry.get_sample_value
    assert v("kvgate_prefix_prompt_tokens_total", {"model": "m", "pod": url}) == 129
    assert v("kvgate_prefix_cached_tokens_total", {"model": "m", "pod": url}) == 64
    assert v("kvgate_cache_aware_decisions_total", {"model": "m", "reason": "prefix_hit"}) == 1
    assert v("kvgate_prefix_index_blocks", {"model": "m"}) == 4
    assert v("kvgate_prefix_index_bytes", {"model": "m"}) > 0
    assert again.model == "m2"


@pytest.mark.parametrize(
    "params",
    [
        {"index": "exact"},
        {"nope": 1},
        {"weights": {"prefix": -1}},
        {"weights": {"magic": 1}},
        {"weights": [1]},
        {"block_size": 0},
        {"capacity": -5},
        {"balance_rel": 0.5},
    ],
)
def test_bad_parameters_are_rejected(params) -> None:
    with pytest.raises(PolicyError, match="weighted"):
        from_config("weighted", params, CollectorRegistry())


def test_a_failed_attempt_unlearns_only_what_it_taught() -> None:
    policy = make(14)
    eps = pods(2)
    system = text(18, 64)
    first = route(policy, eps, req(system))
    policy.on_finished(req(system), first, True)
    r = req(system + " " + text(19, 64))
    d = policy.pick(r, eps)
    assert d.endpoint is first.endpoint
    policy.on_routed(r, d)
    policy.on_finished(r, d, False)  # the pod failed before prefill: its new blocks are forgotten
    assert policy.pick(req(system + " " + text(19, 64)), eps).cached_tokens == 64
    assert policy.cache.index.held(first.endpoint) == 4


def test_an_attempt_that_fails_after_its_first_byte_keeps_what_it_taught() -> None:
    policy = make(15)
    eps = pods(2)
    r = req(text(20, 64) + " " + text(21, 64))
    d = policy.pick(r, eps)
    policy.on_routed(r, d)
    d.first_byte_at = 1.0  # the pod answered, then the client left: it prefilled the prompt
    policy.on_finished(r, d, False)
    assert policy.cache.index.held(d.endpoint) == 8
