#!/usr/bin/env bash
# The GPU check: the one command to run on a machine with a CUDA GPU. Planned for one H200 without internet,
# Python 3.12 with CUDA torch, transformers, accelerate, peft and einops installed, and no vLLM, Ray or DeepSpeed.
#
#   bash benchmarks/build_gpu_wheels.sh        # beforehand, where PyPI is reachable: benchmarks/gpu_wheels (~10 MB)
#   bash benchmarks/gpu_check.sh [REPORT.md]   # on the GPU machine, from a checkout with that folder in it
#
# 1. installs the carried wheels the machine lacks (DeepSpeed, OpenRLHF 0.11.2, their imports; --no-index --no-deps);
# 2. runs the GPU suite, `pytest -m gpu tests/gpu` (bf16/fp16 numerics, ZeRO-3 actor step with rehearsal and its
#    peak memory, K reward models, Advantage Model steps under ZeRO-2 bf16, the Ray setup hook and CUDA);
# 3. runs the reward/advantage-step benchmark (plugin vs stock, 256..8192 prompts x 8, gae and group_norm) and the
#    estimator scoring benchmark on CUDA;
# 4. writes one markdown report (default benchmarks/results/gpu-<date>.md) with every number measured.
# It finishes in under 8 minutes on one H200 (each part has a time limit), so a rerun fits as well.
# Without CUDA it still runs end to end (the GPU tests skip, a small benchmark runs on CPU) and the report's first
# line says "no CUDA": such a run checks this script; it is never a GPU result.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-benchmarks/gpu_wheels}
REPORT=${1:-benchmarks/results/gpu-$(date -u +%Y-%m-%d).md}
WORK=$(mktemp -d)
START=$(date +%s)
CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))") || { echo "gpu_check.sh: error: $PY cannot import torch" >&2; exit 2; }
elapsed() { echo $(( $(date +%s) - START )); }

# 1. wheels: install each carried one whose distribution is missing here
: > "$WORK/installed.txt"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  for whl in "$WHEELS"/*.whl; do
    name=$(basename "$whl" | cut -d- -f1)
    if ! "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$name" 2>/dev/null; then
      "$PY" -m pip install --quiet --no-index --no-deps "$whl" && basename "$whl" >> "$WORK/installed.txt"
    fi
  done
elif [ "$CUDA" = 1 ]; then
  echo "gpu_check.sh: error: no wheels in $WHEELS: build them with benchmarks/build_gpu_wheels.sh where PyPI is reachable and carry the folder here (or set WHEELS=DIR)" >&2
  exit 2
fi
echo "[gpu_check] wheels installed: $(wc -l < "$WORK/installed.txt") ($(elapsed) s)"

# 2. the GPU suite (DeepSpeed on the GPU: the test session's CPU default must not apply)
export DS_ACCELERATOR=$([ "$CUDA" = 1 ] && echo cuda || echo cpu)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" LSC_GPU_RESULTS="$WORK/steps" TOKENIZERS_PARALLELISM=false
mkdir -p "$LSC_GPU_RESULTS"
timeout 270 "$PY" -m pytest -m gpu tests/gpu -rs -v -p no:cacheprovider --junitxml="$WORK/junit.xml" > "$WORK/pytest.log" 2>&1
PYTEST_RC=$?
echo "[gpu_check] pytest -m gpu: exit $PYTEST_RC ($(elapsed) s)"

# 3. benchmarks (on CPU only a small run that checks the command)
if [ "$CUDA" = 1 ]; then
  timeout 150 "$PY" benchmarks/bench_ppo_overhead.py --device cuda --repeats 3 --out "$WORK/overhead.json" > "$WORK/overhead.log" 2>&1
  echo "[gpu_check] reward-step benchmark: exit $? ($(elapsed) s)"
  timeout 45 "$PY" benchmarks/bench_estimate_reference.py --repeats 3 --out "$WORK/estimator.json" > "$WORK/estimator.log" 2>&1
  echo "[gpu_check] estimator benchmark: exit $? ($(elapsed) s)"
else
  timeout 300 "$PY" benchmarks/bench_ppo_overhead.py --device cpu --prompts 256 --estimators gae --repeats 1 \
    --out "$WORK/overhead.json" > "$WORK/overhead.log" 2>&1
  echo "[gpu_check] reward-step benchmark (CPU, check only): exit $? ($(elapsed) s)"
fi

# 4. the report
"$PY" - "$WORK" "$REPORT" "$CUDA" "$PYTEST_RC" "$(elapsed)" <<'EOF'
import json, os, platform, subprocess, sys, time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

work, report, cuda, pytest_rc, seconds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4]), sys.argv[5]


def load(name):
    path = work / name
    return json.loads(path.read_text()) if path.exists() else None


def tail(name, n=40):
    path = work / name
    return "\n".join(path.read_text().splitlines()[-n:]) if path.exists() else "(no output)"


def version(dist):
    try:
        from importlib.metadata import version as v
        return v(dist)
    except Exception:
        return "not installed"


lines = []
if not cuda:
    ran = ("ran on CPU (LSC_GPU_SELFTEST=cpu, a check of the tests)" if os.environ.get("LSC_GPU_SELFTEST") == "cpu"
           else "were skipped")
    lines += [f"**no CUDA on this machine: the GPU tests {ran} and the benchmark ran on CPU. This run checks "
              "benchmarks/gpu_check.sh; it is not a GPU result.**", ""]
gpu = torch.cuda.get_device_name() if cuda else "none"
lines += [f"# GPU check, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
          f"- machine: {platform.node()}, Python {platform.python_version()}, GPU: {gpu}"
          + (f" ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)" if cuda else ""),
          f"- torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {version('transformers')}, "
          f"deepspeed {version('deepspeed')}, openrlhf {version('openrlhf')}, ray {version('ray')}, "
          f"datasets {version('datasets')}",
          f"- wheels installed from the carried folder: {', '.join((work / 'installed.txt').read_text().split()) or 'none'}",
          f"- total time: {seconds} s", ""]

lines += ["## GPU suite (`pytest -m gpu tests/gpu`)", ""]
junit = work / "junit.xml"
if junit.exists():
    cases = ET.parse(junit).getroot().iter("testcase")
    lines += ["| test | outcome | s |", "|---|---|---|"]
    counts, skipped = {}, {}
    for case in cases:
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, detail = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag], node.get("message", "")
        counts[outcome] = counts.get(outcome, 0) + 1
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        if outcome == "skipped":  # one line per reason
            skipped.setdefault(detail, []).append(name)
            continue
        lines.append(f"| {name} | {outcome}{': ' + detail[:160].replace('|', '/') if detail else ''} | {float(case.get('time', 0)):.1f} |")
    for reason, names in skipped.items():
        lines.append(f"| {len(names)} tests ({names[0]}, ...) | skipped: {reason[:160].replace('|', '/')} | |")
    lines += ["", "pytest exit code %d; %s" % (pytest_rc, ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))), ""]
else:
    lines += ["pytest wrote no results (exit code %d); its output:" % pytest_rc, "```", tail("pytest.log"), "```", ""]
if pytest_rc not in (0, 5):
    lines += ["<details><summary>pytest output (tail)</summary>", "", "```", tail("pytest.log", 80), "```", "</details>", ""]

steps = {p.stem: json.loads(p.read_text()) for p in sorted((work / "steps").glob("*.json"))}
if steps:
    lines += ["## Measurements of the GPU steps", ""]
    z3 = steps.get("rehearsal_zero3")
    if z3:
        lines += ["ZeRO-3 actor step with rehearsal, rehearsal gradient vs plain transformers fp32 on CPU:", "",
                  "| precision | max abs error | gradient scale | cosine | partitioned | rehearsal NLL |", "|---|---|---|---|---|---|"]
        for p in ("fp32", "bf16"):
            r = z3[p]
            lines.append(f"| {p} | {r['max_abs_err']:.3g} | {r['grad_scale']:.3g} | {r['cosine']:.6f} | {r['partitioned']} | {r['rehearsal_nll']:.4f} |")
        lines.append("")
    mem = steps.get("rehearsal_memory")
    if mem and "skipped" not in mem:
        lines += [f"Peak GPU memory of a ZeRO-3 bf16 actor step ({mem['params'] / 1e6:.0f}M policy, 4 x 1024 tokens; the "
                  "rehearsal micro-batch as large):", "", "| gradient checkpointing | plain GiB | with rehearsal GiB | ratio |", "|---|---|---|---|"]
        for mode in ("no_checkpointing", "checkpointing"):
            m = mem[mode]
            lines.append(f"| {'on' if mode == 'checkpointing' else 'off'} | {m['plain_gib']:.3f} | {m['rehearsal_gib']:.3f} | {m['ratio']:.3f} |")
        lines.append("")
    rm = steps.get("rm_scoring")
    if rm:
        diff = max(abs(a - b) for x, y in zip(rm["scores"], rm["cpu_fp32_scores"]) for a, b in zip(x, y))
        udiff = max(abs(a - b) for a, b in zip(rm["utility"], rm["cpu_fp32_utility"]))
        lines += [f"K = 2 reward models ({rm['device']}, {rm['dtype']}) vs fp32 CPU: max score difference {diff:.4f}, "
                  f"max utility difference {udiff:.4f}", ""]
    am = steps.get("am_zero2_bf16")
    if am:
        lines += [f"Advantage Model steps, ZeRO-2 bf16: losses {', '.join(f'{x:.4f}' for x in am['losses'])} "
                  f"(fp32 CPU first loss {am['cpu_fp32_first_loss']:.4f}); weights moved by up to {am['weights_moved']:.3g}", ""]
    hook = steps.get("setup_hook")
    if hook:
        lines += [f"Ray setup hook: CUDA initialised after it: {hook['cuda_initialized']} (Ray: {hook.get('ray')})", ""]

lines += ["## Reward/advantage step: plugin vs stock", ""]
overhead = load("overhead.json")
if overhead:
    lines += [f"Device {overhead['config']['device']} ({overhead['device_name']}), K = 2, fastest of "
              f"{overhead['config']['repeats']}, labels as {overhead['config']['labels']}s, target plugin <= "
              f"{overhead['config']['target']}x stock.", "",
              f"| prompts x {overhead['config']['samples']} | estimator | stock s | plugin s | plugin/stock | reward hook s "
              "| hook/stock | shipping 64 experiences: plugin/stock s (bytes) |", "|---|---|---|---|---|---|---|---|"]
    for r in overhead["rows"]:
        lines.append(f"| {r['prompts']} | {r['estimator']} | {r['stock_s']:.4f} | {r['plugin_s']:.4f} | {r['ratio']:.3f}x "
                     f"| {r['hook_s']:.4f} | {r['hook_share']:.3f} | {r['ship_ratio']:.2f}x ({r['ship_bytes_ratio']:.2f}x) |")
    lines += ["", f"Worst ratio {overhead['worst_ratio']:.3f}x.", ""]
else:
    lines += ["The benchmark wrote no results; its output:", "```", tail("overhead.log"), "```", ""]
if cuda:
    lines += ["## Estimator scoring vs a plain batched forward", ""]
    est = load("estimator.json")
    lines += ["```json", json.dumps(est, indent=1)[:3000], "```", ""] if est else ["No results; output:", "```", tail("estimator.log"), "```", ""]

report.parent.mkdir(parents=True, exist_ok=True)
tmp = report.with_suffix(".tmp")
tmp.write_text("\n".join(lines) + "\n")
os.replace(tmp, report)
print(f"[gpu_check] report: {report}")
EOF
[ "$PYTEST_RC" = 0 ] || [ "$PYTEST_RC" = 5 ]
