"""The BT-vs-AM experiment: the accuracy-matching rule against hand-worked examples, and a smoke run (tiny sizes):
files, plot, finite numbers, the matching as recorded, per-task label noise, verdicts from lab.stats, resume.
Not which proxy wins."""

import dataclasses
import json
import math
import os

import matplotlib.image
import numpy as np
import pytest

from openrlhf_lsc.lab import am_vs_bt as amb
from openrlhf_lsc.lab import stats
from lab_checks import numbers


CFG = amb.PRESETS["smoke"]


def test_matching_rule_hand_examples():
    # Target = min(best of bt 0.70, best of am 0.64) = 0.64. bt: |0.60-0.64| = 0.04, |0.70-0.64| = 0.06,
    # |0.66-0.64| = 0.02 -> checkpoint 2; am reaches 0.64 at checkpoint 2.
    assert amb.match_checkpoints({"bt": [0.60, 0.70, 0.66], "am": [0.55, 0.62, 0.64]}) == (0.64, {"bt": 2, "am": 2})
    # The proxy that gets there first is stopped early: target 0.65 (am's best, first at checkpoint 1); bt is
    # closest at its first checkpoint (0.05 away; 0.72 is 0.07 away).
    assert amb.match_checkpoints({"bt": [0.70, 0.72], "am": [0.60, 0.65, 0.65, 0.61]}) == (0.65, {"bt": 0, "am": 1})
    # Equally close checkpoints (exact in binary: eighths): the earliest. Target 6/8; bt's 5/8 and 7/8 tie.
    assert amb.match_checkpoints({"bt": [3 / 8, 5 / 8, 7 / 8], "am": [6 / 8]}) == (0.75, {"bt": 1, "am": 0})
    # Three proxies; one proxy alone takes its first best checkpoint.
    assert amb.match_checkpoints({"a": [0.5, 0.8, 0.6], "b": [0.55, 0.58], "c": [0.7, 0.59]}) == (0.58, {"a": 2, "b": 1, "c": 1})
    assert amb.match_checkpoints({"a": [0.5, 0.75, 0.75]}) == (0.75, {"a": 1})
    with pytest.raises(ValueError, match="at least one checkpoint"):
        amb.match_checkpoints({"bt": [0.6], "am": []})


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("am_vs_bt"))
    return out, amb.run(out, CFG)


@pytest.mark.slow
def test_files_plot_and_finite_numbers(done):
    out, results = done
    for name in ("am_vs_bt.md", "am_vs_bt.json", "config.json", "world0/proxies/s0/bt/model.safetensors",
                 "world0/proxies/s0/am/model.safetensors", "world0/proxies/s0/am_task0/model.safetensors"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    image = matplotlib.image.imread(os.path.join(out, "am_vs_bt.png"))
    assert image.ndim == 3 and image.shape[0] > 100 and image[..., :3].std() > 0.01
    assert "](am_vs_bt.png)" in open(os.path.join(out, "am_vs_bt.md")).read()
    with open(os.path.join(out, "am_vs_bt.json")) as f:
        on_disk = json.load(f)
    assert all(math.isfinite(x) for x in numbers(on_disk))  # unreached KLs are null, not NaN
    assert len(on_disk["runs"]) == len(amb.PROXIES) * len(CFG.seeds) * len(CFG.worlds)
    for run in on_disk["runs"]:
        assert len(run["stairs"]) == len(CFG.kl_targets)
        assert all(0.0 <= x <= 1.0 for st in run["stairs"] for x in st["win"])


@pytest.mark.slow
def test_matching_as_recorded(done):
    """Each world/seed's matched epochs are the rule applied to the recorded validation curves, and the saved proxy
    is that checkpoint: its test accuracy is the curve's at that epoch."""
    out, results = done
    for rec in results["proxies"]:
        curves = {n: [c["val_accuracy"] for c in p["curve"]] for n, p in rec["proxies"].items()}
        target, chosen = amb.match_checkpoints(curves)
        assert rec["target_val_accuracy"] == target
        for n, p in rec["proxies"].items():
            assert p["epoch"] == chosen[n] + 1 and len(p["curve"]) == CFG.rm_epochs
            assert p["test"]["accuracy"] == pytest.approx(p["curve"][chosen[n]]["test_accuracy"])
            assert p["test"]["ece"] == pytest.approx(p["curve"][chosen[n]]["test_ece"])


@pytest.mark.slow
def test_label_noise_differs_per_task(done):
    _, results = done
    agree = results["label_agreement_with_gold"]["0"]["train"]
    assert agree["code"] > agree["qa"] > 0.5  # T_code < T_qa: code labels follow the gold more often


@pytest.mark.slow
def test_verdicts_come_from_lab_stats(done):
    _, results = done
    assert {c["claim"] for c in results["comparisons"]} == {"A1", "A2", "info"}
    for c in results["comparisons"]:
        intervals = [(p["lo"], p["hi"]) if p["reached"] and p["lo"] is not None else None for p in c["per_target"]]
        assert c["verdict"] == stats.verdict(intervals, c["margin"])
    for key, claim in results["claims"].items():
        assert claim["verdict"] == stats.combine([c["verdict"] for c in results["comparisons"] if c["claim"] == key])
    # The accuracy row is the lab's bootstrap of per-test-pair correctness, AM minus BT, paired by pair.
    out = done[0]
    rec = json.load(open(os.path.join(out, "world0", "proxies", "s0.json")))["proxies"]
    diff = np.array([rec["am"]["test_correct"]]) - np.array([rec["bt"]["test_correct"]])
    row = next(c for c in results["comparisons"] if c["label"].startswith("test accuracy: AM - BT"))
    want = stats.bootstrap([diff], CFG.bootstrap, seed=row["bootstrap_seed"] * 100)
    assert (row["per_target"][0]["lo"], row["per_target"][0]["hi"]) == (want["lo"], want["hi"])


@pytest.mark.slow
def test_resume_rewrites_nothing(done):
    out, results = done
    runs_dir = os.path.join(out, "world0", "runs")
    mtimes = {f: os.path.getmtime(os.path.join(runs_dir, f)) for f in os.listdir(runs_dir)}
    again = amb.run(out, CFG)
    assert {f: os.path.getmtime(os.path.join(runs_dir, f)) for f in mtimes} == mtimes
    assert again["comparisons"] == results["comparisons"]
    with pytest.raises(ValueError, match="different configuration"):
        amb.run(out, dataclasses.replace(CFG, rm_epochs=3))
