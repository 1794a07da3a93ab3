"""The verl adapter through verl's real code (0.9.1, .venv-verl): config from verl's own Hydra files, the reward
loop's `RewardLoopWorker`, verl's `compute_advantage`, verl's reward-model router. Expected numbers come from numpy.

Run: `.venv-verl/bin/python -m pytest -q --confcutdir tests/verl_suite tests/verl_suite` (tests/test_verl.py does).
"""

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import verl  # noqa: F401  (first: `import verl` loads the verl.plugins entry points, as in a training run)
from hydra import compose, initialize_config_dir
from tensordict import TensorDict
from verl import DataProto
from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
from verl.trainer.ppo.ray_trainer import compute_advantage
from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories

import openrlhf_lsc.frameworks.verl as adapter
from openrlhf_lsc.rewards import RewardSpec, reward_utilities

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from cpu_harness.tiny_models import make_tokenizer  # noqa: E402

CONFIG_DIR = str(Path(verl.__file__).parent / "trainer" / "config")
PROMPT_LEN, RESPONSE_LEN = 6, 16
# The user's reward function, as a file verl loads (reward.custom_reward_function.path): two named raw rewards
# and an extra key (`acc`) that passes through to reward_extra_info.
USER_REWARDS = '''
def compute_score(data_source, solution_str, ground_truth, extra_info, **kwargs):
    helpful = 0.1 * len(solution_str) - 1.5
    correct = 0.5 * solution_str.count(ground_truth) - 0.5
    return {"helpful": helpful, "correct": correct, "acc": float(correct > 0)}
'''
NAMES = ["helpful", "correct"]


def log_sigmoid(x):
    return -np.logaddexp(0.0, -np.asarray(x, dtype=np.float64))


def verl_config(*overrides):
    """verl's own ppo_trainer config, composed by Hydra with command-line style overrides."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(overrides))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tok = make_tokenizer()
    tok.chat_template = "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def user_rewards(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "my_rewards.py"
    path.write_text(USER_REWARDS)
    namespace = {}
    exec(USER_REWARDS, namespace)
    return str(path), namespace["compute_score"]


def make_batch(tokenizer, n_prompts, n_samples, seed, labels=True, shuffle=False):
    """A rollout batch laid out as verl's agent loop builds it: left-padded prompts, right-padded responses."""
    g = torch.Generator().manual_seed(seed)
    b = n_prompts * n_samples
    vocab = len(tokenizer)
    prompts = torch.full((b, PROMPT_LEN), tokenizer.pad_token_id)
    responses = torch.full((b, RESPONSE_LEN), tokenizer.pad_token_id)
    mask = torch.zeros(b, PROMPT_LEN + RESPONSE_LEN, dtype=torch.int64)
    for i in range(b):
        p = int(torch.randint(2, PROMPT_LEN + 1, (1,), generator=g))
        r = int(torch.randint(1, RESPONSE_LEN + 1, (1,), generator=g))
        prompts[i, PROMPT_LEN - p:] = torch.randint(3, vocab, (p,), generator=g)
        responses[i, :r] = torch.randint(3, vocab, (r,), generator=g)
        mask[i, PROMPT_LEN - p:PROMPT_LEN + r] = 1
    prompt_of = np.repeat(np.arange(n_prompts), n_samples)
    if shuffle:  # verl may reorder a batch (balance_batch): a prompt's samples need not be adjacent
        prompt_of = prompt_of[torch.randperm(b, generator=g).numpy()]
    refs = torch.randn(n_prompts, len(NAMES), generator=g).tolist()
    chats = np.empty(b, dtype=object)
    chats[:] = [[{"role": "user", "content": f"question {k}"}] for k in prompt_of]
    non_tensor = {
        "data_source": np.array(["toy"] * b, dtype=object),
        "reward_model": np.array([{"ground_truth": "et"[k % 2], "style": "rule"} for k in prompt_of], dtype=object),
        "extra_info": np.array([{"index": int(k)} for k in prompt_of], dtype=object),
        "index": prompt_of.copy(),
        "uid": np.array([f"uid-{k}" for k in prompt_of], dtype=object),
        "raw_prompt": chats,
    }
    if labels:
        rows = [{n: {"reference": refs[k][j], "method": "fixed"} for j, n in enumerate(NAMES)} for k in prompt_of]
        non_tensor["lsc_ref"] = np.array(rows, dtype=object)
    batch = TensorDict({"prompts": prompts, "responses": responses, "attention_mask": mask}, batch_size=b)
    return DataProto(batch=batch, non_tensor_batch=non_tensor)


def score_batch(worker, data):
    """What verl's RewardLoopManager.compute_rm_score does with one worker: score, then rm_scores."""
    outputs = worker.loop.run_until_complete(worker.compute_score_batch(data))
    rm_scores = type(worker.reward_manager).assemble_rm_scores(data, [o["reward_score"] for o in outputs])
    return outputs, rm_scores


def test_entry_point_registers_in_a_fresh_process():
    """`import verl` alone (as in every Ray worker) registers the manager and the estimator."""
    code = (
        "import verl\n"
        "from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls\n"
        "from verl.trainer.ppo.core_algos import get_adv_estimator_fn\n"
        "print(get_reward_manager_cls('lsc').__module__, get_adv_estimator_fn('lsc_group').__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_PLUGINS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["openrlhf_lsc.frameworks.verl", "compute_lsc_group_advantage"]


MANAGER_SOURCES = {
    "by name": ["reward.reward_manager.name=lsc"],
    "by module path": ["reward.reward_manager.source=importlib", "reward.reward_manager.name=LSCRewardManager",
                       "reward.reward_manager.module.path=pkg://openrlhf_lsc.frameworks.verl"],
    "by file path": ["reward.reward_manager.source=importlib", "reward.reward_manager.name=LSCRewardManager",
                     f"reward.reward_manager.module.path={adapter.__file__}"],
}


@pytest.mark.parametrize("source", list(MANAGER_SOURCES))
def test_reward_loop_worker_scores_with_label_references(source, tok_dir, user_rewards):
    path, user_fn = user_rewards
    cfg = verl_config(
        f"actor_rollout_ref.model.path={tok_dir}",
        f"reward.custom_reward_function.path={path}",
        "reward.custom_reward_function.name=compute_score",
        *MANAGER_SOURCES[source],
        "+reward.lsc.names=[helpful,correct]",
        "+reward.lsc.reference=label",
        "+reward.lsc.label_key=lsc_ref",
    )
    worker = RewardLoopWorker(cfg)
    assert type(worker.reward_manager).__name__ == "LSCRewardManager"
    data = make_batch(worker.input_tokenizer, n_prompts=3, n_samples=2, seed=1)
    outputs, rm_scores = score_batch(worker, data)

    # expected: the user's rewards on the decoded responses, the labels' references, AND of log sigmoid margins
    mask = data.batch["attention_mask"][:, PROMPT_LEN:]
    texts = [worker.input_tokenizer.decode(r[: m.sum()], skip_special_tokens=True)
             for r, m in zip(data.batch["responses"], mask)]
    raw = [user_fn(None, t, gt["ground_truth"], {}) for t, gt in zip(texts, data.non_tensor_batch["reward_model"])]
    rewards = np.array([[r[n] for n in NAMES] for r in raw])
    refs = np.array([[lab[n]["reference"] for n in NAMES] for lab in data.non_tensor_batch["lsc_ref"]])
    expected = log_sigmoid(rewards - refs).sum(1)
    got = np.array([o["reward_score"] for o in outputs])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.ptp(expected) > 0.1  # the batch spans several utilities

    # reward_extra_info: the pipeline's per-RM metrics for the whole batch, plus the user's pass-through key
    spec = RewardSpec(names=tuple(NAMES), transform="lsc", reference="label", label_key="lsc_ref")
    _, metrics = reward_utilities(torch.tensor(rewards), spec, labels=list(data.non_tensor_batch["lsc_ref"]))
    assert set(outputs[0]["reward_extra_info"]) == set(metrics) | {"acc"}
    for key, values in metrics.items():
        np.testing.assert_allclose([o["reward_extra_info"][key] for o in outputs], values.numpy(), rtol=1e-5, atol=1e-6)
    assert [o["reward_extra_info"]["acc"] for o in outputs] == [r["acc"] for r in raw]
    np.testing.assert_array_equal(
        [o["reward_extra_info"]["lsc/correct/above_ref"] for o in outputs], (rewards[:, 1] > refs[:, 1]).astype(float)
    )

    # rm_scores as verl assembles them: the utility at each response's last valid token
    last = mask.sum(1) - 1
    np.testing.assert_allclose(rm_scores[torch.arange(len(last)), last].numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rm_scores.sum(1).numpy(), expected, rtol=1e-5, atol=1e-5)


def set_responses(data, tokenizer, texts):
    """Put these response texts into the batch (right-padded ids and their attention mask)."""
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) <= RESPONSE_LEN, text
        data.batch["responses"][i] = torch.tensor(ids + [tokenizer.pad_token_id] * (RESPONSE_LEN - len(ids)))
        data.batch["attention_mask"][i, PROMPT_LEN:] = (torch.arange(RESPONSE_LEN) < len(ids)).long()


def test_constant_reference_weighted_with_verls_default_scorer(tok_dir):
    """No custom reward function: verl's default scorer for the data source (gsm8k), one reward, a constant
    reference, the weighted aggregate."""
    from verl.utils.reward_score import default_compute_score

    cfg = verl_config(
        f"actor_rollout_ref.model.path={tok_dir}",
        "reward.reward_manager.name=lsc",
        "+reward.lsc.names=[score]",
        "+reward.lsc.transform=center",
        "+reward.lsc.aggregate=weighted",
        "+reward.lsc.weights=[2.0]",
        "+reward.lsc.reference=constant",
        "+reward.lsc.reference_value=[0.25]",
    )
    worker = RewardLoopWorker(cfg)
    data = make_batch(worker.input_tokenizer, n_prompts=2, n_samples=2, seed=2, labels=False)
    data.non_tensor_batch["data_source"][:] = "openai/gsm8k"
    data.non_tensor_batch["reward_model"][:] = [{"ground_truth": "7"}] * len(data)
    texts = ["so #### 7", "so #### 8", "two plus five", "#### 7"]
    set_responses(data, worker.input_tokenizer, texts)
    raw = np.array([float(default_compute_score("openai/gsm8k", t, "7")) for t in texts])
    assert raw.tolist() == [1.0, 0.0, 0.0, 1.0]
    outputs, _ = score_batch(worker, data)
    np.testing.assert_allclose([o["reward_score"] for o in outputs], 2.0 * (raw - 0.25), atol=1e-6)


@pytest.mark.parametrize("case", ["no label field", "missing reward", "unknown key", "group in manager",
                                  "served model bypasses the manager"])
def test_bad_settings_and_data_raise_one_clear_error(case, tok_dir, user_rewards, tmp_path):
    path, _ = user_rewards
    base = [f"actor_rollout_ref.model.path={tok_dir}", "reward.reward_manager.name=lsc",
            f"reward.custom_reward_function.path={path}", "reward.custom_reward_function.name=compute_score",
            "+reward.lsc.reference=label", "+reward.lsc.label_key=lsc_ref"]
    names = "+reward.lsc.names=[helpful,correct]"
    # verl scores a batch's responses concurrently (asyncio.gather over executor threads): whichever prompt fails
    # first is reported, so the index may be 0 or 1.
    if case == "no label field":
        worker = RewardLoopWorker(verl_config(*base, names))
        data = make_batch(worker.input_tokenizer, 2, 1, seed=3, labels=False)
        with pytest.raises(ValueError, match=r"prompt index [01] .*no field 'lsc_ref' \(reward.lsc.label_key\)"):
            score_batch(worker, data)
    elif case == "missing reward":
        worker = RewardLoopWorker(verl_config(*base, "+reward.lsc.names=[helpful,harmless]"))
        data = make_batch(worker.input_tokenizer, 2, 1, seed=3)
        with pytest.raises(ValueError, match=r"prompt index [01] .*missing \['harmless'\]"):
            score_batch(worker, data)
    elif case == "unknown key":
        with pytest.raises(ValueError, match=r"unknown key\(s\) \['quantle'\] in `reward.lsc`"):
            RewardLoopWorker(verl_config(*base, names, "+reward.lsc.quantle=0.5"))
    elif case == "group in manager":
        cfg = verl_config(*base[:4], names, "+reward.lsc.reference=group")
        with pytest.raises(ValueError, match=r"reward.lsc.reference=group .*algorithm.adv_estimator=lsc_group"):
            RewardLoopWorker(cfg)
    else:
        cfg = verl_config(*base[:2], names, "+reward.lsc.reference=constant", "+reward.lsc.reference_value=[0,0]",
                          "reward.reward_model.enable=True", f"reward.reward_model.model_path={tok_dir}")
        with pytest.raises(ValueError, match=r"skips the lsc manager.*name=served_reward_model"):
            RewardLoopWorker(cfg)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(app):
    """Run an ASGI app on 127.0.0.1 in a thread; return (server, port)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    return server, port


def test_served_reward_model_through_verls_router(tok_dir):
    """verl's NaiveRouter in front of a stand-in for vLLM's /classify endpoint; the lsc manager scores with it."""
    from fastapi import FastAPI
    from verl.experimental.reward_loop.router.naive_router import NaiveRouter

    seen = []
    backend = FastAPI()

    def rm(text):
        return 0.05 * len(text) - 1.0

    @backend.post("/classify")
    async def classify(body: dict):
        seen.append(body)
        return {"data": [{"probs": [rm(body["input"])]}]}

    servers = []
    try:
        servers.append(serve(backend))
        router = NaiveRouter(worker_urls=[f"http://127.0.0.1:{servers[0][1]}"])
        servers.append(serve(router.app))
        cfg = verl_config(
            f"actor_rollout_ref.model.path={tok_dir}",
            "reward.reward_manager.name=lsc",
            "reward.custom_reward_function.path=pkg://openrlhf_lsc.frameworks.verl",
            "reward.custom_reward_function.name=served_reward_model",
            "reward.reward_model.enable=True",
            f"reward.reward_model.model_path={tok_dir}",
            "reward.reward_model.rollout.name=vllm",
            "+reward.lsc.names=[rm]",
            "+reward.lsc.reference=constant",
            "+reward.lsc.reference_value=[0.3]",
        )
        worker = RewardLoopWorker(cfg, reward_router_address=f"127.0.0.1:{servers[1][1]}")
        data = make_batch(worker.input_tokenizer, n_prompts=2, n_samples=2, seed=4, labels=False)
        outputs, _ = score_batch(worker, data)
    finally:
        for server, _ in servers:
            server.should_exit = True

    tok = worker.reward_model_tokenizer
    texts = []
    for r, m, chat in zip(data.batch["responses"], data.batch["attention_mask"][:, PROMPT_LEN:],
                          data.non_tensor_batch["raw_prompt"]):
        response = worker.input_tokenizer.decode(r[: m.sum()], skip_special_tokens=True)
        text = tok.apply_chat_template(chat + [{"role": "assistant", "content": response}], tokenize=False)
        texts.append(text[len(tok.bos_token):])
    assert sorted(b["input"] for b in seen) == sorted(texts)
    assert {b["model"] for b in seen} == {tok_dir}
    expected = log_sigmoid(np.array([rm(t) for t in texts]) - 0.3)
    np.testing.assert_allclose([o["reward_score"] for o in outputs], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([o["reward_extra_info"]["lsc/rm/reward"] for o in outputs],
                               [rm(t) for t in texts], rtol=1e-5)


@pytest.mark.parametrize("then", ["grpo", "rloo", "v1 grpo"])
def test_lsc_group_estimator_in_compute_advantage(then, tok_dir):
    """K = 1 raw rewards in rm_scores -> verl's compute_advantage with adv_estimator=lsc_group, against numpy."""
    estimator = "rloo" if then == "rloo" else "grpo"
    cfg = verl_config("algorithm.adv_estimator=lsc_group", "+algorithm.lsc.quantile=0.75",
                      f"+algorithm.lsc.estimator={estimator}")
    from transformers import AutoTokenizer

    n_prompts, n = 3, 4
    data = make_batch(AutoTokenizer.from_pretrained(tok_dir), n_prompts, n, seed=5, labels=False, shuffle=True)
    raw = torch.randn(len(data), generator=torch.Generator().manual_seed(6)) * 2
    data.batch["token_level_rewards"] = adapter.LSCRewardManager.assemble_rm_scores(data, raw.tolist())
    if then == "v1 grpo":  # the v1 trainer's entry point (it hands every estimator but GRPO to compute_advantage)
        keys = [f"{u}_0_{i}" for i, u in enumerate(data.non_tensor_batch["uid"])]
        out = compute_advantage_for_multi_trajectories(data, batch_keys=keys, adv_estimator=cfg.algorithm.adv_estimator,
                                                       num_repeat=n, config=cfg.algorithm)
    else:
        out = compute_advantage(data, adv_estimator=cfg.algorithm.adv_estimator, num_repeat=n,
                                norm_adv_by_std_in_grpo=True, config=cfg.algorithm)

    r = raw.double().numpy()
    uid = data.non_tensor_batch["uid"]
    expected = np.empty_like(r)
    for g in np.unique(uid):
        rows = uid == g
        u = log_sigmoid(r[rows] - np.quantile(r[rows], 0.75))
        if estimator == "grpo":
            expected[rows] = (u - u.mean()) / (u.std(ddof=1) + 1e-6)
        else:
            expected[rows] = u - (u.sum() - u) / (n - 1)
    mask = data.batch["attention_mask"][:, PROMPT_LEN:].double().numpy()
    np.testing.assert_allclose(out.batch["advantages"].double().numpy(), expected[:, None] * mask, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["group of one", "no settings", "kl in reward"])
def test_lsc_group_refusals(case):
    overrides = {"group of one": ["+algorithm.lsc.quantile=0.5"], "no settings": [],
                 "kl in reward": ["+algorithm.lsc.quantile=0.5", "algorithm.use_kl_in_reward=True"]}[case]
    cfg = verl_config("algorithm.adv_estimator=lsc_group", *overrides).algorithm
    rewards, mask = torch.zeros(3, 4), torch.ones(3, 4)
    rewards[:, -1] = torch.tensor([1.0, 2.0, 3.0])
    index = np.array(["a", "a", "b"], dtype=object)
    pattern = {
        "group of one": r"prompt uid b \(1 samples\).*actor_rollout_ref.rollout.n",
        "no settings": r"algorithm.lsc.*\+algorithm.lsc.quantile=0.85",
        "kl in reward": r"use_kl_in_reward",
    }[case]
    with pytest.raises(ValueError, match=pattern):
        adapter.compute_lsc_group_advantage(rewards, mask, index, config=cfg)


def test_docs_python_blocks_run(tmp_path):
    """docs/verl.md: every ```python block runs as written (here, where verl is installed)."""
    import re

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "verl.md").read_text(), re.S)
    assert len(blocks) >= 3
    for block in blocks:
        exec(compile(block, "docs/verl.md", "exec"), {"__name__": "docs"})


def test_docstring_examples():
    import doctest

    result = doctest.testmod(adapter)
    assert result.attempted >= 4 and result.failed == 0
