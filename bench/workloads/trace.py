"""Mooncake-format trace replay: prompts built from `hash_ids`, arrivals from `timestamp`.

One JSON object a line (plain or gzip-compressed, by a `.gz` suffix): `timestamp` (ms), `input_length`,
`output_length`, `hash_ids` (chained ids of 512-token blocks; equal ids give equal content). Each id
becomes `block_tokens` deterministic words (512 reproduces the trace; smaller scales every prompt down to
fit a simulated fleet, lengths scaled by block_tokens/512); the last block is cut so the prompt has
`input_length` (scaled) tokens. The default file is the public Mooncake conversation trace shipped in
bench/traces (its README gives source and license).
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from bench.workloads.base import Api, BenchRequest, PromptFormat, Session, Workload, as_prompt, check_positive
from bench.workloads.words import words
from prefixindex.tokenizer import Tokenizer, WordTokenizer

TRACE_BLOCK_TOKENS = 512
# Package data of `bench` (pyproject's package-data), so an installed kvgate has it too.
DEFAULT_TRACE = str(Path(__file__).resolve().parents[1] / "traces" / "mooncake_conversation_trace.jsonl.gz")


@dataclass(slots=True, frozen=True)
class TraceSpec:
    path: str = DEFAULT_TRACE
    first: int | None = None  # keep only the first N requests (after the window)
    start_s: float = 0.0  # time window [start_s, end_s) in trace seconds
    end_s: float | None = None
    block_tokens: int = TRACE_BLOCK_TOKENS
    output_scale: float | None = None  # None: same factor as the prompts (block_tokens / 512)
    max_output_tokens: int | None = None
    api: Api = "completions"
    prompt_format: PromptFormat = "text"
    seed: int = 0


@dataclass(slots=True, frozen=True)
class TraceRecord:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def read_trace(path: str | Path, start_s: float = 0.0, end_s: float | None = None,
               first: int | None = None) -> list[TraceRecord]:
    """Records with `start_s <= timestamp < end_s`, at most `first` of them, in file order."""
    out: list[TraceRecord] = []
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if first is not None and len(out) >= first:
                break
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
                rec = TraceRecord(float(obj["timestamp"]), int(obj["input_length"]),
                                  int(obj["output_length"]), tuple(int(h) for h in obj["hash_ids"]))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{lineno}: not a Mooncake trace record ({exc})") from exc
            t = rec.timestamp_ms / 1000.0
            if t < start_s or (end_s is not None and t >= end_s):
                continue
            out.append(rec)
    return out


def trace(spec: TraceSpec, tokenizer: Tokenizer | None = None) -> Workload:
    """One session per record; `Session.at` is its offset from the first kept record, in seconds."""
    records = read_trace(spec.path, spec.start_s, spec.end_s, spec.first)
    if not records:
        raise ValueError(f"no trace records in {spec.path} for the window/limit given")
    return trace_workload(records, spec, tokenizer)


def trace_workload(records: Sequence[TraceRecord], spec: TraceSpec,
                   tokenizer: Tokenizer | None = None) -> Workload:
    """`records` (e.g. a sample of a trace) as `trace` replays them; `spec`'s path and window are unused."""
    check_positive(block_tokens=spec.block_tokens)
    if spec.prompt_format == "tokens" and spec.api == "chat":
        raise ValueError("token-id prompts need the completions API")
    if not records:
        raise ValueError("no trace records")
    tok = tokenizer or WordTokenizer()
    factor = spec.block_tokens / TRACE_BLOCK_TOKENS
    out_factor = factor if spec.output_scale is None else spec.output_scale
    blocks: dict[int, list[str]] = {}
    t0 = records[0].timestamp_ms
    sessions = []
    for i, rec in enumerate(records):
        length = max(1, math.ceil(rec.input_length * factor))
        parts: list[str] = []
        for h in rec.hash_ids:
            if len(parts) >= length:
                break
            block = blocks.get(h)
            if block is None:
                block = blocks[h] = words(spec.seed, ("trace-block", h), spec.block_tokens)
            parts.extend(block)
        prompt = " ".join(parts[:length])
        out_tokens = max(1, round(rec.output_length * out_factor))
        if spec.max_output_tokens is not None:
            out_tokens = min(out_tokens, spec.max_output_tokens)
        tag = f"trace/{i}"
        if spec.api == "chat":
            req = BenchRequest(tag, "chat", out_tokens, messages=({"role": "user", "content": prompt},))
        else:
            prompt_field = as_prompt(prompt, spec.prompt_format, tok)
            req = BenchRequest(tag, "completions", out_tokens, prompt=prompt_field)
        sessions.append(Session((req,), at=(rec.timestamp_ms - t0) / 1000.0))
    return Workload("trace", sessions, {**asdict(spec), "records": len(records)})
