"""power_of_two: draw two distinct candidates at random and send to the less loaded one.

Load is the gateway's in-flight count per unit of weight; equal loads are compared on the pod's
scraped queue (`vllm:num_requests_waiting`), then decided at random. Two random choices keep most of
least_request's balance while avoiding herding when several gateways share stale load views.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from router.endpoint import Endpoint
from router.policies.common import gateway_load, reject_unknown, rng_for
from router.policy import Decision, Policy, PolicyContext, RouteRequest


def _load(ep: Endpoint) -> tuple[float, int]:
    return (gateway_load(ep), ep.waiting)


class PowerOfTwoPolicy(Policy):
    """min of two uniform random candidates by (in_flight / weight, waiting), random on a tie."""

    type_name = "power_of_two"

    def __init__(self, *, seed: int | None = None) -> None:
        self._rng = rng_for(None, seed)

    @classmethod
    def from_config(cls, params: Mapping[str, Any], ctx: PolicyContext) -> PowerOfTwoPolicy:
        reject_unknown(params, {"seed"}, cls.type_name)
        return cls(seed=params.get("seed", ctx.seed))

    def pick(self, request: RouteRequest, candidates: Sequence[Endpoint]) -> Decision:
        if len(candidates) == 1:
            return Decision(candidates[0], "power_of_two")
        a, b = self._rng.sample(candidates, 2)
        la, lb = _load(a), _load(b)
        chosen = a if la < lb else b if lb < la else self._rng.choice((a, b))
        return Decision(chosen, "power_of_two")
