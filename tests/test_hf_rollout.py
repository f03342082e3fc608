"""r1fast's rollout engine generating for a transformers model (r1fast.integrations.hf_rollout), and
through it for TRL's GRPOTrainer (r1fast_generation=True)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("r1fast._C")

from r1fast.integrations.hf_rollout import HFRollout  # noqa: E402
from r1fast.integrations.toy import save_tiny_qwen2  # noqa: E402
from r1fast.rollout import SamplingParams  # noqa: E402

PROMPTS = [[1, 5, 7], [3, 4, 9, 10, 11], [2]]


@pytest.fixture(scope="module", params=["untied", "tied"])
def hf_model(request, tmp_path_factory):
    path = save_tiny_qwen2(tmp_path_factory.mktemp(request.param), seed=3,
                           tie_word_embeddings=request.param == "tied")
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _hf_greedy(model, prompt, new):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                         min_new_tokens=new, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def test_greedy_tokens_equal_transformers_generate(hf_model):
    rollout = HFRollout(hf_model, block_size=4, num_blocks=64)
    batch = [p for p in PROMPTS for _ in range(2)]  # each prompt once per sample, as a GRPO batch lists them
    got = rollout.generate(batch, SamplingParams(n=2, temperature=0, max_tokens=7, ignore_eos=True))
    assert got == [_hf_greedy(hf_model, p, 7) for p in batch]
    assert rollout.engine.last_stats["prefill"] >= 1
    # a batch that is not in runs of n identical prompts: one sample each
    mixed = [PROMPTS[0], PROMPTS[1]]
    assert rollout.generate(mixed, SamplingParams(n=2, temperature=0, max_tokens=3, ignore_eos=True)) == \
        [_hf_greedy(hf_model, p, 3) for p in mixed]


def test_a_ministral_built_from_a_mistral_config_is_refused_by_its_model_type():
    # AutoModelForCausalLM builds a MinistralForCausalLM from a mistral config.json with layer_types; its config
    # keeps architectures=['MistralForCausalLM'], and the refusal told the user to make the two agree
    cfg = transformers.AutoConfig.for_model("ministral", vocab_size=30, hidden_size=32, intermediate_size=40,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            head_dim=8, layer_types=["full_attention", "sliding_attention"])
    cfg.architectures = ["MistralForCausalLM"]
    with pytest.raises(ValueError, match=r"cannot run MinistralForCausalLM: config.json: unsupported model_type "
                                         r"'ministral' \(transformers builds the model from model_type"):
        HFRollout(transformers.AutoModelForCausalLM.from_config(cfg), block_size=4, num_blocks=8)


def test_a_custom_code_class_with_a_supported_config_is_refused(hf_model):
    """A checkpoint's own modeling code (auto_map, loaded with trust_remote_code=True) with a qwen2 config and
    Qwen2's parameter names was decoded as r1fast's Qwen2: the engine sampled from another model than the trained one."""
    from torch import nn

    class CustomForCausalLM(transformers.Qwen2PreTrainedModel, transformers.GenerationMixin):
        def __init__(self, config):
            super().__init__(config)
            self.model = transformers.Qwen2Model(config)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    custom = CustomForCausalLM(hf_model.config)
    with pytest.raises(ValueError, match=r"decodes transformers' Qwen2ForCausalLM; the model is .*CustomForCausalLM, "
                                         r"another implementation \(custom code"):
        HFRollout(custom, block_size=4, num_blocks=8)
    HFRollout(hf_model, block_size=4, num_blocks=8)  # transformers' own class


def test_custom_code_subclassing_the_transformers_class_is_refused(hf_model):
    """Custom code loaded with trust_remote_code=True (transformers imports it as transformers_modules.<checkpoint>.
    <file>) often subclasses transformers' class and overrides its forward: isinstance passed, and the engine
    decoded transformers' Qwen2 (a checkpoint whose forward negates the logits gave other greedy tokens than its
    generate, without a word)."""
    sub = type("SubQwen2ForCausalLM", (transformers.Qwen2ForCausalLM,),
               {"__module__": "transformers_modules.ckpt.modeling_sub"})
    with pytest.raises(ValueError, match=r"the model is transformers_modules\.ckpt\.modeling_sub\.SubQwen2ForCausalLM, "
                                         r"another implementation \(custom code"):
        HFRollout(sub(hf_model.config), block_size=4, num_blocks=8)
    mine = type("MyQwen2ForCausalLM", (transformers.Qwen2ForCausalLM,), {"__module__": "my_project.models"})
    HFRollout(mine(hf_model.config), block_size=4, num_blocks=8)  # a subclass of the user's own: theirs to judge


def test_a_torch_compiled_model_is_decoded_as_the_module_it_wraps(hf_model):
    """torch.compile(model) is an OptimizedModule around the model (its parameters named _orig_mod.*): it was refused
    as "another implementation (custom code ...)". It computes what the wrapped module computes, so the engine
    decodes that module, aliasing its tensors; custom code inside the wrapper is still refused."""
    compiled = torch.compile(hf_model)
    rollout = HFRollout(compiled, block_size=4, num_blocks=64)
    assert rollout.model.embed_tokens.weight is hf_model.model.embed_tokens.weight
    batch = [p for p in PROMPTS for _ in range(2)]
    got = rollout.generate(batch, SamplingParams(n=2, temperature=0, max_tokens=5, ignore_eos=True))
    assert got == [_hf_greedy(hf_model, p, 5) for p in batch]
    sub = type("SubQwen2ForCausalLM", (transformers.Qwen2ForCausalLM,),
               {"__module__": "transformers_modules.ckpt.modeling_sub"})
    with pytest.raises(ValueError, match=r"the model is transformers_modules\.ckpt\.modeling_sub\.SubQwen2ForCausalLM"):
        HFRollout(torch.compile(sub(hf_model.config)), block_size=4, num_blocks=8)


def test_weight_updates_are_read_in_place_or_after_sync(hf_model):
    """The engine's model aliases every transformers tensor it can (updates seen at once); the fused
    q/k/v and gate/up copies follow after sync()."""
    import copy

    model = copy.deepcopy(hf_model)
    rollout = HFRollout(model, block_size=4, num_blocks=64)
    ids = torch.tensor(PROMPTS[1])
    cu = torch.tensor([0, len(ids)], dtype=torch.int32)

    def hidden_of_both():
        with torch.no_grad():
            ours = rollout.model(ids, cu_seqlens=cu)
            theirs = model.model(input_ids=ids[None]).last_hidden_state[0]
        return ours, theirs

    ours, theirs = hidden_of_both()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert rollout.model.embed_tokens.weight is model.model.embed_tokens.weight  # the same tensor
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an "optimizer step"
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    ours, theirs = hidden_of_both()
    assert not torch.allclose(ours, theirs, rtol=1e-3, atol=1e-3)  # the fused copies are stale
    rollout.sync()
    ours, theirs = hidden_of_both()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_bf16_decoding_of_fp32_weights_copies_every_parameter(hf_model):
    rollout = HFRollout(hf_model, dtype=torch.bfloat16, block_size=4, num_blocks=64)
    assert all(p.dtype == torch.bfloat16 for p in rollout.model.parameters())
    assert rollout.model.embed_tokens.weight is not hf_model.model.embed_tokens.weight
    torch.testing.assert_close(rollout.model.embed_tokens.weight.float(), hf_model.model.embed_tokens.weight,
                               rtol=1e-2, atol=1e-2)


def test_unsupported_models_are_clear_errors(hf_model):
    import copy

    with pytest.raises(TypeError, match="transformers causal LM"):
        HFRollout(torch.nn.Linear(3, 3))
    spread = copy.deepcopy(hf_model)
    spread.model.norm.weight = torch.nn.Parameter(spread.model.norm.weight.detach().to("meta"))
    with pytest.raises(ValueError, match="on one device"):
        HFRollout(spread)
    extra = copy.deepcopy(hf_model)
    extra.model.layers[0].mlp.register_parameter("scale", torch.nn.Parameter(torch.ones(3)))
    with pytest.raises(ValueError, match="would not use.*mlp.scale"):
        HFRollout(extra)


# ---- TRL's GRPOTrainer with r1fast_generation=True ----------------------------------------------


def _trainer(path, tmp_path, trainer_kwargs=None, model_setup=None, **overrides):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from r1fast.integrations import trl as r1trl

    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                   max_completion_length=6, max_steps=3, logging_steps=1, bf16=False, learning_rate=0.05, optim="sgd",
                   report_to="none", seed=0, save_strategy="no", loss_type="dapo", beta=0.0,
                   dataloader_num_workers=0, disable_tqdm=True)
    options.update(overrides)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if model_setup is not None:
        model_setup(model)
    return r1trl.GRPOTrainer(
        model=model, reward_funcs=lambda completions, **kw: [c.count("a") + 0.1 * len(c) for c in completions],
        args=trl.GRPOConfig(**options), train_dataset=Dataset.from_dict({"prompt": ["ab 1+2=", "hello", "q", "zz"] * 4}),
        processing_class=tokenizer, r1fast_generation=True, **(trainer_kwargs or {}))


def test_trl_trainer_generates_with_the_engine_and_trains(tmp_path, monkeypatch):
    path = save_tiny_qwen2(tmp_path / "m", seed=0)
    trainer = _trainer(path, tmp_path / "run")
    calls = []
    generate = HFRollout.generate

    def spy(self, prompt_ids, params):
        out = generate(self, prompt_ids, params)
        calls.append((len(prompt_ids), params, out))
        return out

    monkeypatch.setattr(HFRollout, "generate", spy)
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert len(calls) == 3  # one generation batch per step
    eos = set(trainer.eos_token_ids)
    for n, params, out in calls:
        assert n == 4 and params.n == 4 and params.max_tokens == 6 and set(params.stop_token_ids) == eos
        # TRL's own cut: up to and including the first eos, at most max_completion_length tokens
        assert len(out) == 4 and all(1 <= len(c) <= 6 and not (set(c[:-1]) & eos) for c in out)
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    after = trainer.model.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in before.items())
    # the engine decodes the trained weights: its fused copies follow the optimizer after a sync
    trainer.r1fast_rollout.sync()
    model = trainer.accelerator.unwrap_model(trainer.model)
    ids = torch.tensor([5, 6, 7, 8])
    with torch.no_grad():
        ours = trainer.r1fast_rollout.model(ids, cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))
        theirs = model.model(input_ids=ids[None]).last_hidden_state[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("option,value", [("repetition_penalty", 1.2), ("generation_kwargs", {"do_sample": True}),
                                          ("max_completion_length", None)])
def test_trl_options_the_engine_cannot_honour_are_refused(tmp_path, option, value):
    path = save_tiny_qwen2(tmp_path / "m", seed=0)
    with pytest.raises(ValueError, match=option):
        _trainer(path, tmp_path / "run", **{option: value})


@pytest.mark.parametrize("field,value", [("no_repeat_ngram_size", 2), ("suppress_tokens", [5]),
                                         ("bad_words_ids", [[7]]), ("top_h", 0.5), ("guidance_scale", 2.0),
                                         ("prompt_lookup_num_tokens", 3)])
def test_model_generation_config_the_engine_cannot_honour_is_refused(tmp_path, field, value):
    """transformers' generate applies these from the model's generation_config (TRL sets none of them)."""
    path = save_tiny_qwen2(tmp_path / "m", seed=0)
    with pytest.raises(ValueError, match=f"generation_config.{field}"):
        _trainer(path, tmp_path / "run", model_setup=lambda m: setattr(m.generation_config, field, value))


def test_explicit_no_op_generation_config_values_are_not_refused():
    """transformers 4.x wrote the neutral values out (num_beams 1, no_repeat_ngram_size 0...): they do nothing."""
    from transformers import GenerationConfig

    pytest.importorskip("trl")   # r1fast.integrations.trl subclasses trl.GRPOTrainer
    from r1fast.integrations.trl import generation_problems

    model = torch.nn.Module()
    model.generation_config = GenerationConfig(num_beams=1, no_repeat_ngram_size=0, min_length=0, typical_p=1.0,
                                               epsilon_cutoff=0.0, bad_words_ids=None)
    assert generation_problems(object(), model) == []
    model.generation_config = GenerationConfig(no_repeat_ngram_size=3)
    assert len(generation_problems(object(), model)) == 1


def test_rollout_func_and_engine_kwargs(tmp_path):
    path = save_tiny_qwen2(tmp_path / "m", seed=0)
    with pytest.raises(ValueError, match="rollout_func replaces TRL's generation"):
        _trainer(path, tmp_path / "a", trainer_kwargs=dict(rollout_func=lambda *a, **k: None))
    with pytest.raises(ValueError, match="r1fast_engine_kwargs"):
        _trainer(path, tmp_path / "b", trainer_kwargs=dict(r1fast_engine_kwargs=["num_blocks", 8]))
    # the KV pool is sized for each seat's completion after a prompt of PROMPT_TOKENS_PER_SEAT, not
    # for the model's whole context; r1fast_engine_kwargs reach the engine
    from r1fast.integrations.trl import PROMPT_TOKENS_PER_SEAT

    trainer = _trainer(path, tmp_path / "c")
    engine = trainer.r1fast_rollout.engine
    assert engine.max_model_len == trainer.model.config.max_position_embeddings
    assert engine.num_blocks <= engine.max_num_seqs * -(-(6 + PROMPT_TOKENS_PER_SEAT) // engine.block_size) + 1
    trainer = _trainer(path, tmp_path / "d", trainer_kwargs=dict(r1fast_engine_kwargs={"num_blocks": 9}))
    assert trainer.r1fast_rollout.engine.num_blocks == 9


@pytest.mark.gpu
def test_cuda_greedy_tokens_equal_transformers_and_bf16_decoding_runs(tmp_path):
    """On the GPU: CUDA graphs, the engine's kernels and the fused copies on the device; fp32 greedy
    equals transformers' greedy, and a bf16 rollout of the fp32 model (TRL's autocast case) runs."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    path = save_tiny_qwen2(tmp_path / "m", seed=3)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    rollout = HFRollout(model, block_size=16, max_num_seqs=16)
    batch = [p for p in PROMPTS for _ in range(2)]
    got = rollout.generate(batch, SamplingParams(n=2, temperature=0, max_tokens=7, ignore_eos=True))

    def hf(prompt):
        ids = torch.tensor([prompt], device="cuda")
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=7,
                             min_new_tokens=7, pad_token_id=0, eos_token_id=None)
        return out[0, len(prompt):].tolist()

    assert got == [hf(p) for p in batch]
    half = HFRollout(model, dtype=torch.bfloat16, block_size=16, max_num_seqs=16)
    out = half.generate(batch, SamplingParams(n=2, temperature=1.0, max_tokens=7, ignore_eos=True, seed=0))
    assert [len(c) for c in out] == [7] * len(batch)


# ---- checks added by the mutation pass ----------------------------------------------------------


def test_generation_after_weight_update_and_sync_uses_the_new_weights(hf_model):
    """sync() also drops the prefix cache: a prompt generated before the update (its full blocks cached)
    must be prefilled again with the new weights, giving transformers' greedy tokens for them."""
    import copy

    model = copy.deepcopy(hf_model)
    rollout = HFRollout(model, block_size=4, num_blocks=64)
    prompt = [1, 5, 7, 3, 4, 9, 10, 11, 2]  # two full blocks the prefix cache keeps
    params = SamplingParams(n=1, temperature=0, max_tokens=6, ignore_eos=True)
    before = _hf_greedy(model, prompt, 6)
    assert rollout.generate([prompt], params) == [before]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    rollout.sync()
    after = _hf_greedy(model, prompt, 6)
    assert after != before  # the update changed what greedy decoding picks
    assert rollout.generate([prompt], params) == [after]


def test_batch_not_a_whole_number_of_groups_gets_one_sample_per_prompt(hf_model):
    """Runs of n identical prompts but a length that is not a multiple of n: one sample per listed prompt."""
    rollout = HFRollout(hf_model, block_size=4, num_blocks=64)
    batch = [PROMPTS[0], PROMPTS[0], PROMPTS[1]]
    got = rollout.generate(batch, SamplingParams(n=2, temperature=0, max_tokens=3, ignore_eos=True))
    assert got == [_hf_greedy(hf_model, p, 3) for p in batch]


HF_GENERATION_EXTRA_VALUES = {
    "no_repeat_ngram_size": 2, "encoder_no_repeat_ngram_size": 2, "bad_words_ids": [[7]], "suppress_tokens": [5],
    "begin_suppress_tokens": [5], "forced_bos_token_id": 3, "forced_eos_token_id": 3, "sequence_bias": {(5,): 1.0},
    "min_length": 3, "min_new_tokens": 2, "typical_p": 0.9, "epsilon_cutoff": 1e-3, "eta_cutoff": 1e-3,
    "exponential_decay_length_penalty": (2, 1.1), "num_beams": 2, "diversity_penalty": 0.5, "penalty_alpha": 0.6,
    "top_h": 0.5, "guidance_scale": 2.0, "encoder_repetition_penalty": 1.3, "max_time": 5.0,
    "watermarking_config": transformers.generation.WatermarkingConfig(greenlist_ratio=0.25),
    "dola_layers": "high", "stop_strings": ["</s>"], "token_healing": True, "num_return_sequences": 2,
    "constraints": [object()], "force_words_ids": [[7]], "prompt_lookup_num_tokens": 3, "assistant_early_exit": 1,
    "use_mtp": True}


def test_prompts_as_tensors_or_arrays_group_as_lists_do(hf_model):
    import numpy as np

    rollout = HFRollout(hf_model, block_size=4, num_blocks=64)
    params = SamplingParams(n=2, temperature=1.0, max_tokens=4, seed=9, ignore_eos=True)
    batch = [p for p in PROMPTS for _ in range(2)]
    want = rollout.generate(batch, params)
    assert rollout.generate([torch.tensor(p) for p in batch], params) == want
    assert rollout.generate([np.array(p) for p in batch], params) == want
    assert rollout.engine.last_stats["prefill"] >= 1 and len(want) == 6


def test_every_generation_config_field_the_engine_cannot_apply_is_refused():
    """Each of transformers' generation_config logits processors, set to a value that does something, is named."""
    from transformers import GenerationConfig

    pytest.importorskip("trl")   # r1fast.integrations.trl subclasses trl.GRPOTrainer
    from r1fast.integrations.trl import _HF_GENERATION_EXTRAS, generation_problems

    assert set(HF_GENERATION_EXTRA_VALUES) == set(_HF_GENERATION_EXTRAS)
    for name, value in HF_GENERATION_EXTRA_VALUES.items():
        model = torch.nn.Module()
        model.generation_config = GenerationConfig()
        setattr(model.generation_config, name, value)
        problems = generation_problems(object(), model)
        assert len(problems) == 1 and f"generation_config.{name}=" in problems[0], (name, problems)


def test_a_generation_config_field_the_drop_in_has_not_reviewed_is_refused(monkeypatch):
    """A field a later transformers adds to GenerationConfig may change what generate samples: set away from its
    default, it is named (on the model's generation_config at build time, on the trainer's at every generation)."""
    from transformers import GenerationConfig

    pytest.importorskip("trl")   # r1fast.integrations.trl subclasses trl.GRPOTrainer
    from r1fast.integrations import trl as r1trl

    monkeypatch.setattr(r1trl, "_generation_config_defaults",
                        lambda: {**vars(GenerationConfig()), "future_sampler_knob": None})
    model = torch.nn.Module()
    model.generation_config = GenerationConfig()
    assert r1trl.generation_problems(object(), model) == []
    model.generation_config.future_sampler_knob = 0.5
    (problem,) = r1trl.generation_problems(object(), model)
    assert problem.startswith("the model's generation_config.future_sampler_knob=0.5: a generation option")


@pytest.mark.parametrize("option", ["use_vllm", "use_transformers_continuous_batching"])
def test_other_generation_backends_refused_with_r1fast_generation(option):
    import types

    pytest.importorskip("trl")   # r1fast.integrations.trl subclasses trl.GRPOTrainer
    from r1fast.integrations.trl import generation_problems

    (problem,) = generation_problems(types.SimpleNamespace(**{option: True}))
    assert problem.startswith(f"{option}=True")
    assert generation_problems(types.SimpleNamespace(**{option: False})) == []


def spy_on_engine_params(monkeypatch) -> list:
    """The SamplingParams of every HFRollout.generate call from now on."""
    seen = []
    generate = HFRollout.generate

    def spy(self, prompt_ids, params):
        seen.append(params)
        return generate(self, prompt_ids, params)

    monkeypatch.setattr(HFRollout, "generate", spy)
    return seen


@pytest.mark.parametrize("top_k, engine_top_k", [(5, 5), (0, -1), (None, 50)])
def test_trl_sampling_options_reach_the_engine(tmp_path, monkeypatch, top_k, engine_top_k):
    """TRL's temperature, top_p, top_k (0: off; None: transformers' default 50, as its generate samples) and min_p
    become the engine's SamplingParams; the engine reads the current weights (a sync before every generation); one
    completion per prompt, in order."""
    path = save_tiny_qwen2(tmp_path / "m", seed=0)
    trainer = _trainer(path, tmp_path / "run", temperature=0.7, top_p=0.9, top_k=top_k, min_p=0.05)
    seen = spy_on_engine_params(monkeypatch)
    model = trainer.accelerator.unwrap_model(trainer.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an optimizer step since the last generation
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    prompts = [[5, 6, 7]] * 4 + [[8, 9]] * 4
    completions, logprobs = trainer._generate_single_turn(prompts, None, None, 4)
    assert logprobs is None and len(completions) == 8 and all(1 <= len(c) <= 6 for c in completions)
    (params,) = seen
    assert (params.n, params.temperature, params.top_p, params.top_k, params.min_p, params.max_tokens) == \
        (4, 0.7, 0.9, engine_top_k, 0.05, 6)
    ids = torch.tensor([5, 6, 7, 8])
    with torch.no_grad():
        ours = trainer.r1fast_rollout.model(ids, cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))
        theirs = model.model(input_ids=ids[None]).last_hidden_state[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_trl_sampling_options_left_none_take_the_models_generation_config(tmp_path, monkeypatch):
    """Like transformers' generate under stock TRL: top_k / top_p / min_p set to None in the GRPOConfig (min_p's
    default) come from the model's generation_config; the engine used to sample without them (or fail on top_p)."""
    path = save_tiny_qwen2(tmp_path / "m", seed=0)

    def setup(model):
        model.generation_config.top_k, model.generation_config.top_p, model.generation_config.min_p = 7, 0.8, 0.1

    trainer = _trainer(path, tmp_path / "run", top_k=None, top_p=None, model_setup=setup)
    seen = spy_on_engine_params(monkeypatch)
    trainer._generate_single_turn([[5, 6, 7]] * 4, None, None, 4)
    (params,) = seen
    assert (params.top_k, params.top_p, params.min_p) == (7, 0.8, 0.1)



def test_engine_samples_with_the_generation_config_trl_generates_with(tmp_path, monkeypatch):
    """Stock TRL samples with trainer.generation_config, built in its __init__: a callback that anneals
    generation_config.temperature (or top_k, top_p, min_p) changes TRL's sampling, one that sets trainer.temperature
    changes nothing. The engine follows the same object; it used to read trainer.temperature and friends."""
    path = save_tiny_qwen2(tmp_path / "m", seed=0)
    trainer = _trainer(path, tmp_path / "run", temperature=0.7, top_p=0.9, top_k=5, min_p=0.05)
    seen = spy_on_engine_params(monkeypatch)
    trainer.temperature, trainer.top_p, trainer.top_k, trainer.min_p = 0.3, 0.5, 2, 0.2  # ignored by TRL
    config = trainer.generation_config
    config.temperature, config.top_p, config.top_k, config.min_p = 1.2, 0.8, 4, 0.1
    trainer._generate_single_turn([[5, 6, 7]] * 4, None, None, 4)
    (params,) = seen
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (1.2, 0.8, 4, 0.1)


def test_engine_temperature_left_none_takes_the_models_generation_config(tmp_path, monkeypatch):
    """A callback setting generation_config.temperature to None: transformers' generate then samples at the model's
    generation_config temperature (0.6); the engine got None and failed in SamplingParams."""
    path = save_tiny_qwen2(tmp_path / "m", seed=0)

    def setup(model):
        model.generation_config.temperature = 0.6

    trainer = _trainer(path, tmp_path / "run", temperature=0.7, model_setup=setup)
    seen = spy_on_engine_params(monkeypatch)
    trainer.generation_config.temperature = None
    trainer._generate_single_turn([[5, 6, 7]] * 4, None, None, 4)
    (params,) = seen
    assert params.temperature == 0.6


def test_engine_greedy_and_length_follow_the_generation_config_as_trls_generate_does(tmp_path):
    """TRL's generate reads trainer.generation_config: a callback setting its do_sample=False decodes greedily, its
    max_new_tokens is the completion length, and trainer.max_completion_length (copied into that config by TRL's
    __init__) is not read again. The engine kept sampling and took trainer.max_completion_length at every generation;
    now it gives TRL's own completions, token for token (greedy, fp32)."""
    trl = pytest.importorskip("trl")
    path = save_tiny_qwen2(tmp_path / "m", seed=0)
    trainer = _trainer(path, tmp_path / "run", max_completion_length=6)
    trainer.generation_config.do_sample, trainer.generation_config.max_new_tokens = False, 4
    trainer.max_completion_length = 2
    prompts = [[5, 6, 7]] * 2 + [[8, 9, 10, 11, 3]] * 2
    ours, _ = trainer._generate_single_turn(prompts, None, {}, 2)
    theirs, _ = trl.GRPOTrainer._generate_single_turn(trainer, prompts, None, {}, 2)
    assert ours == theirs and max(len(c) for c in theirs) == 4
    trainer.generation_config.do_sample = True  # sampling again, at generation_config's length
    ours, _ = trainer._generate_single_turn(prompts, None, {}, 2)
    assert max(len(c) for c in ours) <= 4


@pytest.mark.parametrize("field,value,message", [
    ("repetition_penalty", 1.3, "generation_config.repetition_penalty=1.3: the engine's sampler has no repetition"),
    ("no_repeat_ngram_size", 2, "generation_config.no_repeat_ngram_size=2: the engine's sampler does not apply it"),
    ("max_new_tokens", None, "generation_config.max_new_tokens=None"),
    ("temperature", 0.0, "generation_config.temperature=0.0 with do_sample=True"),
    ("prompt_lookup_num_tokens", 3, r"generation_config.prompt_lookup_num_tokens=3: .*assisted \(speculative\)"),
    ("assistant_early_exit", 1, "generation_config.assistant_early_exit=1"),
])
def test_generation_config_changes_the_engine_cannot_follow_are_refused_at_the_next_generation(
        tmp_path, field, value, message):
    """TRL's generate would apply a repetition penalty (or another logits processor) a callback sets on
    trainer.generation_config mid-run; the engine sampled on without it. It is refused by name at the generation it
    would change (a GRPOConfig repetition_penalty != 1 already is, when the trainer is built)."""
    path = save_tiny_qwen2(tmp_path / "m", seed=0)
    trainer = _trainer(path, tmp_path / "run")
    setattr(trainer.generation_config, field, value)
    with pytest.raises(ValueError, match=message):
        trainer._generate_single_turn([[5, 6, 7]] * 4, None, {}, 4)


def test_engine_sized_for_the_generation_batch_and_completion_length(tmp_path):
    """max_num_seqs is this process's share of TRL's generation batch (4 prompts x steps_per_generation 4), and
    (in a context longer than it) the KV pool holds every seat's max_completion_length after a prompt of
    PROMPT_TOKENS_PER_SEAT tokens: on the CPU, whose memory never binds here, exactly that many blocks."""
    pytest.importorskip("trl")   # r1fast.integrations.trl subclasses trl.GRPOTrainer
    from r1fast.integrations.trl import PROMPT_TOKENS_PER_SEAT

    path = save_tiny_qwen2(tmp_path / "m", seed=0)
    trainer = _trainer(path, tmp_path / "run", steps_per_generation=4,
                       model_setup=lambda m: setattr(m.config, "max_position_embeddings", 4096))
    engine = trainer.r1fast_rollout.engine
    assert trainer.args.generation_batch_size == 16 and engine.max_num_seqs == 16
    assert engine.max_model_len == 4096
    assert engine.num_blocks == 16 * -(-(6 + PROMPT_TOKENS_PER_SEAT) // engine.block_size) + 1


def test_parameter_shapes_that_disagree_with_the_config_are_clear_errors(hf_model):
    """A transformers tensor whose shape the config does not imply is named: an aliased one (the final norm) and a
    part of a fused projection (q_proj)."""
    import copy

    for module, what in ((lambda m: m.model.norm, "norm.weight"), (lambda m: m.model.layers[1].self_attn.q_proj,
                                                                    "qkv")):
        bad = copy.deepcopy(hf_model)
        target = module(bad)
        target.weight = torch.nn.Parameter(target.weight.detach()[:-1].clone())
        with pytest.raises(ValueError, match=f"{what}.*has shape"):
            HFRollout(bad, block_size=4, num_blocks=64)


def test_toy_tokenizer_pads_on_the_left():
    from r1fast.integrations.toy import char_tokenizer

    tokenizer = char_tokenizer()
    batch = tokenizer(["a", "abc"], padding=True)
    assert batch["attention_mask"][0][0] == 0 and batch["attention_mask"][0][-1] == 1
    assert batch["input_ids"][0][0] == tokenizer.pad_token_id


@pytest.mark.parametrize("case", ["replaced", "added", "pad_is_an_eos", "replaced_numpy", "added_array",
                                  "pad_is_an_eos_numpy"])
def test_engine_stops_at_the_generation_config_eos_a_callback_sets_as_trl_does(tmp_path, case):
    """A callback that sets trainer.generation_config.eos_token_id (a new stop token) changes where TRL's generate
    stops, while TRL still cuts at trainer.eos_token_ids and keeps the pads generate writes after a stop it does not
    cut at. The engine stopped at trainer.eos_token_ids only, so its completions ran past the new stop token.
    Greedy, so the engine's tokens and transformers' are the same ones and stock TRL's path is the reference.
    Token ids given as numpy integers (a scalar, an array) are taken as generate takes them: the engine's path used to
    fail with a TypeError on a numpy scalar eos."""
    import numpy as np

    trl = pytest.importorskip("trl")
    path = save_tiny_qwen2(tmp_path / "m", seed=0)
    trainer = _trainer(path, tmp_path / "run", max_completion_length=8)
    config = trainer.generation_config
    config.do_sample = False
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]

    def both():
        stock, _ = trl.GRPOTrainer._generate_single_turn(trainer, prompts, None, {}, 1)
        ours, _ = trainer._generate_single_turn(prompts, None, {}, 1)
        return stock, ours

    before, ours = both()
    assert ours == before
    stop = before[0][1]  # a token greedy decoding writes early in one completion
    config.eos_token_id = {"replaced": [stop], "added": [*trainer.eos_token_ids, stop], "pad_is_an_eos": [stop],
                           "replaced_numpy": np.int64(stop), "added_array": np.array([*trainer.eos_token_ids, stop]),
                           "pad_is_an_eos_numpy": [np.int64(stop)]}[case]
    if case.startswith("pad_is_an_eos"):
        pad = trainer.eos_token_ids[0]
        config.pad_token_id = pad if case == "pad_is_an_eos" else np.int64(pad)
    stock, ours = both()
    assert ours == stock
    assert stock != before  # the new stop token changed TRL's completions
    # TRL keeps the pads after a stop it does not cut at; it cuts at a pad that is one of its eos tokens
    assert any(len(c) < 8 for c in stock) == case.startswith("pad_is_an_eos")


def test_a_numpy_eos_on_the_model_and_a_numpy_length_are_taken_as_ints(tmp_path, monkeypatch):
    """A model whose generation_config.eos_token_id is a numpy integer (a config built with numpy): TRL's __init__
    failed on it with a TypeError ("argument of type 'numpy.int64' is not iterable"); the trainer now takes the same
    stop tokens as with a Python int. A callback's numpy max_new_tokens was refused as "at least 1 token"."""
    import numpy as np

    path = save_tiny_qwen2(tmp_path / "m", seed=0)
    eos = 7  # another stop token than the tokenizer's eos, which TRL adds in front
    plain = _trainer(path, tmp_path / "plain", model_setup=lambda m: setattr(m.generation_config, "eos_token_id", eos))
    trainer = _trainer(path, tmp_path / "numpy",
                       model_setup=lambda m: setattr(m.generation_config, "eos_token_id", np.int64(eos)))
    assert trainer.eos_token_ids == plain.eos_token_ids and eos in trainer.eos_token_ids
    assert all(type(t) is int for t in trainer.eos_token_ids)
    seen = spy_on_engine_params(monkeypatch)
    trainer.generation_config.max_new_tokens = np.int64(4)
    completions, _ = trainer._generate_single_turn([[5, 6, 7]] * 4, None, {}, 4)
    (params,) = seen
    assert params.max_tokens == 4 and set(params.stop_token_ids) == set(plain.eos_token_ids)
    assert all(1 <= len(c) <= 4 for c in completions)


@pytest.mark.parametrize("field,value,message", [
    ("eos_token_id", 3.0, r"generation_config.eos_token_id must be integer token ids, got 3.0 \(float\)"),
    ("eos_token_id", [2, True], r"generation_config.eos_token_id must be integer token ids, got True \(bool\)"),
    ("eos_token_id", [2.5], r"generation_config.eos_token_id must be integer token ids, got 2.5"),
    ("pad_token_id", 2.0, r"generation_config.pad_token_id must be integer token ids, got 2.0"),
])
def test_float_or_bool_token_ids_are_refused_by_name(tmp_path, field, value, message):
    """int() made True token 1 and 2.5 token 2 without a word; a float or bool token id is now a ValueError naming
    the field, on trainer.generation_config at the next generation, on the model's when the trainer is built."""
    import numpy as np

    path = save_tiny_qwen2(tmp_path / "m", seed=0)
    trainer = _trainer(path, tmp_path / "run")
    setattr(trainer.generation_config, field, value)
    with pytest.raises(ValueError, match=message):
        trainer._generate_single_turn([[5, 6, 7]] * 4, None, {}, 4)
    if field == "eos_token_id":
        with pytest.raises(ValueError, match="the model's " + message):
            _trainer(path, tmp_path / "init", model_setup=lambda m: setattr(m.generation_config, field, value))
    setattr(trainer.generation_config, field, np.array(value).astype(np.int64).tolist())  # the same ids, as ints
    trainer._generate_single_turn([[5, 6, 7]] * 4, None, {}, 4)


@pytest.mark.parametrize("dtype", ["bfloat16", torch.int64, torch.float8_e4m3fn, torch.complex64])
def test_a_dtype_the_engine_cannot_decode_in_is_refused_by_name(hf_model, dtype):
    # int64 was taken: the weights were cast to zeros and the first generate() failed in rms_norm, naming
    # neither HFRollout nor dtype; a string failed in torch.empty
    with pytest.raises(ValueError, match=r"HFRollout: dtype=.* is not one the engine decodes in"):
        HFRollout(hf_model, dtype=dtype, block_size=4, num_blocks=64)
    rollout = HFRollout(hf_model, dtype=torch.float64, block_size=4, num_blocks=64)   # the float dtypes still are
    params = SamplingParams(n=1, temperature=0, max_tokens=3, ignore_eos=True)
    assert rollout.generate([PROMPTS[0]], params) == [_hf_greedy(hf_model, PROMPTS[0], 3)]


def test_a_prompt_not_wrapped_in_a_list_and_params_not_sampling_params_are_named(hf_model):
    # one prompt passed as the batch failed with "'int' object is not iterable", a dict of sampling options
    # with "'dict' object has no attribute 'n'"
    rollout = HFRollout(hf_model, block_size=4, num_blocks=64)
    params = SamplingParams(n=1, temperature=0, max_tokens=3, ignore_eos=True)
    with pytest.raises(TypeError, match="generate: prompt 0 must be a list of ints, got int"):
        rollout.generate(PROMPTS[1], params)
    with pytest.raises(TypeError, match="params must be an r1fast.rollout.SamplingParams, got dict"):
        rollout.generate([PROMPTS[1]], {"n": 1, "max_tokens": 3})
    assert rollout.generate([tuple(PROMPTS[1])], params) == [_hf_greedy(hf_model, PROMPTS[1], 3)]


def test_toy_config_refuses_a_vocabulary_smaller_than_its_tokenizer():
    # vocab_size=0 was read as "the tokenizer's size" and a smaller one was taken: a model that cannot embed
    # the tokenizer's last ids, failing with an IndexError at the first prompt that holds one
    from r1fast.integrations.toy import char_tokenizer, qwen2_config

    tok = char_tokenizer()
    size = len(tok) + int(torch.randint(1, 64, ()).item())
    assert qwen2_config(tokenizer=tok).vocab_size == len(tok)
    assert qwen2_config(tokenizer=tok, vocab_size=size).vocab_size == size
    for small in (0, len(tok) - 1):
        with pytest.raises(ValueError, match=f"vocab_size={small} is smaller than the tokenizer's {len(tok)}"):
            qwen2_config(tokenizer=tok, vocab_size=small)


def test_sync_refuses_parameters_replaced_rather_than_updated_in_place(hf_model):
    # sync() copied from, and the engine aliased, the tensors the model held when the rollout was made: after
    # load_state_dict(..., assign=True) it went on generating with the old weights without a word
    import copy

    model = copy.deepcopy(hf_model)
    rollout = HFRollout(model, block_size=4, num_blocks=64)
    g = torch.Generator().manual_seed(int(torch.randint(0, 1000, ()).item()))
    model.load_state_dict({k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()})
    rollout.sync()   # updated in place: read
    params = SamplingParams(n=1, temperature=0, max_tokens=4, ignore_eos=True)
    assert rollout.generate([PROMPTS[1]], params) == [_hf_greedy(model, PROMPTS[1], 4)]
    state = {k: torch.nn.Parameter(v + 0.3 * torch.randn(v.shape, generator=g)) for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    with pytest.raises(ValueError, match=r"HFRollout: the transformers model's model\.embed_tokens\.weight.* were "
                                         r"replaced, not updated in place"):
        rollout.sync()
