#!/usr/bin/env bash
# One GPU window, one call: build r1fast._C for the card present, run the GPU tests, run every bench
# suite at its GPU size, print a short table last. Must end inside 8 minutes.
#
#   device run:  bash bench/gpu_check.sh      (with carry [".whl"] when peers' wheels are carried)
#
# Full logs and results go to $OUT (the device tool brings them back); commit the CSV under
# bench/results/<card>-<date>.csv with the card, date, versions and this command.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
cd "$(dirname "$0")/.."
t0=$(date +%s)
stage() { echo "== [$(( $(date +%s) - t0 ))s] $*"; }
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
export R1FAST_CUDA=1 R1FAST_CUDA_ARCHS=${R1FAST_CUDA_ARCHS:-90a}

# Peers that the GPU image lacks (liger-kernel...) travel as wheels in .whl/ (see bench/README.md).
if compgen -G ".whl/*.whl" >/dev/null; then
  stage "installing carried wheels"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

stage "build (sm_${R1FAST_CUDA_ARCHS})"
if ! timeout 150 python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
python3 -m r1fast.cli info | tee "$OUT/info.txt"

stage "tests on the GPU (kernel tests run natively, at their GPU shapes)"
timeout 150 python3 -m pytest -q --maxfail=10 -p no:cacheprovider -m "not slow" --junitxml="$OUT/tests.xml" tests \
  >"$OUT/tests.log" 2>&1
echo "pytest exit $?"; tail -15 "$OUT/tests.log"

stage "bench, every suite at GPU size"
timeout 240 python3 -m r1fast.cli bench --size gpu --out "$OUT" --budget 1.0 >"$OUT/bench.log" 2>&1
echo "bench exit $?"; grep -E "FAILED|skip" "$OUT/bench.log" | head -20

stage "summary"
for f in "$OUT"/*.csv; do [ -f "$f" ] && python3 -m r1fast.cli bench --table "$f"; done
stage "done"
