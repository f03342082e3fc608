"""The FP8 switch's option values, validated in one place so every entry point says the same thing."""
from __future__ import annotations

from dataclasses import dataclass

import torch

# "auto": "te" where Transformer Engine can run, else "torch" on an FP8 GPU, else "off" (silently).
MODES = ("off", "emulate", "torch", "te", "auto")
# Transformer Engine recipes: "current" = per-tensor scale from this step's amax (TE's
# Float8CurrentScaling), "delayed" = scale from an amax history (DelayedScaling), "block" = 1x128 /
# 128x128 block scales (Float8BlockScaling, Hopper+), "mxfp8" = 32-element E8M0 blocks (Blackwell).
RECIPES = ("current", "delayed", "block", "mxfp8")
GRAD_DTYPES = ("e5m2", "e4m3")
# Scaling granularity of our own path ("torch" / "emulate"): one scale per row of each GEMM operand
# (along the non-reduced dimension) or one per tensor.
SCALINGS = ("rowwise", "tensorwise")

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class Fp8Options:
    mode: str
    recipe: str | None = None      # "te" only
    grad_dtype: str = "e5m2"
    scaling: str | None = None     # "torch" / "emulate" only

    @property
    def rowwise(self) -> bool:
        return self.scaling == "rowwise"


def _check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"fp8 {name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


def make_options(mode, recipe=None, grad_dtype="e5m2", scaling=None) -> Fp8Options:
    """Validate the FP8 options and fill the defaults that depend on the mode."""
    if mode is None or mode is False:
        mode = "off"
    _check_choice("mode", mode, MODES)
    _check_choice("grad_dtype", grad_dtype, GRAD_DTYPES)
    if recipe is not None:
        _check_choice("recipe", recipe, RECIPES)
    if scaling is not None:
        _check_choice("scaling", scaling, SCALINGS)
    if mode == "off":  # nothing runs in FP8: the other options are moot (switching off is one override)
        return Fp8Options("off", None, grad_dtype, None)
    if mode == "auto":
        # recipe and scaling both stay as given: each applies if its path is the one chosen
        return Fp8Options("auto", recipe, grad_dtype, scaling)
    if mode == "te":
        if scaling is not None:
            raise ValueError(
                f"fp8 scaling={scaling!r} applies to the 'torch' and 'emulate' modes; with mode='te' the "
                f"scaling granularity is set by recipe= ({', '.join(RECIPES)})"
            )
        return Fp8Options(mode, recipe or "current", grad_dtype, None)
    if recipe is not None:
        raise ValueError(
            f"fp8 recipe={recipe!r} applies to mode='te' only (Transformer Engine); mode={mode!r} uses "
            f"scaling= ({', '.join(SCALINGS)}) instead"
        )
    return Fp8Options(mode, None, grad_dtype, scaling or "rowwise")


def as_options(fp8, recipe=None, grad_dtype="e5m2", scaling=None) -> Fp8Options:
    """`fp8` as validated Fp8Options: a mode with the other options as keywords, or an Fp8Options
    (from make_options, or built by hand: checked again) with no keywords beside it."""
    if isinstance(fp8, Fp8Options):
        if recipe is not None or scaling is not None or grad_dtype != "e5m2":
            raise ValueError("fp8: pass either an Fp8Options or a mode with recipe/grad_dtype/scaling, not both")
        return make_options(fp8.mode, fp8.recipe, fp8.grad_dtype, fp8.scaling)
    return make_options(fp8, recipe, grad_dtype, scaling)
