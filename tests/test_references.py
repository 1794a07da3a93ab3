"""The reference-label schema and the estimators' statistics pinned exactly: every label a PPO run can meet
(dict, JSON string, blank, malformed, each kind of bad reference, the float32 range edge), sample statistics
against numpy, the Gaussian reference against scipy."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from openrlhf_lsc.references import FLOAT32_MAX, gaussian_reference, parse_label, references_from_labels, sample_statistics


def test_references_from_dicts_and_json_strings_in_column_order():
    labels = [{"a": {"reference": 1.5, "q": 0.85}, "b": {"reference": -2}},
              json.dumps({"b": {"reference": 0.25}, "a": {"reference": 3.0}}),
              json.dumps({"b": {"reference": 0.25}, "a": {"reference": 3.0}})]
    refs = references_from_labels(labels, ["b", "a"], "ref")
    assert refs.dtype == torch.float32 and refs.tolist() == [[-2.0, 1.5], [0.25, 3.0], [0.25, 3.0]]
    assert references_from_labels([], ["a", "b"], "ref").shape == (0, 2)
    assert references_from_labels(labels[:1], [], "ref").shape == (1, 0)


def test_the_float32_range_is_accepted_up_to_its_edge():
    refs = references_from_labels([{"a": {"reference": FLOAT32_MAX}}, {"a": {"reference": -FLOAT32_MAX}}], ["a"], "r")
    assert refs[:, 0].tolist() == [FLOAT32_MAX, -FLOAT32_MAX] and torch.isfinite(refs).all()
    assert FLOAT32_MAX == float(torch.finfo(torch.float32).max)


@pytest.mark.parametrize(
    "label, shown",
    [
        ({"a": {"reference": True}}, "True"),
        ({"a": {"reference": "1.5"}}, "'1.5'"),
        ({"a": {"reference": None}}, "None"),
        ({"a": {"method": "quantile"}}, "None"),
        ({"a": 0.5}, "None"),  # the reference itself instead of {"reference": ...}
        ({"b": {"reference": 1.0}}, "None"),
        ({"a": {"reference": float("nan")}}, "nan"),
        ({"a": {"reference": float("inf")}}, "inf"),
        ({"a": {"reference": -float("inf")}}, "-inf"),
        ({"a": {"reference": 3.5e38}}, "3.5e+38"),
        ({"a": {"reference": -3.5e38}}, "-3.5e+38"),
        ({"a": {"reference": 10**400}}, "1" + "0" * 400),
    ],
)
def test_a_bad_reference_is_refused_naming_row_field_and_model(label, shown):
    present = sorted(label)
    with pytest.raises(ValueError) as e:
        references_from_labels([{"a": {"reference": 0.0}}, label], ["a"], "lsc_ref")
    assert str(e.value) == (
        f"prompt 1: field 'lsc_ref' has no finite reference for reward model 'a' (expected lsc_ref.a.reference to "
        f"be a number within float32 range, got {shown}; present: {present})"
    )


def test_rows_are_named_by_where():
    with pytest.raises(ValueError, match=r"^prompt 'why\?': field 'ref' has no finite reference"):
        references_from_labels([{"a": {"reference": 0.0}}, {}], ["a"], "ref", where=["prompt 'ok'", "prompt 'why?'"])
    with pytest.raises(ValueError, match=r"^row 7 of x.jsonl: field 'ref' is not valid JSON"):
        references_from_labels(["{"], ["a"], "ref", where=["row 7 of x.jsonl"])


@pytest.mark.parametrize(
    "label, message",
    [
        ("", r"^prompt 0: field 'ref' must map reward-model names to \{\"reference\": float, \.\.\.\}, got NoneType None$"),
        ("  ", r"got NoneType None$"),
        ("[1, 2]", r"got list \[1, 2\]$"),
        ([1, 2], r"got list \[1, 2\]$"),
        (None, r"got NoneType None$"),
        (0.5, r"got float 0.5$"),
        ("{'a': 1}", r"^prompt 0: field 'ref' is not valid JSON \(Expecting property name enclosed in double quotes"),
        ("x" * 200, r"is not valid JSON"),
    ],
)
def test_a_malformed_label_is_refused(label, message):
    with pytest.raises(ValueError, match=message):
        references_from_labels([label], ["a"], "ref")


def test_parse_label_returns_the_dict_and_cuts_long_labels_in_messages():
    assert parse_label('{"a": {"reference": 1}}', "p", "k") == {"a": {"reference": 1}}
    d = {"a": 1}
    assert parse_label(d, "p", "k") is d
    with pytest.raises(ValueError) as e:
        parse_label(["x" * 200], "p", "k")
    assert str(e.value).endswith("got list " + repr(["x" * 200])[:80])


def test_numpy_float64_references_are_read_like_floats():
    """np.float64 is a float (labels built from numpy values); float32 out even under a float64 default dtype."""
    labels = [{"a": {"reference": np.float64(1.5)}}, json.dumps({"a": {"reference": 2}})]
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        refs = references_from_labels(labels, ["a"], "ref")
    finally:
        torch.set_default_dtype(default)
    assert refs.dtype == torch.float32 and refs.tolist() == [[1.5], [2.0]]
    assert references_from_labels(labels[:1] * 3, ["a", "a"], "ref").tolist() == [[1.5, 1.5]] * 3
    # an integer reads as float() then float32, as the JSON number it is: not one rounding to float32 (2**60 + 2**37)
    assert references_from_labels([{"a": {"reference": 2**60 + 2**36 + 1}}], ["a"], "ref").item() == 2.0**60


def test_identical_label_strings_are_parsed_once():
    calls = []
    real_loads = json.loads

    def counting(s, *args, **kwargs):
        calls.append(s)
        return real_loads(s, *args, **kwargs)

    one, two = json.dumps({"a": {"reference": 1.0}}), json.dumps({"a": {"reference": 2.0}})
    json.loads = counting
    try:
        refs = references_from_labels([one, one, two, one, two], ["a"], "ref")
    finally:
        json.loads = real_loads
    assert refs[:, 0].tolist() == [1.0, 1.0, 2.0, 1.0, 2.0]
    assert calls == [one, two]


# 2**60 + 2**36 + 1 reads as float() then float32 (2**60), not as one rounding of the integer (2**60 + 2**37).
GOOD = st.one_of(st.floats(-1e30, 1e30), st.integers(-10**6, 10**6), st.floats(-1e6, 1e6).map(np.float64),
                 st.sampled_from([FLOAT32_MAX, -FLOAT32_MAX, 2**60 + 2**36 + 1]))
BAD = st.one_of(st.sampled_from([float("nan"), float("inf"), -float("inf"), True, False, None, "1.5", [1.0], 3.5e38,
                                 int(FLOAT32_MAX) + 1, 10**400]), st.text(max_size=2))


@st.composite
def label_rows(draw):
    """(label as given, how the label is handed over, is it good): mostly good rows, some with one defect."""
    label = {name: {"reference": draw(GOOD), "q": 0.85} for name in ("a", "b")}
    defect = draw(st.sampled_from(["none"] * 6 + ["bad value", "no reference", "no entry", "bare value", "broken"]))
    name = draw(st.sampled_from(["a", "b"]))
    if defect == "bad value":
        label[name]["reference"] = draw(BAD)
    elif defect == "no reference":
        del label[name]["reference"]
    elif defect == "no entry":
        del label[name]
    elif defect == "bare value":
        label[name] = draw(GOOD)
    how = draw(st.sampled_from(["dict", "json"]))
    given_as = label if how == "dict" else json.dumps(label)[: -1 if defect == "broken" else None]
    return given_as, label, defect == "none" or (defect == "broken" and how == "dict")


@settings(max_examples=300, deadline=None)
@given(st.lists(label_rows(), max_size=8))
def test_any_batch_of_labels_gives_the_references_or_the_error_a_row_by_row_reading_gives(rows):
    """Whatever the path taken inside, each row is read alone: the same float32 values, or a ValueError naming the
    first bad row."""
    labels = [given_as for given_as, _, _ in rows]
    first_bad = next((i for i, (_, _, good) in enumerate(rows) if not good), None)
    if first_bad is not None:
        with pytest.raises(ValueError, match=f"^prompt {first_bad}: field 'ref' "):
            references_from_labels(labels, ["a", "b"], "ref")
    else:
        got = references_from_labels(labels, ["a", "b"], "ref")
        expected = [[float(label[name]["reference"]) for name in ("a", "b")] for _, label, _ in rows]
        assert got.dtype == torch.float32
        assert torch.equal(got, torch.tensor(expected, dtype=torch.float32).reshape(len(labels), 2))


# ------------------------------------------------------------------------------------- sample_statistics


def test_sample_statistics_against_numpy():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4, 7)).astype(np.float32)  # float32 in: statistics in float64
    s = sample_statistics(torch.tensor(scores), [0.1, 0.5, 0.85])
    x = scores.astype(np.float64)
    assert s["k"] == 7 and isinstance(s["k"], int)
    np.testing.assert_allclose(s["mean"].numpy(), x.mean(1), rtol=1e-14)
    np.testing.assert_allclose(s["std"].numpy(), x.std(1, ddof=1), rtol=1e-13)
    np.testing.assert_allclose(s["quantiles"].numpy(), np.quantile(x, [0.1, 0.5, 0.85], axis=1).T, rtol=1e-13)
    assert s["mean"].dtype == s["std"].dtype == s["quantiles"].dtype == torch.float64


def test_sample_statistics_edges_two_samples_no_levels_lists():
    s = sample_statistics([[1.0, 3.0], [2.0, 2.0]], [])
    assert s["mean"].tolist() == [2.0, 2.0] and s["std"].tolist() == [2**0.5, 0.0] and s["quantiles"].shape == (2, 0)
    assert sample_statistics([[1.0, 3.0]], [0.25])["quantiles"].tolist() == [[1.5]]


@pytest.mark.parametrize(
    "scores, levels, message",
    [
        ([1.0, 2.0], [], r"got shape \(2,\)$"),
        ([[1.0], [2.0]], [], r"^need \[prompts, k\] scores with k >= 2 samples per prompt, got shape \(2, 1\)$"),
        ([[[1.0, 2.0]]], [], r"got shape \(1, 1, 2\)$"),
        ([[1.0, 2.0]], [0.5, 0.0], r"^quantile levels must be in \(0, 1\), got 0.0$"),
        ([[1.0, 2.0]], [1.0], r"got 1.0$"),
        ([[1.0, 2.0]], [-0.5], r"got -0.5$"),
    ],
)
def test_sample_statistics_refuses(scores, levels, message):
    with pytest.raises(ValueError, match=message):
        sample_statistics(scores, levels)


# ------------------------------------------------------------------------------------- gaussian_reference


@pytest.mark.parametrize("q", [0.02, 0.3, 0.5, 0.85, 0.999])
def test_gaussian_reference_against_scipy(q):
    mean, std = torch.tensor([0.0, 1.5, -2.0]), torch.tensor([1.0, 0.5, 3.0])
    ref = gaussian_reference(mean, std, q)
    assert ref.dtype == torch.float64
    np.testing.assert_allclose(ref.numpy(), mean.numpy() + stats.norm.ppf(q) * std.numpy(), rtol=1e-12, atol=1e-12)
    assert gaussian_reference(1.0, 2.0, q).item() == pytest.approx(1.0 + 2.0 * stats.norm.ppf(q), rel=1e-12, abs=1e-12)
    # Python floats (the estimator's sample statistics) are read as float64, not rounded to float32 first
    assert gaussian_reference(7 / 3, 0.1, q).item() == pytest.approx(7 / 3 + 0.1 * stats.norm.ppf(q), rel=1e-14, abs=0)


@pytest.mark.parametrize("q", [0.0, 1.0, -0.1, 1.5])
def test_gaussian_reference_refuses_q_outside_zero_one(q):
    with pytest.raises(ValueError, match=rf"^quantile q must be in \(0, 1\), got {q}$"):
        gaussian_reference(0.0, 1.0, q)


def test_references_are_float32_even_under_a_float64_default_dtype():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        refs = references_from_labels([{"rm": {"reference": 0.1}}], ["rm"], "ref")
    finally:
        torch.set_default_dtype(previous)
    assert refs.dtype == torch.float32 and refs.item() == np.float32(0.1)
