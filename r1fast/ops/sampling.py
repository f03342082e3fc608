"""ops.sample_tokens: one token per row of logits by inverse CDF, and its log-probability.

Semantics (every backend; see r1fast.rollout.sampler and docs/rollout.md): with T the temperature,
probabilities softmax(logits / T) are filtered by top-k, then top-p (in descending order of the
logits as given, equal logits by token id: exactly k tokens stay), then min-p (p >= min_p * p_max);
the token is the first one in vocabulary order (also with top-k/top-p: a near-tie that rounding
reorders then changes no draw) whose running sum of kept probabilities exceeds u * (kept total),
never a token with zero kept probability.
Greedy (T = 0) takes the first index of the max. The log-prob is log_softmax(logits / T) at the
token before filtering (T = 1 for greedy).

backends:
    reference  float64 torch, materialises everything (the test oracle)
    torch      r1fast.rollout.sampler.sample (fp32; the CPU path, bit for bit what the engine did)
    triton     kernels/sampling.py for temperature / min-p / greedy (one or two passes over the
               row); params with top-k or top-p, and float64 logits, go to the torch backend
Backends agree up to float rounding at the edges of a token's CDF interval: a u whose target lies
within rounding of the boundary between two tokens may pick either.
"""
from __future__ import annotations

import torch

from r1fast import backends
from r1fast.ops.checks import FLOATS, flags, readable, require_tensors, resolve_neg

# r1fast.rollout (sampler, SamplingParams) is imported inside the functions: the rollout package
# imports r1fast.ops itself, and r1fast.ops must import without it.


def _validate(logits, params, u, check_inputs: bool):
    from r1fast.rollout.params import SamplingParams

    if not isinstance(params, SamplingParams):
        raise TypeError(f"sample_tokens: params must be a SamplingParams, got {type(params).__name__}")
    require_tensors("sample_tokens", logits=logits)
    if logits.dim() != 2 or logits.shape[0] < 1 or logits.shape[1] < 1:
        raise ValueError(f"sample_tokens: logits must be [B >= 1, V >= 1], got shape {tuple(logits.shape)}")
    if logits.dtype not in FLOATS:
        raise ValueError(f"sample_tokens: logits must be a float tensor (fp32, fp16, bf16, fp64), got {logits.dtype}")
    if u is None and not params.greedy:
        raise ValueError("sample_tokens: u (float64 uniforms [B]) is required unless temperature is 0 (greedy)")
    if check_inputs:
        readable("sample_tokens", logits, "the check that each row has a distribution (check_inputs=False skips it)")
        # A row with a NaN or +inf (also logits / T above float32's range), or with every token at -inf,
        # has no distribution to draw from: the backends returned some token (token 0 on the torch path)
        # with a NaN log-prob. -inf alone is a masked token, and fine.
        scaled = logits.double() if params.greedy else logits.double() / params.temperature
        big = torch.finfo(torch.float32).max
        bad = (torch.isnan(scaled) | (scaled > big)).any(dim=1) | ~(scaled >= -big).any(dim=1)
        if bool(bad.any()):
            rows = bad.nonzero().flatten().tolist()[:8]
            raise ValueError(f"sample_tokens: rows {rows} have no distribution: a NaN or +inf in logits"
                             f"{'' if params.greedy else ' / temperature'} (or above float32's range), or "
                             f"every logit -inf")
    if u is None:
        return
    require_tensors("sample_tokens", u=u)
    if u.shape != (logits.shape[0],):
        raise ValueError(f"sample_tokens: u must be [B={logits.shape[0]}], got shape {tuple(u.shape)}")
    if u.dtype != torch.float64:
        raise ValueError(f"sample_tokens: u must be float64 (53-bit uniforms), got {u.dtype}")
    if u.device != logits.device:
        raise ValueError(f"sample_tokens: logits and u must be on one device, got {logits.device} and {u.device}")
    if check_inputs and not bool(((u >= 0) & (u < 1)).all()):  # NaN fails too
        bad = u[~((u >= 0) & (u < 1))]
        raise ValueError(f"sample_tokens: u values must lie in [0, 1), got e.g. {bad[0].item()!r}")


def _uses_sort(params, vocab: int) -> bool:
    """top-k / top-p need the descending order to choose the kept tokens (the torch path), as in
    sampler.filtered_probs."""
    return 0 < params.top_k < vocab or params.top_p < 1


@backends.register("sample_tokens", "reference")
def _sample_reference(logits, params, u):
    z = logits.double()
    if params.greedy:
        tokens = z.argmax(dim=-1)
        return tokens, torch.log_softmax(z, dim=-1).gather(1, tokens[:, None]).squeeze(1).float()
    logp = torch.log_softmax(z / params.temperature, dim=-1)
    probs = logp.exp()
    vocab = probs.shape[-1]
    if _uses_sort(params, vocab):
        ids = z.argsort(dim=-1, descending=True, stable=True)  # ranked by logit; equal logits by id
        ranked = probs.gather(1, ids)
        if 0 < params.top_k < vocab:
            ranked = torch.where(torch.arange(vocab, device=z.device) < params.top_k, ranked, 0.0)
        if params.top_p < 1:
            # the smallest prefix whose mass (after top-k) reaches top_p; the first token always stays
            p = ranked / ranked.sum(dim=-1, keepdim=True)
            mass_before = p.cumsum(dim=-1) - p
            ranked = torch.where(mass_before >= params.top_p, 0.0, ranked)
        probs = torch.zeros_like(probs).scatter(1, ids, ranked)  # the draw walks vocabulary order
    if params.min_p > 0:
        peak = probs.amax(dim=-1, keepdim=True)
        probs = torch.where(probs >= params.min_p * peak, probs, 0.0)
    cdf = probs.cumsum(dim=-1)
    target = u[:, None] * cdf[:, -1:]
    pos = (cdf <= target).sum(dim=-1, keepdim=True).clamp_max(probs.shape[-1] - 1)  # first cdf > target
    kept = probs > 0
    last_kept = torch.where(kept, torch.arange(probs.shape[-1], device=z.device), -1).amax(dim=-1, keepdim=True)
    pos = torch.where(kept.gather(1, pos), pos, last_kept)
    tokens = pos.squeeze(1)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1).float()


@backends.register("sample_tokens", "torch")
def _sample_torch(logits, params, u):
    from r1fast.rollout import sampler

    return sampler.sample(logits, params, None, None, u=u)


@backends.register("sample_tokens", "triton")
def _sample_triton(logits, params, u):
    # float64 logits too: the kernel reads fp32, where two maxima a rounding step apart tie and greedy
    # took the first of them, not the float64 argmax the other backends take
    if _uses_sort(params, logits.shape[1]) or logits.dtype == torch.float64:
        return _sample_torch(logits, params, u)
    from r1fast.kernels import sampling as kernel

    with backends.on_device(logits.device):
        return kernel.sample(logits, u, params.temperature, params.min_p)


def sample_tokens(logits, params, u=None, *, backend: str | None = None,
                  check_inputs: bool = True):
    """(tokens int64 [B], logprobs float32 [B]) drawn from float logits [B, V] with `params`
    (temperature, top_k, top_p, min_p; temperature 0 is greedy) and float64 uniforms u [B] in [0, 1)
    on the logits' device (None for greedy). `check_inputs=False` skips the value checks (logits / T
    finite in float32, u in [0, 1): a [B, V] pass and device syncs on a GPU); the rollout engine
    passes it for uniforms it hashed itself, and reads a NaN log-prob as a broken model.
    The log-probs carry no gradient, on every backend (logits that require grad are read detached).
    """
    check_inputs, = flags("sample_tokens", check_inputs=check_inputs)
    _validate(logits, params, u, check_inputs)
    # the reference/torch log-probs kept the logits' graph (alive as long as they were), triton's not
    logits, u = resolve_neg(logits.detach(), u)
    _, fn = backends.resolve("sample_tokens", logits.device, backend)
    return fn(logits, params, u)
