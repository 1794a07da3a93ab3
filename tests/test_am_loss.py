"""Advantage Model loss and pairwise RM metrics, checked against numpy and OpenRLHF's own PairWiseLoss."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import expit, log_expit

from openrlhf.models.loss import PairWiseLoss  # imported at collection: mutation workers fork after it

from openrlhf_lsc.am_loss import AdvantageModelLoss, pairwise_metrics

scores = st.lists(st.floats(-8, 8, allow_nan=False), min_size=2, max_size=12)


@pytest.fixture(scope="module")
def stock_pairwise_loss():
    return PairWiseLoss()


def _pairs(values):
    n = len(values) // 2
    return torch.tensor(values[:n], dtype=torch.float64), torch.tensor(values[n : 2 * n], dtype=torch.float64)


@settings(max_examples=30, deadline=None)
@given(values=scores, use_margin=st.booleans())
def test_zero_coefficients_is_the_stock_bt_loss(stock_pairwise_loss, values, use_margin):
    c, r = _pairs(values)
    margin = torch.linspace(0, 1, len(c), dtype=torch.float64) if use_margin else None
    am = AdvantageModelLoss(expected_coef=0, bound_coef=0, task_coef=0)
    c1, r1 = c.clone().requires_grad_(), r.clone().requires_grad_()
    c2, r2 = c.clone().requires_grad_(), r.clone().requires_grad_()
    ours = am(c1, r1, None, margin)
    stock = stock_pairwise_loss(c2.float(), r2.float(), None if margin is None else margin.float())
    ours.backward()
    stock.backward()
    torch.testing.assert_close(ours.float(), stock)
    torch.testing.assert_close(c1.grad.float(), c2.grad.float())
    torch.testing.assert_close(r1.grad.float(), r2.grad.float())
    mu = 0 if margin is None else margin.numpy()
    assert ours.item() == pytest.approx(-log_expit(c.numpy() - r.numpy() - mu).mean(), rel=1e-5, abs=1e-6)


@settings(max_examples=30, deadline=None)
@given(values=scores, coef=st.floats(0.1, 5))
def test_expected_reward_term(values, coef):
    c, r = _pairs(values)
    c, r = c.requires_grad_(), r.requires_grad_()
    am = AdvantageModelLoss(expected_coef=coef, bound_coef=0, task_coef=0)
    loss = am(c, r)
    cn, rn = c.detach().numpy(), r.detach().numpy()
    assert loss.item() == pytest.approx(-log_expit(cn - rn).mean() + coef * (((cn + rn) / 2) ** 2).mean(), rel=1e-5)
    loss.backward()
    # d/dc + d/dr sees only the expected-reward term: d/dc = d/dr = coef * (c + r) / (2 B)
    torch.testing.assert_close((c.grad + r.grad).float(), torch.tensor(coef * (cn + rn) / len(cn)).float())


def test_expected_reward_term_moves_only_each_pairs_offset():
    """Free per-pair offsets b_i (the same for both responses) go to minus the pair mean; gaps never move."""
    torch.manual_seed(0)
    base_c, base_r = torch.randn(16) + 1, torch.randn(16)
    offset = torch.full((16,), 3.0, requires_grad=True)
    am = AdvantageModelLoss(expected_coef=1.0, bound_coef=0, task_coef=0)
    opt = torch.optim.SGD([offset], lr=4.0)  # each step halves every offset's distance to its target
    for _ in range(40):
        opt.zero_grad()
        am(base_c + offset, base_r + offset).backward()
        opt.step()
    torch.testing.assert_close(offset.detach(), -(base_c + base_r) / 2, atol=1e-4, rtol=0)


@settings(max_examples=30, deadline=None)
@given(values=scores, m=st.floats(0.5, 4), coef=st.floats(0.1, 5))
def test_bound_term(values, m, coef):
    c, r = _pairs(values)
    c, r = c.requires_grad_(), r.requires_grad_()
    am = AdvantageModelLoss(margin=m, expected_coef=0, bound_coef=coef, task_coef=0)
    loss = am(c, r)
    a = np.concatenate([c.detach().numpy(), r.detach().numpy()])
    expected_bound = (np.maximum(np.abs(a) - m, 0) ** 2).mean()
    rank = -log_expit(a[: len(a) // 2] - a[len(a) // 2 :]).mean()
    assert loss.item() == pytest.approx(rank + coef * expected_bound, rel=1e-5, abs=1e-6)
    assert am.terms["bound"] == pytest.approx(expected_bound, rel=1e-5, abs=1e-7)
    loss.backward()
    grad = np.concatenate([c.grad.numpy(), r.grad.numpy()])
    rank_grad = np.concatenate([-expit(-(a[: len(a) // 2] - a[len(a) // 2 :]))] * 2) * np.r_[
        np.ones(len(a) // 2), -np.ones(len(a) // 2)
    ] / (len(a) // 2)
    bound_grad = coef * 2 * np.maximum(np.abs(a) - m, 0) * np.sign(a) / len(a)
    np.testing.assert_allclose(grad, rank_grad + bound_grad, rtol=1e-5, atol=1e-7)


def test_bound_term_is_zero_within_the_margin():
    c, r = torch.tensor([2.4, -1.0, 0.3]), torch.tensor([-2.5, 2.5, 0.0])
    am = AdvantageModelLoss(margin=2.5, expected_coef=0, bound_coef=10.0, task_coef=0)
    bt = AdvantageModelLoss(expected_coef=0, bound_coef=0, task_coef=0)
    assert am(c, r).item() == bt(c, r).item()
    assert am.terms["bound"] == 0.0


def test_gradcheck_all_terms():
    torch.manual_seed(1)
    c = (torch.randn(6, dtype=torch.float64) * 3).requires_grad_()
    r = (torch.randn(6, dtype=torch.float64) * 3).requires_grad_()
    tasks = ["code", "qa", "code", "qa", "qa", "math"]
    # momentum 1: the running statistics are this batch's, so the loss is an ordinary function of the scores
    am = AdvantageModelLoss(margin=1.5, expected_coef=0.7, bound_coef=1.3, task_coef=0.9, task_momentum=1.0)
    assert torch.autograd.gradcheck(lambda c, r: am(c, r, tasks), (c, r))


def test_task_term_uses_running_statistics_with_batch_gradient():
    """Value from exponential moving averages of mean and mean square; gradient centred on the batch."""
    beta, tau, coef = 0.25, 0.8, 2.0
    am = AdvantageModelLoss(expected_coef=0, bound_coef=0, task_coef=coef, task_std=tau, task_momentum=beta)
    first = np.array([0.5, -0.1, 2.0]), np.array([0.2, -0.4, 1.0])
    am(torch.tensor(first[0]), torch.tensor(first[1]), ["t"] * 3)
    c = torch.tensor([1.0, 3.0], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([-0.5, 0.5], dtype=torch.float64, requires_grad=True)
    loss = am(c, r, ["t", "t"])
    loss.backward()

    a1, a2 = np.concatenate(first), np.array([1.0, 3.0, -0.5, 0.5])
    run_mean = (1 - beta) * a1.mean() + beta * a2.mean()
    run_sq = (1 - beta) * (a1**2).mean() + beta * (a2**2).mean()
    run_var = run_sq - run_mean**2
    penalty = run_mean**2 / 2 + (run_var - tau**2) ** 2 / 2
    rank = -log_expit(a2[:2] - a2[2:]).mean()
    assert loss.item() == pytest.approx(rank + coef * penalty, rel=1e-6)
    assert am.running["t"] == pytest.approx([run_mean, run_sq])
    grad_task = coef * (run_mean / 4 + (run_var - tau**2) * 2 * (a2 - a2.mean()) / 4)
    grad_rank = -expit(-(a2[:2] - a2[2:])) / 2
    np.testing.assert_allclose(c.grad.numpy(), grad_task[:2] + grad_rank, rtol=1e-6)
    np.testing.assert_allclose(r.grad.numpy(), grad_task[2:] - grad_rank, rtol=1e-6)


def test_task_statistics_update_only_in_training_mode():
    am = AdvantageModelLoss(task_momentum=0.5)
    am(torch.tensor([1.0]), torch.tensor([0.0]), ["a"])
    before = dict(am.running)
    am.eval()
    am(torch.tensor([5.0]), torch.tensor([4.0]), ["a"])
    am(torch.tensor([5.0]), torch.tensor([4.0]), ["b"])  # unseen task: this batch's statistics, not stored
    assert am.running == before


def test_task_term_pulls_task_means_together():
    """Free per-task offsets (shifting chosen and rejected alike, so ranking is blind to them) go to 0."""
    torch.manual_seed(0)
    tasks = ["code"] * 8 + ["qa"] * 8
    gaps = torch.rand(16) + 0.5
    offsets = torch.tensor([3.0, -2.0], requires_grad=True)
    am = AdvantageModelLoss(expected_coef=0, bound_coef=0, task_coef=1.0, task_momentum=0.5)
    opt = torch.optim.SGD([offsets], lr=0.5)
    which = torch.tensor([0] * 8 + [1] * 8)
    for _ in range(50):
        opt.zero_grad()
        shift = offsets[which]
        am(gaps / 2 + shift, -gaps / 2 + shift, tasks).backward()
        opt.step()
    assert offsets.detach().abs().max().item() < 1e-4


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda am: am(torch.tensor([float("nan")]), torch.tensor([0.0]), ["a"]), FloatingPointError),
        (lambda am: am(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]), None), ValueError),
        (lambda am: am(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]), ["a"]), ValueError),
        (lambda am: am(torch.tensor([1.0, 2.0]), torch.tensor([0.0]), ["a", "b"]), ValueError),
    ],
)
def test_bad_input(call, error):
    with pytest.raises(error):
        call(AdvantageModelLoss())


@pytest.mark.parametrize("kwargs", [{"margin": 0}, {"task_std": -1}, {"bound_coef": -0.1}, {"task_momentum": 0}])
def test_bad_settings(kwargs):
    with pytest.raises(ValueError):
        AdvantageModelLoss(**kwargs)


def _numpy_ece(c, r, n_bins=10):
    p = expit(c - r)
    conf = np.maximum(p, 1 - p)
    correct = (c > r).astype(float)
    edges = np.linspace(0.5, 1.0, n_bins + 1)
    count, _ = np.histogram(conf, edges)
    conf_sum, _ = np.histogram(conf, edges, weights=conf)
    correct_sum, _ = np.histogram(conf, edges, weights=correct)
    used = count > 0
    return np.sum(np.abs(correct_sum[used] - conf_sum[used])) / len(c)


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.floats(-6, 6, allow_nan=False), min_size=4, max_size=60), seed=st.integers(0, 3))
def test_metrics_against_numpy(values, seed):
    c, r = _pairs(values)
    rng = np.random.default_rng(seed)
    tasks = [str(t) for t in rng.integers(0, 3, len(c))]
    m = pairwise_metrics(c, r, tasks)
    cn, rn = c.numpy(), r.numpy()
    assert m["n_pairs"] == len(cn)
    assert m["accuracy"] == pytest.approx((cn > rn).mean())
    assert m["ece"] == pytest.approx(_numpy_ece(cn, rn), abs=1e-12)
    for task in set(tasks):
        idx = [i for i, t in enumerate(tasks) if t == task]
        both = np.concatenate([cn[idx], rn[idx]])
        assert m["per_task"][task] == pytest.approx({"n_pairs": len(idx), "mean": both.mean(), "std": both.std()})
    means = [s["mean"] for s in m["per_task"].values()]
    assert m["task_mean_spread"] == pytest.approx(max(means) - min(means))


def test_ece_is_small_when_calibrated_and_large_when_overconfident():
    rng = np.random.default_rng(0)
    s1, s2 = rng.normal(0, 1.5, 40000), rng.normal(0, 1.5, 40000)
    first_wins = rng.random(40000) < expit(s1 - s2)  # labels drawn from the model's own probabilities
    c, r = np.where(first_wins, s1, s2), np.where(first_wins, s2, s1)
    calibrated = pairwise_metrics(torch.tensor(c), torch.tensor(r))
    overconfident = pairwise_metrics(torch.tensor(4 * c), torch.tensor(4 * r))
    assert calibrated["ece"] < 0.01
    assert overconfident["ece"] > 0.1
    assert calibrated["accuracy"] == overconfident["accuracy"]
    assert list(calibrated["per_task"]) == ["all"]


def test_ece_of_a_constant_confidence_is_its_gap_to_accuracy():
    c = torch.tensor([1.0] * 10)
    r = torch.tensor([0.0] * 7 + [2.0] * 3)  # 70 % right, every pair at confidence sigmoid(1)
    assert pairwise_metrics(c, r)["ece"] == pytest.approx(abs(0.7 - expit(1.0)))


# ---------------------------------------------------------------- pinned values, edges and refusals


def test_documented_defaults():
    am = AdvantageModelLoss()
    assert (am.margin, am.task_std, am.task_momentum) == (2.5, 1.0, 0.1)  # paper: m = 2.5
    assert am.coefs == {"expected": 1.0, "bound": 1.0, "task": 1.0}
    assert am.running == {} and am.terms == {}


@pytest.mark.parametrize(
    "kwargs",
    [{"margin": 0}, {"margin": -1}, {"task_std": 0}, {"task_std": -1}, {"expected_coef": -0.1},
     {"bound_coef": -0.1}, {"task_coef": -1e-9}, {"task_momentum": 0}, {"task_momentum": -0.1},
     {"task_momentum": 1.0000001}, {"task_momentum": 1.5}],
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="must be"):
        AdvantageModelLoss(**kwargs)


def test_boundary_settings_are_accepted():
    am = AdvantageModelLoss(margin=1e-9, task_std=1e-9, expected_coef=0, bound_coef=0, task_coef=0, task_momentum=1.0)
    assert (am.margin, am.task_std, am.task_momentum) == (1e-9, 1e-9, 1.0)
    assert am.coefs == {"expected": 0, "bound": 0, "task": 0}


@pytest.mark.parametrize(
    "c, r, tasks, error, message",
    [
        ([float("nan"), 0.0], [0.0, 1.0], ["a", "a"], FloatingPointError, "not finite"),
        ([0.0, 1.0], [0.0, float("nan")], ["a", "a"], FloatingPointError, "not finite"),
        ([float("inf")], [0.0], ["a"], FloatingPointError, "not finite"),
        ([0.0], [-float("inf")], ["a"], FloatingPointError, "not finite"),
        ([1.0, 2.0], [0.0], ["a", "b"], ValueError, r"differ in shape: \(2,\) vs \(1,\)"),
        ([1.0, 2.0], [0.0, 1.0], None, ValueError, "2 pairs, tasks: none$"),
        ([1.0, 2.0], [0.0, 1.0], ["a"], ValueError, "2 pairs, tasks: 1$"),
        ([1.0, 2.0], [0.0, 1.0], ["a", "b", "c"], ValueError, "2 pairs, tasks: 3$"),
    ],
)
def test_bad_input_is_refused(c, r, tasks, error, message):
    with pytest.raises(error, match=message):
        AdvantageModelLoss()(torch.tensor(c), torch.tensor(r), tasks)


def test_shape_mismatch_is_refused_even_without_the_task_term():
    with pytest.raises(ValueError, match="differ in shape"):  # [2] vs [1] would broadcast
        AdvantageModelLoss(task_coef=0)(torch.tensor([1.0, 2.0]), torch.tensor([0.0]))


@pytest.mark.parametrize("dtype, out", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                        (torch.float64, torch.float64)])
def test_loss_dtype_and_value(dtype, out):
    c, r = torch.tensor([0.75, -1.5, 3.0], dtype=dtype), torch.tensor([0.25, 0.5, -2.75], dtype=dtype)
    am = AdvantageModelLoss(margin=1.0, task_momentum=1.0)
    loss = am(c, r, ["a", "b", "a"])
    assert loss.dtype == out
    cn, rn = c.double().numpy(), r.double().numpy()
    tasks = {"a": [0, 2], "b": [1]}
    penalty = np.mean([np.concatenate([cn[i], rn[i]]).mean() ** 2 / 2 + (np.concatenate([cn[i], rn[i]]).var() - 1) ** 2 / 2
                       for i in tasks.values()])
    want = (-log_expit(cn - rn).mean() + (((cn + rn) / 2) ** 2).mean()
            + (np.maximum(np.abs(np.r_[cn, rn]) - 1.0, 0) ** 2).mean() + penalty)
    assert loss.item() == pytest.approx(want, rel=1e-6)


def test_every_term_is_logged_unweighted():
    c = torch.tensor([0.5, -3.0, 2.0, 0.0], dtype=torch.float64)
    r = torch.tensor([-0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    tasks = ["x", "y", "x", "z"]
    am = AdvantageModelLoss(margin=1.5, expected_coef=0.3, bound_coef=2.0, task_coef=0.7, task_std=0.6, task_momentum=1.0)
    loss = am(c, r, tasks, margin=torch.tensor([0.0, 0.5, 1.0, 0.0], dtype=torch.float64))
    cn, rn = c.numpy(), r.numpy()
    penalties = []
    for t in ("x", "y", "z"):  # mean over tasks of each task's penalty (momentum 1: this batch's statistics)
        a = np.concatenate([cn[[i for i, s in enumerate(tasks) if s == t]], rn[[i for i, s in enumerate(tasks) if s == t]]])
        penalties.append(a.mean() ** 2 / 2 + (a.var() - 0.36) ** 2 / 2)
    want = {
        "rank": -log_expit(cn - rn - np.array([0.0, 0.5, 1.0, 0.0])).mean(),
        "expected": (((cn + rn) / 2) ** 2).mean(),
        "bound": (np.maximum(np.abs(np.r_[cn, rn]) - 1.5, 0) ** 2).mean(),
        "task": np.mean(penalties),
    }
    assert am.terms == pytest.approx(want, rel=1e-12)
    assert loss.item() == pytest.approx(want["rank"] + 0.3 * want["expected"] + 2.0 * want["bound"] + 0.7 * want["task"],
                                        rel=1e-12)
    AdvantageModelLoss(expected_coef=0, bound_coef=0, task_coef=0)(c, r)
    bt = AdvantageModelLoss(expected_coef=0, bound_coef=0, task_coef=0)
    bt(c, r)
    assert bt.terms == pytest.approx({"rank": -log_expit(cn - rn).mean()}, rel=1e-12)


def test_small_task_variance_is_penalised_below_one():
    """A task spread of variance 0.04 pulled to tau^2 = 0.25: the penalty sees 0.04, not a floor at 1."""
    am = AdvantageModelLoss(expected_coef=0, bound_coef=0, task_coef=1.0, task_std=0.5, task_momentum=1.0)
    am(torch.tensor([0.2], dtype=torch.float64), torch.tensor([-0.2], dtype=torch.float64), ["t"])
    assert am.terms["task"] == pytest.approx(0.0 + (0.04 - 0.25) ** 2 / 2, rel=1e-12)


def test_ties_count_as_wrong_and_sit_at_confidence_one_half():
    m = pairwise_metrics(torch.tensor([1.0, 2.0, 0.0, 3.0]), torch.tensor([1.0, 1.0, 0.0, 5.0]))
    assert m["accuracy"] == 0.25  # only 2 > 1 is right; the ties are not
    p = expit(np.array([0.0, 1.0, 0.0, -2.0]))
    conf = np.maximum(p, 1 - p)
    assert m["ece"] == pytest.approx(_numpy_ece(np.array([1.0, 2.0, 0.0, 3.0]), np.array([1.0, 1.0, 0.0, 5.0])), abs=1e-15)
    # bins: 0 holds the two ties (wrong, conf 0.5); 4 holds conf 0.731 (right); 7 holds conf 0.881 (wrong)
    assert m["ece"] == pytest.approx((2 * 0.5 + abs(1 - conf[1]) + conf[3]) / 4, abs=1e-15)


def test_ece_keeps_neighbouring_bins_apart_and_the_closed_last_bin():
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    gaps = np.array([logit(0.52), -logit(0.57), 50.0, -50.0, -logit(0.97)])  # conf 0.52, 0.57, 1.0, 1.0, 0.97
    c, r = torch.tensor(gaps), torch.zeros(5, dtype=torch.float64)
    assert expit(50.0) == 1.0  # confidence exactly 1.0: the closed upper edge of the last bin
    m = pairwise_metrics(c, r)
    # bin 0: right at 0.52; bin 1: wrong at 0.57; bin 9: right at 1.0, wrong at 1.0, wrong at 0.97
    want = (abs(1 - 0.52) + abs(0 - 0.57) + 3 * abs(1 / 3 - (1.0 + 1.0 + 0.97) / 3)) / 5
    assert m["ece"] == pytest.approx(want, abs=1e-12)
    assert m["ece"] == pytest.approx(_numpy_ece(gaps, np.zeros(5)), abs=1e-12)
    assert m["accuracy"] == pytest.approx(2 / 5)


@pytest.mark.parametrize("n_bins", [1, 3, 20])
def test_ece_with_other_bin_counts(n_bins):
    rng = np.random.default_rng(n_bins)
    c, r = rng.normal(0, 2, 200), rng.normal(0, 2, 200)
    m = pairwise_metrics(torch.tensor(c), torch.tensor(r), n_bins=n_bins)
    assert m["ece"] == pytest.approx(_numpy_ece(c, r, n_bins), abs=1e-12)


def test_metrics_per_task_statistics_exactly():
    c = torch.tensor([1.0, 2.0, -1.0, 0.5])
    r = torch.tensor([0.0, 3.0, -2.0, 0.5])
    m = pairwise_metrics(c, r, ["b", "a", "b", 7])
    assert list(m["per_task"]) == ["7", "a", "b"]
    assert m["per_task"]["b"] == {"n_pairs": 2, "mean": -0.5, "std": pytest.approx(np.std([1.0, -1.0, 0.0, -2.0]))}
    assert m["per_task"]["a"] == {"n_pairs": 1, "mean": 2.5, "std": 0.5}
    assert m["per_task"]["7"] == {"n_pairs": 1, "mean": 0.5, "std": 0.0}
    assert m["task_mean_spread"] == 3.0 and m["n_pairs"] == 4
    assert set(m) == {"n_pairs", "accuracy", "ece", "per_task", "task_mean_spread"}


@pytest.mark.parametrize(
    "c, r, tasks, message",
    [
        ([], [], None, "got 0 and 0"),
        ([1.0, 2.0], [0.0], None, "got 2 and 1"),
        ([1.0], [0.0, 2.0], None, "got 1 and 2"),
        ([1.0, 2.0], [0.0, 1.0], ["a"], "got 1 task names for 2 pairs"),
    ],
)
def test_metrics_refuse_bad_input(c, r, tasks, message):
    with pytest.raises(ValueError, match=message):
        pairwise_metrics(torch.tensor(c), torch.tensor(r), tasks)


def test_ece_default_is_ten_bins():
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    c, r = torch.tensor([logit(0.548), 0.0], dtype=torch.float64), torch.tensor([0.0, logit(0.552)], dtype=torch.float64)
    # ten bins put confidence 0.548 (right) in bin 0 and 0.552 (wrong) in bin 1; eleven would share one bin
    assert pairwise_metrics(c, r)["ece"] == pytest.approx((abs(1 - 0.548) + abs(0 - 0.552)) / 2, abs=1e-12)


def _local_sums(task_names, scores):
    """Per task of task_names: (count, sum, sum of squares) of one rank's scores, by numpy."""
    out = np.zeros((len(task_names), 3))
    for i, t in enumerate(task_names):
        if t in scores:
            a = np.asarray(scores[t], dtype=np.float64)
            out[i] = len(a), a.sum(), (a**2).sum()
    return out


def test_all_reduce_pools_task_statistics_over_ranks():
    """Two ranks simulated in one process: each rank's all_reduce adds the other's sums. Both end with the pooled
    statistics of every task any rank saw (in task_names order), and none for a task no rank saw."""
    names = ["a", "b", "a", "c"]  # repeated names collapse, first-seen order
    rank = {0: ([0.5, -1.0], [0.25, -2.0], ["a", "a"]), 1: ([2.0, 1.0], [1.5, 3.0], ["a", "b"])}
    scores = {i: {} for i in rank}
    for i, (c, r, tasks) in rank.items():
        for t in dict.fromkeys(tasks):
            idx = [j for j, u in enumerate(tasks) if u == t]
            scores[i][t] = [c[j] for j in idx] + [r[j] for j in idx]
    unique = ["a", "b", "c"]
    seen = {}
    for i, (c, r, tasks) in rank.items():
        other = torch.tensor(_local_sums(unique, scores[1 - i]), dtype=torch.float64)

        def all_reduce(s, i=i, other=other):
            seen[i] = s.clone()
            return s + other

        am = AdvantageModelLoss(expected_coef=0, bound_coef=0, task_names=names, all_reduce=all_reduce)
        assert am.task_names == unique
        am(torch.tensor(c, dtype=torch.float64), torch.tensor(r, dtype=torch.float64), tasks)
        np.testing.assert_allclose(seen[i].numpy(), _local_sums(unique, scores[i]))  # this rank's own sums
        pooled = {t: scores[0].get(t, []) + scores[1].get(t, []) for t in ("a", "b")}
        assert sorted(am.running) == ["a", "b"]  # "c": no rank saw it
        for t, a in pooled.items():
            a = np.array(a)
            assert am.running[t] == pytest.approx([a.mean(), (a**2).mean()], rel=1e-12)


def test_all_reduce_settings_and_unknown_tasks():
    with pytest.raises(ValueError, match="all_reduce needs task_names"):
        AdvantageModelLoss(all_reduce=lambda s: s)
    am = AdvantageModelLoss(task_names=["a"], all_reduce=lambda s: s)
    assert am.all_reduce is not None and am.task_names == ["a"]
    with pytest.raises(ValueError, match=r"tasks \['z'\] are not among the training tasks \['a'\]"):
        am(torch.tensor([1.0]), torch.tensor([0.0]), ["z"])
    single = AdvantageModelLoss()  # one process: any task is accepted
    single(torch.tensor([1.0]), torch.tensor([0.0]), ["z"])
    assert single.task_names is None and list(single.running) == ["z"]


def test_task_term_without_running_statistics_uses_the_batch():
    """In eval mode, a task with no running statistics is penalised with this batch's mean and variance."""
    tau, coef = 0.7, 1.5
    am = AdvantageModelLoss(expected_coef=0, bound_coef=0, task_coef=coef, task_std=tau).eval()
    c, r = np.array([2.0, -1.0, 0.5]), np.array([1.0, 0.5, -3.0])
    loss = am(torch.tensor(c, dtype=torch.float64), torch.tensor(r, dtype=torch.float64), ["t"] * 3)
    a = np.concatenate([c, r])
    penalty = a.mean() ** 2 / 2 + (a.var() - tau**2) ** 2 / 2
    assert loss.item() == pytest.approx(-log_expit(c - r).mean() + coef * penalty, rel=1e-12)
    assert am.running == {}


def test_running_statistics_travel_in_the_state_dict():
    """The running task statistics are module state: saved by state_dict (DeepSpeed checkpoints) and restored."""
    am = AdvantageModelLoss(task_momentum=0.5)
    am(torch.tensor([1.0, 2.0]), torch.tensor([0.0, -1.0]), ["a", "b"])
    state = am.state_dict()
    assert state["_extra_state"] == {"running": {t: list(v) for t, v in am.running.items()}}
    fresh = AdvantageModelLoss(task_momentum=0.5)
    fresh.load_state_dict(state)
    assert fresh.running == am.running and sorted(fresh.running) == ["a", "b"]
    assert all(type(x) is float for v in fresh.running.values() for x in v)
    fresh.set_extra_state({"running": {"c": (np.float32(0.5), torch.tensor(2.0))}})  # replaces, as floats
    assert fresh.running == {"c": [0.5, 2.0]} and all(type(x) is float for x in fresh.running["c"])
