"""`kvgate bench`: compare routing policies on a simulated fleet and write a report folder.

    kvgate bench --quick --out bench-out/quick          # the README's main job (< 2 min on 2 cores)
    kvgate bench --preset full --out bench-out/full     # 8 pods, llm-d's setting scaled to the fleet
    kvgate bench --preset saturate --out bench-out/saturate  # issue 4's acceptance run (bench/RESULTS.md)
    kvgate bench --rates 8,12,16 --policies round_robin,cache_aware/precise
    kvgate bench --workload trace --trace-first 300 --trace-block-tokens 32 --trace-speed 4

A preset fixes the fleet, the workload and the load; any flag given overrides it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.loadgen.harness import HarnessConfig, run_comparison
from bench.loadgen.routers import SGLANG, RouterSpec, sglang_available
from bench.loadgen.runner import run_async
from bench.matrix import add_matrix_arguments, run_matrix_command
from bench.presets import PRESETS, BenchPreset, kv_tokens, preset_summary
from bench.report.model import Report
from bench.report.table import format_table
from bench.report.writer import write_report
from bench.workloads import (
    ClosedLoop,
    MultiTurnSpec,
    OpenLoop,
    TraceSpec,
    Workload,
    infinite_cache_ceiling,
    multi_turn,
    scale_to_fleet,
    shared_prefix,
    trace,
)
from bench.workloads.arrivals import Arrival
from bench.workloads.shared_prefix import PRESETS as SHARED_PREFIX_PRESETS
from bench.workloads.trace import DEFAULT_TRACE
from prefixindex.tokenizer import WordTokenizer

FROM_PRESET = "default: the preset's"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="fleet + workload + load")
    parser.add_argument("--quick", action="store_true", help="same as --preset quick")
    parser.add_argument("--out", default="bench-out/latest", help="report folder")
    parser.add_argument("--model", default="sim-model", help="served model name of the simulated pods")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the workload, the arrivals and the simulated pods")

    routers = parser.add_argument_group("routers")
    routers.add_argument("--policies", help="comma list of policy or policy/index (approximate|precise) "
                         "(default: the preset's: round_robin, least_request, cache_aware/approximate, "
                         "cache_aware/precise)")
    routers.add_argument("--all-policies", action="store_true", help="add every other registered policy")
    routers.add_argument("--sglang", choices=["auto", "off"], default="auto",
                         help="auto: also run the SGLang router on the same fleet when it is installed")
    routers.add_argument("--sglang-python", default=sys.executable,
                         help="interpreter with sglang_router installed (e.g. a separate venv's python)")
    routers.add_argument("--gateway-arg", action="append", default=[], metavar="ARG",
                         help="extra argument for every `kvgate serve` (repeat; default: none)")

    fleet = parser.add_argument_group("simulated fleet (overrides the preset)")
    fleet.add_argument("--pods", type=int, help=f"simulated pods ({FROM_PRESET})")
    fleet.add_argument("--num-gpu-blocks", type=int, help=f"KV blocks per pod ({FROM_PRESET})")
    fleet.add_argument("--block-size", type=int, help=f"tokens per KV block ({FROM_PRESET})")
    fleet.add_argument("--prefill-tps", type=float,
                       help=f"prefill rate per pod, uncached tokens/s ({FROM_PRESET})")
    fleet.add_argument("--itl-ms", type=float, help=f"decode step at batch 1, ms ({FROM_PRESET})")
    fleet.add_argument("--max-num-seqs", type=int, help=f"running-batch limit per pod ({FROM_PRESET})")
    fleet.add_argument("--pod-opt", action="append", default=[], metavar="KEY=VALUE",
                       help="any other `kvgate sim` option, e.g. jitter=0.1 (repeat; default: the "
                       "preset's, then `kvgate sim`'s defaults)")

    load = parser.add_argument_group("load")
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second (default: the "
                      "preset's rates; trace: the trace's own arrival times)")
    load.add_argument("--rates", help="comma list of rates: a sweep (plots TTFT p90 and throughput vs rate; "
                      "default: one rate, see --rate)")
    load.add_argument("--concurrency", type=int,
                      help="closed loop: N users instead of a rate (default: open loop)")
    load.add_argument("--warmup", type=int,
                      help=f"short unique requests through each router before measuring ({FROM_PRESET})")
    load.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")

    wl = parser.add_argument_group("workload")
    wl.add_argument("--workload", choices=["shared-prefix", "multi-turn", "trace"], default="shared-prefix",
                    help="shared-prefix: the preset's groups; multi-turn: growing chat histories; trace: "
                    "replay a Mooncake-format trace")
    wl.add_argument("--api", choices=["completions", "chat"],
                    help="OpenAI API to call (default: chat for multi-turn, else the preset's)")
    wl.add_argument("--prompt-format", choices=["text", "tokens"], default="text",
                    help="tokens: send completion prompts as token ids")
    wl.add_argument("--shape", choices=sorted(SHARED_PREFIX_PRESETS),
                    help="shared-prefix: a published shape, scaled by --kv-fraction to the fleet "
                    "(default: the preset's workload)")
    wl.add_argument("--kv-fraction", type=float, default=0.7,
                    help="with --shape: the fraction of the fleet's KV its prefixes need")
    wl.add_argument("--groups", type=int, help=f"shared-prefix: prefix groups ({FROM_PRESET})")
    wl.add_argument("--prompts-per-group", type=int, help=f"shared-prefix: prompts per group ({FROM_PRESET})")
    wl.add_argument("--system-tokens", type=int,
                    help=f"shared-prefix: tokens of each group's shared prefix ({FROM_PRESET}); "
                    "multi-turn: of the system prompt (default: 256)")
    wl.add_argument("--question-tokens", type=int,
                    help=f"shared-prefix: tokens of each prompt's own question ({FROM_PRESET})")
    wl.add_argument("--output-tokens", type=int,
                    help=f"max_tokens of each request ({FROM_PRESET}; multi-turn: 32; trace: the trace's, "
                    "scaled like the prompts)")
    wl.add_argument("--conversations", type=int, default=32, help="multi-turn: conversations")
    wl.add_argument("--turns", type=int, default=4, help="multi-turn: turns per conversation")
    wl.add_argument("--user-tokens", type=int, default=64, help="multi-turn: tokens of each user message")
    wl.add_argument("--think-time", type=float, default=1.0, help="multi-turn: mean seconds")
    wl.add_argument("--trace", default=DEFAULT_TRACE,
                    help="Mooncake-format trace, .jsonl or .jsonl.gz; kvgate ships the public Mooncake "
                    "conversation trace (bench/traces)")
    wl.add_argument("--trace-first", type=int, default=300, help="trace: first N requests (0: all)")
    wl.add_argument("--trace-start", type=float, default=0.0, help="trace: window start, seconds")
    wl.add_argument("--trace-end", type=float, help="trace: window end, seconds (default: the trace's end)")
    wl.add_argument("--trace-speed", type=float, default=1.0, help="trace: replay speed factor")
    wl.add_argument("--trace-block-tokens", type=int, default=32,
                    help="trace: tokens per hash id (512 reproduces the trace's lengths)")
    add_matrix_arguments(parser)  # --matrix: the robustness matrix (bench/matrix.py)


def _parse_value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def pod_options(args: argparse.Namespace, preset: BenchPreset) -> dict[str, Any]:
    """The preset's pod options with the fleet flags and `--pod-opt KEY=VALUE` on top (checked against
    the simulator's options)."""
    from bench.sim.config import config_fields

    known = {f.name for f in config_fields()}
    options = {**preset.pod_options, "seed": args.seed}
    for key in ("num_gpu_blocks", "block_size", "prefill_tps", "itl_ms", "max_num_seqs"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    for item in args.pod_opt:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in known:
            raise ValueError(f"--pod-opt {item!r}: expected KEY=VALUE, KEY one of {', '.join(sorted(known))}")
        options[key] = _parse_value(value.strip())
    return options


def build_workload(args: argparse.Namespace, preset: BenchPreset, fleet_tokens: int) -> Workload:
    api = args.api
    if args.workload == "multi-turn":
        spec = MultiTurnSpec(conversations=args.conversations, turns=args.turns,
                             system_tokens=args.system_tokens if args.system_tokens is not None else 256,
                             user_tokens=args.user_tokens, output_tokens=args.output_tokens or 32,
                             think_time=args.think_time, api=api or "chat", seed=args.seed)
        return multi_turn(spec)
    if args.workload == "trace":
        return trace(TraceSpec(path=args.trace, first=args.trace_first or None, start_s=args.trace_start,
                               end_s=args.trace_end, block_tokens=args.trace_block_tokens,
                               max_output_tokens=args.output_tokens, api=api or "completions",
                               prompt_format=args.prompt_format, seed=args.seed))
    spec = preset.workload
    if args.shape:
        spec = scale_to_fleet(SHARED_PREFIX_PRESETS[args.shape], fleet_tokens, args.kv_fraction)
    overrides = {k: getattr(args, k) for k in ("groups", "prompts_per_group", "system_tokens",
                                                "question_tokens", "output_tokens")
                 if getattr(args, k) is not None}
    spec = replace(spec, **overrides, api=api or spec.api, prompt_format=args.prompt_format, seed=args.seed)
    return shared_prefix(spec)


def loads(args: argparse.Namespace, preset: BenchPreset, workload: Workload) -> list[Arrival]:
    if args.concurrency:
        return [ClosedLoop(args.concurrency)]
    if args.rates:
        return [OpenLoop(float(r), seed=args.seed) for r in args.rates.split(",") if r.strip()]
    if args.rate:
        return [OpenLoop(args.rate, seed=args.seed)]
    if workload.name == "trace":
        return [OpenLoop(None, speed=args.trace_speed)]
    return [OpenLoop(r, seed=args.seed) for r in preset.rates]


def routers(args: argparse.Namespace, preset: BenchPreset, notes: list[str]) -> list[RouterSpec]:
    names = [n for n in (args.policies.split(",") if args.policies else preset.routers) if n.strip()]
    if args.all_policies:
        from router.registry import POLICIES

        have = {n.partition("/")[0] for n in names}
        names += [p for p in POLICIES if p not in have]
    specs = [RouterSpec.parse(n, args.gateway_arg) for n in names]
    if args.sglang == "auto":
        if sglang_available(args.sglang_python):
            specs.append(RouterSpec(SGLANG, python=args.sglang_python))
        else:
            notes.append("SGLang router baseline skipped: `sglang_router` is not installed "
                         "(pip install sglang-router to add it).")
    return specs


def run(args: argparse.Namespace) -> int:
    if args.matrix:
        return run_matrix_command(args)
    preset = PRESETS["quick" if args.quick else args.preset]
    started = time.monotonic()
    try:
        options = pod_options(args, preset)
        pods = args.pods or preset.pods
        block_size = int(options.get("block_size", 16))
        fleet_tokens = kv_tokens(pods, options)
        workload = build_workload(args, preset, fleet_tokens)
        arrivals = loads(args, preset, workload)
        notes: list[str] = []
        specs = routers(args, preset, notes)
    except (ValueError, OSError) as exc:
        print(f"kvgate bench: {exc}", file=sys.stderr)
        return 2
    tok = WordTokenizer()
    ceiling = infinite_cache_ceiling((r.token_ids(tok) for r in workload.requests()), block_size)
    out_dir = Path(args.out)
    config = {"command": _command_line(),
              "preset": preset_summary(preset), "pods": pods, "pod_options": options, "model": args.model,
              "routers": [s.name for s in specs], "loads": [a.label() for a in arrivals], "seed": args.seed,
              "fleet_kv_tokens": fleet_tokens}
    report = Report(config, {"name": workload.name, **workload.params, "requests": workload.num_requests},
                    ceiling, notes=notes)
    print(f"kvgate bench: {workload.name} workload, {workload.num_requests} requests, {pods} pods, "
          f"routers {', '.join(s.name for s in specs)}; loads {', '.join(a.label() for a in arrivals)}; "
          f"infinite-cache ceiling {ceiling.hit_rate * 100:.1f}%", flush=True)
    cfg = HarnessConfig(model=args.model, pods=pods, pod_options=options, routers=specs, loads=arrivals,
                        out_dir=out_dir, warmup=preset.warmup if args.warmup is None else args.warmup,
                        seed=args.seed, request_timeout_s=args.request_timeout)
    lines: list[bytes] = []
    try:
        lines = run_async(run_comparison(cfg, workload, report))
    except KeyboardInterrupt:
        report.notes.append("interrupted: partial results")
    except Exception as exc:  # the fleet failed to start: report what we have
        report.notes.append(f"comparison aborted: {type(exc).__name__}: {exc}")
        print(f"kvgate bench: {type(exc).__name__}: {exc}", file=sys.stderr)
    report.config["wall_s"] = round(time.monotonic() - started, 1)
    files = write_report(report, out_dir, lines)
    print()
    print(format_table(report.runs))
    for key, r in report.ratios().items():
        if r["ttft_p90"] is not None:
            print(f"{key}: TTFT p90 x{r['ttft_p90']:.2f} of round_robin, "
                  f"throughput x{r['output_tps'] or 0:.2f}")
    for note in report.notes:
        print(f"note: {note}")
    print(f"report: {', '.join(str(f) for f in files)} ({report.config['wall_s']} s)")
    ok = bool(report.runs) and all(r.summary is not None and r.summary.ok for r in report.runs)
    return 0 if ok else 1


def _command_line() -> str:
    """The command as typed, when this process is `kvgate bench ...`."""
    argv = sys.argv[1:]
    return "kvgate " + shlex.join(argv) if argv[:1] == ["bench"] else "kvgate bench"
