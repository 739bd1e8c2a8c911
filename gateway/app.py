"""The gateway application: state, middlewares, routes, and one cleanup_ctx entry per long-lived
resource (upstream client session + proxy, the P/D flow, routing policies, replica sync, Kubernetes
pod discovery, health checker, LoRA adapter poller, metrics scraper, the summary log of refused
requests, admission, the access log and tracer, the config file poll of live reload), set up in this
order and torn down in reverse. Background tasks read the pools through the one `Pools` object, so a
reload's pools and endpoints reach them at once."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway import errors
from gateway.access_log import REFUSAL_KEY, AccessLog
from gateway.adapters import POLL_INTERVAL_S, AdapterPoller
from gateway.admission.controller import ADMISSION, AdmissionController
from gateway.admission.tenants import tenant_api_keys
from gateway.auth import OPEN_PATHS, auth_middleware, load_api_keys
from gateway.config import GatewayConfig
from gateway.discovered import PoolWatchers
from gateway.errors import GatewayError
from gateway.handlers import CALL_KEY, REQUEST_ID_KEY, add_routes
from gateway.health import HealthChecker, HealthTracker
from gateway.metrics import GatewayMetrics
from gateway.pd_flow import enable_pd
from gateway.periodic import rounds
from gateway.pools import build_pools
from gateway.proxy import X_REQUEST_ID, Proxy, ProxyCall
from gateway.rejections import REJECTIONS, ProtocolLog, Rejections
from gateway.reload import RELOADER, ConfigSource, Reloader, reload_ctx
from gateway.replicas import check_replicas, replicas_ctx
from gateway.request_body import SERVER_ARGS
from gateway.scraper import MetricsScraper
from gateway.state import PROXY, SESSION, STATE, GatewayState
from gateway.target import TARGET_KEY, resolve_target
from gateway.tracing import TRACE_KEY, TRACER, Tracer
from router.discovery import kubernetes as kube_discovery

log = logging.getLogger("kvgate.app")
WATCHERS = web.AppKey("kvgate_pool_watchers", PoolWatchers)

# Below uvicorn's default keep-alive (5 s), so the gateway never reuses a connection the pod is closing.
UPSTREAM_KEEPALIVE_S = 4.0
# A client's X-Request-Id is kept (echoed, forwarded) when it is this safe; otherwise a new one is made.
_USABLE_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")


def build_app(
    config: GatewayConfig, *, registry: CollectorRegistry | None = None, span_exporter: object = None,
    source: ConfigSource | None = None,
) -> web.Application:
    """A ready-to-run gateway app. Raises (PolicyError, OSError for a missing key file,
    TracingUnavailable) on bad config. `span_exporter`: where spans go instead of tracing.exporter.
    `source`: where a reload (app[RELOADER], gateway/reload.py) reads the config again."""
    registry = registry if registry is not None else CollectorRegistry()
    pools = build_pools(config, registry)
    metrics = GatewayMetrics(registry, pools.endpoints)
    api_keys = load_api_keys(config.auth) + tenant_api_keys(config.admission)
    state = GatewayState(
        config=config,
        pools=pools,
        metrics=metrics,
        health=HealthTracker(
            metrics, config.health.eject_after, eject_after_timeouts=config.health.eject_after_timeouts
        ),
        api_keys=api_keys,
        started=int(time.time()),
    )
    # always installed, keys read per request: a reload may turn authentication on, off, or rotate keys
    middlewares = [openai_errors_and_accounting, auth_middleware(lambda: state.api_keys)]
    rejections = Rejections(registry)
    tracer = Tracer(config.tracing, exporter=span_exporter) if config.tracing.enabled else None
    if tracer is not None:
        middlewares.insert(0, traced(tracer))
    access_log = AccessLog(config.logs, registry) if config.logs.access else None
    if access_log is not None:
        middlewares.insert(0, access_logged(access_log))
    app = web.Application(
        middlewares=middlewares,
        client_max_size=config.limits.max_body_bytes,
        handler_args={**SERVER_ARGS, "logger": ProtocolLog(rejections)},
    )
    app[STATE] = state
    app[REJECTIONS] = rejections
    if access_log is not None:
        app[ACCESS_LOG] = access_log
    if tracer is not None:
        app[TRACER] = tracer
    add_routes(app)
    if config.admission is not None:
        app[ADMISSION] = AdmissionController(config, pools, registry, keys_checked=bool(api_keys))
        app.on_shutdown.append(admission_drain)
    if any(spec.discovery == "kubernetes" for spec in config.pools):
        check_discovery(config)
    app[WATCHERS] = PoolWatchers(pools, registry)
    app[RELOADER] = Reloader(app, source, app[WATCHERS])
    app.cleanup_ctx.extend([upstream_ctx, pd_ctx, policies_ctx, discovery_ctx, health_ctx, adapters_ctx,
                            scraper_ctx, rejections_ctx, admission_ctx, observability_ctx, reload_ctx])
    if config.replicas is not None:
        check_replicas()
        app.cleanup_ctx.insert(app.cleanup_ctx.index(policies_ctx) + 1, replicas_ctx)
    return app


@web.middleware
async def openai_errors_and_accounting(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Give every request an id (the client's X-Request-Id if usable, else a new one) echoed on its
    response, resolve what it may reach (gateway.target), turn every error into an OpenAI error body,
    count every API request once and every refused one by reason (gateway.rejections)."""
    client_id = request.headers.get(X_REQUEST_ID, "")
    request[REQUEST_ID_KEY] = client_id if _USABLE_REQUEST_ID.fullmatch(client_id) else uuid.uuid4().hex
    try:
        request[TARGET_KEY] = resolve_target(request.method, request.raw_path)
        _check_expect(request)
        response = await handler(request)
    except GatewayError as exc:
        response = exc.response()
        if exc.status < 500:
            request.app[REJECTIONS].count(exc.reason)
            request[REFUSAL_KEY] = exc.reason
    except web.HTTPException as exc:  # aiohttp's own (every path reaches `dispatch`: not expected)
        error = GatewayError(exc.status, exc.reason, type="invalid_request_error")
        response = error.response()
        if exc.status < 500:
            request.app[REJECTIONS].count(error.reason)
            request[REFUSAL_KEY] = error.reason
    except asyncio.CancelledError:  # the client disconnected (handler cancellation)
        _account(request, 499)
        raise
    except ConnectionError:  # the client went away while its body was read: nobody to answer
        _account(request, 499)
        return web.Response(status=499)
    except Exception as exc:
        call = request.get(CALL_KEY)
        if isinstance(call, ProxyCall) and call.status:
            raise  # the response already started: nothing sensible can be sent now
        log.exception("unhandled error on %s %s", request.method, request.path)
        message = f"Internal gateway error: {type(exc).__name__}"
        response = GatewayError(500, message, type="server_error").response()
    if not response.prepared and X_REQUEST_ID not in response.headers:
        response.headers[X_REQUEST_ID] = request[REQUEST_ID_KEY]
    _account(request, response.status)
    return response


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ACCESS_LOG = web.AppKey("kvgate_access_log", AccessLog)


def access_logged(access_log: AccessLog) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Outermost middleware (logs.access): the request's access-log line once it ended, however."""

    @web.middleware
    async def access_logging(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        status = 0
        try:
            response = await handler(request)
            status = response.status
            return response
        except asyncio.CancelledError:
            status = 499
            raise
        finally:
            call = _call(request)
            trace = request.get(TRACE_KEY)
            access_log.log(request, call, _final_status(call, status), start,
                           request.get(REQUEST_ID_KEY, ""), trace.trace_id if trace is not None else "")

    return access_logging


def traced(tracer: Tracer) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Middleware (tracing.enabled): the request's span, from the client's traceparent, ended with it."""

    @web.middleware
    async def tracing(request: web.Request, handler: Handler) -> web.StreamResponse:
        trace = request[TRACE_KEY] = tracer.start_request(request)
        status = 0
        try:
            response = await handler(request)
            status = response.status
            return response
        except asyncio.CancelledError:
            status = 499
            raise
        finally:
            call = _call(request)
            served = call.served_by.url if call is not None and call.served_by is not None else None
            target = request.get(TARGET_KEY)
            name = f"{request.method} {target.path[:256]}" if target is not None else None
            trace.end(_final_status(call, status), request.get(REQUEST_ID_KEY, ""), name, {
                "kvgate.pool": call.pool.model if call is not None else None,
                "kvgate.endpoint": served,
                "kvgate.retries": max(0, len(call.tried) - 1) if call is not None else None,
            })

    return tracing


def _call(request: web.Request) -> ProxyCall | None:
    call = request.get(CALL_KEY)
    return call if isinstance(call, ProxyCall) else None


def _final_status(call: ProxyCall | None, status: int) -> int:
    """What the client got: 499 when it left, the started answer's status when an error cut it."""
    if call is not None and call.status == 499:
        return 499
    if not status:
        return call.status if call is not None and call.status else 500
    return status


async def observability_ctx(app: web.Application) -> AsyncIterator[None]:
    """The access log's writer thread; at teardown it writes what is queued, and the tracer exports
    the spans left."""
    access_log = app.get(ACCESS_LOG)
    if access_log is not None:
        access_log.start()
    yield
    tracer = app.get(TRACER)
    if tracer is not None:
        await tracer.shutdown()
    if access_log is not None:
        await asyncio.to_thread(access_log.close)


def _check_expect(request: web.Request) -> None:
    """417 for an HTTP/1.1 `Expect` other than 100-continue (handlers.continue_if_readable answers that)."""
    expect = request.headers.get("Expect")
    if expect is not None and request.version >= (1, 1) and expect.lower() != "100-continue":
        raise errors.expectation_failed(expect)


def _account(request: web.Request, status: int) -> None:
    metrics = request.app[STATE].metrics
    call = request.get(CALL_KEY)
    if not isinstance(call, ProxyCall):
        target = request.get(TARGET_KEY)
        if target is None or target.path not in OPEN_PATHS:  # refused before a pool was chosen: no model
            metrics.requests("", "", str(status)).inc()
        return
    model = call.pool.model
    served = call.served_by.url if call.served_by is not None else ""
    final = call.status if call.status == 499 else status
    metrics.requests(model, served, str(final)).inc()
    metrics.latency(model).observe(time.perf_counter() - call.arrival)


async def admission_ctx(app: web.Application) -> AsyncIterator[None]:
    """Admission control's recheck task; at teardown every request still queued is answered (503)."""
    controller = app.get(ADMISSION)
    if controller is None:
        yield
        return
    task = asyncio.create_task(controller.run(), name="admission recheck")
    yield
    task.cancel()
    controller.close()


async def admission_drain(app: web.Application) -> None:
    """SIGTERM (runner cleanup, before in-flight requests are awaited): queued requests keep being
    dispatched for admission.drain_timeout_s (at most half of timeouts.shutdown, so the last ones
    dispatched can still finish), then the rest get 503."""
    config = app[STATE].config
    assert config.admission is not None
    app[ADMISSION].start_drain(min(config.admission.drain_timeout_s, config.timeouts.shutdown / 2))


async def rejections_ctx(app: web.Application) -> AsyncIterator[None]:
    """One summary line of refused requests per logs.rejected_interval (and one at shutdown)."""
    rejections = app[REJECTIONS]
    async with rounds("rejection log", app[STATE].config.logs.rejected_interval, rejections.flush_round):
        yield
    rejections.flush()


async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    """One pooled ClientSession for all upstream traffic, and the proxy that uses it."""
    state = app[STATE]
    timeouts = state.config.timeouts
    connector = aiohttp.TCPConnector(
        limit=0,  # the pods' own max_num_seqs is the limit; the gateway queues nothing
        keepalive_timeout=UPSTREAM_KEEPALIVE_S,
        ttl_dns_cache=60,
    )
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, connect=timeouts.connect, sock_read=timeouts.read),
        auto_decompress=False,  # bytes pass through untouched, Content-Encoding and all
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    app[SESSION] = session
    app[PROXY] = Proxy(session, state.config, state.metrics, state.health)
    yield
    await session.close()


async def pd_ctx(app: web.Application) -> AsyncIterator[None]:
    """Prefill/decode disaggregation: wrap the proxy's attempt when some pool has prefill pods (or,
    later, when a config reload brings one: gateway.pd_flow.enable_pd)."""
    pd_models = [pool.model for pool in app[STATE].pools if pool.pd is not None]
    if pd_models:
        enable_pd(app, pd_models)
    yield


async def policies_ctx(app: web.Application) -> AsyncIterator[None]:
    """Each pool's prefix cache (KV-event subscribers), then its policy; closed in reverse order."""
    started: list[Callable[[], Awaitable[None]]] = []
    try:
        for pool in app[STATE].pools:
            if pool.prefix_cache is not None:
                await pool.prefix_cache.start(pool.endpoints)
                started.append(pool.prefix_cache.close)
            await pool.policy.start(pool.endpoints)
            started.append(pool.policy.close)
        yield
    finally:
        for close in reversed(started):
            await close()


def check_discovery(config: GatewayConfig) -> None:
    """Before anything starts: the client library is installed (else ModuleNotFoundError, which the CLI
    turns into its one-line hint) and each pool's credentials exist (else ValueError naming the key)."""
    kube_discovery.require_client()
    for spec in config.pools:
        if spec.kubernetes is not None:
            kube_discovery.check_credentials(spec.kubernetes, f"pools.{spec.model}.kubernetes")


async def discovery_ctx(app: web.Application) -> AsyncIterator[None]:
    """A pod watcher per `discovery: kubernetes` pool (gateway.discovered; a reload adds and stops
    them), after the prefix caches (so they see every pod join) and before the first health round;
    the first pod lists are waited for before serving."""
    watchers = app[WATCHERS]
    await watchers.sync(app[STATE].config.pools)
    yield
    await watchers.close()


async def health_ctx(app: web.Application) -> AsyncIterator[None]:
    """Active health checks; one round before serving so dead pods are out from the first request."""
    state = app[STATE]
    cfg = state.config.health
    checker = HealthChecker(
        app[SESSION],
        state.pools.endpoints,
        state.health,
        timeout=cfg.timeout,
        path=cfg.path,
        interval=cfg.interval,
        metrics=state.metrics,
    )
    async with rounds("health checker", cfg.interval, checker.check_all):
        yield


async def adapters_ctx(app: web.Application) -> AsyncIterator[None]:
    """The LoRA adapters the pods list (GET /v1/models), once before serving (after the first health
    round, so only live pods are asked) and then every POLL_INTERVAL_S."""
    state = app[STATE]
    poller = AdapterPoller(app[SESSION], state.pools, state.metrics, timeout=state.config.health.timeout)
    async with rounds("adapter poller", POLL_INTERVAL_S, poller.poll_all):
        yield


async def scraper_ctx(app: web.Application) -> AsyncIterator[None]:
    """Load scraping (skipped when scrape.interval is 0); one round before serving."""
    state = app[STATE]
    cfg = state.config.scrape
    if cfg.interval <= 0:
        yield
        return
    scraper = MetricsScraper(
        app[SESSION], state.pools.endpoints, state.metrics, timeout=cfg.timeout, path=cfg.path
    )
    async with rounds("metrics scraper", cfg.interval, scraper.scrape_all):
        yield
