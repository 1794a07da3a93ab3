"""Smoke run of the CPU lab (tiny sizes): the pipeline end to end, resume, the CLI, and the best-of-n machinery.
These check machinery, not which method wins."""

import gc
import json
import math
import os
import subprocess
import sys
import weakref

import matplotlib.image
import numpy as np
import pytest
import torch

from openrlhf_lsc.lab import models, ppo, world
from openrlhf_lsc.lab.analysis import monitor_summary
from openrlhf_lsc.lab.best_of_k import best_of_k, best_of_k_summary, bon_kl, bon_n_for_kl, bon_pick_probs
from openrlhf_lsc.lab.config import MONITOR_NOISE, PRESETS
from openrlhf_lsc.lab.evaluation import wins
from openrlhf_lsc.lab.files import read_json
from openrlhf_lsc.lab.pipeline import evaluate_checkpoint, run_lab
from openrlhf_lsc.lab.runner import lab_prompt_ids
from openrlhf_lsc.lab.world_setup import Lab, load_world
from openrlhf_lsc.references import references_from_labels
from lab_checks import numbers

CFG = PRESETS["smoke"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lab"))
    results = run_lab(out, CFG)
    return out, results


def test_files_written_and_plots_render(lab):
    out, results = lab
    w = os.path.join(out, "world0")
    for name in ("config.json", "results.json", "report.md", "selections.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    for name in ("models/sft/config.json", "models/rm_helpful/model.safetensors", "models/rm_harmless/model.safetensors",
                 "data/sft_demos.jsonl", "data/prefs_helpful.jsonl", "data/prompts_test.jsonl", "setup/headroom.json"):
        assert os.path.getsize(os.path.join(w, name)) > 0, name
    assert results["figures"], "no figures"
    report = open(os.path.join(out, "report.md")).read()
    for fig in results["figures"]:
        image = matplotlib.image.imread(os.path.join(out, fig))
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, fig
        assert image[..., :3].std() > 0.01, f"{fig} is blank"
        assert f"]({fig})" in report
    for claim in results["claims"]:
        assert f"{claim}: " in report
    # 1 check + 2 tuning + 2 single + 2 AND test runs (the paper-rule AND is the tuned one here: w = 0.5)
    assert len(os.listdir(os.path.join(w, "runs"))) == results["runs"] == 7


def test_runs_walk_the_kl_staircase_and_numbers_are_finite(lab):
    out, results = lab
    with open(os.path.join(out, "results.json")) as f:
        on_disk = json.load(f)
    assert all(math.isfinite(x) for x in numbers(on_disk))
    lab_ = Lab(os.path.join(out, "world0"), CFG, 0)
    for name in os.listdir(os.path.join(out, "world0", "runs")):
        rec = read_json(os.path.join(out, "world0", "runs", name))
        assert [st["target"] for st in rec["stairs"]] == list(CFG.kl_targets)
        n_prompts = len(lab_.val_prompts if rec["run"]["split"] == "val" else lab_.test_prompts)
        for st in rec["stairs"]:
            assert all(len(v) == n_prompts for v in st["per_prompt"].values())
            assert all(0.0 <= x <= 1.0 for k in ("win_helpful", "win_both", "list") for x in st["per_prompt"][k])
            assert st["kl_coef"] > 0
        # the staircase's coefficient is the controller's: it falls while the KL is below target
        assert len(rec["history"]) == CFG.ppo["steps"]
    for curve in on_disk["frontier"]["win"].values():
        assert np.all(np.diff(curve) >= -1e-12), "the best-of-n frontier must rise with KL"
    for c in on_disk["comparisons"]:
        for p in c["per_target"]:
            assert not p["reached"] or p["lo"] <= p["mean"] <= p["hi"]


def test_prompt_files_carry_reference_labels(lab):
    out, _ = lab
    rows = [json.loads(line) for line in open(os.path.join(out, "world0", "data", "prompts_train.jsonl"))]
    names = ["helpful", "harmless"]
    q85 = references_from_labels([r["lsc_ref_q85"] for r in rows], names, "lsc_ref_q85")
    med = references_from_labels([r["lsc_ref_and_0.5_0.5"] for r in rows], names, "lsc_ref_and_0.5_0.5")
    canned = references_from_labels([r["lsc_ref_canned"] for r in rows], names, "lsc_ref_canned")
    assert q85.shape == med.shape == (len(rows), 2) and torch.isfinite(q85).all()
    assert (q85 >= med - 1e-6).all()  # the 85th percentile of the same samples is above their median
    assert torch.equal(canned[:, 0], q85[:, 0]) and not torch.equal(canned[:, 1], q85[:, 1])
    assert {r["lsc_ref_and_0.75_0.5"]["helpful"]["q"] for r in rows} == {0.75}


def test_splits_on_disk_are_disjoint(lab):
    out, _ = lab
    texts = {s: [json.loads(line)["input"] for line in open(os.path.join(out, "world0", "data", f"prompts_{s}.jsonl"))]
             for s in ("train", "val", "test")}
    assert all(texts.values())
    assert not set(texts["val"]) & set(texts["test"]) and not (set(texts["val"]) | set(texts["test"])) & set(texts["train"])


def test_sft_kl_to_itself_is_zero(lab):
    """The SFT checkpoint judged as a trained policy (the --evaluate path): KL 0, win rates near 1 - quantile."""
    out, _ = lab
    ev = evaluate_checkpoint(out, os.path.join(out, "world0", "models", "sft"))
    assert abs(ev["kl"]) < 1e-5
    assert os.path.exists(os.path.join(out, "world0", "evaluations", "sft.json"))
    assert 0.0 <= ev["mean"]["win_helpful"] <= 0.45  # coarse: tiny pools, ties


def test_resume_keeps_finished_work(lab):
    out, _ = lab
    runs_dir = os.path.join(out, "world0", "runs")
    files = sorted(os.listdir(runs_dir))
    removed = [f for f in files if "-test-" in f][0]
    os.remove(os.path.join(runs_dir, removed))
    before = {f: os.path.getmtime(os.path.join(runs_dir, f)) for f in files if f != removed}
    sft_mtime = os.path.getmtime(os.path.join(out, "world0", "models", "sft", "model.safetensors"))
    run_lab(out, CFG)
    assert sorted(os.listdir(runs_dir)) == files
    assert before == {f: os.path.getmtime(os.path.join(runs_dir, f)) for f in files if f != removed}
    assert os.path.getmtime(os.path.join(out, "world0", "models", "sft", "model.safetensors")) == sft_mtime


def test_different_config_is_refused(lab):
    out, _ = lab
    with pytest.raises(ValueError, match="different configuration"):
        run_lab(out, PRESETS["quick"])


def test_cli_errors_are_one_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "openrlhf_lsc.lab", *args], capture_output=True, text=True, timeout=300)

    bad = run("--quick", "--out", str(tmp_path), "--seeds", "0,x")
    assert bad.returncode == 2 and "--seeds" in bad.stderr and "Traceback" not in bad.stderr
    missing = run("--evaluate", str(tmp_path / "nope"), "--out", str(tmp_path / "none"))
    assert missing.returncode == 2 and "error: --out" in missing.stderr and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def empirical_bon_kl(utility, k):
    """KL(best-of-k over the pool || uniform over the pool), averaged over prompts (rows)."""
    p = bon_pick_probs(utility, k)
    n = utility.shape[-1]
    return float(np.mean(np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-300) * n), 0.0), axis=-1)))


@pytest.mark.parametrize("n", [2, 4, 16])
def test_best_of_n_kl_formula_matches_empirical(n):
    scores = np.random.default_rng(n).normal(size=(1, 20000))  # continuous: no ties
    assert empirical_bon_kl(scores, n) == pytest.approx(float(bon_kl(n)), rel=0.02, abs=0.002)
    assert bon_n_for_kl(float(bon_kl(n))) == pytest.approx(n, rel=1e-6)


def test_best_of_k_pick_probabilities_match_simulation():
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 4, size=(1, 9)).astype(float)  # ties on purpose
    k = 3
    probs = bon_pick_probs(pool, k)[0]
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
    key, other = sorted(p.keys)[:2] if len(p.keys) > 1 else (sorted(p.keys)[0], "use")
    h = lambda words: world.gold_helpful(p, words)  # noqa: E731
    # diminishing returns; a repeated item costs REPEAT_PENALTY
    assert h(["use", key]) > h(["use"])
    assert h(["use", key, key]) == pytest.approx(h(["use", key]) - world.REPEAT_PENALTY)
    # list format credited for two items, not more
    two = ["1.", key, "2.", other]
    assert h(two) > h([key, other]) and h(two + ["3.", "and"]) == pytest.approx(h(two + ["and", "and"]))
    # every word past the budget costs LENGTH_PENALTY
    filler = ["use"] * (world.LENGTH_BUDGET - 2)
    assert h([key] + filler + ["use", "use"]) == pytest.approx(h([key] + filler + ["use"]) - world.LENGTH_PENALTY)
    # consult credited once, then penalised
    s = lambda words: world.gold_harmless(p, words)  # noqa: E731
    once = ["use", key, "consult", "a", "doctor"]
    assert s(once) > s(["use", key])
    assert s(once + ["consult", "a", "lawyer"]) == pytest.approx(s(once) - world.EXTRA_CONSULT_PENALTY)
    # the demonstrator stays within the gold budget and the vocabulary, and seldom repeats an item
    rng = __import__("random").Random(0)
    demos = [(q, world.demonstrate(q, rng)) for q in world.make_prompts(0)[:100] for _ in range(5)]
    assert all(len(d) <= world.LENGTH_BUDGET and all(w in world.token_index() for w in d) for _, d in demos)
    assert np.mean([world.shortcut_rates(d)["repeat"] for _, d in demos]) < 0.1
    assert models.encode_responses([["salt"] * 40]).shape == (1, world.MAX_NEW_TOKENS)


def test_gold_scores_do_not_depend_on_string_hashing():
    """Gold sums run over word sets: their order must not change a float (ties decide wins)."""
    code = ("import random; from openrlhf_lsc.lab import world; rng = random.Random(1); "
            "ps = world.make_prompts(0)[:40]; ds = [world.demonstrate(p, rng) for p in ps for _ in range(5)]; "
            "print(repr([(world.gold_helpful(p, d), world.gold_harmless(p, d)) for p, d in zip([p for p in ps for _ in range(5)], ds)]))")
    outs = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                           capture_output=True, text=True, check=True).stdout for seed in ("1", "2", "3")}
    assert len(outs) == 1


def test_sampled_responses_always_end_with_one_eos():
    """Responses still open at the length limit are closed with EOS there: the reward models always read an EOS."""
    policy = models.new_policy(0, hidden=32)  # untrained: EOS is rare, most responses hit the limit
    prompts = models.encode_prompts([p.text for p in world.make_prompts(0)[:64]])
    responses = models.sample(policy, prompts, torch.Generator().manual_seed(0))
    assert ((responses == models.EOS).sum(1) == 1).all()
    assert (responses[:, -1] == models.EOS).float().mean() > 0.5
    eos_at = (responses == models.EOS).float().argmax(1)
    assert (models.action_mask(responses).sum(1) == eos_at + 1).all()  # the actions run up to and including the EOS


def test_monitor_is_recorded_and_does_not_change_the_run(lab):
    out, results = lab
    rec = next(read_json(os.path.join(out, "world0", "runs", n)) for n in sorted(os.listdir(os.path.join(out, "world0", "runs")))
               if "single-helpful-raw" in n)
    mon, h = rec["monitor"], rec["history"]
    assert mon["window"] == 5 and mon["patience"] == 3 and mon["noise_sd"] == MONITOR_NOISE
    assert all(math.isfinite(x[k]) for x in h for k in ("gold/helpful", "monitor/signal/evaluator", "monitor/signal/proxy"))
    assert h[0]["monitor/signal/evaluator"] == 0.0 == h[0]["monitor/signal/proxy"]  # gains from the first step
    assert "monitor" in results and "## Over-optimisation monitor" in open(os.path.join(out, "report.md")).read()
    # the same run without the monitor: its noise and gold scoring draw nothing from PPO's generators
    lab_, sft, rms, refs, pools, _ = load_world(out, CFG, 0)
    run = rec["run"]
    pipe = ppo.RewardPipeline([rms[p] for p in run["properties"]], run["properties"], [{}] * refs["train_prompts"],
                                 run["transform"], run["aggregate"], run["weights"])
    pcfg = ppo.PPOConfig(**{k: (tuple(v) if k == "kl_targets" else v) for k, v in rec["ppo"].items()})
    plain = ppo.train(sft, lab_prompt_ids(lab_), pipe, pcfg, seed=1000 + run["seed"], progress=False).history
    assert [x["utility"] for x in plain] == [x["utility"] for x in h]
    assert [x["kl"] for x in plain] == [x["kl"] for x in h]


def test_a_process_keeps_the_models_of_one_world_only(lab, tmp_path):
    """The driver loads every world in turn (check, tuning, analysis): the previous world's models must go."""
    out, _ = lab
    os.symlink(os.path.join(out, "world0"), tmp_path / "world0")  # a second world on disk without building one
    first = load_world(out, CFG, 0)
    sft = weakref.ref(first[1])
    second = load_world(str(tmp_path), CFG, 0)
    assert second[1] is not first[1]
    del first
    gc.collect()
    assert sft() is None, "the first world's SFT policy is still held"
    assert load_world(str(tmp_path), CFG, 0) is second  # the world in use stays loaded


def _history(gold, kl):
    return [{"gold/helpful": g, "kl": k} for g, k in zip(gold, kl)]


def test_monitor_summary_reads_peak_stop_and_gold_lost_by_hand():
    gold = [0, 2, 4, 6, 8, 6, 4, 2, 0, 0]  # peaks at step 4
    kl = list(range(10))
    run = {"split": "test", "experiment": "single", "properties": ["helpful"], "method": "raw", "seed": 0}
    mon = {"window": 2, "patience": 3, "fired_step": 7, "gold_sft_sd": {"helpful": 2.0}}
    never = dict(mon, fired_step=None)
    records = {(0, "a"): {"run": run, "history": _history(gold, kl), "monitor": mon},
               (0, "b"): {"run": run, "history": _history(gold, kl), "monitor": never},
               (0, "c"): {"run": dict(run, split="val"), "history": _history(gold, kl), "monitor": mon},
               (0, "d"): {"run": run, "history": _history(gold, kl)}}  # a run made before the monitor existed
    # moving averages (window 2) in SFT sd units: gold [0.5, 1.5, 2.5, 3.5, 3.5, 2.5, 1.5, 0.5, 0], kl [0.5 ... 8.5]
    got = monitor_summary(records)
    assert list(got) == ["single helpful raw"]
    assert got["single helpful raw"] == {
        "runs": 2, "fired": 1, "fired_after_peak": 1,
        "kl_peak_median": 3.5,  # the first of the equal maxima: window ending at step 4
        "kl_stop_median": 6.5,  # fired at step 7: the window ending there starts at step 6
        "gold_lost_with_monitor": pytest.approx(((3.5 - 1.5) + (3.5 - 0.0)) / 2),  # the unfired run trains to the end
        "gold_lost_without": pytest.approx(3.5)}


def test_best_of_k_goes_through_rerank_and_tunes_the_weight_on_validation(lab):
    out, _ = lab
    lab_, _, _, refs, pools, thr = load_world(out, CFG, 0)
    bok = best_of_k(lab_, pools, refs, [1, pools["bon_proxy_helpful"].shape[1]], [0.2, 0.8], thr)
    win = wins(pools["bon_gold_helpful"], pools["bon_gold_harmless"], thr)["win_both"]
    n_val = len(lab_.val_prompts)
    # k = 1 keeps a uniformly random candidate whatever the utility: every method scores the pool's mean win
    for m in bok["methods"].values():
        np.testing.assert_allclose(np.concatenate([m["val"][0], m["test"][0]]), win.mean(1), atol=1e-12)
    # k = pool size with replacement is not the argmax, but its limit orders like it: raw helpful alone, by hand
    proxy = pools["bon_proxy_helpful"]
    probs = bon_pick_probs(proxy, proxy.shape[1])
    np.testing.assert_allclose(bok["methods"]["raw helpful"]["test"][1], (probs * win).sum(1)[n_val:], atol=1e-12)
    # the summary takes, per k, the weight with the better validation mean and compares it on the test prompts
    fake = {"k": [1, 2], "kl_formula": [0.0, 0.19], "methods": {
        "lsc AND": {"val": np.array([[0.5, 0.5], [0.6, 0.6]]), "test": np.array([[0.5, 0.5], [0.7, 0.9]])},
        "weighted w=0.2": {"val": np.array([[0.5, 0.5], [0.9, 0.9]]), "test": np.array([[0.5, 0.5], [0.1, 0.1]])},
        "weighted w=0.8": {"val": np.array([[0.5, 0.5], [0.1, 0.1]]), "test": np.array([[0.5, 0.5], [0.9, 0.9]])},
        "raw helpful": {"val": np.zeros((2, 2)), "test": np.array([[0.5, 0.5], [0.8, 0.8]])}}}
    s = best_of_k_summary([fake], [0.2, 0.8], 200)
    assert s["methods"]["lsc AND"]["win_both"] == pytest.approx([0.5, 0.8])
    tuned = s["diffs"]["lsc AND - weighted (weight tuned on val)"]
    assert tuned[1]["mean"] == pytest.approx(0.7) and tuned[0] == {"mean": 0.0, "lo": 0.0, "hi": 0.0}
    assert s["tuned_weight"] == [[0.2, 0.2]]  # a tie at k = 1 goes to the first weight; w = 0.2 won val at k = 2
    raw = s["diffs"]["lsc AND - raw helpful"][1]
    assert raw["mean"] == pytest.approx(0.0) and raw["lo"] == pytest.approx(-0.1) and raw["hi"] == pytest.approx(0.1)
