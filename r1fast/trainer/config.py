"""Run configuration: dataclasses with TRL's names, loadable from YAML, overridable from the CLI.

Every field is typed; `from_dict` rejects unknown keys (with a close-match hint) and values of the
wrong type, and `validate` rejects values out of range, so a typo never trains silently on defaults.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import math
import os
import re
import shlex
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
SCALE_REWARDS = ("group", "batch", "none")
IS_LEVELS = ("token", "sequence")
ESTIMATORS = ("grpo", "rloo")
KL_ESTIMATORS = ("k1", "k2", "k3")
SCHEDULERS = ("constant", "linear", "cosine")
TIS_MODES = ("none", "truncate", "mask")
TIS_LEVELS = ("token", "sequence")


def _callable_name(f) -> str:
    """A callable's "module:qualname", the form reward_funcs reads a function by."""
    module = getattr(f, "__module__", None) or type(f).__module__
    return f"{module}:{getattr(f, '__qualname__', type(f).__qualname__)}"


def _recorded_names(values: list) -> list:
    """A list option as JSON records it: each callable by _callable_name, where two different callables share
    one ("__main__:<lambda>" for two lambdas, one closure of a factory twice) the later ones suffixed "#2",
    "#3"... by their order (RewardSet's metric names suffix "_2"), so the recorded functions can be told apart.
    "#" is no part of a Python name: the suffixed name never loads another function. One function given
    twice keeps its name, which loads it."""
    recorded, first_of = [], {}   # name -> the callables recorded under it, in order
    for v in values:
        if not callable(v):
            recorded.append(v)
            continue
        name = _callable_name(v)
        same = first_of.setdefault(name, [])
        index = next((i for i, f in enumerate(same) if _same_function(f, v)), None)
        if index is None:
            same.append(v)
            index = len(same) - 1
        recorded.append(name if index == 0 else f"{name}#{index + 1}")
    return recorded


def _same_function(a, b) -> bool:
    """Whether a and b are one function: `judge.score` given twice is two bound-method objects, equal."""
    return a is b or (inspect.ismethod(a) and inspect.ismethod(b) and a == b)


# names other libraries (or the words users reach for) give an option, which no close match finds
_OTHER_NAMES = {"lr": "learning_rate", "model": "model_name_or_path", "batch_size": "per_device_train_batch_size",
                "epochs": "num_train_epochs", "kl_coef": "beta", "n": "num_samples"}


# TRL options with no field of that name, and what a TRL config moved here says instead
_TRL_EQUIVALENTS = {
    "bf16": "TRL's bf16 is r1fast's dtype: bfloat16",
    "fp16": "TRL's fp16 is r1fast's dtype: float16",
    "use_vllm": "r1fast samples with its own rollout engine, so use_vllm has no counterpart: leave it out",
    "save_strategy": "r1fast saves every save_steps steps (0: at the end only), so save_strategy has no counterpart",
}


def _did_you_mean(key: str, names: list[str]) -> str:
    """"; did you mean ...?" for an unknown option `key`, or ""."""
    if key in _TRL_EQUIVALENTS and "dtype" in names:   # a GRPO/SFT config, not SampleConfig
        return f"; {_TRL_EQUIVALENTS[key]}"
    close = [_OTHER_NAMES[key]] if _OTHER_NAMES.get(key) in names else difflib.get_close_matches(key, names, n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _other_config_hint(key: str, config_cls) -> str:
    """For an unknown option that another command's config has (`r1fast sft grpo.yaml`: 'eval_dataset'), which
    one: a config file given to the wrong command otherwise read as a misspelling."""
    commands = {"GRPOConfig": "r1fast train", "SFTConfig": "r1fast sft", "SampleConfig": "r1fast sample"}
    owners = [cls for cls in _Base.__subclasses__() + _TrainingConfig.__subclasses__()
              if cls.__name__ in commands and cls is not config_cls and key in cls.field_names()]
    if not owners:
        return ""
    names = " and ".join(c.__name__ for c in owners)
    where = ", ".join(commands[c.__name__] for c in owners)
    return f" ({key!r} is a {names} option, for {where}: a config written for another command or stage type?)"


def resume_is_bare(resume) -> bool:
    """`--resume` without a path: the newest checkpoint of the run's own folder. Here, not in checkpoints.py
    (torch): the CLI's Ctrl-C note calls it, and after a Ctrl-C that interrupted torch's import, importing
    torch again fails (a RuntimeError traceback in place of the note)."""
    return resume is True or resume in ("latest", "true", "True")


def check_resume_path_exists(resume: str):
    """`--resume PATH` names something that exists: a missing one said only that it was "neither a checkpoint
    folder nor a run folder" (or "not a pipeline run folder"), as if the folder were there but wrong."""
    if not os.path.lexists(resume):
        where = "" if os.path.isabs(resume) else f" (from {os.getcwd()})"
        raise ConfigError(f"--resume {resume!r}: no such file or folder{where}")


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names it."""


@dataclass
class _Base:
    """Shared loading/overriding/validation for every config dataclass."""

    # int options that TRL spells as a bool: true -> this count, false -> 0 (not dataclass fields)
    _BOOL_COUNTS: typing.ClassVar[dict[str, int]] = {}
    # str options whose "off" YAML reads as false (YAML 1.1: off/no/false are booleans)
    _OFF_WORDS: typing.ClassVar[tuple[str, ...]] = ()
    # str options that TRL also takes as a bool: option -> (its word for false, its word for true)
    _BOOL_WORDS: typing.ClassVar[dict[str, tuple[str, str]]] = {}
    # str options with a "none" choice that Python (r1fast.ops.LossOptions) or YAML's null spells as None
    _NONE_WORDS: typing.ClassVar[tuple[str, ...]] = ()

    def _from_bool(self, key: str, value):
        """A bool (or None) given for an option that TRL, YAML or LossOptions spells as one: its own value."""
        if value is None and key in self._NONE_WORDS:
            return "none"
        if isinstance(value, bool):
            if key in self._BOOL_COUNTS:
                return self._BOOL_COUNTS[key] if value else 0
            if key in self._OFF_WORDS and not value:
                return "off"
            if key in self._BOOL_WORDS:
                return self._BOOL_WORDS[key][value]
        return value

    def __new__(cls, *args, **kwargs):
        # before the dataclass __init__ (which @dataclass writes, so it cannot be wrapped here): a misspelt
        # keyword in Python gets the hint from_dict and YAML give, not a bare "unexpected keyword argument"
        names = cls.field_names()
        for key in kwargs:
            if key not in names:
                raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {key!r}"
                                f"{_did_you_mean(key, names)}")
        return super().__new__(cls)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config", typed_keys: Optional[dict[str, str]] = None):
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of option names to values, got {type(data).__name__}")
        cfg = cls()
        cfg.update(data, source=source, typed_keys=typed_keys)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: Optional[list[str]] = None):
        # the file's keys as the config reads them, so that an override spelt the other way (the file's
        # max-steps, the command line's max_steps=3) replaces the file's value, not stands beside it
        data = option_names(load_yaml(path), str(path))
        if not overrides:
            return cls.from_dict(data, source=str(path))
        typed = parse_overrides(overrides)
        # The file and the command line are read together, as a pipeline reads a stage's options and overrides:
        # read one after the other, the file had to pass alone, so an override could not mend it (a file's
        # per_device_train_batch_size: 4 with num_generations=4 typed was refused for the default 8 generations),
        # and the file's values alone were warned of (cispo's epsilon_high) when an override had mended them.
        merged = _config_error(lambda where: cls.from_dict({**data, **typed}, source=where,
                                                           typed_keys=typed.typed_keys))
        if merged is None:
            return cls.from_dict({**data, **typed}, source=str(path))   # the one read that warns
        # the error is the file's where the file alone raises it, else the command line's
        if merged == _config_error(lambda where: cls.from_dict(data, source=where)):
            raise ConfigError(merged.replace(_SOURCE, str(path))) from None
        in_turn = _config_error(lambda where: cls.from_dict(data, source=where).update(typed, source="command line"))
        raise ConfigError(in_turn if in_turn is not None and in_turn.startswith("command line: ") else
                          merged.replace(_SOURCE, "command line")) from None

    def update(self, data: dict[str, Any], *, source: str = "config", typed_keys: Optional[dict[str, str]] = None):
        """Sets the options `data` gives. `typed_keys`: option -> the key that sets it on the command line (a pipeline
        stage's `grpo.run-name`), for the quoting an error shows; parse_overrides' mapping carries its own."""
        # Applied to a copy and taken over only once it validates: a caller that catches the error
        # (an interactive session, a sweep trying overrides) keeps a config that is still valid.
        typed_keys = typed_keys or getattr(data, "typed_keys", {})
        new = copy.copy(self)
        hints = typing.get_type_hints(type(self))
        names = self.field_names()
        for key, value in option_names(data, source).items():
            if key not in names:
                raise ConfigError(f"{source}: unknown option {key!r} for {type(self).__name__}{_did_you_mean(key, names)}"
                                  f"{_other_config_hint(key, type(self))}")
            setattr(new, key, coerce(key, self._from_bool(key, value), hints[key], source, typed=typed_keys.get(key)))
        try:
            new.validate()
        except ConfigError as e:
            # validate()'s range and choice checks name the option, not where its value came from: `r1fast train
            # my.yaml loss_type=dapo` said "option 'loss_type' must be one of ...; got 'grp'" of the file's value
            if str(e).startswith(f"{source}: "):
                raise
            raise ConfigError(f"{source}: {e}") from None
        vars(self).update(vars(new))
        return self

    def to_dict(self) -> dict[str, Any]:
        # not dataclasses.asdict: it deep-copies a reward function object (a judge holding a model or a lock),
        # copying the model or failing ("cannot pickle '_thread.lock' object") at the run's first log or save
        values = {name: getattr(self, name) for name in self.field_names()}
        return {name: [v if callable(v) else copy.deepcopy(v) for v in value] if isinstance(value, list)
                else copy.deepcopy(value) for name, value in values.items()}

    def to_json_dict(self) -> dict[str, Any]:
        """to_dict() as a checkpoint records it: a reward function passed as a Python callable is written
        as its "module:function" name (json.dump failed on the function object, at the run's first save)."""
        return {k: _recorded_names(v) if isinstance(v, list) else v for k, v in self.to_dict().items()}

    def _advise(self, advice: list[str]):
        """Warns of each piece of `advice` (a valid value that is likely a mistake) once per config: read from a
        file, then validated again by the trainer, a config's warning was printed twice (from two call sites,
        which Python's once-per-place filter tells apart). Advice on values changed since is given."""
        given = vars(self).get("_advice_given", frozenset())
        for text in advice:
            if text not in given:
                warnings.warn(text, UserWarning, stacklevel=3)   # where validate() was called
        # a new set, not the old one added to: update()'s trial copy (copy.copy) shares the attribute
        self._advice_given = given | frozenset(advice)

    def validate(self):
        """Checks every value; subclasses add their range checks after this one. A config built in
        Python (GRPOConfig(max_steps=1.5), or an attribute set afterwards) gets the same type checks
        and conversions as one read from YAML or the command line."""
        hints = typing.get_type_hints(type(self))
        for name in self.field_names():
            value = self._from_bool(name, getattr(self, name))
            if name == "reward_funcs" and _is_reward_set(value):
                raise _reward_set_in_config(type(self).__name__, self.field_names())
            if name == "reward_funcs" and isinstance(value, (list, tuple)):  # Python may pass the functions
                value = [v if callable(v) else coerce(name, v, str, type(self).__name__, element=True) for v in value]
                setattr(self, name, value)
                continue
            setattr(self, name, expand_home(name, coerce(name, value, hints[name], type(self).__name__)))


_SOURCE = "\0source\0"   # stands for where a value came from while two reads' errors are compared


def _config_error(build) -> Optional[str]:
    """The ConfigError `build(_SOURCE)` raises, as text (None when it passes), its warnings kept quiet: a warning
    of one read (cispo's epsilon_high) may be one the other mends, and the config kept warns as it is built."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build(_SOURCE)
    except ConfigError as e:
        return str(e)
    return None


def _is_reward_set(value) -> bool:
    from r1fast.rewards.combine import RewardSet

    return isinstance(value, RewardSet)


def _reward_set_in_config(config_name: str, fields) -> ConfigError:
    """A RewardSet as a config's reward_funcs read 'expects list, got <...RewardSet object at 0x...>': say how."""
    settings = [o for o in ("reward_weights", "reward_timeout", "format_pattern", "language", "length_penalty_target")
                if o in fields]
    to_trainer = "; or pass the set itself to GRPOTrainer(model, reward_set, ...)" if "reward_weights" in fields else ""
    return ConfigError(f"{config_name}: option 'reward_funcs' is a RewardSet; a config takes its functions, "
                       f"reward_funcs=reward_set.specs, with the set's settings as the options "
                       f"{', '.join(settings)}{to_trainer}")


# options naming a file or folder: a leading ~ is the home directory, as in a shell (left as it was, a
# YAML `output_dir: ~/runs/x` made a folder named "~" in the working directory)
PATH_OPTIONS = ("output_dir", "model_name_or_path", "model", "dataset", "eval_dataset", "output_file")


# text options that name something (a file, a column, a split, a pattern), so that an empty value names nothing:
# refused, with what to give. An empty system_prompt is no system prompt, empty stop_tokens or report_to none.
NAMES_SOMETHING = {
    "output_dir": "a folder",
    "model_name_or_path": "a model folder or builtin:<size>", "model": "a model folder or builtin:<size>",
    "dataset": "a path or builtin:<task>", "eval_dataset": "a path or builtin:<task>",
    "output_file": "the JSONL file to write",
    "dataset_split": "a split's name", "eval_dataset_split": "a split's name",
    "prompt_column": "a column's name", "answer_column": "a column's name", "completion_column": "a column's name",
    "run_name": "a folder name", "format_pattern": "a regular expression", "language": "a language code",
}


def expand_home(name: str, value):
    return os.path.expanduser(value) if name in PATH_OPTIONS and isinstance(value, str) and \
        value.startswith("~") else value


PACKAGED_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def packaged_config_names() -> list[str]:
    """The names (without .yaml) of the configs r1fast ships, which resolve_config_path finds from any directory."""
    return sorted(f[:-5] for f in os.listdir(PACKAGED_CONFIGS) if f.endswith(".yaml"))


def resolve_config_path(path: str | os.PathLike) -> str:
    """`path`, or where it does not exist, the config r1fast ships under that file name
    (`r1_pipeline`, `r1_pipeline.yaml` or `r1fast/configs/r1_pipeline.yaml` from any directory)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    name = os.path.basename(path)
    packaged = os.path.join(PACKAGED_CONFIGS, name if name.endswith((".yaml", ".yml")) else name + ".yaml")
    if os.path.isfile(packaged):
        return packaged
    if os.path.isdir(path):  # it exists, so "does not exist" would send the user looking in the wrong place
        raise ConfigError(f"config file {path!r} is a directory, not a YAML file")
    shipped = ", ".join(packaged_config_names())
    raise ConfigError(f"config file {path!r} does not exist (r1fast's own configs: {shipped})")


class _RepeatedKey(Exception):
    def __init__(self, key, line: int, first_line: int):
        super().__init__(key, line, first_line)
        self.key, self.line, self.first_line = key, line, first_line


def _unique_key_loader():
    """yaml.SafeLoader refusing a key given twice in one mapping: YAML keeps the last, so a `max_steps: 5` high in a
    file and a `max_steps: 500` lower down trained 500 steps without a word. A merge key's (<<: *base) entries
    are meant to be overridden and are left out. Numbers and dates keep their text (_keep_text)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                first: dict = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                        continue
                    key = self.construct_object(key_node, deep=True)
                    line = key_node.start_mark.line + 1
                    if key in first:
                        raise _RepeatedKey(key, line, first[key])
                    first[key] = line
            return super().construct_mapping(node, deep=deep)

    # a number or date keeps the text it was written as, for a text option (system_prompt: 12:30 was 750): as on
    # the command line (_keep_text)
    for tag, construct in (("int", yaml.SafeLoader.construct_yaml_int), ("float", yaml.SafeLoader.construct_yaml_float),
                           ("timestamp", yaml.SafeLoader.construct_yaml_timestamp)):
        UniqueKeyLoader.add_constructor(f"tag:yaml.org,2002:{tag}",
                                        lambda loader, node, construct=construct: _keep_text(construct(loader, node),
                                                                                             node.value))
    return UniqueKeyLoader


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    path = resolve_config_path(path)
    if path.lower().endswith(_DATA_SUFFIXES):   # read as YAML: "not valid YAML: expected '<document start>'"
        raise DatasetAsConfig(path)
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.load(f, Loader=_unique_key_loader())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        except _RepeatedKey as e:
            raise ConfigError(f"{path} line {e.line}: key {e.key!r} is given twice (first on line {e.first_line}); "
                              f"YAML would keep only the last: remove one") from None
        except UnicodeDecodeError as e:  # decoding happens as yaml reads, and its error names no file
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset "
                              f"{e.start}); save the config as UTF-8") from None
    if data is None:
        return {}
    if isinstance(data, list) and path.lower().endswith(".json"):   # a JSON dataset: a list of rows
        raise DatasetAsConfig(path)
    if not isinstance(data, dict):
        # a number keeps its text in a type of r1fast's own (_keep_text), whose name meant nothing to the reader
        kind = next(c.__name__ for c in type(data).__mro__ if not c.__name__.startswith("_"))
        raise ConfigError(f"{path}: expected a mapping at the top level, got {kind}")
    return data


# the data files r1fast.data reads that are never a config (a .json one may be either: a mapping is a config)
_DATA_SUFFIXES = (".jsonl", ".parquet", ".csv")


class DatasetAsConfig(ConfigError):
    """A dataset file given where a config goes (`path`); a pipeline says how its stages take one instead.
    `r1fast train data.jsonl`: read as YAML, the error spoke of YAML documents, a top-level str, or (one JSON
    line) its columns as unknown options."""

    def __init__(self, path: str):
        super().__init__(f"{path} is a dataset, not a config YAML: give it as dataset={shlex.quote(path)} (with "
                         f"model_name_or_path=...), after the config if there is one")
        self.path = path


def option_names(data: dict, source: str) -> dict:
    """data under the names a config reads its options by ("max-steps" is max_steps). Two spellings of one option
    are refused: the later one was kept and the other dropped without a word."""
    named: dict = {}
    spelt: dict = {}
    for key, value in data.items():
        option = str(key).replace("-", "_")
        if option in named:
            raise ConfigError(f"{source}: {spelt[option]!r} and {key!r} are one option, {option!r}: give it once")
        named[option], spelt[option] = value, key
    return named


_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*=")  # key=value, or stage.key=value in a pipeline


class Overrides(dict):
    """parse_overrides' {option: value}, with `typed_keys`: {option: the key as typed} (`grpo.run-name` is read as
    grpo.run_name), which an error's quoting shows."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.typed_keys: dict[str, str] = {}


def parse_overrides(args: list[str]) -> Overrides:
    """`--key value`, `--key=value` and `key=value` → {key: value} (values parsed as YAML scalars)."""
    import yaml

    out = Overrides()
    spelt = out.typed_keys   # the key as typed, by the name it is read as
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            a = a[2:]
            if "=" in a:
                key, raw = a.split("=", 1)
            else:
                if i + 1 >= len(args) or args[i + 1].startswith("--"):
                    raise ConfigError(f"command line: option --{a} needs a value")
                if _OVERRIDE.match(args[i + 1]):  # `--lr beta=0.1`: a forgotten value, not the value "beta=0.1"
                    raise ConfigError(f"command line: option --{a} needs a value; {args[i + 1]!r} is an override of "
                                      f"its own (write {shlex.quote(f'--{a}={args[i + 1]}')} if that is the value)")
                key, raw = a, args[i + 1]
                i += 1
        elif "=" in a:
            key, raw = a.split("=", 1)
        else:
            raise ConfigError(f"command line: cannot read {a!r}; write --key value or key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
            comment = _yaml_comment(raw)
        except yaml.YAMLError:
            value, comment = raw, ""
        markup = _yaml_markup(raw)
        if markup:
            raise ConfigError(f"command line: {key}={raw}: YAML reads {markup}; to give it as text, quote it "
                              f"({_quoted_advice(key, raw)})")
        if comment:
            # `output_file='#2.jsonl'` was null (the default file), `system_prompt='Be brief #1'` lost its '#1': the
            # shell passes a # only when the user quoted it, so it is meant as text, never as a YAML comment
            raise ConfigError(f"command line: {key}={raw}: YAML reads {comment!r} as a comment and drops it (the value "
                              f"read is {value!r}); to give it as text, quote it ({_quoted_advice(key, raw)}), or leave "
                              f"the comment out")
        if isinstance(value, str):   # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        # a pipeline's `stage.option`: the stage's name is its own (`cold-start.max-steps` read as stage 'cold_start'
        # was "no stage named ['cold_start']; did you mean 'cold-start' (cold-start.max_steps=...)?"), the option's is
        # read with - as _
        stage, dot, name = key.rpartition(".")
        option = stage + dot + name.replace("-", "_")
        # the same spelling twice is a later override of an earlier one (a script adding to a command);
        # two spellings of one option are as in a file, refused: which was meant is not known
        if spelt.get(option, key) != key:
            raise ConfigError(f"command line: {spelt[option]!r} and {key!r} are one option, {option!r}: "
                              f"give it once")
        spelt[option] = key
        out[option] = _keep_text(value, raw)
        i += 1
    return out


def _yaml_markup(raw: str) -> str:
    """What YAML reads in `raw` as markup that is neither text nor a list or mapping (an anchor, an alias, a tag, an
    empty block scalar, a document marker), said with what to do instead; else "". Such a value was read as YAML
    makes of it without a word: `run_name='&a x'` named the run 'x', `run_name='&a'` or `run_name=---` left it unset,
    `system_prompt='|'` was empty and `run_name='!!int 5'` the text '!!int 5'. None has a use in one value (an
    alias has no anchor to refer to, a block no lines), and the shell passes & | > ! only quoted: the text was meant.
    A value YAML cannot begin to read (a leading @ or `, reserved; a %, a directive, which needs a document after
    it) is the text as typed, as before."""
    import yaml

    try:
        tokens = list(yaml.scan(raw))
    except yaml.YAMLError:
        return ""
    for t in tokens:
        text = raw[t.start_mark.index:t.end_mark.index]
        if isinstance(t, yaml.AnchorToken):
            return f"{text!r} as an anchor, a label that it drops, keeping what follows ({_read_as(raw)})"
        if isinstance(t, yaml.AliasToken):
            return f"{text!r} as an alias, a reference to a value labelled &{t.value} elsewhere in a YAML file"
        if isinstance(t, yaml.TagToken):
            return (f"{text!r} as a tag, the type to read what follows it as, which an option's own type decides "
                    f"here: leave the tag out")
        if isinstance(t, yaml.ScalarToken) and t.style in ("|", ">") and "\n" not in raw:
            return f"{text!r} as the start of a block of text on the lines below, which a value has none of " \
                   f"({_read_as(raw)})"
        if isinstance(t, (yaml.DocumentStartToken, yaml.DocumentEndToken)):
            return (f"{text!r} as the {'start' if isinstance(t, yaml.DocumentStartToken) else 'end'} of a YAML "
                    f"document ({_read_as(raw)})")
    return ""


def _read_as(raw: str) -> str:
    """"the value read is ...": what YAML makes of `raw`, or that it reads none."""
    import yaml

    try:
        return f"the value read is {yaml.safe_load(raw)!r}"
    except yaml.YAMLError:
        return "it reads no value"


def _yaml_comment(raw: str) -> str:
    """The comment YAML drops from the end of `raw` (" #..." after the value, or all of "#..."), else ""."""
    import yaml

    ends = [t.end_mark.index for t in yaml.scan(raw) if not isinstance(t, yaml.StreamEndToken)]
    rest = raw[max(ends, default=0):].strip()
    return rest if rest.startswith("#") else ""


class _IntAsTyped(int):
    """A command-line number with the text it was typed as, `text`, for an option that takes text."""


class _FloatAsTyped(float):
    """As _IntAsTyped, for a float."""


def _keep_text(value, raw: str):
    """A value YAML read as a number keeps its text: the option's type, known only to coerce, says
    which is meant (system_prompt=12:30 was the sexagesimal 750, run_name=007 was '7', output_file=1e3 '1000.0').
    A date or time (run_name=2024-05-01) is the text itself: no option takes one."""
    import datetime

    if isinstance(value, (datetime.date, datetime.datetime)):
        return raw
    if type(value) in (list, dict):   # for a text option's error, which says how to quote what was typed
        typed = _ListAsTyped(value) if isinstance(value, list) else _DictAsTyped(value)
        typed.text = raw
        return typed
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    typed = _IntAsTyped(value) if isinstance(value, int) else _FloatAsTyped(value)
    typed.text = raw
    return typed


class _ListAsTyped(list):
    """A command-line value YAML read as a list, with the text it was typed as, `text` (for a text option's error)."""


class _DictAsTyped(dict):
    """As _ListAsTyped, for a mapping."""


def _yaml_collection(value) -> str:
    """What YAML reads as a list or a mapping (`value`'s kind), said where a text option is given one."""
    if isinstance(value, list):
        return "YAML reads a lone -, a value starting with '- ' or one in [brackets] as a list"
    return "YAML reads a value in {braces}, one holding ': ' or a lone ? as a mapping"


def _quoted_advice(key: str, typed: Optional[str], placeholder: str = "text") -> str:
    """How to quote `typed` (the text given, where known) for option `key` (as typed: a pipeline's `grpo.dataset`),
    in a YAML file and on the command line; `placeholder` where the text is unknown or holds a quote or a character
    the shell reads inside double quotes."""
    text = typed if typed and not set(typed) & set("'\"\\$`!") else placeholder
    return f"in a YAML file {key.rpartition('.')[2]}: '{text}', on the command line {key}=\"'{text}'\""


def coerce(key: str, value: Any, hint: Any, source: str, element: bool = False, typed: Optional[str] = None) -> Any:
    """value as the option's type hint says; element: value is one entry of the option's list; `typed`: the key that
    sets the option on the command line (a pipeline stage's `grpo.run-name`; default `key`), for an error's quoting."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        return coerce(key, value, inner[0], source, element, typed)
    takes_no_none = hint in (bool, int, float, str, dict) or origin in (list, tuple, dict)
    if value is None and not element and takes_no_none:
        # `min_p:` left empty or `min_p: null`, meant as "no value": the option has no such value
        # typed (`prompt_column=~`), there is no empty YAML value and no line to drop
        how = ("(YAML reads ~ and null as null): leave the option out to keep its default"
               if source.startswith("command line") else "(an empty YAML value is null): drop the line to keep its default")
        raise ConfigError(f"{source}: option {key!r} expects {getattr(hint, '__name__', hint)} and cannot be null {how}")
    bad = ConfigError(f"{source}: option {key!r} expects {getattr(hint, '__name__', hint)}, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad
    if hint in (int, float):
        _refuse_octal(key, value, source)
    if hint is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            return _int_text(value, bad)
        raise bad
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad
        try:
            number = float(value)
        except ValueError:
            raise bad from None
        if not math.isfinite(number):  # inf/nan would pass most range checks and train on garbage
            raise ConfigError(f"{source}: option {key!r} must be a finite number, got {value!r}")
        return number
    if hint is str:
        if value == "" and not element and key in NAMES_SOMETHING:
            # `output_file=` wrote to the default runs/sample/samples.jsonl, `dataset_split=` read the default split,
            # `format_pattern=` checked the default format: an empty value was taken as no value, without a word
            raise ConfigError(f"{source}: option {key!r} is empty, which names nothing; give {NAMES_SOMETHING[key]}")
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return getattr(value, "text", None) or str(value)
        if isinstance(value, bool):   # `fp8=on`: "expects str, got True" did not say where the True came from
            raise ConfigError(f"{source}: option {key!r} expects str, got {value!r}: YAML reads an unquoted yes, no, "
                              f"on, off, true or false as a boolean; to give the word, quote it "
                              f"({_quoted_advice(typed or key, None, 'word')})")
        if isinstance(value, (list, dict)) and not element:
            # `dataset=-` said "expects str, got [None]": YAML's list of one empty item, which the user never typed
            raise ConfigError(f"{source}: option {key!r} expects str, got {value!r}: {_yaml_collection(value)}; "
                              f"to give the text, quote it "
                              f"({_quoted_advice(typed or key, getattr(value, 'text', None))})")
        raise bad
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise bad
        if key in TOKEN_TEXT_OPTIONS:
            _check_token_texts(key, value, source)
        return [coerce(key, v, args[0], source, element=True) for v in value] if args else list(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: option {key!r} expects a mapping (in YAML `{key}: {{name: value}}`, on the "
                              f"command line {key}='{{name: value}}'), got {value!r:.80}")
        return dict(value)
    return value


def _refuse_octal(key: str, value, source: str):
    """YAML 1.1 reads a whole number with a leading 0 as octal: `seed: 0123` was 83, `save_steps: 0100` 64, in a file
    or typed, without a word (YAML 1.2 and Python read no octal so). The number kept its text (_keep_text): said
    where the two readings differ, with both."""
    text = getattr(value, "text", None)
    if not (isinstance(value, int) and text and re.fullmatch(r"[-+]?0[0-7_]+", text.strip())):
        return
    decimal = int(text.replace("_", ""), 10)
    if decimal != value:
        raise ConfigError(f"{source}: option {key!r}: YAML reads {text.strip()}, a number with a leading 0, as the "
                          f"octal {int(value)}; write {decimal} (or {int(value)}) without the leading 0")


def _int_text(text: str, bad: ConfigError) -> int:
    """The whole number `text` writes, or `bad`. YAML 1.1 reads an exponent without a dot (1e3) as text, which the
    command line reads as the number (YAML reads it as text there too, then float() does): a file's `max_steps: 1e3`
    was refused as "expects int, got '1e3'" where `max_steps=1e3` typed was 1000."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        raise bad from None
    if not number.is_integer():   # inf and nan are not
        raise bad
    return int(number)


# options whose entries are token texts: a number there is a token id or a typo, never the digits' text
TOKEN_TEXT_OPTIONS = ("stop_tokens", "eval_stop_tokens")


def _check_token_texts(key: str, values, source: str):
    for v in values:
        if not isinstance(v, str) or not v:
            raise ConfigError(f"{source}: option {key!r} takes tokens as text (in YAML `{key}: [\"<|im_end|>\"]`); "
                              f"got {v!r}" + (" (token ids are not accepted)" if isinstance(v, int) else ""))


def _check(cond: bool, msg: str):
    if not cond:
        raise ConfigError(msg)


def _one_of(name: str, value, choices):
    _check(value in choices, f"option {name!r} must be one of {', '.join(map(str, choices))}; got {value!r}")


DTYPES = ("float32", "bfloat16", "float16")


def check_device(value: Optional[str]):
    """A device string torch can parse (`cpu`, `cuda`, `cuda:1`...), checked here so a typo is a
    ConfigError before any model is built rather than a RuntimeError from deep in torch."""
    if value is None:
        return
    import torch

    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        raise ConfigError(f"option 'device' must be a torch device such as cpu, cuda or cuda:0; "
                          f"got {value!r}") from None


def _check_rewards(names: list[str], length_target: Optional[int], length_option: bool = True, language: str = "en"):
    """Reward names resolve now (a built-in, an importable module:function, an existing file.py:function),
    so a typo fails at load, not when the stage that uses it starts. A file is only run when used.
    `length_option`: whether the config has length_penalty_target, which reward 'length' needs; `language`: the
    option reward 'language' reads."""
    from r1fast.rewards.combine import BUILTIN_NAMES, load_function
    from r1fast.rewards.language import LANGUAGES

    _check(len(names) >= 1, "option 'reward_funcs' needs at least one reward function")
    for name in names:
        if callable(name) or name in BUILTIN_NAMES:  # a function passed in Python is checked when called
            continue
        path = name.rpartition(":")[0]
        if path.endswith(".py"):
            _check(os.path.isfile(path), f"option 'reward_funcs': file {path!r} of {name!r} does not exist")
            continue
        try:
            load_function(name)
        except ValueError as e:
            raise ConfigError(f"option 'reward_funcs': {e}") from None
    # SampleConfig has no length_penalty_target: naming it sent the user to an option it then called unknown
    _check("length" not in names or length_option,
           "option 'reward_funcs': reward 'length' (GRPO's length penalty, whose target is GRPOConfig's "
           "length_penalty_target) is not available to rejection sampling, which has no such option: leave it out")
    _check("length" not in names or (length_target or 0) >= 1,
           "reward 'length' needs option 'length_penalty_target' (a token count >= 1)")
    _check("language" not in names or language in LANGUAGES,
           f"option 'language': unknown language {language!r} for reward 'language'; known: {', '.join(LANGUAGES)}")


def _check_reward_timeout(value: Optional[float]):
    _check(value is None or value > 0,
           f"option 'reward_timeout' must be a positive number of seconds (null: no limit); got {value}")


def _check_seed(seed: int):
    # [0, 2**32) is numpy's seed range (and so the usual one, as in transformers' set_seed); torch's
    # generators take uint64, but r1fast derives seeds from this one (DataCursor: seed * 7919 + epoch,
    # the pipeline's seed * 1000 + 7), and 2**32 keeps those far below 2**64.
    _check(0 <= seed < 2**32, f"option 'seed' must be in [0, 2**32); got {seed}")


def _check_temperature(name: str, value: float, greedy_ok: bool):
    """The rollout's own rule (SamplingParams), applied at load so a bad value fails before any model
    is built rather than at the first generate."""
    from r1fast.rollout.params import MIN_TEMPERATURE

    if greedy_ok:
        _check(value == 0 or value >= MIN_TEMPERATURE,
               f"option {name!r} must be 0 (greedy) or >= {MIN_TEMPERATURE}; got {value}")
    else:  # GRPO's loss divides the logits by it: greedy has no log-probabilities to train on
        _check(value >= MIN_TEMPERATURE, f"option {name!r} must be >= {MIN_TEMPERATURE}; got {value}")


def check_template_kwargs(name: str, value: Optional[dict]):
    """Keyword arguments for the tokenizer's apply_chat_template: the template's variables by name, none that
    r1fast's own call sets, and values a checkpoint's JSON records (a resume compares them)."""
    import json

    from r1fast.data.loading import RESERVED_TEMPLATE_KWARGS

    if value is None:
        return
    for key in value:
        _check(isinstance(key, str) and key.isidentifier(),
               f"option {name!r}: keys must be the chat template's variable names (strings such as "
               f"enable_thinking); got {key!r}")
        _check(key not in RESERVED_TEMPLATE_KWARGS,
               f"option {name!r}: {key!r} is set by r1fast itself when it applies the chat template; leave it out")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"option {name!r}: values must be JSON data (strings, numbers, booleans, lists, "
                          f"mappings), which a checkpoint records; {e}") from None


def check_regex(name: str, value: Optional[str]):
    if value is None:
        return
    try:
        re.compile(value)
    except re.error as e:
        raise ConfigError(f"option {name!r} is not a valid regular expression ({e}): {value!r}") from None


@dataclass
class _TrainingConfig(_Base):
    """Optimiser, schedule, batch, output and device options that GRPO and SFT share (TRL's names).

    Subclasses override the defaults that differ (learning rate, Adam's beta2, schedule, logging).
    """

    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_steps: int = -1
    num_train_epochs: float = 1.0
    seed: int = 42
    output_dir: Optional[str] = None         # default: ./runs/<run_name>
    run_name: Optional[str] = None
    save_steps: int = 0                      # 0: only at the end
    save_total_limit: Optional[int] = 2      # None: keep every checkpoint
    # a new run into an output_dir holding an earlier run's checkpoints: delete them (and its metrics)
    # first; default: refuse (--resume continues that run instead)
    overwrite_output_dir: bool = False
    logging_steps: int = 10
    report_to: list[str] = field(default_factory=list)   # "tensorboard", "wandb" ("none" as in TRL: nothing)
    progress_bar: bool = True
    device: Optional[str] = None             # default: cuda when present, else cpu
    dtype: str = "float32"
    # 16-bit parameters are stepped through fp32 copies the optimizer keeps (AdamW's small steps would
    # round away on the 16-bit weights themselves): 4 bytes per parameter for the copy and 4 more for
    # AdamW's moments in fp32 (the step's fp32 gradients exist 256 MB at a time)
    fp32_master_weights: bool = True
    # with fp32_master_weights: the micro-batches' gradients are summed in fp32 (the copies' gradients)
    # rather than in the 16-bit gradient, whose every addition rounds (0.4% relative error at 16
    # micro-batches, 1-7% at 256): 4 bytes per parameter between the backward passes instead of 2
    fp32_grad_accumulation: bool = True
    max_nonfinite_steps: int = 10            # abort after this many skipped (NaN/inf) steps in a row

    def validate(self):
        super().validate()
        _check_seed(self.seed)
        _check(self.max_nonfinite_steps >= 1,
               f"option 'max_nonfinite_steps' must be >= 1; got {self.max_nonfinite_steps}")
        _check(self.learning_rate >= 0, f"option 'learning_rate' must be >= 0; got {self.learning_rate}")
        _check(self.weight_decay >= 0, f"option 'weight_decay' must be >= 0; got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            _check(0 <= getattr(self, name) < 1, f"option {name!r} must be in [0, 1); got {getattr(self, name)}")
        _check(self.adam_epsilon > 0, f"option 'adam_epsilon' must be > 0; got {self.adam_epsilon}")
        _check(self.max_grad_norm >= 0, f"option 'max_grad_norm' must be >= 0 (0: no clipping); got {self.max_grad_norm}")
        _one_of("lr_scheduler_type", self.lr_scheduler_type, SCHEDULERS)
        _one_of("dtype", self.dtype, DTYPES)
        check_device(self.device)
        _check(self.warmup_steps >= 0, f"option 'warmup_steps' must be >= 0; got {self.warmup_steps}")
        _check(self.per_device_train_batch_size >= 1, "option 'per_device_train_batch_size' must be >= 1")
        _check(self.gradient_accumulation_steps >= 1, "option 'gradient_accumulation_steps' must be >= 1")
        _check(self.max_steps == -1 or self.max_steps >= 1,
               f"option 'max_steps' must be positive, or -1 to use num_train_epochs; got {self.max_steps}")
        _check(self.max_steps > 0 or self.num_train_epochs > 0, "option 'num_train_epochs' must be > 0")
        _check(0 <= self.warmup_ratio < 1, f"option 'warmup_ratio' must be in [0, 1); got {self.warmup_ratio}")
        _check(self.save_steps >= 0 and self.logging_steps >= 1 and
               (self.save_total_limit is None or self.save_total_limit >= 1),
               "options 'save_steps' >= 0, 'logging_steps' >= 1 and 'save_total_limit' >= 1 (or null: keep every "
               "checkpoint) are required")
        self.report_to = [r for r in self.report_to if r != "none"]  # TRL's way of saying "no tracker"
        for r in self.report_to:
            _one_of("report_to", r, ("tensorboard", "wandb"))
        check_run_folder(self.output_dir)


def folder_obstacle(folder: str) -> Optional[str]:
    """What stops a write into `folder` (made with os.makedirs where it is missing), or None: the first name on its
    way that exists is a symlink to nothing (a disk not mounted, a folder moved: "[Errno 17] File exists"), a
    file, or a folder that cannot be written. Run folders and sampled outputs are checked with it before a model
    loads or a sampling runs, not when they are written."""
    found = os.path.abspath(folder)
    while not os.path.lexists(found) and os.path.dirname(found) != found:   # a symlink to nothing ends the walk
        found = os.path.dirname(found)
    if os.path.islink(found) and not os.path.exists(found):
        return f"{found} is a symlink to {os.readlink(found)!r}, which does not exist (make it, or mount its disk)"
    if not os.path.isdir(found):
        return f"{found} is a file, not a folder"
    if not os.access(found, os.W_OK):
        return f"folder {found} cannot be written"
    return None


def is_folder_name(name) -> bool:
    """A name that makes one folder inside another (a stage's <run>/<name>, a run's runs/<run_name>): not empty, '.'
    or '..', and without a path separator (an absolute path has one)."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and os.sep not in name


def check_run_name(run_name: Optional[str], output_dir: Optional[str]):
    """run_name names the run's folder runs/<run_name> where output_dir is unset (common.run_dir_for): '..' was the
    working directory itself (which overwrite_output_dir cleared), '../x', 'a/b' or an absolute path a folder outside
    runs/. Given output_dir, run_name names the run only (its wandb name), and any text does."""
    if not output_dir and run_name and not is_folder_name(run_name):
        raise ConfigError(f"option 'run_name' = {run_name!r}: with output_dir unset the run writes into "
                          f"runs/<run_name>/, so run_name must be a folder name (not '.' or '..', no '/'); to write "
                          f"the run elsewhere, give output_dir=PATH")


def check_run_folder(output_dir: Optional[str], option: str = "option 'output_dir'"):
    """An output_dir that cannot be made or written (a file, under a file or a symlink to nothing): found before the
    model loads (a large one takes minutes), not as "[Errno 17] File exists" when the run began."""
    obstacle = folder_obstacle(output_dir) if output_dir else None
    if obstacle:
        raise ConfigError(f"{option} = {output_dir!r}: {obstacle}; give another output_dir, the folder for the "
                          f"run's checkpoints and metrics")


@dataclass
class GRPOConfig(_TrainingConfig):
    """GRPO hyper-parameters. Names follow TRL's GRPOConfig where the meaning is the same.

    One rollout draws `per_device_train_batch_size * gradient_accumulation_steps` completions
    (that many / `num_generations` prompts); each of `num_iterations` passes over it is one
    optimizer step made of `gradient_accumulation_steps` micro-batches. `max_steps` and
    `save_steps` count optimizer steps, as in TRL (the last rollout stops at `max_steps`, part way
    through its passes if need be).
    """

    # model / data
    model_name_or_path: Optional[str] = None
    dataset: Optional[str] = None            # path (jsonl/parquet/saved dataset) or "builtin:<task>"
    dataset_split: Optional[str] = None
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    eval_dataset: Optional[str] = None
    # a saved DatasetDict's split for eval_dataset; null: its test / validation / eval split, else its first
    eval_dataset_split: Optional[str] = None
    eval_size: int = 64                      # held-out prompts used; 0: every row of an eval_dataset file
    eval_steps: Optional[int] = 0            # 0 or null: evaluate only at the start and at the end
    eval_temperature: float = 1.0
    eval_samples_per_prompt: int = 1
    system_prompt: Optional[str] = None
    # passed to the tokenizer's apply_chat_template (Qwen3's {enable_thinking: false}), as TRL's option
    chat_template_kwargs: Optional[dict[str, Any]] = None
    # tokens (as text, one token each) a completion also stops at, besides the tokenizer's and the model's eos:
    # a base model trained with a chat template whose turns end with another token (Qwen2.5's <|im_end|>)
    stop_tokens: Optional[list[str]] = None
    # optimisation (the rest: _TrainingConfig)
    learning_rate: float = 1e-6
    adam_beta2: float = 0.99
    logging_steps: int = 1
    # GRPO
    num_generations: int = 8
    num_iterations: int = 1
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None
    delta: Optional[float] = None
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    advantage_estimator: str = "grpo"
    importance_sampling_level: str = "token"
    kl_estimator: str = "k3"
    use_bias_correction_kl: bool = False     # KL weighted by the importance ratio (TRL's default is True)
    entropy_coef: float = 0.0
    tis_mode: str = "mask"                   # truncated importance sampling against the sampler (TRL's default)
    tis_cap: float = 3.0
    tis_level: str = "sequence"
    mask_truncated_completions: bool = False
    # sampling
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                          # -1 or 0: no limit
    min_p: float = 0.0
    max_completion_length: int = 256
    max_prompt_length: int = 512
    # rollout engine
    engine_block_size: int = 16
    engine_max_num_seqs: Optional[int] = None   # None: a whole rollout decodes at once (at most 1024 rows)
    # training: a group's prompt goes through the model once per micro-batch, its completions continue it
    share_prompts: bool = True
    engine_max_num_batched_tokens: int = 8192
    engine_num_blocks: Optional[int] = None
    # rewards
    reward_funcs: list[str] = field(default_factory=lambda: ["accuracy", "format"])
    reward_weights: Optional[list[float]] = None
    format_pattern: Optional[str] = None
    language: str = "en"
    length_penalty_target: Optional[int] = None
    # seconds one reward function's call on a batch may take; past it training stops with a RewardTimeout
    reward_timeout: Optional[float] = None
    # output (output_dir, run_name, save_steps, ...: _TrainingConfig)
    log_completions: int = 2                 # sample completions written to the log per logging step
    _BOOL_COUNTS = {"log_completions": 2}    # TRL's log_completions is a bool
    _OFF_WORDS = ("fp8",)                      # `fp8: off` in YAML arrives as False
    _BOOL_WORDS = {"scale_rewards": ("none", "group")}   # TRL's GRPOConfig: false -> "none", true -> "group"
    _NONE_WORDS = ("tis_mode",)                # LossOptions(tis_mode=None) is tis_mode "none"
    # precision (device, dtype: _TrainingConfig)
    fp8: str = "off"                         # off | emulate | torch | te | auto (docs/fp8.md)
    fp8_recipe: Optional[str] = None         # te: current (default) | delayed | block | mxfp8
    fp8_scaling: Optional[str] = None        # torch / emulate: rowwise (default) | tensorwise
    fp8_grad_dtype: str = "e5m2"             # FP8 format of the gradients: e5m2 | e4m3

    def fp8_options(self):
        """fp8 and its sub-options as validated r1fast.fp8.Fp8Options."""
        from r1fast.fp8 import MODES, as_options

        _one_of("fp8", self.fp8, MODES)
        try:
            return as_options(self.fp8, self.fp8_recipe, self.fp8_grad_dtype, self.fp8_scaling)
        except ValueError as e:  # name the config options, not make_options' keywords
            raise ConfigError(f"options fp8 / fp8_recipe / fp8_scaling / fp8_grad_dtype: {e}") from None

    def loss_options(self, num_items: Optional[float] = None):
        """The r1fast.ops.LossOptions of these options (`num_items`: the generation batch's token count,
        which dapo/cispo divide by). validate() builds them too, so the loss's own rules (epsilon < 1
        unless cispo, ...) fail at load rather than at the first step."""
        from r1fast.ops.loss_options import LossOptions

        try:
            return LossOptions(beta=self.beta, epsilon=self.epsilon, epsilon_high=self.epsilon_high, delta=self.delta,
                               loss_type=self.loss_type, importance_sampling_level=self.importance_sampling_level,
                               max_completion_length=self.max_completion_length, temperature=self.temperature,
                               kl_estimator=self.kl_estimator, tis_mode=None if self.tis_mode == "none" else self.tis_mode,
                               tis_cap=self.tis_cap, tis_level=self.tis_level, entropy_coef=self.entropy_coef,
                               num_items=num_items if self.loss_type in ("dapo", "cispo") else None,
                               use_bias_correction_kl=self.use_bias_correction_kl)
        except ValueError as e:  # its messages say LossOptions.<field>; the fields are this config's options
            msg = re.sub(r"LossOptions\.(\w+)", r"option '\1'", str(e))
            raise ConfigError(f"{msg} (loss_type {self.loss_type!r})") from None

    def _tis_truncation_advice(self) -> list[str]:
        """The engine's log-probs are of the full softmax(logits / T) (docs/rollout.md), so the TIS weight
        exp(old_logp - sampler_logp) sees only engine-vs-trainer numeric drift, never the truncation:
        the tokens come from the truncated distribution and nothing reweights that."""
        filters = [f"{name} {value}" for name, value, off in (("top_k", self.top_k, self.top_k <= 0),
                                                              ("top_p", self.top_p, self.top_p >= 1),
                                                              ("min_p", self.min_p, self.min_p <= 0)) if not off]
        if self.tis_mode == "none" or not filters:
            return []
        return [f"tis_mode {self.tis_mode!r} with {', '.join(filters)}: the truncated-IS weights "
                f"exp(old_logp - sampler_logp) compare log-probs of the full softmax(logits / temperature) "
                f"(the engine's log-probs are taken before filtering), so they correct engine/trainer "
                f"numeric drift only, not the bias of sampling from the {', '.join(filters)} distribution "
                f"(TRL with vLLM's processed log-probs weights by it); see docs/rollout.md"]

    def _cispo_cap_advice(self) -> list[str]:
        # cispo's weight is min(ratio, epsilon_high), an absolute cap, not 1 + epsilon: at the default 0.2
        # every token's weight is ~0.2 (TRL takes the same default and recommends 5.0)
        cap = self.epsilon if self.epsilon_high is None else self.epsilon_high
        if self.loss_type != "cispo" or cap > 1:
            return []
        return [f"loss_type 'cispo' caps the importance ratio at epsilon_high = {cap} (an absolute cap, "
                f"not 1 + epsilon), which scales every token's update by about {cap}; set epsilon_high "
                f"above 1 (e.g. 5.0)"]

    def validate(self):
        super().validate()
        _check(self.beta >= 0, f"option 'beta' must be >= 0; got {self.beta}")
        _check(self.epsilon >= 0, f"option 'epsilon' must be >= 0; got {self.epsilon}")
        _check(self.epsilon_high is None or self.epsilon_high >= 0,
               f"option 'epsilon_high' must be >= 0; got {self.epsilon_high}")
        _check(self.delta is None or self.delta > 1.0, f"option 'delta' must be > 1 when set; got {self.delta}")
        _one_of("loss_type", self.loss_type, LOSS_TYPES)
        _one_of("scale_rewards", self.scale_rewards, SCALE_REWARDS)
        _one_of("advantage_estimator", self.advantage_estimator, ESTIMATORS)
        _one_of("importance_sampling_level", self.importance_sampling_level, IS_LEVELS)
        _one_of("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _one_of("tis_mode", self.tis_mode, TIS_MODES)
        _one_of("tis_level", self.tis_level, TIS_LEVELS)
        self.fp8_options()
        _check(self.num_generations >= 2, f"option 'num_generations' must be >= 2 (GRPO compares samples within a group); got {self.num_generations}")
        gen = self.per_device_train_batch_size * self.gradient_accumulation_steps
        _check(gen % self.num_generations == 0,
               f"per_device_train_batch_size * gradient_accumulation_steps = {gen} completions per rollout "
               f"must be divisible by num_generations = {self.num_generations}")
        _check(self.num_iterations >= 1, f"option 'num_iterations' must be >= 1; got {self.num_iterations}")
        _check(self.engine_max_num_seqs is None or self.engine_max_num_seqs >= self.num_generations,
               f"option 'engine_max_num_seqs' must be >= num_generations = {self.num_generations} (a group is "
               f"decoded together); got {self.engine_max_num_seqs}")
        # GRPOTrainer checks it for held-out rows given in Python; an eval_dataset is known now, before the model loads
        _check(self.eval_dataset is None or self.rollout_max_num_seqs >= self.eval_samples_per_prompt,
               f"option 'engine_max_num_seqs' = {self.engine_max_num_seqs} is below eval_samples_per_prompt = "
               f"{self.eval_samples_per_prompt}: a held-out prompt's samples are decoded together")
        _check_temperature("temperature", self.temperature, greedy_ok=False)
        _check(0 < self.top_p <= 1, f"option 'top_p' must be in (0, 1]; got {self.top_p}")
        _check(self.top_k >= -1, f"option 'top_k' must be -1 or 0 (off) or >= 1; got {self.top_k}")
        _check(0 <= self.min_p < 1, f"option 'min_p' must be in [0, 1); got {self.min_p}")
        _check(self.max_completion_length >= 1, "option 'max_completion_length' must be >= 1")
        _check(self.max_prompt_length >= 1, "option 'max_prompt_length' must be >= 1")
        _check(self.tis_cap > 1, f"option 'tis_cap' must be > 1; got {self.tis_cap}")
        self.loss_options()
        _check(self.eval_samples_per_prompt >= 1 and self.eval_size >= 0, "eval_size >= 0 and eval_samples_per_prompt >= 1 required")
        _check(self.eval_size >= 1 or not str(self.eval_dataset).startswith("builtin:"),
               "option 'eval_size' 0 means every row of an eval_dataset file; a builtin: eval set is generated, "
               "so give its size (>= 1)")
        _check_temperature("eval_temperature", self.eval_temperature, greedy_ok=True)
        _check((self.eval_steps or 0) >= 0,
               f"option 'eval_steps' must be >= 0 (0: only at the start and end); got {self.eval_steps}")
        _check(self.engine_block_size >= 1 and self.engine_max_num_batched_tokens >= 1 and
               (self.engine_num_blocks is None or self.engine_num_blocks >= 1),
               "options 'engine_block_size', 'engine_max_num_batched_tokens' and 'engine_num_blocks' must be >= 1")
        _check(self.log_completions >= 0, f"option 'log_completions' must be >= 0; got {self.log_completions}")
        check_regex("format_pattern", self.format_pattern)
        check_template_kwargs("chat_template_kwargs", self.chat_template_kwargs)
        _check_rewards(self.reward_funcs, self.length_penalty_target, language=self.language)
        _check_reward_timeout(self.reward_timeout)
        self._advise(self._cispo_cap_advice() + self._tis_truncation_advice())   # once every check has passed

    def update(self, data: dict[str, Any], *, source: str = "config", typed_keys: Optional[dict[str, str]] = None):
        # Weights read with the functions (a file, the command line, a pipeline) must match them here. Not in
        # validate(): in Python, GRPOConfig(reward_weights=[...]) may weigh functions given to GRPOTrainer,
        # which checks them against those (TRL's GRPOConfig takes weights for the trainer's functions too).
        before = dict(vars(self))
        super().update(data, source=source, typed_keys=typed_keys)
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            msg = f"{source}: reward_weights has {len(self.reward_weights)} entries but reward_funcs has " \
                  f"{len(self.reward_funcs)}"
            vars(self).update(before)
            raise ConfigError(msg)
        return self

    @property
    def completions_per_rollout(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def prompts_per_rollout(self) -> int:
        return self.completions_per_rollout // self.num_generations

    @property
    def rollout_max_num_seqs(self) -> int:
        """The engine's max_num_seqs: engine_max_num_seqs, else one rollout's completions (every row of a
        decode step reads the weights once, so a rollout in one wave is fastest), at most 1024 (CUDA
        graphs are captured per batch size up to it), and at least a group or a held-out prompt's
        eval_samples_per_prompt (the evaluation decodes them together on the same engine)."""
        if self.engine_max_num_seqs is not None:
            return self.engine_max_num_seqs
        return max(self.num_generations, self.eval_samples_per_prompt, min(self.completions_per_rollout, 1024))


@dataclass
class SFTConfig(_TrainingConfig):
    """Supervised fine-tuning (cold start, rejection-sampled data, distillation)."""

    model_name_or_path: Optional[str] = None
    dataset: Optional[str] = None            # JSONL/parquet/saved dataset with prompt + completion, or builtin:<task>
    dataset_split: Optional[str] = None
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    system_prompt: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None   # as GRPOConfig's
    lr_scheduler_type: str = "cosine"
    max_length: int = 1024
    # a micro-batch's completions of one prompt follow a single copy of it (see GRPOConfig.share_prompts)
    share_prompts: bool = True

    def validate(self):
        super().validate()
        _check(self.max_length >= 2, "option 'max_length' must be >= 2")
        check_template_kwargs("chat_template_kwargs", self.chat_template_kwargs)


@dataclass
class SampleConfig(_Base):
    """Rejection sampling: n samples per prompt, keep those whose rewards pass the thresholds."""

    model_name_or_path: Optional[str] = None
    dataset: Optional[str] = None
    dataset_split: Optional[str] = None
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    system_prompt: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None   # as GRPOConfig's
    stop_tokens: Optional[list[str]] = None                 # as GRPOConfig's
    output_file: Optional[str] = None
    num_samples: int = 4
    max_prompts: int = -1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_completion_length: int = 256
    reward_funcs: list[str] = field(default_factory=lambda: ["accuracy", "format"])
    reward_thresholds: Optional[list[float]] = None   # per reward function; default: each must be >= 1.0
    reward_timeout: Optional[float] = None            # as GRPOConfig's
    keep_per_prompt: int = 1
    keep_truncated: bool = False   # keep samples cut (no stop token: max_completion_length, the model's positions)
    format_pattern: Optional[str] = None
    language: str = "en"
    seed: int = 42
    batch_prompts: int = 64
    device: Optional[str] = None
    dtype: str = "float32"
    progress_bar: bool = True

    def validate(self):
        super().validate()
        _check(self.num_samples >= 1, "option 'num_samples' must be >= 1")
        _check(self.keep_per_prompt >= 1, "option 'keep_per_prompt' must be >= 1")
        _check(self.max_prompts == -1 or self.max_prompts >= 1,
               f"option 'max_prompts' must be -1 (all) or >= 1; got {self.max_prompts}")
        _check_seed(self.seed)
        _check_temperature("temperature", self.temperature, greedy_ok=True)
        _check(0 < self.top_p <= 1, f"option 'top_p' must be in (0, 1]; got {self.top_p}")
        _check(self.top_k >= -1, f"option 'top_k' must be -1 or 0 (off) or >= 1; got {self.top_k}")
        _check(self.max_completion_length >= 1, "option 'max_completion_length' must be >= 1")
        _check(self.batch_prompts >= 1, "option 'batch_prompts' must be >= 1")
        _one_of("dtype", self.dtype, DTYPES)
        check_device(self.device)
        check_regex("format_pattern", self.format_pattern)
        check_template_kwargs("chat_template_kwargs", self.chat_template_kwargs)
        _check_rewards(self.reward_funcs, None, length_option=False, language=self.language)
        _check_reward_timeout(self.reward_timeout)
        if self.reward_thresholds is not None:
            _check(len(self.reward_thresholds) == len(self.reward_funcs),
                   f"reward_thresholds has {len(self.reward_thresholds)} entries but reward_funcs has {len(self.reward_funcs)}")
