"""Pools: per model, the live Endpoint objects and the policy that chooses among them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from gateway.config import GatewayConfig, PoolSpec
from router.endpoint import Endpoint
from router.policy import Policy, PolicyContext
from router.registry import build_policy


@dataclass(slots=True, eq=False)
class Pool:
    model: str
    policy_name: str
    policy: Policy
    endpoints: list[Endpoint]

    def candidates(self, tried: list[Endpoint]) -> list[Endpoint]:
        """Endpoints that may take a whole request now: healthy, not prefill-only, not yet tried."""
        return [ep for ep in self.endpoints if ep.healthy and ep.role != "prefill" and ep not in tried]


class Pools:
    """model name -> Pool, in config order."""

    def __init__(self, pools: list[Pool]) -> None:
        self.by_model = {p.model: p for p in pools}

    def __iter__(self) -> Iterator[Pool]:
        return iter(self.by_model.values())

    def get(self, model: str) -> Pool | None:
        return self.by_model.get(model)

    def endpoints(self) -> Iterator[Endpoint]:
        for pool in self.by_model.values():
            yield from pool.endpoints


def build_pool(spec: PoolSpec, registry: CollectorRegistry, seed: int | None) -> Pool:
    """Endpoints and policy of one pool; a bad policy name or parameter raises router.registry.PolicyError."""
    endpoints = [
        Endpoint(
            url=e.url,
            model=spec.model,
            role=e.role,
            version=e.version,
            weight=e.weight,
            kv_events=e.kv_events,
            kv_events_replay=e.kv_events_replay,
        )
        for e in spec.endpoints
    ]
    ctx = PolicyContext(
        model=spec.model, registry=registry, tokenizer=spec.tokenizer, block_size=spec.block_size, seed=seed
    )
    policy = build_policy(spec.policy.name, spec.policy.params, ctx)
    return Pool(spec.model, spec.policy.name, policy, endpoints)


def build_pools(config: GatewayConfig, registry: CollectorRegistry) -> Pools:
    return Pools([build_pool(spec, registry, config.seed) for spec in config.pools])
