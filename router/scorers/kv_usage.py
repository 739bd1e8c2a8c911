"""kv_usage: prefer endpoints with free KV cache.

    score(e) = 1 - kv_usage(e)     (vllm:kv_cache_usage_perc at the last scrape, 0..1)

Endpoints never scraped (`last_scrape == 0`) are unscored. YAML: `scorers: {kv_usage: 2}`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from router.endpoint import Endpoint
from router.policy import RouteRequest


class KVUsageScorer:
    type_name = "kv_usage"

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> KVUsageScorer:
        if params:
            raise ValueError(f"scorer 'kv_usage' takes no parameters, got {sorted(params)}")
        return cls()

    def score(self, request: RouteRequest, endpoints: Sequence[Endpoint]) -> dict[Endpoint, float]:
        return {ep: 1.0 - ep.kv_usage for ep in endpoints if ep.last_scrape > 0}
