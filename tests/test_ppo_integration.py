"""The real OpenRLHF 0.11.2 reward path with the plugin registered: RemoteExperienceMaker's
compute_advantages_and_returns for every advantage estimator, the multi-RM reward actor, and the CLI's
flag checks. Expectations are computed independently below (plain numpy)."""

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ESTIMATORS = ["gae", "reinforce", "rloo", "reinforce_baseline", "group_norm", "dr_grpo", "flash_reinforce"]


@pytest.fixture(scope="module")
def openrlhf_modules():
    import openrlhf.trainer.ppo_utils.experience_maker as em
    from openrlhf.trainer.ppo_utils.experience import Experience

    from openrlhf_lsc.integration import register

    register()
    register()  # idempotent
    return em, Experience


def make_maker(em, estimator, n, clip=None, lsc=None, label_key="lsc_ref", no_std_norm=False):
    maker = em.RemoteExperienceMaker.__new__(em.RemoteExperienceMaker)
    maker.advantage_estimator = estimator
    maker.kl_ctl = SimpleNamespace(value=0.0)
    args = SimpleNamespace(
        rollout=SimpleNamespace(n_samples_per_prompt=n),
        reward=SimpleNamespace(clip_range=clip, overlong_buffer_len=None, stop_properly_penalty_coef=None),
        data=SimpleNamespace(label_key=label_key),
        algo=SimpleNamespace(
            advantage=SimpleNamespace(estimator=estimator, gamma=1.0, lambd=1.0, no_std_norm=no_std_norm)
        ),
    )
    if lsc is not None:
        args.lsc = SimpleNamespace(**{"weights": None, "quantile": None, "reference_value": None,
                                      "dump_rewards": None, **lsc})
    maker.strategy = SimpleNamespace(args=args)
    return maker


def experiences(Experience, rewards, labels, order, split, T=3):
    """Experiences holding samples `order` (shuffled sample indices), split into micro-batches."""
    out, start = [], 0
    for size in split:
        idx = order[start : start + size]
        start += size
        out.append(
            Experience(
                index=list(idx),
                rewards=rewards[idx].clone(),
                labels=[labels[i] for i in idx],
                action_mask=torch.ones(size, T),
                kl=torch.zeros(size, T),
                values=torch.zeros(size, T),
                sequences=torch.arange(size * 4).reshape(size, 4),
                attention_mask=torch.ones(size, 4, dtype=torch.long),
                info={},
            )
        )
    return out


def expected_advantages(u, estimator, n, clip=None):
    """Independent numpy version of OpenRLHF's baselines + clipping + return + whitening (kl = 0, gamma = 1)."""
    g = u.reshape(-1, n)
    if estimator == "rloo":
        g = g - (g.sum(1, keepdims=True) - g) / (n - 1)
    elif estimator in ("reinforce_baseline", "dr_grpo"):
        g = g - g.mean(1, keepdims=True)
    elif estimator == "group_norm":
        g = (g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-9)
    elif estimator == "flash_reinforce":
        g = g - g.mean()
    a = g.reshape(-1)
    if clip is not None:
        a = np.clip(a, *clip)
    if estimator in ("gae", "reinforce", "reinforce_baseline"):  # whitened over all tokens (every token = a)
        a = (a - a.mean()) / math.sqrt(max(a.var(), 1e-8))
    return a


def lsc_np(r, ref):
    return -np.log1p(np.exp(-(r - ref)))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_real_compute_advantages_with_lsc_and_two_rms(openrlhf_modules, estimator):
    em, Experience = openrlhf_modules
    n, prompts = 4, 3
    gen = torch.Generator().manual_seed(ESTIMATORS.index(estimator))
    rewards = (torch.randn(n * prompts, 2, generator=gen) * 3).to(torch.bfloat16)
    refs = torch.randn(prompts, 2, generator=gen)
    labels = [json.dumps({"helpful": {"reference": refs[i // n, 0].item()}, "harmless": {"reference": refs[i // n, 1].item()}})
              for i in range(n * prompts)]
    order = torch.randperm(n * prompts, generator=gen).tolist()
    exps = experiences(Experience, rewards, labels, order, [5, 7])
    maker = make_maker(em, estimator, n, lsc=dict(transform="lsc", aggregate="and", reference="label",
                                                  reward_names=["helpful", "harmless"]))
    out = maker.compute_advantages_and_returns(exps)

    r = rewards.float().double().numpy()
    ref = np.repeat(refs.double().numpy(), n, axis=0)
    u = lsc_np(r, ref).sum(1)
    adv = expected_advantages(u, estimator, n)
    got_adv = torch.cat([e.advantages for e in out]).double().numpy()
    got_u = torch.cat([e.rewards for e in out]).double().numpy()
    np.testing.assert_allclose(got_u, u[order], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_adv, np.repeat(adv[order][:, None], 3, 1), rtol=1e-4, atol=1e-5)
    # Logged per-RM metrics, per sample, in experience order.
    info = {k: torch.cat([e.info[k] for e in out]).double().numpy() for k in out[0].info if k.startswith("lsc/")}
    np.testing.assert_allclose(info["lsc/helpful/reward"], r[order, 0], rtol=1e-6)
    np.testing.assert_allclose(info["lsc/harmless/margin"], (r - ref)[order, 1], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(info["lsc/helpful/above_ref"], (r > ref)[order, 0].astype(float))
    np.testing.assert_allclose(info["lsc/harmless/utility"], lsc_np(r, ref)[order, 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_raw_without_other_flags_reproduces_stock(openrlhf_modules, estimator):
    em, Experience = openrlhf_modules
    n = 2
    rewards = torch.tensor([1.0, -0.5, 2.0, 2.25, 0.125, -3.0], dtype=torch.bfloat16)
    order = [3, 0, 5, 1, 4, 2]
    stock = em.RemoteExperienceMaker.compute_advantages_and_returns.__lsc_original__
    base = stock(make_maker(em, estimator, n, clip=(-10, 10)), experiences(Experience, rewards, [""] * 6, order, [2, 4]))
    maker = make_maker(em, estimator, n, clip=(-10, 10), lsc=dict(transform="raw", aggregate="and", reference="none",
                                                                 reward_names=["rm"]))
    plugged = maker.compute_advantages_and_returns(experiences(Experience, rewards, [""] * 6, order, [2, 4]))
    for a, b in zip(base, plugged):
        assert torch.equal(a.advantages, b.advantages) and torch.equal(a.returns, b.returns)
        assert torch.equal(a.rewards, b.rewards)


def test_transform_runs_before_stock_clipping(openrlhf_modules):
    em, Experience = openrlhf_modules
    rewards = torch.tensor([[-40.0], [0.0]])  # lsc utility ~ -40 -> clipped to -10 by --reward.clip_range
    maker = make_maker(em, "reinforce", 1, clip=(-10, 10), no_std_norm=True,
                       lsc=dict(transform="lsc", aggregate="and", reference="constant", reference_value=[0.0],
                                reward_names=["rm"]))
    out = maker.compute_advantages_and_returns(experiences(Experience, rewards, ["", ""], [0, 1], [2]))[0]
    u = lsc_np(np.array([-40.0, 0.0]), 0.0)
    expected = np.clip(u, -10, 10) - np.clip(u, -10, 10).mean()
    np.testing.assert_allclose(out.advantages[:, 0].numpy(), expected, rtol=1e-6)
    assert out.info["lsc/clipped"].tolist() == [1.0, 0.0]


def test_group_reference_and_dump(openrlhf_modules, tmp_path):
    em, Experience = openrlhf_modules
    n = 4
    rewards = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0], [10.5], [9.0], [8.0]])
    dump = tmp_path / "dump.jsonl"
    maker = make_maker(em, "group_norm", n, lsc=dict(transform="lsc", aggregate="and", reference="group",
                                                     quantile=0.75, reward_names=["rm"], dump_rewards=str(dump)))
    maker.compute_advantages_and_returns(experiences(Experience, rewards, [""] * 8, list(range(8)), [8]))
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [row["sample"] for row in rows] == list(range(8))
    for row in rows:
        g = rewards[(row["sample"] // n) * n : (row["sample"] // n + 1) * n, 0].numpy()
        ref = np.quantile(g, 0.75)
        assert row["references"] == [pytest.approx(ref)]
        assert row["utility"] == pytest.approx(lsc_np(row["rewards"][0], ref), rel=1e-6)
        assert row["sequence"] == list(range(4 * row["sample"], 4 * row["sample"] + 4))


@pytest.mark.parametrize(
    "label, message",
    [
        ({"helpful": {"reference": 1.0}}, r"prompt \d+: field 'lsc_ref' has no finite reference for reward model 'harmless'"),
        ({"helpful": {"reference": 1.0}, "harmless": {"reference": float("nan")}}, "no finite reference"),
        ("{not json", "not valid JSON"),
        ("", "must map reward-model names"),
    ],
)
def test_missing_or_bad_references_name_prompt_and_field(openrlhf_modules, label, message):
    em, Experience = openrlhf_modules
    labels = [json.dumps({"helpful": {"reference": 0.0}, "harmless": {"reference": 0.0}})] * 3 + [
        label if isinstance(label, str) else json.dumps(label)
    ]
    maker = make_maker(em, "reinforce", 2, lsc=dict(transform="lsc", aggregate="and", reference="label",
                                                    reward_names=["helpful", "harmless"]))
    with pytest.raises(ValueError, match=message):
        maker.compute_advantages_and_returns(experiences(Experience, torch.zeros(4, 2), labels, [0, 1, 2, 3], [4]))


def test_nan_reward_and_wrong_k_are_errors(openrlhf_modules):
    em, Experience = openrlhf_modules
    maker = make_maker(em, "reinforce", 2, lsc=dict(transform="raw", aggregate="and", reference="none",
                                                    reward_names=["a", "b"]))
    bad = torch.tensor([[0.0, float("nan")], [1.0, 1.0]])
    with pytest.raises(ValueError, match="rewards from the reward models must be finite"):
        maker.compute_advantages_and_returns(experiences(Experience, bad, ["", ""], [0, 1], [2]))
    with pytest.raises(ValueError, match="returned 1 rewards per sample but --lsc.reward_names lists 2"):
        maker.compute_advantages_and_returns(experiences(Experience, torch.zeros(2, 1), ["", ""], [0, 1], [2]))


def test_reward_actor_scores_with_k_models(openrlhf_modules):
    """The patched RewardModelActor returns [b, K]: column k equals the stock forward with model k alone."""
    from openrlhf.trainer.ray.launcher import RewardModelActor

    cls = RewardModelActor.__ray_metadata__.modified_class  # the class Ray instantiates

    class Head(torch.nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.scale = scale

        def forward(self, sequences, attention_mask, **kwargs):
            return sequences.float().sum(-1) * self.scale

    actor = cls.__new__(cls)
    loaded = []

    def fake_setup(strategy):
        loaded.append("setup")
        actor.strategy = strategy

    actor._setup_distributed = fake_setup
    strategy = SimpleNamespace(ring_attn_group=None, prepare=lambda m: m, print=lambda *a: None,
                               args=SimpleNamespace())
    import openrlhf.trainer.ray.launcher as launcher

    scales = {"A": 1.0, "B": -2.0}
    orig_loader = launcher.get_llm_for_sequence_regression
    launcher.get_llm_for_sequence_regression = lambda path, *a, **k: Head(scales[path])
    try:
        strategy.args = SimpleNamespace(
            reward=SimpleNamespace(normalize_enable=False, offload=False),
            ds=SimpleNamespace(attn_implementation="eager", experts_implementation=None, param_dtype="bf16",
                               load_in_4bit=False, value_head_prefix="score", packing_samples=False),
        )
        strategy.get_ds_eval_config = lambda offload: {}
        Head.mean = Head.std = 0
        cls.init_model_from_pretrained(actor, strategy, "A,B")
    finally:
        launcher.get_llm_for_sequence_regression = orig_loader
    assert loaded == ["setup"]  # distributed set up once, not per model
    import cpu_shims

    cpu_shims.install()

    seq = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = cls.forward(actor, seq, torch.ones_like(seq))
    torch.testing.assert_close(out, torch.tensor([[6.0, -12.0], [15.0, -30.0]]))


def test_rewards_already_transformed_by_reward_func_are_not_transformed_twice(openrlhf_modules):
    em, Experience = openrlhf_modules
    exps = experiences(Experience, torch.zeros(2, 1), ["", ""], [0, 1], [2])
    exps[0].info["lsc_transformed"] = torch.ones(2)
    maker = make_maker(em, "reinforce", 2, lsc=dict(transform="lsc", aggregate="and", reference="constant",
                                                    reference_value=[0.0], reward_names=["remote"]))
    with pytest.raises(ValueError, match="already applied the transform; use --lsc.transform raw"):
        maker.compute_advantages_and_returns(exps)


def test_signature_mismatch_fails_loudly():
    from openrlhf_lsc.integration import wrap

    class Host:
        def compute(self, experiences, extra):
            return experiences

    with pytest.raises(RuntimeError, match=r"cannot patch .*Host.compute: expected parameters \['self', 'experiences'\]"):
        wrap(Host, "compute", ["self", "experiences"], lambda original: original)


def test_version_outside_the_supported_range_is_refused(monkeypatch):
    import openrlhf_lsc.integration as integration

    monkeypatch.setattr(integration, "version", lambda name: "0.12.0")
    with pytest.raises(RuntimeError, match=r"supports OpenRLHF >=0.11.2,<0.12 but found 0.12.0"):
        integration.check_openrlhf_version()
