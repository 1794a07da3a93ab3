"""The public reward API against the paper's worked examples, numpy, and hypothesis properties."""

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from openrlhf_lsc import RewardSpec, aggregate_rewards, group_quantile_reference, reward_utilities, transform_reward
from openrlhf_lsc.rewards import check_finite


def logit(p):
    return math.log(p / (1 - p))


def test_paper_single_reward_worked_example():
    # p(ref < y0) = 0.99, p(ref < y1) = 0.999: r - r_ref = logit(p). Optimal-policy ratio = exp(u1 - u0).
    ref = torch.tensor(0.3)
    r = ref + torch.tensor([logit(0.99), logit(0.999)], dtype=torch.float64)
    raw = transform_reward(r, ref, "raw")
    lsc = transform_reward(r, ref, "lsc")
    assert math.exp(raw[1] - raw[0]) == pytest.approx(0.999 / 0.001 / (0.99 / 0.01), rel=1e-9)  # 10.09
    assert math.exp(raw[1] - raw[0]) == pytest.approx(10.09, abs=0.005)
    assert math.exp(lsc[1] - lsc[0]) == pytest.approx(0.999 / 0.99, rel=1e-9)  # 1.009
    assert math.exp(lsc[1] - lsc[0]) == pytest.approx(1.009, abs=0.0005)


def test_paper_two_reward_worked_example():
    # y1 balanced (0.9, 0.9), y0 lopsided (0.45, 0.99). Raw sum: no preference; AND-LSC prefers y1 by ~1.82.
    margins = torch.tensor([[logit(0.45), logit(0.99)], [logit(0.9), logit(0.9)]], dtype=torch.float64)
    refs = torch.tensor([1.0, -2.0], dtype=torch.float64)  # one constant per reward model: [K]
    rewards = margins + refs
    raw = aggregate_rewards(rewards, refs, transform="center", aggregate="and")
    lsc = aggregate_rewards(rewards, refs, transform="lsc", aggregate="and")
    assert math.exp(raw[1] - raw[0]) == pytest.approx(1.0, abs=1e-9)
    assert math.exp(lsc[1] - lsc[0]) == pytest.approx(0.81 / (0.45 * 0.99), rel=1e-9)
    assert math.exp(lsc[1] - lsc[0]) == pytest.approx(1.82, abs=0.005)


finite = st.floats(-50, 50, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=16), finite, finite)
def test_lsc_properties(rs, ref, c):
    r = torch.tensor(rs, dtype=torch.float64)
    u = transform_reward(r, torch.tensor(ref, dtype=torch.float64), "lsc")
    assert (u <= 0).all()
    order = torch.argsort(r)
    assert (u[order].diff() >= 0).all()  # monotone in r
    shifted = transform_reward(r + c, torch.tensor(ref + c, dtype=torch.float64), "lsc")
    torch.testing.assert_close(shifted, u, atol=1e-9, rtol=1e-9)
    expected = np.log(1 / (1 + np.exp(-(np.array(rs) - ref))))
    np.testing.assert_allclose(u.numpy(), expected, rtol=1e-9, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.integers(0, 10_000))
@example(5, 1, 1885)  # a utility of -7e-8: once failed a purely relative tolerance
def test_and_is_log_of_product_and_weighted_is_plain_sum(b, k, seed):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(b, k, generator=g, dtype=torch.float64) * 5
    ref = torch.randn(b, k, generator=g, dtype=torch.float64)
    u = aggregate_rewards(r, ref, "lsc", "and")
    prob = np.prod(1 / (1 + np.exp(-(r - ref).numpy())), axis=1)
    # log of a product of k factors near 1 carries an absolute rounding error of ~eps per factor, which a
    # relative tolerance cannot absorb when the utility itself is near 0 (e.g. -7e-8 at b=5, k=1, seed=1885).
    np.testing.assert_allclose(u.numpy(), np.log(prob), rtol=1e-9, atol=4 * k * np.finfo(np.float64).eps)
    w = torch.rand(k, generator=g, dtype=torch.float64).tolist()
    np.testing.assert_allclose(
        aggregate_rewards(r, None, "raw", "weighted", w).numpy(), (r.numpy() * np.array(w)).sum(1), rtol=1e-12
    )
    np.testing.assert_allclose(aggregate_rewards(r, None, "raw", "and").numpy(), r.numpy().sum(1), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stable_for_huge_margins_in_low_precision(dtype):
    r = torch.tensor([-1e4, 0.0, 1e4], dtype=dtype)
    u = transform_reward(r, torch.zeros(3, dtype=dtype), "lsc")
    assert u.dtype == torch.float32 and torch.isfinite(u).all()
    assert u[0].item() == pytest.approx(r[0].float().item(), rel=1e-6) and u[2].item() == 0.0
    assert aggregate_rewards(r.reshape(3, 1), torch.zeros(3, 1, dtype=dtype)).dtype == torch.float32


def test_group_quantile_matches_numpy():
    r = torch.tensor([[3.0, 1.0], [0.0, 5.0], [2.0, 2.5], [1.0, -1.0], [7.0, 0.0], [4.0, 4.0]])
    ref = group_quantile_reference(r, 3, 0.85)
    for g in range(2):
        expected = np.quantile(r[3 * g : 3 * g + 3].numpy(), 0.85, axis=0)
        np.testing.assert_allclose(ref[3 * g : 3 * g + 3].numpy(), np.broadcast_to(expected, (3, 2)), rtol=1e-6)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: transform_reward(torch.zeros(2), torch.zeros(2), "tanh"), "--lsc.transform"),
        (lambda: transform_reward(torch.zeros(2), None, "lsc"), "--lsc.reference"),
        (lambda: transform_reward(torch.tensor([0.0, float("nan")]), torch.zeros(2), "lsc"), "rewards must be finite"),
        (lambda: transform_reward(torch.tensor([0.0, float("inf")]), None, "raw"), "rewards must be finite"),
        (lambda: transform_reward(torch.zeros(2), torch.tensor([0.0, float("inf")]), "lsc"), "references must be finite"),
        (lambda: aggregate_rewards(torch.zeros(2, 2), torch.zeros(2, 2), aggregate="or"), "--lsc.aggregate"),
        (lambda: aggregate_rewards(torch.zeros(2, 2), torch.zeros(2, 3)), "2 reward models but references of shape"),
        (lambda: aggregate_rewards(torch.zeros(2, 2), None, "raw", "weighted", [1.0]), "--lsc.weights"),
        (lambda: aggregate_rewards(torch.zeros(2, 2), None, "raw", "and", [1.0, 1.0]), "--lsc.weights"),
        (lambda: group_quantile_reference(torch.zeros(4), 2, 1.0), "--lsc.quantile"),
        (lambda: group_quantile_reference(torch.zeros(4), 1, 0.5), "n_samples_per_prompt"),
    ],
)
def test_bad_input_names_the_flag(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        call()


def test_docstring_examples_run():
    import doctest

    import openrlhf_lsc.references
    import openrlhf_lsc.rewards

    for module in (openrlhf_lsc.rewards, openrlhf_lsc.references):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


# ---------------------------------------------------------------- every transform's values, every edge


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_transform_against_numpy(dtype):
    r = torch.tensor([[-40.0, -1.5], [0.0, 0.25], [3.0, 40.0]], dtype=dtype)
    ref = torch.tensor([[0.5, -1.5], [2.0, 0.0], [-1.0, 1.0]], dtype=dtype)
    x, m = r.double().numpy(), (r.double() - ref.double()).numpy()
    want = {"raw": x, "logsigmoid": log_sigmoid(x), "center": m, "lsc": log_sigmoid(m), "sigmoid": 1 / (1 + np.exp(-m))}
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for kind, expected in want.items():
        u = transform_reward(r, ref, kind)
        assert u.dtype == dtype and u.shape == r.shape
        np.testing.assert_allclose(u.double().numpy(), expected, rtol=tol, atol=tol)
        agg = aggregate_rewards(r, ref, kind, "weighted", [0.1, -2.3])  # weights in the utilities' precision
        np.testing.assert_allclose(agg.double().numpy(), expected @ np.array([0.1, -2.3]), rtol=tol, atol=10 * tol)
    assert transform_reward(r, None, "logsigmoid").tolist() == transform_reward(r, ref, "logsigmoid").tolist()


def test_a_float64_reference_is_not_rounded_by_float32_rewards_and_vice_versa():
    r32, ref64 = torch.tensor([1.0]), torch.tensor([0.1], dtype=torch.float64)
    u = transform_reward(r32, ref64, "center")
    assert u.dtype == torch.float64 and u.item() == 1.0 - 0.1
    u = transform_reward(ref64, r32, "center")
    assert u.dtype == torch.float64 and u.item() == 0.1 - 1.0


def test_check_finite_names_the_first_bad_index():
    check_finite(torch.tensor([[0.0, -1e30]]), "x")
    with pytest.raises(ValueError, match=r"^rewards must be finite, got nan at index \[1, 0\]$"):
        check_finite(torch.tensor([[0.0, 1.0], [float("nan"), float("inf")]]), "rewards")
    with pytest.raises(ValueError, match=r"^--lsc.weights must be finite, got -inf at index \[2\]$"):
        aggregate_rewards(torch.zeros(1, 3), None, "raw", "weighted", [1.0, 2.0, -float("inf")])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: aggregate_rewards(torch.zeros(2, 2), None, "raw", "weighted"),
         r"^--lsc.aggregate weighted needs --lsc.weights, one per reward model: 2 models, none weights$"),
        (lambda: aggregate_rewards(torch.zeros(2, 2), None, "raw", "weighted", [1.0, 2.0, 3.0]), r"2 models, 3 weights$"),
        (lambda: aggregate_rewards(torch.zeros(2, 2), None, "raw", "and", [1.0, 1.0]),
         r"^--lsc.weights is only for --lsc.aggregate weighted or gdpo; AND-aggregation has no weights$"),
        (lambda: aggregate_rewards(torch.zeros(3, 2), torch.zeros(3), "lsc"),
         r"^got 2 reward models but references of shape \(3,\): expected \(3, 2\) or \(2,\)"),
        (lambda: aggregate_rewards(torch.zeros(4), None, "raw"), r"^rewards must be \[B, K\] with K >= 1 reward models"),
        (lambda: transform_reward(torch.zeros(2), torch.zeros(1), "lsc"), r"got \(1,\)$"),
        (lambda: transform_reward(torch.zeros(2), None, "center"),
         r"^transform 'center' needs a reference value r_ref\(x\) \(--lsc.reference\)$"),
        (lambda: transform_reward(torch.zeros(2), None, "sigmoid"), r"^transform 'sigmoid' needs a reference"),
        (lambda: transform_reward(torch.zeros(2), None, "tanh"),
         r"^unknown transform 'tanh' \(--lsc.transform\): expected one of raw, lsc, center, logsigmoid, sigmoid, par$"),
        (lambda: aggregate_rewards(torch.zeros(2, 2), None, "raw", "or"),
         r"^unknown aggregate 'or' \(--lsc.aggregate\): expected one of and, weighted, gdpo$"),
    ],
)
def test_refusals_word_for_word(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_one_reward_model_and_k_constants():
    r = torch.tensor([[2.0], [-1.0]], dtype=torch.float64)
    assert aggregate_rewards(r, torch.tensor([0.5], dtype=torch.float64), "center").tolist() == [1.5, -1.5]
    assert aggregate_rewards(r, None, "raw", "weighted", [3.0]).tolist() == [6.0, -3.0]


# ---------------------------------------------------------------- group quantile reference


@pytest.mark.parametrize("q", [0.01, 0.25, 0.5, 0.85, 0.99])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_group_quantile_of_1d_and_2d_rewards(q, n):
    rng = np.random.default_rng(n)
    r = rng.normal(size=(4 * n, 3))
    want = np.repeat(np.quantile(r.reshape(4, n, 3), q, axis=1), n, axis=0)
    np.testing.assert_allclose(group_quantile_reference(torch.tensor(r), n, q).numpy(), want, rtol=1e-12, atol=1e-12)
    one = group_quantile_reference(torch.tensor(r[:, 0]), n, q)
    assert one.shape == (4 * n,)
    np.testing.assert_allclose(one.numpy(), want[:, 0], rtol=1e-12, atol=1e-12)


def test_group_of_two_interpolates_between_the_pair():
    ref = group_quantile_reference(torch.tensor([1.0, 3.0, 10.0, 0.0]), 2, 0.25)
    assert ref.tolist() == [1.5, 1.5, 2.5, 2.5] and ref.dtype == torch.float32
    assert group_quantile_reference(torch.tensor([1, 3]), 2, 0.5).dtype == torch.float32  # integer rewards: float


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.zeros(4), 2, 0.0), r"^--lsc.quantile must be in \(0, 1\), got 0.0$"),
        ((torch.zeros(4), 2, 1.0), r"got 1.0$"),
        ((torch.zeros(4), 2, 1.5), r"got 1.5$"),
        ((torch.zeros(4), 2, -0.5), r"got -0.5$"),
        ((torch.zeros(4), 1, 0.5), r"^--lsc.reference group needs --rollout.n_samples_per_prompt >= 2 \(a group of 1 has"),
        ((torch.zeros(4), 0, 0.5), r"\(a group of 0 has no quantile to compare against\)$"),
        ((torch.zeros(5), 2, 0.5), r"^5 rewards do not split into groups of 2$"),
        ((torch.zeros(6, 2), 4, 0.5), r"^6 rewards do not split into groups of 4$"),
        ((torch.tensor(1.0), 2, 0.5), r"^rewards must be \[B\] or \[B, K\], got shape \(\)$"),
        ((torch.zeros(2, 2, 2), 2, 0.5), r"got shape \(2, 2, 2\)$"),
        ((torch.tensor([0.0, float("inf")]), 2, 0.5), r"^rewards must be finite, got inf at index \[1\]$"),
    ],
)
def test_group_quantile_refusals(args, message):
    with pytest.raises(ValueError, match=message):
        group_quantile_reference(*args)


# ---------------------------------------------------------------- RewardSpec and reward_utilities


def test_spec_defaults_and_normalised_fields():
    spec = RewardSpec(names=["a", "b"])
    assert (spec.names, spec.transform, spec.aggregate, spec.weights, spec.reference, spec.quantile,
            spec.reference_value, spec.label_key) == (("a", "b"), "raw", "and", None, "none", None, None, "label")
    spec = RewardSpec(names=["a", "b"], transform="sigmoid", reference="constant", reference_value=[1, -2])
    assert spec.reference_value == (1.0, -2.0) and all(isinstance(v, float) for v in spec.reference_value)
    assert RewardSpec(names=("a",), transform="center", reference="group", quantile=1e-9).quantile == 1e-9
    assert RewardSpec(names=("a",), transform="lsc", reference="label").reference == "label"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(names=("a", 3)), r"^--lsc.reward_names must list one non-empty name per reward model, got \['a', 3\]$"),
        (dict(names=("a", "  ")), r"^--lsc.reward_names must list"),
        (dict(names=("a", "b", "a")), r"^reward model names \['a', 'b', 'a'\] are not unique: set --lsc.reward_names$"),
        (dict(names=("a", "b"), aggregate="weighted"),
         r"^--lsc.aggregate weighted needs --lsc.weights with 2 values, one per reward model$"),
        (dict(names=("a",), transform="center"),
         r"^--lsc.transform center needs a reference: set --lsc.reference label\|group\|constant$"),
        (dict(names=("a",), transform="lsc", reference="group", quantile=1.5),
         r"^--lsc.reference group needs --lsc.quantile in \(0, 1\), got 1.5$"),
        (dict(names=("a",), transform="lsc", reference="group", quantile=float("nan")), r"got nan$"),
        (dict(names=("a",), transform="lsc", reference="constant"),
         r"^--lsc.reference constant needs --lsc.reference_value with 1 values$"),
        (dict(names=("a", "b"), transform="lsc", reference="constant", reference_value=(1.0, float("nan"))),
         r"^--lsc.reference_value values must be finite numbers, got nan$"),
        (dict(names=("a", "b"), aggregate="weighted", weights=(1.0, 2.0, 3.0)),
         r"^--lsc.weights needs 2 values, one per reward model, got 3$"),
        (dict(names=("a",), transform="lsc", reference="label", label_key=None), r"--data.label_key"),
        (dict(names=("a",), transform="tanh"), r"^unknown --lsc.transform 'tanh': expected one of raw, lsc, center"),
        (dict(names=("a",), aggregate="or"), r"^unknown --lsc.aggregate 'or': expected one of and, weighted, gdpo$"),
        (dict(names=("a",), reference="sft"), r"^unknown --lsc.reference 'sft': expected one of none, label, group, constant$"),
    ],
)
def test_spec_refusals_word_for_word(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RewardSpec(**kwargs)


def test_constant_reference_keeps_float64_and_ties_are_not_above_the_reference():
    r = torch.tensor([[0.1, 1.0], [0.3, -1.0]], dtype=torch.float64)
    spec = RewardSpec(names=("a", "b"), transform="center", reference="constant", reference_value=(0.1, 0.0))
    u, m = reward_utilities(r, spec)
    assert u.dtype == torch.float64
    assert m["lsc/a/margin"].tolist() == [0.0, 0.3 - 0.1] and m["lsc/a/above_ref"].tolist() == [0.0, 1.0]
    assert m["lsc/b/above_ref"].dtype == torch.float64 and m["lsc/b/above_ref"].tolist() == [1.0, 0.0]
    assert sorted(m) == ["lsc/a/above_ref", "lsc/a/margin", "lsc/a/reward", "lsc/a/utility", "lsc/b/above_ref",
                         "lsc/b/margin", "lsc/b/reward", "lsc/b/utility", "lsc/utility"]
    assert u.tolist() == [0.0 + 1.0, 0.3 - 0.1 - 1.0]


def test_pipeline_group_reference_of_two_and_one_sample_per_prompt():
    r = torch.tensor([[1.0], [3.0], [10.0], [0.0]])
    spec = RewardSpec(names=("a",), transform="center", reference="group", quantile=0.25)
    u, m = reward_utilities(r, spec, group_size=2)
    assert m["lsc/a/margin"].tolist() == [-0.5, 1.5, 7.5, -2.5] and u.tolist() == [-0.5, 1.5, 7.5, -2.5]
    u, m = reward_utilities(r, RewardSpec(names=("a",)), group_size=1)
    assert u.tolist() == [1.0, 3.0, 10.0, 0.0] and sorted(m) == ["lsc/a/reward", "lsc/a/utility", "lsc/utility"]


def test_pipeline_label_references_repeat_per_prompt():
    spec = RewardSpec(names=("a", "b"), transform="center", reference="label", label_key="ref")
    lab = [{"a": {"reference": 1.0}, "b": {"reference": 2.0}}, {"a": {"reference": -1.0}, "b": {"reference": 0.5}}]
    r = torch.arange(12.0).reshape(6, 2)
    u, m = reward_utilities(r, spec, [lab[0]] * 3 + [lab[1]] * 3, group_size=3)
    refs = np.repeat([[1.0, 2.0], [-1.0, 0.5]], 3, axis=0)
    np.testing.assert_array_equal(m["lsc/b/margin"].numpy(), r.numpy()[:, 1] - refs[:, 1])
    np.testing.assert_array_equal(u.numpy(), (r.numpy() - refs).sum(1))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s: reward_utilities(torch.tensor([[0.0, 1.0], [2.0, float("-inf")]]), s),
         r"^reward model 'b' returned -inf for sample 1: rewards must be finite$"),
        (lambda s: reward_utilities(torch.zeros(3, 1, 2), s), r"^rewards must be \[N, 2\] \(one column per reward model"),
        (lambda s: reward_utilities(torch.zeros(4, 2), s, group_size=3),
         r"^4 samples do not split into prompts of 3 samples \(--rollout.n_samples_per_prompt\)$"),
        (lambda s: reward_utilities(torch.zeros(4, 2), s, group_size=-1), r"prompts of -1 samples"),
        (lambda s: reward_utilities(torch.zeros(2, 2), RewardSpec(names=("a", "b"), transform="lsc", reference="label")),
         r"^--lsc.reference label needs one label per sample: 2 samples, no labels$"),
        (lambda s: reward_utilities(torch.zeros(2, 2), RewardSpec(names=("a", "b"), transform="lsc", reference="label"),
                                    [{"a": {"reference": 0.0}}] * 2),
         r"^prompt 0: field 'label' has no finite reference for reward model 'b'"),
        (lambda s: reward_utilities(torch.zeros(4, 2), RewardSpec(names=("a", "b"), transform="lsc", reference="label"),
                                    ["x", "x", "y", "x"], 2, where=["first", "second"]),
         r"^second: its 2 samples carry different 'label' labels$"),
        (lambda s: reward_utilities(torch.zeros(6, 2), RewardSpec(names=("a", "b"), transform="lsc", reference="label"),
                                    ["x", "x", "x", "y", "y", "z"], 3),
         r"^prompt 1: its 3 samples carry different 'label' labels$"),
    ],
)
def test_pipeline_refusals_word_for_word(call, message):
    with pytest.raises(ValueError, match=message):
        call(RewardSpec(names=("a", "b")))


def test_transform_defaults_to_lsc_and_promotes_to_a_float64_scalar_reference():
    r = torch.tensor([0.3, -1.7, 2.9])  # float32
    ref = torch.tensor(0.1, dtype=torch.float64)  # one float64 reference for all: the margin is computed in float64
    expected = torch.nn.functional.logsigmoid(r.double() - 0.1)
    for u in (transform_reward(r, ref), transform_reward(r, ref, "lsc")):
        assert u.dtype == torch.float64 and torch.equal(u, expected)
    assert torch.equal(transform_reward(r, ref, "center"), r.double() - 0.1)
