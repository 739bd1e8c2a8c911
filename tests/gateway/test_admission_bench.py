"""bench/admission.py and bench/admission_overhead.py end to end, scaled down (real `kvgate sim` and
`kvgate serve` processes): they run, and report what they say they report."""

from __future__ import annotations

import asyncio
import sys

import orjson
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


async def run(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 140)
    assert proc.returncode == 0, out.decode()
    return out.decode()


async def test_admission_bench_runs_none_and_fair_and_reports_the_figures(tmp_path) -> None:
    text = await run("-m", "bench.admission", "--pods", "1", "--duration", "4", "--tail", "3", "--heavy-load",
                     "2", "--small-rate", "1", "--setups", "none,fair", "--out", str(tmp_path))
    assert "| setup | small TTFT p50 |" in text and "| none |" in text and "| fair |" in text
    results = orjson.loads((tmp_path / "results.json").read_bytes())["results"]
    none, fair = results
    assert none["setup"] == "none" and fair["setup"] == "fair"
    for r in results:
        assert r["small_done"] > 0 and r["output_tps"] > 0 and r["hit_rate"] > 0
        assert 0 < r["small_hit_rate"] <= 1 and 0 < r["heavy_hit_rate"] <= 1  # pods reported cached tokens
        assert set(r["statuses"]) <= {f"{who}:{what}" for who in ("heavy", "small")
                                      for what in ("200", "429", "503", "cut")}
        assert r["evicted_blocks"] is not None  # the simulated pods export their eviction counter
        assert set(r["prefix_misses"]) == set(r["prefix_miss_tokens"]) == {"small", "heavy"}
        assert r["prefix_misses"]["heavy"] <= len(r["answered"]["heavy"])
        assert r["prefix_copies"]["heavy"] >= 1
        assert 0 < r["offered_mix_hit_rate"] <= 1
        assert 0 < r["offered_share"]["small"] < 1
    assert none["equal_n"] == fair["equal_n"]  # the same N for every setup
    assert none["equal_n"]["heavy"] == min(len(r["answered"]["heavy"]) for r in results) > 0
    assert "offered-mix hit rate: fair" in text and "equal-footing hit rate" in text
    assert none["small_admission_wait_p90"] is None and fair["small_admission_wait_p90"] is not None


async def test_admission_overhead_bench_reports_on_off_ratios() -> None:
    text = await run("-m", "bench.admission_overhead", "--requests", "50")
    assert "admission off: p50" in text and "admission on:  p50" in text and "on/off: p50" in text
