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


def test_te_linear_copies_dtype_requires_grad_and_training_mode(fake_te):
    lin = nn.Linear(32, 16, dtype=torch.bfloat16).eval()
    lin.weight.requires_grad_(False)          # a frozen layer stays frozen
    te_lin = fp8_te.te_linear_from(lin, "current", "e5m2")
    assert te_lin.weight.dtype == te_lin.bias.dtype == torch.bfloat16
    assert torch.equal(te_lin.weight, lin.weight) and torch.equal(te_lin.bias, lin.bias)
    assert not te_lin.weight.requires_grad and te_lin.bias.requires_grad
    assert not te_lin.training
    assert fp8_te.te_linear_from(nn.Linear(32, 16).train(), "current", "e5m2").training


def test_te_linear_keeps_a_frozen_bias_frozen(fake_te):
    # Only the weight's requires_grad was copied: a frozen bias came back trainable, and the trainer's
    # optimizer (built from the parameters that require grad) then trained it.
    lin = nn.Linear(32, 16)
    lin.bias.requires_grad_(False)
    te_lin = fp8_te.te_linear_from(lin, "current", "e5m2")
    assert te_lin.weight.requires_grad and not te_lin.bias.requires_grad
    assert torch.equal(te_lin.bias, lin.bias)


def test_delayed_recipe_keeps_a_short_max_amax_history(fake_te):
    _, Format = fake_te
    r = fp8_te.make_recipe("delayed", "e5m2")
    assert (r.fp8_format, r.amax_history_len, r.amax_compute_algo) == (Format.HYBRID, 16, "max")


def test_a_recipe_the_installed_te_lacks_is_a_clear_error(fake_te):
    del sys.modules["transformer_engine.common.recipe"].MXFP8BlockScaling
    with pytest.raises(ValueError, match="recipe='mxfp8': the installed Transformer Engine has no MXFP8BlockScaling"):
        fp8_te.make_recipe("mxfp8", "e4m3")


def test_te_2_8_autocast_gets_the_layers_recipe(fake_te):
    """TE 2.8 renamed fp8_autocast(enabled, fp8_recipe) to autocast(enabled, recipe): the new name is
    preferred where it exists, with the layer's recipe."""
    calls, _ = fake_te
    pt = sys.modules["transformer_engine.pytorch"]
    seen = []

    @contextlib.contextmanager
    def autocast(enabled, recipe):
        seen.append((enabled, recipe))
        with pt.fp8_autocast(enabled=enabled, fp8_recipe=recipe):   # the stand-in's layer checks for it
            yield
    pt.autocast = autocast
    te_lin = fp8_te.te_linear_from(nn.Linear(32, 16), "delayed", "e4m3")
    te_lin(randn(5, 32, seed=3))
    assert seen == [(True, te_lin._fp8_recipe)] and type(seen[0][1]).__name__ == "DelayedScaling"


def test_te_pads_only_a_token_count_that_needs_it(fake_te):
    calls, _ = fake_te
    te_lin = fp8_te.te_linear_from(nn.Linear(32, 16), "current", "e5m2")
    assert te_lin(randn(2, 16, 32, seed=4)).shape == (2, 16, 16)
    assert calls["rows"] == [32]


@pytest.fixture
def fake_fp8_gpu(fake_te, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(support, "cuda_fp8_support", lambda device=None: (True, "H100 (sm_90)"))
    return sys.modules["transformer_engine.pytorch"]


def test_te_recipe_support_asks_each_recipes_own_probe(fake_fp8_gpu):
    pt = fake_fp8_gpu
    assert support.te_recipe_support("current") == (True, "H100 (sm_90)")
    # a probe that answers with a reason, found on te.quantization (where newer TEs keep them)
    pt.quantization = types.SimpleNamespace(
        is_fp8_block_scaling_available=lambda return_reason=False: (False, "block scaling needs sm_90+") if return_reason
        else False)
    assert support.te_recipe_support("block") == (False, "block scaling needs sm_90+")
    # only asked with return_reason=True does this probe give its reason
    pt.is_mxfp8_available = lambda return_reason=False: (False, "MXFP8 needs Blackwell") if return_reason else False
    assert support.te_recipe_support("mxfp8") == (False, "MXFP8 needs Blackwell")
    # an older TE's check_* probe takes no arguments; one that raises means "not usable", with its message
    del pt.is_mxfp8_available

    def check():
        raise RuntimeError("no MXFP8 kernels in this build")
    pt.check_mxfp8_support = check
    assert support.te_recipe_support("mxfp8") == (False, "no MXFP8 kernels in this build")
    pt.is_mxfp8_available = lambda return_reason=False: (True, "") if return_reason else True
    assert support.te_recipe_support("mxfp8") == (True, "H100 (sm_90)")


def test_te_recipe_support_without_probes_trusts_the_fp8_gpu_for_per_tensor_recipes_only(fake_fp8_gpu):
    del fake_fp8_gpu.is_fp8_available
    assert support.te_recipe_support("current") == (True, "H100 (sm_90)")
    assert support.te_recipe_support("delayed") == (True, "H100 (sm_90)")
    assert support.te_recipe_support("block") == (False, "the installed Transformer Engine has no block scaling")


def test_te_recipe_support_needs_cuda(fake_te, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert support.te_recipe_support("current") == (False, "Transformer Engine FP8 needs a CUDA device")


class _BrokenTeFinder:
    """Finds transformer_engine and fails to load it, as an installed TE does without its CUDA libraries."""

    def find_spec(self, name, path=None, target=None):
        import importlib.machinery

        if name.split(".")[0] != "transformer_engine":
            return None
        return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise OSError("libcudnn.so.9: cannot open shared object file")


def test_a_te_that_fails_to_import_is_not_called_missing(monkeypatch):
    # te_module() turned every import failure into None, and the reason read "transformer_engine is not
    # installed (pip install ...)": `r1fast info` said so beside the installed TE's version, and the
    # fallback warning sent the user to reinstall rather than to the library that failed to load.
    for name in [n for n in sys.modules if n.split(".")[0] == "transformer_engine"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_BrokenTeFinder(), *sys.meta_path])
    support.te_module.cache_clear()
    try:
        assert support.te_module() is None
        ok, why = support.te_recipe_support("current")
        assert not ok and "not installed" not in why
        assert "failed to import" in why and "libcudnn.so.9" in why and "OSError" in why
        model = nn.Sequential(nn.Linear(32, 32))
        with pytest.warns(fp8_apply.Fp8FallbackWarning, match="libcudnn"):
            apply_fp8(model, "te")
    finally:
        support.te_module.cache_clear()


def test_a_missing_te_is_called_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_engine", None)   # import raises ModuleNotFoundError
    support.te_module.cache_clear()
    try:
        assert support.te_module() is None
        assert support.te_recipe_support("current") == (
            False, "transformer_engine is not installed (pip install transformer_engine[pytorch])")
    finally:
        support.te_module.cache_clear()
