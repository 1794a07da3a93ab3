#!/usr/bin/env bash
# Builds the folder of wheels that benchmarks/gpu_check.sh installs on the lent GPU machine, which has no internet,
# Python 3.12 on x86_64 and the packages in benchmarks/gpu_machine_packages.txt (CUDA torch, transformers, accelerate,
# peft, einops, ...; no vLLM, Ray, DeepSpeed or datasets). Run it here, where PyPI is reachable, with a Python that
# has torch (DeepSpeed's setup imports it); then carry the folder with the repository (docs/gpu.md, two commands).
#
#   bash benchmarks/build_gpu_wheels.sh [OUT]     # default OUT: benchmarks/gpu_wheels (git-ignored), ~6 MB
#   PYVER=3.11 bash benchmarks/build_gpu_wheels.sh DIR   # wheels for this machine's Python (gpu_rehearsal.sh)
#
# What goes in: exactly what the GPU check imports and the machine lacks (a wheel of a package the machine has
# would shadow its version):
# - DeepSpeed 0.19.6 built from its sdist as a pure-Python wheel (DS_BUILD_OPS=0: no CUDA op compiled; the GPU
#   suite runs DeepSpeed with torch AdamW, so none is needed), and DeepSpeed's imports hjson and pydantic;
# - OpenRLHF 0.11.2's binary wheel for PYVER (installed --no-deps), and its imports torchdata (StatefulDataLoader),
#   pylatexenc (utils.math_utils) and optree (torch.distributed's pytrees).
# Not carried: Ray and vLLM (tests/gpu/stubs and tests/stubs stand in for their imports) and `datasets`: the GPU
# suite tokenizes its data itself; reading D_R / preference files is covered by the CPU tests.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/gpu_wheels}
PYVER=${PYVER:-3.12}
PYTHON=${PYTHON:-$(command -v python)}
"$PYTHON" -c "import torch" 2>/dev/null || { echo "build_gpu_wheels.sh: error: $PYTHON has no torch (DeepSpeed's setup imports it): set PYTHON=.venv/bin/python" >&2; exit 2; }

mkdir -p "$OUT"
echo '*' > "$OUT/.gitignore"
rm -f "$OUT"/*.whl
ABI=cp${PYVER/./}
PLATFORM=(--only-binary=:all: --python-version "$PYVER" --implementation cp --abi "$ABI" --abi abi3 --abi none
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform manylinux1_x86_64 --platform any)
PINNED=(
  openrlhf==0.11.2 torchdata==0.11.0 pylatexenc==2.11 optree==0.20.0
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
)
"$PYTHON" -m pip download --quiet --no-deps "${PLATFORM[@]}" -d "$OUT" "${PINNED[@]}" 2>&1 | grep -v "^WARNING: Location" || true
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w "$OUT" deepspeed==0.19.6
count=$(ls -1 "$OUT"/*.whl | wc -l)
[ "$count" = $(( ${#PINNED[@]} + 1 )) ] || { echo "build_gpu_wheels.sh: error: expected $(( ${#PINNED[@]} + 1 )) wheels in $OUT, found $count" >&2; exit 1; }
ls -1 "$OUT"/*.whl | sed 's|.*/||'
du -sh "$OUT"
