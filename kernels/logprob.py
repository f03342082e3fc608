"""Triton grouped log-prob: token tiles x vocabulary tiles, fp32-accumulated tl.dot, online logsumexp.

No [N, V] tensor ever; at most one [chunk, V] tile:
- `_logprob_fwd_kernel` (grid: token tiles x vocabulary slices) walks its slice of the vocabulary
  for its tokens and keeps a running max / sum-of-exp (and Σ p·(z - max) for the entropy; with WITH_ARGMAX
  the lowest id reaching the max), so it writes only those partials per slice (merged in torch into
  lse, target logit, entropy, target-is-argmax): O(N) memory.
- `_dlogits_kernel` (grid: token tiles x vocab tiles, over one chunk of tokens) recomputes a logits
  tile from hidden and weight, turns it into d loss / d logits with the saved lse/entropy, and
  writes that [chunk, V] tile; the caller (r1fast.ops.logprob) multiplies it into grad_hidden and
  grad_weight with two matmuls per chunk, so the backward is deterministic (no atomics) and the
  extra memory is chunk x V.
- `_logits_kernel` writes one chunk's fp32 logits for the single-pass fused loss
  (r1fast.ops.fused_loss); the two kernels above then read that tile (LOAD_Z) instead of
  recomputing it, so the fused loss costs 6·N·H·V FLOPs rather than 8.
"""

import math

import torch
import triton
import triton.language as tl

from r1fast.backends import on_device, poisoned

# Tile shapes. GPU: sized for H100/H200 (128x128 output tile, 64-wide K steps: wgmma on sm_90, 3
# cp.async stages, 96 KB of shared memory). Interpreter: tiny tiles keep numpy work small and make
# test shapes cross tile edges. tl.dot needs every dim >= 16. The kernels that read stored logits
# (LOAD_Z, memory-bound, no tl.dot) get their own tile: at 128x128 the forward one spills ~6 KB per
# thread (ptxas -v: `python -m r1fast.kernels.compile_check 90 --resources`), at 16x256 none.
# fp32 inputs take the exact (ieee, FMA) tl.dot, whose 128x128x64 tile spills ~11 KB per thread
# in the forward kernel; 64x128x32 spills nothing.
GPU_CONFIG = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3)
GPU_FP32_CONFIG = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32, num_warps=8, num_stages=3)
GPU_LOAD_Z_CONFIG = dict(BLOCK_N=16, BLOCK_V=256, BLOCK_H=16, num_warps=4, num_stages=1)
CPU_CONFIG = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16, num_warps=1, num_stages=1)


def gpu_config(dtype, load_z=False):
    """Tile config of the kernels that form logits with tl.dot from `dtype` inputs, or (load_z) read them."""
    if load_z:
        return GPU_LOAD_Z_CONFIG
    return GPU_FP32_CONFIG if dtype == torch.float32 else GPU_CONFIG


def _config(hidden, load_z=False):
    return gpu_config(hidden.dtype, load_z) if hidden.device.type == "cuda" else CPU_CONFIG


def dlogits_config(cfg: dict, dtype, load_z: bool, inv_temp: float) -> dict:
    """_dlogits_kernel's launch config: `cfg`, with FP fusion off where it recomputes 16-bit logits at a temperature
    other than 1. There _logits_tile returns z * (1/T), and LLVM/ptxas contract that product into the next `z - lse`
    as one FMA: the backward's log p saw the unrounded product while the forward's lse (whose kernel selects between
    the product and the sum, which no FMA spans) came from rounded logits, half an ulp of z apart, as large as the
    whole of 1 - p at a peaked row's max. Elsewhere the product is exact (T = 1), rounded by a division (fp32) or
    stored (LOAD_Z), and the kernel keeps its FMAs."""
    if load_z or dtype == torch.float32 or inv_temp == 1.0:
        return cfg
    return dict(cfg, enable_fp_fusion=False)


def _temperature(inv_temp: float) -> float:
    """T back from the callers' 1/T (in float64: within an ulp of T there, the same float32 but for
    ~1 in 2^29 values): the fp32 kernels divide by it."""
    return 1.0 / inv_temp


def _precision(dtype):
    # fp32 inputs must not silently drop to tf32 on the GPU (1e-3 error in the logits).
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _logits_tile(h_ptr, w_ptr, rn, rv, n_ok, v_ok, H, stride_h, stride_w, inv_temp, temperature,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 PRECISION: tl.constexpr):
    z = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        rh = h0 + tl.arange(0, BLOCK_H)
        h_ok = rh < H
        a = tl.load(h_ptr + rn[:, None].to(tl.int64) * stride_h + rh[None, :],
                    mask=n_ok[:, None] & h_ok[None, :], other=0.0)
        b = tl.load(w_ptr + rv[:, None].to(tl.int64) * stride_w + rh[None, :],
                    mask=v_ok[:, None] & h_ok[None, :], other=0.0)
        z = tl.dot(a, tl.trans(b), z, input_precision=PRECISION)
    if PRECISION == "ieee":
        # fp32 inputs: z / T rounded once (the reference's division), and a division is never contracted.
        # With z * inv_temp, LLVM/ptxas fuse the product into each later `z - lse`, `z - Σpz` as an FMA,
        # so on CUDA the backward's p and entropy term saw the unrounded product while lse and the
        # entropy came from rounded logits: grad_hidden 2.1x the fp32 reference's error at logits ~100,
        # T=1.3 (H200). The interpreter rounds every product, so only the GPU showed it.
        return tl.math.div_rn(z, temperature)
    else:
        # 16-bit inputs: that ulp of fp32 sits far below the inputs' own rounding; the multiply is cheaper
        return z * inv_temp


@triton.jit
def _load_or_compute_logits(z_ptr, h_ptr, w_ptr, rn, rv, n_ok, v_ok, H, stride_h, stride_w, inv_temp, temperature,
                            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                            PRECISION: tl.constexpr, LOAD_Z: tl.constexpr, V):
    if LOAD_Z:  # fp32 logits (already / temperature) written by _logits_kernel, row stride V
        z = tl.load(z_ptr + rn[:, None].to(tl.int64) * V + rv[None, :], mask=n_ok[:, None] & v_ok[None, :],
                    other=0.0)
    else:
        z = _logits_tile(h_ptr, w_ptr, rn, rv, n_ok, v_ok, H, stride_h, stride_w, inv_temp, temperature,
                         BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)
    return z


@triton.jit
def _logits_kernel(h_ptr, w_ptr, z_ptr, N, V, H, stride_h, stride_w, inv_temp, temperature,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 logits tile of one chunk of tokens, for the single-pass fused loss (kept, not recomputed)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rv = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    n_ok = rn < N
    v_ok = rv < V
    z = _logits_tile(h_ptr, w_ptr, rn, rv, n_ok, v_ok, H, stride_h, stride_w, inv_temp, temperature,
                     BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)
    tl.store(z_ptr + rn[:, None].to(tl.int64) * V + rv[None, :], z, mask=n_ok[:, None] & v_ok[None, :])


@triton.jit
def _finite_or_zero(m):
    # the shift the forward kernel's sums are taken about (r1fast.ops.logprob.sum_shift: the same in torch)
    return tl.where(tl.abs(m) == float("inf"), 0.0, m)


@triton.jit
def _logprob_fwd_kernel(h_ptr, w_ptr, z_ptr, t_ptr, part_ptr, arg_ptr,
                        N, V, H, stride_h, stride_w, inv_temp, temperature, v_per_split,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                        WITH_ENTROPY: tl.constexpr, PRECISION: tl.constexpr, LOAD_Z: tl.constexpr,
                        WITH_ARGMAX: tl.constexpr = False):
    # grid: (token tiles, vocabulary splits). Each program reduces its slice of the vocabulary and
    # writes partial (max m, Σexp(z - m), Σexp(z - m)·(z - m), target logit) rows of part [4, splits, N]
    # (m read as 0 in the sums where it is ±inf); splitting V keeps
    # the GPU full when there are few token tiles. logprob_forward merges the splits.
    # WITH_ARGMAX also writes arg [splits, N] (int32): the lowest vocabulary id in the slice whose
    # logit is the slice's max, as torch.argmax breaks ties; the running max is already at hand.
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    n_ok = rn < N
    tgt = tl.load(t_ptr + rn, mask=n_ok, other=0)
    run_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    run_shift = tl.zeros([BLOCK_N], dtype=tl.float32)  # _finite_or_zero(run_max): what run_sum, run_t are about
    run_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    run_t = tl.zeros([BLOCK_N], dtype=tl.float32)
    z_tgt = tl.zeros([BLOCK_N], dtype=tl.float32)
    v_lo = split * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    # starts at the slice's first id: a row whose logits are all -inf then argmaxes to it, as torch's does
    run_arg = tl.zeros([BLOCK_N], dtype=tl.int32) + v_lo
    for v0 in range(v_lo, v_hi, BLOCK_V):
        rv = v0 + tl.arange(0, BLOCK_V)
        v_ok = rv < v_hi
        z = _load_or_compute_logits(z_ptr, h_ptr, w_ptr, rn, rv, n_ok, v_ok, H, stride_h, stride_w, inv_temp,
                                    temperature, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION, LOAD_Z, V)
        z_tgt += tl.sum(tl.where((rv[None, :] == tgt[:, None]) & v_ok[None, :], z, 0.0), 1)
        z = tl.where(v_ok[None, :], z, float("-inf"))
        tile_max = tl.max(z, 1)
        if WITH_ARGMAX:
            # tiles run in id order, so only a strictly larger max moves the argmax: ties keep the lower id
            tile_arg = tl.min(tl.where(z == tile_max[:, None], rv[None, :], V), 1)
            run_arg = tl.where(tile_max > run_max, tile_arg, run_arg)
        new_max = tl.maximum(run_max, tile_max)
        # the sums are taken about `shift`: the max, or 0 where the max is ±inf (torch.logsumexp's rule), so a
        # +inf logit gives Σexp = inf (lse +inf, finite targets' log p -inf) rather than exp(inf - inf) = NaN,
        # and a tile of -inf logits adds 0. Per row only: the finite case is the plain running max.
        shift = _finite_or_zero(new_max)
        alpha = tl.where(run_max == float("-inf"), 0.0, tl.exp(run_shift - shift))
        d = z - shift[:, None]
        p = tl.exp(d)
        if WITH_ENTROPY:
            # Σ p·(z - m), taken about the running max m (moved to the new one: + (m_old - m_new)·Σp_old), never
            # Σ p·z: that one is ~lse for a peaked row, and lse - Σ p·z kept no digit of a small entropy at |z| ~ 1e3.
            # A slice that has seen nothing yet (sum 0, max -inf) adds nothing rather than 0·inf.
            moved = tl.where(run_sum > 0.0, (run_shift - shift) * run_sum, 0.0)
            run_t = (run_t + moved) * alpha + tl.sum(p * tl.where(v_ok[None, :], d, 0.0), 1)
        run_sum = run_sum * alpha + tl.sum(p, 1)
        run_max = new_max
        run_shift = shift
    plane = n_splits.to(tl.int64) * N
    row = part_ptr + split.to(tl.int64) * N + rn
    tl.store(row, run_max, mask=n_ok)
    tl.store(row + plane, run_sum, mask=n_ok)
    tl.store(row + 2 * plane, run_t, mask=n_ok)
    tl.store(row + 3 * plane, z_tgt, mask=n_ok)
    if WITH_ARGMAX:
        tl.store(arg_ptr + split.to(tl.int64) * N + rn, run_arg, mask=n_ok)


@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, z_ptr, t_ptr, lse_ptr, lse_lo_ptr, ent_ptr, g_logp_ptr, g_ent_ptr, dl_ptr,
                    N, V, H, stride_h, stride_w, stride_dl, inv_temp, temperature,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    WITH_ENTROPY: tl.constexpr, PRECISION: tl.constexpr, LOAD_Z: tl.constexpr,
                    Z_PARTS: tl.constexpr = 2):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    if LOAD_Z:
        # the stored logits tile is read and written in Z_PARTS column parts, each stored before the next is read.
        # Whole, every thread kept its 32 results until its last load (no store may move above a load it may
        # alias), and ptxas staggered the loads to fit: 114 registers bf16 / 126 fp32 (ptxas -v sm_90a, Triton
        # 3.6); in 2 parts 56 / 72. The same expression per logit, so the same numbers.
        tgt, lse, lse_lo, g, ent, ge = _dlogits_rows(t_ptr, lse_ptr, lse_lo_ptr, g_logp_ptr, ent_ptr, g_ent_ptr, rn,
                                                     n_ok, WITH_ENTROPY)
        for part in tl.static_range(Z_PARTS):
            rv = tl.program_id(1) * BLOCK_V + part * (BLOCK_V // Z_PARTS) + tl.arange(0, BLOCK_V // Z_PARTS)
            v_ok = rv < V
            z = tl.load(z_ptr + rn[:, None].to(tl.int64) * V + rv[None, :], mask=n_ok[:, None] & v_ok[None, :],
                        other=0.0)
            _dlogits_store(z, rn, rv, n_ok, v_ok, tgt, lse, lse_lo, g, ent, ge, dl_ptr, stride_dl, inv_temp,
                           WITH_ENTROPY)
    else:
        rv = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        v_ok = rv < V
        z = _logits_tile(h_ptr, w_ptr, rn, rv, n_ok, v_ok, H, stride_h, stride_w, inv_temp, temperature,
                         BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)
        tgt, lse, lse_lo, g, ent, ge = _dlogits_rows(t_ptr, lse_ptr, lse_lo_ptr, g_logp_ptr, ent_ptr, g_ent_ptr, rn,
                                                     n_ok, WITH_ENTROPY)
        _dlogits_store(z, rn, rv, n_ok, v_ok, tgt, lse, lse_lo, g, ent, ge, dl_ptr, stride_dl, inv_temp,
                       WITH_ENTROPY)


@triton.jit
def _dlogits_rows(t_ptr, lse_ptr, lse_lo_ptr, g_logp_ptr, ent_ptr, g_ent_ptr, rn, n_ok, WITH_ENTROPY: tl.constexpr):
    tgt = tl.load(t_ptr + rn, mask=n_ok, other=0)
    lse = tl.load(lse_ptr + rn, mask=n_ok, other=0.0)
    lse_lo = tl.load(lse_lo_ptr + rn, mask=n_ok, other=0.0)
    g = tl.load(g_logp_ptr + rn, mask=n_ok, other=0.0)
    if WITH_ENTROPY:
        ent = tl.load(ent_ptr + rn, mask=n_ok, other=0.0)
        ge = tl.load(g_ent_ptr + rn, mask=n_ok, other=0.0)
    else:  # not read
        ent = lse
        ge = g
    return tgt, lse, lse_lo, g, ent, ge


@triton.jit
def _dlogits_store(z, rn, rv, n_ok, v_ok, tgt, lse, lse_lo, g, ent, ge, dl_ptr, stride_dl, inv_temp,
                   WITH_ENTROPY: tl.constexpr):
    # what rounding lse to fp32 dropped, taken off after z - lse (exact near the max): lse alone is up to half
    # |z|'s ulp off, all of log p at a peaked row's max (r1fast.ops.logprob.lse_parts)
    log_p = (z - lse[:, None]) - lse_lo[:, None]
    p = tl.exp(log_p)
    # d logp / d z_j = [j == target] - p_j
    dz = g[:, None] * (tl.where(rv[None, :] == tgt[:, None], 1.0, 0.0) - p)
    if WITH_ENTROPY:
        # d entropy / d z_j = -p_j (z_j - Σ_v p_v z_v) = -p_j (log p_j + entropy): z - (lse - entropy) rounded
        # lse - entropy to |z|'s ulp first, which was all of z_j - Σ p z at a peaked row's max
        dz += ge[:, None] * (-p * (log_p + ent[:, None]))
    dz = dz * inv_temp
    tl.store(dl_ptr + rn[:, None].to(tl.int64) * stride_dl + rv[None, :], dz.to(dl_ptr.dtype.element_ty),
             mask=n_ok[:, None] & v_ok[None, :])


def logits(hidden, weight, inv_temp: float):
    """fp32 [N, V] logits / temperature of one chunk of tokens (fp32 accumulation whatever the input dtype)."""
    n, h = hidden.shape
    v = weight.shape[0]
    cfg = _config(hidden)
    z = poisoned(torch.empty(n, v, dtype=torch.float32, device=hidden.device))
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(v, cfg["BLOCK_V"]))
    with on_device(hidden.device):  # Triton launches on the current device: make it hidden's
        _logits_kernel[grid](hidden, weight, z, n, v, h, hidden.stride(0), weight.stride(0), inv_temp,
                             _temperature(inv_temp),
                             PRECISION=_precision(hidden.dtype), **cfg)
    return z


def logprob_forward(hidden, weight, targets, inv_temp: float, with_entropy: bool, z=None, with_hit: bool = False):
    """(lse, target_logit, entropy-or-None, hit-or-None, lse residual): fp32 [N] each, and with `with_hit` a
    bool [N] saying whether each target is its row's argmax (lowest id on ties, as torch.argmax), found from
    the running max the logsumexp keeps anyway. The residual is what rounding lse to fp32 dropped
    (r1fast.ops.logprob.lse_parts), for dlogits. hidden [N, H] and weight [V, H] row-contiguous.

    With `z` (fp32 [N, V] from `logits`), reads the logits instead of recomputing them.
    """
    n, h = hidden.shape
    v = weight.shape[0]
    cfg = _config(hidden, load_z=z is not None)
    n_tiles = triton.cdiv(n, cfg["BLOCK_N"])
    splits = vocab_splits(n_tiles, v, cfg["BLOCK_V"], hidden.device)
    v_per_split = triton.cdiv(triton.cdiv(v, splits), cfg["BLOCK_V"]) * cfg["BLOCK_V"]
    splits = triton.cdiv(v, v_per_split)
    part = poisoned(torch.empty(4, splits, n, dtype=torch.float32, device=hidden.device))
    arg = poisoned(torch.empty(splits, n, dtype=torch.int32, device=hidden.device), -1) if with_hit else part
    with on_device(hidden.device):
        _logprob_fwd_kernel[(n_tiles, splits)](hidden, weight, part if z is None else z, targets, part, arg, n, v, h,
                                               hidden.stride(0), weight.stride(0), inv_temp,
                                               _temperature(inv_temp), v_per_split,
                                               WITH_ENTROPY=with_entropy, PRECISION=_precision(hidden.dtype),
                                               LOAD_Z=z is not None, WITH_ARGMAX=with_hit, **cfg)
    run_max, run_sum, run_t, z_tgt = part.unbind(0)
    top = run_max.max(0).values
    # splits merge like online-softmax steps, about the shifts the kernel took (0 for an infinite max); a split
    # of -inf logits (sum 0) weighs 0, not 0·exp(0 - top), which overflows for top < -88
    from r1fast.ops.logprob import lse_parts, sum_shift

    shift, top_shift = sum_shift(run_max), sum_shift(top)
    scale = torch.where(run_max == -math.inf, 0.0, torch.exp(shift - top_shift))
    total = (run_sum * scale).sum(0)
    lse, lse_lo = lse_parts(top_shift, torch.log(total))
    ent = _merged_entropy(shift, run_sum, run_t, top_shift, scale, total) if with_entropy else None
    hit = _merge_argmax(run_max, top, arg, v) == targets if with_hit else None
    return lse, z_tgt.sum(0), ent, hit, lse_lo


def _merged_entropy(shift, run_sum, run_t, top_shift, scale, total):
    """Entropy [N] = log s - t/s from the splits' partials, s = Σ exp(z - top) and t = Σ exp(z - top)·(z - top),
    each split's t moved from its own max to the row's. No lse - Σ p·z: both are ~top on a peaked row."""
    # a split of -inf logits (sum 0) keeps its t as it is, not + 0·inf: NaN (the reference's 0·-inf in Σ p·z)
    moved = torch.where(run_sum > 0, run_t + (shift - top_shift) * run_sum, run_t)
    return torch.log(total) - (moved * scale).sum(0) / total


def _merge_argmax(run_max, top, arg, v: int):
    """The row argmax [N] from the splits' (max, argmax) partials: the lowest id among the splits that
    reach the row's max (the slices are in id order, so that is the first such split's argmax)."""
    return torch.where(run_max == top, arg, v).min(0).values


# Aim for about this many programs in flight on a GPU (2 waves of 132 SMs) before splitting V.
_TARGET_PROGRAMS = 264
# Tests set this to force vocabulary splits under the interpreter.
FORCE_SPLITS = None


def vocab_splits(n_tiles: int, v: int, block_v: int, device) -> int:
    """How many vocabulary slices the forward kernel's grid gets for `n_tiles` token tiles."""
    if FORCE_SPLITS is not None:
        return max(1, min(FORCE_SPLITS, triton.cdiv(v, block_v)))
    if device.type != "cuda":
        return 1
    # each slice keeps at least 8 vocabulary tiles so the partial rows stay small next to the work
    return max(1, min(triton.cdiv(_TARGET_PROGRAMS, n_tiles), triton.cdiv(v, 8 * block_v)))


def dlogits(hidden, weight, targets, lse, entropy, g_logp, g_ent, inv_temp: float, out_dtype, z=None, lse_lo=None):
    """d loss / d raw logits [N, V] (temperature folded in) for one chunk of tokens, in out_dtype.

    With `z` (fp32 [N, V] from `logits`), reads the logits instead of recomputing them. `lse_lo`: the residual
    logprob_forward returned beside lse (None: 0).
    """
    n, h = hidden.shape
    v = weight.shape[0]
    cfg = dlogits_config(_config(hidden, load_z=z is not None), hidden.dtype, z is not None, inv_temp)
    out = poisoned(torch.empty(n, v, dtype=out_dtype, device=hidden.device))
    with_entropy = g_ent is not None
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(v, cfg["BLOCK_V"]))
    with on_device(hidden.device):
        _dlogits_kernel[grid](hidden, weight, lse if z is None else z, targets, lse,
                              torch.zeros_like(lse) if lse_lo is None else lse_lo,
                              entropy if with_entropy else lse, g_logp, g_ent if with_entropy else g_logp, out, n, v, h,
                              hidden.stride(0), weight.stride(0), out.stride(0), inv_temp, _temperature(inv_temp),
                              WITH_ENTROPY=with_entropy,
                              PRECISION=_precision(hidden.dtype), LOAD_Z=z is not None, **cfg)
    return out
