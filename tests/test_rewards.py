"""Each reward function on crafted completions, and the weighted combination's error handling."""
import importlib.util
import sys

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


def test_vote_key_is_shared_only_by_answers_that_match():
    from r1fast.rewards.builtin import vote_key

    same = [("5", "5.0"), ("1/2", ".5"), ("1,000", "1000"), ("$18", "18"), (" x+1 ", "x+1"), ("\\boxed{3}", "3")]
    for a, b in same:
        assert vote_key(a) == vote_key(b) and answers_match(a, b), (a, b)
    assert len({vote_key(a) for a in ("5", "6", "x+1", "1+x", "five", "5x")}) == 6


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
    # a configured pattern must match the whole completion, anchored or not
    loose = make_format_reward(r"<answer>\d+</answer>")
    assert loose(None, ["<answer>5</answer>", "<answer>5</answer> lots of junk", "Answer: 12\n"]) == [1.0, 0.0, 0.0]


def test_word_answers_that_match_are_one_vote():
    # answers_match takes Yes, yes. and \\text{YES} for one answer, vote_key made them three votes: with the gold
    # `no`, samples no, Yes, yes., \\text{YES} gave cons@4 1.0 (a tie of ones, the first sample winning)
    from r1fast.rewards.builtin import vote_key
    from r1fast.trainer.evaluate import majority_index

    for a, b in (("Yes", "yes."), ("\\text{YES}", "yes"), ("B", "b."), ("**True**", "true")):
        assert vote_key(a) == vote_key(b) and answers_match(a, b), (a, b)
    assert len({vote_key(a) for a in ("yes", "no", "\\text{no}", "\\frac{1}{2}", "")}) == 4
    texts = [f"<answer>{a}</answer>" for a in ("no", "Yes", "yes.", "\\text{YES}")]
    assert majority_index(texts, [True, False, False, False]) == 1


def test_a_variable_s_case_is_part_of_the_answer(with_math_verify):
    # math-verify lowercases every symbol and bare text was compared case aside: x+1 and X+1, 2x and 2X, a_n and A_n,
    # \\sqrt{x} and \\sqrt{X}, \\Delta and \\delta each scored 1 (and were one cons@k vote)
    from r1fast.rewards.builtin import vote_key

    for a, b in (("x+1", "X+1"), ("2x", "2X"), ("a_n", "A_n"), ("x=5", "X=5"), ("x²", "X^2"),
                 # a product of variables written tight (each scored 1 and was one vote)
                 ("2xy", "2XY"), ("ab+1", "AB+1"), ("\\sqrt{xy}", "\\sqrt{XY}"), ("\\frac{ab}{2}", "\\frac{AB}{2}"),
                 ("Δ+1", "δ+1"), ("2Ω", "2ω")):   # Greek letters written in Unicode
        assert not answers_match(a, b) and not answers_match(b, a) and vote_key(a) != vote_key(b), (a, b)
    # a run beside spaces is a word or a unit: its case stays aside
    for a, b in (("5 cm", "5 CM"), ("12 Apples", "12 apples")):
        assert answers_match(a, b), (a, b)
    if with_math_verify:
        for a, b in (("\\sqrt{x}", "\\sqrt{X}"), ("2\\pi r", "2\\pi R"), ("\\Delta", "\\delta"), ("$x+1$", "X+1")):
            assert not answers_match(a, b), (a, b)
        assert answers_match("X+1", "1+X") and answers_match("\\frac{x}{2}", "x/2")
    # choice letters and words keep their case aside, as does a lone letter (a choice or a variable: x against X)
    for a, b in (("B", "b."), ("Yes", "yes"), ("\\text{YES}", "yes"), ("A, C", "a, c"), ("x", "X")):
        assert answers_match(a, b) and vote_key(a) == vote_key(b), (a, b)
    if with_math_verify:
        assert answers_match("(a)", "A") and answers_match("\\text{(A)}", "a") and answers_match("\\textbf{(C)}", "c")


def test_one_letter_in_both_cases_is_two_variables_to_math_verify():
    # math-verify lowercases every symbol: an answer holding x and X read \\frac{x}{X} as 1 and X-x as 0, and the wrong
    # answers \\frac{x}{X} (gold \\frac{X}{x}) and X-x (gold 0) scored 1
    pytest.importorskip("math_verify")
    import random

    for v in random.sample("abcdfghjkmnpqrstuvwxyz", 3):
        V = v.upper()
        for a, b in ((f"\\frac{{{v}}}{{{V}}}", f"\\frac{{{V}}}{{{v}}}"), (f"{V}-{v}", "0"), (f"\\frac{{{v}}}{{{V}}}", "1"),
                     (f"{v}^2+{V}", f"{V}^2+{v}"), (f"{v}_1-{V}_1", "0")):
            assert not answers_match(a, b) and not answers_match(b, a), (a, b)
        # the same answer written otherwise still matches
        for a, b in ((f"\\frac{{{V}}}{{{v}}}", f"\\dfrac{{{V}}}{{{v}}}"), (f"{v}^2+{V}", f"{V}+{v}^2"),
                     (f"{V}/{v}", f"\\frac{{{V}}}{{{v}}}"), (f"{v}_1+{V}_1", f"{V}_1+{v}_1")):
            assert answers_match(a, b) and answers_match(b, a), (a, b)
    assert not answers_match("\\Delta-\\delta", "0") and answers_match("\\Delta+\\delta", "\\delta+\\Delta")
    assert not answers_match("Δ-δ", "0") and not answers_match("Δ-δ", "δ-Δ")
    # a letter in a font of named sets is no variable: the reals stay the reals
    assert answers_match("r\\in\\mathbb{R}", "(-\\infty, \\infty)") and answers_match("(-\\infty, \\infty)", "r\\in\\mathbb{R}")
    # a product written tight: physics writes masses so (its M renamed alone, GMm was left as it was and scored 0)
    for a, b in (("\\frac{GMm}{r^2}", "\\frac{GmM}{r^2}"), ("\\frac{mM}{m+M}", "\\frac{Mm}{M+m}")):
        assert answers_match(a, b) and answers_match(b, a), (a, b)
    assert not answers_match("\\frac{GMm}{r^2}", "\\frac{GMM}{r^2}") and not answers_match("\\frac{mM}{m+M}", "\\frac{m}{2}")


def test_a_run_of_letters_without_a_vowel_is_a_product_of_variables(with_math_verify):
    # bare letters without a digit or an operator were words, compared case aside, and a run of four letters or more
    # in math was no variables at all (math-verify lowercases every symbol): mgh scored 1 against the gold Mgh (another
    # mass), GMMh against GMmh, $mgh$ against $Mgh$ and \\frac{GMMh}{r} against \\frac{GMmh}{r}, and each was one vote
    import random

    from r1fast.rewards.builtin import vote_key

    consonants = "bcfghjklmnpqrsvwxzBCFGHJKLMNPQRSVWXZ"   # not d (dx: a differential) nor t (tr: a trace) to math-verify
    letters = random.sample(consonants, 3)
    flipped = [letters[0].swapcase()] + letters[1:]
    product, other = "".join(letters), "".join(flipped)
    for a, b in (("mgh", "Mgh"), ("GMMh", "GMmh"), ("$mgh$", "$Mgh$"), ("kT", "KT"), ("\\frac{GMMh}{r}", "\\frac{GMmh}{r}"),
                 ("2GMmh", "2GMMh"), (product, other), (f"${product}$", f"${other}$"), (f"{product}k^2", f"{other}k^2")):
        assert not answers_match(a, b) and not answers_match(b, a) and vote_key(a) != vote_key(b), (a, b)
    # words (a vowel in them) keep their case aside, a product its full stop
    for a, b in (("mgh", "mgh."), ("Yes", "yes"), ("Bob", "BOB"), ("odd", "Odd"), (product, product + ".")):
        assert answers_match(a, b) and answers_match(b, a) and vote_key(a) == vote_key(b), (a, b)
    if with_math_verify:   # the same product written in another order, bare or in math, and a unit written tight
        shuffled = "".join(random.sample(letters, 3))
        for a, b in (("GMmh", "GmMh"), ("mgh", "hgm"), ("\\frac{GMmh}{r}", "\\frac{hGmM}{r}"), ("$mgh$", "mgh"),
                     (product, shuffled), ("760mmHg", "760")):
            assert answers_match(a, b) and answers_match(b, a), (a, b)


def test_a_bare_run_of_letters_is_a_word_only_when_written_as_one(with_math_verify):
    # the rule for one run of letters alone: a word (case aside) when it holds a vowel and is all lower case, all
    # capitals or capitalised; else a product of variables with their case. A capital inside a run (mA: m*A) was taken
    # for a word and scored 1 against ma, and in $...$ the product $ma$ scored 1 against $Ma$ (math-verify lowercases)
    import random

    from r1fast.rewards.builtin import vote_key

    run = random.choice("bcdfgklmnprstvwxz") + random.choice("aeiou")
    inner_capital = run[0] + run[1].upper()
    for a, b in (("mA", "ma"), ("xY", "xy"), ("mA", "MA"), (inner_capital, run), (inner_capital, run.upper()),
                 ("$ma$", "$Ma$"), (f"${run}$", f"${run.title()}$"), (f"\\boxed{{{run}}}", f"\\boxed{{{run.upper()}}}"),
                 ("F=ma", "F=Ma"), (f"2{run}", f"2{run.title()}")):
        assert not answers_match(a, b) and not answers_match(b, a) and vote_key(a) != vote_key(b), (a, b)
    # written as a word, two letters alone are one: ma is Ma, as no is No; a longer run with a capital inside is a name
    for a, b in (("ma", "Ma"), ("ma", "MA"), ("No", "no"), (run, run.title()), (run, run.upper() + "."), ("mA", "mA."),
                 (inner_capital, inner_capital), ("$ma$", "$ma$"), ("McDonald", "MCDONALD"), ("iPhone", "iphone")):
        assert answers_match(a, b) and answers_match(b, a) and vote_key(a) == vote_key(b), (a, b)


def test_letters_without_a_vowel_typed_all_in_the_other_case_are_the_same_words(with_math_verify):
    # since letters without a vowel are a product of variables, a multiple-select answer, an acronym or a Roman
    # numeral typed all in the other case scored 0 (bcd against the gold BCD, xx against XX, bbc against BBC) and voted apart
    import random

    from r1fast.rewards.builtin import vote_key

    letters = "".join(random.sample("BCDFGHJ", 3))   # choice letters without a vowel (a multiple-select answer)
    numeral = "".join(random.choices("XLCDM", k=3))
    for a, b in (("BCD", "bcd"), ("XX", "xx"), ("bbc", "BBC"), (letters, letters.lower()), (letters + ".", letters.lower()),
                 (numeral, numeral.lower())):
        assert answers_match(a, b) and answers_match(b, a) and vote_key(a) == vote_key(b), (a, b)
    # one letter in the other case, or some of them, is another product
    for a, b in (("Mgh", "mgh"), ("MGh", "mgh"), ("kT", "KT"), (letters, letters[0] + letters[1:].lower()), ("$MGH$", "$mgh$")):
        assert not answers_match(a, b) and not answers_match(b, a) and vote_key(a) != vote_key(b), (a, b)
    # and so are all of them, where the letters are neither choices nor a numeral's: mgh (m*g*h) scored 1 against MGH
    product = random.choice("KNPQRSTWZ") + "".join(random.sample("BCDFGHJKLMNPQRSTVWXZ", 2))
    for a, b in (("MGH", "mgh"), ("KMT", "kmt"), (product, product.lower()), (product + ".", product.lower())):
        assert not answers_match(a, b) and not answers_match(b, a) and vote_key(a) != vote_key(b), (a, b)


def test_a_one_letter_function_s_argument_keeps_its_case(with_math_verify):
    # brackets were no sign of math, so P(A) was words, compared case aside: P(a) scored 1 against the gold P(A) (another
    # event), f(X) against f(x), and each pair was one cons@k vote
    import random

    from r1fast.rewards.builtin import vote_key

    name, arg = random.choice("PfgEhF"), random.choice("ABCXYZabcxyz")
    for a, b in (("P(A)", "P(a)"), ("P(A|B)", "P(a|B)"), ("f(x)", "f(X)"), ("P(A)", "p(A)"), ("1-P(A)", "1-P(a)"),
                 (f"{name}({arg})", f"{name}({arg.swapcase()})"), (f"{name}({arg})", f"{name.swapcase()}({arg})")):
        assert not answers_match(a, b) and not answers_match(b, a) and vote_key(a) != vote_key(b), (a, b)
    for a, b in (("P(A)", "P(A)."), (f"{name}({arg})", f" {name}({arg}) ")):
        assert answers_match(a, b) and answers_match(b, a) and vote_key(a) == vote_key(b), (a, b)


def test_spaces_inside_a_one_letter_call_do_not_matter(with_math_verify):
    # P( C|A ) and P(C | A) scored 0 against the gold P(C|A) (with math-verify too, which reads none of them), and f( x )
    # was another cons@k vote than f(x)
    import random

    from r1fast.rewards.builtin import vote_key

    name, x, y = random.choice("PfgEh"), *random.sample("ABCXYZabcxyz", 2)
    for a, b in (("P( C|A )", "P(C|A)"), ("P(C | A)", "P(C|A)"), ("$P( C|A )$", "$P(C|A)$"), ("1-P( A )", "1-P(A)"),
                 ("P(A, B)", "P(A,B)"), (f"{name}( {x} | {y} )", f"{name}({x}|{y})"), (f"{name}( {x} )", f"{name}({x})"),
                 (f"{name}({x} ,  {y})", f"{name}( {x}, {y} )")):
        assert answers_match(a, b) and answers_match(b, a) and vote_key(a) == vote_key(b), (a, b)
    # the case, the order and the arguments still count, as do spaces between digits
    for a, b in (("P( C|A )", "P(c|A)"), ("P( C|A )", "P(A|C)"), ("P( C|A )", "P(C|B)"), (f"{name}( {x} )", f"{name}({y})"),
                 (f"{name}( {x} )", f"{name}({x.swapcase()})"), (f"{name}( {x} | {y} )", f"{name}({y}|{x})"), ("f(2 3)", "f(23)")):
        assert not answers_match(a, b) and not answers_match(b, a) and vote_key(a) != vote_key(b), (a, b)


def test_a_base_numeral_s_letter_digits_keep_case_aside(monkeypatch):
    # a numeral's letter digits in a base past 10 were read as variables with their case: 1a_{16} and a5_{16} scored 0
    # against the gold 1A_{16} and A5_{16} (math-verify matched them) and were other cons@k votes
    from r1fast.rewards.builtin import vote_key

    monkeypatch.setitem(sys.modules, "math_verify", None)
    for a, b in (("1a_{16}", "1A_{16}"), ("a5_{16}", "A5_{16}"), ("2b_12", "2B_12"), ("10AB_{12}", "10ab_{12}")):
        assert answers_match(a, b) and answers_match(b, a) and vote_key(a) == vote_key(b), (a, b)
    # a variable's index, a letter past the base's digits, or a base of 10 or less: variables still
    for a, b in (("a_{12}", "A_{12}"), ("2x_{12}", "2X_{12}"), ("x_1+1", "X_1+1"), ("1b_{2}", "1B_{2}"), ("1a_{16}", "1b_{16}")):
        assert not answers_match(a, b) and vote_key(a) != vote_key(b), (a, b)


def test_a_time_of_day_s_am_or_pm_keeps_case_aside(monkeypatch):
    # a.m./p.m. tight after a clock time or with full stops were read as two variables with their case: 10:30am scored 0
    # against the gold 10:30AM, 9:40 a.m. against 9:40 A.M., 4 P.M. against 4\\text{ p.m.} (all 1 before 46d6a98)
    from r1fast.rewards.builtin import vote_key

    monkeypatch.setitem(sys.modules, "math_verify", None)
    for a, b in (("10:30am", "10:30AM"), ("9:40 a.m.", "9:40 A.M."), ("4 P.M.", "4 p.m."), ("7:05 Pm", "7:05 pM")):
        assert answers_match(a, b) and answers_match(b, a) and vote_key(a) == vote_key(b), (a, b)
    # without a clock time or full stops it stays a product of variables
    assert not answers_match("2pm", "2PM") and vote_key("2pm") != vote_key("2PM")
    assert not answers_match("10:30am", "10:30pm")


def test_letters_in_text_are_no_variables(with_math_verify):
    # a lone letter inside \\text{…} was a variable with its case (a tight run there was not): 4 P.M. scored 0 against
    # MATH-style 4\\text{ p.m.}
    if with_math_verify:
        assert answers_match("4 P.M.", "4\\text{ p.m.}") and answers_match("5\\text{ M}", "5\\text{ m}")
    assert not answers_match("x+\\text{ m}", "X+\\text{ m}")


def test_a_product_written_tight_is_read_as_math_too(with_math_verify):
    # bare text with a run of letters was read as prose only: 2xy was its 2 alone, ab+1 and mc^2 nothing, so the right
    # answers 2 x y, ba+1, BC+AB and mc^2 scored 0 against the golds 2xy, ab+1, AB+BC and E=mc^2
    if not with_math_verify:
        return
    for a, b in (("2 x y", "2xy"), ("ba+1", "ab+1"), ("BC+AB", "AB+BC"), ("mc^2", "E=mc^2"), ("5cm", "5"), ("10 km/h", "10")):
        assert answers_match(a, b), (a, b)
    for a, b in (("ab+2", "ab+1"), ("2XY", "2xy"), ("2yz", "2x y")):
        assert not answers_match(a, b), (a, b)


def test_variables_written_tight_are_not_read_as_their_leading_number(with_math_verify):
    # the prose reading of 2ab+1 and 2xy+1 was 2 for both, so the wrong answer scored 1 (and 2xy against the gold 2);
    # a number with a unit written against it stays its number
    if not with_math_verify:
        return
    for a, b in (("2ab", "2xy"), ("2ab+1", "2xy+1"), ("2xy", "2"), ("3abc", "3xyz")):
        assert not answers_match(a, b), (a, b)
    for a, b in (("5cm", "5"), ("12kg.", "12"), ("60km/h", "60"), ("2xy", "2 x y")):
        assert answers_match(a, b), (a, b)


def test_a_number_with_a_one_letter_unit_is_its_number(with_math_verify):
    # read as `$…$`, a bare one-letter unit was a variable: 2 L was 2*l, 3 m/s 3*m/s, so the right answer scored 0 against
    # NuminaMath's 2 \\mathrm{~L} (math-verify drops its unit) and against 2
    if not with_math_verify:
        return
    for a, b in (("2 L", "2 \\mathrm{~L}"), ("10 N", "10 \\mathrm{~N}"), ("3 m/s", "3 \\mathrm{~m/s}"), ("10 J.", "10\\,\\mathrm{J}"),
                 ("9.8 m/s^2", "9.8"), ("2 L", "2"), ("20 m/s", "20m/s"), ("2L", "2 L")):
        assert answers_match(a, b), (a, b)
    for a, b in (("2 L", "3"), ("3 m/s", "3.5"), ("2x", "2"), ("2 L", "2 l")):
        assert not answers_match(a, b), (a, b)


def test_millilitres_written_against_a_number_match_in_either_case_of_the_litre():
    # mL and ml both write the millilitre (the litre's symbol is L or l): 250ml scored 1 against 250 and against
    # 250 mL, but 0 against 250mL, its letters read as the variables m and L
    pytest.importorskip("math_verify")
    import random

    n = random.randrange(2, 10**4)
    for a, b in ((f"{n}ml", f"{n}mL"), (f"{n}mL/min", f"{n}ml/min"), (f"{n}mL.", f"{n}ml"), (f"{n}mL", f"{n} ml")):
        assert answers_match(a, b) and answers_match(b, a), (a, b)
    # another number, a megalitre, other units whose case tells them apart (Mg: megagram), a power (m*L^2), stay apart
    for a, b in ((f"{n}ml", f"{n + 1}mL"), (f"{n}ml", f"{n}ML"), (f"{n}mg", f"{n}Mg"), (f"{n}mL^2", f"{n}ml^2"),
                 (f"{n} m", f"{n} M"), (f"{n}l", f"{n}L")):
        assert not answers_match(a, b) and not answers_match(b, a), (a, b)


def test_a_number_with_another_unit_is_another_answer(with_math_verify):
    # both answers were read as their numbers alone, their units dropped: 250 mL scored 1 against the gold 250 L, 5 kg
    # against 5 g (a prefix or none), 5 cm against 5 kg (another unit), in NuminaMath's \\mathrm{~L} too, and 7 mm
    # (millimetres) against 7 Mm (megametres), words alike case aside
    import random

    n = random.choice([random.randrange(2, 10**4), random.randrange(1, 400) / 4])
    prefix, other = random.sample(["k", "m", "M", "G", "c", "n"], 2)
    base = random.choice(["m", "g", "s", "N", "J", "W", "Pa", "Hz", "V", "mol"])
    for a, b in ((f"{n} mL", f"{n} L"), (f"{n} kg", f"{n} g"), (f"{n}kN", f"{n} N"), (f"{n} cm", f"{n} kg"),
                 (f"{n} ms", f"{n} s"), (f"{n} mL", f"{n} \\mathrm{{~L}}"), (f"{n}\\text{{ mL}}", f"{n}\\text{{ L}}"),
                 (f"{n} km/h", f"{n} m/h"), (f"{n}ml", f"{n} L"), (f"${n}\\,\\mathrm{{MHz}}$", f"{n} Hz"),
                 (f"{n} mm", f"{n} Mm"), (f"{n} mg", f"{n} Mg"), (f"{n} {prefix}{base}", f"{n} {base}"),
                 (f"{n} {prefix}{base}", f"{n} {other}{base}")):
        assert not answers_match(a, b) and not answers_match(b, a), (a, b)
    if with_math_verify:   # the same unit written otherwise, or a number alone against it, still match
        for a, b in ((f"{n}ml", f"{n}mL"), (f"{n} mL", f"{n} \\mathrm{{~mL}}"), (f"{n} kg", f"{n}"), (f"{n} s", f"{n} sec"),
                     (f"{n} km/h", f"{n}km/h"), (f"{n} {prefix}{base}", f"{n}\\text{{ {prefix}{base}}}")):
            assert answers_match(a, b) and answers_match(b, a), (a, b)


def test_one_quantity_with_other_prefixes_is_one_answer(with_math_verify):
    # two answers in one unit with other prefixes were other units: 0.5 L scored 0 against the gold 500 mL, 2 km against
    # 2000 m, 5 mg against 0.005 g, and each was another cons@k vote
    import random
    from decimal import Decimal
    from fractions import Fraction

    from r1fast.rewards.builtin import vote_key

    factors = {"k": Fraction(10**3), "M": Fraction(10**6), "G": Fraction(10**9), "c": Fraction(1, 100), "m": Fraction(1, 1000),
               "μ": Fraction(1, 10**6), "n": Fraction(1, 10**9)}

    def decimal(x: Fraction) -> str:   # the exact decimal (denominators are powers of ten)
        return format(Decimal(x.numerator) / Decimal(x.denominator), "f")

    n = Fraction(random.randrange(1, 4000), random.choice([1, 4]))
    prefix, other = random.sample(sorted(factors), 2)
    base, other_base = random.sample(["m", "g", "s", "N", "J", "W", "Pa", "Hz", "V", "mol", "L"], 2)
    in_base, in_other = n * factors[prefix], n * factors[prefix] / factors[other]
    same = ((f"{decimal(n)} {prefix}{base}", f"{decimal(in_base)} {base}"),
            (f"{decimal(n)} {prefix}{base}", f"{decimal(in_other)} {other}{base}"),
            ("0.5 L", "500 mL"), ("0.5 L", "500ml"), ("2 km", "2000 m"), ("5 mg", "0.005 g"), ("3 ms", "0.003 s"),
            ("2 kJ", "2000 J"), ("5 m", "500 cm"), ("1 mol", "1000 mmol"), ("60 km/h", "60000 m/h"), ("2 cm^2", "0.0002 m^2"),
            ("0.5 \\mathrm{~L}", "500 \\mathrm{~mL}"), ("5 \\mu m", "5000 nm"), ("5 um", "0.005 mm"))
    for a, b in same:
        assert answers_match(a, b) and answers_match(b, a) and vote_key(a) == vote_key(b), (a, b)
    # another unit, another value, a unit that is no prefixed one (min, h, mol), or a litre written l alone stay apart
    differ = ((f"{decimal(n)} {prefix}{base}", f"{decimal(in_base)} {other_base}"),
              (f"{decimal(n)} {prefix}{base}", f"{decimal(2 * in_base)} {base}"),
              (f"{decimal(n)} {prefix}{base}", f"{decimal(n)} {other}{base}"),
              ("5 m", "5 s"), ("0.5 L", "600 mL"), ("5 mL", "5 L"), ("1 min", "60 s"), ("1 h", "3600 s"), ("1 min", "0.001 in"),
              ("1 mol", "1 mmol"), ("5 mol", "5000 m"), ("60 km/h", "60000 m/s"), ("2 cm^2", "0.02 m^2"), ("1 kg", "1000 m"))
    for a, b in differ:
        assert not answers_match(a, b) and not answers_match(b, a) and vote_key(a) != vote_key(b), (a, b)


def test_a_quantity_s_number_is_compared_exactly(with_math_verify):
    # a number with a unit went to math-verify, which drops the unit and rounds: -1.6 \\times 10^{-19} \\mathrm{C} scored 1
    # against 1.6 \\times 10^{-19} \\mathrm{C}, 7.7 \\times 10^{-27} kg against 6.6 \\times 10^{-27} kg, 6.6 \\times 10^{-27} J
    # against 6.6 \\times 10^{-27} kJ and 70.2400001 m against 70.24 m, while 1.6e-19 C scored 0 against 1.6 \\times 10^{-19} C
    import random

    from r1fast.rewards.builtin import vote_key

    m, e, u = random.randrange(11, 99) / 10, random.randrange(-35, -15), random.choice(["C", "g", "J", "m/s"])
    d = random.randrange(1000, 10**4) / 100
    gold = f"{m} \\times 10^{{{e}}} \\text{{ {u}}}"
    for a in (f"{m}e{e} \\text{{ {u}}}", f"{m}\\cdot10^{e}\\,\\mathrm{{{u}}}", f"${m}*10^{{{e}}}\\ \\mathrm{{{u}}}$", f"{m} × 10^{e} {u}",
              f"{m}e{e}", f"{m} \\times 10^{{{e}}}"):
        assert _accuracy(a, gold) == _accuracy(gold, a) == 1.0, (a, gold)
    assert vote_key(f"{m}e{e} {u}") == vote_key(gold)
    for a in (f"-{m} \\times 10^{{{e}}} \\text{{ {u}}}", f"{round(m + 1.1, 1)} \\times 10^{{{e}}} \\text{{ {u}}}",
              f"{m} \\times 10^{{{e + 1}}} \\text{{ {u}}}", f"{m} \\times 10^{{{e}}} \\text{{ k{u}}}", f"{round(m + 1.1, 1)}e{e}"):
        assert _accuracy(a, gold) == _accuracy(gold, a) == 0.0, (a, gold)
    for a, b in ((f"{d}00001 m", f"{d} m"), (f"{d}00001\\,\\mathrm{{kg}}", f"{d} \\text{{ kg}}"), (f"{d}00001", f"{d} m"),
                 (f"-{d} m", f"{d} m")):
        assert _accuracy(a, b) == _accuracy(b, a) == 0.0, (a, b)
    assert _accuracy(f"{d}0 m", f"{d}") == _accuracy(f"{d} m", f"{d}0 \\mathrm{{~m}}") == 1.0


def test_one_quantity_written_otherwise_is_one_vote(monkeypatch):
    # vote_key read a number with its unit as text: 250ml and 250mL were two cons@k votes (letters against a number keep
    # their case, as variables') and 250 mL a third, though accuracy matched them; and without math-verify 250ml scored 0
    # against 250mL, 5 μm against 5\\text{ μm}
    import random

    from r1fast.rewards.builtin import vote_key

    monkeypatch.setitem(sys.modules, "math_verify", None)
    n = random.choice([random.randrange(2, 10**4), random.randrange(1, 400) / 4])
    for group in ((f"{n}ml", f"{n}mL", f"{n} mL", f"{n} ml", f"{n} \\mathrm{{~mL}}", f"${n}\\,\\text{{mL}}$", f"{n}mL.", f"**{n} mL**"),
                  (f"{n} μm", f"{n}\\text{{ μm}}", f"{n} µm", f"{n}\\,\\mu\\mathrm{{m}}"), (f"{n} km/h", f"{n}km/h", f"{n} \\mathrm{{km/h}}"),
                  (f"\\le {n} mL", f"≤ {n}ml")):
        assert len({vote_key(a) for a in group}) == 1, group
        assert all(answers_match(a, b) for a in group for b in group), group
    differ = (f"{n} mL", f"{n} L", f"{n} l", f"{n} mm", f"{n} Mm", f"{n} m", f"{n}", f"{n + 1} mL", f"{n} km/h", f"\\le {n} mL")
    assert len({vote_key(a) for a in differ}) == len(differ)


def test_answers_of_one_vote_match_without_math_verify(monkeypatch):
    # vote_key read words before the Unicode math that answers_match turns into LaTeX: √x and √X., a·b and A·B, were
    # one vote that answers_match (without math-verify) took for different answers
    from r1fast.rewards.builtin import vote_key

    monkeypatch.setitem(sys.modules, "math_verify", None)
    for a, b in (("√x", "√X."), ("a·b", "A·B"), ("x ≤ 3", "X ≤ 3"), ("∞", "∞.")):
        assert not answers_match(a, b) and vote_key(a) != vote_key(b), (a, b)
    assert vote_key("Yes") == vote_key("yes.") and vote_key("√2") == vote_key("√2")


def test_an_answer_in_math_delimiters_votes_with_itself_bare(with_math_verify):
    # answers_match reads an answer without one \\(…\\) or \\[…\\] around it, vote_key read it with them: \\(yes\\) and
    # yes, \\(x+1\\) and x+1, \\[5x\\] and 5x matched but were two cons@k votes
    import random

    from r1fast.rewards.builtin import vote_key

    v = random.choice("abcxyz")
    for a, b in (("\\(yes\\)", "yes"), ("\\(Yes\\)", "\\text{YES}"), ("\\(x+1\\)", "x+1."), ("\\[5x\\]", "5x"),
                 (f"\\({v}^2+1\\)", f"{v}^2+1"), (f"\\[ 2{v} \\]", f"2{v}"), ("\\(P( C|A )\\)", "P(C|A)")):
        assert answers_match(a, b) and answers_match(b, a) and vote_key(a) == vote_key(b), (a, b)
    for a, b in (("\\(x+1\\)", "X+1"), (f"\\({v}^2+1\\)", f"{v.upper()}^2+1"), ("\\(yes\\)", "no"), ("\\(3\\)+1", "3")):
        assert not answers_match(a, b) and not answers_match(b, a) and vote_key(a) != vote_key(b), (a, b)


def test_a_bracketed_choice_letter_is_the_letter(monkeypatch):
    # (B), B), [B] and \\text{(B)} matched B only through math-verify (0 without it), and were each another cons@k vote
    from r1fast.rewards.builtin import vote_key

    monkeypatch.setitem(sys.modules, "math_verify", None)
    for a, b in (("(B)", "B"), ("B)", "b"), ("\\text{(B)}", "B"), ("\\textbf{(C)}", "c"), ("(a)", "A"), ("[B]", "B"), ("(B).", "B")):
        assert answers_match(a, b) and answers_match(b, a) and vote_key(a) == vote_key(b), (a, b)
    for a, b in (("(B)", "C"), ("(x+1)", "x+1."), ("(AB)", "AB")):
        assert vote_key(a) != vote_key(b), (a, b)
    assert not answers_match("(B)", "(C)") and not answers_match("B)", "A")


def test_a_choice_letter_with_its_option_s_text_is_the_letter(with_math_verify):
    # B. 12, B) 12 and (D) 4\\sqrt{2} scored 0 against the gold B (B against the gold B. 12 and MATH's \\textbf{(C) }3),
    # while math-verify, finding 12 in both, took C. 12 for B. 12
    from r1fast.rewards.builtin import vote_key

    for a, b in (("B. 12", "B"), ("B) 12", "(B)"), ("B: 12", "\\text{(B)}"), ("(D) 4\\sqrt{2}", "D"), ("C", "\\textbf{(C) }3"),
                 ("B", "\\textbf{(B)}\\ 12"), ("B. 12", "B. 13")):
        assert answers_match(a, b) and answers_match(b, a) and vote_key(a) == vote_key(b), (a, b)
    for a, b in (("C. 12", "B. 12"), ("(C) 12", "B"), ("C", "B. 12"), ("(A) 3, (B) 5", "A"), ("x: 5", "x")):
        assert not answers_match(a, b) and not answers_match(b, a) and vote_key(a) != vote_key(b), (a, b)
    if with_math_verify:
        assert answers_match("A. 5", "5") and answers_match("12", "B. 12")   # the option's value still matches


def test_latex_spaced_otherwise_is_the_same_answer(monkeypatch):
    # math mode ignores spaces, \\; \\, \\quad, \\left and \\right, but the text was compared as it is: a right answer spaced
    # otherwise than its gold scored 0 where math-verify parses neither (a general solution with k \\in \\mathbb{Z}) or
    # misreads one (2\\pi r h was 2*pi*r to it), and was another cons@k vote
    from r1fast.rewards.builtin import vote_key

    monkeypatch.setitem(sys.modules, "math_verify", None)
    for a, b in (("x=\\frac{\\pi}{3}+k\\pi,k\\in\\mathbb{Z}", "x = \\frac{\\pi}{3} + k\\pi, k \\in \\mathbb{Z}"), ("2\\pi r h", "2\\pi rh"),
                 ("\\left\\{x | x>1\\right\\}", "\\{x|x>1\\}"), ("a\\;\\text{or}\\quad b", "a \\text{or} b"), ("\\le \\,", "$≤\\;$")):
        assert answers_match(a, b) and answers_match(b, a) and vote_key(a) == vote_key(b), (a, b)
    # the space that ends a command's name is kept, and letters keep their case
    for a, b in (("\\pi r", "\\pir"), ("2\\pi R h", "2\\pi rh"), ("\\; b", "b")):
        assert vote_key(a) != vote_key(b), (a, b)
    assert not answers_match("2\\pi R h", "2\\pi rh")


def test_equal_relations_and_percentages_are_one_vote(monkeypatch):
    # answers_match reads a leading relation sign and a percentage's number, vote_key read their text: \\le 5, \\leq 5 and
    # ≤ 5 (or 50%, 50\\% and $50\\%$) were three cons@k votes for one answer
    from r1fast.rewards.builtin import vote_key

    monkeypatch.setitem(sys.modules, "math_verify", None)
    for group in (("\\le 5", "\\leq 5.0", "≤ 5", "$\\leqslant 5$", "\\boxed{\\le 5}"), ("\\neq x", "≠ X", "!= x."),
                  ("50%", "50\\%", "$50\\%$", "\\boxed{50.0\\%}", "50%.")):
        assert len({vote_key(a) for a in group}) == 1, group
        assert all(answers_match(a, b) for a in group for b in group), group
    differ = ("\\le 5", "\\lt 5", "\\ge 5", "\\le 6", "5", "50%", "0.5", "50", "5%", "<", "<.")
    assert len({vote_key(a) for a in differ}) == len(differ)


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


def test_a_trl_reward_function_that_requires_trainer_state_is_told_to_read_it_from_kwargs():
    """It raised TRL-style "missing 1 required positional argument" and was called again on halves of the
    batch to blame a row; now one call, and the error names the arguments passed and the fix."""
    calls = []

    def schedule(prompts, completions, trainer_state, **kw):
        calls.append(1)
        return [0.0] * len(completions)

    with pytest.raises(RewardError, match=r"'schedule' cannot take the arguments r1fast passes \(prompts, "
                                          r"completions, answer\).*'trainer_state'; r1fast does not pass TRL's "
                                          r"trainer_state: read it with kwargs.get"):
        RewardSet([schedule]).score(["a"] * 4, ["x"] * 4, {"answer": ["1"] * 4})
    assert calls == []

    def indexed(prompts, completions, **kwargs):   # kwargs["trainer_state"]: "raised KeyError ... on row 0"
        calls.append(1)
        return [float(kwargs["trainer_state"].global_step)] * len(completions)

    with pytest.raises(RewardError, match=r"^reward function 'indexed' raised KeyError: 'trainer_state': r1fast does "
                                          r"not pass TRL's trainer_state: read it with kwargs.get$"):
        RewardSet([indexed]).score(["a"] * 4, ["x"] * 4, {"answer": ["1"] * 4})
    assert calls == [1]   # not called again on parts of the batch to blame a row
    def strict(prompts, completions):   # no **kwargs: TRL passes the dataset's columns too
        return [0.0] * len(completions)

    with pytest.raises(RewardError, match=r"'strict' cannot take .*unexpected keyword argument 'answer'; give it a "
                                          r"\*\*kwargs parameter"):
        RewardSet([strict]).score(["a"], ["x"], {"answer": ["1"]})

    def needs_solution(prompts, completions, solution, **kw):   # a missing column: no **kwargs hint, it has one
        return [0.0] * len(completions)

    with pytest.raises(RewardError, match=r"missing a required argument: 'solution'$"):
        RewardSet([needs_solution]).score(["a"], ["x"], {"answer": ["1"]})


def test_reward_set_finds_the_failing_row_in_few_calls_and_says_when_it_cannot():
    # The row was found by calling the function once per row: 65 calls of a paid judge for a 64-row batch
    # failing on its last row, and a flaky judge got 8 more calls and an error naming no row, unexplained.
    calls = []

    def judge(prompts, completions, **kw):
        calls.append(len(completions))
        if "bad" in completions:
            raise ValueError("judge choked")
        return [1.0] * len(completions)

    for bad_row in (0, 37, 63):
        calls.clear()
        completions = ["ok"] * 64
        completions[bad_row] = "bad"
        with pytest.raises(RewardError, match=rf"'judge'.*judge choked on row {bad_row} "):
            RewardSet([judge]).score(["p"] * 64, completions, {})
        assert len(calls) <= 1 + 7, calls
    calls.clear()
    with pytest.raises(RewardError, match="on row 0 "):
        RewardSet([judge]).score(["p"], ["bad"], {})
    assert calls == [1]   # a one-row batch's row is known without calling again

    def flaky(prompts, completions, **kw):
        calls.append(len(completions))
        if len(calls) == 1:
            raise TimeoutError("judge timed out")
        return [1.0] * len(completions)

    calls.clear()
    with pytest.raises(RewardError, match=r"TimeoutError: judge timed out \(called again .* did not raise"):
        RewardSet([flaky]).score(["p"] * 8, ["x"] * 8, {})
    assert len(calls) <= 1 + 4


def test_user_function_by_module_path(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text("def longer(prompts, completions, **kw):\n    return [float(len(c)) for c in completions]\n")
    rs = RewardSet([f"{f}:longer"])
    assert rs.names == [f"{f}:longer"]
    assert rs.score(["p"], ["abc"], {}) == [[3.0]]
    with pytest.raises(ValueError, match="no function 'nope'"):
        RewardSet([f"{f}:nope"])
    f.write_text("THRESHOLD = 0.5\n")   # it has the name, which is no function: "no function" was misleading
    with pytest.raises(ValueError, match=r"'THRESHOLD' in '.*my_rewards.py' is 0.5, not a function"):
        RewardSet([f"{f}:THRESHOLD"])
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
    # run from another folder than the module's: where it was looked for, and the file form that works anywhere
    with pytest.raises(ValueError, match=rf"cannot import module 'r1fast_nowhere_xyz': No module named "
                                         rf"'r1fast_nowhere_xyz' \(looked in the working directory {tmp_path} and on "
                                         rf"sys.path\); or name its file: path/to/r1fast_nowhere_xyz.py:f$"):
        RewardSet(["r1fast_nowhere_xyz:f"])


def test_tag_matching_is_linear_on_adversarial_completions():
    # A lazy `<answer>(.*?)</answer>` rescanned the rest of the text from every unclosed tag: ~5 s
    # for one 100k-character completion of repeated "<answer>" (a degenerate sample), per reward.
    import time

    lang = make_language_reward("en")
    accuracy_reward(["p"], ["<answer></answer>"], answer=["5"])   # warm-up: math-verify's import
    n = 100_000
    for text in ("<answer>" * (n // 8), "<think>" * (n // 7), "<think>" + "</think><answer></answer>x" * (n // 26)):
        t = time.process_time()   # CPU time: a busy machine's other processes stretch the wall clock, not this
        accuracy_reward(["p"], [text], answer=["5"])
        format_reward(["p"], [text])
        lang(["p"], [text])
        assert time.process_time() - t < 0.5, text[:30]


def test_format_reward_wants_one_think_block_then_one_answer_block():
    comps = ["<think>a</think><answer>1</answer><answer>2</answer>",
             "<think>a</think><think>b</think><answer>1</answer>",
             "<think>a</think><answer>1</answer><think>b</think><answer>2</answer>",
             "<think>a <answer>draft</answer></think><answer>1</answer>", GOOD]
    assert format_reward(None, comps) == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_accuracy_reads_the_answer_after_the_reasoning():
    # An <answer> written inside <think> (or in reasoning that never closed) is not the final answer.
    comps = ["<think>maybe <answer>5</answer></think><answer>6</answer>",
             "<think>7-2=<answer>5</answer> wait, let me check",
             "<think>3+4=7</think><answer>5</answer><think>more",
             "3+4=7 7-2=5</think><answer>5</answer>"]   # the prompt opened <think> (Qwen3 / R1 templates)
    assert accuracy_reward(["p"] * 4, comps, answer=["5"] * 4) == [0.0, 0.0, 1.0, 1.0]


def test_boxed_answer_with_nested_braces():
    assert extract_answer("so \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert extract_answer("\\boxed{1} then \\boxed{2^{10}} {") == "2^{10}"
    assert accuracy_reward(["p"], ["the answer is \\boxed{{12}}"], answer=["12"]) == [1.0]


@pytest.mark.parametrize("pred,gold,ok", [
    ("1,5", "15", False), ("1 2", "12", False), ("12", "1,2", False), ("10,00", "1000", False),
    ("1,000", "1000", True), ("1,000.5", "1000.5", True), ("\u22123", "-3", True), ("- 3", "-3", True),
    ("\\boxed{5}", "5", True), ("{5}", "5", True), ("$-5$", "-5", True), ("5,", "5", True),
    ("1/-2", "-0.5", True), ("2/4", "1/2", True), ("7", "1e9999999", False),
    # money (GSM8K): "$18" scored 0 against 18 without math-verify, 1 with it
    ("$18", "18", True), ("\\$1,000.50", "1000.5", True), ("-$5", "-5", True), ("$5", "6", False), ("$.5", "1/2", True),
])
def test_numeric_fallback_agrees_with_math_verify(pred, gold, ok, monkeypatch):
    # Commas were stripped anywhere ("1,5" == 15, a list to math-verify), a Unicode minus or \boxed{}
    # was not read, and "1e9999999" built a ten-million-digit integer (5 s). Without math-verify installed
    # (simulated) the numeric path alone decides; with it, math-verify must give the same verdict.
    import sys
    import time

    t = time.process_time()   # CPU time: a busy machine's other processes stretch the wall clock, not this
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "math_verify", None)   # `import math_verify` raises ImportError
        assert answers_match(pred, gold) is ok
    assert time.process_time() - t < 0.5
    if importlib.util.find_spec("math_verify") is not None:
        assert answers_match(pred, gold) is ok


def test_reading_a_ratio_is_linear_in_the_spaces_of_a_junk_answer(monkeypatch):
    # `/\s*([+-]?)\s*` split a run of spaces between its two \s* in every way: "1/", 20k spaces and a letter
    # took 12 s in _as_number, on the main thread, before any math-verify deadline (vote_key alike)
    import time

    from r1fast.rewards.builtin import vote_key

    monkeypatch.setitem(sys.modules, "math_verify", None)
    junk = "1/" + " " * 20_000 + "x"
    t = time.process_time()   # CPU time: a busy machine's other processes stretch the wall clock, not this
    assert not answers_match(junk, "5") and vote_key(junk) == ("text", junk)
    assert time.process_time() - t < 0.5
    assert answers_match("1/ - 2", "-0.5") and answers_match("-1 /+ 4", "-0.25")


def test_math_verify_reads_bare_latex_and_runs_off_the_main_thread():
    pytest.importorskip("math_verify")
    import threading

    # Without $…$ math-verify parsed "\dfrac{1}{2}" to nothing; off the main thread its SIGALRM
    # timeout raised, and every LaTeX answer scored 0.
    assert answers_match("\\dfrac{1}{2}", "0.5") and answers_match("\\sqrt{4}", "2")
    got = []
    t = threading.Thread(target=lambda: got.append((answers_match("\\frac{1}{2}", "0.5"),
                                                    answers_match("\\frac{1}{3}", "0.5"))))
    t.start()
    t.join()
    assert got == [(True, False)]


def test_language_reward_ignores_tags_and_counts_kana_marks():
    zh, ja = make_language_reward("zh"), make_language_reward("ja")
    # the tags' letters counted as Latin: "你好<answer>5</answer>" scored 2/14 for zh
    assert zh(None, ["\u4f60\u597d<answer>5</answer>", "<think>\u4f60\u597d",
                     "<think>\u4eba\u3005</think>"]) == [1.0, 1.0, 1.0]
    # ー (KATAKANA-HIRAGANA PROLONGED SOUND MARK) is a letter of Japanese text: コンピューター scored 5/7
    assert ja(None, ["<think>\u30b3\u30f3\u30d4\u30e5\u30fc\u30bf\u30fc</think>"]) == [1.0]


def test_reward_set_takes_bools_and_refuses_non_finite_weights():
    # TRL sums a function's `pred == gold` as 1.0 / 0.0; r1fast raised RewardError.
    rs = RewardSet([lambda prompts, completions, **kw: [c == "a" for c in completions]])
    assert rs.score(["p", "p"], ["a", "b"], {}) == [[1.0, 0.0]]
    # a NaN weight made every total NaN (advantage 0 everywhere) without a word
    with pytest.raises(ValueError, match="finite"):
        RewardSet(["format"], weights=[float("nan")])


def test_reward_names_are_unique():
    """Metrics (rewards/<name>) and logged samples are keyed by name: two lambdas must not merge."""
    from r1fast.rewards.combine import RewardSet

    r = RewardSet([lambda p, c, **k: [0.0] * len(c), lambda p, c, **k: [1.0] * len(c), "format", "format"])
    assert r.names == ["<lambda>", "<lambda>_2", "format", "format_2"]

    def f(prompts, completions, **kw):
        return [0.0] * len(completions)

    def f_2(prompts, completions, **kw):
        return [1.0] * len(completions)
    # a function already named like a renamed one: two 'f_2' keys, one function's metric and sample scores lost
    assert RewardSet([f, f_2, f]).names == ["f", "f_2", "f_3"]
    assert RewardSet([f, f, f_2]).names == ["f", "f_2", "f_2_2"]


def test_accuracy_reads_after_the_last_closed_think_and_before_the_first_reopened_one():
    # The final part starts after the LAST </think> (an earlier block closed, then more reasoning) and
    # ends at the FIRST <think> opened after it and never closed (its drafts are not the answer).
    comps = ["<think>a</think>draft<think>b <answer>5</answer></think><answer>6</answer>",
             "<think>x</think><answer>5</answer><think>y <answer>6</answer><think>z"]
    assert accuracy_reward(["p"] * 2, comps, answer=["6", "5"]) == [1.0, 1.0]


def test_numeric_fallback_unwraps_nested_delimiters(monkeypatch):
    # `$…$`, \boxed{} and {} around a number may nest: each layer is peeled (math-verify not installed).
    import sys

    monkeypatch.setitem(sys.modules, "math_verify", None)
    for pred in ("$\\boxed{5}$", "\\boxed{{5}}", "$\\boxed{ {5} }$"):
        assert answers_match(pred, "5"), pred
    assert not answers_match("$\\boxed{6}$", "5")


def test_accuracy_reward_extracts_the_reference_answer_too():
    # A reference column holding a tagged or boxed answer is compared by its answer, not its full text.
    comps = ["<think>x</think><answer>12</answer>"] * 3
    gold = ["<answer>12</answer>", "so \\boxed{12}", "<answer>13</answer>"]
    assert accuracy_reward(["p"] * 3, comps, answer=gold) == [1.0, 1.0, 0.0]


def test_language_reward_scores_only_the_reasoning_when_there_is_one():
    # The answer's letters (an English number word after Chinese reasoning) are not the chain of thought's.
    zh = make_language_reward("zh")
    assert zh(None, ["<think>\u4f60\u597d</think><answer>five</answer>"]) == [1.0]
    assert make_language_reward("en")(None, ["<think>ab</think><answer>\u4f60\u597d</answer>"]) == [1.0]


def test_length_penalty_refuses_a_target_below_one():
    # NaN scored every completion -1, inf none; a string failed at the first batch with "'<' not supported"
    for bad in (0, -3, None, float("nan"), float("inf"), "10", True):
        with pytest.raises(ValueError, match="target must be a positive length"):
            make_length_penalty(bad)
    import numpy as np

    # within the target: 0.0, not -0.0; a numpy count is a length too
    assert [str(v) for v in make_length_penalty(np.int64(2))(None, ["", "ab", "abc"])] == ["0.0", "0.0", "-0.5"]


def test_chat_completion_is_read_from_its_last_message():
    # A completion of several messages (e.g. a tool call, then the final reply): the last one is scored.
    chat = [{"role": "assistant", "content": "<answer>1</answer>"}, {"role": "assistant", "content": GOOD}]
    assert accuracy_reward(["p"], [chat], answer=["5"]) == [1.0]
    assert format_reward(None, [chat]) == [1.0]


def test_reward_set_refuses_more_weights_than_functions():
    with pytest.raises(ValueError, match="2 reward weights for 1 reward functions"):
        RewardSet(["format"], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="1 reward weights for 2 reward functions"):
        RewardSet(["format", "format"], weights=[1.0])


def test_reward_set_refuses_infinite_weights():
    for w in (float("inf"), float("-inf")):
        with pytest.raises(ValueError, match="finite"):
            RewardSet(["format", "format"], weights=[1.0, w])


def test_reward_set_takes_tensor_and_numpy_values():
    # A function returning a torch tensor (or numpy array) of rewards: each element is read as a float.
    import numpy as np
    import torch

    rs = RewardSet([lambda prompts, completions, **kw: torch.tensor([1.0, 0.5]),
                    lambda prompts, completions, **kw: [np.float32(0.25), torch.tensor(2.0)]])
    assert rs.score(["p", "p"], ["a", "b"], {}) == [[1.0, 0.5], [0.25, 2.0]]


def test_reward_set_blames_no_row_when_the_function_raises_on_every_row():
    # a judge that was down raised on every part of the batch, and the search said "on row 0 (prompt ...)"
    calls = []

    def down(prompts, completions, **kw):
        calls.append(len(completions))
        raise ConnectionError("judge unreachable")

    with pytest.raises(RewardError, match=r"'down' raised ConnectionError: judge unreachable on row 0 \(prompt 'p', "
                                          r"completion 'c'\) and on rows 1-63 too \(called again on parts of the "
                                          r"batch to find the row, it raised on each: a judge that is down, or more "
                                          r"than one failing row\)$"):
        RewardSet([down]).score(["p"] * 64, ["c"] * 64, {})
    assert len(calls) == 1 + 7   # within the bound: 6 halvings, then rows 1-63
    calls.clear()

    def row0(prompts, completions, **kw):   # row 0's own error is still row 0's
        calls.append(len(completions))
        if "bad" in completions:
            raise ValueError("bad row")
        return [1.0] * len(completions)

    with pytest.raises(RewardError, match="bad row on row 0 "):
        RewardSet([row0]).score(["p"] * 8, ["bad"] + ["ok"] * 7, {})
    assert len(calls) == 1 + 4
    calls.clear()

    # rows 0 and 3 failing each on their own (a parse error) were "not one row's", and row 0 went unshown
    with pytest.raises(RewardError, match=r"bad row on row 0 \(prompt 'p', completion 'bad'\) and on rows 1-7 too "
                                          r"\(.*more than one failing row\)$"):
        RewardSet([row0]).score(["p"] * 8, ["bad", "ok", "ok", "bad"] + ["ok"] * 4, {})
    assert len(calls) == 1 + 4

def test_reward_set_names_a_function_raising_on_an_empty_batch():
    # the halving search returned row 0 of an empty batch, and naming its prompt was an IndexError
    def broken(prompts, completions, **kw):
        raise ValueError("no judge")

    with pytest.raises(RewardError, match=r"'broken' raised ValueError: no judge \(on an empty batch\)$"):
        RewardSet([broken]).score([], [], {})


def test_reward_set_names_a_function_returning_several_values_per_row():
    # a (rows, k) array or tensor (k rewards per row, one function for two criteria): element.item() raised
    # numpy's bare "can only convert an array of size 1 to a Python scalar", naming neither function nor row
    import numpy as np
    import torch

    for table in (np.array([[1.0, 0.0], [0.5, 1.0]]), torch.tensor([[1.0, 0.0], [0.5, 1.0]])):
        rs = RewardSet([lambda prompts, completions, **kw: table])
        with pytest.raises(RewardError, match=r"reward function '<lambda>' returned .*1\., 0\..* for row 0"):
            rs.score(["p", "q"], ["a", "b"], {})


def test_reward_set_passes_its_options_to_the_builtins():
    # format_pattern and language reach the built-in functions resolved by name
    rs = RewardSet(["format", "language"], format_pattern=r"^Answer: \d+$", language="zh")
    table = rs.score(["p", "p"], ["Answer: 12", "<think>\u4f60\u597d</think><answer>1</answer>"], {})
    assert table == [[1.0, 0.0], [0.0, 1.0]]   # "Answer" has no Chinese letter


def test_reward_set_names_the_row_whose_own_columns_fail():
    # The failing row is found by calling the function on each row alone, with that row's columns only.
    def as_int(prompts, completions, answer, **kw):
        return [float(int(a)) for a in answer]

    rs = RewardSet([as_int])
    with pytest.raises(RewardError, match=r"'as_int'.*ValueError.*row 1 \(prompt 'q1'"):
        rs.score(["q0", "q1", "q2"], ["a", "b", "c"], {"answer": ["1", "x", "3"]})


def test_boxed_answer_with_a_space_before_the_brace():
    assert extract_answer("so \\boxed {7}.") == "7"
    assert accuracy_reward(["p"], ["the answer is \\boxed {12}"], answer=["12"]) == [1.0]


def _accuracy(answer, gold):
    return accuracy_reward(["p"], [f"<think>x</think><answer>{answer}</answer>"], answer=[gold])[0]


# (answer, gold, expected): LaTeX read whole, money, prose numbers; each pair scored 1 for a wrong
# answer or 0 for a right one before (an answer of the leading number alone was paid for 2\sqrt{3})
LATEX_CASES = [
    ("2", r"2\sqrt{3}", 0.0), (r"2\sqrt{2}", r"2\sqrt{3}", 0.0), ("-2", r"-2\sqrt{3}", 0.0), ("3", r"3\pi", 0.0),
    (r"3\pi", r"3\sqrt{5}", 0.0), ("4", r"4\sqrt{3}+\pi", 0.0), ("12", r"12\sqrt{2}-1", 0.0),
    ("100", r"100\pi \text{ cm}^2", 0.0), ("2", r"2\sin x", 0.0), ("5", r"5,\!000", 0.0), (r"5,\!000", "5", 0.0),
    (r"\sqrt{12}", r"2\sqrt{3}", 1.0), (r"2 \sqrt 3", r"2\sqrt{3}", 1.0), ("5000", r"5,\!000", 1.0),
    (r"\$5", "5", 1.0), ("18.90", r"\$18.90", 1.0), ("1000", r"\$1,\!000", 1.0),
    ("sey", "yes", 0.0), ("on", "no", 0.0), ("Paris", "pairs", 0.0), ("listen", "silent", 0.0), ("DCA", "ACD", 0.0),
    ("24 clips", "24", 1.0), ("5 dollars", "5", 1.0), ("x is 5", "5", 1.0), ("5", "Solution: 2+3 = 5", 1.0),
    ("x^2+1", "1+x^2", 1.0), ("(1, 2)", "(1,2)", 1.0), ("Paris", "Paris", 1.0),
]


@pytest.mark.parametrize("answer,gold,expected", LATEX_CASES)
def test_math_verify_reads_latex_whole_and_prose_as_text(answer, gold, expected):
    pytest.importorskip("math_verify")
    assert _accuracy(answer, gold) == expected


def test_golds_that_are_floats_lists_or_missing(with_math_verify):
    # a float gold written out by a numeric column equals the ratio it approximates
    assert _accuracy("1/3", 0.3333333333333333) == 1.0
    assert _accuracy("8/3", 2.6666666666666665) == 1.0
    assert _accuracy("0.3", 0.30000000000000004) == 1.0
    assert _accuracy("0.33", 0.3333333333333333) == 0.0
    assert _accuracy("0.1", "0.1000000001") == 0.0  # a short decimal is exact
    # no reference: left out (None), never a reward for an empty or "nan" answer
    for gold in ("", "  ", float("nan"), [], [None, ""]):
        assert _accuracy("", gold) is None and _accuracy("nan", gold) is None
    # a list holds accepted answers
    assert [_accuracy(a, ["3", "5"]) for a in ("3", "5", "4")] == [1.0, 1.0, 0.0]


def test_a_long_whole_number_is_exact(with_math_verify):
    # a run of 12 digits or more was taken for a float written out and compared to 1e-12: a count of 13 digits or more
    # scored 1 one off, and 20! = 2432902008176640000 matched 2432902008176000000
    import random

    n = random.randrange(10**12, 10**20)
    for wrong in (n + 1, n - 1, n + random.randrange(2, 1000), n // 1000 * 1000 + (1 if n % 1000 == 0 else 0)):
        for gold in (str(n), n, f"{n:,}"):
            assert _accuracy(str(wrong), gold) == 0.0 and _accuracy(f"{wrong:,}", gold) == 0.0, (wrong, gold)
    assert _accuracy(str(n), n) == _accuracy(f"{n:,}", str(n)) == _accuracy(f"{n}.0", str(n)) == 1.0
    # a float written out, or a decimal with a float's worth of digits, still stands for what it approximates
    assert _accuracy("1/3", f"{1 / 3!r}") == _accuracy("1.0000000000001", "1") == _accuracy("1", 1.0000000000000002) == 1.0


def test_a_float32_gold_is_the_number_it_prints_as(with_math_verify):
    # a float32 column (parquet, `datasets` Value("float32"), a numpy or torch format) reaches the reward as a double:
    # 0.1 was 0.10000000149011612, which the answer 0.1 did not match (to 1e-12)
    import random

    import numpy as np
    import torch

    d = round(random.uniform(-1000, 1000), random.randrange(1, 4)) or 0.5
    x = np.float32(d)
    for gold in (float(x), x, np.array([x]), torch.tensor(d), [float(x)]):
        assert _accuracy(str(d), gold) == 1.0, (d, gold)
        assert _accuracy(str(round(d + 0.01, 3)), gold) == _accuracy(str(-d), gold) == 0.0, (d, gold)
    assert _accuracy("1e20", float(np.float32(1e20))) == _accuracy("0.1", 0.1) == 1.0


def test_without_math_verify_a_latex_comparison_warns_once(monkeypatch):
    from r1fast.rewards import matching

    monkeypatch.setitem(sys.modules, "math_verify", None)
    monkeypatch.setattr(matching, "_WARNED_NO_MATH_VERIFY", False)
    with pytest.warns(UserWarning, match="math-verify is not installed, so LaTeX answers are compared as text"):
        assert _accuracy(r"\sqrt{4}", "2") == 0.0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _accuracy(r"\sqrt{9}", "3") == 0.0  # once
        assert _accuracy(r"\frac{1}{2}", "0.5") == 1.0   # a fraction of numerals is read as its value


def test_reward_returns_that_would_be_misread_are_errors():
    # a dict was read by its keys; 10**400 raised a bare OverflowError; a total past fp32 became inf in
    # the advantages and the step was skipped unexplained
    rows = dict(prompts=["a", "b", "c"], completions=["x", "y", "z"], columns={})
    for returned, match in (({0: 1.0, 1: 2.0, 2: 3.0}, "got a dict"), ("abc", "got a str"),
                            ([1.0, 10 ** 400, 0.0], "returned 1000000.* for row 1.*finite numbers")):
        with pytest.raises(RewardError, match=match):
            RewardSet([lambda prompts, completions, r=returned, **kw: r]).score(**rows)
    rs = RewardSet([lambda prompts, completions, **kw: [1e30, 1.0, 2.0]], weights=[1e10])
    with pytest.raises(RewardError, match=r"row 0: the weighted reward total 1e\+40 is beyond float32's range"):
        rs.total(rs.score(**rows))


def test_float_length_decimals_past_floats_range_are_compared_not_raised(monkeypatch):
    # float() of 123456789012345e400 raised OverflowError out of answers_match: one such completion
    # failed the whole batch's reward call (RewardError), stopping the run
    monkeypatch.setitem(sys.modules, "math_verify", None)
    assert answers_match("123456789012345e400", "5") is False
    assert answers_match("7", "1.23456789012345e400") is False
    assert answers_match("1.23456789012345e400", "1.234567890123450000001e400") is True
    assert answers_match("1.23456789012345e400", "1.23456789099999e400") is False
    assert _accuracy("123456789012345e400", "5") == 0.0


def test_a_relation_sign_before_a_number_is_not_the_number(with_math_verify):
    # math-verify drops a relation sign that opens an answer and reads the number alone: \\neq 5, ≠5, \\ge 5 and \\lt 5
    # scored 1 against the gold 5, and \\lt 5 against \\le 5
    for wrong in ("\\neq 5", "≠5", "\\ne 5", "$\\neq 5$", "\\leq 5", "\\geq 5", "≤ 5", "\\lt 5", "\\gt 5", "<5", ">= 5"):
        assert _accuracy(wrong, "5") == 0.0 and _accuracy("5", wrong) == 0.0, wrong
    assert _accuracy("\\lt 5", "\\le 5") == 0.0 and _accuracy("\\ge 5", "\\le 5") == 0.0
    # negated and other order relations too (math-verify dropped them as well)
    for wrong in ("\\ngeq 5", "\\nleq 5", "\\not< 5", "\\not\\le 5", "\\ll 5", "\\gg 5", "≮5", "\\geqq 5"):
        assert _accuracy(wrong, "5") == 0.0, wrong
    assert _accuracy("\\leqq 5", "\\le 5.0") == 1.0 and _accuracy("\\not\\leq 5", "\\nleq 5") == 1.0
    # inside a \\boxed{} too, alone or after prose: math-verify reads the box
    for wrong in ("$\\boxed{\\neq 5}$", "The answer is \\boxed{\\ge 5}.", "\\boxed{\\boxed{\\ne 5}}"):
        assert _accuracy(wrong, "5") == 0.0, wrong
    assert _accuracy("so \\boxed{\\le 5}", "\\leq 5") == 1.0
    # `=` states the value; the same relation before equal values is one answer; <1,2> holds angle brackets
    for right, gold in (("\\le 5", "≤ 5.0"), ("\\leqslant 5", "\\leq 5"), ("\\lt 5", "<5"),
                        ("<= 5", "\\le 5"), ("\\neq 5", "≠5"), ("<1,2>", "<1,2>")):
        assert _accuracy(right, gold) == 1.0, (right, gold)
    if with_math_verify:
        assert _accuracy("=5", "5") == _accuracy("x = 5", "5") == _accuracy("\\geq \\frac{1}{2}", "\\ge 0.5") == 1.0


def test_scientific_notation_is_a_number(with_math_verify):
    # math-verify read 6.02e23 as 6.02*e*23: 6.02 \\times 10^{23} scored 0 against it; and it rounds floats to 6 decimal
    # places, so -1.6 \\times 10^{-19} scored 1 against 1.6 \\times 10^{-19}. Both forms are now numbers (also without it)
    from r1fast.rewards.builtin import vote_key

    for a, b in (("6.02 \\times 10^{23}", "6.02e23"), ("2 \\times 10^3", "2000"), ("3\\cdot10^8", "3.0e8"),
                 ("-2.5 \\cdot 10^{-2}", "-0.025"), ("2 × 10^3", "2e3"), ("$1.6 \\times 10^{-19}$", "1.6e-19")):
        assert _accuracy(a, b) == _accuracy(b, a) == 1.0 and vote_key(a) == vote_key(b), (a, b)
    for a, b in (("1.6 \\times 10^{-19}", "-1.6 \\times 10^{-19}"), ("1.6e-19", "-1.6 \\times 10^{-19}"),
                 ("6.02e23", "6.03 \\times 10^{23}"), ("2e3", "2 \\times 10^{4}"),
                 # an exponent without braces, as plain text writes it: read whole (these scored 1)
                 ("-1.6 × 10^-19", "1.6 \\times 10^{-19}"), ("1.7 \\times 10^-19", "1.6e-19"), ("9.1 × 10^-31", "9.11e-31")):
        assert _accuracy(a, b) == _accuracy(b, a) == 0.0, (a, b)
    for a, b in (("1.6 × 10^-19", "1.6 \\times 10^{-19}"), ("6.02 \\times 10^23", "6.02e23")):
        assert _accuracy(a, b) == _accuracy(b, a) == 1.0 and vote_key(a) == vote_key(b), (a, b)
    if with_math_verify:   # an exponent against other LaTeX: given to math-verify as 1.5 \\times 10^{-3}
        assert _accuracy("1.5e-3", "\\frac{3}{2000}") == _accuracy("\\frac{3}{2000}", "1.5e-3") == 1.0


def test_scientific_notation_with_a_star_is_a_number(with_math_verify):
    # a `*` before 10^ was no times sign to the number reader: 6.6*10^{-27} went to math-verify, which rounds, and scored
    # 1 against 7.7*10^{-27} and against 6.6e-26; 1.9*10^-2 (10^{-}2 to math-verify) scored 0 against 1.9e-2
    import random

    from r1fast.rewards.builtin import vote_key

    m, e = random.randrange(11, 99) / 10, random.randrange(-40, -3)
    for a, b in ((f"{m}*10^{{{e}}}", f"{m}e{e}"), (f"{m}*10^{e}", f"{m} \\times 10^{{{e}}}"), (f"{m} * 10^{e}", f"{m}e{e}")):
        assert _accuracy(a, b) == _accuracy(b, a) == 1.0 and vote_key(a) == vote_key(b), (a, b)
    for a, b in ((f"{m}*10^{{{e}}}", f"{m}*10^{{{e + 1}}}"), (f"{m}*10^{{{e}}}", f"{round(m + 1.1, 1)}*10^{{{e}}}"),
                 (f"-{m}*10^{e}", f"{m}e{e}"), (f"{m}*10^{{{e}}}", f"{m}e{e + 1}")):
        assert _accuracy(a, b) == _accuracy(b, a) == 0.0, (a, b)


def test_math_verify_s_rounding_does_not_make_small_numbers_equal():
    # math-verify rounds a float to 6 decimal places and chops tiny differences: every two numbers below a millionth were
    # one answer to it, so given to it (x = ..., brackets, a unit it drops) a wrong sign or mantissa scored 1
    pytest.importorskip("math_verify")
    import random

    m, e = random.randrange(11, 99) / 10, random.randrange(-40, -20)
    other = round(m + random.choice([-1, 1]) * 0.5, 1)
    value = f"{m} \\times 10^{{{e}}}"
    for a, b in ((f"x = -{value}", value), (f"x = {other} \\times 10^{{{e}}}", f"{m}e{e}"), (f"({value})", f"{other}e{e}"),
                 (f"{value} \\text{{ J·s}}", f"-{value} \\text{{ J·s}}"), (f"{value} \\text{{ apples}}", f"{m}e{e + 1} \\text{{ apples}}"),
                 ("0.00000066 apples", "0.00000077 apples"), (f"\\frac{{1}}{{{m * 10}}} \\cdot 10^{{{e}}}", f"\\frac{{1}}{{{other * 10}}} \\cdot 10^{{{e}}}")):
        assert _accuracy(a, b) == _accuracy(b, a) == 0.0, (a, b)
    # the same numbers still match, and so do math-verify's own roundings of larger ones
    for a, b in ((f"x = {value}", f"{m}e{e}"), (f"({value})", value), (f"{value} \\text{{ J·s}}", f"{m}\\cdot10^{{{e}}}\\,\\text{{J·s}}"),
                 ("0.785398", "\\frac{\\pi}{4}"), ("0.333333", "\\frac{1}{3}"), ("x = 0.5", "0.5000001"), ("50\\%", "\\frac{1}{2}")):
        assert _accuracy(a, b) == _accuracy(b, a) == 1.0, (a, b)


def test_e_notation_opening_a_longer_answer_is_a_number_to_math_verify():
    # math-verify read 6.63e-34 as 6.63*e - 34: a number in e notation before a unit r1fast does not read, or after x =,
    # scored 0 against the same number written with \\times 10^
    pytest.importorskip("math_verify")
    import random

    m, e = random.randrange(11, 99) / 10, random.randrange(-40, 40)
    value, other = f"{m} \\times 10^{{{e}}}", f"{round(m + 0.7, 1)} \\times 10^{{{e}}}"
    for a, b in ((f"{m}e{e} \\text{{ J·s}}", f"{value} \\text{{ J·s}}"), (f"x = {m}e{e}", value), (f"{m}E{e}\\,\\text{{kg m/s}}", value)):
        assert _accuracy(a, b) == _accuracy(b, a) == 1.0, (a, b)
    for a, b in ((f"{m}e{e} \\text{{ J·s}}", f"{other} \\text{{ J·s}}"), (f"x = {m}e{e}", other), (f"x = {m}e{e}", f"-{value}")):
        assert _accuracy(a, b) == _accuracy(b, a) == 0.0, (a, b)
    # elsewhere it may be Euler's e, and is read as math-verify reads it
    assert _accuracy("e^{2e-1}", "e^{-1+2e}") == _accuracy("3e+2x", "2x+3e") == 1.0


def test_a_percentage_is_its_number_or_its_hundredth(with_math_verify):
    # math-verify takes 50\\% for 50 and for 0.5, but a fraction of a percent for its hundredth only: the right answer
    # 12.5\\% scored 0 against the gold 12.5 (and without math-verify 50% against 50 too)
    for a, b in (("12.5\\%", "12.5"), ("12.5%", "0.125"), ("$12.5\\%$", "12.5"), ("12.5 \\%", "12.5"), ("\\boxed{12.5\\%}", "12.5"), ("50%", "50"),
                 ("50%", "0.5"), ("50%", "50.0\\%"), ("12.5%.", "12.5"), ("$12.5\\%$.", "0.125"), ("12.5\\%,", "12.5")):
        assert _accuracy(a, b) == _accuracy(b, a) == 1.0, (a, b)
    for a, b in (("12.5\\%", "12.6"), ("50%", "5"), ("12.5%", "1.25"), ("%", "5"), ("12.5%", "13%")):
        assert _accuracy(a, b) == _accuracy(b, a) == 0.0, (a, b)


def test_a_percentage_written_with_latex_is_its_number_or_its_hundredth():
    # math-verify reads 33\\frac{1}{3}\\% as 33 and \\frac{1}{2}\\% as nothing: 12\\frac{1}{2}\\% scored 1 against the gold
    # 12 and 2\\sqrt{2}\\% against 2, while the right 33\\frac{1}{3}\\% scored 0 against \\frac{1}{3} and 33\\frac{1}{3}
    # (without math-verify LaTeX answers score 0)
    pytest.importorskip("math_verify")
    import random
    from fractions import Fraction

    whole, den = random.randrange(2, 90), random.choice([3, 7, 9, 11])
    num = random.randrange(1, den)
    mixed = f"{whole}\\frac{{{num}}}{{{den}}}"
    value = whole + Fraction(num, den)
    for a, b in ((f"{mixed}\\%", mixed), (f"{mixed}\\%", f"\\frac{{{value.numerator}}}{{{value.denominator}}}"),
                 (f"{mixed}\\%", f"\\frac{{{(value / 100).numerator}}}{{{(value / 100).denominator}}}"),
                 (f"${mixed}\\%$.", f"\\frac{{{value.numerator}}}{{{value.denominator}}}\\%"),
                 (f"\\frac{{{value.numerator}}}{{{value.denominator}}}\\%", f"{(value / 100).numerator}/{(value / 100).denominator}"),
                 ("12\\frac{1}{2}\\%", "12.5\\%"), ("12\\frac{1}{2}\\%", "0.125")):
        assert _accuracy(a, b) == _accuracy(b, a) == 1.0, (a, b)
    # not its whole part, nor one percentage's number against the other's hundredth
    for a, b in ((f"{mixed}\\%", str(whole)), ("2\\sqrt{2}\\%", "2"), ("\\frac{1}{2}\\%", "50\\%"),
                 (f"{mixed}\\%", f"{whole + 1}\\frac{{{num}}}{{{den}}}")):
        assert _accuracy(a, b) == _accuracy(b, a) == 0.0, (a, b)


def test_a_huge_power_off_the_main_thread_is_refused_not_computed():
    # sympy computed 2^{10^{100}} with one int pow holding the GIL: off the main thread (where math-verify
    # has no time limit) the reward call, and every other thread of the process, never came back
    pytest.importorskip("math_verify")
    import subprocess
    import textwrap

    code = textwrap.dedent("""
        import threading
        from r1fast.rewards import accuracy_reward
        got = []
        t = threading.Thread(target=lambda: got.append(accuracy_reward(
            None, ["<answer>2^{10^{100}}</answer>", "<answer>(2^{10})^{9^{9^{9}}}</answer>", "<answer>2^{10}</answer>"],
            answer=["42", "42", "1024"])))
        t.start()
        t.join()
        print(got)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[[0.0, 0.0, 1.0]]"


@pytest.mark.parametrize("off_main", [False, True])
def test_math_verify_has_one_time_limit_on_any_thread(off_main, monkeypatch):
    # brackets nested 150 deep: math-verify parsed them for 5 s per try on the main thread and for
    # 20 s and more off it (no limit there); a collapsed policy repeating such an answer paid it per completion
    pytest.importorskip("math_verify")
    import random
    import threading
    import time

    from r1fast.rewards import matching

    monkeypatch.setattr(matching, "MATH_VERIFY_TIMEOUT_S", 0.5)
    monkeypatch.setattr(matching, "_MAX_NESTING", 1000)   # past the check that keeps such junk from math-verify
    junk = "(" * 150 + str(random.randrange(10**9)) + ")" * 150   # fresh: no cached verdict
    got = []

    def score():
        t = time.process_time()   # CPU time: math-verify's parse spins the CPU until the limit ends it
        got.append(accuracy_reward(None, [f"<answer>{junk}</answer>"] * 8 + ["<answer>\\frac{1}{2}</answer>"],
                                   answer=["42"] * 8 + ["0.5"]))
        got.append(time.process_time() - t)

    if off_main:
        t = threading.Thread(target=score)
        t.start()
        t.join()
    else:
        score()
    assert got[0] == [0.0] * 8 + [1.0]
    # ~1 s on an idle 2-core box; without the limit ~47 s. In CPU time, which other processes on a busy machine
    # do not add to (their wall clock: 9.7 s seen with four other processes on two cores)
    assert got[1] < 15.0


@pytest.mark.parametrize("off_main", [False, True])
def test_call_with_deadline_stops_python_loops_and_leaves_other_alarms(off_main):
    import signal
    import threading
    import time

    from r1fast.rewards.deadline import OutOfTime, call_with_deadline

    def spin():
        while True:
            try:
                time.sleep(0.001)
            except Exception:   # what math-verify and sympy do: the limit must not be swallowed
                pass

    got = []

    def run():
        t = time.perf_counter()
        try:
            call_with_deadline(spin, 0.2)
        except OutOfTime:
            got.append(time.perf_counter() - t)
        got.append(call_with_deadline(lambda: 7, 0.05))
        time.sleep(0.2)   # a limit that was not reached never fires later
        got.append("after")

    if off_main:
        t = threading.Thread(target=run)
        t.start()
        t.join()
        assert got[0] < 2.0 and got[1:] == [7, "after"]
        return
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 5.0)
        run()
        left, _ = signal.setitimer(signal.ITIMER_REAL, 0)
        assert got[0] < 2.0 and got[1:] == [7, "after"]
        assert 3.0 < left < 5.0 and not fired   # someone else's timer is put back, less the time spent
    finally:
        signal.signal(signal.SIGALRM, previous)


def test_a_set_of_rewards_is_refused_not_read_in_its_own_order():
    # `{len(c) for c in completions}` (a set comprehension for a list one) was read in the set's order:
    # each row silently got another row's reward
    rs = RewardSet([lambda prompts, completions, **kw: {float(len(c)) for c in completions}])
    with pytest.raises(RewardError, match="<lambda>.*got a set"):
        rs.score(["p"] * 3, ["ccc", "a", "bb"], {})


def test_a_scalar_tensor_or_array_is_a_reward_error_naming_the_function():
    # a 0-d tensor has __len__ but len() raises: a bare "TypeError: len() of a 0-d tensor" stopped the run
    import numpy as np
    import torch

    for value in (torch.tensor(0.7), np.array(0.7)):
        rs = RewardSet([lambda prompts, completions, value=value, **kw: value])
        with pytest.raises(RewardError, match="<lambda>.*list of 2 rewards"):
            rs.score(["p", "p"], ["a", "b"], {})


def test_async_reward_functions_are_awaited_together_as_trl_does():
    # an `async def` reward (a remote judge) returned a coroutine: "got coroutine", and Python's "never awaited"
    import asyncio

    events = []

    async def judge(prompts, completions, answer, **kw):
        events.append("judge waits")
        await asyncio.sleep(0.3)   # the two judges wait at the same time, not one after the other
        events.append("judge answered")
        return [float(c == a) for c, a in zip(completions, answer)]

    async def length(prompts, completions, **kw):
        events.append("length waits")
        await asyncio.sleep(0.3)
        events.append("length answered")
        return [len(c) / 10 for c in completions]

    async def broken(prompts, completions, **kw):
        raise ConnectionError("judge unreachable")

    rs = RewardSet([judge, lambda prompts, completions, **kw: [0.5] * len(completions), length], weights=[1, 1, 2])
    table = rs.score(["p", "q"], ["7", "8x"], {"answer": ["7", "9"]})
    assert table == [[1.0, 0.0], [0.5, 0.5], [0.1, 0.2]]
    # both were waiting before either answered (one after the other: judge waits, judge answered, length waits);
    # the order of the events, not the time taken, which a busy machine stretches
    assert events[:2] == ["judge waits", "length waits"] and len(events) == 4, events
    assert rs.total(table) == pytest.approx([1.7, 0.9])

    async def inside_a_running_loop():   # a notebook's thread already runs an event loop
        return rs.score(["p"], ["7"], {"answer": ["7"]})

    assert asyncio.run(inside_a_running_loop()) == [[1.0], [0.5], [0.1]]
    with pytest.raises(RewardError, match="'broken' raised ConnectionError: judge unreachable"):
        RewardSet([broken]).score(["p"], ["7"], {})

    async def two(prompts, completions, **kw):
        return [1.0, 2.0]

    with pytest.raises(RewardError, match="'two' must return a list of 1 reward, one per completion"):   # its values are checked too
        RewardSet([two]).score(["p"], ["7"], {})


def test_an_async_reward_function_that_raises_is_named_with_its_row():
    # a plain function's failing row was found by calling it on parts of the batch; an `async def` one (the
    # remote judge the search saves calls of) raises only when awaited, and its error named no row
    calls = []

    async def as_int(prompts, completions, answer, **kw):
        calls.append((list(prompts), list(answer)))
        return [float(int(a)) for a in answer]

    with pytest.raises(RewardError, match=r"'as_int' raised ValueError: .* on row 2 \(prompt 'q2'"):
        RewardSet([as_int]).score(["q0", "q1", "q2", "q3"], ["a"] * 4, {"answer": ["1", "2", "x", "y"]})
    # each part of the batch with its own rows' prompts and columns, the first failing row (not row 3) named
    assert calls == [(["q0", "q1", "q2", "q3"], ["1", "2", "x", "y"]), (["q0", "q1"], ["1", "2"]),
                     (["q2"], ["x"])]


def test_gsm8k_solution_gold_is_read_by_its_final_hash_line(with_math_verify):
    # GSM8K's `answer` column is a worked solution ending in "#### N". Read whole, math-verify paid for the
    # first number after "answer is" in the prose (5 here, not 15) and without math-verify every answer scored 0.
    import random

    a, b = random.randint(2, 9), random.randint(11, 99)
    gold = (f"So the answer is {a} per hour.\nThen {a}*{b}=<<{a}*{b}={a * b}>>{a * b} in all, "
            f"{a * b:,} cents.\n#### {a * b}\n")
    for col in ("answer", "solution"):
        scores = [accuracy_reward(["p"], [f"<think>x</think><answer>{p}</answer>"], **{col: [gold]})[0]
                  for p in (a * b, f"{a * b:,}", f"{a * b}.", a, b)]
        assert scores == [1.0, 1.0, 1.0, 0.0, 0.0], (col, scores)
    neg = "She loses 5-8=<<5-8=-3>>-3 points.\n#### -3"
    assert [_accuracy(p, neg) for p in ("-3", "3", "5")] == [1.0, 0.0, 0.0]
    assert _accuracy(".75", "3/4 of it.\n####  0.75") == 1.0
    # "####" not on the last line is not GSM8K's final answer
    from r1fast.rewards.builtin import gold_text

    assert gold_text("#### 7") == "7" and gold_text("#### 7\nthen 8") == "#### 7\nthen 8"


def test_reading_a_gsm8k_final_line_is_linear_in_the_gold():
    # the final-line regex's lazy answer before `\s*\Z` rescanned the rest of the line from each character: a gold of
    # "####x", 20k spaces and "y" took 7 s in gold_text, which runs on every row of every step
    import time

    from r1fast.rewards.builtin import gold_text

    for gold in ("####x" + " " * 20_000 + "y", "#### 5" + " \r" * 10_000 + "y"):
        t = time.process_time()   # CPU time: a busy machine's other processes stretch the wall clock, not this
        assert gold_text(gold) == gold[4:].lstrip()
        assert time.process_time() - t < 0.5
    # what the last line holds, blank lines and spaces around it aside
    assert gold_text("x\n  ####  -3 \n\n") == "-3" and gold_text("a\n####\n\n") == "a\n####\n\n"
    assert gold_text("#### 7\r\n") == "7" and gold_text("5\n# ### 7") == "5\n# ### 7"


def test_a_text_answer_matches_its_words_in_latex_text(with_math_verify):
    # MATH golds such as \text{Evelyn} or \text{odd}: the bare word (a model's natural answer) scored 0, as
    # math-verify finds nothing to compare in prose
    import random

    name = random.choice(["Evelyn", "Brenda", "Tuesday"])
    for pred, gold, ok in ((name, rf"\text{{{name}}}", 1.0), (name.lower() + ".", rf"$\text{{{name}}}$", 1.0),
                           (rf"\textbf{{{name}}}", name, 1.0), ("odd", r"\text{ odd }", 1.0),
                           (name[:3], rf"\text{{{name}}}", 0.0), ("even", r"\text{odd}", 0.0), ("no", r"\text{yes}", 0.0),
                           (r"\sqrt{odd}", r"\text{odd}", 0.0)):
        assert _accuracy(pred, gold) == ok, (pred, gold)


def test_a_reward_call_past_reward_timeout_stops_with_an_error_naming_it():
    # a judge or sandbox that never answered (or a pathological input) hung training for ever: no time limit
    import asyncio
    import threading
    import time

    release = threading.Event()

    def stuck_judge(prompts, completions, **kw):
        release.wait(30)
        return [1.0] * len(completions)

    async def stuck_async_judge(prompts, completions, **kw):
        await asyncio.sleep(30)
        return [1.0] * len(completions)

    try:
        for fn in (stuck_judge, stuck_async_judge):
            t0 = time.monotonic()
            with pytest.raises(RewardError, match=rf"'{fn.__name__}' did not return within reward_timeout = 0.2 s "
                                                  r"on a batch of 3 completions"):
                RewardSet([fn], timeout=0.2).score(["p"] * 3, ["a", "b", "c"], {})
            assert time.monotonic() - t0 < 5.0
    finally:
        release.set()

    # within the limit nothing changes: values, a TimeoutError of the function's own, the failing row's search
    def picky(prompts, completions, **kw):
        return [1.0 / (len(c) - 3) for c in completions]

    async def own_timeout(prompts, completions, **kw):
        raise TimeoutError("judge said so")

    rs = RewardSet([picky, lambda prompts, completions, **kw: [0.5] * len(completions)], timeout=5)
    assert rs.score(["p", "q"], ["abcd", "abcde"], {}) == [[1.0, 0.5], [0.5, 0.5]]
    with pytest.raises(RewardError, match=r"'picky'.*ZeroDivisionError.*row 1 "):
        rs.score(["a", "b", "c"], ["abcdef", "xyz", "abcdefg"], {})
    with pytest.raises(RewardError, match="'own_timeout' raised TimeoutError: judge said so on row 0"):
        RewardSet([own_timeout], timeout=5).score(["p"], ["x"], {})
    for bad in (0, -1.0, float("inf"), float("nan"), True, "5"):
        with pytest.raises(ValueError, match="reward timeout must be a positive number of seconds"):
            RewardSet([picky], timeout=bad)


def test_the_failing_row_search_is_bounded_by_reward_timeout_too():
    # the search calls the function again: a call there that hangs must not hang the error report
    import threading

    release = threading.Event()
    calls = []

    def raises_then_hangs(prompts, completions, **kw):
        calls.append(len(completions))
        if len(calls) == 1:
            raise ValueError("bad batch")
        release.wait(30)
        return [1.0] * len(completions)

    try:
        with pytest.raises(RewardError, match=r"ValueError: bad batch \(called again on part of the batch to find "
                                              r"the row, it ran past reward_timeout = 0.2 s there"):
            RewardSet([raises_then_hangs], timeout=0.2).score(["p"] * 4, ["x"] * 4, {})
    finally:
        release.set()
    assert calls == [4, 2]


def test_reward_timeout_bounds_an_async_function_that_blocks_its_loop_or_waits_on_a_thread():
    # asyncio.wait cannot end a synchronous call inside `async def`, and asyncio.run, after cancelling a function
    # waiting on asyncio.to_thread, joined that thread: both held score() until the judge answered (never)
    import asyncio
    import threading
    import time

    release = threading.Event()

    async def blocks_its_loop(prompts, completions, **kw):
        release.wait(30)
        return [1.0] * len(completions)

    async def waits_on_a_thread(prompts, completions, **kw):
        await asyncio.to_thread(release.wait, 30)
        return [1.0] * len(completions)

    try:
        for fn, fate in ((blocks_its_loop, "it blocked its event loop"), (waits_on_a_thread, "it was cancelled")):
            t0 = time.monotonic()
            with pytest.raises(RewardError, match=rf"'{fn.__name__}' did not return within reward_timeout = 0.2 s "
                                                  rf"on a batch of 2 completions \({fate}"):
                RewardSet([fn], timeout=0.2).score(["p"] * 2, ["a", "b"], {})
            assert time.monotonic() - t0 < 2.0
    finally:
        release.set()

    async def quick(prompts, completions, **kw):
        await asyncio.sleep(0)
        return [0.25] * len(completions)

    assert RewardSet([quick, waits_on_a_thread], timeout=5).score(["p"], ["a"], {}) == [[0.25], [1.0]]


def test_a_reward_loop_that_a_busy_machine_pauses_still_reports_its_function_as_cancelled(monkeypatch):
    # the wait for the loop's thread ended half a second past reward_timeout: a loop thread paused longer than that
    # (a busy machine) had the function it cancelled reported as one that "blocked its event loop"
    import asyncio
    import threading
    import time

    real_wait = asyncio.wait

    async def paused_after_its_wait(*args, **kwargs):
        done = await real_wait(*args, **kwargs)
        time.sleep(1.0)   # the loop's thread not scheduled for a second once its own limit has passed
        return done

    monkeypatch.setattr(asyncio, "wait", paused_after_its_wait)
    release = threading.Event()

    async def waits_on_a_thread(prompts, completions, **kw):
        await asyncio.to_thread(release.wait, 30)
        return [1.0] * len(completions)

    try:
        with pytest.raises(RewardError, match=r"'waits_on_a_thread' did not return within reward_timeout = 0.2 s on a "
                                              r"batch of 1 completions \(it was cancelled\)"):
            RewardSet([waits_on_a_thread], timeout=0.2).score(["p"], ["a"], {})
    finally:
        release.set()


def test_a_reward_that_needs_the_main_thread_says_reward_timeout_moved_it_off_it():
    # with reward_timeout each call runs on a worker thread: a function's own signal.alarm limit (math-verify's
    # defaults), asyncio.get_event_loop() or a sqlite3 connection opened on the main thread worked without the option
    # and raised with it, the error not saying why
    import asyncio
    import signal

    def own_alarm(prompts, completions, **kw):
        signal.signal(signal.SIGALRM, signal.getsignal(signal.SIGALRM))
        return [1.0] * len(completions)

    def loop_of_the_thread(prompts, completions, **kw):
        asyncio.get_event_loop()
        return [1.0] * len(completions)

    import sqlite3

    cache = sqlite3.connect(":memory:")   # opened on this thread, as at a module's import

    def sqlite_cache(prompts, completions, **kw):
        cache.execute("select 1").fetchone()
        return [1.0] * len(completions)

    for fn in (own_alarm, loop_of_the_thread, sqlite_cache):
        with pytest.raises(RewardError, match=rf"'{fn.__name__}' raised .*with reward_timeout set, each call runs on a "
                                              r"worker thread, where signals and asyncio.get_event_loop\(\)"):
            RewardSet([fn], timeout=5).score(["p"], ["a"], {})
    assert RewardSet([own_alarm], timeout=None).score(["p"], ["a"], {}) == [[1.0]]
    assert RewardSet([sqlite_cache], timeout=None).score(["p"], ["a"], {}) == [[1.0]]


def test_a_reward_call_on_a_worker_thread_sees_the_callers_grad_mode():
    # grad and inference mode are per thread: with reward_timeout (or from a notebook's running loop) a reward
    # model judge called under torch.no_grad() ran with grad enabled on the worker, building autograd graphs
    import asyncio

    import torch

    seen = []

    def judge(prompts, completions, **kw):
        seen.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
        return [1.0] * len(completions)

    async def async_judge(prompts, completions, **kw):
        return judge(prompts, completions)

    for fn in (judge, async_judge):
        for mode, expected in ((torch.no_grad, (False, False)), (torch.inference_mode, (False, True)),
                               (torch.enable_grad, (True, False))):
            seen.clear()
            with mode():
                assert RewardSet([fn], timeout=5).score(["p"], ["a"], {}) == [[1.0]]
            assert seen == [expected], (fn.__name__, mode.__name__)

    async def from_a_notebook():   # its loop is running: the async function runs on another thread
        with torch.no_grad():
            return RewardSet([async_judge]).score(["p"], ["a"], {})

    seen.clear()
    assert asyncio.run(from_a_notebook()) == [[1.0]]
    assert seen == [(False, False)]


def _cli_past_a_reward_call_left_running_in_torch(command: str):
    """A process that leaves a judge running in a torch op past reward_timeout (on its daemon thread), then runs
    `command`; the interpreter's shutdown used to end the thread there and abort ('terminate called without an
    active exception', status 134)."""
    import subprocess
    import textwrap

    code = textwrap.dedent("""
        import sys, torch
        import r1fast.cli as cli
        from r1fast.rewards import RewardSet, RewardTimeout

        def judge(prompts, completions, **kw):
            a = torch.randn(300, 300)
            while True:
                a = (a @ a).tanh()   # the GIL is released inside the op

        try:
            RewardSet([judge], timeout=0.05).score(["p"], ["c"], {})
        except RewardTimeout:
            pass
    """) + textwrap.dedent(command)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "terminate called" not in out.stderr
    return out


def test_the_cli_exits_with_its_status_past_a_reward_call_left_running_in_torch():
    out = _cli_past_a_reward_call_left_running_in_torch("""
        sys.argv = ["r1fast", "no-such-command"]   # argparse's SystemExit(2) through the command's exit
        sys.exit(cli.main())
    """)
    assert out.returncode == 2 and "invalid choice: 'no-such-command'" in out.stderr, out.stderr[-2000:]


def test_a_reward_call_on_a_worker_thread_sees_the_callers_context_variables():
    # a thread starts with empty context variables: with reward_timeout a reward comparing answers with decimal at the
    # caller's 50 digits computed at the default 28 (other scores than without the option), and a ContextVar the
    # caller had set (a tracer's span) read its default
    import contextvars
    import decimal

    span = contextvars.ContextVar("span", default="unset")
    seen = []

    def digits(prompts, completions, **kw):
        seen.append(span.get())
        return [float(len(str(decimal.Decimal(1) / decimal.Decimal(3)))) for _ in completions]

    async def async_digits(prompts, completions, **kw):
        return digits(prompts, completions)

    def run():
        decimal.getcontext().prec = 50
        span.set("step 7")
        return [RewardSet([digits, async_digits], timeout=t).score(["p"], ["a"], {}) for t in (None, 5)]

    without, with_timeout = contextvars.copy_context().run(run)   # the test's own context stays as it was
    assert without == with_timeout == [[52.0], [52.0]]
    assert seen == ["step 7"] * 4


def test_the_cli_ends_a_traceback_as_python_does_past_a_reward_call_left_running_in_torch():
    # only the command's status and SystemExit were handled: an error no command caught (a traceback) or a Ctrl-C
    # that reached main still went through the interpreter's shutdown, which aborted the process (status 134)
    out = _cli_past_a_reward_call_left_running_in_torch("""
        def failing(argv):
            raise RuntimeError("a bug")

        cli._run = failing
        sys.argv = ["r1fast"]
        sys.exit(cli.main())
    """)
    assert out.returncode == 1 and "RuntimeError: a bug" in out.stderr, out.stderr[-2000:]


def test_a_reward_set_names_its_own_keyword_for_a_configs_option():
    # RewardSet(['length']) said "needs length_penalty_target set", the config's option, and the caller who then
    # passed length_penalty_target= got "unexpected keyword argument" naming no way on
    with pytest.raises(ValueError, match=r"reward 'length' needs length_target=<tokens> \(a config's "
                                         r"length_penalty_target\)"):
        RewardSet(["length"])
    with pytest.raises(TypeError, match=r"'length_penalty_target' \(the config's option; RewardSet's keyword is "
                                        r"length_target\); it takes funcs, weights, timeout"):
        RewardSet(["length"], length_penalty_target=5)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) 'judge_url'; it takes"):
        RewardSet(["format"], judge_url="http://x")
    assert RewardSet(["length"], length_target=5).names == ["length"]


def test_a_reward_set_takes_its_functions_from_a_generator():
    # 66f07be's check for 'length' read the functions into a list and let the generator go: the set then read it
    # again, empty, and scored with no function at all (len 0, no error)
    rewards = RewardSet(name for name in ["format", "accuracy"])
    assert rewards.names == ["format", "accuracy"] and rewards.specs == ["format", "accuracy"]
    with pytest.raises(ValueError, match="at least one reward function"):
        RewardSet(name for name in [])


def test_a_row_without_an_answer_is_scored_against_its_solution():
    # datasets merged for TRL hold `answer` in some rows and only `solution` in others: those rows went unscored
    comps = ["<answer>5</answer>", "<answer>7</answer>", "<answer>7</answer>", "<answer>1</answer>", "x"]
    answer = ["5", None, float("nan"), "", None]
    solution = [None, "so \\boxed{7}", "#### 7", "<answer>2</answer>", None]
    assert accuracy_reward(["p"] * 5, comps, answer=answer, solution=solution) == [1.0, 1.0, 1.0, 0.0, None]
    # a row's own answer wins over its solution
    assert accuracy_reward(["p"], ["<answer>3</answer>"], answer=["3"], solution=["\\boxed{9}"]) == [1.0]
    # a RewardSet passes both columns as the trainers do
    table = RewardSet(["accuracy"]).score(["p"] * 2, ["<answer>5</answer>"] * 2,
                                          {"answer": ["5", None], "solution": [None, "\\boxed{5}"]})
    assert table == [[1.0, 1.0]]


def test_an_evaluation_scores_a_row_without_an_answer_against_its_solution():
    from r1fast.trainer.evaluate import check_eval_answers, score_completions

    out, acc = score_completions(["q"] * 2, ["<answer>4</answer>"] * 2, ["4", None], 1, solutions=[None, "\\boxed{4}"])
    assert acc == [1.0, 1.0] and out["eval/accuracy"] == 1.0
    check_eval_answers([{"answer": None, "solution": "\\boxed{4}"}], "answer", "rows")   # a reference: no error
    with pytest.raises(ValueError, match="no row has a reference"):
        check_eval_answers([{"answer": None, "solution": None}], "answer", "rows")


def test_a_held_out_rows_boolean_answer_is_refused_naming_its_row_line_and_column(tmp_path):
    # a held-out set's boolean gold was "a reference answer holds the boolean True" (no row, line or column) when in
    # the first row with an answer, and otherwise the accuracy reward's error after sampling, its "row" a sample's
    # index; a training set's bad row is named with its file line and column, and so is this one now
    import json
    import random

    from r1fast.data import load_rows
    from r1fast.trainer.evaluate import check_eval_answers

    n = random.randrange(3, 9)
    bad = random.randrange(n)
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(n)]
    rows[bad]["answer"] = random.choice([True, False])
    path = tmp_path / "held.jsonl"
    path.write_text("\n" + "".join(json.dumps(r) + "\n" for r in rows))   # a blank first line: row i is line i + 2
    with pytest.raises(ValueError, match=rf"^eval dataset rows: row {bad} \('.*held.jsonl' line {bad + 2}\): column "
                                         rf"'answer' holds the boolean {rows[bad]['answer']}, not an answer"):
        check_eval_answers(load_rows(str(path)), "answer", "eval dataset rows")
    # a row read by its solution, its answer missing: the solution's column is named
    rows[bad] = {"prompt": "q", "answer": None, "solution": False}
    with pytest.raises(ValueError, match=rf"^rows: row {bad}: column 'solution' holds the boolean False"):
        check_eval_answers(rows, "answer", "rows")
    rows[bad]["solution"] = "\\boxed{4}"
    check_eval_answers(rows, "answer", "rows")


def test_a_math_verify_check_that_ran_out_of_time_is_tried_again_later(monkeypatch):
    # a time-out was cached as a verdict: a right answer whose check ran out of time once (a busy machine)
    # scored 0 each time it came again
    pytest.importorskip("math_verify")
    import random

    from r1fast.rewards import matching

    n = random.randrange(10**6, 10**7)   # fresh: no cached verdict
    pred, gold = "\\sqrt{4}", f"\\dfrac{{{2 * n}}}{{{n}}}"   # not numbers to _as_number or _latex_number
    monkeypatch.setattr(matching, "MATH_VERIFY_TIMEOUT_S", 1e-4)
    assert not answers_match(pred, gold)   # ran out of time
    monkeypatch.setattr(matching, "MATH_VERIFY_TIMEOUT_S", 3.0)
    assert not answers_match(pred, gold)   # remembered for a while: a batch's repeats pay one time-out
    monkeypatch.setattr(matching, "MATH_VERIFY_TIMED_OUT_MEMORY_S", 0.0, raising=False)
    assert answers_match(pred, gold)       # then checked again


def test_thousands_separated_by_latex_or_spaces_are_one_number(with_math_verify):
    # math-verify read 1\,000 and 1 000 as the product 1*000: the answer scored 1 against a gold 0, 0 against 1000
    for written in ("1\\,000", "1 000", "1\\ 000", "1\\;000", "1~000", "1\u2009000", "1{,}000", "1,\\!000"):
        assert _accuracy(written, "1000") == 1.0, written
        assert _accuracy(written, "0") == 0.0, written
    assert _accuracy("-12\\,345\\,678.5", "-12345678.5") == 1.0
    assert _accuracy("1000", "\\$10,\\!000") == 0.0 and _accuracy("10000", "\\$10,\\!000") == 1.0
    assert _accuracy("3 5", "35") == 0.0   # a group of three digits only: not a separator
    # a leading 0 is no thousands group: 0,125 and 0{,}125 (a decimal comma, or a list) were read as 125
    for written, misread in (("0,125", "125"), ("0{,}125", "125"), ("-0,125", "-125")):
        assert _accuracy(written, misread) == 0.0, written


def test_a_separated_or_mixed_number_is_its_value_to_math_verify(with_math_verify):
    # given to math-verify as written, 1 000 was the product 1*000 and 1\u00a0005 was 5: against such a gold any
    # expression worth 0 (or 5) scored 1, though the plain numbers 0 and 5 did not
    assert _accuracy("\\sqrt{0}", "1 000") == 0.0 and _accuracy("0\\cdot 1", "1\\,000") == 0.0
    assert _accuracy("\\sqrt{25}", "1\u00a0005") == 0.0 and _accuracy("1 000", "0\\cdot 5") == 0.0
    if with_math_verify:
        assert _accuracy("10^3", "1 000") == 1.0 and _accuracy("\\frac{11}{4}", "2 3/4") == 1.0
        assert _accuracy("-\\frac{3}{2}", "-1 1/2") == 1.0 and _accuracy("\\frac{2001}{2}", "1\\,000.5") == 1.0


def test_looking_for_a_mixed_number_is_linear_in_a_junk_answer(monkeypatch):
    # _MIXED_RE.search, retried from every place, was quadratic before a number's text went to math-verify: a ratio
    # "1/", 20k spaces, "2" against a gold expression spent 14 s there, before math-verify's own deadline
    import time
    import types

    from r1fast.rewards import matching

    given = []
    monkeypatch.setitem(sys.modules, "math_verify", types.ModuleType("math_verify"))
    monkeypatch.setattr(matching, "_math_verify_match", lambda p, g: given.append((p, g)) or False)
    junk = "1/" + " " * 20_000 + "2"
    t = time.process_time()   # CPU time: a busy machine's other processes stretch the wall clock, not this
    assert not answers_match(junk, "x+1") and given == [(junk, "x+1")]
    assert time.process_time() - t < 0.5
    answers_match("-2  3 /4", "x"), answers_match("1 000", "y")
    assert given[1:] == [("-\\frac{11}{4}", "x"), ("1000", "y")]


def test_a_mixed_number_too_long_to_write_out_scores_0_without_raising(monkeypatch):
    # a mixed number is given to math-verify as its value, written out: one of two 2200-digit parts has more digits than
    # Python writes an int with (4300), and the ValueError left the accuracy reward, a RewardError that stopped training
    import random
    import types

    from r1fast.rewards import matching

    given = []
    monkeypatch.setitem(sys.modules, "math_verify", types.ModuleType("math_verify"))
    monkeypatch.setattr(matching, "_math_verify_match", lambda p, g: given.append((p, g)) or False)
    whole, part = (str(random.randrange(10**2199, 10**2200)) for _ in range(2))
    junk = f"{whole} {part}/{part}1"
    for gold in ("\\frac{1}{2}", "x+1"):
        assert _accuracy(junk, gold) == 0.0 and _accuracy(f"-{junk}", gold) == 0.0
    assert given == []
    answers_match(f"{whole} 1/2", "x")   # a long one Python can write is still given as its value
    assert given == [(f"\\frac{{{2 * int(whole) + 1}}}{{2}}", "x")]


def test_junk_nested_past_any_answer_is_not_given_to_math_verify(monkeypatch):
    # `{` x200, `(` x200, `[` x200, x^x^x... x100: math-verify's parser ran each to the 3 s limit, once per completion
    # of a step (a collapsed policy varies its junk, so the time-out memory saw each once)
    import random
    import types

    from r1fast.rewards import matching

    continued = "\\frac{1}{1+\\frac{1}{1+\\frac{1}{1+\\frac{1}{1+\\frac{1}{2}}}}}"   # 8/13
    if importlib.util.find_spec("math_verify") is not None:
        assert answers_match(continued, "8/13") and not answers_match(continued, "5/8")
    given = []
    monkeypatch.setitem(sys.modules, "math_verify", types.ModuleType("math_verify"))
    monkeypatch.setattr(matching, "_math_verify_match", lambda p, g: given.append(p) or False)
    n = random.randrange(10**6)
    for junk in ("{" * 200, "(" * 200 + "1", "[" * 200, "{{1}" * 60, "\\frac{1}{1+" * 100, "\\{" * 100,
                 "x" + "^x" * 100, "x" + "_x" * 100, "2" + "^ 2" * 50, "((1))" * 5 + "(" * 40):
        assert not answers_match(f"{junk} {n}", "x+1"), junk
    assert given == []
    realistic = [continued, "\\sqrt{2+\\sqrt{2+\\sqrt{2+\\sqrt{2}}}}", "f(g(h(x)))", "a_1^2+a_2^2", "2^3^2",
                 "\\left(\\left(\\frac{1}{2}\\right)^{2}\\right)^{3}", "x^{y^{z^{2}}}", "[0, 1)", "(" * 12 + "x" + ")" * 12,
                 f"{n}" + "+(x)" * 200]
    for answer in realistic:
        assert not answers_match(answer, "x+1")
    assert given == realistic
    # an answer nested as deep as its gold, or a little deeper, is read
    given.clear()
    deep_gold = "(" * 30 + "x" + ")" * 30
    assert not answers_match("(" * 31 + "x" + ")" * 31, deep_gold) and len(given) == 1


def test_markdown_and_display_math_around_a_whole_answer_are_not_part_of_it(with_math_verify):
    # a chat model's **5** or `5`, and \[5\] (as `$\[5\]$` math-verify read no number), scored 0 against 5
    for written in ("**5**", "*5*", "__5__", "`5`", "** 5 **", "\\[5\\]", "\\( 5 \\)", "**\\(5\\)**"):
        assert _accuracy(written, "5") == 1.0, written
        assert _accuracy(written, "6") == 0.0, written
    assert _accuracy("**5** and **6**", "5") == 0.0   # not one wrapper around the whole answer
    if with_math_verify:
        assert _accuracy("**\\frac{1}{2}**", "0.5") == 1.0 and _accuracy("\\[\\frac{1}{2}\\]", "1/2") == 1.0


def test_markdown_around_an_answer_before_its_full_stop_is_not_part_of_it(with_math_verify):
    # a chat model's `**14**.` or `` `14`. `` was not unwrapped (the wrapper must end the answer) and scored 0 against 14
    for written in ("**14**.", "`14`.", "*14*,", "**\\(14\\)**."):
        assert _accuracy(written, "14") == 1.0 and _accuracy(written, "15") == 0.0, written
    assert _accuracy("**14**...", "14") == 0.0 and _accuracy("**1**4.", "14") == 0.0   # an ellipsis; not a wrapper
    if with_math_verify:
        assert _accuracy("**\\frac{1}{2}**.", "0.5") == 1.0


def test_a_full_stop_after_a_latex_answer_does_not_leave_its_leading_number_alone(with_math_verify):
    # `$2\sqrt{3}.$` parsed to nothing and the bare text to its leading 2: 2\sqrt{3}. and 8½. scored 1 against 2 and 8
    for written, leading in (("2\\sqrt{3}.", "2"), ("2x.", "2"), ("8\\frac{1}{2}.", "8"), ("8\u00bd.", "8"), ("2\\pi.", "2")):
        assert _accuracy(written, leading) == 0.0, written
        assert _accuracy(written, written[:-1]) == 1.0 or not with_math_verify, written
    if with_math_verify:
        assert _accuracy("\\frac{1}{2}.", "0.5") == 1.0 and _accuracy("The answer is 5.", "5") == 1.0


def test_a_comma_after_a_latex_answer_does_not_leave_its_leading_number_alone(with_math_verify):
    # as with the full stop: `$2\\sqrt{3},$` parsed to nothing and the bare text to its leading 2, so 2\\sqrt{3}, and
    # 2x, scored 1 against 2, 4\\pi, against 4 (or a gold 4\\pi, matched the answer 4), and 0 against their own value
    for written, leading in (("2\\sqrt{3},", "2"), ("2x,", "2"), ("4\\pi,", "4"), ("8\u00bd,", "8")):
        assert _accuracy(written, leading) == 0.0 and _accuracy(leading, written) == 0.0, written
        assert _accuracy(written, written[:-1]) == 1.0 or not with_math_verify, written
    if with_math_verify:
        assert _accuracy("x+1,", "x+1") == 1.0 and _accuracy("(1, 2),", "(1,2)") == 1.0


def test_a_latex_thin_space_ending_an_answer_is_not_a_comma(with_math_verify):
    # the sentence's comma taken off LaTeX's `\\,` left `$2\\sqrt{3}\\$`, which parsed to nothing, then the bare text to its
    # leading number: 2\\sqrt{3}\\, and 4\\pi\\, scored 1 against 2 and 4 and 0 against their own value
    for written, leading in (("2\\sqrt{3}\\,", "2"), ("4\\pi\\,", "4")):
        assert _accuracy(written, leading) == 0.0, written
        assert _accuracy(written, written[:-2]) == 1.0 or not with_math_verify, written


def test_a_math_block_that_is_only_part_of_the_answer_is_not_the_answer(with_math_verify):
    # math-verify given `\(3\)+1` as it is read its delimited part alone: the answer 4 (and 3-4) scored 1 against 3
    for written in ("\\(3\\)+1", "\\[3\\]-4", "\\[3\\]4", "\\(3\\) or \\(4\\)", "\\[3\\] \\[4\\]"):
        assert _accuracy(written, "3") == 0.0, written
    assert _accuracy("\\(\\frac{1}{2}\\) or 7", "7") == 0.0
    assert _accuracy("\\(3\\)", "3") == 1.0 and _accuracy("\\[ \\sqrt{9} \\]", "3") == float(with_math_verify)


def test_language_reward_leaves_math_notation_out():
    # a LaTeX command's name, a lone variable of another script and a math symbol are no language: a Chinese chain
    # of thought writing \frac{a}{b} and \sqrt{x} scored 0.21 for zh, an English one using π and α-γ 0.2 for en
    zh, en = make_language_reward("zh"), make_language_reward("en")
    assert zh(None, ["<think>\u8ba1\u7b97 \\frac{a}{b} \u548c \\sqrt{x}</think>",
                     "<think>\u8ba1\u7b97x\u7684\u503c</think>"]) == [1.0, 1.0]
    assert en(None, ["<think>area \u03c0 r\u00b2 = 3.14, \u03b1 \u03b2 \u03b3</think>",
                     "<think>Let x \u2208 \u211d, \u2200\u03b5>0</think>", "<think>\u2113 = 5 m</think>"]) == [1.0] * 3
    # words of another script still count against it, as does a run of two letters (a bare sin or cos is notation)
    assert zh(None, ["<think>\u6211\u4eec\u7528 the \u548c and</think>"]) == [pytest.approx(0.4)]
    assert en(None, ["<think>ab \u03b1\u03b2</think>", "<think>\\frac{1}{2}</think>"]) == [pytest.approx(0.5), None]


def test_language_reward_counts_english_disguised_as_math_notation():
    # every LaTeX command name, math letter and lone Latin letter was left out: a policy writing English as
    # `\the \quick \brown \fox`, in math bold or spelled out letter by letter scored 1.0 for zh
    zh = make_language_reward("zh")
    disguised = ["中 \\the \\quick \\brown \\fox", "中 𝐭𝐡𝐞 𝐪𝐮𝐢𝐜𝐤 𝐛𝐫𝐨𝐰𝐧 𝐟𝐨𝐱", "中 \\text{the quick brown fox}",
                 "中 I a m h e r e", "中 \\I \\a \\m \\h \\e \\r \\e", "中 $I a m h e r e$", "中文 I a m h e r e"]
    # (a lone letter beside a Chinese one or a `$` may be a variable: 设 x 为, $x$)
    assert zh(None, [f"<think>{t}</think>" for t in disguised]) == [
        pytest.approx(v) for v in (1 / 17, 1 / 17, 1 / 17, 1 / 7, 1 / 8, 1 / 6, 2 / 8)]
    # real math still is no language: listed commands and environments, a variable beside math or Chinese
    math = ["设 x 为正数，且 x^2 = 4", "由 \\begin{cases} x+y=1 \\\\ x-y=3 \\end{cases} 得 x=2",
            "所以 $f(x) = \\sin x + \\cos 2x$", "因为 \\angle A = 30^\\circ，所以 \\boxed{5}", "设 x \\in \\mathbb{R}",
            "基数ℵ_0 与 ℓ=5", "温度25℃"]
    assert zh(None, [f"<think>{t}</think>" for t in math]) == [1.0] * len(math)


def test_language_reward_counts_a_word_spelled_out_between_marks():
    # each lone letter beside a mark (- / _ a digit a bracket) was a variable, so English spelled out with marks between
    # its letters scored 1.0 for zh (0.11 before b533e7c); a word's inner letters now count, its two ends stay variables
    zh = make_language_reward("zh")
    spelled = ["中 t1h1e1 q1u1i1c1k", "中 (t)(h)(e)", "中 t_h_e"]
    assert zh(None, [f"<think>{t}</think>" for t in spelled]) == [pytest.approx(v) for v in (1 / 5, 1 / 2, 1 / 2)]
    # variables beside math are still no language
    math = ["设 x+y=1 且 x-y=3", "计算 f(x) = a_1 x + a_2", "由 $x_1 + x_2 + x_3 = 1$ 得", "设 x + y + z = 1", "设 a+b+c=1"]
    assert zh(None, [f"<think>{t}</think>" for t in math]) == [1.0] * len(math)
    assert zh(None, ["<think>设 a+\u03b1+b=1</think>"]) == [1.0]   # a Greek letter is a variable wherever it is


def test_language_reward_counts_a_word_spelled_with_hyphens_or_table_marks():
    # a hyphen is a minus and & a matrix's column mark, so each letter beside them was a variable, and English spelled
    # with them between its letters (t-h-e, t&h&e) scored 1.0 for zh. A word of the list spelled so counts now.
    zh = make_language_reward("zh")
    spelled = ["中 t-h-e 中", "中 t&h&e 中", "中 W-A-I-T 中", "中 t - h - e 中", "中 a&n\\\\d 中"]
    assert zh(None, [f"<think>{t}</think>" for t in spelled]) == [pytest.approx(v) for v in (0.4, 0.4, 1 / 3, 0.4, 0.4)]
    # math with the same marks spells no such word and stays variables: a minus between variables, a path through
    # vertices, the entries of a symmetric matrix, a word's letters with other marks between them
    math = ["若a-b-c=0，则a=b+c。", "设 x-y-z=1", "路径A-B-D-C-E最短", "若 n-o-1=0 则",
            r"矩阵$\begin{pmatrix}a&b&c\\b&d&e\\c&e&f\end{pmatrix}$对称", r"行列$\begin{pmatrix}t & h \\ e & a\end{pmatrix}$",
            "所以 t-h+e=0"]
    assert zh(None, [f"<think>{t}</think>" for t in math]) == [1.0] * len(math)


def test_language_reward_keeps_math_written_tight_as_variables():
    # any lone letter with lone letters two characters away on both sides counted as a spelled-out word: function
    # notation, substitutions and sums written tight cut Chinese chains of thought from 1.0 (as at fbbdd50) to 0.25
    zh = make_language_reward("zh")
    math = ["令u=x+y，v=x-y，则x=(u+v)/2，y=(u-v)/2。", "设 g(x)=f(x)-x，则 g(a)=g(b)=0。", "令 m=n+k，则 m-n=k。",
            "由 P(A∪B)=P(A)+P(B)-P(A∩B) 得到结果。", "考虑 (a+b)(b+c)(c+a) 的展开式。", "因此 x=y=z，此时等号成立。",
            "若 x∈A 且 x∉B，则 x∈A-B。", "所以 f(x)=x^2-2x+1=(x-1)^2≥0。", "因为A∪B=B∪A，所以交换律成立。",
            "若a-b-c=0，则a=b+c。", "所以 x/y/z=1。"]   # a minus and a division: 0.5 when a hyphen spelled words
    assert zh(None, [f"<think>{t}</think>" for t in math]) == [1.0] * len(math)
    # a product of powers or of indexed terms: the same marks on both sides, but a power or an index (0.67, 0.5)
    products = ["所以 a^2b^2c^2=1。", "所以 x²y²z²≥0。", "则 a_1b_1c_1=0"]
    assert zh(None, [f"<think>{t}</think>" for t in products]) == [1.0] * len(products)
    # a prime between points (the image A'B'C' of a triangle): its B was a letter of a spelled-out word (0.67)
    primes = ["所以△A'B'C'的面积为2。", "所以△A′B′C′的面积为2。", "则 a'b'c'=1。"]
    assert zh(None, [f"<think>{t}</think>" for t in primes]) == [1.0] * len(primes)
    # an apostrophe reads as a prime: a contraction's lone letter is left out, its words still count
    assert zh(None, ["<think>中 I don't know</think>"]) == [pytest.approx(1 / 8)]   # 1/9 with its t


def test_language_reward_keeps_a_list_or_ratio_of_variables_as_variables():
    # a comma, 、, a ratio's colon or a middle dot was no math mark: the inner letters of a list of variables counted
    # against zh (设a,b,c为正数 0.8, 则 x,y,z∈R 0.5, 则 a:b:c=1:2:3 0.5); t,h,e is no spelled-out English then
    zh = make_language_reward("zh")
    lists = ["设a,b,c为正数。", "设 a, b, c 为正数。", "则 x,y,z∈R。", "设a、b、c分别为三边。", "点 P(x,y,z) 在平面上。",
             "则 a:b:c=1:2:3。", "所以 a·b·c=1。", "设ａ，ｂ，ｃ为正数。"]
    assert zh(None, [f"<think>{t}</think>" for t in lists]) == [1.0] * len(lists)
    assert zh(None, ["<think>中 t_h_e q_u_i_c_k</think>"]) == [pytest.approx(1 / 5)]   # other marks still spell
    # Japanese writes a product or a list with its own middle dot (・, U+30FB): 0.6 for ja, as · scores 1.0
    ja = make_language_reward("ja")
    assert ja(None, ["<think>a・b・c=1のとき</think>", "<think>ベクトルa・b・cは一次独立</think>"]) == [1.0, 1.0]


def test_language_reward_reads_full_width_math_as_math():
    # a lone full-width letter (ｘ, FULLWIDTH LATIN) was never a variable: Japanese math typeset full width scored below
    # the same text in ASCII (0.75 against 1.0), while English in full width still counts
    ja = make_language_reward("ja")
    texts = ["ｘ＋ｙ＝１のとき、ｘの値を求める。", "点Ｐ（ｘ，ｙ）をとる。", "ｔｈｅ ｑｕｉｃｋ の"]
    assert ja(None, [f"<think>{t}</think>" for t in texts]) == [1.0, 1.0, pytest.approx(1 / 9)]
    assert make_language_reward("en")(None, ["<think>ｔｈｅ ｑｕｉｃｋ</think>"]) == [1.0]


def test_language_reward_reads_enclosed_letters_as_letters():
    # circled, parenthesized, squared letters are symbols (So), never counted: English written in them scored 1.0 for zh
    zh = make_language_reward("zh")
    enclosed = ["中 ⓣⓗⓔ ⓠⓤⓘⓒⓚ", "中 🅣🅗🅔 🇹🇭🇪", "中 ⒯⒣⒠"]
    assert zh(None, [f"<think>{t}</think>" for t in enclosed]) == [pytest.approx(v) for v in (1 / 9, 1 / 7, 1 / 4)]
    assert zh(None, ["<think>答案是 ① 和 ②，选 Ⓐ</think>"]) == [1.0]   # numbers, and a lone letter beside Chinese


def test_reward_set_takes_exact_numbers_as_trl_does():
    # an exact math reward's Fraction or Decimal (TRL's torch.tensor takes them) was refused as "not a finite number"
    import decimal
    from fractions import Fraction

    rs = RewardSet([lambda prompts, completions, **kw: [Fraction(1, 4), decimal.Decimal("0.5"), None]])
    assert rs.score(["p"] * 3, ["c"] * 3, {}) == [[0.25, 0.5, None]]
    for bad in (decimal.Decimal("NaN"), decimal.Decimal("sNaN"), decimal.Decimal("1e400")):
        with pytest.raises(RewardError, match="row 0"):
            RewardSet([lambda prompts, completions, **kw: [bad]]).score(["p"], ["c"], {})


def test_bare_word_answers_match_case_and_full_stop_aside(with_math_verify):
    # a yes/no or multiple-choice dataset: math-verify finds nothing in bare words, so `Yes` scored 0 against `yes`
    # and `B.` against `B` (while it took the letters `b` and `B` as equal)
    for answer, gold in (("Yes", "yes"), ("yes.", "Yes"), ("True", "true"), ("B.", "B"), ("paris", "Paris")):
        assert _accuracy(answer, gold) == 1.0, (answer, gold)
    for answer, gold in (("no", "yes"), ("Option B", "B"), ("C", "B"), (".", "B")):
        assert _accuracy(answer, gold) == 0.0, (answer, gold)


def test_a_reward_function_returning_none_is_told_to_return_one_value_per_row():
    # "must return a list of 2 floats (or None); got None" read as if None were a return it takes
    with pytest.raises(RewardError, match=r"must return a list of 2 rewards, one per completion \(each a float, or "
                                          r"None for a row it does not score\); got None$"):
        RewardSet([lambda prompts, completions, **kw: None]).score(["p"] * 2, ["c"] * 2, {})


def test_a_reward_file_is_imported_once_and_may_hold_dataclasses(tmp_path):
    # a @dataclass under `from __future__ import annotations` failed the import ("'NoneType' object has no attribute
    # '__dict__'": its module was not in sys.modules), and two functions of one file imported it twice (a judge
    # model loaded at import: twice the memory)
    f = tmp_path / "judge_rewards.py"
    f.write_text("from __future__ import annotations\nimport dataclasses\nLOADS = []\n\n"
                 "@dataclasses.dataclass\nclass Judge:\n    bar: float = 0.5\n\nLOADS.append(Judge())\n\n"
                 "def a(prompts, completions, **kw):\n    return [LOADS[0].bar * len(LOADS)] * len(completions)\n\n"
                 "def b(prompts, completions, **kw):\n    return [float(len(LOADS))] * len(completions)\n")
    rs = RewardSet([f"{f}:a", f"{f}:b"])
    assert rs.score(["p"], ["c"], {}) == [[0.5], [1.0]]
    import os
    import time

    f.write_text("def a(prompts, completions, **kw):\n    return [2.0] * len(completions)\n")   # edited: read again
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert RewardSet([f"{f}:a"]).score(["p"], ["c"], {}) == [[2.0]]


def test_a_reward_file_edited_within_the_same_tick_is_imported_again(tmp_path, monkeypatch):
    # the file's mtime and size told an edit: one keeping the size within the clock's tick was taken for the file
    # imported before, and Python's own __pycache__ (mtime in whole seconds) ran the old code too (45 of 50 quick
    # same-size edits scored by the old function)
    import os

    monkeypatch.setattr(sys, "dont_write_bytecode", False)   # as for a user: a .pyc is written beside the file
    f = tmp_path / "quick_rewards.py"
    f.write_text("def r(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    stat = f.stat()
    assert RewardSet([f"{f}:r"]).score(["p"], ["c"], {}) == [[1.0]]
    f.write_text("def r(prompts, completions, **kw):\n    return [2.0] * len(completions)\n")
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))   # the same mtime and size
    assert RewardSet([f"{f}:r"]).score(["p"], ["c"], {}) == [[2.0]]


def test_a_reward_file_is_compiled_with_its_own_future_imports_only(tmp_path):
    # the file's text was compiled inside combine.py and took its `from __future__ import annotations`: a user's
    # annotations became strings ({'x': 'int'}), unlike the same file imported by Python
    from r1fast.rewards.combine import load_function

    f = tmp_path / "annotated_rewards.py"
    f.write_text("def r(prompts, completions, **kw):\n    return [1.0] * len(completions)\n"
                 "def typed(x: int) -> float:\n    pass\n")
    module = sys.modules[load_function(f"{f}:r").__module__]
    assert module.typed.__annotations__ == {"x": int, "return": float}


def test_a_reward_file_whose_imports_need_its_folder_or_package_says_how(tmp_path):
    # a file runs alone, without its folder on sys.path: `from .helper import X` and `import helper` (beside it)
    # failed with Python's bare "attempted relative import with no known parent package" / "No module named"
    from r1fast.rewards.combine import load_function

    pkg = tmp_path / "my_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "sibling_helper.py").write_text("X = 5\n")
    (pkg / "relative.py").write_text("from .sibling_helper import X\ndef r(p, c, **kw):\n    return [X] * len(c)\n")
    (pkg / "absolute.py").write_text("import sibling_helper\ndef r(p, c, **kw):\n    return [1.0] * len(c)\n")
    with pytest.raises(ValueError, match="name it as package.module:r"):
        load_function(f"{pkg / 'relative.py'}:r")
    with pytest.raises(ValueError, match="'sibling_helper' is beside the file, but its folder .* PYTHONPATH"):
        load_function(f"{pkg / 'absolute.py'}:r")


def test_a_format_pattern_that_is_no_regular_expression_is_named():
    # RewardSet(format_pattern=...) raised re.error's bare "missing ), unterminated subpattern at position 7"
    for bad in ("<think>(.*</think>", 5):
        with pytest.raises(ValueError, match="format_pattern .* is not a valid regular expression"):
            RewardSet(["format"], format_pattern=bad)


def test_language_reward_reads_a_reasoning_the_chat_template_opened():
    # R1-Distill's template opens <think>: the completion starts inside it, and was read whole, its answer's
    # English counted against a Chinese chain of thought (1/2 here)
    zh = make_language_reward("zh")
    assert zh(None, ["\u6211\u4eec\u8ba1\u7b97</think><answer>five</answer>",
                     [{"role": "assistant", "content": "\n\u8ba1\u7b97\n</think>\n\n<answer>five</answer>"}]]) == [1.0, 1.0]
    # a closed block before it is still read as it was
    assert zh(None, ["<think>\u8ba1\u7b97</think><answer>five</answer>"]) == [1.0]


def test_golds_from_a_dataset_formatted_for_numpy_or_torch():
    # set_format("numpy"/"torch") rows hold arrays and tensors: read as text, the list ['3', '5'] was "['3' '5']"
    # and 0.5 "tensor(0.5000)", which no answer matched, and tensor(nan) a gold the answer "tensor(nan)" matched
    import numpy as np
    import torch

    answers = ["<answer>5</answer>", "<answer>1/2</answer>", "<answer>3</answer>", "<answer>tensor(nan)</answer>"]
    golds = [np.array(["3", "5"], dtype=object), torch.tensor(0.5), np.float32(3.0), torch.tensor(float("nan"))]
    assert accuracy_reward(None, answers, answer=golds) == [1.0, 1.0, 1.0, None]


def test_a_reward_functions_unresolvable_annotation_does_not_hide_its_error(monkeypatch):
    # Python 3.14's inspect.signature evaluates annotations: a TRL function's `trainer_state: TrainerState`, imported
    # under TYPE_CHECKING, raised NameError from the error report in place of the function's own error. Stood in
    # for by a signature() that raises on 3.11-3.13; on 3.14 a real such function is checked too.
    import inspect
    import sys

    def schedule(prompts, completions, trainer_state, **kw):
        return [0.0] * len(completions)

    if sys.version_info >= (3, 14):
        space = {}
        exec("def schedule(prompts, completions, trainer_state: TrainerState, **kw):\n    return [0.0]\n", space)
        schedule = space["schedule"]
    else:
        real = inspect.signature

        def evaluating(fn, *args, **kwargs):
            if kwargs.get("annotation_format") is None and fn is schedule:
                raise NameError("name 'TrainerState' is not defined")
            return real(fn, *args, **kwargs)

        monkeypatch.setattr(inspect, "signature", evaluating)
    with pytest.raises(RewardError, match="'schedule' (cannot take|raised TypeError)"):
        RewardSet([schedule]).score(["a"], ["x"], {})


def test_accuracy_reward_wants_one_reference_per_completion():
    # called directly with a string, "42" was read a character per row (both answers scored 1); a shorter list
    # scored only its first rows
    comps = ["<answer>4</answer>", "<answer>2</answer>"]
    for bad, said in (("42", "'42'"), (["4"], "1 values")):
        with pytest.raises(ValueError, match=f"answer must hold one value per completion \\(2\\); got {said}"):
            accuracy_reward(None, comps, answer=bad)
    with pytest.raises(ValueError, match="solution must hold one value per completion"):
        accuracy_reward(None, comps, answer=["4", "2"], solution=["4"])


def test_a_mixed_number_written_out_is_its_value(with_math_verify):
    # "2 3/4" (two and three quarters) matched nothing, neither 2.75 nor 11/4
    assert _accuracy("2 3/4", "2.75") == 1.0 and _accuracy("-1 1/2", "-3/2") == 1.0
    assert _accuracy("1 100/200", "1.5") == 1.0   # not the thousands 1,100/200
    assert _accuracy("2 3/4", "1.5") == 0.0 and _accuracy("2 4/3", "10/3") == 0.0   # 2*3/4; not a proper fraction
    from r1fast.rewards.builtin import vote_key

    assert vote_key("1 1/" + "9" * 5000)[0] == "text"   # more digits than int() reads: no number, not a ValueError


def test_unicode_math_is_read_as_its_latex():
    # math-verify found no number in √2, ∞, x² or ½: the right answer scored 0 against \sqrt{2}, \infty, x^2, 0.5
    pytest.importorskip("math_verify")
    right = [("√2", "\\sqrt{2}"), ("2√3", "2\\sqrt{3}"), ("√(x+1)", "\\sqrt{x+1}"), ("∞", "\\infty"), ("-∞", "-\\infty"),
             ("x²", "x^2"), ("10⁻³", "0.001"), ("½", "0.5"), ("1½", "3/2"), ("√2/2", "\\frac{\\sqrt{2}}{2}")]
    for answer, gold in right:
        assert _accuracy(answer, gold) == 1.0, (answer, gold)
    for answer, gold in (("√2", "2"), ("∞", "-\\infty"), ("x²", "x^3"), ("½", "1/3")):
        assert _accuracy(answer, gold) == 0.0, (answer, gold)


def test_a_full_stop_after_a_unicode_root_is_not_its_decimal_point():
    # √'s number took a sentence's full stop in: √6. was \\sqrt{6.}, which math-verify could not read, and scored 0
    # against \\sqrt{6} (2√3. against 2\\sqrt{3}, and against 2√3 itself)
    pytest.importorskip("math_verify")
    for answer, gold in (("√6.", "\\sqrt{6}"), ("2√3.", "2\\sqrt{3}"), ("2√3.", "2√3"), ("√2.25", "1.5"), ("√.25.", "0.5")):
        assert _accuracy(answer, gold) == 1.0, (answer, gold)
    assert _accuracy("√6.", "6") == 0.0 and _accuracy("√2.25", "2") == 0.0


def test_language_reward_reads_capital_point_names_as_math():
    # Chinese geometry names points in capitals: 在△ABC中 scored 0.4 and 平面ABC与 0.5 for zh, a chain of thought about
    # a triangle penalised for its notation. Two to four capitals beside math or the target script, and beside no
    # other Latin letter, now name points; capitals that spell words beside other words still count.
    zh, ru = make_language_reward("zh"), make_language_reward("ru")
    geometry = ["在△ABC中，a、b、c分别为三边。", "平面ABC与平面ABD垂直。", "三棱柱ABC-A'B'C'的体积为3。",
                "所以 AB=CD，且 AB∥CD。"]
    assert zh(None, [f"<think>{t}</think>" for t in geometry]) == [1.0] * len(geometry)
    assert ru(None, ["<think>в треугольнике ABC угол A прямой</think>"]) == [1.0]
    words = ["中 THE QUICK BROWN FOX", "中 HI THERE", "中 Hello World"]
    assert [round(v, 3) for v in zh(None, [f"<think>{t}</think>" for t in words])] == [0.059, 0.125, 0.091]
    # the English a chain of thought mixes in, in capitals beside marks or Chinese, is no point name (WAIT， 1.0)
    mixed = ["WAIT，我们再算一次。", "中BUT中THE中", "线段SO与TO垂直"]
    assert [round(v, 3) for v in zh(None, [f"<think>{t}</think>" for t in mixed])] == [0.6, 0.333, 1.0]


def test_language_reward_counts_english_spelled_one_chinese_character_apart():
    # each letter of 中t中h中e, beside Chinese, was a variable: English interleaved with Chinese characters scored 1.0
    zh = make_language_reward("zh")
    interleaved = ["中t中h中e中", "中T中H中E中", "我们w在a的i中t", "中q中u中i中c中k", "所以AREA为4"]
    assert [round(v, 3) for v in zh(None, [f"<think>{t}</think>" for t in interleaved])] == [
        0.571, 0.571, 0.556, 0.5, 0.429]
    # variables named one character apart spell no word: still math
    math = ["由x与y与z的对称性，不妨设x≥y≥z。", "若a则b，若b则c，所以若a则c。", "若p且q则r。", "设a与b与c与d为正数。",
            "因此a在b与c之间。", "设m与n是两条不同的直线，α与β是两个不同的平面。"]
    assert zh(None, [f"<think>{t}</think>" for t in math]) == [1.0] * len(math)
    assert make_language_reward("ja")(None, ["<think>aとbとcとdの和</think>", "<think>aとbとcとdとeは正の数</think>"]) == [1.0] * 2
    # five or more named in the alphabet's order (0.64, 0.62, 0.58, 0.45 before); other letters still spell
    listed = ["设a与b与c与d与e均为正数", "a和b和c和d和e都是整数", "点A与B与C与D与E共圆", "x与y与z与u与v与w"]
    assert zh(None, [f"<think>{t}</think>" for t in listed]) == [1.0] * len(listed)
    assert [round(v, 3) for v in zh(None, ["<think>中q中u中i中c中k</think>", "<think>中a中b中c中x中k</think>"])] == [0.5, 0.5]


def test_language_reward_reads_indexed_points_as_math():
    # the B1 of 正方体ABCD-A1B1C1D1 (a capital between the same digits) read as a letter of a word spelled out like t1h1e:
    # a cube or prism problem, named so in every line of Chinese solid geometry, scored 0.75 and 0.89 for zh
    zh = make_language_reward("zh")
    solid = ["在正方体ABCD-A1B1C1D1中，求证：B1D⊥平面A1C1D。", "在直三棱柱ABC-A1B1C1中，AA1⊥平面ABC，AB=AC=2。"]
    assert zh(None, [f"<think>{t}</think>" for t in solid]) == [1.0, 1.0]
    assert zh(None, ["<think>中 t1h1e1 q1u1i1c1k</think>"]) == [pytest.approx(1 / 5)]   # lower case still spells


def test_language_reward_reads_a_product_of_variables_as_math():
    # two or three small letters written tight against a digit or an operator were a word: 设a、b、c为正实数，且abc=1 scored
    # 0.73 for zh, 函数y=kx+b 0.87, 求a+b+cd的值 0.89
    zh = make_language_reward("zh")
    products = ["设a、b、c为正实数，且abc=1，证明a+b+c≥3。", "函数y=kx+b的图像经过点(1,2)。", "已知a与b互为相反数，求a+b+cd的值。",
                "求2ab的值。", "所以 ab=2，bc=3。", "由xy=1得y=1/x。", "由 v=at 与 F=ma 得",
                "在等比数列{an}中，a1=2，q=3。", "数列{an}与{bn}满足",   # plain text's a_n: 0.75
                # a middle dot is a product (0.71, 0.33), and so are brackets around one (0.75)
                "所以△ABC的面积S=1/2·ab·sinC=6。", "设an=n²，bn=2^n，cn=an·bn。", "由均值不等式得a+b+c≥3·(abc)^(1/3)=3。"]
    assert zh(None, [f"<think>{t}</think>" for t in products]) == [1.0] * len(products)
    # words apart from math, or listed, still count
    words = ["我们 need to 计算 x=2", "中 the=1 and+2", "中(the)中·and·"]
    assert [round(v, 3) for v in zh(None, [f"<think>{t}</think>" for t in words])] == [0.4, 0.143, 0.25]


def test_language_reward_reads_a_sequence_s_term_or_sum_written_plain_as_math():
    # a_n and S_n written plain (an, Sn) were English beside a list mark or the target script: 则lim(n→∞)Sn=a1/(1-q)=2。
    # scored 0.33 for zh, a1,a2,a3,…,an成等差数列 0.88, ja's よって an=2n-1、Sn=n² である 0.75, ru's 0.96
    lines = {"zh": ["则lim(n→∞)Sn=a1/(1-q)=2。", "在等差数列{a_n}中，a1,a2,a3,…,an成等差数列。", "设数列{an}的前n项和为Sn，且a1=1。",
                    "所以Tn<1，且xk、xm均为正数。"],
             "ja": ["よって an=2n-1、Sn=n² である。", "数列a1,a2,a3,…,anについて考える。"],
             "ru": ["Последовательность a1, a2, a3, …, an является арифметической прогрессией."]}
    for language, texts in lines.items():
        assert make_language_reward(language)(None, [f"<think>{t}</think>" for t in texts]) == [1.0] * len(texts), texts
    # English two-letter words still count, and an index letter beside another Latin letter is a word's
    zh = make_language_reward("zh")
    assert [round(v, 3) for v in zh(None, ["<think>中 in 中 on 中 ok 中</think>", "<think>中 an apple 中</think>"])] == \
        [0.4, 0.222]


def test_language_reward_reads_coordinate_axes_and_planes_as_math():
    # xOy, Ox, Oxyz (an axis or a plane through the origin O) were one run of letters, a word: 在平面直角坐标系xOy中 0.81
    # for zh, 建立空间直角坐标系Oxyz 0.69, ja's 座標平面xOyにおいて 0.73, ru's на оси Oy 0.71 and В плоскости xOy 0.77
    lines = {"zh": ["在平面直角坐标系xOy中，直线l过点(1,2)。", "建立空间直角坐标系Oxyz，", "平面yOz的法向量"],
             "ja": ["座標平面xOyにおいて"], "ru": ["на оси Oy", "В плоскости xOy", "Введём систему координат Oxyz."]}
    for language, texts in lines.items():
        assert make_language_reward(language)(None, [f"<think>{t}</think>" for t in texts]) == [1.0] * len(texts), texts
    assert make_language_reward("zh")(None, ["<think>中Oxford中</think>"]) == [2 / 8]   # a word still counts


def test_language_reward_reads_matrix_entries_as_variables():
    # & and \\ separate a matrix's entries, though neither is an operator: its letters spelled words or were English,
    # 0.46 for zh's 3×3 matrix, 0.67 for the 2×2 one, 0.86 for a column vector, 0.75 for ja, 0.89 for ru
    lines = {"zh": [r"矩阵$\begin{pmatrix}a&b&c\\d&e&f\\g&h&i\end{pmatrix}$的行列式",
                    r"设矩阵$A=\begin{pmatrix}a&b\\c&d\end{pmatrix}$，则$|A|=ad-bc$。", r"设列向量$\begin{pmatrix}x\\y\\z\end{pmatrix}$满足"],
             "ja": [r"行列$\begin{pmatrix}a & b \\ c & d\end{pmatrix}$について"],
             "ru": [r"Матрица $\begin{vmatrix}x&y\\z&w\end{vmatrix}$ равна нулю."]}
    for language, texts in lines.items():
        assert make_language_reward(language)(None, [f"<think>{t}</think>" for t in texts]) == [1.0] * len(texts), texts
    # words still count, and so do letters after one backslash (a command's)
    assert make_language_reward("zh")(None, [r"<think>中\the \quick中</think>", r"<think>中 \I \a \m 中</think>"]) == [0.2, 0.5]


def test_language_reward_reads_a_greek_delta_before_letters_as_a_sign():
    # Δ (Greek) and the Latin letters after it were one run outside zh, a word: 所以ΔABC是等腰三角形 scored 0.67, ΔABC≌ΔDEF
    # 0.2, Δx=2 0.5; Δ there is a triangle's or an increment's sign
    zh = make_language_reward("zh")
    signs = ["所以ΔABC是等腰三角形", "所以ΔABC≌ΔDEF", "所以Δx=2", "由Δt→0得"]
    assert zh(None, [f"<think>{t}</think>" for t in signs]) == [1.0] * len(signs)
    assert zh(None, ["<think>中 ΔTHE 中</think>", "<think>中 Δthe 中</think>"]) == [0.4, 0.4]   # words still count


def test_language_reward_reads_a_polygon_of_five_or_more_vertices_as_math():
    # 五边形ABCDE scored 0.58 for zh and 正六边形ABCDEF 0.45: past four capitals every run counted as English. A run of
    # consecutive letters names a polygon (no English word is one); other long capitals (QUICK) still count.
    zh = make_language_reward("zh")
    polygons = ["五边形ABCDE的内角和为540°。", "正六边形ABCDEF中，AB=2。", "Пусть ABCDE — правильный пятиугольник"]
    assert zh(None, [f"<think>{t}</think>" for t in polygons[:2]]) == [1.0, 1.0]
    assert make_language_reward("ru")(None, [f"<think>{polygons[2]}</think>"]) == [1.0]
    assert zh(None, ["<think>中QUICK中</think>", "<think>中T_H_E中</think>"]) == [2 / 7, 2 / 3]
    # a prism's two faces without a hyphen (ABCDA1B1C1D1): its fifth letter is the vertex A1 (0.85 for ru, 0.5 for zh)
    prisms = ["В кубе ABCDA1B1C1D1 найдите угол между прямыми.", "В кубе ABCDA'B'C'D' найдите угол.",
              "В призме ABCDEA1B1C1D1E1 все рёбра равны."]
    assert make_language_reward("ru")(None, [f"<think>{t}</think>" for t in prisms]) == [1.0] * 3
    assert zh(None, ["<think>在正方体ABCDA1B1C1D1中</think>", "<think>中QUICKS1中</think>"]) == [1.0, 0.25]
    # a pyramid's apex before its base (SABCD: 0.88 for ru, 0.5 for zh)
    pyramids = ["В правильной пирамиде SABCD основание ABCD — квадрат.", "Пирамида MABCDE правильная."]
    assert make_language_reward("ru")(None, [f"<think>{t}</think>" for t in pyramids]) == [1.0] * 2
    assert zh(None, ["<think>在四棱锥PABCD中</think>", "<think>中QUICKER中</think>"]) == [1.0, 2 / 9]


def test_language_reward_reads_bare_function_names_as_math():
    # Math without LaTeX: 在△ABC中，sin A=1/2，cos B=0 scored 0.25 for zh, a/sinA = b/sinB 0.43, 由lgx=2得 0.4 and
    # 在Rt△ABC中 0.5, their function names (and Rt) counted as English. Words that hold one (since, tanks) still count.
    zh = make_language_reward("zh")
    math_lines = ["在△ABC中，sin A=1/2，cos B=0。", "由正弦定理 a/sinA = b/sinB 得", "由lgx=2得", "在Rt△ABC中，∠C=90°。",
                  "所以sinθ=1/2，", "所以 log 2 < ln 3，",
                  # a product of them written tight (0.16, 0.5)
                  "故sin(A+B)=sinAcosB+cosAsinB。", "由sin2x=2sinxcosx得", "所以tanAtanB=1"]
    assert zh(None, [f"<think>{t}</think>" for t in math_lines]) == [1.0] * len(math_lines)
    assert zh(None, ["<think>中since中</think>", "<think>中tanks中</think>", "<think>中sinxcosxs中</think>"]) == \
        [2 / 7, 2 / 7, 2 / 11]


def test_language_reward_reads_common_chinese_latex_as_math():
    # Chinese textbooks write vectors \overrightarrow{AB}, ≤ as \leqslant, ⊥ as \bot and ⊙O as \odot O: those names were
    # not listed, so 向量\overrightarrow{AB}与\overrightarrow{AC}垂直 scored 0.15 for zh, 所以 a \leqslant b 0.18
    zh = make_language_reward("zh")
    lines = ["向量\\overrightarrow{AB}与\\overrightarrow{AC}垂直", "所以 a \\leqslant b，且 c \\geqslant 0", "设\\odot O 的半径为2",
             "所以 AB \\bot CD", "弧\\widehat{AB}的长", "则 \\big( x+1 \\big)^2 \\Longrightarrow x=1"]
    assert zh(None, [f"<think>{t}</think>" for t in lines]) == [1.0] * len(lines)


def test_reward_set_names_a_weight_that_is_no_number():
    # None, a word or an int past float's range raised float()'s bare error, naming neither the weights nor the function;
    # a string of weights was read a character per weight ("12": 1 and 2)
    import random

    for w in (None, "abc", 10**400, [1.0], float("nan")):
        with pytest.raises(ValueError, match=r"reward weights must be finite numbers; got .* for 'format_2'"):
            RewardSet(["format", "format"], weights=[random.choice([1.0, 2, True]), w])
    with pytest.raises(ValueError, match="reward weights must be a list of numbers, one per reward function; got '12'"):
        RewardSet(["format", "format"], weights="12")
    w = random.uniform(-5, 5)
    assert RewardSet(["format", "format"], weights=[w, "0.5"]).weights == [w, 0.5]


def test_length_penalty_of_a_numpy_or_fraction_target_is_the_float_formula():
    # a numpy float32 target computed the penalty in float32 and returned numpy floats, a Fraction one Fractions
    import random
    from fractions import Fraction

    import numpy as np

    t = random.randrange(10, 200) + 0.5
    n = random.randrange(int(t) + 1, int(2 * t))
    want = -(n - t) / t
    for target in (np.float32(t), Fraction(t), np.float64(t)):
        got = make_length_penalty(target)(["p", "p"], ["x" * n, "x" * (int(t) - 1)])
        assert got == [want, 0.0] and all(type(v) is float for v in got), (target, got, want)


def test_a_boolean_reference_answer_is_refused_naming_its_row_and_column():
    # compared as Python's "True": a completion answering "true", as a JSON true spells it, scored 0
    np = pytest.importorskip("numpy")
    said = "holds the boolean True, not an answer whose text the data says"
    with pytest.raises(ValueError, match=f"^accuracy reward: row 1: column 'answer' {said}"):
        accuracy_reward(["p"] * 3, [GOOD] * 3, answer=["5", True, "7"])
    with pytest.raises(ValueError, match="^accuracy reward: row 0: column 'solution' holds the boolean False"):
        accuracy_reward(["p", "p"], [GOOD, GOOD], answer=[None, "5"], solution=[False, None])
    with pytest.raises(ValueError, match="^accuracy reward: row 0: column 'answer' holds the boolean True"):
        accuracy_reward(["p"], [GOOD], answer=[np.array([True])])   # a Dataset formatted for numpy
    with pytest.raises(ValueError, match="^accuracy reward: row 0: column 'answer' holds the boolean False"):
        accuracy_reward(["p"], [GOOD], answer=[["5", np.bool_(False)]])   # one of the accepted answers
    # through a run's RewardSet, the row is named with its prompt and completion
    with pytest.raises(RewardError, match=r"row 1: column 'answer' holds the boolean True.*on row 1 \(prompt"):
        RewardSet(["accuracy"]).score(["p", "q"], [GOOD, GOOD], {"answer": ["5", True]})
    # numbers and text still score as before
    assert accuracy_reward(["p"] * 3, [GOOD] * 3, answer=[5, 5.0, "true"]) == [1.0, 1.0, 0.0]


def test_a_minus_sign_written_just_before_a_box_is_the_answer_s(with_math_verify):
    import random

    from r1fast.rewards.builtin import vote_key

    n = random.randint(2, 10**6)
    for text in (f"-\\boxed{{{n}}}", f"so $x = -\\boxed{{{n}}}$.", f"$x = - \\boxed{{{n}}}$", f"(\u2212\\boxed{{{n}}})",
                 f"is -\\boxed{{{n:,}}}", f"$-\\boxed{{\\frac{{{n}}}{{1}}}}$"):
        if "frac" in text and not with_math_verify:
            continue
        # extracted from the text, or an answer that holds it (read by math-verify unless it is the signed box alone)
        in_answer = with_math_verify or text.startswith("-")
        for completion in (text, f"<answer>{text}</answer>") if in_answer else (text,):
            assert accuracy_reward([""], [completion], answer=[f"-{n}"]) == [1.0], completion
            assert accuracy_reward([""], [completion], answer=[str(n)]) == [0.0], completion
        assert vote_key(f"-\\boxed{{{n}}}") == vote_key(f"-{n}")
    # not the answer's sign: a bullet or a dash before a spaced box, a difference, a sum in the box, a box in a box
    for text, value in ((f"- \\boxed{{{n}}}", n), (f"Answer - \\boxed{{{n}}}", n), (f"$-$ \\boxed{{{n}}}", n),
                        (f"{n + 1} -\\boxed{{{n}}}", n), (f"x = \\boxed{{{n}}}", n), (f"answer: \\boxed{{{n}}}", n),
                        (f"$-\\boxed{{x+{n}}}$", f"x+{n}")):
        assert accuracy_reward([""], [text], answer=[str(value)]) == [1.0], text
    assert extract_answer(f"-\\boxed{{1, {n}}}") == f"1, {n}"


@pytest.mark.parametrize("dash", ["\u2013", "\u2012", "\ufe63", "\uff0d", "\u2212"])
def test_a_dash_written_where_a_minus_sign_goes_is_one(dash, with_math_verify):
    import random

    from r1fast.rewards.builtin import vote_key

    n, m = random.randint(2, 10**6), random.randint(2, 10**6)
    for answer, gold in ((f"{dash}{n}", f"-{n}"), (f"{dash}{n:,}", f"-{n}"), (f"\\boxed{{{dash}{n}}}", f"-{n}"),
                         (f"{dash}{n}\\%", f"-{n}\\%"), (f"{dash}\\boxed{{{n}}}", f"-{n}")):
        assert accuracy_reward([""], [f"<answer>{answer}</answer>"], answer=[gold]) == [1.0], answer
        assert accuracy_reward([""], [f"<answer>{answer}</answer>"], answer=[str(n)]) == [0.0], answer
        assert vote_key(answer) == vote_key(gold)
    assert vote_key(f"x = {dash}{n}") == vote_key(f"x = -{n}")
    if with_math_verify:
        for answer, gold in ((f"x = {dash}{n}", f"-{n}"), (f"({dash}1, {n})", f"(-1, {n})"),
                             (f"{dash}\\frac{{1}}{{{n}}}", f"-\\frac{{1}}{{{n}}}"), (f"{dash}x+{n}", f"-x+{n}")):
            assert answers_match(answer, gold), answer
    if dash != "\u2212":   # between two numbers a dash is a range: neither a difference nor a negative second number
        for answer in (f"{m}{dash}{n}", f"{m} {dash} {n}", f"{m} {dash}{n}"):
            assert not answers_match(answer, str(m - n)), answer
            assert not answers_match(answer, f"{m}, -{n}"), answer
    for prose_dash in ("\u2014", "\u2010"):   # an em dash or a hyphen is no minus sign
        assert not answers_match(f"{prose_dash}{n}", f"-{n}")


def test_a_full_stop_inside_the_box_around_latex_is_no_part_of_the_answer(with_math_verify):
    import random

    from r1fast.rewards.builtin import vote_key

    p, q = random.randint(1, 999), random.randint(1000, 9999)
    r = random.randint(1, 99)
    for stop in (".", ",", " ."):
        # a percentage is read without math-verify too
        assert accuracy_reward([""], [f"so \\boxed{{{r}.5\\%{stop}}}"], answer=[f"{r}.5"]) == [1.0]
        assert accuracy_reward([""], [f"<answer>\\boxed{{{r}\\%{stop}}}</answer>"], answer=[f"{r / 100}"]) == [1.0]
        assert vote_key(f"\\boxed{{{r}\\%{stop}}}") == vote_key(f"{r}\\%")
        assert vote_key(f"\\boxed{{\\frac{{{p}}}{{{q}}}{stop}}}") == vote_key(f"\\boxed{{\\frac{{{p}}}{{{q}}}}}")
        if not with_math_verify:
            continue
        for answer in (f"\\boxed{{\\frac{{{p}}}{{{q}}}{stop}}}", f"$\\frac{{{p}}}{{{q}}}{stop}$", f"\\(\\frac{{{p}}}{{{q}}}{stop}\\)",
                       f"$\\boxed{{\\frac{{{p}}}{{{q}}}{stop}}}$"):
            for gold in (f"{p}/{q}", f"\\frac{{{p}}}{{{q}}}"):
                assert accuracy_reward([""], [f"<answer>{answer}</answer>"], answer=[gold]) == [1.0], (answer, gold)
            assert accuracy_reward([""], [f"<answer>{answer}</answer>"], answer=[f"{p + 1}/{q}"]) == [0.0], answer
    # an ellipsis stays part of it
    assert not answers_match(f"\\boxed{{{p}, {q}, \\ldots}}", f"{p}, {q}")


def test_a_list_of_numbers_with_thousands_commas_is_those_numbers(with_math_verify):
    import random

    from r1fast.rewards.builtin import vote_key

    a, b, c = random.randint(1000, 10**9), random.randint(1000, 10**9), random.randint(0, 99)
    for answer, gold in ((f"{a:,}, {b:,}", f"{a}, {b}"), (f"\\boxed{{{a:,}, {c}}}", f"{a}, {c}"),
                         (f"({c}, -{b:,})", f"({c}, -{b})"), (f"[{a:,}.5, {b:,}]", f"[{a}.5, {b}]")):
        assert accuracy_reward([""], [f"<answer>{answer}</answer>"], answer=[gold]) == [1.0], answer
        assert accuracy_reward([""], [f"<answer>{gold}</answer>"], answer=[answer]) == [1.0], answer
        assert vote_key(answer) == vote_key(gold)
        assert not answers_match(answer, gold.replace(str(a if str(a) in gold else b), str(a + b)))
    # not one reading: an item of three digits may be a group of the number before it, and commas without spaces
    three = random.randint(100, 999)
    for answer, gold in ((f"{a:,}, {three}", f"{a}, {three}"), (f"{a:,},{b:,}", f"{a}, {b}")):
        assert not answers_match(answer, gold) and vote_key(answer) != vote_key(gold), answer
