"""GRPOConfig / SFTConfig / pipelines: YAML loading, command-line overrides, clear errors."""
import copy
import dataclasses
import json
import os
import re
import warnings

import pytest

from r1fast.models.linear import Linear
from r1fast.trainer.common import load_model_and_tokenizer
from r1fast.trainer.config import ConfigError, GRPOConfig, SampleConfig, SFTConfig, parse_overrides
from r1fast.trainer.pipeline import DEFAULT_CONFIG, load_pipeline


def test_defaults_follow_trl_names():
    cfg = GRPOConfig()
    for name in ("learning_rate", "beta", "epsilon", "epsilon_high", "delta", "loss_type", "scale_rewards",
                 "importance_sampling_level", "num_generations", "num_iterations", "temperature", "top_p",
                 "top_k", "max_completion_length", "max_prompt_length", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "max_steps", "num_train_epochs", "seed", "output_dir",
                 "save_steps", "logging_steps"):
        assert hasattr(cfg, name)


def test_the_engine_decodes_a_whole_rollout_at_once_unless_told():
    assert GRPOConfig(per_device_train_batch_size=64, gradient_accumulation_steps=8).rollout_max_num_seqs == 512
    assert GRPOConfig(per_device_train_batch_size=512, gradient_accumulation_steps=4).rollout_max_num_seqs == 1024
    assert GRPOConfig(per_device_train_batch_size=8, engine_max_num_seqs=64).rollout_max_num_seqs == 64


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("learning_rate: 1.0e-5\nbeta: 0.04\nnum_generations: 4\nreward_funcs: [accuracy]\n")
    cfg = GRPOConfig.from_yaml(p, ["--beta", "0.1", "--loss_type=grpo", "top_k=5", "reward_weights=[2.0]",
                                   "--epsilon-high", "0.28", "delta=none"])
    assert cfg.learning_rate == 1e-5 and cfg.beta == 0.1 and cfg.loss_type == "grpo" and cfg.top_k == 5
    assert cfg.num_generations == 4 and cfg.reward_weights == [2.0] and cfg.epsilon_high == 0.28 and cfg.delta is None


def test_parse_overrides_forms():
    assert parse_overrides(["--a", "1", "--b=x", "c=true", "d=1e-3"]) == {"a": 1, "b": "x", "c": True, "d": 1e-3}
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--a"])
    with pytest.raises(ConfigError, match="cannot read"):
        parse_overrides(["loose"])
    # a forgotten value: the next override is not taken as the value, unless written --key=...
    with pytest.raises(ConfigError, match="--output_dir needs a value; 'beta=0.1' is an override of its own"):
        parse_overrides(["--output_dir", "beta=0.1"])
    with pytest.raises(ConfigError, match="--seed needs a value"):
        parse_overrides(["--seed", "grpo.max_steps=5"])  # a pipeline stage's override
    assert parse_overrides(["--output_dir=beta=0.1", "--system_prompt", "Answer = 42"]) == \
        {"output_dir": "beta=0.1", "system_prompt": "Answer = 42"}


def test_resume_with_other_schedule_settings_says_what_happens():
    from r1fast.trainer.common import schedule_change_note

    old = {"config": {"max_steps": 6, "learning_rate": 1e-3, "warmup_steps": 2, "lr_scheduler_type": "cosine"}}
    assert schedule_change_note(old, dict(old["config"]), 2) is None
    note = schedule_change_note(old, {**old["config"], "max_steps": 10, "learning_rate": 5e-4}, 2)
    assert "resuming at step 2 with max_steps 6 -> 10" in note and "follows the new values" in note
    assert "learning_rate 0.0005 is not applied" in note and "keeps the checkpoint's 0.001" in note
    assert schedule_change_note({}, old["config"], 2) is None  # an old checkpoint without its config
    assert schedule_change_note(old, {**old["config"], "learning_rate": 5e-4}, 2) == (
        "r1fast: resuming at step 2: learning_rate 0.0005 is not applied: a resumed run keeps the checkpoint's "
        "0.001 (start a new run to change it)")


@pytest.mark.parametrize("data,match", [
    ({"learnin_rate": 1e-3}, "unknown option 'learnin_rate'.*learning_rate"),
    ({"beta": "lots"}, "'beta' expects float"),
    ({"num_generations": 1}, "num_generations"),
    ({"loss_type": "ppo"}, "loss_type.*one of"),
    ({"per_device_train_batch_size": 6, "num_generations": 4}, "divisible by num_generations"),
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": 0}, "temperature"),
    ({"delta": 0.5}, "delta"),
    ({"max_steps": 0}, "max_steps"),
    ({"progress_bar": "maybe"}, "progress_bar"),
    ({"reward_funcs": ["accuracy"], "reward_weights": [1.0, 2.0]}, "reward_weights"),
    ({"report_to": ["mlflow"]}, "report_to"),
    ({"device": "gpu"}, "option 'device' must be a torch device"),
    ({"format_pattern": "(<think>"}, "'format_pattern' is not a valid regular expression"),
    ({"warmup_steps": -5}, "warmup_steps"),
    ({"eval_steps": -1}, "eval_steps"),
    ({"max_nonfinite_steps": 0}, "max_nonfinite_steps"),
    ({"engine_max_num_seqs": 4}, "'engine_max_num_seqs' must be >= num_generations = 8"),
    # non-finite numbers pass range checks like >= 0 and would train on garbage
    ({"learning_rate": "inf"}, "'learning_rate' must be a finite number"),
    ({"entropy_coef": float("nan")}, "'entropy_coef' must be a finite number"),
    ({"reward_weights": [1.0, float("inf")]}, "'reward_weights' must be a finite number"),
    ({"max_grad_norm": -1}, "max_grad_norm"),
    ({"max_steps": -5}, "'max_steps' must be positive, or -1"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"adam_beta1": 1.5}, "adam_beta1"),
    ({"adam_epsilon": 0}, "adam_epsilon"),
    ({"engine_max_num_batched_tokens": 0}, "engine_max_num_batched_tokens"),
    ({"engine_num_blocks": 0}, "engine_num_blocks"),
    ({"reward_funcs": ["acuracy"]}, "reward_funcs.*'acuracy'.*built-in name"),
    ({"reward_funcs": ["no_such_module_xyz:f"]}, "reward_funcs.*cannot import"),
    ({"reward_funcs": ["missing.py:f"]}, "file 'missing.py'.*does not exist"),
    ({"reward_funcs": ["length"]}, "length_penalty_target"),
    ({"eval_dataset": "builtin:arithmetic", "eval_size": 0}, "builtin: eval set is generated"),
    ({"save_total_limit": 0}, "'save_total_limit' >= 1 \\(or null: keep every checkpoint\\)"),
    ({"fp8": "torch", "fp8_recipe": "block"}, "fp8_recipe.*recipe='block' applies to mode='te' only"),
    ({"fp8": "te", "fp8_scaling": "rowwise"}, "fp8_scaling"),
    ({"fp8_grad_dtype": "e4m2"}, "grad_dtype='e4m2' is not valid"),
    ({"learning_rate": -1e-5}, "option 'learning_rate' must be >= 0"),
    ({"adam_beta2": 1.0}, r"option 'adam_beta2' must be in \[0, 1\)"),
    ({"save_steps": -1}, "'save_steps' >= 0"),
    ({"logging_steps": 0}, "'logging_steps' >= 1"),
    ({"num_iterations": 0}, "option 'num_iterations' must be >= 1"),
    ({"min_p": 1.0}, r"option 'min_p' must be in \[0, 1\)"),
    ({"max_prompt_length": 0}, "option 'max_prompt_length' must be >= 1"),
    ({"eval_samples_per_prompt": 0}, "eval_samples_per_prompt >= 1 required"),
    ({"log_completions": -1}, "option 'log_completions' must be >= 0"),
    ({"epsilon": -0.1}, "option 'epsilon' must be >= 0"),
    ({"top_k": -2}, "option 'top_k' must be -1 or 0"),
    ({"reward_timeout": 0}, "option 'reward_timeout' must be a positive number of seconds"),
    ({"reward_timeout": "inf"}, "option 'reward_timeout' must be a finite number"),
])
def test_bad_values_are_clear_errors(data, match):
    with pytest.raises(ConfigError, match=match):
        GRPOConfig.from_dict(data)


@pytest.mark.parametrize("data,match", [
    ({"max_length": 1}, "max_length"),
    ({"lr_scheduler_type": "step"}, "lr_scheduler_type"),
    ({"num_train_epochs": 0}, "num_train_epochs"),
    ({"warmup_ratio": 1.0}, "warmup_ratio"),
    ({"report_to": ["mlflow"]}, "report_to"),
    ({"per_device_train_batch_size": 0}, "option 'per_device_train_batch_size' must be >= 1"),
    ({"gradient_accumulation_steps": 0}, "option 'gradient_accumulation_steps' must be >= 1"),
])
def test_sft_bad_values_are_clear_errors(data, match):
    """SFTConfig shares the optimiser / output checks with GRPOConfig and adds its own."""
    with pytest.raises(ConfigError, match=match):
        SFTConfig.from_dict(data)


@pytest.mark.parametrize("data,match", [
    ({"dtype": "float64"}, "dtype.*one of"),          # was a KeyError when the model was built
    ({"device": "gpu"}, "option 'device'"),           # was torch's RuntimeError
    ({"max_prompts": 0}, "max_prompts"),             # was "max() arg is an empty sequence"
    ({"top_p": 0}, "top_p"),
    ({"max_completion_length": 0}, "max_completion_length"),
    ({"num_samples": 0}, "option 'num_samples' must be >= 1"),
    ({"keep_per_prompt": 0}, "option 'keep_per_prompt' must be >= 1"),
    ({"batch_prompts": 0}, "option 'batch_prompts' must be >= 1"),
    ({"reward_thresholds": [1.0]}, "reward_thresholds has 1 entries but reward_funcs has 2"),
    ({"reward_timeout": -1}, "option 'reward_timeout' must be a positive number of seconds"),
    # it named option 'length_penalty_target', which SampleConfig then refused as unknown
    ({"reward_funcs": ["accuracy", "length"]}, "reward 'length' .*not available to rejection sampling.*leave it out"),
])
def test_sample_bad_values_are_clear_errors(data, match):
    with pytest.raises(ConfigError, match=match):
        SampleConfig.from_dict(data)


def test_trl_spellings_load():
    """Values a TRL GRPOConfig YAML carries, with TRL's meaning."""
    cfg = GRPOConfig.from_dict({"top_k": 0, "report_to": "none", "save_total_limit": None, "eval_steps": None,
                                "log_completions": True})
    assert (cfg.top_k, cfg.report_to, cfg.save_total_limit, cfg.eval_steps, cfg.log_completions) == (0, [], None, None, 2)
    assert GRPOConfig.from_dict({"log_completions": False}).log_completions == 0
    assert GRPOConfig.from_dict({"report_to": ["none", "tensorboard"]}).report_to == ["tensorboard"]
    assert SampleConfig.from_dict({"top_k": 0}).top_k == 0
    # functions passed from Python are not names to resolve
    GRPOConfig(reward_funcs=[lambda prompts, completions, **kw: [0.0] * len(completions)]).validate()


def test_a_reward_set_as_reward_funcs_says_how_a_config_takes_it():
    # was "option 'reward_funcs' expects list, got <r1fast.rewards.combine.RewardSet object at 0x7f...>"
    from r1fast.rewards import RewardSet

    reward_set = RewardSet(["accuracy", "format"], format_pattern="A.*")
    with pytest.raises(ConfigError, match=r"SampleConfig: option 'reward_funcs' is a RewardSet; .*"
                                          r"reward_funcs=reward_set.specs.*format_pattern, language$"):
        SampleConfig(reward_funcs=reward_set).validate()
    with pytest.raises(ConfigError, match=r"GRPOConfig: option 'reward_funcs' is a RewardSet; .*"
                                          r"or pass the set itself to GRPOTrainer\(model, reward_set, ...\)"):
        GRPOConfig(reward_funcs=reward_set).validate()
    taken = SampleConfig(reward_funcs=reward_set.specs, format_pattern=reward_set.format_pattern)
    assert taken.validate() is None and taken.reward_funcs == ["accuracy", "format"]


def test_fp8_sub_options_reach_the_model(tmp_path):
    from r1fast.fp8 import make_options

    cfg = GRPOConfig.from_dict({"fp8": "emulate", "fp8_scaling": "tensorwise", "fp8_grad_dtype": "e4m3"})
    assert cfg.fp8_options() == make_options("emulate", scaling="tensorwise", grad_dtype="e4m3")
    # switching FP8 off is one override, whatever sub-options the file sets
    assert GRPOConfig.from_dict({"fp8_recipe": "block", "fp8_scaling": "rowwise"}).fp8_options().mode == "off"
    model, _ = load_model_and_tokenizer("builtin:micro", device="cpu", fp8=cfg.fp8_options())
    assert model.fp8_report.options.scaling == "tensorwise"
    assert {m.fp8_grad_dtype for m in model.modules() if hasattr(m, "fp8_grad_dtype")} == {"e4m3"}


@pytest.mark.parametrize("override,match", [
    ("dtype=float64", "dtype must be one of"),
    ("device=gpu", "option 'device'"),
    ("eval_size=abc", "'eval_size' expects int"),
    ("eval_size=0", "eval_size must be >= 1"),
    ("eval_temperature=hot", "'eval_temperature' expects float"),
    ("eval_max_tokens=0", "eval_max_tokens"),
    ("eval_samples_per_prompt=0", "eval_samples_per_prompt"),
    ("num_threads=abc", "'num_threads' expects int"),
    ("progress_bar=maybe", "'progress_bar' expects bool"),
    ("name=", "name must not be empty"),
])
def test_pipeline_keys_are_checked_before_any_stage_runs(override, match):
    # These used to pass load_pipeline and fail after a stage had trained (or train silently).
    with pytest.raises(ConfigError, match=match):
        load_pipeline(DEFAULT_CONFIG, [override])


def test_pipeline_stage_fields_are_typed():
    spec = {"model": "builtin:micro", "stages": [{"name": "a", "type": "sft", "dataset": "builtin:arithmetic",
                                                  "num_rows": "8", "evaluate": "false"}]}
    st = load_pipeline(spec).stages[0]
    assert st.num_rows == 8 and st.evaluate is False      # bool("false") used to be True
    spec["stages"][0]["num_rows"] = "lots"
    with pytest.raises(ConfigError, match="stage 'a'.*'num_rows' expects int"):
        load_pipeline(spec)


@pytest.mark.parametrize("override", ["cold_start.dtype=bfloat16", "cold_start.device=meta", "grpo.device=meta"])
def test_a_stage_cannot_move_off_the_pipelines_device_or_dtype(override):
    # An SFT stage ignored them; a GRPO stage's device failed only after the earlier stages ran.
    with pytest.raises(ConfigError, match="differs from the pipeline's"):
        load_pipeline(DEFAULT_CONFIG, [override, "device=cpu"])
    load_pipeline(DEFAULT_CONFIG, ["grpo.dtype=float32", "grpo.device=cpu", "device=cpu"])


def test_a_stages_cuda_on_a_machine_without_one_and_a_bad_pipeline_device_name_where_they_were_set(monkeypatch):
    # a stage's cuda where the pipeline runs on the cpu was resolved, raising "device 'cuda' asked for but CUDA is not
    # available" with no stage or file named; a pipeline device torch cannot parse named no file or command line
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^command line: stage 'grpo': device 'cuda' differs from the pipeline's "
                                          r"\(cpu\); set the pipeline's device instead$"):
        load_pipeline(DEFAULT_CONFIG, ["grpo.device=cuda"])
    with pytest.raises(ConfigError, match=r"^command line: option 'device' must be a torch device"):
        load_pipeline(DEFAULT_CONFIG, ["device=tpu"])
    spec = {"model": "builtin:micro", "device": "tpu",
            "stages": [{"name": "a", "type": "sft", "dataset": "builtin:arithmetic"}]}
    with pytest.raises(ConfigError, match=r"^pipeline: option 'device' must be a torch device"):
        load_pipeline(spec)


def test_a_later_stage_without_a_dataset_is_refused_at_load():
    # It used to fail only when that stage began, after the stages before it had trained.
    spec = {"model": "builtin:micro", "stages": [{"name": "a", "type": "sft", "dataset": "builtin:arithmetic"},
                                                 {"name": "b", "type": "grpo"}]}
    with pytest.raises(ConfigError, match="stage 'b' needs a dataset"):
        load_pipeline(spec)


def test_sft_and_grpo_keep_their_own_optimiser_defaults():
    grpo, sft = GRPOConfig(), SFTConfig()
    assert (grpo.learning_rate, grpo.adam_beta2, grpo.lr_scheduler_type, grpo.logging_steps) == (1e-6, 0.99, "constant", 1)
    assert (sft.learning_rate, sft.adam_beta2, sft.lr_scheduler_type, sft.logging_steps) == (1e-5, 0.999, "cosine", 10)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist.*r1fast's own configs: default, distill"):
        GRPOConfig.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        GRPOConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="unknown option"):
        SFTConfig.from_dict({"beta": 0.1})


def test_default_pipeline_loads_and_rejects_bad_stage_options():
    p = load_pipeline(DEFAULT_CONFIG)
    assert [s.type for s in p.stages] == ["sft", "grpo"]
    p2 = load_pipeline(DEFAULT_CONFIG, ["grpo.max_steps=3", "seed=5"])
    assert p2.stages[1].config.max_steps == 3 and p2.seed == 5
    with pytest.raises(ConfigError, match="no stage named"):
        load_pipeline(DEFAULT_CONFIG, ["nostage.max_steps=3"])
    with pytest.raises(ConfigError, match="unknown option 'max_stepz'"):
        load_pipeline(DEFAULT_CONFIG, ["grpo.max_stepz=3"])
    with pytest.raises(ConfigError, match="unknown pipeline key"):
        load_pipeline(DEFAULT_CONFIG, ["colour=red"])
    # a stage's option given as a single run takes it (`r1fast train max_steps=3`) is shown its overrides, and a
    # misspelt pipeline key its close one; the message listed the pipeline keys alone
    with pytest.raises(ConfigError, match=r"unknown pipeline key\(s\) \['eval_sise', 'max_steps'\]; for 'eval_sise', "
                                          r"did you mean 'eval_size'; 'max_steps' is an option of stages cold_start, grpo: "
                                          r"set it for one stage with cold_start.max_steps=3 or grpo.max_steps=3; known:"):
        load_pipeline(DEFAULT_CONFIG, ["max_steps=3", "eval_sise=8"])
    with pytest.raises(ConfigError, match=r"'num_generations' is an option of stage grpo: set it for one stage with "
                                          r"grpo.num_generations=4;"):
        load_pipeline(DEFAULT_CONFIG, ["--num_generations", "4"])
    # a list was shown as a Python repr (grpo.stop_tokens=['<|im_end|>'], which the shell mangles), and the
    # pipeline's own eval_stop_tokens, which the held-out evaluation reads, went unmentioned
    with pytest.raises(ConfigError) as err:
        load_pipeline(DEFAULT_CONFIG, ['stop_tokens=["<|im_end|>"]'])
    assert """set it for one stage with 'grpo.stop_tokens=["<|im_end|>"]' (the pipeline key eval_stop_tokens sets it \
for the held-out evaluation between stages)""" in str(err.value)
    assert parse_overrides(['grpo.stop_tokens=["<|im_end|>"]']) == {"grpo.stop_tokens": ["<|im_end|>"]}
    # a value YAML reads as a date (run_name: 2024-05-01) made the hint a TypeError ("not JSON serializable")
    import datetime

    from r1fast.trainer.config import load_yaml

    with pytest.raises(ConfigError, match=r"""'run_name' is an option of stages .*'grpo.run_name="2024-05-01"'"""):
        load_pipeline({**load_yaml(DEFAULT_CONFIG), "run_name": datetime.date(2024, 5, 1)})


def test_every_shipped_config_loads():
    import glob
    import os

    from r1fast.trainer.pipeline import is_pipeline_file

    files = glob.glob(os.path.join(os.path.dirname(DEFAULT_CONFIG), "*.yaml"))
    assert files
    for f in files:
        if is_pipeline_file(f):
            load_pipeline(f)
        else:
            GRPOConfig.from_yaml(f)


def test_fp8_option_accepts_the_fp8_modes_and_rejects_others():
    GRPOConfig(fp8="emulate").validate()
    with pytest.raises(ValueError, match="fp8"):
        GRPOConfig(fp8="on").validate()


def test_builtin_model_gets_fp8_layers():
    model, _ = load_model_and_tokenizer("builtin:micro", device="cpu", fp8="emulate")
    assert model.fp8_report.converted
    assert not any(type(m) is Linear for m in model.modules())


def test_a_hub_model_name_says_how_to_make_it_local():
    with pytest.raises(ValueError, match=r"'Qwen/Qwen2\.5-0\.5B-Instruct' is not a folder .*local folders only.*"
                                         r"snapshot_download"):
        load_model_and_tokenizer("Qwen/Qwen2.5-0.5B-Instruct", device="cpu")


def test_shipped_configs_load_by_name_from_any_directory(tmp_path, monkeypatch):
    """The docs' `r1fast pipeline r1fast/configs/r1_pipeline.yaml` works outside the repository too."""
    monkeypatch.chdir(tmp_path)
    by_name, by_path = load_pipeline("r1_pipeline"), load_pipeline("r1fast/configs/r1_pipeline.yaml")
    assert [s.name for s in by_name.stages] == [s.name for s in by_path.stages] and len(by_name.stages) >= 3
    assert GRPOConfig.from_yaml("grpo_example.yaml").num_generations >= 2
    (tmp_path / "r1_pipeline.yaml").write_text("name: mine\nmodel: builtin:micro\nstages:\n"
                                               "  - {name: s, type: sft, dataset: builtin:arithmetic}\n")
    assert load_pipeline("r1_pipeline.yaml").name == "mine"   # a file of that name here comes first


@pytest.mark.parametrize("cls", [GRPOConfig, SFTConfig, SampleConfig])
@pytest.mark.parametrize("seed", [-1, 2**32, 2**62])
def test_seed_out_of_range_is_refused_at_load(cls, seed):
    # 2**62 used to load and then fail at the first data fetch: "Overflow when unpacking long long"
    with pytest.raises(ConfigError, match=r"option 'seed' must be in \[0, 2\*\*32\); got " + str(seed)):
        cls.from_dict({"seed": seed})


def test_every_seed_the_config_accepts_works_where_seeds_are_used():
    import numpy as np

    from r1fast.trainer.common import DataCursor

    for seed in (0, 2**32 - 1):
        cfg = GRPOConfig.from_dict({"seed": seed})
        assert len(DataCursor(10, cfg.seed, epoch=10**6).take(3)) == 3
        np.random.RandomState(cfg.seed)
        load_model_and_tokenizer("builtin:micro", device="cpu", seed=cfg.seed)


def test_config_file_that_is_not_utf8_or_is_a_directory(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("system_prompt: 'r\u00e9ponds'\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text"):
        GRPOConfig.from_yaml(latin1)
    folder = tmp_path / "configs"
    folder.mkdir()
    with pytest.raises(ConfigError, match=r"'.*configs' is a directory, not a YAML file"):
        GRPOConfig.from_yaml(folder)


def test_temperatures_follow_the_rollouts_rule_at_load():
    from r1fast.rollout.params import MIN_TEMPERATURE, SamplingParams

    for data, match in [({"temperature": 1e-9}, "option 'temperature' must be >= 1e-05"),
                        ({"temperature": 0}, "option 'temperature' must be >= 1e-05"),
                        ({"eval_temperature": 1e-9}, r"option 'eval_temperature' must be 0 \(greedy\) or >= 1e-05")]:
        with pytest.raises(ConfigError, match=match):
            GRPOConfig.from_dict(data)
    with pytest.raises(ConfigError, match=r"option 'temperature' must be 0 \(greedy\) or >= 1e-05"):
        SampleConfig.from_dict({"temperature": 1e-9})
    # what loads, the rollout takes
    cfg = GRPOConfig.from_dict({"temperature": MIN_TEMPERATURE, "eval_temperature": 0})
    SamplingParams(temperature=cfg.temperature)
    SamplingParams(temperature=cfg.eval_temperature)
    SamplingParams(temperature=SampleConfig.from_dict({"temperature": 0}).temperature)


def test_loss_options_are_checked_at_load():
    with pytest.raises(ConfigError, match=r"option 'epsilon' must be < 1 .*got 1\.5 \(loss_type 'dapo'\)"):
        GRPOConfig.from_dict({"epsilon": 1.5})
    with pytest.raises(ConfigError, match=r"option 'epsilon' must be < 1 .*\(loss_type 'grpo'\)"):
        GRPOConfig.from_dict({"epsilon": 1.0, "loss_type": "grpo"})
    # cispo clips the ratio only from above: any epsilon >= 0 is a valid lower bound for it
    cfg = GRPOConfig.from_dict({"epsilon": 1.5, "loss_type": "cispo"})
    opts = cfg.loss_options(num_items=64.0)
    assert (opts.epsilon, opts.loss_type, opts.num_items) == (1.5, "cispo", 64.0)
    assert GRPOConfig.from_dict({"loss_type": "grpo"}).loss_options(num_items=64.0).num_items is None


def test_cispo_warns_of_an_epsilon_high_that_scales_every_update_down():
    # cispo's weight is min(ratio, epsilon_high): at the default (epsilon, 0.2) every token's weight was
    # ~0.2 with nothing said
    with pytest.warns(UserWarning, match=r"caps the importance ratio at epsilon_high = 0.2 .*e\.g\. 5\.0"):
        GRPOConfig.from_dict({"loss_type": "cispo"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GRPOConfig.from_dict({"loss_type": "cispo", "epsilon_high": 5.0})
        GRPOConfig.from_dict({"loss_type": "dapo"})


@pytest.mark.parametrize("bad", [{"beta": 0.5, "top_p": 2.0}, {"beta": 0.5, "no_such_option": 1},
                                 {"beta": 0.5, "seed": "x"}, {"beta": 0.5, "epsilon": 1.5}])
def test_a_failed_update_leaves_the_config_as_it_was(bad):
    cfg = GRPOConfig.from_dict({"top_p": 0.9})
    before = cfg.to_dict()
    with pytest.raises(ConfigError):
        cfg.update(bad)
    assert cfg.to_dict() == before
    cfg.update({"beta": 0.5})
    assert cfg.beta == 0.5 and cfg.top_p == 0.9


def test_values_are_coerced_to_the_options_type_or_named():
    """YAML and command-line spellings become the option's type; a value of another type is an error
    naming the option, never a bool read as a number or a number as a string."""
    cfg = SFTConfig.from_dict({"max-steps": "4", "num_train_epochs": 0, "progress_bar": "1", "share_prompts": "no",
                               "warmup_steps": 2.0, "system_prompt": 12, "report_to": "tensorboard,wandb"})
    assert (cfg.max_steps, cfg.progress_bar, cfg.share_prompts, cfg.warmup_steps) == (4, True, False, 2)
    assert cfg.system_prompt == "12" and cfg.report_to == ["tensorboard", "wandb"]   # epochs unused with max_steps
    assert SampleConfig.from_dict({"reward_funcs": "accuracy,format"}).reward_funcs == ["accuracy", "format"]
    assert GRPOConfig.from_dict({"epsilon_high": "None", "delta": "null"}).epsilon_high is None
    for data, match in [({"max_steps": True}, "'max_steps' expects int, got True"),
                        ({"warmup_steps": 2.5}, "'warmup_steps' expects int, got 2.5"),
                        ({"learning_rate": True}, "'learning_rate' expects float, got True"),
                        ({"system_prompt": False}, "'system_prompt' expects str, got False"),
                        ({"progress_bar": 2}, "'progress_bar' expects bool, got 2"),
                        # an empty YAML value: "expects float, got None" did not say to drop the line
                        ({"learning_rate": None}, "'learning_rate' expects float and cannot be null .*drop the line"),
                        ({"report_to": None}, "'report_to' expects .* cannot be null")]:
        with pytest.raises(ConfigError, match=match):
            SFTConfig.from_dict(data)


def test_configs_built_in_python_get_the_yaml_type_checks(tmp_path):
    # GRPOConfig(max_steps=1.5) trained with it, and learning_rate="1e-6" failed with a bare TypeError in a
    # comparison; the trainer now checks values given in Python as it checks YAML
    with pytest.raises(ConfigError, match="GRPOConfig: option 'max_steps' expects int, got 1.5"):
        GRPOConfig(max_steps=1.5).validate()
    with pytest.raises(ConfigError, match="GRPOConfig: option 'learning_rate' expects float, got 'fast'"):
        GRPOConfig(learning_rate="fast").validate()
    with pytest.raises(ConfigError, match="SFTConfig: option 'seed' expects int, got True"):
        SFTConfig(seed=True).validate()
    with pytest.raises(ConfigError, match="SampleConfig: option 'num_samples' expects int"):
        SampleConfig(num_samples=[4]).validate()
    with pytest.raises(ConfigError, match="option 'reward_funcs' expects str, got None"):
        GRPOConfig(reward_funcs=["accuracy", None]).validate()
    cfg = GRPOConfig(learning_rate="1e-6", max_steps=3.0, report_to="tensorboard", log_completions=True)
    cfg.validate()  # what YAML would have made of the same values
    assert (cfg.learning_rate, cfg.max_steps, cfg.report_to, cfg.log_completions) == (1e-6, 3, ["tensorboard"], 2)
    assert type(cfg.max_steps) is int
    cfg.max_steps = "x"  # set after construction: caught when the trainer validates
    with pytest.raises(ConfigError, match="option 'max_steps' expects int, got 'x'"):
        cfg.validate()


def test_a_leading_tilde_in_a_path_option_is_the_home_directory(tmp_path, monkeypatch):
    # a YAML `output_dir: ~/runs/x` made a folder named "~" in the working directory
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = GRPOConfig.from_dict({"output_dir": "~/runs/x", "dataset": "~/d.jsonl", "run_name": "~keep"})
    assert (cfg.output_dir, cfg.dataset, cfg.run_name) == (str(tmp_path / "runs/x"), str(tmp_path / "d.jsonl"), "~keep")
    assert SampleConfig.from_dict({"output_file": "~/kept.jsonl"}).output_file == str(tmp_path / "kept.jsonl")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    p = load_pipeline(DEFAULT_CONFIG, ["output_dir=~/run", "model=~/m"])
    assert (p.output_dir, p.model) == (str(tmp_path / "run"), str(tmp_path / "m"))


def test_tis_with_truncated_sampling_warns_that_the_weights_ignore_the_truncation():
    # the engine's log-probs are of the full softmax(logits / T): with top_p 0.9 the TIS weights stayed ~1
    # and nothing said that sampling from the nucleus was not corrected for
    with pytest.warns(UserWarning, match=r"tis_mode 'mask' with top_k 20, top_p 0\.9: .*full softmax"):
        GRPOConfig.from_dict({"top_p": 0.9, "top_k": 20})
    with pytest.warns(UserWarning, match=r"tis_mode 'truncate' with min_p 0\.05"):
        GRPOConfig.from_dict({"min_p": 0.05, "tis_mode": "truncate"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GRPOConfig.from_dict({"top_p": 0.9, "tis_mode": "none"})
        GRPOConfig.from_dict({"top_k": 0, "top_p": 1.0, "min_p": 0.0})


def test_chat_template_kwargs_is_a_mapping_of_template_variables():
    # TRL's chat_template_kwargs (Qwen3's enable_thinking) had no r1fast equivalent
    over = parse_overrides(["chat_template_kwargs={enable_thinking: false}"])
    for cls in (GRPOConfig, SFTConfig, SampleConfig):
        assert cls.from_dict(over).chat_template_kwargs == {"enable_thinking": False}
        assert cls().chat_template_kwargs is None
    assert GRPOConfig(chat_template_kwargs={"reasoning_effort": "low"}).to_json_dict()["chat_template_kwargs"] == \
        {"reasoning_effort": "low"}
    for value, match in [("enable_thinking=false", r"'chat_template_kwargs' expects a mapping .*got 'enable_thinking"),
                         ({1: True}, r"keys must be the chat template's variable names .*got 1"),
                         ({"add_generation_prompt": False}, r"'add_generation_prompt' is set by r1fast itself"),
                         ({"when": {1, 2}}, r"values must be JSON data")]:
        for cls in (GRPOConfig, SFTConfig, SampleConfig):
            with pytest.raises(ConfigError, match=match):
                cls.from_dict({"chat_template_kwargs": value})
    # the pipeline's held-out evaluation takes its own, checked the same way
    stages = [{"name": "s", "type": "sft", "dataset": "builtin:arithmetic", "config": {"chat_template_kwargs": over[
        "chat_template_kwargs"]}}]
    p = load_pipeline({"model": "builtin:micro", "stages": stages}, ["eval_chat_template_kwargs={enable_thinking: false}"])
    assert p.eval_chat_template_kwargs == {"enable_thinking": False}
    assert p.stages[0].config.chat_template_kwargs == {"enable_thinking": False}
    with pytest.raises(ConfigError, match=r"option 'eval_chat_template_kwargs': 'tokenize' is set by r1fast itself"):
        load_pipeline({"model": "builtin:micro", "stages": stages}, ["eval_chat_template_kwargs={tokenize: true}"])


def test_stop_tokens_are_token_texts_checked_at_load_and_kept_by_a_checkpoint():
    # a base Qwen2.5 trained with its chat template ended turns with <|im_end|>, which no option could add to
    # the tokenizer's eos as a stop: its completions ran on to max_completion_length
    from r1fast.trainer.common import option_change_note

    for cls in (GRPOConfig, SampleConfig):
        assert cls().stop_tokens is None
        assert cls.from_dict(parse_overrides(["stop_tokens=<|im_end|>"])).stop_tokens == ["<|im_end|>"]
        assert cls.from_dict({"stop_tokens": ["<|im_end|>", "</s>"]}).stop_tokens == ["<|im_end|>", "</s>"]
        for value, match in [(5, r"option 'stop_tokens' expects list, got 5"),
                             ({"a": 1}, r"option 'stop_tokens' expects list"),
                             ([151645], r"option 'stop_tokens' takes tokens as text .*got 151645 \(token ids are not"),
                             ([""], r"option 'stop_tokens' takes tokens as text .*got ''"),
                             ([None], r"option 'stop_tokens' takes tokens as text .*got None")]:
            with pytest.raises(ConfigError, match=match):
                cls.from_dict({"stop_tokens": value})
    cfg = GRPOConfig(stop_tokens=["<|im_end|>"])
    assert GRPOConfig.from_dict(cfg.to_json_dict()).stop_tokens == ["<|im_end|>"]   # as a checkpoint reads it back
    note = option_change_note({"config": cfg.to_json_dict()}, GRPOConfig().to_json_dict(), 2)
    assert "stop_tokens ['<|im_end|>'] -> None" in note
    assert option_change_note({"config": cfg.to_json_dict()}, cfg.to_json_dict(), 2) is None
    # a pipeline checks its stages' tokens against their tokenizer at load: the built-in one has <|user|>
    stages = [{"name": "s", "type": "grpo", "dataset": "builtin:arithmetic", "config": {"stop_tokens": ["<|user|>"]}}]
    p = load_pipeline({"model": "builtin:micro", "stages": stages}, ["eval_stop_tokens=[<|user|>]"])
    assert p.eval_stop_tokens == ["<|user|>"] and p.stages[0].config.stop_tokens == ["<|user|>"]
    with pytest.raises(ConfigError, match=r"option 'eval_stop_tokens' takes tokens as text .*got 7"):
        load_pipeline({"model": "builtin:micro", "stages": stages}, ["eval_stop_tokens=[7]"])
    # unset, a stopped sampling of an r1fast before the option continues (its fingerprint is the same)
    from r1fast.trainer.sampling import sample_fingerprint

    before = {k: v for k, v in SampleConfig().to_dict().items() if k != "stop_tokens"}
    assert sample_fingerprint(SampleConfig().to_dict(), ["1"], {}) == sample_fingerprint(before, ["1"], {})
    assert sample_fingerprint(SampleConfig(stop_tokens=["<|user|>"]).to_dict(), ["1"], {}) != \
        sample_fingerprint(before, ["1"], {})



def test_a_stopped_sampling_continues_under_another_reward_timeout():
    # a sampling stopped by a RewardTimeout, resumed with the raised limit its error asks for (or a sampling stopped
    # by an r1fast before the option) was "for other options or prompts" and sampled from its first prompt again
    from r1fast.trainer.sampling import sample_fingerprint

    before = {k: v for k, v in SampleConfig().to_dict().items() if k != "reward_timeout"}
    for timeout in (None, 5.0, 60.0):
        assert sample_fingerprint(SampleConfig(reward_timeout=timeout).to_dict(), ["1"], {}) == \
            sample_fingerprint(before, ["1"], {})
    assert sample_fingerprint(SampleConfig(num_samples=8).to_dict(), ["1"], {}) != sample_fingerprint(before, ["1"], {})


def test_tis_mode_off_is_none_or_the_string_none_in_both_config_and_loss_options():
    # GRPOConfig took only "none" ("option 'tis_mode' expects str, got None") and LossOptions only None
    # ("LossOptions.tis_mode must be one of ('truncate', 'mask', None), got 'none'") for the same setting
    from r1fast.ops import LossOptions

    assert LossOptions(tis_mode="none").tis_mode is None
    assert LossOptions.from_kwargs(LossOptions(), tis_mode="none") == LossOptions(tis_mode=None)
    cfg = GRPOConfig(tis_mode=None)
    cfg.validate()
    assert cfg.tis_mode == "none" and cfg.loss_options().tis_mode is None
    assert GRPOConfig.from_dict({"tis_mode": None}).tis_mode == "none"


def test_trl_options_without_a_field_say_what_r1fast_uses():
    # a TRL config moved over: "unknown option 'bf16' for GRPOConfig" named no way to train in bf16
    with pytest.raises(ConfigError, match=r"unknown option 'bf16' for GRPOConfig; TRL's bf16 is r1fast's dtype: "
                                          r"bfloat16$"):
        GRPOConfig.from_dict({"bf16": True})
    with pytest.raises(TypeError, match="'use_vllm'; r1fast samples with its own rollout engine"):
        GRPOConfig(use_vllm=False)
    with pytest.raises(ConfigError, match="'save_strategy' for SFTConfig; r1fast saves every save_steps steps"):
        SFTConfig.from_dict({"save_strategy": "no"})


def test_a_misspelt_keyword_in_python_gets_the_yaml_hint():
    # GRPOConfig(lr=1e-5) was the bare dataclass TypeError, where from_dict/YAML name the close options
    with pytest.raises(TypeError, match=r"GRPOConfig\(\) got an unexpected keyword argument 'lr'; did you mean "
                                        r"learning_rate\?"):
        GRPOConfig(lr=1e-5)
    with pytest.raises(TypeError, match="'max_step'; did you mean max_steps"):
        SFTConfig(max_step=3)
    with pytest.raises(ConfigError, match="unknown option 'lr' for GRPOConfig; did you mean learning_rate"):
        GRPOConfig.from_dict({"lr": 1})
    cfg = GRPOConfig(learning_rate=2e-5)   # what copies and replacements build is unchanged
    assert copy.deepcopy(cfg) == cfg and dataclasses.replace(cfg, seed=5).seed == 5


def test_trls_boolean_scale_rewards_reads_as_trl_maps_it(tmp_path):
    # `scale_rewards: false` (TRL: "none") said "option 'scale_rewards' expects str, got False"
    for value, word in [("false", "none"), ("true", "group")]:
        assert GRPOConfig.from_yaml(_yaml(tmp_path, f"scale_rewards: {value}\n")).scale_rewards == word
        assert GRPOConfig().update(parse_overrides([f"scale_rewards={value}"])).scale_rewards == word
    cfg = GRPOConfig(scale_rewards=False)
    cfg.validate()  # as the trainer does
    assert cfg.scale_rewards == "none"
    assert GRPOConfig.from_dict({"scale_rewards": "batch"}).scale_rewards == "batch"


def test_a_word_yaml_reads_as_a_boolean_for_a_text_option_says_so_and_how_to_quote_it(tmp_path):
    # `fp8=on` or `language: no` said "option 'fp8' expects str, got True": the user typed no True
    for word, value in [("on", True), ("yes", True), ("no", False), ("true", True)]:
        for source, load in [("command line", lambda: GRPOConfig().update(parse_overrides([f"language={word}"]),
                                                                            source="command line")),
                             ("c.yaml", lambda: GRPOConfig.from_yaml(_yaml(tmp_path, f"language: {word}\n")))]:
            key = "language"
            with pytest.raises(ConfigError, match=rf"{source}: option '{key}' expects str, got {value}: YAML reads an "
                                                  rf"unquoted yes, no, on, off, true or false as a boolean; to give the "
                                                  rf"word, quote it \(in a YAML file {key}: 'word', on the command line "
                                                  rf"{key}=\"'word'\"\)$"):
                load()
    # quoted as it says, the word arrives as text (and is then checked as a value of its own)
    assert GRPOConfig().update(parse_overrides(["language='no'"])).language == "no"
    with pytest.raises(ConfigError, match=r"option 'fp8' must be one of .*got 'on'"):
        GRPOConfig().update(parse_overrides(["fp8='on'"]))


@pytest.mark.parametrize("typed, read, kind", [
    ("-", [None], "a lone -, a value starting with '- ' or one in [brackets] as a list"),
    ("- a", ["a"], "a lone -, a value starting with '- ' or one in [brackets] as a list"),
    ("[a]", ["a"], "a lone -, a value starting with '- ' or one in [brackets] as a list"),
    ("{}", {}, "a value in {braces}, one holding ': ' or a lone ? as a mapping"),
    ("Note: be brief", {"Note": "be brief"}, "a value in {braces}, one holding ': ' or a lone ? as a mapping"),
])
def test_a_text_option_given_what_yaml_reads_as_a_list_or_mapping_says_so_and_how_to_quote_it(typed, read, kind):
    # `r1fast sample dataset=-` said "option 'dataset' expects str, got [None]": the user typed no list. As a boolean
    # word is (`language=no`), such a value is refused with the quoting that gives the text
    for key in ("dataset", "output_file", "system_prompt", "prompt_column"):
        with pytest.raises(ConfigError) as e:
            SampleConfig().update(parse_overrides([f"{key}={typed}"]), source="command line")
        assert str(e.value) == (f"command line: option {key!r} expects str, got {read!r}: YAML reads {kind}; to give "
                                f"the text, quote it (in a YAML file {key}: '{typed}', on the command line "
                                f"{key}=\"'{typed}'\")")
        # quoted as it says, the text arrives
        assert getattr(SampleConfig().update(parse_overrides([f"{key}='{typed}'"])), key) == typed
    # a pipeline's stage option: the quoting as typed
    with pytest.raises(ConfigError, match=re.escape(f"(in a YAML file dataset: '{typed}', on the command line "
                                                    f"grpo.dataset=\"'{typed}'\")")):
        load_pipeline(DEFAULT_CONFIG, [f"grpo.dataset={typed}"])
    # a list option still takes the list
    assert SampleConfig().update(parse_overrides(["stop_tokens=[a]"])).stop_tokens == ["a"]
    assert SampleConfig().update(parse_overrides(["chat_template_kwargs={}"])).chat_template_kwargs == {}


@pytest.mark.parametrize("cls, key", [
    (SampleConfig, "output_file"), (SampleConfig, "dataset"), (SampleConfig, "model_name_or_path"),
    (SampleConfig, "dataset_split"), (SampleConfig, "prompt_column"), (SampleConfig, "answer_column"),
    (SampleConfig, "format_pattern"), (SampleConfig, "language"), (GRPOConfig, "output_dir"),
    (GRPOConfig, "run_name"), (GRPOConfig, "eval_dataset"), (GRPOConfig, "eval_dataset_split"),
    (SFTConfig, "completion_column"),
])
def test_an_empty_value_for_an_option_that_names_something_is_refused_naming_it(tmp_path, cls, key):
    # `r1fast sample output_file=` wrote to the default runs/sample/samples.jsonl, `dataset_split=` read the default
    # split, `format_pattern=` checked the default format: the empty value was taken as none, without a word
    for load, source in [(lambda: cls().update(parse_overrides([f"{key}="]), source="command line"), "command line"),
                         (lambda: cls.from_yaml(_yaml(tmp_path, f"{key}: ''\n")), str(tmp_path / "c.yaml")),
                         (lambda: cls(**{key: ""}).validate(), cls.__name__)]:
        with pytest.raises(ConfigError, match=rf"^{re.escape(source)}: option '{key}' is empty, which names nothing; "
                                              rf"give "):
            load()
    # null, as YAML's empty value, still unsets an option that may be unset
    if key in ("output_file", "dataset", "dataset_split", "format_pattern", "eval_dataset", "run_name"):
        assert getattr(cls().update(parse_overrides([f"{key}=null"])), key) is None


def test_an_empty_value_where_it_means_none_is_still_taken():
    cfg = GRPOConfig().update(parse_overrides(["system_prompt=", "stop_tokens=", "report_to="]))
    assert (cfg.system_prompt, cfg.stop_tokens, cfg.report_to) == ("", [], [])


@pytest.mark.parametrize("typed, comment, read", [("#2.jsonl", "#2.jsonl", None), ("run 2 #b.jsonl", "#b.jsonl", "run 2"),
                                                  ("[a] #c", "#c", ["a"])])
def test_a_command_line_value_holding_what_yaml_reads_as_a_comment_is_refused_with_the_quoting(typed, comment, read):
    # `output_file='#2.jsonl'` was null, and wrote to the default runs/sample/samples.jsonl; `run 2 #b.jsonl` lost its
    # end: the shell passes a # only when it was quoted, so it was meant as text
    with pytest.raises(ConfigError) as e:
        SampleConfig().update(parse_overrides([f"output_file={typed}"]), source="command line")
    assert str(e.value) == (f"command line: output_file={typed}: YAML reads {comment!r} as a comment and drops it (the "
                            f"value read is {read!r}); to give it as text, quote it (in a YAML file output_file: "
                            f"'{typed}', on the command line output_file=\"'{typed}'\"), or leave the comment out")
    assert SampleConfig().update(parse_overrides([f"output_file='{typed}'"])).output_file == typed
    # a # inside a word starts no comment, and stays
    assert SampleConfig().update(parse_overrides(["output_file=run#2.jsonl"])).output_file == "run#2.jsonl"


def test_a_null_typed_for_an_option_that_cannot_be_null_says_to_leave_the_option_out(tmp_path):
    # `prompt_column=~` said "(an empty YAML value is null): drop the line to keep its default": nothing was empty, and
    # the command line has no line to drop
    for typed in ("~", "null"):
        with pytest.raises(ConfigError, match=r"^command line: option 'prompt_column' expects str and cannot be null "
                                              r"\(YAML reads ~ and null as null\): leave the option out to keep its "
                                              r"default$"):
            SampleConfig().update(parse_overrides([f"prompt_column={typed}"]), source="command line")
    with pytest.raises(ConfigError, match=r"^command line: stage 'grpo': option 'max_steps' expects int and cannot be "
                                          r"null \(YAML reads ~ and null as null\): leave the option out"):
        load_pipeline(DEFAULT_CONFIG, ["grpo.max_steps=null"])
    with pytest.raises(ConfigError, match=r"c\.yaml: option 'prompt_column' expects str and cannot be null \(an empty "
                                          r"YAML value is null\): drop the line to keep its default$"):
        SampleConfig.from_yaml(_yaml(tmp_path, "prompt_column:\n"))


def _yaml(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_an_option_of_another_commands_config_names_that_config(tmp_path):
    # `r1fast sft my_grpo.yaml` said "unknown option 'eval_dataset' for SFTConfig; did you mean dataset?", as if
    # the file were misspelt, not written for `r1fast train`
    grpo_only, sft_only, sample_only = "eval_dataset", "completion_column", "reward_thresholds"
    for cls, key, owners in [(SFTConfig, grpo_only, "GRPOConfig option, for r1fast train"),
                             (SampleConfig, grpo_only, "GRPOConfig option, for r1fast train"),
                             (GRPOConfig, sft_only, "SFTConfig option, for r1fast sft"),
                             (GRPOConfig, sample_only, "SampleConfig option, for r1fast sample"),
                             (SampleConfig, "max_length", "SFTConfig option, for r1fast sft"),
                             (SampleConfig, "beta", "GRPOConfig option, for r1fast train")]:
        with pytest.raises(ConfigError, match=rf"^c.yaml: unknown option '{key}' for {cls.__name__}[^(]*\('{key}' is a "
                                              rf"{owners}: a config written for another command or stage type\?\)$"):
            cls.from_dict({key: "x"}, source="c.yaml")
    # an option SFT and GRPO share is named by both; a misspelling of none of them gets no such note
    with pytest.raises(ConfigError, match=r"'learning_rate' is a (GRPOConfig and SFTConfig|SFTConfig and GRPOConfig) "
                                          r"option, for r1fast (train, r1fast sft|sft, r1fast train):"):
        SampleConfig.from_dict({"learning_rate": 1e-5})
    with pytest.raises(ConfigError, match=r"unknown option 'learnin_rate' for SFTConfig; did you mean learning_rate\?$"):
        SFTConfig.from_dict({"learnin_rate": 1e-5})


def test_a_range_or_choice_error_names_the_file_or_the_command_line(tmp_path):
    """validate()'s checks named the option alone: `r1fast train c.yaml` said "option 'loss_type' must be one of ...;
    got 'grp'" without saying the value was the file's, and a bad override read the same."""
    path = _yaml(tmp_path, "loss_type: grp\n")
    with pytest.raises(ConfigError, match=r"^.*c\.yaml: option 'loss_type' must be one of grpo, .*; got 'grp'$"):
        GRPOConfig.from_yaml(path)
    with pytest.raises(ConfigError, match=r"^.*c\.yaml: option 'max_steps' must be positive"):
        SFTConfig.from_yaml(_yaml(tmp_path, "max_steps: -3\n"))
    good = _yaml(tmp_path, "num_generations: 4\n")
    with pytest.raises(ConfigError, match=r"^command line: option 'max_steps' must be positive, or -1 .*; got -7$"):
        GRPOConfig.from_yaml(good, ["max_steps=-7"])
    with pytest.raises(ConfigError, match=r"^command line: option 'num_samples' must be >= 1"):
        SampleConfig().update(parse_overrides(["num_samples=0"]), source="command line")
    # an error that already names its source is not named twice
    with pytest.raises(ConfigError, match=r"^command line: reward_weights has 2 entries but reward_funcs has 1$"):
        GRPOConfig().update(parse_overrides(["reward_funcs=[accuracy]", "reward_weights=[1, 2]"]),
                            source="command line")


def test_an_override_mends_what_the_file_alone_gets_wrong_and_errors_name_who_made_them(tmp_path):
    """The file was validated before the overrides applied: `r1fast train e.yaml num_generations=4` with
    per_device_train_batch_size: 4 in e.yaml was refused for the default num_generations (8), although the two
    together are valid and a pipeline stage takes the same file and override."""
    path = _yaml(tmp_path, "per_device_train_batch_size: 4\nloss_type: grp\n")
    cfg = GRPOConfig.from_yaml(path, ["num_generations=4", "--loss_type", "dr_grpo"])
    assert (cfg.per_device_train_batch_size, cfg.num_generations, cfg.loss_type) == (4, 4, "dr_grpo")
    # an error the file alone makes, left as it is, is the file's
    with pytest.raises(ConfigError, match=r"^.*c\.yaml: option 'loss_type' must be one of .*; got 'grp'$"):
        GRPOConfig.from_yaml(path, ["num_generations=4"])
    # one the overrides bring in is the command line's, mended file error or not
    for typed in (["num_generations=3", "loss_type=dr_grpo"], ["num_generations=4", "loss_type=dr_grpo",
                                                              "engine_block_size=0"]):
        with pytest.raises(ConfigError, match=r"^command line: "):
            GRPOConfig.from_yaml(path, typed)
    with pytest.raises(ConfigError, match=r"^command line: option 'max_steps' expects int, got 'x'$"):
        GRPOConfig.from_yaml(path, ["num_generations=4", "loss_type=dapo", "max_steps=x"])
    with pytest.raises(ConfigError, match=r"^command line: unknown option 'num_generation' for GRPOConfig"):
        GRPOConfig.from_yaml(path, ["num_generation=4"])


def _cispo_caps(caught) -> list[str]:
    return [str(w.message).split(" (an absolute cap")[0] for w in caught if "loss_type 'cispo' caps" in str(w.message)]


def test_a_config_warns_of_its_final_values_once(tmp_path):
    """`r1fast train e.yaml epsilon_high=5` with loss_type: cispo in e.yaml warned of the file's epsilon_high 0.2
    that the override mended; and a config read with a warning warned again when the trainer validated it."""
    from r1fast.trainer.common import trainer_config_and_tokenizer

    path = _yaml(tmp_path, "loss_type: cispo\nper_device_train_batch_size: 4\nnum_generations: 4\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mended = GRPOConfig.from_yaml(path, ["epsilon_high=5"])
        cfg = GRPOConfig.from_yaml(path, ["epsilon_high=0.5"])
        assert _cispo_caps(caught) == ["loss_type 'cispo' caps the importance ratio at epsilon_high = 0.5"]
        trainer_config_and_tokenizer("GRPOTrainer", GRPOConfig, "", config=cfg, args=None, tokenizer=None,
                                     processing_class=None, trl_keywords={})
        cfg.update({"learning_rate": 2e-6})
        assert len(_cispo_caps(caught)) == 1
        cfg.epsilon_high = 0.25   # a value changed since is warned of
        cfg.validate()
        mended.validate()
    assert _cispo_caps(caught)[1:] == ["loss_type 'cispo' caps the importance ratio at epsilon_high = 0.25"]
    assert mended.epsilon_high == 5.0


def test_a_dataset_given_as_the_config_is_named_as_such(tmp_path):
    """`r1fast train data.jsonl` read the data as YAML: "not valid YAML: expected '<document start>'", or for one
    JSON line "unknown option 'question' for GRPOConfig", a .csv "expected a mapping at the top level, got str"."""
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]
    files = {"d.jsonl": "".join(json.dumps(r) + "\n" for r in rows), "one.jsonl": json.dumps(rows[0]) + "\n",
             "d.csv": "prompt,answer\n1+1=,2\n", "d.JSON": json.dumps(rows)}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        for cls in (GRPOConfig, SFTConfig, SampleConfig):
            with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path / name))} is a dataset, not a config "
                                                  rf"YAML: give it as dataset=\S+{re.escape(name)} \(with "
                                                  rf"model_name_or_path=\.\.\.\), after the config if there is one$"):
                cls.from_yaml(tmp_path / name)
        with pytest.raises(ConfigError, match="is a dataset, not a pipeline YAML"):
            load_pipeline(str(tmp_path / name))
    (tmp_path / "c.json").write_text(json.dumps({"learning_rate": 2e-6}))   # a config written as JSON still reads
    assert GRPOConfig.from_yaml(tmp_path / "c.json").learning_rate == 2e-6


def test_an_option_given_twice_in_a_yaml_file_is_refused_naming_both_lines(tmp_path):
    # YAML keeps the last of two equal keys: `max_steps: 5` high in a file and `max_steps: 500` further down trained
    # 500 steps without a word (and a pipeline stage's `config: {max_steps: 1, max_steps: 2}` likewise)
    path = _yaml(tmp_path, "learning_rate: 1.0e-4\nmax_steps: 5\nbeta: 0.0\nmax_steps: 500\n")
    with pytest.raises(ConfigError, match=rf"^{path} line 4: key 'max_steps' is given twice \(first on line 2\); "
                                          rf"YAML would keep only the last: remove one$"):
        GRPOConfig.from_yaml(path)
    pipeline = _yaml(tmp_path, "model: builtin:tiny\nstages:\n  - name: a\n    type: sft\n"
                               "    dataset: builtin:arithmetic\n    config: {max_steps: 1, max_steps: 2}\n")
    with pytest.raises(ConfigError, match=rf"^{pipeline} line 6: key 'max_steps' is given twice \(first on line 6\)"):
        load_pipeline(pipeline)
    # equal keys in different mappings, and a merge key's entries overridden, are no repetition
    ok = _yaml(tmp_path, "base: &b {max_steps: 3, beta: 0.1}\nstages:\n  - {name: a, type: sft, dataset: builtin:arithmetic,"
                         " config: {max_steps: 1}}\n  - {name: b, type: grpo, dataset: builtin:arithmetic,"
                         " config: {<<: *b, max_steps: 2}}\n")
    from r1fast.trainer.config import load_yaml
    data = load_yaml(ok)
    assert data["stages"][1]["config"] == {"max_steps": 2, "beta": 0.1}
    assert data["stages"][0]["config"] == {"max_steps": 1}


@pytest.mark.parametrize("cls, key, typed", [
    (GRPOConfig, "system_prompt", "12:30"),      # YAML 1.1 read it as sexagesimal 750
    (GRPOConfig, "run_name", "007"),             # as 7
    (GRPOConfig, "run_name", "0123"),            # as octal 83
    (GRPOConfig, "run_name", "2024-05-01"),      # as a date, refused: "expects str, got datetime.date(2024, 5, 1)"
    (GRPOConfig, "dataset_split", "1.10"),       # as 1.1
    (SampleConfig, "output_file", "1e3"),        # as 1000.0
    (SampleConfig, "output_file", "0x1F"),       # as 31
    (SFTConfig, "run_name", "1_000"),            # as 1000
])
def test_a_command_line_value_for_a_text_option_is_the_text_typed(cls, key, typed):
    cfg = cls().update(parse_overrides([f"{key}={typed}"]), source="command line")
    assert getattr(cfg, key) == typed
    assert cls().update(parse_overrides([f"--{key}", typed])).to_dict()[key] == typed


def test_a_command_line_number_is_still_a_number_of_the_options_type():
    cfg = GRPOConfig().update(parse_overrides(["max_steps=1_000", "learning_rate=1e-3", "logging_steps=0x10", "beta=.5"]))
    assert (cfg.max_steps, cfg.learning_rate, cfg.logging_steps, cfg.beta) == (1000, 1e-3, 16, 0.5)
    assert type(cfg.max_steps) is int and type(cfg.logging_steps) is int and type(cfg.learning_rate) is float
    # a date where a number belongs is named as typed
    with pytest.raises(ConfigError, match=r"option 'max_steps' expects int, got '2024-05-01'$"):
        GRPOConfig().update(parse_overrides(["max_steps=2024-05-01"]), source="command line")


def test_a_pipelines_command_line_text_is_the_text_typed():
    p = load_pipeline(DEFAULT_CONFIG, ["name=007", "cold_start.run_name=0123"])
    assert p.name == "007" and p.stages[0].config.run_name == "0123"


@pytest.mark.parametrize("cls", [GRPOConfig, SampleConfig])
def test_an_unknown_language_for_the_language_reward_is_refused_at_load(cls):
    # accepted at load, it failed when the trainer or the sampler built its rewards (in a pipeline, once the
    # stages before had trained)
    with pytest.raises(ConfigError, match=r"^F\.yaml: option 'language': unknown language 'english' for reward "
                                          r"'language'; known: .*\ben\b.*\bzh\b"):
        cls.from_dict({"reward_funcs": ["accuracy", "language"], "language": "english"}, source="F.yaml")
    assert cls.from_dict({"reward_funcs": ["language"], "language": "zh"}).language == "zh"
    # with no language reward, the option is not read
    assert cls.from_dict({"reward_funcs": ["accuracy"], "language": "english"}).language == "english"


def test_a_pipeline_stage_with_an_unknown_language_is_refused_before_any_stage_runs():
    with pytest.raises(ConfigError, match=r"stage 'grpo': option 'language': unknown language 'xx'"):
        load_pipeline(DEFAULT_CONFIG, ["grpo.reward_funcs=[accuracy,language]", "grpo.language=xx"])



@pytest.mark.parametrize("kind", [["sft"], {"sft": 1}])
def test_a_stage_type_that_is_a_list_or_mapping_is_refused_naming_it(kind):
    # it was "TypeError: unhashable type: 'list'", a traceback from the CLI
    with pytest.raises(ConfigError, match=r"stage 'a': type must be one of \['grpo', 'sample', 'sft'\]; got "
                                          + re.escape(repr(kind))):
        load_pipeline({"model": "builtin:tiny", "stages": [{"name": "a", "type": kind, "dataset": "builtin:arithmetic"}]})


@pytest.mark.parametrize("stage, match", [
    ({"config": 0}, r"stage 'a': 'config' must be a mapping of SFTConfig options; got 0"),
    ({"config": False}, r"stage 'a': 'config' must be a mapping of SFTConfig options; got False"),
    ({"config": ""}, r"stage 'a': 'config' must be a mapping of SFTConfig options; got ''"),
    ({"name": ""}, r"stage 0: 'name' must be a folder name .*; got ''"),
    ({"name": 0}, r"stage 0: 'name' must be a folder name .*; got 0"),
    ({"name": False}, r"stage 0: 'name' is the boolean False: YAML reads an unquoted yes, no, on, off, true or false"),
])
def test_a_stage_name_or_config_that_looks_empty_is_refused_not_taken_as_absent(stage, match):
    # config: 0 (or false, '') trained on the defaults and name: 0 named the stage 'stage0', without a word
    raw = {"name": "a", "type": "sft", "dataset": "builtin:arithmetic", **stage}
    with pytest.raises(ConfigError, match=match):
        load_pipeline({"model": "builtin:tiny", "stages": [raw]})


def test_a_stage_name_or_config_left_out_or_null_keeps_its_default():
    for key in ("config", "name"):
        for stage in ({key: None}, {}):
            raw = {**({} if key == "name" else {"name": "a"}), "type": "sft", "dataset": "builtin:arithmetic", **stage}
            s = load_pipeline({"model": "builtin:tiny", "stages": [raw]}).stages[0]
            assert s.name == ("stage0" if key == "name" else "a") and s.config.max_steps == SFTConfig().max_steps


@pytest.mark.parametrize("seed", [-1, 2**32 - 1, 2**60])
def test_the_pipelines_seed_is_checked_as_its_own_key(seed):
    # -1 and 2**32 - 1 were refused as stage 'cold_start' / 'grpo''s option 'seed' (stage i runs with seed + i), blamed
    # on the file; with every stage's own seed set, any seed loaded, and 2**60 then failed at the first held-out
    # evaluation, once a stage had trained ("Overflow when unpacking long long" from seed * 1000 + 7)
    for extra in ([], ["cold_start.seed=0", "grpo.seed=1"]):
        with pytest.raises(ConfigError, match=rf"^command line: seed must be in \[0, 2\*\*32 - 2\] \(stage i runs with "
                                              rf"seed \+ i; this pipeline has 2 stages\); got {seed}$"):
            load_pipeline(DEFAULT_CONFIG, [f"seed={seed}", *extra])
    assert load_pipeline(DEFAULT_CONFIG, [f"seed={2**32 - 2}"]).stages[1].config.seed == 2**32 - 1


@pytest.mark.parametrize("num_blocks", [None, 1])
def test_a_kv_block_larger_than_the_memory_is_refused_naming_block_size(num_blocks):
    # engine_block_size=1000000000 was accepted and the engine then failed allocating the pool: a RuntimeError
    # traceback from torch's allocator ("DefaultCPUAllocator: can't allocate memory"), after the model had loaded
    from r1fast.rollout import Engine

    model, _ = load_model_and_tokenizer("builtin:micro", device="cpu")
    with pytest.raises(ValueError, match=r"^Engine: a KV pool of 1 block of block_size 1000000000 tokens takes "
                                         r"[\d,]+ bytes, more than the [\d,]+ bytes of memory on cpu; lower "
                                         r"block_size"):
        Engine(model, num_blocks=num_blocks, block_size=10**9, max_num_seqs=2, max_model_len=16)


def test_a_yaml_files_value_for_a_text_option_is_the_text_written(tmp_path):
    # YAML 1.1 read system_prompt: 12:30 as the sexagesimal 750, run_name: 007 as 7, 0123 as octal 83; as on the
    # command line, a text option now takes the text; number options get plain numbers
    path = _yaml(tmp_path, "system_prompt: 12:30\nrun_name: '0123'\noutput_dir: 007\ndataset_split: 1.10\n"
                           "max_steps: 1_000\nlearning_rate: 1.0e-4\nreward_weights: [1, 0.5]\n"
                           "reward_funcs: [accuracy, format]\n")
    cfg = GRPOConfig.from_yaml(path)
    assert (cfg.system_prompt, cfg.run_name, cfg.output_dir, cfg.dataset_split) == ("12:30", "0123", "007", "1.10")
    assert (cfg.max_steps, cfg.learning_rate, cfg.reward_weights) == (1000, 1e-4, [1.0, 0.5])
    assert type(cfg.max_steps) is int and type(cfg.learning_rate) is float
    assert all(type(w) is float for w in cfg.reward_weights)
    assert GRPOConfig.from_yaml(_yaml(tmp_path, "run_name: 2024-05-01\n")).run_name == "2024-05-01"


@pytest.mark.parametrize("cls, key, real", [
    (GRPOConfig, "model", "model_name_or_path"),            # was "did you mean tis_mode, delta?"
    (SFTConfig, "model", "model_name_or_path"),
    (SampleConfig, "model", "model_name_or_path"),
    (GRPOConfig, "batch_size", "per_device_train_batch_size"),   # was "did you mean eval_size?"
    (SFTConfig, "epochs", "num_train_epochs"),               # no hint
    (GRPOConfig, "kl_coef", "beta"),                         # no hint
    (SampleConfig, "n", "num_samples"),                      # no hint
    (GRPOConfig, "lr", "learning_rate"),
])
def test_another_librarys_name_for_an_option_suggests_this_ones(cls, key, real):
    with pytest.raises(ConfigError, match=rf"unknown option '{key}' for {cls.__name__}; did you mean {real}\?$"):
        cls.from_dict({key: 1})


@pytest.mark.parametrize("override, where, key, own", [
    ("grpo.modle=builtin:tiny", "command line", "modle", "model"),      # was "did you mean tis_mode?"
    ("grpo.num_row=3", "command line", "num_row", "num_rows"),          # no hint
    ("grpo.evaluat=false", "command line", "evaluat", "evaluate"),      # was "did you mean eval_dataset?"
])
def test_a_misspelt_stage_key_suggests_the_stages_own_key(override, where, key, own):
    with pytest.raises(ConfigError, match=rf"^{where}: stage 'grpo': unknown option '{key}' for GRPOConfig; did you "
                                          rf"mean the stage's own key '{own}' \(beside 'config:' in a pipeline file, "
                                          rf"grpo\.{own}=\.\.\. on the command line\)\?$"):
        load_pipeline(DEFAULT_CONFIG, [override])


def test_a_stage_key_written_inside_a_stages_config_says_where_it_goes():
    raw = {"name": "a", "type": "sft", "dataset": "builtin:arithmetic", "config": {"model": "builtin:tiny"}}
    with pytest.raises(ConfigError, match=r"^pipeline: stage 'a': unknown option 'model' for SFTConfig; did you mean "
                                          r"the stage's own key 'model'"):
        load_pipeline({"model": "builtin:tiny", "stages": [raw]})


def test_an_engine_too_narrow_for_the_held_out_samples_is_refused_at_load():
    # refused only by GRPOTrainer, once the model had loaded (in a pipeline, once the stages before had trained)
    narrow = {"engine_max_num_seqs": 2, "num_generations": 2, "per_device_train_batch_size": 2,
              "eval_samples_per_prompt": 4}
    with pytest.raises(ConfigError, match=r"^config: option 'engine_max_num_seqs' = 2 is below eval_samples_per_prompt = 4: a "
                                          r"held-out prompt's samples are decoded together"):
        GRPOConfig.from_dict({**narrow, "eval_dataset": "builtin:arithmetic"})
    assert GRPOConfig.from_dict(narrow).eval_samples_per_prompt == 4   # no eval_dataset: nothing is evaluated
    with pytest.raises(ConfigError, match=r"stage 'grpo': option 'engine_max_num_seqs' = 8 is below "
                                          r"eval_samples_per_prompt = 16"):
        load_pipeline(DEFAULT_CONFIG, ["grpo.engine_max_num_seqs=8", "grpo.eval_dataset=builtin:arithmetic",
                                       "grpo.eval_steps=10", "eval_samples_per_prompt=16"])


def test_a_dataset_given_as_a_pipeline_says_how_a_pipeline_takes_one(tmp_path):
    """`r1fast pipeline data.jsonl` said "give it as dataset=PATH (with model_name_or_path=...)", a single run's
    advice: a pipeline refuses dataset= ("unknown pipeline key(s) ['dataset']"); its stages take <stage>.dataset."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    with pytest.raises(ConfigError) as refused:
        load_pipeline(str(data))
    message = str(refused.value)
    assert message.startswith(f"{data} is a dataset, not a pipeline YAML: ") and "<stage>.dataset=" in message
    # the example it gives runs as given
    pipeline, override = re.search(r"e\.g\. r1fast pipeline (\S+) (\S+)\)$", message).groups()
    stage, value = override.split(".dataset=")
    loaded = {s.name: s for s in load_pipeline(pipeline, [override]).stages}
    assert value == str(data) and loaded[stage].dataset == str(data)
    assert "give it as dataset=" not in message


@pytest.mark.parametrize("run_name", ["..", "../x", "a/b", "/tmp/elsewhere", "."])
def test_a_run_name_that_is_no_folder_name_is_refused_where_it_names_the_run_folder(run_name, tmp_path, monkeypatch):
    # with output_dir unset the run writes into runs/<run_name>: '..' wrote into the working directory itself (which
    # overwrite_output_dir then cleared), '../x' and '/tmp/elsewhere' outside runs/, as the stage names were before
    from r1fast.trainer.common import run_dir_for
    from r1fast.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=rf"option 'run_name' = {re.escape(repr(run_name))}: .*runs/<run_name>.*"
                                          r"give output_dir"):
        run_dir_for(None, run_name, "grpo")
    # said before the model loads, naming the option
    with pytest.raises(SystemExit, match=r"r1fast sft: .*option 'run_name'.*give output_dir"):
        main(["sft", "model_name_or_path=builtin:micro", "dataset=builtin:arithmetic", f"run_name={run_name}"])
    assert not os.path.exists(tmp_path / "runs")
    # with output_dir given it names the run only (its wandb name), and a pipeline's stage writes into <run>/<stage>
    assert run_dir_for(str(tmp_path / "out"), run_name, "grpo") == str(tmp_path / "out")
    assert load_pipeline(DEFAULT_CONFIG, [f"grpo.run_name={run_name}"]).stages[1].config.run_name == run_name


def test_a_plain_run_name_names_the_folder_under_runs(tmp_path, monkeypatch):
    from r1fast.trainer.common import run_dir_for

    monkeypatch.chdir(tmp_path)
    assert run_dir_for(None, "my-run.v2", "grpo") == os.path.join(str(tmp_path), "runs", "my-run.v2")
    assert run_dir_for(None, None, "sft") == os.path.join(str(tmp_path), "runs", "sft")
    assert run_dir_for(None, "", "sft") == os.path.join(str(tmp_path), "runs", "sft")


def test_a_misspelt_stage_in_an_override_is_shown_the_close_stage_name():
    # `grop.max_steps=5` listed the stages but, unlike a misspelt option, suggested none
    with pytest.raises(ConfigError, match=r"command line: no stage named \['grop'\]; did you mean 'grpo' "
                                          r"\(grpo\.max_steps=\.\.\.\)\?; stages: \['cold_start', 'grpo'\]"):
        load_pipeline(DEFAULT_CONFIG, ["grop.max_steps=5"])
    with pytest.raises(ConfigError, match=r"no stage named \['cold_strat', 'zzz'\]; did you mean 'cold_start' "
                                          r"\(cold_start\.num_rows=\.\.\.\)\?; stages: "):
        load_pipeline(DEFAULT_CONFIG, ["zzz.max_steps=5", "cold_strat.num_rows=10"])
    with pytest.raises(ConfigError, match=r"no stage named \['zzz'\]; stages: \['cold_start', 'grpo'\]$"):
        load_pipeline(DEFAULT_CONFIG, ["zzz.max_steps=5"])


@pytest.mark.parametrize("name", ["..", "../x", "a/b", "/tmp/elsewhere", "."])
def test_a_pipeline_name_that_is_no_folder_name_is_refused_where_it_names_the_run_folder(name, tmp_path):
    # with output_dir unset a pipeline writes into runs/<name>: name=.. was the working directory itself
    with pytest.raises(ConfigError, match=rf"command line: name = {re.escape(repr(name))}: .*runs/<name>.*"
                                          r"give output_dir"):
        load_pipeline(DEFAULT_CONFIG, [f"name={name}"])
    # given output_dir, the name is the run's title only
    assert load_pipeline(DEFAULT_CONFIG, [f"name={name}", f"output_dir={tmp_path / 'out'}"]).name == name


@pytest.mark.parametrize("text, kind", [("3\n", "int"), ("2.5\n", "float"), ("true\n", "bool"), ("- a\n", "list"),
                                        ("hello\n", "str")])
def test_a_yaml_file_that_is_no_mapping_names_the_type_it_holds(tmp_path, text, kind):
    # a number read with its text kept was named by r1fast's own class: "got _IntAsTyped"
    path = _yaml(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^{re.escape(path)}: expected a mapping at the top level, got {kind}$"):
        GRPOConfig.from_yaml(path)
    with pytest.raises(ConfigError, match=rf"^{re.escape(path)}: expected a mapping at the top level, got {kind}$"):
        load_pipeline(path)


@pytest.mark.parametrize("where, spec", [
    ("top", {1: 2}), ("top", {None: 2, "bogus": 1}),
    ("stage", {"stages": [{"name": "a", "type": "sft", "dataset": "builtin:arithmetic", 1: 2, "x": 3}]}),
    ("config", {"stages": [{"name": "a", "type": "sft", "dataset": "builtin:arithmetic", "config": {1: 2}}]}),
])
def test_a_pipeline_key_that_is_a_number_or_null_is_named_as_unknown(where, spec):
    # YAML reads `1: 2` or `~: 2` as a number or null key; the hints' difflib (and sorting it beside names) raised
    # "TypeError: '_IntAsTyped' object is not iterable", a traceback from the CLI
    data = {"model": "builtin:micro", "stages": [{"name": "a", "type": "sft", "dataset": "builtin:arithmetic"}], **spec}
    match = {"top": r"^pipeline: unknown pipeline key\(s\) \[", "stage": r"^pipeline: stage 0: unknown key\(s\) \[",
             "config": r"^pipeline: stage 'a': unknown option '1' for SFTConfig"}[where]
    with pytest.raises(ConfigError, match=match):
        load_pipeline(data)


@pytest.mark.parametrize("stages", [5, [{"name": "a", "type": ["sft"], "dataset": "builtin:arithmetic"}],
                                    [{"name": "a", "type": {"sft": 1}, "dataset": "builtin:arithmetic"}]])
def test_an_unknown_pipeline_key_beside_stages_that_are_no_list_or_of_no_type_is_named(stages):
    # the hint that names the stages an unknown key is an option of read the stages before they were checked:
    # `stages: 5` or a stage's `type: [sft]` beside `max_steps: 3` raised a TypeError
    with pytest.raises(ConfigError, match=r"^pipeline: unknown pipeline key\(s\) \['max_steps'\]"):
        load_pipeline({"model": "builtin:micro", "max_steps": 3, "stages": stages})


@pytest.mark.parametrize("cls", [GRPOConfig, SFTConfig])
def test_two_spellings_of_one_option_are_refused_naming_both_and_where(tmp_path, cls):
    # the later spelling was kept and the other dropped without a word
    p = tmp_path / "c.yaml"
    p.write_text("max-steps: 5\nmax_steps: 7\n")
    with pytest.raises(ConfigError, match=re.escape(f"{p}: 'max-steps' and 'max_steps' are one option, "
                                                    f"'max_steps': give it once")):
        cls.from_yaml(p)
    with pytest.raises(ConfigError, match=re.escape("config: 'max_steps' and 'max-steps' are one option")):
        cls.from_dict({"max_steps": 5, "max-steps": 7})
    one = tmp_path / "one.yaml"
    one.write_text("learning_rate: 1.0e-5\n")
    for typed, first, second in ((["max-steps=3", "--max_steps", "4"], "max-steps", "max_steps"),
                                 (["--max_steps=4", "--max-steps=3"], "max_steps", "max-steps")):
        with pytest.raises(ConfigError, match=re.escape(f"command line: {first!r} and {second!r} are one option")):
            cls.from_yaml(one, typed)
    with pytest.raises(ConfigError, match=re.escape("command line: 'grpo.max-steps' and 'grpo.max_steps' are one")):
        parse_overrides(["grpo.max-steps=3", "grpo.max_steps=4"])


@pytest.mark.parametrize("cls", [GRPOConfig, SFTConfig])
def test_an_override_in_either_spelling_replaces_the_files_option(tmp_path, cls):
    for infile, typed in (("max_steps", "max-steps"), ("max-steps", "max_steps"), ("max-steps", "max-steps")):
        p = tmp_path / "c.yaml"
        p.write_text(f"{infile}: 5\nlearning_rate: 2.0e-5\n")
        cfg = cls.from_yaml(p, [f"{typed}=3"])
        assert cfg.max_steps == 3 and cfg.learning_rate == 2e-5
    # the same spelling twice on the command line: the later one, as a script appending to a command expects
    assert cls.from_yaml(p, ["max_steps=3", "--max_steps", "9"]).max_steps == 9
