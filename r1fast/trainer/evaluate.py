"""Held-out accuracy: sample completions for held-out prompts, score them with the accuracy and
format rewards. With temperature > 0 and k samples per prompt this is R1's pass@1 estimate."""
from __future__ import annotations

from typing import Optional, Sequence

from r1fast.data.loading import decode_completion, encode_prompt, stop_token_ids
from r1fast.trainer.common import check_prompt_room, gold_column


def check_eval_answers(rows: Sequence[dict], answer_column: str, where: str):
    """eval/accuracy needs reference answers: a missing column, or rows whose answers are all missing or
    empty (each is left out), is an error naming `where`, not an accuracy of 0.0 that measured nothing."""
    from r1fast.rewards.builtin import gold_text

    answer_column = gold_column(rows, answer_column)
    if answer_column not in rows[0]:
        raise ValueError(f"{where} lack the answer column {answer_column!r}; they have {sorted(rows[0])}")
    if not any(gold_text(x) is not None for r in rows
               for x in (r[answer_column] if isinstance(r[answer_column], (list, tuple)) else [r[answer_column]])):
        raise ValueError(f"{where}: no row has a reference answer in column {answer_column!r} (all missing or "
                         f"empty): there is no accuracy to measure")


def evaluate_accuracy(model, tokenizer, rows: Sequence[dict], *, samples_per_prompt: int = 1, temperature: float = 1.0,
                      max_tokens: int = 256, seed: int = 0, prompt_column: str = "prompt",
                      answer_column: str = "answer", system_prompt: Optional[str] = None, engine=None,
                      return_samples: bool = False, max_prompt_length: Optional[int] = None,
                      format_pattern: Optional[str] = None, chat_template_kwargs: Optional[dict] = None):
    """`max_prompt_length`: prompts keep their last that many tokens (as a GRPO run's training prompts
    do); without it, a prompt that leaves the model no room for an answer is an error. `format_pattern`:
    what eval/format counts as well formed (the format reward's; default <think>…</think><answer>…</answer>).
    `chat_template_kwargs`: for the tokenizer's apply_chat_template (Qwen3's enable_thinking), as in training."""
    from r1fast.rewards import accuracy_reward, make_format_reward
    from r1fast.rollout import Engine, SamplingParams

    rows = list(rows)
    if not rows:
        raise ValueError("evaluation: no held-out rows")
    check_eval_answers(rows, answer_column, "evaluation: held-out rows")
    prompt_ids = [encode_prompt(tokenizer, r[prompt_column], system_prompt, max_prompt_length, chat_template_kwargs)
                  for r in rows]
    check_prompt_room(prompt_ids, model.config.max_sequence_length, "evaluation")
    if engine is None:
        engine = Engine(model, max_model_len=min(model.config.max_sequence_length,
                                                 max(map(len, prompt_ids)) + max_tokens))
    was_training = model.training
    model.eval()
    params = SamplingParams(n=samples_per_prompt, temperature=temperature, max_tokens=max_tokens,
                            stop_token_ids=stop_token_ids(tokenizer), seed=seed)
    results = engine.generate(prompt_ids, params)
    engine.reset_prefix_cache()
    model.train(was_training)
    texts, lengths = [], []
    ends = stop_token_ids(tokenizer, model.eos_token_ids)   # the engine stops at the model's eos too
    for res in results:
        for c in res.completions:
            texts.append(decode_completion(tokenizer, c.token_ids, ends))
            lengths.append(len(c.token_ids))
    n = samples_per_prompt
    prompts = [r[prompt_column] for r in rows for _ in range(n)]
    column = gold_column(rows, answer_column)
    answers = [r.get(column) for r in rows for _ in range(n)]
    acc = accuracy_reward(prompts, texts, answer=answers)
    fmt = make_format_reward(format_pattern)(prompts, texts)
    scored = [a for a in acc if a is not None]
    out = {"eval/accuracy": sum(scored) / max(len(scored), 1), "eval/format": sum(fmt) / len(fmt),
           "eval/completion_length": sum(lengths) / len(lengths), "eval/num_samples": len(texts)}
    if return_samples:
        return out, [{"prompt": p if isinstance(p, str) else str(p), "completion": t, "accuracy": a}
                     for p, t, a in zip(prompts, texts, acc)]
    return out
