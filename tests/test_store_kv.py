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
    """Every backend but the reference, which _expected runs itself."""
    return [b for b in CPU_BACKENDS[1:] + ["cuda"] if b in backends.available("store_kv", device)]


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
    with pytest.raises(ValueError, match="overflow 64-bit byte offsets"):  # sizes no tensor has: raw pointers
        ext.store_kv_cpu(key.data_ptr(), value.data_ptr(), kc.data_ptr(), vc.data_ptr(), slots.data_ptr(),
                         1, 2**62, 2**62, 2**62, 4)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(slot_mapping=a["slot_mapping"].int()), "int64"),
        (lambda a: a.update(slot_mapping=a["slot_mapping"][:-1]), "slot_mapping must be"),
        (lambda a: a.update(value=a["value"].half()), "share a float dtype"),
        (lambda a: a.update(key=a["key"][:, :1]), "value shape"),
        (lambda a: a.update(k_cache=a["k_cache"][..., :2]), "k_cache must be"),
        (lambda a: a["slot_mapping"].__setitem__(0, 12), "must lie in"),
        (lambda a: a["slot_mapping"].__setitem__(0, -2), "must lie in"),
        (lambda a: a.update(key=a["key"].flatten(1)), "key must be"),
        (lambda a: a.update(v_cache=a["v_cache"].transpose(0, 1)), "v_cache shape|contiguous"),
        (lambda a: a.update(key=a["key"][:1].expand(4, -1, -1)), "token rows of key overlap"),
        (lambda a: a.update(key=torch._neg_view(a["key"])), "lazily negated"),
        (lambda a: a.update(**{k: a[k].to(torch.complex64) for k in ("key", "value", "k_cache", "v_cache")}),
         "float dtype"),
    ],
)
def test_store_kv_bad_input_is_a_clear_error(mutate, match):
    key, value, kc, vc, slots = _case(4, 2, 4, 3, 4, torch.float32, "cpu", seed=7, skip_every=0)
    args = dict(key=key, value=value, k_cache=kc, v_cache=vc, slot_mapping=slots)
    mutate(args)
    with pytest.raises(ValueError, match=match):
        ops.store_kv(**args)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_store_kv_refuses_tensors_needing_grad_on_every_backend(backend):
    # A cache requiring grad: the reference raised torch's "view of a leaf Variable" error, torch and
    # triton wrote it silently; a key requiring grad tied the cache into the graph on the reference only.
    key, value, kc, vc, slots = _case(4, 2, 4, 3, 4, torch.float32, "cpu", seed=7, skip_every=0)
    with pytest.raises(ValueError, match="k_cache requires grad"):
        ops.store_kv(key, value, kc.clone().requires_grad_(True), vc, slots, backend=backend)
    with pytest.raises(ValueError, match="key/value require grad"):
        ops.store_kv(key.clone().requires_grad_(True), value, kc, vc, slots, backend=backend)
    with torch.no_grad():  # a key from a model forward under no_grad is fine
        ops.store_kv(key.clone().requires_grad_(True), value, kc, vc, slots, backend=backend)
    assert not kc.requires_grad


def test_unchecked_slots_past_the_cache_are_skipped_by_the_kernels(device):
    # check_slots=False: the Triton and CUDA kernels skip a slot >= num_slots as they skip -1. The cache
    # is the front of a larger buffer, so a write past it lands in the guard rows, where it shows.
    blocks, bs, heads, dim = 5, 4, 2, 4
    num_slots = blocks * bs
    slots = torch.tensor([0, num_slots, 7, num_slots + 3, -1, num_slots - 1], device=device)
    key = randn(6, heads, dim, seed=70, device=device)
    value = randn(6, heads, dim, seed=71, device=device)
    keep = torch.tensor([True, False, True, False, False, True], device=device)
    names = [b for b in ("triton", "cuda") if b in backends.available("store_kv", device)]
    assert "triton" in names
    for name in names:
        k_buf = randn(num_slots + 8, heads, dim, seed=72, device=device)
        v_buf = randn(num_slots + 8, heads, dim, seed=73, device=device)
        kc, vc = (buf[:num_slots].view(blocks, bs, heads, dim) for buf in (k_buf, v_buf))
        want_k, want_v = k_buf.clone(), v_buf.clone()
        want_k[slots[keep]], want_v[slots[keep]] = key[keep], value[keep]
        ops.store_kv(key, value, kc, vc, slots, backend=name, check_slots=False)
        assert torch.equal(k_buf, want_k) and torch.equal(v_buf, want_v), name
    if device.type == "cpu" and _ext.load() is not None:  # the C++ CPU twin raises instead
        kc, vc = randn(blocks, bs, heads, dim, seed=74), randn(blocks, bs, heads, dim, seed=75)
        with pytest.raises(ValueError, match=f"slot_mapping\\[1\\] = {num_slots}"):
            ops.store_kv(key, value, kc, vc, slots, backend="torch", check_slots=False)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_store_kv_rows_of_zero_elements_are_a_clear_error(backend):
    key, value = randn(3, 2, 0, seed=80), randn(3, 2, 0, seed=81)
    kc, vc = randn(5, 4, 2, 0, seed=82), randn(5, 4, 2, 0, seed=83)
    with pytest.raises(ValueError, match="store_kv: key has 0 elements per token row"):
        ops.store_kv(key, value, kc, vc, torch.tensor([0, 5, 9]), backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("blocks, block_size", [(0, 4), (5, 0)])
def test_store_kv_into_a_cache_without_slots_is_a_clear_error_on_every_backend(backend, blocks, block_size):
    # every slot skipped (-1): the reference and triton backends wrote nothing, the C++ twin raised its own error
    key, value = randn(2, 2, 8, seed=84), randn(2, 2, 8, seed=85)
    kc, vc = torch.zeros(blocks, block_size, 2, 8), torch.zeros(blocks, block_size, 2, 8)
    with pytest.raises(ValueError, match=r"store_kv: the cache has no slots \(num_blocks \* block_size = 0\)"):
        ops.store_kv(key, value, kc, vc, torch.tensor([-1, -1]), backend=backend)


@pytest.mark.skipif(_ext.load() is None or not _ext.build_info()["with_cuda"] or torch.cuda.is_available(),
                    reason="needs a CUDA-built extension on a machine without a GPU")
def test_cuda_build_imports_without_driver_and_says_so():
    ext = _ext.load()
    with pytest.raises(RuntimeError, match="CUDA"):
        ext.store_kv_cuda(1, 1, 1, 1, 1, 1, 4, 4, 4, 1, 0)


# ----------------------------------------------------------------------------------------------
# GPU checks at real sizes (skipped without CUDA). Each runs in well under a second of GPU time.

def _free_bytes():
    return torch.cuda.mem_get_info()[0]


def _gpu_backends():
    return [b for b in ("triton", "cuda") if b in backends.available("store_kv", "cuda")]


@pytest.mark.gpu
@pytest.mark.parametrize("offset", [0, 1, 2, 4], ids=["align16", "align2", "align4", "align8"])
def test_store_kv_bf16_strided_rows_every_alignment(offset):
    # Rows sliced out of a fused qkv buffer at an element offset: the CUDA kernel must drop from
    # 16-byte to 8/4/2-byte copies instead of issuing misaligned vector loads. bf16 is copied bit
    # for bit (the interpreter cannot run bf16, so this is its only check).
    heads, dim, n, blocks, bs = 8, 128, 257, 40, 16
    assert "triton" in _gpu_backends()
    for i, backend in enumerate(_gpu_backends()):
        qkv = randn(n, 3 * heads * dim + offset, seed=20 + i, dtype=torch.bfloat16, device="cuda")
        key = qkv[:, offset : offset + heads * dim].view(n, heads, dim)
        value = qkv[:, offset + heads * dim : offset + 2 * heads * dim].view(n, heads, dim)
        slots = torch.randperm(blocks * bs, generator=torch.Generator().manual_seed(i))[:n]
        slots[::5] = -1
        slots = slots.cuda()
        kc = poison(torch.empty(blocks, bs, heads, dim, dtype=torch.bfloat16, device="cuda"))
        vc = poison(torch.empty_like(kc))
        ek, ev = _expected(key, value, kc, vc, slots)
        ops.store_kv(key, value, kc, vc, slots, backend=backend)
        torch.cuda.synchronize()
        for got, want in ((kc, ek), (vc, ev)):
            assert torch.equal(got.isnan(), want.isnan()), (backend, offset)
            assert torch.equal(got.nan_to_num(), want.nan_to_num()), (backend, offset)


@pytest.mark.gpu
def test_store_kv_slots_past_2_31_elements():
    # A cache of more than 2^31 elements (8.6 GB bf16 for K and V): slot 2^21 of 1024-element rows
    # starts exactly at element 2^31, where 32-bit offset arithmetic wraps.
    heads, dim, bs = 8, 128, 16
    row = heads * dim
    first_big = 2**31 // row
    num_blocks = first_big // bs + 8
    cache_bytes = 2 * num_blocks * bs * row * 2
    if _free_bytes() < cache_bytes + 4 * 2**30:
        pytest.skip(f"needs {cache_bytes / 2**30 + 4:.0f} GiB free on the GPU")
    shape = (num_blocks, bs, heads, dim)
    kc = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    vc = torch.empty_like(kc)
    num_slots = num_blocks * bs
    slots = torch.tensor([num_slots - 1, first_big, first_big - 1, first_big + 77, 3, -1, num_slots - bs],
                         dtype=torch.long, device="cuda")
    n = slots.numel()
    key = randn(n, heads, dim, seed=31, dtype=torch.bfloat16, device="cuda")
    value = randn(n, heads, dim, seed=32, dtype=torch.bfloat16, device="cuda")
    keep = (slots >= 0).cpu()
    try:
        for backend in _gpu_backends():
            poison(kc), poison(vc)
            ops.store_kv(key, value, kc, vc, slots, backend=backend, check_slots=False)
            torch.cuda.synchronize()
            for cache, src in ((kc, key), (vc, value)):
                flat = cache.view(-1, heads, dim)
                assert torch.equal(flat[slots[keep.cuda()]], src[keep.cuda()]), backend
                # nothing else written (a wrapped offset would land somewhere below 2^31)
                written = sum(int((~chunk.isnan()).any(-1).sum()) for chunk in cache.view(-1, row).split(2**20))
                assert written == int(keep.sum()), backend
    finally:
        del kc, vc
        torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_store_kv_runs_on_the_cache_device_not_the_current_one():
    for backend in _gpu_backends():
        key, value, kc, vc, slots = _case(33, 4, 16, 12, 16, torch.float16, "cuda:1", seed=40)
        ek, ev = _expected(key, value, kc, vc, slots)
        with torch.cuda.device(0):
            ops.store_kv(key, value, kc, vc, slots, backend=backend)
        torch.cuda.synchronize(1)
        assert torch.equal(kc.nan_to_num(), ek.nan_to_num()) and torch.equal(vc.nan_to_num(), ev.nan_to_num())


@pytest.mark.gpu
def test_store_kv_cuda_op_passes_opcheck():
    # schema (declared mutations), fake-tensor impl and AOT dispatch: what torch.compile and CUDA
    # graphs rely on
    if "cuda" not in backends.available("store_kv", "cuda"):
        pytest.skip("r1fast._C was built without CUDA")
    from r1fast.ops.kv_cache import _store_kv_cuda_op

    key, value, kc, vc, slots = _case(9, 2, 16, 4, 4, torch.bfloat16, "cuda", seed=41)
    kc.normal_(), vc.normal_()
    torch.library.opcheck(_store_kv_cuda_op, (key, value, kc, vc, slots))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_store_kv_one_token_with_arbitrary_token_stride(backend):
    # One token: torch leaves the stride of dim 0 arbitrary (1 here, after a permute) and the rows are
    # still contiguous; the C++ twin must not read it as an overlapping token stride.
    key = randn(2, 8, 1, seed=60).permute(2, 0, 1)  # [1, 2, 8], strides (1, 8, 1)
    value = randn(2, 8, 1, seed=61).permute(2, 0, 1)
    assert key.is_contiguous() and key.stride(0) == 1
    kc = poison(torch.empty(3, 2, 2, 8))
    vc = poison(torch.empty(3, 2, 2, 8))
    slots = torch.tensor([3])
    ek, ev = _expected(key, value, kc, vc, slots)
    ops.store_kv(key, value, kc, vc, slots, backend=backend)
    assert torch.equal(kc.nan_to_num(), ek.nan_to_num()) and torch.equal(vc.nan_to_num(), ev.nan_to_num())
