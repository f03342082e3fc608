"""The built-in tasks' rows (r1fast/data/tasks.py): held-out sets of different prompts, drawn from the seed."""
import itertools
import os
import random
from collections import Counter

import pytest

from r1fast.data import load_rows
from r1fast.data.loading import EVAL_SPLITS
from r1fast.data.tasks import ArithmeticTask, builtin_rows

DEFAULT_YAML = os.path.join(os.path.dirname(__file__), "..", "r1fast", "configs", "default.yaml")


def _terms(prompt: str) -> int:
    return prompt.count("+") + prompt.count("-") + 1


def test_the_default_runs_held_out_set_is_128_different_prompts_none_trained_on(tmp_path):
    # it drew 128 prompts with repeats: 125 different ones at the default seed, three of them counted twice
    from r1fast.trainer.pipeline import PipelineRunner

    spec = load_pipeline_at(tmp_path)
    runner = PipelineRunner(spec)
    held = [r["prompt"] for r in runner.eval_rows()]
    assert len(held) == 128 and len(set(held)) == 128
    assert all(_terms(p) == 3 for p in held)   # the task's own difficulty (min_terms=max_terms=3)
    for i, stage in enumerate(spec.stages):
        train = {r["prompt"] for r in runner.stage_rows(stage, i, ("prompt",))}
        assert len(train) > 1000 and not train & set(held)


def load_pipeline_at(tmp_path):
    from r1fast.trainer.pipeline import load_pipeline

    return load_pipeline(DEFAULT_YAML, [f"output_dir={tmp_path}"])


@pytest.mark.parametrize("seed", [3, 199, 12345])
def test_a_held_out_builtin_draw_has_different_prompts_and_is_its_plain_draw_up_to_the_first_repeat(seed):
    spec = "builtin:arithmetic?min_terms=3&max_terms=3"
    plain = builtin_rows(spec, 128, seed)
    held = load_rows(spec, n_builtin=128, seed=seed, default_splits=EVAL_SPLITS)
    prompts = [r["prompt"] for r in held]
    assert len(set(prompts)) == 128
    first_repeat = next(i for i, r in enumerate(plain) if r["prompt"] in {q["prompt"] for q in plain[:i]})
    assert list(held[:first_repeat]) == plain[:first_repeat]   # the same rows until the plain draw repeats
    assert list(load_rows(spec, n_builtin=128, seed=seed, default_splits=EVAL_SPLITS)) == list(held)
    assert list(load_rows(spec, n_builtin=128, seed=seed)) == plain   # a training draw is as it was


def test_a_held_out_draw_keeps_the_tasks_spread_of_term_counts():
    # a repeated prompt is drawn again with its own count of terms: redrawing the whole row would favour the
    # counts with more prompts (here 2 terms have 18 prompts, 4 terms 648), so the held-out set would be harder
    task = ArithmeticTask(min_terms=2, max_terms=4, max_operand=3)
    counts = Counter(_terms(r["prompt"]) for seed in range(200) for r in task.distinct_rows(30, seed))
    assert all(len({r["prompt"] for r in task.distinct_rows(30, seed)}) == 30 for seed in range(0, 200, 20))
    n = sum(counts.values())
    sd = (n * (1 / 3) * (2 / 3)) ** 0.5
    assert all(abs(counts[k] - n / 3) < 3 * sd for k in (2, 3, 4)), counts


def test_a_held_out_draw_of_every_prompt_is_all_of_them_and_one_more_is_refused():
    spec = "builtin:arithmetic?min_terms=2&max_terms=3&max_operand=2"
    every = {f"{a}{o}{b}=" for a, o, b in itertools.product("12", "+-", "12")}
    every |= {f"{a}{o}{b}{p}{c}=" for a, o, b, p, c in itertools.product("12", "+-", "12", "+-", "12")}
    rows = builtin_rows(spec, len(every), seed=random.randrange(2**32), distinct=True)
    assert len(every) == 40 and sorted(r["prompt"] for r in rows) == sorted(every)
    with pytest.raises(ValueError, match=r"^built-in task '.*max_operand=2' as a held-out set: 41 different prompts "
                                         r"asked for, but its parameters make only 40; lower eval_size"):
        builtin_rows(spec, 41, 0, distinct=True)


def test_a_grpo_runs_builtin_held_out_set_has_different_prompts(tmp_path):
    from r1fast.data import build_char_tokenizer
    from r1fast.models import CausalLM, ModelConfig
    from r1fast.trainer import GRPOConfig, GRPOTrainer

    tok = build_char_tokenizer()
    model = CausalLM(ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=64, eos_token_id=tok.eos_token_id,
                                 bos_token_id=tok.bos_token_id))
    cfg = GRPOConfig(dataset="builtin:arithmetic?min_terms=2&max_terms=2", eval_size=150, seed=4,
                     eval_dataset="builtin:arithmetic?min_terms=2&max_terms=2", per_device_train_batch_size=8,
                     num_generations=4, output_dir=str(tmp_path), progress_bar=False)
    tr = GRPOTrainer(model, ["format"], config=cfg, tokenizer=tok)
    held = [r["prompt"] for r in tr.eval_rows]
    assert len(held) == 150 and len(set(held)) == 150   # of the 162 two-term prompts
    assert tr.train_rows and not set(held) & {r["prompt"] for r in tr.train_rows}
