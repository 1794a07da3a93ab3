"""LSC rewards inside OpenRLHF PPO: flag -> patched function -> tensor -> logged metric.

- The CLI (cli/train_ppo_ray.py) turns the `--lsc.*` flags into `args.lsc.spec`, a `RewardSpec`.
- K rewards per sample: local reward models return `[b, K]` from `RewardModelActor` (patched OpenRLHF: natively;
  stock: wrapped below); a `.py` reward_func or an agent returns named raw rewards as
  `extra_logs["lsc/<name>/reward"]`, which OpenRLHF copies into `experience.info` (`args.lsc.extra_logs`).
- `reward_hook(experiences, args)` runs first in `RemoteExperienceMaker.compute_advantages_and_returns` (stock: the
  wrapper below; patched OpenRLHF: `REWARD_HOOKS`): `reward_utilities` turns the `[N, K]` rewards into utilities
  that replace `experience.rewards` before stock's length penalties, baselines, KL penalty and clipping.
- Per-sample `experience.info` keys (logged as batch means): `lsc/reward`, `lsc/utility`, `lsc/clipped`,
  `lsc/<name>/{reward,utility,margin,above_ref}`; stock's `reward` is, as in stock, what PPO trains on.
- The step number is OpenRLHF's global step (`train_step` wrapped), so it continues after a resume.
"""

import importlib
import itertools
import json
import operator
import os
from typing import List

import torch

from openrlhf_lsc.integration import SETUP_HOOK, register, registered, wrap
from openrlhf_lsc.rewards import reward_utilities

_step = 0  # OpenRLHF's global step of the rollout being processed (set by the train_step wrapper)


class SetupError(RuntimeError):
    """The plugin cannot reach the Ray workers; the message names the fix."""


def apply() -> None:
    from openrlhf.trainer import ppo_trainer, ppo_trainer_async

    for trainer in (ppo_trainer.PPOTrainer, ppo_trainer_async.TrainingActor):  # sync, async
        # @ray.remote copies each method into the class Ray instantiates (and ships to workers): patch that one.
        cls = trainer.__ray_metadata__.modified_class
        wrap(cls, "train_step", ["self", "rollout_samples", "global_step"], _wrap_train_step)
    try:  # OpenRLHF with patches/ applied: its hook point and multi-RM reward actor replace the wrappers below
        from openrlhf.utils import plugins
    except ImportError:
        plugins = None
    if plugins is not None and hasattr(plugins, "REWARD_HOOKS"):
        if reward_hook not in plugins.REWARD_HOOKS:
            plugins.REWARD_HOOKS.append(reward_hook)
        return

    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    from openrlhf.trainer.ray.launcher import RewardModelActor

    wrap(RemoteExperienceMaker, "compute_advantages_and_returns", ["self", "experiences"], _wrap_advantages)
    rm_cls = RewardModelActor.__ray_metadata__.modified_class
    wrap(rm_cls, "init_model_from_pretrained", ["self", "strategy", "pretrain"], _wrap_rm_init)
    wrap(rm_cls, "forward", ["self", "sequences", "attention_mask", "packed_seq_lens", "pad_sequence"], _wrap_rm_forward)


def _wrap_train_step(original):
    def train_step(self, rollout_samples, global_step, **ray_kwargs):
        _set_step(global_step + 1)  # the step OpenRLHF logs for this rollout
        return original(self, rollout_samples, global_step, **ray_kwargs)

    return train_step


def _set_step(step: int) -> None:
    # A module function, not `global` in the wrapper: Ray ships the trainer's actor class with this wrapper by value
    # (cloudpickle), and a by-value function writes its globals into a copy; this function is shipped by name.
    global _step
    _step = step


def _wrap_advantages(original):
    def compute_advantages_and_returns(self, experiences):
        return original(self, reward_hook(experiences, self.strategy.args))

    return compute_advantages_and_returns


def _wrap_rm_init(original):
    def init_model_from_pretrained(self, strategy, pretrain, **ray_kwargs):
        paths = pretrain.split(",")
        if len(paths) == 1:
            return original(self, strategy, pretrain, **ray_kwargs)
        models = []
        for path in paths:
            original(self, strategy, path, **ray_kwargs)
            models.append(self.model)
            # The process group exists after the first load; stock init would set it up again.
            self._setup_distributed = lambda strategy: None
        del self._setup_distributed
        self.lsc_models = models

    return init_model_from_pretrained


def _wrap_rm_forward(original):
    def forward(self, sequences, attention_mask=None, packed_seq_lens=None, pad_sequence=False, **ray_kwargs):
        models = getattr(self, "lsc_models", None)
        if models is None:
            return original(self, sequences, attention_mask, packed_seq_lens, pad_sequence, **ray_kwargs)
        rewards = []
        for model in models:
            self.model = model
            rewards.append(original(self, sequences, attention_mask, packed_seq_lens, pad_sequence, **ray_kwargs))
        self.model = models[0]
        return torch.stack(rewards, dim=-1)  # [b, K]

    return forward


def reward_hook(experiences: List, args) -> List:
    """Replace each experience's rewards by the utility of `args.lsc.spec`, in place (no-op without it).

    The same function is the stock wrapper's first step and a patched OpenRLHF's `REWARD_HOOKS` entry.
    """
    cfg = getattr(args, "lsc", None)
    if cfg is None or cfg.spec is None:
        return experiences
    spec, n = cfg.spec, args.rollout.n_samples_per_prompt
    order = torch.tensor([i for e in experiences for i in e.index])
    if cfg.extra_logs:
        keys = [f"lsc/{name}/reward" for name in spec.names]
        for e in experiences:
            missing = [k for k in keys if k not in e.info]
            if missing:
                raise ValueError(
                    f"--lsc.reward_names {','.join(spec.names)}: the reward function / agent returned no "
                    f"extra_logs[{missing[0]!r}] (it returned {sorted(k for k in e.info if k.startswith('lsc/'))}); "
                    "return each named raw reward under extra_logs['lsc/<name>/reward']"
                )
        batch = torch.stack([torch.cat([e.info[k].reshape(-1) for e in experiences]) for k in keys], dim=1)
    else:
        batch = torch.cat([e.rewards.reshape(len(e.index), -1) for e in experiences])
    rewards = torch.empty_like(batch)
    rewards[order] = batch  # prompt-major: n consecutive samples per prompt, as the stock baselines use them
    labels = where = None
    if spec.reference == "label":  # per-sample lists in prompt-major order, without a Python loop per sample
        inverse = torch.argsort(order).tolist()
        pick = operator.itemgetter(*inverse) if len(inverse) > 1 else lambda xs: (xs[inverse[0]],)
        labels = list(pick(list(itertools.chain.from_iterable(e.labels for e in experiences))))
        prompts = list(itertools.chain.from_iterable(e.prompts for e in experiences))
        if len(prompts) == len(labels):
            where = [f"prompt {p!r:.80}" for p in pick(prompts)[::n]]
    utility, metrics = reward_utilities(rewards, spec, labels, n, where)

    clip = args.reward.clip_range
    if clip is not None:
        metrics["lsc/clipped"] = ((utility < clip[0]) | (utility > clip[1])).to(utility.dtype)
    keys = list(metrics)
    stacked = torch.stack([metrics[k].to(utility.dtype) for k in keys], dim=1)[order]  # back to experience order
    for e, part in zip(experiences, stacked.split([len(e.index) for e in experiences])):
        e.info.update(zip(keys, part.unbind(1)))
        # The source's raw reward: its scalar, or the sum of K local reward models' rewards.
        e.info["lsc/reward"] = e.rewards.float().reshape(len(e.index), -1).sum(1)
        e.rewards = e.info["lsc/utility"]
        e.info["reward"] = e.rewards.clone()  # as stock: the reward PPO trains on (stock re-syncs it after penalties)
    if cfg.dump_rewards:
        _dump(cfg.dump_rewards, experiences, order, rewards, metrics, spec.names)
    return experiences


def _dump(path: str, experiences, order, rewards, metrics, names) -> None:
    """Append one JSON line per sample: what the reward source returned and what the trainer optimises."""
    sequences = [None] * len(rewards)
    for i, seq, mask in zip(order.tolist(), (s for e in experiences for s in e.sequences),
                            (m for e in experiences for m in e.attention_mask)):
        sequences[i] = seq[mask.bool()].tolist()
    margins = [metrics.get(f"lsc/{name}/margin") for name in names]
    references = None if margins[0] is None else rewards - torch.stack(margins, dim=1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        for i in range(len(rewards)):
            row = {"step": _step, "sample": i, "sequence": sequences[i], "rewards": rewards[i].tolist(),
                   "references": None if references is None else references[i].tolist(),
                   "utility": metrics["lsc/utility"][i].item()}
            f.write(json.dumps(row) + "\n")


def train(stock, args) -> None:
    """Run stock's `train(args)` with the plugin in every process.

    The plugin is registered here; stock's own `ray.init` gets the plugin's `worker_process_setup_hook` merged
    into its runtime env (unless a `ray job submit` runtime env sets a hook already: Ray refuses two); and right
    after Ray is up (at stock's `get_strategy`, also when the caller started Ray) a probe task checks that Ray
    workers have the plugin. Everything patched here is restored afterwards.
    """
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
    if spec.transform == "center" and args.algo.advantage.estimator in ("rloo", "reinforce_baseline", "dr_grpo", "group_norm"):
        logger.info(f"openrlhf_lsc: --lsc.transform center is cancelled by the group baseline of "
                    f"{args.algo.advantage.estimator} (it equals raw there); lsc is not")
    clip = args.reward.clip_range
    if spec.transform in ("lsc", "logsigmoid") and clip is not None and clip[0] > -30:
        logger.info(f"openrlhf_lsc: utilities below {clip[0]} (a reward that far below its reference) are clipped "
                    "by --reward.clip_range; the fraction clipped is logged as lsc/clipped")
    if args.algo.dynamic_filtering_enable:
        logger.info("openrlhf_lsc: --algo.dynamic_filtering_enable filters on the reward source's raw scores "
                    "(at generation, before the LSC transform)")
    if args.lsc.dump_rewards:
        logger.info(f"openrlhf_lsc: the PPO trainer process appends per-sample rewards to {args.lsc.dump_rewards}")
