"""The rollout scheduler on its own, over the real block manager: admission headroom, preemption order."""
import pytest

_C = pytest.importorskip("r1fast._C")

from r1fast.rollout.scheduler import DecodeBatch, PrefillBatch, Scheduler  # noqa: E402
from r1fast.rollout.sequence import Sequence, Status  # noqa: E402


def _prefill_all(sched):
    """Runs the prefill steps the scheduler asks for (no model: only the bookkeeping), and appends a
    first sampled token to every sequence whose prompt completed, as the engine does."""
    while True:
        batch = sched.schedule()
        if not isinstance(batch, PrefillBatch):
            return batch
        for seq, end in zip(batch.seqs, batch.ends):
            seq.num_computed = end
            sched.bm.mark_computed(seq.seq_id, end)
            if end == len(seq):
                sched.prefill_done(seq, [])
                seq.tokens.append(1)
                seq.logprobs.append(0.0)
                sched.running._arrays = None


def test_a_group_waits_for_one_free_block_per_sample_while_others_decode():
    # 6 blocks of 4: a running sequence holds 2; a group of 4 samples whose 4-token prompt needs 1 block
    # would fit, but its 4 samples' first decoded tokens need 4 more blocks: it waits (no thrashing)
    bm = _C.BlockManager(6, 4, False)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a = Sequence(1, 0, 0, 11, [3] * 8, max_len=20)
    sched.add(a)
    assert isinstance(_prefill_all(sched), DecodeBatch)  # a decodes (its 9th token: a third block)
    assert bm.num_free_blocks == 3
    group = Sequence(2, 1, 0, 12, [5] * 4, fork_into=4, max_len=20)
    sched.add(group)
    batch = sched.schedule()
    assert isinstance(batch, DecodeBatch) and list(sched.waiting) == [group] and not sched.prefilling
    # with the engine idle the same group is admitted at once (preemption sorts it out later)
    idle = Scheduler(_C.BlockManager(3, 4, False), max_num_seqs=8, max_num_batched_tokens=64)
    idle.add(Sequence(3, 0, 0, 13, [5] * 4, fork_into=4, max_len=20))
    assert isinstance(idle.schedule(), PrefillBatch)


def test_a_preempted_sequence_is_requeued_ahead_of_new_requests():
    # 3 blocks of 4, two seats: a and b decode, c waits for a seat; a and b's 5th tokens need 2 blocks,
    # 1 is free: the newest (b) is preempted, its blocks dropped, and it is next in line, before c
    bm = _C.BlockManager(3, 4, False)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=64)
    a, b, c = (Sequence(i, i, 0, 20 + i, [i] * 4, max_len=12) for i in (1, 2, 3))
    for s in (a, b, c):
        sched.add(s)
    batch = _prefill_all(sched)
    assert isinstance(batch, DecodeBatch) and len(batch.slots) == 1
    assert list(sched.running) == [a] and sched.num_preemptions == 1
    assert list(sched.waiting) == [b, c]
    assert b.status is Status.WAITING and b.num_computed == 0 and not bm.has_seq(b.seq_id)
    assert len(b.tokens) == 5  # its sampled token is kept: it is recomputed, not redrawn


def test_planning_ahead_declines_while_a_sequence_prefills_or_can_be_admitted():
    # schedule_ahead runs while a decode step's tokens are still on the device: it must hand the loop back
    # (None) whenever schedule() would prefill or admit, else those sequences starve until decoding ends
    bm = _C.BlockManager(16, 4, False)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=4)
    a, b = Sequence(1, 0, 0, 31, [1] * 4, max_len=12), Sequence(2, 1, 0, 32, [2] * 8, max_len=16)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()  # both admitted; the 4-token budget takes a's prompt only
    assert batch.seqs == [a] and batch.ends == [4]
    a.num_computed = 4
    sched.prefill_done(a, [])
    a.tokens.append(7)
    assert sched.schedule().seqs == [b]  # b's first chunk
    b.num_computed = 4
    assert sched.prefilling == [b]
    assert sched.schedule_ahead() is None  # b is still prefilling
    b.num_computed = 8
    sched.prefill_done(b, [])
    b.tokens.append(7)
    sched.running._arrays = None
    step = sched.schedule_ahead()
    assert isinstance(step, DecodeBatch) and len(step.slots) == 2  # nothing to prefill or admit: decode
    sched.running.count_in_flight()
    c = Sequence(3, 2, 0, 33, [3] * 3, max_len=8)
    sched.add(c)
    assert sched.schedule_ahead() is None  # c can be admitted: the loop collects, then schedule() admits it
    assert isinstance(sched.schedule(), PrefillBatch) and sched.prefilling == [c]
