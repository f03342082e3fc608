"""Checks shared by every public op (r1fast.ops.checks), run against each op in turn."""
import re

import numpy as np
import pytest
import torch

from r1fast import ops
from r1fast.rollout.params import SamplingParams

META = torch.device("meta")


def _decode(dev):
    cache = torch.zeros(4, 2, 1, 8, device=dev)
    return ops.paged_decode_attention(torch.zeros(2, 2, 8, device=dev), cache, cache.clone(),
                                      torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=dev),
                                      torch.tensor([3, 2], dtype=torch.int32, device=dev), backend="torch")


def _prefill(dev):
    cache = torch.zeros(4, 2, 1, 8, device=dev)
    return ops.paged_prefill_attention(torch.zeros(3, 2, 8, device=dev), cache, cache.clone(),
                                       torch.arange(3, device=dev), [3], [3], backend="torch")


def _store_kv(dev):
    cache = torch.zeros(4, 2, 1, 8, device=dev)
    return ops.store_kv(torch.zeros(2, 1, 8, device=dev), torch.zeros(2, 1, 8, device=dev), cache, cache.clone(),
                        torch.tensor([0, 3], device=dev))


def _logprob(dev, **kw):
    return ops.grouped_logprob(torch.zeros(2, 3, 8, device=dev), torch.zeros(16, 8, device=dev),
                               torch.zeros(2, 3, dtype=torch.long, device=dev), backend="torch", **kw)


def _loss_inputs(dev):
    return (torch.zeros(2, 3, device=dev), torch.zeros(2, 3, device=dev), None, torch.ones(2, device=dev),
            torch.ones(2, 3, dtype=torch.bool, device=dev))


def _fused(dev):
    return ops.fused_linear_grpo_loss(torch.zeros(2, 3, 8, device=dev), torch.zeros(16, 8, device=dev),
                                      torch.zeros(2, 3, dtype=torch.long, device=dev),
                                      torch.ones(2, 3, dtype=torch.bool, device=dev), torch.ones(2, device=dev),
                                      backend="torch")


def _sample(dev):
    return ops.sample_tokens(torch.zeros(2, 10, device=dev), SamplingParams(temperature=0.7),
                             torch.full((2,), 0.5, dtype=torch.float64, device=dev), backend="torch")


# each op's call, on a device, with its value checks on (the default)
VALUE_CHECKED = {
    "store_kv": _store_kv,
    "paged_decode_attention": _decode,
    "paged_decode_attention (reference)": lambda dev: ops.paged_decode_attention(
        torch.zeros(1, 1, 8, device=dev), torch.zeros(1, 2, 1, 8, device=dev), torch.zeros(1, 2, 1, 8, device=dev),
        torch.zeros(1, 1, dtype=torch.int32, device=dev), torch.ones(1, dtype=torch.int32, device=dev),
        backend="reference", check_bounds=False),
    "paged_prefill_attention": _prefill,
    "grouped_logprob": _logprob,
    "grouped_logprob (mask)": lambda dev: _logprob(dev, mask=torch.ones(2, 3, dtype=torch.bool, device=dev),
                                                   check_targets=False),
    "group_advantages": lambda dev: ops.group_advantages(torch.arange(4.0, device=dev), 2, backend="torch"),
    "grpo_loss": lambda dev: ops.grpo_loss(*_loss_inputs(dev), backend="torch"),
    "fused_linear_grpo_loss": _fused,
    "sample_tokens": _sample,
}


@pytest.mark.parametrize("op", list(VALUE_CHECKED))
def test_value_checks_of_meta_tensors_are_refused_naming_the_op(op):
    # meta tensors hold no values: torch's own 'Tensor.item() cannot be called on meta tensors' (or 'Cannot copy
    # out of meta tensor') named neither the op nor the check that read them
    VALUE_CHECKED[op](torch.device("cpu"))  # the same call runs on the CPU
    name = op.split(" ")[0]
    with pytest.raises(ValueError, match=rf"^{name}: the tensors are on the meta device, which holds shapes but no "
                                         rf"values, and .+ reads them"):
        VALUE_CHECKED[op](META)


def test_meta_tensors_still_run_where_no_value_is_read():
    # shape-only tracing: with the value checks off, the torch backends take meta tensors as before
    cache = torch.zeros(4, 2, 1, 8, device=META)
    out = ops.paged_decode_attention(torch.zeros(2, 2, 8, device=META), cache, cache,
                                     torch.zeros(2, 2, dtype=torch.int32, device=META),
                                     torch.ones(2, dtype=torch.int32, device=META), backend="torch", check_bounds=False)
    assert out.shape == (2, 2, 8) and out.is_meta
    out = ops.paged_prefill_attention(torch.zeros(3, 2, 8, device=META), cache, cache, torch.arange(3, device=META),
                                      [3], [3], backend="torch", check_bounds=False)
    assert out.shape == (3, 2, 8) and out.is_meta
    assert _logprob(META, check_targets=False).shape == (2, 3)
    loss, _ = ops.grpo_loss(*_loss_inputs(META), backend="torch", check_values=False)
    assert loss.is_meta
    tokens, _ = ops.sample_tokens(torch.zeros(2, 10, device=META), SamplingParams(temperature=0.7),
                                  torch.zeros(2, dtype=torch.float64, device=META), check_inputs=False)
    assert tokens.shape == (2,)


def _neg_view(t):
    """t's values in a tensor whose memory holds -t and whose neg bit negates it back: what the .imag of a
    conjugated complex tensor is (e.g. sin taken from torch.polar(...).conj())."""
    view = torch._neg_view(-t)
    assert view.is_neg() and torch.equal(view, t)
    return view


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rotary_inputs():
    angles = _rand(3, 4, seed=1).repeat(1, 2)
    return dict(q=_rand(3, 2, 8, seed=2), k=_rand(3, 1, 8, seed=3), cos=angles.cos(), sin=angles.sin())


def _decode_inputs():
    return dict(q=_rand(2, 2, 8, seed=4), k_cache=_rand(4, 2, 1, 8, seed=5), v_cache=_rand(4, 2, 1, 8, seed=6),
                block_tables=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
                context_lens=torch.tensor([3, 4], dtype=torch.int32))


def _loss_case():
    logp = -_rand(2, 3, seed=7).abs()
    return dict(logp=logp, old_logp=logp + 0.3 * _rand(2, 3, seed=8), ref_logp=logp + 0.1, advantages=_rand(2, seed=9),
                mask=torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]), entropy=_rand(2, 3, seed=10).abs())


# op, its inputs, the float ones to hand over as neg views (each in turn), and how to call it
NEG_CASES = [
    ("rms_norm", lambda: dict(x=_rand(3, 16, seed=11), weight=_rand(16, seed=12)), ("x", "weight"),
     lambda a, b: ops.rms_norm(a["x"], a["weight"], 1e-6, backend=b)),
    ("add_rms_norm", lambda: dict(x=_rand(3, 16, seed=13), r=_rand(3, 16, seed=14), w=_rand(16, seed=15)),
     ("x", "r", "w"), lambda a, b: ops.add_rms_norm(a["x"], a["r"], a["w"], 1e-6, backend=b)),
    ("swiglu", lambda: dict(g=_rand(3, 16, seed=16), u=_rand(3, 16, seed=17)), ("g", "u"),
     lambda a, b: ops.swiglu(a["g"], a["u"], backend=b)),
    ("rotary", _rotary_inputs, ("q", "k", "cos", "sin"), lambda a, b: ops.rotary(**a, backend=b)),
    ("paged_decode_attention", _decode_inputs, ("q", "k_cache", "v_cache"),
     lambda a, b: ops.paged_decode_attention(**a, backend=b)),
    ("grouped_logprob", lambda: dict(h=_rand(4, 8, seed=18), w=_rand(16, 8, seed=19)), ("h", "w"),
     lambda a, b: ops.grouped_logprob(a["h"], a["w"], torch.tensor([1, 5, 9, 15]), backend=b)),
    ("group_advantages", lambda: dict(r=_rand(4, seed=20)), ("r",), lambda a, b: ops.group_advantages(a["r"], 2, backend=b)),
    ("grpo_loss", _loss_case, ("logp", "old_logp", "ref_logp", "advantages", "mask", "entropy"),
     lambda a, b: ops.grpo_loss(a["logp"], a["old_logp"], a["ref_logp"], a["advantages"], a["mask"],
                                entropy=a["entropy"], beta=0.1, entropy_coef=0.01, backend=b)),
    ("fused_linear_grpo_loss", lambda: dict(h=_rand(2, 3, 8, seed=21), w=_rand(16, 8, seed=22), adv=_rand(2, seed=23)),
     ("h", "w", "adv"), lambda a, b: ops.fused_linear_grpo_loss(a["h"], a["w"], torch.tensor([[1, 2, 3], [4, 5, 6]]),
                                                               torch.ones(2, 3, dtype=torch.bool), a["adv"], backend=b)),
    ("sample_tokens", lambda: dict(logits=_rand(3, 10, seed=24)), ("logits",),
     lambda a, b: ops.sample_tokens(a["logits"], SamplingParams(temperature=0.7, min_p=0.05),
                                    torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), backend=b)),
]


def _flat(out):
    if isinstance(out, dict):
        return [v for k in sorted(out) for v in _flat(out[k])]
    if isinstance(out, (tuple, list)):
        return [v for x in out for v in _flat(x)]
    return [out]


@pytest.mark.parametrize("op, inputs, floats, call", NEG_CASES, ids=[c[0] for c in NEG_CASES])
def test_lazily_negated_inputs_give_their_values_on_every_backend(op, inputs, floats, call):
    # the Triton kernels read the memory, which holds a neg view's values unnegated: every result was
    # silently wrong (the torch and reference backends read through torch and were right)
    from r1fast import backends

    for backend in backends.available({"fused_linear_grpo_loss": "grouped_logprob"}.get(op, op), "cpu"):
        want = _flat(call(inputs(), backend))
        for name in floats:
            args = inputs()
            args[name] = _neg_view(args[name])
            for got, exp in zip(_flat(call(args, backend)), want):
                torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6, msg=f"{op} {backend} {name}")


@pytest.mark.parametrize("op, inputs, floats, call", NEG_CASES[:4], ids=[c[0] for c in NEG_CASES[:4]])
def test_layer_ops_trace_into_one_compiled_graph(op, inputs, floats, call):
    # the decoder's layer ops under torch.compile: asking each input for its neg bit (Tensor.is_neg()) is a
    # graph break in dynamo, so fullgraph=True failed and a compiled model broke its graph at every one of them
    torch._dynamo.reset()
    args = inputs()
    compiled = torch.compile(lambda a: call(a, "torch"), backend="eager", fullgraph=True)
    for got, want in zip(_flat(compiled(args)), _flat(call(args, "torch"))):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=op)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_store_kv_refuses_a_lazily_negated_cache(backend):
    # written in place: the C++ twin and the Triton kernel wrote the memory, which the view reads negated
    key, value = _rand(2, 1, 8, seed=25), _rand(2, 1, 8, seed=26)
    for which in ("k_cache", "v_cache"):
        caches = {"k_cache": torch.zeros(2, 2, 1, 8), "v_cache": torch.zeros(2, 2, 1, 8)}
        caches[which] = torch._neg_view(caches[which])
        with pytest.raises(ValueError, match="store_kv: k_cache/v_cache is a lazily negated view"):
            ops.store_kv(key, value, **caches, slot_mapping=torch.tensor([0, 3]), backend=backend)


SPARSE_CASES = NEG_CASES + [
    ("kl_penalty", lambda: dict(a=-_rand(2, 3, seed=27).abs(), b=-_rand(2, 3, seed=28).abs()), ("a", "b"),
     lambda a, b: ops.kl_penalty(a["a"], a["b"])),
    ("store_kv", lambda: dict(key=_rand(2, 1, 8, seed=29), value=_rand(2, 1, 8, seed=30)), ("key", "value"),
     lambda a, b: ops.store_kv(a["key"], a["value"], torch.zeros(2, 2, 1, 8), torch.zeros(2, 2, 1, 8),
                               torch.tensor([0, 3]), backend=b)),
]


@pytest.mark.parametrize("op, inputs, names, call", SPARSE_CASES, ids=[c[0] for c in SPARSE_CASES])
def test_sparse_inputs_are_refused_naming_the_tensor(op, inputs, names, call):
    # torch's "Could not run 'aten::ne.Scalar' with arguments from the 'SparseCPU' backend" (or "reshape is not
    # implemented for sparse tensors") from deep inside named neither the op nor the argument
    call(inputs(), "torch" if op != "kl_penalty" else None)
    for name in names:
        args = inputs()
        args[name] = args[name].to_sparse()
        with pytest.raises(TypeError, match=rf"^{op}: \w+ must be a dense \(strided\) tensor, got layout "
                                            rf"torch.sparse_coo"):
            call(args, "torch" if op != "kl_penalty" else None)


# (op, flag) -> the op's call with that keyword; each flag's default first runs as is
FLAG_CASES = {
    ("grouped_logprob", "return_entropy"): lambda **kw: _logprob(torch.device("cpu"), **kw),
    ("grouped_logprob", "return_argmax_hit"): lambda **kw: _logprob(torch.device("cpu"), **kw),
    ("grouped_logprob", "forward_only"): lambda **kw: _logprob(torch.device("cpu"), **kw),
    ("grouped_logprob", "check_targets"): lambda **kw: _logprob(torch.device("cpu"), **kw),
    ("grpo_loss", "check_values"): lambda **kw: ops.grpo_loss(*_loss_inputs("cpu"), backend="torch", **kw),
    ("grpo_loss", "row_stats"): lambda **kw: ops.grpo_loss(*_loss_inputs("cpu"), backend="torch", **kw),
    ("fused_linear_grpo_loss", "single_pass"): lambda **kw: ops.fused_linear_grpo_loss(
        torch.zeros(2, 3, 8), torch.zeros(16, 8), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool),
        torch.ones(2), backend="torch", **kw),
    ("fused_linear_grpo_loss", "row_stats"): lambda **kw: ops.fused_linear_grpo_loss(
        torch.zeros(2, 3, 8), torch.zeros(16, 8), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool),
        torch.ones(2), backend="torch", **kw),
    ("paged_decode_attention", "check_bounds"): lambda **kw: ops.paged_decode_attention(
        torch.zeros(2, 2, 8), torch.zeros(4, 2, 1, 8), torch.zeros(4, 2, 1, 8),
        torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), torch.tensor([3, 2], dtype=torch.int32), backend="torch", **kw),
    ("paged_prefill_attention", "check_bounds"): lambda **kw: ops.paged_prefill_attention(
        torch.zeros(3, 2, 8), torch.zeros(4, 2, 1, 8), torch.zeros(4, 2, 1, 8), torch.arange(3), [3], [3],
        backend="torch", **kw),
    ("store_kv", "check_slots"): lambda **kw: ops.store_kv(
        torch.zeros(2, 1, 8), torch.zeros(2, 1, 8), torch.zeros(4, 2, 1, 8), torch.zeros(4, 2, 1, 8),
        torch.tensor([0, 3]), **kw),
    ("sample_tokens", "check_inputs"): lambda **kw: ops.sample_tokens(
        torch.zeros(2, 10), SamplingParams(temperature=0.7), torch.full((2,), 0.5, dtype=torch.float64),
        backend="torch", **kw),
}


@pytest.mark.parametrize("op, flag", list(FLAG_CASES), ids=[f"{op}-{flag}" for op, flag in FLAG_CASES])
@pytest.mark.parametrize("value", ["no", "False", 0, 1, None, torch.tensor(True)], ids=repr)
def test_a_flag_that_is_not_true_or_false_is_refused_naming_it(op, flag, value):
    # Read as truthy, the string 'no' (or 'False') turned a flag on: grouped_logprob(return_entropy='no') returned
    # (logp, entropy) where the caller unpacked one tensor, store_kv(check_slots='') skipped the bounds check
    FLAG_CASES[op, flag](**{flag: True})
    FLAG_CASES[op, flag](**{flag: False})
    with pytest.raises(TypeError, match=rf"^{op}: {flag} must be True or False, got {re.escape(repr(value))}$"):
        FLAG_CASES[op, flag](**{flag: value})


def _same_result(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same_result, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_result(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("op, flag", list(FLAG_CASES), ids=[f"{op}-{flag}" for op, flag in FLAG_CASES])
def test_a_numpy_bool_flag_acts_as_the_bool_it_holds(op, flag):
    # a flag read off a numpy array (np.True_) was refused as "must be True or False, got np.True_"
    for value in (True, False):
        assert _same_result(FLAG_CASES[op, flag](**{flag: np.bool_(value)}), FLAG_CASES[op, flag](**{flag: value}))


def test_flags_hands_back_plain_bools():
    from r1fast.ops.checks import flags

    got = flags("op", a=np.True_, b=np.False_, c=True)
    assert got == (True, False, True) and all(type(v) is bool for v in got)


def test_the_cuda_kernels_custom_ops_refuse_cpu_tensors_naming_the_op():
    # torch.ops.r1fast.*_cuda are reachable by name; handed CPU tensors that pass every other check, they failed in
    # torch.cuda.device() with "Expected a cuda device, but got: cpu", naming neither the op nor the tensors
    g = torch.Generator().manual_seed(47)
    key, value = torch.randn(2, 1, 8, generator=g), torch.randn(2, 1, 8, generator=g)
    k_cache, v_cache = torch.zeros(4, 2, 1, 8), torch.zeros(4, 2, 1, 8)
    with pytest.raises(ValueError, match=r"^store_kv: the cuda kernel \(torch.ops.r1fast.store_kv_cuda\) takes CUDA "
                                         r"tensors, got tensors on cpu"):
        torch.ops.r1fast.store_kv_cuda(key, value, k_cache, v_cache, torch.tensor([0, 5]))
    assert not k_cache.any() and not v_cache.any()
    q = torch.randn(2, 2, 8, generator=g)
    tables, lens = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), torch.tensor([3, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^paged_decode_attention: the cuda kernel "
                                         r"\(torch.ops.r1fast.paged_decode_attention_cuda\) takes CUDA tensors"):
        torch.ops.r1fast.paged_decode_attention_cuda(q, k_cache, v_cache, tables, lens, 0.3, 1, 4)
    # the same tensors through the public ops pick a CPU backend
    ops.store_kv(key, value, k_cache, v_cache, torch.tensor([0, 5]))
    torch.testing.assert_close(k_cache.view(8, 1, 8)[[0, 5]], key, rtol=0, atol=0)
