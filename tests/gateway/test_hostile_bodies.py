"""Issue 10, no 500s and nothing but OpenAI errors: bodies nested too deep, content codings that do not
decode or are not supported, decompression bombs, odd Expect headers, broken framing; and a body is
forwarded as the pod will read it (decoded, relabelled, Content-Length of the decoded bytes)."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from unittest import mock

import orjson
import pytest
from aiohttp import web
from aiohttp.http_exceptions import TransferEncodingError
from aiohttp.streams import StreamReader
from aiohttp.test_utils import make_mocked_request
from gateway_fakes import pool_config
from hostile_support import assert_openai_error, build_request, send_raw

from gateway.errors import GatewayError
from gateway.request_body import MAX_JSON_DEPTH, content_codings, decode_body, read_body
from prefixindex.prompt import PromptError, check_prompt_nesting, prompt_tokens
from prefixindex.tokenizer import WordTokenizer

JSON = [("Content-Type", "application/json")]


def completion(prompt: object, **extra: object) -> bytes:
    return orjson.dumps({"model": "m", "prompt": prompt, "max_tokens": 2, **extra})


def nested(depth: int, inner: object = "x") -> object:
    value = inner
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("policy", ["least_request", "cache_aware"])
async def test_deeply_nested_prompt_is_400_for_every_policy(fake_pods, start_gateway, policy):
    (pod,) = await fake_pods(1)
    gw = await start_gateway(pool_config([pod.url], policy=policy))
    # ~1000 nested arrays: the RecursionError. The JSON parser accepts them.
    raw = b'{"model": "m", "prompt": ' + b"[" * 1000 + b'"x"' + b"]" * 1000 + b"}"
    for body in (raw, completion(nested(3)), completion(nested(2)), completion(nested(3, 7))):
        resp = await send_raw(gw.url, build_request("POST", "/v1/completions", JSON, body))
        assert_openai_error(resp, 400)
    for ok in (completion(nested(1)), completion([[1, 2], [3]]), completion("x")):
        resp = await send_raw(gw.url, build_request("POST", "/v1/completions", JSON, ok))
        assert resp.status == 200, resp.body
    assert len(pod.seen) == 3


async def test_body_nesting_limit_is_exact(fake_pods, start_gateway):
    (pod,) = await fake_pods(1)
    gw = await start_gateway(pool_config([pod.url]))
    # the body object is level 1: MAX_JSON_DEPTH - 1 more levels of `extra` fill it exactly
    at_limit = completion("x", extra=nested(MAX_JSON_DEPTH - 2, {}))
    over = completion("x", extra=nested(MAX_JSON_DEPTH - 1, {}))
    resp = await send_raw(gw.url, build_request("POST", "/v1/completions", JSON, at_limit))
    assert resp.status == 200, resp.body
    resp = await send_raw(gw.url, build_request("POST", "/v1/completions", JSON, over))
    error = assert_openai_error(resp, 400)
    assert str(MAX_JSON_DEPTH) in error["message"]
    assert len(pod.seen) == 1


def test_prompt_extraction_is_iterative_and_refuses_a_batch_of_batches():
    tok = WordTokenizer()
    assert prompt_tokens({"prompt": [[5, 6], [7]]}, "/v1/completions", tok) == [5, 6]
    assert prompt_tokens({"prompt": ["a b", "c"]}, "/v1/completions", tok) == tok.encode("a b")
    for deep in (nested(2), nested(3, 1), nested(5000)):  # 5000: far past the recursion limit
        with pytest.raises(PromptError):
            prompt_tokens({"prompt": deep}, "/v1/completions", tok)
        with pytest.raises(PromptError):
            check_prompt_nesting(deep)
    check_prompt_nesting(nested(1))
    check_prompt_nesting([[1]])


async def test_gzip_and_deflate_bodies_reach_the_pod_decoded_and_relabelled(fake_pods, start_gateway):
    (pod,) = await fake_pods(1)
    gw = await start_gateway(pool_config([pod.url]))
    body = completion("hello there")
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    encodings = [
        ("gzip", gzip.compress(body)),
        ("x-gzip", gzip.compress(body)),
        ("deflate", zlib.compress(body)),
        ("deflate", raw_deflate.compress(body) + raw_deflate.flush()),  # deflate without its zlib header
        ("gzip, gzip", gzip.compress(gzip.compress(body))),
        ("identity", body),
    ]
    for coding, data in encodings:
        headers = [*JSON, ("Content-Encoding", coding)]
        for chunked in (False, True):
            resp = await send_raw(
                gw.url, build_request("POST", "/v1/completions", headers, data, chunked=chunked)
            )
            assert resp.status == 200, (coding, resp.body)
            seen = pod.seen[-1]
            assert seen["raw"] == body, coding
            assert "Content-Encoding" not in seen["headers"], coding
            assert seen["headers"]["Content-Length"] == str(len(body)), coding


async def test_bodies_that_do_not_decode_are_400_and_unsupported_codings_415(fake_pods, start_gateway):
    (pod,) = await fake_pods(1)
    gw = await start_gateway(pool_config([pod.url]))
    body = completion("hello")
    cases = [
        ("gzip", b"not gzip at all", 400),
        ("gzip", gzip.compress(body)[:-6], 400),  # cut off
        ("gzip", gzip.compress(body) + b"trailing", 400),
        ("deflate", b"\x00\x01garbage", 400),
        ("deflate", zlib.compress(body) + b"x", 400),
        ("zstd", b"(\xb5/\xfd" + body, 415),
        ("br", body, 415),
        ("compress", body, 415),
        ("gzip, gzip, gzip", body, 415),
        ("gzip;q=1", body, 415),
    ]
    for coding, data, status in cases:
        headers = [*JSON, ("Content-Encoding", coding)]
        resp = await send_raw(gw.url, build_request("POST", "/v1/completions", headers, data))
        assert resp.from_gateway
        assert_openai_error(resp, status)
    assert pod.seen == []


async def test_decompression_bomb_is_413_at_exactly_one_byte_over(fake_pods, start_gateway):
    (pod,) = await fake_pods(1)
    limit = 4000
    gw = await start_gateway(pool_config([pod.url], limits={"max_body_bytes": limit}))
    prefix = b'{"model": "m", "max_tokens": 2, "prompt": "'
    fits = prefix + b"a" * (limit - len(prefix) - 2) + b'"}'
    assert len(fits) == limit
    over = fits[:-2] + b'a"}'
    headers = [*JSON, ("Content-Encoding", "gzip")]
    resp = await send_raw(gw.url, build_request("POST", "/v1/completions", headers, gzip.compress(fits)))
    assert resp.status == 200
    resp = await send_raw(gw.url, build_request("POST", "/v1/completions", headers, gzip.compress(over)))
    assert_openai_error(resp, 413)
    bomb = gzip.compress(b"a" * (64 << 20))  # 64 MiB of output from ~64 KiB on the wire
    resp = await send_raw(gw.url, build_request("POST", "/v1/completions", headers, bomb))
    assert_openai_error(resp, 413)
    assert len(pod.seen) == 1


def test_decode_body_bounds_every_layer():
    data = gzip.compress(gzip.compress(b"x" * 100))
    assert decode_body(data, ["gzip", "gzip"], 100) == b"x" * 100
    with pytest.raises(GatewayError) as info:
        decode_body(data, ["gzip", "gzip"], 99)
    assert info.value.status == 413
    assert content_codings(["gzip, identity", "deflate"]) == ["gzip", "deflate"]
    assert content_codings([" Identity ", ""]) == []


@pytest.mark.parametrize("expect", ["foo", "100-continue, foo", "200-ok", "  "])
async def test_odd_expect_headers_get_an_openai_417(fake_pods, start_gateway, expect):
    (pod,) = await fake_pods(1)
    gw = await start_gateway(pool_config([pod.url]))
    for target in ("/v1/completions", "/v1/embeddings", "/tokenize"):
        resp = await send_raw(
            gw.url, build_request("POST", target, [*JSON, ("Expect", expect)], completion("x"))
        )
        assert_openai_error(resp, 417)
    assert pod.seen == []


async def test_expect_100_continue_is_honoured_only_for_a_body_the_gateway_will_read(
    fake_pods, start_gateway
):
    (pod,) = await fake_pods(1)
    gw = await start_gateway(pool_config([pod.url], limits={"max_body_bytes": 1000}))
    body = completion("x")
    resp = await send_raw(
        gw.url, build_request("POST", "/v1/completions", [*JSON, ("Expect", "100-Continue")], body)
    )
    assert resp.status == 200
    assert "Expect" not in pod.seen[-1]["headers"]  # answered by the gateway, not passed on
    # a declared size over the limit: 413 at once, without a 100 Continue
    head = build_request(
        "POST",
        "/v1/completions",
        [*JSON, ("Expect", "100-continue"), ("Content-Length", "5000")],
        content_length=False,
    )
    resp = await send_raw(gw.url, head)
    assert_openai_error(resp, 413)


@pytest.mark.parametrize(
    "exc",
    [
        web.RequestPayloadError("400, message:\n  Not enough data to satisfy content length header."),
        TransferEncodingError("Invalid character in chunk size"),
    ],
)
async def test_framing_that_breaks_while_the_body_is_read_is_an_openai_400(exc):
    """What aiohttp raises from request.read() when the body's framing breaks after the handler started."""
    protocol = mock.Mock(_reading_paused=False)
    payload = StreamReader(protocol, 2**16, loop=asyncio.get_running_loop())
    payload.set_exception(exc)
    request = make_mocked_request(
        "POST", "/v1/completions", headers={"Content-Length": "10"}, payload=payload
    )
    with pytest.raises(GatewayError) as info:
        await read_body(request, 1000, 5.0)
    assert info.value.status == 400 and info.value.reason == "bad_framing"
    assert "Traceback" not in info.value.message


async def test_framing_broken_before_any_handler_runs_is_an_openai_400_without_traceback(
    fake_pods, start_gateway, caplog
):
    (pod,) = await fake_pods(1)
    gw = await start_gateway(pool_config([pod.url]))
    for data in (
        b"GARBAGE\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    ):
        resp = await send_raw(gw.url, data)
        assert_openai_error(resp, 400)  # aiohttp's own answer, in the gateway's error shape
    assert not [r for r in caplog.records if r.exc_info], "a client's bad HTTP logged a traceback"
    assert pod.seen == []


async def _open(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(parts[0], int(parts[1]))


def _head(length: int) -> bytes:
    return (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n" % length
    )


@pytest.mark.timeout(20)
async def test_a_client_that_stalls_mid_body_gets_an_openai_408(fake_pods, start_gateway):
    """The hang left open by issue 10: headers, part of the body, then silence. The request must end."""
    from hostile_support import read_response

    (pod,) = await fake_pods(1)
    gw = await start_gateway(pool_config([pod.url], timeouts={"client_body": 0.3}))
    body = completion("x")
    reader, writer = await _open(gw.url)
    writer.write(_head(len(body)) + body[:10])
    await writer.drain()
    resp = await read_response(reader, within=10)
    writer.close()
    assert_openai_error(resp, 408)
    assert orjson.loads(resp.body)["error"]["code"] == "request_timeout"
    assert pod.seen == []


@pytest.mark.timeout(20)
async def test_a_slow_upload_whose_every_gap_is_under_the_timeout_is_served(fake_pods, start_gateway):
    """The timeout is on silence, not on the whole upload: each chunk resets it."""
    from hostile_support import read_response

    (pod,) = await fake_pods(1)
    gw = await start_gateway(pool_config([pod.url], timeouts={"client_body": 0.5}))
    body = completion("a slow client")
    reader, writer = await _open(gw.url)
    writer.write(_head(len(body)))
    for i in range(0, len(body), 8):  # the whole upload takes ~5 gaps of 0.15 s: longer than 0.5 s
        writer.write(body[i : i + 8])
        await writer.drain()
        await asyncio.sleep(0.15)  # the client's pace, not a wait for the server
    resp = await read_response(reader, within=10)
    writer.close()
    assert resp.status == 200, resp.body
    assert len(pod.seen) == 1


def test_client_body_timeout_must_be_positive():
    with pytest.raises(ValueError, match="client_body"):
        pool_config(["http://127.0.0.1:1"], timeouts={"client_body": 0})
