"""The engine's start-up check of its decode kernels: a backend that disagrees with the float64
reference (or cannot run) is not used; the next candidate, or torch, is."""
import logging

import pytest
import torch

from r1fast import backends
from r1fast.rollout.self_check import decode_seconds, select_backends, shared_prefix_ok

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


def test_a_backend_wrong_only_with_split_k_is_skipped(monkeypatch, caplog):
    # the check runs one split and several: a kernel whose partition merge is broken is caught too
    impls = backends.implementations("paged_decode_attention")
    good = impls["triton"]

    def bad_merge(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, *rest):
        out = good(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, *rest)
        return out if num_splits == 1 else out * 1.01
    monkeypatch.setitem(impls, "triton", bad_merge)
    with caplog.at_level(logging.WARNING):
        chosen = select_backends("cpu", torch.float32, **SHAPES,
                                 candidates={"paged_decode_attention": ["triton"], "store_kv": ["torch"]})
    assert chosen["paged_decode_attention"] == "torch"
    assert "triton backend disagrees with the reference" in caplog.text


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
                seconds = decode_seconds(name, "cuda", dtype, 12, 2, 128, batch=64)
                assert 0 < seconds < 0.01, f"{name}: {seconds} s per decode call"  # graph replay and events work
    names = [b for b in ("cuda", "triton") if b in backends.available("paged_decode_attention", "cuda")]
    chosen = select_backends("cuda", dtype, num_heads=12, num_kv_heads=2, head_dim=128, timing_batch=64)
    assert chosen["paged_decode_attention"] in names


def test_the_faster_of_two_correct_decode_backends_is_chosen(monkeypatch, caplog):
    from r1fast.rollout import self_check

    times = {"triton": 3e-5, "torch": 2e-5, "reference": 9e-5}
    timed = []

    def fake_seconds(name, device, dtype, *shape, batch):
        timed.append((name, batch))
        return times[name]
    monkeypatch.setattr(self_check, "decode_seconds", fake_seconds)
    cands = {"paged_decode_attention": ["triton", "torch", "reference"], "store_kv": ["torch"]}
    with caplog.at_level(logging.INFO, logger="r1fast.rollout.self_check"):
        chosen = select_backends("cpu", torch.float32, **SHAPES, candidates=cands, timing_batch=48)
    assert chosen["paged_decode_attention"] == "torch"
    assert timed == [("triton", 48), ("torch", 48), ("reference", 48)]
    assert "triton 30.0 us, torch 20.0 us, reference 90.0 us; using torch" in caplog.text
    times["triton"] = 2e-5  # a tie keeps the preferred (earlier) one
    assert select_backends("cpu", torch.float32, **SHAPES, candidates=cands,
                           timing_batch=48)["paged_decode_attention"] == "triton"
    timed.clear()  # without timing_batch: the first correct one, nothing timed
    assert select_backends("cpu", torch.float32, **SHAPES, candidates=cands)["paged_decode_attention"] == "triton"
    assert timed == []


def test_a_failed_timing_keeps_the_preferred_backend(monkeypatch, caplog):
    from r1fast.rollout import self_check

    def fails(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(self_check, "decode_seconds", fails)
    with caplog.at_level(logging.WARNING):
        chosen = select_backends("cpu", torch.float32, **SHAPES, timing_batch=8,
                                 candidates={"paged_decode_attention": ["torch", "reference"], "store_kv": ["torch"]})
    assert chosen["paged_decode_attention"] == "torch"
    assert "timing torch and reference on cpu failed (RuntimeError: operation not permitted" in caplog.text


def test_decode_timing_runs_the_backend_at_the_asked_shape(monkeypatch):
    from r1fast.rollout import self_check

    impls, seen = backends.implementations("paged_decode_attention"), []
    real = impls["torch"]

    def spy(q, k_cache, v_cache, block_tables, context_lens, *rest):
        seen.append((tuple(q.shape), tuple(k_cache.shape), context_lens.tolist()))
        return real(q, k_cache, v_cache, block_tables, context_lens, *rest)
    monkeypatch.setitem(impls, "torch", spy)
    s = self_check.decode_seconds("torch", "cpu", torch.float32, 6, 2, 32, batch=3, context=40, repeats=2)
    assert 0 < s < 1
    assert len(seen) == 2 * 4  # a warm-up, then three rounds, of `repeats` calls each
    assert seen[0] == ((3, 6, 32), (3 * 3, 16, 2, 32), [40, 40, 40])
    monkeypatch.setattr(self_check, "_TIMING_BYTES", 3 * 20 * 2 * 2 * 32 * 4)  # room for 20 tokens a row
    seen.clear()
    self_check.decode_seconds("torch", "cpu", torch.float32, 6, 2, 32, batch=3, context=40, repeats=1)
    assert seen[0][2] == [20, 20, 20]


def test_the_cuda_decode_kernel_is_not_tried_on_shapes_it_cannot_take(monkeypatch, caplog):
    impls = backends.implementations("paged_decode_attention")

    def cuda_stand_in(*args):
        raise AssertionError("called")
    monkeypatch.setitem(impls, "cuda", cuda_stand_in)
    real_available = backends.backend_available
    monkeypatch.setattr(backends, "backend_available",
                        lambda b, d: (True, "") if b == "cuda" else real_available(b, d))
    with caplog.at_level(logging.WARNING):
        chosen = select_backends("cpu", torch.float32, num_heads=6, num_kv_heads=2, head_dim=12)
    assert "paged_decode_attention: the cuda" not in caplog.text and chosen["paged_decode_attention"] != "cuda"
    with caplog.at_level(logging.WARNING):  # a shape it takes is tried (and this stand-in fails its check)
        select_backends("cpu", torch.float32, num_heads=6, num_kv_heads=2, head_dim=16)
    assert "paged_decode_attention: the cuda backend fails its start-up check" in caplog.text
