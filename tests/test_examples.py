"""The GPU example launch scripts: each one parses through the plugin CLI (stock OpenRLHF's parser and its
post-parse checks included, nothing started) and its roles' Ray GPU shares fit the GPU count its header states.

Each script runs under bash with `python`, `deepspeed` and `ray` replaced by a recorder of their argv. The
GPU-share arithmetic follows stock `openrlhf/cli/train_ppo_ray.py:train` (0.11.2): with `--train.colocate_all` (or
`--train.colocate_actor_ref`) one placement group of actor-size bundles holds the actor and reference (0.2
GPU each), and with colocate_all also the vLLM engines, critic and reward models (0.2 each); everything else
gets whole GPUs. It checks GPU counts and Ray's shares only, not memory: the model sizes in the headers are for the
reader (whether they fit 80 GB under the sleep modes is left to a GPU run).
"""

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PPO_EXAMPLES = sorted(p.name for p in EXAMPLES.glob("ppo_*.sh"))
JOB_SUBMIT = "ppo_lsc_ray_job_submit.sh"
RECORDER = """#!{python}
import json, os, sys
with open(os.environ["LSC_RECORD"], "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
"""


class Parsed(Exception):
    def __init__(self, args):
        self.namespace = args


def user_files(root: Path) -> dict:
    """The examples' path variables pointed at files and model folders that exist (the CLIs check local paths)."""
    paths = {}
    for var in ("SFT", "RM", "RM_HELPFUL", "RM_HARMLESS", "MODEL"):
        paths[var] = root / "models" / var.lower()
        paths[var].mkdir(parents=True, exist_ok=True)
        (paths[var] / "config.json").write_text("{}")
    paths["SPLIT"] = root / "split"
    for var, path in (("PROMPTS", root / "refs" / "references.jsonl"), ("DATASET", root / "prefs" / "train.jsonl"),
                      ("EVAL_DATASET", root / "prefs" / "eval.jsonl"), (None, paths["SPLIT"] / "ppo_prompts.jsonl"),
                      (None, paths["SPLIT"] / "rehearsal.jsonl")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('{"input": "x", "output": "y"}\n')
        if var:
            paths[var] = path
    paths["OUT"] = root / "out"
    return {k: str(v) for k, v in paths.items()}


def record(script: str, tmp_path: Path, *extra: str) -> list:
    """Run examples/<script> with the launchers recorded and its paths set to existing files; return the argv lists."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("python", "deepspeed", "ray"):
        path = bin_dir / tool
        path.write_text(RECORDER.format(python=sys.executable))
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / f"{script}.jsonl"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", LSC_RECORD=str(log),
               **user_files(tmp_path / "user"))
    subprocess.run(["bash", str(EXAMPLES / script), *extra], check=True, env=env, cwd=ROOT)
    return [json.loads(line) for line in log.read_text().splitlines()]


def header(script: str) -> dict:
    """The `# GPUs:` and `# Models:` lines every example starts with."""
    text = (EXAMPLES / script).read_text()
    gpus = re.search(r"^# GPUs:\s+(\d+) nodes? x (\d+) GPUs?, (\d+) GB", text, re.M)
    models = re.search(r"^# Models:\s+\S", text, re.M)
    return {"nodes": int(gpus[1]), "gpus_per_node": int(gpus[2]), "gb": int(gpus[3])} if gpus and models else {}


def module_argv(argv: list, module: str) -> list:
    i = argv.index(module)
    assert argv[i - 1] == "--module" or argv[i - 1] == "-m", argv
    return argv[i + 1 :]


def parse_ppo(argv: list, monkeypatch) -> object:
    """OpenRLHF's args namespace (with args.lsc) as the plugin CLI hands it to stock `train`, nothing started."""
    from openrlhf_lsc.cli import train_ppo_ray as cli
    from openrlhf_lsc.integration import launch
    from openrlhf_lsc.integration.stock_cli import StockCLI

    def stop(*args):
        raise Parsed(args[-1])

    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(StockCLI, "train", stop)  # stock's train(args) (no --lsc.* flag) or the plugin's
    monkeypatch.setattr(launch, "train", stop)
    with pytest.raises(Parsed) as parsed:
        cli.main(argv)
    return parsed.value.namespace


def parse_rm(argv: list, monkeypatch) -> object:
    from openrlhf_lsc.cli import train_rm as cli
    from openrlhf_lsc.integration.stock_cli import StockCLI

    def stop(*args):
        raise Parsed(args[-1])

    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(StockCLI, "train", stop)
    with pytest.raises(Parsed) as parsed:
        cli.main(argv)
    return parsed.value.namespace


def ray_gpu_shares(args) -> dict:
    """{placement group: [Ray GPU share asked on each of its GPUs]} as stock train_ppo_ray 0.11.2 places roles."""
    def size(role):
        return role.num_nodes * role.num_gpus_per_node

    plan = {}

    def place(group, n, share, role):
        gpus = plan.setdefault(group, [0.0] * n)
        assert n <= len(gpus), f"{role} needs {n} bundles, placement group {group!r} has {len(gpus)}"
        for i in range(n):
            gpus[i] += share

    colocate_all = args.train.colocate_all
    shared = "actor+ref" if args.train.colocate_actor_ref or colocate_all else None
    if shared:
        plan[shared] = [0.0] * size(args.actor)
    engines = args.vllm.num_engines or 0
    if engines:
        if colocate_all and not args.train.async_enable:
            place(shared, engines * args.vllm.tensor_parallel_size, 0.2, "vLLM")
        else:
            place("vllm", engines * args.vllm.tensor_parallel_size, 1.0, "vLLM")
    place(shared or "actor", size(args.actor), 0.2 if shared else 1.0, "actor")
    if args.algo.kl.init_coef > 0:
        place(shared or "ref", size(args.ref), 0.2 if shared else 1.0, "reference")
    if colocate_all:
        critic_reward = shared
    elif args.critic.model_name_or_path and args.train.colocate_critic_reward:
        critic_reward = "critic+reward"
    else:
        critic_reward = None
    if args.critic.model_name_or_path:
        place(critic_reward or "critic", size(args.critic), 0.2 if critic_reward else 1.0, "critic")
    if not args.reward.remote_url:  # stock builds the reward group whenever there is no remote reward
        place(critic_reward or "reward", size(args.reward), 0.2 if critic_reward else 1.0, "reward")
    return plan


def check_gpu_count(plan: dict, head: dict) -> int:
    total = sum(len(gpus) for gpus in plan.values())
    assert total <= head["nodes"] * head["gpus_per_node"], f"needs {total} GPUs: {plan}"
    assert all(share <= 1.0 + 1e-9 for gpus in plan.values() for share in gpus), f"a GPU is over-booked: {plan}"
    return total


def test_every_example_has_a_test():
    assert set(PPO_EXAMPLES) == {"ppo_lsc_single_rm.sh", "ppo_lsc_helpful_harmless.sh", "ppo_rehearsal_gpu.sh",
                                 "ppo_lsc_single_gpu.sh", JOB_SUBMIT}


@pytest.mark.parametrize("script, gpus", [("ppo_lsc_single_rm.sh", 8), ("ppo_lsc_helpful_harmless.sh", 8),
                                          ("ppo_rehearsal_gpu.sh", 8), ("ppo_lsc_single_gpu.sh", 1)])
def test_ppo_example_parses_and_fits_its_gpus(script, gpus, tmp_path, monkeypatch):
    head = header(script)
    assert head and head["nodes"] * head["gpus_per_node"] == gpus and head["gb"] == 80
    (argv,) = record(script, tmp_path)
    args = parse_ppo(module_argv(argv, "openrlhf_lsc.cli.train_ppo_ray"), monkeypatch)
    plan = ray_gpu_shares(args)
    assert check_gpu_count(plan, head) == gpus
    assert args.train.colocate_all and args.vllm.enable_sleep and args.ds.enable_sleep
    # the roles really share the GPUs: 5 roles at 0.2 on each (actor, reference, critic, reward, vLLM)
    assert plan == {"actor+ref": [pytest.approx(1.0)] * gpus}
    if script == "ppo_lsc_helpful_harmless.sh":
        assert args.lsc.spec.names == ("helpful", "harmless") and args.lsc.spec.transform == "lsc"
    if script == "ppo_rehearsal_gpu.sh":
        assert args.lsc.rehearsal.dataset.endswith("rehearsal.jsonl") and args.lsc.rehearsal.coef == 0.01


def test_ray_job_submit_example_forwards_the_plugin_cli(tmp_path, monkeypatch):
    (flags,) = record("ppo_lsc_single_rm.sh", tmp_path)
    flags = module_argv(flags, "openrlhf_lsc.cli.train_ppo_ray")
    (argv,) = record(JOB_SUBMIT, tmp_path, *flags)
    assert argv[:3] == ["ray", "job", "submit"]
    job = argv[argv.index("--") + 1 :]
    assert job[:3] == ["python", "-m", "openrlhf_lsc.cli.train_ppo_ray"] and job[3:] == flags
    args = parse_ppo(job[3:], monkeypatch)
    assert check_gpu_count(ray_gpu_shares(args), header("ppo_lsc_single_rm.sh")) == 8


def test_train_am_rm_example_parses_and_fits(tmp_path, monkeypatch):
    head = header("train_am_rm.sh")
    runs = record("train_am_rm.sh", tmp_path)
    assert [run[0] for run in runs] == ["deepspeed", "deepspeed"]
    for run, loss in zip(runs, ("am", "sigmoid")):
        gpus = int(run[run.index("--num_gpus") + 1])
        assert gpus == head["nodes"] * head["gpus_per_node"] == 8
        args = parse_rm(module_argv(run, "openrlhf_lsc.cli.train_rm"), monkeypatch)
        assert args.model.loss_type == loss and args.am.task_key == "task" and args.ds.zero_stage == 3


def test_gpu_arithmetic_catches_the_old_ten_gpu_layout(monkeypatch):
    """The layout the examples had (2+2+2+2 GPUs + 2 vLLM engines, nothing colocated) does not fit 8 GPUs."""
    argv = ["--actor.num_gpus_per_node", "2", "--ref.num_gpus_per_node", "2", "--critic.num_gpus_per_node", "2",
            "--reward.num_gpus_per_node", "2", "--vllm.num_engines", "2", "--actor.model_name_or_path", "m",
            "--lsc.reward_models", "rm", "--algo.kl.init_coef", "0.01"]
    plan = ray_gpu_shares(parse_ppo(argv, monkeypatch))
    assert sum(len(g) for g in plan.values()) == 10
    with pytest.raises(AssertionError, match="needs 10 GPUs"):
        check_gpu_count(plan, {"nodes": 1, "gpus_per_node": 8})
