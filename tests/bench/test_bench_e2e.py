"""`kvgate bench` end to end as a real process: 2 simulated pods, 3 routers, a handful of requests."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from bench import cli

TINY = [
    "--pods", "2", "--num-gpu-blocks", "65", "--prefill-tps", "20000", "--itl-ms", "2",
    "--groups", "4", "--prompts-per-group", "3", "--system-tokens", "64", "--question-tokens", "8",
    "--output-tokens", "4", "--rate", "20", "--warmup", "2", "--sglang", "off",
]


@pytest.mark.slow
def test_tiny_bench_run_writes_a_complete_report(tmp_path: Path):
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "bench", *TINY,
         "--policies", "round_robin,cache_aware/approximate,cache_aware/precise", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "cache_aware/approximate" in proc.stdout and "TTFT p90" in proc.stdout

    data = orjson.loads((out / "results.json").read_bytes())
    assert [r["router"] for r in data["runs"]] == ["round_robin", "cache_aware/approximate",
                                                   "cache_aware/precise"]
    # 4 groups x 3 prompts of 72 tokens: per group, 2 of 3 prompts can reuse the 4 system blocks
    assert data["ceiling"]["prompt_tokens"] == 12 * 72 and data["ceiling"]["hit_tokens"] == 4 * 2 * 64
    hits = {}
    for run in data["runs"]:
        s = run["summary"]
        assert (s["requests"], s["ok"], s["errors"]) == (12, 12, 0)
        assert s["ttft"]["p90"] > 0 and s["output_tokens"] == 12 * 4 and s["output_tps"] > 0
        assert sum(s["by_endpoint"].values()) == 12
        assert run["pods"]["prefix_queries"] == 12 * 72  # warm-up excluded: measured at the pods
        hits[run["router"]] = run["pods"]["hit_rate"]
        assert len(run["ttft_samples"]) == 12 and run["loadgen_overhead"]["cpu_ms_per_request"] > 0
    # seeded order: round robin splits groups over both pods; cache-aware keeps them together (the
    # precise index only can when the pods' KV events reach the gateway)
    assert hits["cache_aware/approximate"] > hits["round_robin"]
    assert hits["cache_aware/precise"] > hits["round_robin"]
    assert "cache_aware/approximate @ 20/s" in data["ratios_vs_round_robin"]

    lines = (out / "requests.jsonl").read_bytes().splitlines()
    assert len(lines) == 36 and all(orjson.loads(x)["status"] == 200 for x in lines)
    summary = (out / "summary.md").read_text()
    assert "| cache_aware/approximate | 20/s | 12/0 |" in summary
    for png in ("ttft_distribution.png", "hit_rate.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert (out / "logs" / "router-round_robin.log").exists()


@pytest.mark.slow
def test_a_router_that_cannot_start_is_reported_not_hung(tmp_path: Path):
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "bench", *TINY, "--policies", "round_robin",
         "--gateway-arg=--no-such-flag", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    data = orjson.loads((out / "results.json").read_bytes())
    assert data["runs"][0]["failed"].startswith("router did not start")
    assert any("router did not start" in n for n in data["notes"])


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("argv", [
    ["--pod-opt", "jitter"],
    ["--pod-opt", "no_such_option=1"],
    ["--policies", "cache_aware/exact"],
    ["--groups", "0"],
    ["--rates", "5,-1"],
])
def test_bad_options_exit_2_with_a_message(argv, tmp_path, capsys):
    assert cli.run(_args(*argv, "--out", str(tmp_path), "--sglang", "off")) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvgate bench: ") and "Traceback" not in err
