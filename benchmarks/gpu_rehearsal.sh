#!/usr/bin/env bash
# Rehearses benchmarks/gpu_check.sh on a CPU machine, so that the one GPU window is not spent finding a missing
# import: a venv holding the GPU machine's packages (the `rehearse` lines of benchmarks/gpu_machine_packages.txt,
# and their dependencies, less any the machine lacks) and nothing it lacks (no Ray, datasets, DeepSpeed, vLLM),
# the carried wheels built for this Python (build_gpu_wheels.sh), then gpu_check.sh in its CPU self-test mode
# (LSC_GPU_SELFTEST=cpu: the GPU suite's logic runs on CPU, the device trap standing in for a second device).
#
#   bash benchmarks/gpu_rehearsal.sh          # ~10 min on 2 cores; outputs in .gpu-rehearsal/out (report.md, ...)
#
# Differences from the GPU machine it cannot remove: Python 3.11 instead of 3.12 (torch's CPU wheel here is for
# 3.11) and torch 2.13.0 CPU instead of 2.11.0+cu130. Exit 0 only when the self-test passes and every step ran.
set -euo pipefail
cd "$(dirname "$0")/.."
HOME_DIR=${REHEARSAL_DIR:-.gpu-rehearsal}
VENV=$HOME_DIR/venv
PY=$VENV/bin/python
PYTHON_BASE=${PYTHON_BASE:-python3.11}
fail() { echo "gpu_rehearsal.sh: error: $*" >&2; exit 1; }

[ -x "$PY" ] || "$PYTHON_BASE" -m venv "$VENV"
"$PY" -m pip install -q -U pip 2>&1 | grep -v "^WARNING: Location" || true
# the `rehearse` lines, torch as the CPU wheel on disk (an unpinned torch would pull a CUDA build)
mapfile -t WANT < <(grep -E '#.*\brehearse\b' benchmarks/gpu_machine_packages.txt | sed -E 's/ *#.*//; s/^torch$/torch==2.13.0/')
echo "torch==2.13.0" > "$HOME_DIR/constraints.txt"
"$PY" -m pip install -q -c "$HOME_DIR/constraints.txt" "${WANT[@]}" 2>&1 | grep -v "^WARNING: Location" || true
# a dependency the GPU machine lacks (a newer version here may need more) is removed: the venv then holds only
# what that machine has, so an import the check needs and the wheels lack fails here as it would there
EXTRA=$("$PY" -I - benchmarks/gpu_machine_packages.txt <<'EOF'
import re, sys
from importlib.metadata import distributions

norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
listed = {norm(line.split("#")[0].split("==")[0].strip()) for line in open(sys.argv[1]) if line.split("#")[0].strip()}
print(" ".join(sorted({norm(d.metadata["Name"]) for d in distributions()} - listed - {"pip", "setuptools"})))
EOF
)
[ -z "$EXTRA" ] || { echo "gpu_rehearsal.sh: removing what the GPU machine lacks: $EXTRA"; "$PY" -m pip uninstall -q -y $EXTRA; }
for absent in ray datasets deepspeed openrlhf vllm flash_attn; do
  ! "$PY" -c "import $absent" 2>/dev/null || fail "$absent imports in the rehearsal venv; the GPU machine has none"
done
PYVER=3.11 PYTHON="$PY" bash benchmarks/build_gpu_wheels.sh "$HOME_DIR/wheels" > "$HOME_DIR/wheels.log" 2>&1 \
  || { cat "$HOME_DIR/wheels.log" >&2; fail "building the wheels failed"; }
rm -rf "$HOME_DIR/out" "$HOME_DIR/site"
LSC_GPU_SELFTEST=cpu PYTHON="$PY" WHEELS="$HOME_DIR/wheels" SITE="$PWD/$HOME_DIR/site" OUT="$HOME_DIR/out" \
  bash benchmarks/gpu_check.sh || fail "gpu_check.sh failed in the rehearsal (see $HOME_DIR/out/report.md)"
for f in report.md pytest.log junit.xml steps.json overhead.json estimator.json bench.log; do
  [ -s "$HOME_DIR/out/$f" ] || fail "gpu_check.sh wrote no $f"
done
grep -q ' passed' "$HOME_DIR/out/report.md" && ! grep -qE 'FAILED|ERROR' "$HOME_DIR/out/report.md" \
  || fail "the self-test did not pass (see $HOME_DIR/out/report.md)"
echo "gpu_rehearsal.sh: gpu_check.sh passed in the GPU machine's package set (CPU self-test): $HOME_DIR/out/report.md"
