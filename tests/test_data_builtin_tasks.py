"""The built-in tasks' rows (r1fast/data/tasks.py): held-out sets of different prompts, drawn from the seed."""
import ast
import itertools
import os
import random
import re
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
    # a smaller held-out set of the seed is the larger's start (evaluate_accuracy's 64 prompts, a GRPO run's eval_size)
    assert list(load_rows(spec, n_builtin=64, seed=seed, default_splits=EVAL_SPLITS)) == list(held[:64])
    assert list(load_rows(spec, n_builtin=128, seed=seed)) == plain   # a training draw is as it was


def test_a_split_named_for_a_builtin_task_is_refused_as_for_a_single_file(tmp_path):
    # `r1fast sample dataset=builtin:arithmetic dataset_split=test` sampled the training draw without a word, while a
    # .jsonl file's dataset_split=test was an error
    from r1fast.cli import main
    from r1fast.trainer.config import GRPOConfig

    spec = "builtin:arithmetic?min_terms=3&max_terms=3"
    for split in ("test", "validation"):
        with pytest.raises(ValueError, match=rf"^dataset '{re.escape(spec)}' is generated and has no splits, so split "
                                             rf"'{split}' cannot be taken from it; leave the split out"):
            load_rows(spec, split=split, n_builtin=8, seed=0)
    assert list(load_rows(spec, split="train", n_builtin=8, seed=0)) == builtin_rows(spec, 8, 0)
    with pytest.raises(ValueError, match="is generated and has no splits"):   # a held-out read too
        load_rows(spec, split="test", n_builtin=8, seed=0, default_splits=EVAL_SPLITS)
    with pytest.raises(SystemExit, match="r1fast sample: dataset .* is generated and has no splits"):
        main(["sample", "model_name_or_path=builtin:micro", f"dataset={spec}", "dataset_split=test",
              f"output_file={tmp_path / 'o.jsonl'}", "progress_bar=false"])
    assert not (tmp_path / "o.jsonl").exists()
    assert GRPOConfig(eval_dataset=spec, eval_dataset_split="test").eval_dataset_split == "test"   # found at the read
    # a pipeline's stage says so as the pipeline loads, not once the stages before it have trained
    from r1fast.trainer.config import ConfigError
    from r1fast.trainer.pipeline import load_pipeline

    with pytest.raises(ConfigError, match=r"^command line: stage 'grpo': dataset: dataset 'builtin:.*' is generated "
                                          r"and has no splits, so split 'test'"):
        load_pipeline(DEFAULT_YAML, [f"output_dir={tmp_path}", "grpo.dataset_split=test"])
    with pytest.raises(ConfigError, match=r"eval_dataset: dataset 'builtin:arithmetic' is generated and has no splits"):
        load_pipeline(DEFAULT_YAML, [f"output_dir={tmp_path}", "grpo.eval_dataset=builtin:arithmetic",
                                     "grpo.eval_steps=1", "grpo.eval_dataset_split=validation"])


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
    seed = random.randrange(2**32)
    rows = builtin_rows(spec, len(every), seed, distinct=True)
    assert len(every) == 40 and sorted(r["prompt"] for r in rows) == sorted(every)
    for n in (5, 9, 33):   # a smaller set is its start, though this one drew every 2-term prompt
        assert builtin_rows(spec, n, seed, distinct=True) == rows[:n]
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


def _value(expression: str) -> int:
    """An arithmetic prompt's value, read by Python's own parser: a chain of + and - of whole numbers."""
    def value(node) -> int:
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left - right
        assert isinstance(node, ast.Constant) and type(node.value) is int, ast.dump(node)
        return node.value
    return value(ast.parse(expression, mode="eval").body)


def _check_arithmetic_row(row: dict, task: ArithmeticTask):
    """The row's gold is its prompt's value, and its completion a chain of the prompt's own steps, each exact where
    the task has no teacher noise (else off by at most one, the next step carrying on from it), ending on an answer
    that is the chain's (off by at most one with answer noise)."""
    prompt = row["prompt"]
    assert re.fullmatch(r"\d+([+-]\d+)+=", prompt), prompt
    terms, signs = [int(t) for t in re.findall(r"\d+", prompt)], re.findall(r"[+-]", prompt)
    assert task.min_terms <= len(terms) <= task.max_terms and all(1 <= t <= task.max_operand for t in terms), prompt
    assert row["answer"] == str(_value(prompt[:-1])), row
    chain = re.fullmatch(r"<think>(.*)</think><answer>(-?\d+)</answer>", row["completion"])
    assert chain, row
    steps = chain.group(1).split(" ")
    assert len(steps) == len(terms) - 1, row
    shown = terms[0]
    for step, sign, term in zip(steps, signs, terms[1:]):
        assert step.startswith(f"{shown}{sign}{term}="), (step, row)
        got = int(step.split("=")[1])
        assert got - (shown + term if sign == "+" else shown - term) in ((-1, 0, 1) if task.teacher_noise else (0,)), (step, row)
        shown = got
    assert int(chain.group(2)) - shown in ((-1, 0, 1) if task.answer_noise else (0,)), row


_ROW_CHECKS = {"arithmetic": _check_arithmetic_row}


def _random_arithmetic_spec(rng: random.Random) -> str:
    low = rng.randint(2, 6)
    params = {"min_terms": low, "max_terms": rng.randint(low, low + rng.choice([0, 1, 3])),
              "max_operand": rng.choice([1, 2, 3, 9, 12, 100]), "teacher_noise": rng.choice([0.0, 0.3, 0.999]),
              "answer_noise": rng.choice([0.0, 0.5])}
    kept = {k: v for k, v in params.items() if k in ("min_terms", "max_terms") or rng.random() < 0.7}
    return "builtin:arithmetic?" + "&".join(f"{k}={v}" for k, v in kept.items())


_RANDOM_SPECS = {"arithmetic": _random_arithmetic_spec}


def _task_of(spec: str):
    from r1fast.data.tasks import TASKS

    name, query = spec.split(":", 1)[1].split("?", 1)
    params = {k: float(v) if "." in v else int(v) for k, v in (p.split("=") for p in query.split("&"))}
    return TASKS[name](**params)


def test_every_builtin_tasks_rows_have_the_gold_an_independent_reading_of_the_prompt_gives():
    # every task of TASKS: one added without a check of its own here fails this test until it has one
    from r1fast.data.tasks import TASKS

    assert set(_ROW_CHECKS) == set(TASKS) == set(_RANDOM_SPECS)
    rng = random.Random()
    for name in TASKS:
        for _ in range(40):
            spec = _RANDOM_SPECS[name](rng)
            task, seed = _task_of(spec), rng.randrange(2**32)
            rows = load_rows(spec, n_builtin=rng.choice([1, 30, 300]), seed=seed)
            held = rng.choice([1, 30, 128])
            try:
                rows += load_rows(spec, n_builtin=held, seed=seed + 1, default_splits=EVAL_SPLITS)
            except ValueError as e:   # only a task of fewer prompts than asked for
                assert "different prompts asked for, but its parameters make only" in str(e), (spec, held)
            for row in rows:
                _ROW_CHECKS[name](row, task)


_DRAWS = """
import hashlib, json, sys
from r1fast.data import load_rows
from r1fast.data.loading import EVAL_SPLITS
digest = hashlib.sha256()
for spec, seed in json.loads(sys.argv[1]):
    digest.update(json.dumps([list(load_rows(spec, n_builtin=200, seed=seed)),
                              list(load_rows(spec, n_builtin=40, seed=seed, default_splits=EVAL_SPLITS))]).encode())
print(digest.hexdigest())
"""


def test_a_builtin_draw_is_the_same_in_another_process_whatever_its_hash_seed():
    # a seed names its rows: the pipeline's resume and the held-out prompts kept out of training rely on a draw
    # being the same in every process, so nothing of it may follow str's per-process hash (set or dict order)
    import json
    import subprocess
    import sys

    rng = random.Random()
    # a held-out draw of 40 needs 40 different prompts: max_operand 9 with two terms already makes 162
    draws = json.dumps([(re.sub(r"max_operand=[123](?=&|$)", "max_operand=9", _RANDOM_SPECS["arithmetic"](rng)),
                         rng.randrange(2**32)) for _ in range(4)])
    digests = set()
    for hash_seed in ("0", "1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", _DRAWS, draws], capture_output=True, text=True, env=env,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        digests.add(out.stdout.strip())
    assert len(digests) == 1, digests


def test_a_pipelines_builtin_held_out_set_is_kept_out_of_every_stages_rows_for_random_seeds_and_sizes(tmp_path):
    from r1fast.trainer.pipeline import PipelineRunner, load_pipeline

    rng = random.Random()
    for _ in range(8):
        low, high, largest = rng.randint(2, 4), 4, rng.choice([3, 5, 9])
        held_spec = f"builtin:arithmetic?min_terms={low}&max_terms={high}&max_operand={largest}"
        prompts = sum(largest ** k * 2 ** (k - 1) for k in range(low, high + 1))
        size = rng.randint(1, min(prompts - 1, 300))
        train_spec = f"builtin:arithmetic?min_terms={rng.randint(2, low)}&max_terms={high}&max_operand={largest}"
        spec = load_pipeline(DEFAULT_YAML, [
            f"output_dir={tmp_path}", f"seed={rng.randrange(2**30)}", f"eval_dataset={held_spec}",
            f"eval_size={size}", f"cold_start.dataset={train_spec}&answer_noise=0.2",
            f"cold_start.num_rows={rng.choice([50, 3000])}", f"grpo.dataset={held_spec}",
            f"grpo.num_rows={rng.choice([50, 500])}"])
        runner = PipelineRunner(spec)
        held = [r["prompt"] for r in runner.eval_rows()]
        assert len(held) == size == len(set(held)), (held_spec, size)
        for i, stage in enumerate(spec.stages):
            try:
                rows = runner.stage_rows(stage, i, ("prompt",))
            except ValueError as e:   # a draw of held-out prompts alone (few prompts, most of them held out)
                assert "every training prompt is also a held-out prompt" in str(e)
                continue
            assert rows and not set(held) & {r["prompt"] for r in rows}, (held_spec, size, train_spec)
