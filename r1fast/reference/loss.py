"""Plain-torch oracles for the loss side (LOSS_SPEC.md): obvious code, float64-capable, autograd for gradients.

`logprob` materialises the full [N, V] logits; everything else works on [B, T] per-token tensors.
The `torch` backend of ops.grpo_loss runs `grpo_loss` below in fp32 (the per-token work is O(B*T)).
"""
from __future__ import annotations

import math

import torch

from r1fast.ops.loss_options import LossOptions


def logprob(hidden, weight, targets, temperature=1.0, return_entropy=False, dtype=None, return_argmax_hit=False):
    """logp [N] of targets under softmax(hidden @ weight.T / temperature), computed in `dtype` (default fp32).

    return_entropy adds the entropy [N]; return_argmax_hit adds, last, bool [N]: targets == torch.argmax
    of the logits (a tie goes to the lowest token id, so a target tied with a lower id is a miss)."""
    dtype = dtype or (torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    z = (hidden.to(dtype) @ weight.to(dtype).T) / temperature
    lse = torch.logsumexp(z, dim=-1)
    # log p about the row max m (0 where m is ±inf, as logsumexp): z_t - lse rounds lse to |z|'s ulp first, which
    # in fp32 is all of log p at a peaked row's argmax; (z_t - m) - log Σ exp(z - m) keeps it
    m = z.detach().amax(-1, keepdim=True)
    d = z - torch.where(m.abs() == math.inf, 0.0, m)
    logp = d.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1) - torch.logsumexp(d, dim=-1)
    outs = [logp]
    if return_entropy:
        p = torch.softmax(z, dim=-1)
        outs.append(lse - (p * z).sum(-1))
    if return_argmax_hit:
        outs.append((z.argmax(-1) == targets).detach())
    return outs[0] if len(outs) == 1 else tuple(outs)


def group_advantages(rewards, group_size, estimator="grpo", scale_rewards="group", eps=1e-4, mask=None):
    """Advantages [B] from rewards [B] in consecutive groups of `group_size` (LOSS_SPEC.md, Advantages).

    `mask` [B] bool, True where a row has a reward: the other rows get A = 0 and are left out of every
    statistic (group mean, group and batch std, rloo's G); their rewards may hold anything, NaN too."""
    if mask is not None:
        return _masked_group_advantages(rewards, group_size, estimator, scale_rewards, eps, mask)
    r = rewards.reshape(-1, group_size)
    # Centre on the group's first reward before averaging: a group of identical rewards then centres
    # to exactly 0 (its sum/G can be an ulp off the value, and ulp/eps is not small), as the kernel does.
    d = r - r[:, :1]
    centred = d - d.mean(-1, keepdim=True)
    if estimator == "rloo":
        return (centred * group_size / (group_size - 1)).reshape(-1)
    if scale_rewards == "group":
        centred = centred / _nonzero(d.std(-1, keepdim=True, unbiased=True) + eps)
    elif scale_rewards == "batch":
        centred = centred / _nonzero(shifted_std(rewards) + eps)
    return centred.reshape(-1)


def _masked_group_advantages(rewards, group_size, estimator, scale_rewards, eps, mask):
    m = mask.reshape(-1, group_size)
    n = m.sum(-1, keepdim=True).to(rewards.dtype)
    r = torch.where(m, rewards.reshape(-1, group_size), 0.0)
    # Centre on the group's largest scored reward (the kernel's shift; any member of the group would
    # do): a group of identical scored rewards centres to exactly 0.
    shift = torch.where(m, r, -math.inf).amax(-1, keepdim=True)
    d = torch.where(m, r - torch.where(n > 0, shift, 0.0), 0.0)
    centred = torch.where(m, d - d.sum(-1, keepdim=True) / n.clamp(min=1), 0.0)
    if estimator == "rloo":   # n/(n-1) over the n scored rows; a lone scored row has no baseline: 0
        return (centred * torch.where(n > 1, n / (n - 1).clamp(min=1), 0.0)).reshape(-1)
    if scale_rewards == "group":
        std = (centred.square().sum(-1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
        centred = centred / _nonzero(std + eps)
    elif scale_rewards == "batch":
        scored = rewards.reshape(-1)[mask.reshape(-1)]
        std = shifted_std(scored) if scored.numel() > 1 else torch.zeros((), dtype=rewards.dtype)
        centred = centred / _nonzero(std + eps)
    return centred.reshape(-1)


def shifted_std(x):
    """Bessel std of 1-D x, taken about x[0] (std is shift-invariant): rewards far from 0 (1e6 + noise)
    lose their spread to the fp32 rounding of the mean otherwise (advantages 0.3-1% off at 1e6 + N(0, 1))."""
    return (x - x[:1]).std(unbiased=True)


def _nonzero(scale):
    """std + eps with 0 replaced by 1: only a constant group (centred exactly 0) has std 0, and with
    eps=0 it must get A = 0, not 0/0."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


# k3 = exp(u) - u - 1 = u²·(1/2 + u/6 + u²/24 + ...): the series' coefficients 1/(k+2)!, highest first, to u⁹.
# The terms left out weigh 2·u⁸/10! of the sum: under fp32's rounding below |u| = 0.5, under float64's below
# 0.06, where the formula as written has lost only ~eps/(u²/2) = 1e-13 of it.
K3_SERIES = tuple(1.0 / math.factorial(k + 2) for k in range(7, -1, -1))


def k3_series_below(dtype) -> float:
    return 0.06 if dtype == torch.float64 else 0.5


def _k3(d):
    """exp(d) - d - 1 to the dtype's accuracy. Formed as written it is ~d²/2 left over from exp(d) ≈ 1: in fp32 the
    ~6e-8 rounding of exp swamps it once |d| < 1e-3 (a policy near its reference), and the sum can come out < 0.
    There the series (its autograd gradient, expm1(d), as accurate); elsewhere the formula as written."""
    small = d.abs() < k3_series_below(d.dtype)
    s = torch.where(small, d, 0.0)  # 0 off the small lanes: the series' gradient there must stay finite
    poly = torch.zeros_like(s)
    for c in K3_SERIES:
        poly = poly * s + c
    return torch.where(small, s * s * poly, torch.exp(d) - d - 1.0)


def kl_penalty(logp, ref_logp, kind="k3"):
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    return _k3(ref_logp - logp)


def _exp_no_nan_grad(x):
    """exp(x), inf where it overflows the dtype, with gradient 0 there instead of NaN.

    Past the range (a log-ratio above ~88 in fp32) the clip selects a constant branch (or the loss
    is inf and refused), but autograd's exp backward still multiplies that branch's 0 by exp = inf:
    NaN gradients under a finite loss. The Triton kernel's hand-written gradient has no such term.
    """
    over = x > math.log(torch.finfo(x.dtype).max)
    return torch.where(over, math.inf, torch.exp(torch.where(over, 0.0, x)))


def _weighted(per_tok, weight):
    """per_tok * weight, where a weight of 0 (the TIS mask's, or a caller's importance weight) drops the
    token: a ratio past the dtype's range makes its policy term inf, and inf * 0 would be NaN. A NaN
    term (a NaN input under check_values=False) stays NaN."""
    return torch.where((weight == 0) & ~per_tok.isnan(), 0.0, per_tok * weight)


def _row_mean(x, mask):
    """Σ_t m·x / max(Σ_t m, 1) per row, shape [B, 1]."""
    return (x * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp_min(1.0)


def _active_sum(x, m):
    """Σ m·x over the active tokens only: a masked token's x may be inf (a sequence-level weight or
    bias-corrected KL past the dtype's range reaches the row's padding too), and 0 * inf would be NaN."""
    return torch.where(m > 0, x, 0.0).mul(m).sum()


def _weight_stats(stats, wb, m, denom, n_tok, totals):
    """is_weight/mean|min|max of the per-token weights wb [B, T] over the active tokens."""
    stats["is_weight/mean"] = _active_sum(wb, m) / denom
    if totals is not None:
        stats["is_weight/min"] = torch.where(m > 0, wb, float("inf")).min()
        stats["is_weight/max"] = torch.where(m > 0, wb, float("-inf")).max()
    else:
        # +-inf off the active tokens, not the dtype's max: an active weight may be inf itself (a sequence-level
        # weight past float32), and min(inf, finfo.max) read finfo.max where every other backend reads inf.
        # 0 without active tokens, chosen on the device: `if n_tok > 0` read it on the host, a sync per call
        # that grpo_loss(check_values=False) promises not to make (CUDA graphs, torch.compile)
        has = n_tok > 0
        for name, fill, extreme in (("min", math.inf, torch.amin), ("max", -math.inf, torch.amax)):
            x = torch.where(m > 0, wb, fill)
            stats[f"is_weight/{name}"] = torch.where(has, extreme(x), 0.0) if x.numel() else wb.new_zeros(())


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, opts: LossOptions, entropy=None, sampler_logp=None,
              totals=None, importance_weights=None, row_stats=False):
    """(loss, stats) exactly as LOSS_SPEC.md; all tensors [B, T] except advantages [B]. Computes in logp's dtype.

    `importance_weights` [B, T] (or [B, 1], broadcast over the row): precomputed per-token weights
    (e.g. TRL's vLLM importance-sampling ratio) that multiply the policy term L exactly where the
    truncated-IS factor would (before the KL and the entropy bonus are added), without gradient.
    It replaces sampler_logp's correction: passing both is an error.

    `totals=(rows, tokens[, row_counts])` evaluates one slice of a larger batch: the aggregation and
    the statistics' means use the whole batch's row and active-token counts, so the slices' losses
    and mean statistics add up to the batch's (is_weight/min|max combine by min|max, an empty slice
    giving +-inf; num_tokens is the slice's own count). `row_counts` [B] (the full rows' active
    token counts) lets a slice hold only part of a row's tokens; only valid with token-level ratios.

    `opts.use_bias_correction_kl` multiplies the KL by exp(lw) (lw before the delta clip, with its
    gradient) in the loss and in the `kl` statistic.

    `row_stats=True` adds `rows/clip_low` and `rows/clip_high` [B]: each row's count of active tokens
    clipped low / high (the tokens clip_ratio/low_mean and high_mean count; cispo's are high only).
    """
    dt = logp.dtype
    m = mask.to(dt)
    # advantages are given numbers too (the Triton kernel and the fused single pass form no gradient
    # for them): detached, so no backend sends the policy loss's gradient into whatever computed them
    A = advantages.detach().to(dt).unsqueeze(-1)
    # old / ref / sampler log-probs are fixed policies' numbers: detached, so old_logp=logp (not detached)
    # still means ratio 1 with the policy gradient kept, as in the triton kernel, not a zero gradient
    old = logp.detach() if old_logp is None else old_logp.detach().to(dt)
    log_ratio = logp - old
    lw = log_ratio if opts.importance_sampling_level == "token" else _row_mean(log_ratio, m)
    c1 = _exp_no_nan_grad(lw)
    eps_low, eps_high = opts.epsilon, opts.eps_high
    if opts.loss_type == "cispo":
        per_tok = -torch.clamp(c1, max=eps_high).detach() * A * logp
        low = torch.zeros_like(c1, dtype=torch.bool)
        high = (c1 > eps_high) & (A > 0)
    else:
        c2 = torch.clamp(c1, 1 - eps_low, 1 + eps_high)
        c1d = torch.clamp(c1, max=opts.delta) if opts.delta is not None else c1
        # the clip fractions read c1 after the delta clip (LOSS_SPEC, TRL): a delta at or under
        # 1 + epsilon_high leaves nothing to clip high (delta > 1, so low is the same either way)
        low = (c1d < 1 - eps_low) & (A < 0)
        high = (c1d > 1 + eps_high) & (A > 0)
        # a ratio past the dtype's range (inf) with A = 0 is no term at all, not inf * 0 = NaN
        per_tok = -torch.where(A == 0, 0.0, torch.minimum(c1d * A, c2 * A))
    per_tok = per_tok.expand_as(logp)

    stats = {}
    n_tok = m.sum()
    B = logp.shape[0]
    row_counts = None
    if totals is not None:
        B, denom = totals[0], max(float(totals[1]), 1.0)
        row_counts = totals[2] if len(totals) > 2 else None
    else:
        denom = n_tok.clamp_min(1.0)
    if sampler_logp is not None and importance_weights is not None:
        raise ValueError("grpo_loss: pass sampler_logp (truncated IS from log-probs) or importance_weights "
                         "(precomputed weights), not both")
    if sampler_logp is not None:
        # w = exp(old - sampler) per token (LOSS_SPEC); the mask weights the row's sum, never a token's own weight
        # (a mask of 2 is its token twice, each with that weight). 0 off the row's tokens, whatever they hold
        d = torch.where(m > 0, old - sampler_logp.to(dt), 0.0)
        w = torch.exp((d * m).sum(-1, keepdim=True) if opts.tis_level == "sequence" else d).detach()
        _weight_stats(stats, w.expand_as(logp), m, denom, n_tok, totals)
        if opts.tis_mode == "truncate":
            per_tok = per_tok * torch.clamp(w, max=opts.tis_cap)
        elif opts.tis_mode == "mask":
            keep = ((w >= 1.0 / opts.tis_cap) & (w <= opts.tis_cap)).to(dt)
            per_tok = _weighted(per_tok, keep)
            stats["is_weight/masked_frac"] = ((1 - keep).expand_as(logp) * m).sum() / denom
    if importance_weights is not None:  # the caller's weights: the policy term only, no gradient
        w = importance_weights.to(dt).detach().expand_as(logp)
        _weight_stats(stats, w, m, denom, n_tok, totals)
        per_tok = _weighted(per_tok, w)

    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp.detach().to(dt), opts.kl_estimator)
        if opts.use_bias_correction_kl:  # TRL's bias-corrected KL: weighted by the unclipped ratio, differentiably
            kl = kl * torch.exp(lw)
        if opts.beta != 0.0:
            per_tok = per_tok + opts.beta * kl
        stats["kl"] = _active_sum(kl.detach(), m) / denom
    if entropy is not None:
        if opts.entropy_coef != 0.0:
            per_tok = per_tok - opts.entropy_coef * entropy.to(dt)
        stats["entropy"] = (entropy.detach().to(dt) * m).sum() / denom

    # masked tokens hold no term: at sequence level the row's ratio reaches them too (inf past the
    # dtype's range, where the row's own tokens may be dropped by the TIS mask), and inf * 0 would be NaN.
    # A NaN advantage's NaN stays: that of a row without active tokens must still show as a NaN loss. Only that
    # NaN: a masked token's 0 * inf (the bias-corrected KL at an inf row ratio) is no term, as the inf it comes from.
    # Selected, not multiplied by m: the aggregation below weights by m, so a mask value (a 2 under
    # check_values=False) counts once
    per_tok = torch.where((m > 0) | A.isnan(), per_tok, 0.0)
    lt = opts.loss_type
    if lt == "grpo":
        if row_counts is not None:
            loss = ((per_tok * m).sum(-1) / row_counts.to(dt).clamp_min(1.0)).sum() / B
        else:
            loss = _row_mean(per_tok, m).sum() / B
    elif lt == "bnpo":
        loss = (per_tok * m).sum() / denom
    elif lt == "dr_grpo":
        loss = (per_tok * m).sum() / (B * opts.max_completion_length)
    else:  # dapo, cispo
        loss = (per_tok * m).sum() / (opts.num_items if opts.num_items is not None else denom)

    stats["clip_ratio/low_mean"] = (low.expand_as(logp).to(dt) * m).sum() / denom
    stats["clip_ratio/high_mean"] = (high.expand_as(logp).to(dt) * m).sum() / denom
    stats["clip_ratio/region_mean"] = ((low | high).expand_as(logp).to(dt) * m).sum() / denom
    stats["num_tokens"] = n_tok.detach()
    if row_stats:
        stats["rows/clip_low"] = (low.expand_as(logp).to(dt) * m).sum(-1)
        stats["rows/clip_high"] = (high.expand_as(logp).to(dt) * m).sum(-1)
    return loss, {k: v.detach() for k, v in stats.items()}
