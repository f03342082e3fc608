"""grpo_step: one whole GRPO step (rollout, rewards, log-probs, loss+backward, optimizer), r1fast's
GRPOTrainer vs TRL's GRPOTrainer on the same model weights, batch and lengths, plus r1fast's step
broken into its phases (timed first, on one trainer and rollout that r1fast's step case then takes over).

Both trainers sample `prompts × G` completions of exactly `new` tokens (the stop token is never
sampled: a reward-free constant-length setup, so both do the same work), score them with the same
reward function, and take one AdamW step (loss_type dapo, beta 0, num_iterations 1). TRL generates
with transformers' `generate` (no vLLM here). GPU size: a Qwen2.5-1.5B-shaped model (random
weights, bf16), 64 prompts × G = 8, 512 new tokens.

The GPU size has Qwen's vocabulary (151936: the built-in character tokenizer padded with filler
tokens, so both trainers decode whatever is sampled), so the lm_head, sampling over it and the
logits are in both steps. Both train the rollout in micro-batches of the same size (TRL:
per_device_train_batch_size with gradient accumulation, one generation per step), where one
micro-batch of all 512 completions would hold ~80 GB of TRL's bf16 logits.
"""
from __future__ import annotations

import gc
import math
from types import SimpleNamespace

import torch

from r1fast.bench import harness
from r1fast.bench.harness import Case, Impl, Skip, suite
from r1fast.bench.suites.rollout import decode_path

# 4096 positions, not 32768: the rollout engine's max_model_len (and with it its KV pool) defaults to this,
# and the step's sequences (short prompts, 512 new tokens) are far shorter
QWEN25_15B = {**harness.QWEN25_15B, "max_position_embeddings": 4096}
TINY = dict(architecture="Qwen2ForCausalLM", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


# Completions per micro-batch, both trainers: at GPU size ~17k tokens, ~50 GB of saved activations (the
# GPU size's 512 x ~520 tokens in one backward would save ~113 KB per token per layer, ~840 GB). The
# smoke size takes two micro-batches, so the accumulation paths run on a CPU too.
MICRO = {"gpu": 32, "smoke": 8}


def _length_reward(prompts, completions, **kw):
    return [float(len(c) % 7) for c in completions]


def _checkpoint(shape, dtype):
    """An HF-format folder (weights + the built-in char tokenizer) both trainers load."""
    from r1fast.data import build_char_tokenizer
    from r1fast.models import CausalLM, ModelConfig

    tok = build_char_tokenizer(vocab_size=shape.get("vocab_size"))
    # no eos: every completion runs to max length in both trainers
    cfg = ModelConfig(**{**shape, "vocab_size": len(tok)}, bos_token_id=tok.bos_token_id, eos_token_id=None)
    model = CausalLM(cfg)
    model.reset_parameters(seed=0)
    path = harness.temp_dir("r1fast-bench-grpo-")
    model.to(dtype).save_pretrained(path)
    tok.save_pretrained(path)
    return path, tok


def _prompts(n):
    return [{"prompt": f"{i}+{i + 1}=", "answer": str(2 * i + 1)} for i in range(n)]


def _r1fast_trainer(shape, prompts, G, new, dtype, device, mb):
    from r1fast.models import from_pretrained
    from r1fast.trainer import GRPOConfig, GRPOTrainer

    path, tok = _checkpoint(shape, dtype)
    model = from_pretrained(path, dtype=dtype, device=device)
    # one rollout of prompts x G completions, trained as micro-batches of mb completions
    cfg = GRPOConfig(per_device_train_batch_size=mb, gradient_accumulation_steps=prompts * G // mb,
                     num_generations=G, max_completion_length=new,
                     max_prompt_length=32, learning_rate=1e-5, loss_type="dapo", beta=0.0, progress_bar=False,
                     output_dir=harness.temp_dir("r1fast-bench-grpo-run-"), tis_mode="none",
                     dtype={torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype])
    tr = GRPOTrainer(model, [_length_reward], _prompts(max(prompts, 64)), cfg, tokenizer=tok)
    tr.stop_ids = []      # run every completion to `new` tokens, like TRL below
    return tr


class _SharedRun:
    """One r1fast trainer and one rollout of it, for the phase cases and then the step case. Each phase case built
    its own (a checkpoint made and saved, loaded, the engine started and warmed: ~40 s apiece at GPU size, which
    put the phases past the suite's time box); they now time parts of one trainer, and the step case steps that
    trainer and lets it go (release), so that TRL's step after it has the memory."""

    def __init__(self, spec):
        self.spec = spec
        self._state: SimpleNamespace | None = None

    def get(self) -> SimpleNamespace:
        if self._state is None:
            self._state = _rollout_state(*self.spec)
        return self._state

    def release(self) -> None:
        self._state = None


def _rollout_state(shape, prompts, G, new, dtype, device, mb) -> SimpleNamespace:
    """A trainer, one rollout of its first `prompts` rows and what its step derives from it (rewards,
    advantages, micro-batches, loss options), as GRPOTrainer.step computes them."""
    from r1fast.data.loading import decode_completions
    from r1fast.trainer.grpo import MicroBatches, accumulation_scale, micro_batch_indices

    tr = _r1fast_trainer(shape, prompts, G, new, dtype, device, mb)
    rows, keys = tr.train_rows[:prompts], list(range(prompts))
    tr.model.eval()
    p_ids, c_ids, c_logp, finish = tr.generate(rows, keys, G, tr.cfg.temperature, 0)   # starts the engine
    tr.engine.reset_prefix_cache()   # as a step ends: the timed rollouts start without cached prompts
    texts = decode_completions(tr.tokenizer, c_ids, tr.end_ids)
    _, totals = tr.score(rows, G, texts, c_ids)
    # the trainer's micro-batches (see _r1fast_trainer), as its step makes them (no completion masked)
    micro = micro_batch_indices(len(c_ids), mb)
    inputs = MicroBatches(micro, p_ids, c_ids, c_logp, [True] * len(c_ids), tr.device, tr.share_prompts)
    opts = tr.cfg.loss_options(float(sum(len(c) for c in c_ids)))
    return SimpleNamespace(tr=tr, rows=rows, keys=keys, c_ids=c_ids, micro=micro, inputs=inputs,
                           adv=tr._advantages(totals).to(tr.device), opts=opts,
                           scale=accumulation_scale(opts.loss_type, len(micro)))


def _r1fast_step(*spec, shared: _SharedRun | None = None):
    def setup():
        run = shared or _SharedRun(spec)
        tr = run.get().tr
        run.release()   # the timed step holds the trainer now, and frees it when the harness lets it go
        tr.step()   # warm the engine and the training kernels (the phases before may not have run)

        def step():
            tr.step()
        step.backend_detail = decode_path(tr.engine)
        return step
    return setup


def _r1fast_phase(phase, *spec, shared: _SharedRun | None = None):
    """One phase of r1fast's step on a fixed rollout, to show where a step's time goes: each runs the
    trainer's own code for it (num_iterations 1, beta 0: no old-policy or reference pass; "logprobs" times
    the old-policy pass a step with num_iterations > 1 adds)."""
    def setup():
        from r1fast.data.loading import decode_completions
        from r1fast.trainer.common import gradient_holders, step_if_finite, unscale_and_clip

        s = (shared or _SharedRun(spec)).get()
        tr, G = s.tr, s.tr.cfg.num_generations
        if phase == "rollout":
            def rollout():
                tr.model.eval()
                tr.generate(s.rows, s.keys, G, tr.cfg.temperature, 0)
                tr.engine.reset_prefix_cache()
            rollout.backend_detail = decode_path(tr.engine)   # (_rollout_state started the engine)
            return rollout
        if phase == "rewards":
            def rewards():
                texts = decode_completions(tr.tokenizer, s.c_ids, tr.end_ids)
                _, totals = tr.score(s.rows, G, texts, s.c_ids)
                return tr._advantages(totals).to(tr.device)
            return rewards
        if phase == "logprobs":
            return lambda: [tr._forward_logp(tr.model, s.inputs[j].batch) for j in range(len(s.micro))]
        none = [None] * len(s.micro)

        def loss_backward():
            tr.model.train()
            tr.optimizer.zero_grad(set_to_none=True)
            return tr._loss_backward(s.inputs, s.micro, s.adv, none, none, s.opts, s.scale, 1.0)
        if phase == "loss+backward":
            return loss_backward
        loss_backward()
        # the pass's gradients, put back before each timed step: the optimizer drops them (fp32 master
        # weights free their gradients after a step), and a step without them would time nothing
        holders = gradient_holders(tr.optimizer, tr.model)
        grads = [h.grad for h in holders]

        def optimizer():
            for h, g in zip(holders, grads):
                h.grad = g
            norm = unscale_and_clip(tr)
            step_if_finite(tr, math.isfinite(norm))
            tr.scheduler.step()
        return optimizer
    return setup


def _trl_step(shape, prompts, G, new, dtype, device, mb, shared: _SharedRun | None = None):
    def setup():
        if shared is not None:   # r1fast's trainer (in reference cycles) gone before TRL loads its own
            shared.release()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        import datasets
        import trl
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path, _ = _checkpoint(shape, dtype)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        tok = AutoTokenizer.from_pretrained(path)
        args = trl.GRPOConfig(
            output_dir=harness.temp_dir("r1fast-bench-trl-"), per_device_train_batch_size=mb,
            gradient_accumulation_steps=prompts * G // mb,   # one generation of prompts x G per optimizer step
            num_generations=G, max_completion_length=new, learning_rate=1e-5, loss_type="dapo", beta=0.0,
            bf16=dtype == torch.bfloat16, report_to="none", use_cpu=device.type == "cpu", disable_tqdm=True,
            save_strategy="no", max_steps=10**6, logging_steps=10**6,
            generation_kwargs={"min_new_tokens": new},
        )
        trainer = trl.GRPOTrainer(model=model, reward_funcs=_length_reward, args=args, processing_class=tok,
                                  train_dataset=datasets.Dataset.from_list(_prompts(max(prompts, 64))))
        if trainer.accelerator.device.type != device.type:
            raise Skip(f"TRL placed itself on {trainer.accelerator.device}, not {device}")
        trainer.create_optimizer()
        accumulation = trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
        batches = iter(trainer.get_train_dataloader())

        def step():
            # as Trainer's loop: one dataloader item per accumulation step (TRL's sampler repeats the
            # generation batch that many times; it generates on the first and slices its buffer after)
            nonlocal batches
            for _ in range(accumulation):
                try:
                    batch = next(batches)
                except StopIteration:
                    batches = iter(trainer.get_train_dataloader())
                    batch = next(batches)
                trainer.training_step(trainer.model, batch, None)
            torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1.0)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)

        step()  # warm-up (first generation compiles nothing but allocates)
        return step
    return setup


@suite("grpo_step")
def cases(size, device):
    """Whole GRPO step (rollout+rewards+logprobs+loss+optimizer) vs TRL's GRPOTrainer, and its phases."""
    if harness.gpu_size(size, device):
        shape, prompts, G, new, dtype = QWEN25_15B, 64, 8, 512, torch.bfloat16
    else:
        shape, prompts, G, new, dtype = TINY, 4, 4, 16, torch.float32
    spec = (shape, prompts, G, new, dtype, device, min(prompts * G, MICRO[size]))
    dname = str(dtype).removeprefix("torch.")
    name = (f"Qwen2 h={shape['hidden_size']} L={shape['num_hidden_layers']} V={shape.get('vocab_size', 'chars')} "
            f"{prompts}x{G} new={new} micro={spec[-1]}")
    tokens = prompts * G * new
    # a GPU-size step takes seconds (TRL: minutes), so fixed repeats there; a smoke step (~0.1-0.3 s) repeats
    # as --budget says (at least 5): on a shared CPU 5 repeats alone moved the r1fast / TRL ratio by a third
    # between runs. The step cases' setups take one warm-up step; a phase's first call warms it.
    reps = dict(warmup=0, reps=2) if size == "gpu" else dict(warmup=1)
    phase_reps = dict(warmup=1, reps=2) if size == "gpu" else dict(warmup=1)
    # TRL's GPU-size step takes about a minute: its setup's step warms it, one timed step follows
    slow_peer = dict(reps=1) if size == "gpu" else {}
    # the phases first, from one trainer and rollout, which the r1fast step then takes over and frees before
    # TRL's step: the phases' ~40 s setup once, not five times, and never two trainers at once
    shared = _SharedRun(spec)
    out = [Case(f"{name} phase={phase}", "step", dname,
                [Impl("r1fast", "engine+fused", _r1fast_phase(phase, *spec, shared=shared))], items=tokens,
                item_name="tokens", **phase_reps)
           for phase in ("rollout", "rewards", "logprobs", "loss+backward", "optimizer")]
    out.append(Case(name, "step", dname,
                    [Impl("r1fast", "engine+fused", _r1fast_step(*spec, shared=shared)),
                     Impl("trl", "hf-generate", _trl_step(*spec, shared=shared), requires=("trl", "datasets"),
                          **slow_peer)],
                    items=tokens, item_name="tokens", **reps))
    return out
