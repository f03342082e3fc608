"""Values as the command line and config files give them: the YAML a value may hold that no option means."""
import re

import pytest

from r1fast.trainer.config import ConfigError, GRPOConfig, SampleConfig, parse_overrides
from r1fast.trainer.pipeline import DEFAULT_CONFIG, load_pipeline


def _typed(key: str, typed: str, cls=GRPOConfig):
    return cls().update(parse_overrides([f"{key}={typed}"]), source="command line")


@pytest.mark.parametrize("typed, markup", [
    ("&a x", "'&a' as an anchor, a label that it drops, keeping what follows (the value read is 'x')"),
    ("&a", "'&a' as an anchor, a label that it drops, keeping what follows (the value read is None)"),
    ("*a", "'*a' as an alias, a reference to a value labelled &a elsewhere in a YAML file"),
    ("|", "'|' as the start of a block of text on the lines below, which a value has none of (the value read is '')"),
    (">-", "'>-' as the start of a block of text on the lines below, which a value has none of (the value read is "
           "'')"),
    ("---", "'---' as the start of a YAML document (the value read is None)"),
    ("--- x", "'---' as the start of a YAML document (the value read is 'x')"),
    ("...", "'...' as the end of a YAML document (it reads no value)"),
])
def test_yaml_anchors_aliases_blocks_and_document_markers_on_the_command_line_are_refused_with_the_quoting(typed,
                                                                                                        markup):
    # `run_name='&a x'` named the run 'x', `run_name='&a'` and `run_name=---` left it unset, `system_prompt='|'` was
    # empty: YAML's reading of markup the user typed as text, taken without a word
    for key in ("run_name", "system_prompt"):
        with pytest.raises(ConfigError) as e:
            _typed(key, typed)
        assert str(e.value) == (f"command line: {key}={typed}: YAML reads {markup}; to give it as text, quote it (in a "
                                f"YAML file {key}: '{typed}', on the command line {key}=\"'{typed}'\")")
        # quoted as it says, the text arrives
        assert getattr(_typed(key, f"'{typed}'"), key) == typed
    # an option of another type is refused alike, not read as what YAML made of it (max_steps='&a 5' was 5)
    with pytest.raises(ConfigError, match=r"^command line: max_steps=&a 5: YAML reads '&a' as an anchor"):
        _typed("max_steps", "&a 5")
    # a pipeline's stage option: the quoting names the key as typed
    with pytest.raises(ConfigError, match=re.escape(f"on the command line grpo.run_name=\"'{typed}'\")")):
        load_pipeline(DEFAULT_CONFIG, [f"grpo.run_name={typed}"])


@pytest.mark.parametrize("typed, tag", [("!!str 5", "!!str"), ("!!int 5", "!!int"), ("!foo x", "!foo"), ("!", "!"),
                                        ("!!binary aGk=", "!!binary"),
                                        ("!!python/name:os.system", "!!python/name:os.system")])
def test_a_yaml_tag_on_the_command_line_is_refused_saying_to_leave_it_out(typed, tag):
    # `run_name='!!int 5'` named the run '!!int 5', `max_steps='!!str 5'` read 5 all the same, `run_name=!` left it
    # unset and `run_name='!!binary aGk='` said "expects str, got b'hi'": an option's type says how its value is read
    for key in ("run_name", "max_steps", "learning_rate"):
        with pytest.raises(ConfigError) as e:
            _typed(key, typed)
        # the text holds a !, which the shell reads inside double quotes: the quoting shows a placeholder
        assert str(e.value) == (f"command line: {key}={typed}: YAML reads {tag!r} as a tag, the type to read what "
                                f"follows it as, which an option's own type decides here: leave the tag out; to give "
                                f"it as text, quote it (in a YAML file {key}: 'text', on the command line "
                                f"{key}=\"'text'\")")
    # left out, the option's type reads the value
    assert _typed("run_name", "5").run_name == "5" and _typed("max_steps", "5").max_steps == 5
    assert _typed("run_name", f"'{typed}'").run_name == typed


@pytest.mark.parametrize("typed", ["@home", "`x", "%x", "%YAML 1.1", "@", "a &b", "x *a", "a|b", "|x", "a !b", "x ---"])
def test_text_yaml_reads_no_markup_in_arrives_as_typed(typed):
    # a leading @ or ` (reserved) or % (a directive, which needs a document after it) gives YAML nothing to read, and
    # &, *, |, ! inside a value are text: none is refused
    assert _typed("run_name", typed).run_name == typed
    assert _typed("system_prompt", typed, SampleConfig).system_prompt == typed


def test_a_block_scalar_with_its_lines_is_still_read_as_yaml_reads_it():
    # a value holding newlines gives the block its lines: YAML was used on purpose
    prompt = _typed("system_prompt", "|\n  Be brief.\n  Show the steps.\n").system_prompt
    assert prompt == "Be brief.\nShow the steps.\n"


def test_the_quoting_a_text_options_error_shows_spells_the_key_as_typed(tmp_path):
    # `run-name=yes` was told to write run_name="'word'": the key as typed is the one to write again
    path = tmp_path / "c.yaml"
    path.write_text("max_steps: 3\n")
    for load in (lambda o: GRPOConfig().update(parse_overrides(o), source="command line"),
                 lambda o: GRPOConfig.from_yaml(path, o)):
        with pytest.raises(ConfigError, match=re.escape("quote it (in a YAML file run-name: 'word', on the command "
                                                        "line run-name=\"'word'\")")):
            load(["run-name=yes"])
        with pytest.raises(ConfigError, match=re.escape("quote it (in a YAML file output-dir: '[a]', on the command "
                                                        "line output-dir=\"'[a]'\")")):
            load(["output-dir=[a]"])


def test_a_whole_number_written_with_an_exponent_is_read_in_a_file_as_on_the_command_line(tmp_path):
    # YAML 1.1 reads 1e3 (no dot) as text: a file's `max_steps: 1e3` was "expects int, got '1e3'", where the command
    # line's max_steps=1e3 was 1000
    import random

    n = random.randint(2, 9)
    path = tmp_path / "c.yaml"
    path.write_text(f"max_steps: {n}e3\nwarmup_steps: {n}.5e1\n")
    cfg = GRPOConfig.from_yaml(path)
    assert (cfg.max_steps, cfg.warmup_steps) == (n * 1000, n * 10 + 5)
    assert _typed("max_steps", f"{n}e3").max_steps == n * 1000
    path.write_text(f"model: builtin:tiny\nstages:\n  - {{name: a, type: sft, dataset: builtin:arithmetic, "
                    f"num_rows: {n}e2}}\n")
    assert load_pipeline(str(path)).stages[0].num_rows == n * 100
    # what is no whole number is still refused, naming the text
    for text in (f"{n}.5e0", "1e400", "nan"):
        path.write_text(f"max_steps: {text}\n")
        with pytest.raises(ConfigError, match=rf"c\.yaml: option 'max_steps' expects int, got '{re.escape(text)}'$"):
            GRPOConfig.from_yaml(path)


def test_a_number_yaml_reads_as_octal_for_its_leading_0_is_refused_with_both_readings(tmp_path):
    # YAML 1.1 reads 0123 as the octal 83: `seed: 0123` trained with seed 83, `save_steps: 0100` saved every 64 steps
    import random

    n = random.randint(1, 7) * 10 + random.randint(0, 7)   # two octal digits: the two readings differ
    octal = int(str(n), 8)
    path = tmp_path / "c.yaml"
    for key in ("seed", "save_steps", "learning_rate"):
        said = (f"option {key!r}: YAML reads 0{n}, a number with a leading 0, as the octal {octal}; write {n} (or "
                f"{octal}) without the leading 0")
        path.write_text(f"{key}: 0{n}\n")
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: {re.escape(said)}$"):
            GRPOConfig.from_yaml(path)
        with pytest.raises(ConfigError, match=rf"^command line: {re.escape(said)}$"):
            _typed(key, f"0{n}")
    with pytest.raises(ConfigError, match=r"^command line: stage 'a': option 'num_rows': YAML reads 0100, a number "):
        stage = {"name": "a", "type": "sft", "dataset": "builtin:arithmetic"}
        load_pipeline({"model": "builtin:tiny", "stages": [stage]}, ["a.num_rows=0100"])
    # where the two readings agree, or the option takes text, the number stands
    assert (_typed("max_steps", "007").max_steps, _typed("seed", "00").seed) == (7, 0)
    assert _typed("run_name", f"0{n}").run_name == f"0{n}" and _typed("max_steps", "0x10").max_steps == 16
