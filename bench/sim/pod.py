"""One simulated vLLM pod: engine, metrics, KV-event publisher and HTTP server, with start/stop.

`stop()` then `start()` simulates a pod restart: the port is kept, the cache and queues start empty
(and, without --hash-seed, block hashes change), as when a real vLLM process restarts.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from typing import Any

import aiohttp
from aiohttp import web

from bench.sim.config import SimConfig
from bench.sim.engine import SimEngine
from bench.sim.kv_events import KVEventPublisher
from bench.sim.metrics import SimMetrics
from bench.sim.pd import release_url
from bench.sim.protocol import VLLM_VERSION
from bench.sim.textgen import TextGenerator
from prefixindex.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)


def cache_config_info(config: SimConfig) -> dict[str, str]:
    """Labels of vllm:cache_config_info: vLLM's CacheConfig fields as strings (0.32, GPU defaults)."""
    num_tokens = (config.num_gpu_blocks - 1) * config.block_size
    return {
        "block_size": str(config.block_size),
        "user_specified_block_size": "True",
        "kv_cache_layout": "None",
        "prefix_match_unit": "None",
        "gpu_memory_utilization": "0.9",
        "cache_dtype": "auto",
        "is_attention_free": "False",
        "num_gpu_blocks_override": "None",
        "sliding_window": "None",
        "enable_prefix_caching": str(config.enable_prefix_caching),
        "prefix_caching_hash_algo": "sha256",
        "prefix_cache_retention_interval": "0",
        "kv_cache_dtype_skip_layers": "[]",
        "mamba_page_size_padded": "None",
        "skip_page_size_padded": "None",
        "mamba_block_size": "None",
        "mamba_cache_dtype": "auto",
        "mamba_ssm_cache_dtype": "auto",
        "mamba_cache_mode": "none",
        "enable_mamba_shared_prefix_checkpoint": "False",
        "replayssm_buffer_len": "16",
        "use_replayssm": "False",
        "use_kda_recoverssm": "False",
        "num_gpu_blocks": str(config.num_gpu_blocks),
        "num_cpu_blocks": "None",
        "effective_attention_block_size": str(config.block_size),
        "kv_cache_size_tokens": str(num_tokens),
        "kv_cache_max_concurrency": f"{num_tokens / config.max_model_len:.2f}",
        "hash_block_size": str(config.block_size),
        "cache_hit_alignment_tokens": "None",
        "kv_sharing_fast_prefill": "False",
        "swa_bounded_replay": "True",
        "kv_cache_memory_bytes": "None",
        "kv_offloading_size": "None",
        "kv_offloading_backend": "native",
        "_block_size_resolved": "True",
    }


class SimPod:
    """A simulated pod bound to `host:port` (port 0: the OS chooses, kept across restarts)."""

    def __init__(
        self,
        config: SimConfig,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.adapters = config.adapters()  # LoRA modules by name
        self.host = host
        self.port = port
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer)
        self.generator = TextGenerator(self.tokenizer)
        self.engine_id = config.engine_id or str(uuid.uuid4())
        # system_fingerprint: vLLM's version and a short hash of the serving config
        self.fingerprint = f"vllm-{VLLM_VERSION}-{hashlib.sha256(repr(config).encode()).hexdigest()[:8]}"
        self.engine: SimEngine | None = None
        self.metrics: SimMetrics | None = None
        self.publisher: KVEventPublisher | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._request_counter = 0
        self.decoder: Any = None  # tokenizers.Tokenizer for /detokenize, loaded on first use
        self.dead = False  # fault injection: the engine died (/health 503, requests 500)
        self._slowdown = 1.0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def topic(self) -> str:
        """The KV-event topic; `{host}`, `{port}` and `{model}` in the configured one are filled in."""
        topic = self.config.kv_events_topic
        if "{" in topic:
            topic = topic.format(host=self.host, port=self.port, model=self.config.model)
        return topic

    async def start(self) -> None:
        """Bind the HTTP port, open the KV-event sockets and start the engine."""
        from bench.sim.server import build_app  # server imports this module

        if self._runner is not None:
            return
        cfg = self.config
        self.metrics = SimMetrics(
            cfg.model, engine="0", max_model_len=cfg.max_model_len, cache_info=cache_config_info(cfg)
        )
        # Bind HTTP first: the port may be the OS's choice, and the KV-event topic may name it.
        # Until the engine exists, generation routes answer 503.
        # A tiny shutdown_timeout (0 would mean none): stop() cuts open connections at once, as a pod
        # that dies does.
        runner = web.AppRunner(
            build_app(self), access_log=None, handler_cancellation=True, shutdown_timeout=0.01
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port, reuse_address=True).start()
            self.port = runner.addresses[0][1]
            if cfg.kv_events_endpoint:
                self.publisher = KVEventPublisher(
                    cfg.kv_events_endpoint,
                    replay_endpoint=cfg.kv_events_replay_endpoint,
                    topic=self.topic,
                    buffer_steps=cfg.kv_events_buffer_steps,
                    data_parallel_rank=cfg.data_parallel_rank,
                )
                self.publisher.start()
        except Exception:
            await runner.cleanup()
            raise
        self.engine = SimEngine(
            cfg, self.generator, self.metrics, self.publisher.publish if self.publisher else None
        )
        self.engine.on_transfer_done = self._release_remote
        self.engine.slowdown = self._slowdown
        self.engine.start()
        self._runner = runner

    async def stop(self) -> None:
        """Close the server (in-flight streams are cut) and drop all engine state."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        await self._close_engine()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _close_engine(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            await engine.stop()
        if self.publisher is not None:
            await self.publisher.close()
            self.publisher = None

    def set_fault(self, *, dead: bool | None = None, slowdown: float | None = None) -> dict[str, Any]:
        """Fault injection for tests: a dead engine (as vLLM's EngineDeadError: /health answers 503,
        requests 500; running requests are aborted), or every step `slowdown` times slower."""
        if slowdown is not None:
            if not slowdown > 0:
                raise ValueError("slowdown must be positive")
            self._slowdown = slowdown
        if dead is not None:
            self.dead = dead
        if self.engine is not None:
            self.engine.slowdown = self._slowdown
            if self.dead:
                self.engine.abort_all()
        return {"dead": self.dead, "slowdown": self._slowdown}

    def next_request_id(self, base: str, index: int) -> str:
        self._request_counter += 1
        return f"{base}-{index}-{self._request_counter:x}"

    def ready_info(self) -> dict[str, Any]:
        """What the KVGATE_SIM_READY line and the fleet report about this pod."""
        return {
            "url": self.url,
            "model": self.config.model,
            "kv_events": self.publisher.endpoint if self.publisher else None,
            "kv_events_replay": self.publisher.replay_endpoint if self.publisher else None,
            "topic": self.topic,
            "role": self.config.role,
            "engine_id": self.engine_id,
        }

    # -- P/D side channel ----------------------------------------------------------------------------
    def _release_remote(self, params: dict[str, Any]) -> None:
        url = release_url(params)
        request_id = params.get("remote_request_id")
        if url is None or not request_id:
            return
        task = asyncio.get_running_loop().create_task(self._post_release(url, request_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post_release(self, url: str, request_id: str) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        try:
            async with self._session.post(url, json={"remote_request_id": request_id}) as resp:
                await resp.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            # The prefill pod's lease (kv_hold_s) frees the blocks anyway.
            log.debug("KV release to %s failed: %s", url, exc)
