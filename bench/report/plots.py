"""PNG plots of a comparison (matplotlib, Agg backend: no display needed).

- `ttft_distribution.png`: empirical CDF of TTFT per router, one panel per load.
- `rate_sweep.png` (two or more loads): TTFT p90 and output throughput against request rate.
- `hit_rate.png`: prefix hit rate measured at the pods per router, with the infinite-cache ceiling.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from bench.report.model import Report, RunRecord


def _loads(runs: Sequence[RunRecord]) -> list[str]:
    return list(dict.fromkeys(r.load for r in runs))


def _routers(runs: Sequence[RunRecord]) -> list[str]:
    return list(dict.fromkeys(r.router for r in runs))


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ttft_distribution(report: Report, path: Path) -> Path | None:
    runs = [r for r in report.runs if r.ttfts]
    if not runs:
        return None
    loads = _loads(runs)
    fig, axes = plt.subplots(1, len(loads), figsize=(5.5 * len(loads), 4), squeeze=False)
    for ax, load in zip(axes[0], loads, strict=True):
        for run in (r for r in runs if r.load == load):
            x = np.sort(np.asarray(run.ttfts)) * 1000
            ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post", label=run.router)
        ax.set_xscale("log")
        ax.set_xlabel("TTFT (ms, log)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"TTFT distribution @ {load}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_rate_sweep(report: Report, path: Path) -> Path | None:
    runs = [r for r in report.runs if r.summary and r.rate is not None]
    if len({r.rate for r in runs}) < 2:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for router in _routers(runs):
        pts = sorted((r.rate, r.summary) for r in runs if r.router == router)  # type: ignore[misc]
        rates = [p[0] for p in pts]
        ax1.plot(rates, [(s.ttft.p90 or np.nan) * 1000 for _, s in pts], marker="o", label=router)
        ax2.plot(rates, [s.output_tps for _, s in pts], marker="o", label=router)
    ax1.set_yscale("log")
    ax1.set_ylabel("TTFT p90 (ms, log)")
    ax2.set_ylabel("output tokens/s")
    for ax in (ax1, ax2):
        ax.set_xlabel("request rate (req/s)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_hit_rate(report: Report, path: Path) -> Path | None:
    runs = [r for r in report.runs if r.pods and r.pods.hit_rate is not None]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.45 * len(runs)))
    labels = [f"{r.router} @ {r.load}" for r in runs]
    ax.barh(labels, [100 * (r.pods.hit_rate or 0) for r in runs])  # type: ignore[union-attr]
    ax.invert_yaxis()  # first run on top, as in the table
    if report.ceiling:
        ax.axvline(100 * report.ceiling.hit_rate, color="k", linestyle="--", label="infinite-cache ceiling")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel("prefix hit rate at the pods (% of prompt tokens)")
    ax.set_xlim(0, 100)
    ax.tick_params(axis="y", labelsize=8)
    return _save(fig, path)


def write_plots(report: Report, out_dir: Path) -> list[Path]:
    """Write every plot that the report has data for; returns the files written."""
    made = [
        plot_ttft_distribution(report, out_dir / "ttft_distribution.png"),
        plot_rate_sweep(report, out_dir / "rate_sweep.png"),
        plot_hit_rate(report, out_dir / "hit_rate.png"),
    ]
    return [p for p in made if p is not None]
