"""The routing-policy seam: what the gateway hands a policy, and what it gets back.

A policy is a plugin (see STYLE.md): a `type_name`, a factory `from_config(params, ctx)` that decodes
its parameters over defaults, a plain constructor that tests call, and one decision method `pick`.
Policies do no I/O while picking: background tasks (scraper, health checks, KV-event subscribers)
keep the state they read current. The gateway calls, per request and in this order:

    pick(request, candidates)      -> Decision   (candidates: healthy, serving the model, not yet tried)
    on_routed(request, decision)   once the request is about to be sent upstream
    on_finished(request, decision, ok) once the upstream exchange ended (ok: the pod answered 2xx and
                                   the whole answer reached the client)

and, per pool, `start(endpoints)` at startup, `endpoints_changed(added, removed)` when discovery or
config changes the pool, `close()` at shutdown.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from prometheus_client import CollectorRegistry

from router.endpoint import Endpoint


@dataclass(slots=True)
class RouteRequest:
    """One client request as a policy sees it. `body` is the parsed JSON; nothing here is re-parsed.

    `scratch` lets the stages of one decision share work (tokens, block keys) without recomputing it.
    """

    request_id: str
    model: str
    path: str  # e.g. /v1/chat/completions
    body: Mapping[str, Any]
    headers: Mapping[str, str]
    session_key: str | None = None
    scratch: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Decision:
    """The pod chosen, why (a short label used in metrics), and the prompt tokens predicted cached there."""

    endpoint: Endpoint
    reason: str
    cached_tokens: int = 0
    prompt_tokens: int = 0


@dataclass(slots=True)
class PolicyContext:
    """What a policy factory may use: the pool's model, its tokenizer, and the metrics registry."""

    model: str
    registry: CollectorRegistry
    tokenizer: str | None = None  # HuggingFace tokenizer dir; None: the default WordTokenizer
    block_size: int | None = None  # None: learn it from vllm:cache_config_info, else 16
    seed: int | None = None


class Policy(ABC):
    """Chooses one endpoint per request. See the module docstring for when each hook fires."""

    type_name: ClassVar[str]

    @classmethod
    def from_config(cls, params: Mapping[str, Any], ctx: PolicyContext) -> Policy:
        """Build from YAML/CLI parameters over the defaults. Unknown parameters raise ValueError."""
        if params:
            raise ValueError(f"policy {cls.type_name!r} takes no parameters, got {sorted(params)}")
        return cls()

    @abstractmethod
    def pick(self, request: RouteRequest, candidates: Sequence[Endpoint]) -> Decision:
        """Choose one of `candidates` (never empty). Must not block or do I/O."""

    def on_routed(self, request: RouteRequest, decision: Decision) -> None:
        """The request is about to be sent to `decision.endpoint`."""

    def on_finished(self, request: RouteRequest, decision: Decision, ok: bool) -> None:
        """The upstream exchange for this decision ended; `ok` when the pod answered with a 2xx and the
        answer was relayed to its end (False on failure, a broken stream, or a client that left)."""

    async def start(self, endpoints: Sequence[Endpoint]) -> None:
        """Start background work (e.g. KV-event subscribers) for the pool's endpoints."""

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        """The pool gained or lost endpoints; drop state held for removed ones."""

    async def close(self) -> None:
        """Stop background work."""
