"""The one seam for the decoder's projection matmuls.

Every attention and MLP projection is an instance of `Linear`, so swapping the matmul (FP8 through
`r1fast.fp8.apply_fp8`, or anything else) means replacing instances of this one class; the embedding
and lm_head stay plain, since the fused log-prob reads the lm_head weight directly.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Linear(nn.Linear):
    """nn.Linear (y = x W^T + b) in the weight's dtype; a subclass only so it can be found and replaced."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)
