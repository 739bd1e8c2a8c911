"""HTTP handlers: the OpenAI API (proxied), /v1/models, and the operational endpoints.

Every request reaches one aiohttp route, `dispatch`, which serves the route gateway.target resolved
(in the outermost middleware): what a client may reach is decided there and only there."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http import HttpVersion11
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import errors
from gateway.admission.controller import ADMISSION
from gateway.pools import Pool, Pools
from gateway.proxy import ProxyCall, upstream_headers
from gateway.request_body import parse_body, read_body
from gateway.state import PROXY, STATE, GatewayState
from gateway.target import TARGET_KEY, RouteKind, resolve_target
from router.policy import RouteRequest

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Request-scoped values: the id (set by the middleware for every request) and the proxied call.
REQUEST_ID_KEY = web.RequestKey("kvgate_request_id", str)
CALL_KEY = web.RequestKey("kvgate_call", ProxyCall)


async def proxy_api(request: web.Request) -> web.StreamResponse:
    """Any /v1/* call (and /tokenize, /detokenize): check the body, pick the model's pool, forward."""
    arrival = time.perf_counter()
    state = request.app[STATE]
    request_id = request[REQUEST_ID_KEY]
    path = request[TARGET_KEY].path
    raw = await read_body(request, state.config.limits.max_body_bytes, state.config.timeouts.client_body)
    body = parse_body(raw, path)
    pool = select_pool(state.pools, body)
    aliased = body is not None and resolve_alias(state.pools, body)
    route = RouteRequest(
        request_id=request_id, model=pool.model, path=path, body=body or {}, headers=request.headers
    )
    call = ProxyCall(
        request=request,
        route=route,
        pool=pool,
        body=body,
        raw_body=raw,
        arrival=arrival,
        body_changed=aliased,
        upstream_headers=upstream_headers(
            request,
            request_id,
            drop_authorization=bool(state.api_keys),
            forwarded=state.config.forwarded.mode,
        ),
    )
    request[CALL_KEY] = call
    if pool.prefix_cache is not None:  # tokenized off the event loop, once: routing reads it from the state
        await pool.prefix_cache.read_prompt(route.state, route)
    admission = request.app.get(ADMISSION)
    if admission is None:
        return await request.app[PROXY].forward(call)
    ticket = await admission.admit(call)  # may wait; routed only once admitted (late binding)
    try:
        return await request.app[PROXY].forward(call)
    finally:
        ticket.release()


def resolve_alias(pools: Pools, body: dict) -> bool:
    """Replace an alias in the body's `model` by the name the pods serve; whether it did."""
    target = pools.aliases.get(body.get("model"))  # type: ignore[arg-type]
    if target is None:
        return False
    body["model"] = target
    return True


def select_pool(pools: Pools, body: dict | None) -> Pool:
    """The pool of the body's `model` (a pool's model or one of its LoRA adapters); with a single
    pool, a request naming no model goes there."""
    model = body.get("model") if body else None
    if model is None:
        if len(pools.by_model) == 1:
            return next(iter(pools))
        raise errors.bad_request("You must provide a model parameter.", param="model")
    pool = pools.get(pools.aliases.get(model, model))
    if pool is None:
        raise errors.model_not_found(model)
    return pool


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models: `model_list` as JSON."""
    body = orjson.dumps(model_list(request.app[STATE]))
    return web.Response(body=body, content_type="application/json")


def model_list(state: GatewayState) -> dict[str, Any]:
    """The union of the pools' models, in the OpenAI list shape, then their LoRA adapters with
    `parent` naming the base model (as vLLM lists them), then the aliases (`root`: the name they
    stand for)."""
    created = state.started
    data = [
        {"id": p.model, "object": "model", "created": created, "owned_by": "kvgate", "root": p.model}
        for p in state.pools
    ]
    data += [
        {"id": name, "object": "model", "created": created, "owned_by": "kvgate", "root": name,
         "parent": p.model}
        for name, p in state.pools.adapters()
    ]
    data += [
        {"id": alias, "object": "model", "created": created, "owned_by": "kvgate", "root": target}
        for alias, target in state.pools.aliases.items()
    ]
    return {"object": "list", "data": data}


async def health(request: web.Request) -> web.Response:
    """Liveness: the gateway process answers."""
    return web.Response(status=200)


async def ready(request: web.Request) -> web.Response:
    """Readiness: 200 when at least one endpoint is healthy, else 503."""
    pools = request.app[STATE].pools
    healthy = sum(1 for ep in pools.endpoints() if ep.healthy)
    return web.Response(
        status=200 if healthy else 503,
        body=orjson.dumps({"ready": healthy > 0, "healthy_endpoints": healthy}),
        content_type="application/json",
    )


async def metrics(request: web.Request) -> web.Response:
    """This gateway's registry, or what METRICS_BODY makes (`--workers`: every worker's, merged)."""
    make_body = request.app.get(METRICS_BODY)
    registry = request.app[STATE].metrics.registry
    body = await make_body() if make_body is not None else generate_latest(registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


METRICS_BODY: web.AppKey[Callable[[], Awaitable[bytes]]] = web.AppKey("kvgate_metrics_body")


HANDLERS: dict[RouteKind, Handler] = {
    "health": health,
    "ready": ready,
    "metrics": metrics,
    "models": list_models,
    "proxy": proxy_api,
}


async def dispatch(request: web.Request) -> web.StreamResponse:
    """Serve the route the middleware resolved (request[TARGET_KEY])."""
    return await HANDLERS[request[TARGET_KEY].kind](request)


async def continue_if_readable(request: web.Request) -> None:
    """`Expect: 100-continue`: invite the body only when the gateway will read it (a route that takes
    one, a declared size within the limit). Otherwise send nothing, and the middleware answers (404,
    413, 417...) without the client having sent a body only to see it refused."""
    if request.version != HttpVersion11 or request.headers.get("Expect", "").lower() != "100-continue":
        return None
    try:
        target = resolve_target(request.method, request.raw_path)
    except errors.GatewayError:
        return None
    limit = request.app[STATE].config.limits.max_body_bytes
    if target.kind != "proxy" or (request.content_length or 0) > limit:
        return None
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the answer proper has not started (as aiohttp's default handler)
    return None


def add_routes(app: web.Application) -> None:
    """One catch-all route: aiohttp's own matching (on decoded, unnormalised paths) decides nothing.
    `[\\s\\S]`, not `.`: a decoded path may hold a newline (%0a), and must still reach the middleware's
    verdict, Expect header included."""
    app.router.add_route("*", r"/{path:[\s\S]*}", dispatch, expect_handler=continue_if_readable)
