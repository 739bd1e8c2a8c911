"""Presets keep the property that makes routing matter: the prefixes need most of the fleet's KV."""

from __future__ import annotations

import pytest

from bench.presets import FULL, PRESETS, QUICK
from bench.sim.config import SimConfig


@pytest.mark.parametrize(("preset", "fraction"), [(QUICK, 0.70), (FULL, 0.73)])
def test_prefixes_need_most_of_the_fleet_kv_but_fit_when_split(preset, fraction):
    w = preset.workload
    assert w.prefix_tokens / preset.fleet_kv_tokens == pytest.approx(fraction, abs=0.01)
    per_pod = preset.fleet_kv_tokens // preset.pods
    assert w.prefix_tokens > per_pod  # one pod cannot hold every prefix: scattering a group thrashes
    SimConfig(**preset.pod_options).validate()  # every option is a real simulator option


def test_full_preset_is_llm_d_shape_on_8_pods():
    assert (FULL.pods, FULL.workload.groups, FULL.workload.prompts_per_group) == (8, 150, 5)
    assert FULL.workload.question_tokens == pytest.approx(FULL.workload.system_tokens / 5, abs=1)
    assert set(PRESETS) == {"quick", "full"}
