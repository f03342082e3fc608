"""Packed (unpadded) batches and the training attention over them.

A packed batch is T tokens of B sequences laid end to end; `cu_seqlens` (int32 [B+1], 0 first, T
last) marks where each sequence starts. Attention is causal inside each sequence and never crosses
a boundary. On CUDA (fp16/bf16) this is one varlen flash-attention call: flash-attn's when it is
importable, else torch's own (`torch.nn.attention.varlen.varlen_attn`, torch >= 2.10). Otherwise
torch SDPA, one call per sequence (exact, memory-light; the CPU path and the last fallback on GPU:
a loop of B calls per layer, launch-bound for many short sequences).
"""
from __future__ import annotations

import dataclasses
import functools

import torch
from torch.nn import functional as F

from r1fast.ops.attention import torch_varlen_attn, varlen_ready


@dataclasses.dataclass
class PackedBatch:
    cu_seqlens: torch.Tensor     # int32 [B+1] on the tokens' device
    lengths: list[int]           # host copy of the B sequence lengths
    max_seqlen: int
    _mask: torch.Tensor | None = dataclasses.field(default=None, repr=False)

    def block_diagonal_causal_mask(self, device) -> torch.Tensor:
        """bool [T, T]: token i sees token j iff j <= i within the same sequence (built once, shared by layers)."""
        if self._mask is None or self._mask.device != torch.device(device):
            seq_of = torch.repeat_interleave(torch.arange(len(self.lengths), device=device),
                                             torch.tensor(self.lengths, device=device))
            t = seq_of.shape[0]
            causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
            self._mask = causal & (seq_of[:, None] == seq_of[None, :])
        return self._mask

    @property
    def starts(self) -> list[int]:
        out, s = [], 0
        for n in self.lengths:
            out.append(s)
            s += n
        return out


def check_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int, device: torch.device) -> PackedBatch:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor [B+1] with B >= 1, got dtype {cu_seqlens.dtype} "
                         f"shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but input_ids on {device}")
    host = cu_seqlens.tolist()
    if host[0] != 0 or host[-1] != num_tokens:
        raise ValueError(f"cu_seqlens must start at 0 and end at the token count {num_tokens}, "
                         f"got first {host[0]} last {host[-1]}")
    lengths = [b - a for a, b in zip(host[:-1], host[1:])]
    if min(lengths) <= 0:
        raise ValueError(f"cu_seqlens must be strictly increasing (no empty sequences), got {host}")
    return PackedBatch(cu_seqlens.to(torch.int32), lengths, max(lengths))


def packed_from_lengths(lengths: list[int], device: torch.device) -> PackedBatch:
    cu = torch.tensor([0] + list(_cumsum(lengths)), dtype=torch.int32, device=device)
    return PackedBatch(cu, list(lengths), max(lengths))


def packed_from_positions(position_ids: torch.Tensor) -> PackedBatch:
    """Sequence boundaries where the positions restart at 0 (the first token always starts one)."""
    is_start = position_ids == 0
    is_start[0] = True
    starts = is_start.nonzero().flatten().tolist()
    lengths = [b - a for a, b in zip(starts, starts[1:] + [position_ids.shape[0]])]
    return packed_from_lengths(lengths, position_ids.device)


def positions_of(packed: PackedBatch, device: torch.device) -> torch.Tensor:
    """Position of every token within its own sequence: int64 [T]."""
    t = sum(packed.lengths)
    starts = packed.cu_seqlens[:-1].to(torch.int64)
    lengths = torch.tensor(packed.lengths, device=device)
    return torch.arange(t, device=device) - torch.repeat_interleave(starts, lengths, output_size=t)


def _cumsum(xs):
    s = 0
    for x in xs:
        s += x
        yield s


_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa= appeared in 2.5


@functools.lru_cache(maxsize=None)
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:
        return None
    return flash_attn_varlen_func


def varlen_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedBatch,
                            scale: float) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D], causal within each packed sequence."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        flash = _flash_attn_varlen()
        if flash is not None:
            return flash(q, k, v, packed.cu_seqlens, packed.cu_seqlens, packed.max_seqlen, packed.max_seqlen,
                         dropout_p=0.0, softmax_scale=scale, causal=True)
        if varlen_ready(q, k):
            return torch_varlen_attn()(q, k, v, packed.cu_seqlens, packed.cu_seqlens, packed.max_seqlen,
                                       packed.max_seqlen, scale)
    if not q.is_cuda and (len(packed.lengths) == 1 or q.shape[0] <= _MASKED_MAX_TOKENS):
        return sdpa_block_diagonal(q, k, v, packed, scale)
    return sdpa_per_sequence(q, k, v, packed, scale)


# Up to this many tokens one masked SDPA call over the whole batch (a T x T bool mask, 4 MB at the
# limit) beats a Python loop of small calls on the CPU; beyond it the loop avoids the T^2 work.
_MASKED_MAX_TOKENS = 2048


def sdpa_block_diagonal(q, k, v, packed: PackedBatch, scale: float) -> torch.Tensor:
    """One SDPA call over all T tokens: causal for one sequence, else a block-diagonal causal mask."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, H, T, D]
    if len(packed.lengths) == 1:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)
    else:
        mask = packed.block_diagonal_causal_mask(q.device)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)


def sdpa_per_sequence(q, k, v, packed: PackedBatch, scale: float) -> torch.Tensor:
    """One causal SDPA call per sequence: exact, no T x T mask, the fast kernels on CUDA."""
    groups = q.shape[1] // k.shape[1]
    # SDPA's flash kernel reads grouped K/V in place (no copy of K/V per query head); elsewhere expand.
    native_gqa = groups > 1 and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _SDPA_HAS_GQA
    outs = []
    # torch.split, not one slice per sequence: each slice's backward is a zero-filled [T, H, D]
    # gradient summed into the others (O(B·T) work per layer); split's backward is one concatenation.
    # The sequences tile [0, T) (cu_seqlens starts at 0 and ends at T), so the pieces are the slices.
    if sum(packed.lengths) == q.shape[0]:
        pieces = zip(q.split(packed.lengths), k.split(packed.lengths), v.split(packed.lengths))
    else:
        pieces = ((q[s:s + n], k[s:s + n], v[s:s + n]) for s, n in zip(packed.starts, packed.lengths))
    for q_seq, k_seq, v_seq in pieces:
        qs = q_seq.transpose(0, 1)[None]       # [1, Hq, n, D]
        ks = k_seq.transpose(0, 1)[None]
        vs = v_seq.transpose(0, 1)[None]
        if native_gqa:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
            outs.append(o[0].transpose(0, 1))
            continue
        if groups > 1:
            ks = ks.repeat_interleave(groups, dim=1)
            vs = vs.repeat_interleave(groups, dim=1)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        outs.append(o[0].transpose(0, 1))                    # [n, Hq, D]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
