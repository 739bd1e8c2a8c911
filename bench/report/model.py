"""What a comparison produced: one `RunRecord` per (router, load), plus the run's context."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.loadgen.podmetrics import PodFigures
from bench.loadgen.runner import Overhead
from bench.loadgen.stats import RunSummary
from bench.workloads.ceiling import Ceiling


@dataclass(slots=True)
class RunRecord:
    """One router (a policy, or a third-party router) driven with the workload at one load.

    `failed` carries why the run could not happen (e.g. the gateway did not start); the figures are
    then absent.
    """

    router: str  # display name, e.g. "cache_aware/precise"
    load: str  # arrival label, e.g. "12/s"
    rate: float | None
    summary: RunSummary | None = None
    pods: PodFigures | None = None
    overhead: Overhead | None = None
    ttfts: list[float] = field(default_factory=list)
    failed: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "router": self.router, "load": self.load, "rate": self.rate,
            "summary": self.summary.to_json() if self.summary else None,
            "pods": self.pods.to_json() if self.pods else None,
            "loadgen_overhead": self.overhead.to_json() if self.overhead else None,
            "ttft_samples": self.ttfts, "failed": self.failed,
        }


@dataclass(slots=True)
class Report:
    """Everything `kvgate bench` writes: config, workload, ceiling, runs, and notes (e.g. skipped
    baselines)."""

    config: dict[str, Any]
    workload: dict[str, Any]
    ceiling: Ceiling | None
    runs: list[RunRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def ratios(self, baseline: str = "round_robin") -> dict[str, dict[str, float | None]]:
        """Per load and router: TTFT p50/p90 and throughput relative to `baseline` at the same load."""
        out: dict[str, dict[str, float | None]] = {}
        by_key = {(r.router, r.load): r.summary for r in self.runs if r.summary}
        for (router, load), s in by_key.items():
            base = by_key.get((baseline, load))
            if base is None or router == baseline:
                continue
            out[f"{router} @ {load}"] = {
                "ttft_p50": _ratio(s.ttft.p50, base.ttft.p50),
                "ttft_p90": _ratio(s.ttft.p90, base.ttft.p90),
                "output_tps": _ratio(s.output_tps, base.output_tps),
            }
        return out

    def to_json(self) -> dict[str, Any]:
        ceiling = None
        if self.ceiling:
            ceiling = {"prompt_tokens": self.ceiling.prompt_tokens, "hit_tokens": self.ceiling.hit_tokens,
                       "block_size": self.ceiling.block_size, "hit_rate": self.ceiling.hit_rate}
        return {"config": self.config, "workload": self.workload, "ceiling": ceiling,
                "runs": [r.to_json() for r in self.runs], "ratios_vs_round_robin": self.ratios(),
                "notes": self.notes}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None
