"""The "te" path: Transformer Engine's Linear, each one running under TE's FP8 autocast.

Entering the autocast per layer (rather than around the whole model) keeps the switch local to
`apply_fp8`: callers run the model as usual. TE wants the token count a multiple of 16 in FP8;
GRPO batches have any length, so rows of zeros pad the input and are sliced off the output (zeros
leave the amax, and therefore the scales, unchanged).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from r1fast.fp8.linear import fp8_enabled
from r1fast.fp8.support import te_module


def make_recipe(recipe: str, grad_dtype: str):
    from transformer_engine.common import recipe as te_recipe

    # HYBRID = E4M3 forward, E5M2 backward; E4M3 = E4M3 everywhere.
    fmt = te_recipe.Format.HYBRID if grad_dtype == "e5m2" else te_recipe.Format.E4M3
    cls_name = {"current": "Float8CurrentScaling", "delayed": "DelayedScaling",
                "block": "Float8BlockScaling", "mxfp8": "MXFP8BlockScaling"}[recipe]
    cls = getattr(te_recipe, cls_name, None)
    if cls is None:
        raise ValueError(f"fp8 recipe={recipe!r}: the installed Transformer Engine has no {cls_name}")
    if recipe == "delayed":
        return cls(fp8_format=fmt, amax_history_len=16, amax_compute_algo="max")
    return cls(fp8_format=fmt)


def _autocast(te, fp8_recipe):
    # TE 2.8 renamed fp8_autocast(enabled, fp8_recipe) to autocast(enabled, recipe).
    if hasattr(te, "autocast"):
        return te.autocast(enabled=True, recipe=fp8_recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=fp8_recipe)


@functools.lru_cache(maxsize=None)
def te_linear_class():
    te = te_module()

    class TeFp8Linear(te.Linear):
        """te.Linear that enters FP8 autocast itself and pads the token count to a multiple of 16."""

        fp8_recipe_name: str

        def forward(self, x: torch.Tensor, *args, **kwargs):
            if not fp8_enabled():
                # TE keeps a bias-free layer's `bias` as an empty tensor, not None.
                bias = self.bias if isinstance(self.bias, torch.Tensor) and self.bias.numel() else None
                return F.linear(x, self.weight, bias)
            lead, k = x.shape[:-1], x.shape[-1]
            x2 = x.reshape(-1, k)
            rows = x2.shape[0]
            pad = (-rows) % 16
            if pad:
                x2 = F.pad(x2, (0, 0, 0, pad))
            with _autocast(te, self._fp8_recipe):
                y = super().forward(x2, *args, **kwargs)
            if isinstance(y, tuple):  # return_bias=True style outputs are not used by r1fast
                y = y[0]
            return y[:rows].reshape(*lead, y.shape[-1])

    return TeFp8Linear


def te_linear_from(linear: nn.Linear, recipe: str, grad_dtype: str) -> nn.Module:
    """A TE linear holding a copy of `linear`'s parameters (same dtype, same device)."""
    cls = te_linear_class()
    w = linear.weight
    new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
              params_dtype=w.dtype, device=w.device)
    with torch.no_grad():
        new.weight.copy_(w)
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    new.weight.requires_grad_(w.requires_grad)
    if linear.bias is not None:  # a frozen bias stays frozen, as a frozen weight does
        new.bias.requires_grad_(linear.bias.requires_grad)
    new._fp8_recipe = make_recipe(recipe, grad_dtype)
    new.fp8_recipe_name = recipe
    new.train(linear.training)
    return new
