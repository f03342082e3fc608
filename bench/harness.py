"""The bench harness: suites register cases, the harness times them and compares with the floor.

A case has the r1fast implementation and its peers (each run only when importable), and a floor
model: its FLOPs and bytes, turned into a time at this machine's peak matmul rate and copy
bandwidth, both measured once per run. Every row has the same schema (COLUMNS; bench/README.md, "What a row means"),
so results from different days and cards compare.
"""
from __future__ import annotations

import atexit
import csv
import dataclasses
import datetime as _dt
import functools
import gc
import importlib
import importlib.util
import json
import math
import os
import pkgutil
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

SIZES = ("smoke", "gpu")
# Qwen2.5-1.5B's shape (random weights): the gpu size of the decoder suites (model, rollout, grpo_step).
QWEN25_15B = dict(architecture="Qwen2ForCausalLM", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                  num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6,
                  max_position_embeddings=32768, tie_word_embeddings=True)
COLUMNS = ["suite", "case", "provider", "backend", "mode", "size", "dtype", "metric", "p50", "p20", "p80",
           "floor", "pct_of_floor", "device", "torch", "triton", "r1fast", "git_commit", "timestamp"]


class Skip(Exception):
    """Raised by an Impl's setup when it cannot run here (the reason is printed)."""


def gpu_size(size: str, device: torch.device) -> bool:
    """Whether a suite's cases are for --size gpu: a real model's shapes, which need a CUDA device (on any
    other, Skip; main() refuses that pairing already, this is for a caller of a suite's cases)."""
    if size == "gpu" and device.type != "cuda":
        raise Skip("the gpu size needs a CUDA device")
    return size == "gpu"


def require_backend(op: str, backend: str, device: torch.device) -> None:
    """Skip (raise Skip) unless `op` has a `backend` implementation that runs on `device`."""
    from r1fast import backends, ops  # noqa: F401 - importing ops registers their backends

    if backend not in backends.available(op, device):
        raise Skip(f"{op}: backend {backend} unavailable on {device.type}")


class DeviceLost(RuntimeError):
    """The CUDA context is unusable (a kernel faulted: illegal address, device assert). Errors of
    this kind are sticky, so nothing more can run in this process; a new process can go on with
    `remaining` (main(..., append_to=) adds its rows to the same results files)."""

    def __init__(self, why: str, rows: list[dict] | None = None):
        super().__init__(why)
        self.rows, self.remaining = rows or [], []


class ResultsNotWritten(ValueError):
    """The results files cannot be written (a full disk): the run stops, naming the file, instead of
    counting the suite being measured as FAILED and saying no row was measured."""


def device_lost(device: torch.device) -> str | None:
    """Why `device` can run nothing more in this process, or None while it can."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 - any error here means the context is gone
        return " ".join(f"{type(e).__name__}: {e}".split())  # one line: torch's message spans several
    return None


@dataclasses.dataclass
class Impl:
    provider: str                      # "r1fast" or a peer's name
    # reference | torch | triton | cuda | a peer's own label. A setup may add what it found out to its rows'
    # backend: the callable it returns carries backend_detail (a str), and the rows say
    # "<backend> (<backend_detail>)", e.g. the decode path a rollout engine chose at start-up.
    backend: str
    setup: Callable[[], Callable[[], object]]   # builds inputs, returns the zero-argument callable to time
    requires: tuple[str, ...] = ()     # importable modules this impl needs
    # Override the case's warmup / reps for this impl (a slow peer: warmup=0, reps=1 times one call).
    warmup: int | None = None
    reps: int | None = None
    # dtype whose matmul rate sets this impl's FLOP floor (default: the case's), e.g. the bf16 row of
    # an FP8 case is held to the bf16 rate, the FP8 rows to the FP8 rate.
    matmul_dtype: str | None = None


_TEMP_DIRS: list[str] = []


def temp_dir(prefix: str) -> str:
    """A new folder under the system temp dir for an Impl's files (a saved checkpoint, a trainer's
    output_dir). run_suite removes it when the impl that made it is done, even when it failed; one made
    outside a run is removed at exit. Left in place, each grpo_step run kept a saved checkpoint per impl
    (seven: ~3 GB each at GPU size, on the GPU machine's 64 GB disk)."""
    path = tempfile.mkdtemp(prefix=prefix)
    _TEMP_DIRS.append(path)
    return path


def remove_temp_dirs(since: int = 0) -> None:
    """Remove the folders temp_dir made after its first `since` ones (default: all of them)."""
    while len(_TEMP_DIRS) > since:
        shutil.rmtree(_TEMP_DIRS.pop(), ignore_errors=True)


atexit.register(remove_temp_dirs)


def generator(device, seed: int) -> torch.Generator:
    """A seeded generator on `device`. Bench inputs are drawn on the device itself (randn(...,
    generator=g, device=g.device)): a GPU-size lm_head weight (152k x 4096) drawn on the CPU takes
    seconds per Impl setup, on the GPU milliseconds."""
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def with_env(setup: Callable[[], Callable[[], object]], **env: str) -> Callable[[], Callable[[], object]]:
    """An Impl setup whose timed callable runs with these environment variables set (restored after
    each call), e.g. R1FAST_LOGITS_GEMM=cublas for one variant of a backend; the backward runs inside
    the call too, so it sees the same setting."""
    def wrapped():
        run = setup()

        def run_with_env():
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                return run()
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        return run_with_env
    return wrapped


@dataclasses.dataclass
class Case:
    name: str
    mode: str                          # fwd | fwd_bwd | step
    dtype: str
    impls: list[Impl]
    flops: float = 0.0
    bytes: float = 0.0
    items: float | None = None         # work units per call, for throughput (tokens, sequences...)
    item_name: str = "tokens"
    matmul_dtype: str | None = None    # dtype whose matmul rate sets the FLOP floor (default: dtype)
    # Work that runs in phases one after another (a decode step: compute-bound GEMMs, then memory-bound
    # attention): [(flops, bytes), ...], the floor is the sum of each phase's max(flops time, bytes time)
    # instead of one max over the totals (flops / bytes above are then the totals, for the throughput).
    phases: list[tuple[float, float]] | None = None
    # Whole-generation or whole-step cases take seconds per call: they set fewer repeats here.
    warmup: int | None = None
    reps: int | None = None


@dataclasses.dataclass
class Suite:
    name: str
    cases: Callable[[str, torch.device], list[Case]]
    description: str = ""


_SUITES: dict[str, Suite] = {}


def suite(name: str, description: str = ""):
    def deco(fn):
        # the docstring's first paragraph, on one line (its first line alone cut `layers` mid-sentence)
        _SUITES[name] = Suite(name, fn, description or " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split()))
        return fn
    return deco


def load_suites() -> dict[str, Suite]:
    from r1fast.bench import suites as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{mod.name}")
    return dict(sorted(_SUITES.items()))


# ---------------------------------------------------------------- timing


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class Timing:
    p50: float
    p20: float
    p80: float
    reps: int
    peak_mem_mb: float = float("nan")   # extra memory at the peak of the first call (CUDA only)


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class Timer:
    """Median-of-repeats timer: CUDA events on a GPU (L2 flushed between repeats), wall clock on CPU."""

    def __init__(self, device: torch.device, warmup: int = 3, min_reps: int = 5, max_reps: int = 100,
                 budget_s: float = 1.0):
        self.device, self.warmup, self.min_reps, self.max_reps, self.budget_s = device, warmup, min_reps, max_reps, budget_s
        self._flush = None
        if device.type == "cuda":
            # Bigger than any L2 (H100/H200: 50 MB) so each repeat starts cold, as it would in a training step.
            self._flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)

    def __call__(self, fn: Callable[[], object], warmup: int | None = None, reps: int | None = None) -> Timing:
        """Time fn; `reps` fixes the number of repeats (else min_reps, then more while the budget lasts).
        warmup=0 times the first call too (for calls that take seconds and compile nothing)."""
        peak = _PeakMemory(self.device)
        times: list[float] = []
        with peak:  # the first call's peak memory is the one reported
            if warmup == 0:
                times.append(self._timed(fn))
            else:
                fn()
        for _ in range((self.warmup if warmup is None else warmup) - 1):
            fn()
        _sync(self.device)
        start = time.perf_counter()
        lo, hi = (reps, reps) if reps else (self.min_reps, self.max_reps)
        while len(times) < hi and (len(times) < lo or time.perf_counter() - start < self.budget_s):
            times.append(self._timed(fn))
        return Timing(statistics.median(times), _percentile(times, 0.2), _percentile(times, 0.8), len(times),
                      peak.mb)

    def _timed(self, fn) -> float:
        """One call's time in ms: CUDA events after an L2 flush on a GPU, wall clock on the CPU."""
        if self.device.type != "cuda":
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        self._flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)


class _PeakMemory:
    """Extra memory allocated at the peak inside the block, in MiB (2^20 bytes; CUDA only; NaN on CPU)."""

    def __init__(self, device: torch.device):
        self.device, self.mb = device, float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda" and exc[0] is None:
            _sync(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20


# ---------------------------------------------------------------- the machine's floor


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


class Machine:
    """Peak matmul rate (per dtype) and copy bandwidth, measured once per run, lazily."""

    def __init__(self, device: torch.device, size: str):
        self.device, self.size = device, size
        self._rates: dict[str, float] = {}
        self._bandwidth: float | None = None

    def matmul_flops_per_s(self, dtype: str) -> float:
        if dtype not in self._rates:
            self._rates[dtype] = self._measure_matmul(dtype)
        return self._rates[dtype]

    def _measure_matmul(self, dtype: str) -> float:
        n = 8192 if self.device.type == "cuda" else 512
        if dtype in ("float8", "float8_e4m3fn"):
            return self._measure_fp8(n)
        dt = _DTYPES.get(dtype, torch.float32)
        if self.device.type == "cpu" and dt in (torch.float16, torch.bfloat16):
            dt = torch.float32  # CPU half matmuls are emulated; fp32 is the honest peak there
        a = torch.randn(n, n, device=self.device).to(dt)
        b = torch.randn(n, n, device=self.device).to(dt)
        t = Timer(self.device, warmup=2, min_reps=5, budget_s=0.5)(lambda: a @ b)
        return 2 * n**3 / (t.p50 / 1e3)

    def _measure_fp8(self, n: int) -> float:
        if self.device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
            return float("nan")
        try:
            a = torch.randn(n, n, device=self.device).to(torch.float8_e4m3fn)
            b = torch.randn(n, n, device=self.device).to(torch.float8_e4m3fn).t()
            one = torch.ones((), device=self.device)
            # fast accumulation, as r1fast's FP8 forward uses: the ceiling of what that path can reach
            fn = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16,  # noqa: E731
                                          use_fast_accum=True)
            t = Timer(self.device, warmup=2, min_reps=5, budget_s=0.5)(fn)
        except Exception:
            return float("nan")
        return 2 * n**3 / (t.p50 / 1e3)

    def copy_bytes_per_s(self) -> float:
        if self._bandwidth is None:
            numel = (512 if self.device.type == "cuda" else 32) * 2**20 // 4
            src = torch.randn(numel, device=self.device)
            dst = torch.empty_like(src)
            t = Timer(self.device, warmup=2, min_reps=5, budget_s=0.5)(lambda: dst.copy_(src))
            self._bandwidth = 2 * src.numel() * 4 / (t.p50 / 1e3)  # read + write
        return self._bandwidth

    def summary(self) -> str:
        """The measured rates for the log, to 3 significant digits: a CPU's tens of GFLOP/s printed with
        one decimal of TFLOP/s read as 0.0."""
        rates = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in self._rates.items()) or "-"
        copy = f"{self._bandwidth / 1e9:.3g} GB/s" if self._bandwidth else "-"   # not measured: no suite needed it
        return f"matmul {rates}; copy {copy}"

    def floor_ms(self, case: Case, matmul_dtype: str | None = None) -> float:
        rate = self.matmul_flops_per_s(matmul_dtype or case.matmul_dtype or case.dtype) \
            if case.flops or case.phases else float("nan")
        t = 0.0
        for flops, nbytes in case.phases or [(case.flops, case.bytes)]:
            t += max(flops / rate if flops else 0.0, nbytes / self.copy_bytes_per_s() if nbytes else 0.0)
        return t * 1e3 if t > 0 and math.isfinite(t) else float("nan")


# ---------------------------------------------------------------- running


def _describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return f"cpu {platform.processor() or platform.machine()} x{os.cpu_count()}"


@functools.lru_cache(maxsize=None)
def _git_commit() -> str:
    """$R1FAST_GIT_COMMIT when the caller names it, else HEAD's short hash ('-dirty' when tracked files
    differ from it), else 'unknown'. The caller's name comes first: the device tool's copy of the tree
    carried a .git of the session's first commit, and the 2026-11-30 H200 rows read '4ad7270-dirty'
    for bb8a004."""
    named = os.environ.get("R1FAST_GIT_COMMIT", "").strip()
    if named:
        return named
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        # a tracked file changed since that commit: the rows did not measure the commit they name
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001 - no git on the machine
        pass
    return "unknown"


def _versions() -> dict[str, str]:
    import r1fast

    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "none"
    return {"torch": torch.__version__, "triton": tv, "r1fast": r1fast.__version__, "git_commit": _git_commit()}


def _allocated(device: torch.device) -> int:
    """Bytes of tensors alive on `device` (CUDA; 0 elsewhere, where nothing is freed between impls)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _missing(requires: Iterable[str]) -> list[str]:
    return [m for m in requires if importlib.util.find_spec(m) is None]


def _missing_dependency(impl: Impl, e: BaseException) -> bool:
    """Whether `e` is a module that an optional package the impl requires imports and this machine lacks
    (trl carried as a wheel with --no-deps where pandas is not installed): the peer is not installed, as
    far as this run can tell, rather than broken. r1fast's own modules missing is a real failure."""
    name = getattr(e, "name", None) or ""
    return isinstance(e, ModuleNotFoundError) and bool(impl.requires) and bool(name) \
        and name.split(".")[0] != "r1fast"


def run_suite(s: Suite, size: str, device: torch.device, machine: Machine, timer: Timer, log=print,
              on_case: Callable[[list[dict]], object] | None = None, box_s: float | None = None,
              skipped: list[dict] | None = None) -> list[dict]:
    """Time every impl of every case of `s`; `on_case(rows so far)` after each impl that measured (main()
    rewrites the results files there, so a run killed by a time box keeps every impl it finished). With `box_s`,
    no impl starts once the suite has run that many seconds (the one running finishes): the impls left
    are reported as skipped, so one slow suite cannot take a time-boxed run's time from the next ones.
    The suite's first impl always starts, however long building its cases took.
    Each skipped impl is logged and, with `skipped`, appended to it (suite, case, mode, provider, backend,
    why): the table names the peers that did not run, not only the log. So is each impl that failed, with
    why 'FAILED <exception type>' and `error`, the first line of its message."""
    def skip(case, impl, why):
        log(f"  skip {s.name}/{case.name} {case.mode} {impl.provider}/{impl.backend}: {why}")
        if skipped is not None:
            skipped.append(dict(suite=s.name, case=case.name, mode=case.mode, provider=impl.provider,
                                backend=impl.backend, why=why))

    versions = _versions()
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    dev = _describe_device(device)
    rows: list[dict] = []
    started = time.perf_counter()
    first = True
    for case in s.cases(size, device):
        for impl in case.impls:
            # never the first: a box spent on building the cases (or a pause of a busy machine) left a suite
            # that measured nothing
            if box_s is not None and not first and time.perf_counter() - started >= box_s:
                skip(case, impl, f"past the suite's {box_s:g} s time box (--suite-box)")
                continue
            first = False
            floor = machine.floor_ms(case, impl.matmul_dtype)
            base = dict(suite=s.name, case=case.name, provider=impl.provider, backend=impl.backend, mode=case.mode,
                        size=size, dtype=case.dtype, device=dev, timestamp=stamp, **versions)
            missing = _missing(impl.requires)
            if missing:
                skip(case, impl, f"{', '.join(missing)} not installed")
                continue
            held, dirs_before = _allocated(device), len(_TEMP_DIRS)
            try:
                fn = impl.setup()
                detail = getattr(fn, "backend_detail", None)
                if detail:
                    base["backend"] = f"{impl.backend} ({detail})"
                timing = timer(fn, warmup=impl.warmup if impl.warmup is not None else case.warmup,
                               reps=impl.reps if impl.reps is not None else case.reps)
            except Skip as e:
                skip(case, impl, str(e))
                continue
            except torch.OutOfMemoryError:
                skip(case, impl, "out of memory")
                continue
            except Exception as e:  # noqa: BLE001 - one broken impl must not lose the case's other rows
                if _missing_dependency(impl, e):
                    skip(case, impl, f"{e.name} not installed (imported by {', '.join(impl.requires)})")
                    continue
                log(f"  FAILED {s.name}/{case.name} {case.mode} {impl.provider}/{impl.backend}: {type(e).__name__}: {e}")
                if skipped is not None:   # the table names it too: a peer that failed is not left out silently
                    skipped.append(dict(suite=s.name, case=case.name, mode=case.mode, provider=impl.provider,
                                        backend=impl.backend, why=f"FAILED {type(e).__name__}",
                                        error=(str(e).splitlines() or [""])[0][:200]))
                lost = device_lost(device)
                if lost:
                    raise DeviceLost(lost, rows) from None
                continue
            finally:
                # Free this impl's inputs and state before the next one. Trainers and engines sit in
                # reference cycles that only the cycle collector frees (a GPU-size grpo_step builds
                # seven of them, tens of GB each): collect when memory outlives the impl (a full
                # collection costs tens of ms, so not after every impl).
                fn = None
                if _allocated(device) > held:
                    gc.collect()
                remove_temp_dirs(since=dirs_before)   # this impl's checkpoint and output folders
                if device.type == "cuda" and not device_lost(device):
                    torch.cuda.empty_cache()
            pct = floor / timing.p50 * 100 if math.isfinite(floor) else float("nan")
            rows.append(dict(base, metric="time_ms", p50=timing.p50, p20=timing.p20, p80=timing.p80,
                             floor=floor, pct_of_floor=pct))
            if case.items:
                tput = lambda ms: case.items / (ms / 1e3)  # noqa: E731
                rows.append(dict(base, metric=f"{case.item_name}_per_s", p50=tput(timing.p50), p20=tput(timing.p80),
                                 p80=tput(timing.p20), floor=tput(floor) if math.isfinite(floor) else float("nan"),
                                 pct_of_floor=pct))
            mem = timing.peak_mem_mb
            if math.isfinite(mem):
                rows.append(dict(base, metric="peak_mem_mb", p50=mem, p20=mem, p80=mem, floor=float("nan"),
                                 pct_of_floor=float("nan")))
            # after each impl, not each case: a GPU-size grpo_step case is r1fast's step (a minute) then TRL's
            # (two or more); a time box that killed the run inside TRL's lost r1fast's row with it
            if on_case is not None:
                on_case(rows)
    return rows


# ---------------------------------------------------------------- output


def _fmt(x: float | None) -> str:
    """x for the table: three significant digits (whole numbers from 1000 to 1e6); "-" when missing or not finite."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if abs(x) >= 1e6 or (abs(x) < 1e-2 and x != 0):
        return f"{x:.2e}"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def format_table(rows: list[dict], skipped: list[dict] = ()) -> str:
    """One line per (case, provider, backend): time, throughput, % of floor, peak memory, and the speed-up
    of r1fast's fastest backend over that peer; then one line per implementation that was skipped
    (run_suite's `skipped`) and why, with the suites and the number of cases it missed."""
    by_key: dict[tuple, dict] = {}
    for r in rows:
        key = (r["suite"], r["case"], r["mode"], r["dtype"], r["provider"], r["backend"])
        by_key.setdefault(key, {})[r["metric"]] = r
    r1: dict[tuple, float] = {}  # the fastest r1fast backend of each case is the one peers are compared with
    for k, v in by_key.items():
        if k[4] == "r1fast" and "time_ms" in v:
            r1[k[:4]] = min(r1.get(k[:4], math.inf), v["time_ms"]["p50"])
    header = ["suite", "case", "mode", "dtype", "provider", "backend", "time_ms", "throughput", "%floor", "peak_MB",
              "r1fast_speedup"]
    lines = [header]
    for key, metrics in by_key.items():
        t = metrics.get("time_ms")
        if t is None:
            continue
        tput = next((f"{_fmt(m['p50'])} {name.removesuffix('_per_s')}/s" for name, m in metrics.items()
                     if name.endswith("_per_s")), "-")
        mem = metrics.get("peak_mem_mb", {}).get("p50", float("nan"))
        mine = r1.get(key[:4])
        speedup = "-" if key[4] == "r1fast" or mine is None else f"{t['p50'] / mine:.2f}x"
        lines.append([key[0], key[1], key[2], key[3], key[4], key[5], _fmt(t["p50"]), tput,
                      _fmt(t["pct_of_floor"]), _fmt(mem), speedup])
    widths = [max(len(str(l[i])) for l in lines) for i in range(len(header))]
    table = "\n".join("  ".join(str(c).ljust(w) for c, w in zip(l, widths)).rstrip() for l in lines)
    return table + "".join(f"\n{line}" for line in _skipped_lines(skipped))


def format_short_table(rows: list[dict], skipped: list[dict] = ()) -> str:
    """One line per case, aligned per suite: r1fast's fastest backend, its time, % of floor and peak memory,
    then each peer's time over it ('liger 1.32x': r1fast 1.32 times faster; a peer's own time in ms where
    no r1fast row ran); skipped implementations last, as in format_table. gpu_check.sh prints this last: a
    GPU run's full table (one line per implementation, ~150) is several times the 12,000 characters of
    output the device tool returns."""
    cases: dict[tuple, dict[tuple, dict]] = {}
    for r in rows:
        if r["metric"] in ("time_ms", "peak_mem_mb"):
            impls = cases.setdefault((r["suite"], r["case"], r["mode"], r["dtype"]), {})
            impls.setdefault((r["provider"], r["backend"]), {})[r["metric"]] = r
    blocks: dict[str, list[list[str]]] = {}
    for (suite_name, case, mode, dtype), impls in cases.items():
        timed = {k: v for k, v in impls.items() if "time_ms" in v}
        mine = [k for k in timed if k[0] == "r1fast"]
        best = min(mine, key=lambda k: timed[k]["time_ms"]["p50"]) if mine else None
        providers = [k[0] for k in timed]
        peers = []
        for k, v in timed.items():
            if k[0] == "r1fast":
                continue
            label = k[0] if providers.count(k[0]) == 1 else f"{k[0]}/{k[1]}"
            t = v["time_ms"]["p50"]
            peers.append(f"{label} {_fmt(t / timed[best]['time_ms']['p50'])}x" if best else f"{label} {_fmt(t)} ms")
        if best:
            b = timed[best]
            line = [case, mode, dtype, best[1], _fmt(b["time_ms"]["p50"]), _fmt(b["time_ms"]["pct_of_floor"]),
                    _fmt(b.get("peak_mem_mb", {}).get("p50", float("nan")))]
        else:
            line = [case, mode, dtype, "(no r1fast row)", "-", "-", "-"]
        blocks.setdefault(suite_name, []).append(line + ["  ".join(peers) or "-"])
    out = []
    header = ["case", "mode", "dtype", "r1fast", "ms", "%floor", "peak_MB", "peers (their time / r1fast's)"]
    for suite_name, lines in blocks.items():
        lines = [header] + lines
        widths = [max(len(l[i]) for l in lines) for i in range(len(header))]
        out.append(f"== {suite_name}")
        out += ["  ".join(c.ljust(w) for c, w in zip(l, widths)).rstrip() for l in lines]
    return "\n".join(out + _skipped_lines(skipped))


def _skipped_lines(skipped: list[dict]) -> list[str]:
    """'skipped liger/chunked (logprob 4 cases, grpo_loss 2): liger_kernel not installed', one per impl and
    reason: a peer missing from the table says so instead of looking never tried. Implementations that
    failed come first, one line per impl and exception type with the first case's message (bench.log has
    every one): 'failed r1fast/cuda (decode_attention 3 cases): RuntimeError: ...', lowercase because the
    CLI counts the log's lines that start 'FAILED ' (one per impl and case) for its exit message."""
    groups: dict[tuple, dict] = {}
    for k in skipped:
        group = groups.setdefault((k["provider"], k["backend"], k["why"]), dict(suites={}, error=k.get("error")))
        group["suites"][k["suite"]] = group["suites"].get(k["suite"], 0) + 1
    failed, skips = [], []
    for (prov, backend, why), group in groups.items():
        counts = ", ".join(f"{su} {n} case" + ("s" if n > 1 else "") for su, n in group["suites"].items())
        if group["error"] is None:
            skips.append(f"skipped {prov}/{backend} ({counts}): {why}")
        else:
            failed.append(f"failed {prov}/{backend} ({counts}): {why.removeprefix('FAILED ')}: {group['error']}")
    return failed + skips


def write_results(rows: list[dict], out_dir: Path, device: torch.device, meta: dict,
                  paths: tuple[Path, Path] | None = None) -> tuple[Path, Path]:
    """Write rows as <card>-<time>.csv and .json (or over `paths`, to update a run's files)."""
    if paths is None:
        out_dir.mkdir(parents=True, exist_ok=True)
        card = _describe_device(device).split(" (")[0].replace(" ", "-").lower()
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H%M%S")
        for n in range(1, 1000):  # claimed with O_EXCL: a second run that saves in the same second takes -2
            name = f"{card}-{stamp}" + (f"-{n}" if n > 1 else "")
            try:
                open(out_dir / f"{name}.csv", "x").close()
                break
            except FileExistsError:
                continue
        paths = out_dir / f"{name}.csv", out_dir / f"{name}.json"
    csv_path, json_path = paths
    from r1fast._umask import fsync_dir, fsync_file

    # Written beside and renamed over: a run killed mid-write (a time box) leaves the previous whole file. Synced
    # before the rename, and the folder after: a power loss or node failure could otherwise keep the rename and not
    # the rows, an empty file in place of every row measured so far. Synced where the file system can: one that
    # refuses a file's fsync (EINVAL, ENOTSUP: some FUSE and overlay mounts) stopped the run with ResultsNotWritten
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    try:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k) for k in COLUMNS})
            f.flush()
            fsync_file(f.fileno())
        os.replace(tmp, csv_path)
        tmp = json_path.with_name(json_path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
            f.flush()
            fsync_file(f.fileno())
        os.replace(tmp, json_path)
        fsync_dir(str(csv_path.parent))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ResultsNotWritten(f"cannot write the results to {tmp.with_suffix('')}: {e}") from e
    except BaseException:  # Ctrl-C or SIGTERM's SystemExit mid-write: the half file must not stay beside the whole one
        tmp.unlink(missing_ok=True)
        raise
    return csv_path, json_path


def read_csv(path: Path) -> list[dict]:
    try:
        with open(path) as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("suite", "case", "provider", "backend", "mode", "dtype", "metric", "p50",
                                   "pct_of_floor", "device") if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path} is not a bench results CSV (no column {', '.join(missing)})")
            rows = list(reader)
    except UnicodeDecodeError:   # the run's .png (--plot bench-results/*): the codec's message named no file
        raise ValueError(f"{path} is not a bench results CSV (not text)") from None
    for n, r in enumerate(rows, 2):   # line 1 is the header
        for k in ("p50", "p20", "p80", "floor", "pct_of_floor"):
            try:
                r[k] = float(r[k]) if r.get(k) not in (None, "") else float("nan")
            except ValueError:
                raise ValueError(f"{path} line {n}: {k} = {r[k]!r} is not a number") from None
    return rows


def read_skipped(csv_path: Path) -> list[dict]:
    """The skipped implementations a run recorded in the JSON beside its CSV (none when there is no JSON)."""
    try:
        meta = json.loads(Path(csv_path).with_suffix(".json").read_text()).get("meta") or {}
    except (OSError, ValueError, AttributeError):
        return []
    skipped = meta.get("skipped")
    return [k for k in skipped if isinstance(k, dict)] if isinstance(skipped, list) else []


def plot(csv_paths: list[Path], out_png: Path) -> Path:
    """One panel per suite: time per case, one bar per provider, % of floor written on r1fast's bars."""
    # the CSVs first: one that is not a results file is named even where matplotlib is not installed
    rows = [r for p in csv_paths for r in read_csv(p) if r["metric"] == "time_ms"]
    if not rows:
        raise ValueError(f"no time_ms rows in {', '.join(map(str, csv_paths))}")
    import matplotlib.figure   # not pyplot: matplotlib.use("Agg") switched the caller's backend
    suites = sorted({r["suite"] for r in rows})
    fig = matplotlib.figure.Figure(figsize=(10, 3.2 * len(suites)))
    axes = fig.subplots(len(suites), 1, squeeze=False)
    for ax, name in zip(axes[:, 0], suites):
        sr = [r for r in rows if r["suite"] == name]
        cases = list(dict.fromkeys(f"{r['case']} {r['mode']}" for r in sr))
        providers = list(dict.fromkeys(f"{r['provider']}/{r['backend']}" for r in sr))
        width = 0.8 / len(providers)
        for j, prov in enumerate(providers):
            xs, ys, pcts = [], [], []
            for i, c in enumerate(cases):
                m = [r for r in sr if f"{r['case']} {r['mode']}" == c and f"{r['provider']}/{r['backend']}" == prov]
                if m:
                    xs.append(i + j * width)
                    ys.append(m[0]["p50"])
                    pcts.append(m[0]["pct_of_floor"])
            bars = ax.bar(xs, ys, width, label=prov)
            if prov.startswith("r1fast"):
                for b, p in zip(bars, pcts):
                    if math.isfinite(p):
                        ax.annotate(f"{p:.0f}%", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                                    va="bottom", fontsize=7)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], cases, rotation=20, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("time (ms, log)")
        ax.set_title(f"{name} ({sr[0]['device']})", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    return out_png


def main(suite_names: list[str], size: str = "smoke", out_dir: str | None = None, device: str | None = None,
         budget_s: float | None = None, min_reps: int = 5, log=print, append_to: str | None = None,
         threads: int | None = None, suite_box_s: float | None = None) -> list[dict]:
    """Run the suites; results go to new <card>-<time>.csv/.json files under `out_dir`, or with
    `append_to` (an earlier run's CSV) into that run's files, after its rows. Raises DeviceLost,
    after saving, when a kernel fault leaves the CUDA context unusable (its `remaining` suites did
    not run). `threads`: torch's CPU threads for the run (torch.set_num_threads; the caller's setting
    is put back after), recorded in the results' meta as cpu_threads either way. `suite_box_s`: seconds
    after which a suite starts no more impls (run_suite's box_s)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"--threads is an int >= 1, got {threads!r}")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _main(suite_names, size, out_dir, device, budget_s, min_reps, log, append_to, suite_box_s)
    finally:
        torch.set_num_threads(before)


def _main(suite_names, size, out_dir, device, budget_s, min_reps, log, append_to, suite_box_s) -> list[dict]:
    if size not in SIZES:
        raise ValueError(f"--size must be one of {SIZES}, got {size!r}")
    suites = load_suites()
    unknown = [n for n in suite_names if n not in suites]
    if unknown:
        raise ValueError(f"unknown suite(s) {', '.join(unknown)}; suites: {', '.join(suites)}")
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
    if size == "gpu" and dev.type != "cuda":
        raise ValueError("--size gpu needs a CUDA device; use --size smoke on CPU")
    if budget_s is not None and not budget_s >= 0:
        raise ValueError(f"--budget is seconds >= 0, got {budget_s}")
    if suite_box_s is not None and not suite_box_s > 0:
        raise ValueError(f"--suite-box is seconds > 0, got {suite_box_s}")
    machine = Machine(dev, size)
    timer = Timer(dev, budget_s=budget_s if budget_s is not None else (2.0 if dev.type == "cuda" else 0.5),
                  warmup=min(3, min_reps), min_reps=min_reps)
    out = Path(out_dir or "bench-results")
    paths, rows, earlier = _earlier_run(append_to) if append_to else (None, [], None)
    skipped = [k for k in (earlier or {}).get("skipped") or [] if isinstance(k, dict)]
    same = [("device", _describe_device(dev)), ("size", size)]
    if dev.type == "cpu":   # a CPU row's time depends on its threads as much as on the machine (--threads)
        same.append(("cpu_threads", torch.get_num_threads()))
    for key, here in same if earlier is not None else ():
        if earlier.get(key, here) != here:  # one file, one table: speed-ups across machines would mislead
            raise ValueError(f"--append {append_to}: that run's {key} is {earlier[key]!r}, this one's {here!r}")
    if paths is None:  # before anything is measured: a results directory that cannot be made loses every row
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--out {out}: cannot make the results directory ({e})") from None

    def save(all_rows):  # rewritten after every impl, so a run cut short by a timeout keeps what it measured
        nonlocal paths
        if all_rows:  # an appended run keeps the earlier run's meta (its rows' floors used its measured rates)
            meta = dict(_meta(dev, size, machine), skipped=skipped)
            if earlier is not None:
                meta["earlier_run"] = earlier
            paths = write_results(all_rows, out, dev, meta, paths)

    names, lost = suite_names or list(suites), None
    for i, name in enumerate(names):
        log(f"[bench] {name} ({size}, {_describe_device(dev)}, {torch.get_num_threads()} torch CPU threads)")
        t0 = time.perf_counter()
        try:
            rows += run_suite(suites[name], size, dev, machine, timer, log=log,
                              on_case=lambda part: save(rows + part), box_s=suite_box_s, skipped=skipped)
        except DeviceLost as e:
            rows += e.rows
            lost = e
        except ResultsNotWritten:
            raise
        except Exception as e:  # one broken suite must not lose the others' results
            log(f"  FAILED {name}: {type(e).__name__}: {e}")
            why = device_lost(dev)
            lost = DeviceLost(why) if why else None
        log(f"[bench] {name} done in {time.perf_counter() - t0:.1f}s")
        save(rows)
        if lost:
            lost.remaining = names[i + 1:]
            log(f"[bench] the CUDA context is lost ({lost}); suites not run: {' '.join(lost.remaining) or '-'}")
            break
    log(f"[bench] machine: {machine.summary()}")
    if rows:
        log(format_table(rows, skipped))
        log(f"[bench] wrote {paths[0]} and {paths[1]}")
    else:
        log("[bench] no rows (every case was skipped or failed): no results files written")
        for line in _skipped_lines(skipped):
            log(line)
    if lost:
        lost.rows = rows
        raise lost
    return rows


def _earlier_run(csv_path: str) -> tuple[tuple[Path, Path], list[dict], dict]:
    """The results files of the run that wrote `csv_path`, its rows and its meta (from the JSON beside it)."""
    paths = Path(csv_path), Path(csv_path).with_suffix(".json")
    if paths[0].suffix != ".csv" or not paths[0].is_file() or not paths[1].is_file():
        raise ValueError(f"--append {csv_path}: not a results CSV with its .json beside it")
    try:
        data = json.loads(paths[1].read_text())
        rows, meta = data["rows"], data.get("meta") or {}
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "suite" in r for r in rows):
            raise TypeError("'rows' is not a list of result rows")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"--append {csv_path}: cannot read the rows of {paths[1]} ({e})") from None
    return paths, rows, meta


def _meta(dev: torch.device, size: str, machine: Machine) -> dict:
    """The run's card, versions and command for the JSON: a results file copied into bench/results/ said
    which torch, Triton and commit measured it, not the Python, the CUDA torch was built with, or the command
    (the suites, --size, --budget, --suite-box) that the commit message had to repeat by hand."""
    return dict(device=_describe_device(dev), size=size, cpu_threads=torch.get_num_threads(), **_versions(),
                python=platform.python_version(), cuda=torch.version.cuda or "none",
                command=shlex.join(sys.orig_argv),
                matmul_tflops={k: v / 1e12 for k, v in machine._rates.items()},
                copy_gb_s=(machine._bandwidth or float("nan")) / 1e9)
