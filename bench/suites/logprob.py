"""logprob: log-probs of target tokens from hidden states x lm_head (ops.grouped_logprob), fwd and fwd+bwd.

Peers: plain torch as TRL does it (logits -> log_softmax -> gather, materialising [N, V]);
when installed, Liger-Kernel's chunked selective log-prob and verl's FusedLinearForPPO (chunks of
512 tokens in torch, the logits recomputed in the backward; it always returns the entropy too, as
verl's actor uses it). Floor: 2·N·H·V FLOPs forward,
6·N·H·V forward+backward (issue #3's floor) at the measured matmul rate. On a GPU the triton backend also runs with
R1FAST_LOGITS_GEMM=cublas ("triton+cublas": torch.mm forms the logits tiles). The GPU size sweeps N to show r1fast's
peak memory flat in N while the peers' grows with N·V.
"""
import functools
import importlib.util
import os

import torch

from r1fast import backends, ops
from r1fast.bench.harness import Case, Impl, Skip, generator, suite, with_env


def _inputs(n, h, v, dtype, device, grad):
    g = generator(device, 0)  # drawn on the device: a 152k x 4096 weight takes seconds on the CPU
    hidden = (torch.randn(n, h, generator=g, device=device) / h ** 0.25).to(dtype).requires_grad_(grad)
    weight = (torch.randn(v, h, generator=g, device=device) / h ** 0.25).to(dtype).requires_grad_(grad)
    targets = torch.randint(0, v, (n,), generator=g, device=device)
    return hidden, weight, targets


def _timed(fn_logp, n, h, v, dtype, device, mode):
    """A setup whose timed callable runs fn_logp forward (no grad) or forward + backward."""
    def setup():
        hidden, weight, targets = _inputs(n, h, v, dtype, device, grad=mode == "fwd_bwd")
        if mode == "fwd":
            def run():
                with torch.no_grad():
                    return fn_logp(hidden, weight, targets)
            return run
        upstream = torch.randn(n, device=device)

        def run():
            hidden.grad = weight.grad = None
            (fn_logp(hidden, weight, targets) * upstream).sum().backward()
        return run
    return setup


def _r1fast(backend, device):
    def fn(hidden, weight, targets):
        return ops.grouped_logprob(hidden, weight, targets, backend=backend, check_targets=False)

    def check():
        if backend not in backends.available("grouped_logprob", device) or (
                backend == "triton" and device.type != "cuda"):
            raise Skip(f"backend {backend} is not a fast path on {device.type}")
    return fn, check


def _torch_trl(hidden, weight, targets):
    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)


def _liger(hidden, weight, targets):
    from liger_kernel.chunked_loss.fused_linear_ppo import _ChunkedSelectiveLogProbFunction

    return _ChunkedSelectiveLogProbFunction.apply(hidden, weight, targets, None, 1.0, 4096)


@functools.lru_cache(maxsize=None)
def verl_fused_linear_for_ppo():
    """verl's FusedLinearForPPOFunction, read from its own file: `import verl` needs ray and tensordict
    (verl's package __init__), the file only torch."""
    spec = importlib.util.find_spec("verl")
    if spec is None or spec.origin is None:
        raise Skip("verl is not installed")
    path = os.path.join(os.path.dirname(spec.origin), "utils", "experimental", "torch_functional.py")
    if not os.path.isfile(path):
        raise Skip(f"this verl has no {path} (FusedLinearForPPO)")
    file_spec = importlib.util.spec_from_file_location("r1fast_bench_verl_torch_functional", path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module.FusedLinearForPPOFunction


def _verl(hidden, weight, targets):
    return verl_fused_linear_for_ppo().apply(hidden, weight, targets, 1.0, 512)[0]  # (logp, entropy)[0]


def _verl_setup(n, h, v, dtype, device, mode):
    def setup():
        verl_fused_linear_for_ppo()  # loaded, or the peer skipped, before anything is timed
        return _timed(_verl, n, h, v, dtype, device, mode)()
    return setup


def _impls(n, h, v, dtype, device, mode, peers=True):
    out = []
    for b in (("triton", "torch") if device.type == "cuda" else ("torch",)):
        fn, check = _r1fast(b, device)

        def setup(fn=fn, check=check):
            check()
            return _timed(fn, n, h, v, dtype, device, mode)()
        out.append(Impl("r1fast", b, setup))
        if b == "triton" and peers:  # the same kernels with cuBLAS forming the logits tiles
            out.append(Impl("r1fast", "triton+cublas", with_env(setup, R1FAST_LOGITS_GEMM="cublas")))
    if peers:
        out.append(Impl("torch", "logits+log_softmax", _timed(_torch_trl, n, h, v, dtype, device, mode)))
        out.append(Impl("liger", "chunked", _timed(_liger, n, h, v, dtype, device, mode), requires=("liger_kernel",)))
        out.append(Impl("verl", "fused_linear_ppo+entropy", _verl_setup(n, h, v, dtype, device, mode),
                        requires=("verl",)))
    return out


@suite("logprob")
def cases(size, device):
    """Fused log-prob of target tokens (hidden x lm_head, never the logits) vs torch, Liger and verl."""
    if size == "gpu":
        h, v, dtype, sizes = 4096, 151936, torch.bfloat16, [16384]
        sweep = [2048, 4096, 8192]
    else:
        h, v, dtype, sizes = 64, 1000, torch.float32, [256]
        sweep = [128, 512]
    dname = str(dtype).removeprefix("torch.")
    es = torch.finfo(dtype).bits // 8
    out = []
    for n in sizes + sweep:
        main = n in sizes
        # fwd+bwd: 6·N·H·V (logits, dlogits @ weight, dlogits.T @ hidden), the floor of every row of the table:
        # the torch peer keeps its [N, V] logits and does no more. An O(N)-memory op given any upstream gradient
        # recomputes the logits in its backward (8·N·H·V), so grouped_logprob tops out at 75% of this floor; the
        # fused loss (grpo_loss suite) knows its gradient in the forward and does 6·N·H·V
        for mode, k in (("fwd", 2), ("fwd_bwd", 6)):
            if not main and mode == "fwd":
                continue
            nbytes = (n * h + v * h) * es * (1 if mode == "fwd" else 2)  # read hidden + weight (+ write grads)
            out.append(Case(f"N={n} H={h} V={v}" + ("" if main else " (memory sweep)"), mode, dname,
                            _impls(n, h, v, dtype, device, mode, peers=main or n <= 4096),
                            flops=k * n * h * v, bytes=nbytes, items=n, item_name="tokens"))
    return out
