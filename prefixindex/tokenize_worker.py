"""Tokenizing prompts off the event loop: a worker thread that encodes what arrives together in one batch.

A HuggingFace tokenizer's batch encode (`HFTokenizer.encode_batch`) runs without the GIL, so while a
32k-token prompt is tokenized in the worker the event loop goes on relaying every other stream; only
turning ids into Python lists holds the GIL (about 0.5 ms per 32k tokens). Requests that arrive while
the worker is busy wait in its queue and are taken together in the next batch; the loop side awaits an
asyncio future the worker resolves through `call_soon_threadsafe`, one callback per batch.

What the worker does stays off the loop's CPU and GIL as far as it can (bench/stream_stall.py):
- every text of a batch is encoded and turned into a list on its own (`_encode_all`), so the GIL is
  held for one text's list at a time with GIL-free encodes between; a batch's lists in a row (8 x 32k
  tokens: ~4 ms) kept the loop waiting for the GIL up to the interpreter's switch interval (5 ms);
- the encode runs on the worker thread itself, at a lower priority (`WORKER_NICE`): starting a worker
  turns the tokenizers library's own thread pool off for the process (`TOKENIZERS_PARALLELISM=false`),
  as its threads would be created by whichever thread first encodes a batch, at that thread's
  priority, and would compete with the loop on every core. The parallelism is `tokenizer_workers`.

`PromptEncoder` is what the prefix cache calls: `encode` (awaitable) sends HF tokenizers to the worker
when there is one, and encodes inline otherwise: with `workers=0` (today's behaviour, kept as a switch
and a baseline), and always for the built-in word tokenizer, which holds the GIL whatever thread runs
it. With workers on, long texts for that one are encoded in slices cut at spaces, yielding to the loop
between slices (its tokens never span whitespace, so the slices' tokens are the whole text's).
`encode_now` is the synchronous form. Both reuse a chat's earlier turns (prefixindex/token_reuse.py)
when configured.

A tokenizer error reaches the caller as it would inline: a failing batch is retried text by text, and
each text's own exception (TypeError, ValueError, or anything else) is raised where it is awaited.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from array import array
from dataclasses import dataclass
from typing import Any, Protocol

from prefixindex.token_reuse import TokenReuse, reuse_for

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 64
SLICE_CHARS = 16384  # word tokenizer: about 0.5 ms of encoding between two yields to the loop


class TextEncoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


class BatchEncoder(TextEncoder, Protocol):
    def encode_batch(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]: ...


class BatchObserver(Protocol):
    """Told about each batch the encoder ran (metrics; tests)."""

    def batch(self, texts: int) -> None: ...

    def reused(self, hit: bool, tokens: int, cache_bytes: int) -> None: ...


Outcome = list[int] | BaseException


def encode_texts(
    tokenizer: BatchEncoder,
    jobs: list[tuple[str, bool]],
    reuse: TokenReuse | None = None,
    observer: BatchObserver | None = None,
) -> list[Outcome]:
    """The tokens of each (text, add_special_tokens), or the exception encoding it raised. Texts
    without special tokens are cut for reuse when `reuse` is given; all pieces of one flag are encoded
    in one batch."""
    plans: list[Any] = []
    pieces: dict[bool, list[str]] = {True: [], False: []}
    where: list[list[tuple[bool, int]]] = []
    for text, special in jobs:
        plan = None
        if reuse is not None and not special:
            with reuse.lock:
                plan = reuse.plan(text)
            if observer is not None and (plan.store is not None or plan.start):
                observer.reused(plan.start > 0, len(plan.head), reuse.nbytes)
        spans = plan.pieces if plan is not None else [(0, len(text))]
        slots = []
        for a, b in spans:
            slots.append((special, len(pieces[special])))
            pieces[special].append(text[a:b] if (a, b) != (0, len(text)) else text)
        plans.append(plan)
        where.append(slots)
    encoded = {flag: _encode_all(tokenizer, texts, flag) for flag, texts in pieces.items() if texts}
    out: list[Outcome] = []
    for plan, slots in zip(plans, where, strict=True):
        parts = [encoded[flag][i] for flag, i in slots]
        failed = next((p for p in parts if isinstance(p, BaseException)), None)
        if failed is not None:
            out.append(failed)
            continue
        if plan is None:
            out.append(parts[0])  # type: ignore[arg-type]
            continue
        first: list[int] = parts[0]  # type: ignore[assignment]
        if plan.store is not None:
            assert reuse is not None
            with reuse.lock:
                reuse.store(plan.store, plan.head + array("i", first))
        tokens = plan.head.tolist() + first if plan.head else first
        for p in parts[1:]:
            tokens += p  # type: ignore[arg-type]
        out.append(tokens)
    return out


def _encode_all(tokenizer: BatchEncoder, texts: list[str], special: bool) -> list[Outcome]:
    """Each text encoded alone, its ids made a list before the next text is encoded: the GIL is held
    for one list at a time (see the module docstring). A failing text carries its own error."""
    out: list[Outcome] = []
    for text in texts:
        try:
            out.append(tokenizer.encode_batch([text], special)[0])
        except Exception as exc:
            out.append(exc)
    return out


@dataclass(slots=True)
class _Job:
    text: str
    add_special_tokens: bool
    future: asyncio.Future[list[int]]
    loop: asyncio.AbstractEventLoop


class TokenizerWorker:
    """`threads` threads encoding queued texts in batches of up to `max_batch`. Threads start on the
    first `encode` and stop at `close` (daemon threads: an unclosed worker never holds up exit)."""

    def __init__(
        self,
        tokenizer: BatchEncoder,
        *,
        threads: int = 1,
        reuse: TokenReuse | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        observer: BatchObserver | None = None,
        name: str = "kvgate-tokenizer",
    ) -> None:
        if threads < 1 or max_batch < 1:
            raise ValueError("a tokenizer worker needs at least one thread and a batch of at least 1")
        self.tokenizer = tokenizer
        self.reuse = reuse
        self.max_batch = max_batch
        self.observer = observer
        self._threads_wanted = threads
        self._name = name
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """The tokens of `text`, encoded in a worker thread; raises what encoding raised."""
        if self._closed:
            raise RuntimeError("the tokenizer worker is closed")
        if not self._threads:
            self._start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[int]] = loop.create_future()
        self._queue.put(_Job(text, add_special_tokens, future, loop))
        return await future

    def close(self) -> None:
        """Stop the threads once the queue drains (jobs queued before are still answered)."""
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        self._threads = []

    def _start(self) -> None:
        os.environ[SERIAL_ENV] = "false"  # read at every encode: from now on each runs on its caller
        with self._lock:
            while len(self._threads) < self._threads_wanted:
                t = threading.Thread(target=self._run, name=f"{self._name}-{len(self._threads)}", daemon=True)
                t.start()
                self._threads.append(t)

    def _run(self) -> None:
        _lower_priority()
        q = self._queue
        while True:
            job = q.get()
            if job is None:
                return
            batch = [job]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    more = q.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            try:
                results = encode_texts(
                    self.tokenizer, [(j.text, j.add_special_tokens) for j in batch], self.reuse, self.observer
                )
            except BaseException as exc:  # a bug here must answer the waiters, not kill the thread
                log.exception("tokenizer worker: batch of %d failed", len(batch))
                results = [exc] * len(batch)
            if self.observer is not None:
                self.observer.batch(len(batch))
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, Outcome]]] = {}
            for j, r in zip(batch, results, strict=True):
                by_loop.setdefault(j.loop, []).append((j, r))
            for loop, done in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_deliver, done)
                except RuntimeError:  # that loop is closed: nobody waits any more
                    pass
            if stop:
                return


WORKER_NICE = 10
SERIAL_ENV = "TOKENIZERS_PARALLELISM"  # "false": the library encodes a batch on the calling thread


def _lower_priority() -> None:
    """Run this thread at a lower CPU priority than the event loop: on a busy host the loop relaying
    streams preempts tokenizing (the encode runs on this thread: see SERIAL_ENV)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed: run at the process's priority
        pass


def _deliver(done: list[tuple[_Job, Outcome]]) -> None:
    for job, result in done:
        if job.future.done():  # the request went away (cancelled) while it was being encoded
            continue
        if isinstance(result, BaseException):
            job.future.set_exception(result)
        else:
            job.future.set_result(result)


class PromptEncoder:
    """How one pool's prompts are tokenized: in a worker, or inline; with chat-turn reuse or not.
    See the module docstring."""

    def __init__(
        self,
        tokenizer: TextEncoder,
        *,
        workers: int = 1,
        reuse_bytes: int = 0,
        observer: BatchObserver | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        if workers < 0:
            raise ValueError("tokenizer_workers must be >= 0")
        self.tokenizer = tokenizer
        self.observer = observer
        batched = callable(getattr(tokenizer, "encode_batch", None))
        self.reuse = reuse_for(tokenizer, reuse_bytes) if batched else None
        self.worker = (
            TokenizerWorker(tokenizer, threads=workers, reuse=self.reuse, observer=observer,  # type: ignore[arg-type]
                            max_batch=max_batch)
            if batched and workers > 0 else None
        )  # fmt: skip
        # 0 workers is today's behaviour, kept as the baseline: everything inline, in one piece
        self._sliceable = workers > 0 and bool(getattr(tokenizer, "tokens_never_span_whitespace", False))

    def encode_now(self, text: str, add_special_tokens: bool) -> list[int]:
        """The tokens of `text`, encoded on the calling thread."""
        if self.reuse is None or add_special_tokens:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        (result,) = encode_texts(self.tokenizer, [(text, False)], self.reuse, self.observer)  # type: ignore[arg-type]
        if isinstance(result, BaseException):
            raise result
        return result

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """The tokens of `text`; the event loop stays free while a worker encodes it."""
        if self.worker is not None:
            return await self.worker.encode(text, add_special_tokens)
        if self._sliceable and len(text) > SLICE_CHARS:
            return await self._encode_in_slices(text, add_special_tokens)
        return self.encode_now(text, add_special_tokens)

    async def _encode_in_slices(self, text: str, add_special_tokens: bool) -> list[int]:
        out: list[int] = []
        start, n = 0, len(text)
        encode = self.tokenizer.encode
        while start < n:
            end = text.find(" ", start + SLICE_CHARS) if start + SLICE_CHARS < n else n
            if end < 0:
                end = n
            out += encode(text[start:end], add_special_tokens=add_special_tokens)
            start = end
            if start < n:
                await asyncio.sleep(0)
        return out

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()

