"""The policy registry: lazy lookup by name, clear errors for unknown, broken or misconfigured policies."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry

from router import registry
from router.policy import Policy, PolicyContext
from router.registry import POLICIES, PolicyError, build_policy, build_prefix_cache, policy_class

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
    assert POLICIES["cache_aware"].startswith("router.policies.")
    if importlib.util.find_spec(POLICIES["cache_aware"].partition(":")[0]) is None:
        with pytest.raises(PolicyError, match="cannot be imported"):
            policy_class("cache_aware")
    else:
        assert policy_class("cache_aware").uses_prefix_cache


def test_one_class_under_two_names_reports_the_name_it_was_built_under(monkeypatch):
    monkeypatch.setitem(registry.POLICIES, "alias", POLICIES["weighted"])
    assert policy_class("alias") is policy_class("weighted")
    for name in ("weighted", "alias"):
        params = {"index": "approximate"}
        cache, rest = build_prefix_cache(name, params, model="m", registry=CollectorRegistry())
        c = replace(ctx(), prefix_cache=cache)
        assert build_policy(name, rest, c).uses_prefix_cache
        with pytest.raises(PolicyError, match=rf"^policy '{name}': policy '{name}' does not take .*typo"):
            build_policy(name, {"typo": 1}, c)
    with pytest.raises(PolicyError, match="prefix cache"):
        build_policy("weighted", {}, ctx())  # built without the pool's cache


def test_broken_entry_gives_clear_error(monkeypatch):
    monkeypatch.setitem(registry.POLICIES, "broken", "router.policies.does_not_exist:Nope")
    with pytest.raises(PolicyError, match=r"broken.*cannot be imported"):
        policy_class("broken")
    monkeypatch.setitem(registry.POLICIES, "not_a_policy", "router.endpoint:Endpoint")
    with pytest.raises(PolicyError, match=r"not a router\.policy\.Policy"):
        policy_class("not_a_policy")
