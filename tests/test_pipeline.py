"""Multi-stage pipelines and the CLI on a tiny budget: stages chain, '@stage' data flows, a student
can start fresh, resume skips finished stages, and the commands report bad input clearly."""
import copy
import json
import os
import re
import shlex
import shutil
import sys

import pytest
import torch

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
                        "reward_thresholds": [0.0], "keep_truncated": True}},
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


def test_sample_stage_that_keeps_nothing_fails_unfinished_and_resumes_with_new_thresholds(tmp_path):
    """A sample stage that kept no rows for a later stage was recorded finished, so the error at the later
    stage ("lower its thresholds") came back on every --resume: a finished stage's new options are not applied.
    The sample stage now fails itself, and --resume with lower thresholds samples it again."""
    spec = tiny_pipeline(tmp_path)
    spec.pop("eval_dataset")
    spec["stages"] = spec["stages"][2:]
    spec["stages"][0]["num_rows"] = 2
    spec["stages"][0]["config"].update(reward_thresholds=[1.5], num_samples=1, max_completion_length=4)  # format: <= 1
    spec["stages"][1]["config"]["max_steps"] = 1
    with pytest.raises(ValueError, match=r"stage 'rs' kept 0 of 2 samples .*'student' trains on them: lower "
                                         r"rs.reward_thresholds.*--resume then samples 'rs' again"):
        run_pipeline(spec)
    state = json.load(open(tmp_path / "run" / "pipeline_state.json"))
    assert "rs" not in state["stages"]
    spec["stages"][0]["config"]["reward_thresholds"] = [0.0]
    summary = run_pipeline(spec, resume=True)
    assert [s["stage"] for s in summary["stages"]] == ["rs", "student"]



def test_sample_stage_that_keeps_nothing_for_a_grpo_stage_evaluating_on_its_file_fails_unfinished(tmp_path):
    # rs was recorded finished with an empty file, and the GRPO stage evaluating on it failed with "dataset
    # '<file>' is empty", naming no stage, on every --resume
    spec = tiny_pipeline(tmp_path)
    spec.pop("eval_dataset")
    rs, rl = spec["stages"][2], spec["stages"][1]
    kept = str(tmp_path / "kept.jsonl")
    rs["num_rows"] = 2
    rs["config"].update(reward_thresholds=[1.5], num_samples=1, max_completion_length=4, output_file=kept)
    rl["config"].update(eval_dataset=kept, eval_steps=1, max_steps=1)
    spec["stages"] = [rs, rl]
    with pytest.raises(ValueError, match=r"^stage 'rs' kept 0 of 2 samples .*, and stage 'rl' evaluates on them: "
                                         r"lower rs.reward_thresholds"):
        run_pipeline(spec)
    assert "rs" not in json.load(open(tmp_path / "run" / "pipeline_state.json"))["stages"]


def test_a_sample_stage_that_kept_nothing_as_the_models_positions_cut_its_samples_is_not_told_to_raise_the_length(
        tmp_path):
    # every sample cut where prompt and completion reached the model's positions: "raise rs.max_completion_length"
    # (and the summary's "cut at max_completion_length") sent the user to an option that changes nothing
    from r1fast.trainer.pipeline import PipelineRunner

    spec = tiny_pipeline(tmp_path)
    spec["stages"] = spec["stages"][2:]
    runner = PipelineRunner(load_pipeline(spec))
    stage = runner.p.stages[0]
    stats = {"prompts": 2, "samples": 4, "truncated": 3, "passed": 0, "pass_rate": 0.0, "kept": 0, "prompts_kept": 0}
    with pytest.raises(ValueError) as by_positions:
        runner._refuse_empty_samples(stage, [], {**stats, "truncated_by_positions": 3, "positions": 128})
    assert "(pass rate 0.000; 3 cut where prompt and completion reached the model's 128 positions)" in \
        str(by_positions.value)
    assert "lower rs.reward_thresholds, set rs.keep_truncated=true, or sample more" in str(by_positions.value)
    assert "max_completion_length" not in str(by_positions.value)
    with pytest.raises(ValueError) as mixed:   # one cut at max_completion_length: raising it may let that one end
        runner._refuse_empty_samples(stage, [], {**stats, "truncated_by_positions": 2, "positions": 128})
    assert "3 cut: 1 at max_completion_length, 2 where prompt and completion reached the model's 128 positions" in \
        str(mixed.value)
    assert "lower rs.reward_thresholds, raise rs.max_completion_length or set rs.keep_truncated=true" in str(mixed.value)


def test_a_finished_sample_stage_that_kept_nothing_read_by_a_stage_added_since_says_to_rerun_it(tmp_path):
    # kept nothing with no stage reading it, rs finished; a reader added since failed with "kept no samples (lower its
    # thresholds or sample more)", but --resume keeps a finished stage's results whatever its thresholds say now
    spec = tiny_pipeline(tmp_path)
    spec.pop("eval_dataset")
    spec["stages"] = spec["stages"][2:]
    spec["stages"][0]["num_rows"] = 2
    spec["stages"][0]["config"].update(reward_thresholds=[1.5], num_samples=1, max_completion_length=4)
    spec["stages"][1]["config"]["max_steps"] = 1
    run_pipeline({**spec, "stages": spec["stages"][:1]})
    spec["stages"][0]["config"]["reward_thresholds"] = [0.0]
    with pytest.raises(ValueError, match=r"^stage 'student': stage 'rs' kept no samples in the earlier run \(kept 0 of "
                                         r"2 samples from 2 prompts .*\); .*sample it again with rerun_from=rs, "
                                         r"lowering rs.reward_thresholds"):
        run_pipeline(spec, resume=True)
    summary = run_pipeline({**spec, "rerun_from": "rs"})   # as it says
    assert [(s["stage"], s.get("samples", {}).get("kept")) for s in summary["stages"]] == [("rs", 2), ("student", None)]


def test_sample_stage_that_keeps_nothing_for_a_stage_reading_its_output_file_fails_unfinished(tmp_path):
    # the same as "@rs" with the later stage's dataset the path of rs's output_file: rs was recorded finished with
    # an empty file, 'student' failed with "dataset ... is empty", and --resume with lower thresholds skipped rs
    spec = tiny_pipeline(tmp_path)
    spec.pop("eval_dataset")
    spec["stages"] = spec["stages"][2:]
    out = str(tmp_path / "rs_out.jsonl")
    spec["stages"][0]["num_rows"] = 2
    spec["stages"][0]["config"].update(reward_thresholds=[1.5], num_samples=1, max_completion_length=4,
                                       output_file=out)
    spec["stages"][1].update(dataset=out)
    spec["stages"][1]["config"]["max_steps"] = 1
    with pytest.raises(ValueError, match=r"stage 'rs' kept 0 of 2 samples .*'student' trains on them"):
        run_pipeline(spec)
    assert "rs" not in json.load(open(tmp_path / "run" / "pipeline_state.json"))["stages"]
    spec["stages"][0]["config"]["reward_thresholds"] = [0.0]
    assert [s["stage"] for s in run_pipeline(spec, resume=True)["stages"]] == ["rs", "student"]


def test_pipeline_config_errors(tmp_path):
    spec = tiny_pipeline(tmp_path)
    spec["stages"][3]["dataset"] = "@nothing"
    with pytest.raises(ValueError, match="unknown stage '@nothing'"):
        load_pipeline(spec)
    spec = tiny_pipeline(tmp_path)
    spec["stages"][0]["type"] = "rlhf"
    with pytest.raises(ValueError, match="type must be one of"):
        load_pipeline(spec)


def test_a_stage_name_that_is_no_folder_name_or_a_config_that_is_no_mapping_is_a_config_error(tmp_path):
    # name: 3 and config: [..] were TypeError tracebacks; name: '..' trained into the run folder's parent
    for i, bad in enumerate([{"name": 3}, {"name": ".."}, {"name": "a/b"}]):
        spec = tiny_pipeline(tmp_path)
        spec["stages"][0].update(bad)
        with pytest.raises(ValueError, match=rf"stage 0: 'name' must be a folder name .*; got {bad['name']!r}"):
            load_pipeline(spec)
    spec = tiny_pipeline(tmp_path)
    spec["stages"][1]["config"] = ["max_steps", 2]
    with pytest.raises(ValueError, match=r"stage 'rl': 'config' must be a mapping of GRPOConfig options; got \["):
        load_pipeline(spec)


@pytest.mark.parametrize("name", ["metrics.jsonl", "summary.json", "pipeline_state.json", ".r1fast.lock"])
def test_a_stage_named_as_a_file_of_the_run_folder_is_refused_when_loaded(tmp_path, name):
    # its folder <run>/<name> took the place of the run's own file: "IsADirectoryError: ... -> <run>/metrics.jsonl"
    # once the stage had trained, or "FileExistsError" before it started
    from r1fast.trainer.checkpoints import LOCK_FILE
    from r1fast.trainer.pipeline import RUN_FOLDER_FILES

    assert LOCK_FILE in RUN_FOLDER_FILES
    spec = tiny_pipeline(tmp_path)
    spec["stages"][0]["name"] = name
    with pytest.raises(ValueError, match=rf"^pipeline: stage 0: 'name' {re.escape(repr(name))} is a file the run keeps "
                                         rf"in its folder"):
        load_pipeline(spec)



@pytest.mark.parametrize("typed, key, as_typed", [
    ("grpo.fp8=on", "fp8", "grpo.fp8"), ("grpo.run_name=yes", "run_name", "grpo.run_name"),
    ("grpo.run-name=no", "run_name", "grpo.run-name"), ("cold_start.model=off", "model", "cold_start.model"),
    ("rl.dataset=true", "dataset", "rl.dataset"), ("eval_dataset=on", "eval_dataset", "eval_dataset"),
])
def test_a_boolean_word_for_a_stage_setting_is_quoted_as_the_command_line_sets_it(typed, key, as_typed):
    # `grpo.fp8=on` was told to write fp8="'word'", an option the pipeline does not have (and `grpo.model=no`
    # model="'word'", the pipeline's own model); `grpo.run-name=no` was shown run_name
    from r1fast.trainer.pipeline import DEFAULT_CONFIG

    stage = as_typed.partition(".")[0] if "." in as_typed else None
    at = f"command line: stage {stage!r}" if stage else "command line"
    word = typed.partition("=")[2]
    with pytest.raises(ValueError) as e:
        load_pipeline(DEFAULT_CONFIG if stage != "rl" else _pipeline_with_stages(), [typed])
    in_file = as_typed.rpartition(".")[2]
    assert str(e.value) == (f"{at}: option {key!r} expects str, got {word in ('on', 'yes', 'true')}: YAML reads an "
                            f"unquoted yes, no, on, off, true or false as a boolean; to give the word, quote it (in a "
                            f"YAML file {in_file}: 'word', on the command line {as_typed}=\"'word'\")")


def _pipeline_with_stages():
    return {"model": "builtin:tiny", "stages": [{"name": "rl", "type": "grpo", "dataset": "builtin:arithmetic"}]}


def test_a_boolean_word_in_a_stage_of_a_pipeline_file_is_quoted_with_the_stages_key(tmp_path):
    # the file's own stage settings: the command-line form named there sets that stage's key, not the pipeline's
    path = tmp_path / "p.yaml"
    for stage, key in [("{name: rl, type: grpo, model: no, dataset: builtin:arithmetic}", "model"),
                       ("{name: rl, type: grpo, dataset: builtin:arithmetic, config: {language: no}}", "language")]:
        path.write_text(f"model: builtin:tiny\nstages:\n  - {stage}\n")
        said = (f"{path}: stage 'rl': option {key!r} expects str, got False: YAML reads an unquoted yes, no, on, off, "
                f"true or false as a boolean; to give the word, quote it (in a YAML file {key}: 'word', on the command "
                f"line rl.{key}=\"'word'\")")
        with pytest.raises(ValueError, match=re.escape(said)):
            load_pipeline(str(path))
    # a stage named with such a word: "'name' must be a folder name; got True", a name the user never wrote
    path.write_text("model: builtin:tiny\nstages:\n  - {name: on, type: grpo, dataset: builtin:arithmetic}\n")
    said = (f"{path}: stage 0: 'name' is the boolean True: YAML reads an unquoted yes, no, on, off, true or false as a "
            f"boolean; to name the stage with the word, quote it (name: 'word')")
    with pytest.raises(ValueError, match=re.escape(said)):
        load_pipeline(str(path))
    path.write_text("model: builtin:tiny\nstages:\n  - {name: 'on', type: grpo, dataset: builtin:arithmetic}\n")
    assert load_pipeline(str(path)).stages[0].name == "on"


@pytest.mark.parametrize("name", ["cold-start", "v1.5", "a-b.c-d"])
def test_a_stage_named_with_a_dash_or_a_dot_is_set_from_the_command_line(name):
    # `cold-start.max_steps=3` was "no stage named ['cold_start']; did you mean 'cold-start'
    # (cold-start.max_steps=...)?", the very override typed (the stage's - read as _, as an option's is), and
    # `v1.5.max_steps=3` "no stage named ['v1']"
    import random

    n = random.randint(2, 50)
    spec = {"model": "builtin:tiny", "stages": [{"name": name, "type": "sft", "dataset": "builtin:arithmetic"}]}
    for typed in (f"{name}.max_steps={n}", f"{name}.max-steps={n}"):
        assert load_pipeline(copy.deepcopy(spec), [typed]).stages[0].config.max_steps == n
    assert load_pipeline(copy.deepcopy(spec), [f"{name}.num-rows={n}"]).stages[0].num_rows == n



def test_a_stages_type_name_or_config_given_as_an_option_says_where_it_goes():
    # `grpo.type=sft` (or a config's `type: sft`) was "unknown option 'type' for GRPOConfig; did you mean dtype?"
    from r1fast.trainer.pipeline import DEFAULT_CONFIG

    for key in ("type", "name"):
        said = (f"command line: stage 'grpo': unknown option {key!r} for GRPOConfig; {key!r} is the stage's own key, "
                f"set in the pipeline file (the command line sets a stage's options and its model, dataset, num_rows, "
                f"evaluate)")
        with pytest.raises(ValueError, match=re.escape(said)):
            load_pipeline(DEFAULT_CONFIG, [f"grpo.{key}=sft"])
        spec = {"model": "builtin:tiny", "stages": [{"name": "a", "type": "sft", "dataset": "builtin:arithmetic",
                                                     "config": {key: "grpo"}}]}
        said = (f"pipeline: stage 'a': unknown option {key!r} for SFTConfig; {key!r} is the stage's own key: write it "
                f"beside 'config:', not inside it")
        with pytest.raises(ValueError, match=re.escape(said)):
            load_pipeline(spec)
    said = ("command line: stage 'grpo': unknown option 'config' for GRPOConfig; 'config' holds the stage's options "
            "in a pipeline file; on the command line set each, grpo.<option>=...")
    with pytest.raises(ValueError, match=re.escape(said)):
        load_pipeline(DEFAULT_CONFIG, ["grpo.config={max_steps: 3}"])



def test_a_stage_named_with_a_number_in_a_pipeline_file_is_named_as_written(tmp_path):
    # `name: 2024` was "'name' must be a folder name ...; got 2024", `name: 0100` "got 64" (YAML's octal)
    import random

    n = random.randint(1000, 9999)
    path = tmp_path / "p.yaml"
    path.write_text(f"model: builtin:tiny\nstages:\n  - {{name: {n}, type: sft, dataset: builtin:arithmetic}}\n"
                    f"  - {{name: 0100, type: sft, model: '@{n}', dataset: builtin:arithmetic}}\n")
    p = load_pipeline(str(path), [f"{n}.max_steps=3", "rerun_from=0100"])
    assert [s.name for s in p.stages] == [str(n), "0100"] and p.stages[0].config.max_steps == 3
    assert p.rerun_from == "0100"


def test_cli_errors_are_clear(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="does not exist"):
        main(["train", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit, match="unknown option 'learnin_rate'"):
        main(["sft", "learnin_rate=1"])
    with pytest.raises(SystemExit, match="needs model_name_or_path"):
        main(["sample", "num_samples=2"])
    with pytest.raises(SystemExit, match="sample's --resume takes no path \\('ckpt'\\)"):
        main(["sample", "model_name_or_path=builtin:tiny", "dataset=builtin:arithmetic", "--resume", "ckpt"])
    assert main(["sample", "--help"]) == 0
    out = capsys.readouterr().out
    assert "r1fast sample [CONFIG.yaml] [--resume]" in out and "OUTPUT_FILE.sample_progress.json" in out
    # its own options and defaults, not "GRPOConfig / SFTConfig / SampleConfig fields; <stage>.<key>=value"
    assert "GRPOConfig" not in out and "model_name_or_path (required)" in " ".join(out.split())
    assert all(s in out for s in ("num_samples=4", "output_file=runs/sample/samples.jsonl", "batch_prompts=64"))
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        main(["plot", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"unknown pipeline key.*bogus.*<stage>\.<option>"):
        main(["train", "--bogus", "1"])
    assert main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    # GRPOConfig's options with defaults, required first; the default pipeline still said
    assert "GRPOConfig's, with defaults: model_name_or_path (required), dataset (required), learning_rate=1e-06" in out
    assert all(s in out for s in ("num_generations=8", "fp8_grad_dtype='e5m2'", "embedded default pipeline",
                                  "docs/training.md", "--resume [PATH]"))
    assert "SFTConfig" not in out and "SampleConfig" not in out
    assert main(["sft", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "SFTConfig's, with defaults: model_name_or_path (required)" in out and "max_length=1024" in out
    assert "GRPOConfig" not in out
    assert main(["pipeline", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    # a pipeline's top-level keys are its own, not "GRPOConfig / SFTConfig / SampleConfig fields"
    assert "<stage>.<key>=value sets one stage's option" in out and "model, name, num_threads" in out
    assert "Config fields" not in out
    # the configs r1fast ships, by name from any directory (found: the run stops at the bad key instead)
    for cmd, name in (("train", "r1_pipeline"), ("pipeline", "distill.yaml"), ("train", "r1fast/configs/default.yaml")):
        with pytest.raises(SystemExit, match=r"unknown pipeline key.*bogus"):
            main([cmd, name, "--bogus", "1"])
    with pytest.raises(SystemExit, match="'r1_pipelin' does not exist.*r1fast's own configs: default, distill"):
        main(["train", "r1_pipelin"])


def test_train_help_does_not_say_the_default_runs_on_the_cpu(capsys):
    """`r1fast train --help` said the embedded default ran 'GRPO on CPU'; its pipeline has no device, so it runs on
    cuda wherever there is one."""
    from r1fast.trainer.pipeline import load_pipeline

    assert load_pipeline("default").device is None   # resolved per machine: cuda when present
    assert main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "on CPU" not in out and "on the GPU when there is one" in out


def test_pipeline_help_says_resume_goes_on_in_the_output_dir(capsys):
    """`r1fast pipeline --help` gave ./runs/<name> as --resume's folder; a pipeline with output_dir resumes there."""
    from r1fast.trainer.pipeline import load_pipeline

    assert load_pipeline("default", ["output_dir=elsewhere"]).run_dir.endswith("elsewhere")
    assert main(["pipeline", "--help"]) == 0
    assert "RUN_DIR: default the pipeline's output_dir, else ./runs/<name>" in " ".join(capsys.readouterr().out.split())


def test_cli_start_up_imports_no_torch():
    """`r1fast --help` built every command's help: the trainers and torch came with it, 2.5 s of 2.6."""
    import subprocess
    import sys

    code = ("import sys, r1fast.cli; r1fast.cli.build_parser(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr


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
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # TRL's running totals go on across the CLI's --resume: tokens seen (2 rollouts, then a third), epochs
    tokens = [r["num_tokens"] for r in rows]
    assert 0 < tokens[0] < tokens[1] < tokens[2] and tokens[2] - tokens[1] == pytest.approx(tokens[0], rel=0.5)
    assert rows[0]["epoch"] > 0 and [r["epoch"] for r in rows] == pytest.approx([rows[0]["epoch"] * k for k in (1, 2, 3)])
    pytest.importorskip("matplotlib")
    assert main(["plot", str(run)]) == 0
    assert (run / "curves.png").stat().st_size > 1000


def test_sft_and_sample_given_a_pipeline_file_say_to_run_it_as_one():
    # "r1fast sft r1_pipeline" said "unknown option 'name' for SFTConfig; did you mean run_name?"
    for command in ("sft", "sample"):
        with pytest.raises(SystemExit, match=rf"r1_pipeline.yaml is a pipeline \(it has 'stages'\), not a config for "
                                             rf"r1fast {command}: run it with r1fast pipeline"):
            main([command, "r1_pipeline"])


def test_sft_and_train_read_their_dataset_before_loading_the_model(tmp_path, monkeypatch):
    # a misspelt dataset path was said only once the model had loaded (minutes for a large one), as r1fast sample
    # and the trainers given a path do not
    monkeypatch.chdir(tmp_path)
    for command in ("sft", "train"):
        with pytest.raises(SystemExit, match=r"dataset 'dat.jsonl' does not exist"):
            main([command, "model_name_or_path=no_such_model", "dataset=dat.jsonl"])


def test_cli_grpo_from_the_command_line_alone(tmp_path, monkeypatch):
    # `r1fast sft key=value` ran without a YAML while `r1fast train model_name_or_path=...` was read as
    # options of the default pipeline and refused
    monkeypatch.chdir(tmp_path)
    args = ["train", "model_name_or_path=builtin:micro", "dataset=builtin:arithmetic?min_terms=2&max_terms=2",
            "per_device_train_batch_size=8", "num_generations=4", "max_completion_length=8", "max_prompt_length=16",
            "progress_bar=false"]
    assert main(args + ["--max_steps", "2"]) == 0
    assert [json.loads(line)["step"] for line in open(tmp_path / "runs" / "grpo" / "metrics.jsonl")] == [1, 2]
    assert main(args + ["max_steps=3", "--resume"]) == 0
    assert os.path.isdir(tmp_path / "runs" / "grpo" / "checkpoint-3")
    with pytest.raises(SystemExit, match="a GRPO config needs model_name_or_path and dataset; dataset is not set$"):
        main(["train", "model_name_or_path=builtin:micro"])
    with pytest.raises(SystemExit, match="sft needs model_name_or_path and dataset; model_name_or_path is not set"):
        main(["sft", "dataset=builtin:arithmetic"])
    with pytest.raises(SystemExit, match="unknown option 'learnin_rate'"):
        main(["train", "dataset=builtin:arithmetic", "learnin_rate=1"])
    with pytest.raises(SystemExit, match=r"unknown pipeline key.*'max_steps'"):  # no GRPO key: the pipeline
        main(["train", "max_steps=3"])


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


def test_sft_and_sample_read_the_named_split_of_a_saved_dataset(tmp_path, monkeypatch, capsys):
    datasets = pytest.importorskip("datasets")
    monkeypatch.chdir(tmp_path)
    train = [{"prompt": "1+1=", "answer": "2", "completion": "2"}]
    test = [{"prompt": f"{i}+1=", "answer": str(i + 1), "completion": str(i + 1)} for i in range(3)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                          "test": datasets.Dataset.from_list(test)}).save_to_disk(str(tmp_path / "dd"))
    out = tmp_path / "kept.jsonl"
    base = ["model_name_or_path=builtin:micro", f"dataset={tmp_path / 'dd'}", "num_samples=1", "max_completion_length=4",
            f"output_file={out}", "progress_bar=false", "reward_thresholds=[-1,-1]",
            "keep_truncated=true"]
    assert main(["sample", *base, "dataset_split=test"]) == 0
    assert sorted(json.loads(line)["prompt"] for line in open(out)) == sorted(r["prompt"] for r in test)
    assert main(["sample", *base]) == 0   # no split named: train
    assert [json.loads(line)["prompt"] for line in open(out)] == ["1+1="]
    with pytest.raises(SystemExit, match="no split 'dev'; splits: \\['train', 'test'\\]"):
        main(["sample", *base, "dataset_split=dev"])
    import r1fast.data

    read, load_rows_ = [], r1fast.data.load_rows
    monkeypatch.setattr(r1fast.data, "load_rows", lambda *a, **k: read.append(k["split"]) or load_rows_(*a, **k))
    assert main(["sft", "model_name_or_path=builtin:micro", f"dataset={tmp_path / 'dd'}", "dataset_split=test",
                 "max_steps=1", "per_device_train_batch_size=3", "output_dir=sft", "progress_bar=false"]) == 0
    assert read == ["test"]


def test_eval_dataset_reads_the_held_out_split_and_a_split_needs_splits(tmp_path):
    # a saved DatasetDict given as eval_dataset was read from the training split: "held-out" accuracy on
    # training rows, without a word; a split named for a single file used the whole file
    datasets = pytest.importorskip("datasets")
    from r1fast.data import load_rows
    from r1fast.trainer import GRPOConfig, GRPOTrainer
    from r1fast.trainer.common import load_model_and_tokenizer

    train = [{"prompt": f"{i}+2=", "answer": str(i + 2)} for i in range(8)]
    test = [{"prompt": f"{i}+3=", "answer": str(i + 3)} for i in range(4)]
    dd = str(tmp_path / "dd")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                          "test": datasets.Dataset.from_list(test)}).save_to_disk(dd)
    model, tok = load_model_and_tokenizer("builtin:micro", device="cpu")

    def trainer(**over):
        cfg = GRPOConfig(dataset=dd, eval_dataset=dd, eval_size=0, per_device_train_batch_size=4, num_generations=4,
                         max_completion_length=4, max_prompt_length=16, output_dir=str(tmp_path / "run"), **over)
        return GRPOTrainer(model, None, None, cfg, tokenizer=tok)

    tr = trainer()
    assert [r["prompt"] for r in tr.train_rows] == [r["prompt"] for r in train]
    assert [r["prompt"] for r in tr.eval_rows] == [r["prompt"] for r in test]
    with pytest.warns(UserWarning, match="every eval prompt is also a training prompt.*split train"):
        assert len(trainer(eval_dataset_split="train").eval_rows) == 8
    with pytest.raises(ValueError, match="has no split 'dev'"):
        trainer(eval_dataset_split="dev")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    for path in (str(tmp_path / "d.jsonl"), str(tmp_path / "one")):
        if path.endswith("one"):
            datasets.Dataset.from_list(train).save_to_disk(path)
        assert len(load_rows(path, split="train")) == 8  # the one set of rows is the train split
        with pytest.raises(ValueError, match=r"has no splits \(one file, or a saved Dataset\), so split 'test' cannot"):
            load_rows(path, split="test")


def test_sample_gives_rewards_the_completion_ids_and_writes_any_column(tmp_path, monkeypatch):
    # a reward function taking completion_ids (as GRPO passes them) failed in `r1fast sample`, and a
    # timestamp column crashed the JSONL writer after all the sampling
    pd = pytest.importorskip("pandas")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "idrewards.py").write_text(
        "def by_ids(prompts, completions, completion_ids, created, **kw):\n"
        "    assert len(completion_ids) == len(completions) and all(isinstance(t, int) for t in completion_ids[0])\n"
        "    return [float(len(ids)) for ids in completion_ids]\n")
    pd.DataFrame({"prompt": ["1+1=", "2+2="], "answer": ["2", "4"],
                  "created": [pd.Timestamp("2024-01-01"), pd.Timestamp("2024-01-02 03:04")]}).to_parquet(tmp_path / "d.parquet")
    out = tmp_path / "kept.jsonl"
    assert main(["sample", "model_name_or_path=builtin:micro", f"dataset={tmp_path / 'd.parquet'}", "num_samples=2",
                 "max_completion_length=4", f"output_file={out}", "progress_bar=false", "reward_funcs=[idrewards:by_ids]",
                 "reward_thresholds=[0]", "keep_truncated=true"]) == 0
    rows = [json.loads(line) for line in open(out)]
    assert rows and {r["created"] for r in rows} <= {"2024-01-01T00:00:00", "2024-01-02T03:04:00"}
    assert all(r["rewards"]["idrewards:by_ids"] >= 1 for r in rows)


def test_cli_names_a_path_it_cannot_write_in_one_line(tmp_path, monkeypatch):
    def refuses(cmd, setting, match, dataset="builtin:arithmetic"):   # before the (missing) model loads
        with pytest.raises(SystemExit, match=match):
            main([cmd, "model_name_or_path=no_such_model", f"dataset={dataset}", setting])

    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    for cmd in ("train", "sft"):   # said once the model had loaded, as "[Errno 20] Not a directory: 'afile/x'"
        refuses(cmd, "output_dir=afile/x", rf"^r1fast {cmd}: command line: option 'output_dir' = 'afile/x': {tmp_path}/afile "
                                           rf"is a file, not a folder; give another output_dir, the folder for")
        # "[Errno 17] File exists: 'afile'"
        refuses(cmd, "output_dir=afile", rf"^r1fast {cmd}: command line: option 'output_dir' = 'afile': {tmp_path}/afile is a "
                                         rf"file, not a folder; give")
    # sample found it only once every prompt was sampled, losing the rows; now before the model loads
    refuses("sample", "output_file=afile/x.jsonl", r"^r1fast sample: output_file 'afile/x.jsonl': .*afile is a file, "
                                                   r"not a folder; give another output_file$")
    (tmp_path / "adir").mkdir()   # found at the end too: "[Errno 21] Is a directory: 'adir.tmp' -> 'adir'"
    refuses("sample", "output_file=adir", r"^r1fast sample: output_file 'adir' is a folder; name the JSONL file "
                                          r"to write \(e.g. 'adir/samples.jsonl'\)$")
    # a folder not made yet: the samples went to a hidden "new/.tmp" and the rename over "new/" failed at the end
    refuses("sample", "output_file=new/", r"^r1fast sample: output_file 'new/' is a folder; name the JSONL file")
    # the output replaced the prompts it was sampled from, without a word
    (tmp_path / "d.jsonl").write_text('{"prompt": "1+1", "answer": "2"}\n')
    refuses("sample", "output_file=./d.jsonl", r"^r1fast sample: output_file './d.jsonl' is the dataset 'd.jsonl': "
                                               r"writing the samples would replace it; give another output_file$",
            dataset="d.jsonl")
    assert sorted(os.listdir(tmp_path)) == ["adir", "afile", "d.jsonl"]
    if hasattr(os, "mkfifo"):   # a pipe (as root, /dev/null) became a regular file once every prompt was sampled
        os.mkfifo(tmp_path / "pipe")
        refuses("sample", "output_file=pipe", r"^r1fast sample: output_file 'pipe' is not a regular file \(a device, "
                                              r"pipe or socket\).*name a JSONL file$")
    # a symlink to nothing (a disk not mounted): "[Errno 17] File exists: 'moved'" once the model had loaded, or
    # (sample) once every prompt was sampled
    os.symlink("gone/run", tmp_path / "moved")
    for cmd in ("train", "sft"):
        refuses(cmd, "output_dir=moved/x", rf"^r1fast {cmd}: command line: option 'output_dir' = 'moved/x': {tmp_path}/moved is "
                                           rf"a symlink to 'gone/run', which does not exist \(make it, or mount")
    refuses("sample", "output_file=moved/x.jsonl", r"^r1fast sample: output_file 'moved/x.jsonl': .*/moved is a "
                                                   r"symlink to 'gone/run', which does not exist")
    os.symlink("gone/out.jsonl", tmp_path / "out.jsonl")
    refuses("sample", "output_file=out.jsonl", r"^r1fast sample: output_file 'out.jsonl' is a symlink to "
                                               r"'gone/out.jsonl', whose folder does not exist")
    assert not os.path.exists(tmp_path / "gone")


def test_cli_sample_names_a_misspelt_answer_column_before_the_model_loads(tmp_path, monkeypatch):
    # rejection_sample said it once the model had loaded (minutes for a large one); the data is read before it
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text('{"prompt": "1+1=", "answer": "2", "ref": "2"}\n')
    with pytest.raises(SystemExit, match=r"^r1fast sample: reward 'accuracy' needs the answer column 'rfe' \(option "
                                         r"'answer_column'\); the prompt dataset has \['answer', 'prompt', 'ref'\]$"):
        main(["sample", "model_name_or_path=no_such_model", "dataset=d.jsonl", "answer_column=rfe",
              "reward_funcs=[accuracy]"])


def test_a_sample_stages_output_file_that_cannot_be_written_is_refused_before_any_stage_runs(tmp_path):
    # found once the stages before it had trained and it had sampled every prompt: "[Errno 21] Is a directory"
    spec = tiny_pipeline(tmp_path)
    rs = next(s for s in spec["stages"] if s["type"] == "sample")
    rs.setdefault("config", {})["output_file"] = str(tmp_path)
    with pytest.raises(ValueError, match=r"stage 'rs': output_file '.*' is a folder; name the JSONL file to write"):
        load_pipeline(spec)


def test_a_pipelines_output_dir_that_cannot_be_made_is_refused_when_it_is_read(tmp_path, monkeypatch):
    # train/sft named such an output_dir; a pipeline's said "[Errno 17] File exists" (under a file: "[Errno 20]",
    # under a symlink to nothing: "[Errno 2]") with no option named
    (tmp_path / "afile").write_text("")
    os.symlink("gone/run", tmp_path / "moved")
    for out, why in (("afile", "afile is a file, not a folder"), ("afile/x", "afile is a file, not a folder"),
                     ("moved/x", "moved is a symlink to 'gone/run', which does not exist")):
        spec = {**tiny_pipeline(tmp_path), "output_dir": str(tmp_path / out)}
        with pytest.raises(ValueError, match=rf"pipeline: output_dir = '.*{out}': .*{why}.*; give another output_dir"):
            load_pipeline(spec)
    # a folder the user cannot write (not testable as root, whom os.access lets write anywhere)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match=rf"output_dir = '.*': folder {tmp_path} cannot be written"):
        load_pipeline({**tiny_pipeline(tmp_path), "output_dir": str(tmp_path / "new")})


def test_a_sample_stages_output_file_that_an_earlier_stage_reads_is_refused(tmp_path):
    # only the stage's own dataset was compared: a cold-start stage's data file (or the pipeline's eval_dataset)
    # named as a later sample stage's output_file was replaced by the samples without a word
    data = tmp_path / "cold.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2", "answer": "2"}\n')
    spec = tiny_pipeline(tmp_path)
    spec["stages"][0]["dataset"] = str(data)
    rs = next(s for s in spec["stages"] if s["type"] == "sample")
    rs["config"]["output_file"] = str(data)
    with pytest.raises(ValueError, match=r"stage 'rs': output_file '.*cold.jsonl' is the dataset of stage 'cold' "
                                         r"'.*cold.jsonl': writing the samples would replace it; give another "
                                         r"output_file$"):
        load_pipeline(spec)
    spec["stages"][0]["dataset"] = "builtin:arithmetic"
    with pytest.raises(ValueError, match=r"output_file '.*cold.jsonl' is the pipeline's eval_dataset"):
        load_pipeline({**spec, "eval_dataset": str(data)})


def test_a_stage_reading_a_sample_stage_whose_file_a_later_round_wrote_again_is_refused(tmp_path, monkeypatch):
    # rs writes s.jsonl, rs2 writes it again, then a stage reads "@rs": rs's samples from memory on the first run,
    # but s.jsonl, rs2's samples, on a --resume after rs2 (the path pipeline_state.json recorded for rs)
    monkeypatch.chdir(tmp_path)
    spec = tiny_pipeline(tmp_path)
    spec["stages"][2]["config"]["output_file"] = "s.jsonl"
    spec["stages"].append({**copy.deepcopy(spec["stages"][2]), "name": "rs2"})
    spec["stages"].append({**copy.deepcopy(spec["stages"][3]), "name": "student2", "dataset": "@rs"})
    with pytest.raises(ValueError, match=r"stage 'student2': dataset '@rs' is read back from 's.jsonl' on --resume, "
                                         r"which stage 'rs2' writes again before this stage"):
        load_pipeline(copy.deepcopy(spec))
    spec["stages"][-1]["dataset"] = "@rs2"   # the newest round's
    load_pipeline(spec)


def test_a_later_sample_round_may_write_again_the_file_an_earlier_round_wrote(tmp_path, monkeypatch):
    # the file an earlier sample stage writes (read back by path by the SFT stage after it) is the pipeline's own:
    # refused as 'the dataset of stage ...' once it existed, the pipeline loaded on its first run, not on --resume
    monkeypatch.chdir(tmp_path)
    spec = tiny_pipeline(tmp_path)
    spec["stages"][2]["config"]["output_file"] = "s.jsonl"
    spec["stages"][3]["dataset"] = "s.jsonl"
    spec["stages"].append({**copy.deepcopy(spec["stages"][2]), "name": "rs2"})
    load_pipeline(copy.deepcopy(spec))
    (tmp_path / "s.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n')   # the first round's samples
    load_pipeline(copy.deepcopy(spec))
    spec["stages"][-1]["dataset"] = str(tmp_path / "s.jsonl")   # its own prompts it still may not replace
    with pytest.raises(ValueError, match=r"stage 'rs2': output_file 's.jsonl' is the dataset of stage 'rs2'"):
        load_pipeline(copy.deepcopy(spec))
    # refused on the first run too, before the first round has written it (loaded, then refused on --resume)
    os.remove(tmp_path / "s.jsonl")
    with pytest.raises(ValueError, match=r"stage 'rs2': output_file 's.jsonl' is the dataset of stage 'rs2'"):
        load_pipeline(spec)


def test_cli_reports_a_failing_reward_function_without_a_traceback(tmp_path, monkeypatch):
    # RewardError is not a ValueError: it escaped the CLI as a traceback.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "boom.py").write_text("def f(prompts, completions, **kw):\n    raise KeyError('gold')\n")
    cfg = tmp_path / "g.yaml"
    cfg.write_text("model_name_or_path: builtin:micro\ndataset: builtin:arithmetic?min_terms=2&max_terms=2\n"
                   "per_device_train_batch_size: 4\nnum_generations: 4\nmax_completion_length: 4\n"
                   "max_prompt_length: 16\nmax_steps: 1\nprogress_bar: false\nreward_funcs: [boom.py:f]\n")
    with pytest.raises(SystemExit, match=r"r1fast train: reward function 'boom.py:f' raised KeyError") as e:
        main(["train", str(cfg)])
    assert "--resume" not in str(e.value)   # no checkpoint to resume from


def test_cli_says_how_to_resume_a_run_that_failed_after_a_checkpoint(tmp_path, monkeypatch):
    # Ctrl-C printed the --resume command; an error mid-run (a reward function that raised) said nothing of the
    # checkpoints kept, for `r1fast train` a GRPO run or a pipeline
    monkeypatch.chdir(tmp_path)
    (tmp_path / "late.py").write_text("calls = [0]\ndef f(prompts, completions, **kw):\n    calls[0] += 1\n"
                                      "    if calls[0] > 1:\n        raise KeyError('gold')\n"
                                      "    return [0.0] * len(completions)\n")
    grpo = ("per_device_train_batch_size: 4\nnum_generations: 4\nmax_completion_length: 4\nmax_prompt_length: 16\n"
            "max_steps: 2\nsave_steps: 1\nreward_funcs: [late.py:f]\n")
    cfg = tmp_path / "g.yaml"
    cfg.write_text("model_name_or_path: builtin:micro\ndataset: builtin:arithmetic?min_terms=2&max_terms=2\n"
                   "progress_bar: false\n" + grpo)
    with pytest.raises(SystemExit) as e:
        main(["train", str(cfg), "output_dir=g"])
    first, hint = str(e.value).split("\n")
    assert first.startswith("r1fast train: reward function 'late.py:f' raised KeyError: 'gold'")
    assert hint == f"r1fast train: its checkpoints are kept; once that is fixed, continue with: r1fast train {cfg} output_dir=g --resume"
    # a reward file is imported once per process while unchanged: the pipeline gets a fresh one, its count at 0
    (tmp_path / "late2.py").write_text((tmp_path / "late.py").read_text())
    spec = tmp_path / "p.yaml"
    spec.write_text("name: p\nmodel: builtin:micro\nprogress_bar: false\nstages:\n"
                    "  - {name: s, type: grpo, dataset: 'builtin:arithmetic?min_terms=2&max_terms=2', config: {"
                    + ", ".join(grpo.replace("late.py", "late2.py").strip().split("\n")) + "}}\n")
    with pytest.raises(SystemExit, match=rf"raised KeyError.*\nr1fast pipeline: .*continue with: r1fast pipeline "
                                         rf"{spec} --resume$"):
        main(["pipeline", str(spec)])


def one_sft_stage_spec(tmp_path, top: str = ""):
    """A pipeline YAML of one 1-step SFT stage `s` on the built-in micro model; `top`: more top-level keys."""
    spec = tmp_path / "p.yaml"
    spec.write_text("name: p\nmodel: builtin:micro\nprogress_bar: false\n" + top + "stages:\n"
                    "  - {name: s, type: sft, dataset: builtin:arithmetic, num_rows: 8,\n"
                    "     config: {max_steps: 1, per_device_train_batch_size: 4}}\n")
    return spec


def test_pipeline_num_threads_applies_to_its_run_only(tmp_path, monkeypatch):
    # run_pipeline with num_threads: 1 left torch at 1 thread for the rest of the calling process
    import torch

    from r1fast.trainer.sft import SFTTrainer

    class Stop(Exception):
        pass

    seen = []

    def train(self, *a, **k):   # what the stage trains with; stopping here also checks the error path
        seen.append(torch.get_num_threads())
        raise Stop

    monkeypatch.setattr(SFTTrainer, "train", train)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(Stop):
            run_pipeline(str(one_sft_stage_spec(tmp_path, "num_threads: 1\n")), [f"output_dir={tmp_path / 'run'}"])
        assert (seen, torch.get_num_threads()) == ([1], 2)
    finally:
        torch.set_num_threads(threads)


def test_a_finished_stages_trainer_and_model_are_freed_before_the_next_stage_builds_its_own(tmp_path, monkeypatch):
    # the loop's `tr` kept the finished stage's trainer (optimizer state, rollout engine and its KV pool) alive
    # while the next stage built its own, and `model` kept the earlier model alive while a stage loaded its own
    import weakref

    from r1fast.trainer.pipeline import PipelineRunner
    from r1fast.trainer.sft import SFTTrainer

    trainers, models, alive = [], [], []
    init, load = SFTTrainer.__init__, PipelineRunner.load_model

    def counted_init(self, *a, **k):
        alive.append(("trainers", sum(t() is not None for t in trainers)))
        init(self, *a, **k)
        trainers.append(weakref.ref(self))

    def counted_load(self, *a, **k):
        alive.append(("models", sum(m() is not None for m in models)))
        model, tok = load(self, *a, **k)
        models.append(weakref.ref(model))
        return model, tok

    monkeypatch.setattr(SFTTrainer, "__init__", counted_init)
    monkeypatch.setattr(PipelineRunner, "load_model", counted_load)
    spec = tmp_path / "p.yaml"
    spec.write_text("name: p\nmodel: builtin:micro\nprogress_bar: false\nstages:\n"
                    "  - {name: a, type: sft, dataset: builtin:arithmetic, num_rows: 8,\n"
                    "     config: {max_steps: 1, per_device_train_batch_size: 4}}\n"
                    "  - {name: b, type: sft, model: builtin:micro, dataset: builtin:arithmetic, num_rows: 8,\n"
                    "     config: {max_steps: 1, per_device_train_batch_size: 4}}\n")
    run_pipeline(str(spec), [f"output_dir={tmp_path / 'run'}"])
    assert alive == [("models", 0), ("trainers", 0), ("models", 0), ("trainers", 0)]


def test_a_grpo_stages_fp8_model_is_freed_before_the_next_stage_loads_its_own(tmp_path, monkeypatch):
    # after an FP8 GRPO stage the pipeline dropped its model (the next stage reloads the checkpoint in high
    # precision) without _free_memory: the next stage loaded its model, and a GRPO stage sized its KV pool,
    # with the dropped model's memory still in the allocator's cache (and any reference cycle alive)
    import gc
    import weakref

    from r1fast.trainer import pipeline
    from r1fast.trainer.pipeline import PipelineRunner

    class Loaded(Exception):
        pass

    models, events = [], []
    load, free = PipelineRunner.load_model, pipeline._free_memory

    def counted_load(self, *a, **k):
        events.append(("load", sum(m() is not None for m in models)))
        if models:
            raise Loaded   # the next stage need not train
        model, tok = load(self, *a, **k)
        models.append(weakref.ref(model))
        return model, tok

    def counted_free():
        free()
        events.append(("free", sum(m() is not None for m in models)))

    monkeypatch.setattr(PipelineRunner, "load_model", counted_load)
    monkeypatch.setattr(pipeline, "_free_memory", counted_free)
    spec = {"name": "f", "seed": 0, "model": "builtin:micro", "progress_bar": False, "eval_dataset": None,
            "output_dir": str(tmp_path / "run"),
            "stages": [{"name": "rl", "type": "grpo", "dataset": "builtin:arithmetic?min_terms=2&max_terms=2",
                        "num_rows": 4, "config": {"max_steps": 1, "per_device_train_batch_size": 2,
                                                  "num_generations": 2, "max_completion_length": 2,
                                                  "max_prompt_length": 16, "fp8": "emulate"}},
                       {"name": "s2", "type": "sft", "dataset": "builtin:arithmetic", "num_rows": 4,
                        "config": {"max_steps": 1, "per_device_train_batch_size": 2}}]}
    gc.disable()   # a reference cycle is then freed only where the pipeline frees memory
    try:
        with pytest.raises(Loaded):
            run_pipeline(spec)
    finally:
        gc.enable()
    assert events[-2:] == [("free", 0), ("load", 0)]


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


def test_a_pipeline_resume_from_a_missing_folder_says_it_is_missing(tmp_path, monkeypatch):
    # said "not a pipeline run folder (no pipeline_state.json)", as if the folder were there
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=rf"^r1fast train: --resume 'runs/typo': no such file or folder "
                                         rf"\(from {re.escape(str(tmp_path))}\)$"):
        main(["train", "--resume", "runs/typo"])


def test_resume_without_an_earlier_run_says_it_starts_fresh(tmp_path, capsys):
    spec = one_sft_stage_spec(tmp_path)
    assert main(["pipeline", str(spec), f"output_dir={tmp_path / 'new'}", "--resume"]) == 0
    assert "--resume: no earlier run in" in capsys.readouterr().out


@pytest.mark.parametrize("damaged", ["", "[1, 2]"])
def test_resume_names_a_damaged_pipeline_state(tmp_path, damaged):
    # an empty pipeline_state.json (a crash soon after an unsynced rename) was json's bare "Expecting
    # value: line 1 column 1 (char 0)"; a list, a TypeError traceback
    spec = one_sft_stage_spec(tmp_path)
    cmd = ["pipeline", str(spec), f"output_dir={tmp_path / 'run'}"]
    assert main(cmd) == 0
    (tmp_path / "run" / "pipeline_state.json").write_text(damaged)
    with pytest.raises(SystemExit, match=r"run/pipeline_state\.json is not (valid JSON|a pipeline state).*"
                                         r"overwrite_output_dir=true"):
        main(cmd + ["--resume"])
    with pytest.raises(SystemExit, match="holds an earlier run"):
        main(cmd)
    assert main(cmd + ["overwrite_output_dir=true"]) == 0


def test_resume_names_a_damaged_line_of_a_sample_stages_output(tmp_path, monkeypatch):
    spec = tmp_path / "p.yaml"
    spec.write_text("name: p\nmodel: builtin:micro\nprogress_bar: false\nstages:\n"
                    "  - {name: rs, type: sample, dataset: builtin:arithmetic, num_rows: 2,\n"
                    "     config: {num_samples: 1, max_completion_length: 4, reward_funcs: [format],"
                    " reward_thresholds: [0.0], keep_truncated: true}}\n"
                    "  - {name: t, type: sft, dataset: '@rs', config: {max_steps: 1, per_device_train_batch_size: 2}}\n")
    cmd = ["pipeline", str(spec), f"output_dir={tmp_path / 'run'}"]
    assert main(cmd) == 0
    state_path = tmp_path / "run" / "pipeline_state.json"
    state = json.loads(state_path.read_text())
    state["stages"].pop("t")   # as if stopped before stage t finished
    state_path.write_text(json.dumps(state))
    with open(tmp_path / "run" / "rs" / "samples.jsonl", "a") as f:
        f.write("garbage\n")
    with pytest.raises(SystemExit, match=r"rs/samples\.jsonl line \d+: not valid JSON"):
        main(cmd + ["--resume"])


def test_resume_says_a_finished_stage_keeps_its_results_over_new_options(tmp_path, capsys):
    # lowering a finished sample stage's thresholds and resuming silently kept its empty output
    spec = one_sft_stage_spec(tmp_path)
    cmd = ["pipeline", str(spec), f"output_dir={tmp_path / 'run'}"]
    assert main(cmd) == 0
    capsys.readouterr()
    assert main(cmd + ["--resume"]) == 0
    assert "finished in the earlier run" not in capsys.readouterr().err
    assert main(cmd + ["s.learning_rate=0.5", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "r1fast: --resume: stage 's' finished in the earlier run, whose results are kept; its options given " \
           "now differ (learning_rate 1e-05 -> 0.5) and are not applied (overwrite_output_dir=true" in err


def test_resume_names_a_finished_stages_new_dataset(tmp_path, capsys):
    # the config's own `dataset` (None in a pipeline) hid the stage's: a new dataset went unmentioned
    spec = one_sft_stage_spec(tmp_path)
    cmd = ["pipeline", str(spec), f"output_dir={tmp_path / 'run'}"]
    assert main(cmd) == 0
    assert json.load(open(tmp_path / "run" / "pipeline_state.json"))["stages"]["s"]["options"]["dataset"] == \
        "builtin:arithmetic"
    capsys.readouterr()
    assert main(cmd + ["s.dataset=builtin:arithmetic?max_terms=4", "--resume"]) == 0
    assert "now differ (dataset 'builtin:arithmetic' -> 'builtin:arithmetic?max_terms=4')" in capsys.readouterr().err


def test_a_copied_or_relative_run_folder_resumes_from_its_own_files(tmp_path, monkeypatch):
    # pipeline_state.json held the paths as given: a relative output_dir's did not resolve from another
    # directory (--resume RUN_DIR), and a copied run folder's next stage loaded the original's checkpoint
    import shutil

    spec = tmp_path / "p.yaml"
    spec.write_text("name: p\nmodel: builtin:micro\nprogress_bar: false\nstages:\n"
                    "  - {name: s, type: sft, dataset: builtin:arithmetic, num_rows: 8,\n"
                    "     config: {max_steps: 1, per_device_train_batch_size: 4}}\n"
                    "  - {name: rs, type: sample, dataset: builtin:arithmetic, num_rows: 2,\n"
                    "     config: {num_samples: 1, max_completion_length: 4, reward_funcs: [format],"
                    " reward_thresholds: [0.0], keep_truncated: true}}\n"
                    "  - {name: t, type: sft, dataset: '@rs', config: {max_steps: 1, per_device_train_batch_size: 2}}\n")
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    assert main(["pipeline", str(spec), "output_dir=run"]) == 0
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tmp_path / "a" / "run", tmp_path / "copy")
    for run in (tmp_path / "a" / "run", tmp_path / "copy"):   # as if killed before stage t finished
        state = json.loads((run / "pipeline_state.json").read_text())
        del state["stages"]["t"]
        (run / "pipeline_state.json").write_text(json.dumps(state))
        shutil.rmtree(run / "t")
    assert main(["pipeline", str(spec), "--resume", "a/run"]) == 0
    assert (tmp_path / "a" / "run" / "t" / "checkpoint-1").is_dir()
    shutil.rmtree(tmp_path / "a")
    assert main(["pipeline", str(spec), "--resume", "copy"]) == 0
    assert (tmp_path / "copy" / "t" / "checkpoint-1").is_dir()


def _sample_then_sft_spec(tmp_path, output_file=None):
    """s (SFT) → rs (sample, `output_file`) → t (SFT on @rs): the YAML's path."""
    spec = tmp_path / "p.yaml"
    extra = f", output_file: {output_file}" if output_file else ""
    spec.write_text("name: p\nmodel: builtin:micro\nprogress_bar: false\nstages:\n"
                    "  - {name: s, type: sft, dataset: builtin:arithmetic, num_rows: 8,\n"
                    "     config: {max_steps: 1, per_device_train_batch_size: 4}}\n"
                    "  - {name: rs, type: sample, dataset: builtin:arithmetic, num_rows: 2,\n"
                    "     config: {num_samples: 1, max_completion_length: 4, reward_funcs: [format],"
                    f" reward_thresholds: [0.0], keep_truncated: true{extra}}}}}\n"
                    "  - {name: t, type: sft, dataset: '@rs', config: {max_steps: 1, per_device_train_batch_size: 2}}\n")
    return spec


def _unfinish(run, stage):
    """As if the run was stopped before `stage` finished; returns the state left."""
    import shutil

    state = json.loads((run / "pipeline_state.json").read_text())
    del state["stages"][stage]
    shutil.rmtree(run / stage)
    (run / "pipeline_state.json").write_text(json.dumps(state))
    return state


def test_a_run_folder_of_an_older_r1fast_that_recorded_paths_as_given_resumes(tmp_path, monkeypatch):
    # pipeline_state.json of r1fast before the paths relative to the run folder held them as given:
    # output_dir=runs/p recorded 'runs/p/s/checkpoint-1', read back as <run>/runs/p/s/checkpoint-1 and
    # named gone ("start the run over with overwrite_output_dir=true": the whole run deleted)
    spec = _sample_then_sft_spec(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["pipeline", str(spec), "output_dir=runs/p"]) == 0
    run = tmp_path / "runs" / "p"
    state = _unfinish(run, "t")
    state.pop("format", None)
    for st in state["stages"].values():   # the older file: no format, the paths as the run gave them
        for key in ("checkpoint", "samples"):
            if key in st:
                st[key] = os.path.join("runs", "p", st[key])
    (run / "pipeline_state.json").write_text(json.dumps(state))
    assert main(["pipeline", str(spec), "output_dir=runs/p", "--resume"]) == 0
    assert (run / "t" / "checkpoint-1").is_dir()
    saved = json.loads((run / "pipeline_state.json").read_text())
    assert saved["format"] == 2
    assert [saved["stages"][n].get("checkpoint") or saved["stages"][n]["samples"] for n in ("s", "rs", "t")] == \
        ["s/checkpoint-1", "rs/samples.jsonl", "t/checkpoint-1"]


def test_a_sample_stages_relative_output_file_outside_the_run_folder_is_found_on_resume(tmp_path, monkeypatch):
    # recorded as given ('kept.jsonl') and read back inside the run folder: "<run>/kept.jsonl ... is gone"
    spec = _sample_then_sft_spec(tmp_path, output_file="kept.jsonl")
    monkeypatch.chdir(tmp_path)
    assert main(["pipeline", str(spec), "output_dir=runs/p"]) == 0
    run = tmp_path / "runs" / "p"
    _unfinish(run, "t")
    assert main(["pipeline", str(spec), "output_dir=runs/p", "--resume"]) == 0
    assert (run / "t" / "checkpoint-1").is_dir()
    assert json.loads((run / "pipeline_state.json").read_text())["stages"]["rs"]["samples"] == \
        str(tmp_path / "kept.jsonl")   # recorded absolute


@pytest.mark.parametrize("fmt, says", [(3, r"has format 3, written by a newer r1fast than this one \(which reads up "
                                           r"to 2\): resume the run with that r1fast"),
                                       ("2", r"format is '2', not a format r1fast wrote"),
                                       (1, r"format is 1, not a format r1fast wrote")])
def test_a_pipeline_state_of_another_format_is_refused(tmp_path, fmt, says):
    spec = one_sft_stage_spec(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "pipeline_state.json").write_text(json.dumps({"format": fmt, "order": ["s"], "stages": {}}))
    with pytest.raises(SystemExit, match=r"run/pipeline_state\.json:? " + says):
        main(["pipeline", str(spec), f"output_dir={run}", "--resume"])
    assert not (run / "s").exists()


def test_resume_names_a_finished_stages_output_that_is_gone(tmp_path):
    # a deleted samples file read "stage 'rs' has not produced samples yet" (it had, and finished), and a
    # deleted checkpoint "model '<path>' is not a folder (give a local Hugging Face checkpoint ...)"
    import shutil

    spec = tiny_pipeline(tmp_path)
    spec["stages"][3].pop("model")
    spec["stages"].append({"name": "again", "type": "sft", "model": "@cold", "dataset": "@rs",
                           "config": {"max_steps": 1, "per_device_train_batch_size": 4}})
    for s in spec["stages"]:
        s.setdefault("evaluate", False)
    run = tmp_path / "run"
    run_pipeline(spec)

    def unfinish(*names):
        state = json.loads((run / "pipeline_state.json").read_text())
        for name in names:
            del state["stages"][name]
            shutil.rmtree(run / name)
        (run / "pipeline_state.json").write_text(json.dumps(state))

    unfinish("student", "again")
    os.remove(run / "rs" / "samples.jsonl")
    with pytest.raises(ValueError, match=r"stage 'student': .*rs/samples.jsonl, the samples stage 'rs' kept, is "
                                         r"gone \(restore it, or start the run over with overwrite_output_dir=true\)"):
        run_pipeline(spec, resume=True)
    shutil.rmtree(run / "rl")
    with pytest.raises(ValueError, match=r"stage 'student' starts from .*rl/checkpoint-2, the checkpoint an earlier "
                                         r"stage finished with, which is gone \(restore it"):
        run_pipeline(spec, resume=True)
    spec["stages"][3]["model"] = "builtin:micro"
    run_pipeline({**spec, "stages": spec["stages"][:3] + [{**spec["stages"][3], "dataset": "builtin:arithmetic"}]},
                 resume=True)
    shutil.rmtree(run / "cold")
    with pytest.raises(ValueError, match=r"model '@cold': that stage's checkpoint .*cold/checkpoint-3 is gone"):
        run_pipeline({**spec, "stages": [*spec["stages"][:3], {**spec["stages"][3], "dataset": "builtin:arithmetic"},
                                         {**spec["stages"][4], "dataset": "builtin:arithmetic"}]}, resume=True)


def test_an_sft_stage_reads_a_messages_column(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"{i}+1"}, {"role": "assistant", "content": f"{i + 1}"}]}
            for i in range(4)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = tmp_path / "p.yaml"
    spec.write_text("name: p\nmodel: builtin:micro\nprogress_bar: false\nstages:\n"
                    f"  - {{name: s, type: sft, dataset: {tmp_path / 'chat.jsonl'},\n"
                    "     config: {max_steps: 1, per_device_train_batch_size: 4}}\n")
    assert main(["pipeline", str(spec), f"output_dir={tmp_path / 'run'}"]) == 0
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": rows[0]["messages"][:1] * 2}) + "\n")
    with pytest.raises(SystemExit, match=r"stage 's': dataset: row 0 \('.*chat.jsonl' line 1\): the last of its 'messages' is trained on"):
        main(["pipeline", str(spec), f"output_dir={tmp_path / 'run2'}"])


def test_summary_without_an_eval_dataset_says_nothing_was_held_out(tmp_path, capsys):
    # it printed "held-out: 128 prompts × 4 samples at temperature 1.0" for a run that evaluated nothing
    assert main(["pipeline", str(one_sft_stage_spec(tmp_path)), f"output_dir={tmp_path / 'run'}"]) == 0
    out = capsys.readouterr().out
    assert "held-out: none (no eval_dataset)" in out and "prompts ×" not in out


def test_after_a_sample_stage_with_its_own_model_a_resumed_run_trains_what_a_fresh_one_does(tmp_path):
    # the stage after it trained the sample stage's model in a fresh run, but the last checkpoint before it
    # (here stage b's) once the sample stage had finished in an earlier invocation
    sft = {"max_steps": 1, "per_device_train_batch_size": 4, "learning_rate": 1e-2}
    spec = {"name": "m", "seed": 0, "model": "builtin:micro", "progress_bar": False,
            "stages": [{"name": "a", "type": "sft", "dataset": "builtin:arithmetic", "num_rows": 8, "config": sft},
                       {"name": "b", "type": "sft", "dataset": "builtin:arithmetic", "num_rows": 8, "config": sft},
                       {"name": "rs", "type": "sample", "model": "@a", "dataset": "builtin:arithmetic", "num_rows": 2,
                        "config": {"num_samples": 1, "max_completion_length": 4, "reward_funcs": ["format"],
                                   "reward_thresholds": [0.0], "keep_truncated": True}},
                       {"name": "t", "type": "sft", "dataset": "@rs", "config": sft}]}
    assert_last_stage_resumes_as_it_ran(spec, tmp_path, "t", "checkpoint-1")


def test_an_eval_dataset_without_answers_is_an_error_before_the_first_stage_trains(tmp_path):
    # it was found by the evaluation after the first stage, which had trained (and again on every --resume)
    (tmp_path / "e.jsonl").write_text('{"prompt": "1+1="}\n')
    spec = one_sft_stage_spec(tmp_path, f"eval_dataset: {tmp_path / 'e.jsonl'}\n")
    with pytest.raises(SystemExit, match=r"eval_dataset .*e.jsonl': its rows lack the answer column 'answer'"):
        main(["pipeline", str(spec), f"output_dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run" / "s").exists()
    # answers all missing or empty: eval/accuracy read 0.0, measuring nothing
    (tmp_path / "e.jsonl").write_text('{"prompt": "1+1=", "answer": null}\n{"prompt": "2+2=", "answer": " "}\n')
    with pytest.raises(SystemExit, match=r"no row has a reference answer in column 'answer'"):
        main(["pipeline", str(spec), f"output_dir={tmp_path / 'run'}"])


def test_plot_names_a_bad_metrics_line(tmp_path, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n')
    with pytest.raises(SystemExit, match=r"metrics.jsonl line 2: not valid JSON"):
        main(["plot", str(tmp_path)])
    (tmp_path / "logged_nothing").mkdir()
    with monkeypatch.context() as without_matplotlib:   # the file's problem, not "pip install matplotlib"
        without_matplotlib.setitem(sys.modules, "matplotlib", None)
        with pytest.raises(SystemExit, match=r"metrics.jsonl line 2: not valid JSON"):
            main(["plot", str(tmp_path)])
        with pytest.raises(SystemExit, match="no metrics.jsonl"):
            main(["plot", str(tmp_path / "logged_nothing")])
    # a run still writing its last line (no newline yet): plotted without it, as the next look will have it
    pytest.importorskip("matplotlib")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert main(["plot", str(tmp_path)]) == 0
    from r1fast.trainer.metrics import read_metrics

    with pytest.raises(ValueError, match="line 3: not valid JSON"):   # elsewhere (a resume) it still counts
        read_metrics(str(tmp_path))


def test_plot_leaves_the_callers_matplotlib_backend_and_figures_alone(tmp_path):
    # plot_run called matplotlib.use("Agg"): a notebook's inline plots stopped showing for the rest of the
    # session; and a figure whose save failed stayed open in pyplot
    matplotlib = pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from r1fast.trainer.plot import plot_run

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    old = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        assert os.path.getsize(plot_run(str(tmp_path))) > 1000
        with pytest.raises(OSError):   # a save that fails: its folder is a file
            plot_run(str(tmp_path), str(tmp_path / "metrics.jsonl" / "c.png"))
        assert (matplotlib.get_backend(), plt.get_fignums()) == ("svg", [])
    finally:
        matplotlib.use(old)


def test_plot_on_a_full_disk_keeps_the_last_image_and_names_the_file(tmp_path, monkeypatch):
    # savefig wrote straight into curves.png: a full disk part way left a truncated image in place of the
    # last good one, and the error was "[Errno 28] No space left on device", naming no file
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n{"step": 2, "reward": 0.7}\n')
    assert main(["plot", str(tmp_path)]) == 0
    good = (tmp_path / "curves.png").read_bytes()

    def full_disk(fig, f, **kw):
        f.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    with pytest.raises(SystemExit, match=r"No space left on device: '.*curves\.png"):
        main(["plot", str(tmp_path)])
    assert (tmp_path / "curves.png").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]
    monkeypatch.undo()
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "c.svg")]) == 0   # the format still from the name
    assert b"<svg" in (tmp_path / "c.svg").read_bytes()[:500]


def test_plot_makes_the_folders_of_out(tmp_path, monkeypatch, capsys):
    # --out plots/run.png, plots/ not made yet, said "r1fast plot: [Errno 2] No such file or directory: 'plots/run.png'"
    pytest.importorskip("matplotlib")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "reward": 0.25}\n{"step": 2, "reward": 0.75}\n')
    monkeypatch.chdir(tmp_path)
    assert main(["plot", ".", "--out", "plots/a/run.png"]) == 0
    assert (tmp_path / "plots" / "a" / "run.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote plots/a/run.png" in capsys.readouterr().out


def test_held_out_evaluation_takes_the_pipelines_system_prompt_and_format_pattern(tmp_path, monkeypatch):
    # every stage was evaluated without a system prompt and against the default format: a model trained to
    # answer under one (or in another format) read as untrained between stages
    scripted(monkeypatch, {"Think first": [GOOD_A], "": ["<answer>4</answer>"]})
    spec = one_sft_stage_spec(tmp_path, "eval_dataset: builtin:arithmetic\neval_size: 2\neval_samples_per_prompt: 1\n")

    def held_out_format(name, *over):
        assert main(["pipeline", str(spec), f"output_dir={tmp_path / name}", *over]) == 0
        return json.load(open(tmp_path / name / "summary.json"))["stages"][0]["format"]

    assert held_out_format("plain") == 0.0
    assert held_out_format("system", "eval_system_prompt=Think first") == 1.0
    assert held_out_format("pattern", "eval_format_pattern=^<answer>.*</answer>$") == 1.0
    with pytest.raises(SystemExit, match="eval_format_pattern.* not a valid regular expression"):
        main(["pipeline", str(spec), f"output_dir={tmp_path / 'bad'}", "eval_format_pattern=(<answer>"])


def test_held_out_evaluation_takes_the_pipelines_chat_template_kwargs(tmp_path, monkeypatch):
    # the held-out prompts of a model trained with chat_template_kwargs (Qwen3's enable_thinking: false) were
    # rendered with the template's defaults; a resumed summary compares them like the other eval settings
    import r1fast.trainer.evaluate as evaluate

    seen, real = [], evaluate.evaluate_accuracy
    monkeypatch.setattr(evaluate, "evaluate_accuracy",
                        lambda *a, **kw: seen.append(kw["chat_template_kwargs"]) or real(*a, **kw))
    spec = one_sft_stage_spec(tmp_path, "eval_dataset: builtin:arithmetic\neval_size: 2\neval_samples_per_prompt: 1\n"
                                        "eval_chat_template_kwargs: {enable_thinking: false}\n")
    # the built-in model's template reads no enable_thinking: said before the stage trains
    with pytest.warns(UserWarning, match="does not read chat_template_kwargs \\['enable_thinking'\\]"):
        assert main(["pipeline", str(spec), f"output_dir={tmp_path / 'run'}"]) == 0
    assert seen == [{"enable_thinking": False}]
    assert json.load(open(tmp_path / "run" / "summary.json"))["eval"]["chat_template_kwargs"] == \
        {"enable_thinking": False}


def test_held_out_evaluation_takes_the_pipelines_stop_tokens(tmp_path, monkeypatch):
    # a base model trained with a template whose turns end with another token than eos (Qwen2.5's <|im_end|>)
    # had its held-out completions run on to eval_max_tokens: eval_stop_tokens adds stops, checked before training
    import r1fast.trainer.evaluate as evaluate

    seen, real = [], evaluate.evaluate_accuracy
    monkeypatch.setattr(evaluate, "evaluate_accuracy",
                        lambda *a, **kw: seen.append((kw["stop_tokens"], kw["stop_option"])) or real(*a, **kw))
    spec = one_sft_stage_spec(tmp_path, "eval_dataset: builtin:arithmetic\neval_size: 2\neval_samples_per_prompt: 1\n")
    assert main(["pipeline", str(spec), f"output_dir={tmp_path / 'run'}", "eval_stop_tokens=[<|user|>]"]) == 0
    assert seen == [(["<|user|>"], "eval_stop_tokens")]
    assert json.load(open(tmp_path / "run" / "summary.json"))["eval"]["stop_tokens"] == ["<|user|>"]
    with pytest.raises(SystemExit, match=r"option 'eval_stop_tokens': '</s>' must be exactly one token"):
        main(["pipeline", str(spec), f"output_dir={tmp_path / 'bad'}", "eval_stop_tokens=[</s>]"])
    assert not (tmp_path / "bad" / "s").exists()   # refused before the stage trained


def test_a_sample_stage_names_its_own_stop_tokens_option(tmp_path, monkeypatch):
    # its turn-end warning and a stop token's error named 'stop_tokens', an option of no stage
    import r1fast.trainer.sampling as sampling

    seen, real = [], sampling.rejection_sample
    monkeypatch.setattr(sampling, "rejection_sample", lambda *a, **kw: seen.append(kw["stop_option"]) or real(*a, **kw))
    spec = tmp_path / "p.yaml"
    spec.write_text("name: p\nmodel: builtin:micro\nprogress_bar: false\nstages:\n"
                    "  - {name: rs, type: sample, dataset: builtin:arithmetic, num_rows: 2,\n"
                    "     config: {num_samples: 1, max_completion_length: 4, reward_funcs: [format],"
                    " reward_thresholds: [0.0], keep_truncated: true}}\n")
    assert main(["pipeline", str(spec), f"output_dir={tmp_path / 'run'}"]) == 0
    assert seen == ["rs.stop_tokens"]


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


def test_a_new_run_into_an_earlier_runs_folder_says_what_to_type(tmp_path, capsys):
    # A pipeline run again without --resume "started over" beside the earlier run's checkpoints, and
    # pruning by step number could delete the new run's own; pipeline_state.json then named them.
    spec = one_sft_stage_spec(tmp_path)
    run = tmp_path / "run"
    cmd = ["pipeline", str(spec), f"output_dir={run}"]
    assert main(cmd) == 0
    with pytest.raises(SystemExit) as e:
        main(cmd)
    msg = str(e.value)
    typed = f"r1fast pipeline {spec} output_dir={run}"
    assert f"{run} holds an earlier run (pipeline_state.json; finished stages: s)" in msg
    for choice in ("--resume", "overwrite_output_dir=true"):
        assert f"  {typed} {choice} " in msg
    assert f"  r1fast pipeline {spec} output_dir=NEW_FOLDER " in msg   # the typed output_dir left out
    assert main(cmd + ["--resume"]) == 0
    (run / "s" / "notes.txt").write_text("mine")
    assert main(cmd + ["overwrite_output_dir=true"]) == 0
    assert sorted(os.listdir(run / "s")) == [".r1fast.lock", "checkpoint-1", "metrics.jsonl", "notes.txt"]
    # a single GRPO run says the same, with its own command
    g = tmp_path / "g.yaml"
    g.write_text(f"model_name_or_path: builtin:micro\ndataset: builtin:arithmetic\noutput_dir: {tmp_path / 'g'}\n"
                 "per_device_train_batch_size: 4\nnum_generations: 4\nmax_completion_length: 4\n"
                 "max_prompt_length: 16\nmax_steps: 1\nprogress_bar: false\n")
    assert main(["train", str(g)]) == 0
    with pytest.raises(SystemExit, match=rf"(?s)holds an earlier run \(checkpoints checkpoint-1\).*"
                                         rf"  r1fast train {g} --resume +to continue it"):
        main(["train", str(g)])


def test_the_commands_offered_for_an_earlier_runs_folder_set_output_dir_once(tmp_path):
    # `r1fast train output_dir=runs/x` into a used folder offered `... output_dir=runs/x output_dir=NEW_FOLDER`
    # (and `overwrite_output_dir=false overwrite_output_dir=true`): a command naming two folders
    spec = one_sft_stage_spec(tmp_path)
    run = tmp_path / "run"
    assert main(["pipeline", str(spec), f"output_dir={run}"]) == 0
    for typed in ([f"--output_dir={run}"], ["--output-dir", str(run)], [f"output_dir={run}"]):
        with pytest.raises(SystemExit) as e:
            main(["pipeline", str(spec), *typed, "overwrite_output_dir=false", "seed=1"])
        lines = str(e.value).splitlines()[1:]
        assert [shlex.split(line.strip().split("  ")[0])[3:] for line in lines] == [
            [*typed, "overwrite_output_dir=false", "seed=1", "--resume"],
            [*typed, "seed=1", "overwrite_output_dir=true"],
            ["overwrite_output_dir=false", "seed=1", "output_dir=NEW_FOLDER"]]


def test_a_pipeline_error_in_an_override_names_the_command_line_not_the_file(tmp_path):
    # `r1fast train cold_start.max_stpes=1` said "/.../r1fast/configs/default.yaml: stage 'cold_start': unknown
    # option 'max_stpes'", sending the reader to edit r1fast's own file for what they had typed
    from r1fast.trainer.config import ConfigError

    spec = str(one_sft_stage_spec(tmp_path))
    for overrides, said in [(["s.max_stpes=1"], r"stage 's': unknown option 'max_stpes' for SFTConfig; did you mean "
                                                r"max_steps"),
                            (["s.max_steps=abc"], r"stage 's': option 'max_steps' expects int, got 'abc'"),
                            (["s.max_length=1"], r"stage 's': option 'max_length' must be >= 2"),
                            (["s.num_rows=0"], r"stage 's': num_rows must be in \[1, 1,000,000\]; got 0"),
                            (["s.evaluate=maybe"], r"stage 's': option 'evaluate' expects bool"),
                            (["s.output_dir=x"], r"stage 's': option 'output_dir' is not read in a pipeline"),
                            (["s.dtype=float16"], r"stage 's': dtype 'float16' differs from the pipeline's"),
                            (["eval_sise=3"], r"unknown pipeline key\(s\) \['eval_sise'\]; for 'eval_sise', did you "
                                              r"mean 'eval_size'"),
                            (["eval_size=0"], r"eval_size must be >= 1; got 0"),
                            (["seed=x"], r"option 'seed' expects int")]:
        with pytest.raises(ConfigError, match=rf"^command line: {said}"):
            load_pipeline(spec, overrides)
    # the file's own errors still name the file, with or without overrides beside them
    (tmp_path / "bad").mkdir()
    bad = one_sft_stage_spec(tmp_path / "bad", top="eval_size: 0\n")
    for overrides in ([], ["seed=3"]):
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}: eval_size must be >= 1"):
            load_pipeline(str(bad), overrides)
    # and an override that mends the file's value is taken, as before
    assert load_pipeline(str(bad), ["eval_size=2"]).eval_size == 2


def test_pipeline_checks_every_stage_when_loaded(tmp_path):
    """Errors a stage found only when it started, after the stages before it had trained."""
    from r1fast.trainer.config import ConfigError

    def fails(match, edit=None, overrides=None):
        spec = tiny_pipeline(tmp_path)
        if edit:
            edit(spec["stages"])
        with pytest.raises(ConfigError, match=match):
            load_pipeline(spec, overrides)

    # validate()'s range errors now name the file (or the command line that set the option) and the stage
    fails(r"^pipeline: stage 'rl': option 'beta' must be >= 0", lambda st: st[1]["config"].update(beta=-1))
    fails(r"^command line: stage 'rl': option 'beta' must be >= 0", overrides=["rl.beta=-1"])
    with pytest.raises(ConfigError, match=r"^command line: stage 's': option 'max_length' must be >= 2"):
        load_pipeline(str(one_sft_stage_spec(tmp_path)), ["s.max_length=1"])
    fails(r"stage 'rl': .*reward function 'acuracy'",
          lambda st: st[1]["config"].update(reward_funcs=["acuracy"]))
    fails(r"stage 'rs': .*reward function 'nowhere_mod:f': cannot import",
          lambda st: st[2]["config"].update(reward_funcs=["nowhere_mod:f"]))
    fails(r"stage 'rl': dataset: unknown built-in task 'arithmetc'",
          lambda st: st[1].update(dataset="builtin:arithmetc"))
    fails(r"stage 'cold': dataset: .*missing\.jsonl' does not exist \([^;]*\)$",
          lambda st: st[0].update(dataset=str(tmp_path / "missing.jsonl")))
    fails(r"stage 'cold': dataset: 'openai/gsm8k' does not exist .*reads local data only.*"
          r"datasets\.load_dataset\('openai/gsm8k'\)\.save_to_disk",
          lambda st: st[0].update(dataset="openai/gsm8k"))
    fails(r"stage 'student': model: 'Qwen/Qwen2\.5-0\.5B' is not a folder .*snapshot_download\('Qwen/Qwen2\.5-0\.5B'",
          lambda st: st[3].update(model="Qwen/Qwen2.5-0.5B"))
    fails(r"stage 'student': model: unknown built-in model 'builtin:huge'",
          lambda st: st[3].update(model="builtin:huge"))
    fails(r"stage 'student': dataset '@rl' is a grpo stage", lambda st: st[3].update(dataset="@rl"))
    fails(r"stage 'student': model '@rs' is a sample stage", lambda st: st[3].update(model="@rs"))
    fails(r"stage 'rl': model '@student' names a stage that runs after it", lambda st: st[1].update(model="@student"))

    # GRPO stages with different fp8 options: each starts from the previous checkpoint in high precision
    spec = tiny_pipeline(tmp_path)
    spec["stages"][1]["config"]["fp8"] = "emulate"
    spec["stages"].insert(2, {**spec["stages"][1], "name": "rl2", "config": {**spec["stages"][1]["config"],
                                                                                "fp8": "torch"}})
    load_pipeline(spec)
    # a file an earlier sample stage writes is no missing dataset
    spec = tiny_pipeline(tmp_path)
    spec["stages"][2]["config"]["output_file"] = str(tmp_path / "kept.jsonl")
    spec["stages"][3]["dataset"] = str(tmp_path / "kept.jsonl")
    load_pipeline(spec)


@pytest.mark.parametrize("key,where", [("dataset", "the stage's own 'dataset:' key"),
                                       ("model_name_or_path", "the stage's own 'model:' key"),
                                       ("output_dir", "the pipeline's output_dir")])
def test_stage_options_the_pipeline_supplies_are_refused(tmp_path, key, where):
    # They were accepted and silently ignored: the pipeline gives each stage its data, model and folder.
    spec = tiny_pipeline(tmp_path)
    spec["stages"][1]["config"][key] = "builtin:micro"
    with pytest.raises(ValueError, match=rf"stage 'rl': option '{key}' is not read in a pipeline; set {where}"):
        load_pipeline(spec)
    # on the command line, <stage>.dataset and <stage>.model set the stage's own keys
    p = load_pipeline(tiny_pipeline(tmp_path), ["rl.dataset=builtin:arithmetic?max_terms=3", "rl.model=@cold"])
    assert (p.stages[1].dataset, p.stages[1].model) == ("builtin:arithmetic?max_terms=3", "@cold")


@pytest.mark.parametrize("key", ["output-dir", "model-name-or-path", "overwrite-output-dir"])
def test_a_stage_option_spelt_with_dashes_is_checked_as_the_option_it_is(tmp_path, key):
    # the config reads "output-dir" as output_dir, but the pipeline's checks took the key as written: the options a
    # pipeline sets itself slipped through (ignored, or overwrite_output_dir handed to the stage's trainer), and a GRPO
    # stage's own eval-size was replaced by the pipeline's eval_size
    spec = tiny_pipeline(tmp_path)
    spec["stages"][1]["config"][key] = True if key.startswith("overwrite") else "x"
    with pytest.raises(ValueError, match=rf"^pipeline: stage 'rl': option '{key.replace('-', '_')}' is not read in a "
                                         rf"pipeline"):
        load_pipeline(spec)
    spec = tiny_pipeline(tmp_path)
    spec["stages"][1]["config"].pop("max_steps")
    spec["stages"][1]["config"].update({"eval-size": 3, "max-steps": 5})
    rl = load_pipeline(spec).stages[1].config
    assert (rl.eval_size, rl.max_steps) == (3, 5)
    spec["stages"][1]["config"]["max_steps"] = 6
    with pytest.raises(ValueError, match=r"stage 'rl': 'max-steps' and 'max_steps' are one option, 'max_steps'"):
        load_pipeline(spec)


def test_an_eval_dataset_naming_a_stage_says_stage_rows_are_a_stages_dataset(tmp_path):
    # it said "'@rs' does not exist (a .jsonl/... file, builtin:<task>, or "@stage" for a sample stage's rows)",
    # offering the form it had just refused
    for edit, where in [(lambda s: s.update(eval_dataset="@rs"), "pipeline: eval_dataset"),
                        (lambda s: s["stages"][1]["config"].update(eval_dataset="@rs", eval_steps=1),
                         "pipeline: stage 'rl': eval_dataset")]:
        spec = tiny_pipeline(tmp_path)
        edit(spec)
        with pytest.raises(ValueError, match=rf"^{where}: '@rs': \"@stage\" names the rows a sample stage kept as a "
                                             rf"stage's dataset, not as an eval_dataset \(a .jsonl"):
            load_pipeline(spec)


def test_a_grpo_stage_evaluates_at_its_eval_steps(tmp_path, monkeypatch):
    # The pipeline gave a GRPO stage no eval rows, so its eval_steps did nothing, and a stage's own
    # eval_dataset prompts were not kept out of its training data.
    from r1fast.trainer.grpo import GRPOTrainer

    seen = {}
    init = GRPOTrainer.__init__

    def spy(self, model, reward_funcs=None, train_dataset=None, config=None, tokenizer=None, eval_dataset=None, **kw):
        seen["train"], seen["eval"] = train_dataset, eval_dataset
        init(self, model, reward_funcs, train_dataset, config, tokenizer, eval_dataset, **kw)

    monkeypatch.setattr(GRPOTrainer, "__init__", spy)
    spec = tiny_pipeline(tmp_path)
    spec["stages"] = spec["stages"][:2]
    spec["stages"][1]["config"]["eval_steps"] = 1
    run_pipeline(spec)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    evals = [r for r in rows if r["stage"] == "rl" and "eval/accuracy" in r]
    # step 4 the stage's (the pipeline's eval settings: 4 prompts x 2), step 5 the pipeline's after it
    assert [r["step"] for r in evals] == [4, 5] and evals[0]["eval/num_samples"] == 8
    assert seen["eval"] and len(seen["eval"]) == 4

    spec = tiny_pipeline(tmp_path)
    spec["output_dir"] = str(tmp_path / "own")
    spec["stages"] = spec["stages"][:2]
    spec["stages"][1]["config"].update(eval_steps=1, eval_dataset="builtin:arithmetic?min_terms=2&max_terms=2",
                                       eval_size=64)
    run_pipeline(spec)
    held = {r["prompt"] for r in seen["eval"]}
    assert len(seen["eval"]) == 64 and not held & {r["prompt"] for r in seen["train"]}
    spec["stages"][1]["config"]["eval_steps"] = 0
    with pytest.raises(ValueError, match="stage 'rl': eval_dataset is used at eval_steps, which is 0"):
        load_pipeline(spec)


def test_summary_shows_steps_skipped_for_nonfinite_losses(tmp_path):
    from r1fast.trainer.pipeline import PipelineRunner, render_summary

    runner = PipelineRunner(load_pipeline(tiny_pipeline(tmp_path)))
    runner.state = {"order": ["rl"], "stages": {"rl": {"type": "grpo", "step_start": 0, "step_end": 2,
                                                        "nonfinite_skipped": 2, "finished": True}}}
    assert "rl: 2 steps skipped for a NaN/inf loss or gradient" in render_summary(runner.summary(0.0))


def test_summary_shows_what_a_sample_stage_kept(tmp_path):
    # summary.json and the table gave a sample stage steps 0 and dashes: how many samples it kept, of how many,
    # was only in pipeline_state.json
    from r1fast.trainer.pipeline import PipelineRunner, render_summary

    runner = PipelineRunner(load_pipeline(tiny_pipeline(tmp_path)))
    stats = {"prompts": 16, "samples": 64, "truncated": 3, "passed": 20, "pass_rate": 20 / 64, "kept": 12,
             "prompts_kept": 12}
    runner.state = {"order": ["rs"], "stages": {"rs": {"type": "sample", "step_start": 5, "step_end": 5,
                                                        "sample_stats": stats, "finished": True}}}
    summary = runner.summary(0.0)
    assert summary["stages"][0]["samples"] == stats
    assert ("rs: kept 12 of 64 samples from 16 prompts (pass rate 0.312; 3 cut at max_completion_length)"
            in render_summary(summary))
    # a pipeline_state.json of an r1fast before keep_truncated (b832398) has no 'truncated': its --resume's summary
    # failed with KeyError once every stage had run
    del stats["truncated"], stats["prompts_kept"]
    assert "rs: kept 12 of 64 samples from 16 prompts (pass rate 0.312)\n" in render_summary(runner.summary(0.0)) + "\n"


class ScriptedEngine:
    """Stands in for r1fast.rollout.Engine: each prompt gets the completions scripted for the first
    key found in its text, so which samples pass is known exactly."""
    calls: list = []

    def __init__(self, model=None, tok=None, script=None, **kw):
        self.tok, self.script = tok, script
        ScriptedEngine.kw = kw

    def generate(self, prompt_ids, params):
        from r1fast.rollout.params import Completion, RequestOutput

        ScriptedEngine.calls.append((len(prompt_ids), params.n, params.seed))
        out = []
        for ids in prompt_ids:
            text = self.tok.decode(ids)
            key = next(k for k in self.script if k in text)
            # a (text, "length") entry: cut at max_tokens, no eos
            comps = [Completion(self.tok(t, add_special_tokens=False).input_ids + [self.tok.eos_token_id], [], "stop")
                     if isinstance(t, str) else Completion(self.tok(t[0], add_special_tokens=False).input_ids, [], t[1])
                     for t in self.script[key][:params.n]]
            out.append(RequestOutput(list(ids), comps))
        return out

    def reset_prefix_cache(self):
        pass


GOOD_A, GOOD_B, GOOD_C = ("<think>a</think><answer>4</answer>", "<think>b</think><answer>4</answer>",
                          "<think>c</think><answer>4</answer>")


def scripted(monkeypatch, script):
    import r1fast.rollout
    from r1fast.trainer.common import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("builtin:micro", device="cpu", seed=0)
    ScriptedEngine.calls = []
    monkeypatch.setattr(r1fast.rollout, "Engine", lambda m, **kw: ScriptedEngine(m, tok, script, **kw))
    return model, tok


@pytest.mark.parametrize("setting", [True, False])
def test_rejection_sampling_shows_its_progress_bar_as_its_config_says(monkeypatch, setting):
    # progress defaulted to True: SampleConfig(progress_bar=False) still drew a bar from Python
    import r1fast.progress
    from r1fast.trainer.config import SampleConfig
    from r1fast.trainer.sampling import rejection_sample

    bars, real = [], r1fast.progress.progress
    monkeypatch.setattr(r1fast.progress, "progress", lambda *a, **kw: bars.append(a) or real(*a, **kw))
    model, tok = scripted(monkeypatch, {"2+2": ["<think>w</think><answer>4</answer>"] * 2})
    cfg = SampleConfig(num_samples=2, progress_bar=setting)
    kept, _ = rejection_sample(model, tok, [{"prompt": "2+2", "answer": "4"}], cfg)
    assert len(kept) == 1 and len(bars) == int(setting), bars
    rejection_sample(model, tok, [{"prompt": "2+2", "answer": "4"}], cfg, progress=not setting)   # the argument wins
    assert len(bars) == 1, bars


def test_rejection_sampling_keeps_correct_well_formed_distinct_samples_up_to_keep_per_prompt(monkeypatch):
    from r1fast.trainer.config import SampleConfig
    from r1fast.trainer.sampling import rejection_sample

    script = {"2+2": ["<answer>4</answer>", "<think>w</think><answer>5</answer>", GOOD_A, GOOD_A, GOOD_B, GOOD_C],
              "3+3": ["<think>w</think><answer>5</answer>", "<answer>6</answer>", "6", "", "", ""],
              "5+5": ["<think>z</think><answer>1</answer>", "<answer>1</answer>", "", "", "", ""]}
    model, tok = scripted(monkeypatch, script)
    rows = [{"prompt": "2+2", "answer": "4", "level": 1}, {"prompt": "3+3", "answer": "6", "level": 2},
            {"prompt": "5+5", "answer": None, "level": 3}]
    cfg = SampleConfig(num_samples=6, keep_per_prompt=2, batch_prompts=2, progress_bar=False)
    kept, stats = rejection_sample(model, tok, rows, cfg, progress=False)
    # wrong format or wrong answer: out; GOOD_A's copy: out; GOOD_C: over keep_per_prompt.
    # A row without an answer is judged by the rewards that score it (format) only.
    assert [(r["prompt"], r["completion"]) for r in kept] == [
        ("2+2", GOOD_A), ("2+2", GOOD_B), ("5+5", "<think>z</think><answer>1</answer>")]
    assert [(r["answer"], r["level"]) for r in kept] == [("4", 1), ("4", 1), (None, 3)]   # the row's columns
    assert [r["rewards"] for r in kept] == [{"accuracy": 1.0, "format": 1.0}] * 2 + [{"accuracy": None, "format": 1.0}]
    assert stats == {"prompts": 3, "samples": 18, "truncated": 0, "passed": 5, "pass_rate": 5 / 18, "kept": 3,
                     "prompts_kept": 2}
    # two chunks of prompts, each sampled num_samples times with its own seed
    assert [c[:2] for c in ScriptedEngine.calls] == [(2, 6), (1, 6)] and ScriptedEngine.calls[0][2] != ScriptedEngine.calls[1][2]
    # thresholds per reward: accuracy ignored, format required; max_prompts cuts the dataset
    cfg = SampleConfig(num_samples=6, keep_per_prompt=6, reward_thresholds=[0.0, 1.0], max_prompts=2, progress_bar=False)
    kept, stats = rejection_sample(model, tok, rows, cfg, progress=False)
    assert [r["completion"] for r in kept] == [script["2+2"][1], GOOD_A, GOOD_B, GOOD_C, script["3+3"][0]]
    assert (stats["prompts"], stats["passed"]) == (2, 6)
    with pytest.raises(ValueError, match="rejection sampling: the prompt dataset is empty"):
        rejection_sample(model, tok, [], cfg, progress=False)


def test_rejection_sampling_stops_at_a_reward_call_past_reward_timeout(monkeypatch):
    import threading

    from r1fast.rewards import RewardTimeout
    from r1fast.trainer.config import SampleConfig
    from r1fast.trainer.sampling import rejection_sample

    model, tok = scripted(monkeypatch, {"2+2": ["<answer>4</answer>"] * 2})
    release = threading.Event()

    def sandbox(prompts, completions, **kw):   # never answers
        release.wait(30)
        return [1.0] * len(completions)

    cfg = SampleConfig(num_samples=2, reward_funcs=[sandbox], reward_timeout=0.2, progress_bar=False)
    try:
        with pytest.raises(RewardTimeout, match=r"'sandbox' did not return within reward_timeout = 0.2 s on a batch "
                                                r"of 2 completions"):
            rejection_sample(model, tok, [{"prompt": "2+2", "answer": "4"}], cfg, progress=False)
    finally:
        release.set()


def test_rejection_sampling_takes_a_model_name_a_dataset_path_or_a_datasets_dataset(monkeypatch, tmp_path):
    # as the trainers do: a model name was "'NoneType' object is not callable", a path was read as characters
    # ("lacks column(s) ['prompt']; it has ['b']"), a datasets.Dataset with max_prompts was sliced into its
    # columns ("string indices must be integers"), and cfg=None was an AttributeError
    datasets = pytest.importorskip("datasets")

    from r1fast.trainer.config import SampleConfig
    from r1fast.trainer.sampling import rejection_sample

    scripted(monkeypatch, {"2+2": [GOOD_A], "3+3": ["<answer>6</answer>"], "5+5": [""]})
    rows = [{"prompt": "2+2", "answer": "4"}, {"prompt": "3+3", "answer": "6"}, {"prompt": "5+5", "answer": "10"}]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = SampleConfig(num_samples=1, max_prompts=2, progress_bar=False, device="cpu")
    for given in (datasets.Dataset.from_list(rows), str(data)):
        kept, stats = rejection_sample("builtin:micro", None, given, cfg, progress=False)
        assert [r["completion"] for r in kept] == [GOOD_A] and stats["prompts"] == 2
    kept, _ = rejection_sample("builtin:micro", rows=rows, cfg=None, progress=False)
    assert [r["completion"] for r in kept] == [GOOD_A]
    with pytest.raises(TypeError, match="cfg must be a SampleConfig, got dict"):
        rejection_sample("builtin:micro", None, rows, {"num_samples": 1})


def test_evaluate_accuracy_takes_a_model_name_as_rejection_sampling_does(monkeypatch):
    # evaluate_accuracy("runs/sft/checkpoint-300", None, rows), or a loaded model without its tokenizer, failed
    # deep in the prompt encoding with "'NoneType' object is not callable"; rejection_sample took the name
    from r1fast.trainer.evaluate import evaluate_accuracy

    model, tok = scripted(monkeypatch, {"2+2": [GOOD_A, "<answer>5</answer>"], "3+3": ["<answer>6</answer>", ""]})
    rows = [{"prompt": "2+2", "answer": "4"}, {"prompt": "3+3", "answer": "6"}]
    by_name = evaluate_accuracy("builtin:micro", None, rows, samples_per_prompt=2, max_tokens=8)
    assert by_name == evaluate_accuracy(model, tok, rows, samples_per_prompt=2, max_tokens=8)
    assert by_name["eval/accuracy"] == 0.5 and by_name["eval/pass@2"] == 1.0 and by_name["eval/format"] == 0.25
    with pytest.raises(TypeError, match=r"evaluation: tokenizer must be the model's tokenizer"):
        evaluate_accuracy(model, None, rows)
    with pytest.raises(ValueError, match=r"model 'no/such_dir' is not a folder"):
        evaluate_accuracy("no/such_dir", None, rows)


def test_a_stage_records_a_reward_function_by_name_not_by_its_address():
    # pipeline_state.json and a sample stage's progress fingerprint took str() of a reward function given in Python,
    # "<function f at 0x7f...>": another address in every process, so --resume said the finished stage's options
    # had changed and a stopped sample stage's kept batches were another sampling's, sampled over again
    from r1fast.trainer.config import SampleConfig
    from r1fast.trainer.pipeline import Stage, _stage_options

    def reward():   # the same function in two processes: same name, another address
        def sevens(completions, **kwargs):
            return [7.0] * len(completions)
        return sevens

    functions = [reward(), reward()]   # both kept alive: two addresses
    first, again = (_stage_options(Stage("s", "sample", SampleConfig(reward_funcs=[f, "format"]))) for f in functions)
    assert first == again
    assert first["reward_funcs"] == [f"{__name__}:test_a_stage_records_a_reward_function_by_name_not_by_its_address"
                                     f".<locals>.reward.<locals>.sevens", "format"]


def test_rejection_sampling_leaves_out_samples_cut_at_max_completion_length(monkeypatch):
    """SFT appends eos to each kept completion: one cut before its stop token, however well it scores
    (the answer can come before the cut), would teach stopping mid-thought. keep_truncated keeps them."""
    from r1fast.trainer.config import SampleConfig
    from r1fast.trainer.sampling import rejection_sample, summary

    model, tok = scripted(monkeypatch, {"2+2": [(GOOD_A, "length"), GOOD_B, (GOOD_C, "length")]})
    rows = [{"prompt": "2+2", "answer": "4"}]
    kept, stats = rejection_sample(model, tok, rows, SampleConfig(num_samples=3, keep_per_prompt=3, progress_bar=False),
                                   progress=False)
    assert [r["completion"] for r in kept] == [GOOD_B]
    assert (stats["samples"], stats["truncated"], stats["passed"]) == (3, 2, 1)
    assert "2 cut at max_completion_length" in summary(stats)
    kept, stats = rejection_sample(model, tok, rows, SampleConfig(num_samples=3, keep_per_prompt=3, keep_truncated=True,
                                                                  progress_bar=False), progress=False)
    assert [r["completion"] for r in kept] == [GOOD_A, GOOD_B, GOOD_C] and stats["passed"] == 3


def test_resumed_rejection_sampling_starts_its_progress_at_the_prompts_done_before(monkeypatch):
    # The prompts sampled before a resume were counted as sampled in the first instant of the resumed run:
    # resumed at 2 of 3, the bar's rate was 2 prompts higher and its time left near 0.
    import r1fast.progress
    from r1fast.trainer.config import SampleConfig
    from r1fast.trainer.sampling import rejection_sample

    bars = []

    class Bar:
        def __init__(self, total, desc, initial=0, unit="it"):
            self.start, self.done = initial, 0
            bars.append(self)

        def update(self, n=1):
            self.done += n

        def set_postfix(self, **values):
            pass

        def close(self):
            pass

    monkeypatch.setattr(r1fast.progress, "progress", Bar)
    model, tok = scripted(monkeypatch, {"1?": ["1"], "2?": ["2"], "3?": ["3"]})
    rows = [{"prompt": f"{i}?", "answer": str(i)} for i in (1, 2, 3)]
    cfg = SampleConfig(num_samples=1, batch_prompts=1, reward_funcs=["accuracy"])
    rejection_sample(model, tok, rows, cfg, resume_from={"next_prompt": 2, "rows": [], "stats": {}})
    assert [(b.start, b.done) for b in bars] == [(2, 1)]


def test_rejection_sampling_scores_each_sample_against_its_own_prompt(monkeypatch, tmp_path):
    from r1fast.trainer.config import SampleConfig
    from r1fast.trainer.sampling import rejection_sample

    (tmp_path / "echo.py").write_text("def f(prompts, completions, **kw):\n"
                                      "    return [1.0 if p[0] in c else 0.0 for p, c in zip(prompts, completions)]\n")
    model, tok = scripted(monkeypatch, {"1?": ["1", "2"], "2?": ["1", "2"], "3?": ["3", "1"]})
    rows = [{"prompt": f"{i}?"} for i in (1, 2, 3)]
    cfg = SampleConfig(num_samples=2, reward_funcs=[f"{tmp_path / 'echo.py'}:f"], batch_prompts=2, progress_bar=False)
    kept, _ = rejection_sample(model, tok, rows, cfg, progress=False)
    assert [(r["prompt"], r["completion"]) for r in kept] == [("1?", "1"), ("2?", "2"), ("3?", "3")]


def test_evaluation_scores_each_sample_against_its_rows_answer(monkeypatch):
    from r1fast.data.loading import encode_prompt
    from r1fast.trainer.evaluate import evaluate_accuracy

    script = {"2+2": [GOOD_A, "<answer>4</answer>"], "3+3": ["<think>b</think><answer>5</answer>",
                                                              "<think>b</think><answer>6</answer>"],
              "5+5": ["<think></think><answer>1</answer>", "x"]}
    model, tok = scripted(monkeypatch, script)
    rows = [{"prompt": "2+2", "answer": "4"}, {"prompt": "3+3", "answer": "6"}, {"prompt": "5+5", "answer": None}]
    texts = [t for k in ("2+2", "3+3", "5+5") for t in script[k]]
    for training in (True, False):
        model.train(training)
        res, samples = evaluate_accuracy(model, tok, rows, samples_per_prompt=2, return_samples=True)
        assert model.training is training   # the caller's mode comes back
        # accuracy over the samples an answer scores (4 of 6), format over all 6
        assert res["eval/accuracy"] == pytest.approx(3 / 4) and res["eval/format"] == pytest.approx(4 / 6)
        lengths = [len(tok(t, add_special_tokens=False).input_ids) + 1 for t in texts]
        assert res["eval/completion_length"] == pytest.approx(sum(lengths) / 6) and res["eval/num_samples"] == 6
        assert [(s["prompt"], s["completion"], s["accuracy"]) for s in samples] == [
            ("2+2", texts[0], 1.0), ("2+2", texts[1], 1.0), ("3+3", texts[2], 0.0), ("3+3", texts[3], 1.0),
            ("5+5", texts[4], None), ("5+5", texts[5], None)]
        # from the same samples: 2+2 both right, 3+3 one right whose vote ties with the wrong 5 (first wins)
        assert res["eval/pass@2"] == 1.0 and res["eval/cons@2"] == 0.5
    assert ScriptedEngine.calls == [(3, 2, 0), (3, 2, 0)]   # one generate call per evaluation: no extra sampling
    assert not any(key.startswith(("eval/pass@", "eval/cons@")) for key in evaluate_accuracy(model, tok, rows[:2]))
    with pytest.raises(ValueError, match="held-out rows lack the answer column 'answer'"):
        evaluate_accuracy(model, tok, [{"prompt": "2+2", "reference": "4"}])
    # a solution column (MATH's worked solutions), as the accuracy reward reads training rows: it refused
    solved = [{"prompt": "2+2", "solution": r"so it is $\boxed{4}$"}, {"prompt": "3+3", "solution": "#### 5"}]
    assert evaluate_accuracy(model, tok, solved, samples_per_prompt=2)["eval/accuracy"] == pytest.approx(3 / 4)
    # the engine holds the longest prompt and max_tokens more, within the model's positions
    longest = max(len(encode_prompt(tok, r["prompt"])) for r in rows)
    evaluate_accuracy(model, tok, rows, max_tokens=7)
    assert ScriptedEngine.kw["max_model_len"] == longest + 7
    evaluate_accuracy(model, tok, rows, max_tokens=10**6)
    assert ScriptedEngine.kw["max_model_len"] == model.config.max_position_embeddings



def test_evaluate_accuracy_reads_a_dataset_path_as_the_trainers_do(monkeypatch, tmp_path):
    # a path was read as its characters: "held-out rows lack the answer column 'answer'; they have ['d']"
    from r1fast.trainer.evaluate import evaluate_accuracy

    model, tok = scripted(monkeypatch, {"2+2": [GOOD_A], "3+3": ["<answer>5</answer>"]})
    data = tmp_path / "test.jsonl"
    data.write_text('{"prompt": "2+2", "answer": "4"}\n{"prompt": "3+3", "answer": "6"}\n')
    res = evaluate_accuracy(model, tok, str(data))
    assert (res["eval/accuracy"], res["eval/format"], res["eval/num_samples"]) == (0.5, 0.5, 2)
    with pytest.raises(ValueError, match="evaluation: no held-out rows"):
        evaluate_accuracy(model, tok, [])


def test_evaluate_accuracy_draws_a_builtin_task_with_the_seed_it_is_given(monkeypatch):
    # a builtin: task was drawn with seed 0 whatever `seed` said: every seed evaluated the same 64 prompts
    from r1fast.data import load_rows
    from r1fast.trainer.evaluate import evaluate_accuracy

    model, tok = scripted(monkeypatch, {"": ["<answer>1</answer>"]})
    drawn = {}
    for seed in (0, 42):
        _, samples = evaluate_accuracy(model, tok, "builtin:arithmetic", seed=seed, return_samples=True)
        drawn[seed] = [s["prompt"] for s in samples]
        assert ScriptedEngine.calls[-1][2] == seed
        # the prompts a GRPO run of config seed `seed` evaluates on (its builtin: eval_dataset: seed + 1),
        # not its training draw (seed itself), whose first 64 prompts would be these
        assert drawn[seed] == [r["prompt"] for r in load_rows("builtin:arithmetic", seed=seed + 1, n_builtin=64)]
        assert drawn[seed] != [r["prompt"] for r in load_rows("builtin:arithmetic", seed=seed, n_builtin=64)]
    assert drawn[0] != drawn[42]


def test_pass_at_k_is_the_share_of_k_draws_holding_a_correct_sample():
    from itertools import combinations

    from r1fast.trainer.evaluate import pass_at_k

    for n in range(1, 7):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                draws = list(combinations(samples, k))
                assert pass_at_k(n, c, k) == pytest.approx(sum(map(any, draws)) / len(draws), abs=1e-12), (n, c, k)
    assert pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 1) == 0.25
    with pytest.raises(ValueError, match="n=4, c=5, k=2"):
        pass_at_k(4, 5, 2)


def test_cons_at_k_votes_by_equivalent_answers_first_among_ties_and_answerless_samples_last():
    from r1fast.trainer.evaluate import majority_index, score_completions

    a = "<think>x</think><answer>{}</answer>".format
    completions = {
        # 5 twice, 4 twice (4.0 is the same answer): a tie, won by 5, which came first
        "4": [a(5), a(4), a(5), a("4.0")],
        # the only sample with an answer wins over three without one (an answer inside <think> is none)
        "6": ["no answer", "<think><answer>7</answer></think>", "", a(6)],
        "7": ["a", "b", "c", "d"],   # nobody answered: the vote is no answer, scored 0
        # 0.5 = 1/2 = .5: three votes beat 3's one, which came first
        "1/2": [a(3), a(0.5), a("1/2"), a(".5")],
        # wrong answers equal as numbers vote together: 8 and 8.0 beat the right 9
        "9": [a(9), a(8), a("8.0"), a(7)],
        None: [a(1), a(1), a(2), a(3)],   # no reference: left out of every mean but format's
    }
    texts = [t for ts in completions.values() for t in ts]
    answers = [g for g in completions for _ in range(4)]
    out, acc = score_completions(["q"] * len(texts), texts, answers, 4)
    assert [majority_index(texts[i:i + 4], [x == 1.0 for x in acc[i:i + 4]]) for i in range(0, 24, 4)] == \
        [0, 3, 0, 1, 1, 0]
    assert out["eval/accuracy"] == 7 / 20 and out["eval/format"] == 17 / 24
    assert out["eval/pass@4"] == 4 / 5 and out["eval/cons@4"] == 2 / 5
    assert acc[20:] == [None] * 4
    # a right majority on a prompt whose first answer is wrong, at k = 3
    assert score_completions(["q"] * 3, [a(2), a(4), a(4)], ["4"] * 3, 3)[0]["eval/cons@3"] == 1.0


def test_summary_and_plot_carry_pass_and_cons_at_k(tmp_path):
    from r1fast.trainer.pipeline import PipelineRunner, render_summary
    from r1fast.trainer.metrics import k_sample_names

    runner = PipelineRunner(load_pipeline(tiny_pipeline(tmp_path)))
    ev = {"eval/accuracy": 0.5, "eval/format": 1.0, "eval/pass@4": 0.75, "eval/cons@4": 0.625, "eval/num_samples": 8}
    runner.state = {"order": ["sft", "rl"], "stages": {
        "sft": {"type": "sft", "step_start": 0, "step_end": 2, "finished": True},
        "rl": {"type": "grpo", "step_start": 2, "step_end": 4, "finished": True, "eval": ev}}}
    summary = runner.summary(0.0)
    assert {k: summary["stages"][1][k] for k in ("held_out_accuracy", "pass@4", "cons@4")} == \
        {"held_out_accuracy": 0.5, "pass@4": 0.75, "cons@4": 0.625}
    table = render_summary(summary).splitlines()
    header = next(line for line in table if line.startswith("stage"))
    assert header.split() == ["stage", "type", "steps", "accuracy", "format", "pass@4", "cons@4", "time"]
    assert table[-2].split()[3:7] == ["-", "-", "-", "-"] and table[-1].split()[3:7] == ["0.500", "1.000", "0.750",
                                                                                          "0.625"]
    rows = [{"step": 1, "eval/cons@16": 0.1, "eval/pass@4": 0.2}, {"step": 2, "eval/pass@16": 0.3, "eval/cons@4": 0.4}]
    assert k_sample_names(rows, "eval/") == ["eval/pass@4", "eval/cons@4", "eval/pass@16", "eval/cons@16"]


def test_train_prints_pass_and_cons_at_k_beside_the_accuracy(capsys):
    from r1fast.trainer.cli import _print_result

    _print_result({"initial": {"eval/accuracy": 0.25}, "final": {"eval/accuracy": 0.5, "eval/pass@4": 0.75,
                                                                 "eval/cons@4": 0.625}})
    assert capsys.readouterr().out.splitlines() == ["initial held-out accuracy: 0.250",
                                                    "final held-out accuracy: 0.500 (pass@4 0.750, cons@4 0.625)"]
    # and the format rate and sample count, as the pipeline's line has them (r1fast train left them out)
    _print_result({"final": {"eval/accuracy": 0.5, "eval/format": 0.875, "eval/completion_length": 9.0,
                             "eval/num_samples": 16, "eval/pass@4": 0.75, "eval/cons@4": 0.625}})
    assert capsys.readouterr().out.splitlines() == [
        "final held-out accuracy: 0.500 (format 0.875, pass@4 0.750, cons@4 0.625, 16 samples)"]


def test_stages_hand_on_their_model_steps_and_samples(tmp_path, monkeypatch):
    """A resumed pipeline's next stage trains the finished stage's checkpoint from the step it ended at;
    a stage naming its own model starts from that model and the next one continues it; a sample stage's
    output_file is the later stage's data; evaluate: false skips a stage's held-out evaluation."""
    import torch

    from r1fast.trainer import sft
    from r1fast.trainer.common import load_model_and_tokenizer

    starts, ends, bars = {}, {}, {}
    init, train = sft.SFTTrainer.__init__, sft.SFTTrainer.train

    def weights(model):
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    def spy_init(self, model, *a, stage_name="sft", **kw):
        starts[stage_name], bars[stage_name] = weights(model), a[2].progress_bar
        init(self, model, *a, stage_name=stage_name, **kw)

    def spy_train(self, *a, **kw):
        res = train(self, *a, **kw)
        ends[self.stage] = weights(self.model)
        return res

    monkeypatch.setattr(sft.SFTTrainer, "__init__", spy_init)
    monkeypatch.setattr(sft.SFTTrainer, "train", spy_train)
    data = "builtin:arithmetic?min_terms=2&max_terms=2"
    kept = tmp_path / "kept.jsonl"
    sft_cfg = {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1}
    stages = [{"name": "a", "type": "sft", "dataset": data, "num_rows": 8, "config": sft_cfg},
              {"name": "b", "type": "sft", "dataset": data, "num_rows": 8, "evaluate": False, "config": sft_cfg},
              {"name": "rs", "type": "sample", "dataset": data, "num_rows": 2,
               "config": {"num_samples": 1, "max_completion_length": 4, "reward_funcs": ["format"],
                          "reward_thresholds": [-1.0], "keep_truncated": True, "output_file": str(kept)}},
              {"name": "c", "type": "sft", "model": "builtin:micro", "dataset": str(kept),
               "config": {**sft_cfg, "max_steps": 1}},
              {"name": "d", "type": "sft", "dataset": data, "num_rows": 8, "config": {**sft_cfg, "max_steps": 1}},
              {"name": "e", "type": "sft", "model": "@a", "dataset": data, "num_rows": 8, "evaluate": False,
               "config": {**sft_cfg, "max_steps": 1}}]
    spec = {"name": "h", "seed": 0, "output_dir": str(tmp_path / "run"), "model": "builtin:micro",
            "eval_dataset": "builtin:arithmetic?min_terms=2&max_terms=2", "eval_size": 2, "eval_samples_per_prompt": 1,
            "eval_max_tokens": 4, "progress_bar": False, "stages": stages[:1]}
    run_pipeline(spec)
    first = ends["a"]
    summary = run_pipeline({**spec, "stages": stages}, resume=True)
    for name, w in first.items():   # b went on from a's checkpoint; e ("@a") starts from it too
        torch.testing.assert_close(starts["b"][name], w, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(starts["e"][name], w, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    fresh, _ = load_model_and_tokenizer("builtin:micro", device="cpu", seed=3)   # stage 3's seed
    for name, w in fresh.named_parameters():
        torch.testing.assert_close(starts["c"][name], w.detach(), rtol=0, atol=0)
        torch.testing.assert_close(starts["d"][name], ends["c"][name], rtol=0, atol=0)
    assert [(s["stage"], s["steps"]) for s in summary["stages"]] == [("a", 2), ("b", 2), ("rs", 0), ("c", 1), ("d", 1),
                                                                           ("e", 1)]
    assert [s["held_out_accuracy"] is None for s in summary["stages"]] == [False, True, True, False, False, True]
    assert len(open(kept).readlines()) == 2
    assert set(bars.values()) == {False}   # the pipeline's progress_bar: false holds for its stages
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [(r["stage"], r["step"]) for r in rows if "loss" in r] == [("a", 1), ("a", 2), ("b", 3), ("b", 4),
                                                                      ("c", 5), ("d", 6), ("e", 7)]


def test_pipeline_load_names_seeds_and_refuses_bad_stages(tmp_path):
    from r1fast.trainer.config import ConfigError

    p = load_pipeline({**tiny_pipeline(tmp_path), "seed": 5})
    assert [s.config.seed for s in p.stages] == [5, 6, 7, 8]   # each stage its own seed, unless it sets one
    spec = tiny_pipeline(tmp_path)
    spec["stages"][1]["config"]["seed"] = 77
    del spec["stages"][0]["name"]
    p = load_pipeline(spec)
    assert [s.name for s in p.stages][:2] == ["stage0", "rl"] and p.stages[1].config.seed == 77
    assert load_pipeline({**tiny_pipeline(tmp_path), "eval_temperature": 0}).eval_temperature == 0   # greedy

    def fails(match, edit):
        spec = tiny_pipeline(tmp_path)
        edit(spec)
        with pytest.raises(ConfigError, match=match):
            load_pipeline(spec)

    fails(r"stage 'cold': num_rows must be in \[1, 1,000,000\]; got 0", lambda s: s["stages"][0].update(num_rows=0))
    fails(r"two stages are named 'cold'", lambda s: s["stages"][1].update(name="cold"))
    fails(r"no model for stage 'cold'", lambda s: s.pop("model"))
    fails(r"num_threads must be >= 1; got 0", lambda s: s.update(num_threads=0))
    fails(r"stage 1: unknown key\(s\) \['datset'\]", lambda s: s["stages"][1].update(datset="x"))
    fails(r"stage 2 must be a mapping", lambda s: s["stages"].__setitem__(2, "rs"))
    fails(r"pipeline: model: unknown built-in model 'builtin:huge'", lambda s: s.update(model="builtin:huge"))
    fails(r"pipeline: eval_dataset: unknown built-in task 'arithmetc'", lambda s: s.update(eval_dataset="builtin:arithmetc"))
    fails(r"stage 'rl': eval_dataset: .*nowhere\.jsonl' does not exist",
          lambda s: s["stages"][1]["config"].update(eval_steps=1, eval_dataset=str(tmp_path / "nowhere.jsonl")))
    assert load_pipeline({**tiny_pipeline(tmp_path), "description": "R1's recipe, small"}).name == "t"
    load_pipeline({**tiny_pipeline(tmp_path), "model": None, "stages": [{**tiny_pipeline(tmp_path)["stages"][0],
                                                                         "model": "builtin:micro"}]})


def test_num_rows_caps_only_a_builtin_tasks_draw(tmp_path):
    # num_rows is the count of rows drawn from a builtin: task (docs/training.md); a file's rows are read whole.
    # The built-in cap (1,000,000) refused a stage reading a file with a larger num_rows, which it never used
    from r1fast.trainer.config import ConfigError
    from r1fast.trainer.pipeline import PipelineRunner

    data = tmp_path / "rows.jsonl"
    prompts = [f"{i}+{i + 3}=" for i in range(6)]
    data.write_text("".join(json.dumps({"prompt": p, "completion": "x", "answer": "0"}) + "\n" for p in prompts))
    spec = tiny_pipeline(tmp_path)
    spec["stages"][0].update(dataset=str(data), num_rows=2_000_000)
    runner = PipelineRunner(load_pipeline(spec))
    assert [r["prompt"] for r in runner.stage_rows(runner.p.stages[0], 0, ("prompt",))] == prompts
    # set on the command line too
    assert load_pipeline(tiny_pipeline(tmp_path), [f"cold.dataset={data}", "cold.num_rows=1000001"]).stages[0].num_rows \
        == 1_000_001
    spec = tiny_pipeline(tmp_path)
    spec["stages"][0].update(num_rows=1_000_001)   # a builtin: task's draw is still capped
    with pytest.raises(ConfigError, match=r"stage 'cold': num_rows must be in \[1, 1,000,000\]; got 1000001$"):
        load_pipeline(spec)
    spec = tiny_pipeline(tmp_path)
    spec["stages"][0].update(dataset=str(data), num_rows=0)
    with pytest.raises(ConfigError, match=r"stage 'cold': num_rows must be >= 1; got 0"):
        load_pipeline(spec)


def test_pipeline_rows_held_out_cut_and_per_stage(tmp_path):
    """Held-out rows are cut to eval_size (files too) and kept out of a builtin stage's training rows;
    each stage draws its own rows; "@stage" data that kept nothing is an error naming both stages."""
    import torch

    from r1fast.trainer.pipeline import PipelineRunner

    small = "builtin:arithmetic?min_terms=2&max_terms=2&max_operand=2"   # 8 prompts in all
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(5)))
    spec = tiny_pipeline(tmp_path)
    spec.update(eval_dataset=str(held), eval_size=3)
    spec["stages"][1]["config"].update(eval_steps=1, eval_dataset=str(held), eval_size=2)
    runner = PipelineRunner(load_pipeline(spec))
    assert [r["prompt"] for r in runner.eval_rows()] == ["0+1=", "1+1=", "2+1="]
    assert len(runner.stage_eval_rows(runner.p.stages[1])) == 2
    runner.p.stages[1].config.eval_size = 0   # 0: every row of the file
    assert len(runner.stage_eval_rows(runner.p.stages[1])) == 5
    a, b = (runner.stage_rows(s, i, ("prompt",)) for i, s in enumerate(runner.p.stages[:2]))
    assert [r["prompt"] for r in a] != [r["prompt"] for r in b]

    spec = tiny_pipeline(tmp_path)
    spec.update(eval_dataset=small, eval_size=4)
    spec["stages"][0].update(dataset=small, num_rows=32)
    runner = PipelineRunner(load_pipeline(spec))
    held_out = {r["prompt"] for r in runner.eval_rows()}
    rows = runner.stage_rows(runner.p.stages[0], 0, ("prompt",))
    assert held_out and rows and not held_out & {r["prompt"] for r in rows}
    assert runner.load_model("builtin:micro", 0)[0].embed_tokens.weight.dtype == torch.float32
    runner.p.dtype = "bfloat16"   # every stage's model in the pipeline's dtype
    assert runner.load_model("builtin:micro", 0)[0].embed_tokens.weight.dtype == torch.bfloat16
    runner.samples["rs"] = []
    with pytest.raises(ValueError, match="stage 'student': stage 'rs' kept no samples"):
        runner.stage_rows(runner.p.stages[3], 3, ("prompt",))


def test_cli_stops_with_status_130_and_says_how_to_continue(tmp_path, monkeypatch, capsys):
    """Ctrl-C, or a trainer that stopped on one, is exit status 130 with a one-line note; the
    commands that resume say --resume. A run of NaN steps is a
    one-line error, not a traceback."""
    import r1fast.trainer.pipeline as pipeline
    import r1fast.trainer.sampling as sampling
    from r1fast.trainer.common import NonFiniteLoss
    from r1fast.trainer.grpo import GRPOTrainer
    from r1fast.trainer.sft import SFTTrainer

    monkeypatch.chdir(tmp_path)

    def interrupt(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_pipeline", interrupt)
    spec = one_sft_stage_spec(tmp_path)
    assert main(["pipeline", str(spec)]) == 130
    assert capsys.readouterr().err.strip() == f"r1fast pipeline: stopped; continue with: r1fast pipeline {spec} --resume"
    monkeypatch.setattr(sampling, "rejection_sample", interrupt)
    assert main(["sample", "model_name_or_path=builtin:micro", "dataset=builtin:arithmetic", "progress_bar=false"]) == 130
    assert capsys.readouterr().err.strip() == ("r1fast sample: stopped; continue with: r1fast sample "
                                               "model_name_or_path=builtin:micro dataset=builtin:arithmetic "
                                               "progress_bar=false --resume")
    stopped = lambda self, *a, **kw: {"interrupted": True, "checkpoint": "ck", "nonfinite_skipped": 0}  # noqa: E731
    monkeypatch.setattr(SFTTrainer, "train", stopped)
    monkeypatch.setattr(GRPOTrainer, "train", stopped)
    assert main(["sft", "model_name_or_path=builtin:micro", "dataset=builtin:arithmetic", "progress_bar=false"]) == 130
    assert ("r1fast sft: stopped; continue with: r1fast sft model_name_or_path=builtin:micro dataset=builtin:arithmetic "
            "progress_bar=false --resume") in capsys.readouterr().err
    g = tmp_path / "g.yaml"
    g.write_text("model_name_or_path: builtin:micro\ndataset: builtin:arithmetic\nper_device_train_batch_size: 4\n"
                 "num_generations: 4\nprogress_bar: false\n")
    # the run's own command: a bare `r1fast train --resume` resumed (or started) the default pipeline instead
    assert main(["train", str(g), "output_dir=a b"]) == 130
    assert f"r1fast train: stopped; continue with: r1fast train {g} 'output_dir=a b' --resume" in capsys.readouterr().err
    # one resumed from an older checkpoint continues from the run's newest, a pipeline's run folder stays named
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "trainer_state.json").write_text("{}")
    assert main(["train", str(g), "--resume", str(tmp_path / "ck")]) == 130
    assert f"continue with: r1fast train {g} --resume\n" in capsys.readouterr().err
    # as one resumed from another run's folder (its newest checkpoint): `--resume other` again went back there
    (tmp_path / "other" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "other" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    assert main(["train", str(g), "--resume", str(tmp_path / "other")]) == 130
    assert f"continue with: r1fast train {g} --resume\n" in capsys.readouterr().err
    (tmp_path / "first").mkdir()
    (tmp_path / "first" / "pipeline_state.json").write_text("{}")
    assert main(["pipeline", str(spec), "--resume", str(tmp_path / "first")]) == 130
    assert f"continue with: r1fast pipeline {spec} --resume {tmp_path / 'first'}\n" in capsys.readouterr().err

    def nan(self, *a, **kw):
        raise NonFiniteLoss("3 optimizer steps in a row had a NaN/inf loss")

    monkeypatch.setattr(SFTTrainer, "train", nan)
    with pytest.raises(SystemExit, match=r"^r1fast sft: 3 optimizer steps in a row had a NaN/inf loss$"):
        main(["sft", "model_name_or_path=builtin:micro", "dataset=builtin:arithmetic", "progress_bar=false"])
    # --help anywhere among the options
    assert main(["sft", "max_steps=3", "--help"]) == 0 and "usage: r1fast sft" in capsys.readouterr().out


def _sampling_that_fails_at_batch_2(tmp_path, monkeypatch, error) -> list[str]:
    """`r1fast sample` whose sampling keeps its first batch of prompts, then raises `error`; its arguments."""
    import r1fast.trainer.sampling as sampling

    def fails_at_batch_2(model, tok, rows, cfg, on_batch=None, **kw):
        on_batch([], {"prompts": 8, "next_prompt": 4})
        raise error

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sampling, "rejection_sample", fails_at_batch_2)
    return ["model_name_or_path=builtin:micro", "dataset=builtin:arithmetic", "output_file=out.jsonl"]


def test_r1fast_sample_stopped_by_an_error_says_what_it_kept(tmp_path, monkeypatch, capsys):
    # a reward function raising at the second batch of prompts (a judge down): the error alone did not say that
    # the first batch was kept, and the next run without --resume refused to start over it
    from r1fast.rewards import RewardError

    args = _sampling_that_fails_at_batch_2(
        tmp_path, monkeypatch, RewardError("reward function 'judge' raised RuntimeError: judge down"))
    with pytest.raises(SystemExit, match="judge down"):
        main(["sample", *args])
    assert capsys.readouterr().err.strip() == (
        "r1fast sample: the batches of prompts sampled before the error below are kept in "
        "out.jsonl.sample_progress.json; continue with: r1fast sample " + " ".join(args) + " --resume")


def test_r1fast_sample_stopped_by_a_reward_timeout_says_to_continue_with_a_higher_one(tmp_path, monkeypatch, capsys):
    # the hint repeated reward_timeout=1, which timed out again; resuming with another limit is allowed
    from r1fast.rewards import RewardTimeout

    args = _sampling_that_fails_at_batch_2(
        tmp_path, monkeypatch, RewardTimeout("reward function 'judge' did not return within reward_timeout = 1 s"))
    with pytest.raises(SystemExit, match="did not return"):
        main(["sample", *args, "reward_timeout=1"])
    assert capsys.readouterr().err.strip() == (
        "r1fast sample: the batches of prompts sampled before the error below are kept in "
        "out.jsonl.sample_progress.json; continue with a higher reward_timeout: r1fast sample " + " ".join(args)
        + " reward_timeout=SECONDS --resume")
    (tmp_path / "s.yaml").write_text("reward_timeout: 1\n")   # set in the config file: raised there
    with pytest.raises(SystemExit, match="did not return"):
        main(["sample", "s.yaml", *args, "--resume"])
    assert capsys.readouterr().err.strip().endswith(
        "; raise reward_timeout in s.yaml and continue with: r1fast sample s.yaml " + " ".join(args) + " --resume")


def test_r1fast_sample_resume_over_another_samplings_progress_stopped_by_an_error_keeps_nothing(
        tmp_path, monkeypatch, capsys):
    # --resume over a progress file of other options (set aside: "samples from its first prompt"), then an error
    # before the first batch: the file is still the other sampling's, so nothing of this one is kept there
    import r1fast.trainer.sampling as sampling
    from r1fast.rewards import RewardError

    def judge_down_at_batch_1(model, tok, rows, cfg, on_batch=None, **kw):
        raise RewardError("reward function 'judge' raised RuntimeError: judge down")

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out.jsonl.sample_progress.json").write_text(
        json.dumps({"r1fast_sample_progress": 2, "fingerprint": "another sampling"}) + "\n"
        + json.dumps({"next_prompt": 4, "stats": {"prompts": 8}, "rows": []}) + "\n")
    monkeypatch.setattr(sampling, "rejection_sample", judge_down_at_batch_1)
    args = ["model_name_or_path=builtin:micro", "dataset=builtin:arithmetic", "output_file=out.jsonl"]
    with pytest.raises(SystemExit, match="judge down"):
        main(["sample", *args, "--resume"])
    err = capsys.readouterr().err
    assert "is for other options or prompts" in err and "are kept in" not in err


def test_cli_resume_forms():
    from r1fast.trainer.cli import _resume_pipeline, _split

    assert _split(["--resume", "max_steps=3"]) == (None, ["max_steps=3"], True)   # an override, not a PATH
    assert _split(["--resume", "runs/x", "max_steps=3"]) == (None, ["max_steps=3"], "runs/x")
    assert _split(["--resume=runs/x"]) == (None, [], "runs/x") and _split(["--resume="]) == (None, [], True)
    assert _split(["--lr", "1", "--resume"]) == (None, ["--lr", "1"], True)
    for spelled in ("latest", "true", True):
        assert _resume_pipeline(spelled, ["a=1"]) == (True, ["a=1"])
    assert _resume_pipeline(None, []) == (False, [])
    # a shipped config named from anywhere is read from, and named as, its packaged file
    from r1fast.trainer.config import PACKAGED_CONFIGS

    assert _split(["distill", "a=1"]) == (os.path.join(PACKAGED_CONFIGS, "distill.yaml"), ["a=1"], None)


def test_a_pipeline_interrupted_mid_stage_resumes_that_stage_from_its_checkpoint(tmp_path, monkeypatch):
    from r1fast.trainer import sft

    spec = tiny_pipeline(tmp_path)
    spec["stages"] = [{**spec["stages"][0], "config": {**spec["stages"][0]["config"], "max_steps": 4,
                                                      "logging_steps": 1}}]
    spec.pop("eval_dataset")
    step, done = sft.SFTTrainer.step, []

    def ctrl_c_after_step_2(self):
        m = step(self)
        done.append(self.global_step)
        self._stop_requested = self.global_step == 2
        return m

    monkeypatch.setattr(sft.SFTTrainer, "step", ctrl_c_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(spec)
    # `r1fast plot` shows the stage in progress or interrupted (the run's metrics.jsonl holds finished
    # stages only: "no metrics.jsonl" until the first stage had finished)
    from r1fast.trainer.plot import run_metrics

    assert [r["step"] for r in run_metrics(str(tmp_path / "run"))] == [1, 2]
    monkeypatch.setattr(sft.SFTTrainer, "step", lambda self: done.append(self.global_step + 1) or step(self))
    summary = run_pipeline(spec, resume=True)
    assert done == [1, 2, 3, 4] and summary["stages"][0]["steps"] == 4
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_overwrite_output_dir_clears_an_earlier_pipelines_stage_files(tmp_path):
    from r1fast.trainer.checkpoints import RunFolderInUse
    from r1fast.trainer.pipeline import PipelineRunner

    spec = tiny_pipeline(tmp_path)
    run = tmp_path / "run"
    (run / "rs").mkdir(parents=True)
    (run / "rs" / "samples.jsonl").write_text("{}\n")
    (run / "summary.json").write_text("{}")
    (run / "pipeline_state.json").write_text(json.dumps({"order": ["cold", "rs"], "stages": {"rs": {"finished": True}}}))
    with pytest.raises(RunFolderInUse, match="finished stages: rs"):
        PipelineRunner(load_pipeline(spec)).start_fresh()
    PipelineRunner(load_pipeline({**spec, "overwrite_output_dir": True})).start_fresh()
    assert sorted(os.listdir(run)) == ["rs"] and os.listdir(run / "rs") == []


def test_a_grpo_stages_fp8_stays_with_it(tmp_path):
    # the next stage trained the same model object through the FP8 layers (SFT has no fp8 option at all),
    # and only a resumed run started it in high precision: fresh and resumed runs differed
    spec = {"name": "f", "seed": 0, "model": "builtin:micro", "progress_bar": False, "eval_dataset": None,
            "stages": [{"name": "rl", "type": "grpo", "dataset": "builtin:arithmetic?min_terms=2&max_terms=2",
                        "num_rows": 16, "config": {"max_steps": 1, "per_device_train_batch_size": 8,
                                                   "num_generations": 4, "max_completion_length": 8,
                                                   "max_prompt_length": 16, "fp8": "emulate"}},
                       {"name": "s2", "type": "sft", "dataset": "builtin:arithmetic", "num_rows": 16,
                        "config": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2}}]}
    assert_last_stage_resumes_as_it_ran(spec, tmp_path, "s2", "checkpoint-2")


def test_fp8_off_unquoted_in_yaml_is_the_mode_off(tmp_path):
    # YAML reads `off` as false: the documented `fp8: off` was refused ("expects str, got False")
    from r1fast.trainer import GRPOConfig

    (tmp_path / "g.yaml").write_text("fp8: off\nfp8_scaling: tensorwise\n")
    assert GRPOConfig.from_yaml(str(tmp_path / "g.yaml")).fp8_options().mode == "off"
    assert GRPOConfig.from_yaml(str(tmp_path / "g.yaml"), ["fp8=off"]).fp8 == "off"
    with pytest.raises(Exception, match="option 'fp8'"):
        GRPOConfig.from_dict({"fp8": True})   # `on` names no mode


def test_a_missing_extension_stops_a_pipeline_before_its_first_stage_trains(tmp_path, monkeypatch, capsys):
    # r1fast train ran the whole SFT stage, then failed at the first rollout with a RuntimeError traceback
    from r1fast import _ext

    monkeypatch.setattr(_ext, "load", lambda: None)
    monkeypatch.setattr(_ext, "problem", lambda: "r1fast._C is out of date: ...")
    spec = tiny_pipeline(tmp_path)
    with pytest.raises(_ext.ExtensionUnavailable, match="out of date.*rollout engine of stage 'cold'"):
        run_pipeline(spec)   # 'cold' is evaluated after it: the engine samples the held-out prompts
    assert not (tmp_path / "run" / "cold").exists()
    spec.pop("eval_dataset")
    with pytest.raises(_ext.ExtensionUnavailable, match="stage 'rl'"):
        run_pipeline({**spec, "overwrite_output_dir": True})
    assert not (tmp_path / "run" / "cold").exists()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="r1fast train: r1fast._C is out of date"):
        main(["train", "output_dir=" + str(tmp_path / "cli")])
    from r1fast.trainer import GRPOConfig, GRPOTrainer

    with pytest.raises(_ext.ExtensionUnavailable, match="GRPOTrainer's rollout engine needs it"):
        GRPOTrainer("builtin:micro", ["format"], [{"prompt": "1"}], GRPOConfig(output_dir=str(tmp_path / "g")))


def assert_last_stage_resumes_as_it_ran(spec, tmp_path, stage, checkpoint):
    """Runs `spec` twice; in the second run folder forgets `stage` (the last) and resumes: it must train
    the weights the uninterrupted run did."""
    import shutil

    from safetensors.torch import load_file

    for x in "fr":
        run_pipeline({**spec, "output_dir": str(tmp_path / x)})
    state_path = tmp_path / "r" / "pipeline_state.json"
    state = json.loads(state_path.read_text())
    del state["stages"][stage]
    state_path.write_text(json.dumps(state))
    shutil.rmtree(tmp_path / "r" / stage)
    run_pipeline({**spec, "output_dir": str(tmp_path / "r")}, resume=True)
    fresh, resumed = (load_file(str(tmp_path / x / stage / checkpoint / "model.safetensors")) for x in "fr")
    assert fresh.keys() == resumed.keys()
    for k in fresh:
        assert torch.equal(fresh[k], resumed[k]), k


def sigterm_on_call(tmp_path, monkeypatch, n: int):
    """A reward function `stopper:f` (1.0 for every sample) whose n-th call sends this process SIGTERM,
    as a scheduler ending the job does; its calls are counted in `stopper.calls`."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "stopper.py").write_text(
        "import os, signal\ncalls = []\nSTOP_AT = 0\n"
        "def f(prompts, completions, **kw):\n"
        "    calls.append(len(completions))\n"
        "    if len(calls) == STOP_AT:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return [1.0] * len(completions)\n")
    import importlib

    import stopper

    importlib.reload(stopper)   # a fresh count for this test
    stopper.STOP_AT = n
    return stopper


def sigkill_on_call(tmp_path, monkeypatch):
    """A reward function `killer:f` (1.0 for every sample) whose call number $KILL_AT sends its process
    SIGKILL (an out-of-memory kill, a node failure, a scheduler past its KillWait): nothing runs after it."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "killer.py").write_text(
        "import os, signal\ncalls = []\n"
        "def f(prompts, completions, **kw):\n"
        "    calls.append(len(completions))\n"
        "    if len(calls) == int(os.environ.get('KILL_AT', 0)):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return [1.0] * len(completions)\n")
    import importlib

    import killer

    return importlib.reload(killer)   # a fresh count for this test's own process


def killed_subprocess(tmp_path, args: list[str], kill_at: int):
    """`r1fast ARGS` in a process of its own, in tmp_path, SIGKILLed by killer:f's call `kill_at`."""
    import signal
    import subprocess
    import sys

    env = {**os.environ, "KILL_AT": str(kill_at),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    res = subprocess.run([sys.executable, "-m", "r1fast", *args], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == -signal.SIGKILL, res.stderr


def progress_records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def sample_stage_spec(tmp_path, output_dir: str = "run", temperature: float = 1.0, reward: str = "stopper:f"):
    spec = tmp_path / f"{output_dir}.yaml"
    spec.write_text(f"name: p\nmodel: builtin:micro\nprogress_bar: false\noutput_dir: {tmp_path / output_dir}\n"
                    "stages:\n"
                    "  - {name: rs, type: sample, dataset: builtin:arithmetic, num_rows: 8,\n"
                    "     config: {num_samples: 2, batch_prompts: 2, max_completion_length: 4, keep_truncated: true,\n"
                    f"              temperature: {temperature}, reward_funcs: ['{reward}'], reward_thresholds: [0]}}}}\n")
    return spec


def test_sigterm_in_a_sample_stage_keeps_its_batches_and_resume_continues_there(tmp_path, monkeypatch, capsys,
                                                                                 sigterm_guard):
    # SIGTERM ended the process at once (status 143, no word): every prompt sampled was lost and the
    # stage started over. It now stops after the batch of prompts, keeps its rows, exits with 130 as a
    # training stage does, and --resume samples the remaining prompts only, giving what one run gives.
    import signal

    stopper = sigterm_on_call(tmp_path, monkeypatch, 2)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    spec = sample_stage_spec(tmp_path)
    assert main(["pipeline", str(spec)]) == 130
    out, err = capsys.readouterr()
    assert "SIGTERM: finishing this batch of prompts of stage 'rs'" in out
    assert "interrupted stage 'rs' after 4 of 8 prompts (4 samples kept so far" in out
    assert err.strip() == f"r1fast pipeline: stopped; continue with: r1fast pipeline {spec} --resume"
    assert {s: signal.getsignal(s) for s in before} == before   # handlers restored
    progress = progress_records(tmp_path / "run" / "rs" / "sample_progress.json")
    assert progress[-1]["next_prompt"] == 4 and sum(len(r["rows"]) for r in progress[1:]) == 4
    assert main(["pipeline", str(spec), "--resume"]) == 0
    assert "stage 'rs' continues from prompt 5 of 8 (4 samples kept before)" in capsys.readouterr().out
    assert stopper.calls == [4] * 4   # 2 batches, then the other 2 only
    assert not (tmp_path / "run" / "rs" / "sample_progress.json").exists()
    resumed = (tmp_path / "run" / "rs" / "samples.jsonl").read_text()
    state = json.loads((tmp_path / "run" / "pipeline_state.json").read_text())
    assert state["stages"]["rs"]["sample_stats"]["samples"] == 16
    stopper.STOP_AT = 0
    assert main(["pipeline", str(sample_stage_spec(tmp_path, "whole"))]) == 0
    assert (tmp_path / "whole" / "rs" / "samples.jsonl").read_text() == resumed


def test_a_stopped_sample_stage_resumed_with_other_options_starts_over_and_says_so(tmp_path, monkeypatch, capsys,
                                                                                    sigterm_guard):
    stopper = sigterm_on_call(tmp_path, monkeypatch, 1)
    assert main(["pipeline", str(sample_stage_spec(tmp_path))]) == 130
    stopper.calls.clear()
    stopper.STOP_AT = 0
    assert main(["pipeline", str(sample_stage_spec(tmp_path, temperature=0.5)), "--resume"]) == 0
    assert "is for other options or prompts: it samples from its first prompt" in capsys.readouterr().err
    assert stopper.calls == [4] * 4


def test_sigterm_in_r1fast_sample_keeps_its_batches_and_resume_writes_what_one_run_writes(tmp_path, monkeypatch,
                                                                                          capsys, sigterm_guard):
    # `r1fast sample` had no handler: SIGTERM ended it at once (status 143, no word) and every prompt sampled
    # was lost, and it refused --resume. It now stops after its batch as a pipeline's sample stage does, keeps
    # its rows beside the output and --resume samples the rest, writing the bytes one run writes.
    import signal

    monkeypatch.chdir(tmp_path)
    stopper = sigterm_on_call(tmp_path, monkeypatch, 1)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    args = ["sample", "model_name_or_path=builtin:micro", "dataset=builtin:arithmetic", "max_prompts=4",
            "num_samples=2", "batch_prompts=2", "max_completion_length=4", "keep_truncated=true",
            "reward_funcs=[stopper:f]", "reward_thresholds=[0]", "progress_bar=false"]
    assert main([*args, "output_file=kept.jsonl"]) == 130
    out, err = capsys.readouterr()
    assert "SIGTERM: finishing this batch of prompts and keeping what it sampled so far" in out
    assert ("interrupted sampling after 2 of 4 prompts (2 samples kept so far, in kept.jsonl.sample_progress.json)"
            in out)
    assert err.strip() == "r1fast sample: stopped; continue with: r1fast sample " + " ".join(
        a if "[" not in a else f"'{a}'" for a in args[1:]) + " output_file=kept.jsonl --resume"
    assert {s: signal.getsignal(s) for s in before} == before   # handlers restored
    assert not (tmp_path / "kept.jsonl").exists()   # no output that looks complete
    assert progress_records(tmp_path / "kept.jsonl.sample_progress.json")[-1]["next_prompt"] == 2
    with pytest.raises(SystemExit, match=r"kept.jsonl.sample_progress.json holds what a stopped run kept for "
                                         r"kept.jsonl. Type\n.* output_file=kept.jsonl --resume    to continue it"):
        main([*args, "output_file=kept.jsonl"])   # a new run would lose it
    assert main([*args, "output_file=kept.jsonl", "--resume"]) == 0
    assert "sampling continues from prompt 3 of 4 (2 samples kept before)" in capsys.readouterr().out
    assert stopper.calls == [4] * 2   # 1 batch, then the other one only
    assert not (tmp_path / "kept.jsonl.sample_progress.json").exists()
    stopper.STOP_AT = 0
    assert main([*args, "output_file=whole.jsonl"]) == 0
    assert (tmp_path / "whole.jsonl").read_bytes() == (tmp_path / "kept.jsonl").read_bytes()
    assert len((tmp_path / "whole.jsonl").read_text().splitlines()) == 4


def sample_args(output_file: str, reward: str = "stopper:f", prompts: int = 4) -> list[str]:
    return ["sample", "model_name_or_path=builtin:micro", "dataset=builtin:arithmetic", f"max_prompts={prompts}",
            "num_samples=2", "batch_prompts=2", "max_completion_length=4", "keep_truncated=true",
            f"reward_funcs=[{reward}]", "reward_thresholds=[0]", "progress_bar=false", f"output_file={output_file}"]


def test_sigkill_in_r1fast_sample_keeps_its_finished_batches_and_resume_writes_what_one_run_writes(
        tmp_path, monkeypatch, capsys):
    # its progress was saved only on Ctrl-C/SIGTERM: a SIGKILL (out of memory, a node failure, Slurm past
    # KillWait) lost every prompt sampled. Each batch's rows are now appended to the progress file as it ends.
    monkeypatch.chdir(tmp_path)
    killer = sigkill_on_call(tmp_path, monkeypatch)
    killed_subprocess(tmp_path, sample_args("kept.jsonl", "killer:f", prompts=6), kill_at=3)   # in the 3rd batch
    assert not (tmp_path / "kept.jsonl").exists()
    records = progress_records(tmp_path / "kept.jsonl.sample_progress.json")
    assert [r.get("next_prompt") for r in records] == [None, 2, 4]   # the header, then 2 batches
    assert main([*sample_args("kept.jsonl", "killer:f", prompts=6), "--resume"]) == 0
    assert "sampling continues from prompt 5 of 6 (4 samples kept before)" in capsys.readouterr().out
    assert killer.calls == [4]   # the last batch only
    assert not (tmp_path / "kept.jsonl.sample_progress.json").exists()
    assert main(sample_args("whole.jsonl", "killer:f", prompts=6)) == 0
    assert (tmp_path / "whole.jsonl").read_bytes() == (tmp_path / "kept.jsonl").read_bytes()
    assert capsys.readouterr().out.splitlines()[-1].split(" →")[0] == "kept 6 of 12 samples from 6 prompts (pass " \
                                                                      "rate 1.000; 12 cut at max_completion_length)"


def test_a_progress_record_cut_short_by_a_kill_is_left_out_and_appended_over(tmp_path, monkeypatch, capsys,
                                                                            sigterm_guard):
    monkeypatch.chdir(tmp_path)
    stopper = sigterm_on_call(tmp_path, monkeypatch, 1)
    args = sample_args("kept.jsonl", prompts=6)
    assert main(args) == 130   # after batch 1
    progress = tmp_path / "kept.jsonl.sample_progress.json"
    whole_record = progress.read_text().splitlines()[1]
    with open(progress, "a") as f:
        f.write(whole_record.replace('"next_prompt": 2', '"next_prompt": 4')[:40])   # killed writing batch 2
    stopper.calls.clear()
    stopper.STOP_AT = 1
    assert main([*args, "--resume"]) == 130   # batch 2 again, appended on a line of its own
    assert "sampling continues from prompt 3 of 6 (2 samples kept before)" in capsys.readouterr().out
    assert [r.get("next_prompt") for r in progress_records(progress)] == [None, 2, 4]
    stopper.STOP_AT = 0
    assert main([*args, "--resume"]) == 0
    assert stopper.calls == [4, 4]
    assert main(sample_args("whole.jsonl", prompts=6)) == 0
    assert (tmp_path / "whole.jsonl").read_bytes() == (tmp_path / "kept.jsonl").read_bytes()


def test_r1fast_sample_resume_after_it_finished_samples_nothing_and_its_statistics_are_kept(tmp_path, monkeypatch,
                                                                                            capsys):
    # a Slurm requeue of a finished `r1fast sample ... --resume` sampled every prompt again (the progress file is
    # removed at the end, and nothing marked the output whole), and the statistics were printed, kept nowhere
    import hashlib

    monkeypatch.chdir(tmp_path)
    stopper = sigterm_on_call(tmp_path, monkeypatch, 0)
    args = sample_args("kept.jsonl")
    assert main(args) == 0
    output = (tmp_path / "kept.jsonl").read_bytes()
    record = json.loads((tmp_path / "kept.jsonl.sample_stats.json").read_text())
    assert record["stats"] == {"prompts": 4, "samples": 8, "truncated": 8, "passed": 8, "pass_rate": 1.0, "kept": 4,
                               "prompts_kept": 4}
    assert (record["output"], record["rows"], record["bytes"]) == ("kept.jsonl", 4, len(output))
    assert record["sha256"] == hashlib.sha256(output).hexdigest() and record["options"]["num_samples"] == 2
    # killed after the record, before removing its progress: the progress goes, as the finished run's
    (tmp_path / "kept.jsonl.sample_progress.json").write_text(
        json.dumps({"r1fast_sample_progress": 2, "fingerprint": record["fingerprint"]}) + "\n")
    written = os.path.getmtime(tmp_path / "kept.jsonl.sample_stats.json")
    os.utime(tmp_path / "kept.jsonl.sample_progress.json", (written - 1, written - 1))   # last written before it
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert stopper.calls == [4, 4]   # nothing sampled again
    assert capsys.readouterr().out.splitlines() == [
        "r1fast: --resume: sampling already complete: 4 rows in kept.jsonl; nothing to sample",
        "kept 4 of 8 samples from 4 prompts (pass rate 1.000; 8 cut at max_completion_length) → kept.jsonl "
        "(statistics in kept.jsonl.sample_stats.json)"]
    assert (tmp_path / "kept.jsonl").read_bytes() == output
    assert not (tmp_path / "kept.jsonl.sample_progress.json").exists()


def test_a_sample_record_beside_an_output_named_in_non_utf8_bytes_is_written_and_read(tmp_path):
    # 'caf\xe9.jsonl' (Latin-1): the output was written, then its record failed with "'utf-8' codec can't encode
    # character '\udce9'", leaving the progress file to --resume into the same error
    from r1fast.trainer import sampling

    out = os.path.join(os.fsdecode(bytes(tmp_path)), os.fsdecode(b"caf\xe9.jsonl"))
    written = sampling.write_jsonl([{"prompt": "1+1", "completion": "2"}], out)
    stats = {"prompts": 1, "samples": 1, "truncated": 0, "passed": 1, "pass_rate": 1.0, "kept": 1, "prompts_kept": 1}
    sampling.write_sample_record(out, {"fingerprint": "f", "stats": stats, "options": {"output_file": out}, **written})
    record, why = sampling.finished_output(out, "f")
    assert why is None and record["output"] == os.path.basename(out) and record["rows"] == 1


def test_r1fast_sample_resume_continues_a_later_stopped_run_over_a_finished_output(tmp_path, monkeypatch, capsys):
    # a finished output's record outranked the progress of a later run of the same options (run again without
    # --resume, e.g. over a model folder retrained since), stopped by a requeue: --resume said 'sampling already
    # complete', kept the earlier output and deleted the later run's progress
    monkeypatch.chdir(tmp_path)
    stopper = sigterm_on_call(tmp_path, monkeypatch, 0)
    assert main(sample_args("kept.jsonl")) == 0
    stopper.calls.clear()
    stopper.STOP_AT = 1
    assert main(sample_args("kept.jsonl")) == 130   # stopped after its first batch of prompts
    stopper.STOP_AT = 0
    capsys.readouterr()
    assert main([*sample_args("kept.jsonl"), "--resume"]) == 0
    assert "sampling continues from prompt 3 of 4" in capsys.readouterr().out
    assert stopper.calls == [4, 4]   # the second batch sampled
    assert not (tmp_path / "kept.jsonl.sample_progress.json").exists()


def test_r1fast_sample_resume_samples_again_over_other_options_or_an_output_changed_since(tmp_path, monkeypatch,
                                                                                          capsys):
    monkeypatch.chdir(tmp_path)
    stopper = sigterm_on_call(tmp_path, monkeypatch, 0)
    assert main(sample_args("kept.jsonl", prompts=2)) == 0
    assert main([*sample_args("kept.jsonl", prompts=2), "--resume", "num_samples=1"]) == 0
    assert "kept.jsonl was written by a sampling of other options or prompts" in capsys.readouterr().err
    assert stopper.calls == [4, 2]
    assert json.loads((tmp_path / "kept.jsonl.sample_stats.json").read_text())["stats"]["samples"] == 2
    with open(tmp_path / "kept.jsonl", "a") as f:
        f.write("{}\n")
    assert main([*sample_args("kept.jsonl", prompts=2), "--resume", "num_samples=1"]) == 0
    assert "kept.jsonl has changed since the sampling wrote it (2 rows" in capsys.readouterr().err
    os.remove(tmp_path / "kept.jsonl")
    assert main([*sample_args("kept.jsonl", prompts=2), "--resume", "num_samples=1"]) == 0
    assert "kept.jsonl, which a finished sampling wrote (its record: kept.jsonl.sample_stats.json), is gone" in \
        capsys.readouterr().err
    assert stopper.calls == [4, 2, 2, 2]
    assert len((tmp_path / "kept.jsonl").read_text().splitlines()) == 2
    assert main(sample_args("kept.jsonl", prompts=2) + ["num_samples=1"]) == 0   # without --resume: written again
    assert stopper.calls == [4, 2, 2, 2, 2]
    os.remove(tmp_path / "kept.jsonl.sample_stats.json")
    os.mkdir(tmp_path / "kept.jsonl.sample_stats.json")   # its write failed once every prompt was sampled
    with pytest.raises(SystemExit, match=r"kept.jsonl.sample_stats.json, where r1fast sample records its output and "
                                         r"statistics, is not a regular file"):
        main(sample_args("kept.jsonl", prompts=2))
    # a name the output and progress files fit but the record's temporary file did not: 'File name too long' once
    # every prompt was sampled, and again after each --resume
    long_name = "a" * 214 + ".jsonl"
    with pytest.raises(SystemExit, match=r"output_file 'a{214}.jsonl': its name is too long for the record written "
                                         r"beside it .*by \d+ bytes; give a shorter output_file"):
        main(sample_args(long_name, prompts=2))
    assert stopper.calls == [4, 2, 2, 2, 2] and not os.path.exists(long_name + ".sample_progress.json")


def test_a_progress_file_of_the_older_single_object_format_resumes(tmp_path, monkeypatch, capsys, sigterm_guard):
    # an r1fast before the appended records wrote {"fingerprint", "next_prompt", "stats", "rows"} when stopped
    monkeypatch.chdir(tmp_path)
    stopper = sigterm_on_call(tmp_path, monkeypatch, 1)
    args = sample_args("kept.jsonl", prompts=6)
    assert main(args) == 130
    progress = tmp_path / "kept.jsonl.sample_progress.json"
    header, batch = progress_records(progress)
    progress.write_text(json.dumps({"fingerprint": header["fingerprint"], **batch}))
    stopper.calls.clear()
    stopper.STOP_AT = 0
    assert main([*args, "--resume"]) == 0
    assert "sampling continues from prompt 3 of 6 (2 samples kept before)" in capsys.readouterr().out
    assert stopper.calls == [4, 4]
    assert main(sample_args("whole.jsonl", prompts=6)) == 0
    assert (tmp_path / "whole.jsonl").read_bytes() == (tmp_path / "kept.jsonl").read_bytes()


def test_sigkill_in_a_sample_stage_resumes_from_its_last_finished_batch(tmp_path, monkeypatch, capsys):
    killer = sigkill_on_call(tmp_path, monkeypatch)
    spec = sample_stage_spec(tmp_path, reward="killer:f")
    killed_subprocess(tmp_path, ["pipeline", str(spec)], kill_at=3)
    records = progress_records(tmp_path / "run" / "rs" / "sample_progress.json")
    assert [r.get("next_prompt") for r in records] == [None, 2, 4]
    assert main(["pipeline", str(spec), "--resume"]) == 0
    assert "stage 'rs' continues from prompt 5 of 8 (4 samples kept before)" in capsys.readouterr().out
    assert killer.calls == [4, 4]
    assert main(["pipeline", str(sample_stage_spec(tmp_path, "whole", reward="killer:f"))]) == 0
    assert (tmp_path / "whole" / "rs" / "samples.jsonl").read_bytes() == \
        (tmp_path / "run" / "rs" / "samples.jsonl").read_bytes()
    state = json.loads((tmp_path / "run" / "pipeline_state.json").read_text())
    assert state["stages"]["rs"]["sample_stats"]["samples"] == 16


def test_sigterm_in_the_evaluation_between_stages_stops_before_the_next(tmp_path, monkeypatch, capsys, sigterm_guard):
    # SIGTERM during the held-out evaluation after a stage ended the process at once, losing that
    # evaluation; it now finishes it, records the stage and stops before the next one.
    import signal

    from r1fast.trainer.pipeline import PipelineRunner

    spec = tiny_pipeline(tmp_path)
    spec["stages"] = [spec["stages"][0], spec["stages"][2]]
    spec["stages"][0]["config"]["max_steps"] = 1
    evaluate = PipelineRunner.evaluate

    def sigterm_mid_evaluation(self, *a, **kw):
        signal.raise_signal(signal.SIGTERM)
        return evaluate(self, *a, **kw)

    monkeypatch.setattr(PipelineRunner, "evaluate", sigterm_mid_evaluation)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(spec)
    out = capsys.readouterr().out
    assert "SIGTERM: finishing the held-out evaluation after stage 'cold'" in out
    assert "interrupted before stage 'rs'" in out and "== stage 2/2" not in out   # rs never started
    state = json.loads((tmp_path / "run" / "pipeline_state.json").read_text())
    assert list(state["stages"]) == ["cold"] and "eval/accuracy" in state["stages"]["cold"]["eval"]
    monkeypatch.setattr(PipelineRunner, "evaluate", evaluate)
    summary = run_pipeline(spec, resume=True)
    assert [s["stage"] for s in summary["stages"]] == ["cold", "rs"]
    assert "cold (sft): done in the earlier run, skipped" in capsys.readouterr().out


def test_sigterm_in_a_stages_final_save_stops_before_the_next_stage(tmp_path, monkeypatch, capsys, sigterm_guard):
    # a stop the trainer's handler took in the stage's last checkpoint save (after its last step) was the trainer's
    # alone: the stage returned as finished and the pipeline ran every later stage, as if nothing had been asked
    import signal

    from r1fast.trainer.sft import SFTTrainer

    spec = tmp_path / "p.yaml"
    spec.write_text("name: p\nmodel: builtin:micro\nprogress_bar: false\nstages:\n" + "".join(
        f"  - {{name: {name}, type: sft, dataset: builtin:arithmetic, num_rows: 8,\n"
        f"     config: {{max_steps: 1, per_device_train_batch_size: 4}}}}\n" for name in ("a", "b")))
    save = SFTTrainer.save

    def sigterm_in_stage_a_save(self):
        if self.stage == "a":
            signal.raise_signal(signal.SIGTERM)
        return save(self)

    monkeypatch.setattr(SFTTrainer, "save", sigterm_in_stage_a_save)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(str(spec), [f"output_dir={run}"])
    assert "interrupted before stage 'b'" in capsys.readouterr().out
    state = json.loads((run / "pipeline_state.json").read_text())
    assert list(state["stages"]) == ["a"] and state["stages"]["a"]["finished"] and not (run / "b").exists()
    monkeypatch.setattr(SFTTrainer, "save", save)
    summary = run_pipeline(str(spec), [f"output_dir={run}"], resume=True)
    assert [s["stage"] for s in summary["stages"]] == ["a", "b"]


@pytest.mark.parametrize("second", ["sft", "sample"])
def test_a_stop_while_the_next_stage_loads_prints_no_header_of_that_stage(tmp_path, monkeypatch, capsys, sigterm_guard,
                                                                         second):
    # a stop while the next stage loaded its data printed that stage's `== stage 2/2: b (...) ==` header and then
    # `interrupted before stage 'b'`: the header of a stage that never started. Its header now comes once it starts
    import signal

    from r1fast.trainer.pipeline import PipelineRunner

    config = ("{max_steps: 1, per_device_train_batch_size: 4}" if second == "sft" else
              "{num_samples: 2, max_completion_length: 4, reward_funcs: [format], reward_thresholds: [0.0], "
              "keep_truncated: true}")
    spec = tmp_path / "p.yaml"
    spec.write_text("name: p\nmodel: builtin:micro\nprogress_bar: false\nstages:\n"
                    "  - {name: a, type: sft, dataset: builtin:arithmetic, num_rows: 8,\n"
                    "     config: {max_steps: 1, per_device_train_batch_size: 4}}\n"
                    f"  - {{name: b, type: {second}, dataset: builtin:arithmetic, num_rows: 4,\n"
                    f"     config: {config}}}\n")
    stage_rows = PipelineRunner.stage_rows

    def sigterm_as_b_loads(self, stage, *a, **kw):
        if stage.name == "b":
            signal.raise_signal(signal.SIGTERM)
        return stage_rows(self, stage, *a, **kw)

    monkeypatch.setattr(PipelineRunner, "stage_rows", sigterm_as_b_loads)
    run = tmp_path / "run"
    assert main(["pipeline", str(spec), f"output_dir={run}"]) == 130
    out = capsys.readouterr().out
    assert "== stage 1/2: a (sft) ==" in out and "interrupted before stage 'b'" in out
    assert "== stage 2/2" not in out
    monkeypatch.setattr(PipelineRunner, "stage_rows", stage_rows)
    assert main(["pipeline", str(spec), f"output_dir={run}", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "== stage 1/2: a (sft): done in the earlier run, skipped ==" in out
    assert f"== stage 2/2: b ({second}) ==" in out


def test_sigterm_while_a_stages_trainer_starts_stops_it_at_its_first_step(tmp_path, monkeypatch, capsys, sigterm_guard):
    # a stop the pipeline's handler took while a stage's trainer was starting (loading its checkpoint, before the
    # trainer's own handler) was the pipeline's alone: the stage trained all its steps before the run stopped
    import signal

    from r1fast.trainer import sft

    spec = tmp_path / "p.yaml"
    spec.write_text("name: p\nmodel: builtin:micro\nprogress_bar: false\nstages:\n"
                    "  - {name: a, type: sft, dataset: builtin:arithmetic, num_rows: 8,\n"
                    "     config: {max_steps: 3, per_device_train_batch_size: 4, logging_steps: 1}}\n")
    start_run = sft.start_run

    def sigterm_as_it_starts(trainer, resume):
        signal.raise_signal(signal.SIGTERM)
        return start_run(trainer, resume)

    monkeypatch.setattr(sft, "start_run", sigterm_as_it_starts)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(str(spec), [f"output_dir={run}"])
    assert "interrupted at step 1" in capsys.readouterr().out
    assert sorted(os.listdir(run / "a")) == [".r1fast.lock", "checkpoint-1", "metrics.jsonl"]
    monkeypatch.setattr(sft, "start_run", start_run)
    assert run_pipeline(str(spec), [f"output_dir={run}"], resume=True)["stages"][0]["steps"] == 3


def test_a_stage_whose_checkpoint_replacement_was_killed_resumes_from_it(tmp_path, capsys):
    # killed in a save that replaced the stage's last checkpoint, between its two renames: the complete
    # .checkpoint-N.old-<pid> was not seen, the stage started over, and its trainer (which puts the old one
    # back) then refused the folder as an earlier run's
    spec = one_sft_stage_spec(tmp_path)
    run = tmp_path / "run"
    run_pipeline(str(spec), [f"output_dir={run}", "s.max_steps=2"])
    logged = (run / "metrics.jsonl").read_text()
    os.rename(run / "s" / "checkpoint-2", run / "s" / ".checkpoint-2.old-9")
    os.remove(run / "pipeline_state.json")
    run_pipeline(str(spec), [f"output_dir={run}", "s.max_steps=2"], resume=True)
    assert sorted(os.listdir(run / "s")) == [".r1fast.lock", "checkpoint-2", "metrics.jsonl"]
    assert (run / "metrics.jsonl").read_text() == logged   # nothing trained again


def test_resume_refuses_a_stage_folder_with_a_killed_saves_old_checkpoint_before_saying_where_it_starts(
        tmp_path, capsys, monkeypatch):
    # a visible checkpoint-N.old-<pid> (an earlier r1fast's save killed replacing checkpoint-N): --resume printed
    # "no earlier run ...; starting from the first stage" and "stage 's' ... starts from its first step", then the
    # stage's trainer refused the folder, so the output said the run had started when it had not
    import io

    spec = one_sft_stage_spec(tmp_path)
    run = tmp_path / "run"
    run_pipeline(str(spec), [f"output_dir={run}"])
    os.rename(run / "s" / "checkpoint-1", run / "s" / "checkpoint-1.old-9")
    os.remove(run / "pipeline_state.json")
    both = io.StringIO()   # stdout and stderr as the terminal shows them, in order
    monkeypatch.setattr(sys, "stdout", both)
    monkeypatch.setattr(sys, "stderr", both)
    with pytest.raises(SystemExit) as refused:
        main(["pipeline", str(spec), f"output_dir={run}", "--resume"])
    print(refused.value.code, file=sys.stderr)
    lines = [line for line in both.getvalue().splitlines() if line.strip() and "UserWarning" not in line
             and not line.startswith("  ")]
    assert lines[0].startswith(f"r1fast pipeline: {run / 's'} holds an earlier run (checkpoint-1.old-9, which may be "
                               f"checkpoint-1 set aside by a killed save)"), lines
    assert "first step" not in both.getvalue() and "starting from the first stage" not in both.getvalue()
    assert "== stage" not in both.getvalue()
    assert sorted(os.listdir(run / "s")) == [".r1fast.lock", "checkpoint-1.old-9", "metrics.jsonl"]   # nothing moved


def test_resume_reads_a_finished_stages_data_file_again_only_when_its_size_or_mtime_changed(tmp_path, monkeypatch,
                                                                                             capsys):
    # every --resume read and hashed each finished stage's data file again to see whether it changed since the
    # stage ran: slow for a large file. The file's (path, size, mtime_ns) is now recorded with its rows' hash, and
    # an unchanged file is not read; one edited in place to the same size is read again, as its mtime moved
    from r1fast.trainer.pipeline import PipelineRunner

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i + 2}=", "completion": f"<answer>{2 * i + 2}</answer>"})
                            + "\n" for i in range(1, 9)))
    _age(data)   # written a minute ago: one written as the stage started is read again (the test below)
    spec = {"name": "d", "model": "builtin:micro", "progress_bar": False, "output_dir": str(tmp_path / "run"),
            "stages": [{"name": "s", "type": "sft", "dataset": str(data),
                        "config": {"max_steps": 1, "per_device_train_batch_size": 4}}]}
    run_pipeline(spec)
    reads = []
    stage_rows = PipelineRunner.stage_rows
    monkeypatch.setattr(PipelineRunner, "stage_rows", lambda self, *a, **k: reads.append(a[0].name)
                        or stage_rows(self, *a, **k))
    capsys.readouterr()
    run_pipeline(spec, resume=True)
    assert reads == [] and "changed since it ran" not in capsys.readouterr().err

    before = os.stat(data)
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))   # touched, rows the same: read once
    run_pipeline(spec, resume=True)
    run_pipeline(spec, resume=True)
    assert reads == ["s"] and "changed since it ran" not in capsys.readouterr().err

    edited = data.read_text().replace("1+3=", "1+4=")   # the same size
    assert len(edited) == before.st_size
    data.write_text(edited)
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns + 2 * 10**9))
    run_pipeline(spec, resume=True)
    assert reads == ["s", "s"]
    assert re.search(rf"stage 's' finished in the earlier run.*the rows of dataset '{re.escape(str(data))}' changed "
                     rf"since it ran: sha256 [0-9a-f]{{16}} -> [0-9a-f]{{16}}", capsys.readouterr().err)
    run_pipeline(spec, resume=True)   # still said: the rows the stage trained on are not these
    assert reads == ["s", "s", "s"] and "changed since it ran" in capsys.readouterr().err


def _age(path, seconds: int = 60):
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - seconds * 10**9))


def test_resume_reads_again_a_data_file_modified_within_a_timestamp_tick_of_the_stage_start(tmp_path, monkeypatch,
                                                                                          capsys):
    # a file written as the stage started and rewritten to the same size within the filesystem's timestamp tick kept
    # its (size, mtime_ns): --resume took it as the file the stage read, and its changed rows went unsaid
    from r1fast.trainer.pipeline import PipelineRunner

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i + 3}=", "completion": f"<answer>{2 * i + 3}</answer>"})
                            + "\n" for i in range(1, 9)))
    spec = {"name": "d", "model": "builtin:micro", "progress_bar": False, "output_dir": str(tmp_path / "run"),
            "stages": [{"name": "s", "type": "sft", "dataset": str(data),
                        "config": {"max_steps": 1, "per_device_train_batch_size": 4}}]}
    run_pipeline(spec)
    before = os.stat(data)
    edited = data.read_text().replace("1+4=", "1+5=")
    assert len(edited) == before.st_size
    data.write_text(edited)
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))   # the same tick: the same size and mtime
    reads = []
    stage_rows = PipelineRunner.stage_rows
    monkeypatch.setattr(PipelineRunner, "stage_rows", lambda self, *a, **k: reads.append(a[0].name)
                        or stage_rows(self, *a, **k))
    capsys.readouterr()
    run_pipeline(spec, resume=True)
    assert reads == ["s"]
    assert re.search(rf"the rows of dataset '{re.escape(str(data))}' changed since it ran", capsys.readouterr().err)
    # put back and settled (older than a tick when looked at again): read once more, recorded, then left alone
    data.write_text(edited.replace("1+5=", "1+4="))
    _age(data)
    run_pipeline(spec, resume=True)
    run_pipeline(spec, resume=True)
    assert reads == ["s", "s"] and "changed since it ran" not in capsys.readouterr().err


def _rerun_spec(tmp_path):
    """tiny_pipeline without its held-out evaluation (the rerun tests check folders and state, not accuracy)."""
    spec = tiny_pipeline(tmp_path)
    spec.pop("eval_dataset")
    return spec


def _files_and_times(folder):
    return {os.path.relpath(os.path.join(d, n), folder): os.stat(os.path.join(d, n)).st_mtime_ns
            for d, _, names in os.walk(folder) for n in names if n != ".r1fast.lock"}


def test_rerun_from_keeps_the_stages_before_it_and_runs_it_and_the_later_ones_afresh(tmp_path, capsys):
    # a user who changed a later stage's options had to start the whole run over (overwrite_output_dir) or edit the
    # run folder by hand: rerun_from=<stage> reuses the stages before it as --resume does and sets aside the rest
    spec = _rerun_spec(tmp_path)
    run = tmp_path / "run"
    run_pipeline(spec)
    kept_before = {name: _files_and_times(run / name) for name in ("cold", "rl")}
    old_samples = (run / "rs" / "samples.jsonl").read_text()
    old_state = json.loads((run / "pipeline_state.json").read_text())
    assert len(old_samples.splitlines()) == 4   # one kept per prompt
    capsys.readouterr()

    summary = run_pipeline(spec, ["rerun_from=rs", "rs.num_rows=2"])
    out = capsys.readouterr().out
    pid = os.getpid()
    assert (f"r1fast: rerun_from=rs: stages rs, student run afresh, the earlier stages as --resume keeps them; the "
            f"earlier run's outputs are set aside: {run / 'rs'} is now {run / 'rs'}.old-{pid}; {run / 'student'} is "
            f"now {run / 'student'}.old-{pid}") in out
    assert "== stage 1/4: cold (sft): done in the earlier run, skipped ==" in out
    assert "== stage 2/4: rl (grpo): done in the earlier run, skipped ==" in out
    assert "== stage 3/4: rs (sample) ==" in out and "first step" not in out
    # the stages before it: untouched, and their records as they were
    assert {name: _files_and_times(run / name) for name in ("cold", "rl")} == kept_before
    state = json.loads((run / "pipeline_state.json").read_text())
    assert state["stages"]["cold"] == old_state["stages"]["cold"] and state["stages"]["rl"] == old_state["stages"]["rl"]
    # the named stage and the later one: run again with the new option, the earlier run's outputs beside
    assert len((run / "rs" / "samples.jsonl").read_text().splitlines()) == 2
    assert state["stages"]["rs"]["options"]["num_rows"] == 2 and state["stages"]["student"]["finished"]
    assert (run / f"rs.old-{pid}" / "samples.jsonl").read_text() == old_samples
    assert sorted(n for n in os.listdir(run / f"student.old-{pid}") if n.startswith("checkpoint-")) == ["checkpoint-2"]
    assert [s["steps"] for s in summary["stages"]] == [3, 2, 0, 2]
    student_steps = [json.loads(line)["step"] for line in open(run / "metrics.jsonl")
                     if json.loads(line).get("stage") == "student"]
    assert student_steps and min(student_steps) > 5   # after rl's, as in the first run
    assert not (run / ".r1fast-rerun.json").exists()

    # the same command with --resume (a requeued job, the command a stopped rerun prints) continues that rerun
    run_pipeline(spec, ["rerun_from=rs", "rs.num_rows=2"], resume=True)
    out = capsys.readouterr().out
    assert "set aside" not in out and "== stage 4/4: student (sft): done in the earlier run, skipped ==" in out
    # without --resume, a new rerun: the earlier set-aside folders are kept, the new ones take the next free name
    run_pipeline(spec, ["rerun_from=student"])
    assert sorted(n for n in os.listdir(run) if ".old-" in n) == [f"rs.old-{pid}", f"student.old-{pid}",
                                                                   f"student.old-{pid + 1}"]


def test_rerun_from_errors_name_the_stages_and_the_missing_run(tmp_path, capsys):
    from r1fast.trainer.config import ConfigError

    spec = _rerun_spec(tmp_path)
    with pytest.raises(ConfigError, match=r"^command line: rerun_from 'sft2' is not a stage of this pipeline; its "
                                          r"stages: cold, rl, rs, student$"):
        load_pipeline(spec, ["rerun_from=sft2"])
    with pytest.raises(ConfigError, match=r"^pipeline: rerun_from 'RL' is not a stage"):
        load_pipeline({**spec, "rerun_from": "RL"})
    with pytest.raises(ConfigError, match=r"rerun_from=rl keeps the stages before 'rl' from the earlier run, and "
                                          r"overwrite_output_dir=true deletes that run first: give one of them"):
        load_pipeline(spec, ["rerun_from=rl", "overwrite_output_dir=true"])
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=rf"rerun_from=rl: {re.escape(str(run))} holds no earlier run of this "
                                          rf"pipeline \(no pipeline_state.json\)"):
        run_pipeline(spec, ["rerun_from=rl"])
    assert not run.exists()   # nothing made
    spec_file = tmp_path / "p.yaml"
    spec_file.write_text(json.dumps(spec))
    with pytest.raises(SystemExit, match="rerun_from 'nope' is not a stage of this pipeline; its stages: cold, rl"):
        main(["pipeline", str(spec_file), "rerun_from=nope"])


def test_a_rerun_killed_while_setting_the_earlier_outputs_aside_is_finished_by_the_next_run(tmp_path, monkeypatch):
    # killed between its renames: the next run finishes them from the journal before reading the state, so no stage
    # resumes from a folder half set aside
    import r1fast.trainer.pipeline as pipeline

    spec = _rerun_spec(tmp_path)
    spec["stages"] = spec["stages"][2:]   # rs, then student on its samples
    run = tmp_path / "run"
    run_pipeline(spec)
    move_aside = pipeline._move_aside

    def killed_after_the_first(moves):
        move_aside(moves[:1])
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_move_aside", killed_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(spec, ["rerun_from=rs"])
    monkeypatch.setattr(pipeline, "_move_aside", move_aside)
    assert (run / ".r1fast-rerun.json").exists() and (run / "student").is_dir() and not (run / "rs").exists()
    summary = run_pipeline(spec, resume=True)
    assert not (run / ".r1fast-rerun.json").exists()
    pid = os.getpid()
    assert sorted(n for n in os.listdir(run) if ".old-" in n) == [f"rs.old-{pid}", f"student.old-{pid}"]
    assert [s["stage"] for s in summary["stages"]] == ["rs", "student"] and (run / "rs" / "samples.jsonl").exists()
    assert json.loads((run / "pipeline_state.json").read_text())["rerun_from"] == "rs"


def test_a_rerun_in_a_run_folder_another_process_holds_moves_nothing(tmp_path):
    # a rerun beside a --resume of the same folder (or a second rerun) would interleave its renames with the other
    # process's writes: it takes the run folder's lock before it sets anything aside, and a held one is an error
    import fcntl

    from r1fast.trainer.checkpoints import LOCK_FILE, RunFolderBusy

    spec = _rerun_spec(tmp_path)
    spec["stages"] = spec["stages"][2:]   # rs, then student on its samples
    run = tmp_path / "run"
    run_pipeline(spec)
    before = _files_and_times(run)
    listing = sorted(os.listdir(run))
    # another descriptor on the lock file: to the code under test, another process
    fd = os.open(run / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"4242", 0)
        with pytest.raises(RunFolderBusy, match=rf"^{re.escape(str(run))} is in use by another r1fast run "
                                                rf"\(process 4242\)"):
            run_pipeline(spec, ["rerun_from=rs"])
        with pytest.raises(RunFolderBusy, match=r"\(process 4242\)"):   # and a rerun's --resume
            run_pipeline(spec, ["rerun_from=rs"], resume=True)
    finally:
        os.close(fd)
    assert sorted(os.listdir(run)) == listing and _files_and_times(run) == before


def _pending(*stages):
    return [{"stage": name, "type": typ, "status": "pending", "steps": 0, "held_out_accuracy": None, "format": None,
             "wall_s": 0.0} for name, typ in stages]


def test_a_rerun_reports_the_stages_it_set_aside_as_pending_until_each_runs_again(tmp_path, monkeypatch):
    # summary.json kept the earlier run's figures of the stages a rerun had set aside until the whole rerun
    # finished: a rerun that failed in its first stage left the old accuracy and samples beside the new state
    import r1fast.trainer.sampling as sampling
    from r1fast.trainer.pipeline import render_summary
    from r1fast.trainer.sft import SFTTrainer

    spec = tiny_pipeline(tmp_path)
    spec["stages"] = spec["stages"][2:]   # rs, then student on its samples (evaluated)
    run = tmp_path / "run"
    run_pipeline(spec)
    old = json.loads((run / "summary.json").read_text())["stages"]
    assert old[0]["samples"]["prompts"] == 4 and old[1]["steps"] == 2 and old[1]["held_out_accuracy"] is not None

    def failing(*args, **kwargs):
        raise RuntimeError("stopped in the test")

    rerun = ["rerun_from=rs", "rs.num_rows=2"]
    monkeypatch.setattr(sampling, "rejection_sample", failing)
    with pytest.raises(RuntimeError, match="stopped in the test"):
        run_pipeline(spec, rerun)
    marked = json.loads((run / "summary.json").read_text())
    assert marked["stages"] == _pending(("rs", "sample"), ("student", "sft"))
    assert "\nstudent           sft     pending" in render_summary(marked)
    monkeypatch.undo()
    monkeypatch.setattr(SFTTrainer, "train", failing)
    with pytest.raises(RuntimeError, match="stopped in the test"):
        run_pipeline(spec, rerun, resume=True)   # the rerun goes on: rs runs, then student fails
    rows = json.loads((run / "summary.json").read_text())["stages"]
    assert rows[0]["samples"]["prompts"] == 2 and "status" not in rows[0]   # rs's new figures once it finished
    assert rows[1:] == _pending(("student", "sft"))
    monkeypatch.undo()
    summary = run_pipeline(spec, rerun, resume=True)
    assert json.loads((run / "summary.json").read_text()) == summary
    assert [("status" in r, r["steps"]) for r in summary["stages"]] == [(False, 0), (False, 2)]
    assert summary["stages"][1]["held_out_accuracy"] is not None


def test_a_rerun_killed_before_it_marked_the_summary_is_marked_by_the_next_run(tmp_path, monkeypatch):
    import r1fast.trainer.pipeline as pipeline
    from r1fast.trainer.checkpoints import RunFolderInUse

    spec = _rerun_spec(tmp_path)
    spec["stages"] = spec["stages"][2:]   # rs, then student on its samples
    run = tmp_path / "run"
    run_pipeline(spec)
    old = (run / "summary.json").read_text()

    def killed(moves):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_move_aside", killed)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(spec, ["rerun_from=student"])
    monkeypatch.undo()
    assert (run / ".r1fast-rerun.json").exists()
    rows = json.loads((run / "summary.json").read_text())["stages"]
    assert rows[0] == json.loads(old)["stages"][0] and rows[1:] == _pending(("student", "sft"))
    (run / "summary.json").write_text(old)   # as a run killed between its journal and the summary left it
    with pytest.raises(RunFolderInUse):   # not --resume: the set-aside is finished, then the new run refused
        run_pipeline(spec)
    assert not (run / ".r1fast-rerun.json").exists()
    rows = json.loads((run / "summary.json").read_text())["stages"]
    assert rows[0] == json.loads(old)["stages"][0] and rows[1:] == _pending(("student", "sft"))


def _rerun_runner(tmp_path):
    """A PipelineRunner of _rerun_spec with rerun_from=rs, its run folder as a finished run left it (every stage
    recorded, a metrics line of its own each), without running a stage."""
    from r1fast.trainer.pipeline import STATE_FORMAT, PipelineRunner

    runner = PipelineRunner(load_pipeline(_rerun_spec(tmp_path), ["rerun_from=rs"]))
    names = ["cold", "rl", "rs", "student"]
    for step, name in enumerate(names, 1):
        os.makedirs(os.path.join(runner.run_dir, name))
        with open(os.path.join(runner.run_dir, name, "metrics.jsonl"), "w", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "stage": name, "loss": torch.rand(()).item()}) + "\n")
    runner.state = {"format": STATE_FORMAT, "order": names,
                    "stages": {n: {"finished": True, "steps": 1, "step_end": step} for step, n in enumerate(names, 1)}}
    runner.save_state()
    return runner


def _on_disk_before_the_journal_goes(disk_ops, run_dir: str, names) -> list[str]:
    """The files the rerun's set-aside replaced whose rename a power loss could lose once the journal (which
    finishes the set-aside on the next run) is removed: no fsync of the run folder between the two."""
    from r1fast.trainer.pipeline import RERUN_JOURNAL

    gone = disk_ops.at(("remove", os.path.join(run_dir, RERUN_JOURNAL)))
    return [name for name in names
            if not disk_ops.synced_between(disk_ops.renamed_to(os.path.join(run_dir, name), gone), gone, run_dir)]


def test_a_reruns_new_state_is_on_disk_before_the_journal_that_finishes_it_is_removed(tmp_path, disk_ops):
    # pipeline_state.json (without the set-aside stages) was renamed into place and the journal removed at once: a
    # power loss could keep the removal and not the rename, and the next run found the old state, which names those
    # stages finished, beside their folders set aside, and no journal to finish the set-aside from
    from r1fast.trainer.pipeline import RERUN_JOURNAL

    runner = _rerun_runner(tmp_path)
    disk_ops.clear()
    runner._set_aside_for_rerun(["rs", "student"])
    state = json.loads(open(runner.state_path).read())
    assert sorted(state["stages"]) == ["cold", "rl"] and state["rerun_from"] == "rs"
    assert not os.path.exists(os.path.join(runner.run_dir, RERUN_JOURNAL))
    replaced = ("pipeline_state.json", "summary.json", "metrics.jsonl")
    assert _on_disk_before_the_journal_goes(disk_ops, runner.run_dir, replaced) == []

    # and the next run's finishing of a set-aside killed part way, as it removes the journal
    runner = _rerun_runner(tmp_path / "killed")
    with open(os.path.join(runner.run_dir, RERUN_JOURNAL), "w", encoding="utf-8") as f:
        json.dump({"r1fast_rerun": 1, "stages": ["student"], "moves": [["student", f"student.old-{os.getpid()}"]]}, f)
    disk_ops.clear()
    runner._finish_rerun_set_aside()
    assert sorted(json.loads(open(runner.state_path).read())["stages"]) == ["cold", "rl", "rs"]
    assert os.path.isdir(os.path.join(runner.run_dir, f"student.old-{os.getpid()}"))
    assert _on_disk_before_the_journal_goes(disk_ops, runner.run_dir, replaced[:2]) == []


def test_resume_removes_the_temporary_files_of_writes_killed_mid_way(tmp_path):
    # a SIGKILL while pipeline_state.json, summary.json or curves.png (r1fast plot) was replaced left its .tmp
    # beside it for good: only a trainer's metrics .tmp was ever cleaned
    spec = one_sft_stage_spec(tmp_path)
    run = tmp_path / "run"
    run_pipeline(str(spec), [f"output_dir={run}", "s.max_steps=1"])
    before = sorted(os.listdir(run))
    for name in ("pipeline_state.json.tmp", "summary.json.tmp", "curves.png.tmp", "notes.tmp"):
        (run / name).write_text("half")
    run_pipeline(str(spec), [f"output_dir={run}", "s.max_steps=1"], resume=True)
    assert sorted(os.listdir(run)) == sorted(before + ["notes.tmp"])   # not r1fast's: kept


def test_resume_says_which_stages_are_done_and_where_the_running_one_starts(tmp_path, capsys):
    spec = tiny_pipeline(tmp_path)
    spec["stages"] = spec["stages"][:2]
    spec.pop("eval_dataset")
    run_pipeline(spec)
    run = tmp_path / "run"
    state = json.load(open(run / "pipeline_state.json"))
    # killed before rl's first checkpoint
    for name in os.listdir(run / "rl"):
        if name.startswith("checkpoint-"):
            shutil.rmtree(run / "rl" / name)
    del state["stages"]["rl"]
    (run / "pipeline_state.json").write_text(json.dumps(state))
    capsys.readouterr()
    run_pipeline(spec, resume=True)
    out = capsys.readouterr().out
    assert "== stage 1/2: cold (sft): done in the earlier run, skipped ==" in out
    assert f"stage 'rl' has no checkpoint in {run / 'rl'}: it starts from its first step" in out
    del state["stages"]["cold"]   # killed after cold's last checkpoint
    (run / "pipeline_state.json").write_text(json.dumps(state))
    run_pipeline(spec, resume=True)
    assert f"resuming cold from {run / 'cold' / 'checkpoint-3'} at step 3 of 3" in capsys.readouterr().err


def test_resume_names_the_pipelines_own_settings_that_changed(tmp_path, capsys):
    # a new model or dtype of the pipeline itself was taken on --resume without a word (a stage's own options
    # are named), the stages done having trained the old model in the old dtype
    spec = one_sft_stage_spec(tmp_path)
    run = [f"output_dir={tmp_path / 'run'}"]
    run_pipeline(str(spec), run)
    run_pipeline(str(spec), run, resume=True)
    assert "the pipeline's" not in capsys.readouterr().err
    run_pipeline(str(spec), run + ["model=builtin:tiny", "dtype=bfloat16"], resume=True)
    assert ("r1fast: --resume: the pipeline's model 'builtin:micro' -> 'builtin:tiny', dtype 'float32' -> 'bfloat16' "
            "changed since the earlier run: the stages it finished keep their results") in capsys.readouterr().err


def test_a_resume_of_a_run_killed_before_its_last_metrics_write_completes_them(tmp_path):
    # killed after the last stage's state was saved and before (or while) <run>/metrics.jsonl was written:
    # --resume found every stage done and wrote it no more, so the last stage's metrics were missing for good
    spec = one_sft_stage_spec(tmp_path)
    run = tmp_path / "run"
    run_pipeline(str(spec), [f"output_dir={run}"])
    whole = (run / "metrics.jsonl").read_text()
    assert whole
    (run / "metrics.jsonl").write_text('{"step": 1, "sta')
    run_pipeline(str(spec), [f"output_dir={run}"], resume=True)
    assert (run / "metrics.jsonl").read_text() == whole


def _templated_prompt():
    from r1fast.data import build_char_tokenizer

    return build_char_tokenizer().apply_chat_template([{"role": "user", "content": "1+2="}], tokenize=False,
                                                      add_generation_prompt=True)


# The between-stage evaluation checked its prompts only after the stage had trained (and again on every
# --resume): one of 204 tokens for a model of 128 positions; one templated before was templated again.
@pytest.mark.parametrize("prompts, match", [
    (["1+" * 100 + "0", "1+" * 100 + "1"], r"the prompt of row 0 has 204 tokens and the model 128 positions"),
    ([_templated_prompt()], r"row 0's prompt \('.*eval.jsonl' line 1\) already holds the chat template's generation "
                            r"prompt"),
])
def test_held_out_prompts_a_stage_cannot_evaluate_are_an_error_before_it_trains(tmp_path, prompts, match):
    ev = tmp_path / "eval.jsonl"
    ev.write_text("".join(json.dumps({"prompt": p, "answer": "7"}) + "\n" for p in prompts))
    spec = tiny_pipeline(tmp_path)
    spec["eval_dataset"] = str(ev)
    spec["stages"] = spec["stages"][:1]
    with pytest.raises(ValueError, match=r"evaluated after stage 'cold': " + match):
        run_pipeline(spec)
    assert not os.path.exists(tmp_path / "run" / "cold")   # nothing trained


def test_a_stage_reading_samples_under_another_prompt_column_is_an_error_when_loaded(tmp_path):
    # a sample stage over a `question` column keeps `question`: the student's default prompt_column
    # failed with "lacks column(s) ['prompt']" only after the teacher had trained and sampled
    from r1fast.trainer.config import ConfigError

    spec = tiny_pipeline(tmp_path)
    spec["stages"][2]["config"]["prompt_column"] = "question"
    with pytest.raises(ConfigError, match=r"stage 'student': dataset '@rs' holds its prompts in column 'question' "
                                          r"\(that stage's prompt_column\), but this stage reads prompt_column "
                                          r"'prompt'; set student\.prompt_column=question"):
        load_pipeline(spec)
    load_pipeline(spec, ["student.prompt_column=question"])
    with pytest.raises(ConfigError, match=r"stage 'student': dataset '@rs' holds its samples in column 'completion'"
                                          r".*set student\.completion_column=completion"):
        load_pipeline(spec, ["student.prompt_column=question", "student.completion_column=answer"])


def test_plot_draws_every_reward_function_the_run_logged(tmp_path, monkeypatch):
    """The reward panel drew rewards/accuracy and rewards/format only: a run's own function (my_rewards:brevity)
    was logged but never plotted. Now each rewards/<fn> mean is drawn, its /std is not."""
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    rows = [{"step": s, "stage": "grpo", "reward": 0.5, "rewards/accuracy": 0.5, "rewards/my_rewards:brevity": -0.1,
             "rewards/my_rewards:brevity/std": 0.01} for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    labels = []
    plot = Axes.plot

    def recording_plot(self, *args, **kwargs):
        labels.append(kwargs.get("label"))
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", recording_plot)
    assert main(["plot", str(tmp_path)]) == 0
    assert [lb for lb in labels if "reward" in lb] == ["grpo: reward", "grpo: rewards/accuracy",
                                                       "grpo: rewards/my_rewards:brevity"]


def test_run_pipeline_runs_the_pipeline_load_pipeline_returned(tmp_path):
    # run_pipeline(load_pipeline(spec)) failed with "TypeError: 'Pipeline' object is not iterable"
    from r1fast.trainer.config import ConfigError

    spec = {"name": "t", "output_dir": str(tmp_path / "run"), "model": "builtin:micro", "progress_bar": False,
            "stages": [{"name": "cold", "type": "sft", "dataset": "builtin:arithmetic", "num_rows": 4,
                        "config": {"max_steps": 3, "per_device_train_batch_size": 2, "max_length": 32}}]}
    p = load_pipeline(spec)
    p.stages[0].config.max_steps = 1   # edited in Python before it runs
    p.eval_size = 0
    with pytest.raises(ConfigError, match="pipeline: eval_size must be >= 1; got 0"):
        run_pipeline(p)
    p.eval_size = 4
    with pytest.raises(TypeError, match="overrides apply to a pipeline file or dict"):
        run_pipeline(p, ["seed=1"])
    summary = run_pipeline(p)
    assert [(s["stage"], s["steps"]) for s in summary["stages"]] == [("cold", 1)]


@pytest.mark.parametrize("edit, said", [
    (lambda p: setattr(p.stages[1], "name", ".."), r"stage 1: 'name' must be a folder name .*; got '\.\.'"),
    (lambda p: setattr(p.stages[1], "name", "cold"), r"two stages are named 'cold'"),
    (lambda p: setattr(p.stages[1], "name", "summary.json"), r"stage 1: 'name' 'summary.json' is a file the run keeps"),
    (lambda p: setattr(p.stages[1], "type", "grpo"),
     r"stage 'two': a grpo stage's config is a GRPOConfig; got SFTConfig"),
    (lambda p: setattr(p.stages[1], "type", "rlhf"), r"stage 'two': type must be one of"),
    (lambda p: setattr(p.stages[1], "dataset", None), r"stage 'two' needs a dataset"),
    (lambda p: setattr(p.stages[1], "num_rows", 0), r"stage 'two': num_rows must be in \[1, 1,000,000\]; got 0"),
    (lambda p: setattr(p.stages[1].config, "max_steps", -5), r"stage 'two': option 'max_steps' must be positive"),
    (lambda p: setattr(p.stages[1].config, "overwrite_output_dir", True),
     r"stage 'two': option 'overwrite_output_dir' is not read in a pipeline"),
    (lambda p: setattr(p, "stages", []), r"'stages' must be a non-empty list"),
    (lambda p: setattr(p, "model", None), r"no model for stage 'cold'; set the pipeline's 'model' or the stage's$"),
])
def test_run_pipeline_checks_the_stages_of_a_pipeline_edited_in_python_before_any_trains(tmp_path, edit, said):
    # what load_pipeline refuses of a stage was not checked again: '..' trained into the run folder's parent, two
    # stages of one name into one folder, and the others failed (AttributeError, FileExistsError, the trainer's
    # error) or ran nothing once the stages before had trained
    from r1fast.trainer import sft
    from r1fast.trainer.config import ConfigError

    spec = {"name": "t", "output_dir": str(tmp_path / "run"), "model": "builtin:micro", "progress_bar": False,
            "stages": [{"name": n, "type": "sft", "dataset": "builtin:arithmetic", "num_rows": 4,
                        "config": {"max_steps": 1, "per_device_train_batch_size": 2}} for n in ("cold", "two")]}
    p = load_pipeline(spec)
    edit(p)
    trained = []
    init = sft.SFTTrainer.__init__
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sft.SFTTrainer, "__init__", lambda self, *a, **k: trained.append(1) or init(self, *a, **k))
        with pytest.raises(ConfigError, match=rf"^pipeline: {said}"):
            run_pipeline(p)
    assert not trained and not os.path.exists(tmp_path / "run")


def test_cli_says_how_to_resume_a_sample_stage_that_failed_after_a_batch(tmp_path, monkeypatch):
    # a pipeline's sample stage whose reward function raised on its second batch of prompts kept the first in
    # sample_progress.json, which --resume goes on from, but the error said nothing of it (no checkpoint)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "judge2.py").write_text("calls = [0]\nFAIL_FROM = 2\ndef f(prompts, completions, **kw):\n"
                                        "    calls[0] += 1\n    if calls[0] >= FAIL_FROM:\n"
                                        "        raise ConnectionError('judge down')\n"
                                        "    return [1.0] * len(completions)\n")
    spec = sample_stage_spec(tmp_path, reward="judge2:f")
    with pytest.raises(SystemExit) as e:
        main(["pipeline", str(spec)])
    first, hint = str(e.value).split("\n")
    assert first.startswith("r1fast pipeline: reward function 'judge2:f' raised ConnectionError: judge down")
    assert hint == (f"r1fast pipeline: the batches of prompts sampled before the error are kept in "
                    f"{tmp_path / 'run' / 'rs' / 'sample_progress.json'}; once that is fixed, continue with: "
                    f"r1fast pipeline {spec} --resume")
    import judge2

    judge2.calls[0], judge2.FAIL_FROM = 0, 1   # failing on its first batch: nothing kept, nothing to say
    spec = sample_stage_spec(tmp_path, output_dir="run2", reward="judge2:f")
    with pytest.raises(SystemExit) as e:
        main(["pipeline", str(spec)])
    assert "\n" not in str(e.value) and "judge down" in str(e.value)


def test_cli_resume_hint_names_a_finished_stage_when_there_is_no_checkpoint(tmp_path, monkeypatch):
    # a pipeline whose sample stage finished and whose next stage failed before its first checkpoint was told
    # "its checkpoints are kept": there were none, the finished stage (its samples) is what --resume keeps
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "ok3.py").write_text("def f(prompts, completions, **kw):\n    return [1.0] * len(completions)\n"
                                     "def bad(prompts, completions, **kw):\n    raise KeyError('gold')\n")
    spec = tmp_path / "p.yaml"
    spec.write_text("name: p\nmodel: builtin:micro\nprogress_bar: false\nstages:\n"
                    "  - {name: rs, type: sample, dataset: builtin:arithmetic, num_rows: 4,\n"
                    "     config: {num_samples: 2, batch_prompts: 4, max_completion_length: 4, keep_truncated: true,\n"
                    "              reward_funcs: ['ok3:f'], reward_thresholds: [0]}}\n"
                    "  - {name: g, type: grpo, dataset: builtin:arithmetic, num_rows: 8, config: {\n"
                    "     per_device_train_batch_size: 4, num_generations: 4, max_completion_length: 4,\n"
                    "     max_steps: 1, reward_funcs: ['ok3:bad']}}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["pipeline", str(spec)])
    first, hint = str(e.value).split("\n")
    assert "raised KeyError: 'gold'" in first
    assert hint == (f"r1fast pipeline: its finished stage (rs) is kept; once that is fixed, continue with: "
                    f"r1fast pipeline {spec} --resume")


def test_a_later_stages_stop_tokens_are_checked_before_any_stage_trains(tmp_path):
    # a stop token of the grpo or sample stage that is not one token failed only when that stage started,
    # after 'cold' had trained; the tokenizer is read up front (no model loads)
    from r1fast.trainer.config import ConfigError

    spec = tiny_pipeline(tmp_path)
    with pytest.raises(ConfigError, match=r"stage 'rl': option 'rl.stop_tokens': '</s>' must be exactly one token"):
        load_pipeline(spec, ["rl.stop_tokens=[</s>]"])
    with pytest.raises(ConfigError, match=r"stage 'rs': option 'rs.stop_tokens': '</s>' must be exactly one token"):
        load_pipeline(spec, ["rs.stop_tokens=[</s>]"])
    assert load_pipeline(spec, ["rl.stop_tokens=[<|user|>]"]).stages[1].config.stop_tokens == ["<|user|>"]


def test_eval_stop_tokens_are_checked_before_a_stage_that_is_not_evaluated_trains(tmp_path):
    # eval_stop_tokens was resolved only before the first evaluated stage: 'cold' (evaluate: false) trained first
    from r1fast.trainer.config import ConfigError

    spec = tiny_pipeline(tmp_path)
    spec["stages"][0]["evaluate"] = False
    with pytest.raises(ConfigError, match=r"held-out evaluation after stage 'rl': option 'eval_stop_tokens': "
                                          r"'</s>' must be exactly one token"):
        load_pipeline(spec, ["eval_stop_tokens=[</s>]"])
    assert load_pipeline(spec, ["eval_stop_tokens=[<|user|>]"]).eval_stop_tokens == ["<|user|>"]
    spec.pop("eval_dataset")   # nothing evaluated: nothing to stop
    assert load_pipeline(spec, ["eval_stop_tokens=[</s>]"]).eval_stop_tokens == ["</s>"]


def test_a_stopped_sample_stage_whose_model_was_retrained_since_starts_over(tmp_path, monkeypatch, capsys,
                                                                           sigterm_guard):
    # the sample stage's progress was keyed by its options, prompts and the pipeline's settings, not by the weights
    # it samples: after the stage before it was trained again into the same checkpoint folder, --resume went on
    # from the earlier weights' kept rows and mixed two models' samples in one output
    from safetensors.torch import load_file, save_file

    stopper = sigterm_on_call(tmp_path, monkeypatch, 1)
    spec = tmp_path / "p.yaml"
    spec.write_text(f"name: p\nmodel: builtin:micro\nprogress_bar: false\noutput_dir: {tmp_path / 'run'}\nstages:\n"
                    "  - {name: s, type: sft, dataset: builtin:arithmetic, num_rows: 8,\n"
                    "     config: {max_steps: 1, per_device_train_batch_size: 4}}\n"
                    "  - {name: rs, type: sample, dataset: builtin:arithmetic, num_rows: 8,\n"
                    "     config: {num_samples: 2, batch_prompts: 2, max_completion_length: 4, keep_truncated: true,\n"
                    "              reward_funcs: ['stopper:f'], reward_thresholds: [0]}}\n")
    assert main(["pipeline", str(spec)]) == 130
    weights = tmp_path / "run" / "s" / "checkpoint-1" / "model.safetensors"
    retrained = {k: v + 0.01 * torch.randn_like(v) for k, v in load_file(str(weights)).items()}
    save_file(retrained, str(weights), metadata={"format": "pt"})
    stopper.calls.clear()
    stopper.STOP_AT = 0
    capsys.readouterr()
    assert main(["pipeline", str(spec), "--resume"]) == 0
    assert "is for other options or prompts: it samples from its first prompt" in capsys.readouterr().err
    assert stopper.calls == [4] * 4


def test_resume_names_a_finished_stages_data_file_that_changed_on_disk(tmp_path, capsys):
    # a finished stage's options are compared on --resume, but its dataset only by its path: rows edited in the
    # same file were skipped without a word, the stage's results (and every stage after it) kept from the old rows
    data = tmp_path / "rows.jsonl"
    write = lambda terms: data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "completion": f"{a + b}"}) + "\n"
                                                  for a, b in terms))
    write([(1, 2), (3, 4), (5, 6), (7, 8)])
    spec = tmp_path / "p.yaml"
    spec.write_text(f"name: p\nmodel: builtin:micro\nprogress_bar: false\noutput_dir: {tmp_path / 'run'}\nstages:\n"
                    f"  - {{name: s, type: sft, dataset: {data}, config: {{max_steps: 1, per_device_train_batch_size: 4}}}}\n"
                    "  - {name: t, type: sft, dataset: builtin:arithmetic, num_rows: 8,\n"
                    "     config: {max_steps: 1, per_device_train_batch_size: 4}}\n")
    assert main(["pipeline", str(spec)]) == 0
    capsys.readouterr()
    assert main(["pipeline", str(spec), "--resume"]) == 0
    assert "differ" not in capsys.readouterr().err   # the same rows: nothing to say
    write([(1, 2), (3, 4), (5, 6), (7, 9)])
    assert main(["pipeline", str(spec), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"stage 's' finished in the earlier run, whose results are kept; its options given now differ (the rows " \
           f"of dataset '{data}' changed since" in err
    assert "stage 't'" not in err


def test_resume_names_a_local_model_retrained_in_place_since_the_earlier_run(tmp_path, capsys):
    # the pipeline's model and a stage's own were compared by their folder's name: a model trained again into the
    # same folder was taken on --resume without a word, the stages done having trained the earlier weights
    from safetensors.torch import load_file, save_file

    run_pipeline(str(one_sft_stage_spec(tmp_path)), [f"output_dir={tmp_path / 'm'}"])
    for name in "ab":
        shutil.copytree(tmp_path / "m" / "s" / "checkpoint-1", tmp_path / name)
    spec = tmp_path / "two.yaml"
    spec.write_text(f"name: p\nmodel: {tmp_path / 'a'}\nprogress_bar: false\noutput_dir: {tmp_path / 'run'}\nstages:\n"
                    "  - {name: s, type: sft, dataset: builtin:arithmetic, num_rows: 8,\n"
                    "     config: {max_steps: 1, per_device_train_batch_size: 4}}\n"
                    f"  - {{name: t, type: sft, model: {tmp_path / 'b'}, dataset: builtin:arithmetic, num_rows: 8,\n"
                    "     config: {max_steps: 1, per_device_train_batch_size: 4}}\n")
    run_pipeline(str(spec))
    capsys.readouterr()
    run_pipeline(str(spec), resume=True)
    err = capsys.readouterr().err
    assert "changed" not in err and "differ" not in err

    def retrain(folder):
        weights = str(folder / "model.safetensors")
        save_file({k: v + 0.01 * torch.randn_like(v) for k, v in load_file(weights).items()}, weights,
                  metadata={"format": "pt"})

    retrain(tmp_path / "a")
    run_pipeline(str(spec), resume=True)
    err = capsys.readouterr().err
    assert "r1fast: --resume: the pipeline's model_weights" in err and "changed since the earlier run" in err
    assert "stage 't'" not in err
    retrain(tmp_path / "b")
    run_pipeline(str(spec), resume=True)
    err = capsys.readouterr().err
    assert "the pipeline's" not in err
    assert "stage 't' finished in the earlier run, whose results are kept; its options given now differ " \
           "(model_weights " in err


def test_an_override_that_mends_a_stage_options_warning_is_not_warned_about(tmp_path):
    # load_pipeline checks a stage's file options alone to tell the command line's errors from the file's: that
    # check must not warn of what the override mends (cispo with epsilon_high <= 1, set above 1 on the command line)
    import warnings

    spec = {"name": "p", "model": "builtin:micro",
            "stages": [{"name": "rl", "type": "grpo", "dataset": "builtin:arithmetic",
                        "config": {"loss_type": "cispo", "epsilon_high": 0.28}}]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = load_pipeline(copy.deepcopy(spec), ["rl.epsilon_high=5"])
    assert p.stages[0].config.epsilon_high == 5
    assert not [w for w in caught if "cispo" in str(w.message)], [str(w.message) for w in caught]
    # without the override the file's value is warned about, once
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_pipeline(copy.deepcopy(spec), ["rl.max_steps=2"])
    assert len([w for w in caught if "cispo" in str(w.message)]) == 1


def test_an_override_of_a_key_the_file_also_gets_wrong_is_blamed_on_the_command_line(tmp_path):
    # a key wrong in the file and set, wrong again, on the command line: the error shows the typed value but
    # named the file, which holds another; an override beside a file error of another key named the file too
    from r1fast.trainer.config import ConfigError

    spec = tmp_path / "p.yaml"
    spec.write_text("name: p\nmodel: builtin:micro\nseed: abc\nstages:\n"
                    "  - {name: s, type: sft, dataset: builtin:arithmetic, num_rows: 8,\n"
                    "     config: {max_steps: abc, per_device_train_batch_size: 4}}\n")
    with pytest.raises(ConfigError, match=r"^command line: stage 's': option 'max_steps' expects int, got 'xyz'"):
        load_pipeline(str(spec), ["seed=1", "s.max_steps=xyz"])
    with pytest.raises(ConfigError, match=r"^command line: option 'seed' expects int, got 'zz'"):
        load_pipeline(str(spec), ["seed=zz"])
    # the file's own error, unchanged by the override beside it, still names the file
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(spec))}: stage 's': option 'max_steps' expects int, "
                                          rf"got 'abc'"):
        load_pipeline(str(spec), ["seed=1", "s.learning_rate=0.001"])
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(spec))}: option 'seed' expects int, got 'abc'"):
        load_pipeline(str(spec), ["eval_size=3"])


def test_a_stage_dataset_emptied_on_the_command_line_is_blamed_on_the_command_line(tmp_path):
    # 's.dataset=null' typed: "<file>: stage 's' needs a dataset", though the file gives it one
    from r1fast.trainer.config import ConfigError

    spec = str(one_sft_stage_spec(tmp_path))
    with pytest.raises(ConfigError, match=r"^command line: stage 's' needs a dataset"):
        load_pipeline(spec, ["s.dataset=null"])
    # an empty value names no dataset: refused as such (test_config's empty values), blamed on the command line too
    with pytest.raises(ConfigError, match=r"^command line: stage 's': option 'dataset' is empty, which names nothing"):
        load_pipeline(spec, ["s.dataset="])
    (tmp_path / "bare").mkdir()
    bare = tmp_path / "bare" / "p.yaml"
    bare.write_text("name: p\nmodel: builtin:micro\nstages:\n  - {name: s, type: sft, config: {max_steps: 1}}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bare))}: stage 's' needs a dataset"):
        load_pipeline(str(bare), ["s.num_rows=8"])


def test_a_model_dataset_or_reference_typed_on_the_command_line_is_blamed_on_the_command_line(tmp_path):
    # the checks made once every stage is read (datasets, models, "@stage" references, stop tokens, output files)
    # named the file for what was typed: `r1fast train grpo.dataset=typo.jsonl` sent the reader to r1fast's own
    # default.yaml to find the missing file
    from r1fast.trainer.config import ConfigError

    spec = tmp_path / "p.yaml"
    spec.write_text("name: p\nmodel: builtin:micro\neval_dataset: builtin:arithmetic\nprogress_bar: false\nstages:\n"
                    "  - {name: s, type: sft, dataset: builtin:arithmetic, config: {max_steps: 1}}\n"
                    "  - {name: rs, type: sample, dataset: builtin:arithmetic, config: {num_samples: 1}}\n"
                    "  - {name: t, type: sft, dataset: '@rs', config: {max_steps: 1}}\n")
    gone = str(tmp_path / "gone.jsonl")
    for typed, said in [([f"s.dataset={gone}"], r"stage 's': dataset: '.*gone.jsonl' does not exist"),
                        (["s.dataset=builtin:nope"], r"stage 's': dataset: unknown built-in task 'nope'"),
                        (["s.model=builtin:huge"], r"stage 's': model: unknown built-in model 'builtin:huge'"),
                        (["model=builtin:huge"], r"model: unknown built-in model 'builtin:huge'"),
                        ([f"eval_dataset={gone}"], r"eval_dataset: '.*gone.jsonl' does not exist"),
                        (["t.dataset=@nope"], r"stage 't' refers to unknown stage '@nope'"),
                        (["t.dataset=@s"], r"stage 't': dataset '@s' is a sft stage"),
                        (["t.model=@rs"], r"stage 't': model '@rs' is a sample stage"),
                        (["t.prompt_column=q"], r"stage 't': dataset '@rs' holds its prompts in column 'prompt'"),
                        (["rs.prompt_column=q"], r"stage 't': dataset '@rs' holds its prompts in column 'q'"),
                        (["rs.stop_tokens=[two tokens]"], r"stage 'rs': option 'rs.stop_tokens': 'two tokens' must be"),
                        (["eval_stop_tokens=[two tokens]"], r"the held-out evaluation after stage 's': option "
                                                            r"'eval_stop_tokens'"),
                        ([f"rs.output_file={tmp_path}"], r"stage 'rs': output_file '.*' is a folder"),
                        ([f"stages=[{{name: a, type: sft, dataset: {gone}}}]"], r"stage 'a': dataset: '.*' does not"),
                        (["model=null"], r"no model for stage 's'")]:
        with pytest.raises(ConfigError, match=rf"^command line: {said}"):
            load_pipeline(str(spec), typed)
    # the file's own errors still name the file, beside an override of something else
    spec.write_text(spec.read_text().replace("dataset: builtin:arithmetic, config: {max_steps: 1}",
                                             f"dataset: {gone}, config: {{max_steps: 1}}"))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(spec))}: stage 's': dataset: '.*gone.jsonl' does not"):
        load_pipeline(str(spec), ["t.max_steps=2", "rs.num_samples=2"])


def test_stages_and_description_set_on_the_command_line_are_read_as_before(tmp_path):
    # once the command line's pipeline keys were kept apart from the file's (to name the command line in their
    # errors), 'description=x' raised a bare KeyError('description') and 'stages=[]' was dropped without a word
    # (stages=[1] an AttributeError): the command line's stages replace the file's, as they did
    from r1fast.trainer.config import ConfigError

    spec = str(one_sft_stage_spec(tmp_path))
    assert [s.name for s in load_pipeline(spec, ["description=a run"]).stages] == ["s"]
    with pytest.raises(ConfigError, match=r"^command line: 'stages' must be a non-empty list"):
        load_pipeline(spec, ["stages=[]"])
    with pytest.raises(ConfigError, match=r"stage 0 must be a mapping"):
        load_pipeline(spec, ["stages=[1]"])
    p = load_pipeline(spec, ["stages=[{name: t, type: sft, dataset: builtin:arithmetic, num_rows: 8}]"])
    assert [(s.name, s.num_rows) for s in p.stages] == [("t", 8)]


def test_a_sample_stages_progress_is_kept_when_only_a_model_it_does_not_sample_changes(tmp_path):
    # the progress key held the pipeline's model_weights as well as the weights the stage samples: a stage sampling
    # "@s" lost its kept rows on --resume when the pipeline's base model folder was retrained, or deleted to free disk
    from r1fast.trainer.common import load_model_and_tokenizer
    from r1fast.trainer.pipeline import PipelineRunner

    def model_folder(path, seed):
        model, tok = load_model_and_tokenizer("builtin:micro", device="cpu", seed=seed)
        model.save_pretrained(str(path))
        tok.save_pretrained(str(path))

    model_folder(tmp_path / "base", seed=1)
    model_folder(tmp_path / "sampled", seed=2)
    spec = tmp_path / "p.yaml"
    spec.write_text(f"name: p\nmodel: {tmp_path / 'base'}\noutput_dir: {tmp_path / 'run'}\nstages:\n"
                    "  - {name: rs, type: sample, dataset: builtin:arithmetic, num_rows: 4,\n"
                    "     config: {num_samples: 2, reward_funcs: [format], reward_thresholds: [0]}}\n")
    runner = PipelineRunner(load_pipeline(str(spec)))
    stage, rows = runner.p.stages[0], [{"prompt": "1+2="}, {"prompt": "3+4="}]
    before = runner._sample_fingerprint(stage, rows, str(tmp_path / "sampled"))
    model_folder(tmp_path / "base", seed=3)   # the base model retrained in place
    assert runner._sample_fingerprint(stage, rows, str(tmp_path / "sampled")) == before
    shutil.rmtree(tmp_path / "base")   # or deleted
    assert runner._sample_fingerprint(stage, rows, str(tmp_path / "sampled")) == before
    model_folder(tmp_path / "sampled", seed=4)   # the model it samples, retrained: another sampling
    assert runner._sample_fingerprint(stage, rows, str(tmp_path / "sampled")) != before


def test_a_finished_stages_model_folder_deleted_since_is_not_a_changed_option(tmp_path):
    # --resume said the stage's "options given now differ (model_weights '<sha>' -> None)" for a model folder deleted
    # after the stage finished (to free disk): no option differs, and its results never read the folder again
    from r1fast.trainer.common import load_model_and_tokenizer
    from r1fast.trainer.pipeline import _changed_options, _stage_options

    model, tok = load_model_and_tokenizer("builtin:micro", device="cpu", seed=1)
    model.save_pretrained(str(tmp_path / "m"))
    tok.save_pretrained(str(tmp_path / "m"))
    spec = tmp_path / "p.yaml"
    spec.write_text(f"name: p\nstages:\n  - {{name: s, type: sft, model: {tmp_path / 'm'}, dataset: builtin:arithmetic,"
                    f" config: {{max_steps: 1}}}}\n")
    stage = load_pipeline(str(spec)).stages[0]
    recorded = _stage_options(stage)
    assert "model_weights" in recorded
    model2, _ = load_model_and_tokenizer("builtin:micro", device="cpu", seed=2)
    model2.save_pretrained(str(tmp_path / "m"))   # retrained in place: still named
    assert _changed_options(stage, recorded).startswith("model_weights ")
    shutil.rmtree(tmp_path / "m")
    assert _changed_options(stage, recorded) == ""


def test_unknown_pipeline_keys_of_the_file_and_the_command_line_are_named_where_each_is(tmp_path):
    # an unknown key in the file and another typed: "<file>: unknown pipeline key(s) ['eval_sise', 'sed']" named
    # the file for the typed one too, which the reader then looked for there in vain
    from r1fast.trainer.config import ConfigError

    spec = one_sft_stage_spec(tmp_path, top="eval_sise: 3\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(spec))}: unknown pipeline key\(s\) \['eval_sise'\]; "):
        load_pipeline(str(spec), ["sed=1"])
    (tmp_path / "good").mkdir()
    good = str(one_sft_stage_spec(tmp_path / "good"))
    with pytest.raises(ConfigError, match=r"^command line: unknown pipeline key\(s\) \['sed'\]; "):
        load_pipeline(good, ["sed=1"])


def test_an_error_in_stages_given_on_the_command_line_names_the_command_line(tmp_path):
    # stages=[...] typed on the command line replace the file's, but an error in them named the file
    # ('<file>: stage 0 must be a mapping'), whose own stages are right
    from r1fast.trainer.config import ConfigError

    spec = str(one_sft_stage_spec(tmp_path))
    with pytest.raises(ConfigError, match=r"^command line: stage 0 must be a mapping"):
        load_pipeline(spec, ["stages=[1]"])
    with pytest.raises(ConfigError, match=r"^command line: stage 't': type must be one of"):
        load_pipeline(spec, ["stages=[{name: t, type: sfd, dataset: builtin:arithmetic}]"])
    with pytest.raises(ConfigError, match=r"^command line: stage 't': option 'max_steps' expects int"):
        load_pipeline(spec, ["stages=[{name: t, type: sft, dataset: builtin:arithmetic, config: {max_steps: x}}]"])
    # the file's own stages still name the file
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: p\nmodel: builtin:micro\nstages:\n"
                   "  - {name: s, type: sft, dataset: builtin:arithmetic, config: {max_steps: x}}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}: stage 's': option 'max_steps' expects int"):
        load_pipeline(str(bad), [])


def test_plot_out_naming_a_folder_or_under_a_file_says_so(tmp_path, monkeypatch):
    # --out plots/ (a folder) said "[Errno 2] No such file or directory: 'plots/'", an existing folder "[Errno 21]
    # Is a directory: '.plots.tmp-...'", and --out under a file (notes.txt/run.png) "[Errno 17] File exists"
    pytest.importorskip("matplotlib")
    from r1fast.trainer.plot import plot_run

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "reward": 0.25}\n{"step": 2, "reward": 0.75}\n')
    (tmp_path / "kept").mkdir()
    monkeypatch.chdir(tmp_path)
    for folder in ("kept", "kept/", "new/"):
        said = rf"^--out {re.escape(repr(folder))} is a folder; give the image's file path, as {folder.rstrip('/')}/"
        with pytest.raises(IsADirectoryError, match=said + "curves.png"):
            plot_run(".", folder)
    with pytest.raises(NotADirectoryError, match=r"^--out 'metrics.jsonl/a/c.png': metrics.jsonl is a file, not a "):
        plot_run(".", "metrics.jsonl/a/c.png")
    assert sorted(os.listdir(tmp_path)) == ["kept", "metrics.jsonl"]


def test_an_unknown_key_beside_stages_typed_on_the_command_line_hints_at_those_stages(tmp_path):
    # 'stages=[{name: t, ...}] max_steps=3' offered "set it for one stage with s.max_steps=3", a stage of the file's
    # that the typed stages replace (following it said "no stage named ['s']")
    from r1fast.trainer.config import ConfigError

    spec = str(one_sft_stage_spec(tmp_path))
    with pytest.raises(ConfigError, match=r"^command line: unknown pipeline key\(s\) \['max_steps'\]; 'max_steps' is "
                                          r"an option of stage t: set it for one stage with t.max_steps=3"):
        load_pipeline(spec, ["stages=[{name: t, type: sft, dataset: builtin:arithmetic}]", "max_steps=3"])
    with pytest.raises(ConfigError, match=r"set it for one stage with s.max_steps=3"):
        load_pipeline(spec, ["max_steps=3"])


def test_overwrite_output_dir_starts_a_pipeline_over_beside_a_stages_killed_save(tmp_path):
    # a stage's last checkpoint set aside by a killed save (checkpoint-N.old-<pid>): the pipeline's
    # overwrite_output_dir=true cleared the run and kept it, then the stage's own start refused its folder (its
    # config's overwrite_output_dir is never the pipeline's), telling to pass overwrite_output_dir=true
    spec = one_sft_stage_spec(tmp_path)
    run = tmp_path / "run"
    cmd = ["pipeline", str(spec), f"output_dir={run}"]
    assert main(cmd) == 0
    old = run / "s" / "checkpoint-1.old-4321"
    os.rename(run / "s" / "checkpoint-1", old)
    assert main(cmd + ["overwrite_output_dir=true"]) == 0
    assert (run / "s" / "checkpoint-1" / "trainer_state.json").is_file() and (old / "trainer_state.json").is_file()


def test_a_single_run_config_given_to_r1fast_pipeline_names_the_command_it_is_for(tmp_path):
    from r1fast.trainer.config import ConfigError

    # its options were listed as a dozen unknown pipeline keys
    with pytest.raises(SystemExit, match=r"grpo_example.yaml has no 'stages': this is a single-run config, not a "
                                         r"pipeline; use `r1fast train \S*grpo_example.yaml`$"):
        main(["pipeline", "grpo_example"])
    sft = tmp_path / "sft.yaml"
    sft.write_text("max-length: 64\nlearning_rate: 1.0e-4\n")
    with pytest.raises(ConfigError, match=re.escape(f"use `r1fast sft {sft}`")):
        load_pipeline(str(sft))
    both = tmp_path / "both.yaml"
    both.write_text("learning_rate: 1.0e-4\nnum_generations: 4\nmax_length: 64\n")   # a GRPO and an SFT option
    with pytest.raises(ConfigError, match=re.escape(f"single-run config, not a pipeline; use `r1fast train {both}` "
                                                    f"(or `r1fast sft {both}`)")):
        load_pipeline(str(both))
    # keys of no config at all: the unknown keys are named, as before
    other = tmp_path / "other.yaml"
    other.write_text("colour: red\n")
    with pytest.raises(ConfigError, match=r"unknown pipeline key\(s\) \['colour'\]"):
        load_pipeline(str(other))
