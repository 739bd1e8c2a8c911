"""Scorers (table-driven) and the framework that clamps, weights and sums them."""

from __future__ import annotations

import pytest

from router.endpoint import Endpoint
from router.policy import RouteRequest
from router.route_state import PrefixMatch, RouteState
from router.scorers import SCORERS, Weighted, build_scorer, combine, scores_by_scorer
from router.scorers.kv_usage import KVUsageScorer
from router.scorers.prefill import PrefillScorer
from router.scorers.prefix import PrefixScorer
from router.scorers.queue import QueueScorer, endpoint_load


def eps(n: int, **state) -> list[Endpoint]:
    out = [Endpoint(f"http://127.0.0.1:{9000 + i}", "m") for i in range(n)]
    for name, values in state.items():
        for ep, v in zip(out, values, strict=True):
            setattr(ep, name, v)
    return out


def req(prefix: PrefixMatch | None = None) -> RouteRequest:
    return RouteRequest("r", "m", "/v1/completions", {}, {}, state=RouteState(prefix=prefix))


@pytest.mark.parametrize(
    ("in_flight", "waiting", "running", "expect"),
    [
        ([0, 0, 0], [0, 0, 0], [0, 0, 0], [1.0, 1.0, 1.0]),
        ([0, 5, 10], [0, 0, 0], [0, 0, 0], [1.0, 0.5, 0.0]),
        ([0, 0, 0], [4, 0, 0], [0, 2, 0], [0.0, 0.5, 1.0]),  # scraped work counts too
        ([3, 0, 0], [0, 0, 0], [3, 0, 0], [0.0, 1.0, 1.0]),  # running ones already in flight: no double count
    ],
)
def test_queue_scorer(in_flight, waiting, running, expect) -> None:
    e = eps(3, in_flight=in_flight, waiting=waiting, running=running)
    assert [QueueScorer().score(req(), e)[x] for x in e] == pytest.approx(expect)


def test_queue_load_respects_weight() -> None:
    (a,) = eps(1, in_flight=[4])
    a.weight = 2.0
    assert endpoint_load(a) == 2.0
    a.weight = 0.0
    assert endpoint_load(a) == float("inf")


@pytest.mark.parametrize(
    ("usage", "scraped", "expect"),
    [([0.0, 0.25, 1.0], [1.0, 1.0, 1.0], {0: 1.0, 1: 0.75, 2: 0.0}), ([0.5, 0.5], [1.0, 0.0], {0: 0.5})],
)
def test_kv_usage_scorer(usage, scraped, expect) -> None:
    e = eps(len(usage), kv_usage=usage, last_scrape=scraped)
    got = KVUsageScorer().score(req(), e)
    assert {e.index(k): v for k, v in got.items()} == pytest.approx(expect)


def test_prefix_scorer() -> None:
    e = eps(3)
    r = req(PrefixMatch(8, {e[0]: 8, e[1]: 2}))
    assert PrefixScorer().score(r, e) == {e[0]: 1.0, e[1]: 0.25, e[2]: 0.0}
    assert PrefixScorer().score(req(PrefixMatch(0)), e) == {}
    assert PrefixScorer().score(req(), e) == {}


class Fixed:
    type_name = "fixed"

    def __init__(self, scores):
        self.scores = scores

    def score(self, request, endpoints):
        return {ep: s for ep, s in zip(endpoints, self.scores, strict=False) if s is not None}


def test_combine_clamps_weights_and_sums() -> None:
    e = eps(3)
    scorers = [Weighted(Fixed([2.0, -1.0, 0.5]), 2.0), Weighted(Fixed([0.5, None, float("nan")]), 1.0)]
    assert combine(scorers, req(), e) == {e[0]: 2.5, e[1]: 0.0, e[2]: 1.0}
    by = scores_by_scorer(scorers[:1], req(), e)
    assert by["fixed"] == {e[0]: 1.0, e[1]: 0.0, e[2]: 0.5}


def test_registry_builds_every_scorer_and_rejects_unknowns() -> None:
    for name in SCORERS:
        assert build_scorer(name).type_name == name
    with pytest.raises(ValueError, match="unknown scorer"):
        build_scorer("nope")
    with pytest.raises(ValueError):
        build_scorer("queue", {"x": 1})


@pytest.mark.parametrize(
    ("in_flight_tokens", "matched", "expect"),
    [
        ([0, 0, 0], {}, [1.0, 1.0, 1.0]),
        ([0, 0, 0], {0: 4}, [1.0, 1216 / 1280, 1216 / 1280]),  # 1024-token prompt, 64 of it cached on 0
        ([2048, 0, 0], {0: 64}, [1280 / 2304, 1.0, 1.0]),  # all cached on 0, but 2048 tokens queued there
    ],
)
def test_prefill_scorer_weighs_cache_hits_against_queued_work(in_flight_tokens, matched, expect) -> None:
    e = eps(3, in_flight_tokens=in_flight_tokens)
    m = PrefixMatch(64, {e[i]: n for i, n in matched.items()}, prompt_tokens=1024, block_size=16)
    got = PrefillScorer(smoothing=256).score(req(m), e)
    assert [got[x] for x in e] == pytest.approx(expect)
    assert PrefillScorer().score(req(), e) == {}
    with pytest.raises(ValueError):
        PrefillScorer.from_params({"smoothing": 0})
