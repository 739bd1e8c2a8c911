"""bench/pd_compare.py end to end, scaled down: real `kvgate sim` and `kvgate serve` processes."""

from __future__ import annotations

import asyncio
import sys

import orjson
import pytest

pytestmark = pytest.mark.slow


async def test_pd_compare_runs_both_setups(tmp_path):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.pd_compare", "--pods", "2", "--prefill-pods", "1", "--requests", "6",
        "--rate", "20", "--prompt-tokens", "400", "--output-tokens", "6", "--threshold-tokens", "64",
        "--out", str(tmp_path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    text = out.decode()
    assert proc.returncode == 0, text
    assert "aggregated 2x" in text and "disaggregated 1P+1D" in text and "TTFT" in text
    setups = orjson.loads((tmp_path / "results.json").read_bytes())["setups"]
    aggregated, disaggregated = setups
    assert aggregated["roles"] == ["both", "both"] and aggregated["pd_decisions"] == {}
    assert disaggregated["roles"] == ["prefill", "decode"]
    assert disaggregated["pd_decisions"]["disaggregated"] == 6  # every long prompt went through a prefill pod
    for setup in setups:
        summary = setup["summary"]
        assert summary["ok"] == 6 and summary["errors"] == 0
        assert summary["ttft"]["n"] == 6 and summary["output_tokens"] == 6 * 6
        assert 0 < summary["itl"]["n"] <= 6 * 5  # tokens a slow reader missed arrive merged
