"""Memory of the prefix index per indexed block, measured with tracemalloc.

    .venv/bin/python -m bench.index_memory [--blocks 1000000] [--pods 8] [--json]

approximate: `--blocks` distinct blocks recorded over `--pods` pods, each with an LRU capacity of
blocks/pods (the ring is allocated up front and counted). precise: the same number of blocks learned
from BlockStored events (runs of 32 blocks), counting the index and, separately, the per-pod
engine-hash -> own-key maps that BlockRemoved needs. Also reports `BlockIndex.nbytes()`, the estimate
exported as kvgate_prefix_index_bytes. Target: < 100 bytes per indexed block.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import tracemalloc

import orjson

from prefixindex.events import BlockStored, EventBatch
from prefixindex.index import BlockIndex
from prefixindex.precise import PodEventTracker

RUN = 32  # blocks per BlockStored
BS = 16


def _traced(build) -> tuple[int, object]:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = build()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before, kept
    finally:
        tracemalloc.stop()


def approximate(blocks: int, pods: int, seed: int = 0) -> dict[str, float]:
    rng = random.Random(seed)

    def build() -> BlockIndex:
        index = BlockIndex()
        for p in range(pods):
            index.add_pod(p, blocks // pods)
        for p in range(pods):
            index.insert(p, [rng.getrandbits(60) | 1 for _ in range(blocks // pods)])
        return index

    used, index = _traced(build)
    assert isinstance(index, BlockIndex)
    return {"mode": "approximate", "blocks": len(index), "bytes_per_block": used / len(index),
            "estimate_per_block": index.nbytes() / len(index)}


def precise(blocks: int, pods: int, seed: int = 0) -> dict[str, float]:
    rng = random.Random(seed)
    batches = []  # built outside the traced region: the wire data is not the index
    per_pod = blocks // pods
    for p in range(pods):
        evs = []
        for start in range(0, per_pod, RUN):
            n = min(RUN, per_pod - start)
            tokens = [rng.randrange(32000) for _ in range(n * BS)]
            evs.append(BlockStored([rng.getrandbits(64) for _ in range(n)], None, tokens, BS))
        batches.append((p, EventBatch(0.0, evs)))

    def build() -> tuple[BlockIndex, list[PodEventTracker]]:
        index = BlockIndex()
        trackers = []
        for p, batch in batches:
            index.add_pod(p)
            t = PodEventTracker(index, p, "m", lambda size: size == BS)
            t.apply(batch)
            trackers.append(t)
        return index, trackers

    def index_only() -> BlockIndex:
        index = BlockIndex()
        for p, batch in batches:
            index.add_pod(p)
            index.insert(p, [rng.getrandbits(60) | 1 for ev in batch.events for _ in ev.block_hashes])
        return index

    total, (index, _trackers) = _traced(build)  # type: ignore[misc]
    del _trackers
    only, idx = _traced(index_only)
    n = len(index)
    return {"mode": "precise", "blocks": n, "bytes_per_block": total / n,
            "index_bytes_per_block": only / len(idx),  # type: ignore[arg-type]
            "engine_map_bytes_per_block": (total - only) / n, "estimate_per_block": index.nbytes() / n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=1_000_000)
    ap.add_argument("--pods", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = [approximate(args.blocks, args.pods), precise(args.blocks, args.pods)]
    for row in rows:
        if args.json:
            sys.stdout.write(orjson.dumps(row).decode() + "\n")
        else:
            print("  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
