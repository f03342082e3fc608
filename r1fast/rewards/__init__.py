"""Rewards: rule-based functions (accuracy, format, language, length) and user functions by name."""
from r1fast.rewards.builtin import (
    THINK_ANSWER_PATTERN,
    accuracy_reward,
    extract_answer,
    format_reward,
    make_format_reward,
    make_length_penalty,
)
from r1fast.rewards.combine import BUILTIN_NAMES, RewardError, RewardSet, RewardTimeout, load_function, resolve
from r1fast.rewards.language import make_language_reward
from r1fast.rewards.matching import answers_match

__all__ = ["THINK_ANSWER_PATTERN", "accuracy_reward", "answers_match", "extract_answer", "format_reward",
           "make_format_reward", "make_language_reward", "make_length_penalty", "BUILTIN_NAMES",
           "RewardError", "RewardSet", "RewardTimeout", "load_function", "resolve"]
