"""Shared-prefix workload (inference-perf / SGLang style): G groups x P prompts, shuffled.

Each prompt is its group's system prompt (S tokens, identical within a group) followed by its own
question (Q tokens); the answer is O tokens. Presets match the published settings; `scale_to_fleet`
shrinks them so the prefixes need a chosen fraction of a simulated fleet's KV cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from bench.workloads.base import Api, BenchRequest, PromptFormat, Session, Workload, as_prompt, check_positive
from bench.workloads.words import rng_for, text
from prefixindex.tokenizer import Tokenizer, WordTokenizer


@dataclass(slots=True, frozen=True)
class SharedPrefixSpec:
    groups: int = 64
    prompts_per_group: int = 16
    system_tokens: int = 2048
    question_tokens: int = 128
    output_tokens: int = 256
    api: Api = "completions"
    prompt_format: PromptFormat = "text"
    seed: int = 0

    @property
    def num_requests(self) -> int:
        return self.groups * self.prompts_per_group

    @property
    def prefix_tokens(self) -> int:
        """Tokens all distinct system prompts hold together (what a cache must keep to serve them)."""
        return self.groups * self.system_tokens


# Published settings: llm-d's precise-prefix benchmark and SGLang's cache-aware router benchmark.
LLM_D = SharedPrefixSpec(groups=150, prompts_per_group=5, system_tokens=6000, question_tokens=1200,
                         output_tokens=1000)
SGLANG = SharedPrefixSpec(groups=64, prompts_per_group=16, system_tokens=2048, question_tokens=128,
                          output_tokens=256)
PRESETS: dict[str, SharedPrefixSpec] = {"llm-d": LLM_D, "sglang": SGLANG}


def scale_to_fleet(spec: SharedPrefixSpec, fleet_kv_tokens: int, fraction: float) -> SharedPrefixSpec:
    """`spec` with S, Q and O scaled by one factor so the G system prompts need `fraction` of the fleet's KV.

    llm-d's setting has the prefixes needing ~73% of the fleet's KV cache; that pressure is what
    separates the policies. Lengths never drop below one token.
    """
    check_positive(fleet_kv_tokens=fleet_kv_tokens, fraction=fraction)
    k = fraction * fleet_kv_tokens / spec.prefix_tokens
    return replace(
        spec,
        system_tokens=max(1, round(spec.system_tokens * k)),
        question_tokens=max(1, round(spec.question_tokens * k)),
        output_tokens=max(1, round(spec.output_tokens * k)),
    )


def shared_prefix(spec: SharedPrefixSpec, tokenizer: Tokenizer | None = None) -> Workload:
    """The G*P requests in a seeded shuffled order, one session each."""
    check_positive(groups=spec.groups, prompts_per_group=spec.prompts_per_group,
                   system_tokens=spec.system_tokens, output_tokens=spec.output_tokens)
    if spec.question_tokens < 0:
        raise ValueError("question_tokens must be >= 0")
    if spec.prompt_format == "tokens" and spec.api == "chat":
        raise ValueError("token-id prompts need the completions API")
    tok = tokenizer or WordTokenizer()
    systems = [text(spec.seed, ("system", g), spec.system_tokens) for g in range(spec.groups)]
    requests: list[BenchRequest] = []
    for g in range(spec.groups):
        for p in range(spec.prompts_per_group):
            question = text(spec.seed, ("question", g, p), spec.question_tokens)
            tag = f"g{g}/p{p}"
            if spec.api == "chat":
                messages = ({"role": "system", "content": systems[g]}, {"role": "user", "content": question})
                requests.append(BenchRequest(tag, "chat", spec.output_tokens, messages=messages))
            else:
                prompt = f"{systems[g]} {question}" if question else systems[g]
                requests.append(BenchRequest(tag, "completions", spec.output_tokens,
                                             prompt=as_prompt(prompt, spec.prompt_format, tok)))
    order = rng_for(spec.seed, "shuffle").permutation(len(requests))
    sessions = [Session((requests[i],)) for i in order]
    return Workload("shared-prefix", sessions, asdict(spec))

