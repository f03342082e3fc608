"""Triton grouped log-prob: token tiles x vocabulary tiles, fp32-accumulated tl.dot, online logsumexp.

Two kernels, no [N, V] tensor ever:
- `_logprob_fwd_kernel` (grid: token tiles) walks the whole vocabulary for its tokens and keeps a
  running max / sum-of-exp (and Σ p·z for the entropy), so it writes only lse, the target logit and
  the entropy: O(N) memory.
- `_dlogits_kernel` (grid: token tiles x vocab tiles, over one chunk of tokens) recomputes a logits
  tile from hidden and weight, turns it into d loss / d logits with the saved lse/entropy, and
  writes that [chunk, V] tile; the caller (r1fast.ops.logprob) multiplies it into grad_hidden and
  grad_weight with two matmuls per chunk, so the backward is deterministic (no atomics) and the
  extra memory is chunk x V.
"""
import torch
import triton
import triton.language as tl

# Tile shapes. GPU: sized for H100/H200 (128x128 output tile, 64-wide K steps). Interpreter: tiny
# tiles keep numpy work small and make test shapes cross tile edges. tl.dot needs every dim >= 16.
GPU_CONFIG = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3)
CPU_CONFIG = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16, num_warps=1, num_stages=1)


def _config(device):
    return GPU_CONFIG if device.type == "cuda" else CPU_CONFIG


def _precision(dtype):
    # fp32 inputs must not silently drop to tf32 on the GPU (1e-3 error in the logits).
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _logits_tile(h_ptr, w_ptr, rn, rv, n_ok, v_ok, H, stride_h, stride_w, inv_temp,
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
    return z * inv_temp


@triton.jit
def _logprob_fwd_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, zt_ptr, ent_ptr,
                        N, V, H, stride_h, stride_w, inv_temp,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                        WITH_ENTROPY: tl.constexpr, PRECISION: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    tgt = tl.load(t_ptr + rn, mask=n_ok, other=0)
    run_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    run_pz = tl.zeros([BLOCK_N], dtype=tl.float32)
    z_tgt = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        rv = v0 + tl.arange(0, BLOCK_V)
        v_ok = rv < V
        z = _logits_tile(h_ptr, w_ptr, rn, rv, n_ok, v_ok, H, stride_h, stride_w, inv_temp,
                         BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)
        z_tgt += tl.sum(tl.where(rv[None, :] == tgt[:, None], z, 0.0), 1)
        z = tl.where(v_ok[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, 1))
        alpha = tl.exp(run_max - new_max)
        p = tl.exp(z - new_max[:, None])
        run_sum = run_sum * alpha + tl.sum(p, 1)
        if WITH_ENTROPY:
            run_pz = run_pz * alpha + tl.sum(tl.where(v_ok[None, :], p * z, 0.0), 1)
        run_max = new_max
    lse = run_max + tl.log(run_sum)
    tl.store(lse_ptr + rn, lse, mask=n_ok)
    tl.store(zt_ptr + rn, z_tgt, mask=n_ok)
    if WITH_ENTROPY:
        tl.store(ent_ptr + rn, lse - run_pz / run_sum, mask=n_ok)


@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr, dl_ptr,
                    N, V, H, stride_h, stride_w, stride_dl, inv_temp,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    WITH_ENTROPY: tl.constexpr, PRECISION: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rv = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    n_ok = rn < N
    v_ok = rv < V
    z = _logits_tile(h_ptr, w_ptr, rn, rv, n_ok, v_ok, H, stride_h, stride_w, inv_temp,
                     BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)
    tgt = tl.load(t_ptr + rn, mask=n_ok, other=0)
    lse = tl.load(lse_ptr + rn, mask=n_ok, other=0.0)
    g = tl.load(g_logp_ptr + rn, mask=n_ok, other=0.0)
    p = tl.exp(z - lse[:, None])
    # d logp / d z_j = [j == target] - p_j
    dz = g[:, None] * (tl.where(rv[None, :] == tgt[:, None], 1.0, 0.0) - p)
    if WITH_ENTROPY:
        # d entropy / d z_j = -p_j (z_j - Σ_v p_v z_v), and Σ p z = lse - entropy
        ent = tl.load(ent_ptr + rn, mask=n_ok, other=0.0)
        ge = tl.load(g_ent_ptr + rn, mask=n_ok, other=0.0)
        dz += ge[:, None] * (-p * (z - (lse - ent)[:, None]))
    dz = dz * inv_temp
    tl.store(dl_ptr + rn[:, None].to(tl.int64) * stride_dl + rv[None, :], dz.to(dl_ptr.dtype.element_ty),
             mask=n_ok[:, None] & v_ok[None, :])


def logprob_forward(hidden, weight, targets, inv_temp: float, with_entropy: bool):
    """(lse, target_logit, entropy-or-None), each fp32 [N]. hidden [N, H] and weight [V, H] row-contiguous."""
    n, h = hidden.shape
    v = weight.shape[0]
    cfg = _config(hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    zt = torch.empty_like(lse)
    ent = torch.empty_like(lse) if with_entropy else lse
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    _logprob_fwd_kernel[grid](hidden, weight, targets, lse, zt, ent, n, v, h, hidden.stride(0), weight.stride(0),
                              inv_temp, WITH_ENTROPY=with_entropy, PRECISION=_precision(hidden.dtype), **cfg)
    return lse, zt, (ent if with_entropy else None)


def dlogits(hidden, weight, targets, lse, entropy, g_logp, g_ent, inv_temp: float, out_dtype):
    """d loss / d raw logits [N, V] (temperature folded in) for one chunk of tokens, in out_dtype."""
    n, h = hidden.shape
    v = weight.shape[0]
    cfg = _config(hidden.device)
    out = torch.empty(n, v, dtype=out_dtype, device=hidden.device)
    with_entropy = g_ent is not None
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(v, cfg["BLOCK_V"]))
    _dlogits_kernel[grid](hidden, weight, targets, lse, entropy if with_entropy else lse, g_logp,
                          g_ent if with_entropy else g_logp, out, n, v, h, hidden.stride(0), weight.stride(0),
                          out.stride(0), inv_temp, WITH_ENTROPY=with_entropy, PRECISION=_precision(hidden.dtype),
                          **cfg)
    return out
