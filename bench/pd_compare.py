"""Aggregated vs disaggregated (prefill/decode) serving on the same simulated fleet, long prompts.

    python -m bench.pd_compare [--pods 4 --prefill-pods 2 --rate 4 --requests 160] [--out DIR]

Both setups use the same number of `kvgate sim` processes and the same cost model, behind a
`kvgate serve` process with the same policy:
  aggregated      every pod `--role both`: each prefills and decodes its own requests, so a long
                  prefill chunk stretches the engine steps of the requests decoding beside it;
  disaggregated   `--prefill-pods` pods `--role prefill`, the rest `--role decode`; the gateway runs
                  the two-step flow (backends `URL#role=prefill` / `URL#role=decode`).
The workload is unique long prompts (shared-prefix generator, one prompt per group: no reuse),
Poisson arrivals, streamed. It prints client-side TTFT and ITL (mean, p50, p90, p99) per setup and
the share of gaps over 50 ms (decode steps stretched by a prefill), and the gateway's P/D decisions;
`--out` also writes them as JSON. Takes about 90 s by default (2 cores).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.loadgen.harness import warmup_workload
from bench.loadgen.routers import RouterProcess, RouterSpec
from bench.loadgen.runner import run_async, run_workload
from bench.loadgen.stats import Dist, RunSummary, summarize
from bench.sim.fleet import SimFleetProcess
from bench.workloads.arrivals import ClosedLoop, OpenLoop
from bench.workloads.shared_prefix import SharedPrefixSpec, shared_prefix

MODEL = "pd-bench"
# An 8B-class pod (bench/sim defaults) with a smaller batch budget, so a 3.5k-token prompt is
# prefilled in two chunks; decode steps of 10 ms at batch 1 (+0.1 ms per sequence).
POD_OPTIONS: dict[str, Any] = {
    "prefill_tps": 16000.0,
    "itl_ms": 10.0,
    "itl_ms_per_seq": 0.1,
    "max_num_batched_tokens": 2048,
    "num_gpu_blocks": 8000,
    "kv_transfer_tps": 200000.0,
    "seed": 0,
}
STALL_S = 0.05  # an inter-token gap this long is a decode step stretched by a prefill (or a CPU stall)
_DECISION = re.compile(r'^kvgate_pd_decisions_total\{[^}]*outcome="(\w+)"[^}]*\} (\S+)$', re.M)


@dataclass(slots=True)
class SetupResult:
    name: str
    roles: list[str]
    summary: RunSummary
    stall_share: float  # share of inter-token gaps longer than STALL_S
    pd_decisions: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {"setup": self.name, "roles": self.roles, "summary": self.summary.to_json(),
                "itl_stall_share": self.stall_share, "itl_stall_s": STALL_S,
                "pd_decisions": self.pd_decisions}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.pd_compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--pods", type=int, default=4, help="pods in each setup")
    p.add_argument("--prefill-pods", type=int, default=2, help="prefill pods in the disaggregated setup")
    p.add_argument("--rate", type=float, default=4.0, help="requests per second (Poisson)")
    p.add_argument("--requests", type=int, default=160)
    p.add_argument("--prompt-tokens", type=int, default=3500)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--policy", default="cache_aware", help="gateway policy for both setups")
    p.add_argument("--threshold-tokens", type=int, default=256, help="pd.threshold_tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="folder for results.json and the processes' logs")
    args = p.parse_args(argv)
    if not 0 < args.prefill_pods < args.pods:
        p.error("--prefill-pods must be between 1 and --pods - 1")
    return args


async def run_setup(name: str, roles: list[str], args: argparse.Namespace, log_dir: Path) -> SetupResult:
    """Start the fleet and the gateway, warm up, run the workload, collect the figures, stop all."""
    per_pod = [{"role": role} for role in roles]
    spec = SharedPrefixSpec(groups=args.requests, prompts_per_group=1, system_tokens=args.prompt_tokens,
                            question_tokens=0, output_tokens=args.output_tokens, seed=args.seed)
    workload = shared_prefix(spec)
    print(f"[{name}] starting {len(roles)} pods ({', '.join(roles)}) ...", flush=True)
    async with SimFleetProcess(len(roles), model=MODEL, per_pod=per_pod, **POD_OPTIONS) as fleet:
        backends = [url if role == "both" else f"{url}#role={role}" for url, role in zip(fleet.urls, roles,
                                                                                       strict=True)]
        extra = ("--pd-threshold-tokens", str(args.threshold_tokens)) if "prefill" in roles else ()
        router = RouterProcess(RouterSpec(args.policy, extra_args=extra), backends, MODEL, log_dir,
                               seed=args.seed)
        url = await router.start()
        try:
            await run_workload(url, MODEL, warmup_workload(8, args.seed, 1), ClosedLoop(2),
                               request_timeout_s=30.0)
            print(f"[{name}] {workload.num_requests} requests at {args.rate:g}/s ...", flush=True)
            before = await pd_decisions(url)
            outcome = await run_workload(url, MODEL, workload, OpenLoop(args.rate, seed=args.seed),
                                         request_timeout_s=120.0)
            after = await pd_decisions(url)
            decisions = {k: v - before.get(k, 0.0) for k, v in after.items()}
        finally:
            await router.stop()
    gaps = [g for r in outcome.results if r.ok for g in r.itl]
    stalls = sum(1 for g in gaps if g > STALL_S) / len(gaps) if gaps else 0.0
    return SetupResult(name, roles, summarize(outcome.results, outcome.duration_s), stalls, decisions)


async def pd_decisions(gateway_url: str) -> dict[str, float]:
    """kvgate_pd_decisions_total by outcome, from the gateway's /metrics (empty for a plain pool)."""
    async with aiohttp.ClientSession() as http, http.get(gateway_url + "/metrics") as resp:
        text = await resp.text()
    return {outcome: float(value) for outcome, value in _DECISION.findall(text)}


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def format_results(results: list[SetupResult]) -> str:
    head = ["setup", "ok/err", "TTFT mean", "p50", "p90", "p99", "ITL mean", "p50", "p90", "p99",
            f"ITL>{STALL_S * 1000:.0f}ms", "out tok/s"]
    rows = [head]
    for r in results:
        s = r.summary
        stalls, tps = f"{r.stall_share * 100:.2f}%", f"{s.output_tps:.0f}"
        rows.append([r.name, f"{s.ok}/{s.errors}", *_dist(s.ttft), *_dist(s.itl), stalls, tps])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(_cell(c, w, i) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "(latencies in ms, client side, through the gateway)")
    for r in results:
        if r.pd_decisions:
            shown = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r.pd_decisions.items()))
            lines.append(f"{r.name}: P/D decisions: {shown}")
    return "\n".join(lines)


def _cell(text: str, width: int, column: int) -> str:
    return text.rjust(width) if column else text.ljust(width)


def _dist(d: Dist) -> list[str]:
    return [_ms(d.mean), _ms(d.p50), _ms(d.p90), _ms(d.p99)]


async def compare(args: argparse.Namespace, log_dir: Path) -> list[SetupResult]:
    aggregated = ["both"] * args.pods
    disaggregated = ["prefill"] * args.prefill_pods + ["decode"] * (args.pods - args.prefill_pods)
    split = f"disaggregated {args.prefill_pods}P+{args.pods - args.prefill_pods}D"
    return [
        await run_setup(f"aggregated {args.pods}x", aggregated, args, log_dir),
        await run_setup(split, disaggregated, args, log_dir),
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kvgate-pd-") as tmp:
        log_dir = (args.out or Path(tmp)) / "logs"
        results = run_async(compare(args, log_dir))
    print(format_results(results))
    if args.out is not None:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        payload = {"settings": settings, "pod_options": POD_OPTIONS, "setups": [r.to_json() for r in results]}
        (args.out / "results.json").write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2))
    return 0 if all(r.summary.errors == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
