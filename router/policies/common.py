"""Helpers shared by the policies: a seeded RNG, load per weight, random tie-breaking, parameter checks.

Ties are never broken by list order: when quiet, every endpoint ties, and list order would pile every
new request on the first pod (the hot-spotting users report of several peers).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from router.endpoint import Endpoint
from router.policy import PolicyContext


def rng_for(ctx: PolicyContext | None, seed: int | None = None) -> random.Random:
    """A private RNG: seeded from `seed`, else the context's seed, else the OS (cache_aware uses it too)."""
    if seed is None and ctx is not None:
        seed = ctx.seed
    return random.Random(seed)


def gateway_load(endpoint: Endpoint) -> float:
    """Requests in flight at the gateway per unit of weight (the load the gateway knows exactly)."""
    return endpoint.in_flight / endpoint.weight if endpoint.weight > 0 else float("inf")


def pick_min(
    candidates: Sequence[Endpoint], key: Callable[[Endpoint], float], rng: random.Random
) -> Endpoint:
    """The candidate with the lowest `key`, ties broken uniformly at random."""
    best: list[Endpoint] = []
    best_key = float("inf")
    for ep in candidates:
        k = key(ep)
        if k < best_key:
            best_key = k
            best = [ep]
        elif k == best_key:
            best.append(ep)
    if not best:  # every key is +inf (zero weights): any candidate will do
        best = list(candidates)
    return best[0] if len(best) == 1 else rng.choice(best)


def reject_unknown(params: Mapping[str, Any], allowed: set[str], policy: str) -> None:
    """Raise ValueError naming the parameters `policy` does not take."""
    unknown = set(params) - allowed
    if unknown:
        raise ValueError(f"policy {policy!r} does not take parameters {sorted(unknown)}")
