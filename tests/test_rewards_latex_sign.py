"""A minus sign written outside the math delimiters around a final box, and other answer forms a math grader meets."""
import random

from r1fast.rewards import accuracy_reward, extract_answer
from r1fast.rewards.builtin import vote_key


def test_a_minus_sign_just_outside_the_math_around_a_box_is_the_answer_s(with_math_verify):
    n = random.randint(2, 10**6)
    for text in (f"so x is -$\\boxed{{{n}}}$.", f"-$\\boxed{{{n}}}$", f"x = -\\(\\boxed{{{n}}}\\)", f"-\\[\\boxed{{{n}}}\\]",
                 f"-$$\\boxed{{{n}}}$$", f"x = - $\\boxed{{{n}}}$", f"Answer: -$ \\boxed{{{n}}} $", f"x=\u2212$\\boxed{{{n}}}$"):
        assert extract_answer(text) == f"-{n}", text
        assert accuracy_reward([""], [text], answer=[f"-{n}"]) == [1.0], text
        assert accuracy_reward([""], [text], answer=[str(n)]) == [0.0], text
        assert vote_key(extract_answer(text)) == vote_key(f"-{n}"), text   # cons@k's key of the answer
        if with_math_verify or text.startswith("-"):   # an answer that holds more than the box is math-verify's to read
            assert accuracy_reward([""], [f"<answer>{text}</answer>"], answer=[f"-{n}"]) == [1.0], text
    # the delimiter is kept: the answer still reads as math
    assert vote_key(f"-$\\boxed{{{n}}}$") == vote_key(f"-{n}") == vote_key(f"$-\\boxed{{{n}}}$")


def test_a_dash_outside_the_math_around_a_box_that_is_no_sign_is_left_alone(with_math_verify):
    n, m = random.randint(2, 10**6), random.randint(2, 10**6)
    # a difference, a bullet, a dash after a word, a minus in the math span before, a sign between two spans
    for text in (f"{m} - $\\boxed{{{n}}}$", f"{m} -$\\boxed{{{n}}}$", f"- $\\boxed{{{n}}}$", f"Answer - $\\boxed{{{n}}}$",
                 f"a - b = $\\boxed{{{n}}}$", f"$3-$ $\\boxed{{{n}}}$", f"The answer is $-$ $\\boxed{{{n}}}$",
                 f"$x$-$\\boxed{{{n}}}$", f"\\(x\\)-\\(\\boxed{{{n}}}\\)", f"costs -\\$\\boxed{{{n}}}",
                 f"\\\\(\\boxed{{{n}}})"):
        assert extract_answer(text) == str(n), text
        assert accuracy_reward([""], [text], answer=[str(n)]) == [1.0], text
    # a box of more than one term keeps its sign outside
    assert extract_answer(f"-$\\boxed{{x+{n}}}$") == f"x+{n}"
