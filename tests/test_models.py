"""r1fast.models against transformers' own Llama/Qwen2/Qwen3/Mistral on tiny random fp32 models."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from r1fast.models import CausalLM, Linear, ModelConfig, from_pretrained  # noqa: E402
from r1fast.testing import max_rel_err  # noqa: E402

RTOL = 1e-4

# Each config exercises a different corner: tied/untied, GQA ratio, rope scaling, biases, odd sizes.
CONFIGS = {
    "llama-mha-untied": dict(architecture="LlamaForCausalLM", vocab_size=61, hidden_size=32, intermediate_size=48,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
    "llama-gqa4-tied-llama3rope-bias": dict(
        architecture="LlamaForCausalLM", vocab_size=53, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "llama-linear-rope": dict(architecture="LlamaForCausalLM", vocab_size=40, hidden_size=24, intermediate_size=30,
                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                              rope_scaling={"rope_type": "linear", "factor": 2.5}),
    "qwen2-gqa3-tied-odd": dict(architecture="Qwen2ForCausalLM", vocab_size=97, hidden_size=24, intermediate_size=37,
                                num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
                                tie_word_embeddings=True, rope_theta=1e6),
    "qwen2-gqa2-untied": dict(architecture="Qwen2ForCausalLM", vocab_size=50, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "qwen3-headdim12-untied-bias": dict(architecture="Qwen3ForCausalLM", vocab_size=71, hidden_size=40,
                                        intermediate_size=52, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=12, attention_bias=True),
    "qwen3-yarn": dict(architecture="Qwen3ForCausalLM", vocab_size=30, hidden_size=32, intermediate_size=32,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       max_position_embeddings=64, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                                 "original_max_position_embeddings": 16}),
    "qwen3-tied": dict(architecture="Qwen3ForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                       tie_word_embeddings=True),
    # a large eps, so that every RMSNorm (hidden and per-head q/k) must use the configured one
    "qwen3-large-eps": dict(architecture="Qwen3ForCausalLM", vocab_size=45, hidden_size=32, intermediate_size=40,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            rms_norm_eps=0.1),
    # Mistral: no bias, MistralConfig's 4096 window on every layer (transformers runs its sliding mask)
    "mistral-gqa2-headdim12-untied": dict(architecture="MistralForCausalLM", vocab_size=67, hidden_size=40,
                                          intermediate_size=52, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=12, rope_theta=1e6, rms_norm_eps=1e-5),
    "mistral-gqa4-tied": dict(architecture="MistralForCausalLM", vocab_size=48, hidden_size=32, intermediate_size=44,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                              tie_word_embeddings=True),
}
LENGTHS = [5, 11, 1, 8]


def hf_model(cfg: ModelConfig, seed: int):
    """transformers' model for cfg in fp32, with every parameter (norms and biases too) random."""
    hf_config = transformers.AutoConfig.for_model(cfg.model_type, **{
        k: v for k, v in cfg.to_hf_config(torch.float32).items() if k not in ("model_type",)})
    hf_config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(hf_config).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


def pair(tmp_path, name, seed=0):
    """(transformers model, r1fast model loaded from the checkpoint transformers wrote)."""
    cfg = ModelConfig(**CONFIGS[name])
    ref = hf_model(cfg, seed)
    ref.save_pretrained(tmp_path / name)
    return ref, from_pretrained(tmp_path / name)


def packed_batch(vocab, lengths=LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (sum(lengths),), generator=g)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return ids, cu


def ref_logits_per_sequence(ref, ids, cu):
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        outs.append(ref(input_ids=ids[a:b][None]).logits[0])
    return torch.cat(outs)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    ref, model = pair(tmp_path, name)
    assert model.dtype == torch.float32 and isinstance(model.layers[0].mlp.gate_up_proj, Linear)
    ids, cu = packed_batch(model.config.vocab_size)
    with torch.no_grad():
        expected = ref_logits_per_sequence(ref, ids, cu)
        got = model.logits(model(ids, cu_seqlens=cu))
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert expected.abs().max() > 0.1  # random weights large enough that a wrong term shows
    assert max_rel_err(got, expected) <= RTOL, max_rel_err(got, expected)


def test_hidden_is_after_final_norm_and_lm_head_weight(tmp_path):
    ref, model = pair(tmp_path, "qwen2-gqa2-untied")
    ids, _ = packed_batch(model.config.vocab_size, [7])
    with torch.no_grad():
        expected = ref.model(input_ids=ids[None]).last_hidden_state[0]
        got = model(ids)
    assert max_rel_err(got, expected) <= RTOL
    assert torch.equal(model.lm_head_weight, ref.lm_head.weight)
    tied = pair(tmp_path, "qwen3-tied")[1]
    assert tied.lm_head_weight is tied.embed_tokens.weight


def test_packed_equals_each_sequence_alone_and_positions_imply_boundaries():
    torch.manual_seed(0)
    cfg = ModelConfig(**CONFIGS["llama-gqa4-tied-llama3rope-bias"])
    model = CausalLM(cfg)
    ids, cu = packed_batch(cfg.vocab_size)
    with torch.no_grad():
        packed = model(ids, cu_seqlens=cu)
        alone = torch.cat([model(ids[a:b]) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
        positions = torch.cat([torch.arange(n) for n in LENGTHS])
        from_positions = model(ids, position_ids=positions)
        unpacked = model(ids)  # one long sequence: must differ, else the boundaries were ignored
    assert max_rel_err(packed, alone) <= 1e-5
    assert max_rel_err(from_positions, alone) <= 1e-5
    assert max_rel_err(unpacked, alone) > 1e-2


def test_a_packed_training_forward_reads_the_device_once(device_reads):
    """Each read of a device value is a host sync on a GPU, paid by every forward of the trainer's micro-batches
    (old-policy, reference, each iteration): the ids' range check and cu_seqlens were read apart, two syncs."""
    cfg = ModelConfig(**CONFIGS["qwen2-gqa2-untied"])
    model = CausalLM(cfg)
    ids, cu = packed_batch(cfg.vocab_size)
    with device_reads() as reads, torch.no_grad():
        model(ids, cu_seqlens=cu)
        model(ids, cu_seqlens=cu, prefix_of=[-1] + [0] * (cu.numel() - 2))
    assert len(reads) == 2, reads
    with pytest.raises(ValueError, match=f"input_ids must lie in .* max {cfg.vocab_size}$"):
        model(torch.cat([ids[:-1], torch.tensor([cfg.vocab_size])]), cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0 and end at the token count"):
        model(ids, cu_seqlens=cu[:-1])


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_positions_and_shared_prefix_keys_reach_the_device_without_a_host_sync(device):
    """Built from host lists in every training forward: torch.tensor(..., device="cuda") copies from pageable
    memory after the stream drains (a host sync, behind the micro-batch before); a pinned copy queues instead."""
    from r1fast.models.attention import check_cu_seqlens, check_prefix_of, positions_of

    cu = torch.tensor([0, 5, 8, 9], dtype=torch.int32, device=device)
    packed = check_prefix_of([-1, 0, 0], check_cu_seqlens(cu, 9, torch.device(device)))
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        positions = positions_of(packed, device)
        index, cu_k, k_lens, longest = packed.key_layout(device)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    assert positions.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 5] and positions.dtype == torch.int64
    assert index.tolist() == [0, 1, 2, 3, 4] + [0, 1, 2, 3, 4, 5, 6, 7] + [0, 1, 2, 3, 4, 8]
    assert cu_k.tolist() == [0, 5, 13, 19] and cu_k.dtype == torch.int32 and (k_lens, longest) == ([5, 8, 6], 8)
    assert positions.device.type == index.device.type == cu_k.device.type == device


def test_cu_seqlens_device_check_reads_an_unnamed_index_as_the_default():
    """torch.device("cuda") != torch.device("cuda:0"): the check refused cu_seqlens made on "cuda" (whose
    tensors say cuda:0) for input_ids named "cuda" on an H200; the same holds for "cpu" vs "cpu:0"."""
    from r1fast.models.attention import check_cu_seqlens

    cu = torch.tensor([0, 5, 8, 9], dtype=torch.int32)
    assert check_cu_seqlens(cu, 9, torch.device("cpu", 0)).lengths == [5, 3, 1]
    with pytest.raises(ValueError, match="cu_seqlens is on cpu but input_ids on meta"):
        check_cu_seqlens(cu, 9, torch.device("meta"))


def test_position_offsets_shift_rotary():
    # RoPE is relative: a uniform shift of the positions leaves the output unchanged, a gap does not.
    cfg = ModelConfig(**CONFIGS["qwen2-gqa2-untied"])
    model = CausalLM(cfg)
    ids, _ = packed_batch(cfg.vocab_size, [6])
    one = torch.tensor([0, 6], dtype=torch.int32)
    with torch.no_grad():
        a = model(ids, position_ids=torch.arange(6))
        shifted = model(ids, position_ids=torch.arange(6) + 3, cu_seqlens=one)
        gapped = model(ids, position_ids=torch.tensor([0, 1, 2, 7, 8, 9]), cu_seqlens=one)
    assert max_rel_err(shifted, a) <= 1e-5
    assert max_rel_err(gapped, a) > 1e-3


@pytest.mark.parametrize("name", ["llama-gqa4-tied-llama3rope-bias", "qwen2-gqa3-tied-odd", "mistral-gqa4-tied",
                                  "qwen3-headdim12-untied-bias"])
def test_gradients_match_transformers(tmp_path, name):
    ref, model = pair(tmp_path, name, seed=3)
    ids, cu = packed_batch(model.config.vocab_size, [4, 9, 3])
    w = torch.randn(ids.shape[0], model.config.vocab_size, generator=torch.Generator().manual_seed(5))
    (ref_logits_per_sequence(ref, ids, cu) * w).sum().backward()
    model.gradient_checkpointing = name.startswith("qwen3")  # checkpointing must not change gradients
    (model.logits(model(ids, cu_seqlens=cu)) * w).sum().backward()
    ref_params = dict(ref.named_parameters())
    params = dict(model.named_parameters())
    checked = 0
    for key, n, rows in model.hf_layout():  # a fused projection's gradient, row block by row block
        if key not in ref_params:  # transformers registers a tied lm_head only under the embedding
            continue
        assert params[n].grad is not None, n
        grad = params[n].grad if rows is None else params[n].grad[rows]
        err = max_rel_err(grad, ref_params[key].grad)
        assert err <= RTOL, f"{key}: {err}"
        checked += 1
    assert checked == len(ref_params)


def test_gradient_checkpointing_same_grads():
    cfg = ModelConfig(**CONFIGS["qwen2-gqa2-untied"])
    model = CausalLM(cfg)
    model.reset_parameters(seed=4)
    ids, cu = packed_batch(cfg.vocab_size)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model.logits(model(ids, cu_seqlens=cu)).logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


class RecordingAttention:
    """A stand-in for the rollout engine's attention context: plain causal attention, one sequence."""

    def __init__(self):
        self.calls = []

    def attend(self, layer_idx, q, k, v):
        self.calls.append((layer_idx, tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scores = torch.einsum("thd,shd->hts", q, k) / q.shape[-1] ** 0.5
        mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril()
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        return torch.einsum("hts,shd->thd", probs, v)


def test_attention_context_is_used():
    cfg = ModelConfig(**CONFIGS["qwen3-headdim12-untied-bias"])
    model = CausalLM(cfg)
    ids, _ = packed_batch(cfg.vocab_size, [9])
    ctx = RecordingAttention()
    with torch.no_grad():
        got = model(ids, position_ids=torch.arange(9), attn=ctx)
        expected = model(ids)
    assert [c[0] for c in ctx.calls] == list(range(cfg.num_hidden_layers))
    assert ctx.calls[0][1:] == ((9, 4, 12), (9, 2, 12), (9, 2, 12))
    assert max_rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize("name", ["llama-gqa4-tied-llama3rope-bias", "mistral-gqa2-headdim12-untied"])
def test_save_pretrained_loads_in_transformers(tmp_path, name):
    cfg = ModelConfig(**CONFIGS[name])
    model = CausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    out = tmp_path / "saved"
    out.mkdir()
    (out / "tokenizer_config.json").write_text("{}")          # unrelated files survive a save
    (out / "model-00009-of-00009.safetensors").write_text("stale")  # stale shards do not
    model.save_pretrained(out, max_shard_size="8KB")
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files and "tokenizer_config.json" in files
    assert "model-00009-of-00009.safetensors" not in files
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".saved")]  # temp folders cleaned up
    ref = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert type(ref).__name__ == cfg.architecture
    ids, cu = packed_batch(cfg.vocab_size)
    with torch.no_grad():
        assert max_rel_err(model.logits(model(ids, cu_seqlens=cu)), ref_logits_per_sequence(ref, ids, cu)) <= RTOL
    again = from_pretrained(out)
    for (n, a), (_, b) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), n
    assert ModelConfig.from_hf_config(out).rope_scaling == cfg.rope_scaling


def test_a_loaded_models_generation_config_reaches_its_saved_checkpoints(tmp_path):
    # a trained checkpoint (save_pretrained of a model loaded from a folder) kept no generation_config.json:
    # transformers and vLLM then generated without the source's eos ids and sampling defaults
    import json

    src = tmp_path / "src"
    CausalLM(ModelConfig(**CONFIGS["llama-gqa4-tied-llama3rope-bias"])).save_pretrained(src)
    gen = {"eos_token_id": [2, 7], "temperature": 0.7, "top_p": 0.8, "do_sample": True}
    (src / "generation_config.json").write_text(json.dumps(gen))
    model = from_pretrained(src)
    model.save_pretrained(tmp_path / "trained")
    assert json.loads((tmp_path / "trained" / "generation_config.json").read_text()) == gen
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "trained").eos_token_id == [2, 7]
    # saved over a folder holding another generation config, the model's wins
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "generation_config.json").write_text('{"eos_token_id": 0}')
    model.save_pretrained(tmp_path / "old")
    assert json.loads((tmp_path / "old" / "generation_config.json").read_text()) == gen


def test_sharded_checkpoint_from_transformers_loads(tmp_path):
    cfg = ModelConfig(**CONFIGS["qwen3-headdim12-untied-bias"])
    ref = hf_model(cfg, seed=7)
    ref.save_pretrained(tmp_path / "ck", max_shard_size="20KB")
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    model = from_pretrained(tmp_path / "ck")
    ids, cu = packed_batch(cfg.vocab_size)
    with torch.no_grad():
        assert max_rel_err(model.logits(model(ids, cu_seqlens=cu)), ref_logits_per_sequence(ref, ids, cu)) <= RTOL


def test_a_single_file_beside_an_index_of_shards_is_read_as_transformers_reads_it(tmp_path):
    # transformers reads model.safetensors before an index of shards; r1fast read the shards: another model
    import shutil

    cfg = ModelConfig(**CONFIGS["qwen3-headdim12-untied-bias"])
    hf_model(cfg, seed=8).save_pretrained(tmp_path / "a")
    hf_model(cfg, seed=9).save_pretrained(tmp_path / "ck", max_shard_size="20KB")
    shutil.copy(tmp_path / "a" / "model.safetensors", tmp_path / "ck" / "model.safetensors")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32)
    model = from_pretrained(tmp_path / "ck")
    ids, cu = packed_batch(cfg.vocab_size)
    with torch.no_grad():
        assert max_rel_err(model.logits(model(ids, cu_seqlens=cu)), ref_logits_per_sequence(ref, ids, cu)) <= RTOL
        assert torch.equal(model.embed_tokens.weight, from_pretrained(tmp_path / "a").embed_tokens.weight)


@pytest.mark.parametrize("stored", ["head only", "both, equal", "both, head first differs", "both, embed first differs"])
def test_tied_checkpoint_storing_only_lm_head_loads(tmp_path, stored):
    """Some tied exports keep lm_head.weight instead of the embedding; transformers ties it the other way
    round, so it loads. Both stored and equal loads too; both stored and different is refused (transformers
    5 keeps such a head untied: tying it would drop it), in whichever order the shards hold them."""
    from safetensors.torch import save_file

    cfg = ModelConfig(**CONFIGS["qwen3-tied"])
    model = CausalLM(cfg)
    model.save_pretrained(tmp_path / "ck")
    embed = model.embed_tokens.weight.detach().clone()
    keep_embed = stored != "head only"
    head = {"lm_head.weight": embed.clone() if "differs" not in stored else torch.randn_like(embed)}
    rest = {k: p.detach().clone() for k, p in model.hf_tensors().items()}
    if not keep_embed:
        del rest["model.embed_tokens.weight"]
    os.remove(tmp_path / "ck" / "model.safetensors")
    shards = {"model-00001-of-00002.safetensors": head, "model-00002-of-00002.safetensors": rest}
    for fname, tensors in shards.items():
        save_file(tensors, tmp_path / "ck" / fname, metadata={"format": "pt"})
    order = list(shards.items())[::-1] if stored == "both, embed first differs" else list(shards.items())
    weight_map = {k: fname for fname, tensors in order for k in tensors}   # shards load in this order
    (tmp_path / "ck" / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if "differs" in stored:
        with pytest.raises(ValueError, match="stored lm_head.weight differs .* tie_word_embeddings: false"):
            from_pretrained(tmp_path / "ck")
        return
    loaded = from_pretrained(tmp_path / "ck")
    assert torch.equal(loaded.embed_tokens.weight, embed) and loaded.lm_head_weight is loaded.embed_tokens.weight
    if not keep_embed:
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck").float().eval()
        ids, cu = packed_batch(cfg.vocab_size)
        with torch.no_grad():
            got = loaded.logits(loaded(ids, cu_seqlens=cu))
            assert max_rel_err(got, ref_logits_per_sequence(ref, ids, cu)) <= RTOL


def test_dtype_choice(tmp_path):
    cfg = ModelConfig(**CONFIGS["qwen2-gqa2-untied"])
    CausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
    assert from_pretrained(tmp_path / "bf16", dtype="auto").dtype == torch.bfloat16   # transformers' spelling
    m = from_pretrained(tmp_path / "bf16", dtype="float32")
    assert m.dtype == torch.float32 and all(p.dtype == torch.float32 for p in m.parameters())
    with pytest.raises(ValueError, match="unsupported dtype"):
        from_pretrained(tmp_path / "bf16", dtype=torch.int8)


def test_fp8_options_are_checked_before_loading_and_reach_the_layers(tmp_path):
    from r1fast.fp8 import make_options

    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=40, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    CausalLM(cfg).save_pretrained(tmp_path / "m")
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text((tmp_path / "m" / "config.json").read_text())
    # a bad option is said before a (possibly long) load, not after: here nothing could load at all
    with pytest.raises(ValueError, match="fp8 mode='e4m3' is not valid"):
        from_pretrained(tmp_path / "no_weights", fp8="e4m3")
    assert not hasattr(from_pretrained(tmp_path / "m"), "fp8_report")
    model = from_pretrained(tmp_path / "m", fp8=make_options("emulate", grad_dtype="e4m3", scaling="tensorwise"))
    layer = model.layers[0].mlp.down_proj
    assert (layer.fp8_scaling, layer.fp8_grad_dtype) == ("tensorwise", "e4m3")


@pytest.mark.parametrize("name", ["qwen2-gqa2-untied", "qwen3-headdim12-untied-bias"])
def test_bf16_within_lowp_rule(tmp_path, name, device):
    """bf16 (on CUDA: flash-attn varlen when installed, else SDPA): the error against a float64 run of the
    same weights is at most 2x transformers' own bf16 error."""
    from r1fast.testing import assert_within_lowp_rule

    cfg = ModelConfig(**CONFIGS[name])
    ref = hf_model(cfg, seed=11)
    ref.save_pretrained(tmp_path / "ck")
    ids, cu = packed_batch(cfg.vocab_size, [37, 64, 5, 90])
    with torch.no_grad():
        exact_model = from_pretrained(tmp_path / "ck", dtype=torch.float64)
        exact = exact_model.logits(exact_model(ids, cu_seqlens=cu))
        ref_out = ref_logits_per_sequence(ref.to(device, torch.bfloat16), ids.to(device), cu.to(device))
        model = from_pretrained(tmp_path / "ck", dtype="bfloat16", device=device)
        got = model.logits(model(ids.to(device), cu_seqlens=cu.to(device)))
    assert got.dtype == torch.float32 and model.dtype == torch.bfloat16
    assert_within_lowp_rule(got, ref_out, exact, name=name)


def naive_packed_attention(q, k, v, lengths, scale):
    """float64 softmax(q k^T) v, causal within each sequence, written out the obvious way."""
    out, start = [], 0
    groups = q.shape[1] // k.shape[1]
    for n in lengths:
        qs, ks, vs = (x[start:start + n].double() for x in (q, k, v))
        ks, vs = ks.repeat_interleave(groups, 1), vs.repeat_interleave(groups, 1)
        scores = torch.einsum("thd,shd->hts", qs, ks) * scale
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        out.append(torch.einsum("hts,shd->thd", scores.softmax(-1), vs))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("lengths, heads, kv_heads", [([6, 1, 13, 4], 4, 2), ([9], 3, 3), ([2, 2, 30], 6, 1)])
def test_attention_paths_equal_naive_reference(lengths, heads, kv_heads):
    from r1fast.models.attention import packed_from_lengths, sdpa_block_diagonal, sdpa_per_sequence

    t, d = sum(lengths), 8
    q = torch.randn(t, heads, d, generator=torch.Generator().manual_seed(0), requires_grad=True)
    k = torch.randn(t, kv_heads, d, generator=torch.Generator().manual_seed(1), requires_grad=True)
    v = torch.randn(t, kv_heads, d, generator=torch.Generator().manual_seed(2), requires_grad=True)
    packed = packed_from_lengths(lengths, torch.device("cpu"))
    expected = naive_packed_attention(q, k, v, lengths, 0.3)
    dy = torch.randn(t, heads, d, generator=torch.Generator().manual_seed(3))
    ref_grads = torch.autograd.grad((expected * dy.double()).sum(), (q, k, v))
    for fn in (sdpa_block_diagonal, sdpa_per_sequence):
        out = fn(q, k, v, packed, 0.3)
        assert max_rel_err(out.detach(), expected.detach()) <= 1e-5, fn.__name__
        grads = torch.autograd.grad((out * dy).sum(), (q, k, v))
        for g, r in zip(grads, ref_grads):
            assert max_rel_err(g, r) <= 1e-5, fn.__name__


def _fake_varlen_attn(new_api: bool, gqa_param: bool, aligned: str = "bottom_right"):
    """CPU stand-ins with torch's varlen_attn signatures: 2.10's (is_causal, no scale: the kernel uses
    1/sqrt(D)) and 2.11+'s (window_size, scale, with or without enable_gqa). Each checks what it is
    called with and computes the naive causal attention, its mask aligned bottom-right (query i of n
    over c keys sees keys <= c - n + i) or, to test the probe, top-left."""
    def check(query, key, max_q, max_k, causal_ok, enable_gqa):
        assert causal_ok, "varlen_attn must be asked for causal attention"
        assert (key.shape[1] != query.shape[1]) == enable_gqa, "GQA: native flag, or K/V expanded"

    def run(query, key, value, cu_q, cu_k, max_q, max_k, scale):
        q_lens, k_lens = (cu_q[1:] - cu_q[:-1]).tolist(), (cu_k[1:] - cu_k[:-1]).tolist()
        assert max(q_lens) == max_q and max(k_lens) == max_k and cu_q.dtype == cu_k.dtype == torch.int32
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        groups = query.shape[1] // key.shape[1]
        out, qs, ks = [], 0, 0
        for n, c in zip(q_lens, k_lens):
            q_, k_, v_ = query[qs:qs + n].double(), key[ks:ks + c].double(), value[ks:ks + c].double()
            k_, v_ = k_.repeat_interleave(groups, 1), v_.repeat_interleave(groups, 1)
            scores = torch.einsum("thd,shd->hts", q_, k_) * scale
            shift = c - n if aligned == "bottom_right" else 0
            seen = torch.arange(c)[None, :] <= torch.arange(n)[:, None] + shift
            out.append(torch.einsum("hts,shd->thd", scores.masked_fill(~seen, float("-inf")).softmax(-1), v_))
            qs, ks = qs + n, ks + c
        return torch.cat(out).to(query.dtype)

    if new_api and gqa_param:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1), enable_gqa=False):
            check(query, key, max_q, max_k, tuple(window_size) == (-1, 0), enable_gqa)
            return run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale)
    elif new_api:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1)):
            check(query, key, max_q, max_k, tuple(window_size) == (-1, 0), False)
            return run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale)
    else:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
            check(query, key, max_q, max_k, is_causal, False)
            return run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, None)
    return varlen_attn


@pytest.fixture
def fake_varlen(monkeypatch):
    """Install a fake torch varlen_attn (and fresh probe state); returns the installer."""
    import torch.nn.attention.varlen as tv

    from r1fast.ops import attention as ops_attention

    monkeypatch.setattr(ops_attention, "_varlen_broken", {})
    monkeypatch.setattr(ops_attention, "_varlen_ok", set())

    def install(fn):
        monkeypatch.setattr(tv, "varlen_attn", fn)
        ops_attention.torch_varlen_attn.cache_clear()
        return ops_attention
    yield install
    ops_attention.torch_varlen_attn.cache_clear()


@pytest.mark.parametrize("new_api, gqa_param", [(True, True), (True, False), (False, False)])
def test_torch_varlen_attn_is_called_causal_with_gqa_handled(fake_varlen, new_api, gqa_param):
    """The adapter over torch's varlen_attn across its signature changes (the kernel itself is CUDA-only:
    the GPU test below runs it)."""
    from r1fast.models import attention

    ops_attention = fake_varlen(_fake_varlen_attn(new_api, gqa_param))
    attend = ops_attention.torch_varlen_attn()
    lengths, t, d = [5, 1, 9], 15, 8
    q = torch.randn(t, 4, d, generator=torch.Generator().manual_seed(0))
    k = torch.randn(t, 2, d, generator=torch.Generator().manual_seed(1))
    v = torch.randn(t, 2, d, generator=torch.Generator().manual_seed(2))
    packed = attention.packed_from_lengths(lengths, torch.device("cpu"))
    out = attend(q, k, v, packed.cu_seqlens, packed.cu_seqlens, packed.max_seqlen, packed.max_seqlen, 0.3)
    assert max_rel_err(out, naive_packed_attention(q, k, v, lengths, 0.3).float()) <= 1e-5


def test_training_attention_path_names_the_kernel_that_runs(monkeypatch):
    # the model bench labelled r1fast's attention "sdpa" on any GPU without flash-attn, where torch's varlen
    # kernel runs (the torch-varlen answer needs a CUDA tensor for its probe: the GPU run shows it)
    from r1fast.models import attention

    assert attention.training_attention_path("cpu", torch.bfloat16, 4, 2, 8) == "sdpa"
    assert attention.training_attention_path("cuda", torch.float32, 4, 2, 8) == "sdpa"
    monkeypatch.setattr(attention, "flash_attn_varlen", lambda: object())
    assert attention.training_attention_path("cuda", torch.bfloat16, 4, 2, 8) == "flash-attn varlen"


def test_varlen_probe_checks_alignment_backward_and_reraises_oom(fake_varlen, monkeypatch):
    q, k = torch.randn(5, 4, 8), torch.randn(5, 2, 8)
    ops_attention = fake_varlen(_fake_varlen_attn(True, True, aligned="top_left"))
    assert ops_attention.varlen_ready(q, k)  # same query and key lengths: alignment cannot matter
    assert not ops_attention.varlen_ready(q, k, prefix=True)  # over a cached prefix it does: caught
    assert "wrong numbers" in ops_attention._varlen_broken[(True, False)]
    assert ops_attention.varlen_ready(q, k)  # training keeps the fast path

    ops_attention = fake_varlen(_fake_varlen_attn(True, True))
    monkeypatch.setattr(ops_attention, "_varlen_broken", {})
    with torch.inference_mode():  # the probe still gets its gradients
        assert ops_attention.varlen_ready(q, k, prefix=True) and ops_attention.varlen_ready(q[:, :, :4], k[:, :, :4])

    class BadBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("no backward kernel for this head_dim")
    good = _fake_varlen_attn(True, True)

    def bad_backward(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                     enable_gqa=False):
        return BadBackward.apply(good(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                                      window_size=window_size, enable_gqa=enable_gqa))
    fake_varlen(bad_backward)
    assert not ops_attention.varlen_ready(q[:, :, :2], k[:, :, :2])
    assert "no backward kernel" in ops_attention._varlen_broken[(False, True)]

    def oom(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        raise torch.OutOfMemoryError("CUDA out of memory")
    fake_varlen(oom)
    monkeypatch.setattr(ops_attention, "_varlen_broken", {})
    with pytest.raises(torch.OutOfMemoryError):
        ops_attention.varlen_ready(q[:, :, :6], k[:, :, :6])
    assert not ops_attention._varlen_broken  # a transient OOM does not disable the fast path


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_varlen_attention_matches_per_sequence_sdpa():
    from r1fast.models import attention
    from r1fast.ops import attention as ops_attention

    lengths, heads, kv_heads, d = [300, 7, 129, 64], 12, 2, 128
    t = sum(lengths)
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(t, h, d, generator=g).cuda().bfloat16().requires_grad_() for h in (heads, kv_heads, kv_heads))
    packed = attention.packed_from_lengths(lengths, q.device)
    dy = torch.randn(t, heads, d, generator=g).cuda().bfloat16()
    ref = attention.sdpa_per_sequence(q, k, v, packed, 0.1)
    ref_grads = torch.autograd.grad((ref.float() * dy.float()).sum(), (q, k, v))
    assert ops_attention.varlen_ready(q, k), ops_attention._varlen_broken
    assert ops_attention.varlen_ready(q, k, prefix=True), ops_attention._varlen_broken
    out = ops_attention.torch_varlen_attn()(q, k, v, packed.cu_seqlens, packed.cu_seqlens, packed.max_seqlen,
                                            packed.max_seqlen, 0.1)
    grads = torch.autograd.grad((out.float() * dy.float()).sum(), (q, k, v))
    assert max_rel_err(out.float(), ref.float()) <= 2e-2
    for a, b in zip(grads, ref_grads):
        assert max_rel_err(a.float(), b.float()) <= 5e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_attention_over_shared_prefixes_matches_the_copied_layout():
    """bf16 on the GPU: prompts of 256 and 40 tokens, 3 and 2 continuations; the gathered-key varlen call
    (torch varlen, causal bottom-right, with its backward) against per-sequence SDPA over copied prompts."""
    from r1fast.models import attention
    from r1fast.ops import attention as ops_attention

    heads, kv_heads, d = 12, 2, 128
    prompts, conts, owner = [256, 40], [100, 7, 64, 33, 1], [0, 0, 0, 1, 1]
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda n, h: torch.randn(n, h, d, generator=g).cuda().bfloat16()  # noqa: E731
    pq, pk, pv = ([mk(n, h) for n in prompts] for h in (heads, kv_heads, kv_heads))
    cq, ck, cv = ([mk(n, h) for n in conts] for h in (heads, kv_heads, kv_heads))
    # shared layout: prompt 0, its continuations, prompt 1, its continuations
    order, prefix_of = [], []
    for o in (0, 1):
        order.append(("p", o))
        prefix_of.append(-1)
        head = len(prefix_of) - 1
        for i, oo in enumerate(owner):
            if oo == o:
                order.append(("c", i))
                prefix_of.append(head)
    pick = lambda parts_p, parts_c: torch.cat([parts_p[i] if k == "p" else parts_c[i] for k, i in order])  # noqa: E731
    q, k, v = (pick(a, b).requires_grad_() for a, b in ((pq, cq), (pk, ck), (pv, cv)))
    lengths = [prompts[i] if kind == "p" else conts[i] for kind, i in order]
    packed = attention.check_prefix_of(prefix_of, attention.packed_from_lengths(lengths, q.device))
    out = attention.varlen_causal_attention(q, k, v, packed, 0.1)
    assert ops_attention.varlen_ready(q, k, prefix=True, grad=True), ops_attention._varlen_broken
    # copied layout, fp32 per-sequence SDPA: each continuation after its own copy of its prompt
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    starts = dict(zip(order, packed.starts))
    copies, rows, keep, at = [], [], [], 0
    for i, o in enumerate(owner):
        ps, cs = starts[("p", o)], starts[("c", i)]
        copies.append(torch.cat([torch.arange(ps, ps + prompts[o]), torch.arange(cs, cs + conts[i])]))
        rows.append(torch.arange(cs, cs + conts[i]))
        keep.append(torch.arange(at + prompts[o], at + prompts[o] + conts[i]))
        at += prompts[o] + conts[i]
    copies, rows, keep = (torch.cat(x).cuda() for x in (copies, rows, keep))
    ref = attention.sdpa_per_sequence(q32[copies], k32[copies], v32[copies],
                                      attention.packed_from_lengths([prompts[o] + conts[i] for i, o in enumerate(owner)],
                                                                    q.device), 0.1)
    assert max_rel_err(out.float()[rows], ref[keep]) <= 2e-2
    # the continuations' outputs only: the gradients reach the prompts through their keys and values
    dy = torch.randn(len(rows), heads, d, generator=g).cuda()
    grads = torch.autograd.grad((out.float()[rows] * dy).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref[keep] * dy).sum(), (q32, k32, v32))
    for a, b in zip(grads, ref_grads):
        assert max_rel_err(a.float(), b) <= 5e-2


def test_from_pretrained_with_real_fp8_emulation(tmp_path):
    pytest.importorskip("r1fast.fp8")
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=40, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    CausalLM(cfg).save_pretrained(tmp_path / "m")
    plain, fp8 = from_pretrained(tmp_path / "m"), from_pretrained(tmp_path / "m", fp8="emulate")
    assert len(fp8.fp8_report.converted) == 4 * cfg.num_hidden_layers  # qkv, o, gate_up, down
    ids, cu = packed_batch(cfg.vocab_size, [5, 9])
    with torch.no_grad():
        a, b = plain(ids, cu_seqlens=cu), fp8(ids, cu_seqlens=cu)
    assert torch.isfinite(b).all() and 0 < max_rel_err(b, a) < 0.2


@pytest.mark.parametrize("path", ["one masked call", "per sequence"])
def test_sequences_continuing_a_shared_prefix_equal_the_copied_layout(monkeypatch, path):
    """prefix_of: completions packed after one copy of their prompt give, in float64, the hidden states
    and gradients of each completion packed after its own copy of the prompt."""
    from r1fast.models import attention as model_attention

    if path == "per sequence":
        monkeypatch.setattr(model_attention, "_MASKED_MAX_TOKENS", 0)
    cfg = ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=40, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, qk_norm=True,
                      max_position_embeddings=64)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 40, (n,), generator=g) for n in (5, 3)]
    comps = [torch.randint(0, 40, (n,), generator=g) for n in (3, 4, 1, 6)]
    owner = [0, 0, 1, 1]  # completion -> prompt

    def grads_of(model, ids, cu, rows, **kw):
        model.zero_grad()
        h = model(ids, cu_seqlens=torch.tensor(cu, dtype=torch.int32), **kw)
        picked = h[torch.tensor(rows)]
        w = torch.randn(picked.shape, generator=torch.Generator().manual_seed(2), dtype=picked.dtype)
        (picked * w).sum().backward()
        return picked.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model = CausalLM(cfg).double()
    # copied: [prompt, completion] per completion; rows = each completion's tokens
    ids, cu, rows = [], [0], []
    for c, o in zip(comps, owner):
        ids += [prompts[o], c]
        rows += range(cu[-1] + len(prompts[o]), cu[-1] + len(prompts[o]) + len(c))
        cu.append(cu[-1] + len(prompts[o]) + len(c))
    want_h, want_g = grads_of(model, torch.cat(ids), cu, rows)
    # shared: prompt 0, its 2 completions, prompt 1, its 2 completions
    ids, cu, rows, prefix_of = [], [0], [], []
    for o in (0, 1):
        ids.append(prompts[o])
        cu.append(cu[-1] + len(prompts[o]))
        prefix_of.append(-1)
        head = len(prefix_of) - 1
        for c, oo in zip(comps, owner):
            if oo == o:
                ids.append(c)
                rows += range(cu[-1], cu[-1] + len(c))
                cu.append(cu[-1] + len(c))
                prefix_of.append(head)
    got_h, got_g = grads_of(model, torch.cat(ids), cu, rows, prefix_of=prefix_of)
    torch.testing.assert_close(got_h, want_h, rtol=1e-10, atol=1e-12)
    # The RMSNorms compute in fp32 whatever the dtype (transformers' expression): a prompt's gradient
    # summed before its norms' backward, not after, differs by fp32 rounding, ~1e-7 of the largest entry.
    for n in want_g:
        scale = float(want_g[n].abs().max())
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-5, atol=1e-6 * scale, msg=lambda m: f"{n}: {m}")
    with pytest.raises(ValueError, match="prefix_of"):
        model(torch.cat(ids), cu_seqlens=torch.tensor(cu, dtype=torch.int32), prefix_of=[-1, 0, 1, -1, 3, 3])
    with pytest.raises(ValueError, match="prefix_of must be a list of 6 ints"):
        model(torch.cat(ids), cu_seqlens=torch.tensor(cu, dtype=torch.int32), prefix_of=[-1, 0])


def test_position_ids_not_starting_at_zero_imply_one_sequence_from_there():
    """Positions alone (no cu_seqlens): a restart at 0 starts a sequence, and the first token always does,
    wherever its positions begin (a continuation after a cached prefix)."""
    cfg = ModelConfig(**CONFIGS["qwen2-gqa2-untied"])
    model = CausalLM(cfg)
    model.reset_parameters(seed=6)
    ids, _ = packed_batch(cfg.vocab_size, [9])
    with torch.no_grad():
        whole = model(ids)
        shifted = model(ids, position_ids=torch.arange(9) + 4)          # RoPE is relative: same output
        two = model(ids, position_ids=torch.tensor([3, 4, 5, 6, 0, 1, 2, 3, 4]))
        alone = torch.cat([model(ids[:4]), model(ids[4:])])
    assert max_rel_err(shifted, whole) <= 1e-5
    assert max_rel_err(two, alone) <= 1e-5


@pytest.mark.parametrize("seed", [None, 3])
def test_reset_parameters_like_transformers(seed):
    """N(0, initializer_range) matrices, zero biases, unit norm weights: seeded (drawn on the CPU) or not."""
    cfg = ModelConfig(**CONFIGS["qwen3-headdim12-untied-bias"])
    model = CausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)   # whatever was there before is overwritten
    model.reset_parameters(seed=seed)
    std = cfg.initializer_range
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        elif name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert abs(p.mean().item()) < 0.2 * std and 0.8 * std < p.std().item() < 1.2 * std, name
    if seed is not None:
        again = CausalLM(cfg)
        again.reset_parameters(seed=seed)
        for (n, a), (_, b) in zip(model.named_parameters(), again.named_parameters()):
            assert torch.equal(a, b), n


def test_input_ids_equal_to_the_vocab_size_are_refused():
    cfg = ModelConfig(**CONFIGS["qwen2-gqa2-untied"])
    model = CausalLM(cfg)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 50\), got min 0 max 50"):
        model(torch.tensor([0, 3, cfg.vocab_size]))
    with pytest.raises(ValueError, match=r"got min -1"):
        model(torch.tensor([-1, 3]))
    assert model(torch.tensor([0, cfg.vocab_size - 1])).shape == (2, cfg.hidden_size)


def test_prefix_of_without_cu_seqlens_is_refused():
    cfg = ModelConfig(**CONFIGS["qwen2-gqa2-untied"])
    model = CausalLM(cfg)
    ids = torch.arange(6)
    with pytest.raises(ValueError, match="prefix_of needs cu_seqlens"):
        model(ids, prefix_of=[-1])
    with pytest.raises(ValueError, match="prefix_of needs cu_seqlens"):
        model(ids, position_ids=torch.tensor([0, 1, 2, 0, 1, 2]), prefix_of=[-1, 0])


# config.json keys as transformers reads them: a raw file next to transformers' weights, both loaders compared
RAW_BASE = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=50, hidden_size=32,
                  intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=50, hidden_size=32,
                  intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=50, hidden_size=32,
                  intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, max_position_embeddings=64),
    # head_dim absent: MistralConfig floors hidden / heads (50 // 4 = 12), q_proj has 48 rows, not 50
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", vocab_size=50, hidden_size=50,
                    intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=64),
}


def raw_pair(tmp_path, family, change, seed=0):
    """(transformers model, r1fast model) both loaded from one folder whose config.json is RAW_BASE + change."""
    raw = {**RAW_BASE[family], **change}
    folder = tmp_path / family
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(raw))
    ref = hf_model(ModelConfig.from_hf_config(RAW_BASE[family]), seed)
    ref.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(raw))  # save_pretrained rewrote it in its own words
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                            dtype=torch.float32).eval()
    return ref, from_pretrained(folder)


# Sliding-window keys that leave every layer (or, up to the window's length, every result) full attention in
# transformers: Llama ignores them, Qwen2/3 default max_window_layers to 28, a null window slides nothing.
# Each used to be refused; LENGTHS' longest sequence is 11 tokens.
WINDOWS_THAT_CHANGE_NOTHING = {
    "llama-ignores-sliding-keys": ("llama", {"use_sliding_window": True, "sliding_window": 4,
                                             "layer_types": ["sliding_attention", "full_attention"]}),
    "qwen2-default-max-window-layers": ("qwen2", {"use_sliding_window": True, "sliding_window": 4}),
    "qwen2-null-window": ("qwen2", {"use_sliding_window": True, "sliding_window": None, "max_window_layers": 0}),
    "qwen3-window-covers-the-sequences": ("qwen3", {"use_sliding_window": True, "sliding_window": 11,
                                                    "max_window_layers": 0}),
    "qwen2-layer-types-window-covers": ("qwen2", {"use_sliding_window": True, "sliding_window": 11,
                                                  "layer_types": ["full_attention", "sliding_attention"]}),
    # Mistral: sliding_window absent is MistralConfig's 4096, null slides nothing, and a window slides every
    # layer whatever use_sliding_window, max_window_layers and layer_types say (MistralForCausalLM reads none)
    "mistral-absent-window": ("mistral", {}),
    "mistral-null-window": ("mistral", {"sliding_window": None}),
    "mistral-window-covers-the-sequences": ("mistral", {"sliding_window": 11, "use_sliding_window": False,
                                                        "max_window_layers": 2, "attention_bias": True}),
}
WINDOW_OF = {"mistral-absent-window": 4096, "mistral-null-window": None, "mistral-window-covers-the-sequences": 11}


@pytest.mark.parametrize("name", list(WINDOWS_THAT_CHANGE_NOTHING))
def test_sliding_window_configs_that_change_nothing_load_and_match_transformers(tmp_path, name):
    ref, model = raw_pair(tmp_path, *WINDOWS_THAT_CHANGE_NOTHING[name])
    if name in WINDOW_OF:
        assert model.config.sliding_window == WINDOW_OF[name] == ref.config.sliding_window
    ids, cu = packed_batch(model.config.vocab_size)
    with torch.no_grad():
        expected = ref_logits_per_sequence(ref, ids, cu)
        got = model.logits(model(ids, cu_seqlens=cu))
    assert max_rel_err(got, expected) <= RTOL, max_rel_err(got, expected)


@pytest.mark.parametrize("family, window_keys", [
    ("qwen3", {"use_sliding_window": True, "sliding_window": 10, "max_window_layers": 1}),
    ("mistral", {"sliding_window": 10}),
])
def test_sequences_longer_than_a_sliding_window_are_refused(tmp_path, family, window_keys):
    # transformers' window of 10 keys changes the 11-token sequence's last logits: refused there, as is a
    # continuation whose prefix and own tokens together pass the window, and an Engine that could grow a
    # sequence past it
    ref, model = raw_pair(tmp_path, family, window_keys)
    assert model.config.sliding_window == 10
    ids, cu = packed_batch(model.config.vocab_size)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"a sequence of 11 tokens exceeds config.json's sliding_window \(10\)"):
            model(ids, cu_seqlens=cu)
        short = torch.tensor([0, 5, 10], dtype=torch.int32)
        expected = ref_logits_per_sequence(ref, ids[:10], short)
        assert max_rel_err(model.logits(model(ids[:10], cu_seqlens=short)), expected) <= RTOL
        with pytest.raises(ValueError, match="a sequence of 11 tokens"):
            model(ids[:11], cu_seqlens=torch.tensor([0, 5, 11], dtype=torch.int32), prefix_of=[-1, 0])
        model.sliding_window = None  # unchecked, full attention is what the refusal spares the user
        eleven = ids[cu[1]:cu[2]]
        assert max_rel_err(model.logits(model(eleven)), ref(eleven[None]).logits[0]) > 100 * RTOL
        model.sliding_window = 10
    from r1fast.rollout import Engine

    assert Engine(model, block_size=4, num_blocks=8).max_model_len == 10
    with pytest.raises(ValueError, match="max_model_len 12 exceeds config.json's sliding_window 10"):
        Engine(model, block_size=4, num_blocks=8, max_model_len=12)


def test_mistral_layer_types_match_both_transformers_readers_up_to_the_window(tmp_path):
    # with layer_types, AutoModelForCausalLM reads a mistral config.json as MinistralForCausalLM (only the named
    # layers slide) and MistralForCausalLM slides every layer: both equal full attention up to the window
    ref, model = raw_pair(tmp_path, "mistral", {"head_dim": 12, "sliding_window": 11,
                                                "layer_types": ["full_attention", "sliding_attention"]})
    assert type(ref).__name__ == "MinistralForCausalLM" and model.config.sliding_window == 11
    mistral = transformers.MistralForCausalLM.from_pretrained(tmp_path / "mistral", attn_implementation="eager",
                                                              dtype=torch.float32).eval()
    ids, cu = packed_batch(model.config.vocab_size)
    with torch.no_grad():
        got = model.logits(model(ids, cu_seqlens=cu))
        for reader in (ref, mistral):
            assert max_rel_err(got, ref_logits_per_sequence(reader, ids, cu)) <= RTOL


def test_dynamic_rope_matches_transformers_below_max_position_embeddings(tmp_path):
    # transformers' dynamic NTK rope is its default rotation until a batch reaches max_position_embeddings
    # (then the base grows with the length); it was refused, though r1fast's runs stay below that length
    ref, model = raw_pair(tmp_path, "qwen2", {"rope_scaling": {"rope_type": "dynamic", "factor": 1.7},
                                              "rope_theta": 12345.6, "max_position_embeddings": 12})
    ids, cu = packed_batch(model.config.vocab_size)
    positions = torch.arange(12)
    ref_cos, ref_sin = ref.model.rotary_emb(torch.zeros(1), positions[None])
    cos, sin = model.rotary.cos_sin(positions, torch.float32)
    assert torch.equal(cos, ref_cos[0]) and torch.equal(sin, ref_sin[0])
    with torch.no_grad():
        expected = ref_logits_per_sequence(ref, ids, cu)
        assert max_rel_err(model.logits(model(ids, cu_seqlens=cu)), expected) <= RTOL
        with pytest.raises(ValueError, match=r"position 12 reaches max_position_embeddings \(12\)"):
            model(ids[:13])
        with pytest.raises(ValueError, match="position 12 reaches"):
            model(ids[:11], cu_seqlens=torch.tensor([0, 5, 11], dtype=torch.int32), prefix_of=[-1, 0],
                  position_ids=torch.cat([torch.arange(5), torch.arange(7, 13)]))


_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
# Every rope type r1fast accepts, from config.json as published (transformers-4 rope_scaling with "type" or
# "rope_type", transformers-5 rope_parameters), with yarn's optional fields: each changes the rotation
ROPE_VARIANTS = {
    "llama-llama3-rope-parameters": ("llama", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}}),
    "qwen2-yarn-attention-factor-legacy-type": ("qwen2", {"rope_theta": 1e6, "rope_scaling": {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "attention_factor": 1.3}}),
    "qwen3-yarn-mscale": ("qwen3", {"rope_parameters": {**_YARN, "rope_theta": 1e4, "mscale": 1.0,
                                                        "mscale_all_dim": 0.5}}),
    # a long original context, so that the betas move the ramp at head_dim 12
    "mistral-yarn-betas-untruncated": ("mistral", {"rope_parameters": {
        **_YARN, "original_max_position_embeddings": 4096, "rope_theta": 1e4, "beta_fast": 8, "beta_slow": 2,
        "truncate": False}}),
    "qwen3-yarn-null-factor": ("qwen3", {"rope_scaling": {**_YARN, "factor": None}}),
    "mistral-linear": ("mistral", {"rope_parameters": {"rope_type": "linear", "factor": 2.5, "rope_theta": 1e4}}),
    "llama-dynamic": ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 3.0}}),
    # rope_theta inside rope_scaling (transformers 5 reads it in rope_parameters' place, its rope_theta first): it
    # was refused as disagreeing with the default or top-level theta r1fast read instead
    "qwen2-rope-scaling-default-theta": ("qwen2", {"rope_scaling": {"rope_type": "default", "rope_theta": 5e5}}),
    "mistral-rope-scaling-legacy-type-theta": ("mistral", {"rope_scaling": {"type": "default", "rope_theta": 2e5}}),
    "llama-rope-scaling-linear-theta-as-top-level": ("llama", {"rope_theta": 3e5, "rope_scaling": {
        "rope_type": "linear", "factor": 2.0, "rope_theta": 3e5}}),
    "qwen3-rope-scaling-theta-as-rope-parameters": ("qwen3", {
        "rope_scaling": {"rope_type": "default", "rope_theta": 5e5},
        "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}),
}


@pytest.mark.parametrize("name", list(ROPE_VARIANTS))
def test_rope_variants_from_config_json_match_transformers_logits(tmp_path, name):
    family, change = ROPE_VARIANTS[name]
    ref, model = raw_pair(tmp_path, family, change)
    ids = torch.randint(0, 50, (60,), generator=torch.Generator().manual_seed(2))  # past the original 16
    with torch.no_grad():
        expected = ref(input_ids=ids[None]).logits[0]
        assert max_rel_err(model.logits(model(ids)), expected) <= RTOL


# config.json keys set to null, which r1fast reads as transformers' defaults and transformers 5 refuses
# ("Field 'max_window_layers' expected int, got NoneType"): a checkpoint r1fast saves from such a source must hold
# the values r1fast used, or transformers refuses the save too
NULL_KEYS = {
    "qwen2": {"use_sliding_window": None, "max_window_layers": None, "attention_dropout": None, "use_cache": None,
              "initializer_range": None},
    "qwen3": {"head_dim": None, "attention_bias": None, "use_sliding_window": None, "max_window_layers": None},
    "llama": {"mlp_bias": None, "attention_bias": None, "use_cache": None, "initializer_range": None},
    "mistral": {"attention_dropout": None, "use_cache": None},
}


@pytest.mark.parametrize("family", list(NULL_KEYS))
def test_a_checkpoint_saved_from_a_config_with_null_keys_loads_in_transformers(tmp_path, family):
    src = tmp_path / "src"
    ref = hf_model(ModelConfig.from_hf_config(RAW_BASE[family]), seed=3)
    ref.save_pretrained(src)
    (src / "config.json").write_text(json.dumps({**RAW_BASE[family], **NULL_KEYS[family]}))
    with pytest.raises(Exception, match="NoneType"):  # the source itself is transformers' to refuse
        transformers.AutoConfig.from_pretrained(src)
    model = from_pretrained(src)
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert not [k for k in NULL_KEYS[family] if k in saved and saved[k] is None]
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="eager",
                                                              dtype=torch.float32).eval()
    ids, cu = packed_batch(model.config.vocab_size)
    with torch.no_grad():
        expected = ref_logits_per_sequence(ref, ids, cu)
        assert max_rel_err(ref_logits_per_sequence(again, ids, cu), expected) <= RTOL
        assert max_rel_err(model.logits(model(ids, cu_seqlens=cu)), expected) <= RTOL
    assert ModelConfig.from_hf_config(saved).to_hf_config() == saved  # saved again, the same
