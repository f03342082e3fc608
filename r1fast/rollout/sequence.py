"""One completion being generated (or, before its prompt is prefilled, a whole group)."""
from __future__ import annotations

import enum

import numpy as np


class Status(enum.Enum):
    WAITING = "waiting"      # not holding KV blocks: new, or preempted (recomputed on readmission)
    PREFILL = "prefill"      # blocks allocated; its tokens' KV is being computed, chunk by chunk
    RUNNING = "running"      # decoding one token per step
    FINISHED = "finished"


class Sequence:
    """tokens = prompt + generated; the KV of tokens[:num_computed] is in the cache (num_computed is
    kept while a sequence is prefilled; a running sequence has the KV of all its tokens but the last).

    A group is admitted as one sequence with `fork_into` = n: its prompt is prefilled once, and
    when the prompt's last logits are ready it is forked into n sequences (sample 0 is itself)
    that share the prompt's KV blocks.
    """

    __slots__ = ("seq_id", "request", "sample", "key", "tokens", "prompt_len", "max_len", "logprobs",
                 "num_computed", "status", "fork_into", "finish_reason")

    def __init__(self, seq_id: int, request: int, sample: int, key: int, prompt: list[int], fork_into: int = 1,
                 max_len: int | None = None):
        self.seq_id = seq_id
        self.request = request          # index of the prompt in the generate() call
        self.sample = sample            # index j of the completion within its group
        self.key = key                  # 32-bit random stream key (see sampler.py)
        self.tokens = list(prompt)
        self.prompt_len = len(prompt)
        self.max_len = max_len          # total length at which it finishes with reason "length"
        self.logprobs: list[float] = []
        self.num_computed = 0
        self.status = Status.WAITING
        self.fork_into = fork_into
        self.finish_reason: str | None = None

    def __len__(self):
        return len(self.tokens)

    def child(self, seq_id: int, sample: int, key: int) -> "Sequence":
        """A fork: same tokens and computed KV, its own sample index and random stream."""
        s = Sequence(seq_id, self.request, sample, key, self.tokens, max_len=self.max_len)
        s.prompt_len = self.prompt_len
        s.num_computed = self.num_computed
        s.status = self.status
        return s


def ids_in(values: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """bool mask: which of the int64 sequence ids `values` are in `pool`. The engine asks this a few times
    per decode step (rows that left, sequences retired) of a few hundred ids: a sort and a binary search
    are five numpy calls, where np.isin cost 4-7x the time (20-60 us a call, at 8 ids or 512)."""
    if len(pool) == 0:
        return np.zeros(len(values), dtype=bool)
    pool = np.sort(pool)
    # clip: a value past the largest id is compared with that id, and differs from it
    return pool.take(np.searchsorted(pool, values), mode="clip") == values
