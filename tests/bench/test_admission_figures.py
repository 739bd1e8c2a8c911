"""bench/admission.py's hit-rate breakdown as pure functions: prefix misses, prefix-pod copies, the
equal-footing hit rate over the first N answered requests, and the offered-mix overall hit rate."""

from __future__ import annotations

import argparse

import pytest

from bench.admission import (
    HEAVY,
    POD,
    PREFIX_WORDS,
    QUESTION_WORDS,
    SMALL,
    Sent,
    SetupResult,
    equal_footing,
    format_table,
    hit_rate,
    offered_mix_hit_rate,
    offered_shares,
    prefix_copies,
    prefix_misses,
    schedule,
    summarize,
    verdict,
)
from bench.loadgen.client import RequestResult
from bench.loadgen.podmetrics import PodFigures

PROMPT = PREFIX_WORDS + QUESTION_WORDS


def sent(tenant: str, cached: int | None, *, prefix: int = 0, pod: str = "p0", status: int = 200,
         cut: bool = False, prompt: int = PROMPT) -> Sent:
    r = RequestResult(f"{tenant}/0", 0.0, prompt_tokens=prompt, cached_tokens=cached, status=status,
                      endpoint=pod)
    return Sent(tenant, r, cut=cut, prefix=prefix)


def test_prefix_misses_count_cold_and_partial_prefixes_of_answered_requests_only() -> None:
    reqs = [
        sent(HEAVY, 1024),  # the whole prefix (64 blocks) cached: a hit
        sent(HEAVY, 0),  # cold: 1024 prefix tokens prefilled
        sent(HEAVY, 512),  # partial: 512 more
        sent(HEAVY, 0, status=503),  # never answered: not counted
        sent(HEAVY, 0, cut=True),  # cut: not counted
        sent(HEAVY, None),  # no usage from the pod: not counted
    ]
    assert prefix_misses(reqs) == (2, 1024 + 512)


def test_a_prefix_counts_as_hit_when_its_whole_blocks_are_cached() -> None:
    odd = sent(SMALL[0], 1008)
    odd.prefix_tokens = 1020  # 63 whole blocks of 16 = 1008 tokens: all a pod can hold of it
    short = sent(SMALL[0], 992)
    short.prefix_tokens = 1020
    assert prefix_misses([odd]) == (0, 0)
    assert prefix_misses([short]) == (1, 28)
    assert prefix_misses([odd], block_size=4) == (1, 12)


def test_prefix_copies_are_distinct_prefix_pod_pairs_of_answered_requests() -> None:
    reqs = [sent(HEAVY, 0, prefix=0, pod="a"), sent(HEAVY, 1024, prefix=0, pod="a"),
            sent(HEAVY, 0, prefix=0, pod="b"), sent(HEAVY, 0, prefix=1, pod="a"),
            sent(HEAVY, 0, prefix=2, pod="c", status=503)]
    assert prefix_copies(reqs) == 3


def result(setup: str, small: list[list[int]], heavy: list[list[int]]) -> SetupResult:
    return SetupResult(
        setup=setup, small_ttft_p50=1.0, small_ttft_p90=2.0, small_wait_p90=2.0,
        small_admission_wait_p90=None, small_done=len(small), small_cut=0, heavy_done_per_s=1.0,
        heavy_refused=0, output_tps=100.0,
        hit_rate=0.9, small_hit_rate=hit_rate(small), heavy_hit_rate=hit_rate(heavy), busy_while_queued=1.0,
        idle_ttft=0.04, span_s=50.0, answered={"small": small, "heavy": heavy},
    )


def test_equal_footing_takes_the_first_n_answered_of_each_class_n_the_fewest_any_setup_answered() -> None:
    # `none` answered 2 small and 4 heavy, `fair` 3 small and 3 heavy: N is 2 small, 3 heavy.
    none = result("none", [[100, 0], [100, 50]], [[100, 0], [100, 90], [100, 90], [100, 90]])
    fair = result("fair", [[100, 0], [100, 80], [100, 80]], [[100, 0], [100, 0], [100, 90]])
    equal_footing([none, fair])
    assert none.equal_n == fair.equal_n == {"small": 2, "heavy": 3}
    assert none.equal_hit == {"small": pytest.approx(0.25), "heavy": pytest.approx(0.6)}
    assert fair.equal_hit == {"small": pytest.approx(0.4), "heavy": pytest.approx(0.3)}
    # over all answered requests none's heavy rate is higher still: its extra request is a hit
    assert none.heavy_hit_rate == pytest.approx(0.675)


def test_offered_shares_count_the_schedules_prompt_tokens_per_class() -> None:
    args = argparse.Namespace(seed=0, pods=1, heavy_load=3.0, small_rate=0.5, duration=10.0)
    plan = schedule(args)
    shares = offered_shares(plan)
    heavy = sum(1 for _, t, _ in plan if t == HEAVY)
    assert shares["heavy"] == pytest.approx(heavy / len(plan))  # every prompt is PROMPT tokens
    assert shares["heavy"] + shares["small"] == pytest.approx(1.0)
    assert 0 < shares["small"] < shares["heavy"]


def test_offered_mix_weights_the_class_hit_rates_by_offered_share_not_by_the_mix_served() -> None:
    # none served mostly heavy requests (high reuse), fair many more small ones: the pods' overall
    # counter favours none, the offered mix compares the classes' rates on the same weights.
    none = result("none", [[100, 50]], [[100, 93]] * 50)
    fair = result("fair", [[100, 80]] * 10, [[100, 92]] * 40)
    shares = {"small": 0.1, "heavy": 0.9}
    assert offered_mix_hit_rate(none, shares) == pytest.approx(0.1 * 0.5 + 0.9 * 0.93)
    assert offered_mix_hit_rate(fair, shares) == pytest.approx(0.1 * 0.8 + 0.9 * 0.92)
    assert offered_mix_hit_rate(fair, shares) > offered_mix_hit_rate(none, shares)
    assert offered_mix_hit_rate(result("x", [], [[100, 90]]), shares) is None  # no small rate to weigh
    assert offered_mix_hit_rate(none, {}) is None


def test_table_and_verdict_report_the_breakdown() -> None:
    none = result("none", [[100, 50]], [[100, 93]] * 5)
    fair = result("fair", [[100, 80]] * 3, [[100, 92]] * 4)
    for r, misses in ((none, 7), (fair, 8)):
        r.prefix_misses, r.prefix_miss_tokens = {"small": 1, "heavy": misses}, {"small": 1024, "heavy": 9000}
        r.prefix_copies, r.evicted_blocks = {"small": 1, "heavy": 12}, 0.0
        r.offered_mix_hit_rate = offered_mix_hit_rate(r, {"small": 0.1, "heavy": 0.9})
    equal_footing([none, fair])
    table = format_table([none, fair])
    assert "| equal-footing hit small / heavy (N) | offered-mix hit |" in table.splitlines()[0]
    assert "| 1 / 8 | 1024 / 9000 | 0 | - | 80.0% / 92.0% (1 / 4) | 90.8% |" in table.splitlines()[-1]
    lines = "\n".join(verdict([none, fair]))
    assert "heavy prefix misses: fair 8 (9000 prefix tokens prefilled, 12 prefix-pod pairs) vs none 7" \
        in lines
    assert "evicted KV blocks: fair 0 vs none 0" in lines
    assert "prefill time" not in lines  # not measured here
    none.prefill_s, fair.prefill_s = 2.0, 2.5  # 0.5 s more: 8 slots x 20 steps of 25 ms over 50 s
    assert "pods' prefill time: fair 2.50 s vs none 2.00 s (with full batches, ~-3.2 output tok/s for fair)" \
        in "\n".join(verdict([none, fair]))
    assert "heavy tenants' equal-footing hit rate (first 4 answered): fair 92.0% vs none 93.0%" in lines
    assert "offered-mix hit rate: fair 90.8% vs none 88.7% (target: no lower)" in lines


def test_summarize_counts_a_request_cut_mid_stream_as_not_done() -> None:
    # a request cut while streaming has status 200 and no error: it still is not a completed one
    reqs = [sent(HEAVY, 1024), sent(HEAVY, 1024, cut=True), sent(SMALL[0], 0), sent(SMALL[1], 0, cut=True)]
    for s in reqs:
        s.result.ttft = 0.1
    pods = PodFigures(10_000.0, 6_000.0, 10_000.0, 500.0, 0.0, None, None, [])
    r = summarize("fair", reqs, 10.0, 0.05, pods, [1.0], None)
    assert r.heavy_done_per_s == pytest.approx(0.1) and r.small_done == 1 and r.small_cut == 1
    assert r.answered == {"small": [[PROMPT, 0]], "heavy": [[PROMPT, 1024]]}
    assert r.prefill_s == pytest.approx(4_000.0 / POD["prefill_tps"])
    assert r.evicted_blocks is None
