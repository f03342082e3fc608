"""Rejection sampling (R1 §2.3.3): n samples per prompt, keep those whose rewards pass the thresholds.

The kept rows ({prompt, completion, <the dataset's other columns>, rewards}) are the SFT data of
the next stage; sampled from a teacher and trained into a smaller model they are distillation data.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Callable, Optional, Sequence

from r1fast.data.loading import (check_columns, check_prompts, continues_answer, decode_completion, encode_prompt,
                                 prefilled_think, stop_token_ids)
from r1fast.rewards import RewardSet
from r1fast.trainer.common import check_answer_column, check_prompt_room, reward_columns, reward_completions
from r1fast.trainer.config import ConfigError, SampleConfig
from r1fast.trainer.metrics import replacing


def rejection_sample(model, tokenizer, rows: Sequence[dict], cfg: SampleConfig, *, progress: bool = True,
                     should_stop: Optional[Callable[[], bool]] = None,
                     resume_from: Optional[dict] = None) -> tuple[list[dict], dict]:
    """→ (kept rows, statistics). `should_stop` is asked after each batch of prompts: when it says
    yes, the statistics hold `next_prompt`, where `resume_from` ({"next_prompt", "rows", "stats"}
    of the stopped call) continues. Each batch's seed depends on its position alone, so the
    continued call keeps what the uninterrupted one would."""
    from r1fast.rollout import Engine, SamplingParams

    cfg.validate()
    if not rows:
        raise ValueError("rejection sampling: the prompt dataset is empty")
    check_columns(rows, (cfg.prompt_column,), "rejection sampling: dataset")
    rows = list(rows if cfg.max_prompts < 0 else rows[:cfg.max_prompts])
    check_prompts(rows, cfg.prompt_column, tokenizer, cfg.system_prompt, "rejection sampling: dataset",
                  cfg.chat_template_kwargs)
    rewards = RewardSet(cfg.reward_funcs, format_pattern=cfg.format_pattern, language=cfg.language)
    check_answer_column(rewards.names, rows, cfg.answer_column, "prompt dataset")
    thresholds = cfg.reward_thresholds or [1.0] * len(rewards)
    prompt_ids = [encode_prompt(tokenizer, r[cfg.prompt_column], cfg.system_prompt,
                                chat_template_kwargs=cfg.chat_template_kwargs) for r in rows]
    check_prompt_room(prompt_ids, model.config.max_sequence_length, "rejection sampling")
    # Capped at the model's positions, as in GRPO and evaluation: a sample reaching it ends as "length".
    max_model_len = min(model.config.max_sequence_length, max(map(len, prompt_ids)) + cfg.max_completion_length)
    engine = Engine(model, max_num_seqs=max(256, cfg.num_samples), max_model_len=max_model_len)
    stops = stop_token_ids(tokenizer)
    ends = stop_token_ids(tokenizer, model.eos_token_ids)   # the engine stops at the model's eos too
    # a template that opens <think> for the model (R1-Distill's): its samples start inside the block. The kept
    # completion is the assistant's whole turn, opening included, so a student whose template does not open
    # it learns to (SFT leaves it out again for a template that does).
    opening = prefilled_think(tokenizer, cfg.chat_template_kwargs)
    kept: list[dict] = list(resume_from["rows"]) if resume_from else []
    done = resume_from["stats"] if resume_from else {}
    n_total, n_pass, n_cut = done.get("samples", 0), done.get("passed", 0), done.get("truncated", 0)
    prompts_with_any = done.get("prompts_kept", 0)
    first = resume_from["next_prompt"] if resume_from else 0
    stopped_at = None
    model.eval()
    bar = None
    if progress:
        from r1fast.progress import progress as progress_bar

        # the prompts sampled before a resume as the start, not as done now: they made the rate and time left wrong
        bar = progress_bar(len(rows), "sample", unit="prompts", initial=first)
    for start in range(first, len(rows), cfg.batch_prompts):
        chunk = rows[start:start + cfg.batch_prompts]
        params = SamplingParams(n=cfg.num_samples, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                max_tokens=cfg.max_completion_length, stop_token_ids=stops,
                                seed=(cfg.seed * 1_000_003 + start) % (2**31 - 1))
        results = engine.generate(prompt_ids[start:start + len(chunk)], params)
        texts, ids, owners, cut = [], [], [], []
        for i, res in enumerate(results):
            for comp in res.completions:
                texts.append(decode_completion(tokenizer, comp.token_ids, ends))
                ids.append(list(comp.token_ids))
                owners.append(i)
                cut.append(comp.finish_reason == "length")
        prompts = [chunk[i][cfg.prompt_column] for i in owners]
        columns = reward_columns(chunk, owners, cfg.prompt_column, cfg.answer_column)
        # the same arguments as in GRPO: a reward function written for `r1fast train` works here
        table = rewards.score(prompts, reward_completions(prompts, texts), columns, completion_ids=ids)
        per_prompt: dict[int, list[dict]] = {}
        seen: dict[int, set] = {}
        for j, text in enumerate(texts):
            n_total += 1
            n_cut += cut[j]
            # SFT appends eos to a completion: one cut at max_completion_length would teach stopping mid-thought
            if cut[j] and not cfg.keep_truncated:
                continue
            values = [t[j] for t in table]
            if not all(v is None or v >= th for v, th in zip(values, thresholds)):
                continue
            n_pass += 1
            i = owners[j]
            if text in seen.setdefault(i, set()) or len(per_prompt.get(i, [])) >= cfg.keep_per_prompt:
                continue
            seen[i].add(text)
            row = {k: v for k, v in chunk[i].items() if k != "completion"}
            row["completion"] = ("" if continues_answer(chunk[i][cfg.prompt_column]) else opening) + text
            row["rewards"] = dict(zip(rewards.names, values))
            per_prompt.setdefault(i, []).append(row)
        prompts_with_any += len(per_prompt)
        for i in sorted(per_prompt):
            kept.extend(per_prompt[i])
        if bar is not None:
            bar.set_postfix(pass_rate=f"{n_pass / max(n_total, 1):.2f}", kept=len(kept))
            bar.update(len(chunk))
        if should_stop is not None and should_stop() and start + len(chunk) < len(rows):
            stopped_at = start + len(chunk)
            break
    if bar is not None:
        bar.close()
    stats = {"prompts": len(rows), "samples": n_total, "truncated": n_cut, "passed": n_pass,
             "pass_rate": n_pass / max(n_total, 1), "kept": len(kept), "prompts_kept": prompts_with_any}
    if stopped_at is not None:
        stats["next_prompt"] = stopped_at
    return kept, stats


def summary(stats: dict) -> str:
    """One line for the console from rejection_sample's statistics."""
    cut = stats["truncated"]
    return (f"kept {stats['kept']} of {stats['samples']} samples from {stats['prompts']} prompts (pass rate "
            f"{stats['pass_rate']:.3f}" + (f"; {cut} cut at max_completion_length" if cut else "") + ")")


def _json_value(value):
    """A dataset value JSON has no type for, as JSON: dates and times as ISO text, numpy scalars and
    arrays as numbers and lists, anything else as its text (parquet and HF datasets carry them)."""
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", "replace")
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return str(value)


def check_output_file(path: str, where: str = "output_file"):
    """An output JSONL that cannot be written, found before sampling: write_jsonl found it once every prompt
    was sampled, and the rows were lost. The folders it lacks write_jsonl makes."""
    if os.path.isdir(path):
        raise ConfigError(f"{where} {path!r} is a folder; name the JSONL file to write "
                          f"(e.g. {os.path.join(path, 'samples.jsonl')!r})")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise ConfigError(f"{where} {path!r}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"{where} {path!r}: folder {folder} cannot be written")


def write_jsonl(rows: Sequence[dict], path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with replacing(path) as f:   # half the rows are never left as the output file
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, default=_json_value) + "\n")


# A rejection sampling stopped by Ctrl-C/SIGTERM after a batch of prompts: the rows it kept so far, its
# statistics and the next prompt, in one file (a pipeline's sample stage: <stage folder>/sample_progress.json;
# `r1fast sample`: beside its output file, progress_path(output_file)).
SAMPLE_PROGRESS = "sample_progress.json"


def progress_path(output_file: str) -> str:
    """Where `r1fast sample` keeps a stopped run's progress: beside its output, one file per output."""
    return f"{output_file}.{SAMPLE_PROGRESS}"


def sample_fingerprint(options: dict, prompts: list, settings: dict) -> str:
    """The sampling's options, prompts and settings (model, dtype, device, seed): a stopped sampling's
    kept rows continue only the same sampling."""
    import hashlib

    options = {k: v for k, v in options.items() if k != "progress_bar"}
    return hashlib.sha256(json.dumps([options, prompts, settings], sort_keys=True, default=str).encode()).hexdigest()


def save_progress(path: str, fingerprint: str, kept: list[dict], stats: dict, who: str) -> str:
    """A sampling stopped after a batch of prompts (`stats` hold `next_prompt`): what it kept and where it
    was, in one file written whole (a kill mid-write keeps the earlier one). → the line that says so."""
    n = stats["next_prompt"]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with replacing(path) as f:
        json.dump({"fingerprint": fingerprint, "next_prompt": n, "stats": stats, "rows": kept}, f,
                  ensure_ascii=False, default=_json_value)
    return f"interrupted {who} after {n} of {stats['prompts']} prompts ({len(kept)} samples kept so far, in {path})"


def load_progress(path: str, fingerprint: str, who: str) -> Optional[dict]:
    """What a stopped sampling kept (`save_progress`), when it sampled these prompts with these options:
    rejection_sample's `resume_from`; else None, said: the sampling starts from its first prompt."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            progress = json.load(f)
        usable = progress["fingerprint"] == fingerprint
        n, total, rows = int(progress["next_prompt"]), progress["stats"]["prompts"], len(progress["rows"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        usable, why = False, f"cannot be read ({e})"
    else:
        why = "is for other options or prompts"
    if not usable:
        print(f"r1fast: --resume: {who}: what its stopped run kept ({path}) {why}: it samples from its first prompt",
              file=sys.stderr, flush=True)
        return None
    print(f"r1fast: --resume: {who} continues from prompt {n + 1} of {total} ({rows} samples kept before)", flush=True)
    return progress


def finish_samples(kept: Sequence[dict], path: str, progress_file: str):
    """The whole output, then the stopped run's progress gone (a kill between the two resumes from it and
    writes the same output again)."""
    write_jsonl(kept, path)
    if os.path.exists(progress_file):
        os.remove(progress_file)
