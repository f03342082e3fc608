"""ops.rms_norm, ops.add_rms_norm, ops.swiglu and ops.rotary: the decoder's RMSNorm (alone, or
fused with the residual add before it), SwiGLU activation and rotary position embedding of q and k
(r1fast.models.decoder).

backends (every op):
    reference  float64 torch (r1fast.reference.layers), result rounded to the output dtype: the oracle
    torch      the decoder's own expressions, exactly (what runs on the CPU, bit for bit as before):
                   rms_norm: x32 = x.float(); weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)
                   add_rms_norm: s = residual + x; (rms_norm(s), s)
                   swiglu:   F.silu(gate) * up
                   rotary:   x * cos + rotate_half(x) * sin, for q and for k
    triton     fused kernels (kernels/rmsnorm.py, kernels/swiglu.py, kernels/rotary.py) in autograd
               Functions: one read and one write per tensor forward, the backward recomputes what
               it needs (RMSNorm saves x, weight and a per-row fp32 rstd; SwiGLU saves gate and up
               only; rotary saves cos and sin). Their docstrings say where they equal the torch
               path bit for bit and where not. float64 inputs go to the torch backend (the kernels
               compute in fp32), and so do rotary tables that require a gradient. Their
               backward passes are kernels with no graph of their own: double backward
               (create_graph=True) is a RuntimeError there (torch and reference: plain autograd).
Default: triton on CUDA, torch on the CPU (r1fast.backends).

Output dtypes are torch's: rms_norm returns promote(x.dtype, weight.dtype) (x's dtype when the weight
has it, as in a model), swiglu the inputs' dtype, rotary promote(x.dtype, cos.dtype).
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from r1fast import backends
from r1fast.ops.checks import FLOATS, require_tensors, resolve_neg
from r1fast.ops.logprob import refuse_double_backward
from r1fast.reference import layers as reference


def _check_tensor(op, name, t):
    require_tensors(op, **{name: t})
    if t.dtype not in FLOATS:
        raise ValueError(f"{op}: {name} must be a float tensor (fp16, bf16, fp32, fp64), got {t.dtype}")


def _validate_rms_norm(x, weight, eps, op="rms_norm"):
    _check_tensor(op, "x", x)
    _check_tensor(op, "weight", weight)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{op}: x must be [..., H] with H >= 1, got shape {tuple(x.shape)}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{op}: weight must be [H={x.shape[-1]}] (x's last dimension), "
                         f"got shape {tuple(weight.shape)}")
    if x.device != weight.device:
        raise ValueError(f"{op}: x and weight must be on one device, got {x.device} and {weight.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"{op}: eps must be a finite number > 0, got {eps!r}")


def _validate_swiglu(gate, up):
    if up is None:  # packed: gate holds [..., gate | up]
        _check_tensor("swiglu", "gate_up", gate)
        if gate.dim() < 1 or gate.shape[-1] % 2 or gate.shape[-1] == 0:
            raise ValueError(f"swiglu: a packed gate_up must be [..., 2I] with I >= 1 (gate then up), got shape "
                             f"{tuple(gate.shape)}")
        return
    _check_tensor("swiglu", "gate", gate)
    _check_tensor("swiglu", "up", up)
    if gate.dim() < 1 or gate.shape[-1] == 0:
        raise ValueError(f"swiglu: gate must be [..., I] with I >= 1, got shape {tuple(gate.shape)}")
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate shape {tuple(gate.shape)} != up shape {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate and up must share a dtype, got {gate.dtype} and {up.dtype}")
    if gate.device != up.device:
        raise ValueError(f"swiglu: gate and up must be on one device, got {gate.device} and {up.device}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as contiguous rows [R, last dim] with strides (last dim, 1) (a view when it already is)."""
    t2 = t.reshape(-1, t.shape[-1])
    if not t2.is_contiguous():
        return t2.contiguous()
    # is_contiguous() ignores the stride of a size-1 dimension, which may be anything (one token of
    # width 1 sliced with a step): the swiglu kernel compares gate's and up's strides, so give the
    # view the strides its layout has (the same elements)
    return t2 if t2.stride() == (t2.shape[1], 1) else t2.as_strided(t2.shape, (t2.shape[1], 1))


# ---------------------------------------------------------------- rms_norm


@backends.register("rms_norm", "reference")
def _rms_norm_reference(x, weight, eps):
    out = reference.rms_norm(x.double(), weight.double(), eps)
    return out.to(torch.promote_types(x.dtype, weight.dtype))


@backends.register("rms_norm", "torch")
def rms_norm_torch(x, weight, eps):
    # transformers' Llama/Qwen2 RMSNorm, as the decoder has always computed it
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class _TritonRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        from r1fast.kernels import rmsnorm as kernel

        x2 = _rows(x)
        w = weight.contiguous()
        out, rstd = kernel.rms_norm_fwd(x2, w, float(eps), torch.promote_types(x.dtype, weight.dtype))
        ctx.save_for_backward(x2, w, rstd)
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        from r1fast.kernels import rmsnorm as kernel

        refuse_double_backward("rms_norm (triton)")
        x2, w, rstd = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx, dw = kernel.rms_norm_bwd(_rows(dy), x2, w, rstd, need_dx, need_dw)
        return (dx.view(ctx.x_shape) if dx is not None else None), dw, None


@backends.register("rms_norm", "triton")
def _rms_norm_triton(x, weight, eps):
    if torch.float64 in (x.dtype, weight.dtype):
        return rms_norm_torch(x, weight, eps)
    return _TritonRMSNorm.apply(x, weight, eps)


def rms_norm(x, weight, eps, *, backend=None):
    """RMSNorm over the last dimension of x [..., H] with weight [H], as the decoder (and transformers'
    Llama/Qwen2/Qwen3 RMSNorm) computes it: normalise in fp32, round to x's dtype, multiply by weight."""
    _validate_rms_norm(x, weight, eps)
    _, fn = backends.resolve("rms_norm", x.device, backend)
    return fn(*resolve_neg(x, weight), eps)


# ---------------------------------------------------------------- add_rms_norm


def _validate_add_rms_norm(x, residual, weight, eps):
    _validate_rms_norm(x, weight, eps, op="add_rms_norm")  # its errors named rms_norm, which the caller never called
    _check_tensor("add_rms_norm", "residual", residual)
    if residual.shape != x.shape or residual.device != x.device:
        raise ValueError(f"add_rms_norm: residual must match x's shape and device: got "
                         f"{tuple(residual.shape)} {residual.device} for x {tuple(x.shape)} {x.device}")


@backends.register("add_rms_norm", "reference")
def _add_rms_norm_reference(x, residual, weight, eps):
    s_dtype = torch.promote_types(x.dtype, residual.dtype)
    s = x.double() + residual.double()
    return (reference.rms_norm(s, weight.double(), eps).to(torch.promote_types(s_dtype, weight.dtype)),
            s.to(s_dtype))


@backends.register("add_rms_norm", "torch")
def add_rms_norm_torch(x, residual, weight, eps):
    s = residual + x  # the decoder's residual add, then its RMSNorm
    return rms_norm_torch(s, weight, eps), s


class _TritonAddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        from r1fast.kernels import rmsnorm as kernel

        w = weight.contiguous()
        out, rstd, s = kernel.rms_norm_fwd(_rows(x), w, float(eps), torch.promote_types(x.dtype, weight.dtype),
                                           residual=_rows(residual))
        ctx.save_for_backward(s, w, rstd)
        ctx.x_shape = x.shape
        # an output nothing reads gets None, not a zero-filled gradient: the model's final norm discards the sum
        ctx.set_materialize_grads(False)
        return out.view(*x.shape[:-1], out.shape[-1]), s.view(x.shape)

    @staticmethod
    def backward(ctx, dy, ds):
        from r1fast.kernels import rmsnorm as kernel

        refuse_double_backward("add_rms_norm (triton)")
        s, w, rstd = ctx.saved_tensors
        if dy is None and ds is None:
            return None, None, None, None
        if dy is None:  # only the sum was read: the norm passes no gradient
            dy = torch.zeros(ctx.x_shape, dtype=torch.promote_types(s.dtype, w.dtype), device=s.device)
        need_dx = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        dx, dw = kernel.rms_norm_bwd(_rows(dy), s, w, rstd, need_dx, ctx.needs_input_grad[2],
                                     ds=_rows(ds) if ds is not None else None)
        dx = dx.view(ctx.x_shape) if dx is not None else None
        return (dx if ctx.needs_input_grad[0] else None), (dx if ctx.needs_input_grad[1] else None), dw, None


@backends.register("add_rms_norm", "triton")
def _add_rms_norm_triton(x, residual, weight, eps):
    # mixed dtypes (under autocast a bf16 sublayer output meets an fp32 stream) take torch's promoting add
    if torch.float64 in (x.dtype, weight.dtype) or residual.dtype != x.dtype:
        return add_rms_norm_torch(x, residual, weight, eps)
    return _TritonAddRMSNorm.apply(x, residual, weight, eps)


def add_rms_norm(x, residual, weight, eps, *, backend=None):
    """(rms_norm(residual + x), residual + x): a decoder's residual add fused into the RMSNorm that
    follows it (x [..., H] a sublayer's output, residual the stream it is added to, one shape; the
    sum takes torch's promoted dtype, and only equal dtypes run fused)."""
    _validate_add_rms_norm(x, residual, weight, eps)
    _, fn = backends.resolve("add_rms_norm", x.device, backend)
    return fn(*resolve_neg(x, residual, weight), eps)


# ---------------------------------------------------------------- swiglu


def _halves(gate_up):
    return gate_up.chunk(2, dim=-1)


@backends.register("swiglu", "reference")
def _swiglu_reference(gate, up):
    if up is None:
        gate, up = _halves(gate)
    return reference.swiglu(gate.double(), up.double()).to(gate.dtype)


@backends.register("swiglu", "torch")
def _swiglu_torch(gate, up):
    if up is None:
        gate, up = _halves(gate)
    return F.silu(gate) * up


class _TritonSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        from r1fast.kernels import swiglu as kernel

        g2, u2 = _rows(gate), _rows(up)
        out = kernel.swiglu_fwd(g2, u2)
        ctx.save_for_backward(g2, u2)
        ctx.shape = gate.shape
        return out.view(gate.shape)

    @staticmethod
    def backward(ctx, dy):
        from r1fast.kernels import swiglu as kernel

        refuse_double_backward("swiglu (triton)")
        g2, u2 = ctx.saved_tensors
        dg, du = kernel.swiglu_bwd(_rows(dy.to(g2.dtype)), g2, u2)
        return dg.view(ctx.shape), du.view(ctx.shape)


class _TritonPackedSwiGLU(torch.autograd.Function):
    """gate and up read as the halves of one [R, 2I] tensor, its gradient written whole: no half is
    copied out in either direction."""

    @staticmethod
    def forward(ctx, gate_up):
        from r1fast.kernels import swiglu as kernel

        x = _rows(gate_up)
        g, u = _halves(x)
        out = kernel.swiglu_fwd(g, u)
        ctx.save_for_backward(x)
        ctx.shape = gate_up.shape
        return out.view(*gate_up.shape[:-1], g.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        from r1fast.kernels import swiglu as kernel

        refuse_double_backward("swiglu (triton)")
        (x,) = ctx.saved_tensors
        g, u = _halves(x)
        d_in = torch.empty_like(x)
        kernel.swiglu_bwd(_rows(dy.to(x.dtype)), g, u, d_in)
        return d_in.view(ctx.shape)


@backends.register("swiglu", "triton")
def _swiglu_triton(gate, up):
    if gate.dtype == torch.float64:
        return _swiglu_torch(gate, up)
    if up is None:
        return _TritonPackedSwiGLU.apply(gate)
    return _TritonSwiGLU.apply(gate, up)


def swiglu(gate, up=None, *, backend=None):
    """silu(gate) * up (the SwiGLU MLP's activation), gate and up of one shape and dtype; or, with one
    argument, a packed gate_up [..., 2I] (gate then up along the last dimension, the output of the
    decoder's fused gate/up projection) -> [..., I]."""
    _validate_swiglu(gate, up)
    _, fn = backends.resolve("swiglu", gate.device, backend)
    return fn(*resolve_neg(gate, up))


# ---------------------------------------------------------------- rotary


def _validate_rotary(q, k, cos, sin):
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        _check_tensor("rotary", name, t)
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"rotary: q and k must be [T, heads, head_dim], got shapes {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    t, _, d = q.shape
    if k.shape[0] != t or k.shape[2] != d:
        raise ValueError(f"rotary: k {tuple(k.shape)} must have q's tokens and head_dim ({t}, {d})")
    if d % 2 or d == 0:
        raise ValueError(f"rotary: head_dim must be even and >= 2 (the halves rotate together), got {d}")
    if cos.shape != (t, d) or sin.shape != (t, d):
        raise ValueError(f"rotary: cos and sin must be [T={t}, head_dim={d}], got {tuple(cos.shape)} and "
                         f"{tuple(sin.shape)}")
    if q.dtype != k.dtype or cos.dtype != sin.dtype:
        raise ValueError(f"rotary: q and k must share a dtype, and cos and sin: got {q.dtype}, {k.dtype}, "
                         f"{cos.dtype}, {sin.dtype}")
    if len({q.device, k.device, cos.device, sin.device}) != 1:
        raise ValueError(f"rotary: q, k, cos and sin must be on one device, got {q.device}, {k.device}, "
                         f"{cos.device}, {sin.device}")


@backends.register("rotary", "reference")
def _rotary_reference(q, k, cos, sin):
    out_dtype = torch.promote_types(q.dtype, cos.dtype)
    c, s = cos.double(), sin.double()
    return (reference.rotary(q.double(), c, s).to(out_dtype), reference.rotary(k.double(), c, s).to(out_dtype))


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@backends.register("rotary", "torch")
def rotary_torch(q, k, cos, sin):
    # transformers' apply_rotary_pos_emb, as the decoder has always computed it
    cos, sin = cos[:, None, :], sin[:, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


class _TritonRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        from r1fast.kernels import rotary as kernel

        cos, sin = _last_dim_contiguous(cos), _last_dim_contiguous(sin)
        ctx.save_for_backward(cos, sin)
        ctx.dtype, ctx.shapes = q.dtype, (q.shape, k.shape)
        return kernel.rotary(_last_dim_contiguous(q), _last_dim_contiguous(k), cos, sin,
                             torch.promote_types(q.dtype, cos.dtype))

    @staticmethod
    def backward(ctx, dq, dk):
        from r1fast.kernels import rotary as kernel

        refuse_double_backward("rotary (triton)")
        cos, sin = ctx.saved_tensors
        dq, dk = (torch.zeros(shape, dtype=cos.dtype, device=cos.device) if g is None else _last_dim_contiguous(g)
                  for g, shape in zip((dq, dk), ctx.shapes))
        gq, gk = kernel.rotary(dq, dk, cos, sin, ctx.dtype, backward=True)
        return gq, gk, None, None


@backends.register("rotary", "triton")
def _rotary_triton(q, k, cos, sin):
    if torch.float64 in (q.dtype, cos.dtype) or cos.requires_grad or sin.requires_grad:
        return rotary_torch(q, k, cos, sin)
    return _TritonRotary.apply(q, k, cos, sin)


def rotary(q, k, cos, sin, *, backend=None):
    """(q, k) rotated by each token's angles: q [T, Hq, D], k [T, Hk, D], cos/sin [T, D] (both halves of
    the head dimension; r1fast.models.rotary builds them), as transformers' Llama/Qwen apply them."""
    _validate_rotary(q, k, cos, sin)
    _, fn = backends.resolve("rotary", q.device, backend)
    return fn(*resolve_neg(q, k, cos, sin))
