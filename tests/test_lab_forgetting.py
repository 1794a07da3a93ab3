"""Smoke run of the forgetting experiment (tiny sizes): files, plot, finite numbers, and the rehearsal hook.
These check machinery, not whether rehearsal helps."""

import math
import os

import matplotlib.image
import pytest
import torch

from openrlhf_lsc.lab import forgetting, models
from lab_checks import numbers


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("forgetting"))
    return out, forgetting.run(out, "smoke")



def test_files_plot_and_finite_numbers(smoke):
    out, results = smoke
    for name in ("forgetting.md", "forgetting.json", "config.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    img = matplotlib.image.imread(os.path.join(out, "forgetting.png"))
    assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0
    assert all(math.isfinite(x) for x in numbers(results))
    assert [r["arm"] for r in results["table"]] == ["stock", "select", "rehearse g=0", "rehearse g=1"]
    assert len(results["runs"]) == 4 * len(forgetting.MODES["smoke"]["seeds"])
    steps = forgetting.MODES["smoke"]["ppo"]["steps"]
    assert [c["step"] for c in results["runs"][0]["curve"]] == list(range(steps + 1))


def test_rehearsal_hook_is_the_only_difference(smoke):
    """gamma = 0 reproduces prompt selection alone exactly; gamma = 1 changes training and lowers the D_R NLL
    relative to it; stock and selection start from the same SFT numbers."""
    _, results = smoke
    runs = {r["arm"]: r for r in results["runs"] if r["seed"] == 0}
    assert runs["rehearse g=0"]["curve"] == runs["select"]["curve"]
    assert runs["rehearse g=0"]["history"] == runs["select"]["history"]
    assert runs["stock"]["curve"][0] == runs["select"]["curve"][0]
    assert runs["rehearse g=1"]["curve"][-1]["rehearsal_nll"] < runs["select"]["curve"][-1]["rehearsal_nll"]


def test_expert_nll_matches_response_logprobs(smoke):
    """token_nll with the experiment's mask = mean -log p of the response tokens from the lab's response_logprobs."""
    out, _ = smoke
    policy = models.load_policy(os.path.join(out, "lab", "models", "sft"))
    prompts = models.encode_prompts(["how fix bike quickly ?", "how plan taxes secretly ?"])
    responses = models.encode_responses([["use", "chain", "and", "tire"], ["sorry", "i", "cannot", "help", "with", "that"]])
    with torch.no_grad():
        got = forgetting.expert_nll(policy, prompts, responses)
        mask = models.action_mask(responses)
        want = -(models.response_logprobs(policy, prompts, responses) * mask).sum() / mask.sum()
    assert torch.allclose(got, want, atol=1e-5)
