"""The robustness matrix's results: per-cell figures (median over repeats), the verdict, and the files.

A *cell* is one workload on one fleet at one load; every router runs it. The verdict checks the
candidate policy (`cache_aware`, both indexes) against issue 11's bar, per cell:

- `p90_vs_load_balancers`: TTFT p90 <= 1.05 x min(round_robin, least_request);
- `p90_vs_sglang`: <= 0.8 x the SGLang router's, where prompts share (ceiling >= 5%) and it ran;
- `p90_vs_round_robin_saturated`: <= round robin's / 20, where the offered load exceeds round robin's
  capacity (open loop above 100%);
- `hit_vs_ceiling`: pod hit rate >= 0.95 x the infinite-cache ceiling, where the fleet's KV holds the
  whole working set and prompts share.

A check whose ratio lies within `noise` (relative) of its limit is *noisy*: `--rerun-noisy` runs that
cell twice more and every figure becomes the median of the three runs.

Files: `matrix.md` (one table per cell, the verdict, the heatmap), `matrix.json` (every figure and
check), `verdict.json` (the checks only, for a script to read), `heatmap.png`.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench.report.heatmap import plot_relative_heatmap, relative_to_best
from bench.report.model import RunRecord

SHARE_MIN = 0.05  # a workload "shares" when an infinite cache would hit at least this fraction
NOISE = 0.10
CANDIDATE = "cache_aware"
LOAD_BALANCERS = ("round_robin", "least_request")
SGLANG = "sglang_router"
ROUND_ROBIN = "round_robin"


@dataclass(slots=True, frozen=True)
class CellInfo:
    """What a cell is: workload, fleet and load, and how the fleet was sized to the workload."""

    cell_id: str  # workload/fleet/load
    workload: str
    fleet: str
    load: str  # "50%", "90%", "130%" (of round robin's capacity) or "closed"
    load_factor: float | None  # offered request rate / round robin's capacity; None: closed loop
    offered_rps: float | None
    users: int | None  # closed loop
    rr_capacity_rps: float
    requests: int
    pod_kv_tokens: tuple[int, ...]
    prefill_tps: tuple[float, ...]
    working_set_tokens: int  # distinct prompt tokens: what one infinite cache would end up holding
    largest_request_tokens: int  # prompt + output of the longest request
    ceiling_hit_rate: float

    @property
    def pods(self) -> int:
        return len(self.pod_kv_tokens)

    @property
    def fleet_kv_tokens(self) -> int:
        return sum(self.pod_kv_tokens)

    @property
    def kv_fraction(self) -> float:
        """Fraction of the working set the fleet's KV holds (can exceed 1)."""
        return self.fleet_kv_tokens / self.working_set_tokens if self.working_set_tokens else float("inf")

    @property
    def fits(self) -> bool:
        return self.fleet_kv_tokens >= self.working_set_tokens

    @property
    def shares(self) -> bool:
        return self.ceiling_hit_rate >= SHARE_MIN

    @property
    def saturates_round_robin(self) -> bool:
        return self.load_factor is not None and self.load_factor > 1.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "pods": self.pods, "fleet_kv_tokens": self.fleet_kv_tokens,
                "kv_fraction_of_working_set": self.kv_fraction, "working_set_fits": self.fits,
                "prompts_share": self.shares, "saturates_round_robin": self.saturates_round_robin}


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


@dataclass(slots=True, frozen=True)
class RouterFigures:
    """One router in one cell: each figure the median over its runs that produced results."""

    router: str
    runs: int
    requests_ok: int
    errors: int
    ttft_p50: float | None
    ttft_p90: float | None
    ttft_p99: float | None
    output_tps: float | None
    request_rate: float | None
    hit_rate: float | None
    failed: str | None = None

    @classmethod
    def of(cls, router: str, records: Sequence[RunRecord]) -> RouterFigures:
        done = [r for r in records if r.summary is not None]
        s = [r.summary for r in done if r.summary is not None]
        failed = next((r.failed for r in records if r.failed), None) if not done else None
        return cls(
            router, len(done), sum(x.ok for x in s), sum(x.errors for x in s),
            _median(x.ttft.p50 for x in s), _median(x.ttft.p90 for x in s), _median(x.ttft.p99 for x in s),
            _median(x.output_tps for x in s), _median(x.request_rate for x in s),
            _median(r.pods.hit_rate if r.pods else None for r in done), failed,
        )


@dataclass(slots=True)
class CellResult:
    """A cell and every run of it, per router in run order (the first run, then any re-runs)."""

    info: CellInfo
    attempts: dict[str, list[RunRecord]] = field(default_factory=dict)

    def add(self, record: RunRecord) -> None:
        self.attempts.setdefault(record.router, []).append(record)

    def figures(self) -> dict[str, RouterFigures]:
        return {router: RouterFigures.of(router, runs) for router, runs in self.attempts.items()}

    def relative_p90(self) -> dict[str, float | None]:
        return relative_to_best({r: f.ttft_p90 for r, f in self.figures().items()})


@dataclass(slots=True, frozen=True)
class Check:
    """One verdict check of one candidate router in one cell; `passed` None: it did not apply."""

    cell_id: str
    router: str
    name: str
    value: float | None
    limit: float
    at_most: bool  # pass when value <= limit (else value >= limit)
    passed: bool | None
    noisy: bool
    detail: str

    @property
    def status(self) -> str:
        return "skip" if self.passed is None else "pass" if self.passed else "fail"

    def to_json(self) -> dict[str, Any]:
        return {"cell": self.cell_id, "router": self.router, "check": self.name, "value": self.value,
                "limit": self.limit, "at_most": self.at_most, "status": self.status, "noisy": self.noisy,
                "detail": self.detail}


def _check(cell: CellInfo, router: str, name: str, value: float | None, limit: float, at_most: bool,
           noise: float, detail: str) -> Check:
    if value is None:
        return Check(cell.cell_id, router, name, None, limit, at_most, None, False, detail)
    passed = value <= limit if at_most else value >= limit
    noisy = abs(value / limit - 1.0) <= noise
    return Check(cell.cell_id, router, name, value, limit, at_most, passed, noisy, detail)


def _skip(cell: CellInfo, router: str, name: str, limit: float, at_most: bool, why: str) -> Check:
    return Check(cell.cell_id, router, name, None, limit, at_most, None, False, why)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def cell_checks(cell: CellResult, candidate: str = CANDIDATE, noise: float = NOISE) -> list[Check]:
    """The verdict checks of every router whose policy is `candidate` (e.g. cache_aware/approximate)."""
    info = cell.info
    figs = cell.figures()
    checks: list[Check] = []
    for router, fig in figs.items():
        if router.partition("/")[0] != candidate:
            continue
        p90 = fig.ttft_p90
        balancers = {b: figs[b].ttft_p90 for b in LOAD_BALANCERS if b in figs and figs[b].ttft_p90}
        if p90 is None or not balancers:
            checks.append(_skip(info, router, "p90_vs_load_balancers", 1.05, True,
                                "no p90 for the candidate or for round_robin/least_request"))
        else:
            best, best_p90 = min(balancers.items(), key=lambda kv: kv[1] or 0.0)
            checks.append(_check(info, router, "p90_vs_load_balancers", _ratio(p90, best_p90), 1.05, True,
                                 noise, f"p90 {p90 * 1000:.0f} ms vs {best} {best_p90 * 1000:.0f} ms"))
        sg = figs.get(SGLANG)
        if not info.shares:
            checks.append(_skip(info, router, "p90_vs_sglang", 0.8, True, "prompts share nothing"))
        elif sg is None or sg.ttft_p90 is None or p90 is None:
            checks.append(_skip(info, router, "p90_vs_sglang", 0.8, True, "the SGLang router did not run"))
        else:
            checks.append(_check(info, router, "p90_vs_sglang", _ratio(p90, sg.ttft_p90), 0.8, True, noise,
                                 f"p90 {p90 * 1000:.0f} ms vs sglang_router {sg.ttft_p90 * 1000:.0f} ms"))
        rr = figs.get(ROUND_ROBIN)
        if not info.saturates_round_robin:
            checks.append(_skip(info, router, "p90_vs_round_robin_saturated", 0.05, True,
                                "the load does not exceed round robin's capacity"))
        elif rr is None or rr.ttft_p90 is None or p90 is None:
            checks.append(_skip(info, router, "p90_vs_round_robin_saturated", 0.05, True,
                                "no p90 for round_robin or the candidate"))
        else:
            kept_up = _ratio(rr.request_rate, info.offered_rps)
            detail = (f"p90 {p90 * 1000:.0f} ms vs round_robin {rr.ttft_p90 * 1000:.0f} ms; round robin "
                      f"completed {kept_up or 0:.0%} of the offered rate")
            checks.append(_check(info, router, "p90_vs_round_robin_saturated", _ratio(p90, rr.ttft_p90), 0.05,
                                 True, noise, detail))
        if not (info.fits and info.shares):
            why = "the working set does not fit the fleet's KV" if not info.fits else "prompts share nothing"
            checks.append(_skip(info, router, "hit_vs_ceiling", 0.95, False, why))
        elif fig.hit_rate is None:
            checks.append(_skip(info, router, "hit_vs_ceiling", 0.95, False, "no hit rate from the pods"))
        else:
            detail = f"hit {fig.hit_rate:.1%} vs ceiling {info.ceiling_hit_rate:.1%}"
            checks.append(_check(info, router, "hit_vs_ceiling", fig.hit_rate / info.ceiling_hit_rate, 0.95,
                                 False, noise, detail))
    return checks


def cell_passed(checks: Sequence[Check]) -> bool | None:
    """All applicable checks passed (None when none applied)."""
    applied = [c.passed for c in checks if c.passed is not None]
    return all(applied) if applied else None


# -- files ------------------------------------------------------------------------------------------

def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f} ms" if v < 10 else f"{v:.1f} s"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x" if v >= 0.1 else f"{v:.3g}x"


def describe(info: CellInfo) -> str:
    """One line: load, fleet sizing, ceiling."""
    if info.load_factor is None:
        load = f"closed loop of {info.users} users"
    else:
        load = f"open loop {info.offered_rps:.1f} req/s ({info.load_factor:.0%} of round robin's capacity)"
    kv = sorted(set(info.pod_kv_tokens))
    tps = sorted(set(info.prefill_tps))
    return (f"{info.requests} requests, {load}; round robin capacity {info.rr_capacity_rps:.1f} req/s. "
            f"{info.pods} pods, KV {'/'.join(f'{k:,}' for k in kv)} tokens, prefill "
            f"{'/'.join(f'{t:,.0f}' for t in tps)} tokens/s; fleet KV {info.fleet_kv_tokens:,} tokens = "
            f"{info.kv_fraction:.0%} of the working set ({info.working_set_tokens:,} tokens); largest "
            f"request {info.largest_request_tokens:,} tokens; infinite-cache ceiling "
            f"{info.ceiling_hit_rate:.1%}.")


def cell_table(cell: CellResult) -> str:
    """The cell's Markdown table: one row per router."""
    rel = cell.relative_p90()
    ceiling = cell.info.ceiling_hit_rate
    lines = ["| router | runs | ok/err | TTFT p50 | p90 | p99 | out tok/s | pod hit | hit/ceiling "
             "| p90/best |", "|---|---|---|---|---|---|---|---|---|---|"]
    for router, f in cell.figures().items():
        if f.runs == 0:
            lines.append(f"| {router} | 0 | failed: {f.failed or '?'} | - | - | - | - | - | - | - |")
            continue
        hit_rel = f.hit_rate / ceiling if f.hit_rate is not None and ceiling else None
        lines.append(f"| {router} | {f.runs} | {f.requests_ok}/{f.errors} | {_ms(f.ttft_p50)} | "
                     f"{_ms(f.ttft_p90)} | {_ms(f.ttft_p99)} | {f.output_tps or 0:.0f} | "
                     f"{_pct(f.hit_rate)} | {_x(hit_rel)} | {_x(rel.get(router))} |")
    return "\n".join(lines)


def verdict_json(cells: Sequence[CellResult], candidate: str = CANDIDATE,
                 noise: float = NOISE) -> dict[str, Any]:
    """{"pass": every applicable check passed (None: none applied), "cells": {id: {"pass", "noisy",
    "checks"}}, "failed": [the failed checks]}"""
    out: dict[str, Any] = {}
    failed: list[dict[str, Any]] = []
    for cell in cells:
        checks = cell_checks(cell, candidate, noise)
        out[cell.info.cell_id] = {"pass": cell_passed(checks), "noisy": any(c.noisy for c in checks),
                                  "runs_per_router": max((len(v) for v in cell.attempts.values()), default=0),
                                  "checks": [c.to_json() for c in checks]}
        failed += [c.to_json() for c in checks if c.passed is False]
    overall = [v["pass"] for v in out.values() if v["pass"] is not None]
    return {"candidate": candidate, "noise": noise, "pass": all(overall) if overall else None, "cells": out,
            "failed": failed}


def matrix_markdown(cells: Sequence[CellResult], verdict: dict[str, Any], config: dict[str, Any],
                    heatmap: Path | None, notes: Sequence[str] = ()) -> str:
    lines = ["# kvgate bench --matrix " + str(config.get("scale", "")), ""]
    lines.append(f"Routers: {', '.join(config.get('routers', []))}. Command: `{config.get('command', '')}`; "
                 f"wall {config.get('wall_s', '?')} s (estimated {config.get('estimate_s', '?')} s).")
    status = {True: "PASS", False: "FAIL", None: "no check applied"}[verdict["pass"]]
    lines += ["", f"**Verdict for `{verdict['candidate']}`: {status}** "
              f"({len(verdict['failed'])} failed checks; noise band {verdict['noise']:.0%}).", ""]
    if verdict["failed"]:
        lines += ["| cell | router | check | value | limit | noisy | detail |",
                  "|---|---|---|---|---|---|---|"]
        for c in verdict["failed"]:
            lines.append(f"| {c['cell']} | {c['router']} | {c['check']} | {_x(c['value'])} | "
                         f"{'<=' if c['at_most'] else '>='} {c['limit']:g} | {'yes' if c['noisy'] else ''} | "
                         f"{c['detail']} |")
        lines.append("")
    if heatmap is not None:
        lines += [f"![TTFT p90 relative to the best router per cell]({heatmap.name})", ""]
    for cell in cells:
        v = verdict["cells"][cell.info.cell_id]
        status = {True: "pass", False: "FAIL", None: "no check applies"}[v["pass"]]
        lines += [f"## {cell.info.cell_id} ({status})", "", describe(cell.info), "", cell_table(cell), ""]
        applied = [c for c in v["checks"] if c["status"] != "skip"]
        for c in applied:
            noisy = " (within noise)" if c["noisy"] else ""
            limit = f"{'<=' if c['at_most'] else '>='} {c['limit']:g}"
            lines.append(f"- {c['router']} {c['check']}: {_x(c['value'])} ({limit}) {c['status']}{noisy}: "
                         f"{c['detail']}")
        if applied:
            lines.append("")
    for note in notes:
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def write_matrix(cells: Sequence[CellResult], out_dir: Path, config: dict[str, Any],
                 candidate: str = CANDIDATE, noise: float = NOISE, notes: Sequence[str] = ()) -> list[Path]:
    """Write matrix.md, matrix.json, verdict.json and heatmap.png to `out_dir`; returns the files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    verdict = verdict_json(cells, candidate, noise)
    routers = list(dict.fromkeys(r for c in cells for r in c.attempts))
    ids = [c.info.cell_id for c in cells]
    ratios = {(r, c.info.cell_id): v for c in cells for r, v in c.relative_p90().items()}
    heatmap = None
    if routers and ids:
        heatmap = plot_relative_heatmap(routers, ids, ratios, out_dir / "heatmap.png")
    data = {"config": config, "notes": list(notes), "verdict": verdict,
            "cells": [{"info": c.info.to_json(),
                       "figures": [asdict(f) for f in c.figures().values()],
                       "p90_relative_to_best": c.relative_p90(),
                       "runs": {r: [x.to_json() for x in runs] for r, runs in c.attempts.items()}}
                      for c in cells]}
    files = []
    for name, payload in (("matrix.json", data), ("verdict.json", verdict)):
        path = out_dir / name
        path.write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
        files.append(path)
    md = out_dir / "matrix.md"
    md.write_text(matrix_markdown(cells, verdict, config, heatmap, notes))
    files.append(md)
    if heatmap is not None:
        files.append(heatmap)
    return files
