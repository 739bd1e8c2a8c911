"""Unique prompts with nothing to share: the control case where a prefix cache cannot help.

Every prompt is its own deterministic words from the first token on (two prompts share a first
block only if 16 words of a 7225-word vocabulary agree), so the infinite-cache ceiling is 0 and a
router can only win by balancing load. Lengths vary uniformly within `length_spread` of
`prompt_tokens`, as real prompt lengths do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from bench.workloads.base import Api, BenchRequest, PromptFormat, Session, Workload, as_prompt, check_positive
from bench.workloads.words import rng_for, text
from prefixindex.tokenizer import Tokenizer, WordTokenizer


@dataclass(slots=True, frozen=True)
class UniqueSpec:
    requests: int = 256
    prompt_tokens: int = 512  # mean length
    length_spread: float = 0.5  # lengths uniform in prompt_tokens * [1 - spread, 1 + spread]
    output_tokens: int = 64
    api: Api = "completions"
    prompt_format: PromptFormat = "text"
    seed: int = 0


def prompt_lengths(spec: UniqueSpec) -> list[int]:
    """The seeded prompt length of each request (at least one token)."""
    lo = max(1, round(spec.prompt_tokens * (1 - spec.length_spread)))
    hi = max(lo, round(spec.prompt_tokens * (1 + spec.length_spread)))
    return [int(n) for n in rng_for(spec.seed, "unique-lengths").integers(lo, hi + 1, spec.requests)]


def unique_prompts(spec: UniqueSpec, tokenizer: Tokenizer | None = None) -> Workload:
    """`spec.requests` unrelated requests, one session each; tags `u<i>`."""
    check_positive(requests=spec.requests, prompt_tokens=spec.prompt_tokens, output_tokens=spec.output_tokens)
    if not 0 <= spec.length_spread < 1:
        raise ValueError("length_spread must be in [0, 1)")
    if spec.prompt_format == "tokens" and spec.api == "chat":
        raise ValueError("token-id prompts need the completions API")
    tok = tokenizer or WordTokenizer()
    sessions = []
    for i, n in enumerate(prompt_lengths(spec)):
        prompt = text(spec.seed, ("unique", i), n)
        if spec.api == "chat":
            req = BenchRequest(f"u{i}", "chat", spec.output_tokens,
                               messages=({"role": "user", "content": prompt},))
        else:
            req = BenchRequest(f"u{i}", "completions", spec.output_tokens,
                               prompt=as_prompt(prompt, spec.prompt_format, tok))
        sessions.append(Session((req,)))
    return Workload("unique", sessions, asdict(spec))
