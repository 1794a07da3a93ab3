"""End-to-end: OpenRLHF's real `train_ppo_ray` on CPU through the plugin CLI, LSC over two rewards per sample.

Each run is `tests/cpu_harness/driver.py` in a subprocess (Ray with logical GPUs, an HF-generate stand-in
for vLLM, 2 PPO steps of 2 prompts x 2 samples on tiny models), with one of the reward sources: two local
reward models (label or group references; also under a real `ray job submit`), a `.py` reward_func and an agent
returning two named rewards (async training with dynamic filtering; colocated models, weighted AND). The checks
do not use the plugin's code: reward models are re-scored here with plain HF (base model + value head), named
rewards recomputed from the decoded tokens, references read from the prompt file or taken as numpy quantiles
of the group, and u = sum_k w_k log sigmoid(r_k - ref_k) computed with numpy. Compared against the plugin's
`--lsc.dump_rewards` lines, the return OpenRLHF computed from the reward it trained on (recorded by
`cpu_harness.worker_shims`) and the logged reward.
"""

import ast
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForSequenceClassification

from cpu_harness import tiny_models

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

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


HARNESS = Path(__file__).resolve().parent / "cpu_harness"
WEIGHTS = (0.5, 2.0)  # the agent run's weighted AND


def _flags(models: Path, out: Path, source_flags: list) -> list:
    return [
        "--actor.model_name_or_path", str(models / "policy"),
        "--lsc.transform", "lsc",
        "--lsc.dump_rewards", str(out / "dump.jsonl"),
        *source_flags,
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


def local_rms(models: Path) -> list:
    return ["--lsc.reward_models", f"{models / 'rm_a'},{models / 'rm_b'}",
            "--lsc.reward_names", ",".join(tiny_models.REWARD_MODELS), "--lsc.aggregate", "and"]


def _start(models: Path, out: Path, source_flags: list) -> tuple:
    """Start the driver on one configuration; `_finish` collects it."""
    cmd = [sys.executable, str(DRIVER), "--returns", str(out / "returns.jsonl"),
           "--engine-checksums", str(out / "engine_checksums.json"), "--", *_flags(models, out, source_flags)]
    # Own session: on timeout the driver and the Ray processes it started go together.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return proc, out, time.time()


def _finish(proc: subprocess.Popen, out: Path, start: float) -> dict:
    """Wait for a driver; return what `_collect` reads."""
    try:
        log, _ = proc.communicate(timeout=max(1.0, start + RUN_TIMEOUT - time.time()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"train_ppo_ray did not finish in {RUN_TIMEOUT}s:\n{log[-5000:]}")
    seconds = time.time() - start
    (out / "log.txt").write_text(log)
    assert proc.returncode == 0, f"driver failed ({proc.returncode}):\n{log[-8000:]}"
    return _collect(out, log, seconds)


def _collect(out: Path, log: str, seconds: float) -> dict:
    """The plugin's dump, OpenRLHF's returns and the logged step status of a finished run."""
    status = {int(m[1]): ast.literal_eval(m[2]) for m in re.finditer(r"Global step (\d+): (\{.*\})", log)}
    print(f"\n{out.name}: {seconds:.0f}s wall, step timings "
          + ", ".join(f"{s}: {v['timing/step_total']:.1f}s" for s, v in sorted(status.items())))
    checksums = out / "engine_checksums.json"
    return {"dump": _jsonl(out / "dump.jsonl"), "returns": _jsonl(out / "returns.jsonl"), "status": status,
            "engine_checksums": json.loads(checksums.read_text()) if checksums.exists() else None, "out": out}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return tiny_models.build(tmp_path_factory.mktemp("models"))


def negated_judge(models: Path, dest: Path) -> Path:
    """An evaluator reward model scoring exactly -A (rm_a's value head negated; bf16 negation is exact), so the
    monitor's numbers can be recomputed from the dumped proxy rewards. A test device, not a held-out model."""
    rm = LlamaForSequenceClassification.from_pretrained(models / "rm_a")
    with torch.no_grad():
        rm.score.weight.neg_()
    rm.save_pretrained(dest)
    AutoTokenizer.from_pretrained(models / "rm_a").save_pretrained(dest)
    return dest


MONITOR_PATTERNS = [r"question=\?", r"two=\btwo\b"]


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory) -> dict:
    """Both trainings, started together: their start-ups (imports, Ray) overlap on 2 cores.
    The label run is watched by the over-optimisation monitor (one evaluator RM in the reward actor); the group
    run also rehearses expert pairs (Selective Rehearsal's loss in the actor step)."""
    judge = negated_judge(models, tmp_path_factory.mktemp("judge") / "judge")
    rehearsal = tmp_path_factory.mktemp("rehearsal") / "d_r.jsonl"
    with open(rehearsal, "w") as f:
        for i in range(4):
            f.write(json.dumps({"input": f"what is {tiny_models.WORDS[i]} plus one?", "output": " the answer is two"}) + "\n")
    started = {
        "label": _start(models, tmp_path_factory.mktemp("label_run"),
                        [*local_rms(models), "--lsc.reference", "label", "--data.label_key", tiny_models.LABEL_KEY,
                         "--lsc.monitor.reward_models", str(judge), "--lsc.monitor.patterns", *MONITOR_PATTERNS]),
        "group": _start(models, tmp_path_factory.mktemp("group_run"),
                        [*local_rms(models), "--lsc.reference", "group", "--lsc.quantile", "0.5",
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


def _check_run(run: dict, rewards_of, prompt_of, references_for, atol=REWARD_ATOL, weights=(1.0, 1.0)) -> None:
    """The shared checks. `rewards_of(sequence)` gives the K rewards recomputed here, `references_for(step_rows,
    my_rewards, prompt_of)` independent [n, K] references; the utility is sum_k w_k log sigmoid(r_k - ref_k)."""
    dump, w = run["dump"], np.array(weights)
    assert sorted({r["step"] for r in dump}) == list(range(1, STEPS + 1))
    returns = {(r["step"], tuple(r["sequence"])): r["return"] for r in run["returns"]}
    assert len(run["returns"]) == len(dump) == STEPS * ROLLOUT_BATCH * N_SAMPLES
    for step in range(1, STEPS + 1):
        rows = sorted((r for r in dump if r["step"] == step), key=lambda r: r["sample"])
        rewards = np.stack([rewards_of(r["sequence"]) for r in rows])
        np.testing.assert_allclose([r["rewards"] for r in rows], rewards, atol=atol, rtol=0)
        references = references_for(rows, rewards, prompt_of)
        np.testing.assert_allclose([r["references"] for r in rows], references, atol=atol, rtol=0)

        # Exact part: the transform of the rewards/references the plugin saw, computed with numpy.
        dumped = np.array([r["utility"] for r in rows])
        expected = w * _log_sigmoid(np.array([r["rewards"] for r in rows]) - np.array([r["references"] for r in rows]))
        np.testing.assert_allclose(dumped, expected.sum(1), rtol=1e-5, atol=1e-5)
        # What the trainer optimised: reinforce, no KL, no clipping -> the return is the reward used.
        trained = np.array([returns[(step, tuple(r["sequence"]))] for r in rows])
        np.testing.assert_allclose(trained, dumped, rtol=1e-5, atol=1e-5)
        # End to end, from the independent rewards and references (K terms of slope <= w_k each).
        independent = (w * _log_sigmoid(rewards - references)).sum(1)
        np.testing.assert_allclose(trained, independent, atol=2 * w.sum() * atol, rtol=0)
        # Stock's `reward` (rollout/reward_mean) is, as in stock, what PPO trained on.
        np.testing.assert_allclose(run["status"][step]["rollout/reward_mean"], independent.mean(), atol=2 * w.sum() * atol)
        # The transform is doing something here: utilities are neither raw rewards nor saturated.
        assert np.all(independent < 0) and np.ptp(independent) > 0.1


def test_label_reference_lsc_and_matches_independent_computation(runs, score, prompt_of):
    _check_run(runs["label"], score, prompt_of, _label_references)


def test_group_reference_lsc_and_matches_independent_computation(runs, score, prompt_of):
    _check_run(runs["group"], score, prompt_of, _group_references)


@pytest.fixture(scope="module")
def sources(models, tmp_path_factory) -> dict:
    """Named rewards from a .py reward_func (async trainer, dynamic filtering on its scores, group reference) and
    from an agent (all models colocated, weighted AND over constant references), started together."""
    started = {
        "reward_func": _start(models, tmp_path_factory.mktemp("reward_func_run"), [
            "--reward.remote_url", str(HARNESS / "reward_func.py"), "--lsc.reward_names", "length,vowels",
            "--lsc.reference", "group", "--lsc.quantile", "0.5", "--train.async_enable",
            "--algo.dynamic_filtering_enable", "--algo.dynamic_filtering_range", "0", "1"]),
        "agent": _start(models, tmp_path_factory.mktemp("agent_run"), [
            "--train.agent_func_path", str(HARNESS / "agent.py"), "--lsc.reward_names", "length,vowels",
            "--lsc.aggregate", "weighted", "--lsc.weights", ",".join(map(str, WEIGHTS)),
            "--lsc.reference", "constant", "--lsc.reference_value", "2,1",
            "--train.colocate_all", "--vllm.enable_sleep"]),
    }
    try:
        return {name: _finish(*run) for name, run in started.items()}
    finally:
        for proc, _, _ in started.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def tokenizer(models):
    return AutoTokenizer.from_pretrained(models / "policy")


def test_reward_func_named_rewards_async_with_dynamic_filtering(sources, tokenizer, prompt_of):
    """The reward_func sees the whole decoded sequence (OpenRLHF's executor decodes it with special tokens)."""
    from cpu_harness.reward_func import NAMES, named_rewards

    def rewards_of(sequence):
        rewards = named_rewards(tokenizer.decode(sequence, skip_special_tokens=False))
        return np.array([rewards[name] for name in NAMES])

    run = sources["reward_func"]
    _check_run(run, rewards_of, prompt_of, _group_references, atol=1e-5)
    # Filtering ran on the source's raw scores (0.5, inside (0, 1)): every sample passed. OpenRLHF logs accepted
    # samples per consumed prompt, in percent.
    for step in run["status"].values():
        assert step["dynamic_filtering_pass_rate"] == 100.0 * N_SAMPLES


def test_agent_named_rewards_colocated_weighted(sources, tokenizer, prompt_of):
    """The agent sees its response text (the engine decodes the generated ids); its scalar is logged, unused."""
    from cpu_harness.reward_func import NAMES, named_rewards

    def rewards_of(sequence):
        prompt = tokenizer(prompt_of(sequence)["input"], add_special_tokens=False)["input_ids"]
        rewards = named_rewards(tokenizer.decode(sequence[len(prompt):], skip_special_tokens=False))
        return np.array([rewards[name] for name in NAMES])

    def constant(rows, rewards, prompt_of):
        return np.tile([2.0, 1.0], (len(rows), 1))

    run = sources["agent"]
    _check_run(run, rewards_of, prompt_of, constant, atol=1e-5, weights=WEIGHTS)
    for step, status in run["status"].items():
        rows = [r for r in run["dump"] if r["step"] == step]
        assert status["lsc/reward"] == pytest.approx(100 * np.mean([sum(r["rewards"]) for r in rows]), rel=1e-5)


def test_monitor_metrics_logged_from_the_real_workers(runs, tokenizer, prompt_of):
    """The label run's evaluator (-A) was scored in the reward actor after the proxies; the trainer's monitor/*
    metrics, logged per step by OpenRLHF, equal numpy/scipy on the dumped proxy rewards and decoded responses."""
    from scipy import stats

    run = runs["label"]
    dump = run["dump"]
    first = None
    for step in range(1, STEPS + 1):
        rows = sorted((r for r in dump if r["step"] == step), key=lambda r: r["sample"])
        r, ref = np.array([row["rewards"] for row in rows]), np.array([row["references"] for row in rows])
        judge = -r[:, 0]
        first = first if first is not None else (r.mean(0), r.std(0, ddof=1))
        gain = (r.mean(0) - first[0]) / first[1]  # SFT-std units from the first batch (no SFT std given)
        responses = []
        for row in rows:
            prompt = tokenizer(prompt_of(row["sequence"])["input"], add_special_tokens=False)["input_ids"]
            responses.append(tokenizer.decode(row["sequence"][len(prompt):], skip_special_tokens=True))
        expected = {"monitor/judge/mean": judge.mean(), "monitor/judge/gain_std": -gain[0],
                    "monitor/A-judge/gap_std": 2 * gain[0], "monitor/B-judge/gap_std": gain[1] + gain[0],
                    "monitor/A~judge/spearman": -1.0, "monitor/B~judge/spearman": stats.spearmanr(r[:, 1], judge).statistic,
                    "monitor/A/above_ref": np.mean(r[:, 0] > ref[:, 0]), "monitor/B/above_ref": np.mean(r[:, 1] > ref[:, 1]),
                    "monitor/signal/proxy": gain.mean(), "monitor/response_chars": np.mean([len(t) for t in responses]),
                    "monitor/fired": 0.0}
        for item in MONITOR_PATTERNS:
            name, regex = item.split("=", 1)
            expected[f"monitor/pattern/{name}"] = np.mean([bool(re.search(regex, t, re.M)) for t in responses])
        logged = run["status"][step]
        for key, value in expected.items():  # logged as float32 batch means
            assert logged[key] == pytest.approx(value, rel=1e-4, abs=1e-4), (step, key)
    record = json.loads((run["out"] / "actor" / "lsc_monitor.json").read_text())
    assert record["history"]["steps"] == list(range(1, STEPS + 1)) and record["fired_step"] is None
    assert all("monitor/" not in key for key in runs["group"]["status"][1])  # unmonitored run: no monitor keys


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


# ---- `ray job submit`, for real: a local Ray head on CPU with logical GPUs ----


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


HEAD = """
import sys, time, ray
ray.init(address="local", num_cpus=8, num_gpus=8, include_dashboard=True, dashboard_host="127.0.0.1",
         dashboard_port=int(sys.argv[1]), _temp_dir=sys.argv[2])
print("head up", flush=True)
time.sleep(86400)
"""


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A local Ray head with the job server (the dashboard), 8 CPUs and 8 logical GPUs, its own temp dir and ports;
    stopped by ending its process group (never `ray stop`, which stops every Ray on the machine). Yields the job
    server address. Started by a process holding `ray.init` rather than `ray start --head`, which also starts a
    Ray Client server that gives up after 30 s when the raylet registers slowly (seen on 2 busy cores)."""
    temp = Path(tempfile.mkdtemp(prefix="lsc_ray_"))  # short: Ray's socket paths have a length limit
    dashboard = _free_port()
    env = dict(os.environ, RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT="600")  # 30 s is short on busy cores
    log = open(temp / "head.log", "w")
    head = subprocess.Popen([sys.executable, "-c", HEAD, str(dashboard), str(temp)], stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 600
        while subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "list", "--address", address],
                             capture_output=True).returncode != 0:
            assert head.poll() is None and time.time() < deadline, (temp / "head.log").read_text()[-3000:]
            time.sleep(5)
        yield address
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
                head.wait(timeout=60)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(temp, ignore_errors=True)


def _job_env(out: Path, **extra) -> dict:
    """The job's runtime env: paths for the CPU stand-ins and shims (loaded at interpreter start by
    tests/cpu_harness/boot/sitecustomize.py), no worker_process_setup_hook unless given."""
    paths = [str(HARNESS / "boot"), str(HARNESS.parent / "stubs"), str(HARNESS.parent), str(HARNESS.parent.parent)]
    env_vars = {"PYTHONPATH": os.pathsep.join(paths), "CPU_HARNESS_SHIMS": "1", "DS_ACCELERATOR": "cpu",
                "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(HARNESS.parents[1] / ".torch_extensions")),
                "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "CPU_HARNESS_RETURNS": str(out / "returns.jsonl")}
    return {"env_vars": env_vars, **extra}


def _submit(address: str, runtime_env: dict, entrypoint: list, timeout: float = RUN_TIMEOUT):
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address,
           "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint]
    start = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return out.returncode, out.stdout + out.stderr, time.time() - start


def test_ray_job_submit_reaches_every_worker(ray_head, models, score, prompt_of, tmp_path_factory):
    """The documented `ray job submit` launch (docs/plugin-loading.md): the job's runtime env has no setup hook;
    the plugin CLI's ray.init joins the cluster with its hook, and the rewards check passes (the reward actors
    scored with both models, the trainer applied LSC with label references)."""
    out = tmp_path_factory.mktemp("job_run")
    flags = _flags(models, out, [*local_rms(models), "--lsc.reference", "label", "--data.label_key", tiny_models.LABEL_KEY])
    code, log, seconds = _submit(ray_head, _job_env(out), [sys.executable, str(DRIVER), "--job", "--", *flags])
    (out / "log.txt").write_text(log)
    assert code == 0, log[-8000:]
    _check_run(_collect(out, log, seconds), score, prompt_of, _label_references)


def test_ray_job_submit_with_another_setup_hook_names_the_fix(ray_head, models, tmp_path_factory):
    """A job whose runtime env sets its own worker_process_setup_hook: the CLI leaves it (Ray refuses two hooks),
    its probe finds no plugin in the workers, and the run stops with one line naming the fixes, before any model."""
    out = tmp_path_factory.mktemp("hook_taken")
    flags = _flags(models, out, [*local_rms(models), "--lsc.reference", "constant", "--lsc.reference_value", "0,0"])
    runtime_env = _job_env(out, worker_process_setup_hook="os.getpid")
    code, log, _ = _submit(ray_head, runtime_env, [sys.executable, "-m", "openrlhf_lsc.cli.train_ppo_ray", *flags], timeout=600)
    (out / "log.txt").write_text(log)
    lines = [line for line in log.splitlines() if "error: openrlhf_lsc is not registered in the Ray workers" in line]
    assert code != 0 and len(set(lines)) == 1, log[-5000:]  # `ray job submit` echoes the job's last log lines
    line = lines[0]
    assert "worker_process_setup_hook='os.getpid'" in line and "openrlhf_lsc.integration.setup_worker" in line
    assert "OPENRLHF_LSC_AUTOLOAD" in line and "Traceback" not in log
    assert not (out / "dump.jsonl").exists() and not (out / "actor").exists()
