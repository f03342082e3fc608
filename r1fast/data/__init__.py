"""Data: dataset loading (JSONL, parquet, saved HF datasets, built-in tasks), chat templates, tokenizer."""
from r1fast.data.loading import (
    check_columns,
    check_prompts,
    decode_completion,
    encode_completion,
    encode_prompt,
    load_rows,
    prompt_messages,
    prompt_text,
    stop_token_ids,
)
from r1fast.data.tasks import TASKS, ArithmeticTask, builtin_rows
from r1fast.data.tokenizer import build_char_tokenizer

__all__ = ["check_columns", "check_prompts", "decode_completion", "encode_completion", "encode_prompt", "load_rows", "prompt_messages",
           "prompt_text", "stop_token_ids", "TASKS", "ArithmeticTask", "builtin_rows", "build_char_tokenizer"]
