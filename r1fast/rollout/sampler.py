"""Token sampling on device, without host synchronisation.

Randomness is counter-based: each completion has a 32-bit stream key (from the call's seed, its
prompt and its sample index j, see Engine) and the uniform for the token at position p is a hash of
(key, p). A sample therefore never depends on which other requests share its batch, on the batch
order, or on preemption (a recomputed sequence draws the same numbers at the same positions).

A token is drawn by inverse CDF: one uniform per row against the cumulative sum of the filtered
probabilities in vocabulary order (top-k/top-p rank the tokens only to choose which stay).

Log-probability of a sampled token (what `Completion.logprobs` holds): log_softmax(logits / T) at
that token, with T the temperature (T = 1 for greedy), before top-k/top-p/min-p filtering. This is
exactly ops.grouped_logprob(hidden, lm_head, targets, temperature=T).
"""
from __future__ import annotations

import numpy as np
import torch

from r1fast.rollout.params import SamplingParams

_MASK32 = 0xFFFFFFFF


def fmix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def fmix32_int(x: int) -> int:
    """The same finaliser on a Python int (host-side key derivation)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _MASK32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


_KEY_START = 0x9E3779B9


def stream_key(*parts: int, state: int = _KEY_START) -> int:
    """A 32-bit key from integers of any size (seed, prompt hash, occurrence, sample index).

    The parts are folded in one by one, so a key of shared leading parts is the state to go on from:
    stream_key(a, b, c) == stream_key(c, state=stream_key(a, b)) (a group's samples fold their prompt's
    parts once, not once per sample)."""
    h = state
    for p in parts:
        p = int(p)
        for _ in range(3):  # fold 96 bits of each part, enough for a 64-bit seed and a sign
            h = fmix32_int(h ^ fmix32_int((p & _MASK32) + 0x632BE5AB))
            p >>= 32
    return h


def uniforms(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """float64 uniforms in [0, 1), 53 bits, one per (key, position) row; keys/positions int64."""
    twice = positions.long() * 2
    base = fmix32(twice & _MASK32)
    h1 = fmix32(keys ^ base)
    h2 = fmix32(h1 ^ fmix32((twice + 1) & _MASK32))
    return ((h1 << 21) + (h2 >> 11)).double() * (2.0 ** -53)


# numpy scalars made once, and the ops in place: a new scalar and a new array per op were half of HostUniforms'
# time per decode step
_U64 = {v: np.uint64(v) for v in (1, 11, 13, 16, 21, 0x85EBCA6B, 0xC2B2AE35, _MASK32)}


def _fmix32_np(x: np.ndarray) -> np.ndarray:
    """fmix32 on uint64 arrays holding values in [0, 2^32): the same low 32 bits as the torch version.
    Works in place on x (the callers' fresh temporaries) and returns it."""
    x ^= x >> _U64[16]
    x *= _U64[0x85EBCA6B]
    x &= _U64[_MASK32]
    x ^= x >> _U64[13]
    x *= _U64[0xC2B2AE35]
    x &= _U64[_MASK32]
    x ^= x >> _U64[16]
    return x


class HostUniforms:
    """uniforms(keys, positions) computed on the host with numpy, bit for bit: a decode step's keys
    and positions live on the host anyway, and ~30 one-element-per-row integer ops cost far less in
    numpy than as device launches. The position halves of the hash are tabulated once."""

    def __init__(self, max_positions: int):
        twice = np.arange(max(int(max_positions), 1), dtype=np.uint64) * np.uint64(2)
        self._even = _fmix32_np(twice & _U64[_MASK32])
        self._odd = _fmix32_np((twice + _U64[1]) & _U64[_MASK32])

    def __call__(self, keys, positions) -> np.ndarray:
        """float64 [B] uniforms for int sequences keys (in [0, 2^32)) and positions (>= 0)."""
        k = np.asarray(keys, dtype=np.uint64)
        p = np.asarray(positions, dtype=np.int64)
        if p.size and (int(p.max()) >= self._even.size or int(p.min()) < 0):  # outside the table
            return uniforms(torch.from_numpy(k.astype(np.int64)), torch.from_numpy(p)).numpy()
        h1 = _fmix32_np(k ^ self._even[p])
        h2 = _fmix32_np(h1 ^ self._odd[p])
        h1 <<= _U64[21]
        h1 += h2 >> _U64[11]
        return h1.astype(np.float64) * (2.0 ** -53)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 logits / T; x / 1.0 == x exactly, so T = 1 skips the [B, V] pass."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    t = temperature if temperature > 0 else 1.0
    return torch.log_softmax(_scaled(logits, t), dim=-1).gather(1, tokens[:, None]).squeeze(1)


def _kept_by_rank(logits: torch.Tensor, top_k: int, params: SamplingParams) -> torch.Tensor:
    """bool [B, V]: the tokens top-k (top_k > 0) then top-p keep, ranked by the logits as given with equal
    logits by token id (exactly k tokens stay).

    Ranked by the logits, not the fp32 probabilities: those tied distinct logits whose exp() rounds alike
    (0.3 and the next float up), so top_k=1 was not greedy's token. The draw walks vocabulary order, so
    only the ranked values are needed: top-k takes torch.topk's k values (no O(V log V) sort of the
    vocabulary), and the kept set is every logit above the last kept value plus, of those equal to it,
    the lowest ids that fill the count."""
    if top_k:
        values = logits.topk(top_k, dim=-1).values  # descending
    else:
        values = logits.sort(dim=-1, descending=True).values
    count = torch.full((logits.shape[0], 1), values.shape[-1], device=logits.device)
    if params.top_p < 1:
        # keep the smallest prefix whose mass reaches top_p (the first token always stays);
        # the mass is measured after top-k, as in vLLM and transformers
        ranked = torch.softmax(_scaled(values, params.temperature), dim=-1)
        total = ranked.sum(dim=-1, keepdim=True)
        drop = (ranked.cumsum(dim=-1) / total - ranked / total) >= params.top_p
        count = (~drop).long().cumprod(dim=-1).sum(dim=-1, keepdim=True).clamp_min(1)
    last = values.gather(1, count - 1)
    above = logits > last
    tied = logits == last
    return above | (tied & (tied.long().cumsum(dim=-1) <= count - above.sum(dim=-1, keepdim=True)))


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """probs [B, V], in vocabulary order: the renormalisable sampling distribution after filtering.

    Top-k/top-p rank the tokens, but the kept ones go back to vocabulary order for the draw. Drawn in
    rank order, two tokens whose logits lie within rounding of each other (the batch's shape, a prefill
    chunk or a cached prefix changes it) could swap places, and a uniform anywhere in their two
    intervals drew the other token: the same seed gave another completion in a batch than alone. In
    vocabulary order rounding moves only interval edges by a rounding step, and a token across the cut.
    """
    vocab = logits.shape[-1]
    top_k = params.top_k if 0 < params.top_k < vocab else 0
    probs = torch.softmax(_scaled(logits, params.temperature), dim=-1)
    if top_k or params.top_p < 1:
        probs = probs.masked_fill(~_kept_by_rank(logits, top_k, params), 0.0)
    if params.min_p > 0:
        peak = probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < params.min_p * peak, 0.0)
    return probs


CDF_BLOCK = 1024


def _draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index [B, 1] of the first entry of each row whose running sum exceeds u * the row's total.

    Two levels, as the Triton kernel: the prefix sums of CDF_BLOCK-entry block masses in float64 pick
    the block, an fp32 cumsum within it the entry. One fp32 cumsum over a 150k-entry row stops growing
    near 1, where an entry below half an ulp (~3e-8) adds nothing: the tail's thousands of tokens (a few
    1e-4 of the mass) could never be drawn."""
    b, v = probs.shape
    blk = min(CDF_BLOCK, v)
    full = v - v % blk
    sums = probs[:, :full].unflatten(1, (full // blk, blk)).sum(-1, dtype=torch.float64)
    if full < v:
        sums = torch.cat([sums, probs[:, full:].sum(-1, keepdim=True, dtype=torch.float64)], dim=1)
    block_cdf = sums.cumsum(dim=-1)
    target = (u.double() * block_cdf[:, -1])[:, None]
    block = torch.searchsorted(block_cdf, target, right=True).clamp_max(block_cdf.shape[1] - 1)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp_min(0)), 0.0)
    cols = block * blk + torch.arange(blk, device=probs.device)
    entries = probs.gather(1, cols.clamp_max(v - 1)).masked_fill(cols >= v, 0.0)
    inner = entries.cumsum(dim=-1)
    within = torch.searchsorted(inner, (target - before).to(inner.dtype), right=True)
    # A target at or past the block's fp32 running total (float64 block sums round otherwise) found no
    # entry: it is the block's last kept one, not the zero entries after it (the fix-up in sample() would
    # move it to the row's last kept token, anywhere in the vocabulary)
    block_last = torch.where(entries > 0, torch.arange(blk, device=probs.device), 0).amax(dim=-1, keepdim=True)
    within = torch.where(within >= blk, block_last, within).clamp_max(blk - 1)
    return (block * blk + within).clamp_max(v - 1)


def sample(logits: torch.Tensor, params: SamplingParams, keys: torch.Tensor | None, positions: torch.Tensor | None,
           u: torch.Tensor | None = None):
    """(tokens int64 [B], logprobs float32 [B]) for fp32 logits [B, V], stream keys and positions [B].

    `u` (float64 [B], optional) holds uniforms(keys, positions) already computed (HostUniforms).
    """
    if params.greedy:
        tokens = logits.argmax(dim=-1)
        return tokens, token_logprobs(logits, tokens, 0.0)
    probs = filtered_probs(logits, params)
    u = uniforms(keys, positions) if u is None else u
    idx = _draw(probs, u)
    # a rounding step past the last kept token lands on a zero-probability entry: step back to a kept one
    kept = probs.gather(1, idx) > 0
    # on the CPU, reading `kept` costs nothing and the fix-up ([B, V] passes) is almost never needed
    if probs.device.type != "cpu" or not bool(kept.all()):
        last_kept = (probs > 0).long().cumsum(dim=-1).argmax(dim=-1, keepdim=True)
        idx = torch.where(kept, idx, last_kept)
    tokens = idx.squeeze(1)
    return tokens, token_logprobs(logits, tokens, params.temperature)
