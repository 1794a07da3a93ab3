"""Test-only CPU shims for OpenRLHF's hard-coded CUDA calls (see shared/notes/openrlhf-on-cpu.md).

`install()` is a no-op when CUDA is present. Import-safe: it touches torch only.
"""

import os

import torch


def install() -> None:
    if torch.cuda.is_available() or getattr(torch.cuda, "_lsc_cpu_shims", False):
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.cuda.current_device = lambda: "cpu"  # used as a .to() target by OpenRLHF
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None

    class _Stream:
        def synchronize(self):
            pass

        def wait_stream(self, other):
            pass

    torch.cuda.current_stream = lambda *a, **k: _Stream()
    torch.cuda._lsc_cpu_shims = True
