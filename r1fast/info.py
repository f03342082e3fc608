"""`r1fast info`: what this installation can run."""
from __future__ import annotations

import importlib
import importlib.util
import platform


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        imported = importlib.import_module(module)
    except Exception as e:  # importable on paper but broken: say so rather than crash
        return f"broken ({type(e).__name__}: {e})"
    return getattr(imported, "__version__", None) or _distribution_version(module) or "installed"


def _distribution_version(module: str) -> str | None:
    """The version of the installed distribution that provides `module`: liger_kernel and math_verify have no
    __version__, and info said only "installed" for them."""
    import importlib.metadata as metadata

    for dist in metadata.packages_distributions().get(module, []):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def collect() -> dict:
    import torch

    from r1fast import __version__, _ext

    info: dict = {"r1fast": __version__, "python": platform.python_version(), "torch": torch.__version__,
                  "torch_cuda": torch.version.cuda or "none (CPU build)", "triton": _version("triton") or "not installed"}
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            gpus.append(f"{torch.cuda.get_device_name(i)} (compute capability {major}.{minor})")
    info["gpus"] = gpus or ["none"]
    build = _ext.build_info()
    if not build["built"]:
        problem = build["problem"]
        info["r1fast._C"] = (f"NOT BUILT{problem[len(_ext._NOT_BUILT):]}" if problem.startswith(_ext._NOT_BUILT)
                             else f"UNUSABLE: {problem}")
    elif build["with_cuda"]:
        info["r1fast._C"] = (f"built with CUDA {build['cuda_version']} for archs {build['cuda_archs']}"
                             + _cuda_runtime_note(build["cuda_version"]))
    else:
        info["r1fast._C"] = "built CPU-only (no nvcc at build time, or R1FAST_CUDA=0)"
    info["optional"] = {name: _version(mod) or "not installed" for name, mod in [
        ("flash-attn", "flash_attn"), ("transformer_engine", "transformer_engine"), ("liger-kernel", "liger_kernel"),
        ("trl", "trl"), ("transformers", "transformers"), ("math-verify", "math_verify")]}
    info["ops"] = _op_backends(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        from r1fast import fp8

        info["fp8"] = {k: ("usable: " if ok else "unavailable: ") + why for k, (ok, why) in fp8.available_paths().items()}
    except ImportError:
        pass
    return info


def _cuda_runtime_note(cuda_version: str) -> str:
    """Why the extension's CUDA kernels cannot run where torch runs on a GPU, else "". Its CUDA runtime is linked in
    statically and can need a newer driver than torch's: the ops then run another backend, and the cuda backend's
    error sent the user here ("`r1fast info` shows both"), where the _C line read as a working build."""
    import torch

    from r1fast import _ext

    if not torch.cuda.is_available():
        return ""
    try:
        count = _ext.load().cuda_device_count()
    except RuntimeError as e:
        why = str(e)
    else:
        if count > 0:
            return ""
        why = "its CUDA runtime sees no device"
    driver = _nvidia_driver_version()
    here = f", {driver}" if driver else ""
    return (f"; its CUDA kernels cannot run here ({why}; CUDA {cuda_version} may need a newer driver than this "
            f"one{here}): the ops run their other backends; rebuild r1fast._C with the CUDA torch uses "
            f"({torch.version.cuda}), or update the driver")


def _nvidia_driver_version() -> str | None:
    """The loaded NVIDIA kernel module's version (Linux), or None where it cannot be read."""
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8", errors="replace") as f:
            line = f.readline()
    except OSError:
        return None
    # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar ...", or "... Open Kernel Module for x86_64
    # 560.35.03  Release Build ..."
    import re

    m = re.search(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)*)(?:\s|$)", line)
    return m.group(1) if m else None


def _op_backends(device) -> dict:
    """Per op: the backend it runs by default on `device`, then the others usable there."""
    import os

    import r1fast.ops  # noqa: F401 - registers every op's backends
    from r1fast import backends

    forced = os.environ.get("R1FAST_BACKEND")
    out = {}
    for op in backends.ops():
        best = backends.default(op, device)
        others = ", ".join(b for b in backends.available(op, device) if b != best)
        out[op] = f"{best} on {device.type}" + (f" (also: {others})" if others else "") + _override(op, device, forced)
    if forced:
        out["R1FAST_BACKEND"] = (f"{forced} (overrides the defaults above)" if forced in backends.BACKENDS else
                                 f"{forced!r} is not a backend: every op call raises ValueError (backends: "
                                 f"{', '.join(backends.BACKENDS)})")
    return out


def _override(op: str, device, forced) -> str:
    """What R1FAST_BACKEND makes of `op` here: the default line alone read as if the op ran, where a
    backend that cannot run here (triton or cuda on the CPU) makes every call of it a ValueError."""
    from r1fast import backends

    if forced not in backends.BACKENDS or forced not in backends.implementations(op):
        return ""   # not a backend (said once, below the ops), or the override leaves this op alone
    ok, why = backends.backend_available(forced, device)
    return f" -> {forced} (R1FAST_BACKEND)" if ok else f" -> R1FAST_BACKEND={forced}: every call raises ValueError ({why})"


def render(info: dict) -> str:
    lines = []
    for k, v in info.items():
        if isinstance(v, dict):
            lines.append(f"{k}:")
            width = max([20, *map(len, v)])
            lines += [f"  {kk:<{width}} {vv}" for kk, vv in v.items()]
        elif isinstance(v, list):
            lines.append(f"{k + ':':<22} {v[0]}")
            lines += [f"{'':<22} {x}" for x in v[1:]]
        else:
            lines.append(f"{k + ':':<22} {v}")
    return "\n".join(lines)
