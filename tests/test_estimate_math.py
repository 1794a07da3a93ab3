"""The reference estimator's steps pinned exactly: settings spread and validated at every documented edge,
which prompts are sampled, the records of `score_prompts`, the labels and report of `finish`, ridge's
leave-one-out penalty and the learned predictor against independent computations (numpy normal equations,
brute-force leave-one-out, scipy). The CLI, models and I/O are tested in test_estimate_reference.py."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from openrlhf_lsc import estimate
from openrlhf_lsc.integration.samplers import HFSampler
from openrlhf_lsc.references import gaussian_reference

Z = stats.norm.ppf


def table_rm(table):
    """Reward function reading table[(prompt, response)]: a misaligned prompt/response pair is a KeyError."""
    return lambda prompts, responses: [table[(p, r)] for p, r in zip(prompts, responses)]


def sampler_of(k_responses):
    """Sampler answering 'r0'..'r{k-1}'; records each call's prompts and k."""

    def sample(prompts, k):
        sample.calls.append((list(prompts), k))
        return [[f"r{j}" for j in range(k)] for _ in prompts]

    sample.calls = []
    return sample


def no_sampler(prompts, k):
    raise AssertionError("nothing should be sampled")


# ------------------------------------------------------------------------------------------------ per_rm


def test_per_rm_spreads_one_value_a_list_or_a_dict():
    names = ["a", "b"]
    assert estimate.per_rm(0.5, names, "q") == {"a": 0.5, "b": 0.5}
    assert estimate.per_rm("quantile", names, "method") == {"a": "quantile", "b": "quantile"}
    assert estimate.per_rm([0.7], names, "q") == {"a": 0.7, "b": 0.7}
    assert estimate.per_rm((0.7,), names, "q") == {"a": 0.7, "b": 0.7}
    assert estimate.per_rm([0.1, 0.9], names, "q") == {"a": 0.1, "b": 0.9}
    assert estimate.per_rm({"b": 2, "a": 1}, names, "q") == {"a": 1, "b": 2}
    assert list(estimate.per_rm({"b": 2, "a": 1}, names, "q")) == ["a", "b"]


@pytest.mark.parametrize(
    "value, message",
    [
        ([0.1, 0.2, 0.3], r"^q has 3 values for 2 reward models \['a', 'b'\]: give one or one each$"),
        ((), r"^q has 0 values for 2 reward models"),
        ({"a": 1}, r"^q must give a value for each reward model \['a', 'b'\], got \{'a': 1\}$"),
        ({"a": 1, "c": 2}, r"^q must give a value for each reward model"),  # right count, wrong name
        ({"a": 1, "b": 2, "c": 3}, r"^q must give a value for each reward model"),  # every name, one extra
    ],
)
def test_per_rm_refuses_a_wrong_count_or_names(value, message):
    with pytest.raises(ValueError, match=message):
        estimate.per_rm(value, ["a", "b"], "q")


# ------------------------------------------------------------------------------------------ check_settings


def test_check_settings_returns_every_sorted_level_once():
    methods = {"a": "quantile", "b": "gaussian", "c": "learned", "d": "canned"}
    qs = {"a": 0.85, "b": 0.5, "c": 0.85, "d": 7.0}  # canned has no q: its value is never checked
    assert estimate.check_settings(methods, qs, 2, quantiles=[0.9, 0.1, 0.5]) == [0.1, 0.5, 0.85, 0.9]
    assert all(isinstance(v, float) for v in estimate.check_settings({"a": "quantile"}, {"a": 1 / 2}, 2))
    assert estimate.check_settings({"d": "canned"}, {"d": None}, 0) == []  # nothing sampled: k unused
    assert estimate.check_settings({"d": "canned"}, {}, 0, quantiles=[0.25]) == [0.25]


@pytest.mark.parametrize(
    "methods, qs, k, quantiles, message",
    [
        ({"a": "median"}, {"a": 0.5}, 4, (), r"^--ref.method for reward model 'a' is 'median': expected one of "
                                              r"quantile, gaussian, learned, canned$"),
        ({"a": "Quantile"}, {"a": 0.5}, 4, (), "--ref.method"),
        ({"a": "quantile"}, {"a": 0.5}, 1, (), r"^--ref.k must be an integer >= 2 .* got 1$"),
        ({"a": "learned"}, {"a": 0.5}, 0, (), r"^--ref.k must be an integer >= 2 .* got 0$"),
        ({"a": "gaussian"}, {"a": 0.5}, True, (), r"got True$"),
        ({"a": "quantile"}, {"a": 0.5}, 4.0, (), r"got 4.0$"),
        ({"a": "quantile"}, {"a": 0.0}, 4, (), r"^--ref.q for reward model 'a' must be a number strictly between 0 "
                                               r"and 1, got 0.0$"),
        ({"a": "gaussian"}, {"a": 1.0}, 4, (), "--ref.q for reward model 'a'"),
        ({"a": "learned"}, {"a": True}, 4, (), "--ref.q for reward model 'a'.*got True$"),
        ({"a": "quantile"}, {"a": "0.5"}, 4, (), "--ref.q for reward model 'a'"),
        ({"a": "quantile"}, {"a": float("nan")}, 4, (), "--ref.q for reward model 'a'"),
        ({"a": "quantile"}, {"a": 0.5}, 4, (0.5, 1.5), r"^--ref.quantiles must be a number .* got 1.5$"),
        ({"d": "canned"}, {}, 0, (0,), r"^--ref.quantiles must be"),
    ],
)
def test_check_settings_refuses(methods, qs, k, quantiles, message):
    with pytest.raises(ValueError, match=message):
        estimate.check_settings(methods, qs, k, quantiles)


# ------------------------------------------------------------------------------------------- sampled_mask


def test_sampled_mask_every_prompt_for_direct_methods_none_for_canned():
    assert estimate.sampled_mask(3, {"a": "quantile", "b": "learned"}, None, 0) == [True] * 3
    assert estimate.sampled_mask(3, {"a": "gaussian"}, 3, 0) == [True] * 3  # all of them is not a subset
    assert estimate.sampled_mask(3, {"a": "canned"}, None, 0) == [False] * 3
    with pytest.raises(ValueError, match=r"^--learned.num_prompts samples a subset of prompts, but reward models "
                                         r"\['a'\] use quantile/gaussian"):
        estimate.sampled_mask(3, {"a": "gaussian", "b": "learned"}, 2, 0)


def test_sampled_mask_learned_subset_is_seeded_and_sized():
    everyone = estimate.sampled_mask(5, {"a": "learned"}, None, 0)
    assert everyone == [True] * 5
    masks = {seed: estimate.sampled_mask(40, {"a": "learned", "c": "canned"}, 7, seed) for seed in range(3)}
    assert all(sum(m) == 7 for m in masks.values())
    assert masks[0] == estimate.sampled_mask(40, {"a": "learned"}, 7, 0)  # same seed, same subset
    assert masks[0] != masks[1] != masks[2] != masks[0]
    assert sum(estimate.sampled_mask(3, {"a": "learned"}, 2, 0)) == 2  # the smallest subset
    assert estimate.sampled_mask(3, {"a": "learned"}, 3, 0) == [True] * 3


@pytest.mark.parametrize("n", [1, 0, 4, -2])
def test_sampled_mask_refuses_a_learned_subset_out_of_range(n):
    with pytest.raises(ValueError, match=rf"^--learned.num_prompts must be between 2 and the number of prompts \(3\), "
                                         rf"got {n}$"):
        estimate.sampled_mask(3, {"a": "learned"}, n, 0)


# ------------------------------------------------------------------------------------------- score_prompts


def test_score_prompts_records_exactly():
    prompts = ["p0", "  ", "p2", "p3"]
    k = 3
    table = {("p0", "r0"): 1.0, ("p0", "r1"): 4.0, ("p0", "r2"): 2.0,
             ("p2", "r0"): 0.1, ("p2", "r1"): None, ("p2", "r2"): -0.3,
             ("p3", "r0"): float("nan"), ("p3", "r1"): 5.0, ("p3", "r2"): float("-inf")}
    other = {key: (None if v is None else 2 * v) for key, v in table.items()}
    canned = {(p, c): float(len(p) + j) for p in ("p0", "p2", "p3") for j, c in enumerate(["no", "nope"])}
    canned[("p3", "nope")] = float("inf")
    sampler = sampler_of(k)
    records = estimate.score_prompts(
        prompts, sampler, {"h": table_rm(table), "g": table_rm(other), "c": table_rm(canned)},
        {"h": "quantile", "g": "gaussian", "c": "canned"}, k, [0.5, 0.9], canned_responses=["no", "nope"],
        sampled=[True, True, True, False],
    )
    assert sampler.calls == [(["p0", "p2"], 3)]  # blank and unsampled prompts are not sampled

    def entry(values, failed=None):
        ok = np.array([v for v in values if v is not None and math.isfinite(v)])
        e = {"k": len(ok), "mean": pytest.approx(ok.mean(), rel=1e-12), "std": pytest.approx(ok.std(ddof=1), rel=1e-12),
             "quantiles": {"0.5": pytest.approx(np.quantile(ok, 0.5), rel=1e-12),
                           "0.9": pytest.approx(np.quantile(ok, 0.9), rel=1e-12)}}
        return {**e, "failed": failed} if failed else e

    assert records == [
        {"h": entry([1.0, 4.0, 2.0]), "g": entry([2.0, 8.0, 4.0]), "c": {"canned_scores": [2.0, 3.0]}},
        {"h": {"error": "empty prompt", "retry": False}, "g": {"error": "empty prompt", "retry": False}, "c": {"error": "empty prompt", "retry": False}},
        {"h": entry([0.1, -0.3], failed=1), "g": entry([0.2, -0.6], failed=1), "c": {"canned_scores": [2.0, 3.0]}},
        {"h": {"k": 0}, "g": {"k": 0}, "c": {"error": "1 of 2 canned responses got no finite score", "retry": True}},
    ]


def test_score_prompts_entries_need_two_finite_scores():
    table = {("a", "r0"): 1.0, ("a", "r1"): None, ("a", "r2"): float("nan"),
             ("b", "r0"): 1.0, ("b", "r1"): 3.0, ("b", "r2"): None}
    records = estimate.score_prompts(["a", "b"], sampler_of(3), {"h": table_rm(table)}, {"h": "learned"}, 3, [0.25])
    assert records[0] == {"h": {"error": "only 1 of 3 sampled responses got a finite score (need 2)", "retry": True}}
    assert records[1] == {"h": {"k": 2, "mean": 2.0, "std": pytest.approx(math.sqrt(2)),
                                "quantiles": {"0.25": 1.5}, "failed": 1}}


def test_score_prompts_keeps_float64_scores():
    table = {("a", "r0"): 0.1, ("a", "r1"): 0.2}
    records = estimate.score_prompts(["a"], sampler_of(2), {"h": table_rm(table)}, {"h": "quantile"}, 2, [0.5])
    assert records[0]["h"]["mean"] == (0.1 + 0.2) / 2 and records[0]["h"]["quantiles"] == {"0.5": (0.1 + 0.2) / 2}


def test_score_prompts_without_sampling_methods_never_samples():
    canned = {("a", "x"): 1.0, ("b", "x"): 2.0}
    records = estimate.score_prompts(["a", "b", ""], no_sampler, {"c": table_rm(canned)}, {"c": "canned"}, 4, [],
                                     canned_responses=["x"])
    assert records == [{"c": {"canned_scores": [1.0]}}, {"c": {"canned_scores": [2.0]}}, {"c": {"error": "empty prompt", "retry": False}}]
    assert estimate.score_prompts(["", " "], no_sampler, {"c": table_rm({})}, {"c": "canned"}, 4, []) == [
        {"c": {"error": "empty prompt", "retry": False}}, {"c": {"error": "empty prompt", "retry": False}}]  # nothing live: no canned response needed


@pytest.mark.parametrize(
    "sampler, message",
    [
        (lambda prompts, k: [["r0", "r1"]], r"^sampler returned \[2\] responses for 2 prompts, expected 2 each$"),
        (lambda prompts, k: [["r0", "r1"], ["r0"]], r"^sampler returned \[2, 1\] responses for 2 prompts, expected 2 each$"),
        (lambda prompts, k: [["r0", "r1"], ["r0", "r1", "r2"]], r"returned \[2, 3\] responses"),
    ],
)
def test_score_prompts_refuses_a_wrong_sample_count(sampler, message):
    table = {(p, f"r{j}"): 0.0 for p in "ab" for j in range(3)}
    with pytest.raises(ValueError, match=message):
        estimate.score_prompts(["a", "b"], sampler, {"h": table_rm(table)}, {"h": "quantile"}, 2, [0.5])


def test_score_prompts_refuses_a_wrong_score_count_and_no_canned_responses():
    with pytest.raises(ValueError, match=r"^reward model 'h' returned 3 scores for 4 responses$"):
        estimate.score_prompts(["a", "b"], sampler_of(2), {"h": lambda p, r: [0.0] * 3}, {"h": "quantile"}, 2, [0.5])
    with pytest.raises(ValueError, match=r"^reward model 'c' returned 1 scores for 2 responses$"):
        estimate.score_prompts(["a", "b"], no_sampler, {"c": lambda p, r: [0.0]}, {"c": "canned"}, 2, [], ["x"])
    with pytest.raises(ValueError, match=r"^method 'canned' needs at least one canned response \(--ref.canned\)$"):
        estimate.score_prompts(["a"], no_sampler, {"c": table_rm({})}, {"c": "canned"}, 2, [])



def test_score_error_retries_prompt_by_prompt_and_records_only_the_prompts_that_still_fail():
    k, calls = 2, []
    table = {(p, f"r{j}"): float(10 * i + j) for i, p in enumerate("abcd") for j in range(k)}
    table.update({(p, c): float(len(c) + i) for i, p in enumerate("abcd") for c in ("no", "nope!")})

    def flaky(prompts, responses):  # a server that fails whole calls touching "b" and any call over one prompt
        calls.append(list(zip(prompts, responses)))
        if "b" in prompts:
            raise estimate.ScoreError(f"cannot score b ({len(prompts)} responses)")
        if len(set(prompts)) > 1:
            raise estimate.ScoreError("batch too large")
        return [table[(p, r)] for p, r in zip(prompts, responses)]

    records = estimate.score_prompts(
        list("abcd"), sampler_of(k), {"h": flaky}, {"h": "quantile"}, k, [0.5])
    # one call for everything, then one call per prompt holding exactly that prompt's k (prompt, response) pairs
    assert calls == [[(p, f"r{j}") for p in "abcd" for j in range(k)]] + [[(p, f"r{j}") for j in range(k)] for p in "abcd"]
    assert records[1] == {"h": {"error": "cannot score b (2 responses)", "retry": True}}
    for i in (0, 2, 3):
        assert records[i] == {"h": {"k": 2, "mean": 10 * i + 0.5, "std": pytest.approx(math.sqrt(0.5), rel=1e-12),
                                    "quantiles": {"0.5": 10 * i + 0.5}}}

    calls.clear()
    records = estimate.score_prompts(list("abcd"), no_sampler, {"c": flaky}, {"c": "canned"}, k, [],
                                     canned_responses=["no", "nope!"])
    assert calls == [[(p, c) for p in "abcd" for c in ("no", "nope!")]] + [[(p, c) for c in ("no", "nope!")] for p in "abcd"]
    assert records[1] == {"c": {"error": "cannot score b (2 responses)", "retry": True}}
    assert [records[i] for i in (0, 2, 3)] == [{"c": {"canned_scores": [2.0 + i, 5.0 + i]}} for i in (0, 2, 3)]


def test_score_error_on_every_prompt_fails_each_and_other_exceptions_propagate():
    def down(prompts, responses):
        raise estimate.ScoreError("server down")

    records = estimate.score_prompts(["a", "b"], sampler_of(2), {"h": down}, {"h": "gaussian"}, 2, [0.5])
    assert records == [{"h": {"error": "server down", "retry": True}}] * 2

    def broken(prompts, responses):
        raise RuntimeError("bug in the reward fn")

    with pytest.raises(RuntimeError, match="bug in the reward fn"):
        estimate.score_prompts(["a", "b"], sampler_of(2), {"h": broken}, {"h": "quantile"}, 2, [0.5])

    def short_alone(prompts, responses):  # after the retry, a prompt's call answering too few scores is still a bug
        if len(prompts) > 2:
            raise estimate.ScoreError("batch too large")
        return [0.0]

    with pytest.raises(ValueError, match=r"^reward model 'h' returned 1 scores for 2 responses$"):
        estimate.score_prompts(["a", "b"], sampler_of(2), {"h": short_alone}, {"h": "quantile"}, 2, [0.5])

def test_default_canned_responses_are_refusals():
    assert len(estimate.CANNED_RESPONSES) == 5 and len(set(estimate.CANNED_RESPONSES)) == 5
    for text in estimate.CANNED_RESPONSES:
        assert text[0].isupper() and text[1:] != text[1:].upper() and text.endswith(".")
        assert any(w in text for w in ("can't", "cannot", "not able")) and ("answer" in text or "help" in text)


# ------------------------------------------------------------------------------------------------- ridge


def _fit(X, y, alpha):
    """Ridge with an unpenalised intercept through the normal equations."""
    xm, ym = X.mean(0), y.mean()
    Xc = X - xm
    w = np.linalg.solve(Xc.T @ Xc + alpha * np.eye(X.shape[1]), Xc.T @ (y - ym))
    return w, ym - xm @ w


def _loo(X, y, alpha):
    errs = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        w, b = _fit(X[keep], y[keep], alpha)
        errs.append((X[i] @ w + b - y[i]) ** 2)
    return np.mean(errs)


def test_ridge_picks_the_brute_force_leave_one_out_minimiser_on_a_fine_grid():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(25, 4)) * [1.0, 3.0, 0.2, 1.0]
    y = X @ np.array([0.5, -0.2, 2.0, 0.0]) + 1.5 + rng.normal(size=25)
    alphas = list(np.geomspace(0.05, 50, 40))
    w, b, alpha = estimate.ridge(torch.tensor(X), torch.tensor(y), alphas)
    assert alpha == min(alphas, key=lambda a: _loo(X, y, a))
    assert 0.05 < alpha < 50  # an interior optimum: the grid's ends are not what decided it
    w_ref, b_ref = _fit(X, y, alpha)
    np.testing.assert_allclose(w.numpy(), w_ref, rtol=1e-9, atol=1e-12)
    assert b == pytest.approx(b_ref, rel=1e-9, abs=1e-12)
    assert isinstance(alpha, float) and isinstance(b, float)


def test_ridge_leave_one_out_at_the_grid_ends_and_ties():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(20, 3))
    exact = X @ np.array([1.0, -2.0, 0.5]) + 0.3  # noiseless: the smallest penalty wins
    noise = rng.normal(size=20)  # no signal: the largest penalty wins
    alphas = [1e-3, 1e-1, 10.0, 1e3]
    assert estimate.ridge(torch.tensor(X), torch.tensor(exact), alphas)[2] == 1e-3
    assert estimate.ridge(torch.tensor(X), torch.tensor(noise), alphas)[2] == 1e3
    # constant features: every penalty predicts the mean, the leave-one-out errors tie and the first one stays
    w, b, alpha = estimate.ridge(torch.ones(6, 2, dtype=torch.float64), torch.arange(6.0, dtype=torch.float64), [5.0, 1.0])
    assert alpha == 5.0 and w.tolist() == [0.0, 0.0] and b == 2.5


@pytest.mark.parametrize("seed", range(12))
def test_ridge_leave_one_out_choice_on_small_samples(seed):
    """Small n, where the leverage's intercept term 1/n moves the leave-one-out errors most: the chosen penalty is the
    brute-force minimiser (refitting slope and intercept without each point) on every one of these samples."""
    rng = np.random.default_rng(100 + seed)
    n = 4 + seed % 4
    X = rng.normal(size=(n, 2))
    y = X @ rng.normal(size=2) + rng.normal(size=n) * (0.3 + seed % 3)
    alphas = list(np.geomspace(1e-3, 1e3, 31))
    assert estimate.ridge(torch.tensor(X), torch.tensor(y), alphas)[2] == min(alphas, key=lambda a: _loo(X, y, a))


# ------------------------------------------------------------------------------------- GaussianPredictor


def _predictor_reference(X, mean, std, X_new):
    """The documented predictor: standardised features, ridge of mean and log std, penalty by LOO over n*10^-5..10^3."""
    xm, xs = X.mean(0), X.std(0, ddof=1)
    xs = np.where(xs > 0, xs, 1.0)
    Z, Z_new = (X - xm) / xs, (X_new - xm) / xs
    grid = [len(X) * 10.0**e for e in range(-5, 4)]
    out = []
    for y in (mean, np.log(np.maximum(std, 1e-6))):
        alpha = min(grid, key=lambda a: _loo(Z, y, a))
        w, b = _fit(Z, y, alpha)
        out.append((Z_new @ w + b, alpha))
    (mu, a_mean), (log_sigma, a_std) = out
    return mu, np.exp(log_sigma), a_mean, a_std


def test_gaussian_predictor_against_an_independent_fit():
    rng = np.random.default_rng(6)
    X = rng.normal(size=(30, 3)) * [0.3, 2.0, 1.0]
    X[:, 2] = 4.0  # a constant feature stays 0 after standardising
    mean = X @ np.array([1.0, 0.5, 0.0]) + rng.normal(size=30) * 0.3
    std = np.exp(0.2 * X[:, 1] - 1.0 + rng.normal(size=30) * 0.1)
    std[:3] = 0.0  # all k scores equal: log std is clamped, not -inf
    X_new = rng.normal(size=(5, 3))
    model = estimate.GaussianPredictor().fit(torch.tensor(X), torch.tensor(mean), torch.tensor(std))
    mu, sigma = model.predict(torch.tensor(X_new))
    mu_ref, sigma_ref, a_mean, a_std = _predictor_reference(X, mean, std, X_new)
    assert (model.alpha_mean, model.alpha_std) == (pytest.approx(a_mean), pytest.approx(a_std))
    np.testing.assert_allclose(mu.numpy(), mu_ref, rtol=1e-8)
    np.testing.assert_allclose(sigma.numpy(), sigma_ref, rtol=1e-8)
    assert torch.isfinite(sigma).all() and (sigma > 0).all()


def test_gaussian_predictor_computes_in_float64_whatever_it_is_given():
    """Features from an encoder come as float32 tensors, tables as Python lists: the fit and the predictions are those
    of the float64 values (a float32 computation would be off by ~1e-7, a float32 copy of a list by ~1e-8)."""
    rng = np.random.default_rng(8)
    X = rng.normal(size=(20, 3)).astype(np.float32).astype(np.float64)  # exact in float32
    mean, std = X @ [0.1, 0.2, 0.3] + 0.1 * rng.normal(size=20), np.exp(0.1 * rng.normal(size=20))
    ref = estimate.GaussianPredictor().fit(torch.tensor(X), torch.tensor(mean), torch.tensor(std))
    mu_ref, sigma_ref = ref.predict(torch.tensor(X))
    for fit_args in ((torch.tensor(X, dtype=torch.float32), torch.tensor(mean), torch.tensor(std)),
                     (X.tolist(), mean.tolist(), std.tolist())):
        model = estimate.GaussianPredictor().fit(*fit_args)
        for X_new in (torch.tensor(X, dtype=torch.float32), X.tolist()):
            mu, sigma = model.predict(X_new)
            assert mu.dtype == sigma.dtype == torch.float64
            np.testing.assert_allclose(mu.numpy(), mu_ref.numpy(), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(sigma.numpy(), sigma_ref.numpy(), rtol=1e-12)
    # a list of floats that float32 would round: predictions from the list equal those from the float64 tensor
    X_fine = X + 1e-9
    np.testing.assert_allclose(ref.predict(X_fine.tolist())[0].numpy(), ref.predict(torch.tensor(X_fine))[0].numpy(),
                               rtol=0, atol=1e-13)


@pytest.mark.parametrize("signal", [0.0, 1.0])
def test_gaussian_predictor_penalty_grid_ends(signal):
    """Pure noise picks the grid's largest penalty n*10^3; a noiseless target its smallest, n*10^-5."""
    rng = np.random.default_rng(7)
    X = rng.normal(size=(40, 2))
    target = X @ np.array([1.0, -1.0]) if signal else rng.normal(size=40)
    model = estimate.GaussianPredictor().fit(torch.tensor(X), torch.tensor(target), torch.tensor(np.exp(target)))
    want = 40 * 1e-5 if signal else 40 * 1e3
    assert model.alpha_mean == pytest.approx(want) and model.alpha_std == pytest.approx(want)


# ------------------------------------------------------------------------------------------------ spearman


@pytest.mark.parametrize("seed", range(4))
def test_spearman_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(-3, 4, 30).astype(float)  # ties
    b = a + rng.normal(size=30) * 2
    c = rng.normal(size=30)  # no ties
    for x, y in ((a, b), (b, c), (a, a), (c, -c)):
        assert estimate.spearman(torch.tensor(x), torch.tensor(y)) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert estimate.spearman([1.0, 2.0, 2.0, 5.0], [4.0, 3.0, 3.0, 1.0]) == pytest.approx(-1.0)


# -------------------------------------------------------------------------------------- finish / learned


def _sampled(values, levels=(0.5,)):
    v = np.array(values, dtype=np.float64)
    return {"k": len(v), "mean": float(v.mean()), "std": float(v.std(ddof=1)),
            "quantiles": {str(q): float(np.quantile(v, q)) for q in levels}}


def test_finish_labels_and_report_exactly():
    records = [
        {"h": _sampled([1.0, 3.0]), "g": {**_sampled([0.0, 2.0, 4.0]), "failed": 1}, "c": {"canned_scores": [1.0, 2.0]}},
        {"h": {"error": "empty prompt", "retry": False}, "g": {"error": "empty prompt", "retry": False}, "c": {"error": "empty prompt", "retry": False}},
        {"h": _sampled([-1.0, 1.0, 6.0]), "g": {"error": "only 1 of 3 sampled responses got a finite score (need 2)", "retry": True},
         "c": {"error": "1 of 2 canned responses got no finite score", "retry": True}},
    ]
    labels, report = estimate.finish(records, {"h": "quantile", "g": "gaussian", "c": "canned"},
                                     {"h": 0.5, "g": 0.9, "c": 0.3})
    g_ref = 2.0 + Z(0.9) * 2.0
    assert labels[0] == {
        "h": {"reference": 2.0, "method": "quantile", "q": 0.5, "k": 2, "mean": 2.0, "std": math.sqrt(2),
              "quantiles": {"0.5": 2.0}},
        "g": {"reference": pytest.approx(g_ref, rel=1e-12), "method": "gaussian", "q": 0.9, "k": 3, "mean": 2.0,
              "std": 2.0, "quantiles": {"0.5": 2.0}, "failed": 1},
        "c": {"reference": 1.5, "method": "canned", "q": None, "k": 0, "mean": None, "std": None, "quantiles": {},
              "canned_scores": [1.0, 2.0]},
    }
    assert labels[1]["h"] == {"reference": None, "method": "quantile", "q": 0.5, "k": 0, "mean": None, "std": None,
                              "quantiles": {}, "error": "empty prompt", "retry": False}
    assert labels[2]["h"]["reference"] == 1.0
    assert labels[2]["g"] == {"reference": None, "method": "gaussian", "q": 0.9, "k": 0, "mean": None, "std": None,
                              "quantiles": {}, "error": "only 1 of 3 sampled responses got a finite score (need 2)", "retry": True}
    assert labels[2]["c"]["reference"] is None and labels[2]["c"]["error"].startswith("1 of 2")
    assert report == {"prompts": 3, "rms": {
        "h": {"method": "quantile", "q": 0.5, "prompts": 3, "with_reference": 2, "errors": 1, "coverage": 2 / 3,
              "reference": {"mean": 1.5, "std": pytest.approx(math.sqrt(0.5)), "min": 1.0, "max": 2.0}},
        "g": {"method": "gaussian", "q": 0.9, "prompts": 3, "with_reference": 1, "errors": 2, "coverage": 1 / 3,
              "reference": {"mean": pytest.approx(g_ref), "std": 0.0, "min": pytest.approx(g_ref), "max": pytest.approx(g_ref)}},
        "c": {"method": "canned", "q": None, "prompts": 3, "with_reference": 1, "errors": 2, "coverage": 1 / 3,
              "reference": {"mean": 1.5, "std": 0.0, "min": 1.5, "max": 1.5}},
    }}


def test_finish_keeps_references_in_float64_and_reads_an_error_without_retry_as_retryable():
    refs = [0.1, 0.2, 0.7000000001]  # not exact in float32
    labels, report = estimate.finish([{"h": {"canned_scores": [r]}} for r in refs] + [{"h": {"error": "old shard"}}],
                                     {"h": "canned"}, {})
    summary = report["rms"]["h"]["reference"]
    assert summary == {"mean": np.mean(refs), "std": pytest.approx(np.std(refs, ddof=1), rel=1e-14),
                       "min": 0.1, "max": 0.7000000001}
    assert labels[3]["h"]["retry"] is True  # records written before `retry` existed: scoring again may succeed


def test_finish_single_record_and_no_references():
    labels, report = estimate.finish([{"h": _sampled([0.0, 4.0])}], {"h": "quantile"}, {"h": 0.5})
    assert report["rms"]["h"]["coverage"] == 1.0 and report["rms"]["h"]["reference"]["std"] == 0.0
    labels, report = estimate.finish([{"h": {"error": "empty prompt", "retry": False}}], {"h": "quantile"}, {"h": 0.5})
    assert report["rms"]["h"] == {"method": "quantile", "q": 0.5, "prompts": 1, "with_reference": 0, "errors": 1,
                                  "coverage": 0.0}
    assert estimate.finish([], {"h": "quantile"}, {"h": 0.5}) == ([], {"prompts": 0, "rms": {"h": {
        "method": "quantile", "q": 0.5, "prompts": 0, "with_reference": 0, "errors": 0, "coverage": 0.0}}})


@pytest.mark.parametrize("holdout", [-0.1, 1.0, 1.5])
def test_finish_refuses_a_holdout_outside_zero_one(holdout):
    with pytest.raises(ValueError, match=rf"^--learned.holdout must be in \[0, 1\), got {holdout}$"):
        estimate.finish([], {"h": "quantile"}, {"h": 0.5}, holdout=holdout)


def _learned_records(n, seed=0, sampled=None):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    records = []
    for i in range(n):
        if sampled is not None and not sampled[i]:
            records.append({"h": {"k": 0}})
        else:
            records.append({"h": _sampled(X[i, 0] + np.exp(0.3 * X[i, 1]) * rng.normal(size=8), levels=(0.8,))})
    return X, records


def test_learned_labels_follow_the_documented_split_and_fit():
    n, holdout, seed = 30, 0.2, 4
    sampled = [i % 5 != 0 for i in range(n)]  # 24 sampled prompts
    X, records = _learned_records(n, sampled=sampled)
    records[1] = {"h": {"error": "only 1 of 8 sampled responses got a finite score (need 2)", "retry": True}}  # 23 usable
    labels, report = estimate.finish(records, {"h": "learned"}, {"h": 0.8}, features=torch.tensor(X),
                                     holdout=holdout, seed=seed)
    scored = [i for i in range(n) if sampled[i] and i != 1]
    perm = torch.randperm(len(scored), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    n_hold = round(holdout * len(scored))
    hold = sorted(scored[j] for j in perm[:n_hold])
    train = sorted(scored[j] for j in perm[n_hold:])
    mu, sigma, a_mean, a_std = _predictor_reference(
        X[train], np.array([records[i]["h"]["mean"] for i in train]), np.array([records[i]["h"]["std"] for i in train]), X)
    ref = mu + Z(0.8) * sigma
    got = np.array([lab["h"]["reference"] if lab["h"]["reference"] is not None else np.nan for lab in labels])
    usable = [i for i in range(n) if i != 1]
    np.testing.assert_allclose(got[usable], ref[usable], rtol=1e-7)
    assert labels[1]["h"]["reference"] is None and "error" in labels[1]["h"]
    assert labels[0]["h"]["predicted_mean"] == pytest.approx(mu[0]) and labels[0]["h"]["predicted_std"] == pytest.approx(sigma[0])
    assert labels[0]["h"]["k"] == 0 and labels[2]["h"]["k"] == 8
    empirical = np.array([records[i]["h"]["quantiles"]["0.8"] for i in hold])
    assert report["rms"]["h"]["learned"] == {
        "train_prompts": len(train), "holdout_prompts": n_hold, "alpha_mean": pytest.approx(a_mean),
        "alpha_std": pytest.approx(a_std), "holdout_mae": pytest.approx(np.abs(got[hold] - empirical).mean(), rel=1e-14),
        "holdout_spearman": pytest.approx(stats.spearmanr(ref[hold], empirical)[0], abs=1e-9)}
    assert (len(train), n_hold) == (18, 5)
    # features as nested Python lists: read as float64, not rounded to torch's default float32
    assert estimate.finish(records, {"h": "learned"}, {"h": 0.8}, features=X.tolist(), holdout=holdout, seed=seed)[0] == labels


def test_finish_default_seed_is_zero():
    X, records = _learned_records(8)
    run = lambda **kw: estimate.finish(records, {"h": "learned"}, {"h": 0.8}, features=X, holdout=0.5, **kw)  # noqa: E731
    assert run() == run(seed=0) != run(seed=1)


@pytest.mark.parametrize("holdout, n_hold, spearman", [(0.0, 0, "absent"), (0.4, 2, None), (0.6, 3, "value")])
def test_learned_holdout_sizes(holdout, n_hold, spearman):
    X, records = _learned_records(5)
    _, report = estimate.finish(records, {"h": "learned"}, {"h": 0.8}, features=torch.tensor(X), holdout=holdout)
    info = report["rms"]["h"]["learned"]
    assert (info["train_prompts"], info["holdout_prompts"]) == (5 - n_hold, n_hold)
    if spearman == "absent":
        assert "holdout_mae" not in info and "holdout_spearman" not in info
    elif spearman is None:
        assert info["holdout_spearman"] is None and info["holdout_mae"] >= 0  # two prompts: no rank correlation
    else:
        assert -1 <= info["holdout_spearman"] <= 1


def test_learned_trains_on_two_prompts_and_scores_need_k_of_two():
    X, records = _learned_records(3)
    records[2] = {"h": {**_sampled([0.0, 1.0]), "k": 2}}
    _, report = estimate.finish(records, {"h": "learned"}, {"h": 0.8}, features=torch.tensor(X), holdout=0.34)
    assert report["rms"]["h"]["learned"]["train_prompts"] == 2
    records[2] = {"h": {"k": 1, "mean": 0.0, "std": 0.0, "quantiles": {"0.8": 0.0}}}  # a k of 1 does not train
    with pytest.raises(ValueError, match=r"^method 'learned' \(reward model 'h'\) has 1 sampled prompts to train on after "
                                         r"holding out 1: sample more prompts"):
        estimate.finish(records, {"h": "learned"}, {"h": 0.8}, features=torch.tensor(X), holdout=0.34)


@pytest.mark.parametrize(
    "features, message",
    [
        (None, r"^method 'learned' \(reward model 'h'\) needs prompt features \(--learned.encoder\)$"),
        (np.zeros(4), r"^prompt features must be a finite \[4, d\] matrix, got shape \(4,\)$"),
        (np.zeros((3, 2)), r"got shape \(3, 2\)$"),
        (np.zeros((4, 2, 1)), r"got shape \(4, 2, 1\)$"),
        (np.array([[0.0], [1.0], [np.nan], [2.0]]), r"got shape \(4, 1\)$"),
        (np.array([[0.0], [1.0], [np.inf], [2.0]]), r"got shape \(4, 1\)$"),
    ],
)
def test_learned_refuses_bad_features(features, message):
    _, records = _learned_records(4)
    with pytest.raises(ValueError, match=message):
        estimate.finish(records, {"h": "learned"}, {"h": 0.8}, features=features)


# ----------------------------------------------------------------------------------- estimate_references


def test_estimate_references_defaults():
    """Defaults: quantile at q = 0.85 of k = 64 samples, the paper's canned responses, holdout 0.1, seed 0."""
    sampler = sampler_of(64)
    table = {("p", f"r{j}"): float(j) for j in range(64)}
    labels, report = estimate.estimate_references(["p"], sampler, {"h": table_rm(table)})
    assert sampler.calls == [(["p"], 64)]
    assert labels[0]["h"]["reference"] == pytest.approx(np.quantile(np.arange(64.0), 0.85))
    assert (labels[0]["h"]["method"], labels[0]["h"]["q"], list(labels[0]["h"]["quantiles"])) == ("quantile", 0.85, ["0.85"])
    seen = []
    estimate.estimate_references(["p"], no_sampler, {"c": lambda p, r: seen.extend(r) or [0.0] * len(r)}, method="canned")
    assert tuple(seen) == estimate.CANNED_RESPONSES

    n = 12
    X, _ = _learned_records(n)
    table = {(f"p{i}", f"r{j}"): float(X[i, 0] + j) for i in range(n) for j in range(4)}
    sampler = sampler_of(4)
    run = lambda **kw: estimate.estimate_references(  # noqa: E731
        [f"p{i}" for i in range(n)], sampler, {"h": table_rm(table)}, method="learned", k=4, features=X,
        num_learned_prompts=10, **kw)
    default = run()
    sampled = sampler.calls[0][0]
    assert len(sampled) == 10 and sum(lab["h"]["k"] == 4 for lab in default[0]) == 10  # the learned subset only
    assert sampled == [f"p{i}" for i, s in enumerate(estimate.sampled_mask(n, {"h": "learned"}, 10, 0)) if s]
    assert default == run(seed=0, holdout=0.1) and default != run(seed=1)
    assert default[1]["rms"]["h"]["learned"]["holdout_prompts"] == 1
    assert run(holdout=0.5)[1]["rms"]["h"]["learned"]["holdout_prompts"] == 5
    every = lambda seed: estimate.estimate_references(  # noqa: E731  every prompt sampled: the seed picks the holdout only
        [f"p{i}" for i in range(n)], sampler_of(4), {"h": table_rm(table)}, method="learned", k=4, features=X, seed=seed)
    assert every(0) != every(1)
    assert every(1)[1]["rms"]["h"]["learned"]["holdout_mae"] != every(0)[1]["rms"]["h"]["learned"]["holdout_mae"]


def test_estimate_references_spreads_and_checks_per_model_settings():
    table = {(p, f"r{j}"): float(j) for p in ("a", "b") for j in range(4)}
    labels, _ = estimate.estimate_references(["a", "b"], sampler_of(4), {"x": table_rm(table), "y": table_rm(table)},
                                             method={"x": "quantile", "y": "gaussian"}, q=[0.25, 0.75], k=4,
                                             quantiles=[0.5])
    assert labels[0]["x"]["reference"] == 0.75 and labels[0]["x"]["quantiles"] == {"0.25": 0.75, "0.5": 1.5, "0.75": 2.25}
    assert labels[0]["y"]["reference"] == pytest.approx(1.5 + Z(0.75) * np.std([0, 1, 2, 3], ddof=1))
    with pytest.raises(ValueError, match=r"^method has 3 values for 2 reward models"):
        estimate.estimate_references(["a"], sampler_of(4), {"x": table_rm(table), "y": table_rm(table)},
                                     method=["quantile"] * 3)
    with pytest.raises(ValueError, match=r"^q has 3 values for 2 reward models"):
        estimate.estimate_references(["a"], sampler_of(4), {"x": table_rm(table), "y": table_rm(table)}, q=[0.5] * 3)


def test_gaussian_reference_is_mean_plus_z_std():
    assert estimate.finish([{"g": _sampled([1.0, 2.0, 4.0])}], {"g": "gaussian"}, {"g": 0.3})[0][0]["g"]["reference"] == \
        pytest.approx(gaussian_reference(7 / 3, np.std([1.0, 2.0, 4.0], ddof=1), 0.3).item(), rel=1e-12)


# ----------------------------------------------------------------------------------------------- sampler


class _Tok:
    """Word-level tokenizer: word i of the vocabulary is id i + 10; ids 0-9 are special."""

    eos_token_id, pad_token_id = 2, 0

    def __init__(self):
        self.vocab, self.decoded = {}, []

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False  # the chat template already placed any BOS
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab) + 10) for w in text.split()]}

    def decode(self, ids, skip_special_tokens=True):
        self.decoded.append((list(ids), skip_special_tokens))
        return "|".join(map(str, ids))


class _LM:
    """`generate` stand-in: records its arguments and answers row r (prompt j, sample t) with tokens[j][t]."""

    device = torch.device("cpu")

    def __init__(self, eos, tokens):
        self.generation_config = type("GC", (), {"eos_token_id": eos})()
        self.tokens, self.calls, self.seen = tokens, [], 0

    def generate(self, input_ids, attention_mask, **kw):
        self.calls.append((input_ids.tolist(), attention_mask.tolist(), kw))
        k = kw["num_return_sequences"]
        rows = []
        for j in range(input_ids.shape[0]):
            for t in range(k):
                new = self.tokens[self.seen + j][t]
                rows.append(input_ids[j].tolist() + new + [0] * (kw["max_new_tokens"] - len(new)))
        self.seen += input_ids.shape[0]
        return torch.tensor(rows)


@pytest.mark.parametrize("eos, expected", [(None, [2]), ("unset", [2]), (2, [2]), (7, [2, 7]), ([9, 2, 5, 9], [2, 5, 9])])
def test_sampler_stops_at_the_union_of_the_configs_and_the_tokenizers_eos(eos, expected):
    lm = _LM(eos, [])
    if eos == "unset":  # a generation config without the attribute at all
        lm.generation_config = type("GC", (), {})()
    sampler = HFSampler(lm, _Tok(), max_new_tokens=4)
    assert sampler.eos == expected
    for e in expected:  # cut after the first EOS of any kind, which is kept
        assert sampler.decode([11, e, 12, 2]) == f"11|{e}"
    others = [t for t in (5, 7, 9) if t not in expected]
    assert sampler.decode([11] + others + [12]) == "|".join(map(str, [11] + others + [12]))
    assert all(skip is False for _, skip in sampler.tokenizer.decoded)  # special tokens (the EOS) stay in the text


def test_sampler_left_pads_truncates_batches_and_generates_as_openrlhf_rollouts():
    tok = _Tok()
    prompts = ["a b c d e f", "g", "h i", "j k l"]
    k = 2
    tokens = [[[30 + 10 * j, 2, 0], [40 + 10 * j, 41 + 10 * j, 42 + 10 * j]] for j in range(4)]  # EOS then pad; no EOS
    lm = _LM([5], tokens)
    sampler = HFSampler(lm, tok, max_new_tokens=3, temperature=0.7, top_p=0.9, max_len=7, batch_size=3)
    out = sampler(prompts, k)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    # batches of 3 then 1; prompts keep their last max_len - max_new_tokens = 4 tokens, left-padded with pad id 0
    first, second = lm.calls
    assert first[0] == [ids[0][-4:], [0, 0, 0] + ids[1], [0, 0] + ids[2]]
    assert first[1] == [[1, 1, 1, 1], [0, 0, 0, 1], [0, 0, 1, 1]]
    assert second[0] == [ids[3]] and second[1] == [[1, 1, 1]]
    for _, _, kw in (first, second):
        assert kw == {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "max_new_tokens": 3,
                      "min_new_tokens": 1, "num_return_sequences": k, "pad_token_id": 0, "eos_token_id": [2, 5]}
    # response t of prompt j is generated row j * k + t, cut after its first EOS
    assert out == [[f"{30 + 10 * j}|2", f"{40 + 10 * j}|{41 + 10 * j}|{42 + 10 * j}"] for j in range(4)]


def test_sampler_without_max_len_keeps_whole_prompts_and_checks_its_settings():
    tok = _Tok()
    lm = _LM(None, [[[2]]] * 3)
    HFSampler(lm, tok, max_new_tokens=2, batch_size=8)(["a b c d e", "f", "g h"], 1)
    assert lm.calls[0][0] == [tok("a b c d e", add_special_tokens=False)["input_ids"], [0] * 4 + tok("f", add_special_tokens=False)["input_ids"], [0] * 3 + tok("g h", add_special_tokens=False)["input_ids"]]
    assert HFSampler(lm, tok, max_new_tokens=5, max_len=6).max_prompt == 1  # one prompt token is enough
    with pytest.raises(ValueError, match=r"^--data.max_len 5 leaves no room for a prompt with --rollout.max_new_tokens 5$"):
        HFSampler(lm, tok, max_new_tokens=5, max_len=5)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=rf"^--rollout.temperature must be > 0 to draw k different samples, got {bad}$"):
            HFSampler(lm, tok, max_new_tokens=2, temperature=bad)
    assert HFSampler(lm, tok, max_new_tokens=2, temperature=1e-3).temperature == 1e-3
    default = HFSampler(lm, tok, max_new_tokens=2)  # OpenRLHF's --rollout.* defaults
    assert (default.temperature, default.top_p, default.batch_size, default.max_prompt) == (1.0, 1.0, 8, None)
