"""One FP8 GEMM, `out = A @ B^T`, with both operands given in high precision and K-contiguous.

Every GEMM of a linear layer (forward, input-gradient, weight-gradient) is written in this "NT"
form so one function serves all three: each operand is quantised along its last (reduced)
dimension, i.e. rowwise scales are one per output row of A and one per output column of B, which
is the only layout `torch._scaled_mm`'s rowwise mode accepts.

Two implementations with the same numerics:
- "emulate": fp32 matmul of the dequantised values' fp8 payloads, scales applied after the sum
  (as the FP8 tensor cores do), on any device;
- "torch": `torch._scaled_mm` (cuBLAS/CUTLASS FP8 on sm_89+; a reference kernel on the CPU).
Except that the forward asks CUDA for fast accumulation (`fast_accum`): Hopper's FP8 tensor cores
then keep fewer bits than fp32 in the running sum (the H200 run's forward differences fit an error
of about 2^-12 of each output), which the emulation does not model; the backward GEMMs, whose sums
feed the optimizer, accumulate in fp32 on both paths.
"""
from __future__ import annotations

import torch

from r1fast.fp8.quantization import quantize

IMPLS = ("emulate", "torch")


def fp8_gemm_nt(a: torch.Tensor, a_dtype: torch.dtype, b: torch.Tensor, b_dtype: torch.dtype, *,
                rowwise: bool, out_dtype: torch.dtype, impl: str, fast_accum: bool = False) -> torch.Tensor:
    """A (M, K) @ B (N, K)^T -> (M, N) in `out_dtype`, both operands quantised to FP8 first."""
    # Under torch.autocast the fp32 matmul below would silently run in bf16: these numerics are ours.
    with torch.autocast(device_type=a.device.type, enabled=False):
        return _gemm_nt(a, a_dtype, b, b_dtype, rowwise=rowwise, out_dtype=out_dtype, impl=impl,
                        fast_accum=fast_accum)


def _gemm_nt(a, a_dtype, b, b_dtype, *, rowwise, out_dtype, impl, fast_accum):
    if impl == "emulate":
        qa, sa = quantize(a, a_dtype, rowwise)
        qb, sb = quantize(b, b_dtype, rowwise)
        out = qa.float() @ qb.float().t()
        out = out * sa * (sb.t() if rowwise else sb)
        return out.to(out_dtype)
    if impl == "torch":
        return _scaled_mm_nt(a, a_dtype, b, b_dtype, rowwise=rowwise, out_dtype=out_dtype, fast_accum=fast_accum)
    raise ValueError(f"fp8_gemm_nt: impl must be one of {IMPLS}, got {impl!r}")


def _follows_cuda_rules(t: torch.Tensor) -> bool:
    """Whether _scaled_mm runs its CUDA kernels on `t` (bf16-only rowwise output, fast accumulation).
    A function of its own so the CPU tests can hold our calls to the CUDA contract (test_fp8_numerics)."""
    return t.is_cuda


def _scaled_mm_nt(a, a_dtype, b, b_dtype, *, rowwise, out_dtype, fast_accum):
    cuda = _follows_cuda_rules(a)
    # The reduced dimension zero-padded to a multiple of 16, as _scaled_mm needs: in the weight-gradient
    # GEMM it is the token count. The compiled quantiser writes the padding with q (padding the
    # high-precision operand first was a pass over all of dy; padding q afterwards a 1-byte one).
    qa, sa = quantize(a, a_dtype, rowwise, pad_to_16=True)
    qb, sb = quantize(b, b_dtype, rowwise, pad_to_16=True)
    # _scaled_mm writes fp32/bf16/fp16 only (a float64 layer would fail inside it): cast afterwards.
    mm_dtype = out_dtype if out_dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    if rowwise:
        # _scaled_mm wants scale_a (M, 1) and scale_b (1, N) with unit inner stride; the strides of a
        # reduction's size-1 dim are arbitrary, so rebuild both from 1-D.
        sa = sa.reshape(-1).contiguous().unsqueeze(1)
        sb = sb.reshape(-1).contiguous().unsqueeze(0)
        if cuda:
            # The CUTLASS rowwise kernel (cuBLAS < 12.9) only writes bf16.
            mm_dtype = torch.bfloat16
    # qb.t() is column-major, the layout _scaled_mm needs for its second operand.
    out = torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb, out_dtype=mm_dtype,
                           use_fast_accum=fast_accum and cuda)
    return out if out.dtype == out_dtype else out.to(out_dtype)
