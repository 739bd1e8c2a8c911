"""queue: prefer endpoints with less queued and running work, normalised across the candidates.

    load(e)  = max(in_flight, running + waiting) / weight   (gateway's exact count vs last scrape)
    score(e) = (max_load - load(e)) / (max_load - min_load), or 1 for all when every load is equal

`in_flight` is exact for this gateway; `running + waiting` (vllm:num_requests_*) also sees other
gateways' traffic. YAML: `scorers: {queue: 2}`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from router.endpoint import Endpoint
from router.policy import RouteRequest


def endpoint_load(ep: Endpoint) -> float:
    """Requests at the pod, as the gateway best knows it, per unit of weight."""
    load = max(ep.in_flight, ep.running + ep.waiting)
    return load / ep.weight if ep.weight > 0 else float("inf")


class QueueScorer:
    type_name = "queue"

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> QueueScorer:
        if params:
            raise ValueError(f"scorer 'queue' takes no parameters, got {sorted(params)}")
        return cls()

    def score(self, request: RouteRequest, endpoints: Sequence[Endpoint]) -> dict[Endpoint, float]:
        loads = {ep: endpoint_load(ep) for ep in endpoints}
        if not loads:
            return {}
        lo = min(loads.values())
        hi = max(loads.values())
        if hi == lo:
            return dict.fromkeys(loads, 1.0)
        if hi == float("inf"):
            return {ep: 0.0 if v == hi else 1.0 for ep, v in loads.items()}
        span = hi - lo
        return {ep: (hi - v) / span for ep, v in loads.items()}
