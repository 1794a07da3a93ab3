"""The verl adapter's tests (tests/verl_suite) run in their own venv, .venv-verl: verl 0.9.1 needs
transformers < 5.11 and this venv has 5.15.0 for OpenRLHF. `.ci/install` makes it (through .ci/install_verl)."""

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VENV_VERL = ROOT / os.environ.get("VENV_VERL", ".venv-verl")


def test_verl_suite_in_its_venv():
    python = VENV_VERL / "bin" / "python"
    assert python.exists(), f"{python} is missing: run `bash .ci/install` (or `bash .ci/install_verl`) to make it"
    # tests/conftest.py puts the OpenRLHF-side stubs (flash-attn, vLLM) on PYTHONPATH: keep them out of verl's venv.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:warnings", "--confcutdir", "tests/verl_suite",
         "tests/verl_suite"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, \
        f"tests/verl_suite failed in {VENV_VERL.name}:\n{run.stdout[-8000:]}\n{run.stderr[-3000:]}"
    assert " passed" in run.stdout.splitlines()[-1], run.stdout[-2000:]
