"""tests/verl_suite runs inside .venv-verl (verl 0.9.1 needs transformers < 5.11; the main .venv has 5.15.0 for
OpenRLHF). tests/test_verl.py starts it there with `--confcutdir tests/verl_suite`; the main venv, which has no
verl, does not collect this folder."""

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("verl") else ["*"]
