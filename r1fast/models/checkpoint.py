"""Local Hugging Face checkpoints: config.json + safetensors (one file, or shards with an index).

Loading builds the model on the meta device, allocates it once at the target dtype/device, then
copies tensors in one shard at a time, so peak memory stays near one copy of the weights. Every
tensor is checked (known name, floating dtype, exact shape) and the set must be complete. Pickled
formats (*.bin, *.pt) are refused: they can run code when read.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from typing import Optional

import torch

from r1fast._umask import apply_umask, fsync_dir, fsync_file, save_safetensors
from r1fast.models.config import ModelConfig, is_lfs_pointer, read_config_json, resolve_dtype

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
GENERATION_CONFIG_NAME = "generation_config.json"
_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Keys some checkpoints carry that hold nothing to load (older Llama exports saved rotary caches).
_IGNORED_KEY = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_EMBED_KEY = "model.embed_tokens.weight"
# what r1fast's trainers write beside the model in checkpoint-<step> (r1fast.trainer.checkpoints)
_TRAINER_FILES = ("optimizer.safetensors", "rng.safetensors", "reference.safetensors")


# "org/name", each part opening with a letter or digit as the Hub's ids do: "./model" or "../ckpt" is a local path
HUB_ID = re.compile(r"(?:\w[\w.-]*/)?\w[\w.-]*")


def hub_model_hint(path: str) -> str:
    """For a missing folder named like a Hub model ('Qwen/Qwen2.5-0.5B-Instruct'): how to make it local,
    since r1fast loads local checkpoints only."""
    if "/" not in path or not HUB_ID.fullmatch(path):
        return ""
    return (f"; r1fast loads local folders only: if {path!r} is a Hugging Face Hub model, download it first, "
            f"e.g. huggingface_hub.snapshot_download({path!r}, local_dir='my_model'), and give that folder")


def _replaced_model_hint(path: str) -> str:
    """save_pretrained over an existing folder renames it aside (_swap_in) before renaming the new one in: a kill
    between the two left no folder at `path`, the previous model whole under a hidden name. Say where."""
    target = write_target(os.path.abspath(path))
    folder, name = os.path.split(target)
    if not name or not os.path.isdir(folder):
        return ""
    aside = [os.path.join(folder, f) for f in os.listdir(folder) if f.startswith(f".{name}.old-")
             and os.path.isfile(os.path.join(folder, f, "config.json"))]
    if not aside:
        return ""
    # several saves stopped so (each after a save that went through) leave several: the newest model, by when its
    # files were written, is the one that was there last; the names' random part says nothing of that
    newest = max(aside, key=lambda p: (os.stat(p).st_mtime, p))
    return (f"; a save_pretrained stopped part way left the model that was there in {newest}: rename it back to "
            f"{target!r} (or save again)")


def builtin_model_hint(path: str) -> str:
    """For 'builtin:<size>', a name only the trainers read (they build the model with its char tokenizer):
    where to give it, since from_pretrained and load_tokenizer read folders."""
    if not path.startswith("builtin:"):
        return ""
    return (f"; {path!r} names a built-in model, not a folder: give the name to a trainer, which builds it "
            f"(model_name_or_path={path}, GRPOTrainer({path!r}, ...), SFTTrainer, rejection_sample, "
            f"evaluate_accuracy), or load a checkpoint folder a run wrote (runs/<run>/checkpoint-<step>)")


def file_not_folder(path: str, what: str) -> str:
    """The error for a loader given a file (config.json, model.safetensors...) where it reads a folder: "does not
    exist" was wrong about a path that is there."""
    return (f"{what} {path!r} is a file, not a folder: give the folder that holds the checkpoint's files "
            f"({os.path.dirname(os.path.abspath(path))!r} for this one)")


def missing_model_hint(path: str) -> str:
    """What to say of a model folder that is not there: a save_pretrained stopped between its renames, a Hub id,
    a builtin: name. from_pretrained and the trainers' loaders (a model name, a pipeline's model) say the same."""
    return _replaced_model_hint(path) or hub_model_hint(path) or builtin_model_hint(path)


def from_pretrained(path, dtype=None, device=None, fp8="off"):
    """Load a local checkpoint folder into a CausalLM.

    dtype: None (or "auto") keeps the checkpoint's dtype (config.json's torch_dtype/dtype, else the stored tensors');
    device: where the weights live (default CPU); fp8: a mode, or `r1fast.fp8.make_options(mode,
    recipe=, grad_dtype=, scaling=)`; anything but "off" hands the model to `r1fast.fp8.apply_fp8`
    after loading (the options are checked before anything loads).
    """
    from r1fast.fp8.options import as_options
    from r1fast.models.decoder import CausalLM

    path = os.fspath(path)
    if os.path.isfile(path):
        raise NotADirectoryError(file_not_folder(path, "checkpoint"))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder {path!r} does not exist{missing_model_hint(path)}")
    fp8 = as_options(fp8)
    config = ModelConfig.from_hf_config(read_config_json(path))
    shards = shard_files(path)
    stored = _check_headers(path, config, shards)
    dtype = resolve_dtype(dtype) or config.dtype or _stored_dtype(shards[0]) or torch.float32
    device = torch.device(device) if device is not None else torch.device("cpu")

    with torch.device("meta"):
        model = CausalLM(config)
    _check_stored_keys(path, config, stored, model.hf_tensors())
    model = model.to(dtype).to_empty(device=device)
    expected = model.hf_tensors()  # views: the fused q/k/v and gate/up projections fill row by row
    tied = config.tie_word_embeddings
    loaded: set[str] = set()
    embed_from_head = False
    for shard in shards:
        for key, tensor in _iter_tensors(shard):
            if _IGNORED_KEY.match(key):
                continue
            if tied and key == "lm_head.weight":
                # Tied: the head is the embedding. Most exports drop lm_head.weight, some keep only it;
                # transformers then ties the other way round, so fill the embedding from it unless the
                # embedding itself is stored (then that one wins, wherever it comes in the files).
                _check_tensor(shard, key, tensor, expected[_EMBED_KEY])
                if _EMBED_KEY not in loaded:
                    with torch.no_grad():
                        expected[_EMBED_KEY].copy_(tensor)
                    embed_from_head = True
                else:
                    _check_tied(path, expected[_EMBED_KEY], tensor)
                continue
            if tied and key == _EMBED_KEY and embed_from_head:
                _check_tied(path, tensor, expected[_EMBED_KEY])
            param = expected.get(key)
            if param is None:
                raise ValueError(f"{shard}: unexpected tensor {key!r}{_why_unexpected(key, config)}")
            if key in loaded:
                raise ValueError(f"{shard}: tensor {key!r} appears in more than one file")
            _check_tensor(shard, key, tensor, param)
            with torch.no_grad():
                param.copy_(tensor)
            loaded.add(key)
    if embed_from_head:
        loaded.add(_EMBED_KEY)
    missing = sorted(set(expected) - loaded)
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ValueError(f"checkpoint {path!r} is incomplete: missing {missing[:8]}{more}")
    config.torch_dtype = _dtype_str(dtype)
    if fp8.mode != "off":
        from r1fast.fp8 import apply_fp8

        model = apply_fp8(model, fp8) or model
    model.generation_config_json = _read_generation_config(path)
    return model


def _why_unexpected(key: str, config: ModelConfig) -> str:
    """What a tensor the model has no place for says about the checkpoint: "is config.json from another model?" was
    all it said, of a value head saved with the model and of layers past num_hidden_layers alike."""
    if not key.startswith(("model.", "lm_head.")):
        return (f": not a tensor of a {config.architecture} (its keys start with 'model.' or 'lm_head.'), e.g. a value "
                f"head saved with the model (TRL's v_head.*); r1fast loads the model's tensors only, so save the "
                f"model without it")
    layer = _LAYER_KEY.match(key)
    if layer and int(layer.group(1)) >= config.num_hidden_layers:
        return (f": config.json's num_hidden_layers is {config.num_hidden_layers} but the checkpoint holds layer "
                f"{layer.group(1)} (is config.json from another model?)")
    return f" for a {config.architecture} with this config (is config.json from another model?)"


def _read_generation_config(path: str) -> Optional[dict]:
    """The folder's generation_config.json (eos ids and sampling defaults that transformers and vLLM
    read), which save_pretrained writes into the model's own checkpoints; None when absent or unreadable."""
    try:
        with open(os.path.join(path, GENERATION_CONFIG_NAME), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes the config implies for the embedding and one layer's projections (layer index 0), by
    arithmetic: building even a meta model first would take forever for a huge num_hidden_layers, and
    allocating it would fail with the allocator's message for a huge vocab_size."""
    h, inter, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    return {
        _EMBED_KEY: (config.vocab_size, h),
        "model.layers.0.self_attn.q_proj.weight": (q, h),
        "model.layers.0.self_attn.k_proj.weight": (kv, h),
        "model.layers.0.self_attn.v_proj.weight": (kv, h),
        "model.layers.0.self_attn.o_proj.weight": (h, q),
        "model.layers.0.mlp.gate_proj.weight": (inter, h),
        "model.layers.0.mlp.up_proj.weight": (inter, h),
        "model.layers.0.mlp.down_proj.weight": (h, inter),
    }


_SHAPE_KEYS = {"embed_tokens": "vocab_size, hidden_size", "q_proj": "num_attention_heads x head_dim, hidden_size",
               "k_proj": "num_key_value_heads x head_dim, hidden_size",
               "v_proj": "num_key_value_heads x head_dim, hidden_size",
               "o_proj": "hidden_size, num_attention_heads x head_dim", "gate_proj": "intermediate_size, hidden_size",
               "up_proj": "intermediate_size, hidden_size", "down_proj": "hidden_size, intermediate_size"}


def _check_headers(path: str, config: ModelConfig, shards: list[str]) -> dict[str, tuple[tuple[int, ...], str]]:
    """The stored keys and shapes (safetensors headers only, no tensor data) against config.json, before
    anything is built or allocated from it. Returns each stored key's (shape, first file holding it)."""
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for shard in shards:
        with _open(shard) as f:
            for key in f.keys():
                if key in shapes and not _IGNORED_KEY.match(key):
                    # two values for one tensor (transformers takes the last read): was said once the first file's
                    # tensors were in memory, without naming the other file
                    raise ValueError(f"{shard}: tensor {key!r} appears in more than one file (also in "
                                     f"{os.path.basename(shapes[key][1])}); which one is the model's is not known, "
                                     f"so the checkpoint is refused: remove the stale copy")
                try:
                    shapes.setdefault(key, (tuple(f.get_slice(key).get_shape()), shard))
                except Exception as e:
                    raise ValueError(f"{shard}: tensor {key!r} cannot be read (corrupt header?): {e}") from e
    cfg_file = os.path.join(path, "config.json")
    index = os.path.join(path, INDEX_NAME)
    # shards found without an index (any *.safetensors) are named themselves, not an index that is not there
    weights = shards[0] if len(shards) == 1 else index if os.path.isfile(index) else \
        ", ".join(os.path.basename(s) for s in shards)
    layers = sorted({int(m.group(1)) for k in shapes if (m := _LAYER_KEY.match(k)) and not _IGNORED_KEY.match(k)})
    n = config.num_hidden_layers
    if not layers or layers[-1] + 1 < n:
        held = "no layers" if not layers else (f"layers 0..{layers[-1]}" if layers == list(range(len(layers)))
                                               else f"layers {layers[:8]}{'...' if len(layers) > 8 else ''}")
        raise ValueError(f"{cfg_file}: num_hidden_layers={n} but {weights} holds {held}"
                         f"{'' if layers else _foreign_layout_hint(shapes)}")
    expected = _expected_shapes(config)
    embed = expected.pop(_EMBED_KEY)
    embed_keys = [_EMBED_KEY, "lm_head.weight"] if config.tie_word_embeddings else [_EMBED_KEY]
    if not any(k in shapes for k in embed_keys):
        raise ValueError(f"checkpoint {path!r} is incomplete: missing [{_EMBED_KEY!r}]")
    if not config.tie_word_embeddings and "lm_head.weight" not in shapes:
        # a tied model's export (its head is the embedding, stored once) under a config.json that lost the flag or
        # came from an untied sibling: said only after every tensor was read, and without the likely cause
        raise ValueError(f"checkpoint {path!r} is incomplete: missing ['lm_head.weight'], and {cfg_file} does not "
                         f"tie the word embeddings (tie_word_embeddings is false or absent); if this model's head is "
                         f"its embedding matrix, set \"tie_word_embeddings\": true there")
    todo = [(_EMBED_KEY, embed), ("lm_head.weight", embed)]
    todo += [(k.replace(".0.", f".{i}.", 1), shape) for i in range(n) for k, shape in expected.items()]
    missing = []
    for key, want in todo:
        if key not in shapes:
            if ".layers." in key:
                missing.append(key)
            continue
        got, shard = shapes[key]
        if got != want:
            names = _SHAPE_KEYS[key.split(".")[-2]] if key != "lm_head.weight" else _SHAPE_KEYS["embed_tokens"]
            raise ValueError(f"{shard}: tensor {key!r} has shape {got}, but {cfg_file} implies {want} "
                             f"({names}); is config.json from another model?")
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ValueError(f"checkpoint {path!r} is incomplete: missing {missing[:8]}{more}")
    return shapes


def _check_stored_keys(path: str, config: ModelConfig, stored: dict, expected: dict) -> None:
    """The stored keys (from the headers) against the model's own, before it is allocated: a tensor it has no place
    for, or a norm or bias not stored, was found only as the tensors were read, after every file before it (minutes
    for a large model). The loading loop keeps its own checks for what the headers cannot say."""
    tied = config.tie_word_embeddings
    for key, (_, shard) in stored.items():
        if key not in expected and not _IGNORED_KEY.match(key) and not (tied and key == "lm_head.weight"):
            raise ValueError(f"{shard}: unexpected tensor {key!r}{_why_unexpected(key, config)}")
    held = set(stored) | ({_EMBED_KEY} if tied and "lm_head.weight" in stored else set())
    missing = sorted(set(expected) - held)
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ValueError(f"checkpoint {path!r} is incomplete: missing {missing[:8]}{more}")


def _foreign_layout_hint(keys) -> str:
    """What a weights file without any 'model.layers.N.' key holds instead, when its keys say: "holds no layers"
    alone read as if the file were empty or truncated."""
    keys = sorted(keys)
    adapter = next((k for k in keys if "lora_" in k or k.startswith("base_model.model.")), None)
    if adapter is not None:
        return (f" (its keys, e.g. {adapter!r}, are a PEFT/LoRA adapter's, not a model's: merge the adapter into "
                f"its base model, e.g. with peft's merge_and_unload(), and load the merged model)")
    prefixed = next((k for k in keys if _PREFIXED_LAYER_KEY.match(k)), None)
    if prefixed is not None:
        prefix = _PREFIXED_LAYER_KEY.match(prefixed).group(1)
        return (f" (its keys, e.g. {prefixed!r}, carry the prefix {prefix!r} before transformers' names: the state "
                f"dict of a wrapped model, such as DDP/FSDP's 'module.' or torch.compile's '_orig_mod.'; save the "
                f"unwrapped model, or drop the prefix from every key)")
    bare = next((k for k in keys if _BARE_LAYER_KEY.match(k)), None)
    if bare is not None:
        return (f" (its keys, e.g. {bare!r}, lack the 'model.' prefix: a save of the base model, e.g. AutoModel or "
                f"Qwen2Model, rather than of ...ForCausalLM; r1fast reads the ...ForCausalLM layout, with its lm_head)")
    return ""


_BARE_LAYER_KEY = re.compile(r"^layers\.\d+\.")
# transformers' layout behind a wrapper's prefix: 'module.model.layers.0.', '_orig_mod.model.layers.0.'
_PREFIXED_LAYER_KEY = re.compile(r"^(.+?\.)model\.layers\.\d+\.")


def _check_tied(path: str, embed: torch.Tensor, head: torch.Tensor) -> None:
    """Both tensors stored under tie_word_embeddings: transformers 5 keeps a different head untied, r1fast
    ties it; refused rather than dropping the head."""
    dtype = embed.dtype if embed.element_size() <= head.element_size() else head.dtype  # as loaded
    if not torch.equal(embed.to(head.device, dtype), head.to(dtype)):
        raise ValueError(f"checkpoint {path!r}: config.json ties the word embeddings, but the stored lm_head.weight "
                         f"differs from model.embed_tokens.weight; set tie_word_embeddings: false in its "
                         f"config.json to load the head as stored")


def _check_tensor(shard: str, key: str, tensor: torch.Tensor, param: torch.Tensor) -> None:
    if tensor.dtype not in _WEIGHT_DTYPES:
        raise ValueError(f"{shard}: tensor {key!r} has dtype {tensor.dtype}; weights must be float16, "
                         "bfloat16, float32 or float64 (quantized checkpoints are not supported)")
    if tuple(tensor.shape) != tuple(param.shape):
        raise ValueError(f"{shard}: tensor {key!r} has shape {tuple(tensor.shape)}, the config implies "
                         f"{tuple(param.shape)}")


def _dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def shard_files(path: str) -> list[str]:
    # model.safetensors first, as transformers reads them: a folder holding both it and an index of
    # shards (an old save beside a new one) must give the same model in r1fast and transformers
    single = os.path.join(path, SINGLE_NAME)
    if os.path.isfile(single):
        return [single]
    index = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError("weight_map is empty or not an object")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{index} is not a valid safetensors index ({e})") from e
        files = []
        for name in weight_map.values():
            name = _shard_name(index, name)
            if name not in files:
                files.append(name)
        paths = [os.path.join(path, f) for f in files]
        _refuse_folders(paths)
        absent = [f for f, p in zip(files, paths) if not os.path.isfile(p)]
        if absent:
            raise FileNotFoundError(f"checkpoint {path!r} is incomplete: shard(s) {absent} named in {INDEX_NAME} "
                                    "are missing")
        return paths
    # a training checkpoint's optimizer, RNG and reference-model files are not its model: read as weight shards,
    # a checkpoint-N lacking model.safetensors failed with "model.safetensors.index.json holds no layers"
    others = sorted(f for f in os.listdir(path) if f.endswith(".safetensors") and f not in _TRAINER_FILES)
    if others:
        paths = [os.path.join(path, f) for f in others]
        _refuse_folders(paths)
        return paths
    pickled = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
    if pickled:
        raise ValueError(f"checkpoint {path!r} has only pickled weights ({pickled[0]}...); r1fast loads "
                         "safetensors only. Convert it (e.g. load with transformers and save_pretrained "
                         "with safe_serialization) from a source you trust")
    trainer = sorted(f for f in os.listdir(path) if f in _TRAINER_FILES)
    held = f" (it holds only a training checkpoint's {', '.join(trainer)}, not the model)" if trainer else ""
    raise FileNotFoundError(f"no *.safetensors weights in {path!r}{held}")


def _refuse_folders(paths: list[str]) -> None:
    """A weights file that is a folder (model.safetensors made a directory by a copy or download into it) failed
    when read with safetensors' "No such device (os error 19)", naming no cause."""
    for p in paths:
        if os.path.isdir(p):
            inside = sorted(f for f in os.listdir(p) if f.endswith(".safetensors"))
            held = (f" (it holds {', '.join(inside[:3])}: was the file copied into a folder of its name?)"
                    if inside else "")
            raise IsADirectoryError(f"{p} is a folder, not a safetensors weights file{held}; put the weights file "
                                    f"itself at that path")


def _shard_name(index: str, name) -> str:
    """A weight_map entry as the path inside the folder it names: transformers joins the entry to the folder as it
    stands, so "./model-00001-of-00002.safetensors" (some exporters write it) loads there and was refused here.
    Normalised, so that "./a" and "a" are one shard, read once. An entry that leaves the folder (../, an absolute
    path) is refused: the index would read weights from elsewhere."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{index}: bad shard file name {name!r} (each weight_map value names a .safetensors file)")
    normal = os.path.normpath(name)
    if os.path.isabs(name) or normal in (os.curdir, os.pardir) or normal.startswith(os.pardir + os.sep):
        raise ValueError(f"{index}: bad shard file name {name!r}: a shard must be a file inside the checkpoint "
                         f"folder, named relative to it")
    return normal


def _open(shard: str):
    from safetensors import safe_open

    try:
        return safe_open(shard, framework="pt", device="cpu")
    except Exception as e:  # SafetensorError for truncated/garbled headers, OSError for unreadable files
        if is_lfs_pointer(shard):  # safetensors says only "header too large"
            raise ValueError(f"{shard} is a Git LFS pointer, not the weights (a clone without git-lfs); fetch "
                             f"them with `git lfs pull` in that repository") from e
        raise ValueError(f"cannot read safetensors file {shard}: {e}") from e


def _iter_tensors(shard: str):
    with _open(shard) as f:
        for key in f.keys():
            try:
                yield key, f.get_tensor(key)
            except Exception as e:
                raise ValueError(f"{shard}: tensor {key!r} cannot be read (corrupt or truncated file?): {e}") from e


def _stored_dtype(shard: str) -> torch.dtype | None:
    with _open(shard) as f:
        for key in f.keys():
            sl = f.get_slice(key)
            name = sl.get_dtype()
            table = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
            if name in table:
                return table[name]
    return None


# -- saving --------------------------------------------------------------------------------------
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
# Weight files of any earlier save in the folder (r1fast's, transformers' safetensors or pickled ones, their shards,
# index and variants such as model.fp16.safetensors). A save over the folder does not carry them over: beside the
# new weights, a loader could read them instead (transformers' use_safetensors=False or variant= reads a stale
# pytorch_model.bin or model.fp16.safetensors, an old index names old shards). Dropped rather than refused: the save
# replaces config.json, so they no longer describe the folder's model, and trainers save into one folder again and
# again. They go with the replaced folder, so a save that fails part way leaves them, as it leaves the old model.
# Only these names: a tokenizer, generation config, training_args.bin or a user's own files are carried over.
_WEIGHT_FILE = re.compile(r"^(?:model(?:\.\w+)?(?:\.safetensors|-\d+-of-\d+\.safetensors)|"
                          r"model\.safetensors\.index(?:\.\w+)?\.json|"
                          r"pytorch_model(?:\.\w+)?(?:\.bin|-\d+-of-\d+\.bin)|"
                          r"pytorch_model\.bin\.index(?:\.\w+)?\.json)$")


def parse_size(size) -> int:
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    if isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", size.upper())
        if m:
            return int(float(m.group(1)) * _UNITS[m.group(2)])
    raise ValueError(f"max_shard_size must be a positive int (bytes) or a string like '5GB', got {size!r}")


def save_pretrained(model, path, max_shard_size="5GB") -> None:
    """Write config.json + safetensors (sharded past max_shard_size) that transformers loads.

    Atomic for the folder's model files: everything is written to a temporary sibling folder, other
    files already in `path` (tokenizer, generation config...) are carried over, then the folder is
    swapped in by rename; an interrupted save leaves the old checkpoint intact. Weights an earlier save left
    in `path` (model*.safetensors, pytorch_model*.bin, their shards and index) are not carried over: the folder
    holds the new weights only. A `path` that is a symlink is saved into the folder it leads to (the link stays).
    """
    _check_saveable(model)
    limit = parse_size(max_shard_size)
    path = write_target(os.path.abspath(os.fspath(path)))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"save_pretrained target {path!r} exists and is not a folder")

    names = list(model.hf_tensors().items())  # transformers' keys and tensors (rows of fused projections)
    shards, current, size = [], [], 0
    for name, p in names:
        nbytes = p.numel() * p.element_size()
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append((name, p))
        size += nbytes
    if current:
        shards.append(current)

    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = SINGLE_NAME if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            # One shard on the host at a time.
            # copies: rows of a fused projection share its storage, which safetensors refuses
            tensors = {key: p.detach().to("cpu", copy=True).contiguous() for key, p in shard}
            save_safetensors(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
            for k, t in tensors.items():
                weight_map[k] = fname
                total += t.numel() * t.element_size()
            del tensors
        if len(shards) > 1:
            with open(os.path.join(tmp, INDEX_NAME), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(model.config.to_hf_config(model.dtype), f, indent=2, sort_keys=True)
        generation = getattr(model, "generation_config_json", None)
        if generation is not None:  # the source folder's: a trained checkpoint kept no eos ids nor sampling defaults
            with open(os.path.join(tmp, GENERATION_CONFIG_NAME), "w", encoding="utf-8") as f:
                json.dump(generation, f, indent=2)
        if os.path.isdir(path):
            for entry in os.listdir(path):
                if entry == "config.json" or _WEIGHT_FILE.match(entry) or \
                        (generation is not None and entry == GENERATION_CONFIG_NAME):
                    continue
                src, dst = os.path.join(path, entry), os.path.join(tmp, entry)
                if os.path.isdir(src):
                    shutil.copytree(src, dst, symlinks=True)
                else:
                    shutil.copy2(src, dst)
        fsync_files(tmp)
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_saveable(model) -> None:
    """An r1fast CausalLM (hf_tensors: its tensors under transformers' names); anything else failed with
    "'Qwen2ForCausalLM' object has no attribute 'hf_tensors'"."""
    if callable(getattr(model, "hf_tensors", None)):
        return
    kind = type(model)
    hint = ""
    if kind.__module__.startswith("transformers."):
        hint = "; a transformers model saves itself: model.save_pretrained(path)"
    elif callable(getattr(getattr(model, "module", None), "hf_tensors", None)):
        hint = "; save the model it wraps: save_pretrained(model.module, path)"
    raise TypeError(f"save_pretrained saves an r1fast CausalLM, got {kind.__name__}{hint}")


def write_target(path: str) -> str:
    """Where a save to `path` writes: a symlink's target (a model folder moved to another disk and linked back),
    as open(path, "w") writes through a link. Renamed over, the link became a folder on the link's disk and
    the folder it led to kept the old model."""
    return os.path.realpath(path) if os.path.islink(path) else path


def fsync_files(folder: str) -> None:
    """The files of `folder` on disk before it is renamed into place (a rename can reach the disk first), and their
    names: the folder's own entries, which a file's fsync does not promise to write."""
    for entry in os.listdir(folder):
        p = os.path.join(folder, entry)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                fsync_file(f.fileno())
    fsync_dir(folder)


def _swap_in(tmp: str, path: str) -> None:
    apply_umask(tmp)  # mkdtemp makes it private (0700); a fixed 0755 ignored the user's umask
    if not os.path.exists(path):
        os.rename(tmp, path)
        fsync_dir(os.path.dirname(path))   # the saved folder's name on disk when the save returns
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=os.path.dirname(path))
    os.rmdir(old)
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if os.path.lexists(path):   # a Ctrl-C just after the rename: the new model is in (renaming onto it fails)
            _remove_replaced(old)
        else:   # a Ctrl-C or error here left no folder at `path`: the model that was there goes back
            os.rename(old, path)
        raise
    _remove_replaced(old)


def _remove_replaced(old: str) -> None:
    """Delete the model a save replaced. A Ctrl-C during it (the long part, for a large model) would leave it
    half deleted under its hidden name, beside a save that is done: the deletion is finished first. A folder that
    was a symlink loses the link only (remove_folder)."""
    # the renames that replaced it on disk first: a power loss that kept some of the deletion's unlinks and not the
    # renames left the save's path naming the previous model with files missing
    fsync_dir(os.path.dirname(old))
    try:
        remove_folder(old)
    except BaseException:
        remove_folder(old)
        raise


def remove_folder(path: str) -> None:
    """rmtree, or for a symlink (a folder moved to another disk and linked back) the link alone: rmtree refuses a
    link, which ignore_errors hid, so it stayed behind as a hidden link no run removed. What the link leads to is
    left: it may be another run's, or a copy the user keeps."""
    if os.path.islink(path):
        with contextlib.suppress(OSError):
            os.unlink(path)
        return
    shutil.rmtree(path, ignore_errors=True)
