"""Scorers: small plugins that rate each candidate endpoint in [0, 1] for one request.

Every scorer has the same shape (STYLE.md): a `type_name`, a factory `from_params(params)` decoding
its parameters over defaults, a plain constructor that tests call, and one method
`score(request, endpoints) -> {endpoint: score}`. Scorers do no I/O: they read endpoint snapshots and
what the policy put in the typed `request.state` (router/route_state.py). The framework (`combine`),
not the scorer, clamps to [0, 1] and applies weights; an endpoint a scorer leaves out is "unscored" by
it (adds nothing), which is distinct from a score of 0 only in `scores_by_scorer`'s output. Adding a
scorer is one line in SCORERS.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from router.endpoint import Endpoint
from router.policy import RouteRequest

SCORERS: dict[str, str] = {
    "prefix": "router.scorers.prefix:PrefixScorer",
    "queue": "router.scorers.queue:QueueScorer",
    "kv_usage": "router.scorers.kv_usage:KVUsageScorer",
    "prefill": "router.scorers.prefill:PrefillScorer",
}


class Scorer(Protocol):
    type_name: ClassVar[str]

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Scorer: ...

    def score(self, request: RouteRequest, endpoints: Sequence[Endpoint]) -> dict[Endpoint, float]:
        """Scores in [0, 1] (higher is better) for some or all of `endpoints`."""
        ...


@dataclass(slots=True)
class Weighted:
    scorer: Scorer
    weight: float


def build_scorer(name: str, params: Mapping[str, Any] | None = None) -> Scorer:
    """The scorer registered under `name`, built from `params`. ValueError when unknown."""
    target = SCORERS.get(name)
    if target is None:
        raise ValueError(f"unknown scorer {name!r}; known scorers: {', '.join(sorted(SCORERS))}")
    module, _, cls_name = target.partition(":")
    cls = getattr(importlib.import_module(module), cls_name)
    return cls.from_params(params or {})


def scores_by_scorer(
    scorers: Sequence[Weighted], request: RouteRequest, endpoints: Sequence[Endpoint]
) -> dict[str, dict[Endpoint, float]]:
    """Each scorer's clamped scores (unscored endpoints absent), by scorer type name."""
    return {
        w.scorer.type_name: {
            ep: min(1.0, max(0.0, s)) for ep, s in w.scorer.score(request, endpoints).items()
        }
        for w in scorers
    }


def combine(
    scorers: Sequence[Weighted], request: RouteRequest, endpoints: Sequence[Endpoint]
) -> dict[Endpoint, float]:
    """Sum over scorers of weight x clamp(score, 0, 1) for every endpoint (unscored counts 0)."""
    total = dict.fromkeys(endpoints, 0.0)
    for w in scorers:
        if w.weight == 0:
            continue
        for ep, s in w.scorer.score(request, endpoints).items():
            if ep in total:
                total[ep] += w.weight * (1.0 if s > 1.0 else 0.0 if s < 0.0 or s != s else s)
    return total
