"""ops.sample_tokens: the Triton kernel (interpreter on CPU) and the torch sampler against the float64
reference: tokens (up to float rounding at CDF interval edges), log-probs, kept tokens only,
frequencies, batch independence, input errors."""
import math

import pytest
import torch

from r1fast import backends, ops
from r1fast.rollout import SamplingParams

TOL = 1e-5  # relative to the kept total: how far from a CDF interval edge a mismatch may lie
LP_TOL = 1e-5
V = 300  # not a multiple of any block size the kernel uses
U_LAST = 1.0 - 2.0 ** -53  # the largest float64 uniform


def _impls(device):
    """name -> callable(logits, params, u): the backends under test (plus the kernel at 32-wide
    blocks, so that rows of a few hundred tokens cross many block edges on any device)."""
    out = {}
    avail = backends.available("sample_tokens", device)
    for name in ("torch", "triton"):
        if name in avail:
            out[name] = lambda z, p, u, name=name: ops.sample_tokens(z, p, u, backend=name)
    if "triton" in avail:
        from r1fast.kernels import sampling as kernel

        out["triton_block32"] = lambda z, p, u: kernel.sample(z, u, p.temperature, p.min_p, block=32)
    return out


def _all_impls(device):
    return list(_impls(device))


IMPLS = _all_impls(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def kept_weights(logits, params):
    """float64 (kept unnormalised probabilities [B, V] in sampling order, token ids [B, V]): vocabulary
    order, also with top-k/top-p (their ranking only chooses which tokens stay).
    Written from the definition, independently of the backends."""
    z = logits.double() / params.temperature
    p = torch.softmax(z, dim=-1)
    ids = torch.arange(p.shape[1], device=p.device).expand_as(p)
    if 0 < params.top_k < p.shape[1] or params.top_p < 1:
        rank = logits.double().argsort(dim=-1, descending=True, stable=True)  # by logit, ties by id
        ranked = p.gather(1, rank)
        if 0 < params.top_k < p.shape[1]:
            ranked[:, params.top_k:] = 0.0
        if params.top_p < 1:
            q = ranked / ranked.sum(-1, keepdim=True)
            ranked = torch.where(q.cumsum(-1) - q >= params.top_p, 0.0, ranked)
        p = torch.zeros_like(p).scatter(1, rank, ranked)
    if params.min_p > 0:
        p = torch.where(p >= params.min_p * p.amax(-1, keepdim=True), p, 0.0)
    return p, ids


def assert_tokens_ok(got, want, logits, params, u, tol=TOL, name=""):
    """Every token has nonzero kept probability; a token that differs from `want` (the reference's)
    must be one whose CDF interval [lo, hi) lies within tol * total of the target u * total."""
    w, ids = kept_weights(logits, params)
    cdf = w.cumsum(-1)
    lo_all = torch.cat([torch.zeros_like(cdf[:, :1]), cdf[:, :-1]], dim=1)
    total = cdf[:, -1]
    target = u.double() * total
    for b in range(logits.shape[0]):
        tok = int(got[b])
        pos = (ids[b] == tok).nonzero()
        assert pos.numel() == 1, f"{name}: row {b}: token {tok} is not a candidate (top-k)"
        pos = int(pos)
        assert w[b, pos] > 0, f"{name}: row {b}: token {tok} has zero kept probability"
        if want is not None and tok == int(want[b]):
            continue
        lo, hi, t, slack = float(lo_all[b, pos]), float(cdf[b, pos]), float(target[b]), tol * float(total[b])
        assert lo - slack <= t <= hi + slack, (
            f"{name}: row {b}: token {tok} (reference {None if want is None else int(want[b])}) has interval "
            f"[{lo / float(total[b]):.9f}, {hi / float(total[b]):.9f}) of the kept mass, target {float(u[b]):.9f}")


def assert_logprobs_ok(lp, tokens, logits, params, name=""):
    t = params.temperature if params.temperature > 0 else 1.0
    want = torch.log_softmax(logits.double() / t, dim=-1).gather(1, tokens[:, None].to(logits.device)).squeeze(1)
    assert lp.dtype == torch.float32 and lp.shape == tokens.shape, name
    err = (lp.double() - want).abs().max().item()
    assert err <= LP_TOL, f"{name}: log-prob error {err:.2e}"


def make_logits(kind, rows, vocab, seed, device):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, vocab, generator=g)
    if kind == "normal":
        z = z * 2.5
    elif kind == "peaked":  # one token holds most of the mass, a few others some
        z = z * 1.5
        z[torch.arange(rows), torch.randint(0, vocab, (rows,), generator=g)] += 9.0
    elif kind == "flat":    # near-uniform: many narrow, equal intervals
        z = z * 1e-3
    elif kind == "onehot":  # one token ~1 - 1e-10, the rest underflow-ish
        z = z * 0.5
        z[torch.arange(rows), torch.randint(0, vocab, (rows,), generator=g)] += 30.0
    return z.to(device)


def make_u(rows, seed, device):
    g = torch.Generator().manual_seed(seed + 1000)
    u = torch.rand(rows, generator=g, dtype=torch.float64)
    u[0], u[-1] = 0.0, U_LAST
    return u.to(device)


PARAMS = [SamplingParams(temperature=0), SamplingParams(temperature=1.0), SamplingParams(temperature=0.7),
          SamplingParams(temperature=1.6, min_p=0.1), SamplingParams(temperature=0.8, min_p=0.5)]


def test_assert_tokens_ok_has_teeth():
    z = make_logits("normal", 4, 50, 0, "cpu")
    params, u = SamplingParams(temperature=1.0), torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=torch.float64)
    ref, _ = ops.sample_tokens(z, params, u, backend="reference")
    assert_tokens_ok(ref, None, z, params, u, tol=1e-12, name="reference")  # the oracle is exact
    far, _ = ops.sample_tokens(z, params, (u + 0.5) % 1, backend="reference")  # targets half the mass away
    assert (far != ref).sum() >= 3
    for b in (far != ref).nonzero()[:, 0].tolist():
        bad = ref.clone()
        bad[b] = far[b]
        with pytest.raises(AssertionError, match="interval"):
            assert_tokens_ok(bad, ref, z, params, u)
    mp = SamplingParams(temperature=1.0, min_p=0.9)
    dropped = (kept_weights(z, mp)[0][0] == 0).nonzero()[0]
    with pytest.raises(AssertionError, match="zero kept probability"):
        assert_tokens_ok(dropped.repeat(4), None, z, mp, u)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["normal", "peaked", "flat", "onehot"])
def test_backends_match_the_float64_reference(impl, kind, device):
    fn = _impls(device)[impl]
    for i, params in enumerate(PARAMS):
        z = make_logits(kind, 6, V, seed=10 * i + len(kind), device=device)
        u = None if params.greedy else make_u(6, i, device)
        want, want_lp = ops.sample_tokens(z, params, u, backend="reference")
        if u is not None:  # the oracle's own tokens sit inside their intervals
            assert_tokens_ok(want.cpu(), None, z.cpu(), params, u.cpu(), tol=1e-12, name="reference")
        assert_logprobs_ok(want_lp, want, z, params, "reference")
        got, lp = fn(z, params, u)
        name = f"{impl} {kind} {params}"
        assert got.dtype == torch.int64 and got.shape == (6,), name
        if params.greedy:
            assert torch.equal(got.cpu(), want.cpu()), name
        else:
            assert_tokens_ok(got.cpu(), want.cpu(), z.cpu(), params, u.cpu(), name=name)
        assert_logprobs_ok(lp.cpu(), got.cpu(), z.cpu(), params, name)


@pytest.mark.parametrize("impl", IMPLS)
def test_greedy_takes_the_first_of_tied_maxima(impl, device):
    z = make_logits("normal", 3, V, 5, "cpu")
    z[0, [40, 41, 200]] = 50.0       # same block and later blocks
    z[1, [299, 7]] = 50.0            # the last entry ties an early one
    z[2, :] = -1.0
    z[2, 150:] = float("-inf")       # masked tail
    z[2, 149] = 2.0
    got, lp = _impls(device)[impl](z.to(device), SamplingParams(temperature=0), None)
    assert got.tolist() == [40, 7, 149]
    assert_logprobs_ok(lp.cpu(), got.cpu(), z, SamplingParams(temperature=0), impl)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_greedy_on_float64_logits_takes_the_float64_argmax(backend, device):
    # the Triton kernel read float64 logits as fp32, where maxima a few 1e-12 apart tie: it took the
    # first of them, the other backends the larger one
    if backend not in backends.available("sample_tokens", device):
        pytest.skip(f"{backend} unavailable")
    z = make_logits("normal", 3, V, 9, "cpu").double()
    z[0, 10], z[0, 200] = 20.0, 20.0 + 1e-12   # the larger one later, in another block
    z[1, 5], z[1, 6] = 20.0 + 1e-12, 20.0      # the larger one first
    z[2, 100], z[2, 299] = 20.0, 20.0 + 4e-15  # one float64 ulp apart, the last entry larger
    assert z.float()[0, 10] == z.float()[0, 200] and z[2, 100] < z[2, 299]  # tied in fp32, not in float64
    got, lp = ops.sample_tokens(z.to(device), SamplingParams(temperature=0), backend=backend)
    assert got.tolist() == [200, 5, 299]
    assert_logprobs_ok(lp.cpu(), got.cpu(), z, SamplingParams(temperature=0), backend)


def _min_p_trap(device):
    """Rows whose kept tokens (p >= 0.5 p_max) are a few scattered ones; every other token sits just
    below the threshold and together they hold most of the mass: a cumulative sum that rounds past
    a kept token's interval, or a threshold applied to the wrong max, lands on a dropped token."""
    min_p, t = 0.5, 0.9
    thresh = t * math.log(min_p)
    rows = []
    for kept in ([3, 50, 130, 131, 257], [0, 299], [298], [31, 32, 33, 64, 95, 96]):
        z = torch.full((V,), thresh - 0.01)
        z += torch.linspace(-0.2, 0, V)  # distinct values, all still below the threshold
        z[kept] = torch.linspace(0, -0.3 * t, len(kept)) if len(kept) > 1 else torch.zeros(1)
        rows.append(z)
    z = torch.stack(rows).to(device)
    return z, SamplingParams(temperature=t, min_p=min_p)


@pytest.mark.parametrize("impl", IMPLS)
def test_never_a_dropped_token_even_at_interval_edges(impl, device):
    z, params = _min_p_trap(device)
    w, _ = kept_weights(z.cpu(), params)
    cdf = w.cumsum(-1) / w.sum(-1, keepdim=True)
    rows, us = [], []
    for b in range(z.shape[0]):  # u = 0, the largest u, each interval edge of the row and a hair below it
        edges = [0.0, U_LAST, 1 - 1e-9] + [float(c) for c in cdf[b][w[b] > 0][:-1]]
        edges += [math.nextafter(float(c), 0) for c in cdf[b][w[b] > 0]]
        rows += [b] * len(edges)
        us += edges
    zz, u = z[rows], torch.tensor(us, dtype=torch.float64)
    want, _ = ops.sample_tokens(zz, params, u.to(device), backend="reference")
    got, lp = _impls(device)[impl](zz, params, u.to(device))
    assert_tokens_ok(got.cpu(), want.cpu(), zz.cpu(), params, u, name=impl)
    assert_logprobs_ok(lp.cpu(), got.cpu(), zz.cpu(), params, impl)
    first = [rows.index(b) for b in range(z.shape[0])]  # each row's edges start with 0, U_LAST
    last = [i + 1 for i in first]
    assert got[first].tolist() == [3, 0, 298, 31]    # u = 0: the first kept token
    assert got[last].tolist() == [257, 299, 298, 96]  # the largest u: the last kept token


@pytest.mark.parametrize("impl", IMPLS)
def test_the_largest_u_past_every_block_sum_takes_the_last_block_with_mass(impl, device):
    # One token holds ~all the mass; eight tokens of ~1e-16 each sit in later blocks, none in the last
    # block of the row. Sequential float64 prefix sums of the block sums absorb them (1 + e == 1) while the
    # total does not, so u = the largest uniform lands past every prefix sum: the draw must then come from
    # the last block with kept mass (one of the tiny tokens, whose CDF intervals hold that u), never wrap
    # to the first token.
    z = torch.full((2, V), -float("inf"))
    tiny = [40, 70, 100, 130, 160, 190, 220, 250]
    z[:, 5] = 0.0
    z[:, tiny] = -36.8  # exp(-36.8) ~ 1.05e-16, under half an ulp of 1.0
    u = torch.tensor([U_LAST, 0.5], dtype=torch.float64)
    params = SamplingParams(temperature=1.0)
    got, lp = _impls(device)[impl](z.to(device), params, u.to(device))
    assert int(got[0]) in tiny and int(got[1]) == 5, got.tolist()
    assert_logprobs_ok(lp.cpu(), got.cpu(), z, params, impl)


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "triton_block32"])  # V = 8: one block either way
def test_stratified_uniforms_give_the_target_frequencies(impl, device):
    # u_i = (i + 1/2) / N: token k is drawn floor or ceil of N * q_k times, so every empirical
    # frequency lies within 1/N of its probability q_k (plus float rounding of the interval edges).
    n = 256
    logits = torch.tensor([2.0, 1.5, 1.2, 0.3, 0.0, -0.5, -1.0, -3.0])
    params = SamplingParams(temperature=0.8, min_p=0.1)
    z = logits[None].expand(n, -1).contiguous().to(device)
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    got, _ = _impls(device)[impl](z, params, u.to(device))
    freq = torch.bincount(got.cpu(), minlength=8).double() / n
    w, _ = kept_weights(logits[None], params)
    q = (w / w.sum())[0]
    assert (q == 0).sum() == 4 and freq[q == 0].sum() == 0
    assert (freq - q).abs().max() <= 1 / n + 1e-6, (freq.tolist(), q.tolist())
    # and the check has teeth: T = 1.3 frequencies are not T = 0.8's
    w13, _ = kept_weights(logits[None], SamplingParams(temperature=1.3, min_p=0.1))
    assert (freq - (w13 / w13.sum())[0]).abs().max() > 1 / n + 1e-6


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.9, min_p=0.05),
                                    SamplingParams(temperature=1.2, top_k=40, top_p=0.9, min_p=0.02)])
@pytest.mark.parametrize("impl", IMPLS)
def test_a_row_draws_the_same_alone_and_in_any_batch(impl, device, params):
    if impl == "triton_block32" and (params.top_k > 0 or params.top_p < 1):
        pytest.skip("the bare kernel has no top-k / top-p (ops.sample_tokens sends those to torch)")
    fn = _impls(device)[impl]
    z = make_logits("normal", 7, V, 3, device)
    u = make_u(7, 3, device)
    tokens, lps = fn(z, params, u)
    perm = torch.tensor([4, 0, 6, 2, 1, 5, 3], device=device)
    ptok, plp = fn(z[perm], params, u[perm])
    assert torch.equal(ptok, tokens[perm]) and torch.equal(plp, lps[perm])
    for b in (0, 3, 6):
        t1, l1 = fn(z[b:b + 1], params, u[b:b + 1])
        assert torch.equal(t1, tokens[b:b + 1]) and torch.equal(l1, lps[b:b + 1])


@pytest.mark.parametrize("impl", IMPLS)
def test_min_p_one_keeps_exactly_the_tokens_tied_at_the_max(impl, device):
    # min_p keeps p >= min_p * p_max, the bound included: at min_p = 1 exactly the tokens tied with the max
    # stay (their exp(z - max) is exactly 1), in one block and across blocks. Random logits never sit on the
    # bound, so only this tells >= from > in the kept-mass pass or the final scan.
    tied = [[7, 9, 140, 290], [0, 299], [64]]
    z = make_logits("normal", len(tied), V, 8, "cpu")
    for b, ids in enumerate(tied):
        z[b, ids] = 20.0
    rows = [b for b in range(len(tied)) for _ in range(4)]
    u = torch.tensor([0.0, 0.3, 0.55, U_LAST] * len(tied), dtype=torch.float64)
    params = SamplingParams(temperature=0.8, min_p=1.0)
    zz = z[rows].to(device)
    want, _ = ops.sample_tokens(zz, params, u.to(device), backend="reference")
    got, lp = _impls(device)[impl](zz, params, u.to(device))
    # u in [i/k, (i+1)/k) takes the i-th of the k tied tokens, in vocabulary order
    expect = [tied[b][int(float(x) * len(tied[b]))] for b, x in zip(rows, u)]
    assert want.cpu().tolist() == expect and got.cpu().tolist() == expect, (impl, got.tolist())
    assert_logprobs_ok(lp.cpu(), got.cpu(), zz.cpu(), params, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_leading_blocks_of_masked_logits(impl, device):
    # whole blocks of -inf before the first finite logit (a vocabulary masked at its start): the running
    # max is -inf there, and exp(-inf - -inf) must not turn the sums and log-probs into NaN
    z = make_logits("normal", 4, V, 6, "cpu")
    z[:, :70] = -float("inf")
    z[1, :200] = -float("inf")
    z, u = z.to(device), make_u(4, 6, device)
    for params in PARAMS:
        uu = None if params.greedy else u
        want, _ = ops.sample_tokens(z, params, uu, backend="reference")
        got, lp = _impls(device)[impl](z, params, uu)
        if params.greedy:
            assert torch.equal(got.cpu(), want.cpu()), str(params)
        else:
            assert_tokens_ok(got.cpu(), want.cpu(), z.cpu(), params, u.cpu(), name=f"{impl} {params}")
        assert_logprobs_ok(lp.cpu(), got.cpu(), z.cpu(), params, f"{impl} {params}")


@pytest.mark.parametrize("impl", IMPLS)
def test_leading_masked_blocks_before_very_negative_logits(impl, device):
    # A block of -inf logits is summed at a reference max of 0 (its running max is -inf); rescaling its
    # (zero) sum to the row's max multiplies by exp((0 - max) / T), which overflows to inf when every finite
    # logit is far below 0: the scale must be capped at 1, or 0 * inf turns the block sums into NaN.
    # Softmax ignores the shift, so the draws are those of the unshifted row.
    z = make_logits("normal", 4, V, 9, "cpu") - 300.0
    z[:, :70] = -float("inf")
    z[1, :200] = -float("inf")
    z, u = z.to(device), make_u(4, 9, device)
    for params in PARAMS[1:3]:  # min_p = 0: the only mode that rescales block sums
        want, _ = ops.sample_tokens(z, params, u, backend="reference")
        got, lp = _impls(device)[impl](z, params, u)
        assert_tokens_ok(got.cpu(), want.cpu(), z.cpu(), params, u.cpu(), name=f"{impl} {params}")
        assert_logprobs_ok(lp.cpu(), got.cpu(), z.cpu(), params, f"{impl} {params}")


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_logits_and_uniforms(impl, device):
    # a column slice of wider logits and every other uniform: rows are no longer contiguous
    wide = make_logits("normal", 4, V + 37, 4, device)
    z, u2 = wide[:, 5:V + 5], make_u(8, 4, device)
    u = u2[::2]
    params = SamplingParams(temperature=0.9, min_p=0.02)
    got, lp = _impls(device)[impl](z, params, u)
    want, _ = ops.sample_tokens(z.contiguous(), params, u.contiguous(), backend="reference")
    assert_tokens_ok(got.cpu(), want.cpu(), z.cpu(), params, u.cpu(), name=impl)
    assert_logprobs_ok(lp.cpu(), got.cpu(), z.cpu(), params, impl)


def test_triton_defers_top_k_and_top_p_to_torch(device):
    if "triton" not in backends.available("sample_tokens", device):
        pytest.skip("triton unavailable")
    z = make_logits("normal", 5, 40, 8, device)
    u = make_u(5, 8, device)
    for params in (SamplingParams(top_k=5), SamplingParams(temperature=0.7, top_p=0.8, min_p=0.05)):
        a = ops.sample_tokens(z, params, u, backend="triton")
        b = ops.sample_tokens(z, params, u, backend="torch")
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        want, _ = ops.sample_tokens(z, params, u, backend="reference")
        assert_tokens_ok(a[0].cpu(), want.cpu(), z.cpu(), params, u.cpu(), name=str(params))
        assert_tokens_ok(want.cpu(), None, z.cpu(), params, u.cpu(), tol=1e-12, name="reference")


def test_torch_backend_is_the_rollout_sampler_and_the_cpu_default():
    from r1fast.rollout import sampler

    z, u = make_logits("normal", 4, 50, 1, "cpu"), make_u(4, 1, "cpu")
    for params in PARAMS:
        uu = None if params.greedy else u
        a = ops.sample_tokens(z, params, uu)
        b = sampler.sample(z, params, None, None, u=uu)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert backends.resolve("sample_tokens", "cpu")[0] == "torch"


@pytest.mark.parametrize("make,match", [
    (lambda z, u: (z[0], u), "must be \\[B >= 1, V >= 1\\]"),
    (lambda z, u: (z[:0], u[:0]), "must be \\[B >= 1, V >= 1\\]"),
    (lambda z, u: (z.long(), u), "float tensor"),
    (lambda z, u: (z, u.float()), "u must be float64"),
    (lambda z, u: (z, u[:2]), "u must be \\[B=3\\]"),
    (lambda z, u: (z, u[:, None]), "u must be \\[B=3\\]"),
    (lambda z, u: (z, torch.tensor([0.1, 1.0, 0.2], dtype=torch.float64)), "\\[0, 1\\)"),
    (lambda z, u: (z, torch.tensor([0.1, -0.5, 0.2], dtype=torch.float64)), "\\[0, 1\\)"),
    (lambda z, u: (z, torch.tensor([0.1, float("nan"), 0.2], dtype=torch.float64)), "\\[0, 1\\)"),
    (lambda z, u: (z, None), "u .* is required"),
    (lambda z, u: (z, u.to("meta")), "one device"),
])
def test_bad_inputs_are_clear_errors(make, match):
    z, u = make_logits("normal", 3, 20, 0, "cpu"), make_u(3, 0, "cpu")
    zz, uu = make(z, u)
    for backend in backends.available("sample_tokens", "cpu"):
        with pytest.raises(ValueError, match=match):
            ops.sample_tokens(zz, SamplingParams(temperature=0.8), uu, backend=backend)


def test_bad_argument_types_and_backend():
    z, u = make_logits("normal", 3, 20, 0, "cpu"), make_u(3, 0, "cpu")
    with pytest.raises(TypeError, match="SamplingParams"):
        ops.sample_tokens(z, dict(temperature=1.0), u)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        ops.sample_tokens(z.tolist(), SamplingParams(), u)
    with pytest.raises(ValueError, match="not a backend"):
        ops.sample_tokens(z, SamplingParams(), u, backend="fast")
    # greedy needs no uniforms; check_inputs=False skips the value checks only
    assert ops.sample_tokens(z, SamplingParams(temperature=0), None)[0].tolist() == z.argmax(-1).tolist()
    with pytest.raises(ValueError, match="float64"):
        ops.sample_tokens(z, SamplingParams(), u.float(), check_inputs=False)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_logits_without_a_distribution_are_refused(backend):
    """A NaN or inf logit, or logits / T past float32's range: no distribution to draw from (the torch
    path returned token 0 with a NaN log-prob, the reference failed on an index)."""
    z, u = make_logits("normal", 4, 20, 0, "cpu"), make_u(4, 0, "cpu")
    for row, value, temperature in ((2, float("nan"), 1.0), (1, float("inf"), 1.0), (3, float("inf"), 0.0),
                                    (0, 3.0e38, 0.5)):
        bad = z.clone()
        bad[row, 5] = value
        with pytest.raises(ValueError, match=rf"rows \[{row}\] have no distribution"):
            ops.sample_tokens(bad, SamplingParams(temperature=temperature), u, backend=backend)
    bad = z.clone()
    bad[1] = -float("inf")
    with pytest.raises(ValueError, match=r"rows \[1\] have no distribution.*every logit -inf"):
        ops.sample_tokens(bad, SamplingParams(), u, backend=backend)
    # -inf logits are masked tokens, and large but representable logits / T still sample
    masked = z * 1e3
    masked[:, :10] = -float("inf")
    tokens, logprobs = ops.sample_tokens(masked, SamplingParams(temperature=0.5), u, backend=backend)
    assert torch.isfinite(logprobs).all() and (tokens >= 10).all()


def test_triton_at_device_size_matches_the_reference(device):
    # On a GPU: Qwen's vocabulary (75 of the kernel's GPU blocks per row) and a batch of rows; on the
    # CPU (interpreter) a small shape. float64 reference either way.
    if "triton" not in backends.available("sample_tokens", device):
        pytest.skip("triton unavailable")
    rows, vocab = (64, 151936) if device.type == "cuda" else (3, V)
    z = make_logits("normal", rows, vocab, 0, device)
    u = make_u(rows, 0, device)
    for params in PARAMS:
        uu = None if params.greedy else u
        want, _ = ops.sample_tokens(z, params, uu, backend="reference")
        got, lp = ops.sample_tokens(z, params, uu, backend="triton")
        if params.greedy:
            assert torch.equal(got, want)
        else:
            assert_tokens_ok(got.cpu(), want.cpu(), z.cpu(), params, u.cpu(), name=str(params))
        assert_logprobs_ok(lp.cpu(), got.cpu(), z.cpu(), params, str(params))


@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_log_probs_carry_no_gradient_on_any_backend(impl):
    # logits that require grad: the reference/torch log-probs kept the logits' graph, triton's did not
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(5), requires_grad=True)
    u = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    tokens, logp = ops.sample_tokens(logits, SamplingParams(temperature=0.8, min_p=0.05), u, backend=impl)
    assert not logp.requires_grad and logp.grad_fn is None
    want_tokens, want_logp = ops.sample_tokens(logits.detach(), SamplingParams(temperature=0.8, min_p=0.05), u,
                                               backend=impl)
    assert torch.equal(tokens, want_tokens) and torch.equal(logp, want_logp)
