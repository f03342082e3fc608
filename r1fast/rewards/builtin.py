"""Rule-based rewards (DeepSeek-R1 §2.2.2): accuracy, format, language consistency, length.

All follow TRL's reward-function signature: `(prompts, completions, **columns) -> list[float | None]`.
A completion is a string, or a chat list whose last message's "content" is the string.
"""
from __future__ import annotations

import math
import re
import unicodedata
from fractions import Fraction
from typing import Any, Optional

THINK_ANSWER_PATTERN = r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$"
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")


def completion_text(c: Any) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list) and c and isinstance(c[-1], dict) and "content" in c[-1]:
        return str(c[-1]["content"])
    if isinstance(c, dict) and "content" in c:
        return str(c["content"])
    raise TypeError(f"a completion must be a string or a list of chat messages; got {type(c).__name__}")


def extract_answer(text: str) -> Optional[str]:
    """The last <answer>…</answer> span, else the last \\boxed{…}; None when neither is present."""
    found = _ANSWER_RE.findall(text)
    if found:
        return found[-1].strip()
    boxed = _BOXED_RE.findall(text)
    if boxed:
        return boxed[-1].strip()
    return None


def _as_number(s: str) -> Optional[Fraction]:
    s = s.strip().replace(",", "").replace(" ", "").rstrip(".")
    if s.startswith("$") and s.endswith("$") and len(s) > 1:
        s = s[1:-1]
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            return Fraction(int(num), int(den))
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str, gold: str) -> bool:
    """Exact text match, then numeric match (1/2 == 0.5, 1,000 == 1000), then math-verify when installed."""
    if predicted.strip() == gold.strip():
        return True
    a, b = _as_number(predicted), _as_number(gold)
    if a is not None and b is not None:
        return a == b
    try:
        from math_verify import parse, verify
    except ImportError:
        return False
    try:
        gold_parsed = parse(gold if "$" in gold or "\\" in gold else f"${gold}$")
        pred_parsed = parse(predicted if "$" in predicted or "\\" in predicted else f"${predicted}$")
        return bool(gold_parsed) and bool(pred_parsed) and bool(verify(gold_parsed, pred_parsed))
    except Exception:
        return False  # math-verify failing to parse a model's answer means the answer is not verifiable


def accuracy_reward(prompts, completions, answer=None, solution=None, **_) -> list[Optional[float]]:
    """1.0 when the completion's final answer equals the reference answer, else 0.0.

    The reference comes from the `answer` column (or `solution`, TRL's convention); a row without
    a reference returns None, so this function is left out of that row's reward.
    """
    gold = answer if answer is not None else solution
    if gold is None:
        raise ValueError("accuracy reward needs an 'answer' (or 'solution') column in the dataset")
    out: list[Optional[float]] = []
    for c, g in zip(completions, gold):
        if g is None:
            out.append(None)
            continue
        g = str(g)
        g_extracted = extract_answer(g) or g
        pred = extract_answer(completion_text(c))
        out.append(1.0 if pred is not None and answers_match(pred, g_extracted) else 0.0)
    return out


def make_format_reward(pattern: Optional[str] = None):
    """1.0 when the whole completion matches `pattern` (default: <think>…</think><answer>…</answer>)."""
    regex = re.compile(pattern or THINK_ANSWER_PATTERN, re.DOTALL)

    def format_reward(prompts, completions, **_) -> list[float]:
        return [1.0 if regex.match(completion_text(c)) else 0.0 for c in completions]

    return format_reward


format_reward = make_format_reward()

# Unicode script (first word of the character's name) counted as "in the language".
_LANGUAGE_SCRIPTS = {
    "en": ("LATIN",), "fr": ("LATIN",), "de": ("LATIN",), "es": ("LATIN",), "it": ("LATIN",),
    "pt": ("LATIN",), "zh": ("CJK",), "ja": ("CJK", "HIRAGANA", "KATAKANA"), "ko": ("HANGUL",),
    "ru": ("CYRILLIC",), "ar": ("ARABIC",), "el": ("GREEK",), "he": ("HEBREW",),
}


def _script(ch: str) -> str:
    try:
        return unicodedata.name(ch).split(" ")[0]
    except ValueError:
        return "UNKNOWN"


def make_language_reward(language: str = "en"):
    """Share of the chain of thought's letters written in the target language's script (R1's
    language-consistency reward). A chain of thought with no letters returns None (no evidence)."""
    if language not in _LANGUAGE_SCRIPTS:
        raise ValueError(f"language reward: unknown language {language!r}; known: {', '.join(sorted(_LANGUAGE_SCRIPTS))}")
    scripts = _LANGUAGE_SCRIPTS[language]

    def language_reward(prompts, completions, **_) -> list[Optional[float]]:
        out: list[Optional[float]] = []
        for c in completions:
            text = completion_text(c)
            thinks = _THINK_RE.findall(text)
            body = " ".join(thinks) if thinks else text
            letters = [ch for ch in body if ch.isalpha()]
            if not letters:
                out.append(None)
                continue
            out.append(sum(_script(ch) in scripts for ch in letters) / len(letters))
        return out

    return language_reward


def make_length_penalty(target: int):
    """0 up to `target` tokens (characters without token ids), then a linear penalty down to -1 at
    twice the target: DAPO's soft over-length punishment."""
    if target is None or target < 1:
        raise ValueError(f"length penalty: target must be a positive length; got {target!r}")

    def length_penalty(prompts, completions, completion_ids=None, **_) -> list[float]:
        lengths = ([len(ids) for ids in completion_ids] if completion_ids is not None
                   else [len(completion_text(c)) for c in completions])
        return [-min(1.0, max(0, n - target) / target) for n in lengths]

    return length_penalty


def is_finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
