import glob
import os
import re
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
    # Every file the sources digest counts ships, headers of each suffix and in a subfolder too (a .cuh or
    # .hpp was left out: the sdist's build failed on a missing include).
    from r1fast import _ext

    src = tmp_path / "src"
    _copy_tree(src)
    for name in ("extra.cuh", "extra.hpp", "detail/extra.h"):
        (src / "csrc" / name).parent.mkdir(exist_ok=True)
        (src / "csrc" / name).write_text("#pragma once\n")
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(out)!r})"],
                   cwd=src, check=True, capture_output=True)
    (sdist,) = out.glob("r1fast-*.tar.gz")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    wanted = {"setup.py", "pyproject.toml", *(p.relative_to(src).as_posix() for p in _ext.build_files(src))}
    assert {"csrc/extra.cuh", "csrc/detail/extra.h", "csrc/block_manager.h"} <= wanted
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


def test_a_direct_cmake_build_carries_the_sources_digest(tmp_path):
    # setup.py alone passed the digest to CMake: a _C built by `cmake --build` (the quick loop while working on
    # csrc/) carried none, and r1fast refused it as "built from other sources" although it was built from these.
    # CMakeLists.txt computes it now, and reruns that step when a file under csrc/ changes.
    pybind11 = pytest.importorskip("pybind11")
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("needs cmake")
    from r1fast import _ext

    src, build = tmp_path / "src", tmp_path / "build"
    _copy_tree(src)
    (src / "csrc" / "detail").mkdir()
    (src / "csrc" / "detail" / "extra.cuh").write_text("#pragma once\n")
    r = subprocess.run([cmake, "-S", str(src), "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}",
                        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", "-DR1FAST_CUDA=OFF"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    generated = "".join(p.read_text(errors="replace") for p in build.rglob("*")
                        if p.is_file() and p.suffix in ("", ".make", ".ninja", ".cmake"))
    assert re.search(r'R1FAST_SOURCES_DIGEST=\\?"' + _ext.sources_digest(src), generated)
    assert str(src / "csrc" / "block_manager.h") in generated  # a header edit reconfigures: a new digest
    assert str(src / "csrc" / "detail" / "extra.cuh") in generated  # in a subfolder too
    assert str(src / "r1fast" / "_ext.py") in generated  # and so does a change of how it is computed


def test_an_extension_without_a_digest_is_named_as_such(fresh_ext, monkeypatch):
    # one compiled by hand carries no digest: it was called "built from other sources", which it may not be
    _ext = fresh_ext
    try:
        from r1fast import _C
    except ImportError:
        pytest.skip("r1fast._C not built")
    monkeypatch.setattr(_C, "build_info", lambda: {"with_cuda": False, "sources_digest": ""})
    with pytest.raises(RuntimeError, match="carries no digest of the sources it was built from"):
        _ext.require()


def test_a_build_without_pybind11_says_what_to_install(tmp_path):
    # setup.py build_ext or pip's --no-build-isolation, without pybind11 installed: a bare ModuleNotFoundError
    blocker = tmp_path / "blocker" / "pybind11"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError(\"No module named 'pybind11'\")\n")
    src = tmp_path / "src"
    _copy_tree(src)
    env = {**os.environ, "PYTHONPATH": str(blocker.parent), "R1FAST_CUDA": "0"}
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext"], cwd=src, env=env, capture_output=True,
                       text=True, check=False)
    assert r.returncode != 0
    assert "building _C needs pybind11 (No module named 'pybind11'): pip install 'pybind11>=2.12'" in r.stderr, \
        r.stderr[-2000:]


def test_sources_digest_follows_csrc(tmp_path):
    from r1fast import _ext

    assert _ext.sources_digest(tmp_path) is None  # an installed wheel: nothing to compare with
    (tmp_path / "csrc").mkdir()
    for name in ("setup.py", "CMakeLists.txt", "csrc/a.cpp"):
        (tmp_path / name).write_text("x")
    before = _ext.sources_digest(tmp_path)
    (tmp_path / "csrc" / ".a.cpp.swp").write_text("editor")
    assert _ext.sources_digest(tmp_path) == before
    (tmp_path / "csrc" / "a.cpp").write_text("y")
    assert _ext.sources_digest(tmp_path) not in (None, before)
    # headers of every kind, in subfolders too: an edited .cuh or .hpp left a stale _C undetected
    (tmp_path / "csrc" / "detail").mkdir()
    for name in ("a.h", "a.hpp", "a.cuh", "a.cu", "detail/b.cuh"):
        before = _ext.sources_digest(tmp_path)
        (tmp_path / "csrc" / name).write_text("new")
        assert _ext.sources_digest(tmp_path) != before, name
        (tmp_path / "csrc" / name).write_text("edited")
        assert _ext.sources_digest(tmp_path) != before, name
    before = _ext.sources_digest(tmp_path)
    (tmp_path / "csrc" / ".#a.cuh").write_text("an editor's lock file")
    assert _ext.sources_digest(tmp_path) == before


def test_every_file_in_csrc_counts_in_the_sources_digest():
    # a source of a suffix the digest skips (a .inl, say) would leave a stale _C undetected and stay out of the sdist
    from r1fast import _ext

    r = subprocess.run(["git", "ls-files", "csrc"], cwd=ROOT, capture_output=True, text=True, check=False)
    if r.returncode != 0 or not r.stdout.strip():
        pytest.skip("not a git checkout")
    counted = {p.relative_to(ROOT).as_posix() for p in _ext.build_files(ROOT)}
    assert set(r.stdout.split()) <= counted, "add the suffix to _ext.BUILD_SUFFIXES and MANIFEST.in"
    manifest = (ROOT / "MANIFEST.in").read_text()
    assert re.search(r"^recursive-include csrc " + re.escape(" ".join("*" + x for x in _ext.BUILD_SUFFIXES)) + "$",
                     manifest, re.M), "MANIFEST.in ships other suffixes than _ext.BUILD_SUFFIXES"


@pytest.fixture
def fresh_ext():
    from r1fast import _ext

    _ext._import.cache_clear()
    yield _ext
    _ext._import.cache_clear()


def test_a_stale_extension_is_named_not_used(fresh_ext, monkeypatch):
    # An editable install keeps the _C it built when a pull changes csrc/: that old _C was used, and the
    # first call whose meaning had changed failed with "BlockManager: tokens must be 1-D, got 0 dimensions".
    _ext = fresh_ext
    try:
        from r1fast import _C  # noqa: F401
    except ImportError:
        pytest.skip("r1fast._C not built")
    monkeypatch.setattr(_ext, "sources_digest", lambda root: "0" * 16)
    assert _ext.load() is None and not _ext.build_info()["built"]
    # and the CMake loop's way (README), whose copy of the built _C into r1fast/ is a step one may forget
    with pytest.raises(RuntimeError, match=r"out of date.*pip install -e \.`, or with `cmake --build <build folder>` "
                                           r"and copy its _C\*\.so into r1fast/"):
        _ext.require()
    from r1fast import info

    assert "out of date" in info.collect()["r1fast._C"]


def test_a_missing_extension_says_what_its_build_needs_that_pip_cannot_fetch(fresh_ext, monkeypatch, tmp_path):
    """It said "install the package with `pip install -e .` (needs cmake, ninja, pybind11)", three tools pip's
    build fetches itself, and not what it cannot: a C++ compiler and Python's headers."""
    import r1fast
    from r1fast import info

    checkout = tmp_path / "checkout"   # a source checkout whose r1fast/ holds no _C
    (checkout / "r1fast").mkdir(parents=True)
    (checkout / "setup.py").write_text("")
    monkeypatch.delattr(r1fast, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "r1fast._C", None)   # `from r1fast import _C` raises ImportError
    monkeypatch.setattr(fresh_ext, "__file__", str(checkout / "r1fast" / "_ext.py"))
    needs = (f"run `pip install -e .` in {checkout} to build it. That needs a C++17 compiler (g++ or clang++) and "
             f"Python's C headers (python3-dev on Debian/Ubuntu) on this machine; pip fetches CMake, Ninja and "
             f"pybind11 itself, and the CUDA kernels are compiled too where nvcc is found")
    with pytest.raises(fresh_ext.ExtensionUnavailable) as raised:
        fresh_ext.require("the rollout engine")
    assert str(raised.value) == f"r1fast._C is not built: {needs} (the rollout engine needs it)"
    assert info.collect()["r1fast._C"] == f"NOT BUILT: {needs}"


def test_the_built_extension_matches_its_sources(fresh_ext):
    want = fresh_ext.sources_digest(ROOT)
    try:
        from r1fast import _C
    except ImportError:
        pytest.skip("r1fast._C not built")
    if want is None or Path(_C.__file__).resolve().parent.parent != ROOT:
        pytest.skip("r1fast is not installed from this source tree")
    assert _C.build_info()["sources_digest"] == want, "csrc/ changed since _C was built: pip install -e ."


def test_python_dash_m_r1fast_is_the_r1fast_command():
    # where the `r1fast` script is not on PATH (a venv not activated): "No module named r1fast.__main__"
    r = subprocess.run([sys.executable, "-m", "r1fast", "bench", "--list"], capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0 and "kv_cache" in r.stdout, r.stderr[-2000:]


def _heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors for a file's headings: lower case, punctuation dropped, spaces to hyphens, -1, -2... on repeats."""
    prose = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)   # a '# comment' in a code block is no heading
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", prose, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_links_between_the_docs_reach_a_file_and_heading():
    # the guides link each other's sections (rollout.md#definitions-the-trainer-relies-on): a renamed heading or a
    # moved file left a link that opened the top of the page, or nothing
    docs = [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("bench/**/*.md")]
    broken = []
    for doc in docs:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target):   # http(s), mailto
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _heading_anchors(dest.read_text()):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


# what an import prints (a banner, a notice; Python's print or a C library's) goes to stderr: stdout holds only
# the failures, so a package that imports fine but prints is not reported as failing
_IMPORT_EACH = """
import importlib, importlib.util, os, sys
stdout = os.dup(1)
os.dup2(2, 1)
failed = []
for name in sys.argv[1:]:
    if importlib.util.find_spec(name) is None:
        continue   # not installed: the tests that need it skip, and say so
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{name}: {type(e).__name__}: {e}")
sys.stdout.flush()
os.dup2(stdout, 1)
for line in failed:
    print(line)
"""


def test_the_installed_test_extras_import():
    # the tests skip on pytest.importorskip, which also skips a package that is installed but fails to import (a
    # trl / transformers version clash): in CI, where `.[test]` installs them all, a broken one would have turned
    # its tests into silent skips. Installed, each must import; one not installed is left to the skips.
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    modules = [re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].replace("-", "_") for req in extras]
    assert "trl" in modules and "math_verify" in modules, modules
    failed = _failing_imports([*modules, "transformers"])
    assert failed == "", f"installed test extras that fail to import:\n{failed}"


def _failing_imports(modules, env=None) -> str:
    """One line per installed module of `modules` that fails to import in a fresh interpreter."""
    p = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *modules], capture_output=True, text=True, timeout=300,
                       env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def test_an_extra_that_prints_on_import_is_not_reported_as_failing(tmp_path):
    # a banner printed on import (by print or by a C library, to fd 1) read as a failure: the import check failed
    # with "installed test extras that fail to import: math_verify 9.9: using the fast parser"
    (tmp_path / "prints_fine.py").write_text("import os\nprint('a banner')\nos.write(1, b'a C banner\\n')\n")
    (tmp_path / "prints_and_breaks.py").write_text("print('a banner')\nraise ImportError('needs transformers>=9')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    failed = _failing_imports(["prints_fine", "prints_and_breaks", "not_installed_at_all"], env=env)
    assert failed == "prints_and_breaks: ImportError: needs transformers>=9\n", failed


def test_modules_share_only_public_helpers():
    """A helper one module imports from another is public there: tokenizer.py imported config.py's _adapter_hint, sft.py
    grpo's _stoppable_run, fused_loss.py loss's _validate_loss_inputs, so renaming a private name broke another module.
    Private modules (_ext, _C) are imported by name, which is fine."""
    import ast

    import r1fast

    root = os.path.dirname(os.path.dirname(r1fast.__file__))
    imported = []
    for folder in ("r1fast", "kernels", "bench"):
        for path in sorted(glob.glob(os.path.join(root, folder, "**", "*.py"), recursive=True)):
            with open(path) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in
                                                         ("r1fast", "kernels", "bench")):
                    imported += [f"{os.path.relpath(path, root)}: {node.module}.{alias.name}" for alias in node.names
                                 if alias.name.startswith("_") and alias.name not in ("_C", "_ext", "__version__")]
    assert imported == []


def test_sources_compile_without_warnings():
    """An invalid escape in a docstring ('\\s' in builtin.py) printed a SyntaxWarning at every import on
    Python 3.12 (the GPU machine's), a DeprecationWarning on 3.11: every source compiles warning-free."""
    import warnings

    files = [p for d in ("r1fast", "kernels", "bench", "tests") for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 50
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            compile(path.read_text(), str(path), "exec")
