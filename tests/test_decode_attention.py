"""Paged decode and prefill attention: every backend against the float64 reference."""

import itertools
import re

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


def test_decode_torch_backend_is_the_dense_softmax_to_the_bit():
    """The torch backend (the rollout engine's CPU decode, once per layer per step) is cut to few ops; what it
    computes stays the dense masked softmax of the gathered context, bit for bit, stale inf/NaN rows included."""
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        q, kc, vc, tables, ctx = make_case(4, 6, 2, 16, 8, [1, 5, 16, 17], seed=3, dtype=dtype)
        kc[tables[1, 0], 5:] = float("inf")   # past sequence 1's 5 tokens: stale rows it must not read
        vc[tables[1, 0], 5:] = float("nan")
        b, h, d = q.shape
        safe = torch.where(tables >= 0, tables, 0).long()
        k = kc[safe].reshape(b, -1, 2, d).float() if dtype != torch.float64 else kc[safe].reshape(b, -1, 2, d)
        v = vc[safe].reshape(b, -1, 2, d).to(k.dtype)
        past = torch.arange(k.shape[1])[None, :] >= ctx[:, None].long()
        v = v.masked_fill(past[:, :, None, None], 0)
        scores = torch.einsum("bkgd,blkd->bkgl", q.to(k.dtype).view(b, 2, 3, d), k) * 0.25
        probs = scores.masked_fill(past[:, None, None, :], float("-inf")).softmax(dim=-1)
        want = torch.einsum("bkgl,blkd->bkgd", probs, v).reshape(b, h, d).to(dtype)
        got = ops.paged_decode_attention(q, kc, vc, tables, ctx, scale=0.25, backend="torch")
        assert torch.equal(got, want), dtype


def test_decode_split_k_matches_reference(device):
    # 80-token tables: 2 splits of 40, 5 of 16 (whole blocks); short sequences leave partitions empty
    q, kc, vc, tables, ctx = make_case(3, 4, 2, 16, 8, [70, 9, 33], device=device)
    want = expected(q, kc, vc, tables, ctx)
    for name in decode_backends(torch.device(device)):
        for splits in (2, 5):
            got = ops.paged_decode_attention(q, kc, vc, tables, ctx, num_splits=splits, backend=name)
            assert_close(got, want, dtype=torch.float32, rtol=1e-5, name=f"{name} split-K x{splits}")


def test_merge_partitions_matches_the_float64_formula_over_many_and_empty_partitions(device):
    # The Triton merge reads the partitions 64 at a time: 77 spans two passes. Empty partitions
    # (l = 0: past a short context) must weigh nothing whatever their max, and the largest max
    # must come from a live one.
    from r1fast.kernels.decode_attention import merge_partitions

    b, h, s, d = 3, 4, 77, 24
    m = randn(b, h, s, seed=11, device=device) * 4
    l = randn(b, h, s, seed=12, device=device).abs() + 0.5
    acc = randn(b, h, s, d, seed=13, device=device)
    dead = torch.rand(b, h, s, generator=torch.Generator().manual_seed(14)).to(device) < 0.4
    dead[..., 5] = False  # every (seq, head) keeps a live partition
    l = l.masked_fill(dead, 0.0)
    m = m.masked_fill(dead, 200.0)  # a stale max far above every live one (exp(m - 200) is 0 in fp32)
    acc = acc.masked_fill(dead[..., None], 0.0)
    ml = torch.stack([m, l], dim=-1).contiguous()
    w = torch.where(l > 0, torch.exp(m.double() - m.double().masked_fill(l == 0, float("-inf")).amax(-1, True)), 0)
    want = (acc.double() * w[..., None]).sum(2) / (l.double() * w).sum(-1, keepdim=True)
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.empty(b, h, d, device=device, dtype=dtype)
        merge_partitions(out, ml, acc)
        assert_close(out, want, dtype=dtype, name=f"merge {dtype}")


def test_decode_many_splits_match_reference(device):
    # 77 partitions of one block each (two passes of the merge), most of them empty for the short rows
    q, kc, vc, tables, ctx = make_case(3, 6, 2, 16, 8, [601, 9, 120], device=device)
    want = expected(q, kc, vc, tables, ctx)
    for name in decode_backends(torch.device(device)):
        got = ops.paged_decode_attention(q, kc, vc, tables, ctx, num_splits=77, backend=name)
        assert_close(got, want, dtype=torch.float32, rtol=1e-5, name=f"{name} split-K x77")


def test_triton_num_splits_fills_the_sms_with_partitions_of_at_least_256_tokens():
    from r1fast.ops.attention import (MIN_PARTITION_TOKENS, RESIDENT_PROGRAMS_PER_SM, SPLIT_ROUNDS,
                                      triton_num_splits)

    # the H200 bench's shapes, 132 SMs (792 resident programs): enough (sequence, KV head) pairs -> 1
    assert triton_num_splits(512, 2, 768, 132) == 1
    assert triton_num_splits(128, 8, 2048, 132) == 1
    assert triton_num_splits(396, 2, 32768, 132) == 1
    assert triton_num_splits(395, 2, 32768, 132) == 3  # 790 pairs: ceil(1584 / 790)
    # few pairs at long contexts: two rounds of 792 programs (1584 / 16 pairs -> 99; 1584 / 128 -> 13)
    assert triton_num_splits(8, 2, 32768, 132) == 99
    assert triton_num_splits(64, 2, 4096, 132) == 13
    # ... but never partitions under 256 tokens: 4096 // 256 = 16, 768 // 256 = 3, a short context 1
    assert triton_num_splits(1, 2, 32768, 132) == 128
    assert triton_num_splits(8, 2, 768, 132) == 3
    assert triton_num_splits(8, 2, 300, 132) == 1
    assert triton_num_splits(0, 2, 4096, 132) == 16  # no rows: any cover will do, the launch is skipped
    # fewer SMs, fewer splits: 16 SMs hold 96 programs
    assert triton_num_splits(8, 2, 32768, 16) == 12
    for seqs, kv, ctx, sms in itertools.product((1, 3, 8, 64, 200, 512), (1, 2, 8), (16, 300, 4096, 100_000),
                                                (1, 16, 132)):
        splits = triton_num_splits(seqs, kv, ctx, sms)
        slots = sms * RESIDENT_PROGRAMS_PER_SM
        assert splits >= 1 and (splits == 1 or ctx // splits >= MIN_PARTITION_TOKENS)
        # short of the target only where the 256-token floor binds
        assert seqs * kv >= slots or seqs * kv * splits >= SPLIT_ROUNDS * slots or \
            splits == max(1, ctx // MIN_PARTITION_TOKENS)


def test_decode_default_splits_are_the_backends_own(monkeypatch):
    # triton: triton_num_splits from the device's SM count; cuda keeps default_num_splits. The backend is
    # chosen by a stand-in for backends.resolve: on a machine with CUDA the tests run without
    # TRITON_INTERPRET, where Triton takes no CPU tensors, and the cuda backend needs a GPU.
    from r1fast.kernels import decode_attention as kernel
    from r1fast.ops import attention

    assert attention.sm_count(torch.device("cpu")) == attention.DEFAULT_NUM_SMS
    assert attention.default_num_splits(2, 2, 1024) == 2  # the cuda backend's: 512-token partitions
    seen = []
    monkeypatch.setattr(kernel, "paged_decode_attention", lambda out, *a: seen.append(a[6:8]))
    run = {"triton": backends.implementations("paged_decode_attention")["triton"],  # hands the kernel its splits
           "cuda": lambda *a: seen.append(a[6:8])}
    q, kc, vc, tables, ctx = make_case(2, 4, 2, 16, 16, [1000, 37])  # 64-block tables: 1024 tokens
    # triton, 4 pairs on 132 SMs: 1024 // 256 = 4 partitions; on 1 SM ceil(2 x 6 / 4) = 3, of 22 whole blocks;
    # cuda: 2 partitions of 512 on any SM count
    for name, sms, want in (("triton", 132, (4, 256)), ("triton", 1, (3, 352)), ("cuda", 132, (2, 512)),
                            ("cuda", 1, (2, 512))):
        monkeypatch.setattr(attention, "sm_count", lambda device: sms)
        monkeypatch.setattr(backends, "resolve", lambda op, device, backend, **kw: (backend, run[backend]))
        ops.paged_decode_attention(q, kc, vc, tables, ctx, backend=name)
        assert seen.pop() == want, (name, sms)


def test_decode_default_splits_match_reference(device):
    # num_splits=None over a 1024-token table: the triton default splits it (4 partitions on the CPU)
    q, kc, vc, tables, ctx = make_case(2, 4, 2, 16, 16, [1000, 37], device=device)
    want = expected(q, kc, vc, tables, ctx)
    for name in decode_backends(torch.device(device)):
        got = ops.paged_decode_attention(q, kc, vc, tables, ctx, backend=name)
        assert_close(got, want, dtype=torch.float32, rtol=1e-5, name=f"{name} default splits")


@pytest.mark.parametrize("carry", [True, False])
def test_decode_block_ids_carried_a_step_ahead_match_reference(device, monkeypatch, carry):
    # The kernel's two ways to find a step's blocks (carried from the step before, or loaded in the
    # step; the wrapper picks by dtype and shape): contexts of 1 to 9 blocks, block sizes 8 and 16,
    # GQA, split-K with empty partitions, and the shared-prefix path whose rows start past the prefix
    from r1fast.kernels import decode_attention as kernel

    monkeypatch.setattr(kernel, "carry_blocks", lambda *a: carry)
    monkeypatch.setattr(kernel, "prefix_carry_blocks", lambda *a: carry)
    for bs in (8, 16):
        q, kc, vc, tables, ctx = make_case(5, 6, 2, 16, bs, [1, 5, bs + 1, 70, 2 * bs], device=device)
        want = expected(q, kc, vc, tables, ctx)
        for splits in (1, 3):
            got = ops.paged_decode_attention(q, kc, vc, tables, ctx, num_splits=splits, backend="triton")
            assert_close(got, want, dtype=torch.float32, rtol=1e-5, name=f"carry={carry} bs={bs} x{splits}")
    groups = [(3, [21, 29, 13, 40]), (0, [17])]
    q, kc, vc, tables, ctx = make_shared_case(groups, 6, 2, 16, block_size=4, device=device)
    want = expected(q, kc, vc, tables, ctx)
    shared = find_shared(tables, ctx, q, kc).to(device)
    for splits in (1, 3):
        got = ops.paged_decode_attention(q, kc, vc, tables, ctx, num_splits=splits, backend="triton",
                                         shared_prefix=shared)
        assert_close(got, want, dtype=torch.float32, rtol=1e-5, name=f"carry={carry} shared x{splits}")


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


def test_decode_block_id_equal_to_num_blocks_is_out_of_range():
    # the first id past the cache (num_blocks itself), in the partial last block a context reads
    q, kc, vc, tables, ctx = make_case(2, 4, 2, 16, 8, [5, 9])
    bad = tables.clone()
    bad[1, 1] = kc.shape[0]
    with pytest.raises(ValueError, match="block_tables entries in use must lie in \\[0, %d\\)" % kc.shape[0]):
        ops.paged_decode_attention(q, kc, vc, bad, ctx)
    bad[1, 1] = kc.shape[0] - 1  # the last block is in range
    ops.paged_decode_attention(q, kc, vc, bad, ctx)


def make_prefill_case():
    """Two sequences in a 12-block cache (block_size 4): 6 cached tokens + 3 new, and a fresh prompt of 5."""
    bs, hkv, h, d = 4, 2, 4, 16
    kc, vc = randn(12, bs, hkv, d, seed=13), randn(12, bs, hkv, d, seed=14)
    tables = [[5, 2, 9], [0, 7]]
    query_lens, context_lens = [3, 5], [9, 5]
    slots = torch.tensor([tables[b][p // bs] * bs + p % bs for b, c in enumerate(context_lens) for p in range(c)])
    return randn(8, h, d, seed=15), kc, vc, slots, query_lens, context_lens


def _meta(t):
    return t.to("meta")


def _as(dtype):
    return lambda a: a.update(**{k: a[k].to(dtype) for k in ("q", "k_cache", "v_cache")})


def _cu(lens):
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)


def _set_slot(i, value):
    def mutate(a):
        a["context_slots"] = a["context_slots"].clone()
        a["context_slots"][i] = value
    return mutate


@pytest.mark.parametrize("mutate, error, match", [
    (lambda a: a.update(context_slots=_meta(a["context_slots"])), ValueError, "one device"),
    (lambda a: a.update(k_cache=_meta(a["k_cache"]), v_cache=_meta(a["v_cache"])), ValueError, "one device"),
    (_set_slot(4, 48), ValueError, "context_slots must lie in \\[0, 48\\)"),
    (_set_slot(0, -1), ValueError, "context_slots must lie in"),
    (lambda a: a.update(q=a["q"].half()), ValueError, "share a float dtype"),
    (_as(torch.int64), ValueError, "share a float dtype"),
    (lambda a: a.update(k_cache=a["k_cache"].transpose(0, 1).contiguous().transpose(0, 1)), ValueError,
     "k_cache must be contiguous"),
    (lambda a: a.update(context_slots=a["context_slots"].tolist()), TypeError, "context_slots must be a torch.Tensor"),
    (lambda a: a.update(v_cache=a["v_cache"].tolist()), TypeError, "v_cache must be a torch.Tensor"),
    (lambda a: a.update(k_cache=a["k_cache"][:, :, :0], v_cache=a["v_cache"][:, :, :0]), ValueError,
     "num_kv_heads must be >= 1"),
    (lambda a: a.update(q=a["q"][..., :0], k_cache=a["k_cache"][..., :0], v_cache=a["v_cache"][..., :0]),
     ValueError, "head_dim must be >= 1"),
    (lambda a: a.update(query_lens=[2.7, 5.3]), TypeError, "query_lens must hold ints, got 2.7"),
    (lambda a: a.update(context_lens=["9", "5"]), TypeError, "context_lens must hold ints"),
    (lambda a: a.update(query_lens=8), TypeError, "query_lens must be a host list of ints"),
    (lambda a: a.update(scale="x"), TypeError, "scale must be a real number"),
    (lambda a: a.update(scale=float("nan")), ValueError, "scale must be finite, got nan"),
    (lambda a: a.update(scale=float("inf")), ValueError, "scale must be finite, got inf"),
    # the varlen kernels (CUDA) read q and the keys at these bounds: other values read past them
    (lambda a: a.update(cu_seqlens=(_cu(a["query_lens"]) + 1, _cu(a["context_lens"]))), ValueError,
     "cu_seqlens cu_q must be the prefix sums"),
    (lambda a: a.update(cu_seqlens=(_cu(a["query_lens"]), _cu(a["context_lens"]).flip(0))), ValueError,
     "cu_seqlens cu_k must be the prefix sums"),
    (lambda a: a.update(cu_seqlens=(_cu(a["query_lens"]), _cu(a["context_lens"]).repeat_interleave(2)[::2])),
     ValueError, "cu_seqlens must be two int32 .* each contiguous"),
])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_prefill_bad_inputs_are_clear_errors(backend, mutate, error, match):
    q, kc, vc, slots, query_lens, context_lens = make_prefill_case()
    args = dict(q=q, k_cache=kc, v_cache=vc, context_slots=slots, query_lens=query_lens, context_lens=context_lens)
    mutate(args)
    with pytest.raises(error, match=f"paged_prefill_attention: .*{match}"):
        ops.paged_prefill_attention(**args, backend=backend)


def test_prefill_bounds_check_is_skippable_and_no_sequences_give_an_empty_result():
    q, kc, vc, slots, query_lens, context_lens = make_prefill_case()
    checked = ops.paged_prefill_attention(q, kc, vc, slots, query_lens, context_lens)
    # the engine's call: its slots come from the block manager, so the host sync is skipped
    assert torch.equal(ops.paged_prefill_attention(q, kc, vc, slots, query_lens, context_lens, check_bounds=False),
                       checked)
    assert torch.equal(ops.paged_prefill_attention(q, kc, vc, slots, tuple(query_lens),
                                                   np.array(context_lens)), checked)
    for backend in ("reference", "torch"):
        out = ops.paged_prefill_attention(q[:0], kc, vc, slots[:0], [], [], backend=backend)
        assert out.shape == (0, 4, 16), backend


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
    with pytest.raises(ValueError, match="need 1 <= query_len"):  # a sequence with no new token
        ops.paged_prefill_attention(q[:5], kc, vc, slots, [0, 5], [9, 5])
    cu = (torch.tensor([0, 3, 8], dtype=torch.int32), torch.tensor([0, 9, 14], dtype=torch.int32))
    again = ops.paged_prefill_attention(q, kc, vc, slots, query_lens, context_lens, backend=backend, cu_seqlens=cu)
    assert torch.equal(again, got)
    with pytest.raises(ValueError, match="cu_seqlens must be two int32 \\[3\\] tensors"):
        ops.paged_prefill_attention(q, kc, vc, slots, query_lens, context_lens, cu_seqlens=(cu[0], cu[1].long()))


def test_decode_ignores_inf_and_nan_past_the_context_in_used_blocks(device):
    # Stale rows of a used block (an earlier sequence's, here inf/NaN) weigh 0: 0 * inf must not reach
    # the output. The unused table entries hold ids outside the cache, which no backend may read.
    q, kc, vc, tables, ctx = make_case(3, 4, 2, 16, 8, [5, 9, 14], device=device)
    want = expected(q, kc, vc, tables, ctx)
    stale = torch.tensor([float("inf"), float("nan"), -float("inf")] * 3, device=device)
    for b, c in enumerate(ctx.tolist()):
        block = int(tables[b, (c - 1) // 8])
        for cache in (kc, vc):
            cache[block, c % 8:] = stale[: 8 - c % 8, None, None]
    bad = tables.clone()
    bad[:, -1] = torch.tensor([10_000, 2**31 - 1, -2**31], dtype=torch.int32)
    for name in decode_backends(torch.device(device)):
        for t in (tables, bad):
            got = ops.paged_decode_attention(q, kc, vc, t, ctx, backend=name)
            assert_close(got, want, dtype=torch.float32, rtol=1e-5, name=f"{name} decode over stale rows")


def test_decode_of_no_sequences_is_empty_on_every_backend(device):
    q = randn(0, 4, 16, seed=90, device=device)
    kc, vc = randn(6, 8, 2, 16, seed=91, device=device), randn(6, 8, 2, 16, seed=92, device=device)
    tables = torch.zeros(0, 3, dtype=torch.int32, device=device)
    ctx = torch.zeros(0, dtype=torch.int32, device=device)
    for name in backends.available("paged_decode_attention", torch.device(device)):
        out = ops.paged_decode_attention(q, kc, vc, tables, ctx, backend=name)
        assert out.shape == (0, 4, 16) and out.dtype == q.dtype, name


def test_decode_kernel_backends_refuse_inputs_needing_grad_instead_of_dropping_it(device):
    # The triton/cuda kernels return an output with no graph: a q that requires grad silently got none.
    q, kc, vc, tables, ctx = make_case(2, 4, 2, 16, 4, [5, 8], device=device)
    kernels = [b for b in decode_backends(device) if b != "torch"]
    assert kernels
    for name in kernels:
        for grad_of in ("q", "k_cache"):
            args = {"q": q, "k_cache": kc, "v_cache": vc}
            args[grad_of] = args[grad_of].clone().requires_grad_(True)
            with pytest.raises(ValueError, match=f"{grad_of} require grad, but the {name} backend has no backward"):
                ops.paged_decode_attention(**args, block_tables=tables, context_lens=ctx, backend=name)
            with torch.no_grad():  # the rollout engine's case: fine
                ops.paged_decode_attention(**args, block_tables=tables, context_lens=ctx, backend=name)
    # the torch backend is differentiable
    qg = q.clone().requires_grad_(True)
    ops.paged_decode_attention(qg, kc, vc, tables, ctx, backend="torch").sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()


def test_decode_scale_of_the_wrong_type_is_a_clear_error():
    q, kc, vc, tables, ctx = make_case(2, 4, 2, 16, 8, [5, 9])
    with pytest.raises(TypeError, match="paged_decode_attention: scale must be a real number"):
        ops.paged_decode_attention(q, kc, vc, tables, ctx, scale="x")
    for bad in (float("nan"), float("inf"), -float("inf")):  # every output would be NaN
        with pytest.raises(ValueError, match="paged_decode_attention: scale must be finite"):
            ops.paged_decode_attention(q, kc, vc, tables, ctx, scale=bad)
    with pytest.raises(ValueError, match="paged_decode_attention: head_dim must be >= 1"):
        ops.paged_decode_attention(q[..., :0], kc[..., :0], vc[..., :0], tables, ctx, backend="torch")


def test_decode_degenerate_cache_shapes_are_clear_errors():
    q, kc, vc, tables, ctx = make_case(2, 4, 2, 16, 8, [5, 9])
    with pytest.raises(ValueError, match="num_kv_heads must be >= 1"):
        ops.paged_decode_attention(q, kc[:, :, :0], vc[:, :, :0], tables, ctx, backend="torch")
    with pytest.raises(ValueError, match="block_size and num_kv_heads"):
        ops.paged_decode_attention(q, kc[:, :0], vc[:, :0], tables, ctx, check_bounds=False, backend="torch")


@pytest.mark.skipif(not __import__("r1fast._ext", fromlist=["x"]).build_info()["built"], reason="r1fast._C not built")
def test_decode_extension_checks_the_split_cover_before_any_launch():
    # Raw r1fast._C call (argument checks run before the CUDA check, so this works on any machine):
    # 2 splits x 16 tokens do not cover a 5-block x 8-token table; tokens 32..39 would be skipped.
    from r1fast import _ext

    ext = _ext.require()
    args = dict(out=16, q=16, k_cache=16, v_cache=16, block_tables=16, context_lens=16, workspace_acc=16,
                workspace_ml=16, row_start=0, prefix_ml=0, prefix_acc=0, num_seqs=1, num_heads=4, num_kv_heads=2, head_dim=16, num_blocks=10, block_size=8,
                max_blocks_per_seq=5, num_splits=2, partition_size=16, scale=0.25, dtype=0, stream=0)
    with pytest.raises(ValueError, match="does not cover"):
        ext.decode_attention_cuda(**args)
    with pytest.raises(ValueError, match="below 2\\^31"):
        ext.decode_attention_cuda(**{**args, "max_blocks_per_seq": 2**19, "block_size": 2**11,
                                     "num_splits": 2**9, "partition_size": 2**22})
    with pytest.raises(ValueError, match="together or not at all"):
        ext.decode_attention_cuda(**{**args, "num_splits": 3, "row_start": 16})


@pytest.mark.parametrize("bad,match", [
    ("row_start_int64", "row_start must be a contiguous torch.int32 \\[3\\]"),
    ("row_start_short", "row_start must be a contiguous torch.int32 \\[3\\]"),
    ("prefix_ml_shape", "prefix_ml must be a contiguous torch.float32 \\[3, 8, 2\\]"),
    ("prefix_acc_strided", "prefix_acc must be a contiguous torch.float32 \\[3, 8, 64\\]"),
])
def test_decode_cuda_op_checks_the_shared_prefix_tensors_it_passes_as_pointers(bad, match):
    # torch.ops.r1fast.paged_decode_attention_cuda is public: its prefix tensors reach the kernel as raw
    # pointers (a short or int64 row_start was read past its end / as pairs of int32). The checks run
    # before anything touches a device, so this works on any machine.
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, kc, vc, tables, ctx = make_case(3, 8, 2, 64, 16, [5, 40, 60], device=dev)
    tables = tables.clamp_min(0)
    rs = torch.zeros(3, dtype=torch.int32, device=dev)
    ml, acc = torch.zeros(3, 8, 2, device=dev), torch.zeros(3, 8, 64, device=dev)
    if bad == "row_start_int64":
        rs = rs.long()
    elif bad == "row_start_short":
        rs = rs[:1]
    elif bad == "prefix_ml_shape":
        ml = torch.zeros(3, 8, device=dev)
    else:
        acc = torch.zeros(3, 8, 128, device=dev)[..., ::2]
    with pytest.raises(ValueError, match=match):
        torch.ops.r1fast.paged_decode_attention_cuda(q, kc, vc, tables, ctx, 0.125, 1, 64, rs, ml, acc)


@pytest.mark.parametrize("num_splits", [True, False, 0, 1.0, "2"], ids=repr)
def test_decode_split_count_that_is_not_a_positive_int_is_refused(num_splits):
    # True was taken as one split (False refused as 0), where chunk_size=True and group_size=True are refused
    q, kc, vc, tables, ctx = make_case(2, 4, 2, 16, 8, [5, 9], seed=23)
    torch.testing.assert_close(ops.paged_decode_attention(q, kc, vc, tables, ctx, num_splits=1, backend="torch"),
                               ops.paged_decode_attention(q.double(), kc.double(), vc.double(), tables, ctx,
                                                          backend="reference").float())
    with pytest.raises(ValueError, match=rf"^paged_decode_attention: num_splits must be a positive int, got "
                                         rf"{re.escape(repr(num_splits))}$"):
        ops.paged_decode_attention(q, kc, vc, tables, ctx, num_splits=num_splits, backend="torch")


def test_decode_split_count_beyond_the_grid_limit_is_a_clear_error():
    # splits run on launch-grid dim z, which CUDA caps at 65535
    q, kc, vc, _, _ = make_case(1, 2, 1, 8, 1, [3])
    tables = torch.zeros(1, 70_000, dtype=torch.int32)
    ctx = torch.tensor([3], dtype=torch.int32)
    with pytest.raises(ValueError, match="grid limit"):
        ops.paged_decode_attention(q, kc, vc, tables, ctx, num_splits=70_000, check_bounds=False, backend="torch")


def test_decode_sequences_beyond_the_triton_grid_limit_are_a_clear_error_or_go_elsewhere():
    # the triton kernel launches sequences on grid axis y, which CUDA caps at 65535: asked for by name it
    # says so before any launch; chosen automatically, another backend takes them
    from r1fast.ops.attention import MAX_GRID_YZ

    n = MAX_GRID_YZ + 1
    g = torch.Generator().manual_seed(3)
    q = torch.randn(n, 2, 8, generator=g)
    kc, vc = torch.randn(2, 4, 1, 8, generator=g), torch.randn(2, 4, 1, 8, generator=g)
    tables = torch.randint(0, 2, (n, 1), generator=g, dtype=torch.int32)
    ctx = torch.randint(1, 5, (n,), generator=g, dtype=torch.int32)
    with pytest.raises(ValueError, match=f"{n} sequences exceed the triton kernel's launch grid limit"):
        ops.paged_decode_attention(q, kc, vc, tables, ctx, check_bounds=False, backend="triton")
    want = ops.paged_decode_attention(q[-3:], kc, vc, tables[-3:], ctx[-3:], backend="reference")
    got = ops.paged_decode_attention(q, kc, vc, tables, ctx, check_bounds=False)
    torch.testing.assert_close(got[-3:], want)


# ----------------------------------------------------------------------------------------------
# shared prefixes: the G samples of a group read their prompt's blocks once


def make_shared_case(groups, num_heads=6, num_kv_heads=2, head_dim=16, block_size=4, seed=0, dtype=torch.float32,
                     device="cpu"):
    """groups: (shared_blocks, [context length of each member]); rows of the groups interleaved, each
    member's blocks past the shared ones its own, unused table entries a bad id."""
    g = torch.Generator().manual_seed(seed)
    rows = [(gi, n) for gi, (_, lens) in enumerate(groups) for n in lens]
    rows = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
    width = max(-(-n // block_size) for _, n in rows) + 1
    num_blocks = sum(sb for sb, _ in groups) + sum(-(-n // block_size) for _, n in rows) + 2
    ids = iter(torch.randperm(num_blocks, generator=g).tolist())
    shared = [[next(ids) for _ in range(sb)] for sb, _ in groups]
    tables = torch.full((len(rows), width), -7, dtype=torch.int32)
    for r, (gi, n) in enumerate(rows):
        own = [next(ids) for _ in range(-(-n // block_size) - len(shared[gi]))]
        tables[r, : len(shared[gi]) + len(own)] = torch.tensor(shared[gi] + own, dtype=torch.int32)
    ctx = torch.tensor([n for _, n in rows], dtype=torch.int32)
    q = randn(len(rows), num_heads, head_dim, seed=seed + 1, dtype=dtype, device=device)
    kc = randn(num_blocks, block_size, num_kv_heads, head_dim, seed=seed + 2, dtype=dtype, device=device)
    vc = randn(num_blocks, block_size, num_kv_heads, head_dim, seed=seed + 3, dtype=dtype, device=device)
    return q, kc, vc, tables.to(device), ctx.to(device)


def find_shared(tables, ctx, q, kc):
    from r1fast.ops.shared_prefix import find_shared_prefixes

    return find_shared_prefixes(tables.cpu().numpy(), ctx.cpu().numpy(), kc.shape[1], q.shape[1], kc.shape[2],
                                q.shape[2])


def test_find_shared_prefixes_groups_tiles_and_cuts():
    from r1fast.ops.shared_prefix import shared_block_tiles, shared_prefix_at

    # three groups: 11 rows sharing 2 blocks (group 6 x head_dim 16: 10 rows per tile -> tiles of 6 and 5),
    # 2 rows sharing 3 blocks, one of them at a context that keeps only 2 of them (and its last token)
    # to itself; a row alone
    q, kc, vc, tables, ctx = make_shared_case([(2, [13] * 11), (3, [14, 12]), (0, [6])], num_heads=12)
    sp = find_shared(tables, ctx, q, kc)
    counts = np.diff(sp.tile_ptr).tolist()
    prefix = dict(zip(counts, sp.tile_prefix.tolist()))
    assert sorted(counts) == [2, 5, 6] and prefix[6] == prefix[5] == 8 and prefix[2] == 11
    for t, (a, b) in enumerate(zip(sp.tile_ptr[:-1], sp.tile_ptr[1:])):
        members = sp.tile_rows[a:b]
        assert (tables[members, : -(-sp.tile_prefix[t] // 4)] == tables[members[0], : -(-sp.tile_prefix[t] // 4)]).all()
        assert (sp.row_start[members] == sp.tile_prefix[t]).all()
    alone = int(np.flatnonzero(ctx.numpy() == 6)[0])
    assert sp.row_start[alone] == 0 and alone not in sp.tile_rows
    # the same tiles at shorter contexts are cut so every row keeps its current token to itself
    tiles = shared_block_tiles(tables.numpy(), ctx.numpy(), 4, 6, 16)
    assert shared_prefix_at(tiles, np.minimum(ctx.numpy(), 5)).tile_prefix.max() == 4
    # padding that happens to match is not a shared block: only blocks inside every context count
    t2 = torch.zeros(2, 4, dtype=torch.int32)
    t2[:, 0] = 3
    t2[0, 1], t2[1, 1] = 5, 6
    assert find_shared(t2, torch.tensor([6, 6], dtype=torch.int32), q, kc).tile_prefix.tolist() == [4]
    # a chat template's header: every row's first block is the same one; each group's samples still
    # share their own deeper prompt blocks, so the tiles stay one group each (not one group of all rows)
    headed = tables.clone()
    headed[:, 0] = tables[0, 0]
    sp = find_shared(headed, ctx, q, kc)
    assert sorted(np.diff(sp.tile_ptr).tolist()) == [2, 5, 6] and sorted(set(sp.tile_prefix.tolist())) == [8, 11]
    # sparse (huge) block ids are counted by sorting, not by a count array as long as the largest id
    far = tables.clone()
    far[far >= 0] += 2**30
    assert [a.tolist() for a in find_shared(far, ctx, q, kc)] == [a.tolist() for a in find_shared(tables, ctx, q, kc)]
    # tiles as even as they go: 13 rows at 4 per tile (group 16) -> 3 + 3 + 3 + 4, never a lone row
    q16, kc16, _, t16, c16 = make_shared_case([(2, [13] * 13)], num_heads=32, num_kv_heads=2)
    assert sorted(np.diff(find_shared(t16, c16, q16, kc16).tile_ptr).tolist()) == [3, 3, 3, 4]
    # 3 rows at 2 per tile (group 32): a one-row tile would save nothing, so that row reads its own prefix
    q32, kc32, _, t32, c32 = make_shared_case([(2, [13] * 3)], num_heads=32, num_kv_heads=1)
    sp32 = find_shared(t32, c32, q32, kc32)
    assert np.diff(sp32.tile_ptr).tolist() == [2] and sorted(sp32.row_start.tolist()) == [0, 8, 8]
    with pytest.raises(ValueError, match="context lengths must lie"):
        find_shared(tables[:, :2], ctx, q, kc)
    holed = tables.clone()
    holed[1, 0] = -1
    with pytest.raises(ValueError, match=r"block_tables\[1, 0\] = -1 is a negative block id inside row 1's"):
        find_shared(holed, ctx, q, kc)
    assert find_shared(tables[:1], ctx[:1], q, kc) is None
    assert find_shared(torch.arange(8, dtype=torch.int32).view(4, 2), torch.tensor([5] * 4), q, kc) is None


def test_rows_leaving_shrink_the_tiles_like_a_fresh_search():
    from r1fast.ops.shared_prefix import drop_tile_rows, shared_block_tiles

    q, kc, vc, tables, ctx = make_shared_case([(2, [13] * 11), (3, [14, 12, 15]), (1, [6, 7])], num_heads=12)
    tiles = shared_block_tiles(tables.numpy(), ctx.numpy(), 4, 6, 16)
    rng = np.random.default_rng(0)
    for _ in range(20):
        keep = rng.random(len(ctx)) < 0.6
        got = drop_tile_rows(tiles, keep)
        fresh = shared_block_tiles(tables.numpy()[keep], ctx.numpy()[keep], 4, 6, 16)
        if fresh is None:
            assert got is None
            continue
        # every row still tiled shares what a fresh search finds; a row is dropped only when its tile
        # was left with it alone (a fresh search may regroup it with rows of a sibling tile)
        def members(t):
            return {int(r): int(tok) for a, b, tok in zip(t[0][:-1], t[0][1:], t[2]) for r in t[1][a:b]}
        kept, want = members(got) if got else {}, members(fresh)
        assert all(want[r] == tok for r, tok in kept.items())
        new_index = np.cumsum(keep) - 1
        for a, b in zip(tiles[0][:-1], tiles[0][1:]):
            survivors = [int(new_index[r]) for r in tiles[1][a:b] if keep[r]]
            assert all(r in kept for r in survivors) == (len(survivors) >= 2) or not survivors
        if got:
            assert (np.diff(got[0]) >= 2).all()


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(6, 2, 16), (4, 4, 24), (16, 2, 32)])
def test_decode_with_shared_prefix_matches_reference(device, heads, kv_heads, head_dim):
    from r1fast.ops.shared_prefix import pad_shared_prefix

    # 8 samples of one prompt (5 blocks shared), 3 of another (a partial block of its own), a lone row
    groups = [(5, [21, 29, 23, 40, 22, 25, 33, 21]), (1, [5, 7, 9]), (0, [17])]
    q, kc, vc, tables, ctx = make_shared_case(groups, heads, kv_heads, head_dim, device=device)
    want = expected(q, kc, vc, tables, ctx)
    sp = find_shared(tables, ctx, q, kc)
    # as found, and in a CUDA graph's fixed-size buffers (rows // 2 tiles, the trailing ones empty)
    for shared in (sp.to(device), pad_shared_prefix(sp, len(ctx), len(ctx)).to(device)):
        for name in decode_backends(torch.device(device)):
            for splits in (1, 3):
                got = ops.paged_decode_attention(q, kc, vc, tables, ctx, num_splits=splits, backend=name,
                                                 shared_prefix=shared)
                assert_close(got, want, dtype=torch.float32, rtol=1e-5, name=f"{name} shared prefix x{splits}")
    # a one-row graph step: its buffers hold no tile at all (nothing to launch)
    one = pad_shared_prefix(None, 1, 1).to(device)
    for name in decode_backends(torch.device(device)):
        got = ops.paged_decode_attention(q[:1], kc, vc, tables[:1], ctx[:1], backend=name, shared_prefix=one)
        assert_close(got, want[:1], dtype=torch.float32, rtol=1e-5, name=f"{name} zero tiles")


@pytest.mark.parametrize("scale", [3000.0, -3000.0])
def test_decode_fp16_with_a_scale_above_one_stays_finite(device, scale):
    # q*scale rounded to fp16 overflowed to inf (then NaN) in the Triton kernels; the scale now
    # multiplies the fp32 scores. Plain decode and the shared-prefix path, against float64. A negative
    # scale of magnitude > 1 overflows as well (it still took the q * scale path).
    groups = [(2, [21, 19, 23]), (0, [9])]
    q, kc, vc, tables, ctx = make_shared_case(groups, 4, 2, 16, dtype=torch.float16, device=device)
    q = (q.float() * 30).half()  # |q| up to ~100: q * 3000 is past 65504
    want = ref.paged_decode_attention(q.double().cpu(), kc.double().cpu(), vc.double().cpu(),
                                      tables.cpu().clamp_min(0), ctx.cpu(), scale=scale)
    shared = find_shared(tables, ctx, q, kc).to(device)
    for name in decode_backends(torch.device(device)):
        for sp in (None, shared):
            got = ops.paged_decode_attention(q, kc, vc, tables, ctx, scale=scale, backend=name, shared_prefix=sp)
            assert torch.isfinite(got).all(), f"{name} shared_prefix={sp is not None}"
            assert_close(got, want, dtype=torch.float16, name=f"{name} scale {scale}")


def test_decode_shared_prefix_bad_inputs_raise():
    q, kc, vc, tables, ctx = make_shared_case([(2, [9, 10, 11])])
    sp = find_shared(tables, ctx, q, kc).to("cpu")
    with pytest.raises(TypeError, match="SharedPrefix"):
        ops.paged_decode_attention(q, kc, vc, tables, ctx, shared_prefix=tuple(sp))
    with pytest.raises(ValueError, match="1-D int32"):
        ops.paged_decode_attention(q, kc, vc, tables, ctx, shared_prefix=sp._replace(row_start=sp.row_start.long()))
    strided = torch.stack([sp.row_start, sp.row_start], dim=1)[:, 0]  # same values, stride 2: kernels read stride 1
    with pytest.raises(ValueError, match="contiguous 1-D int32"):
        ops.paged_decode_attention(q, kc, vc, tables, ctx, shared_prefix=sp._replace(row_start=strided))
    with pytest.raises(ValueError, match="row_start \\[num_seqs=3\\]"):
        ops.paged_decode_attention(q, kc, vc, tables, ctx, shared_prefix=sp._replace(row_start=sp.row_start[:2]))
    falling = sp.tile_ptr.flip(0).contiguous()
    with pytest.raises(ValueError, match=r"tile_ptr must rise from 0 to at most len\(tile_rows\)=\d+, got \[%d, "
                       % int(falling[0])):
        ops.paged_decode_attention(q, kc, vc, tables, ctx, shared_prefix=sp._replace(tile_ptr=falling))
    not_shared = tables.clone()
    not_shared[int(sp.tile_rows[1]), 1] = int(tables.max()) + 1  # a member's second block is its own
    kc2, vc2 = (torch.cat([c, c[:1]]) for c in (kc, vc))
    with pytest.raises(ValueError, match="do not share the blocks"):
        ops.paged_decode_attention(q, kc2, vc2, not_shared, ctx, shared_prefix=sp)
    with pytest.raises(ValueError, match="shortest member context"):
        ops.paged_decode_attention(q, kc, vc, tables, ctx, shared_prefix=sp._replace(
            tile_prefix=torch.full_like(sp.tile_prefix, 9)))
    with pytest.raises(ValueError, match="row_start must be"):
        ops.paged_decode_attention(q, kc, vc, tables, ctx, shared_prefix=sp._replace(
            row_start=torch.zeros_like(sp.row_start)))
    with pytest.raises(ValueError, match="distinct rows"):
        ops.paged_decode_attention(q, kc, vc, tables, ctx, shared_prefix=sp._replace(
            tile_rows=torch.full_like(sp.tile_rows, 1)))
    # the tile arrays' lengths are checked even without the bounds checks (the kernels read tile_ptr[t + 1])
    with pytest.raises(ValueError, match="tile_ptr \\[num_tiles \\+ 1\\]"):
        ops.paged_decode_attention(q, kc, vc, tables, ctx, check_bounds=False,
                                   shared_prefix=sp._replace(tile_ptr=sp.tile_ptr[:-1].contiguous()))
    # tile_ptr must not fall: two tiles [0, 2) and [2, 0) would hand the kernel a negative member count
    two = make_shared_case([(2, [9, 10]), (1, [6, 7])])
    sp2 = find_shared(two[3], two[4], two[0], two[1]).to("cpu")
    assert sp2.tile_ptr.tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match="tile_ptr must rise"):
        ops.paged_decode_attention(*two, shared_prefix=sp2._replace(tile_ptr=torch.tensor([0, 4, 2], dtype=torch.int32)))
    # a prefix ending inside a block: that partial block must be shared too (its tokens are read from
    # the tile's first member's table for every member)
    part = sp._replace(tile_prefix=torch.full_like(sp.tile_prefix, 6),
                       row_start=torch.where(sp.row_start > 0, 6, 0).to(torch.int32))
    ops.paged_decode_attention(q, kc, vc, tables, ctx, shared_prefix=part)  # 2 whole blocks shared: fine
    with pytest.raises(ValueError, match="do not share the blocks"):
        ops.paged_decode_attention(q, kc2, vc2, not_shared, ctx, shared_prefix=part)


# ----------------------------------------------------------------------------------------------
# GPU checks at real sizes (skipped without CUDA); each takes seconds at most.

def _gpu_decode_backends():
    names = [b for b in ("cuda", "triton") if b in backends.available("paged_decode_attention", "cuda")]
    assert "triton" in names
    return names


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(12, 2, 128), (28, 4, 128), (16, 16, 64), (8, 1, 256)])
def test_decode_shared_prefix_gpu(dtype, heads, kv_heads, head_dim):
    # GRPO's shape: groups of 8 and 16 samples over a 256-token prompt (16 blocks of 16), their own
    # tokens past it, a lone row; every backend, one split and several, the engine's graph padding
    # (empty trailing tiles) too.
    from r1fast.ops.shared_prefix import pad_shared_prefix
    from r1fast.testing import assert_within_lowp_rule

    groups = [(16, [257 + 37 * i for i in range(8)]), (16, [300 + 11 * i for i in range(16)]), (0, [700])]
    q, kc, vc, tables, ctx = make_shared_case(groups, heads, kv_heads, head_dim, block_size=16, dtype=dtype,
                                              device="cuda")
    want = expected(q, kc, vc, tables, ctx)
    ref_lowp = ref.paged_decode_attention(q, kc, vc, tables.clamp_min(0), ctx).cpu()
    sp = find_shared(tables, ctx, q, kc)
    assert sp is not None and int(sp.tile_prefix.min()) == 256
    for shared in (sp.to("cuda"), pad_shared_prefix(sp, len(ctx), len(ctx)).to("cuda")):
        for name in _gpu_decode_backends():
            for splits in (1, 3):
                got = ops.paged_decode_attention(q, kc, vc, tables, ctx, num_splits=splits, backend=name,
                                                 shared_prefix=shared)
                assert_within_lowp_rule(got, ref_lowp, want, factor=2.0, floor=1e-5,
                                        name=f"{name} {dtype} shared prefix x{splits}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [
    (2, 1, 8, 1),      # GQA 2 (tile of 2), 1 element per lane, one token per block
    (6, 2, 40, 5),     # GQA 3 in a tile of 4, head_dim not a power of two, odd block size
    (24, 2, 72, 16),   # GQA 12: two head tiles (8 + 4)
    (64, 1, 96, 32),   # GQA 64: eight full tiles
    (10, 2, 136, 16),  # GQA 5 in a tile of 6, 8 elements per lane with lanes idle
    (10, 2, 96, 16),   # GQA 5 in a tile of 6, 4 elements per lane
    (20, 4, 64, 16),   # GQA 5 at head_dim 64: a tile of 8 (no 6-tile below 4 elements per lane)
    (4, 4, 256, 8),    # MHA at the largest head_dim
])
def test_decode_cuda_every_tile_and_lane_layout(dtype, heads, kv_heads, head_dim, block_size):
    # The cuda kernel picks (elements per lane, query-head tile) from head_dim and the GQA ratio;
    # this covers every tile, partial tiles, idle lanes and odd block sizes, with contexts of 1,
    # exactly one block, a partition boundary (10 blocks = 5 partitions of 2 for 7 splits, 2 of 5
    # for 3) and splits left empty by short sequences.
    if "cuda" not in backends.available("paged_decode_attention", "cuda"):
        pytest.skip("r1fast._C was built without CUDA")
    from r1fast.testing import assert_within_lowp_rule

    bs = block_size
    lens = [1, bs, 3 * bs + 1, 10 * bs, 13 * bs]
    q, kc, vc, tables, ctx = make_case(len(lens), heads, kv_heads, head_dim, bs, lens, dtype=dtype, device="cuda")
    tables[0, 1:] = 0  # a padded graph row: context 1, table of zeros
    want = expected(q, kc, vc, tables, ctx)
    ref_lowp = ref.paged_decode_attention(q, kc, vc, tables.clamp_min(0), ctx).cpu()
    for splits in (None, 1, 3, 7):
        got = ops.paged_decode_attention(q, kc, vc, tables, ctx, num_splits=splits, backend="cuda")
        assert torch.isfinite(got).all(), f"{dtype} x{splits}: non-finite output"
        assert_within_lowp_rule(got, ref_lowp, want, factor=2.0, floor=1e-5, name=f"cuda {dtype} x{splits}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,heads,kv_heads,head_dim", [
    (torch.float64, 4, 2, 32),     # a dtype the cuda kernel does not take
    (torch.bfloat16, 4, 2, 12),    # head_dim not a multiple of 8
    (torch.float32, 4, 1, 264),    # head_dim past 256
    (torch.float16, 130, 2, 16),   # more than 64 query heads per KV head
])
def test_decode_default_backend_passes_over_cuda_for_shapes_it_cannot_take(dtype, heads, kv_heads, head_dim):
    # With no backend asked for, inputs outside the CUDA kernel's shapes run on the next backend;
    # asking for cuda by name stays an error.
    from r1fast.testing import assert_within_lowp_rule

    q, kc, vc, tables, ctx = make_case(3, heads, kv_heads, head_dim, 16, [1, 17, 40], dtype=dtype, device="cuda")
    want = expected(q, kc, vc, tables, ctx)
    ref_lowp = ref.paged_decode_attention(q, kc, vc, tables.clamp_min(0), ctx).cpu()
    got = ops.paged_decode_attention(q, kc, vc, tables, ctx)
    assert_within_lowp_rule(got, ref_lowp, want, factor=2.0, floor=1e-5, name=f"default {dtype} d={head_dim}")
    if "cuda" in backends.available("paged_decode_attention", "cuda"):
        with pytest.raises(ValueError, match="the cuda backend"):
            ops.paged_decode_attention(q, kc, vc, tables, ctx, backend="cuda")


def test_decode_default_backend_passes_over_cuda_for_shapes_it_cannot_take_cpu(monkeypatch):
    # The same choice on the CPU through the real backends.resolve, with a cuda backend stood in for
    # and the GPU's preference order: the stand-in must be called only with inputs it takes.
    def cuda_stand_in(*args):
        raise AssertionError("the cuda backend was given inputs it cannot take")

    real_available, chosen = backends.backend_available, []
    monkeypatch.setitem(backends._REGISTRY["paged_decode_attention"], "cuda", cuda_stand_in)
    monkeypatch.setattr(backends, "_CPU_ORDER", backends._GPU_ORDER)
    monkeypatch.setattr(backends, "backend_available",
                        lambda b, device: (True, "") if b == "cuda" else real_available(b, device))
    for b, fn in list(backends._REGISTRY["paged_decode_attention"].items()):
        if b != "cuda":
            monkeypatch.setitem(backends._REGISTRY["paged_decode_attention"], b,
                                lambda *a, _b=b, _fn=fn: chosen.append(_b) or _fn(*a))
    q, kc, vc, tables, ctx = make_case(2, 4, 2, 12, 8, [3, 9])
    assert_close(ops.paged_decode_attention(q, kc, vc, tables, ctx), expected(q, kc, vc, tables, ctx),
                 dtype=torch.float32, rtol=1e-5, name="default decode, head_dim 12")
    # the next fastest, not the first registered (reference); triton on the CPU only under the interpreter
    assert chosen == ["triton" if real_available("triton", torch.device("cpu"))[0] else "torch"]
    chosen.clear()
    q, kc, vc, tables, ctx = make_case(2, 4, 2, 16, 8, [3, 9], dtype=torch.float64)
    assert_close(ops.paged_decode_attention(q, kc, vc, tables, ctx), expected(q, kc, vc, tables, ctx),
                 dtype=torch.float64, name="default decode, float64")
    assert chosen == ["torch"]  # Triton's kernel keeps fp32 state: float64 goes to torch
    q, kc, vc, tables, ctx = make_case(2, 4, 2, 16, 8, [3, 9])
    with pytest.raises(AssertionError, match="the cuda backend was given"):  # shapes it takes still go to cuda
        ops.paged_decode_attention(q, kc, vc, tables, ctx)
    monkeypatch.setenv("R1FAST_BACKEND", "cuda")  # asked for by name, cuda gets what it cannot take, and raises
    q, kc, vc, tables, ctx = make_case(2, 4, 2, 12, 8, [3, 9])
    with pytest.raises(AssertionError, match="the cuda backend was given"):
        ops.paged_decode_attention(q, kc, vc, tables, ctx)


@pytest.mark.gpu
def test_decode_reads_blocks_past_2_31_elements():
    # bf16 caches of 2^31 + elements (8.6 GB for K and V). The sequences' blocks mix ids near 0 with
    # ids whose rows start at or past element 2^31, where 32-bit offset arithmetic wraps. The float64
    # reference runs on a compact copy of just those blocks.
    from r1fast.testing import assert_within_lowp_rule

    heads, kv_heads, dim, bs = 32, 8, 128, 16
    first_big = 2**31 // (bs * kv_heads * dim)  # block whose first row starts at element 2^31
    num_blocks = first_big + 72
    cache_bytes = 2 * num_blocks * bs * kv_heads * dim * 2
    if torch.cuda.mem_get_info()[0] < cache_bytes + 4 * 2**30:
        pytest.skip(f"needs {cache_bytes / 2**30 + 4:.0f} GiB free on the GPU")
    lens = [1, 37, 300, 1025]
    need = [-(-c // bs) for c in lens]
    g = torch.Generator().manual_seed(5)
    cand = torch.cat([torch.arange(32), torch.arange(first_big - 8, num_blocks)])
    cand = cand[torch.randperm(cand.numel(), generator=g)][: sum(need)]
    local = torch.zeros(len(lens), max(need), dtype=torch.int32)  # indices into the compact copy
    used = 0
    for b, n in enumerate(need):
        local[b, :n] = torch.arange(used, used + n, dtype=torch.int32)
        used += n
    tables = cand[local.long()].int().cuda()
    small_k = randn(sum(need), bs, kv_heads, dim, seed=6, dtype=torch.bfloat16, device="cuda")
    small_v = randn(sum(need), bs, kv_heads, dim, seed=7, dtype=torch.bfloat16, device="cuda")
    # NaN everywhere else: a read from a wrong (wrapped) address poisons the output
    kc = torch.full((num_blocks, bs, kv_heads, dim), float("nan"), dtype=torch.bfloat16, device="cuda")
    vc = torch.full_like(kc, float("nan"))
    try:
        kc[cand.cuda()] = small_k
        vc[cand.cuda()] = small_v
        q = randn(len(lens), heads, dim, seed=8, dtype=torch.bfloat16, device="cuda")
        ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
        want = expected(q, small_k, small_v, local, ctx)
        ref_lowp = ref.paged_decode_attention(q, small_k, small_v, local.cuda(), ctx).cpu()
        for name in _gpu_decode_backends():
            for splits in (None, 4):
                got = ops.paged_decode_attention(q, kc, vc, tables, ctx, num_splits=splits, backend=name)
                assert_within_lowp_rule(got, ref_lowp, want, factor=2.0, floor=1e-5, name=f"{name} x{splits}")
    finally:
        del kc, vc
        torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_store_and_decode_replay_in_a_cuda_graph(name):
    # The rollout runner's decode step: store_kv + decode with the host checks off, captured once
    # and replayed on new inputs copied into the static buffers.
    if name not in backends.available("paged_decode_attention", "cuda"):
        pytest.skip(f"{name} backend unavailable")
    q, kc, vc, tables, ctx = make_case(6, 16, 4, 128, 16, [1, 40, 333, 700, 17, 64], dtype=torch.bfloat16,
                                       device="cuda")
    tables = tables.clamp_min(0)
    key = randn(6, 4, 128, seed=50, dtype=torch.bfloat16, device="cuda")
    value = randn(6, 4, 128, seed=51, dtype=torch.bfloat16, device="cuda")
    slots = (tables[:, 0].long() * 16 + 3).contiguous()

    def step():
        ops.store_kv(key, value, kc, vc, slots, check_slots=False)
        return ops.paged_decode_attention(q, kc, vc, tables, ctx, backend=name, check_bounds=False)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up (compiles / loads the kernels) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    previous = None
    for seed in (60, 70):
        q.copy_(randn(*q.shape, seed=seed, dtype=q.dtype))
        key.copy_(randn(*key.shape, seed=seed + 1, dtype=key.dtype))
        ctx.copy_(torch.tensor([5, 17, 300, 650, 2, 64], dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        replayed = out.clone()
        assert previous is None or not torch.equal(replayed, previous)  # the replay saw the new inputs
        eager = step()  # same inputs again (store_kv rewrites the same rows): same kernels, same bits
        assert torch.equal(replayed, eager), f"{name}: graph replay differs from eager"
        want = expected(q, kc, vc, tables, ctx)
        assert (replayed.double().cpu() - want).abs().max() < 2e-2
        previous = replayed


@pytest.mark.gpu
def test_decode_cuda_op_passes_opcheck_and_checks_alignment():
    if "cuda" not in backends.available("paged_decode_attention", "cuda"):
        pytest.skip("r1fast._C was built without CUDA")
    from r1fast.ops.attention import _decode_cuda_op

    q, kc, vc, tables, ctx = make_case(3, 8, 2, 64, 16, [5, 40, 200], dtype=torch.bfloat16, device="cuda")
    tables = tables.clamp_min(0)
    torch.library.opcheck(_decode_cuda_op, (q, kc, vc, tables, ctx, 0.125, 2, 128))
    buf = torch.empty(q.numel() + 1, dtype=q.dtype, device="cuda")
    shifted = buf[1:].view(q.shape)  # contiguous, 2 bytes past a 16-byte boundary
    shifted.copy_(q)
    with pytest.raises(ValueError, match="16-byte aligned"):
        ops.paged_decode_attention(shifted, kc, vc, tables, ctx, backend="cuda")
    got = ops.paged_decode_attention(shifted, kc, vc, tables, ctx, backend="triton")  # no such limit
    assert (got.double().cpu() - expected(q, kc, vc, tables, ctx)).abs().max() < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_decode_runs_on_the_tensors_device_not_the_current_one():
    q, kc, vc, tables, ctx = make_case(3, 8, 2, 64, 16, [5, 40, 200], device="cuda:1")
    want = expected(q, kc, vc, tables, ctx)
    for name in _gpu_decode_backends():
        with torch.cuda.device(0):
            got = ops.paged_decode_attention(q, kc, vc, tables, ctx, backend=name)
        assert_close(got, want, dtype=torch.float32, rtol=1e-4, name=f"{name} on cuda:1")


_AOT_SCRIPT = """
from r1fast.kernels.compile_check import compile_for
from r1fast.kernels import decode_attention as da, kv_cache as kv
for dt in ("bf16", "fp16", "fp32"):
    types = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "bt_ptr": "*i32", "cl_ptr": "*i32",
             "out_ptr": f"*{dt}", "ml_ptr": "*fp32", "acc_ptr": "*fp32", "rs_ptr": "*i32", "pml_ptr": "*fp32",
             "pacc_ptr": "*fp32", "tile_ptr": "*i32", "rows_ptr": "*i32", "prefix_ptr": "*i32", "scale": "fp32"}
    for group, d in ((1, 64), (6, 128), (8, 256)):
        g_pad, d_pad = max(16, 1 << (group - 1).bit_length()), max(16, d)
        for has_prefix in (False, True):
            compile_for(da._decode_kernel, types, dict(GROUP=group, G_PAD=g_pad, D_PAD=d_pad, HAS_PREFIX=has_prefix,
                        BLOCK_N=32 if d_pad <= 128 else 16, FP32=dt == "fp32"), 90, num_warps=4)
        m_pad = da.prefix_m_pad(group, d, dt == "fp32")
        compile_for(da._prefix_kernel, types, dict(GROUP=group, M_PAD=m_pad, D_PAD=d_pad, FP32=dt == "fp32",
                    BLOCK_N=da.prefix_block_n(d_pad, dt == "fp32")), 90, num_warps=da.num_warps_for(m_pad))
    # a scale above 1 multiplies the fp32 scores instead of q
    compile_for(da._decode_kernel, types, dict(GROUP=8, G_PAD=16, D_PAD=128, HAS_PREFIX=True, BLOCK_N=32,
                FP32=dt == "fp32", SCALE_SCORES=True), 90, num_warps=4)
    compile_for(da._prefix_kernel, types, dict(GROUP=8, M_PAD=da.prefix_m_pad(8, 128, dt == "fp32"), D_PAD=128,
                FP32=dt == "fp32", BLOCK_N=16, SCALE_SCORES=True), 90, num_warps=4)
    for splits, d in ((2, 128), (64, 128), (5, 256)):  # the split-K merge: its smallest and largest tile (64 a pass)
        cfg = da.merge_config(splits, d)
        compile_for(da._merge_kernel, {"out_ptr": f"*{dt}", "ml_ptr": "*fp32", "acc_ptr": "*fp32"},
                    dict(D_PAD=cfg["D_PAD"], S_BLOCK=cfg["S_BLOCK"]), 90, num_warps=cfg["num_warps"])
    types = {"key_ptr": f"*{dt}", "value_ptr": f"*{dt}", "k_cache_ptr": f"*{dt}", "v_cache_ptr": f"*{dt}",
             "slot_ptr": "*i64"}
    compile_for(kv._store_kv_kernel, types, dict(BLOCK=1024), 90, num_warps=4)
print("ok")
"""


@pytest.mark.slow
def test_triton_rollout_kernels_compile_for_sm90():
    # The real compiler (no GPU needed): catches tl.dot shape/dtype and bf16 lowering errors that the
    # interpreter hides. ~12 s of CPU.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


_SPILL_SCRIPT = """
import triton
from r1fast.kernels.compile_check import compile_for, ptxas_usage
from r1fast.kernels import decode_attention as da
for dt, group in (("bf16", 32), ("bf16", 64), ("fp16", 64), ("fp32", 32)):
    types = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "bt_ptr": "*i32", "cl_ptr": "*i32",
             "out_ptr": f"*{dt}", "ml_ptr": "*fp32", "acc_ptr": "*fp32", "scale": "fp32"}
    g_pad, d_pad = max(16, triton.next_power_of_2(group)), 128
    k = compile_for(da._decode_kernel, types, dict(GROUP=group, G_PAD=g_pad, D_PAD=d_pad, FP32=dt == "fp32",
                    HAS_PREFIX=False, BLOCK_N=da.block_n_for(d_pad, dt == "fp32")), 90,
                    num_warps=da.num_warps_for(g_pad))
    usage = ptxas_usage(k, 90)
    if usage is not None:
        assert usage[1] == 0, f"{dt} group {group}: {usage[1]} bytes spilled at {da.num_warps_for(g_pad)} warps"
# block ids carried a step ahead, where the wrapper uses it: head_dim 128 and block_size 16 are
# multiples of 16, which the JIT marks (and which the pipeliner needs)
for dt, group in (("bf16", 6), ("fp16", 16)):
    types = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "bt_ptr": "*i32", "cl_ptr": "*i32",
             "out_ptr": f"*{dt}", "ml_ptr": "*fp32", "acc_ptr": "*fp32", "rs_ptr": "*i32", "pml_ptr": "*fp32",
             "pacc_ptr": "*fp32", "scale": "fp32"}
    assert da.carry_blocks(16, 128, 16, False)
    for has_prefix in (False, True):
        k = compile_for(da._decode_kernel, types, dict(GROUP=group, G_PAD=16, D_PAD=128, FP32=False,
                        HAS_PREFIX=has_prefix, BLOCK_N=32, CARRY_BLOCKS=True), 90, num_warps=4,
                        divisible=("head_dim", "block_size", "partition_size", "max_blocks"))
        usage = ptxas_usage(k, 90)
        if usage is not None:
            assert usage[1] == 0, f"{dt} group {group} carried block ids: {usage[1]} bytes spilled"
# and in the prefix kernel (64 query rows), where prefix_carry_blocks sets it
for dt, group in (("bf16", 6), ("fp16", 4)):
    types = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "bt_ptr": "*i32", "tile_ptr": "*i32",
             "rows_ptr": "*i32", "prefix_ptr": "*i32", "pml_ptr": "*fp32", "pacc_ptr": "*fp32", "scale": "fp32"}
    assert da.prefix_carry_blocks(128, 16, False)
    m_pad = da.prefix_m_pad(group, 128)
    k = compile_for(da._prefix_kernel, types, dict(GROUP=group, M_PAD=m_pad, D_PAD=128, FP32=False, CARRY_BLOCKS=True,
                    BLOCK_N=da.prefix_block_n(128, False)), 90, num_warps=da.num_warps_for(m_pad),
                    divisible=("head_dim", "block_size", "max_blocks"))
    usage = ptxas_usage(k, 90)
    if usage is not None:
        assert usage[1] == 0, f"prefix kernel {dt} group {group} carried block ids: {usage[1]} bytes spilled"
# the shared-prefix kernel at Qwen2.5-1.5B's heads and a head_dim-256 model, in bf16 and fp32
for dt, group, d in (("bf16", 6, 128), ("fp32", 6, 128), ("bf16", 8, 256), ("fp32", 8, 256)):
    types = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "bt_ptr": "*i32", "tile_ptr": "*i32",
             "rows_ptr": "*i32", "prefix_ptr": "*i32", "pml_ptr": "*fp32", "pacc_ptr": "*fp32", "scale": "fp32"}
    m_pad = da.prefix_m_pad(group, d, dt == "fp32")
    k = compile_for(da._prefix_kernel, types, dict(GROUP=group, M_PAD=m_pad, D_PAD=d, FP32=dt == "fp32",
                    BLOCK_N=da.prefix_block_n(d, dt == "fp32")), 90, num_warps=da.num_warps_for(m_pad))
    usage = ptxas_usage(k, 90)
    if usage is not None:
        assert usage[1] == 0, f"prefix kernel {dt} group {group} dim {d}: {usage[1]} bytes spilled"
print("ok")
"""


@pytest.mark.slow
def test_decode_kernel_wide_groups_do_not_spill():
    # 32 / 64 query heads per KV head at head_dim 128: with 4 warps the [G_PAD, 128] tiles spill
    # (160 bytes per thread in bf16 at group 32, 12 KB in fp32 at group 64); the wrapper's warp count
    # must keep them in registers. ptxas -v on the sm_90 build, no GPU needed.
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _SPILL_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_the_reference_is_float64_for_fp16_inputs_past_the_fp16_range():
    # fp16 q·k past 65504 overflowed inside the reference (inf, then NaN) where torch's fp32 answer is finite
    g = torch.Generator().manual_seed(5)
    q = (torch.randn(1, 2, 24, generator=g) * 250).half()
    kc = (torch.randn(2, 4, 2, 24, generator=g) * 250).half()
    vc = torch.randn(2, 4, 2, 24, generator=g).half()
    bt, cl = torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([6], dtype=torch.int32)
    got = ops.paged_decode_attention(q, kc, vc, bt, cl, backend="reference")
    want = ops.paged_decode_attention(q.double(), kc.double(), vc.double(), bt, cl, backend="reference")
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    assert torch.equal(got, want.half())
    slots = torch.tensor([0, 1, 2, 3, 4, 5])
    got = ops.paged_prefill_attention(q.expand(6, 2, 24).contiguous(), kc, vc, slots, [6], [6], backend="reference")
    assert torch.isfinite(got).all()
