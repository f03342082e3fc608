"""r1fast: a GRPO engine built around fused Triton and CUDA kernels.

Heavy submodules load on first use, so `import r1fast` stays cheap and a missing optional
dependency only matters to the part that needs it.
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = {"ops", "models", "rollout", "rewards", "data", "trainer", "reference", "kernels", "bench", "fp8"}
_LAZY_NAMES = {"GRPOConfig": "r1fast.trainer", "GRPOTrainer": "r1fast.trainer"}


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"r1fast.{name}")
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    raise AttributeError(f"module 'r1fast' has no attribute {name!r}")


__all__ = ["__version__", "GRPOConfig", "GRPOTrainer", *sorted(_SUBMODULES)]
