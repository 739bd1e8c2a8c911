"""Routing policies by name: one explicit map of name -> "module:Class", imported only when asked for.

Nothing registers itself on import (STYLE.md habit 2): adding a policy is one line here. Lazy imports
keep `kvgate serve --policy round_robin` from loading the prefix index, and let a policy whose module
is missing or broken fail with a clear message only when it is actually asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from router.policy import Policy, PolicyContext

POLICIES: dict[str, str] = {
    "round_robin": "router.policies.round_robin:RoundRobinPolicy",
    "random": "router.policies.random_choice:RandomPolicy",
    "least_request": "router.policies.least_request:LeastRequestPolicy",
    "power_of_two": "router.policies.power_of_two:PowerOfTwoPolicy",
    "session": "router.policies.session:SessionPolicy",
    "cache_aware": "router.policies.cache_aware:CacheAwarePolicy",
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
    """Instantiate policy `name` from its config `params`; bad parameters raise PolicyError."""
    cls = policy_class(name)
    try:
        return cls.from_config(dict(params), ctx)
    except (TypeError, ValueError) as exc:
        raise PolicyError(f"policy {name!r}: {exc}") from exc
