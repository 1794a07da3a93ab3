"""openrlhf_lsc.frameworks.trl through TRL's real GRPOTrainer / RLOOTrainer on tiny CPU models.

Each run records, per step, the batch TRL gathered (prompts, completions, its per-function reward columns, its
advantages) and its logged metrics. The expected values are recomputed independently: raw rewards from the
completion text (the rule reward) and from the reward model run on one prompt + completion at a time, utilities
from `reward_utilities` over the whole `[N, K]` batch, advantages with numpy.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from trl_run import GROUP, prompt_rows, train, vowels  # first: it imports TRL (see there)

from cpu_harness.tiny_models import build
from openrlhf_lsc.frameworks.trl import MonitorCallback, lsc_reward_funcs
from openrlhf_lsc.rewards import RewardSpec, reward_utilities

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build(tmp_path_factory.mktemp("trl_models"))


@torch.no_grad()
def rm_scores(path: Path, prompts, completions) -> list:
    """The reward model's score of each prompt + completion, one unpadded sequence at a time."""
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return [model(**tok(p + c, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
            for p, c in zip(prompts, completions)]


def raw_rewards(models: Path, step: dict) -> torch.Tensor:
    """[N, 2] raw rewards of a recorded batch: A = reward model rm_a, B = the vowel rule."""
    a = rm_scores(models / "rm_a", step["prompt"], step["completion"])
    b = vowels(step["prompt"], step["completion"])
    return torch.tensor([a, b], dtype=torch.float64).T


def labels_of(models: Path, prompts) -> list:
    by_prompt = {r["prompt"]: r["lsc_ref"] for r in prompt_rows(models)}
    return [by_prompt[p] for p in prompts]


def check_step(step: dict, logged: dict, utility: torch.Tensor, metrics: dict, names=("A", "B")) -> np.ndarray:
    """TRL's reward columns and our log_metric values against the independent ones; returns the [N, K] utilities."""
    per_rm = np.stack([metrics[f"lsc/{n}/utility"].numpy() for n in names], 1)
    for k, n in enumerate(names):
        np.testing.assert_allclose(step["rewards"][f"lsc_{n}"], per_rm[:, k], rtol=1e-5, atol=1e-5)
        for key in ("reward", "utility", "margin", "above_ref"):
            np.testing.assert_allclose(logged[f"lsc/{n}/{key}"], metrics[f"lsc/{n}/{key}"].mean().item(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(per_rm.sum(1), utility.numpy(), rtol=1e-6)  # TRL's sum is AND
    return per_rm


def group_normalised(x: np.ndarray, group: int = GROUP) -> np.ndarray:
    g = x.reshape(-1, group)
    return ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-4)).ravel()


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_grpo_label_references(models, tmp_path, aggregation):
    funcs = lsc_reward_funcs({"A": str(models / "rm_a"), "B": vowels}, reference="label", label_key="lsc_ref")
    weights = [1.0, 0.5] if aggregation == "normalize_then_sum" else None
    trainer, record = train(models, tmp_path, funcs, multi_objective_aggregation=aggregation, reward_weights=weights)
    spec = RewardSpec(names=("A", "B"), transform="lsc", reference="label", label_key="lsc_ref")
    assert len(record.steps) == 2
    for step, logged in zip(record.steps, trainer.state.log_history):
        utility, metrics = reward_utilities(raw_rewards(models, step), spec, labels_of(models, step["prompt"]), GROUP)
        per_rm = check_step(step, logged, utility, metrics)
        if aggregation == "sum_then_normalize":
            expected = group_normalised(per_rm.sum(1))
        else:  # GDPO: each column normalised in its group, weighted sum, then normalised over the batch
            s = np.stack([group_normalised(per_rm[:, k]) for k in range(2)], 1) @ np.array(weights)
            expected = (s - s.mean()) / (s.std(ddof=1) + 1e-4)
        np.testing.assert_allclose(step["advantages"], expected, rtol=1e-3, atol=1e-3)
        assert logged["rewards/lsc_A/mean"] == pytest.approx(per_rm[:, 0].mean(), rel=1e-4)


def test_rloo_constant_references_and_none(models, tmp_path):
    """RLOO's leave-one-out advantages over the AND sum; a source returning None for some prompts is skipped the
    way TRL skips None (nansum over functions), and its metrics average over the samples it scored."""
    odd = {r["prompt"] for i, r in enumerate(prompt_rows(models)) if i % 2}

    def vowels_or_none(prompts, completions, **kw):  # applies to odd-numbered prompts only
        return [v if p in odd else None for p, v in zip(prompts, vowels(prompts, completions))]

    funcs = lsc_reward_funcs({"A": str(models / "rm_a"), "B": vowels_or_none}, reference="constant",
                             reference_value=[0.0, 1.0])
    trainer, record = train(models, tmp_path, funcs, trainer="rloo", beta=0.0)
    spec = RewardSpec(names=("A", "B"), transform="lsc", reference="constant", reference_value=(0.0, 1.0))
    some_none = False
    for step, logged in zip(record.steps, trainer.state.log_history):
        scored = torch.tensor([p in odd for p in step["prompt"]])
        some_none |= not scored.all().item()
        _, metrics = reward_utilities(raw_rewards(models, step), spec)
        u_a, u_b = metrics["lsc/A/utility"].numpy(), metrics["lsc/B/utility"].numpy()
        np.testing.assert_allclose(step["rewards"]["lsc_A"], u_a, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.array(step["rewards"]["lsc_B"])[scored], u_b[scored], rtol=1e-5, atol=1e-5)
        assert np.isnan(np.array(step["rewards"]["lsc_B"])[~scored]).all()
        for key in ("reward", "margin", "above_ref"):
            assert logged[f"lsc/A/{key}"] == pytest.approx(metrics[f"lsc/A/{key}"].mean().item(), rel=1e-4, abs=1e-5)
            if scored.any():
                want = metrics[f"lsc/B/{key}"][scored].mean().item()
                assert logged[f"lsc/B/{key}"] == pytest.approx(want, rel=1e-4, abs=1e-5)
        total = (u_a + np.where(scored.numpy(), u_b, 0.0)).reshape(-1, GROUP)
        loo = (total.sum(1, keepdims=True) - total) / (GROUP - 1)
        np.testing.assert_allclose(step["advantages"], (total - loo).ravel(), rtol=1e-4, atol=1e-4)
    assert some_none, "no batch held a prompt the None-returning source skips"


def test_group_references_two_processes(models, tmp_path):
    """torchrun, 2 processes, 3 completions each in groups of 2: a group spans both processes, and every
    process's utilities equal the one-process computation over the gathered batch."""
    out = tmp_path / "run.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(TESTS / "trl_run.py"), str(models), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = json.loads(out.read_text())
    assert run["num_processes"] == 2 and len(run["steps"]) == 2
    spec = RewardSpec(names=("A", "B"), transform="lsc", reference="group", quantile=0.75)
    for step, logged in zip(run["steps"], run["log_history"]):
        prompts = step["prompt"]
        assert len(prompts) == 6 and prompts[2] == prompts[3], "the middle group should span the two processes"
        utility, metrics = reward_utilities(raw_rewards(models, step), spec, group_size=GROUP)
        check_step(step, logged, utility, metrics)
        np.testing.assert_allclose(step["advantages"], group_normalised(utility.numpy()), rtol=1e-3, atol=1e-3)


def test_group_reference_over_the_scored_samples(models, tmp_path):
    """Groups of 4 where source B returns None for one sample of each call: B's reference is the quantile of the
    group's 3 scored samples (numpy), the None sample gets None, and TRL's AND sum skips it."""

    def vowels_but_first(prompts, completions, **kw):  # one call holds one group of 4 here
        return [None if i == 0 else v for i, v in enumerate(vowels(prompts, completions))]

    funcs = lsc_reward_funcs({"A": str(models / "rm_a"), "B": vowels_but_first}, reference="group", quantile=0.75)
    trainer, record = train(models, tmp_path, funcs, num_generations=4)
    log_sigmoid = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731
    for step, logged in zip(record.steps, trainer.state.log_history):
        raw = raw_rewards(models, step).numpy().reshape(-1, 4, 2)
        u = np.empty_like(raw)
        for g, group in enumerate(raw):
            u[g, :, 0] = log_sigmoid(group[:, 0] - np.quantile(group[:, 0], 0.75))
            u[g, :, 1] = log_sigmoid(group[:, 1] - np.quantile(group[1:, 1], 0.75))
            u[g, 0, 1] = np.nan
        u = u.reshape(-1, 2)
        np.testing.assert_allclose(step["rewards"]["lsc_A"], u[:, 0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(step["rewards"]["lsc_B"], u[:, 1], rtol=1e-5, atol=1e-5)
        assert logged["lsc/B/utility"] == pytest.approx(np.nanmean(u[:, 1]), rel=1e-4)
        np.testing.assert_allclose(step["advantages"], group_normalised(np.nansum(u, 1), 4), rtol=1e-3, atol=1e-3)


def test_missing_label_names_the_prompt(models, tmp_path):
    rows = prompt_rows(models)[:2]
    del rows[1]["lsc_ref"]["B"]  # the dataset stores it as None
    funcs = lsc_reward_funcs({"A": str(models / "rm_a"), "B": vowels}, reference="label")
    with pytest.raises(ValueError) as err:
        train(models, tmp_path, funcs, rows=rows, steps=1)
    msg = str(err.value)
    assert f"prompt {rows[1]['prompt']!r}" in msg and "'B'" in msg and "lsc_ref" in msg, msg


def test_monitor_stops_when_the_evaluator_falls(models, tmp_path):
    """The proxy rises with every step and the held-out evaluator falls: with window 1 and patience 1 the rule
    holds at the second batch (step 1), and training stops at the end of that step instead of running 6."""

    def proxy(prompts, completions, trainer_state, **kw):
        return [trainer_state.global_step + 0.1 * i for i in range(len(prompts))]

    def judge(prompts, completions, trainer_state, **kw):
        return [-trainer_state.global_step + 0.2 * i for i in range(len(prompts))]

    monitor = MonitorCallback([judge], window=1, patience=1)
    funcs = lsc_reward_funcs([proxy], reference="constant", reference_value=[0.15], monitor=monitor)
    trainer, _ = train(models, tmp_path, funcs, steps=6, callbacks=[monitor])
    assert trainer.state.global_step == 2
    summary = monitor.summary()
    assert summary["fired_step"] == 1 and summary["best_step"] == 0
    logged = [h for h in trainer.state.log_history if "monitor/judge/mean" in h]
    offset = 0.2 * np.arange(4).mean()
    assert [h["monitor/judge/mean"] for h in logged] == pytest.approx([offset, offset - 1.0])
    assert [h["monitor/fired"] for h in logged] == [0.0, 1.0]
    # the proxy's LSC metrics: r = step + 0.1 i against the constant 0.15
    assert logged[1]["lsc/proxy/above_ref"] == pytest.approx(1.0) and logged[0]["lsc/proxy/above_ref"] == pytest.approx(0.5)


def test_bad_input_is_one_error_naming_the_thing():
    def nan_for_second(prompts, completions, **kw):
        return [0.0, math.nan]

    def short(prompts, completions, **kw):
        return [0.0]

    (f,) = lsc_reward_funcs([nan_for_second], reference="constant", reference_value=[0.0])
    with pytest.raises(ValueError, match=r"'nan_for_second' returned nan for prompt 'q2'"):
        f(prompts=["q1", "q2"], completions=["a", "b"])
    (f,) = lsc_reward_funcs([short], reference="constant", reference_value=[0.0])
    with pytest.raises(ValueError, match=r"'short' returned 1 rewards for 2 completions"):
        f(prompts=["q1", "q2"], completions=["a", "b"])
    with pytest.raises(ValueError, match=r"share a name.*dict"):
        lsc_reward_funcs([short, short], reference="none", transform="raw")
    with pytest.raises(ValueError, match=r"reads the dataset column 'lsc_ref'.*columns: \['other'\]"):
        lsc_reward_funcs([vowels], reference="label")[0](prompts=["q"], completions=["a"], other=[1])
    with pytest.raises(ValueError, match=r"group' needs TRL's trainer"):
        lsc_reward_funcs([vowels], reference="group", quantile=0.5)[0](prompts=["q", "q"], completions=["a", "b"])
    for evaluators in ({"judge": short}, {"other": vowels}):  # the same name, the same callable
        with pytest.raises(ValueError, match=r"evaluator '\w+' is also the reward source 'judge'"):
            lsc_reward_funcs({"judge": vowels}, reference="none", transform="raw", monitor=MonitorCallback(evaluators))


def test_docstring_examples():
    import doctest

    import openrlhf_lsc.frameworks.trl as module

    result = doctest.testmod(module)
    assert result.attempted >= 2 and result.failed == 0, result
