"""The C++ block manager (r1fast._C.BlockManager) against a plain-Python model of the same rules.

The model keys its prefix cache by the whole token prefix (exact), where the C++ side chains 64-bit
hashes and compares block tokens; block ids, reference counts, free-queue order and cache
contents must agree after every operation of a random program.
"""
import copy
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

_C = pytest.importorskip("r1fast._C")
BlockManager = _C.BlockManager


class ModelBlockManager:
    def __init__(self, num_blocks, block_size, prefix_caching):
        self.bs, self.pc = block_size, prefix_caching
        self.ref = [0] * num_blocks
        self.free_queue = list(range(num_blocks))
        self.key = [None] * num_blocks  # the full token prefix a cached block ends
        self.cache = {}
        self.seqs = {}  # id -> {"table", "tokens", "hashed"}

    def _take_free(self):
        if not self.free_queue:
            raise ValueError("no free KV blocks")
        b = self.free_queue.pop(0)
        if self.key[b] is not None:
            if self.cache.get(self.key[b]) == b:
                del self.cache[self.key[b]]
            self.key[b] = None
        self.ref[b] = 1
        return b

    def _release(self, b):
        self.ref[b] -= 1
        if self.ref[b] == 0:
            self.free_queue.append(b)

    def _hits(self, tokens):
        hits = []
        if self.pc:
            for i in range((len(tokens) - 1) // self.bs):
                b = self.cache.get(tuple(tokens[: (i + 1) * self.bs]))
                if b is None:
                    break
                hits.append(b)
        return hits

    def blocks_to_allocate(self, tokens):
        total = -(-len(tokens) // self.bs)
        return total - sum(self.ref[b] > 0 for b in self._hits(tokens))

    def allocate(self, seq, tokens):
        if self.blocks_to_allocate(tokens) > len(self.free_queue):
            raise ValueError("not enough blocks")
        hits = self._hits(tokens)
        table = []
        for b in hits:
            if self.ref[b] == 0:
                self.free_queue.remove(b)
            self.ref[b] += 1
            table.append(b)
        while len(table) < -(-len(tokens) // self.bs):
            table.append(self._take_free())
        self.seqs[seq] = {"table": table, "tokens": list(tokens), "hashed": len(hits)}
        return len(hits) * self.bs

    def fork(self, parent, child):
        s = self.seqs[parent]
        for b in s["table"]:
            self.ref[b] += 1
        self.seqs[child] = {"table": list(s["table"]), "tokens": list(s["tokens"]), "hashed": s["hashed"],
                            "stale": s.get("stale", False)}

    def blocks_to_append(self, seq):
        s = self.seqs[seq]
        if len(s["tokens"]) % self.bs == 0:
            return 1
        return int(self.ref[s["table"][-1]] > 1)

    def append(self, seq, token):
        s = self.seqs[seq]
        pos = len(s["tokens"])
        src = dst = -1
        if pos % self.bs == 0:
            s["table"].append(self._take_free())
        elif self.ref[s["table"][-1]] > 1:
            fresh = self._take_free()
            src, dst = s["table"][-1], fresh
            self._release(src)
            s["table"][-1] = fresh
        s["tokens"].append(token)
        return s["table"][pos // self.bs] * self.bs + pos % self.bs, src, dst

    def mark_computed(self, seq, n):
        s = self.seqs[seq]
        if not self.pc or s.get("stale"):  # alive at a reset: its KV chains back to stale blocks
            return
        while (s["hashed"] + 1) * self.bs <= n:
            key = tuple(s["tokens"][: (s["hashed"] + 1) * self.bs])
            if min(key[-self.bs:]) < 0:  # a token appended unknown: no key for this block or any after
                return
            b = s["table"][s["hashed"]]
            if key not in self.cache and self.key[b] is None:
                self.cache[key] = b
                self.key[b] = key
            s["hashed"] += 1

    def free(self, seq):
        for b in reversed(self.seqs.pop(seq)["table"]):
            self._release(b)

    def reset_prefix_cache(self):
        self.cache.clear()
        self.key = [None] * len(self.key)
        for s in self.seqs.values():
            s["stale"] = True


PREFIXES = ([1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 9, 9], [8, 8, 8, 8, 8, 8, 8, 8, 8])


def _both(real_fn, model_fn):
    """Run an op on the real manager and on the model; they must agree on the result or on raising ValueError."""
    try:
        want = model_fn()
    except ValueError:
        with pytest.raises(ValueError):
            real_fn()
        return None
    got = real_fn()
    assert got == want, (got, want)
    return got


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.configured = False

    @precondition(lambda self: not self.configured)
    @rule(num_blocks=st.integers(1, 12), block_size=st.sampled_from([1, 2, 4]), pc=st.booleans())
    def configure(self, num_blocks, block_size, pc):
        self.real = BlockManager(num_blocks, block_size, pc)
        self.model = ModelBlockManager(num_blocks, block_size, pc)
        self.next_id = 0
        self.preempted = {}  # id -> tokens of a preempted sequence, until it is resumed
        self.configured = True

    @precondition(lambda self: self.configured)
    @rule(prefix=st.sampled_from(PREFIXES), cut=st.integers(1, 9), suffix=st.lists(st.integers(0, 5), max_size=4))
    def allocate(self, prefix, cut, suffix):
        tokens = prefix[:cut] + suffix
        arr = np.array(tokens, dtype=np.int32)
        assert self.real.blocks_to_allocate(arr) == self.model.blocks_to_allocate(tokens)
        sid = self.next_id
        self.next_id += 1
        _both(lambda: self.real.allocate(sid, arr), lambda: self.model.allocate(sid, tokens))

    def _pick(self, i):
        ids = sorted(self.model.seqs)
        return ids[i % len(ids)]

    @precondition(lambda self: self.configured and self.model.seqs)
    @rule(i=st.integers(0, 50))
    def fork(self, i):
        parent, child = self._pick(i), self.next_id
        self.next_id += 1
        self.real.fork(parent, child)
        self.model.fork(parent, child)

    @precondition(lambda self: self.configured and self.model.seqs)
    @rule(i=st.integers(0, 50), token=st.integers(0, 9))
    def append(self, i, token):
        sid = self._pick(i)
        assert self.real.blocks_to_append(sid) == self.model.blocks_to_append(sid)
        # the batch count is what appending to every sequence in turn takes from the free queue:
        # a shared partial block's last holder writes it in place (G forks need G - 1 copies)
        every = sorted(self.model.seqs)
        sim = copy.deepcopy(self.model)
        free_before = len(sim.free_queue)
        try:
            for s in every:
                sim.append(s, 0)
            taken = free_before - len(sim.free_queue)
        except ValueError:  # the pool cannot take them all: the count must say more than are free
            taken = None
        batch = self.real.blocks_to_append(np.asarray(every, dtype=np.int64))
        assert batch == taken if taken is not None else batch > self.real.num_free_blocks
        _both(lambda: tuple(self.real.append(sid, token)), lambda: self.model.append(sid, token))

    @precondition(lambda self: self.configured and self.model.seqs)
    @rule(i=st.integers(0, 50), frac=st.floats(0, 1))
    def mark_computed(self, i, frac):
        sid = self._pick(i)
        n = int(frac * len(self.model.seqs[sid]["tokens"]))
        self.real.mark_computed(sid, n)
        self.model.mark_computed(sid, n)

    @precondition(lambda self: self.configured and self.model.seqs)
    @rule(i=st.integers(0, 50), preempt=st.booleans())
    def free(self, i, preempt):
        sid = self._pick(i)
        tokens = self.model.seqs[sid]["tokens"]
        (self.real.preempt if preempt else self.real.free)(sid)
        self.model.free(sid)
        if preempt:
            self.preempted[sid] = tokens

    @precondition(lambda self: self.configured and self.preempted)
    @rule(i=st.integers(0, 50))
    def resume(self, i):
        """A preempted sequence re-allocated under its own id with every token it had (recompute)."""
        sid = sorted(self.preempted)[i % len(self.preempted)]
        tokens = self.preempted[sid]
        arr = np.array(tokens, dtype=np.int32)
        assert self.real.blocks_to_allocate(arr) == self.model.blocks_to_allocate(tokens)
        if _both(lambda: self.real.allocate(sid, arr), lambda: self.model.allocate(sid, tokens)) is not None:
            del self.preempted[sid]

    @precondition(lambda self: self.configured)
    @rule()
    def reset(self):
        self.real.reset_prefix_cache()
        self.model.reset_prefix_cache()

    @invariant()
    def agree(self):
        if not self.configured:
            return
        self.real.check_invariants()
        m = self.model
        assert self.real.num_free_blocks == len(m.free_queue)
        assert self.real.num_cached_blocks == len(m.cache)
        assert [self.real.ref_count(b) for b in range(len(m.ref))] == m.ref
        assert self.real.seq_ids() == sorted(m.seqs)
        for sid, s in m.seqs.items():
            assert self.real.block_table(sid).tolist() == s["table"]
            assert self.real.num_tokens(sid) == len(s["tokens"])
        # no leak: with every sequence freed, every block is free
        assert sum(r > 0 for r in m.ref) + len(m.free_queue) == len(m.ref)


TestBlockManagerProperties = BlockManagerMachine.TestCase
TestBlockManagerProperties.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                               suppress_health_check=list(HealthCheck))


def test_group_fork_shares_prompt_blocks_and_copies_partial_block_on_write():
    bm = BlockManager(16, 4, False)
    prompt = np.arange(10, dtype=np.int32)  # 3 blocks, the last one partial
    bm.allocate(0, prompt)
    for child in range(1, 4):
        bm.fork(0, child)
    assert 16 - bm.num_free_blocks == 3  # G = 4 samples, the prompt's blocks once
    copies = []
    for sid in range(4):
        slot, src, dst = bm.append(sid, 100 + sid)
        if src >= 0:
            copies.append((src, dst))
        assert slot // 4 == bm.block_table(sid)[2] and slot % 4 == 2
    # the first three writers copy the shared partial block; the last one owns it
    assert [c[0] for c in copies] == [2, 2, 2] and len({c[1] for c in copies}) == 3
    assert bm.block_table(3)[2] == 2
    assert all(bm.block_table(s)[:2].tolist() == [0, 1] for s in range(4))
    assert bm.ref_count(0) == 4 and bm.ref_count(2) == 1
    bm.check_invariants()
    for sid in range(4):
        bm.free(sid)
    assert bm.num_free_blocks == 16


def test_prefix_cache_hits_only_computed_full_blocks_and_reset_forgets_them():
    bm = BlockManager(8, 4, True)
    tokens = np.arange(9, dtype=np.int32)
    assert bm.allocate(0, tokens) == 0
    assert bm.allocate(1, tokens) == 0  # not computed yet: no hit
    bm.mark_computed(0, 9)
    assert bm.num_cached_blocks == 2
    assert bm.allocate(2, tokens) == 8
    assert bm.block_table(2)[:2].tolist() == bm.block_table(0)[:2].tolist()
    # a prompt that is exactly two blocks never hits its last block: its logits must be computed
    assert bm.allocate(3, tokens[:8]) == 4
    bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0
    assert bm.allocate(4, tokens) == 0 if bm.num_free_blocks >= 3 else True


def test_block_tables_and_slot_mapping_are_int_arrays():
    bm = BlockManager(8, 2, False)
    bm.allocate(7, np.array([1, 2, 3], dtype=np.int32))
    bm.allocate(9, np.array([4], dtype=np.int32))
    tables = bm.block_tables(np.array([7, 9]), 4, -1)
    assert tables.dtype == np.int32 and tables.tolist() == [[0, 1, -1, -1], [2, -1, -1, -1]]
    slots = bm.slot_mapping(np.array([7, 9]), np.array([1, 0]), np.array([3, 1]))
    assert slots.dtype == np.int64 and slots.tolist() == [1, 2, 4]


def test_misuse_raises_value_errors():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 4, True)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0, True)
    bm = BlockManager(2, 2, False)
    with pytest.raises(ValueError, match="at least one token"):
        bm.allocate(0, np.array([], dtype=np.int32))
    with pytest.raises(ValueError, match="needs 3 free blocks"):
        bm.allocate(0, np.arange(5, dtype=np.int32))
    bm.allocate(0, np.arange(2, dtype=np.int32))
    with pytest.raises(ValueError, match="already allocated"):
        bm.allocate(0, np.arange(2, dtype=np.int32))
    with pytest.raises(ValueError, match="unknown sequence"):
        bm.free(5)
    with pytest.raises(ValueError, match="outside"):
        bm.slot_mapping(np.array([0]), np.array([0]), np.array([3]))
    with pytest.raises(ValueError, match="1-D"):
        bm.allocate(1, np.zeros((1, 2), dtype=np.int32))


def test_sequences_alive_at_a_reset_never_register_blocks():
    # A's block 1 holds KV computed over A's block 0 from before the reset (old weights). Once B
    # re-registers block 0's key, a new prompt must not chain from B's block 0 into A's block 1.
    bm = BlockManager(8, 2, True)
    bm.allocate(0, np.array([1, 2, 3], dtype=np.int32))
    bm.mark_computed(0, 3)
    bm.append(0, 4)
    bm.reset_prefix_cache()
    bm.allocate(1, np.array([1, 2, 3], dtype=np.int32))
    bm.mark_computed(1, 3)
    bm.mark_computed(0, 4)  # A's token 4 computed after the reset: its block still must not register
    assert bm.num_cached_blocks == 1
    assert bm.allocate(2, np.array([1, 2, 3, 4, 5], dtype=np.int32)) == 2  # B's block 0 only
    bm.fork(0, 3)  # a fork of a stale sequence is stale too
    bm.append(3, 9)
    bm.mark_computed(3, 5)
    assert bm.num_cached_blocks == 1
    bm.check_invariants()


def test_tokens_appended_unknown_never_enter_the_prefix_cache():
    bm = BlockManager(8, 2, True)
    bm.allocate(0, np.array([1, 2, 3], dtype=np.int32))
    slots, copies = bm.append_batch(np.array([0], dtype=np.int64), None)  # token 4 still on the device
    assert slots.tolist() == [bm.block_table(0)[1] * 2 + 1] and copies.shape == (0, 2)
    bm.append(0, 5)
    bm.append(0, 6)
    bm.mark_computed(0, 6)
    assert bm.num_cached_blocks == 1  # block 0 ([1, 2]); not [3, ?] nor [5, 6], which chains from it
    assert bm.allocate(1, np.array([1, 2, 3, 4, 5, 6, 7], dtype=np.int32)) == 2
    bm.check_invariants()


def test_append_batch_rejects_repeated_ids_and_changes_nothing():
    bm = BlockManager(2, 2, False)
    bm.allocate(0, np.array([1], dtype=np.int32))  # one token: the next fits, the one after needs a block
    bm.allocate(1, np.array([1, 2], dtype=np.int32))  # no block left
    with pytest.raises(ValueError, match="more than once"):
        bm.append_batch(np.array([0, 0], dtype=np.int64), np.array([5, 6], dtype=np.int32))
    assert bm.num_tokens(0) == 1 and bm.num_free_blocks == 0
    bm.check_invariants()


def test_integer_arrays_are_checked_not_silently_cast():
    bm = BlockManager(8, 2, True)
    with pytest.raises(ValueError, match="integers"):
        bm.allocate(0, np.array([1.7, 2.0]))
    with pytest.raises(ValueError, match="fit in 32-bit"):
        bm.allocate(0, np.array([1, 2**40], dtype=np.int64))
    with pytest.raises(ValueError, match="fit in 32-bit"):
        bm.blocks_to_allocate(np.array([2**32 - 1], dtype=np.uint32))
    with pytest.raises(ValueError, match="fit in 64-bit"):
        bm.block_tables(np.array([2**63], dtype=np.uint64))
    with pytest.raises(ValueError, match=r"block_size = 1099511627776 lies outside \[1, 2147483647\]"):
        BlockManager(4, 2**40, True)
    with pytest.raises(ValueError, match="width"):
        bm.block_tables(np.array([], dtype=np.int64), -1)
    assert not bm.has_seq(0)
    # any integer dtype (or a list) whose values fit is fine
    assert bm.allocate(0, np.array([1, 2, 3], dtype=np.int64)) == 0
    assert bm.allocate(1, [1, 2, 3]) == 0
    assert bm.block_tables(np.array([0, 1], dtype=np.int32)).shape == (2, 2)
    assert bm.slot_mapping([0], [0], [3]).tolist() == bm.slot_mapping(np.array([0], dtype=np.uint8),
                                                                       np.array([0], dtype=np.int16), [3]).tolist()
    assert bm.blocks_to_append(np.int64(0)) == 0 and bm.blocks_to_append([0, 1]) == 0
    # a negative id that fits is named as negative, not as an overflow
    with pytest.raises(ValueError, match=r"tokens\[1\] = -1 is negative"):
        bm.allocate(2, np.array([3, -1], dtype=np.int64))


def test_block_tables_refuses_ids_inside_its_out_buffer():
    """The ids are read while `out` is written: ids living in `out` would be overwritten first."""
    bm = BlockManager(16, 4, True)
    bm.allocate(0, [1])
    bm.allocate(1, list(range(9)))
    out = np.zeros((2, 4), np.int32)
    ids = out.reshape(-1).view(np.int64)[:2]
    ids[:] = [1, 0]
    with pytest.raises(ValueError, match="overlap the out buffer"):
        bm.block_tables(ids, 0, 0, out=out)
    ok = np.zeros((2, 4), np.int32)
    bm.block_tables(ids.copy(), 0, 0, out=ok)
    assert ok[1, 0] == bm.block_table(0)[0] and ok[0, :3].tolist() == bm.block_table(1).tolist()


def test_forks_of_a_partial_block_need_one_copy_fewer_than_forks():
    # 8 samples of a 5-token prompt at block size 4 share its partial second block: the first decode
    # step copies it 7 times (the last holder writes in place), and the scheduler counts 7, not 8.
    bm = BlockManager(16, 4, False)
    bm.allocate(0, [1, 2, 3, 4, 5])
    for child in range(1, 8):
        bm.fork(0, child)
    ids = np.arange(8, dtype=np.int64)
    assert bm.blocks_to_append(ids) == 7 and bm.blocks_to_append(ids[:3]) == 3
    with pytest.raises(ValueError, match="appears more than once"):
        bm.blocks_to_append(np.array([1, 1], dtype=np.int64))
    free = bm.num_free_blocks
    slots, copies = bm.append_batch(ids, np.zeros(8, dtype=np.int32))
    assert free - bm.num_free_blocks == 7 and len(copies) == 7
    # exactly enough free blocks: the batch fits (it was refused when the count said 8)
    bm2 = BlockManager(9, 4, False)
    bm2.allocate(0, [1, 2, 3, 4, 5])
    for child in range(1, 8):
        bm2.fork(0, child)
    assert bm2.num_free_blocks == 7
    bm2.append_batch(ids, np.zeros(8, dtype=np.int32))
    assert bm2.num_free_blocks == 0


class _KVShadow:
    """What each cache slot holds, as an oracle independent of the manager's rules: the token prefix whose last
    position's KV was written there, the reset epoch it was computed in, and whether its whole context was computed
    in that epoch too (only such KV may be handed to a new sequence as a prefix-cache hit)."""

    def __init__(self, num_slots):
        self.slot = [None] * num_slots  # (prefix tuple, epoch, clean)
        self.epoch = 0

    def write(self, slots, tokens, start, end):
        """Computes the KV of positions [start, end) of a sequence whose cache slots (from position 0) are `slots`."""
        for p in range(start, end):
            before = self.slot[slots[p - 1]] if p else None
            clean = p == 0 or (before[1] == self.epoch and before[2])
            self.slot[slots[p]] = (tuple(tokens[: p + 1]), self.epoch, clean)

    def copy_block(self, src, dst, block_size):
        self.slot[dst * block_size:(dst + 1) * block_size] = self.slot[src * block_size:(src + 1) * block_size]

    def check(self, slots, tokens, n, fresh=False):
        """The KV of positions [0, n) is that of these tokens (and, for a cache hit, current and clean)."""
        for p in range(n):
            kv = self.slot[slots[p]]
            assert kv is not None and kv[0] == tuple(tokens[: p + 1]), (p, kv, tokens[: p + 1])
            if fresh:
                assert kv[1] == self.epoch and kv[2], ("stale KV handed out as a prefix-cache hit", p, kv)


class _Fuzz:
    """Seeded random programs over the C++ manager, the plain-Python model and the KV shadow, driven the way the
    engine drives them: allocate (prefix-cache hits), chunked compute + mark_computed, fork after the prompt,
    append / append_batch (known or unknown tokens), preemption of the newest sequences when the pool is full,
    free, reset. Every op's result and the whole state must agree, and every computed position's slot must hold
    its own prefix's KV."""

    MAX_LEN = 24

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        nb, bs, pc = int(self.rng.integers(1, 20)), int(self.rng.choice([1, 2, 3, 4])), bool(self.rng.random() < 0.8)
        self.bs = bs
        self.real, self.model = BlockManager(nb, bs, pc), ModelBlockManager(nb, bs, pc)
        self.kv = _KVShadow(nb * bs)
        self.bases = [self.rng.integers(0, 4, size=12).tolist() for _ in range(3)]
        self.seqs = {}  # id -> {"tokens": the true tokens, "computed": positions whose KV is written}
        self.preempted = {}  # id -> the true tokens of a preempted sequence, which the engine re-allocates later
        self.next_id = 0

    def slots(self, sid):
        table = self.real.block_table(sid).tolist()
        return [table[p // self.bs] * self.bs + p % self.bs for p in range(len(self.seqs[sid]["tokens"]))]

    def pick(self, ready=None):
        ids = [s for s, v in self.seqs.items() if ready is None or (v["computed"] == len(v["tokens"])) == ready]
        return int(self.rng.choice(ids)) if ids else None

    def op_allocate(self):
        base = self.bases[int(self.rng.integers(len(self.bases)))]
        tokens = base[: int(self.rng.integers(1, len(base) + 1))] + self.rng.integers(0, 4, size=int(
            self.rng.integers(0, 4))).tolist()
        assert self.real.blocks_to_allocate(tokens) == self.model.blocks_to_allocate(tokens)
        sid, self.next_id = self.next_id, self.next_id + 1
        cached = _both(lambda: self.real.allocate(sid, tokens), lambda: self.model.allocate(sid, tokens))
        if cached is None:
            return
        self.seqs[sid] = {"tokens": tokens, "computed": cached}
        self.kv.check(self.slots(sid), tokens, cached, fresh=True)

    def op_compute(self):
        sid = self.pick(ready=False)
        if sid is None:
            return
        s = self.seqs[sid]
        end = int(self.rng.integers(s["computed"] + 1, len(s["tokens"]) + 1))
        self.kv.write(self.slots(sid), s["tokens"], s["computed"], end)
        s["computed"] = end
        self.real.mark_computed(sid, end)
        self.model.mark_computed(sid, end)

    def op_fork(self):
        parent = self.pick(ready=True)
        if parent is None:
            return
        child, self.next_id = self.next_id, self.next_id + 1
        self.real.fork(parent, child)
        self.model.fork(parent, child)
        self.seqs[child] = {"tokens": list(self.seqs[parent]["tokens"]), "computed": self.seqs[parent]["computed"]}

    def _appended(self, sid, token, slot, src, dst):
        if src >= 0:
            self.kv.copy_block(src, dst, self.bs)
        s = self.seqs[sid]
        s["tokens"].append(token)
        slots = self.slots(sid)
        assert slots[-1] == slot
        self.kv.write(slots, s["tokens"], s["computed"], len(s["tokens"]))
        s["computed"] = len(s["tokens"])

    def op_append(self):
        sid = self.pick(ready=True)
        if sid is None or len(self.seqs[sid]["tokens"]) >= self.MAX_LEN:
            return
        token = int(self.rng.integers(0, 4))
        assert self.real.blocks_to_append(sid) == self.model.blocks_to_append(sid)
        got = _both(lambda: tuple(self.real.append(sid, token)), lambda: self.model.append(sid, token))
        if got is not None:
            self._appended(sid, token, *got)

    def op_decode_step(self):
        """The scheduler's decode step: preempt the newest sequences until one token for each fits, then
        append_batch (tokens unknown when the step runs ahead of the host)."""
        ids = sorted(s for s, v in self.seqs.items() if v["computed"] == len(v["tokens"]) < self.MAX_LEN)
        if not ids:
            return
        while self.real.blocks_to_append(np.asarray(ids)) > self.real.num_free_blocks and len(ids) > 1:
            victim = ids.pop()
            self.real.preempt(victim)
            self.model.free(victim)
            self.preempted[victim] = self.seqs.pop(victim)["tokens"]
        tokens = self.rng.integers(0, 4, size=len(ids)).tolist()
        unknown = bool(self.rng.random() < 0.5)
        sim = copy.deepcopy(self.model)
        try:
            want = [sim.append(s, -1 if unknown else t) for s, t in zip(ids, tokens)]
        except ValueError:  # one sequence left and no block for it: refused, nothing changed
            with pytest.raises(ValueError, match="free blocks"):
                self.real.append_batch(np.asarray(ids), None if unknown else np.asarray(tokens))
            return
        self.model = sim
        slots, copies = self.real.append_batch(np.asarray(ids), None if unknown else np.asarray(tokens))
        assert slots.tolist() == [w[0] for w in want]
        assert copies.tolist() == [[w[1], w[2]] for w in want if w[1] >= 0]
        for src, dst in copies.tolist():  # the engine copies every block before the step's attention runs
            self.kv.copy_block(src, dst, self.bs)
        for sid, t, slot in zip(ids, tokens, slots.tolist()):
            self._appended(sid, t, slot, -1, -1)

    def op_free(self):
        sid = self.pick()
        if sid is not None:
            preempt = self.rng.random() < 0.5
            (self.real.preempt if preempt else self.real.free)(sid)
            self.model.free(sid)
            tokens = self.seqs.pop(sid)["tokens"]
            if preempt:
                self.preempted[sid] = tokens

    def op_resume(self):
        """A preempted sequence comes back under its own id with every token it had (prompt and decoded, now all
        known): its leading full blocks may be prefix-cache hits, its own freed blocks among them."""
        if not self.preempted:
            return
        sid = int(self.rng.choice(sorted(self.preempted)))
        tokens = self.preempted[sid]
        assert self.real.blocks_to_allocate(tokens) == self.model.blocks_to_allocate(tokens)
        cached = _both(lambda: self.real.allocate(sid, tokens), lambda: self.model.allocate(sid, tokens))
        if cached is None:  # no room yet: it stays preempted
            return
        del self.preempted[sid]
        self.seqs[sid] = {"tokens": list(tokens), "computed": cached}
        self.kv.check(self.slots(sid), tokens, cached, fresh=True)

    def op_reset(self):
        self.real.reset_prefix_cache()
        self.model.reset_prefix_cache()
        self.kv.epoch += 1

    OPS = (("op_allocate", 4), ("op_compute", 4), ("op_fork", 1), ("op_append", 3), ("op_decode_step", 2),
           ("op_free", 2), ("op_resume", 1.5), ("op_reset", 0.3))

    def check(self):
        self.real.check_invariants()
        m = self.model
        assert self.real.num_free_blocks == len(m.free_queue)
        assert self.real.num_cached_blocks == len(m.cache)
        assert [self.real.ref_count(b) for b in range(len(m.ref))] == m.ref
        assert self.real.seq_ids() == sorted(m.seqs) == sorted(self.seqs)
        for sid, s in self.seqs.items():
            assert self.real.block_table(sid).tolist() == m.seqs[sid]["table"]
            assert self.real.num_tokens(sid) == len(s["tokens"])
            self.kv.check(self.slots(sid), s["tokens"], s["computed"])
        if self.seqs:
            ids = np.asarray(sorted(self.seqs))
            lens = np.asarray([len(self.seqs[s]["tokens"]) for s in ids])
            assert self.real.slot_mapping(ids, np.zeros_like(lens), lens).tolist() == sum(
                (self.slots(s) for s in ids.tolist()), [])

    def run(self, num_ops):
        names, weights = zip(*self.OPS)
        p = np.asarray(weights) / sum(weights)
        for _ in range(num_ops):
            getattr(self, names[int(self.rng.choice(len(names), p=p))])()
            self.check()


def test_seeded_random_programs_agree_with_the_model_and_keep_every_kv_slot_right():
    for seed in range(12):
        _Fuzz(seed).run(150)


# conftest clears R1FAST_* variables for every test: read it at import
_LONG_FUZZ_PROGRAMS = int(os.environ.get("R1FAST_LONG_FUZZ", "0"))


@pytest.mark.skipif(not _LONG_FUZZ_PROGRAMS, reason="long fuzz: R1FAST_LONG_FUZZ=<programs> runs that many of 2000 ops")
def test_long_random_programs():
    for seed in range(_LONG_FUZZ_PROGRAMS):
        _Fuzz(1000 + seed).run(2000)


def test_int_arguments_out_of_range_name_the_argument_and_the_range():
    # pybind's casters answered an out-of-range int with "incompatible function arguments", and
    # append(seq, -5) recorded a negative token (taken for an unknown one: its block never cached)
    bm = BlockManager(4, 2, True)
    bm.allocate(0, [1, 2, 3])
    cases = [
        (lambda: bm.append(0, -5), r"append: token = -5 lies outside \[0, 2147483647\]"),
        (lambda: bm.append(0, 2**31), r"append: token = 2147483648 lies outside \[0, 2147483647\]"),
        (lambda: bm.append(2**63, 1), r"append: seq_id = 9223372036854775808 lies outside \[-9223372036854775808, "),
        (lambda: bm.fork(0, -2**70), r"fork: child = -1180591620717411303424 lies outside"),
        (lambda: bm.ref_count(4), r"ref_count: block = 4 lies outside \[0, 3\]"),
        (lambda: bm.mark_computed(0, -1), r"mark_computed: num_tokens = -1 lies outside"),
        (lambda: bm.block_tables([0], 0, 2**31), r"block_tables: pad = 2147483648 lies outside"),
        (lambda: BlockManager(2**31, 1), r"num_blocks = 2147483648 exceeds the limit 67108864"),
        (lambda: bm.append_batch([0], [-7]), r"tokens\[0\] = -7 is negative"),
        (lambda: bm.blocks_to_allocate([4, -2]), r"tokens\[1\] = -2 is negative"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    for call, message in [(lambda: bm.append(0, 1.5), "append: token must be an int, got float"),
                          (lambda: bm.append(0, True), "append: token must be an int, got bool"),
                          (lambda: bm.free("0"), "free: seq_id must be an int, got str")]:
        with pytest.raises(TypeError, match=message):
            call()
    assert bm.num_tokens(0) == 3 and bm.num_free_blocks == 2
    bm.check_invariants()
    assert bm.append(np.int64(0), np.int32(4))[0] == bm.block_table(0)[1] * 2 + 1  # numpy ints are ints
    assert bm.has_seq(np.array(0)) and bm.blocks_to_append(np.array(0)) == 1  # so is a 0-d array


def test_block_tables_width_is_bounded_by_the_pool():
    # no table is longer than the pool; width=2**31-1 allocated an 8 GB row
    bm = BlockManager(4, 2, False)
    bm.allocate(0, [1, 2, 3])
    with pytest.raises(ValueError, match="width 2147483647 exceeds the pool's num_blocks 4"):
        bm.block_tables([0], 2**31 - 1)
    assert bm.block_tables([0], 4, -1).tolist() == [[0, 1, -1, -1]]
    out = np.zeros((1, 6), np.int32)  # a caller's wider buffer is still written
    assert bm.block_tables([0], 0, -1, out=out).tolist() == [[0, 1, -1, -1, -1, -1]]
    # with out= nothing is allocated: a width up to the buffer's is a minimum, not refused with "pass out="
    assert bm.block_tables([0], 6, -2, out=out).tolist() == [[0, 1, -2, -2, -2, -2]]
    with pytest.raises(ValueError, match=r"out is \[1, 6\], needs at least \[1, 7\]"):
        bm.block_tables([0], 7, -1, out=out)


def test_int_arguments_read_tensors_and_0d_arrays_as_the_array_arguments_do():
    # a tensor's __index__ answers for one element only: blocks_to_append(torch.tensor([1, 2])) (an array of ids,
    # as numpy reads it) failed with torch's "only integer tensors of a single element ...", torch.tensor(True)
    # was taken for the id 1, and np.array(1.0) failed with numpy's message, naming neither method nor argument
    torch = pytest.importorskip("torch")
    bm = BlockManager(8, 4, True)
    bm.allocate(1, [1, 2, 3, 4])
    bm.allocate(2, [1, 2, 3])
    assert bm.blocks_to_append(torch.tensor([1, 2])) == bm.blocks_to_append([1, 2]) == 1
    assert bm.blocks_to_append(torch.tensor(1)) == bm.blocks_to_append(np.int64(1)) == 1  # 0-d: one id
    for call, message in [
        (lambda: bm.append(2, torch.tensor(True)), "append: token must be an int, got Tensor of dtype torch.bool"),
        (lambda: bm.append(2, np.array(True)), "append: token must be an int, got ndarray of dtype bool"),
        (lambda: bm.has_seq(np.array(1.0)), "has_seq: seq_id must be an int, got ndarray of dtype float64"),
        (lambda: bm.free(torch.tensor(1.0)), "free: seq_id must be an int, got Tensor of dtype torch.float32"),
        (lambda: bm.free(torch.tensor([1])), "free: seq_id must be an int, got Tensor of dtype torch.int64"),
    ]:
        with pytest.raises(TypeError, match=message):
            call()
    assert bm.num_tokens(2) == 3 and bm.has_seq(1)
    bm.check_invariants()


def test_a_pool_past_the_limit_is_refused_before_its_bookkeeping_is_allocated():
    # BlockManager(2**31 - 1, 1) was accepted and went on to allocate ~190 GB of host bookkeeping (~90 bytes a
    # block) before the first sequence; 2**26 blocks is more than any real KV cache has (see block_manager.h)
    assert BlockManager.max_num_blocks == 2**26
    for num_blocks in (2**31 - 1, 2**26 + 1):
        with pytest.raises(ValueError, match=rf"num_blocks = {num_blocks} exceeds the limit 67108864 \(2\*\*26\)"):
            BlockManager(num_blocks, 1)


def test_enable_prefix_caching_must_be_a_bool():
    # pybind's bool caster read any number or None as a bool (0.0 and None: off, 2: on) and answered a string
    # with "incompatible constructor arguments", naming neither the argument nor what it takes
    for value in (2, 0, 0.0, None, "no", [True], np.array([True, False])):
        with pytest.raises(TypeError, match=r"__init__: enable_prefix_caching must be True or False, got "):
            BlockManager(4, 2, value)
    torch = pytest.importorskip("torch")
    for value, want in ((True, True), (False, False), (np.bool_(False), False), (np.array(True), True),
                        (torch.tensor(False), False)):
        assert BlockManager(4, 2, value).prefix_caching is want
    assert BlockManager(4, 2, enable_prefix_caching=False).prefix_caching is False
