"""PrefixCache on its own: config decoding, prompt preparation, per-pod record/forget, precise matching."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry

from prefixindex.hashing import block_keys, root_key
from prefixindex.tokenizer import WordTokenizer
from router.endpoint import Endpoint
from router.policy import RouteRequest
from router.prefix_cache import PrefixCache, PrefixCacheConfig, event_source, split_params
from router.registry import PolicyError, build_prefix_cache
from router.route_state import RouteState

WORDS = [f"w{i}" for i in range(500)]


def text(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def pods(n: int) -> list[Endpoint]:
    return [Endpoint(f"http://127.0.0.1:{8100 + i}", "m") for i in range(n)]


def req(prompt: str) -> RouteRequest:
    return RouteRequest("r", "m", "/v1/completions", {"model": "m", "prompt": prompt}, {})


def prepared(cache: PrefixCache, prompt: str) -> RouteState:
    r = req(prompt)
    cache.prepare(r.state, r)
    return r.state


@pytest.mark.parametrize(
    "params",
    [{"index": "exact"}, {"block_size": 0}, {"block_size": True}, {"block_size": 1.5}, {"capacity": -5},
     {"pending_blocks": -1}, {"replay_timeout": 0}, {"resync_interval": -1}, {"tokenizer": 3}],
)  # fmt: skip
def test_bad_config_is_rejected_with_the_name_of_the_setting(params) -> None:
    (name,) = params
    with pytest.raises(ValueError, match=name):
        PrefixCacheConfig(**params)


def test_boundary_settings_are_valid() -> None:
    cfg = PrefixCacheConfig(block_size=1, capacity=1, pending_blocks=0, resync_interval=0)
    assert (cfg.block_size, cfg.capacity, cfg.pending_blocks, cfg.resync_interval) == (1, 1, 0, 0)


def test_config_comes_from_the_policy_params_over_the_pool_defaults() -> None:
    cache, rest = split_params({"index": "precise", "pending_blocks": 0, "weights": {"prefix": 1}})
    assert rest == {"weights": {"prefix": 1}}
    cfg = PrefixCacheConfig.from_params(cache, tokenizer="/pool/tok", block_size=32)
    assert cfg == PrefixCacheConfig(index="precise", pending_blocks=0, tokenizer="/pool/tok", block_size=32)
    own = PrefixCacheConfig.from_params(
        {"block_size": 64, "tokenizer": "/own"}, tokenizer="/pool", block_size=32
    )
    assert (own.block_size, own.tokenizer) == (64, "/own")
    with pytest.raises(ValueError, match="weights"):
        PrefixCacheConfig.from_params({"weights": {}})


def test_only_policies_that_use_a_prefix_cache_get_one() -> None:
    cache, rest = build_prefix_cache("round_robin", {"seed": 1}, model="m", registry=CollectorRegistry())
    assert cache is None and rest == {"seed": 1}
    for name in ("weighted", "cache_aware"):
        params = {"index": "precise", "balance_abs": 4}
        cache, rest = build_prefix_cache(name, params, model="m", registry=CollectorRegistry())
        assert cache is not None and cache.mode == "precise" and rest == {"balance_abs": 4}
    with pytest.raises(PolicyError, match=r"'weighted'.*pending_blocks"):
        build_prefix_cache("weighted", {"pending_blocks": -1}, model="m", registry=CollectorRegistry())


def test_prompt_is_read_once_and_keys_follow_the_block_size() -> None:
    calls = []

    class Counting(WordTokenizer):
        def encode(self, text, add_special_tokens=True):
            calls.append(1)
            return super().encode(text, add_special_tokens)

    cache = PrefixCache("m", tokenizer=Counting())
    r = req(text(1, 100))
    cache.prepare(r.state, r)
    assert (len(r.state.keys), r.state.keys_block_size, r.state.prompt_tokens) == (6, 16, 100)
    (ep,) = pods(1)
    ep.block_size = 32
    cache.learn_from([ep])
    cache.prepare(r.state, r)
    assert (len(r.state.keys), r.state.keys_block_size) == (3, 32)
    assert len(calls) == 1
    nothing = RouteRequest("r", "m", "/v1/completions", {"model": "m"}, {})
    cache.prepare(nothing.state, nothing)
    cache.prepare(nothing.state, nothing)
    assert nothing.state.prompt is None and nothing.state.keys == [] and nothing.state.prompt_read


def test_cached_tokens_exclude_the_recomputed_last_token() -> None:
    cache = PrefixCache("m")
    a, b = pods(2)
    whole = prepared(cache, text(2, 64))  # exactly 4 blocks
    whole.matched = {a: 4, b: 2}
    assert (whole.cached_tokens(a), whole.cached_tokens(b)) == (48, 32)
    longer = prepared(cache, text(2, 65))
    longer.matched = {a: 4}
    assert longer.cached_tokens(a) == 64


def test_forget_takes_back_only_what_the_failed_attempt_taught_its_pod() -> None:
    """One request, two attempts alive at once (a P/D decode and its prefill): each is recorded per pod."""
    cache = PrefixCache("m")
    a, b = pods(2)
    known = prepared(cache, text(3, 64))
    cache.record(known, a)  # a already holds the first 4 blocks
    state = prepared(cache, text(3, 64) + " " + text(4, 64))
    cache.record(state, a)
    cache.record(state, b)
    assert {ep: len(keys) for ep, keys in state.recorded.items()} == {a: 4, b: 8}
    cache.forget(state, a)
    assert cache.match(state.keys, [a, b]) == {a: 4, b: 8}
    assert list(state.recorded) == [b]  # b's attempt still in flight (or done): its record stays
    cache.forget(state, a)  # twice: nothing more to take back
    assert cache.match(state.keys, [a]) == {a: 4}


def test_precise_mode_records_in_pending_and_none_without_it() -> None:
    (ep,) = pods(1)
    precise = PrefixCache("m", PrefixCacheConfig(index="precise", pending_blocks=8))
    state = prepared(precise, text(5, 64))
    precise.record(state, ep)
    assert len(precise.index) == 0 and precise.pending.held(ep) == 4
    assert precise.match(state.keys, [ep]) == {ep: 4}
    precise.forget(state, ep)
    assert precise.pending.held(ep) == 0
    off = PrefixCache("m", PrefixCacheConfig(index="precise", pending_blocks=0))
    state = prepared(off, text(5, 64))
    off.record(state, ep)
    assert state.recorded == {} and off.match(state.keys, [ep]) == {}


def test_precise_match_follows_a_run_split_between_events_and_pending() -> None:
    """Events confirm a prefill chunk by chunk: the leading blocks move to the index while the rest is
    still pending. The pod must still count as holding the whole run, or a burst scatters."""
    cache = PrefixCache("m", PrefixCacheConfig(index="precise", pending_blocks=64))
    eps = pods(2)
    keys = block_keys(WordTokenizer().encode(text(18, 128)), 16, root_key("m"))  # 8 blocks
    cache.index.add_pod(eps[0])
    cache.pending.add_pod(eps[0], 64)
    cache.index.insert(eps[0], keys[:3])  # first chunk confirmed by a BlockStored
    cache.pending.insert(eps[0], keys[3:])  # the rest routed there, not yet confirmed
    assert cache.match(keys, eps) == {eps[0]: 8}
    cache.pending.discard(eps[0], keys[6:])  # a gap: the run stops there
    assert cache.match(keys, eps) == {eps[0]: 6}


def test_event_sources_bind_shared_endpoints_by_topic() -> None:
    eps = pods(2)
    for e in eps:
        e.kv_events = "tcp://*:5557"
        e.kv_events_replay = "tcp://*:5558"
    src = event_source(eps[0], eps)
    assert src.topic == "kv@127.0.0.1:8100@m" and src.replay == "tcp://127.0.0.1:5558"
    assert event_source(eps[0], eps[:1]).topic is None  # alone on its socket: any topic is its own
    eps[0].labels["kv_topic"] = "kv-events"
    assert event_source(eps[0], eps).topic == "kv-events"
    eps[1].kv_events = "tcp://10.0.0.1:5557"
    assert event_source(eps[1], eps).topic is None
