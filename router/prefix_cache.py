"""The prefix cache of one pool: which pod holds which prompt prefix, kept current, asked without I/O.

A `PrefixCache` is owned by the app (one per pool whose policy class has `uses_prefix_cache`), not by
a policy: it holds the `BlockIndex`, precise mode's `pending` index, the per-pod `PodEventTracker`s,
the `KVEventSubscriber` (this object is its EventSink), the block-size learning, the tokenizer and the
index metrics. The app calls `start(endpoints)`, `endpoints_changed(added, removed)`, `close()`.

Per request (no I/O; state lives in the request's `RouteState`):

    learn_from(candidates)   adopt the pods' scraped block size, once (unless configured)
    prepare(state, request)  read the prompt once, block keys once per block size
    match(keys, candidates)  per candidate, leading blocks held (index, and pending in precise mode)
    record(state, ep)        `ep` is prefilling the prompt: learn it (remembered per pod in the state)
    forget(state, ep)        the attempt on `ep` failed: take back what `record` added for `ep` only
    count_routed(decision)   hit-ratio and decision metrics

Replicas (router/replicas): in approximate mode each `record` and `forget` on the index is also handed
to `shared` (a SharedLearning, set by the replica sync), which tells the other replicas, and their
records come back through `learn_shared`, so replicas behind one load balancer learn as one.

Index modes (`index:`): `approximate` records the prompt's blocks on the chosen pod when a request is
routed, with a per-pod LRU capacity (`capacity`, else the pod's scraped `num_gpu_blocks`, else 31,250
blocks); `precise` follows each pod's KV events (Endpoint.kv_events / kv_events_replay), plus a small
per-pod LRU of blocks routed but not yet confirmed by an event (`pending_blocks`; 0 turns it off), so
a burst sharing a new prefix is not scattered while the first prefill runs.

Its parameters are decoded from the pool's policy params (`PrefixCacheConfig.from_params`), so
`policy: {name: cache_aware, params: {index: precise, pending_blocks: 0}}` configures the cache.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Coroutine, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry

from prefixindex.events import EventBatch, event_type
from prefixindex.hashing import block_keys, chain_keys, root_key, token_bytes
from prefixindex.index import BlockIndex
from prefixindex.metrics import IndexMetrics, TokenizerObserver, index_metrics
from prefixindex.precise import PodEventTracker
from prefixindex.prompt import Prompt, PromptError, PromptText, prompt_input, prompt_scope
from prefixindex.subscriber import EventSource, KVEventSubscriber, is_bind
from prefixindex.tokenize_worker import PromptEncoder
from prefixindex.tokenizer import Tokenizer, load_tokenizer
from router.endpoint import Endpoint
from router.policy import Decision, RouteRequest
from router.route_state import RouteState

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE: Final = 16
DEFAULT_CAPACITY: Final = 31_250  # blocks: an 8B model on an H100 at 16 tokens a block
IndexMode = Literal["approximate", "precise"]
# The pool's policy params that configure its prefix cache (the rest go to the policy).
PREFIX_CACHE_PARAMS: Final = frozenset(
    {"index", "block_size", "capacity", "pending_blocks", "replay_timeout", "resync_interval", "tokenizer",
     "tokenizer_workers", "token_reuse_bytes"}
)
DEFAULT_TOKEN_REUSE_BYTES: Final = 64 << 20
KEY_SLICE_BLOCKS: Final = 256  # a long prompt's keys are hashed this many blocks between yields


def _positive_int_or_none(name: str, value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"{name} must be a positive integer, not {value!r}")


@dataclass(frozen=True, slots=True)
class PrefixCacheConfig:
    """A prefix cache's settings, validated on construction (ValueError naming the bad one)."""

    index: IndexMode = "approximate"
    block_size: int | None = None  # None: learn it from the pods (scrape or events), else 16
    capacity: int | None = None  # approximate: blocks per pod; None: the pod's num_gpu_blocks, else 31,250
    pending_blocks: int = 4096  # precise: routed-not-yet-confirmed blocks kept per pod; 0: none
    replay_timeout: float = 2.0  # seconds to wait for a pod's replay socket
    resync_interval: float = 5.0  # seconds of silence before a pod is asked for missed events; 0: never
    tokenizer: str | None = None  # HuggingFace tokenizer dir; None: the default WordTokenizer
    tokenizer_workers: int = 1  # threads tokenizing prompts off the event loop; 0: on the loop (inline)
    token_reuse_bytes: int = DEFAULT_TOKEN_REUSE_BYTES  # chat turns' tokens kept for the next turn; 0: off

    def __post_init__(self) -> None:
        if self.index not in ("approximate", "precise"):
            raise ValueError(f"index must be 'approximate' or 'precise', not {self.index!r}")
        _positive_int_or_none("block_size", self.block_size)
        _positive_int_or_none("capacity", self.capacity)
        p = self.pending_blocks
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise ValueError(f"pending_blocks must be an integer >= 0, not {p!r}")
        for name in ("replay_timeout", "resync_interval"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, not {v!r}")
        if self.replay_timeout == 0:
            raise ValueError("replay_timeout must be positive")
        if self.tokenizer is not None and not isinstance(self.tokenizer, str):
            raise ValueError(f"tokenizer must be a path, not {self.tokenizer!r}")
        for name in ("tokenizer_workers", "token_reuse_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, not {v!r}")

    @classmethod
    def from_params(
        cls, params: Mapping[str, Any], *, tokenizer: str | None = None, block_size: int | None = None
    ) -> PrefixCacheConfig:
        """From the cache's share of a policy's params (see `split_params`); `tokenizer` and
        `block_size` are the pool's settings, used when the params do not name their own."""
        unknown = set(params) - PREFIX_CACHE_PARAMS
        if unknown:
            raise ValueError(f"the prefix cache does not take parameters {sorted(unknown)}")
        p = dict(params)
        p["tokenizer"] = p.get("tokenizer") or tokenizer
        p.setdefault("block_size", block_size)
        return cls(**p)


class SharedLearning(Protocol):
    """Where an approximate index's own learning goes besides itself (the replica sync). Called on the
    request path: must not block (queue and return)."""

    def routed(self, model: str, pod: str, block_size: int, keys: Sequence[int]) -> None:
        """`pod` (an endpoint URL) was sent the prompt of `keys` to prefill."""

    def forgotten(self, model: str, pod: str, block_size: int, keys: Sequence[int]) -> None:
        """The attempt on `pod` failed: `keys`, which its `routed` added, are not there after all."""


def split_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A policy's params split into (the prefix cache's, the policy's own)."""
    cache = {k: v for k, v in params.items() if k in PREFIX_CACHE_PARAMS}
    return cache, {k: v for k, v in params.items() if k not in PREFIX_CACHE_PARAMS}


class PrefixCache:
    """The prefix index of one pool and everything keeping it current. See the module docstring."""

    def __init__(
        self,
        model: str,
        config: PrefixCacheConfig | None = None,
        *,
        tokenizer: Tokenizer | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """`tokenizer` overrides `config.tokenizer` (tests); no `registry`: no metrics."""
        self.model = model
        self.config = config = config or PrefixCacheConfig()
        self.mode: IndexMode = config.index
        self.block_size = config.block_size or DEFAULT_BLOCK_SIZE
        self._block_size_settled = False
        self.tokenizer = tokenizer or load_tokenizer(config.tokenizer)
        self.index = BlockIndex()
        self.pending = BlockIndex()  # precise mode: routed, not yet confirmed by an event
        self.trackers: dict[Endpoint, PodEventTracker] = {}  # precise mode: pods followed by events
        self._endpoints: list[Endpoint] = []
        self._by_url: dict[str, Endpoint] = {}
        self.shared: SharedLearning | None = None  # approximate mode: the replica sync, when configured
        self._subscriber: KVEventSubscriber | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._metrics: IndexMetrics | None = index_metrics(registry) if registry is not None else None
        # label children bound once, not looked up per request (prometheus-client's labels() locks)
        self._decision_children: dict[str, Any] = {}
        self._pod_children: dict[str, tuple[Any, Any]] = {}
        m = self._metrics
        self._size_children = (
            (m.index_blocks.labels(model), m.index_entries.labels(model), m.index_bytes.labels(model))
            if m is not None else None
        )  # fmt: skip
        self.encoder = PromptEncoder(
            self.tokenizer, workers=config.tokenizer_workers, reuse_bytes=config.token_reuse_bytes,
            observer=TokenizerObserver(self._metrics, model) if self._metrics is not None else None,
        )  # fmt: skip

    # ---- per request (no I/O) -----------------------------------------------------------------

    def learn_from(self, candidates: Sequence[Endpoint]) -> None:
        """Adopt the first block size a candidate's scrape reports, once, unless one was configured."""
        if self.config.block_size is None and not self._block_size_settled:
            for ep in candidates:
                if ep.block_size:
                    self._accept_block_size(ep.block_size)
                    return

    async def read_prompt(self, state: RouteState, request: RouteRequest) -> None:
        """Fill `state.prompt` once, tokenizing in the worker while the event loop goes on (the gateway
        awaits this before routing; `prepare` then finds the prompt read)."""
        if state.prompt_read:
            return
        state.prompt_read = True
        try:
            scope, source = self._prompt_source(request)
            tokens = source if isinstance(source, list) else await self._encode_off_loop(source)
            state.prompt = Prompt(tokens, *scope)
        except (PromptError, TypeError, ValueError) as exc:
            self._unkeyed(state, exc)
            return
        if self.encoder.worker is not None and len(tokens) >= KEY_SLICE_BLOCKS * self.block_size:
            await self._keys_in_slices(state)

    async def _keys_in_slices(self, state: RouteState) -> None:
        """The block keys of a long prompt, KEY_SLICE_BLOCKS at a time with a yield to the loop between
        (about 0.25 ms each; 32k tokens take ~2 ms in all), chained exactly as `block_keys` chains them."""
        assert state.prompt is not None
        bs, prompt = self.block_size, state.prompt
        n = len(prompt.tokens) // bs
        try:
            data = token_bytes(prompt.tokens[: n * bs])
        except ValueError:
            return  # `prepare` finds no keys for it either
        width, keys = 4 * bs, []
        for first in range(0, n, KEY_SLICE_BLOCKS):
            m = min(KEY_SLICE_BLOCKS, n - first)
            parent = keys[-1] if keys else prompt.root
            keys += chain_keys(data[first * width : (first + m) * width], width, m, parent)
            await asyncio.sleep(0)
        if bs == self.block_size:  # else the block size was learned meanwhile: `prepare` recomputes
            state.keys, state.keys_block_size = keys, bs

    def prepare(self, state: RouteState, request: RouteRequest) -> None:
        """Fill `state.prompt` (read once per request, on the calling thread unless `read_prompt` read
        it) and `state.keys` (at the current block size)."""
        if not state.prompt_read:
            state.prompt_read = True
            try:
                scope, source = self._prompt_source(request)
                tokens = source if isinstance(source, list) else self._encode_now(source)
                state.prompt = Prompt(tokens, *scope)
            except (PromptError, TypeError, ValueError) as exc:
                self._unkeyed(state, exc)
        self._ensure_keys(state)

    def _prompt_source(
        self, request: RouteRequest
    ) -> tuple[tuple[int, str | None, str | None], PromptText | list[int]]:
        lora, salt = prompt_scope(request.body, self.model)
        return (root_key(self.model, lora, salt), lora, salt), prompt_input(
            request.body, request.path, self.tokenizer
        )

    def _encode_now(self, source: PromptText) -> list[int]:
        try:
            return self.encoder.encode_now(source.text, source.add_special_tokens)
        except (TypeError, ValueError) as exc:
            raise PromptError(f"cannot tokenize the prompt: {exc}", source.failure_reason) from exc

    async def _encode_off_loop(self, source: PromptText) -> list[int]:
        try:
            return await self.encoder.encode(source.text, source.add_special_tokens)
        except (TypeError, ValueError) as exc:
            raise PromptError(f"cannot tokenize the prompt: {exc}", source.failure_reason) from exc

    def _unkeyed(self, state: RouteState, exc: Exception) -> None:
        state.prompt = None
        if self._metrics is not None:
            self._metrics.unkeyed.labels(self.model, getattr(exc, "reason", "prompt")).inc()

    def keys_for(self, request: RouteRequest) -> list[int]:
        """The block keys of `request`'s prompt at the current block size (a probe: state not kept)."""
        state = RouteState()
        self.prepare(state, request)
        return state.keys

    def match(self, keys: Sequence[int], candidates: Sequence[Endpoint]) -> dict[Endpoint, int]:
        """Per candidate, the leading blocks of `keys` it holds (index, and pending in precise mode).

        In precise mode a prompt's run can be split between the two: events confirm a prefill chunk by
        chunk, moving its leading blocks from pending to the index while the rest is still pending. The
        run a pod holds is therefore followed across both, alternating until neither extends it.
        """
        if not keys:
            return {}
        found = self.index.match(keys, candidates)
        if self.mode != "precise" or not self.config.pending_blocks:
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

    def record(self, state: RouteState, ep: Endpoint) -> None:
        """`ep` is about to prefill the prompt: record its blocks there (approximate: the index;
        precise: pending), and what this added in `state.recorded[ep]` for `forget`."""
        target = self._learning_index()
        if target is None or state.prompt is None:
            return
        self._ensure_keys(state)  # the block size may have been learned since the pick
        keys = state.keys
        if not keys:
            return
        capacity = self._capacity_for(ep) if target is self.index else self.config.pending_blocks
        target.add_pod(ep, capacity)  # adds `ep`, or only updates its capacity when it is known
        held = target.match(keys, [ep]).get(ep, 0)
        target.insert(ep, keys)
        state.recorded[ep] = keys[held:]
        if self.shared is not None and target is self.index:
            self.shared.routed(self.model, ep.url, self.block_size, keys)

    def forget(self, state: RouteState, ep: Endpoint) -> None:
        """The attempt on `ep` failed (it may never have reached prefill): discard what `record` added
        for `ep`, and only for `ep`. A record of a successful attempt stays in `state.recorded`."""
        added = state.recorded.pop(ep, None)
        target = self._learning_index()
        if added and target is not None:
            target.discard(ep, added)
            if self.shared is not None and target is self.index:
                self.shared.forgotten(self.model, ep.url, self.block_size, added)

    def learn_shared(self, pod: str, block_size: int, keys: Sequence[int], routed: bool) -> bool:
        """Another replica routed (`routed`) or took back the blocks `keys` on the pod of URL `pod`:
        the same as this replica's `record`/`forget` would do. False (nothing changed) when the index
        is not approximate, the pod is not in this pool, or the keys are of another block size."""
        if self.mode != "approximate" or block_size != self.block_size:
            return False
        ep = self._by_url.get(pod)
        if ep is None:
            return False
        if routed:
            self.index.add_pod(ep, self._capacity_for(ep))
            self.index.insert(ep, keys)
        else:
            self.index.discard(ep, keys)
        return True

    def count_routed(self, decision: Decision) -> None:
        """Count a decision in kvgate_prefix_* / kvgate_cache_aware_decisions (no registry: nothing)."""
        m = self._metrics
        if m is not None:
            url = decision.endpoint.url
            reason = self._decision_children.get(decision.reason)
            if reason is None:
                reason = m.decisions.labels(self.model, decision.reason)
                self._decision_children[decision.reason] = reason
            pod = self._pod_children.get(url)
            if pod is None:
                pod = self._pod_children[url] = (
                    m.prompt_tokens.labels(self.model, url), m.cached_tokens.labels(self.model, url)
                )
            reason.inc()
            pod[0].inc(decision.prompt_tokens)
            pod[1].inc(decision.cached_tokens)
            self._update_size_metrics()

    def _ensure_keys(self, state: RouteState) -> None:
        if state.keys_block_size == self.block_size:
            return
        keys: list[int] = []
        if state.prompt is not None:
            try:
                keys = block_keys(state.prompt.tokens, self.block_size, state.prompt.root)
            except ValueError:
                keys = []
        state.keys = keys
        state.keys_block_size = self.block_size

    def _learning_index(self) -> BlockIndex | None:
        """The index routing decisions are recorded in: the index itself, or precise mode's pending."""
        if self.mode == "approximate":
            return self.index
        return self.pending if self.config.pending_blocks else None

    def _capacity_for(self, ep: Endpoint) -> int:
        return self.config.capacity or ep.num_gpu_blocks or DEFAULT_CAPACITY

    # ---- pool lifecycle -----------------------------------------------------------------------

    async def start(self, endpoints: Sequence[Endpoint]) -> None:
        """Precise mode: subscribe to every endpoint's KV events (approximate: only note the pods)."""
        self._endpoints = list(endpoints)
        self._by_url = {ep.url: ep for ep in self._endpoints}
        if self.mode != "precise":
            return
        cfg = self.config
        self._subscriber = KVEventSubscriber(
            self, replay_timeout=cfg.replay_timeout, resync_interval=cfg.resync_interval or None
        )
        for ep in endpoints:
            await self._subscribe(ep, self._endpoints)

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        """Drop what removed pods held (and their subscriptions); subscribe added ones."""
        for ep in removed:
            tracker = self.trackers.pop(ep, None)
            keys = tracker.keys() if tracker is not None else None
            self.index.remove_pod(ep, keys)
            self.pending.remove_pod(ep)
            if self._subscriber is not None:
                self._spawn(self._subscriber.remove(ep))
        gone = set(removed)
        self._endpoints = [ep for ep in self._endpoints if ep not in gone] + list(added)
        self._by_url = {ep.url: ep for ep in self._endpoints}
        if self._subscriber is not None:
            for ep in added:
                self._spawn(self._subscribe(ep, self._endpoints))
        self._update_size_metrics()

    async def close(self) -> None:
        self.encoder.close()
        for t in list(self._tasks):
            t.cancel()
        if self._subscriber is not None:
            await self._subscriber.close()
            self._subscriber = None

    def track(self, ep: Endpoint) -> PodEventTracker:
        """Follow `ep` by its events: a tracker feeding the index (the subscriber calls `apply`)."""
        self.index.add_pod(ep)
        tracker = self.trackers[ep] = PodEventTracker(
            self.index, ep, self.model, self._accept_block_size, pending=self.pending
        )
        return tracker

    async def _subscribe(self, ep: Endpoint, pool: Sequence[Endpoint]) -> None:
        if not ep.kv_events or self._subscriber is None:
            return
        self.track(ep)
        await self._subscriber.add(event_source(ep, pool))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- KV-event sink (prefixindex.subscriber.EventSink) -------------------------------------

    def apply(self, pod: Hashable, batch: EventBatch) -> None:
        tracker = self.trackers.get(pod)  # type: ignore[call-overload]
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
        tracker = self.trackers.get(pod)  # type: ignore[call-overload]
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

    # ---- block size ---------------------------------------------------------------------------

    def _accept_block_size(self, size: int) -> bool:
        """Whether blocks of `size` tokens can be indexed. Unless one was configured, the first size a
        pod reports (scrape or event) is adopted, once: pods of mixed sizes need `block_size` set."""
        if size == self.block_size:
            self._block_size_settled = True
            return True
        if self.config.block_size is not None or self._block_size_settled or size <= 0:
            return False
        self._block_size_settled = True
        log.info(
            "prefix cache %s: block size %d learned from the pods (was %d)", self.model, size, self.block_size
        )
        self.block_size = size
        for ep in list(self.index.pods()):
            tracker = self.trackers.get(ep)  # type: ignore[call-overload]
            if tracker is not None:
                tracker.clear()
            else:
                self.index.clear_pod(ep)
        for ep in self.pending.pods():
            self.pending.clear_pod(ep)
        return True

    def _update_size_metrics(self) -> None:
        sizes = self._size_children
        if sizes is not None:
            sizes[0].set(len(self.index))
            sizes[1].set(self.index.entries)
            sizes[2].set(self.index.nbytes() + self.pending.nbytes())


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
