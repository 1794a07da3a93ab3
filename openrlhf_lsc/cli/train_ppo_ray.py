"""`python -m openrlhf_lsc.cli.train_ppo_ray <stock train_ppo_ray flags> --lsc.<...>`

Parses and strips the `--lsc.*` flags, runs the stock `openrlhf.cli.train_ppo_ray` unchanged (runpy) with
the plugin registered in this process and, through Ray's `worker_process_setup_hook`, in every Ray worker;
the parsed flags ride on OpenRLHF's own args namespace as `args.lsc`, which reaches every actor.
"""

import argparse
import os
import sys
from types import SimpleNamespace
from typing import List, Optional

from openrlhf_lsc.rewards import AGGREGATES, TRANSFORMS

SETUP_HOOK = "openrlhf_lsc.integration.setup_worker"
REFERENCES = ("none", "label", "group", "constant")


def _floats(flag: str):
    def parse(text: str) -> List[float]:
        try:
            return [float(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes comma-separated numbers, got {text!r}") from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m openrlhf_lsc.cli.train_ppo_ray",
        description="Stock OpenRLHF train_ppo_ray plus LSC reward transforms (every stock flag works as in "
        "openrlhf.cli.train_ppo_ray; the stock flags' help follows).",
        add_help=False,
    )
    g = p.add_argument_group("openrlhf_lsc (--lsc.*)")
    g.add_argument("--lsc.transform", choices=TRANSFORMS, default="raw",
                   help="raw: r (stock); lsc: log sigmoid(r - r_ref(x)); center: r - r_ref(x); logsigmoid: log sigmoid(r)")
    g.add_argument("--lsc.reward_models", default=None,
                   help="comma-separated local reward models A,B,...: each sample gets K rewards, scored in "
                   "OpenRLHF's reward actors (same as --reward.model_name_or_path A,B)")
    g.add_argument("--lsc.reward_names", default=None,
                   help="comma-separated names of the K reward models, used for reference labels and metrics "
                   "(default: the basename of each path; 'remote' for --reward.remote_url)")
    g.add_argument("--lsc.aggregate", choices=AGGREGATES, default="and",
                   help="and: sum of transformed rewards (logical AND with lsc); weighted: sum_k w_k u_k")
    g.add_argument("--lsc.weights", type=_floats("--lsc.weights"), default=None,
                   help="K comma-separated weights for --lsc.aggregate weighted")
    g.add_argument("--lsc.reference", choices=REFERENCES, default="none",
                   help="where r_ref(x) comes from: label = per prompt from --data.label_key (schema: "
                   "openrlhf_lsc.references); group = --lsc.quantile of the prompt's n_samples_per_prompt "
                   "rollouts (moving, not the paper's SFT reference); constant = --lsc.reference_value")
    g.add_argument("--lsc.quantile", type=float, default=None, help="quantile in (0, 1) for --lsc.reference group")
    g.add_argument("--lsc.reference_value", type=_floats("--lsc.reference_value"), default=None,
                   help="K comma-separated constants for --lsc.reference constant")
    g.add_argument("--lsc.dump_rewards", default=None,
                   help="append per-sample JSON lines (raw rewards, references, utility, token ids) to this file")
    r = p.add_argument_group("selective rehearsal (--lsc.rehearsal.*)")
    r.add_argument("--lsc.rehearsal.dataset", default=None, help="JSONL/HF dataset of expert (prompt, response) pairs; on")
    r.add_argument("--lsc.rehearsal.coef", type=float, default=0.01, help="gamma in L_PPO + gamma * NLL(D_R)")
    r.add_argument("--lsc.rehearsal.input_key", default="input", help="prompt field of the rehearsal dataset")
    r.add_argument("--lsc.rehearsal.output_key", default="output", help="response field of the rehearsal dataset")
    r.add_argument("--lsc.rehearsal.micro_batch_size", type=int, default=1, help="rehearsal pairs per actor micro-step")
    r.add_argument("--lsc.rehearsal.max_len", type=int, default=None, help="max tokens per pair (default --data.max_len)")
    return p


def _namespace(flat: argparse.Namespace) -> SimpleNamespace:
    """{'lsc.rehearsal.coef': v} -> ns.rehearsal.coef (drops the 'lsc.' prefix)."""
    root = SimpleNamespace()
    for key, value in vars(flat).items():
        node = root
        *parents, leaf = key.split(".")[1:]
        for part in parents:
            if not hasattr(node, part):
                setattr(node, part, SimpleNamespace())
            node = getattr(node, part)
        setattr(node, leaf, value)
    return root


def resolve(lsc: SimpleNamespace, args) -> SimpleNamespace:
    """Check the --lsc.* flags against each other and the stock args; fill reward models and names."""
    if lsc.reward_models:
        if args.reward.remote_url:
            raise ValueError("--lsc.reward_models scores with local reward models; drop --reward.remote_url")
        stock = args.reward.model_name_or_path
        if stock and stock != lsc.reward_models:
            raise ValueError(
                f"--lsc.reward_models {lsc.reward_models!r} conflicts with --reward.model_name_or_path {stock!r}; give one"
            )
        args.reward.model_name_or_path = lsc.reward_models
    if args.reward.remote_url:
        paths = ["remote"]
    elif args.reward.model_name_or_path:
        paths = args.reward.model_name_or_path.split(",")
    else:
        raise ValueError("no reward: give --lsc.reward_models, --reward.model_name_or_path or --reward.remote_url")
    names = lsc.reward_names.split(",") if lsc.reward_names else [os.path.basename(p.rstrip("/")) for p in paths]
    if len(names) != len(paths):
        raise ValueError(f"--lsc.reward_names lists {len(names)} names for {len(paths)} reward models")
    if len(set(names)) != len(names):
        raise ValueError(f"reward model names {names} are not unique: set --lsc.reward_names")
    lsc.reward_names = names
    k = len(names)

    if lsc.aggregate == "weighted":
        if lsc.weights is None or len(lsc.weights) != k:
            got = 0 if lsc.weights is None else len(lsc.weights)
            raise ValueError(f"--lsc.aggregate weighted needs --lsc.weights with {k} values (one per reward model), got {got}")
    elif lsc.weights is not None:
        raise ValueError("--lsc.weights is only used with --lsc.aggregate weighted")

    if lsc.transform in ("lsc", "center") and lsc.reference == "none":
        raise ValueError(f"--lsc.transform {lsc.transform} needs a reference: set --lsc.reference label|group|constant")
    if lsc.reference == "label" and not args.data.label_key:
        raise ValueError("--lsc.reference label reads references from the prompt field named by --data.label_key; set it")
    if lsc.reference == "group":
        if lsc.quantile is None or not 0.0 < lsc.quantile < 1.0:
            raise ValueError(f"--lsc.reference group needs --lsc.quantile in (0, 1), got {lsc.quantile}")
        if args.rollout.n_samples_per_prompt < 2:
            raise ValueError("--lsc.reference group needs --rollout.n_samples_per_prompt >= 2")
    elif lsc.quantile is not None:
        raise ValueError("--lsc.quantile is only used with --lsc.reference group")
    if lsc.reference == "constant":
        if lsc.reference_value is None or len(lsc.reference_value) != k:
            got = 0 if lsc.reference_value is None else len(lsc.reference_value)
            raise ValueError(f"--lsc.reference constant needs --lsc.reference_value with {k} values, got {got}")
    elif lsc.reference_value is not None:
        raise ValueError("--lsc.reference_value is only used with --lsc.reference constant")

    if lsc.rehearsal.dataset:
        from openrlhf_lsc.integration.rehearsal import check_config

        check_config(lsc.rehearsal)
    coef = getattr(args.reward, "stop_properly_penalty_coef", None)
    if lsc.transform != "raw" and coef is not None and coef >= 0:
        raise ValueError(
            "--reward.stop_properly_penalty_coef >= 0 scales a truncated sample's reward toward 0, which rewards "
            f"truncation when --lsc.transform {lsc.transform} makes utilities negative; use a negative coef (fixed value)"
        )
    if lsc.transform == "center" and args.algo.advantage.estimator in ("rloo", "reinforce_baseline", "dr_grpo", "group_norm"):
        print(f"[openrlhf_lsc] note: --lsc.transform center is cancelled by the group baseline of "
              f"{args.algo.advantage.estimator} (it equals raw there); lsc is not")
    if lsc.transform in ("lsc", "logsigmoid") and args.reward.clip_range is not None and args.reward.clip_range[0] > -30:
        print(f"[openrlhf_lsc] note: utilities below {args.reward.clip_range[0]} (a reward that far below its "
              "reference) are clipped by --reward.clip_range; the fraction clipped is logged as lsc/clipped")
    return lsc


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        print("\n--- stock openrlhf.cli.train_ppo_ray flags ---")
    flat, rest = parser.parse_known_args(argv)
    lsc = _namespace(flat)

    from openrlhf_lsc.integration import register, run_stock_cli

    register()

    def on_args(args):
        args.lsc = resolve(lsc, args)
        _init_ray()  # after stock parsing, so --help and flag errors exit before Ray starts

    run_stock_cli("openrlhf.cli.train_ppo_ray", rest, on_args)


def _init_ray() -> None:
    """Start Ray with the plugin's worker setup hook (stock env defaults kept), then prove workers have it."""
    import ray

    if not ray.is_initialized():
        ray.init(
            runtime_env={
                "worker_process_setup_hook": SETUP_HOOK,
                "env_vars": {
                    "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "true"),
                    "NCCL_DEBUG": os.environ.get("NCCL_DEBUG", "WARN"),
                    "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": os.environ.get("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1"),
                },
            }
        )
    if not ray.get(ray.remote(num_cpus=0)(_remote_probe).remote()):
        raise RuntimeError(
            "openrlhf_lsc is not registered in Ray workers: Ray was started without the plugin's setup hook. "
            f"Pass runtime_env={{'worker_process_setup_hook': '{SETUP_HOOK}'}} to ray.init / "
            f"`ray job submit --runtime-env-json`, or let this CLI start Ray."
        )


def _remote_probe():
    import openrlhf_lsc.integration as integration

    return integration._registered


if __name__ == "__main__":
    main()
