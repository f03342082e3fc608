"""r1fast as the loss backend of TRL's GRPOTrainer: change one import, keep the training numbers.

    from r1fast.integrations.trl import GRPOTrainer      # instead of: from trl import GRPOTrainer

The subclass keeps everything TRL does (generation, rewards, advantages, logging, checkpoints) and
replaces the two places where TRL turns hidden states into log-probabilities:

- `_get_per_token_logps_and_entropies` (old-policy and reference log-probs, computed once per
  generation batch) runs the backbone, then `ops.grouped_logprob` on the final hidden states and
  the lm_head weight;
- `_compute_loss` runs the backbone, then `ops.fused_linear_grpo_loss`, which computes the
  policy log-probs, the GRPO objective and its aggregation in one pass.

Neither materialises the [tokens, vocab] logits. Any option whose numbers r1fast does not
reproduce exactly is refused in `__init__` with a ValueError naming it (see `unsupported_options`).
With vLLM and `vllm_importance_sampling_correction` (TRL's default), TRL's own
`importance_sampling_ratio` (whatever its mode, clip_min/clip_max) goes into the fused loss as
`importance_weights`, multiplying the policy term where TRL does. TRL's high-entropy token mask
(`top_entropy_quantile < 1`) and off-policy sequence mask (`off_policy_mask_threshold`) are built by
TRL's own helpers from a forward-only `grouped_logprob` pre-pass (current log-probs and entropies,
no logits kept) and join that same factor.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
import types
from typing import Any

import torch
from torch import nn

try:
    import trl
    from trl import GRPOConfig
    from trl.trainer.utils import nanmax, nanmin
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError(
        "r1fast.integrations.trl needs TRL: pip install 'trl>=1.16' (it subclasses trl.GRPOTrainer)"
    ) from exc

from r1fast import backends, ops

__all__ = ["GRPOTrainer", "GRPOConfig", "SUPPORTED_LOSS_TYPES", "unsupported_options"]

# Loss types whose per-token objective and aggregation LOSS_SPEC defines identically to TRL's.
SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")

# Loss types whose loss TRL divides by the gradient-accumulation steps afterwards; the others
# (dapo, cispo) fold accumulation into their token normaliser `num_items`.
_MEAN_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")

# accelerate's mixed-precision modes and the dtype their autocast runs matmuls in.
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Marker set on a model whose forward accepts `r1fast_hidden_states=True`.
_PATCHED = "_r1fast_hidden_states_forward"


# Every option TRL 1.16's GRPOConfig declares (beyond transformers' TrainingArguments). Each one is implemented by
# the drop-in, refused by `unsupported_options`, or TRL's own business the drop-in leaves alone (generation, rewards,
# advantages, logging). An option a later TRL adds is none of these yet: set away from its default, it is refused
# by name rather than silently ignored (its effect could sit in the `_compute_loss` the drop-in replaces).
_REVIEWED_TRL_OPTIONS = frozenset("""
    model_init_kwargs trust_remote_code router_aux_loss_coef disable_dropout cast_lm_head_to_fp32
    num_generations num_generations_eval max_completion_length ds3_gather_for_generation shuffle_dataset
    pad_to_multiple_of generation_batch_size steps_per_generation temperature top_p top_k min_p
    generation_kwargs chat_template_kwargs repetition_penalty cache_implementation use_vllm vllm_mode
    vllm_model_impl vllm_enable_sleep_mode vllm_structured_outputs_regex vllm_server_base_url vllm_server_host
    vllm_server_port vllm_server_timeout vllm_group_port vllm_gpu_memory_utilization vllm_max_model_length
    vllm_tensor_parallel_size beta num_iterations epsilon delta epsilon_high sapo_temperature_neg
    sapo_temperature_pos vespo_k_pos vespo_lambda_pos vespo_k_neg vespo_lambda_neg importance_sampling_level
    reward_weights multi_objective_aggregation scale_rewards loss_type mask_truncated_completions sync_ref_model
    ref_model_mixup_alpha ref_model_sync_steps top_entropy_quantile entropy_coef use_adaptive_entropy
    entropy_coef_min entropy_coef_max entropy_coef_delta entropy_target max_tool_calling_iterations
    vllm_importance_sampling_correction vllm_importance_sampling_mode vllm_importance_sampling_clip_max
    vllm_importance_sampling_clip_min off_policy_mask_threshold use_bias_correction_kl log_completions
    log_multimodal num_completions_to_print log_unique_prompts log_completions_hub_repo
    use_transformers_continuous_batching transformers_continuous_batching_config use_transformers_paged
    vllm_importance_sampling_cap
""".split())


def _own_dataclass_fields(cls) -> list[str]:
    """The fields a dataclass declares itself (a field it redeclares too), in order; [] for any other class.
    Read from the dataclass's own Field objects, not its annotations: Python 3.14 evaluates annotations when they
    are read, so a user's config field annotated with a name only imported under TYPE_CHECKING raised NameError."""
    own = cls.__dict__.get("__dataclass_fields__")
    if not own:
        return []
    inherited = [base.__dict__.get("__dataclass_fields__") or {} for base in cls.__mro__[1:]]
    return [name for name, field in own.items() if not any(fields.get(name) is field for fields in inherited)]


def _unreviewed_trl_options(args: Any) -> list[str]:
    """The options a TRL config class declares that are not in _REVIEWED_TRL_OPTIONS and differ from their default.
    Fields a user's own GRPOConfig subclass adds (script arguments) are not TRL's and are left alone."""
    declared = _own_dataclass_fields

    trl_classes = [cls for cls in type(args).__mro__ if cls.__module__.startswith("trl.")]
    # TRL's classes redeclare TrainingArguments fields with other defaults (learning_rate, bf16, ...): those are not
    # TRL options
    not_trl = {name for cls in type(args).__mro__ if cls not in trl_classes for name in declared(cls)}
    unreviewed = []
    for cls in trl_classes:
        for name in declared(cls):
            field = cls.__dataclass_fields__.get(name)
            if name in _REVIEWED_TRL_OPTIONS or name in not_trl or field is None or name in unreviewed:
                continue
            if field.default is not dataclasses.MISSING:
                default = field.default
            elif field.default_factory is not dataclasses.MISSING:
                default = field.default_factory()
            else:
                default = dataclasses.MISSING
            if getattr(args, name, default) != default:
                unreviewed.append(name)
    return unreviewed


def unsupported_options(args: Any) -> list[str]:
    """Every GRPOConfig setting in `args` the r1fast loss path would not reproduce, each with why.

    Empty when r1fast can take over the loss exactly. Used by GRPOTrainer.__init__; exposed so a
    caller can check a config before building a trainer.
    """
    problems = []

    def refuse(option, why):
        problems.append(f"{option}={getattr(args, option, None)!r}: {why}")

    for option in _unreviewed_trl_options(args):
        refuse(option, f"an option of TRL {trl.__version__} that r1fast's drop-in (written for TRL 1.16) does not "
                       "know; use trl.GRPOTrainer, or check the drop-in against this TRL release")
    if args.loss_type not in SUPPORTED_LOSS_TYPES:
        refuse("loss_type", f"r1fast implements {SUPPORTED_LOSS_TYPES}; use trl.GRPOTrainer for the others")
    if args.importance_sampling_level not in ("token", "sequence"):
        refuse("importance_sampling_level", "r1fast implements 'token' and 'sequence'")
    if getattr(args, "use_liger_kernel", False):
        refuse("use_liger_kernel", "Liger's kernels and r1fast's would both patch the model; pick one")
    if getattr(args, "entropy_coef", 0.0) != 0.0:
        refuse("entropy_coef", "TRL's entropy bonus (a token mean outside the loss normaliser) is not implemented")
    if getattr(args, "use_adaptive_entropy", False):
        refuse("use_adaptive_entropy", "adaptive entropy control is not implemented by r1fast's fused loss")
    if args.loss_type == "dr_grpo" and not args.max_completion_length:
        refuse("max_completion_length", "loss_type='dr_grpo' normalises by it, so it must be set")
    elif args.loss_type in SUPPORTED_LOSS_TYPES and args.importance_sampling_level in ("token", "sequence"):
        # The fused loss validates its options only when _compute_loss builds them, i.e. after the
        # model is loaded and the first batch generated; values TRL accepts but LossOptions refuses
        # (epsilon >= 1, delta <= 1, ...) must fail here instead.
        try:
            ops.LossOptions(**_config_loss_options(args))
        except ValueError as e:
            problems.append(f"{e} (r1fast's fused GRPO loss does not take this value)")
    return problems


def _config_loss_options(args: Any) -> dict:
    """The LossOptions fields that come straight from the GRPOConfig (TRL's own mapping, e.g.
    epsilon_high defaulting to epsilon); `_compute_loss` adds the per-batch `num_items`."""
    return dict(
        beta=args.beta,
        epsilon=args.epsilon,
        epsilon_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon,
        delta=_delta_for(args.loss_type, args.delta),
        loss_type=args.loss_type,
        importance_sampling_level=args.importance_sampling_level,
        max_completion_length=args.max_completion_length,
        temperature=args.temperature,
        use_bias_correction_kl=args.use_bias_correction_kl,
    )


def _delta_for(loss_type: str, delta: float | None) -> float | None:
    """TRL's two-sided clip `delta`, which its cispo ignores (cispo caps the detached ratio at epsilon_high only):
    a delta LossOptions would refuse (<= 1) is then no reason to refuse the config."""
    return None if loss_type == "cispo" else delta


def _backbone(model: nn.Module) -> nn.Module:
    """The decoder stack under a causal-LM head: it returns the final (normed) hidden states."""
    prefix = getattr(model, "base_model_prefix", None)
    backbone = getattr(model, prefix, None) if prefix else None
    if backbone is None or backbone is model:
        get_decoder = getattr(model, "get_decoder", None)
        backbone = get_decoder() if callable(get_decoder) else None
    if backbone is None or backbone is model:
        raise ValueError(
            f"r1fast's TRL integration needs a causal LM with a backbone attribute (base_model_prefix) "
            f"and an lm_head; {type(model).__name__} has none"
        )
    return backbone


def install_hidden_states_forward(model: nn.Module) -> None:
    """Let `model(..., r1fast_hidden_states=True)` return (the backbone's last hidden state [B, L, H],
    the lm_head weight).

    Going through the model's own forward (rather than calling the backbone directly) keeps
    wrappers that hook the forward call (DDP, accelerate's autocast/device hooks) in the path.
    The weight comes out of the forward too, as a view: DDP with find_unused_parameters (the
    Trainer's default without gradient checkpointing) marks every parameter its forward's outputs
    do not reach as unused, ready at once, and then fails with "marked as ready twice" when the
    loss's gradient reaches the lm_head weight taken from outside the forward.
    Without the flag the forward is the previous one, so generation and TRL's calls are unchanged.
    """
    if getattr(model, _PATCHED, False):
        return
    previous_forward = model.forward
    # The model's own method is called on `self`, not on `model`: a deep copy of the model (an
    # evaluation copy, an EMA) then runs with its own weights, not the original's.
    own_method = getattr(previous_forward, "__self__", None) is model
    previous_function = previous_forward.__func__ if own_method else None

    # Keep the original signature: `generate` validates its model kwargs against it.
    @functools.wraps(type(model).forward)
    def forward(self, *args, r1fast_hidden_states: bool = False, **kwargs):
        if not r1fast_hidden_states:
            if own_method:
                return previous_function(self, *args, **kwargs)
            return previous_forward(*args, **kwargs)  # a wrapper set on the instance (accelerate hooks)
        kwargs["use_cache"] = False
        weight = self.get_output_embeddings().weight
        return _backbone(self)(*args, **kwargs).last_hidden_state, weight.view_as(weight)

    model.forward = types.MethodType(forward, model)
    setattr(model, _PATCHED, True)


def _check_model(model: nn.Module, what: str) -> None:
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"r1fast's TRL integration needs a transformers model as {what}, got {type(model).__name__}")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text_config is not config:
        raise ValueError(
            f"r1fast's TRL integration supports text-only causal LMs; {what} ({type(model).__name__}) is a "
            "vision-language model: use trl.GRPOTrainer"
        )
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        value = getattr(text_config, name, None)
        if value is not None and value != 1.0:
            raise ValueError(
                f"{what}'s config sets {name}={value!r}: r1fast's fused log-prob computes hidden @ lm_head.T / "
                "temperature only; use trl.GRPOTrainer for this model"
            )
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"{what}'s output embedding must be a plain nn.Linear for r1fast's fused head, got {type(head).__name__}"
        )
    if head.bias is not None:
        raise ValueError(f"{what}'s lm_head has a bias, which r1fast's fused log-prob does not add")
    _backbone(model)


# transformers' generate applies these from the model's generation_config (TRL sets none of them);
# the engine's sampler has no such logits processors (nor max_time's stopping criterion; a decoder-only
# model's encoder_repetition_penalty penalises the prompt's tokens). Each with the values that do nothing (older
# transformers wrote them out explicitly, transformers 5 leaves them None).
_HF_GENERATION_EXTRAS = {
    "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None, []),
    "suppress_tokens": (None, []), "begin_suppress_tokens": (None, []), "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,), "sequence_bias": (None, {}), "min_length": (None, 0),
    "min_new_tokens": (None, 0), "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0),
    "exponential_decay_length_penalty": (None,), "num_beams": (None, 1), "diversity_penalty": (None, 0.0),
    "penalty_alpha": (None, 0.0), "top_h": (None,), "guidance_scale": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0), "watermarking_config": (None,), "max_time": (None,),
    # DoLa decoding contrasts early layers' logits; stop strings and token healing need the tokenizer, which TRL does
    # not pass to generate (stock TRL fails on them); more return sequences than prompts break TRL's batch
    "dola_layers": (None,), "stop_strings": (None, []), "token_healing": (None, False),
    "num_return_sequences": (None, 1),
    # constrained beam search forces words into the output
    "constraints": (None, []), "force_words_ids": (None, []),
    # these turn on assisted (speculative) decoding, which generate runs for one sequence at a time: stock TRL fails
    # on a generation batch, and the engine, which has no draft, would sample plainly without saying so
    "prompt_lookup_num_tokens": (None,), "assistant_early_exit": (None,), "use_mtp": (None, False)}

# Why the fields above are refused, where "the engine's sampler does not apply it" does not say it.
_HF_GENERATION_EXTRA_REASONS = dict.fromkeys(
    ("prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp"),
    "assisted (speculative) decoding, which transformers' generate runs for one sequence at a time (stock TRL "
    "fails on it); the engine has no draft model")

# The other fields of transformers' GenerationConfig, reviewed: the engine follows the first line (or refuses their
# values by name, see _generation_config_problems); the rest do not change what a decoder-only model under TRL's
# generate call samples: the prompt is given (bos), max_new_tokens is always set (it wins over max_length), beam-search
# options with num_beams refused above, caching and compilation, what generate returns besides the tokens, a
# renormalisation that sampling ignores, an inf/nan filter that leaves a model's finite logits alone, and the knobs of
# an assisted decoding that stays off (its triggers are refused above; an assistant model is never passed by TRL).
_HF_GENERATION_REVIEWED = frozenset("""
    do_sample temperature top_p top_k min_p max_new_tokens eos_token_id pad_token_id repetition_penalty
    bos_token_id decoder_start_token_id max_length length_penalty early_stopping num_beam_groups low_memory
    use_cache cache_implementation cache_config max_cache_len compile_config disable_compile prefill_chunk_size
    continuous_batching_config output_attentions output_hidden_states output_scores output_logits
    return_dict_in_generate renormalize_logits remove_invalid_values transformers_version is_assistant
    num_assistant_tokens num_assistant_tokens_schedule assistant_confidence_threshold assistant_lookbehind
    target_lookbehind max_matching_ngram_size assistant_ensemble_weight speculation_type
""".split())


@functools.cache
def _generation_config_defaults() -> dict:
    """The fields transformers' GenerationConfig declares (this release's), with their defaults."""
    from transformers import GenerationConfig

    return {name: value for name, value in vars(GenerationConfig()).items() if not name.startswith("_")}


def _token_id(value, field: str) -> int:
    """A token id as transformers' generate takes it: a Python or numpy integer (a 0-d integer array or tensor too),
    as an int. A bool or a float is refused by name: int() would make True token 1 and 3.7 token 3 without a word."""
    if hasattr(value, "tolist"):  # numpy scalars and 0-d arrays / tensors: their Python value
        value = value.tolist()
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    raise ValueError(f"{field} must be integer token ids, got {value!r} ({type(value).__name__})")


def _token_ids(value, field: str) -> list[int]:
    """A token-id field that takes one id or several (eos_token_id: an int, a list, a tuple or an array of them, or
    None) as a list of ints."""
    if value is None:
        return []
    if hasattr(value, "tolist"):  # an array or a tensor: a (nested) list, or the Python scalar of a 0-d one
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_token_id(token, field) for token in value]
    return [_token_id(value, field)]


def _normalise_model_eos(model) -> None:
    """Make the model's generation_config.eos_token_id plain ints before TRL's __init__ reads it: TRL takes a scalar
    that is not a Python int (np.int64 from a config built with numpy) for a list and fails with a TypeError inside,
    and keeps floats and bools as token ids. The ids are unchanged, so generate stops where it did."""
    config = getattr(model, "generation_config", None) if isinstance(model, nn.Module) else None
    value = getattr(config, "eos_token_id", None)
    if value is None:
        return
    if hasattr(value, "tolist"):  # an array or a tensor: read once, as _token_ids would
        value = value.tolist()
    ids = _token_ids(value, "the model's generation_config.eos_token_id")
    config.eos_token_id = ids if isinstance(value, (list, tuple)) else ids[0]


def _generation_extra_problem(where: str, name: str, value) -> str:
    why = _HF_GENERATION_EXTRA_REASONS.get(name)
    return f"{where}.{name}={value!r}: the engine's sampler does not apply it" + (f" ({why})" if why else "")


def _unreviewed_generation_problems(where: str, option) -> list[str]:
    """A field of this transformers' GenerationConfig that the drop-in (written for transformers 5.24) has not
    reviewed, set away from its default: refused by name, since it may change what generate samples."""
    return [f"{where}.{name}={option(name)!r}: a generation option the engine does not know; transformers' "
            "generate may apply it" for name, default in _generation_config_defaults().items()
            if name not in _HF_GENERATION_REVIEWED and name not in _HF_GENERATION_EXTRAS and option(name) != default]


# transformers' generate fills an option TRL's generation_config leaves None from the model's generation_config, else
# from these global defaults (GenerationConfig._get_default_generation_params): top_k=None samples from the top 50,
# do_sample=None decodes greedily; max_new_tokens=None would fall back to max_length, which the engine refuses.
_HF_GENERATION_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None, "do_sample": False,
                           "repetition_penalty": 1.0, "max_new_tokens": None}


PROMPT_TOKENS_PER_SEAT = 1024  # prompt tokens the rollout engine's KV pool is sized for, per seat


def generation_problems(args: Any, model: nn.Module | None = None) -> list[str]:
    """The GRPOConfig settings (and the model's generation_config fields) r1fast's rollout engine
    (r1fast_generation=True) cannot honour."""
    problems = []
    if getattr(args, "max_completion_length", 1) is None:
        problems.append("max_completion_length=None: the engine needs a completion length limit")
    gen = getattr(model, "generation_config", None)
    for name, no_ops in _HF_GENERATION_EXTRAS.items() if gen is not None else ():
        value = getattr(gen, name, None)
        if value not in no_ops:
            problems.append(_generation_extra_problem("the model's generation_config", name, value)
                            + "; transformers' generate would")
    if gen is not None:
        problems += _unreviewed_generation_problems("the model's generation_config",
                                                    lambda name: getattr(gen, name, None))
    for option, bad, why in (
        # refused before TRL's __init__ would import vLLM, whatever vllm_mode (TRL ignores it without use_vllm)
        ("use_vllm", bool(getattr(args, "use_vllm", False)),
         "r1fast_generation=True replaces vLLM's generation; pick one (r1fast_generation=False generates with vLLM "
         "and keeps r1fast's loss)"),
        ("use_transformers_continuous_batching", bool(getattr(args, "use_transformers_continuous_batching", False)),
         "r1fast_generation replaces transformers' generation; pick one"),
        ("repetition_penalty", getattr(args, "repetition_penalty", 1.0) != 1.0,
         "the engine's sampler has no repetition penalty"),
        ("generation_kwargs", bool(getattr(args, "generation_kwargs", None)),
         "extra generation options cannot be passed to the engine"),
    ):
        if bad:
            problems.append(f"{option}={getattr(args, option, None)!r}: {why}")
    return problems


def _check_backend_name(r1fast_backend) -> None:
    """A ValueError, before TRL loads the model, for an r1fast_backend that names no log-prob engine: the resolver's
    own error would speak of `backend=`, an argument this trainer does not have."""
    choices = [b for b in backends.BACKENDS if b in backends.implementations("grouped_logprob")]
    if r1fast_backend is not None and r1fast_backend not in choices:
        raise ValueError(f"r1fast_backend={r1fast_backend!r} is not one of the drop-in's backends: use "
                         f"{', '.join(map(repr, choices))}, or None for the fastest on the model's device "
                         f"(or R1FAST_BACKEND's)")


class GRPOTrainer(trl.GRPOTrainer):
    """TRL's GRPOTrainer with r1fast's fused log-prob and GRPO loss kernels.

    Takes TRL's arguments, plus `r1fast_backend` ("torch", "triton", "reference"; default: the
    fastest available for the model's device, or the R1FAST_BACKEND environment variable) and
    `r1fast_generation` (default False): True generates the completions with r1fast's rollout
    engine (paged KV cache, the samples of a prompt sharing its prefill, CUDA graphs) instead of
    transformers' `generate`, reading the model's weights (r1fast.integrations.hf_rollout) and, at every
    generation, `trainer.generation_config` as `generate` does; what the engine cannot follow is a ValueError
    (docs/trl.md).
    """

    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, *pos, r1fast_backend=None,
                 r1fast_generation: bool = False, r1fast_engine_kwargs: dict | None = None, **kw):
        # Refuse before TRL loads anything, so a wrong option costs nothing.
        if not isinstance(r1fast_generation, bool):  # a truthy string such as "no" would start the engine
            raise ValueError(f"r1fast_generation must be True or False, got {r1fast_generation!r}")
        if args is not None:
            self._refuse(unsupported_options(args) + (generation_problems(args) if r1fast_generation else []))
        if r1fast_generation and kw.get("rollout_func") is not None:
            raise ValueError("rollout_func replaces TRL's generation, so r1fast_generation=True would never run: "
                             "pass one of them")
        if r1fast_engine_kwargs is not None and (not r1fast_generation or not isinstance(r1fast_engine_kwargs, dict)):
            raise ValueError("r1fast_engine_kwargs (a dict of r1fast.rollout.Engine options) goes with "
                             f"r1fast_generation=True; got {r1fast_engine_kwargs!r}")
        self.r1fast_engine_kwargs = dict(r1fast_engine_kwargs or {})
        if kw.get("peft_config") is not None or _is_peft(model):
            raise ValueError(
                "peft_config / PEFT models are not supported by r1fast's TRL integration yet (the reference "
                "log-probs come from disabling the adapter): use trl.GRPOTrainer"
            )
        _check_backend_name(r1fast_backend)
        if r1fast_backend is None:
            backends.check_environment()   # a misspelt R1FAST_BACKEND, said before TRL loads the model
        self.r1fast_backend = r1fast_backend
        _normalise_model_eos(model)
        super().__init__(model, reward_funcs, args, *pos, **kw)
        self._refuse(unsupported_options(self.args))
        if self._is_vlm:
            raise ValueError("r1fast's TRL integration supports text-only models; this is a vision-language setup")
        if self.aux_loss_enabled:
            raise ValueError(
                "router_aux_loss_coef != 0 on an MoE model: the load-balancing loss is not wired into r1fast's "
                "loss path yet; set router_aux_loss_coef=0.0 or use trl.GRPOTrainer"
            )
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError(
                "FSDP and DeepSpeed are not supported by r1fast's TRL integration yet (sharded lm_head weight): "
                "use trl.GRPOTrainer or DDP"
            )
        # Resolve now so a backend that cannot run here (or a bad R1FAST_BACKEND) fails at construction.
        try:
            backends.resolve("grouped_logprob", self.accelerator.device, r1fast_backend)
        except ValueError as e:
            if r1fast_backend is None:
                raise  # R1FAST_BACKEND's error names the variable itself
            device = self.accelerator.device
            raise ValueError(f"r1fast_backend={r1fast_backend!r} cannot run on {device}: {e}") from None
        for what, m in (("model", self.model), ("ref_model", self.ref_model)):
            if m is None:
                continue
            m = self.accelerator.unwrap_model(m)
            _check_model(m, what)
            install_hidden_states_forward(m)
        # TRL's fused head divides the logits by the temperature its __init__ gave it (add_fused_lm_head), whatever
        # trainer.temperature becomes later: the drop-in's log-probs keep that one too.
        self._logprob_temperature = self.temperature
        # and casts the head to fp32 as its __init__ said (a later change of args.cast_lm_head_to_fp32 reaches neither)
        self._cast_lm_head_to_fp32 = bool(self.args.cast_lm_head_to_fp32)
        self.r1fast_rollout = self._make_rollout() if r1fast_generation else None

    def _make_rollout(self):
        from r1fast.integrations.hf_rollout import HFRollout

        model = self.accelerator.unwrap_model(self.model)
        self._refuse(generation_problems(self.args, model))
        on_gpu = next(model.parameters()).is_cuda
        # decode in the autocast dtype TRL's forward computes in (fp32 master weights are then copied)
        dtype = _AUTOCAST_DTYPES.get(str(self.accelerator.mixed_precision)) if on_gpu else None
        groups = max(self.num_generations, self.num_generations_eval or 0)
        # generation_batch_size is global: this process generates its share of it
        share = (self.args.generation_batch_size or groups) // max(self.accelerator.num_processes, 1)
        # max_model_len: the Engine's default, r1fast's ModelConfig.max_sequence_length (this model's config is
        # transformers', which has no such attribute)
        engine = dict(max_num_seqs=max(groups, min(share, 1024)),
                      # The KV pool is made now, before the optimizer's state exists: sized for every seat's
                      # completion after a prompt of up to PROMPT_TOKENS_PER_SEAT, not for the model's whole
                      # context (longer prompts preempt: slower, same outputs)
                      pool_tokens_per_seq=self.args.max_completion_length + PROMPT_TOKENS_PER_SEAT)
        engine.update(self.r1fast_engine_kwargs)
        return HFRollout(model, dtype=dtype, **engine)

    @staticmethod
    def _refuse(problems: list[str]) -> None:
        if problems:
            raise ValueError(
                "r1fast.integrations.trl.GRPOTrainer cannot reproduce these GRPOConfig settings: "
                + "; ".join(problems)
            )

    # ---- shared pieces -------------------------------------------------------------------------

    def _grad_scale(self) -> float:
        """The loss scale accelerate's backward multiplies the loss by (its GradScaler's under fp16 mixed
        precision, else 1). The fused op forms its fp16 gradients in the forward: formed at 1, those below
        fp16's 6e-8 are already 0 when the scaler's multiply reaches them in the backward."""
        scaler = getattr(self.accelerator, "scaler", None)
        return 1.0 if scaler is None or not torch.is_grad_enabled() else float(scaler.get_scale())

    def _loss_backend_kwargs(self) -> dict:
        return {} if self.r1fast_backend is None else {"backend": self.r1fast_backend}

    def _completion_hidden_and_weight(self, model, input_ids, attention_mask, logits_to_keep):
        """Hidden states that predict the last `logits_to_keep` tokens [B, K, H], and the lm_head weight.

        Hidden position t predicts token t + 1, so the completion tokens input_ids[:, -K:] are
        predicted by hidden[:, -K-1:-1]. Both come back in the dtype TRL's head matmul would run
        in: fp32 when TRL casts the head to fp32, the autocast dtype under bf16/fp16 mixed
        precision (TRL's head runs inside autocast), else the backbone's output dtype. The
        log-prob reductions are fp32 either way.
        """
        with self.accelerator.autocast():
            hidden, weight = model(input_ids=input_ids, attention_mask=attention_mask, r1fast_hidden_states=True)
        hidden = hidden[:, -logits_to_keep - 1 : -1]
        dtype = _AUTOCAST_DTYPES.get(str(self.accelerator.mixed_precision), hidden.dtype)
        if self._cast_lm_head_to_fp32:
            dtype = torch.float32
        return hidden.to(device=weight.device, dtype=dtype), weight.to(dtype)

    # ---- TRL hooks -----------------------------------------------------------------------------

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """With r1fast_generation: the completions from r1fast's engine, stopped where transformers' generate stops
        (the first of generation_config's eos tokens, at most its max_new_tokens) and cut as TRL's own path then cuts
        them (see _as_trl_cuts); no sampler log-probs, as with transformers' generate."""
        if self.r1fast_rollout is None:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        if images is not None or any(v is not None for v in (multimodal_fields or {}).values()):
            raise ValueError("r1fast_generation supports text-only prompts")
        params = self._engine_sampling_params(num_generations)
        # copies the fused projections from the trained weights (about a millisecond on a GPU for a
        # 1.5B model): cheaper than tracking every way the weights can change between generations
        self.r1fast_rollout.sync()
        return self._as_trl_cuts(self.r1fast_rollout.generate([list(p) for p in prompt_ids], params)), None

    def _as_trl_cuts(self, completions: list[list[int]]) -> list[list[int]]:
        """What TRL's regular path makes of transformers' generate output for these completions: generate stops a
        sequence at the first of generation_config's eos tokens and fills it with its pad token up to the batch's
        longest; TRL then keeps up to and including the first of trainer.eos_token_ids (fixed in its __init__). The
        two eos sets are the same unless a callback changed generation_config.eos_token_id (a new stop token, say):
        then a completion stopped at a token TRL does not cut at keeps the pads that follow it, as in TRL."""
        trl_eos = set(_token_ids(self.eos_token_ids, "trainer.eos_token_ids"))
        if set(self._generation_eos_ids()) == trl_eos:
            return completions  # each ends at its first eos, or has none: TRL's cut is the whole completion
        pad = self._generation_pad_id()
        longest = max(map(len, completions), default=0)
        cut = []
        for tokens in completions:
            if pad is not None:
                tokens = tokens + [pad] * (longest - len(tokens))
            end = next((i + 1 for i, token in enumerate(tokens) if token in trl_eos), len(tokens))
            cut.append(tokens[:end])
        return cut

    def _generation_eos_ids(self) -> list[int]:
        """generation_config's eos_token_id (an int, a list or None) as generate reads it, as a list."""
        return _token_ids(self._generation_option("eos_token_id"), "generation_config.eos_token_id")

    def _generation_pad_id(self) -> int | None:
        """The token generate fills finished sequences with: generation_config's pad_token_id, else its first eos."""
        pad = self._generation_option("pad_token_id")
        eos = self._generation_eos_ids()
        return _token_id(pad, "generation_config.pad_token_id") if pad is not None else (eos[0] if eos else None)

    def _engine_sampling_params(self, n):
        """The engine's SamplingParams for what transformers' generate does with TRL's generation_config, read at
        every generation as TRL's generate reads it: TRL builds it in __init__ and a callback may change it
        (do_sample, temperature, max_new_tokens...), while later changes of trainer.temperature or
        trainer.max_completion_length reach neither. What the engine cannot do is refused by name at the generation
        it would change, rather than left out."""
        from r1fast.rollout import SamplingParams

        problems = self._generation_config_problems()
        if problems:
            raise ValueError("r1fast_generation=True cannot sample as transformers' generate would with the "
                             "trainer's generation_config now: " + "; ".join(problems)
                             + " (use r1fast_generation=False for these)")
        option = self._generation_option
        # the seed from torch's generator: TRL's seed makes runs repeat
        # stops where generate stops: generation_config's eos tokens (a callback may change them), which need not be
        # TRL's eos_token_ids, the ones _as_trl_cuts cuts at
        common = dict(n=n, max_tokens=option("max_new_tokens"), stop_token_ids=self._generation_eos_ids(),
                      ignore_eos=True, seed=int(torch.randint(0, 2**62, ())))
        if not option("do_sample"):
            return SamplingParams(temperature=0, **common)  # greedy: generate ignores the sampling options
        top_k = option("top_k")
        return SamplingParams(temperature=option("temperature"), top_p=option("top_p"),
                              top_k=top_k if top_k and top_k > 0 else -1, min_p=option("min_p") or 0.0, **common)

    def _generation_config_problems(self) -> list[str]:
        """The options of TRL's generation_config (with the model's for those it leaves None) that the engine cannot
        follow: a repetition penalty, a logits processor, a length given as max_length, a zero sampling
        temperature (which transformers' generate refuses)."""
        option = self._generation_option
        problems = [_generation_extra_problem("generation_config", name, option(name))
                    for name, no_ops in _HF_GENERATION_EXTRAS.items() if option(name) not in no_ops]
        problems += _unreviewed_generation_problems("generation_config", option)
        if option("repetition_penalty") != 1.0:
            problems.append(f"generation_config.repetition_penalty={option('repetition_penalty')!r}: the engine's "
                            "sampler has no repetition penalty")
        for name, read in (("eos_token_id", _token_ids), ("pad_token_id", _token_id)):
            value = option(name)
            if value is not None:
                try:
                    read(value, f"generation_config.{name}")
                except ValueError as e:
                    problems.append(str(e))
        max_new_tokens = option("max_new_tokens")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
            problems.append(f"generation_config.max_new_tokens={max_new_tokens!r}: the engine needs a completion "
                            "length of at least 1 token")
        if option("do_sample") and not option("temperature") > 0:
            problems.append(f"generation_config.temperature={option('temperature')!r} with do_sample=True: "
                            "sampling needs a positive temperature (do_sample=False decodes greedily)")
        return problems

    def _generation_option(self, name):
        """An option as transformers' generate reads it: TRL's generation_config's (built in its __init__; a callback
        may change it), else (None) the model's generation_config's, else transformers' global default."""
        value = getattr(self.generation_config, name, None)
        if value is None:
            value = getattr(getattr(self.accelerator.unwrap_model(self.model), "generation_config", None), name, None)
        return _HF_GENERATION_DEFAULTS.get(name) if value is None else value

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **multimodal,
    ):
        """Same contract as TRL's: log-probs [B, K] (0 at padding), entropies or None, aux loss None."""
        present = sorted(k for k, v in multimodal.items() if v is not None)
        if present:
            raise ValueError(f"r1fast's TRL integration supports text-only inputs; got {present}")
        if compute_aux_loss:
            raise ValueError("the MoE load-balancing loss is not supported by r1fast's TRL integration")
        batch_size = batch_size or input_ids.size(0)
        all_logps, all_entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids = input_ids[start : start + batch_size]
            am = attention_mask[start : start + batch_size]
            hidden, weight = self._completion_hidden_and_weight(model, ids, am, logits_to_keep)
            targets = ids[:, -logits_to_keep:]
            # Score only real tokens, like TRL (labels are -100 at padding): less work, and the
            # zeros at padding keep the outputs interchangeable with TRL's.
            result = ops.grouped_logprob(
                hidden, weight, targets.to(hidden.device), mask=am[:, -logits_to_keep:].bool().to(hidden.device),
                temperature=self._logprob_temperature, return_entropy=compute_entropy,
                forward_only=not torch.is_grad_enabled(), **self._loss_backend_kwargs(),
            )
            logp, entropy = result if compute_entropy else (result, None)
            all_logps.append(logp)
            if compute_entropy:
                all_entropies.append(entropy)
        logps = torch.cat(all_logps, dim=0)
        entropies = torch.cat(all_entropies, dim=0) if compute_entropy else None
        return logps, entropies, None

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        present = sorted(k for k in ("pixel_values", "image_grid_thw", "token_type_ids", "mm_token_type_ids")
                         if inputs.get(k) is not None)
        if present:
            raise ValueError(f"r1fast's TRL integration supports text-only inputs; got {present}")
        advantages = inputs["advantages"]
        if advantages.dim() != 1:
            raise ValueError(
                f"r1fast's fused GRPO loss takes one advantage per completion [B]; got shape {tuple(advantages.shape)}"
            )

        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        options = ops.LossOptions(
            beta=self.beta,
            epsilon=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            delta=_delta_for(self.loss_type, self.args.delta),
            loss_type=self.loss_type,
            importance_sampling_level=self.importance_sampling_level,
            max_completion_length=self.max_completion_length,
            temperature=self._logprob_temperature,
            num_items=self._num_items(inputs, mode, accumulation),
            use_bias_correction_kl=self.args.use_bias_correction_kl,
        )

        hidden, weight = self._completion_hidden_and_weight(model, input_ids, attention_mask, logits_to_keep)
        device = hidden.device
        targets, mask, advantages = completion_ids.to(device), mask.to(device), advantages.to(device)
        old_logp = _maybe_to(inputs.get("old_per_token_logps"), device)
        ref_logp = _maybe_to(inputs.get("ref_per_token_logps"), device) if self.beta != 0.0 else None
        # TRL's vLLM correction, computed in _generate_and_score_completions ((B, T) for the token_* modes,
        # (B, 1) for sequence_*): it multiplies the policy term after the clipped objective, before beta * kl.
        is_ratio = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            is_ratio = _maybe_to(inputs["importance_sampling_ratio"], device)
        weights = self._policy_weights(inputs, hidden, weight, targets, mask, advantages, old_logp, is_ratio)

        loss, stats = ops.fused_linear_grpo_loss(
            hidden, weight, targets, mask, advantages, old_logp=old_logp, ref_logp=ref_logp,
            importance_weights=weights, options=options, row_stats=True, grad_scale=self._grad_scale(),
            **self._loss_backend_kwargs(),
        )
        if self.loss_type in _MEAN_LOSS_TYPES:
            loss = loss / accumulation
        self._log_loss_stats(mode, stats, mask, advantages, options)
        return loss

    def _policy_weights(self, inputs, hidden, weight, targets, mask, advantages, old_logp, is_ratio):
        """The no-gradient factor TRL's _compute_loss puts on the per-token policy loss, before `+ beta * kl`.

        TRL multiplies the clipped objective by its off-policy sequence mask (`off_policy_mask_threshold`),
        then its high-entropy token mask (`top_entropy_quantile < 1`), then the vLLM
        `importance_sampling_ratio`, for every loss type r1fast supports (vespo, where the ratio is not
        applied, is refused). Both masks are built by TRL's own helpers from the *current* policy's
        per-token log-probs and entropies, which the fused loss only has inside its own pass; so when
        either mask is on, a forward-only `grouped_logprob` pre-pass (no logits kept, no autograd graph)
        computes them first (skipped for the off-policy mask alone when TRL has no behaviour log-probs).
        The masks are 0/1, so the product is exact and only multiplies the policy term: the normalisers
        (mask, num_items) and the KL stay TRL's. None when no factor applies.
        """
        use_entropy = self.top_entropy_quantile < 1.0
        use_off_policy = self.off_policy_mask_threshold is not None
        if not (use_entropy or use_off_policy):
            return is_ratio
        # TRL's behaviour policy for the off-policy mask: vLLM's sampling log-probs when present, else the
        # old-policy log-probs, else (old_per_token_logps is None) the current log-probs themselves.
        behaviour_logp = _maybe_to(inputs.get("sampling_per_token_logps"), hidden.device)
        if behaviour_logp is None:
            behaviour_logp = old_logp
        logp = entropies = None
        if use_entropy or behaviour_logp is not None:
            with torch.no_grad():
                logp, entropies = ops.grouped_logprob(
                    hidden.detach(), weight.detach(), targets, mask=mask.bool(), temperature=self._logprob_temperature,
                    return_entropy=True, forward_only=True, **self._loss_backend_kwargs(),
                )
        entropy_mask = off_policy_mask = None
        if use_entropy:  # built first, as in TRL (a collective under multi-process training: TRL gathers every
            # rank's entropies for the quantile)
            entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)  # (B, T)
        if use_off_policy:
            # Without a behaviour policy TRL judges the current one against itself: its KL is logp - logp = 0
            # for any finite logp, so a stand-in gives its mask exactly (this mask alone needs no pre-pass then).
            logp_now = logp if logp is not None else torch.zeros(targets.shape, device=hidden.device)
            off_policy_mask = self.get_off_policy_mask(
                advantages=advantages.unsqueeze(1), per_token_logps=logp_now,
                sampling_per_token_logps=logp_now if behaviour_logp is None else behaviour_logp,
                mask=mask, off_policy_threshold=self.off_policy_mask_threshold,
            )  # (B, 1)
        # TRL's order: per_token_loss * off_policy_mask * entropy_mask * importance_sampling_ratio.
        factors = [f for f in (off_policy_mask, entropy_mask, is_ratio) if f is not None]
        product = factors[0].float()
        for factor in factors[1:]:
            product = product * factor.float()
        return product

    def _num_items(self, inputs, mode, accumulation):
        """TRL's dapo/cispo normaliser: the generation batch's active tokens per process, for one accumulation window."""
        if self.loss_type in _MEAN_LOSS_TYPES:
            return None
        num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            num_items = num_items * accumulation / self.args.steps_per_generation
        return float(num_items)

    def _log_loss_stats(self, mode: str, stats: dict, mask: torch.Tensor, advantages: torch.Tensor,
                        options: ops.LossOptions) -> None:
        """Log the op's statistics under TRL's metric names and with TRL's weighting: kl and entropy are token
        means across processes; the clip ratios too at token level, but means over sequences at sequence level
        (GSPO), where TRL has one ratio per sequence; clip_ratio/low_min and high_max are the extremes over every
        process's sequences of each sequence's clipped fraction."""
        tokens = mask.sum().float()

        def global_mean(value, count=tokens):
            local = torch.as_tensor(value, dtype=torch.float32, device=tokens.device)
            count = torch.as_tensor(count, dtype=torch.float32, device=tokens.device)
            totals = self.accelerator.reduce(torch.stack([local * count, count]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        metrics = self._metrics[mode]
        if self.beta != 0.0 and "kl" in stats:
            metrics["kl"].append(global_mean(stats["kl"]))
        if "entropy" in stats:
            metrics["entropy"].append(global_mean(stats["entropy"]))
        if "rows/clip_low" not in stats:
            return
        low, high = ops.per_sequence_clip_fractions(stats, mask.sum(-1), advantages, options)
        if self.importance_sampling_level == "sequence":  # TRL: a mean over sequences (empty ones too)
            means = {name: global_mean(rows.mean(), len(rows))
                     for name, rows in (("low", low), ("high", high), ("region", low + high))}
        else:  # a token mean, as the op's own statistics
            means = {name: global_mean(stats[f"clip_ratio/{name}_mean"]) for name in ("low", "high", "region")}
        if self.loss_type == "cispo":
            metrics["cispo_clip_ratio"].append(means["high"])
            return
        for name, value in means.items():
            metrics[f"clip_ratio/{name}_mean"].append(value)
        metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(low)).item())
        metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(high)).item())


def _maybe_to(t, device):
    return None if t is None else t.to(device)


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)
