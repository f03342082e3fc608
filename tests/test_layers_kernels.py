"""ops.rms_norm, ops.add_rms_norm, ops.swiglu and ops.rotary: every backend against the float64 reference, forward and backward.

On the CPU the triton backend runs under the interpreter in fp32 (small shapes; widths past the
interpreter's 64-wide block walk the row in several blocks); the gpu-marked tests run bf16/fp16 at
Qwen2.5-1.5B sizes against the low-precision rule, and check the bit-equality the kernels claim.
"""
import pytest
import torch
import torch.nn.functional as F

from r1fast import backends, ops
from r1fast.reference import layers as reference
from r1fast.testing import assert_close, assert_within_lowp_rule, randn

CPU_BACKENDS = ("torch", "triton")


@pytest.fixture
def poisoned_alloc(monkeypatch):
    """Every torch.empty / empty_like while the test runs comes back NaN-filled: an output element
    (or a dw partial row) a kernel forgets to write shows up as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def nan_empty_like(*args, **kwargs):
        t = empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)


def _grads(fn, inputs, cotangent):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return (out, *torch.autograd.grad(out, leaves, cotangent))


def _rms_case(shape, seed, scale=1.0):
    x = randn(*shape, dtype=torch.float64, seed=seed, scale=scale)
    w = 1.0 + randn(shape[-1], dtype=torch.float64, seed=seed + 1, scale=0.5)  # random, never all ones
    dy = randn(*shape, dtype=torch.float64, seed=seed + 2)
    return x, w, dy


# (shape, eps, scale of x): odd widths, one row, rows walked in several blocks under the interpreter
# (widths past 64 go in 32-wide blocks: 200 is seven, the last partial; 11 rows over 3 programs),
# Qwen3's per-head norm [T, heads, head_dim], 16-row tiles with several tiles per program, a width
# of one (large eps: at H = 1 dx is eps-dominated and cancels), large and small magnitudes, and a
# large eps on a row walked in blocks (the multi-block path adds eps on its own).
RMS_CASES = [((5, 37), 1e-6, 1.0), ((1, 53), 1e-6, 1.0), ((11, 200), 1e-6, 1.0), ((6, 3, 16), 1e-6, 1.0),
             ((100, 8), 1e-5, 1.0), ((4, 1), 0.5, 1.0), ((3, 70), 1e-6, 1e4), ((7, 24), 1e-6, 1e-2),
             ((5, 130), 0.3, 1.0)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape, eps, scale", RMS_CASES)
def test_rms_norm_matches_reference(device, poisoned_alloc, backend, shape, eps, scale):
    x, w, dy = _rms_case(shape, seed=len(shape) * 100 + shape[-1], scale=scale)
    e_out, e_dx, e_dw = _grads(lambda a, b: reference.rms_norm(a, b, eps), (x, w), dy)
    out, dx, dw = _grads(lambda a, b: ops.rms_norm(a, b, eps, backend=backend),
                         (x.float().to(device), w.float().to(device)), dy.float().to(device))
    assert out.dtype == dx.dtype == dw.dtype == torch.float32
    for a, e, name in ((out, e_out, "out"), (dx, e_dx, "dx"), (dw, e_dw, "dweight")):
        assert_close(a, e, torch.float32, rtol=2e-5, atol=1e-6, name=f"{backend} {name}")


def _add_rms_reference(x, r, w, eps):
    s = x + r
    return reference.rms_norm(s, w, eps), s


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape, eps, scale", RMS_CASES)
@pytest.mark.parametrize("sum_used", [True, False], ids=["sum_used", "sum_unused"])
def test_add_rms_norm_matches_reference(device, poisoned_alloc, backend, shape, eps, scale, sum_used):
    """Gradients of x, residual and weight, with the sum's own gradient (the residual stream going
    on) or without it (the final norm)."""
    x, w, dy = _rms_case(shape, seed=len(shape) * 100 + shape[-1] + 7, scale=scale)
    r = randn(*shape, dtype=torch.float64, seed=shape[-1] + 11, scale=scale)
    ds = randn(*shape, dtype=torch.float64, seed=shape[-1] + 13)

    def grads(fn, inputs, dy, ds):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out, s = fn(*leaves)
        outs, cots = ((out, s), (dy, ds)) if sum_used else ((out,), (dy,))
        return (out, s, *torch.autograd.grad(outs, leaves, cots))

    expect = grads(lambda a, b, c: _add_rms_reference(a, b, c, eps), (x, r, w), dy, ds)
    f = lambda t: t.float().to(device)  # noqa: E731
    got = grads(lambda a, b, c: ops.add_rms_norm(a, b, c, eps, backend=backend), (f(x), f(r), f(w)), f(dy), f(ds))
    for a, e, name in zip(got, expect, ("out", "sum", "dx", "dresidual", "dweight")):
        assert a.dtype == torch.float32
        assert_close(a, e, torch.float32, rtol=2e-5, atol=1e-6, name=f"{backend} {name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_add_rms_norm_gradient_through_the_sum_alone(device, poisoned_alloc, backend):
    """Only the sum reaches the loss (the norm's output is discarded): the Triton backward gets no
    gradient for the norm (None, not zeros) and must still pass the sum's to x and the residual."""
    x, w, _ = _rms_case((6, 40), seed=71)
    r = randn(6, 40, dtype=torch.float64, seed=72)
    ds = randn(6, 40, dtype=torch.float64, seed=73)
    f = lambda t: t.float().to(device).requires_grad_()  # noqa: E731
    xs, rs, ws = f(x), f(r), f(w)
    _, s = ops.add_rms_norm(xs, rs, ws, 1e-6, backend=backend)
    dx, dr, dw = torch.autograd.grad(s, (xs, rs, ws), ds.float().to(device), allow_unused=True)
    assert_close(dx, ds, torch.float32, name=f"{backend} dx")
    assert_close(dr, ds, torch.float32, name=f"{backend} dresidual")
    assert dw is None or not dw.any()


def test_add_rms_norm_fp16_sum_rounds_like_torch(device):
    """fp16 (the interpreter has no bf16): the sum is torch's x + r exactly; the norm and the
    gradients meet the low-precision rule against the float64 reference."""
    x, w, dy = _rms_case((8, 96), seed=33)
    r = randn(8, 96, dtype=torch.float64, seed=34)
    ds = randn(8, 96, dtype=torch.float64, seed=35)

    def grads(fn, inputs):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out, s = fn(*leaves)
        cots = (dy.to(out.device, out.dtype), ds.to(out.device, out.dtype))  # float64 CPU tensors: cast and move
        return (out, s, *torch.autograd.grad((out, s), leaves, cots))

    expect = grads(lambda a, b, c: _add_rms_reference(a, b, c, 1e-6), (x, r, w))
    h = lambda t: t.half().to(device)  # noqa: E731
    lowp = grads(lambda a, b, c: ops.add_rms_norm(a, b, c, 1e-6, backend="torch"), (h(x), h(r), h(w)))
    got = grads(lambda a, b, c: ops.add_rms_norm(a, b, c, 1e-6, backend="triton"), (h(x), h(r), h(w)))
    assert torch.equal(got[1], lowp[1]), "x + residual differs from torch's"
    # the norm is taken of the rounded sum: exactly the fused RMSNorm of torch's x + r
    assert torch.equal(got[0], ops.rms_norm(lowp[1].detach(), h(w), 1e-6, backend="triton"))
    for k, l, e, name in zip(got, lowp, expect, ("out", "sum", "dx", "dresidual", "dweight")):
        assert k.dtype == torch.float16
        assert_within_lowp_rule(k, l, e, name=f"add_rms_norm fp16 {name}")


def test_add_rms_norm_mixed_dtypes_promote_like_torch(device):
    """Under autocast a bf16 sublayer output meets the fp32 residual stream: the sum is torch's promoted
    residual + x, and the model runs forward and backward there as it did before the fusion."""
    x, w, _ = _rms_case((5, 24), seed=37)
    r = randn(5, 24, dtype=torch.float64, seed=38)
    for backend in CPU_BACKENDS:
        out, s = ops.add_rms_norm(x.half().to(device), r.float().to(device), w.float().to(device), 1e-6,
                                  backend=backend)
        assert s.dtype == out.dtype == torch.float32
        assert torch.equal(s, r.float().to(device) + x.half().to(device))
        assert_close(out, reference.rms_norm(s.double(), w.to(device), 1e-6), torch.float32, rtol=2e-5, atol=1e-6,
                     name="out")
    from r1fast.models import CausalLM, ModelConfig

    model = CausalLM(ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=40, hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model(torch.arange(9))
    hidden.float().sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lm_head" not in n)


@pytest.mark.parametrize("needs", ["x", "weight"])
def test_rms_norm_triton_frozen_input_or_weight(device, poisoned_alloc, needs):
    """Only the gradient asked for is computed (the kernel's HAS_DX / HAS_DW switches)."""
    x, w, dy = _rms_case((9, 40), seed=7)
    e_out, e_dx, e_dw = _grads(lambda a, b: reference.rms_norm(a, b, 1e-6), (x, w), dy)
    xf, wf = x.float().to(device), w.float().to(device)
    (xf if needs == "x" else wf).requires_grad_()
    out = ops.rms_norm(xf, wf, 1e-6, backend="triton")
    (g,) = torch.autograd.grad(out, (xf if needs == "x" else wf), dy.float().to(device))
    assert_close(g, e_dx if needs == "x" else e_dw, torch.float32, rtol=2e-5, name=f"d{needs}")


def test_rms_norm_triton_strided_input_and_mixed_dtypes(device):
    """A non-contiguous x (a column slice) and an fp32 weight with fp16 x: out is fp32 as torch's
    promotion gives, and equals the torch backend up to rsqrt rounding."""
    base = randn(6, 80, dtype=torch.float32, seed=21).to(device)
    x = base[:, 3:40]
    w = randn(37, dtype=torch.float32, seed=22).to(device)
    e = reference.rms_norm(x.double(), w.double(), 1e-6)
    assert_close(ops.rms_norm(x, w, 1e-6, backend="triton"), e, torch.float32, name="strided")
    xh = x.half()
    out = ops.rms_norm(xh, w, 1e-6, backend="triton")
    ref = ops.rms_norm(xh, w, 1e-6, backend="torch")
    assert out.dtype == ref.dtype == torch.float32
    # both round x * rstd to fp16 before the weight: one fp16 rounding step apart at most
    assert ((out - ref).abs() <= w.abs() * (ref / w).abs() * 2 ** -10 + 1e-6).all()
    # and the rounding comes BEFORE the weight: with power-of-two weights out / w is x * rstd as stored
    w2 = torch.exp2(torch.randint(-3, 4, (37,), generator=torch.Generator().manual_seed(23)).float()).to(device)
    xn = ops.rms_norm(xh, w2, 1e-6, backend="triton") / w2
    assert torch.equal(xn, xn.half().float())


def _swiglu_case(shape, seed, scale=1.0):
    g = randn(*shape, dtype=torch.float64, seed=seed, scale=scale)
    u = randn(*shape, dtype=torch.float64, seed=seed + 1)
    dy = randn(*shape, dtype=torch.float64, seed=seed + 2)
    return g, u, dy


# odd widths, one row, wider than the interpreter's 256-element tile, 3-D, and gates far into
# exp's overflow (|gate| up to ~300: exp(-gate) = inf in fp32, silu -> -0 and its slope -> 0)
SWIGLU_CASES = [((5, 37), 1.0), ((1, 19), 1.0), ((2, 300), 1.0), ((2, 3, 20), 1.0), ((4, 33), 80.0)]


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy's exp under the interpreter
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape, scale", SWIGLU_CASES)
def test_swiglu_matches_reference(device, poisoned_alloc, backend, shape, scale):
    g, u, dy = _swiglu_case(shape, seed=shape[-1] * 7 + len(shape), scale=scale)
    e_out, e_dg, e_du = _grads(reference.swiglu, (g, u), dy)
    out, dg, du = _grads(lambda a, b: ops.swiglu(a, b, backend=backend),
                         (g.float().to(device), u.float().to(device)), dy.float().to(device))
    assert out.dtype == dg.dtype == du.dtype == torch.float32
    for a, e, name in ((out, e_out, "out"), (dg, e_dg, "d_gate"), (du, e_du, "d_up")):
        assert_close(a, e, torch.float32, rtol=2e-5, atol=1e-6, name=f"{backend} {name}")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape, scale", SWIGLU_CASES)
def test_packed_swiglu_matches_reference(device, poisoned_alloc, backend, shape, scale):
    """ops.swiglu(gate_up): the two halves of one [..., 2I] tensor (the fused gate/up projection's output),
    the gradient written as one tensor."""
    g, u, dy = _swiglu_case(shape, seed=shape[-1] * 11 + len(shape), scale=scale)
    e_out, e_dg, e_du = _grads(reference.swiglu, (g, u), dy)
    out, d_in = _grads(lambda x: ops.swiglu(x, backend=backend), (torch.cat((g, u), -1).float().to(device),),
                       dy.float().to(device))
    assert out.shape == g.shape and d_in.shape == (*g.shape[:-1], 2 * g.shape[-1])
    half = g.shape[-1]
    for a, e, name in ((out, e_out, "out"), (d_in[..., :half], e_dg, "d_gate"), (d_in[..., half:], e_du, "d_up")):
        assert_close(a, e, torch.float32, rtol=2e-5, atol=1e-6, name=f"{backend} packed {name}")


def test_packed_swiglu_bad_input_is_a_clear_error():
    for bad in (torch.randn(3, 7), torch.randn(3, 0)):
        with pytest.raises(ValueError, match=r"packed gate_up must be \[\.\.\., 2I\] with I >= 1"):
            ops.swiglu(bad)
    with pytest.raises(ValueError, match="row stride"):
        from r1fast.kernels import swiglu as kernel

        x = torch.randn(4, 10)
        kernel.swiglu_fwd(x[:, :5], torch.randn(4, 5))  # halves of different tensors: no shared row stride
    g, u = torch.randn(4, 5), torch.randn(4, 5)  # separate inputs, but a packed [4, 10] gradient
    with pytest.raises(ValueError, match=r"gradients' row stride 10 must equal gate's and up's \(5\)"):
        kernel.swiglu_bwd(torch.randn(4, 5), g, u, d_in=torch.empty(4, 10))


def test_fp16_under_the_low_precision_rule(device):
    """fp16 through the kernels (the interpreter handles fp16, not bf16) against the rule, with the
    torch backend (the decoder's own mixed-precision expressions) as the low-precision reference."""
    x, w, dy = _rms_case((8, 48), seed=31)
    exp = _grads(lambda a, b: reference.rms_norm(a, b, 1e-6), (x, w), dy)
    h = lambda t: t.half().to(device)  # noqa: E731
    for b in CPU_BACKENDS:
        got = _grads(lambda a, c: ops.rms_norm(a, c, 1e-6, backend=b), (h(x), h(w)), h(dy))
        if b == "torch":
            lowp = got
            continue
        for k, l, e, name in zip(got, lowp, exp, ("out", "dx", "dw")):
            assert_within_lowp_rule(k, l, e, name=f"rms_norm fp16 {name}")
    g, u, dy = _swiglu_case((8, 48), seed=32, scale=3.0)
    exp = _grads(reference.swiglu, (g, u), dy)
    lowp = _grads(lambda a, c: ops.swiglu(a, c, backend="torch"), (h(g), h(u)), h(dy))
    got = _grads(lambda a, c: ops.swiglu(a, c, backend="triton"), (h(g), h(u)), h(dy))
    for k, l, e, name in zip(got, lowp, exp, ("out", "d_gate", "d_up")):
        assert_within_lowp_rule(k, l, e, name=f"swiglu fp16 {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_backend_is_the_decoders_old_expression(dtype):
    """Bit for bit what r1fast.models.decoder computed before the ops existed (forward and backward)."""
    def old_norm(x, weight, eps):
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(x.dtype)

    x, w, dy = (t.to(dtype) for t in _rms_case((6, 40), seed=41))
    for a, b in zip(_grads(lambda p, q: old_norm(p, q, 1e-6), (x, w), dy),
                    _grads(lambda p, q: ops.rms_norm(p, q, 1e-6), (x, w), dy)):
        assert torch.equal(a, b)
    # the eps argument is a real argument: the old expression with another eps is not equal
    assert not torch.equal(old_norm(x, w, 1e-6), ops.rms_norm(x, w, 0.5))
    g, u, dy = (t.to(dtype) for t in _swiglu_case((6, 40), seed=42, scale=2.0))
    old_mlp_act = lambda a, b: F.silu(a) * b  # noqa: E731
    for a, b in zip(_grads(old_mlp_act, (g, u), dy), _grads(lambda p, q: ops.swiglu(p, q), (g, u), dy)):
        assert torch.equal(a, b)


def test_reference_backend_and_float64_inputs(device):
    x, w, _ = _rms_case((3, 10), seed=51)
    g, u, _ = _swiglu_case((3, 10), seed=52)
    x, w, g, u = (t.to(device) for t in (x, w, g, u))
    assert torch.equal(ops.rms_norm(x, w, 1e-6, backend="reference"), reference.rms_norm(x, w, 1e-6))
    assert torch.equal(ops.swiglu(g, u, backend="reference"), reference.swiglu(g, u))
    # fp32 in: the reference computes in float64 and rounds once
    assert torch.equal(ops.swiglu(g.float(), u.float(), backend="reference"), reference.swiglu(g, u).float())
    # float64 through the triton backend runs the torch expressions (the kernels compute in fp32)
    assert torch.equal(ops.rms_norm(x, w, 1e-6, backend="triton"), ops.rms_norm(x, w, 1e-6, backend="torch"))
    assert torch.equal(ops.swiglu(g, u, backend="triton"), ops.swiglu(g, u, backend="torch"))


def test_default_backends():
    for op in ("rms_norm", "add_rms_norm", "swiglu", "rotary"):
        assert backends.default(op, "cpu") == "torch"
        assert backends.default(op, torch.device("cuda")) == "triton"
        assert set(backends.implementations(op)) == {"reference", "torch", "triton"}


def test_empty_batch(device):
    x = torch.empty(0, 16, device=device, requires_grad=True)
    w = torch.ones(16, device=device, requires_grad=True)
    out = ops.rms_norm(x, w, 1e-6, backend="triton")
    dx, dw = torch.autograd.grad(out, (x, w), torch.ones_like(out))
    assert out.shape == dx.shape == (0, 16) and torch.equal(dw, torch.zeros(16, device=device))
    g = torch.empty(0, 7, device=device)
    assert ops.swiglu(g, g, backend="triton").shape == (0, 7)


@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm", "swiglu", "swiglu_packed", "rotary"])
def test_triton_double_backward_is_refused_not_silently_dropped(device, op):
    # create_graph=True returned the kernels' gradient with no graph: a gradient penalty (or a
    # Hessian-vector product) through these layers lost every term that ran through them
    a, b = randn(4, 3, 8, seed=41, device=device), randn(4, 3, 8, seed=42, device=device)
    x = a.clone().requires_grad_()
    if op == "rms_norm":
        outs = (ops.rms_norm(x, 1.0 + randn(8, seed=43, device=device, scale=0.5), 1e-6, backend="triton"),)
    elif op == "add_rms_norm":
        outs = ops.add_rms_norm(x, b, 1.0 + randn(8, seed=43, device=device, scale=0.5), 1e-6, backend="triton")
    elif op == "swiglu":
        outs = (ops.swiglu(x, b, backend="triton"),)
    elif op == "swiglu_packed":
        outs = (ops.swiglu(x, backend="triton"),)
    else:
        ang = randn(4, 8, seed=44, device=device)
        outs = ops.rotary(x, b, ang.cos(), ang.sin(), backend="triton")
    obj = sum((o * randn(*o.shape, seed=45 + i, device=device)).sum() for i, o in enumerate(outs))
    with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True\) is not supported"):
        torch.autograd.grad(obj, x, create_graph=True, retain_graph=True)
    (g,) = torch.autograd.grad(obj, x)  # a plain backward still works
    assert g.abs().sum() > 0


def test_model_forward_and_backward_on_the_triton_backend(device, monkeypatch):
    """A tiny fp32 Qwen3 (hidden norms, per-head q/k norm, SwiGLU MLP) run with each backend preferred
    (triton is what a GPU picks; on the CPU it runs under the interpreter): hidden states and every
    gradient agree to fp32 rounding.

    The gradients are held to the fp32 model's own error, measured against the same model in float64:
    the two fp32 runs round in different places (the kernels sum rows in another order than torch's
    reductions, and on a GPU fuse a multiply and an add where torch's separate kernels round both), and
    through two layers of attention a difference of a few ulps grows by cancellation. On an H200 one
    element of 1152 (0.0625 in a gradient whose elements reach ~100) came out 2e-5 from the torch
    run's, 3.3e-4 relative: past a fixed rtol of 1e-4 yet within the fp32 model's own error there (on
    the CPU that error reaches 2.2e-5 in this very tensor). A kernel computing anything in 16 bits, or
    a tl.dot in TF32, errs by 2^-11 or more relative: far past the bound."""
    from r1fast.models import CausalLM, ModelConfig

    cfg = ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=50, hidden_size=24, intermediate_size=40,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=12)
    model = CausalLM(cfg)
    model.reset_parameters(seed=0)
    model.to(device)
    with torch.no_grad():  # random norm weights (init is ones)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(randn(*p.shape, seed=len(name), scale=0.3, device=device))
    ids = torch.randint(0, 50, (11,), generator=torch.Generator().manual_seed(0)).to(device)
    cu = torch.tensor([0, 4, 11], dtype=torch.int32, device=device)
    cot = randn(11, 24, seed=5, device=device)

    def prefer(first):
        order = (first,) + tuple(b for b in ("torch", "triton", "reference") if b != first)
        monkeypatch.setattr(backends, "_CPU_ORDER", order)
        monkeypatch.setattr(backends, "_GPU_ORDER", order)
        assert {backends.default(op, device) for op in ("rms_norm", "add_rms_norm", "swiglu", "rotary")} == {first}

    def run(cotangent):
        model.zero_grad(set_to_none=True)
        hidden = model(ids, cu_seqlens=cu)
        hidden.backward(cotangent)
        # every parameter but the (untied) lm_head, which the hidden states do not reach
        return hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    prefer("torch")
    h_torch, g_torch = run(cot)
    prefer("triton")
    h_triton, g_triton = run(cot)
    assert any("q_norm" in n for n in g_torch) and any("gate_up_proj" in n for n in g_torch)
    assert_close(h_triton, h_torch, torch.float32, rtol=1e-4, atol=1e-5, name="hidden")
    model.double()  # the same weights in float64 (float64 takes the torch expressions on every backend)
    _, g64 = run(cot.double())
    for n, e in g64.items():
        assert e.dtype == torch.float64
        torch_err = (g_torch[n].double() - e).abs().max().item()
        triton_err = (g_triton[n].double() - e).abs().max().item()
        # 4x the torch run's error (on the CPU the triton run's was at most 1.9x it), and a floor of
        # 8 fp32 ulps of the tensor's largest element for a tensor where torch happens to err less
        bound = 4 * torch_err + 8 * 2.0 ** -24 * e.abs().max().item()
        assert triton_err <= bound, (f"grad {n}: triton's max error {triton_err:.3g} against the float64 model "
                                     f"exceeds {bound:.3g} (torch's own fp32 error {torch_err:.3g})")


def _rotary_case(t, hq, hk, d, seed, angles=False):
    """float64 q, k, cos, sin and cotangents. angles=False: arbitrary tables whose two halves differ
    (the kernel reads both halves; a table from real angles would hide a swapped half)."""
    q = randn(t, hq, d, dtype=torch.float64, seed=seed)
    k = randn(t, hk, d, dtype=torch.float64, seed=seed + 1)
    if angles:
        theta = torch.rand(t, d // 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 50
        theta = torch.cat((theta, theta), dim=-1)
        cos, sin = theta.cos(), theta.sin()
    else:
        cos, sin = randn(t, d, dtype=torch.float64, seed=seed + 2), randn(t, d, dtype=torch.float64, seed=seed + 3)
    return q, k, cos, sin, randn(t, hq, d, dtype=torch.float64, seed=seed + 4), \
        randn(t, hk, d, dtype=torch.float64, seed=seed + 5)


def _rotary_grads(fn, q, k, cos, sin, dq, dk):
    q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    oq, ok = fn(q, k, cos, sin)
    gq, gk = torch.autograd.grad((oq, ok), (q, k), (dq, dk))
    return oq, ok, gq, gk


def _rotary_reference(q, k, cos, sin):
    return reference.rotary(q, cos, sin), reference.rotary(k, cos, sin)


# (tokens, q heads, k heads, head_dim): GQA, more k heads than q heads, head counts crossing the
# interpreter's 2-head blocks, a half not a power of two, the smallest head_dim, one token
ROTARY_CASES = [(5, 4, 2, 16), (3, 1, 3, 12), (6, 5, 5, 20), (4, 3, 1, 2), (1, 7, 2, 8)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("t, hq, hk, d", ROTARY_CASES)
def test_rotary_matches_reference(device, poisoned_alloc, backend, t, hq, hk, d):
    case = _rotary_case(t, hq, hk, d, seed=t * 100 + hq * 10 + d)
    expect = _rotary_grads(_rotary_reference, *case)
    f = lambda x: x.float().to(device)  # noqa: E731
    got = _rotary_grads(lambda *a: ops.rotary(*a, backend=backend), *(f(x) for x in case))
    for a, e, name in zip(got, expect, ("q", "k", "dq", "dk")):
        assert a.dtype == torch.float32
        assert_close(a, e, torch.float32, rtol=2e-5, atol=1e-6, name=f"{backend} {name}")


def test_rotary_triton_strided_q_k_and_tables(device):
    """q and k as head slices of one fused qkv tensor (token stride > heads x head_dim), and cos/sin
    as column slices of a wider table: the kernel takes strides, no copies needed."""
    t, hq, hk, d = 6, 4, 2, 16
    qkv = randn(t, hq + 2 * hk, d, seed=91, device=device)
    table = randn(t, 2 * d, seed=92, device=device)
    q, k = qkv[:, :hq], qkv[:, hq:hq + hk]
    cos, sin = table[:, :d], table[:, d:]
    assert not q.is_contiguous() and not cos.is_contiguous()
    got = ops.rotary(q, k, cos, sin, backend="triton")
    want = _rotary_reference(q.double(), k.double(), cos.double(), sin.double())
    for a, e, name in zip(got, want, ("q", "k")):
        assert_close(a, e, torch.float32, rtol=2e-5, atol=1e-6, name=name)


def test_rotary_fp16_rounds_like_torch(device):
    """fp16 (the interpreter has no bf16): each product and the sum rounded to fp16, as torch's three
    operations do: the forward equals the torch backend bit for bit; the gradients meet the
    low-precision rule."""
    case = _rotary_case(9, 4, 2, 32, seed=95, angles=True)
    expect = _rotary_grads(_rotary_reference, *case)
    h = lambda x: x.half().to(device)  # noqa: E731
    lowp = _rotary_grads(lambda *a: ops.rotary(*a, backend="torch"), *(h(x) for x in case))
    got = _rotary_grads(lambda *a: ops.rotary(*a, backend="triton"), *(h(x) for x in case))
    assert torch.equal(got[0], lowp[0]) and torch.equal(got[1], lowp[1])
    for k, l, e, name in zip(got[2:], lowp[2:], expect[2:], ("dq", "dk")):
        assert k.dtype == torch.float16
        assert_within_lowp_rule(k, l, e, name=f"rotary fp16 {name}")
    # and over tables whose halves differ (real angles repeat them: a swapped half would pass above)
    q, k, cos, sin = (h(x) for x in _rotary_case(9, 4, 2, 32, seed=96)[:4])
    got, lowp = ops.rotary(q, k, cos, sin, backend="triton"), ops.rotary(q, k, cos, sin, backend="torch")
    assert torch.equal(got[0], lowp[0]) and torch.equal(got[1], lowp[1])


def test_rotary_fp32_equals_torch_bit_for_bit(device):
    """fp32: the kernel's two rounded products and rounded sum are torch's three operations, forward
    and backward (dy * cos, dy * sin, one add): equal bit for bit, on the GPU too (FP fusion is off
    there: an FMA would skip one product's rounding)."""
    case = [x.float().to(device) for x in _rotary_case(9, 4, 2, 32, seed=98)]
    want = _rotary_grads(lambda *a: ops.rotary(*a, backend="torch"), *case)
    got = _rotary_grads(lambda *a: ops.rotary(*a, backend="triton"), *case)
    for a, e, name in zip(got, want, ("q", "k", "dq", "dk")):
        assert a.dtype == torch.float32
        assert torch.equal(a, e), f"{name} differs from torch's"


_ROTARY_PTX_SCRIPT = """
import re
from r1fast.kernels import rotary
from r1fast.kernels.compile_check import compile_for
for dt in ("bf16", "fp16", "fp32"):
    types = {n: "*" + dt for n in ("q_ptr", "k_ptr", "qo_ptr", "ko_ptr", "cos_ptr", "sin_ptr")}
    cfg = rotary.launch_config(12, 64, "cuda")  # Qwen2.5-1.5B: 12 q heads, head_dim 128
    blocks = {n: v for n, v in cfg.items() if n.startswith("BLOCK")}
    for backward in (False, True):
        k = compile_for(rotary._rotary_kernel, types, dict(blocks, BACKWARD=backward, ROUND=dt != "fp32"), 90,
                        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                        enable_fp_fusion=cfg["enable_fp_fusion"])
        ptx = k.asm["ptx"]
        fma = sorted(set(re.findall(r"\\bfma\\.[a-z0-9.]+", ptx)))
        assert not fma, f"{dt} backward={backward}: {fma} in the PTX"
        assert re.search(r"\\bmul\\.rn\\.", ptx), f"{dt} backward={backward}: no mul.rn in the PTX"
print("ok")
"""


def test_rotary_compiles_without_fma_contraction():
    """What the interpreter cannot show (numpy never fuses): with Triton's default FP fusion the sm_90
    build narrowed the rounded 16-bit products and sum to half ops and contracted one product with
    the sum into fma.rn.f16, so the H200 forward differed from torch's in the last bit. The launch
    configuration turns fusion off; the PTX it compiles to has no FMA. Real compiler, no GPU needed."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _ROTARY_PTX_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_rotary_tables_with_gradient_and_mixed_dtypes(device):
    """Tables that require a gradient take the torch path (the kernel gives none to them); fp16 q/k
    with fp32 tables come out in fp32, as torch promotes."""
    q, k, cos, sin, dq, dk = (x.float().to(device) for x in _rotary_case(4, 2, 1, 8, seed=97))
    cos.requires_grad_()
    oq, ok = ops.rotary(q, k, cos, sin, backend="triton")
    (gc,) = torch.autograd.grad((oq, ok), (cos,), (dq, dk))
    c64 = cos.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(_rotary_reference(q.double(), k.double(), c64, sin.double()), (c64,),
                                  (dq.double(), dk.double()))
    assert_close(gc, want, torch.float32, rtol=2e-5, atol=1e-6, name="dcos")
    oq, ok = ops.rotary(q.half(), k.half(), cos.detach(), sin, backend="triton")
    assert oq.dtype == ok.dtype == torch.float32
    assert_close(oq, reference.rotary(q.half().double(), cos.double(), sin.double()), torch.float32,
                 rtol=2e-5, atol=1e-6, name="mixed q")


def test_rotary_empty_and_only_k_used(device):
    """No tokens; and a loss that uses only k (q's output gradient is None in the backward)."""
    z = torch.empty(0, 2, 8, device=device)
    tab = torch.empty(0, 8, device=device)
    oq, ok = ops.rotary(z, z[:, :1], tab, tab, backend="triton")
    assert oq.shape == (0, 2, 8) and ok.shape == (0, 1, 8)
    q, k, cos, sin, _, dk = (x.float().to(device) for x in _rotary_case(3, 2, 1, 8, seed=99))
    q.requires_grad_()
    k.requires_grad_()
    _, ok = ops.rotary(q, k, cos, sin, backend="triton")
    gq, gk = torch.autograd.grad(ok, (q, k), dk, allow_unused=True)
    k64 = k.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(reference.rotary(k64, cos.double(), sin.double()), (k64,), dk.double())
    assert_close(gk, want, torch.float32, rtol=2e-5, atol=1e-6, name="dk")
    assert gq is None or torch.equal(gq, torch.zeros_like(gq))


def _bad_rms(**kw):
    args = dict(x=torch.randn(3, 8), weight=torch.randn(8), eps=1e-6)
    args.update(kw)
    return lambda: ops.rms_norm(args["x"], args["weight"], args["eps"])


def _bad_rotary(**kw):
    args = dict(q=torch.randn(3, 4, 8), k=torch.randn(3, 2, 8), cos=torch.randn(3, 8), sin=torch.randn(3, 8))
    args.update(kw)
    return lambda: ops.rotary(args["q"], args["k"], args["cos"], args["sin"])


def _bad_add_rms(**kw):
    args = dict(x=torch.randn(3, 8), residual=torch.randn(3, 8), weight=torch.randn(8), eps=1e-6)
    args.update(kw)
    return lambda: ops.add_rms_norm(args["x"], args["residual"], args["weight"], args["eps"])


def _bad_swiglu(**kw):
    args = dict(gate=torch.randn(3, 8), up=torch.randn(3, 8))
    args.update(kw)
    return lambda: ops.swiglu(args["gate"], args["up"])


@pytest.mark.parametrize("call, err, match", [
    (_bad_rms(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
    (_bad_rms(x=torch.ones(3, 8, dtype=torch.int32)), ValueError, "x must be a float tensor"),
    (_bad_rms(weight=torch.randn(7)), ValueError, r"weight must be \[H=8\]"),
    (_bad_rms(weight=torch.randn(1, 8)), ValueError, r"weight must be \[H=8\]"),
    (_bad_rms(x=torch.randn(3, 0), weight=torch.randn(0)), ValueError, "H >= 1"),
    (_bad_rms(x=torch.tensor(1.0)), ValueError, "H >= 1"),
    (_bad_rms(weight=torch.randn(8, device="meta")), ValueError, "one device"),
    (_bad_rms(eps=0.0), ValueError, "eps must be a finite number > 0"),
    (_bad_rms(eps=-1e-6), ValueError, "eps must be"),
    (_bad_rms(eps=float("nan")), ValueError, "eps must be"),
    (_bad_rms(eps=True), ValueError, "eps must be"),
    (_bad_rms(eps="1e-6"), ValueError, "eps must be"),
    (_bad_swiglu(up=torch.randn(3, 9)), ValueError, r"gate shape \(3, 8\) != up shape \(3, 9\)"),
    (_bad_swiglu(up=torch.randn(3, 8).half()), ValueError, "share a dtype"),
    (_bad_swiglu(gate=torch.ones(3, 8, dtype=torch.int64)), ValueError, "gate must be a float tensor"),
    (_bad_swiglu(up=[1.0] * 8), TypeError, "up must be a torch.Tensor"),
    (_bad_swiglu(up=torch.randn(3, 8, device="meta")), ValueError, "one device"),
    (_bad_swiglu(gate=torch.tensor(1.0), up=torch.tensor(1.0)), ValueError, r"gate must be \[\.\.\., I\] with I >= 1"),
    (_bad_swiglu(gate=torch.randn(3, 0), up=torch.randn(3, 0)), ValueError, "I >= 1"),   # the kernel's reshape failed
    (_bad_add_rms(residual=torch.randn(3, 9)), ValueError, "residual must match x's shape and device"),
    (_bad_add_rms(residual=torch.randn(3, 8, device="meta")), ValueError, "residual must match"),
    (_bad_add_rms(residual=None), TypeError, "residual must be a torch.Tensor"),
    (_bad_add_rms(weight=torch.randn(9)), ValueError, r"weight must be \[H=8\]"),
    # x, weight and eps were checked under rms_norm's name, which the caller never called
    (_bad_add_rms(weight=torch.randn(9)), ValueError, r"^add_rms_norm: weight must be \[H=8\]"),
    (_bad_add_rms(eps=0.0), ValueError, "^add_rms_norm: eps must be a finite number > 0"),
    (_bad_rotary(q=torch.randn(3, 32)), ValueError, r"q and k must be \[T, heads, head_dim\]"),
    (_bad_rotary(k=torch.randn(4, 2, 8)), ValueError, "must have q's tokens and head_dim"),
    (_bad_rotary(q=torch.randn(3, 4, 7), k=torch.randn(3, 2, 7), cos=torch.randn(3, 7), sin=torch.randn(3, 7)),
     ValueError, "head_dim must be even"),
    (_bad_rotary(q=torch.randn(3, 4, 0), k=torch.randn(3, 2, 0), cos=torch.randn(3, 0), sin=torch.randn(3, 0)),
     ValueError, "head_dim must be even and >= 2"),
    (_bad_rotary(cos=torch.randn(3, 4)), ValueError, r"cos and sin must be \[T=3, head_dim=8\]"),
    (_bad_rotary(sin=torch.randn(3, 4)), ValueError, r"cos and sin must be \[T=3, head_dim=8\]"),
    (_bad_rotary(sin=torch.randn(2, 8)), ValueError, r"cos and sin must be \[T=3, head_dim=8\]"),
    (_bad_rotary(k=torch.randn(3, 2, 6)), ValueError, "must have q's tokens and head_dim"),
    (_bad_rotary(k=torch.randn(3, 2, 8).half()), ValueError, "share a dtype"),
    (_bad_rotary(sin=torch.randn(3, 8, dtype=torch.float64)), ValueError, "share a dtype"),
    (_bad_rotary(sin=torch.ones(3, 8, dtype=torch.int32)), ValueError, "sin must be a float tensor"),
    (_bad_rotary(cos=None), TypeError, "cos must be a torch.Tensor"),
    (_bad_rotary(cos=torch.randn(3, 8, device="meta")), ValueError, "one device"),
])
def test_bad_inputs_are_clear_errors(call, err, match):
    with pytest.raises(err, match=match):
        call()


def test_unavailable_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="rms_norm: backend 'triton'"):
        ops.rms_norm(torch.randn(2, 4), torch.randn(4), 1e-6, backend="triton")
    with pytest.raises(ValueError, match="swiglu has no cuda implementation"):
        ops.swiglu(torch.randn(2, 4), torch.randn(2, 4), backend="cuda")


# ---------------------------------------------------------------- GPU: realistic sizes, bf16 / fp16


def _ulp(t: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each element of a bf16/fp16 tensor (as float64)."""
    mant = {torch.bfloat16: 7, torch.float16: 10}[t.dtype]
    a = t.double().abs().clamp_min(torch.finfo(t.dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(a)) - mant)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4096, 1536), (2048, 16, 128)])  # Qwen2.5-1.5B hidden; Qwen3 q-norm
def test_rms_norm_gpu_low_precision_rule(dtype, shape):
    x, w, dy = _rms_case(shape, seed=61)
    x, w, dy = x.cuda(), w.cuda(), dy.cuda()
    exp = _grads(lambda a, b: reference.rms_norm(a, b, 1e-6), (x, w), dy)
    lo = lambda t: t.to(dtype)  # noqa: E731
    lowp = _grads(lambda a, b: ops.rms_norm(a, b, 1e-6, backend="torch"), (lo(x), lo(w)), lo(dy))
    got = _grads(lambda a, b: ops.rms_norm(a, b, 1e-6, backend="triton"), (lo(x), lo(w)), lo(dy))
    for k, l, e, name in zip(got, lowp, exp, ("out", "dx", "dweight")):
        assert k.dtype == dtype
        assert_within_lowp_rule(k, l, e, name=f"rms_norm {dtype} {name}")
    # dweight is deterministic: per-program partials summed by torch, no atomics
    again = _grads(lambda a, b: ops.rms_norm(a, b, 1e-6, backend="triton"), (lo(x), lo(w)), lo(dy))
    assert torch.equal(got[2], again[2]) and torch.equal(got[1], again[1])


@pytest.mark.gpu
def test_rms_norm_gpu_bf16_forward_bit_equal_to_torch():
    """The kernel docstring's claim. Bit-equal when the fp32 sum of squares is the same: x = k/16
    with |k| < 16 has exact squares and exact partial sums in any order, and a power-of-two width
    makes the mean exact too. On random inputs the summation order differs: few outputs differ, by
    one rounding step of x * rstd (times the weight)."""
    g = torch.Generator().manual_seed(71)
    k = torch.randint(-15, 16, (4096, 2048), generator=g)
    k[k == 0] = 1
    x = (k.double() / 16).to(torch.bfloat16).cuda()
    w = (1.0 + randn(2048, seed=72, scale=0.5)).to(torch.bfloat16).cuda()
    for eps in (1e-6, 1e-5):
        assert torch.equal(ops.rms_norm(x, w, eps, backend="triton"), ops.rms_norm(x, w, eps, backend="torch"))
    x = randn(4096, 1536, seed=73).to(torch.bfloat16).cuda()
    w = (1.0 + randn(1536, seed=74, scale=0.5)).to(torch.bfloat16).cuda()
    out = ops.rms_norm(x, w, 1e-6, backend="triton")
    ref = ops.rms_norm(x, w, 1e-6, backend="torch")
    diff = out != ref
    assert diff.double().mean().item() < 1e-3, f"{int(diff.sum())} of {diff.numel()} outputs differ"
    xn = (ref.double() / w.double()).to(torch.bfloat16)  # ~ the torch path's rounded x * rstd
    bound = w.double().abs() * _ulp(xn) + _ulp(ref)
    assert ((out.double() - ref.double()).abs() <= bound).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_swiglu_gpu_low_precision_rule_and_bit_equal_to_torch(dtype):
    """Qwen2.5-1.5B's MLP: 4096 tokens x 8960. Forward and d_up equal torch's F.silu(g) * u bit for
    bit (same fp32 operations, expf and IEEE division, same roundings); d_gate is computed in fp32
    with one rounding (torch rounds d_out * up first) and meets the low-precision rule."""
    g, u, dy = _swiglu_case((4096, 8960), seed=81, scale=3.0)
    g, u, dy = g.cuda(), u.cuda(), dy.cuda()
    exp = _grads(reference.swiglu, (g, u), dy)
    lo = lambda t: t.to(dtype)  # noqa: E731
    lowp = _grads(lambda a, b: ops.swiglu(a, b, backend="torch"), (lo(g), lo(u)), lo(dy))
    got = _grads(lambda a, b: ops.swiglu(a, b, backend="triton"), (lo(g), lo(u)), lo(dy))
    for k, l, e, name in zip(got, lowp, exp, ("out", "d_gate", "d_up")):
        assert k.dtype == dtype
        assert_within_lowp_rule(k, l, e, name=f"swiglu {dtype} {name}")
    assert torch.equal(got[0], lowp[0]), "forward differs from F.silu(g) * u"
    assert torch.equal(got[2], lowp[2]), "d_up differs from torch's"
    # the packed form (the decoder's fused gate/up output) runs the same kernels on strided halves
    out, d_in = _grads(lambda x: ops.swiglu(x, backend="triton"), (torch.cat((lo(g), lo(u)), -1),), lo(dy))
    assert torch.equal(out, got[0]) and torch.equal(d_in, torch.cat((got[1], got[2]), -1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotary_gpu_bit_equal_forward_and_low_precision_backward(dtype):
    """Qwen2.5-1.5B's attention: 4096 tokens, 12 q heads, 2 k heads, head_dim 128, real angles. The
    forward equals torch's x * cos + rotate_half(x) * sin bit for bit (the same three roundings);
    the gradients (fp32, one rounding) meet the low-precision rule."""
    case = [x.cuda() for x in _rotary_case(4096, 12, 2, 128, seed=101, angles=True)]
    expect = _rotary_grads(_rotary_reference, *case)
    lo = lambda x: x.to(dtype)  # noqa: E731
    lowp = _rotary_grads(lambda *a: ops.rotary(*a, backend="torch"), *(lo(x) for x in case))
    got = _rotary_grads(lambda *a: ops.rotary(*a, backend="triton"), *(lo(x) for x in case))
    assert torch.equal(got[0], lowp[0]) and torch.equal(got[1], lowp[1]), "forward differs from torch's"
    for k, l, e, name in zip(got[2:], lowp[2:], expect[2:], ("dq", "dk")):
        assert k.dtype == dtype
        assert_within_lowp_rule(k, l, e, name=f"rotary {dtype} {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_add_rms_norm_gpu_sum_bit_equal_and_low_precision_rule(dtype):
    """Qwen2.5-1.5B's hidden size over 4096 tokens: the sum equals torch's x + r bit for bit; the
    norm, and every gradient with the residual stream's own gradient, meet the low-precision rule."""
    x, w, dy = _rms_case((4096, 1536), seed=111)
    r = randn(4096, 1536, dtype=torch.float64, seed=112)
    ds = randn(4096, 1536, dtype=torch.float64, seed=113)
    x, w, dy, r, ds = (t.cuda() for t in (x, w, dy, r, ds))

    def grads(fn, inputs, cast):
        leaves = [cast(t).detach().clone().requires_grad_() for t in inputs]
        out, s = fn(*leaves)
        return (out, s, *torch.autograd.grad((out, s), leaves, (cast(dy), cast(ds))))

    expect = grads(lambda a, b, c: _add_rms_reference(a, b, c, 1e-6), (x, r, w), lambda t: t)
    lo = lambda t: t.to(dtype)  # noqa: E731
    lowp = grads(lambda a, b, c: ops.add_rms_norm(a, b, c, 1e-6, backend="torch"), (x, r, w), lo)
    got = grads(lambda a, b, c: ops.add_rms_norm(a, b, c, 1e-6, backend="triton"), (x, r, w), lo)
    assert torch.equal(got[1], lowp[1]), "x + residual differs from torch's"
    for k, l, e, name in zip(got, lowp, expect, ("out", "sum", "dx", "dresidual", "dweight")):
        assert k.dtype == dtype
        assert_within_lowp_rule(k, l, e, name=f"add_rms_norm {dtype} {name}")


@pytest.mark.parametrize("needs", ["x", "residual"])
def test_add_rms_norm_triton_gradient_of_one_addend_only(device, poisoned_alloc, needs):
    """Only x, or only the residual, requires a gradient (a frozen sublayer, or a detached stream): the one
    asked for is still the full gradient of the sum, with the sum's own gradient added."""
    x, w, dy = _rms_case((7, 40), seed=121)
    r = randn(7, 40, dtype=torch.float64, seed=122)
    ds = randn(7, 40, dtype=torch.float64, seed=123)
    leaf = (x if needs == "x" else r).clone().requires_grad_()
    out, s = _add_rms_reference(leaf if needs == "x" else x, leaf if needs == "residual" else r, w, 1e-6)
    (want,) = torch.autograd.grad((out, s), (leaf,), (dy, ds))
    f = lambda t: t.float().to(device)  # noqa: E731
    xf, rf = f(x), f(r)
    (xf if needs == "x" else rf).requires_grad_()
    out, s = ops.add_rms_norm(xf, rf, f(w), 1e-6, backend="triton")
    (got,) = torch.autograd.grad((out, s), (xf if needs == "x" else rf,), (f(dy), f(ds)))
    assert_close(got, want, torch.float32, rtol=2e-5, atol=1e-6, name=f"d{needs}")


@pytest.mark.parametrize("table", ["cos", "sin"])
def test_rotary_either_table_with_gradient_gets_it(device, table):
    """A table that requires a gradient (cos or sin) takes the torch path and receives its gradient."""
    q, k, cos, sin, dq, dk = (x.float().to(device) for x in _rotary_case(4, 2, 1, 8, seed=131))
    t = (cos if table == "cos" else sin).requires_grad_()
    oq, ok = ops.rotary(q, k, cos, sin, backend="triton")
    (got,) = torch.autograd.grad((oq, ok), (t,), (dq, dk))
    c64, s64 = cos.detach().double(), sin.detach().double()
    t64 = (c64 if table == "cos" else s64).requires_grad_()
    (want,) = torch.autograd.grad(_rotary_reference(q.double(), k.double(), c64, s64), (t64,),
                                  (dq.double(), dk.double()))
    assert_close(got, want, torch.float32, rtol=2e-5, atol=1e-6, name=f"d{table}")


def test_rotary_triton_tables_with_different_row_strides(device):
    """cos contiguous and sin a column slice of a wider table: each table is read with its own row stride."""
    q, k, cos, _, dq, dk = (x.float().to(device) for x in _rotary_case(5, 3, 2, 8, seed=141))
    wide = randn(5, 24, seed=142, device=device)
    sin = wide[:, 8:16]
    assert sin.stride(0) != cos.stride(0)
    got = _rotary_grads(lambda *a: ops.rotary(*a, backend="triton"), q, k, cos, sin, dq, dk)
    want = _rotary_grads(_rotary_reference, *(x.double() for x in (q, k, cos, sin, dq, dk)))
    for a, e, name in zip(got, want, ("q", "k", "dq", "dk")):
        assert_close(a, e, torch.float32, rtol=2e-5, atol=1e-6, name=name)


def test_rotary_triton_inputs_with_a_strided_last_dimension(device):
    """q, k, cos or sin whose last dimension is not contiguous (every other element of a wider tensor):
    the kernel assumes a unit stride there, so the op must hand it contiguous copies."""
    t, hq, hk, d = 4, 3, 2, 8
    q = randn(t, hq, 2 * d, seed=151, device=device)[..., ::2]
    k = randn(t, hk, 2 * d, seed=152, device=device)[..., 1::2]
    cos = randn(t, 2 * d, seed=153, device=device)[:, ::2]
    sin = randn(t, 2 * d, seed=154, device=device)[:, 1::2]
    assert q.stride(-1) == k.stride(-1) == cos.stride(-1) == sin.stride(-1) == 2
    got = ops.rotary(q, k, cos, sin, backend="triton")
    want = _rotary_reference(q.double(), k.double(), cos.double(), sin.double())
    for a, e, name in zip(got, want, ("q", "k")):
        assert_close(a, e, torch.float32, rtol=2e-5, atol=1e-6, name=name)


def test_rms_norm_triton_weight_gradient_uses_x_rstd_rounded_as_the_forward_did(device):
    """dw = Σ_rows dy · round(x · rstd) with the rounding to x's dtype the forward applied before the weight
    (the gradient of what the forward computes), on one block and on a row walked in blocks. fp16 x with
    fp32 weights, so dw comes back in fp32: the rounding (2^-11 relative per term) shows."""
    from r1fast.kernels import rmsnorm as kernel

    for h in (48, 100):  # the interpreter's block is 64: one block, then three
        x = randn(64, h, seed=171 + h, device=device).half()
        w = randn(h, seed=172 + h, device=device) * 0.5 + 1.0
        dy = randn(64, h, seed=173 + h, device=device)
        _, rstd = kernel.rms_norm_fwd(x, w, 1e-6, torch.float32)
        _, dw = kernel.rms_norm_bwd(dy, x, w, rstd, need_dx=False)
        xn = x.float() * rstd[:, None]  # the kernel's fp32 product: the same bits
        want = (dy.double() * xn.half().double()).sum(0)
        unrounded = (dy.double() * xn.double()).sum(0)
        assert (unrounded - want).abs().max() > 1e-3  # what the test tells apart
        assert_close(dw, want, torch.float32, rtol=1e-5, atol=1e-5, name=f"dw H={h}")


def test_rms_norm_triton_rounds_before_the_weight_on_rows_walked_in_blocks(device):
    """fp16 x with fp32 weights on a row wider than the interpreter's block (walked in several blocks):
    x * rstd is rounded to fp16 before the weight, as in the single-block path and the torch backend."""
    x = randn(5, 100, seed=161, device=device).half()
    w2 = torch.exp2(torch.randint(-3, 4, (100,), generator=torch.Generator().manual_seed(162)).float()).to(device)
    out = ops.rms_norm(x, w2, 1e-6, backend="triton")
    assert out.dtype == torch.float32
    xn = out / w2
    assert torch.equal(xn, xn.half().float())
    assert_close(out, reference.rms_norm(x.double(), w2.double(), 1e-6), torch.float16, name="out")



def test_swiglu_triton_one_token_of_width_one_with_any_strides(device):
    """One token of intermediate width 1 taken with a step (strides (2, 2)): is_contiguous() holds, as
    it ignores the strides of size-1 dimensions, so the tensor reached the kernel as it was, whose row
    stride then differed from up's (1) and the op refused valid input ("gate and up need ... one row
    stride"). Forward and backward against silu(g) * u."""
    g = randn(1, 2, seed=181, device=device)[:, 1::2].requires_grad_()
    u = randn(1, 1, seed=182, device=device).requires_grad_()
    assert g.stride() == (2, 2) and g.is_contiguous()
    dy = randn(1, 1, seed=183, device=device)
    out = ops.swiglu(g, u, backend="triton")
    dg, du = torch.autograd.grad(out, (g, u), dy)
    e_out, e_dg, e_du = _grads(reference.swiglu, (g.detach().double(), u.detach().double()), dy.double())
    for a, e, name in ((out, e_out, "out"), (dg, e_dg, "d_gate"), (du, e_du, "d_up")):
        assert_close(a, e, torch.float32, rtol=2e-5, atol=1e-6, name=name)
