"""The kernels one engine decode step launches, counted on the CPU and pinned, so that one more launch
per layer (a cast, a .contiguous() copy, an unfused add) cannot slip in unseen.

A decode step at batch 512 of Qwen2.5-1.5B runs ~6 ms on an H200; every small kernel in it costs a few
microseconds even inside a CUDA graph, times 28 layers. The counts come from a TorchDispatchMode (the
aten ops that launch a kernel on a GPU: not views, not allocations) plus the Triton launches, under the
Triton interpreter on the Triton path, which is the kernel sequence a GPU step runs (the GEMMs are
cuBLAS there). If a change here is intended, update the lists and say what it costs or saves.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("r1fast._C")

from r1fast.models import CausalLM, ModelConfig  # noqa: E402
from r1fast.rollout import Engine, SamplingParams  # noqa: E402

CFG = dict(architecture="Qwen2ForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

# aten ops that launch nothing: allocations, and views the dispatcher does not flag (func.is_view)
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "_unsafe_view", "lift_fresh", "detach", "alias", "promote_types"}

# The Triton path's step, in launch order ("triton:" = one Triton launch, else an aten op)
STEP_INPUTS = ["index_select",   # the input tokens, gathered from the last step's samples on the device
               "embedding"]
ROTARY_TABLES = ["index_select"]  # cos/sin [B, head_dim] for all layers: rows of the runner's table of positions
LAYER = ["triton:_rmsnorm_fwd_kernel",     # input norm (with the last layer's residual add from layer 1 on)
         "addmm",                          # q/k/v: one GEMM (Qwen2's bias in it)
         "triton:_rotary_kernel",          # q and k in one launch
         "triton:_store_kv_kernel",
         "triton:_prefix_kernel", "triton:_decode_kernel",  # paged attention: shared prompt blocks, then the rest
         "mm",                             # o_proj
         "triton:_rmsnorm_fwd_kernel",     # residual add + post-attention norm
         "mm",                             # gate and up: one GEMM
         "triton:_swiglu_fwd_kernel",
         "mm"]                             # down_proj
FINAL_NORM = ["triton:_rmsnorm_fwd_kernel"]  # the last residual add inside it
# lm_head then the sampling kernel; the two casts are the CPU's (fp32 logits from fp16 there by casting
# both operands; on CUDA one GEMM writes fp32 logits from bf16 operands)
HEAD = ["_to_copy", "_to_copy", "mm", "triton:_sample_kernel"]


class _Launches(TorchDispatchMode):
    """Names of what would launch a GPU kernel, in order: aten ops, and Triton kernels (`triton_run`)."""

    def __init__(self):
        super().__init__()
        self.names = []
        self.inside_triton = 0  # the interpreter's own tensor traffic is not the step's

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.inside_triton and not func.is_view and name not in _NO_KERNEL:
            self.names.append(name)
        return func(*args, **(kwargs or {}))


def _steady_decode_step(monkeypatch, decode_backend, triton_path):
    """(kernels of the model's forward, kernels of the sampling) of a decode step that takes its tokens
    from the step before on the device (the engine's steady state)."""
    model = CausalLM(ModelConfig(**CFG)).to(torch.float16).eval()
    engine = Engine(model, block_size=4, num_blocks=64, max_num_seqs=8, decode_backend=decode_backend)
    counting = []
    if triton_path:
        import triton.runtime.interpreter as interpreter

        from r1fast.kernels import sampling

        # the interpreter fills output buffers with NaN (backends.poisoned) to catch unwritten elements;
        # compiled, that fill does not run
        monkeypatch.setattr(sampling, "poisoned", lambda t, value=None: t)
        run = interpreter.InterpretedFunction.run

        def counted_run(self, *args, **kwargs):
            mode = counting[-1] if counting else None
            if mode is None:
                return run(self, *args, **kwargs)
            mode.names.append("triton:" + self.fn.__name__)
            mode.inside_triton += 1
            try:
                return run(self, *args, **kwargs)
            finally:
                mode.inside_triton -= 1

        monkeypatch.setattr(interpreter.InterpretedFunction, "run", counted_run)
    recorded = {}
    decode, sample = engine.runner.decode, engine._sample

    def counted(key, fn):
        def call(*args, **kwargs):
            take = key not in recorded and (key == "sample" or "tokens_from" in kwargs) and \
                (key == "forward" or "forward" in recorded)
            if not take:
                return fn(*args, **kwargs)
            mode = _Launches()
            counting.append(mode)
            try:
                with mode:
                    out = fn(*args, **kwargs)
            finally:
                counting.pop()
            recorded[key] = mode.names
            return out
        return call

    monkeypatch.setattr(engine.runner, "decode", counted("forward", decode))
    monkeypatch.setattr(engine, "_sample", counted("sample", sample))
    engine.generate([[1, 2, 3, 4, 5], [6, 7, 8]], SamplingParams(n=2, temperature=1.0, max_tokens=4, seed=0))
    return recorded["forward"], recorded["sample"]


def test_a_decode_step_launches_the_pinned_kernels_on_the_triton_path(monkeypatch):
    """11 launches a layer (2 of them attention), 3 before the layers, 1 after, and the head's GEMM plus
    one sampling kernel. Before this test the last layer's residual add was a kernel of its own, and the
    cos/sin tables took 7 launches a step."""
    from r1fast import backends

    try:
        backends.resolve("paged_decode_attention", torch.device("cpu"), "triton")
    except ValueError:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (unset on a machine with CUDA)")
    monkeypatch.setenv("R1FAST_BACKEND", "triton")  # every op's Triton kernel, as on a GPU
    forward, sample = _steady_decode_step(monkeypatch, "triton", triton_path=True)
    want = STEP_INPUTS + ROTARY_TABLES + LAYER * CFG["num_hidden_layers"] + FINAL_NORM
    assert forward == want, f"{len(forward)} launches, pinned {len(want)}:\n{forward}"
    assert sample == HEAD


def test_a_decode_step_on_the_cpu_path_runs_the_pinned_number_of_ops(monkeypatch):
    """The CPU path (torch backends: the norms, rotary and attention as several ops each) pinned by
    count: the decoder's and runner's glue between the ops is the GPU's too."""
    monkeypatch.delenv("R1FAST_BACKEND", raising=False)
    forward, sample = _steady_decode_step(monkeypatch, None, triton_path=False)
    assert len(forward) == 123, forward
    assert len(sample) == 43, sample


@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 16}], ids=["default", "yarn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_runners_rotary_table_equals_the_forwards_cos_and_sin(rope_scaling, dtype):
    """The engine gathers cos/sin from a table of every position built once; each row must equal what the
    forward computes for that position in a batch of any size (bit for bit: the same expressions, and on
    a GPU the same elementwise kernels per element), attention scaling (YaRN) included."""
    from r1fast.rollout.runner import rotary_rows, rotary_table

    model = CausalLM(ModelConfig(**{**CFG, "rope_scaling": rope_scaling, "rope_theta": 1e4})).to(dtype)
    table = rotary_table(model, 64)
    assert table.shape == (64, 2, CFG["hidden_size"] // CFG["num_attention_heads"]) and table.dtype == dtype
    g = torch.Generator().manual_seed(5)
    for batch in (1, 3, 17, 40):
        positions = torch.randint(0, 64, (batch,), generator=g)
        cos, sin = rotary_rows(table, positions)
        want_cos, want_sin = model.rotary.cos_sin(positions, dtype)
        assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    assert (table[:, 1] != 0).any() and (table[1:, 0] != 1).any()  # not a table of zero angles


def test_a_decode_position_past_max_model_len_is_a_clear_error():
    """The table holds max_model_len positions: a step past it (an engine bug) is an error naming it, not
    an out-of-range gather (a device assert inside a CUDA graph)."""
    import numpy as np

    model = CausalLM(ModelConfig(**CFG)).eval()
    engine = Engine(model, block_size=4, num_blocks=64, max_num_seqs=8, max_model_len=20)
    engine.block_manager.allocate(0, list(range(8)))
    ids = np.array([0], dtype=np.int64)
    slots, _ = engine.block_manager.append_batch(ids, np.array([1], dtype=np.int32))
    with pytest.raises(RuntimeError, match="position 20 is past max_model_len 20"):
        engine.runner.decode(engine.block_manager, ids, np.array([20]), slots, last_tokens=np.array([1]))
