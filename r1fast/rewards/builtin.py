"""Rule-based rewards (DeepSeek-R1 §2.2.2): accuracy, format, length (language consistency: language.py; whether
an answer matches its reference, and cons@k's vote key: matching.py).

All follow TRL's reward-function signature: `(prompts, completions, **columns) -> list[float | None]`.
A completion is a string, or a chat list whose last message's "content" is the string.
"""
from __future__ import annotations

import math
import numbers
import re
import struct
from typing import Any, Optional, Sequence

from r1fast.data.loading import refuse_boolean
# vote_key is read from here by the evaluation's cons@k
from r1fast.rewards.matching import last_boxed, answers_match, vote_key  # noqa: F401

# Spans are matched with a tempered body ("any character that does not start a tag"): one block
# cannot swallow another, and matching stays linear in the text. A lazy `.*?` rescanned the rest of
# the text from every unclosed tag: seconds for a 100k-character completion of repeated tags.
_NOT_THINK = r"(?:(?!</?think>).)*"
_NOT_TAG = r"(?:(?!</?(?:think|answer)>).)*"
# Exactly one reasoning block, then exactly one answer block.
THINK_ANSWER_PATTERN = rf"^\s*<think>{_NOT_THINK}</think>\s*<answer>{_NOT_TAG}</answer>\s*$"
_ANSWER_RE = re.compile(r"<answer>((?:(?!</?answer>).)*)</answer>", re.DOTALL)
_THINK_RE = re.compile(rf"<think>({_NOT_THINK})</think>", re.DOTALL)
_TAG_RE = re.compile(r"</?(?:think|answer)>")


def completion_text(c: Any) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list) and c and isinstance(c[-1], dict) and "content" in c[-1]:
        return str(c[-1]["content"])
    if isinstance(c, dict) and "content" in c:
        return str(c["content"])
    raise TypeError(f"a completion must be a string or a list of chat messages; got {type(c).__name__}")


def extract_answer(text: str) -> Optional[str]:
    """The last <answer>…</answer> span, else the last \\boxed{…} (nested braces included); None when
    neither is present."""
    found = _ANSWER_RE.findall(text)
    if found:
        return found[-1].strip()
    boxed = last_boxed(text)
    return boxed.strip() if boxed is not None else None


def final_part(text: str) -> str:
    """What follows the reasoning: the text after the last </think>, cut where a <think> is opened and
    never closed. An <answer> written while still thinking is not the model's final answer."""
    end = text.rfind("</think>")
    if end >= 0:
        text = text[end + len("</think>"):]
    start = text.find("<think>")
    return text[:start] if start >= 0 else text




def accuracy_reward(prompts, completions, answer=None, solution=None, **_) -> list[Optional[float]]:
    """1.0 when the completion's final answer (the last <answer> or \\boxed{} after the reasoning, see
    `final_part`) equals the reference answer, else 0.0.

    The reference comes from the row's `answer` or, where that is missing (None, NaN, empty), from its
    `solution` (TRL's convention; datasets merged from several sources hold one or the other per row); a
    list there holds accepted answers (any of them matches). A row with neither returns None, so this
    function is left out of that row's reward.
    """
    if answer is None and solution is None:
        raise ValueError("accuracy reward needs an 'answer' (or 'solution') column in the dataset")
    n = len(completions)
    answers, solutions = _per_row("answer", answer, n), _per_row("solution", solution, n)
    out: list[Optional[float]] = []
    for row, (c, a, s) in enumerate(zip(completions, answers, solutions)):
        golds = row_golds(a, f"accuracy reward: row {row}: column 'answer'") or \
            row_golds(s, f"accuracy reward: row {row}: column 'solution'")
        if not golds:  # no reference to check against (None, NaN, empty): left out, not a reward for ""
            out.append(None)
            continue
        pred = extract_answer(final_part(completion_text(c)))
        out.append(1.0 if pred is not None and any(answers_match(pred, x) for x in golds) else 0.0)
    return out


def _per_row(name: str, column, n: int) -> Sequence:
    """A column's values, one per completion (None: n Nones). A string ("42" for two completions) was read a
    character per row, and a shorter list scored only its first rows."""
    if column is None:
        return [None] * n
    if isinstance(column, (str, bytes)) or not hasattr(column, "__len__") or len(column) != n:
        got = f"{len(column)} values" if hasattr(column, "__len__") and not isinstance(column, str) else repr(column)
        raise ValueError(f"accuracy reward: {name} must hold one value per completion ({n}); got {got:.80}")
    return column


def row_golds(g, where: str = "a reference answer") -> list[str]:
    """One row's reference answers from one column's value (a list: any of them); [] when it holds none.
    `where` names the row and column in the error for a boolean."""
    half = None
    if hasattr(g, "tolist") and not isinstance(g, str):
        # a Dataset formatted for numpy or torch (set_format) holds arrays and tensors: read as text, a list of
        # accepted answers was "['3' '5']" and a number "tensor(0.5000)", which no answer matched
        half = _HALF_FLOATS.get(str(getattr(g, "dtype", "")))
        g = g.tolist()
    values = g if isinstance(g, (list, tuple)) else [g]
    _refuse_booleans(values, where)
    golds = [gold_text(x, half) for x in values]
    if half:   # the value itself too: float16's 0.15625 (5/32) prints as 0.1562, which 5/32 does not match
        golds += [gold_text(x) for x in values]
        # written out whole: gold_text writes a value of more than 9 digits (float16's 3.599609375 for 3.6) as its
        # shortest reading again, so the exact value scored 0 below 4 in float16 and at small bfloat16 values
        golds += [repr(x) for x in values if isinstance(x, float) and math.isfinite(x)]
    return list(dict.fromkeys(x for x in golds if x is not None))


def _refuse_booleans(values, where: str):
    """A boolean reference is refused, as an SFT completion that is one is (data/loading.py): it was compared as
    Python's "True", which a JSON `true` does not spell, so an answer written as the data wrote it scored 0 and no
    text of it is surely the data's."""
    for x in values:
        refuse_boolean(x, f"{where} holds", "not an answer whose text the data says")


def gold_text(g, half: Optional[str] = None) -> Optional[str]:
    """The reference answer to compare with (a solution's <answer>/\\boxed{} part, or the N of GSM8K's
    final `#### N` line), or None when there is none: an empty gold rewarded an empty answer, and a NaN
    one the answer "nan". `half` names the 16-bit float type ("float16", "bfloat16") a float came from, where known
    (a numpy array's or torch tensor's dtype): it is written as that type prints it."""
    if g is None or (isinstance(g, float) and math.isnan(g)):
        return None
    if isinstance(g, float):
        g = (half and _shortest_text(g, _HALF_ROUNDERS[half])) or _low_precision_float_text(g)
    else:
        g = str(g)
    g = extract_answer(g) or _gsm8k_final(g) or g
    return g if g.strip() else None


def _low_precision_float_text(x: float) -> str:
    """A float gold as text; a float32 or float16 value (a parquet or `datasets` float32 or float16 column, read as Python
    floats, or a numpy or torch one, read by tolist) with the fewest digits that read back as it, as numpy prints it:
    written out as a double, float32's 0.1 was 0.10000000149011612 and float16's 0.0999755859375, which the answer 0.1
    did not match (to 1e-12). A value both types hold is read as the one that prints it shorter (float16's 0.1 is also a
    float32, 0.09997559). A float with no more digits than a float32 holds (9: 0.5, 100.0, float16's 3.140625 for 3.14,
    which cannot be told from an exact 201/64), or that neither type holds (0.1, 1/3), is written as str does."""
    text = repr(x)
    if not math.isfinite(x) or len(text.split("e")[0].replace("-", "").replace(".", "").strip("0")) <= 9:
        return str(x)
    readings = [_shortest_text(x, round_to) for round_to in (_as_float16, _as_float32)]
    readings = [r for r in readings if r is not None]
    return min(readings, key=len) if readings else text


def _shortest_text(x: float, round_to) -> Optional[str]:
    """x with the fewest significant digits (up to 9) that `round_to` (a float type's rounding) reads back as x; None where
    that type does not hold x."""
    try:
        if round_to(x) != x:
            return None
    except OverflowError:   # past the type's largest
        return None
    for digits in range(1, 10):
        short = f"{x:.{digits}g}"
        try:
            if round_to(float(short)) == x:
                return short
        except OverflowError:   # a rounding past the type's largest (65504 to 7e+04 in float16)
            pass
    return None


def _as_float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _as_float16(x: float) -> float:
    return struct.unpack("e", struct.pack("e", x))[0]


def _as_bfloat16(x: float) -> float:
    """x rounded to bfloat16 (float32's upper 16 bits, to nearest, ties to even), as torch rounds it."""
    bits = struct.unpack("I", struct.pack("f", x))[0]
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return struct.unpack("f", struct.pack("I", bits))[0]


# a numpy or torch dtype's name -> the 16-bit float type its values are
_HALF_FLOATS = {"float16": "float16", "torch.float16": "float16", "bfloat16": "bfloat16", "torch.bfloat16": "bfloat16"}
_HALF_ROUNDERS = {"float16": _as_float16, "bfloat16": _as_bfloat16}


# GSM8K's `answer` column is a worked solution whose last line is `#### 72`. Read whole, the answer was
# whatever number math-verify found first in the prose ("so the answer is 5 per hour. ... #### 15" paid
# for 5, not 15), and without math-verify every answer scored 0.
def _gsm8k_final(g: str) -> Optional[str]:
    """The answer on a solution's last line when it is GSM8K's `#### answer`, else None. Read with string methods: a
    regular expression's lazy answer before `\\s*\\Z` rescanned the rest of the line from each of its characters, 7 s
    for a gold of "####x", 20k spaces, "y" (gold_text runs on every row of every step)."""
    text = g.rstrip()   # blank lines and spaces after the final line are no part of it
    last_line = text[text.rfind("\n") + 1:].lstrip(" \t")
    if not last_line.startswith("####"):
        return None
    return last_line[len("####"):].lstrip(" \t") or None


def make_format_reward(pattern: Optional[str] = None):
    """1.0 when the whole completion matches `pattern` (default: <think>…</think><answer>…</answer>)."""
    try:
        regex = re.compile(pattern or THINK_ANSWER_PATTERN, re.DOTALL)
    except (re.error, TypeError) as e:   # re.error's "missing ), unterminated subpattern" named neither
        raise ValueError(f"format reward: format_pattern {pattern!r:.80} is not a valid regular expression ({e})") from None

    def format_reward(prompts, completions, **_) -> list[float]:
        return [1.0 if regex.fullmatch(completion_text(c)) else 0.0 for c in completions]

    return format_reward


format_reward = make_format_reward()

def reasoning_text(completion) -> str:
    """A completion's chain of thought: its <think> blocks (the whole text without any), the tags left out."""
    text = completion_text(completion)
    close, start = text.find("</think>"), text.find("<think>")
    if close >= 0 and not 0 <= start < close:
        # a completion that starts inside the reasoning its chat template opened (R1-Distill's "<think>\n"):
        # its text up to </think> is the reasoning; read whole, the answer's letters counted too
        text = "<think>" + text
    thinks = _THINK_RE.findall(text)
    return _TAG_RE.sub(" ", " ".join(thinks) if thinks else text)   # the tags' own letters are no evidence


def make_length_penalty(target: int):
    """0 up to `target` tokens (characters without token ids), then a linear penalty down to -1 at
    twice the target: DAPO's soft over-length punishment."""
    # a NaN target passed `target < 1` and scored every completion -1, an infinite one none; a string failed at the
    # first batch with "'<' not supported"
    if isinstance(target, bool) or not isinstance(target, numbers.Real) or not 1 <= target < math.inf:
        raise ValueError(f"length penalty: target must be a positive length (a finite number >= 1); got {target!r}")
    # as a Python int or float: a numpy float32 target computed the penalty in float32 (off by up to 1e-7) and returned
    # numpy floats, a Fraction one Fractions
    target = int(target) if isinstance(target, numbers.Integral) else float(target)

    def length_penalty(prompts, completions, completion_ids=None, **_) -> list[float]:
        lengths = ([len(ids) for ids in completion_ids] if completion_ids is not None
                   else [len(completion_text(c)) for c in completions])
        # 0.0 within the target, not -0.0 (logged as such in the samples)
        return [-min(1.0, (n - target) / target) if n > target else 0.0 for n in lengths]

    return length_penalty


def is_finite_number(x) -> bool:
    try:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    except OverflowError:  # an int past float's range (10**400)
        return False
