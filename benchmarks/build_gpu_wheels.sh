#!/usr/bin/env bash
# Builds the folder of wheels that benchmarks/gpu_check.sh installs on the GPU machine, which has no internet,
# Python 3.12 on x86_64, and CUDA torch, transformers, accelerate, peft and einops already installed (no vLLM,
# Ray or DeepSpeed). Run it here, where PyPI is reachable, with a Python that has torch (DeepSpeed's setup
# imports it); then carry the folder with the repository to the GPU machine.
#
#   bash benchmarks/build_gpu_wheels.sh [OUT]        # default OUT: benchmarks/gpu_wheels (git-ignored), ~10 MB
#
# What goes in, and why (everything else the suite imports is preinstalled there or a test-only stand-in):
# - DeepSpeed 0.19.6 built from its sdist as a pure-Python wheel (DS_BUILD_OPS=0: no CUDA op compiled; the
#   GPU suite runs DeepSpeed with torch AdamW, so none is needed);
# - OpenRLHF 0.11.2's cp312 wheel (OpenRLHF ships one binary wheel per Python version), installed --no-deps;
# - the packages OpenRLHF's and DeepSpeed's modules import that the machine lacks, as cp312 manylinux wheels.
# Not carried: Ray and vLLM (tests/gpu/stubs and tests/stubs stand in for their imports) and `datasets`
# (pyarrow alone is 55 MB): the GPU suite tokenizes its data itself; reading D_R / preference files is covered
# by the CPU tests.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/gpu_wheels}
PYTHON=${PYTHON:-$(command -v python)}
"$PYTHON" -c "import torch" 2>/dev/null || { echo "build_gpu_wheels.sh: error: $PYTHON has no torch (DeepSpeed's setup imports it): set PYTHON=.venv/bin/python" >&2; exit 2; }

mkdir -p "$OUT"
echo '*' > "$OUT/.gitignore"
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
PINNED=(
  openrlhf==0.11.2
  # DeepSpeed's imports
  hjson==3.1.0 py-cpuinfo==9.0.0 msgpack==1.2.4 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5
  # OpenRLHF's imports: torchdata (StatefulDataLoader), pylatexenc (utils.math_utils), aiohttp (utils.agent), pillow
  # (VLM utilities), optree (torch.distributed's pytrees)
  torchdata==0.11.0 pylatexenc==2.11 optree==0.20.0 pillow==13.0.0
  aiohttp==3.14.5 aiohappyeyeballs==2.7.1 aiosignal==1.4.0 attrs==26.1.0 frozenlist==1.8.0 multidict==7.2.1
  propcache==0.5.4 yarl==1.25.1
)
"$PYTHON" -m pip download --quiet --no-deps "${PLATFORM[@]}" -d "$OUT" "${PINNED[@]}"
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w "$OUT" deepspeed==0.19.6
ls -1 "$OUT"/*.whl | sed 's|.*/||'
du -sh "$OUT"
