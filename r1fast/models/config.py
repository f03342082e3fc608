"""ModelConfig: the decoder's shape, read from (and written back to) a Hugging Face config.json.

One dataclass covers the four supported families; the differences between them are flags:
    LlamaForCausalLM    optional bias on q/k/v/o (`attention_bias`) and on the MLP (`mlp_bias`)
    Qwen2ForCausalLM    bias on q/k/v only (always), none on o
    Qwen3ForCausalLM    RMSNorm on each head of q and k (`qk_norm`), optional bias on q/k/v/o
    MistralForCausalLM  no bias anywhere; `sliding_window` (4096 when config.json omits it) on every layer
Anything the model code does not implement (other architectures, activations, rope types) is a
ValueError that names it, never a silently different model. Sliding-window layers load: full attention
equals them up to the window's length, and longer sequences are refused where they are run.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
_MODEL_TYPE_TO_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                       "mistral": "MistralForCausalLM"}
_ARCH_TO_MODEL_TYPE = {v: k for k, v in _MODEL_TYPE_TO_ARCH.items()}
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
_ROPE_REQUIRED_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}
_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64}

# transformers' defaults per family for keys a config.json may omit. An absent num_key_value_heads is the
# config class's own number (Qwen2Config/Qwen3Config: 32, MistralConfig: 8), not the query heads: only
# LlamaConfig reads absent as "as many as the query heads" (null is that for every family but Mistral).
_FAMILY_DEFAULTS = {
    "LlamaForCausalLM": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048,
                             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "Qwen2ForCausalLM": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=32768,
                             tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, num_key_value_heads=32),
    "Qwen3ForCausalLM": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=32768,
                             tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, head_dim=128,
                             num_key_value_heads=32),
    # MistralConfig: 8 kv heads and a 4096 window when the keys are absent (a null window slides nothing)
    "MistralForCausalLM": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=131072,
                               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, num_key_value_heads=8,
                               sliding_window=4096),
}
MISTRAL = "MistralForCausalLM"

# Keys this module writes itself; everything else in a loaded config.json is carried through `extra`.
_OWN_KEYS = {
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
    "rope_parameters", "max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias",
    "bos_token_id", "eos_token_id", "torch_dtype", "dtype", "hidden_act", "initializer_range",
}


@dataclasses.dataclass
class ModelConfig:
    architecture: str = "LlamaForCausalLM"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None        # None: same as num_attention_heads (no GQA)
    head_dim: int | None = None                   # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None              # None or {"rope_type": "linear" | "dynamic" | "llama3" | "yarn", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool | None = None            # None: the family's default (Qwen2: True, else False)
    qk_norm: bool | None = None                   # None: the family's default (Qwen3: True, else False)
    mlp_bias: bool = False                        # Llama only
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str | None = None                # the checkpoint's dtype name, e.g. "bfloat16"
    initializer_range: float = 0.02
    extra: dict = dataclasses.field(default_factory=dict, repr=False)  # other config.json keys, kept for saving

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.architecture!r}; r1fast.models supports "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            _check_positive_int(name, getattr(self, name))
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        _check_positive_int("num_key_value_heads", self.num_key_value_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.architecture == "LlamaForCausalLM" and self.hidden_size % self.num_attention_heads:
            # transformers' LlamaConfig refuses this shape whatever head_dim says: a model saved with it
            # would not load there
            raise ValueError(f"LlamaForCausalLM needs hidden_size ({self.hidden_size}) to be a multiple of "
                             f"num_attention_heads ({self.num_attention_heads}), as transformers does")
        if self.head_dim is None and self.architecture == MISTRAL:
            # MistralConfig's own fallback, exact or not: q_proj then has fewer rows than hidden_size
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads "
                                 f"({self.num_attention_heads}); give head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_attention_heads
        _check_positive_int("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        # finite: an infinite eps zeroes every norm's output, an infinite theta every rotation
        _check_positive_number("rms_norm_eps", self.rms_norm_eps)
        _check_positive_number("rope_theta", self.rope_theta)
        _check_positive_int("max_position_embeddings", self.max_position_embeddings)
        self.rope_scaling = _normalize_rope_scaling(self.rope_scaling)
        is_qwen2, is_qwen3 = self.architecture == "Qwen2ForCausalLM", self.architecture == "Qwen3ForCausalLM"
        if self.attention_bias is None:
            self.attention_bias = is_qwen2
        if self.qk_norm is None:
            self.qk_norm = is_qwen3
        for name in ("tie_word_embeddings", "mlp_bias", "attention_bias", "qk_norm"):
            # a string "false" would be truthy: the flag would silently mean the opposite
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false (a JSON boolean), got {getattr(self, name)!r}")
        # Flags transformers' classes cannot express would make a checkpoint it loads differently.
        if is_qwen2 and not self.attention_bias:
            raise ValueError("Qwen2ForCausalLM always has q/k/v bias; attention_bias=False is not representable")
        if self.architecture == MISTRAL and self.attention_bias:
            raise ValueError("MistralForCausalLM has no attention bias in transformers; attention_bias=True is not "
                             "representable")
        if bool(self.qk_norm) != is_qwen3:
            raise ValueError(f"qk_norm={self.qk_norm} does not match {self.architecture} "
                             "(q/k norm exists exactly in Qwen3ForCausalLM)")
        if self.mlp_bias and self.architecture != "LlamaForCausalLM":
            raise ValueError(f"mlp_bias is only supported for LlamaForCausalLM, not {self.architecture}")
        _check_token_ids("bos_token_id", self.bos_token_id, many=False)
        _check_token_ids("eos_token_id", self.eos_token_id, many=True)
        if self.torch_dtype is not None and (not isinstance(self.torch_dtype, str)
                                             or self.torch_dtype not in _FLOAT_DTYPES):
            raise ValueError(f"torch_dtype {self.torch_dtype!r} is not one of {sorted(_FLOAT_DTYPES)}")

    # -- derived -------------------------------------------------------------------------------
    @property
    def model_type(self) -> str:
        return _ARCH_TO_MODEL_TYPE[self.architecture]

    @property
    def o_proj_bias(self) -> bool:
        # Llama and Qwen3 put attention_bias on all four projections; Qwen2 never on o_proj.
        return bool(self.attention_bias) and self.architecture != "Qwen2ForCausalLM"

    @property
    def sliding_window(self) -> int | None:
        """How many keys the sliding layers of config.json (kept in `extra`) attend to, as transformers reads
        it; None when no layer slides (Mistral without the key in `extra`: MistralConfig's 4096). r1fast runs
        full attention, which equals it for sequences up to this many tokens: longer ones are refused
        (CausalLM.forward, the rollout Engine)."""
        return _sliding_window_of(self.architecture, {**self.extra, "num_hidden_layers": self.num_hidden_layers})

    @property
    def max_sequence_length(self) -> int:
        """The longest sequence r1fast runs with transformers' numbers: the model's positions, and no more
        than a sliding window (r1fast's full attention equals it up to the window)."""
        return min(self.max_position_embeddings, self.sliding_window or self.max_position_embeddings)

    @property
    def rope_position_limit(self) -> int | None:
        """The first position transformers rotates differently from r1fast, None when none: dynamic NTK
        rope rescales its base once a batch's positions reach max_position_embeddings, and is the default
        rotation below that (r1fast's runs stay below it)."""
        dynamic = self.rope_scaling is not None and self.rope_scaling["rope_type"] == "dynamic"
        return self.max_position_embeddings if dynamic else None

    @property
    def dtype(self) -> torch.dtype | None:
        return _FLOAT_DTYPES[self.torch_dtype] if self.torch_dtype else None

    # -- Hugging Face config.json ----------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: dict | str | os.PathLike) -> "ModelConfig":
        """From a config.json dict, a config.json path, a checkpoint folder holding one, or a transformers config
        (AutoConfig.from_pretrained(folder)), read as the dict it saves."""
        if isinstance(config, (str, os.PathLike)):
            config = read_config_json(config)
        if _is_transformers_config(config):
            config = config.to_dict()
        if not isinstance(config, dict):
            raise TypeError(f"from_hf_config takes a dict or a path, got {type(config).__name__}")
        try:
            return cls._from_hf_dict(dict(config))
        except ValueError as e:
            if "config.json" in str(e):
                raise
            # the checks shared with ModelConfig(...) do not know their values came from a file
            raise ValueError(f"config.json: {e}") from e

    @classmethod
    def _from_hf_dict(cls, hf: dict) -> "ModelConfig":
        arch = _architecture_of(hf)
        defaults = _FAMILY_DEFAULTS[arch]
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if hf.get(k) is None]
        if missing:
            raise ValueError(f"config.json lacks required key(s) {missing} for {arch}")
        # Checked here, not only in __post_init__, because the sliding-window and rope checks below
        # compare and divide them first.
        for key in ("num_hidden_layers", "max_position_embeddings", "max_window_layers",
                    "original_max_position_embeddings"):
            if hf.get(key) is not None:
                _check_positive_int(key, hf[key], zero_ok=key == "max_window_layers")
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):  # transformers' "swish" is SiLU
            raise ValueError(f"unsupported hidden_act {act!r}; only 'silu' (SwiGLU) is implemented")
        if hf.get("quantization_config"):
            method = hf["quantization_config"].get("quant_method", "?") if isinstance(
                hf["quantization_config"], dict) else "?"
            raise ValueError(f"quantized checkpoints (quantization_config, quant_method={method!r}) are not "
                             "supported; load the bf16/fp32 checkpoint (FP8 training is from_pretrained(fp8=...))")
        _warn_about_dropout(hf.get("attention_dropout"))
        _warn_about_custom_code(arch, hf)
        # checked here; the window itself is enforced on the sequences run (ModelConfig.sliding_window)
        _sliding_window_of(arch, hf)
        rope_params = hf.get("rope_parameters")
        for key in ("rope_parameters", "rope_scaling"):
            if hf.get(key) is not None and not isinstance(hf[key], dict):
                raise ValueError(f"{key} must be an object or null, got {hf[key]!r}")
        if isinstance(rope_params, dict) and any(isinstance(v, dict) for v in rope_params.values()):
            raise ValueError("per-layer-type rope_parameters are not supported")
        rope_theta = _rope_theta_of(hf, defaults["rope_theta"])
        _check_positive_number("rope_theta", rope_theta)
        rope_scaling = hf.get("rope_scaling") or rope_params
        _check_full_rotary(hf)
        _check_rope_agrees(hf, rope_theta, defaults)
        rope_scaling = _fill_rope_lengths(rope_scaling, hf, defaults)
        dtype_name = _checkpoint_dtype_name(hf)
        head_dim = hf.get("head_dim", defaults.get("head_dim"))
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=_num_key_value_heads(arch, hf, defaults),
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", defaults["rms_norm_eps"]),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", defaults["max_position_embeddings"]),
            tie_word_embeddings=_flag(hf, "tie_word_embeddings", defaults["tie_word_embeddings"]),
            # Qwen2 always has q/k/v bias; MistralForCausalLM ignores the key (never a bias)
            attention_bias={"Qwen2ForCausalLM": True, MISTRAL: False}.get(arch, _flag(hf, "attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            # only Llama's MLP reads mlp_bias in transformers (Qwen2/3 ignore the key)
            mlp_bias=_flag(hf, "mlp_bias", False) if arch == "LlamaForCausalLM" else False,
            bos_token_id=hf.get("bos_token_id", defaults["bos_token_id"]),
            eos_token_id=hf.get("eos_token_id", defaults["eos_token_id"]),
            torch_dtype=dtype_name,
            initializer_range=_flag(hf, "initializer_range", 0.02),
            extra={k: _NULL_READ_AS.get(k) if v is None else v for k, v in hf.items() if k not in _OWN_KEYS},
        )

    def to_hf_config(self, dtype: torch.dtype | None = None) -> dict[str, Any]:
        """A config.json dict that transformers (4.x legacy rope keys and 5.x rope_parameters) loads."""
        dtype_name = _dtype_name(dtype) if dtype is not None else self.torch_dtype
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope_parameters = {**self.rope_scaling, "rope_theta": self.rope_theta}
        out = dict(self.extra)
        out.update({
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_parameters": rope_parameters,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "initializer_range": self.initializer_range,
        })
        if self.architecture in ("LlamaForCausalLM", "Qwen3ForCausalLM"):
            out["attention_bias"] = bool(self.attention_bias)
        if self.architecture == MISTRAL:  # explicit, so that no reader falls back to MistralConfig's 4096
            out["sliding_window"] = self.sliding_window
        if self.architecture == "LlamaForCausalLM":
            out["mlp_bias"] = bool(self.mlp_bias)
        if "partial_rotary_factor" in out:
            # a top-level factor carried through `extra` loaded only because the rope dict said 1.0 over it
            # (_check_full_rotary): the dicts written here must say so too, else transformers reads the top-level one
            for key in ("rope_parameters", "rope_scaling"):
                if out[key] is not None:
                    out[key]["partial_rotary_factor"] = 1.0
        if dtype_name:
            out["torch_dtype"] = dtype_name
            out["dtype"] = dtype_name
        return out


def _is_transformers_config(config) -> bool:
    """A transformers PretrainedConfig (found by its module: transformers is not imported for it): refused as "not a
    dict" before, though its to_dict() is the config.json it writes."""
    return type(config).__module__.startswith("transformers.") and callable(getattr(config, "to_dict", None))


def read_config_json(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        folder = os.path.dirname(path)
        raise FileNotFoundError(f"no config.json at {path}{not_a_model_folder_hint(folder)}")
    return read_json_object(path)


def not_a_model_folder_hint(folder: str) -> str:
    """What the folder given for a model is instead, where it is something r1fast knows (a Hugging Face cache entry,
    a PEFT adapter, a training run's folder), else ""."""
    return _cache_hint(folder) or adapter_folder_hint(folder) or run_folder_hint(folder)


# the names a run folder's checkpoints have (r1fast.trainer.checkpoints saves and lists them by it), and what a run
# writes in its folder before its first checkpoint
CHECKPOINT_NAME_RE = re.compile(r"^checkpoint-(\d+)$")
_RUN_FILES = ("metrics.jsonl", "completions.jsonl", "pipeline_state.json", ".r1fast.lock")


def run_folder_hint(folder: str) -> str:
    """A training run's folder (runs/grpo, or a pipeline's runs/default) holds the model in its checkpoint-<step>
    folders, not itself: "no tokenizer files in 'runs/grpo'" read as a run saved without its tokenizer. Names the
    newest checkpoint to give instead, or says the run has saved none yet."""
    def checkpoints(run: str) -> list[tuple[int, str]]:
        found = []
        for name in _listing(run):
            m = CHECKPOINT_NAME_RE.match(name)
            if m and os.path.isfile(os.path.join(run, name, "config.json")):
                found.append((int(m.group(1)), os.path.join(run, name)))
        return found

    own = checkpoints(folder)
    if own:
        return f" ({folder} is a training run's folder: give one of its checkpoints, e.g. its newest, {max(own)[1]})"
    # a pipeline's: each stage trains in a folder of its own; the newest stage's newest checkpoint is the latest
    stages = [max(found)[1] for found in map(checkpoints, (os.path.join(folder, n) for n in _listing(folder))) if found]
    if stages:
        newest = max(stages, key=lambda path: os.path.getmtime(os.path.join(path, "config.json")))
        return (f" ({folder} is a pipeline's run folder: give one of its stages' checkpoints, e.g. the newest, "
                f"{newest})")
    if any(os.path.exists(os.path.join(folder, name)) for name in _RUN_FILES):
        return (f" ({folder} is a training run's folder that holds no checkpoint yet: a run saves one every "
                f"save_steps steps, and at its end)")
    return ""


def _listing(folder: str) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except OSError:   # not a folder, or not readable: nothing to say of it
        return []


def adapter_folder_hint(folder: str) -> str:
    """A PEFT/LoRA adapter's folder (peft's or TRL's save: adapter_config.json, adapter_model.safetensors) has no
    config.json: "no config.json" alone read as a folder not saved or copied whole."""
    path = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(path):
        return ""
    try:
        base = read_json_object(path).get("base_model_name_or_path")
    except (OSError, ValueError):   # a damaged adapter_config.json: still an adapter's folder
        base = None
    return (f" ({folder} holds a PEFT/LoRA adapter{f' of {base!r}' if base else ''}, not a model: merge it into its "
            f"base model, e.g. with peft's merge_and_unload(), save the merged model and load that folder)")


def _cache_hint(folder: str) -> str:
    """A Hugging Face hub cache entry (models--org--name) keeps each revision's files under snapshots/."""
    snapshots = os.path.join(folder, "snapshots")
    if not os.path.isdir(snapshots):
        return ""
    found = sorted(os.path.join(snapshots, r) for r in os.listdir(snapshots)
                   if os.path.isfile(os.path.join(snapshots, r, "config.json")))
    if not found:
        return ""
    return f" (a Hugging Face cache folder: the checkpoint is a revision under snapshots/, e.g. {found[0]})"


def read_json_object(path: str) -> dict:
    """The JSON object in the file at `path`; anything else (bad JSON, not UTF-8, a list) names the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        if is_lfs_pointer(path):
            raise ValueError(f"{path} is a Git LFS pointer, not the file (a clone without git-lfs); fetch it "
                             f"with `git lfs pull` in that repository") from e
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


_LFS_POINTER_START = b"version https://git-lfs.github.com/spec/"


def is_lfs_pointer(path: str) -> bool:
    """Whether the file is a Git LFS pointer: what a clone without git-lfs holds in place of large files."""
    try:
        with open(path, "rb") as f:
            return f.read(len(_LFS_POINTER_START)) == _LFS_POINTER_START
    except OSError:
        return False


def _warn_about_dropout(rate) -> None:
    """attention_dropout is the one dropout Llama/Qwen2/Qwen3/Mistral read in transformers (in training mode only).
    r1fast never applies it: the sampler's and the trainer's log-probs of one model must agree (TRL's
    disable_dropout=True does the same for GRPO). Said once per load, so that training differs knowingly."""
    if rate is None:
        return
    _check_positive_number("attention_dropout", rate, zero_ok=True)
    if rate > 0:
        logging.getLogger(__name__).warning(
            "config.json: attention_dropout=%s is not applied: r1fast never uses dropout (rollouts and "
            "training must compute the same log-probs), where transformers applies it in training mode", rate)


def _warn_about_custom_code(arch: str, hf: dict) -> None:
    """auto_map names a checkpoint's own modeling code (run by transformers only with trust_remote_code=True). r1fast
    never runs it: it builds its own implementation of the model type, as transformers does by default for a model
    type it knows. Not refused, since many checkpoints carry an auto_map their code does not change anything with;
    said once per load, with the classes, so that a checkpoint whose code does change the model is noticed."""
    auto_map = hf.get("auto_map")
    if not auto_map:
        return
    classes = (", ".join(f"{name}: {target}" for name, target in sorted(auto_map.items()))
               if isinstance(auto_map, dict) else repr(auto_map))
    logging.getLogger(__name__).warning(
        "config.json: auto_map names custom code (%s) that r1fast does not run: it builds its own %s (model_type "
        "%r), as transformers does without trust_remote_code=True; if that code changes the model (layers, "
        "attention, rope, heads), r1fast's outputs are not the checkpoint's", classes, arch, hf.get("model_type"))


_QWEN_MAX_WINDOW_LAYERS = 28  # transformers' Qwen2Config/Qwen3Config defaults
_QWEN_SLIDING_WINDOW = 4096
# Keys of `extra` a config.json may set to null, which r1fast reads (as transformers 4 did) as the value here and
# transformers 5 refuses ("Field 'max_window_layers' expected int, got NoneType"): kept as the value read, so that
# a checkpoint saved from such a file loads in transformers. Other nulls stay as they are (null is a value there).
_NULL_READ_AS = {"use_sliding_window": False, "max_window_layers": _QWEN_MAX_WINDOW_LAYERS, "attention_dropout": 0.0,
                 "use_cache": True}


def _sliding_window_of(arch: str, hf: dict) -> int | None:
    """The window of the layers transformers makes sliding for this config, None when none slides.
    Llama has no sliding attention (its classes ignore these keys); Mistral: see _mistral_window. Qwen2/3
    slide the layers `layer_types` names sliding_attention when the config has it (transformers 5 saves it),
    else the layers from max_window_layers on; either only when use_sliding_window is true and
    sliding_window is not null (absent: the classes' 4096)."""
    if arch == "LlamaForCausalLM":
        return None
    if arch == MISTRAL:
        return _mistral_window(hf)
    window = hf.get("sliding_window", _QWEN_SLIDING_WINDOW) if hf.get("use_sliding_window") else None
    if hf.get("layer_types") is not None:
        slides = _names_sliding_layers(hf["layer_types"])
        if slides and window is None:
            raise ValueError(f"layer_types names sliding_attention layers but use_sliding_window="
                             f"{hf.get('use_sliding_window')!r} and sliding_window={hf.get('sliding_window')!r} "
                             f"give them no window (transformers fails on this config)")
    else:
        first = hf.get("max_window_layers")
        first = _QWEN_MAX_WINDOW_LAYERS if first is None else first
        slides = window is not None and first < hf["num_hidden_layers"]
    if not slides:
        return None
    _check_positive_int("sliding_window", window)
    return window


def _mistral_window(hf: dict) -> int | None:
    """MistralForCausalLM slides every layer when sliding_window (4096 when absent) is not null, and reads
    neither use_sliding_window nor max_window_layers nor layer_types. With layer_types, though,
    AutoModelForCausalLM builds a MinistralForCausalLM, which slides the layers named sliding_attention:
    the two agree on sequences up to the window, the only ones r1fast runs, except that Ministral fails on
    sliding layers without a window."""
    window = hf.get("sliding_window", _FAMILY_DEFAULTS[MISTRAL]["sliding_window"])
    if hf.get("layer_types") is not None and _names_sliding_layers(hf["layer_types"]) and window is None:
        raise ValueError("layer_types names sliding_attention layers but sliding_window is null: transformers' "
                         "AutoModelForCausalLM reads a mistral config.json with layer_types as "
                         "MinistralForCausalLM, which fails on this config; give the window or drop layer_types")
    if window is not None:
        _check_positive_int("sliding_window", window)
    return window


def _names_sliding_layers(layer_types) -> bool:
    if not isinstance(layer_types, list):
        raise ValueError(f"layer_types must be a list, got {layer_types!r:.80}")
    other = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")}, key=str)
    if other:
        raise ValueError(f"layer_types {other} are not supported (only full_attention and sliding_attention)")
    return "sliding_attention" in layer_types


def _num_key_value_heads(arch: str, hf: dict, defaults: dict):
    """null means as many as the query heads; an absent key is the family's default (Qwen2Config and
    Qwen3Config: 32, MistralConfig: 8, LlamaConfig: the query heads), which sizes k_proj/v_proj there.
    MistralConfig refuses null (its field is a plain int), so a Mistral config.json with it is refused too."""
    if "num_key_value_heads" not in hf:
        implied = defaults.get("num_key_value_heads")
        heads = hf["num_attention_heads"]
        if implied is not None and isinstance(heads, int) and heads % implied:
            # else "must be a multiple of num_key_value_heads (8)" names a number the file does not hold
            config_class = _ARCH_TO_MODEL_TYPE[arch].capitalize() + "Config"
            raise ValueError(f"num_key_value_heads is absent, which {config_class} reads as {implied}, and "
                             f"num_attention_heads ({heads}) is not a multiple of it; give num_key_value_heads")
        return implied
    if hf["num_key_value_heads"] is None and arch == MISTRAL:
        raise ValueError("num_key_value_heads is null, which transformers' MistralConfig refuses; give the number")
    return hf["num_key_value_heads"]


def _rope_theta_of(hf: dict, default_theta):
    """rope_theta as transformers 5 reads it: from the rope dict it reads (a non-empty rope_scaling, in place of
    rope_parameters), else the top-level key, else the family's default. Newer savers put it in that dict, under
    either name: {"rope_type": "default", "rope_theta": 5e5} as rope_scaling was refused as a disagreement."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    return rope.get("rope_theta", hf.get("rope_theta", default_theta))


def _check_rope_agrees(hf: dict, rope_theta, defaults: dict) -> None:
    """transformers 5 reads rope_scaling, when present, in place of rope_parameters (its rope_theta, else the
    top-level one), where transformers 4 read the top-level rope_theta beside it. A config.json whose rope_scaling
    says otherwise than the rope_parameters it replaces, or whose rope_scaling rope_theta differs from the top-level
    one, means different rotations to different readers, so it is refused."""
    scaling, params = hf.get("rope_scaling"), hf.get("rope_parameters")
    if not scaling or not isinstance(scaling, dict):  # {} as null: transformers then reads rope_parameters
        return
    top = hf.get("rope_theta")
    if "rope_theta" in scaling and top is not None:
        _check_positive_number("rope_theta", top)
        if float(top) != float(rope_theta):
            raise ValueError(f"config.json's rope settings disagree: rope_scaling's rope_theta is {rope_theta}, the "
                             f"top-level rope_theta {top} (transformers 5 reads the first, 4.x the second); keep one")
    if not isinstance(params, dict):
        return
    replaced = params.get("rope_theta", top if top is not None else defaults["rope_theta"])
    _check_positive_number("rope_parameters rope_theta", replaced)
    if float(replaced) != float(rope_theta):
        raise ValueError(f"config.json's rope settings disagree: rope_parameters' rope_theta is {replaced} but "
                         f"transformers would read {rope_theta} (rope_scaling replaces rope_parameters there); put "
                         f"the same rope_theta in rope_scaling, or keep only one of rope_scaling / rope_parameters")
    # compared as transformers reads each, its fallbacks filled in: a yarn/llama3 dict without
    # original_max_position_embeddings (or with a null yarn factor) is complete there, and both say the same
    if _normalize_rope_scaling(_fill_rope_lengths(scaling, hf, defaults)) != \
            _normalize_rope_scaling(_fill_rope_lengths(params, hf, defaults)):
        raise ValueError(f"config.json's rope_scaling {scaling} and rope_parameters {params} disagree; keep one")


def _check_full_rotary(hf: dict) -> None:
    """partial_rotary_factor as transformers reads it: from a legacy rope_scaling (read in rope_parameters' place;
    its scaled rotations, linear or yarn, rotate that share of each head), else rope_parameters, else the top level
    (set in the dict only where it has none). r1fast rotates every dimension. The first found is the one read: a
    top-level 0.5 beside rope_parameters' 1.0 is full rotary there, and was refused."""
    for where in ("rope_scaling" if hf.get("rope_scaling") else "rope_parameters", None):
        holder = hf if where is None else hf.get(where) or {}
        if holder.get("partial_rotary_factor") is None:
            continue
        name = "partial_rotary_factor" if where is None else f"{where} partial_rotary_factor"
        partial = holder["partial_rotary_factor"]
        _check_positive_number(name, partial)
        if partial != 1.0:
            raise ValueError(f"{name}={partial} is not supported (only full rotary)")
        return


def _fill_rope_lengths(scaling, hf: dict, defaults: dict):
    """transformers' fallbacks for llama3/yarn: original_max_position_embeddings from the top level
    (Phi-3 style) or max_position_embeddings, and yarn's factor max / original when null."""
    kind = (scaling.get("rope_type") or scaling.get("type")) if isinstance(scaling, dict) else None
    if kind not in ("llama3", "yarn"):
        return scaling
    scaling = dict(scaling)
    if scaling.get("original_max_position_embeddings") is not None:  # divided by just below
        _check_positive_int("rope_scaling original_max_position_embeddings",
                            scaling["original_max_position_embeddings"])
    max_pos = hf.get("max_position_embeddings", defaults["max_position_embeddings"])
    if hf.get("original_max_position_embeddings") is not None:
        scaling["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    elif scaling.get("original_max_position_embeddings") is None:
        scaling["original_max_position_embeddings"] = max_pos
    if scaling.get("factor") is None and kind == "yarn":
        scaling["factor"] = max_pos / scaling["original_max_position_embeddings"]
    return scaling


def _architecture_of(hf: dict) -> str:
    archs = hf.get("architectures")
    if archs:
        if not isinstance(archs, list) or len(archs) != 1:
            raise ValueError(f"config.json 'architectures' must list exactly one class, got {archs!r}")
        arch = archs[0]
        mt = hf.get("model_type")
        if mt is not None and arch in _ARCH_TO_MODEL_TYPE and mt not in tuple(_MODEL_TYPE_TO_ARCH):
            # e.g. the MinistralForCausalLM AutoModelForCausalLM builds from a mistral config.json with
            # layer_types: its config keeps architectures=['MistralForCausalLM']
            raise ValueError(f"unsupported model_type {mt!r} (transformers builds the model from model_type, not "
                             f"from architectures={archs!r}); r1fast.models supports model types "
                             f"{', '.join(_MODEL_TYPE_TO_ARCH)}")
        if mt is not None and arch in _ARCH_TO_MODEL_TYPE and mt != _ARCH_TO_MODEL_TYPE[arch]:
            # transformers' Auto classes follow model_type
            raise ValueError(f"config.json says architectures={archs!r} but model_type={mt!r} (transformers "
                             f"builds the model from model_type); make them agree")
    elif hf.get("model_type") in _MODEL_TYPE_TO_ARCH:
        arch = _MODEL_TYPE_TO_ARCH[hf["model_type"]]
    else:
        raise ValueError(f"config.json names no architecture (architectures={archs!r}, "
                         f"model_type={hf.get('model_type')!r}); supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r}; r1fast.models supports "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def _normalize_rope_scaling(scaling) -> dict | None:
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be a dict or None, got {type(scaling).__name__}")
    scaling = dict(scaling)
    scaling.pop("rope_theta", None)  # kept in ModelConfig.rope_theta
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    # r1fast rotates every dimension: a partial factor here would be saved (rope_parameters) for transformers to
    # rotate part of each head, a different model; 1.0 says nothing, so that it compares equal to an absent one
    partial = scaling.pop("partial_rotary_factor", None)
    if partial is not None:
        _check_positive_number("rope_scaling partial_rotary_factor", partial)
        if partial != 1.0:
            raise ValueError(f"rope_scaling partial_rotary_factor={partial} is not supported (only full rotary)")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return None
    # null counts as missing: the rotation would divide by it (transformers fails there too)
    missing = [k for k in _ROPE_REQUIRED_KEYS[rope_type] if scaling.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} lacks key(s) {missing} (absent or null)")
    for key in ("factor", "low_freq_factor", "high_freq_factor", "attention_factor", "beta_fast", "beta_slow",
                "mscale", "mscale_all_dim"):
        if scaling.get(key) is not None:  # yarn reads an mscale of 0 as absent
            _check_positive_number(f"rope_scaling {key}", scaling[key], zero_ok=key.startswith("mscale"))
    if scaling.get("original_max_position_embeddings") is not None:
        _check_positive_int("rope_scaling original_max_position_embeddings",
                            scaling["original_max_position_embeddings"])
    if rope_type == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError("llama3 rope_scaling needs high_freq_factor > low_freq_factor")
    return {"rope_type": rope_type, **scaling}


def _check_positive_int(name: str, value, zero_ok: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero_ok else 1):
        raise ValueError(f"{name} must be a {'non-negative' if zero_ok else 'positive'} int, got {value!r}")


def _flag(hf: dict, key: str, default: bool):
    """A boolean config.json key; null means the default, as in transformers."""
    value = hf.get(key)
    return default if value is None else value


def _check_token_ids(name: str, value, many: bool) -> None:
    ids = value if many and isinstance(value, list) else [value]
    if value is None or all(not isinstance(i, bool) and isinstance(i, int) and i >= 0 for i in ids):
        return
    kind = "a non-negative int, a list of them, or null" if many else "a non-negative int or null"
    raise ValueError(f"{name} must be {kind}, got {value!r}")


def _check_positive_number(name: str, value, zero_ok: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            not (value >= 0 if zero_ok else value > 0):
        raise ValueError(f"{name} must be a {'non-negative' if zero_ok else 'positive'} finite number, got {value!r}")


def _checkpoint_dtype_name(hf: dict) -> str | None:
    """config.json's dtype as a name in _FLOAT_DTYPES, or None. transformers reads dtype, and torch_dtype (the older
    key) where dtype is absent or null, as an attribute of torch: "half", "float" and "double" load there and are read
    alike here (they were refused). An error names the key the value came from (it said torch_dtype of a config
    holding only dtype) and what to write instead."""
    key = "dtype" if hf.get("dtype") is not None else "torch_dtype"
    name = hf.get(key)
    if name is None or name == "auto":
        return None
    if not isinstance(name, str):
        raise ValueError(f"dtype/torch_dtype must be a dtype name like 'bfloat16', got {name!r}")
    dtype = getattr(torch, name, None) if name.isidentifier() else None
    if isinstance(dtype, torch.dtype) and dtype in _FLOAT_DTYPES.values():
        return _dtype_name(dtype)
    if isinstance(dtype, torch.dtype):
        why = f"r1fast does not load {name} weights (a quantized checkpoint? load its bf16 or fp32 original)"
    else:
        try:
            meant = resolve_dtype(name)   # "bf16", "torch.float16": names transformers does not read either
        except ValueError:
            meant = None
        why = f"use {_dtype_name(meant)!r}, the name transformers reads" if meant else "not a torch dtype name"
    raise ValueError(f"{key} {name!r} is not one of {sorted(_FLOAT_DTYPES)}: {why}")


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in _FLOAT_DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"unsupported model dtype {dtype}; supported: {sorted(_FLOAT_DTYPES)}")


def resolve_dtype(dtype) -> torch.dtype | None:
    """None, a torch floating dtype, or its name ("bfloat16", "bf16", "fp32"...) -> torch.dtype. "auto" is None
    (the checkpoint's own dtype), as transformers' from_pretrained(dtype="auto") reads it."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in _FLOAT_DTYPES.values():
        return dtype
    if dtype == "auto":
        return None
    if isinstance(dtype, str):
        aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                   "float": "float32", "fp64": "float64", "double": "float64"}
        name = aliases.get(dtype, dtype.replace("torch.", ""))
        if name in _FLOAT_DTYPES:
            return _FLOAT_DTYPES[name]
    raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(_FLOAT_DTYPES)}")
