"""Access to the compiled extension r1fast._C, with a clear message when it is missing."""
from __future__ import annotations

import functools
import importlib.util

_load_error: str | None = None  # why a built r1fast._C does not import here (None: it loaded, or is not built)


@functools.lru_cache(maxsize=None)
def load():
    """The r1fast._C module, or None when the package was not built (e.g. a plain source checkout) or
    its build does not load here (see load_error())."""
    global _load_error
    try:
        from r1fast import _C
    except ImportError as e:
        if importlib.util.find_spec("r1fast._C") is not None:  # e.g. a libstdc++ older than the build's
            _load_error = f"{type(e).__name__}: {e}"
        return None
    return _C


def load_error() -> str | None:
    """Why r1fast._C is present but fails to import, or None."""
    load()
    return _load_error


def require():
    ext = load()
    if ext is None:
        if load_error():
            raise RuntimeError(f"r1fast._C is built but does not load ({_load_error}); rebuild it in this "
                               "environment: `pip install -e .`")
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
