"""Access to the compiled extension r1fast._C, with a clear message when it is missing."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def load():
    """The r1fast._C module, or None when the package was not built (e.g. a plain source checkout)."""
    try:
        from r1fast import _C
    except ImportError:
        return None
    return _C


def require():
    ext = load()
    if ext is None:
        raise RuntimeError(
            "r1fast._C is not built: install the package with `pip install -e .` (needs cmake, ninja, pybind11)"
        )
    return ext


def build_info() -> dict:
    ext = load()
    if ext is None:
        return {"built": False, "with_cuda": False, "cuda_archs": "", "cuda_version": "", "cxx": ""}
    return {"built": True, **ext.build_info()}


@functools.lru_cache(maxsize=None)
def cuda_kernels_usable() -> bool:
    """True when the extension has CUDA kernels and a CUDA device is usable from torch and from the
    extension's own (static) CUDA runtime, which can need a newer driver than torch's."""
    import torch

    info = build_info()
    if not (info["with_cuda"] and torch.cuda.is_available()):
        return False
    try:
        return load().cuda_device_count() > 0
    except RuntimeError:
        return False
