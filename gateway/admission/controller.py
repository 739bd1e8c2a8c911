"""Admission control: a request waits in the gateway while its pool is saturated, and is routed only
when it is dispatched (late binding: `pool.policy.pick` then sees the pods as they are at that moment).

Per request, in `admit(call)` (before anything is sent to a pod):

    /tokenize   and /detokenize pass at once (the pod's API server answers them, not its engine)
    tenant      from the API key or the x-kvgate-tenant header (gateway.admission.tenants)
    estimate    prompt tokens, uncached ones (best pod of the prefix index, when the pool has one) and
                expected output tokens (max_tokens, else admission.default_output_tokens)
    403         the tenant may not use the model / adapter, or the prompt is too long for it
    429         the tenant's requests or tokens per minute are spent (Retry-After: until they refill)
    direct      nothing queued and a slot free (gateway.admission.saturation): dispatched now
    429         otherwise, the tenant's or the total queue length or bytes is at its limit
    queued      in the pool's FairQueue until a slot frees (a request finishing, or the periodic
                recheck of load signals); 503 when its deadline comes first (config, or the
                x-kvgate-queue-timeout header, lower only); a client leaving is removed at once

A request that waited says how long in its answer's `x-kvgate-queue-wait` header (seconds).
`admit` returns a Ticket; the caller releases it when the request is over, which frees the slot and
dispatches the next queued request. On SIGTERM (`start_drain`) new requests get 503, queued ones keep
being dispatched as slots free, and those still waiting after the drain time get 503: every request
accepted is answered.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.admission import refusals
from gateway.admission.fair_queue import Entry, FairQueue
from gateway.admission.metrics import AdmissionMetrics
from gateway.admission.saturation import Saturation
from gateway.admission.tenants import Tenant, Tenants
from gateway.config import Admission, GatewayConfig
from gateway.errors import GatewayError
from gateway.pools import Pool, Pools
from prefixindex.prompt import PromptError, prompt_tokens
from prefixindex.tokenizer import Tokenizer, load_tokenizer
from router.policy import RouteRequest
from router.route_state import RouteState

log = logging.getLogger("kvgate.admission")

QUEUE_TIMEOUT_HEADER = "x-kvgate-queue-timeout"
QUEUE_WAIT_HEADER = "x-kvgate-queue-wait"  # on the answer to a request that waited: seconds, ms precision
_RATE_EWMA = 0.2
# Answered by a pod's API server without the engine: never queued behind generation
_ENGINE_FREE = frozenset({"/tokenize", "/detokenize"})
Clock = Callable[[], float]


class Admittable(Protocol):
    """What admission reads of a request: serve's ProxyCall, kvgate epp's EppRequest."""

    route: RouteRequest
    body: dict[str, Any] | None
    raw_body: bytes
    extra_headers: dict[str, str]

    @property
    def pool(self) -> Pool: ...


@dataclass(slots=True)
class Estimate:
    prompt_tokens: int
    uncached_tokens: int
    output_tokens: int

    @property
    def cost(self) -> float:
        return float(self.uncached_tokens + self.output_tokens)


class Lane:
    """One pool's admission state: its queue and the requests admitted and not yet finished."""

    def __init__(self, pool: Pool, adm: Admission, tokenizer_path: str | None) -> None:
        self.pool = pool
        self.queue = FairQueue(order=adm.order, aging_s=adm.aging_s)
        self.admitted = 0
        self.tokenizer_path = tokenizer_path
        self._tokenizer: Tokenizer | None = None
        self.dispatch_rate = 0.0  # queued requests dispatched per second (EWMA), for Retry-After
        self._last_dispatch = 0.0

    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def note_dispatch(self, now: float) -> None:
        if self._last_dispatch:
            gap = max(now - self._last_dispatch, 1e-3)
            self.dispatch_rate += _RATE_EWMA * (1.0 / gap - self.dispatch_rate)
        self._last_dispatch = now

    def drain_estimate_s(self, ahead: int) -> float:
        return ahead / self.dispatch_rate if self.dispatch_rate > 0 else 1.0


@dataclass(slots=True, eq=False)
class Ticket:
    """An admitted request's slot; `release` exactly once when the request is over (idempotent)."""

    controller: AdmissionController
    lane: Lane
    waited: float = 0.0  # seconds in the queue
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.lane.admitted -= 1
            self.controller.pump(self.lane)


class AdmissionController:
    """See the module docstring. Built once per app; `run()` is its background task."""

    def __init__(self, config: GatewayConfig, pools: Pools, registry: CollectorRegistry, *,
                 keys_checked: bool, clock: Clock = time.monotonic) -> None:
        adm = config.admission
        assert adm is not None
        self.config = adm
        self.clock = clock
        self.keys_checked = keys_checked
        self.tenants = Tenants(adm, clock())
        self.saturation = Saturation(adm)
        tokenizers = {spec.model: spec.tokenizer for spec in config.pools}
        self.lanes: dict[Pool, Lane] = {p: Lane(p, adm, tokenizers.get(p.model)) for p in pools}
        for lane in self.lanes.values():
            for t in self.tenants:
                lane.queue.flow(t.name, t.spec.weight, t.spec.priority)
        self.metrics = AdmissionMetrics(registry, self._depths, self._saturations)
        self.draining = False
        self._wake = asyncio.Event()
        self._drain_handle: asyncio.TimerHandle | None = None

    def pools_changed(self, pools: Pools, tokenizers: Mapping[str, str | None]) -> None:
        """A config reload changed the pools: lanes follow them by model, so a pool rebuilt with a new
        policy keeps its queue (requests queued before are routed by the pool they hold); a new pool
        gets a lane; a removed pool's lane is dropped (its admitted requests release into it)."""
        by_model = {lane.pool.model: lane for lane in self.lanes.values()}
        lanes: dict[Pool, Lane] = {}
        for pool in pools:
            lane = by_model.get(pool.model)
            if lane is None:
                lane = Lane(pool, self.config, tokenizers.get(pool.model))
                for t in self.tenants:
                    lane.queue.flow(t.name, t.spec.weight, t.spec.priority)
            elif lane.tokenizer_path != tokenizers.get(pool.model):
                lane.tokenizer_path, lane._tokenizer = tokenizers.get(pool.model), None
            lane.pool = pool
            lanes[pool] = lane
        self.lanes = lanes

    # ---- the request path ---------------------------------------------------------------------

    async def admit(self, call: Admittable) -> Ticket:
        """Admit `call` now or once its pool has room; raises GatewayError (403, 429, 503)."""
        lane = self.lanes[call.pool]
        if call.route.path in _ENGINE_FREE:
            return Ticket(self, lane, released=True)  # holds no slot: release does nothing
        headers = call.route.headers  # the client's headers (serve: request.headers; kvgate epp: Envoy's)
        tenant = self.tenants.resolve(headers, self.keys_checked)
        model = _model(call)
        est = self.estimate(call, lane, tenant, model)
        refusal = tenant.refusal(model, est.prompt_tokens)
        if refusal is not None:
            self.metrics.rejected(tenant.name, "forbidden").inc()
            raise refusals.forbidden(refusal)
        if self.draining:
            self.metrics.rejected(tenant.name, "shutting_down").inc()
            raise refusals.shutting_down()
        timeout = self.queue_timeout(headers, tenant)  # a bad header is a 400 even when nothing waits
        now = self.clock()
        if tenant.rate is not None:
            limited = tenant.rate.take(est.prompt_tokens + est.output_tokens, now)
            if limited is not None:
                kind, wait = limited
                self.metrics.rejected(tenant.name, f"rate_{kind}").inc()
                raise refusals.rate_limited(tenant.name, kind, wait)
        queue = lane.queue
        if not queue.length and self.saturation.free_slots(lane.pool, lane.admitted) > 0:
            queue.charge(tenant.name, est.cost)
            return self._dispatched(lane, tenant.name, tenant.spec.priority, est.cost, 0.0, "direct")
        nbytes = len(call.raw_body)
        self._check_room(lane, tenant, nbytes)
        if timeout <= 0:
            self.metrics.rejected(tenant.name, "queue_timeout").inc()
            raise refusals.queue_timeout(0.0)
        loop = asyncio.get_running_loop()
        entry = Entry(tenant.name, tenant.spec.priority, est.cost, nbytes, now, now + timeout,
                      waiter=loop.create_future(), route=call.route.state)
        queue.push(entry)
        timer = loop.call_later(timeout + 0.001, self._expire, lane)
        self._wake.set()
        self.pump(lane)
        try:
            ticket: Ticket = await entry.waiter
        except asyncio.CancelledError:
            if queue.remove(entry):
                self.metrics.rejected(tenant.name, "disconnected").inc()
            elif entry.waiter.done() and not entry.waiter.cancelled() and entry.waiter.exception() is None:
                entry.waiter.result().release()  # dispatched, but the client left before it ran
            raise
        finally:
            timer.cancel()
        call.extra_headers[QUEUE_WAIT_HEADER] = f"{ticket.waited:.3f}"
        return ticket

    def estimate(self, call: Admittable, lane: Lane, tenant: Tenant, model: str) -> Estimate:
        """The request's prompt, uncached and output tokens. With a prefix cache the prompt is read
        (once: the policy reuses it) and matched against the pool's pods; without one it is counted
        exactly only when a limit needs it, else estimated from the body size."""
        body = call.body or {}
        output = _output_tokens(body)
        if output is None:
            output = self.config.default_output_tokens
        route = call.route
        state = route.state
        cache = lane.pool.prefix_cache
        if cache is not None:
            cache.prepare(state, route)
            n = state.prompt_tokens
            cached = 0
            if state.keys:
                state.matched = cache.match(state.keys, lane.pool.endpoints)
                cached = max((state.cached_tokens(ep) for ep in state.matched), default=0)
            return Estimate(n, n - cached, output)
        if tenant.needs_exact_prompt(model):
            if state.counted_tokens is None:
                try:
                    state.counted_tokens = len(prompt_tokens(body, route.path, lane.tokenizer()))
                except (PromptError, TypeError, ValueError):
                    state.counted_tokens = 0
            n = state.counted_tokens
        else:
            n = len(call.raw_body) // 4
        return Estimate(n, n, output)

    def queue_timeout(self, headers: Mapping[str, str], tenant: Tenant) -> float:
        """The request's deadline in the queue: the tenant's or the default, lowered by the header."""
        limit = tenant.spec.queue_timeout_s
        if limit is None:
            limit = self.config.queue_timeout_s
        raw = headers.get(QUEUE_TIMEOUT_HEADER)
        if raw is None:
            return limit
        try:
            asked = float(raw)
        except ValueError:
            raise refusals.bad_queue_timeout(raw) from None
        if not math.isfinite(asked) or asked < 0:
            raise refusals.bad_queue_timeout(raw)
        return min(asked, limit, self.config.max_queue_timeout_s)

    def _check_room(self, lane: Lane, tenant: Tenant, nbytes: int) -> None:
        """429 when queueing this request would exceed a queue limit (the tenant's, then the total)."""
        spec, adm = tenant.spec, self.config
        flow = lane.queue.flows[tenant.name]
        total_len = sum(lq.queue.length for lq in self.lanes.values())
        total_bytes = sum(lq.queue.nbytes for lq in self.lanes.values())
        checks = (
            (spec.max_queued is not None and len(flow.entries) + 1 > spec.max_queued, "tenant requests"),
            (spec.max_queued_bytes is not None and flow.nbytes + nbytes > spec.max_queued_bytes,
             "tenant bytes"),
            (total_len + 1 > adm.max_queued, "total requests"),
            (total_bytes + nbytes > adm.max_queued_bytes, "total bytes"),
        )
        for over, what in checks:
            if over:
                reason = "queue_bytes" if what.endswith("bytes") else "queue_full"
                self.metrics.rejected(tenant.name, reason).inc()
                raise refusals.queue_full(tenant.name, what, lane.drain_estimate_s(len(flow.entries) + 1))

    # ---- dispatch -----------------------------------------------------------------------------

    def pump(self, lane: Lane) -> None:
        """Dispatch queued requests of `lane` while its pool has free slots."""
        queue = lane.queue
        prefer: Callable[[Entry], float] | None = None
        while queue.length and self.saturation.free_slots(lane.pool, lane.admitted) > 0:
            now = self.clock()
            if prefer is None and lane.pool.prefix_cache is not None and self.config.affinity_window > 1:
                prefer = self._affinity(lane)
            entry = queue.pop(now, prefer, self.config.affinity_window)
            if entry is None:
                return
            waiter = entry.waiter
            if waiter.done():  # the client left; its task removes nothing more
                continue
            if entry.deadline <= now:
                self._answer(entry, refusals.queue_timeout(now - entry.enqueued), "queue_timeout")
                continue
            lane.note_dispatch(now)
            waiter.set_result(self._dispatched(lane, entry.flow, entry.priority, entry.cost,
                                               now - entry.enqueued, "queued"))

    def _affinity(self, lane: Lane) -> Callable[[Entry], float]:
        """An entry's score for `FairQueue.pop`: its prompt tokens cached on the pool's pods that have a
        free slot now (matched afresh: the index learned while it waited)."""
        cache = lane.pool.prefix_cache
        assert cache is not None
        free = list(self.saturation.free_pods(lane.pool))

        def cached_on_free_pods(entry: Entry) -> float:
            state: RouteState | None = entry.route
            if state is None or not state.keys or not free:
                return 0.0
            held = cache.match(state.keys, free)
            return float(state.tokens_of_blocks(max(held.values()))) if held else 0.0

        return cached_on_free_pods

    def _dispatched(self, lane: Lane, tenant: str, priority: int, cost: float, waited: float,
                    path: str) -> Ticket:
        lane.admitted += 1
        m = self.metrics
        m.admitted(tenant, path).inc()
        m.wait(tenant, str(priority)).observe(waited)
        m.dispatched_cost(tenant).inc(cost)
        return Ticket(self, lane, waited)

    def _expire(self, lane: Lane) -> None:
        now = self.clock()
        for entry in lane.queue.expired(now):
            self._answer(entry, refusals.queue_timeout(now - entry.enqueued), "queue_timeout")

    def _answer(self, entry: Entry, error: GatewayError, reason: str) -> None:
        if not entry.waiter.done():
            entry.waiter.set_exception(error)
            self.metrics.rejected(entry.flow, reason).inc()

    async def run(self) -> None:
        """Background: while anything waits, re-read the load signals every recheck_interval_s (scrapes,
        health changes and deadlines move without a request finishing)."""
        interval = self.config.recheck_interval_s
        while True:
            await self._wake.wait()
            await asyncio.sleep(interval)
            waiting = False
            for lane in self.lanes.values():
                if lane.queue.length:
                    self._expire(lane)
                    self.pump(lane)
                    waiting = waiting or bool(lane.queue.length)
            if not waiting:
                self._wake.clear()

    # ---- shutdown -----------------------------------------------------------------------------

    def start_drain(self, grace_s: float) -> None:
        """SIGTERM: refuse new requests, dispatch queued ones as slots free, and answer 503 to those
        still waiting after `grace_s`."""
        if self.draining:
            return
        self.draining = True
        queued = sum(lane.queue.length for lane in self.lanes.values())
        log.info("admission: draining %d queued request(s), at most %.1f s", queued, grace_s)
        self._drain_handle = asyncio.get_running_loop().call_later(grace_s, self.answer_all_queued)

    def answer_all_queued(self) -> None:
        for lane in self.lanes.values():
            for entry in list(lane.queue.entries()):
                lane.queue.remove(entry)
                self._answer(entry, refusals.shutting_down(), "shutting_down")

    def close(self) -> None:
        if self._drain_handle is not None:
            self._drain_handle.cancel()
        self.answer_all_queued()

    # ---- metrics readers ----------------------------------------------------------------------

    def _depths(self) -> Iterator[tuple[str, str, int, int]]:
        for pool, lane in self.lanes.items():
            for flow in lane.queue.flows.values():
                yield pool.model, flow.name, flow.priority, len(flow.entries)

    def _saturations(self) -> Iterator[tuple[str, bool, int]]:
        for pool, lane in self.lanes.items():
            free = self.saturation.free_slots(pool, lane.admitted)
            yield pool.model, free <= 0, free


ADMISSION = web.AppKey("kvgate_admission", AdmissionController)


def _model(call: Admittable) -> str:
    model = call.body.get("model") if call.body else None
    return model if isinstance(model, str) else call.pool.model


def _output_tokens(body: Mapping[str, Any]) -> int | None:
    n = body.get("max_completion_tokens", body.get("max_tokens"))
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None
