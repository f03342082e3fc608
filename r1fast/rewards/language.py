"""The language-consistency reward (DeepSeek-R1 §2.3.2): the share of the chain of thought's letters written in
the target language's script, with math notation left out, so that a Chinese chain of thought naming points ABC
or writing y=kx+b is not penalised, while English spelled out or disguised as math still counts."""
from __future__ import annotations

import itertools
import re
import unicodedata
from typing import Optional

from r1fast.rewards.builtin import reasoning_text

# Unicode character-name prefixes counted as "in the language": a script, plus the marks written
# with it that are letters too (ー KATAKANA-HIRAGANA PROLONGED SOUND MARK, 々 IDEOGRAPHIC ITERATION
# MARK) and its full/half-width forms.
_LATIN = ("LATIN", "FULLWIDTH LATIN")
_LANGUAGE_SCRIPTS = {
    "en": _LATIN, "fr": _LATIN, "de": _LATIN, "es": _LATIN, "it": _LATIN, "pt": _LATIN,
    "zh": ("CJK", "IDEOGRAPHIC"), "ja": ("CJK", "IDEOGRAPHIC", "HIRAGANA", "KATAKANA", "HALFWIDTH KATAKANA"),
    "ko": ("HANGUL", "HALFWIDTH HANGUL"), "ru": ("CYRILLIC",), "ar": ("ARABIC",), "el": ("GREEK",),
    "he": ("HEBREW",),
}
LANGUAGES = tuple(sorted(_LANGUAGE_SCRIPTS))   # the codes make_language_reward takes


def _in_script(ch: str, prefixes: tuple[str, ...]) -> bool:
    return unicodedata.name(ch, "").startswith(prefixes)


# Math is no language, but English written in its disguises is English (a GRPO policy finds them: `\the \quick
# \brown \fox` or `I a m h e r e` in a Chinese chain of thought scored 1.0 when every LaTeX command and lone letter
# was left out). So only the names of a fixed list of math commands and environments are no evidence (`\text{…}`'s
# name, not its prose), and letterlike and math alphanumeric symbols (ℝ, ℓ, 𝐭𝐡𝐞) are read as the letters they are
# styled from, a lone one a variable only in math (_is_variable).
_LATEX_MATH_NAMES = """
    frac dfrac tfrac sqrt binom cdot times div pm mp le leq ge geq ne neq approx equiv sim cong propto in notin
    subset subseteq cup cap setminus emptyset varnothing to rightarrow Rightarrow leftarrow Leftrightarrow implies iff
    forall exists therefore because mid perp parallel angle triangle circ infty partial nabla sum prod int lim log ln
    exp sin cos tan cot sec csc arcsin arccos arctan max min gcd det mod bmod pmod left right langle rangle lfloor
    rfloor lceil rceil ldots cdots dots quad qquad displaystyle text mathrm mathbf mathbb mathcal operatorname boxed
    overline underline hat bar vec tilde alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa
    lambda mu nu xi pi rho sigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Pi Sigma Upsilon Phi
    Psi Omega
    overrightarrow overleftarrow widehat widetilde odot oplus otimes bot leqslant geqslant nleq ngeq longrightarrow
    Longrightarrow Leftarrow leftrightarrow mapsto big Big bigg Bigg lg sinh cosh tanh arg deg dim ker sup inf supset
    supseteq subsetneq complement vdots ddots dot ddot bullet vert Vert lvert rvert backsim nparallel
""".split()
_MATH_ENVIRONMENTS = "cases aligned align array matrix pmatrix bmatrix vmatrix equation gathered split".split()
_LATEX_MATH_RE = re.compile(r"\\(?:begin|end)\{(?:%s)\*?\}|\\(?:%s)(?![A-Za-z])"
                            % ("|".join(_MATH_ENVIRONMENTS), "|".join(_LATEX_MATH_NAMES)))
_NOTATION = "\u2218"   # what a math command is replaced with: a math mark to the letters beside it
# ℝ, 𝐭 as R, t; not the symbols (℃, ™ are no letters, "°C", "TM" would be), and ℵ-ℸ (read as Hebrew) are math marks
_MATH_LETTERS_AS_PLAIN = {cp: _NOTATION if 0x2135 <= cp <= 0x2138 else unicodedata.normalize("NFKC", chr(cp))
                          for cp in itertools.chain(range(0x2100, 0x2150), range(0x1D400, 0x1D800))
                          if chr(cp).isalpha()}
# Enclosed letters (ⓣⓗⓔ, ⒯, 🅃, 🅣, 🇹) are symbols, not letters: English written in them was no evidence at all (1.0
# for zh, as 𝐭𝐡𝐞 was before it was read as `the`).
# Each is read as its letter, a small one in lower case (ⓣⓗⓔ as `the`, not `THE`, which names points: _is_point_name).
_ENCLOSED_LETTER_RE = re.compile(r"(?:.* )?LETTER ([A-Z])")
_MATH_LETTERS_AS_PLAIN.update(
    {cp: m.group(1).lower() if "SMALL LETTER" in m.group(0) else m.group(1)
     for cp in itertools.chain(range(0x2460, 0x2500), range(0x1F100, 0x1F200))
     if (m := _ENCLOSED_LETTER_RE.fullmatch(unicodedata.name(chr(cp), "")))})
# Full-width ASCII (ｘ＋ｙ＝１, Japanese and Chinese typesetting's math) as ASCII: a lone full-width letter was never a
# variable (its name is FULLWIDTH LATIN, not LATIN), so ｘ＋ｙ＝１のとき scored 0.75 for ja where x+y=1のとき scored 1.0
_MATH_LETTERS_AS_PLAIN.update({cp: chr(cp - 0xFEE0) for cp in range(0xFF01, 0xFF5F)})


# What separates the variables of a list or a ratio (a,b,c; a、b、c; a:b:c; a·b; Japanese a・b, the middle dot a
# Japanese keyboard types), no language mark: the b of 设a,b,c为正数 or of 在△ABC中，a、b、c分别为 counted against zh
# (0.8, 0.6), and of a・b・c=1のとき against ja (0.6); t,h,e is now no English
_LIST_MARKS = ",\u3001:\u00b7\u30fb"
# A prime (A'B'C', the image of triangle ABC; f'(x)): its B was read as a letter of an English word spelled out, so
# 所以△A'B'C'的面积为2 scored 0.67 for zh. An apostrophe reads the same, which leaves out a lone letter of a
# contraction (don't's t) from the English counted against a non-Latin target: a letter, not a word
_PRIMES = "'\u2032\u2033"
# LaTeX's column and row separators (& and \\ of a matrix, cases or aligned; \\ is read as &): the entries between them
# are variables, though neither is an operator: 矩阵$\begin{pmatrix}a&b&c\\d&e&f\\g&h&i\end{pmatrix}$的行列式 scored 0.46
# for zh, 设矩阵$A=\begin{pmatrix}a&b\\c&d\end{pmatrix}$ 0.67, 列向量$\begin{pmatrix}x\\y\\z\end{pmatrix}$ 0.86. t&h&e
# counts only as a word of a list (_separated_word_runs), as t-h-e does; \t \h \e (one backslash, a command's) counts
_TABLE_MARKS = "&"
_ROW_SEPARATOR = "\\\\"


def _is_math_mark(ch: str) -> bool:
    return (ch in "-*/^_$" or ch in _LIST_MARKS or ch in _PRIMES or ch in _TABLE_MARKS
            or unicodedata.category(ch) in ("Sm", "Nd", "No", "Ps", "Pe"))


def _is_variable(text: str, i: int, scripts: tuple[str, ...]) -> bool:
    """Whether the lone letter text[i], outside the target `scripts`, is a variable rather than part of a word. A
    Greek one is (no other language is written in it: α β γ, π); a Latin one when the nearest character on either side,
    spaces skipped, is math (a digit, an operator, a bracket, a list mark, $, a math command) or a letter of the target
    script (计算x的值, 设 x 为正数). Between letters of its own script (I a m h e r e) it spells a word out."""
    if _in_script(text[i], ("GREEK",)):
        return True
    if not _in_script(text[i], ("LATIN",)):
        return False
    return any(_is_math_mark(ch) or (ch.isalpha() and _in_script(ch, scripts)) for ch in _neighbours(text, i, i + 1))


def _neighbours(text: str, start: int, end: int) -> list[str]:
    """The nearest characters before text[start:end] and after it, spaces skipped (none at either end of text)."""
    before, after = start - 1, end
    while before >= 0 and text[before].isspace():
        before -= 1
    while after < len(text) and text[after].isspace():
        after += 1
    return [text[j] for j in (before, after) if 0 <= j < len(text)]


# A polygon of five or more vertices is named by consecutive letters (五边形ABCDE, 正六边形ABCDEF), which no English word
# is: past four letters (QUICK, BROWN) only such a run names points
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# English a chain of thought mixes in, in capitals beside marks or the target script (WAIT，, 中BUT中): words, not
# points, though short enough for _is_point_name. Three letters or more: two-letter ones are segments too (SO, TO, AD).
_CAPITAL_WORDS = frozenset("""THE AND BUT WAIT LET THEN THAT THIS WITH FOR NOT ARE YES HMM OKAY NEED WHAT WHY HOW
THUS ALSO HERE NOW CAN WILL WAS HAS HAVE FIND FROM INTO ONLY SAME AREA STEP NOTE""".split())


def _is_point_name(text: str, start: int, n: int, scripts: tuple[str, ...]) -> bool:
    """Whether the run text[start:start+n], outside the target `scripts`, names points (在△ABC中, 平面ABC与, 三棱柱
    ABC-A'B'C', AB∥CD。, 五边形ABCDE): two to four capital Latin letters, or more in alphabetical order, beside math, a
    geometry sign (△ □ ⊙) or the target script, spaces skipped, and beside no other Latin letter (THE QUICK spells
    words), nor one of _CAPITAL_WORDS (WAIT，). Chinese geometry names every triangle so: its letters scored 在△ABC中
    0.4 for zh."""
    run = text[start:start + n]
    # a prism's or a cube's two faces written without a hyphen (Russian куб ABCDA1B1C1D1, 正方体ABCDA1B1C1D1): the last
    # letter is the indexed vertex A1, and ABCDA (five letters, not in order) read as English: 0.85 for ru, 0.5 for zh
    indexed_last = start + n < len(text) and (text[start + n].isdigit() or text[start + n] in _PRIMES)
    polygon = run[:-1] if indexed_last and n > 4 else run
    # a pyramid is named by its apex and its base (Russian пирамида SABCD, 四棱锥PABCD without a hyphen): SABCD, not in
    # order, read as English, 0.88 for ru and 0.5 for zh
    if not (run.isupper() and _in_script(run[0], ("LATIN",))
            and (2 <= len(polygon) <= 4 or (len(polygon) > 4 and (polygon in _ALPHABET or polygon[1:] in _ALPHABET)))):
        return False
    if run in _CAPITAL_WORDS:
        return False
    return _beside_math_alone(text, start, n, scripts)


def _beside_math_alone(text: str, start: int, n: int, scripts: tuple[str, ...]) -> bool:
    """Whether the run text[start:start+n] stands beside math, a geometry sign (△ □ ⊙) or the target `scripts`, spaces
    skipped, and beside no other Latin letter."""
    def math_or_target(ch: str) -> bool:
        return _is_math_mark(ch) or unicodedata.category(ch) == "So" or (ch.isalpha() and _in_script(ch, scripts))

    neighbours = _neighbours(text, start, start + n)
    return (any(map(math_or_target, neighbours))
            and not any(ch.isalpha() and _in_script(ch, ("LATIN",)) for ch in neighbours))


def _is_indexed_name(text: str, start: int, n: int, scripts: tuple[str, ...]) -> bool:
    """Whether the run text[start:start+n] is a sequence's term or sum with its index written plain (an, Sn, xk for
    a_n, S_n, x_k: 数列{an}的前n项和为Sn, a1,a2,…,an成等差数列), beside math or the target script alone. Read as English:
    则lim(n→∞)Sn=a1/(1-q)=2。 scored 0.33 for zh, a1,a2,a3,…,an成等差数列 0.88, ja's よって an=2n-1、Sn=n² である 0.75.
    A letter and an index letter; not the English in, on, ok, hi (its first letter is no e, h, i, o, u); an and am pass."""
    run = text[start:start + n]
    return (n == 2 and run.isascii() and run[0].isalpha() and run[0].lower() not in "ehiou" and run[1] in "nkmij"
            and _beside_math_alone(text, start, n, scripts))


# At most this many characters between two lone letters of one spelled-out word (`t_h_e`, `(t)(h)(e)`); not three,
# which would take the x of `a_1 x + a_2` and the y of `x + y + z` for letters of a word.
_SPELLED_GAP = 2


# (start, length, in the target script: None for a run of non-letters, whether it is one Latin letter outside the
# target script) of each run of letters and of non-letters in a text
_Runs = list[tuple[int, int, Optional[bool], bool]]


def _lone_latin(runs: _Runs, j: int) -> bool:
    return 0 <= j < len(runs) and runs[j][3]


# English spelled out one letter per character of the target script (中t中h中e, 中W中A中I中T): each letter, beside Chinese,
# was a variable, 1.0 for zh. Real math names variables one character apart too (x与y与z, 若a则b且c), but spells none of
# these words with them; no realistic chain of thought names five in a row so.
_SPELLED_WORDS = frozenset(word.casefold() for word in _CAPITAL_WORDS)
_INTERLEAVED_ANY_WORD = 5


def _named_in_order(letters: str) -> bool:
    """Whether `letters` name variables or points in the alphabet's order, as lists do (abcde, ABCDE, pqrst; xyzuvw: at
    most two runs of consecutive letters), which no English word does: 设a与b与c与d与e均为正数 scored 0.64 for zh,
    点A与B与C与D与E共圆 0.58, ja's aとbとcとdとeは 0.62, as five letters one character apart."""
    breaks = sum(1 for a, b in zip(letters, letters[1:]) if ord(b) != ord(a) + 1)
    return breaks <= 1


def _interleaved_word_runs(text: str, runs: _Runs) -> set[int]:
    """The indices of the runs that are letters of an English word spelled out between single characters of the target
    script: a chain of lone Latin letters one such character apart that spells one of _SPELLED_WORDS, or any chain of
    _INTERLEAVED_ANY_WORD letters or more."""
    found: set[int] = set()
    k = 0
    while k < len(runs):
        chain = [k]
        while (runs[chain[-1]][3] and chain[-1] + 2 < len(runs) and runs[chain[-1] + 1][2] is True
               and runs[chain[-1] + 1][1] == 1 and runs[chain[-1] + 2][3]):
            chain.append(chain[-1] + 2)
        if len(chain) >= 3:
            word = "".join(text[runs[j][0]] for j in chain).casefold()
            if word in _SPELLED_WORDS or (len(chain) >= _INTERLEAVED_ANY_WORD and not _named_in_order(word)):
                found.update(chain)
        k = chain[-1] + 1
    return found


# English spelled with a hyphen or a table mark between its letters (t-h-e, t&h&e, W-A-I-T): each letter, beside a
# minus or a matrix's column mark, was a variable, 1.0 for zh. Math writes variables so (a-b-c=0, a matrix's a&b\\c&d, a
# path A-B-D-C-E) but spells none of _SPELLED_WORDS with them, so only such a word counts (q-u-i-c-k still passes).
_SEPARATING_MARKS = ("-", _TABLE_MARKS)


def _separated_word_runs(text: str, runs: _Runs) -> set[int]:
    """The indices of the runs that are the letters of one of _SPELLED_WORDS, lone Latin letters with one separating mark
    (_SEPARATING_MARKS, the same all along, spaces beside it aside) between each two."""
    def mark(j: int) -> Optional[str]:
        start, n, in_target, _ = runs[j]
        gap = text[start:start + n].strip()
        return gap if in_target is None and gap in _SEPARATING_MARKS else None

    found: set[int] = set()
    k = 0
    while k < len(runs):
        chain = [k]
        while (runs[chain[-1]][3] and chain[-1] + 2 < len(runs) and _lone_latin(runs, chain[-1] + 2)
               and mark(chain[-1] + 1) is not None and mark(chain[-1] + 1) == mark(k + 1)):
            chain.append(chain[-1] + 2)
        if len(chain) >= 3 and "".join(text[runs[j][0]] for j in chain).casefold() in _SPELLED_WORDS:
            found.update(chain)
        k = chain[-1] + 1
    return found


def _is_product(text: str, start: int, n: int) -> bool:
    """Whether the run text[start:start+n] is a product of variables written tight against a digit or an operator
    (2ab, abc=1, y=kx+b, a+b+cd, ab·sinC, (abc)), or an indexed sequence in plain text's braces (数列{an}, for a_n): two or three small
    Latin letters, none of _SPELLED_WORDS (the=, and+ stay English). Read as words, they cut Chinese chains of thought to
    0.73 (设a、b、c为正实数，且abc=1), 0.87 (y=kx+b) or 0.75 (在等比数列{an}中，a1=2)."""
    run = text[start:start + n]
    if not (2 <= n <= 3 and run.isascii() and run.islower() and run not in _SPELLED_WORDS):
        return False
    beside = [text[j] for j in (start - 1, start + n) if 0 <= j < len(text)]
    if beside in (["{", "}"], ["(", ")"]):   # 数列{an}; a product in brackets, 3·(abc)^(1/3)
        return True
    return any(ch.isdigit() or ch in _PRODUCT_SIGNS or unicodedata.category(ch) == "Sm" for ch in beside)


# Operators a product of variables is written tight against; a middle dot (·, Japanese ・) is a product too: the ab of
# S=1/2·ab·sinC counted as English (0.71 for zh), the bn of cn=an·bn too (设an=n²，bn=2^n，cn=an·bn。 0.33)
_PRODUCT_SIGNS = "+-*/^_\u00b7\u30fb"


def _spelled_out(text: str, runs: _Runs, k: int) -> bool:
    """Whether the lone letter of runs[k] has lone Latin letters close by on both sides: a word spelled out with marks
    between its letters (`t1h1e`, `t_h_e`, `(t)(h)(e)`), which every one of them beside math (_is_variable)
    left out: 1.0 for zh. Only a word's inner letters are told so, and only between the same marks on both sides, marks
    that are no operator (_spelling_mark): math written tight (the b of a+b+c, the y of x=y=z, the x of g(x)=f(x)-x)
    stays variables, which had cut Chinese chains of thought from 1.0 to 0.25."""
    def close(gap: int) -> bool:
        return 0 <= gap < len(runs) and runs[gap][2] is None and runs[gap][1] <= _SPELLED_GAP

    # a lone Greek letter stays a variable whatever is beside it
    if not (runs[k][3] and all(close(k + d) and _lone_latin(runs, k + 2 * d) for d in (-1, 1))):
        return False
    before, after = (text[runs[j][0]:runs[j][0] + runs[j][1]] for j in (k - 1, k + 1))
    # a capital between indices names a point: the B1 of 正方体ABCD-A1B1C1D1, which Chinese solid geometry writes in every
    # line, spelled a word (0.75 for zh); T1H1E1 passes with it, t1h1e1 does not
    indexed_point = text[runs[k][0]].isupper() and before.isdigit()
    return before == after and _spelling_mark(before) and not indexed_point


def _spelling_mark(gap: str) -> bool:
    """Whether `gap` may stand between the letters of a spelled-out word: no operator (+ = ∈ → * and the minus and
    division of a-b-c=0 and a/b/c, which Chinese chains of thought write tight: their b scored them 0.5), list mark
    (, 、 :), prime (A'B'C'), power or index (^2, ², _1: the y of x^2y^2z^2 or a_1b_1c_1 is a variable), while t1h1e's 1, t_h_e's _
    and (t)(h)(e)'s )( are. A hyphen cannot be told from a minus here: t-h-e counts as a word of a list
    (_separated_word_runs)."""
    operator = any(unicodedata.category(ch) in ("Sm", "No") or ch in "*^-/" or ch in _LIST_MARKS + _PRIMES + _TABLE_MARKS
                   for ch in gap)
    return not operator and not (len(gap) > 1 and any(ch.isdigit() for ch in gap))


# Math written without LaTeX names its functions bare (sin A, a/sinA=b/sinB, lgx, log 2) and a right triangle Rt△ABC:
# their letters counted as English, 0.25 for zh's 在△ABC中，sin A=1/2，cos B=0 and 0.5 for 在Rt△ABC中. Such a name,
# not inside a word and followed by at most one letter (its argument: sinA, lnx; since is no sin), is a math mark; the
# few words it takes (logs, cost) are no English worth writing.
_BARE_MATH_NAME_RE = re.compile(r"(?<![A-Za-z])(?:(?:(?:arc)?(?:sin|cos|tan|cot|sec|csc)h?|log|lg|ln|exp|lim|max|min"
                                r"|gcd|lcm)(?![A-Za-z]{2})|Rt(?=\s*[\u25b3\u22bf]))")
# A product of such functions written tight, each with its one-letter argument (sin(A+B)=sinAcosB+cosAsinB, 2sinxcosx):
# no name there is at a word's start or followed by one letter alone, and the identity scored 0.16 for zh
_BARE_FUNCTION = r"(?:arc)?(?:sin|cos|tan|cot|sec|csc)h?|log|lg|ln"
_BARE_FUNCTION_PRODUCT_RE = re.compile(rf"(?<![A-Za-z])(?:(?:{_BARE_FUNCTION})[A-Za-z]){{2,}}(?![A-Za-z])")
_BARE_FUNCTION_NAME_RE = re.compile(rf"(?:{_BARE_FUNCTION})(?=[A-Za-z])")


# A Greek capital delta before a Latin letter is a sign: a triangle's (ΔABC, as keyboards without △ write it) or an
# increment's (Δx). Δ and the letters after it, outside the target both, were one run, counted as a word: 所以ΔABC是等腰
# 三角形 scored 0.67 for zh, 所以Δx=2 0.5. It is read as the increment sign ∆ (a math symbol).
_DELTA_AS_SIGN_RE = re.compile("\u0394(?=[A-Za-z])")


# Coordinate axes and planes through the origin O (平面直角坐标系xOy, Russian ось Ox, система координат Oxyz): their
# letters, one run, read as an English word: 在平面直角坐标系xOy中 scored 0.81 for zh, на оси Oy 0.71 for ru. Their O
# is read as a math mark, which leaves x, y, z the variables they are.
_COORDINATE_AXES_RE = re.compile(r"(?<![A-Za-z])O(?=[xyz]{1,3}(?![A-Za-z]))|(?<=(?<![A-Za-z])[xyz])O(?=[xyz](?![A-Za-z]))")


def _language_evidence(body: str, scripts: tuple[str, ...]) -> list[bool]:
    """For each letter of `body` that tells its language, whether it is in the target `scripts`."""
    text = _LATEX_MATH_RE.sub(_NOTATION, body.translate(_MATH_LETTERS_AS_PLAIN))
    text = _BARE_FUNCTION_PRODUCT_RE.sub(lambda m: _BARE_FUNCTION_NAME_RE.sub(_NOTATION, m.group()), text)
    text = _BARE_MATH_NAME_RE.sub(_NOTATION, text)
    text = _COORDINATE_AXES_RE.sub(_NOTATION, text)
    text = _DELTA_AS_SIGN_RE.sub("\u2206", text)
    text = text.replace(_ROW_SEPARATOR, _TABLE_MARKS)
    runs: _Runs = []
    start = 0
    for in_target, part in itertools.groupby(text, key=lambda ch: _in_script(ch, scripts) if ch.isalpha() else None):
        n = len(list(part))
        runs.append((start, n, in_target, in_target is False and n == 1 and _in_script(text[start], ("LATIN",))))
        start += n
    interleaved = _interleaved_word_runs(text, runs) | _separated_word_runs(text, runs)
    evidence: list[bool] = []
    for k, (start, n, in_target, _) in enumerate(runs):
        a_variable = (in_target is False and n == 1 and _is_variable(text, start, scripts)
                      and not _spelled_out(text, runs, k) and k not in interleaved)
        if in_target is False and not a_variable and (_is_point_name(text, start, n, scripts) or _is_product(text, start, n)
                                                       or _is_indexed_name(text, start, n, scripts)):
            continue
        if in_target is not None and not a_variable:
            evidence.extend([in_target] * n)
    return evidence


def make_language_reward(language: str = "en"):
    """Share of the chain of thought's letters written in the target language's script (R1's
    language-consistency reward); math notation is left out (_language_evidence). A chain of thought with no
    such letters returns None (no evidence)."""
    if language not in _LANGUAGE_SCRIPTS:
        raise ValueError(f"language reward: unknown language {language!r}; known: {', '.join(sorted(_LANGUAGE_SCRIPTS))}")
    scripts = _LANGUAGE_SCRIPTS[language]

    def language_reward(prompts, completions, **_) -> list[Optional[float]]:
        out: list[Optional[float]] = []
        for c in completions:
            evidence = _language_evidence(reasoning_text(c), scripts)
            out.append(sum(evidence) / len(evidence) if evidence else None)
        return out

    return language_reward
