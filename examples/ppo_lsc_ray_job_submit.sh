#!/usr/bin/env bash
# GPUs:   those of the flags you pass (e.g. the flags of examples/ppo_lsc_single_rm.sh: 1 node x 8 GPUs, 80 GB)
# Models: those of the flags you pass
#
# The plugin launch under `ray job submit` on an existing Ray cluster. Nothing plugin-specific goes into the
# job's runtime env: stock's own ray.init joins the cluster and the plugin CLI adds its worker_process_setup_hook
# to it; a probe task then checks that the workers have the plugin (one error line naming the fixes otherwise).
# If your job's runtime env must set its own worker_process_setup_hook, make that hook call
# openrlhf_lsc.integration.setup_worker(), or use the autoloader (docs/plugin-loading.md).
# --lsc.dump_rewards must be an absolute path: the job runs in Ray's temporary copy of working_dir.
set -euo pipefail
ray job submit --address="${RAY_ADDRESS:-http://127.0.0.1:8265}" \
   --runtime-env-json='{"working_dir": "."}' \
   -- python -m openrlhf_lsc.cli.train_ppo_ray "$@"
# e.g. bash examples/ppo_lsc_ray_job_submit.sh <the flags of examples/ppo_lsc_single_rm.sh>
