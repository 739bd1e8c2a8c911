"""The policy comparison: one simulated fleet, each router in front of it in turn, the same workload.

For every load and router: reset the pods' prefix caches (each router starts cold), start the router,
warm it up with short unique prompts, snapshot the pods' /metrics, run the workload, snapshot again,
stop the router. The fleet runs as `kvgate sim` processes for the whole comparison; `per_pod` gives
pods different options (e.g. a fleet of two pod sizes).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import orjson

from bench.loadgen import podmetrics
from bench.loadgen.procs import ProcessError
from bench.loadgen.routers import RouterProcess, RouterSpec
from bench.loadgen.runner import run_workload
from bench.loadgen.stats import summarize
from bench.report.model import Report, RunRecord
from bench.report.table import ProgressBar, format_table
from bench.workloads.arrivals import Arrival, ClosedLoop, OpenLoop
from bench.workloads.base import BenchRequest, Session, Workload
from bench.workloads.words import text

# A run whose requests start this late (p99) against their schedule was CPU-starved, not measured cleanly.
LAG_WARNING_S = 0.1


def starvation_note(record: RunRecord) -> str | None:
    """A warning when the run's requests started late (p99 > LAG_WARNING_S): CPU-starved figures."""
    o = record.overhead
    lag = o.lag.p99 if o is not None else None
    if o is None or lag is None or lag <= LAG_WARNING_S:
        return None
    return (f"{record.router} @ {record.load}: requests started up to {lag * 1000:.0f} ms late "
            f"(p99) although the load generator used only {o.cpu_ms_per_request:.1f} ms CPU per request: "
            "the machine was short of CPU, so these latencies are inflated")


@dataclass(slots=True)
class HarnessConfig:
    model: str
    pods: int
    pod_options: dict[str, Any]
    routers: list[RouterSpec]
    loads: list[Arrival]
    out_dir: Path
    warmup: int = 8
    seed: int = 0
    request_timeout_s: float = 300.0
    router_start_timeout_s: float = 60.0
    per_pod: list[dict[str, Any]] | None = None  # pod i's options on top of pod_options


def warmup_workload(n: int, seed: int, run: int) -> Workload:
    """`n` short unique prompts (shorter than a block, so they leave nothing in the prefix cache)."""
    reqs = [BenchRequest(f"warmup/{i}", "completions", 2, prompt=text(seed, ("warmup", run, i), 6))
            for i in range(n)]
    return Workload("warmup", [Session((r,)) for r in reqs])


async def reset_prefix_caches(http: aiohttp.ClientSession, urls: Sequence[str],
                              within_s: float = 10.0) -> None:
    """POST /reset_prefix_cache on every pod until each accepts (vLLM refuses while blocks are in use)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    for url in urls:
        while True:
            async with http.post(url + "/reset_prefix_cache") as resp:
                body = await resp.read()
            if resp.status == 200 and _reset_accepted(body):
                break
            if loop.time() > deadline:
                raise ProcessError(f"{url} refused to reset its prefix cache")
            await asyncio.sleep(0.2)


def _reset_accepted(body: bytes) -> bool:
    """vLLM answers 200 with an empty body; the simulator adds `{"success": bool}`."""
    try:
        data = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError:
        return True
    return not isinstance(data, dict) or bool(data.get("success", True))


@dataclass(slots=True)
class Comparison:
    """A running comparison: the fleet's URLs and KV-event endpoints, and what has been collected."""

    cfg: HarnessConfig
    http: aiohttp.ClientSession
    fleet_urls: list[str]
    kv_events: list[str | None]
    stream: TextIO
    kv_events_replay: list[str | None] = field(default_factory=list)
    request_lines: list[bytes] = field(default_factory=list)
    runs: int = 0

    async def run_one(self, spec: RouterSpec, arrival: Arrival, workload: Workload) -> RunRecord:
        """One router at one load; a router that fails to start gives a `failed` record, not an exception."""
        cfg = self.cfg
        self.runs += 1
        rate = arrival.rate if isinstance(arrival, OpenLoop) else None
        record = RunRecord(spec.name, arrival.label(), rate)
        await reset_prefix_caches(self.http, self.fleet_urls)
        router = RouterProcess(spec, self.fleet_urls, cfg.model, cfg.out_dir / "logs", self.kv_events,
                               cfg.seed, kv_events_replay=self.kv_events_replay)
        try:
            url = await router.start(cfg.router_start_timeout_s)
        except (ProcessError, TimeoutError, OSError, ValueError) as exc:
            record.failed = f"router did not start: {exc}"
            self.stream.write(f"{spec.name} @ {arrival.label()}: {record.failed}\n")
            return record
        try:
            if cfg.warmup:
                await run_workload(url, cfg.model, warmup_workload(cfg.warmup, cfg.seed, self.runs),
                                   ClosedLoop(2), request_timeout_s=30.0)
            before = await podmetrics.scrape(self.http, self.fleet_urls)
            bar = ProgressBar(workload.num_requests, f"{spec.name} @ {arrival.label()}", self.stream)
            outcome = await run_workload(url, cfg.model, workload, arrival,
                                         progress=lambda r: bar.update(r.ok),
                                         request_timeout_s=cfg.request_timeout_s)
            bar.close()
            after = await podmetrics.scrape(self.http, self.fleet_urls)
        finally:
            await router.stop()
        record.summary = summarize(outcome.results, outcome.duration_s)
        record.pods = podmetrics.delta(before, after)
        record.overhead = outcome.overhead
        record.ttfts = [r.ttft for r in outcome.results if r.ok and r.ttft is not None]
        prefix = {"router": spec.name, "load": arrival.label()}
        self.request_lines.extend(orjson.dumps({**prefix, **r.to_json()}) + b"\n" for r in outcome.results)
        return record


async def run_comparison(cfg: HarnessConfig, workload: Workload, report: Report,
                         stream: TextIO | None = None) -> list[bytes]:
    """Run every (load, router) pair, appending a RunRecord to `report.runs` after each; returns the
    per-request JSON lines."""
    from bench.sim.fleet import SimFleetProcess

    out = stream or sys.stdout
    options = dict(cfg.pod_options)
    if any(s.needs_kv_events for s in cfg.routers):
        options.setdefault("kv_events_endpoint", "tcp://127.0.0.1:*")  # each pod binds an OS-chosen port
        options.setdefault("kv_events_replay_endpoint", "tcp://127.0.0.1:*")  # gaps recover by replay
    out.write(f"starting {cfg.pods} simulated pods ...\n")
    out.flush()
    async with (
        SimFleetProcess(cfg.pods, model=cfg.model, per_pod=cfg.per_pod, **options) as fleet,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
    ):
        infos = fleet.ready_infos()
        kv_events = [info.get("kv_events") for info in infos]
        kv_replay = [info.get("kv_events_replay") for info in infos]
        comparison = Comparison(cfg, http, fleet.urls, kv_events, out, kv_replay)
        for arrival in cfg.loads:
            for spec in cfg.routers:
                record = await comparison.run_one(spec, arrival, workload)
                report.runs.append(record)
                if record.failed:
                    report.notes.append(f"{record.router} @ {record.load}: {record.failed}")
                elif (note := starvation_note(record)) is not None:
                    report.notes.append(note)
                out.write(format_table([record]).splitlines()[-1] + "\n")
                out.flush()
    return comparison.request_lines
