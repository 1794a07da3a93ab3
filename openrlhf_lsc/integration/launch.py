"""The plugin CLI's run of stock `train(args)` with the plugin in every process (Ray bootstrap).

The plugin is registered in the driver; stock's own `ray.init` gets the plugin's `worker_process_setup_hook` merged
into its runtime env (unless a `ray job submit` runtime env sets a hook already: Ray refuses two); and right after
Ray is up (at stock's `get_strategy`, also when the caller started Ray) a probe task checks that Ray workers have the
plugin. Everything patched here is restored afterwards.
"""

import importlib
import json
import os

from openrlhf_lsc.integration import SETUP_HOOK, register, registered

GROUP_MEAN_ESTIMATORS = ("rloo", "reinforce_baseline", "dr_grpo", "group_norm")


class SetupError(RuntimeError):
    """The plugin cannot reach the Ray workers; the message names the fix."""


def train(stock, args) -> None:
    """Run stock's `train(args)` (`stock`: the `StockCLI` of train_ppo_ray) with the plugin in every Ray worker."""
    import ray

    from openrlhf.utils.logging_utils import init_logger

    module = importlib.import_module(stock.module)
    register()
    _notes(args, init_logger(__name__))
    init, get_strategy = ray.init, module.get_strategy

    def ray_init(*a, runtime_env=None, **kw):
        if _job_setup_hook() is None:
            runtime_env = {**(runtime_env or {}), "worker_process_setup_hook": SETUP_HOOK}
        return init(*a, runtime_env=runtime_env, **kw)

    def get_strategy_after_probe(*a, **kw):
        if not ray.get(ray.remote(num_cpus=0)(registered).remote()):
            hook = _job_setup_hook()
            cause = f"the job's runtime env sets worker_process_setup_hook={hook!r}" if hook else \
                "Ray was started without the plugin's worker_process_setup_hook"
            raise SetupError(
                f"openrlhf_lsc is not registered in the Ray workers: {cause}. Fix: set worker_process_setup_hook "
                f"to {SETUP_HOOK!r} (ray.init runtime_env, or `ray job submit --runtime-env-json`), or call "
                f"{SETUP_HOOK}() from your own hook, or let this CLI start Ray; where the hook is taken, run "
                "`python -m openrlhf_lsc.integration.autoload install` on every node and add "
                '"OPENRLHF_LSC_AUTOLOAD": "1" to the runtime env\'s env_vars'
            )
        return get_strategy(*a, **kw)

    ray.init, module.get_strategy = ray_init, get_strategy_after_probe
    try:
        module.train(args)
    finally:
        ray.init, module.get_strategy = init, get_strategy


def _job_setup_hook():
    """The worker_process_setup_hook of the `ray job submit` runtime env this driver runs in, if any."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    return (job.get("runtime_env") or {}).get("worker_process_setup_hook")


def _notes(args, logger) -> None:
    spec = args.lsc.spec
    if spec is None:
        return
    if spec.transform == "center" and args.algo.advantage.estimator in GROUP_MEAN_ESTIMATORS:
        logger.info(f"openrlhf_lsc: --lsc.transform center is cancelled by the group baseline of "
                    f"{args.algo.advantage.estimator} (it equals raw there); lsc is not")
    clip = args.reward.clip_range
    if spec.transform in ("lsc", "logsigmoid") and clip is not None and clip[0] > -30:
        logger.info(f"openrlhf_lsc: rewards below {clip[0]} after the group baseline are clipped by "
                    "--reward.clip_range; the fraction clipped is logged as lsc/clipped")
    if args.algo.dynamic_filtering_enable:
        logger.info("openrlhf_lsc: --algo.dynamic_filtering_enable filters on the reward source's raw scores "
                    "(at generation, before the LSC transform)")
    if args.lsc.dump_rewards:
        logger.info(f"openrlhf_lsc: the PPO trainer process appends per-sample rewards to {args.lsc.dump_rewards}")
