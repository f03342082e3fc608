import contextlib
import inspect
import os
import re
import sys

# Triton must see TRITON_INTERPRET before it is first imported: on a machine without CUDA the
# Triton kernels run under the interpreter, on CPU tensors.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def _names_cuda(code) -> bool:
    """The function's own name, a name or string constant of `code`, or of a function nested in it, says cuda
    (any case). Read off the code objects: inspect.getsource took ~3 ms a test, seconds of every collection."""
    if "cuda" in code.co_name.lower():
        return True
    for const in code.co_consts:
        if isinstance(const, str) and "cuda" in const.lower():
            return True
        if inspect.iscode(const) and _names_cuda(const):
            return True
    return any("cuda" in name.lower() for name in code.co_names)


def _skips_without_a_gpu(item) -> bool:
    """A skipif mark whose reason names CUDA or a GPU. Its condition (`not torch.cuda.is_available()`) is read
    where the test is defined, outside the test's code, which may then name no CUDA (a DEVICE constant)."""
    marks = item.iter_markers("skipif") if hasattr(item, "iter_markers") else ()
    return any(re.search(r"cuda|gpu", str(mark.kwargs.get("reason", "")), re.IGNORECASE) for mark in marks)


def _may_use_the_gpu(item) -> bool:
    """The test takes the `device` fixture (the GPU where there is one), skips without a GPU, or its own code
    names CUDA.
    bench/gpu_check.sh runs only these besides the GPU-marked ones: the rest run on the CPU on any
    machine, and CI runs them there; on the GPU's short window they took time from the bench."""
    if "device" in getattr(item, "fixturenames", ()) or _skips_without_a_gpu(item):
        return True
    code = getattr(getattr(item, "function", None), "__code__", None)
    return code is None or _names_cuda(code)  # no code to read: keep it


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if _may_use_the_gpu(item):
            item.add_marker(pytest.mark.may_use_gpu)


@pytest.fixture
def device():
    """Where kernel tests run: the GPU when present, else the CPU (Triton under the interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    # A developer's R1FAST_* settings must not change which implementation a test exercises:
    # R1FAST_BACKEND picks the backend, R1FAST_LOGITS_GEMM who forms the logits tiles on the triton
    # backend (with =cublas set, the "triton" log-prob tests ran torch.mm and three of them failed).
    for name in [k for k in os.environ if k.startswith("R1FAST_")]:
        monkeypatch.delenv(name)


# (nodeid, why) of the test after which this process's CUDA context could run nothing more
_CUDA_LOST: list[str] = []


def _cuda_context_lost() -> str | None:
    """Why this process's CUDA context can run nothing more (a kernel faulted: illegal address, device-side
    assert), or None while it can or the test process never used CUDA."""
    if not (HAS_CUDA and torch.cuda.is_initialized()):
        return None
    try:
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - any error here means the context is gone
        return " ".join(f"{type(e).__name__}: {e}".split())
    return None


def _before_test() -> None:
    if _CUDA_LOST:
        pytest.skip(f"the CUDA context was lost in {_CUDA_LOST[0]} ({_CUDA_LOST[1]})")


def _after_test(nodeid: str, xdist_worker: bool) -> None:
    why = _cuda_context_lost()
    if why is None:
        return
    _CUDA_LOST[:] = [nodeid, why]
    if xdist_worker:  # xdist reports this test as the crash and gives this worker's other tests to a fresh one
        sys.stderr.write(f"{nodeid}: the CUDA context is lost ({why}): this pytest-xdist worker ends\n")
        sys.stderr.flush()
        os._exit(1)
    pytest.fail(f"the CUDA context is lost after this test ({why}); the later tests skip", pytrace=False)


@pytest.fixture(autouse=True)
def _stop_after_a_cuda_fault(request):
    """A kernel fault is sticky and surfaces at some later CUDA call: every test after it in the process
    failed with the same error, the one at fault was not the one named, and on bench/gpu_check.sh's GPU
    pass (8 xdist workers, --maxfail=20) twenty such failures of one worker ended every worker's tests.
    The device is synchronised after each test, so the fault is named where it happened; an xdist worker
    then ends (a fresh one runs its remaining tests), a plain run skips the rest."""
    _before_test()
    yield
    _after_test(request.node.nodeid, hasattr(request.config, "workerinput"))


@pytest.fixture
def sigterm_guard():
    """A SIGTERM that the trainer or pipeline does not catch fails the test instead of killing pytest."""
    import signal

    def unhandled(signum, frame):
        raise AssertionError("SIGTERM reached the handler outside the trainer")

    previous = signal.signal(signal.SIGTERM, unhandled)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.fixture(params=[True, False], ids=["math_verify", "no_math_verify"])
def with_math_verify(request, monkeypatch):
    """The test twice: with math-verify, and with its import failing (the rewards' numeric fallback alone)."""
    if request.param:
        pytest.importorskip("math_verify")
    else:
        monkeypatch.setitem(sys.modules, "math_verify", None)
    return request.param


@pytest.fixture
def umask_027():
    """The process umask 027 (group may read, others nothing) for the test, then the old one again."""
    import os

    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def modes_under(folder) -> dict[str, int]:
    """Each file's and folder's permission bits below `folder`, by path relative to it."""
    import os
    import stat

    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = stat.S_IMODE(os.stat(path).st_mode)
    return out


@pytest.fixture
def device_reads(monkeypatch):
    """A context manager that counts, while open, the host's reads of tensor values (item, bool, int:
    aten._local_scalar_dense; tolist; bincount, which reads its input's min and max on a GPU; nonzero, which
    reads its count): each is a host sync on a GPU. It yields the list of reads."""
    from torch.utils._python_dispatch import TorchDispatchMode

    reads, counting = [], [False]

    class CountReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten._local_scalar_dense:
                reads.append(func)
            elif func.overloadpacket is torch.ops.aten.nonzero:
                reads.append(func)
            elif func.overloadpacket is torch.ops.aten.bincount:
                reads.extend([func, func])
            return func(*args, **(kwargs or {}))

    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: (counting[0] and reads.append("tolist")) or tolist(self))

    @contextlib.contextmanager
    def count():
        reads.clear()
        counting[0] = True
        try:
            with CountReads():
                yield reads
        finally:
            counting[0] = False

    return count


# no device work of their own on a GPU: allocations (the caching allocator), and the read that
# device_reads counts
_NOT_LAUNCHES = ("empty", "empty_like", "empty_strided", "new_empty", "_local_scalar_dense")


@pytest.fixture
def device_launches(monkeypatch):
    """A context manager that counts, while open, what a call would launch on a GPU: each torch op that is not
    a view, an allocation or a read of a value (one or more kernels each on CUDA), by name, and each launch of
    the Triton kernels named when opening it, as ("triton", name); what a kernel does under the interpreter is
    not counted. Kernel outputs are not poisoned while open (a fill_ only under the interpreter).
    Use: `with device_launches(module, "kernel_name", ...) as launches`."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from r1fast import backends

    launches, counting = [], [False]

    class CountLaunches(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if counting[0] and not func.is_view and name not in _NOT_LAUNCHES:
                launches.append(name)
            return func(*args, **(kwargs or {}))

    class Launcher:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            run = self.kernel[grid]

            def launch(*args, **kwargs):
                if counting[0]:
                    launches.append(("triton", self.name))
                was, counting[0] = counting[0], False
                try:
                    return run(*args, **kwargs)
                finally:
                    counting[0] = was
            return launch

    @contextlib.contextmanager
    def count(module, *kernel_names):
        for name in kernel_names:
            monkeypatch.setattr(module, name, Launcher(getattr(module, name), name))
        if hasattr(module, "poisoned"):
            monkeypatch.setattr(module, "poisoned", lambda t, value=None: t)
        monkeypatch.setattr(backends, "poisoned", lambda t, value=None: t)
        launches.clear()
        counting[0] = True
        try:
            with CountLaunches():
                yield launches
        finally:
            counting[0] = False

    return count


class DiskOps(list):
    """The file-system steps of the code under test, in order: ("fsync", path) of a file or a folder,
    ("rename", src, dst) for os.rename and os.replace, ("remove", path), ("rmtree", path); paths resolved."""

    def synced_between(self, first: int, last: int, folder) -> bool:
        """Whether `folder` was fsynced after step `first` and before step `last`."""
        folder = os.path.realpath(folder)
        return any(op == ("fsync", folder) for op in self[first + 1:last])

    def at(self, op, after: int = -1) -> int:
        """Where `op` (its paths as the test knows them: a tmp_path) was first taken after step `after`."""
        return self.index(tuple(os.path.realpath(p) if i else p for i, p in enumerate(op)), after + 1)

    def renamed_to(self, path, before: int) -> int:
        """Where the last rename onto `path` before step `before` was taken."""
        path = os.path.realpath(path)
        return max(i for i, op in enumerate(self[:before]) if op[0] == "rename" and op[2] == path)


@pytest.fixture
def disk_ops(monkeypatch):
    """The order of the durability steps a write takes (DiskOps): a crash or power loss keeps only what was
    fsynced, so a step that must reach the disk before another needs an fsync of its folder between them."""
    import shutil

    ops = DiskOps()
    real = {name: getattr(os, name) for name in ("fsync", "rename", "replace", "remove", "unlink")}
    real_rmtree = shutil.rmtree

    def fsync(fd):
        ops.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        return real["fsync"](fd)

    def renamer(name):
        def rename(src, dst, *args, **kwargs):
            if not args and not kwargs:   # rename(src, dst, src_dir_fd=...) is no call of r1fast's
                ops.append(("rename", os.path.realpath(src), os.path.realpath(dst)))
            return real[name](src, dst, *args, **kwargs)
        return rename

    def remover(name):
        def remove(path, *args, **kwargs):
            if kwargs.get("dir_fd") is None:   # rmtree's own unlinks inside a folder it deletes (recorded whole)
                ops.append(("remove", os.path.realpath(path)))
            return real[name](path, *args, **kwargs)
        return remove

    def rmtree(path, *args, **kwargs):
        ops.append(("rmtree", os.path.realpath(path)))
        return real_rmtree(path, *args, **kwargs)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("names a descriptor's file by /proc/self/fd (Linux)")
    monkeypatch.setattr(os, "fsync", fsync)
    for name in ("rename", "replace"):
        monkeypatch.setattr(os, name, renamer(name))
    for name in ("remove", "unlink"):
        monkeypatch.setattr(os, name, remover(name))
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    return ops
