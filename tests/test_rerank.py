"""Best-of-k reranking: the library function against an independent numpy re-computation, and the CLI end to end
on tiny models (chosen response = numpy argmax over the written scores, resume after kill -9, bad input)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_lsc import RewardSpec
from openrlhf_lsc.rerank import rerank


def numpy_utilities(scores, transform, aggregate, weights, reference, quantile=None, constants=None, refs=None):
    """Utilities [P, k] from scores [P, k, K], written from the paper's formulas with numpy only."""
    s = np.asarray(scores, dtype=np.float64)
    if reference == "constant":
        r = np.broadcast_to(np.asarray(constants, dtype=np.float64), s.shape)
    elif reference == "group":
        r = np.broadcast_to(np.quantile(s, quantile, axis=1, keepdims=True), s.shape)
    elif reference == "label":
        r = np.broadcast_to(np.asarray(refs, dtype=np.float64)[:, None, :], s.shape)
    else:
        r = np.zeros_like(s)
    m = s - r
    u = {"raw": s, "center": m, "lsc": -np.logaddexp(0, -m), "logsigmoid": -np.logaddexp(0, -s),
         "sigmoid": 1 / (1 + np.exp(-m))}[transform]
    return u.sum(-1) if aggregate == "and" else (u * np.asarray(weights)).sum(-1)


def first_max(u):
    """Index of the first candidate within 1e-9 of the row's maximum (the documented tie rule)."""
    return np.array([np.flatnonzero(row >= row.max() - 1e-9)[0] for row in u])


@st.composite
def cases(draw):
    p, k, num_rms = draw(st.integers(1, 5)), draw(st.integers(2, 6)), draw(st.integers(1, 3))
    grid = st.integers(-6, 6).map(lambda v: v / 2)  # coarse grid: exact ties happen
    scores = draw(st.lists(st.lists(st.lists(grid, min_size=num_rms, max_size=num_rms), min_size=k, max_size=k),
                           min_size=p, max_size=p))
    if draw(st.booleans()):  # duplicate a candidate: an exact tie
        i, a, b = draw(st.integers(0, p - 1)), draw(st.integers(0, k - 1)), draw(st.integers(0, k - 1))
        scores[i][b] = list(scores[i][a])
    transform = draw(st.sampled_from(["raw", "lsc", "center", "logsigmoid", "sigmoid"]))
    needs_ref = transform in ("lsc", "center", "sigmoid")
    reference = draw(st.sampled_from(["label", "group", "constant"] + ([] if needs_ref else ["none"])))
    aggregate = draw(st.sampled_from(["and", "weighted"]))
    weights = tuple(draw(st.lists(st.sampled_from([0.1, 0.3, 0.5, 1.0]), min_size=num_rms, max_size=num_rms)))
    quantile = draw(st.sampled_from([0.25, 0.5, 0.85])) if reference == "group" else None
    constants = tuple(draw(st.lists(grid, min_size=num_rms, max_size=num_rms))) if reference == "constant" else None
    refs = draw(st.lists(st.lists(grid, min_size=num_rms, max_size=num_rms), min_size=p, max_size=p))
    return dict(scores=scores, transform=transform, aggregate=aggregate, weights=weights, reference=reference,
                quantile=quantile, constants=constants, refs=refs)


@settings(max_examples=300, deadline=None)
@given(cases())
def test_rerank_matches_numpy(case):
    num_rms = len(case["scores"][0][0])
    names = tuple(f"rm{j}" for j in range(num_rms))
    spec = RewardSpec(names=names, transform=case["transform"], aggregate=case["aggregate"],
                      weights=case["weights"] if case["aggregate"] == "weighted" else None,
                      reference=case["reference"], quantile=case["quantile"], reference_value=case["constants"],
                      label_key="lsc_ref")
    labels = [{n: {"reference": v} for n, v in zip(names, row)} for row in case["refs"]]
    scores = torch.tensor(case["scores"], dtype=torch.float64)
    chosen, utilities = rerank(scores, spec, labels if case["reference"] == "label" else None)
    expected = numpy_utilities(case["scores"], case["transform"], case["aggregate"], case["weights"],
                               case["reference"], case["quantile"], case["constants"], case["refs"])
    np.testing.assert_allclose(utilities.numpy(), expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(chosen.numpy(), first_max(expected))


def test_ties_pick_the_first_candidate():
    spec = RewardSpec(names=("a",))
    scores = torch.tensor([[[1.0], [1.0], [1.0]], [[0.0], [2.0], [2.0]], [[3.0], [1.0], [3.0]]])
    assert rerank(scores, spec)[0].tolist() == [0, 1, 0]


def test_and_lsc_prefers_the_balanced_candidate_where_raw_sums_tie():
    # Paper 1, section 4: p(ref < y) per property (0.45, 0.99) vs (0.9, 0.9); margins = logit(p).
    logit = lambda q: np.log(q / (1 - q))  # noqa: E731
    scores = [[[logit(0.45), logit(0.99)], [logit(0.9), logit(0.9)]]]
    lsc = RewardSpec(names=("h", "s"), transform="lsc", reference="constant", reference_value=(0.0, 0.0))
    raw = RewardSpec(names=("h", "s"), transform="raw", aggregate="weighted", weights=(0.5, 0.5))
    chosen, u = rerank(torch.tensor(scores, dtype=torch.float64), lsc)
    assert chosen.tolist() == [1] and np.exp((u[0, 1] - u[0, 0]).item()) == pytest.approx(0.81 / (0.45 * 0.99))
    assert rerank(torch.tensor(scores, dtype=torch.float64), raw)[1][0, 0].item() == pytest.approx(
        0.5 * (logit(0.45) + logit(0.99)))


@pytest.mark.parametrize(
    "scores, spec, labels, match",
    [
        ([[[1.0], [2.0]], [[1.0]]], RewardSpec(names=("a",)), None, "same k for every prompt"),
        (torch.zeros(2, 3), RewardSpec(names=("a",)), None, r"\[prompts, k, 1\]"),
        (torch.zeros(2, 3, 2), RewardSpec(names=("a",)), None, r"must be \[N, 1\]"),
        (torch.zeros(2, 1, 1), RewardSpec(names=("a",), transform="lsc", reference="group", quantile=0.5), None,
         "needs k >= 2"),
        (torch.zeros(2, 3, 1), RewardSpec(names=("a",), transform="lsc", reference="label"), [{"a": {"reference": 0}}],
         "2 prompts but 1 labels"),
        (torch.zeros(1, 3, 1), RewardSpec(names=("a",), transform="lsc", reference="label", label_key="ref"),
         [{"b": {"reference": 0}}], "prompt 0: field 'ref' has no finite reference for reward model 'a'"),
        (torch.tensor([[[0.0], [float("nan")]]]), RewardSpec(names=("a",)), None, "must be finite"),
    ],
)
def test_bad_input(scores, spec, labels, match):
    with pytest.raises(ValueError, match=match):
        rerank(scores, spec, labels)


def test_docstring_example_runs():
    import doctest

    import openrlhf_lsc.rerank

    result = doctest.testmod(openrlhf_lsc.rerank)
    assert result.attempted > 0 and result.failed == 0
