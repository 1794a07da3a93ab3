"""A compact PPO for CPU that mirrors OpenRLHF 0.11's defaults, with the plugin's reward pipeline.

What is mirrored (file references are to the installed openrlhf package):
- reward: the K proxy rewards go through `openrlhf_lsc.rewards.reward_utilities` (references from the prompts'
  labels, transform, aggregate) -- the reward core `openrlhf_lsc.integration.reward_path` calls inside OpenRLHF --
  before group baselines, clipping and the KL penalty;
- group baselines for rloo / reinforce_baseline / group_norm and the per-token k1 KL penalty with the
  utility at the EOS token, clipped to `clip_range` (`RemoteExperienceMaker.compute_advantages_and_returns`,
  `models/utils.py:compute_reward`);
- GAE (gamma = lambda = 1 by default) or cumulative returns, then advantage whitening over all action
  tokens for gae / reinforce / reinforce_baseline;
- the clipped surrogate (eps 0.2) and clipped value loss (0.5), token-mean (`models/loss.py`), gradient
  norm clipped to 1, Adam betas (0.9, 0.95), the critic initialised from the SFT model with a fresh value head
  (OpenRLHF with --critic.model_name_or_path set to the actor's), the same start for every reward.
What differs: constant learning rates sized for a 100k-parameter model (OpenRLHF: 1e-6 / 9e-6 with warm-up
and cosine decay for LLMs); one process, no vLLM/DeepSpeed; the KL coefficient can follow a staircase of KL
targets (`KLController`, PI control on the KL per response; OpenRLHF's adaptive controller is integral-only on the
per-token KL). `tests/test_lab_openrlhf.py` checks the
advantage and loss code against OpenRLHF's own functions.
"""

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from openrlhf_lsc.lab import models
from openrlhf_lsc.rewards import NEEDS_REFERENCE, RewardSpec, aggregate_rewards, reward_utilities

ESTIMATORS = ("gae", "reinforce", "rloo", "reinforce_baseline", "group_norm")
LABEL_KEY = "lsc_ref"
ADAM_BETAS = (0.9, 0.95)  # --actor.adam.betas / --critic.adam.betas defaults


@dataclass
class PPOConfig:
    """PPO settings; the OpenRLHF flag each mirrors is in the comment."""

    kl_coef: float = 0.01  # --algo.kl.init_coef (k1 estimator; the start value when kl_targets are set)
    kl_targets: Tuple[float, ...] = ()  # KL staircase (nats per response): see KLController; empty = fixed coef
    kl_ramp: float = 0.4  # fraction of each stair over which the target rises from the previous one
    estimator: str = "gae"  # --algo.advantage.estimator
    n_samples_per_prompt: int = 1  # --rollout.n_samples_per_prompt
    rollout_prompts: int = 32  # --rollout.batch_size
    train_batch: int = 32  # --train.batch_size (samples per optimizer step)
    epochs: int = 1  # --train.max_epochs
    steps: int = 60  # rollout/update rounds
    eps_clip: float = 0.2  # --actor.eps_clip
    value_clip: float = 0.5  # --critic.value_clip
    gamma: float = 1.0  # --algo.advantage.gamma
    lambd: float = 1.0  # --algo.advantage.lambd
    clip_range: Tuple[float, float] = (-10.0, 10.0)  # --reward.clip_range
    actor_lr: float = 5e-4
    critic_lr: float = 1e-3
    max_norm: float = 1.0  # --actor.max_norm / --critic.max_norm

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"PPO estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.estimator in ("rloo", "reinforce_baseline", "group_norm") and self.n_samples_per_prompt < 2:
            raise ValueError(f"estimator {self.estimator} needs n_samples_per_prompt >= 2")
        if any(not t > 0 for t in self.kl_targets) or list(self.kl_targets) != sorted(self.kl_targets):
            raise ValueError(f"kl_targets must be positive and increasing, got {self.kl_targets}")
        if self.kl_targets and self.steps % len(self.kl_targets):
            raise ValueError(f"steps ({self.steps}) must split evenly into {len(self.kl_targets)} KL stairs")

    @property
    def stair_steps(self) -> int:
        """Steps per KL stair (all steps when the coefficient is fixed)."""
        return self.steps // max(1, len(self.kl_targets))


class KLController:
    """An adaptive KL coefficient that walks the policy up a staircase of KL targets.

    `steps` are split into one stair per target; within a stair the target rises linearly from the previous one
    over the first `kl_ramp` of the stair and is then held, so each stair ends on a plateau at its target. The
    coefficient follows a proportional-integral rule in log space. The KL per response (summed over tokens) of each
    rollout is smoothed (EMA); within 80% of the target a rising KL is extrapolated `LOOKAHEAD` steps ahead; the
    error is e = log(predicted / target), clipped to [-1, 1]; then integral *= exp(KI * e), coef = integral * exp(KP * e),
    with a larger KI above the target than below it, so the coefficient rises fast when a policy runs past its
    target and does not wind down while the KL lags a rising target. OpenRLHF's AdaptiveKLController
    (`--algo.kl.target`) is the symmetric integral part alone, on the per-token KL; here that overshoots targets
    by several nats when the policy finds a shortcut.
    """

    KI_UP, KI_DOWN, KP, LOOKAHEAD, EMA = 0.3, 0.1, 2.0, 2.0, 0.5

    def __init__(self, cfg: "PPOConfig"):
        self.value = self.integral = cfg.kl_coef
        self.cfg = cfg
        self.smoothed: Optional[float] = None

    def target(self, step: int) -> Optional[float]:
        cfg = self.cfg
        if not cfg.kl_targets:
            return None
        stair, within = divmod(step, cfg.stair_steps)
        stair = min(stair, len(cfg.kl_targets) - 1)
        lo, hi = (cfg.kl_targets[stair - 1] if stair else 0.0), cfg.kl_targets[stair]
        return lo + (hi - lo) * min(1.0, (within + 1) / max(1.0, cfg.kl_ramp * cfg.stair_steps))

    def update(self, kl: float, step: int) -> None:
        target = self.target(step)
        if target is None:
            return
        previous = self.smoothed
        self.smoothed = kl if previous is None else self.EMA * previous + (1 - self.EMA) * kl
        rising = 0.0 if previous is None else max(self.smoothed - previous, 0.0)
        # Near the target, brake on a rising KL: a policy that found a shortcut runs past the target in a few steps.
        predicted = self.smoothed + (self.LOOKAHEAD * rising if self.smoothed > 0.8 * target else 0.0)
        error = min(max(math.log(max(predicted, 0.01 * target) / target), -1.0), 1.0)
        self.integral *= math.exp((self.KI_UP if error > 0 else self.KI_DOWN) * error)
        self.value = self.integral * math.exp(self.KP * error)


@dataclass
class RewardPipeline:
    """Proxy reward models -> the plugin's reward core (`reward_utilities`: references from prompt labels,
    transform, aggregate), exactly as the PPO integration calls it inside OpenRLHF.

    `scale="match"` is `--lsc.scale match`: the utility is multiplied by a factor fixed on the first batch it sees,
    std(the same aggregation of the raw rewards) / std(utility), so a transform does not silently retune the KL
    coefficient (the rule of `openrlhf_lsc.integration.reward_path`). `spread` holds the last batch's
    `utility_std` (after scaling), `reward_std` and `scale`, the integration's lsc/* logs.
    """

    reward_models: Sequence[models.RewardModel]
    names: Sequence[str]
    labels: Sequence[dict]  # one label per prompt (schema of openrlhf_lsc.references)
    transform: str = "raw"
    aggregate: str = "and"
    weights: Optional[Sequence[float]] = None
    label_key: str = LABEL_KEY  # named in error messages
    scale: Optional[str] = None  # None or "match"
    par_m: Optional[int] = None  # PAR's M (transform "par"; default openrlhf_lsc.rewards.PAR_M)

    def __post_init__(self):
        if self.scale not in (None, "match"):
            raise ValueError(f"RewardPipeline scale must be None or 'match', got {self.scale!r}")
        self.spec = RewardSpec(names=tuple(self.names), transform=self.transform, aggregate=self.aggregate,
                               weights=None if self.weights is None else tuple(self.weights),
                               reference="label" if self.transform in NEEDS_REFERENCE else "none",
                               label_key=self.label_key, par_m=self.par_m)
        self.matched_scale: Optional[float] = None
        self.spread: Dict[str, float] = {}

    def rewards(self, prompt_ids: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """Proxy rewards `[B, K]`."""
        return torch.stack([models.score(rm, prompt_ids, responses) for rm in self.reward_models], 1)

    def utility(self, rewards: torch.Tensor, prompt_index: Sequence[int], group_size: int = 1) -> torch.Tensor:
        """Utilities `[B]` from proxy rewards `[B, K]` of samples of prompts `prompt_index`, `group_size`
        consecutive samples per prompt (gdpo normalises within them)."""
        labels = [self.labels[i] for i in prompt_index] if self.spec.reference == "label" else None
        utility = reward_utilities(rewards, self.spec, labels, group_size)[0]
        raw = aggregate_rewards(rewards, None, "raw", self.aggregate, self.weights, group_size)
        if self.scale == "match" and self.matched_scale is None:
            spread = utility.std().item()
            if not spread > 1e-6 * max(1.0, utility.abs().max().item()):
                raise ValueError("scale match: the first batch's utilities are all equal, so there is no spread to match")
            self.matched_scale = raw.std().item() / spread
        scale = 1.0 if self.matched_scale is None else self.matched_scale
        utility = utility * scale if scale != 1.0 else utility
        self.spread = {"utility_std": utility.std().item(), "reward_std": raw.std().item(), "scale": scale}
        return utility


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def advantages_and_returns(
    utility: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    values: Optional[torch.Tensor],
    cfg: PPOConfig,
    kl_coef: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """OpenRLHF's advantage computation for one rollout batch.

    Args:
        utility: `[B]` sequence-level rewards, prompt-major (n_samples_per_prompt consecutive samples per prompt).
        kl: `[B, L]` per-token KL estimate (k1: log pi - log pi_ref).
        mask: `[B, L]` action mask.
        values: `[B, L]` critic values (gae only).
        cfg: estimator, n_samples_per_prompt, kl_coef, clip_range, gamma, lambd.
        kl_coef: the current coefficient of an adaptive controller (default: cfg.kl_coef).

    Returns:
        (advantages, returns), each `[B, L]`.
    """
    r = utility.float().reshape(-1, cfg.n_samples_per_prompt)
    if cfg.estimator == "rloo":
        r = r - (r.sum(-1, keepdim=True) - r) / (cfg.n_samples_per_prompt - 1)
    elif cfg.estimator == "reinforce_baseline":
        r = r - r.mean(-1, keepdim=True)
    elif cfg.estimator == "group_norm":
        r = (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + 1e-9)
    r = r.reshape(-1).clamp(*cfg.clip_range)
    # Utility at the last action token (the EOS), minus the KL penalty at every token.
    last = mask.size(1) - 1 - mask.long().fliplr().argmax(dim=1, keepdim=True)
    kl_coef = cfg.kl_coef if kl_coef is None else kl_coef
    rewards = torch.zeros_like(kl).scatter_(1, last, r.unsqueeze(1).to(kl.dtype)) - max(kl_coef, 0.0) * kl
    rewards = rewards * mask
    length = rewards.size(1)
    if cfg.estimator == "gae":
        values = values * mask
        adv, last_gae = [], 0.0
        for t in reversed(range(length)):
            next_value = values[:, t + 1] if t < length - 1 else 0.0
            delta = rewards[:, t] + cfg.gamma * next_value - values[:, t]
            last_gae = delta + cfg.gamma * cfg.lambd * last_gae
            adv.append(last_gae)
        advantages = torch.stack(adv[::-1], 1)
        returns = advantages + values
    else:
        gamma = cfg.gamma if cfg.estimator == "reinforce" else 1.0
        returns = torch.zeros_like(rewards)
        running = torch.zeros(rewards.size(0))
        for t in reversed(range(length)):
            running = rewards[:, t] + gamma * running
            returns[:, t] = running
        advantages = returns.clone()
    if cfg.estimator in ("gae", "reinforce", "reinforce_baseline"):
        mean = masked_mean(advantages, mask)
        var = masked_mean((advantages - mean) ** 2, mask)
        advantages = (advantages - mean) * var.clamp(min=1e-8).rsqrt()
    return advantages, returns


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                eps: float) -> torch.Tensor:
    """PPO clipped surrogate, token-mean (OpenRLHF's PolicyLoss with defaults)."""
    ratio = (logp - old_logp).clamp(-20.0, 20.0).exp()
    surr = torch.min(ratio * advantages, ratio.clamp(1 - eps, 1 + eps) * advantages)
    return masked_mean(-surr, mask)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> torch.Tensor:
    """Clipped value loss, token-mean, times 0.5 (OpenRLHF's ValueLoss)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((clipped - returns) ** 2, (values - returns) ** 2), mask)


@dataclass
class PPOResult:
    policy: torch.nn.Module
    history: List[Dict[str, float]] = field(default_factory=list)


def train(
    sft: torch.nn.Module,
    prompt_ids: torch.Tensor,
    pipeline: RewardPipeline,
    cfg: PPOConfig,
    seed: int,
    desc: str = "PPO",
    progress: bool = True,
    extra_loss: Optional[Callable[[torch.nn.Module], torch.Tensor]] = None,
    on_step: Optional[Callable[[int, torch.nn.Module], None]] = None,
    history: Optional[List[Dict[str, float]]] = None,
    on_rollout: Optional[Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], Dict[str, float]]] = None,
) -> PPOResult:
    """Run PPO from the SFT policy on the training prompts `prompt_ids` `[P, prompt_len]`.

    `extra_loss(policy)` is added to every actor loss before its backward (e.g. rehearsal gamma * NLL);
    `on_step(step, policy)` runs before each rollout (e.g. to record metrics); `history`, if given, is the list the
    per-step logs are appended to (so `on_step` can read them); `on_rollout(step, prompt_index, responses, rewards)`
    returns extra entries for the step's log (e.g. the over-optimisation monitor's metrics); it must draw no random
    numbers from torch's global generator, so that the run stays the same with or without it.

    Returns the trained policy and per-step logs (utility, proxy rewards, KL to SFT, response length).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    policy, ref = copy.deepcopy(sft), sft
    ref.eval()
    actor_opt = torch.optim.Adam(policy.parameters(), lr=cfg.actor_lr, betas=ADAM_BETAS)
    critic = critic_opt = None
    if cfg.estimator == "gae":
        # Every run's critic starts the same way, whatever its reward: the SFT body with a fresh value head (what
        # OpenRLHF does with --critic.model_name_or_path set to the SFT model).
        critic = models.reward_model_from(sft, seed)
        critic_opt = torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr, betas=ADAM_BETAS)
    kl_ctl = KLController(cfg)
    order = torch.randperm(len(prompt_ids), generator=gen)
    cursor = 0
    history = [] if history is None else history
    for step in tqdm(range(cfg.steps), desc=desc, leave=False, disable=not progress):
        if cursor + cfg.rollout_prompts > len(order):
            order, cursor = torch.randperm(len(prompt_ids), generator=gen), 0
        index = order[cursor : cursor + cfg.rollout_prompts].repeat_interleave(cfg.n_samples_per_prompt)
        cursor += cfg.rollout_prompts
        if on_step is not None:
            on_step(step, policy)
        prompts = prompt_ids[index]
        responses = models.sample(policy, prompts, gen)
        mask = models.action_mask(responses)
        seq, attn = models.sequences_and_mask(prompts, responses)
        with torch.no_grad():
            old_logp = models.response_logprobs(policy, prompts, responses)
            ref_logp = models.response_logprobs(ref, prompts, responses)
            old_values = critic.action_values(seq, attn, responses.shape[1]) * mask if critic is not None else None
            rewards = pipeline.rewards(prompts, responses)
            utility = pipeline.utility(rewards, index.tolist(), cfg.n_samples_per_prompt)
        kl = (old_logp - ref_logp) * mask
        advantages, returns = advantages_and_returns(utility, kl, mask, old_values, cfg, kl_ctl.value)

        policy.train()
        if critic is not None:
            critic.train()
        for _ in range(cfg.epochs):
            perm = torch.randperm(len(responses), generator=gen)
            for i in range(0, len(perm), cfg.train_batch):
                b = perm[i : i + cfg.train_batch]
                logp = models.response_logprobs(policy, prompts[b], responses[b])
                loss = policy_loss(logp, old_logp[b], advantages[b], mask[b], cfg.eps_clip)
                if extra_loss is not None:
                    loss = loss + extra_loss(policy)  # same backward as the PPO loss
                actor_opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_norm)
                actor_opt.step()
                if critic is not None:
                    values = critic.action_values(seq[b], attn[b], responses.shape[1])
                    vloss = value_loss(values, old_values[b], returns[b], mask[b], cfg.value_clip)
                    critic_opt.zero_grad()
                    vloss.backward()
                    torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.max_norm)
                    critic_opt.step()
        log = {
            "step": step,
            "utility": utility.mean().item(),
            "kl": kl.sum(1).mean().item(),
            "kl_coef": kl_ctl.value,
            "length": mask.sum(1).mean().item(),
            **{f"reward/{n}": rewards[:, k].mean().item() for k, n in enumerate(pipeline.names)},
        }
        if on_rollout is not None:
            log.update(on_rollout(step, index, responses, rewards))
        history.append(log)
        kl_ctl.update(log["kl"], step)
    policy.eval()
    return PPOResult(policy, history)
