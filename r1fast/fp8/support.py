"""Which FP8 paths can run here, and why not when they can't (`r1fast info` prints this)."""
from __future__ import annotations

import functools

import torch

from r1fast.fp8.options import FP8_DTYPES, RECIPES

# FP8 tensor cores: Ada (sm_89) and Hopper (sm_90) onwards.
MIN_FP8_CAPABILITY = (8, 9)


@functools.lru_cache(maxsize=None)
def scaled_mm_error(device: torch.device, scaling: str, grad_dtype: str = "e5m2") -> str | None:
    """None when 16 x 16 torch._scaled_mm calls with `scaling` ("tensorwise" or "rowwise") scales, and the
    operand formats of a layer whose gradients are `grad_dtype` ("e5m2" or "e4m3"), run on `device`, else
    what it raised. Support differs by build and card: torch 2.11's CPU kernel takes one
    scale per operand only (2.13's takes rows too); rowwise scales on CUDA need Hopper, or Ada with
    torch >= 2.7, and cuBLAS's own rowwise kernels on newer cards."""
    try:
        ones = torch.ones(16, 16, device=device)
        b = ones.to(torch.float8_e4m3fn)
        if scaling == "rowwise":
            scale_a, scale_b = torch.ones(16, 1, device=device), torch.ones(1, 16, device=device)
        else:
            scale_a = scale_b = torch.tensor(1.0, device=device)
        # the rowwise CUDA kernel writes bf16 only (see gemm._scaled_mm_nt)
        out_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        # the first operand is E4M3 in forward and the gradient's format in backward: probe both, so a kernel
        # without E5M2 x E4M3 fails here, not in the first backward (and refuses no layer with E4M3 gradients)
        for a_dtype in dict.fromkeys((torch.float8_e4m3fn, FP8_DTYPES[grad_dtype])):
            torch._scaled_mm(ones.to(a_dtype), b.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    except Exception as e:  # noqa: BLE001 - any failure means: this path does not run here
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
    return None


def cuda_fp8_support(device: torch.device | None = None) -> tuple[bool, str]:
    """(FP8 GEMMs usable on this CUDA device, reason)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    cap = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if cap < MIN_FP8_CAPABILITY:
        return False, f"{name} is sm_{cap[0]}{cap[1]}; FP8 GEMMs need compute capability >= 8.9 (Ada/Hopper)"
    return True, f"{name} (sm_{cap[0]}{cap[1]})"


def torch_path(device: torch.device, scaling: str = "rowwise", grad_dtype: str = "e5m2") -> tuple[bool, str]:
    """Can the "torch" path (torch._scaled_mm) run on tensors living on `device` with `scaling` scales and
    `grad_dtype` gradients?"""
    if not hasattr(torch, "_scaled_mm"):
        return False, f"torch {torch.__version__} has no torch._scaled_mm"
    if device.type == "cuda":
        ok, why = cuda_fp8_support(device)
        if not ok:
            return False, why
        err = scaled_mm_error(device, scaling, grad_dtype)
        if err is not None:
            # Ada with an older torch takes tensorwise scales only: name the option that does run.
            hint = "; tensorwise scales run (scaling='tensorwise', fp8_scaling in a config)" \
                if scaling != "tensorwise" and scaled_mm_error(device, "tensorwise", grad_dtype) is None else ""
            return False, f"torch {torch.__version__}'s torch._scaled_mm with {scaling} scales fails on {why}: {err}{hint}"
        return True, f"torch._scaled_mm on {why}"
    if device.type == "cpu":
        if scaled_mm_error(device, scaling, grad_dtype) is None:
            return True, "torch._scaled_mm on the CPU (a reference kernel: correct, not faster than bf16)"
        if scaled_mm_error(device, "tensorwise", grad_dtype) is None:
            return False, (f"torch {torch.__version__}'s CPU torch._scaled_mm takes tensorwise scales only, "
                           f"not {scaling} (scaling='tensorwise', fp8_scaling in a config, runs)")
        return False, f"torch {torch.__version__} has no CPU torch._scaled_mm"
    return False, f"torch._scaled_mm is not used on {device.type}"


_TE_MISSING = "transformer_engine is not installed (pip install transformer_engine[pytorch])"
_te_import_error: str | None = None   # why te_module() is None: missing, or what the failed import raised


@functools.lru_cache(maxsize=None)
def te_module():
    """transformer_engine.pytorch, or None when Transformer Engine is not installed or fails to load."""
    global _te_import_error
    try:
        import transformer_engine.pytorch as te  # noqa: F401
    except Exception as e:
        # An installed TE often fails to load (a missing CUDA/cuDNN library, a torch it was not built for):
        # saying "not installed" then sent the user to pip instead of to the library that failed.
        missing = isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == "transformer_engine"
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        _te_import_error = _TE_MISSING if missing else \
            f"transformer_engine is installed but failed to import ({type(e).__name__}: {first_line})"
        return None
    _te_import_error = None
    return te


def _te_check(names: tuple[str, ...]) -> tuple[bool, str] | None:
    # TE moved its support probes between releases: try the known homes, newest first.
    te = te_module()
    for name in names:
        for owner in (te, getattr(te, "fp8", None), getattr(te, "quantization", None)):
            fn = getattr(owner, name, None) if owner is not None else None
            if fn is None:
                continue
            try:
                res = fn(return_reason=True) if name.startswith("is_") else fn()
            except TypeError:
                res = fn()
            except Exception as e:  # a probe failing means "not usable", with its message
                return False, str(e)
            if isinstance(res, tuple):
                return bool(res[0]), str(res[1] or "")
            return bool(res), ""
    return None


def te_recipe_support(recipe: str) -> tuple[bool, str]:
    """Is Transformer Engine usable with `recipe` on the current CUDA device?"""
    te = te_module()
    if te is None:
        return False, _te_import_error or _TE_MISSING
    if not torch.cuda.is_available():
        return False, "Transformer Engine FP8 needs a CUDA device"
    ok, why = cuda_fp8_support()
    if not ok:
        return False, why
    probes = {
        "current": ("is_fp8_available", "check_fp8_support"),
        "delayed": ("is_fp8_available", "check_fp8_support"),
        "block": ("is_fp8_block_scaling_available", "check_fp8_block_scaling_support"),
        "mxfp8": ("is_mxfp8_available", "check_mxfp8_support"),
    }[recipe]
    res = _te_check(probes)
    if res is None:
        if recipe in ("current", "delayed"):
            return True, why
        return False, f"the installed Transformer Engine has no {recipe} scaling"
    return res[0], (why if res[0] else res[1] or f"{recipe} scaling unsupported here")


def _te_version() -> str:
    try:
        from importlib.metadata import version

        return version("transformer_engine")
    except Exception:
        return "(unknown version)"


def available_paths() -> dict[str, tuple[bool, str]]:
    """{mode: (usable, explanation)} for the FP8 modes, as seen from the default device."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    paths = {
        "off": (True, "linear layers in their own precision"),
        "emulate": (True, "FP8 numerics in plain torch (quantise, fp32 matmul, dequantise): for tests, no speedup"),
        "torch": torch_path(dev),
    }
    ok, why = te_recipe_support("current")
    if ok:
        usable = [r for r in RECIPES if te_recipe_support(r)[0]]
        why = f"Transformer Engine {_te_version()} on {why}; recipes: {', '.join(usable)}"
    paths["te"] = (ok, why)
    return paths
