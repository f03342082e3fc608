"""save_pretrained over a folder that already holds a model: the folder holds the new weights only."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from r1fast.models import CausalLM, ModelConfig, from_pretrained

TINY = dict(architecture="Qwen2ForCausalLM", vocab_size=32, hidden_size=16, intermediate_size=24,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
SHARDED = "4KB"   # a few shards for TINY in fp32
SINGLE = "5GB"


def random_model(seed):
    g = torch.Generator().manual_seed(seed)
    model = CausalLM(ModelConfig(**TINY))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def tensors_of(model):
    return {k: t.detach().clone() for k, t in model.hf_tensors().items()}


def write_pickled(folder, tensors, sharded):
    """What transformers' save_pretrained(safe_serialization=False) writes: pytorch_model.bin, or shards and
    their pytorch_model.bin.index.json."""
    if not sharded:
        torch.save(tensors, folder / "pytorch_model.bin")
        return
    keys = sorted(tensors)
    halves = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, part in halves.items():
        torch.save({k: tensors[k] for k in part}, folder / name)
    weight_map = {k: name for name, part in halves.items() for k in part}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def earlier_save(folder, kind, model):
    if kind in ("sharded", "single"):
        model.save_pretrained(folder, max_shard_size=SHARDED if kind == "sharded" else SINGLE)
        return
    model.save_pretrained(folder)   # config.json, then the weights in the layout named
    os.remove(folder / "model.safetensors")
    if kind == "fp16 variant":   # transformers' save_pretrained(variant="fp16"), read by from_pretrained(variant=)
        save_file({k: t.half() for k, t in tensors_of(model).items()}, folder / "model.fp16.safetensors")
        return
    write_pickled(folder, tensors_of(model), sharded=kind == "sharded pytorch_model.bin")


@pytest.mark.parametrize("before", ["sharded", "single", "pytorch_model.bin", "sharded pytorch_model.bin",
                                    "fp16 variant"])
@pytest.mark.parametrize("now", ["single", "sharded"])
def test_a_save_over_an_earlier_model_leaves_only_the_new_weights(tmp_path, before, now):
    # weights of an earlier save (pickled ones, another layout's shards) were carried over beside the new ones:
    # transformers' from_pretrained(use_safetensors=False) then read the old pytorch_model.bin, variant="fp16"
    # the old model.fp16.safetensors
    folder = tmp_path / "model"
    earlier_save(folder, before, random_model(seed=1))
    (folder / "tokenizer.json").write_text("{}")      # not weights: a save keeps them
    (folder / "training_args.bin").write_bytes(b"not weights")
    new = random_model(seed=2)
    new.save_pretrained(folder, max_shard_size=SHARDED if now == "sharded" else SINGLE)

    files = set(os.listdir(folder))
    weights = {f for f in files if f not in ("config.json", "tokenizer.json", "training_args.bin")}
    if now == "single":
        assert weights == {"model.safetensors"}
    else:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert weights == {"model.safetensors.index.json"} | set(index["weight_map"].values())
    assert {"tokenizer.json", "training_args.bin"} <= files
    want = tensors_of(new)
    got = tensors_of(from_pretrained(folder))
    assert all(torch.equal(got[k], t) for k, t in want.items())


@pytest.mark.parametrize("before", ["pytorch_model.bin", "sharded pytorch_model.bin"])
def test_transformers_reads_the_new_weights_after_a_save_over_pickled_ones(tmp_path, before):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "model"
    earlier_save(folder, before, random_model(seed=3))
    new = random_model(seed=4)
    new.save_pretrained(folder)
    want = tensors_of(new)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert all(torch.equal(loaded[k], t) for k, t in want.items())
    with pytest.raises(OSError):   # no pickled weights left for it to read in their place
        transformers.AutoModelForCausalLM.from_pretrained(folder, use_safetensors=False)


def test_a_save_that_fails_part_way_leaves_the_earlier_weights_as_they_were(tmp_path, monkeypatch):
    # the earlier weights are dropped with the folder the save replaces, never before the new one is in
    import r1fast.models.checkpoint as checkpoint

    folder = tmp_path / "model"
    earlier_save(folder, "sharded pytorch_model.bin", random_model(seed=5))
    before = {f: (folder / f).read_bytes() for f in os.listdir(folder)}
    written = []

    def fail_on_the_second_shard(tensors, path, metadata=None):
        written.append(path)
        if len(written) == 2:
            raise OSError(28, "No space left on device")
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_safetensors", fail_on_the_second_shard)
    with pytest.raises(OSError, match="No space left"):
        random_model(seed=6).save_pretrained(folder, max_shard_size=SHARDED)
    assert {f: (folder / f).read_bytes() for f in os.listdir(folder)} == before
    assert [f for f in os.listdir(tmp_path) if f != "model"] == []
