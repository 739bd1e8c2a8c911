"""Replica sync: gateway replicas behind one load balancer share what they route, through Redis.

Transport: Redis streams, `replicas.channel` for blocks (trimmed to about `history` entries) and
`<channel>:load` for load summaries (short: they expire anyway). Every replica appends its messages
(router/replicas/wire.py) and reads everyone's with one blocking XREAD of both on its own connection,
so a record reaches the others within a round trip; its own (same replica id) it skips.
A stream rather than pub/sub, because a reader resumes from the last entry it saw: a dropped
connection or a restarted Redis loses nothing that was appended, and a replica that (re)joins replays
the history kept (the recent routing of the whole fleet) into its index before it has routed anything.

What is shared:
- blocks: each `record`/`forget` of an approximate prefix index (the PrefixCache hands them to
  `routed`/`forgotten`) is queued; once per event-loop tick the tick's records go out as one message.
  Others apply them with `PrefixCache.learn_shared`, as if they had routed the request themselves.
- load: every `load_interval_s` each replica sends its per-pod summary (prefilling, decoding, prefill
  tokens, from its policies' `load_summary`); the others sum the summaries younger than `load_ttl_s`
  into `Endpoint.peer_load`, which cache_aware's TTFT ledger adds to its own count. A replica that
  stops sending stops counting after the TTL, so a dead replica's work never lingers.

Losing Redis never touches the request path: `routed` only appends to a list, and a tick's message
goes to a bounded queue (`queue`); while Redis is away, messages beyond it are dropped and counted,
the reader and writer retry with jittered exponential backoff, each replica keeps learning from its
own routing, and peer load expires into what the scrape reconciles (the behaviour of one replica).

Metrics: kvgate_replica_sync_{published,applied,dropped,skipped}_total, kvgate_replica_sync_connected,
kvgate_replica_sync_peers, kvgate_replica_sync_peer_in_flight{model,endpoint} and
kvgate_replica_sync_delay_seconds (from Redis appending a record to
this replica applying it, measured on Redis's clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from router.endpoint import Endpoint, PeerLoad
from router.prefix_cache import PrefixCache
from router.replicas import wire
from router.replicas.config import ReplicasConfig

log = logging.getLogger("kvgate.replicas")

FIELD = b"m"  # the stream entry's one field: the message
LOAD_HISTORY = 1000  # entries kept in the load stream (a joiner reads it from "now", never the past)
READ_BLOCK_MS = 1000  # a blocking XREAD returns at least this often (so a cancel is never stuck)
READ_COUNT = 512  # entries per XREAD
WRITE_BATCH = 64  # messages sent in one pipeline
DELAY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class LoadSource(Protocol):
    """A policy that counts its own work per pod (cache_aware's TTFT ledgers)."""

    def load_summary(self) -> Iterable[tuple[Endpoint, int, int, int]]:
        """(pod, prefilling, decoding, prefill_tokens) for every pod with work in flight."""


class ReplicaMetrics:
    """kvgate_replica_sync_*."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        kw: dict[str, Any] = {"registry": registry}
        self.published = Counter("kvgate_replica_sync_published",
                                 "Messages this replica appended to the shared Redis stream, by kind.",
                                 ["kind"], **kw)
        self.applied = Counter("kvgate_replica_sync_applied",
                               "Records of other replicas applied here (blocks: a routed or forgotten "
                               "prompt; load: one replica's summary).", ["kind"], **kw)
        self.dropped = Counter("kvgate_replica_sync_dropped",
                               "Messages not sent: queue_full (Redis away or slow), error (a failed send).",
                               ["reason"], **kw)
        self.skipped = Counter("kvgate_replica_sync_skipped",
                               "Records received and not applied: unknown_pod, block_size (another block "
                               "size), stale (a load summary older than load_ttl_s), malformed.",
                               ["reason"], **kw)
        self.connected = Gauge("kvgate_replica_sync_connected",
                               "1 while the last Redis command succeeded, else 0.", **kw)
        self.peers = Gauge("kvgate_replica_sync_peers",
                           "Other replicas whose load summary is younger than load_ttl_s.", **kw)
        self.peer_in_flight = Gauge("kvgate_replica_sync_peer_in_flight",
                                    "Requests the other replicas have in flight on each pod, summed.",
                                    ["model", "endpoint"], **kw)
        self.delay = Histogram("kvgate_replica_sync_delay_seconds",
                               "From Redis appending another replica's blocks message to applying it here.",
                               buckets=DELAY_BUCKETS, **kw)
        for kind in ("blocks", "load"):
            self.published.labels(kind)
            self.applied.labels(kind)
        for reason in ("queue_full", "error"):
            self.dropped.labels(reason)


class ReplicaSync:
    """One replica's end of the sync. See the module docstring. Owned by one event loop.

    Each argument is read when needed, so pools a config reload swaps in are followed:
    `caches()`: model -> that pool's PrefixCache (approximate ones publish and learn blocks; a new
    one is attached within a load interval); `load_sources()`: model -> the pool's policy when it
    counts its own work (LoadSource); `endpoints()`: every pod of every pool (peer load lands there).
    `client_factory(url, socket_timeout)` makes a redis.asyncio.Redis (tests may pass their own);
    `clock` (monotonic seconds) ages the peers' load summaries.
    """

    def __init__(
        self,
        config: ReplicasConfig,
        caches: Callable[[], Mapping[str, PrefixCache]],
        load_sources: Callable[[], Mapping[str, LoadSource]],
        endpoints: Callable[[], Iterable[Endpoint]],
        registry: CollectorRegistry | None = None,
        *,
        replica_id: int | None = None,
        client_factory: Callable[[str, float], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.replica_id = replica_id if replica_id is not None else random.getrandbits(64)
        self._caches = caches
        self._load_sources = load_sources
        self._endpoints = endpoints
        self.metrics = ReplicaMetrics(registry)
        self._factory = client_factory or _redis_client
        self._clock = clock  # ages the peers' load summaries
        self._tick: list[wire.BlockRecord] = []
        self._flush_scheduled = False
        self._outbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(config.queue)
        self._peers: dict[int, tuple[float, list[wire.LoadRecord]]] = {}  # replica -> (received, summary)
        self._offset_ms = 0.0  # local wall clock minus Redis's, measured at connect
        self._joined_ms = float("inf")  # Redis's clock at the first connect: older entries are history
        self._blocks_stream = config.channel
        self._load_stream = config.channel + ":load"
        # the entry read last per stream: blocks from the start (replay the history kept), load from
        # the Redis clock's "now" once known (None until then)
        self._last_ids: dict[str, bytes | str | None] = {self._blocks_stream: b"0-0", self._load_stream: None}
        self._tasks: list[asyncio.Task[None]] = []
        self._reader: Any = None
        self._writer: Any = None
        self.connected = False
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self) -> None:
        """Become the SharedLearning of every approximate prefix cache (new ones after a reload too)."""
        for cache in self._caches().values():
            if cache.mode == "approximate" and cache.shared is not self:
                cache.shared = self

    # ---- SharedLearning: called on the request path, never blocks -------------------------------

    def routed(self, model: str, pod: str, block_size: int, keys: Sequence[int]) -> None:
        self._queue(wire.BlockRecord(wire.OP_ROUTED, block_size, model, pod, list(keys)))

    def forgotten(self, model: str, pod: str, block_size: int, keys: Sequence[int]) -> None:
        self._queue(wire.BlockRecord(wire.OP_FORGOTTEN, block_size, model, pod, list(keys)))

    def _queue(self, record: wire.BlockRecord) -> None:
        if self._loop is None:  # not started (or closed): nothing to share with
            return
        self._tick.append(record)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_tick)

    def _flush_tick(self) -> None:
        self._flush_scheduled = False
        records, self._tick = self._tick, []
        if records:
            self._send("blocks", wire.encode_blocks(self.replica_id, records))

    def _send(self, kind: str, payload: bytes) -> None:
        try:
            self._outbox.put_nowait((kind, payload))
        except asyncio.QueueFull:
            self.metrics.dropped.labels("queue_full").inc()

    # ---- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start reading, writing and publishing load. Returns at once: Redis being away is not an
        error (the tasks keep retrying), so a replica starts and serves without it."""
        self._loop = asyncio.get_running_loop()
        self.attach()
        cfg = self.config
        self._reader = self._factory(cfg.redis_url, cfg.timeout_s + READ_BLOCK_MS / 1000)
        self._writer = self._factory(cfg.redis_url, cfg.timeout_s)
        for name, coro in (("replica reader", self._read_loop()), ("replica writer", self._write_loop()),
                           ("replica load", self._load_loop())):
            self._tasks.append(asyncio.create_task(coro, name=name))

    async def close(self) -> None:
        self._loop = None
        self._closing = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:  # a cancel the Redis client turned into an error still ends them (_closing)
            await asyncio.wait(self._tasks, timeout=5.0)
        self._tasks.clear()
        for client in (self._reader, self._writer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()
        for cache in self._caches().values():
            if cache.shared is self:
                cache.shared = None
        for ep in self._endpoints():
            ep.peer_load = None

    # ---- Redis ------------------------------------------------------------------------------------

    def _set_connected(self, up: bool) -> None:
        if up != self.connected:
            self.connected = up
            self.metrics.connected.set(1 if up else 0)
            if up:
                log.info("replica sync: connected to Redis (%s)", self.config.channel)
            else:
                log.warning("replica sync: Redis unavailable, routing on local learning until it is back")

    async def _backoff(self, failures: int) -> None:
        cfg = self.config
        delay = min(cfg.backoff_max_s, cfg.backoff_initial_s * 2 ** min(failures, 30))
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _read_loop(self) -> None:
        failures = 0
        last = self._last_ids
        clock_known = False
        while True:
            try:
                if not clock_known:  # on every (re)connection: Redis may be another server now
                    await self._measure_clock()
                    clock_known = True
                    self._set_connected(True)
                    if last[self._load_stream] is None:
                        self._joined_ms = time.time() * 1000 - self._offset_ms
                        last[self._load_stream] = f"{int(self._joined_ms)}-0"
                reply = await self._reader.xread(last, count=READ_COUNT, block=READ_BLOCK_MS)
                self._set_connected(True)
                failures = 0
                for name, entries in reply or ():
                    stream = name.decode() if isinstance(name, bytes) else name
                    for entry_id, fields in entries:
                        last[stream] = entry_id
                        payload = fields.get(FIELD)
                        if payload is not None:
                            self._receive(entry_id, payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any Redis or socket error: retry, never give up
                if self._closing:
                    return
                self._set_connected(False)
                clock_known = False
                log.debug("replica sync: read failed: %r", exc)
                await self._backoff(failures)
                failures += 1

    async def _measure_clock(self) -> None:
        before = time.time()
        seconds, micros = await self._reader.time()
        after = time.time()
        self._offset_ms = (before + after) / 2 * 1000 - (seconds * 1000 + micros / 1000)

    async def _write_loop(self) -> None:
        failures = 0
        where = {"blocks": (self._blocks_stream, self.config.history),
                 "load": (self._load_stream, LOAD_HISTORY)}
        while True:
            batch = [await self._outbox.get()]
            while len(batch) < WRITE_BATCH and not self._outbox.empty():
                batch.append(self._outbox.get_nowait())
            try:
                pipe = self._writer.pipeline(transaction=False)
                for kind, payload in batch:
                    stream, maxlen = where[kind]
                    pipe.xadd(stream, {FIELD: payload}, maxlen=maxlen, approximate=True)
                await pipe.execute()
                self._set_connected(True)
                failures = 0
                for kind, _payload in batch:
                    self.metrics.published.labels(kind).inc()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closing:
                    return
                self._set_connected(False)
                self.metrics.dropped.labels("error").inc(len(batch))
                log.debug("replica sync: write failed: %r", exc)
                await self._backoff(failures)
                failures += 1

    async def _load_loop(self) -> None:
        interval = self.config.load_interval_s
        while True:
            self.attach()
            self._publish_load()
            self.refresh_peer_load()
            await asyncio.sleep(interval)

    def _publish_load(self) -> None:
        if not self.connected:  # a summary queued through an outage would arrive stale as fresh
            return
        records = [
            wire.LoadRecord(model, ep.url, prefilling, decoding, tokens)
            for model, source in self._load_sources().items()
            for ep, prefilling, decoding, tokens in source.load_summary()
        ]
        self._send("load", wire.encode_load(self.replica_id, records))

    # ---- receiving --------------------------------------------------------------------------------

    def _receive(self, entry_id: bytes, payload: bytes) -> None:
        try:
            kind, replica = wire.header(payload)
        except wire.WireError:
            self.metrics.skipped.labels("malformed").inc()
            return
        if replica == self.replica_id:
            return
        entry_ms = _entry_ms(entry_id)
        age_s = (time.time() * 1000 - self._offset_ms - entry_ms) / 1000
        try:
            if kind == wire.KIND_BLOCKS:
                self._apply_blocks(payload)
                if entry_ms >= self._joined_ms - 1000:  # live, not the history replayed at join
                    self.metrics.delay.observe(max(0.0, age_s))
            elif age_s > self.config.load_ttl_s:  # a summary replayed from the history: long over
                self.metrics.skipped.labels("stale").inc()
            else:
                self._peers[replica] = (self._clock(), list(wire.decode_load(payload)))
                self.metrics.applied.labels("load").inc()
                self.refresh_peer_load()
        except wire.WireError:
            self.metrics.skipped.labels("malformed").inc()

    def _apply_blocks(self, payload: bytes) -> None:
        m = self.metrics
        caches = self._caches()
        for rec in wire.decode_blocks(payload):
            cache = caches.get(rec.model)
            if cache is None or not cache.learn_shared(rec.pod, rec.block_size, rec.keys,
                                                       rec.op == wire.OP_ROUTED):
                other_size = cache is not None and rec.block_size != cache.block_size
                m.skipped.labels("block_size" if other_size else "unknown_pod").inc()
                continue
            m.applied.labels("blocks").inc()

    def refresh_peer_load(self) -> None:
        """Sum the live peers' summaries onto the endpoints (expired peers dropped)."""
        cutoff = self._clock() - self.config.load_ttl_s
        for replica in [r for r, (at, _) in self._peers.items() if at < cutoff]:
            del self._peers[replica]
        self.metrics.peers.set(len(self._peers))
        sums: dict[tuple[str, str], list[int]] = {}
        for _at, records in self._peers.values():
            for r in records:
                acc = sums.setdefault((r.model, r.pod), [0, 0, 0])
                acc[0] += r.prefilling
                acc[1] += r.decoding
                acc[2] += r.prefill_tokens
        gauge = self.metrics.peer_in_flight
        for ep in self._endpoints():
            acc = sums.get((ep.model, ep.url))
            ep.peer_load = PeerLoad(*acc) if acc is not None else None  # None: the scrape alone decides
            gauge.labels(ep.model, ep.url).set(acc[0] + acc[1] if acc is not None else 0)


def _entry_ms(entry_id: bytes | str) -> float:
    """The millisecond part of a stream entry id (`<ms>-<seq>`, Redis's clock)."""
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    try:
        return float(raw.partition("-")[0])
    except ValueError:
        return 0.0


def _redis_client(url: str, socket_timeout: float) -> Any:
    """A redis.asyncio client that fails fast and does not retry on its own (the loops do)."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return aioredis.Redis.from_url(
        url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
        retry=Retry(NoBackoff(), 0), decode_responses=False,
    )  # fmt: skip


def require_client() -> None:
    """Raises ModuleNotFoundError (named `redis`) when the extra is not installed."""
    import redis.asyncio  # noqa: F401
