"""r1fast.models: bad configs, checkpoints and inputs are clear errors naming the problem."""
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from r1fast.models import CausalLM, ModelConfig, from_pretrained, load_tokenizer

TINY = dict(architecture="Qwen2ForCausalLM", vocab_size=32, hidden_size=16, intermediate_size=24,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture
def ckpt(tmp_path):
    """A valid tiny checkpoint written by r1fast, sharded so that shard-level damage can be tested."""
    model = CausalLM(ModelConfig(**TINY))
    model.save_pretrained(tmp_path / "ck", max_shard_size="4KB")
    return tmp_path / "ck"


def _index(ck):
    return json.loads((ck / "model.safetensors.index.json").read_text())


def _shard_of(ck, key):
    return ck / _index(ck)["weight_map"][key]


def _rewrite_shard(ck, key, fn):
    shard = _shard_of(ck, key)
    tensors = load_file(shard)
    fn(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def test_valid_fixture_loads(ckpt):
    assert len(set(_index(ckpt)["weight_map"].values())) > 2
    assert from_pretrained(ckpt).config.architecture == "Qwen2ForCausalLM"


@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "GPT2LMHeadModel"])
def test_unsupported_architecture_is_named(ckpt, arch):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = [arch]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"unsupported architecture '{arch}'"):
        from_pretrained(ckpt)
    with pytest.raises(ValueError, match="unsupported architecture 'Phi3ForCausalLM'"):
        ModelConfig(architecture="Phi3ForCausalLM")


@pytest.mark.parametrize("change, message", [
    ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
    ({"use_sliding_window": True, "sliding_window": 0, "max_window_layers": 0}, "sliding_window must be a positive int"),
    ({"use_sliding_window": False, "sliding_window": 8, "layer_types": ["sliding_attention"] * 2},
     "layer_types names sliding_attention layers but use_sliding_window=False"),
    ({"layer_types": ["chunked_attention"] * 2}, r"layer_types \['chunked_attention'\] are not supported"),
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}},
     "unsupported rope type 'longrope'"),
    ({"rope_scaling": {"rope_type": "dynamic"}}, r"rope_scaling of type 'dynamic' lacks key\(s\) \['factor'\]"),
    # transformers' linear/yarn rotations read a legacy rope_scaling's partial_rotary_factor (rotating part of each
    # head); it loaded as full rotary
    ({"rope_scaling": {"type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}},
     r"rope_scaling partial_rotary_factor=0.5 is not supported \(only full rotary\)"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8,
                       "partial_rotary_factor": 0.25}}, "rope_scaling partial_rotary_factor=0.25 is not supported"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "rope_parameters partial_rotary_factor=0.5 is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks key.*low_freq_factor"),
    # null factors reached the rotary tables as a bare TypeError ("unsupported operand ... 'NoneType'")
    ({"rope_scaling": {"rope_type": "linear", "factor": None}},
     r"rope_scaling of type 'linear' lacks key\(s\) \['factor'\] \(absent or null\)"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": None}}, r"type 'dynamic' lacks key\(s\) \['factor'\]"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": None, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8}}, r"type 'llama3' lacks key\(s\) \['low_freq_factor'\]"),
    ({"model_type": "qwen3"}, "model_type='qwen3'"),
    ({"num_key_value_heads": 3, "num_attention_heads": 4}, "multiple of num_key_value_heads"),
    ({"hidden_size": None}, "lacks required key"),
    ({"vocab_size": -3}, "vocab_size must be a positive int"),
    ({"architectures": None, "model_type": "gpt2"}, "names no architecture"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantized checkpoints .*'fp8'"),
])
def test_bad_config_values(change, message):
    hf = ModelConfig(**TINY).to_hf_config(torch.float32)
    hf.pop("rope_parameters")
    hf.update(change)
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config(hf)


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5},
                                  {"rope_type": "default", "partial_rotary_factor": 0.25}])
def test_a_partial_rotary_factor_given_to_model_config_is_refused(rope):
    # ModelConfig(...) took it and rotated every dimension, while its saved config.json (rope_parameters) told
    # transformers to rotate part of each head: a checkpoint that loads there as another model
    with pytest.raises(ValueError, match=f"rope_scaling partial_rotary_factor={rope['partial_rotary_factor']} is not "
                                         r"supported \(only full rotary\)"):
        ModelConfig(**{**TINY, "rope_scaling": rope})


def test_rope_scaling_and_rope_parameters_differing_only_by_a_full_partial_rotary_factor_agree():
    # transformers reads partial_rotary_factor 1.0 as no factor; the two dicts were refused as disagreeing
    hf = ModelConfig(**TINY).to_hf_config(torch.float32)
    hf["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    hf["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": hf["rope_theta"],
                             "partial_rotary_factor": 1.0}
    assert ModelConfig.from_hf_config(hf).rope_scaling == {"rope_type": "linear", "factor": 2.0}
    hf["rope_parameters"]["partial_rotary_factor"] = 0.5   # what transformers 5 would not read: still refused
    with pytest.raises(ValueError, match="partial_rotary_factor=0.5 is not supported"):
        ModelConfig.from_hf_config(hf)


@pytest.mark.parametrize("change", [
    {"partial_rotary_factor": 0.5, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                       "partial_rotary_factor": 1.0}},
    {"partial_rotary_factor": 0.5, "rope_scaling": {"type": "linear", "factor": 2.0, "partial_rotary_factor": 1.0}},
])
def test_a_top_level_partial_rotary_factor_that_transformers_does_not_read_loads(change):
    # transformers reads the factor of rope_scaling (else rope_parameters) and sets the top-level one there only
    # where it has none: these are full rotary in transformers, and were refused as 'partial_rotary_factor=0.5'
    hf = ModelConfig(**TINY).to_hf_config(torch.float32)
    hf.pop("rope_parameters")
    hf.update(change)
    saved = ModelConfig.from_hf_config(hf).to_hf_config()
    # its save keeps the 1.0 that overrides the top-level 0.5 (carried through): without it, transformers read 0.5
    # there and r1fast refused to load its own checkpoint
    assert saved["partial_rotary_factor"] == 0.5 and saved["rope_parameters"]["partial_rotary_factor"] == 1.0
    assert ModelConfig.from_hf_config(saved).to_hf_config() == saved
    for scaling in (hf.get("rope_scaling"), hf.get("rope_parameters")):
        if scaling:
            del scaling["partial_rotary_factor"]   # the top-level one is then the one read
    with pytest.raises(ValueError, match=r"^config.json: partial_rotary_factor=0.5 is not supported"):
        ModelConfig.from_hf_config(hf)


def test_hub_cache_folder_points_to_its_snapshot(tmp_path):
    # the folder transformers' cache makes for a hub id holds the files under snapshots/<revision>
    entry = tmp_path / "models--org--tiny"
    (entry / "snapshots" / "0123abc").mkdir(parents=True)
    (entry / "snapshots" / "0123abc" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no config.json .*Hugging Face cache.*snapshots/0123abc"):
        from_pretrained(entry)


def test_bad_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_hf_config(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'[^']*nowhere' does not exist$"):
        from_pretrained(tmp_path / "nowhere")
    for local in ("./nowhere", "../nowhere"):   # relative local paths, not Hub names: no Hub hint
        with pytest.raises(FileNotFoundError, match=r"does not exist$"):
            from_pretrained(local)
    # a file of the checkpoint given for its folder read "does not exist", of a path that is there
    from r1fast.models import load_tokenizer
    for load, what in ((from_pretrained, "checkpoint"), (load_tokenizer, "tokenizer")):
        with pytest.raises(NotADirectoryError, match=rf"^{what} '[^']*config.json' is a file, not a folder: give the "
                                                     rf"folder that holds the checkpoint's files \('{tmp_path}' for"):
            load(tmp_path / "config.json")
    # a Hub name is not fetched: the error says how to make it a local folder
    with pytest.raises(FileNotFoundError, match=r"does not exist; r1fast loads local folders only: .*Hub model.*"
                                                r"snapshot_download\('Qwen/Qwen2\.5-0\.5B-Instruct'"):
        from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")
    # builtin:<size> is a name the trainers build from; the folder loaders said only "does not exist"
    from r1fast.models import load_tokenizer
    for load in (from_pretrained, load_tokenizer):
        with pytest.raises(FileNotFoundError, match=r"'builtin:tiny' does not exist; 'builtin:tiny' names a built-in "
                                                    r"model, not a folder: give the name to a trainer"):
            load("builtin:tiny")


def _refuse_reading_tensors(monkeypatch):
    import r1fast.models.checkpoint as checkpoint

    def read(shard):
        raise AssertionError(f"{shard}'s tensors were read before the stored keys were checked")
    monkeypatch.setattr(checkpoint, "_iter_tensors", read)


def test_missing_tensor(ckpt, monkeypatch):
    # said from the headers: it was said only once every tensor had been read (minutes, for a large model)
    _rewrite_shard(ckpt, "model.norm.weight", lambda t: t.pop("model.norm.weight"))
    _refuse_reading_tensors(monkeypatch)
    with pytest.raises(ValueError, match=r"incomplete: missing \['model.norm.weight'\]"):
        from_pretrained(ckpt)


@pytest.mark.parametrize("key, message", [
    # all three read "for a Qwen2ForCausalLM with this config (is config.json from another model?)"
    ("model.layers.7.mlp.up_proj.weight", "config.json's num_hidden_layers is 2 but the checkpoint holds layer 7"),
    ("v_head.summary.weight", r"not a tensor of a Qwen2ForCausalLM \(its keys start with 'model.' or 'lm_head.'\), "
                              r"e.g. a value head"),
    ("model.layers.1.self_attn.o_proj.bias", r"for a Qwen2ForCausalLM with this config \(is config.json from"),
])
def test_unexpected_tensor(ckpt, key, message, monkeypatch):
    _rewrite_shard(ckpt, "model.norm.weight", lambda t: t.update({key: torch.ones(2)}))
    _refuse_reading_tensors(monkeypatch)   # said from the headers, as a missing tensor is
    with pytest.raises(ValueError, match=rf"model-\d+-of-\d+.safetensors: unexpected tensor '{key}'[: ].*{message}"):
        from_pretrained(ckpt)


def test_a_tensor_stored_in_two_shards_names_both_before_any_tensor_is_read(ckpt, monkeypatch):
    first = _shard_of(ckpt, "model.embed_tokens.weight")
    last = ckpt / sorted(set(_index(ckpt)["weight_map"].values()))[-1]
    assert first != last
    tensors = load_file(last)
    tensors["model.embed_tokens.weight"] = torch.randn(32, 16)
    save_file(tensors, last, metadata={"format": "pt"})
    _refuse_reading_tensors(monkeypatch)   # it was said once the first file's tensors were in memory
    with pytest.raises(ValueError, match=rf"^{re.escape(str(last))}: tensor 'model.embed_tokens.weight' appears in "
                                         rf"more than one file \(also in {first.name}\); .*remove the stale copy$"):
        from_pretrained(ckpt)


def test_misshaped_tensor(ckpt):
    key = "model.layers.1.self_attn.k_proj.weight"
    _rewrite_shard(ckpt, key, lambda t: t.update({key: torch.randn(16, 16)}))
    with pytest.raises(ValueError, match=r"'model.layers.1.self_attn.k_proj.weight' has shape \(16, 16\).*\(8, 16\)"):
        from_pretrained(ckpt)


def test_integer_tensor(ckpt):
    key = "model.layers.0.mlp.down_proj.weight"
    _rewrite_shard(ckpt, key, lambda t: t.update({key: torch.ones(16, 24, dtype=torch.int32)}))
    with pytest.raises(ValueError, match="has dtype torch.int32; weights must be float16"):
        from_pretrained(ckpt)


def test_float8_tensor_refused(ckpt):
    key = "model.layers.0.mlp.up_proj.weight"
    _rewrite_shard(ckpt, key, lambda t: t.update({key: torch.randn(24, 16).to(torch.float8_e4m3fn)}))
    with pytest.raises(ValueError, match="float8_e4m3fn.*quantized checkpoints are not supported"):
        from_pretrained(ckpt)


def test_truncated_shard(ckpt):
    shard = _shard_of(ckpt, "model.layers.1.mlp.up_proj.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read safetensors file|cannot be read"):
        from_pretrained(ckpt)


def test_garbage_shard(ckpt):
    _shard_of(ckpt, "model.norm.weight").write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match="cannot read safetensors file"):
        from_pretrained(ckpt)


_LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 3087467144\n"


def test_git_lfs_pointer_files_are_named(ckpt, tmp_path):
    # a clone without git-lfs holds pointer files: safetensors said "header too large", the tokenizer
    # "tokenizer.json is not valid JSON: Expecting value"
    shard = _shard_of(ckpt, "model.norm.weight")
    shard.write_text(_LFS_POINTER)
    with pytest.raises(ValueError, match=f"{shard.name} is a Git LFS pointer.*git lfs pull"):
        from_pretrained(ckpt)
    _save_tokenizer(tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.json").write_text(_LFS_POINTER)
    with pytest.raises(ValueError, match="tokenizer.json is a Git LFS pointer.*git lfs pull"):
        load_tokenizer(tmp_path / "tok")


def test_missing_shard_and_bad_index(ckpt):
    shard = _shard_of(ckpt, "model.norm.weight")
    os.remove(shard)
    with pytest.raises(FileNotFoundError, match=f"{shard.name}.*missing"):
        from_pretrained(ckpt)
    (ckpt / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    with pytest.raises(ValueError, match="not a valid safetensors index"):
        from_pretrained(ckpt)


def _name_shards(ck, rename):
    index = _index(ck)
    index["weight_map"] = {k: rename(i, v) for i, (k, v) in enumerate(index["weight_map"].items())}
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))


def test_index_entries_naming_shards_by_a_path_inside_the_folder_load(ckpt):
    # "./model-00001-of-00003.safetensors" loads in transformers (it joins the entry to the folder) and was refused
    # as a bad shard file name; "./a" beside "a" is one file, read once
    model = from_pretrained(ckpt)
    expected = dict(model.named_parameters())
    _name_shards(ckpt, lambda i, name: f"./{name}" if i % 2 else name)
    assert any(v.startswith("./") for v in _index(ckpt)["weight_map"].values())
    for name, p in from_pretrained(ckpt).named_parameters():
        assert torch.equal(p, expected[name]), name
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).state_dict()
    for key, tensor in model.hf_tensors().items():
        assert torch.equal(ref[key], tensor), key
    # shards in a subfolder of the checkpoint, named by it
    (ckpt / "shards").mkdir()
    for f in os.listdir(ckpt):
        if f.startswith("model-"):
            os.rename(ckpt / f, ckpt / "shards" / f)
    _name_shards(ckpt, lambda i, name: f"shards/{os.path.basename(name)}")
    for name, p in from_pretrained(ckpt).named_parameters():
        assert torch.equal(p, expected[name]), name


@pytest.mark.parametrize("outside", ["../ck/{}", "shards/../../ck/{}", "{folder}/{}", "", ".", "./"])
def test_index_entries_naming_a_file_outside_the_folder_are_refused(ckpt, outside):
    _name_shards(ckpt, lambda i, name: outside.format(os.path.basename(name), folder=ckpt))
    with pytest.raises(ValueError, match=r"model.safetensors.index.json: bad shard file name"):
        from_pretrained(ckpt)


def test_a_weights_file_that_is_a_folder_is_named(tmp_path, ckpt):
    # safetensors said only "No such device (os error 19)"
    CausalLM(ModelConfig(**TINY)).save_pretrained(tmp_path / "one")
    weights = tmp_path / "one" / "model.safetensors"
    os.rename(weights, tmp_path / "w")
    weights.mkdir()
    with pytest.raises(IsADirectoryError, match=rf"^{weights} is a folder, not a safetensors weights file; put"):
        from_pretrained(tmp_path / "one")
    os.rename(tmp_path / "w", weights / "model.safetensors")
    with pytest.raises(IsADirectoryError, match=r"model.safetensors is a folder.*\(it holds model.safetensors: was "
                                                r"the file copied into a folder of its name\?\)"):
        from_pretrained(tmp_path / "one")
    shard = _shard_of(ckpt, "model.norm.weight")  # a shard the index names
    os.remove(shard)
    shard.mkdir()
    with pytest.raises(IsADirectoryError, match=rf"^{shard} is a folder, not a safetensors weights file"):
        from_pretrained(ckpt)


def test_pickled_weights_refused(tmp_path):
    CausalLM(ModelConfig(**TINY)).save_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle bytes that must never be loaded")
    with pytest.raises(ValueError, match="only pickled weights.*safetensors only"):
        from_pretrained(tmp_path)
    os.remove(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        from_pretrained(tmp_path)


def test_bad_save_arguments(tmp_path):
    model = CausalLM(ModelConfig(**TINY))
    with pytest.raises(ValueError, match="max_shard_size"):
        model.save_pretrained(tmp_path / "x", max_shard_size="lots")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        model.save_pretrained(tmp_path / "file")
    # not an r1fast model: "'DistributedDataParallel' object has no attribute 'hf_tensors'"
    from r1fast.models import save_pretrained

    class Wrapper(torch.nn.Module):   # DDP/FSDP-style: the model under .module
        def __init__(self, module):
            super().__init__()
            self.module = module
    with pytest.raises(TypeError, match=r"saves an r1fast CausalLM, got Wrapper; save the model it wraps: "
                                        r"save_pretrained\(model.module, path\)"):
        save_pretrained(Wrapper(model), tmp_path / "y")
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{k: v for k, v in TINY.items() if k != "architecture"}))
    with pytest.raises(TypeError, match=r"got Qwen2ForCausalLM; a transformers model saves itself"):
        save_pretrained(hf, tmp_path / "y")
    assert not (tmp_path / "y").exists()


def test_forward_input_errors():
    model = CausalLM(ModelConfig(**TINY))
    ids = torch.randint(0, 32, (10,))
    cases = [
        (lambda: model(ids.float()), "input_ids must be a non-empty 1-D int tensor"),
        (lambda: model(ids[None]), "input_ids must be a non-empty 1-D int tensor"),
        (lambda: model(ids[:0]), "input_ids must be a non-empty 1-D int tensor"),
        (lambda: model(ids + 32), r"input_ids must lie in \[0, 32\)"),
        (lambda: model(ids, position_ids=torch.arange(9)), "position_ids must be an int tensor of shape"),
        (lambda: model(ids, cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32)), "end at the token count 10"),
        (lambda: model(ids, cu_seqlens=torch.tensor([0, 4, 4, 10], dtype=torch.int32)), "strictly increasing"),
        (lambda: model(ids, cu_seqlens=torch.tensor([0.0, 10.0])), "cu_seqlens must be a 1-D int32 or int64"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(TypeError, match="input_ids must be a tensor"):
        model([1, 2, 3])
    with pytest.raises(TypeError, match="takes a ModelConfig"):
        CausalLM({"vocab_size": 3})


def test_tokenizer_loads_with_chat_template(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "hello", "world", "user", "assistant", ":"])}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    text = loaded.apply_chat_template([{"role": "user", "content": "hello world"}], tokenize=False)
    assert text.strip() == "user : hello world"
    assert loaded("hello world")["input_ids"] == [2, 3]
    assert loaded.eos_token_id == 1
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path)


def _set_config(ck, **change):
    cfg = json.loads((ck / "config.json").read_text())
    cfg.update(change)
    (ck / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("sharded", [False, True])
def test_config_implying_more_layers_than_stored_is_refused_before_building(tmp_path, sharded):
    # used to build 10**6 layers on the meta device (minutes) before any tensor was looked at
    ck = tmp_path / "ck"
    CausalLM(ModelConfig(**TINY)).save_pretrained(ck, max_shard_size="4KB" if sharded else "5GB")
    _set_config(ck, num_hidden_layers=10**6)
    weights = "model.safetensors.index.json" if sharded else "model.safetensors"
    with pytest.raises(ValueError, match=f"config.json: num_hidden_layers=1000000 but .*{weights} holds layers 0..1"):
        from_pretrained(ck)


@pytest.mark.parametrize("rename, message", [
    # a base-model save (Qwen2Model.save_pretrained): transformers adds the prefix back
    (lambda k: k.removeprefix("model."), r"holds no layers \(its keys, e.g. 'layers.0.input_layernorm.weight', lack the "
                                         r"'model.' prefix: a save of the base model"),
    # a PEFT adapter folder with the base's config.json beside it
    (lambda k: "base_model.model." + k.replace(".weight", ".lora_A.weight"),
     r"holds no layers \(its keys, e.g. 'base_model.model.lm_head.lora_A.weight', are a PEFT/LoRA adapter's"),
    # a state dict saved from a wrapped model: DDP/FSDP's and torch.compile's prefixes before transformers' names
    (lambda k: "module." + k, r"holds no layers \(its keys, e.g. 'module.model.layers.0.input_layernorm.weight', "
                              r"carry the prefix 'module.' before transformers' names"),
    (lambda k: "_orig_mod." + k, r"holds no layers \(its keys, .* carry the prefix '_orig_mod.'"),
])
def test_weights_in_another_layout_are_named(tmp_path, rename, message):
    # both read "num_hidden_layers=2 but ... holds no layers", as if the file were empty or truncated
    ck = tmp_path / "ck"
    CausalLM(ModelConfig(**TINY)).save_pretrained(ck)
    tensors = load_file(ck / "model.safetensors")
    save_file({rename(k): v for k, v in tensors.items()}, ck / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=message):
        from_pretrained(ck)


def test_a_peft_adapter_folder_is_named_as_one(tmp_path):
    # peft's (and TRL's) save of a LoRA run holds adapter_config.json and adapter_model.safetensors, no config.json:
    # it read "no config.json at .../config.json", as a folder saved or copied part way
    ck = tmp_path / "lora"
    ck.mkdir()
    (ck / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "Qwen/Q"}))
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 2)}, ck / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no config.json at .*config.json \(.*lora holds a PEFT/LoRA adapter "
                                                r"of 'Qwen/Q', not a model: merge it into its base model"):
        from_pretrained(ck)
    with pytest.raises(FileNotFoundError, match=r"no tokenizer files .* \(.*lora holds a PEFT/LoRA adapter of 'Qwen/Q'"):
        load_tokenizer(ck)   # a trainer reads the tokenizer first
    (ck / "adapter_config.json").write_text("{")   # damaged: still named an adapter's folder
    with pytest.raises(FileNotFoundError, match=r"holds a PEFT/LoRA adapter, not a model"):
        from_pretrained(ck)


@pytest.mark.parametrize("change, message", [
    ({"vocab_size": 10**12}, r"'model.embed_tokens.weight' has shape \(32, 16\), but .*config.json implies "
                             r"\(1000000000000, 16\) \(vocab_size, hidden_size\)"),
    ({"hidden_size": 10**12}, r"'model.embed_tokens.weight' has shape \(32, 16\), but .*config.json implies"),
    ({"intermediate_size": 10**12}, r"'model.layers.0.mlp.gate_proj.weight' has shape \(24, 16\).*intermediate_size"),
    ({"num_attention_heads": 10**12, "num_key_value_heads": 10**12},
     r"'model.layers.0.self_attn.q_proj.weight' has shape \(16, 16\).*num_attention_heads x head_dim"),
    ({"head_dim": 10**12}, r"'model.layers.0.self_attn.q_proj.weight' has shape \(16, 16\).*head_dim"),
])
def test_huge_config_sizes_are_refused_from_the_headers(ckpt, change, message):
    # used to try allocating terabytes, failing with the allocator's message
    _set_config(ckpt, **change)
    with pytest.raises(ValueError, match=message):
        from_pretrained(ckpt)


def test_header_check_agrees_with_the_model_layout():
    from r1fast.models.checkpoint import _expected_shapes

    for arch in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        cfg = ModelConfig(**{**TINY, "architecture": arch, "head_dim": 6})
        shapes = {k: tuple(v.shape) for k, v in CausalLM(cfg).hf_tensors().items()}
        for key, shape in _expected_shapes(cfg).items():
            assert shapes[key] == shape, (arch, key)


def _refuse_building(monkeypatch):
    import r1fast.models.decoder as decoder

    def build(*a, **k):
        raise AssertionError("the model was built before the checkpoint's headers were checked")
    monkeypatch.setattr(decoder, "CausalLM", build)


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.pop("model.embed_tokens.weight"), r"incomplete: missing \['model.embed_tokens.weight'\]"),
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), r"incomplete: missing \['model.layers.1.mlp.up_proj"),
    # said after every tensor was read, and not that a tied model's export stores no head
    (lambda t: t.pop("lm_head.weight"), r"incomplete: missing \['lm_head.weight'\], and .*config.json does not tie the "
                                        r"word embeddings .*set \"tie_word_embeddings\": true there"),
    (lambda t: t.update({"lm_head.weight": torch.randn(31, 16)}),
     r"'lm_head.weight' has shape \(31, 16\), but .*config.json implies \(32, 16\)"),
])
def test_header_damage_is_refused_before_anything_is_built(tmp_path, monkeypatch, damage, message):
    ck = tmp_path / "ck"
    CausalLM(ModelConfig(**TINY)).save_pretrained(ck)
    tensors = load_file(ck / "model.safetensors")
    damage(tensors)
    save_file(tensors, ck / "model.safetensors", metadata={"format": "pt"})
    _refuse_building(monkeypatch)
    with pytest.raises(ValueError, match=message):
        from_pretrained(ck)


def test_tied_checkpoint_holding_only_the_head_and_stale_inv_freq_buffers_loads(tmp_path):
    # transformers writes a tied model's shared tensor under either name; old exports kept rotary buffers
    model = CausalLM(ModelConfig(**TINY, tie_word_embeddings=True))
    ck = tmp_path / "ck"
    model.save_pretrained(ck)
    tensors = load_file(ck / "model.safetensors")
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(tensors, ck / "model.safetensors", metadata={"format": "pt"})
    loaded = from_pretrained(ck)
    assert torch.equal(loaded.hf_tensors()["model.embed_tokens.weight"], tensors["lm_head.weight"])


def _save_tokenizer(folder):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    core = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>").save_pretrained(folder)



@pytest.mark.parametrize("tokenizer_class, kept, missing", [
    ("Qwen2Tokenizer", [], "vocab.json and merges.txt"),        # transformers returned a special-tokens-only tokenizer
    ("Qwen2Tokenizer", ["vocab.json"], "merges.txt"),           # "`vocab` and `merges` must be both ... filenames"
    ("LlamaTokenizerFast", [], "tokenizer.model"),              # a special-tokens-only tokenizer too
    ("PreTrainedTokenizerFast", [], "tokenizer.model"),         # "... install sentencepiece or tiktoken"
])
def test_tokenizer_folder_without_its_vocabulary_is_named(tmp_path, tokenizer_class, kept, missing):
    # a checkpoint copied without tokenizer.json: it loaded as a tokenizer that encodes any text to []
    _save_tokenizer(tmp_path / "tok")
    folder = tmp_path / "tok"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": tokenizer_class}))
    (folder / "tokenizer.json").unlink()
    for name in kept:
        (folder / name).write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"lacks tokenizer.json and {missing}, which"):
        load_tokenizer(folder)

@pytest.mark.parametrize("file, data, message", [
    ("tokenizer.json", b"{oops", "tokenizer.json is not valid JSON"),
    ("tokenizer.json", b'{"a": "\xff"}', "tokenizer.json is not valid JSON"),
    ("tokenizer.json", b"[]", "tokenizer.json must hold a JSON object, got list"),
    ("tokenizer_config.json", b"[1]", "tokenizer_config.json must hold a JSON object, got list"),
    ("tokenizer.json", json.dumps({"version": "1.0", "model": {"type": "Nope"}}).encode(),
     r"tokenizer folder '.*tok' cannot be loaded .*KeyError"),
])
def test_broken_tokenizer_files_are_named(tmp_path, file, data, message):
    _save_tokenizer(tmp_path / "tok")
    (tmp_path / "tok" / file).write_bytes(data)
    with pytest.raises(ValueError, match=message) as info:
        load_tokenizer(tmp_path / "tok")
    if "cannot be loaded" in message:
        assert isinstance(info.value.__cause__, KeyError)


# -- tokenizers transformers 5 rebuilds into another one -------------------------------------------------------------
PROBE = "12+345=357 hello\nWorld"


def _tokenizer_folder(folder, core, tokenizer_class, model_type=None, **special):
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=core, **special).save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": tokenizer_class}))
    if model_type is not None:
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return folder


def _as_stored(folder):
    """What tokenizer.json itself encodes PROBE to (the tokenizers library, as transformers 4 read it)."""
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")).encode(PROBE, add_special_tokens=False).ids


def _char_level(seed):
    """A WordLevel tokenizer over single characters (as r1fast's built-in one), ids shuffled by `seed`."""
    tokenizers = pytest.importorskip("tokenizers")
    import random
    import string

    chars = list(string.ascii_letters + string.digits + string.punctuation + " \n")
    random.Random(seed).shuffle(chars)
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}},
                                                            unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = tokenizers.decoders.Fuse()
    return core


def _metaspace_bpe():
    """A BPE over "▁"-marked words without byte-level pre-tokenization, as Llama 2's tokenizer.json is."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}}
    for c in "▁abcdefghijklmnopqrstuvwxyzW0123456789+=\n":
        vocab.setdefault(c, len(vocab))
    merges = [("▁", "h"), ("▁h", "e"), ("l", "l"), ("▁he", "ll"), ("▁hell", "o")]
    vocab.update({a + b: len(vocab) + i for i, (a, b) in enumerate(merges)})
    core = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True,
                                                      unk_token="<unk>"))
    core.normalizer = tokenizers.normalizers.Sequence([tokenizers.normalizers.Prepend("▁"),
                                                       tokenizers.normalizers.Replace(" ", "▁")])
    decoders = tokenizers.decoders
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    return core


READ_AS_STORED = r"; r1fast reads tokenizer.json as it is \(PreTrainedTokenizerFast, as transformers 4 did\)"


def _ids(tokenizer):
    return tokenizer(PROBE, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("tokenizer_class, model", [
    ("Qwen2Tokenizer", "BPE"), ("LlamaTokenizerFast", "BPE"), ("GPT2TokenizerFast", "BPE"),
    ("BertTokenizerFast", "WordPiece")])
def test_a_tokenizer_class_that_rebuilds_tokenizer_json_into_another_tokenizer_is_read_as_stored(tmp_path,
                                                                                                  tokenizer_class,
                                                                                                  model):
    # transformers 5 keeps only tokenizer.json's vocabulary and builds the named class's own pipeline around it:
    # a character-level tokenizer loaded as Qwen2Tokenizer dropped the spaces, as BertTokenizer added [CLS]/[SEP]
    folder = _tokenizer_folder(tmp_path / "tok", _char_level(seed=5), tokenizer_class, unk_token="<unk>")
    loaded = tokenizer_class.removesuffix("Fast")
    with pytest.warns(UserWarning, match=rf"transformers loads it as {loaded}, which does not tokenize as its "
                                         rf"tokenizer.json does \(it holds a {model} model, tokenizer.json a WordLevel "
                                         rf"one .*: {loaded} is the class tokenizer_config.json names.*{READ_AS_STORED}"):
        tok = load_tokenizer(folder)
    assert type(tok).__name__ == "TokenizersBackend"
    assert _ids(tok) == _as_stored(folder)
    assert tok.unk_token == "<unk>"


def test_a_tokenizer_rebuilt_to_encode_text_to_nothing_is_read_as_stored(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>"))
    folder = _tokenizer_folder(tmp_path / "tok", core, "Qwen2Tokenizer", unk_token="<unk>")
    with pytest.warns(UserWarning, match=r"loads it as Qwen2Tokenizer, which does not tokenize as its tokenizer.json "
                                         r"does \(it holds a BPE model, tokenizer.json a WordLevel one \('12\+345=357 "
                                         r"hello\\nWorld' encodes to \[\]\)\)" + f".*{READ_AS_STORED}"):
        tok = load_tokenizer(folder)
    assert _ids(tok) == _as_stored(folder) == [0]


def test_a_rebuilt_tokenizer_that_tokenizer_json_read_as_stored_does_not_mend_is_kept_or_refused(tmp_path,
                                                                                                 monkeypatch):
    # were transformers' plain reading of tokenizer.json to fail too, r1fast keeps what AutoTokenizer gave, and says
    # so; encoding text to nothing, it is refused
    from transformers import PreTrainedTokenizerFast

    loads = PreTrainedTokenizerFast.from_pretrained.__func__

    def fails_as_itself(cls, *args, **kwargs):  # the classes AutoTokenizer picks inherit it: those still load
        if cls is PreTrainedTokenizerFast:
            raise OSError("unreadable")
        return loads(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerFast, "from_pretrained", classmethod(fails_as_itself))
    folder = _tokenizer_folder(tmp_path / "chars", _char_level(seed=3), "Qwen2Tokenizer", unk_token="<unk>")
    with pytest.warns(UserWarning, match=r"loads it as Qwen2Tokenizer, which does not tokenize as its tokenizer.json "
                                         r"does .*read as it is \(PreTrainedTokenizerFast\), tokenizer.json does not "
                                         r"tokenize so either; r1fast goes on with the tokenizer as transformers "
                                         r"loaded it"):
        tok = load_tokenizer(folder)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    tokenizers = pytest.importorskip("tokenizers")
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>"))
    folder = _tokenizer_folder(tmp_path / "unk", core, "Qwen2Tokenizer", unk_token="<unk>")
    with pytest.raises(ValueError, match=r"encodes to \[\]\)\).*tokenizer.json does not tokenize so either: are its "
                                         r"files this model's tokenizer\?"):
        load_tokenizer(folder)


def test_a_bpe_tokenizer_rebuilt_with_another_pre_tokenizer_is_read_as_stored_and_an_equivalent_one_kept(tmp_path):
    # same model type and vocabulary, but Qwen2Tokenizer's byte-level pipeline: other ids
    stored = _as_stored(_tokenizer_folder(tmp_path / "llama", _metaspace_bpe(), "LlamaTokenizerFast",
                                          unk_token="<unk>", bos_token="<s>", eos_token="</s>"))
    # LlamaTokenizer's own pipeline (Metaspace) tokenizes as this tokenizer.json does: loaded as before
    llama = load_tokenizer(tmp_path / "llama")
    assert type(llama).__name__ == "LlamaTokenizer" and _ids(llama) == stored
    folder = _tokenizer_folder(tmp_path / "qwen", _metaspace_bpe(), "Qwen2Tokenizer", unk_token="<unk>")
    with pytest.warns(UserWarning, match=rf"loads it as Qwen2Tokenizer, which does not tokenize as its tokenizer.json "
                                         rf"does \('12\+345=357 hello\\nWorld' encodes to \[[\d, ]+\], by "
                                         rf"tokenizer.json to {re.escape(str(stored))}\).*{READ_AS_STORED}"):
        assert _ids(load_tokenizer(folder)) == stored


def _byte_level_bpe(digits_in_threes: bool):
    """A byte-level BPE (as Qwen2's and DeepSeek's tokenizer.json are) whose pre-tokenizer takes digits one at a time
    (as Qwen2's does) or up to three at a time (as DeepSeek-V3's does), with merges that join digits."""
    tokenizers = pytest.importorskip("tokenizers")
    byte_level = tokenizers.pre_tokenizers.ByteLevel
    vocab = {c: i for i, c in enumerate(sorted(byte_level.alphabet()))}
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "hello"), ("W", "o"), ("3", "4"),
              ("34", "5"), ("3", "5"), ("35", "7"), ("1", "2")]
    vocab.update({a + b: len(vocab) + i for i, (a, b) in enumerate(merges)})
    core = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges))
    digits = tokenizers.Regex(r"\p{N}{1,3}" if digits_in_threes else r"\p{N}")
    core.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(digits, behavior="isolated"), byte_level(add_prefix_space=False)])
    core.decoder = tokenizers.decoders.ByteLevel()
    return core


def test_a_byte_level_bpe_named_qwen2tokenizer_loads_as_stored(tmp_path):
    folder = _tokenizer_folder(tmp_path / "tok", _byte_level_bpe(digits_in_threes=False), "Qwen2Tokenizer",
                               unk_token="<unk>")
    loaded = load_tokenizer(folder)
    assert type(loaded).__name__ == "Qwen2Tokenizer"
    assert _ids(loaded) == _as_stored(folder)


def test_a_tokenizer_that_groups_digits_otherwise_than_its_model_types_class_is_read_as_stored(tmp_path):
    # beside a config.json of model_type qwen2, transformers 5 takes Qwen2Tokenizer whatever tokenizer_config.json
    # names, and Qwen2's pre-tokenizer takes digits one at a time: a tokenizer.json grouping them in threes (as
    # DeepSeek-V3's does) lost its number tokens ("345" became "3", "4", "5"), which no command-line option could mend
    folder = _tokenizer_folder(tmp_path / "tok", _byte_level_bpe(digits_in_threes=True), "LlamaTokenizerFast",
                               model_type="qwen2", eos_token="<eos>")
    stored = _as_stored(folder)
    with pytest.warns(UserWarning, match=r"transformers 5 takes Qwen2Tokenizer for config.json's model_type 'qwen2', "
                                         r"whatever tokenizer_config.json names.*" + READ_AS_STORED):
        tok = load_tokenizer(folder)
    assert _ids(tok) == stored and len(stored) < len(PROBE) - 4  # "12", "345", "357" each one token
    assert tok.eos_token == "<eos>"
    # a checkpoint saved with it loads the same way again (a pipeline's next stage, a resumed run)
    tok.save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.warns(UserWarning, match=READ_AS_STORED):
        assert _ids(load_tokenizer(tmp_path / "saved")) == stored


def test_a_tokenizer_json_that_encodes_text_to_nothing_is_refused(tmp_path):
    # no class rebuilt it: its own vocabulary covers none of the text, and a BPE without an unknown token drops it
    tokenizers = pytest.importorskip("tokenizers")
    core = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={"<pad>": 0, "é": 1}, merges=[]))
    folder = _tokenizer_folder(tmp_path / "tok", core, "PreTrainedTokenizerFast", pad_token="<pad>")
    assert _as_stored(folder) == []
    with pytest.raises(ValueError, match=r"\(loaded as TokenizersBackend\) encodes '12\+345=357 hello\\nWorld' to no "
                                         r"tokens: are its files this model's tokenizer\?"):
        load_tokenizer(folder)


def test_a_toy_qwen2_folder_reloads_its_character_tokenizer_as_saved(tmp_path):
    # r1fast's character tokenizer beside a qwen2 config.json (the toy model of the TRL examples and benchmarks): loaded
    # by r1fast, transformers 5 rebuilt it as Qwen2Tokenizer, whose byte-level pipeline has no token for a space or a
    # newline, and they were silently dropped from every prompt
    from r1fast.integrations.toy import char_tokenizer, save_tiny_qwen2

    folder = save_tiny_qwen2(tmp_path / "toy", layers=1)
    text = "<think>\n12 + 345 = 357\n</think> Answer: 357"
    with pytest.warns(UserWarning, match=READ_AS_STORED):
        reloaded = load_tokenizer(folder)
    want = char_tokenizer()(text)["input_ids"]
    assert reloaded(text)["input_ids"] == want
    assert reloaded.decode(want) == text and reloaded.chat_template == char_tokenizer().chat_template
