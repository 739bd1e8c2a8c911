"""prefix: the share of the prompt's blocks the endpoint already holds in KV cache.

    score = matched_blocks(endpoint) / prompt_blocks

Reads `request.scratch[PREFIX_MATCH]`, a PrefixMatch the cache-aware policy computes once per request
from the prefix index (longest leading run of the prompt's blocks each pod holds). Endpoints are
unscored when the prompt has no full block. YAML: `scorers: {prefix: 3}`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from router.endpoint import Endpoint
from router.policy import RouteRequest

PREFIX_MATCH = "prefix_match"


@dataclass(slots=True)
class PrefixMatch:
    """The prompt's full blocks and tokens and, per endpoint holding some, its leading matched blocks."""

    prompt_blocks: int
    matched: dict[Endpoint, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    block_size: int = 16


class PrefixScorer:
    type_name = "prefix"

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> PrefixScorer:
        if params:
            raise ValueError(f"scorer 'prefix' takes no parameters, got {sorted(params)}")
        return cls()

    def score(self, request: RouteRequest, endpoints: Sequence[Endpoint]) -> dict[Endpoint, float]:
        m: PrefixMatch | None = request.scratch.get(PREFIX_MATCH)
        if m is None or m.prompt_blocks <= 0:
            return {}
        n = m.prompt_blocks
        get = m.matched.get
        return {ep: get(ep, 0) / n for ep in endpoints}
