"""random: each request goes to a candidate drawn at random, in proportion to the endpoints' weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import accumulate
from typing import Any

from router.endpoint import Endpoint
from router.policies.common import reject_unknown, rng_for
from router.policy import Decision, Policy, PolicyContext, RouteRequest


class RandomPolicy(Policy):
    """P(endpoint) = weight / sum of the candidates' weights (uniform when all weights are equal)."""

    type_name = "random"

    def __init__(self, *, seed: int | None = None) -> None:
        self._rng = rng_for(None, seed)

    @classmethod
    def from_config(cls, params: Mapping[str, Any], ctx: PolicyContext) -> RandomPolicy:
        reject_unknown(params, {"seed"}, cls.type_name)
        return cls(seed=params.get("seed", ctx.seed))

    def pick(self, request: RouteRequest, candidates: Sequence[Endpoint]) -> Decision:
        first = candidates[0].weight
        if all(ep.weight == first for ep in candidates):
            return Decision(self._rng.choice(candidates), "random")
        cum = list(accumulate(max(ep.weight, 0.0) for ep in candidates))
        if cum[-1] <= 0:
            return Decision(self._rng.choice(candidates), "random")
        return Decision(self._rng.choices(candidates, cum_weights=cum)[0], "random")
