import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_sdist_holds_what_builds_the_extension(tmp_path):
    # `python -m build` builds the wheel from the sdist: without CMakeLists.txt and csrc/ in it, CMake
    # stopped with "does not appear to contain CMakeLists.txt".
    src = tmp_path / "src"
    _copy_tree(src)
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(out)!r})"],
                   cwd=src, check=True, capture_output=True)
    (sdist,) = out.glob("r1fast-*.tar.gz")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    wanted = {"CMakeLists.txt", "setup.py", "pyproject.toml"}
    wanted |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").iterdir() if p.suffix in (".h", ".cpp", ".cu")}
    assert wanted <= names, sorted(wanted - names)


def _copy_tree(dst):
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__", "*.so", "bench-results"))


def test_a_found_nvcc_that_cannot_build_names_the_cpu_only_way_out(tmp_path):
    # R1FAST_CUDA=auto compiles CUDA wherever an nvcc is found; one that cannot (too old for 90a, a host
    # gcc it refuses) failed the install with a bare CalledProcessError and nothing said how to build without it.
    pytest.importorskip("pybind11")
    if shutil.which("cmake") is None:
        try:
            import cmake  # noqa: F401
        except ImportError:
            pytest.skip("needs cmake")
    src = tmp_path / "src"
    _copy_tree(src)
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'nvcc fatal : Unsupported gpu architecture compute_90a' >&2\nexit 1\n")
    nvcc.chmod(0o755)
    env = {**os.environ, "CUDACXX": str(nvcc), "R1FAST_CUDA": "auto"}
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext"], cwd=src, env=env, capture_output=True,
                       text=True, check=False)
    assert r.returncode != 0
    assert "R1FAST_CUDA=0 builds the CPU-only extension" in r.stderr, r.stderr[-2000:]
