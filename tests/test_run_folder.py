"""One training run per run folder at a time: a second run (another process, or N copies launched by
torchrun) fails at once with a message, instead of interleaving its metrics and checkpoints with the
first run's."""
import fcntl
import os
import subprocess
import sys
import textwrap

import pytest

from r1fast.cli import main
from r1fast.trainer.checkpoints import LOCK_FILE, RunFolderBusy, own_run_folder
from test_trainer import ROWS, make, tiny_model


def _hold(run_dir, pid_text=b"4242"):
    """Lock `run_dir` through a descriptor of our own: to the code under test, another process."""
    os.makedirs(run_dir, exist_ok=True)
    fd = os.open(os.path.join(run_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, pid_text)
    return fd


def _free(run_dir) -> bool:
    """Whether nobody holds `run_dir` now."""
    fd = os.open(os.path.join(run_dir, LOCK_FILE), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_a_grpo_run_in_a_held_folder_fails_before_writing_anything(tmp_path):
    run = tmp_path / "r"
    fd = _hold(run)
    tr = make(tmp_path, "r", max_steps=2)
    with pytest.raises(RunFolderBusy, match=rf"{run} is in use by another r1fast run \(process 4242\)"):
        tr.train()
    assert sorted(os.listdir(run)) == [LOCK_FILE] and tr.global_step == 0
    os.close(fd)
    assert tr.train()["global_step"] == 2
    assert _free(run)  # released when the run ends
    # the winner's pid is in the file for the next one's message
    assert (run / LOCK_FILE).read_text() == str(os.getpid())


def test_the_folder_is_released_when_a_run_fails(tmp_path):
    from r1fast.trainer import GRPOConfig, GRPOTrainer

    def broken(prompts, completions, **kw):
        raise RuntimeError("boom")

    model, tok = tiny_model()
    tr = GRPOTrainer(model, [broken], ROWS, GRPOConfig(per_device_train_batch_size=8, num_generations=4, max_steps=2,
                                                       max_completion_length=4, output_dir=str(tmp_path / "r"),
                                                       progress_bar=False), tokenizer=tok)
    with pytest.raises(Exception, match="boom"):
        tr.train()
    assert _free(tmp_path / "r")


def test_a_full_disk_at_the_lock_names_the_run_folder(tmp_path, monkeypatch):
    # writing the pid into the lock is a run's first write: on a full disk the error was a bare
    # "[Errno 28] No space left on device" naming no file (os.pwrite's errors carry none)
    def full(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError, match=rf"No space left on device: '{tmp_path / 'r' / LOCK_FILE}'"):
        with own_run_folder(str(tmp_path / "r")):
            pass
    monkeypatch.undo()
    assert _free(tmp_path / "r")
    with own_run_folder(str(tmp_path / "r")):   # not left held by this process
        pass


def test_holds_nest_within_one_process_and_release_at_the_outermost(tmp_path):
    run = str(tmp_path / "r")
    with own_run_folder(run):
        with own_run_folder(run):  # a pipeline re-entering its own folder
            assert not _free(run)
        assert not _free(run)
        with own_run_folder(os.path.join(run, "stage")):  # a stage's folder inside it is its own
            assert not _free(os.path.join(run, "stage"))
        assert _free(os.path.join(run, "stage"))
    assert _free(run)
    with own_run_folder(run):  # a later run in this process locks it afresh
        assert not _free(run)


def test_a_pipeline_and_an_sft_run_check_their_folders_too(tmp_path):
    from r1fast.trainer.pipeline import run_pipeline
    from test_pipeline import one_sft_stage_spec

    spec = one_sft_stage_spec(tmp_path)
    fd = _hold(tmp_path / "run")
    with pytest.raises(RunFolderBusy, match="process 4242"):
        run_pipeline(str(spec), [f"output_dir={tmp_path / 'run'}"])
    os.close(fd)
    # the stage's own folder, held while the pipeline's is free
    fd = _hold(tmp_path / "run" / "s", b"77")
    with pytest.raises(RunFolderBusy, match=r"run/s is in use by another r1fast run \(process 77\)"):
        run_pipeline(str(spec), [f"output_dir={tmp_path / 'run'}"])
    os.close(fd)
    assert _free(tmp_path / "run")


@pytest.mark.parametrize("world_size", ["2", "8"])
def test_torchrun_copies_are_refused_with_what_to_use(tmp_path, monkeypatch, world_size):
    monkeypatch.setenv("WORLD_SIZE", world_size)
    tr = make(tmp_path, "r", max_steps=1)
    with pytest.raises(ValueError, match=rf"WORLD_SIZE={world_size}: r1fast's own trainers run in one process.*"
                                         r"TRL drop-in"):
        tr.train()
    assert not (tmp_path / "r").exists()
    monkeypatch.setenv("WORLD_SIZE", "1")  # a one-process launch is fine
    assert tr.train()["global_step"] == 1


def test_the_cli_says_the_folder_is_in_use_by_another_process(tmp_path, monkeypatch):
    # a real second process holds the folder (flock is per open file, so the same process would do,
    # but this is the case users meet)
    run = tmp_path / "g"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from r1fast.trainer.checkpoints import own_run_folder
        with own_run_folder({str(run)!r}):
            print("held", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        g = tmp_path / "g.yaml"
        g.write_text(f"model_name_or_path: builtin:micro\ndataset: builtin:arithmetic\noutput_dir: {run}\n"
                     "per_device_train_batch_size: 4\nnum_generations: 4\nmax_completion_length: 4\n"
                     "max_prompt_length: 16\nmax_steps: 1\nprogress_bar: false\n")
        with pytest.raises(SystemExit, match=rf"^r1fast train: {run} is in use by another r1fast run "
                                             rf"\(process {holder.pid}\)"):
            main(["train", str(g)])
    finally:
        holder.communicate("")
    assert holder.returncode == 0
    assert main(["train", str(g)]) == 0  # the holder is gone: the folder is free


def test_an_error_that_refuses_attributes_leaves_the_run_folder_as_itself(tmp_path):
    # own_run_folder tags an error with its run folders for the CLI's --resume hint; on an exception that
    # refuses new attributes (a read-only error type of a client library) the AttributeError of the tag
    # replaced the run's own error
    class ReadOnlyError(Exception):
        def __setattr__(self, name, value):
            if not name.startswith("__"):   # Python's own (__traceback__, __context__) still set
                raise AttributeError(f"{type(self).__name__} is read-only")
            super().__setattr__(name, value)

    with pytest.raises(ReadOnlyError, match="quota"):
        with own_run_folder(str(tmp_path / "r")):
            raise ReadOnlyError("quota")
    with pytest.raises(ValueError) as e:
        with own_run_folder(str(tmp_path / "r")):
            raise ValueError("a plain error is still tagged")
    assert e.value.r1fast_run_folders == [str(tmp_path / "r")]


def test_ctrl_c_while_torch_was_importing_says_how_to_continue_without_importing_torch(monkeypatch, capsys):
    # A Ctrl-C during startup interrupts torch's import; torch then fails to import again (a RuntimeError about
    # TORCH_LIBRARY "triton"), and the note's command came from r1fast.trainer.checkpoints, which imports torch:
    # a traceback where "stopped; continue with: ..." belonged. Unimportable here stands for that torch.
    from r1fast.trainer import cli

    monkeypatch.setitem(sys.modules, "r1fast.trainer.checkpoints", None)

    def interrupted_at_startup(args):
        raise KeyboardInterrupt

    run = cli._guarded("train", interrupted_at_startup)
    assert run(type("Args", (), {"rest": ["my.yaml", "output_dir=x"]})()) == 130
    assert capsys.readouterr().err == "r1fast train: stopped; continue with: r1fast train my.yaml output_dir=x --resume\n"
