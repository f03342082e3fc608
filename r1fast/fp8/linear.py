"""`Fp8Linear`: an nn.Linear whose three GEMMs run in FP8 ("emulate" or "torch" path).

    forward  y  = x  @ W^T    x: E4M3 (scale per token),        W: E4M3 (scale per output feature)
    dgrad    dx = dy @ W      dy: grad dtype (scale per token), W: E4M3 (scale per input feature)
    wgrad    dW = dy^T @ x    dy: grad dtype (per output feature), x: E4M3 (per input feature)

(tensorwise: one scale per operand instead.) Each operand is quantised along the dimension its GEMM
reduces over, from the high-precision tensors saved by forward, so the backward GEMMs never see a
value quantised twice. The gradient is always the GEMM's first operand: _scaled_mm's rowwise kernel
takes E5M2 only there. Master weights, bias and their gradients stay in the parameters' dtype.
"""
from __future__ import annotations

import contextlib
import functools
import threading

import torch
import torch.nn.functional as F
from torch import nn

from r1fast.fp8.gemm import IMPLS, fp8_gemm_nt
from r1fast.fp8.options import FP8_DTYPES, GRAD_DTYPES, SCALINGS

E4M3 = torch.float8_e4m3fn


_state = threading.local()


def fp8_enabled() -> bool:
    return not getattr(_state, "disabled", False)


@contextlib.contextmanager
def fp8_disabled():
    """Within this block FP8 layers compute in their parameters' precision (e.g. for decoding in
    the rollout engine, where the GEMMs are too thin for FP8 to pay, or for a high-precision eval)."""
    prev = getattr(_state, "disabled", False)
    _state.disabled = True
    try:
        yield
    finally:
        _state.disabled = prev


DOUBLE_BACKWARD_ERROR = (
    "fp8_linear: differentiating an FP8 layer's gradients (a second backward through a create_graph=True "
    "gradient, e.g. a gradient penalty) is not supported: its backward GEMMs quantise and record no graph, "
    "so the result would silently miss that term. Compute it with the layers in high precision, inside "
    "`with r1fast.fp8.fp8_disabled():`")


class _RaiseOnDoubleBackward(torch.autograd.Function):
    """Passes one gradient through; backward through it raises DOUBLE_BACKWARD_ERROR. The tensors it
    depends on are inputs only so that the output is part of the graph exactly when they are."""

    @staticmethod
    def forward(ctx, grad, *depends_on):
        return grad.clone()

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)


def _guard_double_backward(grad, *depends_on):
    # Under create_graph=True (grad mode on in backward) the FP8 GEMMs' results would be taken as
    # constants: a later backward through them must fail, not return a gradient lacking their term.
    if grad is None or not torch.is_grad_enabled() or not any(t.requires_grad for t in depends_on):
        return grad
    return _RaiseOnDoubleBackward.apply(grad, *depends_on)


class _Fp8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, impl, grad_dtype, rowwise, out_dtype):
        x2 = x.reshape(-1, x.shape[-1])
        y = fp8_gemm_nt(x2, E4M3, weight, E4M3, rowwise=rowwise, out_dtype=out_dtype, impl=impl, fast_accum=True)
        if bias is not None:
            y = y + bias.to(y.dtype)
        ctx.save_for_backward(x2, weight)
        ctx.cfg = (impl, grad_dtype, rowwise, bias is not None, x.shape, bias.dtype if bias is not None else None)
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight = ctx.saved_tensors
        impl, grad_dtype, rowwise, has_bias, x_shape, bias_dtype = ctx.cfg
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = fp8_gemm_nt(dy2, grad_dtype, weight.t(), E4M3, rowwise=rowwise, out_dtype=x2.dtype, impl=impl)
            dx = _guard_double_backward(dx.reshape(x_shape), dy2, weight)
        if ctx.needs_input_grad[1]:
            dw = fp8_gemm_nt(dy2.t(), grad_dtype, x2.t(), E4M3, rowwise=rowwise, out_dtype=weight.dtype, impl=impl)
            dw = _guard_double_backward(dw, dy2, x2)
        if has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0, dtype=torch.float32).to(bias_dtype)  # fp32 sums, without an fp32 copy of dy
        return dx, dw, db, None, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               impl: str = "emulate", grad_dtype: str = "e5m2", scaling: str = "rowwise") -> torch.Tensor:
    """F.linear(x, weight, bias) with FP8 GEMMs in forward and backward."""
    if impl not in IMPLS:
        raise ValueError(f"fp8_linear: impl must be one of {IMPLS}, got {impl!r}")
    if grad_dtype not in GRAD_DTYPES:
        raise ValueError(f"fp8_linear: grad_dtype must be one of {GRAD_DTYPES}, got {grad_dtype!r}")
    if scaling not in SCALINGS:
        raise ValueError(f"fp8_linear: scaling must be one of {SCALINGS}, got {scaling!r}")
    if weight.dim() != 2:
        raise ValueError(f"fp8_linear: weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"fp8_linear: x's last dimension must equal weight's in_features {weight.shape[1]}, got x shape {tuple(x.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"fp8_linear: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not (x.is_floating_point() and weight.is_floating_point()):
        raise TypeError(f"fp8_linear: x and weight must be floating point, got {x.dtype} and {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"fp8_linear: x is on {x.device} but weight is on {weight.device}")
    if impl == "torch" and (weight.shape[0] % 16 or weight.shape[1] % 16):
        raise ValueError(f"fp8_linear: impl='torch' (torch._scaled_mm) needs both weight dimensions to be multiples "
                         f"of 16, got {tuple(weight.shape)}; apply_fp8 keeps such layers in high precision")
    if impl == "torch":
        _check_torch_path(x.device, scaling, grad_dtype)
    # Like nn.Linear, the output takes the autocast dtype when autocast is on, else the input's dtype.
    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    return _Fp8LinearFunction.apply(x, weight, bias, impl, FP8_DTYPES[grad_dtype], scaling == "rowwise", out_dtype)


@functools.lru_cache(maxsize=None)
def _torch_path_on(device: torch.device, scaling: str, grad_dtype: str) -> tuple[bool, str]:
    from r1fast.fp8.support import torch_path

    return torch_path(device, scaling, grad_dtype)


def _check_torch_path(device: torch.device, scaling: str, grad_dtype: str):
    """A model converted where _scaled_mm runs and then moved where it does not (e.g. to an A100)
    would fail deep inside _scaled_mm: name the cause instead (cached per device: no per-call cost)."""
    ok, why = _torch_path_on(device, scaling, grad_dtype)
    if not ok:
        raise RuntimeError(f"fp8_linear: impl='torch' cannot run on {device}: {why}; convert the model where it "
                           f"will run (apply_fp8 falls back to high precision there) or use fp8='emulate'")


class Fp8Linear(nn.Linear):
    """A linear layer computing its GEMMs in FP8; holds (shares) the original layer's parameters."""

    fp8_impl: str
    fp8_grad_dtype: str
    fp8_scaling: str

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, impl: str, grad_dtype: str = "e5m2", scaling: str = "rowwise"):
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        # The same Parameter objects: optimizer state, tying and checkpoints keep working.
        new.weight = linear.weight
        new.bias = linear.bias
        new.fp8_impl, new.fp8_grad_dtype, new.fp8_scaling = impl, grad_dtype, scaling
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fp8_enabled():
            return F.linear(x, self.weight, self.bias)
        return fp8_linear(x, self.weight, self.bias, impl=self.fp8_impl, grad_dtype=self.fp8_grad_dtype,
                          scaling=self.fp8_scaling)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, fp8={self.fp8_impl}, scaling={self.fp8_scaling}, "
                f"grad={self.fp8_grad_dtype}")
