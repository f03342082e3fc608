"""Access to the compiled extension r1fast._C, with a clear message when it is missing."""
from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import platform
import re
import sys
from pathlib import Path

_NOT_BUILT = "r1fast._C is not built"   # how not_built_message begins (r1fast info tells it from other problems)


def not_built_message(root: Path) -> str:
    """What to do when no _C is there, `root` being the folder above the r1fast package. pip's build fetches
    CMake, Ninja and pybind11 (pyproject.toml's build requirements); it cannot fetch what CMake needs from the
    machine: a C++17 compiler and Python's C headers (CMakeLists.txt's find_package(Python Development.Module)).
    nvcc is optional: without it the build is CPU-only."""
    where = f"in {root}" if (root / "setup.py").is_file() else "in r1fast's source checkout"
    return (f"{_NOT_BUILT}: run `pip install -e .` {where} to build it. That needs a C++17 compiler "
            f"(g++ or clang++) and Python's C headers (python3-dev on Debian/Ubuntu) on this machine; pip fetches "
            f"CMake, Ninja and pybind11 itself, and the CUDA kernels are compiled too where nvcc is found")


# the tag Python's build puts in an extension's name: _C.cpython-312-x86_64-linux-gnu.so, _C.cpython-313t-... (free
# threaded), _C.pypy310-pp73-x86_64-linux-gnu.so
_BUILD_TAG = re.compile(r"^_C\.(?:cpython-(\d)(\d+)([a-z]*)|pypy(\d)(\d+)-pp\d+)-(.+)\.so$")


def built_for(so: Path) -> str:
    """The Python an extension file was built for, read from its name ("CPython 3.12 on x86_64-linux-gnu")."""
    m = _BUILD_TAG.match(so.name)
    if m is None:
        return "a Python its name does not say"
    cp_major, cp_minor, flags, pypy_major, pypy_minor, machine = m.groups()
    if cp_major:
        kind = " free-threaded" if "t" in flags else ""
        return f"CPython {cp_major}.{cp_minor}{kind} on {machine}"
    return f"PyPy (Python {pypy_major}.{pypy_minor}) on {machine}"


def other_python_message(found: list[Path], root: Path) -> str:
    """A _C whose name this Python's import does not take: built by another Python's pip (or a CMake build given
    another Python_EXECUTABLE), e.g. after the venv was remade on a newer Python. Python's own "cannot import name
    '_C'" says nothing of it. _C holds no torch code (pybind11 only), so another torch needs no rebuild; only the
    Python counts. The remedy names this interpreter, since a `pip` on PATH may well be the other Python's."""
    files = "; ".join(f"{so} (built for {built_for(so)})" for so in found)
    threads = " free-threaded" if _free_threaded() else ""
    this = f"{platform.python_implementation()} {platform.python_version()}{threads} ({sys.executable})"
    wants = importlib.machinery.EXTENSION_SUFFIXES[0]
    where = f"in {root}" if (root / "setup.py").is_file() else "in r1fast's source checkout"
    return (f"r1fast._C is built for another Python: found {files}, but this is {this}, which imports "
            f"_C{wants}; rebuild it for this Python with `{sys.executable} -m pip install "
            f"-e .` {where} (a CMake build: -DPython_EXECUTABLE={sys.executable}), or run r1fast with the Python "
            f"it was built for")


def _free_threaded() -> bool:
    import sysconfig

    return bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


# What CMake compiles (csrc/*.cpp, and csrc/*.cu in a CUDA build) and what they may include: MANIFEST.in ships
# these same suffixes under csrc/, and CMakeLists.txt reconfigures (recomputing the digest) when any file there changes
BUILD_SUFFIXES = (".h", ".hpp", ".cuh", ".cpp", ".cu")


def build_files(root: Path) -> list[Path]:
    """CMakeLists.txt and every file under root/csrc (subfolders too) with a suffix in BUILD_SUFFIXES, in a
    fixed order; hidden files (an editor's swap or lock file) are not sources."""
    csrc = root / "csrc"
    found = [p for p in csrc.rglob("*") if p.suffix in BUILD_SUFFIXES and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(csrc).parts)]
    return [root / "CMakeLists.txt", *sorted(found, key=lambda p: p.relative_to(csrc).as_posix())]


def sources_digest(root: Path) -> str | None:
    """A digest of build_files(root), or None where root holds no sources (an installed wheel).
    CMakeLists.txt builds it into _C (build_info()["sources_digest"]), so a source checkout tells a _C built
    from other sources (an editable install after a pull) from a current one."""
    csrc = root / "csrc"
    if not (csrc.is_dir() and (root / "CMakeLists.txt").is_file() and (root / "setup.py").is_file()):
        return None
    h = hashlib.sha256()
    for p in build_files(root):
        # named by its path under csrc/ (CMakeLists.txt by its name): a file's name and bytes, as before subfolders
        name = p.name if p.parent == root else p.relative_to(csrc).as_posix()
        h.update(name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _import():
    """(the r1fast._C module or None, why it is None)."""
    here = Path(__file__).resolve().parent
    try:
        from r1fast import _C
    except ImportError as e:
        spec = importlib.util.find_spec("r1fast._C")  # None for another Python's build, hence the glob
        if spec is None:
            others = sorted(here.glob("_C*.so"))
            if not others:
                return None, not_built_message(here.parent)
            return None, other_python_message(others, here.parent)
        # one that does not load here (a libstdc++ older than the build's): "not built" hid the loader's reason
        return None, (f"r1fast._C does not import ({e}; found {spec.origin}): rebuild it for this "
                      f"Python with `pip install -e .`")
    want = sources_digest(here.parent)
    got = _C.build_info().get("sources_digest", "")
    if want is not None and not got:  # compiled by hand, or by a CMakeLists.txt older than its digest step
        return None, ("r1fast._C carries no digest of the sources it was built from, so it cannot be told current "
                      "against csrc/: build it with `pip install -e .` or CMakeLists.txt (cmake --build)")
    if want is not None and got != want:
        # the CMake loop's last step is a copy (README): a build folder's new _C not copied yet reads as this
        return None, ("r1fast._C is out of date: it was built from other sources than csrc/ and CMakeLists.txt "
                      "hold now; rebuild it with `pip install -e .`, or with `cmake --build <build folder>` and "
                      "copy its _C*.so into r1fast/")
    return _C, ""


def load():
    """The r1fast._C module, or None when the package was not built (e.g. a plain source checkout), or
    its _C does not import or is out of date (problem() says which)."""
    return _import()[0]


def problem() -> str:
    """Why load() is None ("" when it is not)."""
    return _import()[1]


class ExtensionUnavailable(RuntimeError):
    """r1fast._C is not built, does not import, or is out of date (the message says which)."""


def require(purpose: str = ""):
    """r1fast._C, or ExtensionUnavailable naming why not (and, given, what needed it)."""
    ext = load()
    if ext is None:
        raise ExtensionUnavailable(problem() + (f" ({purpose} needs it)" if purpose else ""))
    return ext


def build_info() -> dict:
    ext = load()
    if ext is None:
        return {"built": False, "with_cuda": False, "cuda_archs": "", "cuda_version": "", "cxx": "",
                "problem": problem()}
    return {"built": True, **ext.build_info()}


@functools.lru_cache(maxsize=None)
def cuda_kernels_usable() -> bool:
    """True when the extension has CUDA kernels and a CUDA device is usable from torch and from the
    extension's own (static) CUDA runtime, which can need a newer driver than torch's."""
    import torch

    info = build_info()
    if not (info["with_cuda"] and torch.cuda.is_available()):
        return False
    try:
        return load().cuda_device_count() > 0
    except RuntimeError:
        return False
