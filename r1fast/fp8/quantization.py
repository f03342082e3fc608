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
import torch.nn.functional as F

# Guards the all-zero row (its scale is then tiny and q is zero, not NaN).
AMAX_EPS = 1e-12


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def _divide_by_fp8_max(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 max(amax, AMAX_EPS) / FP8_MAX, correctly rounded on every device.

    The divisor is a tensor on amax's device, not a Python float: CUDA's eager division by a CPU
    scalar multiplies by its fp32 reciprocal (ATen's div_true_kernel_cuda), and Inductor rewrites a
    division by a constant the same way on GPUs; 1/448 and 1/57344 are inexact, so either gives a
    scale one ulp off the spec's for many rows, and a bf16 input has many elements whose quotient
    is an exact FP8 rounding tie, which that ulp then rounds the other way."""
    return amax.float().clamp_min(AMAX_EPS) / _fp8_max_tensor(dtype, amax.device)


def _fp8_max_tensor(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Made once per device (a fill per call would be one more kernel launch), but never cached from
    # inside a CUDA graph capture: there the fill is recorded, not run, and the tensor would hold
    # garbage for every later eager call.
    key = (device, dtype)
    if key in _FP8_MAX_TENSORS:
        return _FP8_MAX_TENSORS[key]
    t = torch.full((), fp8_max(dtype), dtype=torch.float32, device=device)
    if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        _FP8_MAX_TENSORS[key] = t
    return t


_FP8_MAX_TENSORS: dict = {}


def compute_scale(t: torch.Tensor, dtype: torch.dtype, rowwise: bool) -> torch.Tensor:
    """The dequantisation scale of `t` (fp32): shape (rows, 1) when rowwise, else a 0-d tensor."""
    # The inf-norm is max|t| in one read, without an |t| temporary; a max is exact in any dtype.
    t = t.detach()
    if t.numel() == 0:
        # No tokens (an empty batch, or the weight-gradient GEMM's reduction over zero tokens): the
        # inf-norm has no identity and would raise, where nn.Linear returns an empty / zero result.
        amax = t.new_zeros((*t.shape[:-1], 1) if rowwise else (), dtype=torch.float32)
        return _divide_by_fp8_max(amax, dtype)
    amax = torch.linalg.vector_norm(t, float("inf"), dim=-1, keepdim=True) if rowwise else \
        torch.linalg.vector_norm(t, float("inf"))
    return _divide_by_fp8_max(amax, dtype)


def _cast(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # No clamp needed: |t| <= amax, so |t / scale| <= FP8_MAX up to one fp32 rounding, which the
    # round-to-nearest cast brings back to FP8_MAX (the next value up, 480 / 61440, is far away).
    # Row-major q even from a transposed view (the backward GEMMs quantise W^T, dy^T and x^T), as
    # _scaled_mm wants it. Eagerly: one fp32 temporary (a narrower t is widened by a copy, divided in
    # place), and the cast writes q row-major itself. `(t.float() / scale).to(dtype).contiguous()`
    # held two fp32 temporaries of a bf16 t and copied a transposed q once more: the same values.
    q = t / scale if t.dtype == torch.float32 else t.to(torch.float32).div_(scale)
    return q.to(dtype, memory_format=torch.contiguous_format)


def pad_last_to_16(q: torch.Tensor) -> torch.Tensor:
    """q (FP8 payloads) with zero columns up to a multiple of 16, which _scaled_mm needs in the reduced
    dimension. Zero bytes are +0.0 in both formats, so the sums are unchanged, and the amax ignores
    zeros: padding q gives the values quantising the padded tensor would."""
    rem = q.shape[-1] % 16
    # through uint8: a constant pad of the float8 dtypes themselves is not implemented on every device
    return q if rem == 0 else F.pad(q.view(torch.uint8), (0, 16 - rem)).view(q.dtype)


def _quantize_impl(t: torch.Tensor, dtype: torch.dtype, rowwise: bool, pad: bool = False):
    t = t.detach()
    scale = compute_scale(t, dtype, rowwise)
    q = _cast(t, scale, dtype)
    return (pad_last_to_16(q) if pad else q), scale


# One function per FP8 format and scaling, so each has its own torch.compile cache: Dynamo guards on
# every Python argument and on the input's dtype, layout and rank, and one function over (format,
# scaling, row-major or transposed input, input dtype) ran past its recompile limit (8) within one
# linear layer's forward and backward, after which every new case silently ran eagerly. Each of
# these sees (input dtype) x (row-major, transposed) in a layer: 2 per model dtype. Rowwise, the
# amax is compiled too (a row reduction, then the cast, without a round trip through eager ops);
# tensorwise it is torch's own full reduction, passed in (an Inductor full reduction under
# dynamic shapes is the suspect in the H200 run's 3.6-10x slower tensorwise forward). The "_padded"
# ones serve only inputs whose last dimension is not a multiple of 16 (the weight-gradient GEMM's
# operands, whose reduced dimension is the token count): their cast writes the zero columns
# _scaled_mm needs in the same kernel, where padding q afterwards read and wrote it once more.
def _quantize_e4m3_rowwise(t: torch.Tensor, fmax: torch.Tensor):
    return _compiled_rowwise(t, fmax, torch.float8_e4m3fn)


def _quantize_e4m3_tensorwise(t: torch.Tensor, amax: torch.Tensor, fmax: torch.Tensor):
    return _compiled_tensorwise(t, amax, fmax, torch.float8_e4m3fn)


def _quantize_e5m2_rowwise(t: torch.Tensor, fmax: torch.Tensor):
    return _compiled_rowwise(t, fmax, torch.float8_e5m2)


def _quantize_e5m2_tensorwise(t: torch.Tensor, amax: torch.Tensor, fmax: torch.Tensor):
    return _compiled_tensorwise(t, amax, fmax, torch.float8_e5m2)


def _quantize_e4m3_rowwise_padded(t: torch.Tensor, fmax: torch.Tensor):
    return _compiled_rowwise(t, fmax, torch.float8_e4m3fn, pad=True)


def _quantize_e4m3_tensorwise_padded(t: torch.Tensor, amax: torch.Tensor, fmax: torch.Tensor):
    return _compiled_tensorwise(t, amax, fmax, torch.float8_e4m3fn, pad=True)


def _quantize_e5m2_rowwise_padded(t: torch.Tensor, fmax: torch.Tensor):
    return _compiled_rowwise(t, fmax, torch.float8_e5m2, pad=True)


def _quantize_e5m2_tensorwise_padded(t: torch.Tensor, amax: torch.Tensor, fmax: torch.Tensor):
    return _compiled_tensorwise(t, amax, fmax, torch.float8_e5m2, pad=True)


def _compiled_rowwise(t, fmax, dtype, pad=False):
    scale = _compiled_scale(torch.linalg.vector_norm(t, float("inf"), dim=-1, keepdim=True), fmax)
    return _compiled_cast(t, scale, dtype, pad), scale


def _compiled_tensorwise(t, amax, fmax, dtype, pad=False):
    scale = _compiled_scale(amax, fmax)
    return _compiled_cast(t, scale, dtype, pad), scale


# Set where Inductor has no exact fp32 division (torch before 2.10): the compiled code divides in fp64.
# The fp64 quotient rounded to fp32 is the correctly rounded fp32 quotient (53 >= 2 * 24 + 2), and
# Triton divides fp64 with div.rn.f64: exact, at some fp64 arithmetic per element.
_divide_in_fp64 = False


def _compiled_scale(amax, fmax):
    # fmax is an input tensor, not a constant: Inductor turns x / constant into x * (1 / constant)
    clamped = amax.float().clamp_min(AMAX_EPS)
    return (clamped.double() / fmax).float() if _divide_in_fp64 else clamped / fmax


def _compiled_cast(t, scale, dtype, pad=False):
    # Inductor fuses this into one kernel (one read of t, a row-major 1-byte write): written out
    # of place, as Dynamo traces it best, rather than through the eager _cast's in-place division.
    quotient = (t.double() / scale).float() if _divide_in_fp64 else t.float() / scale
    if pad:  # zeros cast to +0.0, the bytes pad_last_to_16 writes
        quotient = F.pad(quotient, (0, (16 - t.shape[-1] % 16) % 16))
    return quotient.to(dtype).contiguous()


_QUANTIZERS = {(torch.float8_e4m3fn, True): _quantize_e4m3_rowwise,
               (torch.float8_e4m3fn, False): _quantize_e4m3_tensorwise,
               (torch.float8_e5m2, True): _quantize_e5m2_rowwise,
               (torch.float8_e5m2, False): _quantize_e5m2_tensorwise,
               (torch.float8_e4m3fn, True, "padded"): _quantize_e4m3_rowwise_padded,
               (torch.float8_e4m3fn, False, "padded"): _quantize_e4m3_tensorwise_padded,
               (torch.float8_e5m2, True, "padded"): _quantize_e5m2_rowwise_padded,
               (torch.float8_e5m2, False, "padded"): _quantize_e5m2_tensorwise_padded}
_compiled: dict = {}
_compile_failed = False


def _exact_division_options() -> dict | None:
    """The Inductor option that makes its Triton code divide fp32 correctly rounded (div_rn), or
    None where this torch has none. Triton's plain fp32 `x / y` is PTX div.full, an approximation:
    it moves quotients that sit on an FP8 rounding tie (common with bf16 inputs) to the other side.
    The option's name changed between torch releases, and Inductor rejects unknown names."""
    from torch._inductor import config

    if hasattr(getattr(config, "eager_numerics", None), "division_rounding"):
        return {"eager_numerics.division_rounding": True}
    if hasattr(config, "emulate_divison_rounding"):  # sic: the option's spelling in torch 2.10
        return {"emulate_divison_rounding": True}
    return None


def _compiled_quantizer(dtype: torch.dtype, rowwise: bool, pad: bool = False):
    global _divide_in_fp64
    key = (dtype, rowwise, "padded") if pad else (dtype, rowwise)
    if key not in _compiled:
        options = _exact_division_options()
        _divide_in_fp64 = options is None
        _compiled[key] = torch.compile(_QUANTIZERS[key], dynamic=True, options=options)
    return _compiled[key]


def _fused_quantize(t, dtype, rowwise, pad=False):
    """_quantize_impl compiled for CUDA: rowwise one compiled call (row amax, scale, cast: two reads
    of t and a 1-byte write, no eager op between); tensorwise torch's amax reduction (one read),
    then one compiled call for the scale and the cast (one read, a 1-byte write). Eager mode writes
    and reads one fp32 temporary the size of t (a narrower t's widened copy, divided in place)."""
    global _compile_failed
    t = t.detach()  # requires_grad is part of Dynamo's guards; the quantiser never needs it
    if t.numel() == 0:  # nothing to compile for, and a size-0 dimension would be one more version
        return _quantize_impl(t, dtype, rowwise, pad)
    pad = pad and t.shape[-1] % 16 != 0  # the padded quantisers see only inputs that need it
    fmax = _fp8_max_tensor(dtype, t.device)
    try:
        # inside the try: torch.compile itself raises where Dynamo cannot run (e.g. a Python newer than
        # this torch supports), and that too must fall back rather than fail every FP8 layer
        quantizer = _compiled_quantizer(dtype, rowwise, pad)
        if rowwise:
            return quantizer(t, fmax)
        return quantizer(t, torch.linalg.vector_norm(t, float("inf")), fmax)
    except Exception as e:  # no working compiler toolchain: keep going, eagerly, and say so once
        _compile_failed = True
        warnings.warn(f"r1fast fp8: torch.compile of the FP8 quantiser failed ({type(e).__name__}: {e}); "
                      "using eager quantisation (slower). Set R1FAST_FP8_COMPILE=0 to skip the attempt.")
        return _quantize_impl(t, dtype, rowwise, pad)


def _quantize_with_scale(t: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor) -> torch.Tensor:
    # A caller's scale (e.g. from an amax history) may be too small: a finite value saturates at
    # ±FP8_MAX. An inf must not (it would become a plausible finite payload), nor may anything pass
    # through a scale that is not finite and positive (t / inf is 0): those give NaN, as a computed
    # scale does. All of it elementwise, without reading the scale on the host.
    fmax = fp8_max(dtype)
    q = (t.float() / scale).clamp_(-fmax, fmax)
    bad = torch.isinf(t) | ~(torch.isfinite(scale) & (scale > 0))
    # row-major, as the computed-scale path writes q (_cast) and _scaled_mm takes it
    return q.masked_fill_(bad, float("nan")).to(dtype, memory_format=torch.contiguous_format)


def _check_given_scale(t: torch.Tensor, scale, rowwise: bool) -> None:
    # The division broadcasts: a rowwise scale of shape (rows,) or (1, cols) divided a square t column
    # by column, silently. One scale per row is (rows, 1); one per tensor is a single element.
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"quantize: scale must be a tensor (fp32 dequantisation scale), got {type(scale).__name__}")
    if rowwise and tuple(scale.shape) != (t.shape[0], 1):
        raise ValueError(f"quantize: a rowwise scale must have shape ({t.shape[0]}, 1) for a tensor of shape "
                         f"{tuple(t.shape)}, got {tuple(scale.shape)}")
    if not rowwise and (scale.numel() != 1 or scale.dim() > t.dim()):
        raise ValueError(f"quantize: a tensorwise scale must have one element, got shape {tuple(scale.shape)}")


def quantize(t: torch.Tensor, dtype: torch.dtype, rowwise: bool, scale: torch.Tensor | None = None, *,
             pad_to_16: bool = False):
    """(q, scale): `t` (2-D when rowwise) in the float8 `dtype`, and its fp32 dequantisation scale.
    pad_to_16: q's last dimension zero-padded to a multiple of 16 (pad_last_to_16), as _scaled_mm
    needs in the dimension it reduces; the scale is t's."""
    if dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"quantize: dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {dtype}")
    if rowwise and t.dim() != 2:
        raise ValueError(f"quantize: rowwise scaling needs a 2-D tensor, got shape {tuple(t.shape)}")
    if scale is not None:
        _check_given_scale(t, scale, rowwise)
        q = _quantize_with_scale(t.detach(), dtype, scale)
        return (pad_last_to_16(q) if pad_to_16 else q), scale
    if t.is_cuda and not _compile_failed and os.environ.get("R1FAST_FP8_COMPILE", "1") != "0":
        return _fused_quantize(t, dtype, rowwise, pad_to_16)
    return _quantize_impl(t, dtype, rowwise, pad_to_16)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale
