"""Named `kvgate bench` settings: a simulated fleet (pods, cache size, cost model), a workload, loads.

`quick` is the README's main job: it must finish in under two minutes on a 2-core machine and show
what cache-aware routing buys. `saturate` is issue 4's acceptance run (figures in bench/RESULTS.md):
round robin past the fleet's prefill capacity. All follow llm-d's setting (section 4 of DESIGN.md): the
groups' shared prefixes need most (~70%) of the fleet's KV cache, so a router that scatters a group
over every pod makes each pod hold every prefix, evicting and recomputing them, while one that keeps
each group on one pod serves it from cache. The prefill rate is set low so that a cold prefix costs
enough to queue under round robin at the preset's request rate, yet the run stays short.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from bench.workloads.shared_prefix import LLM_D, SGLANG, SharedPrefixSpec, scale_to_fleet

DEFAULT_ROUTERS = ("round_robin", "least_request", "cache_aware/approximate", "cache_aware/precise")


@dataclass(slots=True, frozen=True)
class BenchPreset:
    name: str
    description: str
    pods: int
    pod_options: dict[str, Any]  # bench.sim.config.SimConfig fields
    workload: SharedPrefixSpec
    rates: tuple[float, ...]
    warmup: int = 8
    routers: tuple[str, ...] = DEFAULT_ROUTERS

    @property
    def fleet_kv_tokens(self) -> int:
        """Usable KV tokens of the whole fleet (vLLM reserves one null block per pod)."""
        return kv_tokens(self.pods, self.pod_options)


def kv_tokens(pods: int, options: dict[str, Any]) -> int:
    """Usable KV tokens of `pods` pods with these simulator options (one null block per pod)."""
    return pods * (options["num_gpu_blocks"] - 1) * options.get("block_size", 16)


# 4 pods of 512 blocks x 16 tokens (8k tokens each). SGLang's 64x16 2048/128/256 shape as 16 groups
# of 12, scaled so the prefixes need ~70% of the fleet's KV; 192 requests at 14/s. A cold prompt
# (~1500 tokens at 6000 tokens/s) costs ~250 ms of prefill: round robin's ~3.5 req/s per pod keep every
# pod nearly busy recomputing prefixes, so requests queue.
_QUICK_POD = {"num_gpu_blocks": 513, "block_size": 16, "prefill_tps": 6000.0, "itl_ms": 8.0,
              "itl_ms_per_seq": 0.2, "max_num_seqs": 32, "max_num_batched_tokens": 2048}
QUICK = BenchPreset(
    name="quick",
    description="4 pods, shared-prefix 16x12 (SGLang's shape scaled to 70% of the fleet's KV), 14 req/s",
    pods=4,
    pod_options=_QUICK_POD,
    workload=replace(scale_to_fleet(replace(SGLANG, groups=16, prompts_per_group=12),
                                    kv_tokens(4, _QUICK_POD), 0.70), output_tokens=16),
    rates=(14.0,),
)

# 8 pods (the issue-4 / llm-d setting): llm-d's 150x5 6000/1200/1000 scaled to 73% of the fleet's KV
# (S=638, Q=128; output cut to 32 tokens to spare the 2 cores). A cold prompt costs ~640 ms of prefill
# at 1200 tokens/s, so round robin's 1.5 req/s per pod keep the pods fully busy recomputing prefixes
# and its queues grow; routing each group to one pod leaves them ~35% busy. 750 requests at 12/s:
# ~65 s per router. One request in five is its group's first and cold under any router.
_FULL_POD = {"num_gpu_blocks": 1025, "block_size": 16, "prefill_tps": 1200.0, "itl_ms": 8.0,
             "itl_ms_per_seq": 0.2, "max_num_seqs": 32, "max_num_batched_tokens": 2048}
FULL = BenchPreset(
    name="full",
    description="8 pods, llm-d's shared-prefix 150x5 6000/1200/1000 scaled to 73% of the fleet's KV",
    pods=8,
    pod_options=_FULL_POD,
    workload=replace(scale_to_fleet(LLM_D, kv_tokens(8, _FULL_POD), 0.73), output_tokens=32),
    rates=(12.0,),
)

# The issue-4 acceptance run: 8 pods, prefixes needing 73% of the fleet's KV, a rate at which round
# robin's prefill work exceeds the fleet's capacity while cache-aware routing's stays well below it.
# llm-d's 150 groups with 12 prompts each (not 5): only 1 request in 12 is its group's first, cold
# under any router, so p90 measures routing, not unavoidable cold prefills. S=512, Q=51 (SGLang's
# short questions rather than llm-d's S/5). A pod holds ~26 of the 150 prefixes, so round robin hits
# ~17% of them and prefills ~475 uncached tokens per request: at 25 req/s that is ~11.9k tokens/s
# against the fleet's 8 x 1000 (load ~1.5: its queues grow for the whole run). Keeping each group on
# one pod prefills ~94 tokens per request (load ~0.3). Output cut to 8 tokens and 1800 requests (72 s
# of arrivals) to spare the 2 cores; the three routers take ~5 minutes in all.
_SATURATE_POD = {"num_gpu_blocks": 823, "block_size": 16, "prefill_tps": 1000.0, "itl_ms": 8.0,
                 "itl_ms_per_seq": 0.2, "max_num_seqs": 32, "max_num_batched_tokens": 512}
SATURATE = BenchPreset(
    name="saturate",
    description="8 pods, shared-prefix 150x12 512/51/8 (73% of the fleet's KV), 25 req/s: saturates "
                "round robin",
    pods=8,
    pod_options=_SATURATE_POD,
    workload=replace(scale_to_fleet(SharedPrefixSpec(groups=150, prompts_per_group=12, system_tokens=6000,
                                                     question_tokens=600, output_tokens=1000),
                                    kv_tokens(8, _SATURATE_POD), 0.73), output_tokens=8),
    rates=(25.0,),
    routers=("round_robin", "cache_aware/approximate", "cache_aware/precise"),
)

PRESETS: dict[str, BenchPreset] = {p.name: p for p in (QUICK, FULL, SATURATE)}


def preset_summary(preset: BenchPreset) -> dict[str, Any]:
    w = preset.workload
    return {"name": preset.name, "description": preset.description, "pods": preset.pods,
            "pod_options": dict(preset.pod_options), "rates": list(preset.rates),
            "workload": f"{w.groups}x{w.prompts_per_group} {w.system_tokens}/{w.question_tokens}/"
                        f"{w.output_tokens}", "fleet_kv_tokens": preset.fleet_kv_tokens}
