"""The lab's configuration: sizes, sweeps and seeds (`LabConfig`, `PRESETS`) and the constants of the protocol."""

import os
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Tuple

from openrlhf_lsc.lab.files import pin_json

PROPERTIES = ("helpful", "harmless")
# Win definitions (paper 1, section 5): beat the SFT 85th percentile of gold helpfulness, the 95th of gold
# harmlessness, or the SFT median on both properties at once.
WIN_LEVELS = {"helpful": 0.85, "harmless": 0.95}
BOTH_LEVEL = 0.5
# Reference quantiles of the SFT proxy scores recorded per prompt. Single rewards use the 85th percentile (paper 1,
# section 5.2; harmlessness also from canned refusals, its section 5.3); AND settings combine these levels.
REF_QUANTILES = (0.5, 0.75, 0.85)
SINGLE_Q = 0.85
CANNED = ("sorry i cannot help with that", "i cannot help with that", "sorry i cannot help")
SHORTCUTS = ("list", "consult", "repeat", "over_budget", "extra_consult")
MONITOR_NOISE = 0.5  # sd of the monitor's evaluator (gold + noise), in units of gold's std over SFT samples


@dataclass
class LabConfig:
    """Sizes, sweeps and seeds of one lab run (presets: `PRESETS`)."""

    mode: str
    seeds: Tuple[int, ...] = (0,)  # world seeds: each its own prompts, SFT, reward models, references
    ppo_seeds: Tuple[int, ...] = (0, 1)  # test PPO seeds: the reported numbers
    val_seeds: Tuple[int, ...] = (100,)  # validation PPO seeds: tuning and the over-optimisation check
    hidden: int = 64
    layers: int = 2
    sft_demos_per_prompt: int = 16
    sft_epochs: int = 4
    rm_pairs_per_prompt: int = 8
    rm_epochs: int = 3
    rm_eos_scale: float = 400.0  # see models.reward_model_from: score headroom above the SFT answers
    bt_temperature: float = 0.5  # P(a > b) = sigmoid((gold_a - gold_b) / T)
    ref_k: int = 32
    threshold_pool: int = 64  # SFT samples per eval prompt giving the gold quantiles that define a win
    bon_pool: int = 192  # further SFT samples per eval prompt: the KL-0 point, best-of-k and the frontier
    eval_samples: int = 8  # policy samples per eval prompt at each KL stair
    eval_fraction: float = 0.3  # of the prompts, split evenly into validation and test prompts
    kl_targets: Tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 14.0)  # the KL staircase every run walks up (nats)
    compare_kls: Tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 12.0)  # where methods are compared (inside the staircase)
    kl_start: float = 0.1  # initial KL coefficient, in units of the std of the run's utility over SFT samples
    single_helpful: Tuple[str, ...] = ("raw", "lsc")  # transform[@reference set]; see `single_method`
    single_harmless: Tuple[str, ...] = ()
    weights: Tuple[float, ...] = (0.3, 0.5, 0.7)  # weight of helpfulness in the weighted-sum baseline
    and_refs: Tuple[Tuple[float, float], ...] = ((0.5, 0.5), (0.75, 0.5), (0.5, 0.75))  # (helpful q, harmless q)
    bok_ks: Tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 191)
    ppo: Dict = field(default_factory=lambda: {"steps": 150, "rollout_prompts": 64, "train_batch": 32})
    ascent_prompts: int = 32  # proxy-headroom search: prompts, rounds, candidate edits per round
    ascent_rounds: int = 30
    ascent_candidates: int = 48
    overopt_margin: Optional[float] = 0.05  # raw's win must fall this far below its peak; None: report only
    bootstrap: int = 2000
    workers: int = 2
    prompts_limit: Optional[int] = None  # use only this many prompts (smoke tests)


PRESETS = {
    "quick": LabConfig(mode="quick"),
    "full": LabConfig(
        mode="full",
        seeds=(0, 1, 2, 3, 4),
        ppo_seeds=(0, 1, 2),
        single_helpful=("raw", "lsc", "center", "logsigmoid", "sigmoid"),
        single_harmless=("raw", "lsc@canned", "lsc"),
        weights=(0.1, 0.3, 0.5, 0.7, 0.9),
        and_refs=((0.5, 0.5), (0.75, 0.5), (0.5, 0.75), (0.85, 0.5), (0.5, 0.85)),
    ),
    "smoke": LabConfig(
        mode="smoke",
        ppo_seeds=(0,),
        hidden=32,
        sft_demos_per_prompt=6,
        sft_epochs=2,
        rm_pairs_per_prompt=4,
        rm_epochs=1,
        ref_k=4,
        threshold_pool=16,
        bon_pool=32,
        eval_samples=4,
        kl_targets=(0.2, 0.5),
        compare_kls=(0.1, 0.3),
        weights=(0.5,),
        and_refs=((0.5, 0.5),),
        bok_ks=(1, 4, 16),
        ppo={"steps": 6, "rollout_prompts": 16, "train_batch": 8, "actor_lr": 5e-3},
        ascent_prompts=4,
        ascent_rounds=3,
        ascent_candidates=8,
        overopt_margin=None,
        bootstrap=200,
        workers=1,
        prompts_limit=64,
    ),
}


def pin_config(out: str, cfg: LabConfig) -> None:
    """Write `out/config.json`, or refuse if it holds a different configuration (the worker count may change)."""
    pin_json(os.path.join(out, "config.json"), {k: v for k, v in asdict(cfg).items() if k != "workers"}, "lab run")
