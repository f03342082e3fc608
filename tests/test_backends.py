import pytest
import torch

from r1fast import backends, ops  # noqa: F401  (ops registers the store_kv implementations)


def test_default_cpu_choice_is_torch():
    name, _ = backends.resolve("store_kv", "cpu")
    assert name == "torch"


def test_a_developers_r1fast_settings_do_not_reach_the_tests():
    # conftest clears them: R1FAST_LOGITS_GEMM=cublas in the shell made the triton log-prob tests run torch.mm
    import os

    assert [k for k in os.environ if k.startswith("R1FAST_")] == []


def test_explicit_backend_wins(monkeypatch):
    monkeypatch.setenv("R1FAST_BACKEND", "torch")
    assert backends.resolve("store_kv", "cpu", "reference")[0] == "reference"


def test_environment_override(monkeypatch):
    monkeypatch.setenv("R1FAST_BACKEND", "reference")
    assert backends.resolve("store_kv", "cpu")[0] == "reference"


def test_unknown_backend_lists_choices(monkeypatch):
    with pytest.raises(ValueError, match="not a backend; backends are reference, torch, triton, cuda"):
        backends.resolve("store_kv", "cpu", "fast")
    monkeypatch.setenv("R1FAST_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="R1FAST_BACKEND='cudnn'"):
        backends.resolve("store_kv", "cpu")


def test_unknown_backend_names_the_op_it_was_asked_of(monkeypatch):
    # "backend='TORCH' is not a backend" named neither the op nor, under R1FAST_BACKEND or an Engine's
    # decode_backend, where the name was given
    from r1fast import ops

    x, w = torch.randn(3, 8, generator=torch.Generator().manual_seed(9)), torch.rand(8) + 0.5
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6, backend="torch"), ops.rms_norm(x, w, 1e-6, backend="reference"))
    with pytest.raises(ValueError, match=r"^rms_norm: backend='TORCH' is not a backend; backends are reference, "
                                         r"torch, triton, cuda$"):
        ops.rms_norm(x, w, 1e-6, backend="TORCH")
    monkeypatch.setenv("R1FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match=r"^swiglu: R1FAST_BACKEND='fastest' is not a backend"):
        ops.swiglu(x, x)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check")
def test_unavailable_backend_says_why_and_lists_available():
    with pytest.raises(ValueError, match=r"backend 'cuda'.*needs CUDA tensors|backend 'cuda'.*without CUDA|not built"):
        backends.resolve("store_kv", "cpu", "cuda")
    with pytest.raises(ValueError, match="available: reference, torch"):
        backends.resolve("store_kv", "cpu", "cuda")


def test_unknown_op():
    with pytest.raises(KeyError, match="no op named"):
        backends.resolve("no_such_op", "cpu")


def test_triton_on_cpu_only_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = backends.backend_available("triton", torch.device("cpu"))
    assert not ok and "TRITON_INTERPRET" in why
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.backend_available("triton", torch.device("cpu"))[0] == backends.triton_importable()


def test_default_ignores_the_override_and_info_lists_every_op(monkeypatch, capsys):
    from r1fast.cli import main as cli_main

    monkeypatch.setenv("R1FAST_BACKEND", "reference")
    assert backends.default("grpo_loss", "cpu") == "torch"  # the choice without the override
    assert {"grouped_logprob", "grpo_loss", "store_kv", "paged_decode_attention", "sample_tokens"} <= set(backends.ops())
    assert cli_main(["info"]) == 0
    out = capsys.readouterr().out
    for op in backends.ops():
        assert f"{op} " in out and "torch on cpu" in out
    assert "R1FAST_BACKEND" in out and "overrides" in out


def test_info_says_which_ops_an_override_breaks_here(monkeypatch, capsys):
    """Under R1FAST_BACKEND=cuda on a CPU `r1fast info` listed store_kv as 'torch on cpu' while each call of it
    raised ValueError, and a misspelt override read like a working one."""
    from r1fast.cli import main as cli_main

    def op_lines():
        assert cli_main(["info"]) == 0
        return {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}

    real = backends.backend_available
    monkeypatch.setattr(backends, "backend_available", lambda b, d: (False, "no CUDA here") if b == "cuda" else real(b, d))
    monkeypatch.setenv("R1FAST_BACKEND", "cuda")
    lines = op_lines()
    assert "R1FAST_BACKEND=cuda: every call raises ValueError (no CUDA here)" in lines["store_kv"]
    assert "R1FAST_BACKEND" not in lines["grpo_loss"]   # no cuda implementation: the override leaves it alone
    monkeypatch.setenv("R1FAST_BACKEND", "reference")
    lines = op_lines()
    assert all(lines[op].endswith("-> reference (R1FAST_BACKEND)") for op in backends.ops())
    monkeypatch.setenv("R1FAST_BACKEND", "cudaa")
    assert "'cudaa' is not a backend: every op call raises ValueError" in op_lines()["R1FAST_BACKEND"]


def test_environment_override_skips_ops_without_that_backend(monkeypatch):
    monkeypatch.setenv("R1FAST_BACKEND", "triton")  # paged_prefill_attention has no triton implementation
    assert "triton" not in backends.implementations("paged_prefill_attention")
    assert backends.resolve("paged_prefill_attention", "cpu")[0] == "torch"
    monkeypatch.setenv("R1FAST_BACKEND", "cuda")  # store_kv has one, but it cannot run on the CPU: an error
    with pytest.raises(ValueError, match="R1FAST_BACKEND=cuda.*unavailable"):
        backends.resolve("store_kv", "cpu")
    with pytest.raises(ValueError, match="paged_prefill_attention has no cuda implementation"):
        backends.resolve("paged_prefill_attention", "cpu", "cuda")  # backend= is a per-call demand: still an error


def test_default_passes_over_a_backend_that_does_not_take_the_inputs(monkeypatch):
    """float64 on a GPU defaults past Triton (tl.dot has no fp64) to torch; asked for by name (or by
    R1FAST_BACKEND), Triton is an error naming the dtype: its kernels ran paged_decode_attention at fp32
    precision without a word. The GPU's preference order is stood in on the CPU."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backends, "_CPU_ORDER", backends._GPU_ORDER)
    refused = r"the triton backend takes fp16/bf16/fp32 inputs, got torch.float64 \(use backend='torch'"
    for op in ("grouped_logprob", "grpo_loss", "paged_decode_attention"):
        assert backends.resolve(op, "cpu", dtype=torch.float32)[0] == "triton"
        assert backends.resolve(op, "cpu", dtype=torch.float64)[0] == "torch"
        with pytest.raises(ValueError, match=f"{op}: {refused}"):
            backends.resolve(op, "cpu", "triton", dtype=torch.float64)
        monkeypatch.setenv("R1FAST_BACKEND", "triton")
        with pytest.raises(ValueError, match=refused):
            backends.resolve(op, "cpu", dtype=torch.float64)
        if op != "paged_decode_attention":
            monkeypatch.setenv("R1FAST_BACKEND", "cuda")  # no cuda implementation: the override is not about it
            assert backends.resolve(op, "cpu", dtype=torch.float64)[0] == "torch"
        monkeypatch.delenv("R1FAST_BACKEND")
    with pytest.raises(ValueError, match=r"grpo_loss: none of the backends usable on cpu \(.*torch.*\) takes these"):
        backends.resolve("grpo_loss", "cpu", accepts=lambda name: False)


def test_interpreted_triton_refuses_bf16_matrix_products(monkeypatch):
    """The Triton interpreter's tl.dot returns garbage for bfloat16 (not float16): refused, not run."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    h, w, t = torch.randn(5, 16), torch.randn(40, 16), torch.randint(0, 40, (5,))
    with pytest.raises(ValueError, match="grouped_logprob: the Triton interpreter .* bfloat16"):
        ops.grouped_logprob(h.bfloat16(), w.bfloat16(), t, backend="triton")
    got = ops.grouped_logprob(h.half(), w.half(), t, backend="triton")
    want = torch.log_softmax(h.half().double() @ w.half().double().T, -1).gather(1, t[:, None])[:, 0]
    assert torch.allclose(got.double(), want, atol=1e-3)
    assert backends.resolve("grouped_logprob", "cpu", "torch", dtype=torch.bfloat16)[0] == "torch"


def _interpreter_patch_with_the_numpy_bug(tensor, scope):
    # the shape of Triton 3.6's interpreter patch: int() of what may be a 1-element array
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))


def _older_interpreter_patch_with_the_numpy_bug(tensor):
    # Triton 3.2 to 3.5: the class alone, patched for good
    tensor.__index__ = lambda self: int(self.handle.data)


def test_old_interpreters_get_a_numpy_safe_index(monkeypatch):
    """Triton <= 3.6's interpreter feeds 1-element arrays to int(), which NumPy >= 2.4 refuses: every
    kernel with a computed loop bound failed on the CPU there. r1fast wraps that patch (only it), in
    both its call forms, and still refuses a block of several elements as a scalar, as Triton 3.9 does."""
    import operator

    import numpy as np

    interpreter = pytest.importorskip("triton.runtime.interpreter")
    from r1fast.kernels._interpreter_compat import patch_interpreter_index

    class Scope:  # the interpreter's patch scope: set, then restore in reverse order
        def __init__(self):
            self.changes = []

        def set_attr(self, obj, name, value):
            self.changes.append((obj, name, getattr(obj, name, None)))
            setattr(obj, name, value)

        def restore(self):
            while self.changes:
                obj, name, old = self.changes.pop()
                setattr(obj, name, old) if old is not None else delattr(obj, name)

    class Handle:
        def __init__(self, *values):
            self.data = np.array(values, dtype=np.int32)

    def tensor_class():
        class Tensor:
            def __init__(self, *values):
                self.handle = Handle(*values)
        return Tensor

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", _interpreter_patch_with_the_numpy_bug)
    assert patch_interpreter_index()
    assert not patch_interpreter_index()  # wrapped once, not twice
    scope, Tensor = Scope(), tensor_class()
    interpreter._patch_lang_tensor(Tensor, scope)
    assert operator.index(Tensor(7)) == 7
    with pytest.raises(TypeError):
        operator.index(Tensor(7, 8))
    scope.restore()
    assert not hasattr(Tensor, "__index__")

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", _older_interpreter_patch_with_the_numpy_bug)
    assert patch_interpreter_index()
    Tensor = tensor_class()
    interpreter._patch_lang_tensor(Tensor)
    assert operator.index(Tensor(5)) == 5

    def fixed(tensor, scope):
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", fixed)
    assert not patch_interpreter_index() and interpreter._patch_lang_tensor is fixed  # fixed upstream: untouched


def test_an_extension_that_is_built_but_does_not_load_says_why(tmp_path):
    # A built r1fast._C that fails to import (e.g. a libstdc++ older than the build's) was reported as
    # "r1fast._C is not built: install the package with `pip install -e .`", hiding the real error.
    import subprocess
    import sys

    (tmp_path / "_C.py").write_text("raise ImportError(\"libstdc++.so.6: version `GLIBCXX_3.4.99' not found\")\n")
    script = (
        "import r1fast, torch\n"
        f"r1fast.__path__.insert(0, {str(tmp_path)!r})\n"
        "from r1fast import _ext, backends, info\n"
        "try:\n    _ext.require()\nexcept RuntimeError as e:\n    print(e)\n"
        "print(backends.backend_available('cuda', torch.device('cpu'))[1])\n"
        "print(info.collect()['r1fast._C'])\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3 and all("GLIBCXX_3.4.99" in line for line in lines), out.stdout
    assert "does not import" in lines[0] and "UNUSABLE" in lines[2] and "not built" not in out.stdout


def test_inputs_the_environments_backend_cannot_take_name_the_environment(monkeypatch):
    # R1FAST_BACKEND=triton with float64 (or, interpreted, bfloat16) inputs was refused with the advice to pass
    # backend='torch', as if the call had asked for triton: the setting that did was not named
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for dtype, op in ((torch.float64, "grpo_loss"), (torch.bfloat16, "grouped_logprob")):
        with pytest.raises(ValueError, match=rf"^{op}: .*backend='torch'") as asked:
            backends.resolve(op, "cpu", "triton", dtype=dtype)
        assert "R1FAST_BACKEND" not in str(asked.value)
        monkeypatch.setenv("R1FAST_BACKEND", "triton")
        with pytest.raises(ValueError, match=rf"^{op}: .*, or unset R1FAST_BACKEND=triton\)?$"):
            backends.resolve(op, "cpu", dtype=dtype)
        monkeypatch.delenv("R1FAST_BACKEND")


@pytest.mark.parametrize("value", ["Triton", " torch", "cpu"])
def test_a_misspelt_environment_backend_is_said_before_a_model_loads(monkeypatch, value):
    # it was said at the first op call, after the weights had loaded (minutes, for a large model)
    from r1fast.trainer.common import load_model_and_tokenizer

    monkeypatch.setenv("R1FAST_BACKEND", value)
    with pytest.raises(ValueError, match=rf"^R1FAST_BACKEND={value!r} is not a backend; backends are reference, "
                                         r"torch, triton, cuda"):
        load_model_and_tokenizer("builtin:tiny", device=torch.device("cpu"))
    monkeypatch.setenv("R1FAST_BACKEND", "reference")   # a backend name: the ops decide whether it runs
    backends.check_environment()
