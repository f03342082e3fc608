"""Continuous batching over the block manager.

Each step is a prefill step or a decode step:
- prefill while any admitted sequence still has prompt KV to compute, or a waiting one can be
  admitted: up to max_num_batched_tokens tokens, taken chunk by chunk from the admitted sequences
  in order (a long prompt spans several steps: chunked prefill);
- otherwise decode every running sequence by one token; when the pool cannot hold the new tokens,
  the most recently admitted sequences are preempted (blocks dropped, requeued at the front,
  recomputed later: the counter-based sampler makes their outputs unchanged).
A group (the n samples of a prompt) is admitted as one sequence whose prompt is prefilled once; it
counts n against max_num_seqs from admission on.
"""
from __future__ import annotations

import collections
import dataclasses

import numpy as np

from r1fast.rollout.sequence import Sequence, Status


@dataclasses.dataclass
class PrefillBatch:
    seqs: list[Sequence]
    starts: list[int]   # first position of each chunk
    ends: list[int]     # one past its last position


@dataclasses.dataclass
class DecodeBatch:
    seqs: list[Sequence]
    slots: np.ndarray        # int64 [B]: cache slot of each sequence's last token
    copies: np.ndarray       # int32 [K, 2]: (src, dst) blocks to copy before the step (copy-on-write)


class Scheduler:
    def __init__(self, block_manager, max_num_seqs: int, max_num_batched_tokens: int):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_cached_tokens = 0  # prompt tokens whose KV came from the prefix cache

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def _seats_taken(self) -> int:
        return len(self.running) + sum(s.fork_into for s in self.prefilling)

    def _admit(self):
        while self.waiting:
            seq = self.waiting[0]
            if self._seats_taken() + seq.fork_into > self.max_num_seqs:
                return
            tokens = np.asarray(seq.tokens, dtype=np.int32)
            # room for the prompt plus one block per sample for the first decoded tokens, unless the
            # engine is idle (then preemption sorts out a group too large to decode at once)
            headroom = seq.fork_into if (self.running or self.prefilling) else 0
            if self.bm.blocks_to_allocate(tokens) + headroom > self.bm.num_free_blocks:
                return
            self.waiting.popleft()
            seq.num_computed = self.bm.allocate(seq.seq_id, tokens)
            self.num_cached_tokens += seq.num_computed
            seq.status = Status.PREFILL
            self.prefilling.append(seq)

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
        ids = np.fromiter((s.seq_id for s in self.running), dtype=np.int64, count=len(self.running))
        while self.bm.blocks_to_append(ids) > self.bm.num_free_blocks:
            if len(self.running) == 1:
                raise RuntimeError(f"the KV pool ({self.bm.num_blocks} blocks) cannot hold one sequence of "
                                   f"{len(self.running[0])} tokens")
            self.preempt(self.running.pop())
            ids = ids[:-1]
        last = np.fromiter((s.tokens[-1] for s in self.running), dtype=np.int32, count=len(self.running))
        slots, copies = self.bm.append_batch(ids, last)
        return DecodeBatch(list(self.running), slots, copies)

    def preempt(self, seq: Sequence):
        self.bm.preempt(seq.seq_id)
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
            self.running.append(s)

    def finish(self, seq: Sequence, reason: str):
        self.bm.free(seq.seq_id)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.running.remove(seq)
