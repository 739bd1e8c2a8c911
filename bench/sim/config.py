"""Options of one simulated pod, shared by the `kvgate sim` CLI and `SimFleet`.

Every default states where it comes from: the `help` metadata is what `kvgate sim --help` prints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

Role = Literal["both", "prefill", "decode"]
ROLES: tuple[str, ...] = get_args(Role)


def _opt(default: Any, help_text: str) -> Any:
    return field(default=default, metadata={"help": help_text})


@dataclass(slots=True)
class SimConfig:
    """One pod's model, cache, cost model, KV-event and P/D options."""

    model: str = _opt("sim-model", "served model name, as vLLM's --served-model-name")
    lora_modules: list[str] = field(
        default_factory=list,
        metadata={"help": "LoRA adapters served besides the model, NAME or NAME=PATH each, as vLLM's "
                  "--lora-modules: listed in /v1/models, served under model=NAME, their KV blocks hashed "
                  "apart from the base model's (default: none)"},
    )
    tokenizer: str | None = _opt(
        None,
        "HuggingFace tokenizer dir (tokenizer.json + tokenizer_config.json) (default: a WordTokenizer)",
    )
    max_model_len: int = _opt(32768, "context length (vLLM --max-model-len; Llama-3.1-8B served at 32k)")
    block_size: int = _opt(16, "tokens per KV block (vLLM's default --block-size on GPU)")
    num_gpu_blocks: int = _opt(
        31000,
        "KV blocks in the cache, including vLLM's reserved null block (an 8B model on one H100 at "
        "0.9 utilisation holds ~31k blocks of 16 tokens; DESIGN.md section 5)",
    )
    max_num_seqs: int = _opt(256, "running-batch limit (vLLM's default --max-num-seqs on GPU)")
    max_num_batched_tokens: int = _opt(
        8192, "token budget of one engine step, decodes first then prefill chunks (vLLM V1 default)"
    )
    prefill_tps: float = _opt(
        16000.0, "prefill rate in uncached tokens/s (llm-d's scheduler assumes 15,928 tokens/s per pod)"
    )
    itl_ms: float = _opt(10.0, "decode step time at batch 1, ms (8B model on an H100, ~100 tokens/s)")
    itl_ms_per_seq: float = _opt(
        0.1, "extra step time per sequence in the batch, ms (estimate: ~35 ms steps at batch 256)"
    )
    kv_transfer_tps: float = _opt(
        200000.0, "P/D: KV tokens/s a decode pod pulls from a prefill pod (Llama-3-8B: 128 KiB of KV "
        "per token over a 200 Gb/s RDMA NIC is ~190k tokens/s)"
    )
    kv_hold_s: float = _opt(
        30.0, "P/D: seconds a prefill pod holds blocks for the decode pod (NIXL kv_lease_duration)"
    )
    jitter: float = _opt(0.0, "relative step-time noise: each step x uniform(1-j, 1+j); 0 is exact")
    seed: int | None = _opt(None, "seed of the step-time jitter (default: random)")
    hash_seed: str | None = _opt(
        None,
        "seed of the block-hash chain (vLLM's PYTHONHASHSEED); 'random': a fresh seed per pod, as vLLM "
        "with a non-cryptographic hash (xxhash) (default: vLLM 0.32's for sha256, a fixed seed, so every "
        "pod hashes the same tokens alike)",
    )
    enable_prefix_caching: bool = _opt(True, "reuse cached prefix blocks (vLLM V1 default)")
    kv_events_endpoint: str | None = _opt(
        None, "ZMQ PUB endpoint for KV events; binds if it contains '*', else connects (as vLLM) "
        "(default: none, no KV events)"
    )
    kv_events_replay_endpoint: str | None = _opt(
        None, "ZMQ ROUTER endpoint answering replay requests (default: none, no replay)"
    )
    kv_events_topic: str = _opt(
        "", "topic frame of KV-event messages (vLLM KVEventsConfig default ''); {host}, {port} and "
        "{model} are filled in; `--pods N` defaults to kv@{host}:{port}@{model}"
    )
    kv_events_buffer_steps: int = _opt(10000, "batches kept for replay (vLLM buffer_steps default)")
    enable_request_id_headers: bool = _opt(
        False, "echo X-Request-Id as a response header (vLLM's flag of the same name; off by default)"
    )
    role: Role = _opt(  # noqa: RUF009
        "both", "P/D role: both (a plain pod: kv_transfer_params ignored), or prefill / decode (a pod "
        "with NixlConnector: serves do_remote_decode and do_remote_prefill requests)"
    )
    engine_id: str | None = _opt(None, "engine id in kv_transfer_params (default: a random uuid)")
    data_parallel_rank: int = _opt(0, "dp rank in KV-event batches")

    def validate(self) -> None:
        """Raise ValueError on inconsistent options."""
        positive = ("max_model_len", "block_size", "num_gpu_blocks", "max_num_seqs",
                    "max_num_batched_tokens", "prefill_tps", "kv_transfer_tps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.num_gpu_blocks < 2:
            raise ValueError("num_gpu_blocks must be at least 2 (one is vLLM's null block)")
        if self.itl_ms < 0 or self.itl_ms_per_seq < 0 or self.kv_hold_s < 0:
            raise ValueError("itl_ms, itl_ms_per_seq and kv_hold_s must not be negative")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}")
        self.adapters()

    def adapters(self) -> dict[str, LoraAdapter]:
        """The LoRA modules by name, ids from 1 in the order given (vLLM's lora_int_id). ValueError on
        an empty or repeated name, or one that is the base model's."""
        out: dict[str, LoraAdapter] = {}
        for spec in self.lora_modules:
            name, _, path = spec.partition("=")
            if not name or name == self.model or name in out:
                raise ValueError(f"lora_modules: {spec!r} needs a new name, not empty nor the model's")
            out[name] = LoraAdapter(name, len(out) + 1, path or name)
        return out


@dataclass(frozen=True, slots=True)
class LoraAdapter:
    """One served LoRA module: its name (the request's `model`), vLLM's int id and its path."""

    name: str
    lora_id: int
    path: str


def config_fields() -> list[dataclasses.Field]:
    """The option fields in declaration order (for the CLI)."""
    return list(dataclasses.fields(SimConfig))
