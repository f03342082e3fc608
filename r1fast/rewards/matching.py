"""Answer matching for the accuracy reward and cons@k: whether a completion's final answer equals a reference
(`answers_match`: text, numbers, units, choice letters, LaTeX spacing, a variable's case, then math-verify within a
time limit) and the key of a majority vote (`vote_key`). The reward functions are in builtin.py."""
from __future__ import annotations

import bisect
import functools
import math
import re
import threading
import time
import unicodedata
from fractions import Fraction
from typing import Optional

from r1fast.rewards.deadline import OutOfTime, call_with_deadline

_BOXED_TOKEN_RE = re.compile(r"\\boxed\s*\{|\{|\}")


# Dashes that stand for a minus sign before a number in a model's or a dataset's answer: the en dash (a word processor's or
# a typeset page's minus, –5), the figure dash, and the small and fullwidth hyphen-minus (Chinese text's －5). None was
# read as a minus: –5 scored 0 against -5 (and `x = –5`, `(–1, 2)` against theirs). Each is a minus only where a sign
# goes, opening the answer or after a bracket, `=`, a comma, `$` or an operator, and before a number, a LaTeX command or
# one letter (–x+1): between two numbers it is a range (3–5 is neither 3 and -5 nor -2) and stays, and before a word a
# dash. The em dash and the hyphen U+2010 are prose's, and stay. The minus sign U+2212 is one anywhere, as math-verify
# reads it: `x = −5` matched `x = -5` but was another cons@k vote.
_SIGN_DASHES = "\u2012\u2013\ufe63\uff0d"
_DASH_AS_MINUS_RE = re.compile(rf"(\A|[(\[{{=,$:;<>+*/^])(\s*)[{_SIGN_DASHES}]"
                               r"(?=\s*(?:[0-9.\\]|[A-Za-z](?![A-Za-z])))")


def _with_minus_signs(s: str) -> str:
    """`s` with its minus signs (U+2212), and the dashes written where a minus sign goes (_SIGN_DASHES), as `-`."""
    s = s.replace("\u2212", "-")
    if not any(dash in s for dash in _SIGN_DASHES):
        return s
    return _DASH_AS_MINUS_RE.sub(r"\1\2-", s)


def last_boxed(text: str) -> Optional[str]:
    """The content of the \\boxed{…} that closes last, braces matched (`\\boxed{\\frac{1}{2}}`), in one pass, with a
    minus sign written just before the box (`x = -\\boxed{5}`: _minus_before_box) as its first character."""
    span = _last_boxed_span(text)
    if span is None:
        return None
    box_start, start, end = span
    content = text[start:end]
    return "-" + content.strip() if _minus_before_box(text, box_start, content) is not None else content


def _last_boxed_span(text: str) -> Optional[tuple[int, int, int]]:
    """Where the \\boxed{…} that closes last starts, and where its content starts and ends; None without one."""
    # (where a box's `\\boxed` starts, else -1 for a plain `{`; where its content starts)
    stack: list[tuple[int, int]] = []
    last = None
    for m in _BOXED_TOKEN_RE.finditer(text):
        if m.group() == "}":
            if stack:
                box_start, start = stack.pop()
                if box_start >= 0:
                    last = (box_start, start, m.start())
        else:
            stack.append((m.start() if m.group() != "{" else -1, m.end()))
    return last


# A minus sign written before a box rather than in it: math-verify, and the extraction, read the box alone, so
# `x = -\boxed{5}` and `$-\boxed{5}$` scored 1 against the gold 5 and 0 against -5. Written against the box it is the
# answer's sign, unless it follows a number or a closing bracket (`10 -\boxed{5}`, a difference whose box holds its
# value); spaced from the box only after `=`, `$` or an opening bracket (`x = - \boxed{5}`): `- \boxed{5}` opening a
# line is a list's bullet and `Answer - \boxed{5}` (or `$-$ \boxed{5}`) a dash. The box must hold one term (no sign,
# sum, list, relation or words outside its brackets): -\boxed{x+1} is not -x+1, and is left as it was.
_MINUS_SIGNS = "-\u2212" + _SIGN_DASHES
_OPERAND_END = frozenset("0123456789)]}.")
_SIGN_OPENERS = frozenset("=$([{")
# a LaTeX argument, or a bracket that holds no list (`(x+1)^2` is one term, `(1, 2)` a tuple)
_NESTED_GROUP_RE = re.compile(r"\{[^{}]*\}|\([^(),;]*\)|\[[^\[\],;]*\]")
_THOUSANDS_COMMA_RE = re.compile(r"(?<=[0-9]),(?=[0-9]{3}(?![0-9]))")
_OUTER_OPERATOR_RE = re.compile(r"[-+=,;:<>|$\u2212\u2264\u2265\u2260\u2012-\u2015\ufe63\uff0d]"
                                r"|\\(?:pm|mp|cup|cap|setminus|n?eq|le|ge|leq|geq|lt|gt|ne|neq|approx|in|to|cdots|ldots|dots"
                                r"|quad|qquad|text|mathrm|textbf)(?![A-Za-z])")


def _minus_before_box(text: str, box_start: int, content: str) -> Optional[tuple[int, int]]:
    """Where the minus sign that belongs to the box at `box_start` is written, and where what follows it and is kept
    starts (the box, or the math delimiter that opens before it: _math_opener_before), else None (see _MINUS_SIGNS)."""
    j = _before_spaces(text, box_start)
    opener = _math_opener_before(text, j)
    kept = box_start if opener is None else opener
    j = _before_spaces(text, kept)
    if j == 0 or text[j - 1] not in _MINUS_SIGNS or not _one_term(content):
        return None
    sign = j - 1
    k = _before_spaces(text, sign)
    before = text[k - 1] if k > 0 else ""
    if j < kept:   # spaced from the box
        return (sign, kept) if before in _SIGN_OPENERS else None
    if opener is not None and (before == "$" or text[max(k - 2, 0):k] in ("\\)", "\\]")):
        return None   # a sign between two math spans ($x$-$\boxed{5}$): as likely a difference or a hyphen
    return None if before in _OPERAND_END else (sign, kept)


def _before_spaces(text: str, i: int) -> int:
    """Where the spaces and tabs that end text[:i] start."""
    while i > 0 and text[i - 1] in " \t":
        i -= 1
    return i


# A minus sign written outside the math that opens just before a box (`x is -$\boxed{5}$`, `-\(\boxed{5}\)`) is the
# box's too: read as the box alone, it scored 1 against 5 and 0 against -5, while `$-\boxed{5}$` scored 1 against -5.
# A `$` opens math where the unescaped `$` before it are paired (one that closes math is no opener: `$3 -$ $\boxed{5}$`,
# whose minus is in the span before).
_UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$")


def _math_opener_before(text: str, j: int) -> Optional[int]:
    """Where a math delimiter (`$`, `$$`, `\\(`, `\\[`) that opens math and ends at `j` starts, else None."""
    if text[max(j - 2, 0):j] in ("\\(", "\\["):
        i = j - 1
        while i > 0 and text[i - 1] == "\\":
            i -= 1
        return j - 2 if (j - 1 - i) % 2 == 1 else None   # `\\(` is a line break, then a bracket
    if j == 0 or text[j - 1] != "$" or (j > 1 and text[j - 2] == "\\"):
        return None
    start = j - 2 if j > 1 and text[j - 2] == "$" else j - 1
    return start if len(_UNESCAPED_DOLLAR_RE.findall(text, 0, start)) % 2 == 0 else None


def _one_term(content: str) -> bool:
    """Whether a box's content is one term: no sign opening it, no operator, list or relation outside its brackets."""
    s = _THOUSANDS_COMMA_RE.sub("", content.strip())   # -\\boxed{1,000} is -1000
    if "boxed" in s:   # a box in the box: left as it was
        return False
    for _ in range(_MAX_NESTING):
        flat = _NESTED_GROUP_RE.sub("", s)
        if flat == s:
            break
        s = flat
    return bool(content.strip()) and not _OUTER_OPERATOR_RE.search(s)


def _with_sign_in_last_box(s: str) -> str:
    """`s` with a minus sign written just before its last box moved into it (`-\\boxed{5}` is `\\boxed{-5}`), as
    last_boxed reads it; `s` itself otherwise."""
    if "boxed" not in s:
        return s
    span = _last_boxed_span(s)
    if span is None:
        return s
    box_start, start, end = span
    found = _minus_before_box(s, box_start, s[start:end])
    if found is None:
        return s
    sign, kept = found
    return s[:sign] + s[kept:start] + "-" + s[start:end].strip() + s[end:]


# A thousands group never starts a number with 0: 0,125 (a decimal comma, or a list) is not 125.
_MANTISSA = r"(?:[1-9][0-9]{0,2}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]*)?|\.[0-9]+"
_NUMBER_RE = re.compile(rf"([+-]?)\s*({_MANTISSA})(?:[eE]([+-]?[0-9]{{1,3}}))?")
# Scientific notation as LaTeX writes it (6.02 \times 10^{23}, 1.6 \cdot 10^{-19}): a number, as 6.02e23 is. Given to
# math-verify, -1.6 \times 10^{-19} equalled 1.6 \times 10^{-19} (it rounds floats to 6 decimal places). An exponent
# without braces is read whole, as plain text means it and math-verify reads it (10^23, 10^-19): -1.6 × 10^-19 and
# 1.7 × 10^-19 scored 1 against 1.6 \times 10^{-19}. A `*` is a times sign too, as plain text writes it: 6.6*10^{-27}
# scored 1 against 7.7*10^{-27} and 6.6e-26, and 1.9*10^-2 (10^{-}2 to math-verify) 0 against 1.9e-2.
_TIMES_TEN = r"\s*(?:\\times|\\cdot|\u00d7|\*)\s*10\s*\^\s*"
_SCIENTIFIC_RE = re.compile(rf"([+-]?)\s*({_MANTISSA}){_TIMES_TEN}"
                            r"(?:\{\s*([+-]?)\s*([0-9]{1,3})\s*\}|([+-]?[0-9]{1,3}))")
# The denominator's sign and its spaces are one optional group: `\s*([+-]?)\s*` split a run of spaces between its
# two \s* in every way, quadratic on "1/" and 20k spaces (12 s, on the main thread, no deadline).
_RATIO_RE = re.compile(r"([+-]?)\s*([0-9]+)\s*/\s*(?:([+-])\s*)?([0-9]+)")
# A mixed number written out (2 3/4: two and three quarters, as recipes and school word problems write it):
# math-verify, which reads 2\frac{3}{4} as 2.75, found no number in it, and the right answer scored 0.
_MIXED_RE = re.compile(r"([+-]?)\s*([0-9]+)\s+([0-9]+)\s*/\s*([0-9]+)")
# Where a mixed number is in a text, for re.search: _MIXED_RE's leading `\s*([0-9]+)` is retried from every place,
# quadratic on a long run of digits or spaces ("1/", 20k spaces, "2": 14 s).
_HOLDS_MIXED_RE = re.compile(r"[0-9]\s+[0-9]+\s*/\s*[0-9]")
_MONEY_RE = re.compile(r"\A([+-]?)\s*\\?\$\s*(?=[0-9.])")
_WRAPPED_RE = re.compile(r"\\boxed\s*\{(.*)\}|\{(.*)\}|\\\((.*)\\\)|\\\[(.*)\\\]", re.DOTALL)
# What else separates a number's groups of three digits: LaTeX's {,} and ,\! (MATH's 10,\!000), its thin and
# other spaces (1\,000), and a plain, no-break or thin space (SI's 1 000). math-verify read `1\,000` and
# `1 000` as the product 1*000: the answer 1 000 scored 1 against a gold 0, and 0 against 1000.
_GROUP_SEP_RE = re.compile(r"(?<=[0-9])(?:\{,\}|,\\!|\\[,;: ]|~| |\u00a0|\u2009|\u202f)(?=[0-9]{3}(?![0-9]))")


def _unwrapped(s: str) -> str:
    """`s` without `$…$`, `\\(…\\)`, `\\[…\\]`, `\\boxed{…}` and `{…}` around all of it (four deep at most)."""
    s = s.strip()
    for _ in range(4):
        if len(s) > 1 and s[0] == "$" and s[-1] == "$":
            s = s.strip("$").strip()
            continue
        m = _WRAPPED_RE.fullmatch(s)
        if m is None:
            break
        s = next(g for g in m.groups() if g is not None).strip()
    return s


# A list of numbers that writes them with thousands commas (1,000, 2,000): math-verify split it at every comma, 1, 000, 2 and
# 000, and the right answer scored 0 against 1000, 2000. It is read as a list of those numbers where that is the only
# reading: items parted by a comma and a space, each a number whose commas, if any, are followed by exactly three digits
# and none, a space; an item of exactly three digits after the first one could be a group of the number before it written
# with a stray space (1,234, 567) and leaves the list as it is, as does a comma between numbers without a space (1,000,2,000).
_LIST_NUMBER = r"[+-]?(?:[1-9][0-9]{0,2}(?:,[0-9]{3})+|0|[1-9][0-9]*)(?:\.[0-9]+)?"
_THOUSANDS_LIST_RE = re.compile(rf"([(\[]?)\s*({_LIST_NUMBER}(?:,\s+{_LIST_NUMBER})+)\s*([)\]]?)")
_LIST_ITEM_SEP_RE = re.compile(r",\s+")
_THREE_DIGITS_RE = re.compile(r"[0-9]{3}")


def _without_list_thousands_commas(s: str) -> str:
    """A list of numbers written with thousands commas (`1,000, 2,000`, `\\boxed{(1,000, 25)}`) without them
    (`1000, 2000`, `(1000, 25)`); `s` itself otherwise (see _THOUSANDS_LIST_RE)."""
    if ", " not in s and ",\t" not in s and ",\n" not in s:
        return s
    m = _THOUSANDS_LIST_RE.fullmatch(_unwrapped(s))
    if m is None or bool(m.group(1)) != bool(m.group(3)):
        return s
    items = _LIST_ITEM_SEP_RE.split(m.group(2))
    if not any("," in item for item in items) or any(_THREE_DIGITS_RE.fullmatch(item) for item in items[1:]):
        return s
    return m.group(1) + ", ".join(item.replace(",", "") for item in items) + m.group(3)


def _as_number(s: str) -> Optional[Fraction]:
    """A plain number: an integer, a decimal (optionally with a short exponent), a ratio of integers, or a
    mixed number (2 3/4, a proper fraction after the whole); a comma only as a thousands separator (1,000 but
    not 1,5, a list to math-verify), as are LaTeX's and a space's (1\\,000, 1 000: _GROUP_SEP_RE).
    `$…$`, `\\(…\\)`, `\\[…\\]`, `\\boxed{…}` and `{…}` around it, and a dollar sign before it, are removed."""
    s = _unwrapped(_with_minus_signs(s.strip()))
    s = s.rstrip(".,").strip()   # a sentence's full stop or comma
    s = _MONEY_RE.sub(r"\1", s)   # "$18", "-\\$5": GSM8K answers; math-verify reads them as the number too
    try:
        mixed = _MIXED_RE.fullmatch(s)   # before the separators: 1 100/200 is one and a half, not 1,100/200
        if mixed and 0 < int(mixed.group(3)) < int(mixed.group(4)):
            value = int(mixed.group(2)) + Fraction(int(mixed.group(3)), int(mixed.group(4)))
            return -value if mixed.group(1) == "-" else value
        s = _GROUP_SEP_RE.sub(",", s)
        m = _NUMBER_RE.fullmatch(s)
        if m:
            sign, digits, exp = m.groups()
            return Fraction(sign + digits.replace(",", "") + (f"e{exp}" if exp else ""))
        m = _SCIENTIFIC_RE.fullmatch(s)
        if m:
            sign, digits, exp_sign, exp, bare_exp = m.groups()
            return Fraction(f"{sign}{digits.replace(',', '')}e{exp_sign or ''}{exp or bare_exp}")
        m = _RATIO_RE.fullmatch(s)
        if m:
            value = Fraction(int(m.group(2)), int(m.group(4)))
            return -value if (m.group(1) == "-") != (m.group(3) == "-") else value
    except (ValueError, ZeroDivisionError):   # 1/0, or more digits than int() reads
        pass
    return None


# A number LaTeX writes: a fraction of two numerals (\frac{1}{2}, \dfrac12, -\tfrac{3}{4}, \frac{-3}{4}), or a number
# spaced or marked in degrees as LaTeX writes it (1\!000, 30^\circ). math-verify reads each as its value, so \frac{1}{2}
# matched 0.5 and 1/2, yet cons@k's vote_key read it as LaTeX text: \frac{1}{2}, \dfrac{1}{2}, 0.5 and 1/2 were four
# votes, and three samples of one wrong answer written three ways lost to two right ones. Without math-verify
# \frac{1}{2} scored 0 against 0.5. A numerator with a thousands comma is none (math-verify reads \frac{1,000}{2} as a
# list), nor is a mixed number (2\frac{3}{4}).
_NUMERAL = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_LATEX_FRACTION_RE = re.compile(rf"([+-]?)\\[dt]?frac(?:\{{({_NUMERAL})\}}|([0-9]))(?:\{{({_NUMERAL})\}}|([0-9]))")
_DEGREES_RE = re.compile(r"(?:\^\{\\circ\}|\^\\circ|\u00b0)\Z")


def _latex_number(s: str) -> Optional[Fraction]:
    """The value of a number written in LaTeX (see _LATEX_FRACTION_RE), else None; a plain number is _as_number's."""
    if "\\" not in s and "\u00b0" not in s:
        return None
    s = _unwrapped(_without_latex_spacing(_without_enclosed_full_stop(_without_full_stop(s))))
    s = _DEGREES_RE.sub("", s)
    value = _as_number(s)
    if value is not None:
        return value
    m = _LATEX_FRACTION_RE.fullmatch(s)
    if m is None:
        return None
    try:
        value = Fraction(m.group(2) or m.group(3)) / Fraction(m.group(4) or m.group(5))
    except (ValueError, ZeroDivisionError):   # \frac{1}{0}, or more digits than int() reads
        return None
    return -value if m.group(1) == "-" else value


def _number_value(s: str) -> Optional[Fraction]:
    """The value of a plain number (_as_number) or one written in LaTeX (_latex_number), else None."""
    value = _as_number(s)
    return value if value is not None else _latex_number(s)


# One variable given a number (x = 5, x=\frac{1}{2}, \theta = 30^\circ), a form final answers often take: math-verify
# compares it by its value, so x = 5 matched x=5.0 and x = \frac{1}{2} x = 0.5, yet each was another cons@k vote (the
# text as written). The variable keeps its case, as in answers_match (X = 5 is not x = 5), and x = 5 stays apart
# from y = 5, which answers_match tells apart, and so from 5 alone.
_ASSIGNMENT_RE = re.compile(r"([A-Za-z]|\\[A-Za-z]+)\s*=\s*(.+)", re.DOTALL)


def _assigned_number(s: str) -> Optional[tuple[str, Fraction]]:
    """(the variable, the number) of an answer that gives one variable a number (_ASSIGNMENT_RE), else None."""
    if "=" not in s:
        return None
    m = _ASSIGNMENT_RE.fullmatch(_unwrapped(_without_latex_spacing(_without_full_stop(s))))
    if m is None or (len(m.group(1)) > 1 and m.group(1)[1:] not in _GREEK_NAMES):
        return None
    value = _number_value(m.group(2))
    return None if value is None else (m.group(1), value)


_DECIMAL_DIGITS_RE = re.compile(r"([0-9]*)\.?([0-9]*)")
_FLOAT_REL_TOL = Fraction(1, 10**12)


def _float_repr(s: str) -> bool:
    """A decimal with a float's worth of digits (0.3333333333333333: a float gold written out by JSON,
    parquet or CSV), which stands for a value it can only approximate. Its digits after the point, trailing zeros
    aside, are part of it: a whole number is exact, however long (a float column writes one below 2^53 exactly, as
    12345678901234.0), and a count of 13 digits or more scored 1 one off (1234567890124 against 1234567890123)."""
    for m in _DECIMAL_DIGITS_RE.finditer(s):
        whole, fraction = m.group(1), m.group(2).rstrip("0")
        if fraction and len(whole) + len(fraction) >= 12:
            return True
    return False


# A whole answer that is text in LaTeX: MATH's `\\text{Evelyn}`, `\\text{odd}`, `\\textbf{no}` (in `$…$` or not).
_TEXT_ANSWER_RE = re.compile(r"\$?\s*\\(?:text|textbf|textrm|mathrm|mbox)\s*\{([^{}$\\]*)\}\s*\$?")


# A choice letter in brackets, as multiple-choice answers write it: (B), B), [B]
_BRACKETED_CHOICE_RE = re.compile(r"[(\[]?\s*([A-Za-z])\s*[)\]]")


# A choice letter followed by its option's text, as multiple-choice golds and answers write it: B. 12, B) 12, B: 12,
# (D) 4\\sqrt{2}, MATH's \\textbf{(C) }3. A capital of A to J (up to ten options); after a full stop or a colon a space.
_OPTION_HEAD_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf)\s*\{\s*\(?\s*([A-J])\s*\)?\s*\}|[(\[]\s*([A-J])\s*[)\]]"
                             r"|([A-J])\s*\)|([A-J])[.:](?=\s)")
_LATEX_SPACE_RE = re.compile(r"(?:\s|\\[ ,;:!]|~)*")


def _option_letter(s: str) -> Optional[str]:
    """The letter of an answer that is a choice letter and its option's text (`B. 12`, `\\textbf{(C) }3`), else None.
    Read as a whole, B. 12 scored 0 against the gold B (and B against the gold B. 12), while math-verify, finding 12 in
    both, took C. 12 for B. 12. An answer naming two options (`(A) 3, (B) 5`) is none."""
    m = _OPTION_HEAD_RE.match(s)
    if m is None:
        return None
    rest = s[_LATEX_SPACE_RE.match(s, m.end()).end():]
    if not rest or _OPTION_HEAD_RE.search(rest):
        return None
    return next(g for g in m.groups() if g is not None)


def _text_words(s: str) -> Optional[str]:
    """An answer's words, case aside, bare or in one `\\text{…}`; None for other LaTeX. Bare math with variables keeps
    its case (_variables: x+1 is not X+1). One run of letters alone is a word when it holds a vowel and is written as
    a word is, in lower case, in capitals or capitalised (ma = Ma = MA, as no = No), else a product of variables that
    keeps its case (mgh is not Mgh nor MGH, mA not ma; _bare_run_variables), unless its letters are all choices or all
    a Roman numeral's, in one case (BCD = bcd, XX = xx; _choices_or_numeral). A choice letter in brackets is the letter:
    (B), B) and \\text{(B)} matched B only through math-verify (0 without it) and were each another cons@k vote than B."""
    s = s.strip().rstrip(".").strip()
    letter = _option_letter(s)
    if letter is not None:
        return letter.casefold()
    m = _TEXT_ANSWER_RE.fullmatch(s)
    if m:
        return _choice_letter(m.group(1).strip()).casefold()
    if "\\" in s or "$" in s:
        return None
    s = _choice_letter(s)
    return s if _variables(s) and not _choices_or_numeral(s) else s.casefold()


# Letters that are all choices (A to J) or all a Roman numeral's, typed all in one case, are a multiple-select answer or a
# numeral whatever their case (BCD = bcd, XX = xx), not a product of variables; other letters without a vowel are one
# (mgh is not MGH: m*g*h, which scored 1 against M*G*H as all letters in the other case did).
_CHOICE_LETTERS = frozenset("ABCDEFGHIJ")
_ROMAN_NUMERAL_LETTERS = frozenset("IVXLCDM")


def _choices_or_numeral(s: str) -> bool:
    """Whether `s` is letters of choices or of a Roman numeral, all in capitals or all in lower case (BCD, xx)."""
    if not (s.isascii() and s.isalpha() and (s.isupper() or s.islower())):
        return False
    letters = set(s.upper())
    return letters <= _CHOICE_LETTERS or letters <= _ROMAN_NUMERAL_LETTERS


def _is_letter(words: Optional[str]) -> bool:
    return words is not None and len(words) == 1 and words.isalpha()


def _choice_letter(s: str) -> str:
    m = _BRACKETED_CHOICE_RE.fullmatch(s)
    return m.group(1) if m else s


# Greek letters are variables too, their LaTeX names telling their case: \\Delta is not \\delta, nor \\Gamma \\gamma (each
# pair was one symbol to math-verify)
_GREEK_NAMES = frozenset("""alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma
tau upsilon phi chi psi omega""".split())
# A lone Latin letter in math (beside a digit, an operator or LaTeX) is a variable, and its case is part of it: x+1 and
# X+1, a_n and A_n, 2\\pi r and 2\\pi R are different answers, though math-verify lowercases every symbol and bare text
# was compared case aside (_same_words): each pair scored 1. A letter alone, in brackets or not ((A), b.), is a choice
# and words are words: their case stays aside (B = b., Yes = yes); so does a lone x against X, which cannot be told
# from a choice letter.
# a LaTeX command's name, or a run of letters (Greek ones too: a chat model's Δ+1 and δ+1 scored 1 and were one vote)
_NAME_OR_WORD_RE = re.compile(r"\\?[A-Za-z]+|[\u0391-\u03a9\u03b1-\u03c9]+")
# A one-letter name applied to brackets (P(A), f(x)) is math too: as words, compared case aside, P(a) scored 1 against
# P(A) and f(X) against f(x). A longer name (sin(x), Paris (France)) is no sign by itself.
_MATH_SIGN_RE = re.compile(r"[0-9+\-*/^_=<>\\]")
_ONE_LETTER_CALL_RE = re.compile(r"(?<![A-Za-z])[A-Za-z]\(")
# Two or three letters written tight against a digit, an operator or a bracket are a product of variables (2xy, ab+1,
# \\sqrt{xy}, \\frac{ab}{2}), each letter with its case: 2xy and 2XY, ab+1 and AB+1 each scored 1 and were one vote, as
# the run was taken for a word. A run beside spaces only stays a word or a unit (5 cm, 5 \\text{ kg}), and the text of
# \\text{…} and its kin is left out.
_TIGHT = r"[0-9+\-*/^_=<>(){}\[\]]"
# A run of letters without a vowel (y counted as one) is no word but a product of variables, each letter with its case,
# however long, bare or written tight: the answer mgh (bare, so taken for a word) scored 1 against the gold Mgh, GMMh
# against GMmh, and \\frac{GMMh}{r} (four letters, a word to the rule above) against \\frac{GMmh}{r}. Bare choice letters
# or a Roman numeral's typed all in the other case (BCD and bcd, XX and xx) are the same answer (_choices_or_numeral).
_CONSONANT = "[B-DF-HJ-NP-TV-XZb-df-hj-np-tv-xz]"
_CONSONANT_PRODUCT_RE = re.compile(f"{_CONSONANT}{{2,}}")
# The rule for an answer that is one run of letters and nothing else (_bare_run_variables). Bare, it is a word, its case
# aside, when it holds a vowel and is written as a word is: all in lower case, all in capitals, or capitalised (ma, Ma
# and MA are one answer, as no, No and NO are: two letters alone cannot be told from a word). Any other run is a product
# of variables, each letter with its case: one without a vowel (mgh, kT), one of two or three letters with a capital
# inside (mA, xY: m*A, which scored 1 against ma; a longer one is a name, McDonald, iPhone), and in math mode ($...$, \\(...\\), \\boxed{}, braces) one of two or three letters whatever it
# holds, as written tight against an operator ($ma$ scored 1 against $Ma$, as F=ma does not against F=Ma).
_LETTER_RUN_RE = re.compile(r"[A-Za-z]{2,}")
_VOWELS = frozenset("aeiouyAEIOUY")
_PRODUCT = rf"(?:[A-Za-z]{{2,3}}|{_CONSONANT}{{4,}})"
_TIGHT_PRODUCT_RE = re.compile(rf"(?<={_TIGHT}){_PRODUCT}(?![A-Za-z])|(?<![A-Za-z\\]){_PRODUCT}(?={_TIGHT})")
_TEXT_PART_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox|operatorname)\s*\{[^{}]*\}")
# A numeral's digits in a base past 10 are no variables, so their case stays aside as math-verify's is (number theory's 1A_{16},
# A5_{12}: a digit in the run, every letter a digit of that base): read as variables, 1a_{16} scored 0 against 1A_{16}.
# Not covered: 2a_{12} (2 times a_{12}) matches 2A_{12}.
# (a run is tried from its start only, so the regex stays linear in a long run of digits)
_BASE_NUMERAL_RE = re.compile(r"(?<![A-Za-z0-9\\])([0-9A-Za-z]+)_(?:\{\s*([0-9]{2})\s*\}|([0-9]{2}))")
# A time of day's a.m./p.m. after a clock time or with its full stops (10:30am, 9:40 A.M., 4 P.M.) is a word, not two
# variables: 10:30am and 9:40 a.m. scored 0 against 10:30AM and 9:40 A.M. Not covered: 2pm (no clock time, no full
# stops) is still a product of variables, apart from 2PM.
_TIME_OF_DAY_RE = re.compile(r"(?<=[0-9]:[0-9]{2})\s*[AaPp]\.?\s?[Mm]\b\.?|(?<=[0-9])\s*[AaPp]\.\s?[Mm]\b\.?")


def _without_numeral_digits(m: re.Match) -> str:
    digits, base = m.group(1), int(m.group(2) or m.group(3))
    if 10 < base <= 36 and any(ch.isdigit() for ch in digits) and all(int(ch, 36) < base for ch in digits):
        return "0"
    return m.group()


def _written_as_a_word(run: str) -> bool:
    """Whether a run of letters holds a vowel and is in lower case, in capitals or capitalised (yes, YES, Yes), or is
    longer than a product of two or three letters (McDonald, iPhone: a name's capitals)."""
    return any(ch in _VOWELS for ch in run) and (run.islower() or run.isupper() or run.istitle() or len(run) > 3)


def _bare_run_variables(s: str) -> frozenset[str]:
    """The letters of an answer that is one run of letters, alone or in math mode's delimiters, where the run is a
    product of variables (_LETTER_RUN_RE's rule: mgh, mA, $ma$); none where it is a word (ma, Yes) or is no such run."""
    if s.isalpha():   # the cheap case first: most bare answers that reach here are words or prose
        whole, in_math = s, False
    elif s[:1] in ("$", "\\", "{"):
        whole = _unwrapped(s)
        in_math = whole != s
    else:
        return frozenset()
    if not _LETTER_RUN_RE.fullmatch(whole):
        return frozenset()
    if _written_as_a_word(whole) and not (in_math and len(whole) <= 3):
        return frozenset()
    return frozenset(whole)


def _variables(s: str) -> frozenset[str]:
    """The variables of an answer that is math (a digit, an operator or LaTeX in it), in their case: its lone Latin
    letters and Greek letters' LaTeX names, outside `\\text{…}` and its kin (words: the p.m. of 4\\text{ p.m.}); none for
    other answers (a choice letter, words, one `\\text{…}`)."""
    s = s.strip().rstrip(".").strip()
    if not (_MATH_SIGN_RE.search(s) or "(" in s and _ONE_LETTER_CALL_RE.search(s)) or _TEXT_ANSWER_RE.fullmatch(s):
        return _bare_run_variables(s)
    millilitres = _GLUED_MILLILITRES_RE.fullmatch(s)
    if millilitres:   # mL and ml are one unit, the litre's symbol being L or l: the same letters to compare by case
        s = s[:millilitres.start(1)] + "ml" + s[millilitres.end(1):]
    s = _TIME_OF_DAY_RE.sub(" ", _BASE_NUMERAL_RE.sub(_without_numeral_digits, _TEXT_PART_RE.sub(" ", s)))
    found = set()
    for name in _NAME_OR_WORD_RE.findall(s):
        if len(name) == 1 or (name[0] == "\\" and name[1:].lower() in _GREEK_NAMES):
            found.add(name)
    for product in _TIGHT_PRODUCT_RE.findall(s):
        found.update(product)
    return frozenset(found)


def _variables_differ_in_case(predicted: str, gold: str) -> bool:
    """Whether the two answers' variables are the same letters only case aside (x+1 and X+1)."""
    a, b = _variables(predicted), _variables(gold)
    return bool(a) and a != b and {x.casefold() for x in a} == {x.casefold() for x in b}


# Letters that stand in for a variable written in both cases (_with_cases_apart): not e or i (constants to math-verify),
# the other vowels last, so that a product without a vowel (GMmh) stays one after renaming, which math-verify reads.
_STAND_IN_LETTERS = "qzjkvwhgbnmtpsrlfcxdyuao"
# A command's name, or a run of letters: a variable, or a product of two or three written tight (GMm), or a word
_NAME_OR_RUN_RE = re.compile(r"\\[A-Za-z]+|[A-Za-z\u0391-\u03a9\u03b1-\u03c9]+")
# Letters in a font of named sets or in text are no variables to rename: r\\in\\mathbb{R}'s R is the reals to math-verify
# (it matched (-\\infty, \\infty), and scored 0 with its R renamed)
_NOT_RENAMED_RE = re.compile(r"\\(?:mathbb|mathcal|mathfrak|mathscr|text|textbf|textrm|mathrm|mbox|operatorname)\s*\{[^{}]*\}")


def _case_pairs(*answers: str) -> list[str]:
    """The variables of the answers, together, whose other case is among them too (X beside x, \\Delta beside \\delta):
    the capital of each pair, sorted."""
    found = frozenset().union(*(_variables(_NOT_RENAMED_RE.sub(" ", a)) for a in answers))
    return sorted(v for v in found if v != v.lower() and v.lower() in found)


def _with_cases_apart(predicted: str, gold: str) -> Optional[tuple[str, str]]:
    """The two answers with each capital variable that also stands in them in lower case (_case_pairs) written as
    another letter, used in neither, for math-verify, which lowercases every symbol: it read \\frac{x}{X} as 1 and X-x
    as 0, so \\frac{x}{X} scored 1 against \\frac{X}{x}, and X-x against 0. A letter is renamed alone or in a product
    written tight (\\frac{GMm}{r^2} still matches \\frac{GmM}{r^2}), never in a word, a command's name, \\text{} or
    \\mathbb{}. The answers as they are without such a pair; None where one is left (in a longer run of letters), or no
    letter is free."""
    capitals = _case_pairs(predicted, gold)
    if not capitals:
        return predicted, gold
    used = (predicted + gold).lower()
    free = [ch for ch in _STAND_IN_LETTERS if ch not in used]
    if len(free) < len(capitals):
        return None
    # a command's stand-in has a space before it, which keeps it off a command before it (\\cdot\\Delta)
    stand_in = {capital: (" " if capital.startswith("\\") else "") + letter for capital, letter in zip(capitals, free)}

    def renamed(m: re.Match) -> str:
        name = m.group()
        if name.startswith("\\") or (len(name) > 3 and not _CONSONANT_PRODUCT_RE.fullmatch(name)):
            return stand_in.get(name, name)
        return "".join(stand_in.get(ch, ch) for ch in name)

    predicted, gold = (_sub_outside(_NOT_RENAMED_RE, _NAME_OR_RUN_RE, renamed, x) for x in (predicted, gold))
    return None if _case_pairs(predicted, gold) else (predicted, gold)


def _sub_outside(kept: re.Pattern, pattern: re.Pattern, replacement, s: str) -> str:
    """pattern.sub(replacement) on the parts of `s` that `kept` does not match."""
    out, end = [], 0
    for m in kept.finditer(s):
        out += [pattern.sub(replacement, s[end:m.start()]), m.group()]
        end = m.end()
    return "".join(out + [pattern.sub(replacement, s[end:])])


def _same_words(predicted: str, gold: str) -> bool:
    """The same words, case and a final full stop aside, bare ("Evelyn", "odd.", "Yes") or in `\\text{}`:
    math-verify finds nothing to compare in bare prose, and the right answer scored 0 (`Yes` against a
    yes/no dataset's `yes`, `B.` against `B`), while it takes the single letters `b` and `B` as equal."""
    a, b = _text_words(predicted), _text_words(gold)
    return bool(a) and a == b


# Markdown a chat model puts around its whole answer (**5**, *5*, `x+1`): read as `$**5**$`, math-verify found
# nothing and the right answer scored 0.
_MARKDOWN_RE = re.compile(r"\*\*((?:(?!\*\*).)+)\*\*|__((?:(?!__).)+)__|\*([^*]+)\*|`([^`]+)`", re.DOTALL)


def _without_markdown(s: str) -> str:
    """The answer inside markdown emphasis or code that wraps all of it (`**\\frac{1}{2}**`), a sentence's full stop
    or comma after it aside (`**14**.`, which read as `$**14**.$` scored 0 against 14)."""
    s = s.strip()
    for _ in range(3):
        m = _MARKDOWN_RE.fullmatch(s) or _MARKDOWN_RE.fullmatch(_without_full_stop(s))
        if m is None:
            break
        s = next(g for g in m.groups() if g is not None).strip()
    return s


# One \(…\) or \[…\] around the whole answer (no other delimiter inside): as `$\[5\]$` math-verify read no number.
# Only a whole one is removed: math-verify reads the first delimited part of a longer answer alone, so `\(3\)+1`
# and `\[3\]-4` (given to it as they are) scored 1 against the gold 3.
_MATH_DELIMITED_RE = re.compile(r"\\\(((?:(?!\\[()\[\]]).)*)\\\)|\\\[((?:(?!\\[()\[\]]).)*)\\\]", re.DOTALL)


def _without_math_delimiters(s: str) -> str:
    m = _MATH_DELIMITED_RE.fullmatch(s.strip())
    return next(g for g in m.groups() if g is not None).strip() if m else s


# Unicode math a chat model writes in plain text, as the LaTeX math-verify reads: it found no number in √2, ∞, x²
# or ½, and the right answer scored 0 against \\sqrt{2}, \\infty, x^2 or 0.5.
_UNICODE_SYMBOLS = {"∞": "\\infty ", "≤": "\\le ", "≥": "\\ge ", "≠": "\\ne ", "±": "\\pm ", "·": "\\cdot "}
_SUPERSCRIPTS = "⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺"
_SUPERSCRIPT_RUN_RE = re.compile(f"[{_SUPERSCRIPTS}]+")
# a decimal's point only between digits: `[0-9.]+` took a sentence's full stop in, and √6. (\sqrt{6.}) scored 0
_SQRT_RE = re.compile(r"√\s*(?:\(([^()]*)\)|([0-9]+(?:\.[0-9]+)?|\.[0-9]+|[A-Za-z]))")
_VULGAR_FRACTION_RE = re.compile("[½⅓⅔¼¾⅕⅖⅗⅘⅙⅚⅛⅜⅝⅞]")
# each one's LaTeX, made once: a Fraction per character took 1.3 s for a 100k-character junk answer of ½
_VULGAR_FRACTION_LATEX = {
    ch: " \\frac{%d}{%d}" % Fraction(unicodedata.numeric(ch)).limit_denominator(10).as_integer_ratio()
    for ch in "½⅓⅔¼¾⅕⅖⅗⅘⅙⅚⅛⅜⅝⅞"}
_UNICODE_MATH_RE = re.compile(f"[{''.join(_UNICODE_SYMBOLS)}{_SUPERSCRIPTS}√½⅓⅔¼¾⅕⅖⅗⅘⅙⅚⅛⅜⅝⅞]")


def _as_latex(s: str) -> str:
    """`s` with its Unicode math (√, ∞, ≤, ², ½...) written as LaTeX; `s` itself when it has none."""
    if not _UNICODE_MATH_RE.search(s):
        return s
    s = _SQRT_RE.sub(lambda m: "\\sqrt{" + (m.group(1) if m.group(1) is not None else m.group(2)) + "}", s)
    s = _SUPERSCRIPT_RUN_RE.sub(lambda m: "^{" + m.group().translate(str.maketrans(_SUPERSCRIPTS, "0123456789-+"))
                                + "}", s)
    s = _VULGAR_FRACTION_RE.sub(lambda m: _VULGAR_FRACTION_LATEX[m.group()], s)
    return "".join(_UNICODE_SYMBOLS.get(ch, ch) for ch in s).strip()


# A repeating decimal (0.\overline{3}, 0.1\overline{6}, 1.\overline{142857}): math-verify read 0.\overline{3} as 0, so
# it scored 1 against the gold 0 and against 0.\overline{4}, and 0 against \frac{1}{3}; each is written as the fraction
# it equals for every reading after. A run of digits past _MAX_REPEATING_DIGITS is left as written (its fraction's text
# would outgrow Python's int-to-text limit).
_REPEATING_DECIMAL_RE = re.compile(r"(?<![0-9.])([0-9]*)\.([0-9]*)\\overline\s*\{\s*([0-9]+)\s*\}")
_MAX_REPEATING_DIGITS = 100


def _with_repeating_decimals_as_fractions(s: str) -> str:
    """`s` with each repeating decimal (_REPEATING_DECIMAL_RE) written as \\frac{p}{q}, a whole number as itself."""
    if "\\overline" not in s:
        return s

    def as_fraction(m: re.Match) -> str:
        whole, fixed, repeating = m.groups()
        if len(whole) + len(fixed) + len(repeating) > _MAX_REPEATING_DIGITS:
            return m.group()
        # 0.1\overline{6}: (16 - 1) / 90, the digits up to one period less those before it, over 9s then 0s
        value = Fraction(int(whole or "0")) + Fraction(int(fixed + repeating) - int(fixed or "0"),
                                                       (10 ** len(repeating) - 1) * 10 ** len(fixed))
        return _value_text(value) if value.denominator == 1 else "\\frac{%d}{%d}" % (value.numerator, value.denominator)

    return _REPEATING_DECIMAL_RE.sub(as_fraction, s)


# A whole answer written as text that starts with a number (\text{5 cm}, \mbox{12 inches}, \boxed{\text{2 apples}}): as
# text math-verify found no number in it, so it scored 0 against 5, 5\text{ cm} and 12, and a cons@k vote of its own. It
# is read without the command, as `5 cm` (a number and its unit) is.
_TEXT_NUMBER_ANSWER_RE = re.compile(r"\\(?:text|textrm|textnormal|mbox|mathrm)\s*\{\s*([+-]?\.?[0-9][^{}\\$]*)\}")


def _without_text_around_a_number(s: str) -> str:
    """The text of an answer that is all one `\\text{…}` (or its kin) starting with a number, `$…$` or a box around it
    too (_TEXT_NUMBER_ANSWER_RE); `s` itself otherwise."""
    if "{" not in s:
        return s
    m = _TEXT_NUMBER_ANSWER_RE.fullmatch(_unwrapped(s))
    return m.group(1).strip() if m else s


# A relation sign that opens an answer (≠5, \\neq 5, \\leq 5, < 5, \\ngeq 5, \\not< 5, \\ll 5): math-verify drops it and reads
# the number alone, so `\\neq 5` and `\\geq 5` scored 1 against the gold 5. `=` is none: `=5` and `x = 5` state the value,
# nor are \\approx, \\to or \\Rightarrow (≈ 5, → 5 give the value too).
_LEADING_RELATION_RE = re.compile(
    r"\s*(\\(?:neq?|leq?q?|geq?q?|leqslant|geqslant|lt|gt|ngeq|nleq|ngtr|nless|ll|gg)(?![A-Za-z])"
    r"|\\not\s*(?:[=<>]|\\(?:leq?|geq?|lt|gt)(?![A-Za-z]))|[<>!]=|[<>\u2260\u2264\u2265\u2a7d\u2a7e\u2266\u2267\u226e-\u2271\u226a\u226b])\s*")
_RELATION_SIGN = {
    "\\ne": "≠", "\\neq": "≠", "\\not=": "≠", "!=": "≠",
    "\\le": "≤", "\\leq": "≤", "\\leqq": "≤", "\\leqslant": "≤", "<=": "≤", "\u2a7d": "≤", "\u2266": "≤",
    "\\ge": "≥", "\\geq": "≥", "\\geqq": "≥", "\\geqslant": "≥", ">=": "≥", "\u2a7e": "≥", "\u2267": "≥",
    "\\lt": "<", "\\gt": ">", "\\ll": "≪", "\\gg": "≫",
    "\\nless": "≮", "\\not<": "≮", "\\not\\lt": "≮", "\\ngtr": "≯", "\\not>": "≯", "\\not\\gt": "≯",
    "\\nleq": "≰", "\\not\\le": "≰", "\\not\\leq": "≰", "\\ngeq": "≱", "\\not\\ge": "≱", "\\not\\geq": "≱"}


def _leading_relation(s: str) -> tuple[Optional[str], str]:
    """The relation sign `s` opens with (as one of ≠ < > ≤ ≥...; None without one) and what follows it, inside `$…$` or
    `\\boxed{}` too, or opening the last `\\boxed{}` of a longer answer, which is what math-verify reads (`so
    \\boxed{\\neq 5}` scored 1 against 5). A `<` of `<1, 2>` is an angle bracket."""
    core = _unwrapped(s)
    boxed = last_boxed(core)
    if boxed is not None:
        core = boxed.strip()
    m = _LEADING_RELATION_RE.match(core)
    if m is None or (m.group(1) == "<" and core.rstrip().endswith(">")):
        return None, s
    sign = re.sub(r"\s", "", m.group(1))
    return _RELATION_SIGN.get(sign, sign), core[m.end():]


def _same_number(a: Fraction, b: Fraction, predicted: str, gold: str) -> bool:
    """a == b, to 1e-12 when either answer is written with a float's worth of digits (_float_repr). Compared as
    fractions: float() of a value past float's range (a model's 123456789012345e400) raised OverflowError, which
    failed the whole batch's reward call."""
    if a == b:
        return True
    return (_float_repr(predicted) or _float_repr(gold)) and abs(a - b) <= _FLOAT_REL_TOL * max(abs(a), abs(b))


def _percentage(s: str) -> Optional[Fraction]:
    """The number of percent of an answer that is a number and a percent sign (12.5%, 12.5\\%, $50\\%$, \\boxed{50\\%}),
    else None. Against a plain number it is both that number and its hundredth, as math-verify takes 50\\% for 50 and 0.5; but
    it does so for whole numbers only, and the right answer 12.5\\% scored 0 against the gold 12.5. A sentence's full stop or
    comma after it is no part of it (`12.5%.` and `$12.5\\%$.` scored 0 against 12.5)."""
    body = _percent_body(s)
    return _as_number(body) if body is not None else None


def _percent_body(s: str) -> Optional[str]:
    """What comes before the percent sign of an answer that ends with one (12.5 of 12.5\\%, $12.5\\%$.), else None."""
    s = _without_full_stop(_unwrapped(_without_full_stop(s))).rstrip()   # \\boxed{12.5\\%}. and \\boxed{12.5\\%.}
    if not s.endswith("%"):
        return None
    return _without_trailing_latex_spacing(s[:-2] if s.endswith("\\%") else s[:-1])


_LATEX_COMMAND_RE = re.compile(r"\\[A-Za-z]+")
_LATIN_LETTER_RE = re.compile(r"[A-Za-z]")


def _latex_percent_number(s: str) -> Optional[str]:
    """The number of a percentage written with LaTeX, as its text (33\\frac{1}{3} of 33\\frac{1}{3}\\%, 2\\sqrt{2} of
    2\\sqrt{2}\\%: no letter outside its commands), else None (a plain number's percentage is _percentage's). math-verify
    misreads such a percentage, 33\\frac{1}{3}\\% as 33 and \\frac{1}{2}\\% as nothing: 12\\frac{1}{2}\\% scored 1 against
    the gold 12 and 2\\sqrt{2}\\% against 2, and the right 33\\frac{1}{3}\\% 0 against \\frac{1}{3} and 33\\frac{1}{3}."""
    body = _percent_body(s)
    if not body or "\\" not in body or _as_number(body) is not None or \
            _LATIN_LETTER_RE.search(_LATEX_COMMAND_RE.sub("", body)):
        return None
    return body.strip()


def _without_trailing_latex_spacing(s: str) -> str:
    """`s` without the spaces, ~ and LaTeX space commands it ends with: the thin space of 25\\,\\% (as siunitx sets a
    percentage), which read as no percentage scored 0 against 0.25, though 1 against 25."""
    while True:
        if s.endswith(("\\,", "\\;", "\\:", "\\!", "\\ ")):
            s = s[:-2]
        elif s.endswith("~") or s[-1:].isspace():
            s = s[:-1]
        else:
            return s


# LaTeX's spacing, which math mode ignores: its space commands, \\left and \\right, and spaces, but the one that ends a
# command's name before a letter (\\pi r is not \\pir). A right answer spaced otherwise than its gold, where math-verify
# parses neither (x=\\frac{\\pi}{3}+k\\pi,k\\in\\mathbb{Z}; \\{x|x>1\\}) or misreads one (2\\pi r h is 2*pi*r to it), scored 0.
_LATEX_SPACE_COMMAND_RE = re.compile(r"\\[,;:! ]|~|\\q?quad(?![A-Za-z])|\\(?:left|right)(?![A-Za-z])")
_SPACE_RUN_RE = re.compile(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])|\s+")
# Display and text style change a formula's size, not its value: \dfrac{\sqrt{3}}{2} and \frac{\sqrt{3}}{2} matched (by
# math-verify) but were two cons@k votes, as were \displaystyle\frac{\pi}{2} and \frac{\pi}{2}.
_STYLE_COMMAND_RE = re.compile(r"\\(?:displaystyle|textstyle)(?![A-Za-z])")
_STYLED_FRACTION_RE = re.compile(r"\\[dt]frac(?![A-Za-z])")


def _without_latex_spacing(s: str) -> str:
    """LaTeX `s` without the spacing and the style math mode ignores (\\dfrac and \\tfrac are \\frac); other text
    stripped only."""
    if "\\" not in s:
        return s.strip()
    s = _STYLED_FRACTION_RE.sub(r"\\frac", _STYLE_COMMAND_RE.sub(" ", _LATEX_SPACE_COMMAND_RE.sub(" ", s)))
    return _SPACE_RUN_RE.sub(lambda m: m.group(1) + " " if m.group(1) else "", s).strip()


# A one-letter function's or probability's call, its brackets holding no other brackets (P(C|A), f(x, y)): spaces in it
# beside a bracket or a mark change nothing, as in math mode, yet the right answer P( C|A ) or P(C | A) scored 0 against
# the gold P(C|A) (math-verify reads neither) and f( x ) was another cons@k vote than f(x). Spaces between two letters or
# digits stay one space (f(2 3) is not f(23)).
_ONE_LETTER_CALL_ARGS_RE = re.compile(r"(?<![A-Za-z\\])([A-Za-z]\()([^()]*)\)")
_WHITESPACE_RUN_RE = re.compile(r"\s+")


def _without_call_spacing(s: str) -> str:
    """`s` with its one-letter calls' arguments spaced as one (P( C | A ) is P(C|A)); `s` itself without such a call."""
    if "(" not in s:
        return s

    def args_unspaced(call: re.Match) -> str:
        args = call.group(2)

        def space(run: re.Match) -> str:
            between_alnums = (0 < run.start() and args[run.start() - 1].isalnum()
                              and run.end() < len(args) and args[run.end()].isalnum())
            return " " if between_alnums else ""

        return call.group(1) + _WHITESPACE_RUN_RE.sub(space, args) + ")"

    return _ONE_LETTER_CALL_ARGS_RE.sub(args_unspaced, s)


def answers_match(predicted: str, gold: str) -> bool:
    """Exact text match, then numeric match (1/2 == 0.5, 1,000 == 1000, 6.02 \\times 10^{23} == 6.02e23; a
    float-length decimal equals what it approximates to 1e-12; a percentage against a plain number, or through math-verify
    against a LaTeX one, is its number or its hundredth: 12.5\\% == 12.5 == 0.125 == \\frac{1}{8}), then math-verify
    when installed. Markdown around a whole answer is
    not part of it (`**5**` is 5); a relation sign opening it is (`\\neq 5` is not 5; `\\le 5` is `≤ 5.0`), so is an SI
    unit against another (`250 mL` is not `250 L`, though `0.25 L` is: prefixes compare by value; against a number alone
    it is its number), and so is the case of a math answer's variables (`x+1` is not `X+1`; words and choice letters
    match case aside)."""
    predicted, gold = (_without_call_spacing(_without_text_around_a_number(_as_latex(_without_math_delimiters(
        _with_sign_in_last_box(_with_repeating_decimals_as_fractions(_with_minus_signs(_without_markdown(x))))))))
        for x in (predicted, gold))
    predicted, gold = _without_list_thousands_commas(predicted), _without_list_thousands_commas(gold)
    if _without_latex_spacing(predicted) == _without_latex_spacing(gold):
        return True
    (predicted_sign, predicted), (gold_sign, gold) = _leading_relation(predicted), _leading_relation(gold)
    if predicted_sign != gold_sign:
        return False
    if predicted_sign is not None and _without_latex_spacing(predicted) == _without_latex_spacing(gold):
        return True
    same_temperature = _same_temperature(predicted, gold)   # 30°C is not 30°F
    if same_temperature is not None:
        return same_temperature
    same_quantity = _same_quantity(predicted, gold)   # 250 mL is not 250 L, nor 7 mm 7 Mm (alike case aside)
    if same_quantity is not None:
        return same_quantity
    if _same_words(predicted, gold):
        return True
    if _option_letter(predicted.strip()) and _is_letter(_text_words(gold)) or (
            _option_letter(gold.strip()) and _is_letter(_text_words(predicted))):
        return False   # two choices, their letters differ: C. 12 is not B. 12, though its option's text may be
    a, b = _as_number(predicted), _as_number(gold)
    if a is not None and b is not None:
        return _same_number(a, b, predicted, gold)
    percent_a, percent_b = _percentage(predicted), _percentage(gold)
    if percent_a is not None and percent_b is not None:
        return _same_number(percent_a, percent_b, predicted, gold)
    if percent_a is not None and b is not None:
        return _same_number(percent_a, b, predicted, gold) or _same_number(percent_a / 100, b, predicted, gold)
    if percent_b is not None and a is not None:
        return _same_number(a, percent_b, predicted, gold) or _same_number(a, percent_b / 100, predicted, gold)
    if _same_latex_value(predicted, gold, a, b):   # \\frac{1}{2} and 0.5, x = 5 and x=5.0: one vote_key, so one answer
        return True
    if _variables_differ_in_case(predicted, gold):   # which math-verify does not tell apart
        return False
    try:
        import math_verify  # noqa: F401
    except ImportError:
        _warn_without_math_verify(predicted, gold)
        return False
    if _tangled_past(predicted, gold):
        return False
    cases_apart = _with_cases_apart(predicted, gold)   # x and X in one answer: math-verify would read both as x
    if cases_apart is None:
        return False
    predicted, gold = _as_math_verify_number(cases_apart[0], a), _as_math_verify_number(cases_apart[1], b)
    if predicted is None or gold is None:
        return False
    # a percentage against math (a LaTeX fraction, an expression) is its number or its hundredth, as against a plain
    # number: given with its % sign, math-verify took 0.00002\\% for 10^{-7} (its rounding: _values_far_apart)
    predicted_readings, gold_readings = _percentage_readings(predicted, percent_a), _percentage_readings(gold, percent_b)
    if len(predicted_readings) > 1 and len(gold_readings) > 1:
        # two percentages: their numbers, not one's number against the other's hundredth (\\frac{1}{2}\\% is not 50\\%)
        predicted_readings, gold_readings = predicted_readings[:1], gold_readings[:1]
    return any(_math_verify_match(p, g) for p in predicted_readings for g in gold_readings)


def _percentage_readings(s: str, percent: Optional[Fraction]) -> list[str]:
    """`s` itself where it is no percentage (percent None, and no LaTeX one: _latex_percent_number); else its number and
    its hundredth, as decimals where they are (math-verify compares a decimal to 6 places: 33.333333\\% is 1/3) and as
    fractions where not; a LaTeX percentage's as LaTeX (33\\frac{1}{3} and \\frac{33\\frac{1}{3}}{100})."""
    if percent is None:
        number = _latex_percent_number(s)
        return [s] if number is None else [number, f"\\frac{{{number}}}{{100}}"]
    number, hundredth = _exact_text(percent), _exact_text(percent / 100)
    # both or neither: the first reading is its number (a number past Python's int-to-text limit has no text)
    return [number, hundredth] if number is not None and hundredth is not None else []


def _exact_text(value: Fraction) -> Optional[str]:
    """`value` as a decimal where it is one (1/8: 0.125), else as \\frac{}{} (_value_text); None past Python's
    int-to-text limit."""
    denominator, places = value.denominator, 0
    while denominator % 10 == 0 or denominator % 2 == 0 or denominator % 5 == 0:
        denominator //= 10 if denominator % 10 == 0 else (2 if denominator % 2 == 0 else 5)
        places += 1
    if denominator != 1 or places == 0:
        return _value_text(value)
    sign, value = ("-" if value < 0 else ""), abs(value)
    try:
        digits = str(value.numerator * 10**places // value.denominator).rjust(places + 1, "0")
    except ValueError:
        return None
    return sign + digits[:-places] + "." + digits[-places:]


def _value_text(value: Fraction) -> Optional[str]:
    """`value` as a whole number or \\frac{}{}; None past Python's int-to-text limit (4300 digits by default)."""
    sign, value = ("-" if value < 0 else ""), abs(value)
    try:
        if value.denominator == 1:
            return f"{sign}{value.numerator}"
        return f"{sign}\\frac{{{value.numerator}}}{{{value.denominator}}}"
    except ValueError:
        return None


_EXPONENT_RE = re.compile(r"(?<=[0-9.])[eE]([+-]?[0-9]{1,3})(?![0-9])")
# A number in e notation that opens a longer answer, alone or after `x =`, before a space or a LaTeX command (its unit, or
# words: 6.63e-34 \\text{ J·s}, x = 1.5e-3 \\text{ m}). Given as it was, math-verify read 6.63e-34 as 6.63*e - 34, and the
# right answer scored 0 against 6.63 \\times 10^{-34} \\text{ J·s} and x = 1.5 \\times 10^{-3}. Elsewhere (in brackets, an
# exponent, before a letter: e^{2e-1}, 3e+2x) it may be Euler's e, and is left to math-verify.
_LEADING_EXPONENT_RE = re.compile(r"\A(\s*(?:[A-Za-z]\s*=\s*)?[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+))[eE]([+-]?[0-9]{1,3})(?=\Z|\s|\\)")


def _as_math_verify_number(s: str, value: Optional[Fraction]) -> Optional[str]:
    """`s` for math-verify: a number read through a separator or as a mixed number (`_as_number`) is given as its
    value, which math-verify cannot misread: it read `1 000` and `1\\,000` as 1*000 and `1\u00a0005` as 5, so
    against a gold 1 000 any expression worth 0 scored 1 (a plain number was already compared by value). A number's
    exponent is given as LaTeX: math-verify read `6.02e23` as 6.02*e*23, and `6.02 \\times 10^{23}` against it scored 0
    (as the exact value, it differed from 6.02 * 10**23 in floating point). None for a value too long to write out
    (more digits than Python's int-to-text limit, 4300 by default: a mixed number of two 2200-digit parts), which
    raised ValueError out of the reward function and stopped training."""
    if value is None:
        return _LEADING_EXPONENT_RE.sub(r"\1 \\times 10^{\2}", s)
    if not (_GROUP_SEP_RE.search(s) or _HOLDS_MIXED_RE.search(s)):
        return _EXPONENT_RE.sub(r" \\times 10^{\1}", s)
    return _value_text(value)


def _same_latex_value(predicted: str, gold: str, a: Optional[Fraction], b: Optional[Fraction]) -> bool:
    """Whether two answers are the same number, one or both written in LaTeX (_latex_number; a and b: their values as
    plain numbers, where they are), or give one variable the same number (_assigned_number), or one gives a variable the
    number the other is (x = 5 and 5, as math-verify compares them: without it they scored 0). Only a yes is final: a no
    is left to math-verify, which compares a decimal to 6 places (\\frac{1}{3} and 0.333333)."""
    a = a if a is not None else _latex_number(predicted)
    b = b if b is not None else _latex_number(gold)
    if a is not None and b is not None:
        return a == b
    if "=" not in predicted and "=" not in gold:
        return False
    assigned_a, assigned_b = _assigned_number(predicted), _assigned_number(gold)
    if assigned_a is not None and assigned_b is not None:
        return assigned_a == assigned_b
    return (assigned_a is not None and assigned_a[1] == b) or (assigned_b is not None and assigned_b[1] == a)


def vote_key(answer: str):
    """A key under which answers are the same vote in a majority vote (cons@k) without a math-verify call
    per pair (tens to hundreds of ms each on junk answers): the same number (1/2, 0.5, 1,000, $5,
    \\frac{1}{2}, 30^\\circ), or one variable given the same number (x = 5, x=5.0; not 5 alone, which y = 5 matches
    too), else the same words, case and a final full stop aside, else the same text, ends stripped (LaTeX's spacing
    and style aside). Answers with one key match by `answers_match`."""
    # P( C|A ) is P(C|A), and -\\boxed{5} is -5, as answers_match reads them
    answer = _without_call_spacing(_with_sign_in_last_box(_with_repeating_decimals_as_fractions(
        _with_minus_signs(_without_markdown(answer)))))   # and 0.\\overline{3} is \\frac{1}{3}
    answer = _without_list_thousands_commas(answer)   # 1,000, 2,000 is 1000, 2000
    number = _as_number(answer)
    if number is not None:
        return ("number", number)
    # a relation sign and what follows it, as answers_match reads them: \\le 5, \\leq 5 and ≤ 5 were three votes
    sign, rest = _leading_relation(_as_latex(_without_math_delimiters(answer)))
    if sign is not None:
        return ("relation", sign, _vote_key_of_value(rest))
    return _vote_key_of_value(answer)


def _vote_key_of_value(answer: str):
    """vote_key of an answer without a relation sign opening it."""
    number = _as_number(answer)
    if number is not None:
        return ("number", number)
    latex = _without_text_around_a_number(_as_latex(_without_math_delimiters(answer)))   # as answers_match reads it
    # a number in LaTeX is its value (\\frac{1}{2} is 0.5, 30^\\circ is 30), and one variable given a number is that
    # variable and value (x = 5 is x=5.0), as answers_match compares them (_same_latex_value)
    number = _number_value(latex)
    if number is not None:
        return ("number", number)
    assigned = _assigned_number(latex)
    if assigned is not None:
        return ("assigned", *assigned)
    temperature = _temperature(latex)   # 30^\\circ C, 30°C and 30^{\\circ}\\text{C}
    if temperature is not None:
        return ("temperature", *temperature)
    # one quantity in one SI unit is one vote: 250ml, 250mL (which keep their case as variables would) and 250 mL were three
    quantity = _quantity(latex)
    if quantity is not None:
        return ("quantity", *_in_unprefixed_units(*quantity))   # 0.5 L and 500 mL too
    # two percentages match by their numbers: 50%, 50\\% and $50\\%$ were three votes (a plain 50 or 0.5 stays apart:
    # a percentage matches both)
    percent = _percentage(latex)
    if percent is not None:
        return ("percent", percent)
    # `Yes`, `yes.` and `\\text{YES}` are one answer to answers_match (_same_words): as three votes, three wrong
    # samples lost cons@k to one right one. Read after its Unicode math, as answers_match reads it: √x and √X. were
    # one vote, though without math-verify they do not match (\\sqrt{x} is LaTeX, not words). Read without the \\(…\\) or
    # \\[…\\] around it, as answers_match reads it: \\(yes\\) and yes, \\(x+1\\) and x+1 matched but were two votes
    words = _text_words(latex)
    if words:
        return ("text", words)
    # LaTeX spaced otherwise is one answer (answers_match), apart from words: without its space commands \\; b is b
    # and so is one with a full stop inside its box: \\boxed{\\frac{1}{2}.} and \\boxed{\\frac{1}{2}}
    return ("latex", _without_latex_spacing(_without_enclosed_full_stop(latex))) if "\\" in latex else ("text", latex.strip())


# How deep an answer's brackets may nest, and how many scripts it may chain without braces (x^x^x), for math-verify to
# read it, unless its gold goes half as far: math-verify's parser spent seconds on junk past them (`{` x200, `(` x200,
# `[` x200 and x^x^x... x100 each ran to the 3 s limit, once per completion: a collapsed policy varies its junk, so
# the time-out memory saw each once). A five-level continued fraction nests 5 deep, a_1^2 chains 2.
_MAX_NESTING = 20
_MAX_SCRIPT_CHAIN = 8
_BRACKET_RE = re.compile(r"[^()\[\]{}]+")
_SCRIPT_CHAIN_RE = re.compile(r"(?:[\^_]\s*[A-Za-z0-9]\s*){2,}")


def _nesting(s: str) -> int:
    """How deep `s`'s brackets ( [ { nest, of any kind (intervals close with the other one: [0, 1))."""
    depth = deepest = 0
    for ch in _BRACKET_RE.sub("", s):
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif depth:
            depth -= 1
    return deepest


def _script_chain(s: str) -> int:
    """The most scripts `s` chains on one another without braces (x^x^x: 2, a_1^2: 2)."""
    return max((m.group().count("^") + m.group().count("_") for m in _SCRIPT_CHAIN_RE.finditer(s)), default=0)


def _tangled_past(predicted: str, gold: str) -> bool:
    """Whether the answer nests or chains past what any answer does (_MAX_NESTING, _MAX_SCRIPT_CHAIN) and twice what
    its gold does: junk, not given to math-verify."""
    return (_nesting(predicted) > max(_MAX_NESTING, 2 * _nesting(gold))
            or _script_chain(predicted) > max(_MAX_SCRIPT_CHAIN, 2 * _script_chain(gold)))


# One answer's whole math-verify check (its parses and comparisons) on any thread; past it the answer
# scores 0. A policy's junk (`9^{9^{9}}`, `(((…)))` 50 deep, `1000000!`) kept sympy busy for 5 s per
# stage on the main thread and without end on any other (math-verify's limit is SIGALRM).
MATH_VERIFY_TIMEOUT_S = 3.0
# How long a comparison that ran out of time scores 0 without being tried again: a collapsed policy's batch
# repeating its junk pays one time-out, not one per completion, yet a right answer whose check ran out of
# time on a busy machine is not 0 for the rest of the run.
MATH_VERIFY_TIMED_OUT_MEMORY_S = 60.0
_TIMED_OUT_AT: dict[tuple[str, str], float] = {}   # (predicted, gold) -> time.monotonic() it ran out of time
_TIMED_OUT_LOCK = threading.Lock()


def _math_verify_match(predicted: str, gold: str) -> bool:
    key = (predicted, gold)
    with _TIMED_OUT_LOCK:
        ran_out = _TIMED_OUT_AT.get(key)
    if ran_out is not None and time.monotonic() - ran_out < MATH_VERIFY_TIMED_OUT_MEMORY_S:
        return False
    try:
        return _math_verify_verdict(predicted, gold)
    except OutOfTime:
        with _TIMED_OUT_LOCK:
            _TIMED_OUT_AT.pop(key, None)   # re-inserted last: the oldest entry is the first
            _TIMED_OUT_AT[key] = time.monotonic()
            while len(_TIMED_OUT_AT) > 256:
                del _TIMED_OUT_AT[next(iter(_TIMED_OUT_AT))]
        return False


@functools.lru_cache(maxsize=256)   # verdicts only: a time-out raises OutOfTime, which lru_cache does not keep
def _math_verify_verdict(predicted: str, gold: str) -> bool:
    from math_verify import parse, verify

    def check():
        gold_readings, pred_readings = _mv_readings(parse, gold), _mv_readings(parse, predicted)
        if any(_holds_huge_power(parsed) for parsed in gold_readings + pred_readings):
            return False
        percent = "%" in predicted or "%" in gold   # 50\\% is 50 to math-verify, its value 1/2
        return any(verify(g, p, timeout_seconds=None) and (percent or not _values_far_apart(g, p))
                   for g in gold_readings for p in pred_readings)

    _quiet_math_verify_timeout_notice()
    try:
        return call_with_deadline(check, MATH_VERIFY_TIMEOUT_S)
    except Exception:
        return False  # math-verify failing to parse a model's answer means the answer is not verifiable


# math-verify compares a float with a number rounded to 6 decimal places, and two expressions by whether their difference
# evaluates to 0 with tiny values chopped: both absolutely, so any two numbers below a millionth were one answer to it.
# Given to it (x = ..., (...), a unit outside _UNIT_BASES: 6.6 \\times 10^{-34} \\text{ J·s}), -6.6 \\times 10^{-34} and
# 7.7 \\times 10^{-34} scored 1 against 6.6 \\times 10^{-34}, and 0.00000066 apples against 0.00000077 apples. Two numbers
# further apart than this share of the larger are two answers, whatever it says; at or above 0.001 its rounding is
# within it, so only the verdicts on smaller numbers change. So are two tuples, sets, intervals, matrices, relations or
# sums holding such numbers in the same place (_far_apart): (1, 6.6 \\times 10^{-27}) scored 1 against
# (1, 7.7 \\times 10^{-27}), x + 6.6 \\times 10^{-27} against x + 7.7 \\times 10^{-27}.
_MAX_RELATIVE_GAP = 1e-3
# how deep _far_apart follows structures within structures (a set of tuples is 2), and the most members of a set whose
# members are not all numbers it compares each against each (a set of numbers is sorted: _unmatched_value)
_MAX_GUARD_DEPTH = 4
_MAX_UNORDERED_PAIRS = 40


def _values_far_apart(gold_parsed, pred_parsed) -> bool:
    """Whether two of math-verify's readings hold two real numbers (or `x = number`) further apart than
    _MAX_RELATIVE_GAP of the larger, alone or in the same place of one structure (_far_apart)."""
    return _far_apart(gold_parsed[0] if gold_parsed else None, pred_parsed[0] if pred_parsed else None)


def _far_apart(a, b, depth: int = 0) -> bool:
    """Whether `a` and `b`, two sympy readings, differ by a number further apart than _MAX_RELATIVE_GAP where their
    structure is clear: two real constants; two tuples, intervals or matrices of one size, element by element (an
    interval is its ends); two sets of one size (or a set and a value), by an element of one with no element of the
    other near it, whatever their order; two relations of one kind, side by side and sides swapped (a < b is b > a);
    two sums or products with the same terms, coefficient by coefficient (x + 6.6e-27 against x + 7.7e-27). False
    where it is unclear (other shapes, other terms): math-verify's verdict stands there."""
    a, b = _assigned_value(a), _assigned_value(b)
    x, y = _real_value(a), _real_value(b)
    if x is not None and y is not None:
        return bool(abs(x - y) > _MAX_RELATIVE_GAP * max(abs(x), abs(y)))
    if depth >= _MAX_GUARD_DEPTH:
        return False
    members_a, members_b = _members(a), _members(b)
    if members_a is not None or members_b is not None:
        (ordered_a, items_a), (ordered_b, items_b) = members_a or (False, [a]), members_b or (False, [b])
        if len(items_a) != len(items_b):
            return False
        if ordered_a and ordered_b:
            return any(_far_apart(u, v, depth + 1) for u, v in zip(items_a, items_b))
        values_a, values_b = _real_values(items_a), _real_values(items_b)
        if values_a is not None and values_b is not None:   # sets of numbers: sorted, each looked up once
            return _unmatched_value(values_a, values_b) or _unmatched_value(values_b, values_a)
        if len(items_a) > _MAX_UNORDERED_PAIRS:   # each against each: left to math-verify past this size
            return False
        return (any(all(_far_apart(u, v, depth + 1) for v in items_b) for u in items_a)
                or any(all(_far_apart(u, v, depth + 1) for u in items_a) for v in items_b))
    from sympy import Basic
    from sympy.core.relational import Relational

    if isinstance(a, Relational) and isinstance(b, Relational):
        # a relation matches one of its kind side by side, and b > a matches a < b (and a = b b = a): each way that
        # lines them up with one side the same must part them by the other
        verdicts = [_other_sides_far(a.lhs, a.rhs, *sides) for op, sides in
                    ((b.rel_op, (b.lhs, b.rhs)), (b.reversed.rel_op, (b.rhs, b.lhs))) if op == a.rel_op]
        return any(v is not None for v in verdicts) and all(v is not False for v in verdicts)
    if isinstance(a, Basic) and isinstance(b, Basic) and (a.is_Add or a.is_Mul) and (b.is_Add or b.is_Mul):
        coefficients_a, coefficients_b = _coefficients(a), _coefficients(b)
        if coefficients_a.keys() != coefficients_b.keys():
            return False
        # terms that are not independent (sin^2 x + cos^2 x + 1 is 2 sin^2 x + 2 cos^2 x) may differ by coefficient
        # and be one value: that is left to sympy
        return (any(_far_apart(coefficients_a[term], coefficients_b[term], depth + 1) for term in coefficients_a)
                and not _simplifies_to_zero(a - b))
    return False


def _coefficients(expr) -> dict:
    """A sum's (or a product's) terms without their numbers, each with its number: x^2 + 1.6 \\times 10^{-28} is
    {x^2: 1, 1: 1.6e-28} (its 10^{-28} is a number, not a term), 2i + 3 (the imaginary unit) {i: 2, 1: 3}."""
    from sympy import I

    symbols = expr.free_symbols or {I}
    out: dict = {}
    for term in expr.args if expr.is_Add else (expr,):
        number, rest = term.as_independent(*symbols, as_Add=False)
        out[rest] = out.get(rest, 0) + number
    return out


def _other_sides_far(lhs_a, rhs_a, lhs_b, rhs_b) -> Optional[bool]:
    """For two relations lined up (lhs_a with lhs_b): whether, one side being the same, the other sides are real numbers
    far apart (x < 6.6e-27 and x < 7.7e-27 hold apart); None where no side is the same or the others are not numbers
    (x + y = 2x + 2y is 2x + 2y = 4x + 4y)."""
    for same, other_a, other_b in ((lhs_a == lhs_b, rhs_a, rhs_b), (rhs_a == rhs_b, lhs_a, lhs_b)):
        x, y = (_real_value(other_a), _real_value(other_b)) if same else (None, None)
        if x is not None and y is not None:
            return bool(abs(x - y) > _MAX_RELATIVE_GAP * max(abs(x), abs(y)))
    return None


def _simplifies_to_zero(expr) -> bool:
    from sympy import simplify

    try:
        return bool(simplify(expr).is_zero)
    except Exception:   # sympy failing on an odd expression: no sign that they are one value
        return False


def _real_values(items: list) -> Optional[list]:
    """The values of members that are all real constants (or `x = constant`), else None."""
    values = []
    for item in items:
        value = _real_value(_assigned_value(item))
        if value is None:
            return None
        values.append(value)
    return values


def _unmatched_value(values: list, others: list) -> bool:
    """Whether one of `values` has none of `others` within _MAX_RELATIVE_GAP of the larger. The values near x form one
    run around it in sorted order, so its neighbours there (the largest below it, the smallest above) tell."""
    others = sorted(others)
    for x in values:
        i = bisect.bisect_left(others, x)
        if not any(abs(x - y) <= _MAX_RELATIVE_GAP * max(abs(x), abs(y)) for y in others[max(i - 1, 0):i + 1]):
            return True
    return False


def _assigned_value(expr):
    """The value of `x = value` (a symbol equated to it), else `expr`: math-verify compares such an answer by its value."""
    from sympy import Eq, Symbol

    return expr.rhs if isinstance(expr, Eq) and isinstance(expr.lhs, Symbol) else expr


def _members(expr):
    """(whether their order counts, the members) of a tuple, an interval (its ends), a matrix (its shape, then its
    entries), a set or a union; None for anything else."""
    from sympy import FiniteSet, Interval, MatrixBase, Tuple, Union

    if isinstance(expr, Tuple):
        return True, list(expr.args)
    if isinstance(expr, Interval):
        return True, [expr.start, expr.end]
    if isinstance(expr, MatrixBase):
        return True, [*expr.shape, *expr]
    if isinstance(expr, (FiniteSet, Union)):
        return False, list(expr.args)
    return None


def _real_value(parsed):
    """The value of an expression that is a real constant, to 30 digits; None for anything else."""
    from sympy import Basic

    if not isinstance(parsed, Basic) or not parsed.is_number:
        return None
    value = parsed.evalf(30)
    return value if value.is_real and value.is_finite else None


# A constant power worth more bits than this is not computed (2^20 bits: about 315,000 digits).
_MAX_POWER_BITS = 1 << 20


def _holds_huge_power(parsed) -> bool:
    """Whether a parsed answer holds a constant power too large to compute (`2^{10^{100}}`, `9^{9^{9}}`).
    sympy evaluates one with a single call of Python's int pow, which holds the GIL: on the main thread
    a signal still stops it, on any other thread nothing does, and one such answer froze the process.
    Its size comes from floating-point estimates (evalf), which stay small."""
    from sympy import Basic, Pow

    for expr in parsed:
        if not isinstance(expr, Basic):
            continue
        for p in expr.atoms(Pow):
            if p.base.free_symbols or p.exp.free_symbols:
                continue   # symbolic: nothing to compute
            try:
                base, exp = abs(complex(p.base.evalf(15))), abs(complex(p.exp.evalf(15)))
                bits = exp * abs(math.log2(base)) if base > 0 else 0.0
            except (TypeError, ValueError, OverflowError):   # not a number, or past float's range
                return True
            if not bits <= _MAX_POWER_BITS:   # NaN included
                return True
    return False


def _quiet_math_verify_timeout_notice():
    """math-verify's own timeouts are off (call_with_deadline bounds the check): its warning that they
    are, and that the caller must bound the time, is about what is done here."""
    import logging

    for name in ("math_verify.parser", "math_verify.grader"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _TimeoutNoticeFilter) for f in log.filters):
            log.addFilter(_TimeoutNoticeFilter())


class _TimeoutNoticeFilter:
    def filter(self, record) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


_WARNED_NO_MATH_VERIFY = False


def _warn_without_math_verify(predicted: str, gold: str):
    """Once per process: LaTeX answers scored without math-verify are compared as text and numbers only."""
    global _WARNED_NO_MATH_VERIFY
    if not _WARNED_NO_MATH_VERIFY and ("\\" in predicted or "\\" in gold):
        _WARNED_NO_MATH_VERIFY = True
        import warnings

        warnings.warn("r1fast accuracy reward: math-verify is not installed, so LaTeX answers are compared as text "
                      "and plain numbers only (\\sqrt{4} against 2 scores 0); pip install math-verify",
                      stacklevel=3)


_PROSE_RE = re.compile(r"[A-Za-z]{2,}")
_UNIT_NUMBER = r"[+-]?(?:[0-9][0-9,]*(?:\.[0-9]+)?|\.[0-9]+)"   # the number before a unit
_UNIT_POWER = r"(?:\^\{?[0-9]\}?)?"                             # m^2, m^{3}
# A number and its unit, bare (2 L, 10 N, 3 m/s, 9.8 m/s^2): a one-letter unit is no prose to _PROSE_RE, and read as
# `$…$` only it was a product (2*l, 3*m/s), so the right answer scored 0 against NuminaMath's 2 \\mathrm{~L},
# 10 \\mathrm{~N} (whose units math-verify drops) and against 2. It is read as text too, as `5 cm` is (its number),
# and matches by either reading: as text alone, 20 m/s no longer matched 20m/s. Trade-off: `2 x` (spaced) is 2 too.
_NUMBER_AND_UNIT_RE = re.compile(rf"{_UNIT_NUMBER}\s+[A-Za-z]{{1,3}}(?:\s*/\s*[A-Za-z]{{1,3}})?{_UNIT_POWER}")
# A number with a common unit written against it (5cm, 12kg, 60km/h, 760mmHg): the number, as `5 cm` is. Other letters
# against a number are variables (2xy, 2ab+1).
_NUMBER_GLUED_UNIT_RE = re.compile(rf"{_UNIT_NUMBER}(?:cm|mm|km|nm|kg|mg|ml|mL|ms|ns|min|hr|hrs|sec|mph|kph|rpm|mol|kJ|mmHg|"
                                   rf"kW|Hz|kHz|MHz|GHz|kPa|lb|lbs|oz|ft|yd|mi)(?:\s*/\s*(?:s|h|hr|min))?{_UNIT_POWER}")
# A number of millilitres, written against it (250mL, 250ml/min): 250ml scored 0 against 250mL (the variables m, l and
# m, L to _variables), though 1 against 250 mL and 250. Not with a power (2mL^2 is a product of variables, m*L^2).
_GLUED_MILLILITRES_RE = re.compile(rf"{_UNIT_NUMBER}(m[lL])(?:\s*/\s*(?:s|h|hr|min))?")


# SI units by symbol, and the prefixes written before them, for telling two answers' units apart (_quantity): math-verify
# drops a unit, and a number with one was read as its number alone, so 250 mL scored 1 against 250 L, 5 kg against
# 5 g and 5 cm against 5 kg. A unit not among them (sec, hrs, apples) leaves the answers to the other readings (°C:
# _temperature).
_UNIT_BASES = frozenset("m g s L l N J W Pa Hz V A Ω K C mol eV Wh cal bar min h".split())
# What each prefix multiplies its unit by (μ for µ and u too: _unit_symbol writes them so)
_PREFIX_FACTORS = {"G": Fraction(10**9), "M": Fraction(10**6), "k": Fraction(10**3), "h": Fraction(100), "d": Fraction(1, 10),
                   "c": Fraction(1, 100), "m": Fraction(1, 10**3), "μ": Fraction(1, 10**6), "n": Fraction(1, 10**9),
                   "p": Fraction(1, 10**12)}
_UNIT_PREFIXES = frozenset(_PREFIX_FACTORS) | {"µ", "u"}
_UNPREFIXED_BASES = frozenset(("min", "h"))
_UNIT_WRAPPER_RE = re.compile(r"\\(?:mathrm|text|textrm|rm|mbox|operatorname)\s*\{([^{}]*)\}")
# a number (in scientific notation too: 1.6 \\times 10^{-19}, 1.6e-19, _SCIENTIFIC_RE's), its spacing (_LATEX_SPACE_RE:
# spaces, ~ and LaTeX's space commands), and what follows it. Read as a number alone, 1.6 \\times 10^{-19} \\mathrm{C} went
# to math-verify, which drops the unit and rounds: -1.6 \\times 10^{-19} \\mathrm{C} scored 1 against it (and 1.6e-19 C 0).
_QUANTITY_EXPONENT = rf"(?:[eE][+-]?[0-9]{{1,3}}|{_TIMES_TEN}(?:\{{\s*[+-]?\s*[0-9]{{1,3}}\s*\}}|[+-]?[0-9]{{1,3}}))"
_QUANTITY_RE = re.compile(rf"({_UNIT_NUMBER}{_QUANTITY_EXPONENT}?)({_LATEX_SPACE_RE.pattern})(.+)", re.DOTALL)
# a digit (or a brace closing an exponent), then spacing, then a unit's first letter, \\mu or \\Omega (after a \\mathrm{ or
# \\text{ and its spacing too)
_QUANTITY_HINT_RE = re.compile(r"[0-9]\}?" + _LATEX_SPACE_RE.pattern
                               + r"(?:\\[a-z]+\s*\{(?:\s|~)*)?(?:\\(?:mu|Omega)|[A-Za-zΩμµ])")
_UNIT_TERM_RE = re.compile(r"([A-Za-zΩμµ]+)(?:\^\{?([+-]?[0-9])\}?)?")


def _unit_symbol(symbol: str) -> Optional[str]:
    """An SI unit's symbol as one spelling (µ and u: μ; a prefixed litre: L, as 250ml is 250mL), else None. A litre alone
    keeps its case: 2 l (2 times l?) is not 2 L."""
    if symbol in _UNIT_BASES:
        return symbol
    prefix, base = symbol[0], symbol[1:]
    if prefix not in _UNIT_PREFIXES or base not in _UNIT_BASES or base in _UNPREFIXED_BASES:
        return None
    return ("μ" if prefix in "µu" else prefix) + ("L" if base == "l" else base)


def _unit(text: str) -> Optional[tuple]:
    """A unit written out (mL, km/h, m/s^2, kg \\cdot m^2 is none) as its symbols and powers, else None."""
    parts = text.split("/")
    if len(parts) > 2:
        return None
    unit = []
    for part in parts:
        m = _UNIT_TERM_RE.fullmatch(part)
        symbol = m and _unit_symbol(m.group(1))
        if symbol is None:
            return None
        unit.append((symbol, int(m.group(2) or 1)))
    return tuple(unit)


def _quantity(s: str) -> Optional[tuple[Fraction, tuple]]:
    """A number and its SI unit (_UNIT_BASES): 250 mL, 250ml, 250 \\mathrm{~mL}, $250\\,\\text{mL}$ (its unit as
    _unit reads it), else None. A power on letters written against a number is no unit (2mL^2: 2*m*L^2)."""
    if not _QUANTITY_HINT_RE.search(s):   # most answers: no letter after a number's digits
        return None
    m = _QUANTITY_RE.fullmatch(_unwrapped(_without_full_stop(s.strip())))
    if m is None:
        return None
    number, space, text = m.groups()
    if not space and "^" in text and not _UNIT_WRAPPER_RE.search(text):
        return None
    unit = _unit(_LATEX_SPACE_RE.sub("", _UNIT_WRAPPER_RE.sub(r"\1", text.replace("\\mu", "μ").replace("\\Omega", "Ω"))))
    value = None if unit is None else _as_number(number)
    return None if value is None else (value, unit)


def _in_unprefixed_units(value: Fraction, unit: tuple) -> tuple[Fraction, tuple]:
    """A quantity (_quantity) in its units without their prefixes: 500 mL is 1/2 L, 60 km/h 60000 m/h, 3 cm^2 3/10000 m^2.
    A symbol that is a unit by itself keeps it (m, min, mol, Pa: no milli-inch, no peta-annum)."""
    bare = []
    for i, (symbol, power) in enumerate(unit):   # (numerator, denominator): _unit reads one term on each side of a /
        if symbol not in _UNIT_BASES:
            factor = _PREFIX_FACTORS[symbol[0]] ** power
            value = value * factor if i == 0 else value / factor
            symbol = symbol[1:]
        bare.append((symbol, power))
    return value, tuple(bare)


def _same_quantity(predicted: str, gold: str) -> Optional[bool]:
    """Where both answers are a number with an SI unit (_quantity): False for other units, the same number for the same
    unit (250ml and 250mL, without math-verify too: cons@k's vote_key takes them for one vote), and in the same unit with
    other prefixes by their values (0.5 L and 500 mL, 2 km and 2000 m; 5 mL and 5 L differ). Where one is such a quantity
    and the other a plain number (_as_number): the quantity's number against it (2 L and 2). Else None. The numbers
    compare as plain numbers do (_same_number), never by math-verify, which drops the units and rounds: 70.2400001 m
    scored 1 against 70.24 m (70.2400001 against 70.24 scores 0), and 7.7 \\times 10^{-27} against 6.6 \\times 10^{-27} kg."""
    a, b = _quantity(predicted), _quantity(gold)
    if not (a and b):
        number = _as_number(gold if a else predicted) if (a or b) else None
        return None if number is None else bool(_same_number((a or b)[0], number, predicted, gold))
    if a[1] == b[1]:
        return bool(_same_number(a[0], b[0], predicted, gold))
    (value_a, unit_a), (value_b, unit_b) = _in_unprefixed_units(*a), _in_unprefixed_units(*b)
    # never None here: math-verify, which drops units, would take 5 mL for 5 L
    return unit_a == unit_b and bool(_same_number(value_a, value_b, predicted, gold))


# A temperature: a number, a degree mark (^\circ, ^{\circ}, °, \degree) and a scale (C, F, K, bare or in \text{} and its
# kin; ℃ and ℉ too). math-verify drops a unit in \text{} and reads a bare C as a variable, so 30^\circ\text{C}
# scored 1 against 30^\circ\text{F}, and 30^{\circ}C and 30^\circ C 0 against 30 and 30^{\circ}\mathrm{C}. Two
# temperatures are the same scale and number; one against a number (30, 30^\circ) is its number, as a quantity's is
# (_same_quantity).
_TEMPERATURE_RE = re.compile(rf"({_UNIT_NUMBER})\s?(?:\{{\}})?(?:\^\{{?\\circ\}}?|\u00b0|\\degree(?![A-Za-z]))"
                             r"\s?([CFK])")
_SCALE_SIGNS = {"\u2103": "\u00b0C", "\u2109": "\u00b0F"}


def _temperature(s: str) -> Optional[tuple[Fraction, str]]:
    """(the number, the scale: C, F or K) of an answer that is a temperature (_TEMPERATURE_RE), else None."""
    if not ("circ" in s or "\u00b0" in s or "degree" in s or "\u2103" in s or "\u2109" in s):
        return None
    for sign, written in _SCALE_SIGNS.items():
        s = s.replace(sign, written)
    s = _UNIT_WRAPPER_RE.sub(r"\1", _unwrapped(_without_latex_spacing(_without_full_stop(s))))
    m = _TEMPERATURE_RE.fullmatch(_without_latex_spacing(s))
    value = m and _as_number(m.group(1))
    return None if value is None else (value, m.group(2))


def _same_temperature(predicted: str, gold: str) -> Optional[bool]:
    """Where both answers are temperatures (_temperature): the same scale and number. Where one is and the other a
    number, plain or in LaTeX (30, 30^\\circ, \\frac{61}{2}): its number against that. Else None."""
    a, b = _temperature(predicted), _temperature(gold)
    if a and b:
        return a[1] == b[1] and bool(_same_number(a[0], b[0], predicted, gold))
    if not (a or b):
        return None
    number = _number_value(gold if a else predicted)
    return None if number is None else bool(_same_number((a or b)[0], number, predicted, gold))


def _without_full_stop(s: str) -> str:
    """`s` without a sentence's final full stop or comma (an ellipsis stays): `$2\\sqrt{3},$` parsed to nothing as
    `$2\\sqrt{3}.$` did, and the bare text to its leading 2. LaTeX's thin space `\\,` is no comma: without its comma
    `$2\\sqrt{3}\\$` parsed to nothing too."""
    s = s.rstrip()
    return s[:-1] if s.endswith((".", ",")) and not s.endswith(("..", "\\,")) else s


# A sentence's full stop or comma inside the box or `$…$` that closes an answer (\\boxed{\\frac{1}{2}.}, $\\sqrt{2}.$):
# math-verify parsed it to `\\frac{1}{2}.`, text, and the right answer scored 0 against 0.5 (\\boxed{5}. and \\boxed{5.}
# were read: a number's full stop is dropped by _as_number). An ellipsis stays, and so does LaTeX's `\\,`.
_ENCLOSED_FULL_STOP_RE = re.compile(r"(?<![.\\])[.,]\s*((?:\}|\$|\\\)|\\\])(?:\s*(?:\}|\$|\\\)|\\\]))*)\s*\Z")


def _without_enclosed_full_stop(s: str) -> str:
    """`s` without a full stop or comma just inside the brackets or `$` it closes with (\\boxed{\\frac{1}{2}.})."""
    return _ENCLOSED_FULL_STOP_RE.sub(r"\1", s) if s.rstrip().endswith(("}", "$", "\\)", "\\]")) else s


def _mv_readings(parse, s: str) -> list:
    """math-verify's readings of `s`, the empty ones left out: _mv_parse's, and a number with its unit as text too
    (_NUMBER_AND_UNIT_RE), and bare text whose only runs of letters are products written tight (2xy, ab+1, F = ma), or
    one product without a vowel (mgh), as `$…$` too: read as prose only, 2xy was its 2 (0 against 2 x y), ba+1 nothing
    (0 against ab+1), ma nothing (0 against F = ma), hgm nothing (0 against mgh), while 5cm stays 5 as well."""
    s = _without_enclosed_full_stop(s)
    readings = [_mv_parse(parse, s)]
    bare = _without_full_stop(s)
    if _NUMBER_AND_UNIT_RE.fullmatch(bare):
        readings.append(parse(s, parsing_timeout=None))
    elif ("\\" not in s and "$" not in s and _PROSE_RE.search(s)
          and (_CONSONANT_PRODUCT_RE.fullmatch(bare) or not _PROSE_RE.search(_TIGHT_PRODUCT_RE.sub(" ", s)))):
        as_math = parse(f"${bare}$", parsing_timeout=None)
        # the prose reading only where the letters are a unit: read as prose, 2ab+1 and 2xy+1 were both 2 and matched
        # (as 2xy did the gold 2)
        readings = readings + [as_math] if _NUMBER_GLUED_UNIT_RE.fullmatch(bare) else [as_math]
    return [parsed for parsed in readings if parsed]


def _mv_parse(parse, s: str):
    """math-verify reads LaTeX between delimiters: bare `\\dfrac{1}{2}` parses to nothing and bare
    `2\\sqrt{3}` to its leading 2 alone (so an answer "2" matched), so LaTeX without `$` (an escaped
    `\\$` is money, not a delimiter) is read as `$…$` first. Prose without LaTeX ("24 clips", "x is 5")
    is read as text, where math-verify finds its number: as `$…$` its words became products of
    variables (yes == sey, 24 clips != 24). Other bare text ("x^2+1", "(1, 2)") is read as `$…$`, without
    a sentence's full stop or comma: `$2\\sqrt{3}.$` parsed to nothing, and the bare text to its leading 2."""
    if "$" in s.replace("\\$", ""):
        tries = [s]
    elif "\\" in s:
        tries = [f"${_without_full_stop(s)}$", s]
    elif _PROSE_RE.search(s):
        tries = [s]
    else:
        tries = [f"${_without_full_stop(s)}$"]
    for t in tries:
        parsed = parse(t, parsing_timeout=None)
        if parsed:
            return parsed
    return []
