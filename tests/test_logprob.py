"""ops.grouped_logprob: every backend against the float64 reference, forward and backward."""
import pytest
import torch

from r1fast import backends, ops
from r1fast.reference import loss as reference
from r1fast.testing import assert_close, assert_within_lowp_rule, generator, randn, record_launch_devices

FAST_BACKENDS = ["torch", "triton"]


def _inputs(n, h, v, seed, scale=1.0, lead=None):
    hidden = randn(*(lead or (n,)), h, dtype=torch.float64, seed=seed)
    weight = randn(v, h, dtype=torch.float64, seed=seed + 1, scale=scale / h ** 0.5)
    targets = torch.randint(0, v, lead or (n,), generator=generator(seed + 2))
    return hidden, weight, targets


def _expected(hidden, weight, targets, temperature, entropy, g_logp, g_ent):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = reference.logprob(h.reshape(-1, h.shape[-1]), w, targets.reshape(-1), temperature, True)
    lp, ent = lp.reshape(targets.shape), ent.reshape(targets.shape)
    obj = (lp * g_logp).sum() + ((ent * g_ent).sum() if entropy else 0.0)
    gh, gw = torch.autograd.grad(obj, (h, w))
    return lp.detach(), ent.detach(), gh, gw


# (N, H, V, temperature, entropy, chunk, logit scale, leading shape): vocab never a multiple of the
# tile, one token, several chunks, large-magnitude logits, temperature != 1, a [B, T] leading shape.
CASES = [
    (37, 40, 75, 0.7, True, 8, 1.0, None),
    (1, 16, 33, 1.0, False, None, 1.0, None),
    (20, 24, 50, 1.3, True, None, 60.0, None),
    (15, 17, 40, 1.0, True, 4, 3.0, (3, 5)),
]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}H{c[1]}V{c[2]}T{c[3]}")
def test_grouped_logprob_matches_reference(device, backend, case):
    n, h, v, temp, entropy, chunk, scale, lead = case
    hidden, weight, targets = _inputs(n, h, v, seed=n + v, scale=scale, lead=lead)
    g_logp = randn(*targets.shape, dtype=torch.float64, seed=5)
    g_ent = randn(*targets.shape, dtype=torch.float64, seed=6)
    e_lp, e_ent, e_gh, e_gw = _expected(hidden, weight, targets, temp, entropy, g_logp, g_ent)

    h32 = hidden.float().to(device).requires_grad_()
    w32 = weight.float().to(device).requires_grad_()
    out = ops.grouped_logprob(h32, w32, targets.to(device), temperature=temp, return_entropy=entropy,
                              backend=backend, chunk_size=chunk)
    lp, ent = out if entropy else (out, None)
    assert lp.dtype == torch.float32 and lp.shape == targets.shape
    obj = (lp * g_logp.float().to(device)).sum() + ((ent * g_ent.float().to(device)).sum() if entropy else 0.0)
    gh, gw = torch.autograd.grad(obj, (h32, w32))
    if scale <= 4:
        for a, e, name in ((lp, e_lp, "logp"), (ent, e_ent, "entropy"), (gh, e_gh, "grad_hidden"),
                           (gw, e_gw, "grad_weight")):
            if a is not None:
                assert_close(a, e, torch.float32, rtol=2e-5, atol=1e-5, name=name)
    else:
        # Logits of magnitude ~50 carry fp32 rounding that near-one-hot softmaxes amplify: hold the
        # kernel to the error of the reference itself run in fp32 (the low-precision rule).
        r_lp, r_ent, r_gh, r_gw = _expected(hidden.float(), weight.float(), targets, temp, entropy,
                                            g_logp.float(), g_ent.float())
        for a, r, e, name in ((lp, r_lp, e_lp, "logp"), (ent, r_ent, e_ent, "entropy"),
                              (gh, r_gh, e_gh, "grad_hidden"), (gw, r_gw, e_gw, "grad_weight")):
            if a is not None:
                assert_within_lowp_rule(a, r, e, factor=2.0, floor=1e-5, name=name)
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_padded_batch_with_mask_matches_reference_on_active_tokens(device, backend):
    """A padded [B, T] batch: only active tokens are computed; padding (target -100) comes back 0,
    its hidden states get no gradient; active tokens match the reference, forward and backward."""
    b, t, h, v = 3, 7, 20, 45
    hidden, weight, targets = _inputs(b * t, h, v, seed=11, lead=(b, t))
    lens = torch.tensor([7, 3, 1])
    mask = torch.arange(t)[None, :] < lens[:, None]
    targets = torch.where(mask, targets, -100)
    g_logp = randn(b, t, dtype=torch.float64, seed=12)
    g_ent = randn(b, t, dtype=torch.float64, seed=13)
    safe = torch.where(mask, targets, 0)
    e_lp, e_ent, e_gh, e_gw = _expected(hidden, weight, safe, 1.0, True, g_logp * mask, g_ent * mask)

    h32 = hidden.float().to(device).requires_grad_()
    w32 = weight.float().to(device).requires_grad_()
    for m in (mask, mask.float()):  # bool or 0/1 float
        lp, ent = ops.grouped_logprob(h32, w32, targets.to(device), mask=m.to(device), return_entropy=True,
                                      backend=backend, chunk_size=4)
        assert lp.shape == (b, t) and bool((lp[~mask.to(device)] == 0).all())
        obj = (lp * g_logp.float().to(device)).sum() + (ent * g_ent.float().to(device)).sum()
        gh, gw = torch.autograd.grad(obj, (h32, w32))
        m_d = mask.to(device)
        assert_close(lp[m_d], e_lp[mask], torch.float32, rtol=2e-5, atol=1e-5, name="logp")
        assert_close(ent[m_d], e_ent[mask], torch.float32, rtol=2e-5, atol=1e-5, name="entropy")
        assert_close(gh, e_gh, torch.float32, rtol=2e-5, atol=1e-5, name="grad_hidden")
        assert_close(gw, e_gw, torch.float32, rtol=2e-5, atol=1e-5, name="grad_weight")
        assert bool((gh[~m_d] == 0).all())


def test_mask_errors_and_empty_mask():
    hidden, weight, targets = _inputs(6, 8, 10, seed=3, lead=(2, 3))
    with pytest.raises(ValueError, match="mask shape"):
        ops.grouped_logprob(hidden, weight, targets, mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="only 0 and 1"):
        ops.grouped_logprob(hidden, weight, targets, mask=torch.full((2, 3), 0.5))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        ops.grouped_logprob(hidden, weight, targets, mask=[[1, 1, 1], [1, 1, 1]])
    bad = targets.clone()
    bad[0, 0] = 10  # outside the vocabulary at an active token: still an error
    with pytest.raises(ValueError, match="vocabulary"):
        ops.grouped_logprob(hidden, weight, bad, mask=torch.ones(2, 3, dtype=torch.bool))
    none = ops.grouped_logprob(hidden, weight, torch.full_like(targets, -1), mask=torch.zeros(2, 3, dtype=torch.bool))
    assert none.shape == (2, 3) and bool((none == 0).all())


@pytest.mark.parametrize("splits", [2, 3])
def test_triton_forward_merges_vocabulary_splits(device, monkeypatch, splits):
    if "triton" not in backends.available("grouped_logprob", device):
        pytest.skip("triton unavailable here")
    from r1fast.kernels import logprob as kernel

    monkeypatch.setattr(kernel, "FORCE_SPLITS", splits)
    hidden, weight, targets = _inputs(21, 24, 75 + 64 * (device.type == "cuda"), seed=splits, scale=3.0)
    g = randn(21, dtype=torch.float64, seed=4)
    e_lp, e_ent, e_gh, e_gw = _expected(hidden, weight, targets, 0.9, True, g, g)
    h = hidden.float().to(device).requires_grad_()
    lp, ent = ops.grouped_logprob(h, weight.float().to(device), targets.to(device), temperature=0.9,
                                  return_entropy=True, backend="triton")
    (gh,) = torch.autograd.grad((lp * g.float().to(device)).sum() + (ent * g.float().to(device)).sum(), (h,))
    assert_close(lp, e_lp, torch.float32, rtol=2e-5, atol=1e-5, name="logp")
    assert_close(ent, e_ent, torch.float32, rtol=2e-5, atol=1e-5, name="entropy")
    assert_close(gh, e_gh, torch.float32, rtol=2e-5, atol=1e-5, name="grad_hidden")


def test_torch_backend_float64_is_exact_to_reference():
    hidden, weight, targets = _inputs(9, 12, 21, seed=3)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = ops.grouped_logprob(h, w, targets, return_entropy=True, backend="torch", chunk_size=4, temperature=0.9)
    assert lp.dtype == torch.float64
    # an all-masked (empty) call keeps fp64 too, as the reference does
    empty = ops.grouped_logprob(hidden[:2], weight, targets[:2], mask=torch.zeros(2, dtype=torch.bool), backend="torch")
    assert empty.dtype == torch.float64
    g = randn(9, dtype=torch.float64, seed=1)
    gh, gw = torch.autograd.grad((lp * g).sum() + ent.sum(), (h, w))
    e_lp, e_ent, e_gh, e_gw = _expected(hidden, weight, targets, 0.9, True, g, torch.ones(9, dtype=torch.float64))
    for a, e, name in ((lp, e_lp, "logp"), (ent, e_ent, "entropy"), (gh, e_gh, "gh"), (gw, e_gw, "gw")):
        assert_close(a, e, torch.float64, name=name)


def _peaked_inputs(n, v, gap, seed):
    """fp32 hidden/weight whose logits are exact in fp32 (multiples of 2^-8 below 2^16, whatever the summation
    order): |z| in [500, 2000) of either sign, each row's own random token `gap` above the rest, which spread
    by ~0.5. Any error against the float64 reference is then the entropy's, not the logits'."""
    g = generator(seed)
    offset = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) * torch.randint(500, 2000, (n,), generator=g)
    noise_h = (torch.randn(n, 14, generator=g) * 16).round() / 16
    noise_w = (torch.randn(v, 14, generator=g) * 0.15 * 16).round() / 16
    peak = torch.nn.functional.one_hot(torch.randint(0, v, (n,), generator=g), v) * gap
    hidden = torch.cat([offset[:, None], noise_h, peak], 1)
    weight = torch.cat([torch.ones(v, 1), noise_w, torch.eye(v)], 1)
    return hidden.float(), weight.float(), torch.randint(0, v, (n,), generator=g)


def _peaked_path(device, monkeypatch, backend, path):
    """The peaked-rows tests' set-up: skips a backend this machine lacks, and "splits" on the torch engine
    (it has none); "splits" forces triton's vocabulary split into 3 parts."""
    if backend not in backends.available("grouped_logprob", device):
        pytest.skip(f"{backend} unavailable here")
    if path == "splits":
        if backend == "torch":
            pytest.skip("the torch engine has no vocabulary splits")
        from r1fast.kernels import logprob as kernel

        monkeypatch.setattr(kernel, "FORCE_SPLITS", 3)


@pytest.mark.parametrize("path", ["grouped_logprob", "forward_keep", "splits"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_entropy_of_peaked_rows_at_large_logits(device, monkeypatch, backend, path):
    """Entropies ~1e-3..4e-2 at |z| ~ 1e3: lse - Σ p·z (or -Σ p·log p with log p = z - lse) kept an error of
    |z|'s ulp, up to 1.5% (torch; 13% in forward_keep) and 27% (triton) of them; taken about the row max, 1e-4."""
    _peaked_path(device, monkeypatch, backend, path)
    hidden, weight, targets = _peaked_inputs(24, 75, 12.0, seed=int(torch.randint(0, 1 << 20, ())))
    _, e_ent = reference.logprob(hidden.double(), weight.double(), targets, 1.0, True)
    assert 1e-4 < e_ent.min() and e_ent.max() < 0.3  # peaked: the regime the test is about
    h, w, t = hidden.to(device), weight.to(device), targets.to(device)
    if path == "forward_keep":
        from r1fast.ops.logprob import engine_for

        ent = engine_for(backend).forward_keep(h, w, t, 1.0)[3]
    else:
        ent = ops.grouped_logprob(h, w, t, return_entropy=True, backend=backend)[1]
    rel = ((ent.double().cpu() - e_ent).abs() / e_ent).max().item()
    assert rel < 1e-3, f"entropy of peaked rows at |z| ~ 1e3: max relative error {rel:.3g}"


def _peaked_argmax_inputs(seed):
    """_peaked_inputs with each row's target its argmax, 8 above the rest: log p ~ -1e-2..-1e-1 at |z| ~ 1e3."""
    hidden, weight, _ = _peaked_inputs(24, 75, 8.0, seed=seed)
    return hidden, weight, (hidden.double() @ weight.double().T).argmax(-1)


@pytest.mark.parametrize("path", ["grad", "no_grad", "forward_keep", "splits"])
@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
def test_logp_of_peaked_argmax_at_large_logits(device, monkeypatch, backend, path):
    """log p of a peaked row's argmax at |z| ~ 1e3 against the float64 reference, row by row. zt - lse (fp32)
    rounded lse to |z|'s ulp first: at least 2e-3 of log p off in the worst row; with lse's residual taken
    off, fp32's log s ~ 1 is left (< 3e-5, 40 seeds). Every path that outputs log p: the autograd forward,
    the no-grad (old-policy) pass, the fused loss's kept-logits pass and triton's vocabulary splits."""
    if backend == "reference" and path in ("forward_keep", "splits"):
        pytest.skip("the reference has neither kept logits nor vocabulary splits")
    _peaked_path(device, monkeypatch, backend, path)
    hidden, weight, targets = _peaked_argmax_inputs(int(torch.randint(0, 1 << 20, ())))
    e_lp = reference.logprob(hidden.double(), weight.double(), targets, 1.0)
    h, w, t = hidden.to(device), weight.to(device), targets.to(device)
    if path == "forward_keep":
        from r1fast.ops.logprob import engine_for, log_prob

        _, lse, zt, _, lse_lo = engine_for(backend).forward_keep(h, w, t, 1.0)
        lp = log_prob(zt, lse, lse_lo)
    else:
        lp = ops.grouped_logprob(h.requires_grad_(path == "grad"), w, t, backend=backend)
        assert lp.requires_grad == (path == "grad")
    rel = ((lp.detach().double().cpu() - e_lp).abs() / e_lp.abs()).max().item()
    assert rel < 2e-4, f"log p of peaked rows' argmax at |z| ~ 1e3: max relative error {rel:.3g}"


@pytest.mark.parametrize("path", ["grouped_logprob", "forward_keep", "splits"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_gradients_of_peaked_rows_at_large_logits(device, monkeypatch, backend, path):
    """d logp and d entropy of peaked rows at |z| ~ 1e3, row by row against the float64 reference. The
    backward formed p = exp(z - lse) with lse rounded to fp32, up to half |z|'s ulp (3e-5) off: all of
    1 - p at the max, so grad_hidden rows were typically 6e-5 and up to 45% off (logp), 2-37% (entropy,
    which also rounded lse - entropy); with the residual of that rounding taken off, ~3e-7 typically,
    at most ~1e-3 (logp: fp32's 1 - p) and 1e-6 (entropy)."""
    _peaked_path(device, monkeypatch, backend, path)
    seed = int(torch.randint(0, 1 << 20, ()))
    hidden, weight, targets = _peaked_inputs(24, 75, 12.0, seed=seed)
    g = randn(24, dtype=torch.float64, seed=seed + 3)
    for of, bound in (("logp", 1e-2), ("entropy", 1e-4)):
        g_lp, g_ent = (g, torch.zeros_like(g)) if of == "logp" else (torch.zeros_like(g), g)
        _, _, e_gh, _ = _expected(hidden.double(), weight.double(), targets, 1.0, True, g_lp, g_ent)
        h, w, t = hidden.to(device), weight.to(device), targets.to(device)
        if path == "forward_keep":  # the fused loss's single pass: kept logits, d logits from them
            from r1fast.ops.logprob import engine_for

            eng = engine_for(backend)
            z, lse, _, ent, lse_lo = eng.forward_keep(h, w, t, 1.0)
            dl = eng.dlogits(h, w, t, lse, ent, g_lp.float().to(device), g_ent.float().to(device), 1.0,
                             torch.float32, z=z, lse_lo=lse_lo)
            gh = dl @ w
        else:
            h.requires_grad_()
            lp, ent = ops.grouped_logprob(h, w, t, return_entropy=True, backend=backend)
            (gh,) = torch.autograd.grad((lp * g_lp.float().to(device)).sum() + (ent * g_ent.float().to(device)).sum(),
                                        (h,))
        rel = ((gh.double().cpu() - e_gh).norm(dim=1) / e_gh.norm(dim=1)).max().item()
        assert rel < bound, f"d {of} / d hidden of peaked rows at |z| ~ 1e3: a row {rel:.3g} off"


@pytest.mark.parametrize("chunk", [None, 5], ids=["one-chunk", "4-chunks"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fp16_within_low_precision_rule(device, backend, chunk):
    # 4 chunks: grad_weight is summed in place in fp16 (no fp32 [V, H] buffer), rounding per chunk
    hidden, weight, targets = _inputs(19, 32, 45, seed=8, scale=4.0)
    g = randn(19, dtype=torch.float64, seed=9)
    e_lp, _, e_gh, e_gw = _expected(hidden, weight, targets, 1.0, False, g, g)
    # The reference itself run from fp16-rounded inputs: the error fp16 storage alone causes.
    r_lp, _, r_gh, r_gw = _expected(hidden.half().double(), weight.half().double(), targets, 1.0, False, g, g)
    h16 = hidden.half().to(device).requires_grad_()
    w16 = weight.half().to(device).requires_grad_()
    lp = ops.grouped_logprob(h16, w16, targets.to(device), backend=backend, chunk_size=chunk)
    gh, gw = torch.autograd.grad((lp * g.float().to(device)).sum(), (h16, w16))
    assert gh.dtype == torch.float16 and gw.dtype == torch.float16
    assert_within_lowp_rule(lp, r_lp, e_lp, floor=1e-5, name="logp")
    assert_within_lowp_rule(gh, r_gh.half(), e_gh, floor=1e-3, name="grad_hidden")
    assert_within_lowp_rule(gw, r_gw.half(), e_gw, floor=1e-3, name="grad_weight")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_forward_only_saves_nothing_and_matches(device, backend):
    hidden, weight, targets = _inputs(10, 16, 30, seed=4)
    h, w = hidden.float().to(device).requires_grad_(), weight.float().to(device).requires_grad_()
    with_grad = ops.grouped_logprob(h, w, targets.to(device), backend=backend)
    assert with_grad.requires_grad
    flag = ops.grouped_logprob(h, w, targets.to(device), backend=backend, forward_only=True)
    with torch.no_grad():
        nograd = ops.grouped_logprob(h, w, targets.to(device), backend=backend)
    assert flag.grad_fn is None and nograd.grad_fn is None
    assert torch.equal(flag, with_grad.detach()) and torch.equal(nograd, flag)


def test_entropy_output_unused_in_backward():
    hidden, weight, targets = _inputs(6, 16, 20, seed=12)
    h = hidden.clone().requires_grad_()
    lp, ent = ops.grouped_logprob(h, weight, targets, return_entropy=True, backend="torch")
    (gh,) = torch.autograd.grad(lp.sum(), (h,))
    e_lp, _, e_gh, _ = _expected(hidden, weight, targets, 1.0, False, torch.ones(6, dtype=torch.float64), None)
    assert_close(gh, e_gh, torch.float64, name="grad_hidden")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpoint_gives_the_plain_gradients(device, backend, reentrant):
    # non-reentrant checkpointing (torch's recommended mode, the decoder's) unpacks each saved
    # tensor once: a backward that read ctx.saved_tensors twice was a CheckpointError
    from torch.utils.checkpoint import checkpoint

    hidden, weight, targets = _inputs(9, 16, 30, seed=21, lead=(3, 3))
    g = randn(3, 3, dtype=torch.float64, seed=22)
    _, _, e_gh, e_gw = _expected(hidden, weight, targets, 0.8, False, g, None)
    h, w = hidden.float().to(device).requires_grad_(), weight.float().to(device).requires_grad_()

    def block(a, b):
        return (ops.grouped_logprob(a * 1.0, b, targets.to(device), temperature=0.8, backend=backend, chunk_size=4)
                * g.float().to(device)).sum()

    checkpoint(block, h, w, use_reentrant=reentrant).backward()
    assert_close(h.grad, e_gh, torch.float32, name="grad_hidden")
    assert_close(w.grad, e_gw, torch.float32, name="grad_weight")


def test_default_backend_on_cpu_is_torch():
    assert backends.resolve("grouped_logprob", "cpu")[0] == "torch"


def test_default_chunk_bounds_the_logits_tile():
    from r1fast.ops.logprob import default_chunk

    assert default_chunk(16384, 151936, torch.device("cpu")) * 151936 * 4 <= 64 << 20
    assert default_chunk(3, 10, torch.device("cpu")) == 3


@pytest.mark.parametrize("backend", ["torch", "triton+cublas"])
def test_backward_tiles_stay_within_the_chunk_budget(device, monkeypatch, backend):
    """The [chunk, V] tiles alive at once in grouped_logprob's backward fit the per-device budget. On the
    H200 the triton+cublas fwd+bwd peaked at 2.34 GiB at N=16k, V=152k (2 GB target): each chunk's d
    logits stayed alive into the next chunk, and the chunk was sized for the fp32 logits alone though
    the cublas backward keeps them beside the d logits. Counted: the tiles the engines return (d logits,
    cublas logits); the torch engine's temporaries inside one dlogits call (p, the entropy term's products,
    its own logits) are not, so for it this checks only that no chunk's d logits outlive their chunk."""
    from r1fast.kernels import logprob as kernel
    from r1fast.ops import logprob as lp_mod
    from r1fast.testing import LiveTiles

    n, h, v, chunk = 30, 16, 40, 6
    engine = lp_mod._TorchEngine if backend == "torch" else lp_mod._TritonEngine
    if backend == "triton+cublas":
        monkeypatch.setenv("R1FAST_LOGITS_GEMM", "cublas")
    budget = chunk * v * engine.tile_bytes_per_logit(torch.float32)
    monkeypatch.setitem(lp_mod._CHUNK_BYTES, device.type, budget)
    tiles = LiveTiles()
    # the d logits are counted where they are made: under cublas the chunk's fp32 logits are still alive there
    owner = engine if backend == "torch" else kernel
    dlogits, cublas_logits = owner.dlogits, lp_mod.cublas_logits
    monkeypatch.setattr(owner, "dlogits", lambda *a, **k: tiles.track(dlogits(*a, **k)))
    monkeypatch.setattr(lp_mod, "cublas_logits", lambda *a, **k: tiles.track(cublas_logits(*a, **k)))
    hidden, weight, targets = _inputs(n, h, v, seed=21)
    g_logp, g_ent = randn(n, dtype=torch.float64, seed=22), randn(n, dtype=torch.float64, seed=23)
    e_lp, e_ent, e_gh, e_gw = _expected(hidden, weight, targets, 1.0, True, g_logp, g_ent)
    h32, w32 = hidden.float().to(device).requires_grad_(), weight.float().to(device).requires_grad_()
    lp, ent = ops.grouped_logprob(h32, w32, targets.to(device), return_entropy=True, backend=backend.split("+")[0])
    obj = (lp * g_logp.float().to(device)).sum() + (ent * g_ent.float().to(device)).sum()
    gh, gw = torch.autograd.grad(obj, (h32, w32))
    assert_close(gh, e_gh, torch.float32, rtol=2e-5, atol=1e-5, name="grad_hidden")
    assert_close(gw, e_gw, torch.float32, rtol=2e-5, atol=1e-5, name="grad_weight")
    assert 0 < tiles.peak <= budget, f"{tiles.peak} bytes of [chunk, V] tiles alive at once, budget {budget}"


@pytest.mark.parametrize(
    "mutate, err, match",
    [
        (lambda a: a.update(targets=a["targets"].float()), TypeError, "int64"),
        (lambda a: a["targets"].__setitem__(2, 30), ValueError, "vocabulary"),
        (lambda a: a["targets"].__setitem__(0, -1), ValueError, "vocabulary"),
        (lambda a: a.update(weight=a["weight"][:, :8]), ValueError, "hidden size"),
        # H = 0 on both: torch's "cannot reshape tensor of 0 elements into shape [-1, 0]" on every backend
        (lambda a: a.update(hidden=a["hidden"][:, :0], weight=a["weight"][:, :0]), ValueError,
         r"grouped_logprob: the hidden size H must be >= 1, got hidden \(5, 0\)"),
        (lambda a: a.update(weight=a["weight"].double()), TypeError, "dtype"),
        (lambda a: a.update(targets=a["targets"][:-1]), ValueError, "targets shape"),
        (lambda a: a.update(hidden=a["hidden"].long()), TypeError, "float"),
        (lambda a: a.update(temperature=0.0), ValueError, "temperature"),
        (lambda a: a.update(temperature=float("inf")), ValueError, "finite number"),
        (lambda a: a.update(temperature=1e-320), ValueError, r"temperature must be a finite number >= 1e-05"),
        # logits / T overflowed float32: -inf log-probs (NaN on the triton backend before it followed torch), no error
        (lambda a: a.update(temperature=1e-38), ValueError, r"temperature must be a finite number >= 1e-05 \(logits"),
        (lambda a: a.update(chunk_size=0), ValueError, "chunk_size"),
        (lambda a: a.update(backend="nope"), ValueError, "not a backend"),
    ],
)
def test_bad_input_is_a_clear_error(mutate, err, match):
    hidden, weight, targets = _inputs(5, 16, 30, seed=1)
    args = dict(hidden=hidden.float(), weight=weight.float(), targets=targets)
    mutate(args)
    with pytest.raises(err, match=match):
        ops.grouped_logprob(**args)


def _with_infinite_logits(case, device):
    """fp32 (hidden, weight, targets) whose logits hold ±inf somewhere, as `case` makes them."""
    v = 75 if device.type == "cpu" else 300
    hidden, weight, targets = _inputs(6, 16, v, seed=int(torch.randint(0, 1 << 20, ())))
    hidden, weight = hidden.float(), weight.float()
    targets[0], targets[1] = 7, v - 1  # a target on the infinite weight row, one past the -inf tile
    if case in ("hidden +inf", "hidden -inf"):
        hidden[1, 3] = float(case[-4:])  # row 1's logits: ±inf by the sign of weight[:, 3]
    elif case in ("weight +inf", "weight -inf"):
        weight[7, 2] = float(case[-4:])  # token 7's logit: ±inf by the sign of hidden[:, 2] (+inf: lse +inf)
        hidden[:, 2] = hidden[:, 2].abs() * torch.tensor([1.0, 1, 1, -1, -1, -1])  # both signs, whatever the draw
    elif case == "overflow":  # finite inputs, row 2's logits ±1e40: past fp32 the same ±inf
        hidden[2] = 0.0
        hidden[2, 0] = 1e30
        weight[:, 0] *= 1e10
    else:  # "-inf tile": a whole vocabulary tile (and, split in 3, a whole slice) of -inf logits, the rest finite
        hidden = hidden.abs() + 0.1
        weight[:v // 2 + 3, 0] = float("-inf")
    return hidden, weight, targets


@pytest.mark.parametrize("path", ["one-slice", "splits", "cublas"])
@pytest.mark.parametrize("case", ["hidden +inf", "hidden -inf", "weight +inf", "weight -inf", "overflow", "-inf tile"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_infinite_logits_give_the_reference_results(device, monkeypatch, backend, case, path):
    """log_softmax's semantics, as the fp32 reference computes them: a +inf logit makes lse +inf (a finite
    target's log p -inf, an infinite one's NaN), -inf logits weigh 0 (a -inf target's log p -inf), and the
    entropy of a row with any infinite logit is NaN (0·inf in Σ p·z). The triton forward gave NaN log-probs
    for every row with a +inf logit (exp(inf - inf) in its sum) and for a tile of -inf logits."""
    if backend not in backends.available("grouped_logprob", device):
        pytest.skip(f"{backend} unavailable here")
    if path != "one-slice" and backend == "torch":
        pytest.skip("vocabulary splits and cuBLAS logits are the triton backend's")
    if path == "splits":
        from r1fast.kernels import logprob as kernel

        monkeypatch.setattr(kernel, "FORCE_SPLITS", 3)
    monkeypatch.setenv("R1FAST_LOGITS_GEMM", "cublas" if path == "cublas" else "triton")
    hidden, weight, targets = _with_infinite_logits(case, device)
    e_lp, e_ent = reference.logprob(hidden, weight, targets, 1.0, True)
    assert not torch.isfinite(e_lp).all() and torch.isfinite(e_lp).any()  # the case is what it says
    lp, ent = ops.grouped_logprob(hidden.to(device), weight.to(device), targets.to(device), return_entropy=True,
                                  backend=backend, chunk_size=4)
    torch.testing.assert_close(lp.cpu(), e_lp, rtol=2e-5, atol=1e-5, equal_nan=True, msg=lambda m: f"logp: {m}")
    torch.testing.assert_close(ent.cpu(), e_ent, rtol=2e-5, atol=1e-5, equal_nan=True, msg=lambda m: f"entropy: {m}")


def test_triton_rejects_float64():
    hidden, weight, targets = _inputs(5, 16, 30, seed=1)
    if "triton" not in backends.available("grouped_logprob", hidden.device):
        pytest.skip("triton unavailable here")
    with pytest.raises(ValueError, match="float64"):
        ops.grouped_logprob(hidden, weight, targets, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", ["triton", "cublas"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_low_precision_large(dtype, gemm, monkeypatch):
    monkeypatch.setenv("R1FAST_LOGITS_GEMM", gemm)
    n, h, v = 300, 256, 5000
    hidden, weight, targets = _inputs(n, h, v, seed=21, scale=8.0)
    g = randn(n, dtype=torch.float64, seed=2)
    e_lp, e_ent, e_gh, e_gw = _expected(hidden, weight, targets, 1.0, True, g, g)
    r_lp, r_ent, r_gh, r_gw = _expected(hidden.to(dtype).double(), weight.to(dtype).double(), targets, 1.0, True, g, g)
    hd, wd = hidden.to(dtype).cuda().requires_grad_(), weight.to(dtype).cuda().requires_grad_()
    lp, ent = ops.grouped_logprob(hd, wd, targets.cuda(), return_entropy=True, backend="triton", chunk_size=128)
    gc = g.float().cuda()
    gh, gw = torch.autograd.grad((lp * gc).sum() + (ent * gc).sum(), (hd, wd))
    assert_within_lowp_rule(lp, r_lp, e_lp, floor=1e-4, name="logp")
    assert_within_lowp_rule(ent, r_ent, e_ent, floor=1e-4, name="entropy")
    assert_within_lowp_rule(gh, r_gh.to(dtype), e_gh, floor=1e-3, name="grad_hidden")
    assert_within_lowp_rule(gw, r_gw.to(dtype), e_gw, floor=1e-3, name="grad_weight")


def _chunked_expected(hidden, weight, targets, temperature, g_logp, g_ent, rows=1024):
    """The float64 reference, run over row chunks on hidden's device (no [N, V] tensor at once):
    (logp, entropy, grad_hidden, grad_weight) of sum(logp * g_logp + entropy * g_ent)."""
    w = weight.double().requires_grad_()
    lps, ents, ghs = [], [], []
    gw = torch.zeros_like(w)
    for s in range(0, targets.numel(), rows):
        hc = hidden[s:s + rows].double().requires_grad_()
        lp, ent = reference.logprob(hc, w, targets[s:s + rows], temperature, True)
        gh_c, gw_c = torch.autograd.grad((lp * g_logp[s:s + rows]).sum() + (ent * g_ent[s:s + rows]).sum(), (hc, w))
        lps.append(lp.detach()), ents.append(ent.detach()), ghs.append(gh_c)
        gw += gw_c
    return torch.cat(lps), torch.cat(ents), torch.cat(ghs), gw


@pytest.mark.gpu
def test_gpu_logprob_offsets_beyond_int32():
    # N·V = 2.5e9 > 2^31 and one chunk of all N tokens: the backward's [N, V] d-logits tile has
    # offsets past 2^31, so any int32 row * V in the kernels shows up as garbage rows at the end.
    n, h, v, dtype = 16384, 64, 151936, torch.bfloat16
    assert n * v > 2 ** 31
    dev = torch.device("cuda")
    hidden = randn(n, h, dtype=torch.float64, seed=51).to(dev)
    weight = randn(v, h, dtype=torch.float64, seed=52, scale=4.0 / h ** 0.5).to(dev)
    targets = torch.randint(0, v, (n,), generator=generator(53)).to(dev)
    g = randn(n, dtype=torch.float64, seed=54).to(dev)
    e = _chunked_expected(hidden, weight, targets, 0.9, g, g)
    r = _chunked_expected(hidden.to(dtype), weight.to(dtype), targets, 0.9, g, g)
    hd, wd = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
    lp, ent = ops.grouped_logprob(hd, wd, targets, temperature=0.9, return_entropy=True, backend="triton",
                                  chunk_size=n)
    gh, gw = torch.autograd.grad((lp * g.float()).sum() + (ent * g.float()).sum(), (hd, wd))
    for a, rr, ee, name, floor in ((lp, r[0], e[0], "logp", 1e-4), (ent, r[1], e[1], "entropy", 1e-4),
                                   (gh, r[2].to(dtype), e[2], "grad_hidden", 1e-3),
                                   (gw, r[3].to(dtype), e[3], "grad_weight", 2e-3 * e[3].abs().max().item())):
        assert_within_lowp_rule(a, rr, ee, floor=floor, name=name)
        assert_within_lowp_rule(a[-1000:], rr[-1000:], ee[-1000:], floor=floor, name=name + " (last rows)")


def _target_size_inputs(n=16384, h=4096, v=151936):
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, generator=g).mul_(h ** -0.25)
    weight = torch.randn(v, h, device="cuda", dtype=torch.bfloat16, generator=g).mul_(h ** -0.25)
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    return hidden, weight, targets


def _peak_extra_bytes(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, out


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", ["triton", "cublas"])
def test_gpu_target_size_memory(monkeypatch, gemm):
    # The size (N=16384, H=4096, V=151936 bf16): fwd+bwd (gradients included) < 2 GB of extra
    # memory (an fp32 [V, H] grad_weight accumulator alone is 2.5 GB); forward-only keeps O(N) (with the
    # Triton logits; under R1FAST_LOGITS_GEMM=cublas each chunk's fp32 logits exist: the bench measured
    # its fwd+bwd at 2.34 GiB before the chunk counted them, ~1.92 GB expected now).
    monkeypatch.setenv("R1FAST_LOGITS_GEMM", gemm)
    hidden, weight, targets = _target_size_inputs()

    def fwd_bwd():
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        lp = ops.grouped_logprob(h, w, targets, backend="triton", check_targets=False)
        lp.sum().backward()
        return h.grad, w.grad

    fwd_bwd()  # compile, cuBLAS workspaces
    peak, (gh, gw) = _peak_extra_bytes(fwd_bwd)
    assert peak < 2e9, f"fwd+bwd peak extra memory {peak / 1e9:.2f} GB"
    assert gw.dtype == torch.bfloat16 and bool(torch.isfinite(gw).all()) and bool(torch.isfinite(gh).all())
    del gh, gw
    with torch.no_grad():
        peak, lp = _peak_extra_bytes(lambda: ops.grouped_logprob(hidden, weight, targets, backend="triton",
                                                                 check_targets=False))
    assert bool(torch.isfinite(lp).all()) and bool((lp <= 0).all())
    # under cublas one chunk's fp32 logits at a time (~590 tokens, 357 MB), else O(N) partials
    bound = 512 * 2 ** 20 + 64e6 if gemm == "cublas" else 64e6
    assert peak < bound, f"forward-only peak extra memory {peak / 1e6:.0f} MB"


@pytest.mark.gpu
def test_gpu_fwd_bwd_never_syncs_the_host():
    # CUDA graphs / torch.compile need a sync-free op: with check_targets=False neither pass may sync.
    hidden, weight, targets = _inputs(300, 64, 3000, seed=61)
    h = hidden.to(torch.bfloat16).cuda().requires_grad_()
    w = weight.to(torch.bfloat16).cuda().requires_grad_()
    t = targets.cuda()
    run = lambda: ops.grouped_logprob(h, w, t, return_entropy=True, backend="triton", chunk_size=128,  # noqa: E731
                                      check_targets=False)
    sum(x.sum() for x in run()).backward()  # warm-up (compiles)
    torch.cuda.set_sync_debug_mode("error")
    try:
        lp, ent = run()
        (lp.sum() + ent.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.slow
def test_kernels_compile_for_hopper_without_a_gpu():
    # The interpreter never runs Triton's real compiler; this does, for sm_90 (H100/H200).
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "r1fast.kernels.compile_check", "90"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for family in ("logprob kernels bf16", "logprob kernels fp16", "logprob kernels fp32", "grpo_loss kernel",
                   "group_advantages kernel", "sampling kernel", "decode_attention kernel", "store_kv kernel",
                   "rmsnorm kernels", "swiglu kernels"):
        assert f"compiled: {family}" in out.stdout, out.stdout



_TEMPERATURE_FMA_SCRIPT = """
import re
import torch
from r1fast.kernels import compile_check as cc, logprob as lk
def fused_temperature(kern, dt, cfg, precision):
    types = {"h_ptr": f"*{dt}", "w_ptr": f"*{dt}", "dl_ptr": f"*{dt}", "t_ptr": "*i64", "inv_temp": "fp32",
             "temperature": "fp32", "arg_ptr": "*i32"}
    types.update({n: "*fp32" for n in ("z_ptr", "part_ptr", "lse_ptr", "lse_lo_ptr", "ent_ptr", "g_logp_ptr",
                                       "g_ent_ptr")})
    k = cc.compile_for(kern, types, dict(WITH_ENTROPY=True, PRECISION=precision, LOAD_Z=False,
                       **{n: v for n, v in cfg.items() if n.startswith("BLOCK")}), 90,
                       num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                       enable_fp_fusion=cfg.get("enable_fp_fusion"))
    ptx = k.asm["ptx"]
    names = [p.name for p in kern.params]
    count = 0
    for name in ("inv_temp", "temperature"):
        param = f"{kern.fn.__name__}_param_{names.index(name)}"
        reg = re.search(r"ld\\.param\\.b32\\s+(%r\\d+), \\[" + param + r"\\]", ptx)
        if reg is not None:
            count += len(re.findall(r"fma\\.rn\\.f32[^;]*" + re.escape(reg.group(1)) + r"\\b", ptx))
    return count
fp32 = lk.gpu_config(torch.float32)
for kern in (lk._logprob_fwd_kernel, lk._dlogits_kernel):
    print(kern.fn.__name__, "fp32", "fma", fused_temperature(kern, "fp32", fp32, "ieee"))
bf16 = lk.gpu_config(torch.bfloat16)
print("_dlogits_kernel", "bf16-T!=1", "fma", fused_temperature(lk._dlogits_kernel, "bf16",
      lk.dlogits_config(bf16, torch.bfloat16, False, 1 / 0.7), "tf32"))
print("control", "bf16-fusion-on", fused_temperature(lk._dlogits_kernel, "bf16", bf16, "tf32"))
print("ok")
"""


@pytest.mark.slow
def test_logits_round_once_before_every_use_on_sm90():
    # On the H200, test_grouped_logprob_matches_reference[N20H24V50T1.3-triton] (fp32, logits ~100,
    # T=1.3) failed: grad_hidden 2.1x the fp32 reference's error. z * inv_temp was contracted into an
    # FMA with each later `z - lse` / `z - Σpz` of the backward kernel, so p and the entropy term saw
    # the unrounded product while lse and the entropy came from the rounded logits. The interpreter
    # rounds every product and cannot show it; the real compiler's PTX can (no GPU needed). fp32 divides
    # (div_rn); 16-bit inputs at T != 1 launch the backward with FP fusion off (dlogits_config): the control
    # row shows the contraction that launch avoids.
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _TEMPERATURE_FMA_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines() if " fma " in line]
    assert [(r[0], r[1]) for r in rows] == [("_logprob_fwd_kernel", "fp32"), ("_dlogits_kernel", "fp32"),
                                            ("_dlogits_kernel", "bf16-T!=1")], out.stdout
    assert all(r[3] == "0" for r in rows), f"the temperature is fused into an FMA:\n{out.stdout}"
    control = [line.split() for line in out.stdout.splitlines() if line.startswith("control")]
    assert control and int(control[0][2]) > 0, out.stdout


def test_dlogits_launches_16_bit_recompute_at_a_temperature_without_fp_fusion():
    """What test_logits_round_once_before_every_use_on_sm90 checks in the PTX, at the launch: fusion off only
    where 16-bit logits are recomputed at T != 1 (fp32 divides; stored logits and T = 1 are exact as they are)."""
    from r1fast.kernels import logprob as lk

    cfg = dict(lk.CPU_CONFIG)
    assert lk.dlogits_config(cfg, torch.bfloat16, False, 1 / 0.7) == dict(cfg, enable_fp_fusion=False)
    assert lk.dlogits_config(cfg, torch.float16, False, 2.0) == dict(cfg, enable_fp_fusion=False)
    for args in ((torch.bfloat16, False, 1.0), (torch.float32, False, 1 / 0.7), (torch.bfloat16, True, 1 / 0.7)):
        assert lk.dlogits_config(cfg, *args) is cfg
    seen = {}

    class Recorder:
        def __getitem__(self, grid):
            return lambda *a, **kw: seen.update(kw)

    real = lk._dlogits_kernel
    lk._dlogits_kernel = Recorder()
    try:
        n, h, v = 5, 16, 40
        hidden, weight = randn(n, h).half(), randn(v, h, seed=1).half()
        ones = torch.zeros(n)
        lk.dlogits(hidden, weight, torch.zeros(n, dtype=torch.long), ones, None, ones, None, 1 / 0.7, torch.float16)
        assert seen.get("enable_fp_fusion") is False
        seen.clear()
        lk.dlogits(hidden, weight, torch.zeros(n, dtype=torch.long), ones, None, ones, None, 1.0, torch.float16)
        assert "enable_fp_fusion" not in seen and seen["LOAD_Z"] is False
    finally:
        lk._dlogits_kernel = real


def test_compile_check_refuses_an_unknown_option():
    # `--resource` (for --resources) was ignored: the run compiled everything and printed no resources;
    # --help compiled everything too.
    import subprocess
    import sys

    import r1fast.kernels.compile_check as cc

    run = [sys.executable, cc.__file__]
    out = subprocess.run([*run, "90", "--resource"], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode != 0 and "unknown option(s) --resource" in out.stderr, out.stderr[-2000:]
    out = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and "--resources" in out.stdout and "compiled:" not in out.stdout


@pytest.mark.parametrize("entropy", [False, True])
def test_cublas_logits_path_matches_reference(device, monkeypatch, entropy):
    """R1FAST_LOGITS_GEMM=cublas: torch.mm forms the fp32 logits tiles (chunked forward, backward per
    chunk) and the Triton reductions read them. fp32 inputs take plain torch.mm, so on the CPU this
    runs the same code path with the interpreter's reductions."""
    monkeypatch.setenv("R1FAST_LOGITS_GEMM", "cublas")
    n, h, v = 23, 16, 45
    hidden, weight, targets = _inputs(n, h, v, seed=31)
    g_logp, g_ent = randn(n, dtype=torch.float64, seed=32), randn(n, dtype=torch.float64, seed=33)
    e_lp, e_ent, e_gh, e_gw = _expected(hidden, weight, targets, 0.8, entropy, g_logp, g_ent)
    h32 = hidden.float().to(device).requires_grad_()
    w32 = weight.float().to(device).requires_grad_()
    out = ops.grouped_logprob(h32, w32, targets.to(device), temperature=0.8, return_entropy=entropy,
                              backend="triton", chunk_size=7)
    lp, ent = out if entropy else (out, None)
    obj = (lp * g_logp.float().to(device)).sum() + ((ent * g_ent.float().to(device)).sum() if entropy else 0.0)
    gh, gw = torch.autograd.grad(obj, (h32, w32))
    for a, e, name in ((lp, e_lp, "logp"), (ent, e_ent, "entropy"), (gh, e_gh, "grad_hidden"), (gw, e_gw, "grad_weight")):
        if a is not None:
            assert_close(a, e, torch.float32, rtol=2e-5, atol=1e-5, name=name)
    with torch.no_grad():  # forward only: the chunked cuBLAS forward
        lp_fo = ops.grouped_logprob(h32, w32, targets.to(device), temperature=0.8, backend="triton", chunk_size=5)
    assert_close(lp_fo, e_lp, torch.float32, rtol=2e-5, atol=1e-5, name="forward-only logp")


def test_logits_gemm_choice_is_checked(monkeypatch):
    from r1fast.ops.logprob import logits_gemm

    assert logits_gemm() == "triton"
    monkeypatch.setenv("R1FAST_LOGITS_GEMM", "cutlass")
    with pytest.raises(ValueError, match="R1FAST_LOGITS_GEMM='cutlass'.*triton, cublas"):
        logits_gemm()


def test_cublas_logits_without_out_dtype_is_a_clear_error(monkeypatch):
    from r1fast.ops.logprob import cublas_logits

    real_mm = torch.mm

    def old_mm(a, b, **kw):  # a torch whose mm has no out_dtype
        if kw:
            raise TypeError("mm() got an unexpected keyword argument 'out_dtype'")
        return real_mm(a, b)
    monkeypatch.setattr(torch, "mm", old_mm)
    h, w = torch.randn(3, 4, dtype=torch.bfloat16), torch.randn(5, 4, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="R1FAST_LOGITS_GEMM=cublas needs torch.mm"):
        cublas_logits(h, w, 1.0)


@pytest.mark.parametrize("gemm", ["triton", "cublas"])
def test_logprob_kernels_launch_on_the_tensors_device(device, monkeypatch, gemm):
    """Triton launches on the *current* CUDA device: hidden on cuda:1 under cuda:0 (trainer
    device='cuda:1', no set_device) would run on the wrong device and fault. Every launch of the
    three kernels must sit inside on_device(hidden.device)."""
    from r1fast.kernels import logprob as kernel

    monkeypatch.setenv("R1FAST_LOGITS_GEMM", gemm)
    if gemm == "cublas" and device.type == "cpu":
        monkeypatch.setattr("r1fast.ops.logprob.cublas_logits", lambda h, w, t: (h.float() @ w.float().T) * t)
    seen = record_launch_devices(monkeypatch, kernel, ("_logits_kernel", "_logprob_fwd_kernel", "_dlogits_kernel"))
    hidden, weight, targets = _inputs(9, 16, 40, seed=3)
    h = hidden.float().to(device).requires_grad_()
    w = weight.float().to(device).requires_grad_()
    lp, ent = ops.grouped_logprob(h, w, targets.to(device), return_entropy=True, backend="triton", chunk_size=4)
    (lp.sum() + ent.sum()).backward()
    assert seen and all(d == h.device for d in seen), f"launches outside on_device({h.device}): {seen}"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_logprob_runs_on_the_tensors_device_not_the_current_one():
    hidden, weight, targets = _inputs(37, 40, 75, seed=9)
    want = ops.grouped_logprob(hidden.float(), weight.float(), targets, return_entropy=True, backend="torch")
    with torch.cuda.device(0):
        got = ops.grouped_logprob(hidden.float().to("cuda:1"), weight.float().to("cuda:1"), targets.to("cuda:1"),
                                  return_entropy=True, backend="triton")
    for g, e, name in zip(got, want, ("logp", "entropy")):
        assert g.device == torch.device("cuda:1")
        assert_close(g, e, torch.float32, rtol=2e-5, atol=1e-5, name=f"{name} on cuda:1")


@pytest.mark.parametrize("gemm", ["triton", "cublas"])
def test_triton_kernels_read_nothing_past_hidden_and_weight(monkeypatch, gemm):
    """H not a multiple of the tile's K step: the kernels' loads must stop at each row's end. hidden and
    weight are views into buffers whose tail is NaN, so a load past the last row (a masked-out lane
    read anyway, multiplied by a zero) would turn the last token's logits NaN."""
    monkeypatch.setenv("R1FAST_LOGITS_GEMM", gemm)
    n, h, v = 19, 20, 41
    hidden, weight, targets = _inputs(n, h, v, seed=41)
    g_logp, g_ent = randn(n, dtype=torch.float64, seed=42), randn(n, dtype=torch.float64, seed=43)
    e_lp, e_ent, e_gh, e_gw = _expected(hidden, weight, targets, 0.9, True, g_logp, g_ent)

    def nan_tailed(x):
        buf = torch.full((x.numel() + 64,), float("nan"))
        buf[:x.numel()] = x.reshape(-1).float()
        return buf[:x.numel()].view(x.shape).requires_grad_()

    h32, w32 = nan_tailed(hidden), nan_tailed(weight)
    lp, ent = ops.grouped_logprob(h32, w32, targets, temperature=0.9, return_entropy=True, backend="triton",
                                  chunk_size=8)
    gh, gw = torch.autograd.grad((lp * g_logp.float()).sum() + (ent * g_ent.float()).sum(), (h32, w32))
    for a, e, name in ((lp, e_lp, "logp"), (ent, e_ent, "entropy"), (gh, e_gh, "grad_hidden"), (gw, e_gw, "grad_weight")):
        assert_close(a, e, torch.float32, rtol=2e-5, atol=1e-5, name=name)


# --- return_argmax_hit: whether each target is its row's argmax, from the logsumexp's running max -------

def _planted_hits(hidden, weight, targets, temperature, every=2):
    """targets with every `every`-th row set to its row's argmax (random targets almost never are)."""
    z = (hidden.double() @ weight.double().T) / temperature
    out = targets.clone().reshape(-1)
    out[::every] = z.reshape(-1, z.shape[-1]).argmax(-1)[::every]
    return out.reshape(targets.shape)


# (N, H, V, temperature, chunk, entropy): odd vocabularies, one token, several chunks, T != 1
HIT_CASES = [(37, 24, 75, 0.7, 8, True), (1, 16, 33, 1.0, None, False), (20, 17, 50, 1.3, 6, False)]


@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
@pytest.mark.parametrize("case", HIT_CASES, ids=lambda c: f"N{c[0]}V{c[2]}T{c[3]}")
def test_argmax_hit_matches_reference(device, backend, case):
    n, h, v, temp, chunk, entropy = case
    hidden, weight, targets = _inputs(n, h, v, seed=70 + v, scale=3.0)
    targets = _planted_hits(hidden.float(), weight.float(), targets, temp)
    want = reference.logprob(hidden.float(), weight.float(), targets, temp, return_argmax_hit=True)[1]
    want_lp = reference.logprob(hidden, weight, targets, temp)
    assert 0 < int(want.sum()) < n or n == 1
    h32 = hidden.float().to(device).requires_grad_()
    w32 = weight.float().to(device)
    for grad in (True, False):  # through the autograd.Function, and forward only
        with torch.set_grad_enabled(grad):
            out = ops.grouped_logprob(h32, w32, targets.to(device), temperature=temp, return_entropy=entropy,
                                      return_argmax_hit=True, backend=backend, chunk_size=chunk)
        assert len(out) == 2 + entropy
        lp, hit = out[0], out[-1]
        assert hit.dtype == torch.bool and hit.shape == targets.shape and not hit.requires_grad
        assert torch.equal(hit.cpu(), want), (hit, want)
        assert_close(lp, want_lp, torch.float32, rtol=2e-5, atol=1e-5, name="logp")
        if grad:
            (lp.sum() + (out[1].sum() if entropy else 0)).backward()  # the bool output takes no gradient
            assert h32.grad is not None


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_argmax_hit_in_a_masked_padded_batch(device, backend):
    b, t, h, v = 3, 7, 20, 45
    hidden, weight, targets = _inputs(b * t, h, v, seed=81, lead=(b, t), scale=3.0)
    targets = _planted_hits(hidden.float(), weight.float(), targets, 0.9)
    mask = torch.arange(t)[None, :] < torch.tensor([7, 3, 1])[:, None]
    want = reference.logprob(hidden.float().reshape(-1, h), weight.float(), targets.reshape(-1), 0.9,
                             return_argmax_hit=True)[1].reshape(b, t) & mask
    padded = torch.where(mask, targets, -100).to(device)
    lp, ent, hit = ops.grouped_logprob(hidden.float().to(device), weight.float().to(device), padded,
                                       mask=mask.to(device), temperature=0.9, return_entropy=True,
                                       return_argmax_hit=True, backend=backend, chunk_size=4)
    assert hit.shape == (b, t) and torch.equal(hit.cpu(), want) and int(want.sum()) > 0
    none = ops.grouped_logprob(hidden.float().to(device), weight.float().to(device), padded,
                               mask=torch.zeros(b, t, dtype=torch.bool, device=device), return_argmax_hit=True,
                               backend=backend)
    assert none[1].dtype == torch.bool and not bool(none[1].any())


@pytest.mark.parametrize("backend,splits,gemm", [("reference", None, None), ("torch", None, None),
                                                  ("triton", None, "triton"), ("triton", 3, "triton"),
                                                  ("triton", 2, "cublas")])
def test_argmax_hit_exact_ties_go_to_the_lowest_token_id(device, monkeypatch, backend, splits, gemm):
    """Small-integer inputs make every logit exact in any summation order, so the planted ties are exact
    on every backend. As torch.argmax: a target tied with a lower id is a miss, with a higher id a hit,
    wherever the tied ids sit (one tile, across tiles, across vocabulary splits)."""
    from r1fast.kernels import logprob as kernel

    if gemm is not None:
        monkeypatch.setenv("R1FAST_LOGITS_GEMM", gemm)
    if gemm == "cublas" and device.type == "cpu":
        monkeypatch.setattr("r1fast.ops.logprob.cublas_logits", lambda h, w, t: (h.float() @ w.float().T) * t)
    monkeypatch.setattr(kernel, "FORCE_SPLITS", splits)
    v, h = 75, 16
    pairs = [(5, 9), (12, 40), (3, 70)]   # one tile; across tiles and splits; first and last split
    weight = torch.randint(-3, 3, (v, h), generator=generator(90)).float()
    hidden = torch.randint(-3, 3, (2 * len(pairs), h), generator=generator(91)).float()
    weight[:, :len(pairs)] = 0.0
    hidden[:, :len(pairs)] = 0.0
    for p, (lo, hi) in enumerate(pairs):
        weight[lo, p] = 1000.0      # column p lifts the pair far above every other token of its rows
        weight[hi] = weight[lo]
        hidden[2 * p:2 * p + 2, p] = 1.0
    targets = torch.tensor([i for pair in pairs for i in pair])   # each pair's lower id, then its higher
    got = ops.grouped_logprob(hidden.to(device), weight.to(device), targets.to(device), temperature=0.5,
                              return_argmax_hit=True, backend=backend, chunk_size=4)[1].cpu()
    assert got.tolist() == [True, False] * len(pairs)
    assert torch.equal(got, (hidden @ weight.T).argmax(-1) == targets)
