"""The progress of long loops as a log shows it (r1fast.progress off a terminal)."""
import pytest
import torch

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
