"""The locustfile runs headless as its own process and records TTFT as a custom metric."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import orjson
import pytest

LOCUSTFILE = Path(__file__).resolve().parents[2] / "bench" / "locustfile.py"


@pytest.mark.slow
async def test_headless_locust_sends_the_workload_and_reports_ttft(fake_server, tmp_path):
    locust = shutil.which("locust", path=str(Path(sys.executable).parent))
    assert locust is not None
    fake_server.delay_s = 0.02
    proc = await asyncio.create_subprocess_exec(
        locust, "-f", str(LOCUSTFILE), "--headless", "-u", "2", "-r", "2", "--run-time", "30s",
        "--host", fake_server.url, "--json",
        "--kvgate-model", "m", "--kvgate-groups", "2", "--kvgate-prompts-per-group", "3",
        "--kvgate-system-tokens", "20", "--kvgate-question-tokens", "4", "--kvgate-output-tokens", "3",
        "--kvgate-once",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert len(fake_server.bodies) == 6  # --kvgate-once: the 6 requests, then stop
    assert all(b["stream"] and b["max_tokens"] == 3 for b in fake_server.bodies)
    rows = {(r["method"], r["name"]): r for r in orjson.loads(out)}  # locust --json: final stats
    ttft = rows[("TTFT", "/v1/completions")]
    e2e = rows[("E2E", "/v1/completions")]
    assert ttft["num_requests"] == 6 and ttft["num_failures"] == 0
    assert 20 <= ttft["min_response_time"] <= ttft["max_response_time"] <= e2e["max_response_time"]
