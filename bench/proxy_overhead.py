"""Gateway overhead: added latency (p50, p99) and CPU time per request, against direct access to the
same pods, in one run.

    python -m bench.proxy_overhead [--pods 2] [--requests 2000] [--concurrency 1] [--out result.json]
        [--policy round_robin|cache_aware|...] [--prompt-tokens 2000]
        [--sglang-python /opt/sglang-venv/bin/python]

Starts `--pods` trivial upstream processes (an OpenAI-shaped pod that answers instantly, so every
microsecond measured is the gateway's or the client's) and one `kvgate serve` process in front of them.
Requests alternate direct / via the gateway so drift affects both equally. Per mode it reports the
latency of a whole non-streamed answer and the time to the first chunk of a streamed one; the gateway's
CPU time per request comes from /proc/<pid>/stat of the gateway process, and is compared with the
pods' CPU time per request (the same pods answer both modes). A last phase runs `--load-concurrency`
clients through the gateway to report the request rate one gateway process sustains and its CPU per
request under load. `--prompt-tokens N` sends prompts of N words (64 distinct ones, cycled) instead of
"Hello world"; `--sglang-python` puts the SGLang router (`pip install sglang-router` into that venv)
with the same policy beside kvgate, in the same run, interleaved request by request, and reports its
figures and kvgate's CPU per request as a ratio of its.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from bench.loadgen.procs import ChildProcess, cpu_seconds
from bench.loadgen.routers import SGLANG, RouterProcess, RouterSpec
from bench.loadgen.runner import run_async
from bench.loadgen.stats import percentile
from bench.real_vllm import wait_sglang_workers

READY = "PROXY_OVERHEAD_UPSTREAM_READY"
PLAIN_BODY = b'{"model":"m","prompt":"Hello world","max_tokens":4,"stream":false}'
STREAM_BODY = b'{"model":"m","prompt":"Hello world","max_tokens":4,"stream":true}'
JSON_HEADERS = {"Content-Type": "application/json"}

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


async def _upstream_models(request: web.Request) -> web.Response:
    data = {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "bench"}]}
    return web.Response(body=orjson.dumps(data), content_type="application/json")


async def _upstream_info(request: web.Request) -> web.Response:  # what the SGLang router asks a worker
    body = b'{"model_path": "m", "served_model_name": "m"}'
    return web.Response(body=body, content_type="application/json")


async def serve_upstream(port: int) -> None:
    app = web.Application(client_max_size=1 << 24)
    app.router.add_post("/v1/completions", _upstream_completions)
    app.router.add_get("/health", _upstream_ok)
    app.router.add_get("/metrics", _upstream_ok)
    app.router.add_get("/v1/models", _upstream_models)
    for path in ("/get_model_info", "/get_server_info", "/server_info", "/model_info"):
        app.router.add_get(path, _upstream_info)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    print(f"{READY} " + orjson.dumps({"url": url}).decode(), flush=True)
    await asyncio.Event().wait()


# ---- the measurement ----


BODIES: dict[bool, list[bytes]] = {False: [PLAIN_BODY], True: [STREAM_BODY]}
_next_body = iter(range(1 << 62))


def use_prompts(tokens: int, distinct: int = 64) -> None:
    """Send prompts of `tokens` words (`distinct` of them, cycled) instead of "Hello world"."""
    words = [f"w{i}" for i in range(5000)]
    rng = random.Random(0)
    for stream in (False, True):
        BODIES[stream] = [
            orjson.dumps({"model": "m", "prompt": " ".join(rng.choice(words) for _ in range(tokens)),
                          "max_tokens": 4, "stream": stream})
            for _ in range(distinct)
        ]  # fmt: skip


async def one_request(session: aiohttp.ClientSession, url: str, stream: bool) -> float:
    """Seconds to the whole answer (stream=False) or to the first chunk (stream=True)."""
    bodies = BODIES[stream]
    body = bodies[next(_next_body) % len(bodies)]
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
    session: aiohttp.ClientSession, direct: list[str], routers: dict[str, str], n: int, concurrency: int
) -> dict[str, dict[str, list[float]]]:
    """Interleaved direct / router requests (the order rotating); per mode and kind the latencies in s."""
    modes = ["direct", *routers]
    samples: dict[str, dict[str, list[float]]] = {m: {"full": [], "ttft": []} for m in modes}
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            stream = i % 2 == 1
            kind = "ttft" if stream else "full"
            urls = {"direct": direct[i % len(direct)], **routers}
            turn = (i // 2) % len(modes)
            for mode in modes[turn:] + modes[:turn]:
                samples[mode][kind].append(await one_request(session, urls[mode], stream))

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
    routers: dict[str, RouterProcess] = {}
    try:
        urls = []
        for i in range(opts.pods):
            pod = ChildProcess([sys.executable, "-m", "bench.proxy_overhead", "--serve-upstream"],
                               log_dir / f"pod-{i}.log", env={"PYTHONUNBUFFERED": "1"})
            pods.append(pod)
            urls.append(str((await pod.start(READY, 30.0))["url"]))
        routers["gateway"] = RouterProcess(RouterSpec(opts.policy), urls, "m", log_dir)
        if opts.sglang_python:
            spec = RouterSpec(SGLANG, python=opts.sglang_python, sglang_policy=opts.policy)
            routers["sglang"] = RouterProcess(spec, urls, "m", log_dir)
        router_urls = {name: await r.start(60.0) for name, r in routers.items()}
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
        async with aiohttp.ClientSession(connector=connector) as session:
            if "sglang" in router_urls:
                await wait_sglang_workers(session, router_urls["sglang"], len(urls), 60.0)
            pids = {name: _pid(r.process) for name, r in routers.items()}
            pod_pids = [_pid(p) for p in pods]
            await latency_phase(session, urls, router_urls, 200, opts.concurrency)  # warm-up
            cpu0, pod_cpu0 = {n: cpu_seconds(p) for n, p in pids.items()}, sum(map(cpu_seconds, pod_pids))
            samples = await latency_phase(session, urls, router_urls, opts.requests, opts.concurrency)
            cpu = {n: cpu_seconds(p) - cpu0[n] for n, p in pids.items()}
            pod_cpu = sum(map(cpu_seconds, pod_pids)) - pod_cpu0
            loads = {}
            for name, url in router_urls.items():
                load_cpu0 = cpu_seconds(pids[name])
                load_start = time.perf_counter()
                load_done = await load_phase(session, url, opts.load_seconds, opts.load_concurrency)
                load_wall = time.perf_counter() - load_start
                loads[name] = (load_done, load_wall, cpu_seconds(pids[name]) - load_cpu0)
    finally:
        await asyncio.gather(*(r.stop() for r in routers.values()))
        await asyncio.gather(*(p.stop() for p in pods))
    n_gateway = sum(len(v) for v in samples["gateway"].values())
    result: dict[str, Any] = {"pods": opts.pods, "requests_per_mode": n_gateway, "policy": opts.policy,
                              "prompt_tokens": opts.prompt_tokens}  # fmt: skip
    result.update(_router_figures(samples, "gateway", cpu["gateway"], loads["gateway"], opts))
    # the pods served every request once per mode
    result["pod_cpu_us_per_request"] = 1e6 * pod_cpu / (len(samples) * n_gateway)
    result["cpu_ratio_gateway_to_pod"] = (
        cpu["gateway"] / (pod_cpu / len(samples)) if pod_cpu else float("nan")
    )
    if "sglang" in samples:
        sg = result["sglang"] = _router_figures(samples, "sglang", cpu["sglang"], loads["sglang"], opts)
        result["vs_sglang"] = {
            "cpu_ratio": result["gateway_cpu_us_per_request"] / sg["gateway_cpu_us_per_request"],
            "load_cpu_ratio": result["load"]["gateway_cpu_us_per_request"]
            / sg["load"]["gateway_cpu_us_per_request"],
            "added_p50_ms": {k: result[k]["added_p50_ms"] for k in ("full", "ttft")},
            "sglang_added_p50_ms": {k: sg[k]["added_p50_ms"] for k in ("full", "ttft")},
        }
    return result


def _router_figures(samples: dict[str, dict[str, list[float]]], mode: str, cpu: float,
                    load: tuple[int, float, float], opts: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """One router's latency figures beside direct access, CPU per request, and the load phase."""
    out: dict[str, Any] = {}
    for kind in ("full", "ttft"):
        d, g = samples["direct"][kind], samples[mode][kind]
        r = out[kind] = {
            "direct_p50_ms": 1e3 * _pct(d, 50),
            "gateway_p50_ms": 1e3 * _pct(g, 50),
            "direct_p99_ms": 1e3 * _pct(d, 99),
            "gateway_p99_ms": 1e3 * _pct(g, 99),
        }
        r["added_p50_ms"] = r["gateway_p50_ms"] - r["direct_p50_ms"]
        r["added_p99_ms"] = r["gateway_p99_ms"] - r["direct_p99_ms"]
        r["p50_ratio"] = r["gateway_p50_ms"] / r["direct_p50_ms"]
    n = sum(len(v) for v in samples[mode].values())
    out["gateway_cpu_us_per_request"] = 1e6 * cpu / n
    done, wall, load_cpu = load
    out["load"] = {
        "concurrency": opts.load_concurrency,
        "requests_per_s": done / wall,
        "gateway_cpu_us_per_request": 1e6 * load_cpu / max(1, done),
        "gateway_cpu_utilisation": load_cpu / wall,
    }
    return out


def _pct(values: list[float], q: float) -> float:
    p = percentile(values, q)
    assert p is not None, "every mode has samples"
    return p


def report(result: dict[str, Any]) -> str:
    prompt = f"{result['prompt_tokens']}-word prompts" if result.get("prompt_tokens") else "short prompts"
    lines = [
        f"gateway overhead, {result['pods']} trivial pods, {result['requests_per_mode']} requests per mode, "
        f"policy {result['policy']}, {prompt}"
    ]
    routers = [("kvgate", result)] + ([("sglang", result["sglang"])] if "sglang" in result else [])
    for name, figures in routers:
        lines += _report_router(name, figures)
    lines.append(
        f"pod CPU per request {result['pod_cpu_us_per_request']:.0f} us "
        f"(kvgate/pod ratio {result['cpu_ratio_gateway_to_pod']:.2f})"
    )
    if "vs_sglang" in result:
        v = result["vs_sglang"]
        lines.append(f"kvgate CPU per request / SGLang router's: {v['cpu_ratio']:.2f} (latency phase), "
                     f"{v['load_cpu_ratio']:.2f} (under load)")  # fmt: skip
    return "\n".join(lines)


def _report_router(name: str, r: dict[str, Any]) -> list[str]:
    lines = [f"{name:26}{'direct':>10}{'router':>10}{'added':>10}{'ratio':>8}"]
    for kind, label in (("full", "non-stream answer"), ("ttft", "stream first chunk")):
        k = r[kind]
        for q in ("p50", "p99"):
            lines.append(
                f"{label + ' ' + q + ' (ms)':26}{k[f'direct_{q}_ms']:10.3f}{k[f'gateway_{q}_ms']:10.3f}"
                f"{k[f'added_{q}_ms']:10.3f}{k[f'gateway_{q}_ms'] / k[f'direct_{q}_ms']:8.2f}"
            )
    load = r["load"]
    lines.append(
        f"{name} CPU per request: {r['gateway_cpu_us_per_request']:.0f} us; under load "
        f"({load['concurrency']} clients): {load['requests_per_s']:.0f} req/s at "
        f"{100 * load['gateway_cpu_utilisation']:.0f}% of a core, "
        f"{load['gateway_cpu_us_per_request']:.0f} us CPU per request"
    )
    return lines


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
    parser.add_argument("--prompt-tokens", type=int, default=0, help="words per prompt (0: 'Hello world')")
    parser.add_argument("--sglang-python", help="a Python with sglang_router: the SGLang router beside")
    parser.add_argument("--out", help="also write the figures as JSON here")
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.serve_upstream:
        run_async(serve_upstream(opts.port))
        return 0
    if opts.prompt_tokens:
        use_prompts(opts.prompt_tokens)
    with TemporaryDirectory(prefix="kvgate-overhead-") as tmp:
        result = run_async(measure(opts, Path(tmp)))
    print(report(result))
    if opts.out:
        with open(opts.out, "wb") as f:
            f.write(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
