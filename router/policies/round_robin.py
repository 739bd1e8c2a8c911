"""round_robin: each request goes to the next candidate in turn.

Reads nothing but the candidate list. The rotation starts at a random offset so that gateway
replicas started together do not all send their first request to the same pod.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from router.endpoint import Endpoint
from router.policies.common import reject_unknown, rng_for
from router.policy import Decision, Policy, PolicyContext, RouteRequest


class RoundRobinPolicy(Policy):
    """Cycles through the candidates; retries (fewer candidates) simply continue the cycle."""

    type_name = "round_robin"

    def __init__(self, *, seed: int | None = None) -> None:
        self._next = rng_for(None, seed).randrange(1 << 16)

    @classmethod
    def from_config(cls, params: Mapping[str, Any], ctx: PolicyContext) -> RoundRobinPolicy:
        reject_unknown(params, {"seed"}, cls.type_name)
        return cls(seed=params.get("seed", ctx.seed))

    def pick(self, request: RouteRequest, candidates: Sequence[Endpoint]) -> Decision:
        i = self._next % len(candidates)
        self._next += 1
        return Decision(candidates[i], "round_robin")
