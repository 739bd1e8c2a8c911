"""Skewed prefix popularity: many shared prefixes, Zipf-distributed, the most popular carrying `top_share`.

Prefix k (k = 1..n, most popular first) gets a share of the traffic proportional to k^-s, with the
exponent s solved so that prefix 1 carries `top_share` (e.g. 40%): a pure Zipf law, one hot prefix and
a long tail of rare ones. Request counts per prefix are the shares apportioned exactly (largest
remainder), so the hot prefix's count does not depend on sampling noise; each request is its prefix
followed by its own question, and the order is a seeded shuffle. A hot prefix is what a cache-aware
router must spread (one pod cannot serve 40% of the traffic), the tail what it must keep in place.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from bench.workloads.base import Api, BenchRequest, PromptFormat, Session, Workload, as_prompt, check_positive
from bench.workloads.words import rng_for, text
from prefixindex.tokenizer import Tokenizer, WordTokenizer


@dataclass(slots=True, frozen=True)
class ZipfPrefixSpec:
    prefixes: int = 64
    requests: int = 512
    top_share: float = 0.4  # fraction of the requests that use the most popular prefix
    prefix_tokens: int = 512
    question_tokens: int = 64
    output_tokens: int = 64
    api: Api = "completions"
    prompt_format: PromptFormat = "text"
    seed: int = 0


def zipf_exponent(n: int, top_share: float) -> float:
    """The s >= 0 with 1 / sum_{k=1..n} k^-s == top_share (the most popular of n carries top_share)."""
    if n < 1:
        raise ValueError("n must be >= 1")
    if n == 1:
        if top_share != 1.0:
            raise ValueError("one prefix carries all the traffic: top_share must be 1")
        return 0.0
    if not 1.0 / n <= top_share < 1.0:
        raise ValueError(f"top_share must be in [1/{n}, 1) for {n} prefixes, got {top_share}")
    lo, hi = 0.0, 64.0  # top share is increasing in s: 1/n at s=0, ~1 at s=64
    for _ in range(100):
        mid = (lo + hi) / 2
        share = 1.0 / sum(k ** -mid for k in range(1, n + 1))
        lo, hi = (mid, hi) if share < top_share else (lo, mid)
    return (lo + hi) / 2


def zipf_shares(n: int, top_share: float) -> list[float]:
    """Traffic share of each of n prefixes, most popular first, summing to 1."""
    s = zipf_exponent(n, top_share)
    weights = [k ** -s for k in range(1, n + 1)]
    total = sum(weights)
    return [w / total for w in weights]


def apportion(total: int, shares: list[float]) -> list[int]:
    """Integer counts summing to `total`, each the floor of its exact share plus one for the largest
    remainders (ties to the earlier, more popular entry)."""
    exact = [total * s for s in shares]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def zipf_prefix(spec: ZipfPrefixSpec, tokenizer: Tokenizer | None = None) -> Workload:
    """`spec.requests` requests, one session each; tags `z<k>/q<j>` (k = popularity rank from 0)."""
    check_positive(prefixes=spec.prefixes, requests=spec.requests, prefix_tokens=spec.prefix_tokens,
                   output_tokens=spec.output_tokens)
    if spec.question_tokens < 0:
        raise ValueError("question_tokens must be >= 0")
    if spec.prompt_format == "tokens" and spec.api == "chat":
        raise ValueError("token-id prompts need the completions API")
    tok = tokenizer or WordTokenizer()
    counts = apportion(spec.requests, zipf_shares(spec.prefixes, spec.top_share))
    requests: list[BenchRequest] = []
    for k, count in enumerate(counts):
        prefix = text(spec.seed, ("zipf-prefix", k), spec.prefix_tokens)
        for j in range(count):
            question = text(spec.seed, ("zipf-question", k, j), spec.question_tokens)
            tag = f"z{k}/q{j}"
            if spec.api == "chat":
                messages = ({"role": "system", "content": prefix}, {"role": "user", "content": question})
                requests.append(BenchRequest(tag, "chat", spec.output_tokens, messages=messages))
            else:
                prompt = f"{prefix} {question}" if question else prefix
                requests.append(BenchRequest(tag, "completions", spec.output_tokens,
                                             prompt=as_prompt(prompt, spec.prompt_format, tok)))
    order = rng_for(spec.seed, "zipf-shuffle").permutation(len(requests))
    sessions = [Session((requests[i],)) for i in order]
    params = {**asdict(spec), "exponent": zipf_exponent(spec.prefixes, spec.top_share),
              "prefixes_used": sum(1 for c in counts if c)}
    return Workload("zipf-prefix", sessions, params)
