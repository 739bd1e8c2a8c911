"""Round robin's capacity on a simulated fleet, from the workload and the simulator's cost model.

The simulator (bench/sim/engine.py) times an engine step as

    uncached prefill tokens / prefill_tps + (itl_ms + itl_ms_per_seq * (seqs in the step - 1)) / 1000

A saturated pod runs steps back to back with batches as full as its limits allow, so the most
requests per second it can serve is 1 / t, where t is what one request costs it (`pod_seconds`):

    t = U / prefill_tps                                   its uncached prompt tokens
      + itl_per_seq * (O - 1 + c)                         its sequence-slots: O-1 decode steps, c chunks
      + (itl - itl_per_seq) * max((O - 1 + c) / M,        its share of the steps' fixed cost: a step
                                  (U + O - 1) / B)        holds <= M sequences and <= B tokens

with U uncached prompt tokens (at least the last one, which vLLM always recomputes), O output tokens,
c = ceil(U / B) prefill chunks, M = max_num_seqs, B = max_num_batched_tokens. This is the best case
(full batches), i.e. the load at which queues grow without bound.

Round robin gives every pod the same share of the requests, so the fleet saturates when its slowest
pod does: capacity = pods / max over pods of the mean t of the requests that pod serves.

U under round robin: placement ignores content, so each pod sees an arbitrary subset of the prompts.
`random_placement` replays the workload's prompts in order, each on a seeded random pod with an LRU
cache of that pod's size (full blocks only, at most prompt - 1 tokens hit, as vLLM), and returns the
uncached tokens each pod would compute. It ignores concurrency (blocks in use cannot be evicted; a
prefix still being computed elsewhere), so it is an estimate: enough to place loads at about 50%, 90%
and 130% of capacity, which is all the matrix needs.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True, frozen=True)
class PodCost:
    """The cost-model options of one simulated pod (bench.sim.config.SimConfig fields)."""

    prefill_tps: float
    itl_ms: float
    itl_ms_per_seq: float
    max_num_seqs: int
    max_num_batched_tokens: int

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> PodCost:
        """From `kvgate sim` options; the simulator's defaults for any left out."""
        from bench.sim.config import SimConfig

        d = SimConfig()
        return cls(float(options.get("prefill_tps", d.prefill_tps)), float(options.get("itl_ms", d.itl_ms)),
                   float(options.get("itl_ms_per_seq", d.itl_ms_per_seq)),
                   int(options.get("max_num_seqs", d.max_num_seqs)),
                   int(options.get("max_num_batched_tokens", d.max_num_batched_tokens)))


@dataclass(slots=True, frozen=True)
class RequestWork:
    """What one request costs a pod: the prompt tokens it must compute there and its output tokens."""

    uncached: int
    output: int


def pod_seconds(cost: PodCost, work: RequestWork) -> float:
    """Seconds of a saturated pod's time one request takes (the formula in the module docstring)."""
    prefill, rest = _terms(cost, work)
    return prefill + rest


def _terms(cost: PodCost, work: RequestWork) -> tuple[float, float]:
    """(prefill seconds, everything else): the first scales with 1/prefill_tps, the second does not."""
    u = max(1, work.uncached)
    decode_steps = max(0, work.output - 1)
    chunks = math.ceil(u / cost.max_num_batched_tokens)
    slots = decode_steps + chunks
    steps = max(slots / cost.max_num_seqs, (u + decode_steps) / cost.max_num_batched_tokens)
    itl, per_seq = cost.itl_ms / 1000.0, cost.itl_ms_per_seq / 1000.0
    return u / cost.prefill_tps, per_seq * slots + (itl - per_seq) * steps


def _mean_terms(cost: PodCost, works: Sequence[RequestWork]) -> tuple[float, float]:
    terms = [_terms(cost, w) for w in works]
    return sum(t[0] for t in terms) / len(terms), sum(t[1] for t in terms) / len(terms)


def round_robin_capacity(costs: Sequence[PodCost], placed: Sequence[Sequence[RequestWork]]) -> float:
    """Requests per second at which round robin saturates the fleet: pods / the slowest pod's mean cost.

    `placed[i]` are the requests pod i would serve (their uncached tokens there); a pod given none
    is measured on everyone's requests.
    """
    if len(costs) != len(placed) or not costs:
        raise ValueError("one list of placed requests per pod, at least one pod")
    everyone = [w for ws in placed for w in ws]
    if not everyone:
        raise ValueError("no requests to measure")
    worst = max(sum(_mean_terms(c, ws or everyone)) for c, ws in zip(costs, placed, strict=True))
    return len(costs) / worst


def prefill_scale_for_capacity(target_rps: float, costs: Sequence[PodCost],
                               placed: Sequence[Sequence[RequestWork]]) -> float:
    """The factor k such that multiplying every pod's prefill_tps by k gives round robin `target_rps`.

    Each pod's mean cost is A/k + D (A: prefill seconds at k=1, D: the rest), so the fleet reaches
    the target when every pod does: k = max_i A_i / (pods/target - D_i). ValueError when decoding
    alone already costs more than the target allows.
    """
    if target_rps <= 0:
        raise ValueError("target_rps must be > 0")
    budget = len(costs) / target_rps  # seconds per request each pod may spend
    everyone = [w for ws in placed for w in ws]
    k = 0.0
    for cost, ws in zip(costs, placed, strict=True):
        prefill, rest = _mean_terms(cost, ws or everyone)
        if rest >= budget:
            raise ValueError(f"{target_rps:g} req/s is beyond the pods' decode capacity "
                             f"({len(costs) / rest:.1f} req/s with no prefill at all)")
        k = max(k, prefill / (budget - rest))
    return k


def random_placement(prompts: Sequence[Sequence[int]], outputs: Sequence[int], pod_blocks: Sequence[int],
                     block_size: int, seed: int = 0) -> list[list[RequestWork]]:
    """Per pod, the requests a content-blind router would send it and their uncached tokens there.

    Prompts are replayed in order, each on a seeded random pod whose LRU cache holds
    `pod_blocks[i]` usable blocks of `block_size` tokens.
    """
    if len(prompts) != len(outputs):
        raise ValueError("one output length per prompt")
    if block_size <= 0 or not pod_blocks:
        raise ValueError("block_size must be > 0 and there must be pods")
    rng = random.Random(seed)
    caches: list[OrderedDict[int, None]] = [OrderedDict() for _ in pod_blocks]
    placed: list[list[RequestWork]] = [[] for _ in pod_blocks]
    for tokens, output in zip(prompts, outputs, strict=True):
        i = rng.randrange(len(pod_blocks))
        cache, capacity = caches[i], pod_blocks[i]
        keys, parent = [], 0
        for start in range(0, len(tokens) - block_size + 1, block_size):
            parent = hash((parent, tuple(tokens[start:start + block_size])))
            keys.append(parent)
        hittable = max(0, (len(tokens) - 1) // block_size)  # vLLM recomputes the last prompt token
        hits = 0
        while hits < min(hittable, len(keys)) and keys[hits] in cache:
            hits += 1
        for key in keys:
            cache[key] = None
            cache.move_to_end(key)
        while len(cache) > capacity:
            cache.popitem(last=False)
        placed[i].append(RequestWork(len(tokens) - hits * block_size, output))
    return placed
