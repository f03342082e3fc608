"""The progress of long loops as a log shows it (r1fast.progress off a terminal)."""
import io
import random

import pytest
import torch

from r1fast import progress
from test_trainer import tiny_model


def test_rejection_sampling_stopped_by_ctrl_c_still_says_where_it_stopped(capsys):
    # The bar was closed only after the loop: a Ctrl-C (or a reward function that raised) mid-run left a log
    # with no line at all for a short run, and a terminal's bar unfinished with the traceback written on after it
    from r1fast.trainer.sampling import SampleConfig, rejection_sample

    calls = []

    def interrupted_on_the_second_batch(prompts, completions, **kw):
        calls.append(len(completions))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return [1.0] * len(completions)

    model, tok = tiny_model(seed=int(torch.randint(0, 1000, ()).item()))
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(6)]
    cfg = SampleConfig(reward_funcs=[interrupted_on_the_second_batch], num_samples=2, batch_prompts=2,
                       max_completion_length=3, keep_truncated=True)
    with pytest.raises(KeyboardInterrupt):
        rejection_sample(model, tok, rows, cfg, progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sample:")]
    assert len(lines) == 1 and lines[0].startswith("sample: 2/6 prompts (33%)"), lines


def test_an_unknown_total_prints_the_count_and_rate_alone(monkeypatch):
    # LineProgress(total=None), as tqdm takes a loop of unknown length, printed "gen: 5/None it"
    rng = random.Random()
    count, seconds = rng.randint(2, 500), rng.randint(1, 50)
    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    bar = progress.LineProgress(None, "gen", unit="prompts", stream=out, interval=3600.0)
    clock[0] += seconds
    bar.update(count)
    bar.close()
    assert out.getvalue() == f"gen: {count} prompts, 00:{seconds:02d} elapsed, {count / seconds:.3g} prompts/s\n"


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stream", [io.StringIO, _Terminal], ids=["log", "terminal"])
def test_a_loop_of_no_items_says_0_of_0_on_a_terminal_and_in_a_log(stream, monkeypatch):
    # on a terminal tqdm read the total 0 as an unknown one: "sample: 0prompts [00:00, ?prompts/s]"
    monkeypatch.setattr(progress.time, "monotonic", lambda: 1000.0)
    unit = random.choice(["prompts", "steps", "seq"])
    out = stream()
    bar = progress.progress(0, "sample", unit=unit, stream=out)
    bar.close()
    assert out.getvalue() == f"sample: 0/0 {unit}, 00:00 elapsed\n"
