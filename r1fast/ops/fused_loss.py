"""ops.fused_linear_grpo_loss: the GRPO loss straight from the last hidden states and the lm_head weight.

Never builds [tokens, V] logits. Two ways to get there, both from the active (mask=1) tokens only:

- single pass (torch and triton backends, the default): the active tokens are cut into chunks of
  at most `chunk` tokens. For each chunk the [chunk, V] fp32 logits are formed once, reduced to
  log-prob and entropy, the per-token loss of those tokens is evaluated with the whole batch's
  normalisers (LOSS_SPEC's aggregation only needs global counts and each row's token count, all
  known up front) and differentiated, and the same logits tile becomes d loss / d logits, which
  two matmuls turn into grad_hidden and grad_weight (summed in place in the weight's dtype, fp32
  inside each matmul). 6·N·H·V FLOPs, the
  matmul floor; the gradients are computed in the forward (as Liger does) and scaled in the
  backward. With token-level ratios a chunk may cut a completion (sequence-level truncated IS too,
  when old_logp is given: its weight is restated per token); sequence-level ratios (GSPO), or
  sequence-level truncated IS against the policy's own log-probs, need a whole completion's
  log-probs, so chunks hold whole rows.
- two pass (reference backend, or a sequence-level completion longer than one chunk):
  ops.grouped_logprob then ops.grpo_loss; grouped_logprob's backward recomputes the logits
  (8·N·H·V FLOPs).
"""
from __future__ import annotations

import bisect
import contextlib
import dataclasses
import itertools
import math

import torch

from r1fast import backends
from r1fast.ops.checks import dense, flags, kind_of, readable, resolve_neg
from r1fast.ops.logprob import (accumulate_weight_grad, engine_for, grouped_logprob, log_prob, refuse_double_backward,
                                validate as validate_logprob)
from r1fast.ops.loss import grpo_loss, loss_options_of, per_token_weights, validate_loss_inputs
from r1fast.ops.loss_options import LossOptions
from r1fast.reference import loss as reference

OP = "fused_linear_grpo_loss"
# Single-pass budget for one chunk's vocabulary-wide buffers (fp32 logits + d logits in the input
# dtype on the GPU; the torch engine also keeps a softmax temporary); it holds ~515 tokens at
# V = 151936 (a sequence-level completion must fit, else the call takes the two-pass path).
# The peak of a bf16 fwd+bwd at N=16384, H=4096, V=151936 (12.3k active tokens), over what the
# caller already holds, comes while a chunk forms its d logits (docs/loss.md, Memory):
#   grad_weight [V, H] bf16, summed in place chunk by chunk       1244.7 MB
#   grad_hidden [N, H] bf16 (padding rows too: the op's output)     134.2 MB
#   z: the chunk's fp32 logits [515, V] (cuBLAS or _logits_kernel)  313.0 MB
#   dl: d loss / d logits [515, V] bf16, read by the two matmuls    156.5 MB
#   the chunk's gathered hidden rows, d hidden rows, O(chunk) and O(B*T) vectors   ~7 MB
# = 1.856 GB (1e9). Until the loop freed each dl before the next chunk, the previous chunk's dl
# was alive too: 2.01 GB on the H200, over the 2 GB target. cuBLAS workspaces are allocated at
# the first call and stay. A smaller budget trades memory for speed: every chunk reads and writes
# all of grad_weight (2.5 GB) in its addmm, whose K is the chunk: ~K/2 FLOP per byte, so 515
# is compute-bound on an H200 (ridge ~206) and below ~410 memory-bound.
_SINGLE_PASS_BYTES = {"cuda": 448 << 20, "cpu": 64 << 20}
_BYTES_PER_LOGIT = {"cuda": 6, "cpu": 16}


def single_pass_chunk(vocab: int, device: torch.device) -> int:
    budget = _SINGLE_PASS_BYTES.get(device.type, 64 << 20)
    return max(1, budget // (_BYTES_PER_LOGIT.get(device.type, 16) * vocab))


def _checked_cu_seqlens(cu_seqlens):
    """cu_seqlens as int64, after the checks that read no device value."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{OP}: cu_seqlens must be an int32/int64 tensor")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{OP}: cu_seqlens must be [S+1] with S >= 1, got shape {tuple(cu_seqlens.shape)}")
    return cu_seqlens.long()


class _Layout:
    """Where each active token sits: flat index, (row, position) in the [rows, T] per-token layout."""

    def __init__(self, targets, mask, cu_seqlens, bad_values=None):
        """bad_values(active, counts), optional: a 0-d bool tensor read in the layout's one sync (as
        self.bad_values); active is the flat bool mask, counts the active tokens per row."""
        n = targets.numel()
        active = mask.reshape(-1).bool()
        if cu_seqlens is not None:
            if targets.dim() != 1:
                raise ValueError(f"{OP}: with cu_seqlens, hidden must be [N, H] and targets [N], got targets "
                                 f"{tuple(targets.shape)}")
            cu = _checked_cu_seqlens(cu_seqlens)
            lens = cu[1:] - cu[:-1]
            # active tokens per sequence, between boundaries clamped into [0, n]: bad ones index nothing out of
            # range before they are read (and refused) below
            ends = torch.cat([cu.new_zeros(1), active.long().cumsum(0)])
            bounds = cu.clamp(0, n)
            counts = ends[bounds[1:]] - ends[bounds[:-1]]
            head = [cu[0], cu[-1], lens.min(), lens.max()]
        else:
            if targets.dim() != 2:
                raise ValueError(f"{OP}: the padded layout needs hidden [B, T, H] and targets [B, T], got targets "
                                 f"{tuple(targets.shape)} (pass cu_seqlens for a packed [N, H] layout)")
            counts = active.reshape(targets.shape).sum(-1)
            head = []
        # the targets' range at active tokens (padding ids such as -100 elsewhere are never read)
        flat, big = targets.reshape(-1), torch.iinfo(targets.dtype).max
        t_range = [torch.where(active, flat, big).min(), torch.where(active, flat, -big).max()] if n else \
            [counts.new_zeros(()), counts.new_zeros(())]
        extra = [] if bad_values is None else [bad_values(active, counts)]
        # Everything the host needs read in one sync: the boundaries' checks, the targets' range, the caller's
        # value check and the tokens per row (the chunk plan). Each read apart was a sync of its own.
        host = torch.cat([torch.stack(head + t_range + extra).to(counts.dtype), counts]).tolist()
        if cu_seqlens is not None:
            first, last, shortest, longest = host[:4]
            if first != 0 or last != n or shortest < 0:
                raise ValueError(f"{OP}: cu_seqlens must start at 0, be non-decreasing and end at the token count {n}, "
                                 f"got {cu.tolist()[:8]}{'...' if cu.numel() > 8 else ''}")
            tok = torch.arange(n, device=cu.device)
            row = torch.searchsorted(cu[1:], tok, right=True)
            pos = tok - cu[row]
            self.shape2d = (lens.numel(), max(longest, 1))
        else:
            self.shape2d = tuple(targets.shape)
            flat = torch.arange(n, device=targets.device)
            row, pos = flat // self.shape2d[1], flat % self.shape2d[1]
        k = len(head)
        self.target_range = tuple(host[k:k + 2]) if n else None
        self.bad_values = bool(host[k + 2]) if extra else None
        self.packed = cu_seqlens is not None
        self._row_counts_host = host[k + 2 + len(extra):]
        num_active = sum(self._row_counts_host)
        self.all_active = num_active == n
        # nonzero_static: the count is known here already, where nonzero() read it from the device (a host sync
        # on a GPU whenever a token is masked)
        self.idx = None if self.all_active else torch.nonzero_static(active, size=num_active).squeeze(-1)
        self.row = row if self.all_active else row[self.idx]
        self.pos = pos if self.all_active else pos[self.idx]
        self.row_counts = counts

    def row_counts_host(self) -> list[int]:
        """row_counts as a list (read with the layout's one sync: the chunk plan and the single pass both need it)."""
        return self._row_counts_host

    def active(self, flat):
        return flat if self.all_active else flat[self.idx]

    def to2d(self, x, active_only=False):
        """flat-layout tensor (or active-token values) -> [rows, T], zero where no active token sits."""
        if x is None:
            return None
        x = x.reshape(-1)
        if not active_only:
            if not self.packed and self.all_active:
                return x.reshape(self.shape2d)
            x = self.active(x)
        return x.new_zeros(self.shape2d).index_put((self.row, self.pos), x)


def plan_chunks(row_counts, budget: int, split_rows: bool):
    """Token ranges [(start, end)] over the active tokens (rows one after another), each <= budget.

    With `split_rows` (token-level ratios: every token's loss needs only its own row's token count,
    known up front) a range may cut a completion, so any length fits the single pass. Otherwise
    ranges hold whole completions, and None means one completion alone exceeds the budget.
    """
    counts = row_counts.tolist() if isinstance(row_counts, torch.Tensor) else list(row_counts)
    total = sum(counts)
    if split_rows:
        return [(s, min(s + budget, total)) for s in range(0, total, budget)]
    if max(counts, default=0) > budget:
        return None
    chunks, start, used = [], 0, 0
    for c in counts:
        if used + c > budget and used > 0:
            chunks.append((start, start + used))
            start, used = start + used, 0
        used += c
    if used:
        chunks.append((start, start + used))
    return chunks


_MINMAX = {"is_weight/min": torch.minimum, "is_weight/max": torch.maximum}
_ROW_STATS = ("rows/clip_low", "rows/clip_high")  # [rows] vectors (row_stats=True): summed row by row


def _weights2d(lay, weights, targets):
    """importance_weights in the [rows, T] per-token layout: one weight per token (the targets' shape,
    [B, T] padded or [N] packed) or one per row ([B, 1] / [B] padded, [S, 1] packed: a 1-D [S] would
    read as [N] whenever S == N), broadcast over the row up front so that chunks may cut rows as for
    any per-token input."""
    if weights is None:
        return None
    if not lay.packed:
        return per_token_weights(OP, weights, targets.shape)  # [B, T] view (to2d reshapes it)
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        raise TypeError(f"{OP}: importance_weights must be a float tensor or None, got {kind_of(weights)}")
    rows = lay.shape2d[0]
    if weights.shape == targets.shape:
        return lay.to2d(weights.detach())
    if tuple(weights.shape) == (rows, 1):
        return weights.detach().expand(lay.shape2d)
    raise ValueError(f"{OP}: importance_weights must have the targets' shape {tuple(targets.shape)} (one weight per "
                     f"token) or [{rows}, 1] (one per packed sequence), got {tuple(weights.shape)}")


def _bad_value_check(mask, old_logp, ref_logp, sampler_logp, importance_weights, advantages, targets, wide):
    """For _Layout: (active, counts) -> 0-d bool, True where validate_loss_inputs' value check could fail on
    the [rows, T] inputs the layout builds (a mask value other than 0/1, a NaN/inf at an active token or in the
    advantages, a negative or NaN/inf importance weight at an active token), computed on the flat inputs so
    that it is read in the layout's sync instead of a sync of its own. It may say True where that check
    passes (inputs the shape checks refuse next), never False where it fails."""
    def check(active, counts):
        bad = [] if mask.dtype == torch.bool else [((mask.to(wide) != 0) & (mask.to(wide) != 1)).any()]
        for t in (old_logp, ref_logp, sampler_logp):
            if t is not None:
                bad.append((~torch.isfinite(t.detach().reshape(-1)) & active).any())
        w = importance_weights
        if isinstance(w, torch.Tensor) and w.is_floating_point():
            w_bad = ~torch.isfinite(w.detach()) | (w.detach() < 0)
            if w.shape == targets.shape:  # one weight per token
                bad.append((w_bad.reshape(-1) & active).any())
            elif w.numel() == counts.numel():  # one per row: counted where the row has an active token
                bad.append((w_bad.reshape(-1) & (counts > 0)).any())
            else:  # a shape _weights2d refuses
                bad.append(torch.ones((), dtype=torch.bool, device=active.device))
        if isinstance(advantages, torch.Tensor) and advantages.is_floating_point():
            bad.append((~torch.isfinite(advantages)).any())
        return torch.stack(bad).any() if bad else torch.zeros((), dtype=torch.bool, device=active.device)
    return check


class _SinglePass(torch.autograd.Function):
    """Loss forward that also forms grad_hidden / grad_weight; backward scales them by d out / d loss."""

    @staticmethod
    def forward(ctx, h_all, weight, run):
        loss, grad_h, grad_w, stats = run(h_all, weight)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.used, ctx.grad_scale = False, run.grad_scale
        run.stats = stats
        return loss

    @staticmethod
    def backward(ctx, g):
        refuse_double_backward(OP)
        if ctx.used:
            raise RuntimeError(f"{OP}: the single-pass backward runs once per forward (its gradients are "
                               f"scaled in place); call the op again instead of retain_graph=True")
        ctx.used = True
        grad_h, grad_w = ctx.saved_tensors
        # formed for an upstream gradient of grad_scale: g / grad_scale is exactly 1 when the caller
        # backwards with it (a power of two divides exactly)
        g = g if ctx.grad_scale == 1.0 else g / ctx.grad_scale
        # In place: a scaled copy of grad_weight would double its memory at the peak. No host sync
        # (float(g) would break CUDA graphs and stall the stream).
        return (None if grad_h is None else scale_(grad_h, g), None if grad_w is None else scale_(grad_w, g), None)


def scale_(x, g, slice_elems: int = 1 << 22):
    """x *= g (a 0-d tensor) in place, on the device, the product rounded once to x's dtype.

    bf16/fp16 x times a device scalar would round g to x's dtype first (a bias of up to 0.4% on
    every gradient): on a GPU one Triton pass (kernels/scale.py), elsewhere through fp32 in slices
    (16 MB of temporary, not a copy of x).
    """
    if x.dtype in (torch.float32, torch.float64):
        return x.mul_(g)
    if x.is_cuda and x.is_contiguous() and backends.triton_importable():
        from r1fast.kernels import scale as kernel

        with backends.on_device(x.device):
            return kernel.scale_inplace(x, g)
    g32 = g.to(torch.float32)
    if not x.is_contiguous():
        return x.copy_(x.float().mul_(g32))
    for part in x.view(-1).split(slice_elems):
        part.copy_(part.float().mul_(g32))
    return x


class _SinglePassRun:
    def __init__(self, layout, t_act, chunks, per_token, opts, engine, need_h, need_w, row_stats=False,
                 grad_scale=1.0):
        self.layout, self.t_act, self.chunks, self.per_token = layout, t_act, chunks, per_token
        self.opts, self.engine, self.need_h, self.need_w = opts, engine, need_h, need_w
        self.row_stats, self.grad_scale = row_stats, grad_scale
        self.stats = None
        # The triton engine also evaluates the per-token loss with the Triton kernel (fp32), whose
        # per-row statistic sums are collected here; the torch engine (and fp64) uses the torch twin.
        self.kernel_rows = [] if engine is engine_for("triton") and per_token[4].dtype == torch.float32 else None
        self.kernel_row_ids = []  # the batch row of each kernel_rows row (a row cut by a chunk appears twice)

    def __call__(self, h, w):
        lay, opts, eng = self.layout, self.opts, self.engine
        inv_temp = 1.0 / opts.temperature
        wide = torch.float64 if h.dtype == torch.float64 else torch.float32
        old2, ref2, smp2, adv, mask2, isw2 = self.per_token
        starts = [0, *itertools.accumulate(lay.row_counts_host())]
        row_counts = lay.row_counts.to(wide)
        # h holds every token (padding too): gathering the active rows per chunk instead of up front
        # saves a copy of the active hidden states and its gradient (~250 MB at N=16k, H=4096).
        grad_h = (torch.empty_like(h) if lay.all_active else torch.zeros_like(h)) if self.need_h else None
        grad_w = torch.zeros_like(w) if self.need_w else None  # summed in place in w's dtype: no [V, H] fp32
        loss = torch.zeros((), dtype=wide, device=h.device)
        stats = {}
        use_ent = opts.entropy_coef != 0.0
        for s, e in self.chunks:
            # the rows this token range touches (a row may continue into the next range)
            r0, r1 = bisect.bisect_right(starts, s) - 1, bisect.bisect_right(starts, e - 1)
            totals = (lay.shape2d[0], starts[-1], row_counts[r0:r1])
            h_c, t_c = (h[s:e] if lay.all_active else h[lay.idx[s:e]]), self.t_act[s:e]
            z, lse, zt, ent, lse_lo = eng.forward_keep(h_c, w, t_c, inv_temp)
            rr, pp = lay.row[s:e] - r0, lay.pos[s:e]
            shape = (r1 - r0, lay.shape2d[1])
            lp = log_prob(zt, lse, lse_lo).to(wide)
            lp2 = torch.zeros(shape, dtype=wide, device=h.device).index_put((rr, pp), lp)
            en2 = torch.zeros(shape, dtype=wide, device=h.device).index_put((rr, pp), ent.to(wide))
            m2 = torch.zeros(shape, dtype=wide, device=h.device).index_put((rr, pp), torch.ones_like(lse, dtype=wide))
            want_grad = self.need_h or self.need_w
            lp2.requires_grad_(want_grad)
            en2.requires_grad_(use_ent and want_grad)
            sl = lambda x: None if x is None else x[r0:r1]  # noqa: E731
            if self.kernel_rows is not None:  # Triton per-token kernel: loss, gradients, row stats at once
                from r1fast.kernels import grpo_loss as loss_kernel

                row_loss, g2, ge2, row_stats = loss_kernel.grpo_loss_fwd(
                    lp2.detach(), sl(old2), sl(ref2), sl(smp2), en2.detach(), m2, adv[r0:r1], opts, totals=totals,
                    isw=sl(isw2))
                self.kernel_rows.append(row_stats)
                self.kernel_row_ids.append(torch.arange(r0, r1, device=h.device))
                loss = loss + row_loss.sum()
                g_logp = g2[rr, pp]
                g_ent = ge2[rr, pp] if use_ent else None
            else:
                # no gradient wanted (no_grad, inference_mode, where enable_grad cannot turn autograd on): the loss only
                with torch.enable_grad() if want_grad else contextlib.nullcontext():
                    loss_c, st = reference.grpo_loss(lp2, sl(old2), sl(ref2), adv[r0:r1], m2, opts,
                                                     entropy=en2, sampler_logp=sl(smp2), totals=totals,
                                                     importance_weights=sl(isw2), row_stats=self.row_stats)
                    grads = torch.autograd.grad(loss_c, [lp2, en2] if use_ent else [lp2]) if want_grad else None
                if want_grad:
                    g_logp = grads[0][rr, pp]
                    g_ent = grads[1][rr, pp] if use_ent else None
                loss = loss + loss_c.detach()
                for k, v in st.items():
                    if k in _ROW_STATS:  # this chunk's rows r0:r1 of the batch's [rows] vector
                        stats[k] = stats[k] if k in stats else v.new_zeros(lay.shape2d[0])
                        stats[k][r0:r1] += v
                        continue
                    stats[k] = v if k not in stats else _MINMAX.get(k, torch.add)(stats[k], v)
            if self.need_h or self.need_w:
                if self.grad_scale != 1.0:  # fp32 factors: the 16-bit gradients are formed at the caller's loss scale
                    g_logp = g_logp * self.grad_scale
                    g_ent = None if g_ent is None else g_ent * self.grad_scale
                dl = eng.dlogits(h_c, w, t_c, lse, ent, g_logp, g_ent, inv_temp, h.dtype, z=z, lse_lo=lse_lo)
                del z
                if self.need_h and lay.all_active:
                    torch.mm(dl, w, out=grad_h[s:e])
                elif self.need_h:
                    grad_h.index_copy_(0, lay.idx[s:e], dl @ w)
                if self.need_w:
                    accumulate_weight_grad(grad_w, dl, h_c)
                # before the next chunk's logits: kept to the loop's next `dl =`, this chunk's d logits sat
                # beside the next z and dl (one dl tile, 156 MB at V=152k, too many at the peak)
                del dl
            else:
                # no gradients: the logits are done with too; kept to the next `z =`, two chunks' fp32
                # logits would be alive at once (626 MB at V=152k)
                del z
        totals = (lay.shape2d[0], starts[-1])
        if self.kernel_rows:
            from r1fast.kernels import grpo_loss as loss_kernel

            rows = torch.cat(self.kernel_rows)
            stats = loss_kernel.stats_from_rows(rows, ref2 is not None, True,
                                                smp2 is not None, opts.tis_mode, has_isw=isw2 is not None)
            if self.row_stats:  # per-row sums over the chunks that hold a piece of each row
                ids = torch.cat(self.kernel_row_ids)
                for k, col in (("rows/clip_low", "low"), ("rows/clip_high", "high")):
                    stats[k] = rows.new_zeros(lay.shape2d[0]).index_add_(0, ids, rows[:, loss_kernel.STATS.index(col)])
        if totals[1] == 0:
            for k in _MINMAX:
                if k in stats:
                    stats[k] = torch.zeros_like(stats[k])
        if not stats:  # no active token at all: the statistics of an empty batch
            _, stats = reference.grpo_loss(mask2.to(wide), old2, ref2, adv, mask2, opts, sampler_logp=smp2,
                                           entropy=mask2.to(wide), importance_weights=isw2, row_stats=self.row_stats)
        return loss, grad_h, grad_w, stats


def _bad_log_prob_error(lay, h_act, weight, logp, ent):
    """The ValueError naming the first active token whose log-prob or entropy is NaN/inf, and why; None if none is."""
    bad = ~(torch.isfinite(logp) & torch.isfinite(ent))
    if not bool(bad.any()):
        return None
    i = int(bad.nonzero()[0])
    where = f"row {int(lay.row[i])}, position {int(lay.pos[i])}"
    bad_vocab = (~torch.isfinite(weight)).any(-1)
    if not bool(torch.isfinite(h_act[i]).all()):
        cause = "hidden has NaN/inf there"
    elif bool(bad_vocab.any()):
        cause = f"weight has NaN/inf (first in its row {int(bad_vocab.nonzero()[0])}, a vocabulary id)"
    else:
        cause = "its logits hidden @ weight.T / temperature overflow"
    return ValueError(f"{OP}: non-finite log-prob at {where}: {cause}")


def _non_finite_loss_error(lay, h_act, weight, t_act, per_token, opts, backend, chunk_size, logp=None, ent=None):
    """The ValueError for a non-finite loss, naming the input that made it and its row (the completion, or the
    packed sequence) and position. Only on that error path: it recomputes the log-probs and each row's loss."""
    if logp is None:
        with torch.no_grad():
            logp, ent = grouped_logprob(h_act, weight, t_act, temperature=opts.temperature, return_entropy=True,
                                        backend=backend, chunk_size=chunk_size, check_targets=False)
    err = _bad_log_prob_error(lay, h_act, weight, logp, ent)
    if err is not None:
        return err
    old2, ref2, smp2, adv, mask2, isw2 = per_token
    lp2 = lay.to2d(logp.detach().to(mask2.dtype), active_only=True)
    rows, total = mask2.shape[0], float(mask2.sum())
    sl = lambda x, r: None if x is None else x[r:r + 1]  # noqa: E731

    def row_is_finite(r, mask_r, old=old2):
        with torch.no_grad():
            loss_r, _ = reference.grpo_loss(lp2[r:r + 1], sl(old, r), sl(ref2, r), adv[r:r + 1], mask_r[None], opts,
                                            sampler_logp=sl(smp2, r), importance_weights=sl(isw2, r),
                                            totals=(rows, total))
        return bool(torch.isfinite(loss_r))

    for r in range(rows):
        if not row_is_finite(r, mask2[r]):
            why = _why_row_is_not_finite(lp2[r], old2, ref2, mask2[r] > 0, r, opts,
                                         lambda r=r: row_is_finite(r, mask2[r], old=lp2))
            if why is None:
                inputs = {"old_logp": old2, "ref_logp": ref2, "sampler_logp": smp2, "importance_weights": isw2}
                why = _first_overflowing_token(lp2[r], mask2[r], adv[r], inputs, r, opts,
                                               lambda keep, r=r: row_is_finite(r, keep))
            return ValueError(f"{OP}: non-finite loss at row {r}: {why}")
    return ValueError(f"{OP}: non-finite loss though every row's log-probs and loss are finite")


def _pair(name, given, logp):
    """The two log-probs a ratio compares: a policy's log-prob of -1e38 (finite logits as large as hidden @ weight.T
    can make them) is the culprit there, not the old or reference log-prob beside it."""
    return f"{name} {float(given):.4g}, the policy's log-prob {float(logp):.4g}"


def _why_row_is_not_finite(lp, old2, ref2, act, r, opts, finite_at_ratio_one):
    """Which input makes row r's loss NaN/inf, its log-probs lp being finite: a ratio or a k3 KL past the dtype.
    A ratio past the dtype is named only if finite_at_ratio_one() (the row's loss with old_logp = logp) is: at a
    positive advantage the clip keeps it finite (min(ratio * A, clip(ratio) * A)), and another input overflows."""
    limit = math.log(torch.finfo(lp.dtype).max)
    pos = act.nonzero().squeeze(-1)
    if old2 is not None and finite_at_ratio_one():
        log_ratio = (lp - old2[r])[pos]
        if opts.importance_sampling_level == "sequence" and log_ratio.mean() > limit:
            return (f"the importance ratio exp(logp - old_logp) overflows: the row's mean log-ratio is "
                    f"{float(log_ratio.mean()):.4g} > {limit:.4g} (old_logp far below the policy's log-probs)")
        if opts.importance_sampling_level == "token" and log_ratio.max() > limit:
            p = int(pos[log_ratio.argmax()])
            return (f"the importance ratio exp(logp - old_logp) overflows at position {p}: log-ratio "
                    f"{float(log_ratio.max()):.4g} > {limit:.4g} (old_logp far below the policy's log-prob: "
                    f"{_pair('old_logp', old2[r, p], lp[p])})")
    if ref2 is not None and opts.beta != 0.0 and opts.kl_estimator == "k3":
        gap = (ref2[r] - lp)[pos]
        if gap.max() > limit:
            p = int(pos[gap.argmax()])
            return (f"the k3 KL exp(ref_logp - logp) overflows at position {p}: ref_logp - logp = "
                    f"{float(gap.max()):.4g} > {limit:.4g} (ref_logp far above the policy's log-prob: "
                    f"{_pair('ref_logp', ref2[r, p], lp[p])})")
    return None


def _first_overflowing_token(lp, mask_r, adv_r, inputs, r, opts, is_finite):
    """Where a row's loss overflows though no ratio or k3 KL does (a huge importance weight or advantage, a
    bias-corrected or k2 KL): the first active token whose term is not finite, with every input's value there.
    Token terms are independent only with token-level ratios and weights: otherwise the row is named alone."""
    unlocated = "its log-probs and inputs are finite; the objective itself overflows"
    if opts.importance_sampling_level != "token" or (inputs["sampler_logp"] is not None and opts.tis_level != "token"):
        return unlocated
    pos = (mask_r > 0).nonzero().squeeze(-1).tolist()
    places = torch.arange(mask_r.numel(), device=mask_r.device)

    def first_non_finite_prefix(scale):
        """the first k whose prefix of active tokens (the first k + 1) gives a non-finite loss: ~log2(T) evaluations"""
        return bisect.bisect_left(range(len(pos)), True,
                                  key=lambda k: not is_finite(torch.where(places <= pos[k], mask_r * scale, 0)))

    # Each token weighted 2^-n (2^n >= 2 x its tokens, exact): finite terms, each under the dtype's max, then sum to
    # a finite loss, so only a token whose own term is NaN/inf makes a prefix non-finite. At weight 1 a sum of large
    # finite terms could overflow before that token and be named in its place.
    k = first_non_finite_prefix(2.0 ** -(2 * len(pos)).bit_length())
    what = "the objective overflows"
    if k == len(pos):
        k, what = first_non_finite_prefix(1.0), "each token's term is finite; their sum overflows"
    if k == len(pos):
        return unlocated
    p = pos[k]
    values = [f"the policy's log-prob {float(lp[p]):.4g}"] + [
        f"{name} {float(x[r, p]):.4g}" for name, x in inputs.items() if x is not None] + [
        f"advantage {float(adv_r):.4g}"]
    return f"its log-probs and inputs are finite; {what} at position {p} ({', '.join(values)})"


def fused_linear_grpo_loss(hidden, weight, targets, mask, advantages, *, old_logp=None, ref_logp=None,
                           sampler_logp=None, importance_weights=None, cu_seqlens=None,
                           options: LossOptions | None = None,
                           backend: str | None = None, chunk_size: int | None = None, single_pass: bool = True,
                           row_stats: bool = False, grad_scale: float = 1.0, **loss_options):
    """GRPO loss straight from the last hidden states and the lm_head weight; never builds the logits.

    Padded layout: hidden [B, T, H], targets / mask / old / ref / sampler [B, T], advantages [B].
    Packed layout (cu_seqlens [S+1]): hidden [N, H], targets / mask / ... [N], advantages [S].
    `importance_weights`: precomputed per-token weights on the policy term, as in ops.grpo_loss
    (e.g. TRL's vLLM `importance_sampling_ratio`), no gradient, excluding sampler_logp. Shapes:
    the targets' ([B, T] padded, [N] packed), or one per row: [B, 1] / [B] padded, [S, 1] packed.
    Returns (loss, stats) as ops.grpo_loss, with the mean `entropy` always in stats; gradients flow
    to hidden and weight. `backend` picks the log-prob engine (reference | torch | triton);
    `chunk_size` caps the tokens whose logits exist at once; `single_pass=False` forces the
    grouped_logprob + grpo_loss composition. Computes in fp32 (fp64 for fp64 inputs) under an
    enclosing torch.autocast too. Differentiable once (no create_graph=True double backward).
    `row_stats=True` adds ops.grpo_loss's per-row clip counts (rows/clip_low, rows/clip_high: [B] padded,
    [S] packed).
    `grad_scale`: the upstream gradient the caller will backward with (its loss scale: fp16 training
    runs `(loss * S).backward()`). The single pass forms grad_hidden / grad_weight in the forward, in
    the inputs' dtype; formed at scale 1 and multiplied by S afterwards, fp16 gradients below 6e-8 are
    already zero (at a token mean over 64k tokens, most of grad_weight). Any upstream gradient g still
    gives the exact gradient (the forward's are scaled by g / grad_scale); a power of two keeps that exact.
    """
    with backends.without_autocast(getattr(hidden, "device", "cpu")):
        return _fused_linear_grpo_loss(hidden, weight, targets, mask, advantages, old_logp=old_logp,
                                       ref_logp=ref_logp, sampler_logp=sampler_logp,
                                       importance_weights=importance_weights, cu_seqlens=cu_seqlens, options=options,
                                       backend=backend, chunk_size=chunk_size, single_pass=single_pass,
                                       row_stats=row_stats, grad_scale=grad_scale, **loss_options)


def _fused_linear_grpo_loss(hidden, weight, targets, mask, advantages, *, old_logp, ref_logp, sampler_logp,
                            importance_weights, cu_seqlens, options, backend, chunk_size, single_pass, row_stats,
                            grad_scale, **loss_options):
    single_pass, row_stats = flags(OP, single_pass=single_pass, row_stats=row_stats)
    opts = loss_options_of(options, loss_options)
    if isinstance(grad_scale, bool) or not isinstance(grad_scale, (int, float)) or \
            not 0 < grad_scale < float("inf"):
        raise ValueError(f"{OP}: grad_scale must be a finite number > 0 (the loss scale), got {grad_scale!r}")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{OP}: mask must be a tensor")
    dense(OP, mask=mask, advantages=advantages, old_logp=old_logp, ref_logp=ref_logp, sampler_logp=sampler_logp,
          importance_weights=importance_weights, cu_seqlens=cu_seqlens)
    validate_logprob(hidden, weight, targets, opts.temperature, op=OP, check_targets=False)
    if mask.shape != targets.shape:
        raise ValueError(f"{OP}: mask shape {tuple(mask.shape)} != targets shape {tuple(targets.shape)}")
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("sampler_logp", sampler_logp)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != targets.shape):
            raise ValueError(f"{OP}: {name} must have the targets' shape {tuple(targets.shape)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{OP}: chunk_size must be a positive int, got {chunk_size!r}")
    elsewhere = [f"{name} on {t.device}" for name, t in (
        ("mask", mask), ("cu_seqlens", cu_seqlens), ("advantages", advantages), ("old_logp", old_logp),
        ("ref_logp", ref_logp), ("sampler_logp", sampler_logp), ("importance_weights", importance_weights))
        if isinstance(t, torch.Tensor) and t.device != hidden.device]
    if elsewhere:
        raise ValueError(f"{OP}: every tensor must be on hidden's device {hidden.device}; got {', '.join(elsewhere)}")
    readable(OP, hidden, "the plan of active tokens per row (from mask and cu_seqlens)")
    hidden, weight, mask, advantages, old_logp, ref_logp, sampler_logp, importance_weights = resolve_neg(
        hidden, weight, mask, advantages, old_logp, ref_logp, sampler_logp, importance_weights)
    wide = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    lay = _Layout(targets, mask, cu_seqlens, _bad_value_check(mask, old_logp, ref_logp, sampler_logp,
                                                              importance_weights, advantages, targets, wide))
    rows = lay.shape2d[0]
    isw2 = _weights2d(lay, importance_weights, targets)
    if not isinstance(advantages, torch.Tensor) or advantages.shape != (rows,):
        raise ValueError(f"{OP}: advantages must be [{'S' if lay.packed else 'B'}={rows}], got "
                         f"{tuple(advantages.shape) if isinstance(advantages, torch.Tensor) else advantages!r}")
    t_act = lay.active(targets.reshape(-1))
    if t_act.numel():
        lo, hi = lay.target_range
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(f"{OP}: targets at active tokens must lie in [0, {weight.shape[0]}) (the vocabulary), "
                             f"got min {lo}, max {hi}")
    try:
        lb, _ = backends.resolve("grouped_logprob", hidden.device, backend, dtype=hidden.dtype)
    except ValueError as e:  # its message names grouped_logprob alone, an op the caller never called
        raise ValueError(f"{OP}: backend= picks its log-prob engine, which refused it: {e}") from None
    if lb == "triton" and hidden.dtype == torch.float64:
        raise ValueError(f"{OP}: the triton backend takes fp16/bf16/fp32 inputs, got float64 "
                         f"(use backend='torch' or 'reference')")
    chunk = chunk_size or single_pass_chunk(weight.shape[0], hidden.device)
    # A sequence-level sampler weight exp(sum of the row's old - sampler) depends on inputs only when old_logp
    # is given: restated per token below, chunks may then cut the row. Computed from the policy's own
    # log-probs (no old_logp) it needs the whole row first, as sequence-level ratios (GSPO) do.
    restate_seq_tis = sampler_logp is not None and old_logp is not None and opts.tis_level == "sequence"
    split_rows = opts.importance_sampling_level == "token" and (
        sampler_logp is None or opts.tis_level == "token" or restate_seq_tis)
    chunks = plan_chunks(lay.row_counts_host(), max(chunk, 1), split_rows) if single_pass and lb in ("torch", "triton") \
        else None

    mask2 = lay.to2d(mask.to(wide))
    old2, ref2, smp2 = lay.to2d(old_logp), lay.to2d(ref_logp), lay.to2d(sampler_logp)
    # checked here for both paths, so that an error names this op (the two-pass grpo_loss then skips the checks)
    # the values are read only when the layout's read found a bad one: the check then names it
    isw2 = validate_loss_inputs(OP, torch.zeros_like(mask2), old2, ref2, advantages, mask2, smp2, None, opts,
                                 importance_weights=isw2, check_values=lay.bad_values)
    if chunks is None:  # two pass: grouped_logprob (recomputing backward) then grpo_loss
        h_act = lay.active(hidden.reshape(-1, hidden.shape[-1]))
        logp_act, ent_act = grouped_logprob(h_act, weight, t_act, temperature=opts.temperature,
                                            return_entropy=True, backend=lb, chunk_size=chunk_size,
                                            check_targets=False)
        if opts.entropy_coef == 0.0:
            ent_act = ent_act.detach()  # statistic only: keep it out of the backward
        loss, stats = grpo_loss(lay.to2d(logp_act, active_only=True), old2, ref2, advantages, mask2,
                                entropy=lay.to2d(ent_act, active_only=True), sampler_logp=smp2,
                                importance_weights=isw2, options=opts, check_values=False,
                                backend=lb if lb in ("reference", "torch") else None, row_stats=row_stats)
        # refused as the single pass refuses it, naming the cause and the row; one host sync for all three
        if not bool(torch.isfinite(loss) & torch.isfinite(logp_act).all() & torch.isfinite(ent_act).all()):
            clean = lambda x: None if x is None else torch.where(mask2 > 0, x.to(logp_act.dtype), 0.0)  # noqa: E731
            per_token = (clean(old2), clean(ref2), clean(smp2), advantages.to(logp_act.dtype), mask2.to(logp_act.dtype),
                         clean(isw2))
            raise _non_finite_loss_error(lay, h_act, weight, t_act, per_token, opts, lb, chunk_size,
                                         logp=logp_act.detach(), ent=ent_act.detach())
        return loss, stats

    active2 = mask2 > 0
    clean = lambda x: None if x is None else torch.where(active2, x.to(wide), 0.0)  # noqa: E731
    old_c, smp_c = clean(old2), clean(smp2)
    if restate_seq_tis:
        # sampler' = old - (the row's sum of old - sampler) at each token: the token-level weight
        # exp(old - sampler') is then the row's sequence-level weight at every one of its tokens
        smp_c = old_c - (old_c - smp_c).sum(-1, keepdim=True)
        opts = dataclasses.replace(opts, tis_level="token")
    need = torch.is_grad_enabled()
    run = _SinglePassRun(lay, t_act.contiguous(), chunks, (old_c, clean(ref2), smp_c, advantages.to(wide),
                                                           mask2, clean(isw2)),
                         opts, engine_for(lb), need and hidden.requires_grad, need and weight.requires_grad,
                         row_stats, float(grad_scale))
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    h_all = hidden.reshape(-1, hidden.shape[-1])
    h = h_all if h_all.stride(-1) == 1 else h_all.contiguous()
    if run.need_h or run.need_w:
        loss = _SinglePass.apply(h, w, run)
    else:
        loss, _, _, run.stats = run(h.detach(), w.detach())
    stats = run.stats
    finite = torch.isfinite(loss) & torch.isfinite(stats["entropy"]) if "entropy" in stats else torch.isfinite(loss)
    if not bool(finite):  # one host sync
        raise _non_finite_loss_error(lay, lay.active(h), w, run.t_act, run.per_token, run.opts, lb, chunk_size)
    return loss, stats
