"""Selective Rehearsal math pinned exactly: every per-cluster statistic of `select` against a plain-Python
reference, each documented edge accepted (one cluster, one-member clusters, fraction 1.0, k = cluster size),
each documented refusal raised, `cluster_prompts` against scikit-learn itself, `token_nll` against a loop."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_lsc.rehearsal import cluster_prompts, select, token_nll


def _reference(scores, clusters, k, ppo_fraction=None, ppo_threshold=None):
    """`select` written independently: plain Python sorting and counting, no numpy."""
    scores, clusters = [float(s) for s in scores], [int(c) for c in clusters]
    ppo, rehearsal, stats = [], [], []
    for c in range(max(clusters) + 1 if clusters else 0):
        rows = [i for i, ci in enumerate(clusters) if ci == c]
        ascending = sorted(rows, key=lambda i: (scores[i], i))
        top = sorted(rows, key=lambda i: (-scores[i], i))[:k]
        if ppo_threshold is not None:
            low, cut = [i for i in rows if scores[i] < ppo_threshold], float(ppo_threshold)
        else:
            low = ascending[: math.ceil(ppo_fraction * len(rows))]
            cut = max(scores[i] for i in low)
        ppo += low
        rehearsal += top
        values = [scores[i] for i in rows]
        stats.append({
            "cluster": c, "size": len(rows), "n_ppo": len(low), "n_rehearsal": len(top),
            "n_both": len(set(low) & set(top)), "n_neither": len(set(rows) - set(low) - set(top)),
            "score_min": min(values), "score_mean": pytest.approx(math.fsum(values) / len(values), rel=1e-12),
            "score_max": max(values), "ppo_cut": cut,
        })
    return sorted(ppo), rehearsal, stats


def _check(scores, clusters, k, **how):
    sel = select(np.asarray(scores), np.asarray(clusters), k, **how)
    ppo, rehearsal, stats = _reference(scores, clusters, k, **how)
    assert sel.ppo == ppo
    assert sel.rehearsal == rehearsal
    assert sel.clusters == stats
    assert all(isinstance(v, int) for v in sel.ppo + sel.rehearsal)
    return sel


CLUSTERS = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2]
SCORES = [0.9, -1.0, 0.2, 0.5, 3.0, 2.0, 2.5, -0.3, 0.1, -2.0, 1.5, 0.0]


def test_planted_statistics_fraction():
    sel = _check(SCORES, CLUSTERS, 2, ppo_fraction=0.5)
    # written out once by hand, so the reference itself is checked too
    assert [(s["n_ppo"], s["n_rehearsal"], s["n_both"], s["n_neither"]) for s in sel.clusters] == [
        (2, 2, 0, 0), (2, 2, 1, 0), (3, 2, 0, 0)]
    assert [s["ppo_cut"] for s in sel.clusters] == [0.2, 2.5, 0.0]
    assert [(s["score_min"], s["score_max"]) for s in sel.clusters] == [(-1.0, 0.9), (2.0, 3.0), (-2.0, 1.5)]
    assert sel.clusters[1]["score_mean"] == pytest.approx(2.5)


def test_planted_statistics_threshold_is_strict():
    sel = _check(SCORES, CLUSTERS, 1, ppo_threshold=0.2)  # 0.2 itself stays out of PPO
    assert sel.ppo == [1, 7, 8, 9, 11]
    assert [s["ppo_cut"] for s in sel.clusters] == [0.2, 0.2, 0.2]
    assert [(s["n_ppo"], s["n_neither"]) for s in sel.clusters] == [(1, 2), (0, 2), (4, 0)]


def test_fraction_one_sends_every_prompt_to_ppo():
    sel = _check(SCORES, CLUSTERS, 0, ppo_fraction=1.0)
    assert sel.ppo == list(range(12)) and sel.rehearsal == []
    assert [s["ppo_cut"] for s in sel.clusters] == [0.9, 3.0, 1.5]


def test_one_cluster_one_member_clusters_and_k_equal_to_the_cluster_size():
    _check([0.3, -0.2, 0.8], [0, 0, 0], 3, ppo_fraction=0.1)  # one cluster, k = its size
    sel = _check([0.5, 1.0, -1.0], [0, 1, 2], 1, ppo_fraction=0.5)  # three one-member clusters
    assert sel.ppo == [0, 1, 2] and sel.rehearsal == [0, 1, 2]
    assert [s["n_both"] for s in sel.clusters] == [1, 1, 1]


def test_ties_break_by_row_index():
    sel = _check([1.0, 1.0, 1.0, 1.0], [0, 0, 0, 0], 1, ppo_fraction=0.5)
    assert sel.ppo == [0, 1] and sel.rehearsal == [0]


def test_no_prompts_selects_nothing():
    sel = select(np.array([]), np.array([], dtype=int), 0, ppo_fraction=0.5)
    assert (sel.ppo, sel.rehearsal, sel.clusters) == ([], [], [])


def test_statistics_are_float64_whatever_the_input_dtype():
    scores = np.array([0.1, 0.2, 0.7], dtype=np.float32)
    sel = select(scores, np.zeros(3, dtype=int), 1, ppo_fraction=0.5)
    assert sel.clusters[0]["score_mean"] == pytest.approx(scores.astype(np.float64).mean(), rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5).flatmap(lambda c: st.tuples(
    st.lists(st.integers(0, c - 1), min_size=c, max_size=40).filter(lambda xs: len(set(xs)) == c),
    st.integers(0, 1_000_000), st.sampled_from([0.05, 0.3, 0.5, 0.99, 1.0]), st.integers(0, 3))))
def test_statistics_match_reference_on_random_inputs(case):
    clusters, seed, fraction, k = case
    k = min(k, min(np.bincount(clusters)))
    scores = np.round(np.random.default_rng(seed).normal(size=len(clusters)), 1)  # rounding plants ties
    _check(scores.tolist(), clusters, k, ppo_fraction=fraction)
    _check(scores.tolist(), clusters, k, ppo_threshold=float(np.median(scores)))


@pytest.mark.parametrize(
    "scores, clusters, kwargs, message",
    [
        ([0.0, 1.0], [0], {"ppo_fraction": 0.5}, r"scores \(2,\) and clusters \(1,\) must be \[N\] arrays"),
        ([[0.0], [1.0]], [[0], [0]], {"ppo_fraction": 0.5}, r"scores \(2, 1\) and clusters \(2, 1\) must be"),
        ([0.0, np.nan, 1.0, np.inf], [0, 0, 0, 0], {"ppo_fraction": 0.5}, r"^scores must be finite; row 1 has nan$"),
        ([0.0, 1.0, -np.inf], [0, 0, 0], {"ppo_fraction": 0.5}, r"^scores must be finite; row 2 has -inf$"),
        ([0.0, 1.0], [0, 0], {}, "exactly one of"),
        ([0.0, 1.0], [0, 0], {"ppo_fraction": 0.5, "ppo_threshold": 0.0}, "exactly one of"),
        ([0.0, 1.0], [0, 0], {"ppo_fraction": 0.0}, r"ppo_fraction must be in \(0, 1\], got 0.0"),
        ([0.0, 1.0], [0, 0], {"ppo_fraction": -0.5}, r"ppo_fraction must be in \(0, 1\], got -0.5"),
        ([0.0, 1.0], [0, 0], {"ppo_fraction": 1.5}, r"ppo_fraction must be in \(0, 1\], got 1.5"),
        ([0.0, 1.0], [0, 0], {"ppo_fraction": 0.5, "rehearsal_k": -1}, "--select.rehearsal_k must be an integer >= 0, got -1"),
        ([0.0, 1.0], [0, 0], {"ppo_fraction": 0.5, "rehearsal_k": True}, "--select.rehearsal_k must be an integer >= 0, got True"),
        ([0.0, 1.0], [0, 0], {"ppo_fraction": 0.5, "rehearsal_k": 1.0}, "--select.rehearsal_k must be an integer >= 0, got 1.0"),
        ([0.0, 1.0, 2.0], [0, 2, 2], {"ppo_fraction": 0.5}, r"^clusters \[1\] are empty"),
        ([0.0, 1.0, 2.0, 3.0], [0, 0, 1, 3], {"ppo_fraction": 0.5, "rehearsal_k": 1}, r"^clusters \[2\] are empty"),
        ([0.0] * 5, [0, 1, 1, 2, 3], {"ppo_fraction": 0.5, "rehearsal_k": 2},
         r"^cluster 0 has 1 prompts, fewer than --select.rehearsal_k 2 \(3 cluster\(s\) too small\)"),
        ([0.0] * 5, [0, 0, 1, 1, 1], {"ppo_fraction": 0.5, "rehearsal_k": 3},
         r"^cluster 0 has 2 prompts, fewer than --select.rehearsal_k 3 \(1 cluster\(s\) too small\)"),
    ],
)
def test_bad_selection_input_is_refused(scores, clusters, kwargs, message):
    kwargs = {"rehearsal_k": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        select(np.array(scores), np.array(clusters), **kwargs)


# ------------------------------------------------------------------ cluster_prompts


def test_clusters_are_scikit_learns_kmeans_with_ten_restarts():
    """On structureless points k-means has many local optima: only the documented call reproduces them."""
    from sklearn.cluster import KMeans

    x = np.random.default_rng(3).normal(size=(60, 3)).astype(np.float32).astype(np.float64)
    want = {seed: KMeans(n_clusters=7, n_init=10, random_state=seed).fit_predict(x).tolist() for seed in (0, 1)}
    for seed in (0, 1):
        assert cluster_prompts(x.tolist(), 7, seed=seed).tolist() == want[seed]
        assert cluster_prompts(x.astype(np.float32), 7, seed=seed).tolist() == want[seed]
    # the data tells the settings apart: another seed, or one restart instead of ten, gives other clusters
    assert want[0] != want[1]
    assert KMeans(n_clusters=7, n_init=1, random_state=0).fit_predict(x).tolist() != want[0]


def test_cluster_edges_one_cluster_and_exactly_n_distinct_embeddings():
    x = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [2.0, 2.0]])
    assert cluster_prompts(x, 1, seed=0).tolist() == [0, 0, 0, 0]
    labels = cluster_prompts(x, 3, seed=0)  # 3 distinct rows for 3 clusters: each its own cluster
    assert labels[0] == labels[1] and len(set(labels.tolist())) == 3
    one_each = cluster_prompts(np.eye(3), 3, seed=0)  # every row distinct though every value is 0 or 1
    assert sorted(one_each.tolist()) == [0, 1, 2]


@pytest.mark.parametrize(
    "x, n, message",
    [
        (np.zeros(4), 1, r"finite \[N, d\] array, got shape \(4,\)"),
        (np.zeros((2, 2, 2)), 1, r"finite \[N, d\] array, got shape \(2, 2, 2\)"),
        (np.array([[0.0, 1.0], [np.nan, 0.0]]), 1, r"finite \[N, d\] array, got shape \(2, 2\)"),
        (np.array([[0.0, 1.0], [np.inf, 0.0]]), 1, r"finite \[N, d\] array"),
        (np.eye(3), 0, r"--select.n_clusters must be in \[1, 3\] \(the number of prompts\), got 0"),
        (np.eye(3), 4, r"--select.n_clusters must be in \[1, 3\] \(the number of prompts\), got 4"),
        (np.eye(3), True, r"--select.n_clusters must be in \[1, 3\] \(the number of prompts\), got True"),
        (np.eye(3), 2.0, r"--select.n_clusters must be in \[1, 3\] \(the number of prompts\), got 2.0"),
        (np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]), 3, "^only 2 distinct prompt embeddings for --select.n_clusters 3"),
    ],
)
def test_bad_embeddings_are_refused(x, n, message):
    with pytest.raises(ValueError, match=message):
        cluster_prompts(x, n, seed=0)


# ------------------------------------------------------------------ token_nll


def _loop_nll(logits, ids, mask):
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if mask[b, t]:
                logp = logits[b, t].double().log_softmax(-1)
                total -= logp[ids[b, t + 1]].item()
                count += 1
    return total / count if count else 0.0


@pytest.mark.parametrize("n_masked", [0, 1, 2, 7])
def test_token_nll_is_the_mean_over_masked_next_token_predictions(n_masked):
    g = torch.Generator().manual_seed(n_masked)
    logits = torch.randn(2, 5, 11, generator=g) * 3
    ids = torch.randint(0, 11, (2, 5), generator=g)
    mask = torch.zeros(2, 5, dtype=torch.long)
    positions = [(0, 0), (1, 3), (0, 2), (1, 0), (0, 1), (1, 1), (0, 3)][:n_masked]
    for b, t in positions:
        mask[b, t] = 1
    mask[:, -1] = 1  # the last column predicts nothing and is ignored
    nll = token_nll(logits, ids, mask)
    assert nll.dtype == torch.float32 and nll.dim() == 0
    assert nll.item() == pytest.approx(_loop_nll(logits, ids, mask), rel=1e-5, abs=1e-7)
    if n_masked == 0:
        assert nll.item() == 0.0


def test_token_nll_computes_in_float32_from_bf16_and_carries_gradient():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(1, 4, 7, generator=g) * 2).bfloat16().requires_grad_()
    ids = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[0, 1, 1, 0]])
    nll = token_nll(logits, ids, mask)
    assert nll.dtype == torch.float32
    assert nll.item() == pytest.approx(_loop_nll(logits.float(), ids, mask), rel=1e-6)
    nll.backward()
    assert logits.grad[0, 0].abs().sum() == 0 and logits.grad[0, 1].abs().sum() > 0
