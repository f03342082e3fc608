"""Float64 oracle for the FP8 numerics, written without the float8 dtypes.

`round_to_fp8_grid` rounds to the E4M3 / E5M2 value sets by arithmetic on the exponent and
mantissa (round half to even, saturating at the largest finite value), so the tests compare
torch's float8 casts and our scale handling against an independent derivation. The divisions that
the fast path does in fp32 are rounded to fp32 here as well: that rounding is part of the spec
(float64 division then rounding to fp32 equals fp32 division, since 53 >= 2*24 + 2).
"""
from __future__ import annotations

import torch

from r1fast.fp8.quantization import AMAX_EPS

# (mantissa bits, smallest normal exponent, largest finite value)
FORMATS = {
    torch.float8_e4m3fn: (3, -6, 448.0),
    torch.float8_e5m2: (2, -14, 57344.0),
}


def round_to_fp8_grid(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float64 `v` to the nearest value of the FP8 format `dtype` (ties to even), saturating."""
    mbits, emin, fmax = FORMATS[dtype]
    v = v.double()
    mag = v.abs().clamp(max=fmax)
    # floor(log2 |v|) from frexp (|v| = m * 2**e, m in [0.5, 1)); subnormals share emin's spacing.
    _, e = torch.frexp(torch.where(mag > 0, mag, torch.ones_like(mag)))
    exp = torch.clamp(e.double() - 1, min=emin)
    quantum = torch.pow(2.0, exp - mbits)
    rounded = torch.round(mag / quantum) * quantum          # torch.round: half to even
    return torch.copysign(rounded.clamp(max=fmax), v)


def reference_quantize(t: torch.Tensor, dtype: torch.dtype, rowwise: bool, scale: torch.Tensor | None = None):
    """(q as float64 values on the FP8 grid, fp32-valued float64 scale)."""
    _, _, fmax = FORMATS[dtype]
    t32 = t.detach().float().double()
    given = scale is not None
    if not given:
        amax = t32.abs().amax(dim=-1, keepdim=True) if rowwise else t32.abs().amax()
        scale = (amax.clamp(min=AMAX_EPS) / fmax).float().double()
    else:
        scale = scale.double()
    quotient = (t32 / scale).float().double()
    q = round_to_fp8_grid(quotient, dtype)
    if given:  # finite values saturate; an inf, or a scale not finite and positive, gives NaN
        bad = torch.isinf(t32) | ~(torch.isfinite(scale) & (scale > 0))
        q = torch.where(bad, torch.full_like(q, float("nan")), q)
    return q, scale


def reference_gemm_nt(a, a_dtype, b, b_dtype, rowwise: bool) -> torch.Tensor:
    qa, sa = reference_quantize(a, a_dtype, rowwise)
    qb, sb = reference_quantize(b, b_dtype, rowwise)
    return (qa @ qb.t()) * sa * (sb.t() if rowwise else sb)


def reference_fp8_linear(x, weight, bias, dy, *, grad_dtype: torch.dtype, rowwise: bool):
    """(y, dx, dweight, dbias) in float64 for the FP8 linear's forward and backward."""
    e4m3 = torch.float8_e4m3fn
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    y = reference_gemm_nt(x2, e4m3, weight, e4m3, rowwise)
    if bias is not None:
        y = y + bias.double()
    dx = reference_gemm_nt(dy2, grad_dtype, weight.t(), e4m3, rowwise)
    dw = reference_gemm_nt(dy2.t(), grad_dtype, x2.t(), e4m3, rowwise)
    db = dy2.double().sum(0) if bias is not None else None
    return y.reshape(*x.shape[:-1], -1), dx.reshape(x.shape), dw, db
