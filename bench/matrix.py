"""The robustness matrix: every router on every (workload, fleet, load) cell of the simulated fleet.

    kvgate bench --matrix quick --out bench-out/matrix-quick        # every workload and load kind
    kvgate bench --matrix full --out bench-out/matrix-full          # + two-size fleets, SGLang router
    kvgate bench --matrix quick --matrix-plan                       # the cells and a wall-time estimate
    python -m bench.matrix --matrix quick --matrix-cells 'zipf/*' --rerun-noisy

Workloads (`WORKLOADS`): shared prefix in llm-d's shape (5 prompts a group, question = system / 5)
and SGLang's (16 a group, question = system / 16), Zipf-skewed prefix popularity (one prefix 40% of the
traffic), multi-turn chat with growing history, the Mooncake conversation trace, unique prompts.
Fleets: `uniform` pods, and `two-size`: pods alternately big and small, a small pod with half a big
one's prefill rate and KV (the fleet's KV equal to the uniform fleet's). Loads: open loop at 50%, 90%
and 130% of round robin's capacity, and a closed loop of as many users as the fleet has batch slots.

Each (workload, fleet) is sized to its workload (`size_fleet`): pods' KV so the fleet holds the
workload's `kv_holds` fraction of its working set, but never less than twice the largest request per
pod; prefill rate so that round robin's capacity (`bench.capacity`) is the scale's target, so every
cell's runs take about the same time whatever its prompt lengths (a simulated pod's absolute speed is
arbitrary; load relative to capacity is what matters). The cells of one (workload, fleet) share one
fleet and one `bench.loadgen.harness.run_comparison`, whose standard report lands in
`<out>/runs/<workload>-<fleet>/`; the matrix's own files are described in bench/report/matrix_report.py.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.capacity import PodCost, prefill_scale_for_capacity, random_placement, round_robin_capacity
from bench.loadgen.harness import HarnessConfig, run_comparison
from bench.loadgen.routers import SGLANG, RouterSpec, sglang_available
from bench.loadgen.runner import run_async
from bench.report.matrix_report import CANDIDATE, NOISE, CellInfo, CellResult, verdict_json, write_matrix
from bench.report.model import Report
from bench.report.writer import write_report
from bench.workloads import (
    ClosedLoop,
    MultiTurnSpec,
    OpenLoop,
    SharedPrefixSpec,
    TraceSpec,
    UniqueSpec,
    Workload,
    ZipfPrefixSpec,
    infinite_cache_ceiling,
    multi_turn,
    shared_prefix,
    unique_prompts,
    zipf_prefix,
)
from bench.workloads.arrivals import Arrival
from bench.workloads.trace import DEFAULT_TRACE, read_trace, trace_workload
from bench.workloads.trace_sample import sample_conversations
from prefixindex.tokenizer import WordTokenizer

MAIN_ROUTERS = ("round_robin", "least_request", "weighted/approximate", "cache_aware/approximate",
                "cache_aware/precise")
# What every pod shares; num_gpu_blocks and prefill_tps are sized per cell. A short decode step and a
# small batch limit: the cells stay short, and a full batch (a request waiting for a slot) happens.
BASE_POD: dict[str, Any] = {"block_size": 16, "itl_ms": 8.0, "itl_ms_per_seq": 0.2, "max_num_seqs": 4,
                            "max_num_batched_tokens": 2048}
# Wall-time model of one run beyond its requests (router start and stop, cache reset, warm-up,
# metrics) and of one fleet start, measured on the 2-core machine (bench/RESULTS.md).
RUN_OVERHEAD_S = 1.5
FLEET_START_S = 3.0
TRACE_POOL = 25  # the trace cell samples its conversations from the first 25 x requests records


@dataclass(slots=True, frozen=True)
class Scale:
    """How big a matrix is: requests per cell, output tokens, round robin's target capacity, what runs."""

    name: str
    requests: int
    output_tokens: int
    rr_capacity_rps: float
    fleets: tuple[str, ...]
    routers: tuple[str, ...] = MAIN_ROUTERS
    sglang: bool = False  # add the SGLang router when installed
    pods: int = 4
    warmup: int = 4


SCALES: dict[str, Scale] = {
    # 6 workloads x 4 loads x 5 routers = 120 runs of 120 requests at 24 req/s capacity: ~17 min.
    "quick": Scale("quick", requests=120, output_tokens=8, rr_capacity_rps=24.0, fleets=("uniform",)),
    "full": Scale("full", requests=480, output_tokens=16, rr_capacity_rps=24.0,
                  fleets=("uniform", "two-size"), sglang=True),
}


@dataclass(slots=True, frozen=True)
class WorkloadCase:
    """A matrix workload: `build(requests, output_tokens, seed)`, and how much of its working set the
    fleet's KV holds (None: as little as the largest request allows)."""

    name: str
    build: Callable[[int, int, int], Workload]
    kv_holds: float | None


def _llmd(n: int, out: int, seed: int) -> Workload:
    return shared_prefix(SharedPrefixSpec(groups=max(2, n // 5), prompts_per_group=5, system_tokens=500,
                                          question_tokens=100, output_tokens=out, seed=seed))


def _sglang(n: int, out: int, seed: int) -> Workload:
    return shared_prefix(SharedPrefixSpec(groups=max(2, n // 16), prompts_per_group=16, system_tokens=1024,
                                          question_tokens=64, output_tokens=out, seed=seed))


def _zipf(n: int, out: int, seed: int) -> Workload:
    return zipf_prefix(ZipfPrefixSpec(prefixes=max(3, n // 4), requests=n, top_share=0.4, prefix_tokens=512,
                                      question_tokens=48, output_tokens=out, seed=seed))


def _multi_turn(n: int, out: int, seed: int) -> Workload:
    return multi_turn(MultiTurnSpec(conversations=max(1, n // 5), turns=5, system_tokens=128, user_tokens=64,
                                    output_tokens=out, think_time=0.5, seed=seed))


def _trace(n: int, out: int, seed: int) -> Workload:
    """Whole conversations sampled from the trace's first TRACE_POOL x n records (its first n alone
    share almost nothing: bench/workloads/trace_sample.py)."""
    records = read_trace(DEFAULT_TRACE, first=TRACE_POOL * n)
    spec = TraceSpec(path=DEFAULT_TRACE, block_tokens=16, max_output_tokens=out, seed=seed)
    return trace_workload(sample_conversations(records, n, seed), spec)


def _unique(n: int, out: int, seed: int) -> Workload:
    return unique_prompts(UniqueSpec(requests=n, prompt_tokens=384, length_spread=0.5, output_tokens=out,
                                     seed=seed))


WORKLOADS: tuple[WorkloadCase, ...] = (
    WorkloadCase("shared-prefix-llmd", _llmd, kv_holds=0.7),  # prefixes need ~73% of the KV, as llm-d's
    WorkloadCase("shared-prefix-sglang", _sglang, kv_holds=1.25),  # the working set fits
    WorkloadCase("zipf", _zipf, kv_holds=0.5),
    WorkloadCase("multi-turn", _multi_turn, kv_holds=0.6),
    WorkloadCase("trace", _trace, kv_holds=0.5),
    WorkloadCase("unique", _unique, kv_holds=None),
)


@dataclass(slots=True, frozen=True)
class LoadKind:
    name: str
    factor: float | None  # of round robin's capacity; None: closed loop


LOADS: tuple[LoadKind, ...] = (LoadKind("50%", 0.5), LoadKind("90%", 0.9), LoadKind("130%", 1.3),
                               LoadKind("closed", None))


def fleet_weights(fleet: str, pods: int) -> tuple[list[float], list[float]]:
    """(KV weight, prefill-rate weight) of each pod. two-size alternates big and small pods (so list
    order favours neither), a small one with half a big one's KV and rate; KV weights average 1."""
    if fleet == "uniform":
        return [1.0] * pods, [1.0] * pods
    if fleet == "two-size":
        big = [i % 2 == 0 for i in range(pods)]
        kv = [4 / 3 if b else 2 / 3 for b in big]
        return kv, [1.0 if b else 0.5 for b in big]
    raise ValueError(f"unknown fleet {fleet!r}; known: uniform, two-size")


@dataclass(slots=True)
class CellPlan:
    info: CellInfo
    arrival: Arrival


@dataclass(slots=True)
class GroupPlan:
    """One workload on one fleet: the cells (one per load) that share a fleet and a comparison."""

    case: str
    fleet: str
    workload: Workload
    per_pod: list[dict[str, Any]]
    capacity_rps: float
    cells: list[CellPlan] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.case}-{self.fleet}"


def size_fleet(workload: Workload, kv_holds: float | None, fleet: str, pods: int, target_rps: float,
               seed: int = 0) -> tuple[list[dict[str, Any]], float, dict[str, int]]:
    """Per-pod options (num_gpu_blocks, prefill_tps) for `workload`, round robin's capacity, and sizes.

    Usable blocks of pod i: weight_i x the base, the base making the fleet hold `kv_holds` of the
    working set; but no pod holds less than twice the largest request (one request never needs a whole
    cache) or a full batch (`max_num_seqs`) of average requests: the batch limit, not KV pressure,
    bounds a pod that a router loads up (preemption would blur what the cell measures). Prefill rates:
    weight_i x k, k solved so round robin's capacity is `target_rps` with the uncached tokens of a
    content-blind placement (bench.capacity).
    """
    bs = BASE_POD["block_size"]
    tok = WordTokenizer()
    reqs = list(workload.requests())
    prompts = [r.token_ids(tok) for r in reqs]
    outputs = [r.max_tokens for r in reqs]
    ceiling = infinite_cache_ceiling(prompts, bs)
    working_set = ceiling.prompt_tokens - ceiling.hit_tokens
    sizes_each = [len(p) + o for p, o in zip(prompts, outputs, strict=True)]
    largest = max(sizes_each)
    full_batch = BASE_POD["max_num_seqs"] * sum(sizes_each) / len(sizes_each)
    kv_w, rate_w = fleet_weights(fleet, pods)
    floor_blocks = math.ceil(max(2 * largest, full_batch) / bs)
    base = floor_blocks / min(kv_w)
    if kv_holds is not None:
        base = max(base, kv_holds * working_set / bs / sum(kv_w))
    usable = [max(floor_blocks, math.ceil(base * w)) for w in kv_w]
    placed = random_placement(prompts, outputs, usable, bs, seed)
    shape = [PodCost.from_options({**BASE_POD, "prefill_tps": w}) for w in rate_w]
    k = prefill_scale_for_capacity(target_rps, shape, placed)
    per_pod = [{"num_gpu_blocks": u + 1, "prefill_tps": k * w} for u, w in zip(usable, rate_w, strict=True)]
    costs = [PodCost.from_options({**BASE_POD, **p}) for p in per_pod]
    sizes = {"working_set_tokens": working_set, "largest_request_tokens": largest,
             "prompt_tokens": ceiling.prompt_tokens, "hit_tokens": ceiling.hit_tokens}
    return per_pod, round_robin_capacity(costs, placed), sizes


def arrival_for(load: LoadKind, workload: Workload, capacity_rps: float, users: int,
                seed: int) -> tuple[Arrival, float | None]:
    """The arrival process of `load` and its offered request rate (None: closed loop).

    A trace keeps its own inter-arrival pattern, replayed at the speed that gives the rate; other
    workloads start sessions at Poisson times (a multi-turn session is several requests).
    """
    if load.factor is None:
        return ClosedLoop(users), None
    rate = load.factor * capacity_rps
    n = workload.num_requests
    times = [s.at for s in workload.sessions]
    if all(t is not None for t in times) and len(times) > 1:
        span = float(times[-1] - times[0])  # type: ignore[operator]
        if span > 0:
            return OpenLoop(None, speed=rate * span / n), rate
    return OpenLoop(rate * len(workload.sessions) / n, seed=seed), rate


@dataclass(slots=True)
class MatrixOptions:
    scale: Scale
    routers: list[RouterSpec]
    out_dir: Path
    cells: list[str] = field(default_factory=list)  # fnmatch patterns on cell ids; empty: all
    seed: int = 0
    model: str = "sim-model"
    rerun_noisy: bool = False
    noise: float = NOISE
    candidate: str = CANDIDATE
    request_timeout_s: float = 300.0
    command: str = ""
    notes: list[str] = field(default_factory=list)


def plan_matrix(scale: Scale, patterns: Sequence[str] = (), seed: int = 0,
                notes: list[str] | None = None) -> list[GroupPlan]:
    """Every (workload, fleet) group of `scale` with the cells selected by `patterns` (all if empty)."""
    groups = []
    for case in WORKLOADS:
        try:
            workload = case.build(scale.requests, scale.output_tokens, seed)
        except (OSError, ValueError) as exc:
            if notes is not None:
                notes.append(f"workload {case.name} skipped: {exc}")
            continue
        for fleet in scale.fleets:
            wanted = [load for load in LOADS if _selected(f"{case.name}/{fleet}/{load.name}", patterns)]
            if not wanted:
                continue
            per_pod, capacity, sizes = size_fleet(workload, case.kv_holds, fleet, scale.pods,
                                                  scale.rr_capacity_rps, seed)
            group = GroupPlan(case.name, fleet, workload, per_pod, capacity)
            users = BASE_POD["max_num_seqs"] * scale.pods  # as many users as the fleet has batch slots
            hit = sizes["hit_tokens"] / sizes["prompt_tokens"] if sizes["prompt_tokens"] else 0.0
            for load in wanted:
                arrival, rate = arrival_for(load, workload, capacity, users, seed)
                info = CellInfo(
                    cell_id=f"{case.name}/{fleet}/{load.name}", workload=case.name, fleet=fleet,
                    load=load.name,
                    load_factor=load.factor, offered_rps=rate, users=users if rate is None else None,
                    rr_capacity_rps=capacity, requests=workload.num_requests,
                    pod_kv_tokens=tuple((p["num_gpu_blocks"] - 1) * BASE_POD["block_size"] for p in per_pod),
                    prefill_tps=tuple(p["prefill_tps"] for p in per_pod),
                    working_set_tokens=sizes["working_set_tokens"],
                    largest_request_tokens=sizes["largest_request_tokens"], ceiling_hit_rate=hit)
                group.cells.append(CellPlan(info, arrival))
            groups.append(group)
    return groups


def _selected(cell_id: str, patterns: Sequence[str]) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(cell_id, p) for p in patterns)


def estimate_run_seconds(cell: CellPlan, workload: Workload) -> float:
    """Wall seconds one router takes on `cell` (its slowest router: the one at round robin's capacity)."""
    info = cell.info
    n = workload.num_requests
    turns = max(len(s.requests) for s in workload.sessions)
    think = max((sum(s.think_times) for s in workload.sessions), default=0.0)
    serve = n / info.rr_capacity_rps
    if info.offered_rps is None:
        users = info.users or 1
        sessions_per_user = len(workload.sessions) / users
        return RUN_OVERHEAD_S + max(serve, sessions_per_user * (think + turns * 0.2))
    return RUN_OVERHEAD_S + max(n / info.offered_rps, serve) + think + 0.5


def estimate_seconds(groups: Sequence[GroupPlan], routers: int) -> float:
    return sum(FLEET_START_S + routers * sum(estimate_run_seconds(c, g.workload) for c in g.cells)
               for g in groups)


def format_plan(groups: Sequence[GroupPlan], routers: Sequence[RouterSpec]) -> str:
    lines = [f"{'cell':34} {'reqs':>5} {'load':>16} {'rr cap':>7} {'KV/WS':>6} {'ceiling':>7} {'est s':>6}"]
    for g in groups:
        for c in g.cells:
            i = c.info
            load = f"{i.offered_rps:.1f} req/s" if i.offered_rps is not None else f"{i.users} users"
            est = len(routers) * estimate_run_seconds(c, g.workload)
            lines.append(f"{i.cell_id:34} {i.requests:>5} {load:>16} {i.rr_capacity_rps:>7.1f} "
                         f"{i.kv_fraction:>6.0%} {i.ceiling_hit_rate:>7.1%} {est:>6.0f}")
    cells = sum(len(g.cells) for g in groups)
    lines.append(f"{cells} cells x {len(routers)} routers = {cells * len(routers)} runs; estimated wall "
                 f"{estimate_seconds(groups, len(routers)) / 60:.1f} min")
    return "\n".join(lines)


async def _run_group(group: GroupPlan, cells: Sequence[CellPlan], opts: MatrixOptions, out_dir: Path,
                     results: dict[str, CellResult], stream: Any) -> float:
    """One comparison over `cells` of `group`; their records are added to `results`. Returns wall s."""
    started = time.monotonic()
    scale = opts.scale
    cfg = HarnessConfig(model=opts.model, pods=scale.pods, pod_options=dict(BASE_POD) | {"seed": opts.seed},
                        routers=opts.routers, loads=[c.arrival for c in cells], out_dir=out_dir,
                        warmup=scale.warmup, seed=opts.seed, request_timeout_s=opts.request_timeout_s,
                        per_pod=group.per_pod)
    tok = WordTokenizer()
    ceiling = infinite_cache_ceiling((r.token_ids(tok) for r in group.workload.requests()),
                                     BASE_POD["block_size"])
    config = {"command": opts.command, "matrix_group": group.name, "pods": scale.pods,
              "pod_options": cfg.pod_options, "per_pod": group.per_pod, "model": opts.model,
              "routers": [s.name for s in opts.routers], "loads": [c.info.load for c in cells],
              "rr_capacity_rps": group.capacity_rps}
    report = Report(config, {"name": group.workload.name, **group.workload.params,
                             "requests": group.workload.num_requests}, ceiling)
    by_label = {c.arrival.label(): c.info.cell_id for c in cells}
    lines: list[bytes] = []
    try:
        lines = await run_comparison(cfg, group.workload, report, stream)
    finally:
        for record in report.runs:
            results[by_label[record.load]].add(record)
        report.config["wall_s"] = round(time.monotonic() - started, 1)
        await asyncio.to_thread(write_report, report, out_dir, lines)
    return time.monotonic() - started


async def run_matrix(groups: Sequence[GroupPlan], opts: MatrixOptions,
                     stream: Any = None) -> list[CellResult]:
    """Run every cell of `groups` (then, with rerun_noisy, noisy cells twice more); write the files."""
    out = stream or sys.stdout
    started = time.monotonic()
    results = {c.info.cell_id: CellResult(c.info) for g in groups for c in g.cells}
    timings: dict[str, float] = {}
    interrupted = False
    try:
        for g in groups:
            out.write(f"\n== {g.name}: {len(g.cells)} cells, round robin capacity "
                      f"{g.capacity_rps:.1f} req/s\n")
            timings[g.name] = await _run_group(g, g.cells, opts, opts.out_dir / "runs" / g.name, results, out)
        if opts.rerun_noisy:
            verdict = verdict_json(list(results.values()), opts.candidate, opts.noise)
            for g in groups:
                noisy = [c for c in g.cells if verdict["cells"][c.info.cell_id]["noisy"]]
                for k in (1, 2):
                    if noisy:
                        out.write(f"\n== {g.name}: re-run {k} of 2 of {len(noisy)} noisy cells\n")
                        timings[f"{g.name}/rerun{k}"] = await _run_group(
                            g, noisy, opts, opts.out_dir / "runs" / f"{g.name}-rerun{k}", results, out)
    except (KeyboardInterrupt, asyncio.CancelledError):
        interrupted = True
    cells = list(results.values())
    n_routers = len(opts.routers)
    config = {"scale": opts.scale.name, "command": opts.command, "seed": opts.seed,
              "routers": [s.name for s in opts.routers], "base_pod": BASE_POD, "scale_settings": {
                  "requests": opts.scale.requests, "output_tokens": opts.scale.output_tokens,
                  "rr_capacity_rps": opts.scale.rr_capacity_rps, "pods": opts.scale.pods,
                  "fleets": list(opts.scale.fleets)},
              "wall_s": round(time.monotonic() - started, 1),
              "estimate_s": round(estimate_seconds(groups, n_routers)),
              "group_wall_s": {k: round(v, 1) for k, v in timings.items()}}
    notes = list(opts.notes) + (["interrupted: partial results"] if interrupted else [])
    files = await asyncio.to_thread(write_matrix, cells, opts.out_dir, config, opts.candidate, opts.noise,
                                    notes)
    out.write(f"\nmatrix: {', '.join(str(f) for f in files)} ({config['wall_s']} s)\n")
    return cells


# -- command line -------------------------------------------------------------------------------------

def add_matrix_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--matrix` options (also `kvgate bench`'s); the fleet, workload and load flags do not apply."""
    g = parser.add_argument_group("robustness matrix (bench/matrix.py)")
    g.add_argument("--matrix", choices=sorted(SCALES),
                   help="run the robustness matrix instead of one comparison (quick: < 25 min on 2 cores; "
                   "default: off)")
    g.add_argument("--matrix-cells", action="append", default=[], metavar="GLOB",
                   help="only cells whose id (workload/fleet/load) matches, e.g. 'zipf/*' (repeat; "
                   "default: every cell)")
    g.add_argument("--matrix-requests", type=int, help="requests per cell (default: the scale's)")
    g.add_argument("--matrix-pods", type=int, help="pods per fleet (default: the scale's)")
    g.add_argument("--matrix-plan", action="store_true",
                   help="print the cells and a wall-time estimate, run nothing")
    g.add_argument("--rerun-noisy", action="store_true",
                   help="re-run cells whose verdict is within noise twice more; figures become medians of 3")
    g.add_argument("--noise", type=float, default=NOISE,
                   help="relative band around a verdict limit that counts as noise")
    g.add_argument("--candidate", default=CANDIDATE, help="policy the verdict checks")


def matrix_routers(names: Sequence[str], extra_args: Sequence[str], sglang: str, sglang_python: str,
                   notes: list[str]) -> list[RouterSpec]:
    """RouterSpecs for `names` (policies not registered are left out, with a note), plus the SGLang
    router when `sglang` is "auto" and it is installed."""
    from router.registry import POLICIES

    specs = []
    for name in names:
        spec = RouterSpec.parse(name, extra_args)
        if spec.policy == SGLANG:
            continue
        if spec.policy not in POLICIES:
            notes.append(f"router {name} skipped: no policy {spec.policy!r} is registered")
            continue
        specs.append(spec)
    if sglang == "auto" or any(n.strip() == SGLANG for n in names):
        if sglang_available(sglang_python):
            specs.append(RouterSpec(SGLANG, python=sglang_python))
        else:
            notes.append("SGLang router skipped: `sglang_router` is not installed for --sglang-python")
    return specs


def run_matrix_command(args: argparse.Namespace) -> int:
    """`kvgate bench --matrix ...`: plan, print, run, write. Exit 0 when the verdict passes."""
    scale = SCALES[args.matrix]
    if args.matrix_requests:
        scale = replace(scale, requests=args.matrix_requests)
    if args.matrix_pods:
        scale = replace(scale, pods=args.matrix_pods)
    notes: list[str] = []
    names = [n.strip() for n in args.policies.split(",")] if args.policies else list(scale.routers)
    specs = matrix_routers([n for n in names if n], args.gateway_arg,
                           args.sglang if scale.sglang else "off", args.sglang_python, notes)
    try:
        groups = plan_matrix(scale, args.matrix_cells, args.seed, notes)
    except ValueError as exc:
        print(f"kvgate bench --matrix: {exc}", file=sys.stderr)
        return 2
    print(format_plan(groups, specs))
    for note in notes:
        print(f"note: {note}")
    if args.matrix_plan:
        return 0
    if not groups or not specs:
        print("kvgate bench --matrix: no cells or no routers to run", file=sys.stderr)
        return 2
    argv = sys.argv[1:]
    prog = "kvgate " if argv[:1] == ["bench"] else "python -m bench.matrix "
    command = prog + shlex.join(argv)
    opts = MatrixOptions(scale, specs, Path(args.out), list(args.matrix_cells), args.seed, args.model,
                         args.rerun_noisy, args.noise, args.candidate, args.request_timeout, command, notes)
    cells = run_async(run_matrix(groups, opts))
    verdict = verdict_json(cells, opts.candidate, opts.noise)
    status = {True: "PASS", False: "FAIL", None: "no check applied"}[verdict["pass"]]
    print(f"verdict for {opts.candidate}: {status} ({len(verdict['failed'])} failed checks)")
    return 0 if verdict["pass"] else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.matrix [kvgate bench flags]`: as `kvgate bench --matrix quick` unless told."""
    from bench import cli

    parser = argparse.ArgumentParser(prog="python -m bench.matrix", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_arguments(parser)
    args = parser.parse_args(argv)
    if not args.matrix:
        args.matrix = "quick"
    return run_matrix_command(args)


if __name__ == "__main__":
    sys.exit(main())
