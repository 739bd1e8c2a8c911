"""OpenTelemetry tracing (gateway/tracing.py) through a real gateway on fake pods, spans read back from
the SDK's InMemorySpanExporter: the request span continues the client's W3C trace, routing and each
attempt get child spans, the P/D steps too, and every pod is sent the traceparent of the span that
called it. Without the `otel` extra, tracing on is a one-line error (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from gateway_fakes import FakePod, pool_config
from helpers import eventually

from gateway.app import build_app
from gateway.config import config_from_mapping
from gateway.tracing import TRACER

ROOT = Path(__file__).resolve().parents[2]
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
BODY = {"model": "m", "prompt": "hello there", "max_tokens": 2}


@pytest.fixture
def exporter() -> Any:
    memory = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")
    return memory.InMemorySpanExporter()


@pytest.fixture
async def traced_gateway(exporter):
    """Start a gateway with tracing on, its spans going to `exporter`."""
    runners: list[web.AppRunner] = []

    async def start(config) -> str:
        app = build_app(config, span_exporter=exporter)
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


def traced(urls: list[str], **sections: Any):
    return pool_config(urls, tracing={"enabled": True}, **sections)


def by_name(spans: list[Any], name: str) -> list[Any]:
    return [s for s in spans if s.name == name]


def parent_of(header: str) -> tuple[str, str]:
    """(trace id, parent span id) of a traceparent header."""
    _version, trace_id, span_id, _flags = header.split("-")
    return trace_id, span_id


def hexes(span: Any) -> tuple[str, str]:
    ctx = span.get_span_context()
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


async def test_the_request_span_continues_the_clients_trace_and_the_pod_gets_the_attempts(
    fake_pods, traced_gateway, exporter, client
):
    (pod,) = await fake_pods(1)
    url = await traced_gateway(traced([pod.url], policy="cache_aware"))
    headers = {"traceparent": TRACEPARENT, "X-Request-Id": "rid-t"}
    async with client.post(url + "/v1/completions", json=BODY, headers=headers) as r:
        assert r.status == 200
        cached = int(r.headers["x-kvgate-cached-tokens"])
    await eventually(lambda: by_name(exporter.get_finished_spans(), "POST /v1/completions"),
                     what="the request span")
    spans = exporter.get_finished_spans()
    (root,) = by_name(spans, "POST /v1/completions")
    (route,) = by_name(spans, "kvgate.route")
    (upstream,) = by_name(spans, "kvgate.upstream")
    assert hexes(root)[0] == CLIENT_TRACE and f"{root.parent.span_id:016x}" == CLIENT_SPAN
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["kvgate.request_id"] == "rid-t"
    assert root.attributes["kvgate.endpoint"] == pod.url
    for child in (route, upstream):
        assert child.parent.span_id == root.get_span_context().span_id
        assert hexes(child)[0] == CLIENT_TRACE
    assert route.attributes["kvgate.policy"] == "cache_aware"
    assert route.attributes["kvgate.endpoint"] == pod.url
    assert route.attributes["kvgate.reason"]
    assert route.attributes["kvgate.cached_tokens"] == cached
    assert upstream.attributes["server.address"] == pod.url
    assert upstream.attributes["http.response.status_code"] == 200
    assert parent_of(pod.seen[-1]["headers"]["traceparent"]) == hexes(upstream)
    assert upstream.start_time >= route.end_time  # picked, then sent


async def test_a_request_without_traceparent_starts_a_trace(fake_pods, traced_gateway, exporter, client):
    (pod,) = await fake_pods(1)
    url = await traced_gateway(traced([pod.url]))
    async with client.post(url + "/v1/completions", json=BODY) as r:
        assert r.status == 200
    await eventually(lambda: by_name(exporter.get_finished_spans(), "POST /v1/completions"),
                     what="the request span")
    spans = exporter.get_finished_spans()
    (root,) = by_name(spans, "POST /v1/completions")
    (upstream,) = by_name(spans, "kvgate.upstream")
    assert root.parent is None
    assert parent_of(pod.seen[-1]["headers"]["traceparent"]) == hexes(upstream)
    assert hexes(upstream)[0] == hexes(root)[0]


async def test_each_attempt_has_its_span_and_each_pod_its_traceparent(fake_pods, traced_gateway, exporter,
                                                                      client):
    bad, good = await fake_pods(2)
    bad.status = 503
    url = await traced_gateway(traced([bad.url, good.url], retries={"max_retries": 1}))
    for _ in range(2):  # round robin: one request starts on the 503 pod, then retries
        async with client.post(url + "/v1/completions", json=BODY, headers={"traceparent": TRACEPARENT}) as r:
            assert r.status == 200
    await eventually(lambda: len(by_name(exporter.get_finished_spans(), "POST /v1/completions")) == 2,
                     what="both request spans")
    spans = exporter.get_finished_spans()
    upstream = by_name(spans, "kvgate.upstream")
    assert len(by_name(spans, "kvgate.route")) == len(upstream) == 3
    failed = [s for s in upstream if s.attributes["server.address"] == bad.url]
    (failed_span,) = failed
    assert not failed_span.status.is_ok
    assert failed_span.attributes["kvgate.attempt"] == 0
    (retried,) = [s for s in upstream if s.attributes["kvgate.attempt"] == 1]
    assert retried.parent.span_id == failed_span.parent.span_id  # the same request
    assert parent_of(bad.seen[0]["headers"]["traceparent"]) == hexes(failed_span)
    assert {parent_of(seen["headers"]["traceparent"]) for seen in good.seen} == {
        hexes(s) for s in upstream if s.attributes["server.address"] == good.url
    }
    roots = by_name(spans, "POST /v1/completions")
    assert sorted(r.attributes["kvgate.retries"] for r in roots) == [0, 1]


class PDPod(FakePod):
    """A fake pod that answers a prefill copy (kv_transfer_params.do_remote_decode) as vLLM's
    NixlConnector does: a non-streamed answer carrying the params for the decode pod."""

    async def api(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = orjson.loads(raw) if raw else {}
        if (body.get("kv_transfer_params") or {}).get("do_remote_decode"):
            self.seen.append({"path": request.path, "headers": request.headers.copy(), "body": body})
            params = {"do_remote_prefill": True, "remote_engine_id": "e0", "remote_block_ids": [1],
                      "remote_host": "127.0.0.1", "remote_port": 1}  # fmt: skip
            return web.json_response({"id": "p", "choices": [{"text": "x"}], "kv_transfer_params": params})
        return await super().api(request)


async def test_pd_steps_are_spans_under_the_attempt_and_each_pod_gets_its_own(traced_gateway, exporter,
                                                                              client):
    prefill, decode = PDPod(name="prefill"), PDPod(name="decode")
    for pod in (prefill, decode):
        await pod.start()
    try:
        config = config_from_mapping({
            "pools": {"m": {
                "policy": {"name": "least_request"},
                "endpoints": [{"url": prefill.url, "role": "prefill"}, {"url": decode.url, "role": "decode"}],
                "pd": {"threshold_tokens": 1},
            }},
            "health": {"interval": 0.2, "timeout": 0.2},
            "scrape": {"interval": 0},
            "tracing": {"enabled": True},
        })  # fmt: skip
        url = await traced_gateway(config)
        body = {**BODY, "prompt": "a long enough prompt " * 20, "stream": True}
        async with client.post(url + "/v1/completions", json=body, headers={"traceparent": TRACEPARENT}) as r:
            assert r.status == 200
            assert r.headers["x-kvgate-prefill-endpoint"] == prefill.url
            await r.read()
        await eventually(lambda: by_name(exporter.get_finished_spans(), "POST /v1/completions"),
                         what="the request span")
    finally:
        for pod in (prefill, decode):
            await pod.stop()
    spans = exporter.get_finished_spans()
    (attempt,) = by_name(spans, "kvgate.upstream")
    (pre,) = by_name(spans, "kvgate.prefill")
    (dec,) = by_name(spans, "kvgate.decode")
    for step in (pre, dec):
        assert step.parent.span_id == attempt.get_span_context().span_id
        assert hexes(step)[0] == CLIENT_TRACE
    assert pre.attributes["server.address"] == prefill.url and pre.attributes["kvgate.result"] == "ok"
    assert dec.attributes["server.address"] == decode.url
    assert pre.end_time <= dec.start_time and dec.end_time <= attempt.end_time
    (prefill_seen,) = prefill.seen
    assert parent_of(prefill_seen["headers"]["traceparent"]) == hexes(pre)
    assert parent_of(decode.seen[-1]["headers"]["traceparent"]) == hexes(dec)


async def test_access_lines_carry_the_trace_id(fake_pods, exporter, client):
    from test_access_log import Lines

    from gateway.app import ACCESS_LOG

    (pod,) = await fake_pods(1)
    app = build_app(traced([pod.url]), span_exporter=exporter)
    lines = Lines()
    app[ACCESS_LOG].sink = lambda: lines
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with client.post(url + "/v1/completions", json=BODY, headers={"traceparent": TRACEPARENT}) as r:
            assert r.status == 200
        await eventually(lambda: len(lines.lines()) == 1, what="the access-log line")
    finally:
        await runner.cleanup()
    assert lines.records()[0]["trace_id"] == CLIENT_TRACE


async def test_tracing_off_builds_no_tracer_and_passes_the_clients_traceparent(fake_pods, start_gateway,
                                                                               client):
    (pod,) = await fake_pods(1)
    gw = await start_gateway(pool_config([pod.url]))
    assert TRACER not in gw.app
    async with client.post(gw.url + "/v1/completions", json=BODY, headers={"traceparent": TRACEPARENT}) as r:
        assert r.status == 200
    assert pod.seen[-1]["headers"]["traceparent"] == TRACEPARENT


BLOCKER = """\
import sys


class _Blocker:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] == "opentelemetry":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _Blocker)
"""


@pytest.mark.timeout(60)
def test_tracing_on_without_the_extra_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    config = tmp_path / "kvgate.yaml"
    config.write_text("pools: {m: {endpoints: [{url: 'http://127.0.0.1:9'}]}}\ntracing: {enabled: true}\n")
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--port", "0"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "kvgate serve: tracing.enabled needs the optional packages opentelemetry-api and opentelemetry-sdk: "
        "pip install 'kvgate[otel]'"
    ]


def test_an_otlp_exporter_that_is_not_installed_is_a_config_error() -> None:
    pytest.importorskip("opentelemetry.sdk")
    try:
        import opentelemetry.exporter.otlp  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("opentelemetry-exporter-otlp is installed")
    from gateway.tracing import TracingUnavailable

    config = pool_config(["http://127.0.0.1:9"], tracing={"enabled": True, "exporter": "otlp"})
    with pytest.raises(TracingUnavailable, match="opentelemetry-exporter-otlp"):
        build_app(config)


def test_tracing_keys_are_checked() -> None:
    with pytest.raises(ValueError, match=r"tracing\.sample_ratio"):
        pool_config(["http://a"], tracing={"sample_ratio": 1.5})
    with pytest.raises(ValueError, match="tracing: unknown keys"):
        pool_config(["http://a"], tracing={"endpoint": "x"})


async def test_sampled_out_requests_export_nothing_and_still_propagate(fake_pods, traced_gateway, exporter,
                                                                        client):
    (pod,) = await fake_pods(1)
    url = await traced_gateway(pool_config([pod.url], tracing={"enabled": True, "sample_ratio": 0.0}))
    async with client.post(url + "/v1/completions", json=BODY) as r:
        assert r.status == 200
    sent = pod.seen[-1]["headers"]["traceparent"]
    assert int(sent.rsplit("-", 1)[1], 16) & 1 == 0  # not sampled: the pod is told so
    async with client.post(url + "/v1/completions", json=BODY, headers={"traceparent": TRACEPARENT}) as r:
        assert r.status == 200  # the client's sampled flag wins over the ratio
    await eventually(lambda: by_name(exporter.get_finished_spans(), "POST /v1/completions"),
                     what="the span of the client's sampled trace")
    assert {hexes(s)[0] for s in exporter.get_finished_spans()} == {CLIENT_TRACE}


async def test_a_refused_target_names_its_span_by_method_only(fake_pods, traced_gateway, exporter, client):
    (pod,) = await fake_pods(1)
    url = await traced_gateway(traced([pod.url]))
    async with client.get(url + "/admin/secret-path-123") as r:
        assert r.status == 404
    await eventually(lambda: exporter.get_finished_spans(), what="the refused request's span")
    (span,) = exporter.get_finished_spans()
    assert span.name == "GET" and span.attributes["http.response.status_code"] == 404
