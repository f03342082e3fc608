"""apply_fp8: which layers change, option checking, fallbacks, and a few training steps in FP8."""
import warnings

import pytest
import torch
from torch import nn

import r1fast.fp8.apply as fp8_apply
from r1fast.fp8 import Fp8FallbackWarning, Fp8Linear, apply_fp8, available_paths, make_options
from r1fast.fp8.support import torch_path

try:
    from r1fast.models import CausalLM, Linear as ModelLinear, ModelConfig
except ImportError:  # the models package is optional for these tests
    CausalLM = ModelLinear = ModelConfig = None


class Tiny(nn.Module):
    """An embedding, an MLP with one unaligned layer, and an lm_head (untied, and one tied copy)."""

    def __init__(self, vocab=40, h=32, tie=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, h)
        self.up = nn.Linear(h, 64)
        self.down = nn.Linear(64, h, bias=False)
        self.odd = nn.Linear(h, 24)         # 24 is not a multiple of 16
        self.back = nn.Linear(24, h)
        self.norm = nn.LayerNorm(h)
        self.lm_head = nn.Linear(h, vocab, bias=False)
        self.tied = nn.Linear(h, vocab, bias=False)
        self.tied.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        x = x + self.down(torch.relu(self.up(x)))
        x = x + self.back(torch.tanh(self.odd(x)))
        return self.lm_head(self.norm(x))


def test_options_reject_bad_values_and_combinations():
    for kwargs, msg in [(dict(mode="fp8"), "mode='fp8'"), (dict(mode="torch", grad_dtype="e4m2"), "grad_dtype"),
                        (dict(mode="torch", scaling="block"), "scaling='block'"),
                        (dict(mode="te", recipe="hybrid"), "recipe='hybrid'"),
                        (dict(mode="torch", recipe="delayed"), "applies to mode='te' only"),
                        (dict(mode="emulate", recipe="current"), "applies to mode='te' only"),
                        (dict(mode="te", scaling="rowwise"), "with mode='te'"),
                        (dict(mode=True), "mode=True")]:
        with pytest.raises(ValueError, match=msg):
            make_options(**kwargs)
        with pytest.raises(ValueError, match=msg):
            apply_fp8(Tiny(), **kwargs)
    assert make_options("te").recipe == "current"
    assert make_options("torch").scaling == "rowwise"
    assert make_options(None).mode == "off"
    with pytest.raises(TypeError, match="nn.Module"):
        apply_fp8("model", "emulate")


def test_available_paths_shape():
    paths = available_paths()
    assert set(paths) == {"off", "emulate", "torch", "te"}
    for ok, why in paths.values():
        assert isinstance(ok, bool) and isinstance(why, str) and why
    assert paths["emulate"][0] and paths["off"][0]


def test_torch_path_on_a_gpu_probes_the_scaling_asked_for(monkeypatch):
    """An FP8 card whose torch._scaled_mm takes no rowwise scales (Ada before torch 2.7, say): the torch
    path is unusable for rowwise, with the card, the scaling and the error named, and usable for tensorwise."""
    import r1fast.fp8.support as support

    monkeypatch.setattr(support, "cuda_fp8_support", lambda device=None: (True, "NVIDIA L4 (sm_89)"))
    monkeypatch.setattr(support, "scaled_mm_error",
                        lambda device, scaling, *_: "RuntimeError: rowwise scaling needs sm_90" if scaling == "rowwise"
                        else None)
    ok, why = support.torch_path(torch.device("cuda"), "rowwise")
    assert not ok and "rowwise scales fails on NVIDIA L4 (sm_89): RuntimeError: rowwise scaling needs sm_90" in why
    assert why.endswith("tensorwise scales run (scaling='tensorwise', fp8_scaling in a config)")  # r1fast info says it
    assert support.torch_path(torch.device("cuda"), "tensorwise") == (True, "torch._scaled_mm on NVIDIA L4 (sm_89)")


def test_torch_path_on_the_cpu_follows_what_its_scaled_mm_takes(monkeypatch):
    """torch 2.11's CPU kernel takes tensorwise scales only, 2.13's rows too: the path follows the probe."""
    import r1fast.fp8.support as support

    takes = {"tensorwise"}
    monkeypatch.setattr(support, "scaled_mm_error", lambda device, scaling, *_: None if scaling in takes else "RuntimeError: no")
    ok, why = support.torch_path(torch.device("cpu"), "rowwise")
    assert not ok and "takes tensorwise scales only, not rowwise" in why
    assert support.torch_path(torch.device("cpu"), "tensorwise")[0]
    takes.clear()
    assert support.torch_path(torch.device("cpu"), "tensorwise") == (
        False, f"torch {torch.__version__} has no CPU torch._scaled_mm")


def test_cuda_fp8_support_needs_ada_or_later_and_probes_nothing_before(monkeypatch):
    import r1fast.fp8.support as support

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "card")
    monkeypatch.setattr(support, "scaled_mm_error", lambda device, scaling, *_: pytest.fail("probed a card without FP8"))
    for cap, ok in (((8, 0), False), ((8, 9), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=cap: c)
        assert support.cuda_fp8_support()[0] is ok, cap
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    ok, why = support.torch_path(torch.device("cuda"), "rowwise")
    assert not ok and "card is sm_80; FP8 GEMMs need compute capability >= 8.9" in why


def test_scaled_mm_probe_passes_the_scales_of_the_scaling_asked_for(monkeypatch):
    import r1fast.fp8.support as support

    seen = []

    def scaled_mm(a, b, scale_a, scale_b, out_dtype):
        seen.append((a.dtype, b.dtype, tuple(scale_a.shape), tuple(scale_b.shape), out_dtype))
        return torch.zeros(16, 16, dtype=out_dtype)
    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    support.scaled_mm_error.cache_clear()
    try:
        assert support.scaled_mm_error(torch.device("cpu"), "rowwise") is None
        assert support.scaled_mm_error(torch.device("cpu"), "tensorwise") is None
    finally:
        support.scaled_mm_error.cache_clear()
    e4m3, e5m2, f32 = torch.float8_e4m3fn, torch.float8_e5m2, torch.float32
    # both first-operand formats the layer uses (forward E4M3, backward the gradient's), E4M3 second
    assert seen == [(e4m3, e4m3, (16, 1), (1, 16), f32), (e5m2, e4m3, (16, 1), (1, 16), f32),
                    (e4m3, e4m3, (), (), f32), (e5m2, e4m3, (), (), f32)]


def test_a_device_without_e5m2_operands_runs_layers_with_e4m3_gradients(monkeypatch):
    """A _scaled_mm that refuses an E5M2 first operand: layers with E5M2 gradients (the default) fall back
    at apply_fp8, but E4M3 gradients never use one, and those layers are converted and run."""
    import r1fast.fp8.linear as fp8_linear_mod
    import r1fast.fp8.support as support

    e5m2 = torch.float8_e5m2

    def scaled_mm(a, b, scale_a, scale_b, out_dtype, **kw):
        if a.dtype == e5m2:
            raise RuntimeError("Expected mat1 to be float8_e4m3fn")
        return (a.float() @ b.float() * scale_a * scale_b).to(out_dtype)
    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    support.scaled_mm_error.cache_clear()
    fp8_linear_mod._torch_path_on.cache_clear()
    try:
        model = Tiny()
        with warnings.catch_warnings():
            warnings.simplefilter("error", Fp8FallbackWarning)
            apply_fp8(model, "torch", grad_dtype="e4m3", scaling="tensorwise")
        assert model.fp8_report.effective_mode == "torch" and sorted(model.fp8_report.converted) == ["down", "up"]
        x = torch.randn(5, 32, requires_grad=True)
        model.down(model.up(x)).sum().backward()   # forward and both backward GEMMs, no E5M2 operand
        assert x.grad is not None and torch.isfinite(x.grad).all()
        with pytest.warns(Fp8FallbackWarning, match="mode='torch' cannot run here"):
            apply_fp8(Tiny(), "torch", grad_dtype="e5m2", scaling="tensorwise")
        assert support.scaled_mm_error(torch.device("cpu"), "tensorwise", "e5m2").endswith("to be float8_e4m3fn")
    finally:
        support.scaled_mm_error.cache_clear()
        fp8_linear_mod._torch_path_on.cache_clear()


def test_plain_module_swaps_aligned_linears_only():
    torch.manual_seed(0)
    model = Tiny()
    params_before = {n: p for n, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    ids = torch.randint(0, 40, (3, 7))
    ref = model(ids)
    out = apply_fp8(model, "emulate", grad_dtype="e4m3", scaling="tensorwise")
    assert out is model
    assert isinstance(model.up, Fp8Linear) and isinstance(model.down, Fp8Linear)
    assert model.up.fp8_grad_dtype == "e4m3" and model.up.fp8_scaling == "tensorwise"
    for name in ("odd", "back", "lm_head", "tied"):
        assert type(getattr(model, name)) is nn.Linear, name
    rep = model.fp8_report
    assert rep.effective_mode == "emulate" and sorted(rep.converted) == ["down", "up"]
    assert "odd" in rep.kept and "back" in rep.kept and "lm_head" not in rep.converted
    # same Parameter objects, same dtypes, same checkpoint keys
    assert all(p is params_before[n] for n, p in model.named_parameters())
    assert list(model.state_dict()) == keys_before
    # FP8 output close to, but not identical with, the high-precision one
    got = model(ids)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.05
    with pytest.raises(ValueError, match="already has FP8 layers"):
        apply_fp8(model, "emulate")


def test_multihead_attention_out_proj_is_kept_since_its_forward_never_runs():
    # nn.MultiheadAttention hands out_proj's weight to F.multi_head_attention_forward itself: an Fp8Linear
    # there was listed as converted while the attention output projection ran in high precision.
    torch.manual_seed(0)
    model = nn.Module()
    model.attn = nn.MultiheadAttention(32, 2)
    model.mlp = nn.Linear(32, 32)
    q = torch.randn(5, 2, 32)
    ref = model.attn(q, q, q)[0]
    apply_fp8(model, "emulate")
    rep = model.fp8_report
    assert rep.converted == ["mlp"] and isinstance(model.mlp, Fp8Linear)
    assert not isinstance(model.attn.out_proj, Fp8Linear) and "MultiheadAttention" in rep.kept["attn.out_proj"]
    assert torch.equal(model.attn(q, q, q)[0], ref)   # what the report says: this layer is not in FP8


@pytest.mark.parametrize("how", ["parametrizations.weight_norm", "weight_norm hook", "spectral_norm"])
def test_a_linear_with_a_computed_weight_is_kept(how):
    # Fp8Linear holds the layer's weight Parameter; a parametrized (or hook-computed) weight is no
    # Parameter: the layer kept a stale computed tensor, the parametrization's parameters left the model
    # and its state_dict, and a second backward failed. Such a layer stays in high precision.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    if how == "parametrizations.weight_norm":
        nn.utils.parametrizations.weight_norm(model[0])
    elif how == "spectral_norm":
        nn.utils.parametrizations.spectral_norm(model[0])
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # torch deprecates the hook-based weight_norm
            nn.utils.weight_norm(model[0])
    params = list(model.parameters())
    keys = list(model.state_dict())
    apply_fp8(model, "emulate")
    assert model.fp8_report.converted == ["1"] and "computed" in model.fp8_report.kept["0"]
    assert not isinstance(model[0], Fp8Linear) and isinstance(model[1], Fp8Linear)
    assert list(model.parameters()) == params and list(model.state_dict()) == keys
    x = torch.randn(4, 32)
    for _ in range(2):
        model(x).sum().backward()
    assert all(p.grad is not None for p in params)


def test_an_uninitialized_lazy_linear_is_kept():
    # nn.LazyLinear has in_features 0 until its first forward: 0 passed the multiple-of-16 test, and the
    # converted layer failed on its first call with an uninitialized-parameter error.
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(32), nn.Linear(32, 16))
    apply_fp8(model, "emulate")
    assert model.fp8_report.converted == ["1"] and "lazy" in model.fp8_report.kept["0"]
    assert model(torch.randn(3, 48)).shape == (3, 16) and model[0].in_features == 48


def test_hooks_on_a_converted_layer_keep_running():
    # The FP8 layer replaced the module and with it the hooks a user had registered on it (e.g. to record
    # activations): they stopped firing without a word.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    seen = []
    pre = model[0].register_forward_pre_hook(lambda m, args: seen.append(("pre", type(m).__name__)))
    model[0].register_forward_hook(lambda m, args, out: seen.append(("fwd", tuple(out.shape))))
    model[2].register_full_backward_hook(lambda m, gin, gout: seen.append(("bwd", tuple(gout[0].shape))))
    apply_fp8(model, "emulate")
    assert model.fp8_report.converted == ["0", "2"]
    model(torch.randn(3, 32)).sum().backward()
    assert seen == [("pre", "Fp8Linear"), ("fwd", (3, 32)), ("bwd", (3, 16))]
    pre.remove()                                   # the user's handle still removes its hook
    seen.clear()
    model(torch.randn(3, 32))
    assert seen == [("fwd", (3, 32))]


def test_off_changes_nothing_and_root_linear_is_returned():
    model = Tiny()
    assert apply_fp8(model, "off") is model and model.fp8_report.effective_mode == "off"
    assert not any(isinstance(m, Fp8Linear) for m in model.modules())
    lin = nn.Linear(32, 16)
    new = apply_fp8(lin, "emulate")
    assert isinstance(new, Fp8Linear) and new.weight is lin.weight


@pytest.mark.parametrize("mode", ["emulate", "auto"])
def test_nothing_to_convert_reports_off(mode):
    model = nn.Sequential(nn.Linear(24, 40), nn.Linear(40, 24))   # no dimension pair aligned to 16
    apply_fp8(model, mode)
    rep = model.fp8_report
    assert rep.effective_mode == "off" and not rep.converted and sorted(rep.kept) == ["0", "1"]


def test_fallback_warns_once_and_keeps_high_precision(monkeypatch):
    # A GPU without FP8: simulate the capability check failing for the torch path.
    monkeypatch.setattr(fp8_apply, "torch_path",
                        lambda device, scaling="rowwise", *_: (False, "NVIDIA A100 is sm_80; FP8 GEMMs need compute capability >= 8.9"))
    model = Tiny().to(torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_fp8(model, "torch")
    fw = [w for w in caught if issubclass(w.category, Fp8FallbackWarning)]
    assert len(fw) == 1 and "sm_80" in str(fw[0].message) and "bfloat16" in str(fw[0].message)
    assert not any(isinstance(m, Fp8Linear) for m in model.modules())
    assert model.fp8_report.effective_mode == "off" and "sm_80" in model.fp8_report.fallback_reason


def test_te_missing_or_no_cuda_falls_back_with_one_warning(monkeypatch):
    model = Tiny()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_fp8(model, "te", recipe="delayed")
    fw = [w for w in caught if issubclass(w.category, Fp8FallbackWarning)]
    if available_paths()["te"][0] and torch.cuda.is_available():
        pytest.skip("Transformer Engine is usable here: no fallback to test")
    assert len(fw) == 1 and "mode='te'" in str(fw[0].message)
    assert model.fp8_report.effective_mode == "off"


@pytest.mark.parametrize("scaling", ["rowwise", "tensorwise"])
def test_torch_mode_runs_where_scaled_mm_does(scaling):
    ok, why = torch_path(torch.device("cpu"), scaling)  # Tiny lives on the CPU
    if not ok:
        pytest.skip(why)
    torch.manual_seed(0)
    a, b = Tiny(), Tiny()
    b.load_state_dict(a.state_dict())
    apply_fp8(a, "torch", scaling=scaling)
    apply_fp8(b, "emulate", scaling=scaling)
    assert a.fp8_report.effective_mode == "torch"
    ids = torch.randint(0, 40, (2, 9))
    ya, yb = a(ids), b(ids)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(ModelLinear is None, reason="r1fast.models is not available")
def test_causal_lm_converts_only_its_projection_layers():
    cfg = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=50, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = CausalLM(cfg)
    projections = [n for n, m in model.named_modules() if isinstance(m, ModelLinear)]
    apply_fp8(model, "emulate")
    converted = model.fp8_report.converted
    # qkv 32 -> 64 (4 + 2 x 2 heads of 8), gate_up 32 -> 128, o and down: aligned, so every projection converts
    assert sorted(converted) == sorted(projections) and len(converted) == 8
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, Fp8Linear)
    assert isinstance(model.embed_tokens, nn.Embedding)


def test_only_model_linear_class_is_replaced_when_present(monkeypatch):
    class ProjLinear(nn.Linear):
        pass

    monkeypatch.setattr(fp8_apply, "_model_linear_class", lambda: ProjLinear)
    model = nn.Sequential(ProjLinear(32, 32), nn.Linear(32, 32), ProjLinear(32, 16))
    apply_fp8(model, "emulate")
    assert [type(m).__name__ for m in model] == ["Fp8Linear", "Linear", "Fp8Linear"]


def _train(model, steps, seed=0):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 40, (4, 12), generator=g)
        # a learnable target: a fixed permutation of the input token
        logits = model(ids)
        loss = nn.functional.cross_entropy(logits.reshape(-1, 40), ((7 * ids + 3) % 40).reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("grad_dtype,scaling", [("e5m2", "rowwise"), ("e4m3", "tensorwise")])
def test_training_in_emulated_fp8_tracks_fp32(grad_dtype, scaling):
    torch.manual_seed(0)
    ref = Tiny()
    fp8 = Tiny()
    fp8.load_state_dict(ref.state_dict())
    apply_fp8(fp8, "emulate", grad_dtype=grad_dtype, scaling=scaling)
    assert fp8.fp8_report.converted
    a, b = _train(ref, 25), _train(fp8, 25)
    assert a[-1] < 0.8 * a[0]                 # the task is learnable in fp32
    for step, (la, lb) in enumerate(zip(a, b)):
        assert abs(la - lb) <= 0.03 * la, f"step {step}: fp32 loss {la:.4f} vs FP8 {lb:.4f}"
    assert a != b                             # and the FP8 run really did differ


@pytest.mark.skipif(CausalLM is None, reason="r1fast.models is not available")
def test_causal_lm_training_in_emulated_fp8_tracks_fp32():
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=48, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    ref = CausalLM(cfg)
    ref.reset_parameters(seed=0)
    fp8 = CausalLM(cfg)
    fp8.load_state_dict(ref.state_dict())
    apply_fp8(fp8, "emulate")

    def losses(model):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(1)
        out = []
        for _ in range(12):
            ids = torch.randint(0, 48, (40,), generator=g)
            cu = torch.tensor([0, 17, 40], dtype=torch.int32)
            logits = model.logits(model(ids, cu_seqlens=cu))
            # a learnable target: a fixed permutation of the input token
            loss = nn.functional.cross_entropy(logits, (5 * ids + 1) % 48)
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        return out

    a, b = losses(ref), losses(fp8)
    assert a[-1] < 0.8 * a[0]
    for step, (la, lb) in enumerate(zip(a, b)):
        assert abs(la - lb) <= 0.03 * la, f"step {step}: fp32 loss {la:.4f} vs FP8 {lb:.4f}"
    assert a != b


def test_fp8_disabled_context_restores_high_precision():
    from r1fast.fp8 import fp8_disabled, fp8_enabled

    torch.manual_seed(0)
    ref = Tiny()
    model = Tiny()
    model.load_state_dict(ref.state_dict())
    apply_fp8(model, "emulate")
    ids = torch.randint(0, 40, (2, 5))
    with fp8_disabled():
        assert not fp8_enabled()
        torch.testing.assert_close(model(ids), ref(ids), rtol=0, atol=0)
    assert fp8_enabled()
    assert not torch.equal(model(ids), ref(ids))


def test_auto_mode(monkeypatch):
    model = Tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # "auto" falls back silently
        apply_fp8(model, "auto")
    assert model.fp8_report.effective_mode == "off" and not model.fp8_report.converted
    assert "no FP8 speed-up on cpu" in model.fp8_report.fallback_reason
    # on a CUDA device: TE when usable, else torch._scaled_mm when the card has FP8, else off
    cuda = torch.device("cuda")
    monkeypatch.setattr(fp8_apply, "te_module", lambda: None)
    monkeypatch.setattr(fp8_apply, "torch_path", lambda device, scaling="rowwise", *_: (True, "sm_90"))
    opts, why = fp8_apply._resolve_auto(make_options("auto", scaling="tensorwise"), cuda)
    assert (opts.mode, opts.scaling, why) == ("torch", "tensorwise", None)
    monkeypatch.setattr(fp8_apply, "torch_path", lambda device, scaling="rowwise", *_: (False, "A100 is sm_80"))
    opts, why = fp8_apply._resolve_auto(make_options("auto"), cuda)
    assert opts.mode == "off" and "sm_80" in why
    monkeypatch.setattr(fp8_apply, "te_module", lambda: object())
    monkeypatch.setattr(fp8_apply, "te_recipe_support", lambda recipe: (True, ""))
    opts, _ = fp8_apply._resolve_auto(make_options("auto", recipe="delayed"), cuda)
    assert (opts.mode, opts.recipe) == ("te", "delayed")


@pytest.mark.gpu
def test_scaled_mm_probe_passes_on_hopper():
    # the probe's own arguments (shapes, bf16 output on CUDA) must be ones Hopper's kernels take
    from r1fast.fp8.support import scaled_mm_error

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("rowwise torch._scaled_mm is only promised on sm_90+")
    assert scaled_mm_error(torch.device("cuda"), "rowwise") is None
    assert scaled_mm_error(torch.device("cuda"), "tensorwise") is None


def test_options_defaults_and_hand_built_options_are_checked():
    from r1fast.fp8 import Fp8Options, as_options

    assert make_options(False).mode == "off"                    # fp8=False in a config means off
    # "off" drops the other options: nothing runs in FP8, so they cannot apply
    assert make_options("off", scaling="tensorwise") == Fp8Options("off", None, "e5m2", None)
    assert make_options("off", recipe="delayed", grad_dtype="e4m3") == Fp8Options("off", None, "e4m3", None)
    # an Fp8Options built by hand is validated and completed like a mode string
    with pytest.raises(ValueError, match="applies to mode='te' only"):
        as_options(Fp8Options("torch", recipe="delayed"))
    assert as_options(Fp8Options("te")).recipe == "current"
    assert as_options(Fp8Options("emulate")).scaling == "rowwise"
    # ... and never together with keywords, grad_dtype included
    for kw in (dict(grad_dtype="e4m3"), dict(scaling="tensorwise"), dict(recipe="current")):
        with pytest.raises(ValueError, match="not both"):
            as_options(make_options("torch"), **kw)
    assert make_options("emulate").rowwise and not make_options("torch", scaling="tensorwise").rowwise
    assert not make_options("te").rowwise and not make_options("off").rowwise


def test_fp8_disabled_nests_and_restores_on_exit():
    from r1fast.fp8 import fp8_disabled, fp8_enabled

    with fp8_disabled():
        with fp8_disabled():
            assert not fp8_enabled()
        assert not fp8_enabled()              # leaving the inner block keeps the outer one's setting
    assert fp8_enabled()
    with pytest.raises(KeyError):
        with fp8_disabled():
            raise KeyError("x")
    assert fp8_enabled()


def test_converted_layers_keep_the_training_mode():
    model = Tiny().eval()
    apply_fp8(model, "emulate")
    assert isinstance(model.up, Fp8Linear) and not model.up.training
    lin = nn.Linear(32, 16).train()
    assert Fp8Linear.from_linear(lin, impl="emulate").training
