"""Paged decode and prefill attention: every backend against the float64 reference."""
import numpy as np
import pytest
import torch

from r1fast import backends, ops
from r1fast.reference import attention as ref
from r1fast.testing import assert_close, randn


def make_case(num_seqs, num_heads, num_kv_heads, head_dim, block_size, context_lens, num_blocks=None, seed=0,
              dtype=torch.float32, device="cpu"):
    max_blocks = max(-(-c // block_size) for c in context_lens)
    num_blocks = num_blocks or num_seqs * max_blocks + 3
    q = randn(num_seqs, num_heads, head_dim, seed=seed, dtype=dtype, device=device)
    k_cache = randn(num_blocks, block_size, num_kv_heads, head_dim, seed=seed + 1, dtype=dtype, device=device)
    v_cache = randn(num_blocks, block_size, num_kv_heads, head_dim, seed=seed + 2, dtype=dtype, device=device)
    # each sequence gets distinct random blocks; unused table entries hold a bad id (never read)
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
    tables = torch.full((num_seqs, max_blocks + 1), -7, dtype=torch.int32)
    used = 0
    for b, c in enumerate(context_lens):
        n = -(-c // block_size)
        tables[b, :n] = perm[used : used + n].int()
        used += n
    ctx = torch.tensor(context_lens, dtype=torch.int32)
    return q, k_cache, v_cache, tables.to(device), ctx.to(device)


def expected(q, k_cache, v_cache, tables, ctx):
    return ref.paged_decode_attention(q.double().cpu(), k_cache.double().cpu(), v_cache.double().cpu(),
                                      tables.cpu().clamp_min(0), ctx.cpu())


def decode_backends(device):
    return [b for b in backends.available("paged_decode_attention", device) if b != "reference"]


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 16), (8, 2, 32), (6, 2, 24)])
@pytest.mark.parametrize("context_lens", [[1, 5, 16, 17], [40, 3]])
def test_decode_matches_reference(device, heads, kv_heads, head_dim, context_lens):
    q, kc, vc, tables, ctx = make_case(len(context_lens), heads, kv_heads, head_dim, 8, context_lens, device=device)
    want = expected(q, kc, vc, tables, ctx)
    names = decode_backends(torch.device(device))
    assert "torch" in names and "triton" in names  # CPU: triton runs under the interpreter
    for name in names:
        got = ops.paged_decode_attention(q, kc, vc, tables, ctx, backend=name)
        assert_close(got, want, dtype=torch.float32, rtol=1e-5, name=f"{name} decode")


def test_decode_split_k_matches_reference(device):
    # 80-token tables: 2 splits of 40, 5 of 16 (whole blocks); short sequences leave partitions empty
    q, kc, vc, tables, ctx = make_case(3, 4, 2, 16, 8, [70, 9, 33], device=device)
    want = expected(q, kc, vc, tables, ctx)
    for name in decode_backends(torch.device(device)):
        for splits in (2, 5):
            got = ops.paged_decode_attention(q, kc, vc, tables, ctx, num_splits=splits, backend=name)
            assert_close(got, want, dtype=torch.float32, rtol=1e-5, name=f"{name} split-K x{splits}")


def test_decode_fp16_within_lowp_rule(device):
    from r1fast.testing import assert_within_lowp_rule

    q, kc, vc, tables, ctx = make_case(2, 4, 2, 32, 8, [19, 8], dtype=torch.float16, device=device)
    want = expected(q, kc, vc, tables, ctx)
    ref16 = ref.paged_decode_attention(q.cpu().float(), kc.cpu().float(), vc.cpu().float(), tables.cpu().clamp_min(0),
                                       ctx.cpu()).half()
    for name in decode_backends(torch.device(device)):
        got = ops.paged_decode_attention(q, kc, vc, tables, ctx, backend=name)
        assert_within_lowp_rule(got, ref16, want, factor=2.0, floor=2e-3, name=f"{name} fp16")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(12, 2, 128), (16, 16, 64), (32, 8, 128), (8, 1, 256)])
def test_decode_cuda_long_context(dtype, heads, kv_heads, head_dim):
    lens = [1, 15, 16, 17, 300, 1500, 4097]
    q, kc, vc, tables, ctx = make_case(len(lens), heads, kv_heads, head_dim, 16, lens, dtype=dtype, device="cuda")
    want = expected(q, kc, vc, tables, ctx)
    ref_lowp = ref.paged_decode_attention(q, kc, vc, tables.clamp_min(0), ctx).cpu()
    from r1fast.testing import assert_within_lowp_rule

    for name in ("cuda", "triton"):
        for splits in (None, 1, 4):
            got = ops.paged_decode_attention(q, kc, vc, tables, ctx, num_splits=splits, backend=name)
            assert_within_lowp_rule(got, ref_lowp, want, factor=2.0, floor=1e-5, name=f"{name} {dtype} x{splits}")


def test_decode_bad_inputs_raise():
    q, kc, vc, tables, ctx = make_case(2, 4, 2, 16, 8, [5, 9])
    with pytest.raises(ValueError, match="context_lens must lie"):
        ops.paged_decode_attention(q, kc, vc, tables, torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="context_lens must lie"):
        ops.paged_decode_attention(q, kc, vc, tables, torch.tensor([5, 99], dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        ops.paged_decode_attention(q, kc, vc, tables.long(), ctx)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ops.paged_decode_attention(q[:, :3].contiguous(), kc, vc, tables, ctx)
    with pytest.raises(ValueError, match="share a float dtype"):
        ops.paged_decode_attention(q.half(), kc, vc, tables, ctx)
    bad = tables.clone()
    bad[0, 0] = 10_000
    with pytest.raises(ValueError, match="block_tables entries"):
        ops.paged_decode_attention(q, kc, vc, bad, ctx)
    with pytest.raises(ValueError, match="unavailable"):
        ops.paged_decode_attention(q, kc, vc, tables, ctx, backend="cuda")


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_prefill_over_cached_prefix_matches_reference(backend):
    torch.manual_seed(0)
    bs, hkv, h, d = 4, 2, 4, 16
    kc = randn(12, bs, hkv, d, seed=3)
    vc = randn(12, bs, hkv, d, seed=4)
    # seq 0: 6 cached tokens + 3 new; seq 1: a fresh prompt of 5 tokens
    tables = [[5, 2, 9], [0, 7]]
    query_lens, context_lens = [3, 5], [9, 5]
    slots = torch.tensor([tables[b][p // bs] * bs + p % bs for b, c in enumerate(context_lens) for p in range(c)])
    q = randn(8, h, d, seed=5)
    got = ops.paged_prefill_attention(q, kc, vc, slots, query_lens, context_lens, backend=backend)
    want = ref.paged_prefill_attention(q.double(), kc.double(), vc.double(),
                                       torch.tensor([t + [0] * (3 - len(t)) for t in tables], dtype=torch.int32),
                                       query_lens, context_lens)
    assert_close(got, want, dtype=torch.float32, name=f"{backend} prefill")
    with pytest.raises(ValueError, match="query_len <= context_len"):
        ops.paged_prefill_attention(q, kc, vc, slots, [3, 6], [9, 5])
