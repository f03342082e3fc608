"""Held-out accuracy: sample completions for held-out prompts, score them with the accuracy and
format rewards. With temperature > 0 and k samples per prompt this is R1's pass@1 estimate; with k > 1
the same samples also give pass@k (any of the k correct) and cons@k (R1's majority vote)."""
from __future__ import annotations

import math
import numbers
from types import SimpleNamespace
from typing import Optional, Sequence

from r1fast.data.loading import (decode_completion, encode_prompts, prompt_limit, resolve_stop_tokens, row_name,
                                 stop_token_ids, warn_unstopped_turn_end)
from r1fast.trainer.common import (assistant_turn, check_model_and_tokenizer, check_prompt_room, dataset_rows,
                                   gold_column, model_from_argument)


def check_eval_answers(rows: Sequence[dict], answer_column: str, where: str):
    """eval/accuracy needs reference answers: a missing column, or rows whose answers are all missing or
    empty (each is left out), is an error naming `where`, not an accuracy of 0.0 that measured nothing. A row
    is scored against its `solution` where its answer is missing, as the accuracy reward reads it. Every row is read,
    so a row's boolean answer is an error naming its row, file line and column before any sampling (as a training
    set's bad row is named), not "a reference answer holds the boolean True" for the first row, or the accuracy
    reward's error after sampling, naming a sample's index as the row."""
    from r1fast.rewards.builtin import row_golds

    column = gold_column(rows, answer_column)
    if column not in rows[0]:
        raise ValueError(f"{where} lack the answer column {column!r}; they have {sorted(rows[0])}")
    # read as the accuracy reward reads a row: its solution only where its answer holds none
    found = [row_golds(r.get(answer_column), f"{where}: {row_name(rows, i)}: column {answer_column!r}") or
             row_golds(r.get("solution"), f"{where}: {row_name(rows, i)}: column 'solution'")
             for i, r in enumerate(rows)]
    if not any(found):
        raise ValueError(f"{where}: no row has a reference answer in column {column!r} (all missing or "
                         f"empty): there is no accuracy to measure")


def evaluate_accuracy(model, tokenizer, rows, *, samples_per_prompt: int = 1, temperature: float = 1.0,
                      max_tokens: int = 256, seed: int = 0, prompt_column: str = "prompt",
                      answer_column: str = "answer", system_prompt: Optional[str] = None, engine=None,
                      return_samples: bool = False, max_prompt_length: Optional[int] = None,
                      format_pattern: Optional[str] = None, chat_template_kwargs: Optional[dict] = None,
                      stop_tokens: Optional[Sequence[str]] = None, stop_option: str = "stop_tokens"):
    """`rows`: a list of dicts, a datasets.Dataset, or a path / builtin:<task> (its test / validation / eval
    split, as an eval_dataset). `max_prompt_length`: prompts keep their last that many tokens, at most the model's
    positions less one (as a GRPO run's training prompts do); without it, a prompt that leaves the model no room
    for an answer is an error. `format_pattern`: what eval/format counts as well formed (the format reward's;
    default <think>…</think><answer>…</answer>).
    `chat_template_kwargs`: for the tokenizer's apply_chat_template (Qwen3's enable_thinking), as in training.
    `stop_tokens`: tokens (as text) a completion also stops at, as in training; `stop_option` is the option
    that gave them, named by the errors and warnings. `seed`: the sampling's, and for a builtin:<task> the
    draw's: the prompts a GRPO run with config seed `seed` holds out as its builtin: eval_dataset.
    `model` may be a name, as for rejection_sample: a local Hugging Face folder (a checkpoint) or builtin:<size>,
    loaded in float32 on CUDA when present, else the CPU, with its own tokenizer unless `tokenizer` is given."""
    from r1fast.data.loading import EVAL_SPLITS
    from r1fast.rollout import Engine, SamplingParams

    if isinstance(rows, list) and not rows:
        raise ValueError("evaluation: no held-out rows")
    # checked before the model loads, by their own names: the sampler's "SamplingParams: n must be an int >= 1"
    # named neither, and came after a model name had been loaded
    for name, value in (("samples_per_prompt", samples_per_prompt), ("max_tokens", max_tokens)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"evaluation: {name} must be a whole number >= 1; got {value!r:.40}")
    samples_per_prompt, max_tokens = int(samples_per_prompt), int(max_tokens)   # numpy's as Python's
    # a name is loaded as rejection_sample and the trainers load it (a name, or a model without its tokenizer,
    # failed deep in the prompt encoding with "'NoneType' object is not callable")
    model, tokenizer = model_from_argument(model, tokenizer, SimpleNamespace(device=None, dtype="float32", seed=seed))
    check_model_and_tokenizer(model, tokenizer, "evaluation")
    # a path or builtin: as the trainers' eval_dataset: a builtin: task's GRPOConfig.eval_size (64) prompts, drawn
    # as a GRPO run of config seed `seed` draws them (seed + 1). It was drawn with seed 0 whatever the seed; with
    # `seed` itself it would be that run's first training prompts.
    rows = dataset_rows(rows, "evaluation: held-out", split=None, seed=seed + 1, default_splits=EVAL_SPLITS,
                        n_builtin=64)
    check_eval_answers(rows, answer_column, "evaluation: held-out rows")
    # capped as a GRPO run caps its prompts, and the warning of cut prompts names what caps them: a
    # max_prompt_length above the model's positions was named though the positions had cut them
    cap, limit = (None, "") if max_prompt_length is None else \
        prompt_limit(max_prompt_length, model.config.max_sequence_length)
    prompt_ids = encode_prompts(tokenizer, rows, prompt_column, system_prompt, cap, chat_template_kwargs,
                                "evaluation: held-out rows", limit)
    check_prompt_room(prompt_ids, model.config.max_sequence_length, "evaluation")
    extra_stops = resolve_stop_tokens(tokenizer, stop_tokens, stop_option)
    ends = stop_token_ids(tokenizer, model.eos_token_ids, extra_stops)   # the engine stops at the model's eos too
    warn_unstopped_turn_end(tokenizer, ends, stop_option, chat_template_kwargs)
    if engine is None:
        engine = Engine(model, max_model_len=min(model.config.max_sequence_length,
                                                 max(map(len, prompt_ids)) + max_tokens))
    was_training = model.training
    model.eval()
    params = SamplingParams(n=samples_per_prompt, temperature=temperature, max_tokens=max_tokens,
                            stop_token_ids=stop_token_ids(tokenizer, extra=extra_stops), seed=seed)
    results = engine.generate(prompt_ids, params)
    engine.reset_prefix_cache()
    model.train(was_training)
    texts, lengths = [], []
    for res in results:
        for c in res.completions:
            texts.append(decode_completion(tokenizer, c.token_ids, ends))
            lengths.append(len(c.token_ids))
    n = samples_per_prompt
    prompts = [r[prompt_column] for r in rows for _ in range(n)]
    answers = [r.get(answer_column) for r in rows for _ in range(n)]
    solutions = [r.get("solution") for r in rows for _ in range(n)]   # a row's reference where its answer is missing
    # scored as GRPO's rewards score them: a prefilled answer's message with its prefill
    out, acc = score_completions(prompts, [assistant_turn(p, t) for p, t in zip(prompts, texts)], answers, n,
                                 format_pattern, solutions)
    out.update({"eval/completion_length": sum(lengths) / len(lengths), "eval/num_samples": len(texts)})
    if return_samples:
        return out, [{"prompt": p if isinstance(p, str) else str(p), "completion": t, "accuracy": a}
                     for p, t, a in zip(prompts, texts, acc)]
    return out


def score_completions(prompts: Sequence, texts: Sequence[str], answers: Sequence, samples_per_prompt: int,
                      format_pattern: Optional[str] = None,
                      solutions: Optional[Sequence] = None) -> tuple[dict, list[Optional[float]]]:
    """The evaluation's scores of given completions, one per sample, each prompt's `samples_per_prompt`
    next to each other: eval/accuracy (mean over the samples with a reference), eval/format (over all),
    and with k = samples_per_prompt > 1 eval/pass@k and eval/cons@k (means over the prompts with a
    reference). `solutions`: each sample's `solution`, its reference where its answer is missing. Returns them
    and each sample's accuracy (None: no reference)."""
    from r1fast.rewards import accuracy_reward, make_format_reward

    k = samples_per_prompt
    acc = accuracy_reward(prompts, texts, answer=answers, solution=solutions)
    fmt = make_format_reward(format_pattern)(prompts, texts)
    scored = [a for a in acc if a is not None]
    out = {"eval/accuracy": sum(scored) / max(len(scored), 1), "eval/format": sum(fmt) / len(fmt)}
    if k > 1:
        groups = [range(i, i + k) for i in range(0, len(texts), k) if acc[i] is not None]
        passes = [pass_at_k(k, sum(acc[j] == 1.0 for j in g), k) for g in groups]
        votes = [acc[g.start + majority_index([texts[j] for j in g], [acc[j] == 1.0 for j in g])] == 1.0
                 for g in groups]
        out[f"eval/pass@{k}"] = sum(passes) / max(len(passes), 1)
        out[f"eval/cons@{k}"] = sum(votes) / max(len(votes), 1)
    return out, acc


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from n samples of which c are correct (Chen et al., 2021): the chance
    that k of them drawn without replacement hold at least one correct, 1 - C(n-c, k) / C(n, k)."""
    # math.comb's own "'float' object cannot be interpreted as an integer" named none of them
    if any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in (n, c, k)):
        raise ValueError(f"pass@k needs whole numbers n, c and k; got n={n!r:.20}, c={c!r:.20}, k={k!r:.20}")
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_index(texts: Sequence[str], correct: Sequence[bool]) -> int:
    """The index of the sample whose final answer wins cons@k's majority vote among `texts`, given which
    samples the accuracy reward scored correct.

    A sample's answer is its final answer as the accuracy reward extracts it. The correct answers are one
    vote: each matched the reference by the reward's `answers_match`. A wrong answer votes with the wrong
    answers of the same `vote_key` (the same number, plain or in LaTeX: 0.5, 1/2, \\frac{1}{2} and \\dfrac{2}{4};
    one variable given the same number: x = 5 and x=5.0; the same words: Yes and yes.; else the same text, LaTeX's
    spacing and style aside), so no math-verify call is added to the evaluation; wrong answers equal only to
    math-verify (x+1, 1+x) vote apart. The largest vote wins; among equally large ones, the one whose first sample
    came first. The index is that vote's first sample. A sample without an answer never wins unless no sample has one
    (then sample 0)."""
    from r1fast.rewards.builtin import completion_text, extract_answer, final_part, vote_key

    votes: dict = {}   # vote -> [its first sample, its count]
    for i, (t, ok) in enumerate(zip(texts, correct)):
        answer = extract_answer(final_part(completion_text(t)))
        if answer is not None:
            votes.setdefault("correct" if ok else vote_key(answer), [i, 0])[1] += 1
    if not votes:
        return 0
    first, _ = max(votes.values(), key=lambda v: (v[1], -v[0]))
    return first


def k_sample_scores(ev: dict) -> dict[str, float]:
    """An evaluation's pass@k and cons@k, named without the `eval/` prefix ({} when k = 1)."""
    return {key[len("eval/"):]: v for key, v in ev.items() if key.startswith(("eval/pass@", "eval/cons@"))}


def describe_eval(ev: dict) -> str:
    """accuracy, then the format rate, pass@k and cons@k, and the sample count, those an evaluation has:
    "0.750 (format 0.950, pass@4 0.900, cons@4 0.800, 64 samples)". `r1fast train` and the pipeline
    print it alike."""
    extra = ([f"format {ev['eval/format']:.3f}"] if "eval/format" in ev else []) \
        + [f"{name} {v:.3f}" for name, v in k_sample_scores(ev).items()] \
        + ([f"{ev['eval/num_samples']} samples"] if "eval/num_samples" in ev else [])
    return f"{ev['eval/accuracy']:.3f}" + (f" ({', '.join(extra)})" if extra else "")
