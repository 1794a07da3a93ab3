"""Selective Rehearsal (Peng et al. 2023): which prompts go to PPO, which expert pairs are rehearsed,
and the rehearsal loss. numpy / scikit-learn / torch only: no OpenRLHF import.

Per k-means cluster of prompt embeddings, prompts whose expert (or SFT) response already scores high have
little left to gain from PPO and risk over-optimisation; PPO gets the low scorers (below a threshold, or
the cluster's bottom fraction) and the cluster's top-k pairs form the rehearsal set D_R, trained with
gamma * NLL next to the PPO loss. The two sets are chosen independently: a prompt can be in both only when
its cluster is so small that its top-k reach into the bottom fraction; the report counts such prompts.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F


def cluster_prompts(embeddings: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """k-means (scikit-learn, k-means++ init, 10 restarts) over prompt embeddings.

    Args:
        embeddings: `[N, d]` float array, one row per prompt.
        n_clusters: number of clusters c (`--select.n_clusters`).
        seed: random state; the same seed and embeddings give the same clusters.

    Returns:
        `[N]` int array of cluster ids in `[0, n_clusters)`; every cluster is non-empty.
    """
    from sklearn.cluster import KMeans

    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ValueError(f"embeddings must be a finite [N, d] array, got shape {x.shape}")
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer)) or not 1 <= n_clusters <= len(x):
        raise ValueError(f"--select.n_clusters must be in [1, {len(x)}] (the number of prompts), got {n_clusters}")
    distinct = len(np.unique(x, axis=0))
    if distinct < n_clusters:
        # k-means would leave clusters empty (scikit-learn only warns).
        raise ValueError(
            f"only {distinct} distinct prompt embeddings for --select.n_clusters {n_clusters}: some clusters would "
            "be empty; lower --select.n_clusters or deduplicate the prompts"
        )
    labels = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(x)
    sizes = np.bincount(labels, minlength=n_clusters)
    if (sizes == 0).any():
        raise ValueError(f"k-means left clusters {np.flatnonzero(sizes == 0).tolist()} empty; lower --select.n_clusters")
    return labels


@dataclass
class Selection:
    """Outcome of `select`: row indices into the prompt list and per-cluster counts."""

    ppo: List[int]  # ascending row order
    rehearsal: List[int]  # cluster by cluster, best score first
    clusters: List[Dict]  # per cluster: size, n_ppo, n_rehearsal, n_both, score stats, cut


def select(
    scores: np.ndarray,
    clusters: np.ndarray,
    rehearsal_k: int,
    ppo_threshold: Optional[float] = None,
    ppo_fraction: Optional[float] = None,
) -> Selection:
    """Split prompts into the PPO set and the rehearsal set D_R, cluster by cluster.

    Args:
        scores: `[N]` finite scores of each prompt's expert/SFT response (higher = better).
        clusters: `[N]` cluster ids (from `cluster_prompts`); ids 0..max must all be used.
        rehearsal_k: top-k pairs per cluster for D_R (`--select.rehearsal_k`); every cluster needs k rows.
        ppo_threshold: PPO gets prompts scoring strictly below this (`--select.ppo_threshold`), or
        ppo_fraction: PPO gets the ceil(f * size) lowest-scoring prompts of each cluster
            (`--select.ppo_fraction`, in (0, 1]). Exactly one of the two.

    Returns:
        `Selection`. Ties are broken by row index (lower first among equal scores for PPO, and for D_R),
        so the result is deterministic.
    """
    scores = np.asarray(scores, dtype=np.float64)
    clusters = np.asarray(clusters)
    if scores.shape != clusters.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and clusters {clusters.shape} must be [N] arrays of equal length")
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        raise ValueError(f"scores must be finite; row {bad[0]} has {scores[bad[0]]}")
    if (ppo_threshold is None) == (ppo_fraction is None):
        raise ValueError("give exactly one of --select.ppo_threshold and --select.ppo_fraction")
    if ppo_threshold is not None and not math.isfinite(ppo_threshold):
        raise ValueError(f"--select.ppo_threshold must be a finite number, got {ppo_threshold}")  # nan would pick none
    if ppo_fraction is not None and not 0.0 < ppo_fraction <= 1.0:
        raise ValueError(f"--select.ppo_fraction must be in (0, 1], got {ppo_fraction}")
    if isinstance(rehearsal_k, bool) or not isinstance(rehearsal_k, (int, np.integer)) or rehearsal_k < 0:
        raise ValueError(f"--select.rehearsal_k must be an integer >= 0, got {rehearsal_k!r}")
    n_clusters = int(clusters.max()) + 1 if len(clusters) else 0
    sizes = np.bincount(clusters, minlength=n_clusters)
    if (sizes == 0).any():
        raise ValueError(f"clusters {np.flatnonzero(sizes == 0).tolist()} are empty; lower --select.n_clusters")
    small = [(c, int(s)) for c, s in enumerate(sizes) if s < rehearsal_k]
    if small:
        c, s = small[0]
        raise ValueError(
            f"cluster {c} has {s} prompts, fewer than --select.rehearsal_k {rehearsal_k} "
            f"({len(small)} cluster(s) too small); lower --select.rehearsal_k or --select.n_clusters"
        )

    ppo, rehearsal, stats = [], [], []
    for c in range(n_clusters):
        rows = np.flatnonzero(clusters == c)
        # lexsort: last key is primary; row index breaks ties.
        ascending = rows[np.lexsort((rows, scores[rows]))]
        best_first = rows[np.lexsort((rows, -scores[rows]))]
        top = best_first[:rehearsal_k]
        if ppo_threshold is not None:
            low = rows[scores[rows] < ppo_threshold]
            cut = float(ppo_threshold)
        else:
            low = ascending[: math.ceil(ppo_fraction * len(rows))]
            cut = float(scores[low].max())  # the highest score that still went to PPO
        ppo += low.tolist()
        rehearsal += top.tolist()
        s = scores[rows]
        stats.append(
            {
                "cluster": c,
                "size": len(rows),
                "n_ppo": len(low),
                "n_rehearsal": len(top),
                "n_both": len(np.intersect1d(low, top)),
                "n_neither": len(rows) - len(np.union1d(low, top)),
                "score_min": float(s.min()),
                "score_mean": float(s.mean()),
                "score_max": float(s.max()),
                "ppo_cut": cut,
            }
        )
    return Selection(ppo=sorted(ppo), rehearsal=rehearsal, clusters=stats)


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the masked tokens (teacher forcing), in float32.

    Args:
        logits: `[B, T, V]` next-token logits at every position.
        input_ids: `[B, T]` token ids.
        loss_mask: `[B, T]`, OpenRLHF SFT convention: `loss_mask[:, t] = 1` scores the prediction of
            `input_ids[:, t + 1]` from `logits[:, t]` (the last column is ignored).

    Returns:
        0-d tensor: sum of -log p over masked tokens / number of masked tokens (0 when none are masked).
    """
    mask = loss_mask[:, :-1].float()
    nll = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten(), reduction="none"
    ).view_as(mask)
    return (nll * mask).sum() / mask.sum().clamp(min=1.0)
