"""ops.group_advantages and ops.kl_penalty against independent scalar formulas and the reference."""
import math
import statistics

import pytest
import torch

from r1fast import ops
from r1fast.reference import loss as reference
from r1fast.testing import assert_close, randn


def _loop_advantages(rewards, g, estimator, scale, eps):
    r = rewards.tolist()
    out = []
    batch_std = statistics.stdev(r)
    for s in range(0, len(r), g):
        grp = r[s:s + g]
        for i, x in enumerate(grp):
            if estimator == "rloo":
                others = grp[:i] + grp[i + 1:]
                out.append(x - sum(others) / len(others))  # mean of the other G-1 samples as baseline
                continue
            a = x - sum(grp) / g
            if scale == "group":
                a /= statistics.stdev(grp) + eps
            elif scale == "batch":
                a /= batch_std + eps
            out.append(a)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("estimator, scale", [("grpo", "group"), ("grpo", "batch"), ("grpo", "none"),
                                              ("rloo", "group")])
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
    ],
)
def test_advantages_bad_input(rewards, g, kwargs, err, match):
    with pytest.raises(err, match=match):
        ops.group_advantages(rewards, g, **kwargs)


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
