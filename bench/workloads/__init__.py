"""Benchmark workloads: shared-prefix, Zipf-skewed prefixes, multi-turn, trace replay and unique prompts,
with open/closed-loop arrivals."""

from __future__ import annotations

from bench.workloads.arrivals import Arrival, ClosedLoop, OpenLoop, start_times
from bench.workloads.base import BenchRequest, Session, Workload
from bench.workloads.ceiling import Ceiling, infinite_cache_ceiling
from bench.workloads.multi_turn import MultiTurnSpec, multi_turn
from bench.workloads.shared_prefix import SharedPrefixSpec, scale_to_fleet, shared_prefix
from bench.workloads.trace import TraceSpec, trace
from bench.workloads.unique import UniqueSpec, unique_prompts
from bench.workloads.zipf_prefix import ZipfPrefixSpec, zipf_prefix

__all__ = [
    "Arrival", "BenchRequest", "Ceiling", "ClosedLoop", "MultiTurnSpec", "OpenLoop", "Session",
    "SharedPrefixSpec", "TraceSpec", "UniqueSpec", "Workload", "ZipfPrefixSpec", "infinite_cache_ceiling",
    "multi_turn", "scale_to_fleet", "shared_prefix", "start_times", "trace", "unique_prompts", "zipf_prefix",
]
