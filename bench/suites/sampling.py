"""sampling: one decode step's token draw (and its log-prob) from fp32 logits [B, V].

Memory-bound: the floor is the logits read once (B * V * 4 bytes) over the measured copy bandwidth.
r1fast: ops.sample_tokens' Triton kernel (one pass over each row plus one block; two with min_p).
Peer: the torch sampler (r1fast.rollout.sampler.sample: softmax, cumsum, searchsorted, fix-up,
log_softmax), what the rollout engine ran before the kernel and still runs on the CPU.
"""
import torch

from r1fast import ops
from r1fast.bench.harness import Case, Impl, require_backend, suite
from r1fast.rollout import SamplingParams, sampler


def _inputs(rows, vocab, device):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(rows, vocab, generator=g) * 3).to(device)
    u = torch.rand(rows, generator=g, dtype=torch.float64).to(device)
    return logits, u


def _r1fast(backend, shape, params, device):
    def setup():
        require_backend("sample_tokens", backend, device)
        logits, u = _inputs(*shape, device)
        u = None if params.greedy else u
        return lambda: ops.sample_tokens(logits, params, u, backend=backend, check_inputs=False)
    return setup


def _torch_sampler(shape, params, device):
    def setup():
        logits, u = _inputs(*shape, device)
        return lambda: sampler.sample(logits, params, None, None, u=None if params.greedy else u)
    return setup


@suite("sampling", "token sampling (temperature, min-p, greedy) vs the torch sampler; floor = logits bytes / bandwidth")
def cases(size, device):
    # (rows, vocabulary): a decode step of 64 prompts x G = 8 over Qwen2.5's vocabulary
    shapes = [(512, 151936)] if size == "gpu" else [(4, 1000)]
    variants = [("T=1.0", SamplingParams(temperature=1.0)), ("T=1.0 min_p=0.05", SamplingParams(min_p=0.05)),
                ("greedy", SamplingParams(temperature=0))]
    out = []
    for rows, vocab in shapes:
        for label, params in variants:
            shape = (rows, vocab)
            impls = [Impl("r1fast", "triton", _r1fast("triton", shape, params, device))]
            if device.type != "cuda":  # the CPU backend (triton runs here only under the interpreter)
                impls.append(Impl("r1fast", "torch", _r1fast("torch", shape, params, device)))
            impls.append(Impl("torch", "sampler", _torch_sampler(shape, params, device)))
            out.append(Case(f"B={rows} V={vocab} {label}", "fwd", "float32", impls, bytes=4 * rows * vocab,
                            items=rows))
    return out
