"""Triton paged decode attention (layout and semantics: csrc/decode_attention.h).

One program = one (sequence, KV head, context partition). It loads the whole query-head group of
that KV head as one [G_PAD, D_PAD] tile, so each K/V row is read once for all of them (GQA), and
walks the partition BLOCK_N tokens at a time with an online softmax. With more than one partition
(split-K) it writes unnormalised (max, sum, acc) partials that `merge_partitions` combines.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, cl_ptr, out_ptr, ml_ptr, acc_ptr,
                   num_heads, num_kv_heads, head_dim, block_size, max_blocks, num_splits, partition_size, scale,
                   GROUP: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                   FP32: tl.constexpr):
    # int64 so every offset computed from seq (q, block table, workspaces) is 64-bit; cache offsets
    # are made 64-bit from the loaded block id below.
    seq = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(cl_ptr + seq)
    start = split * partition_size
    end = tl.minimum(ctx, start + partition_size)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    hmask = g < GROUP
    dmask = d < head_dim
    heads = kvh * GROUP + g
    q_off = (seq * num_heads + heads)[:, None] * head_dim + d[None, :]
    q = tl.load(q_ptr + q_off, mask=hmask[:, None] & dmask[None, :], other=0.0).to(tl.float32) * scale
    if not FP32:
        q = q.to(k_ptr.dtype.element_ty)

    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tmask = t < end
        blk = tl.load(bt_ptr + seq * max_blocks + t // block_size, mask=tmask, other=0).to(tl.int64)
        row = ((blk * block_size + t % block_size) * num_kv_heads + kvh) * head_dim
        kv_mask = tmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if FP32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        corr = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * corr + tl.sum(p, axis=1)
        if FP32:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * corr[:, None] + pv
        m = m_new

    if num_splits == 1:
        out = acc / l[:, None]
        tl.store(out_ptr + q_off, out.to(out_ptr.dtype.element_ty), mask=hmask[:, None] & dmask[None, :])
    else:
        part = (seq * num_heads + heads) * num_splits + split
        tl.store(ml_ptr + part * 2, m, mask=hmask)
        tl.store(ml_ptr + part * 2 + 1, l, mask=hmask)
        tl.store(acc_ptr + part[:, None] * head_dim + d[None, :], acc, mask=hmask[:, None] & dmask[None, :])


def merge_partitions(out, ml, acc):
    """out[b, h] = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s over the non-empty partitions s."""
    m, l = ml[..., 0], ml[..., 1]
    live = l > 0
    mx = torch.where(live, m, torch.full_like(m, float("-inf"))).amax(dim=-1, keepdim=True)
    w = torch.where(live, torch.exp(m - mx), torch.zeros_like(m))
    num = (acc * w[..., None]).sum(dim=2)
    den = (l * w).sum(dim=-1, keepdim=True)
    out.copy_((num / den).to(out.dtype))


def block_n_for(d_pad: int, fp32: bool) -> int:
    """Tokens per step of the context loop: 32 (16 for head_dim > 128, or fp32, whose tiles are
    twice the bytes: at 32, group 6 x head_dim 128 in fp32 spills ~6 KB per thread on sm_90)."""
    return 16 if d_pad > 128 or fp32 else 32


def num_warps_for(g_pad: int) -> int:
    """4 warps; 8 from 32 query heads per KV head (G_PAD >= 32), where 4 spill on sm_90 (ptxas,
    Triton 3.6 / 3.9: group 32 x head_dim 128 spills 160-900 bytes per thread, group 64 up to 12 KB
    in fp32; 8 warps spill nothing at head_dim 128 in bf16/fp16, nor at group 32 in fp32)."""
    return 8 if g_pad >= 32 else 4


def paged_decode_attention(out, q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, partition_size,
                           ws_ml=None, ws_acc=None):
    """Inputs validated by r1fast.ops.paged_decode_attention; writes `out`."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if num_seqs == 0:
        return
    group = num_heads // num_kv_heads
    g_pad = max(16, triton.next_power_of_2(group))
    d_pad = max(16, triton.next_power_of_2(head_dim))
    block_n = block_n_for(d_pad, q.dtype == torch.float32)
    grid = (num_seqs, num_kv_heads, num_splits)
    _decode_kernel[grid](q, k_cache, v_cache, block_tables, context_lens, out, ws_ml, ws_acc,
                         num_heads, num_kv_heads, head_dim, k_cache.shape[1], block_tables.shape[1], num_splits,
                         partition_size, scale, GROUP=group, G_PAD=g_pad, D_PAD=d_pad, BLOCK_N=block_n,
                         FP32=q.dtype == torch.float32, num_warps=num_warps_for(g_pad))
    if num_splits > 1:
        merge_partitions(out, ws_ml, ws_acc)
