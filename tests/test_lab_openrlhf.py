"""The lab against the real OpenRLHF 0.11.2: its compact PPO math equals OpenRLHF's advantage, policy-loss and
value-loss code, and its saved models load through OpenRLHF's own loaders with the same outputs."""

from types import SimpleNamespace

import pytest
import torch

from openrlhf_lsc.lab import models, ppo, world

LAB_ESTIMATORS = list(ppo.ESTIMATORS)


@pytest.fixture(scope="module")
def openrlhf():
    import openrlhf.trainer.ppo_utils.experience_maker as em
    from openrlhf.models import PolicyLoss, ValueLoss, get_llm_for_sequence_regression
    from openrlhf.trainer.ppo_utils.experience import Experience

    return SimpleNamespace(em=em, Experience=Experience, PolicyLoss=PolicyLoss, ValueLoss=ValueLoss,
                           load_rm=get_llm_for_sequence_regression)


def random_batch(seed, B, L):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    mask = (torch.arange(L)[None] < lengths[:, None]).float()
    utility = torch.randn(B, generator=g) * 3
    kl = torch.randn(B, L, generator=g) * 0.3 * mask
    values = torch.randn(B, L, generator=g) * mask
    return utility, kl, mask, values


@pytest.mark.parametrize("estimator", LAB_ESTIMATORS)
@pytest.mark.parametrize("clip", [(-10.0, 10.0), (-1.5, 2.0)])
def test_advantages_equal_openrlhf(openrlhf, estimator, clip):
    n = 1 if estimator in ("gae", "reinforce") else 4
    B, L, kl_coef = 16, 7, 0.05
    utility, kl, mask, values = random_batch(LAB_ESTIMATORS.index(estimator) + int(clip[0]), B, L)
    cfg = ppo.PPOConfig(estimator=estimator, n_samples_per_prompt=n, kl_coef=kl_coef, clip_range=clip)
    adv, ret = ppo.advantages_and_returns(utility, kl, mask, values if estimator == "gae" else None, cfg)

    # OpenRLHF: samples in shuffled order across two experiences, as its replay batches arrive.
    maker = openrlhf.em.RemoteExperienceMaker.__new__(openrlhf.em.RemoteExperienceMaker)
    maker.advantage_estimator = estimator
    maker.kl_ctl = SimpleNamespace(value=kl_coef)
    maker.strategy = SimpleNamespace(args=SimpleNamespace(
        rollout=SimpleNamespace(n_samples_per_prompt=n),
        reward=SimpleNamespace(clip_range=clip, overlong_buffer_len=None, stop_properly_penalty_coef=None),
        algo=SimpleNamespace(advantage=SimpleNamespace(estimator=estimator, gamma=1.0, lambd=1.0, no_std_norm=False)),
    ))
    order = torch.randperm(B, generator=torch.Generator().manual_seed(1)).tolist()
    exps = []
    for idx in (order[:9], order[9:]):
        exps.append(openrlhf.Experience(
            index=idx, rewards=utility[idx].clone(), action_mask=mask[idx].clone(), kl=kl[idx].clone(),
            values=values[idx].clone(), sequences=torch.zeros(len(idx), 3, dtype=torch.long),
            attention_mask=torch.ones(len(idx), 3, dtype=torch.long), info={},
        ))
    exps = maker.compute_advantages_and_returns(exps)
    ref_adv, ref_ret = torch.zeros(B, L), torch.zeros(B, L)
    for e, idx in zip(exps, (order[:9], order[9:])):
        ref_adv[idx], ref_ret[idx] = e.advantages.float(), e.returns.float()
    # OpenRLHF leaves values past the EOS in place; only action tokens count.
    torch.testing.assert_close(adv * mask, ref_adv * mask, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret * mask, ref_ret * mask, rtol=1e-5, atol=1e-5)


def test_losses_equal_openrlhf(openrlhf):
    g = torch.Generator().manual_seed(3)
    B, L = 8, 6
    _, _, mask, _ = random_batch(4, B, L)
    logp, old = -torch.rand(B, L, generator=g) * 3, -torch.rand(B, L, generator=g) * 3
    adv, values, old_values, returns = (torch.randn(B, L, generator=g) for _ in range(4))
    ref_policy = openrlhf.PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.2)(logp, old, adv, action_mask=mask)[0]
    torch.testing.assert_close(ppo.policy_loss(logp, old, adv, mask, 0.2), ref_policy)
    ref_value = openrlhf.ValueLoss(clip_eps=0.5)(values, old_values, returns, action_mask=mask)
    torch.testing.assert_close(ppo.value_loss(values, old_values, returns, mask, 0.5), ref_value)


def test_saved_models_load_in_openrlhf(openrlhf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openrlhf_lsc.lab.files import save_model_dir

    tok = world.build_tokenizer()
    policy = models.new_policy(0, hidden=32)
    rm = models.reward_model_from(policy, 1, eos_scale=400.0)  # the lab's proxies: enlarged EOS embedding
    torch.nn.init.normal_(rm.score.weight, std=0.5)  # a visible head, not the near-zero init
    save_model_dir(str(tmp_path / "sft"), policy, tok)
    save_model_dir(str(tmp_path / "rm"), rm, tok)

    # The tokenizer OpenRLHF would load encodes prompts and responses as the lab does.
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "sft")
    prompt = world.make_prompts(0)[0].text
    response = ["1.", "salt", "2.", "stir"]
    ids = hf_tok(prompt + " " + " ".join(response) + " </s>", add_special_tokens=False)["input_ids"]
    lab_ids = models.encode_prompts([prompt])[0].tolist() + models.encode_responses([response])[0, :5].tolist()
    assert ids == lab_ids
    assert hf_tok.eos_token_id == models.EOS and hf_tok.pad_token_id == models.PAD

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    x = torch.tensor([ids])
    torch.testing.assert_close(reloaded(x).logits, policy(x).logits)

    # OpenRLHF's reward model loader (bf16 only): same score as the lab's model with bf16 weights.
    theirs = openrlhf.load_rm(str(tmp_path / "rm"), "reward", param_dtype="bf16", attn_implementation="eager").float().eval()
    ours = models.RewardModel.from_pretrained(tmp_path / "rm").to(torch.bfloat16).float().eval()
    prompts = models.encode_prompts([p.text for p in world.make_prompts(0)[:4]])
    responses = models.encode_responses([response, ["use", "salt"], [], ["sorry"] * 20])
    seq, attn = models.sequences_and_mask(prompts, responses)
    with torch.no_grad():
        torch.testing.assert_close(ours(seq, attn), theirs(seq, attention_mask=attn), rtol=1e-4, atol=1e-4)
        n = responses.shape[1]
        critic = openrlhf.load_rm(str(tmp_path / "rm"), "critic", param_dtype="bf16", attn_implementation="eager").float().eval()
        mask = models.action_mask(responses)
        torch.testing.assert_close(ours.action_values(seq, attn, n) * mask, critic(seq, action_mask=mask, attention_mask=attn),
                                   rtol=1e-4, atol=1e-4)


CHECKER = r'''
import json, sys
import openrlhf_lsc.cli.train_ppo_ray as cli
import openrlhf_lsc.integration.launch as launch

class Parsed(Exception):
    pass

def stop(stock, args):
    raise Parsed(args)

launch.train = stop  # the CLI's last step: every stock and plugin check has passed by then
try:
    cli.main(sys.argv[1:])
except Parsed as e:
    a = e.args[0]
    spec = dict(vars(a.lsc.spec), weights=list(a.lsc.spec.weights or []) or None, reward_names=list(a.lsc.spec.names))
    print(json.dumps({"lsc": {k: spec[k] for k in ("transform", "aggregate", "weights", "reference", "reward_names")},
                      "kl": a.algo.kl.init_coef, "label_key": a.data.label_key, "critic": a.critic.model_name_or_path,
                      "reward": a.reward.model_name_or_path, "estimator": a.algo.advantage.estimator,
                      "episodes": a.train.num_episodes}))
    sys.exit(0)
sys.exit("train() was not reached")
'''


@pytest.mark.parametrize("method", ["lsc_AND", "weighted_w0.3", "single_lsc_canned", "single_raw"])
def test_gpu_example_flags_parse_in_the_real_launcher(tmp_path, method):
    """examples/lab_gpu.sh, with `python -m openrlhf_lsc.cli.train_ppo_ray` stopped just before training."""
    import json
    import os
    import subprocess
    import sys

    from openrlhf_lsc.lab.run_specs import and_run, make_run, weighted_run

    run = {
        "lsc_AND": and_run(0, 0.75, 0.5, "test", 0),
        "weighted_w0.3": weighted_run(0, 0.3, "test", 0),
        "single_lsc_canned": make_run(0, "single", ["harmless"], "lsc@canned", "lsc", "and", None, "canned", "test", 0),
        "single_raw": make_run(0, "single", ["helpful"], "raw", "raw", "and", None, None, "test", 0),
    }[method]
    (tmp_path / "runs").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prompts_train.jsonl").write_text("{}\n" * 100)
    for prop in run["properties"]:  # the CLI checks that local reward-model paths exist
        (tmp_path / "models" / f"rm_{prop}").mkdir(parents=True)
    stairs = [{"kl_coef": 0.5, "step": 30}, {"kl_coef": 0.0123, "step": 60}]
    (tmp_path / "runs" / "r.json").write_text(json.dumps({"run": run, "stairs": stairs, "ppo": {"rollout_prompts": 64}}))
    (tmp_path / "checker.py").write_text(CHECKER)
    # `python` on PATH: the launch goes to the checker, everything else to this interpreter.
    shim = tmp_path / "bin" / "python"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nif [ "$1" = "-m" ] && [ "$2" = "openrlhf_lsc.cli.train_ppo_ray" ]; then shift 2; '
                    f'exec {sys.executable} {tmp_path / "checker.py"} "$@"; fi\nexec {sys.executable} "$@"\n')
    shim.chmod(0o755)
    env = dict(os.environ, PATH=f"{shim.parent}:{os.environ['PATH']}", LAB=str(tmp_path), RUN="r", OUT=str(tmp_path / "o"))
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "lab_gpu.sh")
    proc = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parsed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert parsed["lsc"]["transform"] == run["transform"] and parsed["lsc"]["aggregate"] == run["aggregate"]
    assert parsed["lsc"]["weights"] == run["weights"] and parsed["lsc"]["reward_names"] == run["properties"]
    assert parsed["kl"] == 0.0123 and parsed["estimator"] == "gae"  # the last stair's coefficient
    assert parsed["episodes"] == 39  # 60 steps x 64 prompts over 100 training prompts, rounded up
    assert parsed["reward"] == ",".join(f"{tmp_path}/models/rm_{p}" for p in run["properties"])
    assert parsed["critic"] == f"{tmp_path}/models/sft"  # fresh value head on the SFT model, as the lab's critic
    assert parsed["label_key"] == run["label_key"]
    assert parsed["lsc"]["reference"] == ("none" if run["label_key"] is None else "label")
