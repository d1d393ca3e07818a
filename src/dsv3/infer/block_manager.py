"""Paged-cache bookkeeping: which fixed-size blocks of the latent pool each sequence owns.

The pool (dsv3/infer/paged_cache.py) is cut into `num_blocks` blocks of `block_size` token slots. A sequence
owns a block table, the list of its blocks in position order: position p lives in slot
`table[p // block_size] * block_size + p % block_size`. Blocks are handed out from a free list and returned
when a sequence finishes, is preempted or rolls back rejected draft tokens, so sequences of any lengths
share one pool without fragmentation. This file holds no tensors; it is plain Python so it can be tested under
random workloads against its invariants.

Block 0 is the null block and is never handed out: padding tokens of a batch write their latents there, and
padded block-table entries point at it, so every step writes and reads in-bounds slots without a branch.
"""

from __future__ import annotations

from collections import deque

NULL_BLOCK = 0


class CacheExhausted(RuntimeError):
    """The pool has too few free blocks; the message says how many were needed and how many exist."""


class BlockManager:
    """A free list of block ids and one block table per sequence id."""

    def __init__(self, num_blocks: int, block_size: int):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1 (got {block_size})")
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2: block {NULL_BLOCK} is reserved for padding "
                             f"(got {num_blocks})")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(1, num_blocks))
        self._tables: dict[int, list[int]] = {}

    # -- queries -------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Token slots one sequence could use if it had the whole pool (all blocks but the null one)."""
        return (self.num_blocks - 1) * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold positions 0 .. num_tokens-1."""
        return -(-num_tokens // self.block_size)

    def table(self, seq_id: int) -> list[int]:
        """The sequence's blocks in position order (empty when it holds none)."""
        return self._tables.get(seq_id, [])

    def slot(self, seq_id: int, pos: int) -> int:
        """Flat pool slot of position `pos` of the sequence (the block must be reserved)."""
        return self._tables[seq_id][pos // self.block_size] * self.block_size + pos % self.block_size

    def can_reserve(self, seq_id: int, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(self.table(seq_id)) <= len(self._free)

    # -- changes -------------------------------------------------------------------------------------
    def reserve(self, seq_id: int, num_tokens: int) -> None:
        """Grow the sequence's table to cover positions 0 .. num_tokens-1; all or nothing."""
        table = self._tables.setdefault(seq_id, [])
        need = self.blocks_for(num_tokens) - len(table)
        if need > len(self._free):
            if not table:
                del self._tables[seq_id]
            raise CacheExhausted(
                f"KV cache pool exhausted: sequence {seq_id} needs {need} more block(s) of {self.block_size} "
                f"tokens for {num_tokens} positions, {len(self._free)} of {self.num_blocks - 1} are free"
            )
        for _ in range(need):
            table.append(self._free.popleft())

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        """Keep only the blocks that hold positions 0 .. num_tokens-1 (rolling back rejected draft slots)."""
        table = self._tables.get(seq_id)
        if table is None:
            return
        keep = self.blocks_for(num_tokens)
        while len(table) > keep:
            self._free.append(table.pop())

    def free(self, seq_id: int) -> None:
        """Return every block of the sequence to the pool."""
        for block in self._tables.pop(seq_id, []):
            self._free.append(block)

    def check(self) -> None:
        """Assert the invariants (tests): each usable block is free or owned by one table, never both."""
        owned = [b for t in self._tables.values() for b in t]
        everything = owned + list(self._free)
        if sorted(everything) != list(range(1, self.num_blocks)):
            raise AssertionError(f"block accounting broken: {len(owned)} owned + {len(self._free)} free "
                                 f"!= {self.num_blocks - 1} usable, or a block is listed twice")
