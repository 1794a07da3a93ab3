"""LSC rewards inside OpenRLHF PPO: flag -> patched function -> tensor -> logged metric.

- The CLI (cli/train_ppo_ray.py) turns the `--lsc.*` flags into `args.lsc.spec`, a `RewardSpec`.
- K rewards per sample: local reward models return `[b, K]` from `RewardModelActor` (patched OpenRLHF: natively;
  stock: wrapped below); a `.py` reward_func or an agent returns named raw rewards as
  `extra_logs["lsc/<name>/reward"]`, which OpenRLHF copies into `experience.info` (`args.lsc.extra_logs`).
- `reward_hook(experiences, args)` runs first in `RemoteExperienceMaker.compute_advantages_and_returns` (stock: the
  wrapper below; patched OpenRLHF: `REWARD_HOOKS`): `reward_utilities` turns the `[N, K]` rewards into utilities
  that replace `experience.rewards` before stock's length penalties, baselines, KL penalty and clipping.
- Per-sample `experience.info` keys (lists of floats, logged as batch means): `lsc/reward`, `lsc/utility`,
  `lsc/clipped`, `lsc/<name>/{reward,utility,margin,above_ref}`; stock's `reward` (a tensor) is, as in stock, what
  PPO trains on.
- The step number is OpenRLHF's global step (`train_step` wrapped), so it continues after a resume.
- `--lsc.monitor.reward_models` (M evaluators) are appended to the reward actors' models: they return `[b, K + M]`;
  `reward_hook` gives the first K columns to `reward_utilities` and the last M to `Monitor.update` in the trainer
  process (where it runs), whose `monitor/*` metrics join `experience.info` as constants; see `_observe`.
"""

import importlib
import itertools
import json
import operator
import os
from types import SimpleNamespace
from typing import List

import numpy as np
import torch

from openrlhf_lsc.integration import SETUP_HOOK, register, registered, wrap
from openrlhf_lsc.monitor import Monitor
from openrlhf_lsc.rewards import reward_utilities

_step = 0  # OpenRLHF's global step of the rollout being processed (set by the train_step wrapper)
_monitor = None  # SimpleNamespace(cfg, monitor, tokenizer) of this process's run (the process running reward_hook)
MONITOR_FILE = "lsc_monitor.json"


class SetupError(RuntimeError):
    """The plugin cannot reach the Ray workers; the message names the fix."""


def apply() -> None:
    from openrlhf.trainer import ppo_trainer, ppo_trainer_async
    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator

    for trainer in (ppo_trainer.PPOTrainer, ppo_trainer_async.TrainingActor):  # sync, async
        # @ray.remote copies each method into the class Ray instantiates (and ships to workers): patch that one.
        cls = trainer.__ray_metadata__.modified_class
        wrap(cls, "train_step", ["self", "rollout_samples", "global_step"], _wrap_train_step)
    wrap(SamplesGenerator, "generate_samples", ["self", "generate_kwargs"], _wrap_generate)
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
        out = original(self, rollout_samples, global_step, **ray_kwargs)
        if _stopping():  # fit's save_logs_and_checkpoints, next, then saves this step through OpenRLHF's own path
            self.args.ckpt.save_steps = 1
        return out

    return train_step


def _wrap_generate(original):
    def generate_samples(self, **generate_kwargs):
        if _stopping():  # "prompts exhausted": PPOTrainer.fit ends its episodes, closes its loggers and returns
            return [], None, 0, True
        return original(self, **generate_kwargs)

    return generate_samples


def _stopping() -> bool:
    """--lsc.monitor.stop and the monitor fired in this process (the sync PPO trainer: sampler and reward_hook)."""
    return _monitor is not None and _monitor.cfg.stop and _monitor.monitor.fired_step is not None


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
    order = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(e.index for e in experiences), np.int64))
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
        batch = torch.cat([e.rewards for e in experiences]).reshape(len(order), -1)  # [b] or [b, K] each
    k = len(spec.names)  # local reward models: the M evaluator columns of --lsc.monitor.reward_models follow
    rewards, evaluators = torch.empty_like(batch[:, :k]), torch.empty_like(batch[:, k:])
    rewards[order], evaluators[order] = batch[:, :k], batch[:, k:]  # prompt-major: n samples per prompt, as stock
    labels = None
    if spec.reference == "label":  # per-sample lists in prompt-major order, without a Python loop per sample
        inverse = torch.argsort(order).tolist()
        pick = operator.itemgetter(*inverse) if len(inverse) > 1 else lambda xs: (xs[inverse[0]],)
        labels = list(pick(list(itertools.chain.from_iterable(e.labels for e in experiences))))
    try:
        utility, metrics = reward_utilities(rewards, spec, labels, n)
    except ValueError:  # the same error again, naming the prompts by their text (not built for every step)
        prompts = list(itertools.chain.from_iterable(e.prompts for e in experiences))
        if labels is None or len(prompts) != len(labels):
            raise
        try:
            reward_utilities(rewards, spec, labels, n, [f"prompt {p!r:.80}" for p in pick(prompts)[::n]])
        except ValueError as named:
            raise named from None
        raise

    clip = args.reward.clip_range
    if clip is not None:
        metrics["lsc/clipped"] = ((utility < clip[0]) | (utility > clip[1])).to(utility.dtype)
    # Per-sample metrics back in experience order, as Python lists: OpenRLHF logs lists like tensors and Ray ships them
    # cheaply, while a per-experience view of a batch tensor would ship the whole batch's storage with every one.
    columns = {k: v.to(utility.dtype)[order].tolist() for k, v in metrics.items()}
    source = torch.cat([e.rewards for e in experiences]).reshape(len(order), -1) if cfg.extra_logs else batch
    columns["lsc/reward"] = source[:, :k].float().sum(1).tolist()  # the source's raw reward (or the K RMs' sum)
    reward, start = utility[order], 0
    for e in experiences:
        end = start + len(e.index)
        e.info.update({key: values[start:end] for key, values in columns.items()})
        # What PPO trains on, a tensor with its own storage: stock's `reward` (stock's length penalties change it in
        # place; lsc/utility keeps the plugin's utility).
        e.rewards = e.info["reward"] = reward[start:end].clone()
        start = end
    if getattr(cfg, "monitor", None) is not None:
        _observe(cfg, args, experiences, order, rewards, evaluators, metrics)
    if cfg.dump_rewards:
        _dump(cfg.dump_rewards, experiences, order, rewards, metrics, spec.names)
    return experiences


def _observe(cfg, args, experiences, order, proxies, evaluators, metrics) -> None:
    """One `Monitor.update` per step; its metrics go to every sample's info (logged as batch means), its summary to
    `<ckpt.output_dir>/lsc_monitor.json`, and a warning to the log the step the stop rule fires."""
    global _monitor
    mon = cfg.monitor
    if _monitor is None or _monitor.cfg is not mon:
        from transformers import AutoTokenizer  # the policy's, for the responses' text (patterns, length)

        tokenizer = AutoTokenizer.from_pretrained(args.actor.model_name_or_path, trust_remote_code=True,
                                                  use_fast=not args.data.disable_fast_tokenizer)
        _monitor = SimpleNamespace(cfg=mon, tokenizer=tokenizer,
                                   monitor=Monitor(cfg.spec.names, mon.names, mon.patterns, mon.window, mon.patience))
    responses = [None] * len(proxies)
    for i, seq, act in zip(order.tolist(), (s for e in experiences for s in e.sequences),
                           (m for e in experiences for m in e.action_mask)):
        responses[i] = seq[1:][act.bool()]  # action_mask[t] marks token t + 1 (OpenRLHF's shifted mask)
    responses = _monitor.tokenizer.batch_decode(responses, skip_special_tokens=True)
    above = {n: metrics[f"lsc/{n}/above_ref"] for n in cfg.spec.names if f"lsc/{n}/above_ref" in metrics}
    values, fired = _monitor.monitor.update(_step, proxies, evaluators, above, responses)
    for e in experiences:
        e.info.update({key: [v] * len(e.index) for key, v in values.items()})
    summary = _monitor.monitor.summary()
    if fired:
        from openrlhf.utils.logging_utils import init_logger

        then = "saving a checkpoint and stopping (--lsc.monitor.stop)" if mon.stop else "training goes on"
        init_logger(__name__).warning(f"openrlhf_lsc monitor: {summary['message']}; {then}")
    path = os.path.join(args.ckpt.output_dir, MONITOR_FILE)
    os.makedirs(args.ckpt.output_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({**summary, "evaluators": dict(zip(mon.names, mon.reward_models)),
                   "history": _monitor.monitor.state_dict()}, f, indent=1)
    os.replace(path + ".tmp", path)


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
