"""bench/stream_stall.py runs end to end (tiny sizes) and reports both settings' gaps."""

from __future__ import annotations

import asyncio
import sys

import orjson
import pytest

pytestmark = pytest.mark.timeout(120)


async def test_stream_stall_bench_reports_gaps_per_setting(tmp_path):
    out = tmp_path / "stall.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.stream_stall", "--streams", "4", "--burst", "2", "--burst-words", "400",
        "--rounds", "1", "--warmup-s", "0.2", "--quiet-s", "0.4", "--burst-budget-s", "5", "--out", str(out),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 110)
    assert proc.returncode == 0, stderr.decode()
    assert "added p99" in stdout.decode()
    runs = orjson.loads(out.read_bytes())["runs"]
    assert [r["tokenizer_workers"] for r in runs] == [0, 1]
    for r in runs:
        assert r["quiet"]["n"] > 0 and r["burst"]["n"] >= 0
        assert 0 < r["quiet"]["p50_ms"] <= r["quiet"]["p99_ms"] <= r["quiet"]["max_ms"]
        assert r["code"] == "this" and r["control"]["n"] >= 0  # a tiny burst may leave no chunk in it
        assert r["added_over_control_p99_ms"] == pytest.approx(r["burst"]["p99_ms"] - r["control"]["p99_ms"])
