"""FP8 numerics: quantisation against a float64 oracle built without the float8 dtypes, the FP8
linear's forward and backward against that oracle, signal-to-noise floors, and the torch._scaled_mm
path against the emulation."""
import contextlib

import pytest
import torch

from r1fast.fp8 import fp8_linear, quantize
from r1fast.fp8.reference import reference_fp8_linear, reference_quantize, round_to_fp8_grid
from r1fast.testing import assert_close, max_rel_err, randn

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8 = [E4M3, E5M2]
GRADS = {"e5m2": E5M2, "e4m3": E4M3}

# SQNR floors (dB) on Gaussian data, a few dB under what this scheme measures (forward ~31.7;
# gradients ~25 with E5M2, ~29 with E4M3), so a lost mantissa bit or a wrong scale fails them.
SQNR_FWD_DB = 29.0
SQNR_BWD_DB = {"e5m2": 22.5, "e4m3": 26.5}


def sqnr_db(approx: torch.Tensor, exact: torch.Tensor) -> float:
    exact, approx = exact.detach().double(), approx.detach().double()
    return float(10 * torch.log10(exact.pow(2).sum() / (approx - exact).pow(2).sum()))


def finite_values(dtype):
    v = torch.arange(256, dtype=torch.uint8).view(dtype).double()
    return v[torch.isfinite(v)].unique()


# ---------------------------------------------------------------- the oracle itself


@pytest.mark.parametrize("dtype", FP8)
def test_grid_rounding_matches_torch_casts(dtype):
    grid = finite_values(dtype)
    mids = (grid[1:] + grid[:-1]) / 2  # exact ties: round half to even
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(20000, generator=g, dtype=torch.float64) * torch.exp(4 * torch.randn(20000, generator=g, dtype=torch.float64))
    fmax = torch.finfo(dtype).max
    for v in (grid, mids, wide.clamp(-fmax, fmax)):
        v32 = v.float()
        got = round_to_fp8_grid(v32.double(), dtype)
        assert torch.equal(got, v32.to(dtype).double())
    # saturation (our quantiser clamps before the cast; the oracle saturates on its own)
    big = torch.tensor([fmax * 1.5, -fmax * 40, 1e30], dtype=torch.float64)
    assert torch.equal(round_to_fp8_grid(big, dtype), torch.tensor([fmax, -fmax, fmax], dtype=torch.float64))


# ---------------------------------------------------------------- quantisation


@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("rowwise", [True, False], ids=["rowwise", "tensorwise"])
def test_quantize_matches_reference_exactly(dtype, rowwise):
    x = randn(24, 48, seed=3) * torch.exp(3 * randn(24, 1, seed=4))  # rows spanning many decades
    x[5] = 0.0          # an all-zero row must not divide by zero
    x[7, 3] = 1e-30     # deep underflow
    q, s = quantize(x, dtype, rowwise)
    rq, rs = reference_quantize(x, dtype, rowwise)
    assert q.dtype == dtype and s.dtype == torch.float32
    assert s.shape == ((24, 1) if rowwise else ())
    assert torch.equal(s.double(), rs)
    assert torch.equal(q.double(), rq)
    assert torch.isfinite(q.float()).all()
    # the largest element of each row / of the tensor maps to the format's largest value
    fmax = torch.finfo(dtype).max
    peak = q.float().abs().amax(dim=-1) if rowwise else q.float().abs().amax()
    nonzero = x.abs().amax(dim=-1) > 0 if rowwise else torch.tensor(True)
    assert torch.all(peak[nonzero] == fmax)


@pytest.mark.parametrize("dtype", FP8)
def test_quantize_saturates_with_a_given_scale(dtype):
    fmax = torch.finfo(dtype).max
    x = randn(8, 32, seed=5) * fmax
    scale = torch.tensor(0.25)  # 4x too small: most values overflow and must clamp, not become inf/NaN
    q, _ = quantize(x, dtype, rowwise=False, scale=scale)
    rq, _ = reference_quantize(x, dtype, rowwise=False, scale=scale)
    assert torch.equal(q.double(), rq)
    assert (q.float().abs() == fmax).float().mean() > 0.5
    assert torch.isfinite(q.float()).all()


def test_quantize_rejects_bad_arguments():
    with pytest.raises(TypeError, match="float8"):
        quantize(randn(4, 4), torch.float16, rowwise=True)
    with pytest.raises(ValueError, match="2-D"):
        quantize(randn(2, 4, 4), E4M3, rowwise=True)


def test_a_given_scale_of_the_wrong_shape_is_a_clear_error():
    # A rowwise scale of shape (rows,) divided a square tensor column by column: silently wrong payloads.
    x = randn(4, 4, seed=94)
    for rowwise, scale in ((True, torch.full((4,), 0.5)), (True, torch.full((1, 4), 0.5)), (True, torch.full((3, 1), 0.5)),
                           (False, torch.full((4, 1), 0.5)), (True, torch.full((4, 4), 0.5)),
                           (False, torch.full((1, 1, 1), 0.5))):   # would have given q a third dimension
        with pytest.raises(ValueError, match="scale"):
            quantize(x, E4M3, rowwise, scale=scale)
    with pytest.raises(TypeError, match="scale"):
        quantize(x, E4M3, False, scale=0.5)
    for rowwise, scale in ((True, torch.full((4, 1), 0.5)), (False, torch.tensor(0.5)), (False, torch.full((1,), 0.5))):
        q, _ = quantize(x, E4M3, rowwise, scale=scale)
        assert torch.equal(q.double(), reference_quantize(x, E4M3, rowwise, scale=scale.reshape(-1, 1))[0])


@pytest.mark.parametrize("rowwise", [True, False], ids=["rowwise", "tensorwise"])
def test_q_is_row_major_with_a_given_scale_too(rowwise):
    # _scaled_mm takes its first operand row-major: a computed scale's q was, a given scale's q kept the
    # layout of a transposed input (also with pad_to_16 when no padding was needed).
    x = randn(32, 16, seed=95).t()
    scale = torch.full((16, 1), 0.01) if rowwise else torch.tensor(0.01)
    for pad in (False, True):
        q, _ = quantize(x, E4M3, rowwise, scale=scale, pad_to_16=pad)
        assert q.is_contiguous() and q.shape == (16, 32)
        assert torch.equal(q.double(), reference_quantize(x, E4M3, rowwise, scale=scale)[0])


# ---------------------------------------------------------------- the linear layer


def _run(impl, x, w, b, dy, grad_dtype, scaling):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    b = b.clone().requires_grad_() if b is not None else None
    y = fp8_linear(x, w, b, impl=impl, grad_dtype=grad_dtype, scaling=scaling)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, (b.grad if b is not None else None)


def _inputs(shape, k, n, bias, seed=0):
    x = randn(*shape, k, seed=seed)
    w = randn(n, k, seed=seed + 1, scale=k ** -0.5)
    b = randn(n, seed=seed + 2) if bias else None
    dy = randn(*shape, n, seed=seed + 3) * torch.exp(randn(*shape, 1, seed=seed + 4))  # uneven token scales
    return x, w, b, dy


@pytest.mark.parametrize("scaling", ["rowwise", "tensorwise"])
@pytest.mark.parametrize("grad_dtype", ["e5m2", "e4m3"])
@pytest.mark.parametrize("shape,bias", [((37,), True), ((3, 13), False)])  # token counts not multiples of 16
def test_emulated_linear_matches_reference_forward_and_backward(scaling, grad_dtype, shape, bias):
    k, n = 64, 48
    x, w, b, dy = _inputs(shape, k, n, bias)
    y, dx, dw, db = _run("emulate", x, w, b, dy, grad_dtype, scaling)
    ry, rdx, rdw, rdb = reference_fp8_linear(x, w, b, dy, grad_dtype=GRADS[grad_dtype], rowwise=scaling == "rowwise")
    # Same quantised operands, so only fp32 accumulation separates the two: fp32 tolerances. A single
    # element quantised differently moves an output by ~1e-2 of its scale and fails these.
    assert_close(y, ry, torch.float32, name="y")
    assert_close(dx, rdx, torch.float32, name="dx")
    assert_close(dw, rdw, torch.float32, name="dweight")
    if bias:
        assert_close(db, rdb, torch.float32, name="dbias")
    # ... and the comparison can tell FP8 from full precision at all:
    exact = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    with pytest.raises(AssertionError):
        assert_close(exact, ry, torch.float32)


@pytest.mark.parametrize("scaling", ["rowwise", "tensorwise"])
@pytest.mark.parametrize("grad_dtype", ["e5m2", "e4m3"])
def test_emulated_linear_sqnr_against_fp32(scaling, grad_dtype):
    x, w, b, dy = _inputs((2, 40), 128, 96, True, seed=10)
    dy = randn(2, 40, 96, seed=20)
    y, dx, dw, _ = _run("emulate", x, w, b, dy, grad_dtype, scaling)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y64 = torch.nn.functional.linear(x64, w64, b.double())
    y64.backward(dy.double())
    assert sqnr_db(y, y64) > SQNR_FWD_DB
    assert sqnr_db(dx, x64.grad) > SQNR_BWD_DB[grad_dtype]
    assert sqnr_db(dw, w64.grad) > SQNR_BWD_DB[grad_dtype]


def test_master_weight_dtype_is_kept():
    x = randn(20, 32, seed=1).to(torch.bfloat16).requires_grad_()
    w = randn(16, 32, seed=2, scale=0.2).requires_grad_()         # fp32 master weight, bf16 activations
    b = randn(16, seed=3).to(torch.float64).requires_grad_()
    y = fp8_linear(x, w, b, impl="emulate")
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32 and b.grad.dtype == torch.float64
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


@pytest.mark.parametrize("scaling", ["rowwise", "tensorwise"])
def test_zero_tokens_behave_like_nn_linear(scaling):
    # An empty batch: an empty output, an empty input gradient and a zero weight gradient, as F.linear
    # gives (the inf-norm of an empty operand has no identity and used to raise).
    x = torch.zeros(0, 32, requires_grad=True)
    w = randn(16, 32, seed=2).requires_grad_()
    b = randn(16, seed=3).requires_grad_()
    y = fp8_linear(x, w, b, impl="emulate", scaling=scaling)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 32) and torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def _skip_without_cpu_scaled_mm(scaling):
    from r1fast.fp8.support import torch_path

    ok, why = torch_path(torch.device("cpu"), scaling)
    if not ok:
        pytest.skip(why)


@pytest.mark.parametrize("scaling", ["rowwise", "tensorwise"])
@pytest.mark.parametrize("grad_dtype", ["e5m2", "e4m3"])
def test_scaled_mm_path_matches_emulation(scaling, grad_dtype):
    # On the CPU, torch 2.13's _scaled_mm is a plain kernel: it must agree with the emulation to fp32
    # rounding, including the weight-gradient GEMM whose reduced (token) dimension, 29, is padded to 32.
    # (torch 2.11's CPU kernel takes tensorwise scales only: rowwise is skipped there.)
    _skip_without_cpu_scaled_mm(scaling)
    x, w, b, dy = _inputs((29,), 64, 32, True, seed=7)
    got = _run("torch", x, w, b, dy, grad_dtype, scaling)
    want = _run("emulate", x, w, b, dy, grad_dtype, scaling)
    for name, g, e in zip(("y", "dx", "dweight", "dbias"), got, want):
        assert_close(g, e.double(), torch.float32, rtol=2e-5, name=name)


@pytest.mark.parametrize("scaling", ["rowwise", "tensorwise"])
def test_scaled_mm_path_float64_layer(scaling):
    _skip_without_cpu_scaled_mm(scaling)
    # _scaled_mm cannot write float64 (tensorwise used to fail inside it): it writes fp32, then casts.
    x = randn(9, 32, seed=1).double().requires_grad_()
    w = randn(16, 32, seed=2).double().requires_grad_()
    y = fp8_linear(x, w, impl="torch", scaling=scaling)
    want = fp8_linear(x.detach(), w.detach(), impl="emulate", scaling=scaling)
    assert y.dtype == torch.float64
    assert_close(y, want, torch.float32, rtol=2e-5, name="y")
    y.sum().backward()
    assert x.grad.dtype == w.grad.dtype == torch.float64


def _assert_within(got, want, bound, name):
    err = (got.double() - want.double()).abs()
    bad = err > bound
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(f"{name}: {int(bad.sum())}/{bad.numel()} elements off; first at flat index {i}: got "
                             f"{got.flatten()[i].item():.8g}, expected {want.flatten()[i].item():.8g}, "
                             f"bound {bound.flatten()[i].item():.3g}")


# Per-element bounds for the "torch" path against the emulation on a GPU, both writing bf16. Each
# rounds its fp32 result to bf16 once (half an ulp, at most 2^-8 of the value, each: 2^-7 between
# them); the forward rounds again after adding the bias, so its term is relative to |y| + 2|bias|,
# not |y| (a bias cancelling the product left elements like y = -0.195 off by 0.0078, one ulp of the
# product ~1.1, against a bound of 3% of 0.195: the H200 run's 177-200 of 153600). The sums differ
# too: the backward GEMMs only by fp32 summation order (within 2^-15 of the sum of |terms| at
# K <= 512 even in the worst case; 2^-14 leaves room), the forward by Hopper's fast accumulation (use_fast_accum, which
# keeps about 13-14 bits and adds its truncation per k-block: 2^-9 of the sum of |terms| at K = 256).
FP8_GPU_BOUNDS = {"y": 2.0 ** -9, "dx": 2.0 ** -14, "dweight": 2.0 ** -14}


@pytest.mark.gpu
@pytest.mark.parametrize("scaling", ["rowwise", "tensorwise"])
@pytest.mark.parametrize("grad_dtype", ["e5m2", "e4m3"])
def test_scaled_mm_path_on_gpu_bf16(scaling, grad_dtype):
    from r1fast.fp8.support import cuda_fp8_support

    if not cuda_fp8_support()[0]:
        pytest.skip(cuda_fp8_support()[1])
    dev = "cuda"
    x, w, b, dy = (t.to(dev, torch.bfloat16) if t is not None else None for t in _inputs((300,), 256, 512, True))
    got = _run("torch", x, w, b, dy, grad_dtype, scaling)
    want = _run("emulate", x, w, b, dy, grad_dtype, scaling)
    ax, aw, ady = x.double().abs(), w.double().abs(), dy.double().abs()
    abs_terms = {"y": ax @ aw.t(), "dx": ady @ aw, "dweight": ady.t() @ ax}  # sum of |terms| per output
    for name, g, e in zip(("y", "dx", "dweight"), got, want):
        magnitude = e.double().abs() + (2 * b.double().abs() if name == "y" else 0)
        _assert_within(g, e, 2.0 ** -7 * magnitude + FP8_GPU_BOUNDS[name] * abs_terms[name] + 1e-6, name)
    assert torch.equal(got[3], want[3])  # the bias gradient is the same fp32 sum on both paths


def test_fp8_linear_rejects_bad_arguments():
    x, w = randn(4, 32), randn(16, 32)
    with pytest.raises(ValueError, match="impl"):
        fp8_linear(x, w, impl="cuda")
    with pytest.raises(ValueError, match="grad_dtype"):
        fp8_linear(x, w, grad_dtype="e3m4")
    with pytest.raises(ValueError, match="scaling"):
        fp8_linear(x, w, scaling="blockwise")
    with pytest.raises(ValueError, match="in_features 32"):
        fp8_linear(randn(4, 31), w)
    with pytest.raises(ValueError, match="bias"):
        fp8_linear(x, w, randn(15))
    with pytest.raises(TypeError, match="floating point"):
        fp8_linear(x.long(), w)


def test_torch_impl_rejects_unaligned_weights():
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8_linear(randn(4, 24), randn(16, 24), impl="torch")


def test_autocast_sets_the_output_dtype_but_not_the_numerics():
    x, w, b, dy = _inputs((20,), 32, 16, True, seed=30)
    dy = dy.bfloat16().float()  # the gradient reaching a bf16 output is bf16
    want = _run("emulate", x, w, b, dy, "e5m2", "rowwise")
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8_linear(x1, w1, b, impl="emulate")
    assert y.dtype == torch.bfloat16
    y.backward(dy.bfloat16())
    # same numerics as without autocast: only the bf16 rounding of the output and of the bias add
    # differ in forward; the gradients are the emulation's to fp32 accuracy
    assert max_rel_err(y.detach(), want[0]) < 8e-3
    assert max_rel_err(w1.grad, want[2]) < 1e-5
    assert x1.grad.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("rowwise", [True, False], ids=["rowwise", "tensorwise"])
def test_cuda_quantizer_matches_reference_exactly(dtype, rowwise):
    # On CUDA quantize() is the torch.compile'd kernel: it must still be bit-exact.
    x = (randn(300, 256, seed=40) * torch.exp(2 * randn(300, 1, seed=41))).to(torch.bfloat16)
    q, s = quantize(x.cuda(), dtype, rowwise)
    rq, rs = reference_quantize(x, dtype, rowwise)
    assert torch.equal(s.cpu().double(), rs) and torch.equal(q.cpu().double(), rq)


@contextlib.contextmanager
def quantiser_under_inductor(monkeypatch, division):
    """The compiled quantiser (module r1fast.fp8.quantization, yielded) with no entry compiled yet, as
    Inductor compiles it: "fp32" where Inductor has exact fp32 division, "fp64" as where it has not
    (the casts to float64 around the division). Dynamo is reset afterwards, so no entry compiled
    under these settings is left for later tests."""
    import r1fast.fp8.quantization as qmod

    monkeypatch.setattr(qmod, "_compiled", {})
    monkeypatch.setattr(qmod, "_divide_in_fp64", False)
    if division == "fp64":
        monkeypatch.setattr(qmod, "_exact_division_options", lambda: None)
    torch._dynamo.reset()
    try:
        yield qmod
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("division", ["fp32", "fp64"])
def test_compiled_quantizer_matches_reference_on_cpu(monkeypatch, division):
    # The fused (torch.compile) quantiser that CUDA uses, compiled here by inductor's CPU backend
    # (~20 s of compile): the same bits as the oracle. "fp64": the casts of a torch whose Inductor
    # has no exact fp32 division option.
    x = (randn(40, 64, seed=50) * torch.exp(2 * randn(40, 1, seed=51))).to(torch.bfloat16)
    x[3] = 0.0  # a zero row: the compiled scale's clamp to AMAX_EPS
    with quantiser_under_inductor(monkeypatch, division) as qmod:
        # x.t(): the weight-gradient GEMM quantises dy^T and x^T, views, and _scaled_mm needs its first
        # operand row-major, so the compiled kernel must write q contiguous as eager mode does
        for src in (x, x.t()):
            for rowwise in (True, False):
                for dtype in FP8:
                    q, s = qmod._fused_quantize(src, dtype, rowwise)
                    assert not qmod._compile_failed
                    rq, rs = reference_quantize(src, dtype, rowwise)
                    assert torch.equal(s.double(), rs) and torch.equal(q.double(), rq)
                    assert q.is_contiguous()
        assert qmod._divide_in_fp64 == (division == "fp64")


@contextlib.contextmanager
def quantiser_under_dynamo_only(monkeypatch):
    """The compiled quantiser (module r1fast.fp8.quantization, yielded) with no entry compiled yet, traced
    by Dynamo with backend "eager": its guards and recompiles without Inductor's compile time. Hitting
    Dynamo's recompile limit raises, where it silently ran the rest eagerly."""
    import r1fast.fp8.quantization as qmod

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, dynamic=kw.get("dynamic"), backend="eager"))
    monkeypatch.setattr(qmod, "_compiled", {})
    monkeypatch.setattr(qmod, "_compile_failed", False)
    torch._dynamo.reset()
    try:
        # config.patch, not monkeypatch: monkeypatch's undo left the config module without the option
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            yield qmod
    finally:
        torch._dynamo.reset()  # no eager-backend entries left for later tests' compiled quantiser


def test_compiled_quantizer_stays_under_the_recompile_limit(monkeypatch):
    # Every quantisation a linear layer makes in forward and backward (both formats, both scalings,
    # row-major and transposed operands, ones that require grad, bf16 and fp32 layers) must run
    # compiled: past Dynamo's recompile limit the rest silently ran eagerly (the H200 bench hit it
    # within one layer's fwd+bwd).
    with quantiser_under_dynamo_only(monkeypatch) as qmod:
        for layer_dtype in (torch.bfloat16, torch.float32):
            x = (randn(48, 32, seed=70) * torch.exp(randn(48, 1, seed=71))).to(layer_dtype)
            w = randn(64, 32, seed=72).to(layer_dtype)
            dy = randn(48, 64, seed=73).to(layer_dtype)
            operands = [(x.requires_grad_(), E4M3), (w.requires_grad_(), E4M3), (x.detach(), E4M3),
                        (w.detach().t(), E4M3), (x.detach().t(), E4M3)]
            operands += [(g, grad) for grad in FP8 for g in (dy, dy.t())]
            for rowwise in (True, False):
                for t, dtype in operands:
                    q, s = qmod._fused_quantize(t, dtype, rowwise)
                    assert not qmod._compile_failed, f"fell back to eager at {dtype}, rowwise={rowwise}"
                    rq, rs = reference_quantize(t, dtype, rowwise)
                    assert torch.equal(s.double(), rs) and torch.equal(q.double(), rq) and q.is_contiguous()


def test_torch_path_on_a_device_without_scaled_mm_is_a_clear_error(monkeypatch):
    """A model converted where _scaled_mm runs, then moved where it cannot (e.g. an A100): a clear
    error naming the device, not a failure inside _scaled_mm."""
    from r1fast.fp8 import linear as fp8_linear_mod

    fp8_linear_mod._torch_path_on.cache_clear()
    monkeypatch.setattr("r1fast.fp8.support.torch_path", lambda device, scaling="rowwise", *_: (False, "no FP8 tensor cores here"))
    try:
        with pytest.raises(RuntimeError, match="impl='torch' cannot run on cpu: no FP8 tensor cores here"):
            fp8_linear_mod.fp8_linear(torch.randn(4, 32), torch.randn(16, 32), impl="torch")
    finally:
        fp8_linear_mod._torch_path_on.cache_clear()


# ---------------------------------------------------------------- scales, dtypes and options end to end


@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("rowwise", [True, False], ids=["rowwise", "tensorwise"])
def test_tiny_magnitudes_get_their_own_scale_and_dequantize_back(dtype, rowwise):
    # Late-training gradients of ~1e-9: the scale is amax / FP8_MAX, not the all-zero row's AMAX_EPS
    # floor, and dequantize(quantize(x)) is x to the format's precision (both checked without the oracle,
    # which shares AMAX_EPS with the code under test).
    from r1fast.fp8 import dequantize

    x = randn(6, 32, seed=60) * 1e-9 * torch.exp(randn(6, 1, seed=61))
    q, s = quantize(x, dtype, rowwise)
    amax = x.abs().amax(dim=-1, keepdim=True) if rowwise else x.abs().amax()
    assert torch.equal(s, amax / torch.finfo(dtype).max)
    back = dequantize(q, s)
    assert back.dtype == torch.float32
    rel = {E4M3: 2.0 ** -4, E5M2: 2.0 ** -3}[dtype]   # half a mantissa step, plus one scale unit for subnormals
    assert torch.all((back - x).abs() <= rel * x.abs() + s)
    assert sqnr_db(back, x) > 20


@pytest.mark.parametrize("src", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("rowwise", [True, False], ids=["rowwise", "tensorwise"])
def test_half_precision_inputs_are_divided_in_fp32(src, dtype, rowwise):
    # bf16/fp16 activations: t / scale must be an fp32 quotient (a bf16 one loses 16 bits before the cast)
    x = (randn(24, 48, seed=62) * torch.exp(2 * randn(24, 1, seed=63))).to(src)
    q, s = quantize(x, dtype, rowwise)
    rq, rs = reference_quantize(x, dtype, rowwise)
    assert torch.equal(s.double(), rs) and torch.equal(q.double(), rq)


@pytest.mark.parametrize("dtype", FP8)
def test_quotients_next_to_a_rounding_tie_round_as_fp32_division_does(dtype):
    # t = fp32(mid * s) for every tie `mid` of the grid (and the fp32 neighbours of t): whether t / s
    # lands on the tie (then to even) or just past it depends on the quotient being rounded to fp32
    # first, which both the quantiser and the oracle must do.
    grid = finite_values(dtype)
    mids = (grid[1:] + grid[:-1]) / 2
    mids = mids[mids > 0]
    for sv in (0.1, 0.7, 1.3):
        s = torch.tensor(sv)
        t = (mids * sv).float()
        t = torch.cat([t, torch.nextafter(t, torch.zeros_like(t)), torch.nextafter(t, torch.full_like(t, 1e30))])
        t = t[(t / s).abs() <= torch.finfo(dtype).max]
        q, _ = quantize(t, dtype, rowwise=False, scale=s)
        rq, _ = reference_quantize(t, dtype, rowwise=False, scale=s)
        assert torch.equal(q.double(), rq)


def test_empty_operands_get_one_scale_per_row():
    # the weight-gradient GEMM of an empty batch quantises dy^T / x^T of shape (features, 0)
    from r1fast.fp8.quantization import AMAX_EPS

    for shape in [(0, 32), (16, 0)]:
        for dtype in FP8:
            q, s = quantize(torch.zeros(shape), dtype, rowwise=True)
            assert q.shape == shape and q.dtype == dtype
            assert s.shape == (shape[0], 1) and s.dtype == torch.float32
            assert torch.equal(s, torch.full((shape[0], 1), AMAX_EPS / torch.finfo(dtype).max))
            assert quantize(torch.zeros(shape), dtype, rowwise=False)[1].shape == ()


def test_a_failed_compile_falls_back_to_eager_and_is_remembered(monkeypatch):
    import r1fast.fp8.quantization as qmod

    def broken(*args):
        raise RuntimeError("no C compiler")
    monkeypatch.setattr(qmod, "_compiled", {(E5M2, True): broken, (E5M2, False): broken})
    monkeypatch.setattr(qmod, "_compile_failed", False)
    x = randn(8, 32, seed=64)
    for rowwise in (True, False):
        with pytest.warns(UserWarning, match="torch.compile of the FP8 quantiser failed"):
            q, s = qmod._fused_quantize(x, E5M2, rowwise)
        rq, rs = reference_quantize(x, E5M2, rowwise)
        assert s.shape == rs.shape and torch.equal(s.double(), rs) and torch.equal(q.double(), rq)
    assert qmod._compile_failed   # quantize() takes the eager path from now on, without retrying


def test_torch_compile_refusing_to_run_falls_back_to_eager_too(monkeypatch):
    # torch.compile raises when called where Dynamo cannot run (a Python newer than the torch supports):
    # the quantiser must fall back as for a failing compile, not raise from every FP8 layer.
    import r1fast.fp8.quantization as qmod

    def refuse(*args, **kwargs):
        raise RuntimeError("torch.compile is not supported on this Python")
    monkeypatch.setattr(torch, "compile", refuse)
    monkeypatch.setattr(qmod, "_compiled", {})
    monkeypatch.setattr(qmod, "_compile_failed", False)
    x = randn(8, 32, seed=65)
    for rowwise in (True, False):
        monkeypatch.setattr(qmod, "_compile_failed", False)
        with pytest.warns(UserWarning, match="torch.compile of the FP8 quantiser failed"):
            q, s = qmod._fused_quantize(x, E4M3, rowwise)
        rq, rs = reference_quantize(x, E4M3, rowwise)
        assert s.shape == rs.shape and torch.equal(s.double(), rs) and torch.equal(q.double(), rq)
        assert qmod._compile_failed


def test_mixed_precision_layer_keeps_fp32_accuracy_in_the_master_gradients():
    # bf16 activations and gradients, an fp32 master weight, a float64 bias: dW is written in the
    # weight's dtype and db summed in fp32, so both match the float64 oracle to fp32 accuracy.
    x = randn(20, 32, seed=65).bfloat16()
    w = randn(16, 32, seed=66, scale=0.2)
    b = randn(16, seed=67).double()
    dy = (randn(20, 16, seed=68) * torch.exp(randn(20, 1, seed=69))).bfloat16()
    _, dx, dw, db = _run("emulate", x, w, b, dy, "e5m2", "rowwise")
    _, rdx, rdw, rdb = reference_fp8_linear(x, w, b, dy, grad_dtype=E5M2, rowwise=True)
    assert dx.dtype == torch.bfloat16 and dw.dtype == torch.float32 and db.dtype == torch.float64
    assert_close(dw, rdw, torch.float32, name="dweight")
    assert_close(db, rdb, torch.float32, name="dbias")
    assert_close(dx.float(), rdx, torch.bfloat16, name="dx")


def test_each_gradient_is_computed_when_only_it_is_needed():
    x, w, b, dy = _inputs((10,), 32, 16, True, seed=70)
    _, full_dx, full_dw, _ = _run("emulate", x, w, b, dy, "e5m2", "rowwise")
    w1 = w.clone().requires_grad_()                 # a layer fed by a frozen input
    fp8_linear(x, w1, b, impl="emulate").backward(dy)
    assert torch.equal(w1.grad, full_dw)
    x1 = x.clone().requires_grad_()                 # a frozen weight
    fp8_linear(x1, w, b, impl="emulate").backward(dy)
    assert torch.equal(x1.grad, full_dx)


def test_autocast_keeps_the_fp32_gemm_bit_for_bit():
    # The FP8 GEMM's fp32 matmul must not be autocast to bf16: without a bias, the autocast output is
    # the plain fp32 output rounded once to bf16.
    x, w, _, _ = _inputs((24,), 64, 32, False, seed=71)
    want = fp8_linear(x, w, impl="emulate")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fp8_linear(x, w, impl="emulate")
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want.bfloat16())


@pytest.mark.parametrize("grad_dtype,scaling", [("e4m3", "tensorwise"), ("e5m2", "tensorwise"), ("e4m3", "rowwise")])
def test_fp8_linear_module_runs_with_its_own_grad_dtype_and_scaling(grad_dtype, scaling):
    from r1fast.fp8 import Fp8Linear

    x, w, b, dy = _inputs((21,), 64, 48, True, seed=72)
    lin = torch.nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    layer = Fp8Linear.from_linear(lin, impl="emulate", grad_dtype=grad_dtype, scaling=scaling)
    x1 = x.clone().requires_grad_()
    y = layer(x1)
    y.backward(dy)
    ry, rdx, rdw, _ = reference_fp8_linear(x, w, b, dy, grad_dtype=GRADS[grad_dtype], rowwise=scaling == "rowwise")
    assert_close(y, ry, torch.float32, name="y")
    assert_close(x1.grad, rdx, torch.float32, name="dx")
    assert_close(lin.weight.grad, rdw, torch.float32, name="dweight")


def test_fp8_linear_rejects_a_scalar_input_and_a_tensor_on_another_device():
    w = randn(16, 32)
    with pytest.raises(ValueError, match="in_features 32"):
        fp8_linear(torch.tensor(1.0), w)
    with pytest.raises(ValueError, match="x is on meta but weight is on cpu"):
        fp8_linear(torch.empty(4, 32, device="meta"), w)


def test_torch_impl_rejects_unaligned_output_features():
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8_linear(randn(4, 32), randn(24, 32), impl="torch")


def test_torch_path_check_asks_about_the_scaling_in_use(monkeypatch):
    """A CPU/GPU whose _scaled_mm takes tensorwise scales only: the tensorwise layer runs, the rowwise
    one is refused, each for its own scaling."""
    _skip_without_cpu_scaled_mm("tensorwise")
    from r1fast.fp8 import linear as fp8_linear_mod

    fp8_linear_mod._torch_path_on.cache_clear()
    monkeypatch.setattr("r1fast.fp8.support.torch_path",
                        lambda device, scaling="rowwise", *_: (scaling == "tensorwise", f"no {scaling} scales"))
    try:
        x, w = randn(4, 32, seed=73), randn(16, 32, seed=74)
        y = fp8_linear(x, w, impl="torch", scaling="tensorwise")
        assert_close(y, fp8_linear(x, w, impl="emulate", scaling="tensorwise").double(), torch.float32, rtol=2e-5)
        with pytest.raises(RuntimeError, match="no rowwise scales"):
            fp8_linear(x, w, impl="torch", scaling="rowwise")
    finally:
        fp8_linear_mod._torch_path_on.cache_clear()


def test_fp8_linear_rejects_an_integer_weight_and_the_gemm_an_unknown_impl():
    from r1fast.fp8.gemm import fp8_gemm_nt

    with pytest.raises(TypeError, match="floating point"):
        fp8_linear(randn(4, 32), randn(16, 32).long())
    with pytest.raises(ValueError, match="impl must be one of"):
        fp8_gemm_nt(randn(4, 32), E4M3, randn(16, 32), E4M3, rowwise=True, out_dtype=torch.float32, impl="cuda")


def test_autocast_output_takes_the_autocast_dtype_fp16_too():
    x, w, b, _ = _inputs((8,), 32, 16, True, seed=75)
    with torch.autocast("cpu", dtype=torch.float16):
        y = fp8_linear(x, w, b, impl="emulate")
    assert y.dtype == torch.float16
    assert max_rel_err(y.float(), fp8_linear(x, w, b, impl="emulate")) < 2e-3


@pytest.mark.parametrize("impl", ["emulate", "torch"])
def test_double_backward_through_an_fp8_layer_is_a_clear_error(impl):
    # A gradient penalty differentiates the layer's input gradient. The FP8 backward GEMMs record no
    # graph, so that second backward used to return the weight gradient without the penalty's term.
    if impl == "torch":
        _skip_without_cpu_scaled_mm("rowwise")   # fp8_linear's default scaling; torch 2.11's CPU kernel lacks it
    torch.manual_seed(80)
    x = torch.randn(8, 32, requires_grad=True)
    w = torch.randn(16, 32, requires_grad=True)
    y = fp8_linear(x, w, impl=impl)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="fp8_disabled"):
        torch.autograd.grad(y.sum() + gx.pow(2).sum(), w)


def test_create_graph_first_order_gradients_and_the_fp8_disabled_way_out():
    from r1fast.fp8 import Fp8Linear, fp8_disabled

    x, w, b, dy = _inputs((9,), 32, 16, True, seed=81)
    _, want_dx, want_dw, _ = _run("emulate", x, w, b, dy, "e5m2", "rowwise")
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    gx, gw = torch.autograd.grad(fp8_linear(x1, w1, b, impl="emulate"), (x1, w1), dy, create_graph=True)
    assert torch.equal(gx, want_dx) and torch.equal(gw, want_dw)    # first order: unchanged values
    layer = Fp8Linear.from_linear(torch.nn.Linear(32, 16), impl="emulate")
    x2 = x.clone().requires_grad_()
    with fp8_disabled():                                            # high precision: twice differentiable
        (g,) = torch.autograd.grad(layer(x2).pow(2).sum(), x2, create_graph=True)
        g.pow(2).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("impl", ["emulate", "torch"])
@pytest.mark.parametrize("scaling", ["rowwise", "tensorwise"])
def test_a_non_finite_input_gives_nan_never_a_finite_number(impl, scaling):
    # inf / NaN makes the operand's amax (so its scale) non-finite: the outputs it reaches are NaN, as
    # docs/fp8.md says; rowwise keeps a token's inf in that token's output row.
    if impl == "torch":
        _skip_without_cpu_scaled_mm(scaling)
    for bad in (float("inf"), float("nan")):
        x = randn(5, 32, seed=82)
        x[1, 3] = bad
        x.requires_grad_()
        w = randn(16, 32, seed=83).requires_grad_()
        y = fp8_linear(x, w, impl=impl, scaling=scaling)
        y.backward(torch.ones_like(y))
        rows_hit = torch.isnan(y).all(1).tolist()
        assert rows_hit == ([False, True, False, False, False] if scaling == "rowwise" else [True] * 5)
        assert torch.isfinite(y[~torch.isnan(y)]).all()
        assert torch.isnan(w.grad[:, 3]).all() and torch.isfinite(x.grad).all()   # dW's column 3 holds x[:, 3]


# ---------------------------------------------------------------- torch._scaled_mm's contract


def _strict_scaled_mm(calls, cuda_rules):
    """A stand-in for torch._scaled_mm that asserts the contract of its CUDA kernels (cuBLASLt for
    tensorwise scales, CUTLASS f8f8bf16_rowwise or cuBLASLt >= 12.9 for rowwise; torch 2.4 - 2.13,
    aten/src/ATen/native/cuda/{Blas,ScaledBlas,RowwiseScaledMM}.cpp/.cu), which the CPU kernel does not
    check (it multiplies two E5M2 operands, a row-major mat2, K = 24), then computes what the tensor
    cores do: the fp32 product of the payloads, times scale_a, times scale_b, rounded once to out_dtype."""
    def scaled_mm(mat1, mat2, *, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None,
                  use_fast_accum=False):
        assert mat1.dim() == 2 and mat2.dim() == 2
        assert mat1.dtype in (E4M3, E5M2) and mat2.dtype in (E4M3, E5M2), (mat1.dtype, mat2.dtype)
        assert not (mat1.dtype == E5M2 and mat2.dtype == E5M2), "Multiplication of two Float8_e5m2 matrices"
        (m, k), (k2, n) = mat1.shape, mat2.shape
        assert k == k2
        assert mat1.stride(1) == 1 and mat1.stride(0) >= k, f"mat1 must be row-major, strides {mat1.stride()}"
        assert mat2.stride(0) == 1 and mat2.stride(1) >= k, f"mat2 must be column-major, strides {mat2.stride()}"
        assert k % 16 == 0 and n % 16 == 0, f"K={k} and N={n} must be multiples of 16"
        assert scale_a.dtype == scale_b.dtype == torch.float32
        assert bias is None and scale_result is None
        assert out_dtype in (torch.bfloat16, torch.float16, torch.float32), out_dtype
        rowwise = not (scale_a.numel() == 1 and scale_b.numel() == 1)
        if rowwise:
            assert tuple(scale_a.shape) == (m, 1) and tuple(scale_b.shape) == (1, n), (scale_a.shape, scale_b.shape)
            assert scale_a.is_contiguous() and scale_b.t().is_contiguous() and scale_b.stride(1) == 1
            assert mat2.dtype == E4M3, "the rowwise kernel takes E4M3 only as its second operand"
            if cuda_rules:
                assert out_dtype == torch.bfloat16, "the CUTLASS rowwise kernel of torch < 2.9 writes bf16 only"
        if not cuda_rules:
            assert not use_fast_accum
        calls.append((mat1.dtype, mat2.dtype, (m, k, n), use_fast_accum))
        return ((mat1.float() @ mat2.float()) * scale_a * scale_b).to(out_dtype)
    return scaled_mm


@pytest.mark.parametrize("cuda_rules", [True, False], ids=["cuda", "cpu"])
@pytest.mark.parametrize("scaling", ["rowwise", "tensorwise"])
@pytest.mark.parametrize("grad_dtype", ["e5m2", "e4m3"])
@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16])
def test_scaled_mm_calls_keep_the_cuda_contract(monkeypatch, cuda_rules, scaling, grad_dtype, act_dtype):
    # Each of the three GEMMs of the "torch" path, as _scaled_mm would receive it on an H100 (cuda) or
    # the CPU: operand dtypes (the gradient first, never E5M2 x E5M2), layouts, 16-multiples (29 tokens
    # padded to 32 in the weight-gradient GEMM), scale shapes, output dtype and fast accumulation
    # (forward only); and the results equal the emulation's, rounded where the kernel writes bf16.
    import r1fast.fp8.gemm as gemm
    import r1fast.fp8.linear as lin

    calls = []
    monkeypatch.setattr(torch, "_scaled_mm", _strict_scaled_mm(calls, cuda_rules))
    monkeypatch.setattr(gemm, "_follows_cuda_rules", lambda t: cuda_rules)
    monkeypatch.setattr(lin, "_check_torch_path", lambda device, scaling, *_: None)
    x, w, b, dy = _inputs((29,), 64, 32, True, seed=90)
    x, dy = x.to(act_dtype), dy.to(act_dtype)
    got = _run("torch", x, w, b, dy, grad_dtype, scaling)
    want = _run("emulate", x, w, b, dy, grad_dtype, scaling)
    g = GRADS[grad_dtype]
    assert calls == [(E4M3, E4M3, (29, 64, 32), cuda_rules),      # y  = x @ W^T
                     (g, E4M3, (29, 32, 64), False),               # dx = dy @ W
                     (g, E4M3, (32, 32, 64), False)]               # dW = dy^T @ x, tokens padded to 32
    if cuda_rules and scaling == "rowwise":
        # the kernel writes bf16, cast to the layer's dtype afterwards (the bias is added after that)
        y_nobias = _run("emulate", x, w, None, dy, grad_dtype, scaling)[0]
        want = (y_nobias.bfloat16().to(act_dtype) + b.to(act_dtype), want[1].bfloat16().to(act_dtype),
                want[2].bfloat16().float(), want[3])
    for name, gv, ev in zip(("y", "dx", "dweight", "dbias"), got, want):
        assert gv.dtype == ev.dtype, name
        assert_close(gv.double(), ev.double(), torch.float32, rtol=2e-5, name=name)


# ---------------------------------------------------------------- zeros


@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("rowwise", [True, False], ids=["rowwise", "tensorwise"])
def test_an_all_zero_tensor_quantizes_to_zeros_with_a_finite_scale(dtype, rowwise):
    # amax 0 (a zero-initialised weight, a fully masked gradient): the scale is the AMAX_EPS floor,
    # finite and positive, never 0 (0 / 0 = NaN payloads) or inf.
    q, s = quantize(torch.zeros(8, 32), dtype, rowwise)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.equal(q.float(), torch.zeros(8, 32))


@pytest.mark.parametrize("impl", ["emulate", "torch"])
@pytest.mark.parametrize("scaling", ["rowwise", "tensorwise"])
def test_a_zero_weight_and_zero_gradient_rows_give_exact_zeros(impl, scaling):
    if impl == "torch":
        _skip_without_cpu_scaled_mm(scaling)
    # A zero-initialised weight (e.g. LoRA's B): y is exactly the bias, dx exactly zero, dW the oracle's.
    x, w, b, dy = _inputs((20,), 32, 16, True, seed=91)
    y, dx, dw, _ = _run(impl, x, torch.zeros_like(w), b, dy, "e5m2", scaling)
    assert torch.equal(y, b.expand_as(y)) and torch.equal(dx, torch.zeros_like(dx))
    rdw = reference_fp8_linear(x, torch.zeros_like(w), b, dy, grad_dtype=E5M2, rowwise=scaling == "rowwise")[2]
    assert_close(dw, rdw, torch.float32, rtol=2e-5, name="dweight")
    # Tokens whose gradient is zero (masked out of the loss): their rows of dx are exactly zero.
    dy[::3] = 0
    _, dx, dw, _ = _run(impl, x, w, b, dy, "e5m2", scaling)
    assert torch.equal(dx[::3], torch.zeros_like(dx[::3])) and torch.isfinite(dx).all() and torch.isfinite(dw).all()
    assert (dx[1::3] != 0).any()


@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("rowwise", [True, False], ids=["rowwise", "tensorwise"])
def test_a_given_scale_saturates_finite_values_but_never_an_inf(dtype, rowwise):
    # With a caller's scale the overflow of a finite value saturates at ±FP8_MAX, but an inf input
    # used to saturate too: a plausible finite payload in place of the overflow upstream. It is NaN,
    # as NaN is, and the other elements keep the oracle's values.
    fmax = torch.finfo(dtype).max
    x = randn(6, 32, seed=92) * fmax
    x[1, 2], x[3, 5], x[4, 7] = float("inf"), float("-inf"), float("nan")
    scale = torch.full((6, 1), 0.25) if rowwise else torch.tensor(0.25)
    q, _ = quantize(x, dtype, rowwise, scale=scale)
    rq, _ = reference_quantize(x, dtype, rowwise, scale=scale)
    bad = ~torch.isfinite(x)
    assert torch.isnan(q.float()[bad]).all() and torch.isnan(rq[bad]).all()
    assert torch.equal(q.double()[~bad], rq[~bad]) and torch.isfinite(q.float()[~bad]).all()
    assert (q.float()[~bad].abs() == fmax).any()          # saturation did happen


@pytest.mark.parametrize("bad_scale", [0.0, -1.0, float("inf"), float("nan")])
def test_a_given_scale_that_is_not_finite_and_positive_gives_nan(bad_scale):
    # t / inf is 0 and t / 0 saturates: either would be a finite payload with no meaning
    x = randn(4, 32, seed=93)
    for rowwise, scale in ((False, torch.tensor(bad_scale)), (True, torch.tensor([[1.0], [bad_scale], [1.0], [1.0]]))):
        q, _ = quantize(x, E4M3, rowwise, scale=scale)
        rq, _ = reference_quantize(x, E4M3, rowwise, scale=scale)
        hit = torch.isnan(q.float()).all(dim=-1)
        assert hit.tolist() == ([True] * 4 if not rowwise else [False, True, False, False])
        assert torch.equal(torch.isnan(rq), torch.isnan(q.float()))
        assert torch.equal(q.double()[~hit], rq[~hit])
