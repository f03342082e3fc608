"""Pieces shared by the GRPO and SFT loops: models by name, optimizer and schedule, packing."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

# The embedded default's model: small enough for a 2-core CPU, deep enough to learn carries.
BUILTIN_MODELS = {
    "micro": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=128),   # tests
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256),
    "small": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=512),
}


def resolve_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:   # torch's own message lists every device type; name the option instead
        raise ValueError(f"device {name!r} is not a torch device (cpu, cuda, cuda:0...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        # what to do differs: a CPU build of torch (the README's install on a CPU) never sees a GPU
        why = (f"torch {torch.__version__} is a CPU build; install a CUDA build of torch for the GPU"
               if torch.version.cuda is None else "torch finds no GPU here (r1fast info shows what it sees)")
        raise ValueError(f"device {name!r} asked for but CUDA is not available: {why}, or set device=cpu "
                         f"(unset, the GPU is used when there is one)")
    return dev


def run_dir_for(output_dir: Optional[str], run_name: Optional[str], default_name: str) -> str:
    from r1fast.trainer.config import check_run_name

    if output_dir:
        return output_dir
    check_run_name(run_name, output_dir)
    return os.path.join(os.getcwd(), "runs", run_name or default_name)


def spec_tokenizer(spec: str):
    """The tokenizer a model spec loads with: the built-in character tokenizer for builtin:<size>, else the
    folder's own (the pipeline checks stop_tokens with it before any model loads)."""
    if spec.startswith("builtin:"):
        from r1fast.data.tokenizer import build_char_tokenizer

        return build_char_tokenizer()
    from r1fast.models import load_tokenizer

    return load_tokenizer(spec)


def load_model_and_tokenizer(spec: Optional[str], *, device, dtype: str = "float32", seed: int = 0, fp8="off",
                             tokenizer=None):
    """`builtin:<size>` (random init, built-in char tokenizer) or a local Hugging Face folder. fp8: a
    mode or r1fast.fp8.Fp8Options (GRPOConfig.fp8_options())."""
    from r1fast.models import CausalLM, ModelConfig, from_pretrained
    from r1fast.models.checkpoint import missing_model_hint

    if spec is None:
        raise ValueError("model_name_or_path is required (a local Hugging Face folder or builtin:tiny)")
    from r1fast import backends

    backends.check_environment()   # a misspelt R1FAST_BACKEND is said before the weights load, not at the first op
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if spec.startswith("builtin:"):
        size = spec.split(":", 1)[1]
        if size not in BUILTIN_MODELS:
            raise ValueError(f"unknown built-in model {spec!r}; choose from "
                             f"{', '.join('builtin:' + k for k in BUILTIN_MODELS)}")
        tok = tokenizer or spec_tokenizer(spec)
        cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, **BUILTIN_MODELS[size])
        torch.manual_seed(seed)
        model = CausalLM(cfg)
        model.reset_parameters(seed=seed)
        model = model.to(device=device, dtype=torch_dtype)
        from r1fast.fp8 import apply_fp8, as_options

        if as_options(fp8).mode != "off":
            model = apply_fp8(model, fp8)
        return model, tok
    if not os.path.isdir(spec):
        raise ValueError(f"model {spec!r} is not a folder (give a local Hugging Face checkpoint or builtin:tiny"
                         f"{missing_model_hint(spec)})")
    # the tokenizer first: a missing or broken one is reported in a second, not after the weights load
    tok = tokenizer or spec_tokenizer(spec)
    model = from_pretrained(spec, dtype=torch_dtype, device=device, fp8=fp8)
    return model, tok


def model_from_argument(model, tokenizer, cfg, fp8="off"):
    """A trainer's `model` argument as (model, tokenizer): a name (builtin:<size>, a local Hugging Face
    folder) is loaded with the config's device, dtype and seed (its tokenizer with it, unless one is
    given); a loaded model is returned as it is, and an explicit config device must then be its device
    (every trainer and rejection sampling check this alike)."""
    if not isinstance(model, (str, os.PathLike)):
        check_model_device(model, getattr(cfg, "device", None))
        return model, tokenizer
    return load_model_and_tokenizer(os.fspath(model), device=resolve_device(cfg.device), dtype=cfg.dtype,
                                    seed=cfg.seed, fp8=fp8, tokenizer=tokenizer)


# Keywords of TRL's GRPOTrainer / SFTTrainer that r1fast's trainers do not take, and what to do instead
# (each left at TRL's default, None or (None, None), is accepted: a ported script often passes them so)
_TRL_ONLY_KEYWORDS = {
    "reward_processing_classes": "r1fast's reward functions get the decoded completions, not token ids: give "
                                 "built-in names or functions (docs/training.md, Rewards)",
    "callbacks": "r1fast's trainers take no callbacks: metrics go to the run folder's metrics.jsonl and report_to",
    "optimizers": "the trainer builds AdamW and its schedule from the config (learning_rate, weight_decay, adam_*, "
                  "lr_scheduler_type, warmup_*)",
    "optimizer_cls_and_kwargs": "the trainer builds AdamW from the config (learning_rate, weight_decay, adam_*)",
    "peft_config": "r1fast trains every weight (no LoRA/PEFT); use TRL's trainer for PEFT",
    "quantization_config": "r1fast loads the model in the config's dtype (or fp8: see docs/fp8.md)",
    "data_collator": "r1fast packs its own batches",
    "formatting_func": "give prompt/completion or messages rows (docs/training.md, Data)",
    "eval_dataset": "r1fast's SFTTrainer does not evaluate: r1fast.trainer.evaluate_accuracy(model, tok, rows) "
                    "after training, or a pipeline's eval_dataset",
}


def trl_alias(name: str, value, trl_name: str, trl_value, who: str):
    """An argument given under r1fast's name or TRL's (config/args, tokenizer/processing_class), not both."""
    if trl_value is None:
        return value
    if value is not None:
        raise TypeError(f"{who}: {name} and {trl_name} are the same argument ({trl_name} is TRL's name); give one")
    return trl_value


def refuse_config_in_trl_place(value, place: str, who: str, trl_order: str, order: str):
    """A config (r1fast's or TRL's: same class names) passed positionally where TRL's signature has `args`: it
    landed in r1fast's `place` and was refused as a wrong config or tokenizer, not as an argument order."""
    name = type(value).__name__
    if name in ("GRPOConfig", "SFTConfig"):
        raise TypeError(f"{who}: {place} is {'an' if name == 'SFTConfig' else 'a'} {name}: TRL's positional order is {trl_order}, r1fast's "
                        f"{order}; pass them by keyword (args=..., train_dataset=..., processing_class=...)")


def refuse_trl_only_keywords(keywords: dict, who: str):
    """TRL trainer keywords r1fast has no counterpart for: named with what to do, not Python's bare
    "unexpected keyword argument" (an unknown keyword still gets exactly that)."""
    for key, value in keywords.items():
        if key not in _TRL_ONLY_KEYWORDS:
            raise TypeError(f"{who}.__init__() got an unexpected keyword argument {key!r}")
        unset = value is None or (isinstance(value, tuple) and all(v is None for v in value))
        if not unset:
            raise TypeError(f"{who}: {key} is TRL's, not r1fast's: {_TRL_ONLY_KEYWORDS[key]}")


def check_config_type(cfg, expected: type, who: str, instead: str):
    """The trainer's own config class. TRL's (its classes have the same names: the old error read "config must be
    a GRPOConfig, got GRPOConfig") and other foreign ones are named with their module and what to build instead."""
    if isinstance(cfg, expected):
        return
    kind, name = type(cfg), expected.__name__
    foreign = kind.__module__ != "builtins" and not kind.__module__.startswith("r1fast.")
    got = f"{kind.__module__}.{kind.__qualname__}" if foreign else kind.__name__
    message = f"{who}: config must be an r1fast {name}, got {got}"
    if isinstance(cfg, dict):
        message += f"; {name}.from_dict(mapping) builds one"
    elif foreign:
        message += f"; {instead}"
    raise TypeError(message)


def trainer_config_and_tokenizer(who: str, config_class: type, instead: str, *, config, args, tokenizer,
                                 processing_class, trl_keywords: dict):
    """A trainer's config and tokenizer arguments, each under r1fast's name or TRL's; TRL-only keywords
    refused; the config defaulted, checked to be the trainer's own class (`instead`: what to build in place
    of a foreign one) and validated. Returns (config, tokenizer)."""
    config = trl_alias("config", config, "args", args, who)
    tokenizer = trl_alias("tokenizer", tokenizer, "processing_class", processing_class, who)
    refuse_trl_only_keywords(trl_keywords, who)
    cfg = config or config_class()
    check_config_type(cfg, config_class, who, instead)
    cfg.validate()
    return cfg, tokenizer


def check_model_device(model, device: Optional[str]):
    """An explicit `device` option for a model passed in as an object must be where the model is: it is
    not moved, and the option would otherwise be ignored without a word."""
    here = getattr(model, "device", None)
    if device is not None and isinstance(here, torch.device) and torch.device(device).type != here.type:
        from r1fast.trainer.config import ConfigError

        raise ConfigError(f"option 'device' is {device!r} but the model is on {here}; move the model "
                          f"(model.to(...)) or drop the option")


def check_model_and_tokenizer(model, tokenizer, who: str):
    """A loaded model and its tokenizer (a missing tokenizer failed deep in the prompt checks, "'NoneType'
    object is not callable")."""
    if not hasattr(model, "lm_head_weight"):
        raise TypeError(f"{who}: model must be an r1fast CausalLM or its name (builtin:tiny, a local Hugging Face "
                        f"folder), got {type(model).__name__}; wrap a transformers model with "
                        f"r1fast.models.from_pretrained(path)")
    if tokenizer is None or not callable(tokenizer):
        raise TypeError(f"{who}: tokenizer must be the model's tokenizer (r1fast.models.load_tokenizer(path)), "
                        f"got {tokenizer!r:.80}")


def dataset_rows(data, what: str, *, split: Optional[str], seed: int, n_builtin: int = 1000,
                 default_splits: Optional[Sequence[str]] = None) -> list[dict]:
    """A trainer's dataset argument as a list of row dicts: a list of dicts, a datasets.Dataset, or a path /
    builtin:<task> (read with load_rows; `split`, `default_splits` and `n_builtin` as there)."""
    from r1fast.data.loading import TRAIN_SPLITS, dataset_as_rows, load_rows, same_columns

    if data is None:
        raise ValueError(f"no {what} dataset: pass one or set config.dataset")
    if isinstance(data, (str, os.PathLike)):
        return load_rows(os.fspath(data), split=split, seed=seed, n_builtin=n_builtin,
                         default_splits=default_splits or TRAIN_SPLITS)
    if isinstance(data, list):
        if not data or not isinstance(data[0], dict):
            raise ValueError(f"{what} dataset must be a non-empty list of row dicts")
        bad = next((i for i, r in enumerate(data) if not isinstance(r, dict)), None)
        if bad is not None:
            raise ValueError(f"{what} dataset: row {bad} is a {type(data[bad]).__name__}, not a dict of columns")
        return same_columns(data)
    if isinstance(data, dict) and data and all(hasattr(v, "column_names") for v in data.values()):
        # a datasets.DatasetDict (load_dataset without split=) was "a dict (columns ['train'])": its split is
        # read, as from a folder saved from one
        name = split or next((s for s in (default_splits or TRAIN_SPLITS) if s in data), next(iter(data)))
        if name not in data:
            raise ValueError(f"{what} dataset (a DatasetDict) has no split {name!r}; splits: {list(data)}")
        data = data[name]
    elif isinstance(data, dict):  # indexed as rows below, it failed with KeyError: 0
        raise TypeError(f"{what} dataset is a dict (columns {sorted(map(str, data))[:5]}); give a list of row dicts "
                        f"or datasets.Dataset.from_dict(...)")
    if hasattr(data, "iterrows"):   # a pandas DataFrame: data[0] below is its column 0, a KeyError
        raise TypeError(f"{what} dataset is a pandas DataFrame (columns {[str(c) for c in data.columns][:5]}); give "
                        f"datasets.Dataset.from_pandas(df) or a list of row dicts")
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):   # datasets.Dataset
        if not len(data):   # else an IndexError at its first row, in whichever check read it first
            raise ValueError(f"{what} dataset is empty ({type(data).__name__} of 0 rows)")
        return dataset_as_rows(data)
    raise TypeError(f"{what} dataset must be a list of dicts, a datasets.Dataset or a path; got {type(data).__name__}")


def decay_groups(params: list, weight_decay: float) -> list[dict]:
    """AdamW param groups where only matrices (2-D and up: linear layers, embeddings) decay. Decay pulls
    a weight toward 0; for a norm's gain, whose neutral value is 1, or a bias that pull is a bias of
    its own, so 1-D parameters are left out, as Hugging Face's Trainer does. No decay: one group."""
    if not weight_decay:
        return [{"params": params, "weight_decay": 0.0}]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model, cfg) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    low = sorted({str(p.dtype) for p in params if p.dtype in (torch.bfloat16, torch.float16)})
    params = decay_groups(params, cfg.weight_decay)
    if low and cfg.fp32_master_weights:
        from r1fast.trainer.master_weights import MasterWeightAdamW

        return MasterWeightAdamW(params, accumulate_fp32=cfg.fp32_grad_accumulation, **kwargs)
    if low:
        # AdamW's step is about learning_rate per weight; a 16-bit weight of magnitude ~0.02 moves only by
        # multiples of ~1e-4 (bf16), so smaller steps round away and the run learns nothing, silently
        logging.getLogger(__name__).warning(
            "the model's parameters are %s and fp32_master_weights is off: an update smaller than about 0.2%% "
            "of a weight's size is rounded away (learning_rate=%g)", "/".join(low), cfg.learning_rate)
    return torch.optim.AdamW(params, **kwargs)


class NonFiniteLoss(RuntimeError):
    """Too many optimizer steps in a row had a NaN/inf loss or gradient (max_nonfinite_steps)."""


def make_loss_scale(model, optimizer):
    """A LossScale for float16 parameters stepped through fp32 copies that sum their gradients (where the
    gradients are unscaled in fp32); None for fp32/bf16. float16 without them is warned about."""
    if not any(p.dtype == torch.float16 for p in model.parameters() if p.requires_grad):
        return None
    from r1fast.trainer.loss_scale import LossScale
    from r1fast.trainer.master_weights import MasterWeightAdamW

    if isinstance(optimizer, MasterWeightAdamW) and optimizer.accumulate_fp32:
        return LossScale()
    logging.getLogger(__name__).warning(
        "float16 parameters without fp32_master_weights and fp32_grad_accumulation train without loss scaling: "
        "gradients below 6e-8 become 0 (most of them at a token mean over many tokens); use bfloat16, or turn both on")
    return None


def unscale_and_clip(trainer) -> float:
    """The norm of the gradients the next step applies, the loss scale divided out (in fp32), clipped to
    max_grad_norm."""
    holders = gradient_holders(trainer.optimizer, trainer.model)
    scaler = getattr(trainer, "loss_scale", None)
    if scaler is not None:
        scaler.unscale_(holders)
    return grad_norm_and_clip(holders, trainer.cfg.max_grad_norm)


def step_if_finite(trainer, finite: bool, loss_finite: bool = True) -> None:
    """The optimizer step, or for a NaN/inf loss or gradient none: the gradients dropped, the step counted
    (trainer.nonfinite_skipped) and the run stopped after max_nonfinite_steps of them in a row. Under a loss
    scale an inf gradient of a finite loss (an fp16 overflow) halves the scale and, while the scale is 1 or
    more, is not counted towards that limit: the smaller scale is its remedy."""
    scaler = getattr(trainer, "loss_scale", None)
    overflow = scaler is not None and not finite and loss_finite and scaler.scale >= 1
    if scaler is not None and loss_finite:   # a NaN/inf loss came before the scale: a smaller one is no remedy
        scaler.update(finite)
    if finite:
        trainer.optimizer.step()
        trainer._nonfinite_streak = 0
        return
    trainer.optimizer.zero_grad(set_to_none=True)
    # the schedule advances over a skipped step on purpose; torch's scheduler would warn (a private flag,
    # set by a real step) that it "skips the first value" when the first step is skipped, as an fp16
    # run's often is while its loss scale settles
    trainer.optimizer._opt_called = True
    trainer.nonfinite_skipped += 1
    if overflow:
        return
    trainer._nonfinite_streak += 1
    limit = trainer.cfg.max_nonfinite_steps
    if trainer._nonfinite_streak >= limit:
        raise NonFiniteLoss(f"{trainer._nonfinite_streak} optimizer steps in a row had a NaN/inf loss or "
                            f"gradient; stopping (max_nonfinite_steps={limit})")


def make_scheduler(opt, kind: str, total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def warmup_steps_of(cfg, total_steps: int) -> int:
    return cfg.warmup_steps or int(math.ceil(cfg.warmup_ratio * total_steps))


@dataclass
class PackedBatch:
    """Prompt+completion sequences packed into one row, and where their completion tokens sit.

    input_ids [T], cu_seqlens and prefix_of feed the model (`model(input_ids, cu_seqlens=...,
    prefix_of=...)`); `select` [N] picks the hidden states that predict the completion tokens
    `targets` [N], whose own boundaries are `completion_cu` [S+1] (one entry per completion).
    """

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    select: torch.Tensor
    targets: torch.Tensor
    completion_cu: torch.Tensor
    prefix_of: list[int] | None = None

    def hidden(self, model) -> torch.Tensor:
        """The model's final hidden states for this batch."""
        return model(self.input_ids, cu_seqlens=self.cu_seqlens, prefix_of=self.prefix_of)


def prompt_sharing_pays(model, wanted: bool) -> bool:
    """`wanted`, unless the model's GPU attention has no fast path for shared prompts (said once)."""
    if not wanted:
        return False
    from r1fast.models.attention import prefix_attention_keeps_pace

    c = model.config
    if prefix_attention_keeps_pace(model.device, model.dtype, c.num_attention_heads, c.num_key_value_heads,
                                   c.head_dim):
        return True
    logging.getLogger(__name__).warning(
        "share_prompts is off: torch's varlen attention here serves plain packed batches but not shared "
        "prompts, which would take one attention call per sequence")
    return False


def pack(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], device,
         share_prompts: bool = False) -> PackedBatch:
    """share_prompts: consecutive completions of one prompt (a GRPO group) follow a single copy of it,
    as sequences that continue it (`prefix_of`): the prompt's tokens go through the model once, not
    once per completion. The numbers are those of the unshared layout."""
    ids, cu, sel, tgt, ccu, prefix_of = [], [0], [], [], [0], []
    offset = 0
    last_prompt, prompt_seq, prompt_end = None, -1, 0  # the prompt shared by the current run of completions
    for p, c in zip(prompts, completions):
        if len(p) == 0 or len(c) == 0:
            raise ValueError("pack: every prompt and completion needs at least one token")
        if share_prompts:
            p = list(p)
            if p != last_prompt:  # a new group: its prompt once, as a sequence of its own
                ids.extend(p)
                offset += len(p)
                cu.append(offset)
                prefix_of.append(-1)
                last_prompt, prompt_seq, prompt_end = p, len(prefix_of) - 1, offset
            prefix_of.append(prompt_seq)
            # the prompt's last hidden state predicts the first token, the completion's own the rest
            sel.append(prompt_end - 1)
            sel.extend(range(offset, offset + len(c) - 1))
            ids.extend(c)
            offset += len(c)
        else:
            seq = list(p) + list(c)
            ids.extend(seq)
            # hidden state at position t predicts token t+1: the completion is predicted from p-1 .. p+c-2
            sel.extend(range(offset + len(p) - 1, offset + len(seq) - 1))
            offset += len(seq)
        tgt.extend(c)
        cu.append(offset)
        ccu.append(ccu[-1] + len(c))
    return PackedBatch(host_tensor(ids, torch.long, device), host_tensor(cu, torch.int32, device),
                       host_tensor(sel, torch.long, device), host_tensor(tgt, torch.long, device),
                       host_tensor(ccu, torch.int32, device), prefix_of if share_prompts else None)


_NUMPY_OF = {torch.long: np.int64, torch.int32: np.int32, torch.float32: np.float32}


def host_tensor(values: Sequence, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.tensor(values, dtype=dtype, device=device) for a list of Python numbers, through numpy: the same
    values, ~5x faster (torch.tensor on a list of 16k ints took ~2 ms, ~100 ms of host time per GRPO step
    of 64 x 8 completions of 512 tokens)."""
    return torch.from_numpy(np.array(values, dtype=_NUMPY_OF[dtype])).to(device)


def gradient_holders(optimizer, model) -> list:
    """The tensors whose gradients the optimizer's next step applies (what clipping must see): the
    fp32 copies when MasterWeightAdamW accumulates in fp32, else the model's parameters."""
    holders = getattr(optimizer, "grad_tensors", None)
    return holders() if holders is not None else list(model.parameters())


def resume_check(cursor: "DataCursor", counters: dict[str, Optional[int]], others_keys: Optional[dict[str, str]] = None):
    """check= for checkpoints.load_checkpoint: each counter (name -> its value when absent; None: required)
    a whole number >= 0, and the data position one of `cursor`'s dataset. `others_keys` (key -> the trainer
    whose checkpoints alone record it) refuses another trainer's checkpoint, as a missing required counter does."""
    def check(state):
        for k, default in counters.items():
            if k not in state and default is None:
                # an SFT checkpoint given to a GRPO run's --resume said "rollout_index is None, not a whole number"
                raise another_trainers_checkpoint(f"no {k!r}, which this trainer's checkpoints record", "an SFT")
            v = state.get(k, default)
            if type(v) is not int or v < 0:
                raise ValueError(f"{k} is {v!r:.80}, not a whole number >= 0")
        for k, trainer in (others_keys or {}).items():
            if k in state:
                # a GRPO checkpoint given to SFT's --resume was taken, and its progress showed "2/1 steps (200%)"
                raise another_trainers_checkpoint(f"{k!r}, which {trainer} checkpoints record and this trainer's "
                                                  f"do not", f"a {trainer}")
        cursor.check_state(state.get("data"))
    return check


def another_trainers_checkpoint(evidence: str, trainer: str) -> ValueError:
    """The error of a --resume given another trainer's checkpoint, and what to do instead: its weights start a new
    run. `trainer`: the guess at whose it is ("an SFT")."""
    return ValueError(f"{evidence}: the checkpoint is another trainer's ({trainer} checkpoint given to this run's "
                      f"--resume?); to train on from its weights, start a new run with "
                      f"model_name_or_path=<the checkpoint folder> instead of --resume")


def accumulating_gradients(optimizer):
    """The block holding a step's backward passes: gradients summed in fp32 where the optimizer does that."""
    block = getattr(optimizer, "accumulating", None)
    return block() if block is not None else contextlib.nullcontext()


def grad_norm_and_clip(params, max_norm: float) -> float:
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if max_norm and max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params]))
    return float(norm)


def check_prompt_room(prompt_ids: Sequence[Sequence[int]], positions: int, where: str):
    """Every prompt leaves the model's `positions` room for at least one new token: a clear error
    naming the row, instead of the engine's refusal in the middle of a run."""
    for i, ids in enumerate(prompt_ids):
        if len(ids) >= positions:
            raise ValueError(f"{where}: the prompt of row {i} has {len(ids)} tokens and the model {positions} positions "
                             f"(max_position_embeddings, or a smaller sliding_window): no room for a completion; "
                             f"shorten or drop it")


# the arguments r1fast passes reward functions itself besides completion_ids (a dataset's own is dropped, as in TRL)
REWARD_KEYWORDS = ("prompts", "completions")


def check_reward_keywords(rows: Sequence[dict], prompt_column: str, where: str):
    """A dataset column named as one of r1fast's own reward arguments would reach every reward function
    twice, a TypeError blamed on the function after the first rollout: name the column now."""
    clash = [k for k in rows[0] if k in REWARD_KEYWORDS and k != prompt_column]
    if clash:
        raise ValueError(f"the {where} has a column {clash[0]!r}, the name of the argument r1fast passes reward "
                         f"functions itself (prompts, completions, completion_ids): rename or drop the column")


def reward_columns(rows: Sequence[dict], owners: Sequence[int], prompt_column: str,
                   answer_column: str = "answer") -> dict[str, list]:
    """The dataset's columns, one entry per completion (`owners[j]` is completion j's row), as the
    reward functions' keyword arguments. `answer_column` is also passed as `answer`, the column
    the accuracy reward reads, so a dataset whose reference sits under another name is scored."""
    # as TRL: the prompt and any completion columns are the trainer's own arguments, not the dataset's
    cols = {k: [rows[i].get(k) for i in owners] for k in rows[0]
            if k not in (prompt_column, "completion", "completion_ids")}
    if answer_column != "answer" and answer_column in cols:
        cols["answer"] = cols[answer_column]
    return cols


def assistant_turn(prompt, text: str) -> str:
    """The assistant's message a completion finishes: for a prompt ending on the assistant's own message (a
    prefill, "<think>", which the completion continues) that message's text, then the completion's."""
    from r1fast.data.loading import continues_answer

    return prompt[-1]["content"] + text if continues_answer(prompt) else text


def reward_completions(prompts: Sequence, texts: Sequence[str]) -> list:
    """Completions as TRL hands them to reward functions: for a conversational prompt (a list of
    messages) the assistant message list [{"role": "assistant", "content": text}], else the text. A
    prefilled answer's message holds its prefill too, as TRL's GRPO did while it continued prefills: a
    "<think>" prefill is part of the turn the format reward checks."""
    return [[{"role": "assistant", "content": assistant_turn(p, t)}] if isinstance(p, list) else t
            for p, t in zip(prompts, texts)]


def gold_column(rows: Sequence[dict], answer_column: str) -> str:
    """The column holding the reference answers: `answer_column`, else a `solution` column (MATH's worked
    solutions), as the accuracy reward reads a row (check_answer_column refuses a training set that lacks a
    column named on purpose)."""
    return answer_column if answer_column in rows[0] or "solution" not in rows[0] else "solution"


def check_answer_column(reward_names: Sequence[str], rows: Sequence[dict], answer_column: str, where: str):
    """The accuracy reward needs a reference answer: say so before the first rollout, not after it. A dataset's
    own `answer` column, which reward_columns replaces by answer_column's, is said to be lost."""
    if answer_column != "answer" and "answer" in rows[0] and answer_column in rows[0]:
        # a reward function reading `answer` (one written for TRL, which passes every column as it is) would get
        # answer_column's values without a word
        warnings.warn(f"the {where} has an 'answer' column, and answer_column is {answer_column!r}: the reward "
                      f"functions get {answer_column!r}'s values as `answer` (as the accuracy reward reads them), so "
                      f"the dataset's own 'answer' column reaches them under no name; rename it to keep it",
                      stacklevel=3)
    check_answer_present(reward_names, rows, answer_column, where)


def check_answer_present(reward_names: Sequence[str], rows: Sequence[dict], answer_column: str, where: str):
    """check_answer_column's error alone: `r1fast sample` says it once the data is read, before the model loads."""
    # a column named on purpose that the data lacks is a misspelling, not a MATH set: it was silently scored against
    # `solution` (held-out sets, another dataset, keep that fallback)
    named = answer_column != "answer"
    if "accuracy" in reward_names and (gold_column(rows, answer_column) if not named else answer_column) not in rows[0]:
        either = "" if named else " or 'solution'"
        raise ValueError(f"reward 'accuracy' needs the answer column {answer_column!r} (option 'answer_column')"
                         f"{either}; the {where} has {sorted(rows[0])}")


class DataCursor:
    """A deterministic walk over a dataset in seeded per-epoch permutations; its position is two ints."""

    def __init__(self, n: int, seed: int, epoch: int = 0, index: int = 0):
        if n <= 0:
            raise ValueError("the training dataset is empty")
        self.n, self.seed, self.epoch, self.index = n, seed, epoch, index
        self._perm_epoch = None
        self._perm: list[int] = []

    def _perm_for(self, epoch: int) -> list[int]:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perm = torch.randperm(self.n, generator=g).tolist()
            self._perm_epoch = epoch
        return self._perm

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            perm = self._perm_for(self.epoch)
            out.append(perm[self.index])
            self.index += 1
            if self.index == self.n:
                self.epoch, self.index = self.epoch + 1, 0
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    @property
    def epochs_done(self) -> float:
        """Passes over the dataset so far, fractional: what TRL logs as `epoch`."""
        return self.epoch + self.index / self.n

    def check_state(self, state) -> tuple[int, int]:
        """(epoch, index) of a saved state(), or a ValueError when it is no position in this dataset (a
        damaged checkpoint, or one of a run over another dataset)."""
        ok = isinstance(state, dict) and all(type(state.get(k)) is int for k in ("epoch", "index"))
        if not ok or state["epoch"] < 0 or not 0 <= state["index"] < self.n:
            raise ValueError(f"data is {state!r:.80}, not a position in the training dataset's {self.n} rows "
                             f"(epoch >= 0, index 0..{self.n - 1})")
        return state["epoch"], state["index"]

    def load_state(self, state):
        self.epoch, self.index = self.check_state(state)


_SCHEDULE_SHAPE = ("max_steps", "num_train_epochs", "lr_scheduler_type", "warmup_steps", "warmup_ratio")


def schedule_change_note(state, new_config: dict, step: int) -> str | None:
    """What a resume with other schedule settings than the checkpoint's does, or None when unchanged:
    the schedule's shape is recomputed from the new values, while the base learning rate stays the
    checkpoint's (the scheduler's state holds it)."""
    old = (state or {}).get("config") or {}
    shape = [f"{k} {old[k]!r} -> {new_config[k]!r}" for k in _SCHEDULE_SHAPE
             if k in old and k in new_config and old[k] != new_config[k]]
    notes = []
    if shape:
        notes.append(f"{', '.join(shape)}: the learning-rate schedule follows the new values from this step on")
    if "learning_rate" in old and old["learning_rate"] != new_config.get("learning_rate", old["learning_rate"]):
        notes.append(f"learning_rate {new_config['learning_rate']!r} is not applied: a resumed run keeps the "
                     f"checkpoint's {old['learning_rate']!r} (start a new run to change it)")
    # "with" leads the schedule's changes only: alone, the learning-rate note read "resuming at step 3 with
    # learning_rate 0.0001 is not applied"
    return f"r1fast: resuming at step {step}{' with ' if shape else ': '}" + "; ".join(notes) if notes else None


# where a run writes and how it shows progress, not how it trains: a copied run folder resumes without a note
_NOT_TRAINING = {"output_dir", "run_name", "overwrite_output_dir", "progress_bar"}


def changed_values(recorded: dict, now: dict) -> list[str]:
    """"key old -> new" for each key of `now` that `recorded` holds with another value (a key it lacks was
    not recorded by an earlier r1fast: nothing to compare)."""
    return [f"{k} {recorded[k]!r} -> {v!r}" for k, v in now.items() if k in recorded and recorded[k] != v]


def rows_fingerprint(rows: Sequence[dict]) -> str:
    """A short sha256 of the training rows, recorded in a checkpoint: rows passed in Python (a list, a
    datasets.Dataset) record no dataset path, and an edited file keeps its path, so only this tells a
    resume that its data changed (hashing 100k small rows takes well under a second)."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(_row_text(row).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


# the part of a default repr that is the object's address: another in every process
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _row_text(row) -> str:
    try:
        return json.dumps(row, sort_keys=True, default=_json_form)
    except TypeError:   # dict keys JSON cannot sort or hold (1 and "a" together, a tuple)
        return json.dumps(_text_keys(row), sort_keys=True, default=_json_form)


def _json_form(value):
    """What rows_fingerprint hashes for a value JSON has no form of: the same in every process, and by value
    where one is at hand. str() alone was neither: an object's default str holds its address (a new
    fingerprint each run, so each resume said the rows had changed), a set's order follows the hash seed,
    and numpy prints a long array as '[0 1 2 ... 1997 1998 1999]' (arrays differing inside looked equal)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"sha256": hashlib.sha256(value).hexdigest()}
    if type(value).__module__.split(".")[0] in ("numpy", "torch") and callable(getattr(value, "tolist", None)):
        return value.tolist()   # numpy arrays and scalars (parquet columns), tensors: every number
    if isinstance(value, (set, frozenset)):
        return sorted(_row_text(v) for v in value)
    return _ADDRESS.sub("", str(value))   # a date, a Decimal, a path: as before


def _text_keys(value):
    """value with each dict key as its JSON text (the keys in sorted order can then be compared)."""
    if isinstance(value, dict):
        return {k if isinstance(k, str) else _row_text(k): _text_keys(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_text_keys(v) for v in value]
    return value


def option_change_note(state, new_config: dict, step: int, data_sha256: Optional[str] = None) -> str | None:
    """The options other than the schedule's (schedule_change_note) that differ from the checkpoint's, or
    None: a resume applies them (a new seed, beta, dataset...) without a word otherwise. `data_sha256`:
    the training rows' rows_fingerprint, compared with the checkpoint's (one written before r1fast
    recorded it has none: nothing to compare)."""
    old = (state or {}).get("config") or {}
    new_config = json.loads(json.dumps(new_config))   # as the checkpoint read it back: tuples are lists
    skip = _NOT_TRAINING | set(_SCHEDULE_SHAPE) | {"learning_rate"}
    was = (state or {}).get("data_sha256")
    if data_sha256 is not None and was == data_sha256:
        # the same rows from another path (a data folder moved or copied): "dataset a -> b; the steps from here
        # on use the new values" said the data changed when it had not
        skip |= {"dataset", "dataset_split"}
    changed = changed_values(old, {k: v for k, v in new_config.items() if k not in skip})
    if data_sha256 is not None and was is not None and was != data_sha256:
        changed.append(f"the training rows (sha256 {was} -> {data_sha256})")
    if not changed:
        return None
    return (f"r1fast: resuming at step {step} with options other than the checkpoint's: {', '.join(changed)}; the "
            f"steps from here on use the new values (the weights, optimizer state and data position are the "
            f"checkpoint's)")


def seed_global_generators(seed: int) -> None:
    """Python's `random`, numpy's and torch's global generators from the run's seed, as a fresh run starts (as
    transformers' set_seed does for TRL's trainers). r1fast's own draws take their seeds from the config, but a
    user's reward function or dataset code drawing from `random` or numpy gave other numbers in two runs of one
    seed, though a resume puts those generators back as the checkpoint saved them."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)   # every CUDA device's too


def start_run(trainer, resume):
    """Resume `trainer` from a checkpoint when asked, then open its metrics log and progress bar.

    Returns (logger, progress bar or None, the checkpoint resumed from or None)."""
    from r1fast.trainer import checkpoints as ckpt
    from r1fast.trainer.metrics import MetricsLogger

    cfg = trainer.cfg
    # this run owns the folder (own_run_folder): nothing else will remove what killed saves left, a run
    # killed in its first save included (a model-sized temp folder kept until an overwrite), and a replaced
    # checkpoint put back is one to resume from, or for a new run an earlier run's
    ckpt.remove_save_leftovers(trainer.run_dir)
    no_checkpoint = resume and ckpt.resume_is_bare(resume) and ckpt.latest_checkpoint(trainer.run_dir) is None
    if no_checkpoint and trainer.global_step > 0:
        resume = None   # refused below: saying it starts from the first step would be wrong
    elif no_checkpoint:
        # a job that always passes --resume (restarted after a preemption) starts the same way when the first
        # launch was stopped before its first checkpoint, or had not run yet; as a pipeline's --resume does.
        # Said once start_fresh takes the folder: one it refuses (a killed save's checkpoint-N.old-<pid>) starts nothing
        resume = None
    if not resume and trainer.global_step > 0:
        # train() again after a failure (a reward function that raised, in a notebook) went on from the model and
        # optimizer in memory but deleted the steps' logged metrics, and skipped the failed step's prompts
        go_on = (f"call train(resume=True) to continue from its last checkpoint in {trainer.run_dir}, or "
                 if ckpt.latest_checkpoint(trainer.run_dir) else f"it wrote no checkpoint in {trainer.run_dir} to go on "
                 f"from; ")
        raise ValueError(f"this trainer already ran {trainer.global_step} of its {trainer.total_steps} steps: {go_on}"
                         f"build a new trainer to start over")
    if not resume:
        ckpt.start_fresh(trainer.run_dir, cfg.overwrite_output_dir)
        if no_checkpoint:
            print(f"r1fast: --resume: no checkpoint in {trainer.run_dir}; starting from the first step",
                  file=sys.stderr)
        # train() again after a failure within the first step (a reward function that raised at step 1): that step
        # had drawn its prompts, which the new start skipped, and counted its tokens; no optimizer step had run
        trainer.cursor = DataCursor(trainer.cursor.n, trainer.cursor.seed)
        trainer.num_tokens = 0
        seed_global_generators(cfg.seed)
    resume_path = ckpt.resolve_resume(resume, trainer.run_dir)
    if resume_path:
        ckpt.resume_into(trainer.run_dir, resume_path, cfg.overwrite_output_dir)
        state = trainer.load(resume_path)
        # said in the log, whatever the progress bar shows: which checkpoint a restarted job picked up
        print(f"r1fast: resuming {trainer.stage} from {resume_path} at step {trainer.global_step} of "
              f"{trainer.total_steps}", file=sys.stderr)
        # after the load: a checkpoint that fails to load must not have moved the ones after it aside
        resumed_name = os.path.basename(resume_path.rstrip(os.sep))   # 'checkpoint-3/' has an empty basename
        set_aside, back = ckpt.leave_branch(trainer.run_dir, resume_path)
        for path in set_aside:
            print(f"r1fast: resuming from {resumed_name}: the later {path} is set aside", file=sys.stderr)
        if back is not None:
            print(f"r1fast: {resume_path} is {back} again: the run goes on from it", file=sys.stderr)
            resume_path = back
        note = schedule_change_note(state, cfg.to_json_dict(), trainer.global_step)
        if note:
            print(note, file=sys.stderr)
            # the optimizer's restored rate is the old schedule's: the next step takes the new one's
            sched = trainer.scheduler
            lrs = [base * factor(sched.last_epoch) for base, factor in zip(sched.base_lrs, sched.lr_lambdas)]
            for group, lr in zip(trainer.optimizer.param_groups, lrs):
                group["lr"] = lr
            sched._last_lr = lrs
        note = option_change_note(state, cfg.to_json_dict(), trainer.global_step, trainer.data_sha256)
        if note:
            print(note, file=sys.stderr)
    # The log holds global steps (a pipeline stage's start at step_offset included): truncate on that scale,
    # or a resumed later stage would drop every line it wrote before the interruption.
    resume_step = trainer.step_offset + trainer.global_step if resume_path else None
    logger = MetricsLogger(trainer.run_dir, cfg.report_to, resume_step=resume_step, resumed_from=resume_path,
                           run_name=cfg.run_name, config=cfg.to_json_dict())   # a reward function object by its name
    pbar = None
    if cfg.progress_bar:
        from r1fast.progress import progress

        pbar = progress(trainer.total_steps, trainer.stage, initial=trainer.global_step, unit="steps")
    return logger, pbar, resume_path


def say_what_is_kept(trainer):
    """An abort mid-step (a second Ctrl-C or SIGTERM, which skips the checkpoint the first one writes): which
    checkpoint --resume continues from, and which steps are done again. The CLI's note gave the command alone."""
    from r1fast.trainer import checkpoints as ckpt

    done, latest = trainer.global_step, ckpt.latest_checkpoint(trainer.run_dir)
    if latest is None:
        kept = "no checkpoint was written yet: the run starts again from its first step"
    else:
        saved = int(os.path.basename(latest).split("-")[-1])
        again = f"step {done}" if done == saved + 1 else f"steps {saved + 1}-{done}"
        kept = f"--resume continues from {latest} (step {saved})" + (f"; {again} trained again" if done > saved else "")
    print(f"\nr1fast: aborted with {done} of {trainer.total_steps} {trainer.stage} steps done; {kept}",
          file=sys.stderr, flush=True)
