"""What a user reads of a run's metrics.jsonl: read_metrics, the resume's cut of the log, and `r1fast plot`'s
curves, checked against the file's own values."""
import json
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
    _write(tmp_path / "metrics.jsonl", good + [{"step": 10 ** 400, "loss": 0.5}])   # a whole number, however large
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 10 ** 400]


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
