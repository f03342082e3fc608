"""Build r1fast._C through CMake + Ninja.

The Python packages: `r1fast/` is the engine, `kernels/` installs as
`r1fast.kernels`, `bench/` as `r1fast.bench` (so `r1fast bench` works from a wheel too).

Environment:
  R1FAST_CUDA        auto (default: build CUDA sources when nvcc is found), 0 (CPU only), 1 (nvcc required)
  R1FAST_CUDA_ARCHS  CUDA architectures, CMake syntax (default "80;90a")
  MAX_JOBS           parallel compile jobs
  CUDA_HOME/CUDACXX  where to find nvcc
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def find_nvcc():
    candidates = [os.environ.get("CUDACXX")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    candidates.append(shutil.which("nvcc"))
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return os.path.realpath(c)
    return None


def find_tool(name):
    """Prefer the cmake/ninja pip packages of this interpreter (a system cmake may be too old)."""
    try:
        mod = __import__(name)
        path = os.path.join(getattr(mod, "CMAKE_BIN_DIR", None) or getattr(mod, "BIN_DIR"), name)
        if os.path.isfile(path):
            return path
    except (ImportError, AttributeError, TypeError):
        pass
    return shutil.which(name)


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        try:
            import pybind11
        except ImportError as e:  # pip's build isolation installs it; --no-build-isolation and setup.py do not
            raise RuntimeError(f"r1fast: building _C needs pybind11 ({e}): pip install 'pybind11>=2.12', or build "
                               f"without --no-build-isolation") from e

        mode = os.environ.get("R1FAST_CUDA", "auto").strip().lower()
        if mode not in ("auto", "0", "1"):
            raise RuntimeError(f"R1FAST_CUDA must be auto, 0 or 1, got {mode!r}")
        nvcc = find_nvcc() if mode != "0" else None
        if mode == "1" and nvcc is None:
            raise RuntimeError("R1FAST_CUDA=1 but nvcc was not found: set CUDA_HOME or CUDACXX, or put nvcc on PATH")
        archs = os.environ.get("R1FAST_CUDA_ARCHS", "80;90a")

        cmake, ninja = find_tool("cmake"), find_tool("ninja")
        if cmake is None:
            raise RuntimeError("cmake not found: pip install cmake")
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        lib_dir = build_dir / "lib"
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={lib_dir}",
            f"-DR1FAST_CUDA={'ON' if nvcc else 'OFF'}",
        ]
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        if nvcc:
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCMAKE_CUDA_ARCHITECTURES={archs}"]
        print(f"r1fast: building _C ({'CUDA ' + archs if nvcc else 'CPU only'})", flush=True)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        for what, step in (("configure", [cmake, "-S", str(ROOT), "-B", str(build_dir), *args]),
                           ("compile", [cmake, "--build", str(build_dir), "--parallel", jobs])):
            if subprocess.run(step, check=False).returncode != 0:
                hint = ""
                if nvcc and mode == "auto":  # a found nvcc that cannot build (too old for 90a, host gcc too new)
                    hint = (f"; the CUDA kernels were on because nvcc was found ({nvcc}): R1FAST_CUDA=0 builds the "
                            f"CPU-only extension, R1FAST_CUDA_ARCHS sets the architectures (now {archs!r})")
                raise RuntimeError(f"r1fast: CMake could not {what} _C (its output is above){hint}")
        built = sorted(lib_dir.glob("_C*"))
        if not built:
            raise RuntimeError(f"CMake produced no _C module under {lib_dir}")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[0], out)


packages = ["r1fast.kernels", "r1fast.bench", "r1fast.bench.suites"]
# configs/ holds data only (no __init__.py), so find_packages skips it; named here, its yaml files ship
packages += [p for p in find_packages(include=["r1fast", "r1fast.*"])] + ["r1fast.configs"]

setup(
    packages=packages,
    package_dir={"r1fast.kernels": "kernels", "r1fast.bench": "bench", "r1fast.bench.suites": "bench/suites"},
    package_data={"r1fast.configs": ["*.yaml"]},
    ext_modules=[CMakeExtension("r1fast._C")],
    cmdclass={"build_ext": CMakeBuild},
)
