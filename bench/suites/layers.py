"""layers: the decoder's RMSNorm (alone and with the residual add before it), SwiGLU activation and
rotary embedding (ops.rms_norm, ops.add_rms_norm, ops.swiglu, ops.rotary), fwd and fwd+bwd.

Memory-bound elementwise / row-reduction work: the floor is the bytes a fused kernel must move over
the measured copy bandwidth:
    rms_norm  fwd: read x, write y (2·T·H elements);  fwd+bwd: + read dy and x, write dx (5·T·H)
    add_rms_norm  fwd: read x and r, write s and y (4·T·H);  fwd+bwd: + read dy, ds and s, write dx (8·T·H)
    swiglu    fwd: read gate and up, write out (3·T·I);  fwd+bwd: + read dy, gate, up, write both
              gradients (8·T·I); "triton packed" reads gate and up as the halves of one [T, 2I]
              tensor and writes its gradient whole, as the decoder's fused gate/up projection needs
    rotary    fwd: read q and k, write both (2·T·(Hq+Hk)·D) + cos/sin (2·T·D);  fwd+bwd: twice that
(the weight, rstd and dw partials are O(H + T): left out). GPU size: Qwen2.5-1.5B's hidden 1536,
intermediate 8960 and attention (12 q heads, 2 k heads, head_dim 128) over 16k tokens, bf16.
r1fast: the triton backend (the fused kernels) and the torch backend (the decoder's plain
expressions: transformers' RMSNorm, F.silu(g) * u). Peers: torch's own F.rms_norm (a fused kernel
on CUDA) and eager F.silu(g) * u, torch.compile of the torch expressions (CUDA only), and Liger's
LigerRMSNorm (casting_mode="llama", the same numerics) / LigerSiLUMulFunction when importable.
Rotary: the triton backend (q and k in one launch) and the torch backend (transformers' expression,
five kernels per tensor on CUDA) beside torch.compile of that expression.
"""
import torch
import torch.nn.functional as F

from r1fast import ops
from r1fast.bench.harness import Case, Impl, Skip, generator, require_backend, suite

EPS = 1e-6


def _norm_inputs(t, h, dtype, device):
    g = generator(device, 0)  # drawn on the device: seconds on the CPU at GPU size
    x = torch.randn(t, h, generator=g, device=device).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(h, generator=g, device=device)).to(dtype).requires_grad_()
    dy = torch.randn(t, h, generator=g, device=device).to(dtype)
    return x, w, dy


def _swiglu_inputs(t, i, dtype, device):
    g = generator(device, 1)
    gate = (2 * torch.randn(t, i, generator=g, device=device)).to(dtype).requires_grad_()
    up = torch.randn(t, i, generator=g, device=device).to(dtype).requires_grad_()
    dy = torch.randn(t, i, generator=g, device=device).to(dtype)
    return gate, up, dy


def _add_norm_timed(fn, inputs, mode):
    x, r, w, dy, ds = inputs
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(x, r, w)
        return run
    return lambda: torch.autograd.grad(fn(x, r, w), (x, r, w), (dy, ds))


def _add_norm_impl(make_fn, inputs, mode, device, backend=None, cuda_only=False):
    def setup():
        if backend is not None:
            require_backend("add_rms_norm", backend, device)
        if cuda_only and device.type != "cuda":
            raise Skip(f"CUDA only, not {device.type}")
        x, w, dy = _norm_inputs(*inputs)
        g = generator(device, 3)
        r = torch.randn(x.shape, generator=g, device=x.device).to(x.dtype).requires_grad_()
        ds = torch.randn(x.shape, generator=g, device=x.device).to(x.dtype)
        return _add_norm_timed(make_fn(), (x, r, w, dy, ds), mode)
    return setup


def _compiled_add_norm():
    from r1fast.ops.layers import add_rms_norm_torch

    return torch.compile(lambda a, b, c: add_rms_norm_torch(a, b, c, EPS), dynamic=False)


def _rotary_inputs(t, hq, hk, d, dtype, device):
    g = generator(device, 2)
    q = torch.randn(t, hq, d, generator=g, device=device).to(dtype).requires_grad_()
    k = torch.randn(t, hk, d, generator=g, device=device).to(dtype).requires_grad_()
    theta = torch.rand(t, d // 2, generator=g, device=device) * 1000
    theta = torch.cat((theta, theta), dim=-1)
    dq = torch.randn(t, hq, d, generator=g, device=device).to(dtype)
    dk = torch.randn(t, hk, d, generator=g, device=device).to(dtype)
    return q, k, theta.cos().to(dtype), theta.sin().to(dtype), dq, dk


def _rotary_timed(fn, inputs, mode):
    q, k, cos, sin, dq, dk = inputs
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(q, k, cos, sin)
        return run
    return lambda: torch.autograd.grad(fn(q, k, cos, sin), (q, k), (dq, dk))


def _r1fast_rotary(backend, inputs, mode, device):
    def setup():
        require_backend("rotary", backend, device)
        return _rotary_timed(lambda *a: ops.rotary(*a, backend=backend), inputs(), mode)
    return setup


def _compiled_rotary(inputs, mode, device):
    def setup():
        if device.type != "cuda":
            raise Skip(f"CUDA only, not {device.type}")
        from r1fast.ops.layers import rotary_torch  # the torch backend's expression, without the dispatch

        return _rotary_timed(torch.compile(rotary_torch, dynamic=False), inputs(), mode)
    return setup


def _timed(fn, inputs, mode):
    """The callable to time: forward (no autograd graph) or forward + backward from a fixed cotangent."""
    *args, dy = inputs
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(*args)
        return run

    def run_bwd():
        return torch.autograd.grad(fn(*args), args, dy)
    return run_bwd


def _r1fast(op, backend, inputs, mode, device):
    def setup():
        require_backend(op.removesuffix("_packed"), backend, device)
        if op == "rms_norm":
            return _timed(lambda a, b: ops.rms_norm(a, b, EPS, backend=backend), inputs(), mode)
        if op == "swiglu_packed":  # gate and up as the halves of one [T, 2I] tensor, as the decoder's MLP runs it
            gate, up, dy = inputs()
            packed = torch.cat((gate, up), -1).detach().requires_grad_()
            return _timed(lambda a: ops.swiglu(a, backend=backend), (packed, dy), mode)
        return _timed(lambda a, b: ops.swiglu(a, b, backend=backend), inputs(), mode)
    return setup


def _peer(make_fn, inputs, mode, device, cuda_only=False):
    def setup():
        if cuda_only and device.type != "cuda":
            raise Skip(f"CUDA only, not {device.type}")
        return _timed(make_fn(), inputs(), mode)
    return setup


def _torch_rms_norm():
    return lambda a, b: F.rms_norm(a, (a.shape[-1],), b, EPS)


def _compiled_rms_norm():
    from r1fast.ops.layers import rms_norm_torch  # the torch backend's expression, without the dispatch

    return torch.compile(lambda a, b: rms_norm_torch(a, b, EPS), dynamic=False)


def _liger_rms_norm():
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    # what LigerRMSNorm(casting_mode="llama") runs, on our weight leaf (in_place=False: dy stays intact)
    return lambda a, b: LigerRMSNormFunction.apply(a, b, EPS, 0.0, "llama", False)


def _torch_swiglu():
    return lambda a, b: F.silu(a) * b


def _compiled_swiglu():
    return torch.compile(lambda a, b: F.silu(a) * b, dynamic=False)


def _liger_swiglu():
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return lambda a, b: LigerSiLUMulFunction.apply(a, b)


@suite("layers")
def cases(size, device):
    """Fused RMSNorm (+ residual add), SwiGLU and rotary (fwd, fwd+bwd) vs the torch expressions,
    torch.compile and Liger."""
    if size == "gpu":
        t, h, i, dtype = 16384, 1536, 8960, torch.bfloat16
    else:
        t, h, i, dtype = 64, 48, 80, torch.float32
    hq, hk, d = 12, 2, 128
    es = torch.finfo(dtype).bits // 8
    dt = str(dtype).removeprefix("torch.")
    out = []
    for mode, norm_elems, swiglu_elems in (("fwd", 2, 3), ("fwd_bwd", 5, 8)):
        norm = lambda: _norm_inputs(t, h, dtype, device)  # noqa: E731
        impls = [Impl("r1fast", b, _r1fast("rms_norm", b, norm, mode, device)) for b in ("triton", "torch")]
        impls += [Impl("torch", "F.rms_norm", _peer(_torch_rms_norm, norm, mode, device)),
                  Impl("torch", "compile", _peer(_compiled_rms_norm, norm, mode, device, cuda_only=True)),
                  Impl("liger", "LigerRMSNorm", _peer(_liger_rms_norm, norm, mode, device, cuda_only=True),
                       requires=("liger_kernel",))]
        out.append(Case(f"rms_norm T={t} H={h}", mode, dt, impls, bytes=norm_elems * t * h * es, items=t))
        shape = (t, h, dtype, device)
        impls = [Impl("r1fast", b, _add_norm_impl(lambda b=b: lambda x, r, w: ops.add_rms_norm(x, r, w, EPS, backend=b),
                                                  shape, mode, device, backend=b)) for b in ("triton", "torch")]
        impls.append(Impl("torch", "compile", _add_norm_impl(_compiled_add_norm, shape, mode, device, cuda_only=True)))
        out.append(Case(f"add_rms_norm T={t} H={h}", mode, dt, impls, bytes=(4 if mode == "fwd" else 8) * t * h * es,
                        items=t))
        sw = lambda: _swiglu_inputs(t, i, dtype, device)  # noqa: E731
        impls = [Impl("r1fast", b, _r1fast("swiglu", b, sw, mode, device)) for b in ("triton", "torch")]
        impls.append(Impl("r1fast", "triton packed", _r1fast("swiglu_packed", "triton", sw, mode, device)))
        impls += [Impl("torch", "eager", _peer(_torch_swiglu, sw, mode, device)),
                  Impl("torch", "compile", _peer(_compiled_swiglu, sw, mode, device, cuda_only=True)),
                  Impl("liger", "LigerSiLUMulFunction", _peer(_liger_swiglu, sw, mode, device, cuda_only=True),
                       requires=("liger_kernel",))]
        out.append(Case(f"swiglu T={t} I={i}", mode, dt, impls, bytes=swiglu_elems * t * i * es, items=t))
        rot = lambda: _rotary_inputs(t, hq, hk, d, dtype, device)  # noqa: E731
        impls = [Impl("r1fast", b, _r1fast_rotary(b, rot, mode, device)) for b in ("triton", "torch")]
        impls.append(Impl("torch", "compile", _compiled_rotary(rot, mode, device)))
        passes = 1 if mode == "fwd" else 2
        out.append(Case(f"rotary T={t} heads={hq}+{hk} D={d}", mode, dt, impls,
                        bytes=passes * 2 * t * ((hq + hk) * d + d) * es, items=t))
    return out
