"""The scheduler on its own (no model): admission limits, the padded-token budget of a prefill, which sequence a
short pool preempts, and blocks coming back when sequences finish. Every expectation is counted by hand from
the block size and the prompt lengths."""

from __future__ import annotations

from dsv3.infer.block_manager import BlockManager
from dsv3.infer.sampling import SamplingParams
from dsv3.infer.scheduler import Scheduler
from dsv3.infer.sequence import Sequence, Status


def _scheduler(num_blocks: int, max_num_seqs: int = 8, max_num_batched_tokens: int = 1000,
               lengths: tuple[int, ...] = ()) -> tuple[Scheduler, list[Sequence]]:
    """A scheduler over `num_blocks` blocks of 4 slots (one of them the null block), holding one waiting
    request per prompt length (ids 0, 1, ... in arrival order)."""
    sch = Scheduler(BlockManager(num_blocks, 4), max_num_seqs, max_num_batched_tokens)
    seqs = [Sequence(i, list(range(n)), SamplingParams(max_tokens=4), None) for i, n in enumerate(lengths)]
    for s in seqs:
        sch.add(s, len(s.tokens) + 4)
    return sch, seqs


def _ids(seqs) -> list[int]:  # noqa: ANN001
    return [s.seq_id for s in seqs]


def _sampled(seqs: list[Sequence]) -> None:
    """What the engine does after a step: one new token each, every earlier position cached."""
    for s in seqs:
        s.tokens.append(7)
        s.num_cached = len(s.tokens) - 1


def test_admission_stops_at_max_num_seqs() -> None:
    sch, seqs = _scheduler(num_blocks=33, max_num_seqs=2, lengths=(3, 3, 3))
    batch, prefill = sch.schedule()
    assert prefill and _ids(batch) == [0, 1] and _ids(sch.waiting) == [2]
    _sampled(batch)
    batch, prefill = sch.schedule()  # two running: the third waits, the two decode
    assert not prefill and _ids(batch) == [0, 1] and _ids(sch.waiting) == [2]
    sch.finish([seqs[0]])  # a slot frees up: the waiting one is admitted next
    batch, prefill = sch.schedule()
    assert prefill and _ids(batch) == [2] and _ids(sch.running) == [1, 2]


def test_prefill_token_budget_counts_padded_tokens_up_to_the_limit() -> None:
    """A prefill runs padded to its longest prompt: prompts of 5 and 3 tokens cost 2 x 5 = 10 tokens (not 8),
    whichever comes first. A budget of exactly 10 takes both; 9 takes the first alone, the other waits for the
    next prefill (it is not split)."""
    for lengths in ((5, 3), (3, 5)):
        sch, _ = _scheduler(num_blocks=33, max_num_batched_tokens=10, lengths=lengths)
        batch, prefill = sch.schedule()
        assert prefill and _ids(batch) == [0, 1], lengths
        sch, _ = _scheduler(num_blocks=33, max_num_batched_tokens=9, lengths=lengths)
        batch, prefill = sch.schedule()
        assert prefill and _ids(batch) == [0] and _ids(sch.waiting) == [1], lengths
        _sampled(batch)
        batch, prefill = sch.schedule()  # the budget is per prefill: the second one gets its own
        assert prefill and _ids(batch) == [1], lengths


def test_a_prompt_longer_than_the_budget_is_prefilled_alone() -> None:
    # refusing it would leave it waiting for ever; it runs on its own, and the next one waits
    sch, _ = _scheduler(num_blocks=33, max_num_batched_tokens=10, lengths=(12, 2))
    batch, prefill = sch.schedule()
    assert prefill and _ids(batch) == [0] and _ids(sch.waiting) == [1]


def test_a_short_pool_preempts_the_newest_sequence_first() -> None:
    """Five usable blocks of 4 slots. A, B, C hold 4-token prompts (a block each), D, the newest, an 8-token
    prompt (two blocks): the pool is full. Their first decode writes position 4 (A, B, C: a second block each)
    or 8 (D: a third). A is short a block: D, the newest, is preempted (two blocks back), so A and B get their
    second blocks; C, short again with no one newer left running, is preempted itself. The oldest two decode;
    preempting the oldest other sequence (B) instead would have let C run ahead of B."""
    sch, seqs = _scheduler(num_blocks=6, lengths=(4, 4, 4, 8))
    bm = sch.blocks
    batch, prefill = sch.schedule()
    assert prefill and _ids(batch) == [0, 1, 2, 3] and bm.num_free == 0
    _sampled(batch)
    batch, prefill = sch.schedule()
    assert not prefill and _ids(batch) == [0, 1]
    assert _ids(sch.running) == [0, 1] and _ids(sch.waiting) == [2, 3]  # recomputed oldest first
    assert sch.num_preempted == 2
    for s in seqs[2:]:
        assert s.status is Status.WAITING and s.num_cached == 0 and bm.table(s.seq_id) == []
    assert [len(bm.table(i)) for i in (0, 1)] == [2, 2] and bm.num_free == 1
    bm.check()


def test_finished_sequences_give_their_blocks_back() -> None:
    sch, seqs = _scheduler(num_blocks=9, lengths=(5, 9, 2))  # 2 + 3 + 1 blocks of the 8 usable
    sch.schedule()
    bm = sch.blocks
    assert bm.num_free == 2
    sch.finish([seqs[1]])
    assert bm.num_free == 5 and bm.table(1) == [] and seqs[1].status is Status.FINISHED
    assert _ids(sch.running) == [0, 2]
    sch.finish([seqs[0], seqs[2]])
    assert bm.num_free == 8 and not sch.running and not sch.has_work()
    bm.check()
