"""Issue 10, a broken pod is visible: a 2xx answer to a generation request that is not what vLLM sends
(a non-streamed body that is not JSON, a stream that is not SSE) gets the client a 502 and charges the
pod; answers shaped like vLLM's pass untouched."""

from __future__ import annotations

import pytest
from aiohttp import web
from gateway_fakes import pool_config
from hostile_support import ScriptedPod, assert_openai_error, build_request, send_raw

from gateway.answer_check import answer_problem
from gateway.state import STATE

JSON = [("Content-Type", "application/json")]
CHAT = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]'


def chat(stream: bool) -> bytes:
    return CHAT + (b', "stream": true}' if stream else b"}")


class Script:
    """What the scripted pod answers next: content type and body chunks."""

    def __init__(self) -> None:
        self.content_type = "application/json"
        self.chunks: list[bytes] = [b'{"id": "chatcmpl-1", "choices": []}']

    async def answer(self, request: web.Request, body: bytes) -> web.StreamResponse:
        headers = {"Content-Type": self.content_type}
        if len(self.chunks) == 1:  # with its Content-Length: the whole body arrives with the headers
            return web.Response(body=self.chunks[0], headers=headers)
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        for chunk in self.chunks:
            await resp.write(chunk)
        await resp.write_eof()
        return resp


@pytest.fixture
async def scripted():
    script = Script()
    pod = ScriptedPod(script.answer)
    await pod.start()
    yield script, pod
    await pod.stop()


BROKEN = [
    (False, "application/json", [b"<html>502 Bad Gateway</html>"]),
    (False, "text/html", [b"<html>oops</html>"]),
    (False, "application/json", [b""]),
    (False, "application/json", [b"[1, 2]"]),
    (False, "application/json", [b'{"id": "chatcmpl-1", "choi']),  # whole, but cut: not JSON
    (True, "application/json", [b'{"id": "chatcmpl-1"}']),
    (True, "text/event-stream", [b"<html>oops</html>"]),
    (True, "text/event-stream", [b""]),
]


@pytest.mark.parametrize(("stream", "content_type", "chunks"), BROKEN)
async def test_a_malformed_2xx_answer_is_502_and_charges_the_pod(
    scripted, start_gateway, stream, content_type, chunks
):
    script, pod = scripted
    script.content_type, script.chunks = content_type, chunks
    gw = await start_gateway(pool_config([pod.url], health={"eject_after": 2}, retries={"max_retries": 0}))
    resp = await send_raw(gw.url, build_request("POST", "/v1/chat/completions", JSON, chat(stream)))
    error = assert_openai_error(resp, 502)
    assert error["code"] == "upstream_bad_answer"
    (ep,) = gw.app[STATE].pools.endpoints()
    assert ep.consecutive_failures == 1
    await send_raw(gw.url, build_request("POST", "/v1/chat/completions", JSON, chat(stream)))
    assert not ep.healthy  # eject_after = 2: the pod's own failures eject it


WELL_FORMED = [
    (False, "application/json", [b'{"id": "chatcmpl-1", "choices": []}']),
    (False, "application/json; charset=utf-8", [b'  {"id": "chatcmpl-1",', b' "choices": []}']),  # 2 chunks
    (True, "text/event-stream; charset=utf-8", [b'data: {"id": 1}\n\n', b"data: [DONE]\n\n"]),
    (True, "text/event-stream", [b": keep-alive\n\n", b'data: {"id": 1}\n\n']),
]


@pytest.mark.parametrize(("stream", "content_type", "chunks"), WELL_FORMED)
async def test_well_formed_answers_pass_untouched(scripted, start_gateway, stream, content_type, chunks):
    script, pod = scripted
    script.content_type, script.chunks = content_type, chunks
    gw = await start_gateway(pool_config([pod.url]))
    resp = await send_raw(gw.url, build_request("POST", "/v1/chat/completions", JSON, chat(stream)))
    assert resp.status == 200
    assert resp.body == b"".join(chunks)
    (ep,) = gw.app[STATE].pools.endpoints()
    assert ep.consecutive_failures == 0 and ep.healthy


async def test_other_routes_are_not_judged(scripted, start_gateway):
    script, pod = scripted
    script.content_type, script.chunks = "text/plain", [b"not json"]
    gw = await start_gateway(pool_config([pod.url]))
    resp = await send_raw(
        gw.url, build_request("POST", "/v1/embeddings", JSON, b'{"model": "m", "input": "x"}')
    )
    assert resp.status == 200 and resp.body == b"not json"


@pytest.mark.parametrize(
    ("streamed", "headers", "first", "complete", "broken"),
    [
        (True, {"Content-Type": "text/event-stream"}, b"da", False, False),  # a first read cut short
        (True, {"Content-Type": "text/event-stream"}, b"\n\ndata: {}", False, False),
        (True, {"Content-Type": "text/event-stream"}, b"dat!", False, True),
        (False, {"Content-Type": "application/json"}, b'{"a": ', False, False),  # the rest is to come
        (False, {"Content-Type": "application/json"}, b"<", False, True),
        (False, {"Content-Type": "application/json", "Content-Encoding": "gzip"}, b"\x1f\x8b", True, False),
        (False, {}, b"{}", True, True),
    ],
)
def test_answer_checks_at_their_boundaries(streamed, headers, first, complete, broken):
    problem = answer_problem("/v1/completions", streamed, 200, headers, first, complete)
    assert (problem is not None) == broken, problem
    assert answer_problem("/v1/completions", streamed, 400, headers, first, complete) is None
    assert answer_problem("/v1/embeddings", streamed, 200, headers, first, complete) is None
