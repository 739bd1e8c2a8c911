"""The robustness matrix: cells, fleet sizing, loads, the wall-time budget, and a tiny real run."""

from __future__ import annotations

import argparse
import io
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from bench import cli
from bench.capacity import PodCost, random_placement, round_robin_capacity
from bench.loadgen.routers import RouterSpec
from bench.loadgen.runner import run_async
from bench.matrix import (
    BASE_POD,
    LOADS,
    SCALES,
    WORKLOADS,
    MatrixOptions,
    arrival_for,
    estimate_seconds,
    fleet_weights,
    matrix_routers,
    plan_matrix,
    run_matrix,
    size_fleet,
)
from bench.workloads import OpenLoop, UniqueSpec, unique_prompts
from bench.workloads.arrivals import ClosedLoop, start_times
from bench.workloads.trace import DEFAULT_TRACE
from prefixindex.tokenizer import WordTokenizer


@pytest.fixture(scope="module")
def quick_plan():
    notes: list[str] = []
    return plan_matrix(SCALES["quick"], notes=notes), notes


def test_quick_covers_every_workload_and_load_on_the_uniform_fleet(quick_plan):
    groups, notes = quick_plan
    ids = {c.info.cell_id for g in groups for c in g.cells}
    skipped = {n.split()[1] for n in notes if n.startswith("workload ")}
    assert ids == {f"{w.name}/uniform/{load.name}" for w in WORKLOADS for load in LOADS
                   if w.name not in skipped}
    assert len(ids) >= 20 and ("trace" in skipped) == (not Path(DEFAULT_TRACE).exists())


def test_quick_is_budgeted_under_25_minutes(quick_plan):
    groups, _ = quick_plan
    assert estimate_seconds(groups, len(SCALES["quick"].routers)) < 25 * 60


def test_every_cell_fits_its_largest_request_and_reports_its_kv_share(quick_plan):
    groups, _ = quick_plan
    for g in groups:
        for c in g.cells:
            i = c.info
            assert i.largest_request_tokens * 2 <= min(i.pod_kv_tokens), i.cell_id
            assert i.kv_fraction == i.fleet_kv_tokens / i.working_set_tokens
            assert i.rr_capacity_rps == pytest.approx(SCALES["quick"].rr_capacity_rps)
    fits = {g.case: g.cells[0].info.fits for g in groups}
    assert fits["shared-prefix-sglang"] and not fits["shared-prefix-llmd"] and not fits["unique"]


def test_loads_are_fractions_of_round_robins_capacity(quick_plan):
    groups, _ = quick_plan
    for g in groups:
        arrivals = {c.info.load: (c.arrival, c.info) for c in g.cells}
        for name, factor in (("50%", 0.5), ("90%", 0.9), ("130%", 1.3)):
            arrival, info = arrivals[name]
            assert info.offered_rps == pytest.approx(factor * g.capacity_rps)
            assert isinstance(arrival, OpenLoop)
            if arrival.rate is None:  # a trace, replayed at the speed that gives the rate on average
                times = start_times(g.workload, arrival)
                assert g.workload.num_requests / times[-1] == pytest.approx(info.offered_rps, rel=0.05)
            else:  # sessions per second: a multi-turn session is several requests
                per_session = g.workload.num_requests / len(g.workload.sessions)
                assert arrival.rate * per_session == pytest.approx(info.offered_rps)
        closed, info = arrivals["closed"]
        assert closed == ClosedLoop(BASE_POD["max_num_seqs"] * 4) and info.users == closed.users


def test_two_size_fleet_alternates_half_pods_and_round_robin_waits_for_the_small_ones():
    kv, rate = fleet_weights("two-size", 4)
    assert rate == [1.0, 0.5, 1.0, 0.5] and kv[0] == 2 * kv[1] and sum(kv) == pytest.approx(4.0)
    w = unique_prompts(UniqueSpec(requests=40, prompt_tokens=200, output_tokens=4))
    per_pod, capacity, sizes = size_fleet(w, None, "two-size", 4, 10.0)
    assert capacity == pytest.approx(10.0)
    assert per_pod[0]["prefill_tps"] == pytest.approx(2 * per_pod[1]["prefill_tps"])
    assert (per_pod[0]["num_gpu_blocks"] - 1) == pytest.approx(2 * (per_pod[1]["num_gpu_blocks"] - 1), abs=1)
    small_kv = (per_pod[1]["num_gpu_blocks"] - 1) * BASE_POD["block_size"]
    assert small_kv >= 2 * sizes["largest_request_tokens"]
    # the same capacity recomputed from scratch: bench.capacity's content-blind estimate
    tok = WordTokenizer()
    prompts = [r.token_ids(tok) for r in w.requests()]
    placed = random_placement(prompts, [4] * 40, [p["num_gpu_blocks"] - 1 for p in per_pod], 16)
    costs = [PodCost.from_options({**BASE_POD, **p}) for p in per_pod]
    assert round_robin_capacity(costs, placed) == pytest.approx(10.0)


def test_full_adds_the_two_size_fleet():
    groups = plan_matrix(SCALES["full"], ["unique/*/closed"])
    assert [(g.case, g.fleet) for g in groups] == [("unique", "uniform"), ("unique", "two-size")]
    assert SCALES["full"].sglang and not SCALES["quick"].sglang


def test_cell_patterns_select_cells():
    groups = plan_matrix(replace(SCALES["quick"], requests=20), ["zipf/*/50%", "unique/uniform/closed"])
    assert [c.info.cell_id for g in groups for c in g.cells] == ["zipf/uniform/50%", "unique/uniform/closed"]


def test_arrival_for_a_trace_without_timestamps_spread_falls_back_to_poisson():
    w = unique_prompts(UniqueSpec(requests=10, prompt_tokens=20, output_tokens=2))
    arrival, rate = arrival_for(LOADS[1], w, 10.0, 8, seed=0)
    assert arrival == OpenLoop(9.0, seed=0) and rate == 9.0


def test_routers_not_registered_are_left_out_with_a_note():
    notes: list[str] = []
    specs = matrix_routers(["round_robin", "no_such_policy/approximate"], [], "off", "python", notes)
    assert [s.name for s in specs] == ["round_robin"] and "no_such_policy" in notes[0]


def test_bench_cli_matrix_plan_runs_nothing(capsys):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--matrix", "quick", "--matrix-plan", "--matrix-requests", "20",
                              "--matrix-cells", "unique/*", "--policies", "round_robin"])
    assert cli.run(args) == 0
    out = capsys.readouterr().out
    assert "unique/uniform/130%" in out and "4 cells x 1 routers = 4 runs" in out


@pytest.mark.slow
def test_a_two_cell_matrix_through_the_real_harness(tmp_path: Path):
    scale = replace(SCALES["quick"], requests=8, pods=2, warmup=1)
    groups = plan_matrix(scale, ["unique/uniform/90%", "unique/uniform/closed"])
    routers = [RouterSpec.parse("round_robin"), RouterSpec.parse("least_request")]
    opts = MatrixOptions(scale, routers, tmp_path, command="test")
    cells = run_async(run_matrix(groups, opts, stream=io.StringIO()))
    assert [c.info.cell_id for c in cells] == ["unique/uniform/90%", "unique/uniform/closed"]
    for c in cells:
        figs = c.figures()
        assert set(figs) == {"round_robin", "least_request"}
        for f in figs.values():
            assert (f.runs, f.requests_ok, f.errors) == (1, 8, 0) and f.ttft_p90 and f.ttft_p90 > 0
        for r in (runs[0] for runs in c.attempts.values()):
            assert r.pods is not None  # unique prompts hit only their own blocks, recomputed after preemption
            assert r.pods.prefix_hits == 0 or r.pods.preemptions > 0
    data = orjson.loads((tmp_path / "matrix.json").read_bytes())
    assert data["config"]["group_wall_s"]["unique-uniform"] > 0
    verdict = orjson.loads((tmp_path / "verdict.json").read_bytes())
    assert verdict["pass"] is None  # no cache_aware router ran: no check applies
    assert (tmp_path / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert "| round_robin | 1 | 8/0 |" in (tmp_path / "matrix.md").read_text()
    group = orjson.loads((tmp_path / "runs" / "unique-uniform" / "results.json").read_bytes())
    assert len(group["runs"]) == 4 and group["config"]["per_pod"] == groups[0].per_pod


@pytest.mark.slow
def test_noisy_cells_are_run_three_times_and_reported_as_medians(tmp_path: Path):
    scale = replace(SCALES["quick"], requests=6, pods=2, warmup=0)
    groups = plan_matrix(scale, ["unique/uniform/closed"])
    routers = [RouterSpec.parse("round_robin"), RouterSpec.parse("least_request")]
    # least_request as the candidate, with a noise band so wide that its check is always noisy
    opts = MatrixOptions(scale, routers, tmp_path, rerun_noisy=True, noise=100.0, candidate="least_request")
    [cell] = run_async(run_matrix(groups, opts, stream=io.StringIO()))
    assert {r: len(runs) for r, runs in cell.attempts.items()} == {"round_robin": 3, "least_request": 3}
    f = cell.figures()["least_request"]
    p90s = sorted(r.summary.ttft.p90 for r in cell.attempts["least_request"] if r.summary)
    assert f.runs == 3 and f.ttft_p90 == p90s[1]
    verdict = orjson.loads((tmp_path / "verdict.json").read_bytes())
    assert verdict["cells"]["unique/uniform/closed"]["runs_per_router"] == 3
    assert (tmp_path / "runs" / "unique-uniform-rerun2" / "results.json").exists()
