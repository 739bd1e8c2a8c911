"""Table-driven tests of the load-only policies: what each one picks, and that ties are not broken by
list order."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pytest
from prometheus_client import CollectorRegistry

from router.endpoint import Endpoint
from router.policies.least_request import LeastRequestPolicy
from router.policies.power_of_two import PowerOfTwoPolicy
from router.policies.random_choice import RandomPolicy
from router.policies.round_robin import RoundRobinPolicy
from router.policies.session import SessionPolicy
from router.policy import Policy, PolicyContext, RouteRequest
from router.registry import build_policy


def eps(
    *in_flight: int, weights: Sequence[float] | None = None, waiting: Sequence[int] = ()
) -> list[Endpoint]:
    out = []
    for i, n in enumerate(in_flight):
        ep = Endpoint(url=f"http://pod{i}:8000", model="m", in_flight=n)
        if weights:
            ep.weight = weights[i]
        if waiting:
            ep.waiting = waiting[i]
        out.append(ep)
    return out


def req(session: str | None = None, header: str = "x-session-id") -> RouteRequest:
    headers = {header: session} if session else {}
    return RouteRequest(request_id="r", model="m", path="/v1/completions", body={}, headers=headers)


def picks(policy: Policy, candidates: list[Endpoint], n: int, request: RouteRequest | None = None) -> Counter:
    return Counter(candidates.index(policy.pick(request or req(), candidates).endpoint) for _ in range(n))


# (name, policy, candidates, expected share of 600 picks by candidate index, tolerance)
SHARE_CASES = [
    ("round_robin even", RoundRobinPolicy(seed=1), eps(0, 5, 9), {0: 200, 1: 200, 2: 200}, 0),
    ("random uniform", RandomPolicy(seed=1), eps(0, 0, 0), {0: 200, 1: 200, 2: 200}, 60),
    ("random weighted", RandomPolicy(seed=1), eps(0, 0, weights=[3, 1]), {0: 450, 1: 150}, 60),
    ("least_request min", LeastRequestPolicy(seed=1), eps(4, 1, 3), {1: 600}, 0),
    ("least_request tie random", LeastRequestPolicy(seed=1), eps(2, 1, 1), {1: 300, 2: 300}, 60),
    ("least_request per weight", LeastRequestPolicy(seed=1), eps(4, 3, weights=[4, 1]), {0: 600}, 0),
    ("least_request all idle", LeastRequestPolicy(seed=1), eps(0, 0, 0, 0), {i: 150 for i in range(4)}, 50),
    ("p2c never the busiest", PowerOfTwoPolicy(seed=1), eps(0, 0, 9), {0: 300, 1: 300}, 60),
    ("p2c waiting breaks ties", PowerOfTwoPolicy(seed=1), eps(1, 1, waiting=[5, 0]), {1: 600}, 0),
    ("p2c single", PowerOfTwoPolicy(seed=1), eps(3), {0: 600}, 0),
    ("session no key -> least", SessionPolicy(seed=1), eps(3, 0, 2), {1: 600}, 0),
]


@pytest.mark.parametrize(
    ("name", "policy", "candidates", "expected", "tol"), SHARE_CASES, ids=[c[0] for c in SHARE_CASES]
)
def test_pick_shares(name, policy, candidates, expected, tol):
    got = picks(policy, candidates, 600)
    assert set(got) == set(expected), got
    for i, share in expected.items():
        assert abs(got[i] - share) <= tol, (i, got)


@pytest.mark.parametrize("policy_cls", [RandomPolicy, LeastRequestPolicy, PowerOfTwoPolicy, SessionPolicy])
def test_ties_not_broken_by_list_order(policy_cls):
    """All idle: the first listed endpoint must not take everything, in any order of the list."""
    candidates = eps(0, 0, 0)
    policy = policy_cls(seed=7)
    firsts = Counter(policy.pick(req(), candidates).endpoint.url for _ in range(300))
    reversed_firsts = Counter(policy.pick(req(), candidates[::-1]).endpoint.url for _ in range(300))
    assert len(firsts) == 3 and len(reversed_firsts) == 3
    assert max(firsts.values()) < 150 and max(reversed_firsts.values()) < 150


def test_session_is_sticky_and_fails_over_to_next_on_ring():
    pool = eps(0, 0, 0, 0)
    policy = SessionPolicy(seed=1)
    owner = {f"s{i}": policy.pick(req(f"s{i}"), pool).endpoint for i in range(200)}
    assert len(set(owner.values())) == 4  # keys spread over every pod
    for key, ep in owner.items():
        pool[0].in_flight = 50  # stickiness wins over load
        assert policy.pick(req(key), pool).endpoint is ep
    down = pool[1]
    survivors = [ep for ep in pool if ep is not down]
    for key, ep in owner.items():
        moved_to = policy.pick(req(key), survivors).endpoint
        if ep is not down:
            assert moved_to is ep  # only the down pod's keys move
        assert policy.pick(req(key), survivors).endpoint is moved_to  # and they stay put


def test_session_pod_joining_moves_few_keys():
    pool = eps(0, 0, 0, 0)
    policy = SessionPolicy(vnodes=64)
    keys = [f"user-{i}" for i in range(2000)]
    before = {k: policy.pick(req(k), pool).endpoint for k in keys}
    bigger = [*pool, Endpoint(url="http://pod4:8000", model="m")]
    after = {k: policy.pick(req(k), bigger).endpoint for k in keys}
    moved = [k for k in keys if after[k] is not before[k]]
    assert all(after[k] is bigger[4] for k in moved)  # keys move only to the newcomer
    assert 0.1 < len(moved) / len(keys) < 0.3  # about 1/5 of them


def test_session_header_is_configurable():
    ctx = PolicyContext(model="m", registry=CollectorRegistry(), seed=3)
    policy = build_policy("session", {"header": "X-User", "vnodes": 16}, ctx)
    pool = eps(0, 0, 0)
    first = policy.pick(req("alice", header="x-user"), pool)
    assert first.reason == "sticky"
    assert all(policy.pick(req("alice", header="x-user"), pool).endpoint is first.endpoint for _ in range(20))
    assert policy.pick(req("alice"), pool).reason == "no_session_key"  # default header not read
