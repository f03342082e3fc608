"""Fault injection into save_checkpoint: every file-system operation of a full save (the new checkpoint's files, the
replaced checkpoint set aside, the oldest pruned) fails in turn, as an error (the save's own clean-up runs) and as a
kill (nothing after it runs), and the run folder is then checked as a resume finds it."""
import builtins
import contextlib
import errno
import json
import os
import random
import re
import shutil

import pytest
import safetensors.torch
import torch

from r1fast.data import build_char_tokenizer
from r1fast.models import CausalLM, ModelConfig
from r1fast.trainer import checkpoints as ckpt

_TOK = build_char_tokenizer()
# the os calls that change the file system (os.open only when it opens to write)
_MUTATING = ("rename", "replace", "remove", "unlink", "rmdir", "mkdir", "fsync", "truncate", "ftruncate", "chmod",
             "open")


class Killed(BaseException):
    """The process killed at an operation: not an Exception, so no `except Exception` handles it."""


class _Faults:
    """Counts the mutating operations; the `at`-th fails. A kill (`kill`) fails every one after it too, so that no
    clean-up of the save's reaches the disk, as after a SIGKILL or a power loss."""

    def __init__(self, at: int, kill: bool):
        self.at, self.kill, self.count, self.dead, self.ops = at, kill, 0, False, []

    def hit(self, what: str):
        if self.dead:
            raise Killed(what)
        self.count += 1
        self.ops.append(what)
        if self.count == self.at:
            if self.kill:
                self.dead = True
                raise Killed(what)
            raise OSError(errno.EIO, "injected failure", what)


@contextlib.contextmanager
def _failing_at(at: int, kill: bool):
    faults = _Faults(at, kill)
    real_os = {name: getattr(os, name) for name in _MUTATING}
    real_open, real_save_file = builtins.open, safetensors.torch.save_file

    def counted(name):
        def op(*args, **kwargs):
            writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT
            if name != "open" or (args[1] if len(args) > 1 else kwargs.get("flags", 0)) & writes:
                faults.hit(f"os.{name}{args[:2]}")
            return real_os[name](*args, **kwargs)
        return op

    def opened(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            try:
                faults.hit(f"open({file!r}, {mode!r})")
            except Killed:
                if isinstance(file, (str, os.PathLike)):   # killed once the file was made, before anything was written
                    real_open(file, mode, *args, **kwargs).close()
                raise
        return real_open(file, mode, *args, **kwargs)

    def save_file(tensors, path, metadata=None):
        try:
            faults.hit(f"save_file({path!r})")
        except Killed:   # killed half way through writing the file
            real_save_file(tensors, path, metadata=metadata)
            real_os["truncate"](path, os.path.getsize(path) // 2)
            raise
        real_save_file(tensors, path, metadata=metadata)

    try:
        for name in _MUTATING:
            setattr(os, name, counted(name))
        builtins.open = opened
        safetensors.torch.save_file = save_file
        yield faults
    finally:
        for name, fn in real_os.items():
            setattr(os, name, fn)
        builtins.open, safetensors.torch.save_file = real_open, real_save_file


_STEPPED: dict = {}


def _trained(step: int):
    """(model, optimizer) as at `step`: weights and Adam moments of their own for each step."""
    if step not in _STEPPED:
        cfg = ModelConfig(vocab_size=len(_TOK), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=32)
        model = CausalLM(cfg)
        model.reset_parameters(seed=step)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.randint(0, len(_TOK), (6,), generator=torch.Generator().manual_seed(step))).sum().backward()
        opt.step()
        _STEPPED[step] = model, opt
    return _STEPPED[step]


def _log(run: str, step: int):
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write(f'{{"step": {step}}}\n')


def _save(run: str, step: int, keep):
    model, opt = _trained(step)
    return ckpt.save_checkpoint(run, step, model=model, optimizer=opt, tokenizer=_TOK, state={"saved_at": step},
                                keep=keep)


def _problems_of(folder: str) -> list[str]:
    """What keeps `folder` from being resumed as the checkpoint of its step: a file missing or cut short, or
    another step's weights or optimizer moments."""
    name = os.path.basename(folder)
    step = int(name.removeprefix("abandoned-").split("-")[1])
    fresh_model = CausalLM(_trained(100)[0].config)
    fresh_opt = torch.optim.AdamW(fresh_model.parameters(), lr=1e-3)
    try:
        state = ckpt.load_checkpoint(folder, model=fresh_model, optimizer=fresh_opt)
    except ValueError as e:
        return [f"{name}: {e}"]
    want_model, want_opt = _trained(step)
    same = state["saved_at"] == step and all(torch.equal(p, q) for p, q in zip(fresh_model.parameters(),
                                                                                 want_model.parameters()))
    same = same and all(torch.equal(fresh_opt.state[p]["exp_avg"], want_opt.state[q]["exp_avg"])
                        for p, q in zip(fresh_model.parameters(), want_model.parameters()) if q in want_opt.state)
    problems = [] if same else [f"{name} holds another step's state"]
    if not os.path.isfile(os.path.join(folder, "metrics.jsonl")):
        problems.append(f"{name} lacks its metrics.jsonl")
    return problems


@pytest.mark.parametrize("kill", [False, True], ids=["error", "kill"])
def test_a_save_failing_at_any_operation_leaves_a_complete_checkpoint_to_resume_and_the_next_save_works(tmp_path,
                                                                                                          kill):
    # checkpoint-1..3, then checkpoint-3 saved again (a run resumed from checkpoint-2 whose newer ones were not set
    # aside: replaced) with keep=2: a full save writes the new folder, sets the old checkpoint-3 aside, renames the
    # new one in, deletes the old and prunes checkpoint-1
    template = str(tmp_path / "template")
    for step in (1, 2, 3):
        _log(template, step)
        _save(template, step, None)
    shutil.copytree(template, tmp_path / "count")
    with _failing_at(0, kill=False) as counted:   # at no operation: the count of a full save
        _save(str(tmp_path / "count"), 3, 2)
    assert len(counted.ops) > 40 and any("rmdir" in op for op in counted.ops)   # the pruning's deletions included
    failures = []
    for at in range(1, len(counted.ops) + 1):
        run = str(tmp_path / f"at{at}")
        shutil.copytree(template, run)
        # an error the save can do without (a folder's fsync, a deletion) is not raised
        with contextlib.suppress(OSError, Killed), _failing_at(at, kill):
            _save(run, 3, 2)
        problems = []
        # (b) whatever looks like a checkpoint is a whole one, as a reader finds it before any clean-up...
        for _, folder in ckpt.list_checkpoints(run):
            problems += _problems_of(folder)
        # ...and after what a resume does first: no leftover folder, and the newest checkpoint is step 3's (old or new)
        ckpt.remove_save_leftovers(run)
        problems += [f"{name} left behind" for name in os.listdir(run) if name.startswith(".")]
        if ckpt.latest_checkpoint(run) != os.path.join(run, "checkpoint-3"):
            problems.append(f"the checkpoint to resume is {ckpt.latest_checkpoint(run)}")
        for _, folder in ckpt.list_checkpoints(run):
            problems += _problems_of(folder)
        # (c) the next save succeeds and keeps the last two
        _log(run, 4)
        _save(run, 4, 2)
        steps = [step for step, _ in ckpt.list_checkpoints(run)]
        if steps != [3, 4]:
            problems.append(f"after the next save the checkpoints are {steps}")
        failures += [f"{counted.ops[at - 1]}: {p}" for p in problems]
        shutil.rmtree(run)
    assert not failures, "\n".join(failures)


def _branch_folder(run: str) -> dict[str, str]:
    """Run to step 6, resumed from checkpoint-3 and run to 6 again: each folder tagged with its branch."""
    import json

    for name, tag in (("checkpoint-3", "c3"), ("checkpoint-4", "left"), ("checkpoint-5", "left"),
                      ("checkpoint-6", "left"), ("abandoned-checkpoint-4", "resumed")):
        os.makedirs(os.path.join(run, name))
        with open(os.path.join(run, name, ckpt.STATE_FILE), "w", encoding="utf-8") as f:
            json.dump({"tag": tag}, f)


def _tags(run: str) -> dict[str, str]:
    import json

    return {name: json.load(open(os.path.join(run, name, ckpt.STATE_FILE)))["tag"] for name in os.listdir(run)
            if not name.startswith(".") and name != "metrics.jsonl"}


def test_a_resume_killed_while_setting_its_left_branch_aside_is_finished_by_the_next_run(tmp_path):
    # resuming from abandoned-checkpoint-4 renames the left branch's checkpoint-4, -5, -6 aside, then the resumed one
    # to checkpoint-4: killed between two of those renames, a bare --resume went on from the left branch's
    # checkpoint-6 (or -5), or back to checkpoint-3 when only the resumed one was still under its set-aside name
    done = str(tmp_path / "done")
    _branch_folder(done)
    set_aside, back = ckpt.leave_branch(done, os.path.join(done, "abandoned-checkpoint-4"))
    assert back == os.path.join(done, "checkpoint-4") and len(set_aside) == 3
    whole = _tags(done)
    assert whole["checkpoint-4"] == "resumed" and sorted(whole) == sorted(os.listdir(done))   # no journal left
    count = str(tmp_path / "count")
    _branch_folder(count)
    with _failing_at(0, kill=False) as counted:
        ckpt.leave_branch(count, os.path.join(count, "abandoned-checkpoint-4"))
    renames = [at for at, op in enumerate(counted.ops, 1) if op.startswith("os.rename")]
    assert len(renames) == 4
    for at in range(1, len(counted.ops) + 1):
        run = str(tmp_path / f"at{at}")
        _branch_folder(run)
        with contextlib.suppress(Killed), _failing_at(at, kill=True):
            ckpt.leave_branch(run, os.path.join(run, "abandoned-checkpoint-4"))
        ckpt.remove_save_leftovers(run)   # what the next run does first
        # the resume finished (or, killed before its journal was written, not begun: the same command resumes again)
        assert _tags(run) in (whole, {"checkpoint-3": "c3", "checkpoint-4": "left", "checkpoint-5": "left",
                                      "checkpoint-6": "left", "abandoned-checkpoint-4": "resumed"}), counted.ops[at - 1]
        assert not [name for name in os.listdir(run) if name.startswith(".")]
        if at >= renames[0]:   # once a checkpoint has moved, the one to resume is the resumed one
            assert ckpt.latest_checkpoint(run) == os.path.join(run, "checkpoint-4"), counted.ops[at - 1]


def test_a_set_aside_journal_that_is_a_symlink_is_never_written_through(tmp_path):
    # the journal was written through a symlink in its place (metrics.replacing writes where a link leads): a link
    # planted as .r1fast-set-aside.json made a resume replace the file it led to, outside the run folder
    run = str(tmp_path / "run")
    _branch_folder(run)
    outside = tmp_path / "notes.txt"
    outside.write_text("the user's own file\n")
    os.symlink(outside, os.path.join(run, ckpt.SET_ASIDE_JOURNAL))
    with pytest.warns(UserWarning, match="cannot be read"):
        ckpt.remove_save_leftovers(run)   # no journal in it: said and left, as an unreadable one
    ckpt.leave_branch(run, os.path.join(run, "abandoned-checkpoint-4"))
    assert outside.read_text() == "the user's own file\n"
    assert _tags(run)["checkpoint-4"] == "resumed" and not os.path.lexists(os.path.join(run, ckpt.SET_ASIDE_JOURNAL))


@pytest.mark.parametrize("delete", ["prune", "clear_run"])
def test_a_checkpoint_is_renamed_out_of_sight_on_disk_before_its_deletion_starts(tmp_path, disk_ops, delete):
    # _delete_checkpoint renames checkpoint-N to a temporary name so that a kill part way through the deletion leaves
    # no checkpoint that looks complete; but the rename was not synced before rmtree began: a power loss could keep
    # some of the deletion's unlinks and not the rename, and checkpoint-N came back with files missing
    run = str(tmp_path / "run")
    _log(run, 1)
    _save(run, 1, None)
    disk_ops.clear()
    if delete == "prune":
        _log(run, 2)
        _save(run, 2, 1)
    else:
        ckpt.clear_run(run)
    moved = [i for i, op in enumerate(disk_ops) if op[0] == "rename" and op[1] == os.path.join(run, "checkpoint-1")]
    assert len(moved) == 1
    doomed = disk_ops[moved[0]][2]
    assert os.path.basename(doomed).startswith(".tmp-checkpoint-1-deleting-") and not os.path.exists(doomed)
    assert disk_ops.synced_between(moved[0], disk_ops.at(("rmtree", doomed), after=moved[0]), run)


def test_a_replaced_checkpoint_is_deleted_only_once_the_new_one_is_in_on_disk(tmp_path, disk_ops):
    # a save of a step whose checkpoint is there (a resume that saves its step again) set the old folder aside,
    # renamed the new one in and deleted the old before syncing the run folder: a power loss could keep part of the
    # deletion and not the renames, and checkpoint-N was the old folder with files missing
    run = str(tmp_path / "run")
    _log(run, 3)
    _save(run, 3, None)
    disk_ops.clear()
    _save(run, 3, None)
    final = os.path.join(run, "checkpoint-3")
    into_place = [i for i, op in enumerate(disk_ops) if op[0] == "rename" and op[2] == final]
    aside = [op[2] for op in disk_ops if op[0] == "rename" and op[1] == final]
    assert len(into_place) == 1 and len(aside) == 1 and not os.path.exists(aside[0])
    assert os.path.basename(disk_ops[into_place[0]][1]).startswith(".tmp-checkpoint-3-")
    assert disk_ops.synced_between(into_place[0], disk_ops.at(("rmtree", aside[0])), run)
    assert _problems_of(final) == []


def test_a_new_checkpoints_folder_is_synced_with_its_files_before_it_is_renamed_in(tmp_path, disk_ops):
    # fsync_files synced each file of the temporary folder but not the folder: the files' names are its entries,
    # which a file's fsync does not promise to write, so the checkpoint renamed into place could come back after a
    # power loss with files missing
    run = str(tmp_path / "run")
    _log(run, 1)
    final = _save(run, 1, None)
    into_place = [i for i, op in enumerate(disk_ops) if op[0] == "rename" and op[2] == final]
    assert len(into_place) == 1
    tmp = disk_ops[into_place[0]][1]
    synced = [op[1] for op in disk_ops[:into_place[0]] if op[0] == "fsync"]
    assert {os.path.join(tmp, name) for name in os.listdir(final)} <= set(synced)
    assert tmp in synced and synced.index(tmp) > max(synced.index(os.path.join(tmp, n)) for n in os.listdir(final))


def test_a_checkpoint_of_an_output_dir_given_as_dot_is_renamed_out_of_sight_on_disk_before_its_deletion(
        tmp_path, monkeypatch, disk_ops):
    # output_dir="." (the run in the working folder): _delete_checkpoint split "./checkpoint-1", normalised, into the
    # folder "" and the name, and fsync_dir("") failed to open "" and synced nothing, saying nothing
    monkeypatch.chdir(tmp_path)
    _log(".", 1)
    _save(".", 1, None)
    _log(".", 2)
    disk_ops.clear()
    _save(".", 2, 1)
    moved = [i for i, op in enumerate(disk_ops) if op[0] == "rename" and op[1] == str(tmp_path / "checkpoint-1")]
    assert len(moved) == 1
    doomed = disk_ops[moved[0]][2]
    assert os.path.basename(doomed).startswith(".tmp-checkpoint-1-deleting-") and not os.path.exists(doomed)
    assert disk_ops.synced_between(moved[0], disk_ops.at(("rmtree", doomed), after=moved[0]), tmp_path)
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint-")) == ["checkpoint-2"]


@pytest.mark.parametrize("refusal", [errno.EINVAL, errno.ENOTSUP])
def test_a_file_system_that_refuses_fsync_still_gets_its_checkpoints_metrics_and_samples(tmp_path, monkeypatch,
                                                                                         refusal):
    # Some FUSE and overlay file systems refuse fsync (EINVAL, ENOTSUP). fsync_dir and the bench's results took that
    # as "not durable here", but a checkpoint save, a metrics file's replacement and rejection sampling's progress
    # lines failed on it: a run on such a disk crashed at its first save. An I/O error still stops it.
    from r1fast.trainer.metrics import replacing
    from r1fast.trainer.sampling import SampleProgress

    real = os.fsync

    def fsync(fd):
        if not os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(refusal, os.strerror(refusal))
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    run = str(tmp_path / "run")
    _log(run, 1)
    final = _save(run, 1, None)
    assert _problems_of(final) == []
    with replacing(os.path.join(run, "summary.json")) as f:
        f.write("{}")
    assert open(os.path.join(run, "summary.json")).read() == "{}"
    progress = SampleProgress(str(tmp_path / "kept.jsonl.progress"), "fp")
    progress.append([{"prompt": "1+1", "completion": "2"}], {"next_prompt": 1})
    assert "1+1" in open(tmp_path / "kept.jsonl.progress").read()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        _save(run, 2, None)


def test_an_abort_that_comes_during_an_import_is_raised_once_the_import_is_done(tmp_path, monkeypatch, sigterm_guard):
    # a second Ctrl-C or SIGTERM (the abort) raised its KeyboardInterrupt inside whatever import was running: in
    # Triton's C++ start-up (a lazy import as a pipeline stage built its optimizer) it aborted the process
    # (`terminate called after throwing an instance of 'nanobind::python_error'`), and an import that swallowed it
    # left the run going. It is now raised once the import is done
    import sys
    import time
    import types

    from r1fast.trainer.grpo import stop_handlers

    (tmp_path / "swallows_an_abort.py").write_text(
        "import os, signal\ntry:\n    os.kill(os.getpid(), signal.SIGTERM)\n    sum(range(9))\n"
        "except BaseException:\n    pass\nimported = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "swallows_an_abort", raising=False)
    trainer = types.SimpleNamespace(_stop_requested=True)   # a first stop was taken: the next one aborts
    waited = 0
    with pytest.raises(KeyboardInterrupt):
        with stop_handlers(trainer):
            import swallows_an_abort

            assert swallows_an_abort.imported   # not cut short
            while waited < 500:   # the abort comes 50 ms after the import, and ends this wait
                time.sleep(0.01)
                waited += 1
    assert waited < 500
    sys.modules.pop("swallows_an_abort", None)


@pytest.mark.parametrize("saved, visible", [(2, 1), (12, 12), (8, 3)])
def test_cuda_generator_states_go_to_the_devices_of_their_index_and_those_not_visible_are_left(monkeypatch, saved,
                                                                                               visible):
    # a checkpoint of a node with more GPUs visible than the resuming one's was refused ("cannot load the RNG state
    # (IndexError: tuple index out of range)"), and from 11 devices on torch_cuda_10 (sorted as text before
    # torch_cuda_2) was set on device 2
    gen = torch.Generator().manual_seed(saved * 100 + visible)
    states = {f"torch_cuda_{i}": torch.randint(0, 256, (16,), dtype=torch.uint8, generator=gen) for i in range(saved)}
    cpu = torch.get_rng_state()
    _, meta = ckpt.rng_state()
    set_on: dict[int, torch.Tensor] = {}

    def set_rng_state(state, device="cuda"):
        index = device if isinstance(device, int) else torch.device(device).index
        if index >= visible:   # torch.cuda.default_generators[index], once CUDA is initialised
            raise IndexError("tuple index out of range")
        set_on[index] = state.clone()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)
    ckpt.set_rng_state({"torch_cpu": cpu, **states}, meta)
    assert sorted(set_on) == list(range(min(saved, visible)))
    for index, state in set_on.items():
        assert torch.equal(state, states[f"torch_cuda_{index}"])


@pytest.mark.parametrize("field, value", [("hidden_size", 24), ("num_hidden_layers", 2), ("intermediate_size", 48),
                                          ("num_key_value_heads", 1)])
def test_a_checkpoint_of_another_models_shape_is_refused_naming_what_differs(tmp_path, field, value):
    # another model_name_or_path of the same parameter count was refused by its first mismatched tensor ("'0.exp_avg'
    # has shape (106, 16), parameter 0 is (106, 24)"), and of another count as an r1fast before fused q/k/v
    path = _save(str(tmp_path / "run"), 3, keep=None)
    shape = dict(vocab_size=len(_TOK), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, max_position_embeddings=32)
    other = CausalLM(ModelConfig(**{**shape, field: value}))
    saved = _trained(3)[0].config
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(ValueError, match=rf"checkpoint '.*checkpoint-3' is of another model than this run's: its "
                                         rf"config.json has {field} {getattr(saved, field) or 2} \(the model's: "
                                         rf"{value}\)(, head_dim \d+ \(the model's: \d+\))?; resume with the model it "
                                         rf"was trained from"):
        ckpt.load_checkpoint(path, model=other, optimizer=torch.optim.AdamW(other.parameters(), lr=1e-3))
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))
    same = CausalLM(ModelConfig(**shape))   # the same shapes load
    ckpt.load_checkpoint(path, model=same, optimizer=torch.optim.AdamW(same.parameters(), lr=1e-3))
    assert all(torch.equal(a, b) for a, b in zip(same.parameters(), _trained(3)[0].parameters()))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_save_that_cannot_make_its_temporary_folder_names_the_checkpoint(tmp_path, monkeypatch, code):
    # a full disk or a file system remounted read-only mid-run: the error named only the temporary folder's random
    # name ("[Errno 28] No space left on device: 'run/.tmp-checkpoint-3-k2j3ab'")
    import tempfile

    run = str(tmp_path / "run")
    _save(run, 2, keep=None)
    real = tempfile.mkdtemp

    def full(prefix=None, dir=None, **kw):
        name = os.path.join(dir, prefix + "k2j3ab")
        raise OSError(code, os.strerror(code), name)

    monkeypatch.setattr(tempfile, "mkdtemp", full)
    with pytest.raises(OSError, match=rf"cannot write checkpoint {re.escape(os.path.join(run, 'checkpoint-3'))}: "
                                      rf"\[Errno {code}\] {re.escape(os.strerror(code))}"):
        _save(run, 3, keep=1)
    monkeypatch.setattr(tempfile, "mkdtemp", real)
    assert [step for step, _ in ckpt.list_checkpoints(run)] == [2]   # the earlier one kept: nothing pruned
    assert _problems_of(os.path.join(run, "checkpoint-2")) == []


def _edit_tensors(folder: str, name: str, edit):
    file = os.path.join(folder, name)
    safetensors.torch.save_file(edit(safetensors.torch.load_file(file)), file)


def _edit_state(folder: str, edit):
    file = os.path.join(folder, ckpt.STATE_FILE)
    with open(file, encoding="utf-8") as f:
        state = json.load(f)
    edit(state)
    with open(file, "w", encoding="utf-8") as f:
        json.dump(state, f)


@pytest.mark.parametrize("damage, error", [
    (lambda c: os.truncate(os.path.join(c, "optimizer.safetensors"), 1000), r"cannot read optimizer.safetensors"),
    # files that read but hold what r1fast never writes: damaged, as a cut-short one
    (lambda c: _edit_tensors(c, "rng.safetensors", lambda t: {**t, "torch_cpu": t["torch_cpu"][:100].contiguous()}),
     r"rng.safetensors: 'torch_cpu' is not a torch generator state"),
    (lambda c: _edit_tensors(c, "optimizer.safetensors", lambda t: {k: v for k, v in t.items() if k[:2] != "1."}),
     r"optimizer.safetensors lacks '1.exp_avg', '1.exp_avg_sq', '1.step', which trainer_state.json's "
     r"optimizer.state_keys lists \(the optimizer state is incomplete\)"),
    (lambda c: _edit_state(c, lambda s: s["rng"].update(python=[3, [1, 2], None])),
     r"trainer_state.json: rng.python is not a Python random state"),
    (lambda c: _edit_state(c, lambda s: s["optimizer"]["param_groups"][0]["params"].__setitem__(1, 0)),
     r"trainer_state.json: optimizer.param_groups name a parameter index twice"),
    (lambda c: os.remove(os.path.join(c, "rng.safetensors")), r"lacks rng.safetensors"),
    (lambda c: os.truncate(os.path.join(c, "model.safetensors"), 3000), r"model.safetensors"),
    (lambda c: os.remove(os.path.join(c, "model.safetensors")), r"lacks the model weights"),
    (lambda c: open(os.path.join(c, "trainer_state.json"), "w").write("{"), r"trainer_state.json is not valid JSON"),
])
def test_a_damaged_checkpoint_names_the_earlier_one_to_resume_from(tmp_path, damage, error):
    # "resume from an earlier checkpoint" (or nothing) left the user to find which, and a bare --resume, which the
    # CLI suggested, took the damaged one again
    run = str(tmp_path / "run")
    steps = sorted(random.Random(str(error)).sample(range(1, 50), 3))
    for step in steps:
        _save(run, step, keep=None)
    newest, earlier = (os.path.join(run, f"checkpoint-{s}") for s in (steps[-1], steps[-2]))
    damage(newest)
    model, opt = _trained(steps[-1])
    with pytest.raises(ValueError, match=rf"{error}.*; resume from an earlier checkpoint: --resume "
                                         rf"{re.escape(earlier)} \(the steps after it are set aside\)"):
        ckpt.load_checkpoint(newest, model=model, optimizer=opt)
    for step in steps[1:]:
        ckpt._delete_checkpoint(os.path.join(run, f"checkpoint-{step}"))
    oldest = os.path.join(run, f"checkpoint-{steps[0]}")
    damage(oldest)
    with pytest.raises(ValueError, match=rf"{error}.*; there is no earlier checkpoint beside it to resume from"):
        ckpt.load_checkpoint(oldest, model=model, optimizer=opt)


def test_a_checkpoint_of_another_optimizer_setup_is_not_called_damaged(tmp_path):
    # its earlier checkpoints were written with the same setup: "resume from an earlier checkpoint" would send the
    # user to one refused alike, so the error keeps its own remedy (resume with the weight_decay it was written with)
    run = str(tmp_path / "run")
    for step in (2, 5):
        _save(run, step, keep=None)
    model, _ = _trained(5)
    params = list(model.parameters())
    two_groups = torch.optim.AdamW([{"params": [p for p in params if p.dim() > 1]},
                                    {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}], lr=1e-3)
    with pytest.raises(ValueError, match=r"param_groups hold \[\d+\] parameters, this optimizer's \[\d+, \d+\]") as e:
        ckpt.load_checkpoint(os.path.join(run, "checkpoint-5"), model=model, optimizer=two_groups)
    assert not isinstance(e.value, ckpt.DamagedCheckpoint) and "earlier checkpoint" not in str(e.value)


def test_a_damaged_checkpoint_of_a_pipelines_stage_says_how_the_pipeline_resumes_from_the_earlier_one(tmp_path):
    # the pipeline's --resume takes its run folder: "--resume <stage>/checkpoint-2" was refused as no pipeline folder
    stage = str(tmp_path / "p" / "rl")
    for step in (2, 5):
        _save(stage, step, keep=None)
    (tmp_path / "p" / "pipeline_state.json").write_text('{"order": ["rl"], "stages": {}}')
    newest = os.path.join(stage, "checkpoint-5")
    os.truncate(os.path.join(newest, "optimizer.safetensors"), 100)
    model, opt = _trained(5)
    with pytest.raises(ValueError, match=rf"resume from an earlier checkpoint: move {re.escape(newest)} out of the run "
                                         rf"folder and --resume again, which continues the stage from "
                                         rf"{re.escape(os.path.join(stage, 'checkpoint-2'))}$"):
        ckpt.load_checkpoint(newest, model=model, optimizer=opt)


def test_the_cli_adds_no_bare_resume_to_a_damaged_checkpoints_named_remedy(tmp_path, capsys):
    # a bare --resume takes the damaged checkpoint again: the line "once that is fixed, continue with: ... --resume"
    # under the error's own "--resume <earlier checkpoint>" sent the user round in a circle
    from r1fast.cli import main

    run = tmp_path / "g"
    args = ["train", "model_name_or_path=builtin:micro", "dataset=builtin:arithmetic", "save_steps=1",
            f"output_dir={run}", "progress_bar=false", "eval_steps=0", "num_generations=2",
            "per_device_train_batch_size=2", "max_completion_length=8"]
    assert main(args + ["max_steps=2"]) in (0, None)
    victim = random.choice(["optimizer.safetensors", "rng.safetensors", "model.safetensors"])
    os.truncate(run / "checkpoint-2" / victim, 100)
    with pytest.raises(SystemExit) as exit_:
        main(args + ["max_steps=3", "--resume"])
    message = str(exit_.value.code)
    assert "cannot read" in message and victim in message and f"--resume {run / 'checkpoint-1'}" in message, message
    assert "continue with" not in message, message
