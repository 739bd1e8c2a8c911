"""Heatmap PNG of a matrix: rows routers, columns cells, each square a router's TTFT p90 relative to the
best router in that cell (1.00 = the best; log colour scale, so 2x worse and 2x better look alike in
distance). A router that did not run in a cell, or failed there, is a grey square marked "-".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LogNorm


def relative_to_best(values: Mapping[str, float | None]) -> dict[str, float | None]:
    """Each value divided by the smallest positive one (None stays None; all None: all None)."""
    present = [v for v in values.values() if v is not None and v > 0]
    best = min(present) if present else None
    return {k: (v / best if v is not None and v > 0 and best else None) for k, v in values.items()}


def plot_relative_heatmap(routers: Sequence[str], cells: Sequence[str],
                          ratios: Mapping[tuple[str, str], float | None], path: Path,
                          title: str = "TTFT p90 relative to the best router in each cell") -> Path:
    """Write the heatmap of `ratios[(router, cell)]` (>= 1) to `path`; returns `path`."""
    if not routers or not cells:
        raise ValueError("a heatmap needs at least one router and one cell")
    grid = np.full((len(routers), len(cells)), np.nan)
    for i, router in enumerate(routers):
        for j, cell in enumerate(cells):
            v = ratios.get((router, cell))
            if v is not None and v > 0:
                grid[i, j] = v
    finite = grid[np.isfinite(grid)]
    top = max(2.0, float(finite.max())) if finite.size else 2.0
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + 0.62 * len(cells)), 1.6 + 0.45 * len(routers)))
    cmap = plt.get_cmap("RdYlGn_r").with_extremes(bad="#d9d9d9")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=LogNorm(vmin=1.0, vmax=top), aspect="auto")
    for i in range(len(routers)):
        for j in range(len(cells)):
            v = grid[i, j]
            label = "-" if math.isnan(v) else f"{v:.2f}" if v < 10 else f"{v:.0f}"
            ax.text(j, i, label, ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(cells)), labels=list(cells), rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(routers)), labels=list(routers), fontsize=8)
    ax.set_title(title, fontsize=9)
    bar = fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01, label="p90 / best p90")
    ticks = [t for t in (1, 1.5, 2, 3, 5, 10, 20, 50, 100, 200, 500) if t <= top]
    bar.set_ticks(ticks, labels=[f"{t:g}x" for t in ticks])
    bar.minorticks_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
