"""`r1fast plot RUN_DIR`: PNG curves of reward, accuracy, KL, completion length and entropy."""
from __future__ import annotations

import os

from r1fast.trainer.metrics import read_metrics

PANELS = [
    ("reward", ["reward", "rewards/accuracy", "rewards/format"]),
    ("held-out accuracy", ["eval/accuracy"]),
    ("KL to reference", ["kl"]),
    ("completion length (tokens)", ["completion_length"]),
    ("entropy (nats/token)", ["entropy"]),
    ("loss", ["loss"]),
]


def plot_run(run_dir: str, out: str | None = None) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("r1fast plot needs matplotlib: pip install matplotlib") from None
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}: metrics.jsonl is empty")
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for ax, (title, keys) in zip(axes.flat, PANELS):
        drawn = False
        for key in keys:
            if key.startswith("eval/"):   # one line across stages: the accuracy after each stage
                pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker="o", label=key)
                    for x, y, r in zip(xs, ys, [r for r in rows if r.get(key) is not None]):
                        ax.annotate(f"{r.get('stage', '')} {y:.2f}", (x, y), fontsize=7)
                    drawn = True
                continue
            for stage in sorted({r.get("stage", "") for r in rows}):
                pts = [(r["step"], r[key]) for r in rows if r.get("stage", "") == stage and r.get(key) is not None]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker="o" if len(pts) < 20 else None, label=f"{stage}: {key}")
                    drawn = True
        ax.set_title(title)
        ax.set_xlabel("step")
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    out = out or os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
