"""Matched-KL comparison with uncertainty: interpolation at target KLs, a hierarchical paired bootstrap, verdicts.

Pure numpy. A run of the lab's PPO walks up a staircase of KL targets and is evaluated at the end of each stair,
so one (method, world, PPO seed) gives points (KL_j, per-prompt metric_j); `at_kl` reads that curve at the target
KLs. Differences between two methods are paired by world, PPO seed index and eval prompt, and `bootstrap`
resamples worlds, then seeds and prompts within each world.
"""

from typing import Dict, Optional, Sequence, Tuple

import numpy as np


def at_kl(kls: Sequence[float], values: np.ndarray, target: float, tolerance: float = 0.1) -> np.ndarray:
    """Values of a curve at KL `target`, linear in KL between the two points around it.

    Args:
        kls: `[J]` KL of each point (any order; points with equal KL are averaged; the lab's first point is the SFT
            policy at KL 0).
        values: `[J, ...]` the metric at each point (e.g. one value per eval prompt).
        target: the KL to read the curve at.
        tolerance: a target past the largest KL by at most this fraction takes the last point's value;
            further out (or below the smallest KL) the curve has no value there.

    Returns:
        `values[0]`-shaped array; NaN where the target is outside the curve.

    Example:
        >>> at_kl([0.0, 2.0, 4.0], np.array([[0.0], [1.0], [3.0]]), 3.0).tolist()
        [2.0]
    """
    kls, group = np.unique(np.asarray(kls, dtype=float), return_inverse=True)  # sorted; equal KLs are averaged
    values = np.asarray(values, dtype=float)
    values = np.stack([values[group == g].mean(0) for g in range(len(kls))])
    if target < kls[0] or target > kls[-1] * (1 + tolerance):
        return np.full(values.shape[1:], np.nan)
    if target >= kls[-1]:
        return values[-1].copy()
    hi = int(np.searchsorted(kls, target, side="right"))
    lo = hi - 1
    w = (target - kls[lo]) / (kls[hi] - kls[lo])
    return (1 - w) * values[lo] + w * values[hi]


def resample_means(per_world: Sequence[np.ndarray], n: int = 2000, seed: int = 0) -> np.ndarray:
    """Pooled means of `n` hierarchical resamples: worlds, then PPO seeds and prompts within each world.

    Args:
        per_world: one `[S, P, ...]` array per world (S PPO seeds by P eval prompts); trailing dimensions (e.g.
            methods x checkpoints) are resampled together, so any statistic of them stays paired.
        n: resamples.
        seed: numpy seed of the resampling.

    Returns:
        `[n, ...]`: per resample, the mean over the drawn worlds of each world's mean over its drawn seeds and
        prompts. With one world only seeds and prompts are resampled; with one seed only prompts.

    Example:
        >>> resample_means([np.ones((2, 3, 4))], n=5).shape
        (5, 4)
    """
    rng = np.random.default_rng(seed)
    w = len(per_world)
    cw = rng.multinomial(w, np.full(w, 1 / w), size=n) if w > 1 else np.ones((n, 1), dtype=int)  # copies of each world
    pooled = 0.0
    for k, d in enumerate(per_world):
        s, p = d.shape[:2]
        # Up to w independent inner resamples per draw: a world drawn twice gets two different resamples.
        cs = rng.multinomial(s, np.full(s, 1 / s), size=(n, w))  # how often each seed / prompt is drawn
        cp = rng.multinomial(p, np.full(p, 1 / p), size=(n, w))
        inner = np.einsum("bjs,sp...,bjp->bj...", cs, d, cp, optimize=True) / (s * p)
        copies = (np.arange(w)[None, :] < cw[:, k : k + 1]).reshape((n, w) + (1,) * (d.ndim - 2))
        pooled = pooled + (inner * copies).sum(1)
    return pooled / w


def bootstrap(per_world: Sequence[np.ndarray], n: int = 2000, seed: int = 0, level: float = 0.95) -> Dict[str, float]:
    """Mean and percentile interval of a pooled mean, resampling worlds, then PPO seeds and prompts within each.

    Args:
        per_world: one `[S, P]` array per world (S PPO seeds by P eval prompts; e.g. paired differences).
        n: bootstrap resamples.
        seed: numpy seed of the resampling.
        level: coverage of the interval.

    Returns:
        {"mean", "lo", "hi"}: the mean over worlds of each world's mean, and the interval (`resample_means`).

    Example:
        >>> r = bootstrap([np.array([[1.0, 1.0]])])
        >>> (r["mean"], r["lo"], r["hi"])
        (1.0, 1.0, 1.0)
    """
    point = float(np.mean([d.mean() for d in per_world]))
    alpha = (1 - level) / 2
    lo, hi = np.quantile(resample_means(per_world, n, seed), [alpha, 1 - alpha])
    return {"mean": point, "lo": float(lo), "hi": float(hi)}


def verdict(intervals: Sequence[Optional[Tuple[float, float]]], margin: float = 0.0) -> str:
    """"A >= B at every KL" from intervals of A - B at each target KL (None where a target was not reached).

    reproduced: no interval lies wholly below -margin and at least one lies wholly above -margin;
    not reproduced: some interval lies wholly below -margin;
    inconclusive: every interval contains -margin (or no target was reached).
    `margin` > 0 turns "A is better than B" into "A is not worse than B by more than margin" (non-inferiority,
    e.g. "rehearsal costs no reward"); with one interval this is the usual test of a confidence interval.

    Example:
        >>> verdict([(-0.1, 0.2), (0.01, 0.3)])
        'reproduced'
        >>> verdict([(-0.01, 0.02)], margin=0.02)
        'reproduced'
    """
    seen = [iv for iv in intervals if iv is not None]
    if any(hi < -margin for _, hi in seen):
        return "not reproduced"
    if any(lo > -margin for lo, _ in seen):
        return "reproduced"
    return "inconclusive"


def combine(verdicts: Sequence[str]) -> str:
    """One verdict for a claim made of several comparisons: all reproduced, any not reproduced, else inconclusive."""
    if any(v == "not reproduced" for v in verdicts):
        return "not reproduced"
    if verdicts and all(v == "reproduced" for v in verdicts):
        return "reproduced"
    return "inconclusive"
