"""The `kvgate epp` process: the gateway app for its state, and the ext_proc gRPC server.

The gateway app (`gateway.app.build_app`) is built and started exactly as `kvgate serve` starts it,
so the pools, policies, prefix caches (KV-event subscribers), health checks, load scraping, LoRA
adapter polling, Kubernetes discovery, replica sync, live reload and admission control are serve's
own. Its HTTP listener
answers only the operational routes (`/metrics`, `/health`, `/ready`, `/v1/models`): API requests
come through Envoy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from gateway.admission.controller import ADMISSION
from gateway.app import build_app
from gateway.config import GatewayConfig
from gateway.epp.extproc import ExternalProcessor
from gateway.epp.picker import Addresses, Picker
from gateway.errors import GatewayError
from gateway.periodic import rounds
from gateway.rejections import REJECTIONS
from gateway.reload import RELOADER, ConfigSource, Reloader
from gateway.runner import app_runner, freeze_startup_heap
from gateway.state import STATE, GatewayState
from gateway.target import TARGET_KEY

log = logging.getLogger("kvgate.epp")

DEFAULT_GRPC_PORT = 9002  # the Gateway API Inference Extension's EPP port
RESOLVE_INTERVAL_S = 30.0  # how often host names in endpoint URLs are resolved again
HEALTH_INTERVAL_S = 1.0  # how often the gRPC health statuses follow the pods' health
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
# The endpoint picker protocol's gRPC health services: liveness is the process answering; readiness
# (and the ext_proc service, and "" for the whole server) that some pod is healthy, as GET /ready.
READINESS_SERVICES = ("readiness", EXT_PROC_SERVICE, "")


@dataclass(slots=True)
class RunningEpp:
    """A running EPP: `grpc` the host:port Envoy connects to, `url` its HTTP (metrics) base URL,
    `picker` its state (pools, admission) for whoever runs it in-process."""

    grpc: str
    url: str
    picker: Picker
    reloader: Reloader


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def not_through_epp(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The EPP's HTTP listener serves the operational routes only; the API goes through Envoy."""
    target = request.get(TARGET_KEY)
    if target is not None and target.kind == "proxy":
        raise GatewayError(404, "kvgate epp routes API requests through Envoy; this port serves "
                           "/metrics, /health, /ready and /v1/models.", code="unknown_route",
                           reason="unknown_route")
    return await handler(request)


@contextlib.asynccontextmanager
async def running_epp(config: GatewayConfig, *, grpc_host: str, grpc_port: int, fallbacks: int = 2,
                      registry: CollectorRegistry | None = None, source: ConfigSource | None = None
                      ) -> AsyncIterator[RunningEpp]:
    """Start the gateway state, its HTTP listener (config.listen) and the gRPC server; stop both
    (in-flight streams get timeouts.shutdown to end) when the block exits. `source`: where a live
    reload reads the config again, as for serve."""
    for pool in config.pools:
        if any(e.role == "prefill" for e in pool.endpoints):
            log.warning("pool %s has prefill pods: kvgate epp routes to its decode pods only (P/D "
                        "disaggregation needs kvgate serve)", pool.model)
    app = build_app(config, registry=registry, source=source)
    app.middlewares.append(web.middleware(not_through_epp))
    runner = app_runner(app, handler_cancellation=True, shutdown_timeout=config.timeouts.shutdown,
                        access_log=None)
    await runner.setup()  # every cleanup_ctx entry: policies, health, scraper, discovery, admission
    server: grpc.aio.Server | None = None
    try:
        site = web.TCPSite(runner, config.listen.host, config.listen.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        state = app[STATE]
        addresses = Addresses()
        picker = Picker(state, app[REJECTIONS], admission=app.get(ADMISSION), fallbacks=fallbacks,
                        addresses=addresses)
        server = grpc.aio.server()
        pb_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(picker), server)
        checks = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(checks, server)
        bound = server.add_insecure_port(f"{grpc_host}:{grpc_port}")
        await server.start()
        shown = f"[{grpc_host}]" if ":" in grpc_host else grpc_host
        async with (
            rounds("address resolver", RESOLVE_INTERVAL_S,
                   lambda: addresses.resolve(state.pools.endpoints())),
            rounds("grpc health", HEALTH_INTERVAL_S, lambda: report_health(checks, state)),
        ):
            yield RunningEpp(grpc=f"{shown}:{bound}", url=url, picker=picker, reloader=app[RELOADER])
            await checks.enter_graceful_shutdown()  # every service NOT_SERVING while streams drain
    finally:
        if server is not None:
            await server.stop(config.timeouts.shutdown)
        await runner.cleanup()


async def report_health(checks: health.aio.HealthServicer, state: GatewayState) -> None:
    ready = any(ep.healthy for ep in state.pools.endpoints())
    serving = health_pb2.HealthCheckResponse.SERVING
    await checks.set("liveness", serving)
    status = serving if ready else health_pb2.HealthCheckResponse.NOT_SERVING
    for service in READINESS_SERVICES:
        await checks.set(service, status)


async def serve_epp(config: GatewayConfig, *, grpc_host: str, grpc_port: int, fallbacks: int,
                    ready: Callable[[RunningEpp], None], source: ConfigSource | None = None) -> None:
    """Run until SIGTERM/SIGINT; SIGHUP reloads the config from `source`, as for serve."""
    async with running_epp(config, grpc_host=grpc_host, grpc_port=grpc_port, fallbacks=fallbacks,
                           source=source) as where:
        freeze_startup_heap()
        ready(where)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, where.reloader.trigger, "SIGHUP")
        await stop.wait()
        log.info("shutting down: finishing in-flight streams (up to %.0f s)", config.timeouts.shutdown)
