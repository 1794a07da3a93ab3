"""Smoke run of the CPU lab (tiny sizes): the pipeline end to end, resume, and the best-of-n machinery.
These check machinery, not which method wins."""

import json
import math
import os

import matplotlib.image
import numpy as np
import pytest
import torch

from openrlhf_lsc.lab import experiments as ex
from openrlhf_lsc.lab import models, world
from openrlhf_lsc.references import references_from_labels
from lab_checks import numbers


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lab"))
    results = ex.run_lab(out, ex.PRESETS["smoke"])
    return out, results



def test_files_written_and_plots_render(lab):
    out, results = lab
    for name in ("config.json", "results.json", "report.md", "models/sft/config.json", "models/rm_helpful/model.safetensors",
                 "models/rm_harmless/model.safetensors", "data/sft_demos.jsonl", "data/prefs_helpful.jsonl"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert results["figures"], "no figures"
    for fig in results["figures"]:
        image = matplotlib.image.imread(os.path.join(out, fig))
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, fig
        assert image[..., :3].std() > 0.01, f"{fig} is blank"
        assert f"]({fig})" in open(os.path.join(out, "report.md")).read()
    runs = os.listdir(os.path.join(out, "runs"))
    assert len(runs) == len(results["rows"]) == 4


def test_numbers_finite_and_in_range(lab):
    out, results = lab
    with open(os.path.join(out, "results.json")) as f:
        on_disk = json.load(f)
    assert all(math.isfinite(x) for x in numbers(on_disk))
    for row in on_disk["rows"]:
        assert 0.0 <= row["win"] <= 1.0 and row["kl"] > -0.5  # a sample KL estimate may dip slightly below 0
        assert all(0.0 <= v <= 1.0 for v in row["shortcut"].values())
    for curve in on_disk["frontier"]["win"].values():
        assert np.all(np.diff(curve) >= -1e-12), "the best-of-n frontier must rise with KL"


def test_prompt_files_carry_reference_labels(lab):
    out, _ = lab
    rows = [json.loads(line) for line in open(os.path.join(out, "data", "prompts_train.jsonl"))]
    refs = references_from_labels([r["lsc_ref"] for r in rows], ["helpful", "harmless"], "lsc_ref")
    single = references_from_labels([r["lsc_ref_single"] for r in rows], ["helpful", "harmless"], "lsc_ref_single")
    assert refs.shape == single.shape == (len(rows), 2) and torch.isfinite(refs).all()
    # AND labels use the 0.75 / 0.5 quantiles of the same samples, single-reward helpfulness the 0.85 quantile.
    assert (single[:, 0] >= refs[:, 0] - 1e-6).all()
    assert {r["lsc_ref"]["helpful"]["q"] for r in rows} == {0.75} and {r["lsc_ref"]["harmless"]["q"] for r in rows} == {0.5}


def test_sft_kl_to_itself_is_zero(lab):
    """The SFT checkpoint judged as a trained policy (the --evaluate path): KL 0, win rates near 1 - quantile."""
    out, results = lab
    ev = ex.evaluate_checkpoint(out, os.path.join(out, "models", "sft"))
    assert abs(ev["kl"]) < 1e-5
    assert os.path.exists(os.path.join(out, "evaluations", "sft.json"))
    # a fresh sample of the SFT policy beats its own 85th percentile about 15% of the time (coarse: tiny pools, ties)
    assert 0.0 <= ev["win"]["helpful"] <= 0.45


def test_resume_keeps_finished_work(lab):
    out, results = lab
    runs_dir = os.path.join(out, "runs")
    files = sorted(os.listdir(runs_dir))
    removed = files[0]
    os.remove(os.path.join(runs_dir, removed))
    before = {f: os.path.getmtime(os.path.join(runs_dir, f)) for f in files[1:]}
    sft_mtime = os.path.getmtime(os.path.join(out, "models", "sft", "model.safetensors"))
    ex.run_lab(out, ex.PRESETS["smoke"])
    assert sorted(os.listdir(runs_dir)) == files
    assert before == {f: os.path.getmtime(os.path.join(runs_dir, f)) for f in files[1:]}
    assert os.path.getmtime(os.path.join(out, "models", "sft", "model.safetensors")) == sft_mtime


def test_different_config_is_refused(lab):
    out, _ = lab
    with pytest.raises(ValueError, match="different configuration"):
        ex.Lab(out, ex.PRESETS["quick"])


@pytest.mark.parametrize("n", [2, 4, 16])
def test_best_of_n_kl_formula_matches_empirical(n):
    scores = np.random.default_rng(n).normal(size=(1, 20000))  # continuous: no ties
    assert ex.empirical_bon_kl(scores, n) == pytest.approx(float(ex.bon_kl(n)), rel=0.02, abs=0.002)
    assert ex.bon_n_for_kl(float(ex.bon_kl(n))) == pytest.approx(n, rel=1e-6)


def test_best_of_k_pick_probabilities_match_simulation():
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 4, size=(1, 9)).astype(float)  # ties on purpose
    k = 3
    probs = ex.bon_pick_probs(pool, k)[0]
    draws = rng.integers(0, 9, size=(200000, k))
    values = pool[0][draws]
    # ties broken uniformly: among the drawn items with the max value, pick one at random
    best = values.max(1, keepdims=True)
    tie = values == best
    choice = np.argmax(tie * rng.random(tie.shape), axis=1)
    picked = draws[np.arange(len(draws)), choice]
    freq = np.bincount(picked, minlength=9) / len(picked)
    np.testing.assert_allclose(freq, probs, atol=0.006)
    assert probs.sum() == pytest.approx(1.0)


def test_gold_judges_follow_the_world_rules():
    p = next(q for q in world.make_prompts(0) if not q.sensitive)
    key = sorted(p.keys)[0]
    h = lambda words: world.gold_helpful(p, words)  # noqa: E731
    # diminishing returns and no credit for repeats
    assert h(["use", key]) > h(["use"]) and h(["use", key, key]) == h(["use", key])
    # list format credited for two items, then not
    two = ["1.", key, "2.", key]
    assert h(two) > h(["use", key]) and h(two + ["3.", key, "4.", key]) == h(two)
    # consult credited once for harmlessness
    s = lambda words: world.gold_harmless(p, words)  # noqa: E731
    once = ["use", key, "consult", "a", "doctor"]
    assert s(once) > s(["use", key]) and s(once + ["consult", "a", "lawyer"]) == s(once)
    # the demonstrator stays within the response budget and the vocabulary
    rng = __import__("random").Random(0)
    for q in world.make_prompts(0)[:50]:
        d = world.demonstrate(q, rng)
        assert len(d) < world.MAX_NEW_TOKENS and all(w in world.token_index() for w in d)
    assert models.encode_responses([["salt"] * 40]).shape == (1, world.MAX_NEW_TOKENS)


def test_gold_scores_do_not_depend_on_string_hashing():
    """Gold sums run over word sets: their order must not change a float (ties decide wins)."""
    import subprocess
    import sys

    code = ("import random; from openrlhf_lsc.lab import world; rng = random.Random(1); "
            "ps = world.make_prompts(0)[:40]; ds = [world.demonstrate(p, rng) for p in ps for _ in range(5)]; "
            "print(repr([(world.gold_helpful(p, d), world.gold_harmless(p, d)) for p, d in zip([p for p in ps for _ in range(5)], ds)]))")
    outs = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                           capture_output=True, text=True, check=True).stdout for seed in ("1", "2", "3")}
    assert len(outs) == 1
