"""The passes over memory one FP8 linear makes, counted: a pass added by a change shows here.

The "torch" path's minimum, per layer and step (rowwise or tensorwise): forward quantises x and W
and runs one GEMM; backward quantises dy twice (per token for the input gradient, per output feature
for the weight gradient: two sets of values, not one layout of the same), W^T and x^T along the
dimension their GEMMs reduce (other scales than forward's), and runs two GEMMs. Everything else is
a view, except the bias's add and sum: the zero columns _scaled_mm needs in the weight-gradient
operands when the token count is not a multiple of 16 are written by the quantiser's own kernel. On
CUDA each quantiser call is one compiled function; here it is one entry of the list, its insides
counted apart (the eager fallback; the compiled one's kernels below).
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import r1fast.fp8.gemm as gemm
import r1fast.fp8.linear as lin
from r1fast.fp8 import fp8_linear
from r1fast.fp8.quantization import quantize

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# ops that make no pass over memory: views and aliases
VIEWS = {"view", "_unsafe_view", "t", "transpose", "unsqueeze", "squeeze", "expand", "detach", "alias",
         "as_strided", "permute", "slice", "select", "_reshape_alias", "reshape"}


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for t in tree:
            yield from _tensors(t)
    elif isinstance(tree, dict):
        yield from _tensors(list(tree.values()))


class _Recorder(TorchDispatchMode):
    """Names every aten op run while it is on and `muted` is zero that touches a tensor of more than
    `small` elements: views left out, and the work on vectors (scales, a bias and its gradient)."""

    def __init__(self, small=0):
        super().__init__()
        self.ops, self.muted, self.small = [], 0, small

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        largest = max((t.numel() for t in _tensors((args, kwargs, out))), default=0)
        if not self.muted and name not in VIEWS and largest > self.small:
            self.ops.append((name, out))
        return out


def _layer_ops(monkeypatch, m, scaling, bias, grad_dtype="e5m2"):
    """(forward ops, backward ops) of one torch-path fp8_linear at M=m, K=64, N=32 in bf16: a quantiser
    call is ("quantize", format, its input's shape, whether that input is a transposed view)."""
    rec = _Recorder(small=64)  # no vector here is longer than K = 64; every matrix is longer
    real_quantize, real_mm = gemm.quantize, torch._scaled_mm

    def counted_quantize(t, dtype, rowwise, scale=None, **kw):
        rec.muted += 1
        try:
            return real_quantize(t, dtype, rowwise, scale, **kw)
        finally:
            rec.muted -= 1
            rec.ops.append((("quantize", dtype, tuple(t.shape), not t.is_contiguous()), None))

    def counted_mm(a, b, **kw):  # the CPU kernel where this torch has one for the scaling, else its result's shape
        rec.muted += 1
        try:
            out = real_mm(a, b, **kw) if torch_path_ok else torch.zeros(a.shape[0], b.shape[1], dtype=kw["out_dtype"])
        finally:
            rec.muted -= 1
        rec.ops.append((("_scaled_mm", a.dtype, b.dtype, (a.shape[0], a.shape[1], b.shape[1])), None))
        return out

    from r1fast.fp8.support import torch_path
    torch_path_ok = torch_path(torch.device("cpu"), scaling)[0]
    monkeypatch.setattr(gemm, "quantize", counted_quantize)
    monkeypatch.setattr(torch, "_scaled_mm", counted_mm)
    monkeypatch.setattr(lin, "_check_torch_path", lambda *_: None)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 64, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(32, 64, generator=g) / 8).bfloat16().requires_grad_()
    b = torch.randn(32, generator=g).bfloat16().requires_grad_() if bias else None
    dy = torch.randn(m, 32, generator=g).bfloat16()
    with rec:
        y = fp8_linear(x, w, b, impl="torch", scaling=scaling, grad_dtype=grad_dtype)
        n_fwd = len(rec.ops)
        y.backward(dy)
    names = [name for name, _ in rec.ops]
    return names[:n_fwd], names[n_fwd:]


def _minimum(m, m_padded):
    fwd = [("quantize", E4M3, (m, 64), False),          # x, a scale per token
           ("quantize", E4M3, (32, 64), False),         # W, a scale per output feature
           ("_scaled_mm", E4M3, E4M3, (m, 64, 32))]
    bwd = [("quantize", E5M2, (m, 32), False),          # dy, a scale per token
           ("quantize", E4M3, (64, 32), True),          # W^T, a scale per input feature
           ("_scaled_mm", E5M2, E4M3, (m, 32, 64)),     # dx = dy @ W
           ("quantize", E5M2, (32, m), True),           # dy^T, a scale per output feature
           ("quantize", E4M3, (64, m), True),           # x^T, a scale per input feature
           ("_scaled_mm", E5M2, E4M3, (32, m_padded, 64))]   # dW = dy^T @ x
    return fwd, bwd


@pytest.mark.parametrize("scaling", ["rowwise", "tensorwise"])
def test_a_layer_makes_the_minimum_of_passes(monkeypatch, scaling):
    # six quantiser calls and three GEMMs, not one copy, cast or transpose besides
    assert _layer_ops(monkeypatch, 48, scaling, bias=False) == _minimum(48, 48)


@pytest.mark.parametrize("scaling", ["rowwise", "tensorwise"])
def test_an_unaligned_token_count_adds_no_pass(monkeypatch, scaling):
    # 29 tokens: the weight-gradient GEMM reduces over them, so its quantised operands come with zero
    # columns up to 32, from the quantiser itself (it padded with two more 1-byte copies)
    assert _layer_ops(monkeypatch, 29, scaling, bias=False) == _minimum(29, 32)


def test_a_bias_adds_one_pass_in_each_direction(monkeypatch):
    fwd, bwd = _layer_ops(monkeypatch, 48, "rowwise", bias=True)
    want_fwd, want_bwd = _minimum(48, 48)
    assert fwd == want_fwd + ["add"]                     # y + bias, after the GEMM's rounding (the emulation's numerics)
    assert bwd == want_bwd + ["sum"]                     # dbias: fp32 sums of dy over tokens


# ---------------------------------------------------------------- the eager quantiser (CPU, and CUDA without a compiler)


@pytest.mark.parametrize("src", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("rowwise", [True, False], ids=["rowwise", "tensorwise"])
def test_the_eager_quantiser_makes_one_fp32_temporary_and_writes_q_row_major(src, transposed, rowwise):
    g = torch.Generator().manual_seed(3)
    t = torch.randn(48, 80, generator=g).to(src)
    t = t.t() if transposed else t
    rec = _Recorder()
    with rec:
        q, scale = quantize(t, E4M3, rowwise)
    full = [(name, out.dtype) for name, out in rec.ops if isinstance(out, torch.Tensor) and out.numel() == t.numel()]
    # the amax reads t once more and makes only (rows, 1) or a 0-d tensor
    widen = [("_to_copy", torch.float32)] if src != torch.float32 else []
    assert full == widen + [("div_" if widen else "div", torch.float32), ("_to_copy", E4M3)]
    assert q.is_contiguous()
    want = (t.float() / scale).to(E4M3).contiguous()  # the same values as the spec's formula, bit for bit
    assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))


# ---------------------------------------------------------------- the compiled quantiser's padding


def _skewed(m, k, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g) * torch.exp(2 * torch.randn(m, 1, generator=g))).to(torch.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("division", ["fp32", "fp64"])
def test_the_compiled_quantiser_pads_in_its_own_kernel(monkeypatch, division):
    # The torch.compile'd quantiser CUDA runs, compiled by Inductor's CPU backend (~40 s): an unaligned
    # operand comes back zero-padded to a multiple of 16 with the bits of the reference's q padded, and
    # the padding is fused into the cast (as many kernels as the same quantisation unpadded)
    from r1fast.fp8.reference import reference_quantize
    from test_fp8_numerics import quantiser_under_inductor
    from torch._inductor import metrics

    x = _skewed(45, 64, seed=11)
    x[3] = 0.0  # the zero-scale clamp, now in an operand's column
    with quantiser_under_inductor(monkeypatch, division) as qmod:
        for rowwise in (True, False):
            kernels = {}
            for pad in (False, True):
                metrics.reset()
                q, s = qmod._fused_quantize(x.t(), E4M3, rowwise, pad)   # x^T of the weight-gradient GEMM, 45 tokens
                kernels[pad] = metrics.generated_kernel_count
                assert not qmod._compile_failed
                rq, rs = reference_quantize(x.t(), E4M3, rowwise)
                want = rq.to(E4M3)
                assert tuple(q.shape) == ((64, 48) if pad else (64, 45)) and q.is_contiguous()
                assert torch.equal(q.view(torch.uint8), qmod.pad_last_to_16(want).view(torch.uint8) if pad
                                   else want.view(torch.uint8))
                assert torch.equal(s.double(), rs)
            assert kernels[True] == kernels[False] > 0, kernels


def test_the_padded_quantisers_stay_under_the_recompile_limit(monkeypatch):
    # A training run's token counts vary step to step: the padded quantisers (only ever given an unaligned
    # last dimension) must not recompile per count, nor push the unpadded ones past Dynamo's limit.
    from r1fast.fp8.reference import reference_quantize
    from test_fp8_numerics import quantiser_under_dynamo_only

    with quantiser_under_dynamo_only(monkeypatch) as qmod:
        for layer_dtype in (torch.bfloat16, torch.float32):
            for m in (29, 48, 45, 100, 64, 33, 1, 17):
                x, dy = _skewed(m, 32, seed=m).to(layer_dtype), _skewed(m, 64, seed=m + 1).to(layer_dtype)
                for rowwise in (True, False):
                    for t, dtype in ((x, E4M3), (x.t(), E4M3), (dy, E5M2), (dy.t(), E5M2)):
                        q, s = qmod._fused_quantize(t, dtype, rowwise, pad=True)
                        assert not qmod._compile_failed, f"fell back to eager at m={m}, {dtype}, rowwise={rowwise}"
                        rq, rs = reference_quantize(t, dtype, rowwise)
                        assert torch.equal(s.double(), rs)
                        assert torch.equal(q.view(torch.uint8), qmod.pad_last_to_16(rq.to(dtype)).view(torch.uint8))
