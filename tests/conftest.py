"""Test-session setup: CUDA-only packages are replaced by the stand-ins in tests/stubs (tests only),
DeepSpeed runs on CPU, and its compiled ops are cached in .torch_extensions between runs."""

import os
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
for p in (TESTS / "stubs", TESTS):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
# Ray workers and subprocesses started by tests find the stubs and helpers the same way.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(TESTS / "stubs"), str(TESTS), str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hypothesis import settings  # noqa: E402

# `--hypothesis-profile nodb`: random examples as in CI, but no replay of examples stored by earlier runs
# (docs/testing.md "Test strength": the suite is checked under several seeds this way). `mutation`: the mutation
# run's fixed examples, so its score can be reproduced.
settings.register_profile("nodb", database=None)
settings.register_profile("mutation", database=None, derandomize=True)
