"""Test-only: loads the CPU harness shims at interpreter start when CPU_HARNESS_SHIMS=1, so a `ray job submit`
run needs no worker_process_setup_hook of its own (the plugin CLI adds its hook, as on a GPU cluster)."""

import os

if os.environ.get("CPU_HARNESS_SHIMS") == "1":
    import cpu_harness.worker_shims  # noqa: F401
