"""End-to-end: OpenRLHF's real `train_ppo_ray` on CPU through the plugin CLI, LSC + AND over two reward models.

Each run is `tests/cpu_harness/driver.py` in a subprocess (Ray with logical GPUs, an HF-generate stand-in
for vLLM, 2 PPO steps of 2 prompts x 2 samples on tiny models). The checks do not use the plugin's code:
the reward models are re-scored here with plain HF (base model + value head), the references are read
from the prompt file or taken as numpy quantiles of the group, and u = sum_k log sigmoid(r_k - ref_k) is
computed with numpy. Compared against the plugin's `--lsc.dump_rewards` lines, the return OpenRLHF
computed from the reward it trained on (recorded by `cpu_harness.worker_shims`) and the logged reward.
"""

import ast
import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForSequenceClassification

from cpu_harness import tiny_models

pytestmark = pytest.mark.e2e

DRIVER = Path(__file__).resolve().parent / "cpu_harness" / "driver.py"
ROLLOUT_BATCH, N_SAMPLES, STEPS = 2, 2, 2  # prompts per step, samples per prompt, PPO steps
RUN_TIMEOUT = 900
# Rewards are bf16 (OpenRLHF's --ds.param_dtype): allow a few bf16 ulps between the reward actor's
# padded micro-batches and the unpadded re-scoring here. Mapping errors are O(1).
REWARD_ATOL = 0.02


def _jsonl(path: Path) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def _start(models: Path, out: Path, lsc_flags: list) -> tuple:
    """Start the driver on one configuration; `_finish` collects it."""
    flags = [
        "--actor.model_name_or_path", str(models / "policy"),
        "--lsc.reward_models", f"{models / 'rm_a'},{models / 'rm_b'}",
        "--lsc.reward_names", ",".join(tiny_models.REWARD_MODELS),
        "--lsc.transform", "lsc", "--lsc.aggregate", "and",
        "--lsc.dump_rewards", str(out / "dump.jsonl"),
        *lsc_flags,
        "--data.prompt_dataset", str(models / "prompts.jsonl"), "--data.input_key", "input",
        "--data.max_samples", str(STEPS * ROLLOUT_BATCH),
        "--rollout.batch_size", str(ROLLOUT_BATCH), "--rollout.n_samples_per_prompt", str(N_SAMPLES),
        "--train.batch_size", str(ROLLOUT_BATCH * N_SAMPLES),  # one optimizer step per rollout
        "--rollout.micro_batch_size", "2", "--train.micro_batch_size", "2",  # padded micro-batches
        "--rollout.max_new_tokens", "8", "--data.max_len", "64",
        "--actor.num_gpus_per_node", "1", "--reward.num_gpus_per_node", "1",
        "--vllm.num_engines", "1", "--vllm.sync_backend", "gloo",
        "--ds.attn_implementation", "eager",
        "--algo.advantage.estimator", "reinforce", "--algo.kl.init_coef", "0",  # return == reward used
        "--actor.adam.lr", "1e-3", "--reward.clip_range", "-100", "100",
        "--ckpt.output_dir", str(out / "actor"), "--ckpt.path", str(out / "ckpt"),
    ]
    cmd = [sys.executable, str(DRIVER), "--returns", str(out / "returns.jsonl"),
           "--engine-checksums", str(out / "engine_checksums.json"), "--", *flags]
    # Own session: on timeout the driver and the Ray processes it started go together.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return proc, out, time.time()


def _finish(proc: subprocess.Popen, out: Path, start: float) -> dict:
    """Wait for a driver; return the plugin's dump, OpenRLHF's returns, the logged step status and timings."""
    try:
        log, _ = proc.communicate(timeout=max(1.0, start + RUN_TIMEOUT - time.time()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"train_ppo_ray did not finish in {RUN_TIMEOUT}s:\n{log[-5000:]}")
    seconds = time.time() - start
    (out / "log.txt").write_text(log)
    assert proc.returncode == 0, f"driver failed ({proc.returncode}):\n{log[-8000:]}"
    status = {int(m[1]): ast.literal_eval(m[2]) for m in re.finditer(r"Global step (\d+): (\{.*\})", log)}
    print(f"\n{out.name}: {seconds:.0f}s wall, step timings "
          + ", ".join(f"{s}: {v['timing/step_total']:.1f}s" for s, v in sorted(status.items())))
    return {"dump": _jsonl(out / "dump.jsonl"), "returns": _jsonl(out / "returns.jsonl"), "status": status,
            "engine_checksums": json.loads((out / "engine_checksums.json").read_text()), "out": out}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return tiny_models.build(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory) -> dict:
    """Both trainings, started together: their start-ups (imports, Ray) overlap on 2 cores.
    The group run also rehearses expert pairs (Selective Rehearsal's loss in the actor step)."""
    rehearsal = tmp_path_factory.mktemp("rehearsal") / "d_r.jsonl"
    with open(rehearsal, "w") as f:
        for i in range(4):
            f.write(json.dumps({"input": f"what is {tiny_models.WORDS[i]} plus one?", "output": " the answer is two"}) + "\n")
    started = {
        "label": _start(models, tmp_path_factory.mktemp("label_run"),
                        ["--lsc.reference", "label", "--data.label_key", tiny_models.LABEL_KEY]),
        "group": _start(models, tmp_path_factory.mktemp("group_run"),
                        ["--lsc.reference", "group", "--lsc.quantile", "0.5",
                         "--lsc.rehearsal.dataset", str(rehearsal), "--lsc.rehearsal.coef", "0.01"]),
    }
    try:
        return {name: _finish(*run) for name, run in started.items()}
    finally:
        for proc, _, _ in started.values():
            if proc.poll() is None:  # the other run, when one failed
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def score(models):
    """Plain-HF re-scoring: value head on the last token's hidden state (no padding), per reward model."""
    rms = [
        LlamaForSequenceClassification.from_pretrained(
            models / folder, dtype=torch.bfloat16, attn_implementation="eager"
        ).eval()
        for folder, _ in tiny_models.REWARD_MODELS.values()
    ]

    @torch.no_grad()
    def score(sequence: list) -> np.ndarray:
        ids = torch.tensor([sequence])
        return np.array([float(rm.score(rm.model(input_ids=ids).last_hidden_state)[0, -1]) for rm in rms])

    return score


@pytest.fixture(scope="module")
def prompt_of(models):
    """Map a sequence to the prompt row it starts with (prompts are tokenized as OpenRLHF's executor does)."""
    tokenizer = AutoTokenizer.from_pretrained(models / "policy")
    rows = _jsonl(models / "prompts.jsonl")
    ids = [tokenizer(row["input"], add_special_tokens=False)["input_ids"] for row in rows]

    def prompt_of(sequence: list) -> dict:
        (row,) = [row for row, p in zip(rows, ids) if sequence[: len(p)] == p]
        return row

    return prompt_of


def _label_references(rows: list, rewards: np.ndarray, prompt_of) -> np.ndarray:
    """[n, K] references read from the prompt file, for the prompt each sequence starts with."""
    labels = [prompt_of(r["sequence"])[tiny_models.LABEL_KEY] for r in rows]
    return np.array([[label[name]["reference"] for name in tiny_models.REWARD_MODELS] for label in labels])


def _group_references(rows: list, rewards: np.ndarray, prompt_of) -> np.ndarray:
    """[n, K] references: the median of each prompt's N_SAMPLES rewards (samples come prompt by prompt)."""
    for i in range(0, len(rows), N_SAMPLES):
        assert len({prompt_of(r["sequence"])["input"] for r in rows[i : i + N_SAMPLES]}) == 1, "a group mixes prompts"
    medians = np.quantile(rewards.reshape(-1, N_SAMPLES, rewards.shape[1]), 0.5, axis=1)
    return np.repeat(medians, N_SAMPLES, axis=0)


def _check_run(run: dict, score, prompt_of, references_for) -> None:
    """The shared checks; `references_for(step_rows, my_rewards, prompt_of)` gives independent [n, K] references."""
    dump = run["dump"]
    assert sorted({r["step"] for r in dump}) == list(range(1, STEPS + 1))
    returns = {(r["step"], tuple(r["sequence"])): r["return"] for r in run["returns"]}
    assert len(run["returns"]) == len(dump) == STEPS * ROLLOUT_BATCH * N_SAMPLES
    for step in range(1, STEPS + 1):
        rows = sorted((r for r in dump if r["step"] == step), key=lambda r: r["sample"])
        rewards = np.stack([score(r["sequence"]) for r in rows])
        np.testing.assert_allclose([r["rewards"] for r in rows], rewards, atol=REWARD_ATOL, rtol=0)
        references = references_for(rows, rewards, prompt_of)
        np.testing.assert_allclose([r["references"] for r in rows], references, atol=REWARD_ATOL, rtol=0)

        # Exact part: the transform of the rewards/references the plugin saw, computed with numpy.
        dumped = np.array([r["utility"] for r in rows])
        expected = _log_sigmoid(np.array([r["rewards"] for r in rows]) - np.array([r["references"] for r in rows]))
        np.testing.assert_allclose(dumped, expected.sum(1), rtol=1e-5, atol=1e-5)
        # What the trainer optimised: reinforce, no KL, no clipping -> the return is the reward used.
        trained = np.array([returns[(step, tuple(r["sequence"]))] for r in rows])
        np.testing.assert_allclose(trained, dumped, rtol=1e-5, atol=1e-5)
        # End to end, from the independent rewards and references (K terms of slope <= 1 each).
        independent = _log_sigmoid(rewards - references).sum(1)
        np.testing.assert_allclose(trained, independent, atol=2 * 2 * REWARD_ATOL, rtol=0)
        np.testing.assert_allclose(run["status"][step]["rollout/reward_mean"], independent.mean(), atol=4 * REWARD_ATOL)
        # The transform is doing something here: utilities are neither raw rewards nor saturated.
        assert np.all(independent < 0) and np.ptp(independent) > 0.1


def test_label_reference_lsc_and_matches_independent_computation(runs, score, prompt_of):
    _check_run(runs["label"], score, prompt_of, _label_references)


def test_group_reference_lsc_and_matches_independent_computation(runs, score, prompt_of):
    _check_run(runs["group"], score, prompt_of, _group_references)


def test_rehearsal_loss_is_logged_finite_each_step(runs):
    status = runs["group"]["status"]
    assert sorted(status) == list(range(1, STEPS + 1))
    for step in status.values():
        assert np.isfinite(step["rehearsal_nll"]) and step["rehearsal_nll"] > 0
        assert step["rehearsal_coef"] == pytest.approx(0.01)  # logged through experience.info: float32
    assert all("rehearsal_nll" not in step for step in runs["label"]["status"].values())


@pytest.mark.parametrize("corruption", ["reward_models_swapped", "trainer_used_another_samples_reward"])
def test_checks_fail_on_a_corrupted_run(runs, score, prompt_of, corruption):
    """The checks above can fail: on the label run with its reward models or its returns mixed up."""
    run = copy.deepcopy(runs["label"])
    if corruption == "reward_models_swapped":
        for row in run["dump"]:
            row["rewards"].reverse()
    else:
        returns = [row["return"] for row in run["returns"]]
        for row, value in zip(run["returns"], returns[1:] + returns[:1]):
            row["return"] = value
    with pytest.raises(AssertionError):
        _check_run(run, score, prompt_of, _label_references)


def test_engine_generates_with_the_trained_actor_weights(runs, models):
    """Weight sync (gloo broadcast into the fake engine) left the engine equal to the saved actor."""

    def checksum(path: Path) -> float:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        return float(sum(p.detach().double().sum() for p in model.parameters()))

    trained = checksum(runs["label"]["out"] / "actor")
    assert runs["label"]["engine_checksums"] == pytest.approx([trained], rel=1e-12)
    assert trained != pytest.approx(checksum(models / "policy"), rel=1e-6)  # training moved the weights
