"""Tokenizers from local folders, through transformers.AutoTokenizer (its chat template kept)."""
from __future__ import annotations

import os

from r1fast.models.checkpoint import builtin_model_hint, file_not_folder
from r1fast.models.config import not_a_model_folder_hint, read_json_object

# The JSON files AutoTokenizer reads; transformers reports a broken one with no file name, or as an
# unrelated TypeError/KeyError deep inside, so each is read here first.
_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
               "vocab.json")
# The vocabulary a tokenizer class reads when tokenizer.json is absent (vocab.json + merges.txt for
# Qwen2, tokenizer.model for Llama...), as its `vocab_files_names` maps them.
_VOCABULARY_KEYS = ("vocab_file", "merges_file")


def load_tokenizer(path):
    path = os.fspath(path)
    if os.path.isfile(path):
        raise NotADirectoryError(file_not_folder(path, "tokenizer"))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder {path!r} does not exist{builtin_model_hint(path)}")
    files = set(os.listdir(path))
    if not files & {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"}:
        raise FileNotFoundError(f"no tokenizer files (tokenizer.json, tokenizer_config.json, ...) in {path!r}"
                                f"{not_a_model_folder_hint(path)}")
    for name in _JSON_FILES:
        if name in files:
            read_json_object(os.path.join(path, name))
    # Checked before and after loading: with neither tokenizer.json nor its class's vocabulary files,
    # transformers either fails with an unrelated message (install sentencepiece, `vocab` and `merges`
    # must both be filenames) or returns a tokenizer of only the special tokens, which encodes text to [].
    _check_vocabulary(path, files, _configured_class(path, files))
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ImportError, ValueError):
        raise  # transformers' own messages for these say what is wrong (custom code, missing package...)
    except Exception as e:  # KeyError, TypeError, AttributeError, the tokenizers library's bare Exception
        raise ValueError(f"tokenizer folder {path!r} cannot be loaded (is tokenizer.json from a supported "
                         f"tokenizers version, and tokenizer_config.json consistent with it?): "
                         f"{type(e).__name__}: {e}") from e
    _check_vocabulary(path, files, type(tokenizer))
    # how it was loaded, which transformers keeps among the tokenizer's options and so writes into the
    # tokenizer_config.json of every checkpoint saved with it: a pipeline stage resumed after a stop loads its
    # tokenizer from the previous stage's checkpoint, where the uninterrupted run had it in memory, and its
    # checkpoints differed from that run's by these two keys
    for loading_option in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(loading_option, None)
    return tokenizer


def _configured_class(path: str, files: set[str]):
    """The class tokenizer_config.json names, when transformers knows it; else None."""
    if "tokenizer_config.json" not in files:
        return None
    name = read_json_object(os.path.join(path, "tokenizer_config.json")).get("tokenizer_class")
    if not isinstance(name, str):
        return None
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    try:
        return tokenizer_class_from_name(name)
    except Exception:  # an unknown or custom class: AutoTokenizer reports it
        return None


def _check_vocabulary(path: str, files: set[str], tokenizer_class) -> None:
    if "tokenizer.json" in files or tokenizer_class is None:
        return
    names = getattr(tokenizer_class, "vocab_files_names", None) or {}
    missing = [names[k] for k in _VOCABULARY_KEYS if isinstance(names.get(k), str) and names[k] not in files]
    if missing:
        raise FileNotFoundError(f"tokenizer folder {path!r} has no vocabulary: it lacks tokenizer.json and "
                                f"{' and '.join(missing)}, which {tokenizer_class.__name__} reads without it; "
                                f"copy the tokenizer files from the original checkpoint")
