"""Multi-turn chat workload: conversations whose history grows each turn, users thinking between turns.

Turn t of a conversation sends the system prompt, every earlier user message and assistant reply, and
a new user message. The assistant replies in the history are deterministic synthetic text of
`output_tokens` words (not the engine's actual output), so the workload, and hence its cache ceiling,
does not depend on what the engine generated. With `shared_system` every conversation starts with the
same system prompt, as with one application's many users.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from bench.workloads.base import Api, BenchRequest, Session, Workload, check_positive, join_words
from bench.workloads.words import rng_for, text


@dataclass(slots=True, frozen=True)
class MultiTurnSpec:
    conversations: int = 32
    turns: int = 4
    system_tokens: int = 256
    shared_system: bool = True
    user_tokens: int = 64
    output_tokens: int = 64
    think_time: float = 1.0  # mean seconds between a reply and the next user message (exponential)
    api: Api = "chat"
    seed: int = 0


def multi_turn(spec: MultiTurnSpec) -> Workload:
    """`conversations` sessions of `turns` requests each, in conversation order."""
    check_positive(conversations=spec.conversations, turns=spec.turns, user_tokens=spec.user_tokens,
                   output_tokens=spec.output_tokens)
    if spec.think_time < 0 or spec.system_tokens < 0:
        raise ValueError("think_time and system_tokens must be >= 0")
    sessions = []
    for c in range(spec.conversations):
        system = text(spec.seed, ("system", 0 if spec.shared_system else c), spec.system_tokens)
        history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        requests = []
        for t in range(spec.turns):
            history.append({"role": "user", "content": text(spec.seed, ("user", c, t), spec.user_tokens)})
            tag = f"c{c}/t{t}"
            if spec.api == "chat":
                requests.append(BenchRequest(tag, "chat", spec.output_tokens, messages=tuple(history)))
            else:
                prompt = join_words([m["content"] for m in history])
                requests.append(BenchRequest(tag, "completions", spec.output_tokens, prompt=prompt))
            history.append({"role": "assistant",
                            "content": text(spec.seed, ("assistant", c, t), spec.output_tokens)})
        gaps = rng_for(spec.seed, "think", c).exponential(spec.think_time, spec.turns - 1)
        sessions.append(Session(tuple(requests), tuple(float(g) for g in gaps)))
    return Workload("multi-turn", sessions, asdict(spec))
