"""Routing policies by name: one explicit map of name -> "module:Class", imported only when asked for.

Nothing registers itself on import (STYLE.md habit 2): adding a policy is one line here. Lazy imports
keep `kvgate serve --policy round_robin` from loading the prefix index, and let a policy whose module
is missing or broken fail with a clear message only when it is actually asked for. One class may be
registered under several names: the name it was built under reaches it as `PolicyContext.name`.

A policy class with `uses_prefix_cache` gets a PrefixCache built by `build_prefix_cache` from the
cache's share of the same params (`index`, `block_size`, ...; router/prefix_cache.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from router.policy import Policy, PolicyContext

if TYPE_CHECKING:
    from router.prefix_cache import PrefixCache

POLICIES: dict[str, str] = {
    "round_robin": "router.policies.round_robin:RoundRobinPolicy",
    "random": "router.policies.random_choice:RandomPolicy",
    "least_request": "router.policies.least_request:LeastRequestPolicy",
    "power_of_two": "router.policies.power_of_two:PowerOfTwoPolicy",
    "session": "router.policies.session:SessionPolicy",
    "weighted": "router.policies.weighted:WeightedPolicy",
    "cache_aware": "router.policies.predicted_ttft:PredictedTTFTPolicy",
}


class PolicyError(ValueError):
    """A policy name that is unknown, cannot be imported, or was given bad parameters."""


def policy_class(name: str) -> type[Policy]:
    """The class registered under `name`; PolicyError when unknown or not importable."""
    target = POLICIES.get(name)
    if target is None:
        raise PolicyError(f"unknown policy {name!r}; known policies: {', '.join(sorted(POLICIES))}")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PolicyError(
            f"policy {name!r} is registered as {target} but its module cannot be imported: {exc}"
        ) from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise PolicyError(f"policy {name!r}: {target} is not a router.policy.Policy subclass")
    return cls


def build_policy(name: str, params: Mapping[str, Any], ctx: PolicyContext) -> Policy:
    """Instantiate policy `name` from its config `params` (for a policy using a prefix cache: what
    `build_prefix_cache` left of them, with the cache in `ctx`); bad parameters raise PolicyError."""
    cls = policy_class(name)
    try:
        return cls.from_config(dict(params), replace(ctx, name=name))
    except (TypeError, ValueError) as exc:
        raise PolicyError(f"policy {name!r}: {exc}") from exc


def build_prefix_cache(
    name: str,
    params: Mapping[str, Any],
    *,
    model: str,
    registry: CollectorRegistry,
    tokenizer: str | None = None,
    block_size: int | None = None,
    reuse: PrefixCache | None = None,
) -> tuple[PrefixCache | None, dict[str, Any]]:
    """The prefix cache policy `name` needs (None when its class uses none) and the params left for the
    policy. `tokenizer` and `block_size` are the pool's defaults. `reuse`: a running cache, returned
    as it is (its index kept) when its settings equal the new ones (a config reload that changed only
    the policy's own params). Bad cache parameters: PolicyError."""
    if not policy_class(name).uses_prefix_cache:
        return None, dict(params)
    from router.prefix_cache import PrefixCache, PrefixCacheConfig, split_params  # only when needed

    cache_params, rest = split_params(params)
    try:
        config = PrefixCacheConfig.from_params(cache_params, tokenizer=tokenizer, block_size=block_size)
        if reuse is not None and reuse.model == model and reuse.config == config:
            return reuse, rest
        return PrefixCache(model, config, registry=registry), rest
    except (TypeError, ValueError) as exc:
        raise PolicyError(f"policy {name!r}: {exc}") from exc
