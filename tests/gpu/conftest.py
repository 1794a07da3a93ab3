"""The GPU suite (`pytest -m gpu`, or `bash benchmarks/gpu_check.sh` on a GPU machine).

Every test module here sets `pytestmark = pytest.mark.gpu`; its tests are skipped, with the reason printed at the end of the run, when
CUDA is absent, so a CPU run stays green. `LSC_GPU_SELFTEST=cpu` runs the suite's own logic on CPU instead
(to check the tests themselves on a machine without a GPU; GPU-only measurements then skip): such a run is
never a GPU result.
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
SELFTEST = os.environ.get("LSC_GPU_SELFTEST") == "cpu"
DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if SELFTEST else None)
NO_CUDA = "no CUDA device (torch.cuda.is_available() is False): the GPU suite needs one"
# Test-only stand-ins for packages the GPU check machine lacks (tests/gpu/stubs/<name>/<name>), used only then.
STAND_INS = [HERE / "stubs" / name for name in ("ray", "datasets") if importlib.util.find_spec(name) is None]
sys.path.extend(map(str, STAND_INS))

_skipped = []


def pytest_collection_modifyitems(config, items):
    for item in items:
        if DEVICE is None and HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.skip(reason=NO_CUDA))
            _skipped.append(item.nodeid)


def pytest_terminal_summary(terminalreporter):
    if _skipped:
        terminalreporter.write_line(f"tests/gpu: {len(_skipped)} GPU tests skipped: {NO_CUDA}")
    elif DEVICE == "cpu":
        terminalreporter.write_line("tests/gpu: ran on CPU (LSC_GPU_SELFTEST=cpu), a check of the tests only, not a GPU result")


@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture(scope="session")
def step_path():
    """sys.path of a gpu_steps process: this folder, the stand-ins needed here, the test stubs, tests/, the repo."""
    root = HERE.parents[1]
    return [HERE, *STAND_INS, root / "tests" / "stubs", root / "tests", root]
