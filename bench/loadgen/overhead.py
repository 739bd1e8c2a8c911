"""How much the load generator costs, measured against an instant SSE server in another process.

    python -m bench.loadgen.overhead [--requests 1000] [--users 32] [--rate 100] [--output-tokens 16]

The server (`--serve`, started here as a child process) streams `max_tokens` chunks as fast as it can,
so what is left is the load generator's own cost: CPU milliseconds per request, its share of one core,
and how late open-loop requests start against their schedule.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

import orjson
from aiohttp import web

from bench.loadgen.procs import ChildProcess
from bench.loadgen.runner import run_async, run_workload
from bench.loadgen.stats import summarize
from bench.workloads import ClosedLoop, OpenLoop, SharedPrefixSpec, shared_prefix
from bench.workloads.arrivals import Arrival

READY = "OVERHEAD_SERVER_READY"


async def _stream(request: web.Request) -> web.StreamResponse:
    body = orjson.loads(await request.read())
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for i in range(int(body.get("max_tokens", 1))):
        await resp.write(b'data: {"choices":[{"index":0,"text":" t%d"}]}\n\n' % i)
    usage = {"prompt_tokens": 0, "completion_tokens": body.get("max_tokens", 1)}
    await resp.write(b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\ndata: [DONE]\n\n")
    return resp


async def serve() -> None:
    """The instant SSE server: prints `READY {"url": ...}` then serves until killed."""
    app = web.Application()
    app.router.add_post("/v1/completions", _stream)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    print(f"{READY} " + orjson.dumps({"url": f"http://127.0.0.1:{port}"}).decode(), flush=True)
    await asyncio.Event().wait()


async def measure(args: argparse.Namespace, log_dir: Path) -> None:
    server = ChildProcess([sys.executable, "-m", "bench.loadgen.overhead", "--serve"], log_dir / "server.log")
    url = (await server.start(READY, 30.0))["url"]
    try:
        spec = SharedPrefixSpec(groups=max(1, args.requests // 20), prompts_per_group=20, system_tokens=1000,
                                question_tokens=50, output_tokens=args.output_tokens)
        workload = shared_prefix(spec)
        loads: list[Arrival] = [ClosedLoop(args.users), OpenLoop(rate=args.rate)]
        for arrival in loads:
            out = await run_workload(url, "m", workload, arrival)
            s = summarize(out.results, out.duration_s)
            o = out.overhead
            print(f"{arrival.label():>10}: {s.ok}/{s.requests} ok, {s.request_rate:.0f} req/s, "
                  f"{s.output_tps:.0f} chunks/s; load generator {o.cpu_ms_per_request:.2f} ms CPU/request, "
                  f"{o.cpu_share * 100:.0f}% of a core; start lag p50 {(o.lag.p50 or 0) * 1000:.2f} ms, "
                  f"p99 {(o.lag.p99 or 0) * 1000:.1f} ms")
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.loadgen.overhead", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--users", type=int, default=32, help="closed loop")
    parser.add_argument("--rate", type=float, default=100.0, help="open loop, requests/s")
    parser.add_argument("--output-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    if args.serve:
        run_async(serve())
        return 0
    with TemporaryDirectory() as tmp:
        run_async(measure(args, Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
