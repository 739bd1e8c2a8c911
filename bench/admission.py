"""Admission control on the simulated fleet: one heavy tenant bursting at 3x the fleet's capacity beside
8 steady small tenants, without admission, with FIFO admission and with fair queuing, each `cache_aware`.

    python -m bench.admission [--pods 4 --duration 40 --heavy-load 3.0 --out DIR]

One fleet of `kvgate sim` processes (8 slots each: `--max-num-seqs 8`, 25 ms decode steps, 96 output
tokens on average, 32 to 160, so a request holds a slot ~2.4 s), one `kvgate serve` per setup in front of it:
  none    no `admission` section: every request is routed at once and waits in a pod's queue;
  fifo    `admission: {order: fifo}`: requests wait in the gateway in arrival order;
  fair    `admission: {order: fair}` with the 9 tenants configured (weight 1 each).
Each tenant has its own system prompts (1024 words; the heavy one 4 of them, a small one 1) and a
unique question per request. Arrivals are Poisson: the heavy tenant at `--heavy-load` x the fleet's
capacity (slots / request time), each small tenant at `--small-rate` per second, for `--duration`
seconds; requests still open `--tail` seconds later are cut (a cut small request counts with the time
it had waited: its TTFT is at least that). Before each setup the pods' caches are reset and each prefix
warmed once; a second request per small tenant on the idle fleet gives the no-contention TTFT.

Reported per setup: small tenants' TTFT p50/p90 and wait p90 (TTFT minus the idle TTFT: time spent
queued, in the gateway or a pod), the gateway's admission wait p90 for them, the heavy tenant's completed
requests per second and its 429/503 count, the fleet's output tokens/s and pod prefix hit rate (deltas
of the pods' own counters) and the busy fraction while work is queued (running / slots, sampled every
0.25 s whenever the gateway's queue or a pod's waiting queue is non-empty). ~4 minutes on 2 cores.

Hit rate, taken apart (the fleet serves a different mix of tenants in each setup, so the pods' overall
figure is not comparable on its own):
  per class     cached / prompt tokens of the answered requests of the small tenants, of the heavy one;
  prefix misses answered requests whose cached tokens fall short of their system prompt (cold or
                partial prefix), and the prefix tokens they had to prefill;
  evicted       cached KV blocks the pods evicted during the run (the simulator's own counter);
  equal footing per class, the hit rate of the first N answered requests in arrival order, N the fewest
                any setup answered of that class (the same cold starts over the same number of requests);
  offered mix   the per-class hit rates weighted by each class's share of the offered prompt tokens
                (the same schedule in every setup), so the figure does not depend on the mix served;
  pod prefill s the pods' uncached prompt tokens / prefill rate: the time prefills added to decode steps.
A request counts as done (heavy done/s, small done) when answered in full before the cut.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from bench.loadgen.client import RequestResult, send
from bench.loadgen.harness import reset_prefix_caches
from bench.loadgen.podmetrics import PodFigures, delta, scrape
from bench.loadgen.procs import ChildProcess, wait_http_ok
from bench.loadgen.runner import run_async
from bench.loadgen.stats import percentile
from bench.sim.fleet import SimFleetProcess
from bench.workloads.base import BenchRequest
from bench.workloads.words import text

MODEL = "admission-bench"
SLOTS = 8
POD: dict[str, Any] = {"max_num_seqs": SLOTS, "itl_ms": 25.0, "itl_ms_per_seq": 0.0, "prefill_tps": 16000.0,
                       "num_gpu_blocks": 6000, "seed": 0}
OUTPUT_TOKENS = 96
PREFIX_WORDS = 1024
QUESTION_WORDS = 48
SMALL = [f"small{i}" for i in range(8)]
HEAVY = "heavy"
SETUPS = ("none", "fifo", "fair")
CLASSES = ("small", "heavy")
BLOCK_SIZE = 16  # the simulated pods' KV block (kvgate sim's default): a prefix is cached in whole blocks
_RUNNING = re.compile(r"^vllm:num_requests_running(?:\{[^}]*\})? (\S+)$", re.M)
_WAITING = re.compile(r"^vllm:num_requests_waiting(?:\{[^}]*\})? (\S+)$", re.M)
_DEPTH = re.compile(r"^kvgate_admission_queue_depth\{[^}]*\} (\S+)$", re.M)
_WAIT_BUCKET = re.compile(r'^kvgate_admission_queue_wait_seconds_bucket\{le="([^"]+)",priority="[^"]*",'
                          r'tenant="(\w+)"\} (\S+)$', re.M)


@dataclass(slots=True)
class Sent:
    tenant: str
    result: RequestResult
    cut: bool = False
    prefix: int = 0  # which of the tenant's system prompts
    prefix_tokens: int = PREFIX_WORDS  # its length in tokens (one per word under the pods' tokenizer)

    @property
    def cls(self) -> str:
        return "heavy" if self.tenant == HEAVY else "small"

    @property
    def done(self) -> bool:
        """Answered in full (a request cut mid-stream has status 200 and no error, but is not done)."""
        return self.result.ok and not self.cut

    @property
    def answered(self) -> bool:
        """Done, with the pod's usage (prompt and cached tokens)."""
        r = self.result
        return self.done and r.cached_tokens is not None and r.prompt_tokens > 0


@dataclass(slots=True)
class SetupResult:
    setup: str
    small_ttft_p50: float | None
    small_ttft_p90: float | None
    small_wait_p90: float | None
    small_admission_wait_p90: float | None
    small_done: int
    small_cut: int
    heavy_done_per_s: float
    heavy_refused: int
    output_tps: float
    hit_rate: float | None  # the pods' own counters: all prompt tokens they prefilled, of every tenant
    small_hit_rate: float | None  # cached / prompt tokens of the answered requests (the pods' usage)
    heavy_hit_rate: float | None
    busy_while_queued: float | None
    idle_ttft: float
    span_s: float
    samples_queued: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    # per class ("small", "heavy"): answered requests short of their prefix, the prefix tokens they
    # prefilled, and the (prefix, pod) pairs that served the class (pod copies of its prefixes)
    prefix_misses: dict[str, int] = field(default_factory=dict)
    prefix_miss_tokens: dict[str, int] = field(default_factory=dict)
    prefix_copies: dict[str, int] = field(default_factory=dict)
    evicted_blocks: float | None = None  # the pods' evicted cached blocks over the run
    prefill_s: float | None = None  # the pods' uncached prompt tokens over the run / prefill_tps
    # per class, the answered requests' [prompt, cached] tokens in arrival order
    answered: dict[str, list[list[int]]] = field(default_factory=dict)
    # per class: the equal-footing hit rate and its N (set by equal_footing() once every setup ran)
    equal_hit: dict[str, float | None] = field(default_factory=dict)
    equal_n: dict[str, int] = field(default_factory=dict)
    offered_share: dict[str, float] = field(default_factory=dict)  # of the offered prompt tokens
    offered_mix_hit_rate: float | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.admission", description=__doc__.split("\n\n")[0])
    p.add_argument("--pods", type=int, default=4)
    p.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals per setup")
    p.add_argument("--tail", type=float, default=10.0, help="seconds after the arrivals before cutting")
    p.add_argument("--heavy-load", type=float, default=3.0, help="heavy tenant's rate / fleet capacity")
    p.add_argument("--small-rate", type=float, default=0.4, help="requests per second of each small tenant")
    p.add_argument("--setups", default=",".join(SETUPS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="folder for results.json and the processes' logs")
    return p.parse_args(argv)


def capacity(pods: int) -> float:
    """Requests per second the fleet completes when every slot is busy."""
    return pods * SLOTS / (OUTPUT_TOKENS * POD["itl_ms"] / 1000.0)


def prefix(tenant: str, k: int, seed: int) -> str:
    return text(seed, ("prefix", tenant, k), PREFIX_WORDS)


def request(tenant: str, k: int, i: int, seed: int, output_tokens: int = OUTPUT_TOKENS) -> BenchRequest:
    prompt = prefix(tenant, k, seed) + " " + text(seed, ("question", tenant, i), QUESTION_WORDS)
    return BenchRequest(f"{tenant}/{i}", "completions", output_tokens, prompt=prompt)


def prefix_of(tenant: str, i: int) -> int:
    """Which system prompt a tenant's i-th request carries (the heavy tenant cycles through 4)."""
    return i % 4 if tenant == HEAVY else 0


def schedule(args: argparse.Namespace) -> list[tuple[float, str, BenchRequest]]:
    """(offset, tenant, request) for the whole run, sorted by offset."""
    rng = random.Random(args.seed)
    plan: list[tuple[float, str, BenchRequest]] = []
    rates = {HEAVY: args.heavy_load * capacity(args.pods), **{t: args.small_rate for t in SMALL}}
    for tenant, rate in rates.items():
        t, i = 0.0, 0
        while True:
            t += rng.expovariate(rate)
            if t >= args.duration:
                break
            k = prefix_of(tenant, i)
            out = rng.randint(OUTPUT_TOKENS // 3, OUTPUT_TOKENS * 5 // 3)  # mean OUTPUT_TOKENS
            plan.append((t, tenant, request(tenant, k, i, args.seed, out)))
            i += 1
    return sorted(plan, key=lambda x: x[0])


def gateway_config(setup: str, urls: list[str]) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "timeouts": {"shutdown": 5.0},
        "pools": {MODEL: {"endpoints": [{"url": u} for u in urls],
                          "policy": {"name": "cache_aware", "params": {"max_num_seqs": SLOTS, "seed": 0}}}},
    }
    if setup != "none":
        cfg["admission"] = {
            "order": setup,
            "tenants": [{"name": t} for t in [HEAVY, *SMALL]],
            "queue_timeout_s": 30.0,
            "default_output_tokens": OUTPUT_TOKENS,
        }
    return cfg


async def start_gateway(setup: str, urls: list[str], log_dir: Path) -> tuple[ChildProcess, str]:
    path = log_dir / f"kvgate-{setup}.yaml"
    path.write_text(yaml.safe_dump(gateway_config(setup, urls)))
    argv = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path), "--log-level", "WARNING"]
    proc = ChildProcess(argv, log_dir / f"gateway-{setup}.log", env={"PYTHONUNBUFFERED": "1"})
    info = await proc.start("KVGATE_SERVE_READY ", 60.0)
    url = str(info["url"])
    await wait_http_ok(url + "/ready", 60.0, proc, json_key="ready")
    return proc, url


async def sample_busy(http: aiohttp.ClientSession, gw: str, pods: list[str], stop: asyncio.Event,
                      out: list[float]) -> None:
    """While work is queued (gateway queue or a pod's waiting queue), record running / slots."""
    while not stop.is_set():
        texts = await asyncio.gather(*(_get(http, u + "/metrics") for u in [gw, *pods]))
        gw_queue = sum(float(v) for v in _DEPTH.findall(texts[0]))
        running = sum(float(v) for t in texts[1:] for v in _RUNNING.findall(t))
        waiting = sum(float(v) for t in texts[1:] for v in _WAITING.findall(t))
        if gw_queue > 0 or waiting > 0:
            out.append(running / (SLOTS * len(pods)))
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except TimeoutError:
            pass


async def _get(http: aiohttp.ClientSession, url: str) -> str:
    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
            return await resp.text()
    except (TimeoutError, aiohttp.ClientError):
        return ""


def admission_wait_p90(metrics: str, tenants: list[str]) -> float | None:
    """The 90th percentile bucket bound of kvgate_admission_queue_wait_seconds over `tenants`."""
    buckets: dict[float, float] = {}
    for le, tenant, value in _WAIT_BUCKET.findall(metrics):
        if tenant in tenants:
            bound = float("inf") if le == "+Inf" else float(le)
            buckets[bound] = buckets.get(bound, 0.0) + float(value)
    if not buckets:
        return None
    total = buckets.get(float("inf"), 0.0)
    for bound in sorted(buckets):
        if total and buckets[bound] >= 0.9 * total:
            return bound
    return None


async def run_setup(setup: str, args: argparse.Namespace, fleet: SimFleetProcess,
                    log_dir: Path) -> SetupResult:
    plan = schedule(args)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        await reset_prefix_caches(http, fleet.urls)
        proc, gw = await start_gateway(setup, fleet.urls, log_dir)
        try:
            t_ref = time.perf_counter()
            warm = [(HEAVY, k) for k in range(4)] + [(t, 0) for t in SMALL]  # every prefix once
            await asyncio.gather(*(send(http, gw, MODEL, request(t, k, 10_000 + k, args.seed, 1),
                                        RequestResult("warm", 0.0), t_ref, headers={"x-kvgate-tenant": t})
                                   for t, k in warm))
            idle = []
            for t in SMALL:
                r = await send(http, gw, MODEL, request(t, 0, 20_000, args.seed, 1),
                               RequestResult("idle", 0.0), t_ref, headers={"x-kvgate-tenant": t})
                if r.ttft is not None:
                    idle.append(r.ttft)
            idle_ttft = sorted(idle)[len(idle) // 2] if idle else 0.0
            before = await scrape(http, fleet.urls)
            stop = asyncio.Event()
            busy: list[float] = []
            sampler = asyncio.create_task(sample_busy(http, gw, fleet.urls, stop, busy))
            print(f"[{setup}] {len(plan)} requests over {args.duration:g} s ...", flush=True)
            sent: list[Sent] = []
            tasks: list[asyncio.Task[RequestResult]] = []
            t0 = time.perf_counter()
            for at, tenant, req in plan:
                delay = t0 + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                i = int(req.tag.split("/")[1])
                s = Sent(tenant, RequestResult(req.tag, at), prefix=prefix_of(tenant, i))
                sent.append(s)
                tasks.append(asyncio.create_task(send(http, gw, MODEL, req, s.result, t0, 600.0,
                                                      headers={"x-kvgate-tenant": tenant})))
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, t0 + args.duration + args.tail
                                                                - time.perf_counter()))
            cut_at = time.perf_counter()
            for s, task in zip(sent, tasks, strict=True):
                if task in pending:
                    s.cut = True
                    task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            span = cut_at - t0
            stop.set()
            await sampler
            after = await scrape(http, fleet.urls)
            metrics = await _get(http, gw + "/metrics")
        finally:
            await proc.stop()
    adm_wait = admission_wait_p90(metrics, SMALL)
    result = summarize(setup, sent, span, idle_ttft, delta(before, after), busy, adm_wait)
    result.offered_share = offered_shares(plan)
    result.offered_mix_hit_rate = offered_mix_hit_rate(result, result.offered_share)
    return result


def summarize(setup: str, sent: list[Sent], span: float, idle_ttft: float, pods: PodFigures,
              busy: list[float], adm_wait: float | None) -> SetupResult:
    small = [s for s in sent if s.tenant != HEAVY]
    ttfts = []
    for s in small:
        r = s.result
        if r.ttft is not None:
            ttfts.append(r.ttft)
        elif s.cut or r.status == 0:
            ttfts.append(span - r.started)  # still waiting when cut: at least this long
    heavy_done = sum(1 for s in sent if s.tenant == HEAVY and s.done)
    statuses: dict[str, int] = {}
    for s in sent:
        key = f"{s.tenant if s.tenant == HEAVY else 'small'}:{'cut' if s.cut else s.result.status}"
        statuses[key] = statuses.get(key, 0) + 1
    waits = [max(0.0, t - idle_ttft) for t in ttfts]
    heavy = [s for s in sent if s.tenant == HEAVY]
    by_class = {"small": small, "heavy": heavy}
    misses = {c: prefix_misses(by_class[c]) for c in CLASSES}
    return SetupResult(
        setup=setup,
        small_ttft_p50=percentile(ttfts, 50), small_ttft_p90=percentile(ttfts, 90),
        small_wait_p90=percentile(waits, 90), small_admission_wait_p90=adm_wait,
        small_done=sum(1 for s in small if s.done), small_cut=sum(1 for s in small if s.cut),
        heavy_done_per_s=heavy_done / span,
        heavy_refused=sum(1 for s in sent if s.tenant == HEAVY and s.result.status in (429, 503)),
        output_tps=pods.generation_tokens / span, hit_rate=pods.hit_rate,
        small_hit_rate=answered_hit_rate(small), heavy_hit_rate=answered_hit_rate(heavy),
        busy_while_queued=sum(busy) / len(busy) if busy else None, idle_ttft=idle_ttft, span_s=span,
        samples_queued=len(busy), statuses=statuses,
        prefix_misses={c: misses[c][0] for c in CLASSES},
        prefix_miss_tokens={c: misses[c][1] for c in CLASSES},
        prefix_copies={c: prefix_copies(by_class[c]) for c in CLASSES}, evicted_blocks=pods.evicted_blocks,
        prefill_s=(pods.prefix_queries - pods.prefix_hits) / POD["prefill_tps"],
        answered={c: [[s.result.prompt_tokens, s.result.cached_tokens or 0]
                      for s in by_class[c] if s.answered] for c in CLASSES},
    )


def answered_hit_rate(sent: list[Sent]) -> float | None:
    """Cached over prompt tokens of the requests answered in full, from the pods' own usage: the hit
    rate of one tenant class whatever the mix the fleet served (fair queuing serves more small-tenant
    requests, whose prompts are reused less, which alone moves the pods' overall figure)."""
    return hit_rate([(s.result.prompt_tokens, s.result.cached_tokens or 0) for s in sent if s.answered])


def hit_rate(pairs: list[tuple[int, int]] | list[list[int]]) -> float | None:
    """Cached over prompt tokens of (prompt, cached) pairs."""
    prompt = sum(p for p, _ in pairs)
    return sum(c for _, c in pairs) / prompt if prompt else None


def prefix_misses(sent: list[Sent], block_size: int = BLOCK_SIZE) -> tuple[int, int]:
    """(answered requests whose cached tokens fall short of their prefix, the prefix tokens they had
    to prefill). A pod caches whole blocks, so a prefix counts as hit when its full blocks are."""
    count = tokens = 0
    for s in sent:
        if s.answered:
            whole = s.prefix_tokens // block_size * block_size
            cached = s.result.cached_tokens or 0
            if cached < whole:
                count += 1
                tokens += s.prefix_tokens - cached
    return count, tokens


def prefix_copies(sent: list[Sent]) -> int:
    """How many (tenant's prefix, pod) pairs served the answered requests: the pods each prefix was
    copied to (each pays one cold prefill, unless evicted and prefilled again)."""
    return len({(s.tenant, s.prefix, s.result.endpoint) for s in sent if s.answered})


def offered_shares(plan: list[tuple[float, str, BenchRequest]]) -> dict[str, float]:
    """Each class's share of the prompt tokens offered (the schedule: the same in every setup). The
    prompts are words, one token each under the pods' tokenizer."""
    tokens = dict.fromkeys(CLASSES, 0)
    for _, tenant, req in plan:
        tokens["heavy" if tenant == HEAVY else "small"] += len(str(req.prompt).split())
    total = sum(tokens.values())
    return {c: n / total for c, n in tokens.items()} if total else {}


def offered_mix_hit_rate(r: SetupResult, shares: dict[str, float]) -> float | None:
    """The per-class hit rates of `r`, weighted by the classes' shares of the offered prompt tokens."""
    hits = {"small": r.small_hit_rate, "heavy": r.heavy_hit_rate}
    if not shares or any(hits[c] is None for c in shares if shares[c] > 0):
        return None
    return sum(share * (hits[c] or 0.0) for c, share in shares.items())


def equal_footing(results: list[SetupResult]) -> None:
    """Set each result's per-class hit rate over its first N answered requests (arrival order), N the
    fewest answered of that class by any of `results`."""
    for c in CLASSES:
        n = min((len(r.answered.get(c, [])) for r in results), default=0)
        for r in results:
            r.equal_n[c] = n
            r.equal_hit[c] = hit_rate(r.answered.get(c, [])[:n])


def _p(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} s"


def format_table(results: list[SetupResult]) -> str:
    head = ("| setup | small TTFT p50 | small TTFT p90 | small wait p90 | small admission wait p90 | "
            "heavy done/s | heavy 429/503 | out tok/s | pod hit | hit small / heavy | busy while queued | "
            "prefix misses small / heavy | uncached prefix tok small / heavy | evicted blocks | "
            "pod prefill s | equal-footing hit small / heavy (N) | offered-mix hit |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in results:
        lines.append(
            f"| {r.setup} | {_s(r.small_ttft_p50)} | {_s(r.small_ttft_p90)} | {_s(r.small_wait_p90)} | "
            f"{_s(r.small_admission_wait_p90)} | {r.heavy_done_per_s:.2f} | {r.heavy_refused} | "
            f"{r.output_tps:.0f} | {_p(r.hit_rate)} | {_p(r.small_hit_rate)} / {_p(r.heavy_hit_rate)} | "
            f"{'-' if r.busy_while_queued is None else f'{r.busy_while_queued:.3f}'} | "
            f"{_by_class(r.prefix_misses)} | {_by_class(r.prefix_miss_tokens)} | "
            f"{_n(r.evicted_blocks)} | {'-' if r.prefill_s is None else f'{r.prefill_s:.2f}'} | "
            f"{_equal(r)} | {_p(r.offered_mix_hit_rate)} |"
        )
    return "\n".join(lines)


def _by_class(d: dict[str, int]) -> str:
    return " / ".join(str(d[c]) if c in d else "-" for c in CLASSES)


def _equal(r: SetupResult) -> str:
    if not r.equal_n:
        return "-"
    return (f"{_p(r.equal_hit.get('small'))} / {_p(r.equal_hit.get('heavy'))} "
            f"({r.equal_n.get('small', 0)} / {r.equal_n.get('heavy', 0)})")


def verdict(results: list[SetupResult]) -> list[str]:
    by = {r.setup: r for r in results}
    none, fair = by.get("none"), by.get("fair")
    if none is None or fair is None or not none.small_wait_p90:
        return []
    cut = 1.0 - (fair.small_wait_p90 or 0.0) / none.small_wait_p90
    out = [f"small tenants' p90 wait: fair {cut:.0%} lower than none (target >= 70%)",
           f"output tok/s: fair {fair.output_tps / none.output_tps:.3f}x none (target >= 1, within noise)"]
    if none.hit_rate and fair.hit_rate:
        out.append(f"pod hit rate: fair {fair.hit_rate:.1%} vs none {none.hit_rate:.1%} (every tenant)")
    for cls in ("small", "heavy"):
        f_hit, n_hit = getattr(fair, f"{cls}_hit_rate"), getattr(none, f"{cls}_hit_rate")
        if f_hit is not None and n_hit is not None:
            out.append(f"{cls} tenants' hit rate: fair {f_hit:.1%} vs none {n_hit:.1%} (answered requests)")
    for cls in CLASSES:
        out.append(f"{cls} prefix misses: fair {fair.prefix_misses.get(cls, 0)} "
                   f"({fair.prefix_miss_tokens.get(cls, 0)} prefix tokens prefilled, "
                   f"{fair.prefix_copies.get(cls, 0)} prefix-pod pairs) vs none "
                   f"{none.prefix_misses.get(cls, 0)} ({none.prefix_miss_tokens.get(cls, 0)}, "
                   f"{none.prefix_copies.get(cls, 0)})")
    out.append(f"evicted KV blocks: fair {_n(fair.evicted_blocks)} vs none {_n(none.evicted_blocks)}")
    if fair.prefill_s is not None and none.prefill_s is not None:
        # a prefill lengthens its pod's step: the SLOTS sequences decoding there wait that long
        cost = (fair.prefill_s - none.prefill_s) * SLOTS / (POD["itl_ms"] / 1000.0) / fair.span_s
        out.append(f"pods' prefill time: fair {fair.prefill_s:.2f} s vs none {none.prefill_s:.2f} s "
                   f"(with full batches, ~{-cost:+.1f} output tok/s for fair)")
    for cls in CLASSES:
        f_eq, n_eq = fair.equal_hit.get(cls), none.equal_hit.get(cls)
        if f_eq is not None and n_eq is not None:
            out.append(f"{cls} tenants' equal-footing hit rate (first {fair.equal_n[cls]} answered): "
                       f"fair {f_eq:.1%} vs none {n_eq:.1%}")
    if fair.offered_mix_hit_rate is not None and none.offered_mix_hit_rate is not None:
        out.append(f"offered-mix hit rate: fair {fair.offered_mix_hit_rate:.1%} vs none "
                   f"{none.offered_mix_hit_rate:.1%} (target: no lower)")
    out.append(f"busy fraction while queued: fair {_f(fair.busy_while_queued)} (target >= 0.95)")
    return out


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _n(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


async def main_async(args: argparse.Namespace, log_dir: Path) -> list[SetupResult]:
    setups = [s for s in args.setups.split(",") if s]
    cap = capacity(args.pods)
    print(f"fleet: {args.pods} pods x {SLOTS} slots, capacity {cap:.1f} req/s; heavy at {args.heavy_load:g}x "
          f"({args.heavy_load * cap:.1f}/s), 8 small at {args.small_rate:g}/s each", flush=True)
    results = []
    async with SimFleetProcess(args.pods, model=MODEL, **POD) as fleet:
        for setup in setups:
            results.append(await run_setup(setup, args, fleet, log_dir))
            print(format_table(results[-1:]).splitlines()[-1], flush=True)
    equal_footing(results)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bad = [s for s in args.setups.split(",") if s and s not in SETUPS]
    if bad:
        print(f"unknown setup(s) {bad}; known: {list(SETUPS)}", file=sys.stderr)
        return 2
    out = args.out or Path(tempfile.mkdtemp(prefix="kvgate-admission-"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = run_async(main_async(args, out))
    print()
    print(format_table(results))
    for line in verdict(results):
        print(line)
    print(f"({time.perf_counter() - started:.0f} s; logs and results.json in {out})")
    (out / "results.json").write_bytes(orjson.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                     "results": [asdict(r) for r in results]},
                                                    option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
