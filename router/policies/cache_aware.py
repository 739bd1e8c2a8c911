"""cache_aware: route to the pod holding the longest prefix of the prompt, without piling load on it.

Per request (tokenized once; tokens and block keys cached in `request.scratch`):
  1. match the prompt's chained block keys against the prefix index: per pod, leading blocks held;
  2. balance: a pod whose load (queue.endpoint_load) exceeds the lightest candidate's by more than
     `balance_abs` requests and `balance_rel` times stops attracting by prefix (its prefix score is 0),
     so a prefix hot enough to saturate one pod spreads to a second one, which then learns it too;
  3. score = sum of weight x scorer in [0,1] (prefix, queue, kv_usage by default; see router/scorers);
  4. the best score wins; ties go to the least-loaded, then uniformly at random, never to list order.
Decision reasons: "prefix_hit" (the chosen pod holds part of the prompt), "balance" (the prompt's best
holder was skipped as overloaded), "tie" (a random choice among equals), "load" (no prefix anywhere).

Index modes (`index:`): `approximate` records the prompt's blocks on the chosen pod when a request is
routed, with a per-pod LRU capacity (`capacity`, else the pod's scraped `num_gpu_blocks`, else 31,250
blocks); `precise` follows each pod's KV events (Endpoint.kv_events / kv_events_replay), plus a small
per-pod LRU of blocks routed but not yet confirmed by an event (`pending_blocks`), so a burst sharing a
new prefix is not scattered while the first prefill runs.

YAML:
    policy: {name: cache_aware, params: {index: precise, weights: {prefix: 3, queue: 2, kv_usage: 2}}}
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from prefixindex.events import EventBatch, event_type
from prefixindex.hashing import block_keys
from prefixindex.index import BlockIndex
from prefixindex.metrics import index_metrics
from prefixindex.precise import PodEventTracker
from prefixindex.prompt import Prompt, PromptError, extract_prompt
from prefixindex.subscriber import EventSource, KVEventSubscriber, is_bind
from prefixindex.tokenizer import Tokenizer, load_tokenizer
from router.endpoint import Endpoint
from router.policies.common import reject_unknown, rng_for
from router.policy import Decision, Policy, PolicyContext, RouteRequest
from router.scorers import Weighted, build_scorer, combine
from router.scorers.prefix import PREFIX_MATCH, PrefixMatch
from router.scorers.queue import endpoint_load

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = {"prefix": 3.0, "queue": 2.0, "kv_usage": 2.0}
DEFAULT_BLOCK_SIZE = 16
DEFAULT_CAPACITY = 31_250  # blocks: an 8B model on an H100 at 16 tokens a block
_PROMPT = "cache_aware.prompt"
_KEYS = "cache_aware.keys"
_RECORDED = "cache_aware.recorded"
_PARAMS = {
    "index",
    "weights",
    "block_size",
    "capacity",
    "balance_abs",
    "balance_rel",
    "pending_blocks",
    "replay_timeout",
    "resync_interval",
    "seed",
    "tokenizer",
}


class CacheAwarePolicy(Policy):
    """Prefix-affinity routing with load balance. See the module docstring for the rule."""

    type_name = "cache_aware"

    def __init__(
        self,
        model: str,
        *,
        index: str = "approximate",
        weights: Mapping[str, float] | None = None,
        block_size: int | None = None,
        capacity: int | None = None,
        balance_abs: float = 8.0,
        balance_rel: float = 1.5,
        pending_blocks: int = 4096,
        replay_timeout: float = 2.0,
        resync_interval: float = 5.0,
        tokenizer: Tokenizer | None = None,
        registry: Any = None,
        seed: int | None = None,
    ) -> None:
        if index not in ("approximate", "precise"):
            raise ValueError(f"index must be 'approximate' or 'precise', not {index!r}")
        for name, value in (("block_size", block_size), ("capacity", capacity)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer")
        if balance_abs < 0 or balance_rel < 1:
            raise ValueError("balance_abs must be >= 0 and balance_rel >= 1")
        if pending_blocks < 0:
            raise ValueError("pending_blocks must be >= 0")
        self.model = model
        self.mode = index
        self._fixed_block_size = block_size
        self._learned_block_size = False
        self.block_size = block_size or DEFAULT_BLOCK_SIZE
        self.capacity = capacity
        self.balance_abs = float(balance_abs)
        self.balance_rel = float(balance_rel)
        self.pending_blocks = pending_blocks
        self.replay_timeout = replay_timeout
        self.resync_interval = resync_interval
        self.tokenizer = tokenizer or load_tokenizer(None)
        w = dict(DEFAULT_WEIGHTS if weights is None else weights)
        for name, value in w.items():
            if not isinstance(value, int | float) or value < 0:
                raise ValueError(f"weight of {name!r} must be a non-negative number")
        self.scorers = [Weighted(build_scorer(name), float(v)) for name, v in w.items()]
        self.index = BlockIndex()
        self.pending = BlockIndex()  # precise mode: routed, not yet confirmed by an event
        self._trackers: dict[Endpoint, PodEventTracker] = {}
        self._endpoints: list[Endpoint] = []
        self._subscriber: KVEventSubscriber | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._rng = rng_for(None, seed)
        self._metrics = index_metrics(registry) if registry is not None else None

    @classmethod
    def from_config(cls, params: Mapping[str, Any], ctx: PolicyContext) -> CacheAwarePolicy:
        reject_unknown(params, _PARAMS, cls.type_name)
        p = dict(params)
        weights = p.pop("weights", None)
        if weights is not None and not isinstance(weights, Mapping):
            raise ValueError("weights must map scorer names to numbers")
        tok_path = p.pop("tokenizer", None) or ctx.tokenizer
        return cls(
            ctx.model,
            weights=weights,
            block_size=p.pop("block_size") if "block_size" in p else ctx.block_size,
            tokenizer=load_tokenizer(tok_path),
            registry=ctx.registry,
            seed=p.pop("seed", ctx.seed),
            **p,
        )

    # ---- the decision -------------------------------------------------------------------------

    def prompt_keys(self, request: RouteRequest) -> tuple[Prompt | None, list[int]]:
        """The request's prompt and block keys, computed once per request (cached in scratch)."""
        scratch = request.scratch
        prompt = scratch.get(_PROMPT)
        if prompt is None and _PROMPT not in scratch:
            try:
                prompt = extract_prompt(request.body, request.path, self.tokenizer, self.model)
            except (PromptError, TypeError, ValueError):
                prompt = None
            scratch[_PROMPT] = prompt
        cached = scratch.get(_KEYS)
        if cached is not None and cached[0] == self.block_size:
            return prompt, cached[1]
        keys: list[int] = []
        if prompt is not None:
            try:
                keys = block_keys(prompt.tokens, self.block_size, prompt.root)
            except ValueError:
                keys = []
        scratch[_KEYS] = (self.block_size, keys)
        return prompt, keys

    def match(self, keys: Sequence[int], candidates: Sequence[Endpoint]) -> dict[Endpoint, int]:
        """Per candidate, the leading blocks of `keys` it holds (index, and pending in precise mode).

        In precise mode a prompt's run can be split between the two: events confirm a prefill chunk by
        chunk, moving its leading blocks from pending to the index while the rest is still pending. The
        run a pod holds is therefore followed across both, alternating until neither extends it.
        """
        found = self.index.match(keys, candidates)
        if self.mode != "precise" or not self.pending_blocks:
            return found  # type: ignore[return-value]
        for ep, n in self.pending.match(keys, candidates).items():
            if n > found.get(ep, 0):
                found[ep] = n
        for ep, n in list(found.items()):
            sources = (self.pending, self.index)
            turn = 0
            while n < len(keys):
                more = sources[turn % 2].match(keys[n:], [ep]).get(ep, 0)
                if not more and turn:
                    break
                n += more
                turn += 1
            found[ep] = n
        return found  # type: ignore[return-value]

    def pick(self, request: RouteRequest, candidates: Sequence[Endpoint]) -> Decision:
        self._learn_block_size_from(candidates)
        prompt, keys = self.prompt_keys(request)
        matched = self.match(keys, candidates) if keys else {}
        loads = {ep: endpoint_load(ep) for ep in candidates}
        lightest = min(loads.values())
        limit = max(lightest + self.balance_abs, lightest * self.balance_rel)
        overloaded = {ep for ep, load in loads.items() if load > limit}
        attract = {ep: n for ep, n in matched.items() if ep not in overloaded}
        ntok = len(prompt.tokens) if prompt is not None else 0
        request.scratch[PREFIX_MATCH] = PrefixMatch(len(keys), attract, ntok, self.block_size)

        scores = combine(self.scorers, request, candidates)
        best = max(scores.values())
        top = [ep for ep in candidates if scores[ep] >= best - 1e-9]
        tie = False
        if len(top) > 1:
            low = min(loads[ep] for ep in top)
            top = [ep for ep in top if loads[ep] == low]
            tie = len(top) > 1
        chosen = top[0] if len(top) == 1 else self._rng.choice(top)

        if attract.get(chosen, 0) > 0:
            reason = "prefix_hit"
        elif any(matched.get(ep, 0) > 0 for ep in overloaded):
            reason = "balance"
        elif tie:
            reason = "tie"
        else:
            reason = "load"
        # vLLM recomputes the prompt's last token, so a prompt of whole blocks misses its last block
        hit_limit = (ntok - 1) // self.block_size * self.block_size if ntok else 0
        cached = min(hit_limit, matched.get(chosen, 0) * self.block_size)
        return Decision(chosen, reason, cached_tokens=cached, prompt_tokens=ntok)

    def on_routed(self, request: RouteRequest, decision: Decision) -> None:
        ep = decision.endpoint
        _, keys = self.prompt_keys(request)
        target = self._learning_index()
        if keys and target is not None:
            capacity = self._capacity_for(ep) if target is self.index else self.pending_blocks
            self._ensure_pod(target, ep, capacity)
            held = target.match(keys, [ep]).get(ep, 0)
            target.insert(ep, keys)
            request.scratch[_RECORDED] = (ep, keys[held:])  # what this request taught the index
        m = self._metrics
        if m is not None:
            m.decisions.labels(self.model, decision.reason).inc()
            m.prompt_tokens.labels(self.model, ep.url).inc(decision.prompt_tokens)
            m.cached_tokens.labels(self.model, ep.url).inc(decision.cached_tokens)
            self._update_size_metrics()

    def on_finished(self, request: RouteRequest, decision: Decision, ok: bool) -> None:
        """A failed attempt may never have reached prefill: forget the blocks it recorded there."""
        recorded = request.scratch.pop(_RECORDED, None)
        target = self._learning_index()
        if not ok and recorded is not None and target is not None and recorded[0] is decision.endpoint:
            target.discard(decision.endpoint, recorded[1])

    def _learning_index(self) -> BlockIndex | None:
        """The index routing decisions are recorded in: the index itself, or precise mode's pending."""
        if self.mode == "approximate":
            return self.index
        return self.pending if self.pending_blocks else None

    # ---- pool lifecycle -----------------------------------------------------------------------

    async def start(self, endpoints: Sequence[Endpoint]) -> None:
        if self.mode != "precise":
            return
        self._subscriber = KVEventSubscriber(
            self, replay_timeout=self.replay_timeout, resync_interval=self.resync_interval or None
        )
        self._endpoints = list(endpoints)
        for ep in endpoints:
            await self._subscribe(ep, self._endpoints)

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        for ep in removed:
            tracker = self._trackers.pop(ep, None)
            keys = tracker.keys() if tracker is not None else None
            self.index.remove_pod(ep, keys)
            self.pending.remove_pod(ep)
            if self._subscriber is not None:
                self._spawn(self._subscriber.remove(ep))
        gone = set(removed)
        self._endpoints = [ep for ep in self._endpoints if ep not in gone] + list(added)
        if self._subscriber is not None:
            for ep in added:
                self._spawn(self._subscribe(ep, self._endpoints))
        self._update_size_metrics()

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._subscriber is not None:
            await self._subscriber.close()
            self._subscriber = None

    async def _subscribe(self, ep: Endpoint, pool: Sequence[Endpoint]) -> None:
        if not ep.kv_events or self._subscriber is None:
            return
        self.index.add_pod(ep)
        self._trackers[ep] = PodEventTracker(
            self.index, ep, self.model, self._accept_block_size, pending=self.pending
        )
        await self._subscriber.add(event_source(ep, pool))

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- KV-event sink (prefixindex.subscriber.EventSink) -------------------------------------

    def apply(self, pod: Hashable, batch: EventBatch) -> None:
        tracker = self._trackers.get(pod)  # type: ignore[arg-type]
        if tracker is None:
            return
        tracker.apply(batch)
        m = self._metrics
        if m is not None:
            url = pod.url  # type: ignore[attr-defined]
            for name, n in Counter(event_type(ev) for ev in batch.events).items():
                m.kv_events.labels(self.model, url, name).inc(n)
            self._update_size_metrics()

    def reset(self, pod: Hashable) -> None:
        tracker = self._trackers.get(pod)  # type: ignore[arg-type]
        if tracker is not None:
            tracker.clear()
        if self._metrics is not None:
            self._metrics.resets.labels(self.model, pod.url, "events_lost").inc()  # type: ignore[attr-defined]

    def note(self, pod: Hashable, what: str) -> None:
        m = self._metrics
        if m is None:
            return
        url = pod.url  # type: ignore[attr-defined]
        if what == "gap":
            m.seq_gaps.labels(self.model, url).inc()
        elif what.startswith("replay_"):
            m.replays.labels(self.model, url, what.removeprefix("replay_")).inc()
        else:
            m.resets.labels(self.model, url, what).inc()

    # ---- helpers ------------------------------------------------------------------------------

    def _capacity_for(self, ep: Endpoint) -> int:
        return self.capacity or ep.num_gpu_blocks or DEFAULT_CAPACITY

    @staticmethod
    def _ensure_pod(index: BlockIndex, ep: Endpoint, capacity: int) -> None:
        index.add_pod(ep, capacity)  # adds `ep`, or only updates its capacity when it is known

    def _learn_block_size_from(self, candidates: Sequence[Endpoint]) -> None:
        if self._fixed_block_size is None and not self._learned_block_size:
            for ep in candidates:
                if ep.block_size:
                    self._accept_block_size(ep.block_size)
                    return

    def _accept_block_size(self, size: int) -> bool:
        """Whether blocks of `size` tokens can be indexed. Unless one was configured, the first size a
        pod reports (scrape or event) is adopted, once: pods of mixed sizes need `block_size` set."""
        if size == self.block_size:
            self._learned_block_size = True
            return True
        if self._fixed_block_size is not None or self._learned_block_size or size <= 0:
            return False
        self._learned_block_size = True
        log.info(
            "cache_aware %s: block size %d learned from the pods (was %d)", self.model, size, self.block_size
        )
        self.block_size = size
        for ep in list(self.index.pods()):
            tracker = self._trackers.get(ep)  # type: ignore[arg-type]
            if tracker is not None:
                tracker.clear()
            else:
                self.index.clear_pod(ep)
        for ep in self.pending.pods():
            self.pending.clear_pod(ep)
        return True

    def _update_size_metrics(self) -> None:
        m = self._metrics
        if m is not None:
            m.index_blocks.labels(self.model).set(len(self.index))
            m.index_entries.labels(self.model).set(self.index.entries)
            m.index_bytes.labels(self.model).set(self.index.nbytes() + self.pending.nbytes())


def default_topic(ep: Endpoint) -> str:
    """The topic a simulated pod publishes under by default: `kv@<host:port>@<model>`."""
    return f"kv@{urlsplit(ep.url).netloc}@{ep.model}"


def event_source(ep: Endpoint, pool: Sequence[Endpoint]) -> EventSource:
    """Where `ep`'s KV events come from. A bound endpoint shared by several pods tells them apart by
    topic (`labels["kv_topic"]`, else `default_topic`); a `*` in the replay endpoint is the pod's host."""
    assert ep.kv_events is not None
    topic = ep.labels.get("kv_topic")
    if topic is None and is_bind(ep.kv_events):
        sharing = [e for e in pool if e.kv_events == ep.kv_events]
        if len(sharing) > 1 or not sharing:
            topic = default_topic(ep)
    replay = ep.kv_events_replay
    if replay and "*" in replay:
        replay = replay.replace("*", urlsplit(ep.url).hostname or "127.0.0.1")
    return EventSource(ep, ep.kv_events, replay, topic)
