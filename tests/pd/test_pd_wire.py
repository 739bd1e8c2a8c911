"""The prefill step's wire format: the body it sends and the answer it reads, checked against vLLM's
recorded answer (tests/fixtures/vllm) and the NixlConnector shape of DESIGN.md section 2."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from gateway.pd_flow import PREFILL_TRANSFER_PARAMS, prefill_request_body, transfer_params

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "vllm" / "http"


def test_prefill_body_is_the_nixl_proxy_shape() -> None:
    client = {
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
        "stream_options": {"include_usage": True}, "max_completion_tokens": 300, "temperature": 0.2, "n": 1,
    }  # fmt: skip
    body = prefill_request_body(client)
    assert body == {
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.2, "n": 1,
        "stream": False, "max_tokens": 1, "max_completion_tokens": 1,
        "kv_transfer_params": {
            "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
            "remote_block_ids": None, "remote_host": None, "remote_port": None,
        },
    }  # fmt: skip
    assert client["stream"] is True and "kv_transfer_params" not in client  # the client's body is untouched
    body["kv_transfer_params"]["remote_host"] = "x"
    assert PREFILL_TRANSFER_PARAMS["remote_host"] is None  # every request gets its own copy


def test_the_recorded_vllm_request_matches_our_transfer_params() -> None:
    recorded = orjson.loads((FIXTURES / "completion_kv_transfer_params.json").read_bytes())
    assert recorded["request"]["body"]["kv_transfer_params"] == PREFILL_TRANSFER_PARAMS


def test_vllm_without_a_connector_answers_null_params() -> None:
    """Real vLLM 0.32 with no KV connector answers `"kv_transfer_params": null`: the flow falls back."""
    recorded = orjson.loads((FIXTURES / "completion_kv_transfer_params.json").read_bytes())
    assert recorded["response"]["status"] == 200
    assert transfer_params(recorded["response"]["body"].encode()) is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"kv_transfer_params": {"do_remote_prefill": true, "remote_port": 1}}',
         {"do_remote_prefill": True, "remote_port": 1}),
        (b'{"kv_transfer_params": {}}', None),
        (b'{"kv_transfer_params": "x"}', None),
        (b"[1, 2]", None),
        (b"not json", None),
        (b"", None),
    ],
)
def test_transfer_params_parsing(raw: bytes, expected: dict | None) -> None:
    assert transfer_params(raw) == expected
