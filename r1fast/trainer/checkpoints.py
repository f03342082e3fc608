"""Training checkpoints: safetensors + JSON only (never pickle), written atomically, last K kept.

    <run>/checkpoint-<step>/
        config.json, model*.safetensors   the model in Hugging Face format (loadable by transformers)
        tokenizer files                   when a tokenizer is given
        optimizer.safetensors             per-parameter optimizer tensors ("<param index>.<name>")
        rng.safetensors                   torch CPU (and CUDA) generator states
        trainer_state.json                step, data position, optimizer param groups, scheduler,
                                          python/numpy RNG, config (written last)

A checkpoint is built in a hidden temporary folder beside its final name and renamed into place,
so a crash or Ctrl-C mid-write never leaves a half checkpoint that `--resume` would pick up.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


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
    if resume is True or resume in ("latest", "true", "True"):
        path = latest_checkpoint(run_dir)
        if path is None:
            raise ValueError(f"--resume: no checkpoint found under {run_dir!r}")
        return path
    resume = str(resume)
    if os.path.isfile(os.path.join(resume, STATE_FILE)):
        return resume
    path = latest_checkpoint(resume)
    if path is None:
        raise ValueError(f"--resume {resume!r}: neither a checkpoint folder (with {STATE_FILE}) nor a run "
                         f"folder holding checkpoint-<step> folders")
    return path


def set_aside_newer(run_dir: str, resume_path: str) -> list[str]:
    """Resuming from a checkpoint older than the newest in its folder abandons the steps after it:
    rename those newer checkpoints to abandoned-checkpoint-<step> (kept, never resumed or pruned),
    or a later bare --resume would continue the abandoned steps. Returns the new names."""
    if os.path.dirname(os.path.abspath(resume_path)) != os.path.abspath(run_dir):
        return []
    m = _CKPT_RE.match(os.path.basename(os.path.normpath(resume_path)))
    moved = []
    for step, path in list_checkpoints(run_dir):
        if m and step > int(m.group(1)):
            target = os.path.join(run_dir, "abandoned-" + os.path.basename(path))
            if os.path.exists(target):
                target += f".{os.getpid()}"
            os.rename(path, target)
            moved.append(target)
    return moved


class RunFolderInUse(ValueError):
    """A new run (not `--resume`) pointed at a folder holding an earlier run's checkpoints."""

    def __init__(self, run_dir: str, holds: str):
        self.run_dir, self.holds = run_dir, holds
        super().__init__(f"{run_dir} holds an earlier run ({holds}); continue it with --resume (resume=True), "
                         f"start over with overwrite_output_dir=true (deletes its checkpoints and metrics "
                         f"first), or give another output_dir")


def start_fresh(run_dir: str, overwrite: bool):
    """Before a new run: an earlier run's checkpoints in `run_dir` would be pruned together with the
    new run's by step number (deleting the new run's own) and `--resume` would pick the newest of
    either. So they are an error, or with `overwrite` deleted first."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return
    if not overwrite:
        raise RunFolderInUse(run_dir, "checkpoints " + ", ".join(os.path.basename(p) for _, p in ckpts))
    clear_run(run_dir)


def clear_run(run_dir: str):
    """Delete what a training run writes into `run_dir`, and nothing else: an output_dir may also
    hold the user's own files."""
    if not os.path.isdir(run_dir):
        return
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if _CKPT_RE.match(name.split(".old-")[0]) or name.startswith((".tmp-checkpoint-", "abandoned-checkpoint-")) \
                or name == "tensorboard":
            shutil.rmtree(path, ignore_errors=True)
        elif name in ("metrics.jsonl", "completions.jsonl", "metrics.jsonl.tmp", "completions.jsonl.tmp"):
            os.remove(path)


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


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]):
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if states:
            torch.cuda.set_rng_state_all(states)
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# -- optimizer ---------------------------------------------------------------------------------
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
    return tensors, [{"param_groups": groups, "scalars": scalars}]


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict):
    from r1fast.trainer.master_weights import MasterWeightAdamW

    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        idx, name = key.split(".", 1)
        if name == "master" and not isinstance(opt, MasterWeightAdamW):
            continue  # fp32 master weights of a run that had them: this optimizer keeps none
        state.setdefault(int(idx), {})[name] = v
    for key, v in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    groups = meta["param_groups"]
    for g in groups:
        for k in ("betas",):
            if k in g and isinstance(g[k], list):
                g[k] = tuple(g[k])
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    n_saved = sum(len(g["params"]) for g in groups)
    if n_params != n_saved:
        raise ValueError(f"checkpoint optimizer has {n_saved} parameters but the model has {n_params}: "
                         f"is this checkpoint from a different model, or from an r1fast before its decoder fused "
                         f"q/k/v and gate/up into one parameter each? (its model weights still load: start a "
                         f"new run from them)")
    opt.load_state_dict({"state": state, "param_groups": groups})


# -- save / load -------------------------------------------------------------------------------
def save_checkpoint(run_dir: str, step: int, *, model, optimizer=None, scheduler=None, tokenizer=None,
                    state: Optional[dict] = None, keep: Optional[int] = 2) -> str:
    """Write checkpoint-<step> atomically and delete all but it and the newest `keep` - 1 others
    (keep=None: delete none)."""
    os.makedirs(run_dir, exist_ok=True)
    final = os.path.join(run_dir, f"checkpoint-{step}")
    tmp = tempfile.mkdtemp(prefix=f".tmp-checkpoint-{step}-", dir=run_dir)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        full_state = dict(state or {})
        full_state["global_step"] = step
        if optimizer is not None:
            tensors, (meta,) = optimizer_state(optimizer)
            save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
            full_state["optimizer"] = meta
        if scheduler is not None:
            sd = scheduler.state_dict()
            full_state["scheduler"] = {k: v for k, v in sd.items() if k != "lr_lambdas"}
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, os.path.join(tmp, "rng.safetensors"))
        full_state["rng"] = rng_meta
        _write_json(os.path.join(tmp, STATE_FILE), full_state)
        if os.path.exists(final):
            old = final + f".old-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # the checkpoint just written is kept even where higher step numbers sit beside it (a run resumed
    # from an older checkpoint): deleting it would leave `--resume` another run's state
    others = [path for _, path in list_checkpoints(run_dir) if path != final]
    for path in others[:max(0, len(others) - (keep - 1))] if keep is not None else []:
        shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint(path: str, *, model, optimizer=None, scheduler=None, restore_rng: bool = True) -> dict:
    """Load weights (in place), optimizer, scheduler and RNG from `path`; return the trainer state."""
    state_path = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_path):
        raise ValueError(f"{path!r} is not a checkpoint (no {STATE_FILE})")
    with open(state_path, encoding="utf-8") as f:
        try:
            state = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"checkpoint {path!r}: {STATE_FILE} is not valid JSON ({e}); "
                             f"resume from an earlier checkpoint") from None
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise ValueError(f"checkpoint {path!r}: {STATE_FILE} has no 'global_step'")
    load_weights(model, path)
    if optimizer is not None:
        if "optimizer" not in state:
            raise ValueError(f"checkpoint {path!r} has no optimizer state")
        load_optimizer_state(optimizer, _read_tensors(path, "optimizer.safetensors"), state["optimizer"])
    if scheduler is not None and "scheduler" in state:
        sd = scheduler.state_dict()
        sd.update(state["scheduler"])
        scheduler.load_state_dict(sd)
    if restore_rng:
        if "rng" not in state:
            raise ValueError(f"checkpoint {path!r}: {STATE_FILE} has no RNG state")
        set_rng_state(_read_tensors(path, "rng.safetensors"), state["rng"])
    return state


def _read_tensors(path: str, name: str) -> dict[str, torch.Tensor]:
    """A checkpoint's safetensors file, or a ValueError naming it (safetensors raises its own
    SafetensorError, not a ValueError, for a truncated file)."""
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise ValueError(f"checkpoint {path!r} lacks {name}")
    try:
        return load_file(file)
    except Exception as e:
        raise ValueError(f"checkpoint {path!r}: cannot read {name} (truncated or damaged?): {e}") from None


def load_weights(model, path: str):
    """Copy a Hugging Face safetensors checkpoint's tensors into `model`'s parameters, in place
    (so a rollout engine holding references to them sees the new values)."""
    from r1fast.models import from_pretrained
    from r1fast.models.checkpoint import INDEX_NAME, SINGLE_NAME

    # Checked here: from_pretrained falls back to any *.safetensors in the folder, and a training
    # checkpoint also holds optimizer.safetensors and rng.safetensors.
    if not any(os.path.isfile(os.path.join(path, f)) for f in (SINGLE_NAME, INDEX_NAME)):
        raise ValueError(f"checkpoint {path!r} lacks the model weights ({SINGLE_NAME} or {INDEX_NAME})")
    loaded = from_pretrained(path, dtype=model.dtype, device="cpu")
    src = dict(loaded.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in src:
                raise ValueError(f"checkpoint {path!r} lacks parameter {name!r}")
            if src[name].shape != p.shape:
                raise ValueError(f"checkpoint {path!r}: {name} has shape {tuple(src[name].shape)}, "
                                 f"the model expects {tuple(p.shape)}")
            p.copy_(src[name].to(p.device))


def _write_json(path: str, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
