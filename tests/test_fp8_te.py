"""The Transformer Engine glue, against a stand-in `transformer_engine` (TE needs a GPU and is not
installed on CI): recipe mapping, autocast entry, token padding, parameter copying, and apply_fp8's
"te" conversion. TE's own numerics are checked on a GPU by the bench suite."""
import contextlib
import dataclasses
import enum
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import r1fast.fp8.apply as fp8_apply
import r1fast.fp8.support as support
import r1fast.fp8.te as fp8_te
from r1fast.fp8 import apply_fp8
from r1fast.testing import randn


def _fake_te():
    calls = {"autocast": [], "rows": []}

    class Format(enum.Enum):
        E4M3 = "e4m3"
        HYBRID = "hybrid"

    def recipe_cls(name):
        return dataclasses.make_dataclass(name, [("fp8_format", Format), ("amax_history_len", int, 1024),
                                                 ("amax_compute_algo", str, "max")])

    recipe = types.ModuleType("transformer_engine.common.recipe")
    recipe.Format = Format
    for name in ("DelayedScaling", "Float8CurrentScaling", "Float8BlockScaling", "MXFP8BlockScaling"):
        setattr(recipe, name, recipe_cls(name))

    active = []

    class Linear(nn.Linear):
        def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None):
            super().__init__(in_features, out_features, bias=bias, dtype=params_dtype, device=device)
            if not bias:  # like TE: a bias-free layer holds an empty tensor, not None
                del self._parameters["bias"]
                self.bias = torch.Tensor().to(dtype=params_dtype, device=device)

        def forward(self, x):
            assert active, "TE linear called outside fp8_autocast"
            assert x.dim() == 2 and x.shape[0] % 16 == 0, f"TE FP8 needs rows % 16 == 0, got {tuple(x.shape)}"
            calls["rows"].append(x.shape[0])
            return F.linear(x, self.weight, self.bias if self.bias.numel() else None)

    @contextlib.contextmanager
    def fp8_autocast(enabled, fp8_recipe):
        calls["autocast"].append(fp8_recipe)
        active.append(1)
        try:
            yield
        finally:
            active.pop()

    pt = types.ModuleType("transformer_engine.pytorch")
    pt.Linear, pt.fp8_autocast = Linear, fp8_autocast
    pt.is_fp8_available = lambda return_reason=False: (True, "") if return_reason else True
    common = types.ModuleType("transformer_engine.common")
    common.recipe = recipe
    root = types.ModuleType("transformer_engine")
    root.pytorch, root.common = pt, common
    mods = {"transformer_engine": root, "transformer_engine.pytorch": pt, "transformer_engine.common": common,
            "transformer_engine.common.recipe": recipe}
    return mods, calls, Format


@pytest.fixture
def fake_te(monkeypatch):
    mods, calls, fmt = _fake_te()
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    support.te_module.cache_clear()
    fp8_te.te_linear_class.cache_clear()
    yield calls, fmt
    support.te_module.cache_clear()
    fp8_te.te_linear_class.cache_clear()


@pytest.mark.parametrize("recipe,grad,cls,fmt", [("current", "e5m2", "Float8CurrentScaling", "HYBRID"),
                                                 ("delayed", "e4m3", "DelayedScaling", "E4M3"),
                                                 ("block", "e4m3", "Float8BlockScaling", "E4M3")])
def test_te_linear_pads_tokens_and_enters_autocast(fake_te, recipe, grad, cls, fmt):
    calls, Format = fake_te
    lin = nn.Linear(32, 48)
    te_lin = fp8_te.te_linear_from(lin, recipe, grad)
    assert te_lin.weight is not lin.weight and torch.equal(te_lin.weight, lin.weight)
    assert torch.equal(te_lin.bias, lin.bias) and te_lin.weight.dtype == lin.weight.dtype
    x = randn(3, 7, 32, seed=1)          # 21 tokens -> padded to 32
    y = te_lin(x)
    assert y.shape == (3, 7, 48)
    torch.testing.assert_close(y, lin(x))
    assert calls["rows"] == [32]
    r = calls["autocast"][0]
    assert type(r).__name__ == cls and r.fp8_format is getattr(Format, fmt)


def test_apply_fp8_te_mode_converts_with_the_stand_in(fake_te, monkeypatch):
    calls, _ = fake_te
    monkeypatch.setattr(fp8_apply, "_resolve_mode", lambda opts, device: ("te", None))
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.Linear(32, 10))
    ref = [p.detach().clone() for p in model.parameters()]
    apply_fp8(model, "te", recipe="delayed")
    assert [type(m).__name__ for m in model] == ["TeFp8Linear", "ReLU", "TeFp8Linear", "Linear"]
    assert model.fp8_report.converted == ["0", "2"]
    assert all(torch.equal(a, b) for a, b in zip(ref, model.parameters()))
    model(randn(16, 32)).sum().backward()
    assert len(calls["autocast"]) == 2
    with pytest.raises(ValueError, match="already has FP8 layers"):
        apply_fp8(model, "emulate")


@pytest.mark.parametrize("bias", [True, False])
def test_te_linear_honours_fp8_disabled(fake_te, bias):
    from r1fast.fp8 import fp8_disabled

    calls, _ = fake_te
    lin = nn.Linear(32, 16, bias=bias)
    te_lin = fp8_te.te_linear_from(lin, "current", "e5m2")
    x = randn(5, 32, seed=2)
    with fp8_disabled():
        torch.testing.assert_close(te_lin(x), lin(x))
    assert calls["autocast"] == []
    torch.testing.assert_close(te_lin(x), lin(x))  # and the FP8 (stand-in) path without a bias
