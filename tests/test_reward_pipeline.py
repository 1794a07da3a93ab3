"""The one reward pipeline (`reward_utilities` + `RewardSpec`), the sigmoid transform and the API's input rules,
checked against numpy and hypothesis properties."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_lsc import RewardSpec, aggregate_rewards, group_quantile_reference, references_from_labels
from openrlhf_lsc import reward_utilities, transform_reward


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def label(**refs):
    return json.dumps({name: {"reference": v, "method": "test"} for name, v in refs.items()})


def test_sigmoid_transform_against_numpy_and_bounds():
    r = torch.tensor([-30.0, -1.0, 0.0, 2.5, 30.0], dtype=torch.float64)
    ref = torch.full_like(r, 0.5)
    u = transform_reward(r, ref, "sigmoid")
    np.testing.assert_allclose(u.numpy(), 1 / (1 + np.exp(-(r.numpy() - 0.5))), rtol=1e-12, atol=0)
    assert ((u > 0) & (u < 1)).all() and (u.diff() > 0).all()
    # bf16 input: fp32 compute, still inside (0, 1] after rounding and monotone
    low = transform_reward(r.bfloat16(), ref.bfloat16(), "sigmoid")
    assert low.dtype == torch.float32 and (low >= 0).all() and (low <= 1).all()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 3), st.integers(2, 4), st.sampled_from(["lsc", "center", "sigmoid", "raw"]),
       st.integers(0, 10_000))
def test_label_references_match_numpy(prompts, k, n, transform, seed):
    g = np.random.default_rng(seed)
    rewards = g.normal(0, 3, size=(prompts * n, k))
    refs = g.normal(0, 1, size=(prompts, k))
    names = [f"rm{j}" for j in range(k)]
    labels = [label(**dict(zip(names, refs[i].tolist()))) for i in range(prompts) for _ in range(n)]
    spec = RewardSpec(names=tuple(names), transform=transform, reference="label", label_key="ref")
    u, m = reward_utilities(torch.tensor(rewards), spec, labels, group_size=n)
    margin = rewards - np.repeat(refs.astype(np.float32).astype(np.float64), n, axis=0)
    per_rm = {"lsc": log_sigmoid(margin), "center": margin, "sigmoid": 1 / (1 + np.exp(-margin)), "raw": rewards}
    np.testing.assert_allclose(u.numpy(), per_rm[transform].sum(1), rtol=1e-9, atol=1e-9)
    for j, name in enumerate(names):
        np.testing.assert_allclose(m[f"lsc/{name}/margin"].numpy(), margin[:, j], rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(m[f"lsc/{name}/above_ref"].numpy(), (margin[:, j] > 0).astype(float))
        np.testing.assert_array_equal(m[f"lsc/{name}/reward"].numpy(), rewards[:, j])
        np.testing.assert_allclose(m[f"lsc/{name}/utility"].numpy(), per_rm[transform][:, j], rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(m["lsc/utility"].numpy(), u.numpy())


def test_weighted_group_and_constant_references():
    r = torch.tensor([[3.0, 1.0], [0.0, 5.0], [2.0, 2.5], [1.0, -1.0]], dtype=torch.float64)
    spec = RewardSpec(names=("a", "b"), transform="center", aggregate="weighted", weights=(0.25, 2.0),
                      reference="group", quantile=0.5)
    u, m = reward_utilities(r, spec, group_size=2)
    med = np.repeat(np.median(r.numpy().reshape(2, 2, 2), axis=1), 2, axis=0)
    np.testing.assert_allclose(u.numpy(), ((r.numpy() - med) * [0.25, 2.0]).sum(1), rtol=1e-12)
    torch.testing.assert_close(group_quantile_reference(r, 2, 0.5), torch.tensor(med))

    const = RewardSpec(names=("a", "b"), transform="lsc", reference="constant", reference_value=(1.0, -2.0))
    u, _ = reward_utilities(r, const)
    np.testing.assert_allclose(u.numpy(), log_sigmoid(r.numpy() - [1.0, -2.0]).sum(1), rtol=1e-12)
    torch.testing.assert_close(u, aggregate_rewards(r, torch.tensor([1.0, -2.0], dtype=torch.float64), "lsc"))


def test_raw_single_reward_is_the_reward_itself():
    r = torch.tensor([[0.1], [-7.25], [3.0]])
    u, m = reward_utilities(r, RewardSpec(names=("rm",)))
    assert torch.equal(u, r[:, 0]) and "lsc/rm/margin" not in m


def test_labels_are_parsed_once_per_prompt():
    calls = []

    class Counting(dict):  # counts the reads of a reward model's entry, however they are made
        def get(self, key, default=None):
            calls.append(key)
            return dict.get(self, key, default)

        def __getitem__(self, key):
            calls.append(key)
            return dict.__getitem__(self, key)

    labels = [Counting(rm={"reference": 0.0})] * 8 + [Counting(rm={"reference": 1.0})] * 8
    reward_utilities(torch.zeros(16, 1), RewardSpec(names=("rm",), transform="lsc", reference="label"), labels, 8)
    assert len(calls) == 2


def test_label_errors_name_the_prompt():
    spec = RewardSpec(names=("rm",), transform="lsc", reference="label", label_key="ref")
    good, bad = label(rm=0.0), json.dumps({"other": {"reference": 1.0}})
    with pytest.raises(ValueError, match=r"prompt 'how\?': field 'ref' has no finite reference for reward model 'rm'"):
        reward_utilities(torch.zeros(4, 1), spec, [good, good, bad, bad], 2, where=["prompt 'ok'", "prompt 'how?'"])
    with pytest.raises(ValueError, match="prompt 1: its 2 samples carry different 'ref' labels"):
        reward_utilities(torch.zeros(4, 1), spec, [good, good, good, label(rm=1.0)], 2)
    with pytest.raises(ValueError, match="needs one label per sample: 4 samples, 3 labels"):
        reward_utilities(torch.zeros(4, 1), spec, [good] * 3, 2)
    for huge in (1e300, 10**400, float("nan"), True, "1.5"):
        with pytest.raises(ValueError, match="prompt 0: field 'ref'"):
            references_from_labels([{"rm": {"reference": huge}}], ["rm"], "ref")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(names=()), "--lsc.reward_names"),
        (dict(names=("a", "")), "--lsc.reward_names"),
        (dict(names=("a", "a")), "not unique"),
        (dict(names=("a",), transform="tanh"), "--lsc.transform"),
        (dict(names=("a",), aggregate="or"), "--lsc.aggregate"),
        (dict(names=("a",), aggregate="or", weights=(1.0,)), "--lsc.aggregate"),
        (dict(names=("a",), reference="sft"), "--lsc.reference"),
        (dict(names=("a", "b"), aggregate="weighted"), "--lsc.weights"),
        (dict(names=("a", "b"), aggregate="weighted", weights=(1.0,)), "--lsc.weights needs 2 values"),
        (dict(names=("a", "b"), aggregate="weighted", weights=(1.0, float("nan"))), "--lsc.weights values must be finite"),
        (dict(names=("a",), weights=(1.0,)), "--lsc.weights is only used"),
        (dict(names=("a",), transform="lsc"), "needs a reference"),
        (dict(names=("a",), transform="sigmoid"), "needs a reference"),
        (dict(names=("a",), reference="group", quantile=-0.5), "--lsc.quantile"),
        (dict(names=("a",), reference="group", quantile=1.0), "--lsc.quantile"),
        (dict(names=("a",), reference="group", quantile=0.0), "--lsc.quantile"),
        (dict(names=("a",), quantile=0.5), "--lsc.quantile is only used"),
        (dict(names=("a",), reference="constant"), "--lsc.reference_value"),
        (dict(names=("a", "b"), reference="constant", reference_value=(1.0,)), "--lsc.reference_value needs 2"),
        (dict(names=("a",), reference="constant", reference_value=(float("inf"),)), "must be finite"),
        (dict(names=("a",), reference_value=(1.0,)), "--lsc.reference_value is only used"),
        (dict(names=("a",), reference="label", label_key=""), "--data.label_key"),
    ],
)
def test_spec_refuses_inconsistent_flags(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RewardSpec(**kwargs)


def test_spec_accepts_documented_edges():
    spec = RewardSpec(names=["a", "b"], aggregate="weighted", weights=[-1, 2], reference="group", quantile=0.5)
    assert spec.names == ("a", "b") and spec.weights == (-1.0, 2.0)
    assert RewardSpec(names=("a",), transform="raw", reference="label").reference == "label"  # metrics only


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s: reward_utilities(torch.zeros(4), s), r"rewards must be \[N, 1\]"),
        (lambda s: reward_utilities(torch.zeros(4, 2), s), r"rewards must be \[N, 1\]"),
        (lambda s: reward_utilities(torch.tensor([[0.0], [float("nan")]]), s), "reward model 'rm' returned nan for sample 1"),
        (lambda s: reward_utilities(torch.zeros(3, 1), s, group_size=2), "do not split into prompts of 2"),
        (lambda s: reward_utilities(torch.zeros(3, 1), s, group_size=0), "do not split into prompts of 0"),
        (lambda s: transform_reward(torch.zeros(3), torch.zeros(3, 1), "lsc"), "references must have the rewards' shape"),
        (lambda s: aggregate_rewards(torch.zeros(3, 0), None, "raw"), "K >= 1"),
        (lambda s: aggregate_rewards(torch.zeros(2, 2, 2), None, "raw"), r"\[B, K\]"),
        (lambda s: aggregate_rewards(torch.zeros(2, 2), torch.zeros(1, 2), "lsc"), "references of shape"),
        (lambda s: group_quantile_reference(torch.tensor([0.0, float("nan")]), 2, 0.5), "rewards must be finite"),
        (lambda s: group_quantile_reference(torch.zeros(2, 2, 2), 2, 0.5), r"\[B\] or \[B, K\]"),
    ],
)
def test_api_input_rules(call, message):
    with pytest.raises(ValueError, match=message):
        call(RewardSpec(names=("rm",)))


def test_scalar_reference_is_the_documented_exception():
    u = transform_reward(torch.tensor([0.0, 2.0]), torch.tensor(1.0), "center")
    assert u.tolist() == [-1.0, 1.0]


REFERENCES = [("none", {}), ("label", {"label_key": "ref"}), ("group", {"quantile": 0.75}),
              ("constant", {"reference_value": (0.5, -1.0)})]


@pytest.mark.parametrize("reference, extra, transform", [(r, e, t) for r, e in REFERENCES
                                                         for t in ("raw", "lsc", "center", "sigmoid", "par")
                                                         if (r != "none" or t == "raw") and (r, t) != ("group", "par")])
@pytest.mark.parametrize("aggregate, weights", [("and", None), ("weighted", (0.3, 0.7)), ("gdpo", None)])
def test_every_tensor_follows_the_rewards_device(reference, extra, transform, aggregate, weights):
    """Every tensor the pipeline creates takes the rewards' device (a CPU reference met CUDA rewards on the GPU):
    under the device trap a tensor built on the default device is a meta tensor and fails where CUDA would."""
    from device_trap import device_trap

    spec = RewardSpec(names=("a", "b"), transform=transform, aggregate=aggregate, weights=weights,
                      reference=reference, **extra)
    rewards = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(torch.bfloat16)
    labels = [{"a": {"reference": 0.1 * (i // 4), "par_scores": [0.1 * j for j in range(10)]},
               "b": {"reference": -0.2, "par_scores": [-0.2] * 10}} for i in range(8)]
    labels = labels if reference == "label" else None
    expected, expected_metrics = reward_utilities(rewards, spec, labels, group_size=4)
    expected_u = aggregate_rewards(rewards.float(), torch.tensor([0.5, -1.0]), "lsc", aggregate, weights, group_size=4)
    expected_t = transform_reward(rewards[:, 0], torch.full((8,), 0.5), "lsc")
    with device_trap():
        utility, metrics = reward_utilities(rewards, spec, labels, group_size=4)
        torch.testing.assert_close(utility, expected, rtol=0, atol=0)
        for key, value in expected_metrics.items():
            torch.testing.assert_close(metrics[key], value, rtol=0, atol=0)
        u = aggregate_rewards(rewards.float(), [0.5, -1.0], "lsc", aggregate, weights, 4)  # [K] constants as a list
        torch.testing.assert_close(u, expected_u, rtol=0, atol=0)
        torch.testing.assert_close(transform_reward(rewards[:, 0], 0.5, "lsc"), expected_t, rtol=0, atol=0)
        refs = references_from_labels([{"a": {"reference": 1.5}}], ["a"], "ref", device=rewards.device)
        assert refs.device == rewards.device and refs.tolist() == [[1.5]]


def test_the_device_trap_catches_a_tensor_on_the_default_device():
    """The trap itself: a tensor made without the inputs' device fails inside it, one made with it does not."""
    from device_trap import device_trap

    r = torch.ones(3)
    with device_trap():
        assert (r + torch.tensor([1.0, 2.0, 3.0], device=r.device)).tolist() == [2.0, 3.0, 4.0]
        assert torch.as_tensor(r).device == r.device
        with pytest.raises(RuntimeError):
            (r + torch.tensor([1.0, 2.0, 3.0])).tolist()
        with pytest.raises((RuntimeError, NotImplementedError)):
            torch.zeros(3).to(r.device)


def test_par_against_hand_computation_and_its_formula():
    """PAR (Fu et al. 2025, k = 1): u = (1/M) sum_m sigmoid(r - r_ref,m). sigmoid(x) + sigmoid(-x) = 1 makes a reward
    at the median of symmetric references worth exactly 1/2; worked values against the formula in numpy."""
    refs = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64)
    assert transform_reward(torch.tensor([1.0], dtype=torch.float64), refs, "par").item() == pytest.approx(0.5, abs=1e-15)
    r = torch.tensor([3.0, -1.0, 1.7], dtype=torch.float64)
    m_refs = torch.tensor([[0.0, 1.0, 2.0], [0.5, 0.5, 0.5], [-3.0, 1.7, 9.0]], dtype=torch.float64)
    expected = (1 / (1 + np.exp(-(r.numpy()[:, None] - m_refs.numpy())))).mean(1)
    np.testing.assert_allclose(transform_reward(r, m_refs, "par").numpy(), expected, rtol=1e-14)
    assert transform_reward(r[:1], m_refs[:1], "par").item() == pytest.approx((0.952574 + 0.880797 + 0.731059) / 3, abs=1e-6)
    # one reference: PAR is the sigmoid transform
    torch.testing.assert_close(transform_reward(r, m_refs[:, :1], "par"), transform_reward(r, m_refs[:, 0], "sigmoid"))
    torch.testing.assert_close(transform_reward(r, m_refs[:, 0], "par"), transform_reward(r, m_refs[:, 0], "sigmoid"))


def test_par_from_labels_through_the_pipeline():
    """`reference="label"` with par reads the first M of each label's par_scores; the margin is to their mean and
    above_ref the fraction of them the reward beats."""
    scores = {"a": [0.0, 1.0, 2.0, 100.0], "b": [-1.0, 0.0, 1.0, 2.0]}
    labels = [{name: {"reference": 0.0, "par_scores": s} for name, s in scores.items()}] * 2
    spec = RewardSpec(names=("a", "b"), transform="par", reference="label", label_key="ref", par_m=3)
    r = np.array([[1.5, 0.0], [3.0, -2.0]])
    u, m = reward_utilities(torch.tensor(r), spec, labels, group_size=2)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    per = [sig(r[:, j, None] - np.array(scores[n][:3])).mean(1) for j, n in enumerate("ab")]
    np.testing.assert_allclose(u.numpy(), per[0] + per[1], rtol=1e-6)
    np.testing.assert_allclose(m["lsc/a/margin"].numpy(), r[:, 0] - 1.0, rtol=1e-6)
    assert m["lsc/a/above_ref"].tolist() == pytest.approx([2 / 3, 1.0]) and m["lsc/b/above_ref"].tolist() == [1 / 3, 0.0]
    assert RewardSpec(names=("a",), transform="par", reference="label").par_m == 10  # PAR's default M


@pytest.mark.parametrize("label, message", [
    ({"a": {"reference": 0.0}}, r"^prompt 0: field 'ref' has no 3 finite PAR reference scores for reward model 'a' .*"
                                r"got None\)$"),
    ({"a": {"par_scores": [1.0, 2.0]}}, r"at least 3 numbers, from estimate_reference --ref.par_m 3; got 2 scores\)$"),
    ({"a": {"par_scores": [1.0, float("nan"), 2.0]}}, "no 3 finite PAR reference scores"),
    ({"a": {"par_scores": [1.0, True, 2.0]}}, "no 3 finite PAR reference scores"),
])
def test_par_labels_with_too_few_scores_are_refused_naming_the_prompt(label, message):
    spec = RewardSpec(names=("a",), transform="par", reference="label", label_key="ref", par_m=3)
    with pytest.raises(ValueError, match=message):
        reward_utilities(torch.zeros(1, 1), spec, [label])


@pytest.mark.parametrize("kwargs, message", [
    (dict(names=("a",), transform="par", reference="group"), "par compares each response with M SFT reference"),
    (dict(names=("a",), transform="lsc", reference="label", par_m=3), "--lsc.par_m is only used with --lsc.transform par"),
    (dict(names=("a",), transform="par", reference="label", par_m=0), "--lsc.par_m must be an integer >= 1"),
    (dict(names=("a",), transform="par", reference="constant", reference_value=(1.0,), par_m=2), "--lsc.par_m is only"),
])
def test_par_settings_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RewardSpec(**kwargs)


def test_gdpo_against_numpy_as_trl_normalize_then_sum():
    """GDPO: each reward z-scored within its prompt's group (unbiased std + 1e-4, as TRL's normalize_then_sum), then
    the (weighted) sum; numpy, 3 prompts x 4 samples x 2 rewards, raw and after the LSC transform."""
    g = np.random.default_rng(3)
    r = g.normal(0, 2, size=(12, 2))
    refs = np.array([0.3, -0.4])

    def gdpo(u, w):
        grouped = u.reshape(3, 4, 2)
        z = (grouped - grouped.mean(1, keepdims=True)) / (grouped.std(1, ddof=1, keepdims=True) + 1e-4)
        return (z.reshape(12, 2) * w).sum(1)

    raw = RewardSpec(names=("a", "b"), aggregate="gdpo")
    np.testing.assert_allclose(reward_utilities(torch.tensor(r), raw, group_size=4)[0].numpy(), gdpo(r, 1.0), rtol=1e-10)
    lsc = RewardSpec(names=("a", "b"), transform="lsc", aggregate="gdpo", weights=(2.0, 0.5), reference="constant",
                     reference_value=tuple(refs))
    u = reward_utilities(torch.tensor(r), lsc, group_size=4)[0].numpy()
    np.testing.assert_allclose(u, gdpo(log_sigmoid(r - refs), np.array([2.0, 0.5])), rtol=1e-9)
    with pytest.raises(ValueError, match="gdpo normalises each reward within its prompt's samples: needs groups of >= 2"):
        reward_utilities(torch.tensor(r), raw, group_size=1)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(-5, 5), st.floats(0.1, 10))
def test_gdpo_ignores_a_per_prompt_shift_and_a_positive_scale_of_a_reward(seed, shift, scale):
    """What GDPO is for: one reward's offset or scale within a prompt cannot dominate the sum. Exactly so but for the
    1e-4 added to the std: a scale c changes a z-score by (x - mean) * 1e-4 * (c - 1) / ((c s + 1e-4)(s + 1e-4))."""
    r = torch.tensor(np.random.default_rng(seed).normal(0, 1, size=(8, 2)))
    spec = RewardSpec(names=("a", "b"), aggregate="gdpo")
    moved = r.clone()
    moved[:4, 0] = moved[:4, 0] * scale + shift
    diff = (reward_utilities(moved, spec, group_size=4)[0] - reward_utilities(r, spec, group_size=4)[0]).abs()
    x = r[:4, 0].numpy()
    s = x.std(ddof=1)
    bound = np.abs(x - x.mean()) * 1e-4 * abs(scale - 1) / ((scale * s + 1e-4) * (s + 1e-4))
    assert (diff[:4].numpy() <= bound + 1e-9).all() and (diff[4:] <= 1e-12).all(), (diff, bound)
