"""store_kv: scatter new K/V rows into the paged cache (a pure copy, so its floor is bandwidth)."""
import torch

from r1fast import ops
from r1fast.bench.harness import Case, Impl, require_backend, suite


def _inputs(tokens, heads, dim, block_size, dtype, device):
    num_blocks = tokens // block_size + 8
    key = torch.randn(tokens, heads, dim, device=device).to(dtype)
    value = torch.randn(tokens, heads, dim, device=device).to(dtype)
    kc = torch.empty(num_blocks, block_size, heads, dim, device=device, dtype=dtype)
    vc = torch.empty_like(kc)
    slots = torch.randperm(num_blocks * block_size, device=device)[:tokens]
    return key, value, kc, vc, slots


def _r1fast(backend, shape, dtype, device):
    def setup():
        require_backend("store_kv", backend, device)
        args = _inputs(*shape, dtype, device)
        return lambda: ops.store_kv(*args, backend=backend, check_slots=False)
    return setup


def _torch_index_put(shape, dtype, device):
    def setup():
        key, value, kc, vc, slots = _inputs(*shape, dtype, device)
        fk, fv = kc.view(-1, *kc.shape[2:]), vc.view(-1, *vc.shape[2:])

        def run():
            fk.index_copy_(0, slots, key)
            fv.index_copy_(0, slots, value)
        return run
    return setup


@suite("kv_cache")
def cases(size, device):
    """Paged KV-cache write (store_kv) against torch index_copy_."""
    if size == "gpu":
        shapes, dtype = [(16384, 8, 128, 16), (256, 8, 128, 16)], torch.bfloat16
    else:
        shapes, dtype = [(512, 2, 64, 16)], torch.float32
    out = []
    for tokens, heads, dim, bs in shapes:
        shape = (tokens, heads, dim, bs)
        nbytes = 2 * 2 * tokens * heads * dim * torch.finfo(dtype).bits // 8  # K and V, read + write
        impls = [Impl("r1fast", b, _r1fast(b, shape, dtype, device))
                 for b in (("cuda", "triton") if device.type == "cuda" else ("torch",))]
        impls.append(Impl("torch", "index_copy", _torch_index_put(shape, dtype, device)))
        out.append(Case(f"tokens={tokens} kv_heads={heads} dim={dim}", "fwd", str(dtype).removeprefix("torch."),
                        impls, bytes=nbytes, items=tokens))
    return out
