"""`r1fast sample dataset=-`: the prompts piped to the command, read as a .jsonl dataset is."""
import io
import json
import os
import random
import subprocess
import sys

import pytest

from r1fast.cli import main

_OPTIONS = ["model_name_or_path=builtin:micro", "num_samples=2", "max_completion_length=4", "keep_truncated=true",
            "reward_thresholds=[0]", "reward_funcs=[format]", "progress_bar=false", "device=cpu"]


def _sample(args: list[str], piped: bytes, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r1fast", "sample", *_OPTIONS, *args], input=piped, cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300, env={**os.environ})


def _prompts(n: int) -> list[dict]:
    rng = random.Random()
    pairs = [(rng.randint(1, 99), rng.randint(1, 99)) for _ in range(n)]
    return [{"prompt": f"What is {a}+{b}?", "answer": str(a + b), "id": rng.randint(1, 10**6)} for a, b in pairs]


def _kept_as_piped(folder, rows: list[dict]):
    kept = [json.loads(line) for line in (folder / "kept.jsonl").read_text().splitlines()]
    # one sample a prompt (keep_per_prompt=1), every prompt's row as piped, in its order
    assert [{k: r[k] for k in ("prompt", "answer", "id")} for r in kept] == rows
    record = json.loads((folder / "kept.jsonl.sample_stats.json").read_text())
    assert record["options"]["dataset"] == "-" and record["stats"]["prompts"] == len(rows)


def test_prompts_piped_to_sample_are_sampled_as_a_jsonl_files(tmp_path):
    # there was no way to pipe prompts in: dataset=- was refused as "expects str, got [None]" (YAML's list)
    rows = _prompts(3)
    piped = "\n".join(json.dumps(r) for r in rows).encode() + b"\n\n"   # a blank line, as a file may end
    done = _sample(["dataset=-", "output_file=kept.jsonl"], piped, tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    _kept_as_piped(tmp_path, rows)


@pytest.mark.parametrize("spelling", [["--dataset", "-"], ["--dataset=-"]])
def test_the_options_other_spellings_read_piped_prompts_too(spelling, tmp_path, monkeypatch):
    rows = _prompts(2)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", _Stdin("".join(json.dumps(r) + "\n" for r in rows).encode()))
    assert main(["sample", *_OPTIONS, *spelling, "output_file=kept.jsonl"]) == 0
    _kept_as_piped(tmp_path, rows)


def test_a_bad_piped_line_is_named_by_its_number(tmp_path):
    rows = _prompts(random.randint(1, 4))
    lines = [json.dumps(r) for r in rows] + ['{"prompt": "What is 1+1?"']
    done = _sample(["dataset=-", "output_file=kept.jsonl"], "\n".join(lines).encode() + b"\n", tmp_path)
    assert done.returncode == 1
    assert done.stderr.decode().strip() == (f"r1fast sample: dataset '-' (standard input) line {len(lines)}: not valid "
                                            f"JSON (Expecting ',' delimiter at column {len(lines[-1]) + 1})")
    assert not (tmp_path / "kept.jsonl").exists()


class _Stdin(io.TextIOWrapper):
    def __init__(self, data: bytes, terminal: bool = False):
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self.terminal = terminal

    def isatty(self):
        return self.terminal


@pytest.mark.parametrize("stdin, said", [
    (_Stdin(b"", terminal=True), r"dataset '-' \(standard input\) is the terminal: nothing was piped in\. Pipe the "
                                 r"prompts to it, one JSON object a line with its 'question', e\.g\. r1fast sample "
                                 r"model_name_or_path=M dataset=- output_file=kept\.jsonl < prompts\.jsonl"),
    (_Stdin(b""), r"dataset '-' \(standard input\) is empty: no prompt was piped in \(0 bytes\); pipe one JSON object "
                  r"a line with its 'question'"),
    (_Stdin(b"\n  \n"), r"is empty: no prompt was piped in \(blank lines alone\)"),
    (_Stdin(b'{"question": "1+1"}\n{"question": null}\n'),
     r"^r1fast sample: dataset: row 1 \('<stdin>' line 2\) has no value for column\(s\) \['question'\]$"),
    (_Stdin(b'{"prompt": "1+1"}\n'), r"lacks column\(s\) \['question'\]; it has \['prompt'\]"),
    (None, r"dataset '-' \(standard input\): this command has no standard input \(it was closed\); pipe the prompts"),
], ids=["terminal", "empty", "blank", "hole", "column", "closed"])
def test_piped_prompts_that_are_not_there_are_said_before_the_model_loads(stdin, said, tmp_path, monkeypatch):
    from r1fast.trainer import common

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", stdin)
    monkeypatch.setattr(common, "load_model_and_tokenizer", lambda *a, **kw: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match=said):
        main(["sample", *_OPTIONS, "dataset=-", "prompt_column=question"])


def test_the_sample_help_says_how_to_pipe_prompts_in(capsys):
    assert main(["sample", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "dataset=- reads the prompts from standard input: JSON lines, as a .jsonl dataset holds them" in text
