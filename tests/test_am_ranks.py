"""Advantage Model statistics across 2 data-parallel ranks on CPU (gloo, torch.multiprocessing spawn).

- the AM loss's running per-task statistics are updated with the global batch, so both ranks hold the same
  values, equal to one process seeing both ranks' batches (numpy), even when a rank's batch lacks a task;
- the evaluation metrics count each pair once although OpenRLHF's DistributedSampler pads the last batch of
  a rank with repeated pairs: 2 ranks give exactly the metrics of 1 process over the evaluation set;
- the statistics travel through a checkpoint (the trainer restores them from the loaded client states).
"""

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from am_ranks_worker import MOMENTUM, N_EVAL, STEPS, TASKS, eval_scores, free_port, worker

from openrlhf_lsc.am_loss import AdvantageModelLoss, pairwise_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(2, free_port(), str(tmp_path_factory.mktemp("am_ranks")), out), nprocs=2, join=True)
        return dict(out)


def _numpy_running():
    """One process, both ranks' pairs per step: EMA of each task's score mean and mean square."""
    running = {}
    for step in STEPS:
        pairs = step[0] + step[1]
        for task in TASKS:
            scores = np.array([v for t, c, r in pairs if t == task for v in (c, r)], dtype=np.float32).astype(float)
            if len(scores):
                new = np.array([scores.mean(), (scores**2).mean()])
                running[task] = (1 - MOMENTUM) * running.get(task, new) + MOMENTUM * new
    return running


def test_running_statistics_are_the_global_batch_ones_on_every_rank(two_ranks):
    expected = _numpy_running()
    for rank in (0, 1):
        got = two_ranks[rank]["running"]
        assert sorted(got) == TASKS  # rank 0 never saw "c" and still tracks it
        for task in TASKS:
            np.testing.assert_allclose(got[task], expected[task], rtol=1e-12)


def test_without_the_all_reduce_ranks_drift_apart(two_ranks):
    alone = [two_ranks[rank]["alone"] for rank in (0, 1)]
    assert sorted(alone[0]) == ["a", "b"] and sorted(alone[1]) == ["b", "c"]
    assert not np.allclose(alone[0]["b"], alone[1]["b"])


def test_eval_metrics_count_each_pair_once(two_ranks):
    assert two_ranks[0]["seen"] + two_ranks[1]["seen"] == N_EVAL + 1  # the sampler did pad one pair
    scores = [eval_scores(i) for i in range(N_EVAL)]
    single = pairwise_metrics(torch.tensor([s[0] for s in scores]), torch.tensor([s[1] for s in scores]),
                              [s[2] for s in scores])
    for rank in (0, 1):
        assert two_ranks[rank]["eval"] == single and two_ranks[rank]["eval"]["n_pairs"] == N_EVAL


def test_statistics_saved_in_checkpoint_and_restored(two_ranks):
    """The client states the trainer hands to DeepSpeed's checkpoint are what a resumed trainer starts from."""
    saved = two_ranks[0]["saved"]
    assert saved["consumed_samples"] == 8 and saved == two_ranks[1]["saved"]
    for rank in (0, 1):
        assert two_ranks[rank]["restored"] == two_ranks[0]["running"]
    fresh = AdvantageModelLoss(task_names=TASKS, all_reduce=lambda t: t)
    fresh.load_state_dict(saved["lsc_am_loss"])
    assert fresh.running == two_ranks[0]["running"]
