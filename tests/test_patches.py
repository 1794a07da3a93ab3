"""patches/: the proposed upstream diffs apply cleanly to the installed OpenRLHF 0.11.2, keep OpenRLHF's own
test suite passing, and their plugin loading and hook points work.

Everything runs on copies of the installed source in a temporary folder (site-packages is never touched):
a pristine copy and a patched copy. Code that must import the PATCHED openrlhf runs in subprocesses with that
copy first on PYTHONPATH; the `test_patched_*` functions at the bottom are those checks: they are skipped in a
normal session and run inside `test_hooks_on_patched_source`'s subprocess.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PATCHES = sorted((ROOT / "patches").glob("*.patch"))
STUBS = ROOT / "tests" / "stubs"
PATCHED_ENV = "OPENRLHF_LSC_PATCHED_TREE"  # set only in the subprocess that runs the test_patched_* checks
inside_patched = pytest.mark.skipif(
    PATCHED_ENV not in os.environ, reason="runs inside test_hooks_on_patched_source's subprocess"
)

# A second installed plugin, found by importlib.metadata through its dist-info folder on PYTHONPATH.
FAKE_PLUGIN = '''
import os
from openrlhf.utils import plugins

CALLS = []


def add_arguments(parser):
    parser.add_argument("--fake.coef", type=float, default=0.5, help="flag added by the fake plugin")


def register():
    CALLS.append(os.getpid())
    if add_arguments not in plugins.ARGUMENT_HOOKS:  # plugins must tolerate repeated registration
        plugins.ARGUMENT_HOOKS.append(add_arguments)
'''


def _env(tree: Path, *extra: Path, **variables: str) -> dict:
    """Environment whose Python imports openrlhf from `tree` and the flash-attn/vLLM stand-ins from tests/stubs."""
    env = dict(os.environ, **variables)
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (tree, *extra, STUBS))
    return env


def _apply(patch_file: Path, tree: Path) -> str:
    """Apply with `patch -p1` (the README's command) refusing fuzz; return its output."""
    out = subprocess.run(
        ["patch", "-p1", "--fuzz=0", "--no-backup-if-mismatch", "-i", str(patch_file)],
        cwd=tree,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, f"{patch_file.name} does not apply:\n{out.stdout}{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """Pristine and patched copies of the installed OpenRLHF source and the wheel's own tests/."""
    for tool in ("patch", "git"):
        assert shutil.which(tool), f"`{tool}` is needed to check patches/ (apt-get install {tool})"
    assert [p.name[:4] for p in PATCHES] == ["0001", "0002"], f"unexpected patches/ content: {PATCHES}"
    package = Path(importlib.util.find_spec("openrlhf").origin).parent
    wheel_tests = package.parent / "tests"  # the openrlhf wheel installs its tests as a top-level package
    assert (wheel_tests / "test_reward_shaping.py").exists(), f"OpenRLHF's tests not found next to {package}"

    base = tmp_path_factory.mktemp("openrlhf_src")
    copies = {}
    for name in ("pristine", "patched"):
        copies[name] = base / name
        for src in (package, wheel_tests):
            shutil.copytree(src, copies[name] / src.name, ignore=shutil.ignore_patterns("__pycache__"))
    copies["apply_output"] = [_apply(p, copies["patched"]) for p in PATCHES]

    fake = base / "fake_plugin"
    (fake / "fake_openrlhf_plugin-0.0.dist-info").mkdir(parents=True)
    (fake / "fake_openrlhf_plugin.py").write_text(FAKE_PLUGIN)
    (fake / "fake_openrlhf_plugin-0.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fake-openrlhf-plugin\nVersion: 0.0\n"
    )
    (fake / "fake_openrlhf_plugin-0.0.dist-info" / "entry_points.txt").write_text(
        "[openrlhf.plugins]\nfake = fake_openrlhf_plugin:register\n"
    )
    copies["fake_plugin"] = fake
    return copies


def test_patches_apply_cleanly(trees, tmp_path):
    # `patch` applied each file without fuzz, offsets or rejects (the fixture fails otherwise) ...
    for output in trees["apply_output"]:
        assert "offset" not in output and "fuzz" not in output.lower() and "FAILED" not in output, output
    # ... `git apply --check` (strict, whitespace too) agrees, in order, on a fresh pristine copy.
    fresh = tmp_path / "fresh"
    shutil.copytree(trees["pristine"] / "openrlhf", fresh / "openrlhf")
    for patch_file in PATCHES:
        check = subprocess.run(["git", "apply", "--check", str(patch_file)], cwd=fresh, capture_output=True, text=True)
        assert check.returncode == 0, f"git apply --check {patch_file.name}: {check.stderr}"
        subprocess.run(["git", "apply", str(patch_file)], cwd=fresh, check=True)
    plugins_py = "openrlhf/utils/plugins.py"
    assert (fresh / plugins_py).read_text() == (trees["patched"] / plugins_py).read_text()
    # Patches target 0.11.2 exactly: the pristine copy is untouched.
    assert not (trees["pristine"] / "openrlhf/utils/plugins.py").exists()


def _junit_results(path: Path):
    """(number of tests, ids of failed or errored tests) from a pytest --junitxml report."""
    cases = list(ET.parse(path).getroot().iter("testcase"))
    failed = {
        f"{case.get('classname')}::{case.get('name')}"
        for case in cases
        if case.find("failure") is not None or case.find("error") is not None
    }
    return len(cases), failed


def test_openrlhf_suite_on_patched_source(trees, tmp_path):
    """OpenRLHF's own tests (the wheel's tests/, the whole suite: about 220 tests, about 25 s each run on
    2 idle cores) pass on the patched source at least as well as on the pristine one. openrlhf_lsc stays
    installed, so its `lsc` entry point is live in the patched run, as on a user's machine."""
    runs = {}
    for name in ("pristine", "patched"):
        report = tmp_path / f"{name}.xml"
        cmd = [sys.executable, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
        proc = subprocess.Popen(
            cmd, cwd=trees[name], env=_env(trees[name]), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        runs[name] = (proc, report)
    results = {}
    for name, (proc, report) in runs.items():
        output = proc.communicate(timeout=600)[0]
        assert report.exists(), f"OpenRLHF's suite did not run on the {name} copy:\n{output[-3000:]}"
        results[name] = _junit_results(report)
        print(f"OpenRLHF suite on the {name} source: {results[name][0]} tests, {len(results[name][1])} failed")
    (n_pristine, failed_pristine), (n_patched, failed_patched) = results["pristine"], results["patched"]
    assert n_pristine > 100 and n_patched == n_pristine
    assert failed_patched <= failed_pristine, f"failing only with the patches: {failed_patched - failed_pristine}"


def test_hooks_on_patched_source(trees):
    """Runs the test_patched_* checks below in a subprocess that imports the patched openrlhf."""
    env = _env(trees["patched"], trees["fake_plugin"], ROOT / "tests", OPENRLHF_PLUGINS="fake")
    env[PATCHED_ENV] = str(trees["patched"])
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-k", "test_patched_", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def test_cli_loads_openrlhf_lsc_through_entry_point(trees):
    """The patched train_ppo_ray CLI, run as a user would, loads every installed plugin (openrlhf_lsc's
    `register` and the fake one) before building its parser; the fake plugin's flag shows in --help."""
    proc = subprocess.run(
        [sys.executable, "-m", "openrlhf.cli.train_ppo_ray", "--help"],
        cwd=trees["patched"],
        env=_env(trees["patched"], trees["fake_plugin"]),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Loaded OpenRLHF plugin 'lsc' (openrlhf_lsc.integration:register)" in proc.stdout
    assert "Loaded OpenRLHF plugin 'fake' (fake_openrlhf_plugin:register)" in proc.stdout
    assert "--fake.coef" in proc.stdout and "flag added by the fake plugin" in proc.stdout


# ── Checks that run inside the patched-source subprocess ──


@pytest.fixture(scope="module")
def patched():
    """The patched openrlhf modules (asserting they really come from the patched copy)."""
    import cpu_shims

    cpu_shims.install()
    import openrlhf
    from openrlhf.trainer.ppo_utils import experience_maker
    from openrlhf.trainer.ray import launcher, ppo_actor
    from openrlhf.utils import plugins

    assert Path(openrlhf.__file__).is_relative_to(os.environ[PATCHED_ENV])
    return plugins, experience_maker, launcher, ppo_actor


@pytest.fixture
def clean_hooks(patched, monkeypatch):
    plugins = patched[0]
    for name in ("ARGUMENT_HOOKS", "REWARD_HOOKS", "ACTOR_LOSS_HOOKS"):
        monkeypatch.setattr(plugins, name, [])
    monkeypatch.setattr(plugins, "_loaded", False)
    return plugins


def _tiny_llama(seed: int, causal_lm: bool):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return (LlamaForCausalLM if causal_lm else LlamaModel)(config)


@inside_patched
def test_patched_load_plugins(clean_hooks, patched, monkeypatch):
    import fake_openrlhf_plugin
    from importlib.metadata import entry_points

    import openrlhf_lsc.integration

    plugins, launcher = clean_hooks, patched[2]
    # openrlhf_lsc's entry point (pip install -e .) resolves to its register function.
    eps = {ep.name: ep for ep in entry_points(group="openrlhf.plugins")}
    assert eps["lsc"].value == "openrlhf_lsc.integration:register"
    assert eps["lsc"].load() is openrlhf_lsc.integration.register

    # OPENRLHF_PLUGINS=fake (set by the parent test): only the fake plugin, once per process.
    fake_openrlhf_plugin.CALLS.clear()
    plugins.load_plugins()
    plugins.load_plugins()
    assert fake_openrlhf_plugin.CALLS == [os.getpid()]
    assert plugins.ARGUMENT_HOOKS == [fake_openrlhf_plugin.add_arguments]
    assert not openrlhf_lsc.integration._registered

    # Ray actors load plugins first thing in __init__ (for a Ray started without the setup hook).
    monkeypatch.setattr(plugins, "_loaded", False)
    for var in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.setenv(var, "")
    launcher.BaseDistributedActor(1, 0, "127.0.0.1", 29555)
    assert len(fake_openrlhf_plugin.CALLS) == 2

    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setenv("OPENRLHF_PLUGINS", "")
    plugins.load_plugins()
    assert len(fake_openrlhf_plugin.CALLS) == 2

    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setenv("OPENRLHF_PLUGINS", "fake,nope")
    with pytest.raises(ValueError, match=r"OPENRLHF_PLUGINS names \['nope'\].*'fake'.*'lsc'"):
        plugins.load_plugins()


@inside_patched
def test_patched_cli_argument_hooks(clean_hooks, capsys, monkeypatch):
    import runpy

    import fake_openrlhf_plugin

    # Every training CLI loads plugins before building its parser and lets them add flags.
    for cli in ("train_ppo_ray", "train_rm", "train_sft", "train_dpo"):
        monkeypatch.setattr(clean_hooks, "_loaded", False)
        monkeypatch.setattr(sys, "argv", [cli, "--help"])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_module(f"openrlhf.cli.{cli}", run_name="__main__")
        assert exit_info.value.code == 0
        assert "--fake.coef" in capsys.readouterr().out, cli
    assert clean_hooks.ARGUMENT_HOOKS == [fake_openrlhf_plugin.add_arguments]

    # Several reward models without a plugin to combine them: refused before anything starts.
    monkeypatch.setattr(clean_hooks, "_loaded", False)
    argv = ["train_ppo_ray", "--actor.model_name_or_path", "p", "--reward.model_name_or_path", "a,b"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(AssertionError, match="Several --reward.model_name_or_path"):
        runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__")


@inside_patched
def test_patched_ray_setup_hook(clean_hooks, patched):
    """train_ppo_ray hands load_plugins to ray.init as worker_process_setup_hook, and Ray runs it in workers."""
    from unittest.mock import MagicMock

    import ray

    from openrlhf.cli import train_ppo_ray

    init = MagicMock(side_effect=SystemExit)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(train_ppo_ray.ray, "is_initialized", lambda: False)
        m.setattr(train_ppo_ray.ray, "init", init)
        with pytest.raises(SystemExit):
            train_ppo_ray.train(MagicMock())
    runtime_env = init.call_args.kwargs["runtime_env"]
    assert runtime_env["worker_process_setup_hook"] == "openrlhf.utils.plugins.load_plugins"

    @ray.remote
    def plugin_calls_in_worker():
        import fake_openrlhf_plugin

        return os.getpid(), list(fake_openrlhf_plugin.CALLS)

    hook = runtime_env["worker_process_setup_hook"]
    ray.init(address="local", num_cpus=1, include_dashboard=False, runtime_env={"worker_process_setup_hook": hook})
    try:
        pid, calls = ray.get(plugin_calls_in_worker.remote())
    finally:
        ray.shutdown()
    assert pid != os.getpid() and calls == [pid]  # loaded once, in the worker, before the task ran


@inside_patched
def test_patched_several_reward_models(patched, tmp_path):
    """--reward.model_name_or_path A,B: the real RewardModelActor loads both and returns [B, 2] rewards, column k
    equal to model k's score computed here with plain transformers (last attended token's hidden state @ head)."""
    from types import SimpleNamespace

    import torch
    from safetensors.torch import load_file
    from transformers import LlamaModel

    launcher = patched[2]
    paths = []
    for k in range(2):
        path = tmp_path / f"rm{k}"
        _tiny_llama(seed=k, causal_lm=False).save_pretrained(tmp_path / f"base{k}")
        # Give the checkpoint a value head (OpenRLHF's reward class adds `score`), so every load is identical.
        base_dir = str(tmp_path / f"base{k}")
        model = launcher.get_llm_for_sequence_regression(base_dir, "reward", attn_implementation="eager")
        model.save_pretrained(path)
        paths.append(str(path))

    args = SimpleNamespace(
        reward=SimpleNamespace(normalize_enable=False, offload=False),
        ds=SimpleNamespace(
            attn_implementation="eager",
            experts_implementation=None,
            param_dtype="bf16",
            load_in_4bit=False,
            value_head_prefix="score",
            packing_samples=False,
        ),
    )
    strategy = SimpleNamespace(
        args=args,
        get_ds_eval_config=lambda offload: None,
        prepare=lambda m: m,
        print=lambda *a: None,
        ring_attn_group=None,
    )
    cls = launcher.RewardModelActor.__ray_metadata__.modified_class.__ray_actor_class__

    def reward_actor(pretrain):
        actor = cls.__new__(cls)
        actor._setup_distributed = lambda s: setattr(actor, "strategy", s)
        actor.init_model_from_pretrained(strategy, pretrain)
        return actor

    sequences = torch.tensor([[3, 5, 7, 9, 11, 0], [4, 6, 8, 10, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    rewards = reward_actor(",".join(paths)).forward(sequences, attention_mask)
    assert rewards.shape == (2, 2)

    for k, path in enumerate(paths):
        base = LlamaModel.from_pretrained(path, torch_dtype=torch.bfloat16, attn_implementation="eager").eval()
        head = load_file(f"{path}/model.safetensors")["score.weight"].to(torch.bfloat16)
        with torch.no_grad():
            hidden = base(sequences, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.sum(1) - 1
        expected = (hidden[torch.arange(2), last] @ head.T).squeeze(-1)
        torch.testing.assert_close(rewards[:, k].float(), expected.float(), rtol=0.02, atol=0.02)
        single = reward_actor(path).forward(sequences, attention_mask)
        assert single.shape == (2,)  # one reward model: stock [B] rewards
        torch.testing.assert_close(single, rewards[:, k])


def _experiences(Experience, rewards, index):
    import torch

    return Experience(
        index=index,
        rewards=rewards,
        action_mask=torch.ones(len(index), 3),
        kl=torch.zeros(len(index), 3),
        values=torch.zeros(len(index), 3),
        info={"reward": rewards.clone()},
    )


@inside_patched
def test_patched_reward_hooks(clean_hooks, patched):
    """[B, 2] rewards from two reward models: without a hook a clear error; with openrlhf_lsc's LSC AND-aggregation
    as reward hook the stock rloo advantages are computed from the aggregated utility (checked against numpy)."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from openrlhf.trainer.ppo_utils.experience import Experience
    from openrlhf_lsc.rewards import aggregate_rewards

    em = patched[1]
    n = 2
    raw = torch.tensor([[0.3, -1.2], [2.0, 0.4], [-0.7, 1.5], [1.1, 1.1]])  # sample i belongs to prompt i // n
    refs = torch.tensor([[0.5, 0.0], [-0.2, 1.0]])  # per prompt, per reward model
    maker = em.RemoteExperienceMaker.__new__(em.RemoteExperienceMaker)
    maker.advantage_estimator = "rloo"
    maker.kl_ctl = SimpleNamespace(value=0.0)
    args = SimpleNamespace(
        rollout=SimpleNamespace(n_samples_per_prompt=n),
        reward=SimpleNamespace(clip_range=None),
        algo=SimpleNamespace(advantage=SimpleNamespace(estimator="rloo", gamma=1.0, lambd=1.0, no_std_norm=True)),
    )
    maker.strategy = SimpleNamespace(args=args)

    def batch():  # two micro-batches, samples out of prompt order as OpenRLHF's dispatch leaves them
        return [_experiences(Experience, raw[index].clone(), index) for index in ([0, 3], [2, 1])]

    with pytest.raises(ValueError, match=r"rewards have shape \(2, 2\).*reward hook"):
        maker.compute_advantages_and_returns(batch())

    seen = []

    def lsc_and(experiences, hook_args):
        seen.append(hook_args)
        for e in experiences:
            e.rewards = aggregate_rewards(e.rewards, refs[[i // n for i in e.index]], transform="lsc", aggregate="and")
        return experiences

    clean_hooks.REWARD_HOOKS.append(lsc_and)
    out = maker.compute_advantages_and_returns(batch())
    assert len(seen) == 1 and seen[0] is args

    margin = raw.numpy().astype(np.float64) - np.repeat(refs.numpy(), n, axis=0)
    utility = (-np.log1p(np.exp(-margin))).sum(1)  # sum_k log sigmoid(r_k - ref_k)
    groups = utility.reshape(-1, n)
    rloo = (groups - (groups.sum(1, keepdims=True) - groups) / (n - 1)).reshape(-1)
    for e in out:
        np.testing.assert_allclose(e.info["reward"].numpy(), utility[e.index], rtol=1e-5)
        expected = np.repeat(rloo[e.index, None], 3, axis=1)  # the same advantage on every response token
        np.testing.assert_allclose(e.advantages.numpy(), expected, rtol=1e-5, atol=1e-6)


@inside_patched
def test_patched_openrlhf_lsc_uses_the_reward_hook(clean_hooks, patched):
    """On a patched OpenRLHF, openrlhf_lsc's PPO integration uses REWARD_HOOKS instead of wrapping stock code:
    the --lsc.* config on args gives the AND-LSC utility from [B, 2] rewards (checked against numpy)."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from openrlhf.trainer.ppo_utils.experience import Experience
    from openrlhf_lsc.integration import reward_path
    from openrlhf_lsc.rewards import RewardSpec

    em = patched[1]
    reward_path.apply()
    reward_path.apply()
    assert clean_hooks.REWARD_HOOKS == [reward_path.reward_hook]
    assert not hasattr(em.RemoteExperienceMaker.compute_advantages_and_returns, "__lsc_original__")
    raw = torch.tensor([[0.3, -1.2], [2.0, 0.4], [-0.7, 1.5], [1.1, 1.1]])
    maker = em.RemoteExperienceMaker.__new__(em.RemoteExperienceMaker)
    maker.advantage_estimator = "reinforce"
    maker.kl_ctl = SimpleNamespace(value=0.0)
    maker.strategy = SimpleNamespace(args=SimpleNamespace(
        rollout=SimpleNamespace(n_samples_per_prompt=2),
        reward=SimpleNamespace(clip_range=None),
        data=SimpleNamespace(label_key=None),
        algo=SimpleNamespace(advantage=SimpleNamespace(estimator="reinforce", gamma=1.0, lambd=1.0, no_std_norm=True)),
        lsc=SimpleNamespace(spec=RewardSpec(names=("a", "b"), transform="lsc", reference="constant",
                                             reference_value=(0.5, -0.5)), extra_logs=False, dump_rewards=None,
                            scale=None),
    ))
    exps = [_experiences(Experience, raw[index].clone(), index) for index in ([0, 3], [2, 1])]
    for e in exps:
        e.labels = [""] * len(e.index)
    out = maker.compute_advantages_and_returns(exps)
    utility = (-np.log1p(np.exp(-(raw.numpy().astype(np.float64) - np.array([0.5, -0.5]))))).sum(1)
    for e in out:
        np.testing.assert_allclose(e.rewards.numpy(), utility[e.index], rtol=1e-5)
        np.testing.assert_allclose(e.info["lsc/b/margin"], raw.numpy()[e.index, 1] + 0.5, rtol=1e-5)


@inside_patched
def test_patched_actor_loss_hook(clean_hooks, patched):
    """An actor-loss hook's term joins the stock PPO loss in the same backward: the loss given to backward is
    the stock loss plus the term (both computed in this test's two runs), with the term's gradient."""
    from types import SimpleNamespace

    import torch

    from openrlhf.models import Actor, PolicyLoss
    from openrlhf.trainer.ppo_utils.experience import Experience
    from openrlhf.utils.loss_utils import get_loss_batch_info

    ppo_actor = patched[3]
    trainer = ppo_actor.ActorPPOTrainer.__new__(ppo_actor.ActorPPOTrainer)
    trainer.actor = Actor(_tiny_llama(seed=0, causal_lm=True))
    trainer.actor.packing_samples = False  # set only when Actor loads from a path
    trainer.actor_loss_fn = PolicyLoss()
    trainer.aux_loss = False
    trainer.ema_model = None
    trainer.replay_buffer = None
    trainer.actor_optim = None
    trainer.actor_scheduler = SimpleNamespace(get_last_lr=lambda: [0.0])
    trainer.args = SimpleNamespace(
        actor=SimpleNamespace(entropy_coef=None),
        algo=SimpleNamespace(kl=SimpleNamespace(use_loss=False)),
        train=SimpleNamespace(dynamic_batch_enable=False),
    )
    losses = []
    trainer.strategy = SimpleNamespace(
        ring_attn_group=None,
        backward=lambda loss, model, optim: losses.append(loss),
        optimizer_step=lambda *a, **k: None,
        get_grad_norm=lambda model: 0.0,
    )
    sequences = torch.tensor([[3, 5, 7, 9, 11, 13], [4, 6, 8, 10, 12, 14]])
    action_mask = torch.ones(2, 3, dtype=torch.bool)

    def experience():
        return Experience(
            sequences=sequences,
            attention_mask=torch.ones_like(sequences),
            action_mask=action_mask,
            action_log_probs=torch.full((2, 3), -3.0),
            advantages=torch.tensor([[1.0, 1.0, 1.0], [-0.5, -0.5, -0.5]]),
            info={},
        )

    info = get_loss_batch_info(SimpleNamespace(), action_mask)
    calls = []

    def rehearsal(actor_trainer, exp, loss_batch_info):
        calls.append((actor_trainer, exp, loss_batch_info))
        logits = actor_trainer.actor.model(torch.tensor([[1, 2, 3, 4]])).logits  # an NLL on other data
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor([2, 3, 4]))
        terms.append(0.01 * nll)
        return terms[-1]

    terms = []
    trainer.training_step(experience(), 0.0, 0, info)
    clean_hooks.ACTOR_LOSS_HOOKS.append(rehearsal)
    exp = experience()
    trainer.training_step(exp, 0.0, 0, info)

    assert calls == [(trainer, exp, info)]
    stock, with_hook = losses
    torch.testing.assert_close(with_hook, stock + terms[0])
    weights = trainer.actor.model.lm_head.weight
    expected = torch.autograd.grad(stock + terms[0], weights, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(with_hook, weights)[0], expected)
