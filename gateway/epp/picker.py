"""The endpoint picker's core, free of gRPC and protobuf: what `kvgate serve` does per request, with
Envoy carrying the bytes.

One `EppRequest` per ext_proc stream (one HTTP request through Envoy), called in this order:

    request_headers(pairs)     target checked (gateway.target), API key (gateway.auth), request id
    local_answer()             /health, /ready, /metrics, /v1/models: answered here, as serve does
    await pick(body)           body limit and decoding, JSON and field types, pool by model (aliases),
                               admission (may wait), policy pick over the pool's candidates, in-flight
                               counts and policy on_routed -> `Pick` (the pod first, then fallbacks)
    response_headers(status, served)
                               the pod Envoy reached: when it is a fallback (Envoy retried), the
                               picked pod's attempt ends failed and one on the served pod begins
    response_body(eos)         the first chunk is the first byte (on_first_byte, TTFT); end of stream
                               ends the attempt (on_finished ok, in-flight counts restored)
    close()                    always, last: an attempt still open (Envoy closed the stream: client
                               gone, pod failed mid-answer) ends failed; the admission slot is freed

Every step that refuses raises `GatewayError`, which the caller answers as an ImmediateResponse with
the same OpenAI-shaped body and status serve would send.

Routing equals serve's: the same `Pool.candidates`, `policy.pick`, hooks and ledger. What differs is
retries: serve picks again after a failed attempt; here Envoy walks the ordered list this returns (the
policy's pick, then up to `fallbacks` other candidates, most cached prefix first, then least loaded:
picking again would advance stateful policies such as round robin), and the response says which pod
answered. P/D disaggregation needs two upstream requests and stays with `kvgate serve`: a P/D pool is
routed over its decode pods, which then prefill themselves.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from multidict import CIMultiDict
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from yarl import URL

from gateway import errors
from gateway.admission.controller import AdmissionController, Ticket
from gateway.auth import OPEN_PATHS, key_matches
from gateway.handlers import model_list, resolve_alias, select_pool
from gateway.pools import Pool
from gateway.proxy import X_CACHED_TOKENS, X_ENDPOINT, X_REQUEST_ID, charged_tokens
from gateway.rejections import Rejections
from gateway.request_body import content_codings, decode_body, parse_body
from gateway.state import GatewayState
from gateway.target import Target, resolve_target
from router.endpoint import Endpoint
from router.policy import Decision, RouteRequest

log = logging.getLogger("kvgate.epp")

# The Endpoint Picker Protocol's names (gateway-api-inference-extension, proposal 004).
DESTINATION_HEADER = "x-gateway-destination-endpoint"
METADATA_NAMESPACE = "envoy.lb"
SERVED_KEY = "x-gateway-destination-endpoint-served"
_USABLE_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
# Request headers the pod must not get as the client sent them once the body was rewritten.
_BODY_HEADERS = ("content-encoding",)


@dataclass(slots=True)
class Pick:
    """Where Envoy sends the request: `endpoints` as host:port, the pick first, then fallbacks;
    headers to set and remove on the upstream request; `body` the bytes to send instead of the
    client's (decoded, alias resolved), None to send the client's unchanged."""

    endpoints: list[str]
    set_headers: dict[str, str]
    remove_headers: list[str]
    body: bytes | None = None

    @property
    def destination(self) -> str:
        return ",".join(self.endpoints)


@dataclass(slots=True)
class Answer:
    """A response the picker gives itself (Envoy sends it to the client; no pod is involved)."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


class Addresses:
    """host:port of each endpoint as Envoy's override-host policy needs it (an IP and a port). A URL
    naming an IP is used as it is; a host name is resolved in the background (`resolve`), so a pick
    never waits on DNS."""

    def __init__(self) -> None:
        self._resolved: dict[str, str] = {}  # host name -> first address it resolved to
        self._literal: dict[str, str | None] = {}  # URL naming an IP (or no port: None) -> host:port

    def of(self, ep: Endpoint) -> str | None:
        known = self._literal.get(ep.url, "")
        if known != "":
            return known
        if len(self._literal) > 4096:  # pods come and go (discovery): forget the ones gone, now and then
            self._literal.clear()
        url = URL(ep.url)
        host, port = url.host or "", url.port
        if port is None:
            self._literal[ep.url] = None
            return None
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            resolved = self._resolved.get(host)
            return None if resolved is None else _host_port(resolved, port)
        address = self._literal[ep.url] = _host_port(str(ip), port)
        return address

    async def resolve(self, endpoints: Iterable[Endpoint]) -> None:
        loop = asyncio.get_running_loop()
        for ep in endpoints:
            host = URL(ep.url).host or ""
            try:
                ipaddress.ip_address(host)
                continue
            except ValueError:
                pass
            try:
                infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("epp: cannot resolve %s (%s): it is not picked until it resolves", host, exc)
                continue
            if infos:
                self._resolved[host] = str(infos[0][4][0])


def _host_port(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class Picker:
    """Shared by every stream: the gateway's state (pools, policies, health, metrics), admission
    control when configured, the refusal counter, and endpoint addresses."""

    def __init__(self, state: GatewayState, rejections: Rejections, *,
                 admission: AdmissionController | None = None, fallbacks: int = 2,
                 addresses: Addresses | None = None) -> None:
        self.state = state
        self.rejections = rejections
        self.admission = admission
        self.fallbacks = fallbacks
        self.addresses = addresses or Addresses()

    def open(self) -> EppRequest:
        return EppRequest(self, time.perf_counter())

    def refused(self, exc: errors.GatewayError) -> None:
        """Count a request the picker answered with an error (as serve's middleware does)."""
        if exc.status < 500:
            self.rejections.count(exc.reason)
        self.state.metrics.requests("", "", str(exc.status)).inc()


@dataclass(slots=True, eq=False)
class EppRequest:
    """One request through Envoy; see the module docstring for the order of calls.

    Its `pool`, `route`, `body`, `raw_body` and `extra_headers` are what admission control reads of a
    call, as of serve's ProxyCall."""

    picker: Picker
    arrival: float  # time.perf_counter() when the request headers arrived
    method: str = ""
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    request_id: str = ""
    target: Target | None = None
    raw_path: str = ""
    # ---- set by pick() ----
    pool: Pool | None = None
    route: RouteRequest | None = None
    body: dict[str, Any] | None = None
    raw_body: bytes = b""
    extra_headers: dict[str, str] = field(default_factory=dict)  # added to the client's response
    ticket: Ticket | None = None
    decision: Decision | None = None  # the attempt open now (charged, not yet discharged)
    listed: dict[str, Endpoint] = field(default_factory=dict)  # address -> endpoint, as sent to Envoy
    # ---- the answer ----
    status: int = 0  # the pod's status; 0 until response headers arrived
    served_by: Endpoint | None = None
    first_byte_at: float = 0.0
    finished: bool = False

    # ---- request path -------------------------------------------------------------------------

    def request_headers(self, pairs: Iterable[tuple[str, str]]) -> None:
        """The request's headers as Envoy sends them (lower-case names, pseudo-headers included).
        Raises GatewayError for a target serve refuses, or a missing or wrong API key."""
        headers = self.headers
        for name, value in pairs:
            if name.startswith(":"):
                if name == ":method":
                    self.method = value
                elif name == ":path":
                    self.raw_path = value
            else:
                headers.add(name, value)
        client_id = headers.get(X_REQUEST_ID, "")
        self.request_id = client_id if _USABLE_REQUEST_ID.fullmatch(client_id) else uuid.uuid4().hex
        self.target = target = resolve_target(self.method, self.raw_path)
        keys = self.picker.state.api_keys
        if keys and target.path not in OPEN_PATHS:
            scheme, _, token = headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not key_matches(token.strip().encode(), keys):
                raise errors.unauthorized()

    def local_answer(self) -> Answer | None:
        """The answer to a route the gateway serves itself (not proxied); None for a proxied one."""
        assert self.target is not None
        state = self.picker.state
        kind = self.target.kind
        if kind == "proxy":
            return None
        if kind == "models":
            return Answer(200, orjson.dumps(model_list(state)))
        if kind == "health":
            return Answer(200, b"", "text/plain")
        if kind == "ready":
            healthy = sum(1 for ep in state.pools.endpoints() if ep.healthy)
            body = orjson.dumps({"ready": healthy > 0, "healthy_endpoints": healthy})
            return Answer(200 if healthy else 503, body)
        return Answer(200, generate_latest(state.metrics.registry), CONTENT_TYPE_LATEST)

    async def pick(self, raw: bytes) -> Pick:
        """Pick the pod for a proxied request whose whole body is `raw`; GatewayError otherwise (400,
        404, 413, 415; 403/429/503 from admission; 503 when the pool has no pod to take it)."""
        picker = self.picker
        state = picker.state
        config = state.config  # read per request: a reload (gateway/reload.py) may replace it
        assert self.target is not None
        path = self.target.path
        limit = config.limits.max_body_bytes
        if len(raw) > limit:
            raise errors.body_too_large(limit)
        codings = content_codings(self.headers.getall("Content-Encoding", ()))
        decoded = decode_body(raw, codings, limit) if codings and raw else raw
        body = self.body = parse_body(decoded, path)
        self.raw_body = decoded
        pool = self.pool = select_pool(state.pools, body)
        aliased = body is not None and resolve_alias(state.pools, body)
        route = self.route = RouteRequest(
            request_id=self.request_id, model=pool.model, path=path, body=body or {}, headers=self.headers
        )
        if pool.prefix_cache is not None:  # tokenized off the event loop, once, as serve does
            await pool.prefix_cache.read_prompt(route.state, route)
        if picker.admission is not None:
            self.ticket = await picker.admission.admit(self)  # may wait; routed once admitted
        candidates, panic = pool.candidates([], config.health.panic_threshold)
        candidates = [ep for ep in candidates if picker.addresses.of(ep) is not None]
        if not candidates:
            raise errors.no_healthy_endpoint(pool.model)
        if panic:
            state.metrics.panic_routing(pool.model).inc()
        decision = pool.policy.pick(route, candidates)
        state.metrics.decisions(pool.policy_name, decision.reason).inc()
        self._charge(decision)
        chosen = [decision.endpoint, *self._fallbacks(decision.endpoint, candidates)]
        self.listed = {picker.addresses.of(ep) or "": ep for ep in chosen}
        set_headers = {DESTINATION_HEADER: ",".join(self.listed), X_REQUEST_ID: self.request_id}
        canonical = self.target.encoded + (f"?{self.target.query}" if self.target.query else "")
        if canonical != self.raw_path:
            set_headers[":path"] = canonical  # the checked route, re-encoded, as serve sends it
        remove = ["authorization"] if state.api_keys else []
        new_body = None
        if aliased or codings:
            new_body = orjson.dumps(body) if aliased else decoded
            set_headers["content-length"] = str(len(new_body))
            remove += _BODY_HEADERS
        return Pick(list(self.listed), set_headers, remove, new_body)

    def _fallbacks(self, picked: Endpoint, candidates: list[Endpoint]) -> list[Endpoint]:
        """Where Envoy goes if `picked` fails before answering: other candidates, the most cached
        prefix first (the latest match), then the least loaded."""
        if self.picker.fallbacks <= 0:
            return []
        assert self.route is not None
        matched = self.route.state.matched
        others = [ep for ep in candidates if ep is not picked]
        others.sort(key=lambda ep: (-matched.get(ep, 0), ep.in_flight, ep.in_flight_tokens))
        return others[: self.picker.fallbacks]

    # ---- response path ------------------------------------------------------------------------

    def response_headers(self, status: int, served: str | None, end_of_stream: bool) -> dict[str, str]:
        """The answer's status and the pod that sent it (host:port, None when Envoy did not say);
        returns the headers to add to the client's response (serve's x-kvgate-* and request id)."""
        self.status = status
        decision = self.decision
        if decision is None:
            return {}
        ep = self.listed.get(served) if served else None
        if ep is None and served:
            ep = self._endpoint_at(served)
        if ep is not None and ep is not decision.endpoint:
            self._failed_over(decision, ep)
            decision = self.decision
            assert decision is not None
        self.served_by = decision.endpoint
        health = self.picker.state.health
        if status in self.picker.state.config.retries.on_status:  # the pod's, or Envoy's after a
            health.attempt_failed(decision.endpoint, f"status_{status}")  # failed connect: as serve
        else:
            health.attempt_succeeded(decision.endpoint)
        added = {X_ENDPOINT: decision.endpoint.url, X_REQUEST_ID: self.request_id,
                 X_CACHED_TOKENS: str(decision.cached_tokens), **self.extra_headers}
        if end_of_stream:
            self._first_byte()
            self._finish(True)
        return added

    def response_body(self, end_of_stream: bool) -> None:
        """A chunk of the answer passed through Envoy (its bytes are not needed here)."""
        if not self.first_byte_at:
            self._first_byte()
        if end_of_stream:
            self._finish(True)

    def response_trailers(self) -> None:
        if not self.first_byte_at:
            self._first_byte()
        self._finish(True)

    def close(self) -> None:
        """The stream ended: an attempt still open ended failed, the request is counted as 499 (the
        client left or Envoy cut the answer: the picker cannot tell which), its admission slot freed.
        Idempotent."""
        if not self.finished and self.decision is not None:
            self.status = 499
            self._finish(False)
        if self.ticket is not None:
            self.ticket.release()

    # ---- bookkeeping (as serve's ProxyCall.charge / discharge and Proxy.attempt_and_relay) -----

    def _charge(self, decision: Decision) -> None:
        assert self.route is not None and self.pool is not None
        decision.sent_at = now = time.perf_counter()
        state = self.route.state
        if not state.dispatched_at:
            state.dispatched_at = now
        self.pool.policy.on_routed(self.route, decision)
        ep = decision.endpoint
        ep.in_flight += 1
        ep.in_flight_tokens += charged_tokens(decision)
        self.decision = decision

    def _discharge(self, decision: Decision, ok: bool) -> None:
        assert self.route is not None and self.pool is not None
        ep = decision.endpoint
        ep.in_flight -= 1
        ep.in_flight_tokens -= charged_tokens(decision)
        self.pool.policy.on_finished(self.route, decision, ok)
        self.decision = None

    def _failed_over(self, failed: Decision, served: Endpoint) -> None:
        """Envoy retried: `failed` ended without an answer; the request goes on as an attempt on
        `served` (the prefix it teaches the index moves with it)."""
        assert self.route is not None and self.pool is not None
        metrics = self.picker.state.metrics
        self.picker.state.health.attempt_failed(failed.endpoint, "envoy_retry")
        self._discharge(failed, False)
        metrics.retries(self.pool.model).inc()
        state = self.route.state
        decision = Decision(served, "envoy_fallback", cached_tokens=state.cached_tokens(served),
                            prompt_tokens=state.prompt_tokens)
        metrics.decisions(self.pool.policy_name, decision.reason).inc()
        self._charge(decision)

    def _endpoint_at(self, address: str) -> Endpoint | None:
        assert self.pool is not None
        of = self.picker.addresses.of
        return next((ep for ep in self.pool.endpoints if of(ep) == address), None)

    def _first_byte(self) -> None:
        decision = self.decision
        self.first_byte_at = now = time.perf_counter()
        if decision is None or not 200 <= self.status < 300:
            return
        assert self.route is not None and self.pool is not None
        self.pool.policy.on_first_byte(self.route, decision, now - decision.sent_at)
        self.picker.state.metrics.ttft(self.pool.model).observe(now - self.arrival)

    def _finish(self, completed: bool) -> None:
        if self.finished:
            return
        self.finished = True
        decision = self.decision
        if decision is not None:
            self._discharge(decision, completed and 200 <= self.status < 300)
        assert self.pool is not None
        metrics = self.picker.state.metrics
        served = self.served_by.url if self.served_by is not None else ""
        metrics.requests(self.pool.model, served, str(self.status)).inc()
        metrics.latency(self.pool.model).observe(time.perf_counter() - self.arrival)
