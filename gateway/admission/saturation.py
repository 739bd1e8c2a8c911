"""When a pool is saturated: the free request slots of its pods, from signals the gateway already has.

A pod's slots are its concurrency limit (`admission.max_in_flight_per_pod`, else the batch size the
cache_aware policy learned for it, `PodLedger.slots()`, else vLLM's default of 256) plus
`headroom_per_pod`, minus other gateways' work the last scrape saw there. A pod has none while its last
scrape reported KV usage at or above `max_kv_usage`, or while cache_aware predicts a TTFT there above
`max_predicted_ttft_s` (when set). Its free slots are those minus the requests this gateway has in
flight there (`Endpoint.in_flight`, exact). The pool's free slots are the sum over its healthy pods
(all of them in panic mode) minus the requests admitted but not yet sent (charged to no pod yet).
The pool is saturated when that is 0 or less; a pool without pods never is (its requests get their
503 at once instead of waiting). Reads snapshots only: no I/O.
"""

from __future__ import annotations

from gateway.config import Admission
from gateway.pools import Pool
from router.endpoint import Endpoint
from router.policies.predicted_ttft import PredictedTTFTPolicy

DEFAULT_SLOTS = 256  # vLLM's default --max-num-seqs


class Saturation:
    def __init__(self, admission: Admission) -> None:
        self.max_in_flight = admission.max_in_flight_per_pod
        self.headroom = admission.headroom_per_pod
        self.max_kv_usage = admission.max_kv_usage
        self.max_ttft = admission.max_predicted_ttft_s

    def pod_slots(self, pool: Pool, ep: Endpoint) -> int:
        policy = pool.policy
        ledger = policy.ledgers.get(ep) if isinstance(policy, PredictedTTFTPolicy) else None
        limit = self.max_in_flight or (ledger.slots() if ledger is not None else None) or DEFAULT_SLOTS
        limit += self.headroom
        if ep.last_scrape:
            if ep.kv_usage >= self.max_kv_usage:
                return 0
            limit -= max(0, ep.waiting + ep.running - ep.in_flight_at_scrape)  # other gateways' work
        if self.max_ttft is not None and ledger is not None:
            predicted = ledger.predict(ledger.mean_work_tokens, ledger.clock()).total
            if predicted > self.max_ttft:
                return 0
        return max(0, limit)

    def free_pods(self, pool: Pool) -> dict[Endpoint, int]:
        """The pods that can start a request now and their free slots (healthy ones; all in panic)."""
        free = {ep: self.pod_slots(pool, ep) - ep.in_flight for ep in _serving(_eligible(pool))}
        return {ep: n for ep, n in free.items() if n > 0}

    def free_slots(self, pool: Pool, admitted: int) -> int:
        """Requests the pool can take now, given `admitted` requests this gateway let through that
        have not finished."""
        eligible = _eligible(pool)
        if not eligible:
            return 1  # nothing to wait for: the proxy answers 503 (no endpoint) at once
        charged = sum(ep.in_flight for ep in eligible)
        free = sum(max(0, self.pod_slots(pool, ep) - ep.in_flight) for ep in _serving(eligible))
        return free - max(0, admitted - charged)


def _eligible(pool: Pool) -> list[Endpoint]:
    """The pods that take whole requests (not prefill-only)."""
    return [ep for ep in pool.endpoints if ep.role != "prefill"]


def _serving(eligible: list[Endpoint]) -> list[Endpoint]:
    """The healthy ones, or all of them when none is (panic routing)."""
    return [ep for ep in eligible if ep.healthy] or eligible
