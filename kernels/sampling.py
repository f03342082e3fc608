"""Triton token sampling: temperature / min-p / greedy draws by inverse CDF, one program per row.

Semantics are those of r1fast.rollout.sampler.sample without top-k/top-p (r1fast.ops.sample_tokens
routes those to torch): the kept tokens are p >= min_p * p_max of softmax(logits / T) (every token
when min_p = 0), the token is the first one in vocabulary order whose running sum of kept
probabilities exceeds u * (kept total), and the log-prob is log_softmax(logits / T) at that token
before filtering (T = 1 for greedy, whose token is the first index of the max, as torch.argmax).

One program walks its row of the vocabulary BLOCK tokens at a time:
- pass 1 (every mode): online max M and sum S of exp((z - M) / T) (so log-prob = (z_tok - M) / T -
  log S), the first index of the max, and, when min_p = 0, each block's sum of exp kept in a
  [NB_PAD] register vector with the running max it was taken at (rescaled to M afterwards);
- pass 1b (min_p > 0 only): each block's sum of the kept exp((z - M) / T) >= min_p (the threshold
  needs the final max first);
- selection: target = u * total in float64 (u is used as the 53-bit float64 uniform it arrives
  as; the fp32 block sums are added and compared with the target in float64); the first block
  whose float64 prefix sum exceeds the target is re-read and scanned with an fp32 tl.cumsum
  against the rest of the target (target - prefix, rounded to fp32); the token is the first kept
  (nonzero) entry whose running sum exceeds it. Rounding can make no entry (or no block) exceed
  it: the token is then the last kept token of that block (of the last block with kept mass),
  never a dropped one. The torch sampler rounds its target to fp32 and scans one fp32 cumsum of
  the whole row, so the two agree up to float rounding at the edges of a token's CDF interval.
So min_p = 0 and greedy read the row once (plus one block), min_p > 0 twice (plus one block).

exp is exp2 with log2(e) / T folded into one scale; every offset from the row index is int64.
Interpreter-safe: fp32/fp64 math only, no libdevice, no inline asm.
"""
import math

import torch
import triton
import triton.language as tl

from r1fast.backends import poisoned

LOG2E = math.log2(math.e)
# GPU: 2048 fp32 per block over 8 warps (8 per thread, 2 x 16-byte loads), 75 blocks at V=151936.
# ptxas (sm_90, `python -m r1fast.kernels.compile_check 90 --resources`): <= 48 registers, no
# spills (Triton 3.6 and 3.9), so 5 programs fit an SM's 64K registers and B = 512 rows run in one
# wave on 132 SMs (4096 per block needs up to 79 registers: 3 per SM, two waves). Not yet tuned
# on a GPU: `r1fast bench sampling --size gpu`.
GPU_CONFIG = dict(BLOCK=2048, num_warps=8, num_stages=2)
# Interpreter: small blocks keep numpy work small and make test shapes cross block edges.
CPU_CONFIG = dict(BLOCK=128, num_warps=1, num_stages=1)
MAX_BLOCKS = 1024  # the per-block sums vector stays small: BLOCK grows with V beyond this


@triton.jit
def _sample_kernel(logits_ptr, u_ptr, tok_ptr, lp_ptr, V, scale, inv_temp, min_p,
                   GREEDY: tl.constexpr, MIN_P: tl.constexpr, BLOCK: tl.constexpr, NB_PAD: tl.constexpr):
    # rows are contiguous (row stride V: the JIT's divisible-by-16 hint on V at V = 151936 gives
    # 16-byte vector loads); int64 before the multiply, B * V passes 2^31
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * V
    offs = tl.arange(0, BLOCK)
    bids = tl.arange(0, NB_PAD)

    # ---- pass 1: online max / sum of exp, argmax; block sums at the running max (min_p = 0)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], dtype=tl.float32)
    arg = tl.zeros([], dtype=tl.int32)
    sums = tl.zeros([NB_PAD], dtype=tl.float32)
    maxs = tl.full([NB_PAD], float("-inf"), tl.float32)
    for v0 in range(0, V, BLOCK):
        b = v0 // BLOCK
        idx = v0 + offs
        z = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        bmax = tl.max(z, axis=0)
        first = tl.min(tl.where(z == bmax, idx, V), axis=0)
        arg = tl.where(bmax > m, first, arg)  # strict: the earliest block holding the max wins
        m_new = tl.maximum(m, bmax)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a leading block of -inf logits
        bsum = tl.sum(tl.exp2((z - m_ref) * scale), axis=0)
        s = s * tl.exp2((m - m_ref) * scale) + bsum
        if not GREEDY:
            if not MIN_P:
                sums = tl.where(bids == b, bsum, sums)
                maxs = tl.where(bids == b, m_ref, maxs)
        m = m_new
    m_ref = tl.where(m == float("-inf"), 0.0, m)

    if GREEDY:
        tok = arg
    else:
        if MIN_P:
            # ---- pass 1b: kept mass per block, p >= min_p * p_max  <=>  exp((z - M) / T) >= min_p
            for v0 in range(0, V, BLOCK):
                b = v0 // BLOCK
                idx = v0 + offs
                z = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
                e = tl.exp2((z - m_ref) * scale)
                e = tl.where(e >= min_p, e, 0.0)
                sums = tl.where(bids == b, tl.sum(e, axis=0), sums)
        else:
            # to the final max (running maxes never exceed it; min() only guards a -inf prefix)
            sums = sums * tl.exp2(tl.minimum((maxs - m_ref) * scale, 0.0))

        # ---- selection: the block whose float64 prefix sum first exceeds u * total
        sums64 = sums.to(tl.float64)
        target = tl.load(u_ptr + row) * tl.sum(sums64, axis=0)
        cum = tl.cumsum(sums64, axis=0)
        cross = tl.min(tl.where(cum > target, bids, NB_PAD), axis=0)
        last = tl.max(tl.where(sums64 > 0, bids, -1), axis=0)
        blk = tl.where(cross < NB_PAD, cross, last)
        blk = tl.minimum(tl.maximum(blk, 0), (V - 1) // BLOCK)
        # the same prefix sums that chose the block (a separate tree sum could round differently and
        # make the rest negative): cum[blk - 1] <= target < cum[blk]
        prefix = tl.sum(tl.where(bids == blk - 1, cum, 0.0), axis=0)
        # ---- that block again: the first kept entry whose running sum exceeds the target
        idx = blk * BLOCK + offs
        z = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        e = tl.exp2((z - m_ref) * scale)
        if MIN_P:
            e = tl.where(e >= min_p, e, 0.0)  # bitwise the values summed in pass 1b
        rest = (target - prefix).to(tl.float32)
        hit = tl.min(tl.where((tl.cumsum(e, axis=0) > rest) & (e > 0), idx, V), axis=0)
        last_kept = tl.max(tl.where(e > 0, idx, -1), axis=0)
        # no hit: rounding ran past the block's last kept token; none kept at all (flush-to-zero
        # differences between the two passes): the argmax, which is always kept
        tok = tl.where(hit < V, hit, tl.where(last_kept >= 0, last_kept, arg))

    z_tok = tl.load(base + tok).to(tl.float32)
    lp = (z_tok - m_ref) * inv_temp - tl.log(s)
    tl.store(tok_ptr + row, tok.to(tl.int64))
    tl.store(lp_ptr + row, lp)


def launch_config(vocab: int, device_type: str, block: int | None = None):
    """(BLOCK, NB_PAD, num_warps, num_stages) for rows of `vocab` logits."""
    cfg = GPU_CONFIG if device_type == "cuda" else CPU_CONFIG
    blk = block or cfg["BLOCK"]
    blk = min(blk, max(16, triton.next_power_of_2(vocab)))
    while triton.cdiv(vocab, blk) > MAX_BLOCKS:
        blk *= 2
    nb_pad = max(16, triton.next_power_of_2(triton.cdiv(vocab, blk)))
    return blk, nb_pad, cfg["num_warps"], cfg["num_stages"]


def sample(logits: torch.Tensor, u: torch.Tensor | None, temperature: float, min_p: float, block: int | None = None):
    """(tokens int64 [B], logprobs fp32 [B]) for contiguous float logits [B, V] and contiguous float64
    uniforms u [B] (None for greedy, temperature 0). Inputs validated by r1fast.ops.sample_tokens."""
    num_rows, vocab = logits.shape
    logits = logits.contiguous()  # the kernel's row stride is V (a no-op for lm_logits' output)
    u = None if u is None else u.contiguous()
    tokens = poisoned(torch.empty(num_rows, dtype=torch.int64, device=logits.device), -1)
    logprobs = poisoned(torch.empty(num_rows, dtype=torch.float32, device=logits.device))
    if num_rows == 0:
        return tokens, logprobs
    greedy = temperature == 0
    t = 1.0 if greedy else float(temperature)
    blk, nb_pad, num_warps, num_stages = launch_config(vocab, logits.device.type, block)
    # greedy reads no uniform: any pointer stands in for u
    _sample_kernel[(num_rows,)](logits, logits if u is None else u, tokens, logprobs, vocab, LOG2E / t, 1.0 / t,
                                float(min_p), GREEDY=greedy, MIN_P=not greedy and min_p > 0, BLOCK=blk,
                                NB_PAD=nb_pad, num_warps=num_warps, num_stages=num_stages)
    return tokens, logprobs
