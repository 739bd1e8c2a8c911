"""How much CPU one `kvgate sim` process spends per generated token, against the time it models.

Starts one pod as a real subprocess (default cost model: an 8B model on an H100), drives it with
`--streams` concurrent streamed completions, and reads the process's CPU time from /proc. Reports:
- CPU per generated token, and its ratio to the modelled ITL at the measured batch size (the
  simulator is faithful while this is well under 1: its own work does not stretch the modelled steps);
- how much longer the engine's steps took than the cost model says (1.0: not at all), and the
  inter-token latency clients observed (it includes the steps that admit new prompts).

    python -m bench.sim_overhead [--streams 300] [--tokens 200] [--prompt-tokens 200]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import sys
import time
from typing import Any

import aiohttp

from bench.sim.config import SimConfig
from bench.sim.fleet import SimProcess


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one_stream(session: aiohttp.ClientSession, url: str, prompt: str, tokens: int) -> list[float]:
    """Arrival times of the content chunks of one streamed completion."""
    times: list[float] = []
    body = {"prompt": prompt, "max_tokens": tokens, "stream": True}
    async with session.post(url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if line.startswith(b"data: {"):
                times.append(time.perf_counter())
    return times


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    config = SimConfig(model="overhead", max_num_seqs=args.max_num_seqs)
    pod = SimProcess(config, "127.0.0.1", 0)
    await pod.start()
    try:
        assert pod.proc is not None
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            await one_stream(session, pod.url, "warm up", 4)
            cpu0, t0 = cpu_seconds(pod.proc.pid), time.perf_counter()
            prompts = [" ".join(f"s{i}w{j}" for j in range(args.prompt_tokens)) for i in range(args.streams)]
            async with session.get(pod.url + "/kvgate_sim/stats") as resp:
                before = await resp.json()
            results = await asyncio.gather(*(one_stream(session, pod.url, p, args.tokens) for p in prompts))
            cpu1, t1 = cpu_seconds(pod.proc.pid), time.perf_counter()
            async with session.get(pod.url + "/kvgate_sim/stats") as resp:
                after = await resp.json()
    finally:
        await pod.terminate()
    tokens = sum(len(r) for r in results)
    gaps = [b - a for r in results for a, b in itertools.pairwise(r)]
    batch = min(args.streams, args.max_num_seqs)
    modelled_itl = (config.itl_ms + config.itl_ms_per_seq * (batch - 1)) / 1000
    cpu_per_token = (cpu1 - cpu0) / tokens
    return {
        "streams": args.streams, "tokens": tokens, "wall_s": round(t1 - t0, 3),
        "sim_cpu_s": round(cpu1 - cpu0, 3), "sim_cpu_share": round((cpu1 - cpu0) / (t1 - t0), 3),
        "cpu_us_per_token": round(cpu_per_token * 1e6, 1),
        "modelled_itl_ms": round(modelled_itl * 1000, 2),
        "overhead_ratio": round(cpu_per_token / modelled_itl, 5),
        "cpu_per_step_vs_step_time": round(cpu_per_token * batch / modelled_itl, 3),
        "engine_steps": after["steps"] - before["steps"],
        "steps_actual_vs_modelled": round(
            (after["stepped_s"] - before["stepped_s"]) / (after["modelled_s"] - before["modelled_s"]), 3
        ),
        "observed_itl_ms_mean": round(statistics.fmean(gaps) * 1000, 2) if gaps else None,
        "observed_itl_ms_p50": round(statistics.median(gaps) * 1000, 2) if gaps else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sim_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=300, help="concurrent streamed requests")
    parser.add_argument("--tokens", type=int, default=200, help="output tokens per request")
    parser.add_argument("--prompt-tokens", type=int, default=200, help="prompt tokens per request")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="the pod's running-batch limit")
    args = parser.parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("needs Linux /proc to read the simulator's CPU time", file=sys.stderr)
        return 2
    result = asyncio.run(measure(args))
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
