"""Plain-torch attention oracles for the rollout engine (float64-capable, one sequence at a time)."""
import math

import torch


def gather_context(k_cache, v_cache, block_table, context_len):
    """K/V rows [context_len, num_kv_heads, head_dim] of one sequence from the paged cache."""
    bs = k_cache.shape[1]
    pos = torch.arange(context_len, device=k_cache.device)
    blocks = block_table[pos // bs].long()
    return k_cache[blocks, pos % bs], v_cache[blocks, pos % bs]


def attention(q, k, v, scale, causal_offset=None):
    """Softmax attention of q [Tq, H, D] over k, v [Tk, Hkv, D] (GQA: head h reads KV head h // (H // Hkv)).

    causal_offset: query i sits at position causal_offset + i and sees keys 0..causal_offset + i;
    None means every query sees every key.
    """
    # float64 whatever the inputs (the oracle): fp16 q·k overflows past 65504 where the answer is finite
    out_dtype = q.dtype
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if causal_offset is not None:
        qi = torch.arange(q.shape[0], device=q.device)[:, None] + causal_offset
        ki = torch.arange(k.shape[0], device=q.device)[None, :]
        scores = scores.masked_fill(ki > qi, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v).to(out_dtype)


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale=None):
    """out[b] = attention of q[b] (one token per sequence) over the first context_lens[b] cached tokens."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        k, v = gather_context(k_cache, v_cache, block_tables[b], int(context_lens[b]))
        out[b] = attention(q[b : b + 1], k, v, scale)[0]
    return out


def paged_prefill_attention(q, k_cache, v_cache, block_tables, query_lens, context_lens, scale=None):
    """Causal attention of each sequence's new tokens over its cached prefix and themselves.

    q [sum(query_lens), H, D] packed; sequence b's queries are the last query_lens[b] of its
    context_lens[b] tokens, whose KV is already in the cache.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.empty_like(q)
    start = 0
    for b in range(len(query_lens)):
        n, ctx = int(query_lens[b]), int(context_lens[b])
        k, v = gather_context(k_cache, v_cache, block_tables[b], ctx)
        out[start : start + n] = attention(q[start : start + n], k, v, scale, causal_offset=ctx - n)
        start += n
    return out
