"""The pod's HTTP API: vLLM 0.32's OpenAI-compatible routes on aiohttp.

POST /v1/completions, POST /v1/chat/completions (JSON, or SSE `data: {json}\\n\\n` ... `data: [DONE]\\n\\n`),
GET /v1/models, GET /health, GET /version, POST /tokenize, POST /detokenize, GET /metrics,
POST /reset_prefix_cache; and the simulator's own POST /kvgate_sim/release_kv (P/D side channel),
GET /kvgate_sim/stats (modelled vs actual step time), POST /kvgate_sim/fault (dead engine, slowdown)
and GET /kvgate_sim/paths (every method and raw target the pod was asked for, so a test can check
what a gateway in front let through).
`X-Request-Id` sets the response id (`cmpl-<id>`, `chatcmpl-<id>`) and is echoed as a header.
A client that disconnects aborts its requests, as in vLLM.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from bench.sim import protocol as p
from bench.sim.engine import PromptTooLong, SimEngine, SimRequest
from bench.sim.pd import RELEASE_PATH, parse_transfer_params, prefill_params
from bench.sim.pod import SimPod

log = logging.getLogger(__name__)
POD = web.AppKey("pod", SimPod)
# The simulator's own routes, not part of vLLM's API: accounting and fault injection.
STATS_PATH = "/kvgate_sim/stats"
FAULT_PATH = "/kvgate_sim/fault"
PATHS_PATH = "/kvgate_sim/paths"
_JSON = "application/json"
_METRICS_TYPE = CONTENT_TYPE_LATEST
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8"}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class PathLog:
    """Every (method, raw target) asked of the pod, with its count; at most `limit` distinct ones are
    kept, the requests for others are counted in `overflow`."""

    def __init__(self, limit: int = 20_000) -> None:
        self.limit = limit
        self.seen: dict[tuple[str, str], int] = {}
        self.overflow = 0

    def add(self, method: str, target: str) -> None:
        key = (method, target)
        if key in self.seen or len(self.seen) < self.limit:
            self.seen[key] = self.seen.get(key, 0) + 1
        else:
            self.overflow += 1


PATHS = web.AppKey("paths", PathLog)


def build_app(pod: SimPod) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[_record_path, _errors])
    app[POD] = pod
    app[PATHS] = PathLog()
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/version", version)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/reset_prefix_cache", reset_prefix_cache)
    app.router.add_post(RELEASE_PATH, release_kv)
    app.router.add_get(STATS_PATH, sim_stats)
    app.router.add_post(FAULT_PATH, sim_fault)
    app.router.add_get(PATHS_PATH, sim_paths)
    return app


@web.middleware
async def _record_path(request: web.Request, handler: Handler) -> web.StreamResponse:
    request.app[PATHS].add(request.method, request.raw_path)  # as received, before any decoding
    return await handler(request)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Unknown paths and methods answer as vLLM's Starlette does (`{"detail": ...}`); a bug in the
    simulator answers an OpenAI-shaped 500, never a stack trace."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as exc:
        return _json({"detail": "Method Not Allowed"}, 405, {"Allow": ", ".join(sorted(exc.allowed_methods))})
    except web.HTTPNotFound:
        return _json({"detail": "Not Found"}, 404)
    except (web.HTTPException, asyncio.CancelledError, ConnectionError):
        raise
    except Exception as exc:
        log.exception("simulator error on %s %s", request.method, request.path)
        return _error(p.APIError(f"{type(exc).__name__}: {exc}", 500, "InternalServerError"))


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=_JSON, headers=headers)


def _error(exc: p.APIError) -> web.Response:
    return _json(exc.body(), exc.status)


ENGINE_DEAD = "EngineCore encountered an issue. See stack trace (above) for the root cause."


def _engine_dead() -> p.APIError:
    """vLLM's EngineDeadError as the API reports it."""
    return p.APIError(ENGINE_DEAD, 500, "InternalServerError")


def _engine(pod: SimPod) -> SimEngine:
    if pod.engine is None:
        raise p.APIError("The engine is not running", 503, "ServiceUnavailableError")
    if pod.dead:
        raise _engine_dead()
    return pod.engine


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def _generate(request: web.Request, *, chat: bool) -> web.StreamResponse:
    pod = request.app[POD]
    cfg = pod.config
    try:
        engine = _engine(pod)
        body = p.parse_json_body(await request.read())
        lora = p.check_model(body, cfg.model, pod.adapters)
        gen = p.parse_generation(body, chat=chat, tokenizer=pod.tokenizer, max_model_len=cfg.max_model_len)
        # A plain pod (role "both") has no KV connector and ignores kv_transfer_params, as vLLM does;
        # prefill and decode pods behave as vLLM with NixlConnector (kv_both): either side works.
        do_remote_decode, remote_prefill = (
            (False, None) if cfg.role == "both" else parse_transfer_params(gen.kv_transfer_params)
        )
    except p.APIError as exc:
        return _error(exc)
    base = request.headers.get("X-Request-Id") or uuid.uuid4().hex[:16]
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{base}"
    reqs = [
        SimRequest(
            pod.next_request_id(rid, i), ids, gen.max_tokens[i], cache_salt=gen.cache_salt,
            lora=pod.adapters[lora] if lora else None,
            do_remote_decode=do_remote_decode, remote_prefill=remote_prefill,
            text_seed=pod.generator.seed_for(ids),
        )
        for i, ids in enumerate(gen.prompts)
    ]
    try:
        for req in reqs:
            engine.submit(req)
    except PromptTooLong as exc:
        for req in reqs:
            engine.abort(req)
        return _error(p.invalid(str(exc), "input_tokens"))
    headers = {"X-Request-Id": base} if cfg.enable_request_id_headers else {}
    try:
        if gen.stream:
            return await _stream(request, pod, gen, reqs, rid, headers)
        for req in reqs:
            while not req.finished:
                await req.wait()
        if pod.dead:  # the engine died under the request
            return _error(_engine_dead())
        return _json(_full_response(pod, gen, reqs, rid), headers=headers)
    finally:
        for req in reqs:
            engine.abort(req)  # no-op for finished requests; frees a gone client's blocks


def _usage(pod: SimPod, gen: p.GenRequest, reqs: Sequence[SimRequest]) -> dict[str, Any]:
    last = reqs[-1]  # vLLM reports the last prompt's cached tokens
    cached = max(last.num_cached_tokens, 0)
    created = None
    if gen.chat:  # vLLM 0.32 fills created_cache_tokens on chat only: full prompt blocks not hit
        bs = pod.config.block_size
        created = max(last.num_prompt // bs * bs - cached, 0)
    return p.usage(sum(r.num_prompt for r in reqs), sum(len(r.output_ids) for r in reqs), cached, created)


def _transfer_params(pod: SimPod, req: SimRequest) -> dict[str, Any] | None:
    held = req.kv_transfer_params
    if not held:
        return None
    return prefill_params(
        engine_id=pod.engine_id, request_id=req.request_id, block_ids=held["remote_block_ids"],
        host=pod.host, port=pod.port, num_tokens=req.num_prompt,
    )


def _full_response(pod: SimPod, gen: p.GenRequest, reqs: Sequence[SimRequest], rid: str) -> dict[str, Any]:
    model, created, fp = _served_name(pod, reqs[0]), int(time.time()), pod.fingerprint
    text = pod.generator.text
    use = _usage(pod, gen, reqs)
    params = _transfer_params(pod, reqs[0])
    if gen.chat:
        req = reqs[0]
        return p.chat_response(rid, model, created, fp, text(req.output_ids), req.finish_reason, use, params)
    return p.completion_response(
        rid, model, created, fp, [text(r.output_ids) for r in reqs], [r.finish_reason for r in reqs],
        use, params,
    )


def _served_name(pod: SimPod, req: SimRequest) -> str:
    """The response's `model`: the adapter's name for a LoRA request, as vLLM answers."""
    lora = req.kv.lora
    return lora.name if lora is not None else pod.config.model


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


async def _stream(
    request: web.Request, pod: SimPod, gen: p.GenRequest, reqs: Sequence[SimRequest], rid: str,
    headers: dict[str, str],
) -> web.StreamResponse:
    resp = web.StreamResponse(headers={**_SSE_HEADERS, **headers})
    await resp.prepare(request)
    model, created, fp = _served_name(pod, reqs[0]), int(time.time()), pod.fingerprint
    text = pod.generator.text
    # vLLM sends a chat stream's role chunk on the first engine output (its first token), not at once.
    role_pending = gen.chat
    for index, req in enumerate(reqs):
        sent = 0
        while True:
            if sent == len(req.output_ids) and not req.finished:
                await req.wait()
            new = req.output_ids[sent:]
            finish = req.finish_reason if req.finished else None
            if not new and finish is None:
                continue
            if finish == "abort" and pod.dead:  # vLLM streams the error, then [DONE]
                await resp.write(_sse(_engine_dead().body()))
                await resp.write(b"data: [DONE]\n\n")
                await resp.write_eof()
                return resp
            if role_pending:
                role_pending = False
                await resp.write(_sse(p.chat_role_chunk(rid, model, created)))
            # vLLM merges the tokens of steps the client was too slow to read into one chunk.
            if gen.chat:
                chunk = p.chat_chunk(rid, model, created, text(new), finish)
            else:
                chunk = p.completion_chunk(rid, model, created, index, text(new), finish)
            sent += len(new)
            if gen.continuous_usage:
                chunk["usage"] = {"prompt_tokens": req.num_prompt, "total_tokens": req.num_prompt + sent,
                                  "completion_tokens": sent}
            if finish is not None and not gen.include_usage and index == len(reqs) - 1:
                chunk["system_fingerprint"] = fp
            await resp.write(_sse(chunk))
            if finish is not None:
                break
    if gen.include_usage:
        await resp.write(_sse(p.usage_chunk(rid, model, created, fp, gen.chat, _usage(pod, gen, reqs))))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def models(request: web.Request) -> web.Response:
    pod = request.app[POD]
    return _json(p.models_response(pod.config.model, pod.config.max_model_len,
                                   pod.config.tokenizer or pod.config.model, pod.adapters.values()))


async def health(request: web.Request) -> web.Response:
    pod = request.app[POD]
    return web.Response(status=200 if pod.engine is not None and not pod.dead else 503)


async def version(request: web.Request) -> web.Response:
    return _json({"version": p.VLLM_VERSION})


async def tokenize(request: web.Request) -> web.Response:
    pod = request.app[POD]
    try:
        body = p.parse_json_body(await request.read())
        p.check_model(body, pod.config.model, pod.adapters)
        if "messages" in body:
            tokens = p.chat_tokens(body, pod.tokenizer)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise p.schema_error("string_type", "body.prompt", "Input should be a valid string", prompt)
            tokens = pod.tokenizer.encode(prompt, p.lax_bool(body, "add_special_tokens", True))
    except p.APIError as exc:
        return _error(exc)
    return _json({"count": len(tokens), "max_model_len": pod.config.max_model_len, "tokens": tokens,
                  "token_strs": None})


async def detokenize(request: web.Request) -> web.Response:
    pod = request.app[POD]
    try:
        body = p.parse_json_body(await request.read())
        p.check_model(body, pod.config.model, pod.adapters)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise p.schema_error("list_type", "body.tokens", "Input should be a valid list", tokens)
        text = await _detokenize(pod, tokens)
    except p.APIError as exc:
        return _error(exc)
    return _json({"prompt": text})


async def _detokenize(pod: SimPod, tokens: list[int]) -> str:
    """Text of token ids, special tokens kept as vLLM's /detokenize does."""
    if not pod.config.tokenizer:  # WordTokenizer cannot invert its hash: only generated words are known
        return pod.generator.text(tokens)
    if pod.decoder is None:  # loaded once, off the event loop
        pod.decoder = await asyncio.to_thread(load_decoder, pod.config.tokenizer)
    return pod.decoder.decode(tokens, skip_special_tokens=False)


def load_decoder(path: str) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path)


async def metrics(request: web.Request) -> web.Response:
    pod = request.app[POD]
    if pod.metrics is None:
        return web.Response(status=503)
    return web.Response(body=pod.metrics.render(), headers={"Content-Type": _METRICS_TYPE})


async def reset_prefix_cache(request: web.Request) -> web.Response:
    engine = request.app[POD].engine
    return _json({"success": bool(engine is not None and engine.reset_prefix_cache())})


async def sim_stats(request: web.Request) -> web.Response:
    engine = request.app[POD].engine
    return _json(engine.stats() if engine is not None else {})


async def sim_paths(request: web.Request) -> web.Response:
    """{"paths": [[method, raw target, count], ...], "overflow": n}; this request itself included."""
    log = request.app[PATHS]
    return _json({"paths": [[m, t, n] for (m, t), n in log.seen.items()], "overflow": log.overflow})


async def sim_fault(request: web.Request) -> web.Response:
    """POST {"dead": bool, "slowdown": float} (both optional) -> the pod's faults now."""
    pod = request.app[POD]
    try:
        body = p.parse_json_body(await request.read())
        dead, slowdown = body.get("dead"), body.get("slowdown")
        if dead is not None and not isinstance(dead, bool):
            raise p.APIError("dead must be a boolean", param="dead")
        if slowdown is not None and (isinstance(slowdown, bool) or not isinstance(slowdown, (int, float))):
            raise p.APIError("slowdown must be a number", param="slowdown")
        return _json(pod.set_fault(dead=dead, slowdown=slowdown))
    except p.APIError as exc:
        return _error(exc)
    except ValueError as exc:
        return _error(p.APIError(str(exc), param="slowdown"))


async def release_kv(request: web.Request) -> web.Response:
    pod = request.app[POD]
    try:
        body = p.parse_json_body(await request.read())
    except p.APIError as exc:
        return _error(exc)
    request_id = body.get("remote_request_id")
    released = bool(pod.engine is not None and isinstance(request_id, str)
                    and pod.engine.release_held(request_id))
    return _json({"released": released})
