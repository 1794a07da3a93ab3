"""The real OpenRLHF 0.11.2 reward path with the plugin registered: RemoteExperienceMaker's
compute_advantages_and_returns for every reward source (local RM, K local RMs, HTTP remote, .py reward_func, agent)
and every advantage estimator, the multi-RM reward actor, the step number on resume, the setup hook.
Expectations are computed independently below (plain numpy)."""

import json
import math
import os
import pickle
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from openrlhf_lsc.rewards import RewardSpec

ESTIMATORS = ["gae", "reinforce", "rloo", "reinforce_baseline", "group_norm", "dr_grpo", "flash_reinforce"]


@pytest.fixture(scope="module")
def openrlhf_modules():
    import openrlhf.trainer.ppo_utils.experience_maker as em
    from openrlhf.trainer.ppo_utils.experience import Experience

    from openrlhf_lsc.integration import register

    register()
    register()  # idempotent
    return em, Experience


def lsc_config(dump=None, extra_logs=False, **spec):
    return SimpleNamespace(spec=RewardSpec(**spec), extra_logs=extra_logs, dump_rewards=dump, scale=None,
                           rehearsal=SimpleNamespace(dataset=None))


def make_maker(em, estimator, n, clip=None, lsc=None, no_std_norm=False):
    maker = em.RemoteExperienceMaker.__new__(em.RemoteExperienceMaker)
    maker.advantage_estimator = estimator
    maker.kl_ctl = SimpleNamespace(value=0.0)
    args = SimpleNamespace(
        rollout=SimpleNamespace(n_samples_per_prompt=n),
        reward=SimpleNamespace(clip_range=clip, overlong_buffer_len=None, stop_properly_penalty_coef=None),
        algo=SimpleNamespace(
            advantage=SimpleNamespace(estimator=estimator, gamma=1.0, lambd=1.0, no_std_norm=no_std_norm)
        ),
        lsc=lsc,
    )
    maker.strategy = SimpleNamespace(args=args)
    return maker


def experiences(Experience, rewards, labels, order, split, n=1, extra=None, T=3):
    """Experiences holding samples `order` (shuffled sample indices), split into micro-batches, as OpenRLHF
    builds them: `rewards` [b] or [b, K] with info["reward"] the same; `extra` {key: [N] values} in info, as
    OpenRLHF copies a reward_func's / agent's extra_logs."""
    out, start = [], 0
    for size in split:
        idx = order[start : start + size]
        start += size
        info = {"reward": rewards[idx].clone()}
        info.update({k: torch.as_tensor(v, dtype=torch.float32)[idx] for k, v in (extra or {}).items()})
        out.append(
            Experience(
                index=list(idx),
                rewards=rewards[idx].clone(),
                labels=[labels[i] for i in idx],
                prompts=[f"question {i // n}" for i in idx],
                action_mask=torch.ones(size, T),
                kl=torch.zeros(size, T),
                values=torch.zeros(size, T),
                sequences=4 * torch.tensor(idx)[:, None] + torch.arange(4),
                attention_mask=torch.ones(size, 4, dtype=torch.long),
                info=info,
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


# How each reward source hands its rewards to compute_advantages_and_returns (OpenRLHF 0.11.2):
# - rm: one local reward model, experience.rewards [b] (bf16 from the reward actor);
# - rms: K local reward models, [b, K] from the (patched) reward actor;
# - remote: an HTTP server or a .py reward_func's scalar `rewards`, [b], no names;
# - reward_func / agent: the scalar plus K named raw rewards in extra_logs['lsc/<name>/reward'] (a reward_func's
#   extra_logs and an agent's last step's extra_logs land in experience.info the same way).
SOURCES = ["rm", "rms", "remote", "reward_func", "agent"]


def source_batch(source, raw, n, prompts):
    """(experience rewards, extra info, spec names, extra_logs flag) for `raw` [N, K] in prompt-major order."""
    if source == "rm":
        return raw[:, :1].reshape(-1).to(torch.bfloat16), None, ("rm",), False
    if source == "rms":
        return raw.to(torch.bfloat16), None, ("helpful", "harmless"), False
    if source == "remote":
        return raw[:, 0].clone(), None, ("remote",), False
    # the source's own scalar (e.g. its own combination) differs from the named raw rewards the plugin reads
    extra = {"lsc/helpful/reward": raw[:, 0], "lsc/harmless/reward": raw[:, 1], "lsc/other/metric": raw[:, 0] * 0}
    return raw.sum(1) * 100, extra, ("helpful", "harmless"), True


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("sizes", [[5, 7], [4, 4, 4], [5, 5, 2]])  # micro-batch sizes: unequal, equal, smaller last
def test_every_reward_source_and_estimator_against_numpy(openrlhf_modules, source, estimator, sizes):
    em, Experience = openrlhf_modules
    n, prompts = 4, 3
    gen = torch.Generator().manual_seed(ESTIMATORS.index(estimator) + 10 * SOURCES.index(source))
    raw = torch.randn(n * prompts, 2, generator=gen) * 3
    refs = torch.randn(prompts, 2, generator=gen)
    rewards, extra, names, extra_logs = source_batch(source, raw, n, prompts)
    k = len(names)
    ref_of = {"rm": 0, "remote": 0, "helpful": 0, "harmless": 1}
    labels = [json.dumps({name: {"reference": refs[i // n, ref_of[name]].item()} for name in names})
              for i in range(n * prompts)]
    order = torch.randperm(n * prompts, generator=gen).tolist()
    exps = experiences(Experience, rewards, labels, order, sizes, n, extra)
    assert [len(e.index) for e in exps] == sizes
    cfg = lsc_config(names=names, transform="lsc", reference="label", label_key="lsc_ref", extra_logs=extra_logs)
    out = make_maker(em, estimator, n, lsc=cfg).compute_advantages_and_returns(exps)

    r = (raw.to(torch.bfloat16) if source in ("rm", "rms") else raw).double().numpy()[:, :k]
    ref = np.repeat(refs.double().numpy(), n, axis=0)[:, [ref_of[name] for name in names]]
    u = lsc_np(r, ref).sum(1)
    adv = expected_advantages(u, estimator, n)
    np.testing.assert_allclose(torch.cat([e.rewards for e in out]).double().numpy(), u[order], rtol=1e-5, atol=1e-6)
    got_adv = torch.cat([e.advantages for e in out]).double().numpy()
    np.testing.assert_allclose(got_adv, np.repeat(adv[order][:, None], 3, 1), rtol=1e-4, atol=1e-5)
    # Logged per-RM metrics, per sample, in experience order; stock's `reward` stays the source's raw reward.
    info = {key: np.concatenate([np.asarray(e.info[key], dtype=float) for e in out]) for key in out[0].info}
    for e in out:  # what Ray ships to the actors: no per-experience view of a batch-wide tensor (stock's own aside)
        for key, value in [("rewards", e.rewards)] + [kv for kv in e.info.items() if kv[0] != "group_reward_std"]:
            assert isinstance(value, list) or value.untyped_storage().nbytes() == value.nbytes, key
    for j, name in enumerate(names):
        np.testing.assert_allclose(info[f"lsc/{name}/reward"], r[order, j], rtol=1e-6)
        np.testing.assert_allclose(info[f"lsc/{name}/margin"], (r - ref)[order, j], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(info[f"lsc/{name}/above_ref"], (r > ref)[order, j].astype(float))
        np.testing.assert_allclose(info[f"lsc/{name}/utility"], lsc_np(r, ref)[order, j], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(info["lsc/utility"], u[order], rtol=1e-5, atol=1e-6)
    # `reward` as in stock: what PPO trains on (after length penalties, none here); `lsc/reward`: the raw one.
    np.testing.assert_allclose(info["reward"], u[order], rtol=1e-5, atol=1e-6)
    source_reward = rewards.double().numpy() if rewards.dim() == 1 else r.sum(1)
    np.testing.assert_allclose(info["lsc/reward"], source_reward[order], rtol=1e-6)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_raw_without_other_flags_reproduces_stock(openrlhf_modules, estimator):
    em, Experience = openrlhf_modules
    n = 2
    rewards = torch.tensor([1.0, -0.5, 2.0, 2.25, 0.125, -3.0], dtype=torch.bfloat16)
    order = [3, 0, 5, 1, 4, 2]
    stock = em.RemoteExperienceMaker.compute_advantages_and_returns.__lsc_original__
    base = stock(make_maker(em, estimator, n, clip=(-10, 10)), experiences(Experience, rewards, [""] * 6, order, [2, 4]))
    maker = make_maker(em, estimator, n, clip=(-10, 10), lsc=lsc_config(names=("rm",)))
    plugged = maker.compute_advantages_and_returns(experiences(Experience, rewards, [""] * 6, order, [2, 4]))
    for a, b in zip(base, plugged):
        assert torch.equal(a.advantages, b.advantages) and torch.equal(a.returns, b.returns)
        assert torch.equal(a.rewards, b.rewards) and torch.equal(a.info["reward"], b.info["reward"])


def test_plugin_off_is_stock(openrlhf_modules):
    """args.lsc None (a stock launch, or the plugin CLI without --lsc flags): the wrapper is stock, info too."""
    em, Experience = openrlhf_modules
    rewards = torch.tensor([0.5, 1.0, 2.0, -1.0])
    stock = em.RemoteExperienceMaker.compute_advantages_and_returns.__lsc_original__
    base = stock(make_maker(em, "rloo", 2), experiences(Experience, rewards, [""] * 4, [2, 0, 3, 1], [4]))
    plugged = make_maker(em, "rloo", 2).compute_advantages_and_returns(
        experiences(Experience, rewards, [""] * 4, [2, 0, 3, 1], [4]))
    for a, b in zip(base, plugged):
        assert torch.equal(a.advantages, b.advantages) and a.info.keys() == b.info.keys()
        assert all(torch.equal(a.info[k], b.info[k]) for k in a.info)


def test_transform_runs_before_stock_clipping(openrlhf_modules):
    em, Experience = openrlhf_modules
    rewards = torch.tensor([-40.0, 0.0])  # lsc utility ~ -40 -> clipped to -10 by --reward.clip_range
    maker = make_maker(em, "reinforce", 1, clip=(-10, 10), no_std_norm=True,
                       lsc=lsc_config(names=("rm",), transform="lsc", reference="constant", reference_value=(0.0,)))
    out = maker.compute_advantages_and_returns(experiences(Experience, rewards, ["", ""], [0, 1], [2]))[0]
    u = lsc_np(np.array([-40.0, 0.0]), 0.0)
    expected = np.clip(u, -10, 10) - np.clip(u, -10, 10).mean()
    np.testing.assert_allclose(out.advantages[:, 0].numpy(), expected, rtol=1e-6)
    assert out.info["lsc/clipped"] == [1.0, 0.0]


@pytest.mark.parametrize("estimator", ["rloo", "group_norm", "reinforce", "reinforce_baseline"])
def test_clipped_is_counted_where_stock_clips(openrlhf_modules, estimator):
    """lsc/clipped is the fraction of rewards stock clips: after length penalties and the group baseline. Rewards
    ~40 below their reference give utilities ~-40; a group baseline takes that away, so nothing is clipped there,
    while reinforce (no baseline) clips them."""
    em, Experience = openrlhf_modules
    n = 4
    raw = torch.tensor([-40.0, -41.0, -39.5, -42.0, -38.0, -43.0, -40.0, -45.0])
    lsc = lsc_config(names=("rm",), transform="lsc", reference="constant", reference_value=(0.0,))
    order, split = [5, 2, 7, 0, 3, 6, 1, 4], [3, 3, 2]
    exps = make_maker(em, estimator, n, clip=(-10, 10), lsc=lsc).compute_advantages_and_returns(
        experiences(Experience, raw, [""] * 8, order, split, n=n))
    g = lsc_np(raw.double().numpy(), 0.0).reshape(-1, n)  # stock's group baselines, in numpy
    if estimator == "rloo":
        g = g - (g.sum(1, keepdims=True) - g) / (n - 1)
    elif estimator == "reinforce_baseline":
        g = g - g.mean(1, keepdims=True)
    elif estimator == "group_norm":
        g = (g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-9)
    clipped = (np.abs(g.reshape(-1)) > 10).astype(float)
    got = [v for e in exps for v in e.info["lsc/clipped"]]
    assert got == clipped[order].tolist()
    assert sum(got) == (8 if estimator == "reinforce" else 0)  # before the fix: 8 for every estimator


def test_clipped_needs_the_plugin_and_a_clip_range(openrlhf_modules):
    """Without --reward.clip_range nothing is counted; a stock step after a plugin step logs no lsc/clipped."""
    em, Experience = openrlhf_modules
    raw = torch.tensor([-40.0, 0.0])
    lsc = lsc_config(names=("rm",), transform="lsc", reference="constant", reference_value=(0.0,))
    out = make_maker(em, "reinforce", 1, clip=None, lsc=lsc).compute_advantages_and_returns(
        experiences(Experience, raw, ["", ""], [0, 1], [2]))[0]
    assert "lsc/clipped" not in out.info and "lsc/utility" in out.info
    stock = make_maker(em, "reinforce", 1, clip=(-10, 10)).compute_advantages_and_returns(
        experiences(Experience, raw, ["", ""], [0, 1], [2]))[0]
    assert not any(k.startswith("lsc/") for k in stock.info)


def test_wrappers_follow_a_changed_stock_default(openrlhf_modules):
    """The wrappers bind through the wrapped function's own signature: when OpenRLHF changes a default, the plugin
    follows it instead of passing the old one (here stock compute_reward's reward_clip_range and
    ActorPPOTrainer.training_step's loss_batch_info)."""
    from openrlhf_lsc.integration import bind, wrap

    seen = []

    class Host:
        def step(self, experience, kl_ctl, step, loss_batch_info=None):
            seen.append(loss_batch_info)

    def make(original):
        def step(self, *args, **kwargs):
            call = bind(original, self, *args, **kwargs).arguments
            seen.append(("wrapper saw", call["loss_batch_info"]))
            return original(self, *args, **kwargs)

        return step

    wrap(Host, "step", ["self", "experience", "kl_ctl", "step", "loss_batch_info"], make)
    Host.step.__lsc_original__.__defaults__ = ("changed",)  # "OpenRLHF" changes its default
    Host().step("e", 0.1, 3)
    assert seen == [("wrapper saw", "changed"), "changed"]

    from openrlhf_lsc.integration import register

    register()

    def classes(module):  # Ray actors: the class Ray instantiates, which the plugin patches
        return [getattr(c, "__ray_metadata__", None) and c.__ray_metadata__.modified_class or c
                for c in vars(module).values() if isinstance(c, type) or hasattr(c, "__ray_metadata__")]

    owners = [owner for module in list(sys.modules.values()) if getattr(module, "__name__", "").startswith("openrlhf.")
              for owner in [module, *classes(module)]]
    wrapped = [(f"{owner.__name__}.{name}", fn) for owner in owners
               for name, fn in list(vars(owner).items()) if hasattr(fn, "__lsc_original__")]
    assert len({n for n, _ in wrapped}) == 18, sorted({n for n, _ in wrapped})  # every patch of PPO, rehearsal, train_rm
    for name, fn in wrapped:  # none restates a stock default: each takes what stock's signature gives it
        assert fn.__defaults__ is None and not fn.__kwdefaults__, f"{name} restates {fn.__defaults__}"


def test_a_failed_reward_model_load_leaves_no_stub(openrlhf_modules):
    """K reward models: when loading the second fails, the actor keeps no stubbed _setup_distributed."""
    from openrlhf.trainer.ray.launcher import RewardModelActor

    from openrlhf_lsc.integration import reward_actor

    cls = RewardModelActor.__ray_metadata__.modified_class
    actor, calls = cls.__new__(cls), []

    def stock_init(self, strategy, pretrain, **kwargs):
        calls.append(pretrain)
        if pretrain == "B":
            raise OSError("no such model B")
        self.model = pretrain

    with pytest.raises(OSError, match="no such model B"):
        reward_actor._wrap_init(stock_init)(actor, SimpleNamespace(), "A,B")
    assert calls == ["A", "B"] and "_setup_distributed" not in actor.__dict__ and not hasattr(actor, "lsc_models")


def test_scale_match_leaves_raw_bit_identical_and_fixes_the_factor_on_the_first_batch(openrlhf_modules):
    """--lsc.scale match: the utility times std(raw) / std(utility) of the run's first batch, that factor kept after;
    with the raw transform the factor is exactly 1 and every tensor is bit-identical to a run without it."""
    em, Experience = openrlhf_modules
    g = torch.Generator().manual_seed(5)
    first, second = torch.randn(8, generator=g) * 3, torch.randn(8, generator=g) * 3
    order, split = [3, 0, 6, 1, 7, 2, 5, 4], [4, 4]

    def step(rewards, **lsc):
        cfg = lsc_config(names=("rm",), **lsc["spec"])
        cfg.scale = lsc.get("scale")
        maker = make_maker(em, "rloo", 2, clip=(-10, 10), lsc=cfg)
        return cfg, maker, maker.compute_advantages_and_returns(experiences(Experience, rewards, [""] * 8, order, split,
                                                                            n=2))

    _, _, plain = step(first, spec={})
    _, _, matched = step(first, spec={}, scale="match")
    for a, b in zip(plain, matched):
        assert torch.equal(a.advantages, b.advantages) and torch.equal(a.rewards, b.rewards) and b.info["lsc/scale"][0] == 1
    lsc_spec = dict(transform="lsc", reference="constant", reference_value=(0.5,))
    cfg, maker, out = step(first, spec=lsc_spec, scale="match")
    u = lsc_np(first.double().numpy(), 0.5)
    factor = first.numpy().std(ddof=1) / u.std(ddof=1)
    got = np.array([v for e in out for v in e.info["lsc/utility"]])
    np.testing.assert_allclose(got, (u * factor)[order], rtol=1e-5)
    assert out[0].info["lsc/scale"][0] == pytest.approx(factor, rel=1e-5)
    assert out[0].info["lsc/reward_std"][0] == pytest.approx(first.numpy().std(ddof=1), rel=1e-5)
    assert out[0].info["lsc/utility_std"][0] == pytest.approx(first.numpy().std(ddof=1), rel=1e-4)  # matched
    again = maker.compute_advantages_and_returns(experiences(Experience, second, [""] * 8, order, split, n=2))
    np.testing.assert_allclose([v for e in again for v in e.info["lsc/utility"]],
                               (lsc_np(second.double().numpy(), 0.5) * factor)[order], rtol=1e-5)  # the first factor
    with pytest.raises(ValueError, match="--lsc.scale match: the first batch's utilities are all equal"):
        step(torch.zeros(8), spec=lsc_spec, scale="match")


def test_what_the_plugin_adds_ships_at_the_size_of_its_micro_batch(openrlhf_modules):
    """Ray pickles every experience for the actors, and a tensor view pickles its whole storage: the plugin's share of
    a pickled micro-batch must not grow with the rollout batch."""
    em, Experience = openrlhf_modules
    stock = em.RemoteExperienceMaker.compute_advantages_and_returns.__lsc_original__
    cfg = lsc_config(names=("a", "b"), transform="lsc", reference="constant", reference_value=(0.0, 1.0))
    added = []
    for prompts in (4, 64):
        rewards, order, sizes = torch.randn(2 * prompts, 2), list(range(2 * prompts)), [4] * (prompts // 2)
        base = stock(make_maker(em, "group_norm", 2), experiences(Experience, rewards.sum(1), [""] * 2 * prompts,
                                                                   order, sizes, n=2))
        plugged = make_maker(em, "group_norm", 2, lsc=cfg).compute_advantages_and_returns(
            experiences(Experience, rewards, [""] * 2 * prompts, order, sizes, n=2))
        added.append(len(pickle.dumps(plugged[0])) - len(pickle.dumps(base[0])))
    assert added[0] == added[1], added


def test_group_reference_and_dump(openrlhf_modules, tmp_path):
    em, Experience = openrlhf_modules
    n = 4
    rewards = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0, 10.5, 9.0, 8.0])
    dump = tmp_path / "sub" / "dump.jsonl"
    maker = make_maker(em, "group_norm", n, lsc=lsc_config(str(dump), names=("rm",), transform="lsc",
                                                           reference="group", quantile=0.75))
    maker.compute_advantages_and_returns(experiences(Experience, rewards, [""] * 8, [5, 1, 0, 7, 2, 3, 6, 4], [3, 5]))
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [row["sample"] for row in rows] == list(range(8))
    for row in rows:
        g = rewards[(row["sample"] // n) * n : (row["sample"] // n + 1) * n].numpy()
        ref = np.quantile(g, 0.75)
        assert row["references"] == [pytest.approx(ref)] and row["rewards"] == [rewards[row["sample"]].item()]
        assert row["utility"] == pytest.approx(lsc_np(row["rewards"][0], ref), rel=1e-6)
        assert row["sequence"] == list(range(4 * row["sample"], 4 * row["sample"] + 4))


def test_length_penalties_reach_reward_not_the_logged_utility(openrlhf_modules):
    """Stock's DAPO overlong penalty changes `experience.rewards` in place: PPO trains on, and `reward` logs, the
    penalised utility; `lsc/utility` stays the plugin's utility."""
    em, Experience = openrlhf_modules
    rewards = torch.tensor([0.5, -1.0, 2.0, 0.0])
    maker = make_maker(em, "reinforce", 1, no_std_norm=True,
                       lsc=lsc_config(names=("rm",), transform="lsc", reference="constant", reference_value=(0.0,)))
    args = maker.strategy.args
    args.reward.overlong_buffer_len, args.reward.overlong_penalty_factor = 4, 1.0
    args.rollout.max_new_tokens = 10
    exps = experiences(Experience, rewards, [""] * 4, [0, 1, 2, 3], [2, 2])
    for e, lengths in zip(exps, ([6, 8], [10, 3])):  # penalties 0, -0.5, -1, 0 (beyond 10 - 4 tokens)
        e.response_length = torch.tensor(lengths)
    out = maker.compute_advantages_and_returns(exps)
    u = lsc_np(rewards.double().numpy(), 0.0)
    penalised = u + np.array([0.0, -0.5, -1.0, 0.0])
    np.testing.assert_allclose(sum((e.info["lsc/utility"] for e in out), []), u, rtol=1e-6)
    np.testing.assert_allclose(torch.cat([e.info["reward"] for e in out]).numpy(), penalised, rtol=1e-6)
    np.testing.assert_allclose(torch.cat([e.advantages[:, 0] for e in out]).numpy(), penalised - penalised.mean(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "label, message",
    [
        ({"helpful": {"reference": 1.0}}, "prompt 'question 1': field 'lsc_ref' has no finite reference for "
         "reward model 'harmless'"),
        ({"helpful": {"reference": 1.0}, "harmless": {"reference": float("nan")}}, "prompt 'question 1'.*no finite"),
        ("{not json", "prompt 'question 1': field 'lsc_ref' is not valid JSON"),
        ("", "prompt 'question 1': field 'lsc_ref' must map reward-model names"),
    ],
)
def test_missing_or_bad_references_name_the_prompt_text_and_field(openrlhf_modules, label, message):
    em, Experience = openrlhf_modules
    good = json.dumps({"helpful": {"reference": 0.0}, "harmless": {"reference": 0.0}})
    labels = [good, good] + [label if isinstance(label, str) else json.dumps(label)] * 2
    maker = make_maker(em, "reinforce", 2, lsc=lsc_config(names=("helpful", "harmless"), transform="lsc",
                                                          reference="label", label_key="lsc_ref"))
    with pytest.raises(ValueError, match=message):
        maker.compute_advantages_and_returns(experiences(Experience, torch.zeros(4, 2), labels, [3, 0, 2, 1], [4], n=2))


def test_bad_rewards_are_errors_naming_the_source(openrlhf_modules):
    em, Experience = openrlhf_modules
    maker = make_maker(em, "reinforce", 2, lsc=lsc_config(names=("a", "b")))
    bad = torch.tensor([[0.0, float("nan")], [1.0, 1.0]])
    with pytest.raises(ValueError, match="reward model 'b' returned nan"):
        maker.compute_advantages_and_returns(experiences(Experience, bad, ["", ""], [0, 1], [2]))
    with pytest.raises(ValueError, match=r"rewards must be \[N, 2\]"):
        maker.compute_advantages_and_returns(experiences(Experience, torch.zeros(2), ["", ""], [0, 1], [2]))
    named = make_maker(em, "reinforce", 2, lsc=lsc_config(names=("a", "b"), extra_logs=True))
    exps = experiences(Experience, torch.zeros(2), ["", ""], [0, 1], [2], extra={"lsc/a/reward": [1.0, 2.0]})
    with pytest.raises(ValueError, match=r"no extra_logs\['lsc/b/reward'\].*'lsc/a/reward'"):
        named.compute_advantages_and_returns(exps)


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


SHIPPED_TRAINER = r'''
import json, pickle, sys
from types import SimpleNamespace
import torch
from openrlhf.trainer.ppo_utils.experience import Experience
import openrlhf.trainer.ppo_utils.experience_maker as em
from openrlhf_lsc.integration import setup_worker
from openrlhf_lsc.rewards import RewardSpec

setup_worker()  # as in a Ray worker: the setup hook first, then the actor class the driver shipped
with open(sys.argv[1], "rb") as f:
    cls = pickle.load(f)
maker = em.RemoteExperienceMaker.__new__(em.RemoteExperienceMaker)
maker.advantage_estimator, maker.kl_ctl = "reinforce", SimpleNamespace(value=0.0)
maker.strategy = SimpleNamespace(args=SimpleNamespace(
    rollout=SimpleNamespace(n_samples_per_prompt=1), reward=SimpleNamespace(clip_range=None),
    algo=SimpleNamespace(advantage=SimpleNamespace(estimator="reinforce", gamma=1.0, lambd=1.0, no_std_norm=False)),
    lsc=SimpleNamespace(spec=RewardSpec(names=("rm",)), extra_logs=False, dump_rewards=sys.argv[2], scale=None)))

class Stop(Exception):
    pass

def decode(*a, **k):
    raise Stop  # train_step's next move after making experiences: enough has run

fake = SimpleNamespace(experience_maker=SimpleNamespace(make_experience_batch=maker.compute_advantages_and_returns),
                       tokenizer=SimpleNamespace(decode=decode))
for global_step in (41, 42):
    exps = [Experience(index=[0, 1], rewards=torch.tensor([1.0, 2.0]), labels=["", ""], prompts=["p", "q"],
                       action_mask=torch.ones(2, 3), kl=torch.zeros(2, 3), values=torch.zeros(2, 3),
                       sequences=torch.ones(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 4, dtype=torch.long),
                       info={})]
    try:
        cls.train_step(fake, exps, global_step)
    except Stop:
        pass
print("steps", [json.loads(line)["step"] for line in open(sys.argv[2])])
'''


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["sync", "async"])
def test_step_number_is_openrlhfs_global_step_so_it_survives_a_resume(openrlhf_modules, trainer, tmp_path):
    """The dump's step is the global step OpenRLHF logs for the rollout (train_step's global_step + 1): a run
    resumed at step 41 continues with 42, for PPOTrainer (sync) and the async TrainingActor. The trainer's actor
    class runs as Ray ships it: pickled by value (cloudpickle) in the driver, loaded in another process."""
    from openrlhf.trainer import ppo_trainer, ppo_trainer_async
    from ray import cloudpickle

    actor = ppo_trainer.PPOTrainer if trainer == "sync" else ppo_trainer_async.TrainingActor
    (tmp_path / "cls.pkl").write_bytes(cloudpickle.dumps(actor.__ray_metadata__.modified_class))
    out = subprocess.run([sys.executable, "-c", SHIPPED_TRAINER, str(tmp_path / "cls.pkl"), str(tmp_path / "d.jsonl")],
                         capture_output=True, text=True, timeout=600)
    assert "steps [42, 42, 43, 43]" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]


@pytest.mark.slow
def test_setup_hook_registers_without_initialising_cuda():
    """The Ray worker setup hook (run before OpenRLHF sets CUDA_VISIBLE_DEVICES per actor) must not touch CUDA:
    any CUDA initialisation goes through torch.cuda._lazy_init, which fails here if called."""
    code = (
        "import torch\n"
        "def refuse(*a, **k):\n    raise SystemExit('CUDA initialised by the setup hook')\n"
        "torch.cuda._lazy_init = refuse\ntorch.cuda.init = refuse\n"
        "import openrlhf_lsc.integration as integration\n"
        "integration.setup_worker()\n"
        "assert integration.registered() and not torch.cuda.is_initialized()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-3000:]


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


AUTOLOAD_CHECK = r'''
import os, sys, ray
from openrlhf_lsc.integration import registered

ray.init(address="local", num_cpus=2, include_dashboard=False)  # no worker_process_setup_hook
env = {"PYTHONPATH": os.environ["PYTHONPATH"]}
on = ray.remote(registered).options(runtime_env={"env_vars": {**env, "OPENRLHF_LSC_AUTOLOAD": "1"}})
off = ray.remote(registered).options(runtime_env={"env_vars": env})
print("autoload:", ray.get(on.remote()), ray.get(off.remote()))
'''


@pytest.mark.slow
def test_autoloader_registers_in_ray_workers_only_when_asked(tmp_path):
    """`python -m openrlhf_lsc.integration.autoload install` + OPENRLHF_LSC_AUTOLOAD=1: Ray workers started without
    the setup hook have the plugin; without the variable they do not. (The folder it installs into stands for
    site-packages here: a sitecustomize makes it a site dir, so the shared environment is left alone.)"""
    import os

    from openrlhf_lsc.integration import autoload

    site_dir, boot = tmp_path / "site", tmp_path / "boot"
    site_dir.mkdir()
    boot.mkdir()
    autoload.main(["install", "--site", str(site_dir)])
    assert (site_dir / autoload.PTH).read_text() == autoload.LINE
    (boot / "sitecustomize.py").write_text(f"import site\nsite.addsitedir({str(site_dir)!r})\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(boot), os.environ["PYTHONPATH"]]))
    out = subprocess.run([sys.executable, "-c", AUTOLOAD_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert "autoload: True False" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
    autoload.main(["uninstall", "--site", str(site_dir)])
    assert not (site_dir / autoload.PTH).exists()


@pytest.mark.slow
def test_register_skips_what_cannot_import_here():
    """On a CPU install without flash-attn / vLLM (no test stand-ins), register() (called by a patched OpenRLHF's
    load_plugins in every CLI) skips the parts whose OpenRLHF code needs them, instead of failing the process."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import openrlhf_lsc.integration as i\ni.register()\nimport sys\n"
            "print(i.registered(), 'vllm' in sys.modules, 'flash_attn' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(root)},
                         capture_output=True, text=True, timeout=600)
    assert out.stdout.strip().endswith("True False False"), out.stdout[-2000:] + out.stderr[-3000:]
