"""Envoy + `kvgate epp` beside `kvgate serve`, in one run: what the split costs, and that it routes alike.

    python -m bench.epp_overhead [--requests 1000] [--concurrency 4] [--prompt-tokens 2000]
        [--policies round_robin,cache_aware] [--rate 14] [--skip-cost] [--skip-quality] [--out f.json]

Cost: two trivial pods (bench.proxy_overhead's instant upstream, so every microsecond is a router's
or the client's); per policy, `kvgate serve` and Envoy (one worker) + `kvgate epp` both run in front of
them (and, with `--sglang-python`, the SGLang router) and requests alternate between them and direct
access, half streamed. CPU time per request
comes from /proc of each process: serve; epp and Envoy (each and summed). Latency: the whole
non-streamed answer and a stream's first chunk, p50, against direct.

Quality: the `quick` preset's fleet and workload (4 simulated pods, shared prefix 16x12 at 70% of the
fleet's KV cache, Poisson `--rate` req/s): `cache_aware` through `kvgate serve`, then through Envoy +
`kvgate epp`, the pods' prefix caches reset between: TTFT p50/p90 at the client, the prefix hit rate
at the pods, output tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import aiohttp
import orjson

from bench.loadgen import podmetrics
from bench.loadgen.envoy import EnvoyEpp
from bench.loadgen.harness import reset_prefix_caches, warmup_workload
from bench.loadgen.procs import ChildProcess
from bench.loadgen.routers import SGLANG, RouterProcess, RouterSpec
from bench.loadgen.runner import run_async, run_workload
from bench.loadgen.stats import percentile, summarize
from bench.presets import PRESETS
from bench.proxy_overhead import READY, cpu_seconds
from bench.workloads import OpenLoop, shared_prefix

JSON = {"Content-Type": "application/json"}
MODES = ("direct", "serve", "epp")  # plus "sglang" with --sglang-python


def bodies(n: int, prompt_tokens: int, seed: int = 0) -> list[bytes]:
    """`n` request bodies, every other one streamed, each a unique prompt of `prompt_tokens` words (one
    token each for the built-in tokenizer)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = " ".join(f"w{rng.randrange(50_000)}" for _ in range(prompt_tokens)) or "Hello world"
        out.append(orjson.dumps({"model": "m", "prompt": prompt, "max_tokens": 4, "stream": i % 2 == 1}))
    return out


async def one(session: aiohttp.ClientSession, url: str, body: bytes) -> float:
    """Seconds to the whole answer, or to the first chunk of a stream."""
    start = time.perf_counter()
    async with session.post(url + "/v1/completions", data=body, headers=JSON) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}: {(await r.read())[:200]!r}")
        if b'"stream":true' in body:
            await r.content.readany()
            elapsed = time.perf_counter() - start
            await r.read()
            return elapsed
        await r.read()
        return time.perf_counter() - start


async def alternate(session: aiohttp.ClientSession, urls: dict[str, list[str]], reqs: list[bytes],
                    concurrency: int) -> dict[str, dict[str, list[float]]]:
    """Each body once per mode, the modes' order rotating, `concurrency` clients."""
    samples: dict[str, dict[str, list[float]]] = {m: {"full": [], "ttft": []} for m in urls}
    todo = iter(enumerate(reqs))
    modes = list(urls)

    async def client() -> None:
        for i, body in todo:
            kind = "ttft" if b'"stream":true' in body else "full"
            for k in range(len(modes)):
                mode = modes[(i + k) % len(modes)]
                targets = urls[mode]
                samples[mode][kind].append(await one(session, targets[i % len(targets)], body))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return samples


async def cost(opts: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    pods = [ChildProcess([sys.executable, "-m", "bench.proxy_overhead", "--serve-upstream"],
                         log_dir / f"pod-{i}.log", env={"PYTHONUNBUFFERED": "1"}) for i in range(2)]
    out: dict[str, Any] = {}
    try:
        urls = [str((await p.start(READY, 30.0))["url"]) for p in pods]
        for policy in opts.policies:
            serve = RouterProcess(RouterSpec(policy), urls, "m", log_dir)
            split = EnvoyEpp(urls, "m", ["--policy", policy, "--no-access-log"], log_dir / policy)
            sglang = (RouterProcess(RouterSpec(SGLANG, python=opts.sglang_python), urls, "m", log_dir)
                      if opts.sglang_python else None)
            (log_dir / policy).mkdir(exist_ok=True)
            try:
                served, split_url = await serve.start(60.0), await split.start(60.0)
                targets = {"direct": urls, "serve": [served], "epp": [split_url]}
                assert serve.process.proc is not None
                pids = {"serve": serve.process.proc.pid, **split.pids()}
                if sglang is not None:
                    targets["sglang"] = [await sglang.start(60.0)]
                    assert sglang.process.proc is not None
                    pids["sglang"] = sglang.process.proc.pid
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
                    warm = bodies(100, opts.prompt_tokens, seed=1)
                    await alternate(session, targets, warm, opts.concurrency)
                    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
                    samples = await alternate(session, targets, bodies(opts.requests, opts.prompt_tokens),
                                              opts.concurrency)
                    cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in pids.items()}
            finally:
                await split.stop()
                await serve.stop()
                if sglang is not None:
                    await sglang.stop()
            n = opts.requests
            result: dict[str, Any] = {f"cpu_us_per_request_{k}": 1e6 * v / n for k, v in cpu.items()}
            result["cpu_us_per_request_envoy_plus_epp"] = 1e6 * (cpu["epp"] + cpu["envoy"]) / n
            result["cpu_ratio_split_to_serve"] = (cpu["epp"] + cpu["envoy"]) / cpu["serve"]
            if "sglang" in cpu:
                result["cpu_ratio_split_to_sglang"] = (cpu["epp"] + cpu["envoy"]) / cpu["sglang"]
            for kind in ("full", "ttft"):
                for mode in targets:
                    result[f"{kind}_p50_ms_{mode}"] = 1e3 * (percentile(samples[mode][kind], 50) or 0.0)
            out[policy] = result
    finally:
        await asyncio.gather(*(p.stop() for p in pods))
    return out


async def quality(opts: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    from bench.sim.fleet import SimFleetProcess

    preset = PRESETS["quick"]
    workload = shared_prefix(replace(preset.workload, seed=opts.seed))
    model = "sim-model"
    out: dict[str, Any] = {}
    async with (
        SimFleetProcess(preset.pods, model=model, **preset.pod_options) as fleet,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
    ):
        for run, name in enumerate(opts.order):
            await reset_prefix_caches(http, fleet.urls)
            router: RouterProcess | EnvoyEpp
            if name == "serve":
                router = RouterProcess(RouterSpec("cache_aware"), fleet.urls, model, log_dir, seed=opts.seed)
            else:
                (log_dir / "quality").mkdir(exist_ok=True)
                router = EnvoyEpp(fleet.urls, model, ["--policy", "cache_aware", "--seed", str(opts.seed),
                                                      "--no-access-log"], log_dir / "quality")
            try:
                url = await router.start(60.0)
                await run_workload(url, model, warmup_workload(preset.warmup, opts.seed, run), OpenLoop(4.0))
                before = await podmetrics.scrape(http, fleet.urls)
                outcome = await run_workload(url, model, workload, OpenLoop(rate=opts.rate, seed=opts.seed))
                after = await podmetrics.scrape(http, fleet.urls)
            finally:
                await router.stop()
            s = summarize(outcome.results, outcome.duration_s)
            pods = podmetrics.delta(before, after)
            out[name] = {"ok": s.ok, "requests": s.requests, "ttft_p50_ms": 1e3 * (s.ttft.p50 or 0),
                         "ttft_p90_ms": 1e3 * (s.ttft.p90 or 0), "output_tps": s.output_tps,
                         "pod_hit_rate": pods.hit_rate}
    return out


def report(result: dict[str, Any]) -> str:
    lines = []
    for policy, r in result.get("cost", {}).items():
        lines.append(f"cost, {policy} ({result['requests']} requests per mode, "
                     f"{result['prompt_tokens']}-token prompts, {result['concurrency']} clients)")
        lines.append(f"  CPU us/request: serve {r['cpu_us_per_request_serve']:.0f} | envoy "
                     f"{r['cpu_us_per_request_envoy']:.0f} + epp {r['cpu_us_per_request_epp']:.0f} = "
                     f"{r['cpu_us_per_request_envoy_plus_epp']:.0f} "
                     f"({r['cpu_ratio_split_to_serve']:.2f}x serve)")
        if "cpu_us_per_request_sglang" in r:
            lines.append(f"  CPU us/request: SGLang router {r['cpu_us_per_request_sglang']:.0f} (envoy+epp "
                         f"{r['cpu_ratio_split_to_sglang']:.2f}x it)")
        for kind, label in (("full", "answer"), ("ttft", "first chunk")):
            d, s, e = (r[f"{kind}_p50_ms_{m}"] for m in MODES)
            line = (f"  {label} p50 ms: direct {d:.2f} | serve {s:.2f} (+{s - d:.2f}) | "
                    f"envoy+epp {e:.2f} (+{e - d:.2f})")
            if f"{kind}_p50_ms_sglang" in r:
                g = r[f"{kind}_p50_ms_sglang"]
                line += f" | sglang {g:.2f} (+{g - d:.2f})"
            lines.append(line)
    q = result.get("quality")
    if q:
        lines.append(f"quality, cache_aware, quick preset at {result['rate']:g} req/s")
        for name in ("serve", "epp"):
            r = q[name]
            hit = r["pod_hit_rate"]
            lines.append(f"  {name:5}: TTFT p50 {r['ttft_p50_ms']:.0f} ms, p90 {r['ttft_p90_ms']:.0f} ms, "
                         f"pod hit {100 * hit if hit is not None else float('nan'):.1f}%, "
                         f"{r['output_tps']:.0f} out tok/s, {r['ok']}/{r['requests']} ok")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.epp_overhead",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="per mode (direct, serve, envoy+epp)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--policies", default="round_robin,cache_aware")
    parser.add_argument("--rate", type=float, default=14.0, help="quality: Poisson requests/s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sglang-python", help="cost: also the SGLang router (cache_aware), run by this "
                        "interpreter (a venv with sglang-router installed)")
    parser.add_argument("--order", default="serve,epp", help="quality: which router runs first")
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--out", help="also write the figures as JSON here")
    opts = parser.parse_args(argv)
    opts.policies = [p for p in opts.policies.split(",") if p]
    opts.order = [r for r in opts.order.split(",") if r]
    if sorted(opts.order) != ["epp", "serve"]:
        parser.error("--order: serve,epp or epp,serve")
    result: dict[str, Any] = {"requests": opts.requests, "prompt_tokens": opts.prompt_tokens,
                              "concurrency": opts.concurrency, "rate": opts.rate}
    with TemporaryDirectory(prefix="kvgate-epp-") as tmp:
        if not opts.skip_cost:
            result["cost"] = run_async(cost(opts, Path(tmp)))
        if not opts.skip_quality:
            result["quality"] = run_async(quality(opts, Path(tmp)))
    print(report(result))
    if opts.out:
        with open(opts.out, "wb") as f:
            f.write(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
