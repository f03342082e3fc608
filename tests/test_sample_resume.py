"""`r1fast sample --resume`: what it takes as the same sampling (its fingerprint) and how it reads its progress."""
import json
import os
import random
import re

import torch

from r1fast.cli import main
from r1fast.trainer.common import load_model_and_tokenizer


def _model_folder(path, seed: int):
    """A local model folder (builtin:micro's shape) holding weights drawn from `seed`."""
    model, tok = load_model_and_tokenizer("builtin:micro", device="cpu", seed=seed)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))


def _sample_args(model: str, output_file: str) -> list[str]:
    return ["sample", f"model_name_or_path={model}", "dataset=builtin:arithmetic", "max_prompts=4", "num_samples=2",
            "batch_prompts=2", "max_completion_length=4", "keep_truncated=true", "reward_thresholds=[0]",
            "reward_funcs=[format]", "progress_bar=false", f"output_file={output_file}"]


def test_resume_after_the_model_folder_was_retrained_samples_again(tmp_path, monkeypatch, capsys):
    # the fingerprint named the model by its folder alone: after the model was retrained into the same folder, a
    # --resume said "sampling already complete" and kept the samples of the earlier weights
    monkeypatch.chdir(tmp_path)
    _model_folder(tmp_path / "model", seed=1)
    args = _sample_args(str(tmp_path / "model"), "kept.jsonl")
    assert main(args) == 0
    first = json.loads((tmp_path / "kept.jsonl.sample_stats.json").read_text())["fingerprint"]
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0   # the same weights: nothing to sample
    assert "sampling already complete" in capsys.readouterr().out
    os.utime(tmp_path / "model" / "model.safetensors", (1e9, 1e9))   # a copy's new time changes nothing
    assert main([*args, "--resume"]) == 0
    assert "sampling already complete" in capsys.readouterr().out
    _model_folder(tmp_path / "model", seed=2)   # retrained: same names, same sizes, other values
    assert main([*args, "--resume"]) == 0
    out = capsys.readouterr()
    assert "sampling already complete" not in out.out
    assert "was written by a sampling of other options or prompts" in out.err
    assert json.loads((tmp_path / "kept.jsonl.sample_stats.json").read_text())["fingerprint"] != first


def test_the_weights_signature_reads_pieces_of_a_large_file_and_sees_a_changed_value(tmp_path):
    from r1fast.trainer import sampling

    folder = tmp_path / "m"
    folder.mkdir()
    data = bytearray(torch.randint(0, 256, (3 << 20,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    (folder / "model.safetensors").write_bytes(bytes(data))
    (folder / "config.json").write_text("{}")
    (folder / "optimizer.safetensors").write_bytes(b"x")   # a training checkpoint's other files are not the model
    before = sampling.weights_signature(str(folder))
    (folder / "optimizer.safetensors").write_bytes(b"y")
    assert sampling.weights_signature(str(folder)) == before
    changed = set()
    for at in (0, len(data) - 1):   # the pieces read (32 of 4 KiB, spread) hold the file's first and last bytes
        data[at] ^= 1
        (folder / "model.safetensors").write_bytes(bytes(data))
        changed.add(sampling.weights_signature(str(folder)))
    assert before not in changed and len(changed) == 2
    (folder / "config.json").write_text('{"a": 1}')
    assert sampling.weights_signature(str(folder)) not in (before, None)
    assert sampling.weights_signature("builtin:micro") is None


def test_a_finished_outputs_record_and_a_progress_files_fingerprint_are_read_as_written_or_refused(tmp_path):
    from r1fast.trainer import sampling

    out = str(tmp_path / "kept.jsonl")
    written = sampling.write_jsonl([{"prompt": "1+1", "completion": "2"}], out)
    stats = {"prompts": 1, "samples": 2, "truncated": 0, "passed": 1, "pass_rate": 0.5, "kept": 1, "prompts_kept": 1}
    sampling.write_sample_record(out, {"fingerprint": "f1", "stats": stats, "options": {}, **written})
    record, why = sampling.finished_output(out, "f1")
    assert why is None and record["sha256"] == written["sha256"]
    assert sampling.finished_output(out, "f2")[1].endswith("was written by a sampling of other options or prompts "
                                                           f"(its record: {sampling.stats_path(out)})")
    body = json.loads(open(sampling.stats_path(out)).read())
    for damaged, said in (({k: v for k, v in body.items() if k != "bytes"}, "'bytes'"),
                          ({**body, "stats": {"kept": 1}}, "'samples'"), ([body], "")):
        with open(sampling.stats_path(out), "w") as f:
            json.dump(damaged, f)
        record, why = sampling.finished_output(out, "f1")
        assert record is None and f"({sampling.stats_path(out)}) cannot be read ({said}" in why
    progress = tmp_path / "p.json"
    assert sampling.progress_fingerprint(str(progress)) is None   # none there
    for text, fingerprint in ((json.dumps({"r1fast_sample_progress": 2, "fingerprint": "a"}) + "\n{}\n", "a"),
                              (json.dumps({"fingerprint": "b", "next_prompt": 2, "stats": {}, "rows": []}), "b"),
                              ("not json\n", None), ("[1]\n", None), ('{"rows": []}\n', None)):
        progress.write_text(text)
        assert sampling.progress_fingerprint(str(progress)) == fingerprint


def test_the_weights_signature_sees_one_small_tensor_changed_between_its_pieces(tmp_path):
    # a LoRA merged into a few projections changes small tensors only: the 32 evenly spaced pieces of a shard, 4 KiB
    # each, fell on none of them (a third of a 0.5B model's shard or more), and --resume kept the earlier samples
    from safetensors.torch import save_file

    from r1fast.trainer import sampling

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    g = torch.Generator().manual_seed(0)
    big = {name: torch.randn(384 << 10, generator=g) for name in ("a.weight", "c.weight")}   # 1.5 MiB each
    small = torch.randn(1024, generator=g)   # 4 KiB, between them in the file
    save_file({**big, "b.weight": small}, str(folder / "model.safetensors"))
    data = (folder / "model.safetensors").read_bytes()
    begin = data.index(small.numpy().tobytes())
    size, piece, n = len(data), 4096, 32
    read = [(i * (size - piece) // (n - 1), i * (size - piece) // (n - 1) + piece) for i in range(n)]
    assert not any(start < begin + small.numel() * 4 and begin < end for start, end in read)   # between two pieces
    before = sampling.weights_signature(str(folder))
    save_file({**big, "b.weight": small + torch.randn(1024, generator=g)}, str(folder / "model.safetensors"))
    assert sampling.weights_signature(str(folder)) != before
    save_file({**big, "b.weight": small}, str(folder / "model.safetensors"))
    assert sampling.weights_signature(str(folder)) == before


def test_the_weights_signature_reads_the_weights_files_the_loader_reads_whatever_their_names(tmp_path):
    # only model*.safetensors were read: a folder whose weights the loader reads from consolidated.safetensors (no
    # model.safetensors, no index) kept its signature when retrained in place, and --resume kept the earlier samples
    from r1fast.models.checkpoint import shard_files
    from r1fast.trainer import sampling

    _model_folder(tmp_path / "m", seed=1)
    os.rename(tmp_path / "m" / "model.safetensors", tmp_path / "m" / "consolidated.safetensors")
    assert [os.path.basename(p) for p in shard_files(str(tmp_path / "m"))] == ["consolidated.safetensors"]
    before = sampling.weights_signature(str(tmp_path / "m"))
    _model_folder(tmp_path / "again", seed=2)   # retrained: the same names and sizes, other values
    os.replace(tmp_path / "again" / "model.safetensors", tmp_path / "m" / "consolidated.safetensors")
    assert sampling.weights_signature(str(tmp_path / "m")) not in (before, None)
    # a training checkpoint's optimizer state is not its model: a step of it alone changes nothing
    _model_folder(tmp_path / "ckpt", seed=1)
    kept = sampling.weights_signature(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "optimizer.safetensors").write_bytes(os.urandom(64))
    assert sampling.weights_signature(str(tmp_path / "ckpt")) == kept


def test_a_finished_samplings_output_and_record_are_on_disk_before_its_progress_is_removed(tmp_path, disk_ops):
    # the output and its record were renamed into place and the progress file removed at once: a power loss could
    # keep the removal and not the renames, and the next --resume found neither the output nor what was sampled
    import random

    from r1fast.trainer import sampling

    out, progress = tmp_path / "out" / "kept.jsonl", tmp_path / "kept.progress.jsonl"
    progress.write_text('{"r1fast_sample_progress": 2, "fingerprint": "f"}\n')
    kept = [{"prompt": f"{i}+1=", "completion": str(random.randint(0, 99))} for i in range(3)]
    sampling.finish_samples(kept, str(out), str(progress), {"fingerprint": "f", "stats": {"kept": 3}, "options": {}})
    assert [json.loads(line) for line in out.read_text().splitlines()] == kept and not progress.exists()
    gone = disk_ops.at(("remove", progress))
    for written in (out, sampling.stats_path(str(out))):
        assert disk_ops.synced_between(disk_ops.renamed_to(written, gone), gone, out.parent), written


def test_a_run_folder_given_as_the_model_names_its_newest_checkpoint_or_that_it_has_none(tmp_path, monkeypatch):
    # `model_name_or_path=runs/sft` (the run, not one of its checkpoints) said "no tokenizer files (...) in
    # 'runs/sft'", as if the run had been saved without its tokenizer
    import pytest

    monkeypatch.chdir(tmp_path)
    steps = sorted(random.sample(range(1, 200), 3))
    for step in steps:
        _model_folder(tmp_path / "runs" / "sft" / f"checkpoint-{step}", seed=step)
    (tmp_path / "runs" / "sft" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(SystemExit, match=re.escape(f"give one of its checkpoints, e.g. its newest, "
                                                   f"{os.path.join('runs', 'sft', f'checkpoint-{steps[-1]}')}")):
        main(_sample_args("runs/sft", "kept.jsonl"))
    (tmp_path / "runs" / "grpo").mkdir()
    (tmp_path / "runs" / "grpo" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(SystemExit, match="runs/grpo is a training run's folder that holds no checkpoint yet"):
        main(_sample_args("runs/grpo", "kept.jsonl"))
    # a pipeline's run folder: its stages' checkpoints, one folder down
    os.rename(tmp_path / "runs" / "sft", tmp_path / "runs" / "grpo" / "sft")
    with pytest.raises(SystemExit, match=re.escape(f"is a pipeline's run folder: give one of its stages' checkpoints, "
                                                   f"e.g. the newest, runs/grpo/sft/checkpoint-{steps[-1]}")):
        main(_sample_args("runs/grpo", "kept.jsonl"))
    assert not os.path.exists("kept.jsonl")


def test_the_summary_says_the_models_positions_cut_samples_that_max_completion_length_did_not(tmp_path, monkeypatch,
                                                                                               capsys):
    # builtin:micro has 128 positions: a prompt of ~116 tokens leaves its samples 12, whatever max_completion_length
    # says, yet the summary said "N cut at max_completion_length", sending the user to raise it in vain
    monkeypatch.chdir(tmp_path)
    long_prompt, short_prompt = "What is " + "1+" * 50 + "1?", "What is 2+3?"
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in (long_prompt, short_prompt)))
    base = ["sample", "model_name_or_path=builtin:micro", "dataset=p.jsonl", "num_samples=4", "keep_truncated=true",
            "reward_thresholds=[0]", "reward_funcs=[format]", "progress_bar=false", "device=cpu"]

    def sample(max_completion_length: int, output_file: str) -> tuple[str, dict]:
        assert main([*base, f"max_completion_length={max_completion_length}", f"output_file={output_file}"]) == 0
        line = capsys.readouterr().out.strip().splitlines()[-1]
        return line, json.loads((tmp_path / f"{output_file}.sample_stats.json").read_text())["stats"]

    # the long prompt's samples reach the positions, the short one's stop at 20 tokens
    line, stats = sample(20, "mixed.jsonl")
    cut, by_positions = stats["truncated"], stats["truncated_by_positions"]
    assert stats["positions"] == 128 and 0 < by_positions < cut
    assert f"; {cut} cut: {cut - by_positions} at max_completion_length, {by_positions} where prompt and completion " \
           f"reached the model's 128 positions)" in line
    # past the positions for every prompt: max_completion_length cuts none
    line, stats = sample(200, "all.jsonl")
    assert stats["truncated"] == stats["truncated_by_positions"] > 0
    assert f"; {stats['truncated']} cut where prompt and completion reached the model's 128 positions)" in line
    assert "max_completion_length" not in line
    # within the positions: as before, and the statistics as an earlier r1fast wrote them
    line, stats = sample(4, "short.jsonl")
    assert "truncated_by_positions" not in stats and "positions" not in stats
    assert f"; {stats['truncated']} cut at max_completion_length)" in line
