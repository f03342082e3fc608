"""The held-out scores (docs/training.md, Held-out evaluation) against an independent computation: pass@k by
enumerating the k-subsets, cons@k by a vote over exact fractions, on random sample sets."""
import itertools
import random
import re
from fractions import Fraction

import pytest

from r1fast.trainer.evaluate import pass_at_k, score_completions

FORMAT = re.compile(r"\s*<think>(?:(?!</?think>).)*</think>\s*<answer>(?:(?!</?(?:think|answer)>).)*</answer>\s*", re.S)


def test_pass_at_k_is_the_share_of_k_subsets_holding_a_correct_sample():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(itertools.combinations([True] * c + [False] * (n - c), k))
                assert pass_at_k(n, c, k) == pytest.approx(sum(map(any, subsets)) / len(subsets), abs=1e-12)
    for n, c, k in ((3, 1, 4), (3, 4, 2), (3, -1, 1), (3, 1, 0)):
        with pytest.raises(ValueError, match="pass@k needs"):
            pass_at_k(n, c, k)


def _sample(rng, value):
    """(completion text, the final answer it gives as a number or None): the forms the accuracy reward reads alike
    (8, 8.0, 8/1, 16/2, \\frac{16}{2}, $\\dfrac{8}{1}$, \\boxed{8}), no answer, and an answer left inside the
    reasoning (not the final one)."""
    kind = rng.random()
    if kind < 0.15:
        return "<think>no answer</think>", None
    if kind < 0.22:
        return f"<think>x <answer>{value}</answer></think>", None
    if kind < 0.3:
        return f"<think>a</think>\\boxed{{{value}}}", value
    if kind < 0.35:
        return f"<think>a</think><answer>{rng.randint(0, 9)}</answer> <answer>{value}</answer>", value
    form = rng.choice([str(value), f"{value}.0", f"{value}/1", f"{2 * value}/2", f"\\frac{{{2 * value}}}{{2}}",
                       f"$\\dfrac{{{value}}}{{1}}$", f"\\boxed{{{value}.}}"])
    return f"<think>a</think><answer>{form}</answer>", value


def _expected(groups, golds, texts, k):
    accuracy, passes, votes = [], [], []
    for values, gold in zip(groups, golds):
        if gold is None:   # no reference: left out of all but eval/format
            continue
        correct = [v is not None and Fraction(v) == gold for v in values]
        accuracy += correct
        passes.append(any(correct))
        counts: dict = {}   # an answer -> its votes, in the order first given (a tie goes to the first)
        for v in values:
            if v is not None:
                counts[Fraction(v)] = counts.get(Fraction(v), 0) + 1
        winner = max(counts, key=counts.get) if counts else None   # max keeps the first of equal counts
        votes.append(winner is not None and winner == gold)
    out = {"eval/accuracy": sum(accuracy) / max(len(accuracy), 1),
           "eval/format": sum(bool(FORMAT.fullmatch(t)) for t in texts) / len(texts)}
    if k > 1:
        out[f"eval/pass@{k}"] = sum(passes) / max(len(passes), 1)
        out[f"eval/cons@{k}"] = sum(votes) / max(len(votes), 1)
    return out


def test_held_out_scores_match_an_independent_count_on_random_sample_sets():
    rng = random.Random(2026)
    for _ in range(400):
        k, prompts = rng.randint(1, 9), rng.randint(1, 5)
        groups, golds, texts, answers = [], [], [], []
        for _ in range(prompts):
            gold = None if rng.random() < 0.15 else rng.randint(0, 4)
            mode = rng.random()   # all right, all wrong, or drawn
            values = []
            for _ in range(k):
                value = (gold or 0) if mode < 0.1 else ((gold or 0) + 1 if mode < 0.2 else rng.randint(0, 4))
                text, given = _sample(rng, value)
                texts.append(text)
                values.append(given)
                answers.append(gold if gold is None or rng.random() < 0.5 else str(gold))
            groups.append(values)
            golds.append(gold)
        out, _ = score_completions([f"q{i // k}" for i in range(len(texts))], texts, answers, k)
        expected = _expected(groups, golds, texts, k)
        assert out.keys() == expected.keys()
        for key, value in expected.items():
            assert out[key] == pytest.approx(value, abs=1e-12), (key, k, golds, groups)


@pytest.mark.parametrize("name, value", [("samples_per_prompt", 0), ("samples_per_prompt", 2.0),
                                         ("samples_per_prompt", True), ("max_tokens", 0), ("max_tokens", "8")])
def test_evaluate_accuracy_names_its_own_bad_count(name, value):
    # "SamplingParams: n must be an int >= 1, got 0" named an argument the caller never passed, after loading the model
    from r1fast.trainer.evaluate import evaluate_accuracy

    rows = [{"prompt": "1+2=", "answer": "3"}]
    with pytest.raises(ValueError, match=rf"evaluation: {name} must be a whole number >= 1; got {value!r}"):
        evaluate_accuracy("builtin:tiny", None, rows, **{name: value})


def test_pass_at_k_names_counts_that_are_not_whole_numbers():
    import numpy as np

    rng = random.Random(5)
    n = rng.randint(4, 40)
    c, k = rng.randint(0, n), rng.randint(1, n)
    assert pass_at_k(np.int64(n), np.int64(c), np.int64(k)) == pass_at_k(n, c, k)
    for args in ((float(n), c, k), (n, float(c), k), (n, c, True)):
        with pytest.raises(ValueError, match="pass@k needs whole numbers n, c and k"):
            pass_at_k(*args)


@pytest.mark.parametrize("math_verify", [True, False], ids=["math_verify", "no_math_verify"])
def test_cons_at_k_counts_one_number_written_otherwise_as_one_vote(math_verify, monkeypatch):
    # the wrong answer 1/2 written three ways (\frac{1}{2}, 0.5, 1/2) was three votes of one, and the two right samples
    # won the vote: cons@5 1.0 where the majority answer was wrong
    import sys

    from r1fast.trainer.evaluate import majority_index

    if not math_verify:
        monkeypatch.setitem(sys.modules, "math_verify", None)
    rng = random.Random()
    p, q = rng.randint(1, 99), rng.choice([2, 4, 5, 8, 20, 25])
    gold = str(rng.randint(100, 999))
    right = [f"<think>a</think><answer>{gold}</answer>"] * 2
    same = [f"\\boxed{{\\frac{{{p}}}{{{q}}}}}", f"\\boxed{{{p / q}}}", f"\\boxed{{\\dfrac{{{2 * p}}}{{{2 * q}}}}}",
            f"<answer>{p}/{q}</answer>"]
    texts = right + [f"<think>b</think>{t}" for t in rng.sample(same, 3)]
    out, _ = score_completions(["q"] * 5, texts, [gold] * 5, 5)
    assert out["eval/cons@5"] == 0.0
    assert majority_index(texts, [True, True, False, False, False]) == 2
    # three different wrong answers: the two right samples win
    differ = [f"\\boxed{{\\frac{{{p}}}{{{q}}}}}", f"\\boxed{{\\frac{{{p + 1}}}{{{q}}}}}", f"\\boxed{{{(p + 2) / q}}}"]
    out, _ = score_completions(["q"] * 5, right + differ, [gold] * 5, 5)
    assert out["eval/cons@5"] == 1.0
