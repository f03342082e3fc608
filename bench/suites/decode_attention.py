"""decode_attention: paged decode attention (one query token per sequence over its paged context).

Memory-bound: the floor is the K/V bytes read (plus q and out) over the measured copy bandwidth.
Peer: the same math in plain torch (gather the pages, einsum, softmax).
"""
import math

import torch

from r1fast import backends, ops
from r1fast.bench.harness import Case, Impl, Skip, suite


def _inputs(num_seqs, heads, kv_heads, dim, ctx, block_size, dtype, device):
    blocks_per_seq = math.ceil(ctx / block_size)
    num_blocks = num_seqs * blocks_per_seq
    g = torch.Generator().manual_seed(0)
    q = torch.randn(num_seqs, heads, dim, generator=g).to(device=device, dtype=dtype)
    kc = torch.randn(num_blocks, block_size, kv_heads, dim, device=device, dtype=dtype)
    vc = torch.randn_like(kc)
    tables = torch.randperm(num_blocks, generator=g).view(num_seqs, blocks_per_seq).to(device=device,
                                                                                         dtype=torch.int32)
    lens = torch.full((num_seqs,), ctx, device=device, dtype=torch.int32)
    return q, kc, vc, tables, lens


def _r1fast(backend, shape, dtype, device):
    def setup():
        if backend not in backends.available("paged_decode_attention", device):
            raise Skip(f"backend {backend} unavailable on {device.type}")
        args = _inputs(*shape, dtype, device)
        return lambda: ops.paged_decode_attention(*args, backend=backend, check_bounds=False)
    return setup


@suite("decode_attention", "paged decode attention vs plain torch; floor = KV bytes / bandwidth")
def cases(size, device):
    # (num_seqs, heads, kv_heads, head_dim, context, block_size): Qwen2.5-1.5B heads at GPU size
    if size == "gpu":
        shapes, dtype = [(512, 12, 2, 128, 768, 16), (64, 12, 2, 128, 4096, 16), (8, 12, 2, 128, 32768, 16),
                         (128, 32, 8, 128, 2048, 16)], torch.bfloat16
    else:
        shapes, dtype = [(8, 4, 2, 32, 64, 16)], torch.float32
    es = torch.finfo(dtype).bits // 8
    out = []
    for shape in shapes:
        b, h, hkv, d, ctx, bs = shape
        nbytes = es * (2 * b * ctx * hkv * d + 2 * b * h * d)
        flops = 4 * b * h * ctx * d
        gpu = device.type == "cuda"
        impls = [Impl("r1fast", name, _r1fast(name, shape, dtype, device))
                 for name in (("cuda", "triton") if gpu else ("torch",))]
        impls.append(Impl("torch", "gather+einsum", _r1fast("torch", shape, dtype, device)) if gpu else
                     Impl("torch", "reference", _r1fast("reference", shape, dtype, device)))
        out.append(Case(f"seqs={b} heads={h}/{hkv} dim={d} ctx={ctx}", "fwd", str(dtype).removeprefix("torch."),
                        impls, flops=flops, bytes=nbytes, items=b, item_name="seqs"))
    return out
