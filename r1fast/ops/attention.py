"""Attention ops of the rollout engine, over the paged KV cache of ops.store_kv.

paged_decode_attention: one query token per sequence against its cached context (the decode step).
    backends: reference (per-sequence loop, float64-capable), torch (one batched gather), triton, cuda.
    An optional SharedPrefix (r1fast.ops.shared_prefix) says which sequences share their leading blocks
    (the G samples of a group share their prompt's): triton and cuda then read those blocks once per
    tile of sequences instead of once per sequence. The numbers are the same as without it.
paged_prefill_attention: causal attention of each sequence's new tokens over its cached prefix and
    themselves (chunked prefill and prefix-cache hits). On CUDA: flash-attn varlen when importable,
    else torch's varlen kernel once a probe shows it aligns the causal mask as required, else torch
    SDPA per sequence.

torch_varlen_attn / varlen_ready: torch's own varlen flash attention (torch >= 2.10) behind one
signature, and a once-per-shape probe that it runs (and gives the right numbers) on this device;
the packed training attention of r1fast.models uses them too.

Cache layout: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim]; block_tables int32
[num_seqs, max_blocks_per_seq]; context_lens int32 [num_seqs], each in [1, max_blocks_per_seq * block_size],
counting the current token, whose KV is already stored.
"""
from __future__ import annotations

import functools
import inspect
import itertools
import logging
import math
import numbers
import operator

import numpy as np
import torch

from r1fast import _ext, backends
from r1fast.ops.checks import cuda_tensors, flags, one_device, readable, require_tensors, resolve_neg
from r1fast.ops.shared_prefix import SharedPrefix, prefix_tile_rows
from r1fast.reference import attention as reference

PARTITION_SIZE = 512  # tokens per split-K partition of the decode kernels
# CUDA's limit on grid dims y and z: splits and KV heads launch there (cuda kernel), sequences and splits (triton)
MAX_GRID_YZ = 65535
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _validate_shared(shared, q, block_tables, context_lens, k_cache, check_bounds):
    if not isinstance(shared, SharedPrefix):
        raise TypeError(f"paged_decode_attention: shared_prefix must be an ops.shared_prefix.SharedPrefix, got "
                        f"{type(shared).__name__}")
    n = q.shape[0]
    for name, t in shared._asdict().items():
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 1 or t.device != q.device or \
                not t.is_contiguous():
            raise ValueError(f"paged_decode_attention: shared_prefix.{name} must be a contiguous 1-D int32 tensor on "
                             f"{q.device}")
    if shared.tile_ptr.shape[0] != shared.tile_prefix.shape[0] + 1 or shared.row_start.shape[0] != n:
        raise ValueError(f"paged_decode_attention: shared_prefix needs tile_ptr [num_tiles + 1], tile_prefix "
                         f"[num_tiles] and row_start [num_seqs={n}], got {tuple(shared.tile_ptr.shape)}, "
                         f"{tuple(shared.tile_prefix.shape)}, {tuple(shared.row_start.shape)}")
    if prefix_tile_rows(q.shape[1] // k_cache.shape[2], q.shape[2]) < 1:
        raise ValueError(f"paged_decode_attention: shared prefixes take at most "
                         f"{(64 if q.shape[2] <= 128 else 32)} query heads per KV head at head_dim {q.shape[2]}")
    if not check_bounds:
        return
    ptr, rows, prefix, row_start = (t.cpu().numpy().astype(np.int64) for t in shared)
    tables, ctx = block_tables.cpu().numpy(), context_lens.cpu().numpy().astype(np.int64)
    if ptr[0] != 0 or (np.diff(ptr) < 0).any() or ptr[-1] > len(rows):
        raise ValueError(f"paged_decode_attention: shared_prefix.tile_ptr must rise from 0 to at most "
                         f"len(tile_rows)={len(rows)}, got {ptr.tolist()}")
    members = rows[: ptr[-1]]
    if len(members) and (members.min() < 0 or members.max() >= n or len(np.unique(members)) != len(members)):
        raise ValueError(f"paged_decode_attention: shared_prefix.tile_rows must be distinct rows in [0, {n})")
    want_start = np.zeros(n, dtype=np.int64)
    bs = k_cache.shape[1]
    for t in range(len(prefix)):
        tile = rows[ptr[t]: ptr[t + 1]]
        if not len(tile):
            continue
        p = prefix[t]
        if p < 0 or p >= ctx[tile].min():
            raise ValueError(f"paged_decode_attention: shared_prefix tile {t}: prefix {p} must lie in "
                             f"[0, shortest member context {ctx[tile].min()})")
        nb = -(-p // bs)
        if (tables[tile, :nb] != tables[tile[0], :nb]).any():
            raise ValueError(f"paged_decode_attention: shared_prefix tile {t}: its rows do not share the blocks "
                             f"of their first {p} tokens")
        want_start[tile] = p
    if (row_start != want_start).any():
        raise ValueError("paged_decode_attention: shared_prefix.row_start must be each row's tile prefix (0 outside "
                         "tiles)")


def _check_caches(op, q, k_cache, v_cache):
    """The caches' shape against q [rows, num_heads, head_dim], and the dtype all three share."""
    if k_cache.dim() != 4 or k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"{op}: k_cache must be [num_blocks, block_size, num_kv_heads, {q.shape[2]}], got "
                         f"{tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{op}: v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    if k_cache.shape[1] < 1 or k_cache.shape[2] < 1:
        raise ValueError(f"{op}: block_size and num_kv_heads must be >= 1, got k_cache shape {tuple(k_cache.shape)}")
    if q.shape[2] < 1:  # the default scale is 1 / sqrt(head_dim)
        raise ValueError(f"{op}: head_dim must be >= 1, got q shape {tuple(q.shape)}")
    if q.shape[1] % k_cache.shape[2] != 0:
        raise ValueError(f"{op}: num_heads {q.shape[1]} is not a multiple of num_kv_heads {k_cache.shape[2]}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype) or q.dtype not in (*_DTYPE_CODE, torch.float64):
        raise ValueError(f"{op}: q, k_cache, v_cache must share a float dtype, got {q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}")


def _check_contiguous(op, tensors):
    for name, t in tensors.items():
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous")


def _scale(op, scale, head_dim):
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    # float() would take a string, or read a GPU tensor back (a host sync)
    if not isinstance(scale, numbers.Real):
        raise TypeError(f"{op}: scale must be a real number or None, got {type(scale).__name__}")
    if not math.isfinite(scale):  # every score, and so every output, would be NaN
        raise ValueError(f"{op}: scale must be finite, got {scale!r}")
    return float(scale)


def _validate_decode(q, k_cache, v_cache, block_tables, context_lens, check_bounds):
    op = "paged_decode_attention"
    tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_tables": block_tables,
               "context_lens": context_lens}
    require_tensors(op, **tensors)
    if q.dim() != 3:
        raise ValueError(f"{op}: q must be [num_seqs, num_heads, head_dim], got {tuple(q.shape)}")
    _check_caches(op, q, k_cache, v_cache)
    if block_tables.dim() != 2 or block_tables.shape[0] != q.shape[0] or block_tables.shape[1] == 0:
        raise ValueError(f"{op}: block_tables must be [num_seqs={q.shape[0]}, max_blocks >= 1], "
                         f"got {tuple(block_tables.shape)}")
    if context_lens.shape != (q.shape[0],):
        raise ValueError(f"{op}: context_lens must be [num_seqs={q.shape[0]}], got {tuple(context_lens.shape)}")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError(f"{op}: block_tables and context_lens must be int32, got "
                         f"{block_tables.dtype}, {context_lens.dtype}")
    one_device(op, tensors.values())
    _check_contiguous(op, tensors)
    if check_bounds and q.shape[0]:
        readable(op, q, "the bounds check of context_lens and block_tables (check_bounds=False skips it)")
        max_ctx = block_tables.shape[1] * k_cache.shape[1]
        lo, hi = int(context_lens.min()), int(context_lens.max())
        if lo < 1 or hi > max_ctx:
            raise ValueError(f"{op}: context_lens must lie in [1, {max_ctx}] "
                             f"(max_blocks * block_size), got min {lo}, max {hi}")
        # only the entries a sequence actually reads must be valid block ids
        ids = block_tables[_used_blocks(block_tables, context_lens, k_cache.shape[1])]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= k_cache.shape[0]):
            raise ValueError(f"{op}: block_tables entries in use must lie in "
                             f"[0, {k_cache.shape[0]}), got min {int(ids.min())}, max {int(ids.max())}")


def _used_blocks(block_tables, context_lens, block_size):
    """Bool [num_seqs, max_blocks]: the table entries each sequence's context reads."""
    nb = (context_lens.long() + block_size - 1) // block_size
    return torch.arange(block_tables.shape[1], device=block_tables.device)[None, :] < nb[:, None]


def _host_lens(op, name, lens):
    """A host sequence of ints as a list; int() would silently truncate 2.7 and accept '3'."""
    if isinstance(lens, (str, bytes, torch.Tensor)) or not hasattr(lens, "__iter__"):
        raise TypeError(f"{op}: {name} must be a host list of ints, got {type(lens).__name__}")
    out = []
    for x in lens:
        try:
            out.append(operator.index(x))
        except TypeError:
            raise TypeError(f"{op}: {name} must hold ints, got {x!r} ({type(x).__name__})") from None
    return out


def _validate_prefill(q, k_cache, v_cache, context_slots, query_lens, context_lens, cu_seqlens, check_bounds):
    """Checks paged_prefill_attention's inputs -> query_lens, context_lens as lists of ints."""
    op = "paged_prefill_attention"
    tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "context_slots": context_slots}
    require_tensors(op, **tensors)
    if q.dim() != 3:
        raise ValueError(f"{op}: q must be [tokens, num_heads, head_dim], got {tuple(q.shape)}")
    _check_caches(op, q, k_cache, v_cache)
    query_lens, context_lens = _host_lens(op, "query_lens", query_lens), _host_lens(op, "context_lens", context_lens)
    if len(query_lens) != len(context_lens) or any(n < 1 or n > c for n, c in zip(query_lens, context_lens)):
        raise ValueError(f"{op}: need 1 <= query_len <= context_len per sequence, got {query_lens} and {context_lens}")
    if sum(query_lens) != q.shape[0]:
        raise ValueError(f"{op}: q has {q.shape[0]} tokens, query_lens sum to {sum(query_lens)}")
    if context_slots.dtype != torch.int64 or context_slots.shape != (sum(context_lens),):
        raise ValueError(f"{op}: context_slots must be int64 [{sum(context_lens)}], got "
                         f"{context_slots.dtype} {tuple(context_slots.shape)}")
    # q may be a strided view (a column slice of the fused qkv projection); the caches are read flat
    one_device(op, tensors.values())
    _check_contiguous(op, {"k_cache": k_cache, "v_cache": v_cache})
    if cu_seqlens is not None:
        n = len(query_lens) + 1
        if len(cu_seqlens) != 2 or any(not isinstance(c, torch.Tensor) or c.dtype != torch.int32 or c.shape != (n,)
                                       or c.device != q.device or not c.is_contiguous() for c in cu_seqlens):
            raise ValueError(f"{op}: cu_seqlens must be two int32 [{n}] tensors on {q.device}, each contiguous")
        if check_bounds:
            # the varlen kernels take them as the sequences' bounds in q and in the gathered keys: other values
            # read past either (or another sequence's tokens)
            readable(op, q, "the check of cu_seqlens against query_lens and context_lens (check_bounds=False skips it)")
            for name, c, lens in (("cu_q", cu_seqlens[0], query_lens), ("cu_k", cu_seqlens[1], context_lens)):
                want = list(itertools.accumulate(lens, initial=0))
                if c.tolist() != want:
                    raise ValueError(f"{op}: cu_seqlens {name} must be the prefix sums {want} of "
                                     f"{'query_lens' if name == 'cu_q' else 'context_lens'}, got {c.tolist()}")
    if check_bounds and context_slots.numel():
        readable(op, q, "the bounds check of context_slots (check_bounds=False skips it)")
        # the reference would read slot -1 as the last one, the kernels outside the cache
        num_slots = k_cache.shape[0] * k_cache.shape[1]
        lo, hi = int(context_slots.min()), int(context_slots.max())
        if lo < 0 or hi >= num_slots:
            raise ValueError(f"{op}: context_slots must lie in [0, {num_slots}) (num_blocks * block_size), "
                             f"got min {lo}, max {hi}")
    return query_lens, context_lens


def default_num_splits(num_seqs: int, num_kv_heads: int, max_context: int, partition_size: int = PARTITION_SIZE):
    """The cuda backend's split count: the context is split only when (sequence, KV head) pairs alone
    would leave SMs idle."""
    parts = max(1, math.ceil(max_context / partition_size))
    if parts == 1 or num_seqs * num_kv_heads >= 256:
        return 1
    return min(parts, 64)


# The Triton kernel's split count (triton_num_splits). One program = one (sequence, KV head, split);
# at head_dim 128 in bf16/fp16 (group <= 16, 32 tokens a step, 4 warps) it takes 80 registers a
# thread and 37.9 KB of shared memory on sm_90 (ptxas, Triton 3.9), so an SM holds 6 at once.
RESIDENT_PROGRAMS_PER_SM = 6
SPLIT_ROUNDS = 2          # split until the programs fill every resident slot at least this many times
# 8 steps of the kernel's loop. A partition's float32 partials (written, then read by the merge) are
# 2 x group x (head_dim + 2) x 4 bytes against its 256 x 2 x head_dim x 2 bytes of bf16/fp16 K/V: about
# 0.8% more bytes per query head of the group (4.8% at group 6, 12.7% at group 16; half that for fp32 K/V)
MIN_PARTITION_TOKENS = 256
DEFAULT_NUM_SMS = 132     # an H100 / H200, for devices that do not say (the CPU's interpreter)


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (looked up once per device), else DEFAULT_NUM_SMS."""
    if device.type != "cuda":
        return DEFAULT_NUM_SMS
    return _cuda_sm_count(backends.canonical_device(device).index)


def triton_num_splits(num_seqs: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """Context partitions (split-K) for the Triton decode kernel, from the sizes alone (no device sync).

    With at least one program per resident slot (num_sms x RESIDENT_PROGRAMS_PER_SM) from the (sequence,
    KV head) pairs alone, 1: every SM is busy, and splitting would only add the merge's bytes. Fewer
    pairs (few sequences at long contexts: 8 sequences x 2 KV heads on 132 SMs would use 16 SMs)
    are split until there are SPLIT_ROUNDS programs per slot, keeping partitions of at least
    MIN_PARTITION_TOKENS tokens (so a short context is not split into programs that only start and stop)."""
    pairs = max(1, num_seqs * num_kv_heads)
    slots = max(1, num_sms) * RESIDENT_PROGRAMS_PER_SM
    if pairs >= slots:
        return 1
    most = max(1, max_context // MIN_PARTITION_TOKENS)
    return max(1, min(most, -(-SPLIT_ROUNDS * slots // pairs)))


@backends.register("paged_decode_attention", "reference")
def _decode_reference(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, partition, shared=None):
    readable("paged_decode_attention", q, "the reference backend (a loop over the context lengths)")
    return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)


@backends.register("paged_decode_attention", "torch")
def _decode_torch(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, partition, shared=None):
    # A decode step calls this once per layer on a handful of rows, so its cost is the number of ops:
    # index_select and matmul, not advanced indexing and einsum (each several times dearer on small
    # tensors, the same values to the bit)
    b, h, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    width = block_tables.shape[1]
    length = width * bs  # explicit: a -1 cannot be inferred when there are no sequences
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    ctx = context_lens.long()[:, None]
    # entries past a sequence's context may hold anything (the validator does not check them): read block 0
    tables = block_tables.long().masked_fill(torch.arange(width, device=q.device)[None, :] * bs >= ctx, 0)
    k = k_cache.index_select(0, tables.view(-1)).view(b, length, hkv, d).to(compute)  # [B, L, Hkv, D]
    v = v_cache.index_select(0, tables.view(-1)).view(b, length, hkv * d).to(compute)
    past = torch.arange(length, device=q.device)[None, :] >= ctx  # [B, L]
    # stale rows past the context (an earlier sequence's, or inf/NaN) weigh 0, but 0 * inf is NaN in the
    # product: zero them (in place: v is the gather's own copy). The scores' -inf below covers K.
    v.masked_fill_(past[:, :, None], 0)
    qg = q.to(compute).view(b, hkv, h // hkv, d)
    scores = torch.matmul(qg, k.permute(0, 2, 3, 1)) * scale  # [B, Hkv, G, L]
    scores.masked_fill_(past[:, None, None, :], float("-inf"))
    out = torch.matmul(scores.softmax(dim=-1), v.view(b, length, hkv, d).permute(0, 2, 1, 3))  # [B, Hkv, G, D]
    return out.reshape(b, h, d).to(q.dtype)


def _workspaces(q, num_splits):
    b, h, d = q.shape
    if num_splits == 1:
        dummy = torch.empty(2, device=q.device, dtype=torch.float32)
        return dummy, dummy
    return (torch.empty(b, h, num_splits, 2, device=q.device, dtype=torch.float32),
            torch.empty(b, h, num_splits, d, device=q.device, dtype=torch.float32))


@backends.register("paged_decode_attention", "triton")
def _decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, partition, shared=None):
    from r1fast.kernels import decode_attention as kernel

    out = torch.empty_like(q)
    ws_ml, ws_acc = _workspaces(q, num_splits)
    # Triton launches on the *current* device: make it q's (a cache on cuda:1 under cuda:0 would fault).
    with backends.on_device(q.device):
        kernel.paged_decode_attention(out, q, k_cache, v_cache, block_tables, context_lens, scale, num_splits,
                                      partition, ws_ml, ws_acc, shared)
    return out


def cuda_decode_problem(dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> str | None:
    """Why the CUDA decode kernel cannot take inputs of these shapes (None when it can). Triton's pads
    any head_dim and group."""
    if dtype not in _DTYPE_CODE:
        return f"the cuda backend takes float32/float16/bfloat16, not {dtype}"
    if head_dim % 8 != 0 or head_dim > 256:
        return f"the cuda backend needs head_dim a multiple of 8 up to 256, got {head_dim}"
    if num_heads // num_kv_heads > 64:
        return "the cuda backend takes at most 64 query heads per KV head"
    return None


def _cuda_shape_problem(q, k_cache) -> str | None:
    return cuda_decode_problem(q.dtype, q.shape[1], k_cache.shape[2], q.shape[2])


def _check_cuda_shapes(q, k_cache):
    problem = _cuda_shape_problem(q, k_cache)
    if problem:
        raise ValueError(f"paged_decode_attention: {problem}")


@torch.library.custom_op("r1fast::paged_decode_attention_cuda", mutates_args=())
def _decode_cuda_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, scale: float, num_splits: int, partition: int,
                    row_start: torch.Tensor | None = None, prefix_ml: torch.Tensor | None = None,
                    prefix_acc: torch.Tensor | None = None) -> torch.Tensor:
    # reachable as torch.ops.r1fast.paged_decode_attention_cuda: the pointers' tensors are checked here
    # too (not their values: block ids and context lengths are the caller's, as with check_bounds=False)
    _validate_decode(q, k_cache, v_cache, block_tables, context_lens, check_bounds=False)
    _check_cuda_shapes(q, k_cache)
    if (row_start is None) != (prefix_ml is None) or (prefix_ml is None) != (prefix_acc is None):
        raise ValueError("paged_decode_attention: row_start, prefix_ml and prefix_acc come together")
    if row_start is not None:  # their pointers reach the kernel too (the layouts of csrc/decode_attention.h)
        b, h, d = q.shape
        for name, t, dtype, shape in (("row_start", row_start, torch.int32, (b,)),
                                      ("prefix_ml", prefix_ml, torch.float32, (b, h, 2)),
                                      ("prefix_acc", prefix_acc, torch.float32, (b, h, d))):
            if t.dtype != dtype or tuple(t.shape) != shape or t.device != q.device or not t.is_contiguous():
                raise ValueError(f"paged_decode_attention: {name} must be a contiguous {dtype} {list(shape)} tensor "
                                 f"on {q.device}, got {t.dtype} {list(t.shape)} on {t.device}")
    if any(t.is_neg() for t in (q, k_cache, v_cache)):  # the kernel reads the memory, which holds them unnegated
        raise ValueError("paged_decode_attention: q/k_cache/v_cache is a lazily negated view; pass .resolve_neg() of it")
    cuda_tensors("paged_decode_attention", q.device)
    ext = _ext.require()
    # Checked here, on real tensors: data_ptr() does not exist on the fake tensors of torch.compile.
    # The kernel's vector loads need 16-byte aligned bases.
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.data_ptr() % 16:
            raise ValueError(f"paged_decode_attention: {name} must be 16-byte aligned for the cuda backend")
    out = torch.empty_like(q)
    ws_ml, ws_acc = _workspaces(q, num_splits)
    b, h, d = q.shape
    prefix = [0, 0, 0] if row_start is None else [row_start.data_ptr(), prefix_ml.data_ptr(), prefix_acc.data_ptr()]
    # The extension launches on the current device with the stream given: both must be q's.
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        ext.decode_attention_cuda(out.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                  block_tables.data_ptr(), context_lens.data_ptr(), ws_acc.data_ptr(),
                                  ws_ml.data_ptr(), *prefix, b, h, k_cache.shape[2], d, k_cache.shape[0], k_cache.shape[1],
                                  block_tables.shape[1], num_splits, partition, float(scale), _DTYPE_CODE[q.dtype],
                                  stream)
    return out


@_decode_cuda_op.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, partition, row_start=None,
      prefix_ml=None, prefix_acc=None):
    return torch.empty_like(q)


@backends.register("paged_decode_attention", "cuda")
def _decode_cuda(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, partition, shared=None):
    if shared is None or not backends.backend_available("triton", q.device)[0]:
        return _decode_cuda_op(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, partition)
    from r1fast.kernels import decode_attention as kernel

    with backends.on_device(q.device):  # the prefix kernel is Triton's; the rest of the walk is CUDA's
        pml, pacc = kernel.prefix_attention(q, k_cache, v_cache, block_tables, scale, shared)
    return _decode_cuda_op(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, partition,
                           shared.row_start, pml, pacc)


def _decode_shape_problem(backend: str, q, k_cache) -> str | None:
    """Why `backend` cannot take these shapes, or None. The triton kernel launches sequences on grid
    axis y (KV heads fastest on x, so a token's K/V row is read by programs started together)."""
    if backend == "cuda":
        return _cuda_shape_problem(q, k_cache)
    if backend == "triton" and q.shape[0] > MAX_GRID_YZ:
        return (f"{q.shape[0]} sequences exceed the triton kernel's launch grid limit {MAX_GRID_YZ}; "
                "decode them in batches of at most that many")
    return None


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, *, scale: float | None = None,
                           num_splits: int | None = None, backend: str | None = None, check_bounds: bool = True,
                           shared_prefix: SharedPrefix | None = None):
    """Attention of q [num_seqs, num_heads, head_dim] over each sequence's paged context -> [num_seqs, num_heads, head_dim].

    num_splits: equal context partitions (split-K) for the triton/cuda kernels; None picks one from
    the shapes alone, no device sync (triton: triton_num_splits, from the device's SM count; cuda:
    default_num_splits, about PARTITION_SIZE tokens each). `check_bounds=False` skips the checks of
    context_lens, block ids and the shared prefix's contents (host syncs); the engine uses it on tables it
    built itself. Unsafe otherwise: the GPU kernels do not check them again (a bad block id reads outside
    the cache, a context length < 1 leaves its row unwritten). shared_prefix: a SharedPrefix on q's device (find_shared_prefixes(...).to(device)).
    """
    check_bounds, = flags("paged_decode_attention", check_bounds=check_bounds)
    _validate_decode(q, k_cache, v_cache, block_tables, context_lens, check_bounds)
    if shared_prefix is not None:
        _validate_shared(shared_prefix, q, block_tables, context_lens, k_cache, check_bounds)
    scale = _scale("paged_decode_attention", scale, q.shape[-1])
    bs = k_cache.shape[1]
    max_ctx = block_tables.shape[1] * bs
    name, fn = backends.resolve("paged_decode_attention", q.device, backend, dtype=q.dtype,
                                accepts=lambda name: _decode_shape_problem(name, q, k_cache) is None)
    # asked for by name, so past `accepts`; only triton is checked here (the cuda op raises its own)
    if name == "triton" and (problem := _decode_shape_problem(name, q, k_cache)) is not None:
        raise ValueError(f"paged_decode_attention: {problem}")
    if num_splits is None and name == "triton":
        num_splits = triton_num_splits(q.shape[0], k_cache.shape[2], max_ctx, sm_count(q.device))
    elif num_splits is None:
        num_splits = default_num_splits(q.shape[0], k_cache.shape[2], max_ctx, PARTITION_SIZE)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"paged_decode_attention: num_splits must be a positive int, got {num_splits!r}")
    # equal partitions of whole blocks covering the longest possible context
    partition = -(-max_ctx // num_splits)
    partition = -(-partition // bs) * bs
    num_splits = -(-max_ctx // partition)
    if num_splits > MAX_GRID_YZ:
        raise ValueError(f"paged_decode_attention: num_splits {num_splits} exceeds the launch grid limit "
                         f"{MAX_GRID_YZ}; ask for fewer splits")
    if k_cache.shape[2] > MAX_GRID_YZ:
        raise ValueError(f"paged_decode_attention: {k_cache.shape[2]} KV heads exceed the launch grid limit "
                         f"{MAX_GRID_YZ}")
    _refuse_grad_without_backward(name, q, k_cache, v_cache)
    q, k_cache, v_cache = resolve_neg(q, k_cache, v_cache)
    return fn(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, partition, shared_prefix)


def _refuse_grad_without_backward(backend: str, q, k_cache, v_cache):
    """The triton and cuda kernels write a plain output with no autograd graph: a q or cache that
    requires grad would get no gradient, silently (the reference and torch backends are differentiable)."""
    if backend not in ("triton", "cuda") or not torch.is_grad_enabled():
        return
    needing = [n for n, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)) if t.requires_grad]
    if needing:
        raise ValueError(f"paged_decode_attention: {', '.join(needing)} require grad, but the {backend} backend "
                         f"has no backward (its output would carry no gradient): run it under torch.no_grad(), "
                         f"pass detached tensors, or use backend='torch'")


# ----------------------------------------------------------------------------------------------
# prefill


@functools.lru_cache(maxsize=None)
def torch_varlen_attn():
    """torch's varlen flash attention as f(q, k, v, cu_q, cu_k, max_q, max_k, scale), causal, or None.
    Its signature moved between releases: the causal switch from `is_causal=True` (torch 2.10) to
    `window_size=(-1, 0)` (2.11+); `scale` and `enable_gqa` are used where they exist (else q is
    pre-scaled against the kernel's 1/sqrt(D), and K/V are expanded to the query heads). Whether it
    runs here, and aligns the mask bottom-right when queries are the last of a longer context, is
    what varlen_ready() checks."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    native_gqa, has_scale = "enable_gqa" in params, "scale" in params

    def attend(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        groups = q.shape[1] // k.shape[1]
        extra = dict(causal)
        if groups > 1 and native_gqa:
            extra["enable_gqa"] = True
        elif groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if has_scale:
            extra["scale"] = scale
        elif abs(scale * q.shape[-1] ** 0.5 - 1.0) > 1e-12:
            q = q * (scale * q.shape[-1] ** 0.5)
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **extra)
    return attend


_varlen_broken: dict[tuple[bool, bool], str] = {}  # (prefix?, grad?) -> why torch's varlen kernel failed its probe here
_varlen_ok: set = set()               # probe keys that passed


def varlen_ready(q, k, prefix: bool = False, grad: bool | None = None) -> bool:
    """Whether torch_varlen_attn() can serve q / k's device, dtype and head shape: probed once per key
    on two tiny sequences against the float64 reference. Training (`prefix=False`: as many keys as
    queries) also runs a backward; prefill (`prefix=True`: queries are the last of a longer context)
    also checks the causal mask is aligned bottom-right; training over shared prompts needs both
    (`prefix=True, grad=True`). A failure logs one warning and the callers use their per-sequence
    paths for the rest of the process; an out-of-memory error is raised."""
    grad = not prefix if grad is None else grad
    attend = torch_varlen_attn()
    mode = (prefix, grad)
    if attend is None or mode in _varlen_broken:
        return False
    key = (q.device, q.dtype, q.shape[1], k.shape[1], q.shape[2], prefix, grad)
    if key in _varlen_ok:
        return True
    heads, kv_heads, d = q.shape[1], k.shape[1], q.shape[2]
    q_lens, k_lens = ([2, 3], [5, 3]) if prefix else ([2, 4], [2, 4])
    cu = lambda lens: torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32, device=q.device)  # noqa: E731
    try:
        with torch.inference_mode(False), torch.enable_grad():  # a caller in inference mode still gets gradients
            g = torch.Generator(device="cpu").manual_seed(0)
            qp = torch.randn(sum(q_lens), heads, d, generator=g)
            kp, vp = (torch.randn(sum(k_lens), kv_heads, d, generator=g) for _ in range(2))
            qd, kd, vd = (x.to(q.device, q.dtype).requires_grad_(grad) for x in (qp, kp, vp))
            out = attend(qd, kd, vd, cu(q_lens), cu(k_lens), max(q_lens), max(k_lens), d ** -0.5)
            if grad:
                out.float().sum().backward()
        with torch.no_grad():
            want, qs, ks = [], 0, 0
            for n, c in zip(q_lens, k_lens):
                want.append(reference.attention(qp[qs:qs + n].double(), kp[ks:ks + c].double(),
                                                vp[ks:ks + c].double(), d ** -0.5, causal_offset=c - n))
                qs, ks = qs + n, ks + c
            want = torch.cat(want)
            err = float((out.detach().double().cpu() - want).abs().max() / want.abs().max())
        if not err <= (1e-4 if q.dtype == torch.float32 else 3e-2):
            raise RuntimeError(f"wrong numbers (relative error {err:.2e}): causal mask not aligned as needed?")
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure means: use the per-sequence paths
        _varlen_broken[mode] = f"{type(e).__name__}: {e}"
        logging.getLogger(__name__).warning(
            "torch varlen attention does not serve %s here (%s); using one SDPA call per sequence",
            {(True, False): "prefill", (False, True): "training"}.get(mode, "training over shared prompts"),
            _varlen_broken[mode])
        return False
    _varlen_ok.add(key)
    return True


@functools.lru_cache(maxsize=None)
def flash_attn_varlen():
    """flash-attn's `flash_attn_varlen_func` where the package imports, else None (looked up once)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:
        return None
    return flash_attn_varlen_func


@backends.register("paged_prefill_attention", "reference")
def _prefill_reference(q, k_cache, v_cache, context_slots, query_lens, context_lens, scale):
    bs = k_cache.shape[1]
    out = torch.empty_like(q)
    qs = ks = 0
    for n, ctx in zip(query_lens, context_lens):
        slots = context_slots[ks : ks + ctx]
        k, v = k_cache[slots // bs, slots % bs], v_cache[slots // bs, slots % bs]
        out[qs : qs + n] = reference.attention(q[qs : qs + n], k, v, scale, causal_offset=ctx - n)
        qs, ks = qs + n, ks + ctx
    return out


@backends.register("paged_prefill_attention", "torch")
def _prefill_torch(q, k_cache, v_cache, context_slots, query_lens, context_lens, scale, cu_seqlens=None):
    hkv, d = k_cache.shape[2], k_cache.shape[3]
    k_all = k_cache.view(-1, hkv, d).index_select(0, context_slots)
    v_all = v_cache.view(-1, hkv, d).index_select(0, context_slots)
    half_on_gpu = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    flash = flash_attn_varlen() if half_on_gpu else None
    if flash is not None or (half_on_gpu and varlen_ready(q, k_all, prefix=True)):
        # a list-built device tensor is a blocking copy: per layer, the host would wait for each layer
        cu_q, cu_k = cu_seqlens if cu_seqlens is not None else (
            torch.tensor(list(itertools.accumulate(lens, initial=0)), device=q.device, dtype=torch.int32)
            for lens in (query_lens, context_lens))
        if flash is None:  # torch's kernel, probed to align the mask as flash-attn does
            return torch_varlen_attn()(q, k_all, v_all, cu_q, cu_k, max(query_lens), max(context_lens), scale)
        # flash-attn aligns the causal mask to the bottom right: query i of n sees keys <= ctx - n + i
        return flash(q, k_all, v_all, cu_q, cu_k, max(query_lens), max(context_lens), softmax_scale=scale,
                     causal=True)
    group = q.shape[1] // hkv
    out = torch.empty_like(q)
    qs = ks = 0
    for n, ctx in zip(query_lens, context_lens):
        qq = q[qs : qs + n].transpose(0, 1)  # [H, n, D]
        kk = k_all[ks : ks + ctx].transpose(0, 1).repeat_interleave(group, dim=0)
        vv = v_all[ks : ks + ctx].transpose(0, 1).repeat_interleave(group, dim=0)
        if n == ctx:
            o = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale)
        else:
            mask = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril(diagonal=ctx - n)
            o = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale)
        out[qs : qs + n] = o.transpose(0, 1)
        qs, ks = qs + n, ks + ctx
    return out


def paged_prefill_attention(q, k_cache, v_cache, context_slots, query_lens, context_lens, *,
                            scale: float | None = None, backend: str | None = None, cu_seqlens=None,
                            check_bounds: bool = True):
    """Causal attention for a packed batch of prefill chunks -> [sum(query_lens), num_heads, head_dim].

    q [sum(query_lens), H, D]; sequence b's queries are the last query_lens[b] of its context_lens[b]
    tokens, all of whose KV is already stored; context_slots int64 [sum(context_lens)] lists the cache
    slots of every sequence's context in order. query_lens, context_lens: host lists of ints.
    cu_seqlens: (cu_q, cu_k), their int32 prefix sums [B+1] on q's device, when the caller already has
    them (the engine, once per prefill step rather than once per layer). `check_bounds=False` skips the
    range check of context_slots (a host sync); the engine uses it on the slots it built itself. Unsafe
    otherwise: a slot outside the cache is then read as is (the last slot for -1, or an indexing error).
    """
    check_bounds, = flags("paged_prefill_attention", check_bounds=check_bounds)
    query_lens, context_lens = _validate_prefill(q, k_cache, v_cache, context_slots, query_lens, context_lens,
                                                 cu_seqlens, check_bounds)
    scale = _scale("paged_prefill_attention", scale, q.shape[-1])
    name, fn = backends.resolve("paged_prefill_attention", q.device, backend)
    if not query_lens:  # every backend's answer, and flash / varlen would take max() of nothing
        return torch.empty_like(q)
    extra = {"cu_seqlens": cu_seqlens} if name == "torch" else {}
    return fn(q, k_cache, v_cache, context_slots, query_lens, context_lens, scale, **extra)
