"""The public reward API against the paper's worked examples, numpy, and hypothesis properties."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_lsc import aggregate_rewards, group_quantile_reference, transform_reward


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
def test_and_is_log_of_product_and_weighted_is_plain_sum(b, k, seed):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(b, k, generator=g, dtype=torch.float64) * 5
    ref = torch.randn(b, k, generator=g, dtype=torch.float64)
    u = aggregate_rewards(r, ref, "lsc", "and")
    prob = np.prod(1 / (1 + np.exp(-(r - ref).numpy())), axis=1)
    np.testing.assert_allclose(u.numpy(), np.log(prob), rtol=1e-9)
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
