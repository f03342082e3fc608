"""Triton group advantages (LOSS_SPEC.md, Advantages): one program per block of whole groups.

Rewards [B] are B/G consecutive groups of G. A program loads a [BLOCK_GROUPS, BLOCK_G] tile (one
group per row), centres each row on its mean and scales it as the estimator asks, all in fp32.
The batch std of scale_rewards="batch" is a global reduction: the caller computes it (one torch
reduction, left on the device) and passes a pointer to it, so no second kernel and no host sync.
"""
import torch
import triton
import triton.language as tl

from r1fast.backends import on_device

# MODE constexpr values, one per (estimator, scale_rewards) behaviour.
GRPO_GROUP, GRPO_BATCH, GRPO_NONE, RLOO = 0, 1, 2, 3
# Elements per program: the whole op moves 8·B bytes, so it is launch-bound; a tile this size keeps
# registers low (no spills) while still giving a few programs per SM-worth of work at B=8192.
TILE = 1024
# One group must fit in a tile row held in registers; GRPO groups are 2..64 in practice.
MAX_GROUP = 16384


def mode_of(estimator: str, scale_rewards: str) -> int:
    if estimator == "rloo":
        return RLOO  # rloo's scale is G/(G-1) whatever scale_rewards says (as the reference)
    return {"group": GRPO_GROUP, "batch": GRPO_BATCH, "none": GRPO_NONE}[scale_rewards]


def launch_config(group_size: int) -> dict:
    """BLOCK_GROUPS, BLOCK_G and num_warps for groups of `group_size`: ~32 elements per thread at
    most (a group wider than TILE gets more warps rather than spilling)."""
    block_g = triton.next_power_of_2(group_size)
    return dict(BLOCK_GROUPS=max(1, TILE // block_g), BLOCK_G=block_g, num_warps=min(16, max(4, block_g // 1024)))


@triton.jit
def _group_advantages_kernel(r_ptr, mask_ptr, out_ptr, batch_std_ptr, n_groups, G, eps,
                             MODE: tl.constexpr, HAS_MASK: tl.constexpr,
                             BLOCK_GROUPS: tl.constexpr, BLOCK_G: tl.constexpr):
    groups = tl.program_id(0) * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS)
    cols = tl.arange(0, BLOCK_G)
    row_ok = groups < n_groups
    in_tile = row_ok[:, None] & (cols[None, :] < G)
    # int64 before the multiply: group * G passes 2^31 only at absurd B, but it costs nothing.
    starts = groups.to(tl.int64) * G
    offsets = starts[:, None] + cols[None, :]
    r = tl.load(r_ptr + offsets, mask=in_tile, other=0.0).to(tl.float32)
    # Shift by one of the group's rewards before averaging: a group of identical rewards then centres
    # to exactly 0 (its fp32 sum/G could be an ulp off the value, and ulp/eps is not small), and the
    # variance loses less to cancellation when rewards sit far from 0.
    if HAS_MASK:   # only scored rows count; the shift is the largest of them (0 for a group with none)
        valid = in_tile & (tl.load(mask_ptr + offsets, mask=in_tile, other=0) != 0)
        g_f = tl.sum(valid.to(tl.float32), axis=1)
        first = tl.where(g_f > 0.0, tl.max(tl.where(valid, r, -float("inf")), axis=1), 0.0)
    else:
        valid = in_tile
        g_f = tl.full([BLOCK_GROUPS], G * 1.0, tl.float32)
        first = tl.load(r_ptr + starts, mask=row_ok, other=0.0).to(tl.float32)
    d = tl.where(valid, r - first[:, None], 0.0)
    centred = tl.where(valid, d - (tl.sum(d, axis=1) / tl.maximum(g_f, 1.0))[:, None], 0.0)
    # A scale of 0 (std 0 with eps=0: only a constant group, centred exactly 0) divides by 1 instead:
    # that group gets A = 0, not 0/0.
    if MODE == 0:    # GRPO_GROUP: Bessel-corrected group std
        # squared in units of the group's largest |centred| (a spread past ~1e19 overflows fp32 squares:
        # std inf, A 0)
        peak = tl.max(tl.abs(centred), axis=1)
        unit = tl.where(peak > 0.0, peak, 1.0)
        scaled = centred / unit[:, None]
        scale = unit * tl.sqrt(tl.sum(scaled * scaled, axis=1) / tl.maximum(g_f - 1.0, 1.0)) + eps
        adv = centred / tl.where(scale > 0.0, scale, 1.0)[:, None]
    elif MODE == 1:  # GRPO_BATCH
        scale = tl.load(batch_std_ptr) + eps
        adv = centred / tl.where(scale > 0.0, scale, 1.0)
    elif MODE == 2:  # GRPO_NONE (Dr. GRPO)
        adv = centred
    else:            # RLOO: r - mean of the other G-1 = G/(G-1) · (r - mean); no baseline for G < 2
        adv = centred * tl.where(g_f > 1.0, g_f / tl.maximum(g_f - 1.0, 1.0), 0.0)[:, None]
    # an unscored row's centred is 0 already; where() also keeps a NaN reward out of its output
    tl.store(out_ptr + offsets, tl.where(valid, adv, 0.0), mask=in_tile)


def group_advantages(rewards: torch.Tensor, group_size: int, estimator: str, scale_rewards: str, eps: float,
                     mask: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 advantages [B] of contiguous fp32 rewards [B] (validated by r1fast.ops.group_advantages).
    `mask` (contiguous bool [B]): True where a row has a reward. `out` (fp32 [B], contiguous) receives
    them when given (tests pass a poisoned buffer)."""
    if group_size > MAX_GROUP:
        raise ValueError(f"group_advantages: the triton backend holds a group in registers, group_size "
                         f"{group_size} > {MAX_GROUP}; use backend='torch'")
    n = rewards.numel()
    if out is None:
        out = torch.empty(n, dtype=torch.float32, device=rewards.device)
    if n == 0:
        return out
    mode = mode_of(estimator, scale_rewards)
    # Only read when MODE is GRPO_BATCH; otherwise any fp32 pointer does.
    batch_std = _batch_std(rewards, mask).reshape(1) if mode == GRPO_BATCH else rewards
    cfg = launch_config(group_size)
    n_groups = n // group_size
    grid = (triton.cdiv(n_groups, cfg["BLOCK_GROUPS"]),)
    with on_device(rewards.device):  # Triton launches on the current device: make it the rewards'
        _group_advantages_kernel[grid](rewards, rewards if mask is None else mask, out, batch_std, n_groups,
                                       group_size, float(eps), MODE=mode, HAS_MASK=mask is not None, **cfg)
    return out


def _batch_std(rewards: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Bessel std of the scored rewards, 0 for fewer than two, as torch ops left on the device (no sync).
    Taken about one scored reward (std is shift-invariant), as the kernel centres its groups: rewards
    far from 0 would lose their spread to the fp32 rounding of the mean."""
    if mask is None:
        return (rewards - rewards[:1]).std()
    n = mask.sum()
    first = rewards.gather(0, mask.to(torch.uint8).argmax().reshape(1))  # a device index: no sync
    r = torch.where(mask, rewards - first, 0.0)
    mean = r.sum() / n.clamp(min=1)
    var = torch.where(mask, r - mean, 0.0).square().sum() / (n - 1).clamp(min=1)
    return torch.where(n > 1, var.sqrt(), 0.0)
