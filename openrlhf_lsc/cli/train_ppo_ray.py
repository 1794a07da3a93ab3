"""`python -m openrlhf_lsc.cli.train_ppo_ray <stock train_ppo_ray flags> --lsc.<...>`

Builds stock `openrlhf.cli.train_ppo_ray`'s own parser with the `--lsc.*` flags added, runs stock's own checks,
checks the `--lsc.*` flags against them (one line naming the flag, exit 2, before anything starts), then calls
stock's `train(args)` with `args.lsc` attached. Without any `--lsc.*` flag, `args.lsc` is None and stock gets
exactly the args it would build itself: no Ray hook, no probe, no patch does anything.
"""

import argparse
import os
import sys
from types import SimpleNamespace
from typing import List, Optional

from openrlhf_lsc.cli.common import add_reward_flags, number, reward_spec
from openrlhf_lsc.integration.stock_cli import StockCLI
from openrlhf_lsc.integration.rehearsal import check_config
from openrlhf_lsc.monitor import Monitor, check_evaluators
from openrlhf_lsc.rewards import RewardSpec

PROG = "python -m openrlhf_lsc.cli.train_ppo_ray"
REHEARSAL = {  # --lsc.rehearsal.<name>: (type, default, help)
    "dataset": (str, None, "JSONL/HF dataset of expert (prompt, response) pairs D_R; setting it turns rehearsal on "
                "(it must be readable at this path on every node running a policy actor)"),
    "coef": (float, 0.01, "gamma in L_PPO + gamma * NLL(D_R), finite and >= 0"),
    "input_key": (str, "input", "prompt field of the rehearsal dataset"),
    "output_key": (str, "output", "response field of the rehearsal dataset"),
    "micro_batch_size": (int, 1, "rehearsal pairs per actor micro-step, >= 1"),
    "max_len": (int, None, "max tokens per pair, >= 3 (default: --data.max_len)"),
}
MONITOR = {  # --lsc.monitor.<name>: (argparse keywords, help)
    "reward_models": ({"default": None}, "comma-separated held-out evaluator reward models (local paths or hub "
                      "ids, never a training reward model): the reward actors score every rollout with them after "
                      "the proxies; they never enter the utility. Setting it turns the over-optimisation monitor on"),
    "names": ({"default": None}, "comma-separated evaluator names for the metrics; unset: each path's basename"),
    "patterns": ({"nargs": "+", "default": None}, "shortcut probes name=regex ...: the fraction of responses "
                 "matching each is logged as monitor/pattern/<name>"),
    "window": ({"type": int, "default": 5}, "moving-average window W of the stop rule, >= 1"),
    "patience": ({"type": int, "default": 3}, "steps N the evaluator average must fall while the proxy's rises, >= 1"),
    "stop": ({"action": "store_true", "default": False}, "when the stop rule fires, save a checkpoint "
             "(--ckpt.path) and end training (without it: a warning, and training goes on)"),
}


def scale(text: str):
    """argparse type of --lsc.scale: `match` or a finite number > 0."""
    try:
        return text if text == "match" else number(0, low_open=True)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected `match` or a finite number > 0, got {text!r}") from None


def add_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("openrlhf_lsc reward transforms (--lsc.*); any of them turns the plugin on")
    add_reward_flags(g.add_argument, transform="raw", reference="none",
                     group="the prompt's n_samples_per_prompt rollouts")
    g.add_argument("--lsc.reward_models", default=None,
                   help="comma-separated local reward models A,B,...: each sample gets K rewards from OpenRLHF's "
                   "reward actors (the same as --reward.model_name_or_path A,B)")
    g.add_argument("--lsc.reward_names", default=None,
                   help="comma-separated reward names, for reference labels and metrics. Local reward models: one "
                   "per model (default: each path's basename). --reward.remote_url / --train.agent_func_path: the "
                   "names the reward_func or agent returns as extra_logs['lsc/<name>/reward'] (default: its scalar "
                   "reward, named after the .py file, 'remote' or 'agent')")
    g.add_argument("--lsc.scale", type=scale, default=None,
                   help="multiply the utility by this positive number, or `match`: by the number that gives the first "
                   "batch's utility the spread the same aggregation of the raw rewards has, so that turning a transform "
                   "on does not silently change the strength of the KL coefficient (logged as lsc/scale; to resume, "
                   "pass the logged number)")
    g.add_argument("--lsc.dump_rewards", default=None,
                   help="absolute path: the PPO trainer process appends one JSON line per sample (step, token ids, "
                   "K raw rewards, references, utility)")
    r = parser.add_argument_group("Selective Rehearsal (--lsc.rehearsal.*)")
    for name, (kind, default, text) in REHEARSAL.items():
        r.add_argument(f"--lsc.rehearsal.{name}", type=kind, default=default, help=text)
    m = parser.add_argument_group("Over-optimisation monitor (--lsc.monitor.*)")
    for name, (kw, text) in MONITOR.items():
        m.add_argument(f"--lsc.monitor.{name}", help=text, **kw)


def check_exists(path: str, flag: str) -> None:
    """A local path must exist; anything else may be a Hugging Face hub id (not checked offline)."""
    if path.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(path)):
        raise ValueError(f"{flag} {path}: no such file or directory")


def _writable_file(path: str, flag: str) -> str:
    if not os.path.isabs(path):
        raise ValueError(
            f"{flag} {path!r} must be an absolute path: the PPO trainer process writes it, on whichever node Ray "
            f"places it (under `ray job submit` a relative path lands in Ray's temporary working_dir); "
            f"e.g. {flag} {os.path.join('/abs/dir', os.path.basename(path) or 'dump.jsonl')}"
        )
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a directory; give a file path")
    parent = os.path.dirname(path)
    while not os.path.exists(parent):  # the trainer creates missing folders
        parent = os.path.dirname(parent)
    target = path if os.path.exists(path) else parent
    if not os.access(target, os.W_OK) or not os.path.isdir(parent):
        raise ValueError(f"{flag} {path}: {target} is not writable")
    return path


def resolve(flat: dict, args, rewards: bool = True) -> SimpleNamespace:
    """Check the --lsc.* flags against each other and stock's args; return `args.lsc`.

    Args:
        flat: the parsed `--lsc.*` flags, {"transform": ..., "rehearsal.coef": ...}.
        args: OpenRLHF's args after stock's own checks (`--lsc.reward_models` already applied).
        rewards: whether any reward flag (every `--lsc.*` flag but `--lsc.rehearsal.*`) was given.

    Returns:
        SimpleNamespace(spec: RewardSpec or None (no reward flag given), extra_logs: bool (read the K rewards from
        the reward_func's/agent's extra_logs), scale: None, a number or "match", dump_rewards, rehearsal:
        SimpleNamespace of --lsc.rehearsal.*, monitor: SimpleNamespace of --lsc.monitor.* or None).

    Raises:
        ValueError naming the flag, for the CLI to print as one line.
    """
    group = lambda prefix: SimpleNamespace(**{k[len(prefix):]: flat.pop(k) for k in list(flat) if k.startswith(prefix)})
    lsc = SimpleNamespace(spec=None, extra_logs=False, scale=flat.pop("scale"), dump_rewards=None,
                          rehearsal=group("rehearsal."), monitor=group("monitor."))
    if rewards:
        lsc.spec, lsc.extra_logs = _reward_spec(flat, args)
    lsc.monitor = _monitor(lsc.monitor, args, lsc.spec)
    if flat["dump_rewards"]:
        lsc.dump_rewards = _writable_file(flat["dump_rewards"], "--lsc.dump_rewards")

    reh = lsc.rehearsal
    if reh.dataset:
        check_exists(reh.dataset, "--lsc.rehearsal.dataset")
        check_config(reh)
        if args.ds.ring_attn_size > 1:
            raise ValueError("--lsc.rehearsal.dataset does not support ring attention: drop --ds.ring_attn_size "
                             f"{args.ds.ring_attn_size} (rehearsal's forward is not sharded over a ring group)")
    else:
        given = [k for k, (_, default, _) in REHEARSAL.items() if getattr(reh, k) != default]
        if given:
            raise ValueError(f"--lsc.rehearsal.{given[0]} only applies with --lsc.rehearsal.dataset; set the dataset")
    return lsc


def _monitor(mon: SimpleNamespace, args, spec: Optional[RewardSpec]) -> Optional[SimpleNamespace]:
    """The checked --lsc.monitor.* flags (None without evaluators); the evaluators join the reward actors' models."""
    if not mon.reward_models:
        given = [k for k, (kw, _) in MONITOR.items() if getattr(mon, k) != kw["default"]]
        if given:
            raise ValueError(f"--lsc.monitor.{given[0]} only applies with --lsc.monitor.reward_models; give the "
                             "held-out evaluator reward models E1,E2")
        return None
    proxies = args.reward.model_name_or_path
    if not proxies:
        raise ValueError("--lsc.monitor.reward_models are scored in OpenRLHF's reward actors, which run only for "
                         "local reward models: train with --reward.model_name_or_path / --lsc.reward_models")
    paths = mon.reward_models.split(",")
    for path in paths:
        check_exists(path, "--lsc.monitor.reward_models")
    check_evaluators(paths, proxies.split(","))
    names = mon.names.split(",") if mon.names is not None else [os.path.basename(p.rstrip("/")) for p in paths]
    if len(names) != len(paths) or not all(names):
        raise ValueError(f"--lsc.monitor.names {','.join(names)!r}: give {len(paths)} non-empty names, one per "
                         f"evaluator of --lsc.monitor.reward_models {mon.reward_models}")
    clash = sorted(set(names) & set(spec.names)) or sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ValueError(f"--lsc.monitor.names: {clash[0]!r} names two models (evaluator names must differ from each "
                         f"other and from the reward names {','.join(spec.names)}); give --lsc.monitor.names")
    mon.patterns = mon.patterns or []
    Monitor(spec.names, names, mon.patterns, mon.window, mon.patience)  # checks the patterns, window, patience
    if mon.stop and args.train.async_enable:
        raise ValueError("--lsc.monitor.stop cannot end a --train.async_enable run (its generator is another Ray "
                         "actor): drop one of them; without --lsc.monitor.stop the monitor warns when the rule fires")
    mon.reward_models, mon.names = paths, names
    args.reward.model_name_or_path = ",".join([proxies, *paths])  # reward actors return [b, K + M]
    return mon


def _reward_spec(flat: dict, args):
    """The RewardSpec for the run's reward source, and whether its K rewards come from extra_logs."""
    agent, remote, local = args.train.agent_func_path, args.reward.remote_url, args.reward.model_name_or_path
    if local and (agent or remote):
        other = f"--train.agent_func_path {agent}" if agent else f"--reward.remote_url {','.join(remote)}"
        raise ValueError(
            f"{other} replaces the local reward models (stock OpenRLHF ignores --reward.model_name_or_path {local} "
            "then): drop --reward.model_name_or_path / --lsc.reward_models, or score with those models inside the "
            "reward function and return each score as extra_logs['lsc/<name>/reward'] (--lsc.reward_names)"
        )
    names = flat["reward_names"].split(",") if flat["reward_names"] is not None else None
    if agent or remote:
        for path in [agent] if agent else [u for u in remote if u.endswith(".py")]:
            flag = "--train.agent_func_path" if agent else "--reward.remote_url"
            if not os.path.isfile(path):
                raise ValueError(f"{flag} {path}: no such file")
        if names is None:  # the source's scalar reward is the single reward
            name = "agent" if agent else os.path.splitext(os.path.basename(remote[0]))[0] if remote[0].endswith(".py") else "remote"
            names = [name]
        extra_logs = flat["reward_names"] is not None
    else:  # local reward models (main() refused a run without any reward source)
        paths = local.split(",")
        for path in paths:
            check_exists(path, "--reward.model_name_or_path")
        names = names or [os.path.basename(p.rstrip("/")) for p in paths]
        if len(names) != len(paths):
            raise ValueError(f"--lsc.reward_names lists {len(names)} names for {len(paths)} reward models ({local})")
        extra_logs = False
    spec = reward_spec(names, flat, args.data.label_key)
    if spec.reference == "group" and args.rollout.n_samples_per_prompt < 2:
        raise ValueError("--lsc.reference group needs --rollout.n_samples_per_prompt >= 2 (the group to take the "
                         f"quantile over), got {args.rollout.n_samples_per_prompt}")
    if spec.aggregate == "gdpo" and args.rollout.n_samples_per_prompt < 2:
        raise ValueError("--lsc.aggregate gdpo normalises each reward within its prompt's samples: needs "
                         f"--rollout.n_samples_per_prompt >= 2, got {args.rollout.n_samples_per_prompt}")
    coef = args.reward.stop_properly_penalty_coef
    if spec.transform != "raw" and coef is not None and coef >= 0:
        raise ValueError(
            f"--reward.stop_properly_penalty_coef {coef} >= 0 scales a truncated sample's reward toward 0, which "
            f"rewards truncation when --lsc.transform {spec.transform} makes utilities negative; use a negative "
            "coef (a fixed value) or drop it"
        )
    return spec, extra_logs


def stock_cli() -> StockCLI:
    return StockCLI("openrlhf.cli.train_ppo_ray", PROG, "--lsc.", add_flags)


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    stock = stock_cli()
    flat = stock.parse(argv)
    lsc = {k[4:]: flat.pop(k) for k in list(flat) if k.startswith("lsc.")}
    models = lsc.pop("reward_models")
    if models:  # before stock's checks, which read --reward.model_name_or_path
        if flat["reward.model_name_or_path"] not in (None, models):
            stock.error(f"--lsc.reward_models {models} conflicts with --reward.model_name_or_path "
                        f"{flat['reward.model_name_or_path']}: give one of them")
        flat["reward.model_name_or_path"] = models
    rewards = any(t.startswith("--lsc") and not t.startswith("--lsc.rehearsal") for t in argv)
    if rewards and not (flat["reward.model_name_or_path"] or flat["reward.remote_url"] or flat["train.agent_func_path"]):
        stock.error("no reward source: give --reward.model_name_or_path (or --lsc.reward_models), "
                    "--reward.remote_url or --train.agent_func_path")  # before stock's checks, which assume one
    args = stock.check(flat)
    args.lsc = None
    if any(t.startswith("--lsc") for t in argv):
        try:
            args.lsc = resolve(lsc, args, rewards)
        except ValueError as e:
            stock.error(str(e))
    stock.require("flash_attn", "vllm")
    if args.lsc is None:
        stock.train(args)
        return

    from openrlhf_lsc.integration.launch import SetupError, train

    try:
        train(stock, args)
    except SetupError as e:
        stock.error(str(e))


if __name__ == "__main__":
    main()
