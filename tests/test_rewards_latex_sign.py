"""A minus sign written outside the math delimiters around a final box, and other answer forms a math grader meets."""
import random
from fractions import Fraction

from r1fast.rewards import accuracy_reward, answers_match, extract_answer
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


def test_one_number_written_in_latex_or_plain_is_one_vote(with_math_verify):
    # \frac{1}{2}, \dfrac{1}{2}, 0.5 and 1/2 matched (through math-verify) but were four cons@k votes; without
    # math-verify \frac{1}{2} scored 0 against 0.5
    p, q = random.randint(1, 999), random.choice([2, 4, 5, 8, 16, 20, 25, 40, 125])
    d = random.randint(501, 998)   # above any p/q: no value of the groups below is another's
    for group in ((f"\\frac{{{p}}}{{{q}}}", f"\\dfrac{{{p}}}{{{q}}}", f"\\tfrac{{{p}}}{{{q}}}", f"{p}/{q}", repr(p / q),
                   f"\\frac{{{3 * p}}}{{{3 * q}}}", f"$\\frac{{{p}}}{{{q}}}$",
                   f"\\displaystyle\\frac{{{p}}}{{{q}}}", f"\\frac{{{p}}}{{{q}}}."),
                  (f"-\\frac{{{p}}}{{{q}}}", f"\\frac{{-{p}}}{{{q}}}", f"\\frac{{{p}}}{{-{q}}}", f"-{p}/{q}"),
                  (f"{d}^\\circ", f"{d}^{{\\circ}}", f"{d}\u00b0", str(d)), ("\\frac12", "\\dfrac{1}{2}", "0.5"),
                  (f"{p}\\!{d:03}", f"{p}{d:03}"),
                  (f"x = \\frac{{{p}}}{{{q}}}", f"x={p}/{q}", f"x = {p / q}", f"$x = \\dfrac{{{p}}}{{{q}}}$"),
                  (f"\\dfrac{{\\sqrt{{{p}}}}}{{{q}}}", f"\\frac{{\\sqrt{{{p}}}}}{{{q}}}")):
        assert len({vote_key(a) for a in group}) == 1, group
        assert all(answers_match(a, b) for a in group for b in group), group
    # answers that differ stay apart: another value, another variable, a variable's case, a mixed number, a bare value
    # against a variable given it (5 matches x = 5 and y = 5, which do not match each other)
    differ = (f"\\frac{{{p}}}{{{q}}}", f"\\frac{{{p + 1}}}{{{q}}}", f"-\\frac{{{p}}}{{{q}}}",
              f"x = \\frac{{{p}}}{{{q}}}",
              f"y = \\frac{{{p}}}{{{q}}}", f"X = \\frac{{{p}}}{{{q}}}", f"x = \\frac{{{p}}}{{{q + 1}}}",
              f"\\frac{{\\sqrt{{{p}}}}}{{{q}}}", f"{d}^\\circ", f"{d + 1}", f"2\\frac{{1}}{{{q + 1}}}")
    assert len({vote_key(a) for a in differ}) == len(differ)
    for a, b in ((f"\\frac{{{p}}}{{{q}}}", f"\\frac{{{p + 1}}}{{{q}}}"), (f"x = {p}", f"y = {p}"),
                 (f"x = {p}", f"X = {p}"),
                 (f"{d}^\\circ", f"{d + 1}"), (f"\\frac{{{p}}}{{0}}", "0")):
        assert not answers_match(a, b) and not answers_match(b, a), (a, b)
    assert vote_key(f"\\frac{{{p}}}{{0}}") != vote_key("0")


def test_a_repeating_decimal_is_the_fraction_it_equals(with_math_verify):
    # math-verify read 0.\overline{3} as 0: it scored 1 against the gold 0 and against 0.\overline{4}, 0 against 1/3
    whole, fixed, period = random.randint(0, 99), random.randint(0, 9), random.randint(1, 8)
    q = 10 * (10 ** len(str(period)) - 1)   # one fixed digit, then the period
    value = Fraction(whole * q + int(f"{fixed}{period}") - fixed, q)
    written = f"{whole}.{fixed}\\overline{{{period}}}"
    for gold in (f"\\frac{{{value.numerator}}}{{{value.denominator}}}", f"{value.numerator}/{value.denominator}",
                 f"{whole}.{fixed}{period}\\overline{{{period}{period}}}"):
        assert accuracy_reward([""], [f"so \\boxed{{{written}}}"], answer=[gold]) == [1.0], (written, gold)
        assert vote_key(written) == vote_key(gold), (written, gold)
    negative = f"-{value.numerator}/{value.denominator}"
    assert accuracy_reward([""], [f"so \\boxed{{-{written}}}"], answer=[negative]) == [1.0]
    for other in (str(whole), f"{whole}.{fixed}", f"{whole}.{fixed}{period}",
                  f"{whole}.{fixed}\\overline{{{period + 1}}}", f"{value.numerator + 1}/{value.denominator}"):
        assert accuracy_reward([""], [f"so \\boxed{{{written}}}"], answer=[other]) == [0.0], (written, other)
        assert accuracy_reward([""], [f"so \\boxed{{{other}}}"], answer=[written]) == [0.0], (written, other)


def test_an_answer_that_is_text_starting_with_a_number_is_that_number_and_its_words(with_math_verify):
    # as text math-verify found no number in \text{5 cm}: it scored 0 against 5 and 5\text{ cm}
    n = random.randint(2, 10**5)
    for written in (f"\\text{{{n} cm}}", f"\\mbox{{{n} cm}}", f"$\\text{{{n} cm}}$", f"\\textrm{{ {n} cm }}"):
        for gold in (str(n), f"{n}\\text{{ cm}}", f"{n} cm", f"{n / 100} m"):
            assert accuracy_reward([""], [f"so \\boxed{{{written}}}"], answer=[gold]) == [1.0], (written, gold)
            assert accuracy_reward([""], [f"<answer>{gold}</answer>"], answer=[written]) == [1.0], (written, gold)
        for gold in (str(n + 1), f"{n} mm", f"{n} kg"):
            assert accuracy_reward([""], [f"so \\boxed{{{written}}}"], answer=[gold]) == [0.0], (written, gold)
        assert vote_key(written) == vote_key(f"{n} cm")
    assert vote_key(f"\\text{{{n}}}") == vote_key(str(n)) == vote_key(f"\\text{{{n}.0}}")
    assert vote_key(f"\\text{{-{n}}}") == vote_key(f"-{n}")
    if with_math_verify:   # prose after a number is read by math-verify
        assert accuracy_reward([""], [f"\\boxed{{\\text{{{n} apples}}}}"], answer=[str(n)]) == [1.0]
        assert accuracy_reward([""], [f"\\boxed{{\\text{{{n} apples}}}}"], answer=[str(n + 1)]) == [0.0]
    # words stay words: a choice, a name
    assert answers_match("\\text{(B)}", "B") and not answers_match("\\text{(B)}", "C")


def test_a_variable_given_a_number_matches_that_number(with_math_verify):
    # math-verify compares x = 5 by its value; without it \boxed{x = 5} scored 0 against 5
    n, p, q = random.randint(2, 10**6), random.randint(1, 99), random.choice([2, 4, 5, 8])
    for answer, gold in ((f"x = {n}", str(n)), (f"\\boxed{{x={n}}}", f"{n}.0"),
                         (f"k = \\frac{{{p}}}{{{q}}}", repr(p / q)), (f"\\theta = {n}^\\circ", str(n)),
                         (f"$y = -{n}$", f"-{n}")):
        assert accuracy_reward([""], [f"so \\boxed{{{answer}}}"], answer=[gold]) == [1.0], (answer, gold)
        assert accuracy_reward([""], [f"so \\boxed{{{gold}}}"], answer=[answer]) == [1.0], (answer, gold)
    for answer, gold in ((f"x = {n}", str(n + 1)), (f"x = {n}", f"y = {n}"), (f"X = {n}", f"x = {n}"),
                         (f"x = {n}, y = {n}", str(n)), (f"x = -{n}", str(n))):
        assert accuracy_reward([""], [f"so \\boxed{{{answer}}}"], answer=[gold]) == [0.0], (answer, gold)


def test_a_temperature_is_its_number_on_its_scale(with_math_verify):
    # math-verify dropped \text{C} and read a bare C as a variable: 30^\circ\text{C} scored 1 against 30^\circ\text{F},
    # and 30^{\circ}C 0 against 30 and against 30^{\circ}\mathrm{C}
    n = random.randint(-273, 5000)
    celsius = (f"{n}^{{\\circ}}C", f"{n}^\\circ C", f"{n}^{{\\circ}}\\mathrm{{C}}", f"{n}^\\circ\\text{{ C}}",
               f"{n} °C",
               f"{n}\u2103", f"${n}\\,^{{\\circ}}\\mathrm{{~C}}$", f"{n}\\degree C")
    for a in celsius:
        for b in celsius + (str(n), f"{n}^\\circ", f"{n}.0"):
            assert accuracy_reward([""], [f"so \\boxed{{{a}}}"], answer=[b]) == [1.0], (a, b)
            assert accuracy_reward([""], [f"so \\boxed{{{b}}}"], answer=[a]) == [1.0], (a, b)
        assert vote_key(a) == vote_key(celsius[0]), a
        for other in (f"{n}^\\circ F", f"{n}^{{\\circ}}\\text{{F}}", f"{n}\u2109", f"{n} °K", f"{n + 1}^\\circ C",
                      str(n + 1)):
            assert accuracy_reward([""], [f"so \\boxed{{{a}}}"], answer=[other]) == [0.0], (a, other)
            assert accuracy_reward([""], [f"so \\boxed{{{other}}}"], answer=[a]) == [0.0], (a, other)
            assert vote_key(a) != vote_key(other), (a, other)
