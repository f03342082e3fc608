"""Checkpoint files (safetensors + JSON, atomic) and dataset loading (JSONL, parquet, saved HF
dataset, built-in tasks, chat template)."""
import json
import os
import random
import re
import shutil
import stat

import pytest
import torch

from r1fast.data import (
    ArithmeticTask,
    build_char_tokenizer,
    decode_completion,
    encode_completion,
    encode_prompt,
    load_rows,
)
from r1fast.models import CausalLM, ModelConfig
from r1fast.trainer import checkpoints as ckpt


def _model(tok):
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=32)
    return CausalLM(cfg)


def test_checkpoint_roundtrip_restores_everything(tmp_path):
    tok = build_char_tokenizer()
    model = _model(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    model(torch.arange(10)).sum().backward()
    opt.step()
    sched.step()
    torch.manual_seed(123)
    random.seed(5)
    path = ckpt.save_checkpoint(str(tmp_path), 7, model=model, optimizer=opt, scheduler=sched, tokenizer=tok,
                                state={"data": {"epoch": 1, "index": 3}})
    expect_torch, expect_py = torch.rand(3), random.random()
    files = set(os.listdir(path))
    assert {"model.safetensors", "config.json", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"} <= files
    assert not [f for f in files if f.endswith((".pt", ".bin", ".pkl"))]   # nothing pickled

    model2 = _model(tok)
    model2.reset_parameters(seed=1)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (s + 1))
    state = ckpt.load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)
    assert state["global_step"] == 7 and state["data"] == {"epoch": 1, "index": 3}
    assert torch.equal(torch.rand(3), expect_torch) and random.random() == expect_py
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
        if "exp_avg" in opt.state[p]:   # lm_head gets no gradient from this toy loss
            assert torch.equal(opt.state[p]["exp_avg"], opt2.state[q]["exp_avg"])
    assert sum("exp_avg" in opt2.state[q] for q in model2.parameters()) > 3
    assert sched2.last_epoch == sched.last_epoch and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_checkpoint_files_get_the_mode_the_umask_gives(tmp_path, umask_027):
    # safetensors wrote model/optimizer/rng.safetensors 0600 (its temp file renamed), and the folder was a
    # fixed 0755: a colleague the umask lets read the run could not, and a private umask was not kept
    from conftest import modes_under

    tok = build_char_tokenizer()
    model = _model(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ckpt.save_checkpoint(str(tmp_path), 1, model=model, optimizer=opt, tokenizer=tok)
    model.save_pretrained(str(tmp_path / "exported"), max_shard_size="8KB")   # sharded: several safetensors
    modes = modes_under(tmp_path)
    assert {"checkpoint-1/optimizer.safetensors", "checkpoint-1/rng.safetensors",
            "checkpoint-1/model.safetensors", "exported/model-00002-of-00004.safetensors"} <= set(modes)
    want = {p: 0o750 if (tmp_path / p).is_dir() else 0o640 for p in modes}
    assert modes == want


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names a descriptor's file through /proc")
def test_every_checkpoint_file_is_on_disk_before_the_checkpoint_is_renamed_in(tmp_path, monkeypatch):
    # only the model files and trainer_state.json were fsynced: after a power loss, a checkpoint renamed into
    # place (and its predecessors pruned) could read back with an empty optimizer.safetensors
    tok = build_char_tokenizer()
    model = _model(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.arange(10)).sum().backward()
    opt.step()
    synced, fsync = set(), os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.add(os.readlink(f"/proc/self/fd/{fd}")) or fsync(fd))
    path = ckpt.save_checkpoint(str(tmp_path), 1, model=model, optimizer=opt, tokenizer=tok,
                                write_extra=lambda d: open(os.path.join(d, "reference.safetensors"), "w").close())
    temp_files = {os.path.basename(f) for f in synced if os.path.basename(os.path.dirname(f)).startswith(".tmp-checkpoint-1-")}
    assert temp_files == set(os.listdir(path))


@pytest.mark.parametrize("damage,match", [
    (lambda d: (d / "optimizer.safetensors").write_bytes(b"\x08\x00"), "cannot read optimizer.safetensors"),
    (lambda d: (d / "rng.safetensors").write_bytes(b"\xff" * 10), "cannot read rng.safetensors"),
    (lambda d: (d / "rng.safetensors").unlink(), "lacks rng.safetensors"),
    (lambda d: (d / "model.safetensors").unlink(), "lacks the model weights"),
    (lambda d: (d / "trainer_state.json").write_text('{"global_st'), "trainer_state.json is not valid JSON"),
])
def test_damaged_checkpoint_is_a_clear_error(tmp_path, damage, match):
    # Truncated optimizer/rng files raised safetensors' own SafetensorError (a traceback from the
    # CLI); without model.safetensors the loader read optimizer.safetensors as the weights.
    tok = build_char_tokenizer()
    model = _model(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.arange(10)).sum().backward()
    opt.step()
    path = ckpt.save_checkpoint(str(tmp_path), 3, model=model, optimizer=opt)
    damage(tmp_path / "checkpoint-3")
    model2 = _model(tok)
    with pytest.raises(ValueError, match=match):
        ckpt.load_checkpoint(path, model=model2, optimizer=torch.optim.AdamW(model2.parameters(), lr=1e-3))


def test_a_training_checkpoint_without_its_model_is_not_read_from_its_optimizer_file(tmp_path):
    # from_pretrained fell back to any *.safetensors: a checkpoint-N whose model.safetensors was gone (or
    # replaced by a pickled .bin) was read from optimizer.safetensors and rng.safetensors, and the error said
    # "model.safetensors.index.json holds no layers", naming a file that is not there
    from r1fast.models import from_pretrained

    model = _model(build_char_tokenizer())
    path = ckpt.save_checkpoint(str(tmp_path), 1, model=model, optimizer=torch.optim.AdamW(model.parameters()))
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors weights in .*checkpoint-1' \(it holds only a "
                                                r"training checkpoint's optimizer.safetensors, rng.safetensors"):
        from_pretrained(path)
    open(os.path.join(path, "pytorch_model.bin"), "wb").close()
    with pytest.raises(ValueError, match=r"only pickled weights \(pytorch_model.bin"):
        from_pretrained(path)


def test_a_model_save_stopped_between_its_renames_keeps_or_names_the_previous_model(tmp_path, monkeypatch):
    # save_pretrained over an existing folder renames it to .<name>.old-* and then the new one in: stopped
    # between the two (a Ctrl-C, an error), the folder was gone, and from_pretrained said only "does not exist"
    from r1fast.models import checkpoint, from_pretrained

    model = _model(build_char_tokenizer())
    out = tmp_path / "exported"
    model.save_pretrained(str(out))
    real_rename, renames = os.rename, []

    def stopped_at_the_second_rename(src, dst):
        renames.append(dst)
        if len(renames) == 2:
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", stopped_at_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(str(out))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["exported"]   # put back, the new model's temporary folder gone
    from_pretrained(str(out))
    # a SIGKILL there runs nothing: the previous model is whole under its hidden name, which the error names
    os.rename(out, tmp_path / ".exported.old-abc123")
    with pytest.raises(FileNotFoundError, match=r"exported' does not exist; a save_pretrained stopped part way left "
                                                r"the model that was there in .*/\.exported\.old-abc123: rename it back"):
        from_pretrained(str(out))
    # and so do the trainers' loaders (GRPOTrainer('exported'), r1fast train model_name_or_path=exported, a
    # pipeline's model), which said only "is not a folder"
    from r1fast.trainer.common import load_model_and_tokenizer
    from r1fast.trainer.pipeline import _check_model

    with pytest.raises(ValueError, match=r"exported' is not a folder .*left the model that was there in "
                                         r".*/\.exported\.old-abc123: rename it back"):
        load_model_and_tokenizer(str(out), device="cpu")
    with pytest.raises(ValueError, match=r"exported' is not a folder .*\.exported\.old-abc123: rename it back"):
        _check_model(str(out), "pipeline")
    # an older model set aside so by an earlier stopped save, under a name that sorts after: the newest is named
    model.save_pretrained(str(tmp_path / ".exported.old-zzz999"))
    os.utime(tmp_path / ".exported.old-zzz999", (1e9, 1e9))
    with pytest.raises(FileNotFoundError, match=r"there in .*/\.exported\.old-abc123: rename it back"):
        from_pretrained(str(out))



def test_a_saved_model_is_on_disk_when_save_pretrained_returns_and_the_one_it_replaced_is_deleted_after(tmp_path,
                                                                                                      disk_ops):
    # save_pretrained never synced the folder it renamed into: a power loss after it returned could lose the saved
    # model, and, saving over one, keep some of the previous model's deletion and not the renames, so that the path
    # named the previous model with files missing
    from r1fast.models import from_pretrained

    model = _model(build_char_tokenizer())
    model.reset_parameters(seed=7)
    out = tmp_path / "exported"
    for save in ("new", "over the first"):
        disk_ops.clear()
        model.save_pretrained(str(out))
        into_place = [i for i, op in enumerate(disk_ops) if op[0] == "rename" and op[2] == str(out)]
        assert len(into_place) == 1, save
        assert os.path.basename(disk_ops[into_place[0]][1]).startswith(".exported.tmp-")
        if save == "new":
            assert disk_ops.synced_between(into_place[0], len(disk_ops), tmp_path), save
        else:
            old = [op[2] for op in disk_ops if op[0] == "rename" and op[1] == str(out)]
            assert len(old) == 1 and not os.path.exists(old[0])
            assert disk_ops.synced_between(into_place[0], disk_ops.at(("rmtree", old[0])), tmp_path), save
    loaded = from_pretrained(str(out))
    assert all(torch.equal(p, q) for p, q in zip(loaded.parameters(), model.parameters()))
    assert os.listdir(tmp_path) == ["exported"]

@pytest.mark.parametrize("stop", ["after_the_second_rename", "in_the_old_folders_deletion"])
def test_a_model_save_stopped_once_the_new_folder_is_in_keeps_it(tmp_path, monkeypatch, stop):
    # a Ctrl-C that came once the new folder was renamed in: the rollback renamed the previous one back onto it,
    # which failed ("Directory not empty", an OSError in place of the Ctrl-C); one during the previous folder's
    # deletion (the long part, for a large model) left it half deleted under .<name>.old-*
    from r1fast.models import checkpoint, from_pretrained

    model = _model(build_char_tokenizer())
    out = tmp_path / "exported"
    model.save_pretrained(str(out))
    real_rename, real_rmtree, renames = os.rename, shutil.rmtree, []

    def stopped_after_the_second_rename(src, dst):
        renames.append(dst)
        real_rename(src, dst)
        if len(renames) == 2 and stop == "after_the_second_rename":
            raise KeyboardInterrupt

    def stopped_part_way(path, *a, **k):
        if ".exported.old-" in str(path) and stop == "in_the_old_folders_deletion" and not renames[2:]:
            renames.append("stopped")   # once: one file deleted, then the Ctrl-C
            os.remove(os.path.join(path, "config.json"))
            raise KeyboardInterrupt
        real_rmtree(path, *a, **k)

    monkeypatch.setattr(checkpoint.os, "rename", stopped_after_the_second_rename)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", stopped_part_way)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(str(out))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["exported"]
    from_pretrained(str(out))


def test_a_model_saved_to_a_symlinked_folder_is_written_where_the_link_leads(tmp_path, monkeypatch):
    # the link (to a folder on another disk) was renamed aside and replaced by a folder on the link's disk, and the
    # folder it led to kept the old model; before that, each save also left a hidden .exported.old-* link
    from r1fast.models import checkpoint as model_checkpoint
    from r1fast.models import from_pretrained

    old, new = _model(build_char_tokenizer()), _model(build_char_tokenizer())
    with torch.no_grad():
        new.lm_head_weight.add_(1.0)
    (tmp_path / "run").mkdir()
    old.save_pretrained(str(tmp_path / "disk2"))
    link = tmp_path / "run" / "exported"
    os.symlink(tmp_path / "disk2", link)

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_checkpoint, "save_safetensors", full_disk)
    with pytest.raises(OSError):
        new.save_pretrained(str(link))   # a save that fails part way leaves the model there as it was
    monkeypatch.undo()
    assert torch.equal(from_pretrained(str(link)).lm_head_weight, old.lm_head_weight)
    new.save_pretrained(str(link))
    assert os.listdir(tmp_path / "run") == ["exported"] and os.path.islink(link)
    assert sorted(os.listdir(tmp_path)) == ["disk2", "run"]   # no hidden folder beside the link's target either
    assert torch.equal(from_pretrained(str(tmp_path / "disk2")).lm_head_weight, new.lm_head_weight)


def _checkpoint_linked_from_another_disk(tmp_path, state=None):
    """checkpoint-3 saved in disk2 and linked into the run folder, as a user short of space moves one."""
    model = _model(build_char_tokenizer())
    run, disk2 = tmp_path / "run", tmp_path / "disk2"
    ckpt.save_checkpoint(str(disk2), 3, model=model, state=state)
    run.mkdir()
    os.symlink(disk2 / "checkpoint-3", run / "checkpoint-3")
    return model, run, disk2


def test_a_symlinked_checkpoint_or_run_file_is_written_where_the_link_leads(tmp_path):
    # save_checkpoint over a checkpoint-<step> moved to another disk and linked back, and replacing() (metrics
    # truncated on resume, summary.json, a sample's output) over a linked file, replaced the link
    from r1fast.trainer.metrics import replacing

    model, run, disk2 = _checkpoint_linked_from_another_disk(tmp_path)
    (disk2 / "metrics.jsonl").write_text("old\n")
    os.symlink(disk2 / "metrics.jsonl", run / "metrics.jsonl")
    assert ckpt.save_checkpoint(str(run), 3, model=model, state={"again": 1}) == str(run / "checkpoint-3")
    with replacing(str(run / "metrics.jsonl")) as f:
        f.write("new\n")
    assert sorted(os.listdir(run)) == ["checkpoint-3", "metrics.jsonl"]
    assert os.path.islink(run / "checkpoint-3") and os.path.islink(run / "metrics.jsonl")
    assert sorted(os.listdir(disk2)) == ["checkpoint-3", "metrics.jsonl"]
    assert json.loads((disk2 / "checkpoint-3" / ckpt.STATE_FILE).read_text())["again"] == 1
    assert (disk2 / "metrics.jsonl").read_text() == "new\n"


def test_a_replaced_file_that_cannot_be_made_is_named_not_its_temporary_file(tmp_path):
    # r1fast plot --out nodir/x.png said "No such file or directory: 'nodir/.x.png.tmp-4504-b9i8pak6'"
    from r1fast.trainer.metrics import replacing

    out = str(tmp_path / "nodir" / "x.png")
    with pytest.raises(FileNotFoundError, match=rf"No such file or directory: {re.escape(repr(out))}$"):
        with replacing(out, binary=True) as f:
            f.write(b"png")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_device_or_pipe_is_refused_not_replaced_by_a_regular_file(tmp_path):
    # replacing() renamed its temporary file over a named pipe (and, run as root, over /dev/null: `r1fast sample
    # output_file=/dev/null`, `r1fast plot --out /dev/null`), which became a regular file
    from r1fast.trainer.metrics import replacing

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    os.symlink(pipe, tmp_path / "link")
    for path in (pipe, tmp_path / "link"):
        named = re.escape(repr(str(path)))
        with pytest.raises(OSError, match=rf"not a regular file \(a device, pipe or socket\).*{named}$"):
            with replacing(str(path)) as f:
                f.write("rows\n")
    assert stat.S_ISFIFO(os.stat(pipe).st_mode) and sorted(os.listdir(tmp_path)) == ["link", "pipe"]


def test_a_symlinked_checkpoint_replaced_by_a_save_killed_between_its_renames_is_put_back(tmp_path, monkeypatch):
    # the old checkpoint-3 renamed aside beside the link's target, the run stopped before the new one was renamed in:
    # the link dangled, remove_save_leftovers looked for checkpoint-3.old-<pid> in the run folder only, and a bare
    # --resume found no checkpoint (the run began again from its first step)
    model, run, disk2 = _checkpoint_linked_from_another_disk(tmp_path, state={"saved": "first"})
    real_rename = os.rename

    def killed_after_the_first(src, dst):
        real_rename(src, dst)
        if str(dst).endswith(f"checkpoint-3.old-{os.getpid()}"):
            raise SystemExit("killed")

    monkeypatch.setattr(os, "rename", killed_after_the_first)
    with pytest.raises(SystemExit):
        ckpt.save_checkpoint(str(run), 3, model=model, state={"saved": "again"})
    monkeypatch.setattr(os, "rename", real_rename)
    assert ckpt.latest_checkpoint(str(run)) is None   # the link dangles
    ckpt.remove_save_leftovers(str(run))
    assert ckpt.latest_checkpoint(str(run)) == str(run / "checkpoint-3") and os.path.islink(run / "checkpoint-3")
    assert json.loads((disk2 / "checkpoint-3" / ckpt.STATE_FILE).read_text())["saved"] == "first"


def test_a_symlinked_checkpoint_an_earlier_r1fast_set_aside_visibly_is_named_not_renamed_nor_deleted(tmp_path):
    # before its hidden name, a save through the link set the replaced checkpoint aside as <target>.old-<pid>: where
    # the link dangles it is named, to rename back by hand (renamed in, a user's checkpoint-3.old-2 was pruned later);
    # where the target is there, such a name is left alone (it may be the user's)
    model, run, disk2 = _checkpoint_linked_from_another_disk(tmp_path)
    os.rename(disk2 / "checkpoint-3", disk2 / "checkpoint-3.old-77")   # killed between its renames: the link dangles
    with pytest.warns(UserWarning, match=r"checkpoint-3\.old-77 may be checkpoint-3 as a save of an earlier r1fast "
                                         r"set it aside before it was killed; to resume from it, rename it to "):
        ckpt.remove_save_leftovers(str(run))
    assert sorted(os.listdir(disk2)) == ["checkpoint-3.old-77"]
    os.rename(disk2 / "checkpoint-3.old-77", disk2 / "checkpoint-3")
    assert ckpt.latest_checkpoint(str(run)) == str(run / "checkpoint-3")
    shutil.copytree(disk2 / "checkpoint-3", disk2 / "checkpoint-3.old-78")
    ckpt.remove_save_leftovers(str(run))
    assert sorted(os.listdir(disk2)) == ["checkpoint-3", "checkpoint-3.old-78"]
    # a dated copy (a number past any process id) is never put back, the link dangling or not
    shutil.rmtree(disk2 / "checkpoint-3")
    os.rename(disk2 / "checkpoint-3.old-78", disk2 / "checkpoint-3.old-20261129")
    ckpt.remove_save_leftovers(str(run))
    assert sorted(os.listdir(disk2)) == ["checkpoint-3.old-20261129"]


def test_failed_write_leaves_no_checkpoint(tmp_path, monkeypatch):
    tok = build_char_tokenizer()
    model = _model(tok)

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_safetensors", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(str(tmp_path), 1, model=model)
    assert os.listdir(tmp_path) == []
    assert ckpt.latest_checkpoint(str(tmp_path)) is None
    with pytest.raises(ValueError, match="no checkpoint"):
        ckpt.resolve_resume(True, str(tmp_path))
    with pytest.raises(ValueError, match="not a checkpoint"):
        ckpt.load_checkpoint(str(tmp_path), model=model)


class _FullDisk:
    """A file whose writes fail part way as on a full disk: OSError(ENOSPC) without a file name, as
    write() raises."""

    def __init__(self, *a, **k):
        import builtins

        self._f = builtins.open(*a, **k)

    def write(self, s):
        self._f.write(s[:3])
        self._f.flush()
        raise OSError(28, "No space left on device")

    writelines = write

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self._f.close()
        return False


def test_a_full_disk_is_an_error_naming_the_file(tmp_path, monkeypatch):
    # safetensors raised its own SafetensorError (a traceback from the CLI), and a JSON or JSONL write
    # "[Errno 28] No space left on device" naming no file
    from safetensors import SafetensorError

    from r1fast.trainer import metrics, sampling
    from r1fast.trainer.metrics import MetricsLogger

    model = _model(build_char_tokenizer())

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "save_safetensors", full)
    with pytest.raises(OSError, match=rf"^cannot write checkpoint {tmp_path}/checkpoint-1: .*No space left"):
        ckpt.save_checkpoint(str(tmp_path), 1, model=model)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()

    log = MetricsLogger(str(tmp_path))
    monkeypatch.setattr(metrics, "open", _FullDisk, raising=False)
    with pytest.raises(OSError, match=r"No space left on device: '.*metrics\.jsonl'"):
        log.log(1, "grpo", {"loss": 1.0})
    with pytest.raises(OSError, match=r"No space left on device: '.*completions\.jsonl'"):
        log.log_completions(1, "grpo", [{"completion": "x"}])

    monkeypatch.undo()
    out = tmp_path / "kept.jsonl"
    sampling.write_jsonl([{"prompt": "a"}], str(out))
    monkeypatch.setattr(metrics, "open", _FullDisk, raising=False)   # write_jsonl writes through metrics.replacing
    with pytest.raises(OSError, match=r"No space left on device: '.*kept\.jsonl'"):
        sampling.write_jsonl([{"prompt": "b"}], str(out))
    assert out.read_text() == '{"prompt": "a"}\n' and not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


_KILLED_WRITE = """
import os, signal, sys
from r1fast.trainer.metrics import replacing

with replacing(sys.argv[1]) as f:
    f.write("half")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_replaced_file_is_written_under_a_name_of_its_own_and_a_killed_writers_is_removed(tmp_path):
    # replacing() wrote "<path>.tmp": a user's kept.jsonl.tmp was overwritten and renamed away, and the .tmp a
    # SIGKILL left beside `r1fast sample`'s output stayed there for good
    import subprocess
    import sys

    from r1fast.trainer import sampling
    from r1fast.trainer.metrics import temp_pattern

    out = tmp_path / "kept.jsonl"
    p = subprocess.run([sys.executable, "-c", _KILLED_WRITE, str(out)], capture_output=True, text=True)
    assert p.returncode == -9, p.stderr
    left = [n.name for n in tmp_path.iterdir()]
    assert len(left) == 1 and temp_pattern("kept.jsonl").match(left[0]), left
    theirs = {"kept.jsonl.tmp": "mine", f".kept.jsonl.tmp-{os.getppid()}-abcd1234": "a live writer's",
              ".kept.jsonl.tmp-1-not_ours": "mine", ".other.jsonl.tmp-1-abcd1234": "another file's",
              ".kept.jsonl.tmp-99999999999-abcd1234": "past any pid (os.kill raised OverflowError)"}
    for name, text in theirs.items():
        (tmp_path / name).write_text(text)
    (tmp_path / f".kept.jsonl.tmp-{os.getpid()}-abcd1234").write_text("this process's, not being written")
    sampling.write_jsonl([{"prompt": "a"}], str(out))
    assert out.read_text() == '{"prompt": "a"}\n'
    assert sorted(n.name for n in tmp_path.iterdir()) == sorted([*theirs, "kept.jsonl"])
    assert all((tmp_path / name).read_text() == text for name, text in theirs.items())


def test_pruning_keeps_the_checkpoint_just_written(tmp_path):
    # save_total_limit kept the highest step numbers: a run resumed from an older checkpoint beside
    # newer ones deleted the checkpoint it had just written.
    model = _model(build_char_tokenizer())
    ckpt.save_checkpoint(str(tmp_path), 6, model=model, keep=1)
    path = ckpt.save_checkpoint(str(tmp_path), 3, model=model, keep=1)
    assert ckpt.list_checkpoints(str(tmp_path)) == [(3, path)]
    for step in (4, 5):
        ckpt.save_checkpoint(str(tmp_path), step, model=model, keep=None)   # None: keep every one
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [3, 4, 5]


@pytest.mark.parametrize("delete", ["prune", "clear_run"])
def test_a_checkpoint_deleted_part_way_no_longer_looks_complete(tmp_path, monkeypatch, delete):
    # pruning (and overwrite_output_dir's clear_run) rmtree'd checkpoint-N in place: killed after it deleted
    # optimizer.safetensors, checkpoint-N kept its trainer_state.json and was listed as a complete checkpoint
    model = _model(build_char_tokenizer())
    opt = torch.optim.AdamW(model.parameters())
    ckpt.save_checkpoint(str(tmp_path), 1, model=model, optimizer=opt, keep=None)
    real_remove = os.unlink

    def killed_after_the_first_file(path, *a, **k):
        real_remove(path, *a, **k)
        raise KeyboardInterrupt   # stands for a SIGKILL: nothing after it runs

    monkeypatch.setattr(os, "unlink", killed_after_the_first_file)
    with pytest.raises(KeyboardInterrupt):
        if delete == "prune":
            ckpt.save_checkpoint(str(tmp_path), 2, model=model, optimizer=opt, keep=1)
        else:
            ckpt.clear_run(str(tmp_path))
    monkeypatch.undo()
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == ([2] if delete == "prune" else [])
    ckpt.remove_save_leftovers(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == (["checkpoint-2"] if delete == "prune" else [])


@pytest.mark.parametrize("delete", ["prune", "clear_run"])
def test_a_pruned_symlinked_checkpoint_leaves_no_hidden_link(tmp_path, delete):
    # a checkpoint-N moved to another disk and linked back: pruning (and clear_run) renamed the link to
    # .tmp-checkpoint-N-deleting-<pid>, whose rmtree failed on a link without a word, so it stayed for good
    model = _model(build_char_tokenizer())
    run, elsewhere = tmp_path / "run", tmp_path / "disk2"
    ckpt.save_checkpoint(str(elsewhere), 1, model=model, keep=None)
    run.mkdir()
    os.symlink(elsewhere / "checkpoint-1", run / "checkpoint-1")
    if delete == "prune":
        ckpt.save_checkpoint(str(run), 2, model=model, keep=1)
    else:
        ckpt.clear_run(str(run))
    ckpt.remove_save_leftovers(str(run))
    assert sorted(os.listdir(run)) == (["checkpoint-2"] if delete == "prune" else [])
    # the link alone goes: what it leads to may be another run's
    assert ckpt.list_checkpoints(str(elsewhere)) == [(1, str(elsewhere / "checkpoint-1"))]


def test_char_tokenizer_roundtrip_and_save(tmp_path):
    from r1fast.models import load_tokenizer

    tok = build_char_tokenizer()
    ids = encode_prompt(tok, "12+3=")
    assert tok.decode(ids, skip_special_tokens=False) == "<bos><|user|>12+3=<|assistant|>"
    comp = "<think>12+3=15</think><answer>15</answer>"
    cids = encode_completion(tok, comp)
    assert cids[-1] == tok.eos_token_id and decode_completion(tok, cids) == comp
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    assert encode_prompt(again, "12+3=") == ids and encode_completion(again, comp) == cids
    # padded to a real model's vocabulary (benchmarks): text encodes as before, any id decodes
    wide = build_char_tokenizer(vocab_size=1000)
    assert len(wide) == 1000 and encode_prompt(wide, "12+3=") == ids and encode_completion(wide, comp) == cids
    assert wide.decode([999, 998]) == "<v999><v998>"
    with pytest.raises(ValueError, match="vocab_size must be >= "):
        build_char_tokenizer(vocab_size=10)


def test_a_tokenizer_loaded_from_a_folder_saves_the_config_it_was_loaded_from(tmp_path):
    # transformers keeps how it loaded a tokenizer (is_local, local_files_only) among its options: a pipeline stage
    # resumed after Ctrl-C, its tokenizer loaded from the previous stage's checkpoint, wrote them into its
    # checkpoints' tokenizer_config.json, which the uninterrupted run's (its tokenizer in memory) lacked
    from r1fast.models import load_tokenizer

    build_char_tokenizer().save_pretrained(tmp_path / "first")
    load_tokenizer(str(tmp_path / "first")).save_pretrained(tmp_path / "again")
    written = [json.loads((tmp_path / name / "tokenizer_config.json").read_text()) for name in ("first", "again")]
    assert written[1] == written[0] and "bos_token" in written[0]


def test_arithmetic_task_is_consistent_and_seeded():
    rows = ArithmeticTask(teacher_noise=0.0).rows(50, seed=1)
    assert rows == ArithmeticTask().rows(50, seed=1)
    for r in rows:
        expr = r["prompt"].rstrip("=")
        assert str(eval(expr)) == r["answer"]   # noqa: S307 (digits and +/- only)
        assert r["completion"].endswith(f"<answer>{r['answer']}</answer>")
    noisy = ArithmeticTask(answer_noise=0.5).rows(200, seed=2)
    wrong = sum(r["completion"].split("<answer>")[1].split("<")[0] != r["answer"] for r in noisy)
    assert 60 < wrong < 140
    with pytest.raises(ValueError, match="teacher_noise"):
        ArithmeticTask(teacher_noise=1.5)


def test_load_rows_from_files(tmp_path):
    datasets = pytest.importorskip("datasets")

    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_rows(str(jl)) == rows
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    assert load_rows(str(tmp_path / "d.parquet")) == rows
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load_rows(str(tmp_path / "saved")) == rows
    assert len(load_rows("builtin:arithmetic?max_terms=5", n_builtin=7)) == 7
    with pytest.raises(ValueError, match=r"does not exist \([^;]*\)$"):
        load_rows(str(tmp_path / "missing.jsonl"))
    for local in (str(tmp_path / "missing_folder"), "./missing_folder"):   # a path, not a Hub name: no Hub hint
        with pytest.raises(ValueError, match=r"does not exist \([^;]*\)$"):
            load_rows(local)
    with pytest.raises(ValueError, match=r"'openai/gsm8k' does not exist .*\.csv.*reads local data only.*"
                                         r"load_dataset\('openai/gsm8k'\)\.save_to_disk\('my_data'\)"):
        load_rows("openai/gsm8k")
    with pytest.raises(ValueError, match="lacks column"):
        load_rows(str(jl), required_columns=("completion",))
    with pytest.raises(ValueError, match="unknown built-in task"):
        load_rows("builtin:chess")
    # a misspelt parameter read as the constructor's "unexpected keyword argument 'max_term'"
    with pytest.raises(ValueError, match=r"'builtin:arithmetic\?max_term=5': unknown parameter 'max_term'; did you "
                                         r"mean max_terms\? its parameters: min_terms, max_terms, max_operand, "
                                         r"teacher_noise, answer_noise$"):
        load_rows("builtin:arithmetic?max_term=5")
    with pytest.raises(ValueError, match="unknown file type"):
        (tmp_path / "d.txt").write_text("x")
        load_rows(str(tmp_path / "d.txt"))


def test_chat_messages_and_system_prompt():
    tok = build_char_tokenizer()
    ids = encode_prompt(tok, [{"role": "user", "content": "3+4="}], system_prompt="Be brief.")
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>Be brief.\n<|user|>3+4=<|assistant|>"
    with pytest.raises(ValueError, match="prompt must be"):
        encode_prompt(tok, 42)


def test_bad_jsonl_lines_and_empty_files_are_named(tmp_path):
    # datasets raised a bare DatasetGenerationError for a bad line and StopIteration for an empty file.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="\n')
    with pytest.raises(ValueError, match="bad.jsonl' line 2: not valid JSON"):
        load_rows(str(bad))
    (tmp_path / "list.jsonl").write_text('["1+1="]\n')
    with pytest.raises(ValueError, match="line 1: expected a JSON object"):
        load_rows(str(tmp_path / "list.jsonl"))
    for name in ("empty.jsonl", "empty.json"):
        (tmp_path / name).write_text("")
        with pytest.raises(ValueError, match=f"{name}'"):
            load_rows(str(tmp_path / name))


def test_a_row_without_a_required_value_is_named():
    # A JSONL row lacking "completion" became None, and SFT trained on the text "None".
    from r1fast.data import check_columns

    rows = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": None}]
    with pytest.raises(ValueError, match=r"row 1 has no value for column\(s\) \['completion'\]"):
        check_columns(rows, ("prompt", "completion"), "dataset 'd.jsonl'")


def test_jsonl_needs_no_datasets_package_and_other_files_say_they_do(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    (tmp_path / "d.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    assert load_rows(str(tmp_path / "d.jsonl")) == [{"prompt": "1+1=", "answer": "2"}]
    (tmp_path / "d.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match=r"reading \.parquet needs the `datasets` package"):
        load_rows(str(tmp_path / "d.parquet"))


def test_jsonl_rows_get_every_column(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": "2+2=", "extra": 1}\n')
    assert load_rows(str(f)) == [{"prompt": "1+1=", "answer": "2", "extra": None},
                                 {"prompt": "2+2=", "answer": None, "extra": 1}]
    with pytest.raises(ValueError, match=r"row 1 \('.*d.jsonl' line 3\) has no value for column\(s\) \['answer'\]"):
        load_rows(str(f), required_columns=("prompt", "answer"))


def test_a_bad_row_of_a_file_is_named_by_its_file_and_line(tmp_path):
    # "train dataset: row 2 has no value for column(s) ['prompt']" named neither the file nor its line, and a JSONL
    # file's blank lines put row 2 on line 6 here
    from r1fast.data.loading import check_columns, check_prompts, split_conversations

    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "1+1="}\n\n\n{"prompt": [{"role": "User", "content": "2+2="}]}\n\n'
                 '{"question": "2+2="}\n', newline="\r\n")
    rows = load_rows(str(f))
    with pytest.raises(ValueError, match=rf"train: row 2 \('{re.escape(str(f))}' line 6\) has no value for column"):
        check_columns(rows, ("prompt",), "train")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['answer'\]"):
        check_columns(rows, ("answer",), "train")
    with pytest.raises(ValueError, match=rf"train \('{re.escape(str(f))}'\) lacks column"):
        check_columns(rows, ("answer",), "train")
    with pytest.raises(ValueError, match=r"train: row 1 \('.*d.jsonl' line 4\): a prompt message needs a role"):
        check_prompts(rows[:2], "prompt", build_char_tokenizer(), where="train")   # a slice keeps the lines
    (tmp_path / "m.jsonl").write_text('{"messages": [{"role": "user", "content": "1"}, {"role": "assistant", '
                                      '"content": "2"}]}\n\n{"messages": []}\n')
    with pytest.raises(ValueError, match=r"SFT: row 1 \('.*m.jsonl' line 3\): 'messages' must be a list"):
        split_conversations(load_rows(str(tmp_path / "m.jsonl")), "prompt", "completion", "SFT")
    # rows given in Python have no file to name
    with pytest.raises(ValueError, match=r"train: row 1 has no value for column"):
        check_columns([{"prompt": "a"}, {"prompt": None}], ("prompt",), "train")


def test_rows_of_a_file_changed_in_place_name_no_wrong_line(tmp_path):
    # load_rows' rows appended to raised IndexError naming the bad row, and shuffled or reversed they named
    # another row's line; copied or pickled they keep their lines
    import copy
    import pickle

    from r1fast.data.loading import check_columns

    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": null}\n\n{"prompt": "a"}\n{"prompt": "b"}\n')
    rows = load_rows(str(f))
    for kept in (copy.copy(rows), copy.deepcopy(rows), pickle.loads(pickle.dumps(rows))):
        with pytest.raises(ValueError, match=r"row 0 \('.*d.jsonl' line 1\)"):
            check_columns(kept, ("prompt",))
    rows.reverse()
    with pytest.raises(ValueError, match=r"dataset: row 2 has no value"):
        check_columns(rows, ("prompt",))
    rows = load_rows(str(f))[1:]
    rows.append({"prompt": None})
    with pytest.raises(ValueError, match=r"dataset: row 2 has no value"):
        check_columns(rows, ("prompt",))


def test_a_csv_whose_rows_have_a_field_more_than_its_header_is_refused(tmp_path):
    # read with its first column as row names: prompt 'x=2' (the answer), answer None, the question in
    # '__index_level_0__', without a word
    pytest.importorskip("datasets")
    f = tmp_path / "d.csv"
    f.write_text('prompt,answer\n"What is 1+1?",x=2,\nWhat is 2+2?,x=4,\n')
    with pytest.raises(ValueError, match=r"d.csv' line 2: more fields than the 2 of its header \['prompt', 'answer'\]"):
        load_rows(str(f))
    f.write_text('prompt,answer\n"What is 1,000+1?",1001\n')
    assert load_rows(str(f)) == [{"prompt": "What is 1,000+1?", "answer": "1001"}]   # a cell is its text
    # a column of that name the file has (a pandas index written out) is the file's own, not a shift: read
    f.write_text('__index_level_0__,prompt,answer\n7,"What is 1,000+1?",1001\n')
    assert load_rows(str(f)) == [{"__index_level_0__": "7", "prompt": "What is 1,000+1?", "answer": "1001"}]


def test_builtin_task_parameter_errors_name_the_parameter():
    assert len(load_rows("builtin:arithmetic?answer_noise=1e-1", n_builtin=3)) == 3   # was int("1e-1")
    with pytest.raises(ValueError, match="parameter 'max_terms' must be a number; got 'abc'"):
        load_rows("builtin:arithmetic?max_terms=abc")


def test_char_tokenizer_keeps_blank_lines_and_names_unknown_characters():
    # The pre-tokenizer split on ".", which skips "\n" in Oniguruma: "\n\n" stayed one piece and
    # became a single <unk>, so a blank line in a prompt or a re-encoded sample was lost.
    import warnings

    from r1fast.data.tokenizer import CHARACTERS

    tok = build_char_tokenizer()
    text = "a\n\nb\n\n\n" + CHARACTERS + CHARACTERS[::-1]
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    # characters outside the vocabulary become <unk>: a warning names them
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = encode_prompt(tok, "7\u00d72\t=")
    assert ids.count(tok.unk_token_id) == 2
    assert any("'\\t', '\u00d7'" in str(w.message) and "<unk>" in str(w.message) for w in caught)


def test_arithmetic_task_integer_parameters_are_checked():
    # max_terms=4.5 passed the checks and failed later in random.randrange with an unnamed message.
    with pytest.raises(ValueError, match="max_terms must be a whole number; got 4.5"):
        load_rows("builtin:arithmetic?max_terms=4.5", n_builtin=3)
    with pytest.raises(ValueError, match="max_operand must be a whole number"):
        ArithmeticTask(max_operand=9.5)
    assert ArithmeticTask(max_terms=1e1).max_terms == 10   # "1e1" in a query string reads as a float
    rows = load_rows("builtin:arithmetic?max_terms=1e1&min_terms=10", n_builtin=5)
    assert all(r["prompt"].count("+") + r["prompt"].count("-") == 9 for r in rows)


def test_optimizer_state_of_another_parameter_layout_is_a_clear_error():
    """E.g. a training checkpoint from before the decoder fused q/k/v and gate/up: more parameters."""
    from r1fast.trainer.checkpoints import load_optimizer_state, optimizer_state

    old = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(3)]
    opt = torch.optim.AdamW(old)
    sum(p.sum() for p in old).backward()
    opt.step()
    tensors, meta = optimizer_state(opt)
    new = torch.optim.AdamW([torch.nn.Parameter(torch.randn(12, 3)), torch.nn.Parameter(torch.randn(4, 3))])
    with pytest.raises(ValueError, match="3 parameters but the model has 2.*fused q/k/v"):
        load_optimizer_state(new, tensors, meta[0])


def _stepped_checkpoint(tmp_path, opt_cls=torch.optim.AdamW, **opt_kw):
    """checkpoint-3 of a model every parameter of which has optimizer state; a loader for it."""
    tok = build_char_tokenizer()
    model = _model(tok)
    opt = opt_cls(list(model.parameters()), lr=1e-3, **opt_kw)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = ckpt.save_checkpoint(str(tmp_path), 3, model=model, optimizer=opt, scheduler=sched,
                                state={"data": {"epoch": 0, "index": 1}})

    def load(**kw):
        m = _model(tok)
        o = opt_cls(list(m.parameters()), lr=1e-3, **opt_kw)
        ckpt.load_checkpoint(path, model=m, optimizer=o,
                             scheduler=torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0), **kw)
        return o
    return path, load


def _edit_tensors(path, name, edit):
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, name)
    save_file(edit(load_file(file)), file)


@pytest.mark.parametrize("edit,match", [
    (lambda t: {}, r"optimizer.safetensors lacks '0.exp_avg'.*and \d+ more"),
    (lambda t: {k: v for k, v in t.items() if not k.startswith("1.")}, r"lacks '1.exp_avg', '1.exp_avg_sq', '1.step'"),
    (lambda t: {**t, "999.exp_avg": torch.zeros(3)}, r"'999.exp_avg' is not '<parameter index>.<name>'"),
    (lambda t: {**t, "nodot": torch.zeros(3)}, r"'nodot' is not '<parameter index>.<name>'"),
    (lambda t: {**t, "0.exp_avg": t["0.exp_avg"][:, :-1].contiguous()},
     r"optimizer.safetensors: '0.exp_avg' has shape \(\d+, 15\), parameter 0 is \(\d+, 16\)"),
    (lambda t: {**t, "1.exp_avg_sq": torch.zeros(1)}, r"'1.exp_avg_sq' has shape \(1,\), parameter 1 is"),
    (lambda t: {**t, "1.exp_avg": t["1.exp_avg"].long()}, r"'1.exp_avg' is torch.int64, not a floating-point"),
    (lambda t: {**t, "0.step": t["0.step"].reshape(1)}, r"'0.step' has shape \(1,\), not a single count"),
])
def test_optimizer_state_that_is_incomplete_or_misshapen_is_an_error(tmp_path, edit, match):
    # torch's load_state_dict took all of these: an empty or partial state silently restarted Adam's
    # moments and step counts, a stray entry was ignored, a (1,)-shaped moment broadcast
    path, load = _stepped_checkpoint(tmp_path)
    _edit_tensors(path, "optimizer.safetensors", edit)
    with pytest.raises(ValueError, match=match) as e:
        load()
    assert str(e.value).startswith(f"checkpoint {path!r}: ")


def test_optimizer_state_is_checked_against_what_was_saved(tmp_path):
    # a never-stepped optimizer's empty state loads: the checkpoint says it had none
    tok = build_char_tokenizer()
    model = _model(tok)
    path = ckpt.save_checkpoint(str(tmp_path), 0, model=model, optimizer=torch.optim.AdamW(model.parameters()))
    fresh = torch.optim.AdamW(_model(tok).parameters())
    ckpt.load_checkpoint(path, model=_model(tok), optimizer=fresh)
    assert not fresh.state
    # an entry whose keys are complete for AdamW but which the checkpoint did not save
    path, load = _stepped_checkpoint(tmp_path / "b")
    state = json.loads(open(os.path.join(path, "trainer_state.json")).read())
    del state["optimizer"]["state_keys"]["2"]
    open(os.path.join(path, "trainer_state.json"), "w").write(json.dumps(state))
    with pytest.raises(ValueError, match=r"optimizer.safetensors holds '2.exp_avg'.*state_keys does not list"):
        load()
    # an empty list of what was saved, against a file that holds state
    state["optimizer"]["state_keys"] = {}
    (tmp_path / "b" / "checkpoint-3" / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"optimizer.safetensors holds '0.exp_avg'.*state_keys does not list"):
        load()


def test_master_weights_in_the_optimizer_state_are_checked(tmp_path):
    from r1fast.trainer.master_weights import MasterWeightAdamW

    tok = build_char_tokenizer()
    model = _model(tok).to(torch.bfloat16)
    opt = MasterWeightAdamW(list(model.parameters()), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    path = ckpt.save_checkpoint(str(tmp_path), 1, model=model, optimizer=opt)
    _edit_tensors(path, "optimizer.safetensors", lambda t: {**t, "0.master": t["0.master"].bfloat16()})
    m2 = _model(tok).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"'0.master' is torch.bfloat16, an fp32 master copy is torch.float32"):
        ckpt.load_checkpoint(path, model=m2, optimizer=MasterWeightAdamW(list(m2.parameters()), lr=1e-3))


def _set(keys, value):
    def edit(state):
        o = state
        for k in keys[:-1]:
            o = o[k]
        if value is _DEL:
            del o[keys[-1]]
        else:
            o[keys[-1]] = value
        return state
    return edit


_DEL = object()


@pytest.mark.parametrize("edit,match", [
    (_set(["global_step"], -5), r"global_step is -5, not a step count"),
    (_set(["global_step"], 10 ** 9), r"global_step is 1000000000, but the checkpoint was saved as checkpoint-3"),
    (_set(["optimizer", "param_groups"], "x"), r"optimizer.param_groups is 'x', not a list"),
    (_set(["optimizer", "param_groups"], _DEL), r"optimizer.param_groups is None"),
    (_set(["optimizer", "param_groups", 0, "betas"], [0.9]), r"param_groups\[0\].betas is \[0.9\], where this run has"),
    (_set(["scheduler", "last_epoch"], "abc"), r"scheduler.last_epoch is 'abc'"),
    (_set(["scheduler", "base_lrs"], [1.0, 2.0, 3.0]), r"scheduler.base_lrs is \[1.0, 2.0, 3.0\], where this run has"),
    (_set(["rng", "python"], [3, [1, 2], None]), r"rng.python is not a Python random state"),
    (_set(["rng", "numpy"], ["MT19937", [1, 2], 0, 0, 0.0]), r"rng.numpy is not a numpy random state"),
    (_set(["rng"], "x"), r"rng is 'x', not an object"),
    (_set(["optimizer", "param_groups", 0, "lr"], _DEL), r"optimizer.param_groups\[0\] lacks 'lr'"),
    (_set(["optimizer", "param_groups", 0, "lr"], True), r"param_groups\[0\].lr is True, where this run has 0.001"),
    (_set(["optimizer", "param_groups", 0, "maximize"], "false"),
     r"param_groups\[0\].maximize is 'false', where this run has False"),
    (_set(["optimizer", "param_groups", 0, "params", 1], 0), r"optimizer.param_groups name a parameter index twice"),
    (_set(["optimizer", "scalars"], {"0.step": True}), r"optimizer.scalars: '0.step' is True, not a number"),
    (_set(["optimizer", "state_keys"], []), r"optimizer.state_keys is \[\], not an object of name lists"),
    (_set(["scheduler", "last_epoch"], -3), r"scheduler.last_epoch is -3, not a whole number >= 0"),
    # a newer r1fast's checkpoint layout was read as this one's
    (_set(["format"], 2), r" has format 2, written by a newer r1fast than this one \(which reads up to 1\): resume "
                          r"with that r1fast, or start a new run from its model weights"),
    (_set(["format"], "1"), r": format is '1', not a format r1fast wrote"),
])
def test_malformed_trainer_state_is_an_error_naming_the_file(tmp_path, edit, match):
    # these raised KeyError/TypeError/ValueError from deep in torch, random or numpy, or (global_step
    # -5 or 10**9) resumed and ran the wrong number of steps
    path, load = _stepped_checkpoint(tmp_path)
    file = os.path.join(path, "trainer_state.json")
    state = edit(json.loads(open(file).read()))
    open(file, "w").write(json.dumps(state))
    rng_before = random.getstate()
    with pytest.raises(ValueError, match=f"^checkpoint {re.escape(repr(path))}: trainer_state.json.*{match}"):
        load()
    assert random.getstate() == rng_before   # checked before anything was applied


@pytest.mark.parametrize("edit,match", [
    (lambda t: {"other": t["torch_cpu"]}, r"rng.safetensors lacks 'torch_cpu'"),
    (lambda t: {"torch_cpu": t["torch_cpu"][:100].contiguous()}, r"rng.safetensors: 'torch_cpu' is not a torch generator"),
])
def test_damaged_rng_file_is_an_error_naming_it(tmp_path, edit, match):
    path, load = _stepped_checkpoint(tmp_path)
    _edit_tensors(path, "rng.safetensors", edit)
    with pytest.raises(ValueError, match=match):
        load()


def test_a_trainer_state_without_a_format_is_read_as_format_1(tmp_path):
    # checkpoints of r1fast before the format number resume as they did
    path, load = _stepped_checkpoint(tmp_path)
    file = os.path.join(path, "trainer_state.json")
    state = json.loads(open(file).read())
    assert state.pop("format") == 1
    open(file, "w").write(json.dumps(state))
    load()   # no error


def test_trainer_state_that_is_not_utf8_is_a_clear_error(tmp_path):
    path, load = _stepped_checkpoint(tmp_path)
    open(os.path.join(path, "trainer_state.json"), "wb").write(b'{"global_step": 3, "x": "\xff"}')
    with pytest.raises(ValueError, match="trainer_state.json is not valid JSON"):
        load()


def test_an_error_applying_the_state_names_the_checkpoint_and_keeps_the_original(tmp_path, monkeypatch):
    path, load = _stepped_checkpoint(tmp_path)
    boom = RuntimeError("boom")

    def fail(self, sd):
        raise boom

    monkeypatch.setattr(torch.optim.AdamW, "load_state_dict", fail)
    with pytest.raises(ValueError, match=r"checkpoint .*: cannot load the optimizer state \(optimizer.safetensors"
                                         r".*RuntimeError: boom") as e:
        load()
    assert e.value.__cause__ is boom


def test_a_check_of_the_callers_state_runs_before_anything_is_loaded(tmp_path):
    from r1fast.trainer.common import DataCursor

    path, load = _stepped_checkpoint(tmp_path)
    cursor = DataCursor(1, seed=0)   # the checkpoint's data index 1 is past a 1-row dataset
    with pytest.raises(ValueError, match=r"trainer_state.json: data is \{'epoch': 0, 'index': 1\}, not a position "
                                         r"in the training dataset's 1 rows"):
        load(check=lambda s: cursor.check_state(s["data"]))
    for bad in ({"epoch": 0, "index": -1}, {"epoch": 0, "index": "1"}, {"epoch": -1, "index": 0}, None):
        with pytest.raises(ValueError, match="not a position"):
            DataCursor(5, seed=0).load_state(bad)


_KILLED_SAVE = """
import os, signal, sys
import safetensors.torch
from r1fast.data import build_char_tokenizer
from r1fast.models import CausalLM, ModelConfig
from r1fast.trainer import checkpoints as ckpt

tok = build_char_tokenizer()
model = CausalLM(ModelConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=32))
safetensors.torch.save_file = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)   # mid save_pretrained
ckpt.save_checkpoint(sys.argv[1], 3, model=model)
"""


def _killed_save(run):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(run)], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == -9, p.stderr


def test_folders_of_a_killed_save_are_removed_by_clear_run(tmp_path):
    # save_pretrained writes beside save_checkpoint's ".tmp-checkpoint-3-*" folder, so a SIGKILL mid-save
    # also left "..tmp-checkpoint-3-*.tmp-*", which clear_run (matching ".tmp-checkpoint-") kept
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("the user's")
    _killed_save(run)
    left = sorted(os.listdir(run))
    assert any(n.startswith("..tmp-checkpoint-3-") for n in left) and any(n.startswith(".tmp-checkpoint-3-")
                                                                         for n in left), left
    ckpt.clear_run(str(run))
    assert os.listdir(run) == ["notes.txt"]


def test_grpo_resume_checks_its_own_state_and_removes_a_killed_saves_folders(tmp_path):
    from test_trainer import make

    make(tmp_path, max_steps=2, save_steps=2).train()
    ck = tmp_path / "run" / "checkpoint-2"
    good = (ck / "trainer_state.json").read_text()
    for edit, match in [(lambda s: s.pop("rollout_index"), "no 'rollout_index', which this trainer's checkpoints record"),
                        (lambda s: s.update(rollout_index=-1), "rollout_index is -1, not a whole number >= 0"),
                        (lambda s: s.update(nonfinite_skipped=2.5), "nonfinite_skipped is 2.5, not a whole number"),
                        (lambda s: s["data"].update(index=-1), r"data is \{'epoch': 0, 'index': -1\}, not a position"),
                        (lambda s: s.update(metrics_window=[{"reward": "1"}]), r"metrics_window is \[\{'reward': '1'\}\], not")]:
        state = json.loads(good)
        edit(state)
        (ck / "trainer_state.json").write_text(json.dumps(state))
        with pytest.raises(ValueError, match=f"checkpoint .*checkpoint-2': trainer_state.json: {match}"):
            make(tmp_path, max_steps=3).train(resume=True)
    (ck / "trainer_state.json").write_text(good)
    _killed_save(tmp_path / "run")
    assert make(tmp_path, max_steps=3).train(resume=True)["global_step"] == 3
    assert not [n for n in os.listdir(tmp_path / "run") if "tmp-checkpoint" in n]


def test_a_killed_save_through_a_symlinked_checkpoint_leaves_nothing_beside_its_target(tmp_path):
    # the save's temporary folders sat beside the link's target, out of the run folder, named as any run's save
    # of that step (".tmp-checkpoint-3-*"): remove_save_leftovers never looked there, nor could it tell them from
    # another run's. They are named after the target now, and deleted with its replaced copy (.<target>.old-<pid>);
    # a visible <target>.old-<digits> there is the user's copy (a dated one), which was deleted as the replaced one
    model, run, disk2 = _checkpoint_linked_from_another_disk(tmp_path)
    _killed_save(run)
    (disk2 / ".tmp-checkpoint-3-another").mkdir()   # a save of another run whose checkpoint lives in disk2 too
    shutil.copytree(disk2 / "checkpoint-3", disk2 / ".checkpoint-3.old-123")   # a save killed as it deleted it
    shutil.copytree(disk2 / "checkpoint-3", disk2 / "checkpoint-3.old-20261129")   # the user's copy
    assert len(os.listdir(disk2)) == 6, os.listdir(disk2)
    ckpt.remove_save_leftovers(str(run))
    assert sorted(os.listdir(disk2)) == [".tmp-checkpoint-3-another", "checkpoint-3", "checkpoint-3.old-20261129"]
    assert ckpt.latest_checkpoint(str(run)) == str(run / "checkpoint-3") and os.listdir(run) == ["checkpoint-3"]


def test_chat_messages_with_unknown_roles_or_non_text_content_are_refused():
    # the built-in template renders system/user/assistant only: "User" used to vanish, question and all
    tok = build_char_tokenizer()
    for bad in ([{"role": "User", "content": "3+4="}], [{"role": 5, "content": "3+4="}],
                [{"role": "user", "content": ["3+4="]}]):
        with pytest.raises(ValueError, match="a prompt message needs a role among .* and a string content"):
            encode_prompt(tok, bad)


def test_jsonl_that_is_not_utf8_or_nested_too_deep_is_named(tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"prompt": "1+1="}\n'.encode() + '{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    # the bad byte is on line 2 of a file read in one block: the line is found in the bytes
    with pytest.raises(ValueError, match=r"latin.jsonl' line 2: not UTF-8 text \(byte b'\\xe9'\); save it as UTF-8"):
        load_rows(str(latin))
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"prompt": ' + "[" * 100000 + "]" * 100000 + "}\n")
    with pytest.raises(ValueError, match="deep.jsonl' line 1: JSON nested too deeply"):
        load_rows(str(deep))


def test_amsgrad_state_resumes_and_a_state_without_its_key_list_is_still_checked(tmp_path):
    # AdamW(amsgrad=True) keeps max_exp_avg_sq beside the moments; a checkpoint from before state_keys
    # was recorded is checked per parameter against what AdamW keeps
    from safetensors.torch import load_file

    path, load = _stepped_checkpoint(tmp_path / "ams", amsgrad=True)
    saved = load_file(os.path.join(path, "optimizer.safetensors"))
    o = load()
    assert len(o.state) == 9
    for i, p in enumerate(o.param_groups[0]["params"]):
        assert set(o.state[p]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        assert torch.equal(o.state[p]["max_exp_avg_sq"], saved[f"{i}.max_exp_avg_sq"])
    for kw, drop, keeps in [({}, "0.exp_avg_sq", "'exp_avg', 'exp_avg_sq', 'step'"),
                            ({"amsgrad": True}, "0.max_exp_avg_sq", "'exp_avg', 'exp_avg_sq', 'max_exp_avg_sq', 'step'")]:
        path, load = _stepped_checkpoint(tmp_path / f"old{len(kw)}", **kw)
        file = tmp_path / f"old{len(kw)}" / "checkpoint-3" / "trainer_state.json"
        state = json.loads(file.read_text())
        del state["optimizer"]["state_keys"]   # the older format
        file.write_text(json.dumps(state))
        load()   # complete: loads
        _edit_tensors(path, "optimizer.safetensors", lambda t, drop=drop: {k: v for k, v in t.items() if k != drop})
        with pytest.raises(ValueError, match=rf"parameter 0 has state \[.*\]; AdamW keeps \[{keeps}\]"):
            load()


def test_optimizer_param_groups_of_other_sizes_are_an_error_before_the_weights_load(tmp_path):
    tok = build_char_tokenizer()
    model = _model(tok)
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    path = ckpt.save_checkpoint(str(tmp_path), 1, model=model, optimizer=opt)
    m2 = _model(tok)
    m2.reset_parameters(seed=1)
    before = {n: p.detach().clone() for n, p in m2.named_parameters()}
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    p2 = list(m2.parameters())
    o2 = torch.optim.AdamW([{"params": p2[:-1]}, {"params": p2[-1:]}], lr=1e-3)
    n = len(params)
    with pytest.raises(ValueError, match=rf"optimizer.param_groups hold \[1, {n - 1}\] parameters, this "
                                         rf"optimizer's \[{n - 1}, 1\]"):
        ckpt.load_checkpoint(path, model=m2, optimizer=o2)
    assert all(torch.equal(p, before[n]) for n, p in m2.named_parameters()) and not o2.state


def test_clear_run_removes_what_a_run_writes_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    pid = os.getpid()
    ours = ["checkpoint-4", f".checkpoint-4.old-{pid}", "abandoned-checkpoint-2", f"abandoned-checkpoint-2.{pid}",
            "tensorboard", ".tmp-checkpoint-5-x1", "..tmp-checkpoint-5-x1.tmp-y2"]
    # a visible .old- name: the user's copy (a dated one, a second one), which overwrite deleted
    theirs = ["checkpoints", "checkpoint-x.old-1", "my-checkpoint-3", "tensorboard-2", "abandoned",
              "checkpoint-4.old-20261129", "checkpoint-4.old-2", f"checkpoint-4.old-{pid}"]
    for name in ours + theirs:
        (run / name).mkdir(parents=True)
        (run / name / "f").write_text(name)
    # a set-aside journal remove_save_leftovers could not read (it leaves it, and warns at each start): the deleted
    # run's, which warned on in the new run
    ours_files = ["metrics.jsonl", "completions.jsonl", "metrics.jsonl.tmp", "completions.jsonl.tmp",
                  ckpt.SET_ASIDE_JOURNAL]
    theirs_files = ["notes.txt", "completions.json", "metrics.jsonl.bak", "abandoned-checkpoint.txt"]
    for name in ours_files + theirs_files:
        (run / name).write_text(name)
    ckpt.clear_run(str(run))
    assert sorted(os.listdir(run)) == sorted(theirs + theirs_files)
    assert all((run / n / "f").read_text() == n for n in theirs)
    ckpt.clear_run(str(tmp_path / "missing"))   # no folder: nothing to do


def test_a_dated_copy_of_a_checkpoint_a_resume_set_aside_is_not_put_back(tmp_path):
    # `cp -r checkpoint-4 checkpoint-4.old-20261129`, then a resume from checkpoint-2 set checkpoint-4 aside and was
    # killed before its next save: the copy was taken for an earlier r1fast's killed save and put back as
    # checkpoint-4, so the bare --resume after went on from the branch left (and the copy was gone)
    run = tmp_path / "run"
    for name in ("checkpoint-2", "abandoned-checkpoint-4", "checkpoint-4.old-20261129"):
        (run / name).mkdir(parents=True)
        (run / name / ckpt.STATE_FILE).write_text("{}")
    ckpt.remove_save_leftovers(str(run))
    assert sorted(os.listdir(run)) == ["abandoned-checkpoint-4", "checkpoint-2", "checkpoint-4.old-20261129"]
    assert ckpt.latest_checkpoint(str(run)) == str(run / "checkpoint-2")
    # with nothing of step 4 or after, a dated copy (a number past any process id) is still never put back, nor is
    # what an earlier r1fast's save killed between its renames may have left (.old-<pid>)
    os.rename(run / "abandoned-checkpoint-4", tmp_path / "elsewhere")
    ckpt.remove_save_leftovers(str(run))
    assert ckpt.latest_checkpoint(str(run)) == str(run / "checkpoint-2")
    (run / "checkpoint-4.old-4242").mkdir()
    ckpt.remove_save_leftovers(str(run))   # no trainer_state.json: a deletion killed part way, not a checkpoint
    assert ckpt.latest_checkpoint(str(run)) == str(run / "checkpoint-2") and (run / "checkpoint-4.old-4242").exists()
    (run / "checkpoint-4.old-4242" / ckpt.STATE_FILE).write_text("{}")
    # complete, it may be what an earlier r1fast's save left, or the user's second copy: named, never renamed
    with pytest.warns(UserWarning, match=r"checkpoint-4\.old-4242 may be checkpoint-4 .* rename it to "):
        ckpt.remove_save_leftovers(str(run))
    assert ckpt.latest_checkpoint(str(run)) == str(run / "checkpoint-2")
    assert (run / "checkpoint-4.old-4242").exists() and (run / "checkpoint-4.old-20261129").exists()


def test_remove_save_leftovers_removes_the_temporary_files_of_a_runs_writes_only(tmp_path):
    # a kill while curves.png (r1fast plot), summary.json or pipeline_state.json was replaced left its .tmp for good
    gone = os.getpid()   # no replacing() of this process is writing: its temporary files are a killed run's
    ours = [name + ".tmp" for name in ckpt.REPLACED_FILES] + [f".{name}.tmp-{gone}-x1y2z3_4"
                                                                for name in ckpt.REPLACED_FILES]
    theirs = ["notes.tmp", "my.png.tmp", "curves.png", "summary.json", "metrics.jsonl.tmp.bak"]
    for name in ours + theirs:
        (tmp_path / name).write_text(name)
    ckpt.remove_save_leftovers(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(theirs)
    assert {"curves.png", "summary.json", "pipeline_state.json"} <= set(ckpt.REPLACED_FILES)


def test_set_aside_newer_moves_only_the_later_checkpoints_of_the_resumed_ones_folder(tmp_path):
    def checkpoint(folder, step):
        d = folder / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / ckpt.STATE_FILE).write_text("{}")
        return str(d)

    run, other = tmp_path / "run", tmp_path / "other"
    for step in (1, 2, 3):
        checkpoint(run, step)
    elsewhere = checkpoint(other, 1)
    # a checkpoint from another folder abandons nothing here
    assert ckpt.set_aside_newer(str(run), elsewhere) == []
    assert [s for s, _ in ckpt.list_checkpoints(str(run))] == [1, 2, 3] and os.listdir(other) == ["checkpoint-1"]
    # a name an earlier resume took gets a suffix, the earlier folder is kept as it was
    (run / "abandoned-checkpoint-3").mkdir()
    (run / "abandoned-checkpoint-3" / "mine").write_text("earlier")
    moved = ckpt.set_aside_newer(str(run), str(run / "checkpoint-1"))
    assert moved == [str(run / "abandoned-checkpoint-2"), str(run / f"abandoned-checkpoint-3.{os.getpid()}")]
    assert [s for s, _ in ckpt.list_checkpoints(str(run))] == [1]
    assert (run / "abandoned-checkpoint-3" / "mine").read_text() == "earlier"
    assert (run / f"abandoned-checkpoint-3.{os.getpid()}" / ckpt.STATE_FILE).is_file()


def test_the_newest_checkpoint_set_aside_keeps_the_left_branchs_whole_log_or_says_it_cannot(tmp_path, monkeypatch):
    from r1fast.trainer import metrics

    run = tmp_path / "run"
    for step in (1, 2, 3):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / ckpt.STATE_FILE).write_text("{}")
    log = "".join(f'{{"step": {s}}}\n' for s in (1, 2, 3, 4))   # step 4: after the newest checkpoint
    (run / "metrics.jsonl").write_text(log)
    ckpt.set_aside_newer(str(run), str(run / "checkpoint-1"))
    assert (run / "abandoned-checkpoint-3" / "metrics.jsonl").read_text() == log
    assert not (run / "abandoned-checkpoint-2" / "metrics.jsonl").exists()   # its own copy is its save's
    # a checkpoint that cannot be written to (read-only storage): the resume goes on, saying what is not kept
    (run / "abandoned-checkpoint-3").rename(run / "checkpoint-3")

    def refused(run_dir, folder, replace=False):
        raise PermissionError(13, "Permission denied", folder)

    monkeypatch.setattr(metrics, "copy_logs", refused)
    with pytest.warns(UserWarning, match=r"cannot keep the logs of the steps set aside in .*abandoned-checkpoint-3 "):
        assert len(ckpt.set_aside_newer(str(run), str(run / "checkpoint-1"))) == 1


def test_resuming_a_set_aside_checkpoint_sets_aside_the_branch_it_leaves_and_is_its_runs_again(tmp_path):
    # run to step 6, resumed from checkpoint-3 (checkpoint-4 set aside), run to 6 again, then resumed from
    # abandoned-checkpoint-4: nothing was set aside (the name did not match checkpoint-<step>), so the run's save at
    # step 5 replaced the other branch's checkpoint-5, and a kill before it left a bare --resume going on from the
    # other branch's checkpoint-6; kept under its set-aside name, checkpoint-4 was never a checkpoint to resume
    run = tmp_path / "run"
    for name in ("checkpoint-3", "checkpoint-4", "checkpoint-5", "checkpoint-6", "abandoned-checkpoint-4"):
        (run / name).mkdir(parents=True)
        (run / name / ckpt.STATE_FILE).write_text(json.dumps({"branch": "abandoned" if "abandoned" in name else "left"}))
    resumed = str(run / "abandoned-checkpoint-4")
    moved = ckpt.set_aside_newer(str(run), resumed)
    assert moved == [str(run / f"abandoned-checkpoint-4.{os.getpid()}"), str(run / "abandoned-checkpoint-5"),
                     str(run / "abandoned-checkpoint-6")]
    assert ckpt.take_back(str(run), resumed) == str(run / "checkpoint-4")
    assert [s for s, _ in ckpt.list_checkpoints(str(run))] == [3, 4]
    assert json.loads((run / "checkpoint-4" / ckpt.STATE_FILE).read_text())["branch"] == "abandoned"
    assert ckpt.take_back(str(run), str(run / "checkpoint-4")) is None   # a checkpoint of the run's own: as it was


def test_resuming_a_set_aside_checkpoint_with_this_pid_or_through_a_symlink_is_its_runs_again(tmp_path):
    def branch(run, resumed_name):
        for name, tag in (("checkpoint-3", "c3"), ("checkpoint-4", "left"), ("checkpoint-5", "left"),
                          ("abandoned-checkpoint-4", "older"), (resumed_name, "resumed")):
            (run / name).mkdir(parents=True, exist_ok=True)
            (run / name / ckpt.STATE_FILE).write_text(json.dumps({"tag": tag}))

    def tags(run):
        return {name: json.loads((run / name / ckpt.STATE_FILE).read_text())["tag"] for name in os.listdir(run)}

    # abandoned-checkpoint-4.<pid> resumed by a process of that id (a container's restarted job): setting aside the
    # left branch's checkpoint-4 renamed it onto the resumed folder, OSError ENOTEMPTY after the load
    run, pid = tmp_path / "run", os.getpid()
    branch(run, f"abandoned-checkpoint-4.{pid}")
    resumed = str(run / f"abandoned-checkpoint-4.{pid}")
    assert ckpt.set_aside_newer(str(run), resumed) == [str(run / f"abandoned-checkpoint-4.{pid + 1}"),
                                                       str(run / "abandoned-checkpoint-5")]
    assert ckpt.take_back(str(run), resumed) == str(run / "checkpoint-4")
    assert tags(run) == {"checkpoint-3": "c3", "checkpoint-4": "resumed", "abandoned-checkpoint-4": "older",
                         f"abandoned-checkpoint-4.{pid + 1}": "left", "abandoned-checkpoint-5": "left"}
    # --resume ./best (best -> run/abandoned-checkpoint-4): the left branch was set aside but the resumed one kept its
    # set-aside name, so a bare --resume after a kill went back to checkpoint-3
    run = tmp_path / "run2"
    branch(run, "abandoned-checkpoint-4")
    os.symlink(run / "abandoned-checkpoint-4", tmp_path / "best")
    ckpt.set_aside_newer(str(run), str(tmp_path / "best"))
    assert ckpt.take_back(str(run), str(tmp_path / "best")) == str(run / "checkpoint-4")
    assert ckpt.latest_checkpoint(str(run)) == str(run / "checkpoint-4") and tags(run)["checkpoint-4"] == "resumed"
    # the same through a link inside the run folder
    run = tmp_path / "run3"
    branch(run, "abandoned-checkpoint-4")
    os.symlink("abandoned-checkpoint-4", run / "best")
    ckpt.set_aside_newer(str(run), str(run / "best"))
    assert ckpt.take_back(str(run), str(run / "best")) == str(run / "checkpoint-4")


def test_a_symlink_to_a_checkpoint_in_output_dir_resumes_in_place(tmp_path):
    # `--resume latest` (latest -> run/checkpoint-1) was taken for another run's checkpoint: refused, and with
    # overwrite_output_dir=true the run's checkpoints were deleted, the resumed one included; nothing was set aside
    run = tmp_path / "run"
    for step in (1, 2, 3):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / ckpt.STATE_FILE).write_text("{}")
    os.symlink(run / "checkpoint-1", tmp_path / "latest")
    ckpt.resume_into(str(run), str(tmp_path / "latest"), overwrite=True)
    assert [s for s, _ in ckpt.list_checkpoints(str(run))] == [1, 2, 3]
    assert ckpt.set_aside_newer(str(run), str(tmp_path / "latest")) == [
        str(run / "abandoned-checkpoint-2"), str(run / "abandoned-checkpoint-3")]
    # a checkpoint-<step> of run that is itself a symlink (moved to another disk) is still run's own
    os.rename(run / "checkpoint-1", tmp_path / "moved")
    os.symlink(tmp_path / "moved", run / "checkpoint-1")
    (run / "checkpoint-4").mkdir()
    (run / "checkpoint-4" / ckpt.STATE_FILE).write_text("{}")
    ckpt.resume_into(str(run), str(run / "checkpoint-1"), overwrite=False)
    assert ckpt.set_aside_newer(str(run), str(run / "checkpoint-1")) == [str(run / "abandoned-checkpoint-4")]


def test_a_second_path_to_output_dir_that_real_paths_do_not_unify_resumes_in_place(tmp_path, monkeypatch):
    # a bind mount or an automounter's /net/home/u/... for ~/...: realpath gives each path as it is (simulated here
    # with a symlink that realpath is made not to follow); resume_into took the checkpoint for another run's, and
    # with overwrite_output_dir=true deleted the run, the resumed checkpoint included
    run = tmp_path / "run"
    for step in (1, 2):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / ckpt.STATE_FILE).write_text("{}")
    os.symlink(run, tmp_path / "alias")
    monkeypatch.setattr(os.path, "realpath", os.path.abspath)
    ckpt.resume_into(str(tmp_path / "alias"), str(run / "checkpoint-1"), overwrite=True)
    assert [s for s, _ in ckpt.list_checkpoints(str(run))] == [1, 2]
    assert ckpt.set_aside_newer(str(tmp_path / "alias"), str(run / "checkpoint-1")) == [
        str(tmp_path / "alias" / "abandoned-checkpoint-2")]
    ckpt.resume_into(str(tmp_path / "new"), str(run / "checkpoint-1"), overwrite=False)   # a new output_dir: no folder


def test_tool_messages_are_accepted_and_a_prompts_own_system_message_is_kept_alone():
    import types

    from r1fast.data.loading import prompt_messages, prompt_text

    tok = build_char_tokenizer()
    msgs = [{"role": "user", "content": "3+4="}, {"role": "tool", "content": "calc: 7"}]
    assert prompt_messages(msgs, None) == msgs
    assert prompt_text(types.SimpleNamespace(chat_template=None), msgs) == "3+4=\ncalc: 7"   # no template: joined
    encode_prompt(tok, msgs)   # the built-in template renders no tool message, but takes one
    # a prompt with its own system message gets no second one from system_prompt
    own = [{"role": "system", "content": "Own rules."}, {"role": "user", "content": "3+4="}]
    assert prompt_messages(own, "Be brief.") == own
    ids = encode_prompt(tok, own, system_prompt="Be brief.")
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>Own rules.\n<|user|>3+4=<|assistant|>"


def test_jsonl_that_is_not_utf8_names_the_line_read_when_it_failed(tmp_path):
    # decoded a block at a time: a bad byte far into line 2 is met after line 1 was read whole
    late = tmp_path / "late.jsonl"
    line2 = '{"prompt": "' + "1+1=" * 100_000 + 'caf\u00e9"}\n'
    late.write_bytes(b'{"prompt": "2+2="}\n' + line2.encode("latin-1") + b'{"prompt": "\xff"}\n')
    with pytest.raises(ValueError, match=r"late.jsonl' line 2: not UTF-8 text \(byte b'\\xe9'\); save it"):
        load_rows(str(late))
    # lines ended by \r alone (old Mac files) are lines too, as in text mode
    cr = tmp_path / "cr.jsonl"
    cr.write_bytes(b'{"prompt": "1"}\r{"prompt": "2"}\r\n\r{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"cr.jsonl' line 4: not UTF-8 text"):
        load_rows(str(cr))


def test_decoded_completions_are_the_tokens_own_text_without_the_stop_that_ended_them():
    """A completion ending at one of the model config's eos ids (Llama 3.1: <|end_of_text|>, <|eom_id|>
    beside the tokenizer's <|eot_id|>) lost only the tokenizer's eos: the rewards and a rejection-sampled
    row got the stop as text ("...</answer><eos2>"). A tokenizer with clean_up_tokenization_spaces
    (Llama 3's) had "2 , 3" decoded as "2, 3", which SFT then trained on."""
    from r1fast.data import stop_token_ids

    tok = build_char_tokenizer()
    other_eos = tok.convert_tokens_to_ids("<|user|>")
    ends = stop_token_ids(tok, [other_eos, tok.eos_token_id])
    assert ends == [tok.eos_token_id, other_eos] and stop_token_ids(tok) == [tok.eos_token_id]
    text = "<think>2 , 3 . it 's</think><answer>5</answer>"
    ids = encode_completion(tok, text)[:-1]
    assert decode_completion(tok, ids + [other_eos], ends) == text
    assert decode_completion(tok, ids + [tok.eos_token_id], ends) == text
    assert decode_completion(tok, [other_eos] + ids, ends) == "<|user|>" + text   # a stop ends a completion only
    tok.clean_up_tokenization_spaces = True
    assert decode_completion(tok, ids) == text
    assert encode_completion(tok, decode_completion(tok, ids))[:-1] == ids   # a sampled row re-encodes to its ids


def test_decode_completions_is_decode_completion_of_each_in_one_batch_call():
    """decode_completions decodes a rollout in one call of the Rust tokenizer (on every core; one
    tokenizer.decode per completion took ~250 ms of one core at 512 x 512 tokens) into exactly the texts
    decode_completion gives: a stop dropped only at the end, eos / pad / bos dropped anywhere, filler ids of a
    padded vocabulary, no clean-up of spaces whatever the tokenizer's setting. A tokenizer whose decode is
    its own (a subclass, one set on the instance) is called per completion."""
    import random

    from r1fast.data.loading import _batch_decoder, decode_completions

    tok = build_char_tokenizer(vocab_size=400)
    tok.clean_up_tokenization_spaces = True
    stop = tok.convert_tokens_to_ids("<|user|>")
    ends = [tok.eos_token_id, stop]
    rng = random.Random(0)
    specials = [tok.eos_token_id, tok.bos_token_id, tok.pad_token_id, stop]
    rows = [[rng.choice(specials) if rng.random() < 0.2 else rng.randrange(len(tok)) for _ in range(rng.randrange(9))]
            for _ in range(64)]
    rows += [encode_completion(tok, "2 , 3 . it 's")[:-1] + [stop], [stop, stop], []]
    assert any(r and r[-1] == stop for r in rows) and any(tok.bos_token_id in r[:-1] for r in rows)
    want = [decode_completion(tok, r, ends) for r in rows]
    assert _batch_decoder(tok) is not None
    assert decode_completions(tok, rows, ends) == want
    assert want[-3] == "2 , 3 . it 's" and want[-2] == "<|user|>"

    class Shouting(type(tok)):
        def decode(self, ids, **kw):
            return super().decode(ids, **kw).upper()
    shouting = build_char_tokenizer(vocab_size=400)
    shouting.__class__ = Shouting
    assert _batch_decoder(shouting) is None
    assert decode_completions(shouting, rows, ends) == [w.upper() for w in want]
    tok.decode = lambda ids, **kw: "x"
    assert _batch_decoder(tok) is None and decode_completions(tok, rows[:2], ends) == ["x", "x"]


def test_jsonl_starting_with_a_byte_order_mark_is_read(tmp_path):
    # Windows tools (Notepad, PowerShell's Out-File) write one first: line 1 was "not valid JSON (Unexpected
    # UTF-8 BOM ...)", while a .csv with one read fine
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"prompt": "caf\xc3\xa9", "answer": "1"}\n{"prompt": "2"}\n')
    assert load_rows(str(bom)) == [{"prompt": "caf\u00e9", "answer": "1"}, {"prompt": "2", "answer": None}]


def test_a_prompt_already_rendered_by_the_chat_template_is_refused_not_templated_twice():
    # TRL uses a string prompt as it is; r1fast templates it, so a pre-templated one became
    # "<bos><|user|><bos><|user|>3+4=<|assistant|><|assistant|>" without a word
    from r1fast.data.loading import check_prompts, generation_prompt

    tok = build_char_tokenizer()
    assert generation_prompt(tok) == "<|assistant|>"
    done = tok.apply_chat_template([{"role": "user", "content": "3+4="}], tokenize=False, add_generation_prompt=True)
    rows = [{"prompt": "3+4="}, {"prompt": done}]
    with pytest.raises(ValueError, match=r"train: row 1's prompt already holds the chat template's generation prompt "
                                         r"'<\|assistant\|>': it was templated before"):
        check_prompts(rows, "prompt", tok, where="train")
    with pytest.raises(ValueError, match=r"row 0's prompt already holds"):
        check_prompts([{"prompt": [{"role": "user", "content": done}]}], "prompt", tok)
    check_prompts(rows[:1] + [{"prompt": [{"role": "user", "content": "<|user|> is a tag"}]}], "prompt", tok)
    # a generation prompt of plain text is no sign of templating: a few-shot question may hold it
    plain = tok.chat_template.replace("<|assistant|>", "Assistant:")
    tok.chat_template = plain
    check_prompts([{"prompt": "Q: 1+1=\nAssistant: 2\nQ: 3+4=\nAssistant:"}], "prompt", tok)
    tok.chat_template = None   # no template: the text is the prompt, as it is
    check_prompts(rows, "prompt", tok)


def test_a_system_prompt_left_out_for_rows_with_their_own_system_message_is_said():
    # such a row keeps its own system message alone: the configured one (the answer format it asks
    # for) was missing from it without a word
    import warnings

    from r1fast.data.loading import check_prompts

    tok = build_char_tokenizer()
    own = [{"role": "system", "content": "Own rules."}, {"role": "user", "content": "3+4="}]
    same = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3+4="}]
    rows = [{"prompt": "1+1="}, {"prompt": own}, {"prompt": same}, {"prompt": own}]
    with pytest.warns(UserWarning, match=r"train: system_prompt is not used for 2 of 4 rows, whose prompts have their "
                                         r"own system message \(theirs is kept, not both\)"):
        check_prompts(rows, "prompt", tok, system_prompt="Be brief.", where="train")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_prompts(rows, "prompt", tok, where="train")   # no system_prompt: nothing left out
        check_prompts(rows[:1] + rows[2:3], "prompt", tok, system_prompt="Be brief.", where="train")


def test_conversations_read_by_a_tokenizer_without_a_chat_template_are_said_to_lose_their_roles():
    # its messages' contents were joined by newlines ("Own rules.\n3+4=") without a word
    import warnings

    from r1fast.data.loading import check_prompts

    tok = build_char_tokenizer()
    tok.chat_template = None
    own = [{"role": "system", "content": "Own rules."}, {"role": "user", "content": "3+4="}]
    rows = [{"prompt": "1+1="}, {"prompt": own}, {"prompt": own[1:]}]
    with pytest.warns(UserWarning, match=r"train: the tokenizer has no chat template, so 1 of 3 prompts of several "
                                         r"messages are read as their contents joined by newlines"):
        check_prompts(rows, "prompt", tok, where="train")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_prompts(rows[::2], "prompt", tok, where="train")   # one message: its content, as a string prompt


def test_a_prompt_ending_on_the_assistants_message_is_continued_not_closed():
    # TRL continues such a prompt (continue_final_message): an R1 prefill of "<think>" was closed with the
    # end-of-turn and a second assistant turn opened, "<|assistant|><think><eos><|assistant|>"
    tok = build_char_tokenizer()
    prefill = [{"role": "user", "content": "3+4="}, {"role": "assistant", "content": "<think>"}]
    assert tok.decode(encode_prompt(tok, prefill)) == "<bos><|user|>3+4=<|assistant|><think>"
    assert tok.decode(encode_prompt(tok, prefill[:1])) == "<bos><|user|>3+4=<|assistant|>"


def qwen3_style_tokenizer():
    """The built-in tokenizer with a template that closes an empty reasoning block when `enable_thinking` is false,
    as Qwen3's does (its default, the variable left undefined, lets the model open <think> itself)."""
    from r1fast.data.tokenizer import CHAT_TEMPLATE

    tok = build_char_tokenizer()
    tok.chat_template = CHAT_TEMPLATE.replace(
        "<|assistant|>{% endif %}",
        "<|assistant|>{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
        "{% endif %}{% endif %}")
    return tok


def test_chat_template_kwargs_reach_the_template():
    # r1fast had no way to pass the template's own variables: a Qwen3 model could not be trained without thinking
    import warnings

    from r1fast.data.loading import check_prompts

    tok = qwen3_style_tokenizer()
    plain = encode_prompt(tok, "3+4=")
    off = encode_prompt(tok, "3+4=", chat_template_kwargs={"enable_thinking": False})
    assert tok.decode(plain) == "<bos><|user|>3+4=<|assistant|>"
    assert off[:len(plain)] == plain and tok.decode(off[len(plain):]) == "<think>\n\n</think>\n\n"
    assert encode_prompt(tok, "3+4=", chat_template_kwargs={"enable_thinking": True}) == plain
    # a key the template never reads changes nothing: said, not ignored (Jinja reads a misspelt name as undefined)
    with pytest.warns(UserWarning, match=r"train: the chat template does not read chat_template_kwargs "
                                         r"\['enable_thinkng'\], which change nothing; it reads \[.*'enable_thinking'"):
        check_prompts([{"prompt": "3+4="}], "prompt", tok, where="train",
                      chat_template_kwargs={"enable_thinkng": False})
    with pytest.warns(UserWarning, match=r"chat_template_kwargs \['enable_thinking'\] are not used: the tokenizer "
                                         r"has no chat template"):
        bare = build_char_tokenizer()
        bare.chat_template = None
        check_prompts([{"prompt": "3+4="}], "prompt", bare, chat_template_kwargs={"enable_thinking": False})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_prompts([{"prompt": "3+4="}], "prompt", tok, chat_template_kwargs={"enable_thinking": False})
    # a prompt templated before, with the kwargs or without them, is refused
    for kwargs in ({}, {"enable_thinking": False}):
        done = tok.apply_chat_template([{"role": "user", "content": "3+4="}], tokenize=False,
                                       add_generation_prompt=True, **kwargs)
        with pytest.raises(ValueError, match="row 0's prompt already holds the chat template's generation prompt"):
            check_prompts([{"prompt": done}], "prompt", tok, chat_template_kwargs={"enable_thinking": False})


def test_a_template_that_closes_reasoning_before_a_prefill_is_said():
    # Qwen3's template writes an empty "<think>\n\n</think>\n\n" before a final assistant message: a "<think>"
    # prefill was continued after a finished reasoning, "<|assistant|><think>\n\n</think>\n\n<think>", without a word
    import warnings

    from r1fast.data.loading import check_prompts
    from r1fast.data.tokenizer import CHAT_TEMPLATE

    tok = build_char_tokenizer()
    tok.chat_template = CHAT_TEMPLATE.replace(
        "<|assistant|>{{ message['content'] }}",
        "<|assistant|>{% if loop.last %}<think>\n\n</think>\n\n{% endif %}{{ message['content'] }}")
    prefill = [{"role": "user", "content": "3+4="}, {"role": "assistant", "content": "<think>"}]
    assert tok.decode(encode_prompt(tok, prefill)).endswith("<|assistant|><think>\n\n</think>\n\n<think>")
    rows = [{"prompt": "1+1="}, {"prompt": prefill}, {"prompt": prefill}]
    with pytest.warns(UserWarning, match=r"train: the chat template closes a reasoning block before the prefilled "
                                         r"assistant message '<think>': the prompt ends '<think>\\n\\n</think>\\n\\n"
                                         r"<think>'") as caught:
        check_prompts(rows, "prompt", tok, where="train")
    assert len(caught) == 1   # the template's way, said once
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_prompts(rows, "prompt", build_char_tokenizer(), where="train")   # the prefill follows the turn's start
        closed = [prefill[0], {"role": "assistant", "content": "<think>2</think>"}]
        check_prompts([{"prompt": closed}], "prompt", build_char_tokenizer(), where="train")


def test_a_datasets_dataset_is_read_as_columns_with_the_rows_it_would_give_one_by_one(tmp_path, monkeypatch):
    # dataset_rows (and a saved folder or parquet file) read a datasets.Dataset row by row: one Arrow query per
    # row, 9 s for 100k rows
    datasets = pytest.importorskip("datasets")
    from r1fast.trainer.common import dataset_rows

    rows = [{"prompt": [{"role": "user", "content": "1+1="}], "answer": "2", "level": 1, "score": 0.5,
             "ok": True, "tags": ["a", "b"], "note": None},
            {"prompt": [{"role": "user", "content": "2+2="}], "answer": None, "level": 3, "score": float("nan"),
             "ok": False, "tags": [], "note": "x"},
            {"prompt": [{"role": "user", "content": "3+3="}], "answer": "6", "level": 2, "score": -1.25,
             "ok": True, "tags": ["c"], "note": None}]
    ds = datasets.Dataset.from_list(rows).shuffle(seed=1).select([2, 0])   # an indices mapping, as after a filter
    one_by_one = [dict(ds[i]) for i in range(len(ds))]
    only_some = ds.select_columns(["answer", "level"])
    ds.save_to_disk(str(tmp_path / "saved"))
    reads = []
    getitem = datasets.Dataset.__getitem__
    monkeypatch.setattr(datasets.Dataset, "__getitem__", lambda self, key: reads.append(key) or getitem(self, key))
    got = dataset_rows(ds, "train", split=None, seed=0)
    assert repr(got) == repr(one_by_one)   # repr: nan != nan
    assert [list(r) for r in got] == [list(r) for r in one_by_one]   # the columns' order too
    assert len(reads) == 1
    assert dataset_rows(only_some, "train", split=None, seed=0) == [{"answer": r["answer"], "level": r["level"]}
                                                                     for r in one_by_one]
    reads.clear()
    assert repr(load_rows(str(tmp_path / "saved"))) == repr(one_by_one) and len(reads) == 1
    torch_format = ds.with_format("torch", columns=["level"])   # its batch would be one stacked tensor
    assert [r["level"].tolist() for r in dataset_rows(torch_format, "train", split=None, seed=0)] == [2, 1]


def test_a_resume_path_whose_dotdot_follows_a_symlink_is_found_in_output_dir(tmp_path):
    # `--resume $PWD/../run/checkpoint-1` with a symlink in $PWD (a job script's logical path): the checkpoint's
    # folder was found from normpath's lexical '..' (tmp/run), not the folder the OS opens (tmp/real/run), so
    # resume_into took it for another run's and overwrite_output_dir=true deleted the run, the resumed checkpoint too
    run = tmp_path / "real" / "run"
    (tmp_path / "real" / "sub").mkdir(parents=True)
    for step in (1, 2):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / ckpt.STATE_FILE).write_text("{}")
    os.symlink(tmp_path / "real" / "sub", tmp_path / "link")
    resume = str(tmp_path / "link" / ".." / "run" / "checkpoint-1")
    assert os.path.isfile(os.path.join(resume, ckpt.STATE_FILE))   # the OS finds run/checkpoint-1 through it
    ckpt.resume_into(str(run), resume, overwrite=True)
    assert [s for s, _ in ckpt.list_checkpoints(str(run))] == [1, 2]
    assert ckpt.set_aside_newer(str(run), resume) == [str(run / "abandoned-checkpoint-2")]
    # and the folder its lexical '..' names, holding another run, does not take it for that run's own (nothing set
    # aside there, and the new run is refused rather than written and pruned among the other run's checkpoints)
    other = tmp_path / "run"
    for step in (1, 2):
        (other / f"checkpoint-{step}").mkdir(parents=True)
        (other / f"checkpoint-{step}" / ckpt.STATE_FILE).write_text("{}")
    assert ckpt.set_aside_newer(str(other), resume) == []
    with pytest.raises(ckpt.OutputDirHoldsAnotherRun):
        ckpt.resume_into(str(other), resume, overwrite=False)


def test_resuming_an_abandoned_checkpoint_sets_aside_the_other_branchs_checkpoints(tmp_path):
    # `--resume run/abandoned-checkpoint-2` matched no checkpoint-<step> name, so nothing was set aside: the
    # resumed run's saves replaced the other branch's checkpoint-3 (deleting it, where set-aside steps are kept) and
    # a bare --resume after a stop went on from that other branch's checkpoint-2 or -3
    model = _model(build_char_tokenizer())
    run = tmp_path / "run"
    for step in (1, 2):
        ckpt.save_checkpoint(str(run), step, model=model, keep=None)
    assert ckpt.set_aside_newer(str(run), str(run / "checkpoint-1")) == [str(run / "abandoned-checkpoint-2")]
    for step in (2, 3):   # the branch resumed from checkpoint-1
        ckpt.save_checkpoint(str(run), step, model=model, keep=None, state={"branch": "b"})
    resumed = str(run / "abandoned-checkpoint-2")
    moved = ckpt.set_aside_newer(str(run), resumed)
    assert moved == [str(run / f"abandoned-checkpoint-2.{os.getpid()}"), str(run / "abandoned-checkpoint-3")]
    assert [s for s, _ in ckpt.list_checkpoints(str(run))] == [1]
    ckpt.save_checkpoint(str(run), 3, model=model, keep=2)
    for path in moved:   # the other branch's steps are kept, as any set aside
        assert json.loads(open(os.path.join(path, ckpt.STATE_FILE)).read())["branch"] == "b"
    # a set-aside name with its .<pid> suffix reads as its step too
    assert ckpt.set_aside_newer(str(run), moved[0]) == [str(run / f"abandoned-checkpoint-3.{os.getpid()}")]


def test_a_dataset_without_the_prompt_column_says_which_option_names_it(tmp_path, monkeypatch, capsys):
    # "lacks column(s) ['prompt', 'completion']; it has ['question', 'reply']" said what was missing, not that
    # prompt_column= / completion_column= read the data's own columns (GSM8K's prompts are under `question`)
    from r1fast.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "q.jsonl").write_text('{"question": "1+2=", "reply": "<think>1+2=3</think><answer>3</answer>", '
                                      '"answer": "3"}\n' * 8)
    small = ["model_name_or_path=builtin:micro", "dataset=q.jsonl", "max_steps=1", "progress_bar=false"]
    cases = [(["sft", *small], "SFT dataset", "prompt_column=<column> and completion_column=<column>"),
             (["sft", *small, "prompt_column=question"], "SFT dataset", "completion_column=<column>"),
             (["train", *small, "per_device_train_batch_size=4", "num_generations=4"], "train dataset",
              "prompt_column=<column>"),
             (["sample", "model_name_or_path=builtin:micro", "dataset=q.jsonl", "progress_bar=false"], "dataset",
              "prompt_column=<column>")]
    for argv, what, sets in cases:
        with pytest.raises(SystemExit, match=rf"{what} \('q.jsonl'\) lacks .*; it has \['answer', 'question', "
                                             rf"'reply'\]; set {re.escape(sets)} to read (another column|other "
                                             rf"columns)$"):
            main(argv)
    # a pipeline stage's option is set as <stage>.<option>
    spec = tmp_path / "p.yaml"
    spec.write_text("name: p\nmodel: builtin:micro\nprogress_bar: false\nstages:\n  - name: cold\n    type: sft\n"
                    "    dataset: q.jsonl\n    config: {max_steps: 1}\n")
    with pytest.raises(SystemExit, match=r"stage 'cold': dataset \('q.jsonl'\) lacks column\(s\) \['prompt', "
                                         r"'completion'\].*; set cold.prompt_column=<column> and "
                                         r"cold.completion_column=<column> to read other columns$"):
        main(["pipeline", str(spec)])
    # and setting what it names reads the data
    assert main(["sft", *small, "prompt_column=question", "completion_column=reply"]) == 0


def test_a_grpo_resume_from_an_sft_checkpoint_says_what_it_is_and_what_to_do(tmp_path, monkeypatch):
    # said "trainer_state.json: rollout_index is None, not a whole number >= 0": true, but not that the checkpoint
    # was SFT's, nor that its weights start a new GRPO run as model_name_or_path
    from r1fast.cli import main

    monkeypatch.chdir(tmp_path)
    common = ["model_name_or_path=builtin:micro", "dataset=builtin:arithmetic", "max_steps=1", "progress_bar=false"]
    assert main(["sft", *common, "per_device_train_batch_size=4", "output_dir=sft"]) == 0
    grpo = [*common, "per_device_train_batch_size=4", "num_generations=4", "max_completion_length=4",
            "output_dir=grpo"]
    with pytest.raises(SystemExit, match=r"checkpoint 'sft/checkpoint-1': trainer_state.json: no 'rollout_index', "
                                         r"which this trainer's checkpoints record: the checkpoint is another "
                                         r"trainer's \(an SFT checkpoint .*start a new run with model_name_or_path="):
        main(["train", *grpo, "--resume", "sft/checkpoint-1"])
    # as it says: the SFT checkpoint's weights start a GRPO run
    assert main(["train", *[a for a in grpo if not a.startswith("model_name_or_path")],
                 "model_name_or_path=sft/checkpoint-1"]) == 0


def test_a_jsonl_line_left_open_names_its_own_end_not_column_1(tmp_path):
    # json.loads read the line with its newline, so an object left open ('{"prompt": "1+1=", "answer": "2"') failed
    # "at column 1" (of the line after it, which the message did not say): the reader looked at the line's start
    from r1fast.data import load_rows

    row = '{"prompt": "%d+1=", "answer": "%d"' % (random.randint(1, 9), random.randint(1, 9))
    for end in ("\n", "\r\n"):
        f = tmp_path / "open.jsonl"
        f.write_bytes(('{"prompt": "1+1=", "answer": "2"}' + end + row + end).encode())
        with pytest.raises(ValueError, match=rf"open.jsonl' line 2: not valid JSON \(Expecting ',' delimiter at "
                                             rf"column {len(row) + 1}\)$"):
            load_rows(str(f))
    # a mistake inside the line is still named where it is
    f.write_text('{"prompt": "1+1=" "answer": "2"}\n')
    with pytest.raises(ValueError, match=r"line 1: not valid JSON \(Expecting ',' delimiter at column 19\)$"):
        load_rows(str(f))


def test_a_built_in_task_asked_for_too_many_rows_is_an_error_not_a_hang(tmp_path, monkeypatch):
    # eval_size=1e9 with a builtin: eval_dataset drew rows until memory ran out, printing nothing
    from r1fast.cli import main
    from r1fast.data.tasks import MAX_BUILTIN_ROWS, builtin_rows
    from r1fast.trainer.config import ConfigError
    from r1fast.trainer.pipeline import load_pipeline

    n = MAX_BUILTIN_ROWS + random.randint(1, 10**9)
    with pytest.raises(ValueError, match=rf"built-in task 'builtin:arithmetic': {n} rows asked for \(a pipeline "
                                         rf"stage's num_rows, or eval_size for an eval_dataset\); a built-in task "
                                         rf"draws at most 1,000,000$"):
        builtin_rows("builtin:arithmetic", n, 0)
    assert len(builtin_rows("builtin:arithmetic?max_terms=3", 5, 0)) == 5
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=rf"{n} rows asked for"):
        main(["train", "model_name_or_path=builtin:micro", "dataset=builtin:arithmetic",
              "eval_dataset=builtin:arithmetic", f"eval_size={n}", "max_steps=1"])
    # a pipeline stage's num_rows is checked when the pipeline loads, before any stage trains
    spec = {"name": "p", "model": "builtin:micro",
            "stages": [{"name": "s", "type": "sft", "dataset": "builtin:arithmetic", "num_rows": n}]}
    with pytest.raises(ConfigError, match=rf"stage 's': num_rows must be in \[1, 1,000,000\]; got {n}$"):
        load_pipeline(spec)


def test_an_sft_resume_from_a_grpo_checkpoint_says_what_it_is_and_what_to_do(tmp_path, monkeypatch):
    # was taken: the SFT run went on from the GRPO checkpoint's step, its progress "2/1 steps (200%)"
    from r1fast.cli import main

    monkeypatch.chdir(tmp_path)
    common = ["model_name_or_path=builtin:micro", "dataset=builtin:arithmetic", "max_steps=1", "progress_bar=false",
              "per_device_train_batch_size=4"]
    assert main(["train", *common, "num_generations=4", "max_completion_length=4", "output_dir=grpo"]) == 0
    with pytest.raises(SystemExit, match=r"checkpoint 'grpo/checkpoint-1': trainer_state.json: 'rollout_index', "
                                         r"which GRPO checkpoints record and this trainer's do not: the checkpoint is "
                                         r"another trainer's \(a GRPO checkpoint .*start a new run with "
                                         r"model_name_or_path="):
        main(["sft", *common, "output_dir=sft", "--resume", "grpo/checkpoint-1"])
    assert not os.path.exists("sft/checkpoint-1")


def test_an_eval_dataset_without_the_prompt_column_does_not_offer_prompt_column(tmp_path, monkeypatch):
    # said "set prompt_column=<column> to read another column": that option reads the train dataset's prompts too,
    # which have the column, so following it broke training instead
    from r1fast.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "q.jsonl").write_text('{"question": "1+2=", "answer": "3"}\n' * 4)
    argv = ["train", "model_name_or_path=builtin:micro", "dataset=builtin:arithmetic", "eval_dataset=q.jsonl",
            "eval_steps=1", "max_steps=1", "per_device_train_batch_size=4", "num_generations=4", "progress_bar=false"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    said = str(e.value)
    assert re.search(r"eval dataset \('q.jsonl'\) lacks column\(s\) \['prompt'\]; it has \['answer', 'question'\]; "
                     r"prompt_column also names the train dataset's prompt column, which it has: name the eval "
                     r"dataset's prompt column 'prompt'$", said), said
    assert "set prompt_column" not in said
