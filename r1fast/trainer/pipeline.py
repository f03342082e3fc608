"""Multi-stage runs from one YAML: DeepSeek-R1's cold start → RL → rejection sampling + SFT → RL, and
teacher → student distillation. `r1fast train` with no arguments runs configs/default.yaml.

    name: default                 # run folder: ./runs/<name> unless output_dir is given
    seed: 0
    model: builtin:tiny           # or a local Hugging Face folder
    eval_dataset: builtin:arithmetic
    stages:
      - {name: cold_start, type: sft,    dataset: "builtin:arithmetic?teacher_noise=0.25", config: {...}}
      - {name: rl,         type: grpo,   dataset: builtin:arithmetic, config: {...}}
      - {name: rejection,  type: sample, dataset: builtin:arithmetic, config: {...}}
      - {name: sft2,       type: sft,    dataset: "@rejection", config: {...}}
      - {name: student,    type: sft,    model: builtin:tiny, dataset: "@rejection"}   # distillation

A stage trains the previous stage's model unless it names its own `model` (a path, builtin:<size>,
or "@stage" for that stage's result). "@stage" as a dataset is what a sample stage kept. Each stage
writes into <run>/<stage>/; <run>/metrics.jsonl gathers every stage's metrics and the held-out
accuracy after each training stage; <run>/summary.json has the table printed at the end (rewritten as each stage
finishes, a stage not finished yet "pending").
`--resume` skips finished stages and resumes the unfinished one from its last checkpoint; rerun_from=<stage> runs
that stage and the later ones again, keeping the earlier ones as --resume does (their old outputs set aside).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from r1fast._umask import fsync_dir
from r1fast.data.loading import hub_name_hint, load_rows
from r1fast.data.tasks import MAX_BUILTIN_ROWS
from r1fast.models.checkpoint import missing_model_hint
from r1fast.trainer.config import (
    DTYPES,
    ConfigError,
    DatasetAsConfig,
    GRPOConfig,
    SampleConfig,
    SFTConfig,
    check_device,
    check_regex,
    check_template_kwargs,
    coerce,
    check_run_folder,
    expand_home,
    is_folder_name,
    load_yaml,
    option_names,
    parse_overrides,
)
from r1fast.trainer.evaluate import check_eval_answers, describe_eval, k_sample_scores
from r1fast.trainer.metrics import k_sample_names, replacing
from r1fast.trainer.sampling import SAMPLE_PROGRESS, check_output_file
from r1fast.trainer.sampling import summary as sample_summary

STAGE_TYPES = {"sft": SFTConfig, "grpo": GRPOConfig, "sample": SampleConfig}
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "default.yaml")
TOP_KEYS = {"name", "seed", "output_dir", "model", "device", "dtype", "eval_dataset", "eval_size",
             "eval_samples_per_prompt", "eval_temperature", "eval_max_tokens", "eval_system_prompt",
             "eval_format_pattern", "eval_chat_template_kwargs", "eval_stop_tokens", "stages", "progress_bar",
             "description", "num_threads", "overwrite_output_dir", "rerun_from"}
STAGE_FIELDS = ("model", "dataset", "num_rows", "evaluate")
_STAGE_KEYS = {"name", "type", "config", *STAGE_FIELDS}
# Config options a pipeline sets for its stages itself: in a stage's config they would be ignored.
_SUPPLIED = {"model_name_or_path": "the stage's own 'model:' key, beside 'config:' ({stage}.model=... on the command "
                                   "line); by default a stage trains the previous stage's model",
             "dataset": "the stage's own 'dataset:' key, beside 'config:' ({stage}.dataset=... on the command line)",
             "output_dir": "the pipeline's output_dir (a stage writes into <output_dir>/{stage})",
             "overwrite_output_dir": "the pipeline's overwrite_output_dir"}
# A finished stage's output that a resumed run needs but no longer finds (a finished stage never runs again)
_GONE = "restore it, or start the run over with overwrite_output_dir=true"
# pipeline_state.json's "format". Files without one hold a finished stage's checkpoint and samples paths in one
# of two unmarked ways: as given (relative ones to the directory the run was started in; r1fast before the run
# folder recorded them relative to itself), or relative to the run folder when inside it and else as given.
# 2: relative to the run folder when inside it, else absolute. PipelineRunner._read_state reads all three.
STATE_FORMAT = 2
# what a first Ctrl-C/SIGTERM outside a stage's evaluation or sampling (a trainer has its own handler) waits for
_BETWEEN_STAGES = "stopping before the next stage trains or samples"
# A GRPO stage's evaluations at its eval_steps default to the pipeline's held-out settings.
# rerun_from's set-aside of the earlier run's outputs, in the run folder while its renames are done: {"r1fast_rerun": 1,
# "stages": the stages whose records pipeline_state.json drops, "moves": [[path, path + ".old-<n>"], ...] (relative to
# the run folder when inside it)}. A run killed part way leaves it, and the next run in the folder finishes it first.
RERUN_JOURNAL = ".r1fast-rerun.json"
_EVAL_DEFAULTS = ("eval_size", "eval_samples_per_prompt", "eval_temperature")
# The files a pipeline run keeps in its folder beside the stages' folders (`r1fast plot`'s curves.png; the lock is
# checkpoints.LOCK_FILE, named here to keep torch out of loading a pipeline): no stage may be named as one of them
RUN_FOLDER_FILES = ("pipeline_state.json", "summary.json", "metrics.jsonl", "curves.png", ".r1fast.lock",
                    RERUN_JOURNAL)


@dataclass
class Stage:
    name: str
    type: str
    config: Any
    model: Optional[str] = None
    dataset: Optional[str] = None
    num_rows: int = 2000
    evaluate: bool = True


@dataclass
class Pipeline:
    name: str = "run"
    seed: int = 0
    output_dir: Optional[str] = None
    model: Optional[str] = None
    device: Optional[str] = None
    dtype: str = "float32"
    eval_dataset: Optional[str] = None
    eval_size: int = 128
    eval_samples_per_prompt: int = 4
    eval_temperature: float = 1.0
    eval_max_tokens: int = 64
    eval_system_prompt: Optional[str] = None    # for a model trained with one: the held-out prompts get it too
    eval_format_pattern: Optional[str] = None   # what eval/format counts as well formed (the format reward's default)
    # the held-out prompts' apply_chat_template keywords (Qwen3's enable_thinking), as the stages' chat_template_kwargs
    eval_chat_template_kwargs: Optional[dict[str, Any]] = None
    eval_stop_tokens: Optional[list[str]] = None   # tokens the held-out completions also stop at, as stop_tokens
    progress_bar: bool = True
    num_threads: Optional[int] = None    # torch CPU threads (1 avoids stalls on a busy small CPU)
    overwrite_output_dir: bool = False   # a new run into a folder holding an earlier one: delete it first
    # the stage the run folder's earlier run is run again from: the stages before it are kept as --resume keeps them,
    # this one and those after it run afresh, their earlier outputs set aside (PipelineRunner._set_aside_for_rerun)
    rerun_from: Optional[str] = None
    stages: list[Stage] = field(default_factory=list)

    @property
    def run_dir(self) -> str:
        # absolute: a run started with a relative output_dir resumes from any directory
        return os.path.abspath(self.output_dir) if self.output_dir else os.path.join(os.getcwd(), "runs", self.name)


def is_pipeline_file(path: str) -> bool:
    return "stages" in load_yaml(path)


def _load_pipeline_yaml(path) -> dict:
    try:
        return load_yaml(path)
    except DatasetAsConfig as e:
        # load_yaml's advice is a single run's (dataset=PATH), a key a pipeline refuses: its stages take datasets
        data = shlex.quote(e.path)
        raise ConfigError(f"{e.path} is a dataset, not a pipeline YAML: give it to a stage, after the pipeline, as "
                          f"<stage>.dataset={data} (e.g. r1fast pipeline default grpo.dataset={data})") from None


def load_pipeline(source: str | dict, overrides: Optional[list[str]] = None) -> Pipeline:
    data = _load_pipeline_yaml(source) if isinstance(source, (str, os.PathLike)) else dict(source)
    where = str(source) if isinstance(source, (str, os.PathLike)) else "pipeline"
    ov = parse_overrides(overrides or [])
    # "stage.key=value" sets a stage's option; other keys are pipeline keys
    stage_ov: dict[str, dict] = {}
    stage_typed: dict[str, dict[str, str]] = {}   # stage -> its options' keys as typed (`grpo.run-name`)
    top_ov: dict[str, Any] = {}
    for k, v in ov.items():
        if "." in k:
            st, key = k.rsplit(".", 1)   # options have no dot; a stage's name may (v1.5)
            stage_ov.setdefault(st, {})[key] = v
            stage_typed.setdefault(st, {})[key] = ov.typed_keys[k]
        else:
            top_ov[k] = v
    # an error in what the command line set names the command line, as a single run's does: it named the
    # file, and `r1fast train cold_start.max_stpes=1` sent the reader to r1fast's own default.yaml
    typed = "command line"
    # the file's unknown keys first, naming the file; the command line's alone name the command line (one list
    # of both under the file's name sent the reader to look there for what they had typed)
    for given, at in ((data, where), (top_ov, typed)):
        keys = set(given) - TOP_KEYS
        if keys and given is data and "stages" not in data and isinstance(source, (str, os.PathLike)):
            _refuse_single_run_config(keys, where)
        if keys:
            # the value as given there, the stages the run will have: the command line's replace the file's
            hints = _stage_option_hints(keys, {**given, "stages": top_ov.get("stages", data.get("stages"))})
            raise ConfigError(f"{at}: unknown pipeline key(s) {sorted(keys, key=str)}{hints}; "
                              f"known: {sorted(TOP_KEYS)} (set a stage's option with <stage>.<option>=value)")
    # the command line's stages replace the file's (kept apart with the other pipeline keys, they were dropped)
    stages_raw = data.pop("stages", None)
    stages_at = typed if "stages" in top_ov else where
    stages_raw = top_ov.pop("stages", stages_raw)
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError(f"{stages_at}: 'stages' must be a non-empty list")
    data.pop("description", None)
    top_ov.pop("description", None)   # a note, as in the file (Pipeline has no such field: a KeyError)
    def pipeline_check(options: dict):
        return lambda: _validate(Pipeline(**_typed(Pipeline, options, where)), where, len(stages_raw))

    src = typed if top_ov and _brought_in(pipeline_check(data), pipeline_check({**data, **top_ov})) else where
    p = Pipeline(**_typed(Pipeline, {**data, **top_ov}, src))
    _validate(p, src, len(stages_raw))
    # stages typed on the command line are its own: their errors name it, not the file whose stages they replace
    names = set()
    # the keys the command line set, for the checks of the whole pipeline below (_check_stages): None -> the pipeline's
    # keys, a stage's name -> its own keys and options ("*": all of them, the stages being typed there)
    typed_keys: dict[Optional[str], set] = {None: set(top_ov)}
    for i, raw in enumerate(stages_raw):
        if not isinstance(raw, dict):
            raise ConfigError(f"{stages_at}: stage {i} must be a mapping")
        bad = set(raw) - _STAGE_KEYS
        if bad:
            raise ConfigError(f"{stages_at}: stage {i}: unknown key(s) {sorted(bad, key=str)}; "
                              f"known: {sorted(_STAGE_KEYS)}")
        # absent or null: a default; anything else given is checked (`name: 0` or `config: false` was taken as absent)
        name = f"stage{i}" if raw.get("name") is None else _as_written(raw["name"])
        _check_stage_name(name, i, names, stages_at)
        typ = raw.get("type")
        _check_stage_type(typ, name, stages_at)
        ov = stage_ov.pop(name, {})
        typed_keys[name] = {"*"} if stages_at == typed else set(ov)
        typed_at = f"{typed}: stage {name!r}"
        # a stage's key or option as the command line sets it, which an error's quoting shows: `grpo.model=no` was
        # told to write model="'word'", which sets the pipeline's model
        as_typed = {key: f"{name}.{key}" for key in [*STAGE_FIELDS, *STAGE_TYPES[typ].field_names()]}
        as_typed.update(stage_typed.get(name, {}))
        # <stage>.model / dataset / num_rows / evaluate on the command line set the stage's own keys
        own_ov = {k: v for k, v in ov.items() if k in STAGE_FIELDS}
        fields = {**_typed(Stage, {k: v for k, v in raw.items() if k in STAGE_FIELDS and k not in own_ov},
                           f"{stages_at}: stage {name!r}", as_typed),
                  **_typed(Stage, own_ov, typed_at, as_typed)}
        _check_num_rows(fields, typed_at if "num_rows" in own_ov else f"{stages_at}: stage {name!r}")
        if not fields.get("dataset"):   # found here, not once the stages before it have trained
            raise ConfigError(f"{typed if 'dataset' in own_ov else stages_at}: stage {name!r} needs a dataset (a path, "
                              f"builtin:<task> or \"@stage\")")
        if not isinstance({} if raw.get("config") is None else raw["config"], dict):
            raise ConfigError(f"{stages_at}: stage {name!r}: 'config' must be a mapping of {STAGE_TYPES[typ].__name__} "
                              f"options; got {raw['config']!r:.80}")
        at = f"{stages_at}: stage {name!r}"
        # under the names the config reads them by: `output-dir: x` slipped past the refusal of options a pipeline
        # sets itself, and a GRPO stage's `eval-size: 8` was replaced by the pipeline's eval_size set beside it
        conf = option_names(raw.get("config") or {}, at)
        conf_ov = {k: v for k, v in ov.items() if k not in STAGE_FIELDS}
        for key in {**conf, **conf_ov}:
            if key in _SUPPLIED:
                raise ConfigError(f"{at if key in conf else typed_at}: option {key!r} is not read in a pipeline; set "
                                  f"{_SUPPLIED[key].format(stage=name)}")
            _check_not_a_stage_key(key, STAGE_TYPES[typ], name, at if key in conf else typed_at, typed=key not in conf)
        conf.setdefault("seed", p.seed + i)
        if typ == "grpo":
            for key in _EVAL_DEFAULTS:
                conf.setdefault(key, getattr(p, key))
        # an error the file's options alone do not have is the command line's
        src = typed_at if conf_ov and _brought_in(
            lambda: STAGE_TYPES[typ].from_dict(conf, source=at, typed_keys=as_typed),
            lambda: STAGE_TYPES[typ].from_dict({**conf, **conf_ov}, source=at, typed_keys=as_typed)) else at
        placed_at = typed_at if {"dtype", "device"} & set(conf_ov) else at
        conf.update(conf_ov)
        try:
            cfg = STAGE_TYPES[typ].from_dict(conf, source=src, typed_keys=as_typed)
        except ConfigError as e:   # validate()'s range errors name the option but not the file or stage
            raise (e if str(e).startswith(src) else ConfigError(f"{src}: {e}")) from None
        _check_placement(p, conf, placed_at)
        p.stages.append(Stage(name=name, type=typ, config=cfg, **fields))
    if stage_ov:
        names = [s.name for s in p.stages]
        raise ConfigError(f"command line: no stage named {sorted(stage_ov)}{_close_stages(stage_ov, names)}; "
                          f"stages: {names}")
    # the command line, where it emptied the pipeline's or the first stage's model (model=null)
    emptied = {_set_at(where, typed_keys, None, "model"), _set_at(where, typed_keys, p.stages[0].name, "model")} - {where}
    _check_first_model(p, emptied.pop() if emptied else where)
    _check_rerun_from(p, typed if "rerun_from" in top_ov else where,
                      typed if {"rerun_from", "overwrite_output_dir"} & set(top_ov) else where)
    _check_stages(p, where, typed_keys)
    return p


def _set_at(where: str, typed_keys: Optional[dict], stage: Optional[str], *keys: str) -> str:
    """Where a value checked after loading was set: "command line" when it set one of `keys` of `stage` (None: the
    pipeline's own keys), else `where` (the file). `r1fast train grpo.dataset=typo.jsonl` named r1fast's own
    default.yaml as the place of the missing file."""
    given = (typed_keys or {}).get(stage) or set()
    return "command line" if "*" in given or given & set(keys) else where


_SINGLE_RUN_COMMANDS = (("r1fast train", GRPOConfig), ("r1fast sft", SFTConfig), ("r1fast sample", SampleConfig))


def _refuse_single_run_config(keys: set, where: str):
    """A file with no stages whose keys are a single run's options (`r1fast pipeline grpo_example.yaml`) is a single
    run's config given to the wrong command: its options were listed, one by one, as unknown pipeline keys."""
    options = {str(k).replace("-", "_") for k in keys}
    fits = [command for command, cls in _SINGLE_RUN_COMMANDS if options <= set(cls.field_names())]
    if fits:
        use = " or ".join(f"`{command} {where}`" for command in fits)
    elif options & {name for _, cls in _SINGLE_RUN_COMMANDS for name in cls.field_names()}:
        use = f"`r1fast train {where}` (or `r1fast sft {where}`)"
    else:
        return   # not a config at all: the unknown keys are the news
    raise ConfigError(f"{where} has no 'stages': this is a single-run config, not a pipeline; use {use}")


def _as_written(name):
    """A stage's name as the YAML file wrote it: a number keeps its text there (config._keep_text), which names the
    folder (`name: 2024` was "'name' must be a folder name; got 2024", `name: 0100` "got 64")."""
    if isinstance(name, (int, float)) and not isinstance(name, bool) and isinstance(getattr(name, "text", None), str):
        return name.text
    return name


def _check_stage_name(name, index: int, names: set, where: str):
    """A stage's name names its folder <run>/<name>/: one folder, none of the run folder's files, and no other
    stage's (`names`, to which it is added)."""
    if isinstance(name, bool):   # `name: on` said "must be a folder name; got True", a name the user never wrote
        raise ConfigError(f"{where}: stage {index}: 'name' is the boolean {name}: YAML reads an unquoted yes, no, on, "
                          f"off, true or false as a boolean; to name the stage with the word, quote it (name: 'word')")
    if not is_folder_name(name):
        # '..' wrote (and overwrite_output_dir cleared) the run's parent
        raise ConfigError(f"{where}: stage {index}: 'name' must be a folder name (the stage writes into "
                          f"<run>/<name>/); got {name!r}")
    if name in RUN_FOLDER_FILES:
        # its folder took the file's place: the run failed once the stage had trained ("Is a directory")
        raise ConfigError(f"{where}: stage {index}: 'name' {name!r} is a file the run keeps in its folder beside "
                          f"the stages' folders; name the stage otherwise")
    if name in names:
        raise ConfigError(f"{where}: two stages are named {name!r}")
    names.add(name)


def _check_stage_type(typ, name: str, where: str):
    if not isinstance(typ, str) or typ not in STAGE_TYPES:   # a list or mapping: "unhashable type", a traceback
        raise ConfigError(f"{where}: stage {name!r}: type must be one of {sorted(STAGE_TYPES)}; got {typ!r}")


def _check_stage_list(p: Pipeline, where: str):
    """What load_pipeline checks of each stage as it reads one, again for a Pipeline edited in Python since
    (run_pipeline(p)): a stage renamed '..' trained into the run folder's parent and two of one name into one
    folder; a type without its config, no dataset or an option set out of range failed with an AttributeError or
    the trainer's error once the stages before it had trained."""
    if not p.stages:
        raise ConfigError(f"{where}: 'stages' must be a non-empty list")
    names: set = set()
    for i, stage in enumerate(p.stages):
        _check_stage_name(stage.name, i, names, where)
        _check_stage_type(stage.type, stage.name, where)
        at = f"{where}: stage {stage.name!r}"
        # the types a file's values are read as (num_rows "8" is 8), as validate() does for the options
        for key, value in _typed(Stage, {key: getattr(stage, key) for key in STAGE_FIELDS}, at).items():
            setattr(stage, key, value)
        config_cls = STAGE_TYPES[stage.type]
        if not isinstance(stage.config, config_cls):
            raise ConfigError(f"{at}: a {stage.type} stage's config is a {config_cls.__name__}; got "
                              f"{type(stage.config).__name__}")
        if not isinstance(stage.dataset, str) or not stage.dataset:
            raise ConfigError(f"{at} needs a dataset (a path, builtin:<task> or \"@stage\"); got {stage.dataset!r}")
        _check_num_rows({"num_rows": stage.num_rows, "dataset": stage.dataset}, at)
        for key, place in _SUPPLIED.items():   # set on the config in Python: ignored, or (overwrite) clearing the stage
            if getattr(stage.config, key, None) not in (None, False):
                raise ConfigError(f"{at}: option {key!r} is not read in a pipeline; set "
                                  f"{place.format(stage=stage.name)}")
        try:
            stage.config.validate()
        except ConfigError as e:   # validate()'s range errors name the option but not the stage
            raise ConfigError(f"{at}: {e}") from None
    _check_first_model(p, where)


def _check_first_model(p: Pipeline, where: str):
    """The first stage has a model to train or sample: its own, else the pipeline's (each later stage without
    one takes the model the stage before it finished with)."""
    if not p.model and not p.stages[0].model:
        raise ConfigError(f"{where}: no model for stage {p.stages[0].name!r}; set the pipeline's 'model' or the "
                          f"stage's")


def _close_stages(unknown: dict[str, dict], names: list[str]) -> str:
    """"; did you mean 'grpo' (grpo.max_steps=...)?" for each overridden stage not in `names` that is close to one
    of them (a misspelt option is shown its close one; a misspelt stage was shown only the list)."""
    import difflib

    hints = []
    for stage in sorted(unknown):
        if close := difflib.get_close_matches(stage, names, n=1):
            hints.append(f"; did you mean {close[0]!r} ({close[0]}.{next(iter(unknown[stage]))}=...)?")
    return "".join(hints)


def _check_rerun_from(p: Pipeline, where: str, both_where: Optional[str] = None):
    """rerun_from names one of the stages, found before any stage runs; and keeps the stages before it, which
    overwrite_output_dir would delete first (`both_where`: where the two were set, if not `where`)."""
    if p.rerun_from is None:
        return
    names = [s.name for s in p.stages]
    if p.rerun_from not in names:
        raise ConfigError(f"{where}: rerun_from {p.rerun_from!r} is not a stage of this pipeline; its stages: "
                          f"{', '.join(names)}")
    if p.overwrite_output_dir:
        raise ConfigError(f"{both_where or where}: rerun_from={p.rerun_from} keeps the stages before {p.rerun_from!r} from the "
                          f"earlier run, and overwrite_output_dir=true deletes that run first: give one of them")


def _check_not_a_stage_key(key: str, config_cls, stage: str, where: str, typed: bool = False):
    """An unknown option close to one of the stage's own keys (model, dataset, num_rows, evaluate) is that key
    misspelt, or written inside 'config:': the config's own close matches sent `grpo.modle=...` to tis_mode.
    `typed`: the key was set on the command line (<stage>.<key>=...)."""
    import difflib

    fields = config_cls.field_names()
    if key in _STAGE_KEYS - set(STAGE_FIELDS) and key not in fields:
        # `grpo.type=sft` or a config's `type: sft` was "unknown option 'type' for GRPOConfig; did you mean dtype?"
        if not typed:
            how = f"{key!r} is the stage's own key: write it beside 'config:', not inside it"
        elif key == "config":
            how = (f"'config' holds the stage's options in a pipeline file; on the command line set each, "
                   f"{stage}.<option>=...")
        else:
            how = (f"{key!r} is the stage's own key, set in the pipeline file (the command line sets a stage's options "
                   f"and its {', '.join(STAGE_FIELDS)})")
        raise ConfigError(f"{where}: unknown option {key!r} for {config_cls.__name__}; {how}")
    # str(): a YAML key may be a number (`1: 2`), which difflib cannot compare (a TypeError traceback)
    own = difflib.get_close_matches(str(key), [*STAGE_FIELDS, *fields], n=1)   # closer to a stage key than to an option
    if own and own[0] in STAGE_FIELDS and key not in fields:
        raise ConfigError(f"{where}: unknown option {key!r} for {config_cls.__name__}; did you mean the stage's own key "
                          f"{own[0]!r} (beside 'config:' in a pipeline file, {stage}.{own[0]}=... on the command line)?")


def _check_num_rows(fields: dict, where: str):
    """num_rows, found now rather than when the stage starts. It is how many rows a builtin: task draws, capped
    there; a file's or "@stage" rows are read whole, so the cap is not theirs (a file stage with a larger
    num_rows was refused for a value it never reads)."""
    n = fields.get("num_rows", 1)
    if str(fields.get("dataset") or "").startswith("builtin:"):
        if not 1 <= n <= MAX_BUILTIN_ROWS:
            raise ConfigError(f"{where}: num_rows must be in [1, {MAX_BUILTIN_ROWS:,}]; got {n}")
    elif n < 1:
        raise ConfigError(f"{where}: num_rows must be >= 1; got {n}")


def _brought_in(own, merged) -> bool:
    """Whether the command line's overrides brought in the error the merged options raise (`merged()`), to name
    it "command line" rather than the file: the file's options alone (`own()`) pass, or raise another error. Not
    only whether they pass: a key the file gets wrong and the command line sets, wrong again, showed the typed
    value under the file's name, as did a wrong override beside a file error of another key."""
    error = _error_text(merged)
    return error is not None and _error_text(own) != error


def _error_text(check) -> Optional[str]:
    """The error `check()` raises, as text (None if it passes); silent: a warning of the file's options alone
    (cispo's epsilon_high) may be one the override mends, and the merged options' own check warns as before."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check()
    except Exception as e:   # whatever they raise, the merged options' own check raises it again
        return f"{type(e).__name__}: {e}"
    return None


def _stage_option_hints(unknown: set[str], data: dict) -> str:
    """For each unknown pipeline key that is an option of some stages (`r1fast train max_steps=3`, as a single
    run takes it), the `<stage>.<key>=value` overrides that set it; for another, a close pipeline key."""
    import difflib

    # the stages as given, before they are checked: `stages: 5` or a stage's `type: [sft]` (unhashable) raised a
    # TypeError here in place of the error this hint goes with
    given = data.get("stages") if isinstance(data.get("stages"), list) else []
    stages = [(raw.get("name") or f"stage{i}", raw.get("type")) for i, raw in enumerate(given) if isinstance(raw, dict)]
    hints = []
    for key in sorted(unknown, key=str):   # a YAML key may be a number or null (`1: 2`)
        owners = [name for name, typ in stages if isinstance(typ, str) and typ in STAGE_TYPES
                  and key in STAGE_TYPES[typ].field_names()]
        if owners:
            # as an override reads it back; default=str: YAML's own types (run_name: 2024-05-01 is a date) were a
            # TypeError in place of this error
            value = data[key] if isinstance(data[key], str) else json.dumps(data[key], default=str)
            sets = " or ".join(shlex.quote(f"{name}.{key}={value}") for name in owners)
            twin = f"eval_{key}"   # the pipeline's own evaluation between stages has a key of its own for it
            also = f" (the pipeline key {twin} sets it for the held-out evaluation between stages)" \
                if twin in TOP_KEYS else ""
            hints.append(f"{key!r} is an option of stage{'s' if len(owners) > 1 else ''} {', '.join(owners)}: "
                         f"set it for one stage with {sets}{also}")
        elif close := difflib.get_close_matches(str(key), sorted(TOP_KEYS), n=1):
            hints.append(f"for {key!r}, did you mean {close[0]!r}")
    return "".join(f"; {h}" for h in hints)


def _check_stages(p: Pipeline, where: str, typed_keys: Optional[dict[Optional[str], set]] = None):
    """What a stage would otherwise find wrong only when it starts, after the stages before it have
    trained: its "@stage" references, models and datasets (its config's validate() has checked its
    options, reward functions included). `typed_keys`: what the command line set (see _set_at), named as
    the place of an error in it."""
    names = {s.name for s in p.stages}
    earlier: dict[str, str] = {}   # stage name -> type, of the stages before this one
    written: set[str] = set()      # files that earlier sample stages write
    samplers: dict[str, Any] = {}  # sample stage name -> its config
    rewritten: dict[str, str] = {}  # sample stage -> the later sample stage that writes its output_file again
    # (path, what) of the data read before a sample stage writes its output_file, which must not replace them
    read: list[tuple[Any, str]] = [(p.eval_dataset, "the pipeline's eval_dataset")]
    _check_dataset(p.eval_dataset, f"{_set_at(where, typed_keys, None, 'eval_dataset')}: eval_dataset", written)
    _check_model(p.model, f"{_set_at(where, typed_keys, None, 'model')}: model")
    for s in p.stages:
        def stage_at(*keys: str) -> str:
            return f"{_set_at(where, typed_keys, s.name, *keys)}: stage {s.name!r}"

        for ref, role in ((s.model, "model"), (s.dataset, "dataset")):
            if not (isinstance(ref, str) and ref.startswith("@")):
                continue
            at = stage_at(role)
            src = ref[1:]
            if src not in names:
                raise ConfigError(f"{at} refers to unknown stage {ref!r}")
            if src not in earlier:
                raise ConfigError(f"{at}: {role} {ref!r} names a stage that runs after it (or itself)")
            if role == "model" and earlier[src] == "sample":
                raise ConfigError(f"{at}: model {ref!r} is a sample stage, which trains no model")
            if role == "dataset" and earlier[src] != "sample":
                raise ConfigError(f"{at}: dataset {ref!r} is a {earlier[src]} stage; \"@stage\" data is what a "
                                  f"sample stage kept")
            if role == "dataset" and src in rewritten:
                # read from memory on the first run, but from the file on --resume: the later stage's samples
                raise ConfigError(f"{at}: dataset {ref!r} is read back from {samplers[src].output_file!r} on "
                                  f"--resume, which stage {rewritten[src]!r} writes again before this stage: it "
                                  f"would then train on that stage's samples; read '@{rewritten[src]}', or give "
                                  f"one of them another output_file")
            if role == "dataset":
                at = stage_at("dataset", "prompt_column", "completion_column")
                if _set_at(where, typed_keys, src, "prompt_column") != where:   # the source stage's, typed
                    at = f"command line: stage {s.name!r}"
                _check_sample_columns(s, samplers[src], at, ref)
        if not str(s.model or "").startswith("@"):
            _check_model(s.model, f"{stage_at('model')}: model")
        if not s.dataset.startswith("@"):
            _check_dataset(s.dataset, f"{stage_at('dataset')}: dataset", written)
            _check_builtin_split(s.dataset, getattr(s.config, "dataset_split", None),
                                 f"{stage_at('dataset', 'dataset_split')}: dataset")
        cfg = s.config
        if s.type == "grpo":
            at = stage_at("eval_dataset", "eval_steps")
            if cfg.eval_dataset is not None and not cfg.eval_steps:
                raise ConfigError(f"{at}: eval_dataset is used at eval_steps, which is 0; set eval_steps (the "
                                  f"pipeline's own eval_dataset is evaluated after every training stage)")
            _check_dataset(cfg.eval_dataset, f"{at}: eval_dataset", written)
            _check_builtin_split(cfg.eval_dataset, cfg.eval_dataset_split,
                                 f"{stage_at('eval_dataset', 'eval_dataset_split')}: eval_dataset")
        if s.type == "sample" and cfg.output_file:
            # an earlier stage's data file (its cold-start SFT rows) was replaced by the samples without a word;
            # an earlier sample stage's file is the pipeline's own, which a later round may write again (refused
            # only once it existed, a pipeline that loaded on its first run was refused on its --resume)
            made = {os.path.realpath(f) for f in written}
            users = [(spec, what) for spec, what in read
                     if not (isinstance(spec, str) and os.path.realpath(spec) in made)]
            check_output_file(cfg.output_file, f"{stage_at('output_file', 'dataset')}: output_file",
                              read=users + [(s.dataset, f"the dataset of stage {s.name!r}")])
            written.add(os.path.abspath(cfg.output_file))
            rewritten.update((name, s.name) for name, other in samplers.items() if other.output_file
                             and os.path.realpath(other.output_file) == os.path.realpath(cfg.output_file))
        read.append((s.dataset, f"the dataset of stage {s.name!r}"))
        if s.type == "grpo":
            read.append((cfg.eval_dataset, f"the eval_dataset of stage {s.name!r}"))
        if s.type == "sample":
            samplers[s.name] = cfg
        earlier[s.name] = s.type
    _check_stop_tokens(p, where, typed_keys)


def _check_stop_tokens(p: Pipeline, where: str, typed_keys: Optional[dict[Optional[str], set]] = None):
    """Each stage's stop_tokens, and the pipeline's eval_stop_tokens for each stage evaluated after, against
    the tokenizer its model will have (a folder's, or the built-in one; tokenizers only, no model loads): a
    text that is not one token failed only when its stage started (eval_stop_tokens: the first evaluated
    stage), after the stages before it had trained."""
    from r1fast.data.loading import resolve_stop_tokens
    from r1fast.trainer.common import spec_tokenizer

    spec, specs = p.model, {}   # the model spec each stage's model (and tokenizer) comes from
    tokenizers: dict[str, Any] = {}
    for s in p.stages:
        if s.model:   # "@stage": that stage's model, whose checkpoint keeps the tokenizer it was given
            spec = specs.get(s.model[1:]) if s.model.startswith("@") else s.model
        specs[s.name] = spec
        evaluated = s.type != "sample" and s.evaluate and p.eval_dataset is not None
        checks = [(getattr(s.config, "stop_tokens", None), f"{s.name}.stop_tokens", f"stage {s.name!r}",
                   _set_at(where, typed_keys, s.name, "stop_tokens")),
                  (p.eval_stop_tokens if evaluated else None, "eval_stop_tokens",
                   f"the held-out evaluation after stage {s.name!r}",
                   _set_at(where, typed_keys, None, "eval_stop_tokens"))]
        for stops, option, what, set_at in checks:
            if not stops or spec is None:
                continue
            if spec not in tokenizers:
                tokenizers[spec] = spec_tokenizer(spec)
            try:
                resolve_stop_tokens(tokenizers[spec], stops, option)
            except ValueError as e:
                raise ConfigError(f"{set_at}: {what}: {e}") from None


def _check_sample_columns(stage, source_cfg, where: str, ref: str):
    """A stage reading a sample stage's rows reads their columns: the source's prompt_column (rows keep
    the dataset's columns) and "completion". A mismatch failed only once that data existed, after the
    teacher had trained and sampled."""
    cfg, fix = stage.config, f"{stage.name}.{{}}={{}}"
    if cfg.prompt_column != source_cfg.prompt_column:
        raise ConfigError(f"{where}: dataset {ref!r} holds its prompts in column {source_cfg.prompt_column!r} (that "
                          f"stage's prompt_column), but this stage reads prompt_column {cfg.prompt_column!r}; set "
                          + fix.format("prompt_column", source_cfg.prompt_column))
    if getattr(cfg, "completion_column", "completion") != "completion":
        raise ConfigError(f"{where}: dataset {ref!r} holds its samples in column 'completion', but this stage reads "
                          f"completion_column {cfg.completion_column!r}; set " + fix.format("completion_column",
                                                                                            "completion"))


def _check_model(spec: Optional[str], where: str):
    from r1fast.trainer.common import BUILTIN_MODELS

    if spec is None:
        return
    if spec.startswith("builtin:"):
        if spec.split(":", 1)[1] not in BUILTIN_MODELS:
            raise ConfigError(f"{where}: unknown built-in model {spec!r}; choose from "
                              f"{', '.join('builtin:' + k for k in BUILTIN_MODELS)}")
    elif not os.path.isdir(spec):
        raise ConfigError(f"{where}: {spec!r} is not a folder (give a local Hugging Face checkpoint or builtin:tiny"
                          f"{missing_model_hint(spec)})")


def _check_builtin_split(spec: Optional[str], split: Optional[str], where: str):
    """A split named for a builtin: task, which load_rows refuses: said as the pipeline loads, not once the stages
    before it have run."""
    if spec is not None and spec.startswith("builtin:") and split not in (None, "train"):
        try:
            load_rows(spec, split=split, n_builtin=1)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None


def _check_dataset(spec: Optional[str], where: str, written: set[str]):
    from r1fast.data.tasks import builtin_rows

    if spec is None:
        return
    if spec.startswith("@"):   # only an eval_dataset comes here so: a stage's "@stage" dataset is checked as one
        # "does not exist (..., or "@stage" for a sample stage's rows)" offered the very form it refused
        raise ConfigError(f"{where}: {spec!r}: \"@stage\" names the rows a sample stage kept as a stage's dataset, "
                          f"not as an eval_dataset (a .jsonl/.json/.parquet/.csv file, a folder saved with datasets' "
                          f"save_to_disk, or builtin:<task>)")
    if spec.startswith("builtin:"):
        try:
            builtin_rows(spec, 1, 0)   # the task's name and parameters
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    elif not os.path.exists(spec) and os.path.abspath(spec) not in written:
        raise ConfigError(f"{where}: {spec!r} does not exist (a .jsonl/.json/.parquet/.csv file, a folder saved "
                          f"with datasets' save_to_disk, builtin:<task>, or \"@stage\" for a sample stage's rows"
                          f"{hub_name_hint(spec)})")


def _typed(cls, data: dict, where: str, typed_keys: Optional[dict[str, str]] = None) -> dict:
    """`data`'s values coerced to `cls`'s field types (a YAML or command-line string like "4" or
    "false" becomes the int or bool), or a ConfigError naming the key; a wrong type would otherwise
    surface as a TypeError deep inside a stage, after the earlier stages had trained. `typed_keys`: key -> the
    key that sets it on the command line (a stage's `grpo.model`), for the quoting an error shows."""
    import typing

    hints = typing.get_type_hints(cls)
    return {k: expand_home(k, coerce(k, v, hints[k], where, typed=(typed_keys or {}).get(k))) for k, v in data.items()}


def _validate(p: Pipeline, where: str, num_stages: int = 1):
    def check(ok: bool, msg: str):
        if not ok:
            raise ConfigError(f"{where}: {msg}")

    check(bool(p.name.strip()), "name must not be empty (it names the run folder runs/<name>)")
    # as a single run's run_name (config.check_run_name): '..' was the working directory itself, 'a/b' or an absolute
    # path a folder outside runs/
    check(bool(p.output_dir) or is_folder_name(p.name),
          f"name = {p.name!r}: with output_dir unset the run writes into runs/<name>/, so name must be a folder name "
          f"(not '.' or '..', no '/'); to write the run elsewhere, give output_dir=PATH")
    # as a stage's seed (config._check_seed), for the last stage's too; and checked even where every stage sets
    # its own: the held-out rows and evaluations are drawn with seeds made from it (seed * 1000 + 7 overflowed)
    check(0 <= p.seed <= 2**32 - num_stages, f"seed must be in [0, 2**32 - {num_stages}] (stage i runs with seed + i; "
                                             f"this pipeline has {num_stages} stage{'s' if num_stages > 1 else ''}); "
                                             f"got {p.seed}")
    check(p.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}; got {p.dtype!r}")
    check(p.eval_size >= 1, f"eval_size must be >= 1; got {p.eval_size}")
    check(p.eval_samples_per_prompt >= 1, f"eval_samples_per_prompt must be >= 1; got {p.eval_samples_per_prompt}")
    check(p.eval_temperature >= 0, f"eval_temperature must be >= 0 (0 = greedy); got {p.eval_temperature}")
    check(p.eval_max_tokens >= 1, f"eval_max_tokens must be >= 1; got {p.eval_max_tokens}")
    try:
        check_regex("eval_format_pattern", p.eval_format_pattern)
        check_template_kwargs("eval_chat_template_kwargs", p.eval_chat_template_kwargs)
    except ConfigError as e:
        check(False, str(e))
    try:
        check_device(p.device)   # its error named the option, but not the file or the command line that set it
    except ConfigError as e:
        check(False, str(e))
    check(p.num_threads is None or p.num_threads >= 1, f"num_threads must be >= 1; got {p.num_threads}")
    # as a train/sft run's: "[Errno 17] File exists" once the pipeline started, not naming the option
    check_run_folder(p.output_dir, f"{where}: output_dir")


def _check_placement(p: Pipeline, conf: dict, where: str):
    """Every stage runs on the pipeline's device and dtype (one model goes from stage to stage). A
    stage that sets another is refused here, before any stage trains: an SFT stage used to ignore
    it, and a GRPO stage to fail only once the stages before it had run."""
    from r1fast.trainer.common import resolve_device

    if conf.get("dtype") is not None and conf["dtype"] != p.dtype:
        raise ConfigError(f"{where}: dtype {conf['dtype']!r} differs from the pipeline's {p.dtype!r}; "
                          f"set the pipeline's dtype instead")
    if conf.get("device") is not None:
        import torch

        here = resolve_device(p.device)
        # parsed, not resolved: a stage's cuda on a machine without one is this same difference, and resolving it
        # raised "CUDA is not available" naming neither the stage nor the file
        if torch.device(str(conf["device"])).type != here.type:
            raise ConfigError(f"{where}: device {conf['device']!r} differs from the pipeline's ({here}); "
                              f"set the pipeline's device instead")


class PipelineRunner:
    def __init__(self, p: Pipeline):
        from r1fast.trainer.common import resolve_device

        self.p = p
        self.run_dir = p.run_dir
        self.device = resolve_device(p.device)
        self.state_path = os.path.join(self.run_dir, "pipeline_state.json")
        self.state: dict[str, Any] = {"format": STATE_FORMAT, "stages": {}}
        self.samples: dict[str, list[dict]] = {}
        self._eval_rows = None
        # set by the first Ctrl-C/SIGTERM outside a trainer's loop (whose own handler stops it at its step)
        self._stop_requested = False
        self._finishing = _BETWEEN_STAGES
        self._resume_asked = False   # run(resume=...) as given (rerun_from sets resume itself)

    # -- helpers -----------------------------------------------------------------------------------
    def eval_rows(self) -> Optional[list[dict]]:
        from r1fast.data import load_rows
        from r1fast.data.loading import EVAL_SPLITS

        if self.p.eval_dataset is None:
            return None
        if self._eval_rows is None:
            rows = load_rows(self.p.eval_dataset, n_builtin=self.p.eval_size, seed=self.p.seed * 100 + 99,
                             default_splits=EVAL_SPLITS)
            self._eval_rows = rows[:self.p.eval_size]
        return self._eval_rows

    def _check_eval_rows(self):
        """The held-out rows read before the first stage trains: a file without reference answers was an
        error only once the first stage had trained (and on every --resume after it)."""
        rows = self.eval_rows()
        if rows is None or not any(s.evaluate and s.type != "sample" for s in self.p.stages):
            return
        if not rows:
            raise ValueError(f"eval_dataset {self.p.eval_dataset!r} has no rows")
        if "prompt" not in rows[0]:
            raise ValueError(f"eval_dataset {self.p.eval_dataset!r} lacks the column 'prompt', which the held-out "
                             f"evaluation reads; it has {sorted(rows[0])}")
        check_eval_answers(rows, "answer", f"eval_dataset {self.p.eval_dataset!r}: its rows")

    def stage_eval_rows(self, stage: Stage) -> Optional[list[dict]]:
        """A GRPO stage's prompts for its evaluations at eval_steps: its own eval_dataset, else the
        pipeline's held-out prompts."""
        from r1fast.data import load_rows
        from r1fast.data.loading import EVAL_SPLITS

        cfg = stage.config
        if cfg.eval_dataset is None:
            return self.eval_rows()
        rows = load_rows(cfg.eval_dataset, split=cfg.eval_dataset_split, n_builtin=max(cfg.eval_size, 1),
                         seed=self.p.seed * 100 + 99, default_splits=EVAL_SPLITS)
        return rows[:cfg.eval_size] if cfg.eval_size else rows

    def stage_rows(self, stage: Stage, index: int, need: tuple[str, ...],
                   held_out: Optional[list[dict]] = None) -> list[dict]:
        """`held_out`: the stage's own evaluation prompts, kept out of its training data as the
        pipeline's are."""
        from r1fast.data import check_columns, load_rows
        from r1fast.data.loading import split_conversations

        if stage.dataset is None:
            raise ConfigError(f"stage {stage.name!r} needs a dataset")
        if stage.dataset.startswith("@"):
            src = stage.dataset[1:]
            if src not in self.samples:
                path = self._from_run(self.state["stages"].get(src, {}).get("samples"))
                if not path:
                    raise ValueError(f"stage {stage.name!r}: stage {src!r} has not produced samples yet")
                if not os.path.isfile(path):
                    raise ValueError(f"stage {stage.name!r}: {path}, the samples stage {src!r} kept, is gone "
                                     f"({_GONE})")
                from r1fast.data.loading import read_json_objects

                # a damaged line was json's bare "Expecting value: line 1 column 1 (char 0)"
                self.samples[src] = read_json_objects(path, path)
            rows = self.samples[src]
            if not rows:
                # read back from a finished stage (one sampled now that keeps nothing for a reader fails itself:
                # _refuse_empty_samples), whose new thresholds --resume does not apply: rerun_from samples it again
                stats = self.state["stages"].get(src, {}).get("sample_stats")
                whole = isinstance(stats, dict) and {"kept", "samples", "prompts", "pass_rate"} <= set(stats)
                said = f" ({sample_summary(stats)})" if whole else ""
                raise ValueError(f"stage {stage.name!r}: stage {src!r} kept no samples in the earlier run{said}; it "
                                 f"finished there, and --resume keeps a finished stage's results: sample it again with "
                                 f"rerun_from={src}, lowering {src}.reward_thresholds or sampling more "
                                 f"({src}.num_samples, {src}.num_rows)")
        else:
            rows = load_rows(stage.dataset, split=getattr(stage.config, "dataset_split", None),
                             n_builtin=stage.num_rows, seed=self.p.seed * 100 + index + 1)
            held_out = (self.eval_rows() or []) + (held_out or [])
            if held_out and stage.dataset.startswith("builtin:"):
                # keep held-out prompts out of training so the reported accuracy is truly held out
                seen = {str(r.get("prompt")) for r in held_out}
                rows = [r for r in rows if str(r.get("prompt")) not in seen]
                if not rows:
                    raise ValueError(f"stage {stage.name!r}: every training prompt is also a held-out prompt")
        if stage.type == "sft":
            rows = split_conversations(rows, stage.config.prompt_column, stage.config.completion_column,
                                       where=f"stage {stage.name!r}: dataset")
        # the options that name the columns, as typed on the command line: cold_start.prompt_column=question
        options = {getattr(stage.config, o): f"{stage.name}.{o}" for o in ("prompt_column", "completion_column")
                   if hasattr(stage.config, o)}
        check_columns(rows, need, f"stage {stage.name!r}: dataset", options)
        return rows

    def load_model(self, spec: str, seed: int):
        from r1fast.trainer.common import load_model_and_tokenizer

        return load_model_and_tokenizer(self.model_folder(spec), device=self.device, dtype=self.p.dtype, seed=seed)

    def model_folder(self, spec: str) -> str:
        """The folder (or builtin:<size>) a model spec loads: "@stage" is that stage's checkpoint."""
        if spec.startswith("@"):
            path = self.state["stages"].get(spec[1:], {}).get("checkpoint")
            if not path:
                raise ValueError(f"model {spec!r}: that stage has not finished yet")
            if not os.path.isdir(self._from_run(path)):
                raise ValueError(f"model {spec!r}: that stage's checkpoint {self._from_run(path)} is gone ({_GONE})")
            spec = self._from_run(path)
        return spec

    def _in_run(self, path: str) -> str:
        """`path` as pipeline_state.json records it: relative to the run folder when inside it, so that
        a moved or copied run folder resumes from its own checkpoints and samples, not the original's."""
        rel = os.path.relpath(os.path.abspath(path), self.run_dir)
        # outside it: absolute (as given, a relative output_file was read back inside the run folder)
        return os.path.abspath(path) if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel

    def _from_run(self, path: Optional[str]) -> Optional[str]:
        """A path pipeline_state.json recorded (absolute when outside the run folder; see STATE_FORMAT)."""
        return os.path.join(self.run_dir, path) if path else path

    def _read_state(self) -> dict:
        """pipeline_state.json, its paths in the current format (see STATE_FORMAT)."""
        try:
            with open(self.state_path, encoding="utf-8") as f:
                state = json.load(f)
        except ValueError as e:   # json's own message named no file
            raise ValueError(f"{self.state_path} is not valid JSON ({e}); {_GONE}") from None
        if not isinstance(state, dict) or not isinstance(state.get("stages"), dict):
            raise ValueError(f"{self.state_path} is not a pipeline state (no 'stages' object); {_GONE}")
        fmt = state.get("format")
        if fmt is not None and (type(fmt) is not int or fmt < STATE_FORMAT):
            raise ValueError(f"{self.state_path}: format is {fmt!r:.40}, not a format r1fast wrote; {_GONE}")
        if fmt is not None and fmt > STATE_FORMAT:
            raise ValueError(f"{self.state_path} has format {fmt}, written by a newer r1fast than this one (which "
                             f"reads up to {STATE_FORMAT}): resume the run with that r1fast")
        if fmt is None:
            stage_names = set(state["stages"]) | set(state.get("order") or [])
            for st in state["stages"].values():
                for key in ("checkpoint", "samples") if isinstance(st, dict) else ():
                    if isinstance(st.get(key), str) and st[key]:
                        st[key] = self._in_run(self._unmarked_path(st[key], stage_names))
        state["format"] = STATE_FORMAT
        return state

    def _unmarked_path(self, path: str, stage_names) -> str:
        """A path a pipeline_state.json without a format recorded: relative to the run folder, or as given
        to a run started in this directory, whichever exists (a relative output_dir's checkpoint,
        'runs/x/s1/checkpoint-4', was looked for as <run>/runs/x/s1/checkpoint-4 and named gone)."""
        if os.path.isabs(path):
            return path
        in_run, as_given = os.path.join(self.run_dir, path), os.path.abspath(path)
        for candidate in (in_run, as_given):
            if os.path.exists(candidate):
                return candidate
        # neither: the reading its first folder suggests, for the error that names it gone
        return in_run if path.replace(os.sep, "/").split("/")[0] in stage_names else as_given

    def save_state(self):
        os.makedirs(self.run_dir, exist_ok=True)
        with replacing(self.state_path) as f:
            json.dump(self.state, f, indent=1)

    def _stop_sample_stage(self, log, stage: Stage, kept: list[dict], stats: dict):
        """A sample stage stopped after a batch of prompts (its progress `log` kept each batch): the run stops
        as a trainer's does."""
        self.save_state()
        print(f"\nr1fast: {log.stopped(kept, stats, f'stage {stage.name!r}')}; --resume continues from there",
              flush=True)
        raise KeyboardInterrupt   # the CLI says how to continue and exits with 130

    def _refuse_empty_samples(self, stage: Stage, kept: list[dict], stats: dict):
        """A sample stage that kept nothing for a later stage to train on fails itself, unfinished: recorded
        finished, its options were frozen for --resume and the later stage failed again however the user
        lowered its thresholds."""
        from r1fast.trainer.sampling import summary

        if kept:
            return
        # "@stage", or the file the stage writes (output_file) given as a later stage's dataset path
        names = {f"@{stage.name}"}
        if stage.config.output_file:
            names.add(os.path.abspath(stage.config.output_file))
        def reads(spec) -> bool:
            return bool(spec) and (spec in names or os.path.abspath(spec) in names)

        # a GRPO stage evaluating at its eval_steps on the file reads it too: "dataset '<file>' is empty", naming no
        # stage, once this stage was recorded finished
        readers = [(s.name, "trains on them") for s in self.p.stages if reads(s.dataset)] + \
            [(s.name, "evaluates on them") for s in self.p.stages if reads(getattr(s.config, "eval_dataset", None))]
        if readers:
            n = stage.name
            at_limit = stats.get("truncated", 0) - stats.get("truncated_by_positions", 0)   # raising it lets them end
            cut = (f", raise {n}.max_completion_length or set {n}.keep_truncated=true" if at_limit else
                   f", set {n}.keep_truncated=true" if stats.get("truncated") else "")
            raise ValueError(f"stage {n!r} {summary(stats)}, and stage {readers[0][0]!r} {readers[0][1]}: lower "
                             f"{n}.reward_thresholds{cut}, or sample more ({n}.num_samples, {n}.num_rows); "
                             f"--resume then samples {n!r} again")

    def _data_change_note(self, stage: Stage, index: int, done: dict) -> str:
        """A finished stage's dataset file (or saved dataset) whose rows changed since the stage ran on them: its
        options compared equal (the same path), and its results were kept without a word. "" when they are the
        same, for builtin:<task> (drawn from the options) and "@stage" data, and for a state from before rows were
        recorded."""
        from r1fast.trainer.common import rows_fingerprint

        was = done.get("rows_sha256")
        if not was or stage.dataset.startswith(("builtin:", "@")):
            return ""
        if (done.get("options") or {}).get("dataset", stage.dataset) != stage.dataset:
            return ""   # another path: _changed_options names it
        files = _data_files_record(stage.dataset)   # before the read: a file written during it is read again next time
        if _same_settled_files(done, files):
            return ""   # the very files whose rows it hashed: not read again
        try:
            rows = self.stage_rows(stage, index, ())
        except Exception:   # gone or unreadable: only what a later stage reads of it matters, and says so
            return ""
        now = rows_fingerprint(rows)
        if now != was:   # kept as it is: these are not the rows the stage trained on, said on every --resume
            return f"the rows of dataset {stage.dataset!r} changed since it ran: sha256 {was} -> {now}"
        if files:   # touched or copied, the rows the same: this hash holds for these files now
            done.update(files)
            self.save_state()
        return ""

    def _sample_fingerprint(self, stage: Stage, rows: list[dict], model_source: Optional[str]) -> str:
        """A sample stage's options, prompts, the pipeline's model, dtype, device and seed, and the weights of the
        model it samples (`model_source`, a folder: an earlier stage's checkpoint, trained again into the same
        folder since its stopped run, or a local model retrained in place)."""
        from r1fast.trainer.sampling import sample_fingerprint, weights_signature

        # not the pipeline's model_weights: its base model folder retrained, or deleted to free disk, changes no
        # sample of a stage that samples another model, and the stage's own weights are `weights` below
        settings = {k: v for k, v in self._settings().items() if k != "model_weights"}
        weights = weights_signature(model_source) if model_source else None
        if weights is not None:   # builtin:<size> adds nothing: its fingerprint is as before
            settings["weights"] = weights
        return sample_fingerprint(_stage_options(stage), [r.get(stage.config.prompt_column) for r in rows], settings)

    def evaluate(self, model, tokenizer, seed: int) -> dict:
        from r1fast.trainer.evaluate import evaluate_accuracy

        rows = self.eval_rows()
        if not rows:
            return {}
        res, samples = evaluate_accuracy(model, tokenizer, rows, samples_per_prompt=self.p.eval_samples_per_prompt,
                                         temperature=self.p.eval_temperature, max_tokens=self.p.eval_max_tokens,
                                         seed=seed, return_samples=True, system_prompt=self.p.eval_system_prompt,
                                         format_pattern=self.p.eval_format_pattern,
                                         chat_template_kwargs=self.p.eval_chat_template_kwargs,
                                         stop_tokens=self.p.eval_stop_tokens, stop_option="eval_stop_tokens")
        return {**res, "_samples": samples[:4]}

    def write_metrics(self):
        """<run>/metrics.jsonl = every finished stage's metrics, then its held-out evaluation."""
        out = []
        for name in self.state["order"]:
            st = self.state["stages"].get(name)
            if not st:
                continue
            mpath = os.path.join(self.run_dir, name, "metrics.jsonl")
            if os.path.isfile(mpath):
                with open(mpath, encoding="utf-8") as f:
                    out.extend(line for line in f if line.strip())
            if st.get("eval"):
                out.append(json.dumps({"step": st["step_end"], "stage": name, **st["eval"]}) + "\n")
        with replacing(os.path.join(self.run_dir, "metrics.jsonl")) as f:   # a kill mid-write keeps the last whole one
            f.writelines(out)

    # -- the run -----------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict:
        from r1fast.trainer.checkpoints import own_run_folder
        from r1fast.trainer.grpo import stop_handlers

        import torch

        if self.p.rerun_from is not None:
            # found before own_run_folder makes the folder: there is no earlier run to keep the stages before it from
            if not os.path.isfile(self.state_path):
                raise ConfigError(f"rerun_from={self.p.rerun_from}: {self.run_dir} holds no earlier run of this "
                                  f"pipeline (no pipeline_state.json) to keep the stages before {self.p.rerun_from!r} "
                                  f"from; run the pipeline without rerun_from (or give the output_dir of that run)")
            # with --resume, the rerun from that stage an earlier invocation set aside goes on (_rerun_stages)
            self._resume_asked = resume
            resume = True   # the stages before it are taken as --resume takes them
        # one run per folder at a time
        with own_run_folder(self.run_dir), stop_handlers(self, lambda: self._finishing):
            threads = torch.get_num_threads()
            try:
                return self._run(resume)
            finally:
                torch.set_num_threads(threads)   # num_threads is this run's setting, not the calling process's

    def _stop_if_requested(self, stage: Stage):
        """A stop asked for between stages (the evaluation after one, loading the next) ends the run before
        `stage` starts, as a trainer's does at its step: the state says what is done, --resume goes on."""
        if self._stop_requested:
            self.save_state()
            print(f"\nr1fast: interrupted before stage {stage.name!r}", flush=True)
            raise KeyboardInterrupt   # the CLI says how to continue and exits with 130

    def _refuse_killed_saves(self, skip: list[str] = ()):
        """--resume: a stage still to train whose folder holds no checkpoint but a visible checkpoint-N.old-<pid> (an
        earlier r1fast's save killed replacing checkpoint-N) is refused by its trainer as an earlier run. Refused
        here, before any word of where the run starts: it printed "starts from its first step" and then stopped."""
        from r1fast.trainer.checkpoints import latest_checkpoint, remove_save_leftovers, start_fresh

        for stage in self.p.stages:
            done = self.state["stages"].get(stage.name)
            stage_dir = os.path.join(self.run_dir, stage.name)
            if stage.type == "sample" or (done and done.get("finished")) or not os.path.isdir(stage_dir) \
                    or stage.name in skip:   # set aside for rerun_from: started afresh
                continue
            remove_save_leftovers(stage_dir)   # a hidden .checkpoint-N.old-<pid> is checkpoint-N again first
            if latest_checkpoint(stage_dir) is None:
                start_fresh(stage_dir, overwrite=False)   # deletes nothing: it holds no checkpoint

    def _rerun_stages(self) -> list[str]:
        """The stages rerun_from runs afresh: the one it names and every later one. [] without rerun_from, and with
        --resume where the state says an earlier invocation set them aside for a rerun from that stage: that rerun,
        stopped or finished, goes on as --resume goes on (the command a stopped rerun prints to continue it keeps
        rerun_from, and a job restarted with the same command must not start the stages over again)."""
        if self.p.rerun_from is None or (self._resume_asked and self.state.get("rerun_from") == self.p.rerun_from):
            return []
        names = [s.name for s in self.p.stages]
        return names[names.index(self.p.rerun_from):]

    def _set_aside_for_rerun(self, rerun: list[str]):
        """rerun_from: the earlier run's outputs of the stages in `rerun` (their folders, and a sample stage's
        output_file outside its folder) renamed to <path>.old-<n>, never deleted, and their records dropped from the
        state, so that they run afresh. Journaled (RERUN_JOURNAL): a kill part way is finished by the next run."""
        stages = {s.name: s for s in self.p.stages}
        sources = []
        for name in rerun:
            sources.append(os.path.join(self.run_dir, name))
            out = getattr(stages[name].config, "output_file", None)
            if out:
                sources.append(os.path.abspath(out))
        moves, taken = [], set()
        for src in sources:
            inside_moved = any(os.path.commonpath([src, a]) == a for a, _ in moves)
            if os.path.lexists(src) and not inside_moved and all(src != a for a, _ in moves):
                target = self._free_old_name(src, taken)
                taken.add(target)
                moves.append((src, target))
        journal = os.path.join(self.run_dir, RERUN_JOURNAL)
        with replacing(journal) as f:
            json.dump({"r1fast_rerun": 1, "stages": rerun,
                       "moves": [[self._in_run(a), self._in_run(b)] for a, b in moves]}, f)
        for name in rerun:
            self.state["stages"].pop(name, None)
        # the journal makes the set-aside certain (a run killed from here on finishes it): summary.json stops
        # reporting the earlier run's figures of these stages now, not once they have run again
        self.write_summary(0.0)
        _move_aside(moves)
        self.state["rerun_from"] = rerun[0]   # what --resume with the same rerun_from continues
        self.save_state()
        self.write_metrics()   # the set-aside stages' lines out of <run>/metrics.jsonl
        os.remove(journal)
        said = "; ".join(f"{a} is now {b}" for a, b in moves) if moves else "none of them had written anything"
        print(f"r1fast: rerun_from={self.p.rerun_from}: stage{'s' if len(rerun) > 1 else ''} {', '.join(rerun)} "
              f"run{'' if len(rerun) > 1 else 's'} afresh, the earlier stages as --resume keeps them; the earlier "
              f"run's outputs are set aside: {said}", flush=True)

    def _free_old_name(self, path: str, taken: set[str]) -> str:
        """<path>.old-<n> for the first n from the process id on that is free, and no stage's folder name."""
        stage_folders = {os.path.join(self.run_dir, n) for n in [s.name for s in self.p.stages]
                         + list(self.state.get("order") or [])}
        n = os.getpid()
        while True:
            target = f"{path}.old-{n}"
            if not os.path.lexists(target) and target not in taken and target not in stage_folders:
                return target
            n += 1

    def _finish_rerun_set_aside(self):
        """The set-aside of a rerun_from run killed part way (RERUN_JOURNAL): its renames done, its stages' records
        dropped from pipeline_state.json, the journal removed. An unreadable journal is an error: the stages it
        names may be half set aside, and resuming them could take an old checkpoint for the new run's."""
        from r1fast.trainer.metrics import remove_stale_temps

        path = os.path.join(self.run_dir, RERUN_JOURNAL)
        remove_stale_temps(path)
        if not os.path.isfile(path):
            return
        try:
            with open(path, encoding="utf-8") as f:
                journal = json.load(f)
            stages, moves = journal["stages"], journal["moves"]
            if not (isinstance(stages, list) and all(isinstance(n, str) for n in stages)):
                raise ValueError("its stages are not a list of names")
            if not all(_is_set_aside_move(m) for m in moves):
                raise ValueError("its moves are not pairs of a path and that path + '.old-<n>'")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}, the set-aside of a rerun_from run that was killed part way, cannot be read "
                             f"({e}); look at what {self.run_dir} holds, then remove it") from None
        _move_aside([(self._from_run(a), self._from_run(b)) for a, b in moves])
        if os.path.isfile(self.state_path):
            state = self._read_state()
            for name in stages:
                state["stages"].pop(name, None)
            if stages:
                state["rerun_from"] = stages[0]
            with replacing(self.state_path) as f:
                json.dump(state, f, indent=1)
            self.write_summary(0.0, state)   # killed before it marked them pending: marked now
        os.remove(path)

    def _start_stage(self, stage: Stage, opening: list[str]):
        """`stage` starts: a stop asked for before now ends the run here (_stop_if_requested), and the stage's
        header (`opening`) is printed only past that point. Printed before its data and trainer were loaded, a stop
        meanwhile showed `== stage ...` and then `interrupted before stage ...`: the header of a stage that never ran.
        A stop from here on is the stage's own (its trainer stops at its first step, a sampling after a batch)."""
        self._stop_if_requested(stage)
        for line in opening:
            print(line, flush=True)

    def _train_stage(self, trainer, stage: Stage, resume_stage: bool, record: dict, opening: list[str]) -> int:
        """Run an SFT or GRPO stage's trainer (from its latest checkpoint when `resume_stage`) and note its
        checkpoint in `record`; its global steps. Stopped part way: the state is saved and KeyboardInterrupt
        raised, as for a stop between stages."""
        self._start_stage(stage, opening)
        res = trainer.train(resume=True if resume_stage else None)
        if res.get("interrupted"):
            self.save_state()
            raise KeyboardInterrupt
        record["checkpoint"] = self._in_run(res["checkpoint"])
        record["nonfinite_skipped"] = res["nonfinite_skipped"]
        return trainer.global_step

    def _run(self, resume: bool) -> dict:
        from r1fast.trainer.checkpoints import latest_checkpoint, remove_save_leftovers
        from r1fast.trainer.common import rows_fingerprint

        p = self.p
        if p.num_threads and self.device.type == "cpu":
            import torch

            torch.set_num_threads(p.num_threads)
        remove_save_leftovers(self.run_dir)   # the state's, summary's or curves' .tmp of a run killed as it wrote them
        self._finish_rerun_set_aside()   # one killed part way: the folders and the state as it meant them
        earlier_run = resume and os.path.isfile(self.state_path)
        if earlier_run:
            self.state = self._read_state()
        rerun = self._rerun_stages()
        if resume:
            self._refuse_killed_saves(skip=rerun)
        if earlier_run:
            note = _changed_settings(self.state.get("settings"), self._settings())
            if note:
                print(f"r1fast: --resume: the pipeline's {note} since the earlier run: the stages it finished keep "
                      f"their results and the later ones continue from their checkpoints; the new values apply only "
                      f"where a stage run now reads them (overwrite_output_dir=true starts the run over with them)",
                      file=sys.stderr)
        elif resume:
            print(f"r1fast: --resume: no earlier run in {self.run_dir}; starting from the first stage")
        else:
            self.start_fresh()
        self.state["order"] = [s.name for s in p.stages]
        self.state["seed"] = p.seed
        self.state["settings"] = self._settings()
        self._check_eval_rows()
        needs_rollout = [s.name for s in p.stages if s.type in ("grpo", "sample") or (s.evaluate and self.eval_rows())]
        if needs_rollout:  # found now, not after the stages before the first rollout have trained
            from r1fast import _ext

            _ext.require(f"the rollout engine of stage {needs_rollout[0]!r}")
        if rerun:   # once every check before the first stage has passed
            self._set_aside_for_rerun(rerun)
        self.save_state()  # the stage order, for `r1fast plot` while the first stage runs
        t_start = time.perf_counter()
        model = tokenizer = None
        model_source: Optional[str] = None   # the folder (or builtin:<size>) whose weights `model` holds
        # what a stage without its own model loads when `model` is None: (spec, seed) of the last finished
        # stage's checkpoint, or of the model a finished sample stage sampled
        reload: Optional[tuple[str, int]] = None
        step = 0
        for i, stage in enumerate(p.stages):
            done = self.state["stages"].get(stage.name)
            if done and done.get("finished"):
                print(f"\n== stage {i + 1}/{len(p.stages)}: {stage.name} ({stage.type}): done in the earlier run, "
                      f"skipped ==", flush=True)
                note = ", ".join(n for n in (_changed_options(stage, done.get("options")),
                                             self._data_change_note(stage, i, done)) if n)
                if note:
                    print(f"r1fast: --resume: stage {stage.name!r} finished in the earlier run, whose results are kept; "
                          f"its options given now differ ({note}) and are not applied (overwrite_output_dir=true "
                          f"starts the run over with them)", file=sys.stderr)
                step = done.get("step_end", step)
                if done.get("checkpoint"):
                    model = tokenizer = None   # reload lazily from the last finished stage's checkpoint
                    reload = self._from_run(done["checkpoint"]), p.seed + i
                elif stage.model:
                    # a sample stage that sampled a model of its own: the next stage trains that one, as in a
                    # fresh run (it trained the checkpoint before it once this stage had finished earlier)
                    model = tokenizer = None
                    reload = stage.model, p.seed + i
                continue
            if stage.model:
                model = tokenizer = None   # the earlier stages' model: freed before this stage's own loads
                _free_memory()
                model, tokenizer = self.load_model(stage.model, p.seed + i)
                model_source = self.model_folder(stage.model)
            elif model is None:
                # the model a stage let go of (an FP8 GRPO stage's, which the next stage reloads in high
                # precision) is freed before this one loads, as where a stage loads its own model
                _free_memory()
                if reload and not reload[0].startswith(("@", "builtin:")) and not os.path.isdir(reload[0]):
                    raise ValueError(f"stage {stage.name!r} starts from {reload[0]}, the checkpoint an earlier stage "
                                     f"finished with, which is gone ({_GONE})")
                if reload:
                    model, tokenizer = self.load_model(*reload)
                    model_source = self.model_folder(reload[0])
                elif p.model:
                    model, tokenizer = self.load_model(p.model, p.seed)
                    model_source = p.model
                else:
                    raise ConfigError(f"stage {stage.name!r}: no model (set the pipeline's 'model' or the stage's)")
            if stage.type != "sample" and stage.evaluate and self.eval_rows():
                # found before the stage trains, not at the evaluation after it: a held-out prompt that leaves
                # this model no room for an answer
                from r1fast.data.loading import check_prompts, encode_prompts, resolve_stop_tokens
                from r1fast.trainer.common import check_prompt_room

                where = f"eval_dataset {p.eval_dataset!r}, evaluated after stage {stage.name!r}"
                # as a stage's own data: a prompt templated before is refused, a system_prompt left out said
                kwargs = p.eval_chat_template_kwargs
                check_prompts(self.eval_rows(), "prompt", tokenizer, p.eval_system_prompt, where, kwargs)
                check_prompt_room(encode_prompts(tokenizer, self.eval_rows(), "prompt", p.eval_system_prompt,
                                                 chat_template_kwargs=kwargs, where=where),
                                  model.config.max_sequence_length, where)
                resolve_stop_tokens(tokenizer, p.eval_stop_tokens, "eval_stop_tokens")
            stage_dir = os.path.join(self.run_dir, stage.name)
            if resume:   # a checkpoint whose replacement was killed between its renames counts as one
                remove_save_leftovers(stage_dir)
            resume_stage = bool(resume and latest_checkpoint(stage_dir))
            t0 = time.perf_counter()
            # printed once the stage starts (_start_stage), past the last point a stop ends the run before it
            opening = [f"\n== stage {i + 1}/{len(p.stages)}: {stage.name} ({stage.type}) =="]
            if resume and not resume_stage and stage.type != "sample" and stage.name not in rerun:
                opening.append(f"r1fast: --resume: stage {stage.name!r} has no checkpoint in {stage_dir}: it starts "
                               f"from its first step")
            record: dict[str, Any] = {"type": stage.type, "step_start": step}
            # the data's files as they are before the stage reads them: a later --resume reads them again only when
            # these changed (_data_change_note)
            if not stage.dataset.startswith(("builtin:", "@")):
                record.update(_data_files_record(stage.dataset))
            cfg = stage.config
            if hasattr(cfg, "progress_bar"):
                cfg.progress_bar = p.progress_bar and cfg.progress_bar
            if not resume and p.overwrite_output_dir and hasattr(cfg, "overwrite_output_dir"):
                # start_fresh cleared the stage's folder, keeping a checkpoint a killed save set aside there, which
                # the stage's own start refused (its config's overwrite_output_dir is never set in a pipeline). A
                # copy: the stage's recorded options are the ones given; copy.copy, not dataclasses.replace, which
                # builds a new config that warns again of what loading the pipeline warned of
                cfg = copy.copy(cfg)
                cfg.overwrite_output_dir = True
            if stage.type == "sft":
                from r1fast.trainer.sft import SFTTrainer

                rows = self.stage_rows(stage, i, (cfg.prompt_column, cfg.completion_column))
                record["rows_sha256"] = rows_fingerprint(rows)
                tr = SFTTrainer(model, tokenizer, rows, cfg, run_dir=stage_dir, stage_name=stage.name, step_offset=step)
                step += self._train_stage(tr, stage, resume_stage, record, opening)
            elif stage.type == "grpo":
                from r1fast.trainer.grpo import GRPOTrainer

                # evaluated at its eval_steps, as in a single run; at its start and end the pipeline
                # evaluates between stages instead
                eval_rows = self.stage_eval_rows(stage) if cfg.eval_steps else None
                rows = self.stage_rows(stage, i, (cfg.prompt_column,),
                                       held_out=eval_rows if cfg.eval_dataset is not None else None)
                record["rows_sha256"] = rows_fingerprint(rows)
                tr = GRPOTrainer(model, cfg.reward_funcs, rows, cfg, tokenizer=tokenizer, eval_dataset=eval_rows,
                                 run_dir=stage_dir, stage_name=stage.name, step_offset=step, eval_at_ends=False)
                step += self._train_stage(tr, stage, resume_stage, record, opening)
            else:
                from r1fast.trainer.sampling import SampleProgress, finish_samples, rejection_sample, summary

                rows = self.stage_rows(stage, i, (cfg.prompt_column,))
                record["rows_sha256"] = rows_fingerprint(rows)
                progress_path = os.path.join(stage_dir, SAMPLE_PROGRESS)
                log = SampleProgress(progress_path, self._sample_fingerprint(stage, rows, model_source))
                self._start_stage(stage, opening)
                earlier = log.load(f"stage {stage.name!r}") if resume else None   # says where it continues
                self._finishing = (f"finishing this batch of prompts of stage {stage.name!r} and keeping what it "
                                   f"sampled so far")
                try:
                    kept, stats = rejection_sample(model, tokenizer, rows, cfg,
                                                   progress=p.progress_bar and cfg.progress_bar,
                                                   should_stop=lambda: self._stop_requested, resume_from=earlier,
                                                   on_batch=log.append, stop_option=f"{stage.name}.stop_tokens")
                except Exception as e:
                    if log.holds_batches:   # --resume goes on from them as from a checkpoint: the CLI says so
                        with contextlib.suppress(Exception):
                            e.r1fast_sample_progress = progress_path
                    raise
                if "next_prompt" in stats:   # stopped after a batch of prompts, which log.append kept
                    self._stop_sample_stage(log, stage, kept, stats)
                path = cfg.output_file or os.path.join(stage_dir, "samples.jsonl")
                self._refuse_empty_samples(stage, kept, stats)
                finish_samples(kept, path, progress_path)
                self.samples[stage.name] = kept
                record.update(samples=self._in_run(path), sample_stats=stats)
                print(f"{summary(stats)} → {path}")
            tr = None   # its optimizer state and rollout engine: freed before the evaluation's engine and the next stage
            _free_memory()
            if stage.type != "sample" and stage.evaluate and self.eval_rows():
                self._finishing = (f"finishing the held-out evaluation after stage {stage.name!r}, then stopping "
                                   f"before the next stage")
                ev = self.evaluate(model, tokenizer, seed=p.seed * 1000 + 7)
                samples = ev.pop("_samples")
                record["eval"] = ev
                record["eval_settings"] = self._eval_settings()
                record["eval_samples"] = samples
                print(f"held-out accuracy after {stage.name}: {describe_eval(ev)}")
            record.update(step_end=step, wall_s=time.perf_counter() - t0, finished=True, options=_stage_options(stage))
            if "checkpoint" in record:
                reload = self._from_run(record["checkpoint"]), p.seed + i
                model_source = reload[0]   # the trained model in memory is the one saved there
                if getattr(getattr(model, "fp8_report", None), "converted", None):
                    # a GRPO stage's FP8 layers must not carry into the next stage (its own fp8 option, or
                    # none for SFT, decides): it starts from the checkpoint in high precision, as on --resume
                    model = tokenizer = None
            self.state["stages"][stage.name] = record
            self.save_state()
            self.write_metrics()
            self.write_summary(time.perf_counter() - t_start)   # this stage's figures, the later ones pending
            self._finishing = _BETWEEN_STAGES
        # again at the end: a run killed between a stage's state and this file resumed with every stage done,
        # which wrote it no more (the last stage's metrics were missing for good)
        self.write_metrics()
        summary = self.write_summary(time.perf_counter() - t_start)
        print(render_summary(summary))
        return summary

    def start_fresh(self):
        """A new run must not mix with an earlier one in its folder (see checkpoints.start_fresh): an
        earlier run there is an error, or with overwrite_output_dir deleted first."""
        from r1fast.trainer.checkpoints import RunFolderInUse, clear_run, list_checkpoints

        names = [s.name for s in self.p.stages]
        if os.path.isfile(self.state_path):
            try:
                with open(self.state_path, encoding="utf-8") as f:
                    old = json.load(f)
            except ValueError:
                old = {}
            if not isinstance(old, dict):
                old = {}
            names += [n for n in old.get("order", []) if n not in names]
            done = [n for n, st in old.get("stages", {}).items() if st.get("finished")]
            holds = f"pipeline_state.json; finished stages: {', '.join(done) or 'none'}"
        else:
            trained = [n for n in names if list_checkpoints(os.path.join(self.run_dir, n))]
            holds = f"checkpoints of stage(s) {', '.join(trained)}" if trained else None
        if holds is None:
            return
        if not self.p.overwrite_output_dir:
            raise RunFolderInUse(self.run_dir, holds)
        print(f"r1fast: overwrite_output_dir: deleting the earlier run in {self.run_dir}")
        for name in names:
            stage_dir = os.path.join(self.run_dir, name)
            clear_run(stage_dir)
            for kept in ("samples.jsonl", SAMPLE_PROGRESS):   # a stopped stage's rows: not the new run's
                if os.path.isfile(os.path.join(stage_dir, kept)):
                    os.remove(os.path.join(stage_dir, kept))
        for name in ("pipeline_state.json", "summary.json", "metrics.jsonl"):
            if os.path.isfile(os.path.join(self.run_dir, name)):
                os.remove(os.path.join(self.run_dir, name))

    def _settings(self) -> dict:
        """The pipeline keys every stage runs with (the held-out ones: _eval_settings), as the state records them."""
        return {"model": self.p.model, "dtype": self.p.dtype, "device": str(self.device), "seed": self.p.seed,
                **_model_weights(self.p.model)}

    def _eval_settings(self) -> dict:
        """What a held-out accuracy depends on besides the model: the rows (dataset, size, seed) and
        the sampling (samples per prompt, temperature, token budget)."""
        # recorded when set only: a state written before these options existed compares equal to their default
        prompt_and_format = {k: v for k, v in (("system_prompt", self.p.eval_system_prompt),
                                               ("format_pattern", self.p.eval_format_pattern),
                                               ("chat_template_kwargs", self.p.eval_chat_template_kwargs),
                                               ("stop_tokens", self.p.eval_stop_tokens))
                             if v is not None}
        return {"dataset": self.p.eval_dataset, "prompts": self.p.eval_size,
                "samples_per_prompt": self.p.eval_samples_per_prompt, "temperature": self.p.eval_temperature,
                "max_tokens": self.p.eval_max_tokens, "seed": self.p.seed, **prompt_and_format}

    def write_summary(self, wall_s: float, state: Optional[dict] = None) -> dict:
        """<run>/summary.json of `state` (the run's own by default), replaced whole (a kill mid-write keeps the last).
        Written after each stage and when rerun_from sets stages aside, so it never shows a stage's earlier figures
        once that stage is to run again."""
        summary = self.summary(wall_s, state)
        with replacing(os.path.join(self.run_dir, "summary.json")) as f:
            json.dump(summary, f, indent=1)
        return summary

    def summary(self, wall_s: float, state: Optional[dict] = None) -> dict:
        """The run's table: a row per stage of `state` (the run's own by default); a stage with no finished
        record (not run yet, running, or set aside by rerun_from) is "status": "pending", with no figures."""
        state = self.state if state is None else state
        types = {s.name: s.type for s in self.p.stages}
        rows = []
        current = self._eval_settings()
        for name in state.get("order") or []:
            st = state["stages"].get(name) or {}
            if not st.get("finished"):
                rows.append({"stage": name, "type": types.get(name, st.get("type")), "status": "pending", "steps": 0,
                             "held_out_accuracy": None, "format": None, "wall_s": 0.0})
                continue
            row = {"stage": name, "type": st.get("type"), "steps": st.get("step_end", 0) - st.get("step_start", 0),
                   "held_out_accuracy": (st.get("eval") or {}).get("eval/accuracy"),
                   "format": (st.get("eval") or {}).get("eval/format"), "wall_s": round(st.get("wall_s", 0.0), 1),
                   **k_sample_scores(st.get("eval") or {})}   # "pass@4", "cons@4" with 4 samples per prompt
            if st.get("nonfinite_skipped"):
                row["nonfinite_skipped"] = st["nonfinite_skipped"]
            if st.get("sample_stats"):   # what a sample stage kept: a table of steps 0 and dashes said nothing of it
                row["samples"] = st["sample_stats"]
            # a stage finished by an earlier invocation may have been evaluated under other settings
            if st.get("eval") and st.get("eval_settings", current) != current:
                row["eval_settings"] = st["eval_settings"]
            rows.append(row)
        return {"name": self.p.name, "seed": self.p.seed, "run_dir": self.run_dir, "wall_s_this_invocation": round(wall_s, 1),
                "eval": current, "stages": rows}


def render_summary(s: dict) -> str:
    k_columns = k_sample_names(s["stages"])
    lines = [f"\nrun {s['name']} (seed {s['seed']}) in {s['run_dir']}",
             f"held-out: {s['eval']['prompts']} prompts × {s['eval']['samples_per_prompt']} samples at "
             f"temperature {s['eval']['temperature']}" if s["eval"].get("dataset") is not None else
             "held-out: none (no eval_dataset)",
             f"{'stage':<18}{'type':<8}{'steps':>7}{'accuracy':>10}{'format':>8}"
             + "".join(f"{name:>10}" for name in k_columns) + f"{'time':>8}"]
    for r in s["stages"]:
        if r.get("status") == "pending":   # a summary.json written while the run was under way
            lines.append(f"{r['stage']:<18}{r['type'] or '-':<8}{'pending':>7}")
            continue
        acc = "-" if r["held_out_accuracy"] is None else f"{r['held_out_accuracy']:.3f}"
        fmt = "-" if r["format"] is None else f"{r['format']:.3f}"
        by_k = "".join(f"{'-' if r.get(name) is None else format(r[name], '.3f'):>10}" for name in k_columns)
        mark = " *" if "eval_settings" in r else ""
        lines.append(f"{r['stage']:<18}{r['type'] or '-':<8}{r['steps']:>7}{acc:>10}{fmt:>8}{by_k}"
                     f"{r['wall_s']:>7.0f}s{mark}")
    for r in s["stages"]:
        if "eval_settings" in r:
            then = r["eval_settings"]
            now = s["eval"]
            diff = ", ".join(f"{k}={then.get(k)!r} (now {now.get(k)!r})" for k in {**now, **then}
                             if then.get(k) != now.get(k))
            lines.append(f"* {r['stage']}: evaluated by an earlier invocation with {diff}")
    for r in s["stages"]:
        if r.get("samples"):
            lines.append(f"{r['stage']}: {sample_summary(r['samples'])}")
    for r in s["stages"]:
        if r.get("nonfinite_skipped"):
            lines.append(f"{r['stage']}: {r['nonfinite_skipped']} steps skipped for a NaN/inf loss or gradient")
    return "\n".join(lines)


def _stage_options(stage: Stage) -> dict:
    """What a stage ran with, as recorded in pipeline_state.json (JSON-safe)."""
    # the stage's own keys last: its config's dataset (None in a pipeline) must not hide the stage's.
    # to_json_dict: a reward function given in Python by its module:qualname; str() of it holds its address, another
    # in every process, so a resumed sample stage's progress (keyed by these options) was always another sampling's
    options = {**{k: v for k, v in stage.config.to_json_dict().items() if not callable(v)},
               "model": stage.model, "dataset": stage.dataset, "num_rows": stage.num_rows, **_model_weights(stage.model)}
    return json.loads(json.dumps(options, default=str))


def _model_weights(spec: Optional[str]) -> dict:
    """{"model_weights": sampling.weights_signature} of a local model folder ({} for builtin:<size>, "@stage",
    none): a model trained again into the same folder has the same name, which was all a resume compared."""
    from r1fast.trainer.sampling import weights_signature

    if not spec or spec.startswith(("@", "builtin:")):
        return {}
    weights = weights_signature(spec)
    return {} if weights is None else {"model_weights": weights}


# How far a file's modification time must lie before the moment it was looked at for an unchanged (size, mtime) to
# say its content is unchanged: a filesystem stamps a write with a coarse clock (ext4 about 4 ms, NFS and HFS+ 1 s,
# FAT 2 s), so a same-size rewrite within one tick of the look kept the mtime that was recorded.
_MTIME_TICK_NS = 3 * 10**9


def _data_files_record(spec: str) -> dict:
    """{"rows_files": _data_files_stat(spec), "rows_files_at": when they were looked at (time_ns)}, recorded beside
    the hash of the rows read from them; {} where spec is no local path."""
    at = time.time_ns()   # before the stat: a file written after this moment is written after the stat
    files = _data_files_stat(spec)
    return {} if files is None else {"rows_files": files, "rows_files_at": at}


def _same_settled_files(done: dict, now: dict) -> bool:
    """Whether the files recorded in `done` are the files `now` lists, each already older than a timestamp tick when
    it was recorded. A file modified just before it was looked at (a dataset written as the stage started) may be
    rewritten to the same size within the same tick, unseen by its (size, mtime): it is read and hashed again, and
    recorded anew once it has settled. A state from before the moment was recorded is read again once."""
    recorded, at = done.get("rows_files"), done.get("rows_files_at")
    if not now or recorded != now["rows_files"] or not isinstance(at, int):
        return False
    return all(mtime < at - _MTIME_TICK_NS for _, _, mtime in recorded)


def _data_files_stat(spec: str) -> Optional[list[list]]:
    """[path, size, mtime_ns] of a dataset file, or of each file in a saved dataset's folder, recorded beside the
    hash of the rows a stage read from them (rows_sha256): --resume reads and hashes a finished stage's data again
    only when these changed, not on every resume (slow for a large file; hashing the bytes instead costs about
    0.6 s a GB). An edit that keeps a file's size and its modification time to the nanosecond goes unseen, unless
    the file was modified within a timestamp tick of being looked at (_same_settled_files). None where the spec is no
    local path (a Hub name): read every time."""
    if not os.path.exists(spec):
        return None
    root = os.path.realpath(spec)
    paths = [root] if os.path.isfile(root) else \
        sorted(os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names)
    try:
        return [[path, st.st_size, st.st_mtime_ns] for path, st in ((path, os.stat(path)) for path in paths)]
    except OSError:   # a file gone while listed: read and hashed, as before
        return None


def _changed_settings(recorded: Optional[dict], now: dict) -> str:
    """The pipeline keys that changed since the earlier run ("" if none, or if its state did not record them):
    a new model, dtype or seed was taken without a word, the stages done having used the old ones."""
    if not isinstance(recorded, dict):
        return ""
    from r1fast.trainer.common import changed_values

    changed = changed_values(recorded, now)
    return ", ".join(changed) + (" changed" if changed else "")


def _changed_options(stage: Stage, recorded: Optional[dict]) -> str:
    """The options of a finished stage that differ now from what it ran with ("" if none, or if an
    older state file did not record them)."""
    if not isinstance(recorded, dict):
        return ""
    now = _stage_options(stage)
    changed = [f"{k} {recorded.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(now) | set(recorded))
               if now.get(k) != recorded.get(k) and k != "progress_bar"
               # model_weights: recorded by an r1fast before it was; or the folder is gone (deleted to free disk), no
               # option given now differs, and the stage's results do not read it again
               and not (k == "model_weights" and (k not in recorded or k not in now))]
    return ", ".join(changed)


def _is_set_aside_move(move) -> bool:
    """A move RERUN_JOURNAL may hold: [path, path + ".old-<n>"], a relative path within the run folder."""
    import re

    if not (isinstance(move, list) and len(move) == 2 and all(isinstance(p, str) and p for p in move)):
        return False
    src, target = move
    within = os.path.isabs(src) or (os.path.normpath(src) == src and src.split(os.sep)[0] != os.pardir)
    return within and re.fullmatch(re.escape(src) + r"\.old-\d+", target) is not None


def _move_aside(moves: list[tuple[str, str]]):
    """Each (path, target) renamed where the path is still there and the target free (a finished journal's moves
    done again are skipped), then synced."""
    for src, target in moves:
        if os.path.lexists(src) and not os.path.lexists(target):
            os.rename(src, target)
    for folder in {os.path.dirname(t) for _, t in moves}:
        fsync_dir(folder)


def _free_memory() -> None:
    """Give back what a finished stage's trainer or model held before the next one allocates. The name alone
    kept a trainer (its optimizer state, its rollout engine's KV pool) alive while the next stage's was built;
    and a rollout engine sizes its KV pool from the memory free on the device, which the allocator's cached
    blocks are not."""
    import gc

    import torch

    gc.collect()   # trainers and engines may sit in reference cycles
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_pipeline(source: str | dict | Pipeline = DEFAULT_CONFIG, overrides: Optional[list[str]] = None,
                 resume: bool = False) -> dict:
    """source: a pipeline file, a dict as one holds, or the Pipeline load_pipeline returned (checked again,
    as it may have been edited since)."""
    if not isinstance(source, Pipeline):
        return PipelineRunner(load_pipeline(source, overrides)).run(resume=resume)
    if overrides:
        raise TypeError("run_pipeline: overrides apply to a pipeline file or dict; set a Pipeline's fields instead "
                        "(or pass the overrides to load_pipeline)")
    _validate(source, "pipeline", max(1, len(source.stages)))
    _check_stage_list(source, "pipeline")
    _check_rerun_from(source, "pipeline")
    _check_stages(source, "pipeline")
    return PipelineRunner(source).run(resume=resume)
