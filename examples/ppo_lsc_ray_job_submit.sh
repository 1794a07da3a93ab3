#!/usr/bin/env bash
# GPUs:   those of the flags you pass (e.g. the flags of examples/ppo_lsc_single_rm.sh: 1 node x 8 GPUs, 80 GB)
# Models: those of the flags you pass
#
# The same plugin launch under `ray job submit` on an existing Ray cluster. The CLI's ray.init connects to
# the cluster and adds the plugin's worker_process_setup_hook; a probe task then checks that workers have the
# plugin and fails with instructions otherwise. Pass the hook in the job's runtime env too, so every worker of
# the job (including ones Ray starts before the driver's init) loads it:
set -euo pipefail
ray job submit --address="${RAY_ADDRESS:-http://127.0.0.1:8265}" \
   --runtime-env-json='{"working_dir": ".", "worker_process_setup_hook": "openrlhf_lsc.integration.setup_worker"}' \
   -- python -m openrlhf_lsc.cli.train_ppo_ray "$@"
# e.g. bash examples/ppo_lsc_ray_job_submit.sh <the flags of examples/ppo_lsc_single_rm.sh>
