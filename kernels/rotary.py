"""Triton rotary position embedding for q and k in one launch, forward and backward.

The decoder rotates q [T, Hq, D] and k [T, Hk, D] by each token's angles, with cos/sin tables
[T, D] (r1fast.models.rotary), as transformers' Llama/Qwen do: out = x * cos + rotate_half(x) * sin,
rotate_half(x) = cat(-x2, x1) over the two halves of the head dimension. Per half:
    y1 = x1 * c1 - x2 * s1          y2 = x2 * c2 + x1 * s2
In torch that is five elementwise kernels per tensor (ten per layer, each a full pass over q or k);
here it is one launch for both.

Forward numerics (ROUND, 16-bit outputs): each product is rounded to the output dtype before the sum,
and the sum once more, as torch's three bf16/fp16 operations do (a product of two 16-bit floats is
exact in fp32, so the rounded product equals torch's; the fp32 sum of two 16-bit floats rounded to
16 bits equals the exactly rounded sum). fp32 outputs: two fp32 products and their fp32 sum, each
rounded, as torch's three fp32 operations are.

Every launch compiles with FP fusion off (launch_config's enable_fp_fusion=False). With it on (the
Triton <= 3.9 default), LLVM narrows the rounded products and the sum to mul.f16 / add.f16 (exact:
the same roundings) and then contracts one product with the sum into fma.rn.f16, so that product
is never rounded: on an H200 the bf16/fp16 forward differed from torch's in the last bit of some
elements, while the interpreter (numpy: no FMA) agreed. Without fusion the PTX has only
mul.rn / add.rn / sub.rn, and the forward (fp32 too) is meant to equal torch's eager CUDA result bit
for bit (test_rotary_compiles_without_fma_contraction checks the PTX on the CPU; the bit-equality
tests are not yet confirmed on a GPU). The cost is one more instruction per output element in a
memory-bound kernel (not measured).

Backward from (dq, dk), the transposed rotation (the angles' gradient is not needed: they come from
positions), in fp32 and rounded once to the input dtype:
    dx1 = dy1 * c1 + dy2 * s2       dx2 = dy2 * c2 - dy1 * s1
For fp32 those are torch's autograd operations and roundings (dy * cos, dy * sin, one add): bit-equal
too. For 16-bit, torch rounds dy * cos and dy * sin to 16 bits first: not bit-equal, more accurate.

Layout: last dimension contiguous; token and head strides are arguments. Grid (tokens, head blocks
of q then of k): a program loads its token's cos/sin halves once and rotates BLOCK_H heads.
"""
import torch
import triton
import triton.language as tl

from r1fast.backends import on_device

# elements per program on a GPU (BLOCK_H heads x half a head); the interpreter uses small blocks so
# test shapes cross head-block edges. Not yet tuned on a GPU (`r1fast bench layers`).
TILE = 2048
CPU_BLOCK_H = 2


def launch_config(num_heads: int, half: int, device_type: str = "cuda") -> dict:
    # enable_fp_fusion=False: no FMA contraction, so every product is rounded as torch's is (module
    # docstring); the interpreter ignores the option
    block_d = triton.next_power_of_2(half)
    if device_type != "cuda":
        return dict(BLOCK_H=CPU_BLOCK_H, BLOCK_D=block_d, num_warps=1, num_stages=1, enable_fp_fusion=False)
    block_h = max(1, min(triton.next_power_of_2(num_heads), TILE // block_d))
    return dict(BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4, num_stages=1, enable_fp_fusion=False)


@triton.jit
def _rotate_heads(x_ptr, out_ptr, c1, c2, s1, s2, t, hb, n_heads, stride_xt, stride_xh, stride_ot, stride_oh,
                  HALF, BACKWARD: tl.constexpr, ROUND: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    m = (heads < n_heads)[:, None] & (d < HALF)[None, :]
    t64 = t.to(tl.int64)
    src = x_ptr + t64 * stride_xt + heads.to(tl.int64)[:, None] * stride_xh + d[None, :]
    dst = out_ptr + t64 * stride_ot + heads.to(tl.int64)[:, None] * stride_oh + d[None, :]
    x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    elif ROUND:
        y1 = ((x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32))
        y2 = ((x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32))
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(dst, y1.to(dt), mask=m)
    tl.store(dst + HALF, y2.to(dt), mask=m)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, n_q_heads, n_k_heads, q_blocks,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
                   stride_ct, stride_st, HALF,
                   BACKWARD: tl.constexpr, ROUND: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    hb = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    dm = d < HALF
    c_row = cos_ptr + t.to(tl.int64) * stride_ct + d
    s_row = sin_ptr + t.to(tl.int64) * stride_st + d
    c1 = tl.load(c_row, mask=dm, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(c_row + HALF, mask=dm, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(s_row, mask=dm, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(s_row + HALF, mask=dm, other=0.0).to(tl.float32)[None, :]
    if hb < q_blocks:
        _rotate_heads(q_ptr, qo_ptr, c1, c2, s1, s2, t, hb, n_q_heads, stride_qt, stride_qh, stride_qot, stride_qoh,
                      HALF, BACKWARD, ROUND, BLOCK_H, BLOCK_D)
    else:
        _rotate_heads(k_ptr, ko_ptr, c1, c2, s1, s2, t, hb - q_blocks, n_k_heads, stride_kt, stride_kh, stride_kot,
                      stride_koh, HALF, BACKWARD, ROUND, BLOCK_H, BLOCK_D)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype,
           backward: bool = False):
    """q [T, Hq, D], k [T, Hk, D] (last dim contiguous), cos/sin [T, D] (last dim contiguous) ->
    (q_out, k_out) of out_dtype, rotated (backward=True: by the transposed rotation, for gradients)."""
    t, hq, d = q.shape
    hk = k.shape[1]
    qo = torch.empty((t, hq, d), dtype=out_dtype, device=q.device)
    ko = torch.empty((t, hk, d), dtype=out_dtype, device=k.device)
    if t == 0:
        return qo, ko
    half = d // 2
    cfg = launch_config(max(hq, hk), half, q.device.type)
    q_blocks = triton.cdiv(hq, cfg["BLOCK_H"])
    grid = (t, q_blocks + triton.cdiv(hk, cfg["BLOCK_H"]))
    with on_device(q.device):
        _rotary_kernel[grid](q, k, qo, ko, cos, sin, hq, hk, q_blocks,
                             q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                             qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1),
                             cos.stride(0), sin.stride(0), half,
                             BACKWARD=backward, ROUND=out_dtype != torch.float32, **cfg)
    return qo, ko
