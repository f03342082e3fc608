"""Rotary position embeddings, computed once per forward for the positions given and shared by all layers.

Numerics follow transformers: inverse frequencies and angles in fp32, cos/sin cast to the
activations' dtype, then x*cos + rotate_half(x)*sin in that dtype (ops.rotary). Rope scaling: "linear"
(positions divided by factor), "dynamic" (NTK, the default rotation up to max_position_embeddings),
Llama-3's frequency-dependent scaling, and YaRN.
"""
from __future__ import annotations

import math

import torch

from r1fast.backends import canonical_device
from r1fast.models.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """(fp32 [head_dim/2] inverse frequencies on the CPU, factor on cos/sin), rope scaling applied."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq, 1.0
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"], 1.0
    if scaling["rope_type"] == "dynamic":
        return _dynamic_at_max_positions(config, exponents), 1.0
    if scaling["rope_type"] == "llama3":
        return _llama3_scaled(inv_freq, scaling), 1.0
    if scaling["rope_type"] == "yarn":
        return _yarn(dim, config.rope_theta, scaling)
    raise ValueError(f"unsupported rope type {scaling['rope_type']!r}")


def _dynamic_at_max_positions(config: ModelConfig, exponents: torch.Tensor) -> torch.Tensor:
    # Dynamic NTK raises the base with the batch's length past max_position_embeddings; up to it the
    # factor below is 1 (computed as transformers computes it, so the base is bit-equal). Longer
    # batches are refused in CausalLM.forward (ModelConfig.rope_position_limit).
    factor, max_pos, dim = config.rope_scaling["factor"], config.max_position_embeddings, config.head_dim
    base = config.rope_theta * ((factor * max_pos / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** exponents)


def _yarn(dim: int, base: float, s: dict) -> tuple[torch.Tensor, float]:
    # YaRN: dimensions that rotate many times within the original context keep their frequency
    # (extrapolate), those rotating less than once are slowed by `factor` (interpolate), with a
    # linear ramp between, and the attention logits are sharpened by scaling cos/sin.
    factor, original = s["factor"], s["original_max_position_embeddings"]

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def dim_for_rotations(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for_rotations(beta_fast), dim_for_rotations(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    freqs = base ** (torch.arange(0, dim, 2, device="cpu").to(torch.float32) / dim)
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * freqs)) * (1 - extrapolate) + (1.0 / freqs) * extrapolate
    return inv_freq, float(attention_factor)


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
        self._inv_freq_cpu, self.attention_scaling = inverse_frequencies(config)
        self._by_device: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        device = canonical_device(device)
        t = self._by_device.get(device)
        if t is None:
            t = self._by_device[device] = self._inv_freq_cpu.to(device)
        return t

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids.to(torch.float32)[:, None] * self.inv_freq(position_ids.device)[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)
