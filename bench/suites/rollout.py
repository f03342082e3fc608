"""rollout: generation with r1fast.rollout.Engine vs transformers generate on the same random model.

Cases:
- "generate": prompts x G samples, fixed prompt and completion lengths (stop tokens ignored);
  items = generated tokens. Floor: every decode step reads the weights once plus every distinct KV
  block in use (a prompt's, shared by its G samples, once), over the measured bandwidth.
  "engine, step by step" is the same engine with async_decode=False: each decode step waits for
  the last one's tokens before it is planned.
- "engine loop": the same generate() on a 2-layer model with a 256-token vocabulary, whose compute
  is negligible on a GPU: time per decode step is the engine's host work (scheduling, block tables,
  sampling, bookkeeping) and launch latency, which a real model's step pays on top of its kernels
  unless they hide it. No floor: items = decode steps.
- "decode step": one engine decode step (batch of B sequences at context C: embedding -> layers ->
  logits -> sampling), as the engine runs it (CUDA graphs on GPU). Floor: weight bytes + KV bytes.

Each engine row's backend names the decode attention the engine chose at start-up (decode_path), e.g.
"engine (decode triton+tiles)": on a GPU that choice is timed per card and shape, and a row's time
means little without it.
"""
import math

import torch

from r1fast.bench.harness import QWEN25_15B, Case, Impl, suite

ENGINE_BLOCK_SIZE = 16

TINY = dict(architecture="Qwen2ForCausalLM", vocab_size=256, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def _model(cfg_kwargs, dtype, device):
    from r1fast.models import CausalLM, ModelConfig

    with torch.device(device):
        model = CausalLM(ModelConfig(**cfg_kwargs)).to(dtype).eval()
    return model


def _prompts(num, length, vocab):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (num, length), generator=g).tolist()


def _params_read_per_step(model):
    """Parameters a forward step reads whole (and multiplies by each row): all but an untied input
    embedding, whose lookup reads the batch's rows only. Tied, the table is read whole once, as the lm_head."""
    total = sum(p.numel() for p in model.parameters())
    return total if model.lm_head is None else total - model.embed_tokens.weight.numel()


def _kv_bytes_per_token(cfg, dtype):
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * (torch.finfo(dtype).bits // 8)


def decode_path(engine) -> str:
    """The decode attention `engine` runs, for a row's backend_detail: "decode <backend>", "+tiles" where
    its steps pass the shared-prefix tiles (the start-up's choice on a GPU; the default backend elsewhere)."""
    from r1fast import backends

    runner = engine.runner
    name = runner.decode_backend or backends.resolve("paged_decode_attention", runner.device, dtype=runner.dtype)[0]
    return f"decode {name}" + ("+tiles" if runner.shared_prefix else "")


def _noting_decode_path(run, engine):
    """`run` with the engine's decode path as its backend_detail (the harness adds it to the rows' backend)."""
    run.backend_detail = decode_path(engine)
    return run


_engines = {}  # the step-by-step impl reuses the engine (model, KV pool, graphs) of the default one


def _r1fast_generate(cfg_kwargs, shape, dtype, device, async_decode=True):
    def setup():
        from r1fast.rollout import Engine, SamplingParams

        prompts_n, g, plen, new = shape
        key = (repr(sorted(cfg_kwargs.items())), shape, dtype, str(device))
        if key not in _engines:
            _engines.clear()  # one engine alive at a time
            model = _model(cfg_kwargs, dtype, device)
            _engines[key] = Engine(model, block_size=ENGINE_BLOCK_SIZE, max_num_seqs=prompts_n * g,
                                   max_model_len=plen + new + 1, max_num_batched_tokens=max(8192, plen))
        engine = _engines[key]
        prompts = _prompts(prompts_n, plen, engine.config.vocab_size)
        params = SamplingParams(n=g, temperature=1.0, max_tokens=new, seed=0, ignore_eos=True)

        def run():
            engine.async_decode = async_decode
            return engine.generate(prompts, params)
        return _noting_decode_path(run, engine)
    return setup


def _transformers_generate(cfg_kwargs, shape, dtype, device):
    def setup():
        import transformers

        from r1fast.models import ModelConfig

        prompts_n, g, plen, new = shape
        cfg = ModelConfig(**cfg_kwargs)
        hf_cfg = transformers.AutoConfig.for_model(cfg.model_type, **{
            k: v for k, v in cfg.to_hf_config(dtype).items() if k != "model_type"})
        hf_cfg._attn_implementation = "sdpa"
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype).eval()
        ids = torch.tensor(_prompts(prompts_n, plen, cfg.vocab_size), device=device)
        mask = torch.ones_like(ids)

        def run():
            with torch.no_grad():
                return model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                      num_return_sequences=g, max_new_tokens=new, min_new_tokens=new,
                                      pad_token_id=0, eos_token_id=None)
        return run
    return setup


def _r1fast_decode_step(cfg_kwargs, batch, ctx, dtype, device):
    def setup():
        import numpy as np

        from r1fast.rollout import Engine, SamplingParams

        model = _model(cfg_kwargs, dtype, device)
        engine = Engine(model, block_size=ENGINE_BLOCK_SIZE, max_num_seqs=batch, max_model_len=ctx + 1,
                        num_blocks=batch * math.ceil((ctx + 1) / ENGINE_BLOCK_SIZE) + 1)
        bm, runner = engine.block_manager, engine.runner
        vocab = model.config.vocab_size
        ids = np.arange(batch, dtype=np.int64)
        rng = np.random.default_rng(0)
        for i in ids:
            bm.allocate(int(i), rng.integers(0, vocab, ctx - 1, dtype=np.int32))
        slots, _ = bm.append_batch(ids, rng.integers(0, vocab, batch, dtype=np.int32))
        runner.kv.normal_()
        last = rng.integers(0, vocab, batch).tolist()
        positions = [ctx - 1] * batch
        params = SamplingParams(temperature=1.0, seed=0)
        from r1fast import ops
        from r1fast.rollout import sampler
        from r1fast.rollout.runner import lm_logits

        host_uniforms = sampler.HostUniforms(ctx + 1)
        keys, pos = np.arange(batch), np.full(batch, ctx)

        @torch.no_grad()   # as the engine samples: no autograd graph for the lm_head's logits
        def step():
            hidden = runner.decode(bm, ids, positions, slots, last_tokens=last)
            # the step's uniforms as the engine makes them: hashed on the host, one copy
            u = torch.from_numpy(host_uniforms(keys, pos)).to(device, non_blocking=True)
            return ops.sample_tokens(lm_logits(hidden, model.lm_head_weight), params, u, check_inputs=False)
        return _noting_decode_path(step, engine)
    return setup


@suite("rollout", "Engine.generate vs transformers generate; floor = (weights + KV read) per decode step")
def cases(size, device):
    if size == "gpu":
        cfg, dtype = QWEN25_15B, torch.bfloat16
        gen_shape = (64, 8, 256, 512)          # prompts, G, prompt tokens, new tokens
        step_shapes = [(512, 512), (512, 768)]  # batch, context
    else:
        cfg, dtype = TINY, torch.float32
        gen_shape = (4, 2, 16, 16)
        step_shapes = [(8, 32)]
    from r1fast.models import ModelConfig

    mcfg = ModelConfig(**cfg)
    es = torch.finfo(dtype).bits // 8
    wbytes = _params_read_per_step(_model(cfg, dtype, "meta")) * es
    kv_tok = _kv_bytes_per_token(mcfg, dtype)
    prompts_n, g, plen, new = gen_shape
    seqs = prompts_n * g
    # every decode step: weights once + each prompt's full blocks once + every sample's own tokens so far
    # (a partial last prompt block is copied to each sample on its first decode step)
    shared = plen // ENGINE_BLOCK_SIZE * ENGINE_BLOCK_SIZE
    gen_bytes = new * wbytes + kv_tok * sum(prompts_n * shared + seqs * (plen - shared + t) for t in range(new))
    params = wbytes / es
    gen_flops = 2 * params * (prompts_n * plen + seqs * new)
    dt = str(dtype).removeprefix("torch.")
    out = [Case(f"generate {prompts_n}x{g} prompt={plen} new={new}", "step", dt,
                [Impl("r1fast", "engine", _r1fast_generate(cfg, gen_shape, dtype, device)),
                 # a GPU-size transformers generation takes tens of seconds and compiles nothing: one timed call.
                 # Before the step-by-step ablation: the peer's figure is issue 5's, and a suite cut by its
                 # --suite-box loses what comes last.
                 Impl("transformers", "generate", _transformers_generate(cfg, gen_shape, dtype, device),
                      requires=("transformers",), **(dict(warmup=0, reps=1) if size == "gpu" else {})),
                 # decode steps not planned ahead: what overlapping the host's work with the GPU's saves. It
                 # runs on the engine the first impl warmed up (graphs captured, kernels compiled).
                 Impl("r1fast", "engine, step by step", _r1fast_generate(cfg, gen_shape, dtype, device, False),
                      **(dict(warmup=0, reps=2) if size == "gpu" else {}))],
                flops=gen_flops, bytes=gen_bytes, items=seqs * new, item_name="tokens",
                # each step's GEMMs (compute-bound at these batches), then its attention (KV reads)
                phases=[(gen_flops, new * wbytes), (0.0, gen_bytes - new * wbytes)],
                # A whole generation takes seconds at GPU size: one warm-up, three timed calls.
                warmup=1, reps=3)]
    # the decode steps (issue 5's figure against its floor) before the engine-loop ablation: a suite cut by
    # its --suite-box loses what comes last
    for batch, ctx in step_shapes:
        # Two phases one after the other: the GEMMs (weights read once, 2·params FLOPs per row), then
        # attention over each row's context (its KV read) and the sampler (fp32 logits written and read).
        attn_flops = 4 * batch * ctx * mcfg.num_attention_heads * mcfg.head_dim * mcfg.num_hidden_layers
        attn_bytes = batch * ctx * kv_tok + 2 * batch * mcfg.vocab_size * 4
        out.append(Case(f"decode step batch={batch} ctx={ctx}", "step", dt,
                        [Impl("r1fast", "engine", _r1fast_decode_step(cfg, batch, ctx, dtype, device))],
                        flops=2 * params * batch + attn_flops, bytes=wbytes + attn_bytes, items=batch,
                        item_name="tokens", phases=[(2 * params * batch, wbytes), (attn_flops, attn_bytes)]))
    tiny_shape = (prompts_n, g, 16, 128) if size == "gpu" else (4, 2, 16, 16)
    out.append(Case(f"engine loop {tiny_shape[0]}x{tiny_shape[1]} tiny model new={tiny_shape[3]}", "step", dt,
                    [Impl("r1fast", "engine", _r1fast_generate(TINY, tiny_shape, dtype, device)),
                     Impl("r1fast", "engine, step by step", _r1fast_generate(TINY, tiny_shape, dtype, device, False))],
                    items=tiny_shape[3], item_name="steps", warmup=1, reps=3))
    return out
