"""Helpers for testing kernels against their references.

- fresh random inputs (never zeros), seeded per test so failures reproduce;
- poisoned outputs, so a kernel that skips a write is caught;
- tolerances by dtype, and the low-precision rule: the kernel's error against the
  float64 reference may be at most `factor` (2) times the error of the reference itself run in
  that precision.
"""
from __future__ import annotations

import torch

# Relative tolerance for comparing against a float64 reference, by the dtype the op ran in.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def generator(seed: int, device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def randn(*shape, dtype=torch.float32, device="cpu", seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """Standard-normal tensor drawn in fp32 on the CPU then cast (same values on every device)."""
    t = torch.randn(*shape, generator=generator(seed), dtype=torch.float32) * scale
    return t.to(device=device, dtype=dtype)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill t in place with a value no correct kernel writes (NaN for floats, a large sentinel for ints)."""
    if t.is_floating_point():
        t.fill_(float("nan"))
    else:
        t.fill_(torch.iinfo(t.dtype).max if t.dtype != torch.bool else True)
    return t


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double(), expected.detach().double()   # (a float() of a graph tensor warns)
    scale = e.abs().max().clamp_min(1e-30)
    return float((a - e).abs().max() / scale) if e.numel() else 0.0


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 rtol: float | None = None, atol: float | None = None, name: str = "tensor"):
    """Compare `actual` (computed in `dtype`) with `expected` (usually float64) elementwise."""
    dtype = dtype or actual.dtype
    rtol = RTOL.get(dtype, 1e-5) if rtol is None else rtol
    atol = ATOL.get(dtype, 1e-6) if atol is None else atol
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if torch.isnan(a).any() and not torch.isnan(e).any():
        raise AssertionError(f"{name}: {int(torch.isnan(a).sum())} NaN values (unwritten or poisoned output?)")
    # Relative to the tensor's scale, so near-zero elements of a large tensor don't need absurd precision.
    scale = e.abs().max().clamp_min(1.0) if e.numel() else torch.tensor(1.0, dtype=torch.float64)
    err = (a - e).abs()
    bound = atol + rtol * torch.maximum(e.abs(), scale * 1e-3)
    bad = err > bound
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements off (dtype {dtype}, rtol {rtol}, atol {atol}); "
            f"first at flat index {i}: got {a.flatten()[i].item():.8g}, expected {e.flatten()[i].item():.8g}; "
            f"max abs err {err.max().item():.3g}"
        )


def assert_within_lowp_rule(kernel_out: torch.Tensor, ref_lowp_out: torch.Tensor, ref64_out: torch.Tensor,
                            factor: float = 2.0, floor: float = 1e-6, name: str = "tensor"):
    """The low-precision rule: max|kernel - ref64| <= factor * max|ref_lowp - ref64| (+ floor)."""
    ref64 = ref64_out.detach().double().cpu()
    k_err = (kernel_out.detach().double().cpu() - ref64).abs().max().item()
    r_err = (ref_lowp_out.detach().double().cpu() - ref64).abs().max().item()
    if not k_err <= factor * r_err + floor:
        raise AssertionError(
            f"{name}: kernel error {k_err:.3g} exceeds {factor}x the reference's own low-precision error {r_err:.3g}"
        )


def record_launch_devices(monkeypatch, module, kernel_names) -> list:
    """Swap module.on_device and the module's Triton kernels for recorders: each launch appends the
    device made current around it (None when launched outside any device guard). Triton launches
    on the *current* CUDA device, so a launch outside on_device(tensor.device) runs on the wrong GPU."""
    import contextlib

    current, seen = [None], []

    @contextlib.contextmanager
    def guard(device):
        prev, current[0] = current[0], torch.device(device)
        try:
            yield
        finally:
            current[0] = prev

    monkeypatch.setattr(module, "on_device", guard, raising=False)
    for name in kernel_names:
        real = getattr(module, name)

        class _Launch:
            def __getitem__(self, grid, real=real):
                def run(*args, **kwargs):
                    seen.append(current[0])
                    return real[grid](*args, **kwargs)
                return run
        monkeypatch.setattr(module, name, _Launch())
    return seen


class LiveTiles:
    """Bytes of tracked tensors alive at once (CPU memory tests: no allocator statistics there).

    `track(t)` counts t until its last Python reference goes (the chunk loops' [chunk, V] tiles have no
    other owner), and `peak` is the most counted at any track() call, i.e. when a new tile appears."""

    def __init__(self):
        self.live, self.peak = {}, 0

    def track(self, t: torch.Tensor) -> torch.Tensor:
        import weakref

        key = id(t)
        self.live[key] = t.numel() * t.element_size()
        weakref.finalize(t, self.live.pop, key, None)
        self.peak = max(self.peak, sum(self.live.values()))
        return t
