"""Rotary position embeddings, computed once per forward for the positions given and shared by all layers.

Numerics follow transformers: inverse frequencies and angles in fp32, cos/sin cast to the
activations' dtype, then x*cos + rotate_half(x)*sin in that dtype. Rope scaling: "linear"
(positions divided by factor) and Llama-3's frequency-dependent scaling.
"""
from __future__ import annotations

import math

import torch

from r1fast.models.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """fp32 [head_dim/2] inverse frequencies on the CPU, with the config's rope scaling applied."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    if scaling["rope_type"] == "llama3":
        return _llama3_scaled(inv_freq, scaling)
    raise ValueError(f"unsupported rope type {scaling['rope_type']!r}")


def _llama3_scaled(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    # Long wavelengths (beyond the original context / low_freq_factor) are slowed by `factor`, short ones
    # (below original / high_freq_factor) kept, and the band between interpolated linearly in 1/wavelength.
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    original = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / lo, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / hi) & (wavelen <= original / lo)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding:
    """cos/sin tables [T, head_dim] for arbitrary positions; the inverse frequencies are cached per device."""

    def __init__(self, config: ModelConfig):
        self._inv_freq_cpu = inverse_frequencies(config)
        self._by_device: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        t = self._by_device.get(device)
        if t is None:
            t = self._by_device[device] = self._inv_freq_cpu.to(device)
        return t

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids.to(torch.float32)[:, None] * self.inv_freq(position_ids.device)[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim], cos/sin [T, head_dim] -> x rotated by each token's angle."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return x * cos + rotate_half(x) * sin
