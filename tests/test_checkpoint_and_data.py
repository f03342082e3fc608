"""Checkpoint files (safetensors + JSON, atomic) and dataset loading (JSONL, parquet, saved HF
dataset, built-in tasks, chat template)."""
import json
import os
import random

import pytest
import torch

from r1fast.data import (
    ArithmeticTask,
    build_char_tokenizer,
    decode_completion,
    encode_completion,
    encode_prompt,
    load_rows,
)
from r1fast.models import CausalLM, ModelConfig
from r1fast.trainer import checkpoints as ckpt


def _model(tok):
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=32)
    return CausalLM(cfg)


def test_checkpoint_roundtrip_restores_everything(tmp_path):
    tok = build_char_tokenizer()
    model = _model(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    model(torch.arange(10)).sum().backward()
    opt.step()
    sched.step()
    torch.manual_seed(123)
    random.seed(5)
    path = ckpt.save_checkpoint(str(tmp_path), 7, model=model, optimizer=opt, scheduler=sched, tokenizer=tok,
                                state={"data": {"epoch": 1, "index": 3}})
    expect_torch, expect_py = torch.rand(3), random.random()
    files = set(os.listdir(path))
    assert {"model.safetensors", "config.json", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"} <= files
    assert not [f for f in files if f.endswith((".pt", ".bin", ".pkl"))]   # nothing pickled

    model2 = _model(tok)
    model2.reset_parameters(seed=1)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (s + 1))
    state = ckpt.load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)
    assert state["global_step"] == 7 and state["data"] == {"epoch": 1, "index": 3}
    assert torch.equal(torch.rand(3), expect_torch) and random.random() == expect_py
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
        if "exp_avg" in opt.state[p]:   # lm_head gets no gradient from this toy loss
            assert torch.equal(opt.state[p]["exp_avg"], opt2.state[q]["exp_avg"])
    assert sum("exp_avg" in opt2.state[q] for q in model2.parameters()) > 3
    assert sched2.last_epoch == sched.last_epoch and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


@pytest.mark.parametrize("damage,match", [
    (lambda d: (d / "optimizer.safetensors").write_bytes(b"\x08\x00"), "cannot read optimizer.safetensors"),
    (lambda d: (d / "rng.safetensors").write_bytes(b"\xff" * 10), "cannot read rng.safetensors"),
    (lambda d: (d / "rng.safetensors").unlink(), "lacks rng.safetensors"),
    (lambda d: (d / "model.safetensors").unlink(), "lacks the model weights"),
    (lambda d: (d / "trainer_state.json").write_text('{"global_st'), "trainer_state.json is not valid JSON"),
])
def test_damaged_checkpoint_is_a_clear_error(tmp_path, damage, match):
    # Truncated optimizer/rng files raised safetensors' own SafetensorError (a traceback from the
    # CLI); without model.safetensors the loader read optimizer.safetensors as the weights.
    tok = build_char_tokenizer()
    model = _model(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.arange(10)).sum().backward()
    opt.step()
    path = ckpt.save_checkpoint(str(tmp_path), 3, model=model, optimizer=opt)
    damage(tmp_path / "checkpoint-3")
    model2 = _model(tok)
    with pytest.raises(ValueError, match=match):
        ckpt.load_checkpoint(path, model=model2, optimizer=torch.optim.AdamW(model2.parameters(), lr=1e-3))


def test_failed_write_leaves_no_checkpoint(tmp_path, monkeypatch):
    tok = build_char_tokenizer()
    model = _model(tok)

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(str(tmp_path), 1, model=model)
    assert os.listdir(tmp_path) == []
    assert ckpt.latest_checkpoint(str(tmp_path)) is None
    with pytest.raises(ValueError, match="no checkpoint"):
        ckpt.resolve_resume(True, str(tmp_path))
    with pytest.raises(ValueError, match="not a checkpoint"):
        ckpt.load_checkpoint(str(tmp_path), model=model)


def test_pruning_keeps_the_checkpoint_just_written(tmp_path):
    # save_total_limit kept the highest step numbers: a run resumed from an older checkpoint beside
    # newer ones deleted the checkpoint it had just written.
    model = _model(build_char_tokenizer())
    ckpt.save_checkpoint(str(tmp_path), 6, model=model, keep=1)
    path = ckpt.save_checkpoint(str(tmp_path), 3, model=model, keep=1)
    assert ckpt.list_checkpoints(str(tmp_path)) == [(3, path)]
    for step in (4, 5):
        ckpt.save_checkpoint(str(tmp_path), step, model=model, keep=None)   # None: keep every one
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [3, 4, 5]


def test_char_tokenizer_roundtrip_and_save(tmp_path):
    from r1fast.models import load_tokenizer

    tok = build_char_tokenizer()
    ids = encode_prompt(tok, "12+3=")
    assert tok.decode(ids, skip_special_tokens=False) == "<bos><|user|>12+3=<|assistant|>"
    comp = "<think>12+3=15</think><answer>15</answer>"
    cids = encode_completion(tok, comp)
    assert cids[-1] == tok.eos_token_id and decode_completion(tok, cids) == comp
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    assert encode_prompt(again, "12+3=") == ids and encode_completion(again, comp) == cids
    # padded to a real model's vocabulary (benchmarks): text encodes as before, any id decodes
    wide = build_char_tokenizer(vocab_size=1000)
    assert len(wide) == 1000 and encode_prompt(wide, "12+3=") == ids and encode_completion(wide, comp) == cids
    assert wide.decode([999, 998]) == "<v999><v998>"
    with pytest.raises(ValueError, match="vocab_size must be >= "):
        build_char_tokenizer(vocab_size=10)


def test_arithmetic_task_is_consistent_and_seeded():
    rows = ArithmeticTask(teacher_noise=0.0).rows(50, seed=1)
    assert rows == ArithmeticTask().rows(50, seed=1)
    for r in rows:
        expr = r["prompt"].rstrip("=")
        assert str(eval(expr)) == r["answer"]   # noqa: S307 (digits and +/- only)
        assert r["completion"].endswith(f"<answer>{r['answer']}</answer>")
    noisy = ArithmeticTask(answer_noise=0.5).rows(200, seed=2)
    wrong = sum(r["completion"].split("<answer>")[1].split("<")[0] != r["answer"] for r in noisy)
    assert 60 < wrong < 140
    with pytest.raises(ValueError, match="teacher_noise"):
        ArithmeticTask(teacher_noise=1.5)


def test_load_rows_from_files(tmp_path):
    import datasets

    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_rows(str(jl)) == rows
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    assert load_rows(str(tmp_path / "d.parquet")) == rows
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load_rows(str(tmp_path / "saved")) == rows
    assert len(load_rows("builtin:arithmetic?max_terms=5", n_builtin=7)) == 7
    with pytest.raises(ValueError, match="does not exist"):
        load_rows(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="lacks column"):
        load_rows(str(jl), required_columns=("completion",))
    with pytest.raises(ValueError, match="unknown built-in task"):
        load_rows("builtin:chess")
    with pytest.raises(ValueError, match="unknown file type"):
        (tmp_path / "d.txt").write_text("x")
        load_rows(str(tmp_path / "d.txt"))


def test_chat_messages_and_system_prompt():
    tok = build_char_tokenizer()
    ids = encode_prompt(tok, [{"role": "user", "content": "3+4="}], system_prompt="Be brief.")
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>Be brief.\n<|user|>3+4=<|assistant|>"
    with pytest.raises(ValueError, match="prompt must be"):
        encode_prompt(tok, 42)


def test_bad_jsonl_lines_and_empty_files_are_named(tmp_path):
    # datasets raised a bare DatasetGenerationError for a bad line and StopIteration for an empty file.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="\n')
    with pytest.raises(ValueError, match="bad.jsonl' line 2: not valid JSON"):
        load_rows(str(bad))
    (tmp_path / "list.jsonl").write_text('["1+1="]\n')
    with pytest.raises(ValueError, match="line 1: expected a JSON object"):
        load_rows(str(tmp_path / "list.jsonl"))
    for name in ("empty.jsonl", "empty.json"):
        (tmp_path / name).write_text("")
        with pytest.raises(ValueError, match=f"{name}'"):
            load_rows(str(tmp_path / name))


def test_a_row_without_a_required_value_is_named():
    # A JSONL row lacking "completion" became None, and SFT trained on the text "None".
    from r1fast.data import check_columns

    rows = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": None}]
    with pytest.raises(ValueError, match=r"row 1 has no value for column\(s\) \['completion'\]"):
        check_columns(rows, ("prompt", "completion"), "dataset 'd.jsonl'")


def test_jsonl_needs_no_datasets_package_and_other_files_say_they_do(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    (tmp_path / "d.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    assert load_rows(str(tmp_path / "d.jsonl")) == [{"prompt": "1+1=", "answer": "2"}]
    (tmp_path / "d.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match=r"reading \.parquet needs the `datasets` package"):
        load_rows(str(tmp_path / "d.parquet"))


def test_jsonl_rows_get_every_column(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": "2+2=", "extra": 1}\n')
    assert load_rows(str(f)) == [{"prompt": "1+1=", "answer": "2", "extra": None},
                                 {"prompt": "2+2=", "answer": None, "extra": 1}]
    with pytest.raises(ValueError, match=r"row 1 has no value for column\(s\) \['answer'\]"):
        load_rows(str(f), required_columns=("prompt", "answer"))


def test_builtin_task_parameter_errors_name_the_parameter():
    assert len(load_rows("builtin:arithmetic?answer_noise=1e-1", n_builtin=3)) == 3   # was int("1e-1")
    with pytest.raises(ValueError, match="parameter 'max_terms' must be a number; got 'abc'"):
        load_rows("builtin:arithmetic?max_terms=abc")


def test_char_tokenizer_keeps_blank_lines_and_names_unknown_characters():
    # The pre-tokenizer split on ".", which skips "\n" in Oniguruma: "\n\n" stayed one piece and
    # became a single <unk>, so a blank line in a prompt or a re-encoded sample was lost.
    import warnings

    from r1fast.data.tokenizer import CHARACTERS

    tok = build_char_tokenizer()
    text = "a\n\nb\n\n\n" + CHARACTERS + CHARACTERS[::-1]
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    # characters outside the vocabulary become <unk>: a warning names them
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = encode_prompt(tok, "7\u00d72\t=")
    assert ids.count(tok.unk_token_id) == 2
    assert any("'\\t', '\u00d7'" in str(w.message) and "<unk>" in str(w.message) for w in caught)


def test_arithmetic_task_integer_parameters_are_checked():
    # max_terms=4.5 passed the checks and failed later in random.randrange with an unnamed message.
    with pytest.raises(ValueError, match="max_terms must be a whole number; got 4.5"):
        load_rows("builtin:arithmetic?max_terms=4.5", n_builtin=3)
    with pytest.raises(ValueError, match="max_operand must be a whole number"):
        ArithmeticTask(max_operand=9.5)
    assert ArithmeticTask(max_terms=1e1).max_terms == 10   # "1e1" in a query string reads as a float
    rows = load_rows("builtin:arithmetic?max_terms=1e1&min_terms=10", n_builtin=5)
    assert all(r["prompt"].count("+") + r["prompt"].count("-") == 9 for r in rows)


def test_optimizer_state_of_another_parameter_layout_is_a_clear_error():
    """E.g. a training checkpoint from before the decoder fused q/k/v and gate/up: more parameters."""
    from r1fast.trainer.checkpoints import load_optimizer_state, optimizer_state

    old = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(3)]
    opt = torch.optim.AdamW(old)
    sum(p.sum() for p in old).backward()
    opt.step()
    tensors, meta = optimizer_state(opt)
    new = torch.optim.AdamW([torch.nn.Parameter(torch.randn(12, 3)), torch.nn.Parameter(torch.randn(4, 3))])
    with pytest.raises(ValueError, match="3 parameters but the model has 2.*fused q/k/v"):
        load_optimizer_state(new, tensors, meta[0])
