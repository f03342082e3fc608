"""Training checkpoints: safetensors + JSON only (never pickle), written atomically, last K kept.

    <run>/checkpoint-<step>/
        config.json, model*.safetensors   the model in Hugging Face format (loadable by transformers)
        tokenizer files                   when a tokenizer is given
        optimizer.safetensors             per-parameter optimizer tensors ("<param index>.<name>")
        rng.safetensors                   torch CPU (and CUDA) generator states
        metrics.jsonl, completions.jsonl  the run's logs as they were at this step (a resume starts from them)
        trainer_state.json                step, data position, optimizer param groups, scheduler,
                                          python/numpy RNG, config (written last)

A checkpoint is built in a hidden temporary folder beside its final name and renamed into place,
so a crash or Ctrl-C mid-write never leaves a half checkpoint that `--resume` would pick up.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import tempfile
from typing import Any, Callable, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from r1fast._umask import apply_umask, fsync_dir, fsync_file, save_safetensors
from r1fast.models.checkpoint import fsync_files, remove_folder, write_target
from r1fast.models.config import CHECKPOINT_NAME_RE as _CKPT_RE   # the model loaders' hints name checkpoints by it too
from r1fast.trainer.config import check_resume_path_exists, resume_is_bare  # there: the CLI imports it without torch

# save_checkpoint's temporary folder, and the ones save_pretrained makes beside it (".<its name>.tmp-...",
# ".<its name>.old-..."): a save killed mid-way leaves any of them behind; and a pruned checkpoint's folder
# while it is deleted (_delete_checkpoint's ".tmp-checkpoint-<step>-deleting-<pid>")
_SAVE_TEMP_RE = re.compile(r"^\.\.?tmp-checkpoint-\d+-")
# save_checkpoint's replaced checkpoint, before deletion: hidden (".checkpoint-N.old-<pid>"). The r1fast of
# 2026-11-28 to e478f69 set it aside visibly (checkpoint-N.old-<pid>), a name as likely the user's own copy
# (checkpoint-3.old-2, checkpoint-3.old-20261129): a visible one is never deleted nor renamed, only named where it
# may be the checkpoint such a save was killed replacing (_visible_old_note)
_OLD_CKPT_RE = re.compile(r"^(\.?)checkpoint-(\d+)\.old-(\d+)$")
# Linux's largest process id (pid_max's ceiling): a visible .old-<digits> above it (a date, 20261129) is no r1fast's
_MAX_PID = 4194304


def _pid_numbered(m: Optional[re.Match]) -> bool:
    return bool(m) and int(m.group(m.lastindex)) <= _MAX_PID


def _r1fast_old(name: str) -> Optional[re.Match]:
    """The match of a replaced checkpoint r1fast set aside: hidden only. A visible checkpoint-N.old-<small number>,
    taken for an earlier r1fast's, was deleted by overwrite_output_dir and renamed into the run (then pruned) by a
    resume, where it was the user's own copy."""
    m = _OLD_CKPT_RE.match(name)
    return m if m and m.group(1) else None


def _visible_old_note(path: str, checkpoint: str):
    """Say that `path` (checkpoint-N.old-<pid>, complete, where `checkpoint` is gone) may be what a save of an
    earlier r1fast left when it was killed replacing `checkpoint`: the user renames it back, r1fast does not."""
    import warnings

    warnings.warn(f"r1fast: {path} may be {os.path.basename(checkpoint)} as a save of an earlier r1fast set it aside "
                  f"before it was killed; to resume from it, rename it to {checkpoint}", stacklevel=3)


# the renames of a resume's set-aside (and take-back) still to do: written before the first, removed after the last,
# finished by remove_save_leftovers after a kill between them. JSON of names within the run folder, never pickle.
SET_ASIDE_JOURNAL = ".r1fast-set-aside.json"
# the files of a run folder (a trainer's, a pipeline's, a sample stage's) written through metrics.replacing: a
# kill mid-write leaves ".<name>.tmp-<pid>-<random>" beside them (metrics.temp_pattern; "<name>.tmp" before)
REPLACED_FILES = ("metrics.jsonl", "completions.jsonl", "pipeline_state.json", "summary.json", "curves.png",
                  "samples.jsonl", "sample_progress.json", SET_ASIDE_JOURNAL)
STATE_FILE = "trainer_state.json"
# trainer_state.json's "format", written from 1 on and checked on resume, so that a checkpoint a newer r1fast
# wrote in another layout is refused by this one instead of half read. A file without it is format 1 (r1fast
# before format numbers; one that predates the fused q/k/v and gate/up is refused by its parameter count).
CHECKPOINT_FORMAT = 1


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints under `run_dir`, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    out = []
    for name in os.listdir(run_dir):
        m = _CKPT_RE.match(name)
        path = os.path.join(run_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            out.append((int(m.group(1)), path))
    return sorted(out)


def latest_checkpoint(run_dir: str) -> Optional[str]:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def resolve_resume(resume: str | bool | None, run_dir: str) -> Optional[str]:
    """`--resume` (latest in the run dir), `--resume PATH` (a checkpoint or a run dir) → checkpoint path."""
    if not resume:
        return None
    if resume_is_bare(resume):
        path = latest_checkpoint(run_dir)
        if path is None:
            raise ValueError(f"--resume: no checkpoint found under {run_dir!r}")
        return path
    resume = str(resume)
    check_resume_path_exists(resume)
    if os.path.isfile(os.path.join(resume, STATE_FILE)):
        return resume
    path = latest_checkpoint(resume)
    if path is None:
        raise ValueError(f"--resume {resume!r}: neither a checkpoint folder (with {STATE_FILE}) nor a run "
                         f"folder holding checkpoint-<step> folders")
    return path


def _checkpoint_home(resume_path: str) -> str:
    """The real folder holding a checkpoint (`runs/a/checkpoint-3/` included: a trailing slash is no folder). A
    `--resume ./latest` whose `latest` is a symlink to runs/a/checkpoint-3 is held by runs/a, not by `latest`'s
    folder (a bare `--resume latest` is the newest checkpoint of the run's own folder: resume_is_bare).
    realpath alone, as the OS resolves the path: normpath first would take a '..' after a symlink
    (link/../run/checkpoint-3) lexically, to another folder than the one the checkpoint was read from."""
    return os.path.dirname(os.path.realpath(resume_path))


def _resumes_in_place(run_dir: str, resume_path: str) -> bool:
    """Whether the checkpoint is one of run_dir's own, by the folders themselves (_same_folder), not their names:
    an output_dir given through a symlink to the checkpoint's folder is that folder, and so is the folder of a
    symlink to the checkpoint (taken for another run's, overwrite_output_dir deleted the run, the resumed
    checkpoint included). A checkpoint-<step> in run_dir that is itself a symlink to another disk is run_dir's
    too."""
    return bool(_names_in(run_dir, resume_path))


def _same_folder(a: str, b: str) -> bool:
    """By the file system's identity of the folders where both exist: a bind mount or an automounter's second path
    to a folder (/net/home/u/runs/a for ~/runs/a) has another real path, and resuming through it with
    overwrite_output_dir=true deleted the run, the resumed checkpoint included."""
    try:
        return os.path.samefile(a, b)
    except OSError:   # one is not there (a new output_dir): by real paths
        return os.path.realpath(a) == os.path.realpath(b)


# a checkpoint set_aside_newer set aside: abandoned-checkpoint-<step>, ".<pid>" added where that name was taken
_SET_ASIDE_RE = re.compile(r"^abandoned-checkpoint-(\d+)(?:\.\d+)?$")


def _checkpoint_step(resume_path: str) -> Optional[tuple[int, bool]]:
    """(step, whether it is a set-aside checkpoint) of checkpoint-<step> or abandoned-checkpoint-<step>, matched on
    the name given, else on the name a symlink to the checkpoint leads to."""
    # realpath of the path as given: normpath would drop a '..' that follows a symlink as text
    for name in (os.path.basename(os.path.normpath(resume_path)), os.path.basename(os.path.realpath(resume_path))):
        m = _CKPT_RE.match(name)
        if m:
            return int(m.group(1)), False
        m = _SET_ASIDE_RE.match(name)
        if m:
            return int(m.group(1)), True
    return None


def set_aside_newer(run_dir: str, resume_path: str) -> list[str]:
    """Resuming from a checkpoint older than the newest in its folder abandons the steps after it:
    rename those newer checkpoints to abandoned-checkpoint-<step> (kept, never resumed or pruned),
    or a later bare --resume would continue the abandoned steps. Returns the new names. Resuming from a
    set-aside checkpoint (going back to the steps an earlier resume abandoned) abandons the checkpoints of
    its step and after: the branch they are on is the one left now."""
    newer = _newer_moves(run_dir, resume_path)
    _keep_left_logs(run_dir, newer)
    _journaled_renames(run_dir, newer)
    return [target for _, target in newer]


def _newer_moves(run_dir: str, resume_path: str) -> list[tuple[str, str]]:
    """(checkpoint, the name it is set aside under) of each checkpoint set_aside_newer sets aside."""
    # through an output_dir that is a symlink to the checkpoint's folder, the newer checkpoints stayed, and a
    # later bare --resume went on from the abandoned steps
    if not _resumes_in_place(run_dir, resume_path):
        return []
    resumed = _checkpoint_step(resume_path)
    if resumed is None:
        return []
    # resuming from abandoned-checkpoint-4 kept checkpoint-5 and -6 of the branch it left: the run saved its own
    # checkpoint-5 over the other's, and a bare --resume after a kill before that went on from the other's 6
    first_left = resumed[0] + (0 if resumed[1] else 1)
    return [(path, _free_set_aside_name(run_dir, os.path.basename(path)))
            for step, path in list_checkpoints(run_dir) if step >= first_left]


def leave_branch(run_dir: str, resume_path: str) -> tuple[list[str], Optional[str]]:
    """set_aside_newer, then take_back, as one journaled step (_journaled_renames): a kill between their renames
    left part of the branch set aside (a bare --resume went on from the left branch's newest checkpoint still named
    checkpoint-<step>) or the resumed checkpoint under its set-aside name (a bare --resume went back to an older
    one). → (the set-aside names, the resumed checkpoint's new path or None)."""
    newer = _newer_moves(run_dir, resume_path)
    back = _take_back_move(run_dir, resume_path, moved_away=[path for path, _ in newer])
    _keep_left_logs(run_dir, newer)
    _journaled_renames(run_dir, newer + ([back] if back else []))
    return [target for _, target in newer], back[1] if back else None


def _keep_left_logs(run_dir: str, newer: list[tuple[str, str]]):
    if newer:
        from r1fast.trainer.metrics import copy_logs

        # the branch's logs as it is left, the steps after its newest checkpoint included: the run's own logs now
        # start over from the resumed checkpoint's (MetricsLogger), and these lines would be lost. Copied before
        # the renames: a kill between them and the copy lost those lines for good (the resume run again finds no
        # newer checkpoint to set aside); a copy holding lines past its checkpoint's step is cut on resume anyway
        try:
            copy_logs(run_dir, newer[-1][0], replace=True)
        except OSError as e:   # a read-only checkpoint (an archive linked back): said, not a failed resume
            import warnings

            warnings.warn(f"r1fast: cannot keep the logs of the steps set aside in {newer[-1][1]} ({e}); those after "
                          f"its step are not kept", stacklevel=3)


def _journaled_renames(run_dir: str, moves: list[tuple[str, str]]):
    """Rename each (path, target) of run_dir in turn, the list first kept in SET_ASIDE_JOURNAL (synced) when there is
    more than one: a kill part way then leaves the journal, from which the next run finishes them."""
    journal = os.path.join(run_dir, SET_ASIDE_JOURNAL)
    if len(moves) > 1:
        from r1fast.trainer.metrics import replacing

        if os.path.islink(journal):   # replacing writes where a link leads: the journal is the run folder's own
            os.remove(journal)
        with replacing(journal) as f:
            json.dump({"r1fast_set_aside": 1, "moves": [[os.path.basename(a), os.path.basename(b)] for a, b in moves]},
                      f)
        fsync_dir(run_dir)
    for path, target in moves:
        os.rename(path, target)
    if len(moves) > 1:
        fsync_dir(run_dir)   # the renames on disk before the journal that lists them goes
        os.remove(journal)


def _finish_set_aside(run_dir: str):
    """The renames a kill left undone of a resume's set-aside (SET_ASIDE_JOURNAL): done, the journal removed. Only
    names of checkpoints and set-aside checkpoints within run_dir are renamed; an unreadable journal is said and
    left."""
    path = os.path.join(run_dir, SET_ASIDE_JOURNAL)
    if not os.path.isfile(path):
        return
    names = re.compile(rf"{_CKPT_RE.pattern}|{_SET_ASIDE_RE.pattern}")
    try:
        with open(path, encoding="utf-8") as f:
            moves = json.load(f)["moves"]
        if not all(isinstance(m, list) and len(m) == 2 and all(isinstance(n, str) and names.match(n) for n in m)
                   for m in moves):
            raise ValueError("its moves are not pairs of checkpoint names")
    except (OSError, ValueError, KeyError, TypeError) as e:
        import warnings

        warnings.warn(f"r1fast: {path}, the renames a resume that set checkpoints aside was killed in, cannot be read "
                      f"({e}); it is left, and the checkpoints as they are", stacklevel=3)
        return
    for name, target in moves:
        source, target = os.path.join(run_dir, name), os.path.join(run_dir, target)
        if os.path.lexists(source) and not os.path.lexists(target):
            os.rename(source, target)
    fsync_dir(run_dir)
    os.remove(path)


def _free_set_aside_name(run_dir: str, name: str) -> str:
    """abandoned-<name>, else abandoned-<name>.<n> for the first n from the process id on that is free: the
    `.<pid>` alone was taken where a process of the same id (a container's restarted job) had set aside that
    step before, the resumed abandoned-checkpoint-<step>.<pid> included, and the rename failed (ENOTEMPTY)."""
    target = os.path.join(run_dir, "abandoned-" + name)
    n = os.getpid()
    while os.path.lexists(target):
        target = os.path.join(run_dir, f"abandoned-{name}.{n}")
        n += 1
    return target


def take_back(run_dir: str, resume_path: str) -> Optional[str]:
    """A resume from a set-aside checkpoint in run_dir (after set_aside_newer) names it checkpoint-<step> again, so
    that the run's later saves prune and a bare --resume goes on from it: kept set aside, a kill before the run's
    next save resumed the other branch's older checkpoint. Returns the new path, or None."""
    move = _take_back_move(run_dir, resume_path)
    if move is None:
        return None
    os.rename(*move)
    return move[1]


def _take_back_move(run_dir: str, resume_path: str, moved_away: list[str] = ()) -> Optional[tuple[str, str]]:
    """(the resumed set-aside checkpoint's path in run_dir, its checkpoint-<step> name), where that name is free once
    `moved_away` are set aside; else None."""
    name = next((n for n in _names_in(run_dir, resume_path) if _SET_ASIDE_RE.match(n)), None)
    if name is None:
        return None
    m = _SET_ASIDE_RE.match(name)
    target = os.path.join(run_dir, f"checkpoint-{m.group(1)}")
    if os.path.lexists(target) and target not in moved_away:
        return None
    return os.path.join(run_dir, name), target


def _names_in(run_dir: str, resume_path: str) -> list[str]:
    """The resumed checkpoint's names in run_dir: the name given where it sits in run_dir, and the name a symlink to
    it leads to where that is in run_dir (`--resume ./best`, best -> run/abandoned-checkpoint-4: taken by its own
    name, 'best', it was never named checkpoint-4 again); none for another folder's checkpoint."""
    names = []
    # the folder the name sits in, the name itself left unresolved; not normpath'd: its lexical '..' after a symlink
    # (link/../run/checkpoint-3) named another folder than the OS opens, which took another run's checkpoint for
    # run_dir's own
    if _same_folder(run_dir, os.path.dirname(resume_path.rstrip(os.sep)) or os.curdir):
        names.append(os.path.basename(os.path.normpath(resume_path)))
    if _same_folder(run_dir, _checkpoint_home(resume_path)):
        names.append(os.path.basename(os.path.realpath(resume_path)))
    return names


class RunFolderInUse(ValueError):
    """A new run (not `--resume`) pointed at a folder holding an earlier run's checkpoints."""

    def __init__(self, run_dir: str, holds: str, renames: tuple[tuple[str, str], ...] = ()):
        # renames: (set-aside path, checkpoint path) of checkpoints a killed save set aside: --resume alone finds
        # none of them (it said "no checkpoint; starting from the first step" and was refused again), and
        # overwrite_output_dir keeps them
        self.run_dir, self.holds, self.renames = run_dir, holds, renames
        if renames:
            moves = " and ".join(f"{a} to {b}" for a, b in renames)
            kept = ", ".join(os.path.basename(a) for a, _ in renames)
            super().__init__(f"{run_dir} holds an earlier run ({holds}); rename {moves}, then continue it with "
                             f"--resume (resume=True), start over with overwrite_output_dir=true (deletes its "
                             f"checkpoints and metrics; keeps {kept}), or give another output_dir")
            return
        super().__init__(f"{run_dir} holds an earlier run ({holds}); continue it with --resume (resume=True), "
                         f"start over with overwrite_output_dir=true (deletes its checkpoints and metrics "
                         f"first), or give another output_dir")


class OutputDirHoldsAnotherRun(ValueError):
    """`--resume PATH` from outside the run's output_dir, which holds another run's checkpoints (resume_into):
    those are not this run's to go on from, so the CLI adds no "continue with --resume"."""


class DamagedCheckpoint(ValueError):
    """A checkpoint that cannot be resumed from (a file missing, truncated or not what it should be); its message
    ends with what to do (_resume_earlier). `bare_resume_continues`: whether a bare --resume goes on once that is
    done (a pipeline's, after moving the damaged stage checkpoint out); a single run's bare --resume takes the
    damaged checkpoint again, so the CLI adds no "continue with --resume" to it."""

    def __init__(self, path: str, problem: str):
        remedy, self.bare_resume_continues = _resume_earlier(path)
        super().__init__(f"{problem}; {remedy}")


class RunFolderBusy(ValueError):
    """Another live process is training in the same run folder."""


LOCK_FILE = ".r1fast.lock"
# run folders (real paths) this process holds: holding one again (nested) is a no-op
_HELD: set[str] = set()


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return 1


@contextlib.contextmanager
def own_run_folder(run_dir: str):
    """Hold `run_dir` for one training run (_locked_run_folder). An error out of the run carries the run's
    folders, innermost first, as `r1fast_run_folders`: the CLI then says how to resume from their checkpoints."""
    with _locked_run_folder(run_dir):
        try:
            yield
        except Exception as e:
            # an exception that refuses attributes (a frozen dataclass's, one with __slots__ or its own
            # __setattr__) goes on untagged: the tag must never replace the run's own error
            with contextlib.suppress(Exception):
                e.r1fast_run_folders = [*getattr(e, "r1fast_run_folders", []), run_dir]
            raise


@contextlib.contextmanager
def _locked_run_folder(run_dir: str):
    """Hold `run_dir` for one training run, so that a second run in the same folder fails at once
    instead of interleaving its metrics and checkpoints with this one's (each would prune the
    other's checkpoints). An advisory flock on `<run_dir>/.r1fast.lock`: the kernel drops it when
    the process dies, so a crash or kill -9 leaves no stale lock. A folder where locks are not
    supported (some network file systems) runs unlocked, with a warning."""
    if _world_size() > 1:
        # torchrun / accelerate launch N copies that would all write this folder and train N
        # unconnected models: say what to use instead
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']}: r1fast's own trainers run in one process on one "
                         f"device; launch them with plain `r1fast ...` or `python ...`, not torchrun or accelerate. "
                         f"For several GPUs, use the TRL drop-in (r1fast.integrations.trl, docs/trl.md) under "
                         f"accelerate")
    os.makedirs(run_dir, exist_ok=True)
    key = os.path.realpath(run_dir)
    if key in _HELD:
        yield
        return
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        yield
        return
    path = os.path.join(run_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)   # less the umask, as open() makes it
    try:  # closing the descriptor at the end drops the flock
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            raise RunFolderBusy(f"{run_dir} is in use by another r1fast run (process {holder}); wait for it to "
                                f"finish, stop it, or give another output_dir") from None
        except OSError as e:
            import warnings

            warnings.warn(f"r1fast: cannot lock {path} ({e}); nothing stops a second run in this folder",
                          stacklevel=3)
        else:
            from r1fast.trainer.metrics import writing

            with writing(path):   # a full disk: found here, naming the run folder, not after the first rollout
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
            _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
    finally:
        os.close(fd)


def start_fresh(run_dir: str, overwrite: bool):
    """Before a new run: an earlier run's checkpoints in `run_dir` would be pruned together with the
    new run's by step number (deleting the new run's own) and `--resume` would pick the newest of
    either. So they are an error, or with `overwrite` deleted first."""
    ckpts = list_checkpoints(run_dir)
    # an earlier run's last checkpoint as its killed save set it aside (never renamed back by r1fast): a new run
    # would replace that run's metrics and take its checkpoint's name, where the user would rename it to resume
    killed = [] if overwrite or not os.path.isdir(run_dir) else \
        sorted(n for n in os.listdir(run_dir) if _may_be_killed_saves_old(run_dir, n))
    if killed:
        # the run's earlier checkpoints too: overwrite_output_dir deletes them, keeping the set-aside ones
        earlier = "; checkpoints " + ", ".join(os.path.basename(p) for _, p in ckpts) if ckpts else ""
        raise RunFolderInUse(run_dir, ", ".join(f"{n}, which may be {n.split('.old-')[0]} set aside by a killed save"
                                                for n in killed) + earlier,
                             tuple((os.path.join(run_dir, n), os.path.join(run_dir, n.split(".old-")[0]))
                                   for n in killed))
    if not ckpts:
        return
    if not overwrite:
        raise RunFolderInUse(run_dir, "checkpoints " + ", ".join(os.path.basename(p) for _, p in ckpts))
    clear_run(run_dir)


def resume_into(run_dir: str, resume_path: str, overwrite: bool):
    """`--resume PATH` from a checkpoint outside `run_dir` trains on into `run_dir`: another run's checkpoints
    there would be pruned, replaced step by step and their metrics log cut, as start_fresh prevents for a new
    run. So they are an error, or with `overwrite` deleted first."""
    ckpts = list_checkpoints(run_dir)
    if _resumes_in_place(run_dir, resume_path) or not ckpts:
        return
    if overwrite:
        clear_run(run_dir)
        return
    names = ", ".join(os.path.basename(p) for _, p in ckpts)
    start = os.path.basename(os.path.normpath(resume_path))
    # its step as set_aside_newer reads it: abandoned-checkpoint-4.<pid> was no step, and the hint below was given
    # for an output_dir whose checkpoints are all older than it
    step = _checkpoint_step(resume_path)
    # steps past the checkpoint's may be this run's own: the same command run before (a restarted job)
    own = (f". If they are this run's own steps since {start} (the same command run before, as a restarted job "
           f"does), --resume alone goes on from {os.path.basename(ckpts[-1][1])}"
           if step is None or ckpts[-1][0] > step[0] else "")
    home = _checkpoint_home(resume_path)
    raise OutputDirHoldsAnotherRun(f"--resume {resume_path}: this run writes to output_dir {run_dir}, which holds "
                                   f"another run ({names}); give output_dir={home} to continue that run in its own "
                                   f"folder, another output_dir, or overwrite_output_dir=true to delete {run_dir}'s "
                                   f"run first{own}")


def clear_run(run_dir: str):
    """Delete what a training run writes into `run_dir`, and nothing else: an output_dir may also
    hold the user's own files."""
    if not os.path.isdir(run_dir):
        return
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if _CKPT_RE.match(name):
            _delete_checkpoint(path)   # a kill part way through leaves no checkpoint that looks complete
        elif _r1fast_old(name) or _SAVE_TEMP_RE.match(name) \
                or name.startswith("abandoned-checkpoint-") or name == "tensorboard":
            remove_folder(path)
        elif name in ("metrics.jsonl", "completions.jsonl", "metrics.jsonl.tmp", "completions.jsonl.tmp") \
                or name == SET_ASIDE_JOURNAL and os.path.isfile(path):   # one remove_save_leftovers could not read
            os.remove(path)
    from r1fast.trainer.metrics import remove_stale_temps

    for name in ("metrics.jsonl", "completions.jsonl"):
        remove_stale_temps(os.path.join(run_dir, name))


def remove_save_leftovers(run_dir: str):
    """Delete the temporary folders of saves that were killed mid-way (they are never resumed), and the
    temporary files of the run's other writes killed mid-way (REPLACED_FILES'). A save
    that replaced checkpoint-N and was killed between its two renames left the old, complete
    checkpoint-N as .checkpoint-N.old-<pid>: it is checkpoint-N again, or deleted if a new one is there. A visible
    checkpoint-N.old-<digits> is never deleted nor renamed (the user's copy, or an earlier r1fast's); where it may be
    what such a kill of an earlier r1fast left (its number a process id, not a date; complete; checkpoint-N gone and no
    checkpoint of its step or newer, set aside or not) a warning names it, to rename back by hand."""
    if not os.path.isdir(run_dir):
        return
    from r1fast.trainer.metrics import remove_stale_temps

    for name in REPLACED_FILES:
        remove_stale_temps(os.path.join(run_dir, name))
    _finish_set_aside(run_dir)   # first: which checkpoints are the run's decides what is put back below
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name)
        if _SAVE_TEMP_RE.match(name):
            remove_folder(path)
        elif name.endswith(".tmp") and name[:-len(".tmp")] in REPLACED_FILES and os.path.isfile(path):
            os.remove(path)   # the name an r1fast before metrics.temp_pattern wrote them under
        elif old := _OLD_CKPT_RE.match(name):
            hidden, step, _ = old.groups()
            base = os.path.join(run_dir, f"checkpoint-{step}")
            # replaced by a new checkpoint-N, or its deletion killed part way (no trainer_state.json)
            if os.path.exists(base) or not os.path.isfile(os.path.join(path, STATE_FILE)):
                if hidden:
                    remove_folder(path)
            elif hidden:
                os.rename(path, base)
            elif _may_be_killed_saves_old(run_dir, name):
                _visible_old_note(path, base)
        elif _CKPT_RE.match(name) and os.path.islink(path):
            _clear_beside_linked(path)


def _may_be_killed_saves_old(run_dir: str, name: str) -> bool:
    """Whether run_dir's visible `name` (checkpoint-N.old-<digits>) may be checkpoint-N as a save of an earlier
    r1fast set it aside before it was killed: its number a process id (not a date), complete, checkpoint-N gone and
    no checkpoint of its step or newer, set aside or not."""
    old = _OLD_CKPT_RE.match(name)
    if not old or old.group(1) or not _pid_numbered(old):
        return False
    step = int(old.group(2))
    return (not os.path.exists(os.path.join(run_dir, f"checkpoint-{step}"))
            and os.path.isfile(os.path.join(run_dir, name, STATE_FILE)) and _newest_step(run_dir) < step)


def _newest_step(run_dir: str) -> int:
    """The newest step of run_dir's checkpoints, the set-aside ones (abandoned-checkpoint-<step>) included; -1 for
    none. A checkpoint-N set aside by a resume from an older one is gone as a killed save leaves it: a dated copy of
    it beside was put back as checkpoint-N, and a bare --resume went on from the branch the resume had left."""
    steps = [s for s, _ in list_checkpoints(run_dir)]
    steps += [int(m.group(1)) for m in map(_SET_ASIDE_RE.match, os.listdir(run_dir)) if m]
    return max(steps, default=-1)


def _clear_beside_linked(link: str):
    """A checkpoint-N that is a symlink (moved to another disk) is saved where it leads (write_target), and a save
    killed there leaves its leftovers beside the target, where the scan of run_dir above never looks: the temporary
    folders (save_checkpoint's ".<target>.tmp-*" and save_pretrained's "..<target>.tmp-*" in it), deleted; and
    the replaced checkpoint as .<target>.old-<pid>, deleted where the new one is in, else (killed between the two
    renames, the link dangling: no checkpoint-N to resume) put back. Only hidden names made from the target's own:
    out of the run folder, a visible <target>.old-<digits> is the user's (a dated copy), never deleted nor renamed
    here; where the link dangles and its number can be a process id (the name an r1fast before the hidden one set the
    replaced one aside under), a warning names it."""
    target = os.path.realpath(link)
    folder, name = os.path.split(target)
    temp = re.compile(rf"^\.\.?{re.escape(name)}\.tmp-")
    old = re.compile(rf"^\.{re.escape(name)}\.old-\d+$")
    earlier_old = re.compile(rf"^{re.escape(name)}\.old-(\d+)$")
    try:
        entries = sorted(os.listdir(folder))
    except OSError:
        return   # the link's disk not mounted: nothing to clear now
    for entry in entries:
        path = os.path.join(folder, entry)
        if temp.match(entry):
            remove_folder(path)
        elif old.match(entry) and os.path.exists(target):
            remove_folder(path)
        elif old.match(entry) and not os.path.exists(target) and os.path.isfile(os.path.join(path, STATE_FILE)):
            with contextlib.suppress(OSError):
                os.rename(path, target)
        elif _pid_numbered(earlier_old.match(entry)) and not os.path.exists(target) \
                and os.path.isfile(os.path.join(path, STATE_FILE)):
            _visible_old_note(path, target)


# -- RNG ---------------------------------------------------------------------------------------
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def _rng_states(tensors: dict[str, torch.Tensor], meta: Any) -> tuple:
    """The Python and numpy states to set, each first set on a generator of its own, so that a damaged
    one is an error naming it before any of the run's generators has changed."""
    if "torch_cpu" not in tensors:
        raise _DamagedState(f"rng.safetensors lacks 'torch_cpu' (it holds {sorted(tensors)})")
    try:
        torch.Generator().set_state(tensors["torch_cpu"])
    except Exception as e:
        raise _DamagedState(f"rng.safetensors: 'torch_cpu' is not a torch generator state ({e})") from e
    if not isinstance(meta, dict):
        raise _DamagedState(f"{STATE_FILE}: rng is {_short(meta)}, not an object")
    try:
        v, state, gauss = meta["python"]
        py = (v, tuple(state), gauss)
        random.Random().setstate(py)
    except Exception as e:
        raise _DamagedState(f"{STATE_FILE}: rng.python is not a Python random state ({type(e).__name__}: {e})") from e
    try:
        name, keys, pos, has_gauss, cached = meta["numpy"]
        np_state = (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)
        np.random.RandomState().set_state(np_state)
    except Exception as e:
        raise _DamagedState(f"{STATE_FILE}: rng.numpy is not a numpy random state ({type(e).__name__}: {e})") from e
    return py, np_state


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]):
    py, np_state = _rng_states(tensors, meta)
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        _set_cuda_rng_states(tensors)
    random.setstate(py)
    np.random.set_state(np_state)


def _set_cuda_rng_states(tensors: dict[str, torch.Tensor]):
    """Each visible CUDA device's generator from the state saved for its index (rng_state's torch_cuda_<index>).
    A checkpoint written where more devices were visible (an 8-GPU node's, resumed on a 1-GPU one or under a
    narrower CUDA_VISIBLE_DEVICES) holds states of devices not here: torch's set_rng_state_all refused the resume
    ("cannot load the RNG state (IndexError: tuple index out of range)"); they are left, as the run trains on one
    device. By the index as a number: sorted as text, torch_cuda_10 came before torch_cuda_2, and from 11 devices
    on each state from the third went to another device than the one it was saved from."""
    count = torch.cuda.device_count()
    for key, state in tensors.items():
        m = re.fullmatch(r"torch_cuda_(\d+)", key)
        if m and int(m.group(1)) < count:
            torch.cuda.set_rng_state(state, int(m.group(1)))


# -- optimizer ---------------------------------------------------------------------------------
_ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{k}"] = v
    groups = [dict(g) for g in sd["param_groups"]]
    for g in groups:
        for k, v in list(g.items()):
            if isinstance(v, tuple):
                g[k] = list(v)
    # What each parameter had: an optimizer.safetensors that lost some or all of it is then an error, not
    # Adam moments silently restarted from zero, while a never-stepped optimizer's empty state still loads.
    state_keys = {str(idx): sorted(st) for idx, st in sd["state"].items()}
    return tensors, [{"param_groups": groups, "scalars": scalars, "state_keys": state_keys}]


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict):
    opt.load_state_dict(_optimizer_state_dict(opt, tensors, meta))


def _optimizer_state_dict(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: Any) -> dict:
    """The state_dict that optimizer.safetensors (`tensors`) and trainer_state.json's 'optimizer' (`meta`)
    make for `opt`, checked against its parameters: torch's load_state_dict takes an empty or partial
    state, or moments of another shape, without a word."""
    from r1fast.trainer.master_weights import MasterWeightAdamW

    where = f"{STATE_FILE}: optimizer"
    groups = meta.get("param_groups") if isinstance(meta, dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                               and all(type(i) is int for i in g["params"]) for g in groups):
        raise _DamagedState(f"{where}.param_groups is {_short(groups)}, not a list of groups each with its "
                            f"'params' indices")
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    n_saved = sum(len(g["params"]) for g in groups)
    if n_params != n_saved:
        raise _BadState(f"{where} has {n_saved} parameters but the model has {n_params}: "
                        f"is this checkpoint from a different model, or from an r1fast before its decoder fused "
                        f"q/k/v and gate/up into one parameter each? (its model weights still load: start a "
                        f"new run from them)")
    sizes = [len(g["params"]) for g in groups]
    if sizes != [len(g["params"]) for g in opt.param_groups]:
        raise _BadState(f"{where}.param_groups hold {sizes} parameters, this optimizer's "
                        f"{[len(g['params']) for g in opt.param_groups]}: weight_decay > 0 puts the 1-D "
                        f"parameters (norm gains, biases) in an undecayed group of their own (older r1fast "
                        f"decayed them with the rest, in one group); resume with the weight_decay the checkpoint "
                        f"was written with, or start a new run from its model weights")
    groups = [dict(g) for g in groups]
    params = {}   # saved index -> (this optimizer's parameter, its saved group)
    for gi, (saved, live) in enumerate(zip(groups, opt.param_groups)):
        for k, v in live.items():
            if k in saved and k != "params":
                _check_like(saved[k], v, f"{where}.param_groups[{gi}].{k}")
            elif k in ("lr", "betas", "eps", "weight_decay"):   # torch would fail at the first step
                raise _BadState(f"{where}.param_groups[{gi}] lacks {k!r}")
        if isinstance(saved.get("betas"), list):
            saved["betas"] = tuple(saved["betas"])
        params.update((i, (p, saved)) for i, p in zip(saved["params"], live["params"]))
    if len(params) != n_saved:
        raise _DamagedState(f"{where}.param_groups name a parameter index twice")

    state: dict[int, dict[str, Any]] = {}

    def add(key: str, value, file: str):
        idx, dot, name = key.partition(".")
        if not (dot and name and idx.isascii() and idx.isdigit() and int(idx) in params):
            raise _DamagedState(f"{file}: {key!r} is not '<parameter index>.<name>' for one of this optimizer's "
                                f"{n_params} parameters")
        state.setdefault(int(idx), {})[name] = value

    for key, v in tensors.items():
        add(key, v, "optimizer.safetensors")
    scalars = meta.get("scalars", {})
    if not isinstance(scalars, dict):
        raise _DamagedState(f"{where}.scalars is {_short(scalars)}, not an object")
    for key, v in scalars.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _DamagedState(f"{where}.scalars: {key!r} is {_short(v)}, not a number")
        add(key, v, f"{where}.scalars")

    listed = meta.get("state_keys")
    if listed is not None:   # None: written before r1fast recorded it, so only each entry is checked below
        if not isinstance(listed, dict) or not all(isinstance(v, list) for v in listed.values()):
            raise _DamagedState(f"{where}.state_keys is {_short(listed)}, not an object of name lists")
        want = {f"{i}.{n}" for i, names in listed.items() for n in names}
        have = {f"{i}.{n}" for i, s in state.items() for n in s}
        if want - have:
            raise _DamagedState(f"optimizer.safetensors lacks {_some(want - have)}, which {STATE_FILE}'s "
                                f"optimizer.state_keys lists (the optimizer state is incomplete)")
        if have - want:
            raise _DamagedState(f"optimizer.safetensors holds {_some(have - want)}, which {STATE_FILE}'s "
                                f"optimizer.state_keys does not list")

    if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
        return {"state": state, "param_groups": groups}
    keep_master = isinstance(opt, MasterWeightAdamW)
    for i, s in state.items():
        p, group = params[i]
        moments = set(s) - {"master"}   # "master": MasterWeightAdamW's fp32 copy, apart from Adam's own
        need = set(_ADAM_STATE) | ({"max_exp_avg_sq"} if group.get("amsgrad") else set())
        if moments and moments != need:
            raise _BadState(f"optimizer.safetensors: parameter {i} has state {sorted(moments)}; AdamW keeps "
                            f"{sorted(need)}")
        for name, v in s.items():
            if not isinstance(v, torch.Tensor):
                continue   # a scalar step (older torch), checked above
            key = f"'{i}.{name}'"
            if not v.is_floating_point():
                raise _DamagedState(f"optimizer.safetensors: {key} is {v.dtype}, not a floating-point tensor")
            if name == "step":
                if v.dim() != 0:
                    raise _DamagedState(f"optimizer.safetensors: {key} has shape {tuple(v.shape)}, not a single count")
            elif v.shape != p.shape:
                raise _BadState(f"optimizer.safetensors: {key} has shape {tuple(v.shape)}, parameter {i} is "
                                f"{tuple(p.shape)}")
            elif name == "master" and v.dtype != torch.float32:
                raise _DamagedState(f"optimizer.safetensors: {key} is {v.dtype}, an fp32 master copy is torch.float32")
        if "master" in s and not keep_master:
            del s["master"]   # fp32 master weights of a run that had them: this optimizer keeps none
    return {"state": {i: s for i, s in state.items() if s}, "param_groups": groups}


# -- save / load -------------------------------------------------------------------------------
def save_checkpoint(run_dir: str, step: int, *, model, optimizer=None, scheduler=None, tokenizer=None,
                    state: Optional[dict] = None, keep: Optional[int] = 2,
                    write_extra: Optional[Callable[[str], None]] = None) -> str:
    """Write checkpoint-<step> atomically and delete all but it and the newest `keep` - 1 others
    (keep=None: delete none). `write_extra(folder)` writes a caller's own files (GRPO's
    reference.safetensors) into the checkpoint before it is renamed into place."""
    os.makedirs(run_dir, exist_ok=True)
    named = os.path.join(run_dir, f"checkpoint-{step}")
    # a checkpoint-<step> that is a symlink (moved to another disk) is written where it leads, as save_pretrained
    # writes through a link: renamed over, the link became a folder on the run's disk
    final = write_target(named)
    # beside a link's target, out of the run folder, another run's saves may write too: the temporary folder is
    # named after that target, which is this run's alone, so that remove_save_leftovers can tell its own there
    prefix = f".tmp-checkpoint-{step}-" if final == named else f".{os.path.basename(final)}.tmp-"
    tmp = None
    try:
        # in the try: a full disk or a file system remounted read-only mid-run failed here with an error naming only
        # the temporary folder's random name ('runs/a/.tmp-checkpoint-40-k2j3ab'), not the checkpoint
        tmp = tempfile.mkdtemp(prefix=prefix, dir=os.path.dirname(final))
        apply_umask(tmp)   # mkdtemp's folder is private (0700)
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if write_extra is not None:
            write_extra(tmp)
        from r1fast.trainer.metrics import copy_logs

        copy_logs(run_dir, tmp)   # the history of the steps up to this one, which resuming it starts the logs from
        full_state = dict(state or {})
        full_state["format"] = CHECKPOINT_FORMAT
        full_state["global_step"] = step
        if optimizer is not None:
            tensors, (meta,) = optimizer_state(optimizer)
            save_safetensors(tensors, os.path.join(tmp, "optimizer.safetensors"))
            full_state["optimizer"] = meta
        if scheduler is not None:
            sd = scheduler.state_dict()
            full_state["scheduler"] = {k: v for k, v in sd.items() if k != "lr_lambdas"}
        rng_tensors, rng_meta = rng_state()
        save_safetensors(rng_tensors, os.path.join(tmp, "rng.safetensors"))
        full_state["rng"] = rng_meta
        _write_json(os.path.join(tmp, STATE_FILE), full_state)
        # on disk before the rename makes the checkpoint the newest (and pruning deletes older ones): after a
        # power loss or kernel crash, an optimizer.safetensors still in the page cache could read back empty
        fsync_files(tmp)
        old = None
        if os.path.exists(final):
            # a hidden name: "<name>.old-<digits>" may be the user's own copy (checkpoint-3.old-20261129), in the run
            # folder or beside a link's target, which remove_save_leftovers deleted as this run's replaced checkpoint
            old = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.old-{os.getpid()}")
            os.rename(final, old)
        os.rename(tmp, final)
        # the renames on disk before the replaced checkpoint's deletion starts: a power loss that kept some of its
        # unlinks and not the renames left checkpoint-N as the old folder with files missing
        fsync_dir(os.path.dirname(final))
        if old is not None:
            remove_folder(old)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, SafetensorError)):
            # a full disk: safetensors' own SafetensorError was a traceback from the CLI, and an OSError
            # from write() names no file
            raise OSError(f"cannot write checkpoint {final}: {e}") from e
        raise
    # the checkpoint just written is kept even where higher step numbers sit beside it (a run resumed
    # from an older checkpoint): deleting it would leave `--resume` another run's state
    others = [path for _, path in list_checkpoints(run_dir) if path != named]
    for path in others[:max(0, len(others) - (keep - 1))] if keep is not None else []:
        _delete_checkpoint(path)
    return named


def _delete_checkpoint(path: str):
    """Delete a checkpoint folder, first renamed to a save's temporary name: rmtree deletes its files one by one,
    and a kill part way left checkpoint-N with trainer_state.json but no optimizer.safetensors (or weights),
    which list_checkpoints takes as complete. The renamed folder is what remove_save_leftovers clears."""
    folder, name = os.path.split(os.path.normpath(path))
    doomed = os.path.join(folder, f".tmp-{name}-deleting-{os.getpid()}")
    remove_folder(doomed)   # the same name left by a killed earlier deletion
    try:
        os.rename(path, doomed)
    except OSError:
        doomed = path   # not renamable (gone already, a read-only folder): deleted where it is, as before
    else:
        # the rename on disk before the deletion starts: after a power loss that kept some of rmtree's unlinks and
        # not the rename, checkpoint-N was back with files missing
        fsync_dir(folder)
    remove_folder(doomed)


def load_checkpoint(path: str, *, model, optimizer=None, scheduler=None,
                    check: Optional[Callable[[dict], None]] = None) -> dict:
    """Load weights (in place), optimizer, scheduler and RNG from `path`; return the trainer state.

    `check(state)` raises ValueError for a trainer state its caller cannot use. The state is checked
    before anything is loaded, and every error is a ValueError naming the checkpoint and its file."""
    state_path = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_path):
        raise ValueError(f"{path!r} is not a checkpoint (no {STATE_FILE})")
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedCheckpoint(path, f"checkpoint {path!r}: {STATE_FILE} is not valid JSON ({e})") from None
    _check_same_model(path, model)
    opt_tensors = _read_tensors(path, "optimizer.safetensors") if optimizer is not None else None
    rng_tensors = _read_tensors(path, "rng.safetensors")
    with _naming(path, STATE_FILE):
        sched_sd = _check_state(path, state, scheduler)
        if check is not None:
            try:
                check(state)
            except ValueError as e:
                raise _BadState(f"{STATE_FILE}: {e}") from None
        if optimizer is not None:
            if "optimizer" not in state:
                raise _DamagedState(f"{STATE_FILE} has no optimizer state")
            opt_sd = _optimizer_state_dict(optimizer, opt_tensors, state["optimizer"])
        if "rng" not in state:
            raise _DamagedState(f"{STATE_FILE} has no RNG state")
        _rng_states(rng_tensors, state["rng"])
    load_weights(model, path)
    if optimizer is not None:
        with _naming(path, f"the optimizer state (optimizer.safetensors, {STATE_FILE} 'optimizer')"):
            optimizer.load_state_dict(opt_sd)
    if sched_sd is not None:
        with _naming(path, f"{STATE_FILE} 'scheduler'"):
            scheduler.load_state_dict(sched_sd)
    with _naming(path, f"the RNG state (rng.safetensors, {STATE_FILE} 'rng')"):
        set_rng_state(rng_tensors, state["rng"])
    return state


# the ModelConfig fields that give a model's parameters their shapes (None in num_key_value_heads and head_dim: the
# value they default to)
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim")


def _shape_of(config) -> dict[str, Any]:
    shape = {name: getattr(config, name, None) for name in _SHAPE_FIELDS}
    shape["num_key_value_heads"] = shape["num_key_value_heads"] or shape["num_attention_heads"]
    if not shape["head_dim"] and shape["hidden_size"] and shape["num_attention_heads"]:
        shape["head_dim"] = shape["hidden_size"] // shape["num_attention_heads"]
    return shape


def _check_same_model(path: str, model):
    """The checkpoint's config.json gives the run's model's shapes: a checkpoint of another model (resumed with
    another model_name_or_path) was refused by its first mismatched tensor ("'0.exp_avg' has shape (106, 32),
    parameter 0 is (106, 48)"), or by its parameter count as a checkpoint of an r1fast before fused q/k/v. A
    config.json that is missing or unreadable is left to the weights' loading to name."""
    from r1fast.models import ModelConfig

    live = getattr(model, "config", None)
    if not isinstance(live, ModelConfig) or not os.path.isfile(os.path.join(path, "config.json")):
        return
    try:
        saved = ModelConfig.from_hf_config(path)
    except Exception:   # its own error, with the file's name, comes from load_weights
        return
    mine, theirs = _shape_of(live), _shape_of(saved)
    differ = [f"{name} {theirs[name]} (the model's: {mine[name]})" for name in _SHAPE_FIELDS
              if theirs[name] != mine[name]]
    if differ:
        raise ValueError(f"checkpoint {path!r} is of another model than this run's: its config.json has "
                         f"{', '.join(differ)}; resume with the model it was trained from (model_name_or_path), or "
                         f"start a new run from its weights (model_name_or_path=<the checkpoint folder>)")


def _read_tensors(path: str, name: str) -> dict[str, torch.Tensor]:
    """A checkpoint's safetensors file, or a ValueError naming it (safetensors raises its own
    SafetensorError, not a ValueError, for a truncated file)."""
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise DamagedCheckpoint(path, f"checkpoint {path!r} lacks {name}")
    try:
        return load_file(file)
    except Exception as e:
        raise DamagedCheckpoint(path, f"checkpoint {path!r}: cannot read {name} (truncated or damaged?): {e}") from None


def _resume_earlier(path: str) -> tuple[str, bool]:
    """What to do about a damaged or incomplete checkpoint: resume from the newest one before it in its folder,
    named (a bare --resume takes the damaged one again, and "resume from an earlier checkpoint" left the user to
    find the flag's form and the folder's other checkpoints), or, where there is none, that there is none.
    → (those words, whether a bare --resume goes on after them)."""
    step = _checkpoint_step(path)
    folder = os.path.dirname(os.path.normpath(path))
    earlier = [p for s, p in list_checkpoints(folder) if step is not None and s < step[0]]
    if not earlier:
        return "there is no earlier checkpoint beside it to resume from", False
    if os.path.isfile(os.path.join(os.path.dirname(folder), "pipeline_state.json")):
        # a pipeline's stage: the pipeline's --resume takes its run folder, not a checkpoint
        return (f"resume from an earlier checkpoint: move {path} out of the run folder and --resume again, which "
                f"continues the stage from {earlier[-1]}", True)
    return f"resume from an earlier checkpoint: --resume {earlier[-1]} (the steps after it are set aside)", False


def load_weights(model, path: str):
    """Copy a Hugging Face safetensors checkpoint's tensors into `model`'s parameters, in place
    (so a rollout engine holding references to them sees the new values)."""
    from r1fast.models import from_pretrained
    from r1fast.models.checkpoint import INDEX_NAME, SINGLE_NAME

    # Checked here: from_pretrained falls back to any *.safetensors in the folder, and a training
    # checkpoint also holds optimizer.safetensors and rng.safetensors.
    if not any(os.path.isfile(os.path.join(path, f)) for f in (SINGLE_NAME, INDEX_NAME)):
        raise DamagedCheckpoint(path, f"checkpoint {path!r} lacks the model weights ({SINGLE_NAME} or {INDEX_NAME})")
    try:
        loaded = from_pretrained(path, dtype=model.dtype, device="cpu")
    except (ValueError, OSError) as e:   # a damaged weights file or config.json: the loader's error names it
        raise DamagedCheckpoint(path, f"checkpoint {path!r}: {e}") from None
    src = dict(loaded.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in src:
                raise ValueError(f"checkpoint {path!r} lacks parameter {name!r}")
            if src[name].shape != p.shape:
                raise ValueError(f"checkpoint {path!r}: {name} has shape {tuple(src[name].shape)}, "
                                 f"the model expects {tuple(p.shape)}")
            p.copy_(src[name].to(p.device))


class _BadState(ValueError):
    """A checkpoint's content that cannot be this run's state; the message names the file and the problem
    (load_checkpoint puts the checkpoint's path before it)."""


class _DamagedState(_BadState):
    """Content r1fast never writes (a state that is not one, a value of the wrong kind, files that disagree): the
    checkpoint is damaged or incomplete, so load_checkpoint makes it a DamagedCheckpoint, which names the earlier
    checkpoint to resume from. A plain _BadState is a checkpoint of another setup (model, optimizer, weight_decay,
    r1fast version, folder name), a value that may be either (a param_groups or scheduler entry of another kind or
    length than this run's), or one its caller refused: an earlier checkpoint of the same run would be refused alike,
    so its message says what to do instead."""


@contextlib.contextmanager
def _naming(path: str, what: str):
    """Errors inside become a ValueError naming the checkpoint and `what`: torch, random and numpy fail
    on a damaged state with errors that name neither."""
    try:
        yield
    except _DamagedState as e:
        raise DamagedCheckpoint(path, f"checkpoint {path!r}: {e}") from e.__cause__
    except _BadState as e:
        raise ValueError(f"checkpoint {path!r}: {e}") from e.__cause__
    except Exception as e:
        raise ValueError(f"checkpoint {path!r}: cannot load {what} ({type(e).__name__}: {e})") from e


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:60] + "..."


def _some(keys) -> str:
    keys = sorted(keys)
    return ", ".join(map(repr, keys[:4])) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def _check_like(value: Any, like: Any, where: str):
    """`value`, read from JSON, must be of the kind the live optimizer or scheduler holds there (a
    number for a number, a list as long as its list...): torch fails deep inside otherwise."""
    if like is None or isinstance(like, bool):
        ok = value is None or isinstance(value, bool)
    elif isinstance(like, (int, float)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(like, str):
        ok = isinstance(value, str)
    elif isinstance(like, (list, tuple)):
        ok = isinstance(value, (list, tuple)) and len(value) == len(like)
        for i, (v, l) in enumerate(zip(value, like) if ok else ()):
            _check_like(v, l, f"{where}[{i}]")
    else:
        ok = True
    if not ok:
        raise _BadState(f"{where} is {_short(value)}, where this run has {_short(like)}")


def _check_state(path: str, state: Any, scheduler) -> Optional[dict]:
    """The parts of trainer_state.json that every checkpoint has; returns the scheduler's state_dict to load."""
    fmt = state.get("format", 1) if isinstance(state, dict) else 1
    if type(fmt) is not int or fmt < 1:
        raise _DamagedState(f"{STATE_FILE}: format is {_short(fmt)}, not a format r1fast wrote")
    if fmt > CHECKPOINT_FORMAT:
        raise _BadState(f"{STATE_FILE} has format {fmt}, written by a newer r1fast than this one (which reads up to "
                        f"{CHECKPOINT_FORMAT}): resume with that r1fast, or start a new run from its model weights "
                        f"(model_name_or_path=<the checkpoint folder>)")
    step = state.get("global_step") if isinstance(state, dict) else None
    if type(step) is not int or step < 0:
        raise _DamagedState(f"{STATE_FILE}: global_step is {_short(step)}, not a step count (a whole number >= 0)")
    m = _CKPT_RE.match(os.path.basename(os.path.normpath(path)).removeprefix("abandoned-"))
    if m and int(m.group(1)) != step:   # save_checkpoint names the folder after the step
        raise _BadState(f"{STATE_FILE}: global_step is {step}, but the checkpoint was saved as "
                        f"checkpoint-{m.group(1)}")
    if scheduler is None or "scheduler" not in state:
        return None
    saved = state["scheduler"]
    if not isinstance(saved, dict):
        raise _DamagedState(f"{STATE_FILE}: scheduler is {_short(saved)}, not an object")
    sd = scheduler.state_dict()
    for k, v in saved.items():
        if k in sd and k != "lr_lambdas":
            _check_like(v, sd[k], f"{STATE_FILE}: scheduler.{k}")
    for k in ("last_epoch", "_step_count"):
        if k in saved and (type(saved[k]) is not int or saved[k] < 0):
            raise _DamagedState(f"{STATE_FILE}: scheduler.{k} is {_short(saved[k])}, not a whole number >= 0")
    sd.update((k, v) for k, v in saved.items() if k != "lr_lambdas")
    return sd


def _write_json(path: str, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        fsync_file(f.fileno())

