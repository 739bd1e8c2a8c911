"""The report folder: `results.json` (every figure), `summary.md`, per-request `requests.jsonl`, plots."""

from __future__ import annotations

from pathlib import Path

import orjson

from bench.report.model import Report
from bench.report.plots import write_plots
from bench.report.table import format_table


def markdown_summary(report: Report, plots: list[Path]) -> str:
    """A human summary: the table, ratios to round_robin, the ceiling, loadgen overhead, notes."""
    lines = ["# kvgate bench", ""]
    cfg = report.config
    lines.append(f"Fleet: {cfg.get('pods')} simulated pods, model `{cfg.get('model')}`; "
                 f"workload `{report.workload.get('name')}`; command: `{cfg.get('command', '')}`.")
    lines += ["", format_table(report.runs, markdown=True), ""]
    if report.ceiling:
        c = report.ceiling
        lines.append(f"Ceiling (one infinite cache, same requests, {c.block_size}-token blocks): "
                     f"{c.hit_rate * 100:.1f}% of prompt tokens.")
        lines.append("")
    ratios = report.ratios()
    if ratios:
        lines += ["Ratios to round_robin at the same load (TTFT: lower is better; throughput: higher):", "",
                  "| router @ load | TTFT p50 | TTFT p90 | output tok/s |", "|---|---|---|---|"]
        for key, r in ratios.items():
            lines.append(f"| {key} | {_x(r['ttft_p50'])} | {_x(r['ttft_p90'])} | {_x(r['output_tps'])} |")
        lines.append("")
    overheads = [r.overhead for r in report.runs if r.overhead]
    if overheads:
        worst_cpu = max(o.cpu_ms_per_request for o in overheads)
        worst_lag = max(o.lag.p99 or 0.0 for o in overheads)
        worst_share = max(o.cpu_share for o in overheads)
        lines.append(f"Load generator overhead (worst run): {worst_cpu:.2f} ms CPU per request, "
                     f"{worst_share * 100:.0f}% of one core, arrival lag p99 {worst_lag * 1000:.1f} ms.")
        lines.append("")
    for note in report.notes:
        lines.append(f"- {note}")
    if report.notes:
        lines.append("")
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def _x(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}x" if v >= 0.1 else f"{v:.3g}x"  # 0.0042x, not 0.00x


def write_report(report: Report, out_dir: Path, request_lines: list[bytes] | None = None) -> list[Path]:
    """Write the report folder (created if needed); returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "results.json"
    results.write_bytes(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2))
    files = [results]
    if request_lines is not None:
        path = out_dir / "requests.jsonl"
        path.write_bytes(b"".join(request_lines))
        files.append(path)
    plots = write_plots(report, out_dir)
    summary = out_dir / "summary.md"
    summary.write_text(markdown_summary(report, plots))
    return [*files, summary, *plots]
