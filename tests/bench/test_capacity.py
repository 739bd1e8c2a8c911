"""Round robin's capacity from the simulator's cost model, and the content-blind placement estimate."""

from __future__ import annotations

import pytest

from bench.capacity import (
    PodCost,
    RequestWork,
    pod_seconds,
    prefill_scale_for_capacity,
    random_placement,
    round_robin_capacity,
)

# 1000 prefill tokens/s, 10 ms steps, no per-sequence cost, batches of 4, 1000-token step budget.
POD = PodCost(prefill_tps=1000.0, itl_ms=10.0, itl_ms_per_seq=0.0, max_num_seqs=4,
              max_num_batched_tokens=1000)


def test_pod_seconds_prefill_plus_a_share_of_full_batches():
    # 500 uncached tokens: 0.5 s; 8 decode steps + 1 chunk = 9 slots in batches of 4: 2.25 steps of 10 ms
    assert pod_seconds(POD, RequestWork(500, 9)) == pytest.approx(0.5 + 0.0225)
    with_seq = PodCost(1000.0, 10.0, 1.0, 4, 1000)  # 1 ms per sequence: 9 slots, 2.25 steps of 9 ms
    assert pod_seconds(with_seq, RequestWork(500, 9)) == pytest.approx(0.5 + 0.009 + 0.02025)


def test_pod_seconds_long_prompts_are_bound_by_the_step_budget():
    # 4000 tokens need 4 steps of <= 1000 tokens even though they are one sequence
    assert pod_seconds(POD, RequestWork(4000, 1)) == pytest.approx(4.0 + 0.04)


def test_a_fully_cached_prompt_still_computes_its_last_token():
    assert pod_seconds(POD, RequestWork(0, 1)) == pod_seconds(POD, RequestWork(1, 1))


def test_round_robin_capacity_is_pods_over_the_slowest_pods_cost():
    t = pod_seconds(POD, RequestWork(500, 9))
    assert round_robin_capacity([POD, POD], [[RequestWork(500, 9)]] * 2) == pytest.approx(2 / t)
    slow = PodCost(500.0, 10.0, 0.0, 4, 1000)
    t_slow = pod_seconds(slow, RequestWork(500, 9))
    cap = round_robin_capacity([POD, slow], [[RequestWork(500, 9)]] * 2)
    assert cap == pytest.approx(2 / t_slow)  # equal shares: the half-speed pod saturates first
    assert cap < 1 / t + 1 / t_slow


def test_capacity_uses_each_pods_own_requests():
    placed = [[RequestWork(100, 1)], [RequestWork(900, 1), RequestWork(700, 1)]]
    cap = round_robin_capacity([POD, POD], placed)
    assert cap == pytest.approx(2 / pod_seconds(POD, RequestWork(800, 1)))  # pod 2's mean is the worst


def test_prefill_scale_round_trips_to_the_target_capacity():
    placed = [[RequestWork(600, 8), RequestWork(300, 8)], [RequestWork(450, 8)]]
    shape = [PodCost(1.0, 8.0, 0.2, 4, 2048), PodCost(0.5, 8.0, 0.2, 4, 2048)]
    k = prefill_scale_for_capacity(12.0, shape, placed)
    scaled = [PodCost(c.prefill_tps * k, c.itl_ms, c.itl_ms_per_seq, c.max_num_seqs,
                      c.max_num_batched_tokens) for c in shape]
    assert round_robin_capacity(scaled, placed) == pytest.approx(12.0)


def test_prefill_scale_refuses_a_target_decoding_alone_cannot_meet():
    # one pod, one-slot batches, 500 ms steps: a request costs >= 0.5 s whatever the prefill rate
    pod = PodCost(1.0, 500.0, 0.0, 1, 1000)
    placed = [[RequestWork(10, 1)]]
    assert prefill_scale_for_capacity(1.99, [pod], placed) > 0
    with pytest.raises(ValueError, match="decode capacity"):
        prefill_scale_for_capacity(2.0, [pod], placed)  # exactly the decode bound: no time left to prefill


def test_placement_of_unrelated_prompts_hits_nothing():
    prompts = [[i * 1000 + j for j in range(40)] for i in range(20)]
    placed = random_placement(prompts, [4] * 20, [100, 100], 16)
    assert sorted(w.uncached for ws in placed for w in ws) == [40] * 20
    assert all(w.output == 4 for ws in placed for w in ws)


def test_placement_hits_full_blocks_but_never_the_last_token():
    prompt32, prompt33 = list(range(32)), list(range(33))
    one_pod = random_placement([prompt32, prompt32], [1, 1], [100], 16)[0]
    assert [w.uncached for w in one_pod] == [32, 16]  # 31 hittable tokens: one block
    one_pod = random_placement([prompt33, prompt33], [1, 1], [100], 16)[0]
    assert [w.uncached for w in one_pod] == [33, 1]


def test_placement_evicts_least_recently_used_blocks():
    a, b = list(range(33)), list(range(100, 133))
    assert [w.uncached for w in random_placement([a, b, a], [1] * 3, [2], 16)[0]] == [33, 33, 33]
    assert [w.uncached for w in random_placement([a, b, a], [1] * 3, [4], 16)[0]] == [33, 33, 1]


def test_placement_is_seeded_and_spreads_over_the_pods():
    prompts = [[i] * 20 for i in range(200)]
    first = random_placement(prompts, [1] * 200, [10, 10, 10], 16, seed=3)
    assert first == random_placement(prompts, [1] * 200, [10, 10, 10], 16, seed=3)
    assert all(40 < len(ws) < 95 for ws in first)
    assert first != random_placement(prompts, [1] * 200, [10, 10, 10], 16, seed=4)
