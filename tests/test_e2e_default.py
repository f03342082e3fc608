"""The README's first command, end to end: `r1fast train` with no arguments (slow: minutes on CPU).

Run with `pytest -m slow tests/test_e2e_default.py`.
"""
import json
import os
import subprocess
import sys
import time

import pytest


@pytest.mark.slow
def test_default_train_command_end_to_end(tmp_path):
    env = dict(os.environ)
    env.pop("R1FAST_BACKEND", None)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "r1fast.cli", "train"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    wall = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / "default"
    summary = json.loads((run / "summary.json").read_text())
    acc = {s["stage"]: s["held_out_accuracy"] for s in summary["stages"]}
    # GRPO must clearly beat the cold-start SFT on held-out prompts
    assert acc["grpo"] >= acc["cold_start"] + 0.10, acc
    assert wall < 600, f"the default run took {wall:.0f} s"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/accuracy" in m for m in metrics)
    assert any(m.get("stage") == "grpo" and "kl" in m or "reward" in m for m in metrics)
    assert (run / "grpo" / "completions.jsonl").stat().st_size > 0
    ck = [d for d in os.listdir(run / "grpo") if d.startswith("checkpoint-")]
    assert ck, "no GRPO checkpoint written"
    plot = subprocess.run([sys.executable, "-m", "r1fast.cli", "plot", str(run)], capture_output=True, text=True)
    assert plot.returncode == 0, plot.stderr
    assert (run / "curves.png").stat().st_size > 1000
