"""Test-only launcher: `python -m rm_cpu_shims <module> <args...>` runs <module> as __main__ on a CPU machine.

It installs `cpu_shims.install()` (OpenRLHF's hard-coded torch.cuda calls) and
`cpu_shims.skip_deepspeed_op_builds()` (no C++ op compilation).
Needs RANK=0 WORLD_SIZE=1 LOCAL_RANK=-1 MASTER_ADDR/MASTER_PORT in the environment.
"""

import runpy
import sys


def install() -> None:
    import cpu_shims

    cpu_shims.install()
    cpu_shims.skip_deepspeed_op_builds()


if __name__ == "__main__":
    install()
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
