"""Run OpenRLHF's real `train_ppo_ray` on a CPU machine (tests only).

    python tests/cpu_harness/driver.py [--returns FILE] [--engine-checksums FILE] [--job] -- <train_ppo_ray flags>

Starts Ray with logical GPUs (every OpenRLHF model actor asks for one) and the harness's worker setup hook
(`worker_shims.setup_worker`: CPU shims, then the plugin's hook), makes the rollout engines `fake_vllm`
actors, then runs the plugin CLI `openrlhf_lsc.cli.train_ppo_ray.main(flags)`. With `--job` (under
`ray job submit`, whose runtime env carries the hook and ENV) it starts nothing: stock's own `ray.init`
joins the job's cluster.
`--returns` records per sample the return OpenRLHF computed (see worker_shims);
`--engine-checksums` writes each engine's final weight checksum (JSON list) after training, to
check weight sync against the saved actor.
"""

import argparse
import json
import os
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
PATHS = [str(TESTS / "stubs"), str(TESTS), str(ROOT)]
sys.path[:0] = [p for p in PATHS if p not in sys.path]

ENV = {
    # Ray workers and the vLLM/flash-attn stand-ins: the same paths as this process.
    "PYTHONPATH": os.pathsep.join(PATHS + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
    "DS_ACCELERATOR": "cpu",
    "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions")),
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "disabled",
    "HF_HUB_OFFLINE": "1",
}
SETUP_HOOK = "cpu_harness.worker_shims.setup_worker"
LOGICAL_GPUS = 8  # one per actor / critic / reference / reward model / engine, with room to spare


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--returns", type=Path, help="append per-sample returns computed by OpenRLHF here")
    parser.add_argument("--engine-checksums", type=Path, help="write the engines' final weight checksums here")
    parser.add_argument("--job", action="store_true", help="run inside `ray job submit`: do not start Ray")
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="train_ppo_ray flags, after --")
    opts = parser.parse_args(argv)
    flags = opts.flags[1:] if opts.flags[:1] == ["--"] else opts.flags
    if opts.returns:
        ENV["CPU_HARNESS_RETURNS"] = str(opts.returns.resolve())
    os.environ.update(ENV)

    from cpu_harness import fake_vllm, worker_shims  # noqa: F401  (installs the shims in the driver)

    import openrlhf.cli.train_ppo_ray as stock
    import ray

    engines = []  # kept to read their weights after training

    def create_engines(*args, **kwargs):
        engines.extend(fake_vllm.create_vllm_engines(*args, **kwargs))
        return engines

    stock.create_vllm_engines = create_engines  # stock's train() calls the name it imported

    from openrlhf_lsc.cli.train_ppo_ray import main as plugin_main

    if not opts.job:
        ray.init(
            address="local",  # a cluster of its own, never another one running on this machine
            num_cpus=LOGICAL_GPUS,
            num_gpus=LOGICAL_GPUS,
            include_dashboard=False,  # its ~10 helper processes only slow the start on 2 cores
            runtime_env={"worker_process_setup_hook": SETUP_HOOK, "env_vars": ENV},
        )
    try:
        plugin_main(flags)
        if opts.engine_checksums:
            sums = ray.get([e.parameters_checksum.remote() for e in engines])
            opts.engine_checksums.write_text(json.dumps(sums))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
