"""Continuous batching over the block manager.

Each step is a prefill step or a decode step:
- prefill while any admitted sequence still has prompt KV to compute, or a waiting one can be
  admitted: up to max_num_batched_tokens tokens, taken chunk by chunk from the admitted sequences
  in order (a long prompt spans several steps: chunked prefill);
- otherwise decode every running sequence by one token; when the pool cannot hold the new tokens,
  the most recently admitted sequences are preempted (blocks dropped, requeued at the front,
  recomputed later: the counter-based sampler makes their outputs unchanged).
schedule_ahead() plans a decode step while the previous one's tokens are still on the device (the
engine overlaps its host work with the GPU); it declines whenever the step would need them: to
admit or prefill a sequence, or to preempt one.
A group (the n samples of a prompt) is admitted as one sequence whose prompt is prefilled once; it
counts n against max_num_seqs from admission on. With the prefix cache on, a prompt identical to one
being prefilled waits for that prefill and then takes its full blocks from the cache (later prompts
are admitted meanwhile).
"""
from __future__ import annotations

import collections
import dataclasses

import numpy as np

from r1fast.rollout.sequence import Sequence, Status, ids_in


@dataclasses.dataclass
class PrefillBatch:
    seqs: list[Sequence]
    starts: list[int]   # first position of each chunk
    ends: list[int]     # one past its last position


@dataclasses.dataclass
class DecodeBatch:
    """One token for every running sequence, in the order of Scheduler.running."""
    slots: np.ndarray        # int64 [B]: cache slot of each sequence's last token
    copies: np.ndarray       # int32 [K, 2]: (src, dst) blocks to copy before the step (copy-on-write)


class Running:
    """The decoding sequences in batch order, with their per-row numbers as arrays.

    A decode step over hundreds of sequences reads ids, lens (tokens so far), last (last token),
    max_lens and keys, and advance() updates them with a few numpy ops: Python loops over the rows
    were most of the engine's host time per step. The arrays are rebuilt from the sequences after
    a sequence joins (rare: once per group) and compacted when sequences leave.

    While a decode step is in flight, lens already counts its token (count_in_flight()) and last
    is stale: the sequences' own token lists lag until the engine collects the step.
    """

    _FIELDS = (("ids", "seq_id", np.int64), ("max_lens", "max_len", np.int64), ("keys", "key", np.uint64))

    def __init__(self):
        self.seqs: list[Sequence] = []
        self._arrays: dict[str, np.ndarray] | None = None

    def __len__(self):
        return len(self.seqs)

    def __iter__(self):
        return iter(self.seqs)

    def __getitem__(self, i):
        return self.seqs[i]

    def add(self, seq: Sequence):
        self.seqs.append(seq)
        self._arrays = None

    def pop(self) -> Sequence:
        if self._arrays is not None:
            self._arrays = {k: v[:-1] for k, v in self._arrays.items()}
        return self.seqs.pop()

    def remove(self, leaving: np.ndarray) -> list[Sequence]:
        """Drops the rows where the bool mask `leaving` is set; returns their sequences."""
        gone = [self.seqs[i] for i in np.flatnonzero(leaving).tolist()]
        self.seqs = [s for s, out in zip(self.seqs, leaving.tolist()) if not out]
        if self._arrays is not None:
            self._arrays = {k: v[~leaving] for k, v in self._arrays.items()}
        return gone

    def array(self, name: str) -> np.ndarray:
        if self._arrays is None:
            n = len(self.seqs)
            a = {key: np.fromiter((getattr(s, attr) for s in self.seqs), dtype=dt, count=n)
                 for key, attr, dt in self._FIELDS}
            a["lens"] = np.fromiter((len(s.tokens) for s in self.seqs), dtype=np.int64, count=n)
            a["last"] = np.fromiter((s.tokens[-1] for s in self.seqs), dtype=np.int32, count=n)
            self._arrays = a
        return self._arrays[name]

    def advance(self, tokens: np.ndarray, logprobs: np.ndarray, start: int = 0):
        """Appends one sampled token (and its log-probability) to each row from `start` on."""
        for s, t, lp in zip(self.seqs[start:], tokens.tolist(), logprobs.tolist()):
            s.tokens.append(t)
            s.logprobs.append(lp)
        if self._arrays is not None:
            self._arrays["lens"][start:] += 1
            self._arrays["last"][start:] = tokens

    def count_in_flight(self):
        """Every row's next token has been launched (its value not known yet): lens += 1."""
        self.array("lens")[:] += 1


class Scheduler:
    def __init__(self, block_manager, max_num_seqs: int, max_num_batched_tokens: int):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.prefilling: list[Sequence] = []
        self.running = Running()
        self.num_preemptions = 0
        self.num_stopped = 0  # times a running sequence stopped running (retired or preempted)
        self.num_cached_tokens = 0  # prompt tokens whose KV came from the prefix cache

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def _seats_taken(self) -> int:
        return len(self.running) + sum(s.fork_into for s in self.prefilling)

    def _admissible(self, seq: Sequence, tokens: np.ndarray | None = None) -> bool:
        if self._seats_taken() + seq.fork_into > self.max_num_seqs:
            return False
        if tokens is None:  # made only past the seats' check: a waiting prompt is asked about at every step
            tokens = np.asarray(seq.tokens, dtype=np.int32)
        # room for the prompt plus one block per sample for the first decoded tokens, unless the
        # engine is idle (then preemption sorts out a group too large to decode at once)
        headroom = seq.fork_into if (self.running or self.prefilling) else 0
        return self.bm.blocks_to_allocate(tokens) + headroom <= self.bm.num_free_blocks

    def _admit(self):
        held = []        # twins of a prompt being prefilled (below)
        prefilling = None
        while self.waiting:
            seq = self.waiting[0]
            tokens = np.asarray(seq.tokens, dtype=np.int32)
            if not self._admissible(seq, tokens):
                break
            self.waiting.popleft()
            # A prompt identical to one whose full blocks are still being computed waits until they are in
            # the prefix cache, then shares them: admitted together, both computed (and held) every block.
            if self.bm.prefix_caching:
                if prefilling is None:
                    prefilling = {tuple(s.tokens) for s in self.prefilling if self._computing_full_blocks(s)}
                if tuple(seq.tokens) in prefilling:
                    held.append(seq)
                    continue
            seq.num_computed = self.bm.allocate(seq.seq_id, tokens)
            self.num_cached_tokens += seq.num_computed
            seq.status = Status.PREFILL
            self.prefilling.append(seq)
            if prefilling is not None and self._computing_full_blocks(seq):
                prefilling.add(tuple(seq.tokens))
        self.waiting.extendleft(reversed(held))

    def _computing_full_blocks(self, seq: Sequence) -> bool:
        """Whether some of the blocks a twin of seq could take from the prefix cache (every full block before
        the one holding its last token) still lack their KV."""
        bs = self.bm.block_size
        return seq.num_computed < (len(seq) - 1) // bs * bs

    def schedule(self) -> PrefillBatch | DecodeBatch:
        self._admit()
        if self.prefilling:
            budget = self.max_num_batched_tokens
            batch = PrefillBatch([], [], [])
            for seq in self.prefilling:
                if budget == 0:
                    break
                n = min(len(seq) - seq.num_computed, budget)
                batch.seqs.append(seq)
                batch.starts.append(seq.num_computed)
                batch.ends.append(seq.num_computed + n)
                budget -= n
            return batch
        if not self.running:
            raise RuntimeError(
                f"the KV pool ({self.bm.num_blocks} blocks of {self.bm.block_size}) cannot hold the next waiting "
                f"sequence ({len(self.waiting[0])} tokens, {self.waiting[0].fork_into} samples)"
            )
        while not self._room_to_append():
            if len(self.running) == 1:
                raise RuntimeError(f"the KV pool ({self.bm.num_blocks} blocks) cannot hold one sequence of "
                                   f"{len(self.running[0])} tokens")
            self.preempt(self.running.pop())
        return self._append()

    def schedule_ahead(self) -> DecodeBatch | None:
        """The next decode step of the running rows, planned while the last step's tokens are still on
        the device; None when planning needs them first: a sequence can be admitted or is prefilling,
        the pool must preempt, or no row is left."""
        if not self.running or self.prefilling:
            return None
        if self.waiting and self._admissible(self.waiting[0]):
            return None
        if not self._room_to_append():
            return None
        return self._append()

    def _room_to_append(self) -> bool:
        """Whether the pool has the blocks that one more token for every running row needs. No row needs
        more than one, so while as many are free the block manager's count is skipped: a pass over the
        rows (~60 us at 256 rows) that append_batch makes again before it appends."""
        free = self.bm.num_free_blocks
        return len(self.running) <= free or self.bm.blocks_to_append(self.running.array("ids")) <= free

    def _append(self) -> DecodeBatch:
        # the tokens are not passed: decoded blocks never enter the prefix cache, and while a step is in
        # flight its tokens are not known yet
        slots, copies = self.bm.append_batch(self.running.array("ids"), None)
        return DecodeBatch(slots, copies)

    def preempt(self, seq: Sequence):
        self.bm.preempt(seq.seq_id)
        self.num_stopped += seq.status is Status.RUNNING
        seq.status = Status.WAITING
        seq.num_computed = 0
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def prefill_done(self, seq: Sequence, children: list[Sequence]):
        """seq's KV is complete: it (and its forks) start decoding."""
        self.prefilling.remove(seq)
        for s in [seq, *children]:
            s.status = Status.RUNNING
            s.fork_into = 1
            self.running.add(s)

    def retire(self, seqs: list[Sequence], stopped: list[bool]):
        """Finishes seqs (reason "stop" where stopped, else "length"): frees their blocks and drops those
        still running. A sequence dropped earlier (it reached its length limit in a step still in flight)
        only needs the first two."""
        for seq, stop in zip(seqs, stopped):
            self.bm.free(seq.seq_id)
            self.num_stopped += seq.status is Status.RUNNING
            seq.status = Status.FINISHED
            seq.finish_reason = "stop" if stop else "length"
        ids = self.running.array("ids")
        leaving = ids_in(ids, np.fromiter((s.seq_id for s in seqs), dtype=np.int64, count=len(seqs)))
        if leaving.any():
            self.running.remove(leaving)
