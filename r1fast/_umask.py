"""The permissions a plain open() (a folder: os.mkdir()) gives under the user's umask, for what r1fast
writes another way: safetensors (0.8) writes a private 0600 temp file and renames it, and
tempfile.mkdtemp makes a 0700 folder. On a shared cluster that hid a run's checkpoints from colleagues
whom the user's umask lets read them. And fsync_dir, which every such write ends with, here where
r1fast.trainer.metrics and r1fast.models.checkpoint both reach it without the other's imports (torch)."""
from __future__ import annotations

import errno
import os


def current_umask() -> int:
    # read where the kernel shows it (Linux >= 4.7): os.umask() is read only by setting it, and for that
    # moment the files other threads create get the stand-in mask
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str) -> None:
    """Give `path` the mode a plain open() (a folder: os.mkdir()) would have created it with."""
    full = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, full & ~current_umask())


def save_safetensors(tensors, path: str, metadata: dict | None = None) -> None:
    """Write `tensors` (name -> tensor, or an nn.Module: its state dict less the duplicate names of tied
    weights) to the safetensors file `path`, with the mode the umask gives a new file rather than
    safetensors' 0600. Not atomic by itself: every caller writes inside a temporary folder that it renames
    into place once complete, so a killed save never leaves a half-written checkpoint."""
    import torch
    from safetensors.torch import save_file, save_model

    if isinstance(tensors, torch.nn.Module):
        save_model(tensors, path, metadata=metadata)
    else:
        save_file(tensors, path, metadata=metadata)
    apply_umask(path)


def apply_rewrite_mode(tmp: str, path: str) -> None:
    """Give `tmp`, written to be renamed over `path`, the mode open(path, "w") would leave: an existing
    `path`'s own (a file the user opened to the group stays so), else the umask's for a new file (not the
    mode of a .tmp left by a killed write)."""
    try:
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o666 & ~current_umask()
    os.chmod(tmp, mode)


# what some FUSE and overlay file systems answer a file's fsync with: they cannot, and nothing is wrong
FSYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})


def fsync_file(fd: int) -> None:
    """os.fsync(fd), where the file system can; its other errors (EIO, a full disk) raise as they are."""
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in FSYNC_UNSUPPORTED:
            raise


def fsync_dir(path: str):
    """A folder's entries (a rename, a new file's name) on disk; where the file system cannot, nothing. `path` ""
    is the working folder, as os.path.dirname names it for a bare name: opening "" failed, and nothing was synced."""
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
