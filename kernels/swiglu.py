"""Triton SwiGLU activation, forward and backward: out = silu(gate) * up, the decoder MLP's
elementwise step between gate/up and down projections (tensors [tokens, intermediate], the largest
activations of a training step).

Forward (gate, up fp16 / bf16 / fp32 of one dtype; fp32 math; out in the input dtype):
    s   = round(gate / (1 + exp(-gate)))        silu in fp32, rounded to the input dtype
    out = round(s * up)                         one fp32 product (exact for 16-bit inputs), rounded
These are torch's own operations for `F.silu(g) * u` on CUDA (its silu kernel computes
x / (1 + exp(-x)) in fp32 with expf and an IEEE division, then rounds; the product of two
16-bit floats is exact in fp32 and rounded once), and the kernel uses libdevice's expf and
div_rn for them, so on CUDA the forward is meant to equal torch's bit for bit (a gpu-marked test
checks it; not yet run on a GPU. Subnormal gates may differ: Triton links libdevice in its
flush-to-zero mode; and both compilers may contract expf's last multiply with the + 1 into an FMA,
which the test would reveal). Under the interpreter exp is numpy's:
close to torch's CPU result, not claimed bit-equal.

Backward from d_out, recomputing silu (only gate and up are saved; torch's path saves silu(gate)
as well):
    sig    = 1 / (1 + exp(-gate))
    d_up   = round(d_out * s)                   s rounded as the forward used it: torch's exact result
    d_gate = round(d_out * up * sig * (1 + gate * (1 - sig)))   all fp32, rounded once
torch rounds d_out * up to the input dtype before its silu backward; this kernel does not, so
d_gate is at least as accurate as torch's and not bit-equal to it.

Layout: rows [R, H] (H = the last dimension, contiguous), a [BLOCK_R, BLOCK_N] tile per program on a
(row tiles, column blocks) grid; every offset is int64 (393k tokens x 8960 passes 2^31 elements).
gate and up (and d_gate and d_up) may be the two halves of one [R, 2H] tensor, the output of the
decoder's fused gate/up projection: they share a row stride (IN_STRIDE, 2H there) and the backward
writes both halves of that projection's gradient in place, so neither direction copies a half out.
The interpreter cannot call libdevice: PRECISE=False (CPU tensors) uses tl.exp and is otherwise the
same code.
"""
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from r1fast.backends import on_device

# elements per program: 8 per thread over 8 warps (16-byte bf16 vectors). ptxas, sm_90, Triton 3.6
# and 3.9: forward <= 40 registers, backward <= 56, no spills. Not yet tuned on a GPU (`r1fast bench layers`).
TILE = 2048
CPU_TILE = 256       # interpreter: small tiles so test shapes cross tile edges


def launch_config(H: int, device_type: str = "cuda") -> dict:
    tile = TILE if device_type == "cuda" else CPU_TILE
    block_n = min(triton.next_power_of_2(H), tile)
    block_r = max(1, tile // block_n)
    return dict(BLOCK_R=block_r, BLOCK_N=block_n, num_warps=8 if device_type == "cuda" else 1, num_stages=1)


@triton.jit
def _exp(x, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.exp(x)  # expf, as torch's CUDA silu (tl.exp is the faster ex2.approx form)
    else:
        return tl.exp(x)


@triton.jit
def _tile(n_rows, H, IN_STRIDE, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """(offsets into gate/up rows, offsets into the contiguous [R, H] rows of out/dy, mask)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r64 = rows.to(tl.int64)[:, None]
    return r64 * IN_STRIDE + cols[None, :], r64 * H + cols[None, :], (rows < n_rows)[:, None] & (cols < H)[None, :]


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, out_ptr, n_rows, H, IN_STRIDE,
                       PRECISE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    offs, out_offs, m = _tile(n_rows, H, IN_STRIDE, BLOCK_R, BLOCK_N)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
    s = tl.math.div_rn(g, 1.0 + _exp(-g, PRECISE)).to(g_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + out_offs, (s * u).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd_kernel(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n_rows, H, IN_STRIDE,
                       PRECISE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    offs, out_offs, m = _tile(n_rows, H, IN_STRIDE, BLOCK_R, BLOCK_N)
    dy = tl.load(dy_ptr + out_offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
    den = 1.0 + _exp(-g, PRECISE)
    s = tl.math.div_rn(g, den).to(g_ptr.dtype.element_ty).to(tl.float32)
    sig = tl.math.div_rn(tl.full(den.shape, 1.0, tl.float32), den)
    tl.store(du_ptr + offs, (dy * s).to(du_ptr.dtype.element_ty), mask=m)
    dg = dy * u * (sig * (1.0 + g * (1.0 - sig)))
    tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=m)


def _grid(rows, h, cfg):
    return (triton.cdiv(rows, cfg["BLOCK_R"]), triton.cdiv(h, cfg["BLOCK_N"]))


def _row_stride(gate: torch.Tensor, up: torch.Tensor) -> int:
    if gate.stride(-1) != 1 or up.stride(-1) != 1 or gate.stride(0) != up.stride(0) or gate.stride(0) < gate.shape[1]:
        raise ValueError(f"swiglu kernel: gate and up need unit column strides and one row stride, got "
                         f"{gate.stride()} and {up.stride()}")
    return gate.stride(0)


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [rows, H] (one dtype and row stride, unit column stride) -> silu(gate) * up [rows, H]."""
    rows, h = gate.shape
    out = torch.empty((rows, h), dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    stride = _row_stride(gate, up)
    cfg = launch_config(h, gate.device.type)
    with on_device(gate.device):
        _swiglu_fwd_kernel[_grid(rows, h, cfg)](gate, up, out, rows, h, stride, PRECISE=gate.is_cuda, **cfg)
    return out


def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, d_in: torch.Tensor | None = None):
    """dy [rows, H] contiguous, gate and up as swiglu_fwd's -> (d_gate, d_up) in gate's dtype. With
    d_in [rows, 2H] (contiguous) the two are written into its halves (the gradient of a fused gate/up
    output) and returned as views of it."""
    rows, h = gate.shape
    if d_in is None:
        dg, du = torch.empty((rows, h), dtype=gate.dtype, device=gate.device), torch.empty_like(dy, dtype=gate.dtype)
    else:
        dg, du = d_in[:, :h], d_in[:, h:]
    if dg.numel() == 0:
        return dg, du
    stride = _row_stride(gate, up)
    if _row_stride(dg, du) != stride:
        raise ValueError(f"swiglu kernel: the gradients' row stride {dg.stride(0)} must equal gate's and up's "
                         f"({stride})")
    cfg = launch_config(h, gate.device.type)
    with on_device(gate.device):
        _swiglu_bwd_kernel[_grid(rows, h, cfg)](dy, gate, up, dg, du, rows, h, stride, PRECISE=gate.is_cuda, **cfg)
    return dg, du
