"""Pools: per model, the live Endpoint objects, the policy that chooses among them, the LoRA adapters
served on top of the model (configured and learned) and, for a policy that routes by prefix, the
pool's PrefixCache (owned here, started and closed by the app)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from gateway.config import EndpointSpec, GatewayConfig, PDSpec, PoolSpec
from prefixindex.tokenizer import load_tokenizer
from router.endpoint import Endpoint
from router.pd import PDRouter, VersionCompatibility, is_pd_pool
from router.policy import Policy, PolicyContext
from router.registry import build_policy, build_prefix_cache

if TYPE_CHECKING:
    from router.prefix_cache import PrefixCache

log = logging.getLogger("kvgate.pools")


@dataclass(slots=True, eq=False)
class Pool:
    model: str
    policy_name: str
    policy: Policy
    endpoints: list[Endpoint]
    pd: PDRouter | None = None  # set for a pool with prefill pods (prefill/decode disaggregation)
    prefix_cache: PrefixCache | None = None  # set when the policy class has `uses_prefix_cache`
    adapters: frozenset[str] = frozenset()  # LoRA adapters from the config
    learned_adapters: frozenset[str] = frozenset()  # LoRA adapters the pods list (/v1/models)

    def candidates(self, tried: list[Endpoint], panic_threshold: float = 0.0) -> tuple[list[Endpoint], bool]:
        """Endpoints that may take a whole request now, and whether the pool is in panic mode.

        Normally: the healthy, not prefill-only endpoints not yet tried. Panic mode (Envoy's): when no
        endpoint that can take the request is healthy, or their healthy share is below
        `panic_threshold`, health is ignored and every such endpoint not yet tried is a candidate, so a
        fleet ejected wholesale (e.g. slow health answers under load) still serves instead of answering
        503; a truly dead fleet fails each attempt fast and ends in 502 after the retries.
        """
        eligible = [ep for ep in self.endpoints if ep.role != "prefill"]
        healthy = sum(1 for ep in eligible if ep.healthy)
        panic = bool(eligible) and (healthy == 0 or healthy < panic_threshold * len(eligible))
        return [ep for ep in eligible if (panic or ep.healthy) and ep not in tried], panic

    def update_endpoints(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        """Change the pool's pods (discovery, rolling updates) and tell the prefix cache and the policy.
        Requests already routed to a removed pod finish or fail on their own; new ones never see it."""
        gone = set(removed)
        self.endpoints = [ep for ep in self.endpoints if ep not in gone] + list(added)
        if self.prefix_cache is not None:
            self.prefix_cache.endpoints_changed(added, removed)
        self.policy.endpoints_changed(added, removed)


class Pools:
    """model name -> Pool, in config order; a LoRA adapter's name -> the pool serving it.

    Configured adapters are fixed (gateway.config checked they clash with nothing); learned ones
    follow what the pods list, and one whose name a pool's model or another pool's adapter already
    takes (the first to claim it keeps it) is ignored, logged once, so a name routes to one pool."""

    def __init__(self, pools: list[Pool], aliases: dict[str, str] | None = None) -> None:
        self.by_model = {p.model: p for p in pools}
        self.aliases = dict(aliases or {})  # alias -> the served name it stands for (config.aliases)
        self._adapters: dict[str, Pool] = {}
        self._refused: set[tuple[str, str]] = set()
        self._reindex()

    def replace(self, pools: list[Pool], aliases: dict[str, str]) -> None:
        """Serve `pools` and `aliases` from now on (a config reload), in one step: a request picks its
        pool either before or after, and in-flight ones keep the Pool they hold."""
        self.by_model = {p.model: p for p in pools}
        self.aliases = dict(aliases)
        self._refused = {(model, name) for model, name in self._refused if model in self.by_model}
        self._reindex()

    def __iter__(self) -> Iterator[Pool]:
        return iter(self.by_model.values())

    def get(self, model: str) -> Pool | None:
        """The pool of a model or of a LoRA adapter; None when nothing serves `model`."""
        pool = self.by_model.get(model)
        return pool if pool is not None else self._adapters.get(model)

    def adapters(self) -> Iterator[tuple[str, Pool]]:
        """(adapter name, its pool), in pool order then by name."""
        for pool in self.by_model.values():
            for name in sorted(pool.adapters | pool.learned_adapters):
                if self._adapters.get(name) is pool:
                    yield name, pool

    def learn_adapters(self, pool: Pool, names: Iterable[str]) -> None:
        """The adapters `pool`'s pods list now (replacing what they listed before)."""
        learned = set()
        for name in names:
            if name == pool.model:
                continue
            owner = self.get(name)
            if owner is not None and owner is not pool:
                if (pool.model, name) not in self._refused:
                    self._refused.add((pool.model, name))
                    log.warning("pool %s: pods list adapter %r, a name another pool serves: ignored",
                                pool.model, name)
                continue
            learned.add(name)
        if learned != pool.learned_adapters:
            pool.learned_adapters = frozenset(learned)
            self._reindex()

    def _reindex(self) -> None:
        index: dict[str, Pool] = {}
        for pool in self.by_model.values():
            for name in pool.adapters:
                index[name] = pool
        for pool in self.by_model.values():
            for name in pool.learned_adapters:
                index.setdefault(name, pool)  # learn_adapters let no name into two pools
        self._adapters = index

    def endpoints(self) -> Iterator[Endpoint]:
        for pool in self.by_model.values():
            yield from pool.endpoints


def build_endpoint(spec: EndpointSpec, model: str) -> Endpoint:
    return Endpoint(
        url=spec.url,
        model=model,
        role=spec.role,
        version=spec.version,
        weight=spec.weight,
        kv_events=spec.kv_events,
        kv_events_replay=spec.kv_events_replay,
    )


def build_pool(spec: PoolSpec, registry: CollectorRegistry, seed: int | None) -> Pool:
    """Endpoints, prefix cache and policy of one pool; a bad policy name or parameter raises
    router.registry.PolicyError."""
    endpoints = [build_endpoint(e, spec.model) for e in spec.endpoints]
    policy, cache = build_routing(spec, registry, seed)
    pd = build_pd_router(spec, endpoints)
    return Pool(spec.model, spec.policy.name, policy, endpoints, pd, cache, adapters=frozenset(spec.adapters))


def build_routing(
    spec: PoolSpec, registry: CollectorRegistry, seed: int | None, reuse: PrefixCache | None = None
) -> tuple[Policy, PrefixCache | None]:
    """The pool's policy and the prefix cache it ranks with (`reuse`: a running cache kept when its
    settings are unchanged, see router.registry.build_prefix_cache); PolicyError on bad params."""
    name = spec.policy.name
    cache, params = build_prefix_cache(
        name, spec.policy.params, model=spec.model, registry=registry,
        tokenizer=spec.tokenizer, block_size=spec.block_size, reuse=reuse,
    )  # fmt: skip
    ctx = PolicyContext(model=spec.model, registry=registry, seed=seed, prefix_cache=cache)
    return build_policy(name, params, ctx), cache


def build_pd_router(spec: PoolSpec, endpoints: Sequence[Endpoint]) -> PDRouter | None:
    """The pool's P/D decision when it has prefill pods (defaults unless `pd:` is configured)."""
    if spec.pd is None and not is_pd_pool(endpoints):
        return None
    pd = spec.pd or PDSpec()
    return PDRouter(
        load_tokenizer(spec.tokenizer),
        threshold_tokens=pd.threshold_tokens,
        prefill_timeout_s=pd.prefill_timeout_s,
        compatibility=VersionCompatibility.from_map(pd.compatibility),
    )


def build_pools(config: GatewayConfig, registry: CollectorRegistry) -> Pools:
    return Pools([build_pool(spec, registry, config.seed) for spec in config.pools], config.aliases)
