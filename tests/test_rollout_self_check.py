"""The engine's start-up check of its decode kernels: a backend that disagrees with the float64
reference (or cannot run) is not used; the next candidate, or torch, is."""
import logging

import pytest
import torch

from r1fast import backends
from r1fast.rollout.self_check import select_backends, shared_prefix_ok

SHAPES = dict(num_heads=6, num_kv_heads=2, head_dim=32)


def test_a_correct_backend_is_chosen():
    chosen = select_backends("cpu", torch.float32, **SHAPES,
                             candidates={"paged_decode_attention": ["triton"], "store_kv": ["triton"]})
    assert chosen == {"paged_decode_attention": "triton", "store_kv": "triton"}


def test_a_wrong_or_failing_backend_is_skipped_with_a_warning(monkeypatch, caplog):
    impls = backends.implementations("paged_decode_attention")
    good = impls["triton"]

    def off_by_a_bit(*args):  # e.g. a kernel that drops the last partition on this card
        return good(*args) * 1.01

    def crashes(*args):
        raise RuntimeError("an illegal memory access was encountered")
    monkeypatch.setitem(impls, "triton", off_by_a_bit)
    monkeypatch.setitem(impls, "cuda", crashes)
    store = backends.implementations("store_kv")

    def writes_nothing(key, value, k_cache, v_cache, slots):
        return None
    monkeypatch.setitem(store, "triton", writes_nothing)
    monkeypatch.setattr(backends, "backend_available", lambda b, d: (True, ""))  # "cuda" runs here too
    with caplog.at_level(logging.WARNING):
        chosen = select_backends("cpu", torch.float32, **SHAPES,
                                 candidates={"paged_decode_attention": ["cuda", "triton", "torch"],
                                             "store_kv": ["triton"]})
    assert chosen == {"paged_decode_attention": "torch", "store_kv": "torch"}
    text = caplog.text
    assert "cuda backend fails its start-up check" in text and "illegal memory access" in text
    assert "triton backend disagrees with the reference" in text
    assert "store_kv: the triton backend disagrees" in text


def test_the_shared_prefix_path_is_checked_on_its_own(monkeypatch, caplog):
    assert shared_prefix_ok("triton", "cpu", torch.float32, **SHAPES)
    impls = backends.implementations("paged_decode_attention")
    good = impls["triton"]

    def prefix_dropped(*args):  # right without tiles, wrong with them
        out = good(*args)
        return out if args[-1] is None else out * 0.99
    monkeypatch.setitem(impls, "triton", prefix_dropped)
    with caplog.at_level(logging.WARNING):
        assert not shared_prefix_ok("triton", "cpu", torch.float32, **SHAPES)
    assert "shared-prefix path disagrees" in caplog.text
    assert select_backends("cpu", torch.float32, **SHAPES, candidates={"paged_decode_attention": ["triton"],
                                                                       "store_kv": ["torch"]}) == \
        {"paged_decode_attention": "triton", "store_kv": "torch"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_tolerance_accepts_the_torch_backend(dtype):
    chosen = select_backends("cpu", dtype, **SHAPES, candidates={"paged_decode_attention": ["torch"],
                                                                 "store_kv": ["torch"]})
    assert chosen == {"paged_decode_attention": "torch", "store_kv": "torch"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_kernels_pass_their_start_up_check(dtype):
    """On the card: the CUDA C++ kernels (when built) and the Triton ones agree with the reference,
    so the engine decodes with its fastest backends (Qwen2.5-1.5B's heads)."""
    for op in ("paged_decode_attention", "store_kv"):
        for name in [b for b in ("cuda", "triton") if b in backends.available(op, "cuda")]:
            chosen = select_backends("cuda", dtype, num_heads=12, num_kv_heads=2, head_dim=128,
                                     candidates={op: [name]})
            assert chosen[op] == name, f"{op}: the {name} backend fails its check on {torch.cuda.get_device_name()}"
            if op == "paged_decode_attention":
                assert shared_prefix_ok(name, "cuda", dtype, num_heads=12, num_kv_heads=2, head_dim=128)
