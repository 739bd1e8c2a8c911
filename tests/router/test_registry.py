"""The policy registry: lazy lookup by name, clear errors for unknown, broken or misconfigured policies."""

from __future__ import annotations

import importlib.util

import pytest
from prometheus_client import CollectorRegistry

from router import registry
from router.policy import Policy, PolicyContext
from router.registry import POLICIES, PolicyError, build_policy, policy_class

LOAD_ONLY = ["round_robin", "random", "least_request", "power_of_two", "session"]


def ctx() -> PolicyContext:
    return PolicyContext(model="m", registry=CollectorRegistry(), seed=1)


@pytest.mark.parametrize("name", LOAD_ONLY)
def test_each_load_policy_builds_from_empty_params(name):
    policy = build_policy(name, {}, ctx())
    assert isinstance(policy, Policy) and policy.type_name == name


@pytest.mark.parametrize("name", LOAD_ONLY)
def test_unknown_params_are_rejected(name):
    with pytest.raises(PolicyError, match="typo"):
        build_policy(name, {"typo": 1}, ctx())


def test_unknown_policy_names_the_known_ones():
    with pytest.raises(PolicyError, match="least_request"):
        policy_class("fastest")


def test_cache_aware_is_registered_lazily():
    assert POLICIES["cache_aware"] == "router.policies.cache_aware:CacheAwarePolicy"
    if importlib.util.find_spec("router.policies.cache_aware") is None:
        with pytest.raises(PolicyError, match="cannot be imported"):
            policy_class("cache_aware")
    else:
        assert policy_class("cache_aware").type_name == "cache_aware"


def test_broken_entry_gives_clear_error(monkeypatch):
    monkeypatch.setitem(registry.POLICIES, "broken", "router.policies.does_not_exist:Nope")
    with pytest.raises(PolicyError, match=r"broken.*cannot be imported"):
        policy_class("broken")
    monkeypatch.setitem(registry.POLICIES, "not_a_policy", "router.endpoint:Endpoint")
    with pytest.raises(PolicyError, match=r"not a router\.policy\.Policy"):
        policy_class("not_a_policy")
