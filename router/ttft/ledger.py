"""Per-pod live accounting of the work the gateway has sent, and the TTFT it predicts from it.

The gateway's own bookkeeping is the primary load signal: it is exact for this gateway and free (no
request to the pod). Each attempt moves through the ledger as

    dispatch   its uncached prompt tokens join the pod's prefill backlog
    first byte they leave it; the request now decodes (holds one of the pod's batch slots); the TTFT
               seen is a sample for the pod's TTFTEstimator
    finish     the slot frees; the decode time seen teaches the pod's seconds per output token

Scraped `vllm:num_requests_waiting` / `running` reconcile it slowly: what the pod reports beyond what
this gateway had in flight at the scrape is other gateways' work, counted as queued prefill (waiting, at
this pod's mean prompt size) and as running decodes. Replicas sharing their load through Redis
(router/replicas) say exactly what they have there (`peers`, a PeerLoad, fresh within a second): each
foreign term is then the larger of the two views, so the same work is never counted twice and the
fresher view wins as soon as it shows more.

A pod whose batch is full makes a new request wait for a slot: the soonest expected finish among the
requests decoding there, the k-th soonest when k-1 requests already wait for one. The batch size is
`max_num_seqs` when configured, else learned: the most requests seen running at once, once scrapes have
found the pod at that peak with requests waiting `FULL_EVIDENCE` times (a queue that only waits for the
token budget must not pass for a full batch).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from router.endpoint import Endpoint, PeerLoad
from router.ttft.estimator import RatePrior, TTFTEstimator

Clock = Callable[[], float]

_EWMA = 0.1  # weight of a new decode-time sample
FULL_EVIDENCE = 3  # scrapes at the running peak with a queue before the peak counts as the batch size


@dataclass(slots=True, eq=False)
class Attempt:
    """One attempt on one pod as the ledger tracks it (identity is the object)."""

    pod: PodLedger
    work_tokens: int  # uncached prompt tokens this attempt prefills there
    queued_tokens: float  # prefill work ahead of it at dispatch
    running: float  # requests decoding there at dispatch
    slot_wait_s: float  # predicted wait for a batch slot at dispatch
    predicted_s: float  # predicted TTFT at dispatch
    output_tokens: int | None  # max_tokens asked for, if any
    learn: bool  # a streamed answer whose first byte is the first token (not P/D, not a batch)
    dispatched: float = 0.0
    first_byte: float = 0.0
    done: bool = False


@dataclass(slots=True)
class Prediction:
    """The model's terms for one request on one pod, in seconds (`total` is what ranks pods)."""

    total: float
    slot_wait_s: float
    queued_tokens: float
    running: float


@dataclass(slots=True, eq=False)
class PodLedger:
    """What one pod is doing, as far as this gateway knows, and its learned TTFT model."""

    estimator: TTFTEstimator
    clock: Clock = time.perf_counter
    max_num_seqs: int | None = None  # configured batch size; None: learned
    decode_s_per_token: float = 0.01  # prior: seconds per requested output token
    prefill_tokens: int = 0  # own uncached tokens dispatched and awaiting their first byte
    prefilling: int = 0
    decoding: dict[Attempt, None] = field(default_factory=dict)  # own attempts past their first byte
    peak_running: int = 0  # most requests seen running at once (scraped, or own decoding)
    full_seen: int = 0  # scrapes at that peak with requests waiting
    decode_mean_s: float = 0.0  # EWMA of decode durations (for requests without max_tokens)
    mean_work_tokens: float = 0.0  # EWMA of own attempts' uncached tokens (prices foreign waiting)
    foreign_waiting: float = 0.0  # reconciled from the last scrape
    foreign_running: float = 0.0
    reconciled_at: float = 0.0  # Endpoint.last_scrape of the scrape last reconciled
    peers: PeerLoad | None = None  # other replicas' work there (the policy copies Endpoint.peer_load)

    # ---- prediction ---------------------------------------------------------------------------

    def slots(self) -> int | None:
        if self.max_num_seqs:
            return self.max_num_seqs
        return self.peak_running if self.full_seen >= FULL_EVIDENCE else None

    def foreign_queued_tokens(self) -> float:
        scraped = self.foreign_waiting * self.mean_work_tokens
        peers = self.peers
        return scraped if peers is None else max(scraped, peers.prefill_tokens)

    def foreign_decoding(self) -> float:
        peers = self.peers
        return self.foreign_running if peers is None else max(self.foreign_running, peers.decoding)

    def predict(self, work_tokens: float, now: float) -> Prediction:
        queued = self.prefill_tokens + self.foreign_queued_tokens()
        running = len(self.decoding) + self.foreign_decoding()
        wait = self.slot_wait(now)
        total = wait + self.estimator.predict(queued + work_tokens, running)
        return Prediction(total, wait, queued, running)

    def slot_wait(self, now: float) -> float:
        """Expected wait for a batch slot: 0 while the pod has a free one."""
        slots = self.slots()
        if slots is None:
            return 0.0
        foreign = self.foreign_running
        if self.peers is not None:
            foreign = max(foreign, self.peers.prefilling + self.peers.decoding)
        occupied = self.prefilling + len(self.decoding) + foreign
        if occupied < slots:
            return 0.0
        ahead = int(occupied - slots)  # requests already waiting for a slot
        remaining = sorted(max(0.0, self._expected_decode(a) - (now - a.first_byte)) for a in self.decoding)
        if not remaining:
            return self.decode_mean_s * (1 + ahead // slots)
        rounds, k = divmod(ahead, len(remaining))
        return remaining[k] + rounds * max(self.decode_mean_s, remaining[-1])

    def _expected_decode(self, a: Attempt) -> float:
        if a.output_tokens:
            return a.output_tokens * self.decode_s_per_token
        return self.decode_mean_s

    # ---- accounting ---------------------------------------------------------------------------

    def dispatch(self, attempt: Attempt) -> None:
        attempt.dispatched = self.clock()
        self.prefill_tokens += attempt.work_tokens
        self.prefilling += 1
        self.mean_work_tokens += _EWMA * (attempt.work_tokens - self.mean_work_tokens)

    def first_byte(self, attempt: Attempt) -> float | None:
        """The attempt's first byte arrived; returns the TTFT seen (None when already past it)."""
        if attempt.first_byte or attempt.done:
            return None
        now = self.clock()
        attempt.first_byte = now
        self._end_prefill(attempt)
        self.decoding[attempt] = None
        if len(self.decoding) > self.peak_running:
            self.peak_running = len(self.decoding)
        ttft = now - attempt.dispatched
        if attempt.learn:
            work = attempt.queued_tokens + attempt.work_tokens
            self.estimator.observe(work, attempt.running, max(0.0, ttft - attempt.slot_wait_s))
        return ttft

    def finish(self, attempt: Attempt, ok: bool) -> None:
        """The attempt ended, any way at all (idempotent)."""
        if attempt.done:
            return
        attempt.done = True
        if not attempt.first_byte:
            self._end_prefill(attempt)
            return
        self.decoding.pop(attempt, None)
        if ok and attempt.learn:
            decode = self.clock() - attempt.first_byte
            self.decode_mean_s += _EWMA * (decode - self.decode_mean_s) if self.decode_mean_s else decode
            if attempt.output_tokens:
                spt = decode / attempt.output_tokens
                self.decode_s_per_token += _EWMA * (spt - self.decode_s_per_token)

    def _end_prefill(self, attempt: Attempt) -> None:
        self.prefill_tokens -= attempt.work_tokens
        self.prefilling -= 1

    def reconcile_endpoint(self, ep: Endpoint) -> None:
        """Reconcile with the endpoint's latest scrape (once per scrape)."""
        self.reconciled_at = ep.last_scrape
        self.reconcile(ep.waiting, ep.running, ep.in_flight_at_scrape)

    def reconcile(self, waiting: int, running: int, own_in_flight_at_scrape: int) -> None:
        """A scrape reported `waiting` and `running` while this gateway had `own_in_flight_at_scrape`
        requests there: the rest is other gateways' work."""
        foreign = max(0, waiting + running - own_in_flight_at_scrape)
        self.foreign_waiting = float(min(foreign, waiting))
        self.foreign_running = float(foreign - self.foreign_waiting)
        if running > self.peak_running:
            self.peak_running, self.full_seen = running, 0
        if waiting > 0 and running == self.peak_running:
            self.full_seen += 1


def new_ledger(prior: RatePrior, *, clock: Clock = time.perf_counter, max_num_seqs: int | None = None,
               decay: float = 0.995) -> PodLedger:
    return PodLedger(TTFTEstimator(prior, decay=decay), clock=clock, max_num_seqs=max_num_seqs)
