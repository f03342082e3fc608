"""`r1fast plot RUN_DIR`: PNG curves of reward, accuracy, KL, completion length, entropy and loss."""
from __future__ import annotations

import json
import os

from r1fast.trainer.metrics import LOGGED_INFINITY, k_sample_names, read_metrics, replacing

PANELS = [
    ("reward", ["reward"]),   # and each reward function's mean the run logged (reward_function_names)
    ("held-out accuracy", ["eval/accuracy"]),   # and the run's eval/pass@k and eval/cons@k (k > 1)
    ("KL to reference", ["kl"]),
    # the ones that ended on their own (TRL's terminated length): beside the mean, whether the model learns to stop
    ("completion length (tokens)", ["completion_length", "completions/mean_terminated_length"]),
    ("entropy (nats/token)", ["entropy"]),
    ("loss", ["loss"]),
]


def plot_run(run_dir: str, out: str | None = None) -> str:
    # the metrics first: a missing or broken metrics.jsonl is named even where matplotlib is not installed
    rows = run_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}: metrics.jsonl is empty")
    if out:
        check_out_path(out)
    try:
        # a Figure of its own, not pyplot's: matplotlib.use("Agg") switched the caller's backend for the
        # rest of the process (a notebook's inline plots stopped showing), and a figure whose save failed
        # stayed open in pyplot
        import matplotlib.figure
        import matplotlib.ticker
    except ImportError:
        raise SystemExit("r1fast plot needs matplotlib: pip install matplotlib") from None
    fig = matplotlib.figure.Figure(figsize=(14, 7))
    if out:
        check_image_format(out, fig.canvas.get_supported_filetypes())
    axes = fig.subplots(2, 3)
    for ax, (title, keys) in zip(axes.flat, PANELS):
        if "eval/accuracy" in keys:
            keys = keys + k_sample_names(rows, "eval/")
        if "reward" in keys:
            keys = keys + reward_function_names(rows)
        drawn = False
        for key in keys:
            if key.startswith("eval/"):   # one line across stages: the accuracy after each stage
                pts = curve_points(rows, key, run_dir)
                if pts:
                    xs, ys = zip(*((r["step"], y) for r, y in pts))
                    ax.plot(xs, ys, marker="o", label=key)
                    for row, y in stage_ends(pts, run_dir):
                        ax.annotate(f"{stage_of(row, run_dir)} {y:.2f}", (row["step"], y), fontsize=7)
                    drawn = True
                continue
            for stage in sorted({stage_of(r, run_dir) for r in rows}):
                pts = curve_points([r for r in rows if stage_of(r, run_dir) == stage], key, run_dir)
                if pts:
                    xs, ys = zip(*((r["step"], y) for r, y in pts))
                    ax.plot(xs, ys, marker="o" if len(pts) < 20 else None, label=f"{stage}: {key}")
                    drawn = True
        ax.set_title(title)
        ax.set_xlabel("step")
        # steps are whole numbers: a short run's axis read 1.00, 1.25, 1.50 ... 3.00
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    out = out or os.path.join(run_dir, "curves.png")
    # its folders made, as output_dir's and r1fast sample's output_file's are: savefig makes none, and
    # --out plots/run.png said a bare "[Errno 2] No such file or directory"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    # through a temporary file: a full disk mid-write left a truncated image in place of the last good one
    # (and an error naming no file); the format from out's extension, as savefig(out) takes it
    with replacing(out, binary=True) as f:
        fig.savefig(f, format=os.path.splitext(out)[1][1:] or None, dpi=100)
    return out


def check_out_path(out: str):
    """`out` can be the image's file: a folder given there said "[Errno 2] No such file or directory: 'plots/'" (or,
    made already, "Is a directory: '.plots.tmp-...'"), and a file on its way "[Errno 17] File exists", naming no
    reason."""
    if out.endswith(("/", os.sep)) or os.path.isdir(out):
        raise IsADirectoryError(f"--out {out!r} is a folder; give the image's file path, as "
                                f"{os.path.join(out.rstrip('/' + os.sep), 'curves.png')}")
    parent = os.path.dirname(out)
    while parent and not os.path.exists(parent):   # the nearest part of the path that is there
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise NotADirectoryError(f"--out {out!r}: {parent} is a file, not a folder")


def check_image_format(out: str, formats: dict[str, str]):
    """`out`'s extension names a format matplotlib writes (none: PNG). `--out runs/a.v2` was drawn whole, its folders
    made, and then refused with "Format 'v2' is not supported", naming no option."""
    ext = os.path.splitext(out)[1][1:]
    if ext and ext.lower() not in formats:
        raise ValueError(f"--out {out!r}: matplotlib writes no .{ext} image; end the name with one of "
                         f"{', '.join('.' + f for f in sorted(formats))} (.png for a PNG)")


def curve_points(rows: list[dict], key: str, run_dir: str) -> list[tuple[dict, float]]:
    """(row, value) of the rows whose `key` has a value to draw: a finite number. null (a NaN), NaN, an infinity and
    the +-1e308 the log writes for one (LOGGED_INFINITY) are left out, a gap in the curve: a logged inf loss drawn at
    1e308 flattened the rest of its panel onto 0. Any other value (a string, true, a list) is an error naming it: a
    string was drawn as a category on the y axis, a dict was a TypeError."""
    points = []
    for row in rows:
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{run_dir}: the metrics line of step {row['step']} has {key!r} = {value!r:.40}, "
                             f"not a number")
        if abs(value) < LOGGED_INFINITY:   # False for NaN too
            points.append((row, value))
    return points


def stage_ends(points: list[tuple[dict, float]], run_dir: str) -> list[tuple[dict, float]]:
    """The first and the last of each stage's points, the ones the held-out panel labels (a GRPO run's initial and
    final evaluation, a pipeline's after each stage): every point was labelled, and a run evaluated every eval_steps
    steps drew a pile of overlapping labels."""
    stages = [stage_of(row, run_dir) for row, _ in points]
    return [point for i, point in enumerate(points)
            if i in (0, len(points) - 1) or stages[i - 1] != stages[i] or stages[i + 1] != stages[i]]


def stage_of(row: dict, run_dir: str) -> str:
    """A metrics line's stage ('' without one). One that is not a name (null, a number) is an error naming its
    step: sorting the stages failed with "'<' not supported between instances of 'NoneType' and 'str'"."""
    stage = row.get("stage", "")
    if not isinstance(stage, str):
        raise ValueError(f"{run_dir}: the metrics line of step {row['step']} has 'stage' = {stage!r:.40}, not a "
                         f"stage name (a string)")
    return stage


def reward_function_names(rows: list[dict]) -> list[str]:
    """The rewards/<fn> means among rows' keys, in the order first logged (the run's reward_funcs order): a
    run's own functions (my_rewards:brevity) are drawn beside accuracy and format; their /std is not."""
    names: dict[str, None] = {}
    for r in rows:
        names.update((k, None) for k in r if k.startswith("rewards/") and not k.endswith("/std"))
    return list(names)


def run_metrics(run_dir: str) -> list[dict]:
    """A run's metrics. In a pipeline's folder, <run>/metrics.jsonl holds the finished stages only (it
    is rebuilt between stages): the rows the stage in progress, or interrupted, has logged so far in
    <run>/<stage>/metrics.jsonl come after them, so a run is plotted while it trains."""
    state_path = os.path.join(run_dir, "pipeline_state.json")
    if not os.path.isfile(state_path):
        return read_metrics(run_dir, being_written=True)
    rows = read_metrics(run_dir, being_written=True) if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")) else []
    for name, finished in pipeline_stages(state_path):
        stage_metrics = os.path.join(run_dir, name, "metrics.jsonl")
        if not finished and os.path.isfile(stage_metrics):
            rows += read_metrics(stage_metrics, being_written=True)
    if not rows:
        raise ValueError(f"no metrics logged yet in {run_dir!r}")
    return rows


def pipeline_stages(state_path: str) -> list[tuple[str, bool]]:
    """(name, finished) of each stage of a pipeline_state.json, in the pipeline's order. A file that is not one
    is an error naming it: json's own message named no file, a list there was an AttributeError traceback, and an
    "order" string was read a character per stage (nothing plotted, "no metrics logged yet")."""
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{state_path} is not valid JSON ({e})") from None
    order = state.get("order", []) if isinstance(state, dict) else None
    stages = state.get("stages", {}) if isinstance(state, dict) else None
    if not isinstance(order, list) or not all(isinstance(name, str) for name in order) or not isinstance(stages, dict) \
            or not all(isinstance(stages.get(name, {}), dict) for name in order):
        raise ValueError(f"{state_path} is not a pipeline state (an 'order' list of stage names and a 'stages' object "
                         f"of their records)")
    return [(name, bool(stages.get(name, {}).get("finished"))) for name in order]
