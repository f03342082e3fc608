"""ops.group_advantages and ops.kl_penalty (LOSS_SPEC.md: Advantages, kl).

Both are O(B) / O(B*T) elementwise work; the reference twin lives in r1fast.reference.loss.
group_advantages also has a triton backend (kernels/advantages.py: one launch, the default on a GPU,
where the torch code launches several small kernels); kl_penalty is torch everywhere.
"""
from __future__ import annotations

import math

import torch

from r1fast import backends
from r1fast.ops.checks import bool_mask, dense, kind_of, readable, require_tensors, resolve_neg
from r1fast.reference import loss as reference

ESTIMATORS = ("grpo", "rloo")
SCALES = ("group", "batch", "none")


@backends.register("group_advantages", "reference")
def _advantages_reference(rewards, group_size, estimator, scale_rewards, eps, mask):
    return reference.group_advantages(rewards.double(), group_size, estimator, scale_rewards, eps, mask)


@backends.register("group_advantages", "torch")
def _advantages_torch(rewards, group_size, estimator, scale_rewards, eps, mask):
    return reference.group_advantages(rewards.float(), group_size, estimator, scale_rewards, eps, mask).float()


@backends.register("group_advantages", "triton")
def _advantages_triton(rewards, group_size, estimator, scale_rewards, eps, mask):
    from r1fast.kernels import advantages as kernel

    # fp32 in and out, as the torch backend: float64 rewards are rounded once on the way in.
    return kernel.group_advantages(rewards.float().contiguous(), group_size, estimator, scale_rewards, eps,
                                   mask=None if mask is None else mask.contiguous())


def group_advantages(rewards, group_size, *, estimator="grpo", scale_rewards="group", eps=1e-4, mask=None,
                     backend=None):
    """Advantages [B] fp32 for rewards [B] laid out as B/G consecutive groups of G completions of one prompt.

    `mask` (bool [B], optional): True where a row has a reward. A row without one gets A = 0 and is left
    out of every statistic (its group's mean and std, the batch std, rloo's G); its reward may be NaN.
    A group with fewer than two scored rows has no baseline: all its advantages are 0. The advantages carry
    no gradient (GRPO treats them as constants; grpo_loss detaches them too), on every backend."""
    require_tensors("group_advantages", rewards=rewards)
    if rewards.dim() != 1:
        raise ValueError(f"group_advantages: rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise TypeError(f"group_advantages: rewards must be a float tensor, got {rewards.dtype}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_advantages: group_size must be an int >= 2 (a group needs a baseline), got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"group_advantages: batch size {rewards.numel()} is not divisible by group_size {group_size}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"group_advantages: estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if scale_rewards not in SCALES:
        raise ValueError(f"group_advantages: scale_rewards must be one of {SCALES}, got {scale_rewards!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise ValueError(f"group_advantages: eps must be a finite number >= 0, got {eps!r}")
    if mask is not None:
        mask = _check_mask(mask, rewards)
    readable("group_advantages", rewards, "the check that rewards are finite")
    # the backends compute in float32: a float64 reward past its range would turn every advantage NaN
    as_fp32 = rewards.float()
    if not _sum_is_finite(as_fp32, mask):
        finite = torch.isfinite(as_fp32) if mask is None else torch.isfinite(as_fp32) | ~mask
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()[:8]
            raise ValueError(f"group_advantages: rewards contain NaN/inf (or values beyond float32's range) at "
                             f"rows {bad} (pass mask=, False at the rows that have no reward, to leave them out)")
    _, fn = backends.resolve("group_advantages", rewards.device, backend)
    # rewards that require grad made the reference/torch advantages differentiable and triton's not
    (rewards,) = resolve_neg(rewards.detach())
    return fn(rewards, group_size, estimator, scale_rewards, eps, mask).float()


def _sum_is_finite(rewards, mask) -> bool:
    """Whether the sum of the (scored) rewards is finite, read from the device once: it is unless a reward is
    NaN/inf (or they are so large that the sum overflows, a false alarm the exact check then clears). One
    reduction: the exact check (isfinite, all) was five launches on a GPU, for an op that is one launch."""
    total = rewards.sum() if mask is None else torch.where(mask, rewards, 0.0).sum()
    return math.isfinite(total.item())


def _check_mask(mask, rewards):
    """mask as a bool [B] tensor on the rewards' device, or None when it keeps every row."""
    mask = bool_mask("group_advantages", mask, rewards, "rewards")
    return None if bool(mask.all()) else mask


KL_KINDS = ("k1", "k2", "k3")


def kl_penalty(logp, ref_logp, kind="k3"):
    """Per-token KL estimate of KL(pi || pi_ref) from log-probs: k1 = logp - ref, k2 = ½(logp - ref)², k3 (default)."""
    for name, t in (("logp", logp), ("ref_logp", ref_logp)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"kl_penalty: {name} must be a float tensor, got {kind_of(t)}")
    dense("kl_penalty", logp=logp, ref_logp=ref_logp)
    if logp.shape != ref_logp.shape:
        raise ValueError(f"kl_penalty: logp shape {tuple(logp.shape)} != ref_logp shape {tuple(ref_logp.shape)}")
    if logp.device != ref_logp.device:
        raise ValueError(f"kl_penalty: logp and ref_logp must be on one device, got {logp.device} and {ref_logp.device}")
    if kind not in KL_KINDS:
        raise ValueError(f"kl_penalty: kind must be one of {KL_KINDS}, got {kind!r}")
    dt = torch.promote_types(torch.promote_types(logp.dtype, ref_logp.dtype), torch.float32)
    return reference.kl_penalty(logp.to(dt), ref_logp.to(dt), kind)
