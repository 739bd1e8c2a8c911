"""OpenTelemetry tracing (`tracing.enabled`; the `otel` extra): one span per request, W3C trace context
read from the client's `traceparent` and sent to the pods.

    <METHOD> <route>         SERVER    the whole request (status, request id, pool, pod, retries)
      kvgate.route           INTERNAL  each pick: policy, pod, reason, predicted cached tokens, attempt
      kvgate.upstream        CLIENT    each attempt on a pod, relay included; its traceparent goes there
        kvgate.prefill       CLIENT    P/D: the prefill step on the prefill pod (its own traceparent)
        kvgate.decode        CLIENT    P/D: the decode step, to the end of the relayed answer

Spans are passed explicitly (`ProxyCall.trace`, a `RequestTrace`), never through a global or the
current context; the TracerProvider is the app's own. With tracing off nothing here is imported or
built: the request path tests `call.trace is None` and moves on. opentelemetry is imported only when a
`Tracer` is built; without it `Tracer` raises TracingUnavailable (a ValueError: `kvgate serve` prints
its one line and exits 2).

Export: `exporter: otlp` (opentelemetry-exporter-otlp, configured by the standard OTEL_EXPORTER_OTLP_*
variables; HTTP/protobuf, else gRPC), `console` (stderr), `none`, or `auto` (otlp when installed, else
console). Spans are exported in batches by the SDK's background thread; tests pass an exporter of their
own (InMemorySpanExporter), exported as each span ends.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
from collections.abc import MutableMapping
from typing import Any

from aiohttp import web

from gateway.config import Tracing
from router.endpoint import Endpoint
from router.policy import Decision

log = logging.getLogger("kvgate.tracing")

MISSING = "tracing.enabled needs the optional packages opentelemetry-api and opentelemetry-sdk: " \
          "pip install 'kvgate[otel]'"


class TracingUnavailable(ValueError):
    """Tracing was asked for and cannot run (the `otel` extra, or an exporter, is not installed)."""


class Tracer:
    """The app's tracer: built once by build_app, `shutdown` at cleanup (exports what is left)."""

    def __init__(self, cfg: Tracing, *, exporter: Any = None) -> None:
        try:
            from opentelemetry import trace
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError:
            raise TracingUnavailable(MISSING) from None
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": cfg.service_name}),
            sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)),
        )
        if exporter is not None:
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            chosen = _exporter(cfg.exporter)
            if chosen is not None:
                self.provider.add_span_processor(BatchSpanProcessor(chosen))
        self.tracer = self.provider.get_tracer("kvgate")
        self.propagator = TraceContextTextMapPropagator()
        self.in_context = trace.set_span_in_context
        self.kind = trace.SpanKind
        self.status_code = trace.StatusCode

    def start_request(self, request: web.Request) -> RequestTrace:
        """The request's span, child of the client's trace when it sent a valid `traceparent`. Named
        by its method until `end` knows the checked route (a refused target never names a span)."""
        parent = self.propagator.extract(request.headers)
        span = self.tracer.start_span(
            request.method,
            context=parent,
            kind=self.kind.SERVER,
            attributes={
                "http.request.method": request.method,
                "url.path": request.path[:256],
                "client.address": request.remote or "",
            },
        )
        return RequestTrace(self, span)

    async def shutdown(self) -> None:
        """Flush and stop the exporters (blocking in the SDK: run in a thread)."""
        await asyncio.to_thread(self.provider.shutdown)


class RequestTrace:
    """One request's spans. The proxy and the P/D flow call it; each method is one span's event."""

    __slots__ = ("attempt", "span", "step", "tracer")

    def __init__(self, tracer: Tracer, span: Any) -> None:
        self.tracer = tracer
        self.span = span
        self.attempt: Any = None  # the attempt span running (parent of the P/D steps)
        self.step: Any = None  # a P/D decode step, ended with its attempt

    @property
    def trace_id(self) -> str:
        ctx = self.span.get_span_context()
        return f"{ctx.trace_id:032x}" if ctx.is_valid else ""

    def _child(self, name: str, parent: Any, kind: Any, attributes: dict[str, Any],
               start_time: int | None = None) -> Any:
        context = self.tracer.in_context(parent)
        return self.tracer.tracer.start_span(
            name, context=context, kind=kind, attributes=attributes, start_time=start_time
        )

    def inject(self, span: Any, headers: MutableMapping[str, str]) -> None:
        """`traceparent` (and `tracestate`) of `span` into headers sent upstream, replacing the client's."""
        self.tracer.propagator.inject(headers, context=self.tracer.in_context(span))

    def routed(self, started_ns: int, decision: Decision, policy: str, attempt: int, panic: bool) -> None:
        """A pick took from `started_ns` (time.time_ns()) to now."""
        span = self._child("kvgate.route", self.span, self.tracer.kind.INTERNAL, {
            "kvgate.policy": policy,
            "kvgate.endpoint": decision.endpoint.url,
            "kvgate.reason": decision.reason,
            "kvgate.cached_tokens": decision.cached_tokens,
            "kvgate.prompt_tokens": decision.prompt_tokens,
            "kvgate.attempt": attempt,
            "kvgate.panic": panic,
        }, start_time=started_ns)
        span.end()

    def start_attempt(self, ep: Endpoint, attempt: int, headers: MutableMapping[str, str]) -> None:
        """An attempt on `ep` starts; the pod is sent its span's context."""
        self.attempt = self._child("kvgate.upstream", self.span, self.tracer.kind.CLIENT, {
            "server.address": ep.url,
            "kvgate.attempt": attempt,
        })
        self.inject(self.attempt, headers)

    def end_attempt(self, status: int, ok: bool, error: BaseException | None) -> None:
        if self.step is not None:
            self._end(self.step, status, ok, error)
            self.step = None
        if self.attempt is not None:
            self._end(self.attempt, status, ok, error)
            self.attempt = None

    def start_step(self, name: str, ep: Endpoint, headers: MutableMapping[str, str]) -> Any:
        """A P/D step (`kvgate.prefill`, `kvgate.decode`) on `ep`, child of the attempt; the pod is
        sent its context in `headers`."""
        parent = self.attempt if self.attempt is not None else self.span
        span = self._child(name, parent, self.tracer.kind.CLIENT, {"server.address": ep.url})
        self.inject(span, headers)
        return span

    def end_prefill(self, span: Any, result: str) -> None:
        span.set_attribute("kvgate.result", result)
        if result != "ok":
            span.set_status(self.tracer.status_code.ERROR, result)
        span.end()

    def end(self, status: int, request_id: str, name: str | None, attributes: dict[str, Any]) -> None:
        """The request ended with `status` (499: the client left); `name`: `METHOD route` once the
        route was checked."""
        span = self.span
        if name is not None:
            span.update_name(name)
        span.set_attribute("http.response.status_code", status)
        span.set_attribute("kvgate.request_id", request_id)
        for key, value in attributes.items():
            if value is not None:
                span.set_attribute(key, value)
        if status >= 500:
            span.set_status(self.tracer.status_code.ERROR)
        span.end()

    def _end(self, span: Any, status: int, ok: bool, error: BaseException | None) -> None:
        if status:
            span.set_attribute("http.response.status_code", status)
        if error is not None and not isinstance(error, asyncio.CancelledError):
            span.set_status(self.tracer.status_code.ERROR, f"{type(error).__name__}: {error}")
        elif not ok:
            span.set_status(self.tracer.status_code.ERROR)
        span.end()


def _exporter(kind: str) -> Any:
    """The span exporter `tracing.exporter` names (None: `none`)."""
    if kind == "none":
        return None
    if kind in ("otlp", "auto"):
        for module in ("opentelemetry.exporter.otlp.proto.http.trace_exporter",
                       "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"):
            try:
                return importlib.import_module(module).OTLPSpanExporter()
            except ImportError:
                continue
        if kind == "otlp":
            raise TracingUnavailable(
                "tracing.exporter otlp needs the package opentelemetry-exporter-otlp: "
                "pip install opentelemetry-exporter-otlp"
            )
        log.warning("tracing: opentelemetry-exporter-otlp is not installed; spans go to stderr")
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    return ConsoleSpanExporter(out=sys.stderr)


TRACE_KEY = web.RequestKey("kvgate_trace", RequestTrace)
TRACER = web.AppKey("kvgate_tracer", Tracer)
