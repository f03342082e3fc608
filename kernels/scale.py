"""Triton in-place scale of a 16-bit tensor by a device scalar: x = round(fp32(x) * fp32(g)).

The fused GRPO loss makes its gradients in the forward and scales them by d out / d loss in the
backward (ops/fused_loss.py scale_). That scalar lives on the device (reading it would sync), and
torch's bf16 * 0-d tensor rounds the scalar to bf16 first, so the torch path goes through fp32 in
slices: three kernels and 20 bytes of traffic per element of a [V, H] gradient. This is one pass,
4 bytes per element, the same numbers (the fp32 product rounded once to x's dtype, to nearest even).
Offsets are int64 (a V x H gradient passes 2^31 elements at 7B shapes). Interpreter-safe.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1fast.backends import triton_interpreted


@triton.jit
def _scale_kernel(x_ptr, g_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    g = tl.load(g_ptr).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    tl.store(x_ptr + offs, (x * g).to(x_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=keep)


def scale_inplace(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """x *= g in place (x contiguous, g a 0-d float tensor on x's device); returns x."""
    block = 1024 if triton_interpreted() else 8192
    n = x.numel()
    if n:
        _scale_kernel[(triton.cdiv(n, block),)](x, g, n, BLOCK=block, num_warps=8)
    return x
