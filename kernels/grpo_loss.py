"""Triton per-token GRPO loss: loss, d loss / d logp, d loss / d entropy and the statistics in one launch.

One program per completion (row). Pass 1 over the row's tokens (ROW_SUMS, needs_row_sums) gathers
the row sums pass 2 needs before it starts: the active-token count grpo weights its row by, Σ m·log_ratio
for sequence-level ratios, Σ m·(old − sampler) for sequence-level truncated IS; every other objective
skips it and pass 2 counts the row's tokens itself. Pass 2 computes every token's loss and its local
gradient and the row's statistic sums (with CHECK, also the values the op's checks refuse); pass 3 (sequence-level ratios only) adds the gradient that flows through
the row-mean log-ratio to every active token (the clipped objective's and, with
use_bias_correction_kl, the weighted KL's). The forward therefore writes the gradients as well
(as Liger does): the autograd wrapper's backward only scales them by the incoming gradient.
Per-row partial sums are reduced in torch afterwards, so the result is deterministic.
Importance weights: either computed from the sampler's log-probs (HAS_SMP: truncated IS, TIS /
TIS_SEQ / tis_cap) or given precomputed by the caller (HAS_ISW, e.g. TRL's vLLM ratio). Both
come through `smp_ptr` (the op refuses both at once); either way the factor multiplies the policy
term (and its gradients) before the KL and the entropy bonus are added.
Formulas: LOSS_SPEC.md; the torch twin is r1fast.reference.loss.grpo_loss.
"""

import torch
import triton
import triton.language as tl

from r1fast.backends import on_device, poisoned

LOSS_TYPE_IDS = {"grpo": 0, "bnpo": 1, "dr_grpo": 2, "dapo": 3, "cispo": 4}
KL_IDS = {"k1": 1, "k2": 2, "k3": 3}
TIS_IDS = {None: 0, "truncate": 1, "mask": 2}
# Per-row statistic sums, columns of the [B, N_STATS] output.
# "bad" (CHECK only): the row's count of values the op's value checks refuse (see the kernel).
STATS = ("count", "kl", "entropy", "low", "high", "region", "w_sum", "w_min", "w_max", "masked", "bad")
N_STATS = 16  # padded to a power of two
# The columns that are sums over active tokens and become means over them: one division for all
# (stats_from_rows), in the order of STATS.
MEAN_COLS = slice(STATS.index("kl"), STATS.index("w_sum") + 1)


@triton.jit
def _load_active(ptr, base, offs, ok, act):
    # 0 at inactive tokens whatever the tensor holds there: a NaN or inf in padding would survive the
    # multiply by the mask and poison the row's sums
    return tl.where(act, tl.load(ptr + base + offs, mask=ok, other=0.0), 0.0)


@triton.jit
def _row_block(mask_ptr, logp_ptr, old_ptr, base, t0, T, BLOCK_T: tl.constexpr):
    """Tokens t0 .. t0 + BLOCK_T - 1 of the row at `base`, as passes 1 and 2 both read them: offsets, in-row
    flags, mask, active flags, and the policy and old log-probs (0 at inactive tokens)."""
    offs = t0 + tl.arange(0, BLOCK_T)
    ok = offs < T
    m = tl.load(mask_ptr + base + offs, mask=ok, other=0.0)
    act = m > 0
    lp = _load_active(logp_ptr, base, offs, ok, act)
    old = _load_active(old_ptr, base, offs, ok, act)
    return offs, ok, m, act, lp, old


@triton.jit
def _nonfinite(x):
    """Where x is NaN or inf (x is 0 at inactive lanes, _load_active)."""
    return (x != x) | (tl.abs(x) == float("inf"))


@triton.jit
def _k3_and_grad(u):
    """k3 = exp(u) - u - 1 (u = ref - logp) and d k3 / d logp = 1 - exp(u), accurate in fp32 near u = 0 too: there
    both are what is left of exp(u) ≈ 1 (~u²/2 and -u), which its rounding swamps once |u| < 1e-3. Below |u| = 0.5
    the series u²·Σ u^k/(k+2)!, k ≤ 7 (reference.loss.K3_SERIES, fp32's bound) and -(k3 + u) = -expm1(u); elsewhere as written."""
    small = tl.abs(u) < 0.5
    s = tl.where(small, u, 0.0)
    p = s * 2.7557319223985893e-06 + 2.48015873015873e-05
    p = p * s + 1.984126984126984e-04
    p = p * s + 1.388888888888889e-03
    p = p * s + 8.333333333333333e-03
    p = p * s + 4.1666666666666664e-02
    p = p * s + 1.6666666666666666e-01
    p = p * s + 0.5
    k3_small = s * s * p
    e = tl.exp(u)
    kl = tl.where(small, k3_small, e - u - 1.0)
    g_kl = tl.where(small, -(k3_small + s), 1.0 - e)
    return kl, g_kl


@triton.jit
def _grpo_loss_kernel(logp_ptr, old_ptr, ref_ptr, smp_ptr, ent_ptr, mask_ptr, adv_ptr, denom_ptr, row_cnt_ptr,
                      row_loss_ptr, g_logp_ptr, g_ent_ptr, stats_ptr,
                      T, n_rows, epsilon, eps_high, delta, beta, tis_cap, entropy_coef, max_len,
                      LOSS_TYPE: tl.constexpr, SEQ_LEVEL: tl.constexpr, HAS_DELTA: tl.constexpr,
                      KL: tl.constexpr, USE_KL: tl.constexpr, TIS: tl.constexpr, TIS_SEQ: tl.constexpr,
                      HAS_SMP: tl.constexpr, HAS_ENT: tl.constexpr, BLOCK_T: tl.constexpr, N_STATS: tl.constexpr,
                      HAS_ROW_CNT: tl.constexpr, KL_WEIGHTED: tl.constexpr, HAS_ISW: tl.constexpr,
                      CHECK: tl.constexpr, ROW_SUMS: tl.constexpr):
    row = tl.program_id(0)
    base = row.to(tl.int64) * T
    adv = tl.load(adv_ptr + row)
    # sign flags as floats: the interpreter rejects `&` between a scalar and a block comparison
    a_pos = tl.where(adv > 0.0, 1.0, 0.0)
    a_neg = tl.where(adv < 0.0, 1.0, 0.0)
    pad_g = tl.where(adv != adv, float("nan"), 0.0)  # the gradient at the row's masked tokens

    # pass 1: row sums, where pass 2 needs them (ROW_SUMS: grpo's token count, sequence-level ratios or
    # weights); otherwise pass 2 counts the tokens itself, in the same order, and the row is read once
    cnt = 0.0
    sum_lr = 0.0
    sum_is = 0.0
    if ROW_SUMS:
        for t0 in range(0, T, BLOCK_T):
            offs, ok, m, act, lp, old = _row_block(mask_ptr, logp_ptr, old_ptr, base, t0, T, BLOCK_T)
            cnt += tl.sum(m, 0)
            sum_lr += tl.sum(m * (lp - old), 0)
            if HAS_SMP:
                smp = _load_active(smp_ptr, base, offs, ok, act)
                sum_is += tl.sum(m * (old - smp), 0)
    cnt_c = tl.maximum(cnt, 1.0)

    # the row's weight in the aggregated loss
    if LOSS_TYPE == 0:
        if HAS_ROW_CNT:  # this slice holds part of the row: weight by the full row's token count
            coef = 1.0 / (tl.maximum(tl.load(row_cnt_ptr + row), 1.0) * n_rows)
        else:
            coef = 1.0 / (cnt_c * n_rows)
    elif LOSS_TYPE == 2:
        coef = 1.0 / (n_rows * max_len)
    else:
        coef = 1.0 / tl.load(denom_ptr)

    seq_c1 = tl.exp(sum_lr / cnt_c)
    seq_w = tl.exp(sum_is)

    # pass 2: per-token loss, local gradients and statistic sums
    loss_sum = 0.0
    g_lw_sum = 0.0
    s_kl = 0.0
    s_ent = 0.0
    s_low = 0.0
    s_high = 0.0
    s_reg = 0.0
    s_w = 0.0
    s_masked = 0.0
    w_min = float("inf")
    w_max = float("-inf")
    # CHECK: the value checks of ops.grpo_loss, counted in this pass instead of by ~35 torch ops and
    # their passes over [B, T] before the launch: a NaN/inf advantage, a mask value other than 0/1, a
    # NaN/inf at an active token (a valid mask's active tokens are m > 0 here and mask.bool() there),
    # a negative importance weight at one. The op reads the batch's count once and, when it is not 0,
    # redoes its checks one by one to name the problem (or to pass where this count errs on the safe side)
    n_bad = tl.where((adv != adv) | (tl.abs(adv) == float("inf")), 1.0, 0.0)
    for t0 in range(0, T, BLOCK_T):
        offs, ok, m, act, lp, old = _row_block(mask_ptr, logp_ptr, old_ptr, base, t0, T, BLOCK_T)
        if not ROW_SUMS:
            cnt += tl.sum(m, 0)
        if CHECK:
            # the block's flags, or-ed per lane and counted once at its end: a reduction per check spilled
            bad = (ok & (m != 0.0) & (m != 1.0)) | _nonfinite(lp) | _nonfinite(old)
        if SEQ_LEVEL:
            c1 = tl.zeros([BLOCK_T], dtype=tl.float32) + seq_c1
        else:
            c1 = tl.exp(lp - old)
        if LOSS_TYPE == 4:  # cispo: -min(c1, eps_high).detach() * A * logp
            wc = tl.minimum(c1, eps_high, propagate_nan=tl.PropagateNan.ALL)
            L = -wc * adv * lp
            g_lp = -wc * adv
            g_lw = tl.zeros([BLOCK_T], dtype=tl.float32)
            low = tl.zeros([BLOCK_T], dtype=tl.float32)
            high = tl.where(c1 > eps_high, a_pos, 0.0)
        else:
            # min/max propagate NaN as torch does: the default (fminf/fmaxf) would clamp a NaN ratio
            # into [1 - eps, 1 + eps_high] and pick the finite side, hiding a NaN input (check_values=False)
            c2 = tl.minimum(tl.maximum(c1, 1.0 - epsilon, propagate_nan=tl.PropagateNan.ALL), 1.0 + eps_high,
                            propagate_nan=tl.PropagateNan.ALL)
            if HAS_DELTA:
                c1d = tl.minimum(c1, delta, propagate_nan=tl.PropagateNan.ALL)
                g1 = tl.where(c1 <= delta, -adv * c1, 0.0)
            else:
                c1d = c1
                # a ratio past float32 (log-ratio > ~88) is inf: its term's gradient is 0 there, as the
                # reference's exp has it (its loss is inf and refused), not -A * inf (NaN stays NaN)
                g1 = tl.where(c1 == float("inf"), 0.0, -adv * c1)
            g2 = tl.where(c1 >= 1.0 - epsilon, tl.where(c1 <= 1.0 + eps_high, -adv * c1, 0.0), 0.0)
            t1 = c1d * adv
            t2 = c2 * adv
            # A = 0 is no term, also where the ratio overflowed to inf (inf * 0 would be NaN), as in the reference
            L = tl.where(adv == 0.0, 0.0, -tl.minimum(t1, t2, propagate_nan=tl.PropagateNan.ALL))
            # torch.minimum splits the gradient evenly on ties; match it
            g_lw = tl.where(adv == 0.0, 0.0, tl.where(t1 < t2, g1, tl.where(t1 > t2, g2, 0.5 * (g1 + g2))))
            g_lp = tl.zeros([BLOCK_T], dtype=tl.float32)
            low = tl.where(c1d < 1.0 - epsilon, a_neg, 0.0)
            high = tl.where(c1d > 1.0 + eps_high, a_pos, 0.0)  # after the delta clip, as LOSS_SPEC
        if HAS_SMP or HAS_ISW:
            # smp_ptr holds the sampler's log-probs (HAS_SMP: weight w = exp(old - smp), factor f from
            # the TIS mode) or the caller's weights (HAS_ISW: f = w as given); no gradient either way
            x = _load_active(smp_ptr, base, offs, ok, act)
            if CHECK:
                bad = bad | _nonfinite(x)
                if HAS_ISW:
                    bad = bad | (x < 0.0)
            if HAS_ISW:
                w = x
                f = x
            else:
                if TIS_SEQ:
                    w = tl.zeros([BLOCK_T], dtype=tl.float32) + seq_w
                else:
                    w = tl.exp(old - x)
                if TIS == 1:
                    f = tl.minimum(w, tis_cap, propagate_nan=tl.PropagateNan.ALL)
                elif TIS == 2:
                    f = tl.where(w >= 1.0 / tis_cap, tl.where(w <= tis_cap, 1.0, 0.0), 0.0)
                else:
                    f = tl.zeros([BLOCK_T], dtype=tl.float32) + 1.0
                s_masked += tl.sum(m * (1.0 - f), 0)
            if HAS_ISW or TIS == 2:
                # a token the mask or a weight of 0 drops is no term, also where the ratio overflowed to
                # inf (inf * 0 would be NaN; a NaN term stays NaN); truncate's factor is 0 only by underflow
                L = tl.where((f == 0.0) & (L == L), 0.0, L * f)
            else:
                L = L * f
            g_lp = g_lp * f
            g_lw = g_lw * f
            s_w += tl.sum(tl.where(act, m * w, 0.0), 0)  # a sequence-level w may be inf: not 0 * inf off the row
            w_min = tl.minimum(w_min, tl.min(tl.where(act, w, float("inf")), 0))
            w_max = tl.maximum(w_max, tl.max(tl.where(act, w, float("-inf")), 0))
        if KL != 0:
            ref = _load_active(ref_ptr, base, offs, ok, act)
            if CHECK:
                bad = bad | _nonfinite(ref)
            x = lp - ref
            if KL == 1:
                kl = x
                g_kl = tl.zeros([BLOCK_T], dtype=tl.float32) + 1.0
            elif KL == 2:
                kl = 0.5 * x * x
                g_kl = x
            else:
                kl, g_kl = _k3_and_grad(-x)
            if KL_WEIGHTED:
                # TRL's bias-corrected KL, kl * c1 with c1 = exp(lw) unclipped and differentiable:
                # d/dlogp = g_kl * c1 on the token's own logp, plus kl * c1 through lw (added after
                # the TIS factor, which multiplies the policy term only)
                g_kl = g_kl * c1
                kl = kl * c1
            if USE_KL:
                L += beta * kl
                g_lp += beta * g_kl
                if KL_WEIGHTED:
                    g_lw += beta * kl
            # active lanes only: a lane past the row's end or in its padding has kl 0 times the row's ratio,
            # NaN where that is inf, which would hide the active tokens' inf (as in the reference)
            s_kl += tl.sum(tl.where(act, m * kl, 0.0), 0)
        if HAS_ENT:
            ent = _load_active(ent_ptr, base, offs, ok, act)
            if CHECK:
                bad = bad | _nonfinite(ent)
            L -= entropy_coef * ent
            s_ent += tl.sum(m * ent, 0)
            tl.store(g_ent_ptr + base + offs, -entropy_coef * coef * m, mask=ok)
        # inactive lanes hold no term: at sequence level their L is the row's policy term (an inf ratio's
        # inf where the TIS mask dropped every active token), and m * inf would be NaN. A NaN advantage's NaN
        # stays on the row's masked tokens (a row without active tokens must still show a NaN loss), as in the
        # reference, which has no lanes past the row's end; their 0 * inf NaN (bias-corrected KL) does not
        loss_sum += tl.sum(tl.where(tl.where(adv != adv, ok, act), m * L, 0.0), 0)
        if SEQ_LEVEL:
            g_lw_sum += tl.sum(tl.where(act, m * g_lw, 0.0), 0)
            g_tok = g_lp
        else:
            g_tok = g_lp + g_lw
        # a masked token's gradient is 0, not m * (an inf row ratio's 0 * inf = NaN); NaN where the row's
        # advantage is NaN, as the forward keeps that row's masked terms
        tl.store(g_logp_ptr + base + offs, tl.where(act, coef * m * g_tok, pad_g), mask=ok)
        s_low += tl.sum(m * low, 0)
        s_high += tl.sum(m * high, 0)
        s_reg += tl.sum(m * tl.maximum(low, high), 0)
        if CHECK:
            n_bad += tl.sum(tl.where(bad, 1.0, 0.0), 0)

    # pass 3: the row-mean log-ratio spreads its gradient evenly over the row's active tokens
    if SEQ_LEVEL:
        extra = coef * g_lw_sum / cnt_c
        for t0 in range(0, T, BLOCK_T):
            offs = t0 + tl.arange(0, BLOCK_T)
            ok = offs < T
            m = tl.load(mask_ptr + base + offs, mask=ok, other=0.0)
            g = tl.load(g_logp_ptr + base + offs, mask=ok, other=0.0)
            tl.store(g_logp_ptr + base + offs, tl.where(m > 0, g + extra * m, g), mask=ok)

    # a NaN mask value (check_values=False) is a NaN input: the row's loss shows it, as the reference's m * L
    # does, though no lane counts as active there (NaN > 0 is false) and max(NaN, 1) is 1 in Triton
    tl.store(row_loss_ptr + row, tl.where(cnt == cnt, coef * loss_sum, cnt))
    idx = tl.arange(0, N_STATS)
    vals = tl.where(idx == 0, cnt, 0.0)
    vals = tl.where(idx == 1, s_kl, vals)
    vals = tl.where(idx == 2, s_ent, vals)
    vals = tl.where(idx == 3, s_low, vals)
    vals = tl.where(idx == 4, s_high, vals)
    vals = tl.where(idx == 5, s_reg, vals)
    vals = tl.where(idx == 6, s_w, vals)
    vals = tl.where(idx == 7, w_min, vals)
    vals = tl.where(idx == 8, w_max, vals)
    vals = tl.where(idx == 9, s_masked, vals)
    if CHECK:
        vals = tl.where(idx == 10, n_bad, vals)
    tl.store(stats_ptr + row * N_STATS + idx, vals)


def needs_row_sums(loss_type: str, has_row_cnt: bool, seq_level: bool, seq_tis: bool) -> bool:
    """The kernel's ROW_SUMS: whether pass 2 needs the row's sums before it starts (grpo weighting the row by its
    own token count, a sequence-level ratio, a sequence-level sampler weight); else pass 1 is left out."""
    return (loss_type == "grpo" and not has_row_cnt) or seq_level or seq_tis


def grpo_loss_fwd(logp, old, ref, smp, ent, mask, adv, opts, totals=None, isw=None, check=False):
    """(row_loss [B], grad_logp [B, T], grad_entropy [B, T] or None, row_stats [B, N_STATS]), fp32.

    `old` may be None (ratio 1: logp stands in); ref/smp/ent None when absent. `isw` [B, T]: the
    caller's importance weights (excludes `smp`), multiplying the policy term. `totals=(rows,
    tokens[, row_counts])`: these B rows are a slice of a batch with that many rows and active
    tokens, whose normalisers the aggregation uses (the fused single pass evaluates the loss chunk
    by chunk); `row_counts` [B] are the full rows' token counts when the slice cuts rows.
    `check`: count each row's values that ops.grpo_loss's value checks refuse in row_stats' "bad" column
    (0 there otherwise); see the kernel's CHECK.
    """
    b, t = logp.shape
    dev = logp.device
    f32 = lambda x: None if x is None else x.to(torch.float32).contiguous()  # noqa: E731
    logp_, old_, ref_, ent_ = f32(logp), f32(old), f32(ref), f32(ent)
    smp_ = f32(smp) if isw is None else f32(isw)  # one pointer: the kernel reads it per HAS_SMP / HAS_ISW
    mask_ = mask.to(torch.float32).contiguous()
    old_ = logp_ if old_ is None else old_
    # torch.full, not torch.tensor([...], device=dev): the latter is a host-to-device copy that
    # synchronises the stream (once per chunk in the fused single pass) and breaks CUDA graphs.
    if opts.num_items is not None and opts.loss_type in ("dapo", "cispo"):
        denom = torch.full((1,), float(opts.num_items), dtype=torch.float32, device=dev)
    elif totals is not None:
        denom = torch.full((1,), max(float(totals[1]), 1.0), dtype=torch.float32, device=dev)
    else:
        denom = mask_.sum().clamp_min(1.0).reshape(1)
    n_rows = b if totals is None else int(totals[0])
    row_cnt = totals[2].to(torch.float32).contiguous() if totals is not None and len(totals) > 2 else None
    row_loss = poisoned(torch.empty(b, dtype=torch.float32, device=dev))
    g_logp = poisoned(torch.empty(b, t, dtype=torch.float32, device=dev))
    g_ent = poisoned(torch.empty(b, t, dtype=torch.float32, device=dev)) if ent is not None else None
    stats = poisoned(torch.empty(b, N_STATS, dtype=torch.float32, device=dev))
    block_t = min(1024 if dev.type == "cuda" else 32, triton.next_power_of_2(max(t, 1)))
    kl_id = KL_IDS[opts.kl_estimator] if ref is not None else 0
    seq_level, tis_seq = opts.importance_sampling_level == "sequence", opts.tis_level == "sequence"
    with on_device(dev):  # Triton launches on the current device: make it the inputs'
        _grpo_loss_kernel[(b,)](
            logp_, old_, ref_ if ref_ is not None else logp_, smp_ if smp_ is not None else logp_,
            ent_ if ent_ is not None else logp_, mask_, adv.to(torch.float32).contiguous(), denom,
            row_cnt if row_cnt is not None else denom,
            row_loss, g_logp, g_ent if g_ent is not None else g_logp, stats,
            t, n_rows, float(opts.epsilon), float(opts.eps_high), float(opts.delta or 0.0), float(opts.beta),
            float(opts.tis_cap), float(opts.entropy_coef), float(opts.max_completion_length or 1),
            LOSS_TYPE=LOSS_TYPE_IDS[opts.loss_type], SEQ_LEVEL=seq_level,
            HAS_DELTA=opts.delta is not None and opts.loss_type != "cispo", KL=kl_id, USE_KL=opts.beta != 0.0,
            TIS=TIS_IDS[opts.tis_mode], TIS_SEQ=tis_seq, HAS_SMP=smp is not None,
            HAS_ENT=ent is not None, BLOCK_T=block_t, N_STATS=N_STATS, HAS_ROW_CNT=row_cnt is not None,
            KL_WEIGHTED=kl_id != 0 and opts.use_bias_correction_kl, HAS_ISW=isw is not None, CHECK=check,
            ROW_SUMS=needs_row_sums(opts.loss_type, row_cnt is not None, seq_level, smp is not None and tis_seq),
            num_warps=4 if dev.type == "cuda" else 1)
    return row_loss, g_logp, g_ent, stats


_COL = {name: i for i, name in enumerate(STATS)}
_MEAN = {name: i for i, name in enumerate(STATS[MEAN_COLS])}  # a column's place in the means


def stats_from_rows(rows, has_ref: bool, has_ent: bool, has_smp: bool, tis_mode, has_isw: bool = False,
                    row_stats: bool = False, tot=None):
    """The op's statistics dict from the kernel's per-row sums [B, N_STATS] (whole batch); with
    `row_stats`, each row's clipped-token counts too (rows/clip_low, rows/clip_high [B]). `tot`: rows.sum(0)
    when the caller has it already."""
    col = _COL
    tot = rows.sum(0) if tot is None else tot
    n_tok = tot[col["count"]]
    denom = n_tok.clamp_min(1.0)
    # every mean over active tokens in one launch (a 0-d division each was a launch each); the same
    # elementwise division, so the same numbers
    means = tot[MEAN_COLS] / denom
    stats = {"clip_ratio/low_mean": means[_MEAN["low"]], "clip_ratio/high_mean": means[_MEAN["high"]],
             "clip_ratio/region_mean": means[_MEAN["region"]], "num_tokens": n_tok}
    if has_ref:
        stats["kl"] = means[_MEAN["kl"]]
    if has_ent:
        stats["entropy"] = means[_MEAN["entropy"]]
    if has_smp or has_isw:
        has = n_tok > 0
        stats["is_weight/mean"] = means[_MEAN["w_sum"]]
        stats["is_weight/min"] = torch.where(has, rows[:, col["w_min"]].min(), 0.0)
        stats["is_weight/max"] = torch.where(has, rows[:, col["w_max"]].max(), 0.0)
        if has_smp and tis_mode == "mask":
            stats["is_weight/masked_frac"] = tot[col["masked"]] / denom
    if row_stats:
        stats["rows/clip_low"], stats["rows/clip_high"] = rows[:, col["low"]], rows[:, col["high"]]
    return stats
