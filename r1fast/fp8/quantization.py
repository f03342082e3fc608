"""FP8 quantisation: the numerics shared by the "emulate" and "torch" paths.

A high-precision tensor t becomes (q, scale) with t ≈ q.float() * scale:

    amax  = max |t|                      per row (rowwise) or over the tensor (tensorwise), in fp32
    scale = max(amax, AMAX_EPS) / FP8_MAX(dtype)      fp32, the *dequantisation* scale
    q     = cast_to_fp8(clamp(fp32(t) / scale, -FP8_MAX, FP8_MAX))    round-to-nearest-even

The largest element lands on the format's largest finite value, so nothing overflows; the clamp
only matters when a caller supplies its own scale (and guards against an fp32 quotient a hair
above FP8_MAX). `r1fast.fp8.reference` re-derives every step in float64 without the float8 dtypes.
"""
from __future__ import annotations

import os
import warnings

import torch

# Guards the all-zero row (its scale is then tiny and q is zero, not NaN).
AMAX_EPS = 1e-12


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def compute_scale(t: torch.Tensor, dtype: torch.dtype, rowwise: bool) -> torch.Tensor:
    """The dequantisation scale of `t` (fp32): shape (rows, 1) when rowwise, else a 0-d tensor."""
    # The inf-norm is max|t| in one read, without an |t| temporary; a max is exact in any dtype.
    t = t.detach()
    if t.numel() == 0:
        # No tokens (an empty batch, or the weight-gradient GEMM's reduction over zero tokens): the
        # inf-norm has no identity and would raise, where nn.Linear returns an empty / zero result.
        amax = t.new_zeros((*t.shape[:-1], 1) if rowwise else (), dtype=torch.float32)
        return amax.clamp_min(AMAX_EPS) / fp8_max(dtype)
    amax = torch.linalg.vector_norm(t, float("inf"), dim=-1, keepdim=True) if rowwise else \
        torch.linalg.vector_norm(t, float("inf"))
    return amax.float().clamp_min(AMAX_EPS) / fp8_max(dtype)


def _quantize_impl(t: torch.Tensor, dtype: torch.dtype, rowwise: bool):
    scale = compute_scale(t, dtype, rowwise)
    # No clamp needed: |t| <= amax, so |t / scale| <= FP8_MAX up to one fp32 rounding, which the
    # round-to-nearest cast brings back to FP8_MAX (the next value up, 480 / 61440, is far away).
    # Row-major q even from a transposed view (the backward GEMMs quantise W^T, dy^T and x^T):
    # _scaled_mm wants it, and copying 1-byte values beats copying the 2-byte input first.
    q = (t.detach().float() / scale).to(dtype).contiguous()
    return q, scale


_compiled = None
_compile_failed = False


def _fused_quantize(t, dtype, rowwise):
    """_quantize_impl as one fused kernel on CUDA (torch.compile): one read for the amax, one
    read and a 1-byte write for the cast, instead of eager mode's fp32 temporaries."""
    global _compiled, _compile_failed
    if _compiled is None:
        _compiled = torch.compile(_quantize_impl, dynamic=True)
    try:
        return _compiled(t, dtype, rowwise)
    except Exception as e:  # no working compiler toolchain: keep going, eagerly, and say so once
        _compile_failed = True
        warnings.warn(f"r1fast fp8: torch.compile of the FP8 quantiser failed ({type(e).__name__}: {e}); "
                      "using eager quantisation (slower). Set R1FAST_FP8_COMPILE=0 to skip the attempt.")
        return _quantize_impl(t, dtype, rowwise)


def _quantize_with_scale(t: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor) -> torch.Tensor:
    # A caller's scale (e.g. from an amax history) may be too small: a finite value saturates at
    # ±FP8_MAX. An inf must not (it would become a plausible finite payload), nor may anything pass
    # through a scale that is not finite and positive (t / inf is 0): those give NaN, as a computed
    # scale does. All of it elementwise, without reading the scale on the host.
    fmax = fp8_max(dtype)
    q = (t.float() / scale).clamp_(-fmax, fmax)
    bad = torch.isinf(t) | ~(torch.isfinite(scale) & (scale > 0))
    return q.masked_fill_(bad, float("nan")).to(dtype)


def quantize(t: torch.Tensor, dtype: torch.dtype, rowwise: bool, scale: torch.Tensor | None = None):
    """(q, scale): `t` (2-D when rowwise) in the float8 `dtype`, and its fp32 dequantisation scale."""
    if dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"quantize: dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {dtype}")
    if rowwise and t.dim() != 2:
        raise ValueError(f"quantize: rowwise scaling needs a 2-D tensor, got shape {tuple(t.shape)}")
    if scale is not None:
        return _quantize_with_scale(t.detach(), dtype, scale), scale
    if t.is_cuda and not _compile_failed and os.environ.get("R1FAST_FP8_COMPILE", "1") != "0":
        return _fused_quantize(t, dtype, rowwise)
    return _quantize_impl(t, dtype, rowwise)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale
