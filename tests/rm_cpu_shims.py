"""Test-only launcher: `python -m rm_cpu_shims <module> <args...>` runs <module> as __main__ on a CPU machine.

On top of `cpu_shims.install()` (OpenRLHF's hard-coded torch.cuda calls), it keeps DeepSpeed from
compiling C++ ops that a single CPU process does not need:
- the shared-memory all-reduce op (`deepspeed.comm.torch.build_shm_op`; world size 1 never uses it);
- FusedAdam: OpenRLHF's DeepSpeed optimizer config gets `torch_adam: true` (plain torch AdamW).
Needs RANK=0 WORLD_SIZE=1 LOCAL_RANK=-1 MASTER_ADDR/MASTER_PORT in the environment.
"""

import importlib
import runpy
import sys

import torch


def install() -> None:
    import cpu_shims

    cpu_shims.install()
    if torch.cuda.is_available():
        return
    import openrlhf.utils.deepspeed.deepspeed as ds

    # by module path: the attribute deepspeed.comm.torch is the torch package itself
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    stock = ds.get_train_ds_config

    def get_train_ds_config(*args, **kwargs):
        config = stock(*args, **kwargs)
        if config.get("optimizer", {}).get("type") == "AdamW":
            config["optimizer"]["params"]["torch_adam"] = True
        return config

    ds.get_train_ds_config = get_train_ds_config  # the strategy calls it through this module's globals


if __name__ == "__main__":
    install()
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
