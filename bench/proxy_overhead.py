"""Gateway overhead: added latency (p50, p99) and CPU time per request, against direct access to the
same pods, in one run.

    python -m bench.proxy_overhead [--pods 2] [--requests 2000] [--concurrency 1] [--out result.json]

Starts `--pods` trivial upstream processes (an OpenAI-shaped pod that answers instantly, so every
microsecond measured is the gateway's or the client's) and one `kvgate serve` process in front of them.
Requests alternate direct / via the gateway so drift affects both equally. Per mode it reports the
latency of a whole non-streamed answer and the time to the first chunk of a streamed one; the gateway's
CPU time per request comes from /proc/<pid>/stat of the gateway process, and is compared with the
pods' CPU time per request (the same pods answer both modes). A last phase runs `--load-concurrency`
clients through the gateway to report the request rate one gateway process sustains and its CPU per
request under load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from bench.loadgen.procs import ChildProcess
from bench.loadgen.routers import RouterProcess, RouterSpec
from bench.loadgen.runner import run_async
from bench.loadgen.stats import percentile

READY = "PROXY_OVERHEAD_UPSTREAM_READY"
PLAIN_BODY = b'{"model":"m","prompt":"Hello world","max_tokens":4,"stream":false}'
STREAM_BODY = b'{"model":"m","prompt":"Hello world","max_tokens":4,"stream":true}'
JSON_HEADERS = {"Content-Type": "application/json"}
CLK_TCK = os.sysconf("SC_CLK_TCK")

CHUNK = b'data: {"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":" tok"}]}\n\n'
ANSWER = orjson.dumps(
    {
        "id": "cmpl-1",
        "object": "text_completion",
        "model": "m",
        "choices": [{"index": 0, "text": "hello", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
)


# ---- the trivial upstream pod (run with --serve-upstream) ----


async def _upstream_completions(request: web.Request) -> web.StreamResponse:
    body = orjson.loads(await request.read())
    if not body.get("stream"):
        return web.Response(body=ANSWER, content_type="application/json")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for _ in range(int(body.get("max_tokens") or 4)):
        await resp.write(CHUNK)
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _upstream_ok(request: web.Request) -> web.Response:
    return web.Response(text="")


async def serve_upstream(port: int) -> None:
    app = web.Application()
    app.router.add_post("/v1/completions", _upstream_completions)
    app.router.add_get("/health", _upstream_ok)
    app.router.add_get("/metrics", _upstream_ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    print(f"{READY} " + orjson.dumps({"url": url}).decode(), flush=True)
    await asyncio.Event().wait()


# ---- the measurement ----


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


async def one_request(session: aiohttp.ClientSession, url: str, stream: bool) -> float:
    """Seconds to the whole answer (stream=False) or to the first chunk (stream=True)."""
    body = STREAM_BODY if stream else PLAIN_BODY
    start = time.perf_counter()
    async with session.post(url + "/v1/completions", data=body, headers=JSON_HEADERS) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}")
        if stream:
            await r.content.readany()
            elapsed = time.perf_counter() - start
            await r.read()
            return elapsed
        await r.read()
        return time.perf_counter() - start


async def latency_phase(
    session: aiohttp.ClientSession, direct: list[str], gateway: str, n: int, concurrency: int
) -> dict[str, dict[str, list[float]]]:
    """Interleaved direct / gateway requests; per mode and kind the latencies in seconds."""
    samples: dict[str, dict[str, list[float]]] = {m: {"full": [], "ttft": []} for m in ("direct", "gateway")}
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            stream = i % 2 == 1
            kind = "ttft" if stream else "full"
            pod = direct[i % len(direct)]
            for mode, url in (("direct", pod), ("gateway", gateway)) if i % 4 < 2 else (
                ("gateway", gateway), ("direct", pod)):  # fmt: skip
                samples[mode][kind].append(await one_request(session, url, stream))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples


async def load_phase(session: aiohttp.ClientSession, gateway: str, seconds: float, concurrency: int) -> int:
    deadline = time.perf_counter() + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await one_request(session, gateway, stream=False)
            done += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


def _pid(child: ChildProcess) -> int:
    assert child.proc is not None, "started"
    return child.proc.pid


async def measure(opts: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    pods: list[ChildProcess] = []
    gateway: RouterProcess | None = None
    try:
        urls = []
        for i in range(opts.pods):
            pod = ChildProcess([sys.executable, "-m", "bench.proxy_overhead", "--serve-upstream"],
                               log_dir / f"pod-{i}.log", env={"PYTHONUNBUFFERED": "1"})
            pods.append(pod)
            urls.append(str((await pod.start(READY, 30.0))["url"]))
        gateway = RouterProcess(RouterSpec(opts.policy), urls, "m", log_dir)
        gw_url = await gateway.start(30.0)
        gw_pid = _pid(gateway.process)
        pod_pids = [_pid(p) for p in pods]
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
        async with aiohttp.ClientSession(connector=connector) as session:
            await latency_phase(session, urls, gw_url, 200, opts.concurrency)  # warm-up
            gw_cpu0, pod_cpu0 = cpu_seconds(gw_pid), sum(map(cpu_seconds, pod_pids))
            samples = await latency_phase(session, urls, gw_url, opts.requests, opts.concurrency)
            gw_cpu = cpu_seconds(gw_pid) - gw_cpu0
            pod_cpu = sum(map(cpu_seconds, pod_pids)) - pod_cpu0
            load_cpu0 = cpu_seconds(gw_pid)
            load_start = time.perf_counter()
            load_done = await load_phase(session, gw_url, opts.load_seconds, opts.load_concurrency)
            load_wall = time.perf_counter() - load_start
            load_cpu = cpu_seconds(gw_pid) - load_cpu0
    finally:
        if gateway is not None:
            await gateway.stop()
        await asyncio.gather(*(p.stop() for p in pods))
    n_gateway = sum(len(v) for v in samples["gateway"].values())
    result: dict[str, Any] = {"pods": opts.pods, "requests_per_mode": n_gateway, "policy": opts.policy}
    for kind in ("full", "ttft"):
        d, g = samples["direct"][kind], samples["gateway"][kind]
        result[kind] = {
            "direct_p50_ms": 1e3 * _pct(d, 50),
            "gateway_p50_ms": 1e3 * _pct(g, 50),
            "direct_p99_ms": 1e3 * _pct(d, 99),
            "gateway_p99_ms": 1e3 * _pct(g, 99),
        }
        r = result[kind]
        r["added_p50_ms"] = r["gateway_p50_ms"] - r["direct_p50_ms"]
        r["added_p99_ms"] = r["gateway_p99_ms"] - r["direct_p99_ms"]
        r["p50_ratio"] = r["gateway_p50_ms"] / r["direct_p50_ms"]
    # the pods served every request twice (direct and via the gateway)
    result["gateway_cpu_us_per_request"] = 1e6 * gw_cpu / n_gateway
    result["pod_cpu_us_per_request"] = 1e6 * pod_cpu / (2 * n_gateway)
    result["cpu_ratio_gateway_to_pod"] = gw_cpu / (pod_cpu / 2) if pod_cpu else float("nan")
    result["load"] = {
        "concurrency": opts.load_concurrency,
        "requests_per_s": load_done / load_wall,
        "gateway_cpu_us_per_request": 1e6 * load_cpu / max(1, load_done),
        "gateway_cpu_utilisation": load_cpu / load_wall,
    }
    return result


def _pct(values: list[float], q: float) -> float:
    p = percentile(values, q)
    assert p is not None, "every mode has samples"
    return p


def report(result: dict[str, Any]) -> str:
    lines = [
        f"gateway overhead, {result['pods']} trivial pods, {result['requests_per_mode']} requests per mode"
    ]
    lines.append(f"{'':26}{'direct':>10}{'gateway':>10}{'added':>10}{'ratio':>8}")
    for kind, label in (("full", "non-stream answer"), ("ttft", "stream first chunk")):
        r = result[kind]
        for q in ("p50", "p99"):
            lines.append(
                f"{label + ' ' + q + ' (ms)':26}{r[f'direct_{q}_ms']:10.3f}{r[f'gateway_{q}_ms']:10.3f}"
                f"{r[f'added_{q}_ms']:10.3f}{r[f'gateway_{q}_ms'] / r[f'direct_{q}_ms']:8.2f}"
            )
    lines.append(
        f"CPU per request: gateway {result['gateway_cpu_us_per_request']:.0f} us, "
        f"pod {result['pod_cpu_us_per_request']:.0f} us (ratio {result['cpu_ratio_gateway_to_pod']:.2f})"
    )
    load = result["load"]
    lines.append(
        f"under load ({load['concurrency']} clients): {load['requests_per_s']:.0f} req/s through one gateway "
        f"process at {100 * load['gateway_cpu_utilisation']:.0f}% of a core, "
        f"{load['gateway_cpu_us_per_request']:.0f} us CPU per request"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.proxy_overhead", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--pods", type=int, default=2)
    parser.add_argument("--requests", type=int, default=2000, help="per mode (direct, gateway)")
    parser.add_argument("--concurrency", type=int, default=1, help="clients in the latency phase")
    parser.add_argument("--load-seconds", type=float, default=3.0)
    parser.add_argument("--load-concurrency", type=int, default=32)
    parser.add_argument("--policy", default="least_request")
    parser.add_argument("--out", help="also write the figures as JSON here")
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.serve_upstream:
        run_async(serve_upstream(opts.port))
        return 0
    with TemporaryDirectory(prefix="kvgate-overhead-") as tmp:
        result = run_async(measure(opts, Path(tmp)))
    print(report(result))
    if opts.out:
        with open(opts.out, "wb") as f:
            f.write(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
