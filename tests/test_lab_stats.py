"""The lab's comparison machinery against hand-computed examples (matched-KL interpolation, bootstrap intervals,
verdicts, the KL staircase controller), the disjoint prompt splits, and the world's over-optimisation property."""

import math
import random

import numpy as np
import pytest

from openrlhf_lsc.lab import ppo, stats, world
from openrlhf_lsc.lab.config import PRESETS
from openrlhf_lsc.lab.evaluation import matched
from openrlhf_lsc.lab.run_specs import and_set, label_sets, paper_rule, single_method
from openrlhf_lsc.lab.world_setup import Lab


# ---------------------------------------------------------------- matched KL


def test_at_kl_interpolates_between_the_stairs_around_the_target():
    kls = [0.0, 1.2, 2.0, 4.4]
    values = np.array([[0.1, 0.0], [0.3, 1.0], [0.5, 1.0], [0.2, 3.0]])
    # target 1.6 lies between 1.2 and 2.0, halfway: (0.3 + 0.5) / 2, (1 + 1) / 2
    np.testing.assert_allclose(stats.at_kl(kls, values, 1.6), [0.4, 1.0])
    # target 4.0 between 2.0 and 4.4: weight (4 - 2) / 2.4 = 5/6 on the last stair
    np.testing.assert_allclose(stats.at_kl(kls, values, 4.0), [0.5 + 5 / 6 * (0.2 - 0.5), 1 + 5 / 6 * 2])
    np.testing.assert_allclose(stats.at_kl(kls, values, 1.2), [0.3, 1.0])  # exactly on a stair
    np.testing.assert_allclose(stats.at_kl(kls, values, 0.0), [0.1, 0.0])  # the SFT point


def test_at_kl_sorts_stairs_and_does_not_extrapolate():
    kls = [0.0, 3.0, 2.0]  # a later stair may land below an earlier one
    values = np.array([[0.0], [3.0], [1.0]])
    np.testing.assert_allclose(stats.at_kl(kls, values, 2.5), [2.0])  # between (2, 1) and (3, 3)
    np.testing.assert_allclose(stats.at_kl(kls, values, 3.2), [3.0])  # within 10% past the last stair: its value
    assert np.isnan(stats.at_kl(kls, values, 3.5)).all()  # further out: no value
    assert np.isnan(stats.at_kl([0.5, 1.0], np.array([[1.0], [2.0]]), 0.2)).all()  # below the first point
    np.testing.assert_allclose(stats.at_kl([0.0, 1.0, 1.0], np.array([[0.0], [2.0], [4.0]]), 1.0), [3.0])  # ties averaged


def test_matched_reads_a_run_record_with_the_sft_point_first():
    record = {"stairs": [{"kl": 2.0, "per_prompt": {"m": [1.0, 0.0]}}, {"kl": 4.0, "per_prompt": {"m": [0.0, 1.0]}}]}
    sft = {"m": np.array([0.5, 0.5])}
    got = matched(record, sft, "m", [1.0, 3.0, 4.0, 9.0])
    np.testing.assert_allclose(got[:3], [[0.75, 0.25], [0.5, 0.5], [0.0, 1.0]])
    assert np.isnan(got[3]).all()
    np.testing.assert_allclose(matched(record, sft, "m", [3.0], columns=np.array([1])), [[0.5]])


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_of_a_constant_is_that_constant():
    r = stats.bootstrap([np.full((3, 5), 0.25), np.full((2, 4), 0.25)], n=500)
    assert r == pytest.approx({"mean": 0.25, "lo": 0.25, "hi": 0.25})


@pytest.mark.parametrize("arrays", [
    [np.array([[0.0, 1.0]])],  # one world, one seed, two prompts
    [np.array([[0.0, 0.0], [1.0, 1.0]])],  # two seeds, prompts identical
    [np.array([[0.0]]), np.array([[1.0]])],  # two worlds
])
def test_bootstrap_intervals_match_the_hand_computed_distribution(arrays):
    # Each case resamples two equally likely values 0 and 1: the resampled mean is 0, 0.5, 1 w.p. 1/4, 1/2, 1/4.
    # The 95% interval is then [0, 1]; the central 40% (quantiles 0.3 and 0.7) is [0.5, 0.5].
    r95 = stats.bootstrap(arrays, n=4000, seed=1)
    assert (r95["mean"], r95["lo"], r95["hi"]) == (0.5, 0.0, 1.0)
    r40 = stats.bootstrap(arrays, n=4000, seed=1, level=0.4)
    assert (r40["lo"], r40["hi"]) == (0.5, 0.5)


def test_bootstrap_matches_explicit_hierarchical_resampling():
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(3, 6)) + 0.3, rng.normal(size=(3, 4)) - 0.1, rng.normal(size=(3, 5))]
    fast = stats.bootstrap(arrays, n=20000, seed=2)
    slow = []
    for _ in range(20000):
        worlds = rng.integers(0, 3, size=3)
        vals = []
        for w in worlds:
            d = arrays[w]
            seeds, prompts = rng.integers(0, d.shape[0], d.shape[0]), rng.integers(0, d.shape[1], d.shape[1])
            vals.append(d[seeds][:, prompts].mean())
        slow.append(np.mean(vals))
    lo, hi = np.quantile(slow, [0.025, 0.975])
    assert fast["mean"] == pytest.approx(np.mean([a.mean() for a in arrays]))
    # The fast version shares one inner resample between copies of a world drawn twice: intervals agree closely.
    assert fast["lo"] == pytest.approx(lo, abs=0.06) and fast["hi"] == pytest.approx(hi, abs=0.06)


def test_verdicts():
    assert stats.verdict([(-0.1, 0.1), (0.02, 0.2), None]) == "reproduced"
    assert stats.verdict([(0.02, 0.2), (-0.3, -0.01)]) == "not reproduced"
    assert stats.verdict([(-0.1, 0.1), (-0.2, 0.0)]) == "inconclusive"
    assert stats.verdict([None, None]) == "inconclusive"
    assert stats.combine(["reproduced", "reproduced"]) == "reproduced"
    assert stats.combine(["reproduced", "inconclusive"]) == "inconclusive"
    assert stats.combine(["inconclusive", "not reproduced"]) == "not reproduced"


# ---------------------------------------------------------------- the KL staircase


def test_kl_staircase_targets_ramp_then_hold():
    cfg = ppo.PPOConfig(steps=20, kl_targets=(1.0, 3.0), kl_ramp=0.4)  # 10 steps per stair, 4 of ramp
    got = [ppo.KLController(cfg).target(s) for s in range(20)]
    np.testing.assert_allclose(got[:5], [0.25, 0.5, 0.75, 1.0, 1.0])
    np.testing.assert_allclose(got[10:15], [1.5, 2.0, 2.5, 3.0, 3.0])
    assert got[9] == got[19 - 5] == 3.0 or got[9] == 1.0
    assert got[9] == 1.0 and got[19] == 3.0
    with pytest.raises(ValueError, match="increasing"):
        ppo.PPOConfig(steps=20, kl_targets=(3.0, 1.0))
    with pytest.raises(ValueError, match="split evenly"):
        ppo.PPOConfig(steps=21, kl_targets=(1.0, 3.0))


def test_kl_controller_update_is_the_documented_pi_rule():
    cfg = ppo.PPOConfig(steps=10, kl_targets=(2.0,), kl_ramp=0.1, kl_coef=0.5)  # target 2 from step 0
    ctl = ppo.KLController(cfg)
    ctl.update(4.0, step=3)  # first measurement: no trend yet; KL twice the target, e = log 2
    e = math.log(2.0)
    assert ctl.integral == pytest.approx(0.5 * math.exp(ctl.KI_UP * e))
    assert ctl.value == pytest.approx(ctl.integral * math.exp(ctl.KP * e))
    before = ctl.integral
    ctl.update(1.0, step=4)  # smoothed 2.5 (falling: no lookahead), e = log(2.5 / 2)
    e = math.log(2.5 / 2.0)
    assert ctl.smoothed == pytest.approx(2.5)
    assert ctl.integral == pytest.approx(before * math.exp(ctl.KI_UP * e))
    assert ctl.value == pytest.approx(ctl.integral * math.exp(ctl.KP * e))
    ctl.update(2.7, step=5)  # smoothed 2.6, rising by 0.1 near the target: predicted 2.6 + LOOKAHEAD * 0.1
    e = math.log((2.6 + ctl.LOOKAHEAD * 0.1) / 2.0)
    assert ctl.value == pytest.approx(ctl.integral * math.exp(ctl.KP * e))
    low = ppo.KLController(cfg)
    low.update(0.8, step=0)  # e = log(0.4)
    low.update(1.2, step=1)  # smoothed 1.0, rising, but below 80% of the target: no lookahead; the integral falls slowly
    e = math.log(1.0 / 2.0)
    assert low.integral == pytest.approx(0.5 * math.exp(low.KI_DOWN * math.log(0.4)) * math.exp(low.KI_DOWN * e))
    assert low.value == pytest.approx(low.integral * math.exp(low.KP * e))
    assert ctl.KI_UP > ctl.KI_DOWN
    fixed = ppo.KLController(ppo.PPOConfig(kl_coef=0.3))
    fixed.update(100.0, step=0)
    assert fixed.value == 0.3


# ---------------------------------------------------------------- prompt splits and reference settings


@pytest.mark.parametrize("seed", [0, 3])
def test_validation_and_test_prompts_are_disjoint(tmp_path, seed):
    lab = Lab(str(tmp_path), PRESETS["quick"], seed)
    val, test, train = ({p.text for p in ps} for ps in (lab.val_prompts, lab.test_prompts, lab.train_prompts))
    assert val and test and not (val & test) and not ((val | test) & train)
    assert len(val) + len(test) + len(train) == len(world.make_prompts(seed)) == 448
    assert abs(len(val) - len(test)) <= 1
    assert [p.text for p in lab.split("test")[0]] == [p.text for p in lab.eval_prompts[lab.split("test")[1]]]


def test_paper_rule_and_reference_sets():
    assert paper_rule(0.6) == (0.75, 0.5) and paper_rule(0.3) == (0.5, 0.75) and paper_rule(0.5) == (0.5, 0.5)
    sets = label_sets(PRESETS["full"])
    for qh, qs in PRESETS["full"].and_refs:
        assert sets[and_set(qh, qs)] == {"helpful": ("q", qh), "harmless": ("q", qs)}
    assert sets["canned"]["harmless"] == ("canned",)
    assert single_method("lsc@canned") == ("lsc", "canned") and single_method("raw") == ("raw", None)
    assert single_method("sigmoid") == ("sigmoid", "q85")
    full = PRESETS["full"]
    assert len(full.seeds) >= 5 and len(full.ppo_seeds) >= 3 and len(full.weights) == len(full.and_refs)
    assert not set(full.val_seeds) & set(full.ppo_seeds)
    assert max(full.compare_kls) >= 3 * 2.0  # at least 3x the KL where raw peaks in the lab's worlds (about 2)
    for cfg in PRESETS.values():  # the largest comparison KL lies inside the staircase, so stairs bracket it
        assert max(cfg.compare_kls) < max(cfg.kl_targets) and min(cfg.compare_kls) > 0


# ---------------------------------------------------------------- the world over-optimises


def test_gold_under_a_proxy_greedy_policy_rises_then_falls():
    """A bag-of-words Bradley-Terry proxy (word counts, length, on-topic words) fit on gold-labelled demonstrations
    pays for what the demonstrator never overdoes (repeats, length); building answers word by word greedily under
    it, gold first rises, then falls below the demonstrations' median."""
    rng = random.Random(0)
    prompts = [p for p in world.make_prompts(0) if not p.sensitive][:120]
    vocab = world.vocabulary()[3:]
    index = {w: i for i, w in enumerate(vocab)}

    def features(p, words):
        x = np.zeros(len(vocab) + 2)
        for w in words:
            x[index[w]] += 1
        x[-2] = len(words)
        x[-1] = sum(w in world.TOPICS[p.topic]["words"] for w in words)
        return x

    diffs, labels = [], []
    for p in prompts:
        for _ in range(20):
            a, b = world.demonstrate(p, rng), world.demonstrate(p, rng)
            ga, gb = world.gold_helpful(p, a), world.gold_helpful(p, b)
            labels.append(float(rng.random() < 1 / (1 + math.exp(-(ga - gb) / 0.5))))
            diffs.append(features(p, a) - features(p, b))
    X, y = np.array(diffs), np.array(labels)
    theta = np.zeros(X.shape[1])
    for _ in range(300):  # logistic regression by gradient descent (L2 0.01)
        p_ = 1 / (1 + np.exp(-X @ theta))
        theta -= 0.5 * (X.T @ (p_ - y) / len(y) + 0.01 * theta)

    gold_path = []
    for p in prompts[:40]:
        words, path = [], [world.gold_helpful(p, [])]
        for _ in range(world.MAX_NEW_TOKENS - 1):
            words.append(max(vocab, key=lambda w: features(p, words + [w]) @ theta))
            path.append(world.gold_helpful(p, words))
        gold_path.append(path)
    gold = np.mean(gold_path, 0)
    median = np.mean([np.median([world.gold_helpful(p, world.demonstrate(p, rng)) for _ in range(30)]) for p in prompts[:40]])
    peak = int(np.argmax(gold))
    assert 0 < peak < len(gold) - 1, gold
    assert gold[peak] - gold[0] > 0.2 and gold[peak] - gold[-1] > 1.0, gold
    assert gold[-1] < median, (gold, median)
