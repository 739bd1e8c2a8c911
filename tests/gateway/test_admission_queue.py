"""The admission queue and rate limits on an injected clock: weights, cost, priorities with aging,
FIFO, deadlines at their exact boundary, removal; token buckets at their exact boundary; config checks."""

from __future__ import annotations

import pytest

from gateway.admission.fair_queue import Entry, FairQueue
from gateway.admission.rate_limit import RateLimit
from gateway.admission.saturation import Saturation
from gateway.config import GatewayConfig, config_from_mapping
from gateway.pools import Pool
from router.endpoint import Endpoint
from router.policies.least_request import LeastRequestPolicy

INF = float("inf")


def queue_with(flows: dict[str, tuple[float, int]], **kw) -> FairQueue:
    q = FairQueue(**kw)
    for name, (weight, priority) in flows.items():
        q.flow(name, weight, priority)
    return q


def entry(
    flow: str,
    cost: float = 100.0,
    *,
    at: float = 0.0,
    deadline: float = INF,
    priority: int = 0,
    nbytes: int = 10,
) -> Entry:
    return Entry(flow, priority, cost, nbytes, at, deadline)


def drain(q: FairQueue, n: int, now: float = 0.0) -> list[str]:
    out = []
    for _ in range(n):
        e = q.pop(now)
        assert e is not None
        out.append(e.flow)
    return out


def test_backlogged_flows_share_dispatch_by_weight_within_10_percent_over_a_long_run() -> None:
    q = queue_with({"a": (1.0, 0), "b": (2.0, 0), "c": (5.0, 0)})
    for i in range(3000):
        for name in "abc":
            q.push(entry(name, cost=100 + (i * 37) % 200, at=i))  # varied costs, same mix per flow
    served: dict[str, float] = {"a": 0.0, "b": 0.0, "c": 0.0}
    for _ in range(4000):  # every flow still backlogged throughout
        e = q.pop(5000.0)
        assert e is not None
        served[e.flow] += e.cost
    total = sum(served.values())
    for name, weight in (("a", 1.0), ("b", 2.0), ("c", 5.0)):
        share = served[name] / total
        assert share == pytest.approx(weight / 8.0, rel=0.10), (name, served)


def test_fairness_is_on_cost_a_tenant_of_huge_prompts_gets_fewer_requests_through() -> None:
    q = queue_with({"huge": (1.0, 0), "small": (1.0, 0)})
    for i in range(400):
        q.push(entry("huge", cost=4000, at=i))
        q.push(entry("small", cost=500, at=i))
    order = drain(q, 360)
    assert order.count("small") == pytest.approx(8 * order.count("huge"), rel=0.10)


def test_a_flow_that_idled_banks_no_credit() -> None:
    q = queue_with({"a": (1.0, 0), "b": (1.0, 0)})
    for i in range(100):
        q.push(entry("a", at=i))
    drain(q, 50)  # a alone: its counter runs far ahead of idle b
    for i in range(10):
        q.push(entry("b", at=100 + i))
    order = drain(q, 20)
    # b joins at a's level: the two alternate instead of b taking 10 in a row
    assert order.count("b") == 10 and order[:6].count("b") == 3


def test_direct_dispatch_is_charged_too() -> None:
    q = queue_with({"a": (1.0, 0), "b": (1.0, 0)})
    q.push(entry("b"))
    q.charge("a", 1000.0)  # a was served directly while b waited
    q.push(entry("a"))
    q.push(entry("b"))
    assert drain(q, 3) == ["b", "b", "a"]


def test_higher_priority_first_and_aging_keeps_the_low_band_moving() -> None:
    """A busy high band (a new request every second, each served at once) and one low request: the low
    one ranks 0 + waited/aging_s, the high band's oldest 1 + 0, so it goes once it has waited aging_s."""
    q = queue_with({"hi": (1.0, 1), "lo": (1.0, 0)}, aging_s=10.0)
    q.push(entry("lo", at=0.0, priority=0))
    served_at = None
    for t in range(1, 30):
        q.push(entry("hi", at=float(t), priority=1))
        if q.pop(float(t)).flow == "lo":
            served_at = t
            break
    assert served_at == 11  # at t=10 the ranks tie (1.0 each) and priority wins the tie
    assert q.pop(11.0).flow == "hi"


def test_without_aging_priority_is_strict() -> None:
    q = queue_with({"hi": (1.0, 1), "lo": (1.0, 0)}, aging_s=0.0)
    q.push(entry("lo", at=0.0))
    q.push(entry("hi", at=1000.0, priority=1))
    assert q.pop(1e6).flow == "hi"


def test_aging_boundary_equal_rank_goes_to_the_higher_band() -> None:
    q = queue_with({"hi": (1.0, 1), "lo": (1.0, 0)}, aging_s=10.0)
    q.push(entry("lo", at=0.0))
    q.push(entry("hi", at=10.0, priority=1))
    assert q.pop(10.0).flow == "hi"  # lo ranks 0 + 10/10 = 1.0, hi 1 + 0: a tie keeps priority
    q.push(entry("hi", at=10.5, priority=1))
    assert q.pop(10.5).flow == "lo"  # lo 1.05 > hi 1.0: just past the tie, lo goes


def test_fifo_order_ignores_tenants_weights_and_priorities() -> None:
    q = queue_with({"a": (1.0, 0), "b": (9.0, 5)}, order="fifo")
    q.push(entry("a", at=0))
    q.push(entry("b", at=1, priority=5))
    q.push(entry("a", at=2))
    assert drain(q, 3) == ["a", "b", "a"]


def test_deadline_boundary_expired_when_its_time_has_come_not_before() -> None:
    q = queue_with({"a": (1.0, 0)})
    e = entry("a", at=0.0, deadline=2.0)
    q.push(e)
    assert q.expired(1.999999) == []
    assert len(q) == 1
    assert q.expired(2.0) == [e]
    assert len(q) == 0 and q.nbytes == 0 and q.pop(2.0) is None


def test_remove_updates_counts_once() -> None:
    q = queue_with({"a": (1.0, 0), "b": (1.0, 0)})
    e1, e2 = entry("a", nbytes=100), entry("b", nbytes=50)
    q.push(e1)
    q.push(e2)
    assert q.remove(e1) and not q.remove(e1)
    assert (len(q), q.nbytes, q.flows["a"].nbytes) == (1, 50, 0)
    assert q.pop(0.0) is e2 and q.pop(0.0) is None


def test_rate_limit_exact_boundary_and_retry_after() -> None:
    rl = RateLimit.of(3, None, now=0.0)
    assert rl is not None
    assert [rl.take(0, 0.0) for _ in range(3)] == [None, None, None]  # exactly the allowance passes
    kind, wait = rl.take(0, 0.0)
    assert kind == "requests" and wait == pytest.approx(20.0)  # one request refills in 60/3 s
    assert rl.take(0, 19.9) is not None
    assert rl.take(0, 20.0) is None


def test_token_rate_limit_counts_tokens_and_takes_nothing_when_refused() -> None:
    rl = RateLimit.of(100, 1000, now=0.0)
    assert rl.take(1000, 0.0) is None
    kind, wait = rl.take(1, 0.0)
    assert kind == "tokens" and wait == pytest.approx(0.06)
    assert rl.requests.level == 99  # the refused request took no request either
    big = RateLimit.of(None, 1000, now=0.0)
    assert big.take(5000, 0.0) is None  # larger than a minute's allowance: passes on a full bucket


def config(admission: dict) -> GatewayConfig:
    return config_from_mapping(
        {"pools": {"m": {"endpoints": [{"url": "http://127.0.0.1:1"}]}}, "admission": admission}
    )


@pytest.mark.parametrize(
    "admission, message",
    [
        ({"tenants": [{"name": "a"}, {"name": "a"}]}, "repeated"),
        ({"tenants": [{"name": "a", "weight": 0}]}, "weight"),
        ({"tenants": [{"name": "a", "api_keys": ["k"]}, {"name": "b", "api_keys": ["k"]}]}, "two tenants"),
        (
            {"tenants": [{"name": "a", "requests_per_minute": -1}]},
            r"tenants\[0\]\.requests_per_minute: must be >= 0",
        ),
        (
            {"tenants": [{"name": "a", "models": [{"name": "m", "max_prompt_tokens": -1}]}]},
            "max_prompt_tokens",
        ),
        ({"tenants": [{"name": "a", "colour": "red"}]}, "unknown keys"),
        ({"order": "lifo"}, "not one of"),
        ({"max_kv_usage": 0}, "max_kv_usage"),
        ({"max_in_flight_per_pod": 0}, "max_in_flight_per_pod"),
    ],
)
def test_bad_admission_config_is_refused_naming_the_key(admission, message) -> None:
    with pytest.raises(ValueError, match=message):
        config(admission)


def test_no_admission_section_means_none() -> None:
    cfg = config_from_mapping({"pools": {"m": {"endpoints": [{"url": "http://127.0.0.1:1"}]}}})
    assert cfg.admission is None


def saturation_pool(n: int, **adm) -> tuple[Saturation, Pool]:
    cfg = config(adm)
    eps = [Endpoint(url=f"http://127.0.0.1:{9000 + i}", model="m") for i in range(n)]
    return Saturation(cfg.admission), Pool("m", "least_request", LeastRequestPolicy(), eps)


def test_free_slots_count_limit_plus_headroom_minus_in_flight_and_requests_not_yet_sent() -> None:
    sat, pool = saturation_pool(2, max_in_flight_per_pod=2, headroom_per_pod=1)
    a, b = pool.endpoints
    assert sat.free_slots(pool, admitted=0) == 6
    a.in_flight, b.in_flight = 3, 2  # a is full (3 = 2 + headroom); b has one left
    assert sat.free_slots(pool, admitted=5) == 1
    assert sat.free_slots(pool, admitted=6) == 0  # one admitted, not yet charged to a pod: saturated


def test_scraped_kv_usage_and_other_gateways_work_take_slots_away() -> None:
    sat, pool = saturation_pool(1, max_in_flight_per_pod=4, headroom_per_pod=0, max_kv_usage=0.9)
    (ep,) = pool.endpoints
    ep.last_scrape, ep.kv_usage = 1.0, 0.9  # exactly at the threshold: full
    assert sat.free_slots(pool, 0) == 0
    ep.kv_usage = 0.89
    ep.running, ep.waiting, ep.in_flight_at_scrape = 3, 0, 1  # 2 requests from another gateway
    assert sat.free_slots(pool, 0) == 2


def test_unhealthy_pods_give_no_slots_unless_none_is_healthy_and_an_empty_pool_is_never_saturated() -> None:
    sat, pool = saturation_pool(2, max_in_flight_per_pod=1, headroom_per_pod=0)
    pool.endpoints[0].healthy = False
    assert sat.free_slots(pool, 0) == 1
    pool.endpoints[1].healthy = False
    assert sat.free_slots(pool, 0) == 2  # panic: the proxy routes over all of them
    sat2, empty = saturation_pool(0)
    assert sat2.free_slots(empty, 0) == 1


def test_the_learned_batch_size_of_cache_aware_is_the_limit() -> None:
    from router.policies.predicted_ttft import PredictedTTFTPolicy
    from router.prefix_cache import PrefixCache

    cfg = config({"headroom_per_pod": 0})
    ep = Endpoint(url="http://127.0.0.1:9000", model="m")
    policy = PredictedTTFTPolicy(PrefixCache("m"), max_num_seqs=8)
    pool = Pool("m", "cache_aware", policy, [ep])
    sat = Saturation(cfg.admission)
    assert sat.free_slots(pool, 0) == 256  # nothing known yet: vLLM's default
    policy.ledger(ep)
    assert sat.free_slots(pool, 0) == 8


# ---- cache affinity within a flow ----


def scored(q: FairQueue, flow: str, scores: list[float]) -> list[Entry]:
    out = []
    for i, s in enumerate(scores):
        e = entry(flow, at=float(i))
        e.route = s  # the score `prefer` reads back
        q.push(e)
        out.append(e)
    return out


def by_route(e: Entry) -> float:
    return e.route


def test_a_freed_slot_takes_the_flow_s_entry_with_the_most_cached_within_the_window() -> None:
    q = queue_with({"a": (1.0, 0)})
    es = scored(q, "a", [0.0, 0.0, 500.0, 900.0, 2000.0])
    assert q.pop(0.0, by_route, window=4) is es[3]  # es[4] scores best but lies outside the window
    assert q.pop(0.0, by_route, window=4) is es[4]  # now inside it
    assert q.pop(0.0, by_route, window=4) is es[2]
    assert q.pop(0.0, by_route, window=4) is es[0]


def test_equal_scores_go_oldest_first_and_window_1_is_strict_arrival_order() -> None:
    q = queue_with({"a": (1.0, 0)})
    es = scored(q, "a", [5.0, 5.0, 9.0])
    assert q.pop(0.0, by_route, window=1) is es[0]
    assert q.pop(0.0, by_route, window=8) is es[2]
    assert q.pop(0.0, by_route, window=8) is es[1]


def test_affinity_never_changes_which_flow_goes_next() -> None:
    q = queue_with({"a": (1.0, 0), "b": (1.0, 0)})
    scored(q, "a", [0.0, 0.0])
    scored(q, "b", [0.0, 0.0])
    q.flows["b"].counter = 50.0  # b has been served more: a goes next, however b's entries score
    q.flows["b"].entries[1].route = 1e9
    e = q.pop(0.0, by_route, window=8)
    assert e is not None and e.flow == "a"


def test_an_entry_is_passed_over_at_most_window_times() -> None:
    window = 3
    q = queue_with({"a": (1.0, 0)})
    (cold,) = scored(q, "a", [0.0])
    passes = 0
    while True:
        scored(q, "a", [100.0])  # always a warmer request behind it
        if q.pop(0.0, by_route, window=window) is cold:
            break
        passes += 1
        assert passes <= window
    assert passes == window
