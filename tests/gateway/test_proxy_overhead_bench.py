"""bench/proxy_overhead.py runs end to end (tiny sizes) and reports consistent figures."""

from __future__ import annotations

import asyncio
import sys

import orjson


async def test_proxy_overhead_bench_reports_ratios(tmp_path):
    out = tmp_path / "overhead.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.proxy_overhead", "--requests", "60", "--load-seconds", "0.5",
        "--load-concurrency", "4", "--out", str(out),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, stderr.decode()
    assert "stream first chunk p50" in stdout.decode()
    result = orjson.loads(out.read_bytes())
    assert result["requests_per_mode"] == 60
    for kind in ("full", "ttft"):
        r = result[kind]
        assert 0 < r["direct_p50_ms"] <= r["direct_p99_ms"]
        assert 0 < r["gateway_p50_ms"] <= r["gateway_p99_ms"]
        # the gateway is one more hop: it cannot be faster than going direct
        assert r["p50_ratio"] > 1.0
    assert result["gateway_cpu_us_per_request"] > 0 and result["pod_cpu_us_per_request"] > 0
    assert result["load"]["requests_per_s"] > 0
