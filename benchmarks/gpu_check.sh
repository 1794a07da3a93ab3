#!/usr/bin/env bash
# The GPU check: the one command to run on a machine with one CUDA GPU, planned for the lent H100 (or H200): no
# internet, Python 3.12 with CUDA torch and benchmarks/gpu_machine_packages.txt; no vLLM, Ray, DeepSpeed, datasets.
# The two commands (docs/gpu.md): here `bash benchmarks/build_gpu_wheels.sh`, then on the GPU machine this script,
# carrying benchmarks/gpu_wheels. `bash benchmarks/gpu_rehearsal.sh` rehearses it on a CPU machine first.
#
# Steps and their time limits on a GPU (the worst case is their sum, 380 s = 6.3 min, so one rerun still fits a 15-minute
# lease after a 1-2 minute start; a typical run is shorter):
#   1. the carried wheels, one `pip install --no-index --no-deps --target $SITE` (stops the script on failure)   40 s
#   2. the GPU suite, `pytest -m gpu tests/gpu`: each OpenRLHF step in its own process with its own limit
#      (LSC_GPU_STEP_TIMEOUT), so a stuck step fails alone and junit.xml is always written                       210 s
#   3. reward-step benchmark, plugin vs stock, 256 / 1024 / 4096 prompts x 8, gae and group_norm, fastest of 3
#      (8192 is left out: Python-bound, ~8 s a step, it would not fit; the JSON is written after every row)      85 s
#   4. estimator benchmark on CUDA (JSON written after each part)                                               45 s
#   5. the report, printed at the end
# Outputs, few files: $OUT when set (the device runner brings back only that folder), else
# benchmarks/results/gpu-<date>/: report.md, pytest.log, junit.xml, steps.json, overhead.json, estimator.json, bench.log.
# Without CUDA it runs end to end with CPU limits (the GPU tests skip, or run as a self-test with
# LSC_GPU_SELFTEST=cpu; small CPU benchmarks) and the report's first line says "no CUDA": never a GPU result.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-benchmarks/gpu_wheels}
SITE=${SITE:-/tmp/lsc_gpu_site}
DEST=${OUT:-benchmarks/results/gpu-$(date -u +%Y-%m-%d)}
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
fail() { echo "gpu_check.sh: error: $*" >&2; exit 2; }
CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))") || fail "$PY cannot import torch"
mkdir -p "$DEST" || fail "cannot create $DEST"
STEPS=$(mktemp -d)  # each step's JSON; the report merges them into steps.json
DEST=$(cd "$DEST" && pwd)
if [ "$CUDA" = 1 ]; then LIMITS=(40 210 85 45 90); else LIMITS=(120 1500 300 300 600); fi  # install suite overhead estimator step
echo "[gpu_check] CUDA: $CUDA; time limits (s): install ${LIMITS[0]}, suite ${LIMITS[1]}, overhead ${LIMITS[2]}, estimator ${LIMITS[3]}; outputs in $DEST"

# 1. the carried wheels: exactly what the machine lacks (build_gpu_wheels.sh), in one pip call
ls "$WHEELS"/*.whl >/dev/null 2>&1 || fail "no wheels in $WHEELS: build them with 'bash benchmarks/build_gpu_wheels.sh' where PyPI is reachable and carry the folder (docs/gpu.md)"
timeout "${LIMITS[0]}" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" "$WHEELS"/*.whl > "$DEST/bench.log" 2>&1 || { cat "$DEST/bench.log" >&2; fail "installing the wheels of $WHEELS failed"; }
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import deepspeed, openrlhf" 2>> "$DEST/bench.log" || { tail -5 "$DEST/bench.log" >&2; fail "deepspeed/openrlhf do not import after installing $WHEELS"; }
echo "[gpu_check] wheels installed: $(ls "$WHEELS"/*.whl | wc -l) ($(elapsed) s)"

# 2. the GPU suite (DeepSpeed on the GPU: the test session's CPU default must not apply)
export DS_ACCELERATOR=$([ "$CUDA" = 1 ] && echo cuda || echo cpu)
export LSC_GPU_RESULTS="$STEPS" LSC_GPU_STEP_TIMEOUT=${LIMITS[4]} TOKENIZERS_PARALLELISM=false
TIMEOUT_FLAG=$("$PY" -c "import pytest_timeout" 2>/dev/null && echo "--timeout=${LIMITS[4]} -o timeout_method=signal")
# the outer limit is a backstop only: each step's own limit ends it first, so junit.xml is written
timeout $(( LIMITS[1] + 60 )) "$PY" -m pytest -m gpu tests/gpu -rs -v -p no:cacheprovider $TIMEOUT_FLAG \
  --junitxml="$DEST/junit.xml" > "$DEST/pytest.log" 2>&1
PYTEST_RC=$?
echo "[gpu_check] pytest -m gpu: exit $PYTEST_RC ($(elapsed) s)"

# 3. and 4. benchmarks (on CPU small runs that check the commands)
if [ "$CUDA" = 1 ]; then
  timeout "${LIMITS[2]}" "$PY" benchmarks/bench_ppo_overhead.py --device cuda --prompts 256,1024,4096 --repeats 3 \
    --out "$DEST/overhead.json" >> "$DEST/bench.log" 2>&1
  echo "[gpu_check] reward-step benchmark: exit $? ($(elapsed) s)"
  timeout "${LIMITS[3]}" "$PY" benchmarks/bench_estimate_reference.py --device cuda --repeats 3 --out "$DEST/estimator.json" \
    >> "$DEST/bench.log" 2>&1
  echo "[gpu_check] estimator benchmark: exit $? ($(elapsed) s)"
else
  timeout "${LIMITS[2]}" "$PY" benchmarks/bench_ppo_overhead.py --device cpu --prompts 256 --estimators gae --repeats 1 \
    --out "$DEST/overhead.json" >> "$DEST/bench.log" 2>&1
  echo "[gpu_check] reward-step benchmark (CPU, check only): exit $? ($(elapsed) s)"
  timeout "${LIMITS[3]}" "$PY" benchmarks/bench_estimate_reference.py --device cpu --prompts 4 --k 2 --repeats 1 --quick \
    --out "$DEST/estimator.json" >> "$DEST/bench.log" 2>&1
  echo "[gpu_check] estimator benchmark (CPU, check only): exit $? ($(elapsed) s)"
fi

# 5. the report
"$PY" benchmarks/gpu_report.py "$DEST" "$STEPS" "$CUDA" "$PYTEST_RC" "$(elapsed)"
REPORT_RC=$?
cat "$DEST/report.md"
[ "$REPORT_RC" = 0 ] && { [ "$PYTEST_RC" = 0 ] || [ "$PYTEST_RC" = 5 ]; }
