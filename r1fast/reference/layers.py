"""Plain-torch oracles for the decoder's elementwise layers, computed in the dtype given (float64 in,
float64 out): the test oracle for ops.rms_norm, ops.swiglu and ops.rotary."""
import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2 over the last dim) + eps) * weight."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up = gate * sigmoid(gate) * up."""
    return gate * torch.sigmoid(gate) * up


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated pairwise (i, i + D/2) by each token's angles: with halves x1, x2 of x
    and c1, c2, s1, s2 of cos, sin [T, D]: (x1 * c1 - x2 * s1, x2 * c2 + x1 * s2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c[..., :half] - x2 * s[..., :half], x2 * c[..., half:] + x1 * s[..., half:]), dim=-1)
