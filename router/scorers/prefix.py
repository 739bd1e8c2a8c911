"""prefix: the share of the prompt's blocks the endpoint already holds in KV cache.

    score = matched_blocks(endpoint) / prompt_blocks

Reads `request.state.prefix`, a PrefixMatch the weighted policy computes once per pick from the
prefix cache (longest leading run of the prompt's blocks each pod holds). Endpoints are unscored when
the prompt has no full block. YAML: `scorers: {prefix: 3}`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from router.endpoint import Endpoint
from router.policy import RouteRequest


class PrefixScorer:
    type_name = "prefix"

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> PrefixScorer:
        if params:
            raise ValueError(f"scorer 'prefix' takes no parameters, got {sorted(params)}")
        return cls()

    def score(self, request: RouteRequest, endpoints: Sequence[Endpoint]) -> dict[Endpoint, float]:
        m = request.state.prefix
        if m is None or m.prompt_blocks <= 0:
            return {}
        n = m.prompt_blocks
        get = m.matched.get
        return {ep: get(ep, 0) / n for ep in endpoints}
