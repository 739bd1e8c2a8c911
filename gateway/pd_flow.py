"""The prefill/decode two-step flow, wrapped around the proxy's attempt (`Proxy.attempt`).

For a pool with prefill pods (`Pool.pd`), one attempt on the decode pod the proxy picked becomes:

    plan (router.pd.PDRouter)        local_short / local_no_prefill -> the plain attempt
    prefill step                     a copy of the request with kv_transfer_params.do_remote_decode,
                                     stream false, max_tokens 1 (and max_completion_tokens 1), no
                                     stream_options, same X-Request-Id; read whole, never relayed
    decode step                      the original request plus the returned kv_transfer_params,
                                     sent and streamed by the plain attempt

A prefill error, a timeout (`pd.prefill_timeout_s`) or an answer without kv_transfer_params falls back
to the plain attempt (the decode pod prefills itself): the client never sees the internal step. A
client that leaves cancels whichever step is running (handler cancellation closes its connection).
Retries of the decode step re-plan from the original body, so a retry on another decode pod is paired
only with prefill pods compatible with it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any, Final

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry, Counter, Histogram

from gateway.health import HealthTracker
from gateway.metrics import TTFT_BUCKETS, _Children
from gateway.proxy import Attempt, ProxyCall, UpstreamReply, charged_tokens
from gateway.state import PROXY, SESSION, STATE
from gateway.target import TARGET_KEY
from router.pd import GENERATION_PATHS, OUTCOMES, Outcome, PDRouter
from router.policy import Decision

log = logging.getLogger("kvgate.pd")

X_PREFILL_ENDPOINT: Final = "x-kvgate-prefill-endpoint"
PREFILL_TRANSFER_PARAMS: Final = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


class PDMetrics:
    """kvgate_pd_* metrics: decisions by outcome, prefill step latency, missing transfer params."""

    def __init__(self, registry: CollectorRegistry, models: list[str]) -> None:
        self.decisions = _Children(
            Counter(
                "kvgate_pd_decisions",
                "P/D decisions by outcome: disaggregated, local_short (few uncached prompt tokens), "
                "local_no_prefill (no healthy compatible prefill pod), fallback_prefill_failed.",
                ["model", "outcome"],
                registry=registry,
            )
        )
        self.prefill_seconds = _Children(
            Histogram(
                "kvgate_pd_prefill_duration_seconds",
                "Prefill step latency (request sent to answer read) by result: ok, error, timeout, "
                "missing_params, cancelled.",
                ["model", "result"],
                buckets=TTFT_BUCKETS,
                registry=registry,
            )
        )
        self.params_missing = _Children(
            Counter(
                "kvgate_pd_transfer_params_missing",
                "Prefill answers (2xx) that carried no kv_transfer_params, by prefill endpoint.",
                ["model", "endpoint"],
                registry=registry,
            )
        )
        self.init_models(models)

    def init_models(self, models: list[str]) -> None:
        """Every outcome of these pools visible from the start, at 0."""
        for model in models:
            for outcome in OUTCOMES:
                self.decisions(model, outcome)


def prefill_request_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """The prefill copy of a request body (DESIGN.md section 2, vLLM's NixlConnector proxy)."""
    prefill = {k: v for k, v in body.items() if k != "stream_options"}
    prefill["kv_transfer_params"] = dict(PREFILL_TRANSFER_PARAMS)
    prefill["stream"] = False
    prefill["max_tokens"] = 1
    prefill["max_completion_tokens"] = 1
    return prefill


def transfer_params(raw: bytes) -> dict[str, Any] | None:
    """The non-empty `kv_transfer_params` object of a prefill answer, else None."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    params = data.get("kv_transfer_params") if isinstance(data, dict) else None
    return params if isinstance(params, dict) and params else None


class PDFlow:
    """`attempt` replaces Proxy.attempt; pools without a PDRouter go straight to `inner`."""

    def __init__(
        self,
        inner: Attempt,
        session: aiohttp.ClientSession,
        metrics: PDMetrics,
        health: HealthTracker,
    ) -> None:
        self.inner = inner
        self.session = session
        self.metrics = metrics
        self.health = health

    async def attempt(self, call: ProxyCall, decision: Decision) -> UpstreamReply:
        pd = call.pool.pd
        call.extra_headers.pop(X_PREFILL_ENDPOINT, None)  # from an earlier, failed attempt
        call.route.state.disaggregated = False
        call.prefill_by = None
        if pd is None or not self.splittable(call):
            return await self.inner(call, decision)
        pool = call.pool
        plan = pd.plan(call.route, decision, pool.endpoints, pool.policy)
        if plan.prefill is None:
            self._count(call, plan.outcome)
            return await self.inner(call, decision)
        prefill = plan.prefill
        decode = decision.endpoint
        # While the prefill pod works, the decode pod holds no prefill work for this request: take back
        # what ProxyCall.charge gave it for this attempt.
        charged = charged_tokens(decision)
        decode.in_flight_tokens -= charged
        try:
            params = await self.prefill_step(call, prefill, pd)
        finally:
            decode.in_flight_tokens += charged
        # Re-checked after the step: discovery may have changed a version while it ran.
        if params is None or not pd.compatibility.compatible(prefill.endpoint, decode):
            self._count(call, "fallback_prefill_failed")
            return await self.inner(call, decision)
        self._count(call, "disaggregated")
        call.route.state.disaggregated = True  # until the next attempt: on_first_byte comes after this
        original, changed = call.body, call.body_changed
        assert original is not None  # splittable() checked it
        call.body = {**original, "kv_transfer_params": params}
        call.body_changed = True
        call.extra_headers[X_PREFILL_ENDPOINT] = prefill.endpoint.url
        call.prefill_by = prefill.endpoint
        if call.trace is not None:  # ended with the attempt, once the answer is relayed
            call.trace.step = call.trace.start_step("kvgate.decode", decode, call.upstream_headers)
        try:
            return await self.inner(call, decision)
        finally:  # a retry on another decode pod starts again from the client's request
            call.body, call.body_changed = original, changed

    @staticmethod
    def splittable(call: ProxyCall) -> bool:
        """A generation request the client did not already give kv_transfer_params of its own."""
        body = call.body
        return (
            body is not None
            and call.request.method == "POST"
            and call.request.path in GENERATION_PATHS
            and "kv_transfer_params" not in body
        )

    async def prefill_step(self, call: ProxyCall, d: Decision, pd: PDRouter) -> dict[str, Any] | None:
        """Run the prefill copy on `d.endpoint`; its kv_transfer_params, or None on any failure.

        Bookkeeping as for any attempt: policy hooks once each, in-flight counts restored on every exit.
        """
        assert call.body is not None
        call.charge(d)
        result = "cancelled"
        params: dict[str, Any] | None = None
        start = time.perf_counter()
        headers = call.upstream_headers
        span = None
        if call.trace is not None:
            headers = CIMultiDict(headers)  # the prefill pod gets its own span's traceparent
            span = call.trace.start_step("kvgate.prefill", d.endpoint, headers)
        try:
            result, params = await self._send_prefill(call, d, pd.prefill_timeout_s, headers)
            return params
        finally:
            self.metrics.prefill_seconds(call.pool.model, result).observe(time.perf_counter() - start)
            call.discharge(d, params is not None)
            if span is not None and call.trace is not None:
                call.trace.end_prefill(span, result)

    async def _send_prefill(
        self, call: ProxyCall, d: Decision, limit_s: float, headers: CIMultiDict[str]
    ) -> tuple[str, dict[str, Any] | None]:
        assert call.body is not None
        ep = d.endpoint
        rid = call.route.request_id
        body = orjson.dumps(prefill_request_body(call.body))
        url = call.request[TARGET_KEY].upstream_url(ep.url)  # the checked route (gateway.target)
        try:
            async with (
                asyncio.timeout(limit_s),
                self.session.post(url, data=body, headers=headers) as resp,
            ):
                raw = await resp.read()
        except TimeoutError:
            self._failed(d, "timeout", f"no answer within {limit_s:g} s", rid)
            return "timeout", None
        except aiohttp.ClientConnectorError as exc:
            self._failed(d, "connect", exc, rid)
            return "error", None
        except aiohttp.ClientError as exc:
            self._failed(d, "reset", exc, rid)
            return "error", None
        if resp.status >= 500:
            self._failed(d, f"status_{resp.status}", f"HTTP {resp.status}", rid)
            return "error", None
        if resp.status >= 400:  # the request's fault, not the pod's: the decode pod answers it
            log.info("request %s: prefill on %s answered %d", rid, ep.url, resp.status)
            return "error", None
        self.health.attempt_succeeded(ep)
        params = transfer_params(raw)
        if params is None:
            self.metrics.params_missing(call.pool.model, ep.url).inc()
            log.warning("request %s: prefill answer from %s has no kv_transfer_params", rid, ep.url)
            return "missing_params", None
        return "ok", params

    def _failed(self, d: Decision, kind: str, detail: object, rid: str) -> None:
        ep = d.endpoint
        self.health.attempt_failed(ep, kind)
        log.info(
            "request %s: prefill on %s failed (%s: %s); prefilling on the decode pod",
            rid,
            ep.url,
            kind,
            detail,
        )

    def _count(self, call: ProxyCall, outcome: Outcome) -> None:
        self.metrics.decisions(call.pool.model, outcome).inc()


PD_FLOW = web.AppKey("kvgate_pd_flow", PDFlow)


def enable_pd(app: web.Application, models: list[str]) -> None:
    """Pools `models` split prefill and decode: wrap the proxy's attempt in a PDFlow (once; at startup
    or when a config reload brings the first P/D pool), with their metrics."""
    flow = app.get(PD_FLOW)
    if flow is not None:
        flow.metrics.init_models(models)
        return
    state = app[STATE]
    proxy = app[PROXY]
    flow = app[PD_FLOW] = PDFlow(proxy.attempt, app[SESSION], PDMetrics(state.metrics.registry, models),
                                 state.health)
    proxy.attempt = flow.attempt
