"""Shared by the admission tests: an in-process gateway with an `admission` config in front of a
simulated fleet, and a client call that reports status, headers, body and elapsed time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry

from gateway.admission.controller import ADMISSION, AdmissionController
from gateway.app import build_app
from gateway.config import config_from_mapping
from gateway.runner import app_runner

MODEL = "m"
# 10 ms per decode step whatever the batch: a request of N output tokens takes about N x 10 ms
SLOW: dict[str, Any] = {"model": MODEL, "prefill_tps": 1e6, "itl_ms": 10.0, "itl_ms_per_seq": 0.0}


@dataclass
class Gateway:
    url: str
    app: web.Application
    registry: CollectorRegistry

    @property
    def admission(self) -> AdmissionController:
        return self.app[ADMISSION]

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0

    def queued(self) -> int:
        return sum(lane.queue.length for lane in self.admission.lanes.values())


@asynccontextmanager
async def gateway(
    urls: list[str],
    admission: dict[str, Any] | None,
    *,
    policy: str = "least_request",
    params: dict[str, Any] | None = None,
    **extra: Any,
) -> AsyncIterator[Gateway]:
    data: dict[str, Any] = {
        "pools": {
            MODEL: {
                "endpoints": [{"url": u} for u in urls],
                "policy": {"name": policy, "params": params or {}},
            }
        },
        "health": {"interval": 5.0, "timeout": 2.0},
        "scrape": {"interval": 0},
        **extra,
    }
    if admission is not None:
        data["admission"] = admission
    registry = CollectorRegistry()
    app = build_app(config_from_mapping(data), registry=registry)
    runner = app_runner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, backlog=4096).start()
    try:
        yield Gateway(f"http://127.0.0.1:{runner.addresses[0][1]}", app, registry)
    finally:
        await runner.cleanup()


@dataclass
class Answer:
    status: int
    headers: CIMultiDict[str]
    body: dict[str, Any]
    elapsed: float
    tenant: str = ""


def body_bytes(prompt: str, max_tokens: int = 2, model: str = MODEL) -> bytes:
    return orjson.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


async def call(
    http: aiohttp.ClientSession,
    gw: Gateway,
    prompt: str,
    *,
    tenant: str | None = None,
    max_tokens: int = 2,
    model: str = MODEL,
    headers: dict[str, str] | None = None,
) -> Answer:
    h = {"Content-Type": "application/json", **(headers or {})}
    if tenant is not None:
        h["x-kvgate-tenant"] = tenant
    start = time.perf_counter()
    async with http.post(
        gw.url + "/v1/completions", data=body_bytes(prompt, max_tokens, model), headers=h
    ) as resp:
        raw = await resp.read()
    body = orjson.loads(raw) if raw else {}
    # a case-insensitive copy: header names as the gateway wrote them (multidict 4.5 keeps that case)
    return Answer(resp.status, CIMultiDict(resp.headers), body, time.perf_counter() - start, tenant or "")


def spawn(coro: Any) -> asyncio.Task[Any]:
    return asyncio.ensure_future(coro)


def assert_openai_error(answer: Answer, status: int, code: str) -> None:
    assert answer.status == status, answer
    err = answer.body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
