"""The `r1fast` command's own behaviour: what it says when it cannot do what was asked."""
import json
import os
import random
import subprocess
import sys

import pytest

from r1fast.cli import main


def test_plot_of_a_folder_that_does_not_exist_says_so(tmp_path):
    # it said "no metrics.jsonl in '...'", as if the folder were there and held no run
    missing = tmp_path / "runs" / "defualt"
    with pytest.raises(SystemExit, match=r"^r1fast plot: '.*runs/defualt' does not exist; give a run folder: the "
                                         r"output_dir of r1fast train, sft or pipeline"):
        main(["plot", str(missing)])
    with pytest.raises(SystemExit, match=r"^r1fast plot: no metrics.jsonl in"):   # there, but holding no run
        main(["plot", str(tmp_path)])


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """`r1fast bench --table CSV | head` ended in a BrokenPipeError traceback once head had its lines."""
    csv = os.path.join(os.path.dirname(__file__), "..", "bench", "results", "nvidia-h200-2026-11-30.csv")
    read_end, write_end = os.pipe()
    os.close(read_end)   # the reader is gone before the command writes a line: every write fails
    try:
        done = subprocess.run([sys.executable, "-m", "r1fast", "bench", "--table", csv], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=300, env={**os.environ})
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.returncode == 141


def test_a_broken_pipe_of_the_commands_own_is_not_taken_for_stdouts_reader_gone():
    """A BrokenPipeError from a pipe of the command's own (a reward worker or judge server gone) while stdout's
    reader is still there ended the run with status 141 and not a word, as if `| head` had closed stdout."""
    command = ("import sys\n"
               "import r1fast.cli as cli\n"
               "def run(argv):\n"
               "    print('step 1', flush=True)\n"
               "    raise BrokenPipeError(32, 'Broken pipe (the reward server)')\n"
               "cli._run = run\n"
               "sys.argv = ['r1fast', 'info']\n"
               "sys.exit(cli.main())\n")
    done = subprocess.run([sys.executable, "-c", command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=300, env={**os.environ})
    assert done.stdout == "step 1\n"
    assert "BrokenPipeError: [Errno 32] Broken pipe (the reward server)" in done.stderr, done.stderr
    assert done.returncode == 1

def test_bench_table_without_results_names_the_folder_it_looked_in(tmp_path, monkeypatch):
    # it said "none found under --out" when no --out was given
    monkeypatch.chdir(tmp_path)
    for flag in ("--table", "--plot"):
        with pytest.raises(SystemExit, match=rf"^r1fast bench {flag}: no CSV given and none in 'bench-results' "
                                             r"\(--out\); give a results CSV, or run r1fast bench first"):
            main(["bench", flag])
    with pytest.raises(SystemExit, match=r"none in '.*elsewhere' \(--out\)"):
        main(["bench", "--table", "--out", str(tmp_path / "elsewhere")])


def test_pipeline_without_a_config_names_the_pipelines_r1fast_ships():
    # it said "r1fast pipeline: pipeline needs a config file (see r1fast/configs/r1_pipeline.yaml)", a path that
    # exists in a checkout only
    with pytest.raises(SystemExit, match=r"^r1fast pipeline: give a pipeline YAML \(its stages: see "
                                         r"docs/training\.md\), or one r1fast ships, by name: default, distill, "
                                         r"r1_pipeline; e\.g\. r1fast pipeline r1_pipeline$"):
        main(["pipeline"])


def test_the_pipeline_example_names_a_pipeline_r1fast_ships(tmp_path, monkeypatch):
    # the example was written out as r1_pipeline beside a list read from r1fast/configs: a rename made it a lie
    from r1fast.trainer import config

    for name in ("default", "mine"):
        (tmp_path / f"{name}.yaml").write_text("model: builtin:micro\nstages:\n  - {type: sft, dataset: d.jsonl}\n")
    (tmp_path / "single.yaml").write_text("model_name_or_path: builtin:micro\n")
    monkeypatch.setattr(config, "PACKAGED_CONFIGS", str(tmp_path))
    with pytest.raises(SystemExit, match=r"by name: default, mine; e\.g\. r1fast pipeline default$"):
        main(["pipeline"])


def test_plot_of_a_run_folders_metrics_file_names_the_folder_to_give(tmp_path):
    # `r1fast plot runs/x/metrics.jsonl` said "[Errno 17] File exists: '.../metrics.jsonl'" (its curves.png went
    # into RUN_DIR, a file)
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    metrics.write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(SystemExit, match=rf"^r1fast plot: '{metrics}' is a file; give the run folder that holds it: "
                                         rf"r1fast plot {metrics.parent}$"):
        main(["plot", str(metrics)])


def test_a_cuda_device_without_cuda_says_why_and_what_to_do(monkeypatch):
    import re

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu_build = rf"torch {re.escape(torch.__version__)} is a CPU build; install a CUDA build of torch for the GPU"
    for build, why in ((None, cpu_build), ("12.8", r"torch finds no GPU here \(r1fast info shows what it sees\)")):
        monkeypatch.setattr(torch.version, "cuda", build)
        with pytest.raises(SystemExit, match=rf"^r1fast train: device 'cuda' asked for but CUDA is not available: "
                                             rf"{why}, or set device=cpu \(unset, the GPU is used when there is "
                                             r"one\)$"):
            main(["train", "model_name_or_path=builtin:micro", "dataset=builtin:arithmetic", "device=cuda"])


@pytest.mark.parametrize("command", ["sft", "train"])
def test_a_mistyped_resume_path_is_said_alone(command, tmp_path, monkeypatch):
    """`--resume PATH` that does not exist (or holds no checkpoint), in a run folder holding an earlier run's
    checkpoint: the error was followed by "its checkpoints are kept; once that is fixed, continue with: ...
    --resume", as if this run had stopped after writing them."""
    monkeypatch.chdir(tmp_path)
    checkpoint = tmp_path / "runs" / command.replace("train", "grpo") / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    for path, why in (("chekpoint-3", f"no such file or folder (from {tmp_path})"),
                      ("empty", "neither a checkpoint folder (with trainer_state.json) nor a run folder holding "
                                "checkpoint-<step> folders")):
        with pytest.raises(SystemExit) as stop:
            main([command, "model_name_or_path=builtin:micro", "dataset=builtin:arithmetic", "--resume", path])
        assert str(stop.value) == f"r1fast {command}: --resume {path!r}: {why}"


def test_train_warns_once_of_the_config_it_runs(tmp_path, monkeypatch):
    """`r1fast train e.yaml epsilon_high=0.5`, loss_type: cispo in e.yaml: the cispo warning was printed for the
    file's 0.2 (which the override replaced), then for 0.5 once as the config was read and again as the trainer
    checked it."""
    import torch
    import warnings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # the run stops once the trainer has its config
    path = tmp_path / "e.yaml"
    path.write_text("loss_type: cispo\nmodel_name_or_path: builtin:micro\ndataset: builtin:arithmetic\n"
                    "device: cuda\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit, match="device 'cuda' asked for but CUDA is not available"):
            main(["train", str(path), "epsilon_high=0.5"])
    assert [str(w.message).split(" (")[0] for w in caught if "cispo" in str(w.message)] == \
        ["loss_type 'cispo' caps the importance ratio at epsilon_high = 0.5"]


def test_the_command_prints_its_own_warnings_as_one_line(tmp_path, monkeypatch):
    """From the command, a config warning came as `/…/r1fast/trainer/config.py:197: UserWarning: …` and then the line
    of r1fast's code that raised it: a file and a line the user never wrote. Others' warnings keep Python's format."""
    import warnings

    import r1fast.cli

    path = tmp_path / "e.yaml"
    path.write_text("loss_type: cispo\nmodel_name_or_path: builtin:micro\ndataset: builtin:arithmetic\n"
                    "device: cuda\n")
    code = ("import sys, torch; torch.cuda.is_available = lambda: False; from r1fast.cli import main; "
            "sys.argv = ['r1fast', 'train', sys.argv[1], 'epsilon_high=0.5']; main()")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ})
    assert "device 'cuda' asked for but CUDA is not available" in done.stderr, done.stderr
    assert "r1fast: warning: loss_type 'cispo' caps the importance ratio at epsilon_high = 0.5" in \
        [line.split(" (")[0] for line in done.stderr.splitlines()], done.stderr
    assert "UserWarning" not in done.stderr, done.stderr
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)   # undone after the test
    r1fast.cli._warn_as_a_command()
    assert warnings.formatwarning("from elsewhere", UserWarning, "/elsewhere/lib.py", 7, "") == \
        "/elsewhere/lib.py:7: UserWarning: from elsewhere\n"


# `python -m stopped_command FIRST WHERE SECOND WHEN ARGS...`: `r1fast ARGS` in a process of its own, stopped by
# real signals: the first as the model loads, before the trainer's loop (WHERE: in code run by exec, or in an
# import); the second (or "none") as the `stopped` line is written or as the process exits (WHEN: "line", "exit")
_STOPPED_COMMAND = r'''
import atexit, os, signal, sys
from r1fast import cli
from r1fast.trainer import common

first, where, second, second_at = sys.argv[1:5]
del sys.argv[1:5]
load = common.load_model_and_tokenizer

def load_then_stop(*a, **kw):
    if where == "exec":   # in code run by exec of a string, as torch's import runs a dataclass's generated methods
        exec(f"os.kill(os.getpid(), signal.{first})")
    elif where == "del":   # in a __del__, where Python prints what it raises and drops it
        class SendsAtItsEnd:
            def __del__(self):
                os.kill(os.getpid(), getattr(signal, first))
                sum(range(9))
        SendsAtItsEnd()
    else:   # in an import that swallows what it raises, as parts of torch's did
        import importlib
        with open("swallows_a_stop.py", "w") as f:
            f.write(f"import os, signal\ntry:\n    os.kill(os.getpid(), signal.{first})\n    sum(range(9))\n"
                    f"except BaseException:\n    pass\n")
        importlib.invalidate_caches()
        import swallows_a_stop
    return load(*a, **kw)

common.load_model_and_tokenizer = load_then_stop

class SecondStopAfterTheLine:
    def __init__(self, stream):
        self.stream = stream
    def write(self, text):
        n = self.stream.write(text)
        if "stopped; continue with" in text and second_at == "line":
            self.stream.flush()
            os.kill(os.getpid(), getattr(signal, second))
        return n
    def __getattr__(self, name):
        return getattr(self.stream, name)

sys.stderr = SecondStopAfterTheLine(sys.stderr)
if second_at == "exit":
    atexit.register(lambda: os.kill(os.getpid(), getattr(signal, second)))
sys.argv[0] = "r1fast"
sys.exit(cli.main())
'''


@pytest.mark.parametrize("first, where, second, second_at", [
    ("SIGINT", "exec", "none", "none"), ("SIGINT", "import", "none", "none"), ("SIGTERM", "exec", "none", "none"),
    ("SIGINT", "exec", "SIGINT", "line"), ("SIGINT", "exec", "SIGTERM", "exit"), ("SIGTERM", "del", "none", "none"),
    ("SIGINT", "del", "none", "none")])
def test_a_stop_while_a_training_command_starts_ends_it_with_its_line_and_status_130(tmp_path, first, where, second,
                                                                                       second_at):
    # a Ctrl-C while torch's import ran a dataclass's generated code printed the `stopped; continue with ...` line,
    # and then `python -m r1fast` died by SIGINT; one in an import that swallowed it went unseen (torch's went on
    # half-imported, and failed later); a SIGTERM before the trainer's loop (the model loading) killed the
    # command without a word; a second Ctrl-C or SIGTERM after that line raised a KeyboardInterrupt traceback past
    # it or killed the process by its signal, while the interpreter shut down too. The shell saw 130 or 143 from a
    # process killed by a signal, not the command's status 130. Each now ends with that line and exits with 130
    run = tmp_path / "run"
    (tmp_path / "stopped_command.py").write_text(_STOPPED_COMMAND)
    # 20 steps: a stop sent again after an import or a __del__ (50 ms later) lands in the loop, not after the final
    # save (which ends the run whole); 3 were done in those 50 ms on a fast machine
    args = ["sft", "model_name_or_path=builtin:micro", "dataset=builtin:arithmetic", f"output_dir={run}",
            "max_steps=20"]
    done = subprocess.run([sys.executable, "-m", "stopped_command", first, where, second, second_at, *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert done.returncode == 130, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == f"r1fast sft: stopped; continue with: r1fast {' '.join(args)} --resume", done.stderr
    assert main([*args, "--resume"]) == 0 and os.path.isdir(run / "checkpoint-20")


def test_a_stop_python_dropped_in_a_del_is_sent_again_once():
    """A Ctrl-C or SIGTERM raised in a __del__ (Python drops it) was sent again twice: at once by the unraisable
    hook, and a second later by the sending again meant for a stop something swallowed. The trainer took the
    first as its stop (finish the step, write a checkpoint) and the second as an abort, which cut that short."""
    code = ("import os, signal, sys, time\n"
            "from r1fast import cli\n"
            "cli._stop_signals_end_the_command()\n"
            "commands_handler = signal.getsignal(signal.SIGINT)\n"
            "received = []\n"
            "signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))\n"
            "class StoppedInItsDel:\n"
            "    def __del__(self):\n"
            "        commands_handler(signal.SIGINT, sys._getframe())   # a Ctrl-C that lands in this __del__\n"
            "StoppedInItsDel()\n"
            "for _ in range(200):   # past the second after which a swallowed stop is sent again\n"
            "    time.sleep(0.01)\n"
            "print(len(received))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ})
    assert done.returncode == 0 and "Exception ignored" not in done.stderr, done.stderr
    assert done.stdout == "1\n", done.stderr


def test_an_abort_python_dropped_in_a_del_is_sent_again():
    """A second Ctrl-C (the abort) that a trainer's stop handler raised in a __del__ was dropped by Python with an
    `Exception ignored in` traceback, and the run went on until a third."""
    code = ("import os, signal, sys, time, types\n"
            "from r1fast import cli\n"
            "from r1fast.trainer.grpo import stop_handlers\n"
            "cli._stop_signals_end_the_command()\n"
            "class AbortedInItsDel:\n"
            "    def __del__(self):\n"
            "        os.kill(os.getpid(), signal.SIGINT)\n"
            "        sum(range(9))   # the handler runs here, inside the __del__\n"
            "trainer = types.SimpleNamespace(_stop_requested=True)   # a first stop was taken: the next one aborts\n"
            "try:\n"
            "    with stop_handlers(trainer):\n"
            "        AbortedInItsDel()\n"
            "        for _ in range(500):   # the abort is sent again 50 ms later, and ends this wait\n"
            "            time.sleep(0.01)\n"
            "    print('went on')\n"
            "except KeyboardInterrupt:\n"
            "    print('aborted')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ})
    assert done.returncode == 0 and "Exception ignored" not in done.stderr, done.stderr
    assert done.stdout == "aborted\n", done.stderr


def _prompts_file(path, answers: list) -> list[dict]:
    rows = [{"prompt": f"What is {i}+{i + 1}?", "answer": a} for i, a in enumerate(answers)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_sample_leaves_out_the_samples_no_reward_scored_and_says_how_many(tmp_path, monkeypatch, capsys):
    # with reward_funcs=[accuracy], a prompt without an answer got None for each sample, which passed every
    # threshold: its samples were kept, and counted in the pass rate, as if correct
    monkeypatch.chdir(tmp_path)
    rng = random.Random()
    n, samples = rng.randint(3, 6), rng.randint(2, 3)
    unanswered = set(rng.sample(range(n), rng.randint(1, n - 1)))
    answers = [None if i in unanswered else str(2 * i + 1) for i in range(n)]
    _prompts_file(tmp_path / "p.jsonl", answers)
    args = ["sample", "model_name_or_path=builtin:micro", "dataset=p.jsonl", f"num_samples={samples}",
            "max_completion_length=4", "keep_truncated=true", "reward_funcs=[accuracy]", "progress_bar=false",
            "device=cpu", "output_file=kept.jsonl"]
    have = "has" if len(unanswered) == 1 else "have"
    with pytest.warns(UserWarning, match=rf"^{len(unanswered)} of the {n} prompts of the prompt dataset {have} no "
                                         rf"reference answer in column 'answer' \(the first: row {min(unanswered)} "
                                         rf"\('p.jsonl' line {min(unanswered) + 1}\)\): reward 'accuracy' cannot score "
                                         r"their samples, which are left out: no other reward scores them$"):
        assert main(args) == 0
    kept = [json.loads(line) for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
    assert all(r["answer"] is not None and r["rewards"]["accuracy"] == 1.0 for r in kept), kept
    stats = json.loads((tmp_path / "kept.jsonl.sample_stats.json").read_text())["stats"]
    assert stats["unscored"] == samples * len(unanswered) and stats["passed"] == len(kept)
    assert f"; {samples * len(unanswered)} left out unscored: no reward function could score them)" in \
        capsys.readouterr().out


def test_sample_refuses_an_answer_column_without_answers_before_the_model_loads(tmp_path, monkeypatch):
    # an answer column null in every prompt kept every sample (accuracy alone: pass rate 1.000) or judged them all
    # by format alone, where a dataset without the column was refused
    from r1fast.trainer import common

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(common, "load_model_and_tokenizer", lambda *a, **kw: pytest.fail("the model was loaded"))
    rng = random.Random()
    n = rng.randint(2, 5)
    base = ["sample", "model_name_or_path=builtin:micro", "dataset=p.jsonl", "device=cpu", "output_file=kept.jsonl"]
    said = (r"^r1fast sample: reward 'accuracy' has no reference answer to check samples against: column 'answer' "
            r"\(option 'answer_column'\) is empty \(null\) in all {} prompts of the prompt dataset \('p.jsonl'\); give "
            r"the answers, set answer_column to the column that holds them, or leave accuracy out of reward_funcs$")
    _prompts_file(tmp_path / "p.jsonl", [rng.choice([None, "", []]) for _ in range(n)])
    for funcs in ("[accuracy]", "[accuracy,format]"):
        with pytest.raises(SystemExit, match=said.format(n)):
            main([*base, f"reward_funcs={funcs}"])
    # the prompts max_prompts takes hold none, the later ones do
    _prompts_file(tmp_path / "p.jsonl", [None] * n + ["7"])
    with pytest.raises(SystemExit, match=said.format(n)):
        main([*base, f"max_prompts={n}"])
