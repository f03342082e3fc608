"""Tokenizers from local folders, through transformers.AutoTokenizer (its chat template kept)."""
from __future__ import annotations

import os

from r1fast.models.config import read_json_object

# The JSON files AutoTokenizer reads; transformers reports a broken one with no file name, or as an
# unrelated TypeError/KeyError deep inside, so each is read here first.
_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
               "vocab.json")


def load_tokenizer(path):
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder {path!r} does not exist")
    files = set(os.listdir(path))
    if not files & {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"}:
        raise FileNotFoundError(f"no tokenizer files (tokenizer.json, tokenizer_config.json, ...) in {path!r}")
    for name in _JSON_FILES:
        if name in files:
            read_json_object(os.path.join(path, name))
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ImportError, ValueError):
        raise  # transformers' own messages for these say what is wrong (custom code, missing package...)
    except Exception as e:  # KeyError, TypeError, AttributeError, the tokenizers library's bare Exception
        raise ValueError(f"tokenizer folder {path!r} cannot be loaded (is tokenizer.json from a supported "
                         f"tokenizers version, and tokenizer_config.json consistent with it?): "
                         f"{type(e).__name__}: {e}") from e

