"""Which sequences run in the next step, and the cache blocks they need (nano-vllm's scheduler shape).

A step is either a prefill of newly admitted sequences (all their tokens at once, padded to one length) or
a decode step of every running sequence, each feeding its newest token plus `lookahead` draft tokens (MTP
speculation; 0 without). Prefills go first so new requests join the running batch quickly. Blocks are
reserved before a step for every position it writes; when the pool runs short during decode, the most
recently admitted sequence is preempted (its blocks freed) and later recomputed from its tokens, so the
oldest requests always make progress. A request that could not fit even in an empty pool is refused when it
is added, with a message saying how much it needs.
"""

from __future__ import annotations

from collections import deque

from dsv3.infer.block_manager import BlockManager, CacheExhausted
from dsv3.infer.sequence import Sequence, Status


class Scheduler:
    """Waiting and running queues over one BlockManager."""

    def __init__(
        self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, lookahead: int = 0
    ):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.lookahead = lookahead  # extra positions a decode step writes: the draft tokens it verifies
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preempted = 0

    def add(self, seq: Sequence, max_len: int) -> None:
        """Queue a request that will hold at most `max_len` tokens; refuse one no pool state could hold."""
        need = max_len + self.lookahead
        if self.blocks.blocks_for(need) > self.blocks.num_blocks - 1:
            raise CacheExhausted(
                f"request needs KV cache for up to {need} positions ({self.blocks.blocks_for(need)} blocks "
                f"of {self.blocks.block_size}), the pool has {self.blocks.capacity} "
                f"({self.blocks.num_blocks - 1} blocks): lower max_tokens or raise cache_tokens"
            )
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The sequences of the next step and whether it is a prefill."""
        batch = self._admit()
        if batch:
            return batch, True
        batch = self._decode_batch()
        if not batch and self.waiting:  # everything was preempted: recompute the oldest first
            return self._admit(), True
        return batch, False

    def _admit(self) -> list[Sequence]:
        batch: list[Sequence] = []
        longest = 0
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = len(seq.tokens)
            padded = max(longest, n) * (len(batch) + 1)  # the prefill runs padded to its longest prompt
            if batch and padded > self.max_num_batched_tokens:
                break
            if not self.blocks.can_reserve(seq.seq_id, n):
                break
            self.blocks.reserve(seq.seq_id, n)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append(seq)
            longest = max(longest, n)
        return batch

    def _decode_batch(self) -> list[Sequence]:
        scheduled: list[Sequence] = []
        while self.running:
            seq = self.running.popleft()
            need = seq.num_cached + 1 + self.lookahead  # positions this step writes: newest token + drafts
            while not self.blocks.can_reserve(seq.seq_id, need):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                self.blocks.reserve(seq.seq_id, need)
                scheduled.append(seq)
        self.running.extend(scheduled)
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks and queue it first for a recomputing prefill of all its tokens."""
        self._requeue(seq)
        self.num_preempted += 1

    def _requeue(self, seq: Sequence) -> None:
        self.blocks.free(seq.seq_id)
        seq.status = Status.WAITING
        seq.num_cached = 0
        seq.draft = None
        self.waiting.appendleft(seq)

    def recompute(self, seqs: list[Sequence]) -> None:
        """Send the running ones of `seqs` back to the front of the waiting queue, in order, their blocks freed:
        after a step cut short (an exception, Ctrl-C) their cache may not hold what their tokens say, and a
        recomputing prefill of all their tokens makes it so."""
        back = [s for s in seqs if s.status is Status.RUNNING]
        ids = {s.seq_id for s in back}
        self.running = deque(s for s in self.running if s.seq_id not in ids)
        for seq in reversed(back):
            self._requeue(seq)

    def reserve_ahead(self, seqs: list[Sequence]) -> bool:
        """For a step launched while the one writing each sequence's position num_cached is in flight: reserve
        position num_cached + 1 for every sequence, all or none, never preempting (False: the pool is short)."""
        need = sum(max(0, self.blocks.blocks_for(s.num_cached + 2) - len(self.blocks.table(s.seq_id))) for s in seqs)
        if need > self.blocks.num_free:
            return False
        for seq in seqs:
            self.blocks.reserve(seq.seq_id, seq.num_cached + 2)
        return True

    def rollback(self, seq: Sequence, in_flight: bool = False) -> None:
        """After a step: drop the blocks beyond the cached positions (rejected draft slots), and beyond
        position num_cached when a step in flight writes it."""
        self.blocks.truncate(seq.seq_id, seq.num_cached + in_flight)

    def finish(self, seqs: list[Sequence]) -> None:
        """Free the blocks of the finished sequences and drop them from the running queue (one pass)."""
        for seq in seqs:
            seq.status = Status.FINISHED
            self.blocks.free(seq.seq_id)
        if seqs:
            self.running = deque(s for s in self.running if s.status is not Status.FINISHED)
