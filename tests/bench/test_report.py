"""Report writer: JSON with every figure, Markdown summary, PNG plots, terminal table and progress."""

from __future__ import annotations

import io

import orjson

from bench.loadgen.client import RequestResult
from bench.loadgen.podmetrics import PodFigures
from bench.loadgen.runner import Overhead
from bench.loadgen.stats import Dist, summarize
from bench.report.model import Report, RunRecord
from bench.report.table import ProgressBar, format_table
from bench.report.writer import write_report
from bench.workloads.ceiling import Ceiling


def _run(router: str, rate: float, ttft: float, hit: float) -> RunRecord:
    results = [RequestResult("t", 0.0, ttft=ttft * (1 + i / 10), e2e=ttft + 1, itl=[0.01], prompt_tokens=100,
                             output_tokens=10, status=200) for i in range(10)]
    pods = PodFigures(1000, 1000 * hit, 1000, 100, 0, 0.05, 0.1, [hit])
    return RunRecord(router, f"{rate:g}/s", rate, summarize(results, 2.0), pods,
                     Overhead(0.1, 1.0, 0.05, Dist.of([0.001])), [r.ttft for r in results])


def _report() -> Report:
    runs = [_run(p, rate, t, h) for rate in (5.0, 10.0)
            for p, t, h in (("round_robin", 0.4 * rate, 0.2), ("cache_aware/precise", 0.1, 0.7))]
    runs.append(RunRecord("sglang_router", "5/s", 5.0, failed="not installed"))
    return Report({"pods": 2, "model": "m", "command": "kvgate bench"}, {"name": "shared-prefix"},
                  Ceiling(1000, 800, 16), runs, ["sglang_router not installed: skipped"])


def test_report_folder_has_json_markdown_and_plots(tmp_path):
    files = write_report(_report(), tmp_path / "out", [b'{"a":1}\n'])
    names = {f.name for f in files}
    assert {"results.json", "summary.md", "requests.jsonl", "ttft_distribution.png", "rate_sweep.png",
            "hit_rate.png"} <= names
    data = orjson.loads((tmp_path / "out" / "results.json").read_bytes())
    assert data["ceiling"]["hit_rate"] == 0.8
    assert len(data["runs"]) == 5 and data["runs"][-1]["failed"] == "not installed"
    first = data["runs"][0]
    assert first["summary"]["ttft"]["p90"] > 0 and first["pods"]["hit_rate"] == 0.2
    assert first["loadgen_overhead"]["cpu_ms_per_request"] == 1.0
    assert data["ratios_vs_round_robin"]["cache_aware/precise @ 10/s"]["ttft_p90"] < 0.1
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| cache_aware/precise | 10/s |" in md and "80.0%" in md and "![rate_sweep](rate_sweep.png)" in md
    for f in files:
        if f.suffix == ".png":
            assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_single_load_skips_the_sweep_plot(tmp_path):
    r = _report()
    r.runs = [x for x in r.runs if x.rate == 5.0]
    names = {f.name for f in write_report(r, tmp_path)}
    assert "rate_sweep.png" not in names and "ttft_distribution.png" in names


def test_table_aligns_and_marks_failures():
    text = format_table(_report().runs)
    lines = text.splitlines()
    assert lines[0].startswith("router") and len({len(x) for x in lines[2:6]}) == 1
    assert "failed" in lines[-1]


def test_progress_without_tty_prints_one_line_per_ten_percent():
    out = io.StringIO()
    bar = ProgressBar(50, "round_robin", stream=out)
    for i in range(50):
        bar.update(ok=i != 3)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("[" + "#" * 30 + "] 50/50 round_robin (1 errors)")
