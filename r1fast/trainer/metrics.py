"""Run metrics: one JSON object per line in <run>/metrics.jsonl, sample completions in
<run>/completions.jsonl, and TensorBoard / W&B when installed and asked for."""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import tempfile
from typing import Any, Optional

from r1fast._umask import apply_rewrite_mode, fsync_dir, fsync_file

# Keys that change between otherwise identical runs (wall clock); resume comparisons skip them.
TIMING_KEYS = ("time_s", "tokens_per_s", "step_time_s", "elapsed_s")
# The run's logs, of which every checkpoint keeps a copy (copy_logs): a resume starts them from the resumed
# checkpoint's own history, whichever branch of the run it is on
RUN_LOGS = ("metrics.jsonl", "completions.jsonl")
# how the log writes an infinite value (JSON has none; json.dumps wrote `Infinity`, which is no JSON), its sign kept
LOGGED_INFINITY = 1e308


class MetricsLogger:
    def __init__(self, run_dir: str, report_to: tuple[str, ...] | list[str] = (), *, resume_step: Optional[int] = None,
                 resumed_from: Optional[str] = None, run_name: Optional[str] = None, config: Optional[dict] = None):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.completions_path = os.path.join(run_dir, "completions.jsonl")
        # the first step TensorBoard drops (and the rows logged to it again from there): see _branch_point
        purge_step, replay = 0, []
        if resume_step is not None:
            # Lines written after the checkpoint belong to a future that resuming replaces; the lines up to it are
            # the checkpoint's own (resumed_from's copies), which differ from the run's file where the run goes
            # back to steps an earlier resume set aside
            history = resumed_from if resumed_from and os.path.isfile(os.path.join(resumed_from, RUN_LOGS[0])) else None
            if "tensorboard" in report_to:   # read before the run's log is cut below
                purge_step, replay = _branch_point(self.path, os.path.join(history, RUN_LOGS[0]) if history else None,
                                                   resume_step)
            for path in (self.path, self.completions_path):
                _truncate_after(path, resume_step, os.path.join(history, os.path.basename(path)) if history else path)
        else:
            for p in (self.path, self.completions_path):
                if os.path.exists(p):
                    os.remove(p)
        self._tb = None
        self._wandb = None
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("r1fast: report_to tensorboard asked for but tensorboard is not installed; skipping")
            else:
                # Events after the checkpoint (or, for a fresh run, a killed earlier run's) are purged,
                # as metrics.jsonl's lines are: TensorBoard drops the logged steps >= purge_step. From a checkpoint
                # of a branch an earlier resume set aside, the steps where its history parts from the run's too,
                # logged again from the checkpoint's history: TensorBoard showed the left branch's points there
                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=purge_step)
                for row in replay:
                    self._tb_scalars(row)
                self._tb.flush()
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                print("r1fast: report_to wandb asked for but wandb is not installed; skipping")
            else:
                self._wandb = self._start_wandb(wandb, run_name, config, run_dir)

    def _start_wandb(self, wandb, run_name, config, run_dir):
        # wandb.init fails on setup (no API key, no network): the TensorBoard writer opened above, its
        # event file and flush thread, would stay open with no logger left to close it
        try:
            return wandb.init(name=run_name, config=config, dir=run_dir, resume="allow")
        except Exception as e:
            self.close()
            from r1fast.trainer.config import ConfigError

            raise ConfigError(f"report_to wandb: wandb.init failed ({type(e).__name__}: {e}); log in with "
                              f"`wandb login`, set WANDB_MODE=offline, or drop wandb from report_to") from e

    def log(self, step: int, stage: str, metrics: dict[str, Any]):
        row = {"step": step, "stage": stage, **{k: plain_number(v) for k, v in metrics.items()}}
        with writing(self.path), open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        numeric = _numeric(row)
        if self._tb is not None:
            self._tb_scalars(row)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({f"{stage}/{k}": v for k, v in numeric.items()}, step=step)

    def _tb_scalars(self, row: dict):
        for k, v in _numeric(row).items():
            self._tb.add_scalar(f"{row['stage']}/{k}", v, row["step"])

    def log_completions(self, step: int, stage: str, samples: list[dict]):
        with writing(self.completions_path), open(self.completions_path, "a", encoding="utf-8") as f:
            for s in samples:
                # a row no reward function scored has total NaN, which json.dumps writes as invalid JSON
                f.write(json.dumps({"step": step, "stage": stage, **{k: plain_number(v) for k, v in s.items()}}) + "\n")

    def close(self):
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _numeric(row: dict) -> dict:
    """A metrics row's values TensorBoard and W&B take: its numbers, but its step, an infinity as itself. The row
    holds it as the log's +-LOGGED_INFINITY (plain_number), which W&B kept as 1e308; both take inf (TensorBoard
    draws it at the plot's edge, W&B writes it as Infinity). A NaN is the log's null: no value, left out, as
    transformers' TensorBoard and W&B callbacks leave out TRL's None."""
    return {k: unlogged_number(v) for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}


def _branch_point(run_log: str, history: Optional[str], resume_step: int) -> tuple[int, list[dict]]:
    """(TensorBoard's purge step, the rows to log to it again) for a resume at `resume_step` whose log starts over
    from `history` (the checkpoint's metrics.jsonl; None: the run's own). The purge step is the checkpoint's next
    step, or the first step where the run's log as it is (the branch left, which TensorBoard shows) and `history`
    differ, if earlier: W&B keeps the left branch's points there (its history cannot be rewritten)."""
    if history is None:
        return resume_step + 1, []
    shown, kept = _lines_by_step(run_log, resume_step), _lines_by_step(history, resume_step)
    differ = [step for step in set(shown) | set(kept) if shown.get(step) != kept.get(step)]
    first = min(differ, default=resume_step + 1)
    replay = []
    for step in sorted(s for s in kept if s >= first):
        for line in kept[step]:
            row = json.loads(line)
            if isinstance(row.get("stage"), str):
                replay.append(row)
    return first, replay


def _lines_by_step(path: str, up_to: int) -> dict[int, list[str]]:
    """The whole JSON-object lines of a metrics.jsonl with a numeric step <= `up_to`, by step; none for a file
    that is not there or cannot be read (_truncate_after names its damage)."""
    out: dict[int, list[str]] = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError):
        return out
    for line in lines:
        try:
            row = json.loads(line) if line.endswith("\n") else None
        except ValueError:
            continue
        step = row.get("step") if isinstance(row, dict) else None
        if isinstance(step, (int, float)) and not isinstance(step, bool) and step <= up_to:
            out.setdefault(int(step), []).append(line)
    return out


def read_metrics(run_dir: str, being_written: bool = False) -> list[dict]:
    """The records of a run's metrics.jsonl; being_written: the run may be appending its last line."""
    path = os.path.join(run_dir, "metrics.jsonl") if os.path.isdir(run_dir) else run_dir
    if not os.path.isfile(path):
        raise ValueError(f"no metrics.jsonl in {run_dir!r}")
    from r1fast.data.loading import read_json_objects

    lines: list[int] = []
    rows = read_json_objects(path, path, being_written, lines)
    for n, (row, line) in enumerate(zip(rows, lines), 1):
        if not is_step(row.get("step")):
            # true, NaN and Infinity passed as steps: r1fast plot drew a point at x = NaN, or at 1
            raise ValueError(f"{path}: record {n} has no numeric 'step' (line {line}: {row.get('step')!r:.40}; a "
                             f"step is a finite number)")
    return rows


def is_step(step) -> bool:
    """Whether a metrics line's `step` is one: a finite number, not a bool (JSON's true is no step)."""
    if isinstance(step, bool) or not isinstance(step, (int, float)):
        return False
    return abs(step) < LOGGED_INFINITY   # NaN and inf too; an int past float's range was an OverflowError in the plot


@contextlib.contextmanager
def writing(path: str):
    """A failed write names its file: an OSError from write() (a full disk, a file size limit) has no
    file name, so the CLI's one-line error said only "[Errno 28] No space left on device"."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        if e.errno is None:
            raise OSError(f"{path}: {e}") from e
        raise OSError(e.errno, e.strerror, path) from e


@contextlib.contextmanager
def replacing(path: str, binary: bool = False):
    """A text (or `binary`) file open on a temporary file beside `path` (temp_pattern), synced and renamed over
    `path` once written, and the folder synced: a crash or a failed write (named by `writing`) leaves `path` as it
    was, and once this returns the new file is what a power loss leaves. The temporary name is this process's own,
    so a user's `<path>.tmp` is never overwritten and renamed away, and two writers of one path never share one; a
    temporary file a killed writer of `path` left is deleted here (remove_stale_temps). `path` keeps its mode, as
    open(path, "w") keeps it, and a symlink stays one."""
    refuse_special_file(path)   # through a link too: /dev/stdout on a pipe leads to no path realpath can name
    if os.path.islink(path):   # written where it leads, as open(path, "w") writes (models.checkpoint.write_target)
        path = os.path.realpath(path)
    remove_stale_temps(path)
    folder, name = os.path.split(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=folder or ".")
    except OSError as e:   # it named the temporary file's random name ('nodir/.x.png.tmp-4504-b9i8pak6'), not `path`
        raise OSError(e.errno, e.strerror, path) from e
    _WRITING.add(os.path.abspath(tmp))
    try:
        with writing(path):
            try:
                file = open(fd, "wb") if binary else open(fd, "w", encoding="utf-8")
            except BaseException:
                os.close(fd)
                raise
            with file as f:
                apply_rewrite_mode(tmp, path)
                yield f
                f.flush()
                fsync_file(f.fileno())   # or a crash soon after the rename can leave an empty file
        os.replace(tmp, path)
        # the rename itself on disk before this returns: a caller's next step (a journal removed, a progress file
        # deleted, a checkpoint pruned) that reached the disk first left, after a power loss, the old file beside it
        fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    finally:
        _WRITING.discard(os.path.abspath(tmp))


def refuse_special_file(path: str):
    """A device, pipe or socket at `path` (/dev/null, a named pipe) is refused: the temporary file renamed over
    it replaced it with a regular file (as root, /dev/null itself, for every process of the machine)."""
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        raise OSError(errno.EINVAL, "not a regular file (a device, pipe or socket), which writing it by renaming a "
                                    "new file over it would replace; name a file to write", path)


# the temporary files this process is writing now (replacing): one of this process id not among them is a
# killed earlier process's (process ids repeat, in a container's restarted job most of all)
_WRITING: set[str] = set()


def temp_pattern(name: str) -> re.Pattern:
    """The names replacing() gives the temporary files of a file named `name`; the group is the writer's
    process id (mkstemp's random part is 8 of [a-z0-9_])."""
    return re.compile(rf"^\.{re.escape(name)}\.tmp-(\d+)-[a-z0-9_]{{8}}$")


def remove_stale_temps(path: str):
    """Delete the temporary files of `path` (temp_pattern) left by writers that are gone (a SIGKILL, a power
    loss mid-write); those of a live writer, and every file of another name, are left."""
    folder, name = os.path.split(path)
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return   # no folder yet: nothing left in it
    pattern = temp_pattern(name)
    for entry in names:
        m = pattern.match(entry)
        tmp = os.path.join(folder, entry)
        if m and _writer_gone(int(m.group(1)), tmp) and os.path.isfile(tmp) and not os.path.islink(tmp):
            with contextlib.suppress(OSError):
                os.remove(tmp)


def _writer_gone(pid: int, tmp: str) -> bool:
    if pid == os.getpid():
        return os.path.abspath(tmp) not in _WRITING
    if os.name != "posix":
        return False   # no signal 0 to ask with (os.kill would end the process): kept
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False   # another user's live process
    except OverflowError:
        return False   # past any pid: a name like ours, not a temp of ours
    return False


def plain_number(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (LOGGED_INFINITY if v > 0 else -LOGGED_INFINITY)
    return v


def unlogged_number(v):
    """plain_number's inverse for an infinity: the log's +-LOGGED_INFINITY read back as +-inf."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) >= LOGGED_INFINITY:
        return math.copysign(math.inf, v)
    return v


def _short_line(line: str, limit: int = 40) -> str:
    r = repr(line.rstrip("\n"))
    return r if len(r) <= limit else r[:limit] + "..."


def copy_logs(run_dir: str, folder: str, replace: bool = False):
    """Copy the run's logs (RUN_LOGS) into `folder`, a checkpoint: the history of the steps up to it. metrics.jsonl
    is copied before the run has one too, as an empty file: it says that the checkpoint holds its history, so that a
    resume from it takes none of the run's files (another branch's); a log it lacks is one its steps never wrote (SFT's
    completions). `replace`: the folder holds copies already (a checkpoint set aside), replaced whole or not at all;
    else it is a new checkpoint's temporary folder, synced as a whole."""
    for name in RUN_LOGS:
        source, target = os.path.join(run_dir, name), os.path.join(folder, name)
        if name != RUN_LOGS[0] and not os.path.isfile(source):
            continue
        with replacing(target, binary=True) if replace else open(target, "wb") as f:
            if os.path.isfile(source):
                with open(source, "rb") as log:
                    shutil.copyfileobj(log, f)


def _truncate_after(path: str, step: int, source: Optional[str] = None):
    """Write `path` as the lines of `source` (by default `path` itself; none where it is not there) up to `step`."""
    source = source or path
    try:
        with open(source, encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        lines = []
    except UnicodeDecodeError as e:
        raise ValueError(f"{source}: not UTF-8 text ({e}); remove the damaged lines (or the file) to resume") from None
    if lines and not lines[-1].endswith("\n"):
        lines.pop()   # cut short by a crash mid-write; its step is after the checkpoint anyway
    keep = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:   # a damaged line was json's bare "Expecting value: line 1 column 1 (char 0)", naming no file
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            raise ValueError(f"{source} line {n}: not a JSON object ({_short_line(line)}); remove that line (or "
                             f"the file) to resume")
        line_step = row.get("step", 0)
        if not is_step(line_step):   # a string step was a TypeError traceback ("'<=' not supported")
            raise ValueError(f"{source} line {n}: 'step' is {line_step!r:.40}, not a number; remove that line (or "
                             f"the file) to resume")
        if line_step <= step:
            keep.append(line)
    if not keep and not os.path.exists(path):
        return   # a log this run never wrote (SFT's completions.jsonl) is not made
    with replacing(path) as f:
        f.writelines(keep)


def k_sample_names(rows: list[dict], prefix: str = "") -> list[str]:
    """The pass@k and cons@k names among rows' keys (`prefix`: "eval/" for logged metrics, "" for a
    summary's stage rows), by k then pass before cons (k is in the name: the samples per prompt)."""
    # k written out in digits: another name of that form (a hand-made file's eval/pass@k) stopped r1fast plot with
    # "invalid literal for int() with base 10: 'k'"
    pattern = re.compile(rf"{re.escape(prefix)}(?:pass|cons)@[0-9]+")
    names = {name for r in rows for name in r if pattern.fullmatch(name)}
    return sorted(names, key=lambda name: (int(name.split("@")[1]), name.startswith(prefix + "cons@")))
