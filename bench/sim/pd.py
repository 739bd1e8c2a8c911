"""Prefill/decode disaggregation as vLLM's NixlConnector exposes it through `kv_transfer_params`.

- A request carrying `{"do_remote_decode": true}` is prefilled here; when it finishes, the pod keeps
  its blocks for the decode pod (at most `kv_hold_s`, NIXL's KV lease) and answers with
  `kv_transfer_params` naming them (`do_remote_prefill: true`, `remote_block_ids`, ...).
- A request carrying `{"do_remote_prefill": true, "remote_block_ids": ..., ...}` has its prompt
  pulled from the prefill pod (`len(prompt) - 1 - locally cached` tokens at `kv_transfer_tps`, outside
  the step loop, as NIXL's async transfer) and only its last prompt token is computed here.
- After pulling, the decode pod tells the prefill pod to release the blocks, as NIXL's read
  notification does. In the simulator the side channel is the prefill pod's HTTP port:
  `remote_host:remote_port` + `POST /kvgate_sim/release_kv {"remote_request_id"}`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bench.sim.protocol import APIError

RELEASE_PATH = "/kvgate_sim/release_kv"
_REMOTE_KEYS = ("remote_engine_id", "remote_block_ids", "remote_host", "remote_port")


def parse_transfer_params(params: Mapping[str, Any] | None) -> tuple[bool, dict[str, Any] | None]:
    """(do_remote_decode, remote-prefill params or None) of a request's `kv_transfer_params`."""
    if not params:
        return False, None
    if params.get("do_remote_prefill"):
        missing = [k for k in _REMOTE_KEYS if params.get(k) is None]
        if missing:
            raise APIError(f"kv_transfer_params with do_remote_prefill lacks {', '.join(missing)}",
                           param="kv_transfer_params")
        return False, dict(params)
    return bool(params.get("do_remote_decode")), None


def prefill_params(
    *, engine_id: str, request_id: str, block_ids: list[list[int]], host: str, port: int, num_tokens: int
) -> dict[str, Any]:
    """The `kv_transfer_params` a prefill pod returns (vLLM 0.32 NixlConnector.request_finished)."""
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": block_ids,
        "remote_engine_id": engine_id,
        "remote_request_id": request_id,
        "remote_host": host,
        "remote_port": port,
        "tp_size": 1,
        "dcp_size": 1,
        "pp_size": 1,
        "remote_num_tokens": num_tokens,
        "remote_blocks_expiry_time": None,
        "transfer_mode": "pull",
    }


def release_url(params: Mapping[str, Any]) -> str | None:
    """Where to tell the prefill pod its blocks were read, or None without a usable side channel."""
    host, port = params.get("remote_host"), params.get("remote_port")
    if not isinstance(host, str) or not isinstance(port, int) or isinstance(port, bool):
        return None
    return f"http://{host}:{port}{RELEASE_PATH}"
