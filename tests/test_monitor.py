"""Over-optimisation monitor: the stop rule on crafted and random histories (against a numpy re-implementation),
batch statistics against scipy/numpy and hand computation, and bad input naming the flag."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from openrlhf_lsc import RewardSpec, reward_utilities
from openrlhf_lsc.monitor import Monitor, check_evaluators, compile_patterns, first_stop, stop_rule


def numpy_first_stop(e, p, w, n):
    """The documented rule, written independently: moving sums by convolution (an average compares as its sum), then a
    scan."""
    e, p = np.asarray(e, float), np.asarray(p, float)
    if len(e) < w:
        return None
    kernel = np.ones(w)
    ma_e, ma_p = np.convolve(e, kernel, "valid"), np.convolve(p, kernel, "valid")  # ma[i] ends at step i + w - 1
    for i in range(n, len(ma_e)):
        if np.all(np.diff(ma_e[i - n : i + 1]) < 0) and ma_p[i] > ma_p[i - n]:
            return i + w - 1
    return None


def run_monitor(e_means, p_means, window, patience, steps=None):
    """Feed batches whose means are the given signals (sft std 1, start 0): returns metrics per step, stops."""
    m = Monitor(["P"], ["E"], window=window, patience=patience, sft_std={"P": 1.0, "E": 1.0})
    out = []
    for t, (e, p) in enumerate(zip([0.0] + list(e_means), [0.0] + list(p_means))):
        step = t if steps is None else steps[t]
        batch = torch.tensor([[p - 1.0, e + 0.5], [p + 1.0, e - 0.5]])  # batch means are p and e
        out.append(m.update(step, batch[:, :1], batch[:, 1:]))
    return m, out


def test_stop_rule_fires_once_at_the_right_step():
    # Evaluator peaks at t = 5, then falls; proxy keeps rising. 3-step averages of e from t = 2:
    # 1, 2, 3, 4, 4.33, 4, 3, 2, 1 -> falls at t = 7 and t = 8: with patience 2 the rule first holds at t = 8.
    e = [0, 1, 2, 3, 4, 5, 4, 3, 2, 1, 0, -1, -2]
    p = list(range(len(e)))
    assert first_stop(e, p, window=3, patience=2) == 8 == numpy_first_stop(e, p, 3, 2)
    steps = [10 * t for t in range(len(e))]
    m, out = run_monitor(e[1:], p[1:], window=3, patience=2, steps=steps)  # run_monitor prepends the 0 start
    stops = [s for _, s in out]
    assert stops.count(True) == 1 and stops.index(True) == 8  # fires once although the fall goes on
    assert [metrics["monitor/fired"] for metrics, _ in out] == [0.0] * 8 + [1.0] * 5
    summary = m.summary()
    assert summary["fired_step"] == 80 and summary["best_step"] == 50
    assert "step 80" in summary["message"] and "step 50" in summary["message"]
    assert out[-1][0]["monitor/best_step"] == 50.0


def test_stop_rule_needs_the_proxy_rising():
    e = [0, 1, 2, 3, 2, 1, 0, -1]
    assert first_stop(e, [0, 1, 2, 3, 4, 5, 6, 7], 2, 2) is not None
    assert first_stop(e, [0, 1, 2, 3, 2, 1, 0, -1], 2, 2) is None  # both fall: collapse, not over-optimisation
    assert first_stop(e, [0, 1, 2, 3, 3, 3, 3, 3], 2, 2) is None  # proxy flat over the window of falls


def test_stop_rule_ties_and_short_histories():
    rise = [0, 1, 2, 3, 4, 5]
    assert not stop_rule([], [], 2, 2)
    assert not stop_rule([3, 2, 1], [0, 1, 2], 2, 2)  # 3 steps < W + N = 4
    assert stop_rule([3, 3, 2, 1], [0, 1, 2, 3], 2, 2)  # exactly W + N steps: averages 3, 2.5, 1.5
    assert stop_rule([5, 4, 3], [0, 1, 2], 1, 2) and not stop_rule([5, 4], [0, 1], 1, 2)
    # A plateau (equal averages) breaks the run of falls: falls, tie, fall -> not 2 falls in a row until later.
    e = [4, 3, 3, 2, 1]
    assert [stop_rule(e[: t + 1], rise[: t + 1], 1, 2) for t in range(5)] == [False, False, False, False, True]
    assert first_stop([1.0] * 20, list(range(20)), 3, 1) is None  # flat evaluator never fires
    with pytest.raises(ValueError, match="--lsc.monitor.window"):
        stop_rule([1, 2], [1, 2], 0, 1)
    with pytest.raises(ValueError, match="differ in length"):
        stop_rule([1, 2], [1], 1, 1)


# Quarters: every sum is exact in floating point, so equal averages are equal in both implementations (values like
# 0.1 made a tie an ulp apart in one of them and not the other).
signal = st.lists(st.integers(-20, 20).map(lambda x: x / 4), min_size=0, max_size=25)


@settings(max_examples=200, deadline=None)
@given(signal, signal, st.integers(1, 5), st.integers(1, 4))
def test_stop_rule_matches_numpy(e, p, w, n):
    size = min(len(e), len(p))
    e, p = e[:size], p[:size]
    assert first_stop(e, p, w, n) == numpy_first_stop(e, p, w, n)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 3, allow_nan=False), min_size=1, max_size=30), st.integers(1, 5), st.integers(1, 4))
def test_never_fires_on_a_rising_evaluator(steps_up, w, n):
    e = np.cumsum(steps_up).tolist()  # non-decreasing
    p = list(range(len(e)))
    assert first_stop(e, p, w, n) is None
    _, out = run_monitor(e, p, w, n)
    assert not any(s for _, s in out)


def test_batch_statistics_against_hand_and_scipy():
    names_p, names_e = ["helpful", "harmless"], ["judge"]
    first_p = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]])  # helpful: mean 2, std 2; harmless: mean 2, std sqrt 3
    first_e = torch.tensor([[0.0], [1.0], [2.0]])  # judge: mean 1, std 1, but given as 0.5 below
    m = Monitor(names_p, names_e, sft_std={"judge": 0.5})
    m.update(0, first_p, first_e)
    g = torch.Generator().manual_seed(0)
    p = torch.randint(0, 4, (40, 2), generator=g).double() + 3.0  # ties on purpose
    e = torch.randint(0, 3, (40, 1), generator=g).double()
    metrics, stop = m.update(1, p, e)
    gain_h = (p[:, 0].mean().item() - 2.0) / 2.0
    gain_s = (p[:, 1].mean().item() - 2.0) / math.sqrt(3.0)
    gain_j = (e.mean().item() - 1.0) / 0.5
    assert metrics["monitor/judge/mean"] == pytest.approx(e.mean().item())
    assert metrics["monitor/judge/gain"] == pytest.approx(e.mean().item() - 1.0)
    assert metrics["monitor/judge/gain_std"] == pytest.approx(gain_j)
    assert metrics["monitor/helpful-judge/gap_std"] == pytest.approx(gain_h - gain_j)
    assert metrics["monitor/harmless-judge/gap_std"] == pytest.approx(gain_s - gain_j)
    assert metrics["monitor/signal/proxy"] == pytest.approx((gain_h + gain_s) / 2)
    assert metrics["monitor/signal/evaluator"] == pytest.approx(gain_j)
    for j, name in enumerate(names_p):
        expected = stats.spearmanr(p[:, j].numpy(), e[:, 0].numpy())[0]
        assert metrics[f"monitor/{name}~judge/spearman"] == pytest.approx(expected, abs=1e-12)
    assert not stop and metrics["monitor/best_step"] == (1.0 if gain_j > 0 else 0.0)


def test_saturation_patterns_and_length():
    spec = RewardSpec(names=("P",), transform="lsc", reference="constant", reference_value=(0.5,))
    rewards = torch.tensor([[0.0], [1.0], [2.0], [0.2]])
    _, per_sample = reward_utilities(rewards, spec)
    responses = ["- one\n- two", "Sure. 1. first", "I can't answer that.", "I CAN'T help"]
    m = Monitor(["P"], ["E"], patterns=[r"list=^\s*(?:[-*]|\d+\.)\s", r"refusal=(?i)\bI can't\b", r"(?=x)"])
    metrics, _ = m.update(0, rewards, torch.arange(4.0)[:, None], {"P": per_sample["lsc/P/above_ref"]}, responses)
    assert metrics["monitor/P/above_ref"] == 0.5  # 1.0 and 2.0 beat the 0.5 reference
    assert metrics["monitor/pattern/list"] == 0.25  # "- one" at a line start; "1. first" is mid-line
    assert metrics["monitor/pattern/refusal"] == 0.5
    assert metrics["monitor/pattern/(?=x)"] == 0.0  # a lookahead stays a bare regex, named by itself
    assert metrics["monitor/response_chars"] == sum(map(len, responses)) / 4


def test_state_dict_round_trip_resumes_the_rule():
    e = [0, 1, 2, 3, 2, 1, 0]
    p = list(range(7))
    whole, out = run_monitor(e, p, 2, 2)
    fired = [s for _, s in out].index(True)
    m = Monitor(["P"], ["E"], window=2, patience=2, sft_std={"P": 1.0, "E": 1.0})
    batches = [(torch.tensor([[q - 1.0], [q + 1.0]]), torch.tensor([[v + 0.5], [v - 0.5]])) for v, q in zip([0] + e, [0] + p)]
    for t in range(fired - 1):
        m.update(t, *batches[t])
    resumed = Monitor(["P"], ["E"], window=2, patience=2)
    resumed.load_state_dict(json.loads(json.dumps(m.state_dict())))
    results = [resumed.update(t, *batches[t])[1] for t in range(fired - 1, len(batches))]
    assert results.index(True) + fired - 1 == fired and resumed.summary() == whole.summary()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: compile_patterns(["list=^(-"]), "--lsc.monitor.patterns: '\\^\\(-' is not a valid"),
        (lambda: compile_patterns(["[unclosed"]), "--lsc.monitor.patterns"),
        (lambda: compile_patterns(["a=x", "a=y"]), "name 'a' is used twice"),
        (lambda: Monitor(["helpful"], ["helpful"]), "--lsc.monitor.reward_models: 'helpful' is also a training"),
        (lambda: check_evaluators(["/ckpt/rm_a/"], ["/ckpt/./rm_a"]), "--lsc.monitor.reward_models"),
        (lambda: Monitor(["helpful"], []), "at least one evaluator"),
        (lambda: Monitor(["a"], ["b"], patience=0), "--lsc.monitor.patience"),
        (lambda: Monitor(["a"], ["b"], sft_std={"b": 0.0}), "SFT std of reward model 'b'"),
        (lambda: Monitor(["a"], ["b"]).update(0, torch.ones(1, 1), torch.ones(1, 1)), "no spread in the first batch"),
        (lambda: Monitor(["a"], ["b"]).update(0, torch.ones(3, 2), torch.ones(3, 1)), r"proxy rewards must be \[N, 1\]"),
        (lambda: Monitor(["a"], ["b"]).update(0, torch.ones(3, 1), torch.tensor([[0.0], [math.nan], [1.0]])),
         "model 'b' gave nan for sample 1"),
        (lambda: Monitor(["a"], ["b"]).update(0, torch.ones(3, 1), torch.ones(2, 1)), "3 proxy-scored samples but 2"),
    ],
)
def test_bad_input_names_the_problem(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_steps_must_increase_and_responses_must_match():
    m = Monitor(["a"], ["b"], sft_std={"a": 1.0, "b": 1.0})
    m.update(3, torch.ones(2, 1), torch.ones(2, 1))
    with pytest.raises(ValueError, match="got step 3 after 3"):
        m.update(3, torch.ones(2, 1), torch.ones(2, 1))
    with pytest.raises(ValueError, match="1 responses for 2"):
        m.update(4, torch.ones(2, 1), torch.ones(2, 1), responses=["x"])


def test_docstring_examples_run():
    import doctest

    import openrlhf_lsc.monitor

    result = doctest.testmod(openrlhf_lsc.monitor)
    assert result.attempted > 0 and result.failed == 0
