"""The routing-policy seam: what the gateway hands a policy, and what it gets back.

A policy is a plugin (see STYLE.md): a `type_name`, a factory `from_config(params, ctx)` that decodes
its parameters over defaults, a plain constructor that tests call, and one decision method `pick`.
Policies do no I/O while picking: background tasks (scraper, health checks, KV-event subscribers)
keep the state they read current. The gateway calls, per request and in this order:

    pick(request, candidates)      -> Decision   (candidates: healthy, serving the model, not yet tried)
    on_routed(request, decision)   once the request is about to be sent upstream (decision.sent_at set)
    on_first_byte(request, decision, elapsed_s)
                                   once per attempt, when the first chunk of a 2xx answer arrived;
                                   elapsed_s = time.perf_counter() - decision.sent_at (for a P/D
                                   request the decode attempt's time includes its prefill step; the
                                   prefill step itself, read whole and never relayed, gets no call)
    on_finished(request, decision, ok) once the upstream exchange ended (ok: the pod answered 2xx and
                                   the whole answer reached the client)

and, per pool, `start(endpoints)` at startup, `endpoints_changed(added, removed)` when discovery or
config changes the pool, `endpoints_reweighted(endpoints)` when a config reload changed weights,
`close()` at shutdown (or when a reload replaced the policy: hooks of requests it routed may
follow). A P/D request runs the hooks for its prefill step too (pick over the prefill pods,
on_routed, on_finished), nested inside the decode attempt's.

Per-request state is typed (`RouteRequest.state`, router/route_state.py). A policy whose class sets
`uses_prefix_cache = True` gets the pool's `PrefixCache` (router/prefix_cache.py) in
`PolicyContext.prefix_cache`: the app owns, starts and closes it; the policy only ranks with it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from prometheus_client import CollectorRegistry

from router.endpoint import Endpoint
from router.route_state import RouteState

if TYPE_CHECKING:
    from router.prefix_cache import PrefixCache


@dataclass(slots=True)
class RouteRequest:
    """One client request as a policy sees it. `body` is the parsed JSON; nothing here is re-parsed.

    `state` lets the stages of routing share work (prompt, block keys, matches) without recomputing it.
    """

    request_id: str
    model: str
    path: str  # e.g. /v1/chat/completions
    body: Mapping[str, Any]
    headers: Mapping[str, str]
    session_key: str | None = None
    state: RouteState = field(default_factory=RouteState)


@dataclass(slots=True)
class Decision:
    """The pod chosen, why (a short label used in metrics), and the prompt tokens predicted cached there.

    One Decision is one attempt: `sent_at` is when it was sent upstream (time.perf_counter(), set by
    the proxy just before on_routed; 0.0 before), `first_byte_at` when a 2xx answer's first chunk came
    (just before on_first_byte; 0.0 while none has): from then on the pod has prefilled the prompt, so
    an attempt that fails later (the client left mid-stream) still left its KV there."""

    endpoint: Endpoint
    reason: str
    cached_tokens: int = 0
    prompt_tokens: int = 0
    sent_at: float = 0.0
    first_byte_at: float = 0.0


@dataclass(slots=True)
class PolicyContext:
    """What a policy factory may use: the pool's model, the metrics registry, the pool's prefix cache
    (set when the class has `uses_prefix_cache`), and the name it is configured under."""

    model: str
    registry: CollectorRegistry
    seed: int | None = None
    prefix_cache: PrefixCache | None = None
    name: str = ""  # the registered name (one class may be registered twice); "": its type_name


class Policy(ABC):
    """Chooses one endpoint per request. See the module docstring for when each hook fires."""

    type_name: ClassVar[str]
    uses_prefix_cache: ClassVar[bool] = False  # True: the pool builds a PrefixCache for this policy

    @classmethod
    def from_config(cls, params: Mapping[str, Any], ctx: PolicyContext) -> Policy:
        """Build from YAML/CLI parameters over the defaults. Unknown parameters raise ValueError."""
        if params:
            name = ctx.name or cls.type_name
            raise ValueError(f"policy {name!r} takes no parameters, got {sorted(params)}")
        return cls()

    @abstractmethod
    def pick(self, request: RouteRequest, candidates: Sequence[Endpoint]) -> Decision:
        """Choose one of `candidates` (never empty). Must not block or do I/O."""

    def on_routed(self, request: RouteRequest, decision: Decision) -> None:
        """The request is about to be sent to `decision.endpoint`."""

    def on_first_byte(self, request: RouteRequest, decision: Decision, elapsed_s: float) -> None:
        """The first chunk of a 2xx answer to this attempt arrived `elapsed_s` seconds after it was sent."""

    def on_finished(self, request: RouteRequest, decision: Decision, ok: bool) -> None:
        """The upstream exchange for this decision ended; `ok` when the pod answered with a 2xx and the
        answer was relayed to its end (False on failure, a broken stream, or a client that left)."""

    async def start(self, endpoints: Sequence[Endpoint]) -> None:
        """Start background work (e.g. KV-event subscribers) for the pool's endpoints."""

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        """The pool gained or lost endpoints; drop state held for removed ones."""

    def endpoints_reweighted(self, endpoints: Sequence[Endpoint]) -> None:
        """A config reload changed these endpoints' `weight` (in place); a policy caching weights
        rebuilds what it derived from them."""

    async def close(self) -> None:
        """Stop background work."""
