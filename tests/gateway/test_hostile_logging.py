"""Issue 10, logs: malformed traffic is counted (kvgate_rejected_requests_total{reason}) and summarised
in one line per interval; no client error logs a traceback, or a line of its own."""

from __future__ import annotations

import logging
import re

import aiohttp
from gateway_fakes import pool_config
from helpers import eventually
from hostile_support import build_request, send_raw
from prometheus_client import CollectorRegistry

from gateway.rejections import ProtocolLog, Rejections

JSON = [("Content-Type", "application/json")]
MALFORMED = [
    (build_request("POST", "/v1/%2e%2e/kvgate_sim/fault", JSON, b"{}"), "bad_target"),
    (build_request("POST", "http://x/v1/completions", JSON, b"{}"), "bad_target"),
    (build_request("POST", "/v1/completions", JSON, b'{"model": "m", "prompt": '), "invalid_json"),
    (
        build_request("POST", "/v1/completions", JSON, b'{"prompt": ' + b"[" * 900 + b"]" * 900 + b"}"),
        "too_deep",
    ),
    (build_request("POST", "/v1/completions", [("Content-Encoding", "gzip")], b"nope"), "bad_encoding"),
    (build_request("POST", "/v1/completions", [("Content-Encoding", "zstd")], b"x"), "unsupported_encoding"),
    (build_request("POST", "/v1/completions", [("Expect", "x")], b"{}"), "expectation_failed"),
    (build_request("GET", "/admin"), "unknown_route"),
    (build_request("TRACE", "/v1/completions"), "method_not_allowed"),
    (b"GARBAGE\r\n\r\n", "protocol"),
    (b"POST /v1/completions HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n{}", "protocol"),
]
SUMMARY = re.compile(r"refused (\d+) request\(s\) in the last")


async def test_a_burst_of_malformed_requests_is_counted_and_summarised(fake_pods, start_gateway, caplog):
    caplog.set_level(logging.DEBUG)
    (pod,) = await fake_pods(1)
    gw = await start_gateway(pool_config([pod.url], logs={"rejected_interval": 0.1}))
    rounds = 20
    for _ in range(rounds):
        for data, _reason in MALFORMED:
            resp = await send_raw(gw.url, data)
            assert 400 <= resp.status < 500
    total = rounds * len(MALFORMED)

    def summarised() -> int:
        return sum(int(m.group(1)) for r in caplog.records if (m := SUMMARY.search(r.getMessage())))

    await eventually(lambda: summarised() == total, within=5, what="summary lines counting every request")
    assert not [r for r in caplog.records if r.exc_info], "a client error logged a traceback"
    per_request = [
        r for r in caplog.records if r.levelno >= logging.INFO and not SUMMARY.search(r.getMessage())
    ]
    assert len(per_request) < 10, [r.getMessage() for r in per_request]  # startup lines at most
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/metrics") as r:
        text = await r.text()
    expected: dict[str, int] = {}
    for _data, reason in MALFORMED:
        expected[reason] = expected.get(reason, 0) + rounds
    for reason, n in expected.items():
        assert f'kvgate_rejected_requests_total{{reason="{reason}"}} {float(n)}' in text, reason
    assert pod.seen == []


def test_one_summary_line_per_flush_and_none_when_quiet(caplog):
    caplog.set_level(logging.WARNING, logger="kvgate.rejections")
    now = [0.0]
    rejections = Rejections(CollectorRegistry(), clock=lambda: now[0])
    for reason in ("bad_target", "bad_target", "invalid_json"):
        rejections.count(reason)
    now[0] = 10.0
    rejections.flush()
    rejections.flush()  # nothing new: no line
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["refused 3 request(s) in the last 10 s: bad_target=2, invalid_json=1"]


def test_protocol_log_counts_parse_errors_and_passes_the_rest(caplog):
    from aiohttp.http_exceptions import BadHttpMessage

    caplog.set_level(logging.DEBUG, logger="aiohttp.server")
    rejections = Rejections(CollectorRegistry())
    logger = ProtocolLog(rejections)
    logger.exception("Error handling request from %s", "1.2.3.4", exc_info=BadHttpMessage("bad"))
    logger.debug("Error handling request from %s", "1.2.3.4", exc_info=BadHttpMessage("bad"))
    assert caplog.records == []
    assert rejections._pending == {"protocol": 2}
    logger.exception("Error handling request", exc_info=RuntimeError("a gateway bug"))
    assert [r.exc_info is not None for r in caplog.records] == [True]  # real bugs keep their traceback
