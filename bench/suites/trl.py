"""trl: TRL's GRPOTrainer vs the same trainer with r1fast swapped in (r1fast.integrations.trl).

Both trainers get the same model weights and the same generated batch; what is timed is the part
the swap changes: one training micro-step (`compute_loss` + backward, mode "step") and the
old-policy log-prob pass over the batch (mode "fwd"). GPU size: Qwen2.5-1.5B's shape (vocab 151936,
tied head, random weights), bf16, 8 completions of 1024 tokens after 128-token prompts.
Mode "generate" times one generation batch (`_generate_single_turn`: one prompt, 8 samples of 256
tokens at GPU size) with transformers' generate, as stock TRL runs it, and with r1fast's rollout
engine (`r1fast_generation=True`); rewards are left out. Items count every sample at full length;
a sample that draws an eos early ends sooner in both (rare with random weights and a large vocabulary).
In the "step" and "fwd" cases the completions have lengths C/2 to C (a completion mask): items and the
lm_head's FLOPs count the tokens inside the mask only (at GPU size 5,270 of 8 x 1024 positions).
"""
from __future__ import annotations

import torch

from r1fast.bench.harness import Case, Impl, Skip, gpu_size, suite, temp_dir

QWEN25_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, layers=28, heads=12, kv_heads=2,
                  tie_word_embeddings=True)
TINY = dict(vocab_size=None, hidden_size=64, intermediate_size=128, layers=2, heads=4, kv_heads=2,
            tie_word_embeddings=False)


def _model(shape, dtype, device):
    from transformers import Qwen2ForCausalLM

    from r1fast.integrations.toy import char_tokenizer, qwen2_config

    tokenizer = char_tokenizer()
    cfg = qwen2_config(tokenizer=tokenizer, **shape)
    cfg.max_position_embeddings = 4096
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(dtype)
    model.train()
    return model, tokenizer


def _batch(vocab, batch, prompt_len, completion_len, device):
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(4, vocab, (batch, prompt_len), generator=g)
    completion_ids = torch.randint(4, vocab, (batch, completion_len), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[: batch // 2, : prompt_len // 4] = 0  # left padding on half the prompts
    lengths = torch.randint(completion_len // 2, completion_len + 1, (batch,), generator=g)
    completion_mask = (torch.arange(completion_len)[None] < lengths[:, None]).long()
    advantages = torch.randn(batch, generator=g)
    return {
        "prompt_ids": prompt_ids.to(device), "prompt_mask": prompt_mask.to(device),
        "completion_ids": completion_ids.to(device), "completion_mask": completion_mask.to(device),
        "advantages": advantages.to(device), "num_items_in_batch": completion_mask.sum().to(device),
    }


def _trainer(provider, shape, batch, prompt_len, completion_len, dtype, device, generation=False):
    """A trainer (stock or r1fast) on a fresh model, and a generated-looking batch with old log-probs."""
    import datasets
    import trl

    from r1fast.integrations import trl as r1trl

    model, tokenizer = _model(shape, dtype, device)
    args = trl.GRPOConfig(
        output_dir=temp_dir("r1fast-bench-trl-"), per_device_train_batch_size=batch,
        num_generations=batch, max_completion_length=completion_len, bf16=False, gradient_checkpointing=False,
        report_to="none", loss_type="dapo", beta=0.0, num_iterations=2, use_cpu=device.type == "cpu",
        disable_tqdm=True, save_strategy="no",
    )
    cls, extra = (r1trl.GRPOTrainer, {"r1fast_generation": generation}) if provider == "r1fast" else (trl.GRPOTrainer, {})
    trainer = cls(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                  train_dataset=datasets.Dataset.from_dict({"prompt": ["a"] * batch}), processing_class=tokenizer,
                  **extra)
    if trainer.accelerator.device.type != device.type:
        raise Skip(f"the trainer placed itself on {trainer.accelerator.device}, not {device}")
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); the bench calls compute_loss directly
    inputs = _batch(model.config.vocab_size, batch, prompt_len, completion_len, device)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    return trainer, model, inputs, ids, mask


def _step(provider, *spec):
    def setup():
        trainer, model, inputs, ids, mask = _trainer(provider, *spec)
        with torch.no_grad():  # the old policy's log-probs, as num_iterations=2 would store them
            inputs["old_per_token_logps"] = trainer._get_per_token_logps_and_entropies(
                model, ids, mask, inputs["completion_ids"].shape[1])[0] - 0.01

        def step():
            model.zero_grad(set_to_none=True)
            trainer.compute_loss(model, inputs).backward()
        return step
    return setup


def _old_logps(provider, *spec):
    def setup():
        trainer, model, inputs, ids, mask = _trainer(provider, *spec)
        keep = inputs["completion_ids"].shape[1]

        def fwd():
            with torch.no_grad():
                trainer._get_per_token_logps_and_entropies(model, ids, mask, keep)
        return fwd
    return setup


def _generate(provider, *spec):
    def setup():
        trainer, model, inputs, _, _ = _trainer(provider, *spec, generation=provider == "r1fast")
        batch = inputs["prompt_ids"].shape[0]
        prompts = [inputs["prompt_ids"][0].tolist()] * batch  # one prompt, once per sample, as TRL batches it
        model.eval()

        def run():
            return trainer._generate_single_turn(prompts, None, {}, batch)
        return run
    return setup


def _flops(shape, vocab, tokens, completion_tokens, backward):
    h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["layers"]
    hd = h // shape["heads"]
    per_layer = h * (h + 2 * shape["kv_heads"] * hd) + h * h + 3 * h * i
    passes = 6 if backward else 2
    return passes * (per_layer * layers * tokens + vocab * h * completion_tokens), per_layer * layers + vocab * h


@suite("trl")
def cases(size, device):
    """TRL GRPOTrainer step time and peak memory, stock vs r1fast swapped in (Qwen2.5-1.5B shape on GPU)."""
    if gpu_size(size, device):
        shape, batch, prompt_len, completion_len, dtype = QWEN25_15B, 8, 128, 1024, torch.bfloat16
    else:
        shape, batch, prompt_len, completion_len, dtype = TINY, 4, 8, 16, torch.float32
    from r1fast.integrations.toy import char_tokenizer

    vocab = shape["vocab_size"] or len(char_tokenizer())
    spec = (shape, batch, prompt_len, completion_len, dtype, device)
    tokens = batch * (prompt_len + completion_len)
    # the completions' own tokens (mask = 1; lengths C/2 to C): the log-probs and the loss need only these,
    # r1fast's fused loss touches only these, and they are the tokens generated, so the items too
    completion_tokens = int(_batch(vocab, batch, prompt_len, completion_len, "cpu")["completion_mask"].sum())
    elt = torch.finfo(dtype).bits // 8
    name = f"Qwen2 h={shape['hidden_size']} L={shape['layers']} V={vocab} B={batch} T={prompt_len}+{completion_len}"
    out = []
    for mode, make, backward in (("step", _step, True), ("fwd", _old_logps, False)):
        flops, params = _flops(shape, vocab, tokens, completion_tokens, backward)
        impls = [Impl("r1fast", "trl+r1fast", make("r1fast", *spec), requires=("trl",)),
                 Impl("trl", "trl", make("trl", *spec), requires=("trl",))]
        out.append(Case(name, mode, str(dtype).removeprefix("torch."), impls, flops=flops,
                        bytes=(3 if backward else 1) * params * elt, items=completion_tokens, item_name="tokens"))
    gen_len = 256 if size == "gpu" else completion_len
    gen_spec = (shape, batch, prompt_len, gen_len, dtype, device)
    slow = dict(warmup=0, reps=1) if size == "gpu" else {}  # transformers' generate: seconds per call at GPU size
    out.append(Case(f"Qwen2 h={shape['hidden_size']} L={shape['layers']} V={vocab} 1 prompt x {batch} T={prompt_len}+{gen_len}",
                    "generate", str(dtype).removeprefix("torch."),
                    [Impl("r1fast", "trl+r1fast engine", _generate("r1fast", *gen_spec), requires=("trl",)),
                     Impl("trl", "trl generate", _generate("trl", *gen_spec), requires=("trl",), **slow)],
                    items=batch * gen_len, item_name="tokens"))
    return out
