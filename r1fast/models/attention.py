"""Packed (unpadded) batches and the training attention over them.

A packed batch is T tokens of B sequences laid end to end; `cu_seqlens` (int32 [B+1], 0 first, T
last) marks where each sequence starts. Attention is causal inside each sequence and never crosses
a boundary. On CUDA (fp16/bf16) this is one varlen flash-attention call: flash-attn's when it is
importable, else torch's own (`torch.nn.attention.varlen.varlen_attn`, torch >= 2.10). Otherwise
torch SDPA, one call per sequence (exact, memory-light; the CPU path and the last fallback on GPU:
a loop of B calls per layer, launch-bound for many short sequences).

Shared prefixes (`prefix_of`): a sequence may continue another one, e.g. the G completions of a GRPO
group each continue their prompt, packed once. Its tokens attend to the whole prefix sequence and
then causally to themselves, its positions continue the prefix's, and the prefix's own tokens see
only themselves. Attention then runs over gathered keys: each sequence's queries against [its
prefix's keys, its own keys], causal aligned bottom-right, in one varlen call (the prompt's K/V are
read once per sample, its MLP and projections computed once).
"""
from __future__ import annotations

import dataclasses

import torch
from torch.nn import functional as F

from r1fast.backends import canonical_device
from r1fast.ops.attention import flash_attn_varlen, torch_varlen_attn, varlen_ready


@dataclasses.dataclass
class PackedBatch:
    cu_seqlens: torch.Tensor     # int32 [B+1] on the tokens' device
    lengths: list[int]           # host copy of the B sequence lengths
    max_seqlen: int
    _mask: torch.Tensor | None = dataclasses.field(default=None, repr=False)
    prefix_of: list[int] | None = None   # per sequence: the index of the sequence it continues, or -1
    _keys: tuple | None = dataclasses.field(default=None, repr=False)

    @property
    def has_prefixes(self) -> bool:
        return self.prefix_of is not None and any(p >= 0 for p in self.prefix_of)

    def key_layout(self, device) -> tuple[torch.Tensor, torch.Tensor, list[int], int]:
        """With shared prefixes: (token index of every gathered key, int32 cu_seqlens of the keys, key
        lengths, longest): sequence b's keys are its prefix's tokens then its own."""
        if self._keys is None or self._keys[0].device != torch.device(device):
            starts, index, k_lens = self.starts, [], []
            for b, (s, n) in enumerate(zip(starts, self.lengths)):
                p = self.prefix_of[b]
                if p >= 0:
                    index.append(torch.arange(starts[p], starts[p] + self.lengths[p]))
                index.append(torch.arange(s, s + n))
                k_lens.append(n + (self.lengths[p] if p >= 0 else 0))
            cu_k = host_to_device(torch.tensor([0] + list(_cumsum(k_lens)), dtype=torch.int32), device)
            self._keys = (host_to_device(torch.cat(index), device), cu_k, k_lens, max(k_lens))
        return self._keys

    def prefix_mask(self, device) -> torch.Tensor:
        """bool [T, keys] over key_layout's gathered keys: a query sees its own sequence's keys up to its
        place, counting the prefix's first (built once, shared by layers)."""
        if self._mask is None or self._mask.device != torch.device(device):
            _, cu_k, k_lens, _ = self.key_layout(device)
            seqs = torch.arange(len(k_lens), device=device)
            q_lens, k_lens = torch.tensor(self.lengths, device=device), torch.tensor(k_lens, device=device)
            seq_q, seq_k = torch.repeat_interleave(seqs, q_lens), torch.repeat_interleave(seqs, k_lens)
            # a query's place among its sequence's keys: its own position plus the prefix's length
            pos_q = torch.arange(seq_q.shape[0], device=device) - self.cu_seqlens[:-1].to(torch.int64)[seq_q] \
                + (k_lens - q_lens)[seq_q]
            pos_k = torch.arange(seq_k.shape[0], device=device) - cu_k[:-1].to(torch.int64)[seq_k]
            self._mask = (seq_q[:, None] == seq_k[None, :]) & (pos_k[None, :] <= pos_q[:, None])
        return self._mask

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


def check_prefix_of(prefix_of, packed: PackedBatch) -> PackedBatch:
    """Attach `prefix_of` (a list of ints, one per sequence: -1, or an earlier sequence that has no prefix
    itself) to `packed`."""
    if prefix_of is None:
        return packed
    if isinstance(prefix_of, torch.Tensor):
        prefix_of = prefix_of.tolist()
    n = len(packed.lengths)
    if not isinstance(prefix_of, (list, tuple)) or len(prefix_of) != n or \
            not all(isinstance(p, int) and not isinstance(p, bool) for p in prefix_of):
        raise ValueError(f"prefix_of must be a list of {n} ints (one per packed sequence), got {prefix_of!r}")
    for b, p in enumerate(prefix_of):
        if p >= b or p < -1 or (p >= 0 and prefix_of[p] != -1):
            raise ValueError(f"prefix_of[{b}] = {p}: a sequence continues an earlier sequence (index < {b}) that "
                             f"continues none itself, or -1")
    return dataclasses.replace(packed, prefix_of=list(prefix_of), _mask=None, _keys=None)


def check_cu_seqlens_form(cu_seqlens: torch.Tensor, device: torch.device) -> None:
    """The checks of cu_seqlens that read none of its values: type, dtype, shape, device."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D int32 or int64 tensor [B+1] with B >= 1, got dtype {cu_seqlens.dtype} "
                         f"shape {tuple(cu_seqlens.shape)}")
    if canonical_device(cu_seqlens.device) != canonical_device(device):
        # (compared as canonical devices: a check with `!=` refused cu_seqlens on cuda:0 for input_ids on "cuda")
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but input_ids on {device}")


def check_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int, device: torch.device,
                     host: list[int] | None = None) -> PackedBatch:
    """cu_seqlens checked (from 0 to num_tokens, no empty sequence) as the PackedBatch it describes. `host`:
    its values where the caller read them already (with its own reads, in one sync), else they are read here."""
    check_cu_seqlens_form(cu_seqlens, device)
    host = cu_seqlens.tolist() if host is None else host
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
    """Position of every token within its own sequence (after its prefix's, if it has one): int64 [T]."""
    t, b = sum(packed.lengths), len(packed.lengths)
    starts = packed.starts
    if packed.has_prefixes:  # a continuation starts where its prefix ends
        starts = [s - (0 if p < 0 else packed.lengths[p]) for s, p in zip(starts, packed.prefix_of)]
    starts, lengths = host_to_device(torch.tensor(starts + packed.lengths, dtype=torch.int64), device).split([b, b])
    return torch.arange(t, device=device) - torch.repeat_interleave(starts, lengths, output_size=t)


def host_to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A small host tensor copied to `device` behind the work queued there. A plain .to("cuda") of pageable memory
    waits for the stream to drain first: a host sync in each training forward (positions, shared-prefix keys)."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _cumsum(xs):
    s = 0
    for x in xs:
        s += x
        yield s


_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa= appeared in 2.5


def varlen_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedBatch,
                            scale: float) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D], causal within each packed sequence (after its
    prefix, for a sequence that continues another)."""
    if packed.has_prefixes:
        return _attention_over_prefixes(q, k, v, packed, scale)
    out = _one_varlen_call(q, k, v, packed.cu_seqlens, packed.cu_seqlens, packed.max_seqlen, packed.max_seqlen,
                           scale, prefix=False)
    if out is not None:
        return out
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


def training_attention_path(device, dtype, heads: int, kv_heads: int, head_dim: int) -> str:
    """Which kernel packed training attention (varlen_causal_attention) runs here: "flash-attn varlen",
    "torch varlen" (torch >= 2.10, where its probe passes) or "sdpa" (the CPU, fp32, or no varlen kernel)."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return "sdpa"
    if flash_attn_varlen() is not None:
        return "flash-attn varlen"
    q = torch.empty(1, heads, head_dim, device=device, dtype=dtype)
    k = torch.empty(1, kv_heads, head_dim, device=device, dtype=dtype)
    return "torch varlen" if varlen_ready(q, k, prefix=False, grad=True) else "sdpa"


def prefix_attention_keeps_pace(device, dtype, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether attention over shared prefixes is as fast a path here as plain packed attention: false
    only on a GPU whose torch varlen kernel serves training but not queries shorter than their keys
    (there the prefix path would loop over sequences while the plain one makes one call)."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or flash_attn_varlen() is not None:
        return True
    q = torch.empty(1, heads, head_dim, device=device, dtype=dtype)
    k = torch.empty(1, kv_heads, head_dim, device=device, dtype=dtype)
    return varlen_ready(q, k, prefix=True, grad=True) or not varlen_ready(q, k)


def _one_varlen_call(q, k, v, cu_q, cu_k, max_q, max_k, scale, prefix: bool):
    """Causal varlen flash attention (aligned bottom-right where a sequence has more keys than queries)
    in one call, with its backward: flash-attn's, else torch's where its probe passes (`prefix`: some
    sequences have more keys than queries); None where neither serves (CPU, fp32, no kernel)."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    flash = flash_attn_varlen()
    if flash is not None:
        return flash(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=scale, causal=True)
    if varlen_ready(q, k, prefix=prefix, grad=True):
        return torch_varlen_attn()(q, k, v, cu_q, cu_k, max_q, max_k, scale)
    return None


def _attention_over_prefixes(q, k, v, packed: PackedBatch, scale: float) -> torch.Tensor:
    """Each sequence's queries against [its prefix's keys, its own keys], causal aligned bottom-right.
    The gather's backward sums every continuation's gradient into the prefix's K/V."""
    index, cu_k, k_lens, max_k = packed.key_layout(q.device)
    k2, v2 = k.index_select(0, index), v.index_select(0, index)
    out = _one_varlen_call(q, k2, v2, packed.cu_seqlens, cu_k, packed.max_seqlen, max_k, scale, prefix=True)
    if out is not None:
        return out
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k2, v2 = k2.repeat_interleave(groups, dim=1), v2.repeat_interleave(groups, dim=1)
    if not q.is_cuda and q.shape[0] <= _MASKED_MAX_TOKENS:  # one call, a [T, keys] mask
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k2.transpose(0, 1)[None],
                                             v2.transpose(0, 1)[None], attn_mask=packed.prefix_mask(q.device),
                                             scale=scale)
        return out[0].transpose(0, 1)
    outs = []
    for q_seq, k_seq, v_seq in zip(q.split(packed.lengths), k2.split(k_lens), v2.split(k_lens)):
        n, m = q_seq.shape[0], k_seq.shape[0]
        mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(diagonal=m - n)
        o = F.scaled_dot_product_attention(q_seq.transpose(0, 1)[None], k_seq.transpose(0, 1)[None],
                                           v_seq.transpose(0, 1)[None], attn_mask=mask, scale=scale)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs, dim=0)
