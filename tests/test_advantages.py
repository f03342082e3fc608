"""ops.group_advantages and ops.kl_penalty against independent scalar formulas and the reference."""
import math
import statistics

import pytest
import torch

from r1fast import ops
from r1fast.reference import loss as reference
from r1fast.testing import assert_close, poison, randn, record_launch_devices


def _loop_advantages(rewards, g, estimator, scale, eps, mask=None):
    """Scalar formulas; rows where `mask` is False have no reward: A = 0, and they count in no statistic."""
    r = rewards.tolist()
    keep = [True] * len(r) if mask is None else mask.tolist()
    scored = [x for x, k in zip(r, keep) if k]
    batch_std = statistics.stdev(scored) if len(scored) > 1 else 0.0
    out = []
    for s in range(0, len(r), g):
        rows = list(zip(r[s:s + g], keep[s:s + g]))
        grp = [x for x, k in rows if k]
        for x, k in rows:
            if not k or len(grp) < 2:   # no reward, or no other scored sample to be a baseline
                out.append(0.0)
                continue
            if estimator == "rloo":
                out.append(x - (sum(grp) - x) / (len(grp) - 1))  # mean of the other scored samples
                continue
            a = x - sum(grp) / len(grp)
            if scale == "group":
                a /= statistics.stdev(grp) + eps
            elif scale == "batch":
                a /= batch_std + eps
            out.append(a)
    return torch.tensor(out, dtype=torch.float64)


# rloo with every scale_rewards: LOSS_SPEC's rloo is G/(G-1)·(r - mean) whatever scale_rewards says
@pytest.mark.parametrize("estimator, scale", [("grpo", "group"), ("grpo", "batch"), ("grpo", "none"),
                                              ("rloo", "group"), ("rloo", "batch"), ("rloo", "none")])
@pytest.mark.parametrize("b, g", [(12, 4), (6, 2), (9, 9)])
def test_advantages_match_scalar_formula(estimator, scale, b, g):
    rewards = randn(b, dtype=torch.float64, seed=b * g)
    expected = _loop_advantages(rewards, g, estimator, scale, 1e-4)
    ref = reference.group_advantages(rewards, g, estimator, scale, 1e-4)
    assert_close(ref, expected, torch.float64, name="reference")
    for backend in ("reference", "torch"):
        out = ops.group_advantages(rewards.float(), g, estimator=estimator, scale_rewards=scale, backend=backend)
        assert out.dtype == torch.float32 and out.shape == (b,)
        assert_close(out, expected, torch.float32, name=backend)


def test_constant_group_gets_zero_advantage():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 2.0, 1.0])
    out = ops.group_advantages(rewards, 3)
    assert torch.equal(out[:3], torch.zeros(3))
    assert out[3] < 0 < out[4]


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("estimator, scale", [("grpo", "group"), ("grpo", "batch"), ("grpo", "none"),
                                              ("rloo", "group")])
def test_constant_group_of_inexact_rewards_gets_exactly_zero(backend, estimator, scale):
    # 0.1 and 1/3 are not exact in binary: an fp32 mean of 7 copies can be an ulp off, and ulp/eps
    # (eps=1e-4) once gave the torch backend |A| ~ 6e-4 on a group that carries no signal.
    rewards = torch.tensor([0.1] * 7 + [1 / 3] * 7 + [0.7] * 6 + [0.2])
    out = ops.group_advantages(rewards, 7, estimator=estimator, scale_rewards=scale, backend=backend)
    assert torch.equal(out[:14], torch.zeros(14)), out[:14]
    assert out[20] < 0 < out[14]


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("scale", ["group", "batch"])
def test_eps_zero_constant_group_is_zero_not_nan(backend, scale):
    # eps=0 is accepted: a constant group (std 0) must give A = 0, not 0/0 = NaN (or ±inf)
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.0, 2.0, 1.0])
    out = ops.group_advantages(rewards, 3, eps=0.0, scale_rewards=scale, backend=backend)
    assert torch.equal(out[:3], torch.zeros(3)), out
    r = rewards.double().tolist()
    std = statistics.stdev(r[3:] if scale == "group" else r)
    assert_close(out[3:], torch.tensor([(x - 1.0) / std for x in r[3:]], dtype=torch.float64), torch.float32,
                 name=backend)


def _rewards_with_constant_groups(b, g, seed, device):
    """Fresh random rewards [b] (never zeros), the first and one middle group made constant (std 0 -> eps)."""
    r = randn(b, seed=seed, scale=2.0) + 0.5
    for grp in {0, (b // g) // 2}:
        r[grp * g:(grp + 1) * g] = r[grp * g]
    return r.to(device)


# Odd and even G, one and many groups, B up to a few hundred; tile=8 shrinks the kernel's tile so
# each program holds one or two groups: many programs and a partial last block.
TRITON_SHAPES = [(2, 2, None), (9, 3, None), (21, 7, None), (294, 7, None), (384, 3, None), (256, 2, None),
                 (21, 3, 8), (294, 7, 8), (30, 2, 8)]


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_triton_advantages_match_float64_reference(estimator, scale, device, monkeypatch):
    from r1fast.kernels import advantages as kernel

    default_tile = kernel.TILE
    for i, (b, g, tile) in enumerate(TRITON_SHAPES):
        monkeypatch.setattr(kernel, "TILE", tile or default_tile)
        rewards = _rewards_with_constant_groups(b, g, seed=100 * b + g + i, device=device)
        expected = reference.group_advantages(rewards.double(), g, estimator, scale, 1e-4)
        where = f"triton B={b} G={g} tile={tile} {estimator}/{scale}"
        out = poison(torch.empty(b, dtype=torch.float32, device=device))
        assert kernel.group_advantages(rewards, g, estimator, scale, 1e-4, out=out) is out
        assert_close(out, expected, torch.float32, name=where)
        assert torch.equal(out[:g].cpu(), torch.zeros(g)), f"{where}: constant group must get A = 0 exactly"
        via_op = ops.group_advantages(rewards, g, estimator=estimator, scale_rewards=scale, backend="triton")
        assert via_op.dtype == torch.float32 and via_op.shape == (b,)
        assert_close(via_op, expected, torch.float32, name=where + " via ops")


# groups of 4 with 4, 3, 2, 1, 0 and 3 scored rows; the unscored rows hold NaN
SCORED = torch.tensor([1, 1, 1, 1, 1, 0, 1, 1, 0, 1, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 1, 1, 0, 1], dtype=torch.bool)


@pytest.mark.parametrize("backend, tile", [("reference", None), ("torch", None), ("triton", None), ("triton", 8)])
@pytest.mark.parametrize("estimator, scale", [("grpo", "group"), ("grpo", "batch"), ("grpo", "none"),
                                              ("rloo", "group")])
def test_unscored_rows_are_left_out_of_every_statistic(backend, tile, estimator, scale, device, monkeypatch):
    # Filling an unscored row with its group's mean kept the mean but shrank the Bessel std (and the
    # batch std, and rloo's G/(G-1)): the scored rows' advantages came out up to 1.7x too large.
    from r1fast.kernels import advantages as kernel

    if tile:
        monkeypatch.setattr(kernel, "TILE", tile)   # one group per program: many programs
    rewards = randn(24, dtype=torch.float64, seed=5) + 0.3
    rewards[~SCORED] = float("nan")
    expected = _loop_advantages(rewards, 4, estimator, scale, 1e-4, SCORED)
    got = ops.group_advantages(rewards.float().to(device), 4, estimator=estimator, scale_rewards=scale,
                               mask=SCORED.to(device), backend=backend)
    assert_close(got, expected, torch.float32, name=f"{backend} masked {estimator}/{scale}")
    assert torch.equal(got.cpu()[~SCORED], torch.zeros(int((~SCORED).sum())))
    assert_close(reference.group_advantages(rewards, 4, estimator, scale, 1e-4, SCORED), expected, torch.float64,
                 name="masked reference")


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_mask_edge_cases(backend):
    rewards = randn(6, seed=3) + 1.0
    # a mask that keeps every row is no mask; an int 0/1 mask is a bool one
    want = ops.group_advantages(rewards, 3, backend=backend)
    assert torch.equal(ops.group_advantages(rewards, 3, mask=torch.ones(6, dtype=torch.bool), backend=backend), want)
    some = torch.tensor([1, 0, 1, 1, 1, 0])
    assert torch.equal(ops.group_advantages(rewards, 3, mask=some, backend=backend),
                       ops.group_advantages(rewards, 3, mask=some.bool(), backend=backend))
    # nothing scored: every advantage 0, whatever the scale (the batch std of no rows is not NaN)
    for scale in ("group", "batch", "none"):
        out = ops.group_advantages(rewards, 3, scale_rewards=scale, mask=torch.zeros(6, dtype=torch.bool),
                                   backend=backend)
        assert torch.equal(out, torch.zeros(6)), (scale, out)
    # a group whose scored rows agree centres to exactly 0 (an inexact 0.1 three times; one row unscored)
    same = torch.tensor([0.1, 0.1, float("nan"), 0.1, 0.0, 1.0])
    out = ops.group_advantages(same, 3, mask=~torch.isnan(same), eps=0.0, backend=backend)
    assert torch.equal(out[:3], torch.zeros(3)) and out[4] < 0 < out[5], out


def test_triton_advantages_cast_and_strided_input(device):
    """float64 rewards are rounded to fp32 once; a strided view is made contiguous, not misread."""
    base = randn(2 * 42, dtype=torch.float64, seed=7, device=device) + 1.0
    rewards = base[::2]
    out = ops.group_advantages(rewards, 7, eps=0.5, backend="triton")
    expected = reference.group_advantages(rewards.float().double(), 7, "grpo", "group", 0.5)
    assert_close(out, expected, torch.float32, name="strided float64")


@pytest.mark.parametrize("spread", [1e19, 1e30])
def test_triton_group_std_of_a_huge_spread_does_not_overflow(spread):
    # the fp32 sum of squares overflowed past a ~1e19 spread: std inf, every advantage of the group 0
    rewards = torch.tensor([spread, -spread, 0.5 * spread, 3.0, 4.0, 2.0])
    got = ops.group_advantages(rewards, 3, backend="triton")
    want = reference.group_advantages(rewards.double(), 3)
    assert_close(got, want, torch.float32, name="advantages")
    assert got[:3].abs().min() > 0.1


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("masked", [False, True])
def test_batch_std_of_rewards_far_from_zero(backend, masked):
    # the fp32 batch std was taken about the fp32 mean, whose rounding swamps the spread of rewards far
    # from 0: at 1e6 + N(0, 1) the advantages came out 0.3-1% off, here (1e7 + 4·N(0, 1)) 1-3% off
    rewards = (1e7 + 4 * randn(24, seed=11)).float()
    mask = torch.arange(24) % 5 != 2 if masked else None
    got = ops.group_advantages(rewards, 4, scale_rewards="batch", mask=mask, backend=backend)
    want = _loop_advantages(rewards.double(), 4, "grpo", "batch", 1e-4, mask)
    assert_close(got, want, torch.float32, name=f"{backend} batch std, masked={masked}")


def test_triton_advantages_group_too_wide():
    from r1fast.kernels import advantages as kernel

    g = kernel.MAX_GROUP + 1
    with pytest.raises(ValueError, match="group_size"):
        ops.group_advantages(randn(g), g, backend="triton")


@pytest.mark.parametrize(
    "rewards, g, kwargs, err, match",
    [
        (torch.ones(6), 4, {}, ValueError, "not divisible"),
        (torch.ones(6), 1, {}, ValueError, ">= 2"),
        (torch.ones(6), 2.0, {}, ValueError, "group_size"),
        (torch.tensor([1.0, float("nan"), 0.0, 1.0]), 2, {}, ValueError, "NaN"),
        (torch.tensor([1.0, float("inf"), 0.0, 1.0]), 2, {}, ValueError, "NaN/inf"),
        (torch.ones(2, 3), 3, {}, ValueError, "1-D"),
        (torch.ones(4, dtype=torch.int64), 2, {}, TypeError, "float"),
        (torch.ones(4), 2, {"estimator": "ppo"}, ValueError, "estimator"),
        (torch.ones(4), 2, {"scale_rewards": "row"}, ValueError, "scale_rewards"),
        (torch.ones(4), 2, {"eps": -1.0}, ValueError, "eps"),
        (torch.ones(4), 2, {"eps": float("inf")}, ValueError, "eps must be a finite number"),
        # finite in float64, past float32's range where the backends compute: was all-NaN advantages
        (torch.tensor([1.0, 1e39, 0.0, 1.0], dtype=torch.float64), 2, {}, ValueError, r"float32's range\) at rows \[1\]"),
        (torch.ones(4), 2, {"mask": torch.ones(3, dtype=torch.bool)}, ValueError, "mask shape"),
        (torch.ones(4), 2, {"mask": torch.tensor([0, 2, 1, 1])}, ValueError, "mask must be bool"),
        (torch.ones(4), 2, {"mask": [True] * 4}, TypeError, "mask must be a torch.Tensor"),
        # a NaN is an error at a scored row, not at an unscored one
        (torch.tensor([1.0, float("nan"), 0.0, 1.0]), 2, {"mask": torch.tensor([1, 1, 0, 1]).bool()}, ValueError,
         r"rows \[1\]"),
    ],
)
def test_advantages_bad_input(rewards, g, kwargs, err, match):
    with pytest.raises(err, match=match):
        ops.group_advantages(rewards, g, **kwargs)


def test_triton_advantages_launch_one_kernel_and_read_the_device_once(device, device_launches, device_reads):
    # the H200 bench's B=8192 G=8 took 94 us for a launch-bound op: the finite check was five torch ops
    # (isfinite's four and all()) before the host read; now one sum, read once
    from r1fast.kernels import advantages as kernel

    rewards = randn(64, seed=41).float().to(device)
    with device_reads() as reads, device_launches(kernel, "_group_advantages_kernel") as launches:
        got = ops.group_advantages(rewards, 8, backend="triton")
    assert launches == ["sum", ("triton", "_group_advantages_kernel")], launches
    assert len(reads) == 1, reads
    assert_close(got, _loop_advantages(rewards.cpu().double(), 8, "grpo", "group", 1e-4).to(device), torch.float32,
                 name="advantages")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("masked", [False, True])
def test_rewards_whose_sum_overflows_are_accepted(backend, masked):
    # the finite check reads the rewards' sum first: an overflowing sum of finite rewards must lead to the
    # exact check, which accepts them, not to an error
    rewards = torch.tensor([3e38, 3e38, 1.0, 2.0, float("nan") if masked else 0.5, 0.25])
    mask = torch.tensor([True, True, True, True, False, True]) if masked else None
    got = ops.group_advantages(rewards, 2, backend=backend, mask=mask)
    want = ops.group_advantages(rewards, 2, backend="reference", mask=mask)
    assert_close(got, want, torch.float32, name="advantages")


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_penalty_scalar_formula(kind):
    logp = randn(3, 5, dtype=torch.float64, seed=1) - 2
    ref = randn(3, 5, dtype=torch.float64, seed=2) - 2
    out = ops.kl_penalty(logp.float(), ref.float(), kind=kind)
    exp = torch.tensor([[{"k1": a - b, "k2": 0.5 * (a - b) ** 2, "k3": math.exp(b - a) - (b - a) - 1}[kind]
                         for a, b in zip(ra, rb)] for ra, rb in zip(logp.tolist(), ref.tolist())], dtype=torch.float64)
    assert_close(out, exp, torch.float32, name=kind)
    if kind != "k1":
        assert bool((out >= 0).all())


def test_kl_penalty_bad_input():
    with pytest.raises(ValueError, match="shape"):
        ops.kl_penalty(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="kind"):
        ops.kl_penalty(torch.zeros(3), torch.zeros(3), kind="k4")
    with pytest.raises(ValueError, match="one device, got cpu and meta"):
        ops.kl_penalty(torch.zeros(3), torch.zeros(3, device="meta"))
    with pytest.raises(TypeError, match="ref_logp must be a float tensor, got torch.int32"):
        ops.kl_penalty(torch.zeros(3), torch.zeros(3, dtype=torch.int32))


def test_triton_advantages_launch_on_the_rewards_device(device, monkeypatch):
    """Triton launches on the *current* CUDA device: rewards on cuda:1 under cuda:0 would run on
    the wrong device and fault. The launch must sit inside on_device(rewards.device)."""
    from r1fast.kernels import advantages as kernel

    seen = record_launch_devices(monkeypatch, kernel, ["_group_advantages_kernel"])
    rewards = randn(24, seed=3, device=device)
    ops.group_advantages(rewards, 4, scale_rewards="batch", backend="triton")
    assert seen == [rewards.device], f"launch outside on_device({rewards.device}): {seen}"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_triton_advantages_run_on_the_tensors_device_not_the_current_one():
    rewards = randn(64, seed=5)
    want = reference.group_advantages(rewards.double(), 8, "grpo", "group", 1e-4)
    with torch.cuda.device(0):
        got = ops.group_advantages(rewards.to("cuda:1"), 8, backend="triton")
    assert got.device == torch.device("cuda:1")
    assert_close(got, want, torch.float32, name="advantages on cuda:1")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kl_penalty_low_precision_inputs_compute_in_fp32(dtype):
    """bf16/fp16 log-probs: the estimate is formed in fp32 (never in the 16-bit dtype, whose rounding of
    exp(d) - d - 1 near d = 0 would swamp the KL) and comes back fp32."""
    logp = (randn(4, 6, seed=3, scale=0.1) - 2).to(dtype)
    ref = (logp.float() + randn(4, 6, seed=4, scale=0.05)).to(dtype)
    for kind in ("k1", "k2", "k3"):
        out = ops.kl_penalty(logp, ref, kind=kind)
        assert out.dtype == torch.float32, kind
        assert_close(out, reference.kl_penalty(logp.double(), ref.double(), kind), torch.float32, name=kind)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_advantages_carry_no_gradient_on_any_backend(backend):
    # rewards that require grad gave differentiable advantages on reference/torch and not on triton
    rewards = randn(6, seed=3).requires_grad_(True)
    adv = ops.group_advantages(rewards, 3, backend=backend)
    assert not adv.requires_grad
    assert_close(adv, ops.group_advantages(rewards.detach(), 3, backend="reference"), atol=1e-6, rtol=1e-6)
