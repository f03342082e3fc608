"""Parity with an independent implementation: Liger-Kernel's LigerFusedLinearGRPOLoss (runs on CPU).

Liger computes the same TRL objective from hidden states; for the loss types and options both
support (grpo, bnpo, dr_grpo, dapo, cispo; token/sequence level; epsilon_high; delta; k3 KL;
truncated IS passed to Liger as a precomputed `vllm_is_ratio`), loss, gradients and the clip
fraction must agree. Inputs are float64; Liger keeps an fp32 loss accumulator, so agreement is to fp32 precision.
"""
import pytest
import torch

from r1fast import ops
from r1fast.testing import assert_close, generator, randn

liger = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")

B, T, H, V = 4, 6, 16, 29


def _case(seed):
    hidden = randn(B, T, H, dtype=torch.float64, seed=seed)
    weight = randn(V, H, dtype=torch.float64, seed=seed + 1, scale=2 / H ** 0.5)
    targets = torch.randint(0, V, (B, T), generator=generator(seed + 2))
    lens = torch.tensor([T, 3, 1, 5])
    mask = (torch.arange(T)[None, :] < lens[:, None]).long()
    with torch.no_grad():
        logp = ops.grouped_logprob(hidden, weight, targets, backend="reference")
    old = logp + 0.3 * randn(B, T, dtype=torch.float64, seed=seed + 3)
    ref = logp + 0.3 * randn(B, T, dtype=torch.float64, seed=seed + 4)
    sampler = old + 0.2 * randn(B, T, dtype=torch.float64, seed=seed + 5)
    adv = randn(B, dtype=torch.float64, seed=seed + 6)
    return hidden, weight, targets, mask, old, ref, sampler, adv


CASES = [
    dict(loss_type="grpo", beta=0.04),
    dict(loss_type="bnpo", beta=0.0, importance_sampling_level="sequence"),
    dict(loss_type="dr_grpo", beta=0.1, max_completion_length=8, delta=1.25, temperature=0.7),
    dict(loss_type="dapo", beta=0.0, epsilon_high=0.28, tis="truncate"),
    dict(loss_type="dapo", beta=0.05, importance_sampling_level="sequence", num_items=30),
    dict(loss_type="cispo", beta=0.0, epsilon_high=1.3, tis="truncate"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("opts", CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_matches_liger(device, opts, backend):
    opts = dict(opts)
    tis = opts.pop("tis", None)
    hidden, weight, targets, mask, old, ref, sampler, adv = _case(seed=len(opts))
    eps_high = opts.get("epsilon_high", 0.2)
    liger_loss_fn = liger.LigerFusedLinearGRPOLoss(
        beta=opts["beta"], compiled=False, use_ref_model=opts["beta"] != 0.0, chunk_size=2, epsilon_low=0.2,
        epsilon_high=eps_high, loss_type=opts["loss_type"], max_completion_length=opts.get("max_completion_length"),
        importance_sampling_level=opts.get("importance_sampling_level", "token"),
        temperature=opts.get("temperature", 1.0), delta=opts.get("delta"))
    is_ratio = torch.clamp(torch.exp(old - sampler), max=3.0) if tis else None

    hl, wl = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    l_loss, l_metrics = liger_loss_fn(hl, wl, targets, mask, adv, ref_per_token_logps=ref if opts["beta"] else None,
                                      old_per_token_logps=old, vllm_is_ratio=is_ratio,
                                      num_items_in_batch=opts.get("num_items"))
    l_gh, l_gw = torch.autograd.grad(l_loss, (hl, wl))

    dtype = torch.float64 if backend == "torch" else torch.float32
    dev = torch.device("cpu") if backend == "torch" else device  # Liger itself runs on the CPU
    hr, wr = hidden.to(dev, dtype).requires_grad_(), weight.to(dev, dtype).requires_grad_()
    c = lambda t: t.to(dev, dtype)  # noqa: E731
    r_loss, r_stats = ops.fused_linear_grpo_loss(
        hr, wr, targets.to(dev), mask.to(dev), c(adv), old_logp=c(old), ref_logp=c(ref) if opts["beta"] else None,
        sampler_logp=c(sampler) if tis else None, tis_mode=tis, tis_level="token", tis_cap=3.0,
        backend=backend, epsilon_high=eps_high, **{k: v for k, v in opts.items() if k != "epsilon_high"})
    r_gh, r_gw = torch.autograd.grad(r_loss, (hr, wr))

    # Liger accumulates the loss in fp32 whatever the input dtype, so agreement is at fp32 level.
    tol = dict(rtol=2e-5, atol=1e-7) if dtype == torch.float64 else dict(rtol=3e-5, atol=1e-6)
    assert_close(r_loss, l_loss, dtype, name="loss", **tol)
    assert_close(r_gh, l_gh, dtype, name="grad_hidden", **tol)
    assert_close(r_gw, l_gw, dtype, name="grad_weight", **tol)
    assert_close(r_stats["clip_ratio/region_mean"], l_metrics[-1], dtype, name="clip ratio", **tol)
    if opts["beta"]:
        assert_close(r_stats["kl"], l_metrics[0], dtype, name="kl", **tol)
