"""The lab's budget protocol (`--protocol budget`): its statistics against hand-computed examples, PAR / GDPO /
scale match in the lab's reward path against numpy, the CLI's new flags, a smoke run with resume, and the Ray
runner against the process pool on a local Ray head."""

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch

from openrlhf_lsc.lab import models, ppo, stats
from openrlhf_lsc.lab.__main__ import main
from openrlhf_lsc.lab.budget import (BUDGET_PRESETS, budget_runs, range_width, run_budget, run_budget_one,
                                     statistics)
from openrlhf_lsc.lab.files import read_json
from openrlhf_lsc.lab.runner import run_all, run_path
from lab_checks import numbers

SMOKE = BUDGET_PRESETS["smoke"]


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


# ---------------------------------------------------------------- statistics by hand


def test_range_width_by_hand():
    x = np.log10([0.001, 0.01, 0.1, 1.0])  # one decade apart
    # Above 0.5 from halfway up the first segment (0.2 -> 0.8 crosses at 0.5) to halfway into the last
    # (0.9 -> 0.1 crosses at (0.9 - 0.5) / 0.8 = 0.5): 0.5 + 1 + 0.5 = 2 decades.
    assert range_width(x, np.array([0.2, 0.8, 0.9, 0.1]), 0.5) == pytest.approx(2.0)
    # Two separate good stretches are both counted: 0.25 (0.6 -> 0.2 crosses at 0.25) + 0.5 (0.2 -> 0.8 at 0.5).
    assert range_width(x[:3], np.array([0.6, 0.2, 0.8]), 0.5) == pytest.approx(0.25 + 0.5)
    assert range_width(x, np.array([0.1, 0.2, 0.3, 0.4]), 0.5) == 0.0  # never good
    assert range_width(x, np.full(4, 0.7), 0.5) == pytest.approx(3.0)  # good everywhere: the whole grid
    # One threshold per curve.
    np.testing.assert_allclose(range_width(x[:2], np.array([[0.0, 1.0], [0.0, 1.0]]), np.array([0.5, 0.75])), [0.5, 0.25])


def test_regret_oracle_width_average_and_stop_by_hand():
    betas = [0.01, 0.1, 1.0]
    # Two methods x three betas x two checkpoints (one resample).
    curves = np.array([[[[0.30, 0.10], [0.50, 0.40], [0.20, 0.30]],
                        [[0.35, 0.36], [0.45, 0.44], [0.10, 0.20]]]])
    stop = np.array([[[0.3, 0.5, 0.2], [0.35, 0.45, 0.1]]])
    st = statistics(curves, stop, betas, near=0.05)
    assert st["oracle"].tolist() == [0.5]  # method 0, beta 0.1, first checkpoint
    np.testing.assert_allclose(st["last"], [[[0.10, 0.40, 0.30], [0.36, 0.44, 0.20]]])
    np.testing.assert_allclose(st["regret"], [[[0.40, 0.10, 0.20], [0.14, 0.06, 0.30]]])
    np.testing.assert_allclose(st["average"], [[[0.20, 0.45, 0.25], [0.355, 0.445, 0.15]]])
    # within 0.05 of the oracle = last >= 0.45: method 0 never; method 1 only around beta 0.1 (0.44 < 0.45): never.
    np.testing.assert_allclose(st["width"], [[0.0, 0.0]])
    st = statistics(curves, stop, betas, near=0.15)  # last >= 0.35
    # method 0: 0.10 -> 0.40 crosses 0.35 at 5/6 of the first decade; 0.40 -> 0.30 at 1/2 of the second.
    # method 1: 0.36 -> 0.44 all of the first decade; 0.44 -> 0.20 crosses at 0.09 / 0.24 = 0.375 of the second.
    np.testing.assert_allclose(st["width"], [[1 / 6 + 0.5, 1 + 0.375]])
    assert st["stop"] is stop
    # Resamples read the oracle in the cell the observed data chose (method 0, beta 0.1, first checkpoint), even where
    # another cell is higher (method 1's 0.55 in the second resample).
    two = np.concatenate([curves, curves + np.array([0.0, 0.1])[None, :, None, None]])
    st = statistics(two, np.concatenate([stop, stop]), betas, near=0.05, oracle=(0, 1, 0))
    np.testing.assert_allclose(st["oracle"], [0.5, 0.5])
    np.testing.assert_allclose(st["regret"][1], 0.5 - two[1, ..., -1])


def test_resample_means_keeps_trailing_dimensions_paired_and_matches_bootstrap():
    rng = np.random.default_rng(0)
    worlds = [rng.normal(size=(3, 7)), rng.normal(size=(2, 5)) + 1.0]
    draws = stats.resample_means([np.stack([w, w + 1.0, 2 * w], -1) for w in worlds], n=500, seed=4)
    np.testing.assert_allclose(draws[:, 1] - draws[:, 0], 1.0)  # the same draw for every trailing column
    np.testing.assert_allclose(draws[:, 2], 2 * draws[:, 0])
    lo, hi = np.quantile(draws[:, 0], [0.025, 0.975])
    b = stats.bootstrap(worlds, n=500, seed=4)
    assert (b["lo"], b["hi"]) == pytest.approx((lo, hi), abs=1e-12)


# ---------------------------------------------------------------- the lab's reward path against numpy


def _rm(seed: int) -> models.RewardModel:
    return models.reward_model_from(models.new_policy(seed, hidden=16, layers=1), seed)


def test_par_in_the_lab_reward_path_is_the_mean_sigmoid_over_m_sft_scores():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(3, 12))  # 12 SFT scores per prompt recorded; PAR reads the first M
    labels = [{"helpful": {"reference": 0.0, "par_scores": s.tolist()}} for s in scores]
    r = rng.normal(size=(6, 1))
    index = [2, 0, 1, 1, 2, 0]
    for m in (10, 3):
        pipe = ppo.RewardPipeline([], ["helpful"], labels, "par", par_m=m)
        got = pipe.utility(torch.tensor(r, dtype=torch.float32), index).numpy()
        want = sigmoid(r[:, 0, None] - scores[index, :m]).mean(1)
        np.testing.assert_allclose(got, want, rtol=1e-5)
    with pytest.raises(ValueError, match="prompt 0.*13"):  # fewer scores than M: refused, naming the prompt
        ppo.RewardPipeline([], ["helpful"], labels, "par", par_m=13).utility(torch.zeros(1, 1), [0])


def test_gdpo_in_the_lab_reward_path_z_scores_each_reward_within_its_prompt_group():
    rng = np.random.default_rng(2)
    n = 4
    r = rng.normal(size=(3 * n, 2)) * [1.0, 5.0]
    pipe = ppo.RewardPipeline([], ["helpful", "harmless"], [{}] * 3, "raw", "gdpo")
    got = pipe.utility(torch.tensor(r), [0] * n + [1] * n + [2] * n, group_size=n).numpy()
    g = r.reshape(3, n, 2)
    want = ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-4)).sum(-1).reshape(-1)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(ValueError, match="groups of >= 2"):
        pipe.utility(torch.tensor(r), list(range(3 * n)), group_size=1)


def test_scale_match_fixes_the_factor_on_the_first_batch_and_leaves_raw_bit_identical():
    rng = np.random.default_rng(3)
    labels = [{"helpful": {"reference": float(v)}} for v in rng.normal(size=4)]
    first, second = rng.normal(size=(8, 1)) * 3, rng.normal(size=(8, 1))
    index = [0, 1, 2, 3, 0, 1, 2, 3]
    ref = np.array([labels[i]["helpful"]["reference"] for i in index])
    pipe = ppo.RewardPipeline([], ["helpful"], labels, "sigmoid", scale="match")
    u1 = pipe.utility(torch.tensor(first), index).numpy()
    factor = first[:, 0].std(ddof=1) / sigmoid(first[:, 0] - ref).std(ddof=1)
    np.testing.assert_allclose(u1, factor * sigmoid(first[:, 0] - ref), rtol=1e-6)
    np.testing.assert_allclose(u1.std(ddof=1), first.std(ddof=1), rtol=1e-6)  # the raw reward's spread
    u2 = pipe.utility(torch.tensor(second), index).numpy()  # later batches keep the first batch's factor
    np.testing.assert_allclose(u2, factor * sigmoid(second[:, 0] - ref), rtol=1e-6)
    assert pipe.spread["scale"] == pytest.approx(factor)
    assert pipe.spread["reward_std"] == pytest.approx(second.std(ddof=1))
    for r in (first, second):
        plain = ppo.RewardPipeline([], ["helpful"], labels, "raw").utility(torch.tensor(r), index)
        matched = ppo.RewardPipeline([], ["helpful"], labels, "raw", scale="match").utility(torch.tensor(r), index)
        assert torch.equal(plain, matched)


def test_ppo_groups_samples_by_prompt_for_gdpo():
    """`ppo.train` hands the reward core groups of n consecutive samples of one prompt (gdpo refuses groups of 1)."""
    policy = models.new_policy(0, hidden=16, layers=1)
    rms = [_rm(1), _rm(2)]
    prompts = models.encode_prompts(["how fix bike today ?", "how plan trip cheaply ?", "how start app today ?"])
    pipe = ppo.RewardPipeline(rms, ["helpful", "harmless"], [{}] * 3, "raw", "gdpo")
    cfg = ppo.PPOConfig(steps=2, rollout_prompts=2, n_samples_per_prompt=3, train_batch=6, kl_coef=0.01)
    seen = []

    def on_rollout(step, index, responses, rewards):
        g = rewards.numpy().reshape(-1, 3, 2)
        want = ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-4)).sum(-1)
        seen.append((index.reshape(-1, 3), want.std(ddof=1), pipe.spread["utility_std"]))
        return {}

    ppo.train(policy, prompts, pipe, cfg, seed=0, progress=False, on_rollout=on_rollout)
    assert len(seen) == 2
    for index, want, got in seen:
        assert (index == index[:, :1]).all()  # each group is one prompt's samples
        assert got == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------- CLI


@pytest.mark.parametrize("args, expected", [
    (["--protocol", "bogus"], "argument --protocol: invalid choice: 'bogus'"),
    (["--protocol", "budget", "--ray", "not an address"], "--ray expects auto or a Ray cluster address"),
    (["--protocol", "budget", "--ray", "auto", "--workers", "2"], "--ray runs the lab's runs on a Ray cluster"),
    (["--protocol", "budget", "--evaluate", "policy"], "--evaluate judges a policy on a matched-KL lab's world"),
    (["--ray", "127.0.0.1:1"], "one of the arguments --quick --full --smoke --evaluate is required"),
])
def test_new_flags_bad_input_is_one_line_exit_2(args, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(args + ["--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and expected in err and len(err.strip().splitlines()) == 1, err


def test_budget_config_refuses_bad_grids():
    with pytest.raises(ValueError, match="increasing"):
        dataclasses.replace(SMOKE, betas=(0.1, 0.01))
    with pytest.raises(ValueError, match="par_m"):
        dataclasses.replace(SMOKE, par_m=SMOKE.ref_k + 1)


# ---------------------------------------------------------------- smoke run, resume, Ray


@pytest.fixture(scope="module")
def budget(tmp_path_factory):
    """The smoke protocol through the process pool (2 workers; the worker count is not part of the configuration)."""
    out = str(tmp_path_factory.mktemp("budget"))
    return out, run_budget(out, dataclasses.replace(SMOKE, workers=2))


@pytest.mark.slow
def test_budget_smoke_writes_the_report_with_every_table(budget):
    out, results = budget
    report = open(os.path.join(out, "report.md")).read()
    for heading in ("## Verdicts", "(a) Last checkpoint", "(b) Regret", "(c) Width", "(d) Average win", "(e) Win at",
                    "budget.png"):
        assert heading in report
    assert set(results["claims"]) == {"B1", "B2", "B3", "B4", "B5"}
    assert all(v["verdict"] in ("reproduced", "not reproduced", "inconclusive") for v in results["claims"].values())
    assert all(np.isfinite(x) for x in numbers(read_json(os.path.join(out, "results.json"))))
    runs = budget_runs(SMOKE)
    assert results["timing"]["runs"] == len(runs) == 10 * 2  # methods x betas, one world, one PPO seed
    rec = read_json(run_path(out, next(r for r in runs if r["method"] == "par+match")))
    assert [c["step"] for c in rec["checkpoints"]] == [3, 6] and rec["ppo"]["kl_targets"] == []
    assert {h["kl_coef"] for h in rec["history"]} == {rec["run"]["beta"]}  # a fixed coefficient
    assert rec["history"][0]["lsc/scale"] == rec["history"][-1]["lsc/scale"] != 1.0


@pytest.mark.slow
def test_budget_resume_keeps_finished_runs_and_refuses_another_config(budget):
    out, _ = budget
    runs = budget_runs(SMOKE)
    removed = run_path(out, runs[3])
    os.remove(removed)
    kept = {run_path(out, r): os.path.getmtime(run_path(out, r)) for r in runs if run_path(out, r) != removed}
    run_budget(out, SMOKE)
    assert os.path.exists(removed)
    assert kept == {p: os.path.getmtime(p) for p in kept}
    with pytest.raises(ValueError, match="different configuration"):
        run_budget(out, dataclasses.replace(SMOKE, betas=(0.01, 0.3)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_runner_gives_the_process_pool_s_results(budget, tmp_path):
    """A run of the smoke protocol as a task of a local Ray head (2 CPUs) started here equals the process pool's."""
    out, _ = budget
    pick = [r for r in budget_runs(SMOKE) if r["beta"] == SMOKE.betas[0] and r["method"] == "par+match"]
    copy = str(tmp_path / "ray")
    shutil.copytree(os.path.join(out, "world0"), os.path.join(copy, "world0"), ignore=shutil.ignore_patterns("runs"))
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths
    head = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block",
                             f"--port={port}", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
                             f"--temp-dir={temp}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        for attempt in range(60):  # the head takes a while to come up
            try:
                ray = run_all(copy, SMOKE, pick, "ray", run_budget_one, ray=f"127.0.0.1:{port}")
                break
            except ValueError:
                if attempt == 59:
                    raise
                time.sleep(2)
    finally:
        head.terminate()  # `ray start --block` stops the head's processes
        head.wait(60)
        shutil.rmtree(temp, ignore_errors=True)
    assert len(ray) == 1
    for key, rec in ray.items():
        pool = read_json(run_path(out, rec["run"]))
        drop = ("seconds", "cpu_seconds")
        assert {k: v for k, v in rec.items() if k not in drop} == {k: v for k, v in pool.items() if k not in drop}, key
