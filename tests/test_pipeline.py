"""Multi-stage pipelines and the CLI on a tiny budget: stages chain, '@stage' data flows, a student
can start fresh, resume skips finished stages, and the commands report bad input clearly."""
import json
import os

import pytest

from r1fast.cli import main
from r1fast.trainer.pipeline import load_pipeline, run_pipeline


def tiny_pipeline(tmp_path):
    return {
        "name": "t", "seed": 0, "output_dir": str(tmp_path / "run"), "model": "builtin:micro",
        "eval_dataset": "builtin:arithmetic?min_terms=2&max_terms=2", "eval_size": 4, "eval_samples_per_prompt": 2,
        "eval_max_tokens": 12, "progress_bar": False,
        "stages": [
            {"name": "cold", "type": "sft", "dataset": "builtin:arithmetic?min_terms=2&max_terms=2", "num_rows": 64,
             "config": {"max_steps": 3, "per_device_train_batch_size": 8, "learning_rate": 1e-3}},
            {"name": "rl", "type": "grpo", "dataset": "builtin:arithmetic?min_terms=2&max_terms=2", "num_rows": 64,
             "config": {"max_steps": 2, "per_device_train_batch_size": 8, "num_generations": 4,
                        "max_completion_length": 12, "max_prompt_length": 16}},
            {"name": "rs", "type": "sample", "dataset": "builtin:arithmetic?min_terms=2&max_terms=2", "num_rows": 4,
             "config": {"num_samples": 2, "max_completion_length": 12, "reward_funcs": ["format"],
                        "reward_thresholds": [0.0]}},
            {"name": "student", "type": "sft", "model": "builtin:micro", "dataset": "@rs",
             "config": {"max_steps": 2, "per_device_train_batch_size": 4}},
        ],
    }


def test_pipeline_chains_stages_and_resumes(tmp_path):
    spec = tiny_pipeline(tmp_path)
    summary = run_pipeline(spec)
    run = tmp_path / "run"
    assert [s["stage"] for s in summary["stages"]] == ["cold", "rl", "rs", "student"]
    assert all(s["held_out_accuracy"] is not None for s in summary["stages"] if s["type"] != "sample")
    kept = [json.loads(line) for line in open(run / "rs" / "samples.jsonl")]
    assert len(kept) == 4 and all("completion" in r and "rewards" in r for r in kept)
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert {r["stage"] for r in rows} == {"cold", "rl", "student"}
    steps = [r["step"] for r in rows if r["stage"] == "rl" and "reward" in r]
    assert steps == [4, 5]   # global steps continue across stages
    # resuming a finished pipeline skips every stage
    again = run_pipeline(spec, resume=True)
    assert again["stages"] == summary["stages"]


def test_pipeline_config_errors(tmp_path):
    spec = tiny_pipeline(tmp_path)
    spec["stages"][3]["dataset"] = "@nothing"
    with pytest.raises(ValueError, match="unknown stage '@nothing'"):
        load_pipeline(spec)
    spec = tiny_pipeline(tmp_path)
    spec["stages"][0]["type"] = "rlhf"
    with pytest.raises(ValueError, match="type must be one of"):
        load_pipeline(spec)


def test_cli_errors_are_clear(tmp_path, capsys):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["train", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit, match="unknown option 'learnin_rate'"):
        main(["sft", "learnin_rate=1"])
    with pytest.raises(SystemExit, match="needs model_name_or_path"):
        main(["sample", "num_samples=2"])
    with pytest.raises(SystemExit, match="sample has no --resume"):
        main(["sample", "model_name_or_path=builtin:tiny", "dataset=builtin:arithmetic", "--resume"])
    assert main(["sample", "--help"]) == 0
    assert "--resume" not in capsys.readouterr().out  # only train, sft and pipeline resume
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        main(["plot", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"unknown pipeline key.*bogus.*<stage>\.<option>"):
        main(["train", "--bogus", "1"])
    assert main(["train", "--help"]) == 0


def test_cli_grpo_yaml_and_plot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "g.yaml"
    cfg.write_text("model_name_or_path: builtin:micro\ndataset: builtin:arithmetic?min_terms=2&max_terms=2\n"
                   "per_device_train_batch_size: 8\nnum_generations: 4\nmax_completion_length: 8\n"
                   "max_prompt_length: 16\nprogress_bar: false\n")
    assert main(["train", str(cfg), "--max_steps", "2", "run_name=cli"]) == 0
    run = tmp_path / "runs" / "cli"
    assert os.path.isdir(run / "checkpoint-2")
    assert main(["train", str(cfg), "--max_steps", "3", "run_name=cli", "--resume"]) == 0
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1, 2, 3]
    assert main(["plot", str(run)]) == 0
    assert (run / "curves.png").stat().st_size > 1000


def test_cli_sample_with_default_lengths_fits_the_models_positions(tmp_path, monkeypatch, capsys):
    # The default max_completion_length (256) plus a prompt exceeds builtin:micro's 128 positions:
    # the engine is capped at the model's length, as in GRPO and evaluation, instead of refusing.
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "kept.jsonl"
    assert main(["sample", "model_name_or_path=builtin:micro", "dataset=builtin:arithmetic", "max_prompts=2",
                 "num_samples=2", f"output_file={out}"]) == 0
    captured = capsys.readouterr()
    assert "kept" in captured.out and out.exists() and "sample" in captured.err  # the progress bar
    assert main(["sample", "model_name_or_path=builtin:micro", "dataset=builtin:arithmetic", "max_prompts=2",
                 "num_samples=2", f"output_file={out}", "progress_bar=false"]) == 0
    assert "sample:" not in capsys.readouterr().err


def test_cli_reports_a_failing_reward_function_without_a_traceback(tmp_path, monkeypatch):
    # RewardError is not a ValueError: it escaped the CLI as a traceback.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "boom.py").write_text("def f(prompts, completions, **kw):\n    raise KeyError('gold')\n")
    cfg = tmp_path / "g.yaml"
    cfg.write_text("model_name_or_path: builtin:micro\ndataset: builtin:arithmetic?min_terms=2&max_terms=2\n"
                   "per_device_train_batch_size: 4\nnum_generations: 4\nmax_completion_length: 4\n"
                   "max_prompt_length: 16\nmax_steps: 1\nprogress_bar: false\nreward_funcs: [boom.py:f]\n")
    with pytest.raises(SystemExit, match=r"r1fast train: reward function 'boom.py:f' raised KeyError"):
        main(["train", str(cfg)])


def one_sft_stage_spec(tmp_path, top: str = ""):
    """A pipeline YAML of one 1-step SFT stage `s` on the built-in micro model; `top`: more top-level keys."""
    spec = tmp_path / "p.yaml"
    spec.write_text("name: p\nmodel: builtin:micro\nprogress_bar: false\n" + top + "stages:\n"
                    "  - {name: s, type: sft, dataset: builtin:arithmetic, num_rows: 8,\n"
                    "     config: {max_steps: 1, per_device_train_batch_size: 4}}\n")
    return spec


def test_pipeline_resume_path_names_the_run_folder(tmp_path, monkeypatch):
    # `--resume PATH` used to be read as plain --resume: a fresh run started in ./runs/<name>.
    spec = one_sft_stage_spec(tmp_path)
    run = tmp_path / "first"
    assert main(["pipeline", str(spec), f"output_dir={run}"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["pipeline", str(spec), "--resume", str(run)]) == 0
    assert not (elsewhere / "runs").exists()
    assert json.load(open(run / "summary.json"))["run_dir"] == str(run)
    with pytest.raises(SystemExit, match="not a pipeline run folder"):
        main(["train", str(spec), "--resume", str(elsewhere)])


def test_resume_without_an_earlier_run_says_it_starts_fresh(tmp_path, capsys):
    spec = one_sft_stage_spec(tmp_path)
    assert main(["pipeline", str(spec), f"output_dir={tmp_path / 'new'}", "--resume"]) == 0
    assert "--resume: no earlier run in" in capsys.readouterr().out


def test_plot_names_a_bad_metrics_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n')
    with pytest.raises(SystemExit, match=r"metrics.jsonl line 2: not valid JSON"):
        main(["plot", str(tmp_path)])


def test_resumed_summary_marks_stages_evaluated_under_earlier_settings(tmp_path, capsys):
    spec = one_sft_stage_spec(tmp_path, "eval_dataset: builtin:arithmetic\neval_size: 4\neval_samples_per_prompt: 1\n")
    run = tmp_path / "run"
    assert main(["pipeline", str(spec), f"output_dir={run}"]) == 0
    capsys.readouterr()
    assert main(["pipeline", str(spec), f"output_dir={run}", "eval_size=3", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "held-out: 3 prompts" in out and "* s: evaluated by an earlier invocation with prompts=4 (now 3)" in out
    assert json.load(open(run / "summary.json"))["stages"][0]["eval_settings"]["prompts"] == 4
    # the token budget and the seed (which picks the rows and the samples) count as well
    assert main(["pipeline", str(spec), f"output_dir={run}", "eval_size=4", "eval_max_tokens=8", "--resume"]) == 0
    assert "with max_tokens=64 (now 8)" in capsys.readouterr().out
