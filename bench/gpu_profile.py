"""Where the GPU time goes: torch.profiler kernel tables for r1fast's two hot paths at GPU size.

    python -m r1fast.bench.gpu_profile [--rows 15]

The bench suites say how far each case is from its floor; this says which kernels make up the
gap, so a session without a GPU can work on the right one. It profiles, after a warm-up,
- one fused GRPO loss forward+backward (N = 16384 tokens, H = 4096, V = 151936, bf16),
- one rollout decode step (Qwen2.5-1.5B shape, 512 sequences at context 768, sampling included),
each through the same setup code as the `rollout` and `grpo_loss` suites, and prints the top kernels
by total CUDA time. Run by bench/gpu_check.sh; needs a CUDA device.
"""
from __future__ import annotations

import argparse

import torch


def _profile(name: str, fn, steps: int, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):  # compile / autotune / allocate outside the trace
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    table = averages.table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)
    # kernels per step: each launch costs a few microseconds of gap even inside a CUDA graph
    kernels = sum(e.count for e in averages if e.device_type == torch.autograd.DeviceType.CUDA)
    return f"== {name} ({steps} steps, {kernels / steps:.0f} GPU kernels per step)\n{table}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=15, help="kernels listed per profile")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_profile needs a CUDA device")
    from r1fast.bench.suites import grpo_loss, rollout

    dev = torch.device("cuda")
    # the loss first: the decode step's engine captures a CUDA graph per batch-size bucket, the
    # longer setup, and a time box that cuts it keeps the loss's table
    jobs = [
        ("fused GRPO loss fwd+bwd B=16 T=1024 H=4096 V=151936 (bf16, triton)",
         lambda: grpo_loss._r1fast("triton", (16, 1024, 4096, 151936), torch.bfloat16, dev)(), 2),
        ("rollout decode step B=512 ctx=768 (Qwen2.5-1.5B shape, bf16)",
         lambda: rollout._r1fast_decode_step(rollout.QWEN25_15B, 512, 768, torch.bfloat16, dev)(), 5),
    ]
    for name, setup, steps in jobs:
        try:
            print(_profile(name, setup(), steps, args.rows), flush=True)
        except Exception as e:  # noqa: BLE001 - one failed profile must not hide the other
            print(f"== {name}: FAILED {type(e).__name__}: {e}", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
