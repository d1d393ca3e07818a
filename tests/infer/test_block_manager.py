"""Paged-cache bookkeeping under random workloads: no leaks, no block owned twice, reuse, clear errors."""

from __future__ import annotations

import random

import pytest

from dsv3.infer.block_manager import NULL_BLOCK, BlockManager, CacheExhausted


def test_random_workload_keeps_invariants() -> None:
    """Random reserve/truncate/free over many sequences, checked against a plain model of ownership."""
    rng = random.Random(0)
    bm = BlockManager(num_blocks=41, block_size=4)
    lengths: dict[int, int] = {}  # positions each live sequence has reserved
    exhausted = 0
    for _ in range(5000):
        op = rng.random()
        if op < 0.7:  # grow a new or live sequence
            sid = rng.choice(list(lengths) + [max(lengths, default=-1) + 1])
            n = lengths.get(sid, 0) + rng.randint(1, 12)
            need = bm.blocks_for(n) - len(bm.table(sid))
            if need > bm.num_free:
                free_before = bm.num_free
                with pytest.raises(CacheExhausted, match="needs .* more block"):
                    bm.reserve(sid, n)
                assert bm.num_free == free_before  # all or nothing
                exhausted += 1
            else:
                bm.reserve(sid, n)
                lengths[sid] = n
        elif op < 0.9 and lengths:  # roll back to a shorter length
            sid = rng.choice(list(lengths))
            n = rng.randint(1, lengths[sid])
            bm.truncate(sid, n)
            lengths[sid] = n
        elif lengths:
            sid = rng.choice(list(lengths))
            bm.free(sid)
            del lengths[sid]
        bm.check()
        for sid, n in lengths.items():
            table = bm.table(sid)
            assert len(table) == bm.blocks_for(n)  # exactly the blocks its positions need
            assert NULL_BLOCK not in table
        assert bm.num_free == bm.num_blocks - 1 - sum(bm.blocks_for(n) for n in lengths.values())
    assert exhausted > 0  # the workload really ran the pool dry
    for sid in list(lengths):
        bm.free(sid)
    assert bm.num_free == bm.num_blocks - 1  # nothing leaked


def test_slots_follow_the_block_table() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.reserve(0, 3)
    bm.reserve(1, 5)
    bm.reserve(0, 6)  # sequence 0's second block comes after sequence 1's: tables are not contiguous
    t0 = bm.table(0)
    expect = [t0[0] * 4 + i for i in range(4)] + [t0[1] * 4 + i for i in range(2)]
    assert [bm.slot(0, p) for p in range(6)] == expect
    all_slots = {bm.slot(0, p) for p in range(6)} | {bm.slot(1, p) for p in range(5)}
    assert len(all_slots) == 11  # no slot shared between sequences


def test_freed_blocks_are_reused() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)  # two usable blocks
    bm.reserve(0, 4)
    with pytest.raises(CacheExhausted):
        bm.reserve(1, 1)
    bm.free(0)
    bm.reserve(1, 4)
    assert sorted(bm.table(1)) == [1, 2]


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks=1, block_size=4)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(num_blocks=4, block_size=0)
