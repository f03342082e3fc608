"""Regressions found by a randomized differential sweep of dataset loading, prompts and reward columns
against an independent reader (json, pyarrow) and transformers' own apply_chat_template."""
import json
import os
import re

import pytest

from r1fast.data import build_char_tokenizer
from r1fast.models import CausalLM, ModelConfig
from r1fast.trainer import GRPOConfig, GRPOTrainer


def _tiny_model():
    tok = build_char_tokenizer()
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=64, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id)
    model = CausalLM(cfg)
    model.reset_parameters(seed=0)
    return model, tok


@pytest.mark.parametrize("seed", [0, 7])
def test_builtin_train_dataset_given_as_an_argument_leaves_out_the_held_out_prompts(tmp_path, seed):
    # GRPOTrainer(model, rewards, "builtin:arithmetic", cfg) with a built-in eval_dataset: the held-out prompts
    # were kept out of training only when the task came from cfg.dataset, so ~9% of them were trained on
    model, tok = _tiny_model()
    cfg = GRPOConfig(eval_dataset="builtin:arithmetic", eval_size=200, seed=seed, per_device_train_batch_size=8,
                     num_generations=4, output_dir=str(tmp_path / "e"), progress_bar=False)
    tr = GRPOTrainer(model, ["format"], "builtin:arithmetic", cfg, tokenizer=tok)
    held = {r["prompt"] for r in tr.eval_rows}
    assert len(held) > 100 and not held & {r["prompt"] for r in tr.train_rows}
    assert 900 < len(tr.train_rows) < 1000   # the draw less its held-out prompts, not an empty or whole one


def test_a_file_without_an_extension_is_named_by_its_own_name_not_the_path_after_a_dot(tmp_path):
    # the extension was the whole path's last dot onward: "./my.data/prompts" was "unknown file type .data/prompts"
    from r1fast.data import load_rows

    folder = tmp_path / "my.data"
    folder.mkdir()
    (folder / "prompts").write_text('{"prompt": "1+1="}\n')
    with pytest.raises(ValueError, match=r"prompts': a file without an extension \(use \.jsonl, \.json, \.parquet "
                                         r"or \.csv\)$"):
        load_rows(str(folder / "prompts"))
    (folder / "prompts.TXT").write_text("x")
    with pytest.raises(ValueError, match=r"unknown file type \.txt \("):
        load_rows(str(folder / "prompts.TXT"))


@pytest.mark.parametrize("name, content", [
    ("e.json", ""), ("e.csv", ""), ("e.parquet", ""), ("e.jsonl", ""),   # 0 bytes
    ("a.json", "[]"), ("h.csv", "prompt,answer\n"), ("z.parquet", None),   # no rows
])
def test_an_empty_file_is_said_to_be_empty_not_the_parsers_error(tmp_path, name, content):
    # datasets' errors were passed on: "cannot read it as .json: StopIteration", ".parquet: ArrowInvalid: BatchSize
    # must be greater than 0, got 0", ".csv: ValueError: Instruction "train" corresponds to no data!"
    pytest.importorskip("datasets")
    from r1fast.data import load_rows

    path = tmp_path / name
    if content is None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.int64())}), path)
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=rf"^dataset '{re.escape(str(path))}' is empty( \(a .*\))?$"):
        load_rows(str(path))


def test_a_saved_dataset_without_rows_is_named_and_a_dataset_dicts_other_splits_still_read(tmp_path):
    # datasets.load_from_disk raises an IndexError from inside datasets for a Dataset saved with 0 rows, and for a
    # DatasetDict holding one, even to read another split: a filter that kept no test rows made the train split
    # unreadable
    datasets = pytest.importorskip("datasets")
    from r1fast.data import load_rows

    datasets.Dataset.from_dict({"prompt": [], "answer": []}).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"^dataset '.*empty' is empty$"):
        load_rows(str(tmp_path / "empty"))
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(5)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_dict({"prompt": [], "answer": []})}).save_to_disk(
        str(tmp_path / "dd"))
    assert load_rows(str(tmp_path / "dd")) == rows
    assert load_rows(str(tmp_path / "dd"), split="train") == rows
    with pytest.raises(ValueError, match=r"^dataset '.*dd': its split 'test' has no rows$"):
        load_rows(str(tmp_path / "dd"), split="test")
    with pytest.raises(ValueError, match=r"has no split 'validation'; splits: \['train', 'test'\]$"):
        load_rows(str(tmp_path / "dd"), split="validation")


@pytest.mark.parametrize("text, said", [
    ('[{"prompt": "1+1="}, 5]', r": element 1 of its JSON array: expected a JSON object, got int$"),
    ('[{"prompt": "1+1="}, {"prompt": "2+2="}, ["3+3="]]', r": element 2 of its JSON array: expected a JSON object, "
                                                           r"got list$"),
    ('{"prompt": "1+1="}\n\n5\n', r" line 3: expected a JSON object, got int$"),
    ('"1+1="', r": expected a JSON array of objects \(one per row\), or JSON lines, got str$"),
])
def test_a_json_file_whose_row_is_not_an_object_names_that_row(tmp_path, text, said):
    # datasets' errors were passed on: "JSON parse error: Column() changed from object to string in row 0" (the
    # wrong row), "Trailing data at position 15", "DataFrame constructor not properly called!"
    pytest.importorskip("datasets")
    from r1fast.data import load_rows

    path = tmp_path / "d.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"^dataset '{re.escape(str(path))}'" + said):
        load_rows(str(path))


def test_a_lone_surrogate_in_a_prompt_or_completion_is_an_error_naming_its_row_before_training(tmp_path):
    # JSON's "\ud83d" (an emoji cut in two) reads as a lone surrogate, which tokenizers cannot encode: check_prompts
    # passed it, and the first rollout to draw the row failed with tokenizers' "TextEncodeInput must be Union[...]"
    # TypeError (SFT's encoding too), naming no row
    from r1fast.trainer import SFTConfig, SFTTrainer

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2", "answer": "2"}\n\n'
                    '{"prompt": "2+2= \\ud83d", "completion": "4", "answer": "4"}\n')
    model, tok = _tiny_model()
    cfg = GRPOConfig(dataset=str(data), per_device_train_batch_size=4, num_generations=2,
                     output_dir=str(tmp_path / "g"), progress_bar=False)
    with pytest.raises(ValueError, match=r"^train dataset: row 1 \('.*d.jsonl' line 3\): a prompt holds '\\ud83d' at "
                                         r"character 5, half of a UTF-16 surrogate pair"):
        GRPOTrainer(model, ["format"], None, cfg, tokenizer=tok)
    rows = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "3+3=", "completion": "6\udc00"}]
    with pytest.raises(ValueError, match=r"^SFT dataset: row 1: a completion holds '\\udc00' at character 1"):
        SFTTrainer(model, tok, rows, SFTConfig(output_dir=str(tmp_path / "s"), progress_bar=False))


@pytest.mark.parametrize("ext", ["json", "csv", "parquet"])
def test_a_file_rewritten_with_its_old_mtime_is_read_afresh_not_from_datasets_cache(tmp_path, ext):
    # datasets caches a local file's rows under its path and mtime alone: a file rewritten with its old mtime (cp -p,
    # rsync -t, two writes within the filesystem's mtime resolution) gave the old prompts and answers, silently
    pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from r1fast.data import load_rows

    path = tmp_path / f"d.{ext}"

    def write(rows):
        if ext == "json":
            path.write_text(json.dumps(rows))
        elif ext == "csv":
            path.write_text("prompt,answer\n" + "".join(f"{r['prompt']},{r['answer']}\n" for r in rows))
        else:
            pq.write_table(pa.Table.from_pylist(rows), path)

    first = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(1, 4)]
    write(first)
    stamp = os.stat(path)
    assert [r["prompt"] for r in load_rows(str(path))] == [r["prompt"] for r in first]
    second = [{"prompt": f"{a}*{a}=", "answer": str(a * a)} for a in range(5, 8)]
    write(second)
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    got = load_rows(str(path))
    assert [r["prompt"] for r in got] == [r["prompt"] for r in second]
    assert [str(r["answer"]) for r in got] == [r["answer"] for r in second]


def test_a_nan_completion_or_prompt_is_a_row_without_a_value_not_the_text_nan(tmp_path):
    # rows from a pandas DataFrame (to_dict("records")) hold NaN for a missing cell: SFT trained on the text "nan" as
    # the completion, and a NaN prompt was "a prompt must be a string ...; got nan" rather than a missing value
    import numpy as np

    from r1fast.data import check_columns
    from r1fast.trainer import SFTConfig, SFTTrainer

    model, tok = _tiny_model()
    rows = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": "4"},
            {"prompt": "3+3=", "completion": float("nan")}]
    with pytest.raises(ValueError, match=r"^SFT dataset: row 2 has no value for column\(s\) \['completion'\]$"):
        SFTTrainer(model, tok, rows, SFTConfig(output_dir=str(tmp_path / "s"), progress_bar=False))
    with pytest.raises(ValueError, match=r"^train dataset: row 1 has no value for column\(s\) \['prompt'\]$"):
        check_columns([{"prompt": "1+1="}, {"prompt": np.float64("nan")}], ("prompt",), "train dataset")
    check_columns([{"prompt": "1+1=", "completion": 0.0}], ("prompt", "completion"))   # a number is a value


# pandas' default missing-value texts (its STR_NA_VALUES), each a literal answer a question can have
_NA_TEXTS = ["None", "NA", "nan", "NaN", "null", "NULL", "N/A", "n/a", "#N/A", "<NA>", "-nan", "1.#QNAN"]


def test_a_csv_answer_that_reads_none_or_na_is_that_text_and_only_an_empty_cell_is_missing(tmp_path):
    # pandas read the texts "None", "NA", "nan", ... as missing: a question whose answer is "None" had no answer in a
    # .csv file, and the same row in .jsonl / .json / .parquet had the answer "None". Now every format agrees: a JSON or
    # parquet null, or an empty .csv cell, is missing; a text is the text.
    import csv

    pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from r1fast.data import check_columns, load_rows

    texts = _NA_TEXTS + ["5", "x"]
    want = [{"prompt": f"q{i}", "answer": t} for i, t in enumerate(texts)] + [{"prompt": "q-empty", "answer": None}]
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "answer"])
        w.writerows([r["prompt"], "" if r["answer"] is None else r["answer"]] for r in want)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in want))
    (tmp_path / "d.json").write_text(json.dumps(want))
    pq.write_table(pa.Table.from_pylist(want), tmp_path / "d.parquet")
    for name in ("d.csv", "d.jsonl", "d.json", "d.parquet"):
        assert list(load_rows(str(tmp_path / name))) == want, name
        with pytest.raises(ValueError, match=rf"^dataset: row {len(texts)} \(of .*{name}'\) has no value for column"
                                             r"\(s\) \['answer'\]$" if name != "d.jsonl" else
                           rf"^dataset: row {len(texts)} \(.*d.jsonl' line {len(want)}\) has no value"):
            check_columns(load_rows(str(tmp_path / name)), ("answer",))


def test_a_csv_cell_is_its_text_in_a_column_of_numbers_with_an_empty_cell_too(tmp_path):
    # pandas typed each .csv column by its cells: a column of whole numbers with an empty cell was read as floats, so
    # the gold "3" was "3.0" and an SFT completion trained on "3.0"; 2 beside 2.5 was "2.0", 007 was 7, True a boolean
    # (refused as a gold). The same rows in .jsonl (strings) / .json / .parquet kept their text; every format agrees now.
    import csv
    import random

    pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from r1fast.data import load_rows

    rng = random.Random(11)
    whole = [str(rng.randrange(1, 10**6)) for _ in range(4)]
    # each column of cells pandas would type: whole numbers, decimals, booleans
    texts = {"prompt": [str(rng.randrange(1, 100)), "", str(rng.randrange(1, 100)), "0" + whole[0], "8"],
             "answer": [whole[1], "", whole[2], "007", f"{rng.randrange(1, 99)}.5"],
             "completion": [whole[3], "", "2", "2.50", "-0"],
             "solution": ["True", "", "FALSE", "true", "False"]}
    want = [{c: (texts[c][i] or None) for c in texts} for i in range(5)]
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(texts))
        w.writerows([r[c] or "" for c in texts] for r in want)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in want))
    (tmp_path / "d.json").write_text(json.dumps(want))
    pq.write_table(pa.Table.from_pylist(want), tmp_path / "d.parquet")
    for name in ("d.csv", "d.jsonl", "d.json", "d.parquet"):
        assert list(load_rows(str(tmp_path / name))) == want, name
    # pandas typed each block of 10,000 rows alone: a column of numbers whose row 10,001 is a word failed to read
    (tmp_path / "long.csv").write_text("prompt,answer\n" + "".join(f"q{i},{i}\n" for i in range(10_000)) + "q,x\n")
    rows = load_rows(str(tmp_path / "long.csv"))
    assert (rows[0]["answer"], rows[9_999]["answer"], rows[-1]["answer"]) == ("0", "9999", "x")
