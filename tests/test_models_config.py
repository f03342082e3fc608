"""ModelConfig from real-world config.json files, and rotary tables against transformers' at full size."""
import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from r1fast.models import CausalLM, ModelConfig  # noqa: E402
from r1fast.models.rotary import RotaryEmbedding  # noqa: E402
from r1fast.testing import max_rel_err  # noqa: E402

# Abridged from the published config.json files (transformers 4.x layout: rope_theta / rope_scaling).
QWEN25_15B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02,
    "intermediate_size": 8960, "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2",
    "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}
LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 128256}
QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02,
    "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}
# Qwen's documented long-context setting (legacy "type" key), and a YaRN with DeepSeek-style mscale.
QWEN25_YARN = {**QWEN25_15B_INSTRUCT, "max_position_embeddings": 131072,
               "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
QWEN3_YARN_MSCALE = {**QWEN3_06B, "rope_scaling": {"rope_type": "yarn", "factor": 8.0, "beta_fast": 16,
                                                    "original_max_position_embeddings": 4096, "mscale": 1.0,
                                                    "mscale_all_dim": 0.5, "truncate": False}}
MISTRAL_7B_V01 = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000}
# head_dim 128 where hidden / heads is 160
MISTRAL_NEMO_INSTRUCT = {
    "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 1024000, "model_type": "mistral",
    "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 131072}
REAL = {"qwen2.5-1.5b": QWEN25_15B_INSTRUCT, "llama3.2-1b": LLAMA32_1B, "qwen3-0.6b": QWEN3_06B,
        "qwen2.5-yarn": QWEN25_YARN, "qwen3-yarn-mscale": QWEN3_YARN_MSCALE, "mistral-7b-v0.1": MISTRAL_7B_V01,
        "mistral-nemo": MISTRAL_NEMO_INSTRUCT}
ROTARY = {"llama": transformers.models.llama.modeling_llama.LlamaRotaryEmbedding,
          "qwen2": transformers.models.qwen2.modeling_qwen2.Qwen2RotaryEmbedding,
          "qwen3": transformers.models.qwen3.modeling_qwen3.Qwen3RotaryEmbedding,
          "mistral": transformers.models.mistral.modeling_mistral.MistralRotaryEmbedding}


def test_real_configs_read():
    q = ModelConfig.from_hf_config(QWEN25_15B_INSTRUCT)
    assert (q.head_dim, q.num_key_value_heads, q.attention_bias, q.o_proj_bias, q.qk_norm) == (128, 2, True, False, False)
    assert q.tie_word_embeddings and q.rope_scaling is None and q.rope_theta == 1e6 and q.dtype == torch.bfloat16
    assert q.extra["max_window_layers"] == 21  # carried through for saving
    ll = ModelConfig.from_hf_config(LLAMA32_1B)
    assert ll.rope_scaling["rope_type"] == "llama3" and ll.eos_token_id == [128001, 128008, 128009]
    assert ll.rms_norm_eps == 1e-5 and ll.head_dim == 64
    q3 = ModelConfig.from_hf_config(QWEN3_06B)
    assert q3.qk_norm and q3.head_dim == 128 and q3.hidden_size // q3.num_attention_heads == 64
    m = ModelConfig.from_hf_config(MISTRAL_7B_V01)
    assert (m.head_dim, m.num_key_value_heads, m.attention_bias, m.qk_norm, m.mlp_bias) == (128, 8, False, False, False)
    assert m.sliding_window == m.max_sequence_length == 4096 and m.bos_token_id == 1 and m.eos_token_id == 2
    nemo = ModelConfig.from_hf_config(MISTRAL_NEMO_INSTRUCT)
    assert nemo.head_dim == 128 and nemo.sliding_window is None and nemo.max_sequence_length == 1024000


@pytest.mark.parametrize("name", list(REAL))
def test_config_survives_transformers_round_trip(name):
    cfg = ModelConfig.from_hf_config(REAL[name])
    hf = transformers.AutoConfig.for_model(cfg.model_type, **{k: v for k, v in cfg.to_hf_config().items()
                                                              if k != "model_type"})
    again = ModelConfig.from_hf_config(hf.to_dict())
    for field in ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
                  "rope_scaling", "tie_word_embeddings", "attention_bias", "qk_norm", "eos_token_id",
                  "sliding_window", "max_position_embeddings"):
        assert getattr(again, field) == getattr(cfg, field), field


@pytest.mark.parametrize("name", list(REAL))
def test_a_transformers_config_object_reads_as_its_config_json(name):
    # AutoConfig.from_pretrained(folder) was refused: "from_hf_config takes a dict or a path, got Qwen2Config"
    hf = transformers.AutoConfig.for_model(REAL[name]["model_type"],
                                           **{k: v for k, v in REAL[name].items() if k != "model_type"})
    got, expected = ModelConfig.from_hf_config(hf), ModelConfig.from_hf_config(REAL[name])
    assert dataclasses.replace(got, extra={}) == dataclasses.replace(expected, extra={})
    assert got.sliding_window == expected.sliding_window


@pytest.mark.parametrize("name", list(REAL))
def test_rotary_tables_match_transformers_at_full_size(name):
    cfg = ModelConfig.from_hf_config(REAL[name])
    hf_cfg = transformers.AutoConfig.for_model(cfg.model_type, **{k: v for k, v in cfg.to_hf_config().items()
                                                                  if k != "model_type"})
    module = ROTARY[cfg.model_type](hf_cfg)
    positions = torch.tensor([0, 1, 7, 100, 4095, 8191, 8192, 30000, 100000])
    x = torch.zeros(1, dtype=torch.float32)
    ref_cos, ref_sin = module(x, positions[None])
    cos, sin = RotaryEmbedding(cfg).cos_sin(positions, torch.float32)
    assert torch.equal(cos, ref_cos[0]) and torch.equal(sin, ref_sin[0])


# config.json files that lean on transformers' fallbacks: yarn without original_max_position_embeddings
# (-> max_position_embeddings), yarn with factor null (-> max / original), llama3 with the original length
# at the top level (Phi-3 style), "swish" for SiLU, and sliding-window flags that slide no layer.
FALLBACKS = {
    "yarn-no-original": {**QWEN3_06B, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
    "yarn-null-factor": {**QWEN25_YARN, "rope_scaling": {"type": "yarn", "factor": None,
                                                         "original_max_position_embeddings": 32768}},
    "llama3-top-level-original": {**LLAMA32_1B, "original_max_position_embeddings": 4096,
                                  "rope_scaling": {**LLAMA32_1B["rope_scaling"], "original_max_position_embeddings": 8192}},
    "swish-no-sliding-layer": {**QWEN25_15B_INSTRUCT, "hidden_act": "swish", "use_sliding_window": True,
                               "max_window_layers": 28},
}


@pytest.mark.parametrize("name", list(FALLBACKS))
def test_configs_relying_on_transformers_fallbacks_rotate_as_transformers_does(name):
    raw = FALLBACKS[name]
    cfg = ModelConfig.from_hf_config(raw)
    hf_cfg = transformers.AutoConfig.for_model(raw["model_type"], **{k: v for k, v in raw.items() if k != "model_type"})
    module = ROTARY[cfg.model_type](hf_cfg)
    positions = torch.tensor([0, 1, 7, 100, 4095, 8191, 8192, 30000, 100000])
    ref_cos, ref_sin = module(torch.zeros(1, dtype=torch.float32), positions[None])
    cos, sin = RotaryEmbedding(cfg).cos_sin(positions, torch.float32)
    assert torch.equal(cos, ref_cos[0]) and torch.equal(sin, ref_sin[0])


def test_configs_transformers_would_read_otherwise_are_refused():
    with pytest.raises(ValueError, match="model_type='mistral'"):
        ModelConfig.from_hf_config({**LLAMA32_1B, "model_type": "mistral"})
    # transformers 5 takes rope_scaling in place of rope_parameters: a different theta there is ambiguous
    with pytest.raises(ValueError, match="rope settings disagree: rope_parameters' rope_theta is 1000000.0 but "
                                         "transformers would read 10000"):
        ModelConfig.from_hf_config({**{k: v for k, v in QWEN3_06B.items() if k != "rope_theta"},
                                    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
                                    "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                     "original_max_position_embeddings": 32768}})
    # a rope_scaling theta beside another top-level one: transformers 5 reads the first, transformers 4 the second
    with pytest.raises(ValueError, match="rope settings disagree: rope_scaling's rope_theta is 500.0, the top-level "
                                         "rope_theta 500000.0"):
        ModelConfig.from_hf_config({**LLAMA32_1B, "rope_scaling": {"rope_type": "linear", "factor": 2.0,
                                                                   "rope_theta": 500.0}})
    # alone, or agreeing, it is what transformers 5 reads (logits: test_models.py ROPE_VARIANTS)
    no_top = {k: v for k, v in LLAMA32_1B.items() if k != "rope_theta"}
    cfg = ModelConfig.from_hf_config({**no_top, "rope_scaling": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e2}})
    assert (cfg.rope_theta, cfg.rope_scaling) == (500.0, {"rope_type": "linear", "factor": 2.0})
    assert ModelConfig.from_hf_config({**LLAMA32_1B, "rope_scaling": {"rope_type": "default",
                                                                      "rope_theta": 5e5}}).rope_theta == 5e5
    # an empty rope_scaling is no rope_scaling (transformers then reads rope_parameters)
    q3 = {k: v for k, v in QWEN3_06B.items() if k != "rope_theta"}
    assert ModelConfig.from_hf_config({**q3, "rope_scaling": {}, "rope_parameters": {"rope_type": "default",
                                                                                    "rope_theta": 1e6}}).rope_theta == 1e6
    # keys transformers ignores for Qwen2 are ignored here too
    assert not ModelConfig.from_hf_config({**QWEN25_15B_INSTRUCT, "mlp_bias": True}).mlp_bias


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 4.0},
    {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 8192},
    {"type": "yarn", "factor": None, "beta_fast": 8},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
], ids=["yarn-no-original", "yarn-null-factor", "yarn-neither", "llama3-no-original"])
def test_agreeing_rope_scaling_and_rope_parameters_with_fallbacks_load(rope):
    # The same yarn/llama3 dict under both keys, relying on transformers' fallbacks (original length from
    # max_position_embeddings, a null yarn factor from max / original): both keys say the same, transformers loads
    # it, and it was refused as "lacks key(s)" while the two were compared before the fallbacks were filled in.
    raw = {**QWEN25_15B_INSTRUCT, "rope_scaling": dict(rope), "rope_parameters": {**rope, "rope_theta": 1e6}}
    cfg = ModelConfig.from_hf_config(raw)
    assert cfg == ModelConfig.from_hf_config({**QWEN25_15B_INSTRUCT, "rope_scaling": dict(rope)})
    theirs = transformers.Qwen2Config.from_dict({k: v for k, v in raw.items() if k != "model_type"})
    module = ROTARY["qwen2"](theirs)
    positions = torch.tensor([0, 1, 100, 8191, 32767, 100000])
    ref_cos, ref_sin = module(torch.zeros(1, dtype=torch.float32), positions[None])
    cos, sin = RotaryEmbedding(cfg).cos_sin(positions, torch.float32)
    assert torch.equal(cos, ref_cos[0]) and torch.equal(sin, ref_sin[0])
    # a real disagreement is still refused once the fallbacks are filled in
    with pytest.raises(ValueError, match="rope_scaling .* and rope_parameters .* disagree"):
        ModelConfig.from_hf_config({**raw, "rope_parameters": {**rope, "rope_theta": 1e6, "factor": 2.0}})


@pytest.mark.parametrize("base", [QWEN25_15B_INSTRUCT, QWEN3_06B], ids=["qwen2", "qwen3"])
def test_sliding_layers_named_in_layer_types_set_the_window(base):
    # transformers takes each layer's attention from layer_types (which it saves) before max_window_layers;
    # the window is enforced on the sequences run (test_models.py), sliding layers without one are refused
    two = {**base, "num_hidden_layers": 2, "sliding_window": 8}
    with pytest.raises(ValueError, match=r"layer_types names sliding_attention layers but use_sliding_window=False"):
        ModelConfig.from_hf_config({**two, "use_sliding_window": False,
                                    "layer_types": ["sliding_attention", "full_attention"]})
    assert ModelConfig.from_hf_config({**two, "use_sliding_window": True,
                                       "layer_types": ["sliding_attention", "full_attention"]}).sliding_window == 8
    assert ModelConfig.from_hf_config({**two, "use_sliding_window": True,
                                       "layer_types": ["full_attention"] * 2}).sliding_window is None
    fields = {k: v for k, v in two.items() if k not in ("model_type", "use_sliding_window", "torch_dtype")}
    cfg = transformers.AutoConfig.for_model(base["model_type"], **fields, use_sliding_window=True,
                                            layer_types=["sliding_attention", "full_attention"])
    assert ModelConfig.from_hf_config(cfg.to_dict()).sliding_window == 8


MISTRAL_MINIMAL = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 100,
                   "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 8}
# config.json files as MistralConfig reads them: absent keys take its defaults (8 kv heads, a 4096 window,
# 131072 positions, bos 1 / eos 2), a null head_dim is hidden // heads even when that leaves rows over, and
# the Qwen/Llama keys it does not read change nothing
MISTRAL_READS = {
    "keys-absent": MISTRAL_MINIMAL,
    "nulls-and-floor": {**MISTRAL_MINIMAL, "hidden_size": 50, "num_attention_heads": 4, "num_key_value_heads": 2,
                        "head_dim": None, "sliding_window": None, "bos_token_id": None, "eos_token_id": [2, 7]},
    "keys-it-ignores": {**MISTRAL_MINIMAL, "num_key_value_heads": 2, "attention_bias": True, "mlp_bias": True,
                        "use_sliding_window": False, "max_window_layers": 0, "sliding_window": 300},
    "rope-parameters-tied": {**MISTRAL_MINIMAL, "num_key_value_heads": 4, "head_dim": 16, "tie_word_embeddings": True,
                             "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e8,
                                                 "original_max_position_embeddings": 4096},
                             "max_position_embeddings": 16384},
}


@pytest.mark.parametrize("name", list(MISTRAL_READS))
def test_mistral_config_json_is_read_as_mistral_config_reads_it(name):
    raw = MISTRAL_READS[name]
    cfg = ModelConfig.from_hf_config(raw)
    theirs = transformers.MistralConfig.from_dict({k: v for k, v in raw.items() if k != "model_type"})
    for field in ("num_key_value_heads", "head_dim", "sliding_window", "max_position_embeddings", "rms_norm_eps",
                  "bos_token_id", "eos_token_id", "tie_word_embeddings"):
        assert getattr(cfg, field) == getattr(theirs, field), field
    assert cfg.rope_theta == theirs.rope_parameters["rope_theta"] and not cfg.attention_bias
    with torch.device("meta"):
        model, ours = transformers.MistralForCausalLM(theirs), CausalLM(cfg)
    shapes = {k: tuple(t.shape) for k, t in ours.hf_tensors().items()}
    assert shapes == {k: tuple(p.shape) for k, p in model.state_dict().items()
                      if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    module = ROTARY["mistral"](theirs)
    positions = torch.tensor([0, 1, 100, 4095, 4096, 16383])
    ref_cos, ref_sin = module(torch.zeros(1, dtype=torch.float32), positions[None])
    cos, sin = RotaryEmbedding(cfg).cos_sin(positions, torch.float32)
    assert torch.equal(cos, ref_cos[0]) and torch.equal(sin, ref_sin[0])


@pytest.mark.parametrize("change, message", [
    ({"num_key_value_heads": None}, "num_key_value_heads is null, which transformers' MistralConfig refuses"),
    ({"sliding_window": None, "layer_types": ["sliding_attention", "full_attention"]},
     "layer_types names sliding_attention layers but sliding_window is null: transformers' AutoModelForCausalLM "
     "reads a mistral config.json with layer_types as MinistralForCausalLM"),
    ({"layer_types": ["chunked_attention"] * 2}, r"layer_types \['chunked_attention'\] are not supported"),
    ({"sliding_window": "4096"}, "config.json: sliding_window must be a positive int, got '4096'"),
    ({"sliding_window": 0}, "config.json: sliding_window must be a positive int, got 0"),
    ({"num_attention_heads": 12}, r"num_key_value_heads is absent, which MistralConfig reads as 8, and "
                                  r"num_attention_heads \(12\) is not a multiple of it"),
])
def test_mistral_configs_transformers_cannot_run_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config({**MISTRAL_MINIMAL, **change})


QWEN_CONFIG_CLASSES = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}


def _qwen_minimal(model_type, **change):
    arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[model_type]
    return {"architectures": [arch], "model_type": model_type, "vocab_size": 50, "hidden_size": 256,
            "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 64, "head_dim": 4, **change}


# config.json files as Qwen2Config/Qwen3Config read them: an absent num_key_value_heads is the class's 32
# (k_proj/v_proj of 32 heads), not the query heads (which null means); use_sliding_window without a
# sliding_window key slides the layers from max_window_layers on by the class's 4096
QWEN_READS = {
    "kv-heads-absent": {},
    "kv-heads-null": {"num_key_value_heads": None},
    "window-absent": {"use_sliding_window": True, "max_window_layers": 1},
    "window-null": {"use_sliding_window": True, "max_window_layers": 1, "sliding_window": None},
}


@pytest.mark.parametrize("model_type", list(QWEN_CONFIG_CLASSES))
@pytest.mark.parametrize("name", list(QWEN_READS))
def test_qwen_config_json_is_read_as_its_config_class_reads_it(model_type, name):
    raw = _qwen_minimal(model_type, **QWEN_READS[name])
    cfg = ModelConfig.from_hf_config(raw)
    theirs = QWEN_CONFIG_CLASSES[model_type].from_dict({k: v for k, v in raw.items() if k != "model_type"})
    theirs_window = theirs.sliding_window if "sliding_attention" in theirs.layer_types else None
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.sliding_window) == (
        theirs.num_key_value_heads, theirs.head_dim, theirs_window)
    with torch.device("meta"):
        model, ours = transformers.AutoModelForCausalLM.from_config(theirs), CausalLM(cfg)
    assert {k: tuple(t.shape) for k, t in ours.hf_tensors().items()} == {
        k: tuple(p.shape) for k, p in model.state_dict().items()}


@pytest.mark.parametrize("model_type", list(QWEN_CONFIG_CLASSES))
def test_qwen_without_kv_heads_and_heads_not_a_multiple_of_32_is_refused(model_type):
    # transformers builds 32 kv heads for 12 query heads and fails in the forward
    with pytest.raises(ValueError, match=rf"num_key_value_heads is absent, which {model_type.capitalize()}Config "
                                         r"reads as 32, and num_attention_heads \(12\) is not a multiple of it"):
        ModelConfig.from_hf_config(_qwen_minimal(model_type, num_attention_heads=12, head_dim=16))


def test_mistral_has_no_attention_bias_and_saves_its_window():
    kw = dict(architecture="MistralForCausalLM", vocab_size=32, hidden_size=32, intermediate_size=48,
              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="MistralForCausalLM has no attention bias in transformers"):
        ModelConfig(**kw, attention_bias=True)
    # MistralConfig's own defaults when built directly; written out so no reader has to fall back on them
    assert ModelConfig(**kw).to_hf_config()["sliding_window"] == 4096
    assert ModelConfig(**kw, extra={"sliding_window": None}).to_hf_config()["sliding_window"] is None
    assert ModelConfig(**{**kw, "hidden_size": 50}).head_dim == 12  # 50 // 4, as MistralConfig


def test_llama_heads_must_divide_the_hidden_size_as_transformers_asks():
    # a head_dim given explicitly let r1fast build and save a Llama that transformers refuses to load
    with pytest.raises(ValueError, match=r"LlamaForCausalLM needs hidden_size \(64\) to be a multiple of "
                                         r"num_attention_heads \(6\)"):
        ModelConfig(architecture="LlamaForCausalLM", vocab_size=32, hidden_size=64, intermediate_size=96,
                    num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=2, head_dim=16)
    ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=32, hidden_size=64, intermediate_size=96,
                num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=2, head_dim=16)  # Qwen3 takes it


@settings(max_examples=12, deadline=None)
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=5), seed=st.integers(0, 2**16))
def test_packing_property(lengths, seed):
    """Any packing of any lengths equals running each sequence alone."""
    cfg = ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=20, hidden_size=16, intermediate_size=20,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=6)
    model = _model(cfg)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 20, (sum(lengths),), generator=g)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    with torch.no_grad():
        packed = model(ids, cu_seqlens=cu)
        alone = torch.cat([model(ids[a:b]) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    assert max_rel_err(packed, alone) <= 1e-5


_MODELS = {}


def _model(cfg):
    if "m" not in _MODELS:
        model = _MODELS["m"] = CausalLM(cfg)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # weights large enough that attention is far from uniform
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return _MODELS["m"]


def _base(**change):
    hf = {k: v for k, v in QWEN3_06B.items()}
    hf.update(change)
    return hf


LLAMA3_ROPE = LLAMA32_1B["rope_scaling"]


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": [1, 2]}, "config.json: rope_parameters must be an object or null, got \\[1, 2\\]"),
    ({"rope_parameters": "default"}, "config.json: rope_parameters must be an object"),
    ({"rope_scaling": "linear"}, "config.json: rope_scaling must be an object"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "config.json: rope_scaling factor must be a positive"),
    ({"rope_scaling": {"rope_type": "linear", "factor": float("nan")}}, "config.json: rope_scaling factor"),
    ({"rope_scaling": {**LLAMA3_ROPE, "low_freq_factor": "1"}}, "config.json: rope_scaling low_freq_factor"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 0}},
     "config.json: rope_scaling original_max_position_embeddings must be a positive int, got 0"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 0}},
     "original_max_position_embeddings must be a positive int"),
    ({"num_hidden_layers": "2", "use_sliding_window": True}, "config.json: num_hidden_layers must be a positive int"),
    ({"max_window_layers": "x", "use_sliding_window": True}, "config.json: max_window_layers must be a non-negative"),
    ({"dtype": ["float32"]}, "config.json: dtype/torch_dtype must be a dtype name"),
    ({"torch_dtype": ["float32"]}, "config.json: dtype/torch_dtype must be a dtype name"),
    ({"rope_theta": "abc"}, "config.json: rope_theta must be a positive finite number, got 'abc'"),
    ({"rope_theta": float("inf")}, "config.json: rope_theta must be a positive finite"),
    ({"rms_norm_eps": float("inf")}, "config.json: rms_norm_eps must be a positive finite number, got inf"),
    ({"max_position_embeddings": -5}, "config.json: max_position_embeddings must be a positive int, got -5"),
    ({"max_position_embeddings": "abc"}, "config.json: max_position_embeddings must be a positive int"),
    ({"partial_rotary_factor": "1.0"}, "config.json: partial_rotary_factor must be a positive finite number, got '1.0'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "1e6"}}, "config.json: rope_theta must be"),
    # a string "false" is truthy: read as a flag it would tie the embeddings it says not to
    ({"tie_word_embeddings": "false"}, "config.json: tie_word_embeddings must be true or false .*got 'false'"),
    ({"tie_word_embeddings": 0}, "config.json: tie_word_embeddings must be true or false"),
    ({"bos_token_id": "1"}, "config.json: bos_token_id must be a non-negative int or null, got '1'"),
    ({"bos_token_id": [1]}, "config.json: bos_token_id must be a non-negative int or null"),
    ({"eos_token_id": -1}, "config.json: eos_token_id must be a non-negative int, a list of them, or null"),
    ({"eos_token_id": [2, "3"]}, "config.json: eos_token_id must be"),
    ({"eos_token_id": True}, "config.json: eos_token_id must be"),
])
def test_mistyped_config_values_name_config_json_and_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config(_base(**change))


@pytest.mark.parametrize("change, message", [
    ({"mlp_bias": "false"}, "config.json: mlp_bias must be true or false .*got 'false'"),
    ({"attention_bias": "false"}, "config.json: attention_bias must be true or false"),
    ({"torch_dtype": "int8"}, "config.json: torch_dtype 'int8' is not one of"),
])
def test_mistyped_llama_flags_and_dtype_are_clear_errors(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config({**LLAMA32_1B, **change})


def test_flags_and_token_ids_that_are_well_typed_are_read():
    cfg = ModelConfig.from_hf_config(_base(tie_word_embeddings=None, bos_token_id=None, eos_token_id=[2, 7]))
    assert cfg.tie_word_embeddings is False and cfg.bos_token_id is None and cfg.eos_token_id == [2, 7]
    assert ModelConfig.from_hf_config(_base(tie_word_embeddings=True, eos_token_id=3)).tie_word_embeddings is True


@pytest.mark.parametrize("keys, expected", [
    ({"torch_dtype": "bfloat16", "dtype": None}, torch.bfloat16),   # null dtype: the older key is read
    ({"torch_dtype": "bfloat16", "dtype": "float16"}, torch.float16),
    ({"torch_dtype": None, "dtype": None}, None),
    # transformers reads the name as an attribute of torch: these were refused as "not one of [...]"
    ({"torch_dtype": "half"}, torch.float16),
    ({"dtype": "float", "torch_dtype": "bfloat16"}, torch.float32),
    ({"dtype": "double"}, torch.float64),
])
def test_checkpoint_dtype_is_read_as_transformers_reads_it(keys, expected):
    # the dtype from_pretrained(dtype=None) loads in, as transformers' dtype="auto" does
    raw = {**QWEN3_06B, **keys}
    assert ModelConfig.from_hf_config(raw).dtype == expected
    assert transformers.Qwen3Config.from_dict({k: v for k, v in raw.items() if k != "model_type"}).dtype == expected


@pytest.mark.parametrize("keys, why", [
    # the key as written (it said torch_dtype of a config holding dtype alone), and the name to write instead
    ({"dtype": "bf16"}, "dtype 'bf16' is not one of {}: use 'bfloat16', the name transformers reads"),
    ({"dtype": None, "torch_dtype": "torch.float16"},
     "torch_dtype 'torch.float16' is not one of {}: use 'float16', the name transformers reads"),
    ({"dtype": "float8_e4m3fn"}, "dtype 'float8_e4m3fn' is not one of {}: r1fast does not load float8_e4m3fn weights "
                                 "(a quantized checkpoint? load its bf16 or fp32 original)"),
    ({"dtype": "float8"}, "dtype 'float8' is not one of {}: not a torch dtype name"),
    ({"dtype": "__class__"}, "dtype '__class__' is not one of {}: not a torch dtype name"),
])
def test_an_unknown_checkpoint_dtype_names_its_key_and_what_to_write(keys, why):
    raw = {k: v for k, v in QWEN3_06B.items() if k != "torch_dtype"}
    with pytest.raises(ValueError) as raised:
        ModelConfig.from_hf_config({**raw, **keys})
    assert str(raised.value) == "config.json: " + why.format(['bfloat16', 'float16', 'float32', 'float64'])


def test_attention_dropout_is_not_applied_and_says_so(caplog):
    # transformers applies attention_dropout in training mode (logits off by ~0.8 at 0.3); r1fast never does
    with caplog.at_level("WARNING", logger="r1fast.models.config"):
        ModelConfig.from_hf_config({**QWEN3_06B, "attention_dropout": 0.0})
        assert not caplog.records
        ModelConfig.from_hf_config({**QWEN3_06B, "attention_dropout": 0.1})
    assert "attention_dropout=0.1 is not applied" in caplog.text
    with pytest.raises(ValueError, match="config.json: attention_dropout must be a non-negative finite number"):
        ModelConfig.from_hf_config({**QWEN3_06B, "attention_dropout": "0.1"})


def test_custom_code_named_in_auto_map_is_not_run_and_says_so(caplog):
    """A checkpoint with auto_map (its own modeling code, which transformers runs only with trust_remote_code=True)
    loaded silently as r1fast's own Qwen3: a warning now names the classes left unused."""
    auto_map = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    with caplog.at_level("WARNING", logger="r1fast.models.config"):
        ModelConfig.from_hf_config(QWEN3_06B)
        assert not caplog.records
        cfg = ModelConfig.from_hf_config({**QWEN3_06B, "auto_map": auto_map})
    assert len(caplog.records) == 1
    assert ("auto_map names custom code (AutoConfig: configuration_x.XConfig, AutoModelForCausalLM: "
            "modeling_x.XForCausalLM) that r1fast does not run: it builds its own Qwen3ForCausalLM (model_type "
            "'qwen3')") in caplog.text
    assert cfg.architecture == "Qwen3ForCausalLM"
