"""Cheap parsing of the few lines of vLLM's Prometheus exposition the router needs.

Only four metric families are read; the rest of the (tens of KB) page is skipped by `str.find`
instead of being split into lines. Values of a family are summed over its series (several engines,
e.g. data-parallel ranks, behind one URL).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_USAGE = "vllm:kv_cache_usage_perc"
CACHE_CONFIG = "vllm:cache_config_info"

_LABEL_INT = {name: re.compile(r"[{,]" + name + r'="(\d+)"') for name in ("block_size", "num_gpu_blocks")}


@dataclass(slots=True)
class PodLoad:
    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0
    block_size: int | None = None
    num_gpu_blocks: int | None = None


def _series(text: str, name: str) -> list[str]:
    """The sample lines of metric `name` (not its # HELP/# TYPE lines); `text` starts with a newline."""
    out = []
    needle = "\n" + name
    n = len(name)
    pos = text.find(needle)
    while pos >= 0:
        start = pos + 1
        end = text.find("\n", start)
        if end < 0:
            end = len(text)
        line = text[start:end]
        if line[n : n + 1] in ("{", " "):
            out.append(line)
        pos = text.find(needle, end)
    return out


def _value(line: str) -> float:
    # Sample lines end in the value (vLLM writes no timestamps); labels may contain spaces, values do not.
    return float(line.rsplit(" ", 1)[1])


def parse_pod_load(text: str) -> PodLoad:
    """Extract the load signals from a /metrics page; missing families stay at their defaults."""
    load = PodLoad()
    text = "\n" + text
    load.waiting = int(sum(_value(line) for line in _series(text, WAITING)))
    load.running = int(sum(_value(line) for line in _series(text, RUNNING)))
    usage = [_value(line) for line in _series(text, KV_USAGE)]
    load.kv_usage = max(usage) if usage else 0.0
    config = _series(text, CACHE_CONFIG)
    if config:  # an info metric: its first series carries the labels
        for label, pattern in _LABEL_INT.items():
            m = pattern.search(config[0])
            if m:
                setattr(load, label, int(m.group(1)))
    return load
