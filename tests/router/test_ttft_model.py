"""The TTFT estimator learns a pod's rates online; the ledger accounts in-flight work and slot waits."""

from __future__ import annotations

import random

import pytest

from router.endpoint import PeerLoad
from router.ttft.estimator import RatePrior, TTFTEstimator
from router.ttft.ledger import FULL_EVIDENCE, Attempt, PodLedger, new_ledger


def truth(work: float, running: float, *, rate: float, overhead: float, per_running: float) -> float:
    return overhead + work / rate + per_running * running


def test_prior_answers_before_any_sample() -> None:
    est = TTFTEstimator(RatePrior(prefill_tokens_per_s=10_000, overhead_s=0.02, interference_s=0.001))
    assert est.predict(5_000, 10) == pytest.approx(0.02 + 0.5 + 0.01)
    assert est.prefill_tokens_per_s == pytest.approx(10_000)


@pytest.mark.parametrize("rate", [1_500.0, 40_000.0])
def test_learns_a_pods_own_rate_far_from_the_prior(rate: float) -> None:
    rng = random.Random(1)
    est = TTFTEstimator(RatePrior(prefill_tokens_per_s=16_000))
    for _ in range(300):
        work, running = rng.uniform(100, 8_000), rng.randint(0, 30)
        y = truth(work, running, rate=rate, overhead=0.01, per_running=0.0005)
        est.observe(work, running, y + rng.uniform(-0.002, 0.002))
    assert est.prefill_tokens_per_s == pytest.approx(rate, rel=0.1)
    assert est.interference_s == pytest.approx(0.0005, rel=0.5)
    assert est.predict(4_000, 10) == pytest.approx(truth(4_000, 10, rate=rate, overhead=0.01,
                                                         per_running=0.0005), rel=0.1)


def test_an_outlier_moves_the_fit_by_a_bounded_amount() -> None:
    est = TTFTEstimator(RatePrior(prefill_tokens_per_s=5_000))
    rng = random.Random(2)
    for _ in range(200):
        work = rng.uniform(500, 4_000)
        est.observe(work, 0, work / 5_000 + 0.01)
    before = est.predict(2_000, 0)
    est.observe(2_000, 0, 30.0)  # a request stalled 30 s (GC pause, preemption)
    assert est.predict(2_000, 0) < before * 1.1


def test_an_unexcited_direction_stays_at_its_prior() -> None:
    prior = RatePrior(prefill_tokens_per_s=5_000, interference_s=0.002)
    est = TTFTEstimator(prior)
    for i in range(500):  # never anything running: the interference term is never seen
        work = 500 + (i % 10) * 300
        est.observe(work, 0, work / 5_000 + 0.01)
    assert est.interference_s == pytest.approx(0.002, rel=0.2)


def test_decay_follows_a_pod_that_slows_down() -> None:
    est = TTFTEstimator(RatePrior(prefill_tokens_per_s=10_000))
    for rate in (10_000.0, 2_000.0):
        for i in range(600):
            work = 500 + (i % 8) * 500
            est.observe(work, 0, work / rate + 0.01)
    assert est.prefill_tokens_per_s == pytest.approx(2_000, rel=0.15)


def test_bad_prior_is_rejected() -> None:
    with pytest.raises(ValueError):
        RatePrior(prefill_tokens_per_s=0)
    with pytest.raises(ValueError):
        TTFTEstimator(decay=0)


# ---- ledger -------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def attempt(led: PodLedger, work: int, *, output_tokens: int | None = 100, learn: bool = True) -> Attempt:
    p = led.predict(work, led.clock())
    a = Attempt(led, work, p.queued_tokens, p.running, p.slot_wait_s, p.total, output_tokens, learn)
    led.dispatch(a)
    return a


def test_backlog_counts_prefill_until_first_byte() -> None:
    clock = Clock()
    led = new_ledger(RatePrior(prefill_tokens_per_s=1_000, overhead_s=0, interference_s=0), clock=clock)
    a = attempt(led, 2_000)
    b = attempt(led, 1_000)
    assert b.queued_tokens == 2_000
    assert led.predict(500, clock.now).total == pytest.approx(3.5)
    clock.now += 2.0
    assert led.first_byte(a) == pytest.approx(2.0)
    assert led.first_byte(a) is None  # only the first chunk counts
    assert led.prefill_tokens == 1_000 and len(led.decoding) == 1
    led.finish(b, ok=False)  # failed before its first byte
    led.finish(b, ok=False)  # idempotent
    assert led.prefill_tokens == 0 and led.prefilling == 0


def test_first_bytes_teach_the_pods_rate() -> None:
    clock = Clock()
    led = new_ledger(RatePrior(prefill_tokens_per_s=20_000), clock=clock)
    for i in range(200):
        a = attempt(led, 500 + (i % 7) * 400)
        clock.now += a.work_tokens / 2_500 + 0.005
        led.first_byte(a)
        led.finish(a, ok=True)
    assert led.estimator.prefill_tokens_per_s == pytest.approx(2_500, rel=0.1)


def test_non_learning_attempts_do_not_teach() -> None:
    clock = Clock()
    led = new_ledger(RatePrior(prefill_tokens_per_s=20_000), clock=clock)
    a = attempt(led, 4_000, learn=False)
    clock.now += 10.0
    led.first_byte(a)
    assert led.estimator.samples == 0


def full_pod(slots: int) -> tuple[Clock, PodLedger, list[Attempt]]:
    clock = Clock()
    led = new_ledger(RatePrior(prefill_tokens_per_s=1e9, overhead_s=0, interference_s=0), clock=clock,
                     max_num_seqs=slots)
    led.decode_s_per_token = 0.01
    running = []
    for tokens in (100, 300):  # expected decodes: 1 s and 3 s
        a = attempt(led, 10, output_tokens=tokens)
        led.first_byte(a)
        running.append(a)
    return clock, led, running


def test_no_slot_wait_while_a_slot_is_free() -> None:
    _, led, _ = full_pod(3)
    assert led.slot_wait(led.clock()) == 0.0


def test_a_full_batch_waits_for_the_soonest_finish() -> None:
    clock, led, _ = full_pod(2)  # exactly full: boundary
    clock.now += 0.25
    assert led.slot_wait(clock.now) == pytest.approx(0.75)
    attempt(led, 10)  # waits for that slot; the next one waits for the second finish
    assert led.slot_wait(clock.now) == pytest.approx(2.75)


def test_slot_count_is_learned_only_from_repeated_evidence() -> None:
    led = new_ledger(RatePrior())
    led.reconcile(waiting=5, running=3, own_in_flight_at_scrape=8)
    assert led.slots() is None  # one scrape with a queue: maybe only the token budget
    for _ in range(FULL_EVIDENCE - 1):
        led.reconcile(waiting=2, running=3, own_in_flight_at_scrape=5)
    assert led.slots() == 3
    led.reconcile(waiting=0, running=4, own_in_flight_at_scrape=4)  # more ran at once: not the cap
    assert led.slots() is None


def test_scrape_beyond_own_work_is_other_gateways() -> None:
    led = new_ledger(RatePrior(prefill_tokens_per_s=1_000, overhead_s=0, interference_s=0))
    led.mean_work_tokens = 500
    led.reconcile(waiting=3, running=4, own_in_flight_at_scrape=2)
    assert (led.foreign_waiting, led.foreign_running) == (3, 2)
    assert led.predict(0, 0).queued_tokens == 1_500


def test_other_replicas_load_counts_once_the_larger_view_wins() -> None:
    led = new_ledger(RatePrior(prefill_tokens_per_s=1_000, overhead_s=0, interference_s=0), max_num_seqs=4)
    led.mean_work_tokens = 500
    led.reconcile(waiting=2, running=1, own_in_flight_at_scrape=0)  # scrape: 1000 tokens queued, 1 running
    led.peers = PeerLoad(prefilling=3, decoding=1, prefill_tokens=2_400)  # the replicas know more: it wins
    p = led.predict(0, 0)
    assert (p.queued_tokens, p.running) == (2_400, 1)
    assert p.total == pytest.approx(2.4)
    led.peers = PeerLoad(prefilling=1, decoding=0, prefill_tokens=800)  # less than the scrape: not added
    p = led.predict(0, 0)
    assert (p.queued_tokens, p.running) == (1_000, 1)
    led.peers = None  # Redis gone, summaries expired: the scrape alone, as with one replica
    assert led.predict(0, 0).queued_tokens == 1_000


def test_other_replicas_requests_take_batch_slots() -> None:
    clock, led, _ = full_pod(4)  # 2 own decoding, 4 slots
    led.peers = PeerLoad(prefilling=1, decoding=0)
    assert led.slot_wait(clock.now) == 0.0  # 3 of 4 taken
    led.peers = PeerLoad(prefilling=1, decoding=1)  # exactly full
    assert led.slot_wait(clock.now) == pytest.approx(1.0)
