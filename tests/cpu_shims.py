"""Test-only CPU shims for OpenRLHF's hard-coded CUDA calls (see shared/notes/openrlhf-on-cpu.md).

`install()` is a no-op when CUDA is present. Import-safe: it touches torch only.
`skip_deepspeed_op_builds()` keeps DeepSpeed from compiling C++ ops a CPU test never needs (minutes each on
a fresh machine): the shared-memory all-reduce op (single-process runs never use it) and FusedAdam
(OpenRLHF's AdamW config gets `torch_adam: true`, plain torch AdamW).
"""

import importlib
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


def skip_deepspeed_op_builds() -> None:
    if torch.cuda.is_available():
        return
    import openrlhf.utils.deepspeed.deepspeed as ds

    # by module path: the attribute deepspeed.comm.torch is the torch package itself
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    stock = ds.get_train_ds_config
    if getattr(stock, "_lsc_torch_adam", False):
        return

    def get_train_ds_config(*args, **kwargs):
        config = stock(*args, **kwargs)
        if config.get("optimizer", {}).get("type") == "AdamW":
            config["optimizer"]["params"]["torch_adam"] = True
        return config

    get_train_ds_config._lsc_torch_adam = True
    ds.get_train_ds_config = get_train_ds_config  # the strategy calls it through this module's globals
