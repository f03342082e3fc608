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
    stored = {name: read_json_object(os.path.join(path, name)) for name in _JSON_FILES if name in files}
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
    tokenizer = _as_stored_tokenizer(path, files, tokenizer, stored.get("tokenizer.json"))
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


# Text any tokenizer r1fast trains with splits into tokens: numbers of one and of several digits (pre-tokenizers differ
# in how they group digits), operators, a space, words, a newline.
_PROBE = "12+345=357 hello\nWorld"


def _as_stored_tokenizer(path: str, files: set[str], tokenizer, stored: dict | None):
    """The tokenizer to train with: the one transformers loaded, unless it tokenizes otherwise than tokenizer.json.

    A class with its own pipeline (Qwen2Tokenizer, LlamaTokenizer, BertTokenizer...) takes only the vocabulary from
    tokenizer.json in transformers 5 and puts its own normalizer, pre-tokenizer and model around it, where
    transformers 4 read tokenizer.json as it is: named in tokenizer_config.json, or picked by config.json's
    model_type, over a tokenizer.json that is not that class's (a WordLevel one, one that groups digits otherwise),
    the ids change, or text encodes to []. Checked on one short text against tokenizer.json's own pipeline run over
    the loaded model, which costs no second reading of the vocabulary. Where they differ, tokenizer.json is read as
    it is (PreTrainedTokenizerFast, with tokenizer_config.json's special tokens and chat template): the checkpoint's
    own tokenizer, which a command-line user could not otherwise choose. Said in a warning, since transformers'
    AutoTokenizer gives other ids for the same folder."""
    import warnings

    ids = _probe_ids(tokenizer)
    if ids is None:  # e.g. a WordLevel vocabulary without an unknown token: it fails so on any text it lacks
        return tokenizer
    problem = _not_as_stored_problem(tokenizer, stored, ids)
    if problem is None:
        if not ids:  # as its files say: they are not a tokenizer for text
            raise ValueError(f"tokenizer folder {path!r} (loaded as {type(tokenizer).__name__}) encodes {_PROBE!r} "
                             f"to no tokens: are its files this model's tokenizer? Copy them (tokenizer.json, "
                             f"tokenizer_config.json...) from the original checkpoint")
        return tokenizer
    head = (f"tokenizer folder {path!r}: transformers loads it as {type(tokenizer).__name__}, which does not tokenize "
            f"as its tokenizer.json does ({problem})")
    as_stored = _read_as_stored(path, stored)
    why = _why_rebuilt(path, files, tokenizer)
    if as_stored is not None:
        warnings.warn(f"r1fast: {head}: {why}; r1fast reads tokenizer.json as it is (PreTrainedTokenizerFast, as "
                      f"transformers 4 did)", stacklevel=3)
        return as_stored
    neither = "; read as it is (PreTrainedTokenizerFast), tokenizer.json does not tokenize so either"
    if not ids:
        raise ValueError(f"{head}: {why}{neither}: are its files this model's tokenizer? Copy them (tokenizer.json, "
                         f"tokenizer_config.json...) from the original checkpoint")
    warnings.warn(f"r1fast: {head}: {why}{neither}; r1fast goes on with the tokenizer as transformers loaded it",
                  stacklevel=3)
    return tokenizer


def _probe_ids(tokenizer) -> list[int] | None:
    try:
        return tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    except Exception:
        return None


def _read_as_stored(path: str, stored: dict):
    """tokenizer.json read as it is, if it then tokenizes as tokenizer.json does; else None."""
    from transformers import PreTrainedTokenizerFast

    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception:  # the class transformers picked has loaded: the caller keeps it
        return None
    ids = _probe_ids(tokenizer)
    return tokenizer if ids and _not_as_stored_problem(tokenizer, stored, ids) is None else None


def _not_as_stored_problem(tokenizer, stored: dict | None, ids: list[int]) -> str | None:
    """How the loaded tokenizer does not tokenize as tokenizer.json does, in words, or None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = stored.get("model") if stored is not None else None
    if backend is None or not isinstance(model, dict):
        return None
    kind, loaded = model.get("type"), type(backend.model).__name__
    if kind is not None and kind != loaded:
        return f"it holds a {loaded} model, tokenizer.json a {kind} one ({_PROBE!r} encodes to {ids})"
    vocab = model.get("vocab")
    size = backend.get_vocab_size(with_added_tokens=False)
    if isinstance(vocab, (dict, list)) and len(vocab) != size:
        return f"its vocabulary holds {size} tokens, tokenizer.json's {len(vocab)}"
    pipeline = _stored_pipeline(stored)
    if pipeline is None:
        return None
    # both pipelines over the one model loaded (so no second reading of the vocabulary), added tokens aside: the
    # rebuilt classes keep those
    got = [i for _, i in _through(backend, backend.model)]
    want = [_stored_id(vocab, token, i) for token, i in _through(pipeline, backend.model)]
    if got != want:
        return f"{_PROBE!r} encodes to {got}, by tokenizer.json to {want}"
    return None


def _through(pipeline, model) -> list[tuple[str, int]]:
    """The probe's (token, id) pairs through `pipeline`'s normalizer and pre-tokenizer and `model`."""
    text = pipeline.normalizer.normalize_str(_PROBE) if pipeline.normalizer is not None else _PROBE
    pieces = [p for p, _ in pipeline.pre_tokenizer.pre_tokenize_str(text)] if pipeline.pre_tokenizer else [text]
    return [(t.value, t.id) for piece in pieces for t in model.tokenize(piece)]


def _stored_id(vocab, token: str, loaded_id: int):
    """The id tokenizer.json's vocabulary gives `token` (a token it lacks keeps the loaded id: an added token)."""
    if isinstance(vocab, dict):
        return vocab.get(token, loaded_id)
    if isinstance(vocab, list):  # Unigram: [piece, score] pairs, the id the position
        def piece(i):
            return vocab[i][0] if isinstance(vocab[i], list) and vocab[i] else None

        if 0 <= loaded_id < len(vocab) and piece(loaded_id) == token:
            return loaded_id
        return next((i for i in range(len(vocab)) if piece(i) == token), loaded_id)
    return loaded_id


def _stored_pipeline(stored: dict):
    """tokenizer.json's pipeline with an empty vocabulary (as transformers reads it for the same purpose): its
    model is not used. None where the tokenizers library does not read it so."""
    import json

    from tokenizers import Tokenizer

    shell = {**stored, "model": {"type": "BPE", "vocab": {}, "merges": []}, "added_tokens": []}
    try:
        return Tokenizer.from_str(json.dumps(shell))
    except Exception:  # a format this tokenizers version reads differently: transformers has loaded it already
        return None


def _why_rebuilt(path: str, files: set[str], tokenizer) -> str:
    loaded = type(tokenizer).__name__
    if _configured_class(path, files) is type(tokenizer):
        return (f"{loaded} is the class tokenizer_config.json names, and transformers 5 rebuilds it with its own "
                f"pipeline around tokenizer.json's vocabulary")
    model_type = None
    if "config.json" in files:
        model_type = read_json_object(os.path.join(path, "config.json")).get("model_type")
    return (f"transformers 5 takes {loaded} for config.json's model_type {model_type!r}, whatever "
            f"tokenizer_config.json names, and rebuilds it with its own pipeline around tokenizer.json's vocabulary")
