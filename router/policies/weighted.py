"""weighted: llm-d's rule. A weighted sum of scorers, with a balance threshold on prefix affinity.

Per request (prompt and block keys read once by the pool's PrefixCache, kept in `request.state`):
  1. match the prompt's chained block keys against the prefix cache: per pod, leading blocks held;
  2. balance: a pod whose load (queue.endpoint_load) exceeds the lightest candidate's by more than
     `balance_abs` requests and `balance_rel` times stops attracting by prefix (its prefix score is 0),
     so a prefix hot enough to saturate one pod spreads to a second one, which then learns it too;
  3. score = sum of weight x scorer in [0,1] (prefix, queue, kv_usage by default; see router/scorers);
  4. the best score wins; ties go to the least-loaded, then uniformly at random, never to list order.
Decision reasons: "prefix_hit" (the chosen pod holds part of the prompt), "balance" (the prompt's best
holder was skipped as overloaded), "tie" (a random choice among equals), "load" (no prefix anywhere).

The policy only ranks: the index, its modes, KV events and their lifecycle belong to the PrefixCache
(router/prefix_cache.py), which takes its parameters (`index`, `block_size`, ...) from the same params.
On routing it records the prompt on the chosen pod; a failed attempt forgets what it recorded there.

YAML (registered as `weighted`, and for now also as `cache_aware`):
    policy: {name: weighted, params: {index: precise, weights: {prefix: 3, queue: 2, kv_usage: 2}}}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from router.endpoint import Endpoint
from router.policies.common import reject_unknown, rng_for
from router.policy import Decision, Policy, PolicyContext, RouteRequest
from router.prefix_cache import PrefixCache
from router.route_state import PrefixMatch
from router.scorers import Weighted, build_scorer, combine
from router.scorers.queue import endpoint_load

DEFAULT_WEIGHTS = {"prefix": 3.0, "queue": 2.0, "kv_usage": 2.0}
_PARAMS = {"weights", "balance_abs", "balance_rel", "seed"}


class WeightedPolicy(Policy):
    """Weighted scorers with a balance threshold. See the module docstring for the rule."""

    type_name = "weighted"
    uses_prefix_cache = True

    def __init__(
        self,
        cache: PrefixCache,
        *,
        weights: Mapping[str, float] | None = None,
        balance_abs: float = 8.0,
        balance_rel: float = 1.5,
        seed: int | None = None,
    ) -> None:
        if balance_abs < 0 or balance_rel < 1:
            raise ValueError("balance_abs must be >= 0 and balance_rel >= 1")
        w = dict(DEFAULT_WEIGHTS if weights is None else weights)
        for name, value in w.items():
            if not isinstance(value, int | float) or value < 0:
                raise ValueError(f"weight of {name!r} must be a non-negative number")
        self.cache = cache
        self.model = cache.model
        self.balance_abs = float(balance_abs)
        self.balance_rel = float(balance_rel)
        self.scorers = [Weighted(build_scorer(name), float(v)) for name, v in w.items()]
        self._rng = rng_for(None, seed)

    @classmethod
    def from_config(cls, params: Mapping[str, Any], ctx: PolicyContext) -> WeightedPolicy:
        """Its own params (`weights`, `balance_abs`, `balance_rel`, `seed`); the cache's were taken
        by the pool (router.prefix_cache.split_params) and built into `ctx.prefix_cache`."""
        reject_unknown(params, _PARAMS, ctx.name or cls.type_name)
        if ctx.prefix_cache is None:
            raise ValueError("needs the pool's prefix cache (PolicyContext.prefix_cache)")
        p = dict(params)
        weights = p.pop("weights", None)
        if weights is not None and not isinstance(weights, Mapping):
            raise ValueError("weights must map scorer names to numbers")
        return cls(ctx.prefix_cache, weights=weights, seed=p.pop("seed", ctx.seed), **p)

    def pick(self, request: RouteRequest, candidates: Sequence[Endpoint]) -> Decision:
        cache = self.cache
        state = request.state
        cache.learn_from(candidates)
        cache.prepare(state, request)
        keys = state.keys
        matched = state.matched = cache.match(keys, candidates)
        loads = {ep: endpoint_load(ep) for ep in candidates}
        lightest = min(loads.values())
        limit = max(lightest + self.balance_abs, lightest * self.balance_rel)
        overloaded = {ep for ep, load in loads.items() if load > limit}
        attract = {ep: n for ep, n in matched.items() if ep not in overloaded}
        ntok = state.prompt_tokens
        state.prefix = PrefixMatch(len(keys), attract, ntok, state.keys_block_size)

        scores = combine(self.scorers, request, candidates)
        best = max(scores.values())
        top = [ep for ep in candidates if scores[ep] >= best - 1e-9]
        tie = False
        if len(top) > 1:
            low = min(loads[ep] for ep in top)
            top = [ep for ep in top if loads[ep] == low]
            tie = len(top) > 1
        chosen = top[0] if len(top) == 1 else self._rng.choice(top)

        if attract.get(chosen, 0) > 0:
            reason = "prefix_hit"
        elif any(matched.get(ep, 0) > 0 for ep in overloaded):
            reason = "balance"
        elif tie:
            reason = "tie"
        else:
            reason = "load"
        return Decision(chosen, reason, cached_tokens=state.cached_tokens(chosen), prompt_tokens=ntok)

    def on_routed(self, request: RouteRequest, decision: Decision) -> None:
        self.cache.record(request.state, decision.endpoint)
        self.cache.count_routed(decision)

    def on_finished(self, request: RouteRequest, decision: Decision, ok: bool) -> None:
        """An attempt that failed before its first byte may never have reached prefill: forget the
        blocks it recorded there (after it, the pod holds them even if the client left)."""
        if not ok and not decision.first_byte_at:
            self.cache.forget(request.state, decision.endpoint)
