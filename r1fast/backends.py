"""Backend dispatch: every op has up to four implementations, picked per call.

    reference  plain torch, materialises everything, float64-capable: the test oracle
    torch      memory-safe (chunked) torch: the CPU path
    triton     Triton kernels: the GPU fast path (on CPU only under TRITON_INTERPRET=1)
    cuda       kernels in r1fast._C

Choice order: the `backend=` argument, else the R1FAST_BACKEND environment variable, else the
fastest available one for the tensors' device (cuda > triton > torch > reference on a GPU,
torch > reference on the CPU). Asking for an unknown or unavailable backend is a ValueError that
lists what this op can use here. R1FAST_BACKEND is process-wide, so an op that has no
implementation of that backend at all (e.g. prefill attention under R1FAST_BACKEND=triton) keeps
its default instead of failing; one that has it but cannot run it here is still an error.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable

import torch

BACKENDS = ("reference", "torch", "triton", "cuda")
_GPU_ORDER = ("cuda", "triton", "torch", "reference")
_CPU_ORDER = ("torch", "reference")

_REGISTRY: dict[str, dict[str, Callable]] = {}
# Ops whose Triton kernels multiply with tl.dot, which the Triton interpreter gets wrong for bfloat16
# (errors ~1e10 on Triton 3.6 and 3.9; float16 and float32 are exact): refused there, not run.
_INTERPRETER_BF16_DOT_OPS = ("grouped_logprob", "paged_decode_attention")
# Ops whose Triton kernels have no float64 path (tl.dot, or fp32 softmax state): float64 inputs
# default past Triton; asked for by name, the op raises its own error.
_NO_FLOAT64_TRITON_OPS = ("grouped_logprob", "grpo_loss", "paged_decode_attention")


def takes_dtype(op: str, backend: str, dtype: torch.dtype | None) -> bool:
    """Whether `backend`'s kernel for `op` has a path for inputs of `dtype`."""
    return not (backend == "triton" and dtype == torch.float64 and op in _NO_FLOAT64_TRITON_OPS)


def register(op: str, backend: str):
    """Decorator: register `fn` as `op`'s implementation for `backend`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; backends are {BACKENDS}")

    def deco(fn):
        _REGISTRY.setdefault(op, {})[backend] = fn
        return fn

    return deco


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def poisoned(t: torch.Tensor, value=float("nan")) -> torch.Tensor:
    """A kernel's output buffer: filled with `value` under the Triton interpreter (the tests), so an
    element the kernel fails to write shows; left as is when compiled, where the fill is a wasted pass."""
    if triton_interpreted():
        t.fill_(value)
    return t


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def backend_available(backend: str, device: torch.device) -> tuple[bool, str]:
    """(usable, reason-if-not) for `backend` on tensors living on `device`."""
    if backend in ("reference", "torch"):
        return True, ""
    if backend == "triton":
        if not triton_importable():
            return False, "triton is not installed"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
            return True, ""
        return False, "triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1"
    if backend == "cuda":
        from r1fast import _ext

        info = _ext.build_info()
        if not info["built"]:
            return False, info["problem"]
        if not info["with_cuda"]:
            return False, "r1fast._C was built without CUDA"
        if device.type != "cuda":
            return False, "the cuda backend needs CUDA tensors"
        if not _ext.cuda_kernels_usable():
            return False, ("r1fast._C's CUDA runtime sees no device (a driver older than the CUDA it was built "
                           "with?): `r1fast info` shows both")
        return True, ""
    return False, f"unknown backend {backend!r}"


def check_environment() -> None:
    """A ValueError where R1FAST_BACKEND names no backend. Each op call says so too, but only once the model has
    loaded (minutes, for a large one): the trainers ask this first. Whether the backend runs here is each op's
    question (an op without it keeps its default), so only the name is checked."""
    value = os.environ.get("R1FAST_BACKEND") or None
    if value is not None and value not in BACKENDS:
        raise ValueError(f"R1FAST_BACKEND={value!r} is not a backend; backends are {', '.join(BACKENDS)} "
                         f"(unset it for each op's fastest)")


def implementations(op: str) -> dict[str, Callable]:
    if op not in _REGISTRY:
        raise KeyError(f"no op named {op!r} is registered; ops: {sorted(_REGISTRY)}")
    return _REGISTRY[op]


def available(op: str, device: torch.device | str) -> list[str]:
    device = torch.device(device)
    return [b for b in BACKENDS if b in implementations(op) and backend_available(b, device)[0]]


def resolve(op: str, device: torch.device | str, backend: str | None = None, *,
            dtype: torch.dtype | None = None, accepts: Callable[[str], bool] | None = None) -> tuple[str, Callable]:
    """The (backend name, function) to run `op` on `device` (with inputs of `dtype`, where that matters).
    The default passes over a backend whose kernel lacks a path for `dtype` (takes_dtype) or that
    `accepts(name)` says cannot take these particular inputs (e.g. a shape); a backend asked for by
    name that lacks a path for `dtype` is an error, and one `accepts` refuses runs and raises its own."""
    device = torch.device(device)
    impls = implementations(op)
    requested, source = backend, "backend="
    if requested is None:
        requested, source = os.environ.get("R1FAST_BACKEND") or None, "R1FAST_BACKEND="
        if requested in BACKENDS and requested not in impls:
            requested = None  # this op has no such implementation: the override is not about it
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"{op}: {source}{requested!r} is not a backend; backends are {', '.join(BACKENDS)}")
        ok, why = (True, "") if requested in impls else (False, f"{op} has no {requested} implementation")
        if ok:
            ok, why = backend_available(requested, device)
        if not ok:
            raise ValueError(
                f"{op}: backend {requested!r} ({source}{requested}) is unavailable on {device.type}: {why}; "
                f"available: {', '.join(available(op, device)) or 'none'}"
            )
        # asked for by the environment, the error names it: the call itself passed no backend, and the default
        # would have passed over this one
        by_env = "" if source == "backend=" else f", or unset R1FAST_BACKEND={requested}"
        if not takes_dtype(op, requested, dtype):  # else the kernel would run at fp32 precision without a word
            raise ValueError(f"{op}: the {requested} backend takes fp16/bf16/fp32 inputs, got {dtype} "
                             f"(use backend='torch' or 'reference'{by_env})")
        if requested == "triton" and device.type == "cpu" and dtype == torch.bfloat16 and op in _INTERPRETER_BF16_DOT_OPS:
            raise ValueError(f"{op}: the Triton interpreter (TRITON_INTERPRET=1) computes bfloat16 matrix products "
                             f"wrongly; on the CPU use float32 or float16 inputs, or backend='torch'{by_env}")
        return requested, impls[requested]
    b = default(op, device, lambda name: takes_dtype(op, name, dtype) and (accepts is None or accepts(name)))
    if b is None:
        usable = available(op, device)
        if usable:
            raise ValueError(f"{op}: none of the backends usable on {device.type} ({', '.join(usable)}) takes "
                             f"these inputs")
        raise ValueError(f"{op}: no implementation is available on {device.type}; registered: {sorted(impls)}")
    return b, impls[b]


def default(op: str, device: torch.device | str, accepts: Callable[[str], bool] | None = None) -> str | None:
    """The backend `op` runs on `device` when nothing is requested (None if none is usable)."""
    device = torch.device(device)
    impls = implementations(op)
    # first usable in preference order, checked lazily: resolve() runs per layer per decode step
    return next((b for b in (_GPU_ORDER if device.type == "cuda" else _CPU_ORDER)
                 if b in impls and backend_available(b, device)[0] and (accepts is None or accepts(b))), None)


def ops() -> list[str]:
    """Every registered op's name."""
    return sorted(_REGISTRY)


def canonical_device(device: torch.device | str) -> torch.device:
    """`device` with an unnamed index read as the default one: torch.device("cuda") != torch.device("cuda:0") in
    torch, though a tensor made on "cuda" says cuda:0; a CPU has one device, whatever index is written."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if device.type == "cpu" else device


def on_device(device: torch.device | str):
    """Make `device` current for a kernel launch (Triton launches on the current CUDA device, so a
    tensor on cuda:1 under cuda:0 would fault); a no-op on the CPU / under the interpreter."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def without_autocast(device: torch.device | str):
    """Autocast off for `device`: the loss ops promise fp32 accumulation and fp32 results, which an
    enclosing torch.autocast would lower to bf16/fp16 matmuls (a 1e-1 error in the log-probs)."""
    device = torch.device(device)
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know: nothing to turn off
        return contextlib.nullcontext()
