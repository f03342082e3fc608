"""What a user reads of a run's metrics.jsonl: read_metrics, the resume's cut of the log, and `r1fast plot`'s
curves, checked against the file's own values."""
import json
import math
import os
import random

import pytest

from r1fast.trainer.metrics import MetricsLogger, read_metrics


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("step", ["true", "NaN", "Infinity", "-Infinity", '"3"', "null", "[1]"])
def test_read_metrics_refuses_a_step_that_is_not_a_finite_number(tmp_path, step):
    # true, NaN and Infinity were read as steps: r1fast plot drew the line's point at x = 1 or x = NaN
    rng = random.Random(step)
    good = [{"step": s, "stage": "grpo", "loss": rng.random()} for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good) + "\n"
                                            + f'{{"step": {step}, "loss": 0.5}}\n')
    with pytest.raises(ValueError, match=r"record 3 has no numeric 'step' \(line 4: "):
        read_metrics(str(tmp_path))
    # an int past float's range (drawn, an OverflowError traceback)
    _write(tmp_path / "metrics.jsonl", good + [{"step": 10 ** 400, "loss": 0.5}])
    with pytest.raises(ValueError, match=r"record 3 has no numeric 'step' \(line 3: 1000"):
        read_metrics(str(tmp_path))
    big = rng.randrange(2 ** 60)
    _write(tmp_path / "metrics.jsonl", good + [{"step": big, "loss": 0.5}])
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, big]


@pytest.mark.parametrize("step", ['"3"', "[3]", "true", "NaN"])
def test_a_resume_names_a_metrics_line_whose_step_is_not_a_number(tmp_path, step):
    # a string step was "TypeError: '<=' not supported between instances of 'str' and 'int'", a traceback
    rng = random.Random(step)
    rows = [{"step": s, "stage": "grpo", "loss": rng.random()} for s in (1, 2, 3)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "metrics.jsonl").write_text(text + f'{{"step": {step}, "loss": 0.5}}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 4: 'step' is .*, not a number; remove that line"):
        MetricsLogger(str(tmp_path), resume_step=2)
    (tmp_path / "metrics.jsonl").write_text(text)
    MetricsLogger(str(tmp_path), resume_step=2).close()
    assert read_metrics(str(tmp_path)) == rows[:2]


def _plotted(monkeypatch, run_dir) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """{panel title: {line label: [(x, y), ...]}} as r1fast plot drew them, read back from the figure's Line2D."""
    import matplotlib.figure

    from r1fast.trainer.plot import plot_run

    figures = []
    save = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return save(fig, *args, **kwargs)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    plot_run(str(run_dir))
    return {ax.get_title(): {line.get_label(): [(float(x), float(y)) for x, y in zip(line.get_xdata(), line.get_ydata())]
                             for line in ax.get_lines()} for ax in figures[0].axes if ax.get_title()}, figures[0]


def test_plot_leaves_null_nan_and_infinite_values_out_of_its_curves(tmp_path, monkeypatch):
    # an infinite loss, logged as 1e308 (JSON has no inf), was drawn there: every other point of the panel lay
    # flat on 0; a NaN or Infinity a hand-written file holds was drawn too
    pytest.importorskip("matplotlib")
    rng = random.Random(7)
    special = [None, float("nan"), float("inf"), -float("inf")]
    rows, expected = [], {"grpo: loss": [], "grpo: kl": []}
    for step in range(1, 41):
        row = {"step": step, "stage": "grpo"}
        for key in ("loss", "kl"):
            value = rng.choice(special) if rng.random() < 0.3 else rng.uniform(-3, 3)
            row[key] = value
            if value is not None and math.isfinite(value):
                expected[f"grpo: {key}"].append((step, value))
        rows.append(row)
    logger = MetricsLogger(str(tmp_path))   # as a run writes them: inf as +-1e308, NaN as null
    for row in rows:
        logger.log(row["step"], row["stage"], {k: v for k, v in row.items() if k not in ("step", "stage")})
    logger.close()
    assert any(r.get("loss") in (1e308, -1e308) for r in read_metrics(str(tmp_path)))
    drawn, _ = _plotted(monkeypatch, tmp_path)
    assert drawn["loss"] == {"grpo: loss": expected["grpo: loss"]}
    assert drawn["KL to reference"] == {"grpo: kl": expected["grpo: kl"]}
    # NaN and Infinity written by another tool (Python's json writes them) are gaps too
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn, _ = _plotted(monkeypatch, tmp_path)
    assert drawn["loss"] == {"grpo: loss": expected["grpo: loss"]}


@pytest.mark.parametrize("line, error", [
    ('{"step": 2, "stage": "grpo", "loss": "0.5"}', r"step 2 has 'loss' = '0.5', not a number"),
    ('{"step": 2, "stage": "grpo", "reward": true}', r"step 2 has 'reward' = True, not a number"),
    ('{"step": 2, "stage": "grpo", "kl": {"a": 1}}', r"step 2 has 'kl' = \{'a': 1\}, not a number"),
    ('{"step": 2, "stage": "grpo", "eval/accuracy": [0.5]}', r"step 2 has 'eval/accuracy' = \[0.5\], not a number"),
    ('{"step": 2, "stage": null, "loss": 0.5}', r"step 2 has 'stage' = None, not a stage name"),
    ('{"step": 2, "stage": 3, "loss": 0.5}', r"step 2 has 'stage' = 3, not a stage name"),
])
def test_plot_names_a_value_it_cannot_draw(tmp_path, line, error):
    # a string was drawn as a category of the y axis (the curve's values silently wrong), true as 1, a dict or a
    # null stage was a TypeError traceback
    pytest.importorskip("matplotlib")
    from r1fast.cli import main

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "stage": "grpo", "loss": 1.0, "reward": 0.1, "kl": 0.0}\n'
                                            + line + "\n")
    with pytest.raises(SystemExit, match=error):
        main(["plot", str(tmp_path)])


@pytest.mark.parametrize("state, error", [
    ("{", r"pipeline_state.json is not valid JSON \(Expecting"),
    ("[1]", "pipeline_state.json is not a pipeline state"),
    ('{"order": "rl", "stages": {}}', "pipeline_state.json is not a pipeline state"),
    ('{"order": ["rl"], "stages": []}', "pipeline_state.json is not a pipeline state"),
    ('{"order": [["rl"]], "stages": {}}', "pipeline_state.json is not a pipeline state"),
    ('{"order": ["rl"], "stages": {"rl": 3}}', "pipeline_state.json is not a pipeline state"),
])
def test_plot_names_a_damaged_pipeline_state(tmp_path, state, error):
    # json's message named no file, a list was an AttributeError traceback, an "order" string was read a character
    # per stage: "no metrics logged yet", the stage's logged lines never read
    from r1fast.cli import main

    (tmp_path / "rl").mkdir()
    (tmp_path / "rl" / "metrics.jsonl").write_text('{"step": 1, "stage": "rl", "loss": 1.0}\n')
    (tmp_path / "pipeline_state.json").write_text(state)
    with pytest.raises(SystemExit, match=error):
        main(["plot", str(tmp_path)])


def test_plot_of_a_pipeline_draws_the_finished_stages_then_the_running_ones_lines(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    rng = random.Random(3)
    done = [{"step": s, "stage": "sft", "loss": rng.random()} for s in range(1, 6)]
    running = [{"step": s, "stage": "rl", "loss": rng.random(), "reward": rng.random()} for s in range(6, 9)]
    _write(tmp_path / "metrics.jsonl", done)
    (tmp_path / "rl").mkdir()
    _write(tmp_path / "rl" / "metrics.jsonl", running)
    (tmp_path / "pipeline_state.json").write_text(json.dumps(
        {"format": 2, "order": ["sft", "rl"], "stages": {"sft": {"finished": True}, "rl": {"finished": False}}}))
    drawn, _ = _plotted(monkeypatch, tmp_path)
    assert drawn["loss"] == {"rl: loss": [(r["step"], r["loss"]) for r in running],
                             "sft: loss": [(r["step"], r["loss"]) for r in done]}
    assert drawn["reward"] == {"rl: reward": [(r["step"], r["reward"]) for r in running]}


def test_the_held_out_panel_labels_each_stages_first_and_last_evaluation(tmp_path, monkeypatch):
    # every evaluation was labelled "<stage> <value>": a GRPO run evaluated every eval_steps steps drew a pile of
    # overlapping labels; a run's initial and final evaluation, a pipeline's after each stage, are what they are for
    pytest.importorskip("matplotlib")
    rng = random.Random(11)
    rows, step = [], 0
    for stage in ("cold_start", "rl", "rl2"):
        for _ in range(rng.randint(1, 6)):
            step += rng.randint(1, 20)
            rows.append({"step": step, "stage": stage, "loss": rng.random()})
            if rng.random() < 0.7:
                rows.append({"step": step, "stage": stage, "eval/accuracy": rng.random(), "eval/pass@4": rng.random(),
                             "eval/cons@4": rng.random()})
    _write(tmp_path / "metrics.jsonl", rows)
    drawn, fig = _plotted(monkeypatch, tmp_path)
    evals = [r for r in rows if "eval/accuracy" in r]
    last = [r for i, r in enumerate(evals) if i in (0, len(evals) - 1) or evals[i + 1]["stage"] != r["stage"]
            or evals[i - 1]["stage"] != r["stage"]]
    assert len(last) < len(evals)   # some evaluation between a stage's first and last
    panel = next(ax for ax in fig.axes if ax.get_title() == "held-out accuracy")
    labels = sorted((t.get_text(), tuple(map(float, t.xy))) for t in panel.texts)
    assert labels == sorted((f"{r['stage']} {r[key]:.2f}", (r["step"], r[key]))
                            for key in ("eval/accuracy", "eval/pass@4", "eval/cons@4") for r in last)
    assert drawn["held-out accuracy"]["eval/accuracy"] == [(r["step"], r["eval/accuracy"]) for r in evals]


def test_the_held_out_panel_draws_pass_and_cons_at_each_k_written_out(tmp_path, monkeypatch):
    # a key of that form without a number (a hand-made file's eval/pass@k) stopped the plot with "invalid literal for
    # int() with base 10: 'k'"
    pytest.importorskip("matplotlib")
    rng = random.Random(13)
    ks = sorted(rng.sample(range(2, 40), 2))
    rows = [{"step": s, "stage": "grpo", "eval/accuracy": rng.random(), "eval/pass@k": rng.random(),
             **{f"eval/{name}@{k}": rng.random() for k in ks for name in ("cons", "pass")}} for s in (1, 2, 3)]
    _write(tmp_path / "metrics.jsonl", rows)
    drawn, _ = _plotted(monkeypatch, tmp_path)
    names = ["eval/accuracy"] + [f"eval/{name}@{k}" for k in ks for name in ("pass", "cons")]
    assert list(drawn["held-out accuracy"]) == names
    assert drawn["held-out accuracy"] == {name: [(r["step"], r[name]) for r in rows] for name in names}


def test_plot_reads_a_leading_tilde_as_the_home_folder(tmp_path, monkeypatch):
    # the shell leaves the ~ of `--out=~/plots/run.png` as typed: r1fast plot made a folder named "~" in the working
    # directory, and a quoted '~/runs/grpo' "does not exist"
    from r1fast.cli import main

    home, work = tmp_path / "home", tmp_path / "work"
    run = home / "runs" / "grpo"
    run.mkdir(parents=True)
    work.mkdir()
    rng = random.Random(7)
    _write(run / "metrics.jsonl", [{"step": s, "stage": "grpo", "reward": rng.random()} for s in (1, 2, 3)])
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    name = f"run{rng.randrange(1000)}.png"
    assert main(["plot", str(run), f"--out=~/plots/{name}"]) == 0
    assert (home / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(work) == []
    assert main(["plot", "~/runs/grpo"]) == 0
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_refuses_an_image_format_it_cannot_write_before_drawing_or_making_folders(tmp_path, monkeypatch):
    # --out plots/run.v2 was drawn whole, its folder made, then "Format 'v2' is not supported", naming no option
    from r1fast.cli import main

    rng = random.Random(11)
    _write(tmp_path / "metrics.jsonl", [{"step": s, "stage": "grpo", "reward": rng.random()} for s in (1, 2)])
    monkeypatch.chdir(tmp_path)
    ext = "".join(rng.choice("qwxz") for _ in range(3))
    with pytest.raises(SystemExit, match=rf"--out 'plots/run\.{ext}': matplotlib writes no \.{ext} image; end the "
                                         rf"name with one of .*\.png.*\.svg"):
        main(["plot", ".", f"--out=plots/run.{ext}"])
    assert not os.path.exists("plots")
    assert main(["plot", ".", "--out=plots/run.SVG"]) == 0   # the extension's case is matplotlib's to ignore
    assert open("plots/run.SVG").read(200).lstrip().startswith("<?xml")


def test_the_step_axis_of_a_short_run_marks_whole_steps_only(tmp_path, monkeypatch):
    # a run of 3 logged steps had its step axis marked 1.00, 1.25, 1.50 ... 3.00
    pytest.importorskip("matplotlib")
    rng = random.Random(5)
    last = rng.randrange(2, 6)
    _write(tmp_path / "metrics.jsonl", [{"step": s, "stage": "grpo", "reward": rng.random(), "loss": rng.random()}
                                        for s in range(1, last + 1)])
    drawn, figure = _plotted(monkeypatch, tmp_path)
    assert [x for x, _ in drawn["loss"]["grpo: loss"]] == list(range(1, last + 1))
    for ax in figure.axes:
        if ax.get_lines():
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), (ax.get_title(), ticks)
