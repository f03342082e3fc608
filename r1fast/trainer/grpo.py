"""GRPOTrainer: DeepSeek-R1's reinforcement-learning step on r1fast's engine and fused loss.

One rollout step:
    prompts ─► Engine.generate (G samples each, sampler log-probs) ─► rewards ─► group advantages
    ─► old-policy log-probs once, forward-only (only when the batch is reused: num_iterations > 1
       and more than one optimizer step left before max_steps)
    ─► reference log-probs from a frozen copy (only when beta > 0)
    ─► num_iterations × (gradient_accumulation_steps micro-batches of the fused loss, packed layout,
       backward) ─► clip, AdamW, LR schedule ─► engine.reset_prefix_cache() ─► metrics
The engine reads the policy's weights in place, so an optimizer step is visible to the next rollout
without a copy; only its prefix cache (KV of the old weights) must be dropped.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import signal
import time
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch

from r1fast import _ext
from r1fast._umask import save_safetensors
from r1fast.data.loading import (EVAL_SPLITS, check_columns, check_prompts, column_options_hint, decode_completions,
                                 encode_prompt, prompt_limit, resolve_stop_tokens, row_name, source_name,
                                 stop_token_ids, warn_cut_prompts, warn_unstopped_turn_end)
from r1fast.rewards import RewardSet
from r1fast.trainer import checkpoints as ckpt
from r1fast.trainer.loss_scale import saved_loss_scale
from r1fast.trainer.common import (  # noqa: F401  (NonFiniteLoss: also importable from here)
    NonFiniteLoss,
    start_run,
    step_if_finite,
    check_answer_column,
    dataset_rows,
    check_reward_keywords,
    DataCursor,
    accumulating_gradients,
    resume_check,
    rows_fingerprint,
    make_loss_scale,
    make_optimizer,
    make_scheduler,
    model_from_argument,
    host_tensor,
    pack,
    PackedBatch,
    prompt_sharing_pays,
    reward_columns,
    reward_completions,
    run_dir_for,
    say_what_is_kept,
    unscale_and_clip,
    refuse_config_in_trl_place,
    trainer_config_and_tokenizer,
    warmup_steps_of,
)
from r1fast.trainer.config import ConfigError, GRPOConfig
from r1fast.trainer.evaluate import check_eval_answers
from r1fast.trainer.metrics import plain_number, unlogged_number


def _eval_source(cfg, eval_dataset, eval_at_ends: bool) -> str:
    """Where a trainer's eval rows came from, in the user's words: a pipeline stage's were "eval_dataset None"
    (the stage's own option, unset) when they were the pipeline's eval_dataset."""
    from_option = f"eval_dataset {cfg.eval_dataset!r}, split {cfg.eval_dataset_split or 'default'}"
    if eval_dataset is None:
        return from_option
    if not eval_at_ends:   # a pipeline stage: rows read from its own eval_dataset, or else the pipeline's
        return from_option if cfg.eval_dataset is not None else "the pipeline's eval_dataset"
    return "the eval_dataset argument"


# config options a RewardSet holds its own value of: (the option, the RewardSet's keyword, the built-in it configures)
_REWARD_SET_OPTIONS = (("format_pattern", "format_pattern", "format"), ("language", "language", "language"),
                       ("length_penalty_target", "length_target", "length"))


def _config_for_reward_set(cfg: GRPOConfig, rewards: RewardSet) -> GRPOConfig:
    """A copy of cfg holding what `rewards` scores with (its functions, weights, timeout and built-ins' options),
    which the checkpoint, metrics and tracker record and a resume compares. A RewardSet scores with its own values:
    a config option set to another one would be dropped without a word, so it is an error naming both."""
    if cfg.reward_timeout is not None and rewards.timeout != cfg.reward_timeout:
        # the option, set against a hang, would do nothing
        raise ValueError(f"config.reward_timeout is {cfg.reward_timeout:g} s but the RewardSet given has "
                         f"timeout={rewards.timeout!r}, which its calls run under; build it with "
                         f"RewardSet(..., timeout={cfg.reward_timeout:g})")
    if cfg.reward_weights is not None and [float(w) for w in cfg.reward_weights] != rewards.weights:
        raise ValueError(f"config.reward_weights is {list(cfg.reward_weights)} but the RewardSet given has "
                         f"weights {rewards.weights}, which its totals use; build it with "
                         f"RewardSet(funcs, {list(cfg.reward_weights)}) or leave reward_weights unset")
    used: dict[str, Any] = {"reward_funcs": list(rewards.specs), "reward_timeout": rewards.timeout}
    if cfg.reward_weights is None and any(w != 1.0 for w in rewards.weights):   # unset is equal weights
        used["reward_weights"] = list(rewards.weights)
    for option, keyword, builtin in _REWARD_SET_OPTIONS:
        if builtin not in rewards.specs:
            continue   # no reward of the set reads it (format_pattern still sets what eval/format counts)
        value, own = getattr(cfg, option), getattr(rewards, keyword)
        if value != GRPOConfig.__dataclass_fields__[option].default and value != own:
            raise ValueError(f"config.{option} is {value!r} but the RewardSet given built its {builtin!r} reward "
                             f"with {keyword}={own!r}, which it scores with; build it with "
                             f"RewardSet(..., {keyword}={value!r}) or leave {option} unset")
        used[option] = own
    return dataclasses.replace(cfg, **used)


class GRPOTrainer:
    """`GRPOTrainer(model, reward_funcs, train_dataset, config, tokenizer=None).train()`.

    model:          an r1fast CausalLM (or a local Hugging Face folder)
    reward_funcs:   a RewardSet, or a list of built-in names / "module:function" / callables
                    with TRL's signature `(prompts, completions, **columns) -> list[float | None]`
    train_dataset:  rows with a prompt column (string or chat messages) and the columns the rewards
                    read (e.g. "answer"): a list of dicts, a datasets.Dataset, or a path / builtin:<task>
    By keyword also TRL's names, `args=` for config and `processing_class=` for tokenizer.
    """

    def __init__(self, model, reward_funcs=None, train_dataset=None, config: Optional[GRPOConfig] = None,
                 tokenizer=None, eval_dataset=None, *, args: Optional[GRPOConfig] = None, processing_class=None,
                 run_dir: Optional[str] = None, stage_name: str = "grpo", step_offset: int = 0,
                 eval_at_ends: bool = True, **trl_keywords):
        refuse_config_in_trl_place(train_dataset, "the train_dataset argument", "GRPOTrainer",
                                   "(model, reward_funcs, args, train_dataset)",
                                   "(model, reward_funcs, train_dataset, config)")
        # TRL's names for two of the arguments, so a TRL script's call ports as it is
        self.cfg, tokenizer = trainer_config_and_tokenizer("GRPOTrainer", GRPOConfig, instead=(
            "build r1fast.GRPOConfig from the options you set (TRL's names where the meaning is the same; "
            "docs/training.md lists the defaults that differ), or keep TRL's config and TRL's trainer with r1fast's "
            "loss: from r1fast.integrations.trl import GRPOTrainer (docs/trl.md)"),
            config=config, args=args, tokenizer=tokenizer, processing_class=processing_class, trl_keywords=trl_keywords)
        cfg = self.cfg
        if hasattr(reward_funcs, "convert_tokens_to_ids"):   # a tokenizer is callable: it passed for a reward function
            raise TypeError("GRPOTrainer: reward_funcs is a tokenizer; GRPOTrainer's arguments are (model, reward_funcs, "
                            "train_dataset, config, tokenizer=...), where SFTTrainer's are (model, tokenizer, rows, config)")
        _ext.require("GRPOTrainer's rollout engine")  # before a model loads, not at the first rollout
        # the data before the model: a wrong path is said before a large model has loaded
        self.train_rows = self._rows(train_dataset if train_dataset is not None else cfg.dataset, cfg.seed, "train")
        self.eval_rows = self._rows(eval_dataset if eval_dataset is not None else cfg.eval_dataset, cfg.seed + 1, "eval") \
            if (eval_dataset is not None or cfg.eval_dataset) else None
        if self.eval_rows is not None and cfg.eval_size:
            self.eval_rows = self.eval_rows[:cfg.eval_size]
        model, tokenizer = model_from_argument(model, tokenizer, cfg, fp8=cfg.fp8_options())
        if not hasattr(model, "lm_head_weight"):
            raise TypeError("model must be an r1fast CausalLM (r1fast.models); wrap a transformers model "
                            "with r1fast.models.from_pretrained(path)")
        _apply_config_to_model(model, cfg)
        if tokenizer is None:
            raise ValueError("a tokenizer is required to decode completions for the reward functions")
        self.model, self.tokenizer = model, tokenizer
        self.device = model.device
        if reward_funcs is None:
            reward_funcs = cfg.reward_funcs
        if isinstance(reward_funcs, RewardSet):
            self.cfg = cfg = _config_for_reward_set(cfg, reward_funcs)
            self.rewards = reward_funcs
        else:
            if callable(reward_funcs) or isinstance(reward_funcs, str):
                reward_funcs = [reward_funcs]
            if cfg.reward_weights is not None and len(cfg.reward_weights) != len(reward_funcs):
                # dropping them would train on unweighted rewards without a word
                raise ValueError(f"config.reward_weights has {len(cfg.reward_weights)} entries but "
                                 f"{len(reward_funcs)} reward functions were given")
            self.rewards = RewardSet(reward_funcs, cfg.reward_weights, format_pattern=cfg.format_pattern,
                                     language=cfg.language, length_target=cfg.length_penalty_target,
                                     timeout=cfg.reward_timeout)
            if list(reward_funcs) != list(cfg.reward_funcs):
                # the functions given here, not the config's (default) ones, are what a checkpoint and the
                # tracker record and what a resume compares against (a copy: the caller's config stays as it was)
                self.cfg = cfg = dataclasses.replace(cfg, reward_funcs=list(reward_funcs))
        if cfg.prompt_column not in self.train_rows[0]:
            raise ValueError(f"train dataset{source_name(self.train_rows)} lacks the prompt column {cfg.prompt_column!r}; "
                             f"it has {sorted(self.train_rows[0])}"
                             f"{column_options_hint([cfg.prompt_column], {cfg.prompt_column: 'prompt_column'})}")
        check_columns(self.train_rows, (cfg.prompt_column,), "train dataset")
        check_prompts(self.train_rows, cfg.prompt_column, tokenizer, cfg.system_prompt, "train dataset",
                      cfg.chat_template_kwargs)
        check_answer_column(self.rewards.names, self.train_rows, cfg.answer_column, "train dataset")
        check_reward_keywords(self.train_rows, cfg.prompt_column, "train dataset")
        if self.eval_rows:   # evaluated during and after training: a bad row is an error now, not then
            if cfg.prompt_column not in self.eval_rows[0]:
                # not "set prompt_column=<column>": it names the train dataset's column too, which has it
                raise ValueError(f"eval dataset{source_name(self.eval_rows)} lacks column(s) {[cfg.prompt_column]}; "
                                 f"it has {sorted(self.eval_rows[0])}; prompt_column also names the train dataset's "
                                 f"prompt column, which it has: name the eval dataset's prompt column "
                                 f"{cfg.prompt_column!r}")
            check_columns(self.eval_rows, (cfg.prompt_column,), "eval dataset")
            check_prompts(self.eval_rows, cfg.prompt_column, tokenizer, cfg.system_prompt, "eval dataset",
                          cfg.chat_template_kwargs)
            check_eval_answers(self.eval_rows, cfg.answer_column, "eval dataset rows")
            if cfg.rollout_max_num_seqs < cfg.eval_samples_per_prompt:   # else the first evaluation fails
                raise ConfigError(f"option 'engine_max_num_seqs' = {cfg.engine_max_num_seqs} is below "
                                  f"eval_samples_per_prompt = {cfg.eval_samples_per_prompt}: a held-out prompt's "
                                  f"samples are decoded together")
        # the training rows' source as given: the train_dataset argument (a path or builtin:<task> too), else
        # cfg.dataset
        train_source = train_dataset if train_dataset is not None else cfg.dataset
        train_builtin = isinstance(train_source, str) and train_source.startswith("builtin:")
        if self.eval_rows and not train_builtin:
            seen = {str(r.get(cfg.prompt_column)) for r in self.train_rows}
            if all(str(r.get(cfg.prompt_column)) in seen for r in self.eval_rows):
                source = _eval_source(cfg, eval_dataset, eval_at_ends)
                warnings.warn(f"r1fast: every eval prompt is also a training prompt ({source}): the 'held-out' "
                              f"accuracy is measured on training rows; give held-out data or eval_dataset_split",
                              stacklevel=2)
        if self.eval_rows and train_builtin:
            # two draws of a built-in task share prompts: keep the held-out ones out of training (as
            # the pipeline does), so the accuracy reported on them is truly held out
            seen = {str(r.get(cfg.prompt_column)) for r in self.eval_rows}
            self.train_rows = [r for r in self.train_rows if str(r.get(cfg.prompt_column)) not in seen]
            if not self.train_rows:
                raise ValueError("every training prompt is also an eval prompt: nothing left to train on")
        self.run_dir = run_dir or run_dir_for(cfg.output_dir, cfg.run_name, "grpo")
        self.stage = stage_name
        self.step_offset = step_offset
        # False in a pipeline, which evaluates its held-out prompts between stages itself
        self.eval_at_ends = eval_at_ends
        # in a pipeline (eval_at_ends False) the user sets the option as <stage>.stop_tokens
        self.stop_option = stop_option = "stop_tokens" if eval_at_ends else f"{stage_name}.stop_tokens"
        extra_stops = resolve_stop_tokens(tokenizer, cfg.stop_tokens, stop_option)
        self.stop_ids = stop_token_ids(tokenizer, extra=extra_stops)
        # what a completion can end with: the engine also stops at the model's own eos ids
        self.end_ids = stop_token_ids(tokenizer, model.eos_token_ids, extra_stops)
        warn_unstopped_turn_end(tokenizer, self.end_ids, stop_option, cfg.chat_template_kwargs)
        self._prompt_cache: dict[int, list[int]] = {}
        self._warned_cut_prompt = False
        if cfg.engine_num_blocks is not None:
            # as the engine sizes its own pool: one sequence of max_model_len fits (else the first rollout with
            # a long prompt fails, naming the engine's num_blocks rather than this option)
            need = math.ceil((self.max_model_len - 1) / cfg.engine_block_size)
            if cfg.engine_num_blocks < need:
                raise ConfigError(f"option 'engine_num_blocks' = {cfg.engine_num_blocks} cannot hold one sequence of "
                                  f"{self.max_model_len} tokens (max_prompt_length + max_completion_length, within "
                                  f"the model's positions): it needs {need} blocks of engine_block_size = "
                                  f"{cfg.engine_block_size} (or lower those lengths)")
        self.ref_model = None
        if cfg.beta > 0:
            self.ref_model = copy.deepcopy(model).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        self.optimizer = make_optimizer(model, cfg)
        self.loss_scale = make_loss_scale(model, self.optimizer)   # float16 only
        self.total_steps = self._total_steps()
        self.scheduler = make_scheduler(self.optimizer, cfg.lr_scheduler_type, self.total_steps,
                                        warmup_steps_of(cfg, self.total_steps))
        self.global_step = 0
        self.rollout_index = 0
        self.cursor = DataCursor(len(self.train_rows), cfg.seed)
        self.data_sha256 = rows_fingerprint(self.train_rows)   # a resume on other rows is said (option_change_note)
        self.nonfinite_skipped = 0
        # TRL's num_tokens: prompt + completion tokens of every rollout so far (a prompt once per
        # completion), cumulative across --resume (saved in the checkpoint)
        self.num_tokens = 0
        self._nonfinite_streak = 0
        self._engine = None
        self.share_prompts = prompt_sharing_pays(self.model, self.cfg.share_prompts)
        self.history: list[dict] = []
        # the metrics of the rollouts since the last logged line: with logging_steps > 1 a line combines
        # them (window_metrics), as TRL's and SFT's do, rather than showing the last rollout alone
        self.metrics_window: list[dict] = []
        self._stop_requested = False
        # the evaluation at the end, once logged: kept in the final checkpoint, so that resuming a
        # finished run neither evaluates nor logs it a second time
        self._final_eval: Optional[dict] = None

    # -- setup -------------------------------------------------------------------------------------
    def _rows(self, data, seed, what) -> list[dict]:
        if what == "train":
            return dataset_rows(data, what, split=self.cfg.dataset_split, seed=seed)
        return dataset_rows(data, what, split=self.cfg.eval_dataset_split, seed=seed, default_splits=EVAL_SPLITS,
                            n_builtin=max(self.cfg.eval_size, 1))

    def _total_steps(self) -> int:
        cfg = self.cfg
        if cfg.max_steps > 0:
            return cfg.max_steps
        rollouts = math.ceil(cfg.num_train_epochs * len(self.train_rows) / cfg.prompts_per_rollout)
        return max(1, rollouts * cfg.num_iterations)

    @property
    def engine(self):
        if self._engine is None:
            from r1fast.rollout import Engine

            cfg = self.cfg
            self._engine = Engine(self.model, num_blocks=cfg.engine_num_blocks, block_size=cfg.engine_block_size,
                                  max_num_seqs=cfg.rollout_max_num_seqs,
                                  max_num_batched_tokens=cfg.engine_max_num_batched_tokens,
                                  max_model_len=self.max_model_len)
        return self._engine

    @property
    def max_model_len(self) -> int:
        """The rollout engine's longest sequence: a capped prompt and its completion, within the model's positions."""
        return min(self.model.config.max_sequence_length, self.cfg.max_prompt_length + self.cfg.max_completion_length)

    @property
    def prompt_cap(self) -> int:
        """Prompts keep their last max_prompt_length tokens, and at most all but one of the model's
        positions: a longer prompt could not get a single completion token."""
        return prompt_limit(self.cfg.max_prompt_length, self.model.config.max_sequence_length)[0]

    def _prompt_ids(self, rows: Sequence[dict], keys: Sequence[int]) -> list[list[int]]:
        out = []
        for key, row in zip(keys, rows):
            if key not in self._prompt_cache:
                try:   # a chat template that refuses this row's content (check_prompts renders one row per roles)
                    ids = encode_prompt(self.tokenizer, row[self.cfg.prompt_column], self.cfg.system_prompt,
                                        chat_template_kwargs=self.cfg.chat_template_kwargs)
                except ValueError as e:
                    raise ValueError(f"train dataset: {row_name(self.train_rows, key)}: {e}") from None
                self._prompt_cache[key] = self._cut_prompt(ids, key)
            out.append(self._prompt_cache[key])
        return out

    def _cut_prompt(self, ids: list[int], row: int) -> list[int]:
        """A prompt's last prompt_cap tokens; the first prompt cut is warned about (prompts are encoded as steps
        draw them, so the warning comes when the first long one is drawn)."""
        cap, limit = prompt_limit(self.cfg.max_prompt_length, self.model.config.max_sequence_length)
        if len(ids) <= cap:
            return ids
        if not self._warned_cut_prompt:
            self._warned_cut_prompt = True
            warn_cut_prompts("train dataset", row, len(ids), cap, "(said for the first prompt cut) ", limit)
        return ids[-cap:]

    def _seed(self, kind: int, index: int) -> int:
        # Generation depends only on (seed, step), never on global RNG state, so a resumed run draws
        # exactly the samples the uninterrupted run drew.
        return (self.cfg.seed * 1_000_003 + kind * 7_919 + index) % (2**31 - 1)

    def _sampling_params(self, n: int, temperature: float, seed: int):
        from r1fast.rollout import SamplingParams

        cfg = self.cfg
        return SamplingParams(n=n, temperature=temperature, top_p=cfg.top_p, top_k=cfg.top_k, min_p=cfg.min_p,
                              max_tokens=cfg.max_completion_length, stop_token_ids=self.stop_ids, seed=seed)

    # -- one rollout -----------------------------------------------------------------------------
    def generate(self, rows: Sequence[dict], keys: Sequence[int], n: int, temperature: float, seed: int):
        """→ prompt ids per completion, completion ids, sampler log-probs, finish reasons (prompt-major)."""
        prompt_ids = self._prompt_ids(rows, keys)
        results = self.engine.generate(prompt_ids, self._sampling_params(n, temperature, seed))
        p_ids, c_ids, c_logp, finish = [], [], [], []
        for pid, res in zip(prompt_ids, results):
            if len(res.completions) != n:
                raise RuntimeError(f"rollout engine returned {len(res.completions)} completions for a prompt, expected {n}")
            for comp in res.completions:
                ids = list(comp.token_ids)
                lps = list(comp.logprobs) if comp.logprobs is not None else None
                if not ids:   # an immediate stop: train on the stop token itself
                    ids = [self.stop_ids[0]] if self.stop_ids else [self.tokenizer.pad_token_id or 0]
                    lps = None
                p_ids.append(pid)
                c_ids.append(ids)
                c_logp.append(lps)
                finish.append(comp.finish_reason)
        return p_ids, c_ids, c_logp, finish

    def score(self, rows: Sequence[dict], n: int, completions_text: list[str], completion_ids: list[list[int]]):
        cfg = self.cfg
        prompts = [r[cfg.prompt_column] for r in rows for _ in range(n)]
        owners = [i for i in range(len(rows)) for _ in range(n)]
        columns = reward_columns(rows, owners, cfg.prompt_column, cfg.answer_column)
        table = self.rewards.score(prompts, reward_completions(prompts, completions_text), columns,
                                   completion_ids=completion_ids)
        return table, self.rewards.total(table)

    def _advantages(self, totals: list[float]) -> torch.Tensor:
        from r1fast import ops

        r = torch.tensor(totals, dtype=torch.float32)
        # A row no reward function scored (NaN) gets A = 0 and counts in no group statistic.
        scored = ~torch.isnan(r)
        return ops.group_advantages(r, self.cfg.num_generations, estimator=self.cfg.advantage_estimator,
                                    scale_rewards=self.cfg.scale_rewards, mask=scored)

    @torch.no_grad()
    def _forward_logp(self, model, batch) -> torch.Tensor:
        from r1fast import ops

        hidden = batch.hidden(model)
        # the targets are the batch's own tokens, which the model's forward has range-checked
        return ops.grouped_logprob(hidden[batch.select], model.lm_head_weight, batch.targets,
                                   temperature=self.cfg.temperature, forward_only=True, check_targets=False)

    def _loss_backward(self, inputs: "MicroBatches", micro: list[list[int]], adv: torch.Tensor, old: list, ref: list,
                       opts, scale: float, loss_scale: float) -> tuple[bool, float, dict[str, float]]:
        """One pass of the fused loss and its backward over a rollout's micro-batches, the gradients summed as the
        optimizer sums them (on top of those already there) -> (False if a micro-batch's loss was non-finite,
        the pass's loss, its statistics' sums: token-weighted sums, num_tokens, min / max of the extremes; at
        sequence level the clip means' counts of sequences, and under _SEQUENCES the pass's sequences)."""
        from r1fast import ops

        finite = True
        # Summed on the device and read once per iteration, not once per micro-batch and statistic:
        # each read waits for everything queued before it (the forward's own input checks still read
        # the device once per micro-batch)
        total_loss = torch.zeros((), dtype=torch.float32, device=self.device)
        stat_sums: dict[str, torch.Tensor] = {}
        sequences = 0   # at sequence level: the pass's sequences, which the clip means count
        with accumulating_gradients(self.optimizer):  # fp32 sums of the micro-batches' gradients
            for j, idx in enumerate(micro):
                b, mask, active, sampler = inputs[j]
                hidden = b.hidden(self.model)
                try:
                    loss, stats = ops.fused_linear_grpo_loss(
                        hidden[b.select], self.model.lm_head_weight, b.targets, mask, adv[idx[0]:idx[-1] + 1],
                        old_logp=old[j], ref_logp=ref[j], sampler_logp=sampler, cu_seqlens=b.completion_cu,
                        options=opts, grad_scale=loss_scale, row_stats=True)
                except ValueError as e:
                    if "non-finite" in str(e) or "NaN" in str(e):
                        finite = False
                        break
                    raise
                # a non-finite loss (the op raises on one) would still be caught below: NaN gradients
                (loss * (scale * loss_scale)).backward()
                total_loss = total_loss + loss.detach().float() * scale
                # the op's statistics are means over this micro-batch's active tokens (min / max for
                # is_weight's): weighted by its token count, so the step's are the whole rollout's and a
                # micro-batch with no active token (mask_truncated_completions) adds no zeros
                n = torch.as_tensor(stats.get("num_tokens", 1.0), dtype=torch.float32, device=self.device)
                clips = _clip_statistics(stats, active, adv[idx[0]:idx[-1] + 1], opts)
                if opts.importance_sampling_level == "sequence":   # shares of sequences, not of tokens
                    for k in _CLIP_MEANS:
                        stats.pop(k, None)   # the op's token means
                        stat_sums[k] = stat_sums.get(k, 0.0) + clips.pop(k)
                    sequences += len(idx)
                for k, v in clips.items():
                    has = ~v.isnan()   # NaN: no sequence of the micro-batch has trained tokens (TRL's nanmin)
                    stat_sums[k] = stat_sums.get(k, 0.0) + torch.where(has, v, 0.0)
                    stat_sums[_count_of(k)] = stat_sums.get(_count_of(k), 0.0) + has.float()
                for k, v in stats.items():
                    v = torch.as_tensor(v, dtype=torch.float32, device=self.device).detach()
                    v = torch.where(torch.isfinite(v), v, 0.0)
                    if k in _EXTREMES:
                        pick, empty = (torch.minimum, math.inf) if _EXTREMES[k] is min else (torch.maximum, -math.inf)
                        v = torch.where(n > 0, v, empty)
                        stat_sums[k] = pick(stat_sums[k], v) if k in stat_sums else v
                    else:
                        stat_sums[k] = stat_sums.get(k, 0.0) + (v if k == "num_tokens" else v * n)
        names = sorted(stat_sums)
        total, *values = torch.stack([total_loss, *(stat_sums[k] for k in names)]).tolist()
        return finite, total, {**dict(zip(names, values)), **({_SEQUENCES: float(sequences)} if sequences else {})}

    def step(self) -> dict[str, Any]:
        """One rollout and its `num_iterations` optimizer steps; returns the step's metrics."""
        cfg, G = self.cfg, self.cfg.num_generations
        t0 = time.perf_counter()
        keys = self.cursor.take(cfg.prompts_per_rollout)
        rows = [self.train_rows[k] for k in keys]
        self.model.eval()
        p_ids, c_ids, c_logp, finish = self.generate(rows, keys, G, cfg.temperature, self._seed(0, self.rollout_index))
        t_rollout = time.perf_counter()
        texts = decode_completions(self.tokenizer, c_ids, self.end_ids)
        table, totals = self.score(rows, G, texts, c_ids)
        adv = self._advantages(totals).to(self.device)
        t_rewards = time.perf_counter()

        B = len(c_ids)
        self.num_tokens += sum(len(p) + len(c) for p, c in zip(p_ids, c_ids))
        mb = cfg.per_device_train_batch_size
        micro = micro_batch_indices(B, mb)
        keep = [not (cfg.mask_truncated_completions and finish[i] == "length") for i in range(B)]
        # Counted on the host: summing the device masks would sync once per completion.
        num_items = float(sum(len(c_ids[i]) for i in range(B) if keep[i])) or 1.0
        inputs = MicroBatches(micro, p_ids, c_ids, c_logp, keep, self.device, self.share_prompts)
        # max_steps counts optimizer steps: the last rollout stops there, as TRL's loop does
        iterations = max(1, min(cfg.num_iterations, self.total_steps - self.global_step))
        # one pass over the batch: the policy that sampled it is the one trained, old_logp = logp.detach() (LOSS_SPEC)
        old = [self._forward_logp(self.model, inputs[j].batch) if iterations > 1 else None for j in range(len(micro))]
        ref = [self._forward_logp(self.ref_model, inputs[j].batch) if self.ref_model is not None else None
               for j in range(len(micro))]
        t_logp = time.perf_counter()

        opts = cfg.loss_options(num_items)
        scale = accumulation_scale(opts.loss_type, len(micro))
        self.model.train()
        stats_acc: dict[str, float] = {}
        micro_sums: dict[str, float] = {}   # _MICRO_BATCH_MEANS' sums and counts over the passes
        losses, grad_norms, t_loss, t_opt = [], [], 0.0, 0.0
        for _ in range(iterations):
            ta = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            # float16: the backward runs on loss * S (an overflow halves S for the next iteration), the
            # fused loss forming its 16-bit gradients at S too
            loss_scale = 1.0 if self.loss_scale is None else self.loss_scale.scale
            finite, total_loss, sums = self._loss_backward(inputs, micro, adv, old, ref, opts, scale, loss_scale)
            finite = finite and math.isfinite(total_loss)
            tokens = max(sums.get("num_tokens", 1.0), 1.0)
            sequences = sums.pop(_SEQUENCES, None)   # set at sequence level: the clip means count sequences
            for k, v in sums.items():
                if sequences is not None and k in _CLIP_MEANS:
                    stats_acc[k] = stats_acc.get(k, 0.0) + v / sequences / iterations
                elif k in _MICRO_BATCH_MEANS or k in map(_count_of, _MICRO_BATCH_MEANS):
                    micro_sums[k] = micro_sums.get(k, 0.0) + v
                elif k in _EXTREMES:
                    v = v if math.isfinite(v) else 0.0   # no active token at all: 0, as the op says then
                    stats_acc[k] = _EXTREMES[k](stats_acc.get(k, v), v)
                else:
                    stats_acc[k] = stats_acc.get(k, 0.0) + (v if k == "num_tokens" else v / tokens) / iterations
            tb = time.perf_counter()
            gn = unscale_and_clip(self) if finite else float("nan")
            step_if_finite(self, finite and math.isfinite(gn), loss_finite=finite)  # never a NaN/inf update
            lr_used = self.scheduler.get_last_lr()[0]   # after scheduler.step() it is the next step's rate
            self.scheduler.step()
            self.global_step += 1
            losses.append(total_loss)
            grad_norms.append(gn)
            t_loss += tb - ta
            t_opt += time.perf_counter() - tb
        for k in _MICRO_BATCH_MEANS:
            if k in micro_sums:   # NaN (logged null) where no micro-batch had a sequence with trained tokens
                count = micro_sums[_count_of(k)]
                stats_acc[k] = micro_sums[k] / count if count else float("nan")
        if opts.loss_type == "cispo":   # TRL's name for cispo's one clip share (c1 > epsilon_high with A > 0)
            stats_acc["cispo_clip_ratio"] = stats_acc.pop("clip_ratio/high_mean")
            for k in _CLIP_MEANS:
                stats_acc.pop(k, None)
        self.optimizer.zero_grad(set_to_none=True)
        self.engine.reset_prefix_cache()
        self.rollout_index += 1
        t_end = time.perf_counter()

        gen_tokens = sum(len(c) for c in c_ids)
        # the op's count of the loss's active tokens: not TRL's num_tokens (all tokens seen, below)
        stats_acc.pop("num_tokens", None)
        lengths = torch.tensor([len(c) for c in c_ids], dtype=torch.float32)
        metrics: dict[str, Any] = {
            "reward": _nanmean(totals),
            "reward_std": _nanstd(totals),
            "frac_reward_zero_std": _frac_zero_std(totals, G),
            **{f"rewards/{n}": _nanmean(t) for n, t in zip(self.rewards.names, table)},
            # TRL's rewards/<fn>/std: how much each function tells the completions apart (its unscored rows left out)
            **{f"rewards/{n}/std": _nanstd(t) for n, t in zip(self.rewards.names, table)},
            "completion_length": float(lengths.mean()),
            "completion_length_min": float(lengths.min()),
            "completion_length_max": float(lengths.max()),
            "truncated_ratio": sum(f == "length" for f in finish) / B,
            **_terminated_lengths(c_ids, finish),
            "loss": sum(losses) / len(losses),
            "grad_norm": _nanmean(grad_norms),
            "lr": lr_used,   # the rate the last optimizer step of the rollout ran at
            "nonfinite_skipped": self.nonfinite_skipped,
            "num_tokens": self.num_tokens,
            "epoch": self.epoch,
            **({} if self.loss_scale is None else {"loss_scale": self.loss_scale.scale}),
            **stats_acc,
            "tokens_per_s": gen_tokens / max(t_rollout - t0, 1e-9),
            "time/rollout": t_rollout - t0,
            "time/rewards": t_rewards - t_rollout,
            "time/logprobs": t_logp - t_rewards,
            "time/loss_backward": t_loss,
            "time/optimizer": t_opt,
            "step_time_s": t_end - t0,
        }
        # the total (weighted sum) and each function's own score: a total of 1.0 may be format 1 + accuracy 0
        samples = [{"prompt": _short(rows[i // G][cfg.prompt_column]), "completion": texts[i], "reward": totals[i],
                    "rewards": {n: t[i] for n, t in zip(self.rewards.names, table)}}
                   for i in range(0, min(B, cfg.log_completions * G), G)]
        return {"metrics": metrics, "samples": samples}

    @property
    def epoch(self) -> float:
        """Passes over the training prompts so far, as TRL's fractional `epoch` (its value at a rollout's end)."""
        return self.cursor.epochs_done

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self, rows=None) -> dict[str, float]:
        """Held-out accuracy (mean of the accuracy reward) and format rate over sampled completions of
        `rows` (a list of dicts, a datasets.Dataset, or a path / builtin:<task> as eval_dataset), else of
        the trainer's eval dataset."""
        from r1fast.trainer.evaluate import evaluate_accuracy

        if rows is not None:
            rows = self._rows(rows, self.cfg.seed + 1, "eval")
        elif self.eval_rows:
            rows = self.eval_rows
        else:   # it returned {}: a notebook's explicit call looked like a silent success
            raise ValueError("GRPOTrainer.evaluate: no held-out rows; pass them (evaluate(rows)) or give the trainer "
                             "an eval_dataset (or config.eval_dataset)")
        cfg = self.cfg
        return evaluate_accuracy(self.model, self.tokenizer, rows, samples_per_prompt=cfg.eval_samples_per_prompt,
                                 temperature=cfg.eval_temperature, max_tokens=cfg.max_completion_length,
                                 seed=self._seed(1, 0), prompt_column=cfg.prompt_column,
                                 answer_column=cfg.answer_column, system_prompt=cfg.system_prompt, engine=self.engine,
                                 max_prompt_length=cfg.max_prompt_length, format_pattern=cfg.format_pattern,
                                 chat_template_kwargs=cfg.chat_template_kwargs, stop_tokens=cfg.stop_tokens,
                                 stop_option=self.stop_option)

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self) -> str:
        state = {
            "stage": self.stage,
            "rollout_index": self.rollout_index,
            "data": self.cursor.state(),
            "nonfinite_skipped": self.nonfinite_skipped,
            "num_tokens": self.num_tokens,
            "config": self.cfg.to_json_dict(),
            "data_sha256": self.data_sha256,
            **saved_loss_scale(self.loss_scale),
            "metrics_window": self.metrics_window,
        }
        if self._final_eval is not None:
            state["final_eval"] = self._final_eval
        write_extra = None
        if self.ref_model is not None:
            def write_extra(folder):
                # inside the checkpoint before it is renamed into place and older ones are pruned: written
                # after, a failed write left the newest checkpoint without a loadable reference model
                save_safetensors(self.ref_model, os.path.join(folder, "reference.safetensors"))
        return ckpt.save_checkpoint(self.run_dir, self.global_step, model=self.model, optimizer=self.optimizer,
                                    scheduler=self.scheduler, tokenizer=self.tokenizer, state=state,
                                    keep=self.cfg.save_total_limit, write_extra=write_extra)

    def load(self, path: str):
        check_counters = resume_check(self.cursor, {"rollout_index": None, "nonfinite_skipped": 0,
                                                     "num_tokens": 0})

        def check(state):
            check_counters(state)
            window = state.get("metrics_window", [])   # absent in a checkpoint of an earlier r1fast
            if not isinstance(window, list) or not all(isinstance(r, dict) and all(
                    v is None or isinstance(v, (int, float)) for v in r.values()) for r in window):
                raise ValueError(f"metrics_window is {window!r:.80}, not a list of metrics (name -> number)")
        state = ckpt.load_checkpoint(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                     check=check)
        self.global_step = state["global_step"]
        self.rollout_index = state["rollout_index"]
        self.cursor.load_state(state["data"])
        self.nonfinite_skipped = state.get("nonfinite_skipped", 0)
        # absent in a checkpoint of an earlier r1fast: counted from the resume on
        self.num_tokens = state.get("num_tokens", 0)
        if self.loss_scale is not None:
            self.loss_scale.load_state_dict(state.get("loss_scale"))
        self.metrics_window = state.get("metrics_window", [])
        final_eval = state.get("final_eval")
        self._final_eval = final_eval if isinstance(final_eval, dict) else None
        if self.ref_model is not None:
            ref_file = os.path.join(path, "reference.safetensors")
            if not os.path.isfile(ref_file):
                raise ValueError(f"checkpoint {path!r} has no reference.safetensors but beta > 0 needs the reference model")
            from safetensors.torch import load_model

            try:
                load_model(self.ref_model, ref_file, device=str(self.device))
            except Exception as e:   # SafetensorError (truncated file) or missing/unexpected keys
                raise ValueError(f"checkpoint {path!r}: cannot load reference.safetensors: {e}") from None
        if self._engine is not None:
            self._engine.reset_prefix_cache()
        return state

    # -- the loop --------------------------------------------------------------------------------
    def train(self, resume: str | bool | None = None, callback: Optional[Callable[[int, dict], None]] = None) -> dict:
        with ckpt.own_run_folder(self.run_dir):  # one run per folder at a time
            return self._train(resume, callback)

    def _train(self, resume, callback) -> dict:
        cfg = self.cfg
        logger, pbar, resume_path = start_run(self, resume)
        result: dict[str, Any] = {}
        with stoppable_run(self, logger, pbar):
            if self.eval_rows and self.eval_at_ends and not resume_path:
                ev = self.evaluate()
                logger.log(self.step_offset + self.global_step, self.stage, ev)
                result["initial"] = ev
            last_saved = self.global_step
            while self.global_step < self.total_steps:
                before = self.global_step
                self._final_eval = None   # a resumed run that goes on past its old end evaluates it again
                out = self.step()
                m = out["metrics"]
                step = self.global_step
                eval_now = cfg.eval_steps and self.eval_rows and (step // cfg.eval_steps) > (before // cfg.eval_steps) \
                    and step < self.total_steps
                self.metrics_window.append({k: plain_number(v) for k, v in m.items()})
                ev = self.evaluate() if eval_now else {}
                m.update(ev)
                self.history.append({"step": step, **m})
                if (step // cfg.logging_steps) > (before // cfg.logging_steps) or step >= self.total_steps:
                    logger.log(self.step_offset + step, self.stage, {**window_metrics(self.metrics_window), **ev})
                    self.metrics_window = []
                    if cfg.log_completions:
                        logger.log_completions(self.step_offset + step, self.stage, out["samples"])
                elif ev:   # not a logging step: the evaluation is logged on its own
                    logger.log(self.step_offset + step, self.stage, ev)
                if pbar is not None:
                    pbar.set_postfix(reward=f"{m['reward']:.3f}", kl=f"{m.get('kl', 0.0):.4f}",
                                     len=f"{m['completion_length']:.1f}", tok_s=f"{m['tokens_per_s']:.0f}")
                    pbar.update(step - before)
                if callback is not None:
                    callback(step, m)
                if cfg.save_steps and (step // cfg.save_steps) > (before // cfg.save_steps) and step < self.total_steps:
                    self.save()
                    last_saved = step
                if self._stop_requested:
                    path = self.save() if last_saved != step else ckpt.latest_checkpoint(self.run_dir)
                    print(f"\nr1fast: interrupted at step {step}; resumable checkpoint: {path}")
                    result["interrupted"] = True
                    break
            else:
                if self.eval_rows and self.eval_at_ends:
                    if self._final_eval is None:   # else resuming a finished run: logged already
                        self._final_eval = self.evaluate()
                        logger.log(self.step_offset + self.global_step, self.stage, self._final_eval)
                    result["final"] = self._final_eval
                result["checkpoint"] = self.save()
        result.update(global_step=self.global_step, nonfinite_skipped=self.nonfinite_skipped, run_dir=self.run_dir)
        return result


# statistics combined over micro-batches and iterations by min / max (the rest are token means, but for
# _MICRO_BATCH_MEANS)
_EXTREMES = {"is_weight/min": min, "is_weight/max": max}
# TRL's clip_ratio/low_min and high_max: each loss call (a micro-batch of one pass) logs the extreme over its
# sequences, and a logged line is the mean of those calls that have one. A min over the passes, as r1fast took,
# was 0 whenever num_iterations > 1: the first pass trains on the policy that sampled, where nothing clips
_MICRO_BATCH_MEANS = ("clip_ratio/low_min", "clip_ratio/high_max")


def micro_batch_indices(num_completions: int, size: int) -> list[list[int]]:
    """A rollout's completions 0..num_completions-1 in micro-batches of `size`, in order (the last may be short)."""
    return [list(range(i, min(i + size, num_completions))) for i in range(0, num_completions, size)]


def accumulation_scale(loss_type: str, num_micro: int) -> float:
    """What each micro-batch's loss is multiplied by: loss types normalised per micro-batch are averaged over the
    accumulation steps; dapo and cispo already divide by the whole generation batch's token count."""
    return 1.0 if loss_type in ("dapo", "cispo") else 1.0 / num_micro


class _MicroBatch(NamedTuple):
    batch: PackedBatch             # the packed prompt + completion tokens
    mask: torch.Tensor             # [completion tokens] 1 where trained (_token_mask)
    active: torch.Tensor           # [completions] each one's trained tokens, for TRL's per-sequence clip fractions
    sampler: Optional[torch.Tensor]  # [completion tokens] the sampler's log-probs, None where any is missing


class MicroBatches:
    """A rollout's training micro-batches on the device, each built when first used and kept for the later
    iterations and passes. Built just before its first forward, a micro-batch's host work (packing ~16k token ids,
    the sampler's log-probs: ~3 ms at 32 completions of 512 tokens) runs while the GPU still works on the
    micro-batch before; built all at once after the rollout (~50 ms at 64 x 8 such completions), the GPU waited."""

    def __init__(self, micro: list[list[int]], p_ids, c_ids, c_logp, keep: list[bool], device, share_prompts: bool):
        self.micro, self.p_ids, self.c_ids, self.c_logp, self.keep = micro, p_ids, c_ids, c_logp, keep
        self.device, self.share_prompts = device, share_prompts
        self._built: list[Optional[_MicroBatch]] = [None] * len(micro)

    def __getitem__(self, j: int) -> _MicroBatch:
        if self._built[j] is None:
            self._built[j] = self._build(self.micro[j])
        return self._built[j]

    def _build(self, idx: list[int]) -> _MicroBatch:
        c_ids, c_logp, keep, device = self.c_ids, self.c_logp, self.keep, self.device
        batch = pack([self.p_ids[i] for i in idx], [c_ids[i] for i in idx], device, share_prompts=self.share_prompts)
        # one mask per micro-batch, made once for all iterations: one per completion was a device fill for each
        # (512 launches a step at 64 x 8) and a cat per micro-batch and iteration
        mask = _token_mask([len(c_ids[i]) for i in idx], [keep[i] for i in idx], device)
        active = torch.tensor([float(len(c_ids[i])) if keep[i] else 0.0 for i in idx], device=device)
        sampler = None
        if all(c_logp[i] is not None and len(c_logp[i]) == len(c_ids[i]) for i in idx):
            sampler = host_tensor([x for i in idx for x in c_logp[i]], torch.float32, device)
        return _MicroBatch(batch, mask, active, sampler)


def _token_mask(lengths: list[int], keep: list[bool], device) -> torch.Tensor:
    """float32 [sum(lengths)]: 1 at every token of a kept completion, 0 at the others'."""
    if all(keep):
        return torch.ones(sum(lengths), device=device)
    return torch.cat([torch.full((n,), 1.0 if k else 0.0) for n, k in zip(lengths, keep)]).to(device)


# TRL's clip shares: of the trained tokens at token level; at sequence level (one ratio per sequence) of the
# sequences, as TRL's means of its (B, 1) flags, a sequence without trained tokens counted (ratio 1). Under
# cispo TRL logs its cispo_clip_ratio alone
_CLIP_MEANS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
_SEQUENCES = "#sequences"   # _loss_backward's count of a pass's sequences, at sequence level


def _count_of(name: str) -> str:
    """The key under which _loss_backward counts the micro-batches that have a value of `name` (_MICRO_BATCH_MEANS)."""
    return name + "#count"


def _clip_statistics(stats: dict, active: torch.Tensor, advantages: torch.Tensor, opts) -> dict[str, torch.Tensor]:
    """One micro-batch's clip statistics from the op's per-row counts, taken out of `stats`: TRL's
    clip_ratio/low_min and high_max, the extremes over its sequences of each one's clipped fraction
    (ops.per_sequence_clip_fractions, as r1fast's TRL drop-in logs them), a sequence without trained tokens left out
    at token level (at sequence level it counts as unclipped, TRL's ratio 1), NaN where no sequence is left (TRL's
    nanmin / nanmax), none under cispo (TRL logs its cispo_clip_ratio alone); and at sequence level the counts of
    its sequences clipped low, high and either (_CLIP_MEANS)."""
    from r1fast import ops

    rows = {k: stats.pop(k) for k in ("rows/clip_low", "rows/clip_high")}
    sequence_level = opts.importance_sampling_level == "sequence"
    if opts.loss_type == "cispo" and not sequence_level:
        return {}
    low, high = ops.per_sequence_clip_fractions(rows, active, advantages, opts)
    out = {}
    if sequence_level:   # 0 or 1 each
        out = {"clip_ratio/low_mean": low.sum(), "clip_ratio/high_mean": high.sum(),
               "clip_ratio/region_mean": (low + high).clamp(max=1.0).sum()}
    if opts.loss_type != "cispo":
        low_min = torch.where(low.isnan(), math.inf, low).min()
        high_max = torch.where(high.isnan(), -math.inf, high).max()
        out["clip_ratio/low_min"] = torch.where(low.isnan().all(), math.nan, low_min)
        out["clip_ratio/high_max"] = torch.where(high.isnan().all(), math.nan, high_max)
    return out


_STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}  # SIGTERM: a scheduler's job end, `kill`
# what Python starts with: a Ctrl-C raises KeyboardInterrupt (SIG_DFL would kill a notebook's kernel outright)
_PYTHON_DEFAULT = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


# the objects whose stop_handlers are open, outermost first: a pipeline's, then its running stage's trainer's
_STOPPABLE: list = []


@contextlib.contextmanager
def stop_handlers(trainer, finishing: Callable[[], str] = lambda: "finishing this step and writing a checkpoint"):
    """While open, the first Ctrl-C or SIGTERM sets trainer._stop_requested: finish the current step, write a
    checkpoint, stop (`finishing` says what is finished: a pipeline's own handler, between its stages, finishes
    other work). Second: stop at once. The handlers before are put back on exit. Opened inside another's (a
    pipeline's stage trainer), a stop is both's: one the pipeline took while the trainer was starting (loading its
    checkpoint) stops the trainer at its first step, and one the trainer took after its last (in its final save)
    stops the pipeline before the next stage; each went unseen by the other, and the run trained on."""
    import threading

    from r1fast.cli import StopRequested, in_an_import, send_again_soon

    if threading.current_thread() is not threading.main_thread():   # only the main thread may set handlers
        yield
        return

    def handler(signum, frame):
        if trainer._stop_requested:
            if in_an_import(frame):   # raised there it aborted the process (Triton's start-up) or was swallowed
                send_again_soon(signum)
                return
            # the command's kind of KeyboardInterrupt: raised in a __del__, Python drops it ("Exception ignored")
            # and the abort went unseen; the command's hook sends that kind again
            raise StopRequested(signum)
        for stoppable in (*_STOPPABLE, trainer):
            stoppable._stop_requested = True
        name = _STOP_SIGNALS[signum]
        print(f"\nr1fast: {name}: {finishing()} ({name} again to abort)", flush=True)

    previous = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS}
    for sig in _STOP_SIGNALS:
        signal.signal(sig, handler)
    if any(getattr(outer, "_stop_requested", False) for outer in _STOPPABLE):
        trainer._stop_requested = True
    _STOPPABLE.append(trainer)
    try:
        yield
    finally:
        _STOPPABLE.pop()   # this one: opened last, closed first
        for sig, before in previous.items():
            # None: a handler installed from C, which Python cannot put back; Python's own then, since leaving
            # ours would keep turning signals into stop requests of a trainer whose run has ended
            signal.signal(sig, _PYTHON_DEFAULT[sig] if before is None else before)


@contextlib.contextmanager
def stoppable_run(trainer, logger, pbar):
    """A trainer's loop under the stop handlers; an abort says what --resume continues from, and the log and
    progress bar are closed however it ends."""
    trainer._stop_requested = False   # a stop asked of an earlier train() call is done: it must not end this one
    try:
        with stop_handlers(trainer):
            yield
    except KeyboardInterrupt:
        say_what_is_kept(trainer)
        raise
    finally:
        if pbar is not None:
            pbar.close()
        logger.close()


# how a logged line combines its window's rollouts (any other metric: their mean, as TRL logs them)
_WINDOW_LAST = ("lr", "nonfinite_skipped", "loss_scale", "num_tokens", "epoch")   # rates, scales and running totals
_WINDOW_MAX = ("completion_length_max", "completions/max_terminated_length", "is_weight/max")
_WINDOW_MIN = ("completion_length_min", "completions/min_terminated_length", "is_weight/min")


def window_metrics(window: Sequence[dict]) -> dict[str, Any]:
    """One logged line for the rollouts since the last one: each metric's mean over the rollouts that have
    it (a NaN or null left out), the extremes' max / min, and lr, the skip count, the loss scale, num_tokens and
    epoch as the last one's."""
    keys = list(dict.fromkeys(k for row in window for k in row))
    out: dict[str, Any] = {}
    for k in keys:
        # the window holds an inf as the log's +-1e308 (plain_number: a checkpoint's JSON has no inf); read back as
        # inf, a window [inf, 1, 1] is inf (it was 3.3e307) and [inf, 2, -inf] NaN (it was 0)
        values = [unlogged_number(row[k]) for row in window if k in row]
        numbers = _scored(values)
        if k in _WINDOW_LAST:
            out[k] = values[-1]
        elif k in _WINDOW_MAX + _WINDOW_MIN:
            out[k] = (max if k in _WINDOW_MAX else min)(numbers) if numbers else float("nan")
        else:
            out[k] = _nanmean(values)
    return out


def _scored(xs) -> list[float]:
    """xs as floats, without the rows that have no value (None, or NaN: a reward function's unscored row)."""
    return [float(x) for x in xs if x is not None and not math.isnan(float(x))]


def _nanmean(xs) -> float:
    vals = _scored(xs)
    return sum(vals) / len(vals) if vals else float("nan")


def _nanstd(xs) -> float:
    """The sample (Bessel-corrected) std of the scored values; NaN (logged null) for fewer than two, as TRL's
    nanstd: 0 there pulled a logged line's mean over its rollouts down where TRL's leaves the rollout out."""
    vals = _scored(xs)
    if len(vals) < 2:
        return float("nan")
    m = sum(vals) / len(vals)
    return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def _frac_zero_std(totals, G) -> float:
    """TRL's share of the groups whose scored rewards have std 0 (torch.isclose: within 1e-8; the float mean of
    G copies of 0.1 or 0.7 is not always that value to the last bit). A group of fewer than two scored rewards
    has no std (TRL's nanstd is NaN there), so it is not counted, though its advantages are 0 too."""
    groups = [totals[i:i + G] for i in range(0, len(totals), G)]
    return sum(1 for g in groups if _nanstd(g) <= 1e-8) / max(len(groups), 1)


def _terminated_lengths(c_ids, finish) -> dict[str, float]:
    """TRL's lengths of the completions that ended on their own (not cut at max_completion_length): they
    tell whether the model is learning to stop. With none, NaN (logged null), where TRL writes 0."""
    lengths = [len(c) for c, f in zip(c_ids, finish) if f != "length"]
    if not lengths:
        return dict.fromkeys(("completions/mean_terminated_length", "completions/min_terminated_length",
                              "completions/max_terminated_length"), float("nan"))
    return {"completions/mean_terminated_length": sum(lengths) / len(lengths),
            "completions/min_terminated_length": float(min(lengths)),
            "completions/max_terminated_length": float(max(lengths))}


def _short(prompt) -> str:
    s = prompt if isinstance(prompt, str) else str(prompt[-1].get("content", prompt)) if isinstance(prompt, list) else str(prompt)
    return s if len(s) <= 200 else s[:200] + "…"


def _apply_config_to_model(model, cfg: GRPOConfig) -> None:
    """The config's fp8 and device options for a model passed in as an object (a path or builtin:
    name is loaded with them): fp8 is applied unless the model already went through apply_fp8 (a
    different mode there is an error). (An explicit device is checked against the model's in model_from_argument.)"""
    report, wanted = getattr(model, "fp8_report", None), cfg.fp8_options()
    # The same options already fell back on this device (from_pretrained / r1fast train loaded the model
    # with them): trying again would only repeat the Fp8FallbackWarning.
    fell_back_here = report is not None and report.options == wanted and report.fallback_reason is not None \
        and report.device == model.device
    if wanted.mode != "off" and not fell_back_here and (report is None or not report.converted):  # no FP8 layer yet
        from r1fast.fp8 import apply_fp8

        apply_fp8(model, wanted)
    elif wanted.mode != "off" and report.options != wanted:
        def says(o):
            return f"fp8={o.mode!r}" + "".join(f", fp8_{k}={v!r}" for k, v in
                                               (("recipe", o.recipe), ("scaling", o.scaling), ("grad_dtype", o.grad_dtype)) if v)
        raise ConfigError(f"the config asks for {says(wanted)} but the model was already converted with "
                          f"{says(report.options)}; pass a high-precision model or use the same options")
