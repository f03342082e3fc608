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


def test_cli_errors_are_clear(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
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
    # the configs r1fast ships, by name from any directory (found: the run stops at the bad key instead)
    for cmd, name in (("train", "r1_pipeline"), ("pipeline", "distill.yaml"), ("train", "r1fast/configs/default.yaml")):
        with pytest.raises(SystemExit, match=r"unknown pipeline key.*bogus"):
            main([cmd, name, "--bogus", "1"])
    with pytest.raises(SystemExit, match="'r1_pipelin' does not exist.*r1fast's own configs: default, distill"):
        main(["train", "r1_pipelin"])


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


def test_sft_and_sample_read_the_named_split_of_a_saved_dataset(tmp_path, monkeypatch, capsys):
    datasets = pytest.importorskip("datasets")
    monkeypatch.chdir(tmp_path)
    train = [{"prompt": "1+1=", "answer": "2", "completion": "2"}]
    test = [{"prompt": f"{i}+1=", "answer": str(i + 1), "completion": str(i + 1)} for i in range(3)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                          "test": datasets.Dataset.from_list(test)}).save_to_disk(str(tmp_path / "dd"))
    out = tmp_path / "kept.jsonl"
    base = ["model_name_or_path=builtin:micro", f"dataset={tmp_path / 'dd'}", "num_samples=1", "max_completion_length=4",
            f"output_file={out}", "progress_bar=false", "reward_thresholds=[-1,-1]"]
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
    for choice in ("--resume", "overwrite_output_dir=true", "output_dir=NEW_FOLDER"):
        assert f"  {typed} {choice} " in msg
    assert main(cmd + ["--resume"]) == 0
    (run / "s" / "notes.txt").write_text("mine")
    assert main(cmd + ["overwrite_output_dir=true"]) == 0
    assert sorted(os.listdir(run / "s")) == ["checkpoint-1", "metrics.jsonl", "notes.txt"]
    # a single GRPO run says the same, with its own command
    g = tmp_path / "g.yaml"
    g.write_text(f"model_name_or_path: builtin:micro\ndataset: builtin:arithmetic\noutput_dir: {tmp_path / 'g'}\n"
                 "per_device_train_batch_size: 4\nnum_generations: 4\nmax_completion_length: 4\n"
                 "max_prompt_length: 16\nmax_steps: 1\nprogress_bar: false\n")
    assert main(["train", str(g)]) == 0
    with pytest.raises(SystemExit, match=rf"(?s)holds an earlier run \(checkpoints checkpoint-1\).*"
                                         rf"  r1fast train {g} --resume +to continue it"):
        main(["train", str(g)])


def test_pipeline_checks_every_stage_when_loaded(tmp_path):
    """Errors a stage found only when it started, after the stages before it had trained."""
    from r1fast.trainer.config import ConfigError

    def fails(match, edit=None, overrides=None):
        spec = tiny_pipeline(tmp_path)
        if edit:
            edit(spec["stages"])
        with pytest.raises(ConfigError, match=match):
            load_pipeline(spec, overrides)

    # validate()'s range errors now name the file and the stage
    fails(r"^pipeline: stage 'rl': option 'beta' must be >= 0", overrides=["rl.beta=-1"])
    with pytest.raises(ConfigError, match=r"^.*p\.yaml: stage 's': option 'max_length' must be >= 2"):
        load_pipeline(str(one_sft_stage_spec(tmp_path)), ["s.max_length=1"])
    fails(r"stage 'rl': .*reward function 'acuracy'",
          lambda st: st[1]["config"].update(reward_funcs=["acuracy"]))
    fails(r"stage 'rs': .*reward function 'nowhere_mod:f': cannot import",
          lambda st: st[2]["config"].update(reward_funcs=["nowhere_mod:f"]))
    fails(r"stage 'rl': dataset: unknown built-in task 'arithmetc'",
          lambda st: st[1].update(dataset="builtin:arithmetc"))
    fails(r"stage 'cold': dataset: .*missing\.jsonl' does not exist",
          lambda st: st[0].update(dataset=str(tmp_path / "missing.jsonl")))
    fails(r"stage 'student': model: unknown built-in model 'builtin:huge'",
          lambda st: st[3].update(model="builtin:huge"))
    fails(r"stage 'student': dataset '@rl' is a grpo stage", lambda st: st[3].update(dataset="@rl"))
    fails(r"stage 'student': model '@rs' is a sample stage", lambda st: st[3].update(model="@rs"))
    fails(r"stage 'rl': model '@student' names a stage that runs after it", lambda st: st[1].update(model="@student"))

    def two_fp8_rl_stages(st, second_model=None):
        st[1]["config"]["fp8"] = "emulate"
        st.insert(2, {**st[1], "name": "rl2", "config": {**st[1]["config"], "fp8": "torch"}})
        if second_model:
            st[2]["model"] = second_model
    # a GRPO stage continuing a model an earlier one converted with other fp8 options failed when it started
    fails(r"stage 'rl2': its fp8 options differ .*'emulate' vs 'torch'", two_fp8_rl_stages)
    spec = tiny_pipeline(tmp_path)
    two_fp8_rl_stages(spec["stages"], second_model="builtin:micro")   # its own model: nothing to clash with
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
