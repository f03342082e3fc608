"""The rollout scheduler on its own, over the real block manager: admission headroom, preemption order."""
import math
import random
import zlib

import numpy as np
import pytest
import torch

_C = pytest.importorskip("r1fast._C")

from r1fast.rollout.scheduler import DecodeBatch, PrefillBatch, Scheduler  # noqa: E402
from r1fast.rollout.sequence import Sequence, Status, ids_in  # noqa: E402


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


class _PrefixRunner:
    """A stand-in for ModelRunner whose 'KV' at a slot is the token prefix it was computed for: every prefill
    chunk and decode row checks that its context slots hold its own prefix (prefix-cache hits, copy-on-write,
    preemption and recompute, blocks freed while a step is in flight), then writes its positions. Its 'hidden
    state' is a hash of the row's whole context, so the sampled tokens depend on every position's KV."""

    def __init__(self, engine):
        self.bs, self.kv = engine.block_size, [None] * (engine.num_blocks * engine.block_size)
        self.dtype, self.device, self.graphs = engine.model.dtype, engine.model.device, {}

    def _slots(self, bm, seq_id, n):
        table = bm.block_table(seq_id).tolist()
        return [table[p // self.bs] * self.bs + p % self.bs for p in range(n)]

    @staticmethod
    def _hash(prefix):
        return zlib.crc32(np.asarray(prefix, dtype=np.int64).tobytes())

    def copy_blocks(self, copies):
        for src, dst in np.asarray(copies).tolist():
            self.kv[dst * self.bs:(dst + 1) * self.bs] = self.kv[src * self.bs:(src + 1) * self.bs]

    def prefill(self, bm, seq_ids, tokens_per_seq, starts, ends):
        out = []
        for seq_id, tokens, start, end in zip(seq_ids, tokens_per_seq, starts, ends):
            slots = self._slots(bm, seq_id, end)
            assert [self.kv[s] for s in slots[:start]] == [tuple(tokens[:q + 1]) for q in range(start)], seq_id
            for q in range(start, end):
                self.kv[slots[q]] = tuple(tokens[:q + 1])
            out.append(self._hash(tokens[:end]))
        return torch.tensor(out, dtype=torch.int64)

    def decode(self, bm, seq_ids, positions, slots, last_tokens=None, tokens_from=None):
        inputs = tokens_from[0][torch.as_tensor(tokens_from[1])] if tokens_from is not None else last_tokens
        out = []
        for seq_id, pos, slot, token in zip(seq_ids.tolist(), positions.tolist(), slots.tolist(),
                                            np.asarray(inputs).tolist()):
            context = self._slots(bm, seq_id, pos + 1)
            prev = self.kv[context[pos - 1]]
            assert slot == context[pos] and prev is not None and len(prev) == pos, (seq_id, pos, prev)
            assert [self.kv[s] for s in context[:pos]] == [prev[:q + 1] for q in range(pos)], (seq_id, pos)
            self.kv[slot] = prev + (token,)
            out.append(self._hash(self.kv[slot]))
        return torch.tensor(out, dtype=torch.int64)


def _prefix_sample(engine, hidden, keys, lens, params, pinned):
    """Tokens from the context hash (greedy) or from it, the stream key and the position (sampled)."""
    tokens = hidden % 7 if params.greedy else (hidden * 31 + torch.as_tensor(keys.astype(np.int64) % 1000003) * 7
                                               + torch.as_tensor(lens)) % 7
    return tokens, torch.zeros(len(tokens))


def test_engine_loop_keeps_every_context_right_and_outputs_unchanged_under_preemption(monkeypatch):
    """The engine's own loop (admission, chunked prefill, forks, async decode, preemption, prefix cache across
    calls) over random tight pools: every step reads its own prefix's KV, and the completions equal a huge
    pool's, greedy or seeded."""
    from r1fast.models import CausalLM, ModelConfig
    from r1fast.rollout import Engine, SamplingParams

    model = CausalLM(ModelConfig(vocab_size=7, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=64)).eval()
    monkeypatch.setattr(Engine, "_sample", _prefix_sample)

    def engine(**opts):
        e = Engine(model, **opts)
        e.runner = _PrefixRunner(e)
        return e

    rng = random.Random(0)
    preemptions = 0
    for _ in range(6):
        base = [rng.randrange(7) for _ in range(rng.randint(1, 14))]
        prompts = [base[:rng.randint(1, len(base))] + [rng.randrange(7) for _ in range(rng.randint(0, 5))]
                   for _ in range(rng.randint(1, 6))]
        prompts.append(list(prompts[0]))  # a repeated prompt: its own streams
        params = SamplingParams(n=rng.randint(1, 5), temperature=rng.choice([0.0, 1.0]), max_tokens=rng.randint(1, 30),
                                seed=rng.randrange(99), ignore_eos=True, stop_token_ids=rng.choice([[], [3]]))
        want = engine(block_size=4, num_blocks=1024, max_num_seqs=64).generate(prompts, params)
        bs = rng.choice([1, 2, 3, 4, 8])
        longest = max(len(p) for p in prompts) + params.max_tokens
        num_blocks = max(math.ceil((longest - 1) / bs), rng.randint(1, 2 * math.ceil(longest / bs)))
        tight = engine(block_size=bs, num_blocks=num_blocks, max_num_batched_tokens=rng.randint(1, 20),
                       max_num_seqs=rng.randint(params.n, 12), enable_prefix_caching=rng.random() < 0.7,
                       async_decode=rng.random() < 0.6)
        for _ in range(2):  # the second call starts from the first one's prefix cache
            got = tight.generate(prompts, params)
            assert [[(c.token_ids, c.finish_reason) for c in r.completions] for r in got] == \
                [[(c.token_ids, c.finish_reason) for c in r.completions] for r in want], tight.last_stats
            assert tight.block_manager.num_free_blocks == num_blocks
            preemptions += tight.last_stats["preemptions"]
    assert preemptions > 0


class _CountingBlocks:
    """The block manager, counting the calls of blocks_to_append (every other attribute passed through)."""

    def __init__(self, bm):
        self.bm, self.counted = bm, 0

    def blocks_to_append(self, seq_ids):
        self.counted += 1
        return self.bm.blocks_to_append(seq_ids)

    def __getattr__(self, name):
        return getattr(self.bm, name)


@pytest.mark.parametrize("ahead", [False, True])
def test_a_decode_step_counts_the_blocks_it_needs_only_when_the_pool_is_short(ahead):
    """Each decode step asked the block manager for the blocks its rows need (a pass over the rows), and
    append_batch made that pass again before appending. No row needs more than one block, so while the pool
    has a free block per row the first pass is skipped; close to full, it still decides, and preempts."""
    bm = _CountingBlocks(_C.BlockManager(12, 4, False))
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    for i in range(2):
        sched.add(Sequence(i + 1, i, 0, 30 + i, [i + 1] * 3, max_len=40))
    assert isinstance(_prefill_all(sched), DecodeBatch)
    bm.counted = 0
    steps, preempted = [], 0
    while len(sched.running) == 2:
        free_before = bm.num_free_blocks
        counted_before = bm.counted
        batch = sched.schedule_ahead() if ahead else sched.schedule()
        if batch is None:  # planning ahead declines when the pool is short
            break
        steps.append((free_before, bm.counted - counted_before))
        for seq in sched.running:
            seq.tokens.append(1)
            seq.logprobs.append(0.0)
        sched.running._arrays = None
        preempted = sched.num_preemptions
    assert all(counted == (free < 2) for free, counted in steps), steps
    assert any(free >= 2 for free, _ in steps) and any(free < 2 for free, _ in steps), steps
    if ahead:
        assert batch is None and not sched.num_preemptions
    else:
        assert preempted == 1 and len(sched.running) == 1


def test_num_stopped_counts_each_running_sequence_that_stops_once():
    """The engine skips its pass over a collected step's rows (which of them still run) while num_stopped is
    what it was at the step's launch: every retirement and preemption of a running sequence counts once, also
    one the engine dropped from the running rows before (its length limit reached in a step in flight)."""
    bm = _C.BlockManager(64, 4, False)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    seqs = [Sequence(i + 1, i, 0, 40 + i, [i + 1] * 5, max_len=30) for i in range(4)]
    for s in seqs:
        sched.add(s)
    assert isinstance(_prefill_all(sched), DecodeBatch)
    assert sched.num_stopped == 0
    sched.retire([seqs[0]], [True])
    assert sched.num_stopped == 1 and len(sched.running) == 3
    sched.preempt(sched.running.pop())
    assert sched.num_stopped == 2 and seqs[3].status is Status.WAITING
    sched.running.remove(sched.running.array("ids") == seqs[1].seq_id)  # dropped at its limit, still running
    assert sched.num_stopped == 2
    sched.retire([seqs[1], seqs[2]], [False, True])
    assert sched.num_stopped == 4 and not sched.running


def test_ids_in_answers_as_np_isin():
    """The engine's membership test of sequence ids (a sort and a binary search, in place of np.isin):
    the same mask on random ids, also for values past either end of the pool, a one-id pool and an empty one."""
    rng = np.random.default_rng(0)
    for size, pool_size in [(512, 500), (512, 3), (8, 1), (8, 0), (0, 4), (1, 1)]:
        values = rng.permutation(2000)[:size].astype(np.int64) - 1000
        pool = rng.choice(values, min(pool_size, size), replace=False) if size else np.arange(pool_size)
        for p in (pool, np.append(pool, [-5000, 5000]).astype(np.int64)):
            assert ids_in(values, p).tolist() == np.isin(values, p).tolist()
