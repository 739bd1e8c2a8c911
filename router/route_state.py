"""Per-request routing state: what the stages of one request's routing learn and share, typed.

One `RouteState` lives on each `RouteRequest` (`request.state`) for the whole request, retries and the
P/D prefill step included. The prefix cache fills the prompt part (`PrefixCache.prepare`, `record`),
the policy the per-pick part (`matched`, `prefix`, `attempts`), the gateway the rest (`dispatched_at`,
`disaggregated`; per attempt: `Decision.sent_at`). Nothing here does I/O.

Per attempt vs per request: `recorded` and `attempts` are keyed by pod, as one request can have several
attempts alive at once (a P/D decode attempt on one pod while its prefill step runs on another) and a
failed attempt must take back only what *it* taught the index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefixindex.prompt import Prompt
from router.endpoint import Endpoint


@dataclass(slots=True)
class PrefixMatch:
    """The prefix evidence a ranker hands its scorers: the prompt's full blocks and tokens and, per
    endpoint holding some, its leading matched blocks (after any balance rule of the ranker)."""

    prompt_blocks: int
    matched: dict[Endpoint, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    block_size: int = 16


@dataclass(slots=True)
class RouteState:
    """What routing knows about one request so far. See the module docstring for who writes what."""

    # ---- the prompt, read once (PrefixCache.prepare) ----
    prompt: Prompt | None = None  # None: not read yet, or the request has no prompt the index can name
    prompt_read: bool = False  # extraction was attempted (so a prompt-less request is not re-parsed)
    keys: list[int] = field(default_factory=list)  # the prompt's chained block keys ...
    keys_block_size: int = 0  # ... at this block size (0: none computed yet)
    counted_tokens: int | None = None  # prompt tokens counted without a prefix cache (router.pd)

    # ---- the latest pick ----
    matched: dict[Endpoint, int] = field(default_factory=dict)  # leading blocks held, per candidate
    prefix: PrefixMatch | None = None  # what the weighted policy's scorers read (None: no prefix info)

    # ---- what each attempt taught the prefix index, per pod (PrefixCache.record / forget) ----
    recorded: dict[Endpoint, list[int]] = field(default_factory=dict)

    # ---- attempts ----
    attempts: dict[Endpoint, object] = field(default_factory=dict)  # a policy's own record, per pod
    disaggregated: bool = False  # the current decode attempt carries a P/D prefill's KV (gateway.pd_flow)

    # ---- timing (time.perf_counter() seconds; 0.0: not yet) ----
    dispatched_at: float = 0.0  # the request's first attempt was sent (ProxyCall.charge)

    @property
    def prompt_tokens(self) -> int:
        """Tokens of the prompt read, 0 when there is none."""
        return len(self.prompt.tokens) if self.prompt is not None else 0

    def cached_tokens(self, ep: Endpoint) -> int:
        """Prompt tokens predicted cached on `ep` by the latest match."""
        return self.tokens_of_blocks(self.matched.get(ep, 0))

    def tokens_of_blocks(self, blocks: int) -> int:
        """Prompt tokens a pod holding the prompt's first `blocks` blocks has cached. vLLM recomputes
        the prompt's last token, so a prompt of whole blocks misses its last block."""
        n = self.prompt_tokens
        if not n or not self.keys_block_size:
            return 0
        bs = self.keys_block_size
        return min((n - 1) // bs * bs, blocks * bs)
