"""grpo_loss: the GRPO loss from hidden states (ops.fused_linear_grpo_loss), forward + backward.

Peers: plain torch as TRL does it (logits -> log_softmax -> gather -> per-token loss), Liger's
LigerFusedLinearGRPOLoss when importable, and (CUDA only) Liger's Triton GRPO loss from logits
(liger_kernel.transformers.grpo_loss.triton_grpo_loss: the logits of T+1 positions in the model's
dtype, one Triton program per token for the loss and one for its dlogits, written over the logits).
Floor: 6·N·H·V FLOPs at the measured matmul rate, N the active (mask = 1) tokens: completion
lengths are fixed (T/2 to T) so the case knows N, and r1fast never touches a padded token (the
peers compute every one of the B·T, as TRL and Liger do).
A second case times the per-token part alone (ops.grpo_loss on [B, T] log-probs, bandwidth-bound),
a third ops.group_advantages (rewards [B] -> advantages [B]: 8·B bytes, launch-bound) against its torch backend.
"""
import torch

from r1fast import backends, ops
from r1fast.bench.harness import Case, Impl, Skip, generator, require_backend, suite, with_env

OPTS = dict(loss_type="dapo", beta=0.04, epsilon=0.2, epsilon_high=0.28)


def _lengths(b, t):
    """Completion lengths spread evenly over [t/2, t]: fixed, so the floor counts the active tokens."""
    return [t - (i * (t - t // 2)) // max(b - 1, 1) for i in range(b)]


def _inputs(b, t, h, v, dtype, device):
    g = generator(device, 0)  # drawn on the device: a 152k x 4096 weight takes seconds on the CPU
    hidden = (torch.randn(b, t, h, generator=g, device=device) / h ** 0.25).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, device=device) / h ** 0.25).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (b, t), generator=g, device=device)
    lens = torch.tensor(_lengths(b, t), device=device)
    mask = (torch.arange(t, device=device)[None, :] < lens[:, None]).to(torch.float32)
    adv = torch.randn(b, generator=g, device=device)
    with torch.no_grad():
        logp = ops.grouped_logprob(hidden, weight, targets, check_targets=False)
    old = (logp + 0.05 * torch.randn(b, t, device=device)).float()
    ref = (logp + 0.05 * torch.randn(b, t, device=device)).float()
    return hidden, weight, targets, mask, adv, old, ref


def _r1fast(backend, shape, dtype, device):
    def setup():
        if backend not in backends.available("grouped_logprob", device) or (
                backend == "triton" and device.type != "cuda"):
            raise Skip(f"backend {backend} is not a fast path on {device.type}")
        hidden, weight, targets, mask, adv, old, ref = _inputs(*shape, dtype, device)

        def run():
            hidden.grad = weight.grad = None
            loss, _ = ops.fused_linear_grpo_loss(hidden, weight, targets, mask, adv, old_logp=old, ref_logp=ref,
                                                 backend=backend, **OPTS)
            loss.backward()
        return run
    return setup


def _torch_trl(shape, dtype, device):
    def setup():
        hidden, weight, targets, mask, adv, old, ref = _inputs(*shape, dtype, device)

        def run():
            hidden.grad = weight.grad = None
            logits = (hidden @ weight.T).float()
            logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
            loss, _ = ops.grpo_loss(logp, old, ref, adv, mask, backend="torch", **OPTS)
            loss.backward()
        return run
    return setup


def _liger(shape, dtype, device):
    def setup():
        from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOLoss

        hidden, weight, targets, mask, adv, old, ref = _inputs(*shape, dtype, device)
        # compiled=False: torch.compile only wraps Liger's small loss math (the matmuls dominate) and
        # its warm-up would eat a short GPU window.
        fn = LigerFusedLinearGRPOLoss(beta=OPTS["beta"], compiled=False, chunk_size=1,
                                      epsilon_low=0.2, epsilon_high=0.28, loss_type="dapo")

        def run():
            hidden.grad = weight.grad = None
            loss, _ = fn(hidden, weight, targets, mask.long(), adv, ref_per_token_logps=ref, old_per_token_logps=old)
            loss.backward()
        return run
    return setup


def _liger_triton_options(opts):
    """Liger's triton_grpo_loss keywords computing r1fast's loss under LossOptions `opts`, or ValueError
    naming what Liger's kernel cannot express (it has the k3 KL only, no entropy bonus, no r1fast TIS;
    its own temperature default is 0.9, r1fast's 1.0, so it is always passed)."""
    if opts.kl_estimator != "k3" or opts.entropy_coef != 0.0:
        raise ValueError(f"Liger's Triton GRPO loss has the k3 KL and no entropy bonus (got "
                         f"kl_estimator={opts.kl_estimator!r}, entropy_coef={opts.entropy_coef})")
    return dict(temperature=opts.temperature, beta=opts.beta, eps_low=opts.epsilon, eps_high=opts.eps_high,
                loss_type=opts.loss_type, importance_sampling_level=opts.importance_sampling_level,
                max_completion_length=opts.max_completion_length,  # read by dr_grpo only
                delta=opts.delta, use_bias_correction_kl=opts.use_bias_correction_kl,
                num_items_in_batch=opts.num_items)


def _liger_triton_loss(hidden1, weight, targets, mask, adv, old, ref, **liger_opts):
    """Liger's Triton GRPO loss (reduced, as r1fast's) from hidden states for T+1 positions [B, T+1, H]:
    its kernel reads logits [B, T+1, V], position t scoring targets[:, t] and the last row unused,
    as TRL asks the model for logits_to_keep + 1 positions. The logits stay in the model's dtype (the
    kernel reads them in fp32) and its backward writes dlogits over them (inplace, its default)."""
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    loss, _ = triton_grpo_loss(hidden1 @ weight.T, old, ref, targets, adv, mask, inplace=True, reduce=True,
                               **liger_opts)
    return loss


def _with_extra_row(hidden):
    """hidden [B, T, H] and one more position (zeros) as a new leaf [B, T+1, H]: the position whose
    logits Liger's kernel is handed but never scores."""
    pad = torch.zeros_like(hidden[:, :1])
    return torch.cat((hidden.detach(), pad), 1).requires_grad_()


def _liger_triton(shape, dtype, device):
    def setup():
        if device.type != "cuda":
            raise Skip(f"CUDA only, not {device.type} (Liger's Triton kernels)")
        hidden, weight, targets, mask, adv, old, ref = _inputs(*shape, dtype, device)
        hidden1 = _with_extra_row(hidden)
        liger_opts = _liger_triton_options(ops.LossOptions(**OPTS))

        def run():
            hidden1.grad = weight.grad = None
            _liger_triton_loss(hidden1, weight, targets, mask, adv, old, ref, **liger_opts).backward()
        return run
    return setup


def _per_token(backend, b, t, device):
    def setup():
        require_backend("grpo_loss", backend, device)
        g = torch.Generator(device="cpu").manual_seed(1)
        logp = (-torch.rand(b, t, generator=g)).to(device).requires_grad_()
        old = logp.detach() + 0.05 * torch.randn(b, t, generator=g).to(device)
        ref = logp.detach() + 0.05 * torch.randn(b, t, generator=g).to(device)
        mask = torch.ones(b, t, device=device)
        adv = torch.randn(b, generator=g).to(device)

        def run():
            logp.grad = None
            loss, _ = ops.grpo_loss(logp, old, ref, adv, mask, backend=backend, **OPTS)
            loss.backward()
        return run
    return setup


def _advantages(backend, b, g, device):
    def setup():
        require_backend("group_advantages", backend, device)
        rewards = torch.randn(b, generator=torch.Generator(device="cpu").manual_seed(2)).to(device)
        return lambda: ops.group_advantages(rewards, g, backend=backend)
    return setup


@suite("grpo_loss")
def cases(size, device):
    """GRPO loss from hidden states, fwd+bwd, vs plain torch (TRL), Liger's chunked and Triton GRPO losses."""
    if size == "gpu":
        b, t, h, v, dtype = 16, 1024, 4096, 151936, torch.bfloat16
        pb, pt = 256, 4096
        ab, ag = 8192, 8
    else:
        b, t, h, v, dtype = 4, 32, 64, 1000, torch.float32
        pb, pt = 64, 256
        ab, ag = 64, 8
    es = torch.finfo(dtype).bits // 8
    n = sum(_lengths(b, t))  # active tokens: the work the loss needs (mask = 0 tokens need none)
    shape = (b, t, h, v)
    ours = ("triton", "torch") if device.type == "cuda" else ("torch",)  # r1fast backends timed here
    impls = [Impl("r1fast", bk, _r1fast(bk, shape, dtype, device)) for bk in ours]
    if device.type == "cuda":  # the same kernels with cuBLAS forming the logits tiles
        impls.insert(1, Impl("r1fast", "triton+cublas", with_env(_r1fast("triton", shape, dtype, device),
                                                                 R1FAST_LOGITS_GEMM="cublas")))
    impls += [Impl("torch", "logits+log_softmax", _torch_trl(shape, dtype, device)),
              Impl("liger", "chunked", _liger(shape, dtype, device), requires=("liger_kernel",)),
              # logits (T+1 positions) -> Liger's Triton loss; its op takes logits, so it has no place
              # in the per-token case (log-probs in) or the group_advantages one
              Impl("liger", "triton_from_logits", _liger_triton(shape, dtype, device), requires=("liger_kernel",))]
    return [
        Case(f"B={b} T={t} H={h} V={v} tokens={n} dapo beta=0.04", "fwd_bwd", str(dtype).removeprefix("torch."), impls,
             flops=6 * n * h * v, bytes=2 * (n * h + v * h) * es, items=n, item_name="tokens"),
        Case(f"per-token loss B={pb} T={pt}", "fwd_bwd", "float32",
             [Impl("r1fast", bk, _per_token(bk, pb, pt, device)) for bk in ours],
             # the least a fused fwd+bwd moves: reads logp, old, ref and mask, writes dlogp (fp32 [B, T] each)
             bytes=5 * pb * pt * 4, items=pb * pt, item_name="tokens"),
        Case(f"group_advantages B={ab} G={ag} grpo/group", "fwd", "float32",
             [Impl("r1fast", "triton" if device.type == "cuda" else "torch", _advantages(
                 "triton" if device.type == "cuda" else "torch", ab, ag, device)),
              Impl("torch", "torch", _advantages("torch", ab, ag, device))],
             bytes=8 * ab, items=ab, item_name="completions"),
    ]
