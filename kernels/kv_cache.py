"""Triton store_kv: scatter new K/V rows into the paged cache (layout in csrc/kv_cache.h)."""
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     key_stride, value_stride, row_size, num_slots,
                     BLOCK: tl.constexpr):
    # int64 before any multiply: token * stride and slot * row pass 2^31 elements in real caches.
    token = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    slot = tl.load(slot_ptr + token)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    # A negative slot (-1: skip) or one past the cache shrinks the row to nothing, as in the CUDA
    # kernel: with check_slots=False nothing else stands between a bad slot and a write outside the
    # cache. (Written this way because the interpreter rejects a tensor mask combined with a scalar
    # condition.)
    mask = offs < tl.where((slot >= 0) & (slot < num_slots), row_size, 0)
    k = tl.load(key_ptr + token * key_stride + offs, mask=mask)
    v = tl.load(value_ptr + token * value_stride + offs, mask=mask)
    dst = slot.to(tl.int64) * row_size + offs
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


def store_kv(key, value, k_cache, v_cache, slot_mapping):
    """key/value: [N, heads, dim] with contiguous rows; caches contiguous; slot_mapping int64 [N].
    Tokens whose slot lies outside [0, num_blocks * block_size) are skipped."""
    n = key.shape[0]
    if n == 0:
        return
    row = key.shape[1] * key.shape[2]
    block = min(1024, triton.next_power_of_2(row))
    grid = (n, triton.cdiv(row, block))
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    _store_kv_kernel[grid](key, value, k_cache, v_cache, slot_mapping,
                           key.stride(0), value.stride(0), row, num_slots, BLOCK=block)
