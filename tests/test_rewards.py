"""Each reward function on crafted completions, and the weighted combination's error handling."""
import pytest

from r1fast.rewards import (
    RewardError,
    RewardSet,
    accuracy_reward,
    answers_match,
    extract_answer,
    format_reward,
    make_format_reward,
    make_language_reward,
    make_length_penalty,
)

GOOD = "<think>3+4=7 7-2=5</think><answer>5</answer>"


def test_extract_answer_takes_the_last_answer_then_boxed():
    assert extract_answer("<answer>1</answer> then <answer> 2 </answer>") == "2"
    assert extract_answer("so \\boxed{42}") == "42"
    assert extract_answer("no answer here") is None


@pytest.mark.parametrize("pred,gold,ok", [
    ("5", "5", True), ("5.0", "5", True), ("1/2", "0.5", True), ("1,000", "1000", True),
    ("-3", "-3", True), ("6", "5", False), ("", "5", False),
])
def test_answers_match_numeric(pred, gold, ok):
    assert answers_match(pred, gold) is ok


def test_answers_match_uses_math_verify_for_latex():
    pytest.importorskip("math_verify")
    assert answers_match("\\frac{1}{2}", "0.5")
    assert not answers_match("\\frac{1}{3}", "0.5")


def test_accuracy_reward_crafted():
    comps = [GOOD, "<think>x</think><answer>6</answer>", "5", [{"role": "assistant", "content": GOOD}]]
    got = accuracy_reward(["p"] * 4, comps, answer=["5", "5", "5", "5"])
    assert got == [1.0, 0.0, 0.0, 1.0]
    # a row without a reference abstains; no reference column at all is an error
    assert accuracy_reward(["p"], [GOOD], answer=[None]) == [None]
    with pytest.raises(ValueError, match="answer"):
        accuracy_reward(["p"], [GOOD])


def test_format_reward_crafted():
    comps = [GOOD, "  <think>a\nb</think>\n<answer>c</answer>\n", "<answer>5</answer>", "<think>a</think>",
             GOOD + " trailing"]
    assert format_reward(None, comps) == [1.0, 1.0, 0.0, 0.0, 0.0]
    custom = make_format_reward(r"^Answer: \d+$")
    assert custom(None, ["Answer: 12", GOOD]) == [1.0, 0.0]


def test_language_reward_share_of_target_script():
    fn = make_language_reward("en")
    out = fn(None, ["<think>abcd</think><answer>1</answer>", "<think>ab\u4f60\u597d</think>", "<think>1+2</think>"])
    assert out[0] == 1.0 and out[1] == pytest.approx(0.5) and out[2] is None
    assert make_language_reward("zh")(None, ["<think>\u4f60\u597dab</think>"]) == [pytest.approx(0.5)]
    with pytest.raises(ValueError, match="unknown language"):
        make_language_reward("xx")


def test_length_penalty():
    fn = make_length_penalty(4)
    assert fn(None, ["a", "b", "c"], completion_ids=[[1] * 3, [1] * 6, [1] * 20]) == [0.0, -0.5, -1.0]
    assert fn(None, ["abcdef"]) == [-0.5]


def test_reward_set_weights_and_none():
    def half(prompts, completions, **kw):
        return [0.5 if "5" in c else None for c in completions]

    rs = RewardSet(["accuracy", half], weights=[2.0, 1.0])
    table = rs.score(["p", "p"], [GOOD, "<answer>7</answer>"], {"answer": ["5", "5"]})
    assert table == [[1.0, 0.0], [0.5, None]]
    assert rs.total(table) == [2.5, 0.0]
    only_none = RewardSet([lambda prompts, completions, **kw: [None] * len(completions)])
    t = only_none.total(only_none.score(["p"], ["x"], {}))
    assert t[0] != t[0]  # NaN: no function scored the row


def test_reward_set_names_the_failing_function_and_row():
    def picky(prompts, completions, **kw):
        return [1.0 / (len(c) - 3) for c in completions]   # ZeroDivisionError on a 3-char completion

    rs = RewardSet([picky])
    with pytest.raises(RewardError, match=r"'picky'.*ZeroDivisionError.*row 1"):
        rs.score(["a", "b", "c"], ["abcdef", "xyz", "abcdefg"], {})
    bad_len = RewardSet([lambda prompts, completions, **kw: [1.0]])
    with pytest.raises(RewardError, match="list of 2"):
        bad_len.score(["a", "b"], ["x", "y"], {})
    nan = RewardSet([lambda prompts, completions, **kw: [float("nan")] * len(completions)])
    with pytest.raises(RewardError, match="row 0"):
        nan.score(["a"], ["x"], {})


def test_user_function_by_module_path(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text("def longer(prompts, completions, **kw):\n    return [float(len(c)) for c in completions]\n")
    rs = RewardSet([f"{f}:longer"])
    assert rs.names == [f"{f}:longer"]
    assert rs.score(["p"], ["abc"], {}) == [[3.0]]
    with pytest.raises(ValueError, match="no function 'nope'"):
        RewardSet([f"{f}:nope"])
    with pytest.raises(ValueError, match="cannot import module"):
        RewardSet(["no_such_module_xyz:fn"])
    with pytest.raises(ValueError, match="built-in name"):
        RewardSet(["accurracy"])


def test_user_module_that_fails_to_import_is_a_clear_error(tmp_path, monkeypatch):
    # A SyntaxError or an exception at import time used to escape as a bare traceback.
    (tmp_path / "r1fast_bad_syntax.py").write_text("def f(:\n")
    (tmp_path / "r1fast_raises.py").write_text("raise RuntimeError('no GPU here')\n")
    for name, what in (("r1fast_bad_syntax", "SyntaxError"), ("r1fast_raises", "RuntimeError: no GPU here")):
        with pytest.raises(ValueError, match=f"reward function '.*{name}.py:f'.*raised {what}"):
            RewardSet([f"{tmp_path / name}.py:f"])
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="importing module 'r1fast_raises' raised RuntimeError"):
        RewardSet(["r1fast_raises:f"])


def test_user_module_in_the_working_directory_is_found(tmp_path, monkeypatch):
    # `r1fast train` runs from a console script, whose sys.path lacks the working directory, so
    # "my_rewards:brevity" (as docs/training.md writes it) failed for a my_rewards.py right there.
    import sys

    (tmp_path / "r1fast_cwd_rewards.py").write_text(
        "def brevity(prompts, completions, **kw):\n    return [-float(len(c)) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    rs = RewardSet(["r1fast_cwd_rewards:brevity"])
    assert rs.score(["p"], ["abc"], {}) == [[-3.0]]
    with pytest.raises(ValueError, match="cannot import module 'r1fast_nowhere_xyz'"):
        RewardSet(["r1fast_nowhere_xyz:f"])
