"""The simulated engine core: vLLM V1's scheduler over a block pool, timed by a cost model.

One asyncio task runs engine steps back to back while there is work. Each step:

1. schedules, as vLLM V1 does: running requests first (one decode token each, or the next chunk
   of an unfinished prefill) within `max_num_batched_tokens`; when the pool cannot give a running
   request its next block, the most recently admitted running request is preempted (its blocks
   freed, recomputed later); then, if nothing was preempted, waiting requests in FIFO order while
   `max_num_seqs` and the budget allow, each starting after its longest cached prefix (chunked
   prefill cuts the last one to the remaining budget);
2. publishes the KV events the pool queued while scheduling, as one batch;
3. lasts the modelled step time (its own work included, lost time made up in later steps):
       uncached prefill tokens / prefill_tps + (itl_ms + itl_ms_per_seq * (seqs - 1)) / 1000
   times a uniform(1 - jitter, 1 + jitter) factor;
4. advances every scheduled request; those that reached the end of their tokens sample one
   deterministic token, and finish at max_tokens or max_model_len (finish_reason "length").
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from bench.sim.config import LoraAdapter, SimConfig
from bench.sim.events import Event
from bench.sim.kvcache import BlockPool, KVCacheManager, SeqKV
from bench.sim.metrics import SimMetrics
from bench.sim.textgen import TextGenerator

WAITING, TRANSFERRING, RUNNING, FINISHED = "waiting", "transferring", "running", "finished"


class SimRequest:
    """One engine request (one prompt). The HTTP handler waits on it and reads `output_ids`."""

    __slots__ = (
        "_waiter", "all_ids", "arrival", "do_remote_decode", "finish_reason", "first_scheduled",
        "first_token_at", "kv", "kv_transfer_params", "last_token_at", "max_tokens",
        "num_cached_tokens", "num_computed", "num_external", "num_preemptions", "num_prompt", "output_ids",
        "remote_prefill", "request_id", "status", "text_seed",
    )

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        max_tokens: int,
        *,
        cache_salt: str | None = None,
        lora: LoraAdapter | None = None,
        do_remote_decode: bool = False,
        remote_prefill: dict[str, Any] | None = None,
        text_seed: int = 0,
    ) -> None:
        self.request_id = request_id
        self.all_ids = list(prompt_ids)
        self.num_prompt = len(prompt_ids)
        self.max_tokens = max_tokens
        self.output_ids: list[int] = []
        self.num_computed = 0
        self.num_cached_tokens = -1  # set when first scheduled, as vLLM's num_cached_tokens
        self.num_preemptions = 0
        self.num_external = 0  # prompt tokens pulled from a prefill pod (P/D)
        self.kv = SeqKV(cache_salt, lora)
        self.status = WAITING
        self.finish_reason: str | None = None
        self.do_remote_decode = do_remote_decode
        self.remote_prefill = remote_prefill
        self.kv_transfer_params: dict[str, Any] | None = None
        self.text_seed = text_seed
        self.arrival = time.monotonic()
        self.first_scheduled = 0.0
        self.first_token_at = 0.0
        self.last_token_at = 0.0
        self._waiter: asyncio.Future[None] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_ids)

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    async def wait(self) -> None:
        """Return once new tokens were generated or the request finished since the last call."""
        if self.status == FINISHED:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class PromptTooLong(ValueError):
    """The prompt can never fit the KV cache (vLLM refuses to start with such a max_model_len)."""


class SimEngine:
    """Scheduler, KV cache and cost model of one pod. Create in a running loop; `start()` then submit."""

    def __init__(
        self,
        config: SimConfig,
        generator: TextGenerator,
        metrics: SimMetrics,
        publish: Callable[[list[Event]], None] | None = None,
    ) -> None:
        self.config = config
        self.pool = BlockPool(
            config.num_gpu_blocks,
            config.block_size,
            hash_seed=config.hash_seed,
            enable_caching=config.enable_prefix_caching,
        )
        self.kv = KVCacheManager(self.pool)
        self.generator = generator
        self.metrics = metrics
        self.publish = publish
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.transferring: set[SimRequest] = set()
        self.held: dict[str, tuple[SimRequest, asyncio.TimerHandle]] = {}
        # P/D: called with a request's remote-prefill params once its KV has been pulled.
        self.on_transfer_done: Callable[[dict[str, Any]], None] | None = None
        self.num_steps = 0
        self._evictions_counted = 0  # of pool.evictions, already added to metrics.evicted_blocks
        # Overhead accounting: modelled step time, wall time the steps took, CPU of the step loop.
        self.modelled_seconds = 0.0
        self.stepped_seconds = 0.0
        self.busy_seconds = 0.0
        self.slowdown = 1.0  # fault injection: every step takes this many times the modelled time
        self._rng = random.Random(config.seed)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.capacity_tokens = (config.num_gpu_blocks - 1) * config.block_size
        # A sequence stops at the context length, or when it alone fills the cache (vLLM would have
        # refused to start with a max_model_len the cache cannot hold; the sim allows tiny caches).
        self._len_limit = min(config.max_model_len, self.capacity_tokens)

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="sim-engine")

    async def stop(self) -> None:
        """Stop stepping and finish every request as aborted."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self.abort_all()
        for _req, handle in self.held.values():
            handle.cancel()
        self.held.clear()

    # -- requests ------------------------------------------------------------------------------------
    def submit(self, req: SimRequest) -> None:
        """Queue a request. Raises PromptTooLong if its prompt could never fit the cache."""
        if req.num_prompt + 1 > self.capacity_tokens:
            raise PromptTooLong(
                f"The prompt ({req.num_prompt} tokens) does not fit the KV cache "
                f"({self.capacity_tokens} tokens)."
            )
        self.pool.update_hashes(req.kv, req.all_ids)
        m = self.metrics
        m.params_n.observe(1)
        m.params_max_tokens.observe(req.max_tokens)
        m.max_generation_tokens.observe(req.max_tokens)
        self.waiting.append(req)
        self._update_gauges()
        self._wake.set()

    def abort_all(self) -> None:
        """Abort every request the engine holds (its engine died)."""
        for req in [*self.waiting, *self.running, *self.transferring]:
            self.abort(req)

    def abort(self, req: SimRequest) -> None:
        """The client went away: drop the request wherever it is."""
        if req.status != FINISHED:
            self._finish(req, "abort")
            self._wake.set()

    def release_held(self, request_id: str) -> bool:
        """P/D: the decode pod has read a held request's blocks; free them."""
        entry = self.held.pop(request_id, None)
        if entry is None:
            return False
        req, handle = entry
        handle.cancel()
        self.kv.free(req.kv)
        self._update_gauges()
        self._wake.set()
        return True

    def reset_prefix_cache(self) -> bool:
        """Clear the prefix cache. As in vLLM, AllBlocksCleared goes out with the next step's batch."""
        return self.pool.reset()

    # -- the step loop -------------------------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        deadline: float | None = None  # when the previous step should have ended
        while True:
            if not self.waiting and not self.running:
                deadline = None
                self._wake.clear()
                await self._wake.wait()
                continue
            t0 = loop.time()
            c0 = time.process_time()
            scheduled, prefill_tokens = self._schedule()
            self._flush_events()
            self._update_gauges()
            if not scheduled:
                # Everything waits on blocks or transfers: resume when something changes.
                deadline = None
                self._wake.clear()
                await self._wake.wait()
                continue
            step = self._step_time(len(scheduled), prefill_tokens)
            self.metrics.iteration_tokens.observe(sum(n for _, n in scheduled))
            # Steps follow the model's timeline: time this process lost (its own work, a busy CPU)
            # is made up in later steps, at most half a step each, so overhead does not accumulate.
            start = t0 if deadline is None else max(deadline, t0 - step / 2)
            deadline = start + step
            self.busy_seconds += time.process_time() - c0
            delay = deadline - loop.time()
            await asyncio.sleep(delay if delay > 0 else 0)
            c0 = time.process_time()
            self._complete(scheduled)
            self._flush_events()
            self._update_gauges()
            self.num_steps += 1
            self.modelled_seconds += step
            self.stepped_seconds += loop.time() - t0
            self.busy_seconds += time.process_time() - c0

    def _step_time(self, num_seqs: int, prefill_tokens: int) -> float:
        """The cost model: uncached prefill tokens / prefill_tps + itl_ms + itl_ms_per_seq * (seqs - 1)."""
        cfg = self.config
        step = prefill_tokens / cfg.prefill_tps + (cfg.itl_ms + cfg.itl_ms_per_seq * (num_seqs - 1)) / 1000.0
        if cfg.jitter:
            step *= self._rng.uniform(1.0 - cfg.jitter, 1.0 + cfg.jitter)
        return step * self.slowdown

    def stats(self) -> dict[str, float]:
        """The simulator's own accounting (not a vLLM interface): how far steps overran the model."""
        return {"steps": self.num_steps, "modelled_s": self.modelled_seconds,
                "stepped_s": self.stepped_seconds, "step_loop_cpu_s": self.busy_seconds}

    def _schedule(self) -> tuple[list[tuple[SimRequest, int]], int]:
        cfg = self.config
        kv = self.kv
        budget = cfg.max_num_batched_tokens
        scheduled: list[tuple[SimRequest, int]] = []
        prefill_tokens = 0
        preempted = False
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            num_new = min(req.num_tokens - req.num_computed, budget)
            while not kv.allocate_slots(req.kv, req.all_ids, req.num_computed, num_new):
                victim = running.pop()  # FCFS: the most recently admitted request
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req.status != RUNNING:
                break
            scheduled.append((req, num_new))
            if req.num_computed + num_new < req.num_tokens or not req.output_ids:
                prefill_tokens += num_new  # a prefill chunk (or recompute after preemption)
            budget -= num_new
            i += 1
        if preempted:
            return scheduled, prefill_tokens
        waiting = self.waiting
        while waiting and budget > 0 and len(running) < cfg.max_num_seqs:
            req = waiting[0]
            hits = []
            if req.num_computed == 0:
                hits = self.pool.longest_hit(req.kv, req.num_tokens)
            num_hit = len(hits) * cfg.block_size
            if req.remote_prefill is not None:
                if not self._start_transfer(req, hits, req.remote_prefill):
                    break
                waiting.popleft()
                continue
            num_new = min(req.num_tokens - req.num_computed - num_hit, budget)
            if not kv.allocate_slots(req.kv, req.all_ids, req.num_computed + num_hit, num_new, hits):
                break  # FIFO: the head waits for blocks, and so does everyone behind it
            waiting.popleft()
            if req.num_computed == 0:
                self._count_lookup(req, num_hit)
            req.num_computed += num_hit
            self._admit(req)
            scheduled.append((req, num_new))
            prefill_tokens += num_new
            budget -= num_new
        return scheduled, prefill_tokens

    def _count_lookup(self, req: SimRequest, num_hit: int) -> None:
        if self.config.enable_prefix_caching:
            self.metrics.prefix_queries.inc(req.num_tokens)
            self.metrics.prefix_hits.inc(num_hit)
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = num_hit

    def _admit(self, req: SimRequest) -> None:
        req.status = RUNNING
        self.running.append(req)
        if not req.first_scheduled:
            req.first_scheduled = time.monotonic()
            self.metrics.queue_time.observe(req.first_scheduled - req.arrival)

    def _preempt(self, req: SimRequest) -> None:
        # vLLM V1 preempts by recompute: free the blocks (they stay cached), restart from token 0.
        self.kv.free(req.kv)
        req.num_computed = 0
        req.status = WAITING
        req.num_preemptions += 1
        self.metrics.preemptions.inc()
        self.waiting.appendleft(req)

    def _complete(self, scheduled: Sequence[tuple[SimRequest, int]]) -> None:
        now = time.monotonic()
        m = self.metrics
        gen = self.generator
        generated = 0
        for req, num_new in scheduled:
            if req.status != RUNNING:
                continue  # aborted or preempted while the step ran
            req.num_computed += num_new
            if req.num_computed < req.num_tokens:
                continue  # a prefill chunk that did not reach the end of the prompt
            token = gen.token(req.text_seed, len(req.output_ids))
            req.all_ids.append(token)
            req.output_ids.append(token)
            self.pool.update_hashes(req.kv, req.all_ids)
            generated += 1
            if len(req.output_ids) == 1:
                req.first_token_at = now
                m.ttft.observe(now - req.arrival)
                self._count_prompt(req)
            else:
                m.itl.observe(now - req.last_token_at)
            req.last_token_at = now
            if len(req.output_ids) >= req.max_tokens or req.num_tokens >= self._len_limit:
                self._finish(req, "length")
            else:
                req.wake()
        m.generation_tokens.inc(generated)

    def _finish(self, req: SimRequest, reason: str) -> None:
        prev = req.status
        req.status = FINISHED
        req.finish_reason = reason
        if prev == RUNNING:
            self.running.remove(req)
        elif prev == WAITING:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        elif prev == TRANSFERRING:
            self.transferring.discard(req)
        if reason == "length" and req.do_remote_decode and req.kv.blocks:
            self._hold(req)
        else:
            self.kv.free(req.kv)
        m = self.metrics
        m.success[reason].inc()
        if reason != "abort":
            now = time.monotonic()
            n_out = len(req.output_ids)
            m.e2e.observe(now - req.arrival)
            m.request_generation_tokens.observe(n_out)
            m.request_preemptions.observe(req.num_preemptions)
            if req.first_token_at:
                m.inference_time.observe(now - req.first_scheduled)
                m.prefill_time.observe(req.first_token_at - req.first_scheduled)
                m.decode_time.observe(now - req.first_token_at)
                if n_out > 1:
                    m.tpot.observe((now - req.first_token_at) / (n_out - 1))
        req.wake()

    def _count_prompt(self, req: SimRequest) -> None:
        """Prompt-token counters, once per request at its first token (as vLLM's iteration stats)."""
        m = self.metrics
        cached = max(req.num_cached_tokens, 0)
        local_hit = cached - req.num_external
        m.prompt_tokens.inc(req.num_prompt)
        m.prompt_tokens_cached.inc(cached)
        m.prompt_by_source["local_compute"].inc(req.num_prompt - cached)
        m.prompt_by_source["local_cache_hit"].inc(local_hit)
        m.prompt_by_source["external_kv_transfer"].inc(req.num_external)
        m.cached_by_source["device"].inc(local_hit)
        m.cached_by_source["p2p"].inc(req.num_external)
        m.request_prompt_tokens.observe(req.num_prompt)
        m.prefill_computed.observe(req.num_prompt - cached)

    # -- P/D -----------------------------------------------------------------------------------------
    def _hold(self, req: SimRequest) -> None:
        """Prefill side: keep the blocks for the decode pod to read, at most `kv_hold_s`."""
        block_ids = [b.block_id for b in req.kv.blocks]
        req.kv_transfer_params = {"remote_block_ids": [block_ids]}
        handle = asyncio.get_running_loop().call_later(
            self.config.kv_hold_s, self.release_held, req.request_id
        )
        self.held[req.request_id] = (req, handle)

    def _start_transfer(self, req: SimRequest, hits: list, params: dict[str, Any]) -> bool:
        """Decode side: allocate blocks for the remote prompt tokens and pull them asynchronously.

        As vLLM's NixlConnector, the prompt minus its locally cached prefix is loaded, except the last
        token, which the decode pod recomputes to sample the first output token.
        """
        cfg = self.config
        num_hit = len(hits) * cfg.block_size
        num_ext = max(req.num_prompt - 1 - num_hit, 0)
        if not self.kv.allocate_slots(req.kv, req.all_ids, num_hit, num_ext, hits, delay_cache=True):
            return False
        self._count_lookup(req, num_hit)
        req.num_external = num_ext
        req.num_cached_tokens = num_hit + num_ext  # vLLM counts local + external as cached
        self.metrics.external_queries.inc(req.num_prompt - num_hit)
        self.metrics.external_hits.inc(num_ext)
        req.num_computed = num_hit
        req.status = TRANSFERRING
        req.remote_prefill = None
        self.transferring.add(req)
        asyncio.get_running_loop().call_later(
            num_ext / cfg.kv_transfer_tps, self._transfer_done, req, num_hit + num_ext, params
        )
        return True

    def _transfer_done(self, req: SimRequest, num_computed: int, params: dict[str, Any]) -> None:
        if req.status != TRANSFERRING:
            return
        if self.on_transfer_done is not None:
            self.on_transfer_done(params)
        self.transferring.discard(req)
        req.num_computed = num_computed
        self.kv.cache(req.kv, req.all_ids, num_computed)
        req.status = WAITING
        self.waiting.appendleft(req)
        self._wake.set()

    # -- bookkeeping ---------------------------------------------------------------------------------
    def _flush_events(self) -> None:
        events = self.pool.take_events()
        if events and self.publish is not None:
            self.publish(events)

    def _update_gauges(self) -> None:
        evicted = self.pool.evictions - self._evictions_counted
        if evicted:
            self.metrics.evicted_blocks.inc(evicted)
            self._evictions_counted = self.pool.evictions
        deferred = len(self.transferring)
        self.metrics.set_gauges(len(self.running), len(self.waiting) + deferred, deferred, self.pool.usage)
