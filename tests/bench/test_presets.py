"""Presets keep the property that makes routing matter: the prefixes need most of the fleet's KV."""

from __future__ import annotations

import pytest

from bench.presets import FULL, PRESETS, QUICK, SATURATE
from bench.sim.config import SimConfig


@pytest.mark.parametrize(("preset", "fraction"), [(QUICK, 0.70), (FULL, 0.73), (SATURATE, 0.73)])
def test_prefixes_need_most_of_the_fleet_kv_but_fit_when_split(preset, fraction):
    w = preset.workload
    assert w.prefix_tokens / preset.fleet_kv_tokens == pytest.approx(fraction, abs=0.01)
    per_pod = preset.fleet_kv_tokens // preset.pods
    assert w.prefix_tokens > per_pod  # one pod cannot hold every prefix: scattering a group thrashes
    SimConfig(**preset.pod_options).validate()  # every option is a real simulator option


def test_full_preset_is_llm_d_shape_on_8_pods():
    assert (FULL.pods, FULL.workload.groups, FULL.workload.prompts_per_group) == (8, 150, 5)
    assert FULL.workload.question_tokens == pytest.approx(FULL.workload.system_tokens / 5, abs=1)
    assert set(PRESETS) == {"quick", "full", "saturate"}


def _prefill_load(preset, prefix_hit: float) -> float:
    """Mean uncached prompt tokens per second over the fleet's prefill capacity, when a share
    `prefix_hit` of system prompts is found cached (questions never are)."""
    w, pod = preset.workload, preset.pod_options
    uncached = (1 - prefix_hit) * w.system_tokens + w.question_tokens
    return preset.rates[0] * uncached / (preset.pods * pod["prefill_tps"])


def test_saturate_overloads_round_robin_but_not_one_pod_per_group():
    w = SATURATE.workload
    assert SATURATE.pods == 8 and w.prompts_per_group >= 10  # cold requests stay below p90
    # round robin: a pod holds its share of the fleet's KV, so at best that share of the prefixes
    per_pod_share = (SATURATE.fleet_kv_tokens / SATURATE.pods) / w.prefix_tokens
    assert _prefill_load(SATURATE, per_pod_share) > 1.2
    # one pod per group: each prefix computed once per group, then always cached
    assert _prefill_load(SATURATE, 1 - 1 / w.prompts_per_group) < 0.5
    assert {"round_robin", "cache_aware/approximate", "cache_aware/precise"} <= set(SATURATE.routers)
    assert w.num_requests <= 2000  # bounded: the run must stay within a few minutes
