"""bench.real_vllm's comparison report: rounds in rotated order, medians per router, ratios of medians."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from bench.loadgen.client import RequestResult
from bench.loadgen.stats import summarize
from bench.real_vllm import RouterRun, compare_routers, ratios, router_medians
from bench.report.model import RunRecord


def run_with(router: str, ttft: float) -> RouterRun:
    results = [RequestResult("t", 0.0, ttft=ttft, e2e=ttft + 0.1, output_tokens=4, status=200)]
    record = RunRecord(router, "6 users", None, summary=summarize(results, 1.0))
    return RouterRun(record)


def test_medians_over_rounds_and_their_ratios() -> None:
    runs = [run_with("cache_aware", t) for t in (0.1, 0.5, 0.2)]  # one slow round: the median ignores it
    runs += [run_with("sglang_router", t) for t in (0.2, 0.2, 0.4)]
    medians = router_medians(runs)
    assert medians["cache_aware"]["rounds"] == 3
    assert medians["cache_aware"]["ttft_p90"] == pytest.approx(0.2)
    table = ratios(runs, "sglang_router")
    assert table["cache_aware/sglang_router"]["ttft_p90"] == pytest.approx(1.0)
    assert ratios(runs, "round_robin") == {}  # no such baseline


@dataclass
class FakeBench:
    order: list[str] = field(default_factory=list)

    def spec(self, name: str, interval: float | None = None) -> str:
        return name

    async def run(self, spec: str, workload: object, label: str, interval: float | None) -> RouterRun:
        self.order.append(label)
        return run_with(label, 0.1)


def test_each_round_starts_at_the_next_router() -> None:
    bench = FakeBench()
    runs = asyncio.run(compare_routers(bench, ["a", "b", "c"], object(), None, repeats=3))  # type: ignore[arg-type]
    assert bench.order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert len(runs) == 9
