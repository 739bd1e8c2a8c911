"""least_request: the candidate with the fewest requests in flight at the gateway, per unit of weight.

Reads `Endpoint.in_flight` (kept exact by the gateway) and `weight`. Ties are broken at random, never
by list order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from router.endpoint import Endpoint
from router.policies.common import gateway_load, pick_min, reject_unknown, rng_for
from router.policy import Decision, Policy, PolicyContext, RouteRequest


class LeastRequestPolicy(Policy):
    """argmin over candidates of in_flight / weight, random among equals."""

    type_name = "least_request"

    def __init__(self, *, seed: int | None = None) -> None:
        self._rng = rng_for(None, seed)

    @classmethod
    def from_config(cls, params: Mapping[str, Any], ctx: PolicyContext) -> LeastRequestPolicy:
        reject_unknown(params, {"seed"}, cls.type_name)
        return cls(seed=params.get("seed", ctx.seed))

    def pick(self, request: RouteRequest, candidates: Sequence[Endpoint]) -> Decision:
        return Decision(pick_min(candidates, gateway_load, self._rng), "least_request")
