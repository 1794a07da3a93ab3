"""`deepspeed --module openrlhf_lsc.cli.train_rm <stock train_rm flags> [--model.loss_type am] --am.<...>`

Builds stock `openrlhf.cli.train_rm`'s own parser with the `--am.*` flags added, runs stock's own checks, checks
the `--am.*` flags (one line naming the flag, exit 2, before anything loads), then calls stock's `train(args)`
with the plugin's reward-model patches in this process. The flags ride on OpenRLHF's args as `args.am`. Stock
`--model.loss_type` has no choices (anything but `sigmoid` trains LogExp), so `am` passes stock parsing and the
patched trainer swaps in the AM loss.

Every run through this CLI, whatever its loss, also reports pairwise accuracy, ECE (10 bins) and per-task score
mean/std after each evaluation, in `<ckpt.output_dir>/rm_eval_metrics.json`; the saved config.json holds the last
per-task statistics under `lsc_am_task_stats`.
"""

import argparse
import sys
from typing import List, Optional

from openrlhf_lsc.cli.common import number
from openrlhf_lsc.cli.train_ppo_ray import check_exists
from openrlhf_lsc.integration.stock_cli import StockCLI

PROG = "python -m openrlhf_lsc.cli.train_rm"
AM_ONLY = ("margin", "expected_coef", "bound_coef", "task_coef", "task_std", "task_momentum")


def add_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Advantage Model (--am.*); formulation in openrlhf_lsc/am_loss.py")
    g.add_argument("--am.task_key", default=None, help="dataset field holding each pair's task/category: per-task "
                   "eval statistics (any loss) and the per-task term (am)")
    g.add_argument("--am.min_task_pairs", type=int, default=10,
                   help="fewest pairs a task may have in the training (am) or evaluation set, >= 1")
    g.add_argument("--am.margin", type=number(), default=2.5, help="m > 0: the advantage is kept within [-m, m] (am)")
    g.add_argument("--am.expected_coef", type=number(), default=1.0,
                   help="weight >= 0 of the expected-reward term: each pair's mean score is pulled to 0 (am)")
    g.add_argument("--am.bound_coef", type=number(), default=1.0, help="weight >= 0 of mean(relu(|a| - m)^2) (am)")
    g.add_argument("--am.task_coef", type=number(), default=1.0,
                   help="weight >= 0 of the per-task term pulling each task's score mean to 0 and std to "
                   "--am.task_std (am; needs --am.task_key; 0 turns it off)")
    g.add_argument("--am.task_std", type=number(), default=1.0, help="the score std > 0 every task is pulled to (am)")
    g.add_argument("--am.task_momentum", type=number(), default=0.1,
                   help="weight in (0, 1] of the newest batch in the running per-task mean/std (am)")


def check(args, argv: List[str]) -> None:
    """Check the --am.* flags against each other and stock's args (ValueError naming the flag)."""
    am = args.am
    given = [name for name in AM_ONLY if any(t.split("=")[0] == f"--am.{name}" for t in argv)]
    if args.model.loss_type != "am" and given:
        raise ValueError(f"--am.{given[0]} only applies to --model.loss_type am (got --model.loss_type "
                         f"{args.model.loss_type})")
    if am.min_task_pairs < 1:
        raise ValueError(f"--am.min_task_pairs must be >= 1, got {am.min_task_pairs}")
    if am.task_key is not None and not am.task_key.strip():
        raise ValueError("--am.task_key must name a dataset field, got an empty string")
    for name in ("expected_coef", "bound_coef", "task_coef"):
        if getattr(am, name) < 0:
            raise ValueError(f"--am.{name} must be >= 0, got {getattr(am, name)}")
    for name in ("margin", "task_std"):
        if getattr(am, name) <= 0:
            raise ValueError(f"--am.{name} must be > 0, got {getattr(am, name)}")
    if not 0 < am.task_momentum <= 1:
        raise ValueError(f"--am.task_momentum must be in (0, 1], got {am.task_momentum}")
    if args.model.loss_type == "am" and am.task_coef > 0 and not am.task_key:
        raise ValueError("--am.task_coef > 0 needs --am.task_key (the dataset field naming each pair's task); "
                         "or set --am.task_coef 0")
    check_exists(args.model.model_name_or_path or "", "--model.model_name_or_path")
    for flag, value in (("--data.dataset", args.data.dataset), ("--eval.dataset", args.eval.dataset)):
        for path in (value or "").split(","):
            check_exists(path, flag)


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    stock = StockCLI("openrlhf.cli.train_rm", PROG, "--am.", add_flags)
    args = stock.check(stock.parse(argv))
    try:
        check(args, argv)
    except ValueError as e:
        stock.error(str(e))
    stock.require("flash_attn")

    from openrlhf_lsc.integration import check_openrlhf_version, reward_model

    check_openrlhf_version()
    reward_model.apply()
    stock.train(args)


if __name__ == "__main__":
    main()
