"""A start-up check of the rollout's fast kernels on the card they are about to run on.

The engine's decode path runs `paged_decode_attention` and `store_kv` through their fastest
backends (CUDA C++, then Triton) inside CUDA graphs, where a wrong number would go unnoticed until
the rewards drift. So before capturing its graphs the engine runs each candidate once on a small
random case in the model's shapes and dtype (several context lengths, one and several splits)
against the float64 reference, and uses the first that agrees; one that does not is skipped with a
warning naming the error. The shared-prefix path of the chosen decode backend is checked the same
way (shared_prefix_ok); where it disagrees the engine decodes without it. The cost is a few small
launches per engine.
"""
from __future__ import annotations

import logging

import torch

from r1fast import backends, ops

log = logging.getLogger(__name__)

# max |kernel - float64 reference| / max |reference| allowed, by the kernel's dtype
_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _decode_error(backend: str, device, dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> float:
    g = torch.Generator(device="cpu").manual_seed(0)
    block_size, lens = 16, [1, 37, 300]
    width = -(-max(lens) // block_size)
    num_blocks = len(lens) * width + 3
    k = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    v = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    q = torch.randn(len(lens), num_heads, head_dim, generator=g)
    tables = torch.randperm(num_blocks, generator=g)[: len(lens) * width].reshape(len(lens), width).to(torch.int32)
    ctx = torch.tensor(lens, dtype=torch.int32)
    want = ops.paged_decode_attention(q.double(), k.double(), v.double(), tables, ctx, backend="reference")
    err = 0.0
    for splits in (1, 4):
        got = ops.paged_decode_attention(*(x.to(device, dtype) for x in (q, k, v)), tables.to(device),
                                         ctx.to(device), num_splits=splits, backend=backend)
        err = max(err, float((got.double().cpu() - want).abs().max() / want.abs().max()))
    return err


def _shared_prefix_error(backend: str, device, dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> float:
    """Three samples sharing 2 blocks of a prompt and a lone row, through the shared-prefix tiles."""
    from r1fast.ops.shared_prefix import find_shared_prefixes, pad_shared_prefix

    g = torch.Generator(device="cpu").manual_seed(2)
    block_size, lens, shared = 16, [40, 47, 90, 33], 2
    width = -(-max(lens) // block_size)
    num_blocks = len(lens) * width + 3
    k, v = (torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g) for _ in range(2))
    q = torch.randn(len(lens), num_heads, head_dim, generator=g)
    tables = torch.randperm(num_blocks, generator=g)[: len(lens) * width].reshape(len(lens), width).to(torch.int32)
    tables[1:3, :shared] = tables[0, :shared]
    ctx = torch.tensor(lens, dtype=torch.int32)
    tiles = find_shared_prefixes(tables.numpy(), ctx.numpy(), block_size, num_heads, num_kv_heads, head_dim)
    want = ops.paged_decode_attention(q.double(), k.double(), v.double(), tables, ctx, backend="reference")
    err = 0.0
    # as found, and in a CUDA graph's fixed-size buffers (trailing tiles empty)
    for shared in (tiles, pad_shared_prefix(tiles, len(lens), len(lens))):
        for splits in (1, 4):
            got = ops.paged_decode_attention(*(x.to(device, dtype) for x in (q, k, v)), tables.to(device),
                                             ctx.to(device), num_splits=splits, backend=backend,
                                             shared_prefix=shared.to(device))
            err = max(err, float((got.double().cpu() - want).abs().max() / want.abs().max()))
    return err


def shared_prefix_ok(backend: str, device, dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether `backend`'s shared-prefix path matches the reference on `device` (a warning if not)."""
    try:
        err = _shared_prefix_error(backend, torch.device(device), dtype, num_heads, num_kv_heads, head_dim)
    except Exception as e:  # noqa: BLE001 - a path that cannot run here is not used, the same way
        log.warning("paged_decode_attention: the %s backend's shared-prefix path fails its start-up check on %s "
                    "(%s: %s); decoding without it", backend, device, type(e).__name__, e)
        return False
    if err <= _TOLERANCE.get(dtype, 1e-4):
        return True
    log.warning("paged_decode_attention: the %s backend's shared-prefix path disagrees with the reference on %s "
                "(relative error %.2e); decoding without it", backend, device, err)
    return False


def _store_error(backend: str, device, dtype, num_kv_heads: int, head_dim: int) -> float:
    g = torch.Generator(device="cpu").manual_seed(1)
    caches = [torch.randn(8, 16, num_kv_heads, head_dim, generator=g) for _ in range(2)]
    key, value = (torch.randn(5, num_kv_heads, head_dim, generator=g) for _ in range(2))
    slots = torch.tensor([3, 17, 64, -1, 127])  # -1: a padding row writes nothing
    want = [c.clone() for c in caches]
    ops.store_kv(key, value, *want, slots, backend="reference")
    got = [c.to(device, dtype) for c in caches]
    ops.store_kv(key.to(device, dtype), value.to(device, dtype), *got, slots.to(device), backend=backend)
    return max(float((a.double().cpu() - b.to(a.dtype).double()).abs().max() / b.abs().max())
               for a, b in zip(got, want))


def select_backends(device, dtype, num_heads: int, num_kv_heads: int, head_dim: int,
                    candidates: dict[str, list[str]] | None = None) -> dict[str, str]:
    """{op: backend} for paged_decode_attention and store_kv on `device`: the first candidate (default:
    the usable ones in preference order, cuda before triton) that matches the reference here;
    "torch" when none does."""
    device = torch.device(device)
    checks = {
        "paged_decode_attention": lambda b: _decode_error(b, device, dtype, num_heads, num_kv_heads, head_dim),
        "store_kv": lambda b: _store_error(b, device, dtype, num_kv_heads, head_dim),
    }
    chosen = {}
    for op, error_of in checks.items():
        names = (candidates or {}).get(op) or [b for b in ("cuda", "triton") if b in backends.available(op, device)]
        chosen[op] = "torch"
        for name in names:
            try:
                err = error_of(name)
            except Exception as e:  # noqa: BLE001 - a kernel that cannot run here is skipped the same way
                log.warning("%s: the %s backend fails its start-up check on %s (%s: %s); not using it",
                            op, name, device, type(e).__name__, e)
                continue
            if err <= _TOLERANCE.get(dtype, 1e-4):
                chosen[op] = name
                break
            log.warning("%s: the %s backend disagrees with the reference on %s (relative error %.2e); not "
                        "using it", op, name, device, err)
    return chosen
