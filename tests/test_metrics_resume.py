"""The run's logs on resume: metrics.jsonl and TensorBoard show the same history."""
import json
import os
import shutil

import pytest

from r1fast.trainer.metrics import MetricsLogger, read_metrics


def _tensorboard_points(run_dir: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    events.Reload()
    return {e.step: round(e.value, 6) for e in events.Scalars("grpo/loss")}


def _log(run: str, steps, value, resume_step=None, resumed_from=None, checkpoints=()):
    logger = MetricsLogger(run, ["tensorboard"], resume_step=resume_step, resumed_from=resumed_from)
    for step in steps:
        logger.log(step, "grpo", {"loss": value(step)})
        if step in checkpoints:   # a checkpoint's copy of the log (save_checkpoint's copy_logs)
            folder = os.path.join(run, f"checkpoint-{step}")
            os.makedirs(folder)
            shutil.copy(os.path.join(run, "metrics.jsonl"), folder)
    logger.close()


def test_tensorboard_shows_the_branch_resumed_as_metrics_jsonl_does(tmp_path):
    pytest.importorskip("tensorboard")
    run = str(tmp_path / "run")
    first, second, third = (lambda s: 1 + s / 10), (lambda s: 2 + s / 10), (lambda s: 3 + s / 10)
    _log(run, range(1, 7), first, checkpoints=(3, 4))
    # resumed from checkpoint-3 (checkpoint-4 set aside as abandoned-checkpoint-4), steps 4..6 again
    os.rename(os.path.join(run, "checkpoint-4"), os.path.join(run, "abandoned-checkpoint-4"))
    _log(run, range(4, 7), second, resume_step=3, resumed_from=os.path.join(run, "checkpoint-3"))
    # back to the first branch: abandoned-checkpoint-4's history, steps 5 and 6 again
    _log(run, (5, 6), third, resume_step=4, resumed_from=os.path.join(run, "abandoned-checkpoint-4"))
    expected = {1: 1.1, 2: 1.2, 3: 1.3, 4: 1.4, 5: 3.5, 6: 3.6}
    assert {r["step"]: r["loss"] for r in read_metrics(run)} == expected
    # TensorBoard kept the second branch's step 4 (2.4), which no checkpoint of the run's history holds
    assert _tensorboard_points(run) == expected
    # a resume on the same branch logs nothing again
    _log(run, (6,), lambda s: 4.6, resume_step=5, resumed_from=None)
    assert _tensorboard_points(run) == {**expected, 6: 4.6}
    assert json.loads(open(os.path.join(run, "metrics.jsonl")).readlines()[-1])["loss"] == 4.6


def test_a_replaced_file_and_its_rename_are_on_disk_before_replacing_returns(tmp_path, disk_ops):
    # the rename was left to the file system's own time: a caller's next step (the rerun journal removed after the
    # pipeline state, the sampling progress removed after the output) could reach the disk first, and a power loss
    # then kept the old file with nothing left to say it was stale
    import random

    from r1fast.trainer.metrics import replacing

    path = tmp_path / "state.json"
    path.write_text("the old state\n")
    text = json.dumps({"rows": [random.random() for _ in range(5)]})
    with replacing(str(path)) as f:
        f.write(text)
    assert path.read_text() == text
    renames = [i for i, op in enumerate(disk_ops) if op[0] == "rename"]
    assert len(renames) == 1 and disk_ops[renames[0]][2] == os.path.realpath(path)
    temporary = disk_ops[renames[0]][1]
    assert os.path.dirname(temporary) == os.path.realpath(tmp_path) and not os.path.exists(temporary)
    assert disk_ops[:renames[0]] == [("fsync", temporary)]   # the new bytes first
    assert disk_ops[renames[0] + 1:] == [("fsync", os.path.realpath(tmp_path))]   # then the rename


def test_a_failed_replacing_write_leaves_the_old_file_and_no_temporary_file(tmp_path, disk_ops):
    from r1fast.trainer.metrics import replacing

    path = tmp_path / "summary.json"
    path.write_text("the old summary\n")
    with pytest.raises(OSError, match=r"No space left on device: '.*summary\.json'"):
        with replacing(str(path)) as f:
            f.write("half of the new")
            raise OSError(28, "No space left on device")   # as write() raises on a full disk: no file name
    assert path.read_text() == "the old summary\n" and os.listdir(tmp_path) == ["summary.json"]
    assert not [op for op in disk_ops if op[0] == "rename"]


def test_tensorboard_and_wandb_get_an_infinite_metric_as_inf(tmp_path, monkeypatch):
    # the log writes an infinity as +-1e308 (JSON has none); the trackers were handed that number, which W&B keeps
    # as it is (TensorBoard's float32 made it inf by chance), both as it was logged and as a resume logs it again
    import math
    import random
    import sys
    import types

    pytest.importorskip("tensorboard")   # torch.utils.tensorboard needs it
    import torch.utils.tensorboard as tensorboard

    scalars, logged = [], []

    class Writer:
        def __init__(self, folder, purge_step=None):
            pass

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            pass

    run_obj = types.SimpleNamespace(log=lambda values, step: logged.append((step, values)), finish=lambda: None)
    monkeypatch.setattr(tensorboard, "SummaryWriter", Writer)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: run_obj))
    run = str(tmp_path / "run")
    finite = random.uniform(-5, 5)
    logger = MetricsLogger(run, ["tensorboard", "wandb"])
    for step, loss in enumerate([math.inf, -math.inf, finite], 1):
        logger.log(step, "grpo", {"loss": loss, "kl": math.nan})
    os.makedirs(os.path.join(run, "checkpoint-1"))
    shutil.copy(os.path.join(run, "metrics.jsonl"), os.path.join(run, "checkpoint-1"))
    logger.close()
    assert [json.loads(line)["loss"] for line in open(os.path.join(run, "metrics.jsonl"))] == [1e308, -1e308, finite]
    want = [("grpo/loss", math.inf, 1), ("grpo/loss", -math.inf, 2), ("grpo/loss", finite, 3)]
    assert scalars == want   # the NaN kl (null in the log) is no point
    assert logged == [(step, {"grpo/loss": v}) for _, v, step in want]
    # resumed at step 3 on a history whose steps 2, 3 differ: TensorBoard is given them again from that history
    with open(os.path.join(run, "checkpoint-1", "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps({"step": step, "stage": "grpo", "loss": v, "kl": None}) + "\n"
                     for step, v in ((1, 1e308), (2, 1e308), (3, -1e308)))
    scalars.clear()
    MetricsLogger(run, ["tensorboard"], resume_step=3, resumed_from=os.path.join(run, "checkpoint-1")).close()
    assert scalars == [("grpo/loss", math.inf, 2), ("grpo/loss", -math.inf, 3)]
