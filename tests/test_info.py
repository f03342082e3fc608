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
