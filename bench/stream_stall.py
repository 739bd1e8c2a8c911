"""Stream stalls from long prompts: the inter-chunk gaps of concurrent streams through the gateway while
a burst of 32k-token prompts arrives, tokenizing inline (on the event loop) against in the worker.

    python -m bench.stream_stall [--streams 100] [--itl-ms 20] [--burst 8] [--burst-words 12000]
                                 [--workers 0,1] [--baseline-src DIR] [--rounds 2] [--out result.json]

One trivial pod process streams each answer's chunks every `--itl-ms` (and answers any other request
at once). Per setting of `tokenizer_workers` (0: today's inline tokenizing; 1: the worker) a
`kvgate serve --policy cache_aware --tokenizer tests/fixtures/vllm/model` runs in front of it: the
client opens `--streams` streams, records every gap between two chunks of a stream for a quiet
window, then sends `--burst` prompts of `--burst-words` words (about 32k tokens each with the tiny
model's byte-level BPE) at once and records the gaps until the last burst answer is back. After a
settling pause, a control burst of as many short prompts, its window held open as long as the long
burst took: what the requests themselves cost, and a window of the same length (the quiet window is
longer, so its p99 catches more of the host's own noise). Each gap counts in the window its later
chunk arrived in. Reported per setting: p50, p99 and max gap, quiet, during the burst and during the
control, and what the burst adds to the p99 over the quiet one and over the control's (the second is
what tokenizing the long prompts adds). `--baseline-src` (another checkout, e.g. `git archive main`)
runs every setting from that tree too, beside this one. `--rounds` alternates the settings so drift
affects all.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
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

READY = "STREAM_STALL_UPSTREAM_READY"
MODEL = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "vllm" / "model"
CHUNK = b'data: {"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":" tok"}]}\n\n'
ANSWER = orjson.dumps(
    {
        "id": "cmpl-1",
        "object": "text_completion",
        "model": "m",
        "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
    }
)
WORDS = "the quick brown fox jumps over lazy dog while hello world data model token cache prefix".split()


# ---- the pod (run with --serve-upstream) ----


async def _completions(request: web.Request) -> web.StreamResponse:
    body = orjson.loads(await request.read())
    if not body.get("stream"):
        return web.Response(body=ANSWER, content_type="application/json")
    itl = float(body.get("itl_s", 0.02))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(int(body.get("max_tokens") or 1)):
        await asyncio.sleep(max(0.0, start + (i + 1) * itl - loop.time()))  # paced, drift-free
        await resp.write(CHUNK)
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="")


async def serve_upstream() -> None:
    app = web.Application(client_max_size=1 << 24)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_get("/health", _ok)
    app.router.add_get("/metrics", _ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print(
        f"{READY} " + orjson.dumps({"url": f"http://127.0.0.1:{runner.addresses[0][1]}"}).decode(), flush=True
    )
    await asyncio.Event().wait()


# ---- the measurement ----


class Gaps:
    """Inter-chunk gaps, split by the window their later chunk arrived in."""

    def __init__(self) -> None:
        self.window = "warmup"
        self.by_window: dict[str, list[float]] = {
            "warmup": [], "quiet": [], "burst": [], "settle": [], "control": [], "after": []
        }  # fmt: skip

    def add(self, gap: float) -> None:
        self.by_window[self.window].append(gap)


async def stream(session: aiohttp.ClientSession, url: str, chunks: int, itl_s: float, gaps: Gaps) -> None:
    body = {"model": "m", "prompt": "stream me", "max_tokens": chunks, "stream": True, "itl_s": itl_s}
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"stream: HTTP {r.status}")
        last = 0.0
        async for _ in r.content.iter_any():
            now = time.perf_counter()
            if last:
                gaps.add(now - last)
            last = now


async def burst(session: aiohttp.ClientSession, url: str, bodies: list[bytes]) -> None:
    async def one(body: bytes) -> None:
        async with session.post(
            url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
        ) as r:
            await r.read()
            if r.status != 200:
                raise RuntimeError(f"burst: HTTP {r.status}")

    await asyncio.gather(*(one(b) for b in bodies))


def _stats(gaps: list[float]) -> dict[str, float]:
    ms = [g * 1e3 for g in gaps]
    return {
        "n": len(ms),
        "p50_ms": percentile(ms, 50) or 0.0,
        "p99_ms": percentile(ms, 99) or 0.0,
        "max_ms": max(ms, default=0.0),
    }


async def one_setting(
    opts: argparse.Namespace,
    pod: str,
    workers: int,
    src: str | None,
    log_dir: Path,
    bodies: list[bytes],
    controls: list[bytes],
) -> dict[str, Any]:
    spec = RouterSpec(
        "cache_aware",
        extra_args=("--tokenizer", str(MODEL), "--tokenizer-workers", str(workers), "--no-access-log"),
        src=src,
    )
    gateway = RouterProcess(spec, [pod], "m", log_dir)
    url = await gateway.start(60.0)
    gaps = Gaps()
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            await burst(session, url, bodies[:1])  # warm: tokenizer loaded, connections open
            itl = opts.itl_ms / 1e3
            total = opts.warmup_s + opts.quiet_s + opts.burst_budget_s
            streams = [
                asyncio.ensure_future(stream(session, url, int(total / itl), itl, gaps))
                for _ in range(opts.streams)
            ]
            await asyncio.sleep(opts.warmup_s)
            gaps.window = "quiet"
            await asyncio.sleep(opts.quiet_s)
            gaps.window = "burst"
            t0 = time.perf_counter()
            await burst(session, url, bodies)
            burst_s = time.perf_counter() - t0
            gaps.window = "settle"
            await asyncio.sleep(opts.settle_s)
            gaps.window = "control"
            t0 = time.perf_counter()
            await burst(session, url, controls)
            await asyncio.sleep(max(0.0, burst_s - (time.perf_counter() - t0)))
            gaps.window = "after"
            for s in streams:
                s.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
    finally:
        await gateway.stop()
    quiet, during = _stats(gaps.by_window["quiet"]), _stats(gaps.by_window["burst"])
    control = _stats(gaps.by_window["control"])
    return {
        "tokenizer_workers": workers,
        "code": "baseline" if src else "this",
        "burst_s": burst_s,
        "quiet": quiet,
        "burst": during,
        "control": control,
        "added_p99_ms": during["p99_ms"] - quiet["p99_ms"],
        "added_over_control_p99_ms": during["p99_ms"] - control["p99_ms"],
    }


async def measure(opts: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    rng = random.Random(0)
    bodies = [
        orjson.dumps(
            {
                "model": "m",
                "max_tokens": 1,
                "prompt": f"{i} " + " ".join(rng.choice(WORDS) for _ in range(opts.burst_words)),
            }
        )
        for i in range(opts.burst)
    ]
    controls = [
        orjson.dumps({"model": "m", "max_tokens": 1, "prompt": f"{i} control"}) for i in range(opts.burst)
    ]
    settings = [(w, None) for w in opts.workers]
    if opts.baseline_src:
        settings += [(w, opts.baseline_src) for w in opts.workers]
    pod = ChildProcess(
        [sys.executable, "-m", "bench.stream_stall", "--serve-upstream"],
        log_dir / "pod.log",
        env={"PYTHONUNBUFFERED": "1"},
    )
    pod_url = str((await pod.start(READY, 30.0))["url"])
    runs = []
    try:
        for r in range(opts.rounds):
            for workers, src in settings if r % 2 == 0 else settings[::-1]:
                runs.append(await one_setting(opts, pod_url, workers, src, log_dir, bodies, controls))
    finally:
        await pod.stop()
    return {
        "streams": opts.streams,
        "itl_ms": opts.itl_ms,
        "burst": opts.burst,
        "burst_words": opts.burst_words,
        "baseline_src": opts.baseline_src,
        "runs": runs,
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        f"{result['streams']} streams, a chunk every {result['itl_ms']:g} ms; burst of {result['burst']} "
        f"prompts of {result['burst_words']} words (~32k tokens each, tiny model's tokenizer)",
        f"{'code':>8} {'workers':>7} {'quiet p50':>9} {'p99':>6} {'burst p50':>9} {'p99':>6} {'max':>6} "
        f"{'control p99':>11} {'added p99':>9} {'over control':>12} {'burst s':>7}",
    ]
    for r in result["runs"]:
        q, b, c = r["quiet"], r["burst"], r["control"]
        lines.append(
            f"{r['code']:>8} {r['tokenizer_workers']:>7} {q['p50_ms']:9.2f} {q['p99_ms']:6.2f} "
            f"{b['p50_ms']:9.2f} {b['p99_ms']:6.2f} {b['max_ms']:6.1f} {c['p99_ms']:11.2f} "
            f"{r['added_p99_ms']:9.2f} {r['added_over_control_p99_ms']:12.2f} {r['burst_s']:7.2f}"
        )
    lines.append(
        "(ms; each gap counted in the window its later chunk arrived in; added p99: burst over "
        "quiet, over control: burst over the control burst of short prompts)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.stream_stall", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--itl-ms", type=float, default=20.0, help="the pod's gap between two chunks")
    parser.add_argument("--burst", type=int, default=8, help="long prompts sent at once")
    parser.add_argument("--burst-words", type=int, default=12_000, help="words per long prompt")
    parser.add_argument(
        "--workers",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[0, 1],
        help="tokenizer_workers settings to compare (0: inline)",
    )
    parser.add_argument(
        "--baseline-src", help="also run every setting from this source tree (today's code, say)"
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--settle-s", type=float, default=0.5, help="pause between the long burst and the control"
    )
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--quiet-s", type=float, default=2.0)
    parser.add_argument(
        "--burst-budget-s", type=float, default=30.0, help="streams last this long past quiet"
    )
    parser.add_argument("--out", help="also write the figures as JSON here")
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.serve_upstream:
        run_async(serve_upstream())
        return 0
    if opts.baseline_src:
        opts.baseline_src = os.path.abspath(opts.baseline_src)
    with TemporaryDirectory(prefix="kvgate-stall-") as tmp:
        result = run_async(measure(opts, Path(tmp)))
    print(report(result))
    if opts.out:
        with open(opts.out, "wb") as f:
            f.write(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
