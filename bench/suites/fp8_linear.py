"""fp8_linear: FP8 linear layers (each usable path) against the bf16 nn.Linear GEMM.

GEMM shapes are the MLP projections of 1.5B- and 7B-shaped models (Qwen2.5: hidden 1536 /
intermediate 8960, hidden 3584 / intermediate 18944) over 16384 tokens, gate and up fused as the
decoder runs them (one GEMM of 2 x intermediate outputs). The floor is the GEMM FLOPs
(2MKN forward, 6MKN forward+backward) at the measured FP8 rate for the FP8 rows and at the measured
bf16 rate for the bf16 row (issue 6: "the GEMM FLOPs at the measured FP8 and bf16 rates"), so each
row's % of floor says how close that path is to its own hardware ceiling, and the speed-up column
says what FP8 buys; on the CPU (smoke) every row uses the fp32 rate. On a GPU the
fp8-scaled_mm-only rows time torch._scaled_mm alone on operands quantised beforehand: the gap
between them and the r1fast FP8 rows is what quantising costs, the rest is the GEMMs'.
"""
import torch
import torch.nn.functional as F

from r1fast.bench.harness import Case, Impl, Skip, suite


def _tensors(m, k, n, dtype, device, grad):
    x = (torch.randn(m, k, device=device) * 0.5).to(dtype).requires_grad_(grad)
    w = (torch.randn(n, k, device=device) * k ** -0.5).to(dtype).requires_grad_(grad)
    dy = torch.randn(m, n, device=device).to(dtype)
    return x, w, dy


def _timed(layer, x, w, dy, mode):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return layer(x)
    else:
        def run():
            x.grad = w.grad = None
            layer(x).backward(dy)
    try:  # one call up front: an FP8 kernel this card/build lacks is a skip with its reason, not a crash
        run()
    except RuntimeError as e:
        raise Skip(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    x.grad = w.grad = None  # left alive, they would sit in the peak memory's baseline, not in the call's peak
    return run


def _dense(shape, dtype, device, mode):
    def setup():
        x, w, dy = _tensors(*shape, dtype, device, mode != "fwd")
        return _timed(lambda t: F.linear(t, w), x, w, dy, mode)
    return setup


def _ours(impl, scaling, shape, dtype, device, mode):
    def setup():
        from r1fast.fp8 import fp8_linear
        from r1fast.fp8.support import torch_path

        if impl == "torch":
            ok, why = torch_path(device, scaling)
            if not ok:
                raise Skip(why)
        x, w, dy = _tensors(*shape, dtype, device, mode != "fwd")
        return _timed(lambda t: fp8_linear(t, w, impl=impl, scaling=scaling), x, w, dy, mode)
    return setup


def _scaled_mm_only(scaling, shape, dtype, device, mode):
    """torch._scaled_mm alone, on operands quantised once in setup: the GEMM time an FP8 row would
    have if quantising were free, so (that row's time - this one's) is what r1fast's quantisation,
    padding and casts cost. Three GEMMs in fwd_bwd, shaped and formatted as the "torch" path's
    (dy in E5M2, fast accumulation in forward only)."""
    def setup():
        from r1fast.fp8.quantization import quantize
        from r1fast.fp8.support import torch_path

        ok, why = torch_path(device, scaling)
        if not ok:
            raise Skip(why)
        rowwise = scaling == "rowwise"
        e4m3, e5m2 = torch.float8_e4m3fn, torch.float8_e5m2
        x, w, dy = _tensors(*shape, dtype, device, False)
        # the NT operand pairs (A, B) of y = x @ W^T, dx = dy @ W, dW = dy^T @ x
        pairs = [((x, e4m3), (w, e4m3), True)]
        if mode != "fwd":
            pairs += [((dy, e5m2), (w.t(), e4m3), False), ((dy.t(), e5m2), (x.t(), e4m3), False)]
        calls = []
        for (a, a_dtype), (b, b_dtype), fast in pairs:
            qa, sa = quantize(a, a_dtype, rowwise)
            qb, sb = quantize(b, b_dtype, rowwise)
            if rowwise:  # the layouts _scaled_mm's rowwise kernel takes: (M, 1) and (1, N)
                sa, sb = sa.reshape(-1, 1).contiguous(), sb.reshape(1, -1).contiguous()
            calls.append((qa, qb.t(), sa, sb, fast and device.type == "cuda"))
        out_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

        def run():
            return [torch._scaled_mm(qa, qbt, scale_a=sa, scale_b=sb, out_dtype=out_dtype, use_fast_accum=fast)
                    for qa, qbt, sa, sb, fast in calls]
        try:
            run()
        except RuntimeError as e:
            raise Skip(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return run
    return setup


def _te(recipe, shape, dtype, device, mode):
    def setup():
        from r1fast.fp8.support import te_recipe_support
        from r1fast.fp8.te import te_linear_from

        if device.type != "cuda":
            raise Skip("Transformer Engine needs a CUDA device")
        ok, why = te_recipe_support(recipe)
        if not ok:
            raise Skip(why)
        m, k, n = shape
        x, w, dy = _tensors(m, k, n, dtype, device, mode != "fwd")
        base = torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype)
        layer = te_linear_from(base, recipe, "e5m2")
        return _timed(layer, x, layer.weight, dy, mode)
    return setup


@suite("fp8_linear")
def cases(size, device):
    """FP8 linear (torch._scaled_mm rowwise/tensorwise, Transformer Engine) vs bf16 F.linear."""
    if size == "gpu":
        # the decoder's fused gate/up projection (N = 2 x intermediate) and its down projection
        shapes = {"1.5B mlp_gate_up": (16384, 1536, 17920), "1.5B mlp_down": (16384, 8960, 1536),
                  "7B mlp_gate_up": (16384, 3584, 37888)}
        dtype, matmul_dtype = torch.bfloat16, "float8"
    else:
        shapes = {"tiny": (64, 64, 128)}
        dtype, matmul_dtype = torch.float32, None
    dense_floor = str(dtype).removeprefix("torch.")  # the bf16 row is held to the bf16 rate
    out = []
    for label, shape in shapes.items():
        m, k, n = shape
        for mode, gemms in (("fwd", 1), ("fwd_bwd", 3)):
            impls = []
            if device.type == "cuda":
                impls += [Impl("transformer_engine", f"fp8-te-{r}", _te(r, shape, dtype, device, mode),
                               requires=("transformer_engine",)) for r in ("current", "delayed")]
            else:
                impls.append(Impl("r1fast", "fp8-emulate", _ours("emulate", "rowwise", shape, dtype, device, mode)))
            # the table's speed-up column compares each peer with the fastest r1fast row
            impls += [Impl("r1fast", "fp8-torch-tensorwise", _ours("torch", "tensorwise", shape, dtype, device, mode)),
                      Impl("r1fast", "fp8-torch-rowwise", _ours("torch", "rowwise", shape, dtype, device, mode))]
            if device.type == "cuda":  # the GEMMs alone: what the rows above would take with free quantisation
                impls += [Impl("torch", f"fp8-scaled_mm-only-{s}", _scaled_mm_only(s, shape, dtype, device, mode))
                          for s in ("tensorwise", "rowwise")]
            impls.append(Impl("torch", f"{str(dtype).removeprefix('torch.')}-linear", _dense(shape, dtype, device, mode),
                              matmul_dtype=dense_floor))
            out.append(Case(f"{label} M={m} K={k} N={n}", mode, str(dtype).removeprefix("torch."), impls,
                            flops=2 * gemms * m * k * n, items=m, item_name="tokens", matmul_dtype=matmul_dtype))
    out.append(_step_case(size, device, dtype, matmul_dtype))
    return out


# ---------------------------------------------------------------- a model's training step


def _model_config(size):
    from r1fast.models import ModelConfig

    if size == "gpu":  # two decoder layers of Qwen2.5-1.5B's shape
        return ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=151936, hidden_size=1536,
                           intermediate_size=8960, num_hidden_layers=2, num_attention_heads=12,
                           num_key_value_heads=2), 4, 2048
    return ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2), 2, 16


def _step(size, device, dtype, fp8_mode):
    def setup():
        try:
            from r1fast.fp8 import apply_fp8
            from r1fast.models import CausalLM

            cfg, seqs, seqlen = _model_config(size)
            model = CausalLM(cfg).to(device=device, dtype=dtype)
            if fp8_mode != "off":
                ok = apply_fp8(model, fp8_mode).fp8_report.effective_mode == fp8_mode
                if not ok:
                    raise Skip(f"fp8 mode {fp8_mode} unavailable: {model.fp8_report.fallback_reason}")
            opt = torch.optim.SGD(model.parameters(), lr=1e-6)
            ids = torch.randint(0, cfg.vocab_size, (seqs * seqlen,), device=device)
            cu = torch.arange(0, seqs + 1, device=device, dtype=torch.int32) * seqlen

            def run():
                opt.zero_grad(set_to_none=True)
                model(ids, cu_seqlens=cu).float().square().mean().backward()
                opt.step()
            run()
            opt.zero_grad(set_to_none=True)  # the gradients belong in the call's peak memory, not its baseline
        except Skip:
            raise
        except Exception as e:  # the model package is another area: report, don't crash the suite
            raise Skip(f"model step failed: {type(e).__name__}: {e}")
        return run
    return setup


def _step_case(size, device, dtype, matmul_dtype):
    cfg, seqs, seqlen = _model_config(size)
    tokens, h, i = seqs * seqlen, cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    proj = h * h * 2 + h * kv * 2 + 3 * h * i          # q, o, k, v, gate, up, down
    flops = 6 * tokens * proj * cfg.num_hidden_layers   # the linear layers' GEMMs only
    impls = [Impl("r1fast", "fp8-emulate" if device.type != "cuda" else "fp8-torch-rowwise",
                  _step(size, device, dtype, "emulate" if device.type != "cuda" else "torch"))]
    if device.type == "cuda":
        impls.insert(0, Impl("transformer_engine", "fp8-te-current", _step(size, device, dtype, "te"),
                             requires=("transformer_engine",)))
    impls.append(Impl("torch", f"{str(dtype).removeprefix('torch.')}-model", _step(size, device, dtype, "off"),
                      matmul_dtype=str(dtype).removeprefix("torch.")))
    return Case(f"decoder step {cfg.num_hidden_layers}L h={h} i={i} T={tokens}", "step",
                str(dtype).removeprefix("torch."), impls, flops=flops, items=tokens, matmul_dtype=matmul_dtype)
