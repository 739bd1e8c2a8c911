"""Prefill/decode disaggregation: which pods may pair, and whether a request is worth splitting.

The gateway's proxy picks the decode pod with the pool's policy over the decode-capable pods (role
`decode` or `both`); `PDRouter.plan` then decides, without I/O:

  1. uncached = prompt tokens - tokens predicted cached on the decode pod (Decision.cached_tokens; a
     policy that predicts nothing gives 0 cached, and the prompt is counted here if it gave no count);
  2. uncached < threshold_tokens            -> `local_short`      (prefill on the decode pod is cheaper)
  3. no healthy prefill pod whose version the decode pod can read -> `local_no_prefill`
  4. else the pool's policy picks among those prefill pods       -> `disaggregated`
(`fallback_prefill_failed` is the gateway's outcome when the prefill step then fails.)

Version compatibility: a decode pod reads KV written by a prefill pod of the same version, and of the
versions `compatibility[decode_version]` lists (YAML `pd: {compatibility: {v2: [v1]}}`: v2 decode pods
also read v1 prefill pods). During a rolling update of either set nothing else is ever paired.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from prefixindex.prompt import PromptError, prompt_tokens
from prefixindex.tokenizer import Tokenizer
from router.endpoint import Endpoint
from router.policy import Decision, Policy, RouteRequest

Outcome = Literal["disaggregated", "local_short", "local_no_prefill", "fallback_prefill_failed"]
OUTCOMES: Final[tuple[Outcome, ...]] = (
    "disaggregated", "local_short", "local_no_prefill", "fallback_prefill_failed",
)  # fmt: skip
DEFAULT_THRESHOLD_TOKENS: Final = 256
DEFAULT_PREFILL_TIMEOUT_S: Final = 10.0
# The OpenAI routes whose requests run a prefill; everything else (tokenize, models, ...) goes whole.
GENERATION_PATHS: Final = frozenset({"/v1/completions", "/v1/chat/completions"})


@dataclass(frozen=True, slots=True)
class VersionCompatibility:
    """decode version -> the prefill versions (besides its own) whose KV it can read."""

    readable: Mapping[str, frozenset[str]]

    @classmethod
    def from_map(cls, data: Mapping[str, Iterable[str]] | None) -> VersionCompatibility:
        return cls({str(k): frozenset(v) for k, v in (data or {}).items()})

    def compatible(self, prefill: Endpoint, decode: Endpoint) -> bool:
        """Whether `decode` can read the KV cache `prefill` writes."""
        if prefill.version == decode.version:
            return True
        return prefill.version in self.readable.get(decode.version, ())


@dataclass(frozen=True, slots=True)
class PDPlan:
    """What to do with one request: the outcome, the prefill pick (disaggregated only), and the
    estimated prompt tokens the decode pod would have to prefill itself."""

    outcome: Outcome
    uncached_tokens: int
    prefill: Decision | None = None


def is_pd_pool(endpoints: Iterable[Endpoint]) -> bool:
    """A pool splits requests when it has at least one prefill pod."""
    return any(ep.role == "prefill" for ep in endpoints)


class PDRouter:
    """The P/D decision of one pool. Reads endpoint state only; the gateway runs the two steps."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        threshold_tokens: int = DEFAULT_THRESHOLD_TOKENS,
        prefill_timeout_s: float = DEFAULT_PREFILL_TIMEOUT_S,
        compatibility: VersionCompatibility | None = None,
    ) -> None:
        if threshold_tokens < 0:
            raise ValueError("pd.threshold_tokens must be >= 0")
        if prefill_timeout_s <= 0:
            raise ValueError("pd.prefill_timeout_s must be positive")
        self.tokenizer = tokenizer
        self.threshold_tokens = threshold_tokens
        self.prefill_timeout_s = prefill_timeout_s
        self.compatibility = compatibility or VersionCompatibility({})

    def prefill_candidates(self, decode: Endpoint, endpoints: Iterable[Endpoint]) -> list[Endpoint]:
        """Healthy prefill pods whose KV `decode` can read."""
        compatible = self.compatibility.compatible
        return [
            ep
            for ep in endpoints
            if ep.role == "prefill" and ep.healthy and ep is not decode and compatible(ep, decode)
        ]

    def uncached_tokens(self, request: RouteRequest, decision: Decision) -> int:
        """Prompt tokens the decode pod would prefill: the policy's prediction, else the whole prompt."""
        total = decision.prompt_tokens or self._count_prompt(request)
        return max(0, total - decision.cached_tokens)

    def plan(
        self, request: RouteRequest, decision: Decision, endpoints: Sequence[Endpoint], policy: Policy
    ) -> PDPlan:
        """Decide for the decode pick `decision`; on `disaggregated`, `policy` picked the prefill pod."""
        uncached = self.uncached_tokens(request, decision)
        if uncached < self.threshold_tokens:
            return PDPlan("local_short", uncached)
        candidates = self.prefill_candidates(decision.endpoint, endpoints)
        if not candidates:
            return PDPlan("local_no_prefill", uncached)
        return PDPlan("disaggregated", uncached, policy.pick(request, candidates))

    def _count_prompt(self, request: RouteRequest) -> int:
        """The prompt's tokens, counted once per request."""
        state = request.state
        if state.counted_tokens is None:
            try:
                state.counted_tokens = len(prompt_tokens(request.body, request.path, self.tokenizer))
            except (PromptError, TypeError, ValueError):
                state.counted_tokens = 0
        return state.counted_tokens
