"""What admission control adds below saturation: latency and gateway CPU per request with an
`admission` section (9 tenants, rate limits, never saturated) against the same gateway without one,
in one run.

    python -m bench.admission_overhead [--requests 2000] [--policy cache_aware]

Two `kvgate serve` processes, identical but for `admission`, in front of the same instant upstream pods
(bench.proxy_overhead's: every microsecond measured is the gateway's or the client's). Requests
alternate between the two, one at a time, so drift affects both equally; each carries a tenant header.
Reports p50/p90 of a whole non-streamed answer and each gateway's CPU per request, as on/off ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from bench.loadgen.procs import ChildProcess, wait_http_ok
from bench.loadgen.runner import run_async
from bench.loadgen.stats import percentile
from bench.proxy_overhead import READY, cpu_seconds

BODY = b'{"model":"m","prompt":"Hello world, how are you today?","max_tokens":4,"stream":false}'
TENANTS = [f"t{i}" for i in range(9)]


def config(urls: list[str], policy: str, admission: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "pools": {"m": {"endpoints": [{"url": u} for u in urls], "policy": {"name": policy}}},
    }
    if admission:
        cfg["admission"] = {"tenants": [{"name": t, "requests_per_minute": 1e9, "tokens_per_minute": 1e12,
                                         "max_queued": 100} for t in TENANTS]}
    return cfg


async def start(name: str, cfg: dict[str, Any], log_dir: Path) -> tuple[ChildProcess, str]:
    path = log_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = ChildProcess([sys.executable, "-m", "gateway.cli", "serve", "--config", str(path), "--log-level",
                         "WARNING"], log_dir / f"{name}.log", env={"PYTHONUNBUFFERED": "1"})
    url = str((await proc.start("KVGATE_SERVE_READY ", 60.0))["url"])
    await wait_http_ok(url + "/ready", 60.0, proc, json_key="ready")
    return proc, url


async def one(http: aiohttp.ClientSession, url: str, tenant: str) -> float:
    start_t = time.perf_counter()
    async with http.post(url + "/v1/completions", data=BODY,
                         headers={"Content-Type": "application/json", "x-kvgate-tenant": tenant}) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}")
    return time.perf_counter() - start_t


async def measure(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    procs: list[ChildProcess] = []
    try:
        urls = []
        for i in range(2):
            pod = ChildProcess([sys.executable, "-m", "bench.proxy_overhead", "--serve-upstream"],
                               log_dir / f"pod-{i}.log", env={"PYTHONUNBUFFERED": "1"})
            procs.append(pod)
            urls.append(str((await pod.start(READY, 30.0))["url"]))
        off, off_url = await start("off", config(urls, args.policy, False), log_dir)
        procs.append(off)
        on, on_url = await start("on", config(urls, args.policy, True), log_dir)
        procs.append(on)
        pids = {"off": off.proc.pid, "on": on.proc.pid}  # type: ignore[union-attr]
        samples: dict[str, list[float]] = {"off": [], "on": []}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(keepalive_timeout=30)) as http:
            for i in range(200):  # warm-up
                await one(http, off_url, TENANTS[i % 9])
                await one(http, on_url, TENANTS[i % 9])
            cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
            for i in range(args.requests):
                tenant = TENANTS[i % 9]
                pair = [("off", off_url), ("on", on_url)]
                for name, url in pair if i % 2 else pair[::-1]:
                    samples[name].append(await one(http, url, tenant))
            cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in pids.items()}
    finally:
        await asyncio.gather(*(p.stop() for p in procs))
    out: dict[str, Any] = {"requests_per_mode": args.requests, "policy": args.policy}
    for name in ("off", "on"):
        out[name] = {"p50_ms": 1e3 * (percentile(samples[name], 50) or 0.0),
                     "p90_ms": 1e3 * (percentile(samples[name], 90) or 0.0),
                     "cpu_us_per_request": 1e6 * cpu[name] / args.requests}
    out["p50_ratio"] = out["on"]["p50_ms"] / out["off"]["p50_ms"]
    out["p90_ratio"] = out["on"]["p90_ms"] / out["off"]["p90_ms"]
    out["cpu_ratio"] = out["on"]["cpu_us_per_request"] / max(out["off"]["cpu_us_per_request"], 1e-9)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.admission_overhead",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000, help="requests per mode")
    p.add_argument("--policy", default="cache_aware")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kvgate-admission-overhead-") as tmp:
        result = run_async(measure(args, Path(tmp)))
    print(f"admission off: p50 {result['off']['p50_ms']:.3f} ms, p90 {result['off']['p90_ms']:.3f} ms, "
          f"gateway CPU {result['off']['cpu_us_per_request']:.0f} us/request")
    print(f"admission on:  p50 {result['on']['p50_ms']:.3f} ms, p90 {result['on']['p90_ms']:.3f} ms, "
          f"gateway CPU {result['on']['cpu_us_per_request']:.0f} us/request")
    print(f"on/off: p50 {result['p50_ratio']:.3f}, p90 {result['p90_ratio']:.3f}, "
          f"CPU {result['cpu_ratio']:.3f} ({args.requests} requests each, policy {args.policy}, unsaturated)")
    if args.out:
        args.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
