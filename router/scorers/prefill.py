"""prefill: prefer the pod where this request's prefill would start and finish soonest.

    cost(e)  = in_flight_tokens(e) + uncached(e)         uncached(e) = prompt_tokens - cached_tokens(e)
    score(e) = (min_cost + C) / (cost(e) + C)             C = `smoothing` tokens (default 256)

`in_flight_tokens` is the uncached prompt work the gateway has sent the pod and not seen finish;
`cached_tokens(e)` comes from the prefix match in `request.state.prefix` (so this scorer weighs a cache
hit against the queue in the same unit, tokens, as Dynamo's cost model does). The cheapest pod scores 1; a
pod with twice the work scores about 0.5. Unscored when the request has no prefix match.
YAML: `scorers: {prefill: 2}`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from router.endpoint import Endpoint
from router.policy import RouteRequest


class PrefillScorer:
    type_name = "prefill"

    def __init__(self, smoothing: float = 256.0) -> None:
        if smoothing <= 0:
            raise ValueError("smoothing must be positive")
        self.smoothing = smoothing

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> PrefillScorer:
        unknown = set(params) - {"smoothing"}
        if unknown:
            raise ValueError(f"scorer 'prefill' does not take {sorted(unknown)}")
        return cls(float(params.get("smoothing", 256.0)))

    def score(self, request: RouteRequest, endpoints: Sequence[Endpoint]) -> dict[Endpoint, float]:
        m = request.state.prefix
        if m is None or not endpoints:
            return {}
        get = m.matched.get
        costs = {
            ep: max(0, ep.in_flight_tokens) + max(0, m.prompt_tokens - get(ep, 0) * m.block_size)
            for ep in endpoints
        }
        c = self.smoothing
        best = min(costs.values()) + c
        return {ep: best / (cost + c) for ep, cost in costs.items()}
