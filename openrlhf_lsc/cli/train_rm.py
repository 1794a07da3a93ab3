"""`deepspeed --module openrlhf_lsc.cli.train_rm <stock train_rm flags> [--model.loss_type am] --am.<...>`

Runs the stock `openrlhf.cli.train_rm` unchanged (runpy) with the plugin's reward-model patches in this
process. Every stock flag works as in OpenRLHF 0.11.2. The `--am.*` flags are parsed and stripped here
and ride on OpenRLHF's args namespace as `args.am`. Stock `--model.loss_type` has no choices (anything
but `sigmoid` trains LogExp), so `am` passes stock parsing and the patched trainer swaps in the AM loss.

Every run through this CLI, whatever its loss, also reports pairwise accuracy, ECE (10 bins) and
per-task score mean/std after each evaluation, in `<ckpt.output_dir>/rm_eval_metrics.json`; the
saved config.json holds the last per-task statistics under `lsc_am_task_stats`.
"""

import argparse
import sys
from types import SimpleNamespace
from typing import List, Optional

# flag -> (type, default, help); None defaults are filled in resolve() so we can tell what was given
AM_FLAGS = {
    "margin": (float, 2.5, "m: the advantage is kept within [-m, m] (paper: 2.5)"),
    "expected_coef": (float, 1.0, "weight of the expected-reward term: each pair's mean score is pulled to 0"),
    "bound_coef": (float, 1.0, "weight of the bound term mean(relu(|a| - m)^2)"),
    "task_coef": (float, 1.0, "weight of the per-task term pulling each task's score mean to 0 and std to "
                  "--am.task_std (needs --am.task_key; 0 turns it off)"),
    "task_std": (float, 1.0, "the score std every task is pulled to"),
    "task_momentum": (float, 0.1, "weight of the newest batch in the running per-task mean/std, in (0, 1]"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m openrlhf_lsc.cli.train_rm",
        description="Stock OpenRLHF train_rm plus the Advantage Model loss (--model.loss_type am) and "
        "accuracy/ECE/per-task evaluation (every stock flag works as in openrlhf.cli.train_rm; its help follows).",
        add_help=False,
        allow_abbrev=False,  # never swallow an abbreviated stock flag
    )
    g = p.add_argument_group("Advantage Model (--am.*); formulation in openrlhf_lsc/am_loss.py")
    g.add_argument("--am.task_key", default=None,
                   help="dataset field holding each pair's task/category: per-task eval statistics (any loss) "
                   "and the per-task term (am)")
    g.add_argument("--am.min_task_pairs", type=int, default=10,
                   help="fewest pairs a task may have in the training (am) or evaluation set")
    for name, (kind, default, text) in AM_FLAGS.items():
        g.add_argument(f"--am.{name}", type=kind, default=None,
                       help=f"{text} (--model.loss_type am; default {default})")
    return p


def resolve(flat: argparse.Namespace, args) -> SimpleNamespace:
    """Check the --am.* flags against each other and the stock args; fill defaults.

    Args:
        flat: the parsed --am.* flags.
        args: OpenRLHF's hierarchized args.

    Returns:
        The namespace attached as `args.am`.
    """
    am = SimpleNamespace(**{k.split(".", 1)[1]: v for k, v in vars(flat).items()})
    given = [name for name in AM_FLAGS if getattr(am, name) is not None]
    if args.model.loss_type != "am" and given:
        raise ValueError(
            f"--am.{given[0]} only applies to --model.loss_type am (got --model.loss_type {args.model.loss_type})"
        )
    for name, (_, default, _) in AM_FLAGS.items():
        if getattr(am, name) is None:
            setattr(am, name, default)
    if am.min_task_pairs < 1:
        raise ValueError(f"--am.min_task_pairs must be >= 1, got {am.min_task_pairs}")
    if args.model.loss_type == "am":
        for name in ("expected_coef", "bound_coef", "task_coef"):
            if getattr(am, name) < 0:
                raise ValueError(f"--am.{name} must be >= 0, got {getattr(am, name)}")
        for name in ("margin", "task_std"):
            if getattr(am, name) <= 0:
                raise ValueError(f"--am.{name} must be > 0, got {getattr(am, name)}")
        if not 0 < am.task_momentum <= 1:
            raise ValueError(f"--am.task_momentum must be in (0, 1], got {am.task_momentum}")
        if am.task_coef > 0 and not am.task_key:
            raise ValueError("--am.task_coef > 0 needs --am.task_key (the dataset field naming each pair's task); "
                             "or set --am.task_coef 0")
        if args.ds.packing_samples:
            print("[openrlhf_lsc] note: --ds.packing_samples is untested with --model.loss_type am")
    return am


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        print("\n--- stock openrlhf.cli.train_rm flags ---")
    flat, rest = parser.parse_known_args(argv)

    from openrlhf_lsc.integration import check_openrlhf_version, reward_model, run_stock_cli

    check_openrlhf_version()
    reward_model.apply()

    def on_args(args):
        args.am = resolve(flat, args)

    run_stock_cli("openrlhf.cli.train_rm", rest, on_args)


if __name__ == "__main__":
    main()
