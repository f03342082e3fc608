"""Which process state makes an argument error raised inside r1fast._C crash instead of raising ValueError.

    python bench/cext_throw_probe.py [--pytest]   (from the repository root; or python -m r1fast.bench.cext_throw_probe
                                                   where r1fast is installed: after a gpu_check.sh that ran r1fast from
                                                   the tree, r1fast.bench is not importable, the file is)

On the first GPU run (H200, Python 3.12, pybind11 3.1.0, nvcc 13.0) an xdist worker died with a segmentation
fault at test_decode_extension_checks_the_split_cover_before_any_launch's first raw _C.decode_attention_cuda call,
whose argument check throws before any CUDA code runs. The same call raises ValueError in the CUDA build of _C made
from the same tools on a machine without a GPU (Python 3.12, torch 2.11+cu130 and Triton 3.6 imported, a Triton
kernel compiled for sm_90 first). What differs there: the GPU state, the host compiler (g++ 12.2 here) and the
worker's earlier tests. Each step below runs in a fresh interpreter and adds one piece of GPU state before the same
three argument errors (decode_attention.cpp, block_manager.cpp, kv_cache.cpp); the first step that crashes names the
piece, and a crash already in the first step points at the build itself. Needs about a minute, at most --box seconds
(100); prints one line per step, and a native backtrace of the first crash where gdb or cuda-gdb is installed (the
H200 image has cuda-gdb only).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

# The three argument errors, each thrown as r1fast::InvalidArgument by a different source file of _C.
RAISE_THREE = """
def expect_value_error(what, fn):
    try:
        fn()
    except ValueError as e:
        print(f"  {what}: ValueError ({type(e).__name__}): {str(e)[:70]}", flush=True)
    else:
        raise SystemExit(f"{what}: returned without an error")

args = dict(out=16, q=16, k_cache=16, v_cache=16, block_tables=16, context_lens=16, workspace_acc=16,
            workspace_ml=16, row_start=0, prefix_ml=0, prefix_acc=0, num_seqs=1, num_heads=4, num_kv_heads=2,
            head_dim=16, num_blocks=10, block_size=8, max_blocks_per_seq=5, num_splits=2, partition_size=16,
            scale=0.25, dtype=0, stream=0)
expect_value_error("decode_attention_cuda split cover", lambda: C.decode_attention_cuda(**args))
expect_value_error("BlockManager(0, 16)", lambda: C.BlockManager(0, 16))
expect_value_error("store_kv_cpu num_slots 0", lambda: C.store_kv_cpu(16, 16, 16, 16, 16, 1, 64, 64, 64, 0))
"""

LOAD_C = "import faulthandler; faulthandler.enable()\nimport importlib\nC = importlib.import_module('r1fast._C')\n"

CUDA_DECODE = """
import torch
from r1fast import ops
g = torch.Generator(device="cuda").manual_seed(0)
q = torch.randn(2, 4, 64, device="cuda", generator=g)
kc = torch.randn(8, 16, 2, 64, device="cuda", generator=g)
vc = torch.randn(8, 16, 2, 64, device="cuda", generator=g)
tables = torch.arange(8, dtype=torch.int32, device="cuda").view(2, 4)
ctx = torch.tensor([37, 64], dtype=torch.int32, device="cuda")
out = ops.paged_decode_attention(q, kc, vc, tables, ctx, backend="cuda")
torch.cuda.synchronize()
print("  a cuda-backend decode ran:", tuple(out.shape), flush=True)
"""

TRITON_KERNEL = """
import torch, triton, triton.language as tl

@triton.jit
def twice(x_ptr, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + o, tl.load(x_ptr + o, mask=o < n) * 2.0, mask=o < n)

x = torch.ones(1000, device="cuda")
twice[(8,)](x, 1000, BLOCK=128)
torch.cuda.synchronize()
print("  a Triton kernel ran:", float(x.sum()), flush=True)
"""

# a step, the backtrace or --pytest with less of the probe's box left than this is not started
MIN_STEP_S = 10

# (name, code run before the three errors); each step's state includes the previous ones' where it says so
STEPS = [
    ("bare: _C only, torch not imported", LOAD_C),
    ("torch imported first", "import torch\n" + LOAD_C),
    ("CUDA initialised by torch", "import torch\ntorch.zeros(1, device='cuda'); torch.cuda.synchronize()\n" + LOAD_C),
    ("_C's own (static) CUDA runtime initialised",
     "import torch\ntorch.zeros(1, device='cuda')\n" + LOAD_C + "print('  _C.cuda_device_count():', C.cuda_device_count())\n"),
    ("after a cuda-backend decode through _C", LOAD_C + CUDA_DECODE),
    ("after a Triton kernel", LOAD_C + TRITON_KERNEL),
    ("after both", LOAD_C + CUDA_DECODE + TRITON_KERNEL),
]


def checkout_env() -> dict[str, str]:
    """The environment for the steps and gdb: this file's checkout first on PYTHONPATH. Each step is a script in
    a temp folder, where `import r1fast` finds only an installed r1fast; where gpu_check.sh ran r1fast from the
    tree (no pip install: a site-packages this user cannot write), every step failed with ModuleNotFoundError,
    the window's minute spent and nothing learnt. An editable install maps r1fast to the same checkout."""
    env = dict(os.environ)
    repo = Path(__file__).resolve().parents[1]   # bench/.. (r1fast/bench is a link to ../bench in a tree run)
    if (repo / "r1fast" / "__init__.py").is_file():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH")) if p)
    return env


def run_step(script: Path, timeout: float = 120) -> tuple[int, str]:
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout,
                       env=checkout_env())
    return r.returncode, (r.stdout + r.stderr)


def backtrace(script: Path, timeout: float = 300) -> str:
    gdb = shutil.which("gdb") or shutil.which("cuda-gdb")   # cuda-gdb debugs host code too
    if gdb is None:
        return "  (no gdb or cuda-gdb here: no native backtrace)"
    try:
        r = subprocess.run([gdb, "-q", "-batch", "-ex", "run", "-ex", "bt 40", "--args", sys.executable, str(script)],
                           capture_output=True, text=True, timeout=timeout, env=checkout_env())
    except subprocess.TimeoutExpired:
        return f"  ({Path(gdb).name} gave no backtrace inside {timeout:.0f} s)"
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("#") or "signal" in ln.lower()]
    return "\n".join("  " + ln for ln in lines[-45:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pytest", action="store_true",
                    help="then run tests/test_decode_attention.py in one plain pytest process (no xdist), a minute or "
                         "more: raise --box for it")
    ap.add_argument("--box", type=float, default=100, metavar="SECONDS",
                    help="the probe's whole time (default 100): each step, the backtrace and --pytest get what is "
                         "left, and what cannot start is named (a hung step took 120 s and gdb 300, past the device "
                         "call's time)")
    opts = ap.parse_args(argv)
    if not opts.box > 0:
        ap.error(f"--box is seconds > 0, got {opts.box}")
    end = time.monotonic() + opts.box
    first_crash = None
    with tempfile.TemporaryDirectory(prefix="cext_throw_probe.") as folder:
        for i, (name, setup) in enumerate(STEPS):
            left = end - time.monotonic()
            if left < MIN_STEP_S:
                print(f"[not run] {name}: past the probe's {opts.box:g} s box (--box)", flush=True)
                continue
            # a file, not `python -c`: Triton's @jit reads its kernel's source from the file
            script = Path(folder) / f"step{i}.py"
            script.write_text(setup + textwrap.dedent(RAISE_THREE))
            try:
                rc, out = run_step(script, timeout=min(120, left))
            except subprocess.TimeoutExpired:
                print(f"[hung] {name}", flush=True)
                continue
            verdict = "ok" if rc == 0 else (f"CRASHED (signal {-rc})" if rc < 0 else f"failed (exit {rc})")
            print(f"[{verdict}] {name}", flush=True)
            print("\n".join(out.rstrip().splitlines()[-8 if rc else -4:]), flush=True)
            if rc < 0 and first_crash is None:
                first_crash = script
                left = end - time.monotonic()
                print("native backtrace of the first crash:", flush=True)
                print(backtrace(first_crash, timeout=min(300, left)) if left >= MIN_STEP_S else
                      f"  (not taken: past the probe's {opts.box:g} s box)", flush=True)
    left = end - time.monotonic()
    if opts.pytest and left < MIN_STEP_S:
        print(f"[not run] pytest tests/test_decode_attention.py: past the probe's {opts.box:g} s box", flush=True)
    elif opts.pytest:
        try:
            r = subprocess.run([sys.executable, "-X", "faulthandler", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                "-p", "no:xdist", "tests/test_decode_attention.py"], capture_output=True, text=True,
                               env=checkout_env(), timeout=left)
        except subprocess.TimeoutExpired:
            print(f"[hung] pytest tests/test_decode_attention.py: past the probe's {opts.box:g} s box", flush=True)
            return 1 if first_crash is not None else 0
        verdict = "ok" if r.returncode == 0 else f"exit {r.returncode}"
        print(f"[{verdict}] pytest tests/test_decode_attention.py, one process", flush=True)
        print("\n".join((r.stdout + r.stderr).rstrip().splitlines()[-15:]), flush=True)
    return 1 if first_crash is not None else 0


if __name__ == "__main__":
    sys.exit(main())
