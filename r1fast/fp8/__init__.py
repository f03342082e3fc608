"""FP8 matmuls for the policy's linear layers (see docs/fp8.md).

    apply_fp8(model, mode, recipe=None, grad_dtype="e5m2", scaling=None) -> model
    make_options(mode, recipe=None, grad_dtype="e5m2", scaling=None) -> Fp8Options (validated; `fp8=` takes it too)
    available_paths() -> {mode: (usable, why)}
    with fp8_disabled(): ...     # FP8 layers compute in high precision inside the block
"""
from r1fast.fp8.apply import Fp8FallbackWarning, Fp8Report, apply_fp8
from r1fast.fp8.linear import Fp8Linear, fp8_disabled, fp8_enabled, fp8_linear
from r1fast.fp8.options import GRAD_DTYPES, MODES, RECIPES, SCALINGS, Fp8Options, as_options, make_options
from r1fast.fp8.quantization import dequantize, quantize
from r1fast.fp8.support import available_paths

__all__ = [
    "apply_fp8", "available_paths", "fp8_linear", "fp8_disabled", "fp8_enabled", "Fp8Linear", "Fp8FallbackWarning", "Fp8Report", "Fp8Options",
    "make_options", "as_options", "quantize", "dequantize", "MODES", "RECIPES", "GRAD_DTYPES", "SCALINGS",
]
