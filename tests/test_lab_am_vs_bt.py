"""Smoke run of the BT-vs-AM lab experiment (tiny sizes): files, plot, finite numbers, and the machinery
(win rate vs SFT against a brute-force count, per-task label noise, resume). Not which proxy wins."""

import dataclasses
import json
import math
import os

import matplotlib.image
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_lsc.lab import am_vs_bt as amb
from lab_checks import numbers

pytestmark = pytest.mark.slow

CFG = amb.PRESETS["smoke"]


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("am_vs_bt"))
    return out, amb.run(out, CFG)



def test_files_plot_and_finite_numbers(done):
    out, results = done
    for name in ("am_vs_bt.md", "am_vs_bt.json", "config.json", "proxies/bt/model.safetensors", "proxies/am/model.safetensors"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    image = matplotlib.image.imread(os.path.join(out, "am_vs_bt.png"))
    assert image.ndim == 3 and image.shape[0] > 100 and image[..., :3].std() > 0.01
    assert "](am_vs_bt.png)" in open(os.path.join(out, "am_vs_bt.md")).read()
    with open(os.path.join(out, "am_vs_bt.json")) as f:
        on_disk = json.load(f)
    assert all(math.isfinite(x) for x in numbers(on_disk))
    assert len(on_disk["runs"]) == len(amb.PROXIES) * len(CFG.kl_grid) * len(CFG.ppo_seeds)
    for run in on_disk["runs"]:
        assert all(0.0 <= t["win_vs_sft"] <= 1.0 for t in run["per_task"].values())
        gains = [run["per_task"][t]["proxy_gain"] for t in amb.TASKS]
        if sum(gains) > 0:
            assert run["drift_code_share"] == pytest.approx(gains[0] / sum(gains))


def _brute_win(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = []
    for row_a, row_b in zip(a, b):
        s = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in row_a for y in row_b)
        out.append(s / (len(row_a) * len(row_b)))
    return np.array(out)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5), st.integers(0, 10_000))
def test_win_rate_vs_sft_matches_brute_force(p, n, m, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 3, (p, n)).astype(float), rng.integers(0, 3, (p, m)).astype(float)  # many ties
    np.testing.assert_allclose(amb.win_rate_vs(a, b), _brute_win(a, b))
    np.testing.assert_allclose(amb.win_rate_vs(a, a), 0.5)  # a policy equal to SFT wins half the time


def test_label_noise_differs_per_task_and_resume(done):
    out, results = done
    agree = results["label_agreement_with_gold"]
    assert agree["code"] > agree["qa"] > 0.5  # T_code < T_qa: code labels follow the gold more often
    mtimes = {f: os.path.getmtime(os.path.join(out, "runs", f)) for f in os.listdir(os.path.join(out, "runs"))}
    again = amb.run(out, CFG)  # resumes: nothing retrained, same results
    assert {f: os.path.getmtime(os.path.join(out, "runs", f)) for f in mtimes} == mtimes
    assert again["rows"] == results["rows"]
    with pytest.raises(ValueError, match="different configuration"):
        amb.run(out, dataclasses.replace(CFG, rm_epochs=2))
