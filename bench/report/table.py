"""Plain-text output for a terminal or a log: the comparison table and a progress bar.

Both work without a TTY: the bar redraws in place on a terminal and prints a line per 10% otherwise.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TextIO

from bench.report.model import RunRecord

COLUMNS = ("router", "load", "ok/err", "TTFT p50", "p90", "p99", "ITL p50", "out tok/s", "req/s",
           "pod hit", "queue avg")


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f} ms" if v < 10 else f"{v:.1f} s"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


def row(run: RunRecord) -> list[str]:
    s, p = run.summary, run.pods
    if s is None:
        return [run.router, run.load, "failed"] + ["-"] * (len(COLUMNS) - 3)
    return [
        run.router, run.load, f"{s.ok}/{s.errors}", _ms(s.ttft.p50), _ms(s.ttft.p90), _ms(s.ttft.p99),
        _ms(s.itl.p50), f"{s.output_tps:.0f}", f"{s.request_rate:.1f}",
        _pct(p.hit_rate if p else None), _ms(p.queue_mean_s if p else None),
    ]


def format_table(runs: Sequence[RunRecord], markdown: bool = False) -> str:
    """The runs as an aligned text table, or a Markdown table."""
    rows = [list(COLUMNS)] + [row(r) for r in runs]
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    fmt = [
        " ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    return "\n".join([fmt[0], "-" * len(fmt[0]), *fmt[1:]])


class ProgressBar:
    """`[#####.....] 50/100 label` on one line on a TTY; one line per 10% step elsewhere."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None, width: int = 30) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream or sys.stdout
        self.width = width
        self.done = self.errors = 0
        self._tty = self.stream.isatty()
        self._last_step = 0
        self._last_draw = 0.0

    def update(self, ok: bool) -> None:
        self.done += 1
        self.errors += 0 if ok else 1
        if self._tty:
            now = time.monotonic()
            if now - self._last_draw >= 0.1 or self.done >= self.total:
                self._last_draw = now
                self.stream.write("\r" + self.render())
                self.stream.flush()
        else:
            step = self.done * 10 // self.total
            if step > self._last_step:
                self._last_step = step
                self.stream.write(self.render() + "\n")
                self.stream.flush()

    def render(self) -> str:
        filled = self.width * min(self.done, self.total) // self.total
        errors = f" ({self.errors} errors)" if self.errors else ""
        return f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {self.label}{errors}"

    def close(self) -> None:
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()
