"""Answer matching's guard against math-verify's rounding of tiny numbers, inside structures; percentages against
LaTeX; 16-bit float golds."""
import random

import pytest

from r1fast.rewards import accuracy_reward, answers_match


def _accuracy(answer, gold):
    return accuracy_reward(["p"], [f"<think>x</think><answer>{answer}</answer>"], answer=[gold])[0]


def _tiny_pair():
    """Two numbers below a millionth, further apart than 0.1%, as LaTeX: math-verify takes them for one."""
    m, e = random.randrange(11, 99) / 10, random.randrange(-40, -8)
    other = round(m + random.choice([-1, 1]) * random.randrange(2, 9) / 10, 1)
    return f"{m} \\times 10^{{{e}}}", f"{other} \\times 10^{{{e}}}", f"{m}e{e}"


def test_tiny_numbers_apart_in_a_structure_are_different_answers():
    # math-verify rounds numbers to 6 places and chops tiny differences: (1, 6.6 \\times 10^{-27}) scored 1 against
    # (1, 7.7 \\times 10^{-27}), and so did sets, intervals, matrices, inequalities and sums holding them
    pytest.importorskip("math_verify")
    value, other, _ = _tiny_pair()
    k = random.randrange(2, 9)
    shapes = [lambda v: f"({k}, {v})", lambda v: f"\\{{{v}, {k}\\}}", lambda v: f"[{v}, {k}]", lambda v: f"({v}, {k}]",
              lambda v: f"x + {v}", lambda v: f"x^2 - {k}x + {v}", lambda v: f"y \\le {v}", lambda v: f"x = {v}, y = {k}",
              lambda v: f"\\begin{{pmatrix}} {v} \\\\ {k} \\end{{pmatrix}}", lambda v: f"\\{{({k}, {v}), (1, 2)\\}}"]
    for shape in shapes:
        a, b = shape(value), shape(other)
        assert not answers_match(a, b) and not answers_match(b, a), (a, b)
        assert answers_match(a, shape(value)), a


def test_the_guard_in_a_structure_keeps_right_matches():
    # the same numbers written otherwise, math-verify's own rounding of larger ones, a set in another order, a relation
    # turned round, and expressions that are one value though their coefficients differ
    pytest.importorskip("math_verify")
    value, _, _ = _tiny_pair()
    k = random.randrange(2, 9)
    for a, b in ((f"({k}, {value})", f"({k}, {value})"), (f"\\{{{value}, {k}\\}}", f"\\{{{k}, {value}\\}}"),
                 (f"({k}, 0.333333)", f"({k}, \\frac{{1}}{{3}})"), (f"\\{{0.5, {k}\\}}", f"\\{{{k}, \\frac{{1}}{{2}}\\}}"),
                 ("x + \\frac{1}{4}", "x + 0.25"), (f"{value} > y", f"y < {value}"),
                 ("x + y = 2x + 2y", "2x + 2y = 4x + 4y"), ("\\sin^2 x + \\cos^2 x + 1", "2\\sin^2 x + 2\\cos^2 x"),
                 (f"[0.785398, {k}]", f"[\\frac{{\\pi}}{{4}}, {k}]")):
        assert answers_match(a, b) and answers_match(b, a), (a, b)


def test_a_percentage_against_latex_is_its_number_or_its_hundredth(with_math_verify):
    # against a plain number a percentage was its number or its hundredth, against a LaTeX fraction whatever math-verify
    # made of it: 0.00002\\% matched \\frac{1}{10^7} (its rounding, which the guard was off for with a % sign); and a thin
    # space before the sign (siunitx's 25\\,\\%) made it no percentage: 0 against 0.25, though 1 against 25
    p = random.randrange(1, 99)
    for space in ("\\,", "~", "\\;", " "):
        assert _accuracy(f"{p}{space}\\%", str(p / 100)) == _accuracy(f"{p}{space}\\%", str(p)) == 1.0, space
        assert _accuracy(f"{p + 1}{space}\\%", str(p / 100)) == 0.0, space
    if not with_math_verify:
        return
    for a, b in ((f"{p}\\%", f"\\frac{{{p}}}{{100}}"), (f"{p}\\%", f"\\frac{{{p}}}{{1}}"), ("33.333333\\%", "\\frac{1}{3}"),
                 (f"{p}\\,\\%", f"\\frac{{{p}}}{{100}}"), ("0.0001\\%", "\\frac{1}{10^{6}}")):
        assert _accuracy(a, b) == _accuracy(b, a) == 1.0, (a, b)
    for a, b in ((f"{p + 1}\\%", f"\\frac{{{p}}}{{100}}"), ("0.00002\\%", "\\frac{1}{10^{7}}"), ("0.0002\\%", "\\frac{1}{10^{6}}")):
        assert _accuracy(a, b) == _accuracy(b, a) == 0.0, (a, b)


def test_a_float16_gold_is_the_number_it_prints_as(with_math_verify):
    # a float16 column reaches the reward as a double: 0.1 was 0.0999755859375, which the answer 0.1 did not match;
    # float32's rule wrote it as 0.09997559
    import numpy as np
    import torch

    def digits(x):
        return len(repr(x).split("e")[0].replace("-", "").replace(".", "").strip("0"))

    # the number it prints as (0.123 is 0.1229 in float16), one whose double has more digits than a float32 holds (a
    # shorter one, 3.140625 for 3.14, cannot be told from an exact gold such as 201/64, and stays as it is)
    d = 0.5
    while digits(float(np.float16(d))) <= 9:
        d = float(str(np.float16(round(random.uniform(0.01, 0.99), random.randrange(1, 4)))))
    x = np.float16(d)
    for gold in (float(x), x, np.array([x]), torch.tensor(d, dtype=torch.float16), [float(x)]):
        assert _accuracy(str(d), gold) == 1.0, (d, gold)
        assert _accuracy(str(round(d + 0.01, 3)), gold) == _accuracy(str(-d), gold) == 0.0, (d, gold)
    # with its dtype known (a numpy or torch format) any float16 or bfloat16 value is, and so is the value itself
    big = round(random.uniform(1, 1000), 1)
    for dtype, printed in ((np.float16, str(np.float16(big))), (torch.bfloat16, None)):
        gold = np.array([big], dtype=dtype) if printed else torch.tensor([big], dtype=dtype)
        # bfloat16: the fewest digits that torch reads back as the value
        printed = printed or next(t for t in (f"{gold.item():.{n}g}" for n in range(1, 9))
                                  if torch.tensor([float(t)], dtype=dtype).item() == gold.item())
        exact = float(gold.tolist()[0])
        assert _accuracy(printed, gold) == _accuracy(repr(exact), gold) == 1.0, (printed, exact, gold)
        assert _accuracy(str(round(exact + 7, 1)), gold) == 0.0, (exact, gold)
    assert _accuracy("0.15625", np.array([0.15625], dtype=np.float16)) == _accuracy("0.1", torch.tensor(0.1).bfloat16()) == 1.0


def test_a_16_bit_gold_with_its_dtype_matches_its_exact_value_of_any_length(with_math_verify):
    # the exact value was accepted only where it has at most 9 digits: float16's 3.6 is 3.599609375 (10), which scored
    # 0 against its own gold, as did every float16 value in (-4, 4) off a 9-digit grid and small bfloat16 values
    # (test_a_float16_gold_is_the_number_it_prints_as drew such a gold in about 1 run in 300)
    import numpy as np
    import torch

    for gold in (np.array([3.6], dtype=np.float16), torch.tensor([-1.1], dtype=torch.float16), np.float16(0.3),
                 torch.tensor([1e-4], dtype=torch.bfloat16), torch.tensor(3.7, dtype=torch.bfloat16)):
        exact = float(gold.tolist()[0] if gold.ndim else gold.tolist())
        assert _accuracy(repr(exact), gold) == 1.0, (exact, gold)
        # not any number near it: the next float16 up, and the value a millionth off
        up = float(np.nextafter(np.float16(exact), np.float16(np.inf)))
        assert _accuracy(repr(up), gold) == _accuracy(repr(exact * (1 + 1e-6)), gold) == 0.0, (exact, gold)


def test_a_set_of_numbers_is_looked_up_sorted_as_each_against_each_would():
    # each member against each made a right answer of 120 numbers run out of math-verify's 3 s (score 0): a set of
    # numbers is sorted and each member looked up once; the verdict is the one each against each gives
    from r1fast.rewards.matching import _unmatched_value

    def brute(values, others):
        return any(all(abs(x - y) > 1e-3 * max(abs(x), abs(y)) for y in others) for x in values)

    for _ in range(2000):
        n = random.randrange(1, 8)
        values = [random.choice([-1, 1]) * random.uniform(0.5, 2) * 10.0 ** random.randrange(-30, 3) for _ in range(n)]
        others = [v * random.choice([1, 1 + random.uniform(-2e-3, 2e-3), -1, 2]) for v in values]
        random.shuffle(others)
        assert _unmatched_value(values, others) == brute(values, others), (values, others)
