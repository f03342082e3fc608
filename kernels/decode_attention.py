"""Triton paged decode attention (layout and semantics: csrc/decode_attention.h).

One program = one (sequence, KV head, context partition), KV heads adjacent in launch order. It
loads the whole query-head group of that KV head as one [G_PAD, D_PAD] tile, so each K/V row is
read once for all of them (GQA), and walks the partition BLOCK_N tokens at a time with an online
softmax. With more than one partition (split-K) it writes unnormalised (max, sum, acc) partials
that `merge_partitions` combines.

Shared prefixes (cascade): the G samples of a GRPO group share their prompt's KV blocks. Read per
sequence, those blocks cross HBM G times a step. `_prefix_kernel` reads them once per tile of
member sequences: one program = one (tile, KV head), whose queries are every member's query-head
group stacked into one [M_PAD, D_PAD] tile (a real matrix product, not G thin ones). It leaves the
unnormalised (max, sum, acc) of each (member, head) over the prefix; `_decode_kernel` then walks
only the sequence's own tokens [row_start, ctx) and starts its online softmax from that state.
"""
import torch
import triton
import triton.language as tl

from r1fast.ops.shared_prefix import prefix_tile_rows


@triton.jit
def _attend_tokens(q, m, l, acc, k_ptr, v_ptr, table_ptr, start, end, kvh, num_kv_heads, head_dim, block_size,
                   scale, d, dmask, BLOCK_N: tl.constexpr, FP32: tl.constexpr, SCALE_SCORES: tl.constexpr,
                   CARRY_BLOCKS: tl.constexpr = False):
    """Online softmax of the query tile q [M, D_PAD] (from `_scaled_query`) over tokens [start, end)
    of one block table.

    CARRY_BLOCKS: each step's block ids are loaded one step ahead and carried in registers. When the
    K/V addresses hang on a load of the same step, the pipeliner stages that load first and K/V only
    one step ahead (one shared-memory buffer each, the whole memory latency waited for every step, on
    sm_90 at num_stages 3); from a carried value K/V are loads of their own, two buffers deep. It costs
    registers: the wrappers set it where it does not spill (carry_blocks, prefix_carry_blocks)."""
    if CARRY_BLOCKS:
        t = start + tl.arange(0, BLOCK_N)
        blk_next = tl.load(table_ptr + t // block_size, mask=t < end, other=0)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tmask = t < end
        if CARRY_BLOCKS:
            blk = blk_next.to(tl.int64)
            nxt = t + BLOCK_N
            blk_next = tl.load(table_ptr + nxt // block_size, mask=nxt < end, other=0)
        else:
            blk = tl.load(table_ptr + t // block_size, mask=tmask, other=0).to(tl.int64)
        row = ((blk * block_size + t % block_size) * num_kv_heads + kvh) * head_dim
        kv_mask = tmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if FP32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if SCALE_SCORES:
            s = s * scale
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
    return m, l, acc


@triton.jit
def _scaled_query(q, scale, k_ptr, SCALE_SCORES: tl.constexpr):
    """q in the dot's dtype, times the scale when its magnitude is at most 1 (the product cannot
    overflow). A larger one (negative too: -2 doubles |q| as 2 does) would take q·scale past fp16's
    65504 (inf, then NaN scores): q stays unscaled and `_attend_tokens` scales the fp32 scores
    instead, at a multiply per score (at group 64 that spills on sm_90 with Triton 3.6, so the usual
    scale keeps the multiply out of the loop)."""
    if not SCALE_SCORES:
        q = q.to(tl.float32) * scale
    return q.to(k_ptr.dtype.element_ty)


@triton.jit
def _prefix_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, tile_ptr, rows_ptr, prefix_ptr, pml_ptr, pacc_ptr,
                   num_heads, num_kv_heads, head_dim, block_size, max_blocks, scale,
                   GROUP: tl.constexpr, M_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                   FP32: tl.constexpr, SCALE_SCORES: tl.constexpr = False, CARRY_BLOCKS: tl.constexpr = False):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    first = tl.load(tile_ptr + tile)
    count = tl.load(tile_ptr + tile + 1) - first  # 0 for the padding tiles of a CUDA graph
    prefix = tl.load(prefix_ptr + tile)
    leader = tl.load(rows_ptr + first, mask=count > 0, other=0).to(tl.int64)  # all members share these blocks

    i = tl.arange(0, M_PAD)
    d = tl.arange(0, D_PAD)
    dmask = d < head_dim
    heads = kvh * GROUP + i % GROUP
    # M_PAD // GROUP members per pass: a tile larger than the host's tiling still gets every member
    for c0 in range(0, count, M_PAD // GROUP):
        member = c0 + i // GROUP
        live = (member < count) & (i < (M_PAD // GROUP) * GROUP)
        row = tl.load(rows_ptr + first + member, mask=live, other=0).to(tl.int64)
        q_off = (row * num_heads + heads)[:, None] * head_dim + d[None, :]
        q = _scaled_query(tl.load(q_ptr + q_off, mask=live[:, None] & dmask[None, :], other=0.0), scale, k_ptr,
                          SCALE_SCORES)
        m = tl.full([M_PAD], float("-inf"), tl.float32)
        l = tl.zeros([M_PAD], tl.float32)
        acc = tl.zeros([M_PAD, D_PAD], tl.float32)
        m, l, acc = _attend_tokens(q, m, l, acc, k_ptr, v_ptr, bt_ptr + leader * max_blocks, 0, prefix, kvh,
                                   num_kv_heads, head_dim, block_size, scale, d, dmask, BLOCK_N, FP32, SCALE_SCORES,
                                   CARRY_BLOCKS)
        part = row * num_heads + heads
        tl.store(pml_ptr + part * 2, m, mask=live)
        tl.store(pml_ptr + part * 2 + 1, l, mask=live)
        tl.store(pacc_ptr + part[:, None] * head_dim + d[None, :], acc, mask=live[:, None] & dmask[None, :])


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, cl_ptr, out_ptr, ml_ptr, acc_ptr, rs_ptr, pml_ptr, pacc_ptr,
                   num_heads, num_kv_heads, head_dim, block_size, max_blocks, num_splits, partition_size, scale,
                   GROUP: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                   FP32: tl.constexpr, HAS_PREFIX: tl.constexpr, SCALE_SCORES: tl.constexpr = False,
                   CARRY_BLOCKS: tl.constexpr = False):
    # int64 so every offset computed from seq (q, block table, workspaces) is 64-bit; cache offsets
    # are made 64-bit from the loaded block id below.
    # grid (KV head, sequence, split), KV heads fastest: the KV heads of a token, adjacent in the cache,
    # are read by programs launched together (see paged_decode_attention). Read from program ids, not
    # divided out of one flat axis: on Triton 3.6 the quotient and remainder held registers through the
    # token loop, and with 64 query rows per KV head (head_dim not marked divisible by 16) it spilled.
    kvh = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    ctx = tl.load(cl_ptr + seq)
    row_start = 0
    if HAS_PREFIX:
        row_start = tl.load(rs_ptr + seq)  # tokens before it are covered by the prefix kernel's state
    start = row_start + split * partition_size
    end = tl.minimum(ctx, start + partition_size)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    hmask = g < GROUP
    dmask = d < head_dim
    heads = kvh * GROUP + g
    q_off = (seq * num_heads + heads)[:, None] * head_dim + d[None, :]
    q = _scaled_query(tl.load(q_ptr + q_off, mask=hmask[:, None] & dmask[None, :], other=0.0), scale, k_ptr,
                      SCALE_SCORES)

    if HAS_PREFIX:
        # split 0 of a row with a shared prefix starts from the prefix's state; the rest from empty
        # (a bound, not `hmask & scalar_bool`: the interpreter cannot mask with the latter)
        folded = g < GROUP * (split == 0).to(tl.int32) * (row_start > 0).to(tl.int32)
        pre = seq * num_heads + heads
        m = tl.load(pml_ptr + pre * 2, mask=folded, other=float("-inf"))
        l = tl.load(pml_ptr + pre * 2 + 1, mask=folded, other=0.0)
        acc = tl.load(pacc_ptr + pre[:, None] * head_dim + d[None, :], mask=folded[:, None] & dmask[None, :],
                      other=0.0)
    else:
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        l = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    m, l, acc = _attend_tokens(q, m, l, acc, k_ptr, v_ptr, bt_ptr + seq * max_blocks, start, end, kvh,
                               num_kv_heads, head_dim, block_size, scale, d, dmask, BLOCK_N, FP32, SCALE_SCORES,
                               CARRY_BLOCKS)

    if num_splits == 1:
        out = acc / l[:, None]
        tl.store(out_ptr + q_off, out.to(out_ptr.dtype.element_ty), mask=hmask[:, None] & dmask[None, :])
    else:
        part = (seq * num_heads + heads) * num_splits + split
        tl.store(ml_ptr + part * 2, m, mask=hmask)
        tl.store(ml_ptr + part * 2 + 1, l, mask=hmask)
        tl.store(acc_ptr + part[:, None] * head_dim + d[None, :], acc, mask=hmask[:, None] & dmask[None, :])


@triton.jit
def _merge_kernel(out_ptr, ml_ptr, acc_ptr, num_splits, head_dim, D_PAD: tl.constexpr, S_BLOCK: tl.constexpr):
    """One program = one (sequence, head): out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s over
    the non-empty partitions s (l_s > 0), M their largest max; S_BLOCK partitions at a time."""
    row = tl.program_id(0).to(tl.int64)  # seq * num_heads + head
    s = tl.arange(0, S_BLOCK)
    d = tl.arange(0, D_PAD)
    dmask = d < head_dim
    base = row * num_splits
    top = tl.full([S_BLOCK], float("-inf"), tl.float32)
    for s0 in range(0, num_splits, S_BLOCK):
        live = (s0 + s) < num_splits
        m = tl.load(ml_ptr + (base + s0 + s) * 2, mask=live, other=float("-inf"))
        l = tl.load(ml_ptr + (base + s0 + s) * 2 + 1, mask=live, other=0.0)
        top = tl.maximum(top, tl.where(l > 0, m, float("-inf")))
    mx = tl.max(top, axis=0)
    num = tl.zeros([D_PAD], tl.float32)
    den = tl.zeros([S_BLOCK], tl.float32)
    for s0 in range(0, num_splits, S_BLOCK):
        live = (s0 + s) < num_splits
        m = tl.load(ml_ptr + (base + s0 + s) * 2, mask=live, other=float("-inf"))
        l = tl.load(ml_ptr + (base + s0 + s) * 2 + 1, mask=live, other=0.0)
        w = tl.exp(tl.where(l > 0, m, float("-inf")) - mx)  # 0 for an empty partition, whatever its max
        a = tl.load(acc_ptr + (base + s0 + s)[:, None] * head_dim + d[None, :], mask=live[:, None] & dmask[None, :],
                    other=0.0)
        num += tl.sum(a * w[:, None], axis=0)
        den += l * w
    out = num / tl.sum(den, axis=0)
    tl.store(out_ptr + row * head_dim + d, out.to(out_ptr.dtype.element_ty), mask=dmask)


def merge_config(num_splits: int, head_dim: int) -> dict:
    """The merge kernel's constexprs and warps: up to 64 partitions per step (all of them, in one pass
    over acc, up to 64: at 8 sequences x 12 heads and 98 splits its 96 programs each take 2 steps, not
    4), and one warp per 1024 floats of the [S_BLOCK, D_PAD] tile, 2 to 8 (no spills on sm_90)."""
    d_pad = max(16, triton.next_power_of_2(head_dim))
    s_block = min(64, triton.next_power_of_2(num_splits))
    return dict(D_PAD=d_pad, S_BLOCK=s_block, num_warps=max(2, min(8, s_block * d_pad // 1024)))


def merge_partitions(out, ml, acc):
    """out[b, h] = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s over the non-empty partitions s:
    ml [B, H, S, 2], acc [B, H, S, D] float32, out [B, H, D] contiguous. One launch, where the torch
    form it replaces was about fourteen (each a few microseconds of host time and a pass over acc)."""
    b, h, num_splits, head_dim = acc.shape
    _merge_kernel[(b * h,)](out, ml, acc, num_splits, head_dim, **merge_config(num_splits, head_dim))


def scales_scores(scale: float) -> bool:
    """Whether the kernels multiply the fp32 scores by the scale rather than q (_scaled_query): for
    |scale| > 1, whose product with a large fp16 q overflows, of either sign."""
    return abs(scale) > 1.0


def block_n_for(d_pad: int, fp32: bool) -> int:
    """Tokens per step of the context loop: 32 (16 for head_dim > 128, or fp32, whose tiles are
    twice the bytes: at 32, group 6 x head_dim 128 in fp32 spills ~6 KB per thread on sm_90)."""
    return 16 if d_pad > 128 or fp32 else 32


def carry_blocks(g_pad: int, head_dim: int, block_size: int, fp32: bool) -> bool:
    """Whether the decode kernel carries block ids a step ahead (_attend_tokens): in bf16/fp16 with up
    to 16 query rows, and head_dim and block_size multiples of 16 (the JIT then marks them divisible,
    which the pipeliner needs at all). There, on sm_90 (ptxas, Triton 3.9), K/V become two buffers deep
    at 80 registers a thread (92 without; bf16, head_dim 128, 37.9 KB of shared memory: 6 programs per
    SM) and nothing spills; at 32 or 64 rows, in fp32, or without the divisibility, it spills."""
    return not fp32 and g_pad <= 16 and head_dim % 16 == 0 and block_size % 16 == 0


def prefix_carry_blocks(head_dim: int, block_size: int, fp32: bool) -> bool:
    """carry_blocks for the prefix kernel (up to 64 query rows, 8 warps, one program per SM at most):
    in bf16/fp16 up to head_dim 128, both multiples of 16, K/V become three buffers deep with two steps
    in flight at 196 registers (ptxas, sm_90, group 6; without it two buffers, every copy waited for
    at the top of each step); at head_dim 256 it spills 8 bytes."""
    return not fp32 and head_dim <= 128 and head_dim % 16 == 0 and block_size % 16 == 0


def num_warps_for(g_pad: int) -> int:
    """4 warps; 8 from 32 query heads per KV head (G_PAD >= 32), where 4 spill on sm_90 (ptxas,
    Triton 3.6 / 3.9: group 32 x head_dim 128 spills 160-900 bytes per thread, group 64 up to 12 KB
    in fp32; 8 warps spill nothing at head_dim 128 in bf16/fp16, nor at group 32 in fp32)."""
    return 8 if g_pad >= 32 else 4


def prefix_m_pad(group: int, head_dim: int, fp32: bool = False) -> int:
    """Query rows of the prefix kernel's tile: prefix_tile_rows() members x group, padded; in fp32 half
    as many (32, 16 past head_dim 128), whose larger tiles spill on sm_90 (the kernel then takes a
    tile's members in passes)."""
    members = prefix_tile_rows(group, head_dim)
    if fp32:
        members = max(1, min(members, (32 if head_dim <= 128 else 16) // group))
    return max(16, triton.next_power_of_2(members * group))


def prefix_block_n(d_pad: int, fp32: bool) -> int:
    """Tokens per step of the prefix kernel: its query tile is up to 4x the decode kernel's."""
    return 16 if fp32 else block_n_for(d_pad, fp32)


def prefix_attention(q, k_cache, v_cache, block_tables, scale, shared):
    """The prefix kernel over an ops.shared_prefix.SharedPrefix -> float32 (max, sum) [B, H, 2], acc [B, H, D],
    set for the rows of its tiles (the others are left unwritten: their row_start is 0)."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    d_pad = max(16, triton.next_power_of_2(head_dim))
    fp32 = q.dtype == torch.float32
    m_pad = prefix_m_pad(group, head_dim, fp32)
    pml = torch.empty(num_seqs, num_heads, 2, device=q.device, dtype=torch.float32)
    pacc = torch.empty(num_seqs, num_heads, head_dim, device=q.device, dtype=torch.float32)
    if shared.tile_prefix.shape[0] == 0:  # e.g. a one-row graph step's buffers: no tile, no launch
        return pml, pacc
    _prefix_kernel[(shared.tile_prefix.shape[0], num_kv_heads)](
        q, k_cache, v_cache, block_tables, shared.tile_ptr, shared.tile_rows, shared.tile_prefix, pml, pacc,
        num_heads, num_kv_heads, head_dim, k_cache.shape[1], block_tables.shape[1], scale,
        GROUP=group, M_PAD=m_pad, D_PAD=d_pad, BLOCK_N=prefix_block_n(d_pad, fp32), FP32=fp32,
        SCALE_SCORES=scales_scores(scale), CARRY_BLOCKS=prefix_carry_blocks(head_dim, k_cache.shape[1], fp32),
        num_warps=num_warps_for(m_pad))
    return pml, pacc


def paged_decode_attention(out, q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, partition_size,
                           ws_ml=None, ws_acc=None, shared=None):
    """Inputs validated by r1fast.ops.paged_decode_attention; writes `out`. `shared`: an
    ops.shared_prefix.SharedPrefix, whose prefix partials are computed first and folded in."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if num_seqs == 0:
        return
    group = num_heads // num_kv_heads
    g_pad = max(16, triton.next_power_of_2(group))
    d_pad = max(16, triton.next_power_of_2(head_dim))
    fp32 = q.dtype == torch.float32
    block_n = block_n_for(d_pad, fp32)
    row_start = pml = pacc = ws_ml  # unused pointers when there is no shared prefix
    if shared is not None:
        row_start = shared.row_start
        pml, pacc = prefix_attention(q, k_cache, v_cache, block_tables, scale, shared)
    # KV heads fastest: a token's K/V rows are [num_kv_heads, head_dim] in a row, so programs started
    # together read the whole row (at 2 KV heads, the 512 bytes of a bf16 token row, not 256 of them
    # with the other half read a launch round later). Sequences on grid axis y: at most 65535, CUDA's
    # limit (r1fast.ops.paged_decode_attention refuses more for this backend).
    grid = (num_kv_heads, num_seqs, num_splits)
    _decode_kernel[grid](q, k_cache, v_cache, block_tables, context_lens, out, ws_ml, ws_acc, row_start, pml, pacc,
                         num_heads, num_kv_heads, head_dim, k_cache.shape[1], block_tables.shape[1], num_splits,
                         partition_size, scale, GROUP=group, G_PAD=g_pad, D_PAD=d_pad, BLOCK_N=block_n,
                         FP32=fp32, HAS_PREFIX=shared is not None, SCALE_SCORES=scales_scores(scale),
                         CARRY_BLOCKS=carry_blocks(g_pad, head_dim, k_cache.shape[1], fp32),
                         num_warps=num_warps_for(g_pad))
    if num_splits > 1:
        merge_partitions(out, ws_ml, ws_acc)
