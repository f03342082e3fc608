import pytest
import torch

from r1fast import _ext, backends, ops
from r1fast.reference import kv_cache as reference
from r1fast.testing import poison, randn

CPU_BACKENDS = ["reference", "torch", "triton"]


def _case(num_tokens, heads, dim, num_blocks, block_size, dtype, device, seed, skip_every=3, strided=False):
    g = torch.Generator().manual_seed(seed)
    width = heads * dim * (2 if strided else 1)
    qkv = randn(num_tokens, width, dtype=dtype, seed=seed).to(device)
    key = qkv[:, : heads * dim].view(num_tokens, heads, dim)  # strided views, as sliced out of a fused qkv
    value = randn(num_tokens, heads, dim, dtype=dtype, seed=seed + 1).to(device)
    num_slots = num_blocks * block_size
    slots = torch.randperm(num_slots, generator=g)[:num_tokens]
    if skip_every:
        slots[::skip_every] = -1
    cache_shape = (num_blocks, block_size, heads, dim)
    k_cache = poison(torch.empty(cache_shape, dtype=dtype, device=device))
    v_cache = poison(torch.empty(cache_shape, dtype=dtype, device=device))
    return key, value, k_cache, v_cache, slots.to(device)


def _expected(key, value, k_cache, v_cache, slots):
    k, v = k_cache.clone(), v_cache.clone()
    reference.store_kv(key, value, k, v, slots)
    return k, v


def _available_backends(device):
    return [b for b in CPU_BACKENDS + ["cuda"] if b in backends.available("store_kv", device)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(7, 2, 8, 5, 4), (1, 1, 3, 1, 2), (33, 4, 16, 12, 16)])
@pytest.mark.parametrize("strided", [False, True])
def test_store_kv_matches_reference(device, dtype, shape, strided):
    n, heads, dim, blocks, bs = shape
    for i, backend in enumerate(_available_backends(device)):
        key, value, kc, vc, slots = _case(n, heads, dim, blocks, bs, dtype, device, seed=11 + i, strided=strided)
        ek, ev = _expected(key, value, kc, vc, slots)
        ops.store_kv(key, value, kc, vc, slots, backend=backend)
        # Bitwise: a copy either lands exactly or is wrong; untouched slots keep their poison.
        assert torch.equal(kc.isnan(), ek.isnan()) and torch.equal(kc.nan_to_num(), ek.nan_to_num()), backend
        assert torch.equal(vc.isnan(), ev.isnan()) and torch.equal(vc.nan_to_num(), ev.nan_to_num()), backend
        written = (slots >= 0).sum().item()
        assert (~kc.isnan()).all(-1).all(-1).sum().item() == written


def test_reference_writes_expected_rows():
    key, value, kc, vc, slots = _case(5, 2, 4, 3, 2, torch.float32, "cpu", seed=3, skip_every=2)
    reference.store_kv(key, value, kc, vc, slots)
    flat_k = kc.view(-1, 2, 4)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat_k[s], key[t])


@pytest.mark.skipif(_ext.load() is None, reason="r1fast._C not built")
def test_cpu_twin_rejects_out_of_range_slot_in_cpp():
    # The C++ twin checks bounds itself as well, before writing anything.
    key, value, kc, vc, slots = _case(4, 1, 4, 2, 2, torch.float32, "cpu", seed=5, skip_every=0)
    slots[2] = 99
    ext = _ext.load()
    before = kc.clone()
    with pytest.raises(ValueError, match="slot_mapping\\[2\\] = 99"):
        ext.store_kv_cpu(key.data_ptr(), value.data_ptr(), kc.data_ptr(), vc.data_ptr(), slots.data_ptr(),
                         4, 16, 16, 16, 4)
    assert torch.equal(kc.isnan(), before.isnan())


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(slot_mapping=a["slot_mapping"].int()), "int64"),
        (lambda a: a.update(slot_mapping=a["slot_mapping"][:-1]), "slot_mapping must be"),
        (lambda a: a.update(value=a["value"].half()), "share a dtype"),
        (lambda a: a.update(key=a["key"][:, :1]), "value shape"),
        (lambda a: a.update(k_cache=a["k_cache"][..., :2]), "k_cache must be"),
        (lambda a: a["slot_mapping"].__setitem__(0, 12), "must lie in"),
        (lambda a: a["slot_mapping"].__setitem__(0, -2), "must lie in"),
        (lambda a: a.update(key=a["key"].flatten(1)), "key must be"),
        (lambda a: a.update(v_cache=a["v_cache"].transpose(0, 1)), "v_cache shape|contiguous"),
    ],
)
def test_store_kv_bad_input_is_a_clear_error(mutate, match):
    key, value, kc, vc, slots = _case(4, 2, 4, 3, 4, torch.float32, "cpu", seed=7, skip_every=0)
    args = dict(key=key, value=value, k_cache=kc, v_cache=vc, slot_mapping=slots)
    mutate(args)
    with pytest.raises(ValueError, match=match):
        ops.store_kv(**args)


@pytest.mark.skipif(_ext.load() is None or not _ext.build_info()["with_cuda"] or torch.cuda.is_available(),
                    reason="needs a CUDA-built extension on a machine without a GPU")
def test_cuda_build_imports_without_driver_and_says_so():
    ext = _ext.load()
    with pytest.raises(RuntimeError, match="CUDA"):
        ext.store_kv_cuda(1, 1, 1, 1, 1, 1, 4, 4, 4, 1, 0)
