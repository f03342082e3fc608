"""ops.grpo_loss: per-token log-probs [B, T] -> (loss, stats), LOSS_SPEC.md's objective and aggregation.

Options are r1fast.ops.LossOptions (TRL's names and defaults). Statistics come back as detached
0-d tensors computed in the same pass as the loss. Backends: reference (float64), torch (fp32,
the CPU path), triton (kernels/grpo_loss.py: loss, gradients and statistics in one launch).
The hidden-states entry point, fused_linear_grpo_loss, lives in r1fast.ops.fused_loss.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from r1fast import backends
from r1fast.ops.checks import dense, flags, kind_of, one_device, readable, resolve_neg
from r1fast.ops.logprob import refuse_double_backward
from r1fast.ops.loss_options import LossOptions
from r1fast.reference import loss as reference


def _check_finite(name, t, active, op):
    bad = ~torch.isfinite(t) & active
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        if t.dim() == 1:  # one value per row (the advantages): no token to speak of
            raise ValueError(f"{op}: {name} has {int(bad.sum())} NaN/inf value(s) (first at row {where[0]})")
        raise ValueError(f"{op}: {name} has {int(bad.sum())} NaN/inf value(s) at active tokens "
                         f"(first at [row, position] {where})")


def _any_bad_value(logp, old_logp, ref_logp, advantages, mask, sampler_logp, entropy, importance_weights) -> bool:
    """Whether a value check of validate_loss_inputs may fail (a mask value other than 0/1, a NaN/inf at an active
    token or in the advantages, a negative importance weight), read from the device once: each check's own
    read was a host sync, ~5 per loss call. May say True where every check passes (a sum that overflows, which
    the checks then clear), never False where one fails. ~10 torch ops: an isfinite / any per tensor was ~35."""
    active = mask.bool()
    # NaN/inf survive a sum (NaN + x, inf + -inf: NaN; inf + finite: inf), so the tensors' sum is non-finite at a
    # token where one of them is; a weight's square root is NaN where it is negative (and -0.0 where it is -0.0)
    acc = None
    for t in (logp, old_logp, ref_logp, sampler_logp, entropy):
        if t is not None:
            acc = t.detach() if acc is None else acc + t.detach()
    if importance_weights is not None:
        acc = acc + importance_weights.detach().sqrt()
    wide = torch.float64 if acc.dtype == torch.float64 else torch.float32  # a 16-bit sum of many tokens overflows
    total = torch.where(active, acc, 0.0).sum(dtype=wide) + advantages.sum(dtype=wide)
    if mask.dtype != torch.bool:  # a mask value other than 0/1 differs from its own bool (NaN's is True)
        total = torch.where((active != mask).any(), float("nan"), total)
    return not math.isfinite(total.item())


def per_token_weights(op, weights, shape):
    """importance_weights as a detached [B, T] view (per-row weights broadcast over their row), after
    the type and shape checks. Accepted: [B, T] = `shape` (one weight per token), [B, 1] or [B] (one per row)."""
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        raise TypeError(f"{op}: importance_weights must be a float tensor or None, got {kind_of(weights)}")
    b = shape[0]
    if tuple(weights.shape) == tuple(shape):
        return weights.detach()
    if tuple(weights.shape) in ((b, 1), (b,)):
        return weights.detach().reshape(b, 1).expand(shape)
    raise ValueError(f"{op}: importance_weights must have shape {tuple(shape)} (one weight per token) or "
                     f"[{b}, 1] / [{b}] (one per row), got {tuple(weights.shape)}")


def validate_loss_inputs(op, logp, old_logp, ref_logp, advantages, mask, sampler_logp, entropy, opts,
                          check_values=True, importance_weights=None, defer_values=False):
    """Raises on a bad input; returns importance_weights as a [B, T] view (None when not given).
    `defer_values`: leave the value checks (check_values) to the caller, which runs check_loss_values when a
    cheaper read of its own (the triton kernel's count) says one may fail; they are run here all the same
    when the ref_logp check below would raise, which the old order put after the mask's."""
    dense(op, logp=logp, old_logp=old_logp, ref_logp=ref_logp, advantages=advantages, mask=mask,
          sampler_logp=sampler_logp, entropy=entropy, importance_weights=importance_weights)
    if not isinstance(logp, torch.Tensor) or not logp.is_floating_point():
        raise TypeError(f"{op}: logp must be a float tensor, got {kind_of(logp)}")
    if logp.dim() != 2:
        raise ValueError(f"{op}: logp must be [B, T], got shape {tuple(logp.shape)}")
    B = logp.shape[0]
    if B == 0:  # grpo / dr_grpo divide by B: NaN on some paths, a crash in the kernel's stats on others
        raise ValueError(f"{op}: the batch has no completions (B=0)")
    if sampler_logp is not None and importance_weights is not None:
        raise ValueError(f"{op}: pass sampler_logp (r1fast's truncated IS, tis_mode/tis_cap) or importance_weights "
                         f"(precomputed per-token weights), not both")
    importance_weights = per_token_weights(op, importance_weights, logp.shape)
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("sampler_logp", sampler_logp),
                    ("entropy", entropy), ("importance_weights", importance_weights)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a float tensor or None, got {kind_of(t)}")
        if t.shape != logp.shape:
            raise ValueError(f"{op}: {name} shape {tuple(t.shape)} != logp shape {tuple(logp.shape)}")
    if not isinstance(mask, torch.Tensor) or mask.shape != logp.shape:
        raise ValueError(f"{op}: mask must be a tensor of shape {tuple(logp.shape)}, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if not isinstance(advantages, torch.Tensor) or not advantages.is_floating_point():
        raise TypeError(f"{op}: advantages must be a float tensor [B], got {kind_of(advantages)}")
    if advantages.shape != (B,):
        raise ValueError(f"{op}: advantages must be [B={B}], got shape {tuple(advantages.shape)}")
    one_device(op, (logp, old_logp, ref_logp, sampler_logp, entropy, mask, advantages, importance_weights))
    if check_values:
        readable(op, logp, "the value checks (NaN/inf, a 0/1 mask; check_values=False skips them)")
    no_ref = opts.beta != 0.0 and ref_logp is None
    if check_values and (no_ref or not defer_values):
        # the value checks read the device once; only when one fails are they redone one by one, to name it
        check_loss_values(op, logp, old_logp, ref_logp, advantages, mask, sampler_logp, entropy, importance_weights,
                          bad=_any_bad_value(logp, old_logp, ref_logp, advantages, mask, sampler_logp, entropy,
                                             importance_weights), before_finite=no_ref and opts.beta)
    if no_ref:
        raise ValueError(f"{op}: beta={opts.beta} needs ref_logp (or set beta=0)")
    return importance_weights


def check_loss_values(op, logp, old_logp, ref_logp, advantages, mask, sampler_logp, entropy, importance_weights,
                      bad=True, before_finite=None):
    """The value checks of validate_loss_inputs, one by one, raising on the first that fails (nothing when `bad`,
    a cheaper read's verdict, is False). `before_finite`: the beta whose missing ref_logp is refused after the
    mask check and before the finiteness checks (validate_loss_inputs' order), None for none."""
    # integer masks too: every backend weights a token by its mask value, so a 2 would count it twice
    if bad and mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{op}: mask must be bool or hold only 0 and 1")
    if before_finite:
        raise ValueError(f"{op}: beta={before_finite} needs ref_logp (or set beta=0)")
    if not bad:
        return
    active = mask.bool()
    for name, t in (("logp", logp), ("old_logp", old_logp), ("ref_logp", ref_logp),
                    ("sampler_logp", sampler_logp), ("entropy", entropy), ("importance_weights", importance_weights)):
        if t is not None:
            _check_finite(name, t.detach(), active, op)
    if importance_weights is not None:
        neg = (importance_weights.detach() < 0) & active
        if bool(neg.any()):
            raise ValueError(f"{op}: importance_weights has {int(neg.sum())} negative value(s) at active tokens "
                             f"(first at {neg.nonzero()[0].tolist()}); weights must be >= 0")
    _check_finite("advantages", advantages, torch.ones_like(advantages, dtype=torch.bool), op)


def kernel_checks_values(mask, importance_weights) -> bool:
    """Whether the triton kernel's count of bad values (CHECK) can stand in for the value checks' read: it sees the
    inputs as float32, which keeps a mask value off 0 and 1 and NaN/inf as they are (a finite float64 past float32
    becomes inf, a false alarm the checks then clear), except a float64 or complex mask value that rounds to 0 or 1
    and a float64 weight that rounds to -0.0: those keep the read before the launch."""
    wide = (torch.float64, torch.complex64, torch.complex128, torch.complex32)
    wide_weights = isinstance(importance_weights, torch.Tensor) and importance_weights.dtype == torch.float64
    return isinstance(mask, torch.Tensor) and mask.dtype not in wide and not wide_weights


def _policy_lanes(mask, advantages):
    """Where logp enters the loss: the active tokens, and every token of a row whose advantage is NaN. The
    forward keeps such a row's masked terms (its loss is NaN even with no active token), so its masked tokens'
    gradients are NaN too; every other masked token's gradient is exactly 0 (the triton kernel's rule)."""
    return mask.bool() | advantages.isnan().unsqueeze(-1)


@backends.register("grpo_loss", "reference")
def _grpo_loss_reference(logp, old_logp, ref_logp, advantages, mask, opts, entropy, sampler_logp,
                         importance_weights=None, row_stats=False):
    active = mask.bool()
    f64 = lambda t: None if t is None else torch.where(active, t.double(), 0.0)  # noqa: E731
    logp = torch.where(_policy_lanes(mask, advantages), logp.double(), 0.0)
    return reference.grpo_loss(logp, f64(old_logp), f64(ref_logp), advantages.double(), mask, opts,
                               f64(entropy), f64(sampler_logp), importance_weights=f64(importance_weights),
                               row_stats=row_stats)


@backends.register("grpo_loss", "torch")
def _grpo_loss_torch(logp, old_logp, ref_logp, advantages, mask, opts, entropy, sampler_logp,
                     importance_weights=None, row_stats=False):
    # All reductions in fp32 (fp64 inputs stay fp64); the per-token work is O(B*T), so plain torch
    # elementwise code is already bandwidth-bound on any device.
    dt = torch.float64 if logp.dtype == torch.float64 else torch.float32
    up = lambda t: None if t is None else t.to(dt)  # noqa: E731
    # Masked positions may hold anything (padding); zero them so no NaN leaks through 0 * NaN.
    active = mask.bool()
    clean = lambda t: None if t is None else torch.where(active, up(t), 0.0)  # noqa: E731
    logp = torch.where(_policy_lanes(mask, advantages), up(logp), 0.0)
    return reference.grpo_loss(logp, clean(old_logp), clean(ref_logp), up(advantages), mask, opts,
                               clean(entropy), clean(sampler_logp), importance_weights=clean(importance_weights),
                               row_stats=row_stats)


class _TritonGRPOLoss(torch.autograd.Function):
    """The kernel writes d loss / d logp and d loss / d entropy in the forward; backward scales them."""

    @staticmethod
    def forward(ctx, logp, entropy, old_logp, ref_logp, sampler_logp, advantages, mask, opts, importance_weights,
                check):
        from r1fast.kernels import grpo_loss as kernel

        row_loss, g_logp, g_ent, row_stats = kernel.grpo_loss_fwd(logp.detach(), old_logp, ref_logp, sampler_logp,
                                                                  None if entropy is None else entropy.detach(),
                                                                  mask, advantages, opts, isw=importance_weights,
                                                                  check=check)
        ctx.save_for_backward(g_logp, g_ent if g_ent is not None else g_logp)
        ctx.has_ent = g_ent is not None
        ctx.dtypes = (logp.dtype, None if entropy is None else entropy.dtype)
        # an output of a Function requires grad unless marked: the statistics built from it held this node (and
        # the saved gradients) for as long as they were kept
        row_stats = row_stats.detach()
        ctx.mark_non_differentiable(row_stats)
        # the statistics' gradient is never used: unmaterialised, backward gets None for it instead of a zeros
        # launch per call
        ctx.set_materialize_grads(False)
        return row_loss.sum(), row_stats

    @staticmethod
    def backward(ctx, g_loss, _g_stats):
        # the kernel's gradients are saved numbers with no graph: under create_graph=True a second
        # derivative built on them (a gradient penalty) would silently lose every term through the loss
        refuse_double_backward("grpo_loss")
        if g_loss is None:  # unmaterialised: no gradient reached the loss
            return (None,) * 10
        g_logp, g_ent = ctx.saved_tensors
        grad_logp = (g_logp * g_loss).to(ctx.dtypes[0])
        grad_ent = (g_ent * g_loss).to(ctx.dtypes[1]) if ctx.has_ent else None
        return grad_logp, grad_ent, None, None, None, None, None, None, None, None


@backends.register("grpo_loss", "triton")
def _grpo_loss_triton(logp, old_logp, ref_logp, advantages, mask, opts, entropy, sampler_logp,
                      importance_weights=None, row_stats=False, check_values=None):
    """`check_values`: a callable running the op's value checks, called (to raise) when the kernel counted a
    value they refuse; the count is read once, as the checks' own read was (None: not counted, no read)."""
    from r1fast.kernels import grpo_loss as kernel

    if logp.dtype == torch.float64:
        raise ValueError("grpo_loss: the triton backend computes in fp32; float64 inputs need backend='torch'")
    loss, rows = _TritonGRPOLoss.apply(logp, entropy, old_logp, ref_logp, sampler_logp, advantages, mask, opts,
                                       importance_weights, check_values is not None)
    tot = rows.sum(0)
    if check_values is not None and tot[kernel.STATS.index("bad")].item() != 0:  # a read, no launch
        check_values()
    stats = kernel.stats_from_rows(rows, ref_logp is not None, entropy is not None, sampler_logp is not None,
                                   opts.tis_mode, has_isw=importance_weights is not None, row_stats=row_stats, tot=tot)
    return loss, stats


def loss_options_of(options, loss_options) -> LossOptions:
    """The LossOptions a loss op runs with: `options` (or the defaults) with the call's keyword options over it."""
    return LossOptions.from_kwargs(options, **loss_options)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, entropy=None, sampler_logp=None,
              importance_weights=None, options: LossOptions | None = None, backend: str | None = None,
              check_values: bool = True, row_stats: bool = False, **loss_options):
    """(loss, stats) for per-token log-probs logp [B, T] (differentiable), old/ref/sampler log-probs [B, T] or
    None, advantages [B], mask [B, T]; entropy [B, T] enables the entropy bonus / statistic (entropy_coef != 0
    without it is a ValueError).

    `importance_weights`: precomputed importance weights, one per token [B, T] or one per row [B, 1]
    or [B] (broadcast over the row), e.g. TRL's vLLM `importance_sampling_ratio`. They multiply the
    policy term only (before beta·kl is added and the entropy bonus subtracted), carry no gradient
    (detached), must be finite and >= 0 at active tokens, and exclude `sampler_logp` (r1fast's own
    truncated IS): pass one or the other.

    Options: a LossOptions via `options=` and/or its fields as keywords (beta, epsilon, loss_type, ...).
    Stats: kl (with ref_logp), entropy (with entropy), clip_ratio/{low,high,region}_mean,
    is_weight/{mean,min,max} (with sampler_logp or importance_weights), num_tokens, as detached 0-d tensors;
    with `row_stats=True` also rows/clip_low and rows/clip_high [B], each row's count of active tokens clipped
    low / high (what TRL's per-sequence clip metrics, clip_ratio/low_min and high_max, are built from).
    `check_values=False` skips the checks that read values (NaN/inf at active tokens, a float mask
    holding only 0/1): they sync the host, which CUDA graphs and torch.compile cannot take; a NaN
    input then shows as a NaN loss. Shapes, dtypes and devices are always checked.
    """
    check_values, row_stats = flags("grpo_loss", check_values=check_values, row_stats=row_stats)
    opts = loss_options_of(options, loss_options)
    # here, not in validate_loss_inputs: fused_linear_grpo_loss forms the entropy itself
    if opts.entropy_coef != 0.0 and entropy is None:
        raise ValueError(f"grpo_loss: entropy_coef={opts.entropy_coef} needs entropy (the per-token entropy the "
                         f"bonus weights), or set entropy_coef=0")
    # the triton kernel counts the values the checks refuse in its own pass: no torch op, no pass of
    # its own and the one read after the launch, where the checks' read before it was ~35 launches
    defer = check_values and kernel_checks_values(mask, importance_weights)
    iw = validate_loss_inputs("grpo_loss", logp, old_logp, ref_logp, advantages, mask, sampler_logp, entropy, opts,
                              check_values=check_values, importance_weights=importance_weights, defer_values=defer)
    checked = (logp, old_logp, ref_logp, advantages, mask, sampler_logp, entropy, iw)  # as given, not resolve_neg's

    def values_checked_here(bad=None):  # bad=None: read whether one fails first, as validate_loss_inputs does
        check_loss_values("grpo_loss", *checked, bad=_any_bad_value(*checked) if bad is None else bad)

    try:
        _, fn = backends.resolve("grpo_loss", logp.device, backend, dtype=logp.dtype)
    except ValueError:
        if defer:  # a bad value was refused before the backend was looked up
            values_checked_here()
        raise
    logp, old_logp, ref_logp, advantages, mask, entropy, sampler_logp, iw = resolve_neg(
        logp, old_logp, ref_logp, advantages, mask, entropy, sampler_logp, iw)
    extra = {"row_stats": True} if row_stats else {}
    if iw is not None:
        extra["importance_weights"] = iw
    if defer and fn is _grpo_loss_triton:
        extra["check_values"] = lambda: values_checked_here(bad=True)  # the kernel's count said one may fail
    elif defer:
        values_checked_here()
    return fn(logp, old_logp, ref_logp, advantages, mask, opts, entropy, sampler_logp, **extra)


def per_sequence_clip_fractions(stats: dict, counts, advantages, options: LossOptions):
    """Each sequence's fraction of clipped tokens [B] (low, high), as TRL's masked_seq_mean reads them for
    its clip_ratio/low_min and high_max (the extremes over sequences): from the rows/clip_low and
    rows/clip_high counts of grpo_loss / fused_linear_grpo_loss with row_stats=True, each sequence's active
    token count `counts` [B] and its advantage [B].

    Token level: clipped / active tokens, NaN for a sequence without active tokens (TRL's 0 / 0, which its
    nanmin / nanmax skip). Sequence level: the sequence's own clip flag (its tokens share one ratio); a
    sequence without active tokens has ratio exp(0) = 1 in TRL, which clips only under cispo with
    epsilon_high < 1 (high, where its advantage is positive).
    """
    op = "per_sequence_clip_fractions"
    if not isinstance(options, LossOptions):
        raise TypeError(f"{op}: options must be a LossOptions, got {type(options).__name__}")
    if not isinstance(stats, Mapping):
        raise TypeError(f"{op}: stats must be the loss op's stats dict, got {type(stats).__name__}")
    missing = [k for k in ("rows/clip_low", "rows/clip_high") if k not in stats]
    if missing:
        raise ValueError(f"{op}: stats has no {' or '.join(missing)}: call the loss op with row_stats=True")
    for key in ("rows/clip_low", "rows/clip_high"):
        if not isinstance(stats[key], torch.Tensor):
            raise TypeError(f"{op}: stats[{key!r}] must be a tensor, got {type(stats[key]).__name__}")
    counts = _per_sequence(op, "counts", counts, stats["rows/clip_low"]).float()
    advantages = _per_sequence(op, "advantages", advantages, stats["rows/clip_low"])
    low, high = (stats[k].float() / counts for k in ("rows/clip_low", "rows/clip_high"))
    if options.importance_sampling_level != "sequence":
        return low, high
    empty = counts == 0
    ratio_one_clips_high = options.loss_type == "cispo" and 1.0 > options.eps_high
    empty_high = (advantages > 0).float() * float(ratio_one_clips_high)
    return torch.where(empty, 0.0, low), torch.where(empty, empty_high, high)


def _per_sequence(op, name, values, rows):
    """`values` (a tensor, or a host sequence of numbers) as a tensor on the device of `rows` (the loss op's per-row
    counts), after checking it holds one real number per sequence: torch.as_tensor's own errors ("Could not infer
    dtype of NoneType") named neither the op nor the argument, and a host list of advantages failed at sequence
    level only, where they are compared with 0."""
    if not isinstance(values, torch.Tensor):
        try:
            values = torch.as_tensor(values, device=rows.device)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{op}: {name} must be a tensor or a sequence of numbers, got {type(values).__name__}") \
                from None
    dense(op, **{name: values})
    if values.is_complex():
        raise TypeError(f"{op}: {name} must hold real numbers, got {values.dtype}")
    # the division broadcasts: counts [B, 1] made a [B, B] result, counts [1] one count for every sequence
    if tuple(values.shape) != tuple(rows.shape):
        raise ValueError(f"{op}: {name} must have one value per sequence, shape {tuple(rows.shape)} (as rows/clip_low), "
                         f"got {tuple(values.shape)}")
    if values.device != rows.device:
        raise ValueError(f"{op}: {name} is on {values.device}, the stats' rows on {rows.device}")
    return values
