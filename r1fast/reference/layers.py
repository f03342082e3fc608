"""Plain-torch oracles for the decoder's elementwise layers, computed in the dtype given (float64 in,
float64 out): the test oracle for ops.rms_norm and ops.swiglu."""
import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2 over the last dim) + eps) * weight."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up = gate * sigmoid(gate) * up."""
    return gate * torch.sigmoid(gate) * up
