"""LSC rewards inside OpenRLHF PPO's reward/advantage step: flag -> patched function -> tensor -> logged metric.

- The CLI (cli/train_ppo_ray.py) turns the `--lsc.*` reward flags into `args.lsc.spec`, a `RewardSpec`.
- K rewards per sample: local reward models return `[b, K]` from the reward actor (`reward_actor`); a `.py`
  reward_func or an agent returns named raw rewards as `extra_logs["lsc/<name>/reward"]`, which OpenRLHF copies into
  `experience.info` (`args.lsc.extra_logs`).
- `reward_hook(experiences, args)` runs first in `RemoteExperienceMaker.compute_advantages_and_returns` (stock: the
  wrapper below; patched OpenRLHF: `REWARD_HOOKS`): `reward_utilities` turns the `[N, K]` rewards into utilities
  that replace `experience.rewards` before stock's length penalties, baselines, KL penalty and clipping.
- Per-sample `experience.info` keys (lists of floats, logged as batch means): `lsc/reward`, `lsc/utility`,
  `lsc/<name>/{reward,utility,margin,above_ref}`, and `lsc/clipped`, counted where stock clips: in its
  `compute_reward`, on the reward after length penalties and the group baseline. Stock's `reward` (a tensor) is, as
  in stock, what PPO trains on.
- The batch's spread of the utility and of the same aggregation of the raw rewards, `lsc/utility_std` and
  `lsc/reward_std` (a transform changes the reward's scale, and with it the strength of the KL coefficient), and
  `lsc/scale`: `--lsc.scale` (a number, or `match`: fixed on the first batch so the two spreads agree).
- `--lsc.monitor.reward_models` (M evaluators) follow the K proxies in the reward actors' `[b, K + M]` output:
  `reward_hook` gives the first K columns to `reward_utilities` and the last M to the monitor (`monitor.observe`).
"""

import itertools
import json
import operator
import os
from typing import List

import numpy as np
import torch

from openrlhf_lsc.integration import bind, monitor, wrap
from openrlhf_lsc.rewards import aggregate_rewards, reward_utilities

_clip_queue: List = []  # experiences whose stock compute_reward call is still to come, in order


def apply() -> None:
    from openrlhf.trainer.ppo_utils import experience_maker

    wrap(experience_maker, "compute_reward", ["r", "kl_coef", "kl", "action_mask", "reward_clip_range"], _wrap_compute_reward)
    try:  # OpenRLHF with patches/ applied: its hook point replaces the wrapper below
        from openrlhf.utils import plugins
    except ImportError:
        plugins = None
    if plugins is not None and hasattr(plugins, "REWARD_HOOKS"):
        if reward_hook not in plugins.REWARD_HOOKS:
            plugins.REWARD_HOOKS.append(reward_hook)
        return
    wrap(experience_maker.RemoteExperienceMaker, "compute_advantages_and_returns", ["self", "experiences"],
         _wrap_advantages)


def _wrap_advantages(original):
    def compute_advantages_and_returns(self, experiences):
        return original(self, reward_hook(experiences, self.strategy.args))

    return compute_advantages_and_returns


def _wrap_compute_reward(original):
    def compute_reward(*args, **kwargs):
        # stock calls it once per experience, in order, with that experience's shaped rewards
        if _clip_queue:
            call = bind(original, *args, **kwargs).arguments
            experience, clip, r = _clip_queue.pop(0), call["reward_clip_range"], call["r"]
            if len(r) != len(experience.index):
                _clip_queue.clear()
                raise RuntimeError(f"openrlhf_lsc: stock compute_reward got {len(r)} rewards for an experience of "
                                   f"{len(experience.index)} samples; OpenRLHF changed, use a matching openrlhf_lsc")
            experience.info["lsc/clipped"] = ((r < clip[0]) | (r > clip[1])).float().tolist()
        return original(*args, **kwargs)

    return compute_reward


def reward_hook(experiences: List, args) -> List:
    """Replace each experience's rewards by the utility of `args.lsc.spec`, in place (no-op without it).

    The same function is the stock wrapper's first step and a patched OpenRLHF's `REWARD_HOOKS` entry.
    """
    _clip_queue.clear()  # whatever an earlier step left: stock's compute_reward must then run as stock
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

    raw = aggregate_rewards(rewards, None, "raw", spec.aggregate, spec.weights, n)  # what raw PPO would train on
    scale = _scale(cfg, utility, raw)
    if scale != 1.0:
        utility = metrics["lsc/utility"] = utility * scale
    # Per-sample metrics back in experience order, as Python lists: OpenRLHF logs lists like tensors and Ray ships them
    # cheaply, while a per-experience view of a batch tensor would ship the whole batch's storage with every one.
    columns = {key: v.to(utility.dtype)[order].tolist() for key, v in metrics.items()}
    spread = {"lsc/utility_std": utility.float().std().item(), "lsc/reward_std": raw.float().std().item(),
              "lsc/scale": scale}
    source = torch.cat([e.rewards for e in experiences]).reshape(len(order), -1) if cfg.extra_logs else batch
    columns["lsc/reward"] = source[:, :k].float().sum(1).tolist()  # the source's raw reward (or the K RMs' sum)
    reward, start = utility[order], 0
    for e in experiences:
        end = start + len(e.index)
        e.info.update({key: values[start:end] for key, values in columns.items()})
        e.info.update({key: [value] * len(e.index) for key, value in spread.items()})
        # What PPO trains on, a tensor with its own storage: stock's `reward` (stock's length penalties change it in
        # place; lsc/utility keeps the plugin's utility).
        e.rewards = e.info["reward"] = reward[start:end].clone()
        start = end
    if args.reward.clip_range is not None:
        _clip_queue[:] = experiences  # lsc/clipped: counted in stock's compute_reward, one call per experience
    if getattr(cfg, "monitor", None) is not None:
        monitor.observe(cfg, args, experiences, order, rewards, evaluators, metrics)
    if cfg.dump_rewards:
        _dump(cfg.dump_rewards, experiences, order, rewards, metrics, spec.names)
    return experiences


def _scale(cfg, utility, raw) -> float:
    """The factor of --lsc.scale: 1 without it, the number given, or (match) std(raw) / std(utility) of the first
    batch of the run, kept on its `args.lsc` for the rest of it."""
    if cfg.scale != "match":
        return 1.0 if cfg.scale is None else float(cfg.scale)
    if getattr(cfg, "matched_scale", None) is None:
        spread = utility.float().std().item()
        if not spread > 1e-6 * max(1.0, utility.abs().max().item()):  # float32 rounding of equal values
            raise ValueError("--lsc.scale match: the first batch's utilities are all equal, so there is no spread to "
                             "match; give --lsc.scale a number instead")
        cfg.matched_scale = raw.float().std().item() / spread
    return cfg.matched_scale


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
            row = {"step": monitor.step(), "sample": i, "sequence": sequences[i], "rewards": rewards[i].tolist(),
                   "references": None if references is None else references[i].tolist(),
                   "utility": metrics["lsc/utility"][i].item()}
            f.write(json.dumps(row) + "\n")
