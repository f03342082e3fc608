"""Input checks shared by the ops."""
from __future__ import annotations

import numpy as np
import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def require_tensors(op: str, **named) -> None:
    """A TypeError naming the first of `named` that is not a tensor, before any is read as one; then dense()."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    dense(op, **named)


def flags(op: str, **named) -> tuple[bool, ...]:
    """`named`'s values as plain bools, in order; a TypeError naming the first that is not True or False. Read as
    truthy, the string 'no' turned a flag on (grouped_logprob(return_entropy='no') returned a tuple,
    store_kv(check_slots='') skipped the bounds check), and a 0-d tensor was a host sync per call. A numpy bool
    (np.True_, e.g. a flag read off an array) is unambiguous and comes back as the bool it holds."""
    for name, value in named.items():
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{op}: {name} must be True or False, got {value!r}")
    return tuple(bool(value) for value in named.values())


def cuda_tensors(op: str, device: torch.device) -> None:
    """A ValueError naming the op when its r1fast._C CUDA kernel (reachable as torch.ops.r1fast.<op>_cuda) is
    handed tensors on another device: torch.cuda.device() refused them with "Expected a cuda device, but got:
    cpu", naming neither the op nor the tensors."""
    if device.type != "cuda":
        raise ValueError(f"{op}: the cuda kernel (torch.ops.r1fast.{op}_cuda) takes CUDA tensors, got tensors on "
                         f"{device}; call r1fast.ops.{op}, which picks a backend for them")


def dense(op: str, **named) -> None:
    """A TypeError naming the first tensor of `named` (None and non-tensors skipped) that is not dense (strided):
    a sparse one failed deep inside with torch's "Could not run 'aten::...' with arguments from the 'SparseCPU'
    backend" or "reshape is not implemented for sparse tensors"."""
    for name, t in named.items():
        if isinstance(t, torch.Tensor) and t.layout != torch.strided:
            raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got layout {t.layout}; pass "
                            f"{name}.to_dense()")


def one_device(op: str, tensors) -> None:
    """A ValueError naming the devices when `tensors` (None entries skipped) are not all on one."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")


def bool_mask(op: str, mask, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """`mask` as a bool tensor, after checking it is a tensor of `like`'s shape and device holding only
    0 and 1 (a 2 would weight its element twice in one backend and once in another)."""
    require_tensors(op, mask=mask)
    if mask.shape != like.shape:
        raise ValueError(f"{op}: mask shape {tuple(mask.shape)} != {like_name} shape {tuple(like.shape)}")
    if mask.device != like.device:
        raise ValueError(f"{op}: mask is on {mask.device}, {like_name} on {like.device}")
    readable(op, mask, "the mask (the rows or tokens it keeps)")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{op}: mask must be bool or hold only 0 and 1")
    return mask != 0


def kind_of(t) -> str:
    """What a refused argument is, for an error message: its dtype for a tensor, else its type's name."""
    return str(t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__


def readable(op: str, t: torch.Tensor, reads: str) -> None:
    """A ValueError before `reads` (a bounds or finiteness check, a copy) reads the values of `t` (the op's
    tensors share its device, one_device) when it lives on the meta device, which holds none: torch's own error,
    'Tensor.item() cannot be called on meta tensors', named neither the op nor the check."""
    if t.is_meta:
        raise ValueError(f"{op}: the tensors are on the meta device, which holds shapes but no values, and {reads} "
                         f"reads them: pass tensors on the CPU or a GPU")


def resolve_neg(*tensors):
    """Each tensor with its lazy negation applied: a negated copy of one carrying torch's neg bit (the .imag of a
    conjugated complex tensor is such a view), the tensor itself otherwise (None and non-tensors pass). The
    Triton and C++ kernels read the memory, which holds the values unnegated: their results were silently wrong.
    Tensor.resolve_neg() returns the tensor itself when its bit is clear, and torch.compile traces it; asking
    is_neg() first was a graph break (dynamo does not trace it) at every op of a compiled model."""
    return tuple(t.resolve_neg() if isinstance(t, torch.Tensor) else t for t in tensors)
