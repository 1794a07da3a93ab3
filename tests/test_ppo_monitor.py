"""The over-optimisation monitor inside OpenRLHF 0.11.2's PPO, with the plugin registered: the real
`compute_advantages_and_returns` on rewards [N, K + M] (K proxies, M evaluators) trains on exactly the utility it
gives without the evaluators, and logs `monitor/*` equal to a numpy/scipy recomputation from the crafted batch; the
stop rule on a crafted sequence of batches runs the real `PPOTrainer.fit` loop to a warning, a checkpoint through
OpenRLHF's `save_logs_and_checkpoints` and a clean end, with `lsc_monitor.json` written."""

import json
import logging
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

from openrlhf_lsc.rewards import RewardSpec

PROXIES, EVALUATORS = ("helpful", "harmless"), ("judge",)
PATTERNS = [r"list=^\s*(?:[-*]|\d+\.)\s", r"question=\?\s*$"]
RESPONSES = ["- one two", "the answer is two", "1. five\n- six", "what is ten?", "good", "- bad?", "nine plus one",
             "how why?"]
N_SAMPLES = 2


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import openrlhf.trainer.ppo_utils.experience_maker as em
    from openrlhf.trainer.ppo_utils.experience import Experience

    from cpu_harness.tiny_models import make_tokenizer
    from openrlhf_lsc.integration import register

    register()
    root = tmp_path_factory.mktemp("monitor")
    tok = make_tokenizer()
    tok.save_pretrained(root / "policy")
    return SimpleNamespace(em=em, Experience=Experience, tok=tok, root=root)


def monitor_cfg(window=5, patience=3, stop=False):
    return SimpleNamespace(reward_models=["/rm/judge"], names=list(EVALUATORS), patterns=PATTERNS, window=window,
                           patience=patience, stop=stop)


def make_maker(env, monitor=None, out=None):
    maker = env.em.RemoteExperienceMaker.__new__(env.em.RemoteExperienceMaker)
    maker.advantage_estimator, maker.kl_ctl = "reinforce", SimpleNamespace(value=0.0)
    spec = RewardSpec(names=PROXIES, transform="lsc", reference="constant", reference_value=(0.5, -0.5))
    args = SimpleNamespace(
        rollout=SimpleNamespace(n_samples_per_prompt=N_SAMPLES),
        reward=SimpleNamespace(clip_range=None, overlong_buffer_len=None, stop_properly_penalty_coef=None),
        algo=SimpleNamespace(advantage=SimpleNamespace(estimator="reinforce", gamma=1.0, lambd=1.0, no_std_norm=False)),
        actor=SimpleNamespace(model_name_or_path=str(env.root / "policy")),
        data=SimpleNamespace(disable_fast_tokenizer=False),
        ckpt=SimpleNamespace(output_dir=str(out or env.root / "out"), save_steps=float("inf")),
        lsc=SimpleNamespace(spec=spec, extra_logs=False, dump_rewards=None, monitor=monitor, scale=None),
    )
    maker.strategy = SimpleNamespace(args=args)
    return maker


def batch(env, rewards, order, split):
    """Experiences as OpenRLHF builds them: samples `order` in micro-batches, prompt + response token ids padded on
    the right, action_mask shifted by one (it marks token t + 1), rewards [b, K + M] from the reward actor."""
    tok, out, start = env.tok, [], 0
    for size in split:
        idx = order[start : start + size]
        start += size
        seqs, masks = [], []
        for i in idx:
            prompt = tok(f"question {i // N_SAMPLES}?", add_special_tokens=False)["input_ids"]
            response = tok(RESPONSES[i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            seqs.append(torch.tensor(prompt + response))
            masks.append(torch.tensor([0] * (len(prompt) - 1) + [1] * len(response)))
        width = max(len(s) for s in seqs)
        sequences = torch.stack([torch.nn.functional.pad(s, (0, width - len(s)), value=tok.pad_token_id) for s in seqs])
        action_mask = torch.stack([torch.nn.functional.pad(m, (0, width - 1 - len(m))) for m in masks]).bool()
        r = rewards[idx].clone()
        out.append(env.Experience(index=list(idx), rewards=r, labels=[""] * size,
                                  prompts=[f"question {i // N_SAMPLES}?" for i in idx], sequences=sequences,
                                  attention_mask=(sequences != tok.pad_token_id).long(), action_mask=action_mask,
                                  kl=torch.zeros(action_mask.shape), values=torch.zeros(action_mask.shape),
                                  info={"reward": r.clone()}))
    return out


def crafted(seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(RESPONSES), len(PROXIES) + len(EVALUATORS), generator=g) + shift


ORDER, SPLIT = [5, 2, 7, 0, 3, 6, 1, 4], [3, 5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_evaluator_columns_leave_the_utility_bit_identical(env, dtype):
    from openrlhf_lsc.integration import monitor

    monitor._set_step(1)
    rewards = crafted(0).to(dtype)
    with_monitor = make_maker(env, monitor_cfg()).compute_advantages_and_returns(batch(env, rewards, ORDER, SPLIT))
    without = make_maker(env).compute_advantages_and_returns(batch(env, rewards[:, :2].clone(), ORDER, SPLIT))
    for a, b in zip(with_monitor, without):
        for field in ("rewards", "advantages", "returns"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
        assert {k for k in a.info if not k.startswith("monitor/")} == set(b.info)
        assert all(torch.equal(torch.as_tensor(a.info[k]), torch.as_tensor(b.info[k])) for k in b.info)  # unchanged
        assert any(k.startswith("monitor/") for k in a.info)


def test_monitor_metrics_match_an_independent_recomputation(env, tmp_path):
    from openrlhf_lsc.integration import monitor

    cfg = monitor_cfg()
    steps = [(3, crafted(1)), (4, crafted(2, shift=0.7))]
    first = steps[0][1].double().numpy()
    for step, rewards in steps:
        monitor._set_step(step)
        out = make_maker(env, cfg, tmp_path).compute_advantages_and_returns(batch(env, rewards, ORDER, SPLIT))
        r = rewards.double().numpy()
        got = {}
        for e in out:  # constant per sample: one value per step, logged as the batch mean
            for k, v in e.info.items():
                if k.startswith("monitor/"):
                    assert v == [v[0]] * len(e.index), k
                    got[k] = v[0]
        std = first.std(axis=0, ddof=1)
        gain = (r.mean(0) - first.mean(0)) / std  # in SFT-std units (first batch's std: no SFT std given)
        expected = {"monitor/judge/mean": r[:, 2].mean(), "monitor/judge/gain": r[:, 2].mean() - first[:, 2].mean(),
                    "monitor/judge/gain_std": gain[2], "monitor/signal/evaluator": gain[2],
                    "monitor/signal/proxy": gain[:2].mean(),
                    "monitor/response_chars": np.mean([len(t) for t in RESPONSES])}
        for j, (name, ref) in enumerate(zip(PROXIES, (0.5, -0.5))):
            expected[f"monitor/{name}/gain_std"] = gain[j]
            expected[f"monitor/{name}-judge/gap_std"] = gain[j] - gain[2]
            expected[f"monitor/{name}~judge/spearman"] = stats.spearmanr(r[:, j], r[:, 2]).statistic
            expected[f"monitor/{name}/above_ref"] = np.mean(r[:, j] > ref)
        for item in PATTERNS:
            name, regex = item.split("=", 1)
            expected[f"monitor/pattern/{name}"] = np.mean([bool(re.search(regex, t, re.M)) for t in RESPONSES])
        expected.update({"monitor/best_step": 3.0 if gain[2] <= 0 else float(step), "monitor/fired": 0.0})
        assert set(got) == set(expected)
        for k, v in expected.items():
            assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-6), k
    assert 0 < expected["monitor/pattern/list"] < 1 and 0 < expected["monitor/pattern/question"] < 1
    record = json.loads((tmp_path / "lsc_monitor.json").read_text())
    assert record["history"]["steps"] == [3, 4] and record["fired_step"] is None
    assert record["evaluators"] == {"judge": "/rm/judge"}


# ---- the stop rule in OpenRLHF's real fit loop ----

E_SIGNAL = lambda t: min(t, 4 - t)  # evaluator batch means per global step: 1, 2, 1, 0, -1, ... (peak at step 2)


def step_rewards(t):
    """Step t's batch: proxy means t (rising), evaluator mean E_SIGNAL(t), the same spread every step (std 1)."""
    spread = torch.tensor([-1.5, -0.5, 0.5, 1.5, -1.0, 1.0, -0.25, 0.25])
    spread = spread / spread.std()
    return torch.stack([t + spread, t + spread.flip(0), E_SIGNAL(t) + spread.roll(3)], dim=1)


class Loader(list):
    def state_dict(self):
        return {"served": len(self)}


def fit(env, tmp_path, monkeypatch, stop, episodes=2, prompts=8):
    """PPOTrainer.fit (the class Ray instantiates, plugin wrappers on) with OpenRLHF's own train_step,
    save_logs_and_checkpoints and SamplesGenerator.generate_samples; generation, the model groups and Ray stand in."""
    import openrlhf.trainer.ppo_trainer as pt
    import ray
    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator

    from openrlhf_lsc.integration import monitor

    monkeypatch.setattr(ray, "get", lambda refs: refs)
    monkeypatch.setattr(monitor, "_monitor", None)  # this run's monitor; the module's is restored afterwards
    maker = make_maker(env, monitor_cfg(window=1, patience=2, stop=stop), tmp_path / "out")
    args = maker.strategy.args
    args.train = SimpleNamespace(num_episodes=episodes, dynamic_batch_enable=False)
    args.ckpt.__dict__.update(load_enable=False, path=str(tmp_path / "ckpt"))
    args.logger = SimpleNamespace(logging_steps=1)
    args.eval = SimpleNamespace(steps=float("inf"))
    args.vllm = SimpleNamespace(enable_sleep=False)
    args.algo.dynamic_filtering_enable = False
    args.rollout.batch_size = len(RESPONSES) // N_SAMPLES

    generated, saved = [], []
    gen = SamplesGenerator.__new__(SamplesGenerator)
    gen.args, gen.prompts_dataloader = args, Loader(range(prompts))

    def generate_vllm(dataloader_iter, num_prompts, dynamic_filtering, **kwargs):
        next(dataloader_iter)
        generated.append(1)
        exhausted = len(generated) % prompts == 0
        return list(range(len(RESPONSES))), 1, exhausted

    gen._generate_vllm = generate_vllm
    cls = pt.PPOTrainer.__ray_metadata__.modified_class
    trainer = cls.__new__(cls)
    group = SimpleNamespace(async_run_method_batch=lambda **kw: [],
                            async_run_method=lambda method_name, **kw: saved.append((method_name, kw)) or [])
    trainer.__dict__.update(
        strategy=maker.strategy, args=args, samples_generator=gen, prompts_dataloader=gen.prompts_dataloader,
        generate_kwargs={}, eval_dataloader=None, wandb_logger=None, tensorboard_logger=None, vllm_engines=None,
        actor_model_group=group, critic_model_group=None, best_eval_metric_key="", _latest_eval_metric_value=None,
        best_eval_metric_value=float("-inf"), tokenizer=SimpleNamespace(decode=lambda *a, **k: ["text"]),
        ppo_train=lambda step: {},
        experience_maker=SimpleNamespace(make_experience_batch=lambda samples: maker.compute_advantages_and_returns(
            batch_with_stats(env, step_rewards(len(generated))))),
    )
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("openrlhf_lsc.integration.monitor")
    logger.addHandler(handler)
    try:
        trainer.fit()
    finally:
        logger.removeHandler(handler)
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    record = json.loads((tmp_path / "out" / "lsc_monitor.json").read_text())
    return SimpleNamespace(steps=len(generated), saved=saved, warnings=warnings, record=record)


def batch_with_stats(env, rewards):
    exps = batch(env, rewards, ORDER, SPLIT)
    for e in exps:  # what OpenRLHF's make_experience adds and train_step's rollout stats read
        e.response_length = e.action_mask.sum(1).float()
        e.truncated = torch.zeros(len(e.index), dtype=torch.bool)
    return exps


def test_stop_rule_warns_saves_and_ends_the_real_fit_loop(env, tmp_path, monkeypatch):
    # window 1, patience 2: the evaluator fell at steps 3 and 4 while the proxy rose -> fires at step 4.
    run = fit(env, tmp_path, monkeypatch, stop=True)
    assert run.steps == 4  # no rollout after the fired step, and the second episode ends at once
    assert [(name, kw["tag"], kw["client_states"]["global_step"]) for name, kw in run.saved] == \
        [("save_checkpoint", "global_step4", 4)]  # OpenRLHF's own save, with its resumable client states
    assert run.saved[0][1]["client_states"]["data_loader_state_dict"] == {"served": 8}
    assert len(run.warnings) == 1 and "step 4" in run.warnings[0] and "best evaluator score was at step 2" in \
        run.warnings[0] and "stopping" in run.warnings[0]
    assert run.record["fired_step"] == 4 and run.record["best_step"] == 2 and run.record["history"]["steps"] == [1, 2, 3, 4]
    assert math.isclose(run.record["best_evaluator_gain_std"], E_SIGNAL(2) - E_SIGNAL(1), rel_tol=1e-5)


def test_without_stop_the_rule_only_warns_once(env, tmp_path, monkeypatch):
    run = fit(env, tmp_path, monkeypatch, stop=False, episodes=1, prompts=6)
    assert run.steps == 6 and run.saved == []  # no --ckpt.save_steps: nothing saved, training went on
    assert len(run.warnings) == 1 and "training goes on" in run.warnings[0]
    assert run.record["fired_step"] == 4 and run.record["history"]["steps"] == list(range(1, 7))
