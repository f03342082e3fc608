"""`r1fast info`: what it says of this installation is what is installed."""
import random

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
