"""Reading prompt datasets and turning rows into token ids.

Sources: a local JSONL/JSON file, a parquet file, a folder written by `datasets.save_to_disk`, or
`builtin:<task>`. Rows stay dicts of columns; the prompt column is a string or a list of chat
messages, and the tokenizer's chat template (when it has one) is applied to it.
"""
from __future__ import annotations

import decimal
import json
import os
import numbers
import shlex
import warnings
from typing import Any, Optional, Sequence

from r1fast.data.tasks import builtin_rows


TRAIN_SPLITS = ("train",)
# a held-out set's split of a saved DatasetDict, when none is named
EVAL_SPLITS = ("test", "validation", "eval")


def load_rows(spec: str, *, split: Optional[str] = None, n_builtin: int = 1000, seed: int = 0,
              required_columns: Sequence[str] = (), default_splits: Sequence[str] = TRAIN_SPLITS,
              column_options: Optional[dict[str, str]] = None) -> list[dict]:
    """A dataset as a list of row dicts (`required_columns` must all be present; `column_options` as
    check_columns's `options`): FileRows, which also know the
    file and, for JSONL, each row's line, so that a bad row's error names them. `split` names a split of a folder
    saved from a DatasetDict; without it, the first of `default_splits` it has, else its first split. A .csv whose
    rows have a field more than its header is refused (pandas would read its columns shifted by one).
    A builtin:<task> read as a held-out set (`default_splits` EVAL_SPLITS, as every evaluation reads its rows) draws
    `n_builtin` different prompts: a prompt drawn twice counted twice in the accuracy."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"dataset must be a path or builtin:<task>; got {spec!r}")
    if spec.startswith("builtin:"):
        if split not in (None, "train"):   # as a file's (_no_splits): `dataset_split=test` drew training prompts
            raise ValueError(f"dataset {spec!r} is generated and has no splits, so split {split!r} cannot be taken "
                             f"from it; leave the split out (a builtin: eval_dataset draws held-out prompts of its own)")
        rows = builtin_rows(spec, n_builtin, seed, distinct=tuple(default_splits) == EVAL_SPLITS)
    else:
        rows = _load_hf(spec, split, default_splits)
    if not rows:
        raise ValueError(f"dataset {spec!r} is empty")
    if not isinstance(rows, FileRows):   # a JSONL file's rows know their lines already
        rows = FileRows(rows, spec)
    check_columns(rows, required_columns, "dataset", column_options)
    return rows


def column_options_hint(missing: Sequence[str], options: Optional[dict[str, str]]) -> str:
    """'; set prompt_column=<column> to read another column' for the missing columns an option names: a
    dataset whose prompts are under `question` (GSM8K's) is read with prompt_column=question."""
    named = [options[c] for c in missing if options and c in options]
    if not named:
        return ""
    sets = " and ".join(f"{o}=<column>" for o in named)
    return f"; set {sets} to read {'another column' if len(named) == 1 else 'other columns'}"


class FileRows(list):
    """Rows read from `source` (a path or builtin:<task>), and for a JSONL file the line each row is on, so that a
    check finding a bad row names the file and line: "train dataset: row 6" left the user to count, and a JSONL
    file's blank lines put row i elsewhere than line i + 1. A slice keeps them (the first N prompts are checked)."""

    def __init__(self, rows, source: str, lines: Optional[Sequence[int]] = None):
        super().__init__(rows)
        self.source, self.lines = source, lines

    def __getitem__(self, index):
        got = super().__getitem__(index)
        if isinstance(index, slice):
            return FileRows(got, self.source, self.lines[index] if self.lines is not None else None)
        return got

    def __reduce__(self):   # pickled and copied whole (copy's default appends the rows after the lines are set)
        return FileRows, (list(self), self.source, self.lines)


def _forgetting_where(change):
    """A list method that changes FileRows in place (a caller's append, shuffle, sort): its rows are then no longer
    the file's at those lines (a wrong line was named, or an IndexError raised for an appended row), so they are
    named as rows given in Python are."""
    def changed(self, *args, **kwargs):
        self.source, self.lines = None, None
        return change(self, *args, **kwargs)
    return changed


for _name in ("__setitem__", "__delitem__", "__iadd__", "__imul__", "append", "extend", "insert", "pop", "remove",
              "clear", "sort", "reverse"):
    setattr(FileRows, _name, _forgetting_where(getattr(list, _name)))


def row_name(rows: Sequence[dict], i: int) -> str:
    """"row i", with the file and line it was read from when `rows` are FileRows."""
    return f"row {i}{file_line(rows, i)}"


def file_line(rows: Sequence[dict], i: int) -> str:
    """" ('data.jsonl' line 7)" for row i of a JSONL file's FileRows, " (of 'data.parquet')" for another file's,
    else "" (rows given in Python, a builtin: task)."""
    source = getattr(rows, "source", None)
    if source is None or source.startswith("builtin:"):
        return ""
    lines = getattr(rows, "lines", None)
    return f" ({source!r} line {lines[i]})" if lines is not None else f" (of {source!r})"


def source_name(rows: Sequence[dict]) -> str:
    """" ('data.jsonl')" for rows read from a file, else "": for errors about the whole dataset."""
    source = getattr(rows, "source", None)
    return f" ({source!r})" if source is not None else ""


MESSAGES_COLUMN = "messages"


def split_conversations(rows: Sequence[dict], prompt_column: str, completion_column: str,
                        where: str = "SFT dataset") -> Sequence[dict]:
    """SFT rows in the conversational format (one `messages` list per row, as TRL's SFT datasets hold
    them) as prompt / completion rows: the last message, the assistant's, is the completion, and the
    messages before it (a system message, earlier turns) its prompt. Rows that have the two columns,
    or no `messages`, are returned as they are (check_columns then names what is missing)."""
    # a column present but None is a column other rows have (same_columns): row 0 is still conversational, and a
    # row of the other format is the one named, not row 0 for lacking its prompt
    if not rows or rows[0].get(MESSAGES_COLUMN) is None or \
            all(rows[0].get(c) is not None for c in (prompt_column, completion_column)):
        return rows
    out = []
    for i, row in enumerate(rows):
        msgs = row.get(MESSAGES_COLUMN)
        if not (isinstance(msgs, list) and len(msgs) >= 2 and all(isinstance(m, dict) for m in msgs)):
            raise ValueError(f"{where}: {row_name(rows, i)}: {MESSAGES_COLUMN!r} must be a list of two or more {{'role', 'content'}} "
                             f"messages (the prompt's, then the assistant's answer); got {msgs!r:.80}")
        if msgs[-1].get("role") != "assistant":
            # the last message is what trains: a conversation ending on the user's turn would teach writing it
            raise ValueError(f"{where}: {row_name(rows, i)}: the last of its {MESSAGES_COLUMN!r} is trained on and must be the "
                             f"assistant's; its role is {msgs[-1].get('role')!r}")
        out.append({**{k: v for k, v in row.items() if k != MESSAGES_COLUMN},
                    prompt_column: msgs[:-1], completion_column: msgs[-1]})
    return FileRows(out, rows.source, rows.lines) if isinstance(rows, FileRows) else out


def check_columns(rows: Sequence[dict], columns: Sequence[str], where: str = "dataset",
                  options: Optional[dict[str, str]] = None):
    """Every row has a value (not None, not a float NaN) in every one of `columns`.

    All rows are checked, not just the first: a row with a hole would otherwise train on the text
    "None" (SFT) or fail with a KeyError in the middle of a run. NaN is pandas' hole (rows from
    DataFrame.to_dict("records")), which SFT trained on as the text "nan". `options`: column -> the option that
    names it (`prompt_column`), for the error to say what to set."""
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise ValueError(f"{where}{source_name(rows)} lacks column(s) {missing}; it has {sorted(rows[0])}"
                         f"{column_options_hint(missing, options)}")
    for i, row in enumerate(rows):
        holes = [c for c in columns if _no_value(row.get(c))]
        if holes:
            raise ValueError(f"{where}: {row_name(rows, i)} has no value for column(s) {holes}")


def _no_value(value) -> bool:
    """None, or a float NaN (numpy's too): a missing cell."""
    return value is None or (isinstance(value, float) and value != value)


_BUILDERS = {"json": "json", "parquet": "parquet", "csv": "csv"}  # file type -> datasets' loader


def _no_splits(path: str, split: Optional[str]):
    """A split other than "train" named for a source that has one set of rows: refused, or it would
    silently use every row (a test split asked for, the training rows read)."""
    if split not in (None, "train"):
        raise ValueError(f"dataset {path!r} has no splits (one file, or a saved Dataset), so split {split!r} cannot "
                         f"be taken from it; splits belong to a folder saved from a DatasetDict")


def hub_name_hint(path: str) -> str:
    """For a missing dataset path that reads like a Hub name ('openai/gsm8k', 'gsm8k': no file extension, not
    absolute, not ./ or ../): how to make it local, since r1fast never downloads."""
    from r1fast.models.checkpoint import HUB_ID

    if "." in os.path.basename(path) or not HUB_ID.fullmatch(path):
        return ""
    return (f"; r1fast reads local data only: to use a Hugging Face Hub dataset, save it first, e.g. "
            f"datasets.load_dataset({path!r}).save_to_disk('my_data') and give dataset=my_data")


def _load_hf(path: str, split: Optional[str], default_splits: Sequence[str] = TRAIN_SPLITS) -> list[dict]:
    if not os.path.exists(path):
        raise ValueError(f"dataset {path!r} does not exist (give a .jsonl/.json/.parquet/.csv file, a folder "
                         f"saved with datasets' save_to_disk, or builtin:arithmetic{hub_name_hint(path)})")
    # the file name's extension: the whole path's last dot read "./data/prompts" as the file type "/data/prompts"
    name = os.path.basename(path)
    ext = (name.rsplit(".", 1)[-1].lower() if "." in name else "") if not os.path.isdir(path) else None
    if ext is not None:  # a file has one set of rows
        _no_splits(path, split)
    if ext == "jsonl":  # read directly: no `datasets` needed
        return _read_jsonl(path)
    if ext is not None and ext not in _BUILDERS:
        what = f"unknown file type .{ext}" if ext else "a file without an extension"
        raise ValueError(f"dataset {path!r}: {what} (use .jsonl, .json, .parquet or .csv)")
    try:
        import datasets
    except ImportError:
        raise ValueError(f"dataset {path!r}: reading {'a saved dataset folder' if ext is None else '.' + ext} "
                         f"needs the `datasets` package (pip install datasets), or give a .jsonl file") from None
    if ext is None:
        ds = _load_saved(datasets, path, split, default_splits)
        if ds is None:
            return []   # load_rows names the empty dataset
    else:
        builder = _BUILDERS[ext]
        if os.path.getsize(path) == 0:   # datasets' own word for it was "StopIteration" (.json) or an Arrow error
            raise ValueError(f"dataset {path!r} is empty (a file of 0 bytes)")
        if _parquet_without_rows(path, ext):   # datasets failed on it with "BatchSize must be greater than 0"
            raise ValueError(f"dataset {path!r} is empty (a parquet file of 0 rows)")
        return _read_file(datasets, path, ext, builder)
    return dataset_as_rows(ds)


# A .csv cell is missing when it is empty, as a JSON null or a parquet null is: pandas' default also read the
# texts "None", "NA", "nan", "null", "N/A" (and a dozen more) as missing, so a question whose answer is "None" was a
# row without an answer (an error, or left out of the accuracy), where the same row in JSON had the answer "None".
CSV_MISSING = {"keep_default_na": False, "na_values": [""]}


def csv_as_text(path: str) -> dict:
    """read_csv's `converters` that keep every cell of the .csv at `path` as its text, as a JSON string is kept: pandas
    typed each column by its cells, so a column of 3, (empty), 5 was read as floats and its gold "3" became "3.0"
    (an SFT completion trained on "3.0"), 2 beside 2.5 became "2.0", 007 became 7, and True/False cells were booleans;
    and it typed each block of 10,000 rows alone, so a column of numbers whose row 10,001 is a word failed to read.
    One converter per field of the header, and one more for a row with a field more (_refuse_shifted_csv names it)."""
    import csv

    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        header = next(csv.reader(f), [])
    return {"converters": {i: str for i in range(len(header) + 1)}}


def _read_file(datasets, path: str, ext: str, builder: str) -> list[dict]:
    """A .json/.csv/.parquet file's rows, read by datasets into a cache folder of this call's own, removed after.
    datasets' shared cache of a local file is keyed by its path and mtime alone, so a file rewritten within its
    mtime's resolution (or given its old mtime back: cp -p, rsync -t) gave its old rows, and a rebuild forced there
    could remove the cache that another run reading the same file was about to open."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="r1fast-data-", ignore_cleanup_errors=True) as cache:
        try:
            ds = datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache,
                                       **({**CSV_MISSING, **csv_as_text(path)} if ext == "csv" else {}))
        except Exception as e:   # datasets wraps the parser's error; its innermost cause says what is wrong
            cause = _root_cause(e)
            if "corresponds to no data" in cause:   # a .json of [], a .csv of its header alone: no rows to split
                raise ValueError(f"dataset {path!r} is empty (a .{ext} file without rows)") from None
            problem = _json_file_problem(path) if ext == "json" else None
            if problem:
                raise ValueError(problem) from None
            raise ValueError(f"dataset {path!r}: cannot read it as .{ext}: {cause}") from None
        if ext == "csv":
            _refuse_shifted_csv(path, ds.column_names)
        return dataset_as_rows(ds)   # read whole while its cache is there


def _load_saved(datasets, path: str, split: Optional[str], default_splits: Sequence[str]):
    """The Dataset of a folder written by save_to_disk, or of the chosen split of a saved DatasetDict, each split
    read alone: datasets cannot open a Dataset saved with no rows (it wrote no data file, and an IndexError came
    from inside datasets), nor so a DatasetDict holding one, even to read another of its splits. None for no rows."""
    from datasets import config

    dict_file = os.path.join(path, config.DATASETDICT_JSON_FILENAME)
    if not os.path.isfile(os.path.join(path, config.DATASET_STATE_JSON_FILENAME)) and os.path.isfile(dict_file):
        with open(dict_file, encoding="utf-8") as f:
            splits = list(json.load(f).get("splits", []))
        if not splits:
            return None
        split = split or next((s for s in default_splits if s in splits), splits[0])
        if split not in splits:
            raise ValueError(f"dataset {path!r} has no split {split!r}; splits: {splits}")
        ds = _load_saved_dataset(datasets, os.path.join(path, split), path)
        if ds is None:
            raise ValueError(f"dataset {path!r}: its split {split!r} has no rows")
        return ds
    _no_splits(path, split)
    return _load_saved_dataset(datasets, path, path)


def _load_saved_dataset(datasets, folder: str, path: str):
    """datasets.load_from_disk(folder), or None for a Dataset saved with no rows (its state lists no data files)."""
    try:
        with open(os.path.join(folder, datasets.config.DATASET_STATE_JSON_FILENAME), encoding="utf-8") as f:
            if json.load(f).get("_data_files") == []:
                return None
    except (OSError, ValueError, AttributeError):   # no state file (not a saved Dataset): load_from_disk says so
        pass
    try:
        return datasets.load_from_disk(folder)
    except FileNotFoundError as e:
        raise ValueError(f"dataset folder {path!r} was not written by datasets' save_to_disk: {e}") from None


def _json_file_problem(path: str) -> Optional[str]:
    """What is wrong with a .json file datasets could not read, found by Python's json: an array element or a JSON
    line that is not an object of columns, by its index or line (datasets said "JSON parse error: Column() changed
    from object to string in row 0" for [{...}, 5], "Trailing data" for JSON lines, "DataFrame constructor not
    properly called!" for a lone string); None when json finds nothing wrong."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            value = json.load(f)
    except OSError:
        return None
    except (ValueError, RecursionError):   # not one JSON value: read as JSON lines, each an object
        try:
            read_json_objects(path, f"dataset {path!r}")
        except ValueError as e:
            return str(e)
        return None
    if isinstance(value, list):
        bad = next((i for i, v in enumerate(value) if not isinstance(v, dict)), None)
        if bad is not None:
            return (f"dataset {path!r}: element {bad} of its JSON array: expected a JSON object, got "
                    f"{type(value[bad]).__name__}")
        return None
    if not isinstance(value, dict):
        return (f"dataset {path!r}: expected a JSON array of objects (one per row), or JSON lines, got "
                f"{type(value).__name__}")
    return None


def _parquet_without_rows(path: str, ext: str) -> bool:
    """A .parquet file whose footer says it holds no rows (False for any other file, or one pyarrow cannot read:
    datasets then says why)."""
    if ext != "parquet":
        return False
    try:
        import pyarrow.parquet as pq

        return pq.read_metadata(path).num_rows == 0
    except Exception:
        return False


def _refuse_shifted_csv(path: str, columns: Sequence[str]):
    """pandas reads a CSV whose rows have one field more than its header (a comma ending every line, an unquoted
    comma in a question) with its first column as row names, `__index_level_0__`: every column then holds the
    next one's values, the prompts the answers, without an error. Refused, naming the first such line."""
    if "__index_level_0__" not in columns:
        return
    import csv

    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        line = next((reader.line_num for row in reader if len(row) > len(header)), None)
    if line is None:   # the header names the column itself (a pandas index written out): the file's own
        return
    raise ValueError(f"dataset {path!r} line {line}: more fields than the {len(header)} of its header {header}, so its columns "
                     f"would be read shifted by one (the first as row names); remove a comma that ends the lines, or "
                     f"quote a field that holds a comma")


def dataset_as_rows(ds) -> list[dict]:
    """A datasets.Dataset's rows as dicts, as `ds[i]` gives them (its features decoded, its format's columns).
    Read as one batch of columns: row by row, each row was an Arrow query of its own (9 s for 100k rows;
    0.3 s so). A Dataset formatted for numpy/torch (set_format) is still read row by row: its batch would
    stack what its rows hold one by one."""
    fmt = getattr(ds, "format", None)
    if isinstance(fmt, dict) and fmt.get("type") is None:
        columns = ds[:]
        if columns:   # a Dataset without columns still has its (empty) rows
            names = list(columns)
            return [dict(zip(names, values)) for values in zip(*columns.values())]
    return [dict(ds[i]) for i in range(len(ds))]


def read_json_objects(path: str, what: str, being_written: bool = False,
                      lines: Optional[list[int]] = None) -> list[dict]:
    """The JSON objects of a JSON-lines file (blank lines skipped); a line that is not one is a
    ValueError naming `what` and the line number. being_written: a file another process is appending
    to, whose unterminated last line may be half-written; it is left out if it does not parse. `lines`, when given,
    gets each object's line number."""
    rows: list[dict] = []
    n = 0
    # utf-8-sig: a byte-order mark that Windows tools put first is skipped (it failed line 1 as "not valid JSON")
    with open(path, encoding="utf-8-sig") as f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    # without its line end: an object left open was "at column 1" of the line after it
                    row = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as e:   # e.g. a line cut short when a run was killed
                    if being_written and not line.endswith("\n"):
                        break
                    raise ValueError(f"{what} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
                except RecursionError:
                    raise ValueError(f"{what} line {n}: JSON nested too deeply to read") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{what} line {n}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
                if lines is not None:
                    lines.append(n)
        except UnicodeDecodeError:  # text mode decodes a block at a time: find the line in the bytes
            line, byte = _first_non_utf8_line(path)
            raise ValueError(f"{what} line {line}: not UTF-8 text (byte {byte!r}); save it as UTF-8") from None
    return rows


def _first_non_utf8_line(path: str) -> tuple[int, bytes]:
    """(line number, offending byte) of the first line of `path` that is not valid UTF-8."""
    n = 0
    with open(path, "rb") as f:
        for chunk in f:
            for raw in chunk.splitlines():  # \r, \n and \r\n end a line, as in text mode
                n += 1
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    return n, raw[e.start:e.start + 1]
    return n, b""  # not reached when text mode failed to decode the same bytes


def _read_jsonl(path: str) -> list[dict]:
    """JSON lines read directly, so a bad line is reported by number (datasets raises a bare
    DatasetGenerationError, and StopIteration for an empty file). Keys missing from a row are None,
    as datasets makes them."""
    lines: list[int] = []
    rows = read_json_objects(path, f"dataset {path!r}", lines=lines)
    return FileRows(same_columns(rows), path, lines)


def same_columns(rows: list[dict]) -> list[dict]:
    """Rows that all have every column any of them has, a missing one None, as a datasets.Dataset holds them.
    Rows of unequal keys passed a reward function the columns of whichever row a rollout drew first."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    if all(len(r) == len(keys) for r in rows):
        return rows
    return [{k: r.get(k) for k in keys} for r in rows]


def _root_cause(e: BaseException) -> str:
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


# The chat roles templates know (r1fast's built-in one renders the first three): any other role,
# "User" included, would be rendered as nothing, and the prompt's question silently lost.
CHAT_ROLES = ("system", "user", "assistant", "tool")

# chat_template_kwargs keys that r1fast's own apply_chat_template call sets, or that make it return something
# other than the prompt's text: given again they failed as "got multiple values for keyword argument".
RESERVED_TEMPLATE_KWARGS = ("conversation", "messages", "add_generation_prompt", "continue_final_message", "tokenize",
                            "return_dict", "return_tensors", "padding", "truncation", "max_length",
                            "return_assistant_tokens_mask", "tokenizer_kwargs")
# apply_chat_template's own arguments a template need not name to be given them
TEMPLATE_CALL_ARGS = ("tools", "documents", "chat_template", "sanitize_control_tokens")


def prompt_messages(prompt: Any, system_prompt: Optional[str]) -> list[dict]:
    if isinstance(prompt, str):
        msgs = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        msgs = list(prompt)
        for m in msgs:
            if m["role"] not in CHAT_ROLES or not isinstance(m["content"], str):
                raise ValueError(f"a prompt message needs a role among {CHAT_ROLES} and a string content; got "
                                 f"{m!r:.80}")
    else:
        raise ValueError(f"a prompt must be a string or a list of {{'role', 'content'}} messages; got {prompt!r:.80}")
    if system_prompt and not any(m["role"] == "system" for m in msgs):
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    for m in msgs:
        check_encodable(m["content"], "a prompt")
    return msgs


def check_encodable(text: str, what: str):
    """A lone surrogate ("\\ud83d": half of a UTF-16 pair, as JSON escapes an emoji cut in two) is no text a tokenizer
    encodes: tokenizers failed with "TextEncodeInput must be Union[TextInputSequence, ...]", a TypeError from a GRPO
    run's first rollout to draw the row (check_prompts had passed it) or from SFT's encoding, naming no row."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} holds {text[e.start]!r} at character {e.start}, half of a UTF-16 surrogate pair "
                         f"(a character cut in two), which is not text a tokenizer can encode; mend or drop the "
                         f"row") from None


def continues_answer(prompt: Any) -> bool:
    """A prompt that ends on the assistant's message: the start of its answer, which the completion continues
    (the template's generation prompt, and whatever it opens, is not added)."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[-1], dict) and \
        prompt[-1].get("role") == "assistant"


def prompt_text(tokenizer, prompt: Any, system_prompt: Optional[str] = None,
                chat_template_kwargs: Optional[dict] = None) -> str:
    """The text the model sees before its completion: the chat template when the tokenizer has one, else
    the messages' contents joined by newlines (a base model's raw prompt; check_prompts warns of roles lost).
    `chat_template_kwargs`: the template's own variables (Qwen3's `enable_thinking`), as TRL passes them."""
    msgs = prompt_messages(prompt, system_prompt)
    if getattr(tokenizer, "chat_template", None):
        # a prompt ending on the assistant's message is its answer's start (a prefill, "<think>"), continued as
        # TRL does: not closed with an end-of-turn and followed by a second, empty assistant turn
        prefill = continues_answer(msgs)
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=not prefill,
                                                 continue_final_message=prefill, **(chat_template_kwargs or {}))
        except Exception as e:   # a template's raise_exception ("System role not supported"): jinja's TemplateError
            roles = [m["role"] for m in msgs]
            raise ValueError(f"the tokenizer's chat template cannot render a prompt of roles {roles} "
                             f"({type(e).__name__}: {e})") from e
    return "\n".join(m["content"] for m in msgs)


def generation_prompt(tokenizer, chat_template_kwargs: Optional[dict] = None) -> str:
    """The text the chat template adds for `add_generation_prompt` (Qwen's "<|im_start|>assistant\n",
    R1-Distill's "<｜Assistant｜><think>\n"): a one-message conversation rendered with it, less the same
    rendered without it. "" without a chat template, or when the second is not the first's start."""
    if not getattr(tokenizer, "chat_template", None):
        return ""
    msgs = [{"role": "user", "content": "1+1="}]
    kwargs = chat_template_kwargs or {}
    opened = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kwargs)
    closed = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False, **kwargs)
    return opened[len(closed):] if opened.startswith(closed) else ""


THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def prefilled_think(tokenizer, chat_template_kwargs: Optional[dict] = None) -> str:
    """The reasoning block a chat template opens for the model ("<think>\n" for DeepSeek-R1-Distill's), or
    writes empty and closed (Qwen3's with enable_thinking: false, "<think>\n\n</think>\n\n"), its trailing
    whitespace included, or "": the model's completions start inside it, or after it, without it."""
    tail = generation_prompt(tokenizer, chat_template_kwargs)
    head = tail.rstrip()
    if head.endswith(THINK_OPEN):
        return tail[len(head) - len(THINK_OPEN):]
    start = head.rfind(THINK_OPEN)
    if head.endswith(THINK_CLOSE) and start >= 0 and not head[start + len(THINK_OPEN):-len(THINK_CLOSE)].strip():
        return tail[start:]
    return ""


def _template_marker(tokenizer, chat_template_kwargs: Optional[dict] = None) -> str:
    """The generation prompt, stripped, when it holds one of the tokenizer's added tokens ("<|im_start|>"):
    text a question cannot hold unless a template wrote it. A plain-text one ("Assistant:") is "", since a
    few-shot question may well contain it."""
    text = generation_prompt(tokenizer, chat_template_kwargs).strip()
    added = set(tokenizer.get_added_vocab()) if hasattr(tokenizer, "get_added_vocab") else set()
    added |= set(getattr(tokenizer, "all_special_tokens", ()))
    return text if any(tok and tok in text for tok in added) else ""


def _template_variables(template: str) -> Optional[set]:
    """The variables a Jinja chat template reads (messages, add_generation_prompt, enable_thinking...), or None
    when they cannot be listed (transformers' template environment is private; its tags differ by version)."""
    try:
        from jinja2 import meta
        from transformers.utils.chat_template_utils import _compile_jinja_template

        env = _compile_jinja_template(template).environment
        # less the environment's functions (namespace, raise_exception, strftime_now)
        return set(meta.find_undeclared_variables(env.parse(template))) - set(env.globals)
    except Exception:   # any failure only leaves the unread-key warning out
        return None


def warn_unread_template_kwargs(tokenizer, chat_template_kwargs: Optional[dict], where: str = "dataset"):
    """Warns of chat_template_kwargs that change nothing: a tokenizer without a chat template, or keys its
    template never reads (a misspelt `enable_thinkng` is ignored by Jinja, and the model thinks on)."""
    if not chat_template_kwargs:
        return
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        warnings.warn(f"{where}: chat_template_kwargs {sorted(chat_template_kwargs)} are not used: the tokenizer "
                      f"has no chat template", stacklevel=3)
        return
    read = _template_variables(template) if isinstance(template, str) else None
    if read is None:
        return
    # apply_chat_template's own arguments (tools, documents...) are not template variables it needs to read
    unread = sorted(k for k in chat_template_kwargs if k not in read and k not in TEMPLATE_CALL_ARGS)
    if unread:
        warnings.warn(f"{where}: the chat template does not read chat_template_kwargs {unread}, which change "
                      f"nothing; it reads {sorted(read - {'messages', 'add_generation_prompt'})}", stacklevel=3)


def _check_prefill(tokenizer, msgs: list[dict], chat_template_kwargs: Optional[dict], where: str):
    """Warns when the template closes a reasoning block before a prefilled assistant message: Qwen3's renders a
    final assistant message as "<think>\n\n</think>\n\n" + its content, so a "<think>" prefill is continued
    after a finished, empty reasoning (TRL renders it the same way)."""
    text = prompt_text(tokenizer, msgs, None, chat_template_kwargs)
    if text.count(THINK_CLOSE) > sum(m["content"].count(THINK_CLOSE) for m in msgs):
        closed = text[max(0, text.rfind(THINK_OPEN, 0, text.rfind(THINK_CLOSE))):]
        warnings.warn(f"{where}: the chat template closes a reasoning block before the prefilled assistant message "
                      f"{msgs[-1]['content']!r:.40}: the prompt ends {closed[-80:]!r}, so the model answers after an "
                      f"empty reasoning (Qwen3's template writes one before a final assistant message); leave the "
                      f"prefill out if the model opens {THINK_OPEN} itself", stacklevel=3)


def check_prompts(rows: Sequence[dict], column: str, tokenizer, system_prompt: Optional[str] = None,
                  where: str = "dataset", chat_template_kwargs: Optional[dict] = None):
    """Every row's prompt is one `encode_prompt` takes, and gives at least one token: an error naming
    the row before training, not when a step first draws it (GRPO encodes its prompts as it goes)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    empty_ok = has_template or bool(tokenizer("").input_ids)
    warn_unread_template_kwargs(tokenizer, chat_template_kwargs, where)
    # a prompt already rendered by the template (as TRL takes a string prompt: as it is) would be rendered
    # again inside a user turn: two BOS, two system headers, the generation prompt in the question. The
    # template's default rendering too: a prompt templated by hand seldom passed Qwen3's enable_thinking.
    markers = dict.fromkeys(m for m in (_template_marker(tokenizer, chat_template_kwargs),
                                        _template_marker(tokenizer)) if m)
    own_system = 0   # rows whose own system message keeps system_prompt out
    roles_lost = 0   # conversations that a tokenizer without a chat template reads as their contents alone
    prefill_checked = not has_template   # how the template renders a prefill: seen on the first one
    # a template that refuses some conversations (a system message, roles that do not alternate) failed only
    # when a step drew such a row, mid-run: each sequence of roles is rendered once here
    rendered_roles = set() if has_template else None
    for i, row in enumerate(rows):
        try:
            msgs = prompt_messages(row[column], system_prompt)
            roles = tuple(m["role"] for m in msgs)
            if rendered_roles is not None and roles not in rendered_roles:
                prompt_text(tokenizer, row[column], system_prompt, chat_template_kwargs)
                rendered_roles.add(roles)
        except ValueError as e:
            raise ValueError(f"{where}: {row_name(rows, i)}: {e}") from None
        own_system += bool(system_prompt) and not any(m["content"] == system_prompt and m["role"] == "system"
                                                      for m in msgs)
        roles_lost += len(msgs) > 1 and not has_template
        templated = next((t for t in markers if any(t in m["content"] for m in msgs)), None)
        if templated:
            raise ValueError(f"{where}: row {i}'s prompt{file_line(rows, i)} already holds the chat template's generation prompt "
                             f"{templated!r}: it was templated before, and r1fast applies the tokenizer's chat "
                             f"template to every prompt, so it would be templated twice; give the question alone "
                             f"(a string) or its messages (a list of {{'role', 'content'}} dicts)")
        if not prefill_checked and continues_answer(msgs):
            prefill_checked = True
            _check_prefill(tokenizer, msgs, chat_template_kwargs, where)
        if not empty_ok and not any(m["content"] for m in msgs):
            raise ValueError(f"{where}: row {i}'s prompt{file_line(rows, i)} is empty, and the tokenizer has no chat template and adds no "
                             f"BOS token, so it encodes to no tokens: nothing to start a completion from")
    if roles_lost:
        warnings.warn(f"{where}: the tokenizer has no chat template, so {roles_lost} of {len(rows)} prompts of "
                      f"several messages are read as their contents joined by newlines, without roles or an "
                      f"assistant turn to answer in; set tokenizer.chat_template (or save one in the model's "
                      f"tokenizer_config.json) for conversational data", stacklevel=2)
    if own_system:
        # its instructions (the answer format, say) would be missing from those rows without a word
        warnings.warn(f"{where}: system_prompt is not used for {own_system} of {len(rows)} rows, whose prompts have "
                      f"their own system message (theirs is kept, not both)", stacklevel=2)


def encode_prompt(tokenizer, prompt: Any, system_prompt: Optional[str] = None,
                  chat_template_kwargs: Optional[dict] = None) -> list[int]:
    """A prompt's token ids, whole: callers cut a long one to its end themselves, so as to say so
    (warn_cut_prompts)."""
    text = prompt_text(tokenizer, prompt, system_prompt, chat_template_kwargs)
    ids = tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None)).input_ids
    _warn_unknown(tokenizer, text, ids)
    return ids


def prompt_limit(max_prompt_length: int, positions: int) -> tuple[int, str]:
    """The tokens a prompt keeps, and what sets that number in the user's words: max_prompt_length, else all but
    one of the model's `positions` (a longer prompt could not get a single completion token)."""
    if isinstance(max_prompt_length, bool) or not isinstance(max_prompt_length, numbers.Integral) \
            or max_prompt_length < 1:
        # evaluate_accuracy's own: 0 kept whole prompts (ids[-0:]) while warning they kept 0 tokens, -5 cut their
        # first 5 tokens, 2.5 failed the slice
        raise ValueError(f"max_prompt_length must be a whole number >= 1; got {max_prompt_length!r}")
    if max_prompt_length <= positions - 1:
        return max_prompt_length, "max_prompt_length"
    return positions - 1, f"the model's {positions} positions less one"


def warn_cut_prompts(where: str, first_row: int, length: int, max_length: int, how_many: str = "",
                     limit: str = "max_prompt_length"):
    """Prompts past `max_length` tokens keep their last ones: their start (the template's first header, a system
    prompt, a few-shot example) never reaches the model. TRL 1.x has no max_prompt_length and feeds a prompt
    whole, so a dataset moved from it would be cut without a word: say so, naming the first such row.
    `limit`: what sets max_length, in the user's words (prompt_limit)."""
    # where the model's positions set the cap, a larger max_prompt_length changes nothing
    remedy = ("shorten them, or raise max_prompt_length if the model has the positions"
              if limit == "max_prompt_length" else "shorten them: the model has no more positions")
    warnings.warn(f"{where}: {how_many}the prompt of row {first_row} has {length} tokens, more than the {max_length} "
                  f"a prompt keeps ({limit}): such prompts keep their last {max_length} tokens and lose their start "
                  f"(a system prompt, the chat template's first header); {remedy}", stacklevel=3)


def encode_prompts(tokenizer, rows: Sequence[dict], column: str, system_prompt: Optional[str] = None,
                   max_length: Optional[int] = None, chat_template_kwargs: Optional[dict] = None,
                   where: str = "dataset", limit: str = "max_prompt_length") -> list[list[int]]:
    """encode_prompt of every row's `column`; a prompt the chat template refuses is an error naming its row.
    Prompts cut to `max_length` are counted in a warning (warn_cut_prompts; `limit`: what sets max_length)."""
    out, cut = [], []
    for i, row in enumerate(rows):
        try:
            ids = encode_prompt(tokenizer, row[column], system_prompt, chat_template_kwargs)
        except ValueError as e:
            raise ValueError(f"{where}: {row_name(rows, i)}: {e}") from None
        if max_length is not None and len(ids) > max_length:
            cut.append((i, len(ids)))
            ids = ids[-max_length:]
        out.append(ids)
    if cut:
        warn_cut_prompts(where, *cut[0], max_length, f"{len(cut)} of {len(rows)} prompts are cut: ", limit)
    return out


def encode_completion(tokenizer, completion: Any, prefilled: str = "") -> list[int]:
    """Token ids of a target completion, ending with the end-of-sequence token. A completion is text
    (a number is its digits; a boolean is refused, _completion_text), or an assistant message (a
    dict, or a list of them whose last one is the completion) with string content.

    prefilled: what the prompt's generation prompt already opened (`prefilled_think`: R1-Distill's
    "<think>\n"); a completion that opens it again (the assistant's whole turn, as a `messages` row or a
    sample of such a model holds it) starts after it instead, so the block is not opened twice."""
    # only a list of messages stands for its last one: of ["a", "b"], "b" alone would be trained on
    if isinstance(completion, list) and completion and all(isinstance(m, dict) for m in completion):
        completion = completion[-1]
    if isinstance(completion, dict) and completion.get("role", "assistant") != "assistant":
        # a conversation ending on the user's turn (or swapped columns) would train the model to write the user's text
        raise ValueError(f"a completion message must be the assistant's; got role {completion.get('role')!r}")
    if isinstance(completion, dict) and isinstance(completion.get("content"), str):
        completion = completion["content"]
    elif isinstance(completion, (list, dict, tuple)):   # its repr would be trained on, "[{'type': 'text', ..."
        raise ValueError(f"a completion must be a string or a list of {{'role', 'content'}} messages with string "
                         f"content; got {completion!r:.80}")
    completion = _after_prefill(_completion_text(completion), prefilled)
    check_encodable(completion, "a completion")
    ids = tokenizer(completion, add_special_tokens=False).input_ids
    _warn_unknown(tokenizer, completion, ids)
    # a completion written with its EOS (data from another tool) gets no second one, as TRL appends it only where
    # it is missing: a second trains writing EOS after EOS and counts in the loss's token mean
    if tokenizer.eos_token_id is not None and ids[-1:] != [tokenizer.eos_token_id]:
        ids = ids + [tokenizer.eos_token_id]
    return ids


def _completion_text(completion: Any) -> str:
    """A completion's text: a string as it is, a number as its digits (a JSON or parquet number).
    A boolean is refused, as a prompt that is not text is: it trained on Python's "True", which a JSON `true` does
    not spell, so no text of it is surely the data's. Bytes (a parquet binary column) and other objects trained on
    their repr, "b'...'"."""
    if isinstance(completion, str):
        return completion
    refuse_boolean(completion, "a completion must be text (or a number); got")
    if isinstance(completion, (numbers.Real, decimal.Decimal)):
        return str(completion)
    raise ValueError(f"a completion must be text (or a number); got a {type(completion).__name__} "
                     f"({completion!r:.40}): write it as a string")


def refuse_boolean(value, said: str, why: str = "whose text the data does not say"):
    """A ValueError for a boolean `value` (Python's, or numpy's bool_ of a Dataset formatted for numpy) where text is
    read, an SFT completion or a reference answer: "<said> the boolean True, <why> (...): write it as a string". Its
    text would be Python's "True", which a JSON `true` does not spell."""
    if type(value).__name__ in ("bool", "bool_"):
        raise ValueError(f"{said} the boolean {value}, {why} (JSON true, a parquet boolean): write it as a string, "
                         f"in JSON in quotes (\"true\")")


def _after_prefill(text: str, prefilled: str) -> str:
    """`text` less a leading `prefilled` tag (and the whitespace the prompt puts after it)."""
    tag = prefilled.strip()
    if not tag or not text.lstrip().startswith(tag):
        return text
    rest = text.lstrip()[len(tag):]
    space = prefilled[len(prefilled.rstrip()):]
    return rest[len(space):] if space and rest.startswith(space) else rest


_WARNED_UNKNOWN: set[str] = set()


def _warn_unknown(tokenizer, text: str, ids: Sequence[int]):
    """Characters the tokenizer maps to its unknown token (the built-in character tokenizer knows
    printable ASCII only) are read and written by the model as <unk>: say which, once each."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or unk not in ids:
        return
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        chars = {text[a:b] for i, (a, b) in zip(enc.input_ids, enc.offset_mapping) if i == unk}
    except Exception:   # a slow tokenizer has no offsets
        chars = {"?"}
    chars -= {tokenizer.unk_token} | _WARNED_UNKNOWN   # the literal text "<unk>" is the token itself
    if chars:
        _WARNED_UNKNOWN.update(chars)
        warnings.warn(f"the tokenizer has no token for {', '.join(map(repr, sorted(chars)))} (in {text[:60]!r}): "
                      f"the model sees and writes {tokenizer.unk_token} instead", stacklevel=3)


def decode_completion(tokenizer, ids: Sequence[int], stop_ids: Sequence[int] = ()) -> str:
    """Completion text with end/padding tokens removed but reasoning tags (special or not) kept.

    stop_ids: what ended the generation (`stop_token_ids(tokenizer, model.eos_token_ids)`: the
    model's eos ids too, e.g. Llama 3's <|end_of_text|> and <|eom_id|> beside the tokenizer's
    <|eot_id|>): a completion's final one is dropped, so the rewards and a rejection-sampled row never
    see it as text. The text is the tokens' own: transformers' clean_up_tokenization_spaces (on in
    Llama 3's tokenizer_config.json) would turn "2 , 3" into "2, 3"."""
    ids = list(ids)
    if ids and ids[-1] in set(stop_ids):
        ids = ids[:-1]
    drop = {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id) if t is not None}
    return tokenizer.decode([i for i in ids if i not in drop], skip_special_tokens=False,
                            clean_up_tokenization_spaces=False)


def decode_completions(tokenizer, completions: Sequence[Sequence[int]], stop_ids: Sequence[int] = ()) -> list[str]:
    """[decode_completion(tokenizer, ids, stop_ids) for ids in completions], the same texts, decoded in one call
    of the Rust tokenizer where that is what tokenizer.decode does (a transformers fast tokenizer whose decode no
    subclass changes): it decodes the batch on every core, where a rollout's 512 completions of 512 tokens, one
    tokenizer.decode each, took ~250 ms of one core (to_py_obj walking every id, then one Rust call per
    completion) while the GPU waited for the rewards."""
    batch = _batch_decoder(tokenizer)
    if batch is None:
        return [decode_completion(tokenizer, ids, stop_ids) for ids in completions]
    stops = set(stop_ids)
    drop = [t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id) if t is not None]
    kept = []
    for ids in completions:
        ids = list(ids)
        if ids and ids[-1] in stops:
            ids = ids[:-1]
        if any(ids.count(t) for t in drop):   # rare (a bos or pad sampled mid-completion): list.count is C-fast
            ids = [i for i in ids if i not in drop]
        kept.append(ids)
    return batch(kept, skip_special_tokens=False)


def _batch_decoder(tokenizer):
    """The Rust tokenizer's decode_batch when tokenizer.decode(ids, skip_special_tokens=False,
    clean_up_tokenization_spaces=False) is exactly its decode of ids: a transformers fast tokenizer whose decode
    and _decode are the library's own; else None (a slow or custom tokenizer decodes one completion at a time)."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    cls = type(tokenizer)
    # a decode set on the instance (a wrapper, a test's stand-in) is what decode_completion would call
    if not isinstance(tokenizer, PreTrainedTokenizerFast) or not hasattr(backend, "decode_batch") or any(
            getattr(cls, name, None) is not getattr(PreTrainedTokenizerFast, name, None) or name in vars(tokenizer)
            for name in ("decode", "_decode")):
        return None
    return backend.decode_batch


def stop_token_ids(tokenizer, model_eos=None, extra: Sequence[int] = ()) -> list[int]:
    """The tokenizer's eos id(s); with model_eos (the model's eos ids, `CausalLM.eos_token_ids`: an id or a
    list, at which the rollout engine stops too) also those: every token a completion can end with.
    `extra`: the ids of the `stop_tokens` option (`resolve_stop_tokens`), after them."""
    ids = []
    for t in (tokenizer.eos_token_id, model_eos, list(extra)):
        for i in (t if isinstance(t, (list, tuple)) else [t]):
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def resolve_stop_tokens(tokenizer, texts: Optional[Sequence[str]], option: str = "stop_tokens") -> list[int]:
    """The token ids of the `stop_tokens` option: each text must be exactly one token of the tokenizer
    (Qwen's "<|im_end|>"); one that encodes to several tokens, none, or the unknown token would stop at
    something else than the user meant, so it is an error naming the text and what it encodes to. A lone
    string is one token's text (iterated, "<|im_end|>" stopped at each of its characters: '<', '|', ...)."""
    ids = []
    for text in [texts] if isinstance(texts, str) else texts or ():
        encoded = tokenizer(text, add_special_tokens=False).input_ids
        unknown = len(encoded) == 1 and encoded[0] == getattr(tokenizer, "unk_token_id", None) \
            and text != tokenizer.unk_token
        if len(encoded) != 1 or unknown:
            pieces = tokenizer.convert_ids_to_tokens(encoded)
            what = "the unknown token" if unknown else f"{len(encoded)} tokens {pieces} (ids {encoded})"
            raise ValueError(f"option {option!r}: {text!r} must be exactly one token of the tokenizer, but it "
                             f"encodes to {what}; give the text of a single token, such as a special token of "
                             f"the chat template")
        ids.append(int(encoded[0]))
    return ids


_TURN_PROBE = "r1fast stop probe"
_WARNED_TURN_END: set[tuple[str, str]] = set()   # (token, option)


def turn_end_token(tokenizer, chat_template_kwargs: Optional[dict] = None) -> Optional[tuple[str, int]]:
    """(text, id) of the special token the chat template closes an assistant turn with (Qwen's <|im_end|>,
    Llama 3's <|eot_id|>), found by rendering a one-exchange conversation; None without a template, when it
    cannot render one, or when what follows the assistant's content is not a special token."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _TURN_PROBE}]
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, **(chat_template_kwargs or {}))
    except Exception:   # a template that refuses such a conversation: nothing to say about it
        return None
    at = text.rfind(_TURN_PROBE)
    if at < 0:
        return None
    after = text[at + len(_TURN_PROBE):].lstrip()
    specials = {t.content: i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    starts = [s for s in specials if s and after.startswith(s)]
    if not starts:
        return None
    token = max(starts, key=len)
    return token, specials[token]


def warn_unstopped_turn_end(tokenizer, end_ids: Sequence[int], option: str = "stop_tokens",
                            chat_template_kwargs: Optional[dict] = None):
    """Once per token and option: the chat template ends an assistant turn with a special token the completions
    do not stop at (a base Qwen2.5's tokenizer stops at <|endoftext|>, its template ends turns with <|im_end|>),
    so a model that learned the template writes past its turn until max_completion_length. `option` is the one
    that adds stops where the completions are drawn: a pipeline's stages and its evaluation each have their own
    (`<stage>.stop_tokens`, `eval_stop_tokens`), so each is named once, not only the first to draw."""
    found = turn_end_token(tokenizer, chat_template_kwargs)
    if found is None or found[1] in set(end_ids) or (found[0], option) in _WARNED_TURN_END:
        return
    _WARNED_TURN_END.add((found[0], option))
    stops = tokenizer.convert_ids_to_tokens(list(end_ids))
    # a pipeline stage's option (grpo.stop_tokens) is shown as the override that sets it, shell-quoted
    example = shlex.quote(f"{option}={json.dumps([found[0]])}") if "." in option else f"{option}: [{found[0]!r}]"
    where = f" pipeline stage {option.split('.')[0]!r}:" if "." in option else ""
    warnings.warn(f"r1fast:{where} the chat template ends the assistant's turn with {found[0]!r} (id {found[1]}), but "
                  f"completions stop only at {stops}: a model that closes its turn with {found[0]!r} goes on "
                  f"writing until the length limit; add it to the option {option!r} ({example}) to stop there",
                  stacklevel=3)
