"""The forgetting experiment: the random rehearsal set against hand-worked examples, and a smoke run (tiny sizes):
files, plot, finite numbers, the rehearsal hook, the arms' rehearsal sets, verdicts from lab.stats, resume.
These check machinery, not whether rehearsal helps."""

import dataclasses
import math
import os

import matplotlib.image
import numpy as np
import pytest
import torch

from openrlhf_lsc.lab import forgetting, models, stats
from lab_checks import numbers

CFG = forgetting.PRESETS["smoke"]


def test_random_rehearsal_hand_examples():
    # One selected row per cluster and one row left in each: the draw is forced.
    assert forgetting.random_rehearsal([0, 0, 1, 1], [0, 2], seed=0) == [1, 3]
    assert forgetting.random_rehearsal([1, 1, 0, 0], [3, 0], seed=5) == [2, 1]  # cluster 0 first
    clusters = [0] * 5 + [1] * 4 + [2] * 3
    selected = [0, 1, 5, 9]  # cluster 0: 2 rows, cluster 1: 1, cluster 2: 1
    draws = [forgetting.random_rehearsal(clusters, selected, seed=s) for s in range(600)]
    for d in draws:
        assert len(d) == len(selected) and not set(d) & set(selected)  # same size, disjoint
        assert [sum(clusters[r] == c for r in d) for c in range(3)] == [2, 1, 1]  # same count per cluster
        assert set(d) <= {2, 3, 4, 6, 7, 8, 10, 11}
    assert forgetting.random_rehearsal(clusters, selected, seed=3) == draws[3]  # seeded
    assert len({tuple(d) for d in draws}) == 3 * 3 * 2  # every (cluster 0 pair, cluster 1 row, cluster 2 row) occurs
    # Uniform: each of the 3 candidates of cluster 0 is drawn with probability 2/3 (600 draws: 400 +- 11.5 sd).
    counts = {r: sum(r in d for d in draws) for r in (2, 3, 4)}
    assert all(abs(c - 400) < 50 for c in counts.values()), counts
    with pytest.raises(ValueError, match="cluster 0 has 3 rows, 2 of them selected and 1 free to draw"):
        forgetting.random_rehearsal([0, 0, 0, 1, 1], [0, 1, 3], seed=0)
    # Barred rows (e.g. the PPO prompts) are never drawn: one cluster, 2 selected, rows 2..6 minus barred 2, 4, 5
    # leave {3, 6}, both drawn.
    assert forgetting.random_rehearsal([0] * 7, [0, 1], seed=9, exclude=[2, 4, 5]) == [3, 6]
    with pytest.raises(ValueError, match="7 rows, 2 of them selected and 1 free to draw"):
        forgetting.random_rehearsal([0] * 7, [0, 1], seed=9, exclude=[2, 3, 4, 5])


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("forgetting"))
    return out, forgetting.run(out, CFG)


@pytest.mark.slow
def test_files_plot_and_finite_numbers(smoke):
    out, results = smoke
    for name in ("forgetting.md", "forgetting.json", "config.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    img = matplotlib.image.imread(os.path.join(out, "forgetting.png"))
    assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0
    assert all(math.isfinite(x) for x in numbers(results))
    names = ["stock", "select"] + [f"{a} g={g:g}" for g in CFG.gammas
                                   for a in ("select+rehearse", "select+random", "select+random-nonppo", "rehearse")]
    assert [r["arm"] for r in results["table"]] == names
    assert len(results["runs"]) == len(names) * len(CFG.seeds) * len(CFG.worlds)
    steps = CFG.ppo["steps"]
    assert [c["step"] for c in results["runs"][0]["curve"]] == list(range(steps + 1))
    assert "](forgetting.png)" in open(os.path.join(out, "forgetting.md")).read()


@pytest.mark.slow
def test_rehearsal_hook_and_rehearsal_sets(smoke):
    """gamma = 0 reproduces the arm without rehearsal exactly; gamma = 1 lowers the NLL of the rehearsed set; the
    random D_R has D_R's size and per-cluster counts, is disjoint from it and is redrawn per seed."""
    out, results = smoke
    sel = results["selection"]["0"]
    clusters = np.array(forgetting.read_json(os.path.join(out, "world0", "setup.json"))["clusters"])
    runs = {(r["arm"], r["seed"]): r for r in results["runs"]}
    history = lambda arm, s: forgetting.read_json(forgetting.run_path(out, 0, arm, s))["history"]  # noqa: E731
    for s in CFG.seeds:
        for arm, same in (("select+rehearse g=0", "select"), ("select+random g=0", "select"),
                          ("select+random-nonppo g=0", "select"), ("rehearse g=0", "stock")):
            assert history(arm, s) == history(same, s)
            assert runs[(arm, s)]["end"] == runs[(same, s)]["end"]
        assert runs[("stock", s)]["curve"][0] == runs[("select", s)]["curve"][0]  # both start from the SFT policy
        assert runs[("select+rehearse g=1", s)]["curve"][-1]["rehearsal_nll"] < runs[("select", s)]["curve"][-1]["rehearsal_nll"]
        assert runs[("select+rehearse g=1", s)]["d_r_rows"] == sel["rehearsal_rows"]
        rnd = runs[("select+random g=1", s)]["d_r_rows"]
        assert len(rnd) == len(sel["rehearsal_rows"]) and not set(rnd) & set(sel["rehearsal_rows"])
        assert sorted(clusters[rnd].tolist()) == sorted(clusters[sel["rehearsal_rows"]].tolist())
        off = runs[("select+random-nonppo g=1", s)]["d_r_rows"]
        assert len(off) == len(sel["rehearsal_rows"]) and not set(off) & (set(sel["rehearsal_rows"]) | set(sel["ppo_rows"]))
        assert runs[("select", s)]["n_prompts"] == len(sel["ppo_rows"]) < runs[("stock", s)]["n_prompts"]
    assert runs[("select+random g=1", 0)]["d_r_rows"] != runs[("select+random g=1", 1)]["d_r_rows"]


@pytest.mark.slow
def test_verdicts_come_from_lab_stats(smoke):
    _, results = smoke
    for c in results["comparisons"]:
        p = c["per_target"][0]
        assert c["verdict"] == stats.verdict([(p["lo"], p["hi"])], c["margin"])
    for key, claim in results["claims"].items():
        assert claim["verdict"] == stats.combine([c["verdict"] for c in results["comparisons"] if c["claim"] == key])
    assert {c["margin"] for c in results["comparisons"] if c["claim"].startswith("F3")} == {CFG.reward_margin}
    # The F1 interval is the lab's bootstrap of stock's minus the arm's per-prompt held-out NLL.
    runs = {(r["arm"], r["seed"]): r for r in results["runs"]}
    diff = np.array([np.array(runs[("stock", s)]["end"]["heldout_nll"]) -
                     np.array(runs[("select+rehearse g=1", s)]["end"]["heldout_nll"]) for s in CFG.seeds])
    f1 = next(c for c in results["comparisons"] if c["claim"] == "F1 g=1")
    want = stats.bootstrap([diff], CFG.bootstrap, seed=f1["bootstrap_seed"] * 100)
    assert (f1["per_target"][0]["lo"], f1["per_target"][0]["hi"]) == (want["lo"], want["hi"])


@pytest.mark.slow
def test_resume_rewrites_nothing(smoke):
    out, results = smoke
    runs_dir = os.path.join(out, "world0", "runs")
    mtimes = {f: os.path.getmtime(os.path.join(runs_dir, f)) for f in os.listdir(runs_dir)}
    again = forgetting.run(out, CFG)
    assert {f: os.path.getmtime(os.path.join(runs_dir, f)) for f in mtimes} == mtimes
    assert again["comparisons"] == results["comparisons"]
    with pytest.raises(ValueError, match="different configuration"):
        forgetting.run(out, dataclasses.replace(CFG, rehearsal_k=1))


@pytest.mark.slow
def test_nll_measures_match_response_logprobs(smoke):
    """The rehearsal loss (token_nll with the experiment's mask) and the per-prompt held-out NLL = -log p of the
    response tokens from the lab's response_logprobs, pooled over all tokens / per prompt."""
    out, _ = smoke
    policy = models.load_policy(os.path.join(out, "world0", "lab", "models", "sft"))
    prompts = models.encode_prompts(["how fix bike quickly ?"] * 2 + ["how plan taxes secretly ?"] * 2)
    responses = models.encode_responses([["use", "chain", "and", "tire"], ["pump"],
                                         ["sorry", "i", "cannot", "help", "with", "that"], ["consult", "a", "lawyer"]])
    with torch.no_grad():
        got = forgetting.expert_nll(policy, prompts, responses)
        mask = models.action_mask(responses)
        logp = models.response_logprobs(policy, prompts, responses) * mask
    assert torch.allclose(got, -logp.sum() / mask.sum(), atol=1e-5)
    per_prompt = forgetting.nll_per_prompt(policy, prompts, responses, per_prompt=2)
    want = [-(logp[:2].sum() / mask[:2].sum()).item(), -(logp[2:].sum() / mask[2:].sum()).item()]
    np.testing.assert_allclose(per_prompt, want, rtol=1e-5)
