"""The rollout sampler: filtered distributions, frequencies over many draws, logprob definition."""
import math

import numpy as np
import pytest
import torch

from r1fast.rollout import SamplingParams
from r1fast.rollout import sampler

LOGITS = torch.tensor([2.0, 1.5, 1.2, 0.3, 0.0, -0.5, -1.0, -3.0])


def expected_distribution(logits, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0):
    """Written independently of sampler.py: plain loops over the sorted probabilities."""
    p = torch.softmax(logits.double() / temperature, dim=-1)
    order = sorted(range(len(p)), key=lambda i: -p[i].item())
    keep = set(order if top_k <= 0 else order[:top_k])
    kept_mass = sum(p[i].item() for i in keep)
    acc, nucleus = 0.0, set()
    for i in order:
        if i not in keep:
            continue
        if acc >= top_p - 1e-12:
            break
        nucleus.add(i)
        acc += p[i].item() / kept_mass
    peak = max(p[i].item() for i in nucleus)
    final = {i for i in nucleus if p[i].item() >= min_p * peak}
    q = torch.zeros_like(p)
    for i in final:
        q[i] = p[i]
    return q / q.sum()


def chi2_critical(df, z=3.72):  # Wilson-Hilferty, one-sided p ~ 1e-4
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def draw(params, n=20000, seed=3):
    logits = LOGITS[None].expand(n, -1).contiguous()
    keys = torch.tensor([sampler.stream_key(seed, i) for i in range(n)], dtype=torch.long)
    positions = torch.arange(n, dtype=torch.long) % 7 + 5
    tokens, logprobs = sampler.sample(logits, params, keys, positions)
    return tokens, logprobs


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.6), dict(temperature=1.3, top_k=3),
                                dict(top_p=0.7), dict(min_p=0.3), dict(temperature=0.8, top_k=5, top_p=0.9, min_p=0.1)])
def test_sampling_frequencies_match_target(kw):
    params = SamplingParams(**kw)
    tokens, logprobs = draw(params)
    want = expected_distribution(LOGITS, **kw)
    counts = torch.bincount(tokens, minlength=len(LOGITS)).double()
    n = counts.sum()
    support = want > 0
    assert counts[~support].sum() == 0, f"sampled a filtered-out token: {counts.tolist()} vs {want.tolist()}"
    exp = want[support] * n
    chi2 = float(((counts[support] - exp) ** 2 / exp).sum())
    df = int(support.sum()) - 1
    if df > 0:
        assert chi2 < chi2_critical(df), f"chi2 {chi2:.1f} (df {df}); counts {counts.tolist()}, want {exp.tolist()}"
    # the documented log-prob: log_softmax(logits / T) before filtering, at the sampled token
    full = torch.log_softmax(LOGITS / params.temperature, dim=-1)
    torch.testing.assert_close(logprobs, full[tokens], rtol=1e-6, atol=1e-6)


def test_sampling_frequencies_detect_a_wrong_distribution():
    """The chi-square check above has teeth: draws at T=1 fail against the T=0.6 target."""
    tokens, _ = draw(SamplingParams(temperature=1.0))
    want = expected_distribution(LOGITS, temperature=0.6)
    counts = torch.bincount(tokens, minlength=len(LOGITS)).double()
    exp = want * counts.sum()
    assert float(((counts - exp) ** 2 / exp).sum()) > chi2_critical(len(LOGITS) - 1)


def test_greedy_is_argmax_with_temperature_one_logprob():
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(0))
    tokens, logprobs = sampler.sample(logits, SamplingParams(temperature=0), torch.zeros(5, dtype=torch.long),
                                      torch.zeros(5, dtype=torch.long))
    assert tokens.tolist() == logits.argmax(-1).tolist()
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0])


def test_top_k_one_keeps_only_the_most_likely_token():
    # top_k = 1 is a real limit (only -1 and 0 mean none): every draw is the argmax, at any temperature
    from r1fast import ops

    logits = torch.randn(64, 30, generator=torch.Generator().manual_seed(2)) * 0.3
    keys = torch.tensor([sampler.stream_key(5, i) for i in range(64)])
    params = SamplingParams(temperature=1.5, top_k=1)
    tokens, logprobs = sampler.sample(logits, params, keys, torch.arange(64))
    assert tokens.tolist() == logits.argmax(-1).tolist()
    torch.testing.assert_close(logprobs, torch.log_softmax(logits / 1.5, -1).gather(1, tokens[:, None])[:, 0])
    u = sampler.uniforms(keys, torch.arange(64))
    for backend in ("reference", "torch", "triton"):
        assert ops.sample_tokens(logits, params, u, backend=backend)[0].tolist() == tokens.tolist(), backend


def test_logprob_matches_trainer_grouped_logprob():
    from r1fast import ops

    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(6, 16, generator=g), torch.randn(40, 16, generator=g)
    from r1fast.rollout.runner import lm_logits

    keys = torch.tensor([sampler.stream_key(9, i) for i in range(6)])
    tokens, logprobs = sampler.sample(lm_logits(hidden, weight), SamplingParams(temperature=0.7, top_p=0.8), keys,
                                      torch.arange(6))
    trainer = ops.grouped_logprob(hidden, weight, tokens, temperature=0.7)
    torch.testing.assert_close(logprobs, trainer.float(), rtol=1e-5, atol=1e-5)


def test_uniforms_are_deterministic_and_spread():
    keys = torch.tensor([sampler.stream_key(0, i) for i in range(4000)])
    pos = torch.arange(4000)
    u = sampler.uniforms(keys, pos)
    assert torch.equal(u, sampler.uniforms(keys.flip(0), pos.flip(0)).flip(0))  # row order is irrelevant
    assert 0 <= float(u.min()) and float(u.max()) < 1
    hist = torch.histc(u.float(), bins=10, min=0, max=1)
    assert float(((hist - 400) ** 2 / 400).sum()) < chi2_critical(9)
    assert sampler.stream_key(1, 2) != sampler.stream_key(2, 1)


def test_stream_key_goes_on_from_a_state_as_from_its_parts():
    # the engine folds a prompt's (seed, hash, occurrence) once and each sample's j onto it: the keys (so
    # every sampled token) must be those of stream_key(seed, hash, occurrence, j), as before that shortcut
    for seed, h, o in ((0, 0, 0), (7, 2**64 - 1, 3), (2**62, 12345678901234567, 0), (-5, 1, 2)):
        state = sampler.stream_key(seed, h, o)
        assert [sampler.stream_key(j, state=state) for j in range(9)] == \
            [sampler.stream_key(seed, h, o, j) for j in range(9)]
    assert sampler.stream_key(3, 2**64 - 1, 0, 5) == 2318920083   # pinned: the engine's streams never move


def test_host_uniforms_equal_the_device_hash_bit_for_bit():
    # the engine draws its uniforms on the host (numpy, tabulated positions): they must be the same bits
    g = torch.Generator().manual_seed(0)
    keys = torch.cat([torch.randint(0, 2**32, (3000,), generator=g), torch.tensor([0, 2**32 - 1, 2**32 - 1])])
    pos = torch.cat([torch.randint(0, 900, (3000,), generator=g), torch.tensor([0, 499, 899])])
    host = sampler.HostUniforms(500)   # positions >= 500 take the untabulated fallback
    u = torch.from_numpy(host(keys.tolist(), pos.tolist()))
    assert u.dtype == torch.float64
    assert torch.equal(u, sampler.uniforms(keys, pos))
    assert torch.equal(torch.from_numpy(host(keys[pos < 500].tolist(), pos[pos < 500].tolist())),
                       sampler.uniforms(keys[pos < 500], pos[pos < 500]))
    # the engine passes its running rows' key array (uint64): the hash works in place, on copies only
    key_array = keys[pos < 500].numpy().astype(np.uint64)
    kept = key_array.copy()
    assert torch.equal(torch.from_numpy(host(key_array, pos[pos < 500].numpy())), u[pos < 500])
    assert np.array_equal(key_array, kept)
    # sample() with those uniforms draws exactly what it draws from keys and positions
    logits = torch.randn(64, 50, generator=g)
    params = SamplingParams(temperature=0.9, top_p=0.95)
    a = sampler.sample(logits, params, keys[:64], pos[:64])
    b = sampler.sample(logits, params, None, None, u=u[:64])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_host_uniforms_at_the_first_position_past_the_table():
    # HostUniforms(n) tabulates positions 0..n-1; position n itself takes the fallback, never an index error
    keys = [sampler.stream_key(4, i) for i in range(6)]
    pos = [0, 9, 10, 10, 2, 3]
    u = torch.from_numpy(sampler.HostUniforms(10)(keys, pos))
    assert torch.equal(u, sampler.uniforms(torch.tensor(keys), torch.tensor(pos)))


@pytest.mark.parametrize("bad,match", [(dict(n=0), "n must"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                                       (dict(temperature=-1), "temperature"), (dict(top_k=-2), "top_k"),
                                       (dict(min_p=2), "min_p"), (dict(max_tokens=0), "max_tokens"),
                                       (dict(stop_token_ids="ab"), "stop_token_ids"), (dict(stop_token_ids=5), "stop_token_ids"),
                                       (dict(seed=1.5), "seed"), (dict(temperature=1e-45), "temperature must be 0 .greedy."),
                                       # stream keys fold 96 bits: 2**100 drew seed 0's samples, -1 those of 2**96 - 1
                                       (dict(seed=2**100), "seed must fit in 64 bits"),
                                       (dict(seed=-2**63 - 1), "seed must fit in 64 bits"),
                                       (dict(temperature=float("nan")), "temperature"),
                                       (dict(temperature=float("inf")), "temperature must be 0 .greedy. or a finite"),
                                       (dict(stop_token_ids=[1, 2.5]), "stop_token_ids"),
                                       # 0-d: a bare "iteration over a 0-d tensor" named no argument
                                       (dict(stop_token_ids=torch.tensor(3)), "stop_token_ids must be a 1-D"),
                                       (dict(stop_token_ids=np.array(3)), "stop_token_ids must be a 1-D"),
                                       (dict(stop_token_ids=torch.tensor([1.0, 2.0])), "stop_token_ids"),
                                       (dict(stop_token_ids=torch.tensor([True])), "stop_token_ids"),
                                       (dict(ignore_eos="no"), "ignore_eos must be a bool")])
def test_bad_sampling_params_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**bad)


def test_sampling_params_take_numpy_ints_as_ints():
    import numpy as np

    p = SamplingParams(n=np.int64(3), top_k=np.int32(5), max_tokens=np.int64(7), seed=np.uint32(9),
                       stop_token_ids=np.array([1, 2]))
    assert (p.n, p.top_k, p.max_tokens, p.seed, p.stop_token_ids) == (3, 5, 7, 9, (1, 2))
    assert all(type(v) is int for v in (p.n, p.top_k, p.max_tokens, p.seed, *p.stop_token_ids))
    assert SamplingParams(stop_token_ids=(t for t in [5, 6])).stop_token_ids == (5, 6)  # a generator, read once
    # an int tensor, as prompts may be (its elements are 0-d tensors, which were refused as not ints)
    assert SamplingParams(stop_token_ids=torch.tensor([3, 4])).stop_token_ids == (3, 4)
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1 and SamplingParams(seed=-2**63).seed == -2**63


def test_sampling_params_take_any_real_number_as_a_float():
    # a Fraction passed the checks and then failed inside every sampling backend with a bare TypeError
    from fractions import Fraction

    from r1fast import ops

    p = SamplingParams(temperature=Fraction(1, 2), top_p=Fraction(3, 4), min_p=np.float16(0.5))
    assert (p.temperature, p.top_p, p.min_p) == (0.5, 0.75, 0.5)
    assert all(type(v) is float for v in (p.temperature, p.top_p, p.min_p))
    with pytest.raises(ValueError, match="temperature must be 0"):
        SamplingParams(temperature=10**400)  # past float's range: refused, not an OverflowError
    z = torch.randn(3, 20, generator=torch.Generator().manual_seed(0))
    u = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    want = ops.sample_tokens(z, SamplingParams(temperature=0.5, top_p=0.75, min_p=0.5), u, backend="reference")
    for backend in ("reference", "torch"):
        got = ops.sample_tokens(z, p, u, backend=backend)
        assert torch.equal(got[0], want[0]) and torch.allclose(got[1], want[1])


@pytest.mark.parametrize("params", [dict(top_k=2), dict(top_k=1), dict(top_p=1e-9), dict(top_k=3, top_p=0.5)])
def test_tied_probabilities_keep_vocabulary_order_under_top_k_and_top_p(params):
    # topk and an unstable sort ordered ties arbitrarily: top_k=1 on a tied maximum was not greedy's
    # token, and the torch sampler and the reference picked different tokens
    from r1fast import ops

    logits = torch.zeros(2, 300)
    logits[:, [5, 17, 30]] = 1.0
    p = SamplingParams(temperature=1.0, **params)
    u = torch.tensor([0.0, 0.0], dtype=torch.float64)
    tokens, _ = ops.sample_tokens(logits, p, u, backend="torch")
    want, _ = ops.sample_tokens(logits, p, u, backend="reference")
    assert tokens.tolist() == want.tolist() == [5, 5]


def test_top_k_ranks_by_logit_not_by_rounded_probability():
    # 0.3 and the next float32 up have equal fp32 probabilities: ranked by probability, top_k=1 kept
    # token 0 while greedy (and the float64 reference) took token 1, and top_k=2 kept token 1 where
    # the reference kept token 2
    from r1fast import ops

    near = torch.tensor(0.3).nextafter(torch.tensor(1.0)).item()
    top = torch.tensor([[0.3, near, -2.0]])
    boundary = torch.tensor([[5.0, 0.3, near, -2.0]])
    assert torch.softmax(top, -1)[0, 0] == torch.softmax(top, -1)[0, 1]  # the trap is armed
    greedy, _ = ops.sample_tokens(top, SamplingParams(temperature=0), backend="torch")
    assert greedy.tolist() == [1]
    last = torch.tensor([1 - 1e-9], dtype=torch.float64)
    for logits, params, want in ((top, SamplingParams(top_k=1, temperature=0.7), 1),
                                 (boundary, SamplingParams(top_k=2), 2),
                                 (boundary, SamplingParams(top_k=2, top_p=0.999, min_p=1e-4), 2)):
        for backend in ("reference", "torch"):
            assert ops.sample_tokens(logits, params, last, backend=backend)[0].tolist() == [want], (backend, params)


@pytest.mark.parametrize("kw", [{}, {"top_k": 19000}])
def test_the_long_tail_of_a_large_vocabulary_is_drawn_where_its_mass_is(kw):
    # one fp32 cumsum over the row stopped growing near 1 (an entry below half an ulp, ~3e-8, added
    # nothing), so the tail could never be drawn: 20000 tokens of ~2e-9 each here, 4e-5 of the mass
    from r1fast import ops

    logits = torch.zeros(3, 20000)
    logits[:, 0] = 20.0
    tail = 19999 * math.exp(-20.0) / (1 + 19999 * math.exp(-20.0))
    u = torch.tensor([1 - tail * 0.75, 1 - tail * 0.5, 1 - tail * 0.1], dtype=torch.float64)
    params = SamplingParams(temperature=1.0, **kw)
    want, _ = ops.sample_tokens(logits.double(), params, u, backend="reference")
    got, _ = ops.sample_tokens(logits, params, u, backend="torch")
    assert (want > 1000).all() and want.tolist() != [want[0]] * 3
    assert (got - want).abs().max() <= 1, (got, want)


def test_top_k_alone_sorts_no_vocabulary(monkeypatch):
    # the draw walks vocabulary order, so top-k needs only the k largest values (torch.topk), not an
    # O(V log V) sort of every row: on [64, 32000] the sort was ~4/5 of the sampler's CPU time
    def no_sort(*a, **k):
        raise AssertionError("top-k sorted the vocabulary")

    monkeypatch.setattr(torch.Tensor, "sort", no_sort)
    monkeypatch.setattr(torch.Tensor, "argsort", no_sort)
    logits = torch.randn(4, 3000)
    logits[:, [7, 70, 700]] = logits.max() + 1  # a tie across the k-th place: the lowest ids stay
    probs = sampler.filtered_probs(logits, SamplingParams(temperature=0.8, top_k=2))
    assert (probs > 0).nonzero()[:, 1].tolist() == [7, 70] * 4


def test_a_u_at_the_top_of_a_blocks_last_kept_token_draws_it_not_the_rows_last():
    # kept tokens scattered over the vocabulary (top-k in vocabulary order): a target within fp32
    # rounding below token 900's upper edge passed the block's fp32 running total, landed on a zero entry
    # after it, and the fix-up drew the row's last kept token (2900) instead of 900
    from r1fast import ops

    logits = torch.full((1, 3000), -5.0)
    logits[0, [100, 900, 1500, 2900]] = torch.tensor([0.1, 0.3, 0.2, 0.4])
    params = SamplingParams(temperature=1.0, top_k=4)
    probs = sampler.filtered_probs(logits, params)[0].double()
    edge = probs[:901].sum() / probs.sum()  # where token 900's interval ends
    for eps in (1e-15, 1e-12, 1e-9, 1e-8):
        u = (edge - eps).reshape(1)
        for backend in ("reference", "torch"):
            assert ops.sample_tokens(logits, params, u, backend=backend)[0].tolist() == [900], (eps, backend)
