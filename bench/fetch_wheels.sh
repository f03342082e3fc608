#!/usr/bin/env bash
# Download the peers' wheels that the GPU image lacks into .whl/, for `device run` to carry
# (carry [".whl"]); bench/gpu_check.sh installs them there with --no-deps.
#
# The GPU image (Python 3.12; see /work/.library/device/KINDS.md) already has torch, triton,
# transformers, accelerate, pandas, pyarrow and xxhash; it lacks liger-kernel (the logprob /
# grpo_loss peer), verl (the logprob peer: the suite reads one torch-only file of it, so its
# ray / tensordict dependencies are not needed) and trl with datasets' pure-Python pieces (the
# grpo_step / trl peers).
# datasets 4.x: it asks for pyarrow >= 21 where 5.x asks for >= 24. About 5 MB in all, well inside the 64 MiB a run may carry.
# Pinned: the logprob suite calls Liger's private _ChunkedSelectiveLogProbFunction (checked against 0.8.5),
# and --no-deps resolves nothing, so dill / multiprocess are held to what datasets 4.x accepts.
set -euo pipefail
cd "$(dirname "$0")/.."
# .gitignore ignores .whl/ (the device tool carries only ignored paths named in carry); a checkout whose
# .gitignore lacks it gets it in its exclude file (through --git-path: in a worktree .git is a file)
git check-ignore -q .whl/x.whl || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  liger-kernel==0.8.5 verl==0.9.1 "trl==1.16.*" "datasets>=4.7,<5" "dill>=0.3,<0.4.2" "multiprocess<0.70.20" 2>&1 \
  | { grep -v '^WARNING: Location' || true; }   # pipefail: a failed download still fails the script
ls -l .whl
