"""LSC rewards inside OpenRLHF PPO: two wrapped OpenRLHF functions.

flag -> patched function -> tensor -> logged metric:
- `--lsc.reward_models A,B` -> `RewardModelActor.init_model_from_pretrained` / `.forward` load K reward
  models in each reward actor and return `[b, K]` rewards (stock forward, once per model).
- `--lsc.transform/aggregate/reference/...` -> `RemoteExperienceMaker.compute_advantages_and_returns`
  replaces each experience's `rewards` by the aggregated utility BEFORE stock length penalties, group
  baselines, KL penalty and `--reward.clip_range` clipping, then runs the stock function.
- Per reward model, `experience.info["lsc/<name>/{reward,margin,above_ref,utility}"]` (per-sample) flow through
  the actor's step status into OpenRLHF's wandb/tensorboard logs as batch means.
"""

import json
import os
from typing import List, Optional

import torch

from openrlhf_lsc.integration import wrap
from openrlhf_lsc.references import references_from_labels
from openrlhf_lsc.rewards import aggregate_rewards, check_finite, group_quantile_reference, transform_reward

GROUP_MEAN_ESTIMATORS = ("rloo", "reinforce_baseline", "dr_grpo", "group_norm")


def apply() -> None:
    try:  # OpenRLHF with patches/ applied: its hook points replace the wrappers below
        from openrlhf.utils import plugins
    except ImportError:
        plugins = None
    if plugins is not None and hasattr(plugins, "REWARD_HOOKS"):
        if reward_hook not in plugins.REWARD_HOOKS:
            plugins.REWARD_HOOKS.append(reward_hook)
        return  # the patched RewardModelActor loads the K reward models itself

    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    from openrlhf.trainer.ray.launcher import RewardModelActor

    wrap(RemoteExperienceMaker, "compute_advantages_and_returns", ["self", "experiences"], _wrap_advantages)
    # @ray.remote copies each method into the class Ray instantiates (and ships to workers): patch that one.
    rm_cls = RewardModelActor.__ray_metadata__.modified_class
    wrap(rm_cls, "init_model_from_pretrained", ["self", "strategy", "pretrain"], _wrap_rm_init)
    wrap(
        rm_cls,
        "forward",
        ["self", "sequences", "attention_mask", "packed_seq_lens", "pad_sequence"],
        _wrap_rm_forward,
    )


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


_hook_steps = 0


def reward_hook(experiences, args):
    """`REWARD_HOOKS` entry for a patched OpenRLHF (patches/0002): the same transform as the wrapper."""
    global _hook_steps
    if getattr(args, "lsc", None) is not None:
        _hook_steps += 1
        apply_lsc_rewards(experiences, args, _hook_steps)
    return experiences


def _wrap_advantages(original):
    def compute_advantages_and_returns(self, experiences):
        cfg = getattr(self.strategy.args, "lsc", None)
        if cfg is not None:
            self.lsc_step = getattr(self, "lsc_step", 0) + 1
            apply_lsc_rewards(experiences, self.strategy.args, self.lsc_step)
        return original(self, experiences)

    return compute_advantages_and_returns


def apply_lsc_rewards(experiences: List, args, step: int = 0) -> torch.Tensor:
    """Replace every experience's rewards by the LSC utility, in place; return the utilities in sample order.

    `args` is OpenRLHF's args namespace with `args.lsc` attached by the plugin CLI.
    """
    cfg = args.lsc
    names = list(cfg.reward_names)
    exp_len = [len(e.index) for e in experiences]
    indices = torch.tensor([i for e in experiences for i in e.index])
    for e in experiences:
        if "lsc_transformed" in e.info and cfg.transform != "raw":
            raise ValueError(
                "rewards come from openrlhf_lsc's reward_func, which already applied the transform; "
                f"use --lsc.transform raw with it, not {cfg.transform!r}"
            )
    batch = torch.cat([e.rewards.reshape(len(e.index), -1) for e in experiences], dim=0)
    if batch.shape[1] != len(names):
        raise ValueError(
            f"the reward models returned {batch.shape[1]} rewards per sample but --lsc.reward_names lists "
            f"{len(names)} ({', '.join(names)})"
        )
    # Sample order (prompt-major, n_samples_per_prompt per prompt), as the stock baselines use it.
    rewards = torch.empty_like(batch)
    rewards[indices] = batch
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    check_finite(rewards, "rewards from the reward models")
    labels = [None] * len(rewards)
    for i, label in zip(indices.tolist(), (lab for e in experiences for lab in e.labels)):
        labels[i] = label

    references = _references(cfg, args, rewards, labels)
    per_rm = transform_reward(rewards, references, cfg.transform)  # [N, K], transformed once
    # The columns are utilities already: aggregate them as they are ("raw").
    utility = aggregate_rewards(per_rm, None, "raw", cfg.aggregate, cfg.weights)
    if cfg.transform == "raw" and len(names) == 1:
        utility = utility.to(rewards.dtype)  # keep stock numerics exactly

    per_sample = {"lsc/utility": utility}
    for k, name in enumerate(names):
        per_sample[f"lsc/{name}/reward"] = rewards[:, k]
        per_sample[f"lsc/{name}/utility"] = per_rm[:, k]
        if references is not None:
            per_sample[f"lsc/{name}/margin"] = rewards[:, k] - references[:, k]
            per_sample[f"lsc/{name}/above_ref"] = (rewards[:, k] > references[:, k]).float()
    clip = getattr(args.reward, "clip_range", None)
    if clip is not None:
        clipped = ((utility < clip[0]) | (utility > clip[1])).float()
        per_sample["lsc/clipped"] = clipped
        if clipped.any():
            print(
                f"[openrlhf_lsc] step {step}: {clipped.mean().item():.1%} of transformed rewards lie outside "
                f"--reward.clip_range {tuple(clip)} and will be clipped"
            )

    # Back to experience order; one split and one unbind per experience keep this cheap at 10^4 samples.
    keys = list(per_sample)
    stacked = torch.stack([per_sample[k].to(utility.dtype) for k in keys], dim=1)[indices]
    for e, part in zip(experiences, stacked.split(exp_len)):
        e.info.update(zip(keys, part.unbind(1)))
        e.rewards = e.info["lsc/utility"]
        e.info["reward"] = e.rewards.clone()

    if cfg.dump_rewards:
        _dump(cfg.dump_rewards, step, experiences, rewards, references, utility, indices)
    return utility


def _references(cfg, args, rewards: torch.Tensor, labels: list) -> Optional[torch.Tensor]:
    kind = cfg.reference
    if kind == "none":
        return None
    if kind == "label":
        return references_from_labels(labels, cfg.reward_names, args.data.label_key).to(rewards.dtype)
    if kind == "group":
        return group_quantile_reference(rewards, args.rollout.n_samples_per_prompt, cfg.quantile)
    if kind == "constant":
        return torch.tensor(cfg.reference_value, dtype=rewards.dtype).expand_as(rewards)
    raise ValueError(f"unknown --lsc.reference {kind!r}: expected none, label, group or constant")


def _dump(path: str, step: int, experiences, rewards, references, utility, indices) -> None:
    """Append one JSON line per sample: what the reward models returned and what the trainer optimises."""
    sequences = [None] * len(rewards)
    for i, (seq, mask) in zip(
        indices.tolist(), ((s, m) for e in experiences for s, m in zip(e.sequences, e.attention_mask))
    ):
        sequences[i] = seq[mask.bool()].tolist()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        for i in range(len(rewards)):
            row = {
                "step": step,
                "sample": i,
                "sequence": sequences[i],
                "rewards": rewards[i].tolist(),
                "references": None if references is None else references[i].tolist(),
                "utility": utility[i].item(),
            }
            f.write(json.dumps(row) + "\n")
