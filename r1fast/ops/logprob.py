"""ops.grouped_logprob: log-probabilities (and entropies) of target tokens straight from hidden states.

    z = hidden @ weight.T / temperature        (fp32 accumulation)
    logp = z[target] - logsumexp(z)            entropy = logsumexp(z) - Σ softmax(z)·z
    hit = target == argmax(z)                  (return_argmax_hit; lowest id on ties, as torch.argmax)

Backends: `reference` materialises [N, V] logits (float64-capable, the oracle); `torch` walks token
chunks so extra memory is chunk x V (the CPU path); `triton` keeps only O(N) state in the forward
and a chunk x V gradient tile in the backward (kernels/logprob.py). torch and triton share one
autograd.Function: the forward saves hidden, weight, targets, lse (with the residual its fp32
rounding dropped) and entropy (no logits), the backward recomputes each chunk's logits, forms
d loss / d logits and multiplies it into grad_hidden and grad_weight (summed over chunks in place
in the weight's dtype, deterministic).
"""
from __future__ import annotations

import contextlib
import math
import os

import torch

from r1fast import backends
from r1fast.ops.checks import FLOATS, bool_mask, flags, readable, require_tensors, resolve_neg
from r1fast.reference import loss as reference

# Extra-memory budget for the [chunk, V] tiles one chunk keeps alive at once (bytes per logit: the
# engine's tile_bytes_per_logit). With grad_weight (V·H·2) and grad_hidden that keeps fwd+bwd under
# 2 GB of extra memory at N=16k, H=4096, V=152k, bf16: the triton backend's backward holds only a
# bf16 d logits tile (~880-token chunks, 268 MB: ~1.65 GB in all); under R1FAST_LOGITS_GEMM=cublas
# it holds the fp32 logits beside it (~590-token chunks, 357 + 179 MB: ~1.92 GB). Sized for the
# fp32 tile alone, the cublas backward's chunk held 805 MB (2.3 GB in all on the H200 bench).
_CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 512 << 20}


def default_chunk(n: int, v: int, device: torch.device, bytes_per_logit: int = 4) -> int:
    budget = _CHUNK_BYTES.get(device.type, 64 << 20)
    return max(1, min(n, budget // (bytes_per_logit * max(v, 1))))


def validate(hidden, weight, targets, temperature, op="grouped_logprob", check_targets=True):
    require_tensors(op, hidden=hidden, weight=weight, targets=targets)
    if hidden.dtype not in FLOATS:
        raise TypeError(f"{op}: hidden must be a float tensor (fp16/bf16/fp32/fp64), got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{op}: weight dtype {weight.dtype} != hidden dtype {hidden.dtype}")
    if targets.dtype != torch.int64:
        raise TypeError(f"{op}: targets must be int64 token ids, got {targets.dtype}")
    if hidden.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"{op}: hidden must be [..., H] and weight [V, H], got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: hidden size {hidden.shape[-1]} != weight's {weight.shape[1]} "
                         f"(hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)})")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"{op}: targets shape {tuple(targets.shape)} must equal hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if weight.shape[0] < 1:
        raise ValueError(f"{op}: weight has an empty vocabulary")
    if hidden.shape[-1] < 1:  # torch's "cannot reshape tensor of 0 elements" named neither the op nor the size
        raise ValueError(f"{op}: the hidden size H must be >= 1, got hidden {tuple(hidden.shape)}, weight "
                         f"{tuple(weight.shape)}")
    if len({hidden.device, weight.device, targets.device}) != 1:
        raise ValueError(f"{op}: hidden, weight, targets must be on one device, got "
                         f"{hidden.device}, {weight.device}, {targets.device}")
    # the logits are divided by T in float32, which overflows for an ordinary logit only far below any
    # sampling temperature (T=1e-38: -inf or NaN log-probs, and the fused loss blamed "NaN/inf in hidden or
    # weight"); the floor taken is the one rollouts and the config sample at, well clear of that
    from r1fast.rollout.params import MIN_TEMPERATURE

    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
            not MIN_TEMPERATURE <= temperature < math.inf:
        raise ValueError(f"{op}: temperature must be a finite number >= {MIN_TEMPERATURE} (logits / temperature "
                         f"must stay a finite float32), got {temperature!r}")
    if check_targets and targets.numel():
        readable(op, targets, "the vocabulary bounds check of targets (check_targets=False skips it)")
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(f"{op}: targets must lie in [0, {weight.shape[0]}) (the vocabulary), got min {lo}, max {hi}")


# --- the two chunked engines: forward (lse, target logit, entropy) and d loss / d logits per chunk ----------

class _TorchEngine:
    @staticmethod
    def tile_bytes_per_logit(dtype) -> int:
        """Bytes per logit of the chunk tiles grouped_logprob's budget counts: the fp32 logits. Not all
        this engine keeps: inside dlogits p, dz and the entropy term's operands are fp32 tiles too (six
        beside each other with the entropy), so on a GPU its backward is not held to the 2 GB target
        (the triton engine is)."""
        return 4

    # x * 1.0 == x exactly, so the temperature pass over a [chunk, V] tile is skipped at T = 1; the
    # remaining in-place updates and negated vectors give the same bits as the out-of-place forms.
    @staticmethod
    def _logits(h, w, inv_temp):
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        z = h.to(acc) @ w.to(acc).T
        return z if inv_temp == 1.0 else z.mul_(inv_temp)

    @staticmethod
    def _reduce(z, t, with_entropy, with_hit):
        """(lse, target logit, entropy or None, target-is-argmax or None, lse residual) of one chunk's logits;
        z is overwritten with z - its row max."""
        zt = z.gather(-1, t[:, None]).squeeze(-1)
        # from z itself, before it is shifted: z - max can round two distinct logits into a tie
        hit = z.argmax(-1) == t if with_hit else None
        shift = sum_shift(z.amax(-1))
        z.sub_(shift[:, None])  # in place: the chunk tile is the only big buffer
        lse, ent, lse_lo = _reduce_about_max(z, shift, with_entropy)
        return lse, zt, ent, hit, lse_lo

    @classmethod
    def forward(cls, h, w, t, inv_temp, with_entropy, chunk, with_hit=False):
        """(lse, target logit, entropy or None, target-is-argmax or None), each [N]."""
        n = h.shape[0]
        if n <= chunk:  # one chunk: no per-chunk copies into preallocated outputs
            return cls._reduce(cls._logits(h, w, inv_temp), t, with_entropy, with_hit)
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        lse = torch.empty(n, dtype=acc, device=h.device)
        zt = torch.empty_like(lse)
        lse_lo = torch.empty_like(lse)
        ent = torch.empty_like(lse) if with_entropy else None
        hit = torch.empty(n, dtype=torch.bool, device=h.device) if with_hit else None
        for s in range(0, n, chunk):
            lse_c, zt_c, ent_c, hit_c, lo_c = cls._reduce(cls._logits(h[s:s + chunk], w, inv_temp), t[s:s + chunk],
                                                          with_entropy, with_hit)
            lse[s:s + chunk] = lse_c
            zt[s:s + chunk] = zt_c
            lse_lo[s:s + chunk] = lo_c
            if with_entropy:
                ent[s:s + chunk] = ent_c
            if with_hit:
                hit[s:s + chunk] = hit_c
        return lse, zt, ent, hit, lse_lo

    @classmethod
    def forward_keep(cls, h, w, t, inv_temp):
        """(z, lse, target logit, entropy, lse residual) of one chunk, keeping its [chunk, V] logits for
        dlogits(z=...)."""
        z = cls._logits(h, w, inv_temp)
        shift = sum_shift(z.amax(-1))
        lse, ent, lse_lo = _reduce_about_max(z - shift[:, None], shift, True)
        return z, lse, z.gather(-1, t[:, None]).squeeze(-1), ent, lse_lo

    @classmethod
    def dlogits(cls, h, w, t, lse, ent, g_logp, g_ent, inv_temp, out_dtype, z=None, lse_lo=None):
        z = cls._logits(h, w, inv_temp) if z is None else z
        log_p = torch.sub(z, lse[:, None])
        if lse_lo is not None:  # (z - lse) - residual: see lse_parts
            log_p.sub_(lse_lo[:, None])
        p = log_p.exp() if g_ent is not None else log_p.exp_()
        neg_g = g_logp.neg()[:, None]
        # (-p) * g == p * (-g) bit for bit; p itself is only needed again by the entropy term
        dz = p.mul_(neg_g) if g_ent is None and torch.result_type(p, neg_g) == p.dtype else p * neg_g
        dz.scatter_add_(1, t[:, None], g_logp[:, None].to(dz.dtype))
        if g_ent is not None:
            # d entropy / d z = -p (z - Σ p z) = -p (log p + entropy); z - (lse - entropy) rounded lse - entropy to
            # |z|'s ulp first, which was all of z - Σ p z at a peaked row's max
            dz -= log_p.add_(ent[:, None]).mul_(p).mul_(g_ent[:, None])
        if inv_temp != 1.0:
            dz.mul_(inv_temp)
        return dz.to(out_dtype)


def sum_shift(m):
    """What the log-sum-exp sums are taken about: the row max m, 0 where m is ±inf (torch.logsumexp's rule, so
    a +inf logit sums to inf rather than exp(inf - inf) = NaN)."""
    return torch.where(m.abs() == math.inf, torch.zeros_like(m), m)


def lse_parts(shift, log_s):
    """(lse, residual): lse = shift + log s rounded, and the part of shift + log s that rounding dropped
    (TwoSum, exact). lse alone is up to half |z|'s ulp off, which is all of log p at a peaked row's max
    (~-Σ exp(z - max) there), so the backward and log_prob form log p = (z - lse) - residual. 0 where lse is
    not finite."""
    lse = shift + log_s
    b = lse - shift
    residual = (shift - (lse - b)) + (log_s - b)
    return lse, torch.where(torch.isfinite(lse), residual, torch.zeros_like(residual))


def log_prob(zt, lse, lse_lo):
    """log p of the target from its logit zt, lse and lse's residual (lse_parts): zt - lse is exact when zt is
    near lse (Sterbenz), so the residual's digits survive; zt - lse alone is up to half |z|'s ulp off, all of
    log p for a peaked row's argmax (~-Σ exp(z - max) there). Per row: the forward's log-prob output in every
    path (grad, no-grad, the fused loss's single pass) is this one expression, so they agree bit for bit."""
    return (zt - lse) - lse_lo


def _reduce_about_max(d, shift, with_entropy):
    """(lse, entropy or None, lse residual) [n] of logits z = d + shift, d [n, V] taken about the row max.

    The entropy is log s - t/s, s = Σ exp(d), t = Σ exp(d)·d. lse - Σ softmax·z (or -Σ p·log p with
    log p = z - lse) cancels for a peaked row: both terms are ~max, so fp32 kept an error of ~|z|'s ulp
    (3e-5 at |z| ~ 1e3) in an entropy that may be 1e-5."""
    e = d.exp()
    s = e.sum(-1)
    log_s = s.log()
    lse, lse_lo = lse_parts(shift, log_s)
    return lse, log_s - e.mul_(d).sum(-1) / s if with_entropy else None, lse_lo


LOGITS_GEMMS = ("triton", "cublas")


def logits_gemm() -> str:
    """Who forms the logits tiles on the triton backend: R1FAST_LOGITS_GEMM=triton (default: the
    Triton kernels, fused with the reductions where no tile is kept) or cublas (torch.mm with fp32
    output, then the Triton reductions read the tile: LOAD_Z). Both accumulate in fp32; the bench
    suites time both, so a GPU run says which is faster on that card."""
    choice = os.environ.get("R1FAST_LOGITS_GEMM", "triton") or "triton"
    if choice not in LOGITS_GEMMS:
        raise ValueError(f"R1FAST_LOGITS_GEMM={choice!r}: must be one of {', '.join(LOGITS_GEMMS)}")
    return choice


def cublas_logits(h, w, inv_temp):
    """fp32 logits / temperature [n, V] from torch.mm: fp16/bf16 inputs accumulate and come out in fp32
    (out_dtype), fp32 inputs run in fp32; never a low-precision [n, V] tile."""
    if h.dtype == torch.float32:
        z = torch.mm(h, w.t())
    else:
        try:
            z = torch.mm(h, w.t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError) as e:
            raise RuntimeError(f"R1FAST_LOGITS_GEMM=cublas needs torch.mm(..., out_dtype=torch.float32) for "
                               f"{h.dtype} on {h.device.type}, which this torch lacks ({e}); unset it") from None
    return z if inv_temp == 1.0 else z.mul_(inv_temp)


class _TritonEngine:
    @staticmethod
    def tile_bytes_per_logit(dtype) -> int:
        """Bytes per logit alive at once for one chunk: the backward's d logits tile (in the input dtype,
        at most fp32's 4; the default forward keeps no tile), and with R1FAST_LOGITS_GEMM=cublas the
        fp32 logits tile torch.mm writes beside it."""
        return 4 + dtype.itemsize if logits_gemm() == "cublas" else 4

    @staticmethod
    def forward(h, w, t, inv_temp, with_entropy, chunk, with_hit=False):
        from r1fast.kernels import logprob as kernel

        if logits_gemm() == "triton":  # one launch: the logits never leave the kernel
            return kernel.logprob_forward(h, w, t, inv_temp, with_entropy, with_hit=with_hit)
        parts = [kernel.logprob_forward(h[s:s + chunk], w, t[s:s + chunk], inv_temp, with_entropy,
                                        z=cublas_logits(h[s:s + chunk], w, inv_temp), with_hit=with_hit)
                 for s in range(0, h.shape[0], chunk)]
        return tuple(torch.cat(x) if x[0] is not None else None for x in zip(*parts))

    @staticmethod
    def forward_keep(h, w, t, inv_temp):
        from r1fast.kernels import logprob as kernel

        z = kernel.logits(h, w, inv_temp) if logits_gemm() == "triton" else cublas_logits(h, w, inv_temp)
        lse, zt, ent, _, lse_lo = kernel.logprob_forward(h, w, t, inv_temp, True, z=z)
        return z, lse, zt, ent, lse_lo

    @staticmethod
    def dlogits(h, w, t, lse, ent, g_logp, g_ent, inv_temp, out_dtype, z=None, lse_lo=None):
        from r1fast.kernels import logprob as kernel

        if z is None and logits_gemm() == "cublas":
            z = cublas_logits(h, w, inv_temp)
        return kernel.dlogits(h, w, t, lse, ent, g_logp.float().contiguous(),
                              None if g_ent is None else g_ent.float().contiguous(), inv_temp, out_dtype, z=z,
                              lse_lo=lse_lo)


def engine_for(backend: str):
    """The chunk engine (forward, forward_keep, dlogits) behind a grouped_logprob backend."""
    return {"torch": _TorchEngine, "triton": _TritonEngine}[backend]


def accumulate_weight_grad(grad_w, dl, h):
    """grad_w += dl.T @ h in place, in grad_w's own dtype (the weight's).

    A wide [V, H] accumulator would cost V·H·4 bytes (2.5 GB at V=152k, H=4096), more than the
    whole extra-memory budget. addmm accumulates the product in fp32 and adds the running sum in
    its fp32 epilogue on the GPU, so bf16/fp16 round once per chunk: with ~20 chunks that stays
    within 1.4x of the error that rounding the inputs to bf16 already causes (docs/loss.md).
    No [V, H] temporary either (acc += dl.T @ h would make one).
    """
    grad_w.addmm_(dl.T, h)


def refuse_double_backward(op: str):
    """The chunked backward forms the gradient from saved numbers, with no graph of its own: under
    create_graph=True it would return a gradient that silently drops every term through it."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op}: double backward (create_graph=True) is not supported; its gradient has no graph "
                           f"(use backend='reference' for higher-order gradients)")


def _contig_rows(x):
    return x if x.stride(-1) == 1 else x.contiguous()


class _GroupedLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temp, with_entropy, engine, chunk, with_hit):
        ctx.set_materialize_grads(False)  # an unused entropy output then costs nothing in the backward
        lse, zt, ent, hit, lse_lo = engine.forward(hidden, weight, targets, inv_temp, with_entropy, chunk, with_hit)
        logp = log_prob(zt, lse, lse_lo)
        ctx.save_for_backward(hidden, weight, targets, lse, ent if with_entropy else lse, lse_lo)
        ctx.cfg = (inv_temp, with_entropy, engine, chunk)
        if with_hit:
            ctx.mark_non_differentiable(hit)
        return _outputs(logp, ent if with_entropy else None, hit)

    @staticmethod
    def backward(ctx, g_logp, *rest):
        refuse_double_backward("grouped_logprob")
        g_ent = rest[0] if ctx.cfg[1] else None  # rest: the entropy's gradient where it is an output, the hit's None
        # ctx.saved_tensors is read exactly once: under torch.utils.checkpoint(use_reentrant=False)
        # each saved tensor may be unpacked only once, and a second read is a CheckpointError.
        saved = ctx.saved_tensors
        with backends.without_autocast(saved[0].device):
            return _GroupedLogprob._backward(ctx, saved, g_logp, g_ent)

    @staticmethod
    def _backward(ctx, saved, g_logp, g_ent):
        hidden, weight, targets, lse, ent, lse_lo = saved
        inv_temp, with_entropy, engine, chunk = ctx.cfg
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = hidden.shape[0]
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        if not with_entropy:
            g_ent = None
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        for s in range(0, n, chunk):
            e = s + chunk
            dl = engine.dlogits(hidden[s:e], weight, targets[s:e], lse[s:e], ent[s:e] if with_entropy else None,
                                g_logp[s:e], None if g_ent is None else g_ent[s:e], inv_temp, hidden.dtype,
                                lse_lo=lse_lo[s:e])
            if need_h:
                torch.mm(dl, weight, out=grad_h[s:e])
            if need_w:
                accumulate_weight_grad(grad_w, dl, hidden[s:e])
            del dl  # kept to the next `dl =`, it sat beside the next chunk's logits and d logits
        return grad_h, grad_w, None, None, None, None, None, None


def _outputs(logp, ent, hit):
    """logp alone, or the tuple (logp[, entropy][, hit]) of the outputs asked for."""
    outs = tuple(x for x in (logp, ent, hit) if x is not None)
    return outs if len(outs) > 1 else logp


def _run(hidden, weight, targets, temperature, return_entropy, chunk, engine, return_hit=False):
    lead = hidden.shape[:-1]
    h = _contig_rows(hidden.reshape(-1, hidden.shape[-1]))
    w = _contig_rows(weight)
    t = targets.reshape(-1).contiguous()
    inv_temp = 1.0 / float(temperature)
    chunk = chunk or default_chunk(h.shape[0], w.shape[0], h.device, engine.tile_bytes_per_logit(h.dtype))
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if h.shape[0] == 0:
        # the dtype a non-empty call returns (fp64 stays fp64): an all-masked batch must not change it
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        out = hidden.new_zeros(lead, dtype=acc) + 0.0 * hidden.sum() + 0.0 * weight.sum()
        return _outputs(out, out.clone() if return_entropy else None,
                        torch.zeros(lead, dtype=torch.bool, device=hidden.device) if return_hit else None)
    if needs_grad:
        out = _GroupedLogprob.apply(h, w, t, inv_temp, return_entropy, engine, chunk, return_hit)
    else:  # forward only (old-policy / reference passes): nothing saved
        lse, zt, ent, hit, lse_lo = engine.forward(h.detach(), w.detach(), t, inv_temp, return_entropy, chunk,
                                                   return_hit)
        out = _outputs(log_prob(zt, lse, lse_lo), ent, hit)
    return _reshaped(out, lead)


def _reshaped(out, lead):
    return tuple(x.reshape(lead) for x in out) if isinstance(out, tuple) else out.reshape(lead)


@backends.register("grouped_logprob", "reference")
def _grouped_logprob_reference(hidden, weight, targets, temperature, return_entropy, chunk, return_hit=False):
    out = reference.logprob(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), temperature,
                            return_entropy, return_argmax_hit=return_hit)
    return _reshaped(out, hidden.shape[:-1])


@backends.register("grouped_logprob", "torch")
def _grouped_logprob_torch(hidden, weight, targets, temperature, return_entropy, chunk, return_hit=False):
    return _run(hidden, weight, targets, temperature, return_entropy, chunk, _TorchEngine, return_hit)


@backends.register("grouped_logprob", "triton")
def _grouped_logprob_triton(hidden, weight, targets, temperature, return_entropy, chunk, return_hit=False):
    if hidden.dtype == torch.float64:
        raise ValueError("grouped_logprob: the triton backend takes fp16/bf16/fp32 inputs, got float64 "
                         "(use backend='torch' or 'reference')")
    return _run(hidden, weight, targets, temperature, return_entropy, chunk, _TritonEngine, return_hit)


def grouped_logprob(hidden, weight, targets, *, mask=None, temperature: float = 1.0, return_entropy: bool = False,
                    return_argmax_hit: bool = False, backend: str | None = None, forward_only: bool = False,
                    chunk_size: int | None = None, check_targets: bool = True):
    """Log-probabilities [...] (fp32; fp64 for fp64 inputs) of `targets` [...] under hidden [..., H] @ weight[V, H].T.

    Differentiable with respect to hidden and weight; with return_entropy, returns (logp, entropy),
    both differentiable. With return_argmax_hit, a bool [...] comes last ((logp, hit) or (logp,
    entropy, hit)), not differentiable: whether each target is the argmax of its row's logits
    hidden @ weight.T / temperature, as torch.argmax picks it (a tie with a lower token id is a miss);
    the kernels read it off the running max their logsumexp keeps, with no extra matmul (TRL's
    mean_token_accuracy is its mean over completion tokens). `mask` (bool or 0/1, targets' shape, e.g. a padded [B, T] batch): only
    the active tokens are computed; masked positions come back as 0 with no gradient, and their
    targets (padding ids such as -100) are never read. `forward_only=True` (or running under
    torch.no_grad) saves nothing for a backward pass: the mode for old-policy and reference-model
    passes. `chunk_size` caps the tokens whose [chunk, V] logits tile exists at once (default: a
    memory budget per device). `check_targets=False` skips the vocabulary bounds check (one device sync).
    """
    return_entropy, return_argmax_hit, forward_only, check_targets = flags(
        "grouped_logprob", return_entropy=return_entropy, return_argmax_hit=return_argmax_hit,
        forward_only=forward_only, check_targets=check_targets)
    validate(hidden, weight, targets, temperature, check_targets=check_targets and mask is None)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"grouped_logprob: chunk_size must be a positive int, got {chunk_size!r}")
    if mask is not None:
        active = bool_mask("grouped_logprob", mask, targets, "targets")
        out = grouped_logprob(hidden[active], weight, targets[active], temperature=temperature,
                              return_entropy=return_entropy, return_argmax_hit=return_argmax_hit, backend=backend,
                              forward_only=forward_only, chunk_size=chunk_size, check_targets=check_targets)
        if not isinstance(out, tuple):
            return out.new_zeros(targets.shape).masked_scatter(active, out)
        return tuple(x.new_zeros(targets.shape).masked_scatter(active, x) for x in out)  # masked hits: False
    _, fn = backends.resolve("grouped_logprob", hidden.device, backend, dtype=hidden.dtype)
    hidden, weight = resolve_neg(hidden, weight)
    with backends.without_autocast(hidden.device), torch.no_grad() if forward_only else contextlib.nullcontext():
        if return_argmax_hit:
            return fn(hidden, weight, targets, temperature, return_entropy, chunk_size, return_hit=True)
        return fn(hidden, weight, targets, temperature, return_entropy, chunk_size)

