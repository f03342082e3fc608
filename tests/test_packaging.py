import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_sdist_holds_what_builds_the_extension(tmp_path):
    # `python -m build` builds the wheel from the sdist: without CMakeLists.txt and csrc/ in it, CMake
    # stopped with "does not appear to contain CMakeLists.txt".
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__", "*.so", "bench-results"))
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(out)!r})"],
                   cwd=src, check=True, capture_output=True)
    (sdist,) = out.glob("r1fast-*.tar.gz")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    wanted = {"CMakeLists.txt", "setup.py", "pyproject.toml"}
    wanted |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").iterdir() if p.suffix in (".h", ".cpp", ".cu")}
    assert wanted <= names, sorted(wanted - names)
