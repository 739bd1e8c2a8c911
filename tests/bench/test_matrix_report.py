"""The matrix's verdict (issue 11's bar, per cell), medians over re-runs, tables, files and heatmap."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import orjson

from bench.loadgen.client import RequestResult
from bench.loadgen.podmetrics import PodFigures
from bench.loadgen.stats import summarize
from bench.report.heatmap import plot_relative_heatmap, relative_to_best
from bench.report.matrix_report import (
    CellInfo,
    CellResult,
    RouterFigures,
    cell_checks,
    cell_passed,
    cell_table,
    verdict_json,
    write_matrix,
)
from bench.report.model import RunRecord

INFO = CellInfo(cell_id="zipf/uniform/90%", workload="zipf", fleet="uniform", load="90%", load_factor=0.9,
                offered_rps=9.0, users=None, rr_capacity_rps=10.0, requests=10, pod_kv_tokens=(1000, 1000),
                prefill_tps=(500.0, 500.0), working_set_tokens=1500, largest_request_tokens=300,
                ceiling_hit_rate=0.5)


def run(router: str, p90: float, hit: float | None = None, load: str = "9/s") -> RunRecord:
    """A run whose every TTFT is `p90` (so p50 = p90 = p99) and whose pods hit `hit` of 200 tokens."""
    results = [RequestResult(f"r{i}", 0.0, ttft=p90, e2e=p90 + 0.1, output_tokens=2, status=200)
               for i in range(10)]
    pods = None
    if hit is not None:
        pods = PodFigures(200.0, hit * 200.0, 200.0, 20.0, 0.0, None, None, [])
    return RunRecord(router, load, 9.0, summary=summarize(results, 2.0), pods=pods)


def cell(info: CellInfo = INFO, **p90s: float) -> CellResult:
    c = CellResult(info)
    for name, p90 in p90s.items():
        c.add(run(name.replace("__", "/"), p90, hit=0.5))
    return c


def by_name(checks):
    return {(c.router, c.name): c for c in checks}


def test_p90_against_the_best_load_balancer_boundary_passes():
    checks = by_name(cell_checks(cell(round_robin=1.2, least_request=1.0, cache_aware__precise=1.05)))
    c = checks[("cache_aware/precise", "p90_vs_load_balancers")]
    assert (c.value, c.passed, c.noisy) == (1.05, True, True)  # exactly the limit passes, and is noise
    worse = by_name(cell_checks(cell(round_robin=1.0, least_request=2.0, cache_aware__precise=1.3)))
    c = worse[("cache_aware/precise", "p90_vs_load_balancers")]
    assert c.passed is False and not c.noisy and "round_robin" in c.detail


def test_only_the_candidate_policy_is_checked():
    checks = cell_checks(cell(round_robin=1.0, least_request=1.0, weighted__approximate=9.0,
                              cache_aware__approximate=1.0, cache_aware__precise=1.0))
    assert {c.router for c in checks} == {"cache_aware/approximate", "cache_aware/precise"}
    assert {c.router for c in cell_checks(cell(round_robin=1.0, weighted__approximate=9.0),
                                          candidate="weighted")} == {"weighted/approximate"}


def test_sglang_check_applies_where_prompts_share_and_it_ran():
    checks = by_name(cell_checks(cell(round_robin=1.0, cache_aware__precise=0.8, sglang_router=1.0)))
    assert checks[("cache_aware/precise", "p90_vs_sglang")].passed is True  # 0.8x exactly
    no_sglang = by_name(cell_checks(cell(round_robin=1.0, cache_aware__precise=0.8)))
    assert no_sglang[("cache_aware/precise", "p90_vs_sglang")].status == "skip"
    unique = replace(INFO, ceiling_hit_rate=0.0)
    nothing_shared = by_name(cell_checks(cell(unique, round_robin=1.0, cache_aware__precise=5.0,
                                              sglang_router=1.0)))
    assert nothing_shared[("cache_aware/precise", "p90_vs_sglang")].status == "skip"
    assert nothing_shared[("cache_aware/precise", "hit_vs_ceiling")].status == "skip"


def test_saturated_cells_need_twenty_times_below_round_robin():
    saturated = replace(INFO, load="130%", load_factor=1.3, offered_rps=13.0)
    checks = by_name(cell_checks(cell(saturated, round_robin=2.0, least_request=2.0,
                                      cache_aware__precise=0.1)))
    c = checks[("cache_aware/precise", "p90_vs_round_robin_saturated")]
    assert (c.value, c.passed) == (0.05, True)
    assert "completed" in c.detail
    failing = by_name(cell_checks(cell(saturated, round_robin=2.0, cache_aware__precise=0.2)))
    assert failing[("cache_aware/precise", "p90_vs_round_robin_saturated")].passed is False
    below = by_name(cell_checks(cell(round_robin=2.0, cache_aware__precise=1.0)))  # 90%: not saturated
    assert below[("cache_aware/precise", "p90_vs_round_robin_saturated")].status == "skip"
    closed = replace(INFO, load="closed", load_factor=None, offered_rps=None, users=8)
    assert not closed.saturates_round_robin


def test_hit_rate_against_the_ceiling_only_where_the_working_set_fits():
    fits = replace(INFO, working_set_tokens=2000)  # fleet KV 2000: exactly fits
    assert fits.fits and fits.kv_fraction == 1.0
    c = CellResult(fits)
    c.add(run("round_robin", 1.0, hit=0.2))
    c.add(run("cache_aware/precise", 1.0, hit=0.475))  # 0.95 of the 0.5 ceiling exactly
    checks = by_name(cell_checks(c))
    assert checks[("cache_aware/precise", "hit_vs_ceiling")].passed is True
    c.attempts["cache_aware/precise"] = [run("cache_aware/precise", 1.0, hit=0.4)]
    assert by_name(cell_checks(c))[("cache_aware/precise", "hit_vs_ceiling")].passed is False
    too_big = replace(INFO, working_set_tokens=2001)
    assert not too_big.fits
    c = CellResult(too_big)
    c.add(run("cache_aware/precise", 1.0, hit=0.1))
    assert by_name(cell_checks(c))[("cache_aware/precise", "hit_vs_ceiling")].status == "skip"


def test_figures_are_medians_of_the_runs_and_failed_runs_are_reported():
    c = CellResult(INFO)
    for p90 in (1.0, 3.0, 2.0):
        c.add(run("cache_aware/precise", p90, hit=p90 / 10))
    c.add(RunRecord("least_request", "9/s", 9.0, failed="router did not start: boom"))
    figs = c.figures()
    f = figs["cache_aware/precise"]
    assert (f.runs, f.ttft_p90, f.hit_rate, f.requests_ok) == (3, 2.0, 0.2, 30)
    assert figs["least_request"] == RouterFigures("least_request", 0, 0, 0, None, None, None, None, None,
                                                  None, "router did not start: boom")
    table = cell_table(c)
    assert "| cache_aware/precise | 3 | 30/0 | 2000 ms |" in table and "failed: router did not start" in table
    skip = by_name(cell_checks(c))[("cache_aware/precise", "p90_vs_load_balancers")]
    assert skip.status == "skip"


def test_cell_and_matrix_verdicts():
    good = cell(round_robin=1.0, least_request=1.0, cache_aware__precise=0.5)
    bad = cell(replace(INFO, cell_id="unique/uniform/50%"), round_robin=1.0, cache_aware__precise=2.0)
    assert cell_passed(cell_checks(good)) is True and cell_passed(cell_checks(bad)) is False
    assert cell_passed(cell_checks(cell(round_robin=1.0))) is None  # no candidate: nothing applies
    v = verdict_json([good, bad])
    assert v["pass"] is False and [f["cell"] for f in v["failed"]] == ["unique/uniform/50%"]
    assert v["cells"]["zipf/uniform/90%"]["pass"] is True
    assert verdict_json([good])["pass"] is True
    assert verdict_json([cell(round_robin=1.0)])["pass"] is None


def test_relative_to_best():
    assert relative_to_best({"a": 2.0, "b": 1.0, "c": None}) == {"a": 2.0, "b": 1.0, "c": None}
    assert relative_to_best({"a": None}) == {"a": None}


def test_heatmap_png_with_a_missing_square(tmp_path: Path):
    path = plot_relative_heatmap(["rr", "ca"], ["c1", "c2"], {("rr", "c1"): 1.0, ("ca", "c1"): 3.5,
                                                             ("rr", "c2"): 1.0}, tmp_path / "h.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_write_matrix_files(tmp_path: Path):
    cells = [cell(round_robin=1.0, least_request=1.2, cache_aware__precise=0.5),
             cell(replace(INFO, cell_id="unique/uniform/50%", ceiling_hit_rate=0.0), round_robin=1.0,
                  cache_aware__precise=1.5)]
    files = write_matrix(cells, tmp_path, {"scale": "quick", "routers": ["round_robin"], "command": "x"})
    assert {f.name for f in files} == {"matrix.md", "matrix.json", "verdict.json", "heatmap.png"}
    verdict = orjson.loads((tmp_path / "verdict.json").read_bytes())
    assert verdict["pass"] is False and verdict["failed"][0]["cell"] == "unique/uniform/50%"
    data = orjson.loads((tmp_path / "matrix.json").read_bytes())
    assert [c["info"]["cell_id"] for c in data["cells"]] == ["zipf/uniform/90%", "unique/uniform/50%"]
    assert data["cells"][0]["p90_relative_to_best"] == {"round_robin": 2.0, "least_request": 2.4,
                                                        "cache_aware/precise": 1.0}
    assert data["cells"][0]["info"]["kv_fraction_of_working_set"] == 2000 / 1500
    md = (tmp_path / "matrix.md").read_text()
    assert "## zipf/uniform/90% (pass)" in md and "## unique/uniform/50% (FAIL)" in md
    assert "133% of the working set" in md and "![" in md
    assert (tmp_path / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
