"""`r1fast info`: what it says of this installation is what is installed."""
import importlib.machinery
import platform
import random
import sys

import pytest

from r1fast import info


def test_info_gives_the_distributions_version_of_a_module_without_one(tmp_path, monkeypatch):
    # liger_kernel and math_verify have no __version__: info said "installed" where pip knew 0.8.5 and 0.9.0
    version = f"1.{random.randrange(100)}.{random.randrange(100)}"
    (tmp_path / "r1fast_probe_mod").mkdir()
    (tmp_path / "r1fast_probe_mod" / "__init__.py").write_text("")
    dist = tmp_path / f"r1fast_probe_dist-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: r1fast-probe-dist\nVersion: {version}\n")
    (dist / "top_level.txt").write_text("r1fast_probe_mod\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert info._version("r1fast_probe_mod") == version
    (tmp_path / "r1fast_probe_mod" / "__init__.py").write_text("__version__ = '9.9'\n")   # its own, where it has one
    monkeypatch.delitem(__import__("sys").modules, "r1fast_probe_mod")
    assert info._version("r1fast_probe_mod") == "9.9"
    assert info._version("r1fast_no_such_module") is None


def test_info_says_why_the_extensions_cuda_kernels_cannot_run_where_torch_sees_a_gpu(monkeypatch):
    # the cuda backend's error says "r1fast info shows both" (the driver and the CUDA _C was built with) where its
    # static CUDA runtime needs a newer driver than torch's: info's _C line read "built with CUDA 13.0.88 for archs
    # 80,90a", as a working build, and said nothing of it
    import torch

    from r1fast import _ext, fp8

    version = f"13.{random.randrange(10)}.{random.randrange(100)}"
    error = f"r1fast._C: no usable CUDA device: CUDA driver version is insufficient ({random.randrange(10 ** 6)})"
    seen = {"devices": None}

    class FakeExtension:
        def cuda_device_count(self):
            if seen["devices"] is None:
                raise RuntimeError(error)
            return seen["devices"]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)   # no GPU lines: only the _C line is looked at
    monkeypatch.setattr(_ext, "load", lambda: FakeExtension())
    monkeypatch.setattr(_ext, "build_info", lambda: {"built": True, "with_cuda": True, "cuda_version": version,
                                                     "cuda_archs": "80,90a", "cxx": "", "sources_digest": ""})
    monkeypatch.setattr(info, "_op_backends", lambda device: {})
    monkeypatch.setattr(fp8, "available_paths", lambda: {})
    built = f"built with CUDA {version} for archs 80,90a"
    line = info.collect()["r1fast._C"]
    assert line.startswith(f"{built}; its CUDA kernels cannot run here ({error}; CUDA {version} may need a newer "
                           f"driver than this one"), line
    assert "rebuild r1fast._C with the CUDA torch uses" in line
    seen["devices"] = 0
    assert info.collect()["r1fast._C"].startswith(f"{built}; its CUDA kernels cannot run here (its CUDA runtime sees "
                                                  f"no device;")
    seen["devices"] = 1   # usable: the line says the build alone
    assert info.collect()["r1fast._C"] == built
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # no GPU: nothing for the kernels to run on
    seen["devices"] = None
    assert info.collect()["r1fast._C"] == built


def test_info_reads_the_nvidia_drivers_version_of_either_kernel_module(tmp_path, monkeypatch):
    import builtins

    version = f"{random.randrange(400, 700)}.{random.randrange(100)}.{random.randrange(10, 100)}"
    real_open = builtins.open
    proc = tmp_path / "version"
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(
        proc if path == "/proc/driver/nvidia/version" else path, *a, **k))
    for line in (f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {version}  Tue Mar  5 22:23:56 UTC 2024\n",
                 f"NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  {version}  Release Build  (dvs-builder@"
                 f"U16-I3-B03-4-3)  Fri Aug 16 21:42:42 UTC 2024\n"):
        proc.write_text(line + "GCC version:  gcc version 12.3.0\n")
        assert info._nvidia_driver_version() == version
    proc.write_text("something else 1.2.3\n")
    assert info._nvidia_driver_version() is None
    proc.unlink()
    assert info._nvidia_driver_version() is None


@pytest.fixture
def checkout_without_a_c_for_this_python(tmp_path, monkeypatch):
    """A source checkout whose r1fast/ holds no _C this Python imports; _ext reads that folder."""
    import r1fast
    from r1fast import _ext

    checkout = tmp_path / "checkout"
    (checkout / "r1fast").mkdir(parents=True)
    (checkout / "setup.py").write_text("")
    monkeypatch.delattr(r1fast, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "r1fast._C", None)   # `from r1fast import _C` raises ImportError, no spec
    monkeypatch.setattr(_ext, "__file__", str(checkout / "r1fast" / "_ext.py"))
    _ext._import.cache_clear()
    yield checkout / "r1fast"
    _ext._import.cache_clear()


def test_an_extension_built_for_another_python_names_that_python_and_the_rebuild(checkout_without_a_c_for_this_python):
    # a _C.cpython-312-...so in a Python 3.11 venv (remade on another Python, or built by another Python's pip)
    # read "r1fast._C does not import (cannot import name '_C' from 'r1fast' (...); found ...): rebuild it for this
    # Python with `pip install -e .`": neither the Python it was built for nor this one, and a `pip` that may be
    # the other Python's
    from r1fast import _ext

    folder = checkout_without_a_c_for_this_python
    platform_tag = importlib.machinery.EXTENSION_SUFFIXES[0].split("-", 1)[1][:-len(".so")]   # x86_64-linux-gnu
    minor = random.choice([m for m in range(8, 16) if m != sys.version_info.minor])
    other = folder / f"_C.cpython-3{minor}-{platform_tag}.so"
    other.write_bytes(b"\x7fELF not loaded")
    with pytest.raises(_ext.ExtensionUnavailable) as raised:
        _ext.require("the rollout engine")
    message = str(raised.value)
    wants = "_C" + importlib.machinery.EXTENSION_SUFFIXES[0]
    assert message.startswith(f"r1fast._C is built for another Python: found {other} (built for CPython 3.{minor} "
                              f"on {platform_tag}), but this is CPython {platform.python_version()} "
                              f"({sys.executable}), which imports {wants}"), message
    assert f"rebuild it for this Python with `{sys.executable} -m pip install -e .` in {folder.parent}" in message
    assert message.endswith("(the rollout engine needs it)")
    assert info.collect()["r1fast._C"] == f"UNUSABLE: {_ext.problem()}"
    (folder / "_C.cpython-313t-aarch64-linux-gnu.so").write_bytes(b"")   # every file found is named
    _ext._import.cache_clear()
    assert "_C.cpython-313t-aarch64-linux-gnu.so (built for CPython 3.13 free-threaded on aarch64-linux-gnu)" in \
        _ext.problem()


@pytest.mark.parametrize("name,python", [
    ("_C.cpython-312-x86_64-linux-gnu.so", "CPython 3.12 on x86_64-linux-gnu"),
    ("_C.cpython-310-darwin.so", "CPython 3.10 on darwin"),
    ("_C.cpython-314t-x86_64-linux-gnu.so", "CPython 3.14 free-threaded on x86_64-linux-gnu"),
    ("_C.pypy310-pp73-x86_64-linux-gnu.so", "PyPy (Python 3.10) on x86_64-linux-gnu"),
    ("_C.backup.so", "a Python its name does not say"),
])
def test_an_extensions_name_says_the_python_it_was_built_for(name, python):
    from pathlib import Path

    from r1fast import _ext

    assert _ext.built_for(Path("/x") / name) == python
