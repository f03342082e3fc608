"""Supervised fine-tuning on (prompt, completion) rows: R1's cold start, the SFT on rejection-sampled
data, and distillation of a teacher's samples into a student. The loss is the mean negative
log-likelihood of the completion tokens (prompt tokens are context only), computed with the fused
log-prob op on packed sequences, so the [tokens, vocab] logits are never built."""
from __future__ import annotations

import math
import time
import warnings
from typing import Any, Optional


from r1fast.data.loading import (check_columns, check_prompts, continues_answer, encode_completion, encode_prompt,
                                 prefilled_think, row_name, split_conversations)
from r1fast.trainer import checkpoints as ckpt
from r1fast.trainer.common import (
    start_run,
    step_if_finite,
    DataCursor,
    accumulating_gradients,
    check_model_and_tokenizer,
    dataset_rows,
    model_from_argument,
    resume_check,
    rows_fingerprint,
    make_loss_scale,
    make_optimizer,
    make_scheduler,
    pack,
    prompt_sharing_pays,
    refuse_config_in_trl_place,
    run_dir_for,
    trainer_config_and_tokenizer,
    unscale_and_clip,
    warmup_steps_of,
)
from r1fast.trainer.config import SFTConfig
from r1fast.trainer.loss_scale import saved_loss_scale
from r1fast.trainer.grpo import stoppable_run


class SFTTrainer:
    """`SFTTrainer(model, tokenizer, rows, config).train()`.

    model:      an r1fast CausalLM, or a name as GRPOTrainer takes (builtin:tiny, a local Hugging Face
                folder: loaded with the config's device, dtype and seed, and its tokenizer with it
                unless `tokenizer` is given)
    rows:       (prompt, completion) rows or TRL's `messages` rows: a list of dicts, a datasets.Dataset,
                or a path / builtin:<task>; None: config.dataset. By keyword also `train_dataset=`, the name
                GRPOTrainer and TRL's SFTTrainer give it (TRL's `args=` and `processing_class=` are taken too)
    """

    def __init__(self, model, tokenizer=None, rows=None, config: Optional[SFTConfig] = None, *,
                 train_dataset=None, args: Optional[SFTConfig] = None, processing_class=None,
                 run_dir: Optional[str] = None, stage_name: str = "sft", step_offset: int = 0, **trl_keywords):
        refuse_config_in_trl_place(tokenizer, "the tokenizer argument", "SFTTrainer", "(model, args, ...)",
                                   "(model, tokenizer, rows, config)")
        if train_dataset is not None:
            if rows is not None:
                raise TypeError("SFTTrainer: give the dataset once, as rows or as train_dataset")
            rows = train_dataset
        # TRL's names for two of the arguments, so a TRL script's call ports as it is
        self.cfg, tokenizer = trainer_config_and_tokenizer("SFTTrainer", SFTConfig, instead=(
            "build r1fast.trainer.SFTConfig from the options you set (TRL's names where the meaning is the same; "
            "r1fast/trainer/config.py lists its fields)"),
            config=config, args=args, tokenizer=tokenizer, processing_class=processing_class, trl_keywords=trl_keywords)
        cfg = self.cfg
        # the data before the model: a wrong path is said before a large model has loaded
        rows = dataset_rows(rows if rows is not None else cfg.dataset, "SFT", split=cfg.dataset_split, seed=cfg.seed)
        model, tokenizer = model_from_argument(model, tokenizer, cfg)
        check_model_and_tokenizer(model, tokenizer, "SFTTrainer")
        rows = split_conversations(rows, cfg.prompt_column, cfg.completion_column)
        check_columns(rows, (cfg.prompt_column, cfg.completion_column), "SFT dataset",
                      {cfg.prompt_column: "prompt_column", cfg.completion_column: "completion_column"})
        check_prompts(rows, cfg.prompt_column, tokenizer, cfg.system_prompt, "SFT dataset", cfg.chat_template_kwargs)
        self.model, self.tokenizer, self.device = model, tokenizer, model.device
        self.examples = []
        # never past the model's positions (max_length defaults above a small model's): the rollout engine
        # never generates there, and rotary positions past them are an extrapolation
        limit = min(cfg.max_length, model.config.max_sequence_length)
        prefilled = prefilled_think(tokenizer, cfg.chat_template_kwargs)   # R1-Distill's template opens <think> in the prompt
        cut = []   # (row, tokens, whether the completion loses its end) of the examples past the limit
        for i, r in enumerate(rows):
            try:
                p = encode_prompt(tokenizer, r[cfg.prompt_column], cfg.system_prompt,
                                  chat_template_kwargs=cfg.chat_template_kwargs)
            except ValueError as e:
                raise ValueError(f"SFT dataset: {row_name(rows, i)}: {e}") from None
            try:
                c = encode_completion(tokenizer, r[cfg.completion_column],
                                      "" if continues_answer(r[cfg.prompt_column]) else prefilled)
                if not c:   # no EOS to train on either: said here, not by the first step's packing
                    raise ValueError("the completion is empty and the tokenizer has no EOS token: nothing to train on")
            except ValueError as e:   # its column named: completion_column may be another than the user thinks
                raise ValueError(f"SFT dataset: {row_name(rows, i)}: {e} (column {cfg.completion_column!r})") from None
            # trim the prompt's start to keep the completion whole; a completion of the limit or more
            # keeps one prompt token and loses its end (its EOS with it)
            if len(p) + len(c) > limit:
                cut.append((i, len(p) + len(c), len(c) >= limit))
                p = p[-max(1, limit - len(c)):]
                c = c[:limit - len(p)]
            self.examples.append((p, c))
        if cut:
            _warn_cut_examples(rows, cut, limit, "max_length" if limit == cfg.max_length else "the model's positions")
        self.run_dir = run_dir or run_dir_for(cfg.output_dir, cfg.run_name, "sft")
        self.stage, self.step_offset = stage_name, step_offset
        self.optimizer = make_optimizer(model, cfg)
        self.loss_scale = make_loss_scale(model, self.optimizer)   # float16 only
        per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else \
            max(1, math.ceil(cfg.num_train_epochs * len(self.examples) / per_step))
        self.scheduler = make_scheduler(self.optimizer, cfg.lr_scheduler_type, self.total_steps,
                                        warmup_steps_of(cfg, self.total_steps))
        self.cursor = DataCursor(len(self.examples), cfg.seed)
        self.data_sha256 = rows_fingerprint(rows)   # a resume on other rows is said (option_change_note)
        self.global_step = 0
        self.nonfinite_skipped = 0
        self.loss_window: list[float] = []  # losses of the steps since the last logged one (their mean is logged)
        self.accuracy_window: list[float] = []   # and their mean_token_accuracy, logged the same way
        # TRL's num_tokens: prompt + completion tokens of every example trained on so far (a shared prompt
        # once per completion), cumulative across --resume (saved in the checkpoint)
        self.num_tokens = 0
        self._nonfinite_streak = 0
        self.share_prompts = prompt_sharing_pays(model, cfg.share_prompts)

    def step(self) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        micro = [self.cursor.take(cfg.per_device_train_batch_size) for _ in range(cfg.gradient_accumulation_steps)]
        n_tokens = sum(len(self.examples[i][1]) for idx in micro for i in idx)
        self.num_tokens += sum(len(p) + len(c) for p, c in (self.examples[i] for idx in micro for i in idx))
        total, hits = 0.0, 0
        with accumulating_gradients(self.optimizer):
            for idx in micro:
                loss, correct = self._micro_batch(idx, n_tokens)
                total, hits = total + loss, hits + correct
        gn = unscale_and_clip(self)
        step_if_finite(self, math.isfinite(total) and math.isfinite(gn), loss_finite=math.isfinite(total))
        lr_used = self.scheduler.get_last_lr()[0]   # after scheduler.step() it is the next step's rate
        self.scheduler.step()
        self.global_step += 1
        dt = time.perf_counter() - t0
        scaled = {} if self.loss_scale is None else {"loss_scale": self.loss_scale.scale}
        return {"loss": total, "grad_norm": gn, "lr": lr_used,
                "nonfinite_skipped": self.nonfinite_skipped, **scaled,
                "mean_token_accuracy": hits / n_tokens, "num_tokens": self.num_tokens,
                "epoch": self.cursor.epochs_done,
                "tokens_per_s": n_tokens / max(dt, 1e-9), "step_time_s": dt}

    def _micro_batch(self, idx, n_tokens: int) -> tuple[float, int]:
        """Forward and backward of one micro-batch (examples idx): its share of the step's token-mean loss,
        and how many of its completion tokens are the argmax of their logits (TRL's mean_token_accuracy)."""
        import torch

        from r1fast import ops

        prompts = [self.examples[i][0] for i in idx]
        share = self.share_prompts and len({tuple(p) for p in prompts}) < len(prompts)
        if share:  # completions of one prompt (rejection-sampled or distilled data) side by side: the
            # prompt is packed once, its completions continuing it (the loss is a token sum: order is free)
            idx = sorted(idx, key=lambda i: self.examples[i][0])
            prompts = [self.examples[i][0] for i in idx]
        b = pack(prompts, [self.examples[i][1] for i in idx], self.device, share_prompts=share)
        hidden = b.hidden(self.model)[b.select]
        # the hits come from the running max the log-prob's logsumexp keeps: no second logits product
        logp, hit = ops.grouped_logprob(hidden, self.model.lm_head_weight, b.targets, return_argmax_hit=True)
        loss = -logp.sum() / n_tokens   # token mean over the whole accumulated batch
        (loss if self.loss_scale is None else loss * self.loss_scale.scale).backward()
        # one device->host copy for both (each float()/int() was a sync of its own); float64 holds the
        # loss's value and the hit count exactly
        loss_value, hits = torch.stack([loss.detach().double(), hit.sum().double()]).tolist()
        return loss_value, int(hits)

    def save(self) -> str:
        return ckpt.save_checkpoint(self.run_dir, self.global_step, model=self.model, optimizer=self.optimizer,
                                    scheduler=self.scheduler, tokenizer=self.tokenizer,
                                    state={"stage": self.stage, "data": self.cursor.state(),
                                           "nonfinite_skipped": self.nonfinite_skipped, "config": self.cfg.to_json_dict(),
                                           "data_sha256": self.data_sha256,
                                           "loss_window": self.loss_window,
                                           "accuracy_window": self.accuracy_window,
                                           "num_tokens": self.num_tokens,
                                           **saved_loss_scale(self.loss_scale)},
                                    keep=self.cfg.save_total_limit)

    def load(self, path: str):
        state = ckpt.load_checkpoint(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                     check=resume_check(self.cursor, {"nonfinite_skipped": 0, "num_tokens": 0},
                                                        others_keys={"rollout_index": "GRPO"}))
        self.global_step = state["global_step"]
        self.cursor.load_state(state["data"])
        self.nonfinite_skipped = state.get("nonfinite_skipped", 0)
        # absent in a checkpoint of an earlier r1fast: counted from the resume on
        self.num_tokens = state.get("num_tokens", 0)
        self.loss_window = _numbers(state, "loss_window", path)
        self.accuracy_window = _numbers(state, "accuracy_window", path)
        if self.loss_scale is not None:
            self.loss_scale.load_state_dict(state.get("loss_scale"))
        return state

    def train(self, resume: str | bool | None = None) -> dict[str, Any]:
        with ckpt.own_run_folder(self.run_dir):  # one run per folder at a time
            return self._train(resume)

    def _train(self, resume) -> dict[str, Any]:
        cfg = self.cfg
        logger, pbar, _ = start_run(self, resume)
        interrupted = False
        path, saved_at = None, None   # the last checkpoint written, and its step
        with stoppable_run(self, logger, pbar):
            while self.global_step < self.total_steps:
                m = self.step()
                if math.isfinite(m["loss"]):   # a skipped NaN/inf step (nonfinite_skipped) would void the window's mean
                    self.loss_window.append(m["loss"])
                    self.accuracy_window.append(m["mean_token_accuracy"])
                step = self.global_step
                if step % cfg.logging_steps == 0 or step == self.total_steps:
                    m["loss"], m["mean_token_accuracy"] = _mean(self.loss_window), _mean(self.accuracy_window)
                    self.loss_window, self.accuracy_window = [], []
                    logger.log(self.step_offset + step, self.stage, m)
                if pbar is not None:
                    pbar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}")
                    pbar.update(1)
                if cfg.save_steps and step % cfg.save_steps == 0 and step < self.total_steps:
                    path, saved_at = self.save(), step
                if self._stop_requested:
                    interrupted = True
                    break
            # a stop at a save step has its checkpoint: writing the model a second time only took as long again
            if saved_at != self.global_step:
                path = self.save()
            if interrupted:
                print(f"\nr1fast: interrupted at step {self.global_step}; resumable checkpoint: {path}")
        return {"checkpoint": path, "global_step": self.global_step, "run_dir": self.run_dir,
                "interrupted": interrupted, "nonfinite_skipped": self.nonfinite_skipped}


def _warn_cut_examples(rows, cut: list[tuple[int, int, bool]], limit: int, what: str):
    """Say that examples were cut to `limit` tokens (naming the first), and how many lost their completion's end
    with its EOS: such an example teaches the model to go on where it should stop."""
    first, length, _ = cut[0]
    lost_eos = sum(1 for _, _, completion_cut in cut if completion_cut)
    eos = (f"; {lost_eos} of them loses the end of its completion and its EOS, teaching the model not to stop"
           if lost_eos else "")
    remedy = "raise max_length if the model has the positions, or " if what == "max_length" else ""
    warnings.warn(f"SFT dataset: {len(cut)} of {len(rows)} examples are longer than the {limit} tokens an example "
                  f"keeps ({what}): {row_name(rows, first)} has {length} tokens. Their prompts lose their start{eos}; "
                  f"{remedy}shorten them", stacklevel=3)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _numbers(state: dict, key: str, path: str) -> list[float]:
    """A checkpoint's window of per-step values (absent in one of an earlier r1fast: empty)."""
    window = state.get(key, [])
    if not isinstance(window, list) or not all(isinstance(x, (int, float)) for x in window):
        raise ValueError(f"{path}: {key} is {window!r:.80}, not a list of numbers")
    return [float(x) for x in window]
