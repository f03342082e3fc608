"""`r1fast train | sft | sample | pipeline | plot`: added to the `r1fast` command by r1fast.cli.

    r1fast train                              the embedded default (configs/default.yaml), CPU, minutes
    r1fast train run.yaml --max_steps 50      GRPO from a GRPOConfig YAML, overridden
    r1fast train r1_pipeline rl1.max_steps=50 a pipeline YAML, one stage's option overridden
    r1fast train model_name_or_path=M dataset=D max_steps=50    GRPO from the command line alone
    r1fast train --resume                     continue the newest checkpoint of that run
    r1fast sft sft.yaml model_name_or_path=builtin:tiny dataset=data.jsonl
    r1fast sample sample.yaml output_file=kept.jsonl
    r1fast sample sample.yaml output_file=kept.jsonl --resume     continue one stopped or killed
    r1fast pipeline r1fast/configs/r1_pipeline.yaml
    r1fast plot runs/default
Options after the config file are `--key value`, `--key=value` or `key=value`; for a pipeline,
`<stage>.<key>=value` sets one stage's option (or its own model, dataset, num_rows, evaluate).
"""
from __future__ import annotations

import argparse
import os
import sys

from r1fast.trainer.config import ConfigError, check_resume_path_exists, resolve_config_path, resume_is_bare

_RESUME = {"train": "--resume [PATH] continues from the newest checkpoint (or PATH: a checkpoint or run folder; "
                    "for a pipeline, its run folder).",
           "sft": "--resume [PATH] continues from the newest checkpoint (or PATH).",
           "sample": "--resume continues a run stopped or killed (it keeps what it sampled, batch by batch, in "
                     "OUTPUT_FILE.sample_progress.json), writing what one uninterrupted run writes.",
           "pipeline": "--resume [RUN_DIR] skips finished stages and resumes the unfinished one from its last "
                       "checkpoint (RUN_DIR: default the pipeline's output_dir, else ./runs/<name>). "
                       "rerun_from=<stage> runs that stage and the later ones again, keeping the earlier ones as "
                       "--resume does and setting their earlier outputs aside as <folder>.old-<n>."}
_SYNTAX = "options: --key value | --key=value | key=value"
_REQUIRED = {"model_name_or_path": " (required)", "dataset": " (required)"}


def _options_help(config_cls, shown: dict[str, str], meanings: str) -> str:
    """A command's options with their defaults for its --help (`shown`: what follows some names instead of
    "=default"; `meanings`: the docs section that explains them). The required ones come first."""
    import dataclasses

    cfg = config_cls()
    names = sorted((f.name for f in dataclasses.fields(cfg)), key=lambda n: n not in _REQUIRED)  # stable
    values = [n + shown.get(n, f"={getattr(cfg, n)!r}") for n in names]
    return (f"{_SYNTAX}; {config_cls.__name__}'s, with defaults: {', '.join(values)}.\n\n"
            f"What each option means: docs/training.md, \"{meanings}\".")


def _train_epilog() -> str:
    from r1fast.trainer.config import GRPOConfig

    return (_options_help(GRPOConfig, _REQUIRED, "GRPO on your model") + "\n\n"
            "With no CONFIG.yaml and neither model_name_or_path nor dataset, it runs the embedded default pipeline "
            "(r1fast/configs/default.yaml); with a pipeline YAML, that pipeline: their options are a pipeline's "
            "(r1fast pipeline --help).")


def _sft_epilog() -> str:
    from r1fast.trainer.config import SFTConfig

    return _options_help(SFTConfig, _REQUIRED, "SFT, rejection sampling, pipelines")


def _sample_epilog() -> str:
    from r1fast.trainer.config import SampleConfig

    return (_options_help(SampleConfig, {**_REQUIRED, "output_file": "=runs/sample/samples.jsonl",
                                         "reward_thresholds": "=[1.0 per reward]"},
                          "SFT, rejection sampling, pipelines") + "\n\n"
            "dataset=- reads the prompts from standard input: JSON lines, as a .jsonl dataset holds them (one object a "
            "line with the prompt_column, and the answer_column for the accuracy reward), e.g. r1fast sample "
            "model_name_or_path=M dataset=- output_file=kept.jsonl < prompts.jsonl, or jq -c "
            "'{prompt: .question, answer}' data.jsonl | r1fast sample ... dataset=- (in a YAML file: dataset: '-').")


def _pipeline_epilog() -> str:
    from r1fast.trainer.pipeline import STAGE_FIELDS, TOP_KEYS

    own = ", ".join(STAGE_FIELDS)
    top = ", ".join(sorted(TOP_KEYS - {"stages", "description"}))
    return (f"{_SYNTAX}: <stage>.<key>=value sets one stage's option (a field of its type's config: r1fast sft / "
            f"train / sample --help) or its own {own}; <key>=value sets a pipeline key: {top}. What each means: "
            f"docs/training.md, \"SFT, rejection sampling, pipelines\".")


_EPILOGS = {"train": _train_epilog, "sft": _sft_epilog, "sample": _sample_epilog, "pipeline": _pipeline_epilog}


class _Paragraphs(argparse.HelpFormatter):
    """Wraps a description or epilog paragraph by paragraph (blank lines between them kept); argparse's own
    formatter runs them into one block."""

    def _fill_text(self, text, width, indent):
        return "\n\n".join(super(_Paragraphs, self)._fill_text(p, width, indent) for p in text.split("\n\n"))


def _split(rest: list[str]) -> tuple[str | None, list[str], str | bool | None]:
    """→ (config path or None, overrides, resume)."""
    config, overrides, resume = _split_as_typed(rest)
    if config is not None:  # a file, or a config r1fast ships named from any directory ("r1_pipeline")
        config = resolve_config_path(config)
    return config, overrides, resume


def _split_as_typed(rest: list[str]) -> tuple[str | None, list[str], str | bool | None]:
    """_split's parts, the config as typed."""
    config = None
    if rest and not rest[0].startswith("-") and "=" not in rest[0]:
        config = rest[0]
        rest = rest[1:]
    overrides, resume = [], None
    i = 0
    while i < len(rest):
        a = rest[i]
        if a == "--resume":
            if i + 1 < len(rest) and not rest[i + 1].startswith("-") and "=" not in rest[i + 1]:
                resume = rest[i + 1]
                i += 2
            else:
                resume = True
                i += 1
            continue
        if a.startswith("--resume="):
            resume = a.split("=", 1)[1] or True
            i += 1
            continue
        overrides.append(a)
        i += 1
    return config, overrides, resume


def _fail(cmd: str, e: Exception):
    raise SystemExit(f"r1fast {cmd}: {e}")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message names the problem (bad option, data, reward function, checkpoint, a run
    of NaN steps, a path that cannot be written: OSError names the path): printed as one line,
    never as a traceback."""
    from r1fast._ext import ExtensionUnavailable
    from r1fast.rewards import RewardError
    from r1fast.trainer.common import NonFiniteLoss

    return ConfigError, ValueError, OSError, RewardError, NonFiniteLoss, ExtensionUnavailable


def _guarded(cmd: str, func, resumable: bool = True):
    """Run a command: a user error exits with its message; Ctrl-C (the second one, or one outside
    a training loop) exits with status 130 and a one-line note instead of a traceback."""
    def run(args):
        try:
            return func(args)
        except KeyboardInterrupt:
            from r1fast.cli import command_is_stopping

            command_is_stopping()   # a second Ctrl-C or SIGTERM now must not cut short the exit this line announces
            hint = f"; continue with: {_resume_command(cmd, args.rest)}" if resumable else ""
            print(f"r1fast {cmd}: stopped{hint}", file=sys.stderr)
            return 130
        except _user_errors() as e:
            from r1fast.trainer.checkpoints import DamagedCheckpoint, OutputDirHoldsAnotherRun, RunFolderInUse

            if isinstance(e, RunFolderInUse):
                raise SystemExit(_in_use_message(cmd, args.rest, e)) from None
            if isinstance(e, OutputDirHoldsAnotherRun):   # its checkpoints are another run's: no --resume hint
                raise SystemExit(f"r1fast {cmd}: {e}") from None
            if isinstance(e, DamagedCheckpoint) and not e.bare_resume_continues:   # its message says which --resume
                raise SystemExit(f"r1fast {cmd}: {e}") from None
            kept = _left_progress(getattr(e, "r1fast_run_folders", [])) if resumable else None
            if kept:
                # as after Ctrl-C: a run that stopped on an error mid-way (a reward function that raised) goes on
                raise SystemExit(f"r1fast {cmd}: {e}\nr1fast {cmd}: {kept} kept; once that is fixed, "
                                 f"{_continue_with(cmd, args.rest, e)}") from None
            if resumable and getattr(e, "r1fast_sample_progress", None):   # a pipeline's sample stage
                raise SystemExit(f"r1fast {cmd}: {e}\nr1fast {cmd}: the batches of prompts sampled before the error "
                                 f"are kept in {e.r1fast_sample_progress}; once that is fixed, "
                                 f"{_continue_with(cmd, args.rest, e)}") from None
            _fail(cmd, e)
    return run


def _left_progress(run_folders: list[str]) -> str | None:
    """What a failed run left that --resume goes on from, in words: a checkpoint, or a pipeline's finished
    stage (a sample stage's has no checkpoint); None when nothing."""
    import json

    from r1fast.trainer.checkpoints import latest_checkpoint

    for folder in run_folders:
        if latest_checkpoint(folder):
            return "its checkpoints are"
        try:
            with open(os.path.join(folder, "pipeline_state.json"), encoding="utf-8") as f:
                stages = json.load(f).get("stages", {})
            done = [name for name, st in stages.items() if isinstance(st, dict) and st.get("finished")]
            if done:
                return f"its finished stages ({', '.join(done)}) are" if len(done) > 1 else \
                    f"its finished stage ({done[0]}) is"
        except (OSError, ValueError, AttributeError):   # none, or damaged: nothing to say
            pass
    return None


def _continue_with(cmd: str, rest: list[str], error: BaseException) -> str:
    """'continue with: <the command that continues this one>'. After a RewardTimeout that command with the same
    reward_timeout stops again: a typed reward_timeout override is left for the user to raise (resuming with
    another limit is allowed), and one set in the config file is named there."""
    from r1fast.rewards import RewardTimeout

    if not isinstance(error, RewardTimeout):
        return f"continue with: {_resume_command(cmd, rest)}"
    raised = [a.split("=", 1)[0] + "=SECONDS" if _sets_reward_timeout(a) else a for a in rest]
    if raised != rest:
        return f"continue with a higher reward_timeout: {_resume_command(cmd, raised)}"
    config = _split_as_typed(rest)[0]
    where = f" in {config}" if config else ""
    return f"raise reward_timeout{where} and continue with: {_resume_command(cmd, rest)}"


def _sets_reward_timeout(arg: str) -> bool:
    """reward_timeout=... or a pipeline stage's rs.reward_timeout=..."""
    key = arg.split("=", 1)[0] if "=" in arg else ""
    return key == "reward_timeout" or key.endswith(".reward_timeout")


def _resume_command(cmd: str, rest: list[str]) -> str:
    """The command that continues this one: a bare `r1fast train --resume` resumes the default pipeline, not
    the run of `r1fast train my_grpo.yaml output_dir=x` that was stopped."""
    import shlex

    config, overrides, resume = _split_as_typed(rest)
    # from a checkpoint, or another run's folder of checkpoints (its newest): the steps since are in this run's
    # own newer ones, which `--resume PATH` would pass over; a pipeline's run folder stays named (it is the run)
    bare = resume is None or resume_is_bare(resume) or not os.path.isfile(os.path.join(resume, "pipeline_state.json"))
    where = ["--resume"] if bare else ["--resume", resume]
    return shlex.join(["r1fast", cmd, *([config] if config else []), *overrides, *where])


def _in_use_message(cmd: str, rest: list[str], e) -> str:
    """A new run refused for an earlier run in its folder, with the exact commands to type."""
    import shlex

    def again(*keys: str) -> str:
        # the typed command without its own setting of `keys`, which the choice sets again: a command holding
        # `output_dir=runs/x output_dir=NEW_FOLDER` reads as if it wrote into both
        return shlex.join(["r1fast", cmd, *_without_options(rest, keys)])

    # a checkpoint a killed save set aside is renamed back first: --resume alone finds none and is refused again
    moves = "".join(f"mv {shlex.quote(a)} {shlex.quote(b)} && " for a, b in getattr(e, "renames", ()))
    over = (f"deletes its checkpoints and metrics; keeps {', '.join(os.path.basename(a) for a, _ in e.renames)}"
            if getattr(e, "renames", ()) else "deletes its checkpoints and metrics")
    choices = [(f"{moves}{again()} --resume", "to continue it"),
               (f"{again('overwrite_output_dir')} overwrite_output_dir=true", f"to start over ({over})"),
               (f"{again('output_dir')} output_dir=NEW_FOLDER", "to keep it and write the new run elsewhere")]
    width = max(len(c) for c, _ in choices)
    return (f"r1fast {cmd}: {e.run_dir} holds an earlier run ({e.holds}). Type\n"
            + "\n".join(f"  {c:<{width}}  {why}" for c, why in choices))


def _without_options(rest: list[str], keys: tuple[str, ...]) -> list[str]:
    """`rest` less the overrides that set one of `keys` (`key=v`, `--key=v`, `--key v`; `-` for `_` too)."""
    def key_of(arg: str) -> str:
        return arg.lstrip("-").split("=", 1)[0].replace("-", "_")

    out, i = [], 0
    while i < len(rest):
        arg = rest[i]
        if key_of(arg) in keys and (arg.startswith("--") or "=" in arg):
            # `--key value`: its value is the next argument
            i += 2 if arg.startswith("--") and "=" not in arg else 1
            continue
        out.append(arg)
        i += 1
    return out


def _resume_pipeline(resume, overrides: list[str]) -> tuple[bool, list[str]]:
    """A pipeline resumes its own run folder; `--resume PATH` names that folder (it was silently
    ignored before, and a fresh run started in ./runs/<name>)."""
    if not isinstance(resume, str) or resume_is_bare(resume):
        return bool(resume), overrides
    check_resume_path_exists(resume)
    if not os.path.isfile(os.path.join(resume, "pipeline_state.json")):
        raise ConfigError(f"--resume {resume!r}: not a pipeline run folder (no pipeline_state.json); "
                          f"give the folder holding it, or --resume alone for ./runs/<name>")
    return True, overrides + [f"output_dir={os.path.abspath(resume)}"]


# Keys that make `r1fast train key=value ...` (no config file) a GRPO run rather than the default pipeline
_GRPO_KEYS = {"model_name_or_path", "dataset"}


def _cmd_train(args):
    from r1fast.trainer.config import parse_overrides
    from r1fast.trainer.pipeline import DEFAULT_CONFIG, is_pipeline_file, run_pipeline

    config, overrides, resume = _split(args.rest)
    if config is None and _GRPO_KEYS & parse_overrides(overrides).keys():
        return _run_grpo(None, overrides, resume)  # a GRPO run from the command line alone, as `r1fast sft` takes
    if config is None or is_pipeline_file(config):
        resume, overrides = _resume_pipeline(resume, overrides)
        run_pipeline(config or DEFAULT_CONFIG, overrides, resume=resume)
        return 0
    return _run_grpo(config, overrides, resume)


def _run_grpo(config: str | None, overrides: list[str], resume):
    from r1fast.trainer.config import GRPOConfig
    from r1fast.trainer.grpo import GRPOTrainer

    cfg = _config_from(GRPOConfig, config, overrides, "a GRPO config")
    _check_resume_path(resume)
    # given the model's name, the trainer reads the data before loading it (with cfg's device, dtype, seed and fp8):
    # a wrong dataset is said before a large model has loaded
    return _finish(GRPOTrainer(cfg.model_name_or_path, None, cfg.dataset, cfg).train(resume=resume))


def _check_resume_path(resume):
    """A `--resume PATH` that does not exist or holds no checkpoint, said before the run takes its folder: found
    inside it, the error of a mistyped path was followed by "its checkpoints are kept; once that is fixed, continue
    with: ... --resume" when the folder held an earlier run's checkpoints, as if this run had written them."""
    from r1fast.trainer.checkpoints import resolve_resume

    if isinstance(resume, str) and not resume_is_bare(resume):
        resolve_resume(resume, run_dir="")   # a PATH is read on its own, not from the run's folder


def _unset(cfg) -> str:
    """Which of the two required keys the YAML and command line left unset (the error named both, given one)."""
    unset = [k for k in ("model_name_or_path", "dataset") if getattr(cfg, k) is None]
    return f"; {' and '.join(unset)} {'is' if len(unset) == 1 else 'are'} not set"


def _finish(res: dict) -> int:
    """A training command's end: its result printed; a stopped run raises KeyboardInterrupt (_guarded says how
    to continue)."""
    _print_result(res)
    if res.get("interrupted"):
        raise KeyboardInterrupt
    return 0


def _print_result(res: dict):
    from r1fast.trainer.evaluate import describe_eval

    for key in ("initial", "final"):
        if key in res:
            print(f"{key} held-out accuracy: {describe_eval(res[key])}")
    if "checkpoint" in res:
        print(f"checkpoint: {res['checkpoint']}")
    if res.get("nonfinite_skipped"):
        print(f"steps skipped for a NaN/inf loss or gradient: {res['nonfinite_skipped']}")


def _config(config_cls, rest: list[str], command: str, dataset_hint=lambda cfg: ""):
    """A stage's config (YAML file and/or key=value overrides) and --resume."""
    config, overrides, resume = _split(rest)
    return _config_from(config_cls, config, overrides, command, dataset_hint), resume


def _config_from(config_cls, config: str | None, overrides: list[str], who: str, dataset_hint=lambda cfg: ""):
    from r1fast.trainer.config import check_run_name, parse_overrides
    from r1fast.trainer.pipeline import is_pipeline_file

    if config and is_pipeline_file(config):   # its keys were refused one by one: "unknown option 'name'"
        raise ConfigError(f"{config} is a pipeline (it has 'stages'), not a config for r1fast {who}: run it with "
                          f"r1fast pipeline {config}")
    cfg = config_cls.from_yaml(config, overrides) if config else config_cls().update(
        parse_overrides(overrides), source="command line")
    if cfg.model_name_or_path is None or cfg.dataset is None:
        raise ConfigError(f"{who} needs model_name_or_path and dataset{_unset(cfg)}{dataset_hint(cfg)}")
    # before the model loads (SFT's) and its trainer takes the folder; r1fast sample has no run_name
    check_run_name(getattr(cfg, "run_name", None), getattr(cfg, "output_dir", None))
    return cfg


def _model(cfg, **options):
    from r1fast.trainer.common import load_model_and_tokenizer, resolve_device

    return load_model_and_tokenizer(cfg.model_name_or_path, device=resolve_device(cfg.device),
                                    dtype=cfg.dtype, seed=cfg.seed, **options)


def _cmd_sft(args):
    from r1fast.data import load_rows
    from r1fast.trainer.config import SFTConfig
    from r1fast.trainer.sft import SFTTrainer

    cfg, resume = _config(SFTConfig, args.rest, "sft", lambda c: f" (JSONL/parquet/saved dataset with "
                                                              f"{c.prompt_column!r} and {c.completion_column!r} columns)")
    _check_resume_path(resume)
    # the data before the model: a wrong dataset is said before a large model has loaded. SFTTrainer checks the
    # columns, after reading a `messages` column as prompt and completion
    rows = load_rows(cfg.dataset, split=cfg.dataset_split, seed=cfg.seed)
    model, tok = _model(cfg)
    return _finish(SFTTrainer(model, tok, rows, cfg).train(resume=resume))


def _cmd_sample(args):
    """Rejection sampling into output_file, keeping its progress beside the output after each batch of
    prompts (sampling.progress_path), from which --resume continues after any kill; the first
    Ctrl-C/SIGTERM stops it after its batch."""
    import types

    from r1fast.data import load_rows
    from r1fast.trainer import sampling
    from r1fast.trainer.common import check_answer_present, resolve_device
    from r1fast.trainer.config import SampleConfig
    from r1fast.trainer.grpo import stop_handlers

    cfg, resume = _config(SampleConfig, _stdin_dataset_as_text(args.rest), "sample")
    out = cfg.output_file or os.path.join("runs", "sample", "samples.jsonl")
    progress_file = sampling.progress_path(out)
    _check_sample_output(out, progress_file, resume, args.rest, cfg.dataset)
    # the data before the model: a wrong dataset is said before a large model has loaded
    if cfg.dataset == STDIN_DATASET:
        rows = _stdin_rows(cfg.prompt_column, cfg.dataset_split)
    else:
        rows = load_rows(cfg.dataset, split=cfg.dataset_split, seed=cfg.seed, required_columns=(cfg.prompt_column,),
                         column_options={cfg.prompt_column: "prompt_column"})
    # a misspelt answer_column too (rejection_sample found it once the model had loaded)
    check_answer_present(cfg.reward_funcs, rows, cfg.answer_column, "prompt dataset")
    # and a column holding no answer (every row null): its samples were kept unchecked
    sampling.check_answers_given(cfg.reward_funcs, rows if cfg.max_prompts < 0 else rows[:cfg.max_prompts],
                                 cfg.answer_column, "prompt dataset")
    options = {k: v for k, v in cfg.to_json_dict().items() if k != "output_file"}   # the output names the file
    settings = {"device": str(resolve_device(cfg.device))}
    # the model's weights, not only its folder's name: a --resume after the model was retrained into the same folder
    # took the finished output (or the stopped run's rows) of the earlier weights as this sampling's
    weights = sampling.weights_signature(cfg.model_name_or_path)
    if weights is not None:
        settings["weights"] = weights
    fingerprint = sampling.sample_fingerprint(options, [r.get(cfg.prompt_column) for r in rows], settings)
    # before the model loads: a requeued job whose sampling had finished ends at once
    if resume and _sample_already_complete(out, progress_file, fingerprint):
        return 0
    model, tok = _model(cfg)
    log = sampling.SampleProgress(progress_file, fingerprint)
    earlier = log.load("sampling") if resume else None
    stop = types.SimpleNamespace(_stop_requested=False)   # the first Ctrl-C/SIGTERM sets it; a second stops at once
    with stop_handlers(stop, lambda: "finishing this batch of prompts and keeping what it sampled so far"):
        try:
            kept, stats = sampling.rejection_sample(model, tok, rows, cfg, progress=cfg.progress_bar,
                                                    should_stop=lambda: stop._stop_requested, resume_from=earlier,
                                                    on_batch=log.append)
        except Exception as e:
            # a reward function that raised mid-way (a judge down): the error alone did not say the batches
            # before it are kept, and the next run without --resume refused to start over them
            if log.holds_batches:   # not a file of another sampling that --resume set aside
                print(f"r1fast sample: the batches of prompts sampled before the error below are kept in "
                      f"{progress_file}; {_continue_with('sample', args.rest, e)}",
                      file=sys.stderr, flush=True)
            raise
    if "next_prompt" in stats:   # stopped after a batch of prompts, which log.append kept
        print(f"\nr1fast: {log.stopped(kept, stats, 'sampling')}", flush=True)
        if cfg.dataset == STDIN_DATASET:   # other prompts piped in are another sampling, which starts over
            print("r1fast: its prompts came from standard input: pipe the same ones to the command below", flush=True)
        raise KeyboardInterrupt   # _guarded says how to continue
    sampling.finish_samples(kept, out, progress_file,
                            record={"fingerprint": fingerprint, "stats": stats, "options": cfg.to_json_dict()})
    print(f"{sampling.summary(stats)} → {out} (statistics in {sampling.stats_path(out)})")
    return 0


# dataset=- : `r1fast sample` reads its prompts from standard input, as Unix tools read a file named "-"
STDIN_DATASET = "-"
_STDIN_SOURCE = "<stdin>"   # what a bad row's error names as its file: "row 2 ('<stdin>' line 3)"
_STDIN_EXAMPLE = ("e.g. r1fast sample model_name_or_path=M dataset=- output_file=kept.jsonl < prompts.jsonl, or "
                  "jq -c '{prompt: .question, answer}' data.jsonl | r1fast sample ... dataset=-")


def _stdin_dataset_as_text(rest: list[str]) -> list[str]:
    """`rest` with a `dataset=-` (`--dataset=-`, `--dataset -`) quoted: the overrides are YAML, which reads a lone -
    as a list ([None]), and dataset: [None] was refused as no text."""
    out = list(rest)
    for i, arg in enumerate(out):
        if arg in ("dataset=-", "--dataset=-"):
            out[i] = arg[:-1] + "'-'"
        elif arg == "-" and i > 0 and out[i - 1] == "--dataset":
            out[i] = "'-'"
    return out


def _stdin_rows(prompt_column: str, split) -> list[dict]:
    """dataset=- : the prompts piped to the command, JSON lines as a .jsonl dataset holds them, read (and refused)
    as load_rows reads one; each row knows its line, which a bad row's error names."""
    import tempfile

    from r1fast.data.loading import FileRows, check_columns, read_json_objects, same_columns

    what = f"dataset {STDIN_DATASET!r} (standard input)"
    if split not in (None, "train"):   # as a file's: one set of rows
        raise ConfigError(f"{what} has no splits, so dataset_split {split!r} cannot be taken from it; leave it out")
    stdin = sys.stdin
    if stdin is None or stdin.closed:
        raise ConfigError(f"{what}: this command has no standard input (it was closed); pipe the prompts to it, "
                          f"{_STDIN_EXAMPLE}")
    if stdin.isatty():   # nothing piped: reading would wait for the user to type JSON lines and Ctrl-D
        raise ConfigError(f"{what} is the terminal: nothing was piped in. Pipe the prompts to it, one JSON object a "
                          f"line with its {prompt_column!r}, {_STDIN_EXAMPLE}")
    data = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode("utf-8")
    if not data.strip():
        held = "blank lines alone" if data else "0 bytes"
        raise ConfigError(f"{what} is empty: no prompt was piped in ({held}); pipe one JSON object a line with its "
                          f"{prompt_column!r}, {_STDIN_EXAMPLE}")
    # read_json_objects reads a file (and reads it again to find a line that is not UTF-8): the same rows, the same
    # errors as a .jsonl dataset's
    fd, path = tempfile.mkstemp(suffix=".jsonl", prefix="r1fast-stdin-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        lines: list[int] = []
        rows = read_json_objects(path, what, lines=lines)
    finally:
        os.remove(path)
    if not rows:   # a byte-order mark and blank lines alone (utf-8-sig skips the mark)
        raise ConfigError(f"{what} holds no JSON object; pipe one a line with its {prompt_column!r}")
    rows = FileRows(same_columns(rows), _STDIN_SOURCE, lines)
    check_columns(rows, (prompt_column,), "dataset", {prompt_column: "prompt_column"})
    return rows


def _sample_already_complete(out: str, progress_file: str, fingerprint: str) -> bool:
    """--resume: whether `out` is the whole output of this sampling (its record says so, and it is unchanged
    since), said; else says why it samples from the first prompt when no stopped run's progress is there."""
    from r1fast.trainer import sampling

    record, why = sampling.finished_output(out, fingerprint)
    if record is not None:
        if sampling.progress_fingerprint(progress_file) == fingerprint:
            if os.path.getmtime(progress_file) > os.path.getmtime(sampling.stats_path(out)):
                # a later run of this sampling (run again without --resume: a model folder retrained since), stopped:
                # its progress continues, as it did before outputs had records
                return False
            os.remove(progress_file)   # the finished run was killed before removing it: the output holds its rows
        print(f"r1fast: --resume: sampling already complete: {record['rows']} rows in {out}; nothing to sample\n"
              f"{sampling.summary(record['stats'])} → {out} (statistics in {sampling.stats_path(out)})", flush=True)
        return True
    if not os.path.exists(progress_file):
        why = why or f"no stopped run of {out} ({progress_file} does not exist)"
        print(f"r1fast: --resume: {why}: sampling from the first prompt", file=sys.stderr, flush=True)
    return False


def _check_sample_output(out: str, progress_file: str, resume, rest: list[str], dataset):
    """Found before the data is read and the model loads: an output folder that cannot be written (the rows were
    lost at the end), a --resume PATH, and a new run over a stopped one's progress (which it would lose)."""
    import shlex

    from r1fast.trainer.sampling import check_output_file, record_name_overflow, stats_path

    if resume and not resume_is_bare(resume):
        raise ConfigError(f"sample's --resume takes no path ({resume!r}): it continues the stopped run whose "
                          f"output_file is given, from {progress_file}")
    check_output_file(out, read=[(dataset, "the dataset")])
    overflow = record_name_overflow(out)
    if overflow:
        raise ConfigError(f"output_file {out!r}: {overflow}; give a shorter output_file")
    record = stats_path(out)
    if os.path.lexists(record) and not os.path.isfile(record):   # its write failed once every prompt was sampled
        raise ConfigError(f"{record}, where r1fast sample records its output and statistics, is not a regular file; "
                          f"remove it or give another output_file")
    if not resume and os.path.exists(progress_file):
        again = shlex.join(["r1fast", "sample", *rest])
        raise ConfigError(f"{progress_file} holds what a stopped run kept for {out}. Type\n"
                          f"  {again} --resume    to continue it\n"
                          f"  rm {shlex.quote(progress_file)}    to sample from the first prompt")


def _cmd_pipeline(args):
    from r1fast.trainer.pipeline import run_pipeline

    config, overrides, resume = _split(args.rest)
    if config is None:
        # it named r1fast/configs/r1_pipeline.yaml, a path that exists only in a checkout, and said "pipeline needs"
        # after "r1fast pipeline: "; the shipped pipelines run by name from any directory
        shipped = _shipped_pipelines()
        # the example is one of the names listed (written out, it outlived a rename): the full R1 run where shipped
        example = "r1_pipeline" if "r1_pipeline" in shipped else shipped[0]
        raise ConfigError(f"give a pipeline YAML (its stages: see docs/training.md), or one r1fast ships, by name: "
                          f"{', '.join(shipped)}; e.g. r1fast pipeline {example}")
    resume, overrides = _resume_pipeline(resume, overrides)
    run_pipeline(config, overrides, resume=resume)
    return 0


def _shipped_pipelines() -> list[str]:
    """The names of the pipeline YAMLs in r1fast/configs (the others there are single runs' configs)."""
    from r1fast.trainer.config import PACKAGED_CONFIGS, packaged_config_names
    from r1fast.trainer.pipeline import is_pipeline_file

    return [name for name in packaged_config_names()
            if is_pipeline_file(os.path.join(PACKAGED_CONFIGS, name + ".yaml"))]


def _cmd_plot(args):
    from r1fast.trainer.plot import plot_run

    # a leading ~ is the home folder, as in the options that name a path (config.PATH_OPTIONS): the shell leaves the
    # one of `--out=~/plots/run.png` as typed, and r1fast plot made a folder named "~" in the working directory
    args.run_dir = os.path.expanduser(args.run_dir)
    args.out = args.out and os.path.expanduser(args.out)
    # a mistyped folder was "no metrics.jsonl in 'runs/defualt'", as if the folder were there and empty
    if not os.path.exists(args.run_dir):
        raise ConfigError(f"{args.run_dir!r} does not exist; give a run folder: the output_dir of r1fast train, sft "
                          f"or pipeline (the embedded default's is runs/default)")
    if os.path.isfile(args.run_dir):   # its metrics.jsonl: "[Errno 17] File exists", making RUN_DIR/curves.png's folder
        raise ConfigError(f"{args.run_dir!r} is a file; give the run folder that holds it: "
                          f"r1fast plot {os.path.dirname(args.run_dir) or '.'}")
    path = plot_run(args.run_dir, args.out)
    print(f"wrote {path}")
    return 0


def _with_help(parser, func, epilog):
    def run(args):
        if any(a in ("-h", "--help") for a in args.rest):
            # built here, not with the parser: the config classes import torch, seconds every `r1fast` call paid
            parser.epilog = epilog()
            parser.print_help()
            return 0
        return func(args)
    return run


def add_commands(subparsers):
    def add(name, help_, func, usage):
        # "--key value" overrides are free-form, so argparse must not read "-" as an option prefix
        # here; -h/--help is handled by _with_help.
        p = subparsers.add_parser(name, help=help_, description=help_, usage=usage, formatter_class=_Paragraphs,
                                  prefix_chars="+", add_help=False)
        p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
        p.set_defaults(func=_with_help(p, _guarded(name, func, resumable=name in _RESUME),
                                       lambda: _EPILOGS[name]() + "\n\n" + _RESUME[name]))
        return p

    add("train", "GRPO training; with no arguments, the embedded default (a tiny built-in model, cold-start SFT "
                 "then GRPO: minutes on a CPU, on the GPU when there is one); "
                 "without CONFIG.yaml, model_name_or_path=... dataset=... is a GRPO run from GRPOConfig's defaults",
        _cmd_train, "r1fast train [CONFIG.yaml] [--resume [PATH]] [--key value ...]")
    add("sft", "supervised fine-tuning: cold start, rejection-sampled data, distillation",
        _cmd_sft, "r1fast sft [CONFIG.yaml] [--resume [PATH]] [--key value ...]")
    add("sample", "rejection sampling: n samples per prompt, keep those passing the reward thresholds, write JSONL",
        _cmd_sample, "r1fast sample [CONFIG.yaml] [--resume] [--key value ...]")
    add("pipeline", "multi-stage run: cold start -> RL -> rejection sampling + SFT -> RL, distillation",
        _cmd_pipeline, "r1fast pipeline CONFIG.yaml [--resume [RUN_DIR]] [<stage>.<key>=value ...]")
    plot_help = "PNG curves (reward, accuracy, KL, length, entropy, loss) of a run"
    plot = subparsers.add_parser("plot", help=plot_help, description=plot_help + " (a single run's or a pipeline's)")
    plot.add_argument("run_dir", help="a run folder holding metrics.jsonl")
    plot.add_argument("--out", default=None, help="image path, its extension the format: .png, .svg, .pdf, ... "
                                                     "(default RUN_DIR/curves.png)")
    plot.set_defaults(func=_guarded("plot", _cmd_plot, resumable=False))
