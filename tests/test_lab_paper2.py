"""The comparison machinery of the paper-2 lab experiments (`lab.paper2`): pairing, the main lab's bootstrap and
verdicts (`lab.stats`, not a copy), the non-inferiority margin, and the win rate against SFT samples."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_lsc.lab import paper2, stats


def test_verdict_margin_is_a_shifted_zero():
    # Non-inferiority: "A is at most 0.02 below B". Hand-checked intervals of A - B.
    assert stats.verdict([(-0.015, 0.03)], margin=0.02) == "reproduced"  # wholly above -0.02
    assert stats.verdict([(-0.05, 0.03)], margin=0.02) == "inconclusive"  # contains -0.02
    assert stats.verdict([(-0.08, -0.03)], margin=0.02) == "not reproduced"  # wholly below -0.02
    assert stats.verdict([(-0.015, 0.03)]) == "inconclusive"  # without the margin it contains 0
    assert stats.verdict([(-0.08, -0.03)], margin=0.0) == stats.verdict([(-0.08, -0.03)])


def test_compare_pairs_by_world_seed_prompt_and_uses_the_lab_bootstrap():
    rng = np.random.default_rng(0)
    a = {w: rng.normal(0.3, 1.0, (3, 2, 5)) for w in (0, 1, 2)}  # [S, T, P]
    b = {w: a[w] - 0.3 + rng.normal(0, 0.1, (3, 2, 5)) for w in (0, 1, 2)}
    b[2][:, 1, 0] = np.nan  # world 2 missed the second KL
    r = paper2.compare("X", "a - b", a, b, n=300, seed=7, targets=[1.0, 2.0])
    for t in range(2):
        diffs = [a[w][:, t, :] - b[w][:, t, :] for w in (0, 1, 2)]
        if t == 1:
            assert r["per_target"][t] == {"target": 2.0, "reached": False}
            continue
        want = stats.bootstrap(diffs, 300, seed=7 * 100 + t)
        got = r["per_target"][t]
        assert (got["mean"], got["lo"], got["hi"]) == (want["mean"], want["lo"], want["hi"])
        assert got["mean"] == pytest.approx(np.mean([d.mean() for d in diffs]))
    assert r["per_world"]["1"][0] == pytest.approx((a[1][:, 0] - b[1][:, 0]).mean())
    assert r["per_world"]["2"][1] is None
    assert r["verdict"] == stats.verdict([(r["per_target"][0]["lo"], r["per_target"][0]["hi"]), None])
    assert r["verdict"] == "reproduced"  # a - b is about +0.3 everywhere


def test_compare_single_values_and_margin():
    one = paper2.compare("X", "ece", {0: np.array([[0.1]])}, {0: np.array([[0.3]])}, n=100, seed=0)
    assert one["per_target"][0]["mean"] == pytest.approx(-0.2)
    assert one["per_target"][0]["lo"] is None and one["verdict"] == "inconclusive"  # one value: no interval
    assert paper2.interval(one["per_target"][0]) == "-0.200 (one value)"
    a = {0: np.full((2, 4), 0.50), 1: np.full((2, 4), 0.49)}
    b = {0: np.full((2, 4), 0.51), 1: np.full((2, 4), 0.50)}
    assert paper2.compare("F3", "win", a, b, n=100, seed=0, margin=0.02)["verdict"] == "reproduced"  # 0.01 below
    assert paper2.compare("F3", "win", a, b, n=100, seed=0)["verdict"] == "not reproduced"
    with pytest.raises(ValueError, match="worlds"):
        paper2.compare("X", "bad", {0: np.zeros((1, 2))}, {1: np.zeros((1, 2))}, n=10, seed=0)


def test_claim_verdicts_combine_their_comparisons():
    rows = [{"claim": "A", "verdict": "reproduced"}, {"claim": "A", "verdict": "inconclusive"},
            {"claim": "B", "verdict": "reproduced"}, {"claim": "info", "verdict": "not reproduced"}]
    got = paper2.claim_verdicts({"A": "a", "B": "b", "C": "c"}, rows)
    assert {k: v["verdict"] for k, v in got.items()} == {"A": "inconclusive", "B": "reproduced", "C": "not run"}


def _brute_win(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = []
    for row_a, row_b in zip(a, b):
        s = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in row_a for y in row_b)
        out.append(s / (len(row_a) * len(row_b)))
    return np.array(out)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5), st.integers(0, 10_000))
def test_win_rate_vs_sft_matches_brute_force(p, n, m, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 3, (p, n)).astype(float), rng.integers(0, 3, (p, m)).astype(float)  # many ties
    np.testing.assert_allclose(paper2.win_rate_vs(a, b), _brute_win(a, b))
    np.testing.assert_allclose(paper2.win_rate_vs(a, a), 0.5)  # a policy equal to SFT wins half the time
