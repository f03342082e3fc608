"""ops.store_kv: write new K/V rows into the paged KV cache.

Cache layout (every backend): k_cache, v_cache are [num_blocks, block_size, num_kv_heads, head_dim],
contiguous; token slot = block_id * block_size + offset_in_block; slot -1 means skip.
"""
from __future__ import annotations

import torch

from r1fast import _ext, backends
from r1fast.ops.checks import cuda_tensors, flags, one_device, readable, require_tensors
from r1fast.reference import kv_cache as reference


def _validate(key, value, k_cache, v_cache, slot_mapping, check_slots: bool):
    tensors = {"key": key, "value": value, "k_cache": k_cache, "v_cache": v_cache, "slot_mapping": slot_mapping}
    require_tensors("store_kv", **tensors)
    if key.dim() != 3:
        raise ValueError(f"store_kv: key must be [num_tokens, num_kv_heads, head_dim], got shape {tuple(key.shape)}")
    if value.shape != key.shape:
        raise ValueError(f"store_kv: value shape {tuple(value.shape)} != key shape {tuple(key.shape)}")
    if k_cache.dim() != 4 or k_cache.shape[2:] != key.shape[1:]:
        raise ValueError(
            f"store_kv: k_cache must be [num_blocks, block_size, {key.shape[1]}, {key.shape[2]}], "
            f"got {tuple(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"store_kv: v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    if key.shape[1] * key.shape[2] == 0:  # nothing to copy per token, and the kernels divide by the row size
        raise ValueError(f"store_kv: key has 0 elements per token row (num_kv_heads * head_dim), got shape "
                         f"{tuple(key.shape)}")
    if k_cache.shape[0] * k_cache.shape[1] == 0:  # r1fast._C refuses it (the torch and cuda backends), the others took it
        raise ValueError(f"store_kv: the cache has no slots (num_blocks * block_size = 0), got k_cache shape "
                         f"{tuple(k_cache.shape)}")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(
            f"store_kv: slot_mapping must be [num_tokens={key.shape[0]}], got shape {tuple(slot_mapping.shape)}"
        )
    if slot_mapping.dtype != torch.int64:
        raise ValueError(f"store_kv: slot_mapping must be int64, got {slot_mapping.dtype}")
    dtypes = {key.dtype, value.dtype, k_cache.dtype, v_cache.dtype}
    if len(dtypes) != 1 or not key.dtype.is_floating_point:
        raise ValueError(
            f"store_kv: key, value, k_cache, v_cache must share a float dtype, got "
            f"{key.dtype}, {value.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    if key.is_neg() or value.is_neg():  # a lazy negation: the memory does not hold the values
        raise ValueError("store_kv: key/value is a lazily negated view; pass .resolve_neg() of it")
    if k_cache.is_neg() or v_cache.is_neg():  # written in place: a resolved copy would take the writes
        raise ValueError("store_kv: k_cache/v_cache is a lazily negated view, whose memory holds the values "
                         "unnegated; the kernels write it directly: allocate the cache as a plain tensor")
    one_device("store_kv", tensors.values())
    readable("store_kv", k_cache, "the copy into the cache")
    for name in ("key", "value"):
        t = tensors[name]
        if t.shape[0] > 0 and not (t[0].is_contiguous()):
            raise ValueError(f"store_kv: each token's row of {name} must be contiguous (stride {t.stride()})")
        if t.shape[0] > 1 and t.stride(0) < t[0].numel():
            raise ValueError(f"store_kv: the token rows of {name} overlap (stride {t.stride()}, e.g. an expand()); "
                             f"pass {name}.contiguous()")
    for name in ("k_cache", "v_cache", "slot_mapping"):
        if not tensors[name].is_contiguous():
            raise ValueError(f"store_kv: {name} must be contiguous")
    if check_slots and slot_mapping.numel():
        num_slots = k_cache.shape[0] * k_cache.shape[1]
        lo, hi = int(slot_mapping.min()), int(slot_mapping.max())
        if lo < -1 or hi >= num_slots:
            raise ValueError(f"store_kv: slot_mapping values must lie in [-1, {num_slots}), got min {lo}, max {hi}")



def _row_and_strides(key, value):
    """(row bytes, key token stride bytes, value token stride bytes) for r1fast._C. With one token the
    stride of dim 0 is never used, and torch leaves it arbitrary (e.g. 1 after a permute): pass the row."""
    es = key.element_size()
    row = key.shape[1] * key.shape[2] * es
    if key.shape[0] <= 1:
        return row, row, row
    return row, key.stride(0) * es, value.stride(0) * es


@backends.register("store_kv", "reference")
def _store_kv_reference(key, value, k_cache, v_cache, slot_mapping):
    reference.store_kv(key, value, k_cache, v_cache, slot_mapping)


@backends.register("store_kv", "torch")
def _store_kv_torch(key, value, k_cache, v_cache, slot_mapping):
    if k_cache.device.type == "cpu" and _ext.load() is not None:
        ext = _ext.load()
        row, ks, vs = _row_and_strides(key, value)
        ext.store_kv_cpu(key.data_ptr(), value.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                         slot_mapping.data_ptr(), key.shape[0], row, ks, vs, k_cache.shape[0] * k_cache.shape[1])
    else:
        reference.store_kv(key, value, k_cache, v_cache, slot_mapping)


@backends.register("store_kv", "triton")
def _store_kv_triton(key, value, k_cache, v_cache, slot_mapping):
    from r1fast.kernels import kv_cache as kernel

    with backends.on_device(k_cache.device):
        kernel.store_kv(key, value, k_cache, v_cache, slot_mapping)


@torch.library.custom_op("r1fast::store_kv_cuda", mutates_args=("k_cache", "v_cache"))
def _store_kv_cuda_op(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    # reachable as torch.ops.r1fast.store_kv_cuda: nothing reaches the pointers unchecked (slot values
    # too: the kernel skips an out-of-range slot)
    _validate(key, value, k_cache, v_cache, slot_mapping, check_slots=False)
    cuda_tensors("store_kv", k_cache.device)
    ext = _ext.require()
    row, ks, vs = _row_and_strides(key, value)
    # The extension launches on the current device with the stream given: both must be the cache's.
    with torch.cuda.device(k_cache.device):
        stream = torch.cuda.current_stream(k_cache.device).cuda_stream
        ext.store_kv_cuda(key.data_ptr(), value.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                          slot_mapping.data_ptr(), key.shape[0], row, ks, vs, k_cache.shape[0] * k_cache.shape[1],
                          stream)


@_store_kv_cuda_op.register_fake
def _(key, value, k_cache, v_cache, slot_mapping):
    return None


@backends.register("store_kv", "cuda")
def _store_kv_cuda(key, value, k_cache, v_cache, slot_mapping):
    _store_kv_cuda_op(key, value, k_cache, v_cache, slot_mapping)


def _refuse_grad(key, value, k_cache, v_cache):
    """The cache is written in place and carries no gradient. A cache that requires grad got torch's
    in-place-on-a-leaf error from the reference and a silent write (no version bump) from the others; a
    key/value that requires grad joined the cache to the graph on the reference only."""
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.requires_grad:
            raise ValueError(f"store_kv: {name} requires grad; the KV cache is written in place and carries no "
                             f"gradient: allocate it without requires_grad")
    if torch.is_grad_enabled() and (key.requires_grad or value.requires_grad):
        raise ValueError("store_kv: key/value require grad, but the cache they are copied into carries no "
                         "gradient: run under torch.no_grad() or pass key.detach(), value.detach()")


def store_kv(key, value, k_cache, v_cache, slot_mapping, *, backend: str | None = None, check_slots: bool = True):
    """Copy key/value rows [N, num_kv_heads, head_dim] into the cache slots given by slot_mapping [N] (int64).

    `check_slots=False` skips the bounds check of the slot values (one device sync); the rollout engine
    uses it for mappings it built itself and checked once per step. A slot outside [-1, num_blocks *
    block_size) is then skipped like -1 (nothing written) by the CUDA and Triton kernels; the C++ CPU
    twin still raises, and so does the reference's indexing on a slot past the cache.
    """
    check_slots, = flags("store_kv", check_slots=check_slots)
    _validate(key, value, k_cache, v_cache, slot_mapping, check_slots)
    _refuse_grad(key, value, k_cache, v_cache)
    _, fn = backends.resolve("store_kv", k_cache.device, backend)
    fn(key, value, k_cache, v_cache, slot_mapping)
