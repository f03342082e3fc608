"""`apply_fp8(model, mode)`: swap a model's attention/MLP linears for FP8 ones, in place."""
from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from r1fast.fp8.linear import Fp8Linear
from r1fast.fp8.options import Fp8Options, as_options, make_options
from r1fast.fp8.support import te_module, te_recipe_support, torch_path

# FP8 GEMMs need both matrix dimensions in multiples of 16 (cuBLAS / TE alignment).
ALIGN = 16


class Fp8FallbackWarning(UserWarning):
    """FP8 was requested but cannot run here; the layers stay in high precision."""


@dataclass
class Fp8Report:
    """What apply_fp8 did: attached to the model as `model.fp8_report`."""
    options: Fp8Options
    effective_mode: str                                      # the mode in force ("off" after a fallback)
    converted: list[str] = field(default_factory=list)       # module names now in FP8
    kept: dict[str, str] = field(default_factory=dict)       # module name -> why it stays high precision
    fallback_reason: str | None = None
    device: torch.device | None = None                       # where the mode was resolved (None: no layer to convert)


def _model_linear_class():
    """r1fast.models.linear.Linear when the models package exists, else None."""
    try:
        mod = importlib.import_module("r1fast.models.linear")
    except ModuleNotFoundError as e:
        if e.name in ("r1fast.models", "r1fast.models.linear"):
            return None
        raise
    return getattr(mod, "Linear", None)


def _is_converted(m: nn.Module) -> bool:
    return isinstance(m, Fp8Linear) or hasattr(m, "fp8_recipe_name")


def _candidates(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The linears to convert: the model's r1fast Linear instances if it has any (its attention and
    MLP projections by construction); otherwise every nn.Linear except an lm_head and any layer
    whose weight is tied to an embedding."""
    modules = list(model.named_modules())
    target_cls = _model_linear_class()
    if target_cls is not None:
        chosen = [(n, m) for n, m in modules if isinstance(m, target_cls)]
        if chosen:
            return chosen
    embedding_weights = {id(m.weight) for _, m in modules if isinstance(m, nn.Embedding)}
    return [(n, m) for n, m in modules
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] != "lm_head"
            and id(m.weight) not in embedding_weights]


def _weight_only_linears(model: nn.Module) -> dict[str, str]:
    """Linears whose forward never runs, by name, with the reason: nn.MultiheadAttention passes its
    out_proj's weight and bias to F.multi_head_attention_forward itself, so an FP8 out_proj would be
    reported converted while it computes in high precision."""
    return {(f"{name}." if name else "") + "out_proj":
            "nn.MultiheadAttention computes with out_proj's weight itself (its forward never runs)"
            for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}


def _computed_tensors(lin: nn.Linear) -> list[str]:
    """Which of the layer's weight and bias are computed (torch.nn.utils.parametrize, or the hook-based
    weight_norm) rather than held as its own Parameters: an Fp8Linear holds the Parameters themselves, so
    it would keep one stale computed tensor and drop the parameters it is computed from."""
    names = ["weight"] + (["bias"] if lin.bias is not None else [])
    return [n for n in names if not isinstance(lin._parameters.get(n), nn.Parameter)]


def _resolve_auto(opts: Fp8Options, device: torch.device) -> tuple[Fp8Options, str | None]:
    """The concrete options "auto" stands for on `device`, and why FP8 is off if it is."""
    if device.type != "cuda":
        return make_options("off", grad_dtype=opts.grad_dtype), f"no FP8 speed-up on {device.type}"
    if te_module() is not None and te_recipe_support(opts.recipe or "current")[0]:
        return make_options("te", recipe=opts.recipe, grad_dtype=opts.grad_dtype), None
    ok, why = torch_path(device, opts.scaling or "rowwise", opts.grad_dtype)
    if ok:
        return make_options("torch", grad_dtype=opts.grad_dtype, scaling=opts.scaling), None
    return make_options("off", grad_dtype=opts.grad_dtype), why


def _resolve_mode(opts: Fp8Options, device: torch.device) -> tuple[str, str | None]:
    """(mode to run, reason for falling back or None)."""
    if opts.mode == "torch":
        ok, why = torch_path(device, opts.scaling, opts.grad_dtype)
        return ("torch", None) if ok else ("off", why)
    if opts.mode == "te":
        if te_module() is None:
            return "off", te_recipe_support(opts.recipe)[1]
        if device.type != "cuda":
            return "off", f"Transformer Engine runs on CUDA devices; the model is on {device.type}"
        ok, why = te_recipe_support(opts.recipe)
        if not ok and opts.recipe in ("block", "mxfp8") and te_recipe_support("current")[0]:
            raise ValueError(f"fp8 recipe={opts.recipe!r} is not supported here ({why}); use recipe='current' or 'delayed'")
        return ("te", None) if ok else ("off", why)
    return opts.mode, None


# nn.Module's own hook registries in this torch (_forward_hooks, _backward_hooks, _state_dict_hooks, ...)
_MODULE_HOOK_ATTRS = tuple(name for name in vars(nn.Module()) if "hook" in name)


def _carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give `new` the hooks registered on `old` (forward, backward, state-dict): the same dicts, so the
    user's handles still remove them. The FP8 layer takes the linear's place; its hooks (e.g. recording
    activations) would otherwise stop firing without a word."""
    for name in _MODULE_HOOK_ATTRS:
        theirs, ours = getattr(old, name, None), getattr(new, name, None)
        if theirs is None or (isinstance(theirs, dict) and not theirs):
            continue  # (_is_full_backward_hook is a bool: False, the old-style hooks' flag, is carried too)
        if ours and isinstance(ours, dict):
            # the new layer registered hooks of its own (a Transformer Engine layer may): keep those, add the user's
            ours.update(theirs)
        else:
            setattr(new, name, theirs)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def apply_fp8(model: nn.Module, mode: str | Fp8Options, recipe: str | None = None, grad_dtype: str = "e5m2",
              scaling: str | None = None) -> nn.Module:
    """Run `model`'s attention/MLP linear layers in FP8; returns the model (changed in place; a bare
    nn.Linear given as `model` cannot be replaced in place: use the returned module).

    mode: "te" (Transformer Engine; recipe "current" (default), "delayed", "block", "mxfp8"),
    "torch" (torch._scaled_mm with our autograd function; scaling "rowwise" (default) or
    "tensorwise"), "emulate" (the same numerics in plain torch, any device), "auto" ("te" where
    it can run, else "torch" on an FP8 GPU, else "off" without a warning) or "off".
    grad_dtype: FP8 format of the gradients, "e5m2" (default) or "e4m3". Embeddings, lm_head and
    norms are untouched, master weights keep their dtype, and a layer whose dimensions are not
    multiples of 16 stays in high precision. Where the mode cannot run (a GPU without FP8, TE
    missing) the layers stay in high precision and one Fp8FallbackWarning says why.
    mode may also be an Fp8Options (`make_options(...)`) holding all of these.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_fp8: model must be a torch.nn.Module, got {type(model).__name__}")
    opts = as_options(mode, recipe=recipe, grad_dtype=grad_dtype, scaling=scaling)
    already = [n or "<root>" for n, m in model.named_modules() if _is_converted(m)]
    if already:
        raise ValueError(f"apply_fp8: the model already has FP8 layers ({', '.join(already[:3])}...); "
                         "apply it once, to a high-precision model")
    report = Fp8Report(options=opts, effective_mode=opts.mode)
    if opts.mode == "off":
        report.effective_mode = "off"
        return _attach(model, report)

    layers = []
    weight_only = _weight_only_linears(model)
    for name, lin in _candidates(model):
        label = name or "<root>"
        if name in weight_only:
            report.kept[label] = weight_only[name]
        elif nn.parameter.is_lazy(lin.weight):  # nn.LazyLinear before its first forward: in_features is 0
            report.kept[label] = "uninitialized (lazy) parameters; run one forward before apply_fp8"
        elif computed := _computed_tensors(lin):
            report.kept[label] = (f"its {' and '.join(computed)} is computed (a parametrization or "
                                  "hook), not a Parameter an FP8 layer can hold")
        elif lin.in_features % ALIGN or lin.out_features % ALIGN:
            report.kept[label] = f"{lin.out_features}x{lin.in_features} is not a multiple of {ALIGN}"
        elif lin.weight.device.type == "meta":
            report.kept[label] = "weights on the meta device"
        else:
            layers.append((name, lin))
    if not layers:
        # Nothing runs in FP8 (each layer's reason is in `kept`): say so rather than echo the request,
        # which for "auto" is not even a mode.
        report.effective_mode = "off"
        return _attach(model, report)

    device = report.device = layers[0][1].weight.device
    if opts.mode == "auto":
        opts, reason = _resolve_auto(opts, device)
        report.effective_mode, report.fallback_reason = opts.mode, reason
        if opts.mode == "off":
            return _attach(model, report)
    effective, reason = _resolve_mode(opts, device)
    if effective == "off":
        dtypes = sorted({str(lin.weight.dtype).replace("torch.", "") for _, lin in layers})
        report.effective_mode, report.fallback_reason = "off", reason
        warnings.warn(
            f"r1fast fp8: mode={opts.mode!r} cannot run here ({reason}); the {len(layers)} linear layers "
            f"stay in {'/'.join(dtypes)} without FP8", Fp8FallbackWarning, stacklevel=2)
        for name, _ in layers:
            report.kept[name or "<root>"] = f"fallback: {reason}"
        return _attach(model, report)

    if effective == "te":
        from r1fast.fp8.te import te_linear_from

        def convert(lin):
            return te_linear_from(lin, opts.recipe, opts.grad_dtype)
    else:
        def convert(lin):
            return Fp8Linear.from_linear(lin, impl=effective, grad_dtype=opts.grad_dtype, scaling=opts.scaling)

    for name, lin in layers:
        new = convert(lin)
        _carry_hooks(lin, new)
        if not name:  # the model is itself a linear layer
            model = new
        else:
            _set_submodule(model, name, new)
        report.converted.append(name or "<root>")
    return _attach(model, report)


def _attach(model: nn.Module, report: Fp8Report) -> nn.Module:
    model.fp8_report = report
    return model
