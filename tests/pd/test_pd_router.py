"""router.pd: version compatibility, candidate sets and the local-vs-disaggregated decision (no I/O)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from prefixindex.tokenizer import WordTokenizer
from router.endpoint import Endpoint
from router.pd import PDRouter, VersionCompatibility, is_pd_pool
from router.policy import Decision, Policy, RouteRequest


def ep(name: str, role: str, version: str = "v1", healthy: bool = True) -> Endpoint:
    return Endpoint(url=f"http://{name}", model="m", role=role, version=version, healthy=healthy)  # type: ignore[arg-type]


class FirstPolicy(Policy):
    """Picks the first candidate and records what it was offered."""

    type_name = "first"

    def __init__(self) -> None:
        self.offered: list[list[Endpoint]] = []

    def pick(self, request: RouteRequest, candidates: Sequence[Endpoint]) -> Decision:
        self.offered.append(list(candidates))
        return Decision(candidates[0], "first")


def request(words: int) -> RouteRequest:
    body = {"model": "m", "prompt": " ".join(f"w{i}" for i in range(words))}
    return RouteRequest("rid", "m", "/v1/completions", body, {})


@pytest.mark.parametrize(
    ("prefill", "decode", "table", "expected"),
    [
        ("v1", "v1", {}, True),
        ("v1", "v2", {}, False),
        ("v2", "v1", {}, False),
        ("v1", "v2", {"v2": ["v1"]}, True),
        ("v2", "v1", {"v2": ["v1"]}, False),  # declared one way only
        ("v0", "v2", {"v2": ["v1"]}, False),
        ("v2", "v2", {"v2": ["v1"]}, True),  # a version always reads its own KV
        ("", "", {}, True),
    ],
)
def test_version_compatibility(prefill: str, decode: str, table: dict, expected: bool) -> None:
    compat = VersionCompatibility.from_map(table)
    assert compat.compatible(ep("p", "prefill", prefill), ep("d", "decode", decode)) is expected


def test_prefill_candidates_are_healthy_compatible_prefill_pods() -> None:
    d = ep("d", "decode", "v2")
    pods = [
        ep("p1", "prefill", "v1"), ep("p2", "prefill", "v2"), ep("p3", "prefill", "v2", healthy=False),
        ep("b", "both", "v2"), ep("d2", "decode", "v2"), ep("p4", "prefill", "v3"), d,
    ]  # fmt: skip
    router = PDRouter(WordTokenizer(), compatibility=VersionCompatibility.from_map({"v2": ["v3"]}))
    assert [e.url for e in router.prefill_candidates(d, pods)] == ["http://p2", "http://p4"]


@pytest.mark.parametrize(
    ("words", "cached", "prompt_tokens", "outcome", "uncached"),
    [
        (100, 0, 0, "local_short", 100),  # the policy predicts nothing: the prompt is counted here
        (300, 0, 0, "disaggregated", 300),
        (300, 0, 300, "disaggregated", 300),
        (300, 256, 300, "local_short", 44),  # mostly cached on the decode pod
        (300, 32, 300, "disaggregated", 268),
    ],
)
def test_plan_by_uncached_tokens(
    words: int, cached: int, prompt_tokens: int, outcome: str, uncached: int
) -> None:
    d = ep("d", "decode")
    p = ep("p", "prefill")
    policy = FirstPolicy()
    router = PDRouter(WordTokenizer(), threshold_tokens=128)
    plan = router.plan(request(words), Decision(d, "x", cached, prompt_tokens), [p, d], policy)
    assert (plan.outcome, plan.uncached_tokens) == (outcome, uncached)
    if outcome == "disaggregated":
        assert plan.prefill is not None and plan.prefill.endpoint is p
        assert policy.offered == [[p]]
    else:
        assert plan.prefill is None and policy.offered == []


def test_plan_without_a_compatible_healthy_prefill_pod_is_local() -> None:
    d = ep("d", "decode", "v2")
    pods = [d, ep("p1", "prefill", "v1"), ep("p2", "prefill", "v2", healthy=False)]
    router = PDRouter(WordTokenizer(), threshold_tokens=0)
    plan = router.plan(request(10), Decision(d, "x"), pods, FirstPolicy())
    assert plan.outcome == "local_no_prefill" and plan.prefill is None


def test_unparseable_prompt_counts_as_short() -> None:
    d = ep("d", "decode")
    req = RouteRequest("rid", "m", "/v1/completions", {"model": "m", "prompt": 5}, {})
    router = PDRouter(WordTokenizer(), threshold_tokens=1)
    plan = router.plan(req, Decision(d, "x"), [d, ep("p", "prefill")], FirstPolicy())
    assert plan.outcome == "local_short"


def test_is_pd_pool_and_settings_checks() -> None:
    assert is_pd_pool([ep("a", "both"), ep("p", "prefill")])
    assert not is_pd_pool([ep("a", "both"), ep("d", "decode")])
    with pytest.raises(ValueError, match="threshold"):
        PDRouter(WordTokenizer(), threshold_tokens=-1)
    with pytest.raises(ValueError, match="timeout"):
        PDRouter(WordTokenizer(), prefill_timeout_s=0)
