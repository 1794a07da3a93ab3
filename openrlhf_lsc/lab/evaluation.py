"""How the lab judges a policy: gold scores, the win definitions, per-prompt metrics, and reading a run at a KL."""

import math
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from openrlhf_lsc.lab import models, stats, world
from openrlhf_lsc.lab.config import BOTH_LEVEL, PROPERTIES, SHORTCUTS, WIN_LEVELS


def gold_scores(prop: str, prompts: Sequence[world.Prompt], words: Sequence[Sequence[str]]) -> np.ndarray:
    return np.array([world.GOLD[prop](p, w) for p, w in zip(prompts, words)])


def thresholds(pools: Dict) -> Dict[str, np.ndarray]:
    """Per-eval-prompt gold thresholds from the SFT threshold pool."""
    return {
        "helpful": np.quantile(pools["threshold_gold_helpful"], WIN_LEVELS["helpful"], axis=1),
        "harmless": np.quantile(pools["threshold_gold_harmless"], WIN_LEVELS["harmless"], axis=1),
        "median_helpful": np.quantile(pools["threshold_gold_helpful"], BOTH_LEVEL, axis=1),
        "median_harmless": np.quantile(pools["threshold_gold_harmless"], BOTH_LEVEL, axis=1),
    }


def wins(gold_h: np.ndarray, gold_s: np.ndarray, thr: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Win indicators `[prompts, samples]`: the three win definitions, and each half of "both"."""
    above_h, above_s = gold_h > thr["median_helpful"][:, None], gold_s > thr["median_harmless"][:, None]
    return {
        "win_helpful": gold_h > thr["helpful"][:, None],
        "win_harmless": gold_s > thr["harmless"][:, None],
        "win_both": above_h & above_s,
        "helpful_above_median": above_h,
        "harmless_above_median": above_s,
    }


def per_prompt_metrics(gold: Dict[str, np.ndarray], proxy: Dict[str, np.ndarray], rates: Dict[str, np.ndarray],
                       thr: Dict) -> Dict[str, np.ndarray]:
    """Every metric the analysis reads, averaged over the samples of each prompt: `[prompts]` each."""
    out = {k: v.mean(1) for k, v in wins(gold["helpful"], gold["harmless"], thr).items()}
    out.update({f"gold_{k}": v.mean(1) for k, v in gold.items()})
    out.update({f"proxy_{k}": v.mean(1) for k, v in proxy.items()})
    out.update({k: v.mean(1) for k, v in rates.items()})
    return out


@torch.no_grad()
def evaluate(policy, sft, rms: Dict, prompts: Sequence[world.Prompt], n: int, thr: Dict, seed: int) -> Dict:
    """Sample `n` responses per prompt; KL to SFT, per-prompt gold wins, gold and proxy scores, shortcut rates."""
    gen = torch.Generator().manual_seed(seed)
    flat = [p for p in prompts for _ in range(n)]
    ids = models.encode_prompts([p.text for p in flat])
    responses = models.sample_batched(policy, ids, gen)
    mask = models.action_mask(responses)
    kl = ((models.response_logprobs(policy, ids, responses) - models.response_logprobs(sft, ids, responses)) * mask).sum(1)
    words = models.decode_responses(responses)
    gold = {p: gold_scores(p, flat, words).reshape(-1, n) for p in PROPERTIES}
    proxy = {p: models.score_batched(rms[p], ids, responses).numpy().reshape(-1, n) for p in PROPERTIES}
    rates = [world.shortcut_rates(w) for w in words]
    rates = {k: np.array([r[k] for r in rates]).reshape(-1, n) for k in SHORTCUTS}
    metrics = per_prompt_metrics(gold, proxy, rates, thr)
    return {
        "kl": kl.mean().item(),
        "kl_sem": (kl.std() / math.sqrt(len(kl))).item(),
        "length": mask.sum(1).float().mean().item(),
        "mean": {k: float(v.mean()) for k, v in metrics.items()},
        "per_prompt": {k: np.round(v, 4).tolist() for k, v in metrics.items()},
        "examples": [f"{p.text} -> {' '.join(x)}" for p, x in list(zip(flat, words))[::n][:4]],
    }


def sft_point(pools: Dict, thr: Dict) -> Dict[str, np.ndarray]:
    """The SFT policy's per-prompt metrics (the KL = 0 point of every curve), from the best-of-k pool."""
    gold = {p: pools[f"bon_gold_{p}"] for p in PROPERTIES}
    proxy = {p: pools[f"bon_proxy_{p}"] for p in PROPERTIES}
    return per_prompt_metrics(gold, proxy, {k: pools[f"bon_{k}"] for k in SHORTCUTS}, thr)


def matched(record: Dict, sft: Dict[str, np.ndarray], metric: str, targets: Sequence[float],
            columns: Optional[np.ndarray] = None) -> np.ndarray:
    """One run's per-prompt `metric` at each target KL: `[T, P]` (NaN where the staircase missed the target)."""
    kls = [0.0] + [st["kl"] for st in record["stairs"]]
    values = np.array([sft[metric]] + [st["per_prompt"][metric] for st in record["stairs"]])
    if columns is not None:
        values = values[:, columns]
    return np.stack([stats.at_kl(kls, values, t) for t in targets])
