"""The proxy path: route, send, retry before the first byte, relay chunk by chunk.

Read top-down, one concern per step (STYLE.md, httpx):

    Proxy.forward(call)                      route + retry loop; GatewayError when nothing answered
      -> Proxy.attempt_and_relay(call, d)    one attempt's bookkeeping: policy hooks, in-flight counts
           -> Proxy.attempt(call, d)         send upstream, wait for headers and the first chunk
           -> Proxy.relay(call, d, reply)    stream the answer to the client as it arrives

`Proxy.attempt` is an attribute holding `send_upstream`: a prefill/decode flow wraps it (send the
prefill, then the decode carrying its kv_transfer_params) without touching retries, bookkeeping or
relaying. An attempt raises `RetryableFailure` only while nothing has reached the client, so a retry
never duplicates output.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import errors
from gateway.access_log import AnswerTally
from gateway.answer_check import answer_problem
from gateway.config import GatewayConfig
from gateway.errors import GatewayError
from gateway.health import HealthTracker
from gateway.metrics import GatewayMetrics
from gateway.pools import Pool
from gateway.target import TARGET_KEY
from gateway.tracing import TRACE_KEY, RequestTrace
from router.endpoint import Endpoint
from router.policy import Decision, RouteRequest

log = logging.getLogger("kvgate.proxy")

X_ENDPOINT = "x-kvgate-endpoint"
X_CACHED_TOKENS = "x-kvgate-cached-tokens"
X_REQUEST_ID = "X-Request-Id"

# RFC 9110 section 7.6.1 connection-specific headers, plus the de-facto Proxy-Connection.
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
        "te", "trailer", "transfer-encoding", "upgrade",
    }
)  # fmt: skip
# Set by the client library for the upstream request itself (Content-Length of the bytes sent, which
# are decoded: no Content-Encoding), answered by the gateway (Expect), or rebuilt (forwarding headers).
_NOT_FORWARDED_UP = HOP_BY_HOP | {
    "host", "content-length", "content-encoding", "expect", "x-request-id", "x-forwarded-for", "forwarded",
}  # fmt: skip
_NOT_FORWARDED_UP_AUTH = _NOT_FORWARDED_UP | {"authorization"}  # the gateway checked the client's key


class RetryableFailure(Exception):
    """An attempt failed before any byte reached the client; `kind` labels kvgate_upstream_errors."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


@dataclass(slots=True, eq=False)
class ProxyCall:
    """One client request on its way through the gateway."""

    request: web.Request
    route: RouteRequest
    pool: Pool
    body: dict[str, Any] | None  # parsed JSON body (None when the request had none)
    raw_body: bytes
    arrival: float  # time.perf_counter() when the request arrived
    upstream_headers: CIMultiDict[str]
    body_changed: bool = False  # set by whoever edits `body`; the original bytes are sent otherwise
    tried: list[Endpoint] = field(default_factory=list)
    status: int = 0  # status sent to the client; 499 when the client went away
    served_by: Endpoint | None = None
    extra_headers: dict[str, str] = field(default_factory=dict)  # added to the client's response
    # ---- what the access log and the trace report (gateway.access_log, gateway.tracing) ----
    tenant: str = ""  # the admission tenant, when admission control resolved one
    decision: Decision | None = None  # the latest pick
    prefill_by: Endpoint | None = None  # P/D: the prefill pod of the attempt that answered
    first_byte_at: float = 0.0  # time.perf_counter() when the answer's first byte was relayed
    tally: AnswerTally | None = None  # the relayed answer's events and tail (access log on)
    trace: RequestTrace | None = None  # tracing on

    def upstream_body(self) -> bytes:
        if self.body_changed and self.body is not None:
            return orjson.dumps(self.body)
        return self.raw_body

    def charge(self, decision: Decision) -> None:
        """An attempt on `decision.endpoint` starts: its send time stamped (`decision.sent_at`, and the
        request's `dispatched_at` on its first attempt), policy on_routed, then one more request and its
        uncached prompt tokens in flight there. Pair with `discharge` in a finally block."""
        decision.sent_at = now = time.perf_counter()
        if not self.route.state.dispatched_at:
            self.route.state.dispatched_at = now
        self.pool.policy.on_routed(self.route, decision)
        ep = decision.endpoint
        ep.in_flight += 1
        ep.in_flight_tokens += charged_tokens(decision)

    def discharge(self, decision: Decision, ok: bool) -> None:
        """The attempt ended (any way at all): in-flight counts restored, then policy on_finished."""
        ep = decision.endpoint
        ep.in_flight -= 1
        ep.in_flight_tokens -= charged_tokens(decision)
        self.pool.policy.on_finished(self.route, decision, ok)


def charged_tokens(decision: Decision) -> int:
    """The prefill work an attempt adds to its endpoint's in_flight_tokens: the uncached prompt tokens
    the policy predicted (0 when it predicted nothing)."""
    return max(0, decision.prompt_tokens - decision.cached_tokens)


@dataclass(slots=True)
class UpstreamReply:
    """A pod's answer whose status, headers and first chunk arrived; nothing sent to the client yet."""

    response: aiohttp.ClientResponse
    first_chunk: bytes


Attempt = Callable[[ProxyCall, Decision], Awaitable[UpstreamReply]]


def upstream_headers(
    request: web.Request, request_id: str, *, drop_authorization: bool, forwarded: str = "append"
) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop ones (and those its Connection header names), with
    X-Forwarded-For and Forwarded per `forwarded` (config.Forwarded: append, replace, off)."""
    drop = _NOT_FORWARDED_UP_AUTH if drop_authorization else _NOT_FORWARDED_UP
    drop = drop | connection_tokens(request.headers)
    headers: CIMultiDict[str] = CIMultiDict(
        (k, v) for k, v in request.headers.items() if k.lower() not in drop
    )
    headers[X_REQUEST_ID] = request_id
    if request.body_exists and "Content-Type" not in headers:
        headers["Content-Type"] = "application/json"  # the body parsed as JSON, whatever the client said
    if forwarded != "off":
        peer = request.remote or "unknown"
        earlier = forwarded == "append"
        xff = request.headers.getall("X-Forwarded-For", []) if earlier else []
        headers["X-Forwarded-For"] = ", ".join([*xff, peer])
        fwd = request.headers.getall("Forwarded", []) if earlier else []
        headers["Forwarded"] = ", ".join([*fwd, f"for={_forwarded_node(peer)};proto={request.scheme}"])
    return headers


def connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    """The header names a message's Connection header(s) declare hop-by-hop (RFC 9110 section 7.6.1)."""
    values = headers.getall("Connection", [])
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())


def _forwarded_node(peer: str) -> str:
    """A `for=` node of RFC 7239: IPv6 addresses bracketed and quoted."""
    return f'"[{peer}]"' if ":" in peer else peer


class Proxy:
    """Forwards calls to their pool's endpoints. Holds no per-request state."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        config: GatewayConfig,
        metrics: GatewayMetrics,
        health: HealthTracker,
    ) -> None:
        self.session = session
        self.max_retries = config.retries.max_retries
        self.retry_statuses = frozenset(config.retries.on_status)
        self.panic_threshold = config.health.panic_threshold
        self.tally_answers = config.logs.access
        self.tracing = config.tracing.enabled
        self.metrics = metrics
        self.health = health
        self.attempt: Attempt = self.send_upstream

    async def forward(self, call: ProxyCall) -> web.StreamResponse:
        """Pick, attempt, and on a RetryableFailure try another healthy, untried endpoint (any untried
        endpoint while the pool is in panic mode, see Pool.candidates).

        503 when no endpoint could be tried at all, 502 when every attempt failed before answering.
        """
        pool = call.pool
        failure: RetryableFailure | None = None
        if self.tracing:
            call.trace = call.request.get(TRACE_KEY)
        for attempt_no in range(self.max_retries + 1):
            candidates, panic = pool.candidates(call.tried, self.panic_threshold)
            if not candidates:
                break
            if panic:
                self.metrics.panic_routing(pool.model).inc()
            picked_ns = time.time_ns() if call.trace is not None else 0
            decision = call.decision = pool.policy.pick(call.route, candidates)
            if call.trace is not None:
                call.trace.routed(picked_ns, decision, pool.policy_name, attempt_no, panic)
            self.metrics.decisions(pool.policy_name, decision.reason).inc()
            call.tried.append(decision.endpoint)
            if attempt_no:
                self.metrics.retries(pool.model).inc()
            try:
                return await self.attempt_and_relay(call, decision)
            except RetryableFailure as exc:
                failure = exc
                log.info("request %s: attempt failed (%s)", call.route.request_id, exc)
        if failure is None:
            raise errors.no_healthy_endpoint(pool.model)
        raise errors.upstream_failed(f"{len(call.tried)} attempt(s), last: {failure}")

    async def attempt_and_relay(self, call: ProxyCall, decision: Decision) -> web.StreamResponse:
        """One attempt with exact bookkeeping: on_routed and on_finished once each (on_first_byte once
        when a 2xx answer's first chunk arrived), in-flight counts restored on every exit (success,
        failure, client disconnect, cancellation)."""
        ep = decision.endpoint
        if call.trace is not None:
            call.trace.start_attempt(ep, len(call.tried) - 1, call.upstream_headers)
        call.charge(decision)
        ok = False
        error: BaseException | None = None
        try:
            reply = await self.attempt(call, decision)
            if 200 <= reply.response.status < 300:
                decision.first_byte_at = first = time.perf_counter()
                call.pool.policy.on_first_byte(call.route, decision, first - decision.sent_at)
            call.served_by = ep
            self.health.attempt_succeeded(ep)
            response, completed = await self.relay(call, decision, reply)
            ok = completed and 200 <= reply.response.status < 300
            return response
        except BaseException as exc:
            error = exc
            raise
        finally:
            call.discharge(decision, ok)
            if call.trace is not None:
                call.trace.end_attempt(call.status, ok, error)

    async def send_upstream(self, call: ProxyCall, decision: Decision) -> UpstreamReply:
        """Send the call to the decision's endpoint; return once its first chunk arrived.

        Raises RetryableFailure (connect error, reset, a retryable status, death before the first
        chunk) or GatewayError 504 (the pod accepted the request but stayed silent too long).
        """
        ep = decision.endpoint
        request = call.request
        target = request[TARGET_KEY]
        try:
            resp = await self.session.request(
                request.method,
                target.upstream_url(ep.url),  # the checked route, never the client's raw target
                data=call.upstream_body() or None,
                headers=call.upstream_headers,
                allow_redirects=False,
            )
        except ValueError as exc:  # aiohttp.InvalidURL included: built from the client's input, not sent
            raise errors.not_forwardable(str(exc)) from None
        except aiohttp.ConnectionTimeoutError as exc:
            raise self._failed(ep, "connect", exc) from exc
        except TimeoutError as exc:
            raise self._timed_out(ep, exc) from exc
        except aiohttp.ClientConnectorError as exc:
            raise self._failed(ep, "connect", exc) from exc
        except aiohttp.ClientError as exc:
            raise self._failed(ep, "reset", exc) from exc
        try:
            if resp.status in self.retry_statuses:
                raise self._failed(ep, f"status_{resp.status}", f"HTTP {resp.status} from {ep.url}")
            first = await resp.content.readany()
            streamed = call.body is not None and call.body.get("stream") is True
            problem = request.method == "POST" and answer_problem(
                target.path, streamed, resp.status, resp.headers, first, resp.content.at_eof()
            )
            if problem:
                self.health.attempt_failed(ep, "bad_answer")
                log.warning("request %s: %s sent %s", call.route.request_id, ep.url, problem)
                raise errors.upstream_bad_answer(f"{ep.url} sent {problem}")
        except TimeoutError as exc:
            resp.close()
            raise self._timed_out(ep, exc) from exc
        except aiohttp.ClientError as exc:
            resp.close()
            raise self._failed(ep, "reset", exc) from exc
        except BaseException:
            resp.close()
            raise
        return UpstreamReply(resp, first)

    async def relay(
        self, call: ProxyCall, decision: Decision, reply: UpstreamReply
    ) -> tuple[web.StreamResponse, bool]:
        """Stream the reply to the client chunk by chunk; (response, True) when it ended normally.

        A pod failing mid-answer ends an SSE stream with an error event and [DONE] (a plain body is
        cut off, so the client sees a truncated response, not a valid-looking one). A client gone
        away ends the relay at once and closes the upstream connection, which makes vLLM abort.
        """
        up = reply.response
        ep = decision.endpoint
        resp = web.StreamResponse(status=up.status, reason=up.reason)
        headers = resp.headers
        drop = HOP_BY_HOP | connection_tokens(up.headers)
        for key, value in up.headers.items():
            if key.lower() not in drop:
                headers.add(key, value)
        headers[X_ENDPOINT] = ep.url
        headers[X_REQUEST_ID] = call.route.request_id
        headers[X_CACHED_TOKENS] = str(decision.cached_tokens)
        headers.update(call.extra_headers)
        completed = False
        call.status = up.status
        if self.tally_answers:
            call.tally = AnswerTally(call.body is not None and call.body.get("stream") is True)
            call.tally.add(reply.first_chunk)
        try:
            await resp.prepare(call.request)
            if reply.first_chunk:
                await resp.write(reply.first_chunk)
            call.first_byte_at = time.perf_counter()
            if 200 <= up.status < 300:
                self.metrics.ttft(call.pool.model).observe(call.first_byte_at - call.arrival)
            completed = await self._pump(call, resp, up, ep)
            if completed:
                await resp.write_eof()
        except ConnectionError:  # the client went away while we wrote (handler cancellation off)
            call.status = 499
            completed = False
        finally:
            if completed:
                up.release()  # body fully read: the connection goes back to the pool
            else:
                up.close()
        return resp, completed

    async def _pump(
        self, call: ProxyCall, resp: web.StreamResponse, up: aiohttp.ClientResponse, ep: Endpoint
    ) -> bool:
        content = up.content
        tally = call.tally
        while True:
            try:
                chunk = await content.readany()
            except (aiohttp.ClientError, TimeoutError) as exc:
                await self._end_broken_answer(call, resp, up, ep, exc)
                return False
            if not chunk:
                return True
            if tally is not None:
                tally.add(chunk)
            await resp.write(chunk)

    async def _end_broken_answer(
        self,
        call: ProxyCall,
        resp: web.StreamResponse,
        up: aiohttp.ClientResponse,
        ep: Endpoint,
        exc: BaseException,
    ) -> None:
        kind = "timeout" if isinstance(exc, TimeoutError) else "midstream"
        self.health.attempt_failed(ep, kind)
        log.warning("request %s: %s failed mid-answer: %r", call.route.request_id, ep.url, exc)
        if up.headers.get("Content-Type", "").startswith("text/event-stream"):
            await resp.write(errors.sse_error_event(f"the endpoint serving this stream failed: {kind}"))
            await resp.write_eof()
        elif call.request.transport is not None:
            call.request.transport.close()

    def _failed(self, ep: Endpoint, kind: str, detail: object) -> RetryableFailure:
        self.health.attempt_failed(ep, kind)
        return RetryableFailure(kind, f"{ep.url}: {detail}")

    def _timed_out(self, ep: Endpoint, exc: BaseException) -> GatewayError:
        self.health.attempt_failed(ep, "timeout")
        return errors.upstream_timeout(f"{ep.url} sent nothing for too long")
